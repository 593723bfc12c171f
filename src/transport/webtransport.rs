//! WebTransport over HTTP/3 (h3-webtransport on h3 and quinn): sessions at `/wt` on the UDP
//! port of the TLS listener, with the same certificate.
//!
//! The QUIC endpoint and each connection's HTTP/3 layer are `server::quic`'s: it hands this file
//! a CONNECT with `:protocol = webtransport` together with its connection (why h3 and not
//! wtransport is in that module's doc). This file owns the CONNECT admission (path, origin,
//! limits, token and hooks) and the wire: the client opens one bidirectional stream and both
//! sides exchange newline-delimited JSON frames of the shared protocol on it; pushes of a
//! channel subscribed with `"delivery":"datagram"` go as datagrams when they fit. Protocol
//! meaning is `session`'s, policy `admission`'s. Other requests that arrive on the session's
//! connection are served as plain HTTP/3 requests.
//!
//! A refused CONNECT is answered with the status of `webtransport_connect_status` (origin 403,
//! every other refusal 429, as under wtransport, whose answers were limited to those); its real
//! reason is logged and counted, and the connection goes on serving requests. After the CONNECT
//! the session closes with the application error codes of the protocol (the WebSocket close
//! codes) and a reason, on the QUIC connection: a session has its connection to itself
//! (`max_webtransport_sessions` is 1, and Chromium does not pool WebTransport).

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use h3::quic::BidiStream as _;
use h3_webtransport::server::{AcceptedBi, WebTransportSession};
use http::{HeaderMap, Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

use crate::config::SessionConfig;
use crate::metrics::{Transport, TransportLabels};
use crate::outbox::{Outbox, OutboxStatus, WriteStop};
use crate::session::{CloseReason, Session, Verdict};
use crate::state::{EdgeState, Handshake};
use crate::web::ConnInfo;
use crate::web::conn::{H3Connection, H3Stream, ServeH3};
use crate::web::request::request_token;

/// Where WebTransport sessions are opened.
pub const PATH: &str = "/wt";

type WtSession = WebTransportSession<h3_quinn::Connection, Bytes>;
type SendStream = h3_webtransport::stream::SendStream<h3_quinn::SendStream<Bytes>, Bytes>;
type RecvStream = h3_webtransport::stream::RecvStream<h3_quinn::RecvStream, Bytes>;
type DatagramSender =
    h3_datagram::datagram_handler::DatagramSender<h3_quinn::datagram::SendDatagramHandler, Bytes>;

/// Answers one WebTransport CONNECT that arrived on `h3`: refused, the connection comes back to
/// serve further requests; accepted, the session runs on it to its end (`None`), and plain
/// requests that arrive on it meanwhile go to `serve`. A `fn`
/// returning an `async move` block: this future is what every open session keeps, so it holds
/// each large value once (an `async fn` keeps a second copy of each argument), and the refusal
/// paths are boxed (inline, their futures would size every session's task).
#[allow(clippy::manual_async_fn)]
pub fn connect(
    req: Request<()>,
    stream: H3Stream,
    h3: H3Connection,
    quic: quinn::Connection,
    state: Arc<EdgeState>,
    info: ConnInfo,
    serve: ServeH3,
) -> impl Future<Output = Option<H3Connection>> + Send {
    async move {
        let peer = info.peer;
        if req.uri().path() != PATH {
            Box::pin(answer(stream, StatusCode::NOT_FOUND)).await;
            return Some(h3);
        }
        let origin = req
            .headers()
            .get(http::header::ORIGIN)
            .map(|v| v.to_str().unwrap_or("\u{fffd}").to_string());
        let client = state.admission.client(peer.ip(), &HeaderMap::new());
        let admitted = state
            .admission
            .check_origin(origin.as_deref(), "webtransport")
            .and_then(|()| state.admit_session(client));
        let (ticket, slot) = match admitted {
            Ok(a) => a,
            Err(refusal) => {
                let status = refusal.webtransport_connect_status();
                Box::pin(refuse(stream, refusal.reason(), status, &state, peer)).await;
                return Some(h3);
            }
        };
        let admitted = {
            // A token may also come as `?token=` on the path: browsers cannot set headers on a
            // WebTransport CONNECT.
            let token =
                request_token(req.headers(), req.uri().query()).map(std::borrow::Cow::into_owned);
            let handshake = Handshake {
                transport: Transport::webtransport,
                token: token.as_deref(),
                origin: origin.as_deref(),
                headers: req.headers(),
            };
            match Box::pin(state.admit(ticket, handshake)).await {
                Ok(admitted) => admitted,
                Err(refusal) => {
                    let status = refusal.webtransport_connect_status();
                    let reason = refusal.reason();
                    Box::pin(refuse(stream, reason, status, &state, peer)).await;
                    return Some(h3);
                }
            }
        };
        let wt = match Box::pin(WebTransportSession::accept(req, stream, h3)).await {
            Ok(wt) => wt,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "webtransport accept failed");
                admitted.abandon(&state.gate, Transport::webtransport);
                return None;
            }
        };
        let session = Session::open(state.sessions.clone(), Transport::webtransport, admitted);
        let span = tracing::info_span!(
            "session",
            id = %session.public_id(),
            peer = %peer,
            client = %client.ip,
            transport = "webtransport",
        );
        let _slot = slot;
        run(wt, quic, session, state, info, serve)
            .instrument(span)
            .await;
        None
    }
}

