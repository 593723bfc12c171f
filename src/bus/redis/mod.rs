//! The Redis bus: many edge nodes share one pub/sub layer.
//!
//! Channel `C` is the Redis pub/sub channel `<prefix>C`; its history is the Redis stream with the
//! same name `<prefix>C` (a key, so it does not clash with the pub/sub channel). A publish runs one
//! Lua script that appends to the stream (`XADD`, `bus.history_len` entries kept, up to
//! [`HISTORY_TRIM_SLACK`] more between trims, and at most `bus.history_channel_bytes`) and
//! publishes `{"$edgeplex":"<stream id>","data":<data>}`: the stream id is the offset, assigned
//! once in Redis, so it means the same on every node and increases per channel in publish order
//! (a history dropped in the millisecond of its last offset is emptied, not deleted). Anything
//! else on the channel (a backend's raw `PUBLISH`) is delivered as the message's data, without an
//! offset.
//!
//! Channel names are client input, so the histories are bounded all together: the script counts
//! each against `bus.history_bytes` in two keys of its own (`<prefix>#history`,
//! `<prefix>#history-bytes`) and drops whole histories past it, the soonest to expire first, a
//! few per publish; and one channel's history is trimmed past `bus.history_channel_bytes`, so no
//! channel can push the others out. A history expires `bus.history_ttl` after a publish someone
//! heard, `bus.history_ttl_unsubscribed` after one nobody did (see [`PUBLISH_LUA`]). The budget
//! travels with each publish, so every node must be given the same one (the smallest wins). The
//! scripts need Redis 6.2 ([`RedisBus::check_server`]). Those two keys are global, which one Redis allows
//! and Redis Cluster does not: under Cluster they must become one pair per slot. A resume reads
//! only its window of the stream, newest first ([`REPLAY_LUA`]), however long the history.
//!
//! Each node holds one publishing connection (a `ConnectionManager`, which reconnects by itself)
//! and one subscriber connection, owned by [`RedisBus::run`]. redis-rs's `aio::PubSub` never
//! reconnects, so that task does: on loss it marks the bus down (publishes and new subscribes
//! answer `unavailable`, `/readyz` fails), retries with capped, fully jittered backoff (so nodes
//! that lost Redis together do not all come back, and their clients resume, in one instant),
//! resubscribes every channel the hub holds, and sends each local subscriber a `gap` notice for
//! the outage. A connection is lost when it closes, or when a PING sent every
//! `bus.redis_ping_interval` goes unanswered for `bus.redis_timeout` (a NAT or load balancer that
//! forgot the flow closes nothing, and the kernels on the way still ACK, so only an answer proves
//! the path).
//!
//! Messages arriving faster than the node delivers them are not an outage. They wait in an
//! ingest queue capped at `bus.redis_ingest_queue` messages and [`INGEST_QUEUE_BYTES`]; past the
//! cap the node drops rather than buffers without bound, but only what does not fit: a channel
//! that lost a message drops its later ones too until the queue has drained to half, and then
//! gets a `gap` notice in its place in the queue (after what it had queued before the loss,
//! before what comes after). The connection and every other channel are left alone. The channels
//! waiting for their notice are ones the node is subscribed to, at most [`INGEST_LOST_CAP`];
//! past that every channel gets one.
//!
//! Publishes go through one queue per node, bounded in count and bytes, drained by one task
//! ([`RedisBus::spawn_publisher`]) that sends what is waiting as a single pipeline and answers
//! each publisher when Redis has. A session therefore never waits a Redis round trip per message:
//! under load one round trip carries many publishes, and one session's publishes keep their order
//! because the queue and the pipeline do. Before this, each session awaited every publish in turn;
//! with the two cores busy a round trip took milliseconds and one publishing session managed ~150
//! messages per second.
//!
//! The set of Redis subscriptions follows the hub's channel table: one per channel with local
//! subscribers, added before the subscribing client gets its `ok`, dropped when the last local
//! subscriber leaves. One task per connection sends every SUBSCRIBE, UNSUBSCRIBE and PING, one
//! after another, and no lock is held across a round trip: a subscribe to a channel the node
//! holds already is answered at once, and the channels asked for while a SUBSCRIBE is in flight
//! go together in the next one. Dropped channels wait [`UNSUBSCRIBE_DELAY`] and leave together,
//! and delivery never waits for either. A channel dropped and joined again at the same moment
//! cannot end up unsubscribed: a channel leaves the active set before the hub is asked whether it
//! is still wanted, so a join after that question queues a SUBSCRIBE, which the same task sends
//! after the UNSUBSCRIBE. The other way round, a subscribe abandoned while it waits for its
//! SUBSCRIBE (a client that went away mid-request) cannot leave a subscription nobody holds:
//! the hub is asked again before the SUBSCRIBE is sent and once more after it is answered, and
//! a channel it no longer holds then joins the dropped ones, so the subscriptions stay within
//! the hub's capped table plus what is about to leave.
//!
//! This module does not know about sessions or transports; it talks to the hub only. It owns the
//! bus's state and settings; [`history`] holds the scripts and the keys they touch, [`publish`]
//! the publish pipeline, [`subscriber`] the subscriber connection and its ingest queue, and
//! [`cluster`] the Redis Cluster mode (`bus.redis_cluster`), which reuses the scripts, the publish
//! queue, the ingest pump and the backoff.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::history::{REPLAY_FRAME_BYTES, Replay, Window};
use super::{BusError, Hub};
use crate::metrics::Metrics;
use crate::protocol::{self, Channel, Offset};

