//! The Redis bus with a real `redis-server` (started per test on a free port) and several edge
//! nodes in one process: fan-out across nodes, backends in both directions, one Redis
//! subscription per channel per node, and surviving a Redis restart.

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;
use common::{Client, TestEdge, start};
use edgeplex::protocol::Offset;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "test-admin-key-0123456789";

async fn node(redis: &RedisServer) -> TestEdge {
    let url = redis.url();
    let t = start(move |f| {
        f.bus.redis_url = url;
        f.bus.redis_timeout = Duration::from_millis(500);
        f.admin.api_key = KEY.into();
    })
    .await;
    t.wait_ready(true).await;
    t
}

/// Reads frames until `n` pushes arrived; fails on anything unexpected.
async fn pushes(c: &mut Client, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = c.recv().await;
        assert_eq!(f["op"], "message", "{f}");
        out.push(f);
    }
    out
}

/// Proves nothing else is queued: the next frame is the reply to this ping.
async fn nothing_more(c: &mut Client) {
    assert_eq!(
        c.request(json!({"id": 999, "op": "ping"})).await,
        json!({"id": 999, "ok": true})
    );
}

#[tokio::test]
async fn a_publish_on_one_node_reaches_every_node_once_in_order() {
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await, node(&redis).await];
    let mut subs = Vec::new();
    for n in &nodes {
        for _ in 0..2 {
            let mut c = n.connect().await;
            c.subscribe(1, "room").await;
            subs.push(c);
        }
    }
    let mut publisher = nodes[0].connect().await;
    for i in 0..20 {
        let r = publisher
            .request(json!({"id": i, "op": "publish", "channel": "room", "data": {"n": i}}))
            .await;
        assert_eq!(r, json!({"id": i, "ok": true}));
    }
    let mut reference: Option<Vec<String>> = None;
    for c in &mut subs {
        let got = pushes(c, 20).await;
        let data: Vec<i64> = got
            .iter()
            .map(|m| m["data"]["n"].as_i64().unwrap())
            .collect();
        assert_eq!(
            data,
            (0..20).collect::<Vec<_>>(),
            "every message once, in publish order"
        );
        let offsets: Vec<String> = got
            .iter()
            .map(|m| m["offset"].as_str().unwrap().to_string())
            .collect();
        let parsed: Vec<Offset> = offsets.iter().map(|o| o.parse().unwrap()).collect();
        assert!(
            parsed.windows(2).all(|w| w[0] < w[1]),
            "offsets increase: {offsets:?}"
        );
        match &reference {
            None => reference = Some(offsets),
            Some(r) => assert_eq!(r, &offsets, "an offset means the same on every node"),
        }
        nothing_more(c).await;
    }
    // One Redis subscription per node, not per session.
    assert_eq!(redis.numsub("edgeplex:room"), 3);
    assert_eq!(nodes[0].metric("edgeplex_redis_subscriptions").await, 1.0);
}

#[tokio::test]
async fn backends_publish_through_redis_and_see_client_publishes() {
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await];
    let mut a = nodes[0].connect().await;
    let mut b = nodes[1].connect().await;
    a.subscribe(1, "orders").await;
    b.subscribe(1, "orders").await;

    // A backend's raw PUBLISH: delivered everywhere, without an offset.
    let mut backend = redis.connection();
    let _: i64 = redis::cmd("PUBLISH")
        .arg("edgeplex:orders")
        .arg(r#"{"id": 7, "state": "paid"}"#)
        .query(&mut backend)
        .unwrap();
    let _: i64 = redis::cmd("PUBLISH")
        .arg("edgeplex:orders")
        .arg("plain text, not JSON")
        .query(&mut backend)
        .unwrap();
    for c in [&mut a, &mut b] {
        let m = c.recv().await;
        assert_eq!(
            m,
            json!({"op": "message", "channel": "orders", "data": {"id": 7, "state": "paid"}})
        );
        let m = c.recv().await;
        assert_eq!(
            m["data"], "plain text, not JSON",
            "non-JSON arrives as a JSON string"
        );
        nothing_more(c).await;
    }

    // A backend subscribed to the same channel sees what clients publish, with the offset.
    let mut listener = redis.connection();
    let mut pubsub = listener.as_pubsub();
    pubsub.subscribe("edgeplex:orders").unwrap();
    pubsub
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let r = a
        .request(json!({"id": 2, "op": "publish", "channel": "orders", "data": [1, 2]}))
        .await;
    assert_eq!(r["ok"], true);
    let msg = pubsub.get_message().unwrap();
    let payload: Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
    assert_eq!(payload["data"], json!([1, 2]));
    let offset = payload["$edgeplex"].as_str().unwrap().to_string();
    assert_eq!(a.recv().await["offset"], offset.as_str());
    assert_eq!(b.recv().await["offset"], offset.as_str());
    // ...and the channel's history stream holds it under that id.
    let mut conn = redis.connection();
    let len: i64 = redis::cmd("XLEN")
        .arg("edgeplex:orders")
        .query(&mut conn)
        .unwrap();
    assert_eq!(len, 1);
}

