//! A real HTTP/3 client for tests: quinn with h3 and h3-quinn, trusting only the dev
//! certificate (by its chain, as a browser that trusts the certificate would after `Alt-Svc`).

#![allow(dead_code)]

use std::sync::Arc;

use bytes::{Buf, Bytes};
use h3::client::{RequestStream, SendRequest};
use h3_quinn::{BidiStream, OpenStreams};
use quinn::crypto::rustls::QuicClientConfig;

use super::{TIMEOUT, TestEdge};

/// One HTTP/3 connection to the edge's UDP port.
pub struct H3 {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: SendRequest<OpenStreams, Bytes>,
}

pub type Stream = RequestStream<BidiStream<Bytes>, Bytes>;

pub async fn connect(t: &TestEdge) -> H3 {
    let der = t.edge.dev_cert().unwrap().der.clone();
    let tls = super::client_tls(&der, &[b"h3"]);
    let crypto = QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let addr = t.edge.quic_addr().expect("the UDP port is on");
    let conn = tokio::time::timeout(TIMEOUT, endpoint.connect(addr, "localhost").unwrap())
        .await
        .expect("QUIC handshake in time")
        .expect("QUIC handshake with the dev certificate");
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = futures_util::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    H3 {
        endpoint,
        conn,
        send,
    }
}

pub fn uri(t: &TestEdge, path: &str) -> String {
    format!(
        "https://localhost:{}{path}",
        t.edge.quic_addr().expect("the UDP port is on").port()
    )
}

impl H3 {
    /// Sends a request with `body` (none for `None`) and returns the response head and stream.
    pub async fn request(
        &mut self,
        req: http::Request<()>,
        body: Option<Bytes>,
    ) -> (http::Response<()>, Stream) {
        let mut stream = self.send.send_request(req).await.unwrap();
        if let Some(b) = body {
            stream.send_data(b).await.unwrap();
        }
        stream.finish().await.unwrap();
        let resp = tokio::time::timeout(TIMEOUT, stream.recv_response())
            .await
            .expect("a response in time")
            .unwrap();
        (resp, stream)
    }

    /// A whole response: head and body.
    pub async fn fetch(
        &mut self,
        req: http::Request<()>,
        body: Option<Bytes>,
    ) -> (http::Response<()>, Vec<u8>) {
        let (resp, mut stream) = self.request(req, body).await;
        let mut out = Vec::new();
        while let Some(mut chunk) = tokio::time::timeout(TIMEOUT, stream.recv_data())
            .await
            .expect("the body in time")
            .unwrap()
        {
            while chunk.has_remaining() {
                let c = chunk.chunk();
                out.extend_from_slice(c);
                let n = c.len();
                chunk.advance(n);
            }
        }
        (resp, out)
    }
}

/// Reads SSE events (the `id` and `data` of each, comments skipped) off a response stream.
pub struct Events {
    stream: Stream,
    buf: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub id: Option<String>,
    pub data: serde_json::Value,
}

impl Events {
    pub fn new(stream: Stream) -> Events {
        Events {
            stream,
            buf: Vec::new(),
        }
    }

    /// The next event; `None` when the stream ends.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..i + 2).collect();
                let text = String::from_utf8(block).unwrap();
                let mut id = None;
                let mut data = None;
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).unwrap());
                    }
                }
                match data {
                    Some(data) => return Some(Event { id, data }),
                    None => continue,
                }
            }
            let chunk = tokio::time::timeout(TIMEOUT, self.stream.recv_data())
                .await
                .expect("an event in time");
            match chunk {
                Ok(Some(mut c)) => {
                    while c.has_remaining() {
                        let s = c.chunk();
                        self.buf.extend_from_slice(s);
                        let n = s.len();
                        c.advance(n);
                    }
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }
}
