//! WebSocket (RFC 6455): adapts a tungstenite stream to a [`Session`], opened either by an
//! HTTP/1.1 upgrade (`GET /ws`, 101) or, on an HTTP/2 connection, by an extended CONNECT
//! (RFC 8441: `:protocol = websocket` on `/ws`, 200), which makes the WebSocket one stream of a
//! connection other streams share.
//!
//! This file owns the two handshakes' checks and the wire loop (text frames in, outbox frames
//! out, pings, close codes), which both share: after its handshake a session runs the same way on
//! either. Admission policy, protocol meaning and fan-out are not here.
//!
//! Over HTTP/2 a stream that stops reading must not cost the others: hyper writes the upgraded
//! stream only as its own flow-control window allows (one write queued at most), so a stalled
//! client blocks only its writes, which `session.write_timeout` turns into a 1013 close; if the
//! close cannot get through either, that stream alone is reset (RST_STREAM, see
//! [`stream_kill`]), never the connection.
//!
//! Binary frames are not part of the protocol: each gets a `bad_request` error reply and the
//! session goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::Instrument;

use crate::config::SessionConfig;
use crate::metrics::{Transport, TransportLabels};
use crate::outbox::{Outbox, OutboxStatus, WriteStop};
use crate::protocol::Frame;
use crate::session::{Admitted, CloseReason, Session, Verdict};
use crate::state::EdgeState;
use crate::web::conn::stream_kill;
use crate::web::request::{admit_http_session, admit_origin};
use crate::web::{Body, ConnInfo, ConnSlot, InFlight, full_body, text};

use super::ws_wire::WireIo;

/// How long to wait for the client's answer to our close frame before dropping the socket. This
/// also bounds how long a slow consumer keeps its socket after its queue overflows: a client
/// that stopped reading cannot take the close frame either, and its session is already gone.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// The tungstenite settings for one session. The read buffer is allocated up front for every
/// connection, so it is sized for many idle sessions, not for throughput.
pub fn ws_config(cfg: &SessionConfig) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(cfg.read_buffer_bytes)
        .write_buffer_size(cfg.write_buffer_bytes)
        // Bounded: a client that does not read cannot make the edge buffer without limit.
        .max_write_buffer_size(cfg.write_buffer_bytes + 2 * cfg.close_message_bytes + 4096)
        .max_message_size(Some(cfg.close_message_bytes))
        .max_frame_size(Some(cfg.close_message_bytes))
}

/// How a client asked for its WebSocket.
enum Opening {
    /// `GET` with `Upgrade: websocket`: answered 101 with this `Sec-WebSocket-Accept`.
    Http1 { accept_key: String },
    /// `CONNECT` with `:protocol = websocket` (RFC 8441): answered 200; there is no key.
    Http2,
}

/// What a WebSocket on an HTTP/2 stream holds besides its IO, since its connection is shared.
struct OnStream {
    /// Resets this stream alone, for a close that could not get through.
    kill: Option<tokio_util::sync::CancellationToken>,
    /// Keeps the connection from looking idle (and being shut) while the WebSocket is open:
    /// its request ended with the 200.
    _in_flight: Option<InFlight>,
}

/// What a session holds for its life besides its IO.
struct Holds {
    /// Its place under the session cap.
    _session: OwnedSemaphorePermit,
    /// Its connection's place under the connection caps.
    _conn: Option<Arc<ConnSlot>>,
    /// Over HTTP/2, what the shared connection needs of it.
    on_stream: Option<OnStream>,
}

