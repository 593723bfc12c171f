//! Operator metrics, rendered as Prometheus text by the admin listener.
//!
//! Each edge instance owns its registry (no global recorder), so several edges in one test process
//! keep separate counts. Hot paths hold the counter handles they need (a `Counter` is an `Arc`
//! around an atomic) instead of looking a label set up per message.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::protocol::ErrorCode;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Transport {
    websocket,
    sse,
    webtransport,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::websocket => "websocket",
            Transport::sse => "sse",
            Transport::webtransport => "webtransport",
        }
    }
}

/// An admission check, as named in the config (`[limits.<name>]`) and in metrics.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Limit {
    origin,
    ip_new_sessions,
    ip_sessions,
    ip_messages,
    ip_bytes,
    new_sessions,
    ip_connections,
    ip_new_connections,
    ipv6_wide_connections,
    ipv6_wide_new_connections,
    user_sessions,
    user_messages,
}

impl Limit {
    pub const ALL: [Limit; 12] = [
        Limit::origin,
        Limit::ip_new_sessions,
        Limit::ip_sessions,
        Limit::ip_messages,
        Limit::ip_bytes,
        Limit::new_sessions,
        Limit::ip_connections,
        Limit::ip_new_connections,
        Limit::ipv6_wide_connections,
        Limit::ipv6_wide_new_connections,
        Limit::user_sessions,
        Limit::user_messages,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::origin => "origin",
            Limit::ip_new_sessions => "ip_new_sessions",
            Limit::ip_sessions => "ip_sessions",
            Limit::ip_messages => "ip_messages",
            Limit::ip_bytes => "ip_bytes",
            Limit::new_sessions => "new_sessions",
            Limit::ip_connections => "ip_connections",
            Limit::ip_new_connections => "ip_new_connections",
            Limit::ipv6_wide_connections => "ipv6_wide_connections",
            Limit::ipv6_wide_new_connections => "ipv6_wide_new_connections",
            Limit::user_sessions => "user_sessions",
            Limit::user_messages => "user_messages",
        }
    }
}

/// What an admission check decided. `dry_run`: over the limit, let through because the limit is
/// in dry-run mode.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Decision {
    allowed,
    refused,
    dry_run,
}

/// A Redis Cluster master, by the address the cluster gives for it (`host:port`). The cluster's
/// own topology names them, never a client; [`crate::bus::redis`] caps how many it labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

/// The outcome of a check, as a stable label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// A permission check of the channel rules: which operation, and whether it was allowed.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PermissionLabels {
    pub op: &'static str,
    pub decision: Decision,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub limit: Limit,
    pub decision: Decision,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: Transport,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// The HTTP version a request on a public listener came in: `"1.1"`, `"2"` or `"3"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: &'static str,
}

impl VersionLabels {
    pub fn of(v: http::Version) -> VersionLabels {
        let version = match v {
            http::Version::HTTP_2 => "2",
            http::Version::HTTP_3 => "3",
            http::Version::HTTP_10 => "1.0",
            _ => "1.1",
        };
        VersionLabels { version }
    }
}

// --- backend hooks ---

/// A backend hook, as named in `[hooks]` and in the service's URL.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum HookName {
    connect,
    subscribe,
    publish,
    disconnect,
}

impl HookName {
    pub const ALL: [HookName; 4] = [
        HookName::connect,
        HookName::subscribe,
        HookName::publish,
        HookName::disconnect,
    ];
}

/// How a hook call ended. `failure`: the service did not give a valid 2xx answer in time (the
/// step then follows `hooks.failure`); `overloaded`: not sent, `hooks.max_in_flight` were out.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum HookOutcome {
    allow,
    deny,
    failure,
    overloaded,
}

impl HookOutcome {
    pub const ALL: [HookOutcome; 4] = [
        HookOutcome::allow,
        HookOutcome::deny,
        HookOutcome::failure,
        HookOutcome::overloaded,
    ];
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    pub hook: HookName,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookOutcomeLabels {
    pub hook: HookName,
    pub outcome: HookOutcome,
}

/// Why a hook call failed: `timeout`, `unreachable` (connect, TLS or send), `status` (non-2xx)
/// or `answer` (too large, not the JSON expected, a user that is not allowed).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookFailureLabels {
    pub hook: HookName,
    pub reason: &'static str,
}

/// 100 µs (a local service) to 5 s (past any sane `hooks.timeout` default).
const HOOK_DURATION_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

fn hook_duration_histogram() -> Histogram {
    Histogram::new(HOOK_DURATION_BUCKETS)
}

