//! A TCP relay between an edge and a real `redis-server` that a test can make go silent: it stops
//! forwarding in both directions without closing anything, as a NAT or load balancer that forgot
//! the flow does. The kernel still accepts and ACKs, so only an application-level deadline can
//! tell.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Relay {
    pub addr: SocketAddr,
    silent: watch::Sender<bool>,
    tasks: std::sync::Arc<parking_lot::Mutex<Vec<JoinHandle<()>>>>,
}

impl Relay {
    /// Relays 127.0.0.1:<port 0> to `127.0.0.1:upstream_port`, forwarding until silenced.
    pub async fn start(upstream_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (silent, _) = watch::channel(false);
        let tasks = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (tx, t) = (silent.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let mut t = t.lock();
                t.push(tokio::spawn(forward(dr, uw, tx.subscribe())));
                t.push(tokio::spawn(forward(ur, dw, tx.subscribe())));
            }
        });
        tasks.lock().push(accept);
        Relay {
            addr,
            silent,
            tasks,
        }
    }

    /// `redis://` URL of the relay.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Stops forwarding bytes on every connection, old and new; nothing is closed.
    pub fn silence(&self) {
        self.silent.send_replace(true);
    }

    /// Forwards again, what was held included.
    pub fn resume(&self) {
        self.silent.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
    }
}

async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut silent: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // While silent nothing is read, so the sender's kernel buffers fill as on a dead path.
        if silent.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // Read just before the relay went silent: held until it forwards again.
        if silent.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
