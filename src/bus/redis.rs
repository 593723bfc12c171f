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
//! This module does not know about sessions or transports; it talks to the hub only.

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

/// Bytes counted against `bus.history_bytes` for each channel with a Redis history, besides
/// its entries: Redis 7 gives a stream its first node at `stream-node-max-bytes` (4 KiB) at once,
/// so a stream of one small entry holds ~4.7 KB; and the channel's places in the index.
pub const HISTORY_CHANNEL_BYTES: usize = 5 * 1024;
/// Bytes counted for each history entry besides its data (the entry's id and framing in the
/// stream node; a node of its own for a large one).
const HISTORY_ENTRY_BYTES: usize = 64;
/// Entries a stream may hold past `bus.history_len` before one publish trims them all: trimming
/// on every publish rescans the stream's first node each time (measured: XADD 3 → 7 µs).
const HISTORY_TRIM_SLACK: usize = 100;
/// Histories one publish drops for the budget, at most: a budget that shrank (a node started
/// with a smaller `bus.history_bytes`) is met over several publishes, never in one script that
/// holds Redis for long (one dropped 12,736 channels in 229 ms).
const HISTORY_EVICTIONS_PER_PUBLISH: usize = 64;
/// Oldest Redis that runs the scripts: `ZADD GT` is not used any more, but the replay's `(`
/// exclusive stream ranges and `XTRIM` with `=` came with 6.2.
const REDIS_MIN_VERSION: (u32, u32) = (6, 2);

/// [`RedisBus::check_server`]'s findings.
const SERVER_UNKNOWN: u8 = 0;
const SERVER_OK: u8 = 1;
const SERVER_TOO_OLD: u8 = 2;

/// Appends to the history stream and publishes the envelope in one atomic step, so the order of
/// stream ids is the order subscribers see; then keeps the channel within its share and all
/// histories within their byte budget.
///
/// KEYS: the channel's stream, the history index (a sorted set: stream key → when it expires,
/// ms, exactly), the history sizes (a hash: stream key → bytes counted; `#total` → their sum; no
/// channel name holds `#`, so no stream key is `#total`). ARGV: data, history_len, history_ttl
/// (ms), pub/sub channel, history_ttl_unsubscribed (ms), history_bytes, [`HISTORY_ENTRY_BYTES`],
/// [`HISTORY_CHANNEL_BYTES`], [`HISTORY_TRIM_SLACK`], history_channel_bytes,
/// [`HISTORY_EVICTIONS_PER_PUBLISH`]. Returns the stream id, the channels evicted, the bytes all
/// histories then hold, and how many channels they are (-1 when this publish took none out of
/// the index, to spare the count).
///
/// `PUBLISH` says how many subscribers (nodes, backends) heard the message: none, and the stream
/// expires after the short life. Past the budget, the channels that would expire first go (so the
/// unheard ones first), the one published to last of all, at most
/// [`HISTORY_EVICTIONS_PER_PUBLISH`] per publish.
///
/// Counting: a publish adds its entry's estimated bytes; a trim (past `history_len` and the slack,
/// or past the channel's share) sets the channel's count to Redis's own figure, `MEMORY USAGE
/// key SAMPLES 0`, which walks the stream's nodes (a few dozen at most: the share bounds them)
/// and reads no entry. Nothing here reads entries back.
///
/// Offsets: after `DEL`, an `XADD *` in the same millisecond would restart at `<ms>-0` and repeat
/// an offset already given out. A stream is only dropped outright once the clock is past its last
/// id; otherwise it is emptied (`XTRIM MAXLEN 0`: an empty stream keeps its last id, so the next
/// `XADD` goes on from it) and expires a millisecond after that id.
///
/// Nothing after `PUBLISH` may fail (the message is out: a failure would make its publisher
/// retry, and so duplicate it), so every key the script meets is checked before it is used.
///
/// The index and sizes are two keys every publish touches, and evicted streams are keys the
/// script finds rather than is given: fine for one Redis, not for Redis Cluster (a script there
/// touches the keys of one slot). Under Cluster they become one index and one size table per
/// slot, each key hash-tagged to it, with the budget split among them.
const PUBLISH_LUA: &str = r#"
local stream, index, sizes = KEYS[1], KEYS[2], KEYS[3]
local data, len, slack = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[9])
local budget, per_entry, per_channel = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local cap, most = tonumber(ARGV[10]), tonumber(ARGV[11])
local function ms(id) return tonumber(string.match(id, '^%d+')) end
local n = redis.call('XLEN', stream)
local id = redis.call('XADD', stream, '*', 'd', data)
local heard = redis.call('PUBLISH', ARGV[4], '{"$edgeplex":"' .. id .. '","data":' .. data .. '}')
-- An entry's data in Redis's allocations: an eighth more, the spacing of jemalloc's classes.
local delta = #data + math.floor(#data / 8) + per_entry
-- The id's time is Redis's clock, the one that runs the key's expiry. The index holds the exact
-- expiry (so the soonest to expire go first, not the first by name); the key's own is rounded up
-- to a 64th of the life, so most publishes leave it as it is, and never loses life it has.
local life = tonumber(heard > 0 and ARGV[3] or ARGV[5])
local step = math.max(math.floor(life / 64), 1)
local function rounded(t) return (math.floor(t / step) + 1) * step end
local expiry = ms(id) + life
local old = tonumber(redis.call('ZSCORE', index, stream) or 0)
if n == 0 or expiry > old then
  -- (A new or emptied stream starts afresh, whatever its place said.)
  redis.call('ZADD', index, expiry, stream)
  if n == 0 or rounded(expiry) > rounded(old) then
    redis.call('PEXPIREAT', stream, rounded(expiry))
  end
end
local size, total
local channels = -1
if n == 0 then
  -- New, emptied, or it expired or went: what was counted for it is stale.
  local stale = tonumber(redis.call('HGET', sizes, stream) or 0)
  size = per_channel + delta
  redis.call('HSET', sizes, stream, size)
  total = redis.call('HINCRBY', sizes, '#total', size - stale)
  channels = 0
else
  size = redis.call('HINCRBY', sizes, stream, delta)
  if size < per_channel then
    -- Entries from before the count (a stream this script did not make) left uncounted.
    delta = delta + per_channel - size
    size = per_channel
    redis.call('HSET', sizes, stream, size)
  end
  total = redis.call('HINCRBY', sizes, '#total', delta)
