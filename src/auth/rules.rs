//! The channel rules of `[[channels]]`, compiled once per config load so that a check costs a
//! walk down one channel name, whatever the number of rules.
//!
//! A rule's `match` is a channel name, optionally holding `{sub}` once (exactly the session's
//! user) and optionally ending in `*` (any rest). First match wins; a channel no rule matches is
//! refused. What each rule allows is one [`Access`] per operation. This module decides from a
//! channel name and an [`Identity`]; it knows nothing of sessions, tokens or hooks.
//!
//! The index: every rule has a literal head (its text before `{sub}` or `*`, all of it for an
//! exact name), and a channel can only match rules whose head it starts with. A byte trie of the
//! heads yields exactly those candidates along one walk of at most 200 bytes; the candidate with
//! the lowest index that matches in full wins.

use serde::{Deserialize, Serialize};

use super::Identity;

/// Who may do an operation on the channels a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// Every session, with or without a user.
    Anyone,
    /// Sessions with a user: a valid token, or a user named by the connect hook.
    Authenticated,
    /// Sessions whose grants (the token's `channels` claim, or the connect hook's `channels`)
    /// list the channel.
    Claim,
    /// No client: backends only (Redis or the admin API).
    Nobody,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Anyone => "anyone",
            Access::Authenticated => "authenticated",
            Access::Claim => "claim",
            Access::Nobody => "nobody",
        }
    }
}

/// An operation a rule governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Subscribe,
    Publish,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Subscribe => "subscribe",
            Op::Publish => "publish",
        }
    }
}

/// One `[[channels]]` entry as written in the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    #[serde(rename = "match")]
    pub pattern: String,
    pub subscribe: Access,
    pub publish: Access,
}

/// Why a session may not do an operation on a channel: the message of the `forbidden` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("no channel rule matches this channel")]
    NoRule,
    #[error("this channel needs a token")]
    NeedsUser,
    #[error(
        "this channel is not among those granted (the token's channels claim, or the connect hook's channels)"
    )]
    NotGranted,
    #[error("clients may not do this on this channel")]
    Nobody,
}

#[derive(Debug, Clone)]
struct Rule {
    /// Text before `{sub}` (or `*`, or all of it).
    head: Box<str>,
    /// Text between `{sub}` and the end or `*`; `None` without `{sub}`.
    after_sub: Option<Box<str>>,
    /// Ends in `*`: any rest matches.
    prefix: bool,
    subscribe: Access,
    publish: Access,
}

impl Rule {
    fn matches(&self, channel: &str, user: Option<&str>) -> bool {
        let Some(rest) = channel.strip_prefix(&*self.head) else {
            return false;
        };
        let rest = match &self.after_sub {
            None => rest,
            Some(after) => {
                // `{sub}` stands for exactly the session's user: a session without one, or
                // with an empty one, matches no rule that names it.
                let Some(user) = user.filter(|u| !u.is_empty()) else {
                    return false;
                };
                // Exactly the user, not a prefix of another's: the character that ends
                // `{sub}` in the pattern may not occur in the user, so alice's
                // `user:{sub}:*` never reaches `user:alice:bob:…`, user "alice:bob"'s.
                if after.chars().next().is_some_and(|end| user.contains(end)) {
                    return false;
                }
                let Some(rest) = rest.strip_prefix(user) else {
                    return false;
                };
                let Some(rest) = rest.strip_prefix(&**after) else {
                    return false;
                };
                return self.prefix || rest.is_empty();
            }
        };
        self.prefix || rest.is_empty()
    }
}

/// A node of the trie of rule heads.
#[derive(Debug, Default, Clone)]
struct Node {
    /// Children by next byte, sorted for a binary search.
    next: Vec<(u8, u32)>,
    /// Rules whose head ends here, ascending.
    rules: Vec<u32>,
}

/// The compiled rule set.
#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<Rule>,
    nodes: Vec<Node>,
    /// The config as written, for reload comparison and the summary.
    source: Vec<RuleSection>,
}

impl PartialEq for Rules {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// Checks one `match` pattern: `Err` says what is wrong with it.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    parse(pattern).map(|_| ())
}

/// A pattern taken apart: what a [`Rule`] matches by.
struct Parsed {
    head: Box<str>,
    after_sub: Option<Box<str>>,
    prefix: bool,
}