#[tokio::test]
async fn admin_publish_api_reaches_every_node() {
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await];
    let mut a = nodes[0].connect().await;
    let mut b = nodes[1].connect().await;
    a.subscribe(1, "alerts").await;
    b.subscribe(1, "alerts").await;
    let http = reqwest::Client::new();
    let url = nodes[1].admin_url("/v1/publish");
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .body(r#"{"channel":"alerts","data":{"level":"high"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body, json!({"ok": true}));
    for c in [&mut a, &mut b] {
        let m = c.recv().await;
        assert_eq!(m["data"], json!({"level": "high"}));
        assert!(m["offset"].is_string());
    }
    let r = http
        .post(&url)
        .bearer_auth("wrong-key-wrong-key")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .body(r#"{"channel":"bad name","data":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .body(r#"{"channel":"a"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let big = format!(r#"{{"channel":"a","data":"{}"}}"#, "x".repeat(100_000));
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
}

/// A draining node still publishes for backends: its admin API serves through the grace
/// period, and the pipeline to Redis with it.
#[tokio::test]
async fn a_draining_node_still_publishes_through_its_admin_api() {
    let redis = RedisServer::start();
    let [draining, other] = [node(&redis).await, node(&redis).await];
    let mut witness = other.connect().await;
    witness.subscribe(1, "late").await;
    // Never reads, so the drain waits out its close handshake (1 s) while we publish.
    let _silent = draining.connect().await;
    let (url, readyz) = (
        draining.admin_url("/v1/publish"),
        draining.admin_url("/readyz"),
    );
    let common::TestEdge { edge, .. } = draining;
    let http = reqwest::Client::new();
    let shutdown = tokio::spawn(edge.shutdown_within(Duration::from_secs(5)));
    // The drain lasts as long as `_silent`'s close handshake may (1 s): everything below is
    // a few local requests.
    for attempt in 0.. {
        let r = http.get(&readyz).send().await.unwrap();
        if r.status() == 503 {
            assert_eq!(r.text().await.unwrap(), "draining\n");
            break;
        }
        assert!(attempt < 1000, "the node never reported draining");
        tokio::task::yield_now().await;
    }
    let r = http
        .post(&url)
        .bearer_auth(KEY)
        .body(r#"{"channel":"late","data":"after SIGTERM"}"#)
        .send()
        .await
        .expect("the admin listener serves while the node drains");
    assert_eq!(r.status(), 200);
    assert!(!shutdown.is_finished(), "published while the node drained");
    assert_eq!(witness.recv().await["data"], "after SIGTERM");
    assert!(shutdown.await.unwrap().clean);
}

#[tokio::test]
async fn one_redis_subscription_per_channel_per_node_dropped_with_the_last_local_subscriber() {
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await];
    let mut clients = Vec::new();
    for n in &nodes {
        for _ in 0..3 {
            let mut c = n.connect().await;
            c.subscribe(1, "quotes").await;
            clients.push(c);
        }
    }
    assert_eq!(redis.numsub("edgeplex:quotes"), 2);
    // Two of three leave on each node: still one subscription per node.
    for (i, c) in clients.iter_mut().enumerate() {
        if i % 3 != 0 {
            let r = c
                .request(json!({"id": 2, "op": "unsubscribe", "channel": "quotes"}))
                .await;
            assert_eq!(r["ok"], true);
        }
    }
    assert_eq!(redis.numsub("edgeplex:quotes"), 2);
    // The last local subscriber leaves by unsubscribing on node 0 and by disconnecting on node 1.
    let r = clients[0]
        .request(json!({"id": 3, "op": "unsubscribe", "channel": "quotes"}))
        .await;
    assert_eq!(r["ok"], true);
    redis.wait_numsub("edgeplex:quotes", 1).await;
    drop(clients);
    redis.wait_numsub("edgeplex:quotes", 0).await;
    assert_eq!(nodes[0].metric("edgeplex_redis_subscriptions").await, 0.0);
}

#[tokio::test]
async fn redis_restart_is_survived_with_gap_notices() {
    let mut redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await];
    let mut a = nodes[0].connect().await;
    let mut b = nodes[1].connect().await;
    a.subscribe(1, "feed").await;
    b.subscribe(1, "feed").await;
    a.request(json!({"id": 2, "op": "publish", "channel": "feed", "data": "before"}))
        .await;
    assert_eq!(pushes(&mut b, 1).await[0]["data"], "before");
    assert_eq!(pushes(&mut a, 1).await[0]["data"], "before");

    redis.kill();
    for n in &nodes {
        n.wait_ready(false).await;
    }
    // Sessions stay up; publishes and new subscriptions say `unavailable`, nothing is dropped
    // in silence.
    let r = a
        .request(json!({"id": 3, "op": "publish", "channel": "feed", "data": "lost"}))
        .await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    let r = b
        .request(json!({"id": 4, "op": "subscribe", "channel": "other"}))
        .await;
    assert_eq!(r["error"]["code"], "unavailable", "{r}");
    nothing_more(&mut a).await;

    redis.restart();
    for n in &nodes {
        n.wait_ready(true).await;
    }
    for c in [&mut a, &mut b] {
        assert_eq!(c.recv().await, json!({"op": "gap", "channel": "feed"}));
    }
    redis.wait_numsub("edgeplex:feed", 2).await;
    let r = b
        .request(json!({"id": 5, "op": "publish", "channel": "feed", "data": "after"}))
        .await;
    assert_eq!(r, json!({"id": 5, "ok": true}));
    for c in [&mut a, &mut b] {
        assert_eq!(pushes(c, 1).await[0]["data"], "after");
    }
    assert!(nodes[0].metric("edgeplex_redis_reconnects_total").await >= 1.0);
    assert_eq!(nodes[0].metric("edgeplex_redis_connected").await, 1.0);
}

#[tokio::test]
async fn an_edge_whose_redis_is_down_at_start_comes_up_when_redis_does() {
    let mut redis = RedisServer::start();
    redis.kill();
    let url = redis.url();
    let t = start(move |f| {
        f.bus.redis_url = url;
        f.bus.redis_timeout = Duration::from_millis(300);
    })
    .await;
    assert!(!t.ready().await);
    let mut c = t.connect().await;
    let r = c
        .request(json!({"id": 1, "op": "subscribe", "channel": "x"}))
        .await;
    assert_eq!(r["error"]["code"], "unavailable");
    redis.restart();
    t.wait_ready(true).await;
    c.subscribe(2, "x").await;
}

