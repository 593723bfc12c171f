//! Backend hooks against a real HTTP service started by each test on 127.0.0.1 port 0 (hyper,
//! HTTP/1.1, and over TLS with a certificate made here): what the edge sends, how it reads the
//! answers, and what it does when the service lies, stalls, floods or is gone.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::hook_service::{Service, answer};
use edgeplex::auth::hooks::{DISCONNECT_QUEUE, Hook, HookAllow, HookRequest, HookVerdict, Hooks};
use edgeplex::config::{Config, HooksConfig};
use edgeplex::metrics::Metrics;
use http::HeaderMap;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

const WAIT: Duration = Duration::from_secs(10);

/// `[hooks]` with every hook on at `url`, plus `extra` lines, through the real config loader.
fn config(url: &str, extra: &str) -> HooksConfig {
    let text = format!(
        "[hooks]\nurl = \"{url}\"\nconnect = true\nsubscribe = true\npublish = true\n\
         disconnect = true\n{extra}"
    );
    Config::from_toml_str(&text, "test.toml").unwrap().hooks
}

fn start_hooks(config: &HooksConfig) -> (Arc<Hooks>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let hooks = Hooks::new(config, metrics.clone()).unwrap().unwrap();
    (hooks, metrics)
}

fn request<'a>(headers: Option<&'a HeaderMap>, data: Option<&'a RawValue>) -> HookRequest<'a> {
    HookRequest {
        session: "s-1",
        transport: "websocket",
        client: "203.0.113.9".parse().unwrap(),
        origin: Some("https://app.example"),
        user: None,
        channel: Some("chat:1"),
        data,
        headers,
    }
}

fn allowed(v: HookVerdict) -> HookAllow {
    match v {
        HookVerdict::Allow(a) => a,
        other => panic!("expected Allow, got {other:?}"),
    }
}

fn assert_unavailable(v: HookVerdict) {
    assert!(
        matches!(
            v,
            HookVerdict::Unavailable {
                retry_after_ms: 1000
            }
        ),
        "{v:?}"
    );
}

fn assert_metrics(metrics: &Metrics, lines: &[&str]) {
    let text = metrics.render();
    for line in lines {
        assert!(
            text.lines().any(|l| l == *line),
            "no line {line:?} in:\n{text}"
        );
    }
}

/// An address where nothing listens.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test]
async fn connect_sends_the_design_fields_and_gets_the_sessions_identity() {
    let service = Service::start(|_| {
        answer(
            200,
            json!({"allow": true, "user": "ann", "channels": {"subscribe": ["chat:*"],
                "publish": ["chat:1"]}, "extra": "ignored"}),
        )
    })
    .await;
    let (hooks, metrics) = start_hooks(&config(&service.url, ""));
    let mut headers = HeaderMap::new();
    headers.append("cookie", "sid=abc".parse().unwrap());
    headers.append("cookie", "theme=dark".parse().unwrap());
    headers.append("authorization", "Bearer t0k3n".parse().unwrap());
    headers.append("x-not-forwarded", "secret".parse().unwrap());
    headers.append("user-agent", "test".parse().unwrap());
    let a = allowed(
        hooks
            .call(Hook::Connect, &request(Some(&headers), None))
            .await,
    );
    assert_eq!(a.user.as_deref(), Some("ann"));
    let channels = a.channels.unwrap();
    assert_eq!(channels.subscribe, ["chat:*"]);
    assert_eq!(channels.publish, ["chat:1"]);

    let seen = service.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/app/connect");
    assert_eq!(
        seen[0].body,
        json!({
            "session": "s-1",
            "transport": "websocket",
            "client": "203.0.113.9",
            "origin": "https://app.example",
            "user": null,
            "headers": {"cookie": "sid=abc; theme=dark", "authorization": "Bearer t0k3n"},
        })
    );
    // The forwarded headers travel in the body only, never as the call's own headers.
    let own = &seen[0].headers;
    assert!(own.get("cookie").is_none() && own.get("authorization").is_none());
    assert_eq!(own["content-type"], "application/json");
    assert_metrics(
        &metrics,
        &[
            "edgeplex_hook_calls_total{hook=\"connect\",outcome=\"allow\"} 1",
            "edgeplex_hook_calls_total{hook=\"connect\",outcome=\"failure\"} 0",
            "edgeplex_hook_duration_seconds_count{hook=\"connect\"} 1",
        ],
    );
}

