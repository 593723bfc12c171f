//! `[hooks]`: the existing service's URL and which steps ask it, as the file has them
//! ([`HooksSection`]) and validated ([`HooksConfig`]). Reading the CA file and calling the
//! service are `crate::outbound`'s and `crate::auth::hooks`'s.

use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;
use serde::{Deserialize, Serialize};

use super::ConfigError;

pub const DEFAULT_HOOKS_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_HOOKS_MAX_IN_FLIGHT: usize = 256;
/// Forwarding more request headers than this to `connect` is a config mistake, not a need.
pub const MAX_FORWARD_HEADERS: usize = 32;
/// Room in an answer for what is not the replacement message (`allow`, `reason`, `user`,
/// `channels`).
pub const ANSWER_ROOM_BYTES: usize = 64 * 1024;

pub fn default_forward_headers() -> Vec<String> {
    ["cookie", "authorization"].map(String::from).to_vec()
}

/// What a hook step does when the service cannot answer (down, slow, non-2xx, garbage).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HookFailure {
    /// Refuse the step as `unavailable` (503 before a handshake).
    #[default]
    Deny,
    /// Let the step go on as if the hook were off.
    Allow,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HooksSection {
    pub url: String,
    pub connect: bool,
    pub subscribe: bool,
    pub publish: bool,
    pub disconnect: bool,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub failure: HookFailure,
    pub max_in_flight: usize,
    pub forward_headers: Vec<String>,
    pub ca: String,
}

impl Default for HooksSection {
    fn default() -> Self {
        HooksSection {
            url: String::new(),
            connect: false,
            subscribe: false,
            publish: false,
            disconnect: false,
            timeout: DEFAULT_HOOKS_TIMEOUT,
            failure: HookFailure::Deny,
            max_in_flight: DEFAULT_HOOKS_MAX_IN_FLIGHT,
            forward_headers: default_forward_headers(),
            ca: String::new(),
        }
    }
}

/// The validated `[hooks]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HooksConfig {
    /// The service's base URL, without a trailing `/`; `None`: hooks off.
    pub url: Option<http::Uri>,
    pub connect: bool,
    pub subscribe: bool,
    pub publish: bool,
    pub disconnect: bool,
    /// Covers connecting, sending and reading the whole answer.
    pub timeout: Duration,
    pub failure: HookFailure,
    /// Calls out at once across the node; past it a step is refused as `unavailable`.
    pub max_in_flight: usize,
    /// Lower-case, without repeats.
    pub forward_headers: Vec<HeaderName>,
    /// PEM file of CA certificates trusted next to the system's, for an `https://` service.
    pub ca: Option<PathBuf>,
    /// The largest answer read: room for a `publish` answer that replaces the message with one
    /// as large as a client may send (`session.max_message_bytes`).
    pub max_answer_bytes: usize,
}

impl HooksConfig {
    /// Whether any hook is on.
    pub fn any(&self) -> bool {
        self.url.is_some() && (self.connect || self.subscribe || self.publish || self.disconnect)
    }

    /// One line for `check-config`.
    pub fn describe(&self) -> String {
        let Some(url) = &self.url else {
            return "hooks: off\n".to_string();
        };
        let on: Vec<&str> = [
            ("connect", self.connect),
            ("subscribe", self.subscribe),
            ("publish", self.publish),
            ("disconnect (after, fire-and-forget)", self.disconnect),
        ]
        .into_iter()
        .filter_map(|(n, on)| on.then_some(n))
        .collect();
        if on.is_empty() {
            return format!("hooks: {url} set, but no hook is on\n");
        }
        format!(
            "hooks: POST {url}/<hook> for {}; timeout {}, at most {} in flight; when the service \
             cannot answer: {}; connect receives headers: {}\n",
            on.join(", "),
            humantime::format_duration(self.timeout),
            self.max_in_flight,
            match self.failure {
                HookFailure::Deny => "refuse (unavailable)",
                HookFailure::Allow => "allow",
            },
            if self.forward_headers.is_empty() {
                "none".to_string()
            } else {
                self.forward_headers
                    .iter()
                    .map(|h| h.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )
    }
}

/// Validates `[hooks]`. `invalid` words an error for a key; `max_message_bytes` is
/// `session.max_message_bytes`, validated.
pub(super) fn validate(
    h: &HooksSection,
    max_message_bytes: usize,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<HooksConfig, ConfigError> {
    let url = if h.url.is_empty() {
        None
    } else {
        Some(base_url(&h.url).map_err(|reason| invalid("hooks.url", reason))?)
    };
    if url.is_none() {
        for (key, on) in [
            ("hooks.connect", h.connect),
            ("hooks.subscribe", h.subscribe),
            ("hooks.publish", h.publish),
            ("hooks.disconnect", h.disconnect),
        ] {
            if on {
                return Err(invalid(
                    key,
                    "is true but hooks.url is empty; set hooks.url to the service's base URL \
                     (http:// or https://), or turn the hook off"
                        .into(),
                ));
            }
        }
    }
    if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&h.timeout) {
        return Err(invalid(
            "hooks.timeout",
            format!(
                "{} is out of range; allowed is 10ms to 60s",
                humantime::format_duration(h.timeout)
            ),
        ));
    }
    if !(1..=100_000).contains(&h.max_in_flight) {
        return Err(invalid(
            "hooks.max_in_flight",
            format!(
                "{} is out of range; allowed is 1 to 100000",
                h.max_in_flight
            ),
        ));
    }
    if h.forward_headers.len() > MAX_FORWARD_HEADERS {
        return Err(invalid(
            "hooks.forward_headers",
            format!(
                "lists {} headers; at most {MAX_FORWARD_HEADERS} are allowed",
                h.forward_headers.len()
            ),
        ));
    }
    let mut forward_headers: Vec<HeaderName> = Vec::with_capacity(h.forward_headers.len());
    for name in &h.forward_headers {
        // `from_bytes` lower-cases, so `Cookie` and `cookie` are one header.
        let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            invalid(
                "hooks.forward_headers",
                format!("{name:?} is not a header name; write e.g. \"cookie\" or \"x-session\""),
            )
        })?;
        if !forward_headers.contains(&parsed) {
            forward_headers.push(parsed);
        }
    }
    let ca = match (h.ca.is_empty(), &url) {
        (true, _) => None,
        (false, Some(u)) if u.scheme() == Some(&http::uri::Scheme::HTTPS) => {
            Some(PathBuf::from(&h.ca))
        }
        (false, _) => {
            return Err(invalid(
                "hooks.ca",
                "is set but hooks.url is not an https:// URL; set both or neither".into(),
            ));
        }
    };
    Ok(HooksConfig {
        url,
        connect: h.connect,
        subscribe: h.subscribe,
        publish: h.publish,
        disconnect: h.disconnect,
        timeout: h.timeout,
        failure: h.failure,
        max_in_flight: h.max_in_flight,
        forward_headers,
        ca,
        max_answer_bytes: max_message_bytes.saturating_add(ANSWER_ROOM_BYTES),
    })
}

