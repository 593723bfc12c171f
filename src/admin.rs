//! The admin listener's routes: liveness, readiness and metrics for operators. Plain HTTP on a
//! private address; nothing here is reachable from the public listeners.

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::server::routes::text;
use crate::server::{Body, EdgeState, full_body};

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub async fn handle(req: Request<Incoming>, state: &EdgeState) -> Response<Body> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "admin routes answer GET\n");
    }
    match req.uri().path() {
        // Alive as long as this process answers.
        "/healthz" => text(StatusCode::OK, "ok\n"),
        // Ready when a new client would be served: the bus is reachable and we are not draining.
        "/readyz" => {
            if state.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if !state.hub.bus().is_ready() {
                text(StatusCode::SERVICE_UNAVAILABLE, "bus unavailable\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        "/metrics" => {
            let mut r = Response::new(full_body(state.metrics.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz, /metrics\n",
        ),
    }
}
