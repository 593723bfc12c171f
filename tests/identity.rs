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

// Tokens, minted by an independent library (jwt-simple, which shares no code with the edge's
// verifier), on every transport.

mod tokens {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use jwt_simple::prelude::{
        Claims, Duration as JsDuration, ECDSAP256KeyPairLike, ES256KeyPair, HS256Key, JWTClaims,
        MACLike, UnixTimeStamp,
    };
    use serde::Serialize;
    use serde_json::{Value, json};

    use super::common::sse_client::{self, client};
    use super::common::wt_client;
    use super::common::{self, Client, TestEdge, channel_rules, close_code, start};
    use super::is_error;

    pub const SECRET: &str = "a-shared-hmac-secret-of-32-bytes-or-more";

    #[derive(Serialize)]
    pub struct Extra {
        #[serde(skip_serializing_if = "Option::is_none")]
        channels: Option<Value>,
    }

    pub fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// Claims for `sub` expiring `exp` seconds from now (negative: in the past).
    pub fn claims(sub: &str, exp: i64, channels: Option<Value>) -> JWTClaims<Extra> {
        let mut c = Claims::with_custom_claims(Extra { channels }, JsDuration::from_secs(60));
        c.expires_at = Some(UnixTimeStamp::from_secs(now().saturating_add_signed(exp)));
        c.invalid_before = None;
        c.with_subject(sub)
    }

    pub fn hs(c: JWTClaims<Extra>) -> String {
        HS256Key::from_bytes(SECRET.as_bytes())
            .authenticate(c)
            .unwrap()
    }

    /// An edge whose sessions need a token signed by `key` (ES256, from a PEM file), with
    /// per-user channels and claim-granted paid channels.
    async fn es256_edge(key: &ES256KeyPair) -> TestEdge {
        let pem = key.public_key().to_pem().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.pem");
        std::fs::write(&path, pem).unwrap();
        let t = start(move |f| {
            f.auth.public_keys = path.display().to_string();
            f.auth.anonymous = false;
            channel_rules(
                f,
                &[
                    ("user:{sub}:*", "authenticated", "authenticated"),
                    ("paid:*", "claim", "nobody"),
                    ("chat:*", "authenticated", "authenticated"),
                ],
            );
        })
        .await;
        // The key file was read at start.
        drop(dir);
        t
    }

    fn es(key: &ES256KeyPair, c: JWTClaims<Extra>) -> String {
        key.sign(c).unwrap()
    }