#[tokio::test]
async fn subscribe_and_publish_send_their_channel_and_publish_may_replace_the_data() {
    let service = Service::start(|seen| match seen.path.as_str() {
        "/app/publish" => answer(200, json!({"allow": true, "data": {"text": "clean"}})),
        _ => answer(200, json!({"allow": true, "user": "mallory"})),
    })
    .await;
    let (hooks, _) = start_hooks(&config(&service.url, ""));
    let data = RawValue::from_string(r#"{"text": "d*rty", "n": [1,2]}"#.into()).unwrap();
    let mut req = request(None, Some(&data));
    req.user = Some("ann");
    req.transport = "publish";
    let a = allowed(hooks.call(Hook::Publish, &req).await);
    assert_eq!(a.data.unwrap().get(), r#"{"text":"clean"}"#);
    // A subscribe answer cannot change who the session is.
    let s = allowed(hooks.call(Hook::Subscribe, &req).await);
    assert!(s.user.is_none() && s.channels.is_none() && s.data.is_none());

    let seen = service.seen();
    assert_eq!(
        seen[0].body,
        json!({"session": "s-1", "transport": "publish", "client": "203.0.113.9",
            "origin": "https://app.example", "user": "ann", "channel": "chat:1",
            "data": {"text": "d*rty", "n": [1, 2]}})
    );
    assert_eq!(seen[1].path, "/app/subscribe");
    assert_eq!(
        seen[1].body,
        json!({"session": "s-1", "transport": "publish", "client": "203.0.113.9",
            "origin": "https://app.example", "user": "ann", "channel": "chat:1"})
    );
}

#[tokio::test]
async fn a_deny_is_a_deny_under_either_failure_mode() {
    let service =
        Service::start(|_| answer(200, json!({"allow": false, "reason": "not yours"}))).await;
    for mode in ["deny", "allow"] {
        let (hooks, metrics) = start_hooks(&config(&service.url, &format!("failure = \"{mode}\"")));
        match hooks.call(Hook::Subscribe, &request(None, None)).await {
            HookVerdict::Deny { reason } => assert_eq!(reason, "not yours"),
            other => panic!("{mode}: {other:?}"),
        }
        assert_metrics(
            &metrics,
            &["edgeplex_hook_calls_total{hook=\"subscribe\",outcome=\"deny\"} 1"],
        );
    }
}

#[tokio::test]
async fn a_slow_service_is_cut_at_the_timeout() {
    let service = Service::start(|_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            (200, json!({"allow": true}).to_string())
        })
    })
    .await;
    for mode in ["deny", "allow"] {
        let (hooks, metrics) = start_hooks(&config(
            &service.url,
            &format!("failure = \"{mode}\"\ntimeout = \"200ms\""),
        ));
        let started = Instant::now();
        let v = hooks.call(Hook::Connect, &request(None, None)).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
        match mode {
            "deny" => assert_unavailable(v),
            _ => {
                let a = allowed(v);
                assert!(a.user.is_none() && a.channels.is_none());
            }
        }
        assert_metrics(
            &metrics,
            &[
                "edgeplex_hook_calls_total{hook=\"connect\",outcome=\"failure\"} 1",
                "edgeplex_hook_failures_total{hook=\"connect\",reason=\"timeout\"} 1",
            ],
        );
    }
}

#[tokio::test]
async fn an_answer_that_stalls_mid_body_is_cut_at_the_timeout() {
    // Raw TCP: the head promises 100 bytes, one arrives, then nothing.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            // The whole request first (its JSON body ends the message), as a service would.
            let mut got = Vec::new();
            while !got.ends_with(b"}") {
                let mut buf = [0u8; 4096];
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{")
                .await;
            held.push(s);
        }
    });
    let (hooks, metrics) = start_hooks(&config(&format!("http://{addr}"), "timeout = \"200ms\""));
    let started = Instant::now();
    assert_unavailable(hooks.call(Hook::Connect, &request(None, None)).await);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_metrics(
        &metrics,
        &["edgeplex_hook_failures_total{hook=\"connect\",reason=\"timeout\"} 1"],
    );
    server.abort();
}

#[tokio::test]
async fn a_service_that_is_down_fails_fast_under_either_mode() {
    let addr = closed_port().await;
    for mode in ["deny", "allow"] {
        let (hooks, metrics) = start_hooks(&config(
            &format!("http://{addr}"),
            &format!("failure = \"{mode}\""),
        ));
        let started = Instant::now();
        let v = hooks.call(Hook::Publish, &request(None, None)).await;
        assert!(started.elapsed() < Duration::from_millis(500));
        match mode {
            "deny" => assert_unavailable(v),
            _ => assert!(allowed(v).data.is_none()),
        }
        assert_metrics(
            &metrics,
            &[
                "edgeplex_hook_calls_total{hook=\"publish\",outcome=\"failure\"} 1",
                "edgeplex_hook_failures_total{hook=\"publish\",reason=\"unreachable\"} 1",
            ],
        );
    }
}

