//! Driving a real browser against a real edge: Debian's headless Chromium on a page served from
//! its own loopback origin, which reports what it saw back to the test over HTTP, and a TCP relay
//! in front of the edge that the test can cut. Shared by `tests/browser.rs` (the browser's own
//! EventSource and WebTransport) and `tests/browser_client.rs` (`clients/js/edgeplex.js`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Serves the page and collects what it reports (the whole list of events seen, each time).
pub async fn page_server(listener: TcpListener, page: String, seen: watch::Sender<Vec<Value>>) {
    let page = Bytes::from(page);
    let seen = Arc::new(seen);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let (page, seen) = (page.clone(), seen.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (page, seen) = (page.clone(), seen.clone());
                async move {
                    if req.uri().path() == "/report" {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        if let Ok(Ok(list)) = body.map(|b| serde_json::from_slice::<Vec<Value>>(&b))
                        {
                            // Reports can arrive out of order; keep the longest.
                            seen.send_if_modified(|cur| {
                                let longer = list.len() > cur.len();
                                if longer {
                                    *cur = list;
                                }
                                longer
                            });
                        }
                        return Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())));
                    }
                    let mut r = Response::new(Full::new(page));
                    r.headers_mut()
                        .insert("content-type", "text/html".parse().unwrap());
                    Ok(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// A TCP relay in front of the edge that the test can cut: a cut drops every relayed connection
/// and refuses new ones until `restore`.
pub struct Relay {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    pub async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, conns) = (up.clone(), conns.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the browser sees a network error and retries
                    }
                    conns.lock().push(tokio::spawn(async move {
                        if let Ok(mut edge) = TcpStream::connect(to).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut edge).await;
                        }
                    }));
                }
            }
        });
        Relay {
            addr,
            up,
            conns,
            accept,
        }
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Headless Chromium on one page; killed when dropped.
pub struct Browser {
    child: std::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Opens `url` trusting the dev certificate blindly (EventSource has no other way here).
    pub fn open(url: &str) -> Browser {
        Browser::open_with(url, &["--ignore-certificate-errors"])
    }

    pub fn open_with(url: &str, extra: &[&str]) -> Browser {
        let bin = std::env::var("EDGEPLEX_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            std::path::Path::new(&bin).exists(),
            "{bin} is missing: install Debian's chromium package (scripts/test.sh does) or set \
             EDGEPLEX_CHROMIUM to a Chromium binary"
        );
        let profile = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(bin)
            .args([
                "--headless=new",
                // Tests run as root in containers, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--host-resolver-rules=MAP localhost 127.0.0.1",
            ])
            .args(extra)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start chromium");
        Browser {
            child,
            _profile: profile,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the page has reported something that satisfies `done`.
pub async fn wait_for(
    seen: &mut watch::Receiver<Vec<Value>>,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let r = tokio::time::timeout(Duration::from_secs(60), seen.wait_for(|s| done(s)))
        .await
        .map(|r| r.map(|s| s.clone()));
    match r {
        Ok(Ok(s)) => s,
        _ => panic!(
            "the page never reported {what}; it saw {:?}",
            *seen.borrow()
        ),
    }
}
