//! The live admission policy and the state behind it: origin rules, who the client is, per-IP
//! and node-wide limits, each in `enforce`, `dry-run` or `off` mode. The server asks it when it
//! accepts a connection (before TLS), transports before a session starts and before each client
//! message; it answers with a refusal or lets the client through, and counts and logs every
//! decision.
//!
//! It owns the per-IP state (bounded, see [`store`](super::store)) and the reload: a new policy
//! replaces the old at once for every later decision; a limiter whose quota did not change keeps
//! its state, one whose quota changed starts afresh. Sessions are never touched by a reload. It
//! does no I/O and knows nothing of sockets or transports.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::StateStore;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use http::HeaderMap;
use parking_lot::{Mutex, RwLock};
use serde_json::json;

use super::store::{BoundedStore, StoreKey, UserKey};
use super::{Refusal, client_ip};
use crate::config::{AdmissionConfig, CountRule, LimitMode, LimitsConfig, RateRule};
use crate::metrics::{Decision, Limit, Metrics};

/// The policy in force: what a reload replaces.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub admission: AdmissionConfig,
    pub limits: LimitsConfig,
}

impl Policy {
    /// `ip` skips the per-IP limits (`admission.exempt`).
    fn exempts(&self, ip: &IpAddr) -> bool {
        self.admission.exempt.iter().any(|n| n.contains(ip))
    }
}

/// A keyed limiter and the quota it was built with.
#[derive(Debug)]
struct Keyed<K: StoreKey = IpAddr> {
    quota: Quota,
    started: Instant,
    store: BoundedStore<K>,
    limiter: RateLimiter<K, BoundedStore<K>, MonotonicClock, NoOpMiddleware<Instant>>,
}

impl<K: StoreKey> Keyed<K> {
    fn new(rule: &RateRule, capacity: usize) -> Keyed<K> {
        let store = BoundedStore::new(capacity);
        let started = Instant::now();
        Keyed {
            quota: rule.quota(),
            started,
            limiter: RateLimiter::new(rule.quota(), store.clone(), MonotonicClock),
            store,
        }
    }

    /// `Err(wait)` when `key` may not spend `n` cells now.
    fn check(&self, key: &K, n: u32) -> Result<(), Duration> {
        let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        match self.limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(MonotonicClock.now())),
            // More than the whole burst at once: validation keeps every frame the edge reads
            // within it, so this is not reached; were it, a second later is as good an answer.
            Err(_) => Err(Duration::from_secs(1)),
        }
    }

    /// How long until `key` may spend `n` cells (at most the burst), without spending them.
    fn wait_for(&self, key: &K, n: u64) -> Duration {
        let burst = u64::from(self.quota.burst_size().get());
        let need = n.min(burst).saturating_sub(self.available(key));
        let need = u32::try_from(need).unwrap_or(u32::MAX);
        self.quota.replenish_interval().saturating_mul(need)
    }

    /// Spends up to `n` cells of `key` now, as many as it has: how many were taken.
    fn take_up_to(&self, key: &K, n: u64) -> u64 {
        // `available` and the spend are two steps; another spender in between makes the spend
        // fail, and the next round sees what is left.
        for _ in 0..4 {
            let take = n.min(self.available(key));
            if take == 0 {
                return 0;
            }
            let cells = u32::try_from(take).unwrap_or(u32::MAX);
            if self.check(key, cells).is_ok() {
                return u64::from(cells);
            }
        }
        0
    }

    /// Gives `n` cells spent by [`Keyed::take_up_to`] back to `key`, for a reservation that was
    /// not used up. GCRA keeps one number per key, the theoretical arrival time: spending `n`
    /// moved it `n` replenish intervals on, so giving them back moves it as far back. A time
    /// behind the clock means a full burst, which it never exceeds.
    fn give_back(&self, key: &K, n: u64) {
        if n == 0 {
            return;
        }
        let t = self.quota.replenish_interval().as_nanos().max(1) as u64;
        let back = n.saturating_mul(t);
        let _ = self.store.measure_and_replace(key, |tat| match tat {
            Some(tat) => Ok((
                (),
                governor::nanos::Nanos::new(tat.as_u64().saturating_sub(back)),
            )),
            // Forgotten meanwhile (evicted, or fresh again): nothing to give back to.
            None => Err(()),
        });
    }

    /// Cells `key` may spend right now, for the admin view (governor keeps only the
    /// theoretical arrival time; this turns it back into a budget).
    fn available(&self, key: &K) -> u64 {
        let burst = u64::from(self.quota.burst_size().get());
        let Some(tat) = self.store.get(key) else {
            return burst;
        };
        let t = self.quota.replenish_interval().as_nanos().max(1) as u64;
        let now = self.started.elapsed().as_nanos() as u64;
        let ahead = tat.as_u64().saturating_sub(now);
        (burst * t).saturating_sub(ahead) / t
    }
}

/// A node-wide limiter and the quota it was built with.
#[derive(Debug)]
struct Direct {
    quota: Quota,
    limiter: DefaultDirectRateLimiter,
}

impl Direct {
    fn new(rule: &RateRule) -> Direct {
        Direct {
            quota: rule.quota(),
            limiter: direct_limiter(rule.quota()),
        }
    }
}

/// A direct (unkeyed) rate limiter on the process's one clock. governor's `RateLimiter::direct`
/// builds a fresh `quanta` clock for each limiter, and `quanta::Clock::new` asks the CPU with
/// `cpuid` whether its counter can be trusted: in a virtual machine every `cpuid` traps to the
/// hypervisor, and every connection and session made one or two (a few percent of the edge's
/// CPU while WebTransport sessions opened, issue 16). The clock's calibration is process-wide in
/// `quanta` already; a copy of one clock reads the same counter.
pub fn direct_limiter(quota: Quota) -> DefaultDirectRateLimiter {
    static CLOCK: std::sync::LazyLock<DefaultClock> =
        std::sync::LazyLock::new(DefaultClock::default);
    RateLimiter::direct_with_clock(quota, CLOCK.clone())
}

/// What each key holds open now (sessions, or connections). A key is here only while it holds
/// one, so the table is bounded by the node's cap on what it counts and needs no eviction.
#[derive(Debug)]
struct OpenCounts<K = IpAddr>(Mutex<HashMap<K, u32>>);

impl<K> Default for OpenCounts<K> {
    fn default() -> Self {
        OpenCounts(Mutex::new(HashMap::new()))
    }
}

impl<K: Copy + Eq + std::hash::Hash> OpenCounts<K> {
    fn get(&self, key: &K) -> u32 {
        self.0.lock().get(key).copied().unwrap_or(0)
    }

