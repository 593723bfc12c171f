//! `clients/js/edgeplex.js`, as the edge serves it at `GET /edgeplex.js`, in a real browser
//! (Debian's headless Chromium) against real edges: each transport end to end, the fallback when
//! WebTransport is refused, publish rejection codes, a token from the app's `token()` on every
//! transport (with the channel rules it unlocks), and resume across two cuts of a relay the
//! test controls, with exactly the published sequence received. The page comes from its own
//! loopback origin and imports the module cross-origin, as a site would.
//!
//! Chromium is told to accept the dev certificate (`--ignore-certificate-errors`) for WebSocket,
//! SSE and the import; WebTransport is also given the certificate's hash, as apps are told to.
//! Needs what `tests/browser.rs` needs. Run alone with `cargo test --test browser_client`.

mod common;

use std::time::Duration;

use common::browser::{Browser, Relay, page_server, wait_for};
use common::{TestEdge, start};
use edgeplex::config::schema::RouteOriginSection;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Runs every scenario that needs no cut, one after the other, and reports `done` with results.
const SCENARIOS: &str = r#"<!doctype html>
<title>edgeplex.js end to end</title>
<script type="module">
const events = [];
const note = (e) => {
  events.push(e);
  fetch("/report", { method: "POST", body: JSON.stringify(events) });
};
const until = (cond, what, ms = 20000) => new Promise((ok, fail) => {
  const t0 = Date.now();
  const tick = () => cond() ? ok() : Date.now() - t0 > ms
    ? fail(new Error("timed out waiting for " + what)) : setTimeout(tick, 20);
  tick();
});
const outcome = (p) => p.then(() => "ok", (e) => e.code);
try {
  const { connect } = await import("EDGE_A/edgeplex.js");
  const hash = (h) => [{ algorithm: "sha-256", value: h }];
  const results = {};

  // Each transport on its own: subscribe, publish 1..3 and get them back; an oversize publish.
  for (const t of ["webtransport", "websocket", "sse"]) {
    const c = connect("EDGE_A", { transports: [t], serverCertificateHashes: hash("HASH_A") });
    const got = [], dgrams = [];
    let subscribed = 0;
    const sub = c.subscribe("e2e:" + t, (d, m) => got.push({ d, offset: m.offset }));
    sub.on("subscribed", () => subscribed++);
    if (t === "webtransport") {
      c.subscribe("px", (d) => dgrams.push(d), { delivery: "datagram" }).on("subscribed", () => subscribed++);
    }
    await until(() => subscribed === (t === "webtransport" ? 2 : 1), t + " subscribed");
    for (let i = 1; i <= 3; i++) await c.publish("e2e:" + t, i);
    await until(() => got.length >= 3, t + " messages");
    if (t === "webtransport") {
      await c.publish("px", { px: 1 });
      await until(() => dgrams.length >= 1, "a datagram");
    }
    results[t] = {
      transport: c.transport,
      data: got.map((g) => g.d),
      offsets: got.every((g) => typeof g.offset === "string" && g.offset.length > 0),
      datagram: dgrams[0] ?? null,
      too_large: await outcome(c.publish("e2e:" + t, "x".repeat(5000))),
    };
    c.close();
    note({ op: "ran", t });
  }

  // Edge B refuses WebTransport (its origin rule for /wt): the client lands on WebSocket at once.
  // Its sessions may publish twice, then once a second.
  const b = connect("EDGE_B", { serverCertificateHashes: hash("HASH_B") });
  const t0 = Date.now();
  await until(() => b.state === "open", "the fallback");
  results.fallback = { transport: b.transport, ms: Date.now() - t0 };
  const burst = async (c) => {
    const r = await Promise.all(Array.from({ length: 20 }, (_, i) =>
      c.publish("rl", i).then(() => ({ code: "ok" }), (e) => ({ code: e.code, retry: e.retry_after_ms }))));
    return { ok: r.filter((x) => x.code === "ok").length, limited: r.filter((x) => x.code === "rate_limited" && x.retry > 0).length };
  };
  results.rate_websocket = await burst(b);
  b.close();
  const bs = connect("EDGE_B", { transports: ["sse"] });
  results.rate_sse = await burst(bs);
  bs.close();

  // Edge C needs a token (the page's token() hands one out) and lets a user publish on its
  // own channels only.
  for (const t of ["webtransport", "websocket", "sse"]) {
    let asked = 0;
    const token = async () => { asked++; return "TOKEN"; };
    const c = connect("EDGE_C", { transports: [t], token, serverCertificateHashes: hash("HASH_C") });
    const got = [];
    let subscribed = false;
    c.subscribe("user:alice:feed", (d) => got.push(d)).on("subscribed", () => (subscribed = true));
    await until(() => subscribed, t + " subscribed with a token");
    const own = await outcome(c.publish("user:alice:feed", 7));
    await until(() => got.length >= 1, t + " its own message");
    results["tokens_" + t] = {
      transport: c.transport,
      asked: asked > 0,
      own,
      got,
      other: await outcome(c.publish("user:bob:feed", 1)),
    };
    results["forbidden_" + t] = await outcome(c.publish("c", 1));
    c.close();
  }
  note({ op: "done", results });
} catch (e) {
  note({ op: "error", message: String(e && e.stack || e) });
}
</script>
"#;

