//! The embedded bus for a single node: nothing leaves the process, so all it owns is the offset
//! sequence. The hub calls [`MemoryBus::next_offset`] under the channel's lock, which makes the
//! order of offsets the order of delivery.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::protocol::Offset;

#[derive(Debug)]
pub struct MemoryBus {
    /// Start time in milliseconds: offsets from an earlier run of the node compare lower than
    /// every offset of this run, so a client resuming across a restart is never told it is ahead.
    epoch: u64,
    seq: AtomicU64,
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBus {
    pub fn new() -> MemoryBus {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        MemoryBus {
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
