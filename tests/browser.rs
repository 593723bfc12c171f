//! A real browser against a real edge: Debian's Chromium, headless, with EventSource, with
//! WebTransport (`serverCertificateHashes`, the printed SHA-256 of the dev certificate), and with
//! a WebSocket that rides its HTTP/2 connection (RFC 8441).
//!
//! The page is served from its own origin (plain HTTP on another loopback port), so the stream is
//! a cross-origin EventSource and passes the edge's origin check and CORS echo, as in production.
//! Between the browser and the edge sits a TCP relay the test can cut: the browser then notices
//! the dropped stream, reconnects by itself with `Last-Event-ID`, and must get exactly what it
//! missed. The browser is told to accept the dev certificate (`--ignore-certificate-errors`):
//! this test is about EventSource's behaviour, not certificate trust.
//!
//! Needs `/usr/bin/chromium` (Debian's `chromium` package; `scripts/test.sh` installs it) or the
//! path in `EDGEPLEX_CHROMIUM`. Run alone with `cargo test --test browser`.

mod common;

use std::time::Duration;

use common::browser::{Browser, Relay, page_server, wait_for};
use common::start;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

const PAGE: &str = r#"<!doctype html>
<title>edgeplex EventSource test</title>
<script>
const seen = [];
const report = () => fetch("/report", { method: "POST", body: JSON.stringify(seen) });
const es = new EventSource("EDGE/sse?channel=b1&channel=b2");
es.onmessage = (e) => {
  const d = JSON.parse(e.data);
  seen.push({ id: e.lastEventId, op: d.op, channel: d.channel, data: d.data });
  report();
};
es.onerror = () => { seen.push({ op: "error", state: es.readyState }); report(); };
</script>
"#;

fn messages(seen: &[Value]) -> Vec<(String, i64)> {
    seen.iter()
        .filter(|e| e["op"] == "message")
        .map(|e| {
            let channel = e["channel"].as_str().unwrap_or_default().to_string();
            (channel, e["data"].as_i64().unwrap_or(-1))
        })
        .collect()
}

#[tokio::test]
async fn a_browser_eventsource_reconnects_by_itself_and_misses_nothing() {
    let page_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_port = page_listener.local_addr().unwrap().port();
    let t = start(|f| {
        f.admission.allowed_origins = vec![format!("http://localhost:{page_port}")];
        f.session.sse_retry = Duration::from_millis(200);
    })
    .await;
    let relay = Relay::start(t.edge.tls_addr()).await;
    let page = PAGE.replace("EDGE", &format!("https://localhost:{}", relay.addr.port()));
    let (tx, mut seen) = watch::channel(Vec::new());
    tokio::spawn(page_server(page_listener, page, tx));
    let _browser = Browser::open(&format!("http://localhost:{page_port}/"));

    wait_for(&mut seen, "the welcome event", |s| {
        s.iter().any(|e| e["op"] == "welcome")
    })
    .await;
    let mut ws = t.connect().await;
    let publish = async |ws: &mut common::Client, channel: &str, n: i64| {
        let r = ws
            .request(json!({"id": n, "op": "publish", "channel": channel, "data": n}))
            .await;
        assert_eq!(r["ok"], true);
    };
    publish(&mut ws, "b1", 0).await;
    publish(&mut ws, "b2", 1).await;
    wait_for(&mut seen, "the first two messages", |s| {
        messages(s).len() == 2
    })
    .await;

    // The connection drops; the browser keeps retrying while these are published.
    relay.cut();
    wait_for(&mut seen, "the dropped stream", |s| {
        s.iter().any(|e| e["op"] == "error")
    })
    .await;
    publish(&mut ws, "b1", 2).await;
    publish(&mut ws, "b2", 3).await;
    publish(&mut ws, "b1", 4).await;
    relay.restore();

    let s = wait_for(&mut seen, "the missed messages", |s| messages(s).len() >= 5).await;
    let welcomes = s.iter().filter(|e| e["op"] == "welcome").count();
    assert_eq!(welcomes, 2, "one reconnect: {s:?}");
    assert!(
        !s.iter().any(|e| e["op"] == "gap"),
        "the browser's Last-Event-ID covered both channels: {s:?}"
    );
    publish(&mut ws, "b2", 5).await;
    let s = wait_for(&mut seen, "live traffic after the resume", |s| {
        messages(s).len() >= 6
    })
    .await;
    // Order holds per channel; a resume replays one channel after the other.
    let got = messages(&s);
    for (channel, want) in [("b1", vec![0, 2, 4]), ("b2", vec![1, 3, 5])] {
        let on: Vec<i64> = got.iter().filter(|m| m.0 == channel).map(|m| m.1).collect();
        assert_eq!(on, want, "every message of {channel} once, in order: {s:?}");
    }
    let last = s.iter().rev().find(|e| e["op"] == "message").unwrap();
    assert_eq!(
        last["id"].as_str().unwrap().split(',').count(),
        2,
        "lastEventId is the two-channel position: {last}"
    );
}

