//! Channel history for the embedded bus, and the resume rule both buses share.
//!
//! Each channel keeps its last `bus.history_len` messages, none older than `bus.history_ttl`. The
//! table is keyed by client input, so it is capped in total bytes (`bus.history_bytes`), counting
//! each channel's own bookkeeping as well as its messages: past it, whole channels are evicted,
//! the least recently published first (approximately: a CLOCK hand gives a channel published to
//! since its last visit a second chance), at a constant cost per eviction so a spray of channel
//! names cannot turn each publish into a scan of the table. The Redis bus keeps the same history
//! in a Redis stream instead (see `redis.rs`); this module does not touch Redis.
//!
//! Resume rule ([`Replay`]): a client resuming after offset `since` gets the retained messages
//! after it that fit its [`Window`] (the newest ones; both buses read only those), and a gap
//! notice unless the history proves nothing was lost and the window reached back to `since`.
//! Histories only lose messages from the front (trimmed by count or age) or whole (evicted, expired, a restarted
//! node), so it proves it when its oldest retained message is at or before `since` (and `since`
//! is before the newest offset), or when `since` is exactly the newest offset. An offset past the
//! newest proves nothing (another node's run, a clock that went back, or made up).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::protocol::{Channel, Offset};

/// Per-entry bookkeeping counted against the byte budget besides the data itself.
const ENTRY_OVERHEAD: usize = 64;

/// Per-channel bookkeeping counted against the byte budget besides the name: the table slot, the
/// ring and its lock, the hand's slot. A channel whose messages all aged out still costs this, so
/// the number of channels is bounded by the budget too.
const CHANNEL_OVERHEAD: usize = 160;

fn channel_cost(channel: &Channel) -> usize {
    CHANNEL_OVERHEAD + channel.as_str().len()
}

/// What a resume gets: the retained messages after `since`, oldest first, and whether messages
/// may have been lost before them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    pub entries: Vec<(Offset, Arc<str>)>,
    pub gap: bool,
    /// The channel's newest offset, if known: where "up to date" is.
    pub newest: Option<Offset>,
    /// The window ended before `since`: older retained messages were left out (and `gap` set).
    pub cut: bool,
}

/// Bytes a replayed message is counted in a [`Window`] besides its data: about what its push
/// frame adds around it.
pub const REPLAY_FRAME_BYTES: usize = 64;

/// How much of a channel's history one resume reads: the newest messages after `since`, at most
/// `frames` of them and `bytes` in all (data plus [`REPLAY_FRAME_BYTES`] each). A replay longer
/// than the session's queue can take would close it as a slow consumer and retry the same way
/// forever, and reading more than is kept is work for nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub frames: usize,
    pub bytes: usize,
}

impl Window {
    /// Reads nothing but the channel's oldest and newest offsets.
    pub const NONE: Window = Window {
        frames: 0,
        bytes: 0,
    };

    /// Keeps messages, newest first, while they fit; returns them oldest first, and whether one
    /// was left out.
    pub fn take(
        &self,
        newest_first: impl IntoIterator<Item = (Offset, Arc<str>)>,
    ) -> (Vec<(Offset, Arc<str>)>, bool) {
        let mut kept = Vec::new();
        let mut bytes = 0;
        let mut cut = false;
        for (offset, data) in newest_first {
            let size = data.len() + REPLAY_FRAME_BYTES;
            if kept.len() >= self.frames || bytes + size > self.bytes {
                cut = true;
                break;
            }
            bytes += size;
            kept.push((offset, data));
        }
        kept.reverse();
        (kept, cut)
    }
}

impl Replay {
    /// Applies the resume rule. `retained` may start anywhere (entries at or before `since` are
    /// skipped); `first` and `last` are the channel's oldest retained and newest offsets.
    pub fn after(
        since: Offset,
        retained: impl IntoIterator<Item = (Offset, Arc<str>)>,
        first: Option<Offset>,
        last: Option<Offset>,
    ) -> Replay {
        let entries = retained.into_iter().filter(|(o, _)| *o > since).collect();
        // An offset past the newest proves nothing: it is from another node's run, a clock
        // that went back, or made up.
        let up_to_date = last == Some(since);
        let covered = first.is_some_and(|f| f <= since) && last.is_some_and(|l| since < l);
        Replay {
            gap: !(covered || up_to_date),
            entries,
            newest: last,
            cut: false,
        }
    }

