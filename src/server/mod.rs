//! The running edge: binds the listeners a [`Config`] names, serves them, and shuts them down
//! gracefully.
//!
//! This module owns node-wide state ([`EdgeState`]: caps, draining flag, shutdown signal, task
//! tracking) and the listener lifecycle. Protocol meaning lives in `session`, wire adaptation in
//! `transport`, policy in `admission`.

pub mod assets;
pub mod proxy_protocol;
pub mod quic;
pub mod reload;
pub mod routes;
pub(crate) mod tcp;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, Client, ConnectionTicket, Refusal, SessionTicket};
use crate::auth::{Asker, Gate, GateRefusal};
use crate::bus::memory::MemoryBus;
use crate::bus::redis::{RedisBus, RedisConfigError, RedisSettings};
use crate::bus::{Bus, Hub};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::{Admitted, SessionEnv};
use crate::tls::{self, DevCert, TlsError};

/// Response body of every route: boxed so that streaming routes (SSE) and fixed ones share a type.
/// Not `Sync`: a streaming body owns its session, and hyper needs only `Send`.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

pub fn full_body(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into()).boxed_unsync()
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Redis(#[from] RedisConfigError),
    #[error(transparent)]
    Gate(#[from] crate::auth::GateError),
}

/// What a handshake shows the gate.
#[derive(Debug, Clone, Copy)]
pub struct Handshake<'a> {
    pub transport: crate::metrics::Transport,
    /// The token presented (`Authorization: Bearer`, or `?token=`).
    pub token: Option<&'a str>,
    pub origin: Option<&'a str>,
    /// The request's headers: the connect hook is passed `hooks.forward_headers` of them.
    pub headers: &'a http::HeaderMap,
}

/// Node-wide state shared by every connection and session.
#[derive(Debug)]
pub struct EdgeState {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    pub sessions: Arc<SessionEnv>,
    /// Origin rules and limits in force (replaced by a reload).
    pub admission: Arc<Admission>,
    /// Tokens, channel rules and hooks: who may do what.
    pub gate: Arc<Gate>,
    /// `Alt-Svc` for TLS responses: set when the UDP port is on, which serves the public routes
    /// over HTTP/3 as the TLS listener does, WebTransport's CONNECT besides.
    pub alt_svc: Option<http::HeaderValue>,
    /// The TLS config new TCP connections get; replaced when certificates are reloaded.
    tcp_tls: parking_lot::RwLock<Arc<rustls::ServerConfig>>,
    /// The QUIC endpoint, for reloading its certificate with the TCP one.
    quic: std::sync::OnceLock<quic::QuicEndpoint>,
    /// Cancelled when the drain delay is over: listeners stop accepting, sessions close with
    /// 1001.
    pub shutdown: CancellationToken,
    /// Set at SIGTERM, before `shutdown`: `/readyz` answers 503 so load balancers stop sending
    /// new clients, while those they still send (during `server.drain_delay`) are served.
    draining: AtomicBool,
    /// Every connection and session task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub connection_slots: Arc<Semaphore>,
    pub session_slots: Arc<Semaphore>,
    /// The admin listener's own cap (`server.admin_max_connections`).
    pub admin_slots: Arc<Semaphore>,
}

