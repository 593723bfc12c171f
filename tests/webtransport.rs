//! WebTransport over HTTP/3 with a real client (wtransport's) on loopback: the same channels and
//! protocol as WebSocket and SSE, datagram delivery, the message cap, and the CONNECT refusals.
//! The client trusts the edge only through the dev certificate's SHA-256, exactly as a browser's
//! `serverCertificateHashes` does.

mod common;

use std::time::Duration;

use common::wt_client::{self, Wt, client_config, client_endpoint, url};
use common::{TIMEOUT, TestEdge, sse_client, start};
use edgeplex::config::schema::ValidateAddressSetting;
use serde_json::{Value, json};
use wtransport::Endpoint;
use wtransport::endpoint::endpoint_side::Client;

async fn try_open(t: &TestEdge, origin: Option<&str>) -> Result<Wt, String> {
    try_open_on(client_endpoint(t), t, origin).await
}

async fn try_open_on(
    endpoint: Endpoint<Client>,
    t: &TestEdge,
    origin: Option<&str>,
) -> Result<Wt, String> {
    wt_client::try_open_path(endpoint, t, "/wt", origin).await
}

async fn open(t: &TestEdge) -> Wt {
    try_open(t, None).await.expect("a WebTransport session")
}

#[tokio::test]
async fn webtransport_websocket_and_sse_share_channels() {
    let t = start(|_| {}).await;
    let mut wt = open(&t).await;
    let r = wt
        .request(json!({"id": 1, "op": "subscribe", "channel": "room"}))
        .await;
    assert_eq!(r, json!({"id": 1, "ok": true}));
    let mut ws = t.connect().await;
    ws.subscribe(1, "room").await;
    let mut events = sse_client::open(&t, false, "channel=room", None).await;
    sse_client::welcome(&mut events).await;

    // From WebSocket: every transport receives it (the publisher too, before its reply).
    let r = ws
        .request(json!({"id": 2, "op": "publish", "channel": "room", "data": {"from": "ws"}}))
        .await;
    assert_eq!(r, json!({"id": 2, "ok": true}));
    assert_eq!(ws.held.len(), 1, "the push came before the reply");
    assert_eq!(ws.recv().await["data"], json!({"from": "ws"}));
    let pushed = wt.recv().await;
    assert_eq!(pushed["data"], json!({"from": "ws"}));
    assert_eq!(
        sse_client::data(&sse_client::next(&mut events).await)["data"],
        json!({"from": "ws"})
    );

    // From WebTransport: the reply after the push (a publisher hears its own message).
    let pushed = wt
        .request(json!({"id": 3, "op": "publish", "channel": "room", "data": {"from": "wt"}}))
        .await;
    assert_eq!(pushed["data"], json!({"from": "wt"}));
    assert_eq!(wt.recv().await, json!({"id": 3, "ok": true}));
    assert_eq!(ws.recv().await["data"], json!({"from": "wt"}));

    // From SSE's POST /publish.
    let status = sse_client::client(&t, false)
        .post(format!(
            "https://localhost:{}/publish",
            t.edge.tls_addr().port()
        ))
        .body(r#"{"channel":"room","data":{"from":"post"}}"#)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    assert_eq!(wt.recv().await["data"], json!({"from": "post"}));
    assert_eq!(
        t.metric("edgeplex_sessions{transport=\"webtransport\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn resume_with_since_works_over_webtransport() {
    let t = start(|_| {}).await;
    let mut sub = t.connect().await;
    sub.subscribe(1, "ticks").await;
    let mut ws = t.connect().await;
    for i in 0..4 {
        let r = ws
            .request(json!({"id": 10 + i, "op": "publish", "channel": "ticks", "data": i}))
            .await;
        assert_eq!(r["ok"], true);
    }
    let mut offsets = Vec::new();
    for _ in 0..4 {
        offsets.push(sub.recv().await["offset"].as_str().unwrap().to_string());
    }
    let mut wt = open(&t).await;
    let r = wt
        .request(json!({"id": 1, "op": "subscribe", "channel": "ticks", "since": offsets[1]}))
        .await;
    assert_eq!(r, json!({"id": 1, "ok": true}));
    assert_eq!(wt.recv().await["data"], 2);
    assert_eq!(wt.recv().await["data"], 3);
}

#[tokio::test]
async fn datagram_delivery_sends_pushes_as_datagrams() {
    let t = start(|_| {}).await;
    let mut wt = open(&t).await;
    let r = wt
        .request(json!({"id": 1, "op": "subscribe", "channel": "prices", "delivery": "datagram"}))
        .await;
    assert_eq!(r, json!({"id": 1, "ok": true}));
    let mut ws = t.connect().await;
    ws.request(json!({"id": 1, "op": "publish", "channel": "prices", "data": {"px": 101.5}}))
        .await;
    let d = tokio::time::timeout(TIMEOUT, wt.conn.receive_datagram())
        .await
        .expect("a datagram")
        .unwrap();
    let v: Value = serde_json::from_slice(d.payload().as_ref()).unwrap();
    assert_eq!(v["data"], json!({"px": 101.5}));
    assert_eq!(v["channel"], "prices");

    // Too large for a datagram: it comes down the stream instead.
    let big = "x".repeat(4000);
    ws.request(json!({"id": 2, "op": "publish", "channel": "prices", "data": big}))
        .await;
    assert_eq!(wt.recv().await["data"], big);

    // WebSocket has no datagrams: asking for them is a clear error.
    let r = ws
        .request(json!({"id": 3, "op": "subscribe", "channel": "prices", "delivery": "datagram"}))
        .await;
    assert_eq!(r["error"]["code"], "bad_request", "{r}");
}

#[tokio::test]
async fn a_line_over_the_cap_closes_the_session_with_1009() {
    let t = start(|f| {
        f.session.max_message_bytes = 1024;
        f.session.close_message_bytes = 4096;
    })
    .await;
    let mut wt = open(&t).await;
    let line = format!(
        r#"{{"op":"publish","channel":"c","data":"{}"}}"#,
        "x".repeat(5000)
    );
    // Sent without its newline: the edge must not wait for the end of the line.
    wt.send.write_all(line.as_bytes()).await.unwrap();
    let (code, reason) = wt.closed().await;
    assert_eq!(code, 1009, "{reason}");
}

#[tokio::test]
async fn connect_refusals_for_origin_and_per_ip_limits() {
    let t = start(|f| {
        f.admission.allowed_origins = vec!["https://app.example.com".into()];
        f.limits.ip_sessions.max = 2;
    })
    .await;
    let e = try_open(&t, Some("https://evil.example.com"))
        .await
        .err()
        .expect("a refused origin");
    assert!(e.contains("rejected"), "{e}");
    assert_eq!(
        t.metric("edgeplex_refusals_total{reason=\"origin\"}").await,
        1.0
    );

    let _a = try_open(&t, Some("https://app.example.com")).await.unwrap();
    let _b = open(&t).await;
    let e = try_open(&t, None)
        .await
        .err()
        .expect("past the per-IP session limit");
    assert!(e.contains("rejected"), "{e}");
    assert_eq!(
        t.metric("edgeplex_admission_decisions_total{limit=\"ip_sessions\",decision=\"refused\"}")
            .await,
        1.0
    );
    // Another path is not a session.
    let endpoint = client_endpoint(&t);
    let e = endpoint.connect(url(&t, "/other")).await.err();
    assert!(e.is_some(), "404 for another path");
}

#[tokio::test]
async fn shutdown_closes_sessions_with_1001_and_tcp_advertises_http3() {
    let t = start(|_| {}).await;
    let r = sse_client::client(&t, false)
        .get(format!("https://localhost:{}/", t.edge.tls_addr().port()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["alt-svc"],
        format!("h3=\":{}\"; ma=86400", t.edge.tls_addr().port()).as_str()
    );
    let wt = open(&t).await;
    let edge = t.edge;
    let stop = tokio::spawn(async move { edge.shutdown_within(Duration::from_secs(5)).await });
    let (code, reason) = wt.closed().await;
    assert_eq!(code, 1001, "{reason}");
    assert!(stop.await.unwrap().clean);
}

/// New sessions charged to 127.0.0.1 with `decision`.
async fn charged(t: &TestEdge, decision: &str) -> f64 {
    t.metric(&format!(
        "edgeplex_admission_decisions_total{{limit=\"ip_new_sessions\",decision=\"{decision}\"}}"
    ))
    .await
}

/// Captures the first datagram a real client sends (its QUIC Initial) by pointing it at a UDP
/// socket that never answers.
async fn captured_initial(t: &TestEdge) -> Vec<u8> {
    let trap = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = trap.local_addr().unwrap().port();
    let endpoint = client_endpoint(t);
    let url = format!("https://127.0.0.1:{port}/wt");
    let connecting = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.connect(url)).await;
    });
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(TIMEOUT, trap.recv_from(&mut buf))
        .await
        .expect("the client sends an Initial")
        .unwrap();
    connecting.abort();
    buf.truncate(n);
    buf
}

#[tokio::test]
async fn an_unvalidated_flood_is_answered_with_retries_and_charges_nothing() {
    let t = start(|f| {
        f.limits.ip_new_sessions.per_second = 1;
        f.limits.ip_new_sessions.burst = 1;
    })
    .await;
    let initial = captured_initial(&t).await;
    let edge = t.edge.quic_addr().unwrap();
    // 200 source addresses (ports) replay the Initial, as a spoofer would from addresses it
    // does not own: each gets a stateless Retry and nothing more.
    let mut retries = 0;
    for _ in 0..200 {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(&initial, edge).await.unwrap();
        let mut buf = [0u8; 2048];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut buf)).await
        {
            // QUIC v1 long header, type Retry (0b11).
            if n > 0 && buf[0] & 0xF0 == 0xF0 {
                retries += 1;
            }
        }
    }
    assert_eq!(retries, 200, "every unvalidated Initial gets a Retry");
    assert_eq!(
        charged(&t, "allowed").await + charged(&t, "refused").await,
        0.0
    );
    // The address's one new session is still there for the real client.
    let _wt = open(&t).await;
    assert_eq!(charged(&t, "allowed").await, 1.0);
}

