//! Identity and permissions: who a session's client is (a verified token, or what the connect
//! hook said) and what it may do on which channel.
//!
//! It owns token verification ([`token`]), the channel rules of `[[channels]]` ([`rules`]), and
//! the [`Identity`] a session carries. It decides; it never touches a socket, a session or the
//! bus. Transports ask it before a handshake completes and the session before each subscribe and
//! publish; `hooks` may only narrow what it allows.

pub mod gate;
pub mod rules;

use std::sync::Arc;

use serde::Deserialize;

pub use gate::{Gate, GateRefusal};
pub use rules::{Access, Denied, Op, RuleSection, Rules};

/// The channels a token's `channels` claim (or the connect hook's answer) lets its holder use.
/// Each entry is a channel name or a prefix ending in `*`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ChannelGrants {
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
}

/// Who a session's client is, as far as the edge knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`, or the user the connect hook named.
    pub user: Option<Arc<str>>,
    /// A valid token was presented (with or without `sub`).
    pub authenticated: bool,
    /// What the token's `channels` claim or the connect hook's `channels` grant.
    pub grants: Option<Arc<ChannelGrants>>,
    /// The token's `exp` (Unix seconds), before the leeway.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// A valid token, or a user the connect hook vouched for.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated || self.user.is_some()
    }
}

/// Do `grants` list `channel` for `op`? An entry is a channel name, or a prefix ending in `*`.
pub fn grants_allow(grants: Option<&ChannelGrants>, op: Op, channel: &str) -> bool {
    let Some(g) = grants else { return false };
    let list = match op {
        Op::Subscribe => &g.subscribe,
        Op::Publish => &g.publish,
    };
    list.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => p == channel,
    })
}

/// Checks one grant entry (a claim's or a hook's): a channel name, or a prefix ending in `*`.
pub fn check_grant(pattern: &str) -> bool {
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    (!body.is_empty() || pattern == "*")
        && body.len() <= crate::protocol::MAX_CHANNEL_LEN
        && body.chars().all(crate::protocol::is_channel_char)
}
