//! Token verification: a JWT from `Authorization: Bearer`, `?token=` or an `auth` frame becomes
//! [`Claims`], or a [`TokenError`] whose [`TokenError::reason`] is a stable metric label.
//!
//! It owns the keys (HMAC secret, PEM public keys, the JWKS set in force), the choice of key for
//! a token, and the claim checks (`exp`, `nbf`, `aud`, `iss`, `sub`, `channels`). It does not
//! fetch a JWKS URL (the refresher puts each good set in force with [`Verifier::set_jwks`]),
//! does not decide what a verified token may do on a channel (the channel rules do), and never
//! logs: neither a token nor a claim value reaches an error message, a log line or a label.
//!
//! Signatures are checked by `jsonwebtoken` with the ring provider of
//! [`super::ring_provider`]. The choice of key is made here, before the crate runs:
//! - a key's type fixes its algorithms (HMAC secret: HS256/384/512; RSA: RS*/PS*; EC P-256:
//!   ES256; EC P-384: ES384; Ed25519: EdDSA), so a token "signed" with a public key used as an
//!   HMAC secret finds no key to try;
//! - a JWKS key that names an `alg` takes only that one;
//! - with a JWKS configured, a `kid` must name one of its keys; without one, a `kid` is only a
//!   label and is ignored (PEM keys and the secret have no `kid`);
//! - with no `kid`, the secret and the PEM keys of the token's family are tried, and the JWKS key
//!   too when it holds exactly one of that family: at most [`MAX_KEYS_TRIED`];
//! - header fields that point at other keys (`jku`, `jwk`, `x5u`, `x5c`) are never followed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::RwLock;
use serde::Deserialize;

use crate::auth::ChannelGrants;
use crate::config::{AuthConfig, JwksSource};

/// Longer tokens are refused before any base64 or JSON work.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// A `sub` longer than this is refused: it becomes a limiter key and a hook's `user`.
pub const MAX_SUB_BYTES: usize = 256;
/// Public keys one PEM file may hold; each is a signature check for a token without `kid`.
pub const MAX_PEM_KEYS: usize = 8;
/// Signature checks one token can cost: the PEM keys of its family and one JWKS key.
pub const MAX_KEYS_TRIED: usize = MAX_PEM_KEYS + 1;
/// A JWKS larger than this (file or fetched body) is refused.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
/// Keys one JWKS may list, usable or not.
pub const MAX_JWKS_KEYS: usize = 64;
/// A PEM file larger than this is refused.
pub const MAX_PEM_BYTES: usize = 256 * 1024;
const MAX_KID_BYTES: usize = 256;
/// ring verifies RSA keys of 2048 to 8192 bits; others are refused when loaded, not at each
/// token.
const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=8192;

/// What a verified token says about its holder.
#[derive(Debug, Clone)]
pub struct Claims {
    /// The user; `None`: authenticated, but no user.
    pub sub: Option<String>,
    /// Expiry (seconds since the epoch), without the leeway.
    pub exp: u64,
    pub channels: Option<ChannelGrants>,
}

/// Why a token was refused. The text says what is wrong, never what the token or its claims
/// hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    #[error("no token key is configured")]
    NoKeys,
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(&'static str),
    #[error("the token's algorithm is refused: {0}")]
    Algorithm(&'static str),
    #[error("the token names a key id that the key set does not hold")]
    UnknownKid,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has no exp claim")]
    MissingExp,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's audience is not the configured one")]
    BadAudience,
    #[error("the token's issuer is not the configured one")]
    BadIssuer,
}

impl TokenError {
    /// A stable label for metrics (`reason="…"`).
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::TooLong => "too_long",
            TokenError::NoKeys => "no_keys",
            TokenError::Malformed(_) => "malformed",
            TokenError::Algorithm(_) => "algorithm",
            TokenError::UnknownKid => "unknown_kid",
            TokenError::BadSignature => "bad_signature",
            TokenError::MissingExp => "missing_exp",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::BadAudience => "bad_audience",
            TokenError::BadIssuer => "bad_issuer",
        }
    }
}

/// A key source that cannot be used. Names the file (or JWKS origin) and what is wrong; never
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    InFile { path: PathBuf, reason: String },
    #[error("{origin}: {reason}")]
    Jwks { origin: String, reason: String },
    #[error(
        "the HMAC secret is shorter than {} bytes",
        crate::config::auth::MIN_HMAC_SECRET_BYTES
    )]
    ShortSecret,
    #[error(transparent)]
    Provider(#[from] super::ring_provider::ForeignProvider),
}

impl KeyError {
    /// The same error, naming where the JWKS came from (a URL, for the refresher).
    pub fn with_origin(self, origin: &str) -> KeyError {
        match self {
            KeyError::Jwks { reason, .. } => KeyError::Jwks {
                origin: origin.to_string(),
                reason,
            },
            other => other,
        }
    }
}

/// The key types the edge verifies with; each fixes the algorithms it may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Hmac,
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Family {
    fn allows(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (Family::Hmac, HS256 | HS384 | HS512)
                | (Family::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (Family::P256, ES256)
                | (Family::P384, ES384)
                | (Family::Ed25519, EdDSA)
        )
    }
}

#[derive(Clone)]
struct Key {
    family: Family,
    /// A JWKS key's `alg`: the one algorithm it may be used with.
    alg: Option<Algorithm>,
    decoding: DecodingKey,
}

