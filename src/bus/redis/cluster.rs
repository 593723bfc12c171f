//! Redis Cluster mode of the Redis bus (`bus.redis_cluster`): sharded pub/sub and per-slot
//! history keys.
//!
//! Channel `C` is the shard channel `<prefix>{C}` and its history the stream with the same name:
//! the hash tag puts both in one slot, so the publish script (the same one as for one Redis,
//! told to `SPUBLISH`) stays atomic. The history budget cannot be global in a cluster (a script
//! touches one slot), so its index and size keys are per slot, `<prefix>{<tag>}#history` and
//! `…#history-bytes`, where `<tag>` is a short string that hashes to the channel's slot (see
//! [`slot_tag`]); each slot is given [`slot_budget`].
//!
//! One `redis::cluster_async::ClusterConnection` (RESP3, push messages) carries the
//! subscriptions, the passes and the resumes: it holds one multiplexed connection per master,
//! routes each command by slot and follows MOVED. Publishes are grouped per master and sent as
//! one pipeline each, all at once, on a publish connection per master of their own (see
//! `Cluster::publishers` for why not the cluster connection); a publish Redis refused before
//! running it (MOVED, ASK, TRYAGAIN, …) is sent again where Redis said, within
//! `bus.redis_timeout`, and any other failure answers `unavailable`. Subscriptions
//! are `SSUBSCRIBE`s sent by one task in rounds, like the SUBSCRIBEs of one Redis: a round
//! carries every channel asked for since the last, one SSUBSCRIBE per slot (a shard subscribe
//! names channels of one slot only), all at once, and rounds and unsubscribes take turns, so a
//! drop and a join of the same channel cannot cross.
//!
//! A subscription can be lost three ways, and each one ends in a resubscribe and a `gap` to that
//! channel's subscribers, never to the others:
//! - the slot moved or its master failed over: Redis sends an unsolicited `sunsubscribe`; the
//!   channel is subscribed again at once (the MOVED answer refreshes the client's slot map);
//! - the connection to a master was made again (redis-rs resubscribes on its own);
//! - anything else: a reconciliation pass every `bus.redis_ping_interval` reads the topology
//!   (`CLUSTER SLOTS`) and asks each master about this node's connection (`CLUSTER MYID` and
//!   `CLIENT INFO`: its id and `ssub`, the shard channels it holds). A channel whose master
//!   changed, whose connection's id changed, or on a master holding fewer subscriptions than
//!   this node expects there, is subscribed again. The pass is also what `/readyz` means: the
//!   cluster answered it.
//!
//! An `ssubscribe` confirmation nobody asked for is not by itself an interruption: redis-rs
//! sends the tracked subscriptions again to every master each time it refreshes its slot map
//! (a MOVED, a failover elsewhere), and a master that never lost them confirms them again. It
//! only calls for a pass, and the channel gets a gap when the pass finds its master's
//! connection changed (a master the pass cannot ask is asked again by the next pass, and a
//! master never asked before cannot tell, so its channels get a gap).
//!
//! A master's shard subscriptions are checked by count (`ssub` against the channels this node
//! placed there), leaving out the channels on their way: a slot that just moved to a master
//! brings channels this node has not subscribed there yet, and counting them made the master
//! that received the slot look as if it had lost subscriptions, so every channel on it got a
//! gap (issue 17: the reshard test saw it on the receiving master's channels).
//!
//! The pass asks each master through a slot it serves, never by address: redis-rs answers a
//! command routed to an address it holds no live connection for (a master just killed) with
//! `ClusterConnectionNotFound`, which it handles by dropping every connection and connecting
//! to the seeds again, up to once per retry: every master's subscriptions were lost for a
//! moment, each pass, until the failover was over. Routed by slot, a dead master's question
//! goes to its replica or another node, and `CLUSTER MYID` tells the answer is not its own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{PushInfo, PushKind, Value};

use super::*;
use crate::metrics::NodeLabels;

/// Slots in a Redis Cluster.
const SLOTS: usize = 16384;
/// `bus.history_bytes` is divided by this for one slot's budget: it is what a few hundred busy
/// slots hold together, about what one Redis was given. A whole-cluster bound would leave
/// 4 KiB per slot at the default, less than one stream.
pub const CLUSTER_SLOT_BUDGET_SHARE: usize = 256;
/// Rounds a publish pipeline may take, at most, when Redis refuses publishes before running
/// them because their slot moved, is moving, or has no master yet (MOVED, ASK, TRYAGAIN,
/// CLUSTERDOWN, …): the first send and four more, all within `bus.redis_timeout`.
const PUBLISH_ROUNDS: u32 = 5;
/// The first pause before a round that waits for a slot to settle (TRYAGAIN, CLUSTERDOWN);
/// doubled each round after.
const PUBLISH_RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Masters labelled in the per-master metrics, at most: the topology names them, but a cluster
/// that churns addresses must not grow the families without bound.
const NODE_LABELS_CAP: usize = 64;

/// What one slot's histories may hold: `bus.history_bytes / 256`, and at least one channel's.
pub fn slot_budget(history_bytes: usize, history_channel_bytes: usize) -> usize {
    (history_bytes / CLUSTER_SLOT_BUDGET_SHARE).max(history_channel_bytes)
}

/// The slot of `key`, as Redis Cluster computes it: CRC16-XMODEM of the hash tag (the bytes
/// between the first `{` and the next `}`, when not empty) or of the whole key.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&c| c == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&c| c == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(key) {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS as u16
}