impl EdgeState {
    /// Shutdown has begun: the node is not ready, though it may still accept (the drain delay).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Admission of one more session from `client` (its origin already checked): refused once
    /// sessions are being closed, past the node-wide and per-IP limits, or at
    /// `server.max_sessions`. During the drain delay sessions are still admitted: they are the
    /// load balancer's stragglers, and refusing them would fail clients the balancer has not yet
    /// moved. The session holds both parts for its life.
    pub fn admit_session(
        &self,
        client: Client,
    ) -> Result<(SessionTicket, OwnedSemaphorePermit), Refusal> {
        if self.shutdown.is_cancelled() {
            return Err(Refusal::Draining);
        }
        let ticket = self.admission.admit_session(client)?;
        let slot = self
            .session_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Overloaded)?;
        Ok((ticket, slot))
    }

    /// The gate's part of opening a session admitted with `ticket`, before its handshake
    /// completes: the token is verified, the connect hook asked, and the user (the token's or
    /// the hook's) counted under `[limits.user_sessions]` on the ticket.
    pub async fn admit(
        &self,
        mut ticket: SessionTicket,
        hs: Handshake<'_>,
    ) -> Result<Admitted, GateRefusal> {
        let id = self.sessions.new_id();
        let identity = self.gate.identify(hs.token)?;
        let user_limit = |ticket: &mut SessionTicket, user: &str| {
            ticket.admit_user(user).map_err(|r| match r {
                Refusal::RateLimited { retry_after } => GateRefusal::UserLimit { retry_after },
                other => GateRefusal::Forbidden(other.message().into()),
            })
        };
        // A token's user meets its limit before the hook is asked: a refusal costs no call.
        if let Some(user) = &identity.user {
            user_limit(&mut ticket, user)?;
        }
        let asker = Asker {
            session: id.public(),
            transport: hs.transport.as_str(),
            client: ticket.client().ip,
            origin: hs.origin,
        };
        let identity = self.gate.connect(identity, asker, hs.headers).await?;
        if let Some(user) = identity
            .user
            .as_deref()
            .filter(|_| !identity.user_from_token)
            && let Err(refusal) = user_limit(&mut ticket, user)
        {
            // The service heard of the session at connect: it hears that it did not open.
            self.gate.disconnected(&identity, asker);
            return Err(refusal);
        }
        Ok(Admitted {
            id,
            ticket,
            identity,
            origin: hs.origin.map(Arc::from),
        })
    }

    /// The per-address limits on a public connection just accepted from `peer` (TCP or QUIC),
    /// before TLS. `None`: refused; the caller closes it at once. See
    /// [`Admission::admit_connection`] for `peer_may_forward`.
    pub fn admit_connection(
        &self,
        peer: std::net::IpAddr,
        peer_may_forward: bool,
    ) -> Option<ConnectionTicket> {
        match self.admission.admit_connection(peer, peer_may_forward) {
            Ok(ticket) => Some(ticket),
            Err(limit) => {
                self.metrics.refusal(limit.as_str());
                None
            }
        }
    }

    /// The TLS config for a new TCP connection.
    pub fn tcp_tls(&self) -> Arc<rustls::ServerConfig> {
        self.tcp_tls.read().clone()
    }

    /// Puts reloaded certificates in force for new connections, TCP and QUIC together; open
    /// connections keep the certificate they were made with.
    pub fn reload_tls(&self, setup: tls::TlsSetup) -> std::io::Result<()> {
        if let Some(quic::QuicEndpoint(endpoint)) = self.quic.get() {
            let config = quic::server_config(setup.quic, &self.config.session)?;
            // The socket stays; only the config of new connections changes.
            endpoint.set_server_config(Some(config));
        }
        *self.tcp_tls.write() = setup.tcp;
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.hub.bus().is_ready()
    }
}

/// A running edge. Dropping it does not stop it; call [`Edge::shutdown`].
#[derive(Debug)]
pub struct Edge {
    state: Arc<EdgeState>,
    tls_addr: SocketAddr,
    /// The WebTransport (UDP) address: the TLS listener's port.
    quic_addr: Option<SocketAddr>,
    plain_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    dev_cert: Option<DevCert>,
    /// The admin listener keeps answering during the drain (so `/readyz` reports it) and stops
    /// last.
    admin_stop: CancellationToken,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every connection and session ended within the grace period.
    pub clean: bool,
}

