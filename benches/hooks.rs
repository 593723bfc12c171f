//! What the hook layer adds to a round trip: a local hyper service answers `{"allow":true}` at
//! once, and the same calls go to it three ways, each sequentially and with `CONCURRENCY` (32)
//! in flight: (a) a bare hyper-util pooled client, (b) `Outbound::post_json` (deadline, byte
//! cap), (c) `Hooks::call(Hook::Subscribe, …)` (the in-flight cap, the JSON body encoded from a
//! `HookRequest`, the answer read into a verdict, the metrics). Prints p50/p99/p99.9 and calls
//! per second. `CALLS` per row (default 20,000).
//!
//! The service runs on a runtime of its own (one worker thread); the callers on a current-thread
//! runtime, so the figures are one caller core's against one service core's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgeplex::auth::hooks::{Hook, HookRequest, HookVerdict, Hooks};
use edgeplex::config::Config;
use edgeplex::metrics::Metrics;
use edgeplex::outbound::Outbound;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Starts the service on its own thread and runtime; its address.
fn service() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(b"{\"allow\":true}")))
                                .unwrap(),
                        )
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

struct Row {
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Row {
    fn print(mut self, name: &str, concurrency: usize) {
        self.latencies.sort_unstable();
        let n = self.latencies.len();
        let q = |p: f64| {
            let i = ((n as f64 * p).ceil() as usize).clamp(1, n) - 1;
            self.latencies[i].as_secs_f64() * 1e6
        };
        println!(
            "{name:<24} {concurrency:>5} {n:>8} {:>9.0} {:>9.0} {:>9.0} {:>12.0}",
            q(0.50),
            q(0.99),
            q(0.999),
            n as f64 / self.wall.as_secs_f64()
        );
    }
}

/// Runs `calls` calls of `one`, `concurrency` at a time; each call's latency and the wall time.
async fn run<F, Fut>(calls: usize, concurrency: usize, one: F) -> Row
where
    F: Fn() -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let per_task = calls / concurrency;
    let local = tokio::task::LocalSet::new();
    let mut handles = Vec::new();
    for _ in 0..concurrency {
        let one = one.clone();
        handles.push(local.spawn_local(async move {
            let mut lat = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                one().await;
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    local.await;
    let mut latencies = Vec::with_capacity(calls);
    for h in handles {
        latencies.extend(h.await.unwrap());
    }
    Row {
        latencies,
        wall: started.elapsed(),
    }
}

fn main() {
    let calls = env("CALLS", 20_000);
    let concurrency = env("CONCURRENCY", 32).max(1);
    let addr = service();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let text = format!(
            "[hooks]\nurl = \"http://{addr}/app\"\nsubscribe = true\ntimeout = \"5s\"\n"
        );
        let config = Config::from_toml_str(&text, "bench.toml").unwrap().hooks;
        let hooks = Hooks::new(&config, Arc::new(Metrics::new()))
            .unwrap()
            .unwrap();
        let outbound = Outbound::new(None).unwrap();
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let raw: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(http);
        let url: http::Uri = format!("http://{addr}/app/subscribe").parse().unwrap();
        // What Hooks sends for this request, so (a) and (b) carry the same bytes.
        let body = Bytes::from_static(
            br#"{"session":"bench-session-1","transport":"websocket","client":"127.0.0.1","origin":"https://app.example","user":"ann","channel":"chat:1"}"#,
        );

        let raw_call = {
            let (raw, url, body) = (raw.clone(), url.clone(), body.clone());
            move || {
                let (raw, url, body) = (raw.clone(), url.clone(), body.clone());
                async move {
                    let req = Request::post(url)
                        .header("content-type", "application/json")
                        .body(Full::new(body))
                        .unwrap();
                    let res = raw.request(req).await.unwrap();
                    assert!(res.status().is_success());
                    let _ = res.into_body().collect().await.unwrap();
                }
            }
        };
        let outbound_call = {
            let (outbound, url, body) = (outbound.clone(), url.clone(), body.clone());
            move || {
                let (outbound, url, body) = (outbound.clone(), url.clone(), body.clone());
                async move {
                    let (status, _) = outbound
                        .post_json(&url, body, Duration::from_secs(5), 64 * 1024)
                        .await
                        .unwrap();
                    assert!(status.is_success());
                }
            }
        };
        let hooks_call = {
            let hooks = hooks.clone();
            move || {
                let hooks = hooks.clone();
                async move {
                    let req = HookRequest {
                        session: "bench-session-1",
                        transport: "websocket",
                        client: "127.0.0.1".parse().unwrap(),
                        origin: Some("https://app.example"),
                        user: Some("ann"),
                        channel: Some("chat:1"),
                        data: None,
                        headers: None,
                    };
                    let v = hooks.call(Hook::Subscribe, &req).await;
                    assert!(matches!(v, HookVerdict::Allow(_)), "{v:?}");
                }
            }
        };

        // Warm the pools (connections, and the lazy parts of each client).
        run(2_000, concurrency, raw_call.clone()).await;
        run(2_000, concurrency, outbound_call.clone()).await;
        run(2_000, concurrency, hooks_call.clone()).await;

        println!(
            "hooks: {calls} calls per row to a local hyper HTTP/1.1 service answering at once; \
             latency in µs"
        );
        println!(
            "{:<24} {:>5} {:>8} {:>9} {:>9} {:>9} {:>12}",
            "client", "conc", "calls", "p50", "p99", "p99.9", "calls/s"
        );
        for c in [1, concurrency] {
            run(calls, c, raw_call.clone())
                .await
                .print("(a) raw hyper client", c);
            run(calls, c, outbound_call.clone())
                .await
                .print("(b) Outbound::post_json", c);
            run(calls, c, hooks_call.clone())
                .await
                .print("(c) Hooks::call", c);
        }
    });
}
