//! Backend hooks: the existing service decides. `POST {hooks.url}/connect`, `/subscribe` and
//! `/publish` before those steps, `/disconnect` after a session ends (fire-and-forget).
//!
//! It owns the request body each hook sends, the reading of the service's answer into a
//! [`HookVerdict`], the node-wide cap on calls in flight, the disconnect queue and the hook
//! metrics. It decides nothing itself and touches no session, transport or bus: callers ask it
//! after the `[[channels]]` rules allowed a step (a hook can only narrow them) and map its
//! verdict to a refusal. It never logs a forwarded header, a body or a token: only the hook, the
//! outcome, the latency and why.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Uri};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{Semaphore, mpsc};

use super::ChannelGrants;
use crate::config::{HookFailure, HooksConfig};
use crate::metrics::{
    HookFailureLabels, HookLabels, HookName, HookOutcome, HookOutcomeLabels, Metrics,
};
use crate::outbound::{Outbound, OutboundError};

/// What a client refused as `unavailable` is told to wait before trying again.
pub const RETRY_AFTER_MS: u64 = 1000;
/// Disconnect calls waiting to be sent, at most; past it they are dropped and counted
/// (`edgeplex_hook_disconnects_dropped_total`), so a mass disconnect never holds memory.
pub const DISCONNECT_QUEUE: usize = 4096;
/// Disconnect calls in flight at once. Apart from `hooks.max_in_flight`, so a wave of
/// disconnects (a node draining) never makes new sessions' connect calls `overloaded`.
pub const DISCONNECT_CONCURRENCY: usize = 16;
/// The longest `user` a connect answer may give: it keys per-user limits and is logged.
pub const MAX_USER_BYTES: usize = 256;
/// A deny `reason` longer than this is cut: it goes back to the client and into logs.
pub const MAX_REASON_BYTES: usize = 256;
/// A failure warning per hook at most this often; every failure is counted.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A backend hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Connect,
    Subscribe,
    Publish,
    Disconnect,
}

impl Hook {
    pub const ALL: [Hook; 4] = [
        Hook::Connect,
        Hook::Subscribe,
        Hook::Publish,
        Hook::Disconnect,
    ];

    /// The name in `[hooks]`, in the service's URL and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Connect => "connect",
            Hook::Subscribe => "subscribe",
            Hook::Publish => "publish",
            Hook::Disconnect => "disconnect",
        }
    }

    fn label(self) -> HookName {
        match self {
            Hook::Connect => HookName::connect,
            Hook::Subscribe => HookName::subscribe,
            Hook::Publish => HookName::publish,
            Hook::Disconnect => HookName::disconnect,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What the service (or, when it could not answer, `hooks.failure`) decided.
#[derive(Debug)]
pub enum HookVerdict {
    Allow(HookAllow),
    /// A valid 2xx answer with `"allow": false`; `hooks.failure` never changes it.
    Deny {
        reason: String,
    },
    /// Over `hooks.max_in_flight`, or the service could not answer under `failure = "deny"`.
    Unavailable {
        retry_after_ms: u64,
    },
}

/// An allowed step, with what the answer added. Empty when the hook is off, or when the service
/// could not answer under `failure = "allow"`.
#[derive(Debug, Default)]
pub struct HookAllow {
    /// connect only: the session's user from now on.
    pub user: Option<String>,
    /// connect only: what the session may use, with the meaning of a token's `channels` claim.
    pub channels: Option<ChannelGrants>,
    /// publish only: the message to publish instead of the client's (any JSON).
    pub data: Option<Box<RawValue>>,
}

/// The facts a hook is told. Which fields go in the body depends on the hook: `headers` only to
/// connect, `channel` to subscribe and publish, `data` to publish.
#[derive(Clone, Copy)]
pub struct HookRequest<'a> {
    pub session: &'a str,
    /// "websocket", "sse", "webtransport", or "publish" for a stateless `POST /publish`.
    pub transport: &'static str,
    pub client: IpAddr,
    pub origin: Option<&'a str>,
    pub user: Option<&'a str>,
    pub channel: Option<&'a str>,
    pub data: Option<&'a RawValue>,
    /// The client's request headers; only the `hooks.forward_headers` are sent.
    pub headers: Option<&'a HeaderMap>,
}

impl std::fmt::Debug for HookRequest<'_> {
    // Headers carry cookies and tokens: their names only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookRequest")
            .field("session", &self.session)
            .field("transport", &self.transport)
            .field("client", &self.client)
            .field("origin", &self.origin)
            .field("user", &self.user)
            .field("channel", &self.channel)
            .field("data_bytes", &self.data.map(|d| d.get().len()))
            .field(
                "header_names",
                &self.headers.map(|h| h.keys().collect::<Vec<_>>()),
            )
            .finish()
    }
}

