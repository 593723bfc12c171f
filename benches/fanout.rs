//! Fan-out load generator: S WebSocket subscribers spread over C channels and over E edge
//! processes, publishers sending P messages per second to each channel, 100-byte payloads that
//! carry their scheduled send time. Prints offered and delivered deliveries, loss, deliveries per
//! second, publish-to-deliver latency (p50, p99, p99.9, max) and the CPU each process used.
//!
//! Every part is its own process: edges (the release `edgeplex` binary; with `BUS=redis` they
//! share a scratch `redis-server`), subscriber load generators and one publisher process (this
//! bench re-executed), so the figures are per process and the edge's CPU is its own.
//!
//! Run: `cargo bench --bench fanout`, with optional
//! - `SUBSCRIBERS` (default 1000), `CHANNELS` (default 1; subscriber k takes channel k mod C),
//! - `RATE` messages per second per channel (default 1000), `DURATION_SECS` (default 5),
//! - `BUS` `embedded` (default) or `redis`; `EDGES` edge processes (default 1; more need Redis,
//!   subscribers are spread over all of them and publishers too, so most deliveries cross nodes),
//! - `LOADGENS` subscriber processes (default 2), `SOURCES` 127.0.x.y addresses each (default 8),
//! - `PUBLISHERS` publishing connections (default: one per channel, at most 4),
//! - `TLS=1` for `wss://` instead of plain `ws://`,
//! - `SWEEP=1`: repeat, multiplying `RATE` by `SWEEP_FACTOR` (default 1.5), until a step loses a
//!   message, a subscriber is cut, or p99 passes `P99_LIMIT_MS` (default 100); print the highest
//!   rate that passed. When the first step already fails (and cut nobody), the sweep divides
//!   instead, down to the first rate that passes.
//!
//! Against another server (see `benches/peers/run.sh`): `TARGET` comma-separated WebSocket URLs,
//! `PROTOCOL` `edgeplex` (also spoken by the Node relay) or `nats`, `TARGET_PIDS` the server
//! processes to read CPU and memory from, `TARGET_CA` a PEM to trust for `wss://`.
//!
//! Latency is measured from the time a message was scheduled to be sent, not from when the
//! publisher got round to it, so a publisher that falls behind shows as latency (no coordinated
//! omission). The clock is the machine's one wall clock, shared by all processes.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rustls::pki_types::ServerName;
use support::{
    EdgeProc, RedisProc, Worker, cpu_of, env, env_f64, env_str, for_each_stamp, new_histogram,
    now_micros, rss_kib, share, source, tcp_from, worker_var,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

const SHARDS: usize = 64;

#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    Edgeplex,
    Nats,
}

impl Protocol {
    fn parse(s: &str) -> Protocol {
        match s {
            "edgeplex" => Protocol::Edgeplex,
            "nats" => Protocol::Nats,
            other => panic!("PROTOCOL must be edgeplex or nats, not {other:?}"),
        }
    }

    fn subscribe(self, channel: &str) -> Message {
        match self {
            Protocol::Edgeplex => Message::text(format!(
                r#"{{"id":1,"op":"subscribe","channel":"{channel}"}}"#
            )),
            Protocol::Nats => Message::binary(format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":false}}\r\n\
                 SUB {channel} 1\r\nPING\r\n"
            )),
        }
    }

    fn hello(self) -> Option<Message> {
        match self {
            Protocol::Edgeplex => None,
            Protocol::Nats => Some(Message::binary(
                "CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false}\r\n",
            )),
        }
    }

    /// Whether `frame` answers the subscribe.
    fn subscribed(self, frame: &[u8]) -> bool {
        let needle: &[u8] = match self {
            Protocol::Edgeplex => b"\"id\":1",
            Protocol::Nats => b"PONG",
        };
        frame.windows(needle.len()).any(|w| w == needle)
    }

    fn publish(self, channel: &str, payload: &str) -> Message {
        match self {
            Protocol::Edgeplex => Message::text(format!(
                r#"{{"op":"publish","channel":"{channel}","data":"{payload}"}}"#
            )),
            Protocol::Nats => {
                Message::binary(format!("PUB {channel} {}\r\n{payload}\r\n", payload.len()))
            }
        }
    }
}