#[tokio::test]
async fn a_non_2xx_answer_is_a_failure_even_when_it_says_allow() {
    let service = Service::start(|_| answer(500, json!({"allow": true, "user": "x"}))).await;
    for mode in ["deny", "allow"] {
        let (hooks, metrics) = start_hooks(&config(&service.url, &format!("failure = \"{mode}\"")));
        let v = hooks.call(Hook::Connect, &request(None, None)).await;
        match mode {
            "deny" => assert_unavailable(v),
            // The answer's user is not taken from a failed call.
            _ => assert!(allowed(v).user.is_none()),
        }
        assert_metrics(
            &metrics,
            &["edgeplex_hook_failures_total{hook=\"connect\",reason=\"status\"} 1"],
        );
    }
}

#[tokio::test]
async fn garbage_and_oversized_answers_are_failures() {
    // session.max_message_bytes is 64 KiB by default: answers are read up to 128 KiB.
    let big = "x".repeat(200 * 1024);
    let service = Service::start(move |seen| {
        let body = match seen.body["session"].as_str() {
            Some("garbage") => "<html>oops</html>".to_string(),
            Some("bad-user") => json!({"allow": true, "user": "ann\u{7}"}).to_string(),
            Some("no-allow") => json!({"reason": "?"}).to_string(),
            _ => json!({"allow": true, "data": big}).to_string(),
        };
        Box::pin(async move { (200, body) })
    })
    .await;
    let (hooks, metrics) = start_hooks(&config(&service.url, ""));
    for session in ["garbage", "bad-user", "no-allow", "big"] {
        let mut req = request(None, None);
        req.session = session;
        assert_unavailable(hooks.call(Hook::Connect, &req).await);
    }
    assert_metrics(
        &metrics,
        &[
            "edgeplex_hook_failures_total{hook=\"connect\",reason=\"answer\"} 4",
            "edgeplex_hook_calls_total{hook=\"connect\",outcome=\"failure\"} 4",
        ],
    );
    // Within the cap, a large replacement is fine.
    let fits = "y".repeat(60 * 1024);
    let service = Service::start(move |_| answer(200, json!({"allow": true, "data": fits}))).await;
    let (fitting, _) = start_hooks(&config(&service.url, ""));
    let a = allowed(fitting.call(Hook::Publish, &request(None, None)).await);
    assert_eq!(a.data.unwrap().get().len(), 60 * 1024 + 2);
}

#[tokio::test]
async fn past_max_in_flight_a_step_is_refused_at_once_and_not_sent() {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let service = Service::start(move |_| {
        let g = g.clone();
        Box::pin(async move {
            let _ = g.acquire().await.unwrap();
            (200, json!({"allow": true}).to_string())
        })
    })
    .await;
    let (hooks, metrics) = start_hooks(&config(
        &service.url,
        "max_in_flight = 2\ntimeout = \"10s\"",
    ));
    let held: Vec<_> = (0..2)
        .map(|_| {
            let hooks = hooks.clone();
            tokio::spawn(async move { hooks.call(Hook::Subscribe, &request(None, None)).await })
        })
        .collect();
    service.wait_seen(2).await;
    let started = Instant::now();
    assert_unavailable(hooks.call(Hook::Subscribe, &request(None, None)).await);
    assert!(started.elapsed() < Duration::from_millis(100));
    gate.add_permits(2);
    for h in held {
        allowed(h.await.unwrap());
    }
    assert_eq!(service.seen().len(), 2);
    assert_metrics(
        &metrics,
        &[
            "edgeplex_hook_calls_total{hook=\"subscribe\",outcome=\"overloaded\"} 1",
            "edgeplex_hook_calls_total{hook=\"subscribe\",outcome=\"allow\"} 2",
        ],
    );
    // The slots come back.
    allowed(hooks.call(Hook::Subscribe, &request(None, None)).await);
}

