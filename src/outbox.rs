//! A session's bounded outbound queue ([`Outbox`]): what the hub and the session's own replies
//! push into, and what a transport's writer drains onto its wire.
//!
//! It sits below both the session and the hub (each holds the same `Arc<Outbox>`), so neither
//! needs the other to reach it. It owns the queue's caps, its status (open, overflowed, closed)
//! and the waits of the writer; it knows nothing of channels, frames' meaning or sockets.

use std::collections::VecDeque;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::protocol::Frame;

/// Why the outbox refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue was full: the session is now marked slow and will be closed with 1013.
    /// Returned once per session; later pushes get `Closed`.
    Overflow,
    /// The session is closing; the frame is dropped.
    Closed,
}

/// Why [`Outbox::write_within`] gave up on a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStop {
    /// It took longer than its limit, or the queue overflowed behind it: a slow consumer.
    Slow,
    /// The session ended meanwhile.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxStatus {
    Open,
    /// The queue overflowed (or its writer gave up on the client); the transport must close the
    /// session with 1013.
    Overflowed,
    Closed,
}

/// A session's bounded outbound queue. Producers (the hub, the session's own replies) never
/// wait: a full queue means the client cannot keep up, and holding more for it would let one
/// slow reader grow the node's memory without bound.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<OutboxState>,
    /// Wakes the writer when there is something to drain (one waiter, a stored permit).
    notify: Notify,
    /// Wakes whoever waits in [`Outbox::ended`] when the status leaves `Open`. Apart from
    /// `notify` because a writer stuck on a write to a client that does not read must still
    /// learn of an overflow at once, and the SSE stall watcher must not take the writer's permit.
    ended: Notify,
    cap: usize,
    cap_bytes: usize,
}

#[derive(Debug)]
struct OutboxState {
    queue: VecDeque<Frame>,
    /// Bytes of the queued frames. Frames are shared with other sessions, so this overstates
    /// what the queue alone keeps alive; as a cap that errs on the safe side.
    bytes: usize,
    status: OutboxStatus,
    /// When the oldest frame still queued was pushed: how long the writer has left it waiting.
    waiting_since: Option<std::time::Instant>,
}

/// A drained queue holding more than this many slots gives its memory back, so a burst does not
/// leave an idle session holding a large ring. A writer that keeps a ring of its own (see
/// [`Outbox::take`]) gives it back past the same size.
pub const OUTBOX_KEEP_CAPACITY: usize = 16;

impl Outbox {
    /// At most `cap` frames and `cap_bytes` bytes; a frame that would pass either overflows it.
    pub fn new(cap: usize, cap_bytes: usize) -> Outbox {
        Outbox {
            state: Mutex::new(OutboxState {
                queue: VecDeque::new(),
                bytes: 0,
                status: OutboxStatus::Open,
                waiting_since: None,
            }),
            notify: Notify::new(),
            ended: Notify::new(),
            cap,
            cap_bytes,
        }
    }

    pub fn push(&self, frame: Frame) -> Result<(), PushError> {
        let mut st = self.state.lock();
        match st.status {
            OutboxStatus::Open => {}
            OutboxStatus::Overflowed | OutboxStatus::Closed => return Err(PushError::Closed),
        }
        // An empty queue takes any one frame, so a single message larger than the byte cap still
        // reaches a client that keeps up.
        let over_bytes = !st.queue.is_empty() && st.bytes + frame.len() > self.cap_bytes;
        if st.queue.len() >= self.cap || over_bytes {
            self.overflow(st);
            return Err(PushError::Overflow);
        }
        let was_empty = st.queue.is_empty();
        if was_empty {
            st.waiting_since = Some(std::time::Instant::now());
        }
        st.bytes += frame.len();
        st.queue.push_back(frame);
        drop(st);
        // The writer drains everything on each wake-up, so only the empty → non-empty edge needs
        // a wake-up; `notify_one` keeps a permit if the writer is not waiting yet.
        if was_empty {
            self.notify.notify_one();
        }
        Ok(())
    }

