//! The TCP side: accept loops, the connection caps (node-wide, per client address, and the admin
//! listener's), TLS handshakes under a deadline, and hyper serving HTTP/1.1 and HTTP/2 (chosen by
//! ALPN / preface) with upgrades.
//!
//! A public connection meets its address's connection limits before it costs a TLS handshake.
//! The address is the socket peer; with `server.proxy_protocol` on, the peer is a load balancer,
//! so the limits wait for the PROXY header and key on the client it names (the header is read
//! only from trusted proxies, under the handshake deadline, and the node-wide cap holds
//! meanwhile).

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::routes::{self, Listener};
use crate::state::EdgeState;
use crate::web::conn::StreamExec;
use crate::web::{Activity, ConnInfo, ConnSlot};

/// Pause after an accept error (EMFILE and friends) so a full fd table does not spin the loop.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

pub(super) async fn accept_loop(
    listener: TcpListener,
    tls: bool,
    state: Arc<EdgeState>,
    kind: Listener,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        match kind {
            Listener::Public => {
                // At a cap the connection is closed at once rather than left in the backlog:
                // the client learns now instead of after its own timeout. The address's own
                // limits come first, so that an address past them takes no node-wide slot.
                let address = if state.config.server.proxy_protocol {
                    None
                } else {
                    match state.admit_connection(peer.ip(), true) {
                        Some(ticket) => Some(ticket),
                        None => {
                            drop(stream);
                            continue;
                        }
                    }
                };
                let Ok(permit) = state.connection_slots.clone().try_acquire_owned() else {
                    state.metrics.connections_refused.inc();
                    drop(stream);
                    continue;
                };
                let st = state.clone();
                // Read per connection: a certificate reload applies to the next one.
                let tls = tls.then(|| TlsAcceptor::from(state.tcp_tls()));
                let mut slot = ConnSlot::new(permit, state.metrics.connections.clone());
                if let Some(ticket) = address {
                    slot = slot.with_address(ticket);
                }
                state.tasks.spawn(async move {
                    let info = ConnInfo {
                        peer,
                        tls: tls.is_some(),
                        permit: None,
                        activity: None,
                        publish_budget: None,
                        kill: None,
                    };
                    let stop = st.shutdown.clone();
                    serve(stream, tls, st, kind, info, Some(slot), stop).await;
                });
            }
            // Admin connections are few and trusted, and must outlive the drain so `/readyz` can
            // report it: they are not tracked with the client tasks. They have their own cap,
            // since the listener needs no more than a scraper and a few operators.
            Listener::Admin => {
                let Ok(permit) = state.admin_slots.clone().try_acquire_owned() else {
                    state.metrics.admin_connections_refused.inc();
                    drop(stream);
                    continue;
                };
                let st = state.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let info = ConnInfo {
                        peer,
                        tls: false,
                        permit: None,
                        activity: None,
                        publish_budget: None,
                        kill: None,
                    };
                    serve(stream, None, st, kind, info, None, stop).await;
                });
            }
        }
    }
}

/// Serves one accepted connection; `slot` is a public connection's place under the caps, which
/// the connection (and any session upgraded from it) holds until it ends.
async fn serve(
    mut stream: TcpStream,
    tls: Option<TlsAcceptor>,
    state: Arc<EdgeState>,
    kind: Listener,
    mut info: ConnInfo,
    mut slot: Option<ConnSlot>,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let deadline = state.config.server.handshake_timeout;
    if kind == Listener::Public && state.config.server.proxy_protocol {
        match proxy_header(&mut stream, &state, &info).await {
            Some(source) => info.peer = source,
            None => return,
        }
        // The header named the client: its address's limits apply now, still before TLS.
        match state.admit_connection(info.peer.ip(), false) {
            Some(ticket) => slot = slot.map(|s| s.with_address(ticket)),
            None => return,
        }
    }
    info.permit = slot.map(Arc::new);
    match tls {
        None => serve_http(stream, state, kind, info, stop).await,
        Some(acceptor) => match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
            Ok(Ok(tls_stream)) => serve_http(tls_stream, state, kind, info, stop).await,
            Ok(Err(e)) => tracing::debug!(peer = %info.peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(peer = %info.peer, "TLS handshake timed out"),
        },
    }
}