    /// Adds one unless `max` is given and reached; returns the count before.
    fn add(&self, key: K, max: Option<u32>) -> Result<u32, u32> {
        let mut m = self.0.lock();
        let n = m.entry(key).or_insert(0);
        if max.is_some_and(|max| *n >= max) {
            let before = *n;
            if before == 0 {
                m.remove(&key);
            }
            return Err(before);
        }
        *n += 1;
        Ok(*n - 1)
    }

    fn remove(&self, key: &K) {
        let mut m = self.0.lock();
        if let Some(n) = m.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                m.remove(key);
            }
        }
    }

    fn len(&self) -> usize {
        self.0.lock().len()
    }
}

/// Refusal log lines are themselves limited, so a flood of refusals cannot flood the log; the
/// next line that gets out says how many were held back.
#[derive(Debug)]
struct LogBudget {
    limiter: DefaultDirectRateLimiter,
    suppressed: AtomicU64,
}

impl LogBudget {
    const PER_SECOND: u32 = 20;
    const BURST: u32 = 50;

    fn new() -> LogBudget {
        let quota = Quota::per_second(NonZeroU32::new(Self::PER_SECOND).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(Self::BURST).unwrap_or(NonZeroU32::MIN));
        LogBudget {
            limiter: direct_limiter(quota),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Logs one refusal unless over the log budget; says whether it did.
    fn refused(&self, limit: Limit, client: IpAddr, dry_run: bool, retry_after: Duration) -> bool {
        if self.limiter.check().is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        let retry_after_ms = retry_after.as_millis() as u64;
        if dry_run {
            tracing::info!(limit = limit.as_str(), %client, retry_after_ms, suppressed, "dry-run: would refuse");
        } else {
            tracing::info!(limit = limit.as_str(), %client, retry_after_ms, suppressed, "refused");
        }
        true
    }
}

/// A client as the limits see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The address the client came from (after trusted proxies).
    pub ip: IpAddr,
    /// The address its per-IP state is kept under (IPv6 grouped by prefix).
    pub key: IpAddr,
    /// No per-IP limit applies.
    pub exempt: bool,
}

/// The admission policy and state of one edge.
#[derive(Debug)]
pub struct Admission {
    policy: RwLock<Arc<Policy>>,
    ip_new_sessions: RwLock<Arc<Keyed>>,
    ip_messages: RwLock<Arc<Keyed>>,
    ip_bytes: RwLock<Arc<Keyed>>,
    new_sessions: RwLock<Arc<Direct>>,
    sessions: OpenCounts,
    ip_new_connections: RwLock<Arc<Keyed>>,
    ipv6_wide_new_connections: RwLock<Arc<Keyed>>,
    /// Connections open per client key, and per IPv6 wide prefix.
    connections: OpenCounts,
    wide_connections: OpenCounts,
    /// Per user (`[limits.user_sessions]`, `[limits.user_messages]`): a user has an entry only
    /// while it holds a session, or while its message budget is spent; both bounded like the
    /// per-address tables.
    user_sessions: OpenCounts<UserKey>,
    user_messages: RwLock<Arc<Keyed<UserKey>>>,
    metrics: Arc<Metrics>,
    log: LogBudget,
}

/// What a resume took of its address's byte budget before reading (see
/// [`Admission::reserve_replay`]).
#[derive(Debug)]
pub struct ReplayReservation {
    /// Bytes taken: the replay reads no more.
    pub taken: usize,
    /// A replay cut short by the budget with less than this taken is refused rather than
    /// delivered behind a gap: waiting gives the client this much.
    pub enough: usize,
    keyed: Arc<Keyed>,
}

/// A session's place under the per-IP session limit; dropping it gives the place back.
#[derive(Debug)]
pub struct SessionTicket {
    admission: Arc<Admission>,
    client: Client,
    counted: bool,
    /// The session's user, once [`Admission::admit_user`] counted it.
    user: Option<UserKey>,
}

impl SessionTicket {
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Charges one client message of `bytes` bytes to the client's address, then to its user.
    pub fn charge_message(&self, bytes: usize) -> Result<(), Refusal> {
        self.admission.charge_message(&self.client, bytes)?;
        match &self.user {
            Some(user) => self.admission.charge_user_message(&self.client, user),
            None => Ok(()),
        }
    }

    /// Counts the session under `user`'s session limit (see [`Admission::admit_user`]).
    pub fn admit_user(&mut self, user: &str) -> Result<(), Refusal> {
        let admission = self.admission.clone();
        admission.admit_user(self, user)
    }

    /// See [`Admission::reserve_replay`].
    pub fn reserve_replay(&self, want: usize) -> Result<Option<ReplayReservation>, Refusal> {
        self.admission.reserve_replay(&self.client, want)
    }

    /// See [`Admission::settle_replay`].
    pub fn settle_replay(&self, reservation: &ReplayReservation, used: usize) {
        self.admission
            .settle_replay(&self.client, reservation, used)
    }

    /// Charges `bytes` to the client's address without a message: what a resume replayed
    /// when nothing was reserved for it (counted in `dry-run`; nothing in `off` or when
    /// exempt). See [`Admission::charge_bytes`].
    pub fn charge_bytes(&self, bytes: usize) -> Result<(), Refusal> {
        self.admission.charge_bytes(&self.client, bytes)
    }

    /// See [`Admission::refuse_replay`].
    pub fn refuse_replay(&self, bytes: usize) -> Refusal {
        self.admission.refuse_replay(&self.client, bytes)
    }
}

impl Drop for SessionTicket {
    fn drop(&mut self) {
        if self.counted {
            self.admission.sessions.remove(&self.client.key);
        }
        if let Some(user) = &self.user {
            self.admission.user_sessions.remove(user);
        }
    }
}

/// A connection's place under the per-address connection caps; dropping it gives the place
/// back. The server keeps it with the connection's slot, so an upgraded session holds it too.
#[derive(Debug)]
pub struct ConnectionTicket {
    admission: Arc<Admission>,
    /// The keys counted for this connection: the client's, and its IPv6 wide prefix.
    key: Option<IpAddr>,
    wide: Option<IpAddr>,
}

impl Drop for ConnectionTicket {
    fn drop(&mut self) {
        if let Some(k) = &self.key {
            self.admission.connections.remove(k);
        }
        if let Some(k) = &self.wide {
            self.admission.wide_connections.remove(k);
        }
    }
}

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Limits whose quota changed: their state started afresh.
    pub reset: Vec<&'static str>,
}