impl Key {
    fn accepts(&self, alg: Algorithm) -> bool {
        self.family.allows(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("family", &self.family)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// A parsed JWKS: its usable keys by `kid` (and those without one).
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    named: HashMap<String, Key>,
    unnamed: Vec<Key>,
    skipped: usize,
}

impl KeySet {
    /// Usable keys.
    pub fn len(&self) -> usize {
        self.named.len() + self.unnamed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys left out: unsupported `kty`, `crv` or `alg`, `use` other than `sig`, bad encoding,
    /// or a `kid` seen before.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    fn keys(&self) -> impl Iterator<Item = &Key> {
        self.named.values().chain(self.unnamed.iter())
    }
}

/// Verifies tokens against the configured keys and claims. Cheap to share in an `Arc`.
pub struct Verifier {
    /// The HMAC secret and the PEM keys: no `kid`.
    statics: Vec<Key>,
    jwks: RwLock<Arc<KeySet>>,
    jwks_configured: bool,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: Duration,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("static_keys", &self.statics)
            .field("jwks", &self.jwks.read().len())
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("leeway", &self.leeway)
            .finish()
    }
}

impl Verifier {
    /// Loads the secret, the PEM file and a JWKS *file* now. A JWKS URL starts with an empty
    /// set (tokens with a `kid` are refused as `unknown_kid`) until [`Verifier::set_jwks`].
    pub fn new(config: &AuthConfig) -> Result<Verifier, KeyError> {
        super::ring_provider::install()?;
        let mut statics = Vec::new();
        if let Some(secret) = &config.hmac_secret {
            if secret.len() < crate::config::auth::MIN_HMAC_SECRET_BYTES {
                return Err(KeyError::ShortSecret);
            }
            let decoding =
                DecodingKey::from_secret(secret.as_bytes()).map_err(|_| KeyError::ShortSecret)?;
            statics.push(Key {
                family: Family::Hmac,
                alg: None,
                decoding,
            });
        }
        if let Some(path) = &config.public_keys {
            statics.extend(load_pem(path)?);
        }
        let jwks = match &config.jwks {
            Some(JwksSource::File(path)) => read_jwks_file(path)?,
            Some(JwksSource::Url(_)) | None => KeySet::default(),
        };
        Ok(Verifier {
            statics,
            jwks: RwLock::new(Arc::new(jwks)),
            jwks_configured: config.jwks.is_some(),
            audience: config.audience.clone(),
            issuer: config.issuer.clone(),
            leeway: config.leeway,
        })
    }

    /// Any key source configured at all.
    pub fn has_keys(&self) -> bool {
        !self.statics.is_empty() || self.jwks_configured
    }

    /// The clock skew allowed on `exp` and `nbf`: a session's token lapses at `exp` plus this.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Puts a new JWKS in force (the refresher calls this with each good set).
    pub fn set_jwks(&self, keys: KeySet) {
        *self.jwks.write() = Arc::new(keys);
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.verify_at(token, now)
    }

    pub fn verify_at(&self, token: &str, now_unix_secs: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLong);
        }
        if !self.has_keys() {
            return Err(TokenError::NoKeys);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("not three dot-separated parts"));
        };
        let header = parse_header(header)?;
        let alg: Algorithm = header
            .alg
            .parse()
            .map_err(|_| TokenError::Algorithm("not one the edge verifies (none is never)"))?;

        let jwks = self.jwks.read().clone();
        let candidates: Vec<&Key> = match header.kid.as_deref() {
            Some(kid) if self.jwks_configured => {
                let key = jwks.named.get(kid).ok_or(TokenError::UnknownKid)?;
                if !key.accepts(alg) {
                    return Err(TokenError::Algorithm(
                        "the kid names a key of another algorithm",
                    ));
                }
                vec![key]
            }
            _ => {
                let mut keys: Vec<&Key> = self.statics.iter().filter(|k| k.accepts(alg)).collect();
                let mut from_jwks = jwks.keys().filter(|k| k.accepts(alg));
                if let (Some(only), None) = (from_jwks.next(), from_jwks.next()) {
                    keys.push(only);
                }
                keys
            }
        };
        if candidates.is_empty() {
            return Err(TokenError::Algorithm("no configured key is of its family"));
        }

        let mut validation = Validation::new(alg);
        // Time, audience and issuer are checked below, against `now_unix_secs`.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let mut verified = None;
        for key in candidates.into_iter().take(MAX_KEYS_TRIED) {
            match jsonwebtoken::decode::<RawClaims>(token, &key.decoding, &validation) {
                Ok(data) => {
                    verified = Some(data.claims);
                    break;
                }
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature => continue,
                    ErrorKind::InvalidAlgorithm
                    | ErrorKind::InvalidAlgorithmName
                    | ErrorKind::UnsupportedAlgorithm
                    | ErrorKind::MissingAlgorithm
                    | ErrorKind::InvalidKeyFormat => {
                        return Err(TokenError::Algorithm("the key does not fit it"));
                    }
                    ErrorKind::Json(_) => {
                        return Err(TokenError::Malformed("claims are not the expected JSON"));
                    }
                    _ => return Err(TokenError::Malformed("bad encoding or header")),
                },
            }
        }
        let claims = verified.ok_or(TokenError::BadSignature)?;
        self.check_claims(claims, now_unix_secs)
    }

    fn check_claims(&self, c: RawClaims, now: u64) -> Result<Claims, TokenError> {
        let leeway = self.leeway.as_secs();
        let exp = c.exp.ok_or(TokenError::MissingExp)?;
        if now >= exp.saturating_add(leeway) {
            return Err(TokenError::Expired);
        }
        if let Some(nbf) = c.nbf
            && now.saturating_add(leeway) < nbf
        {
            return Err(TokenError::NotYetValid);
        }
        if let Some(want) = &self.audience {
            let ok = match &c.aud {
                Some(Audience::One(a)) => a == want,
                Some(Audience::Many(list)) => list.iter().any(|a| a == want),
                None => false,
            };
            if !ok {
                return Err(TokenError::BadAudience);
            }
        }
        if let Some(want) = &self.issuer
            && c.iss.as_deref() != Some(want.as_str())
        {
            return Err(TokenError::BadIssuer);
        }
        if let Some(sub) = &c.sub
            && (sub.is_empty() || sub.len() > MAX_SUB_BYTES || sub.chars().any(char::is_control))
        {
            return Err(TokenError::Malformed(
                "sub is empty, longer than 256 bytes or has control characters",
            ));
        }
        if let Some(grants) = &c.channels
            && grants.check().is_err()
        {
            return Err(TokenError::Malformed(
                "the channels claim has a bad pattern or too many",
            ));
        }
        Ok(Claims {
            sub: c.sub,
            exp,
            channels: c.channels,
        })
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

fn parse_header(part: &str) -> Result<RawHeader, TokenError> {
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed("header is not base64url"))?;
    serde_json::from_slice(&json).map_err(|_| TokenError::Malformed("header is not a JWT header"))
}

