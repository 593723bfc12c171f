//! An address-spray attack on the per-IP limits: 1,000,000 distinct addresses each open a
//! connection and a session and send a message. Per-IP state must stay bounded by `admission.max_tracked_addresses` per
//! limit, and the heap it holds under the bound documented in the README (see "Per-IP state").
//!
//! Its own test binary, so the counting allocator below sees only this test's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use edgeplex::admission::Admission;
use edgeplex::config::{Config, FileConfig};
use edgeplex::metrics::Metrics;

/// Counts the bytes live on the heap.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every method forwards to the system allocator with the caller's arguments unchanged,
// so the system allocator's guarantees hold; the counter is only arithmetic on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded as is (see the impl).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The documented bound: bytes of heap per tracked address per limit, at most.
const BYTES_PER_TRACKED_ADDRESS: usize = 96;

#[test]
fn a_million_address_spray_keeps_per_ip_state_bounded() {
    const CAP: usize = 100_000;
    const ADDRESSES: u32 = 1_000_000;
    let mut f = FileConfig::default();
    f.admission.max_tracked_addresses = CAP;
    // Generous rates, so every address really is admitted and charged: the worst case for state.
    f.limits.new_sessions.per_second = u32::MAX;
    f.limits.new_sessions.burst = u32::MAX;
    let c = Config::from_file_config(f).unwrap();
    let admission = Arc::new(Admission::new(
        c.admission,
        c.limits,
        Arc::new(Metrics::new()),
    ));
    let no_headers = http::HeaderMap::new();
    let before = LIVE.load(Ordering::Relaxed);
    let mut peak = 0;
    for i in 0..ADDRESSES {
        // Half IPv4, half IPv6 from distinct /48s, so from distinct /64s too (IPv6 keys are the
        // larger ones, and only IPv6 has state per wide prefix).
        let ip = if i % 2 == 0 {
            IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i))
        } else {
            IpAddr::V6(Ipv6Addr::from((0x2001_u128 << 112) | (u128::from(i) << 80)))
        };
        let connection = admission
            .admit_connection(ip, false)
            .expect("a fresh address may connect");
        let client = admission.client(ip, &no_headers);
        let ticket = admission
            .admit_session(client)
            .expect("a fresh address is admitted");
        ticket.charge_message(100).expect("and may send");
        drop(ticket);
        drop(connection);
        if i % 10_000 == 0 {
            peak = peak.max(LIVE.load(Ordering::Relaxed) - before);
        }
    }
    let grown = (LIVE.load(Ordering::Relaxed) - before).max(peak) as usize;
    let tracked = admission.tracked();
    // Five per-IP rate limits (new sessions, messages, bytes, new connections per address and
    // per IPv6 wide prefix), each holding at most its capacity (rounded up per shard).
    let cap_total = 5 * (CAP + 16);
    assert!(tracked <= cap_total, "{tracked} addresses tracked");
    let bound = cap_total * BYTES_PER_TRACKED_ADDRESS;
    println!(
        "{ADDRESSES} addresses: {tracked} tracked, heap grew {grown} bytes \
         ({} per tracked address), bound {bound}",
        grown / tracked.max(1)
    );
    assert!(
        grown <= bound,
        "per-IP state took {grown} bytes for {tracked} addresses; bound {bound}"
    );
    // A quiet table shrinks back once the state is fresh again.
    std::thread::sleep(std::time::Duration::from_millis(10));
    admission.housekeeping();
}
