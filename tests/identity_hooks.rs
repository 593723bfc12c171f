//! Backend hooks end to end: a real edge whose `[hooks]` point at a real HTTP service started by
//! each test (hyper on 127.0.0.1 port 0, answering per path as the test scripts it and keeping
//! every request it got), with real WebSocket, SSE and `POST /publish` clients. What the edge
//! sends and how it reads the answers alone is tests/hooks.rs; here is what a client sees.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::hook_service::{self, Seen, Service};
use common::{Client, TestEdge, channel_rules, sse_client, start};
use edgeplex::config::{FileConfig, HookFailure};
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite;

/// A 200 answer with `body`.
fn answer(body: Value) -> BoxFuture<'static, (u16, String)> {
    hook_service::answer(200, body)
}

/// An address where nothing listens.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// The cookie-session rule set: private user channels, paid channels for those the connect
/// hook (or a token) grants, public channels for the hook tests, and nothing else.
fn rules(f: &mut FileConfig) {
    channel_rules(
        f,
        &[
            ("user:{sub}:*", "authenticated", "authenticated"),
            ("paid:*", "claim", "claim"),
            ("public:*", "anyone", "anyone"),
            ("*", "nobody", "nobody"),
        ],
    );
}

/// An edge with `rules` and `[hooks] url = base`, the hooks `on` switched on, and `edit` after.
async fn edge(base: &str, on: &[&str], edit: impl FnOnce(&mut FileConfig)) -> TestEdge {
    let base = base.to_string();
    let on: Vec<String> = on.iter().map(|s| s.to_string()).collect();
    start(move |f| {
        rules(f);
        f.hooks.url = base;
        for hook in &on {
            match hook.as_str() {
                "connect" => f.hooks.connect = true,
                "subscribe" => f.hooks.subscribe = true,
                "publish" => f.hooks.publish = true,
                "disconnect" => f.hooks.disconnect = true,
                other => panic!("no hook {other}"),
            }
        }
        edit(f);
    })
    .await
}

/// A connect hook as a cookie-session app writes it: `session=alice` is alice, who has bought
/// the gold plan; anything else has no session.
fn cookie_app(seen: Seen) -> BoxFuture<'static, (u16, String)> {
    match seen.hook() {
        "/connect" if seen.body["headers"]["cookie"] == "session=alice" => answer(
            json!({"allow": true, "user": "alice", "channels": {"subscribe": ["paid:gold"]}}),
        ),
        "/connect" => answer(json!({"allow": false, "reason": "no session"})),
        _ => answer(json!({"allow": true})),
    }
}

/// Opens `/ws` with `headers` and reads the welcome frame.
async fn connect_with(t: &TestEdge, headers: &[(&str, &str)]) -> Client {
    let ws = t
        .try_connect_with(headers)
        .await
        .expect("websocket handshake");
    let mut c = Client {
        ws,
        welcome: Value::Null,
        held: Default::default(),
    };
    c.welcome = c.recv().await;
    assert_eq!(c.welcome["op"], "welcome", "{}", c.welcome);
    c
}

/// A refused `/ws` handshake: status, `Retry-After`, and the body as JSON.
async fn ws_refused(t: &TestEdge, headers: &[(&str, &str)]) -> (u16, Option<String>, Value) {
    match t.try_connect_with(headers).await {
        Err(tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            resp.headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string()),
            serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap(),
        ),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, the handshake succeeded"),
    }
}

/// `GET /sse?{query}` with `headers`: status, `Retry-After`, and the body as JSON unless 200
/// (a 200 is an open stream, dropped here).
async fn sse(t: &TestEdge, query: &str, headers: &[(&str, &str)]) -> (u16, Option<String>, Value) {
    let mut req = sse_client::client(t, false).get(sse_client::url(t, query));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    if status == 200 {
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        return (status, retry, Value::Null);
    }
    (
        status,
        retry,
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap(),
    )
}

