//! The Redis bus's subscriber connection against a real `redis-server` (started per test on a
//! free port), reached directly or through a relay the test can make go silent: finding a
//! half-open connection, batching subscribes without one lock across round trips, the invariant
//! that a channel dropped and joined at once stays subscribed, and the ingest cap.

mod common;

use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::relay::Relay;
use common::{Client, TestEdge, start};
use serde_json::json;

/// A backend's raw `PUBLISH` on the real server, past any relay.
fn backend_publish(redis: &RedisServer, channel: &str, data: &str) {
    redis::cmd("PUBLISH")
        .arg(format!("edgeplex:{channel}"))
        .arg(data)
        .query::<i64>(&mut redis.connection())
        .unwrap();
}

/// How many times Redis ran `command` so far (`INFO commandstats`).
fn calls(redis: &RedisServer, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.connection())
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Reads until a push with `data` arrives; returns the frames before it.
async fn until_data(c: &mut Client, data: &str) -> Vec<serde_json::Value> {
    let mut before = Vec::new();
    loop {
        let f = c.recv().await;
        if f["op"] == "message" && f["data"] == data {
            return before;
        }
        before.push(f);
    }
}

async fn node_via(url: String, edit: impl FnOnce(&mut edgeplex::config::FileConfig)) -> TestEdge {
    let t = start(move |f| {
        f.bus.redis_url = url;
        edit(f);
    })
    .await;
    t.wait_ready(true).await;
    t
}

#[tokio::test]
async fn a_silent_redis_path_is_found_within_15s_by_default_then_resubscribed_with_a_gap() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port).await;
    // The shipped defaults for the ping interval and its deadline.
    let t = node_via(relay.url(), |_| {}).await;
    let mut a = t.connect().await;
    a.subscribe(1, "feed").await;
    backend_publish(&redis, "feed", "\"before\"");
    assert!(until_data(&mut a, "before").await.is_empty());

    relay.silence();
    let silenced = Instant::now();
    while t.ready().await {
        assert!(
            silenced.elapsed() < Duration::from_secs(15),
            "/readyz still 200 15 s after the Redis path went silent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(t.admin_get("/readyz").await.0, 503);
    assert!(t.metric("edgeplex_redis_ping_failures_total").await >= 1.0);

    relay.resume();
    t.wait_ready(true).await;
    // The new connection holds the subscription; the stale one is gone once the relay passes on
    // the edge's close.
    redis.wait_numsub("edgeplex:feed", 1).await;
    assert_eq!(a.recv().await, json!({"op": "gap", "channel": "feed"}));
    backend_publish(&redis, "feed", "\"after\"");
    assert!(until_data(&mut a, "after").await.is_empty());
    assert!(t.metric("edgeplex_redis_reconnects_total").await >= 1.0);
}

#[tokio::test]
async fn joining_a_subscribed_channel_does_not_wait_behind_another_channels_subscribe() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port).await;
    let t = node_via(relay.url(), |f| {
        f.bus.redis_timeout = Duration::from_secs(3);
        f.bus.redis_ping_interval = Duration::from_secs(60);
    })
    .await;
    let mut a = t.connect().await;
    a.subscribe(1, "hot").await;
    let mut b = t.connect().await;
    let mut c = t.connect().await;

    relay.silence();
    // b's channel needs a SUBSCRIBE round trip, which now hangs until the deadline...
    b.send(json!({"id": 1, "op": "subscribe", "channel": "cold"}))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...but "hot" is subscribed already: c's answer needs no Redis at all.
    let asked = Instant::now();
    let r = c
        .request(json!({"id": 1, "op": "subscribe", "channel": "hot"}))
        .await;
    assert_eq!(r, json!({"id": 1, "ok": true}));
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "c waited {:?} behind b's round trip",
        asked.elapsed()
    );
    let r = b.recv().await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    relay.resume();
}

