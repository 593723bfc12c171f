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
    // WebSocket over HTTP/2 is not offered; the answer says what to do instead.
    let r = h2
        .get(format!("https://localhost:{}/ws", t.edge.tls_addr().port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 505);
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
