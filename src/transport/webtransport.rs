//! WebTransport over HTTP/3 (wtransport on quinn): sessions at `/wt` on the UDP port of the TLS
//! listener, with the same certificate.
//!
//! wtransport rather than h3 with h3-webtransport: it is a WebTransport server first (session
//! requests with path, origin and headers, refusals, datagrams, the client too), it exposes
//! quinn's `Incoming` for address validation and its transport config for sizing, and it runs on
//! the rustls and ring the TCP side uses. h3-webtransport is still marked experimental and would
//! leave the CONNECT handling and the session bookkeeping to us.
//!
//! This file owns the QUIC endpoint, the CONNECT admission (address validation, origin, limits),
//! and the wire: the client opens one bidirectional stream and both sides exchange
//! newline-delimited JSON frames of the shared protocol on it; pushes of a channel subscribed
//! with `"delivery":"datagram"` go as datagrams when they fit. Protocol meaning is `session`'s,
//! policy `admission`'s.
//!
//! wtransport serves WebTransport and nothing else of HTTP/3: its connection driver reads the
//! first HEADERS frame of every request stream and stops any stream whose method is not CONNECT
//! with H3_REQUEST_REJECTED (wtransport 0.7.2, `driver/mod.rs`, `handle_bi_h3_stream`), and the
//! request never reaches the API. A plain `GET /sse` on this port therefore gets an empty,
//! stopped stream, and the connection then ends as a WebTransport handshake that never came.
//! Splitting connections in front of it is no way out: the driver accepts the connection's
//! streams itself (quinn hands each stream out once, so a demultiplexer could not peek at the
//! first request and give the stream back), and a browser may send its requests and its
//! CONNECT on one connection. Until this port serves plain requests (h3 with h3-quinn, with
//! WebTransport moved onto h3-webtransport), TCP responses carry no `Alt-Svc`.
//!
//! wtransport answers a refused CONNECT only with 403, 404 or 429: origin is 403, every other
//! refusal (limits, draining, session cap, dead bus) is 429 and its real reason is logged and
//! counted. After the CONNECT the session closes with the application error codes of the
//! protocol (the WebSocket close codes) and a reason.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;
use tracing::Instrument;
use wtransport::endpoint::endpoint_side::Server;
use wtransport::endpoint::{IncomingSession, SessionRequest};
use wtransport::quinn::{TransportConfig, VarInt as QuicVarInt};
use wtransport::{Connection, Endpoint, RecvStream, SendStream, ServerConfig, VarInt};

use crate::config::SessionConfig;
use crate::metrics::{Transport, TransportLabels};
use crate::server::routes::ConnSlot;
use crate::server::routes::request_token;
use crate::server::{EdgeState, Handshake};
use crate::session::{CloseReason, Outbox, OutboxStatus, Session, Verdict, WriteStop};

/// Where WebTransport sessions are opened.
pub const PATH: &str = "/wt";

/// quinn's defaults are sized for bulk transfer (megabyte windows, 100 streams). A session here
/// is one stream of small JSON lines plus the HTTP/3 control streams, so windows are sized from
/// the message caps: a stream can always take one whole frame of the largest size the edge reads
/// before closing (`close_message_bytes`), and the unacknowledged data quinn keeps per session
/// stays near the outbox's own cap.
fn transport_config(cfg: &SessionConfig) -> TransportConfig {
    let window = |bytes: usize| QuicVarInt::from_u64(bytes as u64).unwrap_or(QuicVarInt::MAX);
    let stream_window = cfg.close_message_bytes + 16 * 1024;
    let mut t = TransportConfig::default();
    t.stream_receive_window(window(stream_window))
        .receive_window(window(2 * stream_window))
        .send_window((cfg.outbound_queue_bytes as u64).max(64 * 1024))
        // The CONNECT request stream and the session's own stream.
        .max_concurrent_bidi_streams(QuicVarInt::from_u32(4))
        // HTTP/3 control and QPACK encoder/decoder streams.
        .max_concurrent_uni_streams(QuicVarInt::from_u32(4))
        .datagram_receive_buffer_size(Some(64 * 1024))
        .datagram_send_buffer_size(64 * 1024);
    t
}

/// The running endpoint, shared with the reload path.
pub struct QuicEndpoint(pub Arc<Endpoint<Server>>);

impl std::fmt::Debug for QuicEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("QuicEndpoint")
            .field(&self.0.local_addr().ok())
            .finish()
    }
}