pub mod cluster;
mod history;
mod publish;
mod subscriber;

pub use history::HISTORY_CHANNEL_BYTES;
use history::*;
pub use publish::PublishDone;
use publish::*;
use subscriber::*;

/// Reconnect pauses: each drawn evenly between the floor and a cap that starts at
/// `RECONNECT_FIRST` and doubles up to `RECONNECT_MAX` (see [`Backoff`]). The first window is
/// wide enough that nodes which lost Redis together come back (and send their gap notices)
/// spread over a second, and short enough that a blip costs half a second on average.
const RECONNECT_FLOOR: Duration = Duration::from_millis(50);
const RECONNECT_FIRST: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Channels per SUBSCRIBE or UNSUBSCRIBE.
const SUBSCRIBE_BATCH: usize = 500;
/// How long a dropped channel waits before its UNSUBSCRIBE: a burst of drops leaves in a few
/// commands, and a channel joined again meanwhile never leaves.
pub const UNSUBSCRIBE_DELAY: Duration = Duration::from_millis(100);
/// Dropped channels waiting for their UNSUBSCRIBE, at most. Past it they are forgotten and the
/// subscriptions are compared once with the whole channel table (`edgeplex_redis_resyncs_total`).
const DROPPED_CAP: usize = 65_536;
/// Bytes of Redis messages received and not yet delivered, at most (next to the count cap,
/// `bus.redis_ingest_queue`); one larger message still passes alone.
pub const INGEST_QUEUE_BYTES: usize = 64 << 20;
/// Channels that lost messages at the ingest cap and wait for room to queue their gap notice,
/// at most. They are channels this node is subscribed to, so the table bounds them already;
/// past this, every channel of the node gets the notice instead.
const INGEST_LOST_CAP: usize = 4096;
/// Publishes waiting for the pipeline, at most: past this a publisher waits for room, which
/// holds back its session's reading and so its client (TCP back-pressure).
const PUBLISH_QUEUE: usize = 4096;
/// Bytes of message data waiting for the pipeline, at most.
const PUBLISH_QUEUE_BYTES: usize = 16 << 20;
/// Publishes sent to Redis in one pipeline, at most.
const PUBLISH_BATCH: usize = 512;

/// Oldest Redis that runs the scripts: `ZADD GT` is not used any more, but the replay's `(`
/// exclusive stream ranges and `XTRIM` with `=` came with 6.2.
const REDIS_MIN_VERSION: (u32, u32) = (6, 2);

/// [`RedisBus::check_server`]'s findings.
const SERVER_UNKNOWN: u8 = 0;
const SERVER_OK: u8 = 1;
const SERVER_TOO_OLD: u8 = 2;

