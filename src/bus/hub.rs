//! The hub: which local sessions listen to which channel, and the fan-out of one published
//! message to all of them.
//!
//! It owns the channel table (capped: it is keyed by client input) and pushes encoded frames into
//! session outboxes. It never blocks on a session: a full outbox marks that session slow and the
//! session's transport closes it. A resume's replay is read within a window sized to the
//! session's outbox (and its byte budget), so it never reads what it could not deliver. It does
//! not know which transport a session uses.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde_json::value::RawValue;

use super::history::{Replay, Window};
use super::{Bus, BusError};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, PushError};
use crate::protocol::{self, Channel, Frame, Offset};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("this node holds its maximum of {0} channels")]
    ChannelTableFull(usize),
    #[error("{0}")]
    BusUnavailable(&'static str),
    /// The replay needs more than the client's budget gave it (see [`ReplayBudget`]); `read`
    /// (in the window's unit) was read before that was known, and is paid for.
    #[error("the replay is over the client's byte budget")]
    ReplayOverBudget { read: usize },
}

/// What a resume may spend of its client's byte budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayBudget {
    /// Bytes the resume took of its client's budget before reading: the replay reads no more.
    pub left: usize,
    /// A replay cut short with less than this left is refused rather than delivered with a gap:
    /// waiting gives the client this much.
    pub enough: usize,
}

/// A subscription that went live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The channel's name as the hub holds it: a subscriber that keeps this one shares its
    /// allocation with the hub's table and every other subscriber of the channel, instead of
    /// keeping a copy of the name per session.
    pub channel: Channel,
    /// Where the subscriber is once its replay is delivered (see [`Hub::subscribe`]).
    pub position: Option<Offset>,
    /// What was replayed, in its window's unit (see [`Replay::bytes`]).
    pub replayed: usize,
}

/// One session in a channel's subscriber list: 32 bytes, so that a subscription costs a few
/// dozen bytes in its channel. What only a resume needs is boxed apart ([`Resume`]) and freed
/// once the resume is over.
#[derive(Debug)]
struct Subscriber {
    session: u64,
    outbox: Arc<Outbox>,
    /// A resume's state: its held pushes until it goes live, then the offset it skips through.
    resume: Option<Box<Resume>>,
    /// False until the bus confirmed the channel and the session's reply was queued: pushes
    /// skip it meanwhile, so nothing reaches a client before its subscribe `ok`.
    live: bool,
}

// A subscription's cost in a channel's list; see `Subscriber`.
const _: () = assert!(std::mem::size_of::<Subscriber>() <= 32);

#[derive(Debug, Default)]
struct Resume {
    /// Pushes that arrive while the history is read; merged behind the replay when the
    /// subscriber goes live.
    pending: Vec<(Option<Offset>, Frame)>,
    overflowed: bool,
    /// After the replay: live messages up to this offset were replayed already. With Redis, a
    /// message read from the history stream can still be on its way through pub/sub when the
    /// subscriber goes live; it is skipped, not sent twice.
    skip_through: Option<Offset>,
}

/// Removes a half-made subscription if `Hub::subscribe` is dropped before it goes live.
struct JoinGuard<'a> {
    hub: &'a Hub,
    channel: &'a Channel,
    session: u64,
    armed: bool,
}

impl Drop for JoinGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.hub.unsubscribe(self.channel, self.session);
        }
    }
}

/// The replay window for `outbox`: the newest messages that fit half of it (a resume that
/// overflowed the queue would be closed before sending anything and retry the same way forever;
/// cutting the oldest is a gap like any other), and no more bytes than `budget`.
fn window(outbox: &Outbox, budget: Option<ReplayBudget>) -> Window {
    let bytes = outbox.capacity_bytes() / 2;
    Window {
        frames: outbox.capacity() / 2,
        bytes: budget.map_or(bytes, |b| b.left.min(bytes)),
    }
}

/// Where a new subscriber starts in its channel's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Whatever is published from now on.
    Live,
    /// Resume: every retained message after this offset first.
    After(Offset),
    /// Like `Live`, but also learn the channel's newest offset at the switch-over, so the caller
    /// can hand the client a position to resume from (SSE ids) even before any message arrives.
    Newest,
    /// Resume for a client that saw the channel when it had no history: every retained message,
    /// behind a gap notice when there is any (the edge cannot prove none was trimmed before it).
    Oldest,
}

/// Pushes held for one resuming subscriber while its history is read. Past it, the held pushes
/// are dropped and the client gets a gap notice.
pub const PENDING_CAP: usize = 1024;