/// The endpoint's config: `tls` (the edge's certificate, TLS 1.3, ALPN h3) and the transport.
pub fn server_config(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    cfg: &SessionConfig,
) -> std::io::Result<ServerConfig> {
    Ok(ServerConfig::builder()
        .with_bind_address(addr)
        .with_custom_tls_and_transport(tls, transport_config(cfg))
        .max_idle_timeout(Some(cfg.idle_timeout))
        .map_err(|_| std::io::Error::other("session.idle_timeout is too long for QUIC"))?
        .keep_alive_interval(Some(cfg.ping_interval))
        .build())
}

/// Binds the QUIC endpoint on `addr` (UDP) with the edge's certificate.
pub fn bind(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    cfg: &SessionConfig,
) -> std::io::Result<Endpoint<Server>> {
    Endpoint::server(server_config(addr, tls, cfg)?)
}

/// Accepts sessions until shutdown, then closes the endpoint.
pub async fn accept_loop(endpoint: Arc<Endpoint<Server>>, state: Arc<EdgeState>) {
    let validate = state.config.webtransport.validate_address;
    loop {
        let incoming = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            i = endpoint.accept() => i,
        };
        // A QUIC source address can be spoofed until the peer proves it receives packets sent
        // there: nothing is charged to (or trusted of) an address before a Retry round trip.
        if validate && !incoming.remote_address_validated() {
            incoming.retry();
            continue;
        }
        // A QUIC connection is a connection like a TCP one: it holds state from the handshake
        // on, CONNECT or not, so it takes a place under `server.max_connections` and under its
        // address's connection limits, which TCP connections share. The address is the one
        // validated above (taken as given with `webtransport.validate_address` off).
        let Some(address) = state.admit_connection(incoming.remote_address().ip(), false) else {
            incoming.refuse();
            continue;
        };
        let Ok(permit) = state.connection_slots.clone().try_acquire_owned() else {
            state.metrics.connections_refused.inc();
            incoming.refuse();
            continue;
        };
        let slot = ConnSlot::new(permit, state.metrics.connections.clone()).with_address(address);
        let st = state.clone();
        state.tasks.spawn(handle(incoming, st, slot));
    }
    endpoint.close(VarInt::from_u32(0), b"edge shutting down");
}

/// One QUIC connection from handshake to close. This future is what every open session keeps,
/// so it holds each large value once: a `fn` returning an `async move` block (an `async fn`
/// keeps a second copy of each argument), the request dropped once accepted, and the refusal
/// paths boxed (inline, their futures of ~2 KiB would size every session's task).
#[allow(clippy::manual_async_fn)]
fn handle(
    incoming: IncomingSession,
    state: Arc<EdgeState>,
    conn: ConnSlot,
) -> impl Future<Output = ()> + Send {
    async move {
        // Named so the block owns it: the connection's slot is released when it ends.
        let _conn = &conn;
        let peer = incoming.remote_address();
        let deadline = state.config.server.handshake_timeout;
        let (connection, admitted, slot, client) = {
            let request = match tokio::time::timeout(deadline, incoming).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "webtransport handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "webtransport handshake timed out");
                    return;
                }
            };
            if request.path().split('?').next() != Some(PATH) {
                Box::pin(request.not_found()).await;
                return;
            }
            let client = state.admission.client(peer.ip(), &HeaderMap::new());
            let admitted = state
                .admission
                .check_origin(request.origin(), "webtransport")
                .and_then(|()| state.admit_session(client));
            let (ticket, slot) = match admitted {
                Ok(a) => a,
                Err(refusal) => {
                    let status = refusal.webtransport_connect_status();
                    return Box::pin(refuse(request, refusal.reason(), status, &state, peer)).await;
                }
            };
            let admitted = {
                let headers = connect_headers(&request);
                let token = request_token(&headers, request.path().split_once('?').map(|q| q.1))
                    .map(std::borrow::Cow::into_owned);
                let handshake = Handshake {
                    transport: Transport::webtransport,
                    token: token.as_deref(),
                    origin: request.origin(),
                    headers: &headers,
                };
                match Box::pin(state.admit(ticket, handshake)).await {
                    Ok(admitted) => admitted,
                    Err(refusal) => {
                        let status = refusal.webtransport_connect_status();
                        let reason = refusal.reason();
                        return Box::pin(refuse(request, reason, status, &state, peer)).await;
                    }
                }
            };
            match Box::pin(request.accept()).await {
                Ok(c) => (c, admitted, slot, client),
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "webtransport accept failed");
                    admitted.abandon(&state.gate, Transport::webtransport);
                    return;
                }
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
        run(connection, session, state).instrument(span).await;
    }
}

