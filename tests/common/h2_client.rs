//! An HTTP/2 client for WebSockets over extended CONNECT (RFC 8441): the h2 crate over TLS
//! (ALPN h2) trusting the dev certificate, and an IO adapter over one stream's halves so that
//! tokio-tungstenite frames the WebSocket protocol on it as a browser would.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::{Client, TIMEOUT, TestEdge, client_tls};

/// One HTTP/2 stream as a byte stream: DATA frames in, DATA frames out, within the windows.
pub struct H2Io {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    buf: Bytes,
}

fn io_error(e: h2::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // What the WebSocket reads is given back to the edge as window.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.buf = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            let capacity = self.send.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len());
                self.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(io_error)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // h2 sends what it was handed as soon as the connection task runs.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// An HTTP/2 connection to the edge's TLS listener.
pub struct H2Conn {
    pub requests: SendRequest<Bytes>,
    pub port: u16,
}

/// Connects with ALPN h2 and the given client windows (`None`: h2's defaults), and waits for
/// the edge's SETTINGS.
pub async fn connect_with(t: &TestEdge, windows: Option<(u32, u32)>) -> H2Conn {
    let dev = t.edge.dev_cert().unwrap();
    let tls = std::sync::Arc::new(client_tls(&dev.der, &[b"h2"]));
    let tcp = TcpStream::connect(t.edge.tls_addr()).await.unwrap();
    let stream = TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    handshake(stream, windows, t.edge.tls_addr().port()).await
}

/// HTTP/2 with prior knowledge (h2c) on the plain listener.
pub async fn connect_plain(t: &TestEdge) -> H2Conn {
    let addr = t.edge.plain_addr().expect("a plain listener");
    let tcp = TcpStream::connect(addr).await.unwrap();
    handshake(tcp, None, addr.port()).await
}

async fn handshake<IO>(io: IO, windows: Option<(u32, u32)>, port: u16) -> H2Conn
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = io;
    let mut builder = h2::client::Builder::new();
    if let Some((stream_window, connection_window)) = windows {
        builder
            .initial_window_size(stream_window)
            .initial_connection_window_size(connection_window);
    }
    let (requests, conn) = builder.handshake(stream).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let requests = tokio::time::timeout(TIMEOUT, requests.ready())
        .await
        .unwrap()
        .unwrap();
    // The edge's SETTINGS come with its preface, read by the connection task: wait for them.
    let conn = H2Conn { requests, port };
    for _ in 0..100 {
        if conn.requests.is_extended_connect_protocol_enabled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    conn
}

pub async fn connect(t: &TestEdge) -> H2Conn {
    connect_with(t, None).await
}

/// What an extended CONNECT got: a WebSocket on the stream, or the HTTP response refusing it
/// (with its body). Short-lived, in tests: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Opened {
    Ws(WebSocketStream<H2Io>),
    Refused(http::Response<()>, Bytes),
}

impl H2Conn {
    /// `CONNECT` with `protocol` (`Some("websocket")` for RFC 8441) to `path`, with `headers`
    /// (`sec-websocket-version: 13` is added unless given).
    pub async fn connect_ws(
        &mut self,
        path: &str,
        protocol: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Opened {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("https://localhost:{}{path}", self.port));
        if !headers.iter().any(|(k, _)| *k == "sec-websocket-version") {
            req = req.header("sec-websocket-version", "13");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req.body(()).unwrap();
        if let Some(p) = protocol {
            req.extensions_mut().insert(h2::ext::Protocol::from(p));
        }
        self.open(req).await
    }

    /// Sends `req` on a new stream, leaving the stream open.
    pub async fn open(&mut self, req: Request<()>) -> Opened {
        let requests = self.requests.clone().ready().await.unwrap();
        self.requests = requests;
        let (response, send) = self.requests.send_request(req, false).unwrap();
        let response = tokio::time::timeout(TIMEOUT, response)
            .await
            .expect("a response before the timeout")
            .expect("a response, not a reset");
        let (head, mut recv) = response.into_parts();
        if head.status != StatusCode::OK {
            let mut body = Vec::new();
            while let Some(Ok(chunk)) = recv.data().await {
                let _ = recv.flow_control().release_capacity(chunk.len());
                body.extend_from_slice(&chunk);
            }
            return Opened::Refused(http::Response::from_parts(head, ()), body.into());
        }
        let io = H2Io {
            send,
            recv,
            buf: Bytes::new(),
        };
        Opened::Ws(WebSocketStream::from_raw_socket(io, Role::Client, None).await)
    }

    /// Opens `/ws` over this connection and reads the welcome.
    pub async fn client(&mut self) -> Client<H2Io> {
        match self.connect_ws("/ws", Some("websocket"), &[]).await {
            Opened::Ws(ws) => Client::welcomed(ws).await,
            Opened::Refused(r, body) => panic!("refused: {r:?} {body:?}"),
        }
    }

    /// The status (and response) of an extended CONNECT that is meant to be refused.
    pub async fn refused(
        &mut self,
        path: &str,
        protocol: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (http::Response<()>, Bytes) {
        match self.connect_ws(path, protocol, headers).await {
            Opened::Refused(r, body) => (r, body),
            Opened::Ws(_) => panic!("expected a refusal of CONNECT {path}, got a WebSocket"),
        }
    }
}
