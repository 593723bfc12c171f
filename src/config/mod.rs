//! Configuration: loading (TOML file, then `EDGEPLEX__SECTION__KEY` environment overrides),
//! validation into typed values, and errors that name the key, where it came from and what is
//! allowed.
//!
//! This module owns the meaning of every config key. It does not open sockets or read
//! certificates; the server and the TLS module do that with the validated [`Config`].

pub mod auth;
pub mod demo;
pub mod hooks;
pub mod schema;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};

pub use auth::{AuthConfig, JwksSource};
pub use hooks::{HookFailure, HooksConfig};
pub use schema::{FileConfig, LimitMode, LogFormat};

/// Prefix of environment overrides; `__` separates section and key.
pub const ENV_PREFIX: &str = "EDGEPLEX__";

/// `server.drain_delay` at most: the longest deregistration delay load balancers offer (AWS
/// target groups: 3600 s). A node that waits longer is a node an orchestrator kills first.
pub const MAX_DRAIN_DELAY: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file or an environment variable does not fit the schema (unknown key, wrong type).
    #[error("{0}")]
    Schema(String),
    /// A value has the right type but is not allowed.
    #[error("{origin}: key `{key}`: {reason}")]
    Invalid {
        origin: String,
        key: &'static str,
        reason: String,
    },
}

/// The validated configuration the edge runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub bus: BusConfig,
    pub admin: AdminConfig,
    pub session: SessionConfig,
    pub admission: AdmissionConfig,
    pub limits: LimitsConfig,
    pub webtransport: WebTransportConfig,
    pub log: LogConfig,
    pub demo: demo::DemoConfig,
    pub hooks: HooksConfig,
    /// `[[channels]]`, compiled; reloadable like `[admission]`.
    pub channels: std::sync::Arc<crate::auth::Rules>,
    /// Token keys and required claims (`[auth]`).
    pub auth: AuthConfig,
    /// The file as loaded, environment overrides applied: what `check-config` prints.
    pub effective: FileConfig,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub listen_plain: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    /// Connections the admin listener holds at once; past it new ones are closed at accept.
    pub admin_max_connections: usize,
    pub max_connections: usize,
    pub max_sessions: usize,
    /// Node-wide cap on channels with local subscribers: the hub's table is keyed by client input.
    pub max_channels: usize,
    pub max_header_bytes: usize,
    pub handshake_timeout: Duration,
    /// An HTTP connection with no request in flight for this long is closed (HTTP/2 has no
    /// idle limit of its own; HTTP/1.1 keep-alive is also bounded by the handshake timeout).
    pub http_idle_timeout: Duration,
    /// A request body (`POST /publish`, the admin API) must arrive whole within this of its
    /// head; the body read is otherwise the one wait a client controls that nothing else ends.
    pub body_timeout: Duration,
    /// After SIGTERM, how long `/readyz` answers 503 while the listeners still accept (the load
    /// balancer's deregistration time), before sessions are closed with 1001.
    pub drain_delay: Duration,
    /// After the drain delay, how long connections and sessions have to end.
    pub shutdown_grace: Duration,
    /// How often the config file is checked for changes; zero: only on SIGHUP.
    pub config_watch: Duration,
    /// Public connections start with a PROXY protocol header from a trusted proxy.
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsConfig {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    /// Generate a self-signed certificate at start and write its PEM here.
    Dev {
        cert_path: PathBuf,
    },
}

#[derive(Clone)]
pub struct BusConfig {
    pub redis_url: Option<String>,
    /// Redis Cluster seed URLs (sharded pub/sub, see [`crate::bus::redis::cluster`]); empty
    /// unless set, and then `redis_url` is `None`.
    pub redis_cluster: Vec<String>,
    /// PEM file of the CA that signed a `rediss://` server's certificate, instead of the
    /// system's roots.
    pub redis_ca: Option<PathBuf>,
    pub channel_prefix: String,
    /// Messages kept per channel (Redis bus: up to 100 more between two trims, each exact).
    pub history_len: usize,
    pub history_ttl: Duration,
    /// Redis bus: the life of a channel's history after a publish nobody was subscribed to
    /// (never longer than `history_ttl`).
    pub history_ttl_unsubscribed: Duration,
    /// Bytes all channel histories may hold together (embedded bus: per node; Redis bus: in
    /// Redis, for all nodes).
    pub history_bytes: usize,
    /// Redis bus: bytes one channel's history may hold, at most (its oldest messages are
    /// trimmed past it), so no channel can take the budget from the others.
    pub history_channel_bytes: usize,
    pub redis_timeout: Duration,
    /// PING on the Redis subscriber connection this often; no answer within `redis_timeout`
    /// and the connection is taken for dead.
    pub redis_ping_interval: Duration,
    /// Redis messages received and not yet delivered, at most; past it what does not fit is
    /// dropped and the channels that lost messages get gap notices.
    pub redis_ingest_queue: usize,
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The Redis URL may carry a password.
        f.debug_struct("BusConfig")
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<set>"))
            .field("redis_cluster", &self.redis_cluster.len())
            .field("redis_ca", &self.redis_ca)
            .field("channel_prefix", &self.channel_prefix)
            .field("history_len", &self.history_len)
            .field("history_ttl", &self.history_ttl)
            .field("history_ttl_unsubscribed", &self.history_ttl_unsubscribed)
            .field("history_bytes", &self.history_bytes)
            .field("history_channel_bytes", &self.history_channel_bytes)
            .field("redis_timeout", &self.redis_timeout)
            .field("redis_ping_interval", &self.redis_ping_interval)
            .field("redis_ingest_queue", &self.redis_ingest_queue)
            .finish()
    }
}

#[derive(Clone, Default)]
pub struct AdminConfig {
    pub api_key: Option<String>,
}

impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub outbound_queue: usize,
    pub outbound_queue_bytes: usize,
    pub max_message_bytes: usize,
    pub close_message_bytes: usize,
    pub max_channels: usize,
    pub messages_per_second: u32,
    pub message_burst: u32,
    pub close_after_refusals: u32,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// A write to the client that takes longer than this ends the session: the client has
    /// stopped reading and its queue would only grow.
    pub write_timeout: Duration,
    /// SSE: a comment line this often keeps proxies from closing a quiet stream.
    pub sse_heartbeat: Duration,
    /// SSE: the `retry:` hint, how long EventSource waits before reconnecting.
    pub sse_retry: Duration,
    pub read_buffer_bytes: usize,
    pub write_buffer_bytes: usize,
}

impl SessionConfig {
    /// A client's message budget: `messages_per_second` after a burst of `message_burst`. A
    /// WebSocket session and an HTTP connection's publishes each get one.
    pub fn message_quota(&self) -> governor::Quota {
        // Validation keeps both at 1 or more.
        let per_second = std::num::NonZeroU32::new(self.messages_per_second)
            .unwrap_or(std::num::NonZeroU32::MIN);
        let burst =
            std::num::NonZeroU32::new(self.message_burst).unwrap_or(std::num::NonZeroU32::MIN);
        governor::Quota::per_second(per_second).allow_burst(burst)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    /// The origin rules of every route without rules of its own.
    pub origins: OriginRules,
    /// Peers whose forwarding header is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The one forwarding header they write.
    pub forwarded_header: crate::admission::client_ip::ForwardedHeader,
    /// IPv6 clients share per-IP state per prefix of this many bits.
    pub ipv6_prefix: u8,
    /// The connection limits also hold IPv6 clients to a wider prefix of this many bits (at most
    /// `ipv6_prefix`), which has its own, larger caps.
    pub ipv6_wide_prefix: u8,
    /// Clients no per-IP limit applies to.
    pub exempt: Vec<ipnet::IpNet>,
    pub max_tracked_addresses: usize,
    /// Routes with origin rules of their own (`websocket`, `sse`, `publish`, `webtransport`).
    pub routes: std::collections::BTreeMap<String, OriginRules>,
}

/// The origin rules of one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginRules {
    /// `None`: any origin is allowed (the list held `"*"`).
    pub allowed_origins: Option<Vec<String>>,
    pub allow_missing_origin: bool,
}

