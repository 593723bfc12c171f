//! Event streams over HTTP/1.1 without hyper's connection: a connection whose first request is a
//! plain `GET /sse` is answered here, on its bare IO, and everything else goes to hyper as before.
//!
//! Why: an idle SSE stream served by hyper keeps hyper's whole HTTP/1 connection for its life
//! (an 8 KiB read buffer, a write buffer, the dispatcher and a body channel), which made an idle
//! stream cost 26 KiB plain and 33 KiB over TLS against a WebSocket's 4.7 and 12.3: after its
//! request a stream only writes, so none of that is needed. Here a stream keeps its IO, the
//! route's response body and a few bytes to notice the client leave.
//!
//! This file owns only the shape test of a connection's first bytes ([`sniff`]), writing one
//! response on HTTP/1.1 ([`serve`]), and the replay of sniffed bytes to hyper ([`Prefixed`]).
//! What the request means (admission, the stream itself) is the route's, the same code hyper's
//! requests take. Anything that is not exactly a bodiless `GET /sse… HTTP/1.1` without
//! `Upgrade` or `Expect` (HTTP/1.0, a body, a malformed or oversized head, the HTTP/2 preface,
//! any other path) is handed to hyper with the bytes read so far, so HTTP's corner cases keep
//! one implementation. A response written here ends its connection (`Connection: close`): an
//! event stream never ends for a next request, and a refused one is retried on a new connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, Request, Response, header};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::web::{Body, ConnInfo};

/// The request line every connection served here starts with; a query or a space follows.
const PREFIX: &[u8] = b"GET /sse";

/// Header lines a sniffed head may have; more goes to hyper (whose limit is 100).
const MAX_HEADERS: usize = 64;

/// What the first bytes of a connection turned out to be.
pub(super) enum Sniffed {
    /// A plain event-stream request, read whole (and nothing after it).
    EventStream(Box<Request<()>>),
    /// Anything else: hyper serves it, from these bytes on.
    Other(Bytes),
    /// The client closed, or sent nothing whole in time: nothing to answer.
    Gone,
}

/// Reads a connection's first request as far as needed to tell whether it is a plain
/// `GET /sse`: only such a request is read to its end (at most `max_head` bytes), everything else
/// is handed on as soon as its first bytes differ. The caller bounds it in time.
pub(super) async fn sniff<IO>(io: &mut IO, max_head: usize) -> Sniffed
where
    IO: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        // Never past the cap, whatever the buffer's growth reserved.
        let room = max_head.saturating_sub(buf.len()).max(1) as u64;
        match (&mut *io).take(room).read_buf(&mut buf).await {
            Ok(0) | Err(_) if buf.is_empty() => return Sniffed::Gone,
            Ok(0) | Err(_) => return Sniffed::Other(buf.freeze()),
            Ok(_) => {}
        }
        let n = buf.len().min(PREFIX.len());
        if buf[..n] != PREFIX[..n] {
            return Sniffed::Other(buf.freeze());
        }
        if buf.len() > PREFIX.len() && !matches!(buf[PREFIX.len()], b' ' | b'?') {
            return Sniffed::Other(buf.freeze());
        }
        match parse(&buf) {
            Head::Complete(req) => return Sniffed::EventStream(req),
            // Room for the rest of a head, up to the cap (hyper answers 431 past it).
            Head::Partial if buf.len() < max_head => buf.reserve(1024),
            Head::Partial | Head::NotOurs => return Sniffed::Other(buf.freeze()),
        }
    }
}

enum Head {
    Complete(Box<Request<()>>),
    Partial,
    /// Valid or not, hyper's to answer.
    NotOurs,
}

