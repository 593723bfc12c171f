//! The gate: the one place that says whether a session may open, subscribe or publish. It asks,
//! in this order, the token (who), the channel rules (what the edge allows), then the backend
//! hooks (what the service allows); a later step can only narrow an earlier one.
//!
//! It owns the rules in force and their reload, and tells sessions when the rules changed so
//! they drop what they may no longer hold. It does not touch sessions, sockets or the bus.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use parking_lot::RwLock;
use serde_json::value::RawValue;
use tokio::sync::watch;

use super::hooks::{Hook, HookAllow, HookRequest, HookVerdict, Hooks};
use super::token::{KeyError, Verifier};
use super::{Denied, Identity, Op, Rules};
use crate::admission::close;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbound::OutboundError;
use crate::protocol::ErrorCode;

/// Why the gate refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateRefusal {
    /// No valid token where one is needed: a bad, expired or missing token. The reason is a
    /// stable label (never the token).
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    /// The rules or a hook do not allow it.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A hook could not be asked and `hooks.failure = "deny"`, or too many are in flight.
    #[error("unavailable: the service that decides could not be asked")]
    Unavailable { retry_after_ms: u64 },
    /// The user holds `[limits.user_sessions]` sessions already.
    #[error("rate limited: the user holds as many sessions as allowed")]
    UserLimit { retry_after: Duration },
}

impl GateRefusal {
    pub fn error_code(&self) -> ErrorCode {
        match self {
            GateRefusal::Unauthorized(_) => ErrorCode::Unauthorized,
            GateRefusal::Forbidden(_) => ErrorCode::Forbidden,
            GateRefusal::Unavailable { .. } => ErrorCode::Unavailable,
            GateRefusal::UserLimit { .. } => ErrorCode::RateLimited,
        }
    }

    /// Before a handshake (WebSocket, SSE, `POST /publish`).
    pub fn http_status(&self) -> StatusCode {
        match self {
            GateRefusal::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GateRefusal::Forbidden(_) => StatusCode::FORBIDDEN,
            GateRefusal::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GateRefusal::UserLimit { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// A refused WebTransport CONNECT: 403 or 429 (see `Refusal::webtransport_connect_status`).
    pub fn webtransport_connect_status(&self) -> StatusCode {
        match self {
            GateRefusal::Unauthorized(_) | GateRefusal::Forbidden(_) => StatusCode::FORBIDDEN,
            GateRefusal::Unavailable { .. } | GateRefusal::UserLimit { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
        }
    }

    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            GateRefusal::Unavailable { retry_after_ms } => Some(*retry_after_ms),
            GateRefusal::UserLimit { retry_after } => Some((retry_after.as_millis() as u64).max(1)),
            _ => None,
        }
    }

    /// The label of `edgeplex_refusals_total` for a refused handshake.
    pub fn reason(&self) -> &'static str {
        match self {
            GateRefusal::Unauthorized(_) => "unauthorized",
            GateRefusal::Forbidden(_) => "forbidden",
            GateRefusal::Unavailable { .. } => "hook_unavailable",
            GateRefusal::UserLimit { .. } => "user_sessions",
        }
    }

    pub fn message(&self) -> String {
        match self {
            GateRefusal::Unauthorized(why) => format!("token refused: {why}"),
            GateRefusal::Forbidden(why) => why.clone(),
            GateRefusal::Unavailable { .. } => {
                "the service that decides could not be asked; try again later".into()
            }
            GateRefusal::UserLimit { .. } => {
                "this user holds as many sessions as allowed; try again later".into()
            }
        }
    }
}

impl From<Denied> for GateRefusal {
    fn from(d: Denied) -> Self {
        GateRefusal::Forbidden(d.to_string())
    }
}

/// The close code of a session whose token expired (design.md: 4001, on WebSocket and as the
/// WebTransport application error code).
pub const TOKEN_EXPIRED: u16 = 4001;

const _: () = assert!(TOKEN_EXPIRED != close::POLICY);

/// The node's gate.
#[derive(Debug)]
pub struct Gate {
    rules: RwLock<Arc<Rules>>,
    /// Bumped when the rules change; sessions watch it to drop what they lost.
    generation: watch::Sender<u64>,
    /// How long past its `exp` a token still counts (`auth.leeway`).
    leeway: Duration,
    /// Verifies tokens; `None` when `[auth]` names no key (then every token is refused).
    verifier: Option<Arc<Verifier>>,
    /// A session without a token may open (`auth.anonymous`).
    anonymous: bool,
    /// The existing service's say (`[hooks]`); `None` when no hook is on.
    hooks: Option<Arc<Hooks>>,
    metrics: Arc<Metrics>,
}

/// Who is asking, as the hooks are told.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    pub session: &'a str,
    /// "websocket", "sse", "webtransport", or "publish" for a stateless `POST /publish`.
    pub transport: &'static str,
    pub client: IpAddr,
    pub origin: Option<&'a str>,
}