impl Admission {
    pub fn new(admission: AdmissionConfig, limits: LimitsConfig, metrics: Arc<Metrics>) -> Self {
        let cap = admission.max_tracked_addresses;
        let a = Admission {
            ip_new_sessions: RwLock::new(Arc::new(Keyed::new(&limits.ip_new_sessions, cap))),
            ip_messages: RwLock::new(Arc::new(Keyed::new(&limits.ip_messages, cap))),
            ip_bytes: RwLock::new(Arc::new(Keyed::new(&limits.ip_bytes, cap))),
            new_sessions: RwLock::new(Arc::new(Direct::new(&limits.new_sessions))),
            ip_new_connections: RwLock::new(Arc::new(Keyed::new(&limits.ip_new_connections, cap))),
            ipv6_wide_new_connections: RwLock::new(Arc::new(Keyed::new(
                &limits.ipv6_wide_new_connections,
                cap,
            ))),
            connections: OpenCounts::default(),
            wide_connections: OpenCounts::default(),
            user_sessions: OpenCounts::default(),
            user_messages: RwLock::new(Arc::new(Keyed::new(&limits.user_messages, cap))),
            policy: RwLock::new(Arc::new(Policy { admission, limits })),
            sessions: OpenCounts::default(),
            metrics,
            log: LogBudget::new(),
        };
        a.publish_gauges();
        a
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().clone()
    }

    /// Puts a new (validated) policy in force. Limiters whose quota is unchanged keep their
    /// state; so do all of them when only modes or origins changed.
    pub fn reload(&self, admission: AdmissionConfig, limits: LimitsConfig) -> ReloadReport {
        let mut report = ReloadReport::default();
        let cap = admission.max_tracked_addresses;
        let old = self.policy();
        let cap_changed = old.admission.max_tracked_addresses != cap;
        for (name, slot, rule) in [
            (
                Limit::ip_new_sessions,
                &self.ip_new_sessions,
                &limits.ip_new_sessions,
            ),
            (Limit::ip_messages, &self.ip_messages, &limits.ip_messages),
            (Limit::ip_bytes, &self.ip_bytes, &limits.ip_bytes),
            (
                Limit::ip_new_connections,
                &self.ip_new_connections,
                &limits.ip_new_connections,
            ),
            (
                Limit::ipv6_wide_new_connections,
                &self.ipv6_wide_new_connections,
                &limits.ipv6_wide_new_connections,
            ),
        ] {
            if slot.read().quota != rule.quota() || cap_changed {
                *slot.write() = Arc::new(Keyed::new(rule, cap));
                report.reset.push(name.as_str());
            }
        }
        if self.user_messages.read().quota != limits.user_messages.quota() || cap_changed {
            *self.user_messages.write() = Arc::new(Keyed::new(&limits.user_messages, cap));
            report.reset.push(Limit::user_messages.as_str());
        }
        if self.new_sessions.read().quota != limits.new_sessions.quota() {
            *self.new_sessions.write() = Arc::new(Direct::new(&limits.new_sessions));
            report.reset.push(Limit::new_sessions.as_str());
        }
        *self.policy.write() = Arc::new(Policy { admission, limits });
        report
    }

    /// Who the client of a request from `peer` is, by the trusted-proxy rules. Pass no headers
    /// where no proxy wrote them (WebTransport, connections whose peer came from a PROXY header).
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> Client {
        let policy = self.policy();
        let a = &policy.admission;
        let ip = client_ip::resolve(peer, headers, &a.trusted_proxies, a.forwarded_header);
        Client {
            ip,
            key: client_ip::group(ip, a.ipv6_prefix),
            exempt: policy.exempts(&ip),
        }
    }

    /// Checks the `Origin` header of a request to `route` against the policy in force.
    pub fn check_origin(&self, origin: Option<&str>, route: &str) -> Result<(), Refusal> {
        let policy = self.policy();
        let result = super::check_origin(origin, policy.admission.origin_rules(route));
        let decision = if result.is_ok() {
            Decision::allowed
        } else {
            Decision::refused
        };
        self.metrics.decision(Limit::origin, decision);
        result
    }

    /// The per-address checks when a connection from `peer` is accepted, before it costs a TLS
    /// handshake: the new-connection rates, then the open-connection caps, each for the
    /// address (IPv6: its `ipv6_prefix` group) and, for IPv6, its `ipv6_wide_prefix` group.
    /// `Err` names the limit that refused.
    ///
    /// `peer_may_forward`: requests on this connection may name their client in a forwarding
    /// header (TCP without the PROXY protocol). A trusted proxy's connections then carry many
    /// clients, so they are counted under its address but not limited; its clients meet the
    /// session and message limits by the address its header gives.
    pub fn admit_connection(
        self: &Arc<Self>,
        peer: IpAddr,
        peer_may_forward: bool,
    ) -> Result<ConnectionTicket, Limit> {
        let policy = self.policy();
        let (a, limits) = (&policy.admission, &policy.limits);
        let ip = client_ip::canonical(peer);
        let client = Client {
            ip,
            key: client_ip::group(ip, a.ipv6_prefix),
            exempt: policy.exempts(&ip)
                || (peer_may_forward && a.trusted_proxies.iter().any(|n| n.contains(&ip))),
        };
        let wide = ip
            .is_ipv6()
            .then(|| client_ip::group(ip, a.ipv6_wide_prefix));
        if !client.exempt {
            let keyed = self.ip_new_connections.read().clone();
            self.rate(
                Limit::ip_new_connections,
                &limits.ip_new_connections,
                &client,
                || keyed.check(&client.key, 1),
            )
            .map_err(|_| Limit::ip_new_connections)?;
            if let Some(wide) = wide {
                let keyed = self.ipv6_wide_new_connections.read().clone();
                self.rate(
                    Limit::ipv6_wide_new_connections,
                    &limits.ipv6_wide_new_connections,
                    &client,
                    || keyed.check(&wide, 1),
                )
                .map_err(|_| Limit::ipv6_wide_new_connections)?;
            }
        }
        let mut ticket = ConnectionTicket {
            admission: self.clone(),
            key: None,
            wide: None,
        };
        self.concurrent(
            Limit::ip_connections,
            &self.connections,
            client.key,
            &limits.ip_connections,
            &client,
        )
        .map_err(|_| Limit::ip_connections)?;
        ticket.key = Some(client.key);
        if let Some(wide) = wide {
            // The ticket already gives the address's place back if this refuses.
            self.concurrent(
                Limit::ipv6_wide_connections,
                &self.wide_connections,
                wide,
                &limits.ipv6_wide_connections,
                &client,
            )
            .map_err(|_| Limit::ipv6_wide_connections)?;
            ticket.wide = Some(wide);
        }
        Ok(ticket)
    }