#[derive(Debug, Default)]
struct ChannelEntry {
    subscribers: Mutex<Vec<Subscriber>>,
}

#[derive(Debug)]
pub struct Hub {
    channels: RwLock<HashMap<Channel, Arc<ChannelEntry>>>,
    max_channels: usize,
    bus: Bus,
    metrics: Arc<Metrics>,
}

/// What one dispatch did, for the caller's accounting and for tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    pub delivered: usize,
    pub overflowed: usize,
}

impl Hub {
    pub fn new(bus: Bus, max_channels: usize, metrics: Arc<Metrics>) -> Hub {
        Hub {
            channels: RwLock::new(HashMap::new()),
            max_channels,
            bus,
            metrics,
        }
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    pub fn channel_count(&self) -> usize {
        self.channels.read().len()
    }

    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.channels
            .read()
            .get(channel)
            .map_or(0, |e| e.subscribers.lock().len())
    }

    /// Names of the channels with local subscribers (what the Redis bus must subscribe to).
    pub fn channel_names(&self) -> Vec<Channel> {
        self.channels.read().keys().cloned().collect()
    }

    /// Adds a session to a channel and makes sure the bus delivers that channel to this node
    /// before returning, so a message published after the caller's `ok` reply is not missed.
    /// Idempotent per session. On a bus failure the session is not left subscribed.
    ///
    /// `first` (the subscribe reply, a gap notice) is queued to the session at the moment the
    /// subscription turns live, under the channel's lock, so no push can overtake it.
    ///
    /// With [`Start::After`], the session resumes: the retained messages after `since` follow the
    /// reply (behind a gap notice when the history cannot prove nothing was lost), then whatever
    /// was published meanwhile, each message once.
    ///
    /// Returns the offset the subscriber is at once the queued replay is delivered: the last
    /// replayed message, else the channel's newest offset (never past it), else `None` when the
    /// channel has no history (or, for `Start::Live`, when nobody asked).
    pub async fn subscribe(
        &self,
        channel: &Channel,
        session: u64,
        outbox: &Arc<Outbox>,
        first: Vec<Frame>,
        start: Start,
    ) -> Result<Option<Offset>, SubscribeError> {
        self.subscribe_within(channel, session, outbox, first, start, None)
            .await
            .map(|j| j.position)
    }

    /// [`Hub::subscribe`], replaying within `budget` (`None`: no limit but the outbox's). A
    /// replay that the budget (not the window's frame count) cut short with less than enough
    /// left is refused with [`SubscribeError::ReplayOverBudget`] rather than delivered with a
    /// gap: the client may retry when it has the budget.
    pub async fn subscribe_within(
        &self,
        channel: &Channel,
        session: u64,
        outbox: &Arc<Outbox>,
        first: Vec<Frame>,
        start: Start,
        budget: Option<ReplayBudget>,
    ) -> Result<Joined, SubscribeError> {
        let channel = &self.add(channel, session, outbox, start != Start::Live)?;
        // Until it goes live, a dropped subscribe (the client went away mid-await) must not
        // leave its half-made subscriber behind.
        let mut guard = JoinGuard {
            hub: self,
            channel,
            session,
            armed: true,
        };
        if let Bus::Redis(redis) = &self.bus
            && let Err(BusError::Unavailable(why)) = redis.ensure_subscribed(channel).await
        {
            self.unsubscribe(channel, session);
            return Err(SubscribeError::BusUnavailable(why));
        }
        // `Newest` is a resume from past the end: nothing to replay, but the read learns the
        // newest offset while live pushes are held, so none falls between the two.
        let since = match start {
            Start::Live => None,
            Start::After(since) => Some(since),
            Start::Newest => Some(Offset::MAX),
            Start::Oldest => Some(Offset::ZERO),
        };
        let window = match start {
            Start::Newest => Window::NONE,
            _ => window(outbox, budget),
        };
        let mut replayed = 0;
        let replay = match since {
            None => None,
            Some(since) => match self.replay(channel, since, window).await {
                Ok(mut r) => {
                    replayed = r.bytes();
                    // Refused only when the budget did the cutting: it narrowed the window's
                    // bytes, and the window is not full in frames (which would be cut the same
                    // however long the client waited).
                    let by_budget = window.bytes < outbox.capacity_bytes() / 2
                        && r.entries.len() < window.frames;
                    if r.cut && by_budget && budget.is_some_and(|b| b.left < b.enough) {
                        self.unsubscribe(channel, session);
                        return Err(SubscribeError::ReplayOverBudget { read: replayed });
                    }
                    match start {
                        Start::Newest => r.gap = false,
                        Start::Oldest => r.gap = r.newest.is_some(),
                        Start::Live | Start::After(_) => {}
                    }
                    Some((since, r))
                }
                Err(BusError::Unavailable(why)) => {
                    self.unsubscribe(channel, session);
                    return Err(SubscribeError::BusUnavailable(why));
                }
            },
        };
        let position = self.go_live(channel, session, first, replay);
        guard.armed = false;
        Ok(Joined {
            channel: channel.clone(),
            position,
            replayed,
        })
    }

