//! HTTP-level behaviour of the public listeners: HTTP/1.1 and HTTP/2 on one TLS port, and
//! connections that stall or idle being closed so they cannot hold connection slots.

mod common;

use std::time::Duration;

use common::start;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn http2_and_http1_share_the_tls_listener() {
    let t = start(|_| {}).await;
    let der = t.edge.dev_cert().unwrap().der.clone();
    let cert = reqwest::Certificate::from_der(&der).unwrap();
    let url = format!("https://localhost:{}/", t.edge.tls_addr().port());
    let resolve = ("localhost", t.edge.tls_addr());
    let h2 = reqwest::Client::builder()
        .add_root_certificate(cert.clone())
        .resolve(resolve.0, resolve.1)
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2.get(&url).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let h1 = reqwest::Client::builder()
        .add_root_certificate(cert)
        .resolve(resolve.0, resolve.1)
        .http1_only()
        .build()
        .unwrap();
    let r = h1.get(&url).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    // Over HTTP/2 a WebSocket opens with an extended CONNECT (tests/websocket_h2.rs); a GET
    // is told which method to use.
    let r = h2
        .get(format!("https://localhost:{}/ws", t.edge.tls_addr().port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "CONNECT");
}

#[tokio::test]
async fn stalled_handshake_is_dropped_after_the_handshake_timeout() {
    let t = start(|f| f.server.handshake_timeout = Duration::from_millis(300)).await;
    let mut tcp = tokio::net::TcpStream::connect(t.edge.tls_addr())
        .await
        .unwrap();
    tcp.write_all(b"\x16\x03\x01").await.unwrap(); // the start of a ClientHello, then nothing
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("the edge hangs up before 5 s");
    assert!(matches!(n, Ok(0) | Err(_)), "connection closed: {n:?}");
}

#[tokio::test]
async fn idle_http2_connection_is_closed_after_the_http_idle_timeout() {
    let t = start(|f| {
        f.server.listen_plain = "127.0.0.1:0".into();
        f.server.http_idle_timeout = Duration::from_millis(400);
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(t.edge.plain_addr().unwrap())
        .await
        .unwrap();
    // HTTP/2 preface and an empty SETTINGS frame, then silence: a live but idle connection.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("the edge closes the idle connection before 5 s");
        match n {
            Ok(0) | Err(_) => break,
            // SETTINGS, SETTINGS ack, pings and the GOAWAY come first.
            Ok(_) => continue,
        }
    }
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "not before the idle limit"
    );
}

#[tokio::test]
async fn idle_http1_keep_alive_connection_is_closed() {
    let t = start(|f| {
        f.server.listen_plain = "127.0.0.1:0".into();
        f.server.http_idle_timeout = Duration::from_millis(400);
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(t.edge.plain_addr().unwrap())
        .await
        .unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("the edge closes the idle keep-alive connection before 5 s");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

#[tokio::test]
async fn connection_cap_closes_connections_past_it_at_accept() {
    let t = start(|f| {
        f.server.listen_plain = "127.0.0.1:0".into();
        f.server.max_connections = 2;
    })
    .await;
    let addr = t.edge.plain_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        // A full request/response proves each held connection was served.
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(c);
    }
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "the third connection is not served: {n:?}"
    );
    assert_eq!(t.metric("edgeplex_connections_refused_total").await, 1.0);
    assert_eq!(t.metric("edgeplex_connections").await, 2.0);
    // A slot freed is a slot reused.
    drop(held.pop());
    let mut served = false;
    for _ in 0..50 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let read = tokio::time::timeout(Duration::from_secs(1), c.read(&mut buf)).await;
        if matches!(read, Ok(Ok(n)) if n > 0) {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served);
}

/// Sends `head` on a fresh TLS connection and waits up to `within` for the answer: its status,
/// and whether the edge closed the connection after it (within half a second).
async fn answer_to(t: &common::TestEdge, head: &str, within: Duration) -> (Option<u16>, bool) {
    let mut s = t.tls_stream().await;
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    let mut closed = false;
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    if !closed {
        // Whatever body follows, then the end of the connection, or not.
        let rest = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        closed = rest.await.is_ok();
    }
    let status = std::str::from_utf8(&got)
        .ok()
        .and_then(|t| t.split(' ').nth(1))
        .and_then(|c| c.parse().ok());
    (status, closed)
}

fn publish_head(len: usize) -> String {
    format!(
        "POST /publish HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
         content-length: {len}\r\n\r\n"
    )
}

/// The outside review's reproduction: a declared body that never comes held its connection
/// (and its slot under `server.max_connections`) forever, whatever `http_idle_timeout` said.
#[tokio::test]
async fn a_stalled_publish_body_is_answered_408_and_its_connection_closed() {
    let t = start(|f| {
        f.server.body_timeout = Duration::from_millis(400);
        f.server.http_idle_timeout = Duration::from_secs(60);
    })
    .await;
    let started = std::time::Instant::now();
    let (status, closed) = answer_to(&t, &publish_head(65536), Duration::from_secs(5)).await;
    assert_eq!(status, Some(408), "answered within 5 s");
    assert!(closed, "the connection is closed after the 408");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The same deadline holds for the whole body, however it trickles: a byte every 100 ms
    // (under the deadline between reads) for longer than the test waits.
    let s = t.tls_stream().await;
    let (mut rx, mut tx) = tokio::io::split(s);
    let sent = std::time::Instant::now();
    tx.write_all(publish_head(1000).as_bytes()).await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..1000 {
            if tx.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), rx.read_exact(&mut head))
        .await
        .expect("a trickled body is answered before 5 s")
        .unwrap();
    assert_eq!(
        &head,
        b"HTTP/1.1 408",
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    assert!(
        sent.elapsed() < Duration::from_millis(400 + 1600),
        "cut off at body_timeout after the head, not after a pause: {:?}",
        sent.elapsed()
    );
    trickle.abort();
}

/// A client past its address's message budget, or declaring a body over the cap, is answered
/// from the request head: it cannot make the edge wait for (or read) a body first.
#[tokio::test]
async fn publish_refusals_come_before_the_body() {
    let t = start(|f| {
        f.limits.ip_messages.per_second = 1;
        f.limits.ip_messages.burst = 1;
        f.server.body_timeout = Duration::from_secs(30);
    })
    .await;
    let body = r#"{"channel":"c","data":1}"#;
    let mut s = t.tls_stream().await;
    s.write_all(format!("{}{body}", publish_head(body.len())).as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // The budget is spent: the next head is refused without its body.
    let (status, _) = answer_to(&t, &publish_head(body.len()), Duration::from_secs(3)).await;
    assert_eq!(status, Some(429));
    let over = 64 * 1024 + 1;
    let (status, _) = answer_to(&t, &publish_head(over), Duration::from_secs(3)).await;
    assert_eq!(
        status,
        Some(413),
        "a declared body over the cap is refused unread"
    );
}

/// RFC 7235: the auth scheme is case-insensitive; the token is not.
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    const KEY: &str = "an-admin-key-of-some-length";
    let t = start(|f| f.admin.api_key = KEY.into()).await;
    let http = reqwest::Client::new();
    let body = r#"{"channel":"c","data":1}"#;
    for (value, want) in [
        (format!("Bearer {KEY}"), 200),
        (format!("bearer {KEY}"), 200),
        (format!("BEARER {KEY}"), 200),
        (format!("Bearer  {KEY}"), 200),
        (format!("Bearer {}", KEY.to_uppercase()), 401),
        (format!("Bearerx {KEY}"), 401),
        (format!("Basic {KEY}"), 401),
        (KEY.to_string(), 401),
    ] {
        let r = http
            .post(t.admin_url("/v1/publish"))
            .header("authorization", &value)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{value:?}");
    }
}
