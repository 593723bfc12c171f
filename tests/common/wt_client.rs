//! A WebTransport test client (wtransport's) that trusts the edge only through the dev
//! certificate's SHA-256, exactly as a browser's `serverCertificateHashes` does.

#![allow(dead_code)]

use std::time::Duration;

use serde_json::{Value, json};
use wtransport::endpoint::ConnectOptions;
use wtransport::endpoint::endpoint_side::Client;
use wtransport::error::ConnectionError;
use wtransport::tls::Sha256Digest;
use wtransport::{ClientConfig, Connection, Endpoint, RecvStream, SendStream};

use super::{TIMEOUT, TestEdge};

/// One WebTransport session and its stream of JSON lines.
pub struct Wt {
    _endpoint: Endpoint<Client>,
    pub conn: Connection,
    pub send: SendStream,
    pub recv: RecvStream,
    pub pending: Vec<u8>,
}

pub fn client_endpoint(t: &TestEdge) -> Endpoint<Client> {
    Endpoint::client(client_config(t)).unwrap()
}

pub fn client_config(t: &TestEdge) -> ClientConfig {
    client_config_for(&t.edge.dev_cert().unwrap().sha256_hex)
}

/// A client trusting the certificate whose SHA-256 is `hex` (as `edgeplex serve` prints it).
pub fn client_config_for(hex: &str) -> ClientConfig {
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let hash = Sha256Digest::new(bytes.try_into().unwrap());
    ClientConfig::builder()
        .with_bind_default()
        .with_server_certificate_hashes([hash])
        .keep_alive_interval(Some(Duration::from_secs(3)))
        .build()
}

pub fn url(t: &TestEdge, path: &str) -> String {
    format!(
        "https://127.0.0.1:{}{path}",
        t.edge.quic_addr().expect("WebTransport is on").port()
    )
}

/// Opens a session on `path` (`/wt`, or `/wt?token=…`): CONNECT, the stream, and the welcome.
pub async fn try_open_path(
    endpoint: Endpoint<Client>,
    t: &TestEdge,
    path: &str,
    origin: Option<&str>,
) -> Result<Wt, String> {
    try_open_url(endpoint, &url(t, path), origin).await
}

/// Opens a session at `url` (`https://127.0.0.1:<port>/wt`): CONNECT, the stream, and the
/// welcome.
pub async fn try_open_url(
    endpoint: Endpoint<Client>,
    url: &str,
    origin: Option<&str>,
) -> Result<Wt, String> {
    let mut options = ConnectOptions::builder(url);
    if let Some(o) = origin {
        options = options.add_header("origin", o);
    }
    let conn = tokio::time::timeout(TIMEOUT, endpoint.connect(options.build()))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let mut wt = Wt {
        _endpoint: endpoint,
        conn,
        send,
        recv,
        pending: Vec::new(),
    };
    // The stream reaches the edge with the first bytes on it; the welcome answers nothing, so
    // say something first.
    wt.send_line(&json!({"op": "ping"}).to_string()).await;
    let welcome = wt.recv().await;
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    assert_eq!(wt.recv().await, json!({"ok": true}));
    Ok(wt)
}

impl Wt {
    pub async fn send_line(&mut self, line: &str) {
        self.send.write_all(line.as_bytes()).await.unwrap();
        self.send.write_all(b"\n").await.unwrap();
    }

    pub async fn request(&mut self, v: Value) -> Value {
        self.send_line(&v.to_string()).await;
        self.recv().await
    }

    /// The next line from the edge as JSON.
    pub async fn recv(&mut self) -> Value {
        loop {
            if let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return serde_json::from_slice(&line[..i]).expect("lines are JSON");
            }
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(TIMEOUT, self.recv.read(&mut buf))
                .await
                .expect("a line before the timeout")
                .expect("the stream is readable")
                .expect("the stream is still open");
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Waits for the edge to close the session; returns its code and reason.
    pub async fn closed(&self) -> (u32, String) {
        let e = tokio::time::timeout(TIMEOUT, self.conn.closed())
            .await
            .expect("the session closes");
        match e {
            ConnectionError::ApplicationClosed(close) => (
                close.code().into_inner() as u32,
                String::from_utf8_lossy(close.reason()).into_owned(),
            ),
            other => panic!("expected an application close, got {other:?}"),
        }
    }
}
