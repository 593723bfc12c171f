//! The `jsonwebtoken` crypto provider on `ring`: signature checks for HS256/384/512,
//! RS256/384/512, PS256/384/512, ES256, ES384 and EdDSA (Ed25519).
//!
//! Why this file exists: `jsonwebtoken` 12 keeps its crypto behind
//! [`jsonwebtoken::crypto::CryptoProvider`], and its own backends are aws-lc-rs and RustCrypto.
//! The edge already ships `ring` (rustls, quinn and rcgen use it), so a few lines of adapter
//! cost less than a second crypto stack to build, audit and keep patched.
//!
//! It owns only signature verification and the key arithmetic `jsonwebtoken` may ask its
//! provider for. It never picks a key or an algorithm: [`super::token`] does, and checks that a
//! key's family fits the token's algorithm before anything here runs. The edge never signs, so
//! the signer factory refuses every algorithm.

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::signature as sig;

/// The provider [`install`] puts in force.
pub static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: rsa_components_from_private_key,
        rsa_pub_components_from_public_key: rsa_components_from_public_key,
        ec_pub_components_from_private_key: ec_components_from_private_key,
        ed_pub_components_from_private_key: ed_component_from_private_key,
        compute_digest,
    },
};

/// Another `jsonwebtoken` provider was installed first; tokens would be checked by code this
/// module does not know.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("another jsonwebtoken crypto provider is installed in this process")]
pub struct ForeignProvider;

/// Makes [`PROVIDER`] the process's `jsonwebtoken` provider. Idempotent; it fails only when a
/// different provider got there first.
pub fn install() -> Result<(), ForeignProvider> {
    static INSTALLED: std::sync::OnceLock<Result<(), ForeignProvider>> = std::sync::OnceLock::new();
    *INSTALLED.get_or_init(|| match PROVIDER.install_default() {
        Ok(()) => Ok(()),
        Err(existing) if std::ptr::eq(existing, &PROVIDER) => Ok(()),
        Err(_) => Err(ForeignProvider),
    })
}

fn new_signer(_alg: &Algorithm, _key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    Err(ErrorKind::Signing("the edge verifies tokens and never signs them".into()).into())
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    // The second guard against algorithm confusion (token.rs is the first): an HMAC algorithm
    // never gets a public key as its secret, nor a public-key algorithm a secret.
    if key.family() != alg.family() {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    Ok(Box::new(RingVerifier {
        alg: *alg,
        key: key.clone(),
    }))
}

struct RingVerifier {
    alg: Algorithm,
    key: DecodingKey,
}

impl signature::Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        if verify(self.alg, &self.key, msg, signature) {
            Ok(())
        } else {
            Err(signature::Error::new())
        }
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// Whether `signature` over `msg` verifies with `key` under `alg`. Every malformed key or
/// signature is simply `false`.
pub fn verify(alg: Algorithm, key: &DecodingKey, msg: &[u8], signature: &[u8]) -> bool {
    use Algorithm::*;
    let unparsed = |algorithm: &'static dyn sig::VerificationAlgorithm| match key.kind() {
        DecodingKeyKind::SecretOrDer(bytes) => sig::UnparsedPublicKey::new(algorithm, bytes)
            .verify(msg, signature)
            .is_ok(),
        DecodingKeyKind::RsaModulusExponent { .. } => false,
    };
    let rsa = |params: &'static sig::RsaParameters| match key.kind() {
        DecodingKeyKind::SecretOrDer(der) => sig::UnparsedPublicKey::new(params, der)
            .verify(msg, signature)
            .is_ok(),
        DecodingKeyKind::RsaModulusExponent { n, e } => sig::RsaPublicKeyComponents {
            n: n.as_slice(),
            e: e.as_slice(),
        }
        .verify(params, msg, signature)
        .is_ok(),
    };
    let hmac = |algorithm: ring::hmac::Algorithm| match key.kind() {
        // Constant-time comparison inside ring.
        DecodingKeyKind::SecretOrDer(secret) => {
            ring::hmac::verify(&ring::hmac::Key::new(algorithm, secret), msg, signature).is_ok()
        }
        DecodingKeyKind::RsaModulusExponent { .. } => false,
    };
    match (alg, key.family()) {
        (HS256, AlgorithmFamily::Hmac) => hmac(ring::hmac::HMAC_SHA256),
        (HS384, AlgorithmFamily::Hmac) => hmac(ring::hmac::HMAC_SHA384),
        (HS512, AlgorithmFamily::Hmac) => hmac(ring::hmac::HMAC_SHA512),
        (RS256, AlgorithmFamily::Rsa) => rsa(&sig::RSA_PKCS1_2048_8192_SHA256),
        (RS384, AlgorithmFamily::Rsa) => rsa(&sig::RSA_PKCS1_2048_8192_SHA384),
        (RS512, AlgorithmFamily::Rsa) => rsa(&sig::RSA_PKCS1_2048_8192_SHA512),
        (PS256, AlgorithmFamily::Rsa) => rsa(&sig::RSA_PSS_2048_8192_SHA256),
        (PS384, AlgorithmFamily::Rsa) => rsa(&sig::RSA_PSS_2048_8192_SHA384),
        (PS512, AlgorithmFamily::Rsa) => rsa(&sig::RSA_PSS_2048_8192_SHA512),
        (ES256, AlgorithmFamily::Ec) => unparsed(&sig::ECDSA_P256_SHA256_FIXED),
        (ES384, AlgorithmFamily::Ec) => unparsed(&sig::ECDSA_P384_SHA384_FIXED),
        (EdDSA, AlgorithmFamily::Ed) => unparsed(&sig::ED25519),
        _ => false,
    }
}

