//! The UDP side of the TLS listener: one QUIC endpoint (quinn) speaking HTTP/3 (h3 on h3-quinn),
//! with the same certificate and port number as the TCP listener.
//!
//! This file owns the endpoint (transport sizing, address validation, the connection caps), each
//! connection's HTTP/3 layer, and the adaptation of a plain HTTP/3 request to the public routes
//! of [`super::routes`]: `GET /sse`, `POST /publish`, `GET /edgeplex.js` and the 404s go through
//! the same routing, admission and session code as over TCP. A `CONNECT` with
//! `:protocol = webtransport` is handed to [`crate::transport::webtransport`], which owns the
//! WebTransport session. What it serves is what `Alt-Svc: h3` promises (see [`super::Edge`]).
//!
//! # Why h3 + h3-quinn + h3-webtransport, not wtransport or a demultiplexer
//! wtransport 0.7 serves WebTransport and nothing else of HTTP/3: its connection driver reads
//! the first HEADERS frame of each request stream and stops every stream whose method is not
//! CONNECT with H3_REQUEST_REJECTED (wtransport 0.7.2 `driver/mod.rs`, `handle_bi_h3_stream`);
//! the request never reaches its API. An aioquic `GET /sse` got exactly that: an empty stream.
//! A demultiplexer in front of it cannot help: the driver accepts the connection's streams
//! itself and quinn hands each stream out once, so nothing could look at a request and give
//! its stream back, and a browser may send requests and a CONNECT on one connection. One HTTP/3
//! layer must therefore see every request stream, and h3 (with h3-webtransport for the
//! session's own streams and datagrams) is the one that exposes plain requests and CONNECT
//! alike. Both run on quinn with the ring rustls the TCP side uses (one ring, no aws-lc).
//! Measured against wtransport on the same machine (`benches/README.md`, issue 16; 5,000 idle
//! sessions): an idle WebTransport session costs 49.8 KiB instead of 67.3 (wtransport's driver
//! makes six channels and three tasks per connection), sessions open at 760/s instead of 637/s
//! for the same edge CPU, and Chromium's WebTransport (`tests/browser.rs`,
//! `tests/browser_client.rs`, unchanged) and wtransport's client (`tests/webtransport.rs`,
//! unchanged) both work against it. What was given up: wtransport's `finish()` waited for every
//! byte to be acknowledged, h3's streams do not expose that (see `webtransport::linger`); and
//! h3-webtransport is marked experimental (pinned at 0.1.2 with h3 0.0.8).
//!
//! # Streams and bounds
//! A request stream's response body is written as the route produces it. A reader that stops
//! reading is cut as over HTTP/2: the SSE stall watcher cancels the stream's token and its stream
//! alone is reset (H3_REQUEST_CANCELLED), while the connection's other streams go on. A client
//! that goes away is noticed at once when its connection closes or when it resets the request
//! stream of a GET before finishing it (its cancel); otherwise when a write to its stream fails
//! (the next heartbeat at the latest). A request's head must arrive within
//! `server.handshake_timeout`, its body within `server.body_timeout` (POST /publish); a
//! connection with no request in flight for `server.http_idle_timeout` is closed, as over TCP.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h3::error::Code;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{MtuDiscoveryConfig, TransportConfig, VarInt};
use tokio_util::sync::CancellationToken;

use super::routes;
use crate::config::{AddressValidation, SessionConfig};
use crate::state::EdgeState;
use crate::web::conn::{H3Connection, H3Stream, with_stream_kill};
use crate::web::{Activity, Body, ConnInfo, ConnSlot, InFlight};

/// Request streams a client may have open at once on one connection: a page's event streams, a
/// few publishes and the module, or a WebTransport CONNECT and its session's stream. Each open
/// stream may hold a stream window of data (see [`transport_config`]).
const MAX_REQUEST_STREAMS: u32 = 8;

