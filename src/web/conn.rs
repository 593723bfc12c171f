//! What a route knows of the connection its request came on ([`ConnInfo`]), and the guards that
//! keep a connection counted while any part of it lives: its slot under the connection caps
//! ([`ConnSlot`]), its requests in flight for the idle check ([`Activity`]), and the token that
//! ends one HTTP/2 or HTTP/3 stream alone ([`stream_kill`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
// The tokio clock, so the idle check follows paused time in tests.
use tokio::time::Instant;

/// Facts about the connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The connection's slot under `server.max_connections`. A session that outlives the HTTP
    /// connection (an upgrade) holds a clone so the slot stays taken while the socket is open.
    pub permit: Option<Arc<ConnSlot>>,
    /// The connection's request activity, for its idle check: a streaming response holds an
    /// [`InFlight`] guard from it for as long as it streams.
    pub activity: Option<Arc<Activity>>,
    /// The message budget of stateless HTTP publishes on this connection (`POST /publish`): the
    /// connection is such a client's session, so it gets the session's rate.
    pub publish_budget: Option<Arc<governor::DefaultDirectRateLimiter>>,
    /// Cancelling it drops the whole connection at once, without a graceful close: for a client
    /// that stopped reading, where nothing graceful can reach it. Over HTTP/2 other clients'
    /// streams may share the connection: end one stream alone with [`stream_kill`] instead.
    pub kill: Option<tokio_util::sync::CancellationToken>,
}

tokio::task_local! {
    /// Ends the HTTP/2 stream the current task serves (set by [`StreamExec`]).
    static STREAM_KILL: tokio_util::sync::CancellationToken;
}

/// hyper's executor on the TCP listeners. hyper runs each HTTP/2 stream (the request's handler,
/// then its response body) in a task of its own through it; this one gives that task a token,
/// [`stream_kill`], that ends it. Ending it drops the stream's response mid-body, and h2 then
/// resets that stream (RST_STREAM, CANCEL) while the connection's other streams go on: hyper
/// polls a body only when the client has window for it, so a stalled stream cannot be ended
/// from inside its body. HTTP/1.1 requests run in their connection's task, outside it.
///
/// A stream upgraded by an extended CONNECT (a WebSocket over HTTP/2) is written by a task
/// hyper spawns from the stream's own task; it gets a child of the stream's token, so the same
/// [`stream_kill`] ends it too (it may be waiting for window the client never gives).
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamExec;

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future + Send + 'static,
{
    fn execute(&self, fut: F) {
        let kill = STREAM_KILL
            .try_with(tokio_util::sync::CancellationToken::child_token)
            .unwrap_or_default();
        let ended = kill.clone();
        tokio::spawn(STREAM_KILL.scope(kill, async move {
            tokio::select! {
                _ = fut => {}
                _ = ended.cancelled() => {}
            }
        }));
    }
}

/// The token that resets the HTTP/2 stream the caller runs on alone; `None` outside one (an
/// HTTP/1.1 request, whose stream is its connection).
pub fn stream_kill() -> Option<tokio_util::sync::CancellationToken> {
    STREAM_KILL
        .try_with(tokio_util::sync::CancellationToken::clone)
        .ok()
}

/// Runs `fut` (a route) with `kill` as its [`stream_kill`] token: the HTTP/3 side resets the
/// request's stream alone when it is cancelled, as [`StreamExec`] does for HTTP/2.
pub fn with_stream_kill<F: Future>(
    kill: tokio_util::sync::CancellationToken,
    fut: F,
) -> impl Future<Output = F::Output> {
    STREAM_KILL.scope(kill, fut)
}

/// A public connection's slot: holds its place under `server.max_connections` (and under its
/// address's connection caps) and counts it in `edgeplex_connections` for as long as any part
/// of the connection (HTTP, then an upgraded session) is alive.
#[derive(Debug)]
pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    _address: Option<crate::admission::ConnectionTicket>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl ConnSlot {
    pub fn new(
        permit: OwnedSemaphorePermit,
        gauge: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        gauge.inc();
        ConnSlot {
            _permit: permit,
            _address: None,
            gauge,
        }
    }

    /// The slot also holds the connection's place under its address's caps.
    pub fn with_address(mut self, ticket: crate::admission::ConnectionTicket) -> Self {
        self._address = Some(ticket);
        self
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Requests in flight on one connection and when the last one ended, for the idle check.
/// A request counts until its handler returns; a streaming response (SSE) must carry an
/// [`InFlight`] guard in its body to keep its connection from looking idle.
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    last: parking_lot::Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            last: parking_lot::Mutex::new(Instant::now()),
        }
    }
}

pub struct InFlight(Arc<Activity>);

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

impl Activity {
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub(crate) fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.last.lock().elapsed()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last.lock() = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An HTTP/3 connection on the edge's QUIC endpoint.
pub type H3Connection = h3::server::Connection<h3_quinn::Connection, bytes::Bytes>;
/// One request stream of it.
pub type H3Stream = h3::server::RequestStream<h3_quinn::BidiStream<bytes::Bytes>, bytes::Bytes>;

/// Serves one plain HTTP/3 request through the public routes. The server's routing, handed to
/// a transport that takes a connection over and may still get requests on it (a WebTransport
/// session's), so that the transport needs no way back up into the server.
pub type ServeH3 = fn(
    http::Request<()>,
    H3Stream,
    Arc<crate::state::EdgeState>,
    ConnInfo,
    quinn::Connection,
    InFlight,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;
