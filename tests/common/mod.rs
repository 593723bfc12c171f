//! Shared harness for integration tests: a real edge on 127.0.0.1 port 0 with a fresh dev
//! certificate, and real clients that trust exactly that certificate.

#![allow(dead_code)]

pub mod browser;
pub mod h2_client;
pub mod h3_client;
pub mod hook_service;
pub mod redis_cluster;
pub mod redis_server;
pub mod relay;
pub mod sse_client;
pub mod udp_relay;
pub mod wt_client;

use std::sync::Arc;
use std::time::Duration;

use edgeplex::Edge;
use edgeplex::config::{Config, FileConfig};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct TestEdge {
    pub edge: Edge,
    pub tls: Arc<rustls::ClientConfig>,
    _dir: tempfile::TempDir,
}

/// Test defaults: ephemeral ports everywhere, dev certificate in a temp dir, generous budgets so
/// only the test that means to hit a limit hits it.
pub fn test_config(dir: &std::path::Path) -> FileConfig {
    let mut f = FileConfig::default();
    f.server.listen = "127.0.0.1:0".into();
    f.server.admin_listen = "127.0.0.1:0".into();
    f.tls.dev_cert_path = dir.join("dev.pem").display().to_string();
    f.session.messages_per_second = 10_000;
    f.session.message_burst = 10_000;
    // Every test client comes from 127.0.0.1: one address for the per-IP limits.
    f.limits.ip_new_sessions.per_second = 100_000;
    f.limits.ip_new_sessions.burst = 100_000;
    f.limits.ip_sessions.max = 100_000;
    f.limits.ip_messages.per_second = 1_000_000;
    f.limits.ip_messages.burst = 1_000_000;
    f.limits.ip_bytes.per_second = 1 << 30;
    f.limits.ip_bytes.burst = 1 << 30;
    f.limits.new_sessions.per_second = 100_000;
    f.limits.new_sessions.burst = 100_000;
    f.limits.ip_connections.max = Some(100_000);
    f.limits.ipv6_wide_connections.max = Some(100_000);
    f.limits.ip_new_connections.per_second = 100_000;
    f.limits.ip_new_connections.burst = 100_000;
    f.limits.ipv6_wide_new_connections.per_second = 100_000;
    f.limits.ipv6_wide_new_connections.burst = 100_000;
    f
}

/// An edge on `redis` whose sessions may send 5 messages, then 1 per second, and are closed
/// with 1008 after 10 refusals in a row; Redis is given 3 s to answer. Ready when it returns.
pub async fn flood_limited_on_redis(redis: &redis_server::RedisServer) -> TestEdge {
    let url = redis.url();
    let t = start(move |f| {
        f.bus.redis_url = url;
        f.bus.redis_timeout = std::time::Duration::from_secs(3);
        f.session.messages_per_second = 1;
        f.session.message_burst = 5;
        f.session.close_after_refusals = 10;
    })
    .await;
    t.wait_ready(true).await;
    t
}

pub async fn start(edit: impl FnOnce(&mut FileConfig)) -> TestEdge {
    let dir = tempfile::tempdir().unwrap();
    let mut f = test_config(dir.path());
    edit(&mut f);
    let config = Config::from_file_config(f).expect("test config is valid");
    let edge = Edge::start(config).await.expect("edge starts");
    TestEdge::from_edge(edge, dir)
}

impl TestEdge {
    /// Wraps an edge started from a file in `dir` (a dev certificate, as `start` makes).
    pub fn from_edge(edge: Edge, dir: tempfile::TempDir) -> TestEdge {
        let dev = edge.dev_cert().expect("dev certificate").clone();
        let tls = Arc::new(client_tls(&dev.der, &[b"http/1.1"]));
        TestEdge {
            edge,
            tls,
            _dir: dir,
        }
    }
}

/// A rustls client config trusting only `cert` (no verification switched off).
pub fn client_tls(
    cert: &rustls::pki_types::CertificateDer<'static>,
    alpn: &[&[u8]],
) -> rustls::ClientConfig {
    edgeplex::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut c = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    c
}

pub type Ws = WebSocketStream<TlsStream<TcpStream>>;

/// A WebSocket client; `S` is its IO: TLS over TCP (HTTP/1.1 upgrade) by default, or an HTTP/2
/// stream ([`h2_client::H2Io`]).
pub struct Client<S = TlsStream<TcpStream>> {
    pub ws: WebSocketStream<S>,
    pub welcome: Value,
    /// Pushes that arrived while [`Client::request`] waited for its reply; `recv` returns them
    /// first, in order.
    pub held: std::collections::VecDeque<Value>,
}

