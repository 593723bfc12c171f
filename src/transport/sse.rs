//! Server-Sent Events: `GET /sse?channel=a&channel=b` adapts a streaming HTTP response (HTTP/1.1
//! or HTTP/2) to a [`Session`].
//!
//! This file owns the SSE request checks and the event stream: a `retry:` hint and the welcome
//! event first, then every push as one event (`id:` its offset, `data:` the push object), and a
//! comment line on `session.sse_heartbeat` so proxies keep the stream open. A client resumes with
//! `Last-Event-ID` (what EventSource sends by itself) or `?since=`. That is exact for a stream of
//! one channel. One id cannot say where each of several channels was (their offsets are not
//! ordered against each other), so a stream of several channels resumes with a gap notice per
//! channel instead of guessing. Admission policy, protocol meaning and fan-out are not here.
//!
//! A stream ends when its client goes, when its outbox overflows (a slow reader: it reconnects and
//! resumes), or at shutdown.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use crate::admission::Refusal;
use crate::metrics::{ReasonLabels, Transport, TransportLabels};
use crate::protocol::{self, Channel, ErrorCode, Frame, Offset};
use crate::server::routes::{
    ConnInfo, ConnSlot, InFlight, admit_origin, allow_origin, json_error, refusal_response, text,
};
use crate::server::{Body, EdgeState};
use crate::session::{Outbox, OutboxStatus, Session};

const HEARTBEAT: &[u8] = b": keep-alive\n\n";

/// Answers `GET /sse`: checks the request and admission, subscribes, and streams.
pub async fn accept(
    req: Request<Incoming>,
    state: Arc<EdgeState>,
    info: ConnInfo,
) -> Response<Body> {
    if req.method() != Method::GET {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET to open an event stream\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    let origin = match admit_origin(req.headers(), &state, &info, "sse") {
        Ok(origin) => origin,
        Err(refused) => return refused,
    };
    let (channels, since) = match parse_request(req.uri().query(), req.headers()) {
        Ok(x) => x,
        Err(msg) => return json_error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &msg),
    };
    if channels.len() > state.config.session.max_channels {
        return refusal_response(&Refusal::TooLarge, &state);
    }
    let slot = match state.take_session_slot() {
        Ok(slot) => slot,
        Err(refusal) => return refusal_response(&refusal, &state),
    };

    let mut session = Session::open(state.sessions.clone(), Transport::sse);
    let several = channels.len() > 1;
    for channel in channels {
        let (since, first) = match since {
            Some(_) if several => (None, vec![protocol::encode_gap(&channel)]),
            since => (since, Vec::new()),
        };
        if let Err(e) = session.join(channel, since, first).await {
            let refusal = match e.code {
                ErrorCode::TooLarge => Refusal::TooLarge,
                _ => Refusal::BusDown,
            };
            tracing::info!(peer = %info.peer, error = %e.message, "sse refused");
            return refusal_response(&refusal, &state);
        }
    }
    tracing::info!(
        session = %session.public_id(),
        peer = %info.peer,
        transport = "sse",
        since = ?since,
        "session open"
    );

    let cfg = &state.config.session;
    let mut first = BytesMut::new();
    first.put_slice(format!("retry: {}\n\n", cfg.sse_retry.as_millis()).as_bytes());
    let mut heartbeat =
        tokio::time::interval_at(Instant::now() + cfg.sse_heartbeat, cfg.sse_heartbeat);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let labels = TransportLabels {
        transport: Transport::sse,
    };
    let events = EventStream {
        outbox: session.outbox().clone(),
        session,
        first: Some(first.freeze()),
        heartbeat,
        shutdown: state.shutdown.clone(),
        batch: Vec::new(),
        done: false,
        messages_out: state.metrics.messages_out.get_or_create(&labels).clone(),
        state: state.clone(),
        _slot: slot,
        _conn: info.permit.clone(),
        _in_flight: info.activity.as_ref().map(|a| a.begin()),
    };
    if let Some(kill) = info.kill.clone() {
        tokio::spawn(watch_for_stall(
            events.outbox.clone(),
            kill,
            cfg.write_timeout,
        ));
    }
    let body = stream::unfold(events, |mut ev| async move {
        let chunk = ev.next_chunk().await?;
        Some((Ok(hyper::body::Frame::data(chunk)), ev))
    });

    let mut resp = Response::new(StreamBody::new(body).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // EventSource from another origin needs this; the origin was checked above.
    allow_origin(h, origin);
    resp
}

/// `channel` (repeated, at least one) and `since` from the query; `Last-Event-ID` wins over
/// `since`, since it is where the stream actually got to.
fn parse_request(
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<(Vec<Channel>, Option<Offset>), String> {
    let mut channels: Vec<Channel> = Vec::new();
    let mut since = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "channel" => {
                let c = Channel::new(&v).map_err(|e| format!("channel {v:?}: {e}"))?;
                if !channels.contains(&c) {
                    channels.push(c);
                }
            }
            "since" => {
                since = Some(v.parse::<Offset>().map_err(|e| format!("since: {e}"))?);
            }
            _ => {}
        }
    }
    if let Some(id) = headers.get("last-event-id") {
        let id = id
            .to_str()
            .map_err(|_| "Last-Event-ID is not text".to_string())?;
        // An empty Last-Event-ID means the stream never saw an id: fall back to `since`.
        if !id.is_empty() {
            since = Some(
                id.parse::<Offset>()
                    .map_err(|e| format!("Last-Event-ID: {e}"))?,
            );
        }
    }
    if channels.is_empty() {
        return Err("name at least one channel: /sse?channel=NAME[&channel=NAME…]".into());
    }
    Ok((channels, since))
}

