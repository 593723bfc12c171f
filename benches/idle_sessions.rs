//! Idle sessions: how fast sessions open, and how much edge memory each idle one holds, for
//! WebSocket, SSE and WebTransport, over TLS and (WebSocket, SSE) plain TCP.
//!
//! The edges are the release `edgeplex` binary in their own processes, so each one's `VmRSS`
//! (from `/proc/<pid>/status`) is the edge's alone. The clients run in load-generator processes
//! (this bench re-executed in a client role) that bind to several 127.0.0.x source addresses, so
//! no single address runs out of ephemeral ports and no process passes its open-file limit.
//!
//! Run: `cargo bench --bench idle_sessions`, with optional
//! - `SESSIONS` total sessions per transport (default 1000),
//! - `TRANSPORTS` comma-separated from `websocket`, `sse`, `sse-h2` and `sse-h3` (SSE over
//!   HTTP/2 and HTTP/3, one connection per stream; `sse-h2-mux`: 90 streams per HTTP/2
//!   connection, what one more stream costs), `webtransport` (default `websocket`, `sse`,
//!   `webtransport`); `websocket+shared` and `websocket+each` are WebSocket sessions that, once
//!   open, subscribe to one channel (the same one for all, or one channel each) and then idle:
//!   their difference from `websocket` is what a subscription costs,
//! - `PLAIN=1` to add WebSocket and SSE over plain TCP (`PLAIN=only`: those alone),
//! - `EDGES` edge processes sharing the sessions (default 1),
//! - `LOADGENS` load-generator processes (default 1),
//! - `SOURCES` 127.0.0.x source addresses per load generator (default 8),
//! - `BUS=redis` to run the edges on a scratch `redis-server` they share (a multi-node set-up;
//!   the SSE sessions' channel is then a Redis subscription on every edge),
//! - `LOADGEN_LOG` a `RUST_LOG`-style filter for the load generators' own log on stderr (e.g.
//!   `quinn_proto=trace`); the edges take `RUST_LOG`,
//! - `RAW=1` for lean plain WebSocket clients (what `benches/million.sh` runs): the load generator
//!   does the upgrade by hand and keeps only the TCP socket and a small task that answers the
//!   edge's pings with an empty pong, instead of a `tokio-tungstenite` stream with its buffers;
//! - `MIN_AVAILABLE_MIB` (default 1536): a load generator stops opening sessions when the
//!   machine's `MemAvailable` falls below it, and says so (the run reports what it reached);
//! - `HOLD_SECS` (default 0): with `RAW=1`, how long to hold the sessions after they opened
//!   before counting how many are still open (past `session.idle_timeout`, 60 s, shows that
//!   the pongs keep them);
//! - `PROGRESS_SECS` (default 10; 0 for none): print the machine's TCP sockets and memory this
//!   often while sessions open.
//!
//! Every run also prints the kernel's memory before and after (`/proc/meminfo` `Slab`,
//! `SUnreclaim`, `MemAvailable`, and the TCP buffer pages of `/proc/net/sockstat`) and the load
//! generators' `VmRSS`, each per session.
//!
//! Every WebSocket and SSE session is one socket in an edge and one in a load generator, and this
//! machine caps every process at 20,000 open files: past about 19,000 sessions per process, raise
//! `EDGES` and `LOADGENS`. A session that fails to open (a WebTransport handshake that times out,
//! as one in a few thousand did before the edge issued random 8-byte connection IDs; see
//! `benches/README.md`, issue 16) is counted and reported, and the figures are per session that
//! opened.
//! For a million on your own machine: `ulimit -n 1100000` (and
//! `fs.nr_open`, `fs.file-max` above it), `net.ipv4.ip_local_port_range = 1024 65535`, and about
//! 20 source addresses (each gives ~64,000 ports per destination).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use wtransport::tls::Sha256Digest;
use wtransport::{ClientConfig, Endpoint};

mod support;

/// Streams `sse-h2-mux` opens on one HTTP/2 connection: under the edge's
/// `max_concurrent_streams` (100), past which a client's requests would wait for a stream.
const H2_STREAMS_PER_CONNECTION: u64 = 90;

