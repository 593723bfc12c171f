//! Identity and permissions: who a session's client is (a verified token, or what the connect
//! hook said) and what it may do on which channel.
//!
//! It owns token verification ([`token`]), the channel rules of `[[channels]]` ([`rules`]), and
//! the [`Identity`] a session carries. It decides; it never touches a socket, a session or the
//! bus. Transports ask it before a handshake completes and the session before each subscribe and
//! publish; `hooks` may only narrow what it allows.

use serde::Deserialize;

/// The channels a token's `channels` claim (or the connect hook's answer) lets its holder use.
/// Each entry is a channel name or a prefix ending in `*`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ChannelGrants {
    pub subscribe: Vec<String>,
    pub publish: Vec<String>,
}