fn parse(pattern: &str) -> Result<Parsed, String> {
    const SUB: &str = "{sub}";
    if pattern.is_empty() {
        return Err("a pattern may not be empty; write \"*\" for every channel".into());
    }
    let (body, prefix) = match pattern.strip_suffix('*') {
        Some(b) => (b, true),
        None => (pattern, false),
    };
    let (head, after_sub) = match body.split_once(SUB) {
        Some((h, a)) => (h, Some(a)),
        None => (body, None),
    };
    for part in [Some(head), after_sub].into_iter().flatten() {
        if part.contains(SUB) {
            return Err("{sub} may appear once".into());
        }
        if let Some(c) = part.chars().find(|c| !crate::protocol::is_channel_char(*c)) {
            return Err(format!(
                "{c:?} is not allowed; a pattern is a channel name (A-Z a-z 0-9 _ . : @ / -), \
                 optionally holding {{sub}} once and ending in *"
            ));
        }
    }
    if prefix && after_sub == Some("") {
        return Err(
            "{sub}* would let a user reach the channels of every user whose name it starts; \
             end {sub} with a delimiter (user:{sub}:*) or end the pattern with it"
                .into(),
        );
    }
    if !prefix && after_sub.is_none() && head.is_empty() {
        return Err("a pattern may not be empty".into());
    }
    Ok(Parsed {
        head: head.into(),
        after_sub: after_sub.map(Into::into),
        prefix,
    })
}

impl Rules {
    /// Compiles rules in their order. `Err((i, why))`: rule `i` (from 0) does not parse.
    pub fn compile(sections: &[RuleSection]) -> Result<Rules, (usize, String)> {
        let mut rules = Vec::with_capacity(sections.len());
        let mut nodes = vec![Node::default()];
        for (i, s) in sections.iter().enumerate() {
            let Parsed {
                head,
                after_sub,
                prefix,
            } = parse(&s.pattern).map_err(|e| (i, e))?;
            let mut at = 0usize;
            for &b in head.as_bytes() {
                at = match nodes[at].next.binary_search_by_key(&b, |(k, _)| *k) {
                    Ok(j) => nodes[at].next[j].1 as usize,
                    Err(j) => {
                        let id = nodes.len();
                        nodes.push(Node::default());
                        nodes[at].next.insert(j, (b, id as u32));
                        id
                    }
                };
            }
            nodes[at].rules.push(i as u32);
            rules.push(Rule {
                head,
                after_sub,
                prefix,
                subscribe: s.subscribe,
                publish: s.publish,
            });
        }
        Ok(Rules {
            rules,
            nodes,
            source: sections.to_vec(),
        })
    }