    /// The rate and concurrency checks before a session starts (the origin was checked, the
    /// node's session cap comes after). The ticket holds the client's place under its
    /// concurrent-session limit for as long as the session lives.
    ///
    /// The address's own limits come first, so that one address flooding past them is refused
    /// without spending the node-wide budget every other client shares.
    pub fn admit_session(self: &Arc<Self>, client: Client) -> Result<SessionTicket, Refusal> {
        let policy = self.policy();
        let limits = &policy.limits;
        let mut ticket = SessionTicket {
            admission: self.clone(),
            client,
            counted: false,
            user: None,
        };
        if !client.exempt {
            let keyed = self.ip_new_sessions.read().clone();
            self.rate(
                Limit::ip_new_sessions,
                &limits.ip_new_sessions,
                &client,
                || keyed.check(&client.key, 1),
            )?;
        }
        self.concurrent(
            Limit::ip_sessions,
            &self.sessions,
            client.key,
            &limits.ip_sessions,
            &client,
        )?;
        // From here the ticket gives the place back, also if the node-wide check refuses.
        ticket.counted = true;
        let node = self.new_sessions.read().clone();
        self.rate(Limit::new_sessions, &limits.new_sessions, &client, || {
            node.limiter
                .check()
                .map_err(|nu| nu.wait_time_from(node.limiter.clock().now()))
        })?;
        Ok(ticket)
    }

    /// Charges one client message of `bytes` bytes to `client`'s address: the message limit,
    /// then the byte limit. A stateless publish (no session) is charged the same way.
    pub fn charge_message(&self, client: &Client, bytes: usize) -> Result<(), Refusal> {
        let policy = self.policy();
        // The policy in force decides, not the one the session was admitted under.
        if policy.exempts(&client.ip) {
            return Ok(());
        }
        let limits = &policy.limits;
        let messages = self.ip_messages.read().clone();
        self.rate(Limit::ip_messages, &limits.ip_messages, client, || {
            messages.check(&client.key, 1)
        })?;
        self.bytes_of(&policy, client, bytes)
    }

    /// Counts a session of `ticket` under its user's `[limits.user_sessions]`, once its user
    /// is known (a verified token, or the connect hook's answer), before the handshake
    /// completes. The ticket gives the place back when the session ends. Exemptions are by
    /// address and do not reach users: an exempt proxy's users are still limited each.
    pub fn admit_user(&self, ticket: &mut SessionTicket, user: &str) -> Result<(), Refusal> {
        if ticket.user.is_some() {
            return Ok(());
        }
        let policy = self.policy();
        let key = UserKey::of(user);
        let not_exempt = Client {
            exempt: false,
            ..ticket.client
        };
        self.concurrent(
            Limit::user_sessions,
            &self.user_sessions,
            key,
            &policy.limits.user_sessions,
            &not_exempt,
        )?;
        ticket.user = Some(key);
        Ok(())
    }

    /// Charges one message to `user` (`[limits.user_messages]`), after its address paid.
    pub fn charge_user_message(&self, client: &Client, user: &UserKey) -> Result<(), Refusal> {
        let policy = self.policy();
        let keyed = self.user_messages.read().clone();
        self.rate(
            Limit::user_messages,
            &policy.limits.user_messages,
            client,
            || keyed.check(user, 1),
        )
    }

    /// Charges `bytes` bytes to `client`'s address (`limits.ip_bytes`) without a message: for
    /// a body whose message was charged from its request head, before it was read.
    pub fn charge_bytes(&self, client: &Client, bytes: usize) -> Result<(), Refusal> {
        let policy = self.policy();
        if policy.exempts(&client.ip) {
            return Ok(());
        }
        self.bytes_of(&policy, client, bytes)
    }

    fn bytes_of(&self, policy: &Policy, client: &Client, bytes: usize) -> Result<(), Refusal> {
        if bytes == 0 {
            return Ok(());
        }
        let n = u32::try_from(bytes).unwrap_or(u32::MAX);
        let byte_budget = self.ip_bytes.read().clone();
        self.rate(Limit::ip_bytes, &policy.limits.ip_bytes, client, || {
            byte_budget.check(&client.key, n)
        })
    }

    /// Reserves what a resume of up to `want` bytes may read of `client`'s `limits.ip_bytes`
    /// budget (its messages are charged there like the bytes it sends, since they cost Redis
    /// and the edge as much), before anything is read: as much of `want` as is left, taken at
    /// once, so sessions of one address resuming together share the budget rather than each
    /// seeing all of it. [`Admission::settle_replay`] gives back what the replay did not use.
    /// `None` when no limit holds a resume back (exempt, the limit `off` or `dry-run`: those
    /// pay with [`Admission::charge_bytes`] after). With nothing left it is refused, counted
    /// and logged, before the resume reads anything.
    pub fn reserve_replay(
        &self,
        client: &Client,
        want: usize,
    ) -> Result<Option<ReplayReservation>, Refusal> {
        let policy = self.policy();
        let rule = &policy.limits.ip_bytes;
        if rule.mode != LimitMode::Enforce || policy.exempts(&client.ip) {
            return Ok(None);
        }
        let keyed = self.ip_bytes.read().clone();
        let burst = keyed.quota.burst_size().get() as usize;
        // What is enough to wait for: `want`, at most half the burst, so that the frame that
        // asked never stands in the way.
        let enough = want.min(burst / 2).max(1);
        match keyed.take_up_to(&client.key, want as u64) {
            0 => Err(self.refuse_replay(client, enough)),
            taken => {
                self.metrics.decision(Limit::ip_bytes, Decision::allowed);
                Ok(Some(ReplayReservation {
                    taken: usize::try_from(taken).unwrap_or(usize::MAX),
                    enough,
                    keyed,
                }))
            }
        }
    }

    /// Ends a reservation: the replay used `used` bytes of it, the rest goes back to the
    /// address (to the limiter it was taken from, whatever a reload did meanwhile).
    pub fn settle_replay(&self, client: &Client, reservation: &ReplayReservation, used: usize) {
        let unused = reservation.taken.saturating_sub(used);
        reservation.keyed.give_back(&client.key, unused as u64);
    }

    /// Refuses a resume that needs `bytes` (at most the burst) and finds less left under
    /// `limits.ip_bytes` (only asked when the limit is enforced): counted and logged like any
    /// refusal, with the wait until it has them.
    pub fn refuse_replay(&self, client: &Client, bytes: usize) -> Refusal {
        let keyed = self.ip_bytes.read().clone();
        let wait = keyed.wait_for(&client.key, bytes as u64);
        let retry_after = wait.max(Duration::from_millis(1));
        self.over(Limit::ip_bytes, LimitMode::Enforce, client, wait)
            .err()
            .unwrap_or(Refusal::RateLimited { retry_after })
    }

