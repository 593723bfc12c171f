//! HTTP responses of the public routes: one body type for streaming and fixed answers, the
//! plain-text and protocol-JSON constructors, CORS, and the one place an admission [`Refusal`]
//! or a gate refusal becomes an HTTP status with `Retry-After` or `WWW-Authenticate`.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

use crate::admission::Refusal;
use crate::auth::GateRefusal;
use crate::protocol::{self, ErrorCode};
use crate::state::EdgeState;

/// Response body of every route: boxed so that streaming routes (SSE) and fixed ones share a type.
/// Not `Sync`: a streaming body owns its session, and hyper needs only `Send`.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

pub fn full_body(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into()).boxed_unsync()
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
