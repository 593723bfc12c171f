//! Identity and permissions end to end: the channel rules on every transport, their reload, and
//! the refusals a client sees, against a real edge with real clients.

mod common;

use std::time::Duration;

use common::sse_client::{self, client};
use common::{TestEdge, channel_rules, start};
use serde_json::{Value, json};

/// A rule set in the spirit of the examples: per-user channels, a paid feed, a public read-only
/// feed, and nothing else.
fn locked_down(f: &mut edgeplex::config::FileConfig) {
    channel_rules(
        f,
        &[
            ("user:{sub}:*", "authenticated", "authenticated"),
            ("user:*", "nobody", "nobody"),
            ("paid:*", "claim", "nobody"),
            ("news", "anyone", "nobody"),
            ("chat:*", "anyone", "anyone"),
        ],
    );
}

fn is_error(v: &Value, id: u64, code: &str) -> bool {
    v["id"] == id && v["error"]["code"] == code
}

#[tokio::test]
async fn anonymous_websocket_sessions_get_only_what_the_rules_give_anyone() {
    let t = start(locked_down).await;
    let mut c = t.connect().await;
    for (id, channel, code) in [
        (1, "user:alice:inbox", "forbidden"),
        (2, "user:x", "forbidden"),
        (3, "paid:gold", "forbidden"),
        (4, "elsewhere", "forbidden"),
    ] {
        let r = c
            .request(json!({"id": id, "op": "subscribe", "channel": channel}))
            .await;
        assert!(is_error(&r, id, code), "{channel}: {r}");
    }
    let r = c
        .request(json!({"id": 5, "op": "subscribe", "channel": "news"}))
        .await;
    assert_eq!(r, json!({"id": 5, "ok": true}));
    let r = c
        .request(json!({"id": 6, "op": "publish", "channel": "news", "data": 1}))
        .await;
    assert!(is_error(&r, 6, "forbidden"), "{r}");
    let r = c
        .request(json!({"id": 7, "op": "publish", "channel": "chat:1", "data": 1}))
        .await;
    assert_eq!(r, json!({"id": 7, "ok": true}));
    assert!(
        t.metric("edgeplex_permission_checks_total{op=\"subscribe\",decision=\"refused\"}")
            .await
            >= 4.0
    );
}

#[tokio::test]
async fn a_forbidden_channel_refuses_the_whole_sse_request_with_403() {
    let t = start(locked_down).await;
    let r = client(&t, false)
        .get(sse_client::url(&t, "channel=news&channel=paid:gold"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    // The allowed channel alone opens.
    let mut events = sse_client::open(&t, false, "channel=news", None).await;
    sse_client::welcome(&mut events).await;
}

#[tokio::test]
async fn post_publish_follows_the_rules_with_403_and_the_error_object() {
    let t = start(locked_down).await;
    let url = format!("https://localhost:{}/publish", t.edge.tls_addr().port());
    let post = |body: &'static str| {
        let c = client(&t, false);
        let url = url.clone();
        async move {
            let r = c.post(url).body(body).send().await.unwrap();
            let status = r.status().as_u16();
            (
                status,
                serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap(),
            )
        }
    };
    let (status, body) = post(r#"{"channel":"news","data":1}"#).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "forbidden", "{body}");
    let (status, _) = post(r#"{"channel":"chat:9","data":1}"#).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_token_on_an_edge_without_keys_is_refused_not_ignored() {
    let t = start(|_| {}).await;
    let port = t.edge.tls_addr().port();
    let r = client(&t, false)
        .get(format!(
            "https://localhost:{port}/sse?channel=a&token=abc.def.ghi"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
}

/// The rules reload like `[admission]`: a session that loses a permission leaves that channel
/// with a `forbidden` notice naming it, keeps its other channels, and gets nothing more from
/// the lost one.
#[tokio::test]
async fn a_reload_that_takes_a_channel_away_unsubscribes_with_a_notice() {
    use edgeplex::server::reload::{ConfigWatch, ReloadOutcome};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    let pem = dir.path().join("dev.pem");
    let write = |rules: &str| {
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"\"\nconfig_watch = \"0s\"\n\
                 [tls]\ndev_cert_path = \"{}\"\n[webtransport]\nenabled = false\n{rules}",
                pem.display()
            ),
        )
        .unwrap()
    };
    let open = "[[channels]]\nmatch = \"*\"\nsubscribe = \"anyone\"\npublish = \"anyone\"\n";
    let closed = "[[channels]]\nmatch = \"keep\"\nsubscribe = \"anyone\"\npublish = \"anyone\"\n\
                  [[channels]]\nmatch = \"*\"\nsubscribe = \"nobody\"\npublish = \"anyone\"\n";
    write(open);
    let config = edgeplex::Config::load(&path).unwrap();
    let t = TestEdge::from_edge(edgeplex::Edge::start(config).await.unwrap(), dir);
    let mut watch = ConfigWatch::new(path.clone(), t.edge.state().clone());

    let mut ws = t.connect().await;
    ws.subscribe(1, "keep").await;
    ws.subscribe(2, "lose").await;
    let mut sse = sse_client::open(&t, true, "channel=keep&channel=lose", None).await;
    sse_client::welcome(&mut sse).await;

    write(closed);
    match watch.reload("test").unwrap() {
        ReloadOutcome::Applied { channels, .. } => assert!(channels),
        other => panic!("{other:?}"),
    }
    let notice = ws.recv().await;
    assert_eq!(notice["op"], "error", "{notice}");
    assert_eq!(notice["channel"], "lose");
    assert_eq!(notice["error"]["code"], "forbidden");
    let e = sse_client::next(&mut sse).await;
    let notice = sse_client::data(&e);
    assert_eq!(
        (notice["op"].clone(), notice["channel"].clone()),
        (json!("error"), json!("lose"))
    );

    // Publishes on both: only the kept channel arrives, on both transports.
    let mut p = t.connect().await;
    for (id, channel) in [(1, "lose"), (2, "keep")] {
        let r = p
            .request(json!({"id": id, "op": "publish", "channel": channel, "data": id}))
            .await;
        assert_eq!(r["ok"], true, "{r}");
    }
    let m = ws.recv().await;
    assert_eq!(
        (m["channel"].clone(), m["data"].clone()),
        (json!("keep"), json!(2))
    );
    let m = sse_client::data(&sse_client::next(&mut sse).await);
    assert_eq!(
        (m["channel"].clone(), m["data"].clone()),
        (json!("keep"), json!(2))
    );
    // And a new subscribe to it is refused by the new rules.
    let r = ws
        .request(json!({"id": 9, "op": "subscribe", "channel": "lose"}))
        .await;
    assert!(is_error(&r, 9, "forbidden"), "{r}");
    // A reload that changes nothing in the rules says so.
    write(closed);
    match watch.reload("test").unwrap() {
        ReloadOutcome::Applied { channels, .. } => assert!(!channels),
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}
