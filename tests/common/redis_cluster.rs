//! A real Redis Cluster per test: three masters and three replicas (`redis-server
//! --cluster-enabled yes`) on free loopback ports in a temp dir, joined by `redis-cli --cluster
//! create … --cluster-replicas 1`. A node can be killed (`kill -9`) so its replica takes over,
//! and a slot can be moved between masters. Everything is killed on drop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a node may be silent before the others fail it over: short, so a failover test
/// takes seconds.
const NODE_TIMEOUT_MS: u64 = 1000;

pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
    /// TLS only: the nodes' certificate PEM (also the CA clients trust).
    tls_cert: Option<std::path::PathBuf>,
    /// Replicas per master.
    replicas: usize,
    _dir: tempfile::TempDir,
    /// Held until the cluster is dropped (see [`ONE_AT_A_TIME`]).
    _turn: Option<std::sync::MutexGuard<'static, ()>>,
}

/// A port that is free, and whose cluster bus port (the port + 10000) is free too.
fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = l.local_addr().expect("a bound port").port();
        if port <= 55535 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

/// One cluster at a time in a test binary: six servers starting at once per test, on ports
/// picked by binding and releasing, race for the same ports under load, and two clusters
/// settling together on two cores can outwait the bounds below.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cli(tls: Option<&std::path::Path>, port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(tls_args(tls))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `redis-cli`'s TLS options for a cluster whose nodes present `cert`.
fn tls_args(cert: Option<&std::path::Path>) -> Vec<String> {
    match cert {
        Some(c) => vec!["--tls".into(), "--cacert".into(), c.display().to_string()],
        None => Vec::new(),
    }
}