#[tokio::test]
async fn acl_user_and_password_come_from_the_url() {
    let acl = [
        "--user",
        "edge",
        "on",
        ">s3cret-pass-1234",
        "~*",
        "&*",
        "+@all",
        "--user",
        "default",
        "off",
    ];
    let redis = RedisServer::start_with(&acl, "edge:s3cret-pass-1234@");
    let url = redis.url();
    let good = start(move |f| f.bus.redis_url = url).await;
    good.wait_ready(true).await;
    let mut a = good.connect().await;
    a.subscribe(1, "private").await;
    a.request(json!({"id": 2, "op": "publish", "channel": "private", "data": 1}))
        .await;
    assert_eq!(pushes(&mut a, 1).await[0]["data"], 1);

    let wrong = format!("redis://edge:wrong-password@127.0.0.1:{}/", redis.port);
    let bad = start(move |f| {
        f.bus.redis_url = wrong;
        f.bus.redis_timeout = Duration::from_millis(300);
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!bad.ready().await, "a node that cannot log in is not ready");
    let mut b = bad.connect().await;
    let r = b
        .request(json!({"id": 1, "op": "publish", "channel": "private", "data": 1}))
        .await;
    assert_eq!(r["error"]["code"], "unavailable");
}

#[tokio::test]
async fn rediss_with_a_private_ca() {
    let redis = RedisServer::start_tls();
    let url = redis.url();
    assert!(url.starts_with("rediss://"));
    let ca = redis.ca_path().unwrap().display().to_string();
    let t = start(move |f| {
        f.bus.redis_url = url;
        f.bus.redis_ca = ca;
    })
    .await;
    t.wait_ready(true).await;
    let mut a = t.connect().await;
    a.subscribe(1, "secure").await;
    a.request(json!({"id": 2, "op": "publish", "channel": "secure", "data": "over tls"}))
        .await;
    assert_eq!(pushes(&mut a, 1).await[0]["data"], "over tls");
    assert_eq!(redis.numsub("edgeplex:secure"), 1);

    // Without the CA the server's certificate is not trusted: the node never becomes ready.
    let url = redis.url();
    let untrusting = start(move |f| {
        f.bus.redis_url = url;
        f.bus.redis_timeout = Duration::from_millis(300);
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!untrusting.ready().await);
}

#[tokio::test]
async fn resume_on_another_node_replays_from_the_redis_history() {
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await];
    let mut witness = nodes[0].connect().await;
    witness.subscribe(1, "journal").await;
    let mut publisher = nodes[0].connect().await;
    for i in 0..6 {
        publisher
            .request(json!({"id": i, "op": "publish", "channel": "journal", "data": i}))
            .await;
    }
    let seen = pushes(&mut witness, 6).await;
    // The client reconnects to the other node with the offset it saw last.
    let mut back = nodes[1].connect().await;
    let r = back
        .request(
            json!({"id": 1, "op": "subscribe", "channel": "journal", "since": seen[2]["offset"]}),
        )
        .await;
    assert_eq!(r, json!({"id": 1, "ok": true}));
    let replayed = pushes(&mut back, 3).await;
    assert_eq!(
        replayed,
        seen[3..].to_vec(),
        "the missed messages, with the same offsets"
    );
    nothing_more(&mut back).await;
    // Live traffic follows.
    publisher
        .request(json!({"id": 9, "op": "publish", "channel": "journal", "data": 6}))
        .await;
    assert_eq!(pushes(&mut back, 1).await[0]["data"], 6);
}

#[tokio::test]
async fn resume_past_the_redis_history_gets_a_gap() {
    let redis = RedisServer::start();
    let url = redis.url();
    let t = start(move |f| {
        f.bus.redis_url = url;
        f.bus.history_len = 5;
    })
    .await;
    t.wait_ready(true).await;
    let mut witness = t.connect().await;
    witness.subscribe(1, "trimmed").await;
    let mut publisher = t.connect().await;
    // MAXLEN ~ trims whole stream nodes (100 entries each), so publish well past one.
    for i in 0..400 {
        publisher
            .send(json!({"op": "publish", "channel": "trimmed", "data": i}))
            .await;
    }
    let seen = pushes(&mut witness, 400).await;
    let mut back = t.connect().await;
    back.request(
        json!({"id": 1, "op": "subscribe", "channel": "trimmed", "since": seen[0]["offset"]}),
    )
    .await;
    assert_eq!(
        back.recv().await,
        json!({"op": "gap", "channel": "trimmed"})
    );
    let next = back.recv().await;
    assert_eq!(
        next["op"], "message",
        "what the history kept follows the gap"
    );
}

#[tokio::test]
async fn pipelined_publishes_keep_their_order_and_their_replies() {
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await];
    let mut witness = nodes[1].connect().await;
    witness.subscribe(1, "order").await;
    let mut publisher = nodes[0].connect().await;
    // All sent before any reply is read: the session reads on while Redis works.
    for i in 0..300 {
        publisher
            .send(json!({"id": i, "op": "publish", "channel": "order", "data": i}))
            .await;
    }
    for i in 0..300 {
        assert_eq!(publisher.recv().await, json!({"id": i, "ok": true}));
    }
    let got: Vec<i64> = pushes(&mut witness, 300)
        .await
        .iter()
        .map(|m| m["data"].as_i64().unwrap())
        .collect();
    assert_eq!(
        got,
        (0..300).collect::<Vec<_>>(),
        "in publish order, on another node"
    );
}

/// Redis's own count of read events (one per pipeline it receives, give or take).
fn redis_reads(redis: &RedisServer) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut redis.connection())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_reads_processed:"))
        .expect("INFO stats has total_reads_processed")
        .trim()
        .parse()
        .unwrap()
}

