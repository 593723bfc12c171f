//! WebSocket over HTTP/2 (RFC 8441) with a real HTTP/2 client (h2 over TLS, ALPN h2): the
//! edge's SETTINGS offer extended CONNECT, a CONNECT with `:protocol = websocket` on `/ws` opens
//! the same session as the HTTP/1.1 upgrade (same admission, same refusals as HTTP/2
//! responses), streams of one connection live and die independently, and a stream that stops
//! reading is cut alone.

mod common;

use std::time::Duration;

use common::h2_client::{self, Opened};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn extended_connect_opens_the_same_session_as_the_http1_upgrade() {
    let t = common::start(|_| {}).await;
    let mut conn = h2_client::connect(&t).await;
    assert!(
        conn.requests.is_extended_connect_protocol_enabled(),
        "the edge's SETTINGS carry ENABLE_CONNECT_PROTOCOL = 1"
    );
    let mut h2 = conn.client().await;
    assert_eq!(
        h2.welcome["server"],
        concat!("edgeplex/", env!("CARGO_PKG_VERSION"))
    );
    let mut h1 = t.connect().await;

    // HTTP/1.1 publishes, HTTP/2 receives.
    h2.subscribe(1, "mixed").await;
    let r = h1
        .request(json!({"id": 1, "op": "publish", "channel": "mixed", "data": "from h1"}))
        .await;
    assert_eq!(r["ok"], true);
    let m = h2.recv().await;
    assert_eq!(
        (m["op"].as_str(), &m["data"]),
        (Some("message"), &json!("from h1"))
    );

    // And the other way round.
    h1.subscribe(2, "mixed").await;
    let r = h2
        .request(json!({"id": 2, "op": "publish", "channel": "mixed", "data": "from h2"}))
        .await;
    assert_eq!(r["ok"], true);
    assert_eq!(
        h2.recv().await["data"],
        "from h2",
        "the publisher's own copy"
    );
    assert_eq!(h1.recv().await["data"], "from h2");
    assert_eq!(
        t.metric("edgeplex_sessions{transport=\"websocket\"}").await,
        2.0,
        "both are WebSocket sessions"
    );
}

/// Behind a TLS-terminating load balancer that speaks HTTP/2 to the edge: h2c on the plain
/// listener offers the same.
#[tokio::test]
async fn the_plain_listener_offers_it_over_h2c() {
    let t = common::start(|f| f.server.listen_plain = "127.0.0.1:0".into()).await;
    let mut conn = h2_client::connect_plain(&t).await;
    assert!(conn.requests.is_extended_connect_protocol_enabled());
    let mut c = conn.client().await;
    let r = c.request(json!({"id": 1, "op": "ping"})).await;
    assert_eq!(r["ok"], true);
}

#[tokio::test]
async fn two_websockets_on_one_connection_are_independent() {
    let t = common::start(|_| {}).await;
    let mut conn = h2_client::connect(&t).await;
    let mut a = conn.client().await;
    let mut b = conn.client().await;
    assert_ne!(a.welcome["session"], b.welcome["session"]);
    a.subscribe(1, "a").await;
    b.subscribe(1, "b").await;
    b.request(json!({"id": 2, "op": "publish", "channel": "a", "data": 1}))
        .await;
    assert_eq!(a.recv().await["data"], 1);
    a.request(json!({"id": 2, "op": "publish", "channel": "b", "data": 2}))
        .await;
    assert_eq!(b.recv().await["data"], 2, "b hears only its own channel");

    // Closing one stream's WebSocket leaves the other, and the connection, open.
    a.ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    while let Some(Ok(m)) = tokio::time::timeout(common::TIMEOUT, a.ws.next())
        .await
        .expect("the edge answers the close")
    {
        if let Message::Close(_) = m {
            break;
        }
    }
    let r = b.request(json!({"id": 3, "op": "ping"})).await;
    assert_eq!(r["ok"], true, "the other stream goes on");
    let mut c = conn.client().await;
    let r = c.request(json!({"id": 1, "op": "ping"})).await;
    assert_eq!(r["ok"], true, "and the connection takes new streams");
    assert!(
        t.metrics_reach(
            &[("edgeplex_sessions{transport=\"websocket\"}", 2.0)],
            Duration::from_secs(5)
        )
        .await
    );
}

