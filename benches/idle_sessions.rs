//! Edge memory per idle session: starts the release `edgeplex` binary as its own process (so its
//! resident memory is the edge's alone), opens N idle sessions of each kind from this process,
//! and reads the edge's `VmRSS` from `/proc/<pid>/status` before and after.
//!
//! Run: `cargo bench --bench idle_sessions` with optional `SESSIONS` (default 1000, per
//! transport; keep it under this machine's 20,000 open files for WebSocket, whose every session is
//! a socket on both sides) and `TRANSPORTS` (comma-separated, default `webtransport,websocket`).
//! WebTransport sessions share one client UDP socket, so their count is not bounded by files.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use wtransport::tls::Sha256Digest;
use wtransport::{ClientConfig, Endpoint};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

struct Served {
    child: Child,
    addr: std::net::SocketAddr,
    sha: String,
    pem: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(sessions: u64) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("dev.pem");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\nmax_connections = {n}\n\
         max_sessions = {n}\n[tls]\ndev_cert_path = \"{}\"\n[admission]\n\
         exempt = [\"127.0.0.0/8\"]\n[limits.new_sessions]\nper_second = 1000000\n\
         burst = 1000000\n[log]\nlevel = \"warn\"\n",
        pem.display(),
        n = 2 * sessions + 100,
    );
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeplex"))
        .args(["serve", "--config", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (mut addr, mut sha) = (None, None);
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        if let Some(h) = line.strip_prefix("dev certificate SHA-256: ") {
            sha = Some(h.to_string());
        }
        if let Some(a) = line.strip_prefix("edgeplex listening on wss://") {
            addr = Some(a.trim_end_matches("/ws").parse().unwrap());
            break;
        }
    }
    Served {
        child,
        addr: addr.expect("the edge starts"),
        sha: sha.unwrap(),
        pem,
        _dir: dir,
    }
}

/// Lets the edge settle (allocator caches, lazy statics) before a reading.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

async fn webtransport(s: &Served, n: u64) -> Vec<Box<dyn std::any::Any>> {
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&s.sha[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let config = ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([Sha256Digest::new(bytes.try_into().unwrap())])
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .build();
    let endpoint = Endpoint::client(config).unwrap();
    let url = format!("https://127.0.0.1:{}/wt", s.addr.port());
    let mut held: Vec<Box<dyn std::any::Any>> = Vec::new();
    for _ in 0..n {
        let conn = endpoint.connect(&url).await.expect("a session");
        let (mut send, recv) = conn.open_bi().await.unwrap().await.unwrap();
        send.write_all(b"{\"op\":\"ping\"}\n").await.unwrap();
        held.push(Box::new((conn, send, recv)));
    }
    held.push(Box::new(endpoint));
    held
}

async fn websocket(s: &Served, n: u64) -> Vec<Box<dyn std::any::Any>> {
    let cert = CertificateDer::from_pem_file(&s.pem).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let url = format!("wss://localhost:{}/ws", s.addr.port());
    let mut held: Vec<Box<dyn std::any::Any>> = Vec::new();
    for _ in 0..n {
        let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (ws, _) = tokio_tungstenite::client_async(&url, stream).await.unwrap();
        held.push(Box::new(ws));
    }
    held
}

fn main() {
    let n = env("SESSIONS", 1000);
    let transports =
        std::env::var("TRANSPORTS").unwrap_or_else(|_| "webtransport,websocket".to_string());
    edgeplex::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("edge memory per idle session over TLS, {n} sessions, edge in its own process");
    println!(
        "{:>14} {:>12} {:>12} {:>14} {:>12}",
        "transport", "rss before", "rss after", "KiB/session", "opened/s"
    );
    for t in transports.split(',') {
        let served = serve(n);
        rt.block_on(async {
            settle().await;
            let before = rss_kib(served.child.id());
            let start = Instant::now();
            let held = match t {
                "webtransport" => webtransport(&served, n).await,
                "websocket" => websocket(&served, n).await,
                other => panic!("unknown transport {other}"),
            };
            let rate = n as f64 / start.elapsed().as_secs_f64();
            settle().await;
            let after = rss_kib(served.child.id());
            println!(
                "{:>14} {:>9} KiB {:>9} KiB {:>14.1} {:>12.0}",
                t,
                before,
                after,
                after.saturating_sub(before) as f64 / n as f64,
                rate
            );
            drop(held);
        });
    }
}