/// A burst of publishes from one session reaches Redis in a few pipelines, not one round trip
/// each (the way sessions once awaited every publish, ~150 a second per publisher).
#[tokio::test]
async fn a_burst_of_publishes_reaches_redis_in_a_few_round_trips() {
    const N: u64 = 200;
    let redis = RedisServer::start();
    let t = node(&redis).await;
    let mut publisher = t.connect().await;
    let before = redis_reads(&redis);
    let pipelines_before = t.metric("edgeplex_redis_publish_pipelines_total").await;
    // One write: the whole burst is in the edge's socket before the first publish is answered.
    for i in 0..N {
        let publish = json!({"id": i, "op": "publish", "channel": "burst", "data": i});
        publisher
            .ws
            .feed(Message::text(publish.to_string()))
            .await
            .unwrap();
    }
    publisher.ws.flush().await.unwrap();
    for i in 0..N {
        assert_eq!(publisher.recv().await, json!({"id": i, "ok": true}));
    }
    // Counting the INFO call itself.
    let reads = redis_reads(&redis) - before;
    assert!(reads < N / 4, "{reads} Redis reads for {N} publishes");
    let pipelines = t.metric("edgeplex_redis_publish_pipelines_total").await - pipelines_before;
    assert!(
        (1.0..(N / 4) as f64).contains(&pipelines),
        "{pipelines} pipelines for {N} publishes"
    );
    assert_eq!(t.metric("edgeplex_redis_publish_queued").await, 0.0);
}

/// A session closed for a flood (1008) still gets, before the close frame, the replies to its
/// publishes that were with Redis when the edge decided to close it.
#[tokio::test]
async fn replies_to_publishes_still_with_redis_go_out_before_a_1008() {
    let redis = RedisServer::start();
    let t = common::flood_limited_on_redis(&redis).await;
    let mut c = t.connect().await;
    // The publishes stay with Redis for 300 ms, well within the edge's 1 s bound on the wait.
    redis.pause_writes(300);
    for i in 0..30u64 {
        let publish = json!({"id": i, "op": "publish", "channel": "owed", "data": i});
        // A send may fail once the edge has closed the session.
        let _ = c.ws.send(Message::text(publish.to_string())).await;
    }
    let (code, _, before) = c.until_close().await;
    assert_eq!(code, 1008);
    let answered: Vec<u64> = before
        .iter()
        .filter(|v| v["ok"] == true)
        .map(|v| v["id"].as_u64().unwrap())
        .collect();
    assert_eq!(answered, [0, 1, 2, 3, 4], "the burst's replies: {before:?}");
}

#[tokio::test]
async fn resume_through_redis_during_a_flood_loses_and_repeats_nothing() {
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await];
    let mut witness = nodes[0].connect().await;
    witness.subscribe(1, "stream").await;
    let mut publisher = nodes[0].connect().await;
    for i in 0..20 {
        publisher
            .request(json!({"id": i, "op": "publish", "channel": "stream", "data": i}))
            .await;
    }
    let head = pushes(&mut witness, 20).await;
    let since = head[4]["offset"].clone();
    // Publishes are pipelined, so an unpaced flood would be over before the first resume; it
    // is paced to span all three. It stays under 512 messages, half the session queue, so the
    // replay is never cut (a cut replay carries a gap notice by design).
    let flood = tokio::spawn(async move {
        for i in 20..500 {
            publisher
                .send(json!({"op": "publish", "channel": "stream", "data": i}))
                .await;
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        publisher
    });
    // Resume on the other node while the flood runs: its SUBSCRIBE and history read take round
    // trips during which live messages arrive.
    let mut results = Vec::new();
    for _ in 0..3 {
        let mut back = nodes[1].connect().await;
        let r = back
            .request(json!({"id": 1, "op": "subscribe", "channel": "stream", "since": since}))
            .await;
        assert_eq!(r["ok"], true);
        results.push(back);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let _publisher = flood.await.unwrap();
    for mut back in results {
        let mut got = Vec::new();
        while got.len() < 495 {
            let m = back.recv().await;
            assert_eq!(m["op"], "message", "no gap: {m}");
            got.push(m["data"].as_i64().unwrap());
        }
        assert_eq!(
            got,
            (5..500).collect::<Vec<_>>(),
            "each message after `since` once, in order"
        );
    }
}

#[tokio::test]
async fn sse_reconnect_landing_on_another_node_resumes_exactly() {
    use common::sse_client::{data, next, open, welcome};
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await];
    let mut ws = nodes[0].connect().await;
    let mut events = open(&nodes[0], false, "channel=live", None).await;
    welcome(&mut events).await;
    for i in 0..3 {
        ws.request(json!({"id": i, "op": "publish", "channel": "live", "data": i}))
            .await;
    }
    let mut last = String::new();
    for i in 0..3 {
        let e = next(&mut events).await;
        assert_eq!(data(&e)["data"], i);
        last = e.id;
    }
    drop(events);
    for i in 3..6 {
        ws.request(json!({"id": i, "op": "publish", "channel": "live", "data": i}))
            .await;
    }
    // The load balancer sends the reconnect to the other node.
    let mut events = open(&nodes[1], true, "channel=live", Some(&last)).await;
    welcome(&mut events).await;
    for i in 3..6 {
        assert_eq!(
            data(&next(&mut events).await)["data"],
            i,
            "missed message {i}, once"
        );
    }
    ws.request(json!({"id": 9, "op": "publish", "channel": "live", "data": 6}))
        .await;
    assert_eq!(data(&next(&mut events).await)["data"], 6);
}

