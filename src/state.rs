//! Node-wide state ([`EdgeState`]) shared by every connection and session: the config in force,
//! metrics, the hub, admission and the gate, the caps on connections and sessions, and the
//! drain and shutdown signals. Also the admission steps that consult it ([`EdgeState::admit`]).
//!
//! It sits below `server` (which builds it and runs listeners on it) and `transport` (whose
//! sessions are admitted through it), and knows neither: it never binds, routes or answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, Client, ConnectionTicket, Refusal, SessionTicket};
use crate::auth::{Asker, Gate, GateRefusal};
use crate::bus::Hub;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::session::{Admitted, SessionEnv};

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
    pub(crate) tcp_tls: parking_lot::RwLock<Arc<rustls::ServerConfig>>,
    /// The QUIC endpoint, for reloading its certificate with the TCP one.
    pub(crate) quic: std::sync::OnceLock<quinn::Endpoint>,
    /// Cancelled when the drain delay is over: listeners stop accepting, sessions close with
    /// 1001.
    pub shutdown: CancellationToken,
    /// Set at SIGTERM, before `shutdown`: `/readyz` answers 503 so load balancers stop sending
    /// new clients, while those they still send (during `server.drain_delay`) are served.
    pub(crate) draining: AtomicBool,
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

    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.hub.bus().is_ready()
    }
}
