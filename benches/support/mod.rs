//! What the load-generator benches share: edge, Redis and load-generator processes, source
//! addresses, TLS client set-up, and reading a process's memory and CPU from `/proc`.
//!
//! Each bench binary compiles this module and uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio::net::{TcpSocket, TcpStream};

/// The environment variable that turns a re-executed bench into one of its worker roles.
pub const ROLE: &str = "EDGEPLEX_BENCH_ROLE";

pub fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn env_str(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Resident memory of `pid` in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A field of `/proc/meminfo` in KiB (`MemAvailable`, `Slab`, `SUnreclaim`), 0 when missing.
pub fn meminfo_kib(field: &str) -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The machine's TCP sockets in use and the pages of TCP buffer memory they hold, from the
/// `TCP: inuse N ... mem M` line of `/proc/net/sockstat`.
pub fn tcp_sockstat() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let line = stat
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .unwrap_or_default();
    let words: Vec<&str> = line.split_whitespace().collect();
    let field = |name: &str| {
        words
            .iter()
            .position(|w| *w == name)
            .and_then(|i| words.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("inuse"), field("mem"))
}

/// The kernel's memory at one moment: what the million-session runs record before and after.
#[derive(Clone, Copy, Debug)]
pub struct KernelMem {
    pub available_kib: u64,
    pub slab_kib: u64,
    pub sunreclaim_kib: u64,
    /// TCP buffer memory in pages (4 KiB here), as `/proc/net/sockstat` counts it.
    pub tcp_mem_pages: u64,
    pub tcp_inuse: u64,
}

impl KernelMem {
    pub fn now() -> KernelMem {
        let (tcp_inuse, tcp_mem_pages) = tcp_sockstat();
        KernelMem {
            available_kib: meminfo_kib("MemAvailable"),
            slab_kib: meminfo_kib("Slab"),
            sunreclaim_kib: meminfo_kib("SUnreclaim"),
            tcp_mem_pages,
            tcp_inuse,
        }
    }
}

/// User plus system CPU seconds of `pid` so far, from `/proc/<pid>/stat`.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name, in
    // clock ticks (USER_HZ, 100 on Linux).
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds of several processes, summed.
pub fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_secs(*p)).sum()
}

/// A port free right now (for listeners whose address the child does not print).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scratch `redis-server` on a free port, killed on drop.
pub struct RedisProc {
    child: Child,
    pub url: String,
}