impl OriginRules {
    /// What they allow, for `check-config`.
    fn describe(&self) -> String {
        match &self.allowed_origins {
            None => "any".to_string(),
            Some(list) => format!(
                "{}; requests without Origin {}",
                if list.is_empty() {
                    "none".to_string()
                } else {
                    list.join(", ")
                },
                if self.allow_missing_origin {
                    "allowed"
                } else {
                    "refused"
                }
            ),
        }
    }
}

impl AdmissionConfig {
    /// The origin rules in force for `route`.
    pub fn origin_rules(&self, route: &str) -> &OriginRules {
        self.routes.get(route).unwrap_or(&self.origins)
    }
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            origins: OriginRules {
                allowed_origins: None,
                allow_missing_origin: true,
            },
            trusted_proxies: Vec::new(),
            forwarded_header: Default::default(),
            ipv6_prefix: schema::DEFAULT_IPV6_PREFIX,
            ipv6_wide_prefix: schema::DEFAULT_IPV6_WIDE_PREFIX,
            exempt: Vec::new(),
            max_tracked_addresses: schema::DEFAULT_MAX_TRACKED_ADDRESSES,
            routes: std::collections::BTreeMap::new(),
        }
    }
}

/// A validated rate limit: `per_second` after a burst of `burst`, both at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateRule {
    pub mode: LimitMode,
    pub per_second: u32,
    pub burst: u32,
}

impl RateRule {
    pub fn quota(&self) -> governor::Quota {
        let n = |v: u32| std::num::NonZeroU32::new(v).unwrap_or(std::num::NonZeroU32::MIN);
        governor::Quota::per_second(n(self.per_second)).allow_burst(n(self.burst))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountRule {
    pub mode: LimitMode,
    pub max: u32,
}

/// The per-IP and node-wide limits (`[limits]`); reloadable with `[admission]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    pub ip_new_sessions: RateRule,
    pub ip_sessions: CountRule,
    pub ip_messages: RateRule,
    pub ip_bytes: RateRule,
    pub new_sessions: RateRule,
    /// Connections open at once per client address (IPv6: per `ipv6_prefix`), checked at
    /// accept.
    pub ip_connections: CountRule,
    /// New connections per client address, checked at accept.
    pub ip_new_connections: RateRule,
    /// Connections open at once per IPv6 `ipv6_wide_prefix`.
    pub ipv6_wide_connections: CountRule,
    /// New connections per IPv6 `ipv6_wide_prefix`.
    pub ipv6_wide_new_connections: RateRule,
    /// Sessions open at once per user (a token's `sub`, or the connect hook's `user`).
    pub user_sessions: CountRule,
    /// Messages per user, across its sessions.
    pub user_messages: RateRule,
}

/// The connection caps of `[limits.ip_connections]` and `[limits.ipv6_wide_connections]` on a
/// node of `max_connections`: a cap left unset is its share of the node (at least 1, and the
/// wide one at least the per-address one).
fn connection_caps(file: &schema::LimitsSection, max_connections: usize) -> (CountRule, CountRule) {
    let share = |d: usize| {
        u32::try_from(max_connections / d)
            .unwrap_or(u32::MAX)
            .max(1)
    };
    let ip = file
        .ip_connections
        .max
        .unwrap_or_else(|| share(schema::DEFAULT_IP_CONNECTIONS_SHARE));
    let wide = file
        .ipv6_wide_connections
        .max
        .unwrap_or_else(|| share(schema::DEFAULT_IPV6_WIDE_CONNECTIONS_SHARE).max(ip));
    (
        CountRule {
            mode: file.ip_connections.mode,
            max: ip,
        },
        CountRule {
            mode: file.ipv6_wide_connections.mode,
            max: wide,
        },
    )
}

/// WebTransport over HTTP/3 on the UDP port of `server.listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebTransportConfig {
    pub enabled: bool,
    pub validate_address: AddressValidation,
}

/// When a new QUIC client must prove its address with a Retry round trip (RFC 9000 §8.1)
/// before the edge starts a handshake with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressValidation {
    /// Every new address.
    Always,
    /// Only while `max_unvalidated` handshakes from unproven addresses are already under way.
    /// Below that the handshake itself proves the address (the client's Handshake packet answers
    /// what the edge sent there), and the address is charged to its connection limits only then.
    UnderLoad { max_unvalidated: usize },
    /// Never: the source address is taken as given, and charged at once.
    Never,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

impl Config {
    /// Loads `path`, applies `EDGEPLEX__*` variables from the process environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        // Read once up front so a missing or unreadable file is its own clear error.
        std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed(ENV_PREFIX).split("__"));
        Self::from_figment(figment, Some(path))
    }

    /// Parses and validates TOML text, without environment overrides; errors name `name` as
    /// the file. For embedders that keep their config elsewhere, and for the config fuzzer.
    pub fn from_toml_str(text: &str, name: &str) -> Result<Config, ConfigError> {
        Self::from_figment(
            Figment::new().merge(Toml::string(text)),
            Some(Path::new(name)),
        )
    }

    /// Built-in defaults with environment overrides, no file.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_figment(
            Figment::new().merge(Env::prefixed(ENV_PREFIX).split("__")),
            None,
        )
    }

    /// The limits of this config on a node that runs with `running` (a reload does not change
    /// `server.max_connections`, so the connection caps that follow it follow the running one).
    pub fn limits_under(&self, running: &ServerConfig) -> LimitsConfig {
        let (ip_connections, ipv6_wide_connections) =
            connection_caps(&self.effective.limits, running.max_connections);
        LimitsConfig {
            ip_connections,
            ipv6_wide_connections,
            ..self.limits.clone()
        }
    }

    /// Validates a file config that did not come from a file (tests and embedders).
    pub fn from_file_config(file: FileConfig) -> Result<Config, ConfigError> {
        validate(file, &|_| "config".to_string())
    }

    fn from_figment(figment: Figment, file: Option<&Path>) -> Result<Config, ConfigError> {
        let parsed: FileConfig = figment
            .extract()
            .map_err(|e| ConfigError::Schema(describe_figment_error(e, file)))?;
        // A key that no source set still belongs to the file the operator is editing.
        let origin = |key: &str| match (figment.find_metadata(key), file) {
            (Some(md), _) => describe_source(md, key, file),
            (None, Some(path)) => format!("{} (key not set, default used)", path.display()),
            (None, None) => "built-in default".to_string(),
        };
        let file = parsed;
        validate(file, &origin)
    }
}

/// Where a key's value came from: its file, its environment variable, or (for TOML given as a
/// string) the name the caller gave it.
fn describe_source(md: &figment::Metadata, key: &str, file: Option<&Path>) -> String {
    if let Some(figment::Source::File(path)) = &md.source {
        return path.display().to_string();
    }
    if md.name.contains("environment") {
        format!("environment variable {}", env_var_name(key))
    } else {
        file.map_or_else(|| md.name.to_string(), |p| p.display().to_string())
    }
}

