//! Limits checked when a connection is accepted, before TLS: one address may not hold the node's
//! connection slots (TCP or QUIC) nor open connections faster than its rate, while other
//! addresses still get in; the admin listener has its own cap. Loopback accepts the whole
//! 127/8, so a second client address is a socket bound to 127.0.0.2.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{TIMEOUT, TestEdge, start};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A TCP connection to `addr` from `source` (any port).
async fn tcp_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Opens `n` TCP connections from `source` that never start TLS, and sorts them into those the
/// edge keeps waiting for a ClientHello and those it closed at once.
async fn idle_connections(source: &str, addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(tcp_from(source, addr).await);
    }
    sort_out(conns).await
}

/// The connections the edge still holds, and how many it closed.
async fn sort_out(conns: Vec<TcpStream>) -> (Vec<TcpStream>, usize) {
    let checks = conns.into_iter().map(|mut c| async move {
        let mut buf = [0u8; 16];
        // A closed connection reads EOF (or a reset) at once; a held one has nothing to read.
        match tokio::time::timeout(Duration::from_millis(500), c.read(&mut buf)).await {
            Err(_) => Some(c),
            Ok(_) => None,
        }
    });
    let results = futures_util::future::join_all(checks).await;
    let closed = results.iter().filter(|r| r.is_none()).count();
    (results.into_iter().flatten().collect(), closed)
}

/// A WebSocket session over TLS from `source`: the whole way in, welcome included.
async fn session_from(t: &TestEdge, source: &str) -> Result<common::Client, String> {
    let tcp = tcp_from(source, t.edge.tls_addr()).await;
    let tls = tokio::time::timeout(
        TIMEOUT,
        tokio_rustls::TlsConnector::from(t.tls.clone()).connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        ),
    )
    .await
    .map_err(|_| "TLS timed out".to_string())?
    .map_err(|e| format!("TLS: {e}"))?;
    let req = format!("wss://localhost:{}/ws", t.edge.tls_addr().port())
        .into_client_request()
        .unwrap();
    let (ws, _) = tokio_tungstenite::client_async(req, tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut c = common::Client {
        ws,
        welcome: Value::Null,
        held: Default::default(),
    };
    c.welcome = c.recv().await;
    Ok(c)
}