/// quinn's defaults are sized for bulk transfer (megabyte windows, 100 streams). A connection
/// here carries small JSON lines, events and bodies capped at `session.max_message_bytes`, so
/// windows are sized from the message caps: a stream can always take one whole frame of the
/// largest size the edge reads before closing (`close_message_bytes`), and the unacknowledged
/// data quinn keeps per connection stays near the outbox's own cap.
fn transport_config(cfg: &SessionConfig) -> std::io::Result<TransportConfig> {
    let window = |bytes: usize| VarInt::from_u64(bytes as u64).unwrap_or(VarInt::MAX);
    let stream_window = cfg.close_message_bytes + 16 * 1024;
    let mut t = TransportConfig::default();
    t.stream_receive_window(window(stream_window))
        .receive_window(window(2 * stream_window))
        .send_window((cfg.outbound_queue_bytes as u64).max(64 * 1024))
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_REQUEST_STREAMS))
        // HTTP/3 control and QPACK encoder/decoder streams (and one spare for GREASE).
        .max_concurrent_uni_streams(VarInt::from_u32(4))
        .datagram_receive_buffer_size(Some(64 * 1024))
        .datagram_send_buffer_size(64 * 1024)
        .max_idle_timeout(Some(cfg.idle_timeout.try_into().map_err(|_| {
            std::io::Error::other("session.idle_timeout is too long for QUIC")
        })?))
        .keep_alive_interval(Some(cfg.ping_interval))
        .mtu_discovery_config(Some(mtu_discovery()));
    Ok(t)
}

/// The largest UDP payload the edge probes for: a 1500-byte Ethernet MTU less the IPv6 and UDP
/// headers (quinn's default upper bound).
const PROBED_MTU: u16 = 1452;

/// The UDP payload every QUIC path must carry (RFC 9000 §14), where quinn starts a connection.
const QUIC_MIN_MTU: u16 = 1200;

/// One MTU probe per connection, at [`PROBED_MTU`], instead of quinn's binary search from 1200
/// (four probes of 1326 to 1436 bytes on every new connection, each acknowledged: with the
/// client's own, 16 of the 35 datagrams a WebTransport session took to open in
/// `benches/idle_sessions.rs`, issue 16). What the edge
/// sends is small: JSON lines, events, and datagram pushes that go down the stream when they do
/// not fit. So the steps between the two sizes are worth nothing to it; what a larger packet buys
/// is room for a larger datagram push, and the paths that carry more than 1200 bytes almost all
/// carry 1452. Either the one probe is acknowledged and the connection sends up to 1452, or it is
/// lost (three tries, as any probe) and the connection stays at 1200, which every QUIC path must
/// carry (RFC 9000 §14). quinn stops its search once the next step is under `minimum_change`
/// and then probes the upper bound alone if it is at least that far away, so a minimum change of
/// the whole range makes the upper bound the first and only probe.
fn mtu_discovery() -> MtuDiscoveryConfig {
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(PROBED_MTU)
        .minimum_change(PROBED_MTU - QUIC_MIN_MTU);
    mtu
}

/// The endpoint's config: `tls` (the edge's certificate, TLS 1.3, ALPN h3) and the transport.
pub fn server_config(
    tls: rustls::ServerConfig,
    cfg: &SessionConfig,
) -> std::io::Result<quinn::ServerConfig> {
    let crypto = QuicServerConfig::try_from(tls).map_err(std::io::Error::other)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(cfg)?));
    Ok(config)
}

/// Binds the QUIC endpoint on `addr` (UDP) with the edge's certificate.
pub fn bind(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    cfg: &SessionConfig,
) -> std::io::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
    quinn::Endpoint::new(
        endpoint_config(),
        Some(server_config(tls, cfg)?),
        socket,
        runtime,
    )
}

/// The endpoint's own config: quinn's defaults but for the connection IDs (see
/// [`RandomConnectionIds`]).
fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.cid_generator(|| Box::new(RandomConnectionIds));
    config
}

/// Length of the connection IDs the edge issues, every byte of it random: 64 bits.
const CONNECTION_ID_BYTES: usize = 8;