pub type HookDurations = Family<HookLabels, Histogram, fn() -> Histogram>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sessions: Family<TransportLabels, Gauge>,
    pub sessions_opened: Family<TransportLabels, Counter>,
    pub messages_in: Family<TransportLabels, Counter>,
    pub messages_out: Family<TransportLabels, Counter>,
    pub slow_consumer_closes: Family<TransportLabels, Counter>,
    pub errors: Family<CodeLabels, Counter>,
    pub refusals: Family<ReasonLabels, Counter>,
    pub session_closes: Family<ReasonLabels, Counter>,
    /// Requests on the public listeners by HTTP version: how much comes over HTTP/3.
    pub http_requests: Family<VersionLabels, Counter>,
    pub connections: Gauge,
    pub connections_refused: Counter,
    pub admin_connections_refused: Counter,
    pub channels: Gauge,
    pub publishes: Counter,
    pub redis_connected: Gauge,
    pub redis_subscriptions: Gauge,
    pub redis_publish_errors: Counter,
    pub redis_reconnects: Counter,
    pub redis_cluster_connected: Family<NodeLabels, Gauge>,
    pub redis_cluster_subscriptions: Family<NodeLabels, Gauge>,
    pub redis_cluster_publish_errors: Family<NodeLabels, Counter>,
    pub redis_cluster_reconnects: Family<NodeLabels, Counter>,
    pub redis_bad_payloads: Counter,
    pub redis_publish_queued: Gauge,
    pub redis_publish_pipelines: Counter,
    pub redis_ping_failures: Counter,
    pub redis_ingest_overflows: Counter,
    pub redis_ingest_dropped: Counter,
    pub redis_resyncs: Counter,
    pub redis_history_evictions: Counter,
    pub redis_history_bytes: Gauge,
    pub redis_history_channels: Gauge,
    pub admission_decisions: Family<DecisionLabels, Counter>,
    pub permission_checks: Family<PermissionLabels, Counter>,
    pub tokens: Family<ResultLabels, Counter>,
    pub jwks_fetches: Family<ResultLabels, Counter>,
    pub tracked_addresses: Gauge,
    pub tracked_users: Gauge,
    pub config_reloads: Family<ReasonLabels, Counter>,
    pub hook_calls: Family<HookOutcomeLabels, Counter>,
    pub hook_failures: Family<HookFailureLabels, Counter>,
    pub hook_duration: HookDurations,
    pub hook_disconnects_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("edgeplex");
        let m = Metrics {
            sessions: Family::default(),
            sessions_opened: Family::default(),
            messages_in: Family::default(),
            messages_out: Family::default(),
            slow_consumer_closes: Family::default(),
            errors: Family::default(),
            refusals: Family::default(),
            session_closes: Family::default(),
            http_requests: Family::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            admin_connections_refused: Counter::default(),
            channels: Gauge::default(),
            publishes: Counter::default(),
            redis_connected: Gauge::default(),
            redis_subscriptions: Gauge::default(),
            redis_publish_errors: Counter::default(),
            redis_reconnects: Counter::default(),
            redis_cluster_connected: Family::default(),
            redis_cluster_subscriptions: Family::default(),
            redis_cluster_publish_errors: Family::default(),
            redis_cluster_reconnects: Family::default(),
            redis_bad_payloads: Counter::default(),
            redis_publish_queued: Gauge::default(),
            redis_publish_pipelines: Counter::default(),
            redis_ping_failures: Counter::default(),
            redis_ingest_overflows: Counter::default(),
            redis_ingest_dropped: Counter::default(),
            redis_resyncs: Counter::default(),
            redis_history_evictions: Counter::default(),
            redis_history_bytes: Gauge::default(),
            redis_history_channels: Gauge::default(),
            admission_decisions: Family::default(),
            permission_checks: Family::default(),
            tokens: Family::default(),
            jwks_fetches: Family::default(),
            tracked_addresses: Gauge::default(),
            tracked_users: Gauge::default(),
            config_reloads: Family::default(),
            hook_calls: Family::default(),
            hook_failures: Family::default(),
            hook_duration: Family::new_with_constructor(hook_duration_histogram),
            hook_disconnects_dropped: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("sessions", "Client sessions open now", m.sessions.clone());
        registry.register(
            "http_requests",
            "Requests on the public listeners, by HTTP version",
            m.http_requests.clone(),
        );
        registry.register(
            "sessions_opened",
            "Client sessions opened",
            m.sessions_opened.clone(),
        );
        registry.register(
            "messages_in",
            "Client frames received",
            m.messages_in.clone(),
        );
        registry.register(
            "messages_out",
            "Frames sent to clients (pushes and replies)",
            m.messages_out.clone(),
        );
        registry.register(
            "slow_consumer_closes",
            "Sessions closed (1013) because their outbound queue was full",
            m.slow_consumer_closes.clone(),
        );
        registry.register(
            "errors",
            "Error replies sent, by protocol error code",
            m.errors.clone(),
        );
        registry.register(
            "refusals",
            "Requests refused before a session started, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "session_closes",
            "Sessions ended, by reason",
            m.session_closes.clone(),
        );
        registry.register(
            "connections",
            "Connections open now: TCP, and QUIC for WebTransport",
            m.connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections (TCP or QUIC) refused at accept because server.max_connections was reached",
            m.connections_refused.clone(),
        );
        registry.register(
            "admin_connections_refused",
            "Admin listener connections closed at accept because server.admin_max_connections \
             was reached",
            m.admin_connections_refused.clone(),
        );
        registry.register(
            "channels",
            "Channels with local subscribers",
            m.channels.clone(),
        );
        registry.register(
            "publishes",
            "Messages published through this node",
            m.publishes.clone(),
        );
        registry.register(
            "redis_connected",
            "1 while the Redis subscriber connection is up (Redis bus only)",
            m.redis_connected.clone(),
        );
        registry.register(
            "redis_subscriptions",
            "Redis pub/sub channels this node is subscribed to",
            m.redis_subscriptions.clone(),
        );
        registry.register(
            "redis_publish_errors",
            "Publishes that Redis refused or did not answer in time",
            m.redis_publish_errors.clone(),
        );
        registry.register(
            "redis_reconnects",
            "Times the Redis subscriber connection came back after a loss",
            m.redis_reconnects.clone(),
        );
        registry.register(
            "redis_cluster_connected",
            "Redis Cluster: 1 while this node's connection to the master answers",
            m.redis_cluster_connected.clone(),
        );
        registry.register(
            "redis_cluster_subscriptions",
            "Redis Cluster: shard channels this node is subscribed to on the master",
            m.redis_cluster_subscriptions.clone(),
        );
        registry.register(
            "redis_cluster_publish_errors",
            "Redis Cluster: publishes the master refused or did not answer in time",
            m.redis_cluster_publish_errors.clone(),
        );
        registry.register(
            "redis_cluster_reconnects",
            "Redis Cluster: times this node's connection to the master was made again",
            m.redis_cluster_reconnects.clone(),
        );
        registry.register(
            "redis_bad_payloads",
            "Redis messages dropped because they were not UTF-8",
            m.redis_bad_payloads.clone(),
        );
        registry.register(
            "redis_publish_queued",
            "Publishes queued for Redis or awaiting its answer",
            m.redis_publish_queued.clone(),
        );
        registry.register(
            "redis_publish_pipelines",
            "Round trips that carried publishes to Redis; publishes per pipeline is the batching",
            m.redis_publish_pipelines.clone(),
        );
        registry.register(
            "redis_ping_failures",
            "PINGs on the Redis subscriber connection not answered in bus.redis_timeout; each \
             drops the connection, which is then restored with gap notices",
            m.redis_ping_failures.clone(),
        );
        registry.register(
            "redis_ingest_overflows",
            "Times Redis messages arrived faster than this node delivered them past the ingest \
             cap (bus.redis_ingest_queue messages or 64 MiB): from then until room returns, the \
             channels that lose messages drop them and then get a gap notice; the connection \
             stays",
            m.redis_ingest_overflows.clone(),
        );
        registry.register(
            "redis_ingest_dropped",
            "Redis messages dropped past the ingest cap; each channel that lost any got a gap \
             notice in their place",
            m.redis_ingest_dropped.clone(),
        );
        registry.register(
            "redis_resyncs",
            "Times more channels were dropped at once than the pending-unsubscribe set holds, so \
             the Redis subscriptions were compared with the whole channel table instead",
            m.redis_resyncs.clone(),
        );
        registry.register(
            "redis_history_evictions",
            "Channels whose Redis history this node's publishes dropped to keep all histories \
             within bus.history_bytes",
            m.redis_history_evictions.clone(),
        );
        registry.register(
            "redis_history_bytes",
            "Bytes all channels' Redis histories hold together, as counted against \
             bus.history_bytes at this node's last publish (Redis Cluster: summed over the \
             slots this node published to, each as of its last publish there)",
            m.redis_history_bytes.clone(),
        );
        registry.register(
            "redis_history_channels",
            "Channels with a Redis history, at this node's last publish (Redis Cluster: summed \
             over the slots this node published to)",
            m.redis_history_channels.clone(),
        );
        registry.register(
            "admission_decisions",
            "Admission checks by limit and decision (allowed, refused, or dry_run: over the \
             limit but let through)",
            m.admission_decisions.clone(),
        );
        registry.register(
            "tokens",
            "Tokens checked, by result: valid, or why one was refused (expired, bad_signature, \
             unknown_kid, algorithm, malformed, missing, no_keys, …)",
            m.tokens.clone(),
        );
        registry.register(
            "jwks_fetches",
            "Fetches of the auth.jwks URL, by result (ok; failed: unreachable or non-2xx; \
             invalid: no usable key). The last good key set stays in force after a failure.",
            m.jwks_fetches.clone(),
        );
        registry.register(
            "permission_checks",
            "Channel rule checks of subscribes and publishes, by op and decision (allowed, refused)",
            m.permission_checks.clone(),
        );
        registry.register(
            "admission_tracked_addresses",
            "Per-IP limiter entries held now (bounded by admission.max_tracked_addresses per limit)",
            m.tracked_addresses.clone(),
        );
        registry.register(
            "admission_tracked_users",
            "Per-user limiter entries held now (message budgets in use, users with sessions open; \
             bounded by admission.max_tracked_addresses and server.max_sessions)",
            m.tracked_users.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads, by result (applied, rejected)",
            m.config_reloads.clone(),
        );
        registry.register(
            "hook_calls",
            "Backend hook calls by hook and outcome (allow, deny, failure: no valid 2xx answer \
             in time, overloaded: not sent because hooks.max_in_flight were out)",
            m.hook_calls.clone(),
        );
        registry.register(
            "hook_failures",
            "Backend hook calls that failed, by hook and reason (timeout, unreachable, status, \
             answer)",
            m.hook_failures.clone(),
        );
        registry.register(
            "hook_duration_seconds",
            "Backend hook calls from send to whole answer (or failure), by hook",
            m.hook_duration.clone(),
        );
        registry.register(
            "hook_disconnects_dropped",
            "Disconnect hook calls dropped because their queue was full",
            m.hook_disconnects_dropped.clone(),
        );
        for hook in HookName::ALL {
            for outcome in HookOutcome::ALL {
                let _ = m
                    .hook_calls
                    .get_or_create(&HookOutcomeLabels { hook, outcome });
            }
        }
        for limit in Limit::ALL {
            for decision in [Decision::allowed, Decision::refused, Decision::dry_run] {
                let _ = m
                    .admission_decisions
                    .get_or_create(&DecisionLabels { limit, decision });
            }
        }
        for reason in ["applied", "rejected", "certificates_rejected"] {
            let _ = m.config_reloads.get_or_create(&ReasonLabels { reason });
        }
        // Pre-create every error code and transport so dashboards see zeros, not gaps.
        for code in ErrorCode::ALL {
            let _ = m.errors.get_or_create(&CodeLabels {
                code: code.as_str(),
            });
        }
        for t in [
            Transport::websocket,
            Transport::sse,
            Transport::webtransport,
        ] {
            let l = TransportLabels { transport: t };
            let _ = m.sessions.get_or_create(&l);
            let _ = m.messages_in.get_or_create(&l);
            let _ = m.messages_out.get_or_create(&l);
            let _ = m.slow_consumer_closes.get_or_create(&l);
        }
        Metrics { registry, ..m }
    }

    pub fn error(&self, code: ErrorCode) {
        self.errors
            .get_or_create(&CodeLabels {
                code: code.as_str(),
            })
            .inc();
    }

    pub fn refusal(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn jwks_fetch(&self, result: &'static str) {
        self.jwks_fetches
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn token(&self, result: &'static str) {
        self.tokens.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn permission(&self, op: &'static str, allowed: bool) {
        let decision = if allowed {
            Decision::allowed
        } else {
            Decision::refused
        };
        self.permission_checks
            .get_or_create(&PermissionLabels { op, decision })
            .inc();
    }

    pub fn decision(&self, limit: Limit, decision: Decision) {
        self.admission_decisions
            .get_or_create(&DecisionLabels { limit, decision })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_with_zeros() {
        let m = Metrics::new();
        m.error(ErrorCode::RateLimited);
        let text = m.render();
        assert!(
            text.contains("edgeplex_errors_total{code=\"rate_limited\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("edgeplex_errors_total{code=\"internal\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("edgeplex_sessions{transport=\"websocket\"} 0"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