    /// The rules as written.
    pub fn source(&self) -> &[RuleSection] {
        &self.source
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The index of the first rule matching `channel` for a session of `user`.
    fn find(&self, channel: &str, user: Option<&str>) -> Option<usize> {
        let mut best: Option<u32> = None;
        let mut at = 0usize;
        let bytes = channel.as_bytes();
        let mut depth = 0;
        loop {
            for &r in &self.nodes[at].rules {
                if best.is_some_and(|b| r >= b) {
                    break;
                }
                if self.rules[r as usize].matches(channel, user) {
                    best = Some(r);
                    break;
                }
            }
            let Some(&b) = bytes.get(depth) else { break };
            match self.nodes[at].next.binary_search_by_key(&b, |(k, _)| *k) {
                Ok(j) => at = self.nodes[at].next[j].1 as usize,
                Err(_) => break,
            }
            depth += 1;
        }
        best.map(|b| b as usize)
    }

    /// May `who` do `op` on `channel`?
    pub fn check(&self, op: Op, channel: &str, who: &Identity) -> Result<(), Denied> {
        let Some(i) = self.find(channel, who.user.as_deref()) else {
            return Err(Denied::NoRule);
        };
        let rule = &self.rules[i];
        let access = match op {
            Op::Subscribe => rule.subscribe,
            Op::Publish => rule.publish,
        };
        match access {
            Access::Anyone => Ok(()),
            Access::Authenticated if who.is_authenticated() => Ok(()),
            Access::Authenticated => Err(Denied::NeedsUser),
            Access::Claim if who.granted(op, channel) => Ok(()),
            Access::Claim => Err(Denied::NotGranted),
            Access::Nobody => Err(Denied::Nobody),
        }
    }

    /// Rules that let a session without a user publish or subscribe on every channel they
    /// match and match every channel (`*`): what `check-config` warns about.
    pub fn open_to_anyone(&self) -> Vec<&str> {
        self.source
            .iter()
            .filter(|s| {
                s.pattern == "*" && (s.subscribe == Access::Anyone || s.publish == Access::Anyone)
            })
            .map(|s| s.pattern.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::auth::ChannelGrants;

    fn rule(m: &str, s: Access, p: Access) -> RuleSection {
        RuleSection {
            pattern: m.into(),
            subscribe: s,
            publish: p,
        }
    }

    fn anon() -> Identity {
        Identity::default()
    }

    fn user(sub: &str, grants: Option<ChannelGrants>) -> Identity {
        Identity {
            user: Some(sub.into()),
            authenticated: true,
            grants: grants.map(Arc::new),
            hook_grants: None,
            expires_at: None,
            user_from_token: true,
        }
    }

    use Access::*;

    #[test]
    fn patterns_parse_or_say_why() {
        for ok in [
            "*",
            "a",
            "chat:*",
            "user:{sub}:*",
            "{sub}",
            "u:{sub}",
            "a-b_c.d@e/f:*",
        ] {
            assert!(check_pattern(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a*b",
            "a b",
            "{sub}{sub}",
            "x:{sub}:{sub}",
            "é",
            "a**",
            "{su",
            "user:{sub}*",
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_matrix() {
        let rules = Rules::compile(&[
            rule("user:{sub}:*", Authenticated, Authenticated),
            rule("user:*", Nobody, Nobody),
            rule("paid:*", Claim, Nobody),
            rule("news", Anyone, Nobody),
            rule("chat:*", Authenticated, Claim),
            rule("open:*", Anyone, Anyone),
        ])
        .unwrap();
        let grants = ChannelGrants {
            subscribe: vec!["paid:gold".into(), "paid:silver:*".into()],
            publish: vec!["chat:42".into()],
        };
        let alice = user("alice", Some(grants));
        let bob = user("bob", None);
        let s = |c: &str, who: &Identity| rules.check(Op::Subscribe, c, who);
        let p = |c: &str, who: &Identity| rules.check(Op::Publish, c, who);

        assert_eq!(s("user:alice:inbox", &alice), Ok(()));
        assert_eq!(p("user:alice:inbox", &alice), Ok(()));
        assert_eq!(s("user:alice:inbox", &bob), Err(Denied::Nobody));
        assert_eq!(s("user:alice:inbox", &anon()), Err(Denied::Nobody));
        // A user whose name is a prefix of another's does not reach the other's channels.
        let al = user("al", None);
        assert_eq!(s("user:alice:inbox", &al), Err(Denied::Nobody));
        assert_eq!(s("user:al:inbox", &al), Ok(()));

        assert_eq!(s("paid:gold", &alice), Ok(()));
        assert_eq!(s("paid:silver:eu", &alice), Ok(()));
        assert_eq!(s("paid:bronze", &alice), Err(Denied::NotGranted));
        assert_eq!(s("paid:gold", &bob), Err(Denied::NotGranted));
        assert_eq!(p("paid:gold", &alice), Err(Denied::Nobody));

        assert_eq!(s("news", &anon()), Ok(()));
        assert_eq!(p("news", &alice), Err(Denied::Nobody));
        // Exact names are exact.
        assert_eq!(s("newsroom", &anon()), Err(Denied::NoRule));

        assert_eq!(s("chat:1", &anon()), Err(Denied::NeedsUser));
        assert_eq!(s("chat:1", &bob), Ok(()));
        assert_eq!(p("chat:42", &alice), Ok(()));
        assert_eq!(p("chat:43", &alice), Err(Denied::NotGranted));

        assert_eq!(p("open:x", &anon()), Ok(()));
        assert_eq!(s("elsewhere", &alice), Err(Denied::NoRule));
    }

    #[test]
    fn first_match_wins_whatever_the_index_walk_finds_first() {
        // The longer head is found deeper in the trie, but the earlier rule wins.
        let rules =
            Rules::compile(&[rule("a*", Nobody, Nobody), rule("abc", Anyone, Anyone)]).unwrap();
        assert_eq!(
            rules.check(Op::Subscribe, "abc", &anon()),
            Err(Denied::Nobody)
        );
        let rules =
            Rules::compile(&[rule("abc", Anyone, Anyone), rule("a*", Nobody, Nobody)]).unwrap();
        assert_eq!(rules.check(Op::Subscribe, "abc", &anon()), Ok(()));
        assert_eq!(
            rules.check(Op::Subscribe, "abd", &anon()),
            Err(Denied::Nobody)
        );
        // Two rules with one head keep their order.
        let rules = Rules::compile(&[rule("x:{sub}", Anyone, Anyone), rule("x:*", Nobody, Nobody)])
            .unwrap();
        assert_eq!(
            rules.check(Op::Subscribe, "x:bob", &user("bob", None)),
            Ok(())
        );
        assert_eq!(
            rules.check(Op::Subscribe, "x:bob", &user("eve", None)),
            Err(Denied::Nobody)
        );
    }

    #[test]
    fn sub_is_exactly_the_user_never_a_prefix_of_another() {
        let rules = Rules::compile(&[
            rule("user:{sub}:*", Anyone, Anyone),
            rule("mail/{sub}", Anyone, Anyone),
            rule("*", Nobody, Nobody),
        ])
        .unwrap();
        let s = |c: &str, u: &str| rules.check(Op::Subscribe, c, &user(u, None));
        // "alice" may not reach the channels of the user "alice:bob".
        assert_eq!(s("user:alice:bob:inbox", "alice:bob"), Err(Denied::Nobody));
        assert_eq!(s("user:alice:inbox", "alice"), Ok(()));
        assert_eq!(
            s("user:alice:bob:inbox", "alice"),
            Ok(()),
            "alice's own sub-channel"
        );
        // A user holding the delimiter matches no {sub} rule delimited by it.
        assert_eq!(s("user:a:b:x", "a:b"), Err(Denied::Nobody));
        // {sub} at the end is exact.
        assert_eq!(s("mail/al", "al"), Ok(()));
        assert_eq!(s("mail/alice", "al"), Err(Denied::Nobody));
        // E-mail addresses as users work where the delimiter is not in them.
        assert_eq!(s("user:a@b.example:x", "a@b.example"), Ok(()));
    }

    #[test]
    fn no_rules_refuse_everything() {
        let rules = Rules::compile(&[]).unwrap();
        assert_eq!(
            rules.check(Op::Subscribe, "a", &user("u", None)),
            Err(Denied::NoRule)
        );
    }

    #[test]
    fn a_user_holding_pattern_characters_matches_only_literally() {
        let rules =
            Rules::compile(&[rule("u:{sub}", Anyone, Anyone), rule("*", Nobody, Nobody)]).unwrap();
        // A `sub` of "*" or "a:*" is a name like any other, never a wildcard.
        assert_eq!(
            rules.check(Op::Subscribe, "u:x", &user("*", None)),
            Err(Denied::Nobody)
        );
        assert_eq!(
            rules.check(Op::Subscribe, "u:a:b", &user("a:*", None)),
            Err(Denied::Nobody)
        );
        assert_eq!(
            rules.check(Op::Subscribe, "u:", &user("", None)),
            Err(Denied::Nobody)
        );
    }

    #[test]
    fn a_thousand_rules_agree_with_a_linear_scan() {
        let mut sections = Vec::new();
        for i in 0..1000 {
            let m = match i % 4 {
                0 => format!("t{i}:*"),
                1 => format!("t{}", i / 2),
                2 => format!("u{}:{{sub}}:*", i % 7),
                _ => format!("t{}*", i % 13),
            };
            let a = [Anyone, Authenticated, Claim, Nobody][i % 4];
            sections.push(rule(&m, a, Nobody));
        }
        let rules = Rules::compile(&sections).unwrap();
        let who = user("bob", None);
        for c in [
            "t1", "t12:x", "t3", "u3:bob:a", "u3:eve:a", "t130", "zzz", "t", "t999:",
        ] {
            let linear = rules
                .rules
                .iter()
                .position(|r| r.matches(c, who.user.as_deref()));
            assert_eq!(rules.find(c, who.user.as_deref()), linear, "{c}");
        }
    }
}
