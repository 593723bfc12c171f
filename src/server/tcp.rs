//! The TCP side: accept loops, the connection caps (node-wide, per client address, and the admin
//! listener's), TLS handshakes under a deadline, and hyper serving HTTP/1.1 and HTTP/2 (chosen by
//! ALPN / preface) with upgrades.
//!
//! A public connection meets its address's connection limits before it costs a TLS handshake.
//! The address is the socket peer; with `server.proxy_protocol` on, the peer is a load balancer,
//! so the limits wait for the PROXY header and key on the client it names (the header is read
//! only from trusted proxies, under the handshake deadline, and the node-wide cap holds
//! meanwhile).
//!
//! A public HTTP/1.1 connection whose first request is a plain `GET /sse` is the exception to
//! hyper: its event stream is written on the bare connection (see [`super::sse_h1`], which says
//! why and what it hands back to hyper).

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use http::Request;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::routes::{self, Listener};
use super::sse_h1::{self, Prefixed, Sniffed};
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
    // Every phase below is boxed or handed on by value, never held: this task lives as long as
    // the connection, which may be an idle event stream (see `sse_h1`), and its size is the
    // largest of its phases'. The TLS stream goes straight from the handshake into a box of
    // its own.
    if kind == Listener::Public && state.config.server.proxy_protocol {
        match Box::pin(proxy_header(&mut stream, &state, &info)).await {
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
    // Only public HTTP/1.1 connections may carry an event stream served without hyper.
    let public = kind == Listener::Public;
    let served: Option<Served> = match tls {
        None => Some(Box::pin(serve_http(
            stream, public, state, kind, info, stop,
        ))),
        Some(acceptor) => {
            let peer = info.peer;
            tokio::time::timeout(deadline, Box::pin(acceptor.accept(stream)))
                .map(move |accepted| match accepted {
                    Ok(Ok(tls_stream)) => {
                        let http1 = tls_stream.get_ref().1.alpn_protocol() != Some(b"h2");
                        let sniff = public && http1;
                        // Boxed once here, so each phase that takes the stream on moves a
                        // pointer: by value, its ~1.2 KiB were held again by every future the
                        // stream passed through.
                        let io = Box::new(tls_stream);
                        Some(Box::pin(serve_http(io, sniff, state, kind, info, stop)) as Served)
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        None
                    }
                })
                .await
        }
    };
    if let Some(served) = served {
        served.await;
    }
}

/// A connection's HTTP phase, past its handshakes.
type Served = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

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

/// Serves HTTP on an accepted (and decrypted) connection: a first request that is a plain
/// `GET /sse` on HTTP/1.1 (`sniff`) gets its event stream without hyper (see [`sse_h1`]); every
/// other connection is hyper's, from its first byte.
async fn serve_http<IO>(
    mut io: IO,
    sniff: bool,
    state: Arc<EdgeState>,
    kind: Listener,
    info: ConnInfo,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if !sniff {
        // Through `Prefixed` with nothing to replay: one `serve_hyper` per IO type, not two.
        return Box::pin(serve_hyper(
            Prefixed::new(Bytes::new(), io),
            state,
            kind,
            info,
            stop,
        ))
        .await;
    }
    let s = &state.config.server;
    let (max_head, deadline) = (s.max_header_bytes, s.handshake_timeout);
    // The sniffed head is handed on inside the match, not held: this future lives as long as
    // the stream does. hyper's future is boxed so that an event stream's is not sized for it.
    let head = tokio::select! {
        head = tokio::time::timeout(deadline, sse_h1::sniff(&mut io, max_head)) => head,
        // A head left half-sent does not hold up a drain.
        _ = stop.cancelled() => return,
    };
    let served = match head {
        Ok(Sniffed::EventStream(req)) => Either::Left(serve_event_stream(io, *req, state, info)),
        Ok(Sniffed::Other(read)) => Either::Right(Box::pin(serve_hyper(
            Prefixed::new(read, io),
            state,
            kind,
            info,
            stop,
        ))),
        Ok(Sniffed::Gone) => return,
        Err(_) => {
            tracing::debug!(peer = %info.peer, "no request head in time");
            return;
        }
    };
    served.await
}

/// An event stream on HTTP/1.1, answered on the bare connection: the route is the one hyper's
/// requests take. A `fn`: the request goes into the route's box at once, and the future that
/// streams keeps only the IO, the response body and what the stall watcher needs.
fn serve_event_stream<IO>(
    io: IO,
    req: Request<()>,
    state: Arc<EdgeState>,
    mut info: ConnInfo,
) -> impl Future<Output = ()> + Send
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The stall watcher ends the stream with this, as it drops a hyper connection.
    let kill = CancellationToken::new();
    info.kill = Some(kill.clone());
    // Boxed: admission and the joins are a large future, over before the stream idles.
    let route = Box::pin(routes::event_stream(req, state.clone(), info.clone()));
    async move {
        let resp = route.await;
        let write_timeout = state.config.session.write_timeout;
        sse_h1::serve(io, resp, &info, &kill, write_timeout).await;
    }
}

async fn serve_hyper<IO>(
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
            // Boxed: hyper keeps this future in an HTTP/2 stream's task (and an HTTP/1.1
            // connection's) until the response is done, and the route's (admission, the joins,
            // the hooks) is ~11 KiB; an event stream would carry its room for hours.
            let resp = Box::pin(routes::route(req, st, kind, info)).await;
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