/// `POST /publish` of `body` with `headers`: status and the body as JSON.
async fn post(t: &TestEdge, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let url = format!("https://localhost:{}/publish", t.edge.tls_addr().port());
    let mut req = sse_client::client(t, false)
        .post(url)
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap(),
    )
}

async fn subscribe(c: &mut Client, id: u64, channel: &str) -> Value {
    c.request(json!({"id": id, "op": "subscribe", "channel": channel}))
        .await
}

async fn publish(c: &mut Client, id: u64, channel: &str, data: Value) -> Value {
    c.request(json!({"id": id, "op": "publish", "channel": channel, "data": data}))
        .await
}

fn forbidden(id: u64, message: &str) -> Value {
    json!({"id": id, "error": {"code": "forbidden", "message": message}})
}

const ALICE: &[(&str, &str)] = &[("cookie", "session=alice")];

async fn hook_calls(t: &TestEdge, hook: &str, outcome: &str) -> f64 {
    t.metric(&format!(
        "edgeplex_hook_calls_total{{hook=\"{hook}\",outcome=\"{outcome}\"}}"
    ))
    .await
}

#[tokio::test]
async fn a_cookie_session_app_names_the_user_and_grants_channels_on_every_transport() {
    let service = Service::start(cookie_app).await;
    let t = edge(&service.url, &["connect"], |_| {}).await;

    // WebSocket: a cookie, no token.
    let mut c = connect_with(&t, ALICE).await;
    let connect = service.on("/connect");
    assert_eq!(connect.len(), 1);
    assert_eq!(
        connect[0],
        json!({"session": c.welcome["session"], "transport": "websocket", "client": "127.0.0.1",
            "origin": null, "user": null, "headers": {"cookie": "session=alice"}})
    );
    for (id, channel) in [(1, "user:alice:inbox"), (2, "paid:gold")] {
        assert_eq!(
            subscribe(&mut c, id, channel).await,
            json!({"id": id, "ok": true}),
            "{channel}"
        );
    }
    for (id, channel) in [(3, "user:bob:inbox"), (4, "paid:silver")] {
        let r = subscribe(&mut c, id, channel).await;
        assert_eq!(r["error"]["code"], "forbidden", "{channel}: {r}");
        assert_eq!(r["id"], id);
    }
    // The grant is to subscribe only: the `claim` rule refuses a publish on it.
    let r = publish(&mut c, 5, "paid:gold", json!(1)).await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");

    // SSE: the whole request is refused when one channel is.
    for (query, status) in [
        ("channel=user:alice:inbox&channel=paid:gold", 200),
        ("channel=user:bob:inbox", 403),
        ("channel=paid:silver", 403),
        ("channel=user:alice:inbox&channel=paid:silver", 403),
    ] {
        let (got, _, body) = sse(&t, query, ALICE).await;
        assert_eq!(got, status, "{query}: {body}");
        if status == 403 {
            assert_eq!(body["error"]["code"], "forbidden", "{query}: {body}");
        }
    }
    // Without the cookie the service has no session for it.
    let (status, _, body) = sse(&t, "channel=user:alice:inbox", &[]).await;
    assert_eq!(
        (status, body),
        (
            403,
            json!({"error": {"code": "forbidden", "message": "no session"}})
        )
    );
    let sse_connects = service.on("/connect");
    assert_eq!(sse_connects.len(), 6);
    assert!(sse_connects[1..].iter().all(|b| b["transport"] == "sse"));

    // POST /publish: the connect hook is asked for a stateless publish too.
    let (status, body) = post(
        &t,
        json!({"channel": "user:alice:inbox", "data": {"n": 1}}),
        ALICE,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let m = c.recv().await;
    assert_eq!(
        (m["channel"].clone(), m["data"].clone()),
        (json!("user:alice:inbox"), json!({"n": 1})),
        "{m}"
    );
    let (status, body) = post(&t, json!({"channel": "user:bob:inbox", "data": 1}), ALICE).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    let (status, body) = post(&t, json!({"channel": "user:alice:inbox", "data": 1}), &[]).await;
    assert_eq!(
        (status, body),
        (
            403,
            json!({"error": {"code": "forbidden", "message": "no session"}})
        )
    );
    let connects = service.on("/connect");
    assert_eq!(connects.len(), 9);
    assert_eq!(connects[6]["transport"], "publish");
    assert_eq!(connects[6]["headers"], json!({"cookie": "session=alice"}));

    assert_eq!(hook_calls(&t, "connect", "allow").await, 7.0);
    assert_eq!(hook_calls(&t, "connect", "deny").await, 2.0);
    assert_eq!(hook_calls(&t, "connect", "failure").await, 0.0);
}

#[tokio::test]
async fn a_denied_connect_is_403_before_the_handshake_with_the_services_reason() {
    let service = Service::start(cookie_app).await;
    let t = edge(&service.url, &["connect"], |_| {}).await;
    let denied = json!({"error": {"code": "forbidden", "message": "no session"}});
    let bob = &[("cookie", "session=bob")][..];
    assert_eq!(ws_refused(&t, bob).await, (403, None, denied.clone()));
    // A channel anyone may read is no way around the hook.
    assert_eq!(
        sse(&t, "channel=public:news", bob).await,
        (403, None, denied.clone())
    );
    assert_eq!(
        post(&t, json!({"channel": "public:news", "data": 1}), bob).await,
        (403, denied)
    );
    assert_eq!(service.on("/connect").len(), 3);
    assert_eq!(hook_calls(&t, "connect", "deny").await, 3.0);
    assert_eq!(
        t.metric("edgeplex_refusals_total{reason=\"forbidden\"}")
            .await,
        3.0
    );
}

/// The two ways a service cannot answer: nothing listens, or it answers after `hooks.timeout`.
async fn unanswering_service(slow: bool) -> (String, Option<Service>) {
    if slow {
        let service = Service::start(|_| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                (200, json!({"allow": true, "user": "late"}).to_string())
            })
        })
        .await;
        (service.url.clone(), Some(service))
    } else {
        (format!("http://{}", closed_port().await), None)
    }
}