/// `(n, e)` of a PKCS#1 `RSAPublicKey` (`SEQUENCE { INTEGER n, INTEGER e }`), big-endian without
/// leading zeros, or `None` for anything else (trailing bytes included).
pub fn rsa_public_components(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (tag, body, rest) = der_element(der)?;
    if tag != 0x30 || !rest.is_empty() {
        return None;
    }
    let (tag_n, n, rest) = der_element(body)?;
    let (tag_e, e, rest) = der_element(rest)?;
    if tag_n != 0x02 || tag_e != 0x02 || !rest.is_empty() {
        return None;
    }
    let positive = |v: &[u8]| -> Option<Vec<u8>> {
        // A negative INTEGER is no modulus or exponent.
        if v.first().is_none_or(|b| b & 0x80 != 0) {
            return None;
        }
        let start = v.iter().position(|b| *b != 0)?;
        Some(v[start..].to_vec())
    };
    Some((positive(n)?, positive(e)?))
}

/// One DER element: its tag, its contents and what follows it. Definite lengths of at most four
/// bytes only, which covers every key size ring accepts.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, after) = rest.split_at(count);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
    };
    if rest.len() < len {
        return None;
    }
    let (body, after) = rest.split_at(len);
    Some((tag, body, after))
}

fn rsa_components_from_public_key(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
    rsa_public_components(der)
        .ok_or_else(|| ErrorKind::InvalidRsaKey("not a PKCS#1 RSA public key".into()).into())
}

fn rsa_components_from_private_key(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let pair = sig::RsaKeyPair::from_der(der)
        .map_err(|e| Error::from(ErrorKind::InvalidRsaKey(e.to_string())))?;
    // ring hands out the public half as PKCS#1 DER.
    rsa_components_from_public_key(pair.public().as_ref())
}

fn ec_components_from_private_key(
    der: &[u8],
    alg: Algorithm,
) -> Result<(EllipticCurve, Vec<u8>, Vec<u8>), Error> {
    let (signing, curve, half) = match alg {
        Algorithm::ES256 => (
            &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            EllipticCurve::P256,
            32,
        ),
        Algorithm::ES384 => (
            &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
            EllipticCurve::P384,
            48,
        ),
        _ => return Err(ErrorKind::InvalidEcdsaKey.into()),
    };
    let rng = ring::rand::SystemRandom::new();
    let pair = sig::EcdsaKeyPair::from_pkcs8(signing, der, &rng)
        .map_err(|_| Error::from(ErrorKind::InvalidEcdsaKey))?;
    let point = sig::KeyPair::public_key(&pair).as_ref();
    match point.split_first() {
        Some((4, xy)) if xy.len() == 2 * half => {
            let (x, y) = xy.split_at(half);
            Ok((curve, x.to_vec(), y.to_vec()))
        }
        _ => Err(ErrorKind::InvalidEcdsaKey.into()),
    }
}

