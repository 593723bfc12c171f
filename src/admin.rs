//! The admin listener's routes: liveness, readiness, metrics and the admission state of one
//! address for operators, and the backend publish API. Plain HTTP on a private address; nothing
//! here is reachable from the public listeners. Reads are open to whoever reaches the listener
//! (like `/metrics`); the one write, publishing, needs the bearer key.

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::protocol::ErrorCode;
use crate::state::EdgeState;
use crate::transport::publish;
use crate::web::request::bearer_token;
use crate::web::{Body, full_body, json_error, text};

/// `GET /v1/admission/<address>`: what the limits know of one client address.
const ADMISSION_PREFIX: &str = "/v1/admission/";

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub async fn handle(req: Request<Incoming>, state: &EdgeState) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        // Alive as long as this process answers.
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        // Ready when a new client would be served: the bus is reachable and we are not draining.
        (&Method::GET, "/readyz") => {
            if state.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if !state.hub.bus().is_ready() {
                text(StatusCode::SERVICE_UNAVAILABLE, "bus unavailable\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(full_body(state.metrics.render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE),
            );
            r
        }
        (&Method::POST, "/v1/publish") => publish(req, state).await,
        (&Method::GET, path) if path.starts_with(ADMISSION_PREFIX) => {
            let addr = &path[ADMISSION_PREFIX.len()..];
            match addr.parse::<std::net::IpAddr>() {
                Ok(ip) => {
                    let body = state.admission.address_state(ip).to_string();
                    let mut r = Response::new(full_body(body));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    r
                }
                Err(_) => json_error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    "GET /v1/admission/<IPv4 or IPv6 address>",
                ),
            }
        }
        (_, "/healthz" | "/readyz" | "/metrics" | "/v1/publish") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz, /metrics, /v1/admission/<address>, POST /v1/publish\n",
        ),
    }
}

/// `POST /v1/publish {"channel":"C","data":<JSON>}` with `Authorization: Bearer <admin.api_key>`:
/// the backend's way in, same bus path as a client publish. Answers the protocol's reply object.
async fn publish(req: Request<Incoming>, state: &EdgeState) -> Response<Body> {
    let Some(key) = &state.config.admin.api_key else {
        return json_error(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "the publish API is off; set admin.api_key",
        );
    };
    let presented = bearer_token(req.headers());
    if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), key.as_bytes())) {
        let mut r = json_error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden,
            "missing or wrong bearer key",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    publish::publish_body(req, state, None).await
}

/// Compares without an early exit, so the time taken does not tell how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abcdefghijklmnop", b"abcdefghijklmnop"));
        assert!(!constant_time_eq(b"abcdefghijklmnop", b"abcdefghijklmnoq"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