async fn check_failure_modes(slow: bool) {
    let (url, _service) = unanswering_service(slow).await;
    let timeout = |f: &mut FileConfig| f.hooks.timeout = Duration::from_millis(200);

    // failure = "deny": 503 with Retry-After before the handshake, on every transport.
    let t = edge(&url, &["connect"], |f| {
        timeout(f);
        f.hooks.failure = HookFailure::Deny;
    })
    .await;
    let unavailable = json!({"error": {"code": "unavailable",
        "message": "the service that decides could not be asked; try again later",
        "retry_after_ms": 1000}});
    let started = Instant::now();
    assert_eq!(
        ws_refused(&t, ALICE).await,
        (503, Some("1".into()), unavailable.clone())
    );
    assert_eq!(
        sse(&t, "channel=public:news", ALICE).await,
        (503, Some("1".into()), unavailable.clone())
    );
    assert_eq!(
        post(&t, json!({"channel": "public:news", "data": 1}), ALICE).await,
        (503, unavailable)
    );
    // Cut at the timeout, not at the service's pace.
    assert!(started.elapsed() < Duration::from_secs(2), "{slow}");
    assert_eq!(hook_calls(&t, "connect", "failure").await, 3.0);
    let reason = if slow { "timeout" } else { "unreachable" };
    assert_eq!(
        t.metric(&format!(
            "edgeplex_hook_failures_total{{hook=\"connect\",reason=\"{reason}\"}}"
        ))
        .await,
        3.0
    );

    // failure = "allow": the session opens as if the hook were off, and the rules still apply:
    // it has no user, so no user channel.
    let t = edge(&url, &["connect"], |f| {
        timeout(f);
        f.hooks.failure = HookFailure::Allow;
    })
    .await;
    let mut c = connect_with(&t, ALICE).await;
    assert_eq!(
        subscribe(&mut c, 1, "public:news").await,
        json!({"id": 1, "ok": true})
    );
    let r = subscribe(&mut c, 2, "user:alice:inbox").await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    let r = subscribe(&mut c, 3, "paid:gold").await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");
    assert_eq!(sse(&t, "channel=public:news", ALICE).await.0, 200, "{slow}");
    assert_eq!(hook_calls(&t, "connect", "failure").await, 2.0);
    assert_eq!(hook_calls(&t, "connect", "allow").await, 0.0);
}