/// Drops the connection of a stream whose client stopped reading. hyper polls a body only when
/// it can write, so the stream itself never notices: its queue overflows or its oldest frame
/// waits past `session.write_timeout`, and this task cuts the connection, which frees the
/// session, its slots and its subscriptions. Ends with the session (its outbox closes).
async fn watch_for_stall(outbox: Arc<Outbox>, kill: CancellationToken, write_timeout: Duration) {
    let mut tick = tokio::time::interval(write_timeout / 4);
    loop {
        tokio::select! {
            _ = kill.cancelled() => return,
            _ = tick.tick() => {}
        }
        match outbox.stall() {
            (OutboxStatus::Closed, _) => return,
            (OutboxStatus::Overflowed, _) => break,
            (OutboxStatus::Open, waited) if waited > write_timeout => break,
            (OutboxStatus::Open, _) => {}
        }
    }
    kill.cancel();
}

/// The open stream: owns the session (dropping it unsubscribes) and every slot it holds.
struct EventStream {
    session: Session,
    outbox: Arc<Outbox>,
    first: Option<Bytes>,
    heartbeat: Interval,
    shutdown: CancellationToken,
    batch: Vec<Frame>,
    done: bool,
    messages_out: Counter,
    state: Arc<EdgeState>,
    _slot: OwnedSemaphorePermit,
    _conn: Option<Arc<ConnSlot>>,
    _in_flight: Option<InFlight>,
}

impl EventStream {
    /// The next bytes to send, or `None` to end the stream.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        if self.done {
            return None;
        }
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return self.end("shutdown"),
                _ = self.outbox.ready() => {
                    match self.outbox.drain(&mut self.batch) {
                        OutboxStatus::Open => {}
                        OutboxStatus::Overflowed => {
                            self.state
                                .metrics
                                .slow_consumer_closes
                                .get_or_create(&TransportLabels { transport: Transport::sse })
                                .inc();
                            return self.end("slow_consumer");
                        }
                        OutboxStatus::Closed => return self.end("client"),
                    }
                    if self.batch.is_empty() {
                        continue;
                    }
                    self.messages_out.inc_by(self.batch.len() as u64);
                    // One chunk per wake-up; a single event goes out without a copy.
                    let chunk = if self.batch.len() == 1 {
                        self.batch[0].sse_event()
                    } else {
                        let mut buf = BytesMut::new();
                        for f in &self.batch {
                            buf.put_slice(&f.sse_event());
                        }
                        buf.freeze()
                    };
                    self.batch.clear();
                    return Some(chunk);
                }
                _ = self.heartbeat.tick() => return Some(Bytes::from_static(HEARTBEAT)),
            }
        }
    }

    fn end(&mut self, reason: &'static str) -> Option<Bytes> {
        self.done = true;
        tracing::debug!(session = %self.session.public_id(), reason, "sse stream ends");
        self.state
            .metrics
            .session_closes
            .get_or_create(&ReasonLabels { reason })
            .inc();
        None
    }
}
