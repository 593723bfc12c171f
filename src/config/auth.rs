//! `[auth]`: where token keys come from and which claims a token must carry. The file struct
//! ([`AuthSection`]), its validated form ([`AuthConfig`]) and the validation between them.
//!
//! Validation reads the PEM and JWKS *files* (never a URL) so that `check-config` fails on a key
//! that does not parse; the keys themselves are loaded again by [`crate::auth::token::Verifier`].
//! The HMAC secret never reaches a Debug line, the summary or the printed effective config.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use super::ConfigError;

pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Refetching a key set more often than this only loads its server.
pub const MIN_JWKS_REFRESH: Duration = Duration::from_secs(10);
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Clock skew beyond this is a broken clock, and a long leeway keeps expired tokens working.
pub const MAX_LEEWAY: Duration = Duration::from_secs(10 * 60);
/// HS256 with a shorter secret can be brute-forced from one token.
pub const MIN_HMAC_SECRET_BYTES: usize = 32;

/// `[auth]` as written. Every key optional; empty strings mean "not set".
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// HS256 shared secret. Set it from `EDGEPLEX__AUTH__HMAC_SECRET`, not in the file.
    #[serde(serialize_with = "redacted")]
    pub hmac_secret: String,
    pub public_keys: String,
    pub jwks: String,
    #[serde(with = "humantime_serde")]
    pub jwks_refresh: Duration,
    pub audience: String,
    pub issuer: String,
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    pub anonymous: bool,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            hmac_secret: String::new(),
            public_keys: String::new(),
            jwks: String::new(),
            jwks_refresh: DEFAULT_JWKS_REFRESH,
            audience: String::new(),
            issuer: String::new(),
            leeway: DEFAULT_LEEWAY,
            anonymous: true,
        }
    }
}

impl std::fmt::Debug for AuthSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSection")
            .field("hmac_secret", &redact(&self.hmac_secret))
            .field("public_keys", &self.public_keys)
            .field("jwks", &self.jwks)
            .field("jwks_refresh", &self.jwks_refresh)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("leeway", &self.leeway)
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

fn redact(secret: &str) -> &'static str {
    if secret.is_empty() { "" } else { "<redacted>" }
}

/// `check-config` prints the effective config by serializing it: the secret must not be in it.
/// The placeholder is too short to pass validation, so a printed config fed back fails loudly.
fn redacted<S: Serializer>(secret: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(redact(secret))
}

/// Where a JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// Read once at start (and on validation).
    File(PathBuf),
    /// Fetched, and refetched every `jwks_refresh`; the last good set stays in force when a
    /// fetch fails. `https://`, or `http://` to a loopback host.
    Url(String),
}

/// The validated `[auth]`.
#[derive(Clone, PartialEq)]
pub struct AuthConfig {
    /// HS256/384/512 secret, at least [`MIN_HMAC_SECRET_BYTES`].
    pub hmac_secret: Option<String>,
    /// PEM file of public keys (RSA, EC P-256/P-384, Ed25519), no `kid`.
    pub public_keys: Option<PathBuf>,
    pub jwks: Option<JwksSource>,
    pub jwks_refresh: Duration,
    /// When set, a token's `aud` must be (or contain) it.
    pub audience: Option<String>,
    /// When set, a token's `iss` must be it.
    pub issuer: Option<String>,
    /// Allowed clock skew on `exp` and `nbf`.
    pub leeway: Duration,
    /// A session without a token is allowed (and has no user).
    pub anonymous: bool,
}

impl AuthConfig {
    /// Any key configured at all: without one, no token can verify.
    pub fn has_key_source(&self) -> bool {
        self.hmac_secret.is_some() || self.public_keys.is_some() || self.jwks.is_some()
    }

    /// One line for `check-config`; no secret in it.
    pub fn describe(&self) -> String {
        let mut keys = Vec::new();
        if self.hmac_secret.is_some() {
            keys.push("HMAC secret (HS256/384/512)".to_string());
        }
        if let Some(p) = &self.public_keys {
            keys.push(format!("public keys from {}", p.display()));
        }
        match &self.jwks {
            Some(JwksSource::File(p)) => keys.push(format!("JWKS from {}", p.display())),
            Some(JwksSource::Url(u)) => keys.push(format!(
                "JWKS from {u} (refetched every {}, last good set kept)",
                humantime::format_duration(self.jwks_refresh)
            )),
            None => {}
        }
        let keys = if keys.is_empty() {
            "none (every token is refused)".to_string()
        } else {
            keys.join(", ")
        };
        format!(
            "auth: token keys: {keys}; audience {}; issuer {}; leeway {}; sessions without a \
             token {}\n",
            self.audience.as_deref().unwrap_or("not checked"),
            self.issuer.as_deref().unwrap_or("not checked"),
            humantime::format_duration(self.leeway),
            if self.anonymous { "allowed" } else { "refused" }
        )
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hmac_secret: None,
            public_keys: None,
            jwks: None,
            jwks_refresh: DEFAULT_JWKS_REFRESH,
            audience: None,
            issuer: None,
            leeway: DEFAULT_LEEWAY,
            anonymous: true,
        }
    }
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("hmac_secret", &self.hmac_secret.as_ref().map(|_| "<set>"))
            .field("public_keys", &self.public_keys)
            .field("jwks", &self.jwks)
            .field("jwks_refresh", &self.jwks_refresh)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("leeway", &self.leeway)
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