#[derive(Default)]
struct Counts {
    received: u64,
}

struct Shard {
    hist: Histogram<u64>,
    counts: Counts,
}

/// What a subscriber process has seen since the last reset.
struct Stats {
    shards: Vec<Mutex<Shard>>,
    closed: AtomicU64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        hist: new_histogram(),
                        counts: Counts::default(),
                    })
                })
                .collect(),
            closed: AtomicU64::new(0),
        }
    }

    fn received(&self) -> u64 {
        self.shards.iter().map(|s| s.lock().counts.received).sum()
    }

    fn reset(&self) {
        for s in &self.shards {
            let mut s = s.lock();
            s.hist.reset();
            s.counts = Counts::default();
        }
    }

    fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for s in &self.shards {
            all.add(&s.lock().hist).unwrap();
        }
        all
    }
}

/// One connection's address, URL, and whether it is TLS.
#[derive(Clone)]
struct Target {
    url: String,
    addr: std::net::SocketAddr,
    tls: bool,
}

fn targets(urls: &str) -> Vec<Target> {
    urls.split(',')
        .map(|u| Target {
            url: u.replace("127.0.0.1", "localhost"),
            addr: support::url_addr(u),
            tls: u.starts_with("wss://"),
        })
        .collect()
}

/// Connects a WebSocket from `from` to `t` and hands it to `then`, plain or over TLS.
macro_rules! with_ws {
    ($from:expr, $t:expr, $connector:expr, |$ws:ident| $then:expr) => {{
        let tcp = tcp_from($from, $t.addr).await.expect("connect");
        if $t.tls {
            let tls = $connector
                .as_ref()
                .expect("TARGET_CA for wss://")
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .expect("TLS handshake");
            let $ws = support::ws_client(&$t.url, tls)
                .await
                .expect("WebSocket upgrade");
            $then
        } else {
            let $ws = support::ws_client(&$t.url, tcp)
                .await
                .expect("WebSocket upgrade");
            $then
        }
    }};
}

async fn subscriber<S>(
    mut ws: WebSocketStream<S>,
    protocol: Protocol,
    channel: String,
    stats: Arc<Stats>,
    shard: usize,
    ready: tokio::sync::mpsc::Sender<()>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if protocol == Protocol::Edgeplex {
        ws.next().await; // welcome
    }
    ws.send(protocol.subscribe(&channel)).await.unwrap();
    let mut subscribed = false;
    while let Some(Ok(msg)) = ws.next().await {
        let bytes: &[u8] = match &msg {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
            Message::Close(_) => break,
            _ => continue,
        };
        if !subscribed {
            if protocol.subscribed(bytes) {
                subscribed = true;
                let _ = ready.send(()).await;
            }
            continue;
        }
        let now = now_micros();
        {
            let mut s = stats.shards[shard].lock();
            for_each_stamp(bytes, |ts| {
                s.hist.saturating_record(now.saturating_sub(ts).max(1));
                s.counts.received += 1;
            });
        }
        if protocol == Protocol::Nats && bytes.windows(6).any(|w| w == b"PING\r\n") {
            let _ = ws.send(Message::binary("PONG\r\n")).await;
        }
    }
    stats.closed.fetch_add(1, Ordering::Relaxed);
}

fn connector() -> Option<tokio_rustls::TlsConnector> {
    let ca = std::env::var("FAN_CA").unwrap_or_default();
    (!ca.is_empty()).then(|| support::tls_connector(&ca, true))
}