impl RedisProc {
    pub fn start() -> RedisProc {
        let port = free_port();
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                // The default pub/sub output limit (32 MiB hard) would cut a node that falls
                // behind at these rates; the bench wants to see the lag, not the cut.
                "--client-output-buffer-limit",
                "pubsub 0 0 0",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test.sh installs it)");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return RedisProc {
                    child,
                    url: format!("redis://127.0.0.1:{port}/"),
                };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not start on port {port}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch Redis Cluster, three masters and three replicas on free ports (as
/// `tests/common/redis_cluster.rs` starts one), killed on drop.
pub struct RedisClusterProc {
    children: Vec<Child>,
    pub urls: Vec<String>,
    _dir: tempfile::TempDir,
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli on PATH");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl RedisClusterProc {
    pub fn start() -> RedisClusterProc {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..6).map(|_| free_port()).collect();
        let mut children = Vec::new();
        for &port in &ports {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            children.push(
                Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"])
                    .args(["--cluster-enabled", "yes"])
                    .args(["--cluster-config-file", "nodes.conf"])
                    // As for one Redis: the bench wants to see a lagging node, not a cut one.
                    .args(["--client-output-buffer-limit", "pubsub 0 0 0"])
                    .arg("--dir")
                    .arg(&node_dir)
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("redis-server on PATH"),
            );
        }
        let c = RedisClusterProc {
            children,
            urls: ports
                .iter()
                .map(|p| format!("redis://127.0.0.1:{p}/"))
                .collect(),
            _dir: dir,
        };
        let settle = |what: &str, f: &dyn Fn() -> bool| {
            for _ in 0..600 {
                if f() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!("Redis Cluster: {what}");
        };
        for &p in &ports {
            settle("a node did not start", &|| {
                redis_cli(p, &["PING"]).trim() == "PONG"
            });
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli on PATH");
        assert!(out.status.success(), "redis-cli --cluster create failed");
        settle("the cluster did not settle", &|| {
            ports.iter().all(|&p| {
                let info = redis_cli(p, &["CLUSTER", "INFO"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            })
        });
        c
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for RedisClusterProc {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One edge process: the release `edgeplex` binary.
pub struct EdgeProc {
    child: Child,
    pub tls: SocketAddr,
    pub plain: SocketAddr,
    pub sha: String,
    pub pem: std::path::PathBuf,
    /// Run under `EDGE_WRAP`: stopped with SIGTERM so the profiler writes its report.
    wrapped: bool,
    _dir: tempfile::TempDir,
}

impl Drop for EdgeProc {
    fn drop(&mut self) {
        if self.wrapped {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl EdgeProc {
    /// Starts an edge sized for `sessions`, on the embedded bus or the Redis bus at `redis_url`,
    /// and waits until it serves (and, with Redis, until its bus is connected).
    pub fn start(sessions: u64, redis_url: Option<&str>) -> EdgeProc {
        Self::start_with(sessions, redis_url, "")
    }

    /// [`EdgeProc::start`] with `extra` TOML appended to its config (sections of its own).
    pub fn start_with(sessions: u64, redis_url: Option<&str>, extra: &str) -> EdgeProc {
        let bus = format!("redis_url = \"{}\"", redis_url.unwrap_or(""));
        Self::start_on(sessions, &bus, extra)
    }

    /// An edge on the Redis Cluster whose nodes are `seeds` (`redis://host:port/` URLs).
    pub fn start_cluster(sessions: u64, seeds: &[String]) -> EdgeProc {
        let list: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
        Self::start_on(
            sessions,
            &format!("redis_cluster = [{}]", list.join(", ")),
            "",
        )
    }

    /// An edge whose `[bus]` section holds the line `bus`.
    fn start_on(sessions: u64, bus: &str, extra: &str) -> EdgeProc {
        let dir = tempfile::tempdir().unwrap();
        let plain_port = free_port();
        let admin_port = free_port();
        let pem = dir.path().join("dev.pem");
        // The load is trusted: its addresses are exempt from per-IP limits, and the per-session
        // message rate is lifted, as a deployment would set up a load-test source.
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nlisten_plain = \"127.0.0.1:{plain_port}\"\n\
             admin_listen = \"127.0.0.1:{admin_port}\"\n\
             max_connections = {n}\nmax_sessions = {n}\n[tls]\ndev_cert_path = \"{}\"\n\
             [session]\nmessages_per_second = 1000000\nmessage_burst = 1000000\n\
             [bus]\n{bus}\n\
             [admission]\nexempt = [\"127.0.0.0/8\"]\n[limits.new_sessions]\nper_second = 1000000\n\
             burst = 1000000\n[log]\nlevel = \"warn\"\n{extra}",
            pem.display(),
            n = sessions + 100,
        );
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, config).unwrap();
        // `EDGE_WRAP` runs the edge under a profiler, e.g. `valgrind --tool=massif`.
        let wrap = env_str("EDGE_WRAP", "");
        let mut argv: Vec<&str> = wrap.split_whitespace().collect();
        argv.extend([
            env!("CARGO_BIN_EXE_edgeplex"),
            "serve",
            "--config",
            path.to_str().unwrap(),
        ]);
        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (mut tls, mut sha) = (None, None);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(h) = line.strip_prefix("dev certificate SHA-256: ") {
                sha = Some(h.to_string());
            }
            if let Some(a) = line.strip_prefix("edgeplex listening on wss://") {
                tls = Some(a.trim_end_matches("/ws").parse().unwrap());
                break;
            }
        }
        let tls: SocketAddr = tls.expect("the edge starts");
        // Ready means the bus is connected: poll the admin listener's readiness check (longer
        // under a profiler).
        let tries = if wrap.is_empty() { 500 } else { 6000 };
        let ready = (0..tries).any(|_| {
            let ok = http_status(("127.0.0.1", admin_port), "/readyz") == Some(200);
            if !ok {
                std::thread::sleep(Duration::from_millis(10));
            }
            ok
        });
        assert!(ready, "the edge did not become ready");
        EdgeProc {
            child,
            tls,
            plain: SocketAddr::new(tls.ip(), plain_port),
            sha: sha.unwrap(),
            pem,
            wrapped: !wrap.is_empty(),
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The status code of a plain `GET path`, or `None` when nothing answers.
fn http_status(addr: (&str, u16), path: &str) -> Option<u16> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

/// A load-generator process: this bench re-executed with [`ROLE`] set, driven by lines on its
/// stdin and answering with lines on its stdout.
pub struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    pub fn spawn(role: &str, vars: &[(&str, String)]) -> Worker {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.env(ROLE, role);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        Worker {
            stdin: child.stdin.take().unwrap(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
        }
    }

    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The worker's next line; panics when the worker died, so a crash is loud.
    pub fn recv(&mut self) -> String {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).unwrap();
        assert!(n > 0, "a load generator exited early");
        line.trim_end().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The stdin and stdout of a worker process, for the worker side of [`Worker`].
pub struct Control;

impl Control {
    pub fn new() -> Control {
        Control
    }

    /// The next command, or `None` when the coordinator is gone.
    pub fn next(&mut self) -> Option<String> {
        let mut line = String::new();
        match std::io::stdin().read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end().to_string()),
        }
    }

    pub fn reply(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").unwrap();
        out.flush().unwrap();
    }
}

/// A variable the coordinator set for a worker process; a missing one is a bug in the bench.
pub fn worker_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set for a worker"))
}

/// The server processes named in `TARGET_PIDS` (comma-separated): what a run against a server
/// the bench did not start reads CPU and memory from.
pub fn target_pids() -> Vec<u32> {
    env_str("TARGET_PIDS", "")
        .split(',')
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The socket address of a `ws://` or `wss://` URL on `localhost` or an IP address.
pub fn url_addr(url: &str) -> SocketAddr {
    let rest = url.split_once("://").expect("a ws:// or wss:// URL").1;
    let host = rest.split('/').next().unwrap();
    host.replace("localhost", "127.0.0.1").parse().unwrap()
}

/// Source address number `i` of load generator `generator`: 127.0.<1+generator>.<2..>, so
/// generators never share one and each spreads over `sources` addresses.
pub fn source(generator: u64, sources: u64, i: u64) -> IpAddr {
    let x = 2 + (i % sources.clamp(1, 250)) as u8;
    IpAddr::V4(Ipv4Addr::new(127, 0, 1 + generator as u8, x))
}

pub async fn tcp_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(source, 0))?;
    let stream = s.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A rustls client config trusting only the certificate in `pem`, offering `alpn`.
fn client_tls(pem: &str, alpn: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(pem).unwrap())
        .unwrap();
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls
}

/// A QUIC client endpoint bound to `source` that trusts the certificate in `pem`, speaking h3.
pub fn h3_endpoint(pem: &str, source: IpAddr) -> quinn::Endpoint {
    let tls = client_tls(pem, b"h3");
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client(SocketAddr::new(source, 0)).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// A TLS client trusting only the certificate in `pem`; `resume` allows session resumption
/// (off measures full handshakes).
pub fn tls_connector(pem: &str, resume: bool) -> tokio_rustls::TlsConnector {
    let mut tls = client_tls(pem, b"http/1.1");
    if !resume {
        tls.resumption = rustls::client::Resumption::disabled();
    }
    tokio_rustls::TlsConnector::from(Arc::new(tls))
}

/// Splits `n` items over `parts` as evenly as possible: part `i`'s count.
pub fn share(n: u64, parts: u64, i: u64) -> u64 {
    n / parts + u64::from(i < n % parts)
}

/// A latency histogram in microseconds, up to 10 minutes, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()
}

/// A histogram as one hex word, to travel on a worker's stdout line.
pub fn hist_to_hex(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new().serialize(h, &mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hist_from_hex(hex: &str) -> Histogram<u64> {
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .unwrap()
}

/// The marker around a payload's timestamp; not a character channel names or offsets can hold.
pub const MARK: u8 = b'#';

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Calls `f` with the timestamp of every payload in `frame` (a server may put several in one).
pub fn for_each_stamp(frame: &[u8], mut f: impl FnMut(u64)) {
    let mut i = 0;
    while let Some(p) = frame[i..].iter().position(|b| *b == MARK) {
        let start = i + p + 1;
        let len = frame[start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if frame.get(start + len) == Some(&MARK) {
            let ts = frame[start..start + len]
                .iter()
                .fold(0u64, |a, d| a * 10 + u64::from(d - b'0'));
            f(ts);
            i = start + len + 1;
        } else {
            i = start;
        }
    }
}

/// A load generator's WebSocket client handshake on `io`. tungstenite zero-fills its whole read
/// buffer before every read, and its default buffer is 128 KiB: with it, two thirds of a
/// subscriber process's time went to `memset` and the clients starved the edge of CPU. 8 KiB
/// still takes a burst of coalesced frames in one read.
pub async fn ws_client<IO>(
    url: &str,
    io: IO,
) -> Result<tokio_tungstenite::WebSocketStream<IO>, tokio_tungstenite::tungstenite::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8192);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, io, Some(config)).await?;
    Ok(ws)
}