fn parse(buf: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::NotOurs,
    };
    // Bytes after the head would be a pipelined request or a body: hyper's.
    if len != buf.len() || parsed.version != Some(1) || parsed.method != Some("GET") {
        return Head::NotOurs;
    }
    let Some(path) = parsed.path else {
        return Head::NotOurs;
    };
    let mut req = Request::builder().version(http::Version::HTTP_11);
    for h in parsed.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            return Head::NotOurs;
        };
        let body_or_switch = name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT;
        if body_or_switch {
            return Head::NotOurs;
        }
        let Ok(value) = HeaderValue::from_bytes(h.value) else {
            return Head::NotOurs;
        };
        req = req.header(name, value);
    }
    match req.uri(path).body(()) {
        Ok(req) if req.uri().path() == "/sse" => Head::Complete(Box::new(req)),
        _ => Head::NotOurs,
    }
}

/// Answers one sniffed request with `route`'s response on `io`, then closes the connection. The
/// body is written as the route produces it, in chunks; a write that blocks is ended by `kill`
/// (the SSE stall watcher's token), and a client that closes its side, or sends anything more,
/// ends the stream at once.
///
/// A `fn`, not an `async fn`: the response's head is written out here, so the future that lives
/// as long as the stream keeps neither the response nor its header map.
pub(super) fn serve<'a, IO>(
    io: IO,
    resp: Response<Body>,
    info: &'a ConnInfo,
    kill: &'a CancellationToken,
    write_timeout: std::time::Duration,
) -> impl Future<Output = ()> + 'a
where
    IO: AsyncRead + AsyncWrite + Unpin + 'a,
{
    let (parts, body) = resp.into_parts();
    let exact = hyper::body::Body::size_hint(&body).exact();
    let head = response_head(parts, exact);
    stream_body(io, head, body, exact.is_none(), info, kill, write_timeout)
}

async fn stream_body<IO>(
    mut io: IO,
    head: Bytes,
    mut body: Body,
    chunked: bool,
    info: &ConnInfo,
    kill: &CancellationToken,
    write_timeout: std::time::Duration,
) where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    // One byte is enough to see the client leave (EOF) or break the protocol (anything sent).
    let mut probe = [0u8; 1];
    let mut pending = Some(head);
    loop {
        if let Some(bytes) = pending.take() {
            let write = async {
                let mut buf = bytes;
                io.write_all_buf(&mut buf).await?;
                io.flush().await
            };
            // An event stream's stall watcher (`kill`) ends a write its reader does not take,
            // and counts it as a slow consumer, once a queued frame has waited
            // `session.write_timeout` (checked every quarter of it): this bound lets it act
            // first, and still ends a write that blocks on a quiet stream (a heartbeat) or a
            // sized answer, which have no watcher.
            let bound = if chunked {
                2 * write_timeout
            } else {
                write_timeout
            };
            let done = tokio::select! {
                r = tokio::time::timeout(bound, write) => matches!(r, Ok(Ok(()))),
                _ = kill.cancelled() => false,
            };
            if !done {
                tracing::debug!(peer = %info.peer, "event stream write failed or stalled");
                return;
            }
        }
        // Biased to the body: a sized answer that is ready is written whole even when the client
        // already sent more or closed its side; a stream's client that left fails the next write.
        let frame = tokio::select! {
            biased;
            _ = kill.cancelled() => return,
            frame = body.frame() => frame,
            r = io.read(&mut probe) => {
                match r {
                    Ok(0) | Err(_) => tracing::debug!(peer = %info.peer, "client closed its event stream"),
                    Ok(_) => tracing::debug!(peer = %info.peer, "data after an event stream request; closing"),
                }
                return;
            }
        };
        match frame {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                pending = Some(if chunked { chunk(data) } else { data });
            }
            Some(Err(never)) => match never {},
            None => {
                if chunked {
                    let mut last = Bytes::from_static(b"0\r\n\r\n");
                    let _ = tokio::time::timeout(write_timeout, io.write_all_buf(&mut last)).await;
                }
                let _ = tokio::time::timeout(write_timeout, io.shutdown()).await;
                return;
            }
        }
    }
}

