//! An HTTP/1.1 connection whose first request is `GET /sse` gets its event stream without hyper
//! (`server::sse_h1`). These tests speak HTTP/1.1 by hand over real TLS, as a hostile or odd
//! client would: what the edge answers, and that every stream it ends gives back its session and
//! its connection.

mod common;

use std::time::Duration;

use common::{TestEdge, start};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A plain event-stream request for channel `a`.
const OPEN_A: &[u8] = b"GET /sse?channel=a HTTP/1.1\r\nHost: localhost\r\n\r\n";

/// Sends `req` and reads the response head (and what came after it).
async fn ask<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, req: &[u8]) -> (String, Vec<u8>) {
    s.write_all(req).await.unwrap();
    read_head(s).await
}

/// Reads until the end of a response head; returns it, and what came after it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("a response head in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before a whole head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8(buf).unwrap(), rest);
        }
    }
}

/// Reads until the edge closes the connection (bounded): true if it did.
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, bound: Duration) -> bool {
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

async fn freed(t: &TestEdge) -> bool {
    t.metrics_reach(
        &[
            ("edgeplex_sessions{transport=\"sse\"}", 0.0),
            ("edgeplex_connections", 0.0),
        ],
        Duration::from_secs(3),
    )
    .await
}

#[tokio::test]
async fn the_stream_is_chunked_says_it_closes_and_carries_the_routes_headers() {
    let t = start(|_| {}).await;
    let mut s = t.tls_stream().await;
    let (head, rest) = ask(&mut s, OPEN_A).await;
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    for line in [
        "content-type: text/event-stream",
        "cache-control: no-cache",
        "transfer-encoding: chunked",
        "connection: close",
        "date: ",
    ] {
        assert!(lower.contains(line), "{line:?} in {head}");
    }
    // The first chunk: its size line, then the retry hint.
    let mut body = rest;
    while !body.windows(2).any(|w| w == b"\r\n") || body.len() < 16 {
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        body.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&body);
    let (size, data) = text.split_once("\r\n").unwrap();
    let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
    assert!(data.starts_with("retry: "), "{text}");
    assert!(size >= "retry: 1\n\n".len());
    assert_eq!(t.metric("edgeplex_sessions{transport=\"sse\"}").await, 1.0);
    drop(s);
    assert!(freed(&t).await, "a client that hangs up frees its session");
}

#[tokio::test]
async fn a_head_that_never_ends_is_dropped_at_the_handshake_timeout() {
    let t = start(|f| f.server.handshake_timeout = Duration::from_millis(300)).await;
    let mut s = t.tls_stream().await;
    // Slowloris: the request line and one header, then nothing.
    s.write_all(b"GET /sse?channel=a HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    assert!(freed(&t).await);
}

#[tokio::test]
async fn a_head_past_the_header_cap_gets_431() {
    let t = start(|f| f.server.max_header_bytes = 8192).await;
    let mut s = t.tls_stream().await;
    let mut req = b"GET /sse?channel=a HTTP/1.1\r\nHost: localhost\r\n".to_vec();
    while req.len() < 16 * 1024 {
        req.extend_from_slice(b"X-Pad: 0123456789012345678901234567890123456789\r\n");
    }
    req.extend_from_slice(b"\r\n");
    // The edge may answer and close before it has read everything.
    let _ = s.write_all(&req).await;
    let (head, _) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    assert_eq!(t.metric("edgeplex_sessions{transport=\"sse\"}").await, 0.0);
}

#[tokio::test]
async fn a_client_that_sends_more_after_its_request_is_closed_and_its_session_freed() {
    let t = start(|_| {}).await;
    let mut s = t.tls_stream().await;
    let (head, _) = ask(&mut s, OPEN_A).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(t.edge.state().hub.subscriber_count("a"), 1);
    // A second request behind an endless response can never be answered.
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    assert!(freed(&t).await);
    assert_eq!(t.edge.state().hub.subscriber_count("a"), 0);
}

#[tokio::test]
async fn a_refused_stream_gets_a_sized_answer_and_the_connection_closes() {
    let t = start(|f| f.admission.allowed_origins = vec!["https://app.example.com".into()]).await;
    let mut s = t.tls_stream().await;
    let evil = b"GET /sse?channel=a HTTP/1.1\r\nHost: localhost\r\nOrigin: https://evil.example.com\r\n\r\n";
    let (head, mut body) = ask(&mut s, evil).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let lower = head.to_ascii_lowercase();
    let len: usize = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a refusal has a length")
        .trim()
        .parse()
        .unwrap();
    assert!(lower.contains("connection: close"));
    assert!(!lower.contains("transfer-encoding"));
    let mut chunk = [0u8; 1024];
    while body.len() < len {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(body.len(), len);
    assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    assert!(freed(&t).await);
}

/// Only a connection's first request is looked at: a client that asks for something else first
/// keeps its keep-alive connection, and its later `GET /sse` is hyper's, as before.
#[tokio::test]
async fn other_first_requests_keep_their_connection_and_hyper_serves_the_rest() {
    let t = start(|_| {}).await;
    let mut s = t.tls_stream().await;
    let (head, _) = ask(&mut s, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("connection: close"));
    s.write_all(OPEN_A).await.unwrap();
    // The body of `/` may come first; look for the second head after it.
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("text/event-stream") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(t.metric("edgeplex_sessions{transport=\"sse\"}").await, 1.0);
}

/// A request line that only starts like ours (`/ssex`, a body, HTTP/1.0) is hyper's to answer,
/// with the bytes the sniff read replayed to it whole.
#[tokio::test]
async fn look_alike_requests_are_answered_by_hyper_from_their_first_byte() {
    let t = start(|_| {}).await;
    for (req, status) in [
        (&b"GET /ssex HTTP/1.1\r\nHost: localhost\r\n\r\n"[..], "404"),
        (
            b"GET /sse?channel=a HTTP/1.0\r\nHost: localhost\r\n\r\n",
            "200",
        ),
        (
            b"GET /sse?channel=a HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
            "200",
        ),
    ] {
        let mut s = t.tls_stream().await;
        let (head, _) = ask(&mut s, req).await;
        // hyper answers an HTTP/1.0 request as HTTP/1.0.
        assert!(
            head.starts_with("HTTP/1.") && head[9..].starts_with(status),
            "{:?} -> {head}",
            String::from_utf8_lossy(req)
        );
    }
}

/// A reader that stops reading while its queue still has room is cut off by the stall watcher
/// once a frame has waited `session.write_timeout`, and counted as a slow consumer, not as a
/// client that left: the bare path's own write bound must not beat the watcher to it.
#[tokio::test]
async fn a_reader_that_stops_reading_is_counted_as_a_slow_consumer() {
    let t = start(|f| {
        f.session.write_timeout = Duration::from_millis(400);
        f.session.outbound_queue = 100_000;
        f.session.outbound_queue_bytes = 256 << 20;
    })
    .await;
    let mut s = t.tls_stream().await;
    let (head, _) = ask(
        &mut s,
        b"GET /sse?channel=firehose HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Never read again: the socket's buffers fill, the queue does not.
    let mut ws = t.connect().await;
    let payload = "p".repeat(60 * 1024);
    for i in 0..400 {
        let r = ws
            .request(serde_json::json!({"id": i, "op": "publish", "channel": "firehose", "data": payload}))
            .await;
        assert_eq!(r["ok"], true);
    }
    let cut = t
        .metrics_reach(
            &[
                ("edgeplex_sessions{transport=\"sse\"}", 0.0),
                (
                    "edgeplex_slow_consumer_closes_total{transport=\"sse\"}",
                    1.0,
                ),
            ],
            Duration::from_secs(5),
        )
        .await;
    assert!(
        cut,
        "the stalled stream was cut and counted as a slow consumer"
    );
    drop(s);
}