#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// One Redis; under Redis Cluster, the first seed (asked for its version).
    pub url: String,
    /// Redis Cluster seed URLs (`bus.redis_cluster`); empty for one Redis.
    pub cluster: Vec<String>,
    /// PEM CA for a `rediss://` server, instead of the system's roots.
    pub ca: Option<std::path::PathBuf>,
    pub prefix: String,
    pub history_len: usize,
    pub history_ttl: Duration,
    /// The history's life after a publish nobody was subscribed to.
    pub history_ttl_unsubscribed: Duration,
    /// Bytes all channels' histories may hold together in Redis.
    pub history_bytes: usize,
    /// Bytes one channel's history may hold in Redis.
    pub history_channel_bytes: usize,
    /// Connect and command timeout: a dead Redis makes a publish fail after this long at most.
    pub timeout: Duration,
    /// PING on the subscriber connection this often; unanswered within `timeout`, it is dead.
    pub ping_interval: Duration,
    /// Messages received and not yet delivered, at most.
    pub ingest_queue: usize,
}

pub struct RedisBus {
    client: redis::Client,
    /// Redis Cluster mode (see [`cluster`]); `None` for one Redis.
    cluster: Option<cluster::Cluster>,
    settings: RedisSettings,
    publisher: ConnectionManager,
    script: redis::Script,
    replay_script: redis::Script,
    /// The keys that track every channel's history (see [`PUBLISH_LUA`]).
    history_index: String,
    history_sizes: String,
    publish_tx: tokio::sync::mpsc::Sender<PublishJob>,
    /// Taken by the pipeline task when [`RedisBus::spawn_publisher`] starts it.
    publish_rx: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<PublishJob>>>,
    publish_bytes: Arc<tokio::sync::Semaphore>,
    /// Never held across an await.
    subs: parking_lot::Mutex<SubState>,
    /// The hub dropped a channel: the command task unsubscribes it after a delay.
    changed: Notify,
    /// A channel was asked for: the command task subscribes it.
    wanted: Notify,
    connected: AtomicBool,
    /// What [`RedisBus::check_server`] found: [`SERVER_UNKNOWN`], [`SERVER_OK`] or
    /// [`SERVER_TOO_OLD`] (then the node is never ready).
    server: AtomicU8,
    metrics: Arc<Metrics>,
    publish_errors: Counter,
    reconnects: Counter,
    connected_gauge: Gauge,
    subscriptions_gauge: Gauge,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never print it.
        f.debug_struct("RedisBus")
            .field("prefix", &self.settings.prefix)
            .field("connected", &self.connected.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("Redis bus: {0}")]
pub struct RedisConfigError(String);

impl RedisBus {
    /// Prepares the connections; nothing is dialled until [`RedisBus::run`] starts, so an edge
    /// whose Redis is down still starts (not ready) and recovers when Redis comes up.
    pub fn new(
        settings: RedisSettings,
        metrics: Arc<Metrics>,
    ) -> Result<RedisBus, RedisConfigError> {
        let ca = match &settings.ca {
            None => None,
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                RedisConfigError(format!("bus.redis_ca: cannot read {}: {e}", path.display()))
            })?),
        };
        let client = match &ca {
            None => redis::Client::open(settings.url.as_str()),
            Some(pem) => redis::Client::build_with_tls(
                settings.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            ),
        }
        .map_err(|e| RedisConfigError(format!("not a usable Redis URL or CA ({:?})", e.kind())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(RECONNECT_MAX);
        let publisher =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(|e| {
                RedisConfigError(format!("cannot prepare the connection ({:?})", e.kind()))
            })?;
        let (publish_tx, publish_rx) = tokio::sync::mpsc::channel(PUBLISH_QUEUE);
        let cluster = match settings.cluster.is_empty() {
            true => None,
            false => Some(
                cluster::Cluster::new(&settings.cluster, settings.timeout, ca).map_err(|e| {
                    RedisConfigError(format!("not usable Redis Cluster seeds ({:?})", e.kind()))
                })?,
            ),
        };
        Ok(RedisBus {
            client,
            cluster,
            publisher,
            script: redis::Script::new(PUBLISH_LUA),
            replay_script: redis::Script::new(REPLAY_LUA),
            history_index: format!("{}#history", settings.prefix),
            history_sizes: format!("{}#history-bytes", settings.prefix),
            publish_tx,
            publish_rx: parking_lot::Mutex::new(Some(publish_rx)),
            publish_bytes: Arc::new(tokio::sync::Semaphore::new(PUBLISH_QUEUE_BYTES)),
            subs: parking_lot::Mutex::new(SubState::default()),
            changed: Notify::new(),
            wanted: Notify::new(),
            connected: AtomicBool::new(false),
            server: AtomicU8::new(SERVER_UNKNOWN),
            publish_errors: metrics.redis_publish_errors.clone(),
            reconnects: metrics.redis_reconnects.clone(),
            connected_gauge: metrics.redis_connected.clone(),
            subscriptions_gauge: metrics.redis_subscriptions.clone(),
            metrics,
            settings,
        })
    }

    /// Connected, and the Redis there is not too old for the scripts.
    pub fn is_ready(&self) -> bool {
        self.connected.load(Ordering::Acquire)
            && self.server.load(Ordering::Acquire) != SERVER_TOO_OLD
    }

    /// Asks Redis its version (`INFO server`) and refuses one older than [`REDIS_MIN_VERSION`]:
    /// the scripts would fail there after `PUBLISH`, so the message would be delivered and its
    /// publisher told `unavailable`, and a retry would deliver it twice. Called at start (an
    /// error refuses to start) and by the publish pipeline before its first pipeline when Redis
    /// was not reachable then (a Redis too old leaves the node not ready: upgrade Redis and
    /// restart the node). Unreachable, the question stays open and this answers `Ok`.
    pub async fn check_server(&self) -> Result<(), RedisConfigError> {
        if self.server.load(Ordering::Acquire) == SERVER_OK {
            return Ok(());
        }
        // A connection of its own, dropped after: the publisher's is left to the pipeline (used
        // here before the first publish, it was found broken after a Redis restart).
        let ask = async {
            let mut conn = self.client.get_multiplexed_async_connection().await?;
            redis::cmd("INFO")
                .arg("server")
                .query_async::<String>(&mut conn)
                .await
        };
        let info = match tokio::time::timeout(self.settings.timeout, ask).await {
            Ok(Ok(info)) => info,
            Ok(Err(e)) if !(e.is_io_error() || e.is_connection_refusal() || e.is_timeout()) => {
                // Redis answered, but not with its version (an ACL user without INFO): asking
                // again would cost every pipeline a round trip.
                tracing::warn!(error = %e, "cannot ask Redis its version; assuming 6.2 or later");
                self.server.store(SERVER_OK, Ordering::Release);
                return Ok(());
            }
            _ => return Ok(()),
        };
        match redis_version(&info) {
            Some(v) if v < REDIS_MIN_VERSION => {
                self.server.store(SERVER_TOO_OLD, Ordering::Release);
                let (major, minor) = REDIS_MIN_VERSION;
                let e = RedisConfigError(format!(
                    "bus.redis_url: the Redis there is version {}.{}; edgeplex needs Redis \
                     {major}.{minor} or later",
                    v.0, v.1
                ));
                tracing::error!(error = %e, "Redis too old: this node will not be ready");
                Err(e)
            }
            Some(_) => {
                self.server.store(SERVER_OK, Ordering::Release);
                Ok(())
            }
            None => {
                tracing::warn!(
                    "Redis did not say its version (INFO server); assuming it is recent enough"
                );
                self.server.store(SERVER_OK, Ordering::Release);
                Ok(())
            }
        }
    }

    /// The Redis name of `channel`: pub/sub channel and stream key (`<prefix>C`), or under
    /// Redis Cluster shard channel and stream key (`<prefix>{C}`).
    fn key(&self, channel: &Channel) -> String {
        match self.cluster {
            Some(_) => cluster::cluster_key(&self.settings.prefix, channel),
            None => format!("{}{}", self.settings.prefix, channel.as_str()),
        }
    }

    /// The edge channel name inside a Redis channel name, if it is one of ours.
    fn channel_name<'a>(&self, full: &'a str) -> Option<&'a str> {
        let name = full.strip_prefix(self.settings.prefix.as_str())?;
        match self.cluster {
            Some(_) => name.strip_prefix('{')?.strip_suffix('}'),
            None => Some(name),
        }
    }

    fn channel_of(&self, full: &str) -> Option<Channel> {
        self.channel_name(full).and_then(|n| Channel::new(n).ok())
    }

    /// Publishes through the script and waits for Redis's answer, the offset it assigned. The
    /// message reaches local subscribers through the subscriber connection like everyone else's.
    /// The channel's retained messages after `since` that fit `window`, from its history stream.
    /// Only the window is read (see [`REPLAY_LUA`]): a resume costs Redis what it delivers.
    pub async fn replay(
        &self,
        channel: &Channel,
        since: Offset,
        window: Window,
    ) -> Result<Replay, BusError> {
        if !self.is_ready() {
            return Err(BusError::Unavailable("Redis is unreachable"));
        }
        // Nothing follows the largest offset (and Redis refuses it as an exclusive bound).
        let window = if since == Offset::MAX {
            Window::NONE
        } else {
            window
        };
        let mut call = self.replay_script.key(self.key(channel));
        call.arg(since.to_string())
            .arg(window.frames)
            .arg(window.bytes)
            .arg(REPLAY_FRAME_BYTES);
        let query = async {
            match &self.cluster {
                // Routed by the stream key to its slot's master.
                Some(cl) => match cl.conn() {
                    Some(mut conn) => call.invoke_async::<ReplayReply>(&mut conn).await,
                    None => Err(redis::RedisError::from(std::io::Error::other(
                        "not connected",
                    ))),
                },
                None => {
                    let mut conn = self.publisher.clone();
                    call.invoke_async::<ReplayReply>(&mut conn).await
                }
            }
        };
        let (first, last, cut, newest_first) =
            match tokio::time::timeout(self.settings.timeout, query).await {
                Ok(Ok(r)) => r,
                _ => return Err(BusError::Unavailable("cannot read history from Redis")),
            };
        let id = |s: Option<String>| s.and_then(|s| s.parse::<Offset>().ok());
        let mut retained = Vec::with_capacity(newest_first.len());
        for (entry, data) in newest_first.into_iter().rev() {
            let (Ok(offset), Ok(data)) = (entry.parse::<Offset>(), String::from_utf8(data)) else {
                continue;
            };
            retained.push((offset, Arc::<str>::from(data)));
        }
        Ok(Replay::after(since, retained, id(first), id(last)).cut_short(cut != 0))
    }
}

