//! WebSocket clients against a real edge over TLS on loopback: the protocol, its errors, its
//! limits and its close codes.

mod common;

use std::time::Duration;

use common::{Client, start};
use edgeplex::protocol::Offset;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};

fn offset(v: &Value) -> Offset {
    v["offset"]
        .as_str()
        .expect("offset is a string")
        .parse()
        .expect("offset parses")
}

#[tokio::test]
async fn welcome_subscribe_publish_receive_in_order() {
    let t = start(|_| {}).await;
    let mut a = t.connect().await;
    let mut b = t.connect().await;
    assert_eq!(
        a.welcome["server"],
        format!("edgeplex/{}", env!("CARGO_PKG_VERSION"))
    );
    assert_ne!(a.welcome["session"], b.welcome["session"]);

    a.subscribe(1, "prices").await;
    for i in 0..20 {
        let r = b
            .request(json!({"id": 100 + i, "op": "publish", "channel": "prices", "data": {"p": i}}))
            .await;
        assert_eq!(r, json!({"id": 100 + i, "ok": true}));
    }
    let mut last: Option<Offset> = None;
    for i in 0..20 {
        let m = a.recv().await;
        assert_eq!(m["op"], "message");
        assert_eq!(m["channel"], "prices");
        assert_eq!(m["data"], json!({"p": i}));
        let o = offset(&m);
        if let Some(prev) = last {
            assert!(o > prev, "offsets increase: {prev} then {o}");
        }
        last = Some(o);
    }
    // The publisher, not subscribed, received nothing but its replies.
    let r = b.request(json!({"id": 1, "op": "ping"})).await;
    assert_eq!(r, json!({"id": 1, "ok": true}));
}

#[tokio::test]
async fn publisher_subscribed_to_its_channel_gets_its_own_message() {
    let t = start(|_| {}).await;
    let mut a = t.connect().await;
    a.subscribe(1, "room").await;
    a.send(json!({"id": 2, "op": "publish", "channel": "room", "data": "hi"}))
        .await;
    let first = a.recv().await;
    let second = a.recv().await;
    let mut got = [first, second];
    got.sort_by_key(|v| v.get("op").is_none());
    assert_eq!(got[0]["data"], "hi");
    assert_eq!(got[1], json!({"id": 2, "ok": true}));
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let t = start(|_| {}).await;
    let mut a = t.connect().await;
    let mut b = t.connect().await;
    a.subscribe(1, "news").await;
    b.request(json!({"id": 1, "op": "publish", "channel": "news", "data": 1}))
        .await;
    assert_eq!(a.recv().await["data"], 1);
    let r = a
        .request(json!({"id": 2, "op": "unsubscribe", "channel": "news"}))
        .await;
    assert_eq!(r, json!({"id": 2, "ok": true}));
    b.request(json!({"id": 2, "op": "publish", "channel": "news", "data": 2}))
        .await;
    // Frames on one session are ordered: had the publish reached `a`, it would come before the
    // reply to this ping.
    let r = a.request(json!({"id": 3, "op": "ping"})).await;
    assert_eq!(r, json!({"id": 3, "ok": true}));
    assert_eq!(
        t.edge.state().hub.channel_count(),
        0,
        "the last unsubscribe frees the channel"
    );
}

#[tokio::test]
async fn ping_gets_a_reply_with_and_without_id() {
    let t = start(|_| {}).await;
    let mut a = t.connect().await;
    assert_eq!(
        a.request(json!({"id": 7, "op": "ping"})).await,
        json!({"id": 7, "ok": true})
    );
    assert_eq!(a.request(json!({"op": "ping"})).await, json!({"ok": true}));
}

async fn expect_error(c: &mut Client, frame: Message, id: Option<u64>, code: &str) -> Value {
    c.send_raw(frame).await;
    let r = c.recv().await;
    assert_eq!(r["error"]["code"], code, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{r}"
    );
    match id {
        Some(id) => assert_eq!(r["id"], id, "{r}"),
        None => assert!(r.get("id").is_none(), "{r}"),
    }
    r
}