#[tokio::test]
async fn a_service_that_is_down_refuses_with_503_or_lets_sessions_open_by_failure_mode() {
    check_failure_modes(false).await;
    // After the handshake, an unavailable subscribe hook is an error reply with a retry hint.
    let down = format!("http://{}", closed_port().await);
    let t = edge(&down, &["subscribe"], |_| {}).await;
    let mut c = t.connect().await;
    assert_eq!(
        subscribe(&mut c, 1, "public:news").await,
        json!({"id": 1, "error": {"code": "unavailable",
            "message": "the service that decides could not be asked; try again later",
            "retry_after_ms": 1000}})
    );
}

#[tokio::test]
async fn a_service_slower_than_the_timeout_counts_as_down() {
    check_failure_modes(true).await;
}

#[tokio::test]
async fn the_subscribe_hook_narrows_the_rules_and_is_never_asked_what_they_refuse() {
    let service = Service::start(|seen| match seen.body["channel"].as_str() {
        Some("public:secret") => answer(json!({"allow": false, "reason": "not on your plan"})),
        _ => answer(json!({"allow": true})),
    })
    .await;
    let t = edge(&service.url, &["subscribe"], |_| {}).await;
    let mut c = t.connect().await;
    assert_eq!(
        subscribe(&mut c, 1, "public:secret").await,
        forbidden(1, "not on your plan")
    );
    assert_eq!(
        subscribe(&mut c, 2, "public:open").await,
        json!({"id": 2, "ok": true})
    );
    // The rules refuse these first: the service never hears of them.
    for (id, channel) in [(3, "elsewhere"), (4, "user:alice:inbox"), (5, "paid:gold")] {
        let r = subscribe(&mut c, id, channel).await;
        assert_eq!(r["error"]["code"], "forbidden", "{channel}: {r}");
    }
    let asked = service.on("/subscribe");
    assert_eq!(
        asked,
        [
            json!({"session": c.welcome["session"], "transport": "websocket",
                "client": "127.0.0.1", "origin": null, "user": null, "channel": "public:secret"}),
            json!({"session": c.welcome["session"], "transport": "websocket",
                "client": "127.0.0.1", "origin": null, "user": null, "channel": "public:open"}),
        ]
    );
    // SSE: the service's reason, 403 for the whole request.
    assert_eq!(
        sse(&t, "channel=public:open&channel=public:secret", &[]).await,
        (
            403,
            None,
            json!({"error": {"code": "forbidden", "message": "not on your plan"}})
        )
    );
    assert_eq!(sse(&t, "channel=public:open", &[]).await.0, 200);
    assert_eq!(sse(&t, "channel=elsewhere", &[]).await.0, 403);
    assert_eq!(service.on("/subscribe").len(), 5);
    assert!(service.on("/connect").is_empty());

    assert_eq!(hook_calls(&t, "subscribe", "deny").await, 2.0);
    assert_eq!(hook_calls(&t, "subscribe", "allow").await, 3.0);
}