/// Why a call gave no usable answer.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{}", chain(.0))]
    Outbound(#[from] OutboundError),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("invalid answer: {0}")]
    Answer(String),
}

impl Failure {
    fn reason(&self) -> &'static str {
        match self {
            Failure::Outbound(e) => e.kind(),
            Failure::Status(_) => "status",
            Failure::Answer(_) => "answer",
        }
    }
}

/// An error with its causes: hyper's own message ("client error (Connect)") hides the useful
/// part ("Connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// One hook's metric handles, resolved once.
#[derive(Debug)]
struct HookMetrics {
    allow: Counter,
    deny: Counter,
    failure: Counter,
    overloaded: Counter,
    duration: Histogram,
}

/// What the calls and the disconnect worker share; the worker holds this, not [`Hooks`], so
/// dropping the last `Hooks` closes the queue and ends the worker.
#[derive(Debug)]
struct Caller {
    outbound: Outbound,
    timeout: Duration,
    max_answer_bytes: usize,
    metrics: Arc<Metrics>,
    per_hook: [HookMetrics; 4],
    warned: [parking_lot::Mutex<Option<Instant>>; 4],
}

impl Caller {
    /// Sends one call; the answer body of a 2xx.
    async fn send(&self, hook: Hook, url: &Uri, body: Bytes) -> Result<Bytes, Failure> {
        let started = Instant::now();
        let result = self
            .outbound
            .post_json(url, body, self.timeout, self.max_answer_bytes)
            .await;
        self.per_hook[hook.index()]
            .duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok((status, body)) if status.is_success() => Ok(body),
            Ok((status, _)) => Err(Failure::Status(status)),
            Err(e) => Err(Failure::Outbound(e)),
        }
    }

    fn failed(&self, hook: Hook, failure: &Failure) {
        self.per_hook[hook.index()].failure.inc();
        self.metrics
            .hook_failures
            .get_or_create(&HookFailureLabels {
                hook: hook.label(),
                reason: failure.reason(),
            })
            .inc();
        tracing::debug!(hook = hook.as_str(), error = %failure, "hook call failed");
        self.warn(hook, |hook| {
            tracing::warn!(
                hook,
                error = %failure,
                "hook call failed (counted in edgeplex_hook_failures_total; this warning at \
                 most every 10s)"
            )
        });
    }

    /// Runs `log` unless this hook warned within [`WARN_EVERY`]: a service that is down fails
    /// every call, and the log must not grow with the traffic.
    fn warn(&self, hook: Hook, log: impl FnOnce(&'static str)) {
        let now = Instant::now();
        let mut last = self.warned[hook.index()].lock();
        if last.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
            *last = Some(now);
            drop(last);
            log(hook.as_str());
        }
    }
}

/// The node's backend hooks. Shared in an `Arc` by every session and transport.
#[derive(Debug)]
pub struct Hooks {
    caller: Arc<Caller>,
    /// `{url}/<hook>` for each hook that is on.
    urls: [Option<Uri>; 4],
    failure: HookFailure,
    in_flight: Semaphore,
    forward_headers: Vec<HeaderName>,
    disconnects: Option<mpsc::Sender<Bytes>>,
}

