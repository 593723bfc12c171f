//! Channel rule checks: what a subscribe or publish pays to the rules of `[[channels]]`, for rule
//! sets of growing size. The target (issue 14): a check against 1,000 rules costs no more than a
//! few microseconds. The set mixes the rule shapes operators write (exact names, prefixes,
//! `{sub}` rules); channels are checked that match the first rule, the last, and none.
//!
//! Run: `cargo bench --bench channel_rules`. Prints figures; asserts nothing about speed.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use edgeplex::auth::{Access, Identity, Op, RuleSection, Rules};

fn rules(n: usize) -> Vec<RuleSection> {
    (0..n)
        .map(|i| {
            let pattern = match i % 4 {
                0 => format!("team{i}:{{sub}}:*"),
                1 => format!("feed{i}:*"),
                2 => format!("room{i}"),
                _ => format!("org{i}:public:*"),
            };
            RuleSection {
                pattern,
                subscribe: [Access::Anyone, Access::Authenticated, Access::Claim][i % 3],
                publish: Access::Nobody,
            }
        })
        .collect()
}

fn main() {
    let who = Identity {
        user: Some(Arc::from("alice")),
        authenticated: true,
        grants: None,
        hook_grants: None,
        expires_at: None,
        user_from_token: true,
    };
    println!("channel rule checks (subscribe), one thread");
    println!(
        "{:>7} {:>28} {:>12} {:>10}",
        "rules", "channel", "checks", "ns/check"
    );
    for &n in &[10usize, 100, 1_000, 10_000] {
        let set = Rules::compile(&rules(n)).expect("the rules compile");
        let last = n - 1;
        let cases = [
            ("team0:alice:inbox".to_string(), "first rule"),
            (
                match last % 4 {
                    0 => format!("team{last}:alice:x"),
                    1 => format!("feed{last}:x"),
                    2 => format!("room{last}"),
                    _ => format!("org{last}:public:x"),
                },
                "last rule",
            ),
            ("nowhere:at:all".to_string(), "no rule"),
        ];
        for (channel, what) in cases {
            let iters = 2_000_000u32;
            let start = Instant::now();
            for _ in 0..iters {
                let _ = black_box(set.check(Op::Subscribe, black_box(&channel), &who));
            }
            let ns = start.elapsed().as_nanos() as f64 / f64::from(iters);
            println!(
                "{n:>7} {:>28} {iters:>12} {ns:>10.1}",
                format!("{what} ({channel})")
            );
        }
    }
}