use support::{
    EdgeProc, KernelMem, ROLE, RedisProc, cpu_of, cpu_secs, env, env_str, meminfo_kib, rss_kib,
    tcp_from,
};

/// What a load generator is told, through its environment.
struct Job {
    transport: String,
    plain: bool,
    /// The server speaks NATS (a peer), not edgeplex.
    nats: bool,
    count: u64,
    index: u64,
    sources: u64,
    /// Lean plain WebSocket clients: a raw TCP socket after a hand-made upgrade.
    raw: bool,
    /// Stop opening when `MemAvailable` falls below this.
    min_available_kib: u64,
    /// Per edge: address, certificate PEM path, certificate SHA-256.
    edges: Vec<(SocketAddr, String, String)>,
}

impl Job {
    fn to_env(&self, cmd: &mut Command) {
        let edges: Vec<String> = self
            .edges
            .iter()
            .map(|(a, pem, sha)| format!("{a}|{pem}|{sha}"))
            .collect();
        cmd.env(ROLE, "idle-client")
            .env("JOB_TRANSPORT", &self.transport)
            .env("JOB_PLAIN", if self.plain { "1" } else { "0" })
            .env("JOB_NATS", if self.nats { "1" } else { "0" })
            .env("JOB_COUNT", self.count.to_string())
            .env("JOB_INDEX", self.index.to_string())
            .env("JOB_SOURCES", self.sources.to_string())
            .env("JOB_RAW", if self.raw { "1" } else { "0" })
            .env("JOB_MIN_AVAILABLE_KIB", self.min_available_kib.to_string())
            .env("JOB_EDGES", edges.join(","));
    }

    fn from_env() -> Job {
        let var = support::worker_var;
        Job {
            transport: var("JOB_TRANSPORT"),
            plain: var("JOB_PLAIN") == "1",
            nats: var("JOB_NATS") == "1",
            count: var("JOB_COUNT").parse().unwrap(),
            index: var("JOB_INDEX").parse().unwrap(),
            sources: var("JOB_SOURCES").parse().unwrap(),
            raw: var("JOB_RAW") == "1",
            min_available_kib: var("JOB_MIN_AVAILABLE_KIB").parse().unwrap(),
            edges: var("JOB_EDGES")
                .split(',')
                .map(|e| {
                    let mut p = e.split('|');
                    (
                        p.next().unwrap().parse().unwrap(),
                        p.next().unwrap().to_string(),
                        p.next().unwrap().to_string(),
                    )
                })
                .collect(),
        }
    }

    /// The i-th session's source address: 127.0.<gen>.<2..> so generators never share one.
    fn source(&self, i: u64) -> IpAddr {
        support::source(self.index, self.sources, i)
    }
}