/// Answers a CONNECT with `status` and no session.
async fn answer(mut stream: H3Stream, status: StatusCode) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    if stream.send_response(resp).await.is_ok() {
        let _ = stream.finish().await;
    }
}

/// Answers a refused CONNECT (403 or 429) and counts it.
async fn refuse(
    stream: H3Stream,
    reason: &'static str,
    status: StatusCode,
    state: &EdgeState,
    peer: std::net::SocketAddr,
) {
    state.metrics.refusal(reason);
    tracing::info!(%peer, reason, status = status.as_u16(), "webtransport refused");
    answer(stream, status).await;
}

/// The client's session stream: the first bidirectional stream of the session. Plain requests
/// that come first are served meanwhile; `None` when the connection ends.
async fn first_stream(
    wt: &WtSession,
    state: &Arc<EdgeState>,
    info: &ConnInfo,
    quic: &quinn::Connection,
    serve: ServeH3,
) -> Option<h3_webtransport::stream::BidiStream<h3_quinn::BidiStream<Bytes>, Bytes>> {
    loop {
        match wt.accept_bi().await {
            Ok(Some(AcceptedBi::BidiStream(_, stream))) => return Some(stream),
            Ok(Some(AcceptedBi::Request(req, stream))) => {
                serve_plain(req, stream, state, info, quic, serve)
            }
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Further streams of the session's connection: requests are served; more session streams are
/// not part of the protocol and are dropped (quinn stops them). Ends when the connection does.
async fn serve_more(
    wt: &WtSession,
    state: &Arc<EdgeState>,
    info: &ConnInfo,
    quic: &quinn::Connection,
    serve: ServeH3,
) -> End {
    loop {
        match wt.accept_bi().await {
            Ok(Some(AcceptedBi::BidiStream(..))) => {}
            Ok(Some(AcceptedBi::Request(req, stream))) => {
                serve_plain(req, stream, state, info, quic, serve)
            }
            Ok(None) | Err(_) => return End::Gone,
        }
    }
}

fn serve_plain(
    req: Request<()>,
    stream: H3Stream,
    state: &Arc<EdgeState>,
    info: &ConnInfo,
    quic: &quinn::Connection,
    serve: ServeH3,
) {
    let Some(in_flight) = info.activity.as_ref().map(|a| a.begin()) else {
        return;
    };
    state.tasks.spawn(serve(
        req,
        stream,
        state.clone(),
        info.clone(),
        quic.clone(),
        in_flight,
    ));
}

/// Why a half of the session loop ended.
enum End {
    Close(CloseReason),
    /// The peer closed or the connection failed.
    Gone,
}

/// Runs an accepted session until it ends, then closes the connection. A `fn` returning an
/// `async move` block for the reason given at [`connect`].
#[allow(clippy::manual_async_fn)]
fn run(
    wt: WtSession,
    connection: quinn::Connection,
    mut session: Session,
    state: Arc<EdgeState>,
    info: ConnInfo,
    serve: ServeH3,
) -> impl Future<Output = ()> + Send {
    async move {
        let cfg = &state.config.session;
        // The client opens its stream right after the session; one that never does holds a session
        // slot for nothing.
        let early = |reason: CloseReason| {
            CloseReason::count(Some(&reason), Transport::webtransport, &state.metrics);
            close(&connection, reason);
        };
        let first = first_stream(&wt, &state, &info, &connection, serve);
        let (mut send, mut recv) = tokio::select! {
            _ = state.shutdown.cancelled() => return early(CloseReason::SHUTDOWN),
            r = tokio::time::timeout(state.config.server.handshake_timeout, first) => {
                match r {
                    Ok(Some(stream)) => stream.split(),
                    _ => {
                        tracing::debug!("no stream opened in time");
                        return early(CloseReason::PROTOCOL);
                    }
                }
            }
        };
        tracing::debug!("session open");
        let labels = TransportLabels {
            transport: Transport::webtransport,
        };
        let messages_out = state.metrics.messages_out.get_or_create(&labels).clone();
        let outbox = session.outbox().clone();
        let datagrams = session.datagram_channels();
        let mut writer = Writer {
            connection: &connection,
            datagram: wt.datagram_sender(),
            // The quarter stream ID (the CONNECT stream's index) in front of each datagram
            // (RFC 9297): a varint.
            datagram_header: varint_len(h3::quic::StreamId::from(wt.session_id()).index()),
            outbox: &outbox,
            datagrams: &datagrams,
            cfg,
            messages_out: &messages_out,
        };
        let end = tokio::select! {
            _ = state.shutdown.cancelled() => End::Close(CloseReason::SHUTDOWN),
            end = writer.run(&mut send) => end,
            end = read_half(&mut recv, &mut session, cfg) => end,
            end = serve_more(&wt, &state, &info, &connection, serve) => end,
        };
        drop(writer);
        let reason = match &end {
            End::Close(r) => Some(r),
            End::Gone => None,
        };
        CloseReason::count(reason, Transport::webtransport, &state.metrics);
        match end {
            End::Close(reason) => {
                // What is owed (the refusals before a 1008, replies to publishes still with the
                // bus) goes out before the close.
                let owed = session
                    .owed_at_close(reason, cfg.write_timeout, &state.shutdown)
                    .await;
                // A slow consumer is owed nothing and its stream is stuck: finishing it would
                // wait for acknowledgements that do not come. The QUIC close below gets through
                // whatever the stream holds.
                if reason != CloseReason::SHUTDOWN && reason != CloseReason::SLOW_CONSUMER {
                    let mut buf = BytesMut::new();
                    for f in &owed {
                        buf.put_slice(f.as_bytes());
                        buf.put_u8(b'\n');
                    }
                    let _ = tokio::time::timeout(cfg.write_timeout, send.write_all(&buf)).await;
                    let _ = send.shutdown().await;
                    linger(&connection, cfg).await;
                }
                drop(session);
                tracing::info!(
                    code = reason.code,
                    reason = reason.reason,
                    "closing session"
                );
                close(&connection, reason);
            }
            End::Gone => {
                drop(session);
                tracing::debug!("session ended by the client");
            }
        }
    }
}

/// A QUIC close discards stream data not yet delivered, and h3's streams do not expose quinn's
/// `stopped()` (which wtransport awaited: every byte acknowledged). So the close waits a few
/// round trips for the last lines and the FIN to arrive, or for the client to close first;
/// bounded by `session.write_timeout`. A packet lost in that window loses those lines.
async fn linger(connection: &quinn::Connection, cfg: &SessionConfig) {
    let wait = (connection.rtt() * 4)
        .max(std::time::Duration::from_millis(20))
        .min(cfg.write_timeout);
    let _ = tokio::time::timeout(wait, connection.closed()).await;
}

fn close(connection: &quinn::Connection, reason: CloseReason) {
    connection.close(
        quinn::VarInt::from_u32(u32::from(reason.code)),
        reason.reason.as_bytes(),
    );
}

fn varint_len(v: u64) -> usize {
    match v {
        0..64 => 1,
        64..16_384 => 2,
        16_384..1_073_741_824 => 4,
        _ => 8,
    }
}

/// The sending half: drains the outbox on each wake-up into one stream write (datagram pushes
/// aside), bounded by `session.write_timeout` and cut short by an overflow of the outbox.
struct Writer<'a> {
    connection: &'a quinn::Connection,
    datagram: DatagramSender,
    datagram_header: usize,
    outbox: &'a Outbox,
    datagrams: &'a parking_lot::RwLock<std::collections::HashSet<crate::protocol::Channel>>,
    cfg: &'a SessionConfig,
    messages_out: &'a Counter,
}

impl Writer<'_> {
    async fn run(&mut self, send: &mut SendStream) -> End {
        let mut batch = Vec::new();
        let mut buf = BytesMut::new();
        loop {
            self.outbox.ready().await;
            match self.outbox.drain(&mut batch) {
                OutboxStatus::Open => {}
                OutboxStatus::Overflowed => return End::Close(CloseReason::SLOW_CONSUMER),
                OutboxStatus::Closed => return End::Gone,
            }
            if batch.is_empty() {
                continue;
            }
            self.messages_out.inc_by(batch.len() as u64);
            let max_datagram = self
                .connection
                .max_datagram_size()
                .and_then(|max| max.checked_sub(self.datagram_header));
            {
                let datagrams = self.datagrams.read();
                for frame in batch.drain(..) {
                    let as_datagram = !datagrams.is_empty()
                        && frame.position().is_some_and(|(c, _)| datagrams.contains(c))
                        && max_datagram.is_some_and(|max| frame.len() <= max);
                    // A datagram that cannot be queued is lost, as datagrams may be.
                    if as_datagram
                        && self
                            .datagram
                            .send_datagram(Bytes::copy_from_slice(frame.as_bytes()))
                            .is_ok()
                    {
                        continue;
                    }
                    buf.put_slice(frame.as_bytes());
                    buf.put_u8(b'\n');
                }
            }
            if buf.is_empty() {
                continue;
            }
            let chunk = buf.split().freeze();
            let write = send.write_all(&chunk);
            match self
                .outbox
                .write_within(write, self.cfg.write_timeout)
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(WriteStop::Closed) => return End::Gone,
                Err(WriteStop::Slow) => return End::Close(CloseReason::SLOW_CONSUMER),
            }
            if buf.capacity() > 64 * 1024 {
                buf = BytesMut::new();
            }
        }
    }
}