/// Answers a refused CONNECT (403 or 429: all wtransport can send) and counts it.
async fn refuse(
    request: SessionRequest,
    reason: &'static str,
    status: http::StatusCode,
    state: &EdgeState,
    peer: SocketAddr,
) {
    state.metrics.refusal(reason);
    tracing::info!(%peer, reason, status = status.as_u16(), "webtransport refused");
    if status == http::StatusCode::FORBIDDEN {
        request.forbidden().await;
    } else {
        request.too_many_requests().await;
    }
}

/// A CONNECT's headers as an HTTP header map (wtransport hands them over as strings), for the
/// token and the connect hook. A token may also come as `?token=` on the path: browsers cannot
/// set headers on a WebTransport CONNECT.
fn connect_headers(request: &SessionRequest) -> HeaderMap {
    request
        .headers()
        .iter()
        .filter_map(|(k, v)| {
            let name = http::HeaderName::from_bytes(k.as_bytes()).ok()?;
            Some((name, http::HeaderValue::from_str(v).ok()?))
        })
        .collect()
}

/// Why a half of the session loop ended.
enum End {
    Close(CloseReason),
    /// The peer closed or the connection failed.
    Gone,
}

/// Runs an accepted session until it ends, then closes the connection. A `fn` returning an
/// `async move` block for the reason given at [`handle`].
#[allow(clippy::manual_async_fn)]
fn run(
    connection: Connection,
    mut session: Session,
    state: Arc<EdgeState>,
) -> impl Future<Output = ()> + Send {
    async move {
        let cfg = &state.config.session;
        // The client opens its stream right after the session; one that never does holds a session
        // slot for nothing.
        let early = |reason: CloseReason| {
            CloseReason::count(Some(&reason), Transport::webtransport, &state.metrics);
            close(&connection, reason);
        };
        let (mut send, mut recv) = tokio::select! {
            _ = state.shutdown.cancelled() => return early(CloseReason::SHUTDOWN),
            r = tokio::time::timeout(state.config.server.handshake_timeout, connection.accept_bi()) => {
                match r {
                    Ok(Ok(streams)) => streams,
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
        let writer = Writer {
            connection: &connection,
            outbox: &outbox,
            datagrams: &datagrams,
            cfg,
            messages_out: &messages_out,
        };
        let end = tokio::select! {
            _ = state.shutdown.cancelled() => End::Close(CloseReason::SHUTDOWN),
            end = writer.run(&mut send) => end,
            end = read_half(&mut recv, &mut session, cfg) => end,
        };
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
                    let _ = tokio::time::timeout(cfg.write_timeout, send.finish()).await;
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

fn close(connection: &Connection, reason: CloseReason) {
    connection.close(
        VarInt::from_u32(u32::from(reason.code)),
        reason.reason.as_bytes(),
    );
}

/// The sending half: drains the outbox on each wake-up into one stream write (datagram pushes
/// aside), bounded by `session.write_timeout` and cut short by an overflow of the outbox.
struct Writer<'a> {
    connection: &'a Connection,
    outbox: &'a Outbox,
    datagrams: &'a parking_lot::RwLock<std::collections::HashSet<crate::protocol::Channel>>,
    cfg: &'a SessionConfig,
    messages_out: &'a Counter,
}

impl Writer<'_> {
    async fn run(&self, send: &mut SendStream) -> End {
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
            let max_datagram = self.connection.max_datagram_size();
            {
                let datagrams = self.datagrams.read();
                for frame in batch.drain(..) {
                    let as_datagram = !datagrams.is_empty()
                        && frame.position().is_some_and(|(c, _)| datagrams.contains(c))
                        && max_datagram.is_some_and(|max| frame.len() <= max);
                    // A datagram that cannot be queued is lost, as datagrams may be.
                    if as_datagram && self.connection.send_datagram(frame.as_bytes()).is_ok() {
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
        let expires = session.expires();
        let read = tokio::select! {
            read = recv.read(&mut chunk) => read,
            () = crate::session::until(expires) => {
                if session.token_expired() {
                    return End::Close(CloseReason::TOKEN_EXPIRED);
                }
                // A deadline capped at a day, or a clock step: look again.
                continue;
            }
            Ok(()) = rules.changed() => {
                session.revalidate();
                continue;
            }
        };
        let n = match read {
            Ok(Some(n)) => n,
            Ok(None) | Err(_) => return End::Gone,
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
