//! The running edge: binds the listeners a [`Config`] names, serves them, and shuts them down
//! gracefully.
//!
//! This module owns the listener lifecycle: it builds the node-wide [`EdgeState`] (`state`), binds
//! the TCP listeners ([`tcp`]) and the QUIC endpoint ([`quic`]), routes requests ([`routes`]) to
//! the transports, and drains and stops them. Protocol meaning lives in `session`, wire
//! adaptation in `transport`, what routes share in `web`, policy in `admission`. Nothing below
//! imports this module.

pub mod assets;
pub mod proxy_protocol;
pub mod quic;
pub mod reload;
pub mod routes;
mod sse_h1;
pub(crate) mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::auth::Gate;
use crate::bus::memory::MemoryBus;
use crate::bus::redis::{RedisBus, RedisConfigError, RedisSettings};
use crate::bus::{Bus, Hub};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::SessionEnv;
use crate::state::EdgeState;
use crate::tls::{self, DevCert, TlsError};

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
            let _ = state.quic.set(endpoint.clone());
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