    /// The retained messages of `channel` after `since` that fit `window`.
    pub async fn replay(
        &self,
        channel: &Channel,
        since: Offset,
        window: Window,
    ) -> Result<Replay, BusError> {
        match &self.bus {
            Bus::Memory(mem) => Ok(mem.history.replay(channel, since, window)),
            Bus::Redis(redis) => redis.replay(channel, since, window).await,
        }
    }

    fn go_live(
        &self,
        channel: &Channel,
        session: u64,
        first: Vec<Frame>,
        replay: Option<(Offset, Replay)>,
    ) -> Option<Offset> {
        let entry = self.channels.read().get(channel).cloned()?;
        let mut subs = entry.subscribers.lock();
        let sub = subs.iter_mut().find(|s| s.session == session)?;
        let mut position = None;
        // A full outbox is the session's own problem: its transport closes it.
        for frame in first {
            let _ = sub.outbox.push(frame);
        }
        if let Some((since, replay)) = replay {
            let Resume {
                pending,
                overflowed,
                ..
            } = sub.resume.take().map(|r| *r).unwrap_or_default();
            if replay.gap || overflowed {
                let _ = sub.outbox.push(protocol::encode_gap(channel));
            }
            for (offset, data) in &replay.entries {
                let _ = sub
                    .outbox
                    .push(protocol::encode_message(channel, Some(*offset), data));
            }
            // Where the client now is: the last replayed message, else `since` (never past the
            // channel's newest offset, so a bogus `since` cannot silence live traffic).
            let boundary = replay
                .entries
                .last()
                .map(|(o, _)| *o)
                .or(replay.newest.map(|n| since.min(n)));
            // Published while the history was read: the ones the replay already held are
            // skipped, so each message arrives once and in order.
            for (offset, frame) in pending {
                if offset.is_none_or(|o| boundary.is_none_or(|b| o > b)) {
                    let _ = sub.outbox.push(frame);
                }
            }
            // Kept only while there is something to skip.
            sub.resume = boundary.map(|b| {
                Box::new(Resume {
                    skip_through: Some(b),
                    ..Resume::default()
                })
            });
            position = boundary;
        }
        sub.live = true;
        position
    }

    /// Both map and entry are locked so a concurrent last-unsubscribe cannot remove the entry
    /// between lookup and insert.
    fn add(
        &self,
        channel: &Channel,
        session: u64,
        outbox: &Arc<Outbox>,
        resuming: bool,
    ) -> Result<Channel, SubscribeError> {
        let mut channels = self.channels.write();
        let len = channels.len();
        let (name, entry) = match channels.get_key_value(channel) {
            Some((name, e)) => (name.clone(), e.clone()),
            None => {
                if len >= self.max_channels {
                    return Err(SubscribeError::ChannelTableFull(self.max_channels));
                }
                let e = Arc::new(ChannelEntry::default());
                channels.insert(channel.clone(), e.clone());
                self.metrics.channels.set(channels.len() as i64);
                (channel.clone(), e)
            }
        };
        let mut subs = entry.subscribers.lock();
        if !subs.iter().any(|s| s.session == session) {
            // A channel of one subscriber (one per user, say) holds one slot, not the four a
            // first push would reserve; shared channels still grow by doubling.
            if subs.capacity() == 0 {
                subs.reserve_exact(1);
            }
            subs.push(Subscriber {
                session,
                outbox: outbox.clone(),
                resume: resuming.then(Box::default),
                live: false,
            });
        }
        Ok(name)
    }

    /// Removes a session from a channel; the channel leaves the table with its last subscriber
    /// (and the bus is told, so the node stops receiving it). Returns whether the session was
    /// subscribed.
    pub fn unsubscribe(&self, channel: &Channel, session: u64) -> bool {
        let mut channels = self.channels.write();
        let Some(entry) = channels.get(channel) else {
            return false;
        };
        let (removed, now_empty) = {
            let mut subs = entry.subscribers.lock();
            let before = subs.len();
            subs.retain(|s| s.session != session);
            (subs.len() != before, subs.is_empty())
        };
        if now_empty {
            channels.remove(channel);
            self.metrics.channels.set(channels.len() as i64);
            drop(channels);
            if let Bus::Redis(redis) = &self.bus {
                redis.channel_dropped(channel);
            }
        }
        removed
    }