/// The receiving half: splits the stream into lines and hands each to the session. A line past
/// `session.close_message_bytes` closes the session with 1009 without being read whole.
async fn read_half(recv: &mut RecvStream, session: &mut Session, cfg: &SessionConfig) -> End {
    // Grows with the longest line seen; an idle session that sent only short lines keeps
    // little, and no session holds it before its first line.
    let mut line = BytesMut::new();
    let mut chunk = vec![0u8; cfg.read_buffer_bytes];
    let mut rules = session.rules_watch();
    loop {
        let read = tokio::select! {
            read = recv.read(&mut chunk) => read,
            closed = session.identity_changed(&mut rules) => match closed {
                Some(reason) => return End::Close(reason),
                None => continue,
            },
        };
        let n = match read {
            Ok(0) | Err(_) => return End::Gone,
            Ok(n) => n,
        };
        let mut rest = &chunk[..n];
        while let Some(i) = rest.iter().position(|b| *b == b'\n') {
            line.extend_from_slice(&rest[..i]);
            rest = &rest[i + 1..];
            if line.len() > cfg.close_message_bytes {
                return End::Close(CloseReason::TOO_BIG);
            }
            // A CR before the LF is tolerated.
            if line.last() == Some(&b'\r') {
                line.truncate(line.len() - 1);
            }
            // A blank line is a keep-alive: no reply, but it spends the message budget as a
            // WebSocket ping does, or a client could spray newlines for free.
            let verdict = if line.is_empty() {
                session.handle_control()
            } else {
                // Boxed for the same reason as in the WebSocket read loop: idle sessions
                // should not carry the frame handler's large future.
                Box::pin(session.handle_frame(&line)).await
            };
            if let Verdict::Close(reason) = verdict {
                return End::Close(reason);
            }
            line.clear();
        }
        line.extend_from_slice(rest);
        if line.len() > cfg.close_message_bytes {
            return End::Close(CloseReason::TOO_BIG);
        }
        if line.capacity() > 64 * 1024 && line.is_empty() {
            line = BytesMut::new();
        }
    }
}
