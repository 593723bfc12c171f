//! The config file as operators write it: one struct per TOML section, every key optional with a
//! named default, unknown keys refused. Nothing here is trusted yet; [`super::Config`] is what the
//! rest of the edge reads, built from these structs by validation.
//!
//! Keep `config/edgeplex.toml` in step with this file: it documents every key with its default,
//! and a test checks that it parses to exactly these defaults.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[auth]` lives in its own file with its validation.
pub use super::auth::AuthSection;
pub use super::hooks::HooksSection;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8443";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// The admin listener serves a scraper and a few operators; its own cap keeps a flood of
/// connections to it from costing the node file descriptors and tasks.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
pub const DEFAULT_MAX_SESSIONS: usize = 10_000;
pub const DEFAULT_MAX_CHANNELS: usize = 100_000;
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// No drain window unless asked for: without a load balancer to deregister from, a SIGTERM
/// closes sessions at once.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::ZERO;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_CONFIG_WATCH: Duration = Duration::from_secs(2);
pub const DEFAULT_DEV_CERT_PATH: &str = "edgeplex-dev-cert.pem";
pub const DEFAULT_CHANNEL_PREFIX: &str = "edgeplex:";
pub const DEFAULT_HISTORY_LEN: usize = 1000;
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_HISTORY_TTL_UNSUBSCRIBED: Duration = Duration::from_secs(10 * 60);
pub const DEFAULT_HISTORY_BYTES: usize = 64 * 1024 * 1024;
/// `bus.history_channel_bytes` when unset: `bus.history_bytes` divided by this, so no one
/// channel can take the budget from the others; but at least [`MIN_DEFAULT_HISTORY_CHANNEL_BYTES`]
/// (or all of a smaller budget), so a small budget still keeps some history per channel.
pub const DEFAULT_HISTORY_CHANNEL_SHARE: usize = 64;
pub const MIN_DEFAULT_HISTORY_CHANNEL_BYTES: usize = 64 * 1024;
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// With the 2 s deadline, a silent Redis path is found within 7 s.
pub const DEFAULT_REDIS_PING_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_REDIS_INGEST_QUEUE: usize = 65_536;
pub const DEFAULT_OUTBOUND_QUEUE: usize = 1024;
pub const DEFAULT_OUTBOUND_QUEUE_BYTES: usize = 1024 * 1024;
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;
pub const DEFAULT_CLOSE_MESSAGE_BYTES: usize = 256 * 1024;
pub const DEFAULT_MAX_CHANNELS_PER_SESSION: usize = 100;
pub const DEFAULT_MESSAGES_PER_SECOND: u32 = 50;
pub const DEFAULT_MESSAGE_BURST: u32 = 100;
pub const DEFAULT_CLOSE_AFTER_REFUSALS: u32 = 50;
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_SSE_HEARTBEAT: Duration = Duration::from_secs(15);
pub const DEFAULT_SSE_RETRY: Duration = Duration::from_secs(3);
pub const DEFAULT_READ_BUFFER_BYTES: usize = 256;
pub const DEFAULT_WRITE_BUFFER_BYTES: usize = 8 * 1024;
pub const DEFAULT_LOG_LEVEL: &str = "info";
pub const DEFAULT_IPV6_PREFIX: u8 = 64;
/// A site or a provider's customer usually gets a /48: the wider group of the connection limits.
pub const DEFAULT_IPV6_WIDE_PREFIX: u8 = 48;
pub const DEFAULT_MAX_TRACKED_ADDRESSES: usize = 100_000;
pub const DEFAULT_IP_NEW_SESSIONS: (u32, u32) = (10, 30);
pub const DEFAULT_IP_SESSIONS: u32 = 200;
pub const DEFAULT_IP_MESSAGES: (u32, u32) = (500, 1000);
pub const DEFAULT_IP_BYTES: (u32, u32) = (1024 * 1024, 4 * 1024 * 1024);
pub const DEFAULT_NEW_SESSIONS: (u32, u32) = (2000, 5000);
/// `[limits.ip_connections] max` when unset: `server.max_connections` divided by this, so no
/// one address can hold the node.
pub const DEFAULT_IP_CONNECTIONS_SHARE: usize = 10;
/// `[limits.ipv6_wide_connections] max` when unset: `server.max_connections` divided by this
/// (and never below the per-address cap), so no one IPv6 /48 can hold the node.
pub const DEFAULT_IPV6_WIDE_CONNECTIONS_SHARE: usize = 4;
/// Above `ip_new_sessions`: a session may take a connection of its own, and a browser opens a
/// few more (preflight, `POST /publish`).
pub const DEFAULT_IP_NEW_CONNECTIONS: (u32, u32) = (20, 60);
pub const DEFAULT_IPV6_WIDE_NEW_CONNECTIONS: (u32, u32) = (100, 300);
/// A user's tabs and devices together: enough for a busy person, not for a botnet on one
/// account.
pub const DEFAULT_USER_SESSIONS: u32 = 50;
/// Twice one session's rate: a user's sessions share it.
pub const DEFAULT_USER_MESSAGES: (u32, u32) = (100, 200);

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub server: ServerSection,
    pub tls: TlsSection,
    pub bus: BusSection,
    pub admin: AdminSection,
    pub session: SessionSection,
    pub admission: AdmissionSection,
    pub limits: LimitsSection,
    pub webtransport: WebTransportSection,
    pub log: LogSection,
    pub demo: super::demo::DemoSection,
    pub hooks: HooksSection,
    pub auth: AuthSection,
    /// `[[channels]]`: who may subscribe and publish where, first match wins.
    pub channels: ChannelRulesSection,
}

