//! The socket under a WebSocket session's tungstenite stream ([`WireIo`]): it writes the
//! session's outbox from the shared frames themselves.
//!
//! Sent through tungstenite, every push is copied into the session's write buffer and framed
//! there, after a trip through the futures `Sink` (and its lock) per frame: for a message a
//! thousand sessions share, a thousand copies and framings of the same bytes. Instead each
//! [`Frame`] carries its WebSocket form, built once when it was encoded, and a flush hands every
//! frame the outbox held to the socket in one vectored write, so a session's burst is one system
//! call and no copy in user space.
//!
//! tungstenite still owns the protocol: it reads, answers pings and writes its own frames
//! (pings, pongs, the close frame, what is owed at close). Those queue here behind the frames
//! taken before them, and frames are taken from the outbox only once everything queued is
//! written, so two frames never interleave.
//!
//! Reads go through it too, so that tungstenite's read buffer, which every idle session keeps,
//! can be small while a burst of client frames is still read in one system call.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::outbox::{OUTBOX_KEEP_CAPACITY, Outbox};
use crate::protocol::Frame;

/// Frames handed to one vectored write. Linux takes up to 1024 buffers per call; a few hundred
/// frames already make a write that the socket buffer, not the call, limits.
const MAX_SLICES: usize = 256;

/// The most one read of the socket takes: a burst of client frames in one system call, however
/// small tungstenite's own read buffer is. On the stack during the read; only what tungstenite
/// cannot take at once is kept.
const READ_AHEAD: usize = 4096;

/// What one write gathers for a socket that has no vectored write (an HTTP/2 stream): its
/// frames are copied together first, so a burst is still one write.
const GATHER_BYTES: usize = 64 * 1024;

pub struct WireIo<S> {
    io: S,
    outbox: Arc<Outbox>,
    /// Frames taken from the outbox, not yet all written.
    frames: VecDeque<Frame>,
    /// tungstenite's own bytes: written after `frames`.
    own: Vec<u8>,
    /// Bytes read from the socket that tungstenite had no room for yet (see `poll_read`).
    ahead: Bytes,
    /// How much of the front of the queue (the first frame, else `own`) is written.
    written: usize,
    /// `own` takes more only by writing first past this (one write of any size passes alone),
    /// so tungstenite keeps the rest in its own bounded buffer while a client does not read.
    own_cap: usize,
    messages_out: Counter,
}

impl<S> WireIo<S> {
    pub fn new(io: S, outbox: Arc<Outbox>, own_cap: usize, messages_out: Counter) -> WireIo<S> {
        WireIo {
            io,
            outbox,
            frames: VecDeque::new(),
            own: Vec::new(),
            ahead: Bytes::new(),
            written: 0,
            own_cap,
            messages_out,
        }
    }
}