/// Edge C's token secret: the page's `token()` hands out an HS256 token signed with it.
const SECRET: &str = "the-browser-test-secret-of-32-bytes-at-least";

fn allow_page(f: &mut edgeplex::config::FileConfig, page_port: u16) {
    f.admission.allowed_origins = vec![format!("http://localhost:{page_port}")];
}

fn base(t: &TestEdge) -> String {
    format!("https://localhost:{}", t.edge.tls_addr().port())
}

#[tokio::test]
async fn the_client_module_works_on_every_transport_falls_back_and_reports_refusals() {
    let page_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_port = page_listener.local_addr().unwrap().port();
    let a = start(|f| {
        allow_page(f, page_port);
        f.session.max_message_bytes = 4096;
    })
    .await;
    let b = start(|f| {
        allow_page(f, page_port);
        f.admission.routes.insert(
            "webtransport".into(),
            RouteOriginSection {
                allowed_origins: Some(vec!["https://elsewhere.example".into()]),
                allow_missing_origin: None,
            },
        );
        f.session.messages_per_second = 1;
        f.session.message_burst = 2;
    })
    .await;
    let c = start(|f| {
        allow_page(f, page_port);
        f.auth.hmac_secret = SECRET.into();
        f.auth.anonymous = false;
        common::channel_rules(
            f,
            &[
                ("user:{sub}:*", "authenticated", "authenticated"),
                ("*", "anyone", "nobody"),
            ],
        );
    })
    .await;
    let token = {
        use jwt_simple::prelude::{Claims, Duration as JsDuration, HS256Key, MACLike};
        HS256Key::from_bytes(SECRET.as_bytes())
            .authenticate(Claims::create(JsDuration::from_hours(1)).with_subject("alice"))
            .unwrap()
    };
    for t in [&a, &b] {
        assert_eq!(
            t.edge.quic_addr().map(|q| q.port()),
            Some(t.edge.tls_addr().port()),
            "one URL serves every transport: UDP shares the TCP port"
        );
    }
    let page = SCENARIOS
        .replace("EDGE_A", &base(&a))
        .replace("EDGE_B", &base(&b))
        .replace("EDGE_C", &base(&c))
        .replace("HASH_A", &a.edge.dev_cert().unwrap().sha256_hex)
        .replace("HASH_B", &b.edge.dev_cert().unwrap().sha256_hex)
        .replace("HASH_C", &c.edge.dev_cert().unwrap().sha256_hex)
        .replace("TOKEN", &token);
    let (tx, mut seen) = watch::channel(Vec::new());
    tokio::spawn(page_server(page_listener, page, tx));
    let started = tokio::time::Instant::now();
    let _browser = Browser::open(&format!("http://localhost:{page_port}/"));

    let s = wait_for(&mut seen, "the scenarios' results", |s| {
        s.iter().any(|e| e["op"] == "done" || e["op"] == "error")
    })
    .await;
    let last = s.last().unwrap();
    assert_eq!(last["op"], "done", "the page failed: {s:?}");
    let r = &last["results"];
    eprintln!("scenarios took {:?}: {r}", started.elapsed());
    for t in ["webtransport", "websocket", "sse"] {
        assert_eq!(r[t]["transport"], t, "{r}");
        assert_eq!(r[t]["data"], json!([1, 2, 3]), "{t}: {r}");
        assert_eq!(
            r[t]["offsets"], true,
            "{t}: every message has its offset: {r}"
        );
        assert_eq!(r[t]["too_large"], "too_large", "{t}: {r}");
    }
    assert_eq!(r["webtransport"]["datagram"], json!({"px": 1}), "{r}");
    assert_eq!(r["fallback"]["transport"], "websocket", "{r}");
    assert!(
        r["fallback"]["ms"].as_u64().unwrap() < 5000,
        "a refused WebTransport moves on at once, not after the open timeout: {r}"
    );
    for k in ["rate_websocket", "rate_sse"] {
        assert!(r[k]["ok"].as_u64().unwrap() >= 2, "{k}: {r}");
        assert!(
            r[k]["limited"].as_u64().unwrap() >= 1,
            "{k}: refused with rate_limited and retry_after_ms: {r}"
        );
    }
    for t in ["webtransport", "websocket", "sse"] {
        let k = format!("tokens_{t}");
        assert_eq!(
            r[&k],
            json!({"transport": t, "asked": true, "own": "ok", "got": [7], "other": "forbidden"}),
            "{r}"
        );
        assert_eq!(r[format!("forbidden_{t}")], "forbidden", "{r}");
    }
}