/// Connection IDs of [`CONNECTION_ID_BYTES`] random bytes, instead of quinn's default
/// (`HashedConnectionIdGenerator`: 8 bytes of which only 3 are random, the other 5 a keyed hash
/// of those 3), whose 2^24 values made address validation stall one handshake in a few
/// thousand (issue 16). quinn checks a new connection's IDs against those in use, but not the
/// ID it puts in a Retry (quinn-proto 0.11.19, `Endpoint::retry`), and it routes an Initial by
/// the IDs of established connections first. When a Retry's ID was already one of a live
/// connection's (or the first ID of a live connection that had itself been retried), every
/// Initial the client then sent went to that connection, which discarded it as unexpected,
/// until the client's idle timeout. With six IDs or so per live connection, the chance per
/// handshake was about 6 × connections / 2^24: 1 in 560 with 5,000 connections open. With 64
/// random bits it is about 6 × connections / 2^64. What quinn's hashed IDs also gave, a cheap
/// check that drops short packets for IDs it never issued, is lost: such a packet is answered
/// with a stateless reset, which quinn rate-limits (`EndpointConfig::min_reset_interval`).
struct RandomConnectionIds;

impl quinn::ConnectionIdGenerator for RandomConnectionIds {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        use ring::rand::SecureRandom;
        let mut id = [0u8; CONNECTION_ID_BYTES];
        // The OS's random source, as for the TLS keys; without it no handshake could be made.
        ring::rand::SystemRandom::new()
            .fill(&mut id)
            .expect("the OS random source is available");
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        CONNECTION_ID_BYTES
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Accepts connections until shutdown, then closes the endpoint.
pub async fn accept_loop(endpoint: quinn::Endpoint, state: Arc<EdgeState>) {
    let validation = state.config.webtransport.validate_address;
    let unproven_handshakes = Arc::new(AtomicUsize::new(0));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        // A QUIC source address can be spoofed until the peer proves it receives packets sent
        // there: nothing is charged to (or trusted of) an address before a Retry round trip or,
        // under `"under_load"` while few unproven handshakes are under way, before the
        // handshake itself has proved it.
        let proven = incoming.remote_address_validated();
        let retry = !proven
            && match validation {
                AddressValidation::Always => true,
                AddressValidation::UnderLoad { max_unvalidated } => {
                    unproven_handshakes.load(Ordering::Relaxed) >= max_unvalidated
                }
                AddressValidation::Never => false,
            };
        let unproven = !proven && validation != AddressValidation::Never;
        if retry {
            // Fails only for an address already validated, which was checked just above.
            let _ = incoming.retry();
            continue;
        }
        // A QUIC connection is a connection like a TCP one: it holds state from the handshake
        // on, so it takes a place under `server.max_connections` and under its address's
        // connection limits, which TCP connections share. The address is the one validated
        // above (taken as given with `webtransport.validate_address = "never"`); an unproven
        // one is charged once its handshake completes (see `connection`).
        let address = if unproven {
            None
        } else {
            let Some(address) = state.admit_connection(incoming.remote_address().ip(), false)
            else {
                incoming.refuse();
                continue;
            };
            Some(address)
        };
        let Ok(permit) = state.connection_slots.clone().try_acquire_owned() else {
            state.metrics.connections_refused.inc();
            incoming.refuse();
            continue;
        };
        let mut slot = ConnSlot::new(permit, state.metrics.connections.clone());
        if let Some(address) = address {
            slot = slot.with_address(address);
        }
        let counted = unproven.then(|| UnprovenHandshake::count(&unproven_handshakes));
        let st = state.clone();
        state
            .tasks
            .spawn(connections.track_future(connection(incoming, st, slot, counted)));
    }
    // The connections end first, each session with its 1001 and reason: closing the endpoint
    // first would close every connection with code 0 before a session could say why.
    connections.close();
    let grace = state.config.server.shutdown_grace;
    let _ = tokio::time::timeout(grace, connections.wait()).await;
    endpoint.close(VarInt::from_u32(0), b"edge shutting down");
    let _ = tokio::time::timeout(ENDPOINT_CLOSE_FLUSH, endpoint.wait_idle()).await;
}

/// A handshake under way from an address no Retry has proved, counted (for
/// `AddressValidation::UnderLoad`) until it completes or fails.
struct UnprovenHandshake(Arc<AtomicUsize>);

