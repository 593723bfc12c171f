//! HTTP publish: one JSON body `{"channel":"C","data":<JSON>}` becomes one publish on the bus,
//! answered with the protocol's reply object. Used by `POST /publish` on the public listeners
//! (clients that hold only an SSE stream: origin checks and CORS here) and by the admin API's
//! `POST /v1/publish` (bearer key checked in `admin.rs`). Same caps and validation as a WebSocket
//! publish; this file does no authorization of its own beyond what its callers pass in.

use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use serde_json::value::RawValue;

use governor::clock::Clock;

use crate::admission::store::UserKey;
use crate::admission::{Client, Refusal};
use crate::auth::{Asker, Identity};
use crate::bus::BusError;
use crate::protocol::{self, Channel, ErrorCode};
use crate::state::EdgeState;
use crate::web::request::{RequestBody, admit_origin, client_of, request_token};
use crate::web::response::{allow_origin, gate_refusal_response};
use crate::web::{Body, ConnInfo, full_body, json, json_error};

/// How long browsers may cache a preflight answer.
const PREFLIGHT_MAX_AGE_SECS: u32 = 600;

#[derive(Deserialize)]
struct PublishBody<'a> {
    channel: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// `POST /publish` and its CORS preflight on the public listeners.
pub async fn accept<B: RequestBody>(
    req: Request<B>,
    state: Arc<EdgeState>,
    info: ConnInfo,
) -> Response<Body> {
    let origin = match admit_origin(req.headers(), &state, &info, "publish") {
        Ok(origin) => origin,
        Err(refused) => return refused,
    };
    let mut resp = match *req.method() {
        Method::OPTIONS => {
            let mut r = Response::new(full_body(bytes::Bytes::new()));
            *r.status_mut() = StatusCode::NO_CONTENT;
            let h = r.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("POST"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("content-type, authorization"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from(PREFLIGHT_MAX_AGE_SECS),
            );
            r
        }
        Method::POST => {
            let limited = info
                .publish_budget
                .as_ref()
                .and_then(|b| b.check().err().map(|nu| nu.wait_time_from(b.clock().now())));
            match limited {
                Some(wait) => rate_limited(&state, wait),
                None => {
                    let client = client_of(&state, &info, req.headers());
                    match check_head(&req, &state, Some(&client)) {
                        Ok(()) => publish_as(req, &state, &client, origin.as_deref()).await,
                        Err(refused) => refused,
                    }
                }
            }
        }
        _ => {
            let mut r = json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::BadRequest,
                "use POST with {\"channel\":…,\"data\":…}",
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
            return r;
        }
    };
    allow_origin(resp.headers_mut(), origin);
    resp
}

/// A client's `POST /publish` past its request head's checks: a stateless publish is a session
/// of one message, so the token and the connect hook (cookies) say who it is, as at a handshake;
/// then the body.
async fn publish_as<B: RequestBody>(
    req: Request<B>,
    state: &EdgeState,
    client: &Client,
    origin: Option<&str>,
) -> Response<Body> {
    let token = request_token(req.headers(), req.uri().query());
    let id = state.sessions.new_id();
    let asker = Asker {
        session: id.public(),
        transport: "publish",
        client: client.ip,
        origin,
    };
    let who = match state.gate.identify(token.as_deref()) {
        Ok(who) => state.gate.connect(who, asker, req.headers()).await,
        Err(refusal) => Err(refusal),
    };
    drop(token);
    match who {
        Ok(identity) => {
            let caller = Caller {
                client,
                identity: &identity,
                asker,
            };
            publish_body(req, state, Some(caller)).await
        }
        Err(refusal) => gate_refusal_response(&refusal, state),
    }
}

/// A client publishing over HTTP: who it is and where it comes from.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub client: &'a Client,
    pub identity: &'a Identity,
    pub asker: Asker<'a>,
}

