//! Server-Sent Events: `GET /sse?channel=a&channel=b` adapts a streaming HTTP response (HTTP/1.1,
//! HTTP/2 or HTTP/3) to a [`Session`].
//!
//! This file owns the SSE request checks and the event stream: a `retry:` hint and the welcome
//! event first, then every push as one event (`id:` its offset, `data:` the push object), and a
//! comment line on `session.sse_heartbeat` so proxies keep the stream open. Admission policy,
//! protocol meaning and fan-out are not here.
//!
//! Resume: the event id is the stream's position, one entry per channel in the order of the URL,
//! joined by commas: the offset of the last message delivered on that channel, or `-` when the
//! channel had no history. A stream of one channel thus uses plain offsets, as WebSocket does.
//! Offsets of different channels are not ordered against each other, so one offset could not say
//! where each channel was. The welcome event carries the starting position, read from each
//! channel's history at the switch-over to live, so a client that got nothing but the welcome
//! still resumes exactly. EventSource sends the last id back as `Last-Event-ID` by itself; a
//! client may also pass it as `?since=`. In a `since` an empty entry names a channel the client
//! adds with this request (a client changes its set by reopening the stream, as
//! `clients/js/edgeplex.js` does): that channel starts from now, as a first subscribe, while the
//! others resume.
//!
//! A stream ends when its client goes, when its outbox overflows (a slow reader: it reconnects and
//! resumes), or at shutdown. A client that stops reading altogether is cut off by a watcher the
//! moment its outbox overflows: over HTTP/2 and HTTP/3 its stream alone is reset (a proxy's or a
//! browser's connection carries other streams), over HTTP/1.1 its connection is dropped.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;

use crate::admission::Refusal;
use crate::bus::hub::Start;
use crate::metrics::{Transport, TransportLabels};
use crate::outbox::{Outbox, OutboxStatus};
use crate::protocol::{self, Channel, ErrorCode, Frame, Offset, OffsetError};
use crate::session::{CloseReason, JoinError, Session};
use crate::state::EdgeState;
use crate::web::conn::stream_kill;
use crate::web::request::{admit_http_session, admit_origin};
use crate::web::response::{allow_origin, gate_refusal_response, refusal_response};
use crate::web::{Body, ConnInfo, ConnSlot, InFlight, json_error, text};

const HEARTBEAT: &[u8] = b": keep-alive\n\n";

/// Answers `GET /sse`: checks the request and admission, subscribes, and streams.
pub async fn accept<B>(req: Request<B>, state: Arc<EdgeState>, info: ConnInfo) -> Response<Body> {
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
    let (channels, resume) = match parse_request(req.uri().query(), req.headers()) {
        Ok(x) => x,
        Err(msg) => return json_error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, &msg),
    };
    if channels.len() > state.config.session.max_channels {
        return refusal_response(&Refusal::TooLarge, &state);
    }
    let (admitted, slot) =
        match admit_http_session(&req, &state, &info, Transport::sse, origin.as_deref()).await {
            Ok(admitted) => admitted,
            Err(refused) => return refused,
        };
    let client = *admitted.ticket.client();

    let mut session = Session::open(state.sessions.clone(), Transport::sse, admitted);
    // Watched from before the joins: a reload while they run (each may ask a hook) still
    // reaches this stream.
    let rules = session.rules_watch();
    // A position that does not name every channel (an id from another URL, a hand-made
    // `since`) cannot be trusted for any of them: each channel starts afresh behind a gap.
    let mismatch = resume.as_ref().is_some_and(|r| r.is_empty());
    let mut positions = Vec::with_capacity(channels.len());
    for (i, channel) in channels.iter().enumerate() {
        let (start, first) = match resume.as_ref().and_then(|r| r.get(i)) {
            Some(Resume::After(since)) => (Start::After(*since), Vec::new()),
            Some(Resume::NoHistory) => (Start::Oldest, Vec::new()),
            Some(Resume::New) => (Start::Newest, Vec::new()),
            None if mismatch => (Start::Newest, vec![protocol::encode_gap(channel)]),
            None => (Start::Newest, Vec::new()),
        };
        match session.join(channel.clone(), start, first).await {
            // Where the client is before the replay queued behind the welcome event.
            Ok(newest) => positions.push(match start {
                Start::After(since) => Some(since),
                Start::Oldest => None,
                Start::Newest | Start::Live => newest,
            }),
            Err(JoinError {
                gate: Some(refusal),
                ..
            }) => {
                tracing::info!(peer = %info.peer, reason = refusal.reason(), "sse refused");
                return gate_refusal_response(&refusal, &state);
            }
            Err(e) => {
                let refusal = match e.code {
                    ErrorCode::TooLarge => Refusal::TooLarge,
                    ErrorCode::RateLimited => Refusal::RateLimited {
                        retry_after: Duration::from_millis(e.retry_after_ms.unwrap_or(1000)),
                    },
                    _ => Refusal::BusDown,
                };
                tracing::info!(peer = %info.peer, error = %e.message, "sse refused");
                return refusal_response(&refusal, &state);
            }
        }
    }
    tracing::info!(
        session = %session.public_id(),
        peer = %info.peer,
        client = %client.ip,
        transport = "sse",
        resumed = resume.is_some() && !mismatch,
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
        rules,
        outbox: session.outbox().clone(),
        session,
        first: Some(first.freeze()),
        heartbeat,
        shutdown: state.shutdown.clone(),
        batch: Vec::new(),
        channels,
        positions,
        welcome_sent: false,
        done: false,
        messages_out: state.metrics.messages_out.get_or_create(&labels).clone(),
        state: state.clone(),
        _slot: slot,
        _conn: info.permit.clone(),
        _in_flight: info.activity.as_ref().map(|a| a.begin()),
    };
    // Over HTTP/2 and HTTP/3 the stream is one of the connection's; over HTTP/1.1 it is the
    // connection.
    let kill = match req.version() {
        http::Version::HTTP_2 | http::Version::HTTP_3 => stream_kill(),
        _ => None,
    };
    if let Some(kill) = kill.or_else(|| info.kill.clone()) {
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

/// A stream's position: per channel, in URL order, the offset it got to (`None`: no history).
type Positions = Vec<Option<Offset>>;

/// The position entry of a channel that had no history.
const NO_HISTORY: &str = "-";

/// Where a client says it is on one channel when it opens a stream: one entry of its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// The offset of the last message it got.
    After(Offset),
    /// `-`: it saw the channel when the channel had no history.
    NoHistory,
    /// Empty: it adds the channel with this request, so it wants what comes from now on.
    New,
}