/// `[auth]` → [`AuthConfig`]. `origin` names where a key's value came from.
pub(super) fn validate(
    a: &AuthSection,
    origin: &dyn Fn(&str) -> String,
) -> Result<AuthConfig, ConfigError> {
    let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
        origin: origin(key),
        key,
        reason,
    };
    let hmac_secret = match a.hmac_secret.as_str() {
        "" => None,
        s if s.len() < MIN_HMAC_SECRET_BYTES => {
            // The length is said, the secret is not.
            return Err(invalid(
                "auth.hmac_secret",
                format!(
                    "is {} bytes; at least {MIN_HMAC_SECRET_BYTES} are required (a random \
                     string, set from the environment as EDGEPLEX__AUTH__HMAC_SECRET), or \"\" \
                     for none",
                    s.len()
                ),
            ));
        }
        s => Some(s.to_string()),
    };
    let public_keys = match a.public_keys.as_str() {
        "" => None,
        p => {
            let path = PathBuf::from(p);
            crate::auth::token::read_public_keys(&path)
                .map_err(|e| invalid("auth.public_keys", e.to_string()))?;
            Some(path)
        }
    };
    let jwks = match jwks_source(&a.jwks) {
        Ok(None) => None,
        Ok(Some(JwksSource::File(path))) => {
            crate::auth::token::read_jwks_file(&path)
                .map_err(|e| invalid("auth.jwks", e.to_string()))?;
            Some(JwksSource::File(path))
        }
        Ok(Some(url)) => Some(url),
        Err(reason) => return Err(invalid("auth.jwks", reason)),
    };
    if a.jwks_refresh < MIN_JWKS_REFRESH || a.jwks_refresh > Duration::from_secs(24 * 3600) {
        return Err(invalid(
            "auth.jwks_refresh",
            format!(
                "{} is out of range; allowed is {} to 24h",
                humantime::format_duration(a.jwks_refresh),
                humantime::format_duration(MIN_JWKS_REFRESH)
            ),
        ));
    }
    if a.leeway > MAX_LEEWAY {
        return Err(invalid(
            "auth.leeway",
            format!(
                "{} is too long; at most {}",
                humantime::format_duration(a.leeway),
                humantime::format_duration(MAX_LEEWAY)
            ),
        ));
    }
    let claim = |key: &'static str, v: &str| -> Result<Option<String>, ConfigError> {
        if v.is_empty() {
            Ok(None)
        } else if v.trim() != v || v.chars().any(char::is_control) {
            Err(invalid(
                key,
                "has leading or trailing whitespace or control characters; a token's claim \
                 would never match it"
                    .into(),
            ))
        } else {
            Ok(Some(v.to_string()))
        }
    };
    let config = AuthConfig {
        hmac_secret,
        public_keys,
        jwks,
        jwks_refresh: a.jwks_refresh,
        audience: claim("auth.audience", &a.audience)?,
        issuer: claim("auth.issuer", &a.issuer)?,
        leeway: a.leeway,
        anonymous: a.anonymous,
    };
    if !config.anonymous && !config.has_key_source() {
        return Err(invalid(
            "auth.anonymous",
            "is false, but no token key is configured (auth.hmac_secret, auth.public_keys or \
             auth.jwks), so no client could ever connect; set a key source or anonymous = true"
                .into(),
        ));
    }
    Ok(config)
}

