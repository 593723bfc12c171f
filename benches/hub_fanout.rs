//! Hub fan-out without sockets: how many deliveries per second the hub's hot path (encode once,
//! push the shared frame into every subscriber's outbox, drain) sustains on this machine.
//!
//! Run: `cargo bench --bench hub_fanout`. Prints figures; asserts nothing about speed.

use std::sync::Arc;
use std::time::Instant;

use edgeplex::bus::hub::Start;
use edgeplex::bus::memory::MemoryBus;
use edgeplex::bus::{Bus, Hub};
use edgeplex::metrics::Metrics;
use edgeplex::protocol::Channel;
use edgeplex::session::Outbox;
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
}