/// With `validate_address = "under_load"`, a flood of Initials from addresses that never answer
/// (as a spoofer's would) starts at most `unvalidated_handshakes` handshakes; every later new
/// address gets a stateless Retry, and none of them is charged to its connection limits. A real
/// client still opens, through the Retry.
#[tokio::test]
async fn under_load_a_flood_of_unvalidated_initials_is_answered_with_retries() {
    let t = start(|f| {
        f.webtransport.validate_address = ValidateAddressSetting::Mode("under_load".into());
        f.webtransport.unvalidated_handshakes = 4;
    })
    .await;
    let edge = t.edge.quic_addr().unwrap();
    let (mut retries, mut handshakes) = (0, 0);
    // Distinct Initials (each its own connection ID) from as many ports, never followed up.
    for _ in 0..20 {
        let initial = captured_initial(&t).await;
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(&initial, edge).await.unwrap();
        let mut buf = [0u8; 2048];
        if let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut buf)).await
        {
            // QUIC v1 long header (0x80) of type Retry (0x30) or Initial (0x00), the edge's
            // first flight. The fixed bit (0x40) is not looked at: the client offered to let
            // it be greased (RFC 9287), and quinn then clears it in some packets.
            match buf[0] & 0xB0 {
                0xB0 if n > 0 => retries += 1,
                0x80 if n > 0 => handshakes += 1,
                _ => {}
            }
        }
    }
    assert_eq!(
        handshakes, 4,
        "unproven handshakes started past the threshold"
    );
    assert_eq!(retries, 16, "every Initial past the threshold gets a Retry");
    let connections = |decision: &'static str| {
        format!(
            "edgeplex_admission_decisions_total{{limit=\"ip_connections\",decision=\"{decision}\"}}"
        )
    };
    assert_eq!(t.metric(&connections("allowed")).await, 0.0);
    let _wt = open(&t).await;
    assert_eq!(t.metric(&connections("allowed")).await, 1.0);
}