/// `auth.jwks` → where the set comes from. A value with a scheme is a URL; anything else a path.
fn jwks_source(v: &str) -> Result<Option<JwksSource>, String> {
    if v.is_empty() {
        return Ok(None);
    }
    let Some((scheme, rest)) = v.split_once("://") else {
        return Ok(Some(JwksSource::File(PathBuf::from(v))));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') {
        return Err(format!(
            "{v:?} has no host, or has credentials in it; write https://host[:port]/path"
        ));
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    match scheme.to_ascii_lowercase().as_str() {
        "https" => Ok(Some(JwksSource::Url(v.to_string()))),
        "http"
            if matches!(
                host.to_ascii_lowercase().as_str(),
                "127.0.0.1" | "localhost" | "::1"
            ) =>
        {
            Ok(Some(JwksSource::Url(v.to_string())))
        }
        "http" => Err(format!(
            "{v:?} is plain http to a host that is not this machine: anyone on the path could \
             swap the keys; use https:// (http:// is allowed to 127.0.0.1, localhost and [::1] \
             only)"
        )),
        _ => Err(format!("{v:?} is neither a file path nor an https:// URL")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_sources() {
        assert_eq!(jwks_source("").unwrap(), None);
        assert_eq!(
            jwks_source("keys/jwks.json").unwrap(),
            Some(JwksSource::File("keys/jwks.json".into()))
        );
        for url in [
            "https://idp.example.com/.well-known/jwks.json",
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:9000/jwks",
        ] {
            assert_eq!(
                jwks_source(url).unwrap(),
                Some(JwksSource::Url(url.into())),
                "{url}"
            );
        }
        for bad in [
            "http://idp.example.com/jwks",
            "http://127.0.0.1.evil.com/jwks",
            "http://localhost@evil.com/jwks",
            "ftp://idp.example.com/jwks",
            "https:///jwks",
        ] {
            assert!(jwks_source(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_secret_never_prints() {
        let s = AuthSection {
            hmac_secret: "a-very-secret-value-that-is-long-enough".into(),
            ..AuthSection::default()
        };
        let debug = format!("{s:?}");
        let toml = toml::to_string(&s).unwrap();
        for out in [&debug, &toml] {
            assert!(!out.contains("very-secret"), "{out}");
        }
        let c = validate(&s, &|_| "test".into()).unwrap();
        assert!(!format!("{c:?}").contains("very-secret"));
        assert!(!c.describe().contains("very-secret"));
        // What check-config prints: the summary and the effective config.
        let full = super::super::Config::from_toml_str(
            "[auth]\nhmac_secret = \"a-very-secret-value-that-is-long-enough\"\n",
            "test.toml",
        )
        .unwrap();
        let printed = toml::to_string_pretty(&full.effective).unwrap();
        assert!(
            printed.contains("hmac_secret = \"<redacted>\""),
            "{printed}"
        );
        for out in [printed, full.summary(), format!("{full:?}")] {
            assert!(!out.contains("very-secret"), "{out}");
        }
    }

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/auth/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn parse(toml: &str) -> Result<super::super::Config, ConfigError> {
        super::super::Config::from_toml_str(toml, "test.toml")
    }

    #[test]
    fn each_bad_value_is_named() {
        let cases = [
            ("hmac_secret = \"short\"", "auth.hmac_secret", "at least 32"),
            (
                "public_keys = \"/nonexistent/keys.pem\"",
                "auth.public_keys",
                "/nonexistent/keys.pem",
            ),
            (
                &format!("public_keys = \"{}\"", fixture("p521.pub.pem")),
                "auth.public_keys",
                "p521.pub.pem",
            ),
            (
                &format!("public_keys = \"{}\"", fixture("cert.pem")),
                "auth.public_keys",
                "certificates are not read",
            ),
            (
                "jwks = \"http://idp.example.com/jwks\"",
                "auth.jwks",
                "https://",
            ),
            (
                "jwks = \"ftp://idp.example.com/jwks\"",
                "auth.jwks",
                "https://",
            ),
            (
                "jwks = \"/nonexistent/jwks.json\"",
                "auth.jwks",
                "/nonexistent/jwks.json",
            ),
            (
                &format!("jwks = \"{}\"", fixture("rsa.pub.pem")),
                "auth.jwks",
                "not a JWKS",
            ),
            ("jwks_refresh = \"5s\"", "auth.jwks_refresh", "10s to 24h"),
            (
                "jwks_refresh = \"2days\"",
                "auth.jwks_refresh",
                "10s to 24h",
            ),
            ("leeway = \"11m\"", "auth.leeway", "at most 10m"),
            (
                "anonymous = false",
                "auth.anonymous",
                "no client could ever connect",
            ),
            ("audience = \" edge\"", "auth.audience", "whitespace"),
            ("issuer = \"idp\\n\"", "auth.issuer", "control"),
        ];
        for (line, key, reason) in cases {
            let toml = format!("[auth]\n{line}\n");
            let e = parse(&toml).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(key), "{toml}: {e}");
            assert!(e.contains(reason), "{toml}: {e}");
            assert!(e.contains("test.toml"), "{toml}: {e}");
        }
        let e = parse("[auth]\nhmac_secret = \"0123456789\"\n")
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(!e.contains("0123456789"), "{e}");
        let e = parse("[auth]\njwks_url = \"x\"\n")
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("allowed keys here are"), "{e}");
    }

    #[test]
    fn good_sources_are_taken() {
        let c = parse(&format!(
            "[auth]\npublic_keys = \"{}\"\njwks = \"https://idp.example/jwks\"\n\
             anonymous = false\naudience = \"edge\"\n",
            fixture("ed25519.pub.pem")
        ))
        .unwrap();
        assert_eq!(
            c.auth.jwks,
            Some(JwksSource::Url("https://idp.example/jwks".into()))
        );
        assert!(!c.auth.anonymous && c.auth.has_key_source());
        assert!(
            c.summary().contains("auth: token keys: public keys from"),
            "{}",
            c.summary()
        );
        let c = parse("[auth]\n").unwrap();
        assert_eq!(c.auth, AuthConfig::default());
        assert!(c.summary().contains("sessions without a token allowed"));
    }
}