/// Why a gate could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("auth: {0}")]
    Keys(#[from] KeyError),
    #[error("hooks: {0}")]
    Hooks(#[from] OutboundError),
}

impl Gate {
    /// Reads the token keys `[auth]` names (its files were checked by validation already).
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Gate, GateError> {
        let verifier = if config.auth.has_key_source() {
            Some(Arc::new(Verifier::new(&config.auth)?))
        } else {
            None
        };
        Ok(Gate {
            rules: RwLock::new(config.channels.clone()),
            generation: watch::Sender::new(0),
            leeway: config.auth.leeway,
            verifier,
            anonymous: config.auth.anonymous,
            hooks: Hooks::new(&config.hooks, metrics.clone())?,
            metrics,
        })
    }

    /// The token verifier, for the JWKS refresher.
    pub fn verifier(&self) -> Option<&Arc<Verifier>> {
        self.verifier.as_ref()
    }

    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    pub fn rules(&self) -> Arc<Rules> {
        self.rules.read().clone()
    }

    /// Puts new rules in force; says whether they differ. Open sessions learn it through
    /// [`Gate::watch`] and check what they hold against them.
    pub fn reload(&self, rules: Arc<Rules>) -> bool {
        if *self.rules.read().as_ref() == *rules {
            return false;
        }
        *self.rules.write() = rules;
        self.generation.send_modify(|g| *g += 1);
        true
    }

    /// Changes when the rules do.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Who presents `token` (`None`: no token). Refused: a token that does not verify, or no
    /// token where `auth.anonymous` is off.
    pub fn identify(&self, token: Option<&str>) -> Result<Identity, GateRefusal> {
        let result = match (token, &self.verifier) {
            (None, _) if self.anonymous => return Ok(Identity::default()),
            (None, _) => Err(GateRefusal::Unauthorized("missing")),
            (Some(_), None) => Err(GateRefusal::Unauthorized("no_keys")),
            (Some(token), Some(v)) => v
                .verify(token)
                .map(|claims| Identity {
                    user: claims.sub.map(Arc::from),
                    authenticated: true,
                    grants: claims.channels.map(Arc::new),
                    hook_grants: None,
                    expires_at: Some(claims.exp),
                    user_from_token: true,
                })
                .map_err(|e| GateRefusal::Unauthorized(e.reason())),
        };
        let label = match &result {
            Ok(_) => "valid",
            Err(GateRefusal::Unauthorized(reason)) => reason,
            Err(_) => "other",
        };
        self.metrics.token(label);
        result
    }

    /// The rules' answer alone, without hooks: what a reload re-checks.
    pub fn allowed(&self, op: Op, channel: &str, who: &Identity) -> Result<(), Denied> {
        self.rules.read().check(op, channel, who)
    }

    /// The connect hook's say on a session about to open (or a stateless publish), with the
    /// request's `headers` (cookies): it may name the user (a cookie-session app needs no
    /// tokens) and grant channels. A user it names must be the token's, when there is one.
    pub async fn connect(
        &self,
        mut who: Identity,
        asker: Asker<'_>,
        headers: &HeaderMap,
    ) -> Result<Identity, GateRefusal> {
        let Some(hooks) = self.hooks.as_ref().filter(|h| h.wants(Hook::Connect)) else {
            return Ok(who);
        };
        let req = HookRequest {
            headers: Some(headers),
            ..request(asker, &who, None, None)
        };
        let allow = verdict(hooks.call(Hook::Connect, &req).await)?;
        if let Some(user) = allow.user {
            match &who.user {
                Some(token_user) if **token_user != *user => {
                    return Err(GateRefusal::Forbidden(
                        "the connect hook named another user than the token's".into(),
                    ));
                }
                _ => who.user = Some(user.into()),
            }
        }
        if let Some(grants) = allow.channels {
            who.hook_grants = Some(Arc::new(grants));
        }
        Ok(who)
    }

    /// May `who` subscribe to `channel`? The rules, then the subscribe hook.
    pub async fn may_subscribe(
        &self,
        who: &Identity,
        channel: &str,
        asker: Asker<'_>,
    ) -> Result<(), GateRefusal> {
        self.decide(Op::Subscribe, channel, who)?;
        if let Some(hooks) = self.hooks.as_ref().filter(|h| h.wants(Hook::Subscribe)) {
            let req = request(asker, who, Some(channel), None);
            verdict(hooks.call(Hook::Subscribe, &req).await)?;
        }
        Ok(())
    }

    /// May `who` publish `data` on `channel`? The rules, then the publish hook, whose answer
    /// may replace the data (`Some`: publish that instead).
    pub async fn may_publish(
        &self,
        who: &Identity,
        channel: &str,
        data: &RawValue,
        asker: Asker<'_>,
    ) -> Result<Option<Box<RawValue>>, GateRefusal> {
        self.decide(Op::Publish, channel, who)?;
        match self.hooks.as_ref().filter(|h| h.wants(Hook::Publish)) {
            Some(hooks) => {
                let req = request(asker, who, Some(channel), Some(data));
                Ok(verdict(hooks.call(Hook::Publish, &req).await)?.data)
            }
            None => Ok(None),
        }
    }

    /// Tells the service a session ended (fire-and-forget; never waits).
    pub fn disconnected(&self, who: &Identity, asker: Asker<'_>) {
        if let Some(hooks) = self.hooks.as_ref().filter(|h| h.wants(Hook::Disconnect)) {
            hooks.disconnected(&request(asker, who, None, None));
        }
    }

    fn decide(&self, op: Op, channel: &str, who: &Identity) -> Result<(), GateRefusal> {
        let result = self.allowed(op, channel, who);
        self.metrics.permission(op.as_str(), result.is_ok());
        Ok(result?)
    }
}

fn request<'a>(
    asker: Asker<'a>,
    who: &'a Identity,
    channel: Option<&'a str>,
    data: Option<&'a RawValue>,
) -> HookRequest<'a> {
    HookRequest {
        session: asker.session,
        transport: asker.transport,
        client: asker.client,
        origin: asker.origin,
        user: who.user.as_deref(),
        channel,
        data,
        headers: None,
    }
}