#[tokio::test]
async fn the_publish_hook_may_replace_the_message_or_refuse_it() {
    let service = Service::start(|seen| {
        if seen.body["channel"] == "public:readonly" {
            return answer(json!({"allow": false, "reason": "read only"}));
        }
        match seen.body["data"]["text"].as_str() {
            Some(t) if t.contains("darn") => {
                answer(json!({"allow": true, "data": {"text": "****", "moderated": true}}))
            }
            _ => answer(json!({"allow": true})),
        }
    })
    .await;
    let t = edge(&service.url, &["publish"], |_| {}).await;
    let mut sub = t.connect().await;
    sub.subscribe(1, "public:chat").await;
    let mut publisher = t.connect().await;

    assert_eq!(
        publish(&mut publisher, 1, "public:chat", json!({"text": "darn it"})).await,
        json!({"id": 1, "ok": true})
    );
    let m = sub.recv().await;
    assert_eq!(m["op"], "message", "{m}");
    assert_eq!(m["data"], json!({"text": "****", "moderated": true}));
    // A message the service leaves alone goes out as sent.
    publish(&mut publisher, 2, "public:chat", json!({"text": "hi"})).await;
    assert_eq!(sub.recv().await["data"], json!({"text": "hi"}));
    // POST /publish goes through the same hook.
    let (status, body) = post(
        &t,
        json!({"channel": "public:chat", "data": {"text": "darn"}}),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        sub.recv().await["data"],
        json!({"text": "****", "moderated": true})
    );

    // Denied: `forbidden` with the reason, and nothing is published.
    assert_eq!(
        publish(&mut publisher, 3, "public:readonly", json!({"text": "x"})).await,
        forbidden(3, "read only")
    );
    assert_eq!(
        post(&t, json!({"channel": "public:readonly", "data": 1}), &[]).await,
        (
            403,
            json!({"error": {"code": "forbidden", "message": "read only"}})
        )
    );
    // The rules first: a channel they refuse is not sent to the service.
    let r = publish(&mut publisher, 4, "elsewhere", json!(1)).await;
    assert_eq!(r["error"]["code"], "forbidden", "{r}");

    let asked = service.on("/publish");
    assert_eq!(asked.len(), 5, "{asked:?}");
    assert_eq!(
        asked[0],
        json!({"session": publisher.welcome["session"], "transport": "websocket",
            "client": "127.0.0.1", "origin": null, "user": null, "channel": "public:chat",
            "data": {"text": "darn it"}})
    );
    assert_eq!(asked[2]["transport"], "publish");
    assert_eq!(hook_calls(&t, "publish", "allow").await, 3.0);
    assert_eq!(hook_calls(&t, "publish", "deny").await, 2.0);
    // The subscriber got exactly those three messages.
    let r = sub.request(json!({"id": 9, "op": "ping"})).await;
    assert_eq!(r, json!({"id": 9, "ok": true}));
    assert!(sub.held.is_empty(), "{:?}", sub.held);
}

#[tokio::test]
async fn the_disconnect_hook_hears_of_each_session_that_ends_with_its_id_and_user() {
    let service = Service::start(cookie_app).await;
    let t = edge(&service.url, &["connect", "disconnect"], |_| {}).await;
    let mut c = connect_with(&t, ALICE).await;
    let session = c.welcome["session"].clone();
    assert!(session.as_str().is_some_and(|s| !s.is_empty()), "{session}");
    assert_eq!(service.on("/connect")[0]["session"], session);
    assert!(service.on("/disconnect").is_empty(), "not before the end");
    c.ws.close(None).await.unwrap();
    let gone = service.wait_on("/disconnect", 1).await;
    assert_eq!(
        gone,
        [
            json!({"session": session, "transport": "websocket", "client": "127.0.0.1",
            "origin": null, "user": "alice"})
        ]
    );
    assert!(
        t.metrics_reach(
            &[(
                "edgeplex_hook_calls_total{hook=\"disconnect\",outcome=\"allow\"}",
                1.0
            )],
            common::TIMEOUT
        )
        .await
    );
}
