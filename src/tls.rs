//! TLS for the public listeners: the rustls server config, certificates from PEM files, and the
//! self-signed dev certificate used when none is configured.
//!
//! This module owns certificate material and the crypto provider choice (ring, the one provider
//! in the tree, installed once). It does not accept connections; the server does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::config::TlsConfig;

/// Browsers accept a certificate pinned with WebTransport `serverCertificateHashes` only if it is
/// valid for at most 14 days; stay a day under.
pub const DEV_CERT_VALIDITY: Duration = Duration::from_secs(13 * 24 * 3600);

/// ALPN protocols on the TCP listener, preferred first.
pub const TCP_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// HTTP/3, which WebTransport runs on.
pub const QUIC_ALPN: &[u8] = b"h3";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read {what}: {reason}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("{path}: holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("certificate and key do not make a usable TLS config: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot generate the dev certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: cannot write the dev certificate: {source}")]
    WriteDevCert {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The self-signed certificate made at start when no certificate is configured.
#[derive(Debug, Clone)]
pub struct DevCert {
    pub pem: String,
    pub der: CertificateDer<'static>,
    /// SHA-256 of the DER certificate, lowercase hex: what WebTransport `serverCertificateHashes`
    /// and `openssl x509 -fingerprint -sha256` show.
    pub sha256_hex: String,
    pub written_to: PathBuf,
}

/// Installs ring as the process-wide rustls provider. Idempotent: a second call (tests start
/// many edges in one process) finds it installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS configs of one edge: the same certificate for TCP (HTTP/1.1 and HTTP/2) and for QUIC
/// (HTTP/3, TLS 1.3 only).
#[derive(Debug)]
pub struct TlsSetup {
    pub tcp: Arc<ServerConfig>,
    pub quic: ServerConfig,
    pub dev: Option<DevCert>,
}

/// Builds the server configs for the TCP and QUIC listeners. With [`TlsConfig::Dev`], generates
/// the dev certificate and writes its PEM.
pub fn server_config(cfg: &TlsConfig) -> Result<TlsSetup, TlsError> {
    install_crypto_provider();
    let (certs, key, dev) = match cfg {
        TlsConfig::Files { cert, key } => {
            let certs = load_certs(cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
                path: key.clone(),
                what: "a private key",
                reason: e.to_string(),
            })?;
            (certs, key, None)
        }
        TlsConfig::Dev { cert_path } => {
            let (dev, key) = generate_dev_cert(cert_path)?;
            (vec![dev.der.clone()], key, Some(dev))
        }
    };
    let mut quic = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_no_client_auth()
        .with_single_cert(certs.clone(), key.clone_key())?;
    quic.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    let mut tcp = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tcp.alpn_protocols = TCP_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(TlsSetup {
        tcp: Arc::new(tcp),
        quic,
        dev,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: "certificates",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// ECDSA P-256 for `localhost`, `127.0.0.1` and `::1`, valid for [`DEV_CERT_VALIDITY`].
pub fn generate_dev_cert(write_to: &Path) -> Result<(DevCert, PrivateKeyDer<'static>), TlsError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edgeplex dev certificate");
    // Backdated a minute for clock skew, counted inside the validity so the total stays under
    // what browsers accept for pinned certificates.
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(1);
    params.not_after =
        params.not_before + time::Duration::seconds(DEV_CERT_VALIDITY.as_secs() as i64);
    let cert = params.self_signed(&key)?;
    let pem = cert.pem();
    std::fs::write(write_to, &pem).map_err(|source| TlsError::WriteDevCert {
        path: write_to.to_owned(),
        source,
    })?;
    let der = cert.der().clone();
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    let sha256_hex = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((
        DevCert {
            pem,
            der,
            sha256_hex,
            written_to: write_to.to_owned(),
        },
        key,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_cert_is_short_lived_and_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.pem");
        let setup = server_config(&TlsConfig::Dev {
            cert_path: path.clone(),
        })
        .unwrap();
        let (config, dev) = (setup.tcp, setup.dev.unwrap());
        assert_eq!(setup.quic.alpn_protocols, vec![b"h3".to_vec()]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), dev.pem);
        assert_eq!(dev.sha256_hex.len(), 64);
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        // The PEM we wrote loads back as the certificate we serve.
        assert_eq!(load_certs(&path).unwrap(), vec![dev.der.clone()]);
    }

    #[test]
    fn missing_files_name_the_path() {
        let e = server_config(&TlsConfig::Files {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/cert.pem"), "{e}");
    }
}