impl UnprovenHandshake {
    fn count(under_way: &Arc<AtomicUsize>) -> UnprovenHandshake {
        under_way.fetch_add(1, Ordering::Relaxed);
        UnprovenHandshake(under_way.clone())
    }
}

impl Drop for UnprovenHandshake {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long the endpoint is given, once closed, to send the last close frames before the process
/// may exit. The sessions' own closes went out before it (see [`accept_loop`]).
const ENDPOINT_CLOSE_FLUSH: std::time::Duration = std::time::Duration::from_secs(1);

/// One QUIC connection from handshake to close: its HTTP/3 layer, each plain request in a task
/// of its own, and a WebTransport CONNECT handed over with the connection. A `fn` returning an
/// `async move` block so the future holds each argument once (it lives as long as the
/// connection).
#[allow(clippy::manual_async_fn)]
fn connection(
    incoming: quinn::Incoming,
    state: Arc<EdgeState>,
    slot: ConnSlot,
    unproven: Option<UnprovenHandshake>,
) -> impl Future<Output = ()> + Send {
    async move {
        let peer = incoming.remote_address();
        let deadline = state.config.server.handshake_timeout;
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => return tracing::debug!(%peer, error = %e, "QUIC handshake failed"),
        };
        // 0.5-RTT: the connection can send before the client's Finished arrives, so the HTTP/3
        // SETTINGS built below leave with (or right behind) the edge's handshake flight, and the
        // client, which waits for them before its CONNECT, sends the CONNECT with its Finished
        // instead of one round trip later. Nothing is read from the client before its handshake
        // completes: it cannot send 0-RTT (the TLS config allows no early data), and quinn
        // processes no 1-RTT packet before then. What goes out early is the SETTINGS, the QPACK
        // streams' openings and GREASE, all within QUIC's limit of three times what an
        // unvalidated address sent. quinn refuses 0.5-RTT only to a client's connection.
        let (quic, handshake) = match connecting.into_0rtt() {
            Ok(c) => c,
            Err(_) => return tracing::debug!(%peer, "QUIC connection refused 0.5-RTT"),
        };
        let mut builder = h3::server::builder();
        builder
            .max_field_section_size(state.config.server.max_header_bytes as u64)
            .enable_webtransport(state.config.webtransport.enabled)
            .enable_extended_connect(state.config.webtransport.enabled)
            .enable_datagram(state.config.webtransport.enabled)
            .max_webtransport_sessions(1)
            .send_grease(true);
        let build = builder.build(h3_quinn::Connection::new(quic.clone()));
        // One deadline for the HTTP/3 setup and the handshake together: an unproven handshake
        // holds its place under the caps no longer than before 0.5-RTT.
        let until = tokio::time::Instant::now() + deadline;
        let built = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            r = tokio::time::timeout_at(until, build) => r,
        };
        let mut h3 = match built {
            Ok(Ok(h3)) => h3,
            Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "HTTP/3 setup failed"),
            Err(_) => return tracing::debug!(%peer, "HTTP/3 setup timed out"),
        };
        // A handshake still under way at shutdown has no session to close with 1001: it is
        // dropped, so the endpoint's close does not wait for it. `handshake` resolves when the
        // handshake ends either way (its value says whether the client sent 0-RTT, never here);
        // the connection's close reason tells a failure.
        let done = tokio::select! {
            _ = state.shutdown.cancelled() => return,
            r = tokio::time::timeout_at(until, handshake) => r,
        };
        match (done, quic.close_reason()) {
            (Err(_), _) => return tracing::debug!(%peer, "QUIC handshake timed out"),
            (Ok(_), Some(e)) => return tracing::debug!(%peer, error = %e, "QUIC handshake failed"),
            (Ok(_), None) => {}
        }
        // The client answered what the edge sent to its address: the address is proved, and
        // now takes its place under its connection limits.
        let slot = match unproven {
            None => slot,
            Some(counted) => {
                drop(counted);
                let Some(address) = state.admit_connection(peer.ip(), false) else {
                    let code = VarInt::from_u64(Code::H3_EXCESSIVE_LOAD.value())
                        .unwrap_or(VarInt::from_u32(0));
                    return quic.close(code, b"too many connections from this address");
                };
                slot.with_address(address)
            }
        };
        let activity = Arc::new(Activity::default());
        let info = ConnInfo {
            peer,
            tls: true,
            permit: Some(Arc::new(slot)),
            activity: Some(activity.clone()),
            publish_budget: Some(Arc::new(crate::admission::limits::direct_limiter(
                state.config.session.message_quota(),
            ))),
            // Never the whole connection: a stalled stream is reset alone (see `serve`).
            kill: None,
        };
        let idle_limit = state.config.server.http_idle_timeout;
        let mut idle_check = tokio::time::interval(idle_limit / 4);
        // Requests that arrived while a CONNECT waited for the client's SETTINGS.
        let mut early = std::collections::VecDeque::new();
        loop {
            let resolver = if let Some(r) = early.pop_front() {
                r
            } else {
                tokio::select! {
                    _ = state.shutdown.cancelled() => {
                        // A GOAWAY tells the client to send no more; requests in flight (event
                        // streams end with the shutdown signal) finish within the grace period
                        // before the connection goes with `h3`.
                        let _ = tokio::time::timeout(deadline, h3.shutdown(0)).await;
                        let grace = state.config.server.shutdown_grace;
                        let _ = tokio::time::timeout(grace, until_idle(&activity)).await;
                        break;
                    }
                    _ = idle_check.tick() => {
                        if activity.idle_for() >= idle_limit {
                            tracing::debug!(%peer, "closing idle HTTP/3 connection");
                            let _ = tokio::time::timeout(deadline, h3.shutdown(0)).await;
                            break;
                        }
                        continue;
                    }
                    r = h3.accept() => match r {
                        Ok(Some(resolver)) => resolver,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "HTTP/3 connection ended");
                            break;
                        }
                    },
                }
            };
            // The head is read here, in the connection's loop, because a CONNECT takes the
            // connection with it; its deadline bounds how long one stream can hold the others.
            let in_flight = activity.begin();
            let (req, stream) =
                match tokio::time::timeout(deadline, resolver.resolve_request()).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "bad HTTP/3 request");
                        continue;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "HTTP/3 request head timed out");
                        continue;
                    }
                };
            if is_webtransport_connect(&req) && state.config.webtransport.enabled {
                drop(in_flight);
                if !peer_settings(&mut h3, &stream, &mut early, deadline).await {
                    tracing::debug!(%peer, "no SETTINGS enabling WebTransport before its CONNECT");
                    return;
                }
                match crate::transport::webtransport::connect(
                    req,
                    stream,
                    h3,
                    quic.clone(),
                    state.clone(),
                    info.clone(),
                    serve_boxed,
                )
                .await
                {
                    // The session ran on this connection and is over.
                    None => return,
                    // Refused: the connection goes on serving requests.
                    Some(back) => {
                        h3 = back;
                        continue;
                    }
                }
            }
            let st = state.clone();
            let info = info.clone();
            state
                .tasks
                .spawn(serve(req, stream, st, info, quic.clone(), in_flight));
        }
        // Dropping `h3` closes the QUIC connection (H3_NO_ERROR): it ends here only when the
        // client went, the connection was idle, or the shutdown's requests are done.
        drop(h3);
    }
}

