//! The embedded bus for a single node: nothing leaves the process, so all it owns is the offset
//! sequence and the channel history. The hub calls [`MemoryBus::next_offset`] under the channel's lock, which makes the
//! order of offsets the order of delivery.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use std::time::Duration;

use super::history::MemoryHistory;
use crate::protocol::Offset;

#[derive(Debug)]
pub struct MemoryBus {
    pub history: MemoryHistory,
    /// Start time in milliseconds: offsets from an earlier run of the node compare lower than
    /// every offset of this run, so a client resuming across a restart is never told it is ahead.
    epoch: u64,
    seq: AtomicU64,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new(1000, Duration::from_secs(24 * 3600), 64 << 20)
    }
}

impl MemoryBus {
    /// History: `len` messages per channel, none older than `ttl`, `budget` bytes in all.
    pub fn new(len: usize, ttl: Duration, budget: usize) -> MemoryBus {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        MemoryBus {
            history: MemoryHistory::new(len, ttl, budget),
            epoch,
            seq: AtomicU64::new(0),
        }
    }

    /// One node-wide sequence: increasing per channel because it increases everywhere, and no
    /// per-channel state to keep for channels nobody listens to.
    pub fn next_offset(&self) -> Offset {
        Offset {
            epoch: self.epoch,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }
}