#[tokio::test]
async fn disconnect_is_fire_and_forget() {
    let service = Service::start(|_| answer(200, json!({}))).await;
    let (hooks, metrics) = start_hooks(&config(&service.url, ""));
    let mut headers = HeaderMap::new();
    headers.append("cookie", "sid=abc".parse().unwrap());
    let mut req = request(Some(&headers), None);
    req.user = Some("ann");
    hooks.disconnected(&req);
    let seen = service.wait_seen(1).await;
    assert_eq!(seen[0].path, "/app/disconnect");
    assert_eq!(
        seen[0].body,
        json!({"session": "s-1", "transport": "websocket", "client": "203.0.113.9",
            "origin": "https://app.example", "user": "ann"})
    );
    let deadline = Instant::now() + WAIT;
    while !metrics
        .render()
        .contains("edgeplex_hook_calls_total{hook=\"disconnect\",outcome=\"allow\"} 1")
    {
        assert!(Instant::now() < deadline, "{}", metrics.render());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_flood_of_disconnects_is_dropped_and_counted_never_queued_without_bound() {
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let service = Service::start(move |_| {
        let g = g.clone();
        Box::pin(async move {
            let _ = g.acquire().await.unwrap();
            (200, "{}".to_string())
        })
    })
    .await;
    let (hooks, metrics) = start_hooks(&config(&service.url, "timeout = \"10s\""));
    let extra = 500;
    let started = Instant::now();
    // The test runtime has one thread: the worker does not run between these calls, so the
    // queue holds exactly its capacity and the rest is dropped.
    for _ in 0..DISCONNECT_QUEUE + extra {
        hooks.disconnected(&request(None, None));
    }
    assert!(started.elapsed() < Duration::from_secs(2), "never blocks");
    assert_metrics(
        &metrics,
        &[&format!("edgeplex_hook_disconnects_dropped_total {extra}")],
    );
    // The worker sends at most its concurrency at once while the service holds them.
    service
        .wait_seen(edgeplex::auth::hooks::DISCONNECT_CONCURRENCY)
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        service.seen().len(),
        edgeplex::auth::hooks::DISCONNECT_CONCURRENCY
    );
    gate.close();
}

#[tokio::test]
async fn connections_are_reused() {
    let service = Service::start(|_| answer(200, json!({"allow": true}))).await;
    let (hooks, _) = start_hooks(&config(&service.url, ""));
    for _ in 0..50 {
        allowed(hooks.call(Hook::Subscribe, &request(None, None)).await);
    }
    assert_eq!(service.accepts.load(Ordering::SeqCst), 1);
    // Concurrent calls open at most one connection each, and keep them for the next round.
    for _ in 0..5 {
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let hooks = hooks.clone();
                tokio::spawn(async move { hooks.call(Hook::Publish, &request(None, None)).await })
            })
            .collect();
        for c in calls {
            allowed(c.await.unwrap());
        }
    }
    let accepts = service.accepts.load(Ordering::SeqCst);
    assert!(accepts <= 9, "{accepts} connections for 90 calls");
}

#[tokio::test]
async fn a_hook_that_is_off_is_not_called() {
    let service = Service::start(|_| answer(200, json!({"allow": false}))).await;
    let text = format!("[hooks]\nurl = \"{}\"\nconnect = true\n", service.url);
    let config = Config::from_toml_str(&text, "test.toml").unwrap().hooks;
    let (hooks, _) = start_hooks(&config);
    assert!(hooks.wants(Hook::Connect) && !hooks.wants(Hook::Subscribe));
    allowed(hooks.call(Hook::Subscribe, &request(None, None)).await);
    allowed(hooks.call(Hook::Publish, &request(None, None)).await);
    hooks.disconnected(&request(None, None));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(service.seen().is_empty());
    // No hook on: no Hooks at all.
    let off = Config::from_toml_str(
        &format!("[hooks]\nurl = \"{}\"\n", service.url),
        "test.toml",
    )
    .unwrap()
    .hooks;
    assert!(
        Hooks::new(&off, Arc::new(Metrics::new()))
            .unwrap()
            .is_none()
    );
}

/// A TLS acceptor for a self-signed certificate for 127.0.0.1, and that certificate's PEM.
fn self_signed() -> (tokio_rustls::TlsAcceptor, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let der_key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.der().clone()], der_key)
    .unwrap();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        cert.pem(),
    )
}

#[tokio::test]
async fn https_with_a_private_ca() {
    let (acceptor, pem) = self_signed();
    let service = Service::start_on(
        Some(acceptor),
        Arc::new(|_| answer(200, json!({"allow": true, "user": "tls"}))),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let (trusting, _) = start_hooks(&config(&service.url, &format!("ca = \"{}\"", ca.display())));
    for _ in 0..3 {
        let a = allowed(trusting.call(Hook::Connect, &request(None, None)).await);
        assert_eq!(a.user.as_deref(), Some("tls"));
    }
    assert_eq!(service.accepts.load(Ordering::SeqCst), 1);
    // Without the CA the certificate is not trusted: no call reaches the service.
    let (strict, metrics) = start_hooks(&config(&service.url, ""));
    assert_unavailable(strict.call(Hook::Connect, &request(None, None)).await);
    assert_eq!(service.seen().len(), 3);
    assert_metrics(
        &metrics,
        &["edgeplex_hook_failures_total{hook=\"connect\",reason=\"unreachable\"} 1"],
    );
}
