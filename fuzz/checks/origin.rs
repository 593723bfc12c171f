//! Invariants of the origin matcher (`edgeplex::admission::origin`) on one input. Shared by the
//! fuzz target `origin_match` and `tests/fuzz_regressions.rs`. The input is text: the first line
//! is an `Origin` header value, every further line a configured rule.

use edgeplex::admission::origin::{is_allowed, validate_rule};

pub fn check_origin(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let mut lines = text.split('\n');
    let origin = lines.next().unwrap_or_default();
    // Rules reach the matcher only after config validation, lowercased.
    let rules: Vec<String> = lines
        .filter(|r| validate_rule(r).is_ok())
        .map(|r| r.to_ascii_lowercase())
        .collect();
    let allowed = is_allowed(origin, &rules);
    // Nothing is allowed by no rule.
    assert!(!is_allowed(origin, &[]), "{origin:?} allowed by no rule");
    if validate_rule(origin).is_ok() && !origin.contains("://*.") {
        // A valid origin always matches itself as an exact rule, whatever its case.
        let own = vec![origin.to_ascii_lowercase()];
        assert!(is_allowed(origin, &own), "{origin:?} does not match itself");
        // A wildcard rule for a host never matches the host itself.
        if let Some((scheme, host)) = origin.split_once("://") {
            let wild = vec![format!("{scheme}://*.{host}").to_ascii_lowercase()];
            assert!(
                !is_allowed(origin, &wild),
                "{origin:?} matched by its own wildcard {wild:?}"
            );
        }
    }
    if allowed {
        // Whatever is allowed, an allowed origin is scheme://host.
        assert!(
            origin.contains("://"),
            "{origin:?} allowed without a scheme"
        );
    }
}
