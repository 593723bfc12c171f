//! The transport-independent session: what one client is subscribed to, its bounded outbound
//! queue, its message budget, and the meaning of every client frame.
//!
//! A transport adapter owns the socket. It hands each complete client frame to
//! [`Session::handle_frame`], writes whatever appears in the [`Outbox`], and closes the wire when
//! a [`Verdict`] or the outbox says so. This module never touches a socket and never learns which
//! wire a client uses beyond the label for metrics.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::DefaultDirectRateLimiter;
use governor::clock::Clock;
use prometheus_client::metrics::counter::Counter;

use crate::admission::{Refusal, SessionTicket, close};
use crate::auth::{Asker, Gate, GateRefusal, Identity, Op};
use crate::bus::hub::{ReplayBudget, Start, SubscribeError};
use crate::bus::{BusError, Hub};
use crate::config::SessionConfig;
use crate::metrics::{Metrics, Transport, TransportLabels};
use crate::outbox::Outbox;
use crate::protocol::{self, Channel, ClientFrame, Delivery, ErrorCode, Frame, Offset};

/// What a session needs from the node it runs on.
#[derive(Debug)]
pub struct SessionEnv {
    pub hub: Arc<Hub>,
    pub config: SessionConfig,
    pub metrics: Arc<Metrics>,
    /// Who may do what: asked before every subscribe and publish.
    pub gate: Arc<Gate>,
    node_id: String,
    next_session: AtomicU64,
}

impl SessionEnv {
    pub fn new(
        hub: Arc<Hub>,
        config: SessionConfig,
        metrics: Arc<Metrics>,
        gate: Arc<Gate>,
    ) -> SessionEnv {
        let node_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| format!("{:x}", d.as_millis()))
            .unwrap_or_else(|_| "0".into());
        SessionEnv {
            hub,
            config,
            metrics,
            gate,
            node_id,
            next_session: AtomicU64::new(1),
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Frames this thread's sessions decoded: lets a test see that a frame was never parsed.
    static DECODED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Publishes one session may have waiting for the bus's answer.
pub const PUBLISHES_IN_FLIGHT: usize = 256;

/// Why a subscription was refused, in the protocol's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
    /// The gate refused (rules or a hook), not the bus or a limit: how an HTTP route says it.
    pub gate: Option<GateRefusal>,
}

/// How a transport must close the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

impl CloseReason {
    pub const SLOW_CONSUMER: CloseReason = CloseReason {
        code: close::TRY_AGAIN_LATER,
        reason: "slow consumer: outbound queue full",
    };
    pub const RATE_ABUSE: CloseReason = CloseReason {
        code: close::POLICY,
        reason: "rate limit exceeded repeatedly",
    };
    pub const TOO_BIG: CloseReason = CloseReason {
        code: close::TOO_BIG,
        reason: "message too big",
    };
    pub const SHUTDOWN: CloseReason = CloseReason {
        code: close::GOING_AWAY,
        reason: "edge shutting down",
    };
    pub const IDLE: CloseReason = CloseReason {
        code: close::GOING_AWAY,
        reason: "idle timeout",
    };
    pub const INVALID_UTF8: CloseReason = CloseReason {
        code: close::INVALID_PAYLOAD,
        reason: "text frame is not valid UTF-8",
    };
    pub const PROTOCOL: CloseReason = CloseReason {
        code: close::PROTOCOL_ERROR,
        reason: "protocol error",
    };
    pub const TOKEN_EXPIRED: CloseReason = CloseReason {
        code: crate::auth::gate::TOKEN_EXPIRED,
        reason: "token expired",
    };

    /// Counts the end of a session of `transport`: `session_closes` by reason, and
    /// `slow_consumer_closes` by transport. `None`: the client went away on its own.
    pub fn count(reason: Option<&CloseReason>, transport: Transport, metrics: &Metrics) {
        let label = reason.map_or("client", CloseReason::label);
        if reason == Some(&CloseReason::SLOW_CONSUMER) {
            metrics
                .slow_consumer_closes
                .get_or_create(&TransportLabels { transport })
                .inc();
        }
        metrics
            .session_closes
            .get_or_create(&crate::metrics::ReasonLabels { reason: label })
            .inc();
    }