/// Opens the job's sessions and keeps them until stdin closes.
async fn client(job: Job) {
    let mut held: Vec<Box<dyn std::any::Any>> = Vec::new();
    let start = Instant::now();
    let mut failed = 0u64;
    let connectors: Vec<_> = job
        .edges
        .iter()
        .map(|(_, pem, _)| (!job.plain).then(|| support::tls_connector(pem, true)))
        .collect();
    let mut h3_endpoints: Vec<(u64, usize, quinn::Endpoint)> = Vec::new();
    // `sse-h2-mux`: per edge, a client (one HTTP/2 connection) and the streams it carries.
    let mut h2_clients: Vec<(usize, u64, reqwest::Client)> = Vec::new();
    let mut wt_endpoints: Vec<(
        u64,
        usize,
        Endpoint<wtransport::endpoint::endpoint_side::Client>,
    )> = Vec::new();
    // `websocket+shared`: every session subscribes to one channel; `websocket+each`: to its own.
    let (wire, subscribe) = match job.transport.split_once('+') {
        Some((wire, how)) => (wire, Some(how)),
        None => (job.transport.as_str(), None),
    };
    // With `raw`: the sessions still open (each task takes itself off when its socket ends).
    let alive = Arc::new(AtomicU64::new(0));
    // Why the load generator stopped short of its count, if it did.
    let mut stopped = String::from("-");
    let mut raw_opened = 0u64;
    for i in 0..job.count {
        // Check the machine's memory every 256 sessions: with ~50 load generators that is at
        // most ~13,000 sessions (~200 MiB) between a check and the stop.
        if i % 256 == 0 {
            let available = meminfo_kib("MemAvailable");
            if available < job.min_available_kib {
                stopped = format!(
                    "MemAvailable {} MiB < {} MiB",
                    available / 1024,
                    job.min_available_kib / 1024
                );
                break;
            }
        }
        let e = (i as usize) % job.edges.len();
        let (addr, _, sha) = &job.edges[e];
        let source = job.source(i);
        let channel = subscribe.map(|how| match how {
            "shared" => "idle-shared".to_string(),
            "each" => format!("idle-{}-{i}", job.index),
            other => panic!("unknown subscription mode {other} (shared or each)"),
        });
        match wire {
            // Raw clients subscribe to nothing: `websocket+…` rows use the full client.
            "websocket" if job.raw && channel.is_none() => {
                // A refused connect or upgrade ends the ramp (and is the run's result), it
                // does not abort it: the sessions already open are still measured.
                let opened = match tcp_from(source, *addr).await {
                    Ok(tcp) => raw_ws_open(tcp, addr.port()).await,
                    Err(e) => Err(e),
                };
                match opened {
                    Ok(tcp) => {
                        raw_opened += 1;
                        alive.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(hold_raw(tcp, alive.clone()));
                    }
                    Err(e) => {
                        failed += 1;
                        stopped = format!("session {i} from {source}: {e}");
                        break;
                    }
                }
            }
            "websocket" | "sse" => {
                let tcp = tcp_from(source, *addr).await.expect("connect");
                let sse = wire == "sse";
                if job.plain {
                    held.push(if sse {
                        Box::new(sse_open(tcp).await)
                    } else {
                        let url = format!("ws://localhost:{}/ws", addr.port());
                        let mut ws = ws_open(&url, tcp, job.nats).await;
                        if let Some(c) = &channel {
                            ws_subscribe(&mut ws, c).await;
                        }
                        Box::new(ws)
                    });
                } else {
                    let tls = connectors[e]
                        .as_ref()
                        .expect("a CA for TLS (TARGET_CA)")
                        .connect(ServerName::try_from("localhost").unwrap(), tcp)
                        .await
                        .unwrap();
                    held.push(if sse {
                        Box::new(sse_open(tls).await)
                    } else {
                        let url = format!("wss://localhost:{}/ws", addr.port());
                        let mut ws = ws_open(&url, tls, job.nats).await;
                        if let Some(c) = &channel {
                            ws_subscribe(&mut ws, c).await;
                        }
                        Box::new(ws)
                    });
                }
            }
            "sse-h2" | "sse-h2-mux" => {
                // `sse-h2-mux`: streams share connections, as a browser's or a proxy's do, so
                // the figure is what one more stream costs; `sse-h2`: a connection each.
                let shared = h2_clients
                    .iter()
                    .position(|(ed, n, _)| *ed == e && *n < H2_STREAMS_PER_CONNECTION);
                let client = match shared {
                    Some(k) if wire == "sse-h2-mux" => {
                        h2_clients[k].1 += 1;
                        h2_clients[k].2.clone()
                    }
                    _ => {
                        let pem = std::fs::read(&job.edges[e].1).unwrap();
                        let client = reqwest::Client::builder()
                            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
                            .resolve("localhost", *addr)
                            .local_address(source)
                            .http2_prior_knowledge()
                            .build()
                            .unwrap();
                        if wire == "sse-h2-mux" {
                            h2_clients.push((e, 1, client.clone()));
                        }
                        client
                    }
                };
                match sse_h2_open(client, addr.port()).await {
                    Ok(open) => held.push(Box::new(open)),
                    Err(e) => {
                        failed += 1;
                        if failed == 1 {
                            eprintln!("session {i}: HTTP/2 GET /sse failed: {e}");
                        }
                    }
                }
            }
            "sse-h3" => {
                let slot = i % job.sources;
                let idx = match h3_endpoints
                    .iter()
                    .position(|(s, ed, _)| *s == slot && *ed == e)
                {
                    Some(idx) => idx,
                    None => {
                        let pem = &job.edges[e].1;
                        h3_endpoints.push((slot, e, support::h3_endpoint(pem, source)));
                        h3_endpoints.len() - 1
                    }
                };
                let conn = match h3_endpoints[idx]
                    .2
                    .connect(*addr, "localhost")
                    .unwrap()
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        failed += 1;
                        if failed == 1 {
                            eprintln!("session {i}: QUIC handshake failed: {e}");
                        }
                        continue;
                    }
                };
                match sse_h3_open(conn, addr.port()).await {
                    Ok(open) => held.push(Box::new(open)),
                    Err(e) => {
                        failed += 1;
                        if failed == 1 {
                            eprintln!("session {i}: HTTP/3 GET /sse failed: {e}");
                        }
                    }
                }
            }
            "webtransport" => {
                let slot = i % job.sources;
                let idx = match wt_endpoints
                    .iter()
                    .position(|(s, ed, _)| *s == slot && *ed == e)
                {
                    Some(idx) => idx,
                    None => {
                        let bytes: Vec<u8> = (0..32)
                            .map(|k| u8::from_str_radix(&sha[2 * k..2 * k + 2], 16).unwrap())
                            .collect();
                        let config = ClientConfig::builder()
                            .with_bind_address(SocketAddr::new(source, 0))
                            .with_server_certificate_hashes([Sha256Digest::new(
                                bytes.try_into().unwrap(),
                            )])
                            .keep_alive_interval(Some(Duration::from_secs(5)))
                            .build();
                        wt_endpoints.push((slot, e, Endpoint::client(config).unwrap()));
                        wt_endpoints.len() - 1
                    }
                };
                let url = format!("https://127.0.0.1:{}/wt", addr.port());
                // A failed handshake is counted, not fatal: see the known problem in the doc.
                let conn = match wt_endpoints[idx].2.connect(&url).await {
                    Ok(c) => c,
                    Err(e) => {
                        failed += 1;
                        if failed == 1 {
                            eprintln!("session {i}: WebTransport handshake failed: {e}");
                        }
                        continue;
                    }
                };
                let (mut send, recv) = conn.open_bi().await.unwrap().await.unwrap();
                send.write_all(b"{\"op\":\"ping\"}\n").await.unwrap();
                held.push(Box::new((conn, send, recv)));
            }
            other => panic!("unknown transport {other}"),
        }
    }
    let opened = if job.raw {
        raw_opened
    } else {
        held.len() as u64
    };
    // The reason comes last: it may hold spaces.
    println!(
        "opened {opened} {:.3} {failed} {stopped}",
        start.elapsed().as_secs_f64()
    );
    std::io::stdout().flush().unwrap();
    // Hold everything until the parent closes stdin; `alive` asks how many are still open.
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
        if line.trim() == "alive" {
            let n = if job.raw {
                alive.load(Ordering::Relaxed)
            } else {
                held.len() as u64
            };
            println!("alive {n}");
            std::io::stdout().flush().unwrap();
        }
        line.clear();
    }
    drop(held);
    drop(wt_endpoints);
    drop(h3_endpoints);
}