impl Edge {
    /// Binds every listener in `config` and starts serving. Port 0 picks a free port; the bound
    /// addresses are available from the accessors.
    pub async fn start(config: Config) -> Result<Edge, StartError> {
        let tls::TlsSetup {
            tcp: tls_config,
            quic: quic_tls,
            dev: dev_cert,
        } = tls::server_config(&config.tls)?;
        let metrics = Arc::new(Metrics::new());
        let shutdown = CancellationToken::new();
        let redis_url =
            (config.bus.redis_url.clone()).or_else(|| config.bus.redis_cluster.first().cloned());
        let redis = match redis_url {
            None => None,
            Some(url) => Some(Arc::new(RedisBus::new(
                RedisSettings {
                    url,
                    cluster: config.bus.redis_cluster.clone(),
                    ca: config.bus.redis_ca.clone(),
                    prefix: config.bus.channel_prefix.clone(),
                    history_len: config.bus.history_len,
                    history_ttl: config.bus.history_ttl,
                    history_ttl_unsubscribed: config.bus.history_ttl_unsubscribed,
                    history_bytes: config.bus.history_bytes,
                    history_channel_bytes: config.bus.history_channel_bytes,
                    timeout: config.bus.redis_timeout,
                    ping_interval: config.bus.redis_ping_interval,
                    ingest_queue: config.bus.redis_ingest_queue,
                },
                metrics.clone(),
            )?)),
        };
        let bus = match &redis {
            None => Bus::Memory(MemoryBus::new(
                config.bus.history_len,
                config.bus.history_ttl,
                config.bus.history_bytes,
            )),
            Some(r) => Bus::Redis(r.clone()),
        };
        let hub = Arc::new(Hub::new(bus, config.server.max_channels, metrics.clone()));
        // Cancelled last, once the grace period is over: the admin listener serves the publish
        // API until then, so the Redis publish pipeline must outlive the sessions.
        let admin_stop = CancellationToken::new();
        if let Some(r) = redis {
            // A Redis too old for the scripts refuses the start; one unreachable is asked later.
            r.check_server().await?;
            r.spawn_publisher(admin_stop.child_token());
            // Stops with the shutdown signal: sessions are closed with 1001 at that moment and
            // need no more deliveries.
            tokio::spawn(r.run(Arc::downgrade(&hub), shutdown.child_token()));
        }
        let gate = Arc::new(Gate::new(&config, metrics.clone())?);
        if let (Some(crate::config::auth::JwksSource::Url(url)), Some(verifier)) =
            (&config.auth.jwks, gate.verifier())
        {
            let outbound =
                crate::outbound::Outbound::new(None).map_err(crate::auth::GateError::from)?;
            tokio::spawn(crate::auth::jwks::refresh(
                url.clone(),
                config.auth.jwks_refresh,
                verifier.clone(),
                outbound,
                metrics.clone(),
                shutdown.child_token(),
            ));
        }
        let sessions = Arc::new(SessionEnv::new(
            hub.clone(),
            config.session.clone(),
            metrics.clone(),
            gate.clone(),
        ));
        let admission = Arc::new(Admission::new(
            config.admission.clone(),
            config.limits.clone(),
            metrics.clone(),
        ));
        let s = &config.server;
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let tls_listener = bind("server.listen", s.listen).await?;
        let plain_listener = match s.listen_plain {
            Some(a) => Some(bind("server.listen_plain", a).await?),
            None => None,
        };
        let admin_listener = match s.admin_listen {
            Some(a) => Some(bind("server.admin_listen", a).await?),
            None => None,
        };
        let local = |l: &TcpListener| l.local_addr().expect("a bound listener has an address");
        let tls_addr = local(&tls_listener);
        let plain_addr = plain_listener.as_ref().map(local);
        let admin_addr = admin_listener.as_ref().map(local);

        // Browsers take `Alt-Svc: h3` as a promise that every request may go over HTTP/3 on
        // that port: it is sent because the UDP port serves the public routes over HTTP/3
        // (`server::quic`) beside WebTransport. A day is what browsers cache.
        let config_alt_svc = config
            .webtransport
            .enabled
            .then(|| http::HeaderValue::from_str(&format!("h3=\":{}\"; ma=86400", tls_addr.port())))
            .and_then(Result::ok);
        let state = Arc::new(EdgeState {
            connection_slots: Arc::new(Semaphore::new(s.max_connections)),
            session_slots: Arc::new(Semaphore::new(s.max_sessions)),
            admin_slots: Arc::new(Semaphore::new(s.admin_max_connections)),
            config,
            metrics,
            hub,
            sessions,
            admission,
            gate,
            alt_svc: config_alt_svc,
            tcp_tls: parking_lot::RwLock::new(tls_config),
            quic: std::sync::OnceLock::new(),
            shutdown,
            draining: AtomicBool::new(false),
            tasks: TaskTracker::new(),
        });
        tokio::spawn(housekeeping(state.clone()));
        let quic_addr = if state.config.webtransport.enabled {
            let endpoint =
                quic::bind(tls_addr, quic_tls, &state.config.session).map_err(|source| {
                    StartError::Bind {
                        what: "server.listen (UDP, HTTP/3)",
                        addr: tls_addr,
                        source,
                    }
                })?;
            let addr = endpoint.local_addr().unwrap_or(tls_addr);
            let _ = state.quic.set(quic::QuicEndpoint(endpoint.clone()));
            // Tracked: shutdown waits for it to close the endpoint after the sessions' 1001s.
            state
                .tasks
                .spawn(quic::accept_loop(endpoint, state.clone()));
            Some(addr)
        } else {
            None
        };
        let public_stop = state.shutdown.clone();
        tokio::spawn(tcp::accept_loop(
            tls_listener,
            true,
            state.clone(),
            routes::Listener::Public,
            public_stop.clone(),
        ));
        if let Some(l) = plain_listener {
            tokio::spawn(tcp::accept_loop(
                l,
                false,
                state.clone(),
                routes::Listener::Public,
                public_stop,
            ));
        }
        if let Some(l) = admin_listener {
            tokio::spawn(tcp::accept_loop(
                l,
                false,
                state.clone(),
                routes::Listener::Admin,
                admin_stop.clone(),
            ));
        }
        tracing::info!(%tls_addr, quic = ?quic_addr, plain = ?plain_addr, admin = ?admin_addr, bus = state.hub.bus().name(), "edgeplex listening");
        Ok(Edge {
            state,
            tls_addr,
            quic_addr,
            plain_addr,
            admin_addr,
            dev_cert,
            admin_stop,
        })
    }

