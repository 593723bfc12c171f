//! Identity and permissions: who a session's client is (a verified token, or what the connect
//! hook said) and what it may do on which channel.
//!
//! It owns token verification ([`token`], on the ring crypto of [`ring_provider`]), the channel
//! rules of `[[channels]]` ([`rules`]), the backend [`hooks`] that ask the existing service, the
//! [`Identity`] a session carries, and the [`gate`] that asks token, rules and hooks in that
//! order. It decides; it never touches a socket, a session or the bus. Transports ask it before
//! a handshake completes and the session before each subscribe and publish; hooks may only
//! narrow what the rules allow.

pub mod gate;
pub mod hooks;
pub mod jwks;
pub mod ring_provider;
pub mod rules;
pub mod token;

use std::sync::Arc;

use serde::Deserialize;

pub use gate::{Asker, Gate, GateError, GateRefusal};
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
    /// What the token's `channels` claim grants.
    pub grants: Option<Arc<ChannelGrants>>,
    /// What the connect hook's `channels` grant. With a claim too, a channel needs both: the
    /// hook narrows, never widens.
    pub hook_grants: Option<Arc<ChannelGrants>>,
    /// The token's `exp` (Unix seconds), before the leeway.
    pub expires_at: Option<u64>,
    /// `user` is the token's `sub` (not a user the connect hook named).
    pub user_from_token: bool,
}

