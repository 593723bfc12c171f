//! Channel churn on the Redis bus: does subscribing and unsubscribing many distinct channels stall
//! the delivery of an unrelated, steady channel?
//!
//! One edge process (the release `edgeplex` binary) on a scratch `redis-server` on a free port. A
//! backend publishes `RATE` messages per second (default 500) straight to Redis on the channel
//! `steady`, each carrying its scheduled send time; one WebSocket subscriber of `steady` measures
//! publish-to-deliver latency. A churn process (this bench re-executed) holds `CHURNERS`
//! WebSocket sessions (default 64) that subscribe to a fresh channel name, unsubscribe it, and
//! repeat, `CHURN_RATE` subscribe/unsubscribe pairs per second in all (default 3000), each waiting
//! for its reply. Every pair is one new Redis subscription and one dropped.
//!
//! Two phases of `DURATION_SECS` (default 5) each: quiet (no churn), then churn. Prints, per phase,
//! delivered/sent, latency p50/p99/max, the churn pairs done per second, and edge and Redis CPU.
//!
//! `BUS=cluster`: the same on a scratch 3-master, 3-replica Redis Cluster (the backend
//! `SPUBLISH`es `edgeplex:{steady}`; Redis CPU is all six nodes').
//!
//! Run: `cargo bench --bench channel_churn`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use support::{
    EdgeProc, RedisClusterProc, RedisProc, Worker, cpu_of, env, env_f64, env_str, for_each_stamp,
    new_histogram, now_micros, worker_var,
};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn ws(url: &str) -> Ws {
    let addr = support::url_addr(url);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    support::ws_client(url, tcp).await.expect("handshake")
}

/// Sends one request and waits for the frame that answers it (pushes are skipped).
async fn request(ws: &mut Ws, req: String, id: u64) {
    ws.send(Message::text(req)).await.unwrap();
    let want = format!("\"id\":{id},");
    while let Some(m) = ws.next().await {
        if let Message::Text(t) = m.unwrap()
            && t.contains(&want)
        {
            assert!(t.contains("\"ok\":true"), "refused: {t}");
            return;
        }
    }
    panic!("the edge closed a churning session");
}