#[tokio::test]
async fn concurrent_subscribes_share_subscribe_commands() {
    const N: usize = 100;
    let redis = RedisServer::start();
    let t = node_via(redis.url(), |_| {}).await;
    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(t.connect().await);
    }
    let before = calls(&redis, "subscribe");
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(json!({"id": 1, "op": "subscribe", "channel": format!("c{i}")}))
            .await;
    }
    for c in &mut clients {
        assert_eq!(c.recv().await, json!({"id": 1, "ok": true}));
    }
    let used = calls(&redis, "subscribe") - before;
    assert!(
        used <= (N / 4) as u64,
        "{N} concurrent subscribes to new channels took {used} SUBSCRIBE commands"
    );
    for i in 0..N {
        assert_eq!(redis.numsub(&format!("edgeplex:c{i}")), 1);
    }
    // Dropped together, they leave in a few UNSUBSCRIBEs too.
    let before = calls(&redis, "unsubscribe");
    drop(clients);
    for i in 0..N {
        redis.wait_numsub(&format!("edgeplex:c{i}"), 0).await;
    }
    let used = calls(&redis, "unsubscribe") - before;
    assert!(used <= 5, "{N} drops took {used} UNSUBSCRIBE commands");
    assert_eq!(t.metric("edgeplex_redis_subscriptions").await, 0.0);
}

#[tokio::test]
async fn a_channel_dropped_and_joined_again_at_once_stays_subscribed() {
    let redis = RedisServer::start();
    // PINGs between the SUBSCRIBEs and UNSUBSCRIBEs, answered in turn.
    let t = node_via(redis.url(), |f| {
        f.bus.redis_ping_interval = Duration::from_millis(100)
    })
    .await;
    let mut a = t.connect().await;
    let mut b = t.connect().await;
    for round in 0..30 {
        let ch = format!("flip{}", round % 3);
        a.subscribe(1, &ch).await;
        // The last subscriber leaves and another joins at the same moment.
        a.send(json!({"id": 2, "op": "unsubscribe", "channel": ch}))
            .await;
        b.send(json!({"id": 3, "op": "subscribe", "channel": ch}))
            .await;
        assert_eq!(a.recv().await["ok"], true);
        assert_eq!(b.recv().await["ok"], true);
        // Past any delayed unsubscribe, b is still served.
        tokio::time::sleep(Duration::from_millis(if round % 10 == 0 { 400 } else { 5 })).await;
        assert_eq!(redis.numsub(&format!("edgeplex:{ch}")), 1, "round {round}");
        let data = format!("\"r{round}\"");
        backend_publish(&redis, &ch, &data);
        assert!(until_data(&mut b, &format!("r{round}")).await.is_empty());
        let r = b
            .request(json!({"id": 4, "op": "unsubscribe", "channel": ch}))
            .await;
        assert_eq!(r["ok"], true);
    }
    assert_eq!(t.metric("edgeplex_redis_ping_failures_total").await, 0.0);
    assert_eq!(t.metric("edgeplex_redis_reconnects_total").await, 0.0);
}

/// The next frame within `d`, if any.
async fn recv_within(c: &mut Client, d: Duration) -> Option<serde_json::Value> {
    tokio::time::timeout(d, c.recv()).await.ok()
}

