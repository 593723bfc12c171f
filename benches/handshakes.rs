//! Handshakes: how many new sessions per second an edge opens, each a fresh TCP connection, a
//! full TLS 1.3 handshake (no resumption) and a WebSocket upgrade answered by the welcome frame,
//! then closed. Prints handshakes per second, their latency (p50, p99, p99.9) and the CPU of the
//! edge next to the load generators', which share the machine.
//!
//! Run: `cargo bench --bench handshakes`, with optional `DURATION_SECS` (default 5), `LOADGENS`
//! load-generator processes (default 2), `CONCURRENCY` handshakes in flight per load generator
//! (default 32), `SOURCES` 127.0.x.y source addresses each (default 16), `EDGES` (default 1),
//! `RESUME=1` to allow TLS session resumption (what returning clients get), `UPGRADE=0` to stop
//! after the TLS handshake, `PLAIN=1` to add a row over plain TCP for comparison, `TOKEN=0` to
//! skip the row whose sessions each present an ES256 token (`?token=`, verified by the edge
//! against `auth.public_keys`, with `auth.anonymous = false`).
//!
//! Each handshake leaves a socket in TIME_WAIT on its source address for a minute; the
//! source addresses keep the ephemeral ports from running out on long runs.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use jwt_simple::prelude::{Claims, Duration as JsDuration, ECDSAP256KeyPairLike, ES256KeyPair};
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use support::{EdgeProc, Worker, cpu_of, env, new_histogram, share, source, tcp_from};
use tokio::io::{AsyncRead, AsyncWrite};

/// One handshake: the WebSocket upgrade and its welcome frame, when asked for.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(io: S, url: &str) -> bool {
    let Ok(mut ws) = support::ws_client(url, io).await else {
        return false;
    };
    matches!(ws.next().await, Some(Ok(_)))
}