/// A short hash tag for each slot (the first number, in base 36, that hashes there): the history
/// index of slot `s` is `<prefix>{<slot_tag(s)>}#history`, in slot `s`.
pub fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); SLOTS];
        let mut left = SLOTS;
        let mut n: u64 = 0;
        while left > 0 {
            let tag = base36(n);
            let s = key_slot(tag.as_bytes()) as usize;
            if tags[s].is_empty() {
                tags[s] = tag;
                left -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[slot as usize % SLOTS]
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Subscriptions in cluster mode. Every set holds channels of the hub's (capped) table, or
/// channels on their way out of it, so none grows past that.
#[derive(Debug, Default)]
struct Subs {
    /// Subscribed (confirmed once) and wanted.
    active: HashSet<Channel>,
    /// Channels waiting for the next subscribe round, and who waits for each; only channels
    /// of the hub's table are asked for.
    wanted: HashMap<Channel, Vec<Waiter>>,
    /// Our own SSUBSCRIBEs whose confirmation push has not come yet.
    asking: HashMap<Channel, u32>,
    /// Our own SUNSUBSCRIBEs whose confirmation push has not come yet.
    leaving: HashMap<Channel, u32>,
    /// The master each active channel was on at the last pass.
    home: HashMap<Channel, String>,
    /// Redis dropped them (slot moved, failover): subscribe again and send a gap.
    moved: HashSet<Channel>,
    /// redis-rs subscribed them again on its own (a reconnect, or a slot map refresh): a gap
    /// if the pass finds their master's connection changed, or cannot tell.
    regained: HashSet<Channel>,
    /// The hub dropped their last subscriber; at most [`DROPPED_CAP`].
    dropped: HashSet<Channel>,
    resync: bool,
}

/// One row of `CLUSTER SLOTS`: a slot range (inclusive), its master's `host:port` and node id.
#[derive(Debug, Clone, PartialEq)]
struct SlotRange {
    first: u16,
    last: u16,
    master: String,
    id: String,
}

/// The cluster's masters as the last pass saw them.
#[derive(Debug, Default)]
struct Topology {
    /// Slot ranges (inclusive) and the master's `host:port`.
    ranges: Vec<SlotRange>,
    /// Each master's id for this node's connection (`CLIENT INFO`), to see reconnects.
    client_ids: HashMap<String, u64>,
    /// Slots a MOVED answer placed since the last pass read the ranges (at most one entry a
    /// slot; emptied by each pass).
    moved: HashMap<u16, String>,
}

impl Topology {
    fn master_of(&self, slot: u16) -> Option<&str> {
        if let Some(m) = self.moved.get(&slot) {
            return Some(m);
        }
        self.ranges
            .iter()
            .find(|r| (r.first..=r.last).contains(&slot))
            .map(|r| r.master.as_str())
    }
}

/// Why Redis refused a publish without running it, so that sending it again cannot repeat it.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// MOVED: the slot is served by this address now.
    Moved(String),
    /// ASK: the slot is migrating and the key is at this address already.
    Ask(String),
    /// TRYAGAIN (the slot's keys are split by a migration), CLUSTERDOWN, MASTERDOWN, LOADING,
    /// READONLY (a master demoted by a failover): wait a little, or for the next pass.
    Wait,
}

/// A publish's error that proves the script did not run, and how to send it again; `None` for
/// any other (it may have run, or will fail again).
fn refusal(e: &redis::RedisError) -> Option<Refusal> {
    use redis::{ErrorKind, ServerErrorKind as K};
    let redirect = || e.redirect_node().map(|(addr, _slot)| addr.to_owned());
    match e.kind() {
        ErrorKind::Server(K::Moved) => redirect().map(Refusal::Moved),
        ErrorKind::Server(K::Ask) => redirect().map(Refusal::Ask),
        ErrorKind::Server(
            K::TryAgain | K::ClusterDown | K::MasterDown | K::BusyLoading | K::ReadOnly,
        ) => Some(Refusal::Wait),
        _ => None,
    }
}

/// What the publish script last answered for each slot's histories. A slot's budget keys are
/// its own, so the node's history gauges are the sum over the slots it has published to, each
/// as of its last publish there. At most one entry per slot.
#[derive(Debug, Default)]
struct SlotHistories {
    /// Bytes and channels per slot; channels stay unknown (not counted) until a publish that
    /// counts them (the script skips the count when the index did not change).
    slots: HashMap<u16, (i64, Option<i64>)>,
    bytes: i64,
    channels: i64,
}

impl SlotHistories {
    /// Records one publish's answer for `slot`; returns the sums (bytes, channels).
    fn record(&mut self, slot: u16, bytes: i64, channels: i64) -> (i64, i64) {
        // Wrapping: the figures come from Redis, and a sum that overflowed must not panic.
        let entry = self.slots.entry(slot).or_insert((0, None));
        self.bytes = self.bytes.wrapping_add(bytes.wrapping_sub(entry.0));
        entry.0 = bytes;
        if channels >= 0 {
            let was = entry.1.unwrap_or(0);
            self.channels = self.channels.wrapping_add(channels.wrapping_sub(was));
            entry.1 = Some(channels);
        }
        (self.bytes, self.channels)
    }
}

pub(super) struct Cluster {
    client: redis::cluster::ClusterClient,
    /// The first seed's connection settings (credentials, TLS), given each master's address
    /// for its publish connection.
    node_info: redis::ConnectionInfo,
    ca: Option<Vec<u8>>,
    /// One publish connection per master, made on first use; only the pipeline task uses
    /// them. Not the cluster connection: redis-rs answers a pipeline in which one command got
    /// MOVED (or ASK, TRYAGAIN) by sending the whole pipeline again elsewhere, so the
    /// publishes of slots that had not moved ran twice; with its retries off it answers the
    /// whole pipeline with that one error, and nobody can tell which publishes ran. On a
    /// connection of its own each publish gets its own answer, and only those Redis refused
    /// before running them are sent again. At most [`NODE_LABELS_CAP`].
    publishers: parking_lot::Mutex<HashMap<String, MultiplexedConnection>>,
    histories: parking_lot::Mutex<SlotHistories>,
    conn: parking_lot::Mutex<Option<ClusterConnection>>,
    pushes: parking_lot::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<PushInfo>>>,
    subs: parking_lot::Mutex<Subs>,
    topology: parking_lot::Mutex<Topology>,
    /// Serialises SSUBSCRIBE and SUNSUBSCRIBE, so a drop and a join of one channel keep order.
    order: tokio::sync::Mutex<()>,
    /// Something needs a pass now (a connection dropped, Redis dropped a subscription).
    urgent: Notify,
    /// The hub dropped a channel.
    changed: Notify,
    /// A channel was asked for: the subscribe task sends the next round.
    wanted: Notify,
    hub: OnceLock<Weak<Hub>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").finish_non_exhaustive()
    }
}