#[tokio::test]
async fn a_quiet_multi_channel_sse_stream_resumes_exactly_on_another_node() {
    use common::sse_client::{data, next, open, welcome};
    let redis = RedisServer::start();
    let nodes = [node(&redis).await, node(&redis).await];
    let mut ws = nodes[0].connect().await;
    for i in 0..2 {
        let r = ws
            .request(json!({"id": i, "op": "publish", "channel": "x", "data": i}))
            .await;
        assert_eq!(r["ok"], true);
    }
    // The stream receives nothing but its welcome: the position in it comes from the Redis
    // stream's newest id (x) and from no history at all (y).
    let mut events = open(&nodes[0], false, "channel=x&channel=y", None).await;
    let w = welcome(&mut events).await;
    let (x, y) = w.id.split_once(',').unwrap();
    assert!(x.contains('-') && x != "-", "x's newest stream id: {x}");
    assert_eq!(y, "-");
    drop(events);
    for (i, ch) in [(2, "x"), (3, "x")] {
        let r = ws
            .request(json!({"id": i, "op": "publish", "channel": ch, "data": i}))
            .await;
        assert_eq!(r["ok"], true);
    }
    let mut events = open(&nodes[1], true, "channel=x&channel=y", Some(&w.id)).await;
    welcome(&mut events).await;
    for i in 2..4 {
        let d = data(&next(&mut events).await);
        assert_eq!(
            (d["channel"].as_str(), d["data"].as_i64()),
            (Some("x"), Some(i)),
            "{d}"
        );
    }
    let r = ws
        .request(json!({"id": 9, "op": "publish", "channel": "y", "data": 9}))
        .await;
    assert_eq!(r["ok"], true);
    let e = next(&mut events).await;
    assert_eq!(data(&e)["data"], 9, "no gap for x, then live traffic on y");
    assert!(e.id.ends_with(&format!(",{}", data(&e)["offset"].as_str().unwrap())));
}

/// Every key under the prefix, with Redis's own figure for the memory each holds.
fn keys_and_memory(redis: &RedisServer, prefix: &str) -> (usize, u64) {
    let mut c = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut c)
        .unwrap();
    let mut bytes = 0;
    for k in &keys {
        let used: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(k)
            .arg("SAMPLES")
            .arg(0)
            .query(&mut c)
            .unwrap();
        bytes += used.unwrap_or(0);
    }
    (keys.len(), bytes)
}

fn pttl(redis: &RedisServer, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query(&mut redis.connection())
        .unwrap()
}

/// A client sprays publishes over ever-new channel names that nobody subscribes to. The Redis
/// history (every stream key and what keeps track of them) stays within `bus.history_bytes`
/// however many names it sprays, the sprayed channels get the short life of channels nobody
/// hears, and a channel with subscribers keeps its history: resuming it still works.
#[tokio::test]
async fn a_channel_name_spray_leaves_the_redis_history_bounded() {
    const BUDGET: usize = 512 * 1024;
    const SPRAY: usize = 1500;
    let redis = RedisServer::start();
    let url = redis.url();
    let t = start(move |f| {
        f.bus.redis_url = url;
        f.bus.history_bytes = BUDGET;
    })
    .await;
    t.wait_ready(true).await;
    let mut keeper = t.connect().await;
    keeper.subscribe(1, "kept").await;
    let mut publisher = t.connect().await;
    for i in 0..5 {
        let r = publisher
            .request(json!({"id": i, "op": "publish", "channel": "kept", "data": i}))
            .await;
        assert_eq!(r["ok"], true);
    }
    let kept = pushes(&mut keeper, 5).await;

    for i in 0..SPRAY {
        let ch = format!("spray-{i}");
        publisher
            .ws
            .feed(Message::text(
                json!({"id": i, "op": "publish", "channel": ch, "data": "x"}).to_string(),
            ))
            .await
            .unwrap();
    }
    publisher.ws.flush().await.unwrap();
    let mut answered = 0;
    while answered < SPRAY {
        let r = publisher.recv().await;
        assert_eq!(r["ok"], true, "{r}");
        answered += 1;
    }

    let (keys, bytes) = keys_and_memory(&redis, "edgeplex:");
    // The documented bound: each channel counts at least 5 KiB (a stream of one small entry
    // holds ~4.7 KB in Redis 7), plus the two keys that keep the count.
    assert!(
        keys <= BUDGET / (5 * 1024) + 2,
        "{keys} keys after {SPRAY} channel names"
    );
    assert!(
        bytes as usize <= BUDGET + BUDGET / 4,
        "Redis holds {bytes} bytes of history for a budget of {BUDGET}"
    );
    assert!(t.metric("edgeplex_redis_history_evictions_total").await >= 1.0);
    let held = t.metric("edgeplex_redis_history_bytes").await;
    assert!(held > 0.0 && held <= BUDGET as f64, "{held}");

    // Nobody heard the sprayed channels: they expire soon, the heard one lives its full day.
    let sprayed = pttl(&redis, &format!("edgeplex:spray-{}", SPRAY - 1));
    assert!(
        (1..=3_600_000).contains(&sprayed),
        "a sprayed channel's history lives {sprayed} ms"
    );
    assert!(pttl(&redis, "edgeplex:kept") > 23 * 3_600_000);

    // The heard channel kept its history through the spray: a resume from its first message
    // gets the rest, without a gap.
    let mut back = t.connect().await;
    let r = back
        .request(json!({"id": 1, "op": "subscribe", "channel": "kept", "since": kept[0]["offset"]}))
        .await;
    assert_eq!(r, json!({"id": 1, "ok": true}));
    assert_eq!(pushes(&mut back, 4).await, kept[1..].to_vec());
    nothing_more(&mut back).await;
}

/// Redis's count of bytes it has sent to clients.
fn redis_sent(redis: &RedisServer) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut redis.connection())
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .expect("INFO stats has total_net_output_bytes")
        .trim()
        .parse()
        .unwrap()
}

/// `n` messages of about 60 KB on `channel` through the admin API (no client budget spent), and
/// the offset of the first.
async fn big_history(t: &TestEdge, redis: &RedisServer, channel: &str, n: usize) -> String {
    let http = reqwest::Client::new();
    for i in 0..n {
        let body = json!({"channel": channel, "data": {"i": i, "pad": "x".repeat(60_000)}});
        let r = http
            .post(t.admin_url("/v1/publish"))
            .bearer_auth(KEY)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let first: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("edgeplex:{channel}"))
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query(&mut redis.connection())
        .unwrap();
    first.ids[0].id.clone()
}