    pub fn tls_addr(&self) -> SocketAddr {
        self.tls_addr
    }

    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
    }

    pub fn plain_addr(&self) -> Option<SocketAddr> {
        self.plain_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn dev_cert(&self) -> Option<&DevCert> {
        self.dev_cert.as_ref()
    }

    pub fn state(&self) -> &Arc<EdgeState> {
        &self.state
    }

    /// The first step of a shutdown: `/readyz` answers 503 from now on, while listeners and
    /// sessions go on as before. [`Edge::shutdown`] does it too; call it alone to wait out the
    /// drain delay yourself (the binary does, so that a second signal can end it).
    pub fn begin_drain(&self) {
        if !self.state.draining.swap(true, Ordering::AcqRel) {
            tracing::info!(
                drain_delay = ?self.state.config.server.drain_delay,
                "draining: /readyz answers 503; still accepting for server.drain_delay"
            );
        }
    }

    /// The whole shutdown: [`Edge::begin_drain`], `server.drain_delay` of accepting as usual,
    /// then [`Edge::shutdown_within`] `server.shutdown_grace`.
    pub async fn shutdown(self) -> ShutdownReport {
        self.begin_drain();
        tokio::time::sleep(self.state.config.server.drain_delay).await;
        let grace = self.state.config.server.shutdown_grace;
        self.shutdown_within(grace).await
    }

    /// Stops accepting, tells every session to close with 1001, and waits up to `grace` for
    /// connections and sessions to end. No drain delay: whatever was owed to the load balancer
    /// has been waited for already.
    pub async fn shutdown_within(self, grace: Duration) -> ShutdownReport {
        let state = &self.state;
        state.draining.store(true, Ordering::Release);
        state.shutdown.cancel();
        state.tasks.close();
        let open = state.tasks.len();
        tracing::info!(open, grace = ?grace, "shutting down");
        let clean = tokio::time::timeout(grace, state.tasks.wait())
            .await
            .is_ok();
        if clean {
            tracing::info!("all sessions closed");
        } else {
            tracing::warn!(
                left = state.tasks.len(),
                "grace period over; dropping what is left"
            );
        }
        self.admin_stop.cancel();
        ShutdownReport { clean }
    }
}

/// How often per-IP state that is back to fresh is dropped.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);

async fn housekeeping(state: Arc<EdgeState>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tick.tick() => state.admission.housekeeping(),
        }
    }
}