/// A masked, empty WebSocket pong: the whole answer a lean client gives to the edge's pings.
const PONG: [u8; 6] = [0x8a, 0x80, 0, 0, 0, 0];

/// A plain WebSocket upgrade on `tcp`, by hand, read until the edge's first frame (the
/// welcome) arrived; the socket is all that is kept.
async fn raw_ws_open(
    mut tcp: tokio::net::TcpStream,
    port: u16,
) -> std::io::Result<tokio::net::TcpStream> {
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut got = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the edge closed during the upgrade: {:?}",
                    String::from_utf8_lossy(&got)
                ),
            ));
        }
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        if !got.starts_with(b"HTTP/1.1 101") {
            let status = String::from_utf8_lossy(&got[..end]);
            return Err(std::io::Error::other(format!(
                "upgrade refused: {}",
                status.lines().next().unwrap_or_default()
            )));
        }
        // The welcome: a text frame from the server (unmasked), with a 7- or 16-bit length.
        let frame = &got[end + 4..];
        let whole = match frame.get(1).map(|b| b & 0x7f) {
            None => None,
            Some(126) if frame.len() >= 4 => {
                Some(4 + usize::from(u16::from_be_bytes([frame[2], frame[3]])))
            }
            Some(126 | 127) => None,
            Some(len) => Some(2 + usize::from(len)),
        };
        if whole.is_some_and(|w| frame.len() >= w) {
            return Ok(tcp);
        }
    }
}

