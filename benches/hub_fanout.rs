//! Hub fan-out without sockets: how many deliveries per second the hub's hot path (encode once,
//! push the shared frame into every subscriber's outbox, drain) sustains on this machine.
//!
//! Run: `cargo bench --bench hub_fanout`. Prints figures; asserts nothing about speed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgeplex::bus::history::MemoryHistory;
use edgeplex::bus::hub::Start;
use edgeplex::bus::memory::MemoryBus;
use edgeplex::bus::{Bus, Hub};
use edgeplex::metrics::Metrics;
use edgeplex::outbox::Outbox;
use edgeplex::protocol::{Channel, Offset};
use serde_json::value::RawValue;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    println!("hub fan-out, 100-byte payloads, one channel, outboxes drained every 64 publishes");
    println!(
        "{:>12} {:>10} {:>16} {:>14}",
        "subscribers", "publishes", "deliveries/s", "ns/delivery"
    );
    for &subs in &[1usize, 100, 1_000, 5_000] {
        let publishes = (2_000_000 / subs).clamp(200, 200_000);
        let hub = Hub::new(
            Bus::Memory(MemoryBus::default()),
            1_000,
            Arc::new(Metrics::new()),
        );
        let channel = Channel::new("bench").unwrap();
        let outboxes: Vec<Arc<Outbox>> = (0..subs)
            .map(|i| {
                let o = Arc::new(Outbox::new(1024, 1 << 20));
                rt.block_on(hub.subscribe(&channel, i as u64, &o, Vec::new(), Start::Live))
                    .unwrap();
                o
            })
            .collect();
        let payload = format!("{{\"v\":\"{}\"}}", "x".repeat(92));
        let data: Box<RawValue> = RawValue::from_string(payload).unwrap();
        let mut sink = Vec::with_capacity(128);
        let start = Instant::now();
        rt.block_on(async {
            for i in 0..publishes {
                hub.publish(&channel, &data).await.unwrap();
                if i % 64 == 63 {
                    for o in &outboxes {
                        o.drain(&mut sink);
                        sink.clear();
                    }
                }
            }
        });
        let elapsed = start.elapsed();
        let deliveries = (publishes * subs) as f64;
        println!(
            "{:>12} {:>10} {:>16.0} {:>14.1}",
            subs,
            publishes,
            deliveries / elapsed.as_secs_f64(),
            elapsed.as_nanos() as f64 / deliveries
        );
    }
    history_spray();
}

/// Publishes to ever-new channels with the history budget full, so every publish evicts: the cost
/// of keeping the embedded bus's history bounded while a client sprays channel names.
fn history_spray() {
    println!();
    println!("history under a channel spray: 100-byte payloads, every publish to a new channel");
    println!(
        "{:>14} {:>12} {:>14} {:>14}",
        "budget", "channels", "publishes/s", "ns/publish"
    );
    let data = "x".repeat(100);
    for &budget in &[1usize << 20, 16 << 20] {
        let h = MemoryHistory::new(1000, Duration::from_secs(3600), budget);
        // Fill the budget first, then measure publishes that each force an eviction.
        let mut i = 0u64;
        while h.bytes() + 512 < budget {
            let c = Channel::new(&format!("fill-{i}")).unwrap();
            i += 1;
            h.record(&c, &data, || (Offset { epoch: 1, seq: i }, ()));
        }
        let n = 20_000u64;
        let start = Instant::now();
        for k in 0..n {
            let c = Channel::new(&format!("spray-{k}")).unwrap();
            i += 1;
            h.record(&c, &data, || (Offset { epoch: 1, seq: i }, ()));
        }
        let elapsed = start.elapsed();
        println!(
            "{:>14} {:>12} {:>14.0} {:>14.0}",
            budget,
            h.channel_count(),
            n as f64 / elapsed.as_secs_f64(),
            elapsed.as_nanos() as f64 / n as f64
        );
    }
}