/// Subscriber role: opens its share of subscribers, then answers `reset`, `count`, `report`.
async fn subscribers_role() {
    let protocol = Protocol::parse(&worker_var("FAN_PROTOCOL"));
    let targets = targets(&worker_var("FAN_URLS"));
    let first: u64 = worker_var("FAN_FIRST").parse().unwrap();
    let count: u64 = worker_var("FAN_COUNT").parse().unwrap();
    let channels: u64 = worker_var("FAN_CHANNELS").parse().unwrap();
    let generator: u64 = worker_var("FAN_INDEX").parse().unwrap();
    let sources: u64 = worker_var("FAN_SOURCES").parse().unwrap();
    let connector = connector();
    let stats = Arc::new(Stats::new());
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(1024);
    for k in first..first + count {
        let t = targets[(k % targets.len() as u64) as usize].clone();
        let channel = format!("fan.{}", k % channels);
        let (stats, ready) = (stats.clone(), ready_tx.clone());
        let shard = (k as usize) % SHARDS;
        let from = source(generator, sources, k);
        with_ws!(from, t, connector, |ws| {
            tokio::spawn(subscriber(ws, protocol, channel, stats, shard, ready))
        });
    }
    for _ in 0..count {
        ready_rx.recv().await.expect("every subscriber subscribes");
    }
    let mut control = support::Control::new();
    control.reply(&format!("ready {count}"));
    let stats2 = stats.clone();
    // Commands are read on a blocking thread so the runtime's workers stay on the sockets.
    tokio::task::spawn_blocking(move || {
        while let Some(cmd) = control.next() {
            match cmd.as_str() {
                "reset" => {
                    stats2.reset();
                    control.reply("ok");
                }
                "count" => control.reply(&format!(
                    "count {} {}",
                    stats2.received(),
                    stats2.closed.load(Ordering::Relaxed)
                )),
                "report" => {
                    let hex = support::hist_to_hex(&stats2.merged());
                    control.reply(&format!(
                        "report {} {} {hex}",
                        stats2.received(),
                        stats2.closed.load(Ordering::Relaxed)
                    ));
                }
                other => panic!("unknown command {other:?}"),
            }
        }
    })
    .await
    .unwrap();
}

/// Publisher role: one connection per share of the channels; `run RATE SECS` publishes
/// RATE messages per second to every channel for SECS seconds.
async fn publisher_role() {
    let protocol = Protocol::parse(&worker_var("FAN_PROTOCOL"));
    let targets = targets(&worker_var("FAN_URLS"));
    let channels: u64 = worker_var("FAN_CHANNELS").parse().unwrap();
    let conns: u64 = worker_var("FAN_CONNS").parse().unwrap();
    let payload_len: usize = worker_var("FAN_PAYLOAD").parse().unwrap();
    let connector = connector();
    let mut sinks = Vec::new();
    for c in 0..conns {
        let t = targets[(c % targets.len() as u64) as usize].clone();
        let from = source(200, 8, c);
        let owned: Vec<String> = (c..channels)
            .step_by(conns as usize)
            .map(|j| format!("fan.{j}"))
            .collect();
        with_ws!(from, t, connector, |ws| {
            sinks.push(spawn_publisher(ws, protocol, owned, payload_len))
        });
    }
    let mut control = support::Control::new();
    control.reply("ready");
    loop {
        let cmd = tokio::task::block_in_place(|| control.next());
        let Some(cmd) = cmd else { return };
        let mut words = cmd.split_whitespace();
        assert_eq!(words.next(), Some("run"), "unknown command {cmd:?}");
        let rate: f64 = words.next().unwrap().parse().unwrap();
        let secs: f64 = words.next().unwrap().parse().unwrap();
        let start = Instant::now();
        let start_micros = now_micros();
        let mut done = Vec::new();
        for tx in &sinks {
            let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
            tx.send((rate, secs, start, start_micros, reply_tx))
                .await
                .unwrap();
            done.push(reply_rx);
        }
        let (mut sent, mut behind) = (0u64, 0u64);
        for d in done {
            let (s, b) = d.await.unwrap();
            sent += s;
            behind = behind.max(b);
        }
        control.reply(&format!(
            "done {sent} {:.3} {behind}",
            start.elapsed().as_secs_f64()
        ));
    }
}

type RunOrder = (
    f64,
    f64,
    Instant,
    u64,
    tokio::sync::oneshot::Sender<(u64, u64)>,
);