/// Messages arriving faster than the node delivers them past the ingest cap are not an outage:
/// the connection stays, only the flooded channel loses messages, and its subscribers get one
/// gap notice in order (after what came before the loss, before what came after); a subscriber
/// of another channel hears nothing of it.
#[tokio::test]
async fn an_ingest_overflow_drops_only_the_flooded_channels_messages_and_gaps_them_in_order() {
    let redis = RedisServer::start();
    let t = node_via(redis.url(), |f| {
        f.bus.redis_ingest_queue = 8;
        // The test reads as fast as it can; only the ingest cap is meant to be hit.
        f.session.outbound_queue = 100_000;
        f.session.outbound_queue_bytes = 64 << 20;
    })
    .await;
    let mut a = t.connect().await;
    a.subscribe(1, "flood").await;
    let mut b = t.connect().await;
    b.subscribe(1, "quiet").await;
    // Thousands of messages a write: they reach the edge faster than it delivers them.
    for round in 0..3 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("PUBLISH")
                .arg("edgeplex:flood")
                .arg(round * 1000 + i)
                .ignore();
        }
        pipe.query::<()>(&mut redis.connection()).unwrap();
    }
    // Then live messages until one arrives (one that came while the queue was still full is
    // dropped like the flood).
    let mut frames = Vec::new();
    'live: for k in 0..50 {
        backend_publish(&redis, "flood", &format!("\"live{k}\""));
        while let Some(f) = recv_within(&mut a, Duration::from_millis(500)).await {
            let done = f["data"] == format!("live{k}");
            frames.push(f);
            if done {
                break 'live;
            }
        }
    }
    assert_eq!(
        frames.last().map(|f| f["data"].is_string()),
        Some(true),
        "the flooded channel delivers live messages again"
    );
    assert!(t.metric("edgeplex_redis_ingest_overflows_total").await >= 1.0);
    // In order: a message that does not follow the one before it comes after a gap notice.
    let mut last: Option<i64> = None;
    let mut gap_since_last = false;
    let mut gaps = 0;
    for f in &frames {
        if f["op"] == "gap" {
            assert_eq!(f, &json!({"op": "gap", "channel": "flood"}));
            gaps += 1;
            gap_since_last = true;
            continue;
        }
        assert_eq!(f["op"], "message", "{f}");
        let Some(n) = f["data"].as_i64() else {
            continue;
        };
        if let Some(l) = last {
            assert!(n > l, "{n} after {l}: out of order");
            assert!(
                n == l + 1 || gap_since_last,
                "messages {} to {} were lost without a gap notice before {n}",
                l + 1,
                n - 1
            );
        } else {
            assert!(
                n == 0 || gap_since_last,
                "the first {n} were lost without a gap"
            );
        }
        last = Some(n);
        gap_since_last = false;
    }
    assert!(gaps >= 1, "the flood was cut, so its subscriber was told");
    // The quiet channel's subscriber lost nothing and is told nothing; nothing reconnected.
    backend_publish(&redis, "quiet", "\"q\"");
    let f = b.recv().await;
    assert_eq!(f["op"], "message", "the quiet channel got {f}");
    assert_eq!(f["data"], "q");
    assert_eq!(t.metric("edgeplex_redis_reconnects_total").await, 0.0);
    assert_eq!(redis.numsub("edgeplex:flood"), 1);
}

/// A subscribe cancelled while it waits for its SUBSCRIBE (here an HTTP/2 SSE request reset by
/// its client) must not leave the node subscribed in Redis to a channel nobody on it holds.
///
/// Each round holds the command task in a round trip (a PING through a silent relay) while an
/// UNSUBSCRIBE timer runs out, and meanwhile a channel is asked for and abandoned: when the
/// round trip ends, the timer and the SUBSCRIBE are both due, in either order. Before the fix,
/// about a quarter of the rounds left the abandoned channel subscribed for good.
#[tokio::test]
async fn a_subscribe_cancelled_while_its_subscribe_waits_leaves_no_redis_subscription() {
    const ROUNDS: usize = 20;
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port).await;
    let t = node_via(relay.url(), |f| {
        f.bus.redis_timeout = Duration::from_secs(5);
        f.bus.redis_ping_interval = Duration::from_millis(100);
    })
    .await;
    let mut a = t.connect().await;
    let http = common::sse_client::client(&t, true);
    for round in 0..ROUNDS {
        // A channel dropped just now: its UNSUBSCRIBE is due in 100 ms.
        a.subscribe(1, &format!("z{round}")).await;
        let r = a
            .request(json!({"id": 2, "op": "unsubscribe", "channel": format!("z{round}")}))
            .await;
        assert_eq!(r["ok"], true);
        // The next command (most likely the PING) hangs, and the timer runs out behind it.
        relay.silence();
        tokio::time::sleep(Duration::from_millis(150)).await;
        // A subscribe that waits for the command task, reset by its client.
        let url = common::sse_client::url(&t, &format!("channel=x{round}"));
        let asked = tokio::time::timeout(Duration::from_millis(200), http.get(url).send()).await;
        assert!(
            asked.is_err(),
            "round {round}: the subscribe cannot be answered yet"
        );
        relay.resume();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nobody holds any channel: within a few unsubscribe delays the node holds no subscription.
    assert_eq!(t.metric("edgeplex_channels").await, 0.0);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let held: Vec<String> = (0..ROUNDS)
            .map(|r| format!("edgeplex:x{r}"))
            .chain((0..ROUNDS).map(|r| format!("edgeplex:z{r}")))
            .filter(|c| redis.numsub(c) != 0)
            .collect();
        let gauge = t.metric("edgeplex_redis_subscriptions").await;
        if held.is_empty() && gauge == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still subscribed in Redis to {held:?} (edgeplex_redis_subscriptions = {gauge}) \
             though no client holds a channel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(t.metric("edgeplex_redis_reconnects_total").await, 0.0);
}