impl Cluster {
    /// `ca`: the PEM of `bus.redis_ca`, trusted for `rediss://` seeds (and the nodes they name).
    pub(super) fn new(
        seeds: &[String],
        timeout: Duration,
        ca: Option<Vec<u8>>,
    ) -> Result<Cluster, redis::RedisError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // redis-rs's own push channel is unbounded too; the pump drains it into the capped
        // ingest queue at once, so it stays near empty (as with one Redis).
        let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .connection_timeout(timeout)
            .response_timeout(timeout);
        // Certificates turn TLS on for every node: only for seeds that ask for TLS.
        let ca = ca.filter(|_| seeds.iter().any(|s| s.starts_with("rediss://")));
        if let Some(pem) = &ca {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            });
        }
        let client = builder.build()?;
        let node_info = redis::IntoConnectionInfo::into_connection_info(
            seeds.first().map_or("", String::as_str),
        )?;
        Ok(Cluster {
            client,
            node_info,
            ca,
            publishers: parking_lot::Mutex::new(HashMap::new()),
            histories: parking_lot::Mutex::new(SlotHistories::default()),
            conn: parking_lot::Mutex::new(None),
            pushes: parking_lot::Mutex::new(Some(rx)),
            subs: parking_lot::Mutex::new(Subs::default()),
            topology: parking_lot::Mutex::new(Topology::default()),
            order: tokio::sync::Mutex::new(()),
            urgent: Notify::new(),
            changed: Notify::new(),
            wanted: Notify::new(),
            hub: OnceLock::new(),
        })
    }

    pub(super) fn conn(&self) -> Option<ClusterConnection> {
        self.conn.lock().clone()
    }

    /// The publish connection to the master at `addr` (`host:port`), made when there is none.
    async fn publisher(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> Result<MultiplexedConnection, redis::RedisError> {
        if let Some(c) = self.publishers.lock().get(addr) {
            return Ok(c.clone());
        }
        let bad = || redis::RedisError::from(std::io::Error::other("not a host:port address"));
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match self.node_info.addr() {
            redis::ConnectionAddr::TcpTls { insecure, .. } => Some(*insecure),
            _ => None,
        };
        let info = self.node_info.clone().set_addr(match tls {
            Some(insecure) => redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                tls_params: None,
            },
            None => redis::ConnectionAddr::Tcp(host, port),
        });
        let client = match (&self.ca, tls) {
            (Some(pem), Some(_)) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            )?,
            _ => redis::Client::open(info)?,
        };
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let mut publishers = self.publishers.lock();
        // Past the cap (a cluster churning addresses) a connection serves this round only.
        if publishers.len() < NODE_LABELS_CAP {
            publishers.insert(addr.to_owned(), conn.clone());
        }
        Ok(conn)
    }
}

/// `<prefix>{C}`: the shard channel and the history stream.
pub(super) fn cluster_key(prefix: &str, channel: &Channel) -> String {
    format!("{prefix}{{{}}}", channel.as_str())
}

fn addr_label(addr: &str) -> NodeLabels {
    NodeLabels {
        node: addr.to_owned(),
    }
}

impl RedisBus {
    fn cl(&self) -> &Cluster {
        self.cluster.as_ref().expect("cluster mode")
    }

    /// Whether a per-master metric may carry `addr` (see [`NODE_LABELS_CAP`]).
    fn labelled(&self, addr: &str) -> bool {
        let t = self.cl().topology.lock();
        t.client_ids.contains_key(addr) || t.client_ids.len() < NODE_LABELS_CAP
    }

    /// One pipeline per master (as the last pass saw the slots, and MOVED answers since), all
    /// sent at once on the publish connections. Publishes Redis refused without running them
    /// (their slot moved, is migrating, or has no master for the moment) go again in another
    /// round, to the address Redis named or once the slot settled, up to [`PUBLISH_ROUNDS`]
    /// and within `bus.redis_timeout`; then, and for any other failure, `unavailable`. A
    /// publish is never sent again after an answer that does not prove it did not run.
    pub(super) async fn send_batch_cluster(
        &self,
        batch: &[PublishJob],
    ) -> Vec<Result<Offset, BusError>> {
        let started = tokio::time::Instant::now();
        let until = started + self.settings.timeout;
        let mut outcomes: Vec<Option<Result<Offset, BusError>>> = batch
            .iter()
            .map(|job| {
                (job.deadline <= started)
                    .then_some(Err(BusError::Unavailable("publish to Redis timed out")))
            })
            .collect();
        // (job, slot, the address an ASK named)
        let mut pending: Vec<(usize, u16, Option<String>)> = (0..batch.len())
            .filter(|&i| outcomes[i].is_none())
            .map(|i| (i, key_slot(batch[i].key.as_bytes()), None))
            .collect();
        let mut urgent = false;
        let mut round = 0;
        while !pending.is_empty() {
            round += 1;
            let mut groups: BTreeMap<String, Vec<(usize, u16, bool)>> = BTreeMap::new();
            {
                let t = self.cl().topology.lock();
                for (i, slot, ask) in pending.drain(..) {
                    let asking = ask.is_some();
                    match ask.or_else(|| t.master_of(slot).map(str::to_owned)) {
                        Some(addr) => groups.entry(addr).or_default().push((i, slot, asking)),
                        None => {
                            outcomes[i] = Some(Err(BusError::Unavailable(
                                "no Redis Cluster master serves the channel",
                            )))
                        }
                    }
                }
            }
            let calls = groups
                .into_iter()
                .map(|(addr, jobs)| self.send_to_master(batch, addr, jobs, until));
            self.metrics.redis_publish_pipelines.inc();
            let mut wait = false;
            for (addr, jobs, replies) in futures_util::future::join_all(calls).await {
                let mut failed = 0;
                match replies {
                    Ok(replies) => {
                        for (&(i, slot, _), reply) in jobs.iter().zip(replies) {
                            let e = match reply {
                                Ok(reply) => {
                                    outcomes[i] = Some(self.published(slot, reply));
                                    continue;
                                }
                                Err(e) => e,
                            };
                            let why = refusal(&e);
                            if why.is_some() {
                                tracing::debug!(error = %e, master = %addr, round, "publish refused before it ran; sending it again");
                            }
                            match why {
                                Some(Refusal::Moved(to)) => {
                                    self.cl().topology.lock().moved.insert(slot, to);
                                    urgent = true;
                                    pending.push((i, slot, None));
                                }
                                Some(Refusal::Ask(to)) => pending.push((i, slot, Some(to))),
                                Some(Refusal::Wait) => {
                                    urgent = true;
                                    wait = true;
                                    pending.push((i, slot, None));
                                }
                                None => {
                                    failed += 1;
                                    tracing::warn!(error = %e, master = %addr, "publish to Redis Cluster failed");
                                    outcomes[i] =
                                        Some(Err(BusError::Unavailable("publish to Redis failed")));
                                }
                            }
                        }
                    }
                    Err(e) => {
                        // Sent or not, run or not: nobody can tell, so none goes again.
                        failed = jobs.len();
                        urgent = true;
                        self.cl().publishers.lock().remove(&addr);
                        tracing::warn!(error = %e, master = %addr, "publish to Redis Cluster failed");
                    }
                }
                if failed > 0 && self.labelled(&addr) {
                    self.metrics
                        .redis_cluster_publish_errors
                        .get_or_create(&addr_label(&addr))
                        .inc_by(failed as u64);
                }
            }
            if pending.is_empty() {
                break;
            }
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if round >= PUBLISH_ROUNDS || left.is_zero() {
                tracing::warn!(
                    publishes = pending.len(),
                    "Redis Cluster kept refusing publishes (slot moving or without a master)"
                );
                break;
            }
            if wait {
                tokio::time::sleep((PUBLISH_RETRY_PAUSE * 2u32.pow(round - 1)).min(left)).await;
            }
        }
        if urgent {
            // The topology may have changed under us: look again now, not at the next tick.
            self.cl().urgent.notify_one();
        }
        self.counted(fill(
            outcomes,
            "publish to Redis Cluster refused, slot moving",
        ))
    }