    /// Applies one rate limit in its mode: counts, logs, and refuses only in `enforce`.
    fn rate(
        &self,
        limit: Limit,
        rule: &RateRule,
        client: &Client,
        check: impl FnOnce() -> Result<(), Duration>,
    ) -> Result<(), Refusal> {
        if rule.mode == LimitMode::Off {
            return Ok(());
        }
        match check() {
            Ok(()) => {
                self.metrics.decision(limit, Decision::allowed);
                Ok(())
            }
            Err(wait) => self.over(limit, rule.mode, client, wait),
        }
    }

    /// Counts one more of what `counts` counts (sessions, connections) under `key`, whatever
    /// the mode and even when exempt, so that a reload that turns the limit on (or ends an
    /// exemption) sees what is already open. Refuses only in `enforce` for a client that is not
    /// exempt; counts nothing when it refuses.
    fn concurrent<K: Copy + Eq + std::hash::Hash>(
        &self,
        limit: Limit,
        counts: &OpenCounts<K>,
        key: K,
        rule: &CountRule,
        client: &Client,
    ) -> Result<(), Refusal> {
        let checked = !client.exempt && rule.mode != LimitMode::Off;
        let enforce = checked && rule.mode == LimitMode::Enforce;
        let before = match counts.add(key, enforce.then_some(rule.max)) {
            Ok(before) => before,
            Err(_) => {
                return self.over(limit, rule.mode, client, Duration::from_secs(1));
            }
        };
        if !checked {
            return Ok(());
        }
        if before >= rule.max {
            // Only dry-run gets here past the limit.
            self.over(limit, rule.mode, client, Duration::from_secs(1))
        } else {
            self.metrics.decision(limit, Decision::allowed);
            Ok(())
        }
    }

    fn over(
        &self,
        limit: Limit,
        mode: LimitMode,
        client: &Client,
        wait: Duration,
    ) -> Result<(), Refusal> {
        let dry_run = mode == LimitMode::DryRun;
        self.metrics.decision(
            limit,
            if dry_run {
                Decision::dry_run
            } else {
                Decision::refused
            },
        );
        let _ = self.log.refused(limit, client.ip, dry_run, wait);
        if dry_run {
            Ok(())
        } else {
            Err(Refusal::RateLimited {
                retry_after: wait.max(Duration::from_millis(1)),
            })
        }
    }

    /// Drops per-IP state that is back to fresh, so a quiet table shrinks; the edge calls this
    /// now and then.
    pub fn housekeeping(&self) {
        for slot in self.keyed() {
            let keyed = slot.read().clone();
            keyed.limiter.retain_recent();
        }
        self.user_messages.read().clone().limiter.retain_recent();
        self.publish_gauges();
    }

    /// Every keyed limiter, for housekeeping and the count of what they hold.
    fn keyed(&self) -> [&RwLock<Arc<Keyed>>; 5] {
        [
            &self.ip_new_sessions,
            &self.ip_messages,
            &self.ip_bytes,
            &self.ip_new_connections,
            &self.ipv6_wide_new_connections,
        ]
    }

    /// Addresses with per-IP state now (each limiter's table, and the session and connection
    /// counts).
    pub fn tracked(&self) -> usize {
        self.keyed()
            .iter()
            .map(|s| s.read().limiter.len())
            .sum::<usize>()
            + self.sessions.len()
            + self.connections.len()
            + self.wide_connections.len()
    }

    /// Users with per-user state now (message budgets spent, sessions open).
    pub fn tracked_users(&self) -> usize {
        self.user_messages.read().limiter.len() + self.user_sessions.len()
    }

    fn publish_gauges(&self) {
        self.metrics.tracked_addresses.set(self.tracked() as i64);
        self.metrics.tracked_users.set(self.tracked_users() as i64);
    }