/// Waits until the client's SETTINGS enable WebTransport, for a CONNECT that came first: false
/// if they did not within `deadline` or the connection ended.
///
/// The SETTINGS come on the client's control stream, the CONNECT on a request stream, and QUIC
/// orders neither against the other: when the packet with the SETTINGS is lost, the CONNECT can
/// be read first. h3 reads the control stream only while `accept` is polled, and
/// h3-webtransport's `WebTransportSession::accept` closes the connection (H3_SETTINGS_ERROR,
/// "webtransport is not supported by client") when the client's settings have not arrived yet
/// (h3-webtransport 0.1.2 `server.rs`); the WebTransport draft says to wait for them instead.
/// So `accept` is polled here until they have; a request that comes meanwhile is kept in `early`
/// for the connection's loop.
async fn peer_settings(
    h3: &mut H3Connection,
    connect: &H3Stream,
    early: &mut std::collections::VecDeque<
        h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    >,
    deadline: std::time::Duration,
) -> bool {
    use h3::ConnectionState;
    let enabled = || connect.settings().enable_webtransport();
    let wait = async {
        while !enabled() {
            let mut accept = std::pin::pin!(h3.accept());
            // `accept` reads the control stream on every poll; it resolves only for a new request
            // stream (or the connection's end), so the settings are checked after each poll.
            let next = std::future::poll_fn(|cx| match accept.as_mut().poll(cx) {
                Poll::Ready(r) => Poll::Ready(Some(r)),
                Poll::Pending if enabled() => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            })
            .await;
            match next {
                None => {}
                Some(Ok(Some(resolver))) => early.push_back(resolver),
                Some(Ok(None) | Err(_)) => return false,
            }
        }
        true
    };
    tokio::time::timeout(deadline, wait).await.unwrap_or(false)
}