/// Holds a lean session: every read (the edge's pings; nothing else comes to an idle
/// session) is answered with one empty pong, which is what keeps the edge's idle timeout off.
/// Takes itself off `alive` when the edge closes the socket.
async fn hold_raw(mut tcp: tokio::net::TcpStream, alive: Arc<AtomicU64>) {
    let mut buf = [0u8; 64];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if tcp.write_all(&PONG).await.is_err() {
                    break;
                }
            }
        }
    }
    alive.fetch_sub(1, Ordering::Relaxed);
}

/// `GET /sse` over HTTP/2 with `client` (its own connection), read until the welcome event
/// arrived; what it returns keeps the stream open.
async fn sse_h2_open(
    client: reqwest::Client,
    port: u16,
) -> Result<impl std::any::Any, Box<dyn std::error::Error>> {
    let mut resp = client
        .get(format!("https://localhost:{port}/sse?channel=idle"))
        .send()
        .await?;
    if resp.status() != 200 || resp.version() != reqwest::Version::HTTP_2 {
        return Err(format!("{} over {:?}", resp.status(), resp.version()).into());
    }
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("welcome") {
        let chunk = resp
            .chunk()
            .await?
            .ok_or("the stream ended before the welcome")?;
        got.extend_from_slice(&chunk);
    }
    Ok((client, resp))
}

/// `GET /sse` over HTTP/3 on `conn`, read until the welcome event arrived; what it returns
/// keeps the stream open. A failure is counted like a failed handshake.
async fn sse_h3_open(
    conn: quinn::Connection,
    port: u16,
) -> Result<impl std::any::Any, Box<dyn std::error::Error>> {
    use bytes::Buf;
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn.clone())).await?;
    let drive = tokio::spawn(async move {
        let _ = futures_util::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    let req = http::Request::get(format!("https://localhost:{port}/sse?channel=idle"))
        .body(())
        .unwrap();
    let mut stream = send.send_request(req).await?;
    stream.finish().await?;
    let resp = stream.recv_response().await?;
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()).into());
    }
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("welcome") {
        let mut chunk = stream
            .recv_data()
            .await?
            .ok_or("the stream ended before the welcome")?;
        while chunk.has_remaining() {
            let c = chunk.chunk();
            got.extend_from_slice(c);
            let n = c.len();
            chunk.advance(n);
        }
    }
    Ok((conn, send, stream, drive))
}

/// A WebSocket session on `io`; a NATS server is also sent its CONNECT (it drops a client
/// that never sends one), and the session waits for the server's first frame either way.
async fn ws_open<IO>(url: &str, io: IO, nats: bool) -> tokio_tungstenite::WebSocketStream<IO>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    let mut ws = support::ws_client(url, io).await.unwrap();
    if nats {
        ws.send(tokio_tungstenite::tungstenite::Message::binary(
            "CONNECT {\"verbose\":false}\r\nPING\r\n",
        ))
        .await
        .unwrap();
    }
    ws.next().await.expect("a first frame").unwrap();
    ws
}

/// Subscribes `ws` to `channel` and waits for the edge's `ok`.
async fn ws_subscribe<IO>(ws: &mut tokio_tungstenite::WebSocketStream<IO>, channel: &str)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    let frame = format!("{{\"id\":1,\"op\":\"subscribe\",\"channel\":\"{channel}\"}}");
    ws.send(tokio_tungstenite::tungstenite::Message::text(frame))
        .await
        .unwrap();
    let reply = ws.next().await.expect("a reply").unwrap();
    let reply = reply.to_text().unwrap_or_default();
    assert!(reply.contains("\"ok\":true"), "subscribe refused: {reply}");
}

