//! WebSocket fan-out through a real edge on loopback (plain TCP listener, embedded or Redis bus):
//! S subscribers on one channel, one publisher at P messages per second, 100-byte payloads
//! carrying a timestamp. Prints deliveries per second, loss, and publish-to-deliver latency.
//!
//! Run: `cargo bench --bench ws_fanout` with optional `SUBSCRIBERS` (default 1000), `RATE`
//! (publishes per second, default 100), `DURATION_SECS` (default 5) and `REDIS_URL` (use the
//! Redis bus at that URL instead of the embedded one). The clients run in the same
//! process and share the machine's cores with the edge, so figures are a floor, not a ceiling.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeplex::Edge;
use edgeplex::config::{Config, FileConfig};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn main() {
    let subscribers = env("SUBSCRIBERS", 1000) as usize;
    let rate = env("RATE", 100);
    let seconds = env("DURATION_SECS", 5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(subscribers, rate, seconds));
}

async fn run(subscribers: usize, rate: u64, seconds: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut f = FileConfig::default();
    f.server.listen = "127.0.0.1:0".into();
    f.server.listen_plain = "127.0.0.1:0".into();
    f.server.admin_listen = String::new();
    f.tls.dev_cert_path = dir.path().join("dev.pem").display().to_string();
    f.session.messages_per_second = 1_000_000;
    f.session.message_burst = 1_000_000;
    // Every client of the benchmark is 127.0.0.1: a trusted load source, as a deployment that
    // benchmarks itself would declare it.
    f.admission.exempt = vec!["127.0.0.0/8".into()];
    f.limits.new_sessions.per_second = 1_000_000;
    f.limits.new_sessions.burst = 1_000_000;
    let bus = match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => {
            f.bus.redis_url = url;
            "Redis bus"
        }
        _ => "embedded bus",
    };
    let edge = Edge::start(Config::from_file_config(f).unwrap())
        .await
        .unwrap();
    // The Redis bus connects in the background; wait until it is ready.
    for _ in 0..500 {
        if edge.state().is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(edge.state().is_ready(), "the bus did not become ready");
    let url = format!("ws://{}/ws", edge.plain_addr().unwrap());

    let total = (rate * seconds) as usize;
    let mut readers = Vec::with_capacity(subscribers);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subscribers);
    for _ in 0..subscribers {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        ws.next().await; // welcome
        ws.send(Message::text(
            r#"{"id":1,"op":"subscribe","channel":"bench"}"#,
        ))
        .await
        .unwrap();
        let ready = ready_tx.clone();
        readers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(total);
            let mut subscribed = false;
            while latencies.len() < total {
                let Ok(Some(Ok(Message::Text(t)))) =
                    tokio::time::timeout(Duration::from_secs(5), ws.next()).await
                else {
                    break;
                };
                if !subscribed {
                    subscribed = true;
                    let _ = ready.send(()).await;
                    continue;
                }
                if let Some(i) = t.find("\"t\":") {
                    let digits: String = t[i + 4..]
                        .chars()
                        .take_while(|c| c.is_ascii_digit())
                        .collect();
                    if let Ok(sent) = digits.parse::<u64>() {
                        latencies.push(now_micros().saturating_sub(sent));
                    }
                }
            }
            latencies
        }));
    }
    for _ in 0..subscribers {
        ready_rx.recv().await;
    }

    let (mut publisher, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    publisher.next().await;
    let (mut pub_tx, mut pub_rx) = publisher.split();
    tokio::spawn(async move { while pub_rx.next().await.is_some() {} });
    let pad = "p".repeat(40);
    let start = std::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    for _ in 0..total {
        tick.tick().await;
        let frame = format!(
            r#"{{"op":"publish","channel":"bench","data":{{"t":{},"pad":"{pad}"}}}}"#,
            now_micros()
        );
        pub_tx.send(Message::text(frame)).await.unwrap();
    }
    let publish_time = start.elapsed();
    let mut all = Vec::with_capacity(total * subscribers);
    for r in readers {
        all.extend(r.await.unwrap());
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0
    };
    let offered = total * subscribers;
    println!(
        "ws fan-out: {subscribers} subscribers, {rate} publishes/s for {seconds} s, plain TCP, {bus}"
    );
    println!("offered deliveries    {offered}");
    println!(
        "delivered             {} ({:.3}% loss)",
        all.len(),
        100.0 * (offered - all.len()) as f64 / offered as f64
    );
    println!("publish phase         {:.2} s", publish_time.as_secs_f64());
    println!(
        "deliveries/s          {:.0}",
        all.len() as f64 / elapsed.as_secs_f64()
    );
    println!("latency ms p50        {:.2}", pct(0.50));
    println!("latency ms p99        {:.2}", pct(0.99));
    println!("latency ms p99.9      {:.2}", pct(0.999));
    edge.shutdown_within(Duration::from_secs(2)).await;
}
