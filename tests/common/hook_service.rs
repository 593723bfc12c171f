//! A backend service for the hook tests: hyper on 127.0.0.1 port 0 (HTTP/1.1, or over TLS),
//! answering each request as the test's handler says, counting the TCP connections it accepts
//! and keeping every request it got.

#![allow(dead_code)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);

/// Where the service is mounted: hooks are `POST {url}/connect` etc. below it.
pub const BASE: &str = "/app";

/// One request as the service received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Seen {
    /// The hook asked: the path below the service's base (`/connect`, `/subscribe`, …).
    pub fn hook(&self) -> &str {
        self.path.strip_prefix(BASE).unwrap_or(&self.path)
    }
}

pub type Handler = Arc<dyn Fn(Seen) -> BoxFuture<'static, (u16, String)> + Send + Sync>;

pub fn answer(status: u16, body: Value) -> BoxFuture<'static, (u16, String)> {
    Box::pin(async move { (status, body.to_string()) })
}

/// A hook service: counts the TCP connections it accepts and keeps every request it got.
pub struct Service {
    pub url: String,
    pub accepts: Arc<AtomicUsize>,
    pub seen: Arc<parking_lot::Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Service {
    pub async fn start(
        handler: impl Fn(Seen) -> BoxFuture<'static, (u16, String)> + Send + Sync + 'static,
    ) -> Service {
        Service::start_on(None, Arc::new(handler)).await
    }

    pub async fn start_on(tls: Option<tokio_rustls::TlsAcceptor>, handler: Handler) -> Service {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (a, s) = (accepts.clone(), seen.clone());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (handler, seen, tls) = (handler.clone(), s.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (handler, seen) = (handler.clone(), seen.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let bytes = body.collect().await.unwrap().to_bytes();
                            let got = Seen {
                                path: parts.uri.path().to_string(),
                                headers: parts.headers,
                                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                            };
                            seen.lock().push(got.clone());
                            let (status, text) = handler(got).await;
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(text)))
                                    .unwrap(),
                            )
                        }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                    }
                });
            }
        });
        Service {
            url: format!("{scheme}://{addr}{BASE}"),
            accepts,
            seen,
            task,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    pub async fn wait_seen(&self, n: usize) -> Vec<Seen> {
        let deadline = Instant::now() + WAIT;
        while self.seen.lock().len() < n {
            assert!(
                Instant::now() < deadline,
                "the service got {:?}",
                self.seen()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.seen()
    }

    /// The bodies of the requests received on `path` (below the service's base) so far.
    pub fn on(&self, path: &str) -> Vec<Value> {
        let full = format!("{BASE}{path}");
        self.seen()
            .into_iter()
            .filter(|s| s.path == full)
            .map(|s| s.body)
            .collect()
    }

    /// Waits until `path` got `n` requests; returns their bodies.
    pub async fn wait_on(&self, path: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.on(path);
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "{path}: {:?}", self.seen());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