fn ed_component_from_private_key(der: &[u8], curve: &EllipticCurve) -> Result<Vec<u8>, Error> {
    if *curve != EllipticCurve::Ed25519 {
        return Err(ErrorKind::InvalidEddsaKey.into());
    }
    let pair = sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
        .map_err(|_| Error::from(ErrorKind::InvalidEddsaKey))?;
    Ok(sig::KeyPair::public_key(&pair).as_ref().to_vec())
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>, Error> {
    let algorithm = match hash {
        ThumbprintHash::SHA256 => &ring::digest::SHA256,
        ThumbprintHash::SHA384 => &ring::digest::SHA384,
        ThumbprintHash::SHA512 => &ring::digest::SHA512,
        _ => {
            return Err(ErrorKind::Provider("thumbprint hash not provided".into()).into());
        }
    };
    Ok(ring::digest::digest(algorithm, data).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installing_twice_is_fine() {
        assert!(install().is_ok());
        assert!(install().is_ok());
    }

    #[test]
    fn signing_is_refused_not_panicking() {
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef").unwrap();
        assert!(new_signer(&Algorithm::HS256, &key).is_err());
    }

    #[test]
    fn a_key_of_another_family_gets_no_verifier() {
        let secret = DecodingKey::from_secret(b"0123456789abcdef0123456789abcdef").unwrap();
        assert!(new_verifier(&Algorithm::RS256, &secret).is_err());
        let ed = DecodingKey::from_ed_der(&[0u8; 32]);
        assert!(new_verifier(&Algorithm::HS256, &ed).is_err());
        assert!(new_verifier(&Algorithm::EdDSA, &ed).is_ok());
    }

    #[test]
    fn hmac_verifies_what_ring_signs_and_nothing_else() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let key = DecodingKey::from_secret(secret).unwrap();
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            b"msg",
        );
        assert!(verify(Algorithm::HS256, &key, b"msg", tag.as_ref()));
        assert!(!verify(Algorithm::HS256, &key, b"msh", tag.as_ref()));
        assert!(!verify(Algorithm::HS384, &key, b"msg", tag.as_ref()));
        assert!(!verify(Algorithm::HS256, &key, b"msg", &tag.as_ref()[..31]));
    }

    #[test]
    fn der_reader_takes_only_an_rsa_public_key() {
        // SEQUENCE { INTEGER 0x00C1, INTEGER 3 }
        let der = [0x30, 0x07, 0x02, 0x02, 0x00, 0xc1, 0x02, 0x01, 0x03];
        assert_eq!(rsa_public_components(&der), Some((vec![0xc1], vec![0x03])));
        assert_eq!(rsa_public_components(&der[..8]), None);
        let mut trailing = der.to_vec();
        trailing.push(0);
        assert_eq!(rsa_public_components(&trailing), None);
        // Negative modulus.
        let neg = [0x30, 0x06, 0x02, 0x01, 0x81, 0x02, 0x01, 0x03];
        assert_eq!(rsa_public_components(&neg), None);
        // Every prefix and every single-byte change of a valid key: no panic.
        for cut in 0..der.len() {
            let _ = rsa_public_components(&der[..cut]);
        }
        for i in 0..der.len() {
            for b in [0x00, 0x7f, 0x80, 0x84, 0xff] {
                let mut m = der.to_vec();
                m[i] = b;
                let _ = rsa_public_components(&m);
            }
        }
        assert_eq!(
            rsa_public_components(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    #[test]
    fn key_utils_answer_errors_not_panics() {
        assert!(rsa_components_from_private_key(b"junk").is_err());
        assert!(rsa_components_from_public_key(b"junk").is_err());
        assert!(ec_components_from_private_key(b"junk", Algorithm::ES256).is_err());
        assert!(ec_components_from_private_key(b"junk", Algorithm::HS256).is_err());
        assert!(ed_component_from_private_key(b"junk", &EllipticCurve::Ed25519).is_err());
        assert_eq!(
            compute_digest(b"abc", ThumbprintHash::SHA256)
                .unwrap()
                .len(),
            32
        );
    }
}