/// Opens `GET /sse` on `io` and reads until the welcome event arrived.
async fn sse_open<IO>(mut io: IO) -> IO
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    io.write_all(b"GET /sse?channel=idle HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(7).any(|w| w == b"welcome") {
        let n = io.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream ended: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    io
}

fn main() {
    edgeplex::tls::install_crypto_provider();
    if std::env::var(ROLE).as_deref() == Ok("idle-client") {
        // `LOADGEN_LOG` (a `RUST_LOG`-style filter, e.g. `quinn_proto=trace`) logs the load
        // generator's QUIC stack to stderr; the edge reads `RUST_LOG` itself.
        if let Ok(filter) = std::env::var("LOADGEN_LOG") {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .init();
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(client(Job::from_env()));
        return;
    }
    let n = env("SESSIONS", 1000);
    let edges = env("EDGES", 1).max(1);
    let loadgens = env("LOADGENS", 1).max(1);
    let sources = env("SOURCES", 8).clamp(1, 250);
    let raw = env("RAW", 0) == 1;
    let min_available_kib = env("MIN_AVAILABLE_MIB", 1536) * 1024;
    let hold = Duration::from_secs(env("HOLD_SECS", 0));
    let progress = env("PROGRESS_SECS", 10);
    let bus = env_str("BUS", "embedded");
    assert!(
        bus == "embedded" || bus == "redis",
        "BUS must be embedded or redis, not {bus:?}"
    );
    let transports =
        std::env::var("TRANSPORTS").unwrap_or_else(|_| "websocket,sse,webtransport".to_string());
    let mut variants: Vec<(String, bool)> = transports
        .split(',')
        .map(|t| (t.trim().to_string(), false))
        .collect();
    // Against another server: WebSocket only, plain or TLS as its URLs say.
    let target = env_str("TARGET", "");
    let nats = env_str("PROTOCOL", "edgeplex") == "nats";
    if !target.is_empty() {
        variants = vec![("websocket".to_string(), target.starts_with("ws://"))];
    } else if raw {
        // Lean clients are plain WebSocket only.
        variants = vec![("websocket".to_string(), true)];
    } else if matches!(env_str("PLAIN", "0").as_str(), "1" | "only") {
        let tcp: Vec<(String, bool)> = variants
            .iter()
            .filter(|(t, _)| t.starts_with("websocket") || t == "sse")
            .map(|(t, _)| (t.clone(), true))
            .collect();
        if env_str("PLAIN", "0") == "only" {
            variants.clear();
        }
        variants.extend(tcp);
    }
    let what = if target.is_empty() {
        format!("{edges} edge process(es) on the {bus} bus")
    } else {
        format!("target {target}")
    };
    println!(
        "idle sessions: {n} per transport, {what}, {loadgens} load generator(s), {sources} \
         source address(es) each{}",
        if raw { ", lean (raw TCP) clients" } else { "" }
    );
    println!(
        "{:>20} {:>10} {:>14} {:>14} {:>12} {:>10} {:>11} {:>11}",
        "transport",
        "sessions",
        "edge RSS before",
        "edge RSS after",
        "KiB/session",
        "opened/s",
        "edge CPU",
        "loadgen CPU"
    );
    for (transport, plain) in variants {
        // With Redis every edge also subscribes its sessions' channels there, as a
        // deployment of several nodes would.
        let redis = (bus == "redis" && target.is_empty()).then(RedisProc::start);
        let served: Vec<EdgeProc> = if target.is_empty() {
            (0..edges)
                // Each load generator spreads its sessions round the edges, so an edge gets
                // up to one more from each than an even share.
                .map(|_| {
                    EdgeProc::start(
                        n / edges + loadgens + 1,
                        redis.as_ref().map(|r| r.url.as_str()),
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        let (edge_pids, edge_addrs): (Vec<u32>, Vec<(SocketAddr, String, String)>) =
            if target.is_empty() {
                (
                    served.iter().map(|s| s.pid()).collect(),
                    served
                        .iter()
                        .map(|s| {
                            (
                                if plain { s.plain } else { s.tls },
                                s.pem.display().to_string(),
                                s.sha.clone(),
                            )
                        })
                        .collect(),
                )
            } else {
                (
                    support::target_pids(),
                    target
                        .split(',')
                        .map(|u| {
                            (
                                support::url_addr(u),
                                env_str("TARGET_CA", ""),
                                String::new(),
                            )
                        })
                        .collect(),
                )
            };
        std::thread::sleep(Duration::from_millis(500));
        let before: Vec<u64> = edge_pids.iter().map(|p| rss_kib(*p)).collect();
        let edge_cpu = cpu_of(&edge_pids);
        let kernel_before = KernelMem::now();
        let start = Instant::now();
        let mut gens: Vec<Child> = (0..loadgens)
            .map(|g| {
                let job = Job {
                    transport: transport.clone(),
                    plain,
                    count: n / loadgens + u64::from(g < n % loadgens),
                    index: g,
                    sources,
                    raw,
                    min_available_kib,
                    nats,
                    edges: edge_addrs.clone(),
                };
                let mut cmd = Command::new(std::env::current_exe().unwrap());
                job.to_env(&mut cmd);
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let gen_pids: Vec<u32> = gens.iter().map(|g| g.id()).collect();
        let done = Arc::new(AtomicBool::new(false));
        let monitor = (progress > 0).then(|| {
            let done = done.clone();
            std::thread::spawn(move || {
                let tick = Duration::from_secs(progress);
                let mut next = Instant::now() + tick;
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    if Instant::now() < next {
                        continue;
                    }
                    next += tick;
                    let k = KernelMem::now();
                    println!(
                        "{:>20} {:>6.0} s: TCP sockets in use {}, MemAvailable {} MiB, Slab {} \
                         MiB, TCP buffers {} MiB",
                        "",
                        start.elapsed().as_secs_f64(),
                        k.tcp_inuse,
                        k.available_kib / 1024,
                        k.slab_kib / 1024,
                        k.tcp_mem_pages * 4 / 1024
                    );
                }
            })
        });
        let mut opened = 0u64;
        let mut stops: Vec<String> = Vec::new();
        for g in &mut gens {
            let mut line = String::new();
            BufReader::new(g.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert!(line.starts_with("opened"), "load generator: {line:?}");
            let mut words = line.trim_end().splitn(5, ' ');
            opened += words.nth(1).unwrap().parse::<u64>().unwrap();
            if let Some(why) = words.nth(2).filter(|w| *w != "-") {
                stops.push(why.to_string());
            }
        }
        let elapsed = start.elapsed();
        done.store(true, Ordering::Relaxed);
        if let Some(m) = monitor {
            m.join().unwrap();
        }
        if opened < n {
            println!("{:>20} {} of {n} sessions failed to open", "", n - opened);
        }
        for (i, why) in stops.iter().enumerate().take(3) {
            println!("{:>20} stopped ({i}): {why}", "");
        }
        if stops.len() > 3 {
            println!(
                "{:>20} ({} load generators stopped short in all)",
                "",
                stops.len()
            );
        }
        // Per session that opened: a failed handshake leaves nothing behind to measure.
        let n = opened.max(1);
        let opened_per_sec = n as f64 / elapsed.as_secs_f64();
        let cpu: f64 = gens.iter().map(|g| cpu_secs(g.id())).sum();
        let edge_cpu = cpu_of(&edge_pids) - edge_cpu;
        std::thread::sleep(Duration::from_millis(500));
        let after: Vec<u64> = edge_pids.iter().map(|p| rss_kib(*p)).collect();
        let kernel_after = KernelMem::now();
        let gen_rss: u64 = gen_pids.iter().map(|p| rss_kib(*p)).sum();
        let total_delta: u64 = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.saturating_sub(*b))
            .sum();
        let label = format!("{transport}{}", if plain { " (plain)" } else { " (TLS)" });
        println!(
            "{:>20} {:>10} {:>10} KiB {:>10} KiB {:>12.1} {:>10.0} {:>9.1} s {:>9.1} s",
            label,
            n,
            before.iter().sum::<u64>(),
            after.iter().sum::<u64>(),
            total_delta as f64 / n as f64,
            opened_per_sec,
            edge_cpu,
            cpu
        );
        // One machine-readable line per row, for benches/peers/run.sh.
        println!(
            "RESULT idle-{transport}-{} kib_per_session={:.2} opened_per_s={:.0} \
             server_cpu_s={edge_cpu:.2}",
            if plain { "plain" } else { "tls" },
            total_delta as f64 / n as f64,
            opened_per_sec
        );
        if edges > 1 && edges <= 8 {
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                println!("{:>20} edge {i}: {b} KiB -> {a} KiB", "");
            }
        } else if edges > 8 {
            let (lo, hi) = after
                .iter()
                .fold((u64::MAX, 0), |(lo, hi), a| (lo.min(*a), hi.max(*a)));
            println!("{:>20} each edge after: {lo}..{hi} KiB", "");
        }
        // The kernel's side of the same sessions: two sockets each (the edge's and the load
        // generator's). Slab also moves with whatever else the machine does meanwhile.
        let per = |b: u64, a: u64| a.saturating_sub(b) as f64 / n as f64;
        let (kb, ka) = (kernel_before, kernel_after);
        println!(
            "{:>20} kernel: Slab {} -> {} MiB ({:.2} KiB/session), SUnreclaim {} -> {} MiB \
             ({:.2} KiB/session), TCP buffers {} -> {} pages ({:.3} KiB/session), TCP sockets \
             in use {} -> {}, MemAvailable {} -> {} MiB",
            "",
            kb.slab_kib / 1024,
            ka.slab_kib / 1024,
            per(kb.slab_kib, ka.slab_kib),
            kb.sunreclaim_kib / 1024,
            ka.sunreclaim_kib / 1024,
            per(kb.sunreclaim_kib, ka.sunreclaim_kib),
            kb.tcp_mem_pages,
            ka.tcp_mem_pages,
            per(kb.tcp_mem_pages * 4, ka.tcp_mem_pages * 4),
            kb.tcp_inuse,
            ka.tcp_inuse,
            kb.available_kib / 1024,
            ka.available_kib / 1024
        );
        println!(
            "{:>20} load generators: {} MiB RSS in all ({:.2} KiB/session), {:.0} s to open",
            "",
            gen_rss / 1024,
            gen_rss as f64 / n as f64,
            elapsed.as_secs_f64()
        );
        println!(
            "RESULT idle-{transport}-{}-kernel slab_kib_per_session={:.2} \
             sunreclaim_kib_per_session={:.2} tcp_mem_kib_per_session={:.3} \
             loadgen_kib_per_session={:.2} opened={n} stopped={}",
            if plain { "plain" } else { "tls" },
            per(kb.slab_kib, ka.slab_kib),
            per(kb.sunreclaim_kib, ka.sunreclaim_kib),
            per(kb.tcp_mem_pages * 4, ka.tcp_mem_pages * 4),
            gen_rss as f64 / n as f64,
            stops.len()
        );
        if raw {
            if !hold.is_zero() {
                println!(
                    "{:>20} holding {} s (the edges ping every 20 s and close after 60 s unheard)",
                    "",
                    hold.as_secs()
                );
                std::thread::sleep(hold);
            }
            let mut alive = 0u64;
            for g in &mut gens {
                writeln!(g.stdin.as_mut().unwrap(), "alive").unwrap();
                let mut line = String::new();
                BufReader::new(g.stdout.as_mut().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                alive += line
                    .strip_prefix("alive ")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
            let k = KernelMem::now();
            println!(
                "{:>20} still open after {:.0} s: {alive} of {n} (edges' RSS {} MiB, \
                 MemAvailable {} MiB)",
                "",
                start.elapsed().as_secs_f64(),
                edge_pids.iter().map(|p| rss_kib(*p)).sum::<u64>() / 1024,
                k.available_kib / 1024
            );
        }
        // Close every load generator's stdin first, then wait: one at a time, each waited
        // for before the next was told, a run of 56 took minutes to end.
        for g in &mut gens {
            drop(g.stdin.take());
        }
        for mut g in gens {
            let _ = g.wait();
        }
    }
}
