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