/// A hook's answer as the gate's: a denial is `forbidden` with the service's reason.
fn verdict(v: HookVerdict) -> Result<HookAllow, GateRefusal> {
    match v {
        HookVerdict::Allow(allow) => Ok(allow),
        HookVerdict::Deny { reason } => Err(GateRefusal::Forbidden(reason)),
        HookVerdict::Unavailable { retry_after_ms } => {
            Err(GateRefusal::Unavailable { retry_after_ms })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_table() {
        let unauthorized = GateRefusal::Unauthorized("expired");
        assert_eq!(unauthorized.http_status(), 401);
        assert_eq!(unauthorized.webtransport_connect_status(), 403);
        assert_eq!(unauthorized.error_code(), ErrorCode::Unauthorized);
        let forbidden = GateRefusal::Forbidden("no".into());
        assert_eq!(forbidden.http_status(), 403);
        assert_eq!(forbidden.webtransport_connect_status(), 403);
        let down = GateRefusal::Unavailable {
            retry_after_ms: 1000,
        };
        assert_eq!(down.http_status(), 503);
        assert_eq!(down.webtransport_connect_status(), 429);
        assert_eq!(down.retry_after_ms(), Some(1000));
        let user = GateRefusal::UserLimit {
            retry_after: Duration::from_millis(1),
        };
        assert_eq!(user.http_status(), 429);
        assert_eq!(user.error_code(), ErrorCode::RateLimited);
        // The token never reaches a refusal's text: only the reason label does.
        assert!(!unauthorized.message().contains('.'));
    }
}