/// `session.max_channels` → `EDGEPLEX__SESSION__MAX_CHANNELS`.
pub fn env_var_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

fn describe_figment_error(err: figment::Error, file: Option<&Path>) -> String {
    err.into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let origin = match (&e.metadata, file) {
                (Some(md), _) if !key.is_empty() => describe_source(md, &key, file),
                (
                    Some(figment::Metadata {
                        source: Some(figment::Source::File(p)),
                        ..
                    }),
                    _,
                ) => p.display().to_string(),
                (_, Some(p)) => p.display().to_string(),
                (Some(md), None) => md.name.to_string(),
                (None, None) => "config".to_string(),
            };
            let kind = match &e.kind {
                figment::error::Kind::UnknownField(field, allowed) => {
                    format!(
                        "unknown key `{field}`; allowed keys here are: {}",
                        allowed.join(", ")
                    )
                }
                other => other.to_string(),
            };
            if key.is_empty() {
                format!("{origin}: {kind}")
            } else {
                format!("{origin}: key `{key}`: {kind}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `allowed_origins` key of a route's own origin rules, or `None` for a route that cannot
/// have any.
fn route_origins_key(route: &str) -> Option<&'static str> {
    Some(match route {
        "websocket" => "admission.routes.websocket.allowed_origins",
        "sse" => "admission.routes.sse.allowed_origins",
        "publish" => "admission.routes.publish.allowed_origins",
        "webtransport" => "admission.routes.webtransport.allowed_origins",
        _ => return None,
    })
}

/// Turns the file structs into the validated [`Config`]. `origin` names where a key's value came
/// from (file, environment variable or default) for the error.
fn validate(file: FileConfig, origin: &dyn Fn(&str) -> String) -> Result<Config, ConfigError> {
    let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
        origin: origin(key),
        key,
        reason,
    };
    let addr = |key: &'static str,
                v: &str,
                optional: bool|
     -> Result<Option<SocketAddr>, ConfigError> {
        if v.is_empty() && optional {
            return Ok(None);
        }
        v.parse::<SocketAddr>().map(Some).map_err(|_| {
            invalid(
                key,
                format!(
                    "{v:?} is not an address; write IP:PORT such as \"127.0.0.1:8443\" or \"[::1]:8443\"{}",
                    if optional { ", or \"\" to turn it off" } else { "" }
                ),
            )
        })
    };
    let range = |key: &'static str, v: usize, lo: usize, hi: usize| {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(invalid(
                key,
                format!("{v} is out of range; allowed is {lo} to {hi}"),
            ))
        }
    };
    // Durations have a ceiling too: a day is longer than any sane timeout, and far-future
    // deadlines overflow timer arithmetic.
    let min_duration = |key: &'static str, v: Duration, lo: Duration| {
        const CEILING: Duration = Duration::from_secs(24 * 3600);
        if v > CEILING {
            Err(invalid(
                key,
                format!("{} is too long; at most 24h", humantime::format_duration(v)),
            ))
        } else if v >= lo {
            Ok(v)
        } else {
            Err(invalid(
                key,
                format!(
                    "{} is too short; it must be at least {}",
                    humantime::format_duration(v),
                    humantime::format_duration(lo)
                ),
            ))
        }
    };
    let max_duration = |key: &'static str, v: Duration, hi: Duration| {
        if v <= hi {
            Ok(v)
        } else {
            Err(invalid(
                key,
                format!(
                    "{} is too long; at most {}",
                    humantime::format_duration(v),
                    humantime::format_duration(hi)
                ),
            ))
        }
    };

    let s = &file.server;
    let server = ServerConfig {
        listen: addr("server.listen", &s.listen, false)?.expect("not optional"),
        listen_plain: addr("server.listen_plain", &s.listen_plain, true)?,
        admin_listen: addr("server.admin_listen", &s.admin_listen, true)?,
        admin_max_connections: range(
            "server.admin_max_connections",
            s.admin_max_connections,
            1,
            100_000,
        )?,
        max_connections: range("server.max_connections", s.max_connections, 1, 10_000_000)?,
        max_sessions: range("server.max_sessions", s.max_sessions, 1, 10_000_000)?,
        max_channels: range("server.max_channels", s.max_channels, 1, 100_000_000)?,
        // hyper refuses a read buffer under 8 KiB.
        max_header_bytes: range("server.max_header_bytes", s.max_header_bytes, 8192, 1 << 20)?,
        handshake_timeout: min_duration(
            "server.handshake_timeout",
            s.handshake_timeout,
            Duration::from_millis(100),
        )?,
        http_idle_timeout: min_duration(
            "server.http_idle_timeout",
            s.http_idle_timeout,
            Duration::from_millis(100),
        )?,
        body_timeout: min_duration(
            "server.body_timeout",
            s.body_timeout,
            Duration::from_millis(100),
        )?,
        drain_delay: max_duration("server.drain_delay", s.drain_delay, MAX_DRAIN_DELAY)?,
        shutdown_grace: min_duration("server.shutdown_grace", s.shutdown_grace, Duration::ZERO)?,
        proxy_protocol: s.proxy_protocol,
        config_watch: if s.config_watch.is_zero() {
            Duration::ZERO
        } else {
            min_duration(
                "server.config_watch",
                s.config_watch,
                Duration::from_millis(100),
            )?
        },
    };

    let t = &file.tls;
    let tls = match (t.cert.is_empty(), t.key.is_empty()) {
        (true, true) => {
            if t.dev_cert_path.is_empty() {
                return Err(invalid(
                    "tls.dev_cert_path",
                    "is empty; with no tls.cert and tls.key a dev certificate is made and its PEM \
                     must be written somewhere"
                        .into(),
                ));
            }
            TlsConfig::Dev {
                cert_path: PathBuf::from(&t.dev_cert_path),
            }
        }
        (false, false) => TlsConfig::Files {
            cert: PathBuf::from(&t.cert),
            key: PathBuf::from(&t.key),
        },
        (true, false) => {
            return Err(invalid(
                "tls.cert",
                "is empty while tls.key is set; set both PEM paths, or neither for a dev certificate"
                    .into(),
            ));
        }
        (false, true) => {
            return Err(invalid(
                "tls.key",
                "is empty while tls.cert is set; set both PEM paths, or neither for a dev certificate"
                    .into(),
            ));
        }
    };

    let b = &file.bus;
    let redis_url = if b.redis_url.is_empty() {
        None
    } else if !(b.redis_url.starts_with("redis://") || b.redis_url.starts_with("rediss://")) {
        return Err(invalid(
            "bus.redis_url",
            "must start with redis:// or rediss://, or be \"\" for the embedded bus".into(),
        ));
    } else if let Err(e) = redis::Client::open(b.redis_url.as_str()) {
        // The URL itself is not echoed: it may hold a password.
        return Err(invalid(
            "bus.redis_url",
            format!(
                "is not a usable Redis URL ({:?}); the form is \
                 redis[s]://[user[:password]@]host[:port][/db]",
                e.kind()
            ),
        ));
    } else {
        Some(b.redis_url.clone())
    };
    let redis_cluster =
        redis_cluster_seeds(b, redis_url.is_some()).map_err(|(k, why)| invalid(k, why))?;
    if !redis_cluster.is_empty() && b.channel_prefix.contains(['{', '}']) {
        // `<prefix>{C}` must hash on C: a brace in the prefix would make its own hash tag.
        return Err(invalid(
            "bus.channel_prefix",
            "must not hold { or } with bus.redis_cluster (Redis Cluster hash tags)".into(),
        ));
    }
    if b.channel_prefix.len() > 64 || b.channel_prefix.chars().any(|c| c.is_whitespace()) {
        return Err(invalid(
            "bus.channel_prefix",
            "must be at most 64 characters without whitespace".into(),
        ));
    }
    // The CA is for a TLS Redis: one, or a cluster whose seeds are rediss:// (it is trusted
    // for every node they lead to).
    let tls_redis = match &redis_url {
        Some(url) => url.starts_with("rediss://"),
        None => redis_cluster.iter().any(|s| s.starts_with("rediss://")),
    };
    let redis_ca = match (b.redis_ca.is_empty(), tls_redis) {
        (true, _) => None,
        (false, true) => Some(PathBuf::from(&b.redis_ca)),
        (false, false) => {
            return Err(invalid(
                "bus.redis_ca",
                "is set but neither bus.redis_url nor a bus.redis_cluster seed is a rediss:// \
                 (TLS) URL; set both or neither"
                    .into(),
            ));
        }
    };
    let history_ttl = min_duration("bus.history_ttl", b.history_ttl, Duration::from_secs(1))?;
    let history_bytes = range("bus.history_bytes", b.history_bytes, 0, 1 << 40)?;
    let history_channel_bytes = match b.history_channel_bytes {
        None => (history_bytes / schema::DEFAULT_HISTORY_CHANNEL_SHARE)
            .max(schema::MIN_DEFAULT_HISTORY_CHANNEL_BYTES.min(history_bytes)),
        Some(v) if v <= history_bytes => v,
        Some(v) => {
            return Err(invalid(
                "bus.history_channel_bytes",
                format!(
                    "{v} is more than bus.history_bytes ({history_bytes}), all channels' \
                     histories together; allowed is 0 to {history_bytes}"
                ),
            ));
        }
    };
    let bus = BusConfig {
        redis_url,
        redis_cluster,
        redis_ca,
        channel_prefix: b.channel_prefix.clone(),
        history_len: range("bus.history_len", b.history_len, 1, 10_000_000)?,
        history_ttl,
        // Longer than `history_ttl` would mean nothing: a heard channel never lives longer. Cut
        // to it rather than refused, so a short `history_ttl` needs no second edit.
        history_ttl_unsubscribed: min_duration(
            "bus.history_ttl_unsubscribed",
            b.history_ttl_unsubscribed,
            Duration::from_secs(1),
        )?
        .min(history_ttl),
        history_bytes,
        history_channel_bytes,
        redis_timeout: min_duration(
            "bus.redis_timeout",
            b.redis_timeout,
            Duration::from_millis(10),
        )?,
        redis_ping_interval: min_duration(
            "bus.redis_ping_interval",
            b.redis_ping_interval,
            Duration::from_millis(100),
        )?,
        redis_ingest_queue: range("bus.redis_ingest_queue", b.redis_ingest_queue, 1, 1 << 24)?,
    };
    let admin = AdminConfig {
        api_key: match file.admin.api_key.as_str() {
            "" => None,
            k if k.len() < 16 => {
                return Err(invalid(
                    "admin.api_key",
                    "is shorter than 16 characters; use a long random token, or \"\" to turn \
                     the publish API off"
                        .into(),
                ));
            }
            k => Some(k.to_string()),
        },
    };

    let ss = &file.session;
    let max_message_bytes = range(
        "session.max_message_bytes",
        ss.max_message_bytes,
        64,
        16 << 20,
    )?;
    let close_message_bytes = range(
        "session.close_message_bytes",
        ss.close_message_bytes,
        64,
        64 << 20,
    )?;
    if close_message_bytes < max_message_bytes {
        return Err(invalid(
            "session.close_message_bytes",
            format!(
                "{close_message_bytes} is below session.max_message_bytes ({max_message_bytes}); \
                 it must be at least that"
            ),
        ));
    }
    let ping_interval = min_duration(
        "session.ping_interval",
        ss.ping_interval,
        Duration::from_millis(100),
    )?;
    let idle_timeout = min_duration(
        "session.idle_timeout",
        ss.idle_timeout,
        Duration::from_millis(100),
    )?;
    if idle_timeout <= ping_interval {
        return Err(invalid(
            "session.idle_timeout",
            format!(
                "{} must be longer than session.ping_interval ({}) so a live client can answer a ping",
                humantime::format_duration(ss.idle_timeout),
                humantime::format_duration(ping_interval)
            ),
        ));
    }
    let session = SessionConfig {
        outbound_queue: range("session.outbound_queue", ss.outbound_queue, 1, 1_000_000)?,
        outbound_queue_bytes: range(
            "session.outbound_queue_bytes",
            ss.outbound_queue_bytes,
            1024,
            1 << 30,
        )?,
        max_message_bytes,
        close_message_bytes,
        max_channels: range("session.max_channels", ss.max_channels, 1, 100_000)?,
        messages_per_second: range(
            "session.messages_per_second",
            ss.messages_per_second as usize,
            1,
            1_000_000,
        )? as u32,
        message_burst: range(
            "session.message_burst",
            ss.message_burst as usize,
            1,
            1_000_000,
        )? as u32,
        close_after_refusals: range(
            "session.close_after_refusals",
            ss.close_after_refusals as usize,
            1,
            1_000_000,
        )? as u32,
        ping_interval,
        idle_timeout,
        write_timeout: min_duration(
            "session.write_timeout",
            ss.write_timeout,
            Duration::from_millis(100),
        )?,
        sse_heartbeat: min_duration(
            "session.sse_heartbeat",
            ss.sse_heartbeat,
            Duration::from_millis(100),
        )?,
        sse_retry: min_duration("session.sse_retry", ss.sse_retry, Duration::ZERO)?,
        read_buffer_bytes: range(
            "session.read_buffer_bytes",
            ss.read_buffer_bytes,
            256,
            1 << 20,
        )?,
        write_buffer_bytes: range(
            "session.write_buffer_bytes",
            ss.write_buffer_bytes,
            0,
            16 << 20,
        )?,
    };

    let a = &file.admission;
    let origins =
        |key: &'static str, list: &[String]| -> Result<Option<Vec<String>>, ConfigError> {
            if list.iter().any(|o| o == "*") {
                return Ok(None);
            }
            for o in list {
                if let Err(reason) = crate::admission::origin::validate_rule(o) {
                    return Err(invalid(key, format!("{o:?}: {reason}")));
                }
            }
            Ok(Some(list.iter().map(|o| o.to_ascii_lowercase()).collect()))
        };
    let allowed_origins = origins("admission.allowed_origins", &a.allowed_origins)?;
    let mut routes = std::collections::BTreeMap::new();
    for (route, r) in &a.routes {
        let Some(key_origins) = route_origins_key(route) else {
            return Err(invalid(
                "admission.routes",
                format!(
                    "no route {route:?}; routes with origin rules of their own are: {}",
                    schema::ORIGIN_ROUTES.join(", ")
                ),
            ));
        };
        let rules = OriginRules {
            allowed_origins: match &r.allowed_origins {
                Some(list) => origins(key_origins, list)?,
                None => allowed_origins.clone(),
            },
            allow_missing_origin: r.allow_missing_origin.unwrap_or(a.allow_missing_origin),
        };
        routes.insert(route.clone(), rules);
    }
    let cidrs = |key: &'static str, list: &[String]| -> Result<Vec<ipnet::IpNet>, ConfigError> {
        list.iter()
            .map(|v| {
                v.parse::<ipnet::IpNet>()
                    .or_else(|_| v.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map(|n| n.trunc())
                    .map_err(|_| {
                        invalid(
                            key,
                            format!(
                                "{v:?} is not an address or CIDR; write e.g. \"10.0.0.0/8\", \
                                 \"2001:db8::/32\" or \"192.0.2.7\""
                            ),
                        )
                    })
            })
            .collect()
    };
    let ipv6_prefix = range("admission.ipv6_prefix", a.ipv6_prefix as usize, 16, 128)? as u8;
    let admission = AdmissionConfig {
        origins: OriginRules {
            allowed_origins,
            allow_missing_origin: a.allow_missing_origin,
        },
        routes,
        trusted_proxies: cidrs("admission.trusted_proxies", &a.trusted_proxies)?,
        forwarded_header: a.forwarded_header,
        ipv6_prefix,
        // Wider than the per-IP group, or it would group nothing more.
        ipv6_wide_prefix: range(
            "admission.ipv6_wide_prefix",
            a.ipv6_wide_prefix as usize,
            16,
            ipv6_prefix as usize,
        )? as u8,
        exempt: cidrs("admission.exempt", &a.exempt)?,
        max_tracked_addresses: range(
            "admission.max_tracked_addresses",
            a.max_tracked_addresses,
            1_000,
            100_000_000,
        )?,
    };

    if server.proxy_protocol && admission.trusted_proxies.is_empty() {
        return Err(invalid(
            "server.proxy_protocol",
            "a PROXY header is believed only from admission.trusted_proxies, which is empty; \
             list the load balancers that send it"
                .into(),
        ));
    }

    let li = &file.limits;
    let rate = |key_rate: &'static str,
                key_burst: &'static str,
                mode: LimitMode,
                per_second: u32,
                burst: u32|
     -> Result<RateRule, ConfigError> {
        range(key_rate, per_second as usize, 1, u32::MAX as usize)?;
        range(key_burst, burst as usize, 1, u32::MAX as usize)?;
        Ok(RateRule {
            mode,
            per_second,
            burst,
        })
    };
    for (key, max) in [
        ("limits.ip_connections.max", li.ip_connections.max),
        (
            "limits.ipv6_wide_connections.max",
            li.ipv6_wide_connections.max,
        ),
    ] {
        if let Some(max) = max {
            range(key, max as usize, 1, u32::MAX as usize)?;
        }
    }
    let (ip_connections, ipv6_wide_connections) = connection_caps(li, server.max_connections);
    let limits = LimitsConfig {
        ip_connections,
        ipv6_wide_connections,
        ip_new_connections: rate(
            "limits.ip_new_connections.per_second",
            "limits.ip_new_connections.burst",
            li.ip_new_connections.mode,
            li.ip_new_connections.per_second,
            li.ip_new_connections.burst,
        )?,
        ipv6_wide_new_connections: rate(
            "limits.ipv6_wide_new_connections.per_second",
            "limits.ipv6_wide_new_connections.burst",
            li.ipv6_wide_new_connections.mode,
            li.ipv6_wide_new_connections.per_second,
            li.ipv6_wide_new_connections.burst,
        )?,
        ip_new_sessions: rate(
            "limits.ip_new_sessions.per_second",
            "limits.ip_new_sessions.burst",
            li.ip_new_sessions.mode,
            li.ip_new_sessions.per_second,
            li.ip_new_sessions.burst,
        )?,
        ip_sessions: CountRule {
            mode: li.ip_sessions.mode,
            max: range(
                "limits.ip_sessions.max",
                li.ip_sessions.max as usize,
                1,
                u32::MAX as usize,
            )? as u32,
        },
        ip_messages: rate(
            "limits.ip_messages.per_second",
            "limits.ip_messages.burst",
            li.ip_messages.mode,
            li.ip_messages.per_second,
            li.ip_messages.burst,
        )?,
        ip_bytes: rate(
            "limits.ip_bytes.per_second",
            "limits.ip_bytes.burst",
            li.ip_bytes.mode,
            li.ip_bytes.per_second,
            li.ip_bytes.burst,
        )?,
        new_sessions: rate(
            "limits.new_sessions.per_second",
            "limits.new_sessions.burst",
            li.new_sessions.mode,
            li.new_sessions.per_second,
            li.new_sessions.burst,
        )?,
        user_sessions: CountRule {
            mode: li.user_sessions.mode,
            max: range(
                "limits.user_sessions.max",
                li.user_sessions.max as usize,
                1,
                u32::MAX as usize,
            )? as u32,
        },
        user_messages: rate(
            "limits.user_messages.per_second",
            "limits.user_messages.burst",
            li.user_messages.mode,
            li.user_messages.per_second,
            li.user_messages.burst,
        )?,
    };
    // Every frame the edge reads is charged whole against the byte budget, oversize ones
    // included (their bytes were received): a burst smaller than the largest frame read would
    // refuse such a frame forever, as a rate limit instead of as too large.
    if (limits.ip_bytes.burst as usize) < session.close_message_bytes {
        return Err(invalid(
            "limits.ip_bytes.burst",
            format!(
                "{} is less than session.close_message_bytes ({}), the largest frame the edge \
                 reads; raise it to at least that",
                limits.ip_bytes.burst, session.close_message_bytes
            ),
        ));
    }

    let l = &file.log;
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&l.level) {
        return Err(invalid(
            "log.level",
            format!(
                "{:?} is not a filter ({e}); use e.g. \"info\" or \"edgeplex=debug,info\"",
                l.level
            ),
        ));
    }
    let log = LogConfig {
        format: l.format,
        level: l.level.clone(),
    };
    let auth = auth::validate(&file.auth, origin)?;

    let channels =
        crate::auth::Rules::compile(&file.channels.0).map_err(|(i, why)| ConfigError::Invalid {
            origin: origin("channels"),
            key: "channels.match",
            reason: format!(
                "rule {} (match = {:?}): {why}",
                i + 1,
                file.channels.0[i].pattern
            ),
        })?;

    let hooks = hooks::validate(&file.hooks, session.max_message_bytes, &invalid)?;

    Ok(Config {
        server,
        tls,
        bus,
        admin,
        session,
        admission,
        limits,
        webtransport: WebTransportConfig {
            enabled: file.webtransport.enabled,
            validate_address: address_validation(&file.webtransport, &invalid, &range)?,
        },
        log,
        demo: file.demo.validate(),
        hooks,
        channels: std::sync::Arc::new(channels),
        auth,
        effective: file,
    })
}