/// `hooks.url` as a base the hook names are appended to.
fn base_url(text: &str) -> Result<http::Uri, String> {
    const FORM: &str = "write the service's base URL, e.g. \"https://app.internal/edgeplex\"";
    let uri: http::Uri = text
        .parse()
        .map_err(|_| format!("{text:?} is not a URL; {FORM}"))?;
    let scheme = uri.scheme_str().unwrap_or("");
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "{text:?}: the scheme must be http:// or https://; {FORM}"
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("{text:?} names no host; {FORM}"));
    };
    // Credentials in the URL would never be sent (nor should they sit in logs of the config).
    if authority.as_str().contains('@') {
        return Err("must not hold a user or password; the URL names only the service".into());
    }
    if uri.query().is_some() || text.contains('#') {
        return Err(format!(
            "{text:?} has a query or fragment; the hook name is appended to the path, so {FORM}"
        ));
    }
    let path = uri.path().trim_end_matches('/');
    format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|_| format!("{text:?} is not a URL; {FORM}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(h: HooksSection) -> Result<HooksConfig, String> {
        validate(&h, 1000, &|key, reason| ConfigError::Invalid {
            origin: "t".into(),
            key,
            reason,
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn base_urls_lose_their_trailing_slash_and_keep_their_path() {
        for (given, want) in [
            ("http://127.0.0.1:9000", "http://127.0.0.1:9000/"),
            (
                "https://app.internal/edgeplex/",
                "https://app.internal/edgeplex",
            ),
            ("http://[::1]:80/a/b", "http://[::1]:80/a/b"),
        ] {
            let c = check(HooksSection {
                url: given.into(),
                ..Default::default()
            })
            .unwrap();
            assert_eq!(c.url.unwrap().to_string(), want, "{given}");
        }
    }

    #[test]
    fn bad_urls_say_what_is_allowed() {
        for bad in [
            "ftp://x/",
            "app.internal",
            "/hooks",
            "http://u:p@x/",
            "http://x/?a=1",
            "http://x/#f",
            "http://",
        ] {
            let e = check(HooksSection {
                url: bad.into(),
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.contains("hooks.url"), "{bad}: {e}");
        }
        let e = check(HooksSection {
            url: "ws://x/".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.contains("http:// or https://"), "{e}");
    }

    #[test]
    fn a_hook_without_a_url_is_named() {
        let e = check(HooksSection {
            subscribe: true,
            ..Default::default()
        })
        .unwrap_err();
        assert!(
            e.contains("hooks.subscribe") && e.contains("hooks.url"),
            "{e}"
        );
    }

    #[test]
    fn forward_headers_are_lower_cased_once_and_checked() {
        let c = check(HooksSection {
            forward_headers: vec!["Cookie".into(), "cookie".into(), "X-Session".into()],
            ..Default::default()
        })
        .unwrap();
        let names: Vec<&str> = c.forward_headers.iter().map(|h| h.as_str()).collect();
        assert_eq!(names, ["cookie", "x-session"]);
        for bad in [vec!["bad header".to_string()], vec!["a".to_string(); 33]] {
            let e = check(HooksSection {
                forward_headers: bad,
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.contains("hooks.forward_headers"), "{e}");
        }
    }

    #[test]
    fn limits_and_ca_are_checked() {
        for (h, key) in [
            (
                HooksSection {
                    timeout: Duration::from_millis(5),
                    ..Default::default()
                },
                "hooks.timeout",
            ),
            (
                HooksSection {
                    timeout: Duration::from_secs(61),
                    ..Default::default()
                },
                "hooks.timeout",
            ),
            (
                HooksSection {
                    max_in_flight: 0,
                    ..Default::default()
                },
                "hooks.max_in_flight",
            ),
            (
                HooksSection {
                    url: "http://x".into(),
                    ca: "ca.pem".into(),
                    ..Default::default()
                },
                "hooks.ca",
            ),
        ] {
            let e = check(h).unwrap_err();
            assert!(e.contains(key), "{key}: {e}");
        }
        let c = check(HooksSection {
            url: "https://x".into(),
            ca: "ca.pem".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.ca, Some(PathBuf::from("ca.pem")));
        assert_eq!(c.max_answer_bytes, 1000 + ANSWER_ROOM_BYTES);
    }
}