    /// Label for the `session_closes` metric.
    pub fn label(&self) -> &'static str {
        match self.code {
            close::TRY_AGAIN_LATER => "slow_consumer",
            close::POLICY => "policy",
            close::TOO_BIG => "too_big",
            close::PROTOCOL_ERROR | close::INVALID_PAYLOAD => "protocol_error",
            close::GOING_AWAY if self.reason == Self::IDLE.reason => "idle",
            close::GOING_AWAY => "shutdown",
            crate::auth::gate::TOKEN_EXPIRED => "token_expired",
            _ => "other",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Close(CloseReason),
}

/// The outcome of taking one message from a session's budget.
enum Charge {
    Allowed,
    /// Over the rate: refuse this message; the client may retry after the wait.
    Refused(std::time::Duration),
    /// Refused too many times in a row: close the session (1008).
    Close,
}

/// Counter handles resolved once per session so the per-frame path does no label lookups.
#[derive(Debug)]
struct SessionCounters {
    messages_in: Counter,
}

#[derive(Debug)]
pub struct Session {
    id: u64,
    public_id: Arc<str>,
    transport: Transport,
    env: Arc<SessionEnv>,
    outbox: Arc<Outbox>,
    /// Publishes of this session not answered yet, at most [`PUBLISHES_IN_FLIGHT`]: without it
    /// one session could fill the node's Redis queue that every session shares. Made at the
    /// first publish, so subscribers never pay for it.
    in_flight: Option<Arc<tokio::sync::Semaphore>>,
    subscriptions: HashSet<Channel>,
    /// Subscribed channels whose pushes go as datagrams; bounded by the subscriptions. Made for
    /// WebTransport sessions only: no other wire has datagrams, and an idle session of another
    /// should not carry the set.
    datagram_channels: Option<Arc<parking_lot::RwLock<HashSet<Channel>>>>,
    limiter: DefaultDirectRateLimiter,
    /// The session's place under its address's limits; every client message is also charged
    /// to the address.
    ticket: SessionTicket,
    refusals_in_row: u32,
    counters: SessionCounters,
    /// Who the client is: what the gate decides by.
    identity: Identity,
    /// The page's origin, for the hooks.
    origin: Option<Arc<str>>,
}

/// A session's id, known before its handshake completes so that the connect hook can name it.
#[derive(Debug, Clone)]
pub struct SessionId {
    id: u64,
    public: Arc<str>,
}

impl SessionId {
    /// What clients, logs and hooks see.
    pub fn public(&self) -> &str {
        &self.public
    }
}

impl SessionEnv {
    pub fn new_id(&self) -> SessionId {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        SessionId {
            id,
            public: format!("{}-{id}", self.node_id).into(),
        }
    }
}

/// A session that passed admission and the gate, about to open.
#[derive(Debug)]
pub struct Admitted {
    pub id: SessionId,
    /// Its place under the per-address (and per-user) limits.
    pub ticket: SessionTicket,
    pub identity: Identity,
    pub origin: Option<Arc<str>>,
}

impl Admitted {
    /// The session will not open after all (its upgrade or accept failed): a service that heard
    /// of it at connect hears that it ended, so connects and disconnects pair up.
    pub fn abandon(self, gate: &Gate, transport: Transport) {
        let asker = Asker {
            session: self.id.public(),
            transport: transport.as_str(),
            client: self.ticket.client().ip,
            origin: self.origin.as_deref(),
        };
        gate.disconnected(&self.identity, asker);
    }
}

impl Session {
    /// Opens an admitted session and queues its welcome frame.
    pub fn open(env: Arc<SessionEnv>, transport: Transport, admitted: Admitted) -> Session {
        let Admitted {
            id: SessionId {
                id,
                public: public_id,
            },
            ticket,
            identity,
            origin,
        } = admitted;
        let cfg = &env.config;
        let labels = TransportLabels { transport };
        env.metrics.sessions.get_or_create(&labels).inc();
        env.metrics.sessions_opened.get_or_create(&labels).inc();
        let counters = SessionCounters {
            messages_in: env.metrics.messages_in.get_or_create(&labels).clone(),
        };
        let outbox = Arc::new(Outbox::new(cfg.outbound_queue, cfg.outbound_queue_bytes));
        let session = Session {
            id,
            transport,
            outbox,
            in_flight: None,
            subscriptions: HashSet::new(),
            datagram_channels: (transport == Transport::webtransport).then(Arc::default),
            limiter: crate::admission::limits::direct_limiter(cfg.message_quota()),
            ticket,
            refusals_in_row: 0,
            counters,
            identity,
            origin,
            public_id,
            env,
        };
        // A fresh outbox has room for at least one frame.
        let _ = session
            .outbox
            .push(protocol::encode_welcome(&session.public_id));
        session
    }

    pub fn public_id(&self) -> &str {
        &self.public_id
    }

    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    fn leave_channels(&mut self) {
        for channel in self.subscriptions.drain() {
            self.env.hub.unsubscribe(&channel, self.id);
        }
    }