/// The status line and header block of a response on HTTP/1.1: the route's headers, then how
/// the body is framed (`exact` bytes, or chunked), `Connection: close` and `Date`.
fn response_head(parts: http::response::Parts, exact: Option<u64>) -> Bytes {
    let mut head = BytesMut::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.extend_from_slice(b" ");
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    // Framing and the connection's fate are this writer's to say, as they are hyper's.
    let ours = [
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::DATE,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
    ];
    for (name, value) in &parts.headers {
        if ours.contains(name) {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    match exact {
        Some(len) => head.extend_from_slice(format!("content-length: {len}\r\n").as_bytes()),
        None => head.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    head.extend_from_slice(b"connection: close\r\ndate: ");
    head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    head.freeze()
}

/// One HTTP/1.1 chunk: its size line, the data, the line end.
fn chunk(data: Bytes) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 12);
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// An IO whose first reads return bytes already read from it: how a sniffed connection reaches
/// hyper whole.
pub(super) struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Prefixed<IO> {
    pub(super) fn new(prefix: Bytes, io: IO) -> Prefixed<IO> {
        Prefixed { prefix, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // An emptied `Bytes` still holds its buffer: a WebSocket upgraded from this
                // connection would keep the sniffed head for its whole life.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sniffed(bytes: &[u8]) -> Sniffed {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let bytes = bytes.to_vec();
        tokio_test_block_on(async move {
            client.write_all(&bytes).await.unwrap();
            drop(client);
            sniff(&mut server, 8192).await
        })
    }

    fn tokio_test_block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn only_a_plain_bodiless_event_stream_request_is_taken() {
        let ok = b"GET /sse?channel=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1-2\r\n\r\n";
        match sniffed(ok) {
            Sniffed::EventStream(req) => {
                assert_eq!(req.uri().query(), Some("channel=a"));
                assert_eq!(req.headers()["last-event-id"], "1-2");
            }
            _ => panic!("a plain GET /sse is taken"),
        }
        let others: &[&[u8]] = &[
            b"GET /ssex HTTP/1.1\r\n\r\n",
            b"GET /ws HTTP/1.1\r\n\r\n",
            b"GET /sse HTTP/1.0\r\n\r\n",
            b"POST /sse HTTP/1.1\r\n\r\n",
            b"GET /sse HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /sse HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /sse HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"GET /sse HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            // Pipelined: a second request behind the first.
            b"GET /sse HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"GET /sse HTTP/1.1\r\nBad Header: x\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ];
        for bytes in others {
            match sniffed(bytes) {
                // Handed on whole: hyper sees exactly what the client sent.
                Sniffed::Other(prefix) => assert_eq!(&prefix[..], *bytes),
                _ => panic!("{:?} is hyper's", String::from_utf8_lossy(bytes)),
            }
        }
        // More header lines than the sniff parses: hyper's limit decides.
        let mut many = b"GET /sse?channel=a HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS + 1 {
            many.extend_from_slice(format!("X-{i}: a\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(sniffed(&many), Sniffed::Other(p) if p[..] == many[..]));
        assert!(matches!(sniffed(b""), Sniffed::Gone));
    }

    #[test]
    fn a_head_past_the_cap_goes_to_hyper_with_what_was_read() {
        let mut big = b"GET /sse?channel=a HTTP/1.1\r\n".to_vec();
        // Long lines: fewer than `MAX_HEADERS` of them fill the cap.
        let pad = format!("X-Pad: {}\r\n", "a".repeat(400));
        while big.len() < 20_000 {
            big.extend_from_slice(pad.as_bytes());
        }
        match sniffed(&big) {
            Sniffed::Other(prefix) => {
                assert_eq!(prefix.len(), 8192);
                assert_eq!(&prefix[..], &big[..prefix.len()]);
            }
            _ => panic!("an oversized head is hyper's (431)"),
        }
    }

    #[test]
    fn replayed_bytes_come_before_the_rest() {
        tokio_test_block_on(async {
            let (mut client, server) = tokio::io::duplex(1024);
            client.write_all(b" world").await.unwrap();
            drop(client);
            let mut io = Prefixed::new(Bytes::from_static(b"hello"), server);
            let mut all = String::new();
            io.read_to_string(&mut all).await.unwrap();
            assert_eq!(all, "hello world");
        });
    }
}