/// Frames up to the reply to a ping: what a subscribe queued.
async fn until_pong(c: &mut Client) -> Vec<Value> {
    c.send(json!({"id": 999, "op": "ping"})).await;
    let mut out = Vec::new();
    loop {
        let f = c.recv().await;
        if f == json!({"id": 999, "ok": true}) {
            return out;
        }
        out.push(f);
    }
}

/// A resume from the oldest offset of a channel of 60 KB messages reads from Redis what it
/// delivers (the newest messages that fit half the session's queue), not the whole history.
#[tokio::test]
async fn a_resume_reads_the_window_not_the_history() {
    let redis = RedisServer::start();
    let t = node(&redis).await;
    let oldest = big_history(&t, &redis, "big", 100).await;
    let mut c = t.connect().await;
    let before = redis_sent(&redis);
    let r = c
        .request(json!({"id": 1, "op": "subscribe", "channel": "big", "since": oldest}))
        .await;
    assert_eq!(r, json!({"id": 1, "ok": true}));
    let frames = until_pong(&mut c).await;
    let sent = redis_sent(&redis) - before;
    assert_eq!(
        frames[0],
        json!({"op": "gap", "channel": "big"}),
        "cut: a gap"
    );
    let got: Vec<i64> = frames[1..]
        .iter()
        .map(|m| m["data"]["i"].as_i64().unwrap())
        .collect();
    // Half the default 1 MiB queue holds 8 of these.
    assert_eq!(got, (92..100).collect::<Vec<_>>(), "the newest, in order");
    let delivered: usize = frames.iter().map(|f| f.to_string().len()).sum();
    assert!(
        sent < (delivered + 64 * 1024) as u64,
        "Redis sent {sent} bytes for a replay of {delivered}"
    );
}

/// A client cycling resumes from the oldest offset spends its address's byte budget
/// (`limits.ip_bytes`) on what is replayed: once over it, the subscribe is refused
/// `rate_limited`, without a replay and without reading the history.
#[tokio::test]
async fn a_client_cycling_resumes_is_refused_once_over_its_byte_budget() {
    let redis = RedisServer::start();
    let url = redis.url();
    // A slow refill: what comes back while the test runs must not pay for another 60 KB entry.
    let t = start(move |f| {
        f.bus.redis_url = url;
        f.admin.api_key = KEY.into();
        f.limits.ip_bytes.per_second = 1024;
        f.limits.ip_bytes.burst = 2 << 20;
    })
    .await;
    t.wait_ready(true).await;
    let oldest = big_history(&t, &redis, "big", 30).await;
    let mut c = t.connect().await;
    let mut replays = 0;
    let refused = loop {
        assert!(replays < 10, "{replays} replays of ~480 KB and no refusal");
        let r = c
            .request(json!({"id": 1, "op": "subscribe", "channel": "big", "since": oldest}))
            .await;
        if r["error"].is_object() {
            break r;
        }
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(until_pong(&mut c).await.len(), 9, "a gap and 8 messages");
        replays += 1;
        let r = c
            .request(json!({"id": 2, "op": "unsubscribe", "channel": "big"}))
            .await;
        assert_eq!(r["ok"], true);
    };
    assert!(replays >= 3, "2 MiB of burst is about 4 replays: {replays}");
    assert_eq!(refused["error"]["code"], "rate_limited", "{refused}");
    assert!(refused["error"]["retry_after_ms"].as_u64().unwrap() > 0);
    assert!(
        until_pong(&mut c).await.is_empty(),
        "no replay after a refusal"
    );
    // Refused again, reading nothing from Redis; and not subscribed.
    let before = redis_sent(&redis);
    let r = c
        .request(json!({"id": 3, "op": "subscribe", "channel": "big", "since": oldest}))
        .await;
    assert_eq!(r["error"]["code"], "rate_limited", "{r}");
    assert!(redis_sent(&redis) - before < 16 * 1024);
    let r = c
        .request(json!({"id": 4, "op": "unsubscribe", "channel": "big"}))
        .await;
    assert_eq!(r["error"]["code"], "not_subscribed", "{r}");
    let refused = "edgeplex_admission_decisions_total{limit=\"ip_bytes\",decision=\"refused\"}";
    assert_eq!(t.metric(refused).await, 2.0);
}

/// Publishes `msgs` (channel, data) in one go, without waiting between them, and checks every
/// reply is `ok`: they reach Redis in a few pipelines, many within one millisecond.
async fn publish_pipelined(c: &mut Client, msgs: &[(String, Value)]) {
    for (i, (ch, data)) in msgs.iter().enumerate() {
        c.ws.feed(Message::text(
            json!({"id": i, "op": "publish", "channel": ch, "data": data}).to_string(),
        ))
        .await
        .unwrap();
    }
    c.ws.flush().await.unwrap();
    for _ in 0..msgs.len() {
        let r = c.recv().await;
        assert_eq!(r["ok"], true, "{r}");
    }
}

fn redis_int(redis: &RedisServer, args: &[&str]) -> i64 {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let v: Option<i64> = cmd.query(&mut redis.connection()).unwrap();
    v.unwrap_or(0)
}