fn parse_positions(s: &str) -> Result<Vec<Resume>, OffsetError> {
    s.split(',')
        .map(|p| match p {
            NO_HISTORY => Ok(Resume::NoHistory),
            "" => Ok(Resume::New),
            p => p.parse().map(Resume::After),
        })
        .collect()
}

fn put_id(buf: &mut BytesMut, positions: &[Option<Offset>]) {
    buf.put_slice(b"id: ");
    for (i, p) in positions.iter().enumerate() {
        if i > 0 {
            buf.put_u8(b',');
        }
        match p {
            Some(o) => buf.put_slice(o.to_string().as_bytes()),
            None => buf.put_slice(NO_HISTORY.as_bytes()),
        }
    }
    buf.put_u8(b'\n');
}

/// `channel` (repeated, at least one) and the position to resume from: `Last-Event-ID` wins over
/// `since`, since it is where the stream actually got to. A position whose number of entries is
/// not the number of channels comes back empty.
fn parse_request(
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<(Vec<Channel>, Option<Vec<Resume>>), String> {
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
                since = Some(parse_positions(&v).map_err(|e| format!("since: {e}"))?);
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
            since = Some(parse_positions(id).map_err(|e| format!("Last-Event-ID: {e}"))?);
        }
    }
    if channels.is_empty() {
        return Err("name at least one channel: /sse?channel=NAME[&channel=NAME…]".into());
    }
    if let Some(p) = &mut since
        && p.len() != channels.len()
    {
        p.clear();
    }
    Ok((channels, since))
}

/// Ends a stream whose client stopped reading. hyper polls a body only when the client has
/// window for it, so the stream itself never notices: its queue overflows (acted on at once) or
/// its oldest frame waits past `session.write_timeout` (checked every quarter of it), and this
/// task cancels `kill`, which resets the HTTP/2 stream or drops the HTTP/1.1 connection and so
/// frees the session, its slots and its subscriptions. Ends with the session (its outbox
/// closes).
async fn watch_for_stall(outbox: Arc<Outbox>, kill: CancellationToken, write_timeout: Duration) {
    let mut tick = tokio::time::interval(write_timeout / 4);
    loop {
        tokio::select! {
            _ = kill.cancelled() => return,
            status = outbox.ended() => match status {
                OutboxStatus::Closed => return,
                OutboxStatus::Open | OutboxStatus::Overflowed => break,
            },
            _ = tick.tick() => {
                if let (OutboxStatus::Open, waited) = outbox.stall()
                    && waited > write_timeout
                {
                    // Counted as a slow consumer when the stream is dropped.
                    outbox.mark_slow();
                    break;
                }
            }
        }
    }
    tracing::info!("ending an event stream whose client stopped reading");
    kill.cancel();
}