/// Churn role: `CHURNERS` sessions; `run RATE SECS` makes RATE subscribe/unsubscribe pairs per
/// second in all for SECS seconds and answers `done PAIRS`.
async fn churn_role() {
    let url = worker_var("CHURN_URL");
    let churners: u64 = worker_var("CHURNERS").parse().unwrap();
    let mut sessions = Vec::new();
    for _ in 0..churners {
        let mut s = ws(&url).await;
        s.next().await.unwrap().unwrap(); // welcome
        sessions.push(s);
    }
    let sessions: Vec<_> = sessions
        .into_iter()
        .map(|s| Arc::new(tokio::sync::Mutex::new(s)))
        .collect();
    let mut control = support::Control::new();
    control.reply("ready");
    let mut round = 0u64;
    while let Some(cmd) = tokio::task::block_in_place(|| control.next()) {
        let mut words = cmd.split_whitespace().skip(1);
        let rate: f64 = words.next().unwrap().parse().unwrap();
        let secs: f64 = words.next().unwrap().parse().unwrap();
        let pairs = Arc::new(AtomicU64::new(0));
        let per = rate / churners as f64;
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut tasks = Vec::new();
        for (k, s) in sessions.iter().enumerate() {
            let (s, pairs) = (s.clone(), pairs.clone());
            let r = round;
            tasks.push(tokio::spawn(async move {
                let mut s = s.lock().await;
                let gap = Duration::from_secs_f64(1.0 / per);
                let mut next = tokio::time::Instant::now();
                let mut i = 0u64;
                while Instant::now() < end {
                    let ch = format!("churn.{r}.{k}.{i}");
                    let sub = format!(r#"{{"id":1,"op":"subscribe","channel":"{ch}"}}"#);
                    request(&mut s, sub, 1).await;
                    let unsub = format!(r#"{{"id":2,"op":"unsubscribe","channel":"{ch}"}}"#);
                    request(&mut s, unsub, 2).await;
                    pairs.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    next += gap;
                    tokio::time::sleep_until(next).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        round += 1;
        control.reply(&format!("done {}", pairs.load(Ordering::Relaxed)));
    }
}

struct Phase {
    sent: u64,
    got: u64,
    hist: hdrhistogram::Histogram<u64>,
    pairs: u64,
    edge_cpu: f64,
    redis_cpu: f64,
}

/// The backend's publishes to `steady`, `rate` per second for `secs`, each carrying its
/// scheduled time; `command` and `channel` are `PUBLISH edgeplex:steady` or, on a cluster,
/// `SPUBLISH edgeplex:{steady}`.
async fn backend<C: redis::aio::ConnectionLike>(
    mut conn: C,
    command: &str,
    channel: &str,
    rate: f64,
    secs: f64,
) -> u64 {
    let gap = Duration::from_secs_f64(1.0 / rate);
    let n = (rate * secs) as u64;
    let start = tokio::time::Instant::now();
    let wall = now_micros();
    for i in 0..n {
        let at = start + gap * i as u32;
        tokio::time::sleep_until(at).await;
        // The scheduled time, so a publisher that falls behind shows as latency.
        let stamp = wall + (gap * i as u32).as_micros() as u64;
        let payload = format!("\"#{stamp}#\"");
        let _: () = redis::cmd(command)
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    n
}

/// One phase: publishes for `secs` while the subscriber measures; `churn` runs alongside.
/// `redis_urls`: one Redis, or a cluster's nodes.
async fn phase(
    redis_urls: &[String],
    cluster: bool,
    sub: &mut Ws,
    rate: f64,
    secs: f64,
    churn: Option<(&mut Worker, f64)>,
    pids: (u32, &[u32]),
) -> Phase {
    let hist = Arc::new(Mutex::new(new_histogram()));
    let got = Arc::new(AtomicU64::new(0));
    let cpu0 = (cpu_of(&[pids.0]), cpu_of(pids.1));
    let started = Instant::now();
    let churn = churn.map(|(w, r)| {
        w.send(&format!("run {r} {secs}"));
        w
    });
    let publisher = if cluster {
        let client = redis::cluster::ClusterClient::new(redis_urls.to_vec()).unwrap();
        let conn = client.get_async_connection().await.unwrap();
        tokio::spawn(backend(conn, "SPUBLISH", "edgeplex:{steady}", rate, secs))
    } else {
        let client = redis::Client::open(redis_urls[0].as_str()).unwrap();
        let conn = client.get_multiplexed_async_connection().await.unwrap();
        tokio::spawn(backend(conn, "PUBLISH", "edgeplex:steady", rate, secs))
    };
    let deadline = Instant::now() + Duration::from_secs_f64(secs + 2.0);
    {
        let (hist, got) = (hist.clone(), got.clone());
        let n = (rate * secs) as u64;
        let _ = tokio::time::timeout_at(deadline.into(), async {
            while got.load(Ordering::Relaxed) < n {
                let Some(Ok(Message::Text(t))) = sub.next().await else {
                    panic!("the subscriber was cut");
                };
                for_each_stamp(t.as_bytes(), |ts| {
                    hist.lock()
                        .record(now_micros().saturating_sub(ts).max(1))
                        .unwrap();
                    got.fetch_add(1, Ordering::Relaxed);
                });
            }
        })
        .await;
    }
    let sent = publisher.await.unwrap();
    let pairs = match churn {
        Some(w) => {
            let line = tokio::task::block_in_place(|| w.recv());
            line.strip_prefix("done ").unwrap().parse().unwrap()
        }
        None => 0,
    };
    let elapsed = started.elapsed().as_secs_f64();
    Phase {
        sent,
        got: got.load(Ordering::Relaxed),
        hist: hist.lock().clone(),
        pairs,
        edge_cpu: (cpu_of(&[pids.0]) - cpu0.0) / elapsed,
        redis_cpu: (cpu_of(pids.1) - cpu0.1) / elapsed,
    }
}

fn main() {
    edgeplex::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if std::env::var(support::ROLE).as_deref() == Ok("churn") {
        return rt.block_on(churn_role());
    }
    let rate = env_f64("RATE", 500.0);
    let churn_rate = env_f64("CHURN_RATE", 3000.0);
    let churners = env("CHURNERS", 64).max(1);
    let secs = env_f64("DURATION_SECS", 5.0);
    let cluster = env_str("BUS", "redis") == "cluster";
    // Either one Redis or a cluster; kept until the end.
    let (_redis, _cluster, urls, redis_pids) = if cluster {
        let c = RedisClusterProc::start();
        let (urls, pids) = (c.urls.clone(), c.pids());
        (None, Some(c), urls, pids)
    } else {
        let r = RedisProc::start();
        let (urls, pids) = (vec![r.url.clone()], vec![r.pid()]);
        (Some(r), None, urls, pids)
    };
    let edge = match cluster {
        true => EdgeProc::start_cluster(churners + 10, &urls),
        false => EdgeProc::start(churners + 10, Some(&urls[0])),
    };
    let url = format!("ws://{}/ws", edge.plain);
    rt.block_on(async {
        let mut churn = Worker::spawn(
            "churn",
            &[
                ("CHURN_URL", url.clone()),
                ("CHURNERS", churners.to_string()),
            ],
        );
        assert_eq!(tokio::task::block_in_place(|| churn.recv()), "ready");
        let mut sub = ws(&url).await;
        sub.next().await.unwrap().unwrap(); // welcome
        request(
            &mut sub,
            r#"{"id":1,"op":"subscribe","channel":"steady"}"#.into(),
            1,
        )
        .await;
        let pids = (edge.pid(), redis_pids.as_slice());
        let on = if cluster { "a Redis Cluster" } else { "Redis" };
        println!(
            "channel churn: one edge on {on}; `steady` at {rate}/s, one subscriber; \
             {churners} churning sessions asked for {churn_rate} subscribe/unsubscribe pairs/s; \
             {secs} s per phase"
        );
        println!(
            "| phase | delivered/sent | p50 | p99 | max | churn pairs/s | edge CPU | Redis CPU |"
        );
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (name, with_churn) in [("quiet", false), ("churn", true)] {
            let c = with_churn.then_some((&mut churn, churn_rate));
            let p = phase(&urls, cluster, &mut sub, rate, secs, c, pids).await;
            let ms = |q: f64| p.hist.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "| {name} | {}/{} | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} | {:.0}% | {:.0}% |",
                p.got,
                p.sent,
                ms(0.5),
                ms(0.99),
                p.hist.max() as f64 / 1000.0,
                p.pairs as f64 / secs,
                p.edge_cpu * 100.0,
                p.redis_cpu * 100.0,
            );
        }
    });
}