/// A channel whose history was dropped (no history at all with `history_bytes = 0`; or dropped
/// for another channel under budget pressure, publish after publish) still gets offsets that
/// increase: a dropped stream must not restart at `<ms>-0` within the millisecond it went.
#[tokio::test]
async fn offsets_keep_increasing_when_a_channels_history_is_dropped() {
    // 6 KiB: room for one channel, so each publish drops the other's; 0: no history.
    for budget in [6 * 1024, 0] {
        let redis = RedisServer::start();
        let url = redis.url();
        let t = start(move |f| {
            f.bus.redis_url = url;
            f.bus.history_bytes = budget;
        })
        .await;
        t.wait_ready(true).await;
        let mut sub = t.connect().await;
        sub.subscribe(1, "a").await;
        sub.subscribe(2, "b").await;
        let mut p = t.connect().await;
        let msgs: Vec<(String, Value)> = (0..60)
            .map(|i| {
                let ch = if budget == 0 || i % 2 == 0 { "a" } else { "b" };
                (ch.to_string(), json!(i))
            })
            .collect();
        publish_pipelined(&mut p, &msgs).await;
        let got = pushes(&mut sub, msgs.len()).await;
        for ch in ["a", "b"] {
            let offsets: Vec<Offset> = got
                .iter()
                .filter(|m| m["channel"] == ch)
                .map(|m| m["offset"].as_str().unwrap().parse().unwrap())
                .collect();
            assert!(
                offsets.windows(2).all(|w| w[0] < w[1]),
                "budget {budget}: offsets of {ch} do not increase: {offsets:?}"
            );
        }
        if budget == 0 {
            // 0 keeps no history: nothing is left counted.
            assert_eq!(redis_int(&redis, &["XLEN", "edgeplex:a"]), 0);
            assert_eq!(
                redis_int(&redis, &["HGET", "edgeplex:#history-bytes", "#total"]),
                0
            );
        }
    }
}

/// One channel of large messages cannot take the whole budget: its history is capped at
/// `bus.history_channel_bytes` (by default a 64th of `bus.history_bytes`, at least 64 KiB), so the other
/// channels, subscribed and quiet, keep theirs.
#[tokio::test]
async fn a_channel_of_large_messages_leaves_the_other_histories_alone() {
    const BUDGET: usize = 2 << 20;
    let redis = RedisServer::start();
    let url = redis.url();
    let t = start(move |f| {
        f.bus.redis_url = url;
        f.bus.history_bytes = BUDGET;
    })
    .await;
    t.wait_ready(true).await;
    let mut keeper = t.connect().await;
    for i in 0..20 {
        keeper.subscribe(i, &format!("small-{i}")).await;
    }
    keeper.subscribe(99, "big").await;
    let mut p = t.connect().await;
    let small: Vec<(String, Value)> = (0..20)
        .flat_map(|i| {
            [
                (format!("small-{i}"), json!(1)),
                (format!("small-{i}"), json!(2)),
            ]
        })
        .collect();
    publish_pipelined(&mut p, &small).await;
    pushes(&mut keeper, small.len()).await;
    // ~2.7 MB counted in all: more than the budget.
    let pad = "x".repeat(8_000);
    for _ in 0..6 {
        let big: Vec<(String, Value)> = (0..50).map(|_| ("big".to_string(), json!(pad))).collect();
        publish_pipelined(&mut p, &big).await;
        pushes(&mut keeper, big.len()).await;
    }
    for i in 0..20 {
        assert_eq!(
            redis_int(&redis, &["XLEN", &format!("edgeplex:small-{i}")]),
            2,
            "small-{i} lost its history to the big channel"
        );
    }
    assert_eq!(
        t.metric("edgeplex_redis_history_evictions_total").await,
        0.0
    );
    let big = redis_int(&redis, &["HGET", "edgeplex:#history-bytes", "edgeplex:big"]);
    assert!(
        big as usize <= 64 * 1024,
        "the big channel counts {big} bytes"
    );
    let len = redis_int(&redis, &["XLEN", "edgeplex:big"]);
    assert!(
        (1..50).contains(&len),
        "the big channel keeps {len} entries"
    );
}

/// `bus.history_len` entries are kept, trimmed past that plus the slack; after the trim the
/// channel's counted bytes are what the kept entries hold, not what was ever published.
#[tokio::test]
async fn the_history_trim_keeps_the_count_right() {
    let redis = RedisServer::start();
    let url = redis.url();
    let t = start(move |f| {
        f.bus.redis_url = url;
        f.bus.history_len = 5;
    })
    .await;
    t.wait_ready(true).await;
    let mut p = t.connect().await;
    let data = json!("y".repeat(1000));
    // history_len + the slack of 100 + 1: the last publish trims.
    let msgs: Vec<(String, Value)> = (0..106).map(|_| ("t".to_string(), data.clone())).collect();
    publish_pipelined(&mut p, &msgs).await;
    assert_eq!(redis_int(&redis, &["XLEN", "edgeplex:t"]), 5);
    let counted = redis_int(&redis, &["HGET", "edgeplex:#history-bytes", "edgeplex:t"]);
    let total = redis_int(&redis, &["HGET", "edgeplex:#history-bytes", "#total"]);
    assert_eq!(counted, total, "one channel: the total is its count");
    // 106 entries of ~1.2 KB were counted; 5 are left.
    assert!(
        (5 * 1024..=5 * 1024 + 10 * 1300).contains(&counted),
        "{counted} bytes counted for 5 entries of 1 KB"
    );
}

/// A node started with a smaller `bus.history_bytes` than the others (the smallest wins) drops
/// histories for the budget a few at a time, not all in one script that stalls Redis.
#[tokio::test]
async fn one_publish_drops_a_bounded_number_of_histories() {
    let redis = RedisServer::start();
    let big = {
        let url = redis.url();
        start(move |f| {
            f.bus.redis_url = url;
            f.bus.history_bytes = 8 << 20;
        })
        .await
    };
    big.wait_ready(true).await;
    let mut p = big.connect().await;
    let spray: Vec<(String, Value)> = (0..300).map(|i| (format!("s-{i}"), json!(i))).collect();
    publish_pipelined(&mut p, &spray).await;
    assert_eq!(redis_int(&redis, &["ZCARD", "edgeplex:#history"]), 300);
    let small = {
        let url = redis.url();
        start(move |f| {
            f.bus.redis_url = url;
            f.bus.history_bytes = 6 * 1024;
        })
        .await
    };
    small.wait_ready(true).await;
    let mut q = small.connect().await;
    publish_pipelined(&mut q, &[("late".to_string(), json!(1))]).await;
    let evicted = small.metric("edgeplex_redis_history_evictions_total").await;
    assert!(
        (1.0..=64.0).contains(&evicted),
        "one publish dropped {evicted} histories"
    );
    assert!(redis_int(&redis, &["ZCARD", "edgeplex:#history"]) >= 300 - 64);
}

