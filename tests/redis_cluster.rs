//! The Redis bus over a real Redis Cluster (three masters, three replicas, started per test on
//! free ports) with two edge nodes in one process: channels spread over every master, offsets
//! that mean the same on both nodes, backends on `SPUBLISH`, a master killed (its replica takes
//! over) and a slot moved under live subscribers.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::redis_cluster::{RedisCluster, slot};
use common::{Client, TestEdge, start};
use serde_json::{Value, json};

async fn node(cluster: &RedisCluster) -> TestEdge {
    // `TEST_LOG=edgeplex::bus=debug` shows what each reconciliation pass decided.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("TEST_LOG"))
        .with_test_writer()
        .try_init();
    let urls = cluster.urls();
    let ca = cluster.ca_path().map(|p| p.display().to_string());
    let t = start(move |f| {
        f.bus.redis_cluster = urls;
        // Short, so a failover is seen in seconds; but TLS handshakes with every node (a
        // debug build, two loaded cores) once took longer than that at start.
        f.bus.redis_timeout = Duration::from_millis(500);
        if let Some(ca) = ca {
            f.bus.redis_ca = ca;
            f.bus.redis_timeout = Duration::from_secs(3);
        }
        // The reconciliation pass: quick here, so the tests take seconds.
        f.bus.redis_ping_interval = Duration::from_millis(200);
    })
    .await;
    t.wait_ready(true).await;
    t
}

fn key(channel: &str) -> String {
    format!("edgeplex:{{{channel}}}")
}

/// One subscriber on `b` per channel, a publisher on `a`, and one message ("before") published
/// and received on each: the subscribers, the publisher, and each channel's offset so far.
async fn subscribed_and_delivered(
    a: &TestEdge,
    b: &TestEdge,
    channels: &[(String, u16)],
) -> (Vec<Client>, Client, Vec<Value>) {
    let mut subs = Vec::new();
    for (c, _) in channels {
        let mut s = b.connect().await;
        s.subscribe(1, c).await;
        subs.push(s);
    }
    let mut publisher = a.connect().await;
    for (i, (c, _)) in channels.iter().enumerate() {
        publish_ok(&mut publisher, i as u64, c, json!("before")).await;
    }
    let mut before = Vec::new();
    for s in &mut subs {
        let m = next_message(s).await.0;
        assert_eq!(m["data"], "before");
        before.push(m["offset"].clone());
    }
    (subs, publisher, before)
}