/// A publishing connection's task; each order publishes to `owned` channels round-robin and
/// answers with (messages sent, worst lag behind schedule in ms).
fn spawn_publisher<S>(
    ws: WebSocketStream<S>,
    protocol: Protocol,
    owned: Vec<String>,
    payload_len: usize,
) -> tokio::sync::mpsc::Sender<RunOrder>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<RunOrder>(1);
    tokio::spawn(async move {
        let (mut sink, mut stream) = ws.split();
        let pong = Arc::new(AtomicBool::new(false));
        let pong2 = pong.clone();
        // Replies and server pings are read and dropped; a NATS PING is answered at the next tick.
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                if let Message::Binary(b) = m
                    && b.windows(4).any(|w| w == b"PING")
                {
                    pong2.store(true, Ordering::Relaxed);
                }
            }
        });
        if let Some(hello) = protocol.hello() {
            sink.send(hello).await.unwrap();
        }
        while let Some((rate, secs, start, start_micros, reply)) = rx.recv().await {
            if owned.is_empty() {
                let _ = reply.send((0, 0));
                continue;
            }
            let per_sec = rate * owned.len() as f64;
            let total = (per_sec * secs).round() as u64;
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let (mut sent, mut behind) = (0u64, 0u64);
            while sent < total {
                tick.tick().await;
                if pong.swap(false, Ordering::Relaxed) {
                    let _ = sink.feed(Message::binary("PONG\r\n")).await;
                }
                let elapsed = start.elapsed().as_secs_f64();
                let due = ((elapsed * per_sec) as u64 + 1).min(total);
                if sent >= due {
                    continue;
                }
                while sent < due {
                    let scheduled = start_micros + (sent as f64 * 1e6 / per_sec) as u64;
                    let head = format!("#{scheduled}#");
                    let payload = format!("{head}{}", "p".repeat(payload_len - head.len()));
                    let channel = &owned[(sent % owned.len() as u64) as usize];
                    if sink
                        .feed(protocol.publish(channel, &payload))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    sent += 1;
                }
                // One flush per tick: the tick's messages leave in as few writes as fit.
                if sink.flush().await.is_err() {
                    break;
                }
                let lag = now_micros().saturating_sub(
                    start_micros + (sent.saturating_sub(1) as f64 * 1e6 / per_sec) as u64,
                );
                behind = behind.max(lag / 1000);
            }
            let _ = reply.send((sent, behind));
        }
    });
    tx
}

/// One measured step's outcome.
struct Step {
    passed: bool,
    /// Subscribers the server closed so far.
    cut: u64,
}

