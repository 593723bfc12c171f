//! A token is never written to a log (design.md, "Identity"): the real binary at `log.level =
//! "debug"`, text and JSON, with an HMAC secret from the environment, is handed valid, garbage
//! and expired tokens every way a client can present them (`Authorization: Bearer`, `?token=`
//! on /ws, /sse and `POST /publish`, and an `{"op":"auth"}` frame); then nothing it wrote to
//! stdout or stderr holds a token, a part of one, or the secret, while the log does show the
//! sessions (so a logger that wrote nothing would not pass).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use jwt_simple::prelude::{Claims, Duration as JwtDuration, HS256Key, MACLike, UnixTimeStamp};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

const BIN: &str = env!("CARGO_BIN_EXE_edgeplex");
const WAIT: Duration = Duration::from_secs(20);

/// A value no other test and no log could hold by chance.
fn unique(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{what}{}x{nanos}", std::process::id())
}

/// `edgeplex serve` with `[log] level = "debug"` in `format`, the secret from the environment;
/// every line it writes, stdout and stderr, is kept.
struct Served {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    pem: std::path::PathBuf,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Served {
    fn start(format: &str, secret: &str) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("dev.pem");
        let path = dir.path().join("edge.toml");
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\n\
                 [tls]\ndev_cert_path = \"{}\"\n[webtransport]\nenabled = false\n\
                 [log]\nlevel = \"debug\"\nformat = \"{format}\"\n",
                pem.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(BIN);
        for (k, _) in std::env::vars() {
            if k.starts_with("EDGEPLEX__") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .args(["serve", "--config", path.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .env("EDGEPLEX__AUTH__HMAC_SECRET", secret)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let mut readers = Vec::new();
        let stderr = child.stderr.take().unwrap();
        let sink = output.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        }));
        let stdout = child.stdout.take().unwrap();
        let sink = output.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        }));
        let addr = loop {
            let line = rx.recv_timeout(WAIT).expect("the edge starts");
            if let Some(a) = line.strip_prefix("edgeplex listening on wss://") {
                break a.trim_end_matches("/ws").parse().unwrap();
            }
        };
        Served {
            child,
            addr,
            pem,
            output,
            readers,
            _dir: dir,
        }
    }

    fn cert(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(&self.pem).unwrap()
    }

    /// Opens `/ws{query}` with `headers`; the welcome frame read, or the handshake's error.
    async fn ws(
        &self,
        query: &str,
        headers: &[(&str, String)],
    ) -> Result<common::Client, tungstenite::Error> {
        let tls = Arc::new(common::client_tls(&self.cert(), &[b"http/1.1"]));
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut req = format!("wss://localhost:{}/ws{query}", self.addr.port())
            .into_client_request()
            .unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        let (ws, _) = tokio_tungstenite::client_async(req, stream).await?;
        let mut c = common::Client {
            ws,
            welcome: Value::Null,
            held: Default::default(),
        };
        c.welcome = c.recv().await;
        assert_eq!(c.welcome["op"], "welcome");
        Ok(c)
    }

    async fn ws_status(&self, query: &str, headers: &[(&str, String)]) -> u16 {
        match self.ws(query, headers).await {
            Err(tungstenite::Error::Http(r)) => r.status().as_u16(),
            Err(e) => panic!("expected an HTTP refusal, got {e}"),
            Ok(_) => panic!("expected a refusal, the handshake succeeded"),
        }
    }

    fn http(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_der(&self.cert()).unwrap())
            .resolve("localhost", self.addr)
            .http1_only()
            .build()
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// Opens `/sse{query}` with `bearer`; its status and, on 200, the welcome's session id
    /// (the stream is dropped then).
    async fn sse(&self, query: &str, bearer: Option<&str>) -> (u16, Option<String>) {
        let mut req = self.http().get(self.url(&format!("/sse{query}")));
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        if status != 200 {
            return (status, None);
        }
        let mut events = r.bytes_stream().eventsource();
        let e = tokio::time::timeout(WAIT, events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let welcome: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(welcome["op"], "welcome");
        (status, welcome["session"].as_str().map(String::from))
    }

    async fn post(&self, query: &str, bearer: Option<&str>) -> u16 {
        let mut req = self
            .http()
            .post(self.url(&format!("/publish{query}")))
            .body(json!({"channel": "news", "data": 1}).to_string());
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap().status().as_u16()
    }

    fn text(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Waits until the output holds every one of `needles`.
    async fn wait_for(&self, needles: &[String]) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let text = self.text();
            let missing: Vec<_> = needles.iter().filter(|n| !text.contains(*n)).collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the log never showed {missing:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the edge; everything it wrote.
    fn stop(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        self.output.lock().unwrap().clone()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HS256 token for `sub`, expiring `exp_in_secs` from now (negative: already expired, past
/// any leeway), each one distinct.
fn token(key: &HS256Key, sub: &str, exp_in_secs: i64) -> String {
    let mut claims = Claims::create(JwtDuration::from_secs(600))
        .with_subject(sub)
        .with_jwt_id(unique("jti"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if exp_in_secs < 0 {
        claims.issued_at = Some(UnixTimeStamp::from_secs((now - 7200) as u64));
        claims.invalid_before = claims.issued_at;
    }
    claims.expires_at = Some(UnixTimeStamp::from_secs((now + exp_in_secs) as u64));
    key.authenticate(claims).unwrap()
}

async fn no_token_reaches_the_log(format: &str) {
    let secret = unique("hmacsecretthatisatleast32bytes");
    assert!(secret.len() >= 32);
    let key = HS256Key::from_bytes(secret.as_bytes());
    let served = Served::start(format, &secret);

    let header_ws = token(&key, "alice", 600);
    let query_ws = token(&key, "bob", 600);
    let replacement = token(&key, "alice", 900);
    let query_sse = token(&key, "carol", 600);
    let header_sse = token(&key, "dave", 600);
    let header_post = token(&key, "erin", 600);
    let query_post = token(&key, "frank", 600);
    let expired = token(&key, "alice", -3600);
    let garbage = unique("garbage-token-");
    // Shaped like a JWT, signed with another key.
    let forged = token(&HS256Key::from_bytes(&[7u8; 32]), "alice", 600);
    let bearer = |t: &str| vec![("authorization", format!("Bearer {t}"))];

    // Valid tokens, each way a client presents one.
    let mut a = served.ws("", &bearer(&header_ws)).await.unwrap();
    let mut b = served.ws(&format!("?token={query_ws}"), &[]).await.unwrap();
    let r = a
        .request(json!({"id": 1, "op": "auth", "token": replacement}))
        .await;
    assert_eq!(r, json!({"id": 1, "ok": true}));
    for (id, bad) in [(2, &garbage), (3, &expired), (4, &forged)] {
        let r = a
            .request(json!({"id": id, "op": "auth", "token": bad}))
            .await;
        assert_eq!(r["error"]["code"], "unauthorized", "{r}");
    }
    let (status, sse_query_session) = served
        .sse(&format!("?channel=news&token={query_sse}"), None)
        .await;
    assert_eq!(status, 200);
    let (status, sse_header_session) = served.sse("?channel=news", Some(&header_sse)).await;
    assert_eq!(status, 200);
    assert_eq!(served.post("", Some(&header_post)).await, 200);
    assert_eq!(
        served.post(&format!("?token={query_post}"), None).await,
        200
    );

    // Refused tokens, each way too.
    for bad in [&garbage, &expired, &forged] {
        assert_eq!(served.ws_status(&format!("?token={bad}"), &[]).await, 401);
        assert_eq!(served.ws_status("", &bearer(bad)).await, 401);
        assert_eq!(
            served
                .sse(&format!("?channel=news&token={bad}"), None)
                .await
                .0,
            401
        );
        assert_eq!(served.sse("?channel=news", Some(bad)).await.0, 401);
        assert_eq!(served.post(&format!("?token={bad}"), None).await, 401);
        assert_eq!(served.post("", Some(bad)).await, 401);
    }

    // The sessions are in the log, by id, and so are the refusals.
    let mut ids = vec![
        a.welcome["session"].as_str().unwrap().to_string(),
        b.welcome["session"].as_str().unwrap().to_string(),
        sse_query_session.unwrap(),
        sse_header_session.unwrap(),
    ];
    a.ws.close(None).await.unwrap();
    b.ws.close(None).await.unwrap();
    ids.push("session refused".into());
    served.wait_for(&ids).await;

    let output = served.stop();
    let text = output.join("\n");
    for transport in ["websocket", "sse"] {
        assert!(
            output
                .iter()
                .any(|l| l.contains("session refused") && l.contains(transport)),
            "no refusal of a {transport} session in the log:\n{text}"
        );
    }
    let mut secrets = vec![("hmac secret", secret.clone())];
    for (what, t) in [
        ("bearer on /ws", &header_ws),
        ("?token= on /ws", &query_ws),
        ("op auth", &replacement),
        ("?token= on /sse", &query_sse),
        ("bearer on /sse", &header_sse),
        ("bearer on /publish", &header_post),
        ("?token= on /publish", &query_post),
        ("expired", &expired),
        ("forged", &forged),
    ] {
        secrets.push((what, t.clone()));
        // A part of one is as bad: the claims, or the signature.
        let parts: Vec<&str> = t.split('.').collect();
        assert_eq!(parts.len(), 3);
        secrets.push((what, parts[1].to_string()));
        secrets.push((what, parts[2].to_string()));
    }
    secrets.push(("garbage", garbage.clone()));
    for (what, s) in &secrets {
        if let Some(line) = output.iter().find(|l| l.contains(s.as_str())) {
            panic!("the {what} token (or a part of it) is in the log: {line}");
        }
    }
    // A debug log, really: the edge logged at debug level, and plenty.
    assert!(text.contains("DEBUG"), "{text}");
    assert!(output.len() > 20, "{text}");
    if format == "json" {
        for line in output.iter().filter(|l| l.starts_with('{')) {
            let _: Value = serde_json::from_str(line).unwrap();
            // One `message` key, the event's: a field of that name would be a second one, and
            // a log pipeline would read it instead of the event's text.
            assert_eq!(line.matches("\"message\":").count(), 1, "{line}");
        }
        assert!(output.iter().filter(|l| l.starts_with('{')).count() > 20);
    }
}

#[tokio::test]
async fn no_token_reaches_the_text_log_at_debug_level() {
    no_token_reaches_the_log("text").await;
}

#[tokio::test]
async fn no_token_reaches_the_json_log_at_debug_level() {
    no_token_reaches_the_log("json").await;
}