    /// Marks the replay cut by its window: older messages were left out, so a gap.
    pub fn cut_short(mut self, cut: bool) -> Replay {
        self.cut |= cut;
        self.gap |= cut;
        self
    }

    /// What the replay weighs in its [`Window`]'s unit (data plus [`REPLAY_FRAME_BYTES`] a
    /// message): what a resume is charged, so a replay of many small messages is not nearly
    /// free.
    pub fn bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|(_, d)| d.len() + REPLAY_FRAME_BYTES)
            .sum()
    }
}

#[derive(Debug, Default)]
struct Ring {
    entries: VecDeque<(Offset, Arc<str>, Instant)>,
    /// The channel's newest offset, kept when its entries age out, so a client that saw it is
    /// known to be up to date.
    last: Option<Offset>,
    last_publish: Option<Instant>,
    bytes: usize,
    /// Published to since the eviction hand last passed: spared once.
    referenced: bool,
    /// Evicted from the table: a holder of this ring must look it up again.
    removed: bool,
}

#[derive(Debug, Default)]
struct Table {
    rings: HashMap<Channel, Arc<Mutex<Ring>>>,
    /// Every channel of `rings` once, in the order the eviction hand visits them.
    hand: VecDeque<Channel>,
}

#[derive(Debug)]
pub struct MemoryHistory {
    channels: RwLock<Table>,
    len: usize,
    ttl: Duration,
    budget: usize,
    bytes: AtomicUsize,
}

impl MemoryHistory {
    pub fn new(len: usize, ttl: Duration, budget: usize) -> MemoryHistory {
        MemoryHistory {
            channels: RwLock::new(Table::default()),
            len,
            ttl,
            budget,
            bytes: AtomicUsize::new(0),
        }
    }

    /// Runs `publish` with the channel's history locked: it picks the offset and delivers, and
    /// the message is appended under the same lock, so history order is delivery order.
    pub fn record<R>(
        &self,
        channel: &Channel,
        data: &str,
        publish: impl FnOnce() -> (Offset, R),
    ) -> R {
        let result = loop {
            let ring = self.ring(channel);
            let mut r = ring.lock();
            if r.removed {
                // Evicted between lookup and lock: its bytes are no longer counted anywhere.
                continue;
            }
            let (offset, result) = publish();
            let now = Instant::now();
            let size = data.len() + ENTRY_OVERHEAD;
            r.entries.push_back((offset, Arc::from(data), now));
            r.bytes += size;
            self.bytes.fetch_add(size, Ordering::Relaxed);
            r.last = Some(offset);
            r.last_publish = Some(now);
            r.referenced = true;
            self.trim(&mut r, now);
            break result;
        };
        if self.bytes.load(Ordering::Relaxed) > self.budget {
            self.evict(channel);
        }
        result
    }

    /// The resume for `since` on `channel`, within `window`.
    pub fn replay(&self, channel: &Channel, since: Offset, window: Window) -> Replay {
        let Some(ring) = self.channels.read().rings.get(channel).cloned() else {
            // Never published here, or its history was evicted: nothing proves no loss.
            return Replay::after(since, [], None, None);
        };
        let mut r = ring.lock();
        if r.removed {
            return Replay::after(since, [], None, None);
        }
        self.trim(&mut r, Instant::now());
        let first = r.entries.front().map(|(o, _, _)| *o);
        let (retained, cut) = window.take(
            r.entries
                .iter()
                .rev()
                .take_while(|(o, _, _)| *o > since)
                .map(|(o, d, _)| (*o, d.clone())),
        );
        Replay::after(since, retained, first, r.last).cut_short(cut)
    }

    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn channel_count(&self) -> usize {
        self.channels.read().rings.len()
    }

    fn ring(&self, channel: &Channel) -> Arc<Mutex<Ring>> {
        if let Some(r) = self.channels.read().rings.get(channel) {
            return r.clone();
        }
        let mut t = self.channels.write();
        if let Some(r) = t.rings.get(channel) {
            return r.clone();
        }
        let cost = channel_cost(channel);
        let ring = Arc::new(Mutex::new(Ring {
            bytes: cost,
            ..Ring::default()
        }));
        self.bytes.fetch_add(cost, Ordering::Relaxed);
        t.rings.insert(channel.clone(), ring.clone());
        t.hand.push_back(channel.clone());
        ring
    }