    /// Moves every queued frame into `out` and says whether the session may go on.
    pub fn drain(&self, out: &mut Vec<Frame>) -> OutboxStatus {
        let mut st = self.state.lock();
        out.extend(st.queue.drain(..));
        st.bytes = 0;
        st.waiting_since = None;
        if st.queue.capacity() > OUTBOX_KEEP_CAPACITY {
            st.queue = VecDeque::new();
        }
        st.status
    }

    /// [`Outbox::drain`] into a ring: when `into` is empty the queue and `into` swap rings, so
    /// no frame is copied and a busy writer's empty ring is refilled instead of the queue
    /// growing a new one for each burst (one past [`OUTBOX_KEEP_CAPACITY`] is not kept).
    pub fn take(&self, into: &mut VecDeque<Frame>) -> OutboxStatus {
        let mut st = self.state.lock();
        if into.is_empty() {
            std::mem::swap(&mut st.queue, into);
        } else {
            into.extend(st.queue.drain(..));
        }
        let spare =
            (st.queue.capacity() > OUTBOX_KEEP_CAPACITY).then(|| std::mem::take(&mut st.queue));
        st.bytes = 0;
        st.waiting_since = None;
        let status = st.status;
        // Freed after the lock: the hub pushes under it.
        drop(st);
        drop(spare);
        status
    }

    pub fn status(&self) -> OutboxStatus {
        self.state.lock().status
    }

    /// Waits until something was pushed (or the status changed) since the last drain.
    pub async fn ready(&self) {
        self.notify.notified().await
    }

    /// Waits until the status leaves `Open`, and returns it. Unlike [`Outbox::ready`] this
    /// takes nothing from the writer, so it can run next to a write in progress.
    pub async fn ended(&self) -> OutboxStatus {
        loop {
            let mut notified = std::pin::pin!(self.ended.notified());
            // Registered before the status is read, so a change in between still wakes us.
            notified.as_mut().enable();
            let status = self.state.lock().status;
            if status != OutboxStatus::Open {
                return status;
            }
            notified.await;
        }
    }

    /// Runs one write to the client for at most `limit`, and only while the outbox is open. A
    /// client that stopped reading leaves the write stuck on its full socket or stream window
    /// while the queue behind it overflows; the overflow ends the write at once (a slow
    /// consumer), not the timeout, so the session and its socket are not held for `limit` more.
    /// Biased: a write that completes at once (the usual case) never arms the overflow watch.
    pub async fn write_within<T>(
        &self,
        write: impl std::future::Future<Output = T>,
        limit: std::time::Duration,
    ) -> Result<T, WriteStop> {
        tokio::select! {
            biased;
            r = tokio::time::timeout(limit, write) => r.map_err(|_| WriteStop::Slow),
            status = self.ended() => Err(match status {
                OutboxStatus::Closed => WriteStop::Closed,
                OutboxStatus::Open | OutboxStatus::Overflowed => WriteStop::Slow,
            }),
        }
    }

    /// Marks the session slow as an overflow does, for a writer that gave up on its client
    /// (a frame waited past `session.write_timeout`): the transport closes it with 1013.
    pub fn mark_slow(&self) {
        let st = self.state.lock();
        if st.status == OutboxStatus::Open {
            self.overflow(st);
        }
    }

    /// Marks an open outbox overflowed: its frames are freed at once (a slow consumer is owed
    /// nothing), and both the writer and whoever waits in [`Outbox::ended`] are woken.
    fn overflow(&self, mut st: parking_lot::MutexGuard<'_, OutboxState>) {
        st.status = OutboxStatus::Overflowed;
        st.queue.clear();
        st.bytes = 0;
        drop(st);
        self.notify.notify_one();
        self.ended.notify_waiters();
    }

    pub fn close(&self) {
        let mut st = self.state.lock();
        let was_open = st.status == OutboxStatus::Open;
        if was_open {
            st.status = OutboxStatus::Closed;
        }
        st.queue.clear();
        st.bytes = 0;
        drop(st);
        if was_open {
            self.ended.notify_waiters();
        }
    }