/// Two clients, one on WebSocket and one on SSE, both through the relay; they report every
/// state change, message and gap.
const RESUME: &str = r#"<!doctype html>
<title>edgeplex.js resume</title>
<script type="module">
const events = [];
const note = (e) => {
  events.push(e);
  fetch("/report", { method: "POST", body: JSON.stringify(events) });
};
try {
  const { connect } = await import("EDGE/edgeplex.js");
  for (const t of ["websocket", "sse"]) {
    const c = connect("RELAY", { transports: [t] });
    c.on("state", (s) => note({ t, op: "state", s }));
    const sub = c.subscribe("r:" + t, (data, m) => note({ t, op: "message", data, offset: m.offset }));
    sub.on("subscribed", () => note({ t, op: "subscribed" }));
    sub.on("gap", () => note({ t, op: "gap" }));
  }
} catch (e) {
  note({ op: "error", message: String(e && e.stack || e) });
}
</script>
"#;

const TRANSPORTS: [&str; 2] = ["websocket", "sse"];

fn count(s: &[Value], t: &str, op: &str, state: Option<&str>) -> usize {
    s.iter()
        .filter(|e| e["t"] == t && e["op"] == op && state.is_none_or(|st| e["s"] == st))
        .count()
}

fn data(s: &[Value], t: &str) -> Vec<i64> {
    s.iter()
        .filter(|e| e["t"] == t && e["op"] == "message")
        .map(|e| e["data"].as_i64().unwrap_or(-1))
        .collect()
}