impl Identity {
    /// A valid token, or a user the connect hook vouched for.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated || self.user.is_some()
    }
    /// The identity after an in-band `auth` op presented `token` (verified): the token's claim
    /// and expiry replace the old ones; the user and what the connect hook granted stay, since
    /// the hook is not asked again and may only narrow. `None`: the token is for another user
    /// than the session's (a `sub` must match the session's token's, or the user the hook
    /// named; a token without `sub` may only replace one without).
    pub fn refreshed(&self, token: Identity) -> Option<Identity> {
        let same_user = match (&token.user, self.user_from_token) {
            (Some(sub), _) => self.user.as_deref() == Some(&**sub),
            (None, from_token) => !from_token,
        };
        same_user.then(|| Identity {
            user: self.user.clone(),
            authenticated: true,
            grants: token.grants,
            hook_grants: self.hook_grants.clone(),
            expires_at: token.expires_at,
            user_from_token: self.user_from_token || token.user_from_token,
        })
    }

    /// Does a `claim` rule let this identity do `op` on `channel`? Only what its grants list:
    /// the claim's and the connect hook's, each where present, and at least one of them.
    pub fn granted(&self, op: Op, channel: &str) -> bool {
        let (claim, hook) = (self.grants.as_deref(), self.hook_grants.as_deref());
        (claim.is_some() || hook.is_some())
            && claim.is_none_or(|g| grants_allow(Some(g), op, channel))
            && hook.is_none_or(|g| grants_allow(Some(g), op, channel))
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

// Checking grants that came from outside (a token's claim, a hook's answer).

/// Patterns one list of a [`ChannelGrants`] may hold; a claim is client-visible input and each
/// pattern costs a comparison on every subscribe and publish.
pub const MAX_GRANTS_PER_LIST: usize = 256;

/// Why a [`ChannelGrants`] from outside was refused. Names the list, never the pattern (it is
/// input the edge did not choose).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("the {0} list has more than {MAX_GRANTS_PER_LIST} patterns")]
    TooMany(&'static str),
    #[error("the {0} list has an entry that is neither a channel name nor a prefix ending in `*`")]
    BadPattern(&'static str),
}

impl ChannelGrants {
    /// Checks every entry is a channel name or a prefix of one followed by `*` (`*` alone: every
    /// channel), and that no list is longer than [`MAX_GRANTS_PER_LIST`].
    pub fn check(&self) -> Result<(), GrantError> {
        for (name, list) in [("subscribe", &self.subscribe), ("publish", &self.publish)] {
            if list.len() > MAX_GRANTS_PER_LIST {
                return Err(GrantError::TooMany(name));
            }
            if !list.iter().all(|p| is_grant_pattern(p)) {
                return Err(GrantError::BadPattern(name));
            }
        }
        Ok(())
    }
}

/// A channel name, or a prefix of one (possibly empty) followed by one `*`.
pub fn is_grant_pattern(pattern: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some("") => true,
        // The prefix itself is a valid channel name: same characters, same length cap.
        Some(prefix) => crate::protocol::Channel::new(prefix).is_ok(),
        None => crate::protocol::Channel::new(pattern).is_ok(),
    }
}

#[cfg(test)]
mod grant_tests {
    use super::*;

    #[test]
    fn patterns() {
        for ok in ["*", "chat:*", "prices", "user:42:inbox", "a/b-c_d.e@f:*"] {
            assert!(is_grant_pattern(ok), "{ok}");
        }
        for bad in [
            "", "**", "chat:**", "*chat", "ch*at", "chat *", "chat\n", "é*",
        ] {
            assert!(!is_grant_pattern(bad), "{bad:?}");
        }
        assert!(!is_grant_pattern(&"a".repeat(10_000)));
    }

    #[test]
    fn an_in_band_token_replaces_the_claim_but_keeps_the_hooks_narrowing_and_the_user() {
        let grants = |s: &[&str]| {
            Some(Arc::new(ChannelGrants {
                subscribe: s.iter().map(|p| p.to_string()).collect(),
                publish: vec![],
            }))
        };
        let token = |sub: Option<&str>, claim: &[&str], exp: u64| Identity {
            user: sub.map(Arc::from),
            authenticated: true,
            grants: grants(claim),
            hook_grants: None,
            expires_at: Some(exp),
            user_from_token: sub.is_some(),
        };
        // Token alice with paid:*, narrowed by the connect hook to paid:gold.
        let session = Identity {
            hook_grants: grants(&["paid:gold"]),
            ..token(Some("alice"), &["paid:*"], 10)
        };
        assert!(!session.granted(Op::Subscribe, "paid:silver"));
        let again = session
            .refreshed(token(Some("alice"), &["paid:*"], 20))
            .expect("same user");
        assert!(
            !again.granted(Op::Subscribe, "paid:silver"),
            "still narrowed"
        );
        assert!(again.granted(Op::Subscribe, "paid:gold"));
        assert_eq!(again.expires_at, Some(20));
        // Another user, or no user where the token named one: refused.
        assert!(session.refreshed(token(Some("bob"), &[], 20)).is_none());
        assert!(session.refreshed(token(None, &[], 20)).is_none());
        // A cookie session (the hook named bob) may take bob's token, or one without sub.
        let cookie = Identity {
            user: Some("bob".into()),
            hook_grants: grants(&["room:1"]),
            ..Identity::default()
        };
        let t = cookie.refreshed(token(None, &["room:*"], 30)).unwrap();
        assert_eq!(t.user.as_deref(), Some("bob"));
        assert!(t.granted(Op::Subscribe, "room:1") && !t.granted(Op::Subscribe, "room:2"));
        assert!(cookie.refreshed(token(Some("bob"), &[], 30)).is_some());
        assert!(cookie.refreshed(token(Some("eve"), &[], 30)).is_none());
        // An anonymous session cannot become a user in band.
        assert!(
            Identity::default()
                .refreshed(token(Some("eve"), &[], 30))
                .is_none()
        );
    }

    #[test]
    fn lists_are_capped() {
        let g = ChannelGrants {
            subscribe: vec!["a".into(); MAX_GRANTS_PER_LIST],
            publish: vec![],
        };
        assert_eq!(g.check(), Ok(()));
        let g = ChannelGrants {
            subscribe: vec![],
            publish: vec!["a".into(); MAX_GRANTS_PER_LIST + 1],
        };
        assert_eq!(g.check(), Err(GrantError::TooMany("publish")));
        let g = ChannelGrants {
            subscribe: vec!["ok".into(), "not ok".into()],
            publish: vec![],
        };
        assert_eq!(g.check(), Err(GrantError::BadPattern("subscribe")));
    }
}