/// Resolves once no request is in flight on the connection. [`Activity`] has no wake-up of its
/// own, so it is looked at every few milliseconds; only a shutting-down connection waits here.
async fn until_idle(activity: &Activity) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    while activity.idle_for().is_zero() {
        tick.tick().await;
    }
}

/// Headers of HTTP/1.1 connection management, which HTTP/3 forbids (RFC 9114 §4.2): a route
/// may set one for HTTP/1.1 (`Connection: close` after a body timeout).
const CONNECTION_HEADERS: [http::HeaderName; 4] = [
    http::header::CONNECTION,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::HeaderName::from_static("keep-alive"),
];

/// A CONNECT with `:protocol = webtransport`.
fn is_webtransport_connect(req: &Request<()>) -> bool {
    req.method() == Method::CONNECT
        && req.extensions().get::<h3::ext::Protocol>() == Some(&h3::ext::Protocol::WEB_TRANSPORT)
}

/// [`serve`] as a [`crate::web::conn::ServeH3`], for the requests that arrive on a WebTransport
/// session's connection (rare: a boxed future each is fine).
fn serve_boxed(
    req: Request<()>,
    stream: H3Stream,
    state: Arc<EdgeState>,
    info: ConnInfo,
    quic: quinn::Connection,
    in_flight: InFlight,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(serve(req, stream, state, info, quic, in_flight))
}

/// Serves one plain HTTP/3 request through the public routes, then writes the response. The
/// route runs with a stream token ([`routes::with_stream_kill`]) whose cancellation resets this
/// stream alone.
pub async fn serve(
    mut req: Request<()>,
    stream: H3Stream,
    state: Arc<EdgeState>,
    info: ConnInfo,
    quic: quinn::Connection,
    in_flight: InFlight,
) {
    let (mut send, recv) = stream.split();
    *req.version_mut() = http::Version::HTTP_3;
    // A GET or HEAD has no body for the route: its request stream stays here and is read to
    // its end beside the response (a client may send the FIN after the headers; stopping the
    // stream before it came fails some clients' requests), and a client that resets it
    // before then has cancelled the request.
    let bodiless = matches!(*req.method(), Method::GET | Method::HEAD);
    let (body, mut rest) = if bodiless {
        (H3Body::empty(), Some(recv))
    } else {
        (H3Body::new(recv), None)
    };
    let req = req.map(|()| body);
    let kill = CancellationToken::new();
    // Boxed: the route's future is large and over once it answers, while this one lives as
    // long as an event stream does.
    let route = Box::pin(with_stream_kill(
        kill.clone(),
        routes::public(req, state.clone(), info),
    ));
    let resp = tokio::select! {
        r = route => r,
        // A route can wait on a hook; a client that left does not wait for it.
        _ = quic.closed() => return,
        () = cancelled(&mut rest) => return,
    };
    // The handler's part is over; a streaming body holds a guard of its own.
    drop(in_flight);
    let (mut parts, body) = resp.into_parts();
    for name in CONNECTION_HEADERS {
        parts.headers.remove(name);
    }
    let head = Response::from_parts(parts, ());
    let write = async {
        send.send_response(head).await?;
        pump(&mut send, body).await
    };
    tokio::select! {
        r = write => {
            if let Err(e) = r {
                tracing::debug!(peer = %quic.remote_address(), error = %e, "HTTP/3 response not sent");
            }
        }
        _ = kill.cancelled() => {
            tracing::info!(peer = %quic.remote_address(), "resetting an HTTP/3 stream whose client stopped reading");
            send.stop_stream(Code::H3_REQUEST_CANCELLED);
        }
        _ = quic.closed() => {}
        () = cancelled(&mut rest) => {
            tracing::debug!(peer = %quic.remote_address(), "HTTP/3 request cancelled by the client");
            send.stop_stream(Code::H3_REQUEST_CANCELLED);
        }
    }
}