#[tokio::test]
async fn the_client_module_resumes_across_two_cuts_with_exactly_the_published_sequence() {
    let page_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_port = page_listener.local_addr().unwrap().port();
    let t = start(|f| allow_page(f, page_port)).await;
    let relay = Relay::start(t.edge.tls_addr()).await;
    let page = RESUME
        .replace("RELAY", &format!("https://localhost:{}", relay.addr.port()))
        .replace("EDGE", &base(&t));
    let (tx, mut seen) = watch::channel(Vec::new());
    tokio::spawn(page_server(page_listener, page, tx));
    let started = tokio::time::Instant::now();
    let _browser = Browser::open(&format!("http://localhost:{page_port}/"));

    wait_for(&mut seen, "both subscriptions", |s| {
        TRANSPORTS
            .iter()
            .all(|t| count(s, t, "subscribed", None) >= 1)
    })
    .await;
    let mut ws = t.connect().await;
    let mut n: i64 = 0;
    let mut publish = async |ws: &mut common::Client| {
        n += 1;
        for tr in TRANSPORTS {
            let channel = format!("r:{tr}");
            let r = ws
                .request(json!({"id": n, "op": "publish", "channel": channel, "data": n}))
                .await;
            assert_eq!(r["ok"], true, "{r}");
        }
        n
    };
    let first = publish(&mut ws).await;
    wait_for(&mut seen, "the first message", |s| {
        TRANSPORTS
            .iter()
            .all(|t| data(s, t).len() == first as usize)
    })
    .await;

    for cut in 1..=2 {
        relay.cut();
        wait_for(&mut seen, "both clients noticing the cut", |s| {
            TRANSPORTS
                .iter()
                .all(|t| count(s, t, "state", Some("reconnecting")) >= cut)
        })
        .await;
        publish(&mut ws).await;
        publish(&mut ws).await;
        // Let a reconnect or two fail against the cut relay before it comes back.
        tokio::time::sleep(Duration::from_millis(300)).await;
        relay.restore();
        wait_for(&mut seen, "both clients open again", |s| {
            TRANSPORTS
                .iter()
                .all(|t| count(s, t, "state", Some("open")) > cut)
        })
        .await;
        let last = publish(&mut ws).await;
        wait_for(
            &mut seen,
            "what was published during the cut and after",
            |s| TRANSPORTS.iter().all(|t| data(s, t).len() >= last as usize),
        )
        .await;
    }
    // Anything delivered twice would have arrived by now, behind the last message.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = seen.borrow().clone();
    eprintln!("resume test took {:?}", started.elapsed());
    let want: Vec<i64> = (1..=7).collect();
    for tr in TRANSPORTS {
        assert_eq!(data(&s, tr), want, "{tr}: exactly 1..7, in order: {s:?}");
        assert_eq!(count(&s, tr, "gap", None), 0, "{tr}: {s:?}");
        assert_eq!(count(&s, tr, "state", Some("open")), 3, "{tr}: {s:?}");
    }
}

/// The module and the demo page over a plain listener: headers, 304, and `[demo] enabled`.
#[tokio::test]
async fn the_edge_serves_the_module_and_the_demo_page_only_when_enabled() {
    let on = start(|f| {
        f.server.listen_plain = "127.0.0.1:0".into();
        f.demo.enabled = true;
    })
    .await;
    let off = start(|f| f.server.listen_plain = "127.0.0.1:0".into()).await;
    let url = |t: &TestEdge, path: &str| format!("http://{}{path}", t.edge.plain_addr().unwrap());
    let http = reqwest::Client::new();

    let r = http.get(url(&on, "/edgeplex.js")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["content-type"], "text/javascript; charset=utf-8");
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(h["cache-control"].to_str().unwrap().contains("max-age="));
    let body = r.text().await.unwrap();
    assert_eq!(body, include_str!("../clients/js/edgeplex.js"));
    let r = http
        .get(url(&off, "/edgeplex.js"))
        .header("if-none-match", h["etag"].clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304, "same build, same ETag, on any edge");

    let page = http.get(url(&on, "/")).send().await.unwrap();
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(
        page.text()
            .await
            .unwrap()
            .contains(r#"from "/edgeplex.js""#)
    );
    let page = http.get(url(&off, "/")).send().await.unwrap();
    assert!(page.text().await.unwrap().starts_with("edgeplex/"));
}