    /// What a session closing with `reason` still owes its client, to send before the close:
    /// the frames already queued (say, the refusals that explain a 1008), then the replies to its
    /// publishes still with the bus, waited for up to `bound` and not past `shutdown`. The
    /// session leaves its channels first, so no push can crowd those out of the outbox. Nothing
    /// is owed on shutdown, and a slow consumer's overflowed outbox holds nothing.
    pub async fn owed_at_close(
        &mut self,
        reason: CloseReason,
        bound: std::time::Duration,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Vec<Frame> {
        let mut owed = Vec::new();
        if reason == CloseReason::SHUTDOWN {
            return owed;
        }
        self.outbox.drain(&mut owed);
        if reason == CloseReason::SLOW_CONSUMER {
            return owed;
        }
        self.leave_channels();
        if let Some(slots) = &self.in_flight {
            // Every slot free means no publish is waiting for the bus. The semaphore is never
            // closed, so the wait only ends by this, the bound or the shutdown.
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::timeout(bound, slots.acquire_many(PUBLISHES_IN_FLIGHT as u32)) => {}
            }
        }
        self.outbox.drain(&mut owed);
        owed
    }

    pub fn config(&self) -> &SessionConfig {
        &self.env.config
    }

    /// The channels whose pushes go as datagrams (WebTransport), shared with the writer.
    pub fn datagram_channels(&self) -> Arc<parking_lot::RwLock<HashSet<Channel>>> {
        self.datagram_channels.clone().unwrap_or_default()
    }

    fn set_delivery(&self, channel: &Channel, delivery: Delivery) {
        let Some(set) = &self.datagram_channels else {
            // Not WebTransport: every push goes on the stream (a datagram subscribe was refused).
            return;
        };
        let mut set = set.write();
        match delivery {
            Delivery::Datagram => {
                set.insert(channel.clone());
            }
            Delivery::Stream => {
                set.remove(channel);
            }
        }
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The session as the hooks are told of it.
    fn asker(&self) -> Asker<'_> {
        Asker {
            session: &self.public_id,
            transport: self.transport.as_str(),
            client: self.ticket.client().ip,
            origin: self.origin.as_deref(),
        }
    }

    /// When the session's token runs out (its `exp` plus the leeway), if it has one: the
    /// transport closes the session then (4001; SSE: an `unauthorized` notice, then the end).
    pub fn expires(&self) -> Option<tokio::time::Instant> {
        let exp = self.identity.expires_at?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let until =
            std::time::Duration::from_secs(exp).saturating_sub(now) + self.env.gate.leeway();
        // A deadline beyond a day is re-read after the next frame or reload; tokio's timers
        // do not take arbitrarily far deadlines.
        Some(tokio::time::Instant::now() + until.min(std::time::Duration::from_secs(86_400)))
    }

    /// Changes when the channel rules are reloaded: the transport then calls
    /// [`Session::revalidate`].
    pub fn rules_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.env.gate.watch()
    }