    /// Publishes through the bus. For the embedded bus the message comes straight back through
    /// the hub; the Redis bus delivers it from its subscriber connection, on every node alike.
    pub async fn publish(&self, channel: &Channel, data: &RawValue) -> Result<(), BusError> {
        self.metrics.publishes.inc();
        match &self.bus {
            Bus::Memory(mem) => {
                // Offset, history and delivery under the channel's history lock: one order.
                mem.history.record(channel, data.get(), || {
                    let offset = mem.next_offset();
                    (offset, self.dispatch(channel, Some(offset), data.get()))
                });
                Ok(())
            }
            Bus::Redis(redis) => redis.publish(channel, data.get()).await.map(|_| ()),
        }
    }

    /// Publishes without waiting for the bus's answer: returns once the message is taken (for
    /// the Redis bus, queued for its pipeline) and hands the outcome to `done`, which must not
    /// block. One caller's publishes are answered in the order it made them. A session uses
    /// this so that its next frame is read while Redis works on the last.
    pub async fn publish_then(
        &self,
        channel: &Channel,
        data: &RawValue,
        done: impl FnOnce(Result<(), BusError>) + Send + Sync + 'static,
    ) {
        match &self.bus {
            Bus::Memory(_) => done(self.publish(channel, data).await),
            Bus::Redis(redis) => {
                self.metrics.publishes.inc();
                redis
                    .publish_then(channel, data.get(), Box::new(move |r| done(r.map(|_| ()))))
                    .await
            }
        }
    }

    /// Delivers a message whose offset the bus already assigned (or that has none).
    pub fn dispatch(&self, channel: &Channel, offset: Option<Offset>, data: &str) -> Fanout {
        self.dispatch_with(channel, || offset, data)
    }

    /// Encodes the message once and pushes the same bytes to every local subscriber of
    /// `channel`. `assign` picks the offset under the channel's lock, so subscribers see offsets
    /// in the order they were assigned.
    fn dispatch_with(
        &self,
        channel: &Channel,
        assign: impl FnOnce() -> Option<Offset>,
        data: &str,
    ) -> Fanout {
        let Some(entry) = self.channels.read().get(channel).cloned() else {
            return Fanout::default();
        };
        let mut subs = entry.subscribers.lock();
        let offset = assign();
        let frame = protocol::encode_message(channel, offset, data);
        let mut out = Fanout::default();
        for sub in subs.iter_mut() {
            if !sub.live {
                if let Some(r) = &mut sub.resume {
                    if r.pending.len() < PENDING_CAP {
                        r.pending.push((offset, frame.clone()));
                    } else {
                        r.overflowed = true;
                    }
                }
                continue;
            }
            if let Some(r) = &sub.resume
                && let (Some(skip), Some(o)) = (r.skip_through, offset)
            {
                if o <= skip {
                    continue;
                }
                // Offsets arrive in order: once past the replay, nothing more to skip.
                sub.resume = None;
            }
            match sub.outbox.push(frame.clone()) {
                Ok(()) => out.delivered += 1,
                Err(PushError::Overflow) => out.overflowed += 1,
                Err(PushError::Closed) => {}
            }
        }
        out
    }