    pub fn len(&self) -> usize {
        self.state.lock().queue.len()
    }

    /// The status, and how long the oldest queued frame has waited for the writer. A transport
    /// whose writer can stall outside its own control (SSE: hyper stops polling a body whose
    /// client does not read) watches this.
    pub fn stall(&self) -> (OutboxStatus, std::time::Duration) {
        let st = self.state.lock();
        let waited = st.waiting_since.map(|t| t.elapsed()).unwrap_or_default();
        (st.status, waited)
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn capacity_bytes(&self) -> usize {
        self.cap_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{self, ErrorCode};

    #[test]
    fn outbox_cap_holds() {
        let o = Outbox::new(3, 1 << 20);
        let f = protocol::encode_ok(None);
        for _ in 0..3 {
            o.push(f.clone()).unwrap();
        }
        assert_eq!(o.push(f.clone()), Err(PushError::Overflow));
        assert_eq!(o.push(f.clone()), Err(PushError::Closed));
        assert_eq!(o.len(), 0, "an overflowed outbox frees its frames at once");
        let mut out = Vec::new();
        assert_eq!(o.drain(&mut out), OutboxStatus::Overflowed);
    }

    #[test]
    fn outbox_byte_cap_holds() {
        let big = protocol::encode_error(None, ErrorCode::TooLarge, &"x".repeat(1000), None);
        let o = Outbox::new(1000, 2500);
        // One frame over the byte cap still passes into an empty queue.
        let huge = protocol::encode_error(None, ErrorCode::TooLarge, &"y".repeat(5000), None);
        o.push(huge).unwrap();
        let mut out = Vec::new();
        o.drain(&mut out);
        o.push(big.clone()).unwrap();
        o.push(big.clone()).unwrap();
        assert_eq!(
            o.push(big.clone()),
            Err(PushError::Overflow),
            "two ~1 KB frames fit, a third does not"
        );
        assert_eq!(o.drain(&mut out), OutboxStatus::Overflowed);
    }

    #[test]
    fn outbox_gives_back_burst_memory() {
        let o = Outbox::new(10_000, 1 << 20);
        for _ in 0..1000 {
            o.push(protocol::encode_ok(None)).unwrap();
        }
        let mut out = Vec::new();
        o.drain(&mut out);
        assert_eq!(out.len(), 1000);
        assert!(o.state.lock().queue.capacity() <= OUTBOX_KEEP_CAPACITY);
    }

    #[test]
    fn take_moves_the_ring_and_keeps_the_caps() {
        let o = Outbox::new(3, 1 << 20);
        let f = protocol::encode_ok(None);
        let mut ring = VecDeque::with_capacity(8);
        let spare = ring.capacity();
        for _ in 0..3 {
            o.push(f.clone()).unwrap();
        }
        assert_eq!(o.take(&mut ring), OutboxStatus::Open);
        assert_eq!(ring.len(), 3);
        assert_eq!(o.len(), 0);
        assert_eq!(
            o.state.lock().queue.capacity(),
            spare,
            "the writer's empty ring is the queue's now"
        );
        // The frame cap counts what is queued, not what the writer still holds.
        for _ in 0..3 {
            o.push(f.clone()).unwrap();
        }
        assert_eq!(
            o.take(&mut ring),
            OutboxStatus::Open,
            "appends to a ring that is not empty"
        );
        assert_eq!(ring.len(), 6);
        let mut big = VecDeque::with_capacity(1000);
        o.push(f.clone()).unwrap();
        ring.clear();
        std::mem::swap(&mut ring, &mut big);
        o.take(&mut ring);
        assert!(o.state.lock().queue.capacity() <= OUTBOX_KEEP_CAPACITY);
        for _ in 0..4 {
            let _ = o.push(f.clone());
        }
        assert_eq!(o.take(&mut VecDeque::new()), OutboxStatus::Overflowed);
    }
}