#[derive(Deserialize)]
struct RawClaims {
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<u64>,
    #[serde(default, deserialize_with = "numeric_date")]
    nbf: Option<u64>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    channels: Option<ChannelGrants>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// A JWT NumericDate: seconds since the epoch, an integer or a non-negative fraction.
fn numeric_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    if let Some(v) = n.as_u64() {
        return Ok(Some(v));
    }
    match n.as_f64() {
        Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => Ok(Some(f as u64)),
        _ => Err(serde::de::Error::custom("not a NumericDate")),
    }
}

/// Reads a PEM file of public keys; the number of keys, or what is wrong with it. For config
/// validation: [`Verifier::new`] reads it again.
pub fn read_public_keys(path: &Path) -> Result<usize, KeyError> {
    load_pem(path).map(|keys| keys.len())
}

fn read_capped(path: &Path, cap: usize) -> Result<Vec<u8>, KeyError> {
    let read = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read)?.len();
    if len > cap as u64 {
        return Err(KeyError::InFile {
            path: path.to_owned(),
            reason: format!("is {len} bytes; at most {cap} are read"),
        });
    }
    std::fs::read(path).map_err(read)
}

fn load_pem(path: &Path) -> Result<Vec<Key>, KeyError> {
    let text = read_capped(path, MAX_PEM_BYTES)?;
    parse_pem(&text).map_err(|reason| KeyError::InFile {
        path: path.to_owned(),
        reason,
    })
}

/// DER of the named-curve OIDs in a SubjectPublicKeyInfo.
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

fn parse_pem(text: &[u8]) -> Result<Vec<Key>, String> {
    let blocks = pem::parse_many(text).map_err(|e| format!("is not PEM ({e})"))?;
    if blocks.is_empty() {
        return Err("holds no PEM block; expected one or more PUBLIC KEY blocks".into());
    }
    if blocks.len() > MAX_PEM_KEYS {
        return Err(format!(
            "holds {} PEM blocks; at most {MAX_PEM_KEYS} keys (use a JWKS with kids for more)",
            blocks.len()
        ));
    }
    blocks
        .iter()
        .enumerate()
        .map(|(i, block)| {
            pem_key(block)
                .map_err(|reason| format!("PEM block {} ({}): {reason}", i + 1, block.tag()))
        })
        .collect()
}

fn pem_key(block: &pem::Pem) -> Result<Key, String> {
    match block.tag() {
        "PUBLIC KEY" | "RSA PUBLIC KEY" => {}
        "CERTIFICATE" => {
            return Err(
                "certificates are not read; put the public key here instead \
                        (openssl x509 -in cert.pem -pubkey -noout)"
                    .into(),
            );
        }
        t if t.contains("PRIVATE") => {
            return Err(
                "a private key does not belong on the edge; put only its public key \
                        here (openssl pkey -in key.pem -pubout)"
                    .into(),
            );
        }
        _ => return Err("expected PUBLIC KEY or RSA PUBLIC KEY".into()),
    }
    let one = pem::encode(block);
    if let Ok(k) = DecodingKey::from_rsa_pem(one.as_bytes()) {
        let der = k.try_get_as_bytes().map_err(|_| "not an RSA public key")?;
        let (n, e) = super::ring_provider::rsa_public_components(der)
            .ok_or("not a well-formed RSA public key")?;
        return rsa_key(&n, &e, None);
    }
    if let Ok(k) = DecodingKey::from_ec_pem(one.as_bytes()) {
        let spki = block.contents();
        let contains = |oid: &[u8]| spki.windows(oid.len()).any(|w| w == oid);
        let (family, len) = if contains(OID_P256) {
            (Family::P256, 65)
        } else if contains(OID_P384) {
            (Family::P384, 97)
        } else {
            return Err(
                "an EC key on a curve the edge does not verify (P-256 and P-384 are)".into(),
            );
        };
        let point = k.try_get_as_bytes().map_err(|_| "not an EC public key")?;
        if point.len() != len || point.first() != Some(&4) {
            return Err("not an uncompressed EC point of its curve".into());
        }
        return Ok(Key {
            family,
            alg: None,
            decoding: k,
        });
    }
    if let Ok(k) = DecodingKey::from_ed_pem(one.as_bytes()) {
        if k.try_get_as_bytes().map(<[u8]>::len) != Ok(32) {
            return Err("not an Ed25519 public key".into());
        }
        return Ok(Key {
            family: Family::Ed25519,
            alg: None,
            decoding: k,
        });
    }
    Err("not an RSA, EC (P-256, P-384) or Ed25519 public key".into())
}

fn rsa_key(n: &[u8], e: &[u8], alg: Option<Algorithm>) -> Result<Key, String> {
    let n = &n[n.iter().position(|b| *b != 0).unwrap_or(n.len())..];
    let e = &e[e.iter().position(|b| *b != 0).unwrap_or(e.len())..];
    let bits = n
        .first()
        .map_or(0, |b| (n.len() - 1) * 8 + (8 - b.leading_zeros() as usize));
    if !RSA_BITS.contains(&bits) {
        return Err(format!(
            "an RSA key of {bits} bits; 2048 to 8192 are verified"
        ));
    }
    if e.is_empty() || e.len() > 4 {
        return Err("an RSA key with an exponent the edge does not verify".into());
    }
    Ok(Key {
        family: Family::Rsa,
        alg,
        decoding: DecodingKey::from_rsa_raw_components(n, e),
    })
}