    /// Waits for what the session must act on besides its client, for a transport's read loop
    /// to `select!` on next to its reads: the token running out (`Some`: close with that), or a
    /// reload of the rules (`None`, once the lost channels are left with their notices).
    /// `rules` comes from [`Session::rules_watch`], taken when the session opened.
    pub async fn identity_changed(
        &mut self,
        rules: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Option<CloseReason> {
        loop {
            tokio::select! {
                () = until(self.expires()) => {
                    if self.token_expired() {
                        return Some(CloseReason::TOKEN_EXPIRED);
                    }
                    // A deadline capped at a day, or a clock step: look again.
                }
                Ok(()) = rules.changed() => {
                    self.revalidate();
                    return None;
                }
            }
        }
    }

    /// The session's token ran out (its `exp` plus the leeway): what a transport checks when
    /// the deadline of [`Session::expires`] fires, since that one is capped at a day.
    pub fn token_expired(&self) -> bool {
        let Some(exp) = self.identity.expires_at else {
            return false;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        now >= std::time::Duration::from_secs(exp) + self.env.gate.leeway()
    }

    /// Checks every subscription against the rules in force (after a reload): a channel the
    /// session may no longer subscribe to is left, with a `forbidden` notice naming it.
    /// Returns how many were left.
    pub fn revalidate(&mut self) -> usize {
        let gate = self.env.gate.clone();
        let lost: Vec<Channel> = self
            .subscriptions
            .iter()
            .filter(|c| {
                gate.allowed(Op::Subscribe, c.as_str(), &self.identity)
                    .is_err()
            })
            .cloned()
            .collect();
        for channel in &lost {
            self.subscriptions.remove(channel);
            self.set_delivery(channel, Delivery::Stream);
            self.env.hub.unsubscribe(channel, self.id);
            self.env.metrics.error(ErrorCode::Forbidden);
            self.reply(protocol::encode_notice(
                Some(channel),
                ErrorCode::Forbidden,
                "unsubscribed: the channel rules no longer allow this channel",
            ));
        }
        if !lost.is_empty() {
            tracing::info!(session = %self.public_id, channels = lost.len(), "unsubscribed after a rules reload");
        }
        lost.len()
    }

    /// Handles one complete client frame (a WebSocket text message, a WebTransport line).
    pub async fn handle_frame(&mut self, frame: &[u8]) -> Verdict {
        self.counters.messages_in.inc();
        // Every frame counts against the budget, malformed ones included: a flood of garbage is
        // still a flood. The charge comes before any parse, so a client over its budget cannot
        // buy decoding work with the frames it is refused for; the refusal's id is read from
        // the frame's first bytes only.
        match self.charge(frame.len()) {
            Charge::Allowed => {}
            Charge::Close => return Verdict::Close(CloseReason::RATE_ABUSE),
            Charge::Refused(wait) => {
                let ms = (wait.as_millis() as u64).max(1);
                let msg = "too many messages; slow down";
                self.error(
                    protocol::peek_id(frame),
                    ErrorCode::RateLimited,
                    msg,
                    Some(ms),
                );
                return Verdict::Continue;
            }
        }
        // An oversize frame is refused unread: parsing it only to find its id would let a client
        // spend the edge's CPU on bytes it is refused for. Its id is peeked at (a bounded look),
        // so a client that writes the id first can still match the refusal to its request.
        let oversize = frame.len() > self.env.config.max_message_bytes;
        let decoded = if oversize {
            None
        } else {
            #[cfg(test)]
            DECODED.with(|d| d.set(d.get() + 1));
            Some(protocol::decode(frame))
        };
        match decoded {
            None => {
                let msg = format!(
                    "message of {} bytes is over the limit of {} bytes",
                    frame.len(),
                    self.env.config.max_message_bytes
                );
                self.error(protocol::peek_id(frame), ErrorCode::TooLarge, &msg, None);
            }
            Some(Err(e)) => self.error(e.id, e.code, &e.message, None),
            Some(Ok(frame)) => self.execute(frame).await,
        }
        Verdict::Continue
    }

    /// A wire-level control frame (a WebSocket ping, a blank WebTransport line). It gets no
    /// reply of ours, but it spends the message budget: a client flooding pings is closed like
    /// one flooding messages.
    pub fn handle_control(&mut self) -> Verdict {
        self.counters.messages_in.inc();
        match self.charge(0) {
            Charge::Close => Verdict::Close(CloseReason::RATE_ABUSE),
            Charge::Allowed | Charge::Refused(_) => Verdict::Continue,
        }
    }

    /// Takes one message of `bytes` bytes from the session's budget and then from its address's
    /// (`limits.ip_messages`, `limits.ip_bytes`). Past either, the message is refused; past
    /// `close_after_refusals` refusals in a row the session is to be closed.
    fn charge(&mut self, bytes: usize) -> Charge {
        let own = self
            .limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()));
        let result = own.and_then(|()| {
            self.ticket.charge_message(bytes).map_err(|r| match r {
                Refusal::RateLimited { retry_after } => retry_after,
                _ => std::time::Duration::from_secs(1),
            })
        });
        match result {
            Ok(()) => {
                self.refusals_in_row = 0;
                Charge::Allowed
            }
            Err(wait) => {
                self.refusals_in_row += 1;
                if self.refusals_in_row > self.env.config.close_after_refusals {
                    Charge::Close
                } else {
                    Charge::Refused(wait)
                }
            }
        }
    }

    /// A frame the wire delivered but the protocol does not carry (e.g. a WebSocket binary frame).
    pub fn handle_unsupported(&mut self, what: &str) -> Verdict {
        self.counters.messages_in.inc();
        if let Charge::Close = self.charge(0) {
            return Verdict::Close(CloseReason::RATE_ABUSE);
        }
        let msg = format!("{what}; send JSON text frames");
        self.error(None, ErrorCode::BadRequest, &msg, None);
        Verdict::Continue
    }