    /// One round's pipeline to the master at `addr`: the script loaded (a master that gained
    /// a slot may not have it), then each job's script call, after `ASKING` for a job an ASK
    /// sent there. One answer per job, or one error for all when the pipeline failed.
    async fn send_to_master(
        &self,
        batch: &[PublishJob],
        addr: String,
        jobs: Vec<(usize, u16, bool)>,
        until: tokio::time::Instant,
    ) -> (
        String,
        Vec<(usize, u16, bool)>,
        Result<Vec<redis::RedisResult<PublishReply>>, redis::RedisError>,
    ) {
        let budget = slot_budget(
            self.settings.history_bytes,
            self.settings.history_channel_bytes,
        );
        let prefix = &self.settings.prefix;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("SCRIPT").arg("LOAD").arg(PUBLISH_LUA).ignore();
        for &(i, slot, asking) in &jobs {
            let job = &batch[i];
            let tag = slot_tag(slot);
            if asking {
                pipe.cmd("ASKING").ignore();
            }
            pipe.cmd("EVALSHA")
                .arg(self.script.get_hash())
                .arg(3)
                .arg(&job.key)
                .arg(format!("{prefix}{{{tag}}}#history"))
                .arg(format!("{prefix}{{{tag}}}#history-bytes"))
                .arg(&job.data)
                .arg(self.settings.history_len)
                .arg(self.settings.history_ttl.as_millis() as u64)
                .arg(&job.key)
                .arg(self.settings.history_ttl_unsubscribed.as_millis() as u64)
                .arg(budget)
                .arg(HISTORY_ENTRY_BYTES)
                .arg(HISTORY_CHANNEL_BYTES)
                .arg(HISTORY_TRIM_SLACK)
                .arg(self.settings.history_channel_bytes)
                .arg(HISTORY_EVICTIONS_PER_PUBLISH)
                .arg("SPUBLISH");
        }
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let call = async {
            let mut conn = self.cl().publisher(&addr, left).await?;
            let replies: Vec<redis::RedisResult<PublishReply>> =
                pipe.query_async(&mut conn).await?;
            if replies.len() == jobs.len() {
                Ok(replies)
            } else {
                tracing::error!("Redis answered a pipeline with the wrong number of replies");
                Err(redis::RedisError::from(std::io::Error::other(
                    "wrong number of replies",
                )))
            }
        };
        let r = match tokio::time::timeout(left, call).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "publish to Redis Cluster timed out",
            ))),
        };
        (addr, jobs, r)
    }

    /// A publish's answer: its offset, with the history metrics it reports.
    fn published(&self, slot: u16, reply: PublishReply) -> Result<Offset, BusError> {
        let (id, evicted, bytes, channels) = reply;
        self.metrics.redis_history_evictions.inc_by(evicted);
        let (bytes, channels) = self.cl().histories.lock().record(slot, bytes, channels);
        self.metrics.redis_history_bytes.set(bytes);
        self.metrics.redis_history_channels.set(channels);
        id.parse()
            .map_err(|_| BusError::Unavailable("Redis answered with an unexpected id"))
    }

    /// Cluster mode of [`RedisBus::ensure_subscribed`]: answered at once when the channel is
    /// subscribed; otherwise it joins the next subscribe round, which carries every channel
    /// asked for meanwhile ([`RedisBus::subscribe_wanted_cluster`]).
    pub(super) async fn ensure_subscribed_cluster(
        &self,
        channel: &Channel,
    ) -> Result<(), BusError> {
        let cl = self.cl();
        let answer = {
            let mut st = cl.subs.lock();
            if st.active.contains(channel) {
                return Ok(());
            }
            if !self.is_ready() || cl.conn.lock().is_none() {
                return Err(BusError::Unavailable("Redis Cluster is unreachable"));
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            st.wanted.entry(channel.clone()).or_default().push(tx);
            rx
        };
        cl.wanted.notify_one();
        // The subscribe task answers within its command deadline, or drops the waiter.
        answer
            .await
            .map_err(|_| BusError::Unavailable("cannot subscribe in Redis"))
    }

    /// The subscribe task: a round whenever channels are asked for, in order with the
    /// unsubscribes and the passes' resubscribes.
    async fn subscribe_task(self: Arc<Self>, hub: Weak<Hub>, stop: CancellationToken) {
        let cl = self.cl();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = cl.wanted.notified() => {}
            }
            let Some(h) = hub.upgrade() else { break };
            let _order = cl.order.lock().await;
            self.subscribe_wanted_cluster(&h).await;
        }
        // Nobody will send them: their callers are told `unavailable`.
        cl.subs.lock().wanted.clear();
    }

    /// Sends what was asked for, until nothing waits: one SSUBSCRIBE per slot (a shard
    /// subscribe names channels of one slot), up to [`SUBSCRIBE_BATCH`] channels each, all at
    /// once, so each master gets its share back to back on its connection rather than one
    /// round trip per channel. A channel the hub no longer holds is not sent (its waiters are
    /// told `unavailable`); one that fails is told `unavailable` too.
    async fn subscribe_wanted_cluster(&self, hub: &Hub) {
        let cl = self.cl();
        let Some(conn) = cl.conn() else {
            cl.subs.lock().wanted.clear();
            return;
        };
        loop {
            let taken: Vec<(Channel, Vec<Waiter>)> = cl.subs.lock().wanted.drain().collect();
            if taken.is_empty() {
                return;
            }
            let mut by_slot: BTreeMap<u16, Vec<(Channel, Vec<Waiter>)>> = BTreeMap::new();
            for (c, waiters) in taken {
                if cl.subs.lock().active.contains(&c) {
                    for w in waiters {
                        let _ = w.send(());
                    }
                } else if hub.subscriber_count(c.as_str()) > 0 {
                    by_slot
                        .entry(key_slot(self.key(&c).as_bytes()))
                        .or_default()
                        .push((c, waiters));
                }
            }
            let mut rounds: Vec<Vec<(Channel, Vec<Waiter>)>> = Vec::new();
            for (_, mut channels) in by_slot {
                while channels.len() > SUBSCRIBE_BATCH {
                    let rest = channels.split_off(SUBSCRIBE_BATCH);
                    rounds.push(std::mem::replace(&mut channels, rest));
                }
                rounds.push(channels);
            }
            let calls = rounds.into_iter().map(|batch| {
                let mut conn = conn.clone();
                let keys: Vec<String> = {
                    let mut st = cl.subs.lock();
                    for (c, _) in &batch {
                        *st.asking.entry(c.clone()).or_default() += 1;
                    }
                    batch.iter().map(|(c, _)| self.key(c)).collect()
                };
                async move {
                    let r = self.timed(conn.ssubscribe(keys)).await;
                    (batch, r)
                }
            });
            let mut activated = Vec::new();
            for (batch, r) in futures_util::future::join_all(calls).await {
                match r {
                    Ok(()) => {
                        let homes: Vec<Option<String>> = {
                            let t = cl.topology.lock();
                            batch
                                .iter()
                                .map(|(c, _)| {
                                    t.master_of(key_slot(self.key(c).as_bytes()))
                                        .map(str::to_owned)
                                })
                                .collect()
                        };
                        let mut st = cl.subs.lock();
                        for ((c, waiters), home) in batch.into_iter().zip(homes) {
                            st.active.insert(c.clone());
                            if let Some(home) = home {
                                st.home.insert(c.clone(), home);
                            }
                            for w in waiters {
                                let _ = w.send(());
                            }
                            activated.push(c);
                        }
                    }
                    Err(e) => {
                        // A late confirmation then counts as one redis-rs sent on its own: a
                        // spurious gap at worst, never a missed one.
                        let mut st = cl.subs.lock();
                        for (c, _) in &batch {
                            unmark(&mut st.asking, c);
                        }
                        tracing::warn!(error = %e, channels = batch.len(), "SSUBSCRIBE failed");
                    }
                }
            }
            self.subscriptions_gauge
                .set(cl.subs.lock().active.len() as i64);
            // Abandoned while their SSUBSCRIBE was on its way: they leave with the next round.
            for c in activated {
                if hub.subscriber_count(c.as_str()) == 0 {
                    self.channel_dropped_cluster(&c);
                }
            }
        }
    }

    pub(super) fn channel_dropped_cluster(&self, channel: &Channel) {
        let cl = self.cl();
        {
            let mut st = cl.subs.lock();
            // A subscribe abandoned before its round: nobody waits for it any more.
            if let Some(waiters) = st.wanted.get_mut(channel) {
                waiters.retain(|w| !w.is_closed());
                if waiters.is_empty() {
                    st.wanted.remove(channel);
                }
            }
            if st.resync {
            } else if st.dropped.len() >= DROPPED_CAP {
                st.dropped = HashSet::new();
                st.resync = true;
                self.metrics.redis_resyncs.inc();
            } else {
                st.dropped.insert(channel.clone());
            }
        }
        cl.changed.notify_one();
    }

    /// SUNSUBSCRIBEs what the hub dropped and no longer holds. A channel leaves `active` before
    /// the hub is asked, so a join after the question subscribes it again after this.
    async fn unsubscribe_dropped_cluster(&self, hub: &Hub) {
        let cl = self.cl();
        let Some(mut conn) = cl.conn() else { return };
        let _order = cl.order.lock().await;
        let candidates: Vec<Channel> = {
            let mut st = cl.subs.lock();
            let dropped = std::mem::take(&mut st.dropped);
            if std::mem::take(&mut st.resync) {
                let table: HashSet<Channel> = hub.channel_names().into_iter().collect();
                st.active.difference(&table).cloned().collect()
            } else {
                dropped.into_iter().collect()
            }
        };
        for channel in candidates {
            if !cl.subs.lock().active.remove(&channel) {
                continue;
            }
            if hub.subscriber_count(channel.as_str()) > 0 {
                cl.subs.lock().active.insert(channel);
                continue;
            }
            {
                let mut st = cl.subs.lock();
                st.home.remove(&channel);
                *st.leaving.entry(channel.clone()).or_default() += 1;
            }
            if let Err(e) = self.timed(conn.sunsubscribe(self.key(&channel))).await {
                // The master is gone or moved: nothing is left to unsubscribe there.
                unmark(&mut cl.subs.lock().leaving, &channel);
                tracing::debug!(error = %e, %channel, "SUNSUBSCRIBE failed");
            }
        }
        self.subscriptions_gauge
            .set(cl.subs.lock().active.len() as i64);
    }

    /// A push that is not a message: a confirmation of ours, or Redis (or redis-rs) changing a
    /// subscription on its own. Runs on the pump, so it only records and wakes the pass.
    fn on_push(&self, push: &PushInfo) {
        let cl = self.cl();
        let name = match push.data.first() {
            Some(Value::BulkString(b)) => std::str::from_utf8(b).ok(),
            _ => None,
        };
        let channel = name.and_then(|n| self.channel_of(n));
        match (&push.kind, channel) {
            (PushKind::SSubscribe, Some(c)) => {
                let mut st = cl.subs.lock();
                if st.asking.contains_key(&c) {
                    unmark(&mut st.asking, &c);
                } else if st.active.contains(&c) {
                    st.regained.insert(c);
                    drop(st);
                    cl.urgent.notify_one();
                }
            }
            (PushKind::SUnsubscribe, Some(c)) => {
                let mut st = cl.subs.lock();
                if st.leaving.contains_key(&c) {
                    unmark(&mut st.leaving, &c);
                } else if st.active.contains(&c) {
                    tracing::info!(channel = %c, "Redis dropped a shard subscription (slot moved or failover); subscribing again");
                    st.moved.insert(c);
                    drop(st);
                    cl.urgent.notify_one();
                }
            }
            (PushKind::Disconnection, _) => cl.urgent.notify_one(),
            _ => {}
        }
    }

    /// The reconciliation pass (see the module docs). `Err` when the cluster did not answer.
    async fn pass(&self, hub: &Hub) -> Result<(), redis::RedisError> {
        let cl = self.cl();
        let Some(mut conn) = cl.conn() else {
            return Ok(());
        };
        // Any node will do, and one that just died is not the cluster: try a few.
        let mut slots = None;
        for _ in 0..3 {
            let q = conn.route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            );
            match self.timed(q).await {
                Ok(v) => {
                    slots = Some(v);
                    break;
                }
                Err(e) => tracing::debug!(error = %e, "CLUSTER SLOTS failed"),
            }
        }
        let Some(slots) = slots else {
            return Err(redis::RedisError::from(std::io::Error::other(
                "no node answered CLUSTER SLOTS",
            )));
        };
        let ranges = parse_slots(slots);
        if ranges.is_empty() {
            return Err(redis::RedisError::from(std::io::Error::other(
                "CLUSTER SLOTS named no master",
            )));
        }
        let masters = question_routes(&ranges);
        let old_ids = {
            let mut t = cl.topology.lock();
            t.ranges = ranges;
            t.moved.clear();
            t.client_ids.clone()
        };
        cl.publishers
            .lock()
            .retain(|addr, _| masters.contains_key(addr));
        // Where each active channel lives now.
        let placed: Vec<(Channel, Option<String>)> = {
            let active: Vec<Channel> = cl.subs.lock().active.iter().cloned().collect();
            let t = cl.topology.lock();
            active
                .into_iter()
                .map(|c| {
                    let m = t
                        .master_of(key_slot(self.key(&c).as_bytes()))
                        .map(str::to_owned);
                    (c, m)
                })
                .collect()
        };
        let mut by_master: HashMap<String, Vec<Channel>> = HashMap::new();
        for (c, m) in &placed {
            if let Some(m) = m {
                by_master.entry(m.clone()).or_default().push(c.clone());
            }
        }
        // Taken before the masters are asked: a push that comes during the pass woke the next.
        let (moved, regained) = {
            let mut st = cl.subs.lock();
            (
                std::mem::take(&mut st.moved),
                std::mem::take(&mut st.regained),
            )
        };
        let mut again: HashSet<Channel> = moved;
        {
            // Channels whose master changed since the last pass (failover, slot moved).
            let st = cl.subs.lock();
            for (c, m) in &placed {
                if let (Some(m), Some(home)) = (m, st.home.get(c))
                    && home != m
                {
                    again.insert(c.clone());
                }
            }
        }
        // What each master should hold: not the channels on their way to it (a slot that just
        // moved there, its subscription not made yet), or the master that gained a slot would
        // look as if it had lost subscriptions, and every channel on it would get a gap.
        let mut settled: HashMap<&str, u64> = HashMap::new();
        for (c, m) in &placed {
            if let Some(m) = m
                && !again.contains(c)
            {
                *settled.entry(m.as_str()).or_default() += 1;
            }
        }
        let mut ids = HashMap::new();
        // Masters whose connection this pass could not check (down, too slow, or the question
        // reached another node): their channels' returns wait for a pass that can.
        let mut unknown: HashSet<String> = HashSet::new();
        // Masters whose connection was made again or holds fewer subscriptions than expected.
        let mut interrupted: HashSet<String> = HashSet::new();
        for (master, (node_id, slot)) in &masters {
            let labelled = ids.len() < NODE_LABELS_CAP;
            let label = addr_label(master);
            let mut pipe = redis::pipe();
            pipe.cmd("CLUSTER").arg("MYID").cmd("CLIENT").arg("INFO");
            let q = conn.route_pipeline(
                pipe,
                0,
                2,
                SingleNodeRoutingInfo::SpecificNode(Route::new(*slot, SlotAddr::Master)),
            );
            let info = match self.timed(q).await {
                // Not this master's answer (it is down and redis-rs asked another node): its
                // connection is unknown, not new.
                Ok(r) if r.len() == 2 && text(&r[0]).as_deref() == Some(node_id.as_str()) => {
                    text(&r[1])
                }
                Ok(_) | Err(_) => None,
            };
            let Some(info) = info else {
                if labelled {
                    self.metrics
                        .redis_cluster_connected
                        .get_or_create(&label)
                        .set(0);
                }
                // Kept, so a reconnect while the master could not be asked is still seen.
                if let Some(&old) = old_ids.get(master) {
                    ids.insert(master.clone(), old);
                }
                unknown.insert(master.clone());
                continue;
            };
            let field = |k: &str| {
                info.split_whitespace()
                    .find_map(|f| f.strip_prefix(k))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            let (id, ssub) = (field("id=").unwrap_or(0), field("ssub=").unwrap_or(0));
            let expected = settled.get(master.as_str()).copied().unwrap_or(0);
            let reconnected = old_ids.get(master).is_some_and(|&old| old != id);
            if labelled {
                self.metrics
                    .redis_cluster_connected
                    .get_or_create(&label)
                    .set(1);
                self.metrics
                    .redis_cluster_subscriptions
                    .get_or_create(&label)
                    .set(ssub as i64);
                if reconnected {
                    self.metrics
                        .redis_cluster_reconnects
                        .get_or_create(&label)
                        .inc();
                }
            }
            if reconnected || ssub < expected {
                tracing::debug!(%master, id, ssub, expected, reconnected, "shard subscriptions on this master were interrupted");
                interrupted.insert(master.clone());
                again.extend(by_master.get(master).into_iter().flatten().cloned());
            }
            ids.insert(master.clone(), id);
        }
        {
            let mut t = cl.topology.lock();
            t.client_ids = ids;
        }
        // A return redis-rs made on a master whose connection is the same one, holding every
        // subscription, lost nothing (it refreshed its slot map and confirmed them again). On a
        // master that could not be asked it waits for a pass that can: the connection's id
        // then tells whether it was made again meanwhile. Only where there is no earlier id to
        // compare with does it count as an interruption.
        let placed: HashMap<Channel, Option<String>> = placed.into_iter().collect();
        let mut later = HashSet::new();
        let regained: Vec<Channel> = regained
            .into_iter()
            .filter(|c| match placed.get(c) {
                Some(Some(m)) if unknown.contains(m) => {
                    if old_ids.contains_key(m) {
                        later.insert(c.clone());
                        false
                    } else {
                        true
                    }
                }
                Some(Some(m)) => interrupted.contains(m),
                Some(None) => true,
                // No longer active: nobody to tell.
                None => false,
            })
            .collect();
        cl.subs
            .lock()
            .regained
            .extend(later.into_iter().filter(|c| !again.contains(c)));
        again.extend(regained);
        self.resubscribe(hub, &mut conn, again.iter()).await;
        // Everything that was interrupted, once.
        let gaps: Vec<Channel> = again.into_iter().collect();
        if !gaps.is_empty() {
            let notified = hub.gap_all(&gaps);
            self.reconnects.inc();
            tracing::info!(
                channels = gaps.len(),
                notified,
                "shard subscriptions restored after an interruption; gap notices sent"
            );
        }
        {
            let t = cl.topology.lock();
            let mut st = cl.subs.lock();
            let active: Vec<Channel> = st.active.iter().cloned().collect();
            for c in active {
                if let Some(m) = t.master_of(key_slot(self.key(&c).as_bytes())) {
                    st.home.insert(c, m.to_owned());
                }
            }
            self.subscriptions_gauge.set(st.active.len() as i64);
        }
        Ok(())
    }

    /// SSUBSCRIBEs `channels` again (those the hub still holds); one that fails stays active
    /// with its old home, so the next pass tries it again.
    async fn resubscribe<'a>(
        &self,
        hub: &Hub,
        conn: &mut ClusterConnection,
        channels: impl Iterator<Item = &'a Channel>,
    ) {
        let cl = self.cl();
        let _order = cl.order.lock().await;
        for c in channels {
            if hub.subscriber_count(c.as_str()) == 0 || !cl.subs.lock().active.contains(c) {
                continue;
            }
            *cl.subs.lock().asking.entry(c.clone()).or_default() += 1;
            if let Err(e) = self.timed(conn.ssubscribe(self.key(c))).await {
                let mut st = cl.subs.lock();
                unmark(&mut st.asking, c);
                // Not placed: the next pass sees it where it is and tries again.
                st.home.insert(c.clone(), String::new());
                tracing::warn!(error = %e, channel = %c, "SSUBSCRIBE again failed; retrying at the next pass");
            }
        }
    }

    /// Cluster mode of [`RedisBus::run`]: connect (with backoff until the cluster first
    /// answers), then deliver what the pump queues while the maintenance task runs the passes
    /// and the unsubscribes. The cluster connection reconnects to each master by itself.
    pub(super) async fn run_cluster(self: Arc<Self>, hub: Weak<Hub>, stop: CancellationToken) {
        let cl = self.cl();
        let _ = cl.hub.set(hub.clone());
        let Some(pushes) = cl.pushes.lock().take() else {
            return;
        };
        let mut backoff = Backoff::default();
        let mut logged = false;
        let conn = loop {
            if stop.is_cancelled() {
                return;
            }
            match self.timed(cl.client.get_async_connection()).await {
                Ok(c) => break c,
                Err(e) => {
                    if !logged {
                        tracing::warn!(error = %e, "cannot reach Redis Cluster; retrying with backoff");
                        logged = true;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next(random_unit())) => {}
            }
        };
        *cl.conn.lock() = Some(conn);
        let (tx, mut ingest) = tokio::sync::mpsc::channel(self.settings.ingest_queue);
        let room = Arc::new(IngestRoom::default());
        let pump_task = tokio::spawn({
            let (bus, room, stop) = (self.clone(), room.clone(), stop.clone());
            let stats = IngestStats {
                overflows: self.metrics.redis_ingest_overflows.clone(),
                dropped: self.metrics.redis_ingest_dropped.clone(),
            };
            async move {
                let messages = futures_util::stream::unfold(pushes, |mut rx| async {
                    rx.recv().await.map(|p| (p, rx))
                })
                .filter_map(|p| {
                    let msg = if p.kind == PushKind::SMessage {
                        redis::Msg::from_push_info(p)
                    } else {
                        bus.on_push(&p);
                        None
                    };
                    std::future::ready(msg)
                });
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = pump(Box::pin(messages), tx, &room, INGEST_QUEUE_BYTES, INGEST_LOST_CAP, &stats) => {}
                }
            }
        });
        let maintenance = tokio::spawn(self.clone().maintain(hub.clone(), stop.clone()));
        let subscriber = tokio::spawn(self.clone().subscribe_task(hub.clone(), stop.clone()));
        self.drain_ingest(&mut ingest, &room, &hub, &stop).await;
        pump_task.abort();
        maintenance.abort();
        subscriber.abort();
        cl.subs.lock().wanted.clear();
    }

    /// Passes every `bus.redis_ping_interval` and whenever something asks for one; the
    /// unsubscribes [`UNSUBSCRIBE_DELAY`] after a drop. Readiness follows the passes.
    async fn maintain(self: Arc<Self>, hub: Weak<Hub>, stop: CancellationToken) {
        let cl = self.cl();
        let every = self.settings.ping_interval;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unsubscribe_at: Option<tokio::time::Instant> = None;
        let mut was_ready = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = cl.urgent.notified() => {
                    // Let a burst of pushes (a whole slot's channels) arrive first.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ = cl.changed.notified() => {
                    unsubscribe_at.get_or_insert(tokio::time::Instant::now() + UNSUBSCRIBE_DELAY);
                    continue;
                }
                _ = tokio::time::sleep_until(unsubscribe_at.unwrap_or_else(tokio::time::Instant::now)),
                    if unsubscribe_at.is_some() =>
                {
                    unsubscribe_at = None;
                    let Some(h) = hub.upgrade() else { return };
                    self.unsubscribe_dropped_cluster(&h).await;
                    continue;
                }
            }
            let Some(h) = hub.upgrade() else { return };
            match self.pass(&h).await {
                Ok(()) => {
                    if !was_ready {
                        tracing::info!("connected to Redis Cluster");
                    }
                    was_ready = true;
                    self.connected.store(true, Ordering::Release);
                    self.connected_gauge.set(1);
                }
                Err(e) => {
                    if was_ready {
                        tracing::warn!(error = %e, "Redis Cluster does not answer");
                    }
                    was_ready = false;
                    self.connected.store(false, Ordering::Release);
                    self.connected_gauge.set(0);
                    self.metrics.redis_ping_failures.inc();
                }
            }
        }
    }
}