impl Hooks {
    /// The hooks of `config`; `None` when no hook is on. With the disconnect hook on, spawns its
    /// worker, so it must be called within a tokio runtime. Fails only on the CA file.
    pub fn new(
        config: &HooksConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<Hooks>>, OutboundError> {
        let Some(base) = config.url.as_ref().filter(|_| config.any()) else {
            return Ok(None);
        };
        let outbound = Outbound::new(config.ca.as_deref())?;
        let mut urls: [Option<Uri>; 4] = Default::default();
        for (hook, on) in [
            (Hook::Connect, config.connect),
            (Hook::Subscribe, config.subscribe),
            (Hook::Publish, config.publish),
            (Hook::Disconnect, config.disconnect),
        ] {
            if on {
                urls[hook.index()] = Some(hook_url(base, hook)?);
            }
        }
        let per_hook = Hook::ALL.map(|hook| {
            let calls = |outcome| {
                metrics
                    .hook_calls
                    .get_or_create(&HookOutcomeLabels {
                        hook: hook.label(),
                        outcome,
                    })
                    .clone()
            };
            HookMetrics {
                allow: calls(HookOutcome::allow),
                deny: calls(HookOutcome::deny),
                failure: calls(HookOutcome::failure),
                overloaded: calls(HookOutcome::overloaded),
                duration: metrics
                    .hook_duration
                    .get_or_create(&HookLabels { hook: hook.label() })
                    .clone(),
            }
        });
        let caller = Arc::new(Caller {
            outbound,
            timeout: config.timeout,
            max_answer_bytes: config.max_answer_bytes,
            metrics,
            per_hook,
            warned: Default::default(),
        });
        let disconnects = urls[Hook::Disconnect.index()].clone().map(|url| {
            let (tx, rx) = mpsc::channel(DISCONNECT_QUEUE);
            tokio::spawn(drain_disconnects(rx, caller.clone(), url));
            tx
        });
        Ok(Some(Arc::new(Hooks {
            caller,
            urls,
            failure: config.failure,
            in_flight: Semaphore::new(config.max_in_flight),
            forward_headers: config.forward_headers.clone(),
            disconnects,
        })))
    }

    /// Whether `hook` is on: callers skip building a request for a hook that is off.
    pub fn wants(&self, hook: Hook) -> bool {
        self.urls[hook.index()].is_some()
    }

    /// Asks the service before a connect, subscribe or publish. `Allow` with nothing added when
    /// that hook is off. `Hook::Disconnect` is queued as [`Hooks::disconnected`] does.
    pub async fn call(&self, hook: Hook, req: &HookRequest<'_>) -> HookVerdict {
        if hook == Hook::Disconnect {
            self.disconnected(req);
            return HookVerdict::Allow(HookAllow::default());
        }
        let Some(url) = &self.urls[hook.index()] else {
            return HookVerdict::Allow(HookAllow::default());
        };
        let counters = &self.caller.per_hook[hook.index()];
        // Not queued: a step that waits for a slot would hold its client past any deadline the
        // client has, and the backlog would reach the service after it recovers.
        let Ok(_permit) = self.in_flight.try_acquire() else {
            counters.overloaded.inc();
            self.caller.warn(hook, |hook| {
                tracing::warn!(
                    hook,
                    "hooks.max_in_flight calls are in flight; steps are refused as unavailable \
                     (counted in edgeplex_hook_calls_total{{outcome=\"overloaded\"}}; this \
                     warning at most every 10s)"
                )
            });
            return HookVerdict::Unavailable {
                retry_after_ms: RETRY_AFTER_MS,
            };
        };
        let answer = match encode(hook, req, &self.forward_headers) {
            Ok(body) => self.caller.send(hook, url, body).await,
            Err(e) => Err(Failure::Answer(format!("cannot encode the request: {e}"))),
        }
        .and_then(|body| read_answer(hook, &body));
        match answer {
            Ok(Answer::Allow(allow)) => {
                counters.allow.inc();
                HookVerdict::Allow(allow)
            }
            Ok(Answer::Deny(reason)) => {
                counters.deny.inc();
                tracing::debug!(hook = hook.as_str(), reason, "hook denied");
                HookVerdict::Deny { reason }
            }
            Err(failure) => {
                self.caller.failed(hook, &failure);
                match self.failure {
                    HookFailure::Deny => HookVerdict::Unavailable {
                        retry_after_ms: RETRY_AFTER_MS,
                    },
                    HookFailure::Allow => HookVerdict::Allow(HookAllow::default()),
                }
            }
        }
    }

    /// Tells the service a session ended: queued, never waits. Dropped and counted when the
    /// queue is full. Nothing when the disconnect hook is off.
    pub fn disconnected(&self, req: &HookRequest<'_>) {
        let Some(queue) = &self.disconnects else {
            return;
        };
        let body = match encode(Hook::Disconnect, req, &self.forward_headers) {
            Ok(body) => body,
            Err(e) => {
                self.caller.failed(
                    Hook::Disconnect,
                    &Failure::Answer(format!("cannot encode the request: {e}")),
                );
                return;
            }
        };
        if queue.try_send(body).is_err() {
            self.caller.metrics.hook_disconnects_dropped.inc();
            self.caller.warn(Hook::Disconnect, |hook| {
                tracing::warn!(
                    hook,
                    "the disconnect hook's queue is full; calls are dropped (counted in \
                     edgeplex_hook_disconnects_dropped_total; this warning at most every 10s)"
                )
            });
        }
    }
}

/// Sends queued disconnect calls, [`DISCONNECT_CONCURRENCY`] at a time, until the queue closes.
/// Their answers are not read for a verdict: a 2xx counts as `allow`.
async fn drain_disconnects(mut queue: mpsc::Receiver<Bytes>, caller: Arc<Caller>, url: Uri) {
    let slots = Arc::new(Semaphore::new(DISCONNECT_CONCURRENCY));
    while let Some(body) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let caller = caller.clone();
        let url = url.clone();
        tokio::spawn(async move {
            match caller.send(Hook::Disconnect, &url, body).await {
                Ok(_) => {
                    caller.per_hook[Hook::Disconnect.index()].allow.inc();
                }
                Err(failure) => caller.failed(Hook::Disconnect, &failure),
            }
            drop(slot);
        });
    }
}