#[allow(clippy::too_many_arguments)]
fn step(
    rate: f64,
    secs: f64,
    subscribers: u64,
    subs: &mut [Worker],
    publisher: &mut Worker,
    edge_pids: &[u32],
    redis_pid: Option<u32>,
    p99_limit_ms: f64,
) -> Step {
    for s in subs.iter_mut() {
        s.send("reset");
        assert_eq!(s.recv(), "ok");
    }
    let sub_pids: Vec<u32> = subs.iter().map(|s| s.pid()).collect();
    let cpu0 = (
        cpu_of(edge_pids),
        cpu_of(&sub_pids),
        support::cpu_secs(publisher.pid()),
        redis_pid.map(support::cpu_secs).unwrap_or(0.0),
    );
    let wall = Instant::now();
    publisher.send(&format!("run {rate} {secs}"));
    let done = publisher.recv();
    let mut d = done.split_whitespace().skip(1);
    let sent: u64 = d.next().unwrap().parse().unwrap();
    let publish_secs: f64 = d.next().unwrap().parse().unwrap();
    let behind_ms: u64 = d.next().unwrap().parse().unwrap();
    // Deliveries offered: every subscriber gets every message of its channel.
    let expected = (rate * secs).round() as u64 * subscribers;
    // Drain: wait until everything arrived, or nothing more arrives for 2 s.
    let (mut last, mut last_change, mut closed);
    (last, last_change) = (0u64, Instant::now());
    let mut end = wall.elapsed();
    loop {
        let (mut got, mut cut) = (0, 0);
        for s in subs.iter_mut() {
            s.send("count");
            let line = s.recv();
            let mut w = line.split_whitespace().skip(1);
            got += w.next().unwrap().parse::<u64>().unwrap();
            cut += w.next().unwrap().parse::<u64>().unwrap();
        }
        closed = cut;
        if got != last {
            last = got;
            last_change = Instant::now();
            end = wall.elapsed();
        }
        if got >= expected || last_change.elapsed() > Duration::from_secs(2) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall_secs = wall.elapsed().as_secs_f64();
    let cpu1 = (
        cpu_of(edge_pids),
        cpu_of(&sub_pids),
        support::cpu_secs(publisher.pid()),
        redis_pid.map(support::cpu_secs).unwrap_or(0.0),
    );
    let mut hist = new_histogram();
    let mut received = 0;
    for s in subs.iter_mut() {
        s.send("report");
        let line = s.recv();
        let mut w = line.split_whitespace().skip(1);
        received += w.next().unwrap().parse::<u64>().unwrap();
        w.next();
        hist.add(support::hist_from_hex(w.next().unwrap())).unwrap();
    }
    let lost = expected.saturating_sub(received);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let pct = |c: f64| 100.0 * c / wall_secs;
    println!(
        "{:>9.0} {:>11.0} {:>11} {:>11} {:>8.3}% {:>11.0} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>6} {:>6} {:>5.0}% {:>5.0}% {:>5.0}% {:>5.0}%",
        rate,
        sent as f64 / publish_secs,
        expected,
        received,
        100.0 * lost as f64 / expected.max(1) as f64,
        received as f64 / end.as_secs_f64(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        hist.max() as f64 / 1000.0,
        closed,
        behind_ms,
        pct(cpu1.0 - cpu0.0),
        pct(cpu1.1 - cpu0.1),
        pct(cpu1.2 - cpu0.2),
        pct(cpu1.3 - cpu0.3),
    );
    // One machine-readable line per step, for benches/peers/run.sh.
    println!(
        "RESULT fanout delivered_per_s={:.0} loss_pct={:.3} p50_ms={:.2} p99_ms={:.2} \
         p999_ms={:.2} server_cpu_pct={:.0}",
        received as f64 / end.as_secs_f64(),
        100.0 * lost as f64 / expected.max(1) as f64,
        ms(0.5),
        ms(0.99),
        ms(0.999),
        pct(cpu1.0 - cpu0.0) + pct(cpu1.3 - cpu0.3),
    );
    Step {
        passed: lost == 0 && closed == 0 && ms(0.99) <= p99_limit_ms,
        cut: closed,
    }
}

fn main() {
    edgeplex::tls::install_crypto_provider();
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    match std::env::var(support::ROLE).as_deref() {
        Ok("subscribers") => {
            return tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(subscribers_role());
        }
        Ok("publisher") => return rt().block_on(publisher_role()),
        _ => {}
    }
    let subscribers = env("SUBSCRIBERS", 1000).max(1);
    let channels = env("CHANNELS", 1).clamp(1, subscribers);
    let mut rate = env_f64("RATE", 1000.0);
    let secs = env_f64("DURATION_SECS", 5.0);
    let edges = env("EDGES", 1).max(1);
    let loadgens = env("LOADGENS", 2).clamp(1, 100);
    let sources = env("SOURCES", 8).clamp(1, 250);
    let conns = env("PUBLISHERS", channels.min(4)).clamp(1, channels);
    let tls = env("TLS", 0) == 1;
    let sweep = env("SWEEP", 0) == 1;
    let factor = env_f64("SWEEP_FACTOR", 1.5).max(1.01);
    let p99_limit = env_f64("P99_LIMIT_MS", 100.0);
    let bus = env_str("BUS", "embedded");

    let mut redis = None;
    let mut edge_procs = Vec::new();
    let (urls, ca, protocol, edge_pids, what) = match std::env::var("TARGET") {
        Ok(t) if !t.is_empty() => (
            t.clone(),
            env_str("TARGET_CA", ""),
            env_str("PROTOCOL", "edgeplex"),
            support::target_pids(),
            format!("target {t}"),
        ),
        _ => {
            let redis_url = match bus.as_str() {
                "redis" => {
                    let r = RedisProc::start();
                    let url = r.url.clone();
                    redis = Some(r);
                    Some(url)
                }
                "embedded" => {
                    assert!(
                        edges == 1,
                        "EDGES > 1 needs BUS=redis: the embedded bus is one node's"
                    );
                    None
                }
                other => panic!("BUS must be embedded or redis, not {other:?}"),
            };
            for _ in 0..edges {
                edge_procs.push(EdgeProc::start(
                    subscribers / edges + conns + 10,
                    redis_url.as_deref(),
                ));
            }
            let urls: Vec<String> = edge_procs
                .iter()
                .map(|e| {
                    if tls {
                        format!("wss://{}/ws", e.tls)
                    } else {
                        format!("ws://{}/ws", e.plain)
                    }
                })
                .collect();
            (
                urls.join(","),
                if tls {
                    edge_procs[0].pem.display().to_string()
                } else {
                    String::new()
                },
                "edgeplex".to_string(),
                edge_procs.iter().map(|e| e.pid()).collect(),
                format!(
                    "edgeplex, {edges} edge process(es), {bus} bus, {}",
                    if tls { "TLS" } else { "plain TCP" }
                ),
            )
        }
    };
    let redis_pid = redis.as_ref().map(|r| r.pid());
    let common = |extra: Vec<(&'static str, String)>| {
        let mut v = vec![
            ("FAN_PROTOCOL", protocol.clone()),
            ("FAN_URLS", urls.clone()),
            ("FAN_CA", ca.clone()),
            ("FAN_CHANNELS", channels.to_string()),
        ];
        v.extend(extra);
        v
    };
    let setup = Instant::now();
    let mut subs: Vec<Worker> = Vec::new();
    let mut first = 0;
    for g in 0..loadgens {
        let count = share(subscribers, loadgens, g);
        subs.push(Worker::spawn(
            "subscribers",
            &common(vec![
                ("FAN_FIRST", first.to_string()),
                ("FAN_COUNT", count.to_string()),
                ("FAN_INDEX", g.to_string()),
                ("FAN_SOURCES", sources.to_string()),
            ]),
        ));
        first += count;
    }
    for s in &mut subs {
        let line = s.recv();
        assert!(line.starts_with("ready"), "subscriber process: {line:?}");
    }
    let mut publisher = Worker::spawn(
        "publisher",
        &common(vec![
            ("FAN_CONNS", conns.to_string()),
            ("FAN_PAYLOAD", env("PAYLOAD_BYTES", 100).max(40).to_string()),
        ]),
    );
    assert_eq!(publisher.recv(), "ready");
    println!(
        "fan-out: {what}; {subscribers} subscribers on {channels} channel(s) in {loadgens} \
         process(es), {conns} publishing connection(s), {secs} s per step; \
         {subscribers} subscribed in {:.1} s",
        setup.elapsed().as_secs_f64()
    );
    println!(
        "{:>9} {:>11} {:>11} {:>11} {:>9} {:>11} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "rate/ch",
        "published/s",
        "offered",
        "delivered",
        "loss",
        "delivered/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "cut",
        "lag ms",
        "edge",
        "subs",
        "pub",
        "redis"
    );
    let mut best = None;
    let mut going_down = false;
    loop {
        let s = step(
            rate,
            secs,
            subscribers,
            &mut subs,
            &mut publisher,
            &edge_pids,
            redis_pid,
            p99_limit,
        );
        if !sweep {
            break;
        }
        // Up while steps pass. A first step that fails sends the sweep down instead, as long as
        // no subscriber was cut (a cut one is gone for the rest of the run).
        match (s.passed, best, going_down) {
            (true, _, _) => {
                best = Some(rate);
                if going_down {
                    break;
                }
                rate = (rate * factor).round();
            }
            (false, None, _) if s.cut == 0 && rate > 1.0 => {
                going_down = true;
                rate = (rate / factor).floor().max(1.0);
            }
            _ => break,
        }
    }
    if sweep {
        match best {
            Some(r) => println!(
                "highest rate with no loss, no cut subscriber and p99 <= {p99_limit} ms: {r:.0} \
                 per channel, {:.0} deliveries/s",
                r * subscribers as f64
            ),
            None => println!("no step passed (no loss, no cut, p99 <= {p99_limit} ms)"),
        }
    }
    println!(
        "CPU columns: share of one core over the step, per role, summed over its processes. \
         lag: how far the publisher fell behind its schedule."
    );
    for (i, pid) in edge_pids.iter().enumerate() {
        println!("server process {i}: VmRSS {} KiB", rss_kib(*pid));
    }
    drop(subs);
    drop(publisher);
    drop(edge_procs);
    drop(redis);
}