fn unmark(marks: &mut HashMap<Channel, u32>, channel: &Channel) {
    if let Some(n) = marks.get_mut(channel) {
        *n -= 1;
        if *n == 0 {
            marks.remove(channel);
        }
    }
}

/// Each master, its node id, and the slot its questions are routed by: the middle of its
/// largest range, not the first. A reshard moves a master's lowest slots first, and a slot just
/// moved may still lead redis-rs (whose slot map is refreshed apart from ours) to the old owner,
/// which would leave the master unasked for the pass.
fn question_routes(ranges: &[SlotRange]) -> BTreeMap<String, (String, u16)> {
    let mut best: BTreeMap<String, &SlotRange> = BTreeMap::new();
    for r in ranges {
        let size = |r: &SlotRange| r.last.saturating_sub(r.first);
        best.entry(r.master.clone())
            .and_modify(|b| {
                if size(r) > size(b) {
                    *b = r;
                }
            })
            .or_insert(r);
    }
    best.into_iter()
        .map(|(m, r)| {
            (
                m,
                (r.id.clone(), r.first + (r.last.saturating_sub(r.first)) / 2),
            )
        })
        .collect()
}

/// A text reply (RESP2 bulk, RESP3 verbatim or simple string).
fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `CLUSTER SLOTS`: `[[start, end, [host, port, id, …], replicas…], …]` → ranges and masters.
fn parse_slots(v: Value) -> Vec<SlotRange> {
    let Value::Array(rows) = v else {
        return Vec::new();
    };
    let int = |v: &Value| match v {
        Value::Int(i) => u16::try_from(*i).ok(),
        _ => None,
    };
    rows.iter()
        .filter_map(|row| {
            let Value::Array(f) = row else { return None };
            let (a, b) = (int(f.first()?)?, int(f.get(1)?)?);
            let Value::Array(m) = f.get(2)? else {
                return None;
            };
            let (host, port) = (text(m.first()?)?, int(m.get(1)?)?);
            Some(SlotRange {
                first: a,
                last: b,
                master: format!("{host}:{port}"),
                id: m.get(2).and_then(text).unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Known values from `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"edgeplex:{foo}"), 12182);
        assert_eq!(key_slot(b"{}foo"), key_slot(b"{}foo"));
        assert_eq!(key_slot(b"123456789"), 0x31c3);
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        for s in [0u16, 1, 5000, 12182, 16383] {
            let tag = slot_tag(s);
            assert_eq!(
                key_slot(format!("edgeplex:{{{tag}}}#history").as_bytes()),
                s
            );
            assert!(tag.len() <= 4);
        }
    }

    #[test]
    fn a_master_is_asked_through_the_middle_of_its_largest_range() {
        let r = |first, last, master: &str| SlotRange {
            first,
            last,
            master: master.into(),
            id: format!("id-{master}"),
        };
        // b just took slot 0 from a (a reshard moves the lowest slots first).
        let ranges = [
            r(0, 0, "b"),
            r(1, 5460, "a"),
            r(5461, 10922, "b"),
            r(10923, 16383, "c"),
        ];
        let routes = question_routes(&ranges);
        assert_eq!(routes["a"], ("id-a".into(), 2730));
        assert_eq!(routes["b"], ("id-b".into(), 8191));
        assert_eq!(routes["c"], ("id-c".into(), 13653));
    }

    #[test]
    fn the_history_gauges_sum_each_slots_last_answer() {
        let mut h = SlotHistories::default();
        assert_eq!(h.record(5, 100, 2), (100, 2));
        // A publish that did not count the channels leaves the slot's count as it was.
        assert_eq!(h.record(6, 50, -1), (150, 2));
        assert_eq!(h.record(5, 80, -1), (130, 2));
        assert_eq!(h.record(6, 60, 3), (140, 5));
        assert_eq!(h.record(5, 0, 0), (60, 3));
        assert_eq!(h.slots.len(), 2);
    }

    #[test]
    fn the_slot_budget_is_a_share_and_at_least_one_channel() {
        assert_eq!(slot_budget(64 << 20, 1 << 20), 1 << 20);
        assert_eq!(slot_budget(1 << 30, 1 << 20), 4 << 20);
    }
}