impl<S: AsyncWrite + Unpin> WireIo<S> {
    /// Writes everything queued: the frames, then tungstenite's bytes.
    fn poll_write_queued(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut done = 0;
        let result = loop {
            if self.frames.is_empty() && self.own.is_empty() {
                break Poll::Ready(Ok(()));
            }
            let n = match self.poll_write_some(cx) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            };
            done += self.advance(n);
        };
        if done > 0 {
            self.messages_out.inc_by(done);
        }
        result
    }

    /// One write of the front of the queue; how many bytes the socket took.
    fn poll_write_some(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let WireIo {
            io,
            frames,
            own,
            written,
            ..
        } = self;
        let own_start = if frames.is_empty() { *written } else { 0 };
        let mut pieces = frames
            .iter()
            .map(Frame::ws_frame)
            .chain(std::iter::once(&own[own_start..]))
            .filter(|p| !p.is_empty());
        let first = pieces
            .next()
            .map(|p| if frames.is_empty() { p } else { &p[*written..] });
        let Some(first) = first else {
            return Poll::Ready(Ok(0));
        };
        if io.is_write_vectored() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            slices[0] = IoSlice::new(first);
            let mut n = 1;
            for (slot, piece) in slices[1..].iter_mut().zip(pieces) {
                *slot = IoSlice::new(piece);
                n += 1;
            }
            Pin::new(io).poll_write_vectored(cx, &slices[..n])
        } else {
            let queued = frames.iter().map(|f| f.ws_frame().len()).sum::<usize>() + own.len();
            let mut gathered = Vec::with_capacity(GATHER_BYTES.min(queued));
            gathered.extend_from_slice(first);
            for piece in pieces {
                if gathered.len() + piece.len() > GATHER_BYTES {
                    break;
                }
                gathered.extend_from_slice(piece);
            }
            Pin::new(io).poll_write(cx, &gathered)
        }
    }

    /// Drops what `n` written bytes finished; how many frames that was.
    fn advance(&mut self, mut n: usize) -> u64 {
        let mut frames_done = 0;
        while n > 0 {
            let Some(front) = self.frames.front() else {
                self.written += n;
                if self.written >= self.own.len() {
                    // Freed, not kept: tungstenite writes rarely (a ping every interval), and an
                    // idle session should hold nothing here.
                    self.own = Vec::new();
                    self.written = 0;
                }
                break;
            };
            let left = front.ws_frame().len() - self.written;
            if n < left {
                self.written += n;
                break;
            }
            n -= left;
            self.written = 0;
            self.frames.pop_front();
            frames_done += 1;
        }
        if self.frames.is_empty() && self.frames.capacity() > OUTBOX_KEEP_CAPACITY {
            self.frames = VecDeque::new();
        }
        frames_done
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WireIo<S> {
    /// tungstenite reads into a buffer it keeps for the session's whole life
    /// (`session.read_buffer_bytes`), so that buffer is small; a burst of client frames is still
    /// read in one system call of up to [`READ_AHEAD`] bytes, and what tungstenite has no room
    /// for waits in `ahead` until it asks again. An idle session holds nothing here.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ahead.is_empty() {
            let n = this.ahead.len().min(buf.remaining());
            buf.put_slice(&this.ahead[..n]);
            this.ahead.advance(n);
            if this.ahead.is_empty() {
                // An emptied `Bytes` still holds its buffer.
                this.ahead = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= READ_AHEAD {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_AHEAD];
        let mut read = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
        let got = read.filled();
        let n = got.len().min(buf.remaining());
        buf.put_slice(&got[..n]);
        if got.len() > n {
            this.ahead = Bytes::copy_from_slice(&got[n..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WireIo<S> {
    /// tungstenite's bytes: queued behind the frames, and written by the next flush.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.own.is_empty() && this.own.len() + buf.len() > this.own_cap {
            ready!(this.poll_write_queued(cx))?;
        }
        this.own.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    /// Writes what is queued; if that was nothing, first takes what the outbox holds. Taking
    /// only into an empty queue keeps what waits here within one outbox's caps, and makes a
    /// flush end once that much is written: a busy session's flush is not endless, so the
    /// writer's timeout measures one batch, not the session.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.frames.is_empty() && this.own.is_empty() {
            // An overflowed or closed outbox holds nothing: its writer learns the status from
            // the outbox, not from here.
            this.outbox.take(&mut this.frames);
        }
        ready!(this.poll_write_queued(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_queued(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::protocol::{self, Channel, Offset};

    fn push(outbox: &Outbox, seq: u64, size: usize) {
        let data = format!("\"{seq}:{}\"", "x".repeat(size));
        let ch = Channel::new("c").unwrap();
        let frame = protocol::encode_message(&ch, Some(Offset { epoch: 1, seq }), &data);
        outbox.push(frame).unwrap();
    }

    /// The pushes' sequence numbers, checked whole on the client side.
    async fn read_texts<S>(client: &mut WebSocketStream<S>, n: usize) -> (Vec<u64>, usize)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut seqs, mut pongs) = (Vec::new(), 0);
        while seqs.len() < n {
            match client.next().await.unwrap().unwrap() {
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                    let data = v["data"].as_str().unwrap();
                    seqs.push(data.split(':').next().unwrap().parse().unwrap());
                }
                Message::Pong(_) => pongs += 1,
                other => panic!("{other:?}"),
            }
        }
        (seqs, pongs)
    }

    #[tokio::test]
    async fn a_flush_writes_the_outbox_and_tungstenites_frames_in_order() {
        let (server, client) = tokio::io::duplex(1 << 20);
        let outbox = Arc::new(Outbox::new(64, 1 << 20));
        let sent = Counter::default();
        let wire = WireIo::new(server, outbox.clone(), 8192, sent.clone());
        let mut server = WebSocketStream::from_raw_socket(wire, Role::Server, None).await;
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        push(&outbox, 1, 10);
        push(&outbox, 2, 300);
        server.flush().await.unwrap();
        server
            .send(Message::Ping(Default::default()))
            .await
            .unwrap();
        push(&outbox, 3, 70_000);
        server.flush().await.unwrap();
        let mut got = Vec::new();
        while got.len() < 4 {
            got.push(client.next().await.unwrap().unwrap());
        }
        assert!(matches!(&got[2], Message::Ping(_)), "{got:?}");
        let texts: Vec<_> = [&got[0], &got[1], &got[3]]
            .iter()
            .map(|m| m.to_text().unwrap().len())
            .collect();
        assert!(texts[0] < texts[1] && texts[1] > 300 && texts[2] > 70_000);
        assert_eq!(sent.get(), 3);
        assert!(outbox.is_empty());
    }

    /// A pipe end with vectored writes (a duplex has none), so both of `WireIo`'s write paths
    /// are tested: a vectored write takes what fits of the slices, as `writev` does.
    struct Vectored(tokio::io::DuplexStream);

    impl AsyncRead for Vectored {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Vectored {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.poll_write(cx, &all)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn partial_writes_and_a_pong_in_the_middle_keep_every_frame_whole() {
        // A 7-byte pipe: every frame is cut across many writes.
        let (server, client) = tokio::io::duplex(7);
        partial_writes(server, client).await;
        let (server, client) = tokio::io::duplex(7);
        partial_writes(Vectored(server), client).await;
    }

    async fn partial_writes<S>(server: S, client: tokio::io::DuplexStream)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let outbox = Arc::new(Outbox::new(1024, 1 << 20));
        let sent = Counter::default();
        let wire = WireIo::new(server, outbox.clone(), 8192, sent.clone());
        let server = WebSocketStream::from_raw_socket(wire, Role::Server, None).await;
        let (mut sink, mut stream) = server.split();
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        for seq in 0..50 {
            push(&outbox, seq, (seq as usize * 37) % 400);
        }
        // The client's ping reaches the server's reader while the burst is being written: its
        // pong may go before the burst or behind it, never into a frame.
        client
            .send(Message::Ping(Default::default()))
            .await
            .unwrap();
        let server = tokio::spawn(async move {
            let read = async { while let Some(Ok(_)) = stream.next().await {} };
            tokio::select! {
                r = sink.flush() => r.unwrap(),
                _ = read => panic!("the client went away"),
            }
            // A pong queued behind the burst is written by the next flush.
            sink.flush().await.unwrap();
            sink.close().await.unwrap();
        });
        let (seqs, mut pongs) = read_texts(&mut client, 50).await;
        assert_eq!(seqs, (0..50).collect::<Vec<_>>());
        loop {
            match client.next().await {
                Some(Ok(Message::Pong(_))) => pongs += 1,
                Some(Ok(Message::Close(_))) | None => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(pongs, 1);
        server.await.unwrap();
        assert_eq!(sent.get(), 50);
    }

    /// A burst of client frames, and one frame many times the size of tungstenite's 256-byte
    /// read buffer, come through whole and in order; once read, nothing is held ahead.
    #[tokio::test]
    async fn a_small_read_buffer_still_reads_bursts_and_large_frames_whole() {
        let (server, client) = tokio::io::duplex(1 << 20);
        let outbox = Arc::new(Outbox::new(64, 1 << 20));
        let wire = WireIo::new(server, outbox, 8192, Counter::default());
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(256);
        let mut server = WebSocketStream::from_raw_socket(wire, Role::Server, Some(config)).await;
        let mut client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        for i in 0..100 {
            client
                .feed(Message::Text(format!("{i}:{}", "y".repeat(90)).into()))
                .await
                .unwrap();
        }
        let large = "z".repeat(64 * 1024);
        client
            .feed(Message::Text(large.clone().into()))
            .await
            .unwrap();
        client.flush().await.unwrap();
        for i in 0..100 {
            match server.next().await.unwrap().unwrap() {
                Message::Text(t) => assert!(t.as_str().starts_with(&format!("{i}:"))),
                other => panic!("{other:?}"),
            }
        }
        match server.next().await.unwrap().unwrap() {
            Message::Text(t) => assert_eq!(t.as_str(), large),
            other => panic!("{other:?}"),
        }
        assert!(server.get_ref().ahead.is_empty());
    }
}