    /// Subscribes the session to `channel` from `start` (see [`Start`]). `first` is queued the
    /// moment the subscription turns live: the protocol's reply, or nothing for a wire that has
    /// none. Joining a channel the session holds already just queues `first`. Returns the
    /// position [`Hub::subscribe`] reports.
    pub async fn join(
        &mut self,
        channel: Channel,
        start: Start,
        first: Vec<Frame>,
    ) -> Result<Option<Offset>, JoinError> {
        if self.subscriptions.contains(&channel) {
            for f in first {
                self.reply(f);
            }
            return Ok(None);
        }
        if let Err(refusal) = self
            .env
            .gate
            .may_subscribe(&self.identity, channel.as_str(), self.asker())
            .await
        {
            return Err(JoinError::from(refusal));
        }
        if self.subscriptions.len() >= self.env.config.max_channels {
            return Err(JoinError {
                code: ErrorCode::TooLarge,
                message: format!(
                    "a session may hold at most {} channels",
                    self.env.config.max_channels
                ),
                retry_after_ms: None,
                gate: None,
            });
        }
        // A resume's replay is paid from the address's byte budget: what it may read is taken
        // before it reads (so sessions resuming together share the budget), and what it did
        // not use goes back after. A client cycling resumes is refused before it costs Redis
        // anything.
        let want = self.outbox.capacity_bytes() / 2;
        let reservation = match start {
            Start::After(_) | Start::Oldest => match self.ticket.reserve_replay(want) {
                Ok(r) => r,
                Err(refusal) => return Err(replay_refused(&refusal)),
            },
            Start::Live | Start::Newest => None,
        };
        let budget = reservation.as_ref().map(|r| ReplayBudget {
            left: r.taken,
            enough: r.enough,
        });
        let settle = |ticket: &SessionTicket, used: usize| match &reservation {
            Some(r) => ticket.settle_replay(r, used),
            None => {
                let _ = ticket.charge_bytes(used);
            }
        };
        let hub = &self.env.hub;
        match hub
            .subscribe_within(&channel, self.id, &self.outbox, first, start, budget)
            .await
        {
            Ok(joined) => {
                settle(&self.ticket, joined.replayed);
                self.subscriptions.insert(joined.channel);
                Ok(joined.position)
            }
            Err(SubscribeError::ReplayOverBudget { read }) => {
                settle(&self.ticket, read);
                let enough = budget.map_or(want, |b| b.enough);
                Err(replay_refused(&self.ticket.refuse_replay(enough)))
            }
            Err(e @ SubscribeError::ChannelTableFull(_)) => {
                settle(&self.ticket, 0);
                Err(JoinError {
                    code: ErrorCode::Unavailable,
                    message: e.to_string(),
                    retry_after_ms: None,
                    gate: None,
                })
            }
            Err(SubscribeError::BusUnavailable(why)) => {
                settle(&self.ticket, 0);
                Err(JoinError {
                    code: ErrorCode::Unavailable,
                    message: why.to_string(),
                    retry_after_ms: Some(1000),
                    gate: None,
                })
            }
        }
    }

    async fn execute(&mut self, frame: ClientFrame<'_>) {
        match frame {
            ClientFrame::Ping { id } => self.reply(protocol::encode_ok(id)),
            ClientFrame::Auth { id, token } => {
                let gate = self.env.gate.clone();
                match gate
                    .identify(Some(token))
                    .map(|t| self.identity.refreshed(t))
                {
                    Ok(Some(new)) => {
                        // The new claim replaces the old: what it no longer covers is left,
                        // with a notice, before the reply.
                        self.identity = new;
                        self.revalidate();
                        self.reply(protocol::encode_ok(id));
                    }
                    Ok(None) => self.error(
                        id,
                        ErrorCode::Unauthorized,
                        "the new token is for another user (sub); open a new session for it",
                        None,
                    ),
                    Err(refusal) => {
                        self.error(id, ErrorCode::Unauthorized, &refusal.message(), None);
                    }
                }
            }
            ClientFrame::Subscribe {
                id,
                channel,
                since,
                delivery,
            } => {
                if delivery == Delivery::Datagram && self.transport != Transport::webtransport {
                    let msg = "delivery \"datagram\" needs WebTransport; this session has a \
                               reliable stream only";
                    self.error(id, ErrorCode::BadRequest, msg, None);
                    return;
                }
                // Set first, so that pushes arriving once the subscription is live already
                // travel as asked.
                self.set_delivery(&channel, delivery);
                // The reply (and, for a resume, the replay) is queued by the hub at the moment
                // the subscription turns live, so no push can overtake it.
                let ok = protocol::encode_ok(id);
                let start = since.map_or(Start::Live, Start::After);
                if let Err(e) = self.join(channel.clone(), start, vec![ok]).await {
                    if !self.subscriptions.contains(&channel) {
                        self.set_delivery(&channel, Delivery::Stream);
                    }
                    self.error(id, e.code, &e.message, e.retry_after_ms);
                }
            }
            ClientFrame::Unsubscribe { id, channel } => {
                self.set_delivery(&channel, Delivery::Stream);
                if self.subscriptions.remove(&channel) {
                    self.env.hub.unsubscribe(&channel, self.id);
                    self.reply(protocol::encode_ok(id));
                } else {
                    let msg = format!("not subscribed to {channel}");
                    self.error(id, ErrorCode::NotSubscribed, &msg, None);
                }
            }
            ClientFrame::Publish { id, channel, data } => {
                let gate = self.env.gate.clone();
                let replaced = match gate
                    .may_publish(&self.identity, channel.as_str(), data, self.asker())
                    .await
                {
                    Ok(replaced) => replaced,
                    Err(refusal) => {
                        let code = refusal.error_code();
                        self.error(id, code, &refusal.message(), refusal.retry_after_ms());
                        return;
                    }
                };
                // The publish hook may have replaced the message.
                let data = replaced.as_deref().unwrap_or(data);
                // The reply is queued when the bus answers; meanwhile the session goes on
                // reading, so a client's publishes are pipelined (their replies keep its order).
                let slots = self
                    .in_flight
                    .get_or_insert_with(|| {
                        Arc::new(tokio::sync::Semaphore::new(PUBLISHES_IN_FLIGHT))
                    })
                    .clone();
                // Waits (and so stops reading this client) while the session is at its cap.
                let slot = slots.acquire_owned().await.ok();
                let outbox = self.outbox.clone();
                let metrics = self.env.metrics.clone();
                let public_id = self.public_id.clone();
                self.env
                    .hub
                    .publish_then(&channel, data, move |outcome| {
                        let _slot = slot;
                        let frame = match outcome {
                            Ok(()) => protocol::encode_ok(id),
                            Err(BusError::Unavailable(why)) => error_frame(
                                &metrics,
                                &public_id,
                                id,
                                ErrorCode::Unavailable,
                                why,
                                Some(1000),
                            ),
                        };
                        // A full outbox already marked the session slow; a closed one is gone.
                        let _ = outbox.push(frame);
                    })
                    .await;
            }
        }
    }

