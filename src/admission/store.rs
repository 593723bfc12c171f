//! A bounded per-address state store for governor's keyed rate limiters.
//!
//! governor does the GCRA arithmetic; this store only keeps each address's one number (its
//! theoretical arrival time) and bounds how many addresses it keeps, because the keys come from
//! clients: an address spray must not grow the node's memory. Past its capacity, inserting an
//! address evicts another, chosen by a CLOCK hand: an address seen again since the hand last
//! passed is spared once, so clients that keep coming back outlive one-shot addresses. An evicted
//! address starts afresh (a full burst) when it returns; that is the price of the bound, and the
//! node-wide limits still hold. [`retain_recent`](ShrinkableKeyedStateStore::retain_recent) drops
//! addresses whose state is back to fresh, so a quiet table shrinks.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Arc;

use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;
use parking_lot::Mutex;

/// Shards keep one lock from serialising every client of the node.
const SHARDS: usize = 16;

/// What a store is keyed by: a client address, or a user. Each is kept as 16 bytes.
pub trait StoreKey: Copy + Eq + std::hash::Hash + std::fmt::Debug {
    fn bytes(&self) -> Key;
}

impl StoreKey for IpAddr {
    fn bytes(&self) -> Key {
        key(self)
    }
}

/// A user, as the per-user limits key it: 16 bytes of the SHA-256 of its name, so every user
/// costs the table the same whatever the length of its `sub`. Finding two names with one key
/// takes about 2^64 tries.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserKey(Key);

impl UserKey {
    pub fn of(user: &str) -> UserKey {
        let d = ring::digest::digest(&ring::digest::SHA256, user.as_bytes());
        let mut k = [0u8; 16];
        k.copy_from_slice(&d.as_ref()[..16]);
        UserKey(k)
    }
}

impl std::fmt::Debug for UserKey {
    // The key stands for a user; its bytes say nothing to a reader of the logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserKey(…)")
    }
}

impl StoreKey for UserKey {
    fn bytes(&self) -> Key {
        self.0
    }
}

#[derive(Debug)]
pub struct BoundedStore<K = IpAddr>(Arc<Inner>, std::marker::PhantomData<fn(K)>);

impl<K> Clone for BoundedStore<K> {
    fn clone(&self) -> Self {
        BoundedStore(self.0.clone(), std::marker::PhantomData)
    }
}

#[derive(Debug)]
struct Inner {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
    /// Picks an address's shard with keys drawn at start: with fixed keys, addresses that all
    /// land in one shard could be computed offline and sprayed to evict that shard's clients
    /// (each shard holds a sixteenth of the capacity).
    hasher: RandomState,
}

#[derive(Debug, Default)]
struct Shard {
    map: HashMap<Key, Slot>,
    /// Every key of `map` once, in the order the eviction hand visits them.
    hand: VecDeque<Key>,
}

/// An address as 16 bytes (IPv4 mapped into IPv6): `IpAddr` takes 17 and pads the map's entries
/// to 8 more. Under a spray every byte here is multiplied by the table's capacity.
pub type Key = [u8; 16];

fn key(ip: &IpAddr) -> Key {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The theoretical arrival time (nanoseconds since the limiter started: 2^63 of them is 292
/// years) with the CLOCK mark in the top bit, so an entry is one word.
#[derive(Debug, Clone, Copy)]
struct Slot(u64);

impl Slot {
    const MARK: u64 = 1 << 63;

    fn new(tat: u64) -> Slot {
        Slot(tat & !Self::MARK)
    }

    fn tat(self) -> u64 {
        self.0 & !Self::MARK
    }

    fn set_tat(&mut self, tat: u64) {
        self.0 = (self.0 & Self::MARK) | (tat & !Self::MARK);
    }

    fn referenced(self) -> bool {
        self.0 & Self::MARK != 0
    }

    fn set_referenced(&mut self, on: bool) {
        if on {
            self.0 |= Self::MARK;
        } else {
            self.0 &= !Self::MARK;
        }
    }
}

impl<K: StoreKey> BoundedStore<K> {
    /// Keeps at most about `capacity` keys (rounded up to a multiple of the shard count).
    pub fn new(capacity: usize) -> BoundedStore<K> {
        BoundedStore(
            Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                per_shard: capacity.div_ceil(SHARDS).max(1),
                hasher: RandomState::new(),
            }),
            std::marker::PhantomData,
        )
    }

    pub fn capacity(&self) -> usize {
        self.0.per_shard * SHARDS
    }

    fn shard_index(&self, key: &Key) -> usize {
        self.0.hasher.hash_one(key) as usize % SHARDS
    }

    fn shard(&self, key: &Key) -> &Mutex<Shard> {
        &self.0.shards[self.shard_index(key)]
    }

    /// The stored state of `ip`, for the admin view.
    pub fn get(&self, ip: &K) -> Option<Nanos> {
        let k = ip.bytes();
        self.shard(&k)
            .lock()
            .map
            .get(&k)
            .map(|s| Nanos::new(s.tat()))
    }
}