/// CRC16-XMODEM of the key's hash tag (or the whole key), as Redis Cluster computes slots.
pub fn slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let tagged = b.iter().position(|&c| c == b'{').and_then(|open| {
        let close = b[open + 1..].iter().position(|&c| c == b'}')?;
        (close > 0).then(|| &b[open + 1..open + 1 + close])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(b) {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

impl RedisCluster {
    /// Three masters, three replicas.
    pub fn start() -> RedisCluster {
        Self::start_with(false, 1)
    }

    /// Three masters and no replicas, speaking TLS only (to clients, and on the cluster bus)
    /// with a fresh self-signed certificate for 127.0.0.1; clients trust
    /// [`RedisCluster::ca_path`].
    pub fn start_tls() -> RedisCluster {
        Self::start_with(true, 0)
    }

    pub fn ca_path(&self) -> Option<&std::path::Path> {
        self.tls_cert.as_deref()
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        cli(self.tls_cert.as_deref(), port, args)
    }

    fn start_with(tls: bool, replicas: usize) -> RedisCluster {
        // A test that failed holding the lock poisons it; the next cluster is still good.
        let mut turn = Some(ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner()));
        // Ports are picked by binding and releasing them: one can be taken again before its
        // server binds it (the server then exits). Such a start is thrown away whole and
        // made again on other ports.
        let mut attempt = 0;
        let c = loop {
            attempt += 1;
            let held = turn.take().expect("held until a start succeeds");
            let c = RedisCluster::spawn(held, tls, replicas);
            if c.created() {
                break c;
            }
            assert!(
                attempt < 4,
                "Redis Cluster would not start in {attempt} tries"
            );
            turn = Some(c.give_up());
        };
        // Every replica has its master's data (else it would not be promoted when the test
        // kills that master).
        for &port in &c.ports {
            c.wait_until(Duration::from_secs(30), || {
                let info = c.cli(port, &["INFO", "replication"]);
                info.contains("role:master") || info.contains("master_link_status:up")
            });
        }
        c
    }

    /// Three masters' and their replicas' servers on fresh ports, cluster mode on, not joined
    /// yet.
    fn spawn(turn: std::sync::MutexGuard<'static, ()>, tls: bool, replicas: usize) -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> = (0..3 * (1 + replicas)).map(|_| free_port()).collect();
        let mut tls_args: Vec<String> = Vec::new();
        let mut tls_cert = None;
        if tls {
            let (cert_path, key_path) = super::redis_server::write_self_signed(dir.path());
            for (k, v) in [
                ("--tls-cert-file", cert_path.display().to_string()),
                ("--tls-key-file", key_path.display().to_string()),
                ("--tls-ca-cert-file", cert_path.display().to_string()),
                ("--tls-auth-clients", "no".into()),
                ("--tls-cluster", "yes".into()),
                ("--tls-replication", "yes".into()),
            ] {
                tls_args.extend([k.to_string(), v]);
            }
            tls_cert = Some(cert_path);
        }
        let mut children = Vec::new();
        for &port in &ports {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            // TLS only: the port is the TLS port and the plain one is off.
            let listen: Vec<String> = match tls {
                true => ["--port", "0", "--tls-port", &port.to_string()]
                    .map(String::from)
                    .into(),
                false => vec!["--port".into(), port.to_string()],
            };
            let child = Command::new("redis-server")
                .args(&listen)
                .args(&tls_args)
                .args(["--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
                // Replicas in sync at once: a replica that never synced cannot take over.
                .args(["--repl-diskless-sync-delay", "0"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed");
            children.push(Some(child));
        }
        RedisCluster {
            ports,
            children,
            tls_cert,
            replicas,
            _dir: dir,
            _turn: Some(turn),
        }
    }

    /// Every server answers, `redis-cli --cluster create` joined them and the cluster settled;
    /// `false` when a server did not come up (its port was taken), or the create failed or did
    /// not settle.
    fn created(&self) -> bool {
        let start = Instant::now();
        for &port in &self.ports {
            while self.cli(port, &["PING"]).trim() != "PONG" {
                if start.elapsed() > Duration::from_secs(20) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let addrs: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        Command::new("redis-cli")
            .args(tls_args(self.tls_cert.as_deref()))
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args([
                "--cluster-replicas",
                &self.replicas.to_string(),
                "--cluster-yes",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs")
            .status
            .success()
            && self.settles_within(Duration::from_secs(30))
    }

    /// Every live node says `cluster_state:ok` with all slots, and three masters, in time.
    fn settles_within(&self, bound: Duration) -> bool {
        let start = Instant::now();
        while !self.is_ok() {
            if start.elapsed() > bound {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    fn is_ok(&self) -> bool {
        self.live_ports().iter().all(|&p| {
            let info = self.cli(p, &["CLUSTER", "INFO"]);
            info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
        }) && self.masters().len() == 3
    }

    /// Stops a start that failed; hands the turn back for the next try.
    fn give_up(mut self) -> std::sync::MutexGuard<'static, ()> {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self._turn.take().expect("a cluster holds its turn")
    }

    fn wait_until(&self, bound: Duration, mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(
                start.elapsed() < bound,
                "Redis Cluster did not settle: {}",
                self.cli(self.live_ports()[0], &["CLUSTER", "NODES"])
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every live node says `cluster_state:ok` and agrees on three masters holding all slots.
    pub fn wait_ok(&self) {
        self.wait_until(Duration::from_secs(30), || self.is_ok());
    }

    /// After [`RedisCluster::kill`] of a master: waits until a replica took its slots.
    pub fn wait_failover(&self, dead: u16) {
        let start = Instant::now();
        let mut forced = false;
        self.wait_until(Duration::from_secs(30), || {
            if !forced && start.elapsed() > Duration::from_secs(8) {
                // The automatic failover did not happen (a replica that judged its data too
                // old): make the replica take over, as an operator would.
                forced = true;
                for p in self.live_ports() {
                    if self
                        .cli(p, &["INFO", "replication"])
                        .contains(&format!("master_port:{dead}"))
                    {
                        self.cli(p, &["CLUSTER", "FAILOVER", "TAKEOVER"]);
                    }
                }
            }
            let m = self.masters();
            m.len() == 3
                && !m.contains(&dead)
                && self.live_ports().iter().all(|&p| {
                    let info = self.cli(p, &["CLUSTER", "INFO"]);
                    info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
                })
        });
    }

    fn live_ports(&self) -> Vec<u16> {
        self.ports
            .iter()
            .zip(&self.children)
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| *p)
            .collect()
    }

    /// Seed URLs for `bus.redis_cluster` (`rediss://` for a TLS cluster).
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls_cert.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.ports
            .iter()
            .map(|p| format!("{scheme}://127.0.0.1:{p}/"))
            .collect()
    }

    /// The live masters' ports, as a live node sees them.
    pub fn masters(&self) -> Vec<u16> {
        let Some(&p) = self.live_ports().first() else {
            return Vec::new();
        };
        self.cli(p, &["CLUSTER", "NODES"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail") && l.contains("connected"))
            .filter(|l| l.split(' ').count() > 8)
            .filter_map(|l| {
                let addr = l.split(' ').nth(1)?;
                addr.split('@').next()?.rsplit(':').next()?.parse().ok()
            })
            .collect()
    }

    /// The port of the master that serves `slot` now.
    pub fn master_of(&self, slot: u16) -> u16 {
        let p = self.live_ports()[0];
        for l in self.cli(p, &["CLUSTER", "NODES"]).lines() {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            for range in &f[8..] {
                let (a, b) = match range.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap_or(u16::MAX), b.parse().unwrap_or(0)),
                    None => {
                        let s = range.parse().unwrap_or(u16::MAX);
                        (s, s)
                    }
                };
                if (a..=b).contains(&slot) {
                    return f[1]
                        .split('@')
                        .next()
                        .unwrap()
                        .rsplit(':')
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap();
                }
            }
        }
        panic!("no master serves slot {slot}");
    }

    fn node_id(&self, port: u16) -> String {
        self.cli(port, &["CLUSTER", "MYID"]).trim().to_string()
    }

    /// `kill -9` the node on `port`; its replica is promoted within a few node timeouts.
    pub fn kill(&mut self, port: u16) {
        let i = self.ports.iter().position(|&p| p == port).unwrap();
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The lowest slot the master on `port` serves: the first that `redis-cli --cluster
    /// reshard` takes from it.
    pub fn lowest_slot(&self, port: u16) -> u16 {
        let id = self.node_id(port);
        let nodes = self.cli(self.live_ports()[0], &["CLUSTER", "NODES"]);
        let line = nodes
            .lines()
            .find(|l| l.starts_with(&id))
            .expect("the node is known");
        line.split(' ')
            .skip(8)
            .filter(|r| !r.starts_with('['))
            .filter_map(|r| r.split('-').next()?.parse().ok())
            .min()
            .expect("a master serves slots")
    }

    /// `redis-cli --cluster reshard` of one slot from the master on `from` to the one on `to`,
    /// as an operator runs it; returns when every live node agrees on the new owner of the slot
    /// it moved (the lowest of `from`'s).
    pub fn reshard_one(&self, from: u16, to: u16) -> u16 {
        let slot = self.lowest_slot(from);
        let out = Command::new("redis-cli")
            .args(tls_args(self.tls_cert.as_deref()))
            .arg("--cluster")
            .arg("reshard")
            .arg(format!("127.0.0.1:{from}"))
            .args(["--cluster-from", &self.node_id(from)])
            .args(["--cluster-to", &self.node_id(to)])
            .args(["--cluster-slots", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "reshard: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        self.wait_until(Duration::from_secs(30), || self.master_of(slot) == to);
        slot
    }

    /// How many times the node on `port` ran `command` (lower case), from `INFO commandstats`.
    pub fn calls(&self, port: u16, command: &str) -> u64 {
        let stats = self.cli(port, &["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// How many clients hold a shard subscription to `channel`, on the master that serves it.
    pub fn shard_numsub(&self, channel: &str) -> u64 {
        let port = self.master_of(slot(channel));
        self.cli(port, &["PUBSUB", "SHARDNUMSUB", channel])
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `SPUBLISH` from a backend, on whichever master serves the channel.
    pub fn spublish(&self, channel: &str, payload: &str) -> String {
        let port = self.master_of(slot(channel));
        self.cli(port, &["SPUBLISH", channel, payload])
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