/// `webtransport.validate_address` and its threshold, validated.
fn address_validation(
    w: &schema::WebTransportSection,
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
    range: &dyn Fn(&'static str, usize, usize, usize) -> Result<usize, ConfigError>,
) -> Result<AddressValidation, ConfigError> {
    use schema::ValidateAddressSetting::{Mode, Switch};
    let max_unvalidated = range(
        "webtransport.unvalidated_handshakes",
        w.unvalidated_handshakes,
        1,
        1 << 16,
    )?;
    Ok(match &w.validate_address {
        Switch(true) => AddressValidation::Always,
        Switch(false) => AddressValidation::Never,
        Mode(m) => match m.as_str() {
            "always" => AddressValidation::Always,
            "under_load" => AddressValidation::UnderLoad { max_unvalidated },
            "never" => AddressValidation::Never,
            other => {
                return Err(invalid(
                    "webtransport.validate_address",
                    format!(
                        "{other:?} is not a mode; allowed are \"always\", \"under_load\" and \"never\" \
                         (true and false still mean \"always\" and \"never\")"
                    ),
                ));
            }
        },
    })
}

impl Config {
    /// A human summary of what the edge will do with this config, for `check-config`.
    pub fn summary(&self) -> String {
        let s = &self.server;
        let mut out = String::new();
        let opt = |a: Option<SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
        out.push_str(&format!(
            "TLS listener {} (TCP: HTTP/1.1 and HTTP/2; WebSocket at /ws, SSE at /sse)\n",
            s.listen
        ));
        out.push_str(&if self.webtransport.enabled {
            format!(
                "HTTP/3: UDP {} (WebTransport at /wt, SSE at /sse){}\n",
                s.listen,
                match self.webtransport.validate_address {
                    AddressValidation::Always => {
                        ", client addresses validated with a QUIC Retry".to_string()
                    }
                    AddressValidation::UnderLoad { max_unvalidated } => format!(
                        ", client addresses validated with a QUIC Retry while {max_unvalidated} \
                         handshakes from unproven addresses are under way, by the handshake \
                         otherwise"
                    ),
                    AddressValidation::Never => {
                        ", client addresses NOT validated (spoofable)".to_string()
                    }
                }
            )
        } else {
            "HTTP/3 and WebTransport: off\n".to_string()
        });
        out.push_str(&format!("plain listener {}\n", opt(s.listen_plain)));
        if self.demo.enabled {
            out.push_str("demo page at / (built on /edgeplex.js)\n");
        }
        out.push_str(&match s.admin_listen {
            Some(a) => format!(
                "admin listener {a} (at most {} connections)\n",
                s.admin_max_connections
            ),
            None => "admin listener off\n".to_string(),
        });
        out.push_str(&match &self.tls {
            TlsConfig::Files { cert, key } => {
                format!(
                    "certificate {} with key {}\n",
                    cert.display(),
                    key.display()
                )
            }
            TlsConfig::Dev { cert_path } => format!(
                "dev certificate generated at start, PEM written to {}\n",
                cert_path.display()
            ),
        });
        if !self.bus.redis_cluster.is_empty() {
            out.push_str(&format!(
                "bus: Redis Cluster from {} seed(s), sharded pub/sub (channel C is the shard \
                 channel and history stream {}{{C}}; Redis 7 or later); history {} messages \
                 per channel, each at most {} bytes, budgets per slot\n",
                self.bus.redis_cluster.len(),
                self.bus.channel_prefix,
                self.bus.history_len,
                self.bus.history_channel_bytes,
            ));
        }
        out.push_str(&match &self.bus.redis_url {
            None if !self.bus.redis_cluster.is_empty() => String::new(),
            None => format!(
                "bus: embedded (single node); history {} messages per channel, kept {}, {} bytes \
                 in all\n",
                self.bus.history_len,
                humantime::format_duration(self.bus.history_ttl),
                self.bus.history_bytes
            ),
            Some(_) => format!(
                "bus: Redis (channel C is {}C; history {} messages per channel, kept {} after \
                 a publish someone was subscribed to, else {}; {} bytes in all, in Redis: at \
                 most {} channels' histories, each at most {} bytes (bus.history_channel_bytes); \
                 Redis 6.2 or later)\n  \
                 subscriber connection: PING every {}, dead after {} without an answer (a \
                 silent Redis path is found within {}); at most {} messages (or {} MiB) waiting \
                 for delivery, past that the channels that lose messages get gap notices\n",
                self.bus.channel_prefix,
                self.bus.history_len,
                humantime::format_duration(self.bus.history_ttl),
                humantime::format_duration(self.bus.history_ttl_unsubscribed),
                self.bus.history_bytes,
                self.bus.history_bytes / crate::bus::redis::HISTORY_CHANNEL_BYTES,
                self.bus.history_channel_bytes,
                humantime::format_duration(self.bus.redis_ping_interval),
                humantime::format_duration(self.bus.redis_timeout),
                humantime::format_duration(self.bus.redis_ping_interval + self.bus.redis_timeout),
                self.bus.redis_ingest_queue,
                crate::bus::redis::INGEST_QUEUE_BYTES >> 20,
            ),
        });
        out.push_str(&self.auth.describe());
        out.push_str(if self.admin.api_key.is_some() {
            "backend publish API: POST /v1/publish on the admin listener (bearer key)\n"
        } else {
            "backend publish API: off (set admin.api_key)\n"
        });
        let ss = &self.session;
        out.push_str(&format!(
            "per session: {} msg/s (burst {}), closed after {} refusals in a row; \
             messages over {} B refused, over {} B closed (1009); {} channels; \
             outbound queue {} messages\n",
            ss.messages_per_second,
            ss.message_burst,
            ss.close_after_refusals,
            ss.max_message_bytes,
            ss.close_message_bytes,
            ss.max_channels,
            ss.outbound_queue
        ));
        out.push_str(&format!(
            "node: {} connections, {} sessions, {} channels\n",
            s.max_connections, s.max_sessions, s.max_channels
        ));
        out.push_str(&format!(
            "deadlines a client controls: TLS and request head {}, request body {} (408), idle \
             HTTP connection {}\n",
            humantime::format_duration(s.handshake_timeout),
            humantime::format_duration(s.body_timeout),
            humantime::format_duration(s.http_idle_timeout),
        ));
        out.push_str(&if s.drain_delay.is_zero() {
            format!(
                "shutdown (SIGTERM): sessions closed with 1001 at once, then up to {} for them \
                 to end (no drain window: server.drain_delay = 0s)\n",
                humantime::format_duration(s.shutdown_grace),
            )
        } else {
            format!(
                "shutdown (SIGTERM): /readyz 503 and still accepting for {} (server.drain_delay), \
                 then sessions closed with 1001, then up to {} for them to end\n",
                humantime::format_duration(s.drain_delay),
                humantime::format_duration(s.shutdown_grace),
            )
        });
        out.push_str(&format!("origins: {}\n", self.admission.origins.describe()));
        for (route, rules) in &self.admission.routes {
            out.push_str(&format!("  origins for {route}: {}\n", rules.describe()));
        }
        let ad = &self.admission;
        let nets = |l: &[ipnet::IpNet]| {
            if l.is_empty() {
                "none".to_string()
            } else {
                l.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        out.push_str(&format!(
            "client address: {}{}; IPv6 grouped by /{} (and by /{} too for the connection \
             limits); exempt from per-IP limits: {}; per-IP state for at most {} addresses per \
             limit\n",
            if self.server.proxy_protocol {
                "the PROXY protocol header (required on public connections)"
            } else {
                "the socket peer"
            },
            if ad.trusted_proxies.is_empty() {
                String::new()
            } else {
                format!(
                    ", or behind trusted proxies ({}) the client their {} header names",
                    nets(&ad.trusted_proxies),
                    match ad.forwarded_header {
                        crate::admission::client_ip::ForwardedHeader::XForwardedFor => {
                            "X-Forwarded-For"
                        }
                        crate::admission::client_ip::ForwardedHeader::Forwarded => "Forwarded",
                    }
                )
            },
            ad.ipv6_prefix,
            ad.ipv6_wide_prefix,
            nets(&ad.exempt),
            ad.max_tracked_addresses
        ));
        let mode = |m: LimitMode| match m {
            LimitMode::Enforce => "enforce",
            LimitMode::DryRun => "dry-run (counts and logs, refuses nothing)",
            LimitMode::Off => "off",
        };
        let li = &self.limits;
        let rate = |name: &str, what: &str, r: &RateRule| {
            format!(
                "  {name}: {} {what}/s, burst {} — {}\n",
                r.per_second,
                r.burst,
                mode(r.mode)
            )
        };
        out.push_str("limits (429 with Retry-After at a handshake; rate_limited for a message):\n");
        out.push_str(&rate(
            "ip_new_sessions",
            "new sessions per address",
            &li.ip_new_sessions,
        ));
        out.push_str(&format!(
            "  ip_sessions: {} open sessions per address — {}\n",
            li.ip_sessions.max,
            mode(li.ip_sessions.mode)
        ));
        out.push_str(&rate(
            "ip_messages",
            "messages per address",
            &li.ip_messages,
        ));
        out.push_str(&rate(
            "ip_bytes",
            "bytes per address (what it sends, and what its resumes replay)",
            &li.ip_bytes,
        ));
        out.push_str(&rate(
            "new_sessions",
            "new sessions on this node",
            &li.new_sessions,
        ));
        out.push_str(&format!(
            "  user_sessions: {} open sessions per user — {}\n",
            li.user_sessions.max,
            mode(li.user_sessions.mode)
        ));
        out.push_str(&rate(
            "user_messages",
            "messages per user, across its sessions",
            &li.user_messages,
        ));
        // Where an unset cap came from: its share of the node, or (wide only) the per-address
        // cap it may not go below.
        let fl = &self.effective.limits;
        let ip_from = match fl.ip_connections.max {
            Some(_) => "",
            None => " (a tenth of server.max_connections)",
        };
        let quarter = s.max_connections / schema::DEFAULT_IPV6_WIDE_CONNECTIONS_SHARE;
        let wide_from = match fl.ipv6_wide_connections.max {
            Some(_) => "",
            None if li.ipv6_wide_connections.max as usize == quarter.max(1) => {
                " (a quarter of server.max_connections)"
            }
            None => " (limits.ip_connections.max, above a quarter of server.max_connections)",
        };
        out.push_str(
            "limits at accept, before TLS (past them a TCP connection is closed at once, a QUIC \
             one refused; keyed by the socket peer, or the client a PROXY header names; a trusted \
             proxy that names its clients in forwarding headers is not limited here):\n",
        );
        out.push_str(&format!(
            "  ip_connections: {} open connections per address{ip_from} — {}\n",
            li.ip_connections.max,
            mode(li.ip_connections.mode)
        ));
        out.push_str(&format!(
            "  ipv6_wide_connections: {} open connections per IPv6 /{}{wide_from} — {}\n",
            li.ipv6_wide_connections.max,
            self.admission.ipv6_wide_prefix,
            mode(li.ipv6_wide_connections.mode)
        ));
        out.push_str(&rate(
            "ip_new_connections",
            "new connections per address",
            &li.ip_new_connections,
        ));
        out.push_str(&format!(
            "  ipv6_wide_new_connections: {} new connections/s per IPv6 /{}, burst {} — {}\n",
            li.ipv6_wide_new_connections.per_second,
            self.admission.ipv6_wide_prefix,
            li.ipv6_wide_new_connections.burst,
            mode(li.ipv6_wide_new_connections.mode)
        ));
        out.push_str(&self.hooks.describe());
        out.push_str(&format!(
            "channels ({} rules, first match wins; a channel no rule matches is refused):\n",
            self.channels.len()
        ));
        for r in self.channels.source() {
            out.push_str(&format!(
                "  {:?}: subscribe {}, publish {}\n",
                r.pattern,
                r.subscribe.as_str(),
                r.publish.as_str()
            ));
        }
        if !self.channels.open_to_anyone().is_empty() {
            out.push_str(
                "warning: a rule matching every channel (\"*\") lets clients without a token \
                 subscribe or publish everywhere; list your channels in [[channels]] (see \
                 config/examples/) before serving real users\n",
            );
        }
        out.push_str(&if self.server.config_watch.is_zero() {
            "reload: on SIGHUP ([admission], [limits] and [[channels]])\n".to_string()
        } else {
            format!(
                "reload: on SIGHUP and when the file changes (checked every {}; [admission], \
                 [limits] and [[channels]])\n",
                humantime::format_duration(self.server.config_watch)
            )
        });
        out
    }
}

/// `bus.redis_cluster`: seed URLs, each `redis://` or `rediss://`, not with `bus.redis_url`.
/// A refusal is the key and why.
fn redis_cluster_seeds(
    b: &schema::BusSection,
    has_url: bool,
) -> Result<Vec<String>, (&'static str, String)> {
    let invalid = |key: &'static str, reason: String| (key, reason);
    if b.redis_cluster.is_empty() {
        return Ok(Vec::new());
    }
    if has_url {
        return Err(invalid(
            "bus.redis_cluster",
            "is set together with bus.redis_url; set one: a single Redis or the cluster's seeds"
                .into(),
        ));
    }
    if b.redis_cluster.len() > 64 {
        return Err(invalid(
            "bus.redis_cluster",
            "lists more than 64 seeds; a few masters are enough to find the rest".into(),
        ));
    }
    for (i, url) in b.redis_cluster.iter().enumerate() {
        // The URL itself is not echoed: it may hold a password.
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(invalid(
                "bus.redis_cluster",
                format!("seed {i} must start with redis:// or rediss://"),
            ));
        }
        if let Err(e) = redis::Client::open(url.as_str()) {
            return Err(invalid(
                "bus.redis_cluster",
                format!(
                    "seed {i} is not a usable Redis URL ({:?}); the form is \
                     redis[s]://[user[:password]@]host[:port]",
                    e.kind()
                ),
            ));
        }
    }
    Ok(b.redis_cluster.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.toml");
        std::fs::write(&path, toml).unwrap();
        Config::from_figment(Figment::new().merge(Toml::file_exact(&path)), Some(&path))
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_file_config(FileConfig::default()).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(c.server.listen_plain, None);
        assert!(matches!(c.tls, TlsConfig::Dev { .. }));
    }

    #[test]
    fn shipped_config_is_the_defaults() {
        let text = include_str!("../../config/edgeplex.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.effective, FileConfig::default());
    }

    #[test]
    fn unknown_key_is_named_with_file() {
        let e = parse("[server]\nlisten_port = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("test.toml"), "{e}");
        assert!(
            e.contains("server.listen_port") || e.contains("listen_port"),
            "{e}"
        );
        assert!(e.contains("allowed keys here are"), "{e}");
        let e = parse("[serve]\n").unwrap_err().to_string();
        assert!(e.contains("unknown key `serve`"), "{e}");
    }

    #[test]
    fn wrong_type_is_named() {
        let e = parse("[session]\noutbound_queue = \"big\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("session.outbound_queue"), "{e}");
        let e = parse("[log]\nformat = \"xml\"\n").unwrap_err().to_string();
        assert!(e.contains("log.format") && e.contains("text"), "{e}");
        let e = parse("[server]\nshutdown_grace = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.shutdown_grace"), "{e}");
    }

    #[test]
    fn drain_delay_is_read_and_bounded() {
        let c = Config::from_file_config(FileConfig::default()).unwrap();
        assert_eq!(c.server.drain_delay, Duration::ZERO, "no window by default");
        let c = parse("[server]\ndrain_delay = \"30s\"\n").unwrap();
        assert_eq!(c.server.drain_delay, Duration::from_secs(30));
        assert!(
            c.summary()
                .contains("/readyz 503 and still accepting for 30s (server.drain_delay)"),
            "{}",
            c.summary()
        );
        let e = parse("[server]\ndrain_delay = \"2h\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.drain_delay") && e.contains("at most 1h"),
            "{e}"
        );
    }

    #[test]
    fn validate_address_takes_a_mode_or_the_old_boolean() {
        let mode = |toml: &str| parse(toml).unwrap().webtransport.validate_address;
        assert_eq!(mode(""), AddressValidation::Always);
        assert_eq!(
            mode("[webtransport]\nvalidate_address = true\n"),
            AddressValidation::Always
        );
        assert_eq!(
            mode("[webtransport]\nvalidate_address = false\n"),
            AddressValidation::Never
        );
        assert_eq!(
            mode("[webtransport]\nvalidate_address = \"under_load\"\nunvalidated_handshakes = 8\n"),
            AddressValidation::UnderLoad { max_unvalidated: 8 }
        );
        let e = parse("[webtransport]\nvalidate_address = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("webtransport.validate_address")
                && e.contains("always")
                && e.contains("under_load")
                && e.contains("never"),
            "{e}"
        );
        let e = parse("[webtransport]\nunvalidated_handshakes = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("webtransport.unvalidated_handshakes"), "{e}");
    }

    #[test]
    fn hooks_failure_mode_names_what_is_allowed() {
        let e = parse("[hooks]\nfailure = \"maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hooks.failure") && e.contains("deny") && e.contains("allow"),
            "{e}"
        );
    }

    #[test]
    fn summary_says_which_hooks_are_on() {
        let s = parse("[hooks]\nurl = \"http://127.0.0.1:9000/app\"\nconnect = true\n")
            .unwrap()
            .summary();
        assert!(
            s.contains("hooks: POST http://127.0.0.1:9000/app/<hook> for connect;"),
            "{s}"
        );
        assert!(parse("").unwrap().summary().contains("hooks: off"));
    }

    #[test]
    fn summary_explains_the_redis_subscriber_limits() {
        let s = parse("[bus]\nredis_url = \"redis://127.0.0.1:6379\"\n")
            .unwrap()
            .summary();
        assert!(
            s.contains("PING every 5s, dead after 2s")
                && s.contains("found within 7s")
                && s.contains("at most 65536 messages (or 64 MiB)"),
            "{s}"
        );
    }

    #[test]
    fn impossible_values_are_named() {
        let cases = [
            ("[server]\nlisten = \"8443\"\n", "server.listen"),
            ("[server]\nmax_sessions = 0\n", "server.max_sessions"),
            (
                "[session]\nmax_message_bytes = 1000\nclose_message_bytes = 500\n",
                "session.close_message_bytes",
            ),
            (
                "[session]\nping_interval = \"30s\"\nidle_timeout = \"10s\"\n",
                "session.idle_timeout",
            ),
            ("[tls]\ncert = \"a.pem\"\n", "tls.key"),
            (
                "[bus]\nredis_ping_interval = \"10ms\"\n",
                "bus.redis_ping_interval",
            ),
            ("[bus]\nredis_ingest_queue = 0\n", "bus.redis_ingest_queue"),
            (
                "[bus]\nhistory_bytes = 1000\nhistory_channel_bytes = 1001\n",
                "bus.history_channel_bytes",
            ),
            ("[bus]\nredis_url = \"http://x\"\n", "bus.redis_url"),
            (
                "[bus]\nredis_url = \"redis://:99999999/\"\n",
                "bus.redis_url",
            ),
            ("[bus]\nhistory_len = 0\n", "bus.history_len"),
            (
                "[bus]\nhistory_ttl_unsubscribed = \"10ms\"\n",
                "bus.history_ttl_unsubscribed",
            ),
            ("[bus]\nredis_ca = \"ca.pem\"\n", "bus.redis_ca"),
            (
                "[bus]\nredis_cluster = [\"redis://10.0.0.1:7000\"]\nredis_ca = \"ca.pem\"\n",
                "bus.redis_ca",
            ),
            ("[admin]\napi_key = \"short\"\n", "admin.api_key"),
            (
                "[admission]\nallowed_origins = [\"example.com\"]\n",
                "admission.allowed_origins",
            ),
            ("[log]\nlevel = \"[[[\"\n", "log.level"),
            (
                "[server]\nadmin_max_connections = 0\n",
                "server.admin_max_connections",
            ),
            (
                "[admission]\nipv6_prefix = 56\nipv6_wide_prefix = 60\n",
                "admission.ipv6_wide_prefix",
            ),
            (
                "[limits.ip_connections]\nmax = 0\n",
                "limits.ip_connections.max",
            ),
            (
                "[limits.ipv6_wide_connections]\nmax = 0\n",
                "limits.ipv6_wide_connections.max",
            ),
            (
                "[limits.ip_new_connections]\nburst = 0\n",
                "limits.ip_new_connections.burst",
            ),
            ("[hooks]\nconnect = true\n", "hooks.connect"),
            ("[hooks]\nurl = \"ws://app/\"\n", "hooks.url"),
            ("[hooks]\nmax_in_flight = 0\n", "hooks.max_in_flight"),
        ];
        for (toml, key) in cases {
            let e = parse(toml).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(key), "{toml}: {text}");
            assert!(text.contains("test.toml"), "{toml}: {text}");
        }
    }

    #[test]
    fn unset_connection_caps_follow_the_running_node_on_a_reload() {
        let running = parse("[server]\nmax_connections = 1000\n").unwrap();
        let reloaded = parse("[server]\nmax_connections = 100\n").unwrap();
        let l = reloaded.limits_under(&running.server);
        assert_eq!(
            (l.ip_connections.max, l.ipv6_wide_connections.max),
            (100, 250)
        );
        let set = parse("[server]\nmax_connections = 100\n[limits.ip_connections]\nmax = 7\n")
            .unwrap()
            .limits_under(&running.server);
        assert_eq!(
            (set.ip_connections.max, set.ipv6_wide_connections.max),
            (7, 250)
        );
    }

    #[test]
    fn a_channels_history_share_defaults_to_a_64th_of_the_budget() {
        let c = parse("[bus]\n").unwrap();
        assert_eq!(c.bus.history_channel_bytes, 1 << 20);
        // At least 64 KiB, or the whole of a smaller budget.
        let c = parse("[bus]\nhistory_bytes = 1048576\n").unwrap();
        assert_eq!(c.bus.history_channel_bytes, 64 * 1024);
        let c = parse("[bus]\nhistory_bytes = 6400\n").unwrap();
        assert_eq!(c.bus.history_channel_bytes, 6400);
        let c = parse("[bus]\nhistory_bytes = 0\n").unwrap();
        assert_eq!(c.bus.history_channel_bytes, 0);
        let c = parse("[bus]\nhistory_bytes = 6400\nhistory_channel_bytes = 6400\n").unwrap();
        assert_eq!(c.bus.history_channel_bytes, 6400);
    }

    #[test]
    fn unsubscribed_history_never_outlives_the_history() {
        let c = parse("[bus]\nhistory_ttl = \"5m\"\n").unwrap();
        assert_eq!(c.bus.history_ttl_unsubscribed, Duration::from_secs(300));
        let c = parse("[bus]\nhistory_ttl_unsubscribed = \"1m\"\n").unwrap();
        assert_eq!(c.bus.history_ttl_unsubscribed, Duration::from_secs(60));
    }

    #[test]
    fn star_allows_any_origin() {
        let c = parse("[admission]\nallowed_origins = [\"*\"]\n").unwrap();
        assert!(c.admission.origins.allowed_origins.is_none());
    }
}