impl TestEdge {
    pub async fn tls_stream(&self) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.edge.tls_addr()).await.unwrap();
        TlsConnector::from(self.tls.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake with the dev certificate")
    }

    /// Opens `wss://localhost/ws`; returns the handshake error as is.
    pub async fn try_connect(&self, origin: Option<&str>) -> Result<Ws, tungstenite::Error> {
        match origin {
            Some(o) => self.try_connect_with(&[("origin", o)]).await,
            None => self.try_connect_with(&[]).await,
        }
    }

    /// Opens `wss://localhost/ws` with extra handshake headers.
    pub async fn try_connect_with(
        &self,
        headers: &[(&str, &str)],
    ) -> Result<Ws, tungstenite::Error> {
        self.try_connect_path("/ws", headers).await
    }

    /// A WebSocket handshake on `path` (`/ws`, or `/ws?token=…`) with extra `headers`.
    pub async fn try_connect_path(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Ws, tungstenite::Error> {
        let mut req = format!("wss://localhost:{}{path}", self.edge.tls_addr().port())
            .into_client_request()
            .unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let stream = self.tls_stream().await;
        tokio_tungstenite::client_async(req, stream)
            .await
            .map(|(ws, _)| ws)
    }

    /// Connects and reads the welcome frame.
    pub async fn connect(&self) -> Client {
        let ws = self.try_connect(None).await.expect("websocket handshake");
        Client::welcomed(ws).await
    }
}

impl<S> Client<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    /// A client on an open WebSocket, once its welcome frame is read.
    pub async fn welcomed(ws: WebSocketStream<S>) -> Client<S> {
        let mut c = Client {
            ws,
            welcome: Value::Null,
            held: Default::default(),
        };
        c.welcome = c.recv().await;
        assert_eq!(c.welcome["op"], "welcome", "first frame is the welcome");
        c
    }
}

impl TestEdge {
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.edge.admin_addr().unwrap(), path)
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let r = reqwest::get(self.admin_url(path)).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    pub async fn ready(&self) -> bool {
        self.admin_get("/readyz").await.0 == 200
    }

    /// Waits up to 10 s for `/readyz` to say `want`.
    pub async fn wait_ready(&self, want: bool) {
        for _ in 0..500 {
            if self.ready().await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("/readyz did not become {want}");
    }

    /// Polls `/metrics` until every `(sample, value)` holds or `bound` passes; true if they
    /// held.
    pub async fn metrics_reach(&self, want: &[(&str, f64)], bound: Duration) -> bool {
        let until = tokio::time::Instant::now() + bound;
        loop {
            let mut all = true;
            for (sample, value) in want {
                all &= self.metric(sample).await == *value;
            }
            if all {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of one metric sample line, e.g. `edgeplex_sessions{transport="websocket"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await;
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
    }
}

impl<S> Client<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// Next text frame as JSON; fails the test on close, error or timeout.
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.held.pop_front() {
            return v;
        }
        self.recv_wire().await
    }

    async fn recv_wire(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .expect("a frame before the timeout")
                .expect("stream still open")
                .expect("no websocket error");
            match m {
                Message::Text(t) => return serde_json::from_str(&t).expect("frames are JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Sends a request and returns the next frame that is not a push: its reply, when nothing
    /// else is in flight. Pushes that come first are held for `recv`, in order: on the Redis
    /// bus a publish's own message can overtake its reply (they travel on different Redis
    /// connections), and the protocol matches replies by id, not by position.
    pub async fn request(&mut self, v: Value) -> Value {
        self.send(v).await;
        loop {
            let f = self.recv_wire().await;
            if matches!(f["op"].as_str(), Some("message" | "gap")) {
                self.held.push_back(f);
                continue;
            }
            return f;
        }
    }

    pub async fn subscribe(&mut self, id: u64, channel: &str) {
        let r = self
            .request(json!({"id": id, "op": "subscribe", "channel": channel}))
            .await;
        assert_eq!(r, json!({"id": id, "ok": true}));
    }

    /// Reads until the server's close frame; returns its code and reason. Text frames before it
    /// are returned too, in order.
    pub async fn until_close(&mut self) -> (u16, String, Vec<Value>) {
        let mut before = Vec::new();
        loop {
            let m = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .expect("close before the timeout");
            match m {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string(), before);
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new(), before),
                Some(Ok(Message::Text(t))) => before.push(serde_json::from_str(&t).unwrap()),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }
}

pub fn close_code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// Sets `[[channels]]`: `(match, subscribe, publish)` per rule, accesses as in the config file.
#[allow(dead_code)]
pub fn channel_rules(f: &mut FileConfig, rules: &[(&str, &str, &str)]) {
    let access = |a: &str| -> edgeplex::auth::Access {
        serde_json::from_value(serde_json::Value::String(a.into())).expect("an access name")
    };
    f.channels = edgeplex::config::schema::ChannelRulesSection(
        rules
            .iter()
            .map(|(m, s, p)| edgeplex::auth::RuleSection {
                pattern: (*m).into(),
                subscribe: access(s),
                publish: access(p),
            })
            .collect(),
    );
}