/// Reads, checks and publishes one request's body. A client `caller` (whose address paid the
/// message in [`check_head`]) is charged its bytes (`limits.ip_bytes`) and, for a user, the
/// message (`limits.user_messages`), as a WebSocket message would be, and needs the channel
/// rules' (and the publish hook's) leave; the admin API passes none (a backend may publish
/// anywhere).
///
/// A body declared over the cap is refused before it is read. The client controls when the
/// body arrives, so its read has a deadline of its own (`server.body_timeout`), whole, not per
/// read: a trickle is cut off like a stall.
pub async fn publish_body<B: RequestBody>(
    req: Request<B>,
    state: &EdgeState,
    caller: Option<Caller<'_>>,
) -> Response<Body> {
    let client = caller.map(|c| c.client);
    let limit = state.config.session.max_message_bytes;
    if let Err(refused) = check_head(&req, state, None) {
        return refused;
    }
    if let Some(Caller {
        client,
        identity: Identity {
            user: Some(user), ..
        },
        ..
    }) = caller
        && let Err(Refusal::RateLimited { retry_after }) = state
            .admission
            .charge_user_message(client, &UserKey::of(user))
    {
        return rate_limited(state, retry_after);
    }
    let read = Limited::new(req.into_body(), limit).collect();
    let body = match tokio::time::timeout(state.config.server.body_timeout, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => return too_large(state, limit),
        Err(_) => {
            state.metrics.refusal("body_timeout");
            let mut r = json_error(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BadRequest,
                "the request body did not arrive within server.body_timeout",
            );
            // The rest of the body may still be on its way: an HTTP/1.1 connection cannot carry
            // another request (HTTP/2 drops this header and resets the stream alone).
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
    };
    if let Some(client) = client
        && let Err(Refusal::RateLimited { retry_after }) =
            state.admission.charge_bytes(client, body.len())
    {
        return rate_limited(state, retry_after);
    }
    let parsed: PublishBody<'_> = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            let msg = format!("expected {{\"channel\":\"…\",\"data\":…}}: {e}");
            return bad_request(state, &msg);
        }
    };
    let channel = match Channel::new(&parsed.channel) {
        Ok(c) => c,
        Err(e) => return bad_request(state, &format!("field `channel`: {e}")),
    };
    if let Err(e) = protocol::check_data(parsed.data) {
        return bad_request(state, &format!("field `data`: {e}"));
    }
    let mut data = parsed.data;
    let replaced;
    if let Some(caller) = caller {
        match state
            .gate
            .may_publish(caller.identity, channel.as_str(), data, caller.asker)
            .await
        {
            Ok(r) => {
                // The publish hook may have replaced the message.
                replaced = r;
                data = replaced.as_deref().unwrap_or(data);
            }
            Err(refusal) => {
                state.metrics.error(refusal.error_code());
                return gate_refusal_response(&refusal, state);
            }
        }
    }
    match state.hub.publish(&channel, data).await {
        Ok(()) => json(StatusCode::OK, &protocol::encode_ok(None)),
        Err(BusError::Unavailable(why)) => {
            state.metrics.error(ErrorCode::Unavailable);
            let mut r = json_error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, why);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// What refuses a publish from its request head, before anything costs more: a body declared
/// over the cap, and (for a client) its address over its message budget, which it is charged
/// here. The token and the connect hook come after, so a client over its budget buys no
/// signature check and no hook call.
#[allow(clippy::result_large_err)]
fn check_head<B>(
    req: &Request<B>,
    state: &EdgeState,
    client: Option<&Client>,
) -> Result<(), Response<Body>> {
    let limit = state.config.session.max_message_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(state, limit));
    }
    if let Some(client) = client
        && let Err(Refusal::RateLimited { retry_after }) = state.admission.charge_message(client, 0)
    {
        return Err(rate_limited(state, retry_after));
    }
    Ok(())
}

/// 429 with `Retry-After` (whole seconds, rounded up) and the protocol's `retry_after_ms`.
fn rate_limited(state: &EdgeState, wait: std::time::Duration) -> Response<Body> {
    state.metrics.error(ErrorCode::RateLimited);
    let ms = (wait.as_millis() as u64).max(1);
    let body = protocol::encode_error(
        None,
        ErrorCode::RateLimited,
        "too many publishes; slow down",
        Some(ms),
    );
    let mut r = json(StatusCode::TOO_MANY_REQUESTS, &body);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000)));
    r
}

fn too_large(state: &EdgeState, limit: usize) -> Response<Body> {
    state.metrics.error(ErrorCode::TooLarge);
    let msg = format!("body over {limit} bytes (session.max_message_bytes)");
    json_error(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, &msg)
}

fn bad_request(state: &EdgeState, message: &str) -> Response<Body> {
    state.metrics.error(ErrorCode::BadRequest);
    json_error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
}