const WT_PAGE: &str = r#"<!doctype html>
<title>edgeplex WebTransport test</title>
<script>
const seen = [];
const report = () => fetch("/report", { method: "POST", body: JSON.stringify(seen) });
const hash = Uint8Array.from("HASH".match(/../g).map((h) => parseInt(h, 16)));
(async () => {
  try {
    const wt = new WebTransport("EDGE/wt", {
      serverCertificateHashes: [{ algorithm: "sha-256", value: hash }],
    });
    await wt.ready;
    const { readable, writable } = await wt.createBidirectionalStream();
    const writer = writable.getWriter();
    const enc = new TextEncoder();
    await writer.write(enc.encode('{"id":1,"op":"subscribe","channel":"b"}\n'));
    await writer.write(enc.encode('{"id":2,"op":"subscribe","channel":"px","delivery":"datagram"}\n'));
    (async () => {
      const reader = wt.datagrams.readable.getReader();
      const dec = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const d = JSON.parse(dec.decode(value));
        seen.push({ via: "datagram", op: d.op, channel: d.channel, data: d.data });
        report();
      }
    })();
    const reader = readable.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let i;
      while ((i = buf.indexOf("\n")) >= 0) {
        const d = JSON.parse(buf.slice(0, i));
        buf = buf.slice(i + 1);
        seen.push({ via: "stream", op: d.op, id: d.id, ok: d.ok, channel: d.channel, data: d.data });
        report();
      }
    }
  } catch (e) {
    seen.push({ op: "error", message: String(e) });
    report();
  }
})();
</script>
"#;

#[tokio::test]
async fn a_browser_webtransport_session_trusts_the_printed_hash_and_gets_datagrams() {
    let page_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_port = page_listener.local_addr().unwrap().port();
    let t = start(|f| {
        f.admission.allowed_origins = vec![format!("http://localhost:{page_port}")];
    })
    .await;
    let quic = t.edge.quic_addr().expect("WebTransport is on");
    let page = WT_PAGE
        .replace("EDGE", &format!("https://127.0.0.1:{}", quic.port()))
        .replace("HASH", &t.edge.dev_cert().unwrap().sha256_hex);
    let (tx, mut seen) = watch::channel(Vec::new());
    tokio::spawn(page_server(page_listener, page, tx));
    // No --ignore-certificate-errors here: the hash is the only trust (a wrong one fails the
    // opening handshake).
    let _browser = Browser::open_with(&format!("http://localhost:{page_port}/"), &[]);

    let s = wait_for(&mut seen, "both subscriptions confirmed", |s| {
        s.iter().any(|e| e["op"] == "error") || s.iter().filter(|e| e["ok"] == true).count() >= 2
    })
    .await;
    assert!(
        !s.iter().any(|e| e["op"] == "error"),
        "the browser failed: {s:?}"
    );
    assert_eq!(s[0]["op"], "welcome", "{s:?}");
    let mut ws = t.connect().await;
    let r = ws
        .request(json!({"id": 1, "op": "publish", "channel": "b", "data": "over the stream"}))
        .await;
    assert_eq!(r["ok"], true);
    let r = ws
        .request(json!({"id": 2, "op": "publish", "channel": "px", "data": {"px": 7}}))
        .await;
    assert_eq!(r["ok"], true);
    let s = wait_for(&mut seen, "a stream push and a datagram push", |s| {
        s.iter()
            .any(|e| e["via"] == "stream" && e["data"] == "over the stream")
            && s.iter()
                .any(|e| e["via"] == "datagram" && e["data"] == json!({"px": 7}))
    })
    .await;
    assert!(s.iter().all(|e| e["op"] != "error"), "{s:?}");
}

const WS_PAGE: &str = r#"<!doctype html>
<title>edgeplex WebSocket over HTTP/2 test</title>
<script>
const seen = [];
const report = () => fetch("/report", { method: "POST", body: JSON.stringify(seen) });
// An HTTP/2 connection to the edge first: Chromium opens a WebSocket as a stream of one it
// already holds, when that connection's SETTINGS allow extended CONNECT.
// With credentials, as a WebSocket is sent: Chromium keeps connections with and without them
// apart. `no-cors`: only the connection matters here, not the response.
fetch("EDGE/edgeplex.js", { mode: "no-cors", credentials: "include" }).then((r) => {
  seen.push({ op: "fetched", type: r.type });
  const ws = new WebSocket("WSS/ws");
  ws.onmessage = (e) => { seen.push(JSON.parse(e.data)); report(); };
  ws.onerror = () => { seen.push({ op: "error" }); report(); };
}, (e) => { seen.push({ op: "fetch failed", why: String(e) }); report(); });
</script>
"#;

/// Chromium opens its WebSocket as a stream of the HTTP/2 connection it already holds to the
/// edge (RFC 8441): once the session is open, the edge counts one connection, not two.
#[tokio::test]
async fn chromium_opens_a_websocket_over_its_http2_connection() {
    let page_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_port = page_listener.local_addr().unwrap().port();
    let t = start(|f| {
        f.admission.allowed_origins = vec![format!("http://localhost:{page_port}")];
    })
    .await;
    let port = t.edge.tls_addr().port();
    let page = WS_PAGE
        .replace("EDGE", &format!("https://localhost:{port}"))
        .replace("WSS", &format!("wss://localhost:{port}"));
    let (tx, mut seen) = watch::channel(Vec::new());
    tokio::spawn(page_server(page_listener, page, tx));
    let _browser = Browser::open(&format!("http://localhost:{page_port}/"));
    let s = wait_for(&mut seen, "the welcome frame", |s| {
        s.iter().any(|e| e["op"] == "welcome" || e["op"] == "error")
    })
    .await;
    assert!(s.iter().any(|e| e["op"] == "welcome"), "{s:?}");
    assert_eq!(
        t.metric("edgeplex_connections ").await,
        1.0,
        "the WebSocket shares the HTTP/2 connection of the fetch: {s:?}"
    );
}