/// Answers `/ws`: checks the handshake (HTTP/1.1 upgrade or HTTP/2 extended CONNECT) and
/// admission, then runs the session on the upgraded IO in its own task.
pub async fn accept(
    req: Request<Incoming>,
    state: Arc<EdgeState>,
    info: ConnInfo,
) -> Response<Body> {
    let opening = match check_request(&req) {
        Ok(opening) => opening,
        Err(resp) => return resp,
    };
    let origin = match admit_origin(req.headers(), &state, &info, "websocket") {
        Ok(origin) => origin,
        Err(refused) => return refused,
    };
    let (admitted, slot) = match admit_http_session(
        &req,
        &state,
        &info,
        Transport::websocket,
        origin.as_deref(),
    )
    .await
    {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let client = *admitted.ticket.client();
    let on_stream = match opening {
        Opening::Http1 { .. } => None,
        Opening::Http2 => Some(OnStream {
            // The handler runs in the stream's task (see `StreamExec`), so this is its token.
            kill: stream_kill(),
            _in_flight: info.activity.as_ref().map(|a| a.begin()),
        }),
    };

    let on_upgrade = hyper::upgrade::on(req);
    state.tasks.spawn(serve(
        on_upgrade,
        state.clone(),
        admitted,
        Holds {
            _session: slot,
            _conn: info.permit,
            on_stream,
        },
        info.peer,
        info.tls,
        client.ip,
    ));

    let mut resp = Response::new(full_body(bytes::Bytes::new()));
    match opening {
        Opening::Http1 { accept_key } => {
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(
                header::SEC_WEBSOCKET_ACCEPT,
                HeaderValue::from_str(&accept_key).unwrap_or_else(|_| HeaderValue::from_static("")),
            );
        }
        // RFC 8441 §5: a 2xx opens the stream as the WebSocket; no key, no upgrade headers.
        Opening::Http2 => *resp.status_mut() = StatusCode::OK,
    }
    resp
}

/// Which handshake the request is, by HTTP version and method, and its checks.
#[allow(clippy::result_large_err)]
fn check_request(req: &Request<Incoming>) -> Result<Opening, Response<Body>> {
    let not_allowed = |allow: &'static str, msg: &'static str| {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, msg);
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
        r
    };
    match (req.version(), req.method()) {
        (Version::HTTP_11, &Method::GET) => {
            check_http1(req.headers()).map(|accept_key| Opening::Http1 { accept_key })
        }
        (Version::HTTP_11, _) => Err(not_allowed("GET", "use GET to open a WebSocket\n")),
        (Version::HTTP_2, &Method::CONNECT) => check_http2(req).map(|()| Opening::Http2),
        (Version::HTTP_2, _) => Err(not_allowed(
            "CONNECT",
            "over HTTP/2 a WebSocket opens with CONNECT and :protocol = websocket (RFC 8441)\n",
        )),
        _ => Err(text(
            StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "WebSocket needs HTTP/1.1 (Upgrade) or HTTP/2 (extended CONNECT) here\n",
        )),
    }
}

/// RFC 6455 §4.2.1 checks. Returns the `Sec-WebSocket-Accept` value.
#[allow(clippy::result_large_err)]
fn check_http1(h: &HeaderMap) -> Result<String, Response<Body>> {
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        let mut r = text(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket: send Upgrade: websocket\n",
        );
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return Err(r);
    }
    if !is_version_13(h) {
        let mut r = text(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version; this edge speaks version 13\n",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(r);
    }
    match h.get(header::SEC_WEBSOCKET_KEY) {
        Some(k) if !k.is_empty() => Ok(derive_accept_key(k.as_bytes())),
        _ => Err(text(
            StatusCode::BAD_REQUEST,
            "missing Sec-WebSocket-Key header\n",
        )),
    }
}

/// RFC 8441 §4-5 checks of an extended CONNECT: `:protocol = websocket` and version 13. There
/// is no key (the stream itself proves the server took it) and no `Upgrade` header; a wrong
/// version is a 400 that names the right one, since HTTP/2 has no 426 upgrade to offer.
#[allow(clippy::result_large_err)]
fn check_http2(req: &Request<Incoming>) -> Result<(), Response<Body>> {
    let protocol = req.extensions().get::<hyper::ext::Protocol>();
    if !protocol.is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket")) {
        return Err(text(
            StatusCode::BAD_REQUEST,
            "this endpoint speaks WebSocket: send CONNECT with :protocol = websocket\n",
        ));
    }
    if !is_version_13(req.headers()) {
        let mut r = text(
            StatusCode::BAD_REQUEST,
            "unsupported WebSocket version; this edge speaks version 13\n",
        );
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(r);
    }
    Ok(())
}

fn is_version_13(h: &HeaderMap) -> bool {
    h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) == Some(b"13")
}

/// Why a half of the wire loop ended.
enum End {
    /// We close the session with this code.
    Close(CloseReason),
    /// The peer closed or the socket failed: nothing left to say.
    Gone,
}

