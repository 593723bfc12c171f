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
#[tokio::test]
async fn serve_runs_until_sigterm_and_drains_with_1001() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("dev.pem");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         shutdown_grace = \"5s\"\n[tls]\ndev_cert_path = \"{}\"\n[log]\nformat = \"json\"\n",
        pem.display()
    );
    let path = write_config(dir.path(), &config);
    let mut child = Command::new(BIN)
        .args(["serve", "--config", &path])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    let mut sha = None;
    while addr.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the edge starts");
        if let Some(a) = line.strip_prefix("edgeplex listening on wss://") {
            addr = Some(
                a.trim_end_matches("/ws")
                    .parse::<std::net::SocketAddr>()
                    .unwrap(),
            );
        }
        if let Some(h) = line.strip_prefix("dev certificate SHA-256: ") {
            sha = Some(h.to_string());
        }
    }
    let addr = addr.unwrap();
    let cert = CertificateDer::from_pem_file(&pem).expect("the dev certificate PEM was written");
    let digest = ring::digest::digest(&ring::digest::SHA256, &cert);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        sha.as_deref(),
        Some(hex.as_str()),
        "the printed SHA-256 is the served certificate's"
    );

    let tls = std::sync::Arc::new(common::client_tls(&cert, &[b"http/1.1"]));
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let url = format!("wss://localhost:{}/ws", addr.port());
        let (ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        let mut c = common::Client {
            ws,
            welcome: serde_json::Value::Null,
        };
        c.welcome = c.recv().await;
        c
    };
    let mut a = connect().await;
    let mut b = connect().await;
    a.subscribe(1, "demo").await;
    b.request(json!({"id": 1, "op": "publish", "channel": "demo", "data": {"hello": "world"}}))
        .await;
    let m = a.recv().await;
    assert_eq!(m["data"], json!({"hello": "world"}));

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
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
        if let Some(s) = child.try_wait().unwrap() {
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
    let logs = logs.join().unwrap();
    let parsed: Vec<serde_json::Value> = logs
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        parsed.iter().any(|v| v["message"] == "SIGTERM: draining"),
        "{logs:?}"
    );
    let closing = parsed
        .iter()
        .find(|v| v["message"] == "closing session")
        .unwrap_or_else(|| panic!("a session close is logged: {logs:?}"));
    assert_eq!(closing["span"]["transport"], "websocket");
    assert_eq!(closing["code"], 1001);
    assert!(
        closing["span"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
}
