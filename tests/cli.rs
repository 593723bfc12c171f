//! The `edgeplex` binary as operators run it: `check-config`, `--version`, and `serve` with a
//! real client and a real SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_edgeplex");
const SHIPPED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/edgeplex.toml");

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    // Tests must not pick up overrides from the machine they run on.
    for (k, _) in std::env::vars() {
        if k.starts_with("EDGEPLEX__") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("edge.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn version_prints_the_crate_version() {
    let (code, out, _) = run(&["--version"], &[]);
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        format!("edgeplex {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_accepts_the_shipped_file_and_prints_the_effective_config() {
    let (code, out, err) = run(&["check-config", SHIPPED], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid"), "{out}");
    assert!(out.contains("TLS listener 127.0.0.1:8443"), "{out}");
    assert!(
        out.contains("[session]") && out.contains("outbound_queue = 1024"),
        "{out}"
    );
}

#[test]
fn the_worked_examples_are_valid_configs() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // The certificate paths are the deployment's; the rest must load as written.
            let no_cert = [("EDGEPLEX__TLS__CERT", ""), ("EDGEPLEX__TLS__KEY", "")];
            let (code, out, err) = run(&["check-config", path.to_str().unwrap()], &no_cert);
            assert_eq!(code, 0, "{}: {err}", path.display());
            assert!(out.contains("limits ("), "{out}");
            n += 1;
        }
    }
    assert_eq!(
        n, 5,
        "public-chat, trading-feed, lockdown, cookie-session-app, jwt-jwks"
    );
}

/// The identity examples say what their comments promise, and neither is left open.
#[test]
fn the_identity_examples_lock_channels_down() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples");
    let no_cert = [("EDGEPLEX__TLS__CERT", ""), ("EDGEPLEX__TLS__KEY", "")];
    let check = |name: &str, lines: &[&str]| {
        let path = format!("{examples}/{name}");
        let (code, out, err) = run(&["check-config", &path], &no_cert);
        assert_eq!(code, 0, "{name}: {err}");
        for line in lines {
            assert!(out.contains(line), "{name}: {line:?} not in\n{out}");
        }
        assert!(
            !format!("{out}{err}").contains("lets clients without a token"),
            "{name} is open: {err}"
        );
    };
    check(
        "cookie-session-app.toml",
        &[
            "hooks: POST https://app.internal/edgeplex/<hook> for connect, disconnect (after, \
             fire-and-forget); timeout 1s, at most 256 in flight; when the service cannot \
             answer: refuse (unavailable); connect receives headers: cookie",
            "origins: https://app.example.com; requests without Origin refused",
            "user_sessions: 20 open sessions per user",
            "channels (5 rules, first match wins; a channel no rule matches is refused):\n  \
             \"user:{sub}:*\": subscribe authenticated, publish authenticated\n  \
             \"user:*\": subscribe nobody, publish nobody\n  \
             \"room:*\": subscribe authenticated, publish claim\n  \
             \"announcements\": subscribe anyone, publish nobody\n  \
             \"*\": subscribe nobody, publish nobody\n",
        ],
    );
    // The JWKS URL is not fetched by check-config (idp.example.com does not exist).
    check(
        "jwt-jwks.toml",
        &[
            "auth: token keys: JWKS from https://idp.example.com/.well-known/jwks.json \
             (refetched every 5m, last good set kept); audience edgeplex; issuer \
             https://idp.example.com/; leeway 30s; sessions without a token refused",
            "hooks: off",
            "user_sessions: 10 open sessions per user",
            "user_messages: 10 messages per user, across its sessions/s, burst 30",
            "channels (4 rules, first match wins; a channel no rule matches is refused):\n  \
             \"user:{sub}:*\": subscribe authenticated, publish authenticated\n  \
             \"paid:*\": subscribe claim, publish nobody\n  \
             \"free:*\": subscribe authenticated, publish nobody\n  \
             \"*\": subscribe nobody, publish nobody\n",
        ],
    );
}