/// Publishes until the bus answers `ok` (a failover or a moved slot answers `unavailable` in
/// the window), within a bound; returns how many `unavailable` came first.
async fn publish_ok(c: &mut Client, id: u64, channel: &str, data: Value) -> usize {
    let start = Instant::now();
    let mut refused = 0;
    loop {
        let r = c
            .request(json!({"id": id, "op": "publish", "channel": channel, "data": data}))
            .await;
        if r == json!({"id": id, "ok": true}) {
            return refused;
        }
        assert_eq!(r["error"]["code"], "unavailable", "{r}");
        refused += 1;
        assert!(start.elapsed() < Duration::from_secs(20), "never ok: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next frame that is a message on `channel`, counting the gap notices before it; fails on
/// a message of another channel or anything else.
async fn next_message(c: &mut Client) -> (Value, usize) {
    let mut gaps = 0;
    loop {
        let f = c.recv().await;
        match f["op"].as_str() {
            Some("gap") => gaps += 1,
            Some("message") => return (f, gaps),
            _ => panic!("unexpected {f}"),
        }
    }
}

/// Channels named `prefix0…`, at least `per_master` on each of the three masters.
fn spread(cluster: &RedisCluster, prefix: &str, per_master: usize) -> Vec<(String, u16)> {
    let masters = cluster.masters();
    let mut out: Vec<(String, u16)> = Vec::new();
    let mut i = 0;
    while masters
        .iter()
        .any(|m| out.iter().filter(|(_, p)| p == m).count() < per_master)
    {
        let c = format!("{prefix}{i}");
        let m = cluster.master_of(slot(&key(&c)));
        if out.iter().filter(|(_, p)| *p == m).count() < per_master {
            out.push((c, m));
        }
        i += 1;
    }
    out
}

#[tokio::test]
async fn publishes_cross_nodes_on_every_master_offsets_agree_and_backends_spublish() {
    let cluster = RedisCluster::start();
    let (a, b) = (node(&cluster).await, node(&cluster).await);
    // Subscribes that come together go together: channels of one slot share their SSUBSCRIBE
    // commands (a shard subscribe names channels of one slot), not one each.
    const N: usize = 40;
    let shared = slot(&key("s0"));
    let same: Vec<String> = (0..)
        .map(|i| format!("s{i}"))
        .filter(|c| slot(&key(c)) == shared)
        .take(N)
        .collect();
    let owner = cluster.master_of(shared);
    let mut clients = Vec::new();
    for _ in &same {
        clients.push(b.connect().await);
    }
    let before = cluster.calls(owner, "ssubscribe");
    for (c, ch) in clients.iter_mut().zip(&same) {
        c.send(json!({"id": 1, "op": "subscribe", "channel": ch}))
            .await;
    }
    for c in &mut clients {
        assert_eq!(c.recv().await, json!({"id": 1, "ok": true}));
    }
    let used = cluster.calls(owner, "ssubscribe") - before;
    assert!(
        used <= (N / 4) as u64,
        "{N} concurrent subscribes to channels of one slot took {used} SSUBSCRIBE commands"
    );
    for ch in &same {
        assert_eq!(cluster.shard_numsub(&key(ch)), 1, "{ch}");
    }
    drop(clients);

    let channels = spread(&cluster, "room", 4);
    let masters: HashSet<u16> = channels.iter().map(|(_, m)| *m).collect();
    assert_eq!(masters.len(), 3, "the channels cover every master");
    let mut sub = b.connect().await;
    for (i, (c, _)) in channels.iter().enumerate() {
        sub.subscribe(i as u64, c).await;
    }
    let mut publisher = a.connect().await;
    for (i, (c, _)) in channels.iter().enumerate() {
        let r = publisher
            .request(json!({"id": i, "op": "publish", "channel": c, "data": {"n": i}}))
            .await;
        assert_eq!(r, json!({"id": i, "ok": true}));
    }
    let mut seen = HashSet::new();
    for _ in &channels {
        let (m, gaps) = next_message(&mut sub).await;
        assert_eq!(gaps, 0);
        assert!(m["offset"].is_string(), "an offset from the stream: {m}");
        seen.insert(m["channel"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        seen.len(),
        channels.len(),
        "every channel once, across nodes"
    );
    // The history gauges sum the slots this node published to (each slot keeps its own budget
    // keys): every channel is counted, each at least the 5 KiB a stream is given.
    let slots: HashSet<u16> = channels.iter().map(|(c, _)| slot(&key(c))).collect();
    let counted = a.metric("edgeplex_redis_history_channels").await;
    let held = a.metric("edgeplex_redis_history_bytes").await;
    assert!(counted >= slots.len() as f64, "{counted} channels counted");
    assert!(
        held >= counted * 5.0 * 1024.0,
        "{held} bytes for {counted} channels"
    );

    // Offsets mean the same on every node: a resume on A from what B saw.
    let mut got = Vec::new();
    for n in 0..3 {
        let r = publisher
            .request(json!({"id": 100 + n, "op": "publish", "channel": "journal", "data": n}))
            .await;
        assert_eq!(r["ok"], true, "{r}");
    }
    let mut watcher = b.connect().await;
    watcher
        .request(json!({"id": 1, "op": "subscribe", "channel": "journal", "since": "0-0"}))
        .await;
    for _ in 0..3 {
        // (A gap first: the history starts after 0-0.)
        got.push(next_message(&mut watcher).await.0);
    }
    assert_eq!(
        got.iter().map(|m| m["data"].clone()).collect::<Vec<_>>(),
        [json!(0), json!(1), json!(2)]
    );
    let mut resumer = a.connect().await;
    let r = resumer
        .request(
            json!({"id": 1, "op": "subscribe", "channel": "journal", "since": got[0]["offset"]}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    let rest = [resumer.recv().await, resumer.recv().await];
    assert_eq!(rest[0]["offset"], got[1]["offset"]);
    assert_eq!(rest[1]["offset"], got[2]["offset"]);

    // A backend publishes to the shard channel `edgeplex:{C}`.
    let mut news = b.connect().await;
    news.subscribe(1, "news").await;
    let heard = cluster.spublish(&key("news"), r#"{"from":"backend"}"#);
    assert!(heard.trim().parse::<i64>().unwrap() >= 1, "{heard}");
    let m = news.recv().await;
    assert_eq!(m["data"], json!({"from": "backend"}));
    assert_eq!(m["channel"], "news");
}

/// Publishes `{"live": n}` to every channel in turn until `stop`, one at a time; returns, per
/// channel, the `n`s answered `ok` and the messages of the `unavailable` answers (allowed: the
/// killed master's slots have no master until the failover is over).
async fn publish_live(
    mut c: Client,
    channels: Vec<String>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<Vec<u64>>, Vec<Vec<String>>) {
    let mut oks = vec![Vec::new(); channels.len()];
    let mut refused = vec![Vec::new(); channels.len()];
    let mut n = 0u64;
    while !*stop.borrow() {
        for (i, ch) in channels.iter().enumerate() {
            n += 1;
            let r = c
                .request(json!({"id": n, "op": "publish", "channel": ch, "data": {"live": n}}))
                .await;
            if r == json!({"id": n, "ok": true}) {
                oks[i].push(n);
            } else {
                assert_eq!(r["error"]["code"], "unavailable", "{r}");
                refused[i].push(r["error"]["message"].as_str().unwrap_or("").to_owned());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (oks, refused)
}

/// Whether `want` (the `n`s of `{"live": n}` answered ok, then `"after"`) is a subsequence of
/// what `got` holds, in order: a publish answered `unavailable` may have been delivered too.
fn delivered_in_order(got: &[Value], want: &[u64]) -> bool {
    let mut rest = got.iter();
    want.iter()
        .all(|n| rest.any(|m| m["data"] == json!({"live": n})))
        && rest.any(|m| m["data"] == "after")
}

/// A channel the fault reached: its gap notice comes (live messages may come before it, from
/// the master now serving it), and a resume from `before` on a new session of `edge` brings
/// every publish answered `ok` since, in order.
async fn expect_gap_then_resume(
    s: &mut Client,
    edge: &TestEdge,
    c: &str,
    before: &Value,
    oks: &[u64],
) {
    loop {
        let f = s.recv().await;
        match f["op"].as_str() {
            Some("gap") => break,
            Some("message") => assert_ne!(f["data"], "before", "{c}: {f}"),
            _ => panic!("unexpected {f}"),
        }
    }
    let mut r = edge.connect().await;
    let ok = r
        .request(json!({"id": 1, "op": "subscribe", "channel": c, "since": before}))
        .await;
    assert_eq!(ok["ok"], true, "{ok}");
    let mut got = Vec::new();
    while got.last().is_none_or(|m: &Value| m["data"] != "after") {
        got.push(next_message(&mut r).await.0);
    }
    assert!(
        delivered_in_order(&got, oks),
        "{c}: acknowledged {oks:?}, resumed {got:?}"
    );
}

/// A channel the fault did not reach (`untouched` says how): what it received up to
/// `"after"`, with no gap on the way.
async fn live_until_after(s: &mut Client, c: &str, untouched: &str) -> Vec<Value> {
    let mut got = Vec::new();
    while got.last().is_none_or(|m: &Value| m["data"] != "after") {
        let (m, gaps) = next_message(s).await;
        assert_eq!(gaps, 0, "{c} is not {untouched}: no gap");
        got.push(m);
    }
    got
}

/// Subscribers on B of channels on every master, and a publisher on A publishing to all of them
/// throughout; `kill -9` one master (its replica is promoted). The other masters' channels
/// carry on: no gap, and every publish answered `ok` arrives live, in order. The killed
/// master's channels get a gap notice, and a resume from the last offset seen before brings
/// every publish answered `ok` since: nothing acknowledged is lost.
// Two workers: the cluster helper blocks one while it waits, the edges run on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_gaps_only_its_channels_and_loses_no_acknowledged_publish() {
    let mut cluster = RedisCluster::start();
    let (a, b) = (node(&cluster).await, node(&cluster).await);
    let channels = spread(&cluster, "f", 2);
    let (mut subs, mut publisher, before) = subscribed_and_delivered(&a, &b, &channels).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let live = tokio::spawn(publish_live(
        a.connect().await,
        channels.iter().map(|(c, _)| c.clone()).collect(),
        stopped,
    ));
    // Some live traffic on every master first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = channels[0].1;
    cluster.kill(victim);
    tokio::task::block_in_place(|| cluster.wait_failover(victim));
    // A few rounds after the failover too, then the last word on every channel.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    let (oks, _) = live.await.unwrap();
    for (i, (c, _)) in channels.iter().enumerate() {
        publish_ok(&mut publisher, 100_000 + i as u64, c, json!("after")).await;
    }
    for ((((c, m), s), before), oks) in channels.iter().zip(&mut subs).zip(&before).zip(&oks) {
        if *m == victim {
            expect_gap_then_resume(s, &b, c, before, oks).await;
        } else {
            let got = live_until_after(s, c, "on the killed master").await;
            assert!(
                oks.len() >= 5,
                "{c}: its master carried on through the failover: {oks:?}"
            );
            assert!(
                delivered_in_order(&got, oks),
                "{c}: acknowledged {oks:?}, received {got:?}"
            );
        }
    }
    assert!(b.ready().await && a.ready().await);
}

/// A slot with live subscribers moves to another master (`redis-cli --cluster reshard`) while a
/// publisher publishes to every channel: the moved channel's publishes follow the slot (Redis's
/// MOVED and ASK answers are followed, never answered `unavailable`), its subscribers get a gap
/// and a resume brings every publish answered `ok`; the channels elsewhere keep receiving
/// live, every `ok` publish in order, and never get a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_under_subscribers_is_followed_with_a_gap() {
    let cluster = RedisCluster::start();
    let (a, b) = (node(&cluster).await, node(&cluster).await);
    // The moved channel lives in the slot `redis-cli --cluster reshard` takes first from its
    // master (the lowest): a channel named by the slot's tag hashes there.
    let from = cluster.masters()[0];
    let first = cluster.lowest_slot(from);
    let moved = edgeplex::bus::redis::cluster::slot_tag(first).to_string();
    assert_eq!(slot(&key(&moved)), first);
    let mut channels = vec![(moved.clone(), from)];
    channels.extend(
        spread(&cluster, "m", 1)
            .into_iter()
            .filter(|(_, m)| *m != from),
    );
    let (mut subs, mut publisher, before) = subscribed_and_delivered(&a, &b, &channels).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let live = tokio::spawn(publish_live(
        a.connect().await,
        channels.iter().map(|(c, _)| c.clone()).collect(),
        stopped,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let to = *cluster.masters().iter().find(|&&m| m != from).unwrap();
    assert_eq!(
        tokio::task::block_in_place(|| cluster.reshard_one(from, to)),
        first
    );
    assert_eq!(cluster.master_of(first), to);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send(true).unwrap();
    let (oks, refused) = live.await.unwrap();
    // A master served the slot throughout: the only refusal allowed is a publish that took
    // longer than bus.redis_timeout (the shared box under load), not one the move caused.
    for (r, (c, _)) in refused.iter().zip(&channels) {
        assert!(
            r.iter().all(|why| why.contains("timed out")),
            "{c}: refused {r:?}"
        );
    }
    assert!(
        oks[0].len() >= 5,
        "{moved}: published through the move: {oks:?}"
    );
    for (i, (c, _)) in channels.iter().enumerate() {
        publish_ok(&mut publisher, 100_000 + i as u64, c, json!("after")).await;
    }
    for ((((c, _), s), before), oks) in channels.iter().zip(&mut subs).zip(&before).zip(&oks) {
        if *c == moved {
            expect_gap_then_resume(s, &b, c, before, oks).await;
        } else {
            let got = live_until_after(s, c, "in the moved slot").await;
            assert!(
                delivered_in_order(&got, oks),
                "{c}: acknowledged {oks:?}, received {got:?}"
            );
        }
    }
    // And live again after the gap (messages still on their way from before it come first).
    publish_ok(&mut publisher, 500, &moved, json!("live")).await;
    while next_message(&mut subs[0]).await.0["data"] != "live" {}
    // The history moved with the slot: a resume still finds it.
    let mut resumer = a.connect().await;
    let r = resumer
        .request(json!({"id": 1, "op": "subscribe", "channel": moved, "since": "0-0"}))
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(next_message(&mut resumer).await.0["data"], "before");
    // A gap notice that comes late counts too (the pass after a move once sent one to the
    // master that received the slot): after a few passes, the other channels still have none.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, ((c, _), s)) in channels.iter().zip(&mut subs).enumerate().skip(1) {
        publish_ok(&mut publisher, 600 + i as u64, c, json!("end")).await;
        let (msg, gaps) = next_message(s).await;
        assert_eq!(msg["data"], "end", "{c}");
        assert_eq!(
            gaps, 0,
            "{c} is not in the moved slot: no gap, early or late"
        );
    }
}

/// `rediss://` seeds and `bus.redis_ca`: the cluster speaks TLS only (to clients and on its
/// bus), and a publish on one edge reaches a subscriber on the other on every master, through
/// the cluster connection (subscriptions, resumes) and the publish connections alike; a backend
/// `SPUBLISH` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_with_a_private_ca_carries_publishes_across_nodes() {
    let cluster = RedisCluster::start_tls();
    assert!(cluster.urls().iter().all(|u| u.starts_with("rediss://")));
    let (a, b) = (node(&cluster).await, node(&cluster).await);
    let channels = spread(&cluster, "tls", 1);
    let (mut subs, mut publisher, before) = subscribed_and_delivered(&a, &b, &channels).await;
    for (i, (c, _)) in channels.iter().enumerate() {
        publish_ok(&mut publisher, 10 + i as u64, c, json!("again")).await;
    }
    for (((c, _), s), before) in channels.iter().zip(&mut subs).zip(&before) {
        let (m, gaps) = next_message(s).await;
        assert_eq!((m["data"].clone(), gaps), (json!("again"), 0), "{c}");
        assert_ne!(&m["offset"], before, "{c}");
    }
    let heard = cluster.spublish(&key(&channels[0].0), r#""from a backend""#);
    assert_eq!(heard.trim(), "1", "the node's subscription, over TLS");
    assert_eq!(next_message(&mut subs[0]).await.0["data"], "from a backend");
    // A resume reads the history over TLS too.
    let mut r = a.connect().await;
    let ok = r
        .request(json!({"id": 1, "op": "subscribe", "channel": channels[1].0, "since": before[1]}))
        .await;
    assert_eq!(ok["ok"], true, "{ok}");
    assert_eq!(next_message(&mut r).await.0["data"], "again");
}
