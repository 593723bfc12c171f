//! Reading a request as a client: its `Origin` against the policy, its address as the limits
//! see it, the token it presents, and the whole admission of a session over HTTP (limits, then
//! the gate), refused with the response to send back.

use http::{HeaderMap, Request, Response, header};
use tokio::sync::OwnedSemaphorePermit;

use super::conn::ConnInfo;
use super::response::{Body, gate_refusal_response, refusal_response};
use crate::admission::Client;
use crate::metrics::Transport;
use crate::session::Admitted;
use crate::state::{EdgeState, Handshake};

/// A request body the public routes can read: hyper's on the TCP listeners, an HTTP/3 stream's
/// on the QUIC one.
pub trait RequestBody:
    hyper::body::Body<Data = bytes::Bytes, Error: std::error::Error + Send + Sync + 'static>
    + Send
    + Sized
    + 'static
{
}

impl<B> RequestBody for B where
    B: hyper::body::Body<Data = bytes::Bytes, Error: std::error::Error + Send + Sync + 'static>
        + Send
        + Sized
        + 'static
{
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