    fn trim(&self, r: &mut Ring, now: Instant) {
        while let Some((_, d, at)) = r.entries.front() {
            if r.entries.len() > self.len || now.duration_since(*at) > self.ttl {
                let size = d.len() + ENTRY_OVERHEAD;
                r.entries.pop_front();
                r.bytes -= size;
                self.bytes.fetch_sub(size, Ordering::Relaxed);
            } else {
                break;
            }
        }
    }

    /// Drops whole channels until the table is within budget. The hand visits channels in turn:
    /// one published to since its last visit is spared once (its mark cleared), any other is
    /// dropped. `keep` (the channel just published to) goes only when it is the last one. Each
    /// step clears a mark or drops a channel, so the loop ends, and its cost is paid back by the
    /// publishes that set the marks. Runs with no ring lock held.
    fn evict(&self, keep: &Channel) {
        let mut t = self.channels.write();
        while self.bytes.load(Ordering::Relaxed) > self.budget {
            let Some(channel) = t.hand.pop_front() else {
                break;
            };
            let Some(ring) = t.rings.get(&channel).cloned() else {
                continue;
            };
            let spare = {
                let mut r = ring.lock();
                let spare = (channel == *keep && t.rings.len() > 1) || r.referenced;
                r.referenced = false;
                spare
            };
            if spare {
                t.hand.push_back(channel);
                continue;
            }
            t.rings.remove(&channel);
            let mut r = ring.lock();
            r.removed = true;
            self.bytes.fetch_sub(r.bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> Channel {
        Channel::new(s).unwrap()
    }

    fn o(seq: u64) -> Offset {
        Offset { epoch: 1, seq }
    }

    const ALL: Window = Window {
        frames: usize::MAX,
        bytes: usize::MAX,
    };

    fn publish(h: &MemoryHistory, c: &str, seq: u64, data: &str) {
        h.record(&ch(c), data, || (o(seq), ()));
    }

    #[test]
    fn resume_rule() {
        let e = |s: u64| (o(s), Arc::<str>::from("x"));
        // since retained: exact, no gap.
        let r = Replay::after(o(2), [e(1), e(2), e(3)], Some(o(1)), Some(o(3)));
        assert_eq!((r.entries.len(), r.gap), (1, false));
        // since past the newest offset proves nothing.
        assert!(Replay::after(o(9), [e(1), e(2)], Some(o(1)), Some(o(2))).gap);
        // since inside the retained range though not this channel's offset: no gap.
        let r = Replay::after(o(4), [e(3), e(5), e(7)], Some(o(3)), Some(o(7)));
        assert_eq!((r.entries.len(), r.gap), (2, false));
        // since older than the history: what is left, with a gap.
        let r = Replay::after(o(1), [e(5), e(6)], Some(o(5)), Some(o(6)));
        assert_eq!((r.entries.len(), r.gap), (2, true));
        // since at the newest offset, entries aged out: up to date.
        let r = Replay::after(o(6), [], None, Some(o(6)));
        assert_eq!((r.entries.len(), r.gap), (0, false));
        // nothing known: gap.
        assert!(Replay::after(o(6), [], None, None).gap);
    }

    #[test]
    fn keeps_the_last_len_messages() {
        let h = MemoryHistory::new(3, Duration::from_secs(60), 1 << 20);
        for s in 1..=5 {
            publish(&h, "a", s, "m");
        }
        let r = h.replay(&ch("a"), o(3), ALL);
        assert_eq!(
            r.entries.iter().map(|(o, _)| o.seq).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert!(!r.gap);
        let r = h.replay(&ch("a"), o(1), ALL);
        assert!(r.gap, "2 was trimmed");
        assert_eq!(r.entries.len(), 3);
    }

    #[test]
    fn entries_age_out_but_the_last_offset_is_remembered() {
        let h = MemoryHistory::new(100, Duration::from_millis(20), 1 << 20);
        publish(&h, "a", 1, "m");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(
            h.replay(&ch("a"), o(1), ALL),
            Replay {
                entries: vec![],
                gap: false,
                newest: Some(o(1)),
                cut: false,
            }
        );
        assert!(h.replay(&ch("a"), o(0), ALL).gap);
        assert_eq!(
            h.bytes(),
            channel_cost(&ch("a")),
            "the channel itself still counts"
        );
    }

    #[test]
    fn channels_whose_messages_aged_out_still_count_against_the_budget() {
        let budget = 64 * 1024;
        let h = MemoryHistory::new(1000, Duration::ZERO, budget);
        for i in 0..20_000u64 {
            let c = format!("aged-{i}");
            publish(&h, &c, i + 1, "m");
            // Reading trims the aged message: what is left is the channel's last offset.
            assert!(h.replay(&ch(&c), o(0), ALL).entries.is_empty());
            assert!(h.bytes() <= budget, "over budget after {i}: {}", h.bytes());
        }
        assert!(
            h.channel_count() * CHANNEL_OVERHEAD <= budget,
            "{} channels kept",
            h.channel_count()
        );
    }

    #[test]
    fn a_channel_published_to_all_along_survives_a_spray() {
        let budget = 64 * 1024;
        let h = MemoryHistory::new(100, Duration::from_secs(60), budget);
        let mut seq = 0;
        let mut hot = Vec::new();
        for i in 0..20_000u64 {
            seq += 1;
            publish(&h, &format!("spray-{i}"), seq, "m");
            if i % 10 == 0 {
                seq += 1;
                hot.push(seq);
                publish(&h, "hot", seq, "m");
            }
        }
        // Resume from the oldest message a ring of 100 keeps.
        let r = h.replay(&ch("hot"), o(hot[hot.len() - 100]), ALL);
        assert!(!r.gap, "the hot channel was never evicted");
        assert_eq!(r.entries.len(), 99);
    }

    #[test]
    fn byte_budget_holds_under_a_channel_spray() {
        let budget = 64 * 1024;
        let h = MemoryHistory::new(1000, Duration::from_secs(60), budget);
        let data = "d".repeat(100);
        for i in 0..20_000u64 {
            publish(&h, &format!("spray-{i}"), i + 1, &data);
            assert!(h.bytes() <= budget, "over budget after {i}: {}", h.bytes());
        }
        assert!(h.channel_count() * (100 + ENTRY_OVERHEAD) <= budget);
        // The most recent channels kept their history; evicted ones say gap.
        assert!(!h.replay(&ch("spray-19999"), o(20_000), ALL).gap);
        assert!(h.replay(&ch("spray-0"), o(0), ALL).gap);
    }

    #[test]
    fn a_replay_keeps_the_newest_that_fit_its_window() {
        let h = MemoryHistory::new(1000, Duration::from_secs(60), 1 << 20);
        for s in 1..=10 {
            publish(&h, "a", s, "0123456789");
        }
        let seqs = |r: &Replay| r.entries.iter().map(|(o, _)| o.seq).collect::<Vec<_>>();
        // By count: the newest three, and a gap for what was left out.
        let r = h.replay(
            &ch("a"),
            o(1),
            Window {
                frames: 3,
                bytes: usize::MAX,
            },
        );
        assert_eq!((seqs(&r), r.gap, r.cut), (vec![8, 9, 10], true, true));
        // By bytes: two messages of 10 + 64 fit in 150, a third does not.
        let r = h.replay(
            &ch("a"),
            o(1),
            Window {
                frames: 100,
                bytes: 150,
            },
        );
        assert_eq!((seqs(&r), r.gap, r.cut), (vec![9, 10], true, true));
        assert_eq!(
            r.bytes(),
            2 * (10 + REPLAY_FRAME_BYTES),
            "in the window's unit"
        );
        // A window that reaches back to `since` is no gap.
        let r = h.replay(
            &ch("a"),
            o(7),
            Window {
                frames: 3,
                bytes: 3 * 74,
            },
        );
        assert_eq!((seqs(&r), r.gap, r.cut), (vec![8, 9, 10], false, false));
        // No window: the newest offset alone.
        let r = h.replay(&ch("a"), o(1), Window::NONE);
        assert_eq!((r.entries.len(), r.newest), (0, Some(o(10))));
    }
}