/// Redis itself dropped the history index (as an `allkeys-*` maxmemory policy may): the byte
/// count no longer matches it. The count starts over rather than stay over the budget for good,
/// in which case every publish would drop every history, its own included.
#[tokio::test]
async fn a_lost_history_index_resets_the_count() {
    const BUDGET: usize = 64 * 1024;
    let redis = RedisServer::start();
    let url = redis.url();
    let t = start(move |f| {
        f.bus.redis_url = url;
        f.bus.history_bytes = BUDGET;
    })
    .await;
    t.wait_ready(true).await;
    let mut p = t.connect().await;
    let fill: Vec<(String, Value)> = (0..12).map(|i| (format!("f-{i}"), json!(i))).collect();
    publish_pipelined(&mut p, &fill).await;
    let _: () = redis::cmd("DEL")
        .arg("edgeplex:#history")
        .query(&mut redis.connection())
        .unwrap();
    for i in 0..5 {
        let ch = format!("n-{i}");
        publish_pipelined(&mut p, &[(ch.clone(), json!(i))]).await;
        assert_eq!(
            redis_int(&redis, &["XLEN", &format!("edgeplex:{ch}")]),
            1,
            "{ch} lost its history at once"
        );
    }
    let total = redis_int(&redis, &["HGET", "edgeplex:#history-bytes", "#total"]);
    assert!(total as usize <= BUDGET, "{total}");
}

/// A history that expired by itself still has its place in the index until a publish over the
/// budget takes it out: that is no eviction, and `edgeplex_redis_history_evictions_total` does
/// not count it.
#[tokio::test]
async fn only_histories_that_really_went_count_as_evicted() {
    let redis = RedisServer::start();
    let url = redis.url();
    let t = start(move |f| {
        f.bus.redis_url = url;
        f.bus.history_bytes = 16 * 1024;
        f.bus.history_ttl_unsubscribed = Duration::from_secs(1);
    })
    .await;
    t.wait_ready(true).await;
    let mut p = t.connect().await;
    let three: Vec<(String, Value)> = (0..3).map(|i| (format!("e-{i}"), json!(i))).collect();
    publish_pipelined(&mut p, &three).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let three: Vec<(String, Value)> = (0..3).map(|i| (format!("g-{i}"), json!(i))).collect();
    publish_pipelined(&mut p, &three).await;
    assert_eq!(redis_int(&redis, &["ZCARD", "edgeplex:#history"]), 3);
    assert_eq!(
        t.metric("edgeplex_redis_history_evictions_total").await,
        0.0
    );
}

/// The node asks Redis its version at start (Redis older than 6.2 cannot run the scripts and is
/// refused; none is at hand here, see `redis_versions_are_read_from_info_server`), and a Redis
/// that will not say (an ACL user without `INFO`) is taken to be recent enough.
#[tokio::test]
async fn the_redis_version_is_asked_at_start_and_an_acl_without_info_still_works() {
    let redis = RedisServer::start();
    let t = node(&redis).await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.connection())
        .unwrap();
    assert!(
        stats.contains("cmdstat_info:calls="),
        "the node did not ask INFO: {stats}"
    );
    drop(t);

    let acl = [
        "--user",
        "edge",
        "on",
        ">s3cret-pass-1234",
        "~*",
        "&*",
        "+@all",
        "-info",
        "--user",
        "default",
        "off",
    ];
    let redis = RedisServer::start_with(&acl, "edge:s3cret-pass-1234@");
    let t = node(&redis).await;
    let mut a = t.connect().await;
    a.subscribe(1, "room").await;
    let r = a
        .request(json!({"id": 2, "op": "publish", "channel": "room", "data": 1}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(pushes(&mut a, 1).await[0]["data"], 1);
}

/// Sessions of one address resuming at the same moment share its byte budget: each reserves
/// what it may read before Redis is asked, so together they read no more than the budget. When
/// each only checked what was left and paid afterwards, 20 of them read 9.6 MB against 2 MiB.
#[tokio::test]
async fn concurrent_resumes_of_one_address_share_its_byte_budget() {
    let redis = RedisServer::start();
    let url = redis.url();
    let t = start(move |f| {
        f.bus.redis_url = url;
        f.admin.api_key = KEY.into();
        f.limits.ip_bytes.per_second = 1024;
        f.limits.ip_bytes.burst = 2 << 20;
    })
    .await;
    t.wait_ready(true).await;
    let oldest = big_history(&t, &redis, "big", 30).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(t.connect().await);
    }
    let before = redis_sent(&redis);
    let resumes = clients.iter_mut().map(|c| {
        let oldest = oldest.clone();
        async move {
            let r = c
                .request(json!({"id": 1, "op": "subscribe", "channel": "big", "since": oldest}))
                .await;
            if r["ok"] == true {
                until_pong(c)
                    .await
                    .iter()
                    .filter(|f| f["op"] == "message")
                    .map(|f| f["data"].to_string().len())
                    .sum::<usize>()
            } else {
                assert_eq!(r["error"]["code"], "rate_limited", "{r}");
                0
            }
        }
    });
    let replayed: usize = futures_util::future::join_all(resumes).await.iter().sum();
    let read = redis_sent(&redis) - before;
    assert!(
        replayed <= (2 << 20) + 64 * 1024,
        "{replayed} bytes replayed against a 2 MiB budget"
    );
    assert!(
        read <= (2 << 20) + 256 * 1024,
        "{read} bytes read from Redis"
    );
}