#[cfg(test)]
impl RedisBus {
    /// A bus that believes it is connected but whose pipeline task never runs: nothing leaves
    /// the queue, so what it holds is what the caps allow.
    pub(crate) fn stalled_for_tests() -> Arc<RedisBus> {
        let settings = RedisSettings {
            url: "redis://127.0.0.1:1/".into(),
            cluster: Vec::new(),
            ca: None,
            prefix: "t:".into(),
            history_len: 10,
            history_ttl: Duration::from_secs(60),
            history_ttl_unsubscribed: Duration::from_secs(60),
            history_bytes: 1 << 20,
            history_channel_bytes: 1 << 14,
            timeout: Duration::from_secs(1),
            ping_interval: Duration::from_secs(5),
            ingest_queue: 16,
        };
        let bus = RedisBus::new(settings, Arc::new(Metrics::new())).unwrap();
        bus.connected.store(true, Ordering::Release);
        Arc::new(bus)
    }
}

/// `redis_version:7.0.15` in an `INFO server` answer, as (major, minor).
fn redis_version(info: &str) -> Option<(u32, u32)> {
    let v = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))?
        .trim();
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_versions_are_read_from_info_server() {
        let info = "# Server\r\nredis_version:6.0.16\r\nredis_git_sha1:00000000\r\n";
        assert_eq!(redis_version(info), Some((6, 0)));
        assert!(redis_version(info).unwrap() < REDIS_MIN_VERSION);
        assert_eq!(redis_version("redis_version:6.2.0\r\n"), Some((6, 2)));
        assert_eq!(REDIS_MIN_VERSION, (6, 2));
        assert_eq!(redis_version("redis_version:10.11.1\n"), Some((10, 11)));
        assert_eq!(redis_version("# Server\r\nuptime:1\r\n"), None);
        assert_eq!(redis_version("redis_version:x.y\r\n"), None);
    }

    #[test]
    fn envelope_round_trip() {
        let p = r#"{"$edgeplex":"1700000000000-3","data":{"a":[1,"}"]}}"#;
        let (o, d) = parse_envelope(p).unwrap();
        assert_eq!(o.to_string(), "1700000000000-3");
        assert_eq!(d, r#"{"a":[1,"}"]}"#);
        assert!(parse_envelope(r#"{"a":1}"#).is_none());
        assert!(parse_envelope(r#"{"$edgeplex":"x","data":1}"#).is_none());
        assert!(parse_envelope(r#"{"$edgeplex":"1-1","dat":1}"#).is_none());
    }
}