/// Reads a bodiless request's stream to its end, discarding what comes (at most a stream
/// window); resolves only if the client resets it. Never resolves for `None`.
async fn cancelled(recv: &mut Option<h3::server::RequestStream<h3_quinn::RecvStream, Bytes>>) {
    let Some(r) = recv else {
        return std::future::pending().await;
    };
    loop {
        match r.recv_data().await {
            Ok(Some(_)) => {}
            Ok(None) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// Writes `body` to the stream as it comes, then finishes the stream.
async fn pump(
    send: &mut h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
    mut body: Body,
) -> Result<(), h3::error::StreamError> {
    while let Some(frame) = body.frame().await {
        // `Body`'s error is `Infallible`.
        let Ok(frame) = frame;
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            send.send_data(data).await?;
        }
    }
    send.finish().await
}

/// A request's body as it arrives on its HTTP/3 stream, for the routes that read one.
pub struct H3Body {
    recv: Option<h3::server::RequestStream<h3_quinn::RecvStream, Bytes>>,
    done: bool,
    /// A read is under way: h3-quinn then holds the stream inside its read future, and
    /// stopping it would panic there.
    reading: bool,
}

impl H3Body {
    fn new(recv: h3::server::RequestStream<h3_quinn::RecvStream, Bytes>) -> H3Body {
        H3Body {
            recv: Some(recv),
            done: false,
            reading: false,
        }
    }

    /// The body of a GET or HEAD: none.
    fn empty() -> H3Body {
        H3Body {
            recv: None,
            done: true,
            reading: false,
        }
    }
}

impl hyper::body::Body for H3Body {
    type Data = Bytes;
    type Error = h3::error::StreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let Some(recv) = self.recv.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = recv.poll_recv_data(cx);
        self.reading = polled.is_pending();
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(mut buf))) => {
                let data = buf.copy_to_bytes(buf.remaining());
                Poll::Ready(Some(Ok(hyper::body::Frame::data(data))))
            }
            Poll::Ready(Ok(None)) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                self.done = true;
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

impl Drop for H3Body {
    /// A body the route did not read (one refused from its head): quinn would stop it with
    /// code 0, which is no HTTP/3 code; H3_NO_ERROR asks the client to stop sending
    /// without failing its request (RFC 9114 §4.1.2). A body cut mid-read (a stall past
    /// `server.body_timeout`) is left to quinn.
    fn drop(&mut self) {
        let unread = !self.done && !self.reading;
        if let Some(recv) = self.recv.as_mut().filter(|_| unread) {
            recv.stop_sending(Code::H3_NO_ERROR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::ConnectionIdGenerator;

    /// The IDs the edge issues do not repeat among many: 100,000 from quinn's default
    /// generator (2^24 values) would hold about 300 pairs of equal IDs, and each such pair in
    /// use at once was a handshake that could stall (see [`RandomConnectionIds`]).
    #[test]
    fn connection_ids_are_random_enough_not_to_repeat() {
        let mut ids = RandomConnectionIds;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            let id = ids.generate_cid();
            assert_eq!(id.len(), CONNECTION_ID_BYTES);
            assert!(seen.insert(id), "an ID came twice: {id}");
        }
    }
}
