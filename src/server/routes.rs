//! Routing of HTTP requests to transports (public listeners) or to the admin API, and the one
//! place an admission [`Refusal`] becomes an HTTP response.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

pub use super::tcp::{Activity, InFlight};
use super::{Body, EdgeState, Handshake, full_body};
use crate::admission::{Client, Refusal};
use crate::auth::GateRefusal;
use crate::metrics::Transport;
use crate::protocol::{self, ErrorCode};
use crate::session::Admitted;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Public,
    Admin,
}

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

pub(super) async fn route(
    req: Request<Incoming>,
    state: Arc<EdgeState>,
    kind: Listener,
    info: ConnInfo,
) -> Response<Body> {
    if kind == Listener::Admin {
        return crate::admin::handle(req, &state).await;
    }
    let alt_svc = state.alt_svc.clone().filter(|_| info.tls);
    let mut resp = public(req, state, info).await;
    if let Some(v) = alt_svc {
        resp.headers_mut().insert(header::ALT_SVC, v);
    }
    resp
}

/// A request body the public routes take: hyper's on the TCP listeners, an HTTP/3 stream's on
/// the QUIC one. Only `/ws` needs to know which: hyper's requests can be upgraded.
pub trait RouteBody:
    hyper::body::Body<Data = bytes::Bytes, Error: std::error::Error + Send + Sync + 'static>
    + Send
    + Sized
    + 'static
{
    /// Answers `/ws`.
    fn websocket(
        req: Request<Self>,
        state: Arc<EdgeState>,
        info: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send;
}

impl RouteBody for Incoming {
    fn websocket(
        req: Request<Self>,
        state: Arc<EdgeState>,
        info: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send {
        crate::transport::websocket::accept(req, state, info)
    }
}

impl RouteBody for super::quic::H3Body {
    /// WebSocket over HTTP/3 (RFC 9220) is not served: browsers open `/ws` over HTTP/1.1 or
    /// HTTP/2, and WebTransport is this port's session.
    async fn websocket(_: Request<Self>, _: Arc<EdgeState>, _: ConnInfo) -> Response<Body> {
        text(
            StatusCode::NOT_IMPLEMENTED,
            "WebSocket is served over HTTP/1.1 and HTTP/2; over HTTP/3 open /wt (WebTransport)\n",
        )
    }
}

/// Runs `fut` (a route) with `kill` as its [`stream_kill`] token: the HTTP/3 side resets the
/// request's stream alone when it is cancelled, as [`StreamExec`] does for HTTP/2.
pub fn with_stream_kill<F: Future>(
    kill: tokio_util::sync::CancellationToken,
    fut: F,
) -> impl Future<Output = F::Output> {
    STREAM_KILL.scope(kill, fut)
}

pub(super) async fn public<B: RouteBody>(
    req: Request<B>,
    state: Arc<EdgeState>,
    info: ConnInfo,
) -> Response<Body> {
    state
        .metrics
        .http_requests
        .get_or_create(&crate::metrics::VersionLabels::of(req.version()))
        .inc();
    // A 2xx answer to a CONNECT turns the stream (or the HTTP/1.1 connection) into a tunnel:
    // only the WebSocket route may give one, so every other route is spared from knowing it.
    if req.method() == Method::CONNECT && req.uri().path() != "/ws" {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT opens a WebSocket (HTTP/2, :protocol = websocket) at /ws only\n",
        );
    }
    match req.uri().path() {
        "/ws" => B::websocket(req, state, info).await,
        "/sse" => crate::transport::sse::accept(req, state, info).await,
        "/publish" => crate::transport::publish::accept(req, state, info).await,
        "/edgeplex.js" => super::assets::serve(&req, &super::assets::CLIENT_JS),
        "/" if state.config.demo.enabled => super::assets::serve(&req, &super::assets::DEMO_HTML),
        "/" if req.method() == Method::GET => text(
            StatusCode::OK,
            concat!(
                "edgeplex/",
                env!("CARGO_PKG_VERSION"),
                ": WebSocket clients connect to /ws\n"
            ),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full_body(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// An HTTP response whose body is one protocol object (a reply or an error): how every HTTP
/// route that speaks the protocol answers.
pub fn json(status: StatusCode, body: &protocol::Frame) -> Response<Body> {
    let mut r = Response::new(full_body(bytes::Bytes::copy_from_slice(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// An HTTP error whose body is the protocol's error object.
pub fn json_error(status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    json(status, &protocol::encode_error(None, code, message, None))
}

/// Checks the request's `Origin` against the policy. `Ok` holds the origin (`None` when absent)
/// for a CORS echo; `Err` is the counted and logged refusal to send back.
#[allow(clippy::result_large_err)]
pub fn admit_origin(
    headers: &HeaderMap,
    state: &EdgeState,
    info: &ConnInfo,
    route: &'static str,
) -> Result<Option<String>, Response<Body>> {
    let origin = headers
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_string());
    match state.admission.check_origin(origin.as_deref(), route) {
        Ok(()) => Ok(origin),
        Err(refusal) => {
            tracing::info!(peer = %info.peer, origin = ?origin, route, "refused: origin");
            Err(refusal_response(&refusal, state))
        }
    }
}

/// The client of a request, as the limits see it. Behind the PROXY protocol the peer already is
/// the client (or the proxy itself, for a `LOCAL` header) and no proxy wrote the forwarding
/// headers, so they are not read.
pub fn client_of(state: &EdgeState, info: &ConnInfo, headers: &HeaderMap) -> Client {
    let empty = HeaderMap::new();
    let headers = if state.config.server.proxy_protocol {
        &empty
    } else {
        headers
    };
    state.admission.client(info.peer.ip(), headers)
}

/// The token of an `Authorization: Bearer <token>` header. The scheme is case-insensitive
/// (RFC 7235 §2.1) and may be followed by more than one space; the token is taken as sent.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Admits a session over HTTP whose origin was checked (`origin`): the address's and node's
/// limits, then the gate (token, connect hook, user limits). `Err` is the counted and logged
/// refusal to send back before the handshake. The session's slot under `server.max_sessions`
/// comes with it.
#[allow(clippy::result_large_err)]
pub async fn admit_http_session<B>(
    req: &Request<B>,
    state: &EdgeState,
    info: &ConnInfo,
    transport: Transport,
    origin: Option<&str>,
) -> Result<(Admitted, OwnedSemaphorePermit), Response<Body>> {
    let client = client_of(state, info, req.headers());
    let (ticket, slot) = state
        .admit_session(client)
        .map_err(|refusal| refusal_response(&refusal, state))?;
    let token = request_token(req.headers(), req.uri().query());
    let handshake = Handshake {
        transport,
        token: token.as_deref(),
        origin,
        headers: req.headers(),
    };
    match state.admit(ticket, handshake).await {
        Ok(admitted) => Ok((admitted, slot)),
        Err(refusal) => {
            let transport = transport.as_str();
            tracing::info!(peer = %info.peer, transport, reason = refusal.reason(), "session refused");
            Err(gate_refusal_response(&refusal, state))
        }
    }
}

/// The token a request presents: `Authorization: Bearer <jwt>`, else `?token=<jwt>` (for
/// EventSource and WebSocket in browsers, which cannot set headers). Never logged.
pub fn request_token<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Option<std::borrow::Cow<'a, str>> {
    if let Some(t) = bearer_token(headers) {
        return Some(t.into());
    }
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// Renders a refusal of the gate before a handshake (WebSocket, SSE, `POST /publish`): 401
/// with `WWW-Authenticate`, 403, 429 or 503 with `Retry-After`, and the protocol's error object.
/// Counted in `edgeplex_refusals_total` by its reason.
pub fn gate_refusal_response(refusal: &GateRefusal, state: &EdgeState) -> Response<Body> {
    state.metrics.refusal(refusal.reason());
    let retry_ms = refusal.retry_after_ms();
    let body = protocol::encode_error(None, refusal.error_code(), &refusal.message(), retry_ms);
    let mut r = json(refusal.http_status(), &body);
    if let Some(ms) = retry_ms {
        r.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(ms.div_ceil(1000).max(1)),
        );
    }
    if matches!(refusal, GateRefusal::Unauthorized(_)) {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"edgeplex\""),
        );
    }
    r
}

/// Lets a browser page from an allowed `origin` read the response (EventSource, fetch).
pub fn allow_origin(headers: &mut HeaderMap, origin: Option<String>) {
    if let Some(o) = origin.and_then(|o| HeaderValue::from_str(&o).ok()) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
}

/// Renders a refusal before a handshake: the status of the refusal table, `Retry-After` where a
/// retry makes sense, and a JSON body in the protocol's error shape. Counts it.
pub fn refusal_response(refusal: &Refusal, state: &EdgeState) -> Response<Body> {
    state.metrics.refusal(refusal.reason());
    let retry_ms = refusal.retry_after_secs().map(|s| s * 1000);
    let body = protocol::encode_error(None, refusal.error_code(), refusal.message(), retry_ms);
    let mut r = json(refusal.http_status(), &body);
    if let Some(secs) = refusal.retry_after_secs() {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}