fn hook_url(base: &Uri, hook: Hook) -> Result<Uri, http::Error> {
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map_or("", |a| a.as_str());
    let path = base.path().trim_end_matches('/');
    Ok(format!("{scheme}://{authority}{path}/{}", hook.as_str()).parse::<Uri>()?)
}

/// The request body: the fields of design.md, and per hook only those that hook receives.
#[derive(Serialize)]
struct Body<'a> {
    session: &'a str,
    transport: &'a str,
    client: IpAddr,
    origin: Option<&'a str>,
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<Forwarded<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<Option<&'a str>>,
    /// Written as the client sent it: a large message is not parsed again.
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Option<&'a RawValue>>,
}

fn encode(
    hook: Hook,
    req: &HookRequest<'_>,
    forward: &[HeaderName],
) -> Result<Bytes, serde_json::Error> {
    let body = Body {
        session: req.session,
        transport: req.transport,
        client: req.client,
        origin: req.origin,
        user: req.user,
        headers: (hook == Hook::Connect).then_some(Forwarded {
            names: forward,
            headers: req.headers,
        }),
        channel: matches!(hook, Hook::Subscribe | Hook::Publish).then_some(req.channel),
        data: (hook == Hook::Publish).then_some(req.data),
    };
    serde_json::to_vec(&body).map(Bytes::from)
}

/// The `hooks.forward_headers` a request carried, as a JSON object of strings.
struct Forwarded<'a> {
    names: &'a [HeaderName],
    headers: Option<&'a HeaderMap>,
}

impl Serialize for Forwarded<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        let Some(headers) = self.headers else {
            return map.end();
        };
        for name in self.names {
            if let Some(value) = forwarded_value(headers, name) {
                map.serialize_entry(name.as_str(), &value)?;
            }
        }
        map.end()
    }
}

