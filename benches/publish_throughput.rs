//! Publish throughput and publish-to-deliver latency through two edges on the Redis bus: one
//! scratch `redis-server`, then a scratch Redis Cluster of three masters and three replicas
//! (`bus.redis_cluster`). Publishers are on edge A, one subscriber per channel on edge B, so
//! every delivery crosses Redis.
//!
//! Two phases per bus, `DURATION_SECS` each (default 8):
//! - **saturated**: `PUBLISHERS` connections (default 4) each keep `WINDOW` publishes (default
//!   64) in flight; prints publishes answered `ok` per second, the answer's p50/p99 and the
//!   publish-to-deliver p50/p99 (queueing included: this is the ceiling, not a latency figure);
//! - **paced**: `RATE` publishes per second in all (default 2,000), sent on schedule whatever
//!   the answers; the latency is measured from the scheduled time (no coordinated omission).
//!
//! Also: `CHANNELS` (default 64, spread over the slots), `SUBSCRIBERS` connections on B
//! (default 4; channel k on subscriber k mod S), and the CPU the edges and the Redis processes
//! used. The clients run in this process (plain `ws://`), on the same cores as everything else.
//!
//! Run: `cargo bench --bench publish_throughput`.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{Value, json};
use support::{EdgeProc, RedisClusterProc, RedisProc, cpu_of, env, new_histogram, now_micros};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

type Ws = WebSocketStream<TcpStream>;

#[derive(Clone, Copy)]
enum Mode {
    /// This many publishes in flight per publisher connection.
    Window(u64),
    /// Publishes per second, in all.
    Rate(u64),
}

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    refused: AtomicU64,
    delivered: AtomicU64,
}

async fn connect(addr: SocketAddr) -> Ws {
    let tcp = TcpStream::connect(addr).await.expect("the edge accepts");
    tcp.set_nodelay(true).unwrap();
    let mut ws = support::ws_client(&format!("ws://{addr}/ws"), tcp)
        .await
        .expect("WebSocket handshake");
    let welcome = ws.next().await.expect("welcome").expect("welcome");
    assert!(welcome.to_text().unwrap().contains("welcome"));
    ws
}

fn text(m: &Message) -> Option<Value> {
    match m {
        Message::Text(t) => serde_json::from_str(t).ok(),
        _ => None,
    }
}

