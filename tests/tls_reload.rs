//! Certificate files are read again on a reload, and the renewed certificate is served to new TCP
//! and QUIC (WebTransport) connections together, while open sessions keep going.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edgeplex::Edge;
use edgeplex::config::Config;
use edgeplex::server::reload::{ConfigWatch, ReloadOutcome};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use wtransport::tls::Sha256Digest;
use wtransport::{ClientConfig, Endpoint};

/// A short-lived ECDSA certificate for localhost and 127.0.0.1 (what `serverCertificateHashes`
/// accepts), written as `cert.pem` and `key.pem` in `dir`.
fn write_cert(dir: &Path) -> CertificateDer<'static> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(10);
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    cert.der().clone()
}

async fn tls_connects(addr: std::net::SocketAddr, trust: &CertificateDer<'static>) -> bool {
    let tls = Arc::new(common::client_tls(trust, &[b"http/1.1"]));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .is_ok()
}

async fn quic_connects(addr: std::net::SocketAddr, trust: &CertificateDer<'static>) -> bool {
    let digest = ring::digest::digest(&ring::digest::SHA256, trust);
    let hash = Sha256Digest::new(digest.as_ref().try_into().unwrap());
    let config = ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([hash])
        .build();
    let endpoint = Endpoint::client(config).unwrap();
    let url = format!("https://127.0.0.1:{}/wt", addr.port());
    matches!(
        tokio::time::timeout(Duration::from_secs(5), endpoint.connect(url)).await,
        Ok(Ok(_))
    )
}

#[tokio::test]
async fn a_reload_serves_renewed_certificates_on_tcp_and_quic() {
    let dir = tempfile::tempdir().unwrap();
    let old = write_cert(dir.path());
    let path = dir.path().join("edge.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\nconfig_watch = \"0s\"\n\
             [tls]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let edge = Edge::start(Config::load(&path).unwrap()).await.unwrap();
    let (tcp, quic) = (edge.tls_addr(), edge.quic_addr().unwrap());
    assert!(tls_connects(tcp, &old).await);
    assert!(quic_connects(quic, &old).await);
    // A session made with the old certificate.
    let tls = Arc::new(common::client_tls(&old, &[b"http/1.1"]));
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(
            ServerName::try_from("localhost").unwrap(),
            tokio::net::TcpStream::connect(tcp).await.unwrap(),
        )
        .await
        .unwrap();
    let (ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/ws", tcp.port()), stream)
            .await
            .unwrap();
    let mut session = common::Client {
        ws,
        welcome: serde_json::Value::Null,
        held: Default::default(),
    };
    session.welcome = session.recv().await;

    // Renewed in place, as certbot and friends do, then SIGHUP (here: the same call).
    let new = write_cert(dir.path());
    let mut watch = ConfigWatch::new(path.clone(), edge.state().clone());
    match watch.reload("test").unwrap() {
        ReloadOutcome::Applied { certificates, .. } => assert!(certificates),
        other => panic!("{other:?}"),
    }
    assert!(
        tls_connects(tcp, &new).await,
        "TCP serves the new certificate"
    );
    assert!(!tls_connects(tcp, &old).await, "and no longer the old one");
    assert!(quic_connects(quic, &new).await, "QUIC serves it too");
    assert!(!quic_connects(quic, &old).await);
    let r = session.request(json!({"id": 1, "op": "ping"})).await;
    assert_eq!(r["ok"], true, "the session made before the reload goes on");

    // A key that does not load keeps the certificate in force, says so, and does not hold back
    // the limits changed by the same reload (tightened during an attack, say).
    std::fs::write(dir.path().join("key.pem"), "not a key").unwrap();
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("[limits.ip_sessions]\nmax = 3\n");
    std::fs::write(&path, text).unwrap();
    match watch.reload("test").unwrap() {
        ReloadOutcome::Applied {
            certificates,
            certificate_error,
            ..
        } => {
            assert!(!certificates);
            let e = certificate_error.expect("the failed load is reported");
            assert!(e.contains("tls.cert"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(edge.state().admission.policy().limits.ip_sessions.max, 3);
    assert!(tls_connects(tcp, &new).await);
    assert!(
        edge.state()
            .metrics
            .render()
            .contains(r#"edgeplex_config_reloads_total{reason="certificates_rejected"} 1"#),
    );
}