#[tokio::test]
async fn refusals_before_the_handshake_are_http2_responses() {
    let t = common::start(|f| {
        f.admission.allowed_origins = vec!["https://app.example.com".into()];
        f.limits.ip_sessions.max = 1;
    })
    .await;
    let mut conn = h2_client::connect(&t).await;
    let ok_origin = ("origin", "https://app.example.com");

    let (r, _) = conn
        .refused(
            "/ws",
            Some("websocket"),
            &[("origin", "https://evil.example.com")],
        )
        .await;
    assert_eq!(r.status(), 403, "origin");
    let (r, body) = conn
        .refused("/ws?token=abc.def.ghi", Some("websocket"), &[ok_origin])
        .await;
    assert_eq!(r.status(), 401, "bad token: {body:?}");
    assert!(r.headers().contains_key("www-authenticate"));
    let (r, _) = conn
        .refused(
            "/ws",
            Some("websocket"),
            &[ok_origin, ("authorization", "Bearer abc.def.ghi")],
        )
        .await;
    assert_eq!(r.status(), 401, "bad token in Authorization");

    // The wrong handshake is refused before admission looks at it.
    let (r, _) = conn
        .refused("/ws", Some("webtransport"), &[ok_origin])
        .await;
    assert_eq!(r.status(), 400, "another :protocol");
    let (r, _) = conn
        .refused(
            "/ws",
            Some("websocket"),
            &[ok_origin, ("sec-websocket-version", "8")],
        )
        .await;
    assert_eq!(r.status(), 400, "another WebSocket version");
    assert_eq!(r.headers()["sec-websocket-version"], "13");
    for path in ["/sse?channel=a", "/publish", "/nowhere"] {
        let (r, _) = conn.refused(path, Some("websocket"), &[ok_origin]).await;
        assert_eq!(r.status(), 405, "CONNECT to {path}");
    }
    let get = http::Request::builder()
        .uri(format!("https://localhost:{}/ws", conn.port))
        .header("origin", "https://app.example.com")
        .body(())
        .unwrap();
    match conn.open(get).await {
        Opened::Refused(r, _) => {
            assert_eq!(r.status(), 405, "GET /ws over HTTP/2");
            assert_eq!(r.headers()["allow"], "CONNECT");
        }
        Opened::Ws(_) => panic!("GET over HTTP/2 opened a WebSocket"),
    }

    // The per-address session limit counts HTTP/2 WebSockets like any other session.
    let first = match conn
        .connect_ws("/ws", Some("websocket"), &[ok_origin])
        .await
    {
        Opened::Ws(ws) => common::Client::welcomed(ws).await,
        Opened::Refused(r, b) => panic!("{r:?} {b:?}"),
    };
    let (r, _) = conn.refused("/ws", Some("websocket"), &[ok_origin]).await;
    assert_eq!(r.status(), 429, "per-IP session limit");
    assert!(r.headers().contains_key("retry-after"));
    drop(first);
}

/// One stream whose client stopped reading (its window is full) does not slow the connection's
/// other streams; it is closed as a slow consumer, and since not even its close frame gets
/// through, its stream alone is reset, while the connection takes new streams.
#[tokio::test]
async fn a_stalled_stream_is_cut_alone() {
    let t = common::start(|f| {
        f.session.outbound_queue = 32;
        f.session.write_timeout = Duration::from_millis(300);
    })
    .await;
    // A small stream window and a large connection window, as browsers have: one stalled
    // stream fills its own window, not the connection's.
    let mut conn = h2_client::connect_with(&t, Some((16 * 1024, 1 << 20))).await;
    let mut stalled = conn.client().await;
    let mut live = conn.client().await;
    stalled.subscribe(1, "flood").await;
    live.subscribe(1, "calm").await;
    let mut publisher = t.connect().await;
    let chunk = "x".repeat(1000);
    // `stalled` reads nothing from here on.
    // One at a time: the publisher's own queue is as small as everyone's.
    for i in 0..300 {
        let r = publisher
            .request(json!({"id": i, "op": "publish", "channel": "flood", "data": {"pad": chunk}}))
            .await;
        assert_eq!(r["ok"], true);
    }
    let r = publisher
        .request(json!({"id": 1, "op": "publish", "channel": "calm", "data": "still here"}))
        .await;
    assert_eq!(r["ok"], true);
    let m = tokio::time::timeout(Duration::from_secs(2), live.recv())
        .await
        .expect("the live stream is not held up by the stalled one");
    assert_eq!(m["data"], "still here");

    assert!(
        t.metrics_reach(
            &[(
                "edgeplex_slow_consumer_closes_total{transport=\"websocket\"}",
                1.0
            )],
            Duration::from_secs(5)
        )
        .await,
        "the stalled stream is closed as a slow consumer"
    );
    // Its close frame cannot get through a full window: the stream is reset instead.
    let io = stalled.ws.get_mut();
    let reason = tokio::time::timeout(
        Duration::from_secs(5),
        std::future::poll_fn(|cx| io.send.poll_reset(cx)),
    )
    .await
    .expect("the stalled stream is reset")
    .expect("a reset, not a connection error");
    assert_eq!(reason, h2::Reason::CANCEL);

    let r = live.request(json!({"id": 2, "op": "ping"})).await;
    assert_eq!(r["ok"], true, "the other stream goes on");
    let mut again = conn.client().await;
    let r = again.request(json!({"id": 1, "op": "ping"})).await;
    assert_eq!(r["ok"], true, "and the connection takes new streams");
}
