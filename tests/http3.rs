//! HTTP/3 on the UDP port, with a real client (quinn + h3): the public routes answer as over
//! TCP, next to WebTransport's CONNECT on the same port, which is what `Alt-Svc: h3` promises.

mod common;

use bytes::Bytes;
use common::h3_client::{self, Events};
use serde_json::json;

fn get(t: &common::TestEdge, path: &str) -> http::Request<()> {
    http::Request::get(h3_client::uri(t, path))
        .body(())
        .unwrap()
}

fn post(t: &common::TestEdge, path: &str, len: Option<usize>) -> http::Request<()> {
    let mut b =
        http::Request::post(h3_client::uri(t, path)).header("content-type", "application/json");
    if let Some(n) = len {
        b = b.header("content-length", n);
    }
    b.body(()).unwrap()
}

#[tokio::test]
async fn sse_over_http3_receives_a_websocket_publish_and_tcp_advertises_the_port() {
    let t = common::start(|_| {}).await;
    let r = common::sse_client::client(&t, false)
        .get(format!("https://localhost:{}/", t.edge.tls_addr().port()))
        .send()
        .await
        .unwrap();
    let port = t.edge.quic_addr().unwrap().port();
    assert_eq!(
        r.headers()["alt-svc"],
        format!("h3=\":{port}\"; ma=86400").as_str()
    );
    // Requests are counted by version (the Chromium test below relies on it).
    assert_eq!(
        t.metric("edgeplex_http_requests_total{version=\"1.1\"}")
            .await,
        1.0
    );

    let mut h3 = h3_client::connect(&t).await;
    let (resp, stream) = h3.request(get(&t, "/sse?channel=news"), None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut events = Events::new(stream);
    assert_eq!(events.next().await.unwrap().data["op"], "welcome");
    assert_eq!(t.metric("edgeplex_sessions{transport=\"sse\"}").await, 1.0);

    let mut ws = t.connect().await;
    let reply = ws
        .request(json!({"id": 1, "op": "publish", "channel": "news", "data": "hello"}))
        .await;
    assert_eq!(reply["ok"], true, "{reply}");
    let e = events.next().await.unwrap();
    assert_eq!(e.data["channel"], "news");
    assert_eq!(e.data["data"], "hello");
    assert_eq!(e.id.as_deref(), e.data["offset"].as_str());

    // The client goes: its connection closes, and the stream's session ends with it.
    h3.conn.close(0u32.into(), b"bye");
    assert!(
        t.metrics_reach(
            &[("edgeplex_sessions{transport=\"sse\"}", 0.0)],
            common::TIMEOUT
        )
        .await,
        "the session ends when its HTTP/3 client goes"
    );
}

#[tokio::test]
async fn publish_and_resume_with_last_event_id_over_http3() {
    let t = common::start(|f| f.session.max_message_bytes = 1024).await;
    let mut h3 = h3_client::connect(&t).await;
    // A stream that saw the channel before the publishes, to learn where they are.
    let (_, stream) = h3.request(get(&t, "/sse?channel=c"), None).await;
    let mut seen = Events::new(stream);
    assert_eq!(seen.next().await.unwrap().data["op"], "welcome");
    for i in 0..3 {
        let body = Bytes::from(format!(r#"{{"channel":"c","data":{i}}}"#));
        let (resp, body) = h3
            .fetch(post(&t, "/publish", Some(body.len())), Some(body))
            .await;
        assert_eq!(resp.status(), 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["ok"],
            true
        );
    }
    let first = seen.next().await.unwrap();
    assert_eq!(first.data["data"], 0);

    // Resumes after the first: the other two, nothing twice.
    let req = http::Request::get(h3_client::uri(&t, "/sse?channel=c"))
        .header("last-event-id", first.id.clone().unwrap())
        .body(())
        .unwrap();
    let (resp, stream) = h3.request(req, None).await;
    assert_eq!(resp.status(), 200);
    let mut resumed = Events::new(stream);
    assert_eq!(resumed.next().await.unwrap().data["op"], "welcome");
    assert_eq!(resumed.next().await.unwrap().data["data"], 1);
    assert_eq!(resumed.next().await.unwrap().data["data"], 2);

    // Over the cap: refused from the declared length before the body, and when streamed
    // without a length once the cap is passed.
    let big = Bytes::from(format!(
        r#"{{"channel":"c","data":"{}"}}"#,
        "x".repeat(2000)
    ));
    let (resp, _) = h3
        .fetch(post(&t, "/publish", Some(big.len())), Some(big.clone()))
        .await;
    assert_eq!(resp.status(), 413);
    let (resp, _) = h3.fetch(post(&t, "/publish", None), Some(big)).await;
    assert_eq!(resp.status(), 413);
    // Not JSON: the route's own validation.
    let (resp, _) = h3
        .fetch(post(&t, "/publish", None), Some(Bytes::from_static(b"{")))
        .await;
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn a_publish_body_that_stalls_is_answered_408_over_http3() {
    let t = common::start(|f| f.server.body_timeout = std::time::Duration::from_millis(300)).await;
    let mut h3 = h3_client::connect(&t).await;
    // Half a body, then nothing: the stream stays open.
    let mut stream = h3
        .send
        .send_request(post(&t, "/publish", Some(40)))
        .await
        .unwrap();
    stream
        .send_data(Bytes::from_static(b"{\"channel\":"))
        .await
        .unwrap();
    let resp = tokio::time::timeout(common::TIMEOUT, stream.recv_response())
        .await
        .expect("answered within the body timeout")
        .unwrap();
    assert_eq!(resp.status(), 408);
    // HTTP/1.1's `Connection: close` has no place in HTTP/3 (RFC 9114 §4.2).
    assert!(resp.headers().get("connection").is_none(), "{resp:?}");
}

#[tokio::test]
async fn shutdown_ends_http3_event_streams_and_completes_cleanly() {
    let t = common::start(|_| {}).await;
    let mut h3 = h3_client::connect(&t).await;
    let (_, stream) = h3.request(get(&t, "/sse?channel=c"), None).await;
    let mut events = Events::new(stream);
    assert_eq!(events.next().await.unwrap().data["op"], "welcome");
    let edge = t.edge;
    let stop = tokio::spawn(async move {
        edge.shutdown_within(std::time::Duration::from_secs(5))
            .await
    });
    assert!(events.next().await.is_none(), "the stream ends at shutdown");
    assert!(stop.await.unwrap().clean);
}

#[tokio::test]
async fn the_module_and_404s_over_http3_beside_a_webtransport_session() {
    let t = common::start(|_| {}).await;
    // A WebTransport session on the same port stays up while requests are served.
    let mut wt =
        common::wt_client::try_open_path(common::wt_client::client_endpoint(&t), &t, "/wt", None)
            .await
            .unwrap();
    let mut h3 = h3_client::connect(&t).await;
    let (resp, body) = h3.fetch(get(&t, "/edgeplex.js"), None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    assert_eq!(body.len(), edgeplex::server::assets::CLIENT_JS.len());
    let etag = resp.headers()["etag"].clone();
    let req = http::Request::get(h3_client::uri(&t, "/edgeplex.js"))
        .header("if-none-match", etag)
        .body(())
        .unwrap();
    let (resp, _) = h3.fetch(req, None).await;
    assert_eq!(resp.status(), 304);
    let (resp, _) = h3.fetch(get(&t, "/nothing-here"), None).await;
    assert_eq!(resp.status(), 404);
    // WebSocket is not offered over HTTP/3; SSE refuses what it refuses over TCP.
    let (resp, _) = h3.fetch(get(&t, "/ws"), None).await;
    assert_eq!(resp.status(), 501);
    let (resp, _) = h3.fetch(get(&t, "/sse"), None).await;
    assert_eq!(resp.status(), 400);

    let reply = wt.request(json!({"id": 7, "op": "ping"})).await;
    assert_eq!(reply["id"], 7, "{reply}");
}

/// As over HTTP/2: a reader that stops reading is cut at overflow by resetting its stream alone;
/// the connection and its other streams go on.
#[tokio::test]
async fn a_stalled_http3_stream_is_reset_alone_at_overflow() {
    let t = common::start(|f| {
        f.session.outbound_queue_bytes = 256 * 1024;
        f.session.write_timeout = std::time::Duration::from_secs(60);
    })
    .await;
    let mut h3 = h3_client::connect(&t).await;
    // Opens the stream and never reads past its head.
    let (resp, mut stalled) = h3.request(get(&t, "/sse?channel=firehose"), None).await;
    assert_eq!(resp.status(), 200);
    let (_, other) = h3.request(get(&t, "/sse?channel=quiet"), None).await;
    let mut other = Events::new(other);
    assert_eq!(other.next().await.unwrap().data["op"], "welcome");
    let mut ws = t.connect().await;
    let payload = "p".repeat(60 * 1024);
    for i in 0..200 {
        let r = ws
            .request(json!({"id": i, "op": "publish", "channel": "firehose", "data": payload}))
            .await;
        assert_eq!(r["ok"], true);
    }
    let cut = t
        .metrics_reach(
            &[
                ("edgeplex_sessions{transport=\"sse\"}", 1.0),
                (
                    "edgeplex_slow_consumer_closes_total{transport=\"sse\"}",
                    1.0,
                ),
            ],
            common::TIMEOUT,
        )
        .await;
    assert!(cut, "the stalled stream was cut at overflow");
    // Its stream was reset: reading it now ends in an error, not a clean end.
    let mut reset = false;
    while let Ok(r) = tokio::time::timeout(common::TIMEOUT, stalled.recv_data()).await {
        match r {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(_) => {
                reset = true;
                break;
            }
        }
    }
    assert!(reset, "the stalled stream ends in a reset");
    // The other stream on the same connection still delivers.
    let r = ws
        .request(json!({"id": 999, "op": "publish", "channel": "quiet", "data": "still here"}))
        .await;
    assert_eq!(r["ok"], true);
    assert_eq!(other.next().await.unwrap().data["data"], "still here");
}

/// A client that cancels its request (resets the request stream) ends its event stream and
/// session, while its connection stays open.
#[tokio::test]
async fn a_cancelled_http3_request_ends_its_event_stream() {
    let t = common::start(|_| {}).await;
    let mut h3 = h3_client::connect(&t).await;
    // Headers sent, the request stream left open (no FIN), as a client may.
    let mut stream = h3
        .send
        .send_request(get(&t, "/sse?channel=c"))
        .await
        .unwrap();
    let resp = tokio::time::timeout(common::TIMEOUT, stream.recv_response())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(t.metric("edgeplex_sessions{transport=\"sse\"}").await, 1.0);
    stream.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
    assert!(
        t.metrics_reach(
            &[("edgeplex_sessions{transport=\"sse\"}", 0.0)],
            common::TIMEOUT
        )
        .await,
        "the cancelled request's session ended"
    );
    // The connection serves on.
    let (resp, _) = h3.fetch(get(&t, "/edgeplex.js"), None).await;
    assert_eq!(resp.status(), 200);
}

/// Chromium, told to use QUIC for the edge's origin (as it would after `Alt-Svc` with a trusted
/// certificate), opens an EventSource and POSTs a publish over HTTP/3, cross-origin with CORS.
#[tokio::test]
async fn chromium_uses_sse_and_publish_over_http3() {
    use common::browser::{Browser, page_server, wait_for};
    const PAGE: &str = r#"<!doctype html>
<title>edgeplex HTTP/3 test</title>
<script>
const seen = [];
const report = () => fetch("/report", { method: "POST", body: JSON.stringify(seen) });
const es = new EventSource("EDGE/sse?channel=h3");
es.onmessage = async (e) => {
  const d = JSON.parse(e.data);
  seen.push({ op: d.op, data: d.data });
  report();
  if (d.op !== "welcome") return;
  const r = await fetch("EDGE/publish", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ channel: "h3", data: "from the page" }),
  });
  seen.push({ op: "posted", status: r.status });
  report();
};
es.onerror = () => { seen.push({ op: "error" }); report(); };
</script>
"#;
    let page_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_port = page_listener.local_addr().unwrap().port();
    let t = common::start(|f| {
        f.admission.allowed_origins = vec![format!("http://localhost:{page_port}")];
    })
    .await;
    let port = t.edge.quic_addr().unwrap().port();
    let page = PAGE.replace("EDGE", &format!("https://localhost:{port}"));
    let (tx, mut seen) = tokio::sync::watch::channel(Vec::new());
    tokio::spawn(page_server(page_listener, page, tx));
    let _browser = Browser::open_with(
        &format!("http://localhost:{page_port}/"),
        &[
            // QUIC ignores `--ignore-certificate-errors`; it takes the key's hash.
            &format!("--ignore-certificate-errors-spki-list={}", spki_sha256(&t)),
            "--enable-quic",
            &format!("--origin-to-force-quic-on=localhost:{port}"),
        ],
    );
    let s = wait_for(&mut seen, "its own publish and the POST's answer", |s| {
        s.iter().any(|e| e["data"] == "from the page") && s.iter().any(|e| e["op"] == "posted")
    })
    .await;
    assert!(
        s.iter().any(|e| e["op"] == "posted" && e["status"] == 200),
        "{s:?}"
    );
    // All of it over HTTP/3: the stream, the preflight and the POST, and nothing over TCP.
    assert!(
        t.metric("edgeplex_http_requests_total{version=\"3\"}")
            .await
            >= 3.0
    );
    let metrics = t.admin_get("/metrics").await.1;
    assert!(
        !metrics.contains("edgeplex_http_requests_total{version=\"1.1\"}")
            && !metrics.contains("edgeplex_http_requests_total{version=\"2\"}"),
        "{metrics}"
    );
}

/// The base64 SHA-256 of the dev certificate's public key (SubjectPublicKeyInfo), as Chromium's
/// `--ignore-certificate-errors-spki-list` wants it. The dev certificate is ECDSA P-256, whose
/// SPKI is 91 bytes starting with a fixed algorithm header.
fn spki_sha256(t: &common::TestEdge) -> String {
    use base64::Engine;
    const P256_SPKI: [u8; 13] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
    ];
    let der = t.edge.dev_cert().unwrap().der.to_vec();
    let at = der
        .windows(P256_SPKI.len())
        .position(|w| w == P256_SPKI)
        .expect("an ECDSA P-256 key");
    let spki = &der[at..at + 91];
    let digest = ring::digest::digest(&ring::digest::SHA256, spki);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}