    async fn ws_status(t: &TestEdge, path: &str, headers: &[(&str, &str)]) -> u16 {
        match t.try_connect_path(path, headers).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
            Err(e) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn every_transport_refuses_bad_tokens_before_the_handshake() {
        let key = ES256KeyPair::generate();
        let t = es256_edge(&key).await;
        let other = ES256KeyPair::generate();
        let alg_none = {
            use base64::Engine;
            let b =
                |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
            format!(
                "{}.{}.",
                b(json!({"alg": "none", "typ": "JWT"})),
                b(json!({"sub": "alice", "exp": now() + 600}))
            )
        };
        // An HS256 token "signed" with the public key's PEM as the secret.
        let confused = HS256Key::from_bytes(key.public_key().to_pem().unwrap().as_bytes())
            .authenticate(claims("alice", 600, None))
            .unwrap();
        let bad: Vec<(&str, String)> = vec![
            ("expired", es(&key, claims("alice", -120, None))),
            ("other key", es(&other, claims("alice", 600, None))),
            ("alg none", alg_none),
            ("algorithm confusion", confused),
            ("garbage", "not.a.token".into()),
        ];
        let port = t.edge.tls_addr().port();
        let wt_endpoint = || wt_client::client_endpoint(&t);
        assert_eq!(ws_status(&t, "/ws", &[]).await, 401, "no token");
        for (what, token) in &bad {
            let bearer = format!("Bearer {token}");
            assert_eq!(
                ws_status(&t, "/ws", &[("authorization", &bearer)]).await,
                401,
                "{what}"
            );
            assert_eq!(
                ws_status(&t, &format!("/ws?token={token}"), &[]).await,
                401,
                "{what}"
            );
            let r = client(&t, false)
                .get(format!(
                    "https://localhost:{port}/sse?channel=chat:1&token={token}"
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{what}");
            let r = client(&t, false)
                .post(format!("https://localhost:{port}/publish"))
                .header("authorization", &bearer)
                .body(r#"{"channel":"chat:1","data":1}"#)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "{what}");
            let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "unauthorized", "{what}");
            let e =
                wt_client::try_open_path(wt_endpoint(), &t, &format!("/wt?token={token}"), None)
                    .await
                    .err()
                    .unwrap_or_else(|| panic!("{what}: WebTransport opened"));
            // wtransport's client does not show the status; the edge's answer for a refused
            // token is 403 (Refusal table unit test), counted below with the others.
            assert!(e.contains("rejected"), "{what}: {e}");
        }
        // 1 without a token, then 5 per bad token: WebSocket (header, query), SSE, POST, WT.
        assert_eq!(
            t.metric("edgeplex_refusals_total{reason=\"unauthorized\"}")
                .await,
            1.0 + 5.0 * bad.len() as f64
        );
        // The refusals are counted by reason, never by token.
        let text = t.admin_get("/metrics").await.1;
        for reason in [
            "expired",
            "bad_signature",
            "algorithm",
            "malformed",
            "missing",
        ] {
            assert!(
                text.contains(&format!("edgeplex_tokens_total{{result=\"{reason}\"}}")),
                "{reason}: {text}"
            );
        }
    }

    #[tokio::test]
    async fn a_valid_token_opens_every_transport_with_its_user_and_claims() {
        let key = ES256KeyPair::generate();
        let t = es256_edge(&key).await;
        let token = es(
            &key,
            claims("alice", 600, Some(json!({"subscribe": ["paid:gold"]}))),
        );
        let bearer = format!("Bearer {token}");
        let mut ws = Client::welcomed(
            t.try_connect_with(&[("authorization", &bearer)])
                .await
                .unwrap(),
        )
        .await;
        for (id, channel, ok) in [
            (1, "user:alice:inbox", true),
            (2, "user:bob:inbox", false),
            (3, "paid:gold", true),
            (4, "paid:silver", false),
            (5, "chat:1", true),
        ] {
            let r = ws
                .request(json!({"id": id, "op": "subscribe", "channel": channel}))
                .await;
            if ok {
                assert_eq!(r, json!({"id": id, "ok": true}), "{channel}");
            } else {
                assert!(is_error(&r, id, "forbidden"), "{channel}: {r}");
            }
        }
        // ?token= works where headers cannot be set (browsers' WebSocket, EventSource, WT).
        let mut ws2 = Client::welcomed(
            t.try_connect_path(&format!("/ws?token={token}"), &[])
                .await
                .unwrap(),
        )
        .await;
        ws2.subscribe(1, "user:alice:inbox").await;
        let mut sse = sse_client::open(
            &t,
            false,
            &format!("channel=user:alice:inbox&token={token}"),
            None,
        )
        .await;
        sse_client::welcome(&mut sse).await;
        let port = t.edge.tls_addr().port();
        let r = client(&t, false)
            .get(format!(
                "https://localhost:{port}/sse?channel=user:bob:x&token={token}"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "another user's channel");
        let mut wt = wt_client::try_open_path(
            wt_client::client_endpoint(&t),
            &t,
            &format!("/wt?token={token}"),
            None,
        )
        .await
        .unwrap();
        let r = wt
            .request(json!({"id": 1, "op": "subscribe", "channel": "user:alice:inbox"}))
            .await;
        assert_eq!(r, json!({"id": 1, "ok": true}));
        let r = wt
            .request(json!({"id": 2, "op": "subscribe", "channel": "paid:silver"}))
            .await;
        assert!(is_error(&r, 2, "forbidden"), "{r}");
        // POST /publish with a bearer token, on the user's own channel.
        let r = client(&t, false)
            .post(format!("https://localhost:{port}/publish"))
            .header("authorization", &bearer)
            .body(r#"{"channel":"user:alice:inbox","data":{"n":1}}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        for pushed in [ws.recv().await, ws2.recv().await, wt.recv().await] {
            assert_eq!(pushed["data"], json!({"n": 1}), "{pushed}");
        }
        assert_eq!(
            sse_client::data(&sse_client::next(&mut sse).await)["data"],
            json!({"n": 1})
        );
    }

    /// An HS256 edge with no leeway, so a token expires on the second.
    async fn hs_edge(edit: impl FnOnce(&mut edgeplex::config::FileConfig)) -> TestEdge {
        start(|f| {
            f.auth.hmac_secret = SECRET.into();
            f.auth.leeway = Duration::ZERO;
            edit(f);
        })
        .await
    }

    #[tokio::test]
    async fn expiry_closes_with_4001_and_op_auth_refreshes() {
        let t = hs_edge(|_| {}).await;
        let short = || hs(claims("alice", 2, None));
        // Refreshed in band before it runs out: still open after the first token's expiry.
        let mut kept = Client::welcomed(
            t.try_connect_path(&format!("/ws?token={}", short()), &[])
                .await
                .unwrap(),
        )
        .await;
        kept.subscribe(1, "room").await;
        let mut left = Client::welcomed(
            t.try_connect_path(&format!("/ws?token={}", short()), &[])
                .await
                .unwrap(),
        )
        .await;
        left.subscribe(1, "room").await;
        let wt = wt_client::try_open_path(
            wt_client::client_endpoint(&t),
            &t,
            &format!("/wt?token={}", short()),
            None,
        )
        .await
        .unwrap();
        let r = kept
            .request(json!({"id": 2, "op": "auth", "token": hs(claims("alice", 600, None))}))
            .await;
        assert_eq!(r, json!({"id": 2, "ok": true}));
        // Another user's token, an expired one, garbage: refused, the session stays.
        for (id, token) in [
            (3, hs(claims("mallory", 600, None))),
            (4, hs(claims("alice", -60, None))),
            (5, "x.y.z".to_string()),
        ] {
            let r = kept
                .request(json!({"id": id, "op": "auth", "token": token}))
                .await;
            assert!(is_error(&r, id, "unauthorized"), "{r}");
        }
        // The unrefreshed sessions end with 4001 once exp passes.
        let (code, reason, _) = left.until_close().await;
        assert_eq!((code, reason.as_str()), (4001, "token expired"));
        assert_eq!(wt.closed().await, (4001, "token expired".to_string()));
        // The refreshed one still answers.
        let r = kept.request(json!({"id": 6, "op": "ping"})).await;
        assert_eq!(r, json!({"id": 6, "ok": true}));
        let _ = close_code;
    }

    #[tokio::test]
    async fn an_expired_sse_stream_ends_after_an_unauthorized_event_and_resumes_with_a_new_token() {
        let t = hs_edge(|_| {}).await;
        let mut sse = sse_client::open(
            &t,
            true,
            &format!("channel=feed&token={}", hs(claims("alice", 2, None))),
            None,
        )
        .await;
        let welcome = sse_client::welcome(&mut sse).await;
        let mut p = t.connect().await;
        let r = p
            .request(json!({"id": 1, "op": "publish", "channel": "feed", "data": 1}))
            .await;
        assert_eq!(r["ok"], true);
        let first = sse_client::next(&mut sse).await;
        assert_eq!(sse_client::data(&first)["data"], 1);
        let notice = sse_client::data(&sse_client::next(&mut sse).await);
        assert_eq!(notice["op"], "error", "{notice}");
        assert_eq!(notice["error"]["code"], "unauthorized");
        let end =
            tokio::time::timeout(common::TIMEOUT, futures_util::StreamExt::next(&mut sse)).await;
        assert!(matches!(end, Ok(None)), "the stream ends after the notice");
        // Published while the client was away; a new token and Last-Event-ID resume exactly.
        let r = p
            .request(json!({"id": 2, "op": "publish", "channel": "feed", "data": 2}))
            .await;
        assert_eq!(r["ok"], true);
        let _ = welcome;
        let mut again = sse_client::open(
            &t,
            true,
            &format!("channel=feed&token={}", hs(claims("alice", 600, None))),
            Some(&first.id),
        )
        .await;
        sse_client::welcome(&mut again).await;
        assert_eq!(
            sse_client::data(&sse_client::next(&mut again).await)["data"],
            2
        );
    }

    /// A POST over its address's message budget is refused before its token is checked: a
    /// flood of forged tokens buys no signature checks past the budget.
    #[tokio::test]
    async fn a_publish_over_the_address_budget_is_refused_before_its_token_is_read() {
        let t = hs_edge(|f| {
            f.limits.ip_messages.per_second = 1;
            f.limits.ip_messages.burst = 2;
        })
        .await;
        let port = t.edge.tls_addr().port();
        let mut statuses = Vec::new();
        for _ in 0..4 {
            let r = client(&t, false)
                .post(format!("https://localhost:{port}/publish"))
                .header("authorization", "Bearer forged.token.here")
                .body(r#"{"channel":"a","data":1}"#)
                .send()
                .await
                .unwrap();
            statuses.push(r.status().as_u16());
        }
        assert_eq!(statuses, [401, 401, 429, 429]);
        assert_eq!(
            t.metric("edgeplex_tokens_total{result=\"malformed\"}")
                .await,
            2.0,
            "only the requests within the budget had their token read"
        );
    }

    #[tokio::test]
    async fn per_user_limits_hold_across_sessions_and_addresses_do_not_matter() {
        let t = hs_edge(|f| {
            f.limits.user_sessions.max = 2;
            f.limits.user_messages.per_second = 1;
            f.limits.user_messages.burst = 3;
        })
        .await;
        let alice = hs(claims("alice", 600, None));
        let path = format!("/ws?token={alice}");
        let mut a1 = Client::welcomed(t.try_connect_path(&path, &[]).await.unwrap()).await;
        let mut a2 = Client::welcomed(t.try_connect_path(&path, &[]).await.unwrap()).await;
        assert_eq!(
            ws_status(&t, &path, &[]).await,
            429,
            "a third session of alice"
        );
        // Another user is not affected, nor is an anonymous session.
        let bob = hs(claims("bob", 600, None));
        let _b = Client::welcomed(
            t.try_connect_path(&format!("/ws?token={bob}"), &[])
                .await
                .unwrap(),
        )
        .await;
        let _anon = t.connect().await;
        // Alice's messages share one budget of 3 across her sessions.
        let mut answers = Vec::new();
        for i in 0..4 {
            let c = if i % 2 == 0 { &mut a1 } else { &mut a2 };
            answers.push(c.request(json!({"id": i, "op": "ping"})).await);
        }
        assert_eq!(
            answers[..3].iter().filter(|r| r["ok"] == true).count(),
            3,
            "{answers:?}"
        );
        assert!(is_error(&answers[3], 3, "rate_limited"), "{answers:?}");
        assert!(answers[3]["error"]["retry_after_ms"].as_u64().unwrap() > 0);
        // A session that ends gives its place back.
        drop(a2);
        let mut back = None;
        for _ in 0..50 {
            if let Ok(ws) = t.try_connect_path(&path, &[]).await {
                back = Some(ws);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(back.is_some(), "the closed session's place came back");
        assert!(
            t.metric(
                "edgeplex_admission_decisions_total{limit=\"user_sessions\",decision=\"refused\"}"
            )
            .await
                >= 1.0
        );
    }
}

/// A JWKS served over HTTP by the test (loopback `http://` is allowed for this): the edge
/// fetches it at start, keeps refetching while the provider is down (from 1 s, doubling), and
/// accepts tokens of its keys once a fetch succeeds.
mod jwks_url {
    use std::sync::Arc;
    use std::time::Duration;

    use base64::Engine;
    use jwt_simple::prelude::{ECDSAP256KeyPairLike, ECDSAP256PublicKeyLike, ES256KeyPair};
    use parking_lot::Mutex;
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::common::{Client, start};
    use super::tokens::claims;

    /// Serves `body` (`None`: answers 503) to every request.
    async fn provider(body: Arc<Mutex<Option<String>>>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let body = body.lock().clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let answer = match body {
                        Some(b) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\nconnection: close\r\n\r\n{b}",
                            b.len()
                        ),
                        None => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\
                                 connection: close\r\n\r\n"
                            .to_string(),
                    };
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    fn jwk(key: &ES256KeyPair, kid: &str) -> serde_json::Value {
        let point = key.public_key().public_key().to_bytes_uncompressed();
        let b = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": kid,
               "x": b(&point[1..33]), "y": b(&point[33..65])})
    }

    #[tokio::test]
    async fn a_jwks_url_is_fetched_and_refetched_until_the_provider_answers() {
        let body = Arc::new(Mutex::new(None));
        let addr = provider(body.clone()).await;
        let t = start(|f| {
            f.auth.jwks = format!("http://127.0.0.1:{}/jwks", addr.port());
            f.auth.anonymous = false;
        })
        .await;
        let key = ES256KeyPair::generate().with_key_id("k1");
        let token = key.sign(claims("alice", 600, None)).unwrap();
        let path = format!("/ws?token={token}");
        // The provider is down: no key set yet, the token cannot be checked.
        assert!(t.try_connect_path(&path, &[]).await.is_err());
        *body.lock() = Some(json!({"keys": [jwk(&key, "k1")]}).to_string());
        let mut opened = None;
        for _ in 0..100 {
            if let Ok(ws) = t.try_connect_path(&path, &[]).await {
                opened = Some(ws);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ws = opened.expect("the key set was fetched once the provider answered");
        Client::welcomed(ws).await;
        assert!(
            t.metric("edgeplex_jwks_fetches_total{result=\"failed\"}")
                .await
                >= 1.0
        );
        assert!(t.metric("edgeplex_jwks_fetches_total{result=\"ok\"}").await >= 1.0);
        // A kid the set does not hold is refused (as were the tries before the set came).
        let before = t
            .metric("edgeplex_tokens_total{result=\"unknown_kid\"}")
            .await;
        let other = ES256KeyPair::generate().with_key_id("k2");
        let token = other.sign(claims("alice", 600, None)).unwrap();
        assert!(
            t.try_connect_path(&format!("/ws?token={token}"), &[])
                .await
                .is_err()
        );
        assert_eq!(
            t.metric("edgeplex_tokens_total{result=\"unknown_kid\"}")
                .await,
            before + 1.0
        );
    }
}