/// The session task: waits for the upgrade (HTTP/1.1 or an HTTP/2 stream, `on_stream`), then
/// runs the session and its close.
///
/// This future is what every idle session keeps alive, so each large value in it (the WebSocket,
/// the session) is created here and lent to what runs it, and is held once. For the same reason
/// this is a `fn` returning an `async move` block, not an `async fn`: an `async fn` moves each
/// argument into a local of its own, and the future keeps room for both copies.
#[allow(clippy::manual_async_fn)]
fn serve(
    on_upgrade: hyper::upgrade::OnUpgrade,
    state: Arc<EdgeState>,
    admitted: Admitted,
    holds: Holds,
    peer: std::net::SocketAddr,
    tls: bool,
    client_ip: std::net::IpAddr,
) -> impl Future<Output = ()> + Send {
    // Boxed: a value the block captures keeps its room in the future for the session's whole
    // life, though it is moved into the session once the upgrade completes. The box itself is
    // freed then (`unbox`); a `*admitted` move would keep it until the block ends.
    let admitted = Box::new(admitted);
    async move {
        // Named so the block owns them: they are released when the session ends.
        let holds = &holds;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "websocket upgrade failed");
                admitted.abandon(&state.gate, Transport::websocket);
                return;
            }
        };
        let mut session = Session::open(
            state.sessions.clone(),
            Transport::websocket,
            unbox(admitted),
        );
        let messages_out = state
            .metrics
            .messages_out
            .get_or_create(&TransportLabels {
                transport: Transport::websocket,
            })
            .clone();
        let wire = WireIo::new(
            TokioIo::new(upgraded),
            session.outbox().clone(),
            state.config.session.write_buffer_bytes,
            messages_out,
        );
        let ws = WebSocketStream::from_raw_socket(
            wire,
            Role::Server,
            Some(ws_config(&state.config.session)),
        )
        .await;
        let (mut sink, mut stream) = ws.split();
        let span = tracing::info_span!(
            "session",
            id = %session.public_id(),
            %peer,
            client = %client_ip,
            transport = "websocket",
            tls
        );
        let end = run(&mut sink, &mut stream, &mut session, &state)
            .instrument(span.clone())
            .await;
        // What is owed (the refusals before a 1008, replies to publishes still with the bus)
        // goes out before the close frame, so the client sees why.
        let owed = match &end {
            End::Close(r) => {
                session
                    .owed_at_close(*r, CLOSE_HANDSHAKE_TIMEOUT, &state.shutdown)
                    .await
            }
            End::Gone => Vec::new(),
        };
        // The session leaves the hub before the close handshake, so nothing more is queued
        // for it.
        drop(session);
        let closed = close(sink, stream, end, owed).instrument(span).await;
        // On HTTP/1.1 dropping the socket ends everything. An HTTP/2 stream whose close did not
        // get through has a write waiting for window in hyper's task: reset the stream, or it
        // would linger, and hold one of the connection's streams, until the connection ends.
        if let Some(OnStream {
            kill: Some(kill), ..
        }) = &holds.on_stream
            && !closed
        {
            tracing::debug!(%peer, "resetting the HTTP/2 stream of a WebSocket that did not close");
            kill.cancel();
        }
    }
}

/// Takes a value out of its box and frees the box now. Taking a box is the point (see `serve`),
/// which clippy's `boxed_local` cannot know.
#[allow(clippy::boxed_local)]
fn unbox<T>(b: Box<T>) -> T {
    *b
}

/// When the client was last heard, for the idle check: the read half marks it, the write half
/// reads it at each ping. Sharing the ping's timer keeps one timer per session instead of a
/// second one re-armed on every frame.
struct Heard {
    since: Instant,
    /// Milliseconds from `since`.
    at: AtomicU64,
}

impl Heard {
    fn new() -> Heard {
        Heard {
            since: Instant::now(),
            at: AtomicU64::new(0),
        }
    }

    fn now(&self) {
        let ms = self.since.elapsed().as_millis() as u64;
        self.at.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let at = Duration::from_millis(self.at.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(at)
    }
}

type Sink<S> = futures_util::stream::SplitSink<WebSocketStream<S>, Message>;
type Stream<S> = futures_util::stream::SplitStream<WebSocketStream<S>>;

/// Runs one session until it ends. Reading and writing are separate halves polled together, so a
/// client whose socket is full can still be read (it can still unsubscribe or close), and a write
/// that stalls cannot stop shutdown. Every write is bounded by `session.write_timeout`, and ends
/// early when the queue overflows meanwhile; the idle check runs at the pings between writes.
async fn run<S>(
    sink: &mut Sink<S>,
    stream: &mut Stream<S>,
    session: &mut Session,
    state: &EdgeState,
) -> End
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tracing::debug!("session open");
    let cfg = &state.config.session;
    let outbox = session.outbox().clone();

    let heard = Heard::new();
    let end = tokio::select! {
        _ = state.shutdown.cancelled() => End::Close(CloseReason::SHUTDOWN),
        end = write_half(sink, &outbox, cfg, &heard) => end,
        end = read_half(stream, session, &heard) => end,
    };
    let reason = match &end {
        End::Close(r) => Some(r),
        End::Gone => None,
    };
    CloseReason::count(reason, Transport::websocket, &state.metrics);
    end
}