    /// Tells every local subscriber of `channels` that messages may have been missed (after a
    /// bus outage). Returns how many sessions were told.
    pub fn gap_all(&self, channels: &[Channel]) -> usize {
        let mut told = 0;
        for channel in channels {
            let Some(entry) = self.channels.read().get(channel).cloned() else {
                continue;
            };
            let frame = protocol::encode_gap(channel);
            for sub in entry.subscribers.lock().iter_mut() {
                if sub.live {
                    if sub.outbox.push(frame.clone()).is_ok() {
                        told += 1;
                    }
                } else if let Some(r) = &mut sub.resume {
                    // Resuming across the outage: its replay cannot hold what was missed.
                    r.overflowed = true;
                    told += 1;
                }
            }
        }
        told
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;

    fn hub(max_channels: usize) -> Hub {
        Hub::new(
            Bus::Memory(MemoryBus::default()),
            max_channels,
            Arc::new(Metrics::new()),
        )
    }

    fn ch(s: &str) -> Channel {
        Channel::new(s).unwrap()
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[tokio::test]
    async fn fanout_shares_one_encoding() {
        let h = hub(10);
        let a = Arc::new(Outbox::new(8, 1 << 20));
        let b = Arc::new(Outbox::new(8, 1 << 20));
        h.subscribe(&ch("x"), 1, &a, vec![], Start::Live)
            .await
            .unwrap();
        h.subscribe(&ch("x"), 2, &b, vec![], Start::Live)
            .await
            .unwrap();
        h.subscribe(&ch("x"), 2, &b, vec![], Start::Live)
            .await
            .unwrap();
        assert_eq!(h.subscriber_count("x"), 2);
        h.publish(&ch("x"), &raw("{\"v\":1}")).await.unwrap();
        let (mut fa, mut fb) = (Vec::new(), Vec::new());
        a.drain(&mut fa);
        b.drain(&mut fb);
        assert_eq!(fa.len(), 1);
        assert_eq!(fa, fb);
        // Same allocation, not merely equal bytes.
        assert_eq!(fa[0].as_bytes().as_ptr(), fb[0].as_bytes().as_ptr());
    }

    #[tokio::test]
    async fn subscribers_share_the_hubs_name_and_a_resume_frees_its_state() {
        let h = hub(10);
        let o = Arc::new(Outbox::new(64, 1 << 20));
        let sub = |session, channel: &'static str, start| {
            let (h, o) = (&h, &o);
            async move {
                h.subscribe_within(&ch(channel), session, o, vec![], start, None)
                    .await
                    .unwrap()
            }
        };
        let a = sub(1, "x", Start::Live).await;
        let b = sub(2, "x", Start::Live).await;
        assert_eq!(
            a.channel.as_str().as_ptr(),
            b.channel.as_str().as_ptr(),
            "every subscriber keeps the hub's one copy of the name"
        );
        let resuming = |session| {
            h.channels.read()[&ch("y")]
                .subscribers
                .lock()
                .iter()
                .find(|s| s.session == session)
                .map(|s| s.resume.is_some())
        };
        h.publish(&ch("y"), &raw("1")).await.unwrap();
        sub(3, "y", Start::Oldest).await;
        sub(4, "y", Start::Live).await;
        assert_eq!(resuming(3), Some(true), "skips what its replay held");
        assert_eq!(
            resuming(4),
            Some(false),
            "a live subscribe carries no resume state"
        );
        h.publish(&ch("y"), &raw("2")).await.unwrap();
        assert_eq!(
            resuming(3),
            Some(false),
            "freed once live traffic passed the replay"
        );
        assert_eq!(
            h.channels.read()[&ch("y")].subscribers.lock().capacity(),
            4,
            "grows as a Vec does past the first"
        );
        let z = sub(5, "z", Start::Live).await;
        assert_eq!(
            h.channels.read()[&z.channel].subscribers.lock().capacity(),
            1,
            "a channel of one subscriber holds one slot"
        );
    }

    #[tokio::test]
    async fn channel_table_is_capped_and_shrinks() {
        let h = hub(2);
        let o = Arc::new(Outbox::new(8, 1 << 20));
        h.subscribe(&ch("a"), 1, &o, vec![], Start::Live)
            .await
            .unwrap();
        h.subscribe(&ch("b"), 1, &o, vec![], Start::Live)
            .await
            .unwrap();
        assert_eq!(
            h.subscribe(&ch("c"), 1, &o, vec![], Start::Live).await,
            Err(SubscribeError::ChannelTableFull(2))
        );
        // An existing channel can still be joined at the cap.
        h.subscribe(&ch("a"), 2, &o, vec![], Start::Live)
            .await
            .unwrap();
        assert!(h.unsubscribe(&ch("b"), 1));
        assert!(!h.unsubscribe(&ch("b"), 1));
        assert_eq!(h.channel_count(), 1);
        h.subscribe(&ch("c"), 1, &o, vec![], Start::Live)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn full_outbox_overflows_without_blocking_others() {
        let h = hub(10);
        let slow = Arc::new(Outbox::new(2, 1 << 20));
        let fast = Arc::new(Outbox::new(100, 1 << 20));
        h.subscribe(&ch("x"), 1, &slow, vec![], Start::Live)
            .await
            .unwrap();
        h.subscribe(&ch("x"), 2, &fast, vec![], Start::Live)
            .await
            .unwrap();
        let mut overflowed = 0;
        for i in 0..10 {
            overflowed += h
                .dispatch(&ch("x"), Some(Offset { epoch: 1, seq: i }), "1")
                .overflowed;
        }
        assert_eq!(
            overflowed, 1,
            "overflow is reported once, then the outbox is closed"
        );
        let mut got = Vec::new();
        fast.drain(&mut got);
        assert_eq!(got.len(), 10);
    }
}