/// Below the threshold a client's handshake proves its address, and only then is the address
/// charged to its connection limits: past them the connection is closed after the handshake.
#[tokio::test]
async fn under_load_an_address_is_charged_once_its_handshake_proves_it() {
    let t = start(|f| {
        f.webtransport.validate_address = ValidateAddressSetting::Mode("under_load".into());
        f.limits.ip_connections.max = Some(1);
    })
    .await;
    let _a = open(&t).await;
    assert!(
        try_open(&t, None).await.is_err(),
        "the address's one place is the first session's"
    );
    let decisions = |decision: &'static str| {
        format!(
            "edgeplex_admission_decisions_total{{limit=\"ip_connections\",decision=\"{decision}\"}}"
        )
    };
    assert_eq!(t.metric(&decisions("allowed")).await, 1.0);
    assert_eq!(t.metric(&decisions("refused")).await, 1.0);
}

#[tokio::test]
async fn messages_past_the_per_ip_limit_are_refused_then_closed_with_1008() {
    let t = start(|f| {
        f.limits.ip_messages.per_second = 1;
        f.limits.ip_messages.burst = 3;
        f.session.close_after_refusals = 2;
    })
    .await;
    // The opening ping spends one message of the three.
    let mut wt = open(&t).await;
    for i in 0..2 {
        assert_eq!(wt.request(json!({"id": i, "op": "ping"})).await["ok"], true);
    }
    let r = wt.request(json!({"id": 9, "op": "ping"})).await;
    assert_eq!(r["error"]["code"], "rate_limited", "{r}");
    assert!(r["error"]["retry_after_ms"].as_u64().unwrap() > 0);
    for i in 10..20 {
        wt.send_line(&json!({"id": i, "op": "ping"}).to_string())
            .await;
    }
    let (code, reason) = wt.closed().await;
    assert_eq!(code, 1008, "{reason}");
}