    fn reply(&self, frame: Frame) {
        // A full outbox already marked the session slow; the transport closes it.
        let _ = self.outbox.push(frame);
    }

    fn error(&self, id: Option<u64>, code: ErrorCode, message: &str, retry_after_ms: Option<u64>) {
        let frame = error_frame(
            &self.env.metrics,
            &self.public_id,
            id,
            code,
            message,
            retry_after_ms,
        );
        self.reply(frame);
    }
}

impl From<GateRefusal> for JoinError {
    fn from(r: GateRefusal) -> Self {
        JoinError {
            code: r.error_code(),
            message: r.message(),
            retry_after_ms: r.retry_after_ms(),
            gate: Some(r),
        }
    }
}

/// Resolves at `deadline`, or never without one: a session's token expiry in a `select!`.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        // Boxed: every session's read loop waits here, and most sessions (no token, or one
        // without `exp`) never have a deadline; inline, each would carry a timer for it.
        Some(d) => Box::pin(tokio::time::sleep_until(d)).await,
        None => std::future::pending().await,
    }
}

/// The reply to a resume refused for the client's byte budget.
fn replay_refused(refusal: &Refusal) -> JoinError {
    let wait = match refusal {
        Refusal::RateLimited { retry_after } => *retry_after,
        _ => std::time::Duration::from_secs(1),
    };
    JoinError {
        code: ErrorCode::RateLimited,
        message: "the replay is over this address's byte budget; retry later".into(),
        retry_after_ms: Some((wait.as_millis() as u64).max(1)),
        gate: None,
    }
}

/// An error reply, counted and logged.
fn error_frame(
    metrics: &Metrics,
    session: &impl std::fmt::Display,
    id: Option<u64>,
    code: ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
) -> Frame {
    metrics.error(code);
    // Not a field named `message`: the JSON log writes the event's own text under that key, and a
    // second `message` key made the line a duplicate-key object whose readers kept this one.
    tracing::debug!(%session, %code, detail = message, "error reply");
    protocol::encode_error(id, code, message, retry_after_ms)
}

impl Drop for Session {
    fn drop(&mut self) {
        self.outbox.close();
        self.leave_channels();
        self.env.gate.disconnected(&self.identity, self.asker());
        self.env
            .metrics
            .sessions
            .get_or_create(&TransportLabels {
                transport: self.transport,
            })
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;
    use crate::bus::memory::MemoryBus;
    use crate::config::{Config, FileConfig};
    use serde_json::Value;

    fn env(
        edit: impl FnOnce(&mut FileConfig),
    ) -> (Arc<SessionEnv>, Arc<crate::admission::Admission>) {
        env_on(Bus::Memory(MemoryBus::default()), edit)
    }

    fn env_on(
        bus: Bus,
        edit: impl FnOnce(&mut FileConfig),
    ) -> (Arc<SessionEnv>, Arc<crate::admission::Admission>) {
        let mut f = FileConfig::default();
        edit(&mut f);
        let cfg = Config::from_file_config(f).unwrap();
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(bus, 100, metrics.clone()));
        let gate = Arc::new(Gate::new(&cfg, metrics.clone()).unwrap());
        let admission = Arc::new(crate::admission::Admission::new(
            cfg.admission,
            cfg.limits,
            metrics.clone(),
        ));
        let env = Arc::new(SessionEnv::new(hub, cfg.session, metrics, gate));
        (env, admission)
    }