    /// What the edge knows of one address, for the admin API.
    pub fn address_state(&self, ip: IpAddr) -> serde_json::Value {
        let client = self.client(ip, &HeaderMap::new());
        let policy = self.policy();
        let l = &policy.limits;
        let rate_of = |keyed: &RwLock<Arc<Keyed>>, rule: &RateRule, key: &IpAddr| {
            let k = keyed.read().clone();
            json!({
                "mode": rule.mode,
                "per_second": rule.per_second,
                "burst": rule.burst,
                "tracked": k.store.get(key).is_some(),
                "available": k.available(key),
            })
        };
        let rate = |keyed: &RwLock<Arc<Keyed>>, rule: &RateRule| rate_of(keyed, rule, &client.key);
        let wide = client
            .ip
            .is_ipv6()
            .then(|| client_ip::group(client.ip, policy.admission.ipv6_wide_prefix));
        json!({
            "address": client.ip.to_string(),
            "key": client.key.to_string(),
            "exempt": client.exempt,
            "sessions": {
                "mode": l.ip_sessions.mode,
                "max": l.ip_sessions.max,
                "open": self.sessions.get(&client.key),
            },
            "new_sessions": rate(&self.ip_new_sessions, &l.ip_new_sessions),
            "messages": rate(&self.ip_messages, &l.ip_messages),
            "bytes": rate(&self.ip_bytes, &l.ip_bytes),
            "connections": {
                "mode": l.ip_connections.mode,
                "max": l.ip_connections.max,
                "open": self.connections.get(&client.key),
            },
            "new_connections": rate(&self.ip_new_connections, &l.ip_new_connections),
            "ipv6_wide": wide.map(|w| json!({
                "key": w.to_string(),
                "connections": {
                    "mode": l.ipv6_wide_connections.mode,
                    "max": l.ipv6_wide_connections.max,
                    "open": self.wide_connections.get(&w),
                },
                "new_connections": rate_of(
                    &self.ipv6_wide_new_connections,
                    &l.ipv6_wide_new_connections,
                    &w,
                ),
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use serde_json::Value;

    fn admission(edit: impl FnOnce(&mut crate::config::FileConfig)) -> Arc<Admission> {
        let mut f = crate::config::FileConfig::default();
        edit(&mut f);
        let c = Config::from_file_config(f).unwrap();
        Arc::new(Admission::new(
            c.admission,
            c.limits,
            Arc::new(Metrics::new()),
        ))
    }

    fn client(a: &Admission, ip: &str) -> Client {
        a.client(ip.parse().unwrap(), &HeaderMap::new())
    }

    #[test]
    fn new_sessions_per_ip_refused_past_the_burst_with_a_wait() {
        let a = admission(|f| {
            f.limits.ip_new_sessions.per_second = 1;
            f.limits.ip_new_sessions.burst = 3;
        });
        let c = client(&a, "192.0.2.1");
        let tickets: Vec<_> = (0..3).map(|_| a.admit_session(c).unwrap()).collect();
        match a.admit_session(c) {
            Err(Refusal::RateLimited { retry_after }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1))
            }
            other => panic!("{other:?}"),
        }
        assert!(a.admit_session(client(&a, "192.0.2.2")).is_ok());
        drop(tickets);
    }

    #[test]
    fn one_address_over_its_limit_does_not_spend_the_node_budget() {
        let a = admission(|f| {
            f.limits.ip_new_sessions.per_second = 1;
            f.limits.ip_new_sessions.burst = 1;
            f.limits.new_sessions.per_second = 1;
            f.limits.new_sessions.burst = 2;
        });
        let flood = client(&a, "192.0.2.66");
        let _first = a.admit_session(flood).unwrap();
        for _ in 0..100 {
            assert!(a.admit_session(flood).is_err());
        }
        let _other = a
            .admit_session(client(&a, "198.51.100.1"))
            .expect("the node budget is still there for another client");
    }

    #[test]
    fn a_node_wide_refusal_gives_the_address_its_place_back() {
        let a = admission(|f| {
            f.limits.ip_sessions.max = 1;
            f.limits.new_sessions.per_second = 1;
            f.limits.new_sessions.burst = 1;
        });
        let _t = a.admit_session(client(&a, "192.0.2.1")).unwrap();
        assert!(
            a.admit_session(client(&a, "192.0.2.2")).is_err(),
            "node budget spent"
        );
        assert_eq!(a.sessions.len(), 1, "192.0.2.2 holds no place");
    }

    #[test]
    fn a_reload_that_turns_limits_on_sees_the_sessions_already_open() {
        let a = admission(|f| {
            f.limits.ip_sessions.mode = LimitMode::Off;
            f.limits.ip_sessions.max = 2;
            f.admission.exempt = vec!["192.0.2.0/24".into()];
            f.limits.ip_messages.per_second = 1;
            f.limits.ip_messages.burst = 1;
        });
        let c = client(&a, "192.0.2.1");
        let open: Vec<_> = (0..3).map(|_| a.admit_session(c).unwrap()).collect();
        assert!(open[0].charge_message(1).is_ok());
        assert!(
            open[0].charge_message(1).is_ok(),
            "exempt: no message limit"
        );
        let mut policy = (*a.policy()).clone();
        policy.limits.ip_sessions.mode = LimitMode::Enforce;
        policy.admission.exempt.clear();
        a.reload(policy.admission, policy.limits);
        let c = client(&a, "192.0.2.1");
        assert!(
            a.admit_session(c).is_err(),
            "three open already, the limit is two"
        );
        assert!(open[0].charge_message(1).is_ok());
        assert!(
            open[0].charge_message(1).is_err(),
            "the exemption ended for open sessions too"
        );
    }

    #[test]
    fn concurrent_sessions_per_ip_come_back_when_sessions_end() {
        let a = admission(|f| f.limits.ip_sessions.max = 2);
        let c = client(&a, "192.0.2.1");
        let t1 = a.admit_session(c).unwrap();
        let _t2 = a.admit_session(c).unwrap();
        assert!(matches!(
            a.admit_session(c),
            Err(Refusal::RateLimited { .. })
        ));
        drop(t1);
        assert!(a.admit_session(c).is_ok());
    }

    #[test]
    fn ipv6_addresses_of_one_prefix_share_limits() {
        let a = admission(|f| f.limits.ip_sessions.max = 1);
        let _t = a.admit_session(client(&a, "2001:db8:0:1::1")).unwrap();
        assert!(a.admit_session(client(&a, "2001:db8:0:1::ffff")).is_err());
        assert!(a.admit_session(client(&a, "2001:db8:0:2::1")).is_ok());
    }

    #[test]
    fn dry_run_refuses_nothing_but_counts() {
        let a = admission(|f| {
            f.limits.ip_sessions.max = 1;
            f.limits.ip_sessions.mode = LimitMode::DryRun;
            f.limits.ip_messages.per_second = 1;
            f.limits.ip_messages.burst = 1;
            f.limits.ip_messages.mode = LimitMode::DryRun;
        });
        let c = client(&a, "192.0.2.1");
        let tickets: Vec<_> = (0..5).map(|_| a.admit_session(c).unwrap()).collect();
        for _ in 0..5 {
            assert!(tickets[0].charge_message(10).is_ok());
        }
        let m = a.metrics.render();
        assert!(
            m.contains(
                r#"edgeplex_admission_decisions_total{limit="ip_sessions",decision="dry_run"} 4"#
            ),
            "{m}"
        );
        assert!(
            m.contains(
                r#"edgeplex_admission_decisions_total{limit="ip_messages",decision="dry_run"} 4"#
            ),
            "{m}"
        );
        drop(tickets);
        assert_eq!(a.sessions.len(), 0, "dry-run sessions are given back too");
    }

    #[test]
    fn per_user_limits_follow_the_user_across_addresses_in_every_mode() {
        let a = admission(|f| {
            f.limits.user_sessions.max = 2;
            f.limits.user_messages.per_second = 1;
            f.limits.user_messages.burst = 3;
        });
        let from = |ip: &str| a.admit_session(client(&a, ip)).unwrap();
        let mut t1 = from("192.0.2.1");
        let mut t2 = from("198.51.100.7");
        let mut t3 = from("203.0.113.9");
        t1.admit_user("alice").unwrap();
        t2.admit_user("alice").unwrap();
        assert!(matches!(
            t3.admit_user("alice"),
            Err(Refusal::RateLimited { .. })
        ));
        t3.admit_user("bob").unwrap();
        // The message budget is alice's, whichever address spends it.
        let spent: Vec<bool> = [&t1, &t2, &t1, &t2]
            .iter()
            .map(|t| t.charge_message(1).is_ok())
            .collect();
        assert_eq!(spent, [true, true, true, false]);
        assert!(t3.charge_message(1).is_ok(), "bob has his own");
        drop(t1);
        let mut t4 = from("192.0.2.2");
        t4.admit_user("alice").unwrap();
        assert_eq!(a.user_sessions.len(), 2, "alice and bob");

        // Dry-run counts and lets through; off does not even count.
        let d = admission(|f| {
            f.limits.user_sessions.max = 1;
            f.limits.user_sessions.mode = LimitMode::DryRun;
        });
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut t = d.admit_session(client(&d, "192.0.2.1")).unwrap();
            t.admit_user("carol").unwrap();
            held.push(t);
        }
        let m = d.metrics.render();
        assert!(
            m.contains(
                r#"edgeplex_admission_decisions_total{limit="user_sessions",decision="dry_run"} 2"#
            ),
            "{m}"
        );
        drop(held);
        assert_eq!(d.user_sessions.len(), 0, "places come back in dry-run too");
    }

    #[test]
    fn the_per_user_message_table_is_bounded_under_a_spray_of_users() {
        let a = admission(|f| f.admission.max_tracked_addresses = 1024);
        let c = client(&a, "192.0.2.1");
        for i in 0..20_000 {
            let _ = a.charge_user_message(&c, &UserKey::of(&format!("user-{i}")));
        }
        let held = a.user_messages.read().limiter.len();
        assert!(held <= 1024, "{held} users tracked past the cap");
        assert!(held >= 900, "the table is used: {held}");
    }

    #[test]
    fn messages_and_bytes_are_charged_across_sessions_of_one_address() {
        let a = admission(|f| {
            f.limits.ip_messages.per_second = 1;
            f.limits.ip_messages.burst = 4;
            f.limits.ip_bytes.per_second = 1;
            f.limits.ip_bytes.burst = 100_000;
            f.session.close_message_bytes = 100_000;
        });
        let c = client(&a, "192.0.2.1");
        let s1 = a.admit_session(c).unwrap();
        let s2 = a.admit_session(c).unwrap();
        assert!(s1.charge_message(1).is_ok());
        assert!(s2.charge_message(1).is_ok());
        assert!(s1.charge_message(1).is_ok());
        assert!(s2.charge_message(1).is_ok());
        assert!(
            s1.charge_message(1).is_err(),
            "the address's budget, not a session's"
        );
        let other = a.admit_session(client(&a, "192.0.2.9")).unwrap();
        assert!(other.charge_message(99_000).is_ok());
        assert!(
            other.charge_message(2_000).is_err(),
            "bytes ran out before messages"
        );
    }

    #[test]
    fn exempt_addresses_skip_per_ip_limits() {
        let a = admission(|f| {
            f.limits.ip_sessions.max = 1;
            f.admission.exempt = vec!["10.0.0.0/8".into()];
        });
        let c = client(&a, "10.1.2.3");
        assert!(c.exempt);
        let _t: Vec<_> = (0..5).map(|_| a.admit_session(c).unwrap()).collect();
    }

    #[test]
    fn reload_keeps_state_of_unchanged_quotas_and_resets_changed_ones() {
        let a = admission(|f| {
            f.limits.ip_new_sessions.per_second = 1;
            f.limits.ip_new_sessions.burst = 1;
            f.limits.ip_messages.per_second = 1;
            f.limits.ip_messages.burst = 1;
        });
        let c = client(&a, "192.0.2.1");
        let t = a.admit_session(c).unwrap();
        assert!(t.charge_message(1).is_ok());
        assert!(t.charge_message(1).is_err());
        assert!(a.admit_session(c).is_err());
        // Same message quota, larger session burst.
        let mut policy = (*a.policy()).clone();
        policy.limits.ip_new_sessions.burst = 5;
        let report = a.reload(policy.admission.clone(), policy.limits.clone());
        assert_eq!(report.reset, vec!["ip_new_sessions"]);
        assert!(t.charge_message(1).is_err(), "the message state survived");
        assert!(
            a.admit_session(c).is_ok(),
            "the new session quota is in force"
        );
        // Switching a limit to dry-run keeps its state but stops refusing.
        policy.limits.ip_messages.mode = LimitMode::DryRun;
        let report = a.reload(policy.admission.clone(), policy.limits.clone());
        assert!(report.reset.is_empty());
        assert!(t.charge_message(1).is_ok());
    }

    #[test]
    fn refusal_log_lines_are_limited_and_count_what_they_hold_back() {
        let log = LogBudget::new();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let logged = (0..1000)
            .filter(|_| log.refused(Limit::ip_messages, ip, false, Duration::ZERO))
            .count();
        // The burst, plus at most a few refilled while the loop ran.
        assert!(
            (LogBudget::BURST as usize..LogBudget::BURST as usize + 5).contains(&logged),
            "{logged} lines"
        );
        assert_eq!(
            log.suppressed.load(Ordering::Relaxed) as usize,
            1000 - logged,
            "every line held back is counted for the next one"
        );
    }

    fn connections(edit: impl FnOnce(&mut crate::config::FileConfig)) -> Arc<Admission> {
        admission(|f| {
            f.limits.ip_new_connections.per_second = 1000;
            f.limits.ip_new_connections.burst = 1000;
            f.limits.ipv6_wide_new_connections.per_second = 1000;
            f.limits.ipv6_wide_new_connections.burst = 1000;
            edit(f)
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connection_caps_default_to_a_share_of_the_node() {
        let a = connections(|f| f.server.max_connections = 50);
        let l = &a.policy().limits;
        assert_eq!(l.ip_connections.max, 5, "a tenth");
        assert_eq!(l.ipv6_wide_connections.max, 12, "a quarter");
        let a = connections(|f| {
            f.server.max_connections = 50;
            f.limits.ip_connections.max = Some(20);
        });
        assert_eq!(
            a.policy().limits.ipv6_wide_connections.max,
            20,
            "never below the per-address cap"
        );
    }

    #[test]
    fn connections_per_address_are_capped_and_come_back() {
        let a = connections(|f| f.limits.ip_connections.max = Some(2));
        let one = a.admit_connection(ip("192.0.2.1"), false).unwrap();
        let _two = a.admit_connection(ip("::ffff:192.0.2.1"), false).unwrap();
        assert_eq!(
            a.admit_connection(ip("192.0.2.1"), false).unwrap_err(),
            Limit::ip_connections,
            "IPv4-mapped IPv6 is the same address"
        );
        let _other = a
            .admit_connection(ip("192.0.2.2"), false)
            .expect("another address has its own cap");
        drop(one);
        let _three = a.admit_connection(ip("192.0.2.1"), false).unwrap();
        assert_eq!(a.connections.len(), 2);
    }

    #[test]
    fn ipv6_connections_are_held_to_their_64_and_to_their_wide_prefix() {
        let a = connections(|f| {
            f.limits.ip_connections.max = Some(2);
            f.limits.ipv6_wide_connections.max = Some(5);
        });
        // One /64: its own cap of 2, whatever the interface ids.
        let _a: Vec<_> = ["2001:db8:1:1::1", "2001:db8:1:1::2"]
            .iter()
            .map(|s| a.admit_connection(ip(s), false).unwrap())
            .collect();
        assert_eq!(
            a.admit_connection(ip("2001:db8:1:1::ffff"), false)
                .unwrap_err(),
            Limit::ip_connections
        );
        // Other /64s of the same /48 fill its cap of 5...
        let _b: Vec<_> = ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:3::1"]
            .iter()
            .map(|s| a.admit_connection(ip(s), false).unwrap())
            .collect();
        assert_eq!(
            a.admit_connection(ip("2001:db8:1:4::1"), false)
                .unwrap_err(),
            Limit::ipv6_wide_connections,
            "a fresh /64 of a full /48"
        );
        assert_eq!(
            a.connections.get(&ip("2001:db8:1:4::")),
            0,
            "a refusal by the wide cap gives the /64's place back"
        );
        // ...and another /48 is not touched, nor IPv4.
        let _c = a.admit_connection(ip("2001:db8:2:1::1"), false).unwrap();
        let _d = a.admit_connection(ip("192.0.2.1"), false).unwrap();
        let m = a.metrics.render();
        for (limit, n) in [("ip_connections", 1), ("ipv6_wide_connections", 1)] {
            assert!(
                m.contains(&format!(
                    r#"edgeplex_admission_decisions_total{{limit="{limit}",decision="refused"}} {n}"#
                )),
                "{m}"
            );
        }
        let v = a.address_state(ip("2001:db8:1:2::9"));
        assert_eq!(v["connections"]["open"], 2);
        assert_eq!(v["ipv6_wide"]["key"], "2001:db8:1::");
        assert_eq!(v["ipv6_wide"]["connections"]["open"], 5);
        assert_eq!(a.address_state(ip("192.0.2.1"))["ipv6_wide"], Value::Null);
    }

    #[test]
    fn new_connections_are_rate_limited_per_address_and_per_wide_prefix() {
        let a = admission(|f| {
            f.limits.ip_new_connections.per_second = 1;
            f.limits.ip_new_connections.burst = 2;
            f.limits.ipv6_wide_new_connections.per_second = 1;
            f.limits.ipv6_wide_new_connections.burst = 3;
        });
        for _ in 0..2 {
            a.admit_connection(ip("192.0.2.1"), false).unwrap();
        }
        assert_eq!(
            a.admit_connection(ip("192.0.2.1"), false).unwrap_err(),
            Limit::ip_new_connections
        );
        assert!(a.admit_connection(ip("192.0.2.2"), false).is_ok());
        for s in ["2001:db8:1:1::1", "2001:db8:1:1::2", "2001:db8:1:2::1"] {
            a.admit_connection(ip(s), false).unwrap();
        }
        assert_eq!(
            a.admit_connection(ip("2001:db8:1:3::1"), false)
                .unwrap_err(),
            Limit::ipv6_wide_new_connections,
            "rotating through the /64s of one /48 does not escape the rate"
        );
        assert!(a.admit_connection(ip("2001:db8:2:1::1"), false).is_ok());
    }

    #[test]
    fn exempt_addresses_and_trusted_proxies_are_counted_but_not_limited() {
        let a = connections(|f| {
            f.limits.ip_connections.max = Some(1);
            f.admission.exempt = vec!["10.0.0.0/8".into()];
            f.admission.trusted_proxies = vec!["192.0.2.10".into()];
        });
        let _e: Vec<_> = (0..3)
            .map(|_| a.admit_connection(ip("10.1.2.3"), false).unwrap())
            .collect();
        // A trusted proxy carries many clients when its requests name them...
        let _p: Vec<_> = (0..3)
            .map(|_| a.admit_connection(ip("192.0.2.10"), true).unwrap())
            .collect();
        // ...but where the edge reads no forwarding header (QUIC, a PROXY header's own
        // source), its address is a client like any other.
        assert!(a.admit_connection(ip("192.0.2.10"), false).is_err());
        assert_eq!(
            a.connections.get(&ip("10.1.2.3")),
            3,
            "counted all the same"
        );
    }

    #[test]
    fn connection_limits_in_dry_run_and_off_refuse_nothing() {
        let a = admission(|f| {
            f.limits.ip_connections.max = Some(1);
            f.limits.ip_connections.mode = LimitMode::DryRun;
            f.limits.ip_new_connections.per_second = 1;
            f.limits.ip_new_connections.burst = 1;
            f.limits.ip_new_connections.mode = LimitMode::Off;
        });
        let held: Vec<_> = (0..3)
            .map(|_| a.admit_connection(ip("192.0.2.1"), false).unwrap())
            .collect();
        let m = a.metrics.render();
        assert!(
            m.contains(
                r#"edgeplex_admission_decisions_total{limit="ip_connections",decision="dry_run"} 2"#
            ),
            "{m}"
        );
        assert!(
            m.contains(
                r#"edgeplex_admission_decisions_total{limit="ip_new_connections",decision="allowed"} 0"#
            ),
            "off: not even checked: {m}"
        );
        drop(held);
        assert_eq!(a.connections.len(), 0);
    }

    #[test]
    fn a_reload_applies_new_connection_caps_to_what_is_open() {
        let a = connections(|f| f.limits.ip_connections.max = Some(3));
        let mut held: Vec<_> = (0..3)
            .map(|_| a.admit_connection(ip("192.0.2.1"), false).unwrap())
            .collect();
        let mut policy = (*a.policy()).clone();
        policy.limits.ip_connections.max = 2;
        policy.limits.ip_new_connections.burst = 5;
        let report = a.reload(policy.admission.clone(), policy.limits.clone());
        assert_eq!(report.reset, vec!["ip_new_connections"]);
        held.pop();
        assert!(
            a.admit_connection(ip("192.0.2.1"), false).is_err(),
            "two still open: at the new cap"
        );
        policy.limits.ip_connections.max = 4;
        a.reload(policy.admission, policy.limits);
        assert!(a.admit_connection(ip("192.0.2.1"), false).is_ok());
    }

    #[test]
    fn the_address_view_shows_what_is_spent() {
        let a = admission(|f| {
            f.limits.ip_messages.per_second = 1;
            f.limits.ip_messages.burst = 10;
        });
        let c = client(&a, "192.0.2.1");
        let t = a.admit_session(c).unwrap();
        for _ in 0..4 {
            t.charge_message(1).unwrap();
        }
        let v = a.address_state("192.0.2.1".parse().unwrap());
        assert_eq!(v["sessions"]["open"], 1);
        assert_eq!(v["messages"]["tracked"], true);
        assert_eq!(v["messages"]["available"], 6);
        assert_eq!(v["messages"]["mode"], "enforce");
        let fresh = a.address_state("198.51.100.1".parse().unwrap());
        assert_eq!(fresh["messages"]["available"], 10);
    }
}
