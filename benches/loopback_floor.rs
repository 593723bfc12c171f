//! This machine's floor for the fan-out workload: the same bursts of deliveries with no edge in
//! between, so `fanout`'s figures can be read against what the kernel alone costs here.
//!
//! A bare writer (blocking std sockets, `TCP_NODELAY`, no WebSocket, no TLS, no bus, no async
//! runtime) writes one chunk the size of an edge's message frame to each of S loopback TCP
//! sockets, RATE times per second, split over WRITERS threads. The readers are set up like
//! `fanout`'s subscribers (LOADGENS processes, each one current-thread tokio runtime with a task
//! per socket) but read raw bytes, with no WebSocket parsing, so they cost a little less. Each
//! chunk carries its scheduled send time, so the latency is measured the same way (from the
//! schedule, no coordinated omission).
//!
//! While the writer keeps up (each burst written within 1/RATE), what this prints is a floor
//! for the same S and RATE here: a server does at least this work per delivery. Past that the
//! writer falls behind for good, because it writes every chunk on its own; a server that
//! coalesces a socket's queued frames into one write does better, and the bench says so.
//!
//! Run: `cargo bench --bench loopback_floor`, with optional `SUBSCRIBERS` (default 1000), `RATE`
//! bursts per second (default 100), `DURATION_SECS` (default 5), `WRITERS` threads (default 2,
//! one per core here), `LOADGENS` reader processes (default 2), `CHUNK_BYTES` (default 156: a
//! `fanout` message frame with its 100-byte payload, as the edge sends it).

mod support;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use support::{
    Worker, cpu_of, cpu_secs, env, env_f64, for_each_stamp, hist_from_hex, new_histogram,
    now_micros, share, worker_var,
};
use tokio::io::AsyncReadExt;

/// Reader role: opens its sockets, says `ready N`, then reads until the writer closes them and
/// answers with `report BYTES CHUNKS HISTOGRAM`.
async fn readers_role() {
    let addr = worker_var("FLOOR_ADDR");
    let count: u64 = worker_var("FLOOR_COUNT").parse().unwrap();
    let hist = Arc::new(Mutex::new(new_histogram()));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..count {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (hist, bytes) = (hist.clone(), bytes.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let now = now_micros();
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                        let mut h = hist.lock();
                        for_each_stamp(&buf[..n], |ts| {
                            h.saturating_record(now.saturating_sub(ts).max(1));
                        });
                    }
                }
            }
        }));
    }
    let control = support::Control::new();
    control.reply(&format!("ready {count}"));
    for t in tasks {
        t.await.unwrap();
    }
    let h = hist.lock();
    control.reply(&format!(
        "report {} {} {}",
        bytes.load(Ordering::Relaxed),
        h.len(),
        support::hist_to_hex(&h)
    ));
}