/// One phase: subscribers on `b`, publishers on `a`; returns (ok/s, answer histogram, delivery
/// histogram, counts).
async fn phase(
    a: SocketAddr,
    b: SocketAddr,
    channels: &[String],
    mode: Mode,
    secs: u64,
) -> (f64, Histogram<u64>, Histogram<u64>, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let deliver = Arc::new(Mutex::new(new_histogram()));
    let answer = Arc::new(Mutex::new(new_histogram()));
    let stop = Arc::new(AtomicBool::new(false));
    let nsubs = env("SUBSCRIBERS", 4).max(1) as usize;
    let mut sub_tasks = Vec::new();
    for s in 0..nsubs {
        let mut ws = connect(b).await;
        let mine: Vec<&String> = channels.iter().skip(s).step_by(nsubs).collect();
        for (i, c) in mine.iter().enumerate() {
            let req = json!({"id": i, "op": "subscribe", "channel": c});
            ws.send(Message::text(req.to_string())).await.unwrap();
        }
        let mut confirmed = 0;
        while confirmed < mine.len() {
            let f = text(&ws.next().await.unwrap().unwrap()).unwrap();
            assert_eq!(f["ok"], true, "subscribe: {f}");
            confirmed += 1;
        }
        let (counts, deliver, stop) = (counts.clone(), deliver.clone(), stop.clone());
        sub_tasks.push(tokio::spawn(async move {
            loop {
                let m = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                    Ok(Some(Ok(m))) => m,
                    Ok(_) => break,
                    Err(_) if stop.load(Ordering::Relaxed) => break,
                    Err(_) => continue,
                };
                let Some(f) = text(&m) else { continue };
                if f["op"] == "message"
                    && let Some(t) = f["data"]["t"].as_u64()
                {
                    let _ = deliver.lock().record(now_micros().saturating_sub(t).max(1));
                    counts.delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let npub = env("PUBLISHERS", 4).max(1);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let pad = "x".repeat(60);
    let mut pub_tasks = Vec::new();
    for p in 0..npub {
        let (mut sink, mut stream) = connect(a).await.split();
        let sent: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
        let window = Arc::new(tokio::sync::Semaphore::new(match mode {
            Mode::Window(w) => w as usize,
            Mode::Rate(_) => tokio::sync::Semaphore::MAX_PERMITS,
        }));
        let reader = tokio::spawn({
            let (sent, counts, answer, window) =
                (sent.clone(), counts.clone(), answer.clone(), window.clone());
            async move {
                while let Some(Ok(m)) = stream.next().await {
                    let Some(f) = text(&m) else { continue };
                    let Some(id) = f["id"].as_u64() else { continue };
                    if let Some(t) = sent.lock().remove(&id) {
                        let _ = answer.lock().record(now_micros().saturating_sub(t).max(1));
                    }
                    if f["ok"] == true {
                        counts.ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        counts.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    // Paced, the window is not used (and is already at its maximum).
                    if matches!(mode, Mode::Window(_)) {
                        window.add_permits(1);
                    }
                }
            }
        });
        let channels = channels.to_vec();
        let pad = pad.clone();
        pub_tasks.push(tokio::spawn(async move {
            let mut n: u64 = 0;
            let t0 = now_micros();
            while Instant::now() < deadline {
                let t = match mode {
                    Mode::Window(_) => {
                        window.acquire().await.unwrap().forget();
                        now_micros()
                    }
                    Mode::Rate(r) => {
                        // This publisher's share of the schedule; stamped with the scheduled time.
                        let every = 1_000_000 * npub / r.max(1);
                        let due = t0 + n * every;
                        let now = now_micros();
                        if due > now {
                            tokio::time::sleep(Duration::from_micros(due - now)).await;
                        }
                        due
                    }
                };
                n += 1;
                let id = n * npub + p;
                let c = &channels[(id as usize) % channels.len()];
                sent.lock().insert(id, t);
                let req = json!({"id": id, "op": "publish", "channel": c,
                                 "data": {"t": t, "pad": pad}});
                if sink.send(Message::text(req.to_string())).await.is_err() {
                    break;
                }
            }
            // Let the last answers come, then close.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = sink.close().await;
            reader.abort();
        }));
    }
    for t in pub_tasks {
        let _ = t.await;
    }
    let elapsed = (start.elapsed().as_secs_f64() - 1.0).max(0.001);
    stop.store(true, Ordering::Relaxed);
    for t in sub_tasks {
        let _ = t.await;
    }
    let ok_per_sec = counts.ok.load(Ordering::Relaxed) as f64 / elapsed;
    let answer = answer.lock().clone();
    let deliver = deliver.lock().clone();
    (ok_per_sec, answer, deliver, counts)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn bus(name: &str, a: &EdgeProc, b: &EdgeProc, redis_pids: &[u32]) {
    let channels: Vec<String> = (0..env("CHANNELS", 64))
        .map(|i| format!("bench-{i}"))
        .collect();
    let secs = env("DURATION_SECS", 8);
    let phases = [
        ("saturated", Mode::Window(env("WINDOW", 64))),
        ("paced", Mode::Rate(env("RATE", 2000))),
    ];
    for (label, mode) in phases {
        let edges = [a.pid(), b.pid()];
        let (e0, r0) = (cpu_of(&edges), cpu_of(redis_pids));
        let wall = Instant::now();
        let (rate, answer, deliver, counts) = phase(a.plain, b.plain, &channels, mode, secs).await;
        let wall = wall.elapsed().as_secs_f64();
        let (e1, r1) = (cpu_of(&edges), cpu_of(redis_pids));
        let ok = counts.ok.load(Ordering::Relaxed);
        println!(
            "{name:<12} {label:<9} ok/s {rate:>8.0}  ok {ok:>7} refused {:>5} delivered {:>7}  \
             answer p50 {:>6.2} ms p99 {:>7.2} ms  deliver p50 {:>6.2} ms p99 {:>7.2} ms max {:>7.1} ms  \
             CPU edges {:>4.0}% redis {:>4.0}%",
            counts.refused.load(Ordering::Relaxed),
            counts.delivered.load(Ordering::Relaxed),
            ms(&answer, 0.5),
            ms(&answer, 0.99),
            ms(&deliver, 0.5),
            ms(&deliver, 0.99),
            deliver.max() as f64 / 1000.0,
            100.0 * (e1 - e0) / wall,
            100.0 * (r1 - r0) / wall,
        );
    }
}

#[tokio::main]
async fn main() {
    let sessions = 64;
    {
        let redis = RedisProc::start();
        let a = EdgeProc::start(sessions, Some(&redis.url));
        let b = EdgeProc::start(sessions, Some(&redis.url));
        bus("1 Redis", &a, &b, &[redis.pid()]).await;
    }
    {
        let cluster = RedisClusterProc::start();
        let a = EdgeProc::start_cluster(sessions, &cluster.urls);
        let b = EdgeProc::start_cluster(sessions, &cluster.urls);
        bus("3+3 cluster", &a, &b, &cluster.pids()).await;
    }
}