    fn open(e: &(Arc<SessionEnv>, Arc<crate::admission::Admission>)) -> Session {
        let client =
            e.1.client("192.0.2.1".parse().unwrap(), &http::HeaderMap::new());
        let admitted = Admitted {
            id: e.0.new_id(),
            ticket: e.1.admit_session(client).unwrap(),
            identity: Identity::default(),
            origin: None,
        };
        Session::open(e.0.clone(), Transport::websocket, admitted)
    }

    fn frames(s: &Session) -> Vec<Value> {
        let mut out = Vec::new();
        s.outbox().drain(&mut out);
        out.iter()
            .map(|f| serde_json::from_slice(f.as_bytes()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn welcome_then_replies() {
        let e = env(|_| {});
        let mut s = open(&e);
        let w = frames(&s);
        assert_eq!(w[0]["op"], "welcome");
        assert_eq!(w[0]["session"], s.public_id());
        s.handle_frame(br#"{"id":1,"op":"subscribe","channel":"a"}"#)
            .await;
        s.handle_frame(br#"{"id":2,"op":"publish","channel":"a","data":[1]}"#)
            .await;
        let f = frames(&s);
        assert_eq!(f[0], serde_json::json!({"id":1,"ok":true}));
        assert_eq!(f[1]["op"], "message");
        assert_eq!(f[2], serde_json::json!({"id":2,"ok":true}));
        drop(s);
        assert_eq!(e.0.hub.channel_count(), 0, "drop unsubscribes");
    }

    #[tokio::test]
    async fn subscription_cap_and_resume_gap() {
        let e = env(|f| f.session.max_channels = 1);
        let mut s = open(&e);
        frames(&s);
        s.handle_frame(br#"{"id":1,"op":"subscribe","channel":"a","since":"1-1"}"#)
            .await;
        s.handle_frame(br#"{"id":2,"op":"subscribe","channel":"b"}"#)
            .await;
        let f = frames(&s);
        assert_eq!(f[0]["ok"], true);
        assert_eq!(f[1], serde_json::json!({"op":"gap","channel":"a"}));
        assert_eq!(f[2]["error"]["code"], "too_large");
        assert_eq!(s.subscription_count(), 1);
    }

    #[tokio::test]
    async fn rate_limit_replies_then_closes() {
        let e = env(|f| {
            f.session.messages_per_second = 1;
            f.session.message_burst = 2;
            f.session.close_after_refusals = 3;
        });
        let mut s = open(&e);
        frames(&s);
        let mut verdicts = Vec::new();
        for i in 0..6 {
            let frame = format!(r#"{{"id":{i},"op":"ping"}}"#);
            verdicts.push(s.handle_frame(frame.as_bytes()).await);
        }
        let f = frames(&s);
        assert_eq!(f[0]["ok"], true);
        assert_eq!(f[1]["ok"], true);
        for r in &f[2..5] {
            assert_eq!(r["error"]["code"], "rate_limited");
            assert!(r["error"]["retry_after_ms"].as_u64().unwrap() > 0);
        }
        assert_eq!(f[2]["id"], 2);
        assert_eq!(verdicts[5], Verdict::Close(CloseReason::RATE_ABUSE));
    }

    #[tokio::test]
    async fn a_frame_over_the_budget_is_refused_before_it_is_decoded() {
        let e = env(|f| {
            f.session.messages_per_second = 1;
            f.session.message_burst = 1;
            f.session.close_after_refusals = 100;
        });
        let mut s = open(&e);
        frames(&s);
        s.handle_frame(br#"{"id":1,"op":"ping"}"#).await;
        let decoded = DECODED.with(|d| d.get());
        // ~60 KB of data, under `max_message_bytes`: decoding it walks every element.
        let data = format!("[{}0]", "0,".repeat(30_000));
        let id_first = format!(r#"{{"id":2,"op":"publish","channel":"a","data":{data}}}"#);
        let id_last = format!(r#"{{"channel":"a","data":{data},"id":3,"op":"publish"}}"#);
        s.handle_frame(id_first.as_bytes()).await;
        s.handle_frame(id_last.as_bytes()).await;
        assert_eq!(
            DECODED.with(|d| d.get()),
            decoded,
            "frames over the budget are refused unparsed"
        );
        let f = frames(&s);
        assert_eq!(f[0], serde_json::json!({"id": 1, "ok": true}));
        assert_eq!(f[1]["error"]["code"], "rate_limited");
        assert_eq!(
            f[1]["id"], 2,
            "an id near the start is read without a parse"
        );
        assert_eq!(f[2]["error"]["code"], "rate_limited");
        assert_eq!(
            f[2].get("id"),
            None,
            "one past PEEK_ID_BYTES is not looked for"
        );
    }

    #[tokio::test]
    async fn resumes_spend_the_address_byte_budget_on_the_embedded_bus_too() {
        let e = env(|f| {
            f.limits.ip_bytes.per_second = 1024;
            f.limits.ip_bytes.burst = 300 * 1024;
            f.session.close_message_bytes = 200 * 1024;
        });
        let data = serde_json::value::RawValue::from_string(format!("\"{}\"", "x".repeat(50_000)))
            .unwrap();
        for _ in 0..20 {
            e.0.hub
                .publish(&Channel::new("a").unwrap(), &data)
                .await
                .unwrap();
        }
        let mut s = open(&e);
        frames(&s);
        let resume = br#"{"id":1,"op":"subscribe","channel":"a","since":"0-0"}"#;
        s.handle_frame(resume).await;
        let f = frames(&s);
        assert_eq!(f[0]["ok"], true, "{}", f[0]);
        // Read within what the address has left (6 of 50 KB fit in the 300 KB burst less the
        // frame), more than enough to go on with: delivered, with a gap for the rest.
        assert_eq!(f.len(), 2 + 6, "{}", f.len());
        assert_eq!(f[1]["op"], "gap");
        s.handle_frame(br#"{"id":2,"op":"unsubscribe","channel":"a"}"#)
            .await;
        frames(&s);
        // Now what little is left does not hold the replay: refused, not cut.
        s.handle_frame(resume).await;
        let f = frames(&s);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0]["error"]["code"], "rate_limited");
        assert_eq!(s.subscription_count(), 0);
    }

    /// A window cut by its frame count is not the budget's doing: waiting would not lengthen
    /// it, so it is delivered behind a gap even with less than "enough" left.
    #[tokio::test]
    async fn a_replay_cut_by_frames_is_delivered_whatever_the_budget() {
        let e = env(|f| {
            f.session.outbound_queue = 8;
            f.limits.ip_bytes.per_second = 1024;
            f.limits.ip_bytes.burst = 200 * 1024;
            f.session.close_message_bytes = 100 * 1024;
        });
        let data = serde_json::value::RawValue::from_string("\"x\"".into()).unwrap();
        for _ in 0..20 {
            e.0.hub
                .publish(&Channel::new("a").unwrap(), &data)
                .await
                .unwrap();
        }
        let mut s = open(&e);
        frames(&s);
        // Spend the budget down to 50 KiB: less than `enough` (half the burst, 100 KiB), more
        // than the window's four frames.
        let t = *s.ticket.client();
        e.1.charge_bytes(&t, 150 * 1024).unwrap();
        let resume = br#"{"id":1,"op":"subscribe","channel":"a","since":"0-0"}"#;
        s.handle_frame(resume).await;
        let f = frames(&s);
        assert_eq!(f[0]["ok"], true, "{}", f[0]);
        assert_eq!(f[1]["op"], "gap");
        assert_eq!(f.len(), 2 + 4, "half the 8-frame queue: {f:?}");
    }

    /// What a replay did not use of its reservation goes back to the address.
    #[tokio::test]
    async fn an_unused_reservation_goes_back() {
        let e = env(|f| {
            f.limits.ip_bytes.per_second = 1;
            f.limits.ip_bytes.burst = 2 << 20;
        });
        let c = Channel::new("a").unwrap();
        let data = serde_json::value::RawValue::from_string("\"x\"".into()).unwrap();
        e.0.hub.publish(&c, &data).await.unwrap();
        let mut s = open(&e);
        frames(&s);
        let key = s.ticket.client().ip;
        let before = e.1.address_state(key)["bytes"]["available"]
            .as_u64()
            .unwrap();
        s.handle_frame(br#"{"id":1,"op":"subscribe","channel":"a","since":"0-0"}"#)
            .await;
        let after = e.1.address_state(key)["bytes"]["available"]
            .as_u64()
            .unwrap();
        let spent = before - after;
        // The frame itself, and one replayed message in the window's unit.
        assert!(spent < 200, "spent {spent} of a 512 KiB reservation");
    }

    #[tokio::test]
    async fn publishes_in_flight_per_session_are_capped() {
        let bus = Bus::Redis(crate::bus::redis::RedisBus::stalled_for_tests());
        let e = env_on(bus, |f| {
            f.admission.exempt = vec!["192.0.2.0/24".into()];
            f.session.messages_per_second = 1_000_000;
            f.session.message_burst = 1_000_000;
        });
        let mut s = open(&e);
        let publish = |i: usize| format!(r#"{{"id":{i},"op":"publish","channel":"a","data":1}}"#);
        let wait = std::time::Duration::from_millis(50);
        for i in 0..PUBLISHES_IN_FLIGHT {
            let frame = publish(i);
            tokio::time::timeout(wait, s.handle_frame(frame.as_bytes()))
                .await
                .expect("within the cap a publish is queued at once");
        }
        let frame = publish(PUBLISHES_IN_FLIGHT);
        assert!(
            tokio::time::timeout(wait, s.handle_frame(frame.as_bytes()))
                .await
                .is_err(),
            "one more waits until an earlier one is answered"
        );
    }
}