/// Reads and parses a JWKS file.
pub fn read_jwks_file(path: &Path) -> Result<KeySet, KeyError> {
    let json = read_capped(path, MAX_JWKS_BYTES)?;
    parse_jwks(&json).map_err(|e| match e {
        KeyError::Jwks { reason, .. } => KeyError::InFile {
            path: path.to_owned(),
            reason,
        },
        other => other,
    })
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// Parses a JWKS (`{"keys": [...]}`). Keys of unsupported `kty`, `crv` or `alg`, for `use`
/// other than `sig`, badly encoded, or with a `kid` seen before are skipped and counted; a set
/// with no usable key is refused, so a bad fetch never replaces a good set. `oct` (HMAC) keys
/// are skipped: a key set is public.
pub fn parse_jwks(json: &[u8]) -> Result<KeySet, KeyError> {
    let bad = |reason: String| KeyError::Jwks {
        origin: "JWKS".into(),
        reason,
    };
    if json.len() > MAX_JWKS_BYTES {
        return Err(bad(format!("is over {MAX_JWKS_BYTES} bytes")));
    }
    let raw: RawJwks = serde_json::from_slice(json)
        .map_err(|e| bad(format!("is not a JWKS ({{\"keys\": [...]}}): {e}")))?;
    if raw.keys.len() > MAX_JWKS_KEYS {
        return Err(bad(format!(
            "lists {} keys; at most {MAX_JWKS_KEYS}",
            raw.keys.len()
        )));
    }
    let mut set = KeySet::default();
    for value in raw.keys {
        let parsed = serde_json::from_value::<RawJwk>(value)
            .ok()
            .and_then(|jwk| Some((jwk_key(&jwk)?, jwk.kid)));
        match parsed {
            None => set.skipped += 1,
            Some((_, Some(kid))) if kid.len() > MAX_KID_BYTES || set.named.contains_key(&kid) => {
                set.skipped += 1
            }
            Some((key, Some(kid))) => {
                set.named.insert(kid, key);
            }
            Some((key, None)) => set.unnamed.push(key),
        }
    }
    if set.is_empty() {
        return Err(bad(format!(
            "has no usable key ({} skipped; usable are RSA of 2048 to 8192 bits, EC P-256 and \
             P-384, and OKP Ed25519, for use \"sig\")",
            set.skipped
        )));
    }
    Ok(set)
}

fn jwk_key(jwk: &RawJwk) -> Option<Key> {
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return None;
    }
    let alg = match jwk.alg.as_deref() {
        None => None,
        Some(a) => Some(a.parse::<Algorithm>().ok()?),
    };
    // Some producers pad; the JWK spec does not.
    let b64 = |v: &Option<String>| -> Option<Vec<u8>> {
        let engine = base64::engine::GeneralPurpose::new(
            &base64::alphabet::URL_SAFE,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        engine.decode(v.as_deref()?).ok()
    };
    let key = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => rsa_key(&b64(&jwk.n)?, &b64(&jwk.e)?, alg).ok()?,
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let (family, half) = if crv == "P-256" {
                (Family::P256, 32)
            } else {
                (Family::P384, 48)
            };
            let (x, y) = (b64(&jwk.x)?, b64(&jwk.y)?);
            if x.len() != half || y.len() != half {
                return None;
            }
            let mut point = Vec::with_capacity(1 + 2 * half);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Key {
                family,
                alg,
                decoding: DecodingKey::from_ec_der(&point),
            }
        }
        ("OKP", Some("Ed25519")) => {
            let x = b64(&jwk.x)?;
            if x.len() != 32 {
                return None;
            }
            Key {
                family: Family::Ed25519,
                alg,
                decoding: DecodingKey::from_ed_der(&x),
            }
        }
        _ => return None,
    };
    // An `alg` the key's type cannot do is a broken entry, not an instruction.
    if alg.is_some_and(|a| !key.family.allows(a)) {
        return None;
    }
    Some(key)
}

/// Tokens here are minted by `jwt-simple` (pure Rust; a dev-dependency that shares no code with
/// `jsonwebtoken` or ring): its keys are generated per run, except the RSA one, read from
/// `tests/fixtures/auth/rsa-test-only.key.pem` (made with the `openssl` CLI) because RSA key
/// generation in a debug build takes too long. Tokens the library will not mint (`alg: none`,
/// a public key used as an HMAC secret by hand) are assembled from base64 parts.
#[cfg(test)]
mod tests {
    use super::{Claims, KeySet, MAX_TOKEN_BYTES, TokenError, Verifier, parse_jwks};
    use crate::config::{AuthConfig, JwksSource};
    use base64::Engine;
    use jwt_simple::prelude::{
        Duration as JsDuration, ECDSAP256KeyPairLike, ECDSAP256PublicKeyLike, ECDSAP384KeyPairLike,
        ECDSAP384PublicKeyLike, ES256KeyPair, ES384KeyPair, Ed25519KeyPair, EdDSAKeyPairLike,
        HS256Key, JWTClaims, MACLike, PS256KeyPair, RS256KeyPair, RSAKeyPairLike, UnixTimeStamp,
    };
    use serde::Serialize;
    use std::io::Write;
    use std::time::Duration;

    const NOW: u64 = 1_800_000_000;
    const SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!";
    const RSA_KEY: &str = include_str!("../../tests/fixtures/auth/rsa-test-only.key.pem");

    #[derive(Serialize)]
    struct Extra {
        #[serde(skip_serializing_if = "Option::is_none")]
        channels: Option<serde_json::Value>,
    }

    fn claims(exp: Option<u64>) -> JWTClaims<Extra> {
        let mut c = jwt_simple::prelude::Claims::with_custom_claims(
            Extra { channels: None },
            JsDuration::from_secs(60),
        );
        c.expires_at = exp.map(UnixTimeStamp::from_secs);
        c.invalid_before = None;
        c.issued_at = None;
        c.with_subject("alice")
    }