end
-- Trims: past history_len and the slack, down to history_len; past the channel's share, down to
-- the newest entries that fit 7/8 of it, judged by their average size (the new one's is known),
-- checked against Redis's figure and tried again, a few times at most.
local count = n + 1
for pass = 1, 4 do
  local keep = count
  if count > len + slack then keep = len end
  if size > cap then
    local room = math.floor(cap * 7 / 8) - per_channel - delta
    if per_channel + delta > cap then
      keep = 0
    elseif room <= 0 or count < 2 then
      keep = 1
    else
      local each = math.max((size - per_channel - delta) / (count - 1), 1)
      keep = math.min(keep, 1 + math.floor(room / each))
      if pass > 1 then keep = math.min(keep, math.floor(count / 2)) end
    end
  end
  if keep >= count then break end
  redis.call('XTRIM', stream, 'MAXLEN', '=', keep)
  count = keep
  local real = math.max(redis.call('MEMORY', 'USAGE', stream, 'SAMPLES', 0) or 0, per_channel)
  redis.call('HSET', sizes, stream, real)
  total = redis.call('HINCRBY', sizes, '#total', real - size)
  size = real
end
-- Takes a stream out for the budget; false when it had gone already (expired) or is not ours.
local now
local function drop(key)
  if redis.call('TYPE', key)['ok'] ~= 'stream' then return false end
  local last = 0
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = ms(info[i + 1]) end
  end
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  if last < now then
    -- Any later XADD gets a later millisecond: the stream may go, freed off the main thread.
    redis.call('UNLINK', key)
  else
    redis.call('XTRIM', key, 'MAXLEN', 0)
    redis.call('PEXPIREAT', key, last + 1)
  end
  return true
end
-- The sizes hold one field per stream in the index, and #total. More fields than that and the
-- index was lost (Redis dropped it, e.g. under an allkeys-* maxmemory-policy): the count would
-- stay over the budget for good, and every publish drop every history. It starts over.
if total > budget and redis.call('HLEN', sizes) - 1 > redis.call('ZCARD', index) then
  redis.call('UNLINK', sizes)
  redis.call('HSET', sizes, stream, size)
  total = redis.call('HINCRBY', sizes, '#total', size)
end
-- Past the budget, the streams that would expire first go; this one only when it is all that is
-- left (a single history larger than the budget).
local evicted, popped, kept = 0, 0, nil
while total > budget and popped < most do
  local first = redis.call('ZPOPMIN', index)
  local victim = first[1]
  if victim == stream and not kept and redis.call('ZCARD', index) > 0 then
    kept = first[2]
  else
    if not victim and kept then
      victim, kept = stream, nil
    end
    if not victim then
      -- Over the budget with nothing left to drop: the count drifted. It starts over.
      redis.call('UNLINK', sizes)
      total = 0
      break
    end
    popped = popped + 1
    local b = tonumber(redis.call('HGET', sizes, victim) or 0)
    redis.call('HDEL', sizes, victim)
    total = redis.call('HINCRBY', sizes, '#total', -b)
    if drop(victim) then evicted = evicted + 1 end
  end
end
if kept then
  redis.call('ZADD', index, kept, stream)
end
if popped > 0 or channels == 0 then
  channels = redis.call('ZCARD', index)
end
return {id, evicted, total, channels}
"#;

/// Reads a resume's window in one atomic step: the stream's oldest and newest ids (whether the
/// history reaches back to `since`), then entries newest first after `since`, a few at a time,
/// until the window is full. Only the window's entries leave Redis, and Redis itself reads at
/// most a page more, however long the history.
///
/// KEYS: the channel's stream. ARGV: `since` (exclusive), the window's frames and bytes,
/// [`REPLAY_FRAME_BYTES`]. Returns the oldest id, the newest id (nil when there is no stream),
/// 1 when the window ended before `since`, and the entries kept as `{id, data}`, newest first.
const REPLAY_LUA: &str = r#"
local stream = KEYS[1]
local frames, bytes, per_entry = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
local kept, used, cut = {}, 0, 0
local high = '+'
while frames > 0 and cut == 0 do
  local want = math.min(frames - #kept + 1, 16)
  local page = redis.call('XREVRANGE', stream, high, '(' .. ARGV[1], 'COUNT', want)
  for _, e in ipairs(page) do
    local f, d = e[2], nil
    for i = 1, #f, 2 do
      if f[i] == 'd' then d = f[i + 1] end
    end
    if d then
      if #kept >= frames or used + #d + per_entry > bytes then
        cut = 1
        break
      end
      used = used + #d + per_entry
      kept[#kept + 1] = {e[1], d}
    end
    high = '(' .. e[1]
  end
  if #page < want then break end
end
return {first and first[1] or false, last and last[1] or false, cut, kept}
"#;

/// What [`REPLAY_LUA`] answers.
type ReplayReply = (Option<String>, Option<String>, i64, Vec<(String, Vec<u8>)>);

const ENVELOPE_HEAD: &str = r#"{"$edgeplex":""#;
const ENVELOPE_DATA: &str = r#"","data":"#;

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
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

/// What the publish script answers: the stream id, the channels it evicted, and the bytes and
/// channels all histories then hold.
type PublishReply = (String, u64, i64, i64);

/// What to do with a publish's outcome; runs on the pipeline task, so it must not block.
pub type PublishDone = Box<dyn FnOnce(Result<Offset, BusError>) + Send + Sync>;

/// A publish waiting for the pipeline.
struct PublishJob {
    key: String,
    data: String,
    done: PublishDone,
    /// Queued at most `bus.redis_timeout` ago when sent; older, it is answered `unavailable`
    /// unsent, so a publish waits at most twice that in all.
    deadline: tokio::time::Instant,
    /// The job's share of [`PUBLISH_QUEUE_BYTES`], given back when it is answered.
    _bytes: tokio::sync::OwnedSemaphorePermit,
    /// Counts the job in `redis_publish_queued` until it is answered or dropped.
    _queued: Queued,
}

/// One publish in `redis_publish_queued`; however the job ends, dropping it counts it out.
struct Queued(Gauge);

impl Queued {
    fn new(gauge: &Gauge) -> Queued {
        gauge.inc();
        Queued(gauge.clone())
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Answers one [`RedisBus::ensure_subscribed`] caller.
type Waiter = tokio::sync::oneshot::Sender<()>;

#[derive(Debug, Default)]
struct SubState {
    /// The subscriber connection's command side; `None` while disconnected.
    sink: Option<PubSubSink>,
    /// Channels subscribed on the current connection.
    active: HashSet<Channel>,
    /// Channels waiting for the next SUBSCRIBE, and who waits for each. Only channels in the
    /// hub's (capped) table are asked for, so this is bounded by it.
    wanted: HashMap<Channel, Vec<Waiter>>,
    /// Channels whose last local subscriber left, waiting for the next UNSUBSCRIBE; at most
    /// [`DROPPED_CAP`].
    dropped: HashSet<Channel>,
    /// `dropped` overflowed: compare the subscriptions with the whole table once instead.
    resync: bool,
}

pub struct RedisBus {
    client: redis::Client,
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
        let client = match &settings.ca {
            None => redis::Client::open(settings.url.as_str()),
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    RedisConfigError(format!("bus.redis_ca: cannot read {}: {e}", path.display()))
                })?;
                redis::Client::build_with_tls(
                    settings.url.as_str(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
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
        Ok(RedisBus {
            client,
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

    fn key(&self, channel: &Channel) -> String {
        format!("{}{}", self.settings.prefix, channel.as_str())
    }

    /// Publishes through the script and waits for Redis's answer, the offset it assigned. The
    /// message reaches local subscribers through the subscriber connection like everyone else's.
    pub async fn publish(&self, channel: &Channel, data: &str) -> Result<Offset, BusError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.publish_then(
            channel,
            data,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .await;
        rx.await
            .unwrap_or(Err(BusError::Unavailable("the edge is shutting down")))
    }

    /// Queues a publish and returns once it is queued (waiting for room when the queue is
    /// full); `done` gets the outcome when Redis answered. Publishes queued by one caller are
    /// sent, and answered, in the order they were queued: even a refusal because Redis is down
    /// comes from the pipeline, behind what was queued before it.
    pub async fn publish_then(&self, channel: &Channel, data: &str, done: PublishDone) {
        // A message larger than the whole byte budget still goes, alone.
        let want = data.len().clamp(1, PUBLISH_QUEUE_BYTES) as u32;
        let Ok(bytes) = self.publish_bytes.clone().acquire_many_owned(want).await else {
            return done(Err(BusError::Unavailable("the edge is shutting down")));
        };
        let job = PublishJob {
            key: self.key(channel),
            data: data.to_owned(),
            done,
            deadline: tokio::time::Instant::now() + self.settings.timeout,
            _bytes: bytes,
            _queued: Queued::new(&self.metrics.redis_publish_queued),
        };
        if let Err(e) = self.publish_tx.send(job).await {
            (e.0.done)(Err(BusError::Unavailable("the edge is shutting down")));
        }
    }

    /// Starts the pipeline task. `stop` should fire only once nothing can publish any more
    /// (after the admin listener, which serves the publish API through the grace period).
    pub fn spawn_publisher(self: &Arc<Self>, stop: CancellationToken) {
        if let Some(rx) = self.publish_rx.lock().take() {
            tokio::spawn(self.clone().run_publisher(rx, stop));
        }
    }

    /// The pipeline task: sends whatever is queued as one pipeline, answers each publish, and
    /// repeats. At shutdown what is still queued is answered `unavailable`.
    async fn run_publisher(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::Receiver<PublishJob>,
        stop: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(PUBLISH_BATCH);
        loop {
            let n = tokio::select! {
                _ = stop.cancelled() => break,
                n = rx.recv_many(&mut batch, PUBLISH_BATCH) => n,
            };
            if n == 0 {
                break;
            }
            if self.server.load(Ordering::Acquire) == SERVER_UNKNOWN && self.is_ready() {
                // Redis was unreachable at start: its version is asked before the first script.
                let _ = self.check_server().await;
            }
            let results = if self.server.load(Ordering::Acquire) == SERVER_TOO_OLD {
                vec![
                    Err(BusError::Unavailable(
                        "Redis is too old (6.2 or later needed)"
                    ));
                    batch.len()
                ]
            } else if !self.is_ready() {
                // Refused here rather than by the caller, so the refusal keeps its place.
                vec![Err(BusError::Unavailable("Redis is unreachable")); batch.len()]
            } else {
                self.send_batch(&batch).await
            };
            for (job, result) in batch.drain(..).zip(results) {
                answer(job, result);
            }
        }
        rx.close();
        while let Ok(job) = rx.try_recv() {
            answer(job, Err(BusError::Unavailable("the edge is shutting down")));
        }
    }

    /// One pipeline: the script, loaded again (a no-op when Redis has it; so a Redis that
    /// restarted never answers NOSCRIPT to part of a batch, which a retry would reorder), then
    /// one script call per job still within its deadline. One outcome per job, in order.
    async fn send_batch(&self, batch: &[PublishJob]) -> Vec<Result<Offset, BusError>> {
        let now = tokio::time::Instant::now();
        let mut outcomes: Vec<Option<Result<Offset, BusError>>> = batch
            .iter()
            .map(|job| {
                // Waited in the queue past its deadline: never sent, so a retry cannot repeat it.
                (job.deadline <= now)
                    .then_some(Err(BusError::Unavailable("publish to Redis timed out")))
            })
            .collect();
        let todo: Vec<usize> = (0..batch.len())
            .filter(|&i| outcomes[i].is_none())
            .collect();
        if todo.is_empty() {
            return self.counted(fill(outcomes, "publish to Redis timed out"));
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("SCRIPT").arg("LOAD").arg(PUBLISH_LUA).ignore();
        for &i in &todo {
            let job = &batch[i];
            pipe.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(3)
                .arg(&job.key)
                .arg(&self.history_index)
                .arg(&self.history_sizes)
                .arg(&job.data)
                .arg(self.settings.history_len)
                .arg(self.settings.history_ttl.as_millis() as u64)
                .arg(&job.key)
                .arg(self.settings.history_ttl_unsubscribed.as_millis() as u64)
                .arg(self.settings.history_bytes)
                .arg(HISTORY_ENTRY_BYTES)
                .arg(HISTORY_CHANNEL_BYTES)
                .arg(HISTORY_TRIM_SLACK)
                .arg(self.settings.history_channel_bytes)
                .arg(HISTORY_EVICTIONS_PER_PUBLISH);
        }
        self.metrics.redis_publish_pipelines.inc();
        let mut conn = self.publisher.clone();
        let call = pipe.query_async::<Vec<redis::RedisResult<PublishReply>>>(&mut conn);
        let why = match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(replies)) if replies.len() == todo.len() => {
                for (&i, reply) in todo.iter().zip(replies) {
                    outcomes[i] = Some(match reply {
                        Ok((id, evicted, bytes, channels)) => {
                            self.metrics.redis_history_evictions.inc_by(evicted);
                            self.metrics.redis_history_bytes.set(bytes);
                            if channels >= 0 {
                                self.metrics.redis_history_channels.set(channels);
                            }
                            id.parse().map_err(|_| {
                                tracing::error!(%id, "Redis returned a stream id that is not an offset");
                                BusError::Unavailable("Redis answered with an unexpected id")
                            })
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "publish to Redis failed");
                            Err(BusError::Unavailable("publish to Redis failed"))
                        }
                    });
                }
                "publish to Redis failed"
            }
            Ok(Ok(_)) => {
                tracing::error!("Redis answered a pipeline with the wrong number of replies");
                "Redis answered with unexpected replies"
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "publish to Redis failed");
                "publish to Redis failed"
            }
            Err(_) => {
                tracing::warn!("publish to Redis timed out");
                "publish to Redis timed out"
            }
        };
        self.counted(fill(outcomes, why))
    }

    /// Counts the failures among `outcomes` in `edgeplex_redis_publish_errors_total` (Redis
    /// refused or did not answer in time; a refusal while Redis is known down is not counted,
    /// as before the pipeline).
    fn counted(&self, outcomes: Vec<Result<Offset, BusError>>) -> Vec<Result<Offset, BusError>> {
        for o in &outcomes {
            if o.is_err() {
                self.publish_errors.inc();
            }
        }
        outcomes
    }

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
        let mut conn = self.publisher.clone();
        let mut call = self.replay_script.key(self.key(channel));
        call.arg(since.to_string())
            .arg(window.frames)
            .arg(window.bytes)
            .arg(REPLAY_FRAME_BYTES);
        let query = call.invoke_async::<ReplayReply>(&mut conn);
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

    /// Makes sure this node is subscribed to `channel` in Redis. Idempotent, and answered at
    /// once when it is: no lock is held across a round trip. Otherwise the channel joins the
    /// next SUBSCRIBE, which carries every channel asked for meanwhile.
    pub async fn ensure_subscribed(&self, channel: &Channel) -> Result<(), BusError> {
        let answer = {
            let mut st = self.subs.lock();
            if st.active.contains(channel) {
                return Ok(());
            }
            // Not before the restore is done: the restore's copy of the table may predate this
            // channel, and nobody else would subscribe it.
            if st.sink.is_none() || !self.is_ready() {
                return Err(BusError::Unavailable("Redis is unreachable"));
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            st.wanted.entry(channel.clone()).or_default().push(tx);
            rx
        };
        self.wanted.notify_one();
        // The command task answers within its command deadline, or drops the waiter when the
        // connection is lost.
        answer
            .await
            .map_err(|_| BusError::Unavailable("cannot subscribe in Redis"))
    }

    /// The hub dropped its last local subscriber of `channel`: it is unsubscribed after
    /// [`UNSUBSCRIBE_DELAY`], with whatever else was dropped meanwhile, unless joined again.
    pub fn channel_dropped(&self, channel: &Channel) {
        {
            // Recorded even while disconnected (a new connection starts afresh from the
            // table): the cap bounds it either way.
            let mut st = self.subs.lock();
            // A subscribe abandoned before its SUBSCRIBE went out: nobody waits for it any
            // more, so it is not sent (see [`RedisBus::activate`] for one already on its way).
            if let Some(waiters) = st.wanted.get_mut(channel) {
                waiters.retain(|w| !w.is_closed());
                if waiters.is_empty() {
                    st.wanted.remove(channel);
                }
            }
            self.note_dropped(&mut st, channel);
        }
        self.changed.notify_one();
    }

    /// Puts `channel` among those the next unsubscribe round looks at, within [`DROPPED_CAP`].
    fn note_dropped(&self, st: &mut SubState, channel: &Channel) {
        if st.resync {
            // The whole table will be compared anyway.
        } else if st.dropped.len() >= DROPPED_CAP {
            st.dropped = HashSet::new();
            st.resync = true;
            self.metrics.redis_resyncs.inc();
        } else {
            st.dropped.insert(channel.clone());
        }
    }

    /// Records `batch` as subscribed, its SUBSCRIBE answered. Those the hub no longer holds
    /// (their subscribe was abandoned while the command was on its way, or before it, if the
    /// unsubscribe round ran first and found them not yet active) go to the dropped set, so
    /// they leave with the next round: the subscriptions never outgrow the hub's table for
    /// longer than that. The hub is asked after the channels are active, so a join after the
    /// question finds them active and the unsubscribe round asks the hub again.
    fn activate(&self, hub: &Hub, batch: &[Channel]) {
        self.subs.lock().active.extend(batch.iter().cloned());
        let orphans: Vec<&Channel> = batch
            .iter()
            .filter(|c| hub.subscriber_count(c.as_str()) == 0)
            .collect();
        let mut st = self.subs.lock();
        self.subscriptions_gauge.set(st.active.len() as i64);
        if orphans.is_empty() {
            return;
        }
        for c in orphans {
            self.note_dropped(&mut st, c);
        }
        drop(st);
        self.changed.notify_one();
    }

    /// Brings the Redis subscriptions in line with the hub's channel table, by copying it: on
    /// a new connection, and when [`DROPPED_CAP`] overflowed.
    async fn reconcile(&self, hub: &Hub) -> Result<(), redis::RedisError> {
        let desired: HashSet<Channel> = hub.channel_names().into_iter().collect();
        let Some(mut sink) = self.subs.lock().sink.clone() else {
            return Ok(());
        };
        let (add, remove) = {
            let st = self.subs.lock();
            let add: Vec<Channel> = desired.difference(&st.active).cloned().collect();
            let remove: Vec<Channel> = st.active.difference(&desired).cloned().collect();
            (add, remove)
        };
        for batch in add.chunks(SUBSCRIBE_BATCH) {
            let keys: Vec<String> = batch.iter().map(|c| self.key(c)).collect();
            self.timed(sink.subscribe(&keys)).await?;
            self.activate(hub, batch);
        }
        self.unsubscribe_unwanted(hub, &mut sink, remove).await?;
        self.subscriptions_gauge
            .set(self.subs.lock().active.len() as i64);
        Ok(())
    }

    /// Unsubscribes those of `candidates` the hub no longer holds. Each leaves the active set
    /// first and only then is the hub asked: a join before the question keeps the channel, and
    /// a join after it finds the channel inactive and queues a SUBSCRIBE, which this task sends
    /// after the UNSUBSCRIBE. So a channel with local subscribers never ends up unsubscribed.
    async fn unsubscribe_unwanted(
        &self,
        hub: &Hub,
        sink: &mut PubSubSink,
        candidates: Vec<Channel>,
    ) -> Result<(), redis::RedisError> {
        let leaving: Vec<Channel> = {
            let mut st = self.subs.lock();
            candidates
                .into_iter()
                .filter(|c| st.active.remove(c))
                .collect()
        };
        let (kept, gone): (Vec<Channel>, Vec<Channel>) = leaving
            .into_iter()
            .partition(|c| hub.subscriber_count(c.as_str()) > 0);
        self.subs.lock().active.extend(kept);
        for batch in gone.chunks(SUBSCRIBE_BATCH) {
            let keys: Vec<String> = batch.iter().map(|c| self.key(c)).collect();
            self.timed(sink.unsubscribe(&keys)).await?;
        }
        Ok(())
    }

    /// Sends one SUBSCRIBE per [`SUBSCRIBE_BATCH`] of the channels asked for, until none waits;
    /// a channel the hub no longer holds is not sent (its waiters, if any, are told
    /// `unavailable`). A failure leaves the waiters unanswered, to be told `unavailable` when
    /// the connection is dropped.
    async fn subscribe_wanted(
        &self,
        hub: &Hub,
        sink: &mut PubSubSink,
    ) -> Result<(), redis::RedisError> {
        loop {
            let taken: Vec<(Channel, Vec<Waiter>)> = {
                let mut st = self.subs.lock();
                let take: Vec<Channel> = st.wanted.keys().take(SUBSCRIBE_BATCH).cloned().collect();
                take.into_iter()
                    .filter_map(|c| st.wanted.remove_entry(&c))
                    .collect()
            };
            if taken.is_empty() {
                return Ok(());
            }
            // Asked after leaving `wanted`: a join after the question queues the channel again.
            let batch: Vec<(Channel, Vec<Waiter>)> = taken
                .into_iter()
                .filter(|(c, _)| hub.subscriber_count(c.as_str()) > 0)
                .collect();
            if batch.is_empty() {
                continue;
            }
            let keys: Vec<String> = batch.iter().map(|(c, _)| self.key(c)).collect();
            self.timed(sink.subscribe(&keys)).await?;
            let (channels, waiters): (Vec<Channel>, Vec<Vec<Waiter>>) = batch.into_iter().unzip();
            self.activate(hub, &channels);
            for waiter in waiters.into_iter().flatten() {
                let _ = waiter.send(());
            }
        }
    }

    /// Unsubscribes what was dropped since the last time (or, after an overflow, whatever the
    /// whole table no longer holds).
    async fn unsubscribe_dropped(
        &self,
        hub: &Hub,
        sink: &mut PubSubSink,
    ) -> Result<(), redis::RedisError> {
        let (dropped, resync) = {
            let mut st = self.subs.lock();
            (
                std::mem::take(&mut st.dropped),
                std::mem::take(&mut st.resync),
            )
        };
        if resync {
            return self.reconcile(hub).await;
        }
        self.unsubscribe_unwanted(hub, sink, dropped.into_iter().collect())
            .await?;
        self.subscriptions_gauge
            .set(self.subs.lock().active.len() as i64);
        Ok(())
    }

    /// The connection's command task: restores every subscription, tells the hub's subscribers
    /// about the gap when this is a reconnect, then sends SUBSCRIBEs, UNSUBSCRIBEs and PINGs one
    /// after another until the connection is lost. Any failure or missed deadline cancels `lost`.
    async fn command_task(
        self: Arc<Self>,
        hub: Weak<Hub>,
        mut sink: PubSubSink,
        lost: CancellationToken,
        reconnect: bool,
    ) {
        if let Err(e) = self.commands(&hub, &mut sink, &lost, reconnect).await {
            tracing::warn!(error = %e, "Redis subscriber connection failed");
        }
        lost.cancel();
    }

    async fn commands(
        &self,
        hub: &Weak<Hub>,
        sink: &mut PubSubSink,
        lost: &CancellationToken,
        reconnect: bool,
    ) -> Result<(), redis::RedisError> {
        {
            let mut st = self.subs.lock();
            *st = SubState::default();
            st.sink = Some(sink.clone());
        }
        let Some(strong) = hub.upgrade() else {
            return Ok(());
        };
        self.reconcile(&strong).await?;
        self.connected.store(true, Ordering::Release);
        self.connected_gauge.set(1);
        if reconnect {
            self.reconnects.inc();
            let channels = strong.channel_names();
            let notified = strong.gap_all(&channels);
            tracing::info!(
                channels = channels.len(),
                notified,
                "Redis is back; subscriptions restored, gap notices sent"
            );
        } else {
            tracing::info!("connected to Redis");
        }
        drop(strong);
        let every = self.settings.ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unsubscribe_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = lost.cancelled() => return Ok(()),
                _ = self.wanted.notified() => {
                    let Some(h) = hub.upgrade() else { return Ok(()) };
                    self.subscribe_wanted(&h, sink).await?;
                }
                _ = self.changed.notified() => {
                    unsubscribe_at.get_or_insert(tokio::time::Instant::now() + UNSUBSCRIBE_DELAY);
                }
                _ = tokio::time::sleep_until(unsubscribe_at.unwrap_or_else(tokio::time::Instant::now)),
                    if unsubscribe_at.is_some() =>
                {
                    unsubscribe_at = None;
                    let Some(h) = hub.upgrade() else { return Ok(()) };
                    self.unsubscribe_dropped(&h, sink).await?;
                }
                _ = ping.tick() => {
                    if let Err(e) = self.timed(sink.ping::<redis::Value>()).await {
                        self.metrics.redis_ping_failures.inc();
                        tracing::warn!(
                            error = %e,
                            "Redis did not answer a PING on the subscriber connection in time"
                        );
                        return Err(e);
                    }
                }
            }
        }
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        match tokio::time::timeout(self.settings.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "Redis command timed out",
            ))),
        }
    }

    /// Delivers what the pump queued: a message, or the gap notice of a channel that lost
    /// messages at the ingest cap, in its place in that channel's order.
    fn ingest(&self, hub: &Hub, item: &Ingest) {
        match item {
            Ingest::Msg(msg) => self.deliver(hub, msg),
            Ingest::Gap(name) => {
                if let Some(channel) = name
                    .strip_prefix(self.settings.prefix.as_str())
                    .and_then(|n| Channel::new(n).ok())
                {
                    hub.gap_all(&[channel]);
                }
            }
            Ingest::GapAll => {
                hub.gap_all(&hub.channel_names());
            }
        }
    }

    /// Turns one pub/sub message into a hub dispatch.
    fn deliver(&self, hub: &Hub, msg: &redis::Msg) {
        let Some(name) = msg
            .get_channel_name()
            .strip_prefix(self.settings.prefix.as_str())
        else {
            return;
        };
        let Ok(channel) = Channel::new(name) else {
            tracing::debug!(
                channel = name,
                "message on a Redis channel that is no edge channel"
            );
            return;
        };
        let Ok(payload) = std::str::from_utf8(msg.get_payload_bytes()) else {
            self.metrics.redis_bad_payloads.inc();
            tracing::warn!(%channel, "dropped a Redis message that is not UTF-8");
            return;
        };
        match parse_envelope(payload) {
            Some((offset, data)) if protocol::check_json_text(data).is_ok() => {
                hub.dispatch(&channel, Some(offset), data);
            }
            _ if protocol::check_json_text(payload).is_ok() => {
                hub.dispatch(&channel, None, payload);
            }
            _ => {
                // A backend published plain text: deliver it as a JSON string rather than drop it.
                let as_string = serde_json::Value::String(payload.to_string()).to_string();
                hub.dispatch(&channel, None, &as_string);
            }
        }
    }

    /// The subscriber connection's life: connect, restore, deliver, and on loss start over with
    /// capped, jittered backoff. Ends when `stop` is cancelled or the hub is gone.
    ///
    /// Per connection, three tasks: a pump moves messages from redis-rs (whose own buffer has
    /// no bound) into the capped ingest queue, dropping what does not fit and queueing gap
    /// notices in its place, and does nothing else, so that buffer stays near empty; this loop
    /// delivers from the queue and never waits on Redis; the command task subscribes,
    /// unsubscribes and pings. Whichever finds the connection lost cancels `lost`.
    pub async fn run(self: Arc<Self>, hub: Weak<Hub>, stop: CancellationToken) {
        let mut backoff = Backoff::default();
        let mut ever_connected = false;
        let mut logged_down = false;
        loop {
            if stop.is_cancelled() {
                return;
            }
            let attempt = self.timed(self.client.get_async_pubsub()).await;
            match attempt {
                Ok(pubsub) => {
                    let (sink, stream) = pubsub.split();
                    let lost = stop.child_token();
                    let (tx, mut ingest) = tokio::sync::mpsc::channel(self.settings.ingest_queue);
                    let room = Arc::new(IngestRoom::default());
                    let pump = tokio::spawn({
                        let (lost, room) = (lost.clone(), room.clone());
                        let stats = IngestStats {
                            overflows: self.metrics.redis_ingest_overflows.clone(),
                            dropped: self.metrics.redis_ingest_dropped.clone(),
                        };
                        async move {
                            // An overflow is not an outage: the pump goes on, and stops only
                            // when the connection does.
                            pump(
                                stream,
                                tx,
                                &room,
                                INGEST_QUEUE_BYTES,
                                INGEST_LOST_CAP,
                                &stats,
                            )
                            .await;
                            lost.cancel();
                        }
                    });
                    let commands = tokio::spawn(self.clone().command_task(
                        hub.clone(),
                        sink,
                        lost.clone(),
                        ever_connected,
                    ));
                    loop {
                        tokio::select! {
                            _ = lost.cancelled() => break,
                            item = ingest.recv() => {
                                let Some(item) = item else { break };
                                room.taken(&item, ingest.len(), ingest.max_capacity(), INGEST_QUEUE_BYTES);
                                match hub.upgrade() {
                                    Some(h) => self.ingest(&h, &item),
                                    None => break,
                                }
                            }
                        }
                    }
                    lost.cancel();
                    pump.abort();
                    commands.abort();
                    if stop.is_cancelled() || hub.strong_count() == 0 {
                        return;
                    }
                    if self.is_ready() {
                        // This connection was restored: the outage starts now.
                        ever_connected = true;
                        logged_down = false;
                        backoff = Backoff::default();
                        tracing::warn!("lost the Redis subscriber connection; reconnecting");
                    }
                    self.mark_down();
                }
                Err(e) => {
                    if !logged_down {
                        tracing::warn!(error = %e, "cannot reach Redis; retrying with backoff");
                        logged_down = true;
                    }
                    self.mark_down();
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next(random_unit())) => {}
            }
        }
    }

    /// Not ready; every waiting subscribe is answered `unavailable` and the next connection
    /// starts from the hub's table.
    fn mark_down(&self) {
        self.connected.store(false, Ordering::Release);
        self.connected_gauge.set(0);
        *self.subs.lock() = SubState::default();
        self.subscriptions_gauge.set(0);
    }
}

#[cfg(test)]
impl RedisBus {
    /// A bus that believes it is connected but whose pipeline task never runs: nothing leaves
    /// the queue, so what it holds is what the caps allow.
    pub(crate) fn stalled_for_tests() -> Arc<RedisBus> {
        let settings = RedisSettings {
            url: "redis://127.0.0.1:1/".into(),
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

/// Hands a job its outcome. A callback that panicked would otherwise end the pipeline task and
/// with it every later publish of the node; it is contained and logged instead.
fn answer(job: PublishJob, result: Result<Offset, BusError>) {
    // The job leaves the queue's counts before its reply is pushed, so a client that has the
    // reply never sees it still counted.
    let PublishJob {
        done,
        _bytes: bytes,
        _queued: queued,
        ..
    } = job;
    drop((bytes, queued));
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || done(result))).is_err() {
        tracing::error!("a publish callback panicked; the pipeline goes on");
    }
}

/// Every job not answered yet gets `why`.
fn fill(
    outcomes: Vec<Option<Result<Offset, BusError>>>,
    why: &'static str,
) -> Vec<Result<Offset, BusError>> {
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or(Err(BusError::Unavailable(why))))
        .collect()
}

/// Splits `{"$edgeplex":"<offset>","data":<data>}` without a full JSON parse.
fn parse_envelope(payload: &str) -> Option<(Offset, &str)> {
    let rest = payload.strip_prefix(ENVELOPE_HEAD)?;
    let end = rest.find('"')?;
    let offset = rest[..end].parse().ok()?;
    let data = rest[end..].strip_prefix(ENVELOPE_DATA)?.strip_suffix('}')?;
    Some((offset, data))
}

/// What the pump hands the delivery loop.
#[derive(Debug)]
enum Ingest {
    Msg(redis::Msg),
    /// Messages of this Redis channel were dropped at the ingest cap: its subscribers get a gap
    /// notice here, behind what was queued before the loss and ahead of what comes after.
    Gap(String),
    /// More channels lost messages than [`INGEST_LOST_CAP`]: every channel's subscribers get one.
    GapAll,
}

impl Ingest {
    /// What it counts against [`INGEST_QUEUE_BYTES`]: a message's channel and payload.
    fn bytes(&self) -> usize {
        match self {
            Ingest::Msg(msg) => msg_bytes(msg),
            Ingest::Gap(_) | Ingest::GapAll => 0,
        }
    }
}

/// What a message counts against [`INGEST_QUEUE_BYTES`].
fn msg_bytes(msg: &redis::Msg) -> usize {
    msg.get_payload_bytes().len() + msg.get_channel_name().len()
}

/// The ingest queue's state shared by the pump and the delivery loop.
#[derive(Debug, Default)]
struct IngestRoom {
    /// Bytes queued (see [`Ingest::bytes`]).
    bytes: AtomicUsize,
    /// The pump holds gap notices until the queue has room again.
    waiting: AtomicBool,
    /// Wakes the pump when it has.
    room: Notify,
}

impl IngestRoom {
    /// The delivery loop took `item`; `left` items remain in a queue of `cap`.
    fn taken(&self, item: &Ingest, left: usize, cap: usize, max_bytes: usize) {
        let n = item.bytes();
        let bytes = self.bytes.fetch_sub(n, Ordering::SeqCst) - n;
        // SeqCst with the pump's store of `waiting` and its look at the queue: one of the two
        // sees the other, so room is never missed.
        if self.waiting.load(Ordering::SeqCst) && has_room(left, cap, bytes, max_bytes) {
            self.room.notify_one();
        }
    }
}

/// After an overflow, room means the queue has drained to half of both caps: the notices go in
/// then, so a channel flooded without pause loses its messages in runs of about half the queue,
/// one notice each, rather than one notice per message dropped.
fn has_room(queued: usize, cap: usize, bytes: usize, max_bytes: usize) -> bool {
    queued <= cap / 2 && bytes <= max_bytes / 2
}

/// What the pump counts.
struct IngestStats {
    /// Losses begun (the queue was full and had been taking everything).
    overflows: Counter,
    /// Messages dropped.
    dropped: Counter,
}

/// Channels that lost messages and whose gap notices wait for room, in the order they lost
/// them; at most a cap's worth, then a notice for every channel instead.
#[derive(Debug, Default)]
struct Lost {
    order: std::collections::VecDeque<String>,
    names: HashSet<String>,
    all: bool,
}

impl Lost {
    fn is_empty(&self) -> bool {
        !self.all && self.order.is_empty()
    }

    /// A message of `name` must wait behind that channel's notice, so it cannot be queued yet.
    fn holds(&self, name: &str) -> bool {
        self.all || self.names.contains(name)
    }

    fn add(&mut self, name: &str, cap: usize) {
        if self.holds(name) {
            return;
        }
        if self.names.len() >= cap {
            self.order = Default::default();
            self.names = HashSet::new();
            self.all = true;
        } else {
            self.names.insert(name.to_owned());
            self.order.push_back(name.to_owned());
        }
    }

    /// Queues the notices that fit. `false` when the delivery loop is gone.
    fn flush(&mut self, queue: &tokio::sync::mpsc::Sender<Ingest>) -> bool {
        use tokio::sync::mpsc::error::TrySendError;
        if self.all {
            match queue.try_send(Ingest::GapAll) {
                Ok(()) => self.all = false,
                Err(TrySendError::Full(_)) => return true,
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        while let Some(name) = self.order.front() {
            match queue.try_send(Ingest::Gap(name.clone())) {
                Ok(()) => {
                    if let Some(name) = self.order.pop_front() {
                        self.names.remove(&name);
                    }
                }
                Err(TrySendError::Full(_)) => break,
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        true
    }
}

/// Moves messages from `stream` into `queue` until the connection ends (or the delivery loop
/// is gone). A message that does not fit the queue's count cap (its capacity) or `max_bytes`
/// (counted in `room`, which the delivery loop lowers) is dropped, and its channel is marked:
/// its later messages are dropped too until the queue has room again, when the channel's gap
/// notice is queued, so each channel's subscribers see what came before the loss, the notice,
/// then what came after. Channels that lost nothing are not touched. One message larger than
/// `max_bytes` still passes alone.
async fn pump(
    mut stream: impl Stream<Item = redis::Msg> + Unpin,
    queue: tokio::sync::mpsc::Sender<Ingest>,
    room: &IngestRoom,
    max_bytes: usize,
    lost_cap: usize,
    stats: &IngestStats,
) {
    use tokio::sync::mpsc::error::TrySendError;
    let cap = queue.max_capacity();
    let mut lost = Lost::default();
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        if !lost.is_empty() {
            room.waiting.store(true, Ordering::SeqCst);
            let queued = cap - queue.capacity();
            if has_room(queued, cap, room.bytes.load(Ordering::SeqCst), max_bytes)
                && !lost.flush(&queue)
            {
                return;
            }
            room.waiting.store(!lost.is_empty(), Ordering::SeqCst);
        }
        let next = if lost.is_empty() {
            stream.next().await
        } else {
            tokio::select! {
                biased;
                _ = room.room.notified() => continue,
                m = stream.next() => m,
            }
        };
        let Some(msg) = next else { return };
        let name = msg.get_channel_name();
        if !lost.holds(name) {
            let n = msg_bytes(&msg);
            let before = room.bytes.fetch_add(n, Ordering::SeqCst);
            if before == 0 || before + n <= max_bytes {
                match queue.try_send(Ingest::Msg(msg)) {
                    Ok(()) => continue,
                    Err(TrySendError::Full(Ingest::Msg(m))) => {
                        room.bytes.fetch_sub(n, Ordering::SeqCst);
                        drop_one(
                            &mut lost,
                            m.get_channel_name(),
                            lost_cap,
                            stats,
                            &mut warned,
                        );
                    }
                    Err(TrySendError::Full(_)) => {
                        room.bytes.fetch_sub(n, Ordering::SeqCst);
                    }
                    Err(TrySendError::Closed(_)) => return,
                }
                continue;
            }
            room.bytes.fetch_sub(n, Ordering::SeqCst);
        }
        drop_one(&mut lost, name, lost_cap, stats, &mut warned);
    }
}

/// Counts one message of `name` dropped at the ingest cap and marks its channel.
fn drop_one(
    lost: &mut Lost,
    name: &str,
    lost_cap: usize,
    stats: &IngestStats,
    warned: &mut Option<tokio::time::Instant>,
) {
    if lost.is_empty() {
        stats.overflows.inc();
        // Once per half minute at most: a flood that goes on begins a loss every drain.
        let now = tokio::time::Instant::now();
        if warned.is_none_or(|w| now - w >= Duration::from_secs(30)) {
            *warned = Some(now);
            tracing::warn!(
                "Redis messages arrive faster than this node delivers them; past the ingest \
                 cap the channels that lose messages get gap notices"
            );
        }
    }
    stats.dropped.inc();
    lost.add(name, lost_cap);
}

/// The subscriber connection's reconnect pauses, from the first after a loss on.
#[derive(Debug)]
struct Backoff {
    cap: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            cap: RECONNECT_FIRST,
        }
    }
}

impl Backoff {
    /// The next pause, drawn by `unit` in [0, 1); the cap doubles for the one after.
    fn next(&mut self, unit: f64) -> Duration {
        let pause = reconnect_pause(self.cap, unit);
        self.cap = (self.cap * 2).min(RECONNECT_MAX);
        pause
    }
}

/// The pause before reconnect attempt with backoff cap `cap`: full jitter, drawn evenly from
/// [`RECONNECT_FLOOR`] to `cap` by `unit` in [0, 1). Nodes that lost Redis at the same moment
/// spread their returns, and so do their clients' resumes after the gap notices.
fn reconnect_pause(cap: Duration, unit: f64) -> Duration {
    let cap = cap.clamp(RECONNECT_FIRST, RECONNECT_MAX);
    RECONNECT_FLOOR + (cap - RECONNECT_FLOOR).mul_f64(unit.clamp(0.0, 1.0))
}

/// A number in [0, 1) that differs between calls and processes: std's hasher is keyed randomly
/// per process (and per call), which is all the jitter needs, without a random-number crate.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
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

    async fn queued(bus: &Arc<RedisBus>, data: String) -> bool {
        let ch = Channel::new("c").unwrap();
        let b = bus.clone();
        let call = async move { b.publish_then(&ch, &data, Box::new(|_| {})).await };
        tokio::time::timeout(Duration::from_millis(50), call)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn publish_queue_count_cap_holds() {
        let bus = RedisBus::stalled_for_tests();
        for i in 0..PUBLISH_QUEUE {
            assert!(queued(&bus, "1".into()).await, "publish {i} fits");
        }
        assert!(
            !queued(&bus, "1".into()).await,
            "one more waits for room instead of growing the queue"
        );
    }

    #[tokio::test]
    async fn publish_queue_byte_cap_holds() {
        let bus = RedisBus::stalled_for_tests();
        let big = format!("\"{}\"", "x".repeat(PUBLISH_QUEUE_BYTES / 2 - 2));
        assert!(queued(&bus, big.clone()).await);
        assert!(
            queued(&bus, big).await,
            "the budget holds exactly two halves"
        );
        assert!(
            !queued(&bus, "1".into()).await,
            "a byte more waits: the queue's bytes are capped"
        );
    }

    fn msg_on(channel: &str, payload: &[u8]) -> redis::Msg {
        redis::Msg::from_owned_value(redis::Value::Array(vec![
            redis::Value::BulkString(b"message".to_vec()),
            redis::Value::BulkString(channel.as_bytes().to_vec()),
            redis::Value::BulkString(payload.to_vec()),
        ]))
        .unwrap()
    }

    fn msg(payload: &[u8]) -> redis::Msg {
        msg_on("t:c", payload)
    }

    fn stats() -> IngestStats {
        IngestStats {
            overflows: Counter::default(),
            dropped: Counter::default(),
        }
    }

    /// `channel:payload` for a message, `gap:channel` for a notice.
    fn show(item: &Ingest) -> String {
        match item {
            Ingest::Msg(m) => format!(
                "{}:{}",
                m.get_channel_name(),
                String::from_utf8_lossy(m.get_payload_bytes())
            ),
            Ingest::Gap(c) => format!("gap:{c}"),
            Ingest::GapAll => "gap:*".into(),
        }
    }

    #[tokio::test]
    async fn ingest_past_its_count_cap_drops_and_keeps_going() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let room = IngestRoom::default();
        let st = stats();
        let msgs = futures_util::stream::iter((0..10).map(|_| msg(b"1")));
        // Ends with the connection (the stream), not at the overflow.
        pump(msgs, tx, &room, 1 << 20, 16, &st).await;
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 4, "the queue holds its cap, and no more");
        assert_eq!((st.overflows.get(), st.dropped.get()), (1, 6));
        // Delivered as fast as it comes: nothing dropped, however many.
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let msgs = futures_util::stream::iter((0..10).map(|_| msg(b"1")));
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let st = stats();
        let msgs = msgs.then(|m| async {
            tokio::task::yield_now().await;
            m
        });
        pump(Box::pin(msgs), tx, &IngestRoom::default(), 1 << 20, 16, &st).await;
        drain.await.unwrap();
        assert_eq!((st.overflows.get(), st.dropped.get()), (0, 0));
    }

    #[tokio::test]
    async fn ingest_past_its_byte_cap_drops_but_one_large_message_passes() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(100);
        let st = stats();
        let big = vec![b'x'; 1000];
        let msgs = futures_util::stream::iter([msg(&big)]);
        pump(msgs, tx, &IngestRoom::default(), 100, 16, &st).await;
        assert!(matches!(rx.try_recv(), Ok(Ingest::Msg(_))));
        assert_eq!(st.dropped.get(), 0);
        let (tx, mut rx) = tokio::sync::mpsc::channel(100);
        let room = IngestRoom::default();
        let msgs = futures_util::stream::iter((0..3).map(|_| msg(&[b'1'; 40])));
        pump(msgs, tx, &room, 100, 16, &st).await;
        assert_eq!(
            st.dropped.get(),
            1,
            "three messages of 43 bytes do not fit 100"
        );
        assert_eq!(
            room.bytes.load(Ordering::SeqCst),
            86,
            "the dropped one is not counted"
        );
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok() && rx.try_recv().is_err());
    }

    /// Drives a pump fed by the test, with a queue of `cap`, taking items as the delivery loop.
    struct Rig {
        feed: tokio::sync::mpsc::UnboundedSender<redis::Msg>,
        rx: tokio::sync::mpsc::Receiver<Ingest>,
        room: Arc<IngestRoom>,
        stats: Arc<IngestStats>,
    }

    impl Rig {
        fn start(cap: usize, lost_cap: usize) -> Rig {
            let (feed, incoming) = tokio::sync::mpsc::unbounded_channel();
            let stream = Box::pin(futures_util::stream::unfold(incoming, |mut r| async {
                r.recv().await.map(|m| (m, r))
            }));
            let (tx, rx) = tokio::sync::mpsc::channel(cap);
            let (room, stats) = (Arc::new(IngestRoom::default()), Arc::new(stats()));
            let (r, s) = (room.clone(), stats.clone());
            tokio::spawn(async move { pump(stream, tx, &r, 1 << 20, lost_cap, &s).await });
            Rig {
                feed,
                rx,
                room,
                stats,
            }
        }

        fn send(&self, channel: &str, payload: &str) {
            self.feed.send(msg_on(channel, payload.as_bytes())).unwrap();
        }

        /// Lets the pump run until it has dropped `n` messages.
        async fn dropped(&self, n: u64) {
            for _ in 0..10_000 {
                if self.stats.dropped.get() >= n {
                    return;
                }
                tokio::task::yield_now().await;
            }
            panic!("{} dropped, not {n}", self.stats.dropped.get());
        }

        async fn take(&mut self) -> String {
            let item = tokio::time::timeout(Duration::from_secs(5), self.rx.recv())
                .await
                .expect("an item")
                .expect("the pump runs");
            let cap = self.rx.max_capacity();
            self.room.taken(&item, self.rx.len(), cap, 1 << 20);
            show(&item)
        }
    }

    #[tokio::test]
    async fn ingest_loss_is_one_gap_per_channel_in_its_place_and_other_channels_are_untouched() {
        let mut rig = Rig::start(2, 16);
        for (c, p) in [("a", "1"), ("a", "2"), ("a", "3"), ("b", "1"), ("a", "4")] {
            rig.send(c, p);
        }
        rig.dropped(3).await;
        assert_eq!(
            (rig.stats.overflows.get(), rig.stats.dropped.get()),
            (1, 3),
            "a3, b1 and a4 do not fit: one loss"
        );
        // Room returns as the delivery loop takes: the notices go in, in the order of loss.
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(rig.take().await);
        }
        rig.send("a", "5");
        rig.send("b", "2");
        for _ in 0..2 {
            got.push(rig.take().await);
        }
        rig.send("c", "1");
        got.push(rig.take().await);
        assert_eq!(
            got,
            ["a:1", "a:2", "gap:a", "gap:b", "a:5", "b:2", "c:1"],
            "each channel: what came before the loss, its notice, what came after"
        );
        assert_eq!(rig.stats.dropped.get(), 3);
    }

    #[tokio::test]
    async fn ingest_losses_on_more_channels_than_the_cap_notify_every_channel_once() {
        let mut rig = Rig::start(1, 2);
        for c in ["a", "b", "c", "d", "b"] {
            rig.send(c, "1");
        }
        rig.dropped(4).await;
        assert_eq!(rig.take().await, "a:1");
        assert_eq!(
            rig.take().await,
            "gap:*",
            "b, c and d lost: past the cap of 2"
        );
        rig.send("b", "2");
        assert_eq!(rig.take().await, "b:2");
        assert_eq!(rig.stats.dropped.get(), 4);
    }

    #[tokio::test]
    async fn dropped_channels_past_their_cap_turn_into_one_resync() {
        let bus = RedisBus::stalled_for_tests();
        for i in 0..DROPPED_CAP {
            bus.channel_dropped(&Channel::new(&format!("c{i}")).unwrap());
        }
        assert_eq!(bus.subs.lock().dropped.len(), DROPPED_CAP);
        assert_eq!(bus.metrics.redis_resyncs.get(), 0);
        bus.channel_dropped(&Channel::new("one-more").unwrap());
        bus.channel_dropped(&Channel::new("and-another").unwrap());
        let st = bus.subs.lock();
        assert!(st.resync && st.dropped.is_empty(), "the set is freed");
        assert_eq!(bus.metrics.redis_resyncs.get(), 1);
    }

    #[test]
    fn reconnect_pauses_stay_within_min_and_the_cap_and_spread_over_it() {
        assert_eq!(reconnect_pause(RECONNECT_MAX, 0.0), RECONNECT_FLOOR);
        assert_eq!(reconnect_pause(RECONNECT_MAX, 1.0), RECONNECT_MAX);
        assert_eq!(
            reconnect_pause(Duration::from_secs(3600), 1.0),
            RECONNECT_MAX
        );
        let draws: Vec<Duration> = (0..2000)
            .map(|_| reconnect_pause(RECONNECT_MAX, random_unit()))
            .collect();
        assert!(
            draws
                .iter()
                .all(|d| (RECONNECT_FLOOR..=RECONNECT_MAX).contains(d))
        );
        // Evenly spread: each fifth of the range gets a fair share, and no two nodes are
        // likely to pick the same instant.
        let span = (RECONNECT_MAX - RECONNECT_FLOOR).as_secs_f64();
        let mut fifths = [0usize; 5];
        for d in &draws {
            let at = (d.saturating_sub(RECONNECT_FLOOR).as_secs_f64() / span * 5.0) as usize;
            fifths[at.min(4)] += 1;
        }
        assert!(fifths.iter().all(|&n| n > 300), "{fifths:?}");
        let distinct: HashSet<Duration> = draws.iter().copied().collect();
        assert!(distinct.len() > 1990, "{} distinct", distinct.len());
    }

    /// The first pause after a loss is the one every node that lost Redis at the same moment
    /// takes: it must be spread as well, over a window short enough for a blip.
    #[test]
    fn the_first_reconnect_after_a_loss_is_jittered_too_and_quick() {
        let firsts: Vec<Duration> = (0..2000)
            .map(|_| Backoff::default().next(random_unit()))
            .collect();
        let (lo, hi) = (*firsts.iter().min().unwrap(), *firsts.iter().max().unwrap());
        assert!(
            lo >= Duration::from_millis(20) && hi <= Duration::from_secs(1),
            "first pauses from {lo:?} to {hi:?}: quick after a blip"
        );
        assert!(
            hi - lo >= Duration::from_millis(700),
            "first pauses from {lo:?} to {hi:?}: nodes come back in one instant"
        );
        let span = (hi - lo).as_secs_f64();
        let mut fifths = [0usize; 5];
        for d in &firsts {
            let at = ((*d - lo).as_secs_f64() / span * 5.0) as usize;
            fifths[at.min(4)] += 1;
        }
        assert!(fifths.iter().all(|&n| n > 300), "{fifths:?}");
        let distinct: HashSet<Duration> = firsts.iter().copied().collect();
        assert!(distinct.len() > 1990, "{} distinct", distinct.len());
        // Then the cap doubles up to the largest, and a loss starts over.
        let mut b = Backoff::default();
        let tops: Vec<Duration> = (0..5).map(|_| b.next(1.0)).collect();
        assert_eq!(tops[0], RECONNECT_FIRST);
        assert!(
            tops.windows(2)
                .all(|w| w[1] == (w[0] * 2).min(RECONNECT_MAX))
        );
        assert_eq!(tops[4], RECONNECT_MAX);
    }
}
