//! Routing of HTTP requests, whatever their listener and HTTP version, to the transports (public
//! listeners) or to the admin API. What the routes share (responses, connection facts,
//! admission of a request) is [`crate::web`]'s.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::state::EdgeState;
use crate::web::{Body, ConnInfo, text};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Public,
    Admin,
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
    let resp = public(req, state, info).await;
    with_alt_svc(resp, alt_svc)
}

/// `GET /sse` read without hyper on an HTTP/1.1 connection (see [`super::sse_h1`]): the same
/// answer `route` gives it.
pub(super) async fn event_stream(
    req: Request<()>,
    state: Arc<EdgeState>,
    info: ConnInfo,
) -> Response<Body> {
    count(&req, &state);
    let alt_svc = state.alt_svc.clone().filter(|_| info.tls);
    let resp = crate::transport::sse::accept(req, state, info).await;
    with_alt_svc(resp, alt_svc)
}

fn with_alt_svc(mut resp: Response<Body>, alt_svc: Option<http::HeaderValue>) -> Response<Body> {
    if let Some(v) = alt_svc {
        resp.headers_mut().insert(header::ALT_SVC, v);
    }
    resp
}

fn count<B>(req: &Request<B>, state: &EdgeState) {
    state
        .metrics
        .http_requests
        .get_or_create(&crate::metrics::VersionLabels::of(req.version()))
        .inc();
}

/// A request body the public routes take: hyper's on the TCP listeners, an HTTP/3 stream's on
/// the QUIC one. Only `/ws` needs to know which: hyper's requests can be upgraded.
pub trait RouteBody: crate::web::request::RequestBody {
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

pub(super) async fn public<B: RouteBody>(
    req: Request<B>,
    state: Arc<EdgeState>,
    info: ConnInfo,
) -> Response<Body> {
    count(&req, &state);
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