/// The `[[channels]]` rules as written. Unset: one rule that lets anyone subscribe and publish
/// on every channel, so a first run needs no token (`check-config` warns that it is open).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct ChannelRulesSection(pub Vec<crate::auth::RuleSection>);

impl Default for ChannelRulesSection {
    fn default() -> Self {
        ChannelRulesSection(vec![crate::auth::RuleSection {
            pattern: "*".into(),
            subscribe: crate::auth::Access::Anyone,
            publish: crate::auth::Access::Anyone,
        }])
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WebTransportSection {
    pub enabled: bool,
    pub validate_address: ValidateAddressSetting,
    pub unvalidated_handshakes: usize,
}

/// `webtransport.validate_address` as written: `"always"`, `"under_load"` or `"never"`, or the
/// boolean it was before there were three (`true` is `"always"`, `false` `"never"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ValidateAddressSetting {
    Switch(bool),
    Mode(String),
}

/// `webtransport.unvalidated_handshakes`: with `validate_address = "under_load"`, how many
/// handshakes from addresses no Retry has proved may be under way at once before every new
/// address gets a Retry. A spoofed Initial holds its place until `server.handshake_timeout`, so
/// this is also what a flood of them can make the edge start before it is retried.
pub const DEFAULT_UNVALIDATED_HANDSHAKES: usize = 64;

impl Default for WebTransportSection {
    fn default() -> Self {
        WebTransportSection {
            enabled: true,
            validate_address: ValidateAddressSetting::Mode("always".into()),
            unvalidated_handshakes: DEFAULT_UNVALIDATED_HANDSHAKES,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub listen: String,
    pub listen_plain: String,
    pub admin_listen: String,
    pub admin_max_connections: usize,
    pub max_connections: usize,
    pub max_sessions: usize,
    pub max_channels: usize,
    pub max_header_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub http_idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    #[serde(with = "humantime_serde")]
    pub config_watch: Duration,
    pub proxy_protocol: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: DEFAULT_LISTEN.into(),
            listen_plain: String::new(),
            admin_listen: DEFAULT_ADMIN_LISTEN.into(),
            admin_max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_channels: DEFAULT_MAX_CHANNELS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            http_idle_timeout: DEFAULT_HTTP_IDLE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            drain_delay: DEFAULT_DRAIN_DELAY,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            config_watch: DEFAULT_CONFIG_WATCH,
            proxy_protocol: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    pub cert: String,
    pub key: String,
    pub dev_cert_path: String,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: String::new(),
            key: String::new(),
            dev_cert_path: DEFAULT_DEV_CERT_PATH.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BusSection {
    pub redis_url: String,
    /// Redis Cluster seed URLs; `[]` for the embedded bus or one Redis.
    pub redis_cluster: Vec<String>,
    pub redis_ca: String,
    pub channel_prefix: String,
    pub history_len: usize,
    #[serde(with = "humantime_serde")]
    pub history_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub history_ttl_unsubscribed: Duration,
    pub history_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_channel_bytes: Option<usize>,
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub redis_ping_interval: Duration,
    pub redis_ingest_queue: usize,
}

impl Default for BusSection {
    fn default() -> Self {
        BusSection {
            redis_url: String::new(),
            redis_cluster: Vec::new(),
            redis_ca: String::new(),
            channel_prefix: DEFAULT_CHANNEL_PREFIX.into(),
            history_len: DEFAULT_HISTORY_LEN,
            history_ttl: DEFAULT_HISTORY_TTL,
            history_ttl_unsubscribed: DEFAULT_HISTORY_TTL_UNSUBSCRIBED,
            history_bytes: DEFAULT_HISTORY_BYTES,
            history_channel_bytes: None,
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            redis_ping_interval: DEFAULT_REDIS_PING_INTERVAL,
            redis_ingest_queue: DEFAULT_REDIS_INGEST_QUEUE,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Bearer token for `POST /v1/publish`; empty turns the publish API off.
    pub api_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionSection {
    pub outbound_queue: usize,
    pub outbound_queue_bytes: usize,
    pub max_message_bytes: usize,
    pub close_message_bytes: usize,
    pub max_channels: usize,
    pub messages_per_second: u32,
    pub message_burst: u32,
    pub close_after_refusals: u32,
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub sse_heartbeat: Duration,
    #[serde(with = "humantime_serde")]
    pub sse_retry: Duration,
    pub read_buffer_bytes: usize,
    pub write_buffer_bytes: usize,
}

impl Default for SessionSection {
    fn default() -> Self {
        SessionSection {
            outbound_queue: DEFAULT_OUTBOUND_QUEUE,
            outbound_queue_bytes: DEFAULT_OUTBOUND_QUEUE_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            close_message_bytes: DEFAULT_CLOSE_MESSAGE_BYTES,
            max_channels: DEFAULT_MAX_CHANNELS_PER_SESSION,
            messages_per_second: DEFAULT_MESSAGES_PER_SECOND,
            message_burst: DEFAULT_MESSAGE_BURST,
            close_after_refusals: DEFAULT_CLOSE_AFTER_REFUSALS,
            ping_interval: DEFAULT_PING_INTERVAL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            sse_heartbeat: DEFAULT_SSE_HEARTBEAT,
            sse_retry: DEFAULT_SSE_RETRY,
            read_buffer_bytes: DEFAULT_READ_BUFFER_BYTES,
            write_buffer_bytes: DEFAULT_WRITE_BUFFER_BYTES,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSection {
    pub allowed_origins: Vec<String>,
    pub allow_missing_origin: bool,
    pub trusted_proxies: Vec<String>,
    pub forwarded_header: crate::admission::client_ip::ForwardedHeader,
    pub ipv6_prefix: u8,
    pub ipv6_wide_prefix: u8,
    pub exempt: Vec<String>,
    pub max_tracked_addresses: usize,
    /// Origin rules for one route that differ from the ones above; keyed by route name.
    pub routes: std::collections::BTreeMap<String, RouteOriginSection>,
}

/// A route's own origin rules; a key left out keeps the `[admission]` value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouteOriginSection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_missing_origin: Option<bool>,
}

impl Default for AdmissionSection {
    fn default() -> Self {
        AdmissionSection {
            allowed_origins: default_origins(),
            allow_missing_origin: true,
            trusted_proxies: Vec::new(),
            forwarded_header: Default::default(),
            ipv6_prefix: DEFAULT_IPV6_PREFIX,
            ipv6_wide_prefix: DEFAULT_IPV6_WIDE_PREFIX,
            exempt: Vec::new(),
            max_tracked_addresses: DEFAULT_MAX_TRACKED_ADDRESSES,
            routes: std::collections::BTreeMap::new(),
        }
    }
}

/// The routes whose origin rules `[admission.routes.<name>]` can set.
pub const ORIGIN_ROUTES: [&str; 4] = ["websocket", "sse", "publish", "webtransport"];

/// What a limit does when it is exceeded.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum LimitMode {
    /// Refuse.
    #[default]
    Enforce,
    /// Count and log what would be refused; refuse nothing.
    DryRun,
    /// Not checked at all.
    Off,
}

/// A rate limit section: `per_second` after a burst of `burst`. One type per limit so that each
/// has its own defaults even when a file sets only some of its keys.
macro_rules! rate_limit_section {
    ($name:ident, $default:expr) => {
        #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            pub mode: LimitMode,
            pub per_second: u32,
            pub burst: u32,
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    mode: LimitMode::Enforce,
                    per_second: $default.0,
                    burst: $default.1,
                }
            }
        }
    };
}

rate_limit_section!(IpNewSessionsSection, DEFAULT_IP_NEW_SESSIONS);
rate_limit_section!(IpMessagesSection, DEFAULT_IP_MESSAGES);
rate_limit_section!(IpBytesSection, DEFAULT_IP_BYTES);
rate_limit_section!(NewSessionsSection, DEFAULT_NEW_SESSIONS);
rate_limit_section!(IpNewConnectionsSection, DEFAULT_IP_NEW_CONNECTIONS);
rate_limit_section!(
    Ipv6WideNewConnectionsSection,
    DEFAULT_IPV6_WIDE_NEW_CONNECTIONS
);
rate_limit_section!(UserMessagesSection, DEFAULT_USER_MESSAGES);

/// `[limits.user_sessions]`: sessions one user (a token's `sub`) holds open at once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UserSessionsSection {
    pub mode: LimitMode,
    pub max: u32,
}

impl Default for UserSessionsSection {
    fn default() -> Self {
        UserSessionsSection {
            mode: LimitMode::Enforce,
            max: DEFAULT_USER_SESSIONS,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IpSessionsSection {
    pub mode: LimitMode,
    pub max: u32,
}

impl Default for IpSessionsSection {
    fn default() -> Self {
        IpSessionsSection {
            mode: LimitMode::Enforce,
            max: DEFAULT_IP_SESSIONS,
        }
    }
}

/// A cap on the connections a group of addresses holds open. `max` unset: a share of
/// `server.max_connections`, so the cap follows the node's size.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionCapSection {
    pub mode: LimitMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub ip_new_sessions: IpNewSessionsSection,
    pub ip_sessions: IpSessionsSection,
    pub ip_messages: IpMessagesSection,
    pub ip_bytes: IpBytesSection,
    pub new_sessions: NewSessionsSection,
    pub ip_connections: ConnectionCapSection,
    pub ip_new_connections: IpNewConnectionsSection,
    pub ipv6_wide_connections: ConnectionCapSection,
    pub ipv6_wide_new_connections: Ipv6WideNewConnectionsSection,
    pub user_sessions: UserSessionsSection,
    pub user_messages: UserMessagesSection,
}

/// The origins a developer serves pages from locally. A production config lists its own.
pub fn default_origins() -> Vec<String> {
    [
        "https://localhost:8443",
        "https://127.0.0.1:8443",
        "http://localhost:8080",
        "http://127.0.0.1:8080",
        "http://localhost:3000",
        "http://127.0.0.1:3000",
    ]
    .map(String::from)
    .to_vec()
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Text,
            level: DEFAULT_LOG_LEVEL.into(),
        }
    }
}
