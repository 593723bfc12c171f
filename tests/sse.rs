//! Server-Sent Events over TLS with HTTP/1.1 and HTTP/2: a real client (reqwest) and a stream
//! parser that follows the WHATWG rules (eventsource-stream), against a real edge.

mod common;

use std::time::Duration;

use common::sse_client::{client, data, next, open, url, welcome};
use common::{TestEdge, start};
use futures_util::StreamExt;
use serde_json::json;

const KEY: &str = "sse-test-admin-key-123456";

async fn sse_receives_what_websocket_and_backends_publish(h2: bool) {
    let t = start(|f| f.admin.api_key = KEY.into()).await;
    let mut events = open(&t, h2, "channel=news&channel=sports", None).await;
    welcome(&mut events).await;
    let mut ws = t.connect().await;
    let r = ws
        .request(json!({"id": 1, "op": "publish", "channel": "news", "data": {"h": "hello"}}))
        .await;
    assert_eq!(r["ok"], true);
    let e = next(&mut events).await;
    let push = data(&e);
    assert_eq!(push["op"], "message");
    assert_eq!(push["channel"], "news");
    assert_eq!(push["data"], json!({"h": "hello"}));
    assert_eq!(
        e.id,
        format!("{},-", push["offset"].as_str().unwrap()),
        "the event id is the position on each channel, in URL order; sports has no history"
    );

    let r = reqwest::Client::new()
        .post(t.admin_url("/v1/publish"))
        .bearer_auth(KEY)
        .body(r#"{"channel":"sports","data":"goal"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let e = next(&mut events).await;
    assert_eq!(data(&e)["channel"], "sports");
    assert_eq!(data(&e)["data"], "goal");
    assert_eq!(t.metric("edgeplex_sessions{transport=\"sse\"}").await, 1.0);
}

#[tokio::test]
async fn sse_over_http1_receives_websocket_and_backend_publishes() {
    sse_receives_what_websocket_and_backends_publish(false).await;
}

#[tokio::test]
async fn sse_over_http2_receives_websocket_and_backend_publishes() {
    sse_receives_what_websocket_and_backends_publish(true).await;
}

async fn publish(ws: &mut common::Client, channel: &str, from: i64, n: i64) {
    for i in from..from + n {
        let r = ws
            .request(json!({"id": i, "op": "publish", "channel": channel, "data": i}))
            .await;
        assert_eq!(r["ok"], true);
    }
}

#[tokio::test]
async fn reconnect_with_last_event_id_gets_exactly_the_missed_messages() {
    for h2 in [false, true] {
        let t = start(|_| {}).await;
        let mut ws = t.connect().await;
        let mut events = open(&t, h2, "channel=ticks", None).await;
        welcome(&mut events).await;
        publish(&mut ws, "ticks", 0, 3).await;
        let mut last_id = String::new();
        for i in 0..3 {
            let e = next(&mut events).await;
            assert_eq!(data(&e)["data"], i);
            last_id = e.id.clone();
        }
        drop(events);
        publish(&mut ws, "ticks", 3, 4).await;
        // What EventSource does on its own after a drop.
        let mut events = open(&t, h2, "channel=ticks", Some(&last_id)).await;
        welcome(&mut events).await;
        for i in 3..7 {
            let e = next(&mut events).await;
            assert_eq!(data(&e)["data"], i, "missed message {i}, once, in order");
        }
        publish(&mut ws, "ticks", 7, 1).await;
        assert_eq!(
            data(&next(&mut events).await)["data"],
            7,
            "then live traffic"
        );
    }
}

#[tokio::test]
async fn since_in_the_query_resumes_too_and_past_the_history_gives_a_gap() {
    // Keeps messages 2, 3 and 4 of the five.
    let t = start(|f| f.bus.history_len = 3).await;
    let mut ws = t.connect().await;
    let mut events = open(&t, false, "channel=short", None).await;
    welcome(&mut events).await;
    publish(&mut ws, "short", 0, 5).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(next(&mut events).await.id);
    }
    drop(events);
    // Within the history: exact.
    let mut events = open(&t, false, &format!("channel=short&since={}", ids[2]), None).await;
    welcome(&mut events).await;
    assert_eq!(data(&next(&mut events).await)["data"], 3);
    assert_eq!(data(&next(&mut events).await)["data"], 4);
    drop(events);
    // Older than the history: a gap notice, then what was kept.
    let mut events = open(&t, false, "channel=short", Some(&ids[0])).await;
    let w = welcome(&mut events).await;
    assert_eq!(
        w.id, ids[0],
        "the welcome event says where the client resumed from"
    );
    let gap = next(&mut events).await;
    assert_eq!(data(&gap), json!({"op": "gap", "channel": "short"}));
    // A gap notice has no id field, so the client's last event id stays where it was.
    assert_eq!(gap.id, ids[0], "a gap notice does not move the position");
    assert_eq!(data(&next(&mut events).await)["data"], 2);
}

