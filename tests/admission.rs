//! Per-IP and node-wide limits with real clients over every transport: WebSocket (handshake and
//! messages), SSE, and `POST /publish`; trusted proxies; dry-run; the admin view of an address.

mod common;

use common::sse_client;
use common::{TestEdge, start};
use edgeplex::config::{FileConfig, LimitMode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The status and headers of a refused WebSocket handshake.
fn refused(r: Result<common::Ws, tungstenite::Error>) -> (u16, Option<String>) {
    match r {
        Err(tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string()),
        ),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, the handshake succeeded"),
    }
}

async fn sse_status(t: &TestEdge, headers: &[(&str, &str)]) -> (u16, Option<String>) {
    let mut req = sse_client::client(t, false).get(sse_client::url(t, "channel=a"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), retry)
}

async fn post(t: &TestEdge, body: &str) -> (u16, Option<String>, Value) {
    let r = sse_client::client(t, false)
        .post(format!(
            "https://localhost:{}/publish",
            t.edge.tls_addr().port()
        ))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = r.text().await.unwrap();
    (
        status,
        retry,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

async fn decisions(t: &TestEdge, limit: &str, decision: &str) -> f64 {
    t.metric(&format!(
        "edgeplex_admission_decisions_total{{limit=\"{limit}\",decision=\"{decision}\"}}"
    ))
    .await
}

#[tokio::test]
async fn new_sessions_per_ip_are_refused_with_429_on_websocket_and_sse() {
    let t = start(|f| {
        f.limits.ip_new_sessions.per_second = 1;
        f.limits.ip_new_sessions.burst = 2;
    })
    .await;
    let _a = t.connect().await;
    let _b = t.connect().await;
    let (status, retry) = refused(t.try_connect(None).await);
    assert_eq!((status, retry.as_deref()), (429, Some("1")));
    let (status, retry) = sse_status(&t, &[]).await;
    assert_eq!((status, retry.as_deref()), (429, Some("1")));
    assert_eq!(decisions(&t, "ip_new_sessions", "refused").await, 2.0);
    // A second later the address has a new session to spend.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let _c = t.connect().await;
}

#[tokio::test]
async fn concurrent_sessions_per_ip_count_every_transport_and_come_back() {
    let t = start(|f| f.limits.ip_sessions.max = 2).await;
    let ws = t.connect().await;
    let mut events = sse_client::open(&t, false, "channel=a", None).await;
    sse_client::welcome(&mut events).await;
    assert_eq!(refused(t.try_connect(None).await).0, 429);
    assert_eq!(sse_status(&t, &[]).await.0, 429);
    drop(ws);
    // The closed session gives its place back once the edge has seen the close.
    let mut ok = false;
    for _ in 0..100 {
        if t.try_connect(None).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok, "a place came back after a session ended");
}

#[tokio::test]
async fn messages_per_ip_are_charged_across_sessions_and_http_publishes() {
    let t = start(|f| {
        f.limits.ip_messages.per_second = 1;
        f.limits.ip_messages.burst = 4;
        f.session.close_after_refusals = 3;
    })
    .await;
    let mut a = t.connect().await;
    let mut b = t.connect().await;
    for i in 0..4 {
        let c = if i % 2 == 0 { &mut a } else { &mut b };
        let r = c.request(json!({"id": i, "op": "ping"})).await;
        assert_eq!(r["ok"], true, "{r}");
    }
    // The fifth message from the address, on either session, is refused with a wait.
    let r = a.request(json!({"id": 9, "op": "ping"})).await;
    assert_eq!(r["error"]["code"], "rate_limited", "{r}");
    assert!(r["error"]["retry_after_ms"].as_u64().unwrap() > 0);
    // So is a stateless publish from the same address.
    let (status, retry, body) = post(&t, r#"{"channel":"c","data":1}"#).await;
    assert_eq!((status, retry.as_deref()), (429, Some("1")), "{body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    // A session that keeps going well past the limit is closed with 1008.
    for i in 0..10 {
        b.send(json!({"id": 100 + i, "op": "ping"})).await;
    }
    let (code, reason, _) = b.until_close().await;
    assert_eq!(code, 1008, "{reason}");
    assert!(decisions(&t, "ip_messages", "refused").await >= 5.0);
}

#[tokio::test]
async fn bytes_per_ip_are_charged_by_message_size() {
    let t = start(|f| {
        f.session.max_message_bytes = 1024;
        f.session.close_message_bytes = 2048;
        f.limits.ip_bytes.per_second = 1;
        f.limits.ip_bytes.burst = 3000;
    })
    .await;
    let mut c = t.connect().await;
    let big = "x".repeat(900);
    for i in 0..3 {
        let r = c
            .request(json!({"id": i, "op": "publish", "channel": "b", "data": big}))
            .await;
        assert_eq!(r["ok"], true, "{r}");
    }
    let r = c
        .request(json!({"id": 3, "op": "publish", "channel": "b", "data": big}))
        .await;
    assert_eq!(r["error"]["code"], "rate_limited", "{r}");
    // Small messages still fit in what is left.
    let r = c.request(json!({"id": 4, "op": "ping"})).await;
    assert_eq!(r["ok"], true, "{r}");
}

#[tokio::test]
async fn the_node_wide_new_session_limit_applies_to_every_address() {
    let t = start(|f| {
        f.limits.new_sessions.per_second = 1;
        f.limits.new_sessions.burst = 1;
        f.admission.exempt = vec!["127.0.0.1".into()];
    })
    .await;
    let _a = t.connect().await;
    assert_eq!(refused(t.try_connect(None).await).0, 429, "exempt or not");
    assert_eq!(decisions(&t, "new_sessions", "refused").await, 1.0);
}

#[tokio::test]
async fn exempt_addresses_skip_per_ip_limits() {
    let t = start(|f| {
        f.limits.ip_sessions.max = 1;
        f.admission.exempt = vec!["127.0.0.0/8".into()];
    })
    .await;
    let _a = t.connect().await;
    let _b = t.connect().await;
    let _c = t.connect().await;
}

fn behind_proxy(f: &mut FileConfig) {
    f.admission.trusted_proxies = vec!["127.0.0.1/32".into()];
    f.limits.ip_sessions.max = 1;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_limited() {
    let t = start(behind_proxy).await;
    let xff = |ip: &'static str| [("x-forwarded-for", ip)];
    let _a = t
        .try_connect_with(&xff("203.0.113.5"))
        .await
        .expect("first session of 203.0.113.5");
    assert_eq!(
        refused(t.try_connect_with(&xff("203.0.113.5")).await).0,
        429
    );
    // A client cannot pick its own key: what it writes left of the proxy's entry is ignored.
    assert_eq!(
        refused(
            t.try_connect_with(&[("x-forwarded-for", "198.51.100.1, 203.0.113.5")])
                .await
        )
        .0,
        429
    );
    let _b = t
        .try_connect_with(&xff("203.0.113.6"))
        .await
        .expect("another client behind the same proxy");
    assert_eq!(sse_status(&t, &xff("203.0.113.6")).await.0, 429);
    // The proxies write X-Forwarded-For (the default): a client's own Forwarded header, which
    // they pass through, is not read, so it cannot pick a fresh address.
    assert_eq!(
        refused(
            t.try_connect_with(&[
                ("forwarded", "for=198.51.100.77"),
                ("x-forwarded-for", "203.0.113.6")
            ])
            .await
        )
        .0,
        429
    );
    let v: Value = serde_json::from_str(&t.admin_get("/v1/admission/203.0.113.5").await.1).unwrap();
    assert_eq!(v["sessions"]["open"], 1, "{v}");
    assert_eq!(v["key"], "203.0.113.5");
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_peer_are_ignored() {
    let t = start(|f| f.limits.ip_sessions.max = 1).await;
    let _a = t
        .try_connect_with(&[("x-forwarded-for", "203.0.113.5")])
        .await
        .unwrap();
    // A different claimed address does not help: the peer is 127.0.0.1 either way.
    assert_eq!(
        refused(
            t.try_connect_with(&[("x-forwarded-for", "203.0.113.9")])
                .await
        )
        .0,
        429
    );
}

#[tokio::test]
async fn dry_run_refuses_nothing_but_counts_and_the_admin_view_shows_the_address() {
    let t = start(|f| {
        f.limits.ip_sessions.max = 1;
        f.limits.ip_sessions.mode = LimitMode::DryRun;
        f.limits.ip_messages.per_second = 1;
        f.limits.ip_messages.burst = 2;
        f.limits.ip_messages.mode = LimitMode::DryRun;
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(t.connect().await);
    }
    for i in 0..5 {
        let r = clients[0].request(json!({"id": i, "op": "ping"})).await;
        assert_eq!(r["ok"], true, "dry-run lets message {i} through");
    }
    assert_eq!(decisions(&t, "ip_sessions", "dry_run").await, 2.0);
    assert_eq!(decisions(&t, "ip_sessions", "refused").await, 0.0);
    assert_eq!(decisions(&t, "ip_messages", "dry_run").await, 3.0);
    let (status, body) = t.admin_get("/v1/admission/127.0.0.1").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["sessions"]["open"], 3, "{v}");
    assert_eq!(v["sessions"]["mode"], "dry-run");
    assert_eq!(v["messages"]["tracked"], true);
    assert_eq!(t.admin_get("/v1/admission/not-an-ip").await.0, 400);
}

#[tokio::test]
async fn request_heads_over_the_cap_are_refused_with_431() {
    let t = start(|f| f.server.max_header_bytes = 8192).await;
    let big = "x".repeat(9000);
    for h2 in [false, true] {
        let r = sse_client::client(&t, h2)
            .get(sse_client::url(&t, "channel=a"))
            .header("x-padding", &big)
            .send()
            .await;
        match r {
            Ok(r) => assert_eq!(r.status(), 431, "h2={h2}"),
            // HTTP/2 may refuse the stream itself rather than answer it.
            Err(e) => assert!(h2, "HTTP/1.1 must answer 431: {e}"),
        }
    }
}

#[tokio::test]
async fn ipv6_grouping_config_is_checked() {
    let mut f = common::test_config(std::path::Path::new("/tmp"));
    f.admission.ipv6_prefix = 8;
    let e = edgeplex::config::Config::from_file_config(f).unwrap_err();
    assert!(e.to_string().contains("admission.ipv6_prefix"), "{e}");
    let mut f = common::test_config(std::path::Path::new("/tmp"));
    f.admission.trusted_proxies = vec!["10.0.0.0/33".into()];
    let e = edgeplex::config::Config::from_file_config(f).unwrap_err();
    assert!(e.to_string().contains("admission.trusted_proxies"), "{e}");
    let mut f = common::test_config(std::path::Path::new("/tmp"));
    f.limits.ip_bytes.burst = 10;
    let e = edgeplex::config::Config::from_file_config(f).unwrap_err();
    assert!(e.to_string().contains("limits.ip_bytes.burst"), "{e}");
}

/// Opens a WebSocket over a TCP connection that first sends `header` (a PROXY protocol header);
/// the client also claims to be 198.51.100.1 in X-Forwarded-For.
async fn connect_via_proxy(t: &TestEdge, header: &[u8]) -> Result<common::Client, String> {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(t.edge.tls_addr())
        .await
        .unwrap();
    tcp.write_all(header).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(t.tls.clone())
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let mut req = format!("wss://localhost:{}/ws", t.edge.tls_addr().port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-forwarded-for", "198.51.100.1".parse().unwrap());
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

fn proxy_v2(source: &str) -> Vec<u8> {
    use ppp::v2;
    let src: std::net::SocketAddr = source.parse().unwrap();
    // Both addresses of one family, or the header carries none.
    let dst: std::net::SocketAddr = if src.is_ipv6() {
        "[2001:db8::1]:443".parse().unwrap()
    } else {
        "10.0.0.1:443".parse().unwrap()
    };
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap()
}

#[tokio::test]
async fn the_proxy_protocol_gives_the_client_address_from_a_trusted_proxy() {
    let t = start(|f| {
        f.server.proxy_protocol = true;
        f.admission.trusted_proxies = vec!["127.0.0.1".into()];
        f.limits.ip_sessions.max = 1;
    })
    .await;
    let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n";
    let mut a = connect_via_proxy(&t, v1).await.expect("v1 header accepted");
    assert_eq!(a.request(json!({"id": 1, "op": "ping"})).await["ok"], true);
    // Same client address: over its session limit.
    match connect_via_proxy(&t, v1).await {
        Err(e) => assert!(e.contains("429"), "{e}"),
        Ok(_) => panic!("a second session of 203.0.113.7 was admitted"),
    }
    // v2, another client.
    let _b = connect_via_proxy(&t, &proxy_v2("[2001:db8::7]:5555"))
        .await
        .expect("v2 header accepted");
    // Behind the PROXY protocol no proxy wrote X-Forwarded-For: a client's own is not read, not
    // even when the header names no address (UNKNOWN) and the peer is the trusted proxy itself.
    let _u = connect_via_proxy(&t, b"PROXY UNKNOWN\r\n")
        .await
        .expect("an UNKNOWN header keeps the socket peer");
    let open = |ip: &'static str| {
        let t = &t;
        async move {
            let v: Value =
                serde_json::from_str(&t.admin_get(&format!("/v1/admission/{ip}")).await.1).unwrap();
            v["sessions"]["open"].as_u64().unwrap()
        }
    };
    assert_eq!(open("203.0.113.7").await, 1);
    assert_eq!(open("2001:db8::7").await, 1, "the v2 header's IPv6 client");
    assert_eq!(open("198.51.100.1").await, 0);
    assert_eq!(open("127.0.0.1").await, 1, "the UNKNOWN one");
    // No header, or garbage: the connection is closed before TLS.
    assert!(connect_via_proxy(&t, b"").await.is_err());
    assert!(connect_via_proxy(&t, b"PROXY NONSENSE\r\n").await.is_err());
    assert!(
        t.metric("edgeplex_refusals_total{reason=\"proxy_protocol\"}")
            .await
            >= 2.0
    );
}

#[tokio::test]
async fn the_proxy_protocol_is_refused_from_an_untrusted_peer() {
    let t = start(|f| {
        f.server.proxy_protocol = true;
        f.admission.trusted_proxies = vec!["10.0.0.0/8".into()];
    })
    .await;
    let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n";
    assert!(connect_via_proxy(&t, v1).await.is_err());
    let mut f = common::test_config(std::path::Path::new("/tmp"));
    f.server.proxy_protocol = true;
    let e = edgeplex::config::Config::from_file_config(f).unwrap_err();
    assert!(e.to_string().contains("server.proxy_protocol"), "{e}");
}

#[tokio::test]
async fn origin_rules_can_differ_per_route() {
    let t = start(|f| {
        f.admission.allowed_origins = vec![
            "https://app.example.com".into(),
            "https://other.example.com".into(),
        ];
        f.admission.routes.insert(
            "publish".into(),
            edgeplex::config::schema::RouteOriginSection {
                allowed_origins: Some(vec!["https://app.example.com".into()]),
                allow_missing_origin: Some(false),
            },
        );
    })
    .await;
    // WebSocket and SSE follow [admission].
    let _ws = t
        .try_connect(Some("https://other.example.com"))
        .await
        .expect("allowed by [admission]");
    let (status, _) = sse_status(&t, &[("origin", "https://other.example.com")]).await;
    assert_eq!(status, 200);
    // POST /publish follows its own rules.
    let publish = |origin: Option<&'static str>| {
        let mut req = sse_client::client(&t, false)
            .post(format!(
                "https://localhost:{}/publish",
                t.edge.tls_addr().port()
            ))
            .body(r#"{"channel":"c","data":1}"#);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(publish(Some("https://other.example.com")).await, 403);
    assert_eq!(publish(None).await, 403, "no Origin refused on this route");
    assert_eq!(publish(Some("https://app.example.com")).await, 200);
    assert_eq!(decisions(&t, "origin", "refused").await, 2.0);

    let mut f = common::test_config(std::path::Path::new("/tmp"));
    f.admission.routes.insert("chat".into(), Default::default());
    let e = edgeplex::config::Config::from_file_config(f).unwrap_err();
    assert!(e.to_string().contains("admission.routes"), "{e}");
}