/// Sends what is owed and the close frame, and waits (bounded) for the client's answer. False
/// when the bound ran out first.
async fn close<S>(mut sink: Sink<S>, mut stream: Stream<S>, end: End, owed: Vec<Frame>) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, async {
        match end {
            End::Close(reason) => {
                tracing::info!(
                    code = reason.code,
                    reason = reason.reason,
                    "closing session"
                );
                for frame in owed {
                    if sink
                        .feed(Message::Text(frame.to_utf8_bytes()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                let frame = CloseFrame {
                    code: CloseCode::from(reason.code),
                    reason: reason.reason.into(),
                };
                if sink.send(Message::Close(Some(frame))).await.is_ok() {
                    // Read until the client's answering close frame ends the stream.
                    while let Some(Ok(_)) = stream.next().await {}
                }
            }
            End::Gone => {
                // If the client sent a close frame, tungstenite answers it on this flush.
                let _ = sink.flush().await;
                tracing::debug!("session ended by the client");
            }
        }
    })
    .await
    .is_ok()
}

/// Writes what the outbox holds (one flush per wake-up: the socket takes the frames and writes
/// them in one vectored write, see [`WireIo`]) and pings on the interval.
async fn write_half<S>(
    sink: &mut Sink<S>,
    outbox: &Outbox,
    cfg: &SessionConfig,
    heard: &Heard,
) -> End
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ping = tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = outbox.ready() => {
                match outbox.status() {
                    OutboxStatus::Open => {}
                    OutboxStatus::Overflowed => return End::Close(CloseReason::SLOW_CONSUMER),
                    OutboxStatus::Closed => return End::Gone,
                }
                // Boxed for the same reason as the frame handler: inline, every idle session's
                // task would carry room for a write in progress. One allocation per wake-up,
                // next to a system call.
                if let Err(end) = Box::pin(bounded_write(sink.flush(), outbox, cfg.write_timeout)).await {
                    return end;
                }
            }
            _ = ping.tick() => {
                // The idle check rides on the ping's timer: a client silent for
                // `session.idle_timeout` (longer than the ping interval, so a live client has
                // answered the last ping by now) is closed at the first tick past it.
                if heard.silent_for() >= cfg.idle_timeout {
                    return End::Close(CloseReason::IDLE);
                }
                // Boxed like the write above; a ping is rare.
                let ping = sink.send(Message::Ping(Default::default()));
                if let Err(end) = Box::pin(bounded_write(ping, outbox, cfg.write_timeout)).await {
                    return end;
                }
            }
        }
    }
}

/// Runs one write to the client (see [`Outbox::write_within`]), and says how the session ends
/// when it does not complete.
async fn bounded_write<F>(write: F, outbox: &Outbox, limit: Duration) -> Result<(), End>
where
    F: Future<Output = Result<(), WsError>>,
{
    match outbox.write_within(write, limit).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "write failed");
            Err(End::Gone)
        }
        Err(WriteStop::Slow) => Err(End::Close(CloseReason::SLOW_CONSUMER)),
        Err(WriteStop::Closed) => Err(End::Gone),
    }
}

/// Reads client frames into the session until it says close or the client goes; every frame
/// (pongs to our pings too) counts as heard, for the write half's idle check.
async fn read_half<S>(stream: &mut Stream<S>, session: &mut Session, heard: &Heard) -> End
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut rules = session.rules_watch();
    loop {
        let msg = tokio::select! {
            msg = stream.next() => msg,
            closed = session.identity_changed(&mut rules) => match closed {
                Some(reason) => return End::Close(reason),
                None => continue,
            },
        };
        heard.now();
        let verdict = match msg {
            None => return End::Gone,
            // Boxed: handling a frame (a subscribe's join, a publish) is a large future, and
            // inline it would size every idle session's task for it. One allocation per client
            // frame instead of ~1 KiB held by every session all the time.
            Some(Ok(Message::Text(t))) => Box::pin(session.handle_frame(t.as_bytes())).await,
            Some(Ok(Message::Binary(_))) => {
                session.handle_unsupported("binary frames are not part of the protocol")
            }
            // tungstenite answers pings itself (the pong goes out with the next read or write).
            // Control frames spend the same budget, so a ping flood ends in 1008.
            Some(Ok(Message::Ping(_))) | Some(Ok(Message::Pong(_))) => session.handle_control(),
            Some(Ok(Message::Frame(_))) => Verdict::Continue,
            Some(Ok(Message::Close(frame))) => {
                tracing::debug!(?frame, "client closed");
                return End::Gone;
            }
            // RFC 6455 §8.1: invalid UTF-8 in a text frame fails the connection (and
            // tokio-tungstenite's stream ends after any error, so it could not go on anyway).
            Some(Err(WsError::Utf8(_))) => return End::Close(CloseReason::INVALID_UTF8),
            Some(Err(WsError::Capacity(e))) => {
                tracing::info!(error = %e, "message over session.close_message_bytes");
                return End::Close(CloseReason::TOO_BIG);
            }
            Some(Err(WsError::Protocol(e))) => {
                tracing::info!(error = %e, "websocket protocol error");
                return End::Close(CloseReason::PROTOCOL);
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "read failed");
                return End::Gone;
            }
        };
        // Again after the frame: pongs are not read while a handler (a hook, say) runs, and
        // that wait is not the client's silence.
        heard.now();
        if let Verdict::Close(reason) = verdict {
            return End::Close(reason);
        }
    }
}