/// The client address a trusted proxy's PROXY header gives (the socket peer for a `LOCAL` one),
/// or `None` when the connection must be closed.
async fn proxy_header(
    stream: &mut TcpStream,
    state: &EdgeState,
    info: &ConnInfo,
) -> Option<std::net::SocketAddr> {
    let peer = info.peer;
    let trusted = state.admission.policy().admission.trusted_proxies.clone();
    let peer_ip = crate::admission::client_ip::canonical(peer.ip());
    if !trusted.iter().any(|n| n.contains(&peer_ip)) {
        state.metrics.refusal("proxy_protocol");
        tracing::debug!(%peer, "closed: not a trusted proxy, and server.proxy_protocol is on");
        return None;
    }
    let deadline = state.config.server.handshake_timeout;
    match tokio::time::timeout(deadline, super::proxy_protocol::read_header(stream)).await {
        Ok(Ok(source)) => Some(source.unwrap_or(peer)),
        Ok(Err(e)) => {
            state.metrics.refusal("proxy_protocol");
            tracing::debug!(%peer, error = %e, "closed: bad PROXY header");
            None
        }
        Err(_) => {
            state.metrics.refusal("proxy_protocol");
            tracing::debug!(%peer, "closed: no PROXY header in time");
            None
        }
    }
}

async fn serve_http<IO>(
    io: IO,
    state: Arc<EdgeState>,
    kind: Listener,
    info: ConnInfo,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let s = &state.config.server;
    // Each HTTP/2 stream in a task of its own that can be ended alone (see `StreamExec`).
    let mut builder = auto::Builder::new(StreamExec);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(s.handshake_timeout)
        .max_buf_size(s.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(s.max_header_bytes as u32)
        .max_concurrent_streams(100);
    if kind == Listener::Public {
        // SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441): browsers then open WebSockets as
        // streams of this connection (extended CONNECT to /ws), over TLS and over h2c alike.
        builder.http2().enable_connect_protocol();
    }
    builder
        .http2()
        // Pings find dead peers; the idle check below closes live but unused connections.
        .keep_alive_interval(state.config.session.ping_interval)
        .keep_alive_timeout(s.handshake_timeout);
    let peer = info.peer;
    let st = state.clone();
    let activity = Arc::new(Activity::default());
    let act = activity.clone();
    let mut info = info;
    info.activity = Some(activity.clone());
    let kill = CancellationToken::new();
    info.kill = Some(kill.clone());
    if kind == Listener::Public {
        info.publish_budget = Some(Arc::new(crate::admission::limits::direct_limiter(
            state.config.session.message_quota(),
        )));
    }
    let service = service_fn(move |req| {
        let st = st.clone();
        let info = info.clone();
        let guard = act.begin();
        async move {
            let resp = routes::route(req, st, kind, info).await;
            drop(guard);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let idle_limit = s.http_idle_timeout;
    let mut idle_check = tokio::time::interval(idle_limit / 4);
    let mut conn = pin!(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
    let draining = loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.cancelled() => break true,
            _ = kill.cancelled() => {
                tracing::info!(%peer, "dropping a connection whose client stopped reading");
                return;
            }
            _ = idle_check.tick() => {
                if activity.idle_for() >= idle_limit {
                    tracing::debug!(%peer, "closing idle HTTP connection");
                    break false;
                }
            }
        }
    };
    // HTTP/2 gets GOAWAY, idle HTTP/1.1 is closed; upgraded sessions run in their own tasks and
    // close themselves on the shutdown signal.
    conn.as_mut().graceful_shutdown();
    let wait = if draining {
        state.config.server.shutdown_grace
    } else {
        idle_limit
    };
    let _ = tokio::time::timeout(wait, conn).await;
}