#[tokio::test]
async fn one_address_cannot_hold_every_connection_slot_and_others_still_get_in() {
    // The default per-address cap is a tenth of server.max_connections: 2 here.
    let t = start(|f| {
        f.server.max_connections = 20;
        f.limits.ip_connections = Default::default();
    })
    .await;
    let (held, closed) = idle_connections("127.0.0.1", t.edge.tls_addr(), 20).await;
    assert_eq!(
        (held.len(), closed),
        (2, 18),
        "idle TLS connections of one address past its cap are closed at accept"
    );
    let mut other = session_from(&t, "127.0.0.2")
        .await
        .expect("another address gets in while the first is at its cap");
    assert_eq!(
        other.request(json!({"id": 1, "op": "ping"})).await["ok"],
        true
    );
    assert_eq!(
        t.metric(
            r#"edgeplex_admission_decisions_total{limit="ip_connections",decision="refused"}"#
        )
        .await,
        18.0
    );
    assert_eq!(
        t.metric(r#"edgeplex_refusals_total{reason="ip_connections"}"#)
            .await,
        18.0
    );
    assert_eq!(
        t.metric("edgeplex_connections_refused_total").await,
        0.0,
        "no node-wide slot was spent on them"
    );
    assert_eq!(t.metric("edgeplex_connections").await, 3.0);
}

#[tokio::test]
async fn a_burst_of_connections_from_one_address_past_its_rate_is_closed_at_accept() {
    // The default burst of 60, refilled slowly enough that a loaded machine's pauses while the
    // test connects cannot add a place.
    let t = start(|f| {
        f.limits.ip_new_connections = Default::default();
        f.limits.ip_new_connections.per_second = 1;
    })
    .await;
    let (held, closed) = idle_connections("127.0.0.1", t.edge.tls_addr(), 80).await;
    assert!(
        (60..=61).contains(&held.len()),
        "the burst and what refilled while the test connected: {} held, {closed} closed",
        held.len()
    );
    assert!(
        session_from(&t, "127.0.0.2").await.is_ok(),
        "another address has its own rate"
    );
}

#[tokio::test]
async fn the_admin_listener_has_its_own_connection_cap() {
    let t = start(|_| {}).await;
    let admin = t.edge.admin_addr().unwrap();
    let cap = edgeplex::config::schema::DEFAULT_ADMIN_MAX_CONNECTIONS;
    let (mut held, closed) = idle_connections("127.0.0.1", admin, cap + 1).await;
    assert_eq!((held.len(), closed), (cap, 1));
    // Asking for /metrics needs a place too: one held connection gives its own back, once the
    // edge has seen it close.
    held.pop();
    let mut metrics = None;
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(t.admin_url("/metrics")).await {
            metrics = Some(r.text().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = metrics.expect("a place came back");
    assert!(
        metrics.contains("edgeplex_admin_connections_refused_total 1\n"),
        "{metrics}"
    );
}

/// A WebTransport (QUIC) connection from `source` that completes its handshake.
async fn quic_from(t: &TestEdge, source: &str) -> Result<wtransport::Connection, String> {
    let hex = &t.edge.dev_cert().unwrap().sha256_hex;
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let hash = wtransport::tls::Sha256Digest::new(bytes.try_into().unwrap());
    let config = wtransport::ClientConfig::builder()
        .with_bind_address(format!("{source}:0").parse().unwrap())
        .with_server_certificate_hashes([hash])
        .build();
    let endpoint = wtransport::Endpoint::client(config).unwrap();
    let url = format!(
        "https://127.0.0.1:{}/wt",
        t.edge.quic_addr().unwrap().port()
    );
    tokio::time::timeout(Duration::from_secs(5), endpoint.connect(url))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn quic_connections_count_under_the_same_per_address_cap() {
    // A tenth of server.max_connections: 1 here.
    let t = start(|f| {
        f.server.max_connections = 10;
        f.limits.ip_connections = Default::default();
    })
    .await;
    let _first = quic_from(&t, "127.0.0.1").await.expect("the first gets in");
    assert!(
        quic_from(&t, "127.0.0.1").await.is_err(),
        "the address is at its cap"
    );
    let _other = quic_from(&t, "127.0.0.2")
        .await
        .expect("another address gets in");
}

/// A connection from 127.0.0.1 (the trusted load balancer) that sends `header` and then waits.
async fn via_proxy(t: &TestEdge, header: &str) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut c = tcp_from("127.0.0.1", t.edge.tls_addr()).await;
    c.write_all(header.as_bytes()).await.unwrap();
    c
}

#[tokio::test]
async fn behind_the_proxy_protocol_the_caps_key_on_the_client_the_header_names() {
    let t = start(|f| {
        f.server.proxy_protocol = true;
        f.admission.trusted_proxies = vec!["127.0.0.1".into()];
        f.limits.ip_connections.max = Some(1);
    })
    .await;
    let a = "PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n";
    let b = "PROXY TCP4 203.0.113.8 10.0.0.1 5556 443\r\n";
    let conns = vec![
        via_proxy(&t, a).await,
        via_proxy(&t, a).await,
        via_proxy(&t, b).await,
    ];
    let (held, closed) = sort_out(conns).await;
    assert_eq!(
        (held.len(), closed),
        (2, 1),
        "one each for 203.0.113.7 and .8, none for the load balancer's own address"
    );
    let v: Value = serde_json::from_str(&t.admin_get("/v1/admission/203.0.113.7").await.1).unwrap();
    assert_eq!(v["connections"]["open"], 1, "{v}");
}

#[tokio::test]
async fn a_trusted_proxy_and_exempt_addresses_are_not_limited_per_address() {
    let t = start(|f| {
        f.admission.trusted_proxies = vec!["127.0.0.1".into()];
        f.admission.exempt = vec!["127.0.0.3".into()];
        f.limits.ip_connections.max = Some(1);
    })
    .await;
    let addr = t.edge.tls_addr();
    // The load balancer names its clients per request (X-Forwarded-For): its connections
    // carry many of them.
    assert_eq!(idle_connections("127.0.0.1", addr, 3).await.0.len(), 3);
    assert_eq!(idle_connections("127.0.0.3", addr, 3).await.0.len(), 3);
    assert_eq!(idle_connections("127.0.0.2", addr, 3).await.0.len(), 1);
}

#[tokio::test]
async fn a_reload_changes_the_connection_cap_for_the_next_connections() {
    use edgeplex::config::Config;
    use edgeplex::server::reload::{ConfigWatch, ReloadOutcome};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    let pem = dir.path().join("dev.pem");
    let write = |max: u32| {
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\nconfig_watch = \"0s\"\n\
                 [tls]\ndev_cert_path = \"{}\"\n[webtransport]\nenabled = false\n\
                 [limits.ip_connections]\nmax = {max}\n",
                pem.display()
            ),
        )
        .unwrap()
    };
    write(2);
    let edge = edgeplex::Edge::start(Config::load(&path).unwrap())
        .await
        .unwrap();
    let addr = edge.tls_addr();
    let mut watch = ConfigWatch::new(path.clone(), edge.state().clone());
    let (first, closed) = idle_connections("127.0.0.1", addr, 3).await;
    assert_eq!((first.len(), closed), (2, 1));

    write(4);
    assert!(matches!(
        watch.reload("test").unwrap(),
        ReloadOutcome::Applied { .. }
    ));
    let (second, closed) = idle_connections("127.0.0.1", addr, 3).await;
    assert_eq!(
        (second.len(), closed),
        (2, 1),
        "two more places: the connections open before the reload still count"
    );

    write(1);
    watch.reload("test").unwrap();
    let (_, closed) = idle_connections("127.0.0.1", addr, 1).await;
    assert_eq!(closed, 1, "over the lowered cap");
    let (still, closed) = sort_out(first.into_iter().chain(second).collect()).await;
    assert_eq!(
        (still.len(), closed),
        (4, 0),
        "a lower cap closes no open connection"
    );
}