impl Shard {
    /// Evicts until there is room for one more key.
    fn make_room(&mut self, cap: usize) {
        while self.map.len() >= cap {
            let Some(key) = self.hand.pop_front() else {
                return;
            };
            match self.map.get_mut(&key) {
                Some(slot) if slot.referenced() => {
                    slot.set_referenced(false);
                    self.hand.push_back(key);
                }
                Some(_) => {
                    self.map.remove(&key);
                }
                None => {}
            }
        }
    }
}

impl<K: StoreKey> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, ip: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let k = ip.bytes();
        let mut shard = self.shard(&k).lock();
        if let Some(slot) = shard.map.get_mut(&k) {
            // A refused address is seen too: its spent budget is what must not be forgotten.
            slot.set_referenced(true);
            let (outcome, tat) = f(Some(Nanos::new(slot.tat())))?;
            slot.set_tat(tat.as_u64());
            return Ok(outcome);
        }
        // Refused at first sight (asked for more than the burst): nothing worth keeping.
        let (outcome, tat) = f(None)?;
        shard.make_room(self.0.per_shard);
        shard.map.insert(k, Slot::new(tat.as_u64()));
        shard.hand.push_back(k);
        Ok(outcome)
    }
}

impl<K: StoreKey> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        let below = drop_below.as_u64();
        for shard in &self.0.shards {
            let mut s = shard.lock();
            s.map.retain(|_, slot| slot.tat() >= below);
            let Shard { map, hand } = &mut *s;
            hand.retain(|k| map.contains_key(k));
        }
    }

    fn shrink_to_fit(&self) {
        for shard in &self.0.shards {
            let mut s = shard.lock();
            s.map.shrink_to_fit();
            s.hand.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.0.shards.iter().map(|s| s.lock().map.len()).sum()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use governor::middleware::NoOpMiddleware;
    use governor::{Quota, RateLimiter};

    type Limiter = RateLimiter<IpAddr, BoundedStore, FakeRelativeClock, NoOpMiddleware<Nanos>>;
    use std::num::NonZeroU32;

    fn limiter(cap: usize) -> (BoundedStore, Limiter) {
        let store = BoundedStore::new(cap);
        let quota =
            Quota::per_second(NonZeroU32::new(1).unwrap()).allow_burst(NonZeroU32::new(2).unwrap());
        let l = RateLimiter::new(quota, store.clone(), FakeRelativeClock::default());
        (store, l)
    }

    fn v4(i: u32) -> IpAddr {
        IpAddr::V4(i.into())
    }

    #[test]
    fn limits_each_address_like_governors_own_store() {
        let (_, l) = limiter(1000);
        assert!(l.check_key(&v4(1)).is_ok());
        assert!(l.check_key(&v4(1)).is_ok());
        assert!(l.check_key(&v4(1)).is_err(), "burst of 2 spent");
        assert!(l.check_key(&v4(2)).is_ok(), "another address is separate");
    }

    #[test]
    fn capacity_holds_under_a_spray_and_returning_clients_survive_it() {
        let (store, l) = limiter(1024);
        let regular = v4(7);
        for i in 0..100_000u32 {
            let _ = l.check_key(&v4(1_000_000 + i));
            if i % 64 == 0 {
                let _ = l.check_key(&regular);
            }
            assert!(store.len() <= store.capacity());
        }
        assert!(
            store.get(&regular).is_some(),
            "a returning client keeps its state"
        );
        assert!(
            l.check_key(&regular).is_err(),
            "and so its spent budget: eviction did not hand it a fresh burst"
        );
    }

    #[test]
    fn which_shard_an_address_lands_in_cannot_be_known_in_advance() {
        let (a, b) = (BoundedStore::new(1000), BoundedStore::new(1000));
        let keys: Vec<Key> = (0..64).map(|i| key(&v4(i))).collect();
        let shards = |s: &BoundedStore| keys.iter().map(|k| s.shard_index(k)).collect::<Vec<_>>();
        // Equal for 64 addresses by chance: 16^-64.
        assert_ne!(shards(&a), shards(&b), "each store draws its own hash keys");
    }

    #[test]
    fn retain_recent_drops_fresh_state() {
        let store = BoundedStore::new(1000);
        let quota = Quota::per_second(NonZeroU32::new(1).unwrap());
        let clock = FakeRelativeClock::default();
        let l: Limiter = RateLimiter::new(quota, store.clone(), clock.clone());
        for i in 0..10 {
            let _ = l.check_key(&v4(i));
        }
        assert_eq!(store.len(), 10);
        clock.advance(std::time::Duration::from_secs(5));
        l.retain_recent();
        assert_eq!(store.len(), 0);
    }
}
