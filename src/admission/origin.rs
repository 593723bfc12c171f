//! Origin rules: which browser origins may open a session. Pure functions of the `Origin` header
//! and the configured rules; no I/O, so they are unit-tested and fuzzable.
//!
//! A rule is `scheme://host[:port]` matched exactly (scheme and port significant, case-insensitive),
//! or `scheme://*.domain[:port]`, which matches any subdomain of `domain` but not `domain` itself.

/// Checks a rule when the config is loaded, so a typo is refused at start, not at the first
/// browser that fails to connect.
pub fn validate_rule(rule: &str) -> Result<(), String> {
    // Browsers serialize an origin as ASCII (internationalized hosts in punycode) with no
    // whitespace, so a rule with anything else could never match.
    if let Some(c) = rule
        .chars()
        .find(|c| !c.is_ascii() || c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return Err(format!(
            "{c:?} cannot appear in an origin: write it in ASCII without spaces, with \
             internationalized hosts in punycode (xn--…)"
        ));
    }
    let (scheme, rest) = rule
        .split_once("://")
        .ok_or("an origin is scheme://host[:port], e.g. \"https://app.example.com\"")?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    {
        return Err("the scheme is empty or has characters a scheme cannot have".into());
    }
    if rest.is_empty() {
        return Err("the host is empty".into());
    }
    if rest.contains('/') || rest.contains('?') || rest.contains('#') {
        return Err(
            "an origin has no path, query or fragment; drop everything after the host".into(),
        );
    }
    let host = rest.strip_prefix("*.").unwrap_or(rest);
    if host.is_empty() || host.contains('*') {
        return Err(
            "a wildcard is allowed only as the first label, as in https://*.example.com".into(),
        );
    }
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => Some(":443"),
        "http" => Some(":80"),
        _ => None,
    };
    if let Some(p) = default_port.filter(|p| host.ends_with(p)) {
        return Err(format!(
            "browsers omit the default port in Origin, so a rule with {p} would never match; drop it"
        ));
    }
    Ok(())
}

/// Whether `origin` (the request's `Origin` header) is allowed by `rules` (already lowercased).
pub fn is_allowed(origin: &str, rules: &[String]) -> bool {
    let origin = origin.trim().to_ascii_lowercase();
    let Some((scheme, host)) = origin.split_once("://") else {
        return false;
    };
    rules.iter().any(|rule| {
        if *rule == origin {
            return true;
        }
        let Some((rule_scheme, rule_host)) = rule.split_once("://") else {
            return false;
        };
        let Some(suffix) = rule_host.strip_prefix("*.") else {
            return false;
        };
        // `*.example.com` needs at least one label before `.example.com`.
        rule_scheme == scheme
            && host.len() > suffix.len() + 1
            && host.ends_with(suffix)
            && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_ascii_lowercase()).collect()
    }

    #[test]
    fn exact_rules_need_scheme_host_and_port() {
        let r = rules(&["https://app.example.com", "http://localhost:3000"]);
        assert!(is_allowed("https://app.example.com", &r));
        assert!(is_allowed("HTTPS://App.Example.com", &r));
        assert!(!is_allowed("http://app.example.com", &r));
        assert!(!is_allowed("https://app.example.com:8443", &r));
        assert!(is_allowed("http://localhost:3000", &r));
        assert!(!is_allowed("http://localhost:3001", &r));
        assert!(!is_allowed("null", &r));
        assert!(!is_allowed("", &r));
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let r = rules(&["https://*.example.com"]);
        assert!(is_allowed("https://a.example.com", &r));
        assert!(is_allowed("https://a.b.example.com", &r));
        assert!(!is_allowed("https://example.com", &r));
        assert!(!is_allowed("https://evilexample.com", &r));
        assert!(!is_allowed("http://a.example.com", &r));
        assert!(!is_allowed("https://a.example.com.evil.org", &r));
    }

    #[test]
    fn rules_are_checked() {
        assert!(validate_rule("https://example.com").is_ok());
        assert!(validate_rule("https://*.example.com").is_ok());
        assert!(validate_rule("http://[::1]:8080").is_ok());
        assert!(validate_rule("example.com").is_err());
        assert!(validate_rule("https://example.com/").is_err());
        assert!(validate_rule("https://a.*.example.com").is_err());
        assert!(validate_rule("https://example.com:443").is_err());
        assert!(validate_rule("https://").is_err());
        assert!(validate_rule("https://app.example.com ").is_err());
        assert!(validate_rule("https://bücher.example").is_err());
        assert!(validate_rule("https://xn--bcher-kva.example").is_ok());
    }
}