#[tokio::test]
async fn a_quic_connection_takes_a_place_under_the_connection_cap() {
    let t = start(|f| f.server.max_connections = 1).await;
    let _a = open(&t).await;
    assert!(
        try_open(&t, None).await.is_err(),
        "the one place is the first session's"
    );
    assert!(t.metric("edgeplex_connections_refused_total").await >= 1.0);
}

/// As over WebSocket: a session closed for a flood (1008) still gets the replies to its
/// publishes that were with Redis when the edge decided to close it, before the close.
#[tokio::test]
async fn replies_to_publishes_still_with_redis_go_out_before_a_1008() {
    let redis = common::redis_server::RedisServer::start();
    let t = common::flood_limited_on_redis(&redis).await;
    // The opening ping spends one message of the burst: four publishes pass.
    let mut wt = open(&t).await;
    // The publishes stay with Redis for 300 ms, well within the edge's 1 s bound on the wait.
    redis.pause_writes(300);
    let mut lines = String::new();
    for i in 0..30u64 {
        let publish = json!({"id": i, "op": "publish", "channel": "owed", "data": i});
        lines.push_str(&format!("{publish}\n"));
    }
    // A write may fail once the edge has closed the session.
    let _ = wt.send.write_all(lines.as_bytes()).await;
    let mut answered = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(TIMEOUT, wt.recv.read(&mut buf)).await {
            Ok(Ok(Some(n))) => wt.pending.extend_from_slice(&buf[..n]),
            _ => break,
        }
        while let Some(i) = wt.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = wt.pending.drain(..=i).collect();
            let v: Value = serde_json::from_slice(&line[..i]).unwrap();
            if v["ok"] == true {
                answered.push(v["id"].as_u64().unwrap());
            }
        }
    }
    let (code, reason) = wt.closed().await;
    assert_eq!(code, 1008, "{reason}");
    assert_eq!(answered, [0, 1, 2, 3], "the burst's replies");
}

/// Blank lines are keep-alives and get no reply, but each spends the message budget like a
/// WebSocket ping: a spray of newlines is a flood like any other and ends in 1008.
#[tokio::test]
async fn blank_lines_spend_the_message_budget() {
    let t = start(|f| {
        f.session.messages_per_second = 1;
        f.session.message_burst = 5;
        f.session.close_after_refusals = 10;
    })
    .await;
    let mut wt = open(&t).await;
    // A write may fail once the edge has closed the session.
    let _ = wt.send.write_all(&b"\n\r\n".repeat(500)).await;
    let (code, reason) = wt.closed().await;
    assert_eq!(code, 1008, "{reason}");
}

/// As over WebSocket: a session that stops reading its stream is closed when its queue
/// overflows, not when the write the edge is stuck on gives up (`write_timeout`, 60 s here).
#[tokio::test]
async fn a_stalled_reader_is_closed_at_overflow_not_after_the_write_timeout() {
    let t = start(|f| {
        f.session.outbound_queue_bytes = 256 * 1024;
        f.session.write_timeout = Duration::from_secs(60);
    })
    .await;
    // A client whose stream window is small: the edge's writes to it block after 16 KiB, and
    // stay blocked, as the client never reads again after its subscribe.
    let mut config = client_config(&t);
    let mut transport = wtransport::quinn::TransportConfig::default();
    transport
        .stream_receive_window(wtransport::quinn::VarInt::from_u32(16 * 1024))
        .keep_alive_interval(Some(Duration::from_secs(3)));
    config
        .quic_config_mut()
        .transport_config(std::sync::Arc::new(transport));
    let endpoint = Endpoint::client(config).unwrap();
    let mut wt = try_open_on(endpoint, &t, None).await.unwrap();
    let r = wt
        .request(json!({"id": 1, "op": "subscribe", "channel": "flood"}))
        .await;
    assert_eq!(r, json!({"id": 1, "ok": true}));
    // From here on the client never reads its stream.
    let mut publisher = t.connect().await;
    let payload = "z".repeat(60 * 1024);
    // ~3 MB: far more than the stream's window and the 256 KiB queue hold together.
    for i in 0..50u64 {
        let r = publisher
            .request(json!({"id": i, "op": "publish", "channel": "flood", "data": payload}))
            .await;
        assert_eq!(r["ok"], true);
    }
    let sample = "edgeplex_sessions{transport=\"webtransport\"}";
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while t.metric(sample).await != 0.0 {
        assert!(
            tokio::time::Instant::now() < until,
            "the stalled session was freed within 3 s of the overflow"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, reason) = wt.closed().await;
    assert_eq!(code, 1013, "{reason}");
    assert_eq!(t.edge.state().hub.subscriber_count("flood"), 0);
}
