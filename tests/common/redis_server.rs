//! A real `redis-server` per test, on a free loopback port, that a test can kill and restart on
//! the same port. Never the machine's own Redis on 6379.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    extra: Vec<String>,
    /// Credentials the harness itself uses, e.g. `alice:pw@`.
    auth: String,
    /// TLS only: the server's certificate PEM (also what clients trust).
    tls_cert: Option<std::path::PathBuf>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[], "")
    }

    /// With extra `redis-server` arguments (e.g. ACL users) and the `user:password@` the harness
    /// should log in with.
    pub fn start_with(extra: &[&str], auth: &str) -> RedisServer {
        let port = free_port();
        let mut s = RedisServer {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            auth: auth.to_string(),
            tls_cert: None,
        };
        s.spawn();
        s
    }

    /// A TLS-only server with a fresh self-signed certificate for 127.0.0.1; clients trust
    /// [`RedisServer::ca_path`].
    pub fn start_tls() -> RedisServer {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = write_self_signed(dir.path());
        let extra = vec![
            "--tls-port".to_string(),
            port.to_string(),
            "--port".to_string(),
            "0".to_string(),
            "--tls-cert-file".to_string(),
            cert_path.display().to_string(),
            "--tls-key-file".to_string(),
            key_path.display().to_string(),
            "--tls-ca-cert-file".to_string(),
            cert_path.display().to_string(),
            "--tls-auth-clients".to_string(),
            "no".to_string(),
        ];
        let mut s = RedisServer {
            port,
            child: None,
            dir,
            extra,
            auth: String::new(),
            tls_cert: Some(cert_path),
        };
        s.spawn();
        s
    }

    pub fn ca_path(&self) -> Option<&std::path::Path> {
        self.tls_cert.as_deref()
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_cert.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://{}127.0.0.1:{}/", self.auth, self.port)
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.tls_cert {
            None => redis::Client::open(self.url()),
            Some(ca) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(ca).unwrap()),
                },
            ),
        }
    }

    fn spawn(&mut self) {
        // For TLS, `extra` sets --port 0 after this and redis-server takes the last value.
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pong = self
                .client()
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not come up",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty: it keeps nothing on disk).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn connection(&self) -> redis::Connection {
        self.client().unwrap().get_connection().unwrap()
    }

    /// Subscribers of `channel` by `PUBSUB NUMSUB`: nodes (and backends), not clients.
    pub fn numsub(&self, channel: &str) -> i64 {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(&mut self.connection())
            .unwrap();
        n
    }

    /// Waits up to 10 s for `PUBSUB NUMSUB channel` to be `want`.
    pub async fn wait_numsub(&self, channel: &str, want: i64) {
        for _ in 0..500 {
            if self.numsub(channel) == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "PUBSUB NUMSUB {channel} stayed at {} (want {want})",
            self.numsub(channel)
        );
    }

    /// Holds every write command, scripts included (so every publish), for `ms`. Reads and
    /// pub/sub are not held, so edges stay ready.
    pub fn pause_writes(&self, ms: u64) {
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("WRITE")
            .query::<()>(&mut self.connection())
            .unwrap();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Writes a self-signed certificate for 127.0.0.1 and its key into `dir` (`redis.pem`,
/// `redis.key`): a TLS Redis serves it, and its clients trust it as their CA.
pub fn write_self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.join("redis.pem");
    let key_path = dir.join("redis.key");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}