async fn handshaker() {
    let var = support::worker_var;
    let addrs: Vec<std::net::SocketAddr> = var("HS_ADDRS")
        .split(',')
        .map(|a| a.parse().unwrap())
        .collect();
    let tls = var("HS_TLS") == "1";
    let upgrade_too = var("HS_UPGRADE") == "1";
    let conc: u64 = var("HS_CONC").parse().unwrap();
    let secs: f64 = var("HS_SECS").parse().unwrap();
    let index: u64 = var("HS_INDEX").parse().unwrap();
    let sources: u64 = var("HS_SOURCES").parse().unwrap();
    let token = var("HS_TOKEN");
    let query = if token.is_empty() {
        String::new()
    } else {
        format!("?token={token}")
    };
    let connector = support::tls_connector(&var("HS_CA"), var("HS_RESUME") == "1");
    let mut control = support::Control::new();
    control.reply("ready");
    assert_eq!(control.next().as_deref(), Some("go"));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(new_histogram()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for lane in 0..conc {
        let (ok, failed, hist, stop) = (ok.clone(), failed.clone(), hist.clone(), stop.clone());
        let (addrs, connector, query) = (addrs.clone(), connector.clone(), query.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = lane;
            while !stop.load(Ordering::Relaxed) {
                let addr = addrs[(n % addrs.len() as u64) as usize];
                let from = source(index, sources, n);
                n += conc;
                let start = Instant::now();
                let url = format!(
                    "{}://localhost:{}/ws{query}",
                    if tls { "wss" } else { "ws" },
                    addr.port()
                );
                let done = match tcp_from(from, addr).await {
                    Err(_) => false,
                    Ok(tcp) if tls => {
                        match connector
                            .connect(ServerName::try_from("localhost").unwrap(), tcp)
                            .await
                        {
                            Err(_) => false,
                            Ok(s) if upgrade_too => upgrade(s, &url).await,
                            Ok(_) => true,
                        }
                    }
                    Ok(tcp) => upgrade(tcp, &url).await,
                };
                if done {
                    ok.fetch_add(1, Ordering::Relaxed);
                    hist.lock()
                        .saturating_record(start.elapsed().as_micros().max(1) as u64);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let hex = support::hist_to_hex(&hist.lock());
    control.reply(&format!(
        "done {} {} {hex}",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    ));
}

fn main() {
    edgeplex::tls::install_crypto_provider();
    if std::env::var(support::ROLE).as_deref() == Ok("handshaker") {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        return rt.block_on(handshaker());
    }
    let secs = support::env_f64("DURATION_SECS", 5.0);
    let loadgens = env("LOADGENS", 2).clamp(1, 100);
    let conc = env("CONCURRENCY", 32).max(1);
    let sources = env("SOURCES", 16).clamp(1, 250);
    let edges = env("EDGES", 1).max(1);
    let resume = env("RESUME", 0) == 1;
    let upgrade_too = env("UPGRADE", 1) == 1;
    // (TLS, with a token)
    let mut rows = vec![(true, false)];
    if env("TOKEN", 1) == 1 && upgrade_too {
        rows.push((true, true));
    }
    if env("PLAIN", 0) == 1 {
        rows.push((false, false));
    }
    // One ES256 key and one token for the whole run: what is measured is the edge's check.
    let key = ES256KeyPair::generate();
    let keys_dir = tempfile::tempdir().unwrap();
    let keys_pem = keys_dir.path().join("keys.pem");
    std::fs::write(&keys_pem, key.public_key().to_pem().unwrap()).unwrap();
    let token = key
        .sign(Claims::create(JsDuration::from_hours(2)).with_subject("bench-user"))
        .unwrap();
    let auth = format!(
        "[auth]\npublic_keys = \"{}\"\nanonymous = false\n\
         [limits.user_sessions]\nmode = \"off\"\n[limits.user_messages]\nmode = \"off\"\n",
        keys_pem.display()
    );
    println!(
        "handshakes: {edges} edge process(es), {loadgens} load generator(s) x {conc} in flight, \
         {secs} s per row, TLS resumption {}, WebSocket upgrade {}",
        if resume { "allowed" } else { "off" },
        if upgrade_too { "on" } else { "off" }
    );
    println!(
        "{:>10} {:>10} {:>8} {:>12} {:>8} {:>8} {:>9} {:>9} {:>9}",
        "transport",
        "done",
        "failed",
        "per second",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "edge",
        "loadgen"
    );
    for (tls, with_token) in rows {
        let extra = if with_token { auth.as_str() } else { "" };
        let served: Vec<EdgeProc> = (0..edges)
            .map(|_| EdgeProc::start_with(conc * loadgens + 1000, None, extra))
            .collect();
        let edge_pids: Vec<u32> = served.iter().map(|e| e.pid()).collect();
        let addrs: Vec<String> = served
            .iter()
            .map(|e| if tls { e.tls } else { e.plain }.to_string())
            .collect();
        let mut gens: Vec<Worker> = (0..loadgens)
            .map(|g| {
                Worker::spawn(
                    "handshaker",
                    &[
                        ("HS_ADDRS", addrs.join(",")),
                        ("HS_CA", served[0].pem.display().to_string()),
                        ("HS_TLS", u8::from(tls).to_string()),
                        ("HS_UPGRADE", u8::from(upgrade_too || !tls).to_string()),
                        ("HS_RESUME", u8::from(resume).to_string()),
                        ("HS_CONC", share(conc * loadgens, loadgens, g).to_string()),
                        ("HS_SECS", secs.to_string()),
                        ("HS_INDEX", g.to_string()),
                        ("HS_SOURCES", sources.to_string()),
                        (
                            "HS_TOKEN",
                            if with_token {
                                token.clone()
                            } else {
                                String::new()
                            },
                        ),
                    ],
                )
            })
            .collect();
        for g in &mut gens {
            assert_eq!(g.recv(), "ready");
        }
        let gen_pids: Vec<u32> = gens.iter().map(|g| g.pid()).collect();
        let cpu0 = (cpu_of(&edge_pids), cpu_of(&gen_pids));
        let wall = Instant::now();
        for g in &mut gens {
            g.send("go");
        }
        let (mut ok, mut failed, mut hist) = (0u64, 0u64, new_histogram());
        for g in &mut gens {
            let line = g.recv();
            let mut w = line.split_whitespace().skip(1);
            ok += w.next().unwrap().parse::<u64>().unwrap();
            failed += w.next().unwrap().parse::<u64>().unwrap();
            hist.add(support::hist_from_hex(w.next().unwrap())).unwrap();
        }
        let wall = wall.elapsed().as_secs_f64();
        let edge_cpu = cpu_of(&edge_pids) - cpu0.0;
        let gen_cpu = cpu_of(&gen_pids) - cpu0.1;
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{:>10} {:>10} {:>8} {:>12.0} {:>8.2} {:>8.2} {:>9.2} {:>8.0}% {:>8.0}%",
            match (tls, with_token) {
                (true, false) => "TLS",
                (true, true) => "TLS+ES256",
                (false, _) => "plain",
            },
            ok,
            failed,
            ok as f64 / secs,
            ms(0.5),
            ms(0.99),
            ms(0.999),
            100.0 * edge_cpu / wall,
            100.0 * gen_cpu / wall,
        );
        drop(gens);
    }
    println!("CPU columns: share of one core over the row, summed over the role's processes.");
}