    fn valid() -> JWTClaims<Extra> {
        claims(Some(NOW + 600))
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Keys of every family, made once per test (cheap but for RSA, which is read).
    struct Keys {
        rsa: RS256KeyPair,
        ps: PS256KeyPair,
        es256: ES256KeyPair,
        es384: ES384KeyPair,
        ed: Ed25519KeyPair,
        hs: HS256Key,
    }

    fn keys() -> Keys {
        Keys {
            rsa: RS256KeyPair::from_pem(RSA_KEY).unwrap(),
            ps: PS256KeyPair::from_pem(RSA_KEY).unwrap(),
            es256: ES256KeyPair::generate(),
            es384: ES384KeyPair::generate(),
            ed: Ed25519KeyPair::generate(),
            hs: HS256Key::from_bytes(SECRET.as_bytes()),
        }
    }

    impl Keys {
        fn rsa_pem(&self) -> String {
            self.rsa.public_key().to_pem().unwrap()
        }
        fn es256_pem(&self) -> String {
            self.es256.public_key().to_pem().unwrap()
        }
        fn es384_pem(&self) -> String {
            self.es384.public_key().to_pem().unwrap()
        }
        fn ed_pem(&self) -> String {
            self.ed.public_key().to_pem()
        }
        fn all_pem(&self) -> String {
            [
                self.rsa_pem(),
                self.es256_pem(),
                self.es384_pem(),
                self.ed_pem(),
            ]
            .join("\n")
        }
        /// A JWKS of every public key, each with a kid named after its family.
        fn jwks(&self) -> String {
            let rsa = self.rsa.public_key().to_components();
            let p256 = self.es256.public_key().public_key().to_bytes_uncompressed();
            let p384 = self.es384.public_key().public_key().to_bytes_uncompressed();
            let ed = self.ed.public_key().to_bytes();
            serde_json::json!({"keys": [
                {"kty": "RSA", "kid": "rsa", "use": "sig", "n": b64(&rsa.n), "e": b64(&rsa.e)},
                {"kty": "EC", "kid": "p256", "crv": "P-256", "alg": "ES256",
                 "x": b64(&p256[1..33]), "y": b64(&p256[33..])},
                {"kty": "EC", "kid": "p384", "crv": "P-384",
                 "x": b64(&p384[1..49]), "y": b64(&p384[49..])},
                {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": b64(&ed)},
            ]})
            .to_string()
        }
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn config() -> AuthConfig {
        AuthConfig {
            leeway: Duration::from_secs(30),
            ..AuthConfig::default()
        }
    }

    fn with_pem(pem: &str) -> (Verifier, tempfile::NamedTempFile) {
        let f = file(pem);
        let v = Verifier::new(&AuthConfig {
            public_keys: Some(f.path().to_owned()),
            ..config()
        })
        .unwrap();
        (v, f)
    }

    fn with_jwks(jwks: &str) -> (Verifier, tempfile::NamedTempFile) {
        let f = file(jwks);
        let v = Verifier::new(&AuthConfig {
            jwks: Some(JwksSource::File(f.path().to_owned())),
            ..config()
        })
        .unwrap();
        (v, f)
    }

    fn with_secret() -> Verifier {
        Verifier::new(&AuthConfig {
            hmac_secret: Some(SECRET.into()),
            ..config()
        })
        .unwrap()
    }

    /// A token from raw JSON parts, signed (or not) by `sign`.
    fn assemble(header: &str, claims: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let msg = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let sig = sign(msg.as_bytes());
        format!("{msg}.{}", b64(&sig))
    }

    fn hmac_with(secret: &[u8]) -> impl Fn(&[u8]) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        move |msg| ring::hmac::sign(&key, msg).as_ref().to_vec()
    }

    fn refused(v: &Verifier, token: &str) -> TokenError {
        let e = v.verify_at(token, NOW).unwrap_err();
        // No part of the token in what is shown or counted.
        for part in token.split('.').filter(|p| p.len() >= 8) {
            assert!(!e.to_string().contains(part), "{e}");
        }
        e
    }

    fn accepted(v: &Verifier, token: &str) -> Claims {
        v.verify_at(token, NOW).unwrap()
    }

    #[test]
    fn every_algorithm_verifies_from_pem() {
        let k = keys();
        let (v, _f) = with_pem(&k.all_pem());
        let tokens = [
            k.rsa.sign(valid()).unwrap(),
            k.ps.sign(valid()).unwrap(),
            k.es256.sign(valid()).unwrap(),
            k.es384.sign(valid()).unwrap(),
            k.ed.sign(valid()).unwrap(),
        ];
        for t in &tokens {
            let c = accepted(&v, t);
            assert_eq!(c.sub.as_deref(), Some("alice"));
            assert_eq!(c.exp, NOW + 600);
        }
        let c = accepted(&with_secret(), &k.hs.authenticate(valid()).unwrap());
        assert_eq!(c.sub.as_deref(), Some("alice"));
        // A kid is only a label when no JWKS is configured.
        let kid = ES256KeyPair::from_bytes(&k.es256.to_bytes())
            .unwrap()
            .with_key_id("whatever");
        accepted(&v, &kid.sign(valid()).unwrap());
    }

    #[test]
    fn every_algorithm_verifies_from_jwks_by_kid() {
        let k = keys();
        let (v, _f) = with_jwks(&k.jwks());
        let rsa = RS256KeyPair::from_pem(RSA_KEY).unwrap().with_key_id("rsa");
        let ps = PS256KeyPair::from_pem(RSA_KEY).unwrap().with_key_id("rsa");
        let es256 = ES256KeyPair::from_bytes(&k.es256.to_bytes())
            .unwrap()
            .with_key_id("p256");
        let es384 = ES384KeyPair::from_bytes(&k.es384.to_bytes())
            .unwrap()
            .with_key_id("p384");
        let ed = Ed25519KeyPair::from_bytes(&k.ed.to_bytes())
            .unwrap()
            .with_key_id("ed");
        for t in [
            rsa.sign(valid()).unwrap(),
            ps.sign(valid()).unwrap(),
            es256.sign(valid()).unwrap(),
            es384.sign(valid()).unwrap(),
            ed.sign(valid()).unwrap(),
        ] {
            accepted(&v, &t);
        }
        // No kid: the set's one key of the family is tried.
        accepted(&v, &k.ed.sign(valid()).unwrap());
    }

    #[test]
    fn time_claims_with_leeway() {
        let k = keys();
        let v = with_secret();
        let sign = |c| k.hs.authenticate(c).unwrap();
        // exp 20s ago: within the 30s leeway.
        accepted(&v, &sign(claims(Some(NOW - 20))));
        let e = refused(&v, &sign(claims(Some(NOW - 31))));
        assert_eq!(e.reason(), "expired");
        let e = refused(&v, &sign(claims(Some(NOW - 30))));
        assert_eq!(e.reason(), "expired");
        let e = refused(&v, &sign(claims(None)));
        assert_eq!(e.reason(), "missing_exp");
        let mut early = valid();
        early.invalid_before = Some(UnixTimeStamp::from_secs(NOW + 20));
        accepted(&v, &sign(early));
        let mut future = valid();
        future.invalid_before = Some(UnixTimeStamp::from_secs(NOW + 31));
        assert_eq!(refused(&v, &sign(future)).reason(), "not_yet_valid");
        // A fractional exp is a NumericDate too; a string is not.
        let t = assemble(
            r#"{"alg":"HS256"}"#,
            &format!(r#"{{"exp":{}.5}}"#, NOW + 5),
            hmac_with(SECRET.as_bytes()),
        );
        assert_eq!(accepted(&v, &t).exp, NOW + 5);
        let t = assemble(
            r#"{"alg":"HS256"}"#,
            &format!(r#"{{"exp":"{}"}}"#, NOW + 5),
            hmac_with(SECRET.as_bytes()),
        );
        assert_eq!(refused(&v, &t).reason(), "malformed");
    }

    #[test]
    fn audience_and_issuer_when_configured() {
        let k = keys();
        let v = Verifier::new(&AuthConfig {
            hmac_secret: Some(SECRET.into()),
            audience: Some("edge".into()),
            issuer: Some("https://idp.example".into()),
            ..config()
        })
        .unwrap();
        let sign = |c| k.hs.authenticate(c).unwrap();
        let good = || {
            valid()
                .with_audience("edge")
                .with_issuer("https://idp.example")
        };
        accepted(&v, &sign(good()));
        let many = valid()
            .with_audiences(["other", "edge"].into_iter().collect())
            .with_issuer("https://idp.example");
        accepted(&v, &sign(many));
        let wrong_aud = valid()
            .with_audience("other")
            .with_issuer("https://idp.example");
        assert_eq!(refused(&v, &sign(wrong_aud)).reason(), "bad_audience");
        let no_aud = valid().with_issuer("https://idp.example");
        assert_eq!(refused(&v, &sign(no_aud)).reason(), "bad_audience");
        let wrong_iss = valid().with_audience("edge").with_issuer("https://evil");
        assert_eq!(refused(&v, &sign(wrong_iss)).reason(), "bad_issuer");
        let no_iss = valid().with_audience("edge");
        assert_eq!(refused(&v, &sign(no_iss)).reason(), "bad_issuer");
        // Not configured: not checked.
        accepted(&with_secret(), &sign(valid().with_audience("anything")));
    }

    #[test]
    fn alg_none_is_refused() {
        let v = with_secret();
        let body = format!(r#"{{"sub":"alice","exp":{}}}"#, NOW + 600);
        for alg in ["none", "None", "NONE", "nOnE", "", "HS1", "RS1"] {
            let header = format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#);
            for sign in [|_: &[u8]| Vec::new(), |_: &[u8]| b"x".to_vec()] {
                let t = assemble(&header, &body, sign);
                assert_eq!(refused(&v, &t).reason(), "algorithm", "{alg}");
            }
        }
    }

    #[test]
    fn a_public_key_used_as_an_hmac_secret_is_refused() {
        let k = keys();
        let (pem_only, _f) = with_pem(&k.all_pem());
        let both = {
            let f = file(&k.all_pem());
            let v = Verifier::new(&AuthConfig {
                hmac_secret: Some(SECRET.into()),
                public_keys: Some(f.path().to_owned()),
                ..config()
            })
            .unwrap();
            (v, f)
        };
        let (jwks, _g) = with_jwks(&k.jwks());
        for pem in [k.rsa_pem(), k.es256_pem(), k.es384_pem(), k.ed_pem()] {
            // Minted by the independent library, with the PEM text as its HMAC key.
            let forged = HS256Key::from_bytes(pem.as_bytes())
                .authenticate(valid())
                .unwrap();
            assert_eq!(refused(&pem_only, &forged).reason(), "algorithm");
            assert_eq!(refused(&both.0, &forged).reason(), "bad_signature");
            assert_eq!(refused(&jwks, &forged).reason(), "algorithm");
        }
        // The same through a kid that names a public key.
        let rsa = k.rsa.public_key().to_components();
        for secret in [rsa.n.as_slice(), k.rsa_pem().as_bytes()] {
            let forged = HS256Key::from_bytes(secret)
                .with_key_id("rsa")
                .authenticate(valid())
                .unwrap();
            assert_eq!(refused(&jwks, &forged).reason(), "algorithm");
        }
    }

    #[test]
    fn kids_must_be_known_and_of_the_tokens_family() {
        let k = keys();
        let (v, _f) = with_jwks(&k.jwks());
        let unknown = ES256KeyPair::from_bytes(&k.es256.to_bytes())
            .unwrap()
            .with_key_id("gone");
        assert_eq!(
            refused(&v, &unknown.sign(valid()).unwrap()).reason(),
            "unknown_kid"
        );
        // An RS256 token whose kid names the EC key.
        let crossed = RS256KeyPair::from_pem(RSA_KEY).unwrap().with_key_id("p256");
        assert_eq!(
            refused(&v, &crossed.sign(valid()).unwrap()).reason(),
            "algorithm"
        );
        // The p256 entry says alg ES256; P-256 can do nothing else anyway. The RSA entry has no
        // alg: RS256 and PS256 both verified above. An entry pinned to RS256 refuses PS256.
        let rsa = k.rsa.public_key().to_components();
        let pinned = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "rsa", "alg": "RS256", "n": b64(&rsa.n), "e": b64(&rsa.e)}
        ]})
        .to_string();
        let (v, _g) = with_jwks(&pinned);
        let ps = PS256KeyPair::from_pem(RSA_KEY).unwrap().with_key_id("rsa");
        assert_eq!(
            refused(&v, &ps.sign(valid()).unwrap()).reason(),
            "algorithm"
        );
        let rs = RS256KeyPair::from_pem(RSA_KEY).unwrap().with_key_id("rsa");
        accepted(&v, &rs.sign(valid()).unwrap());
    }

    #[test]
    fn bad_signatures_are_refused() {
        let k = keys();
        let (v, _f) = with_pem(&k.all_pem());
        for t in [
            ES256KeyPair::generate().sign(valid()).unwrap(),
            ES384KeyPair::generate().sign(valid()).unwrap(),
            Ed25519KeyPair::generate().sign(valid()).unwrap(),
        ] {
            assert_eq!(refused(&v, &t).reason(), "bad_signature");
        }
        let t = HS256Key::from_bytes(b"another-secret-of-at-least-32-bytes")
            .authenticate(valid())
            .unwrap();
        assert_eq!(refused(&with_secret(), &t).reason(), "bad_signature");
        // Claims swapped under a good signature.
        let good = k.ed.sign(valid()).unwrap();
        let other = k.ed.sign(claims(Some(NOW + 9999))).unwrap();
        let parts: Vec<&str> = good.split('.').collect();
        let other_parts: Vec<&str> = other.split('.').collect();
        let swapped = format!("{}.{}.{}", parts[0], other_parts[1], parts[2]);
        assert_eq!(refused(&v, &swapped).reason(), "bad_signature");
    }

    #[test]
    fn garbage_and_oversize_are_refused() {
        let k = keys();
        let v = with_secret();
        let good = k.hs.authenticate(valid()).unwrap();
        for t in [
            "",
            ".",
            "..",
            "a.b.c",
            "a.b.c.d",
            "not a token",
            &good[..good.len() / 2],
            &good[..good.rfind('.').unwrap()],
            &format!("{good}.extra"),
            &format!("{good}!"),
        ] {
            let e = refused(&v, t);
            assert!(
                matches!(e.reason(), "malformed" | "bad_signature"),
                "{t:?}: {e}"
            );
        }
        let huge = format!(
            "{}.{}.sig",
            b64(br#"{"alg":"HS256"}"#),
            "A".repeat(MAX_TOKEN_BYTES)
        );
        assert_eq!(refused(&v, &huge).reason(), "too_long");
        assert_eq!(
            refused(&v, &"x".repeat(MAX_TOKEN_BYTES + 1)).reason(),
            "too_long"
        );
        // A good signature over claims that are not an object.
        let t = assemble(r#"{"alg":"HS256"}"#, "[1,2]", hmac_with(SECRET.as_bytes()));
        assert_eq!(refused(&v, &t).reason(), "malformed");
        // Unknown critical header extensions are refused.
        let t = assemble(
            r#"{"alg":"HS256","crit":["exp2"],"exp2":1}"#,
            &format!(r#"{{"exp":{}}}"#, NOW + 5),
            hmac_with(SECRET.as_bytes()),
        );
        assert!(v.verify_at(&t, NOW).is_err());
    }

    #[test]
    fn a_verifier_is_shared_across_tasks() {
        fn shared<T: Send + Sync + 'static>() {}
        shared::<Verifier>();
        shared::<std::sync::Arc<Verifier>>();
    }

    #[test]
    fn no_keys_refuses_everything() {
        let v = Verifier::new(&config()).unwrap();
        assert!(!v.has_keys());
        let t = keys().hs.authenticate(valid()).unwrap();
        assert_eq!(refused(&v, &t).reason(), "no_keys");
    }

    #[test]
    fn subject_and_channels_claims() {
        let v = with_secret();
        let sign =
            |claims: &str| assemble(r#"{"alg":"HS256"}"#, claims, hmac_with(SECRET.as_bytes()));
        let exp = NOW + 60;
        let c = accepted(
            &v,
            &sign(&format!(
                r#"{{"exp":{exp},"channels":{{"subscribe":["chat:*","prices"],"publish":["chat:1"]}}}}"#
            )),
        );
        assert_eq!(c.sub, None);
        let grants = c.channels.unwrap();
        assert_eq!(grants.subscribe, ["chat:*", "prices"]);
        assert_eq!(grants.publish, ["chat:1"]);
        for bad in [
            r#"{"subscribe":["chat *"]}"#,
            r#"{"publish":["*chat"]}"#,
            r#"{"subscribe":[""]}"#,
            r#"{"subscribe":"chat:*"}"#,
            r#"{"subscribe":[1]}"#,
        ] {
            let e = refused(&v, &sign(&format!(r#"{{"exp":{exp},"channels":{bad}}}"#)));
            assert_eq!(e.reason(), "malformed", "{bad}");
        }
        let many: Vec<String> = (0..257).map(|i| format!("c{i}")).collect();
        let e = refused(
            &v,
            &sign(&format!(
                r#"{{"exp":{exp},"channels":{{"subscribe":{}}}}}"#,
                serde_json::to_string(&many).unwrap()
            )),
        );
        assert_eq!(e.reason(), "malformed");
        for sub in [
            "\"a\\nb\"",
            "\"\"",
            &format!("\"{}\"", "u".repeat(257)),
            "42",
        ] {
            let e = refused(&v, &sign(&format!(r#"{{"exp":{exp},"sub":{sub}}}"#)));
            assert_eq!(e.reason(), "malformed", "{sub}");
        }
        let c = accepted(
            &v,
            &sign(&format!(r#"{{"exp":{exp},"sub":"{}"}}"#, "u".repeat(256))),
        );
        assert_eq!(c.sub.map(|s| s.len()), Some(256));
    }

    #[test]
    fn set_jwks_replaces_the_set() {
        let k = keys();
        let (v, _f) = with_jwks(&k.jwks());
        let old = Ed25519KeyPair::from_bytes(&k.ed.to_bytes())
            .unwrap()
            .with_key_id("ed");
        let old_token = old.sign(valid()).unwrap();
        accepted(&v, &old_token);
        let next = Ed25519KeyPair::generate().with_key_id("ed-2");
        let set = parse_jwks(
            serde_json::json!({"keys": [
                {"kty": "OKP", "kid": "ed-2", "crv": "Ed25519",
                 "x": b64(&next.public_key().to_bytes())}
            ]})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        v.set_jwks(set);
        assert_eq!(refused(&v, &old_token).reason(), "unknown_kid");
        accepted(&v, &next.sign(valid()).unwrap());
    }

    #[test]
    fn a_jwks_url_starts_empty() {
        let v = Verifier::new(&AuthConfig {
            jwks: Some(JwksSource::Url("https://idp.example/jwks".into())),
            ..config()
        })
        .unwrap();
        assert!(v.has_keys());
        let t = ES256KeyPair::generate()
            .with_key_id("k")
            .sign(valid())
            .unwrap();
        assert_eq!(refused(&v, &t).reason(), "unknown_kid");
        let t = ES256KeyPair::generate().sign(valid()).unwrap();
        assert_eq!(refused(&v, &t).reason(), "algorithm");
    }

    #[test]
    fn jwks_parsing_skips_and_counts() {
        let k = keys();
        let ed = b64(&k.ed.public_key().to_bytes());
        let json = serde_json::json!({"keys": [
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": ed},
            {"kty": "OKP", "kid": "ed", "crv": "Ed25519", "x": ed},
            {"kty": "oct", "kid": "h", "k": b64(SECRET.as_bytes())},
            {"kty": "OKP", "kid": "enc", "use": "enc", "crv": "Ed25519", "x": ed},
            {"kty": "OKP", "kid": "x448", "crv": "Ed448", "x": ed},
            {"kty": "OKP", "kid": "short", "crv": "Ed25519", "x": b64(b"short")},
            {"kty": "OKP", "kid": "wrong-alg", "alg": "RS256", "crv": "Ed25519", "x": ed},
            {"kty": "RSA", "kid": "rsa-no-n", "e": "AQAB"},
            {"kty": "EC", "kid": "k1", "crv": "secp256k1", "x": ed, "y": ed},
            {"kty": "XYZ"},
            "not an object",
        ]});
        let set = parse_jwks(json.to_string().as_bytes()).unwrap();
        assert_eq!((set.len(), set.skipped()), (1, 10));
        for bad in [
            &b"{}"[..],
            b"[]",
            b"not json",
            br#"{"keys": []}"#,
            br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#,
        ] {
            let e = parse_jwks(bad).unwrap_err();
            assert!(e.to_string().starts_with("JWKS:"), "{e}");
        }
        let too_many: Vec<_> = (0..65)
            .map(|i| serde_json::json!({"kty": "OKP", "kid": format!("k{i}"), "crv": "Ed25519", "x": ed}))
            .collect();
        assert!(parse_jwks(serde_json::json!({"keys": too_many}).to_string().as_bytes()).is_err());
        let e = parse_jwks(b"{}")
            .unwrap_err()
            .with_origin("https://idp.example/jwks");
        assert!(
            e.to_string().starts_with("https://idp.example/jwks:"),
            "{e}"
        );
        assert!(KeySet::default().is_empty());
    }

    #[test]
    fn pem_files_that_do_not_fit_are_named() {
        let fixture = |name: &str| {
            std::fs::read_to_string(format!(
                "{}/tests/fixtures/auth/{name}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap()
        };
        for (text, expect) in [
            (fixture("rsa1024.pub.pem"), "1024 bits"),
            (fixture("p521.pub.pem"), "P-256 and P-384"),
            (fixture("cert.pem"), "certificates are not read"),
            (fixture("rsa-test-only.key.pem"), "private key"),
            ("no pem here".to_string(), "no PEM block"),
            (fixture("ed25519.pub.pem").repeat(9), "at most 8"),
        ] {
            let f = file(&text);
            let e = super::read_public_keys(f.path()).unwrap_err().to_string();
            assert!(e.contains(expect), "{e}");
            assert!(e.contains(&f.path().display().to_string()), "{e}");
            assert!(!e.contains("MII"), "{e}");
        }
        let f = file(&(fixture("ed25519.pub.pem") + &fixture("rsa.pub.pem")));
        assert_eq!(super::read_public_keys(f.path()).unwrap(), 2);
        let e = super::read_public_keys(std::path::Path::new("/nonexistent/keys.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/keys.pem"), "{e}");
    }

    /// Mutated and random tokens: refused or accepted, never a panic.
    #[test]
    fn nothing_panics_on_mutated_tokens() {
        let k = keys();
        let f = file(&k.all_pem());
        let g = file(&k.jwks());
        let v = Verifier::new(&AuthConfig {
            hmac_secret: Some(SECRET.into()),
            public_keys: Some(f.path().to_owned()),
            jwks: Some(JwksSource::File(g.path().to_owned())),
            audience: Some("edge".into()),
            ..config()
        })
        .unwrap();
        let seeds = [
            k.hs.authenticate(valid()).unwrap(),
            k.es256.sign(valid()).unwrap(),
            k.ed.sign(valid()).unwrap(),
            k.rsa.sign(valid()).unwrap(),
            assemble(r#"{"alg":"none"}"#, "{}", |_| Vec::new()),
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"AZaz09-_.=+/ {}\"\\\x00\xff";
        for seed in &seeds {
            for _ in 0..300 {
                let mut bytes = seed.as_bytes().to_vec();
                for _ in 0..=(next() % 4) {
                    let i = (next() as usize) % bytes.len();
                    match next() % 3 {
                        0 => bytes[i] = alphabet[(next() as usize) % alphabet.len()],
                        1 => {
                            bytes.remove(i);
                        }
                        _ => bytes.insert(i, alphabet[(next() as usize) % alphabet.len()]),
                    }
                    if bytes.is_empty() {
                        break;
                    }
                }
                let t = String::from_utf8_lossy(&bytes);
                let _ = v.verify_at(&t, NOW);
                let _ = v.verify_at(&t, u64::MAX);
                let _ = v.verify_at(&t, 0);
            }
        }
        for _ in 0..500 {
            let len = (next() % 300) as usize;
            let t: String = (0..len)
                .map(|_| alphabet[(next() as usize) % alphabet.len()] as char)
                .collect();
            let _ = v.verify_at(&t, NOW);
        }
        // Extreme claim values under a good signature.
        for body in [
            r#"{"exp":18446744073709551615,"nbf":18446744073709551615}"#,
            r#"{"exp":1e308}"#,
            r#"{"exp":-1}"#,
            r#"{"exp":null,"aud":[[]]}"#,
            r#"{"exp":1,"aud":{"a":1}}"#,
        ] {
            let t = assemble(r#"{"alg":"HS256"}"#, body, hmac_with(SECRET.as_bytes()));
            let _ = v.verify_at(&t, NOW);
            let _ = v.verify_at(&t, u64::MAX);
        }
    }
}