#[test]
fn check_config_names_an_unknown_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[session]\nmax_chanels = 5\n");
    let (code, out, err) = run(&["check-config", &path], &[]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains(&path), "{err}");
    assert!(err.contains("session.max_chanels"), "{err}");
    assert!(
        err.contains("max_channels"),
        "the allowed keys are listed: {err}"
    );
}

#[test]
fn check_config_names_a_wrong_type_and_an_impossible_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "[server]\nmax_sessions = \"lots\"\n");
    let (code, _, err) = run(&["check-config", &path], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("server.max_sessions"), "{err}");

    let path = write_config(dir.path(), "[session]\noutbound_queue = 0\n");
    let (code, _, err) = run(&["check-config", &path], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("session.outbound_queue") && err.contains("allowed is 1 to"),
        "{err}"
    );
}

#[test]
fn check_config_reports_a_missing_file() {
    let (code, _, err) = run(&["check-config", "/nonexistent/edge.toml"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/edge.toml"), "{err}");
}

#[test]
fn environment_overrides_keys_and_is_named_in_errors() {
    let (code, out, err) = run(
        &["check-config", SHIPPED],
        &[
            ("EDGEPLEX__SESSION__MAX_CHANNELS", "7"),
            ("EDGEPLEX__SERVER__LISTEN_PLAIN", "127.0.0.1:8080"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("max_channels = 7"), "{out}");
    assert!(out.contains("plain listener 127.0.0.1:8080"), "{out}");

    let (code, _, err) = run(
        &["check-config", SHIPPED],
        &[("EDGEPLEX__SERVER__LISTEN", "nowhere")],
    );
    assert_ne!(code, 0);
    assert!(err.contains("EDGEPLEX__SERVER__LISTEN"), "{err}");

    let (code, _, err) = run(
        &["check-config", SHIPPED],
        &[("EDGEPLEX__SERVER__LISTN", "x")],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("listn"),
        "an unknown override is refused, not ignored: {err}"
    );
}

/// The README's first command, as a user runs it: the binary serves, a `wss://` client trusting
/// the written dev certificate subscribes, publishes and receives, and SIGTERM drains it with
/// 1001 and a clean exit.
/// A running `edgeplex serve` child with a config file in a temp dir; killed when dropped.
struct Served {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    pem: std::path::PathBuf,
    path: String,
    sha: Option<String>,
    logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

/// The base config of a served edge (ephemeral ports, JSON logs) followed by `extra`.
fn served_config(pem: &std::path::Path, server_extra: &str, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         shutdown_grace = \"5s\"\n{server_extra}\n[tls]\ndev_cert_path = \"{}\"\n\
         [log]\nformat = \"json\"\n{extra}",
        pem.display()
    )
}

impl Served {
    fn start(server_extra: &str, extra: &str) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("dev.pem");
        let path = write_config(dir.path(), &served_config(&pem, server_extra, extra));
        let mut child = Command::new(BIN)
            .args(["serve", "--config", &path])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut addr, mut sha) = (None, None);
        while addr.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("the edge starts");
            if let Some(a) = line.strip_prefix("edgeplex listening on wss://") {
                addr = Some(a.trim_end_matches("/ws").parse().unwrap());
            }
            if let Some(h) = line.strip_prefix("dev certificate SHA-256: ") {
                sha = Some(h.to_string());
            }
        }
        Served {
            child,
            addr: addr.unwrap(),
            pem,
            path,
            sha,
            logs,
            _dir: dir,
        }
    }

    fn cert(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(&self.pem).expect("the dev certificate PEM was written")
    }

    async fn try_connect(&self) -> Result<common::Client, tokio_tungstenite::tungstenite::Error> {
        let tls = std::sync::Arc::new(common::client_tls(&self.cert(), &[b"http/1.1"]));
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let url = format!("wss://localhost:{}/ws", self.addr.port());
        let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
        let mut c = common::Client {
            ws,
            welcome: serde_json::Value::Null,
            held: Default::default(),
        };
        c.welcome = c.recv().await;
        Ok(c)
    }

    async fn connect(&self) -> common::Client {
        self.try_connect().await.expect("websocket handshake")
    }

    /// The HTTP status of a refused handshake.
    async fn refused_status(&self) -> u16 {
        match self.try_connect().await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
            Err(e) => panic!("expected an HTTP refusal, got {e}"),
            Ok(_) => panic!("expected a refusal, the handshake succeeded"),
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn rewrite(&self, server_extra: &str, extra: &str) {
        // Through a temp file and a rename, as editors and config managers do, so the watcher
        // never reads half a file.
        let tmp = format!("{}.tmp", self.path);
        std::fs::write(&tmp, served_config(&self.pem, server_extra, extra)).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    /// Every log line so far, parsed (the edge logs JSON).
    fn log_lines(&self) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Waits for the `n`th log line (1-based) whose message is `message`.
    async fn wait_log(&self, message: &str, n: usize) -> serde_json::Value {
        for _ in 0..500 {
            let found: Vec<_> = self
                .log_lines()
                .into_iter()
                .filter(|v| v["message"] == message)
                .collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "no log line {message:?} (#{n}) in {:?}",
            self.logs.lock().unwrap()
        );
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn serve_runs_until_sigterm_and_drains_with_1001() {
    let mut served = Served::start("", "");
    let digest = ring::digest::digest(&ring::digest::SHA256, &served.cert());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        served.sha.as_deref(),
        Some(hex.as_str()),
        "the printed SHA-256 is the served certificate's"
    );

    let mut a = served.connect().await;
    let mut b = served.connect().await;
    a.subscribe(1, "demo").await;
    b.request(json!({"id": 1, "op": "publish", "channel": "demo", "data": {"hello": "world"}}))
        .await;
    let m = a.recv().await;
    assert_eq!(m["data"], json!({"hello": "world"}));

    served.signal("-TERM");
    for c in [&mut a, &mut b] {
        let (code, _, _) = c.until_close().await;
        assert_eq!(code, 1001);
    }
    // The edge answers each close and then the stream ends.
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), a.ws.next()).await {
        assert!(matches!(m, Message::Close(_)), "{m:?}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = served.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the edge exits within its grace period"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "clean exit after SIGTERM: {exit:?}");

    // log.format = "json": every line is one JSON object, and session events carry the
    // session's span with its peer address and transport.
    let logs = served.wait_log("SIGTERM: draining", 1).await;
    assert_eq!(logs["level"], "INFO");
    let closing = served.wait_log("closing session", 1).await;
    assert_eq!(closing["span"]["transport"], "websocket");
    assert_eq!(closing["code"], 1001);
    assert!(
        closing["span"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
}

const RELOADED: &str = "config reloaded: [admission], [limits] and [[channels]] in force";
const REJECTED: &str = "config reload rejected; the running policy stays";

fn limits(ip_sessions: u32) -> String {
    format!("[limits.ip_sessions]\nmax = {ip_sessions}\n")
}

#[tokio::test]
async fn a_changed_file_reloads_limits_without_dropping_a_session() {
    let watch = "config_watch = \"100ms\"";
    let served = Served::start(watch, &limits(3));
    let mut a = served.connect().await;
    let mut b = served.connect().await;

    served.rewrite(watch, &limits(2));
    served.wait_log(RELOADED, 1).await;
    assert_eq!(
        served.refused_status().await,
        429,
        "the new limit is in force"
    );
    for c in [&mut a, &mut b] {
        let r = c.request(json!({"id": 1, "op": "ping"})).await;
        assert_eq!(r["ok"], true, "sessions outlive the reload");
    }

    // An invalid file changes nothing, and the log names the key and the file.
    served.rewrite(watch, "[limits.ip_sessions]\nmaxx = 1\n");
    let rejected = served.wait_log(REJECTED, 1).await;
    let error = rejected["error"].as_str().unwrap();
    assert!(
        error.contains("maxx") && error.contains(&served.path),
        "{error}"
    );
    assert_eq!(served.refused_status().await, 429, "the old policy stays");
    let r = a.request(json!({"id": 2, "op": "ping"})).await;
    assert_eq!(r["ok"], true);

    // A valid file again: a looser limit lets a third session in.
    served.rewrite(watch, &limits(3));
    served.wait_log(RELOADED, 2).await;
    let _c = served.connect().await;
}

#[tokio::test]
async fn sighup_reloads_when_the_file_watch_is_off() {
    let served = Served::start("config_watch = \"0s\"", &limits(1));
    let _a = served.connect().await;
    assert_eq!(served.refused_status().await, 429);
    served.rewrite("config_watch = \"0s\"", &limits(2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        served.refused_status().await,
        429,
        "no reload without the signal"
    );
    served.signal("-HUP");
    let line = served.wait_log(RELOADED, 1).await;
    assert_eq!(line["why"], "SIGHUP");
    let _b = served.connect().await;
    // A change to a section read only at start is reported, not applied.
    served.rewrite("config_watch = \"0s\"\nmax_sessions = 5", &limits(2));
    served.signal("-HUP");
    let warn = served
        .wait_log(
            "config sections changed that are read only at start; restart to apply them",
            1,
        )
        .await;
    assert!(
        warn["sections"].as_str().unwrap().contains("server"),
        "{warn}"
    );
}

#[test]
fn check_config_explains_the_limits_at_accept() {
    let (code, out, err) = run(&["check-config", SHIPPED], &[]);
    assert_eq!(code, 0, "{err}");
    for line in [
        "ip_connections: 1000 open connections per address (a tenth of server.max_connections)",
        "ipv6_wide_connections: 2500 open connections per IPv6 /48 (a quarter of \
         server.max_connections)",
        "ip_new_connections: 20 new connections per address/s, burst 60",
        "ipv6_wide_new_connections: 100 new connections/s per IPv6 /48, burst 300",
        "admin listener 127.0.0.1:9090 (at most 64 connections)",
        "deadlines a client controls: TLS and request head 10s, request body 10s (408), idle \
         HTTP connection 1m",
        "shutdown (SIGTERM): sessions closed with 1001 at once, then up to 10s for them to end \
         (no drain window: server.drain_delay = 0s)",
    ] {
        assert!(out.contains(line), "{line:?} not in\n{out}");
    }
    // An explicit cap is shown as it is.
    let (code, out, err) = run(
        &["check-config", SHIPPED],
        &[("EDGEPLEX__LIMITS__IP_CONNECTIONS__MAX", "7")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("ip_connections: 7 open connections per address —"),
        "{out}"
    );
}

/// The image's environment, read from the Dockerfile's `ENV` instructions (docker itself is not
/// needed): the config the image runs must keep the unauthenticated admin listener on loopback.
#[test]
fn the_container_image_keeps_the_admin_listener_on_loopback() {
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let joined = dockerfile.replace("\\\n", " ");
    let env: Vec<(String, String)> = joined
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ENV "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
        .collect();
    assert!(
        env.iter().any(|(k, _)| k == "EDGEPLEX__SERVER__LISTEN"),
        "{env:?}"
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run(&["check-config", SHIPPED], &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("TLS listener 0.0.0.0:8443"), "{out}");
    assert!(out.contains("admin listener 127.0.0.1:9090"), "{out}");
}

impl Served {
    /// The admin listener's address, from the start-up log line.
    async fn admin_addr(&self) -> std::net::SocketAddr {
        let line = self.wait_log("edgeplex listening", 1).await;
        let admin = line["admin"].as_str().expect("an admin field");
        admin
            .strip_prefix("Some(")
            .and_then(|a| a.strip_suffix(')'))
            .unwrap_or(admin)
            .parse()
            .unwrap_or_else(|e| panic!("{admin}: {e}"))
    }
}

/// `server.drain_delay` as a load balancer needs it, with the real binary and a real SIGTERM:
/// `/readyz` turns 503 at once while `/healthz` stays 200 and a new WebSocket still opens (the
/// balancer's straggler); only after the delay does every session close with 1001: WebSocket
/// (close frame), SSE (the stream ends), WebTransport (application close 1001 with its reason,
/// not the endpoint's code 0); then the process exits 0 within its grace.
#[tokio::test]
async fn sigterm_drains_for_the_delay_then_closes_every_transport_with_1001() {
    const DELAY: Duration = Duration::from_secs(1);
    edgeplex::tls::install_crypto_provider();
    let served = Served::start("drain_delay = \"1s\"", "");
    let admin = served.admin_addr().await;
    let http = reqwest::Client::new();
    let status = |path: &'static str| {
        let http = http.clone();
        async move {
            http.get(format!("http://{admin}{path}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(status("/readyz").await, 200);

    let mut ws = served.connect().await;
    let sse = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_der(&served.cert()).unwrap())
        .resolve("localhost", served.addr)
        .http1_only()
        .build()
        .unwrap();
    let resp = sse
        .get(format!(
            "https://localhost:{}/sse?channel=demo",
            served.addr.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = resp.bytes_stream();
    assert!(events.next().await.is_some(), "the welcome event");
    let wt_config = common::wt_client::client_config_for(served.sha.as_deref().unwrap());
    let wt = common::wt_client::try_open_url(
        wtransport::Endpoint::client(wt_config).unwrap(),
        &format!("https://127.0.0.1:{}/wt", served.addr.port()),
        None,
    )
    .await
    .expect("a WebTransport session");

    served.signal("-TERM");
    let signalled = std::time::Instant::now();
    // Not ready at once, so the balancer stops sending; still alive, so nothing restarts it.
    let mut ready = status("/readyz").await;
    while ready == 200 && signalled.elapsed() < Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        ready = status("/readyz").await;
    }
    assert_eq!(ready, 503, "/readyz answers 503 right after SIGTERM");
    assert_eq!(status("/healthz").await, 200);
    // A straggler the balancer sent before it noticed is still served, on a new connection.
    let mut late = served.connect().await;
    let r = late.request(json!({"id": 1, "op": "ping"})).await;
    assert_eq!(r["ok"], true);
    assert!(
        signalled.elapsed() < DELAY,
        "the straggler was served within the delay"
    );

    let (code, reason, _) = ws.until_close().await;
    assert_eq!((code, reason.as_str()), (1001, "edge shutting down"));
    assert!(
        signalled.elapsed() >= DELAY - Duration::from_millis(50),
        "sessions are closed only after the drain delay ({:?})",
        signalled.elapsed()
    );
    assert_eq!(late.until_close().await.0, 1001);
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(chunk) = events.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the SSE stream ends");
    assert_eq!(wt.closed().await, (1001, "edge shutting down".to_string()));

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut served = served;
    let exit = loop {
        if let Some(s) = served.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the edge exits within its grace period"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "clean exit after the drain: {exit:?}");
}

#[test]
fn check_config_says_which_redis_bus_a_cluster_config_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[bus]\nredis_cluster = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\", \
         \"rediss://10.0.0.3:7000\"]\n",
    );
    let (code, out, err) = run(&["check-config", &path], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("bus: Redis Cluster from 3 seed(s)") && out.contains("edgeplex:{C}"),
        "{out}"
    );
    assert!(!out.contains("bus: embedded"), "{out}");
    // Not both buses at once.
    let path = write_config(
        dir.path(),
        "[bus]\nredis_url = \"redis://10.0.0.1:6379\"\nredis_cluster = [\"redis://10.0.0.2:7000\"]\n",
    );
    let (code, _, err) = run(&["check-config", &path], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("bus.redis_cluster") || err.contains("bus.redis_url"),
        "{err}"
    );
}