#[tokio::test]
async fn quiet_stream_gets_heartbeats_and_a_retry_hint() {
    let t = start(|f| f.session.sse_heartbeat = Duration::from_millis(100)).await;
    let resp = client(&t, false)
        .get(url(&t, "channel=quiet"))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    let until = tokio::time::Instant::now() + Duration::from_millis(800);
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(until, body.next()).await {
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.starts_with("retry: 3000\n\n"), "{seen:?}");
    assert!(seen.matches(": keep-alive\n\n").count() >= 3, "{seen:?}");
}

#[tokio::test]
async fn refusals_before_the_stream_starts() {
    let t = start(|f| {
        f.session.max_channels = 2;
        f.server.max_sessions = 1;
        f.admission.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let c = client(&t, false);
    let status = |q: &'static str| {
        let c = c.clone();
        let u = url(&t, q);
        async move { c.get(u).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("").await, 400, "no channel");
    assert_eq!(status("channel=bad%20name").await, 400);
    assert_eq!(status("channel=a&since=nope").await, 400);
    assert_eq!(status("channel=a&channel=b&channel=c").await, 413);
    let r = c
        .get(url(&t, "channel=a"))
        .header("last-event-id", "garbage")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .get(url(&t, "channel=a"))
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // An allowed origin is echoed for EventSource across origins.
    let held = c
        .get(url(&t, "channel=a"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    assert_eq!(
        held.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    // The only session slot is taken by the stream above.
    let r = c.get(url(&t, "channel=a")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn shutdown_ends_the_stream() {
    let t = start(|_| {}).await;
    let mut events = open(&t, false, "channel=x", None).await;
    welcome(&mut events).await;
    let TestEdge { edge, .. } = t;
    let report = edge.shutdown_within(Duration::from_secs(5)).await;
    assert!(report.clean);
    let end = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap();
    assert!(end.is_none(), "the stream ended: {end:?}");
}

fn publish_url(t: &TestEdge) -> String {
    format!("https://localhost:{}/publish", t.edge.tls_addr().port())
}

#[tokio::test]
async fn an_sse_only_client_publishes_with_post() {
    let t = start(|f| f.admission.allowed_origins = vec!["https://app.example.com".into()]).await;
    let mut events = open(&t, true, "channel=chat", None).await;
    welcome(&mut events).await;
    let mut ws = t.connect().await;
    ws.subscribe(1, "chat").await;
    let c = client(&t, true);
    let r = c
        .post(publish_url(&t))
        .header("origin", "https://app.example.com")
        .header("content-type", "application/json")
        .body(r#"{"channel":"chat","data":{"text":"hi from SSE"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.text().await.unwrap(), r#"{"ok":true}"#);
    assert_eq!(
        data(&next(&mut events).await)["data"],
        json!({"text": "hi from SSE"})
    );
    assert_eq!(ws.recv().await["data"], json!({"text": "hi from SSE"}));
}

#[tokio::test]
async fn publish_preflight_and_errors() {
    let t = start(|f| {
        f.admission.allowed_origins = vec!["https://app.example.com".into()];
        f.session.max_message_bytes = 1024;
    })
    .await;
    let c = client(&t, false);
    let r = c
        .request(reqwest::Method::OPTIONS, publish_url(&t))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["access-control-allow-methods"], "POST");
    assert_eq!(
        r.headers()["access-control-allow-headers"],
        "content-type, authorization"
    );
    let r = c
        .request(reqwest::Method::OPTIONS, publish_url(&t))
        .header("origin", "https://evil.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "no preflight for an origin not allowed");

    let post = |body: String| {
        let c = c.clone();
        let u = publish_url(&t);
        async move {
            let r = c.post(u).body(body).send().await.unwrap();
            let status = r.status().as_u16();
            let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            (
                status,
                v["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }
    };
    assert_eq!(post("not json".into()).await, (400, "bad_request".into()));
    assert_eq!(
        post(r#"{"channel":"a b","data":1}"#.into()).await,
        (400, "bad_request".into())
    );
    assert_eq!(
        post(r#"{"channel":"a","data":1e400}"#.into()).await,
        (400, "bad_request".into())
    );
    let big = format!(r#"{{"channel":"a","data":"{}"}}"#, "x".repeat(2000));
    assert_eq!(post(big).await, (413, "too_large".into()));
    let r = c.get(publish_url(&t)).send().await.unwrap();
    assert_eq!(r.status(), 405);

    let closed = start(|f| common::channel_rules(f, &[("*", "anyone", "nobody")])).await;
    let r = client(&closed, false)
        .post(publish_url(&closed))
        .body(r#"{"channel":"a","data":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn publishes_over_one_connection_are_rate_limited_with_429() {
    let t = start(|f| {
        f.session.messages_per_second = 1;
        f.session.message_burst = 3;
    })
    .await;
    // One HTTP/2 connection carries every request of this client.
    let c = client(&t, true);
    let mut statuses = Vec::new();
    let mut retry = None;
    for _ in 0..5 {
        let r = c
            .post(publish_url(&t))
            .body(r#"{"channel":"a","data":1}"#)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            retry = r.headers().get("retry-after").cloned();
            let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            assert_eq!(v["error"]["code"], "rate_limited");
            assert!(v["error"]["retry_after_ms"].as_u64().unwrap() > 0);
        }
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_eq!(retry.unwrap(), "1");
}

/// The next event must be message `want` on `channel`, and nothing (no gap) before it.
async fn expect_message(
    events: &mut common::sse_client::Events,
    channel: &str,
    want: i64,
) -> String {
    let e = next(events).await;
    let d = data(&e);
    assert_eq!(
        (d["op"].as_str(), d["channel"].as_str(), d["data"].as_i64()),
        (Some("message"), Some(channel), Some(want)),
        "{e:?}"
    );
    e.id
}

#[tokio::test]
async fn a_stream_of_several_channels_resumes_exactly_on_each() {
    for h2 in [false, true] {
        let t = start(|_| {}).await;
        let mut ws = t.connect().await;
        // `a` has history when the stream opens; `b` has none.
        publish(&mut ws, "a", 0, 2).await;
        let mut events = open(&t, h2, "channel=a&channel=b", None).await;
        let w = welcome(&mut events).await;
        let (a_newest, b) = w.id.split_once(',').expect("one position per channel");
        assert_eq!(b, "-", "b had no history");
        assert!(a_newest.contains('-'), "a's newest offset: {a_newest}");

        publish(&mut ws, "a", 2, 1).await;
        publish(&mut ws, "b", 100, 1).await;
        expect_message(&mut events, "a", 2).await;
        let id = expect_message(&mut events, "b", 100).await;
        let (a_pos, b_pos) = id.split_once(',').unwrap();
        assert_ne!(a_pos, a_newest, "a moved on");
        assert_ne!(b_pos, "-", "b moved on");
        drop(events);

        // Interleaved while away; each channel resumes from its own position.
        publish(&mut ws, "b", 101, 1).await;
        publish(&mut ws, "a", 3, 2).await;
        publish(&mut ws, "b", 102, 1).await;
        let mut events = open(&t, h2, "channel=a&channel=b", Some(&id)).await;
        welcome(&mut events).await;
        let mut got: Vec<(String, i64)> = Vec::new();
        for _ in 0..4 {
            let d = data(&next(&mut events).await);
            assert_eq!(d["op"], "message", "no gap: {d}");
            got.push((
                d["channel"].as_str().unwrap().into(),
                d["data"].as_i64().unwrap(),
            ));
        }
        got.sort();
        let want = [("a", 3), ("a", 4), ("b", 101), ("b", 102)].map(|(c, n)| (c.to_string(), n));
        assert_eq!(got, want, "exactly the missed messages, none twice");
        publish(&mut ws, "b", 103, 1).await;
        expect_message(&mut events, "b", 103).await;
    }
}

#[tokio::test]
async fn the_welcome_event_carries_a_position_a_quiet_client_resumes_from() {
    let t = start(|_| {}).await;
    let mut ws = t.connect().await;
    publish(&mut ws, "q", 0, 3).await;
    // Opened after the three: nothing is replayed, but the welcome says where the stream is.
    let mut events = open(&t, false, "channel=q", None).await;
    let w = welcome(&mut events).await;
    assert!(!w.id.is_empty(), "the welcome event has an id");
    drop(events);
    publish(&mut ws, "q", 3, 2).await;
    let mut events = open(&t, false, "channel=q", Some(&w.id)).await;
    welcome(&mut events).await;
    expect_message(&mut events, "q", 3).await;
    expect_message(&mut events, "q", 4).await;
}

#[tokio::test]
async fn a_channel_without_history_at_open_resumes_behind_a_gap() {
    let t = start(|_| {}).await;
    let mut ws = t.connect().await;
    let mut events = open(&t, false, "channel=fresh", None).await;
    let w = welcome(&mut events).await;
    assert_eq!(w.id, "-");
    drop(events);
    // Still nothing published: nothing to report.
    let mut events = open(&t, false, "channel=fresh", Some("-")).await;
    welcome(&mut events).await;
    publish(&mut ws, "fresh", 0, 1).await;
    expect_message(&mut events, "fresh", 0).await;
    drop(events);
    // Published while away: replayed, behind a gap notice, since the edge cannot prove the
    // history kept the channel's first messages.
    publish(&mut ws, "fresh", 1, 1).await;
    let mut events = open(&t, false, "channel=fresh", Some("-")).await;
    welcome(&mut events).await;
    assert_eq!(
        data(&next(&mut events).await),
        json!({"op": "gap", "channel": "fresh"})
    );
    expect_message(&mut events, "fresh", 0).await;
    expect_message(&mut events, "fresh", 1).await;
}

#[tokio::test]
async fn a_position_that_does_not_name_every_channel_resumes_behind_a_gap_per_channel() {
    let t = start(|_| {}).await;
    let mut ws = t.connect().await;
    publish(&mut ws, "a", 0, 2).await;
    let mut events = open(&t, false, "channel=a", None).await;
    welcome(&mut events).await;
    publish(&mut ws, "a", 2, 1).await;
    // A one-channel id, brought to a stream of two.
    let id = expect_message(&mut events, "a", 2).await;
    drop(events);
    let mut events = open(&t, false, "channel=a&channel=b", Some(&id)).await;
    let w = welcome(&mut events).await;
    assert_eq!(w.id.split(',').count(), 2, "a fresh position: {}", w.id);
    let mut gaps = vec![
        data(&next(&mut events).await),
        data(&next(&mut events).await),
    ];
    gaps.sort_by_key(|v| v["channel"].as_str().unwrap().to_string());
    assert_eq!(
        gaps,
        [
            json!({"op": "gap", "channel": "a"}),
            json!({"op": "gap", "channel": "b"})
        ]
    );
    publish(&mut ws, "b", 10, 1).await;
    expect_message(&mut events, "b", 10).await;
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_cut_off_and_its_slot_freed() {
    let t = start(|f| {
        f.session.write_timeout = Duration::from_millis(500);
        f.server.max_sessions = 2;
    })
    .await;
    // Opens the stream and never reads the body.
    let stalled = client(&t, false)
        .get(url(&t, "channel=firehose"))
        .send()
        .await
        .unwrap();
    assert_eq!(stalled.status(), 200);
    let mut ws = t.connect().await;
    let payload = "p".repeat(60 * 1024);
    for i in 0..300 {
        let r = ws
            .request(json!({"id": i, "op": "publish", "channel": "firehose", "data": payload}))
            .await;
        assert_eq!(r["ok"], true);
    }
    let mut freed = false;
    for _ in 0..200 {
        if t.metric("edgeplex_sessions{transport=\"sse\"}").await == 0.0 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "the stalled stream was dropped");
    assert_eq!(t.edge.state().hub.subscriber_count("firehose"), 0);
    // Its session slot is free again: a new stream fits beside the WebSocket session.
    let mut events = open(&t, false, "channel=firehose", None).await;
    welcome(&mut events).await;
    drop(stalled);
}

/// A reader that stops reading is cut off when its queue overflows, not only once its oldest
/// frame has waited `write_timeout` (60 s here).
#[tokio::test]
async fn a_stalled_reader_is_cut_off_at_overflow_not_after_the_write_timeout() {
    let t = start(|f| {
        f.session.outbound_queue_bytes = 256 * 1024;
        f.session.write_timeout = Duration::from_secs(60);
    })
    .await;
    // Opens the stream and never reads the body.
    let stalled = client(&t, false)
        .get(url(&t, "channel=firehose"))
        .send()
        .await
        .unwrap();
    assert_eq!(stalled.status(), 200);
    let mut ws = t.connect().await;
    let payload = "p".repeat(60 * 1024);
    for i in 0..200 {
        let r = ws
            .request(json!({"id": i, "op": "publish", "channel": "firehose", "data": payload}))
            .await;
        assert_eq!(r["ok"], true);
    }
    let freed = t
        .metrics_reach(
            &[
                ("edgeplex_sessions{transport=\"sse\"}", 0.0),
                ("edgeplex_connections", 1.0),
                (
                    "edgeplex_slow_consumer_closes_total{transport=\"sse\"}",
                    1.0,
                ),
            ],
            Duration::from_secs(3),
        )
        .await;
    assert!(
        freed,
        "the stalled stream was dropped within 3 s of the overflow"
    );
    drop(stalled);
}

/// Behind an HTTP/2 proxy many clients share one connection: a stream whose reader stalls (its
/// flow-control window fills) is reset alone, and the other stream on the connection keeps
/// receiving.
#[tokio::test]
async fn a_stalled_http2_stream_is_reset_alone_and_its_neighbour_keeps_streaming() {
    use eventsource_stream::Eventsource;
    let t = start(|f| {
        f.session.outbound_queue_bytes = 256 * 1024;
        f.session.write_timeout = Duration::from_secs(60);
    })
    .await;
    let h2 = client(&t, true);
    let stalled = h2.get(url(&t, "channel=firehose")).send().await.unwrap();
    assert_eq!(stalled.version(), reqwest::Version::HTTP_2);
    let resp = h2.get(url(&t, "channel=firehose")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let mut reader: common::sse_client::Events = Box::pin(
        resp.bytes_stream()
            .eventsource()
            .map(|e| e.expect("a well-formed event stream")),
    );
    welcome(&mut reader).await;
    let mut ws = t.connect().await;
    assert_eq!(
        t.metric("edgeplex_connections").await,
        2.0,
        "both streams share one HTTP/2 connection"
    );
    let pad = "p".repeat(32 * 1024);
    // ~6.4 MB: more than the stalled stream's window (2 MiB), hyper's and h2's buffers and its
    // 256 KiB queue hold together. The reader keeps in step.
    for i in 0..200u64 {
        let r = ws
            .request(json!({"id": i, "op": "publish", "channel": "firehose", "data": {"i": i, "pad": pad}}))
            .await;
        assert_eq!(r["ok"], true);
        let e = next(&mut reader).await;
        assert_eq!(data(&e)["data"]["i"], i, "the reader gets every message");
    }
    let reset = t
        .metrics_reach(
            &[
                ("edgeplex_sessions{transport=\"sse\"}", 1.0),
                (
                    "edgeplex_slow_consumer_closes_total{transport=\"sse\"}",
                    1.0,
                ),
            ],
            Duration::from_secs(3),
        )
        .await;
    assert!(
        reset,
        "the stalled stream was ended within 3 s of the overflow"
    );
    assert_eq!(
        t.metric("edgeplex_connections").await,
        2.0,
        "the shared connection stays open"
    );
    // The stalled stream gives what its window held, then ends in a reset, not a clean end.
    let mut body = stalled.bytes_stream();
    let ended = tokio::time::timeout(common::TIMEOUT, async {
        loop {
            match body.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    })
    .await
    .expect("the stalled stream ends");
    assert!(ended.is_err(), "the stalled stream was reset");
    // The neighbour still streams on the same connection.
    let r = ws
        .request(json!({"id": 999, "op": "publish", "channel": "firehose", "data": {"i": 999}}))
        .await;
    assert_eq!(r["ok"], true);
    let e = next(&mut reader).await;
    assert_eq!(data(&e)["data"]["i"], 999);
    assert_eq!(t.metric("edgeplex_connections").await, 2.0);
}