/// A header's values as one string, or `None` when absent. Non-UTF-8 values are skipped. HTTP/2
/// splits `cookie` into one header per cookie; they are joined back with `; ` (RFC 9113
/// 8.2.3), any other repeated header with `, `.
fn forwarded_value<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<Cow<'h, str>> {
    let separator = if name == http::header::COOKIE {
        "; "
    } else {
        ", "
    };
    let mut values = headers
        .get_all(name)
        .iter()
        .filter_map(|v| std::str::from_utf8(v.as_bytes()).ok());
    let first = values.next()?;
    let mut joined: Cow<'h, str> = Cow::Borrowed(first);
    for v in values {
        let s = joined.to_mut();
        s.push_str(separator);
        s.push_str(v);
    }
    Some(joined)
}

enum Answer {
    Allow(HookAllow),
    Deny(String),
}

/// The answer as the service writes it. Unknown fields are ignored, so the service may add its
/// own; a missing `allow` is not a decision and fails the call.
#[derive(Deserialize)]
struct Wire {
    allow: bool,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    channels: Option<ChannelGrants>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

/// Reads a 2xx answer. What a hook may not add (a `user` from publish, `data` from connect) is
/// ignored; what it adds that the edge cannot hold (a user with control characters, thousands
/// of grants) is the service's bug and fails the call.
fn read_answer(hook: Hook, body: &[u8]) -> Result<Answer, Failure> {
    // serde would also read a struct from an array (`[true]`); an answer is an object.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(Failure::Answer("not a JSON object".into()));
    }
    let wire: Wire = serde_json::from_slice(body).map_err(|e| {
        Failure::Answer(format!(
            "not {{\"allow\": true|false, …}} ({})",
            json_error_kind(&e)
        ))
    })?;
    if !wire.allow {
        return Ok(Answer::Deny(clean_reason(wire.reason.as_deref())));
    }
    let mut allow = HookAllow::default();
    if hook == Hook::Connect {
        if let Some(user) = wire.user {
            check_user(&user)?;
            allow.user = Some(user);
        }
        if let Some(channels) = wire.channels {
            check_grants(&channels)?;
            allow.channels = Some(channels);
        }
    }
    if hook == Hook::Publish {
        allow.data = wire.data;
    }
    Ok(Answer::Allow(allow))
}

/// The category of a JSON error only: its message would quote the service's text into logs.
fn json_error_kind(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "wrong fields or types",
        serde_json::error::Category::Eof => "cut short",
    }
}