fn text(v: Value) -> Message {
    Message::text(v.to_string())
}

#[tokio::test]
async fn bad_requests_get_error_replies_and_the_session_survives() {
    let t = start(|_| {}).await;
    let mut c = t.connect().await;
    // (frame, id the reply must carry, error code)
    let cases: Vec<(Message, Option<u64>, &str)> = vec![
        (Message::text("not json"), None, "bad_request"),
        (Message::text("[1,\"ping\"]"), None, "bad_request"),
        (Message::binary(vec![1u8, 2, 3]), None, "bad_request"),
        (text(json!({"id": 1})), Some(1), "bad_request"),
        (
            text(json!({"id": 2, "op": "subscribe"})),
            Some(2),
            "bad_request",
        ),
        (
            text(json!({"id": 3, "op": "subscribe", "channel": "bad channel!"})),
            Some(3),
            "bad_request",
        ),
        (
            text(json!({"id": 4, "op": "subscribe", "channel": "x".repeat(201)})),
            Some(4),
            "bad_request",
        ),
        (
            text(json!({"id": 5, "op": "subscribe", "channel": 5})),
            Some(5),
            "bad_request",
        ),
        (
            text(json!({"id": 6, "op": "subscribe", "channel": "a", "since": "yesterday"})),
            Some(6),
            "bad_request",
        ),
        (
            text(json!({"id": 7, "op": "publish", "channel": "a"})),
            Some(7),
            "bad_request",
        ),
        (
            text(json!({"id": "eight", "op": "ping"})),
            None,
            "bad_request",
        ),
        (
            Message::text(r#"{"id":12,"op":"publish","channel":"a","data":1e400}"#),
            Some(12),
            "bad_request",
        ),
        (
            text(json!({"id": 9, "op": "launch"})),
            Some(9),
            "unknown_op",
        ),
        (
            text(json!({"id": 10, "op": "unsubscribe", "channel": "never"})),
            Some(10),
            "not_subscribed",
        ),
    ];
    for (frame, id, code) in cases {
        let r = expect_error(&mut c, frame, id, code).await;
        if id == Some(3) {
            assert!(
                r["error"]["message"].as_str().unwrap().contains("channel"),
                "{r}"
            );
        }
    }
    // Still a working session.
    c.subscribe(11, "ok").await;
}

#[tokio::test]
async fn limits_reached_from_the_wire() {
    let t = start(|f| {
        f.session.max_message_bytes = 1024;
        f.session.close_message_bytes = 4096;
        f.session.max_channels = 2;
        f.server.max_channels = 3;
    })
    .await;
    let mut c = t.connect().await;
    // too_large: a message over max_message_bytes is refused unread (so the reply has no id
    // when the id lies past what `peek_id` looks at), and the session goes on.
    let big = json!({"id": 1, "op": "publish", "channel": "a", "data": "x".repeat(2000)});
    expect_error(&mut c, text(big), None, "too_large").await;
    // An id written first is peeked at, so the refusal can be matched (edgeplex.js does this).
    let big = format!(
        r#"{{"id":9,"op":"publish","channel":"a","data":"{}"}}"#,
        "x".repeat(2000)
    );
    expect_error(&mut c, Message::text(big), Some(9), "too_large").await;
    // too_large: more channels than a session may hold.
    c.subscribe(2, "a").await;
    c.subscribe(3, "b").await;
    expect_error(
        &mut c,
        text(json!({"id": 4, "op": "subscribe", "channel": "c"})),
        Some(4),
        "too_large",
    )
    .await;
    // unavailable: the node's channel table is full.
    let mut d = t.connect().await;
    d.subscribe(1, "c").await;
    expect_error(
        &mut d,
        text(json!({"id": 2, "op": "subscribe", "channel": "d"})),
        Some(2),
        "unavailable",
    )
    .await;
    // Joining a channel that exists is still fine at the cap.
    d.subscribe(3, "a").await;
    assert_eq!(
        t.metric("edgeplex_errors_total{code=\"too_large\"}").await,
        3.0
    );
    assert_eq!(
        t.metric("edgeplex_errors_total{code=\"unavailable\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn forbidden_when_the_rules_let_no_client_publish() {
    let t = start(|f| common::channel_rules(f, &[("*", "anyone", "nobody")])).await;
    let mut c = t.connect().await;
    let frame = text(json!({"id": 1, "op": "publish", "channel": "a", "data": 1}));
    expect_error(&mut c, frame, Some(1), "forbidden").await;
}

#[tokio::test]
async fn message_over_the_close_cap_closes_with_1009() {
    let t = start(|f| {
        f.session.max_message_bytes = 1024;
        f.session.close_message_bytes = 4096;
    })
    .await;
    let mut c = t.connect().await;
    c.send_raw(Message::text("x".repeat(10_000))).await;
    let (code, reason, _) = c.until_close().await;
    assert_eq!(code, 1009, "{reason}");
}

/// 1 message per second after a burst of 5; closed after 10 refusals in a row.
fn tight_budget(f: &mut edgeplex::config::FileConfig) {
    f.session.messages_per_second = 1;
    f.session.message_burst = 5;
    f.session.close_after_refusals = 10;
}

#[tokio::test]
async fn message_flood_is_rate_limited_then_closed_with_1008() {
    let t = start(tight_budget).await;
    let mut c = t.connect().await;
    for i in 0..30u64 {
        // A send may fail once the edge has closed the session.
        let _ = c.ws.send(text(json!({"id": i, "op": "ping"}))).await;
    }
    let (code, _, before) = c.until_close().await;
    assert_eq!(code, 1008);
    let ok = before.iter().filter(|v| v["ok"] == true).count();
    let limited: Vec<&Value> = before
        .iter()
        .filter(|v| v["error"]["code"] == "rate_limited")
        .collect();
    assert_eq!(ok, 5, "the burst passes: {before:?}");
    assert_eq!(
        limited.len(),
        10,
        "then refusals until the close: {before:?}"
    );
    assert!(
        limited
            .iter()
            .all(|v| v["error"]["retry_after_ms"].as_u64().unwrap() > 0)
    );
    assert_eq!(limited[0]["id"], 5);
}

#[tokio::test]
async fn websocket_ping_flood_is_closed_with_1008() {
    let t = start(tight_budget).await;
    let mut c = t.connect().await;
    for _ in 0..50 {
        let _ = c.ws.send(Message::Ping(Default::default())).await;
    }
    let (code, _, _) = c.until_close().await;
    assert_eq!(code, 1008);
}

#[tokio::test]
async fn slow_consumer_is_closed_with_1013_while_fast_one_keeps_up() {
    const N: usize = 400;
    let t = start(|f| {
        f.session.outbound_queue = 16;
        f.session.write_timeout = Duration::from_secs(30);
    })
    .await;
    let mut fast = t.connect().await;
    let mut slow = t.connect().await;
    let mut publisher = t.connect().await;
    fast.subscribe(1, "firehose").await;
    slow.subscribe(1, "firehose").await;
    // Large payloads fill the slow client's socket buffers quickly; it does not read meanwhile.
    let payload = "y".repeat(32 * 1024);
    let reader = tokio::spawn(async move {
        let mut seen = 0;
        while seen < N {
            let m = fast.recv().await;
            if m["op"] == "message" {
                seen += 1;
            }
        }
        seen
    });
    for i in 0..N {
        let r = publisher
            .request(json!({"id": i, "op": "publish", "channel": "firehose", "data": payload}))
            .await;
        assert_eq!(r["ok"], true);
    }
    assert_eq!(
        reader.await.unwrap(),
        N,
        "the fast subscriber got every message"
    );
    // The edge closed it at the overflow, while this test was still publishing: the close frame
    // got through if its socket drained within a second of that; if not, the edge dropped the
    // connection instead.
    let mut before = 0;
    loop {
        match tokio::time::timeout(common::TIMEOUT, slow.ws.next())
            .await
            .expect("the slow subscriber's connection ends")
        {
            Some(Ok(Message::Text(_))) => before += 1,
            Some(Ok(Message::Close(frame))) => {
                let frame = frame.expect("a close frame with a code");
                assert_eq!(u16::from(frame.code), 1013, "{}", frame.reason);
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    assert!(before < N, "the slow subscriber was cut off");
    assert_eq!(
        t.metric("edgeplex_slow_consumer_closes_total{transport=\"websocket\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn shutdown_closes_sessions_with_1001() {
    let t = start(|_| {}).await;
    let mut a = t.connect().await;
    let mut b = t.connect().await;
    a.subscribe(1, "x").await;
    let common::TestEdge { edge, .. } = t;
    let report = tokio::spawn(edge.shutdown_within(Duration::from_secs(5)));
    for c in [&mut a, &mut b] {
        let (code, reason, _) = c.until_close().await;
        assert_eq!(code, 1001, "{reason}");
    }
    assert!(
        report.await.unwrap().clean,
        "every session ended within the grace period"
    );
}

#[tokio::test]
async fn draining_edge_refuses_new_sessions_and_reports_not_ready() {
    let t = start(|_| {}).await;
    let mut a = t.connect().await;
    // `silent` never reads, so the edge waits out its close handshake (1 s): the drain stays
    // open while we look at it.
    let _silent = t.connect().await;
    a.subscribe(1, "x").await;
    let admin = t.admin_url("/readyz");
    assert_eq!(reqwest::get(&admin).await.unwrap().status(), 200);
    let common::TestEdge { edge, tls, .. } = t;
    let addr = edge.tls_addr();
    let state = edge.state().clone();
    let shutdown = tokio::spawn(edge.shutdown_within(Duration::from_secs(5)));
    let (code, _, _) = a.until_close().await;
    assert_eq!(code, 1001);
    assert!(state.is_draining());
    let r = reqwest::get(&admin).await.unwrap();
    assert_eq!(r.status(), 503, "not ready while draining");
    assert_eq!(r.text().await.unwrap(), "draining\n");
    // The public listener is closed: new TCP connections are refused.
    let refused = tokio::net::TcpStream::connect(addr).await;
    if let Ok(tcp) = refused {
        // The listener may still be closing; a handshake must not produce a session.
        let r = tokio_rustls::TlsConnector::from(tls)
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await;
        assert!(r.is_err(), "no TLS session on a draining edge");
    }
    assert!(shutdown.await.unwrap().clean);
}

#[tokio::test]
async fn origin_not_allowed_gets_403_before_the_handshake() {
    let t = start(|f| {
        f.admission.allowed_origins = vec!["https://app.example.com".into()];
        f.admission.allow_missing_origin = false;
    })
    .await;
    match t.try_connect(Some("https://evil.example.com")).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    match t.try_connect(None).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403 without Origin, got {other:?}"),
    }
    assert!(t.try_connect(Some("https://app.example.com")).await.is_ok());
    assert_eq!(
        t.metric("edgeplex_refusals_total{reason=\"origin\"}").await,
        2.0
    );
}

#[tokio::test]
async fn session_cap_answers_503_with_retry_after() {
    let t = start(|f| f.server.max_sessions = 1).await;
    let _a = t.connect().await;
    match t.try_connect(None).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!("expected 503, got {other:?}"),
    }
    drop(_a);
    // The slot comes back once the first session is gone.
    let mut ok = false;
    for _ in 0..50 {
        if t.try_connect(None).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a freed session slot is reused");
}

#[tokio::test]
async fn silent_client_is_closed_after_the_idle_timeout() {
    let t = start(|f| {
        f.session.ping_interval = Duration::from_millis(200);
        f.session.idle_timeout = Duration::from_millis(700);
    })
    .await;
    let mut c = t.connect().await;
    // Not reading means not answering pings: the edge hears nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, reason, _) = c.until_close().await;
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
}

#[tokio::test]
async fn live_client_answers_pings_and_stays() {
    let t = start(|f| {
        f.session.ping_interval = Duration::from_millis(100);
        f.session.idle_timeout = Duration::from_millis(350);
    })
    .await;
    let mut c = t.connect().await;
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(1200);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, c.ws.next()).await {
        match m {
            Message::Ping(_) => pings += 1,
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => {}
        }
    }
    assert!(pings >= 3, "the edge pings on its interval ({pings} pings)");
    assert_eq!(c.request(json!({"id": 1, "op": "ping"})).await["ok"], true);
}

#[tokio::test]
async fn admin_reports_health_readiness_and_metrics() {
    let t = start(|_| {}).await;
    assert_eq!(t.admin_get("/healthz").await, (200, "ok\n".into()));
    assert_eq!(t.admin_get("/readyz").await, (200, "ready\n".into()));
    let mut a = t.connect().await;
    let mut b = t.connect().await;
    a.subscribe(1, "m").await;
    b.request(json!({"id": 1, "op": "publish", "channel": "m", "data": 1}))
        .await;
    a.recv().await;
    b.request(json!({"id": 2, "op": "bogus"})).await;
    assert_eq!(
        t.metric("edgeplex_sessions{transport=\"websocket\"}").await,
        2.0
    );
    assert_eq!(t.metric("edgeplex_channels").await, 1.0);
    assert_eq!(t.metric("edgeplex_publishes_total").await, 1.0);
    assert_eq!(
        t.metric("edgeplex_errors_total{code=\"unknown_op\"}").await,
        1.0
    );
    assert_eq!(
        t.metric("edgeplex_messages_in_total{transport=\"websocket\"}")
            .await,
        3.0
    );
    // Welcome ×2, subscribe reply, push, publish reply, error reply.
    assert_eq!(
        t.metric("edgeplex_messages_out_total{transport=\"websocket\"}")
            .await,
        6.0
    );
    drop(a);
    let mut sessions = 2.0;
    for _ in 0..50 {
        sessions = t.metric("edgeplex_sessions{transport=\"websocket\"}").await;
        if sessions == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sessions, 1.0, "a closed session leaves the gauge");
    let (status, _) = t.admin_get("/nope").await;
    assert_eq!(status, 404);
}

/// Fills a non-reading subscriber's socket until the edge's writes to it block.
async fn stall_subscriber(t: &common::TestEdge, channel: &str) -> (Client, Client) {
    let mut stalled = t.connect().await;
    stalled.subscribe(1, channel).await;
    let mut publisher = t.connect().await;
    let payload = "z".repeat(60 * 1024);
    // ~12 MB: more than loopback socket buffers hold on both sides.
    for i in 0..200u64 {
        let r = publisher
            .request(json!({"id": i, "op": "publish", "channel": channel, "data": payload}))
            .await;
        assert_eq!(r["ok"], true);
    }
    (stalled, publisher)
}

#[tokio::test]
async fn a_stalled_writer_does_not_stop_reading_the_client() {
    let t = start(|f| {
        f.session.outbound_queue = 100_000;
        f.session.outbound_queue_bytes = 1 << 30;
        f.session.write_timeout = Duration::from_secs(60);
    })
    .await;
    let (mut stalled, _publisher) = stall_subscriber(&t, "flood").await;
    assert_eq!(t.edge.state().hub.subscriber_count("flood"), 1);
    // The edge cannot write to this client, yet it still reads it: the unsubscribe takes effect.
    stalled
        .send(json!({"id": 2, "op": "unsubscribe", "channel": "flood"}))
        .await;
    let mut left = false;
    for _ in 0..100 {
        if t.edge.state().hub.subscriber_count("flood") == 0 {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        left,
        "the unsubscribe was read while the write side was blocked"
    );
}

#[tokio::test]
async fn shutdown_is_clean_within_grace_even_with_a_stalled_client() {
    let t = start(|f| {
        f.session.outbound_queue = 100_000;
        f.session.outbound_queue_bytes = 1 << 30;
        f.session.write_timeout = Duration::from_secs(60);
    })
    .await;
    let (_stalled, _publisher) = stall_subscriber(&t, "flood").await;
    let common::TestEdge { edge, .. } = t;
    let started = tokio::time::Instant::now();
    let report = edge.shutdown_within(Duration::from_secs(5)).await;
    assert!(
        report.clean,
        "every task ended although one client never reads"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_write_that_outlasts_write_timeout_closes_the_session_as_slow() {
    let t = start(|f| {
        f.session.outbound_queue = 100_000;
        f.session.outbound_queue_bytes = 1 << 30;
        f.session.write_timeout = Duration::from_millis(300);
    })
    .await;
    let (_stalled, _publisher) = stall_subscriber(&t, "flood").await;
    let mut closed = false;
    for _ in 0..100 {
        if t.metric("edgeplex_slow_consumer_closes_total{transport=\"websocket\"}")
            .await
            == 1.0
        {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(closed, "the stalled session was closed as a slow consumer");
    assert_eq!(t.edge.state().hub.subscriber_count("flood"), 0);
}

/// A WebSocket client whose socket has a small receive buffer (set before connecting, so the
/// window it advertises stays small), subscribed to `channel`. The test never reads it again.
async fn small_window_subscriber(t: &common::TestEdge, channel: &str) -> Client {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(t.edge.tls_addr()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(t.tls.clone())
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let req = format!("wss://localhost:{}/ws", t.edge.tls_addr().port())
        .into_client_request()
        .unwrap();
    let (ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    let mut c = Client {
        ws,
        welcome: Value::Null,
        held: Default::default(),
    };
    c.welcome = c.recv().await;
    c.subscribe(1, channel).await;
    c
}

/// A subscriber that stops reading is closed when its queue overflows, not when the write the
/// edge is stuck on gives up (`write_timeout`, 60 s here): its session and connection are freed
/// within a bound of the overflow. Its full socket cannot take the close frame, so the edge
/// drops the connection after `CLOSE_HANDSHAKE_TIMEOUT` (1 s).
#[tokio::test]
async fn a_stalled_reader_is_closed_at_overflow_not_after_the_write_timeout() {
    let t = start(|f| {
        f.session.outbound_queue_bytes = 256 * 1024;
        f.session.write_timeout = Duration::from_secs(60);
    })
    .await;
    let _stalled = small_window_subscriber(&t, "flood").await;
    let mut publisher = t.connect().await;
    let payload = "z".repeat(60 * 1024);
    // ~12 MB: far more than the socket buffers and the 256 KiB queue hold together, so the
    // queue overflows while this runs.
    for i in 0..200u64 {
        let r = publisher
            .request(json!({"id": i, "op": "publish", "channel": "flood", "data": payload}))
            .await;
        assert_eq!(r["ok"], true);
    }
    let freed = t
        .metrics_reach(
            &[
                ("edgeplex_sessions{transport=\"websocket\"}", 1.0),
                ("edgeplex_connections", 1.0),
                (
                    "edgeplex_slow_consumer_closes_total{transport=\"websocket\"}",
                    1.0,
                ),
            ],
            Duration::from_secs(3),
        )
        .await;
    assert!(
        freed,
        "the stalled session and its connection were freed within 3 s of the overflow"
    );
    assert_eq!(t.edge.state().hub.subscriber_count("flood"), 0);
}

#[tokio::test]
async fn invalid_utf8_text_frame_is_closed_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let t = start(|_| {}).await;
    let mut c = t.connect().await;
    let frame = Frame::message(vec![0xff, 0xfe, b'{'], OpCode::Data(Data::Text), true);
    c.send_raw(Message::Frame(frame)).await;
    let (code, reason, _) = c.until_close().await;
    assert_eq!(code, 1007, "{reason}");
}

#[tokio::test]
async fn an_open_websocket_counts_as_a_connection() {
    let t = start(|_| {}).await;
    let _a = t.connect().await;
    let _b = t.connect().await;
    assert_eq!(t.metric("edgeplex_connections").await, 2.0);
}

#[tokio::test]
async fn the_subscribe_reply_comes_before_any_push() {
    // Each subscriber below resumes into a full history plus the live flood: room for it all.
    let t = start(|f| {
        f.session.outbound_queue = 100_000;
        f.session.outbound_queue_bytes = 1 << 30;
    })
    .await;
    let mut publisher = t.connect().await;
    let flood = tokio::spawn(async move {
        for i in 0..2000u64 {
            publisher
                .send(json!({"id": i, "op": "publish", "channel": "busy", "data": i}))
                .await;
        }
        publisher
    });
    for _ in 0..20 {
        let mut c = t.connect().await;
        c.send(json!({"id": 77, "op": "subscribe", "channel": "busy", "since": "1-1"}))
            .await;
        assert_eq!(
            c.recv().await,
            json!({"id": 77, "ok": true}),
            "the reply is the first frame"
        );
        assert_eq!(
            c.recv().await,
            json!({"op": "gap", "channel": "busy"}),
            "then the gap notice"
        );
    }
    flood.await.unwrap();
}

async fn publish_n(c: &mut Client, channel: &str, from: u64, n: u64) {
    for i in from..from + n {
        let r = c
            .request(json!({"id": i, "op": "publish", "channel": channel, "data": i}))
            .await;
        assert_eq!(r["ok"], true);
    }
}

/// Pushes received until the reply to a ping: what the session had been sent so far.
async fn drain_until_ping(c: &mut Client) -> Vec<Value> {
    c.send(json!({"id": 4242, "op": "ping"})).await;
    let mut out = Vec::new();
    loop {
        let f = c.recv().await;
        if f == json!({"id": 4242, "ok": true}) {
            return out;
        }
        out.push(f);
    }
}

#[tokio::test]
async fn resume_with_since_replays_exactly_the_missed_messages() {
    let t = start(|_| {}).await;
    let mut witness = t.connect().await;
    witness.subscribe(1, "log").await;
    let mut publisher = t.connect().await;
    publish_n(&mut publisher, "log", 0, 5).await;
    let seen = drain_until_ping(&mut witness).await;
    let offsets: Vec<&str> = seen.iter().map(|m| m["offset"].as_str().unwrap()).collect();

    // A client that saw message 1 comes back: it gets 2, 3, 4 and then live traffic, no gap.
    let mut back = t.connect().await;
    let r = back
        .request(json!({"id": 9, "op": "subscribe", "channel": "log", "since": offsets[1]}))
        .await;
    assert_eq!(r, json!({"id": 9, "ok": true}));
    let replayed = drain_until_ping(&mut back).await;
    assert_eq!(
        replayed,
        seen[2..].to_vec(),
        "exactly the missed messages, same offsets"
    );
    publish_n(&mut publisher, "log", 5, 1).await;
    assert_eq!(back.recv().await["data"], 5);

    // Up to date: nothing to replay, no gap.
    let mut current = t.connect().await;
    let last = seen.last().unwrap()["offset"].as_str().unwrap().to_string();
    let latest = drain_until_ping(&mut witness).await;
    let newest = latest.last().unwrap()["offset"].as_str().unwrap();
    current
        .request(json!({"id": 1, "op": "subscribe", "channel": "log", "since": newest}))
        .await;
    assert!(drain_until_ping(&mut current).await.is_empty());
    assert_ne!(last, newest);
}

#[tokio::test]
async fn resume_from_before_the_history_gets_a_gap_then_what_is_kept() {
    let t = start(|f| f.bus.history_len = 3).await;
    let mut witness = t.connect().await;
    witness.subscribe(1, "short").await;
    let mut publisher = t.connect().await;
    publish_n(&mut publisher, "short", 0, 6).await;
    let seen = drain_until_ping(&mut witness).await;
    let mut back = t.connect().await;
    back.request(
        json!({"id": 1, "op": "subscribe", "channel": "short", "since": seen[0]["offset"]}),
    )
    .await;
    let got = drain_until_ping(&mut back).await;
    assert_eq!(got[0], json!({"op": "gap", "channel": "short"}));
    assert_eq!(
        got[1..].to_vec(),
        seen[3..].to_vec(),
        "the 3 kept messages follow the gap"
    );
    // An offset from another run of the edge (or made up) is not in the history either.
    let mut stranger = t.connect().await;
    stranger
        .request(json!({"id": 1, "op": "subscribe", "channel": "short", "since": "1-1"}))
        .await;
    assert_eq!(drain_until_ping(&mut stranger).await[0]["op"], "gap");
}

#[tokio::test]
async fn resume_during_a_flood_loses_and_repeats_nothing() {
    let t = start(|_| {}).await;
    let mut witness = t.connect().await;
    witness.subscribe(1, "flow").await;
    let mut publisher = t.connect().await;
    publish_n(&mut publisher, "flow", 0, 50).await;
    let head = drain_until_ping(&mut witness).await;
    let since = head[9]["offset"].clone();
    let flood = tokio::spawn(async move {
        publish_n(&mut publisher, "flow", 50, 300).await;
        publisher
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut back = t.connect().await;
    let r = back
        .request(json!({"id": 1, "op": "subscribe", "channel": "flow", "since": since}))
        .await;
    assert_eq!(r["ok"], true);
    flood.await.unwrap();
    let mut got = Vec::new();
    while got.len() < 340 {
        let m = back.recv().await;
        assert_eq!(m["op"], "message", "no gap: {m}");
        got.push(m["data"].as_i64().unwrap());
    }
    assert_eq!(
        got,
        (10..350).collect::<Vec<_>>(),
        "every message after `since` once, in order"
    );
}

#[tokio::test]
async fn since_past_the_newest_offset_gets_a_gap_and_live_traffic_still_flows() {
    let t = start(|_| {}).await;
    let mut publisher = t.connect().await;
    publish_n(&mut publisher, "clock", 0, 2).await;
    let mut c = t.connect().await;
    // From the future (another node's run, a clock that went back, or made up).
    c.request(json!({"id": 1, "op": "subscribe", "channel": "clock", "since": "99999999999999-0"}))
        .await;
    assert_eq!(c.recv().await, json!({"op": "gap", "channel": "clock"}));
    publish_n(&mut publisher, "clock", 2, 1).await;
    assert_eq!(c.recv().await["data"], 2, "live messages are not skipped");
}

#[tokio::test]
async fn a_replay_longer_than_the_queue_is_cut_with_a_gap_instead_of_closing() {
    let t = start(|f| f.session.outbound_queue = 10).await;
    let mut witness = t.connect().await;
    witness.subscribe(1, "long").await;
    let mut publisher = t.connect().await;
    for i in 0..50u64 {
        let _ = publisher
            .request(json!({"id": i, "op": "publish", "channel": "long", "data": i}))
            .await;
        // Keep the witness's own queue (10) from overflowing.
        let _ = witness.recv().await;
    }
    let mut back = t.connect().await;
    let r = back
        .request(json!({"id": 1, "op": "subscribe", "channel": "long", "since": "0-0"}))
        .await;
    assert_eq!(r, json!({"id": 1, "ok": true}));
    let got = drain_until_ping(&mut back).await;
    assert_eq!(got[0], json!({"op": "gap", "channel": "long"}));
    let data: Vec<i64> = got[1..]
        .iter()
        .map(|m| m["data"].as_i64().unwrap())
        .collect();
    assert_eq!(
        data,
        (45..50).collect::<Vec<_>>(),
        "the newest that fit half the queue"
    );
}