fn main() {
    if std::env::var(support::ROLE).as_deref() == Ok("floor-readers") {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(readers_role());
    }
    let subscribers = env("SUBSCRIBERS", 1000).max(1);
    let rate = env_f64("RATE", 100.0).max(0.1);
    let secs = env_f64("DURATION_SECS", 5.0).max(0.1);
    let writers = env("WRITERS", 2).clamp(1, subscribers);
    let loadgens = env("LOADGENS", 2).clamp(1, subscribers);
    let chunk_bytes = env("CHUNK_BYTES", 156).clamp(32, 65536) as usize;

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut readers: Vec<Worker> = (0..loadgens)
        .map(|i| {
            Worker::spawn(
                "floor-readers",
                &[
                    ("FLOOR_ADDR", addr.clone()),
                    ("FLOOR_COUNT", share(subscribers, loadgens, i).to_string()),
                ],
            )
        })
        .collect();
    let mut sockets: Vec<TcpStream> = (0..subscribers)
        .map(|_| {
            let (s, _) = listener.accept().unwrap();
            s.set_nodelay(true).unwrap();
            s
        })
        .collect();
    for r in &mut readers {
        let line = r.recv();
        assert!(line.starts_with("ready"), "reader said {line:?}");
    }

    let bursts = (rate * secs).round() as u64;
    let start_micros = now_micros() + 200_000;
    let reader_pids: Vec<u32> = readers.iter().map(Worker::pid).collect();
    // Each writer thread owns its share of the sockets and writes every burst to all of them.
    let per_writer = sockets.len().div_ceil(writers as usize);
    let writers = sockets.chunks(per_writer).count();
    // CPU is counted from the first scheduled burst until the last one is written.
    std::thread::sleep(Duration::from_micros(
        start_micros.saturating_sub(now_micros()),
    ));
    let own_cpu = cpu_secs(std::process::id());
    let readers_cpu = cpu_of(&reader_pids);
    let started = Instant::now();
    // Per writer: its longest burst, and how late its last burst ended against its schedule.
    let (longest_burst, final_lag) = std::thread::scope(|scope| {
        let handles: Vec<_> = sockets
            .chunks_mut(per_writer)
            .map(|mine| {
                scope.spawn(move || {
                    let mut longest = Duration::ZERO;
                    let mut chunk = vec![b'p'; chunk_bytes];
                    for i in 0..bursts {
                        let scheduled = start_micros + (i as f64 * 1e6 / rate) as u64;
                        let now = now_micros();
                        if scheduled > now {
                            std::thread::sleep(Duration::from_micros(scheduled - now));
                        }
                        let head = format!("#{scheduled}#");
                        chunk[..head.len()].copy_from_slice(head.as_bytes());
                        let t = Instant::now();
                        for s in mine.iter_mut() {
                            s.write_all(&chunk).unwrap();
                        }
                        longest = longest.max(t.elapsed());
                    }
                    let last = start_micros + ((bursts.max(1) - 1) as f64 * 1e6 / rate) as u64;
                    (longest, now_micros().saturating_sub(last))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((Duration::ZERO, 0), |(b, l), (b2, l2)| {
                (b.max(b2), l.max(l2))
            })
    });
    let elapsed = started.elapsed().as_secs_f64();
    let writer_cpu = cpu_secs(std::process::id()) - own_cpu;
    let readers_cpu = cpu_of(&reader_pids) - readers_cpu;
    drop(sockets);

    let mut all = new_histogram();
    let (mut bytes, mut chunks) = (0u64, 0u64);
    for r in &mut readers {
        let line = r.recv();
        let mut f = line.split(' ');
        assert_eq!(f.next(), Some("report"), "reader said {line:?}");
        bytes += f.next().unwrap().parse::<u64>().unwrap();
        chunks += f.next().unwrap().parse::<u64>().unwrap();
        all.add(hist_from_hex(f.next().unwrap())).unwrap();
    }
    let offered = bursts * subscribers;
    let delivered = bytes / chunk_bytes as u64;
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    let pct = |cpu: f64| 100.0 * cpu / elapsed;
    println!(
        "loopback floor: {subscribers} sockets, {rate}/s bursts for {secs} s, {writers} writer \
         thread(s), {loadgens} reader process(es), {chunk_bytes}-byte chunks"
    );
    println!(
        "{:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>8} {:>13} {:>8} {:>8} {:>14}",
        "offered",
        "delivered",
        "stamped",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "longest burst",
        "writer",
        "readers",
        "µs/delivery"
    );
    println!(
        "{offered:>10} {delivered:>10} {chunks:>10} {:>8.1} {:>8.1} {:>9.1} {:>8.1} {:>10.1} ms {:>7.0}% {:>7.0}% {:>14.0}",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        all.max() as f64 / 1000.0,
        longest_burst.as_secs_f64() * 1000.0,
        pct(writer_cpu),
        pct(readers_cpu),
        (writer_cpu + readers_cpu) * 1e6 / delivered.max(1) as f64,
    );
    println!(
        "RESULT floor delivered={delivered} p50_ms={:.2} p99_ms={:.2} p999_ms={:.2} \
         writer_cpu_pct={:.0} readers_cpu_pct={:.0}",
        ms(0.5),
        ms(0.99),
        ms(0.999),
        pct(writer_cpu),
        pct(readers_cpu)
    );
    println!(
        "stamped: chunks whose timestamp a reader saw whole (a chunk split across reads is \
         delivered but not timed). µs/delivery: writer and reader CPU per delivered chunk \
         (CPU is counted in 10 ms ticks: a few percent at most rates, ~10% at 1,000 x 1/s)."
    );
    // Behind by more than ten bursts (and 100 ms) at the end: it did not catch up.
    if final_lag as f64 > (10e6 / rate).max(100_000.0) {
        println!(
            "the writer fell behind for good (its last burst ended {:.1} s late): at this rate \
             this is not a floor; a server that coalesces queued frames into one write does \
             better.",
            final_lag as f64 / 1e6
        );
    }
}
