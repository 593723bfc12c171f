//! The subscriber connection: the set of Redis subscriptions that follows the hub, the ingest
//! queue and its pump, and reconnects with backoff and gap notices.

use super::*;

/// Answers one [`RedisBus::ensure_subscribed`] caller.
pub(super) type Waiter = tokio::sync::oneshot::Sender<()>;

#[derive(Debug, Default)]
pub(super) struct SubState {
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

impl RedisBus {
    /// Makes sure this node is subscribed to `channel` in Redis. Idempotent, and answered at
    /// once when it is: no lock is held across a round trip. Otherwise the channel joins the
    /// next SUBSCRIBE, which carries every channel asked for meanwhile.
    pub async fn ensure_subscribed(&self, channel: &Channel) -> Result<(), BusError> {
        if self.cluster.is_some() {
            return self.ensure_subscribed_cluster(channel).await;
        }
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
        if self.cluster.is_some() {
            return self.channel_dropped_cluster(channel);
        }
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

    pub(super) async fn timed<T>(
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
    /// Hands what the pump queued to the hub, in order, until `until` is cancelled, the queue
    /// ends or the hub is gone. One loop for the single Redis and the cluster alike.
    pub(super) async fn drain_ingest(
        &self,
        ingest: &mut tokio::sync::mpsc::Receiver<Ingest>,
        room: &IngestRoom,
        hub: &Weak<Hub>,
        until: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = until.cancelled() => return,
                item = ingest.recv() => {
                    let Some(item) = item else { return };
                    room.taken(&item, ingest.len(), ingest.max_capacity(), INGEST_QUEUE_BYTES);
                    match hub.upgrade() {
                        Some(h) => self.ingest(&h, &item),
                        None => return,
                    }
                }
            }
        }
    }

    pub(super) fn ingest(&self, hub: &Hub, item: &Ingest) {
        match item {
            Ingest::Msg(msg) => self.deliver(hub, msg),
            Ingest::Gap(name) => {
                if let Some(channel) = self.channel_of(name) {
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
        let full = msg.get_channel_name();
        let Some(name) = self.channel_name(full) else {
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
        if self.cluster.is_some() {
            return self.run_cluster(hub, stop).await;
        }
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
                    self.drain_ingest(&mut ingest, &room, &hub, &lost).await;
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

/// What the pump hands the delivery loop.
#[derive(Debug)]
pub(super) enum Ingest {
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
pub(super) fn msg_bytes(msg: &redis::Msg) -> usize {
    msg.get_payload_bytes().len() + msg.get_channel_name().len()
}

/// The ingest queue's state shared by the pump and the delivery loop.
#[derive(Debug, Default)]
pub(super) struct IngestRoom {
    /// Bytes queued (see [`Ingest::bytes`]).
    bytes: AtomicUsize,
    /// The pump holds gap notices until the queue has room again.
    waiting: AtomicBool,
    /// Wakes the pump when it has.
    room: Notify,
}

impl IngestRoom {
    /// The delivery loop took `item`; `left` items remain in a queue of `cap`.
    pub(super) fn taken(&self, item: &Ingest, left: usize, cap: usize, max_bytes: usize) {
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
pub(super) fn has_room(queued: usize, cap: usize, bytes: usize, max_bytes: usize) -> bool {
    queued <= cap / 2 && bytes <= max_bytes / 2
}

/// What the pump counts.
pub(super) struct IngestStats {
    /// Losses begun (the queue was full and had been taking everything).
    pub(super) overflows: Counter,
    /// Messages dropped.
    pub(super) dropped: Counter,
}

/// Channels that lost messages and whose gap notices wait for room, in the order they lost
/// them; at most a cap's worth, then a notice for every channel instead.
#[derive(Debug, Default)]
pub(super) struct Lost {
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
pub(super) async fn pump(
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
pub(super) fn drop_one(
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
pub(super) struct Backoff {
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
    pub(super) fn next(&mut self, unit: f64) -> Duration {
        let pause = reconnect_pause(self.cap, unit);
        self.cap = (self.cap * 2).min(RECONNECT_MAX);
        pause
    }
}

/// The pause before reconnect attempt with backoff cap `cap`: full jitter, drawn evenly from
/// [`RECONNECT_FLOOR`] to `cap` by `unit` in [0, 1). Nodes that lost Redis at the same moment
/// spread their returns, and so do their clients' resumes after the gap notices.
pub(super) fn reconnect_pause(cap: Duration, unit: f64) -> Duration {
    let cap = cap.clamp(RECONNECT_FIRST, RECONNECT_MAX);
    RECONNECT_FLOOR + (cap - RECONNECT_FLOOR).mul_f64(unit.clamp(0.0, 1.0))
}

/// A number in [0, 1) that differs between calls and processes: std's hasher is keyed randomly
/// per process (and per call), which is all the jitter needs, without a random-number crate.
pub(super) fn random_unit() -> f64 {
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