fn check_user(user: &str) -> Result<(), Failure> {
    if user.is_empty() || user.len() > MAX_USER_BYTES || user.chars().any(char::is_control) {
        return Err(Failure::Answer(format!(
            "\"user\" must be 1 to {MAX_USER_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

fn check_grants(g: &ChannelGrants) -> Result<(), Failure> {
    // The same rules as a token's claim: names or prefixes of them followed by `*`, at most
    // MAX_GRANTS_PER_LIST per list. A bad pattern is the service's bug: a failure, not ignored.
    g.check()
        .map_err(|e| Failure::Answer(format!("\"channels\": {e}")))
}

/// A deny reason fit to show a client and to log: control characters replaced, at most
/// [`MAX_REASON_BYTES`].
fn clean_reason(reason: Option<&str>) -> String {
    let reason = reason.filter(|r| !r.trim().is_empty()).unwrap_or("denied");
    let mut out = String::with_capacity(reason.len().min(MAX_REASON_BYTES));
    for c in reason.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_REASON_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(headers: Option<&'a HeaderMap>, data: Option<&'a RawValue>) -> HookRequest<'a> {
        HookRequest {
            session: "s1",
            transport: "websocket",
            client: "192.0.2.7".parse().unwrap(),
            origin: None,
            user: Some("u"),
            channel: Some("chat:1"),
            data,
            headers,
        }
    }

    fn json(b: &Bytes) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn each_hook_gets_only_its_fields() {
        let mut h = HeaderMap::new();
        h.append("cookie", "a=1".parse().unwrap());
        h.append("cookie", "b=2".parse().unwrap());
        h.append("x-other", "no".parse().unwrap());
        h.append("x-bin", http::HeaderValue::from_bytes(b"\xff").unwrap());
        let names = [
            HeaderName::from_static("cookie"),
            HeaderName::from_static("x-bin"),
            HeaderName::from_static("authorization"),
        ];
        let data = RawValue::from_string("{\"n\": 1}".into()).unwrap();
        let r = req(Some(&h), Some(&data));
        let connect = json(&encode(Hook::Connect, &r, &names).unwrap());
        assert_eq!(
            connect,
            serde_json::json!({"session": "s1", "transport": "websocket", "client": "192.0.2.7",
                "origin": null, "user": "u", "headers": {"cookie": "a=1; b=2"}})
        );
        let publish = encode(Hook::Publish, &r, &names).unwrap();
        // Passed through as written, spacing included.
        assert!(
            std::str::from_utf8(&publish)
                .unwrap()
                .ends_with("\"channel\":\"chat:1\",\"data\":{\"n\": 1}}")
        );
        let subscribe = json(&encode(Hook::Subscribe, &req(None, None), &names).unwrap());
        assert_eq!(subscribe["channel"], "chat:1");
        assert!(subscribe.get("data").is_none() && subscribe.get("headers").is_none());
        let disconnect = json(&encode(Hook::Disconnect, &r, &names).unwrap());
        assert_eq!(disconnect.as_object().unwrap().len(), 5);
    }

    #[test]
    fn answers_are_read_strictly_where_the_edge_holds_them() {
        let allow = |hook, text: &str| match read_answer(hook, text.as_bytes()) {
            Ok(Answer::Allow(a)) => Ok(a),
            Ok(Answer::Deny(r)) => Err(r),
            Err(e) => Err(format!("failure: {e}")),
        };
        let a = allow(
            Hook::Connect,
            r#"{"allow":true,"user":"ann","channels":{"subscribe":["chat:*"]},"data":1,"extra":0}"#,
        )
        .unwrap();
        assert_eq!(a.user.as_deref(), Some("ann"));
        assert_eq!(a.channels.unwrap().subscribe, ["chat:*"]);
        assert!(a.data.is_none());
        let p = allow(Hook::Publish, r#"{"allow":true,"user":"x","data":[1, 2]}"#).unwrap();
        assert!(p.user.is_none());
        assert_eq!(p.data.unwrap().get(), "[1, 2]");
        for bad in [
            r#"{"allow":true,"user":"a\u0000b"}"#,
            r#"{"allow":true,"user":""}"#,
            r#"{"allow":"yes"}"#,
            r#"{"reason":"x"}"#,
            r#"[true]"#,
            "",
        ] {
            assert!(
                allow(Hook::Connect, bad)
                    .unwrap_err()
                    .starts_with("failure"),
                "{bad}"
            );
        }
        let long = format!(
            r#"{{"allow":true,"user":"{}"}}"#,
            "u".repeat(MAX_USER_BYTES + 1)
        );
        assert!(allow(Hook::Connect, &long).is_err());
        let many = format!(
            r#"{{"allow":true,"channels":{{"publish":[{}]}}}}"#,
            vec!["\"a\""; crate::auth::MAX_GRANTS_PER_LIST + 1].join(",")
        );
        assert!(allow(Hook::Connect, &many).is_err());
        // A pattern a claim could not hold either.
        let bad = r#"{"allow":true,"channels":{"subscribe":["room:*:x"]}}"#;
        assert!(allow(Hook::Connect, bad).is_err());
        let reason = allow(
            Hook::Subscribe,
            &format!(r#"{{"allow":false,"reason":"no\n{}"}}"#, "é".repeat(300)),
        )
        .unwrap_err();
        assert!(
            reason.starts_with("no é") && reason.len() <= MAX_REASON_BYTES,
            "{reason}"
        );
        assert_eq!(
            allow(Hook::Subscribe, r#"{"allow":false}"#).unwrap_err(),
            "denied"
        );
    }
}