/// The open stream: owns the session (dropping it unsubscribes) and every slot it holds.
struct EventStream {
    session: Session,
    /// Changes when the channel rules are reloaded.
    rules: tokio::sync::watch::Receiver<u64>,
    outbox: Arc<Outbox>,
    first: Option<Bytes>,
    heartbeat: Interval,
    shutdown: CancellationToken,
    batch: Vec<Frame>,
    /// The stream's channels in URL order, and where the client is on each (see the module doc).
    channels: Vec<Channel>,
    positions: Positions,
    welcome_sent: bool,
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
                _ = self.shutdown.cancelled() => return self.end(Some(CloseReason::SHUTDOWN)),
                // Before the outbox: a busy channel keeps it ready, and would otherwise starve
                // the token's expiry and the rules' reloads.
                closed = self.session.identity_changed(&mut self.rules) => {
                    let Some(reason) = closed else { continue };
                    let notice = protocol::encode_notice(
                        None,
                        ErrorCode::Unauthorized,
                        "token expired; reconnect with a new token and Last-Event-ID",
                    );
                    self.state.metrics.error(ErrorCode::Unauthorized);
                    self.count_end(Some(reason));
                    return Some(notice.sse_event());
                }
                _ = self.outbox.ready() => {
                    match self.outbox.drain(&mut self.batch) {
                        OutboxStatus::Open => {}
                        OutboxStatus::Overflowed => {
                            return self.end(Some(CloseReason::SLOW_CONSUMER));
                        }
                        OutboxStatus::Closed => return self.end(None),
                    }
                    if self.batch.is_empty() {
                        continue;
                    }
                    self.messages_out.inc_by(self.batch.len() as u64);
                    // One chunk per wake-up; a single shared event goes out without a copy.
                    let batch = std::mem::take(&mut self.batch);
                    let chunk = if let [f] = &batch[..] {
                        self.event(f)
                    } else {
                        let mut buf = BytesMut::new();
                        for f in &batch {
                            buf.put_slice(&self.event(f));
                        }
                        buf.freeze()
                    };
                    self.batch = batch;
                    self.batch.clear();
                    return Some(chunk);
                }
                _ = self.heartbeat.tick() => return Some(Bytes::from_static(HEARTBEAT)),
            }
        }
    }

    /// The event for one frame, with the stream's position as its id where that moved. A stream
    /// of one channel shares the frame's own event (its id is the offset); a stream of several
    /// writes its own id line in front of the shared `data:` line. Frames without an offset (a
    /// reply, a gap notice, a backend's raw publish) carry no id, so the last one stays.
    fn event(&mut self, f: &Frame) -> Bytes {
        if !self.welcome_sent {
            // The session queues its welcome first.
            self.welcome_sent = true;
            return self.with_id(f);
        }
        let Some((channel, offset)) = f.position() else {
            return f.sse_event();
        };
        let Some(i) = self.channels.iter().position(|c| c == channel) else {
            return f.sse_event();
        };
        self.positions[i] = Some(offset);
        if self.channels.len() == 1 {
            f.sse_event()
        } else {
            self.with_id(f)
        }
    }

    fn with_id(&self, f: &Frame) -> Bytes {
        let data = f.sse_data();
        let mut buf = BytesMut::with_capacity(data.len() + 24 * self.positions.len() + 8);
        put_id(&mut buf, &self.positions);
        buf.put_slice(&data);
        buf.freeze()
    }

    /// Ends the stream; `None`: the client went away.
    fn end(&mut self, reason: Option<CloseReason>) -> Option<Bytes> {
        self.count_end(reason);
        None
    }

    fn count_end(&mut self, reason: Option<CloseReason>) {
        self.done = true;
        let label = reason.as_ref().map_or("client", CloseReason::label);
        tracing::debug!(session = %self.session.public_id(), reason = label, "sse stream ends");
        CloseReason::count(reason.as_ref(), Transport::sse, &self.state.metrics);
    }
}

impl Drop for EventStream {
    /// hyper drops the body without polling it again when the client goes away, or when the
    /// stall watcher ended the stream; then the outbox says the client was too slow.
    fn drop(&mut self) {
        if !self.done {
            let reason = match self.outbox.stall().0 {
                OutboxStatus::Overflowed => Some(CloseReason::SLOW_CONSUMER),
                OutboxStatus::Open | OutboxStatus::Closed => None,
            };
            self.count_end(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_names_each_channel_and_an_empty_entry_is_a_channel_added_now() {
        let (channels, resume) = parse_request(
            Some("channel=a&channel=b&channel=c&since=1-2,,-"),
            &HeaderMap::new(),
        )
        .unwrap();
        assert_eq!(channels.len(), 3);
        let at = Offset { epoch: 1, seq: 2 };
        assert_eq!(
            resume.unwrap(),
            [Resume::After(at), Resume::New, Resume::NoHistory]
        );
        // Last-Event-ID wins; a count that differs from the channels' names none of them.
        let mut h = HeaderMap::new();
        h.insert("last-event-id", HeaderValue::from_static("1-2,-"));
        let (_, resume) = parse_request(Some("channel=a&channel=b&since=,"), &h).unwrap();
        assert_eq!(resume.unwrap(), [Resume::After(at), Resume::NoHistory]);
        let (_, resume) = parse_request(Some("channel=a&since=1-2,"), &HeaderMap::new()).unwrap();
        assert!(resume.unwrap().is_empty());
        assert!(parse_request(Some("channel=a&since=x"), &HeaderMap::new()).is_err());
    }
}
