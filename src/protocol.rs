//! The client protocol of `shared/design.md`: decoding client frames and encoding edge frames.
//!
//! This module owns the wire vocabulary (ops, error codes, channel names, offsets) and nothing else:
//! it does no I/O, keeps no state and never panics on input, so the fuzz target in `fuzz/` drives
//! [`decode`] directly. Transports call it with the bytes of one frame (a WebSocket text message, one
//! WebTransport line) and frame its output themselves.
//!
//! Decoding is two-phase on purpose: the frame is first split into its known fields as raw JSON,
//! then each field is checked on its own. That way a frame with a bad `channel` still gets an error
//! reply that carries its `id`, and the error names the field that was wrong. Unknown fields are
//! ignored so that newer clients can talk to older edges.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Longest channel name, in bytes (design.md: 1–200 characters, all ASCII).
pub const MAX_CHANNEL_LEN: usize = 200;

/// The server string sent in the welcome frame.
pub const SERVER_NAME: &str = concat!("edgeplex/", env!("CARGO_PKG_VERSION"));

/// Error codes of the protocol. The set is closed: clients switch on these strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    UnknownOp,
    TooLarge,
    RateLimited,
    Forbidden,
    NotSubscribed,
    Unavailable,
    Internal,
    /// No valid token: a refused `auth` op, or a token that expired.
    Unauthorized,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Forbidden,
        ErrorCode::NotSubscribed,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::Unauthorized,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthorized => "unauthorized",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated channel name. Cheap to clone: the hub keys its table with it and every push
/// refers to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(Arc<str>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LEN} characters")]
    TooLong,
    #[error("channel name has the character {0:?}; allowed are A-Z a-z 0-9 and _ . : @ / -")]
    BadChar(char),
}

impl Channel {
    pub fn new(name: &str) -> Result<Channel, ChannelError> {
        if name.is_empty() {
            return Err(ChannelError::Empty);
        }
        if let Some(c) = name.chars().find(|c| !is_channel_char(*c)) {
            return Err(ChannelError::BadChar(c));
        }
        // Checked after the characters so that the length in bytes is the length in characters.
        if name.len() > MAX_CHANNEL_LEN {
            return Err(ChannelError::TooLong);
        }
        Ok(Channel(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for Channel {
    fn borrow(&self) -> &str {
        &self.0
    }
}

pub fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '@' | '/' | '-')
}

/// A position in a channel's sequence of messages. Clients see it as an opaque string
/// `"<epoch>-<seq>"`; only the edge compares offsets. The shape is that of a Redis stream id on
/// purpose, so the Redis bus can use stream ids as offsets without a second scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset {
    pub epoch: u64,
    pub seq: u64,
}

impl Offset {
    pub const ZERO: Offset = Offset { epoch: 0, seq: 0 };
    pub const MAX: Offset = Offset {
        epoch: u64::MAX,
        seq: u64::MAX,
    };
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("offset must look like \"<number>-<number>\" as the edge sent it")]
pub struct OffsetError;

impl FromStr for Offset {
    type Err = OffsetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s.split_once('-').ok_or(OffsetError)?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(a) || !digits(b) {
            return Err(OffsetError);
        }
        Ok(Offset {
            epoch: a.parse().map_err(|_| OffsetError)?,
            seq: b.parse().map_err(|_| OffsetError)?,
        })
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.seq)
    }
}

/// How a subscription's pushes travel. `Datagram` (WebTransport only): as unreliable datagrams,
/// for latest-value feeds; a push too large for a datagram goes down the stream instead.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Delivery {
    #[default]
    Stream,
    Datagram,
}

/// A decoded client frame. `data` borrows from the input frame: publishing does not copy the
/// payload until it is encoded into the push that every subscriber shares.
#[derive(Debug)]
pub enum ClientFrame<'a> {
    Subscribe {
        id: Option<u64>,
        channel: Channel,
        since: Option<Offset>,
        delivery: Delivery,
    },
    Unsubscribe {
        id: Option<u64>,
        channel: Channel,
    },
    Publish {
        id: Option<u64>,
        channel: Channel,
        data: &'a RawValue,
    },
    Ping {
        id: Option<u64>,
    },
    /// Replaces the session's token (same `sub` required).
    Auth {
        id: Option<u64>,
        token: &'a str,
    },
}

impl ClientFrame<'_> {
    pub fn id(&self) -> Option<u64> {
        match self {
            ClientFrame::Subscribe { id, .. }
            | ClientFrame::Unsubscribe { id, .. }
            | ClientFrame::Publish { id, .. }
            | ClientFrame::Ping { id }
            | ClientFrame::Auth { id, .. } => *id,
        }
    }

    /// The op name, for logs and metrics.
    pub fn op(&self) -> &'static str {
        match self {
            ClientFrame::Subscribe { .. } => "subscribe",
            ClientFrame::Unsubscribe { .. } => "unsubscribe",
            ClientFrame::Publish { .. } => "publish",
            ClientFrame::Ping { .. } => "ping",
            ClientFrame::Auth { .. } => "auth",
        }
    }
}

/// Why a frame was refused, with the `id` when it could be read so the reply can carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

impl DecodeError {
    fn bad(id: Option<u64>, message: impl Into<String>) -> Self {
        DecodeError {
            id,
            code: ErrorCode::BadRequest,
            message: message.into(),
        }
    }
}

/// The known fields of a frame as raw JSON. Every field goes through [`present`] so that an
/// explicit `null` is kept (and refused where it is not allowed) instead of reading as absent.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    op: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    channel: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    since: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    delivery: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    token: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// Decodes one client frame. Never panics, whatever the bytes.
pub fn decode(frame: &[u8]) -> Result<ClientFrame<'_>, DecodeError> {
    let text = std::str::from_utf8(frame)
        .map_err(|_| DecodeError::bad(None, "frame is not valid UTF-8"))?;
    // serde would also read a struct from a JSON array (`[1,"ping"]`); the protocol is objects only.
    if text.trim_start().as_bytes().first() != Some(&b'{') {
        let msg = match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => "frame must be a JSON object".to_string(),
            Err(e) => format!("frame is not valid JSON: {e}"),
        };
        return Err(DecodeError::bad(None, msg));
    }
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| {
        let msg = if e.is_syntax() || e.is_eof() {
            format!("frame is not valid JSON: {e}")
        } else {
            format!("frame is not a valid protocol object: {e}")
        };
        DecodeError::bad(None, msg)
    })?;

    let id = match env.id {
        None => None,
        Some(raw) => Some(
            serde_json::from_str::<u64>(raw.get())
                .map_err(|_| DecodeError::bad(None, "field `id` must be a non-negative integer"))?,
        ),
    };
    let op: String = match env.op {
        None => return Err(DecodeError::bad(id, "field `op` is missing")),
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|_| DecodeError::bad(id, "field `op` must be a string"))?,
    };
    let channel = |required: bool| -> Result<Option<Channel>, DecodeError> {
        match env.channel {
            None if required => Err(DecodeError::bad(
                id,
                format!("`{op}` needs field `channel`"),
            )),
            None => Ok(None),
            Some(raw) => {
                let name: String = serde_json::from_str(raw.get())
                    .map_err(|_| DecodeError::bad(id, "field `channel` must be a string"))?;
                Channel::new(&name)
                    .map(Some)
                    .map_err(|e| DecodeError::bad(id, format!("field `channel`: {e}")))
            }
        }
    };
    // `channel(true)` yields Some or an error; the expect-free unwrap keeps the no-panic promise.
    let required = |c: Result<Option<Channel>, DecodeError>| {
        c.and_then(|c| c.ok_or_else(|| DecodeError::bad(id, "field `channel` is missing")))
    };

    match op.as_str() {
        "subscribe" => {
            let channel = required(channel(true))?;
            let since = match env.since {
                None => None,
                Some(raw) => {
                    let s: String = serde_json::from_str(raw.get())
                        .map_err(|_| DecodeError::bad(id, "field `since` must be a string"))?;
                    Some(
                        s.parse::<Offset>()
                            .map_err(|e| DecodeError::bad(id, format!("field `since`: {e}")))?,
                    )
                }
            };
            let delivery = match env.delivery {
                None => Delivery::Stream,
                Some(raw) => match serde_json::from_str::<&str>(raw.get()) {
                    Ok("stream") => Delivery::Stream,
                    Ok("datagram") => Delivery::Datagram,
                    _ => {
                        return Err(DecodeError::bad(
                            id,
                            "field `delivery` must be \"stream\" or \"datagram\"",
                        ));
                    }
                },
            };
            Ok(ClientFrame::Subscribe {
                id,
                channel,
                since,
                delivery,
            })
        }
        "unsubscribe" => Ok(ClientFrame::Unsubscribe {
            id,
            channel: required(channel(true))?,
        }),
        "publish" => {
            let channel = required(channel(true))?;
            let data = env
                .data
                .ok_or_else(|| DecodeError::bad(id, "`publish` needs field `data`"))?;
            check_data(data).map_err(|e| DecodeError::bad(id, format!("field `data`: {e}")))?;
            Ok(ClientFrame::Publish { id, channel, data })
        }
        "ping" => Ok(ClientFrame::Ping { id }),
        "auth" => {
            let raw = env
                .token
                .ok_or_else(|| DecodeError::bad(id, "`auth` needs field `token`"))?;
            // A JWT is base64url and dots: a plain JSON string, never one with escapes, so it
            // is borrowed from the frame as it stands.
            let token = raw
                .get()
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .filter(|t| !t.is_empty() && !t.contains('\\'))
                .ok_or_else(|| {
                    DecodeError::bad(id, "field `token` must be a non-empty string (a JWT)")
                })?;
            Ok(ClientFrame::Auth { id, token })
        }
        other => {
            let shown: String = other.chars().take(32).collect();
            Err(DecodeError {
                id,
                code: ErrorCode::UnknownOp,
                message: format!(
                    "unknown op {shown:?}; known ops are subscribe, unsubscribe, publish, ping, auth"
                ),
            })
        }
    }
}

/// How far into a frame [`peek_id`] looks: past every member of a frame that carries no `data`
/// (a 200-character channel name included), so only a publish's id can lie beyond it.
pub const PEEK_ID_BYTES: usize = 512;

/// The frame's `id` read without decoding the frame, for the reply to a frame refused before it
/// is decoded (over the rate limit): finding it costs a look at [`PEEK_ID_BYTES`] bytes at most,
/// where a decode costs a parse of up to `session.max_message_bytes`. The id is the top-level
/// `"id"` member when it is a non-negative integer and ends within that window; `None` when it
/// is further in, spelled with escapes, or the frame is not an object. Nothing is validated on
/// the way: a `Some` is the id a successful decode would find, and a frame that decode would
/// refuse may still get one.
pub fn peek_id(frame: &[u8]) -> Option<u64> {
    let b = &frame[..frame.len().min(PEEK_ID_BYTES)];
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(b, i);
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(b, i)?;
        let key = b.get(i + 1..key_end)?;
        i = skip_ws(b, key_end + 1);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        if key == b"id" {
            return peek_integer(b, i);
        }
        i = skip_ws(b, skip_value(b, i)?);
        if b.get(i) != Some(&b',') {
            return None;
        }
        i += 1;
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b
        .get(i)
        .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
    {
        i += 1;
    }
    i
}

/// The index of the quote that closes the string opening at `i`.
fn string_end(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        match b.get(i)? {
            b'"' => return Some(i),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// The index just past the value starting at `i`, found by its delimiters alone.
fn skip_value(b: &[u8], mut i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => Some(string_end(b, i)? + 1),
        b'{' | b'[' => {
            // Brackets of either kind count alike: this finds the end, it does not validate.
            let mut depth = 0usize;
            loop {
                match b.get(i)? {
                    b'"' => i = string_end(b, i)?,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            // A number, `true`, `false` or `null`: it runs to the next delimiter.
            while !matches!(b.get(i)?, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                i += 1;
            }
            Some(i)
        }
    }
}

/// A JSON integer that fits `u64` at `i`, followed by a delimiter inside the window (without
/// one, more digits may follow beyond it).
fn peek_integer(b: &[u8], i: usize) -> Option<u64> {
    let digits = b
        .get(i..)?
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .count();
    if digits == 0 || (digits > 1 && b[i] == b'0') {
        return None;
    }
    let end = skip_ws(b, i + digits);
    if !matches!(b.get(end)?, b',' | b'}') {
        return None;
    }
    std::str::from_utf8(&b[i..i + digits]).ok()?.parse().ok()
}

/// Checks what `RawValue` does not. serde_json's raw parser skips over values without decoding
/// them, so it accepts `\uD800`-style escapes of unpaired surrogates and numbers out of `f64`
/// range (`1e400`), both of which strict parsers (serde_json's own `Value` included) reject:
/// forwarding them would send every subscriber a push it cannot parse. [`StrictJson`] walks the
/// value once, decoding strings and numbers, without building it.
pub fn check_data(data: &RawValue) -> Result<(), String> {
    serde_json::from_str::<StrictJson>(data.get())
        .map(|_| ())
        .map_err(|e| format!("not valid JSON text ({e})"))
}

/// Deserializes any JSON value and keeps nothing; fails where a strict parser would.
struct StrictJson;

impl<'de> Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = StrictJson;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<StrictJson, E> {
        Ok(StrictJson)
    }
    fn visit_i64<E>(self, _: i64) -> Result<StrictJson, E> {
        Ok(StrictJson)
    }
    fn visit_u64<E>(self, _: u64) -> Result<StrictJson, E> {
        Ok(StrictJson)
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<StrictJson, E> {
        if v.is_finite() {
            Ok(StrictJson)
        } else {
            Err(E::custom("number out of range"))
        }
    }
    fn visit_str<E>(self, _: &str) -> Result<StrictJson, E> {
        Ok(StrictJson)
    }
    fn visit_unit<E>(self) -> Result<StrictJson, E> {
        Ok(StrictJson)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<StrictJson, A::Error> {
        while seq.next_element::<StrictJson>()?.is_some() {}
        Ok(StrictJson)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<StrictJson, A::Error> {
        while map.next_key::<StrictJson>()?.is_some() {
            map.next_value::<StrictJson>()?;
        }
        Ok(StrictJson)
    }
}

/// Checks text that arrives from outside the protocol (a backend's Redis `PUBLISH`) before it is
/// pushed as `data`: one complete JSON value, with the same surrogate check as [`check_data`].
pub fn check_json_text(text: &str) -> Result<(), String> {
    let raw: &RawValue =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON text ({e})"))?;
    check_data(raw)
}

/// One encoded edge → client frame: a single line of UTF-8 JSON, built once and shared by every
/// session it goes to (cloning is a reference-count increment). The JSON is tungstenite's
/// `Utf8Bytes`, so UTF-8 is checked once at encoding, not once per subscriber. Its WebSocket
/// form (the frame header in front of the same bytes) is built with it, so a WebSocket session
/// writes the shared bytes as they are, with no framing or copy of its own. The SSE event for
/// the frame is built the first time an SSE session needs it and then shared the same way.
#[derive(Debug, Clone)]
pub struct Frame(Arc<FrameInner>);

#[derive(Debug)]
struct FrameInner {
    /// The server's unmasked WebSocket text frame: its header, then `json` (one allocation).
    ws: Bytes,
    json: Utf8Bytes,
    /// A pushed message's channel and offset; `None` for replies, notices and offset-less pushes.
    position: Option<(Channel, Offset)>,
    sse: OnceLock<Bytes>,
}

impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        self.0.json == other.0.json
    }
}

impl Eq for Frame {}

/// Room left in front of an encoded frame's JSON for the longest WebSocket header (RFC 6455
/// §5.2: the opcode byte, 127, and a 64-bit length; a server's frames carry no mask).
const WS_HEAD_ROOM: usize = 10;

/// A buffer for a frame's JSON, with room for its WebSocket header in front.
fn frame_buf(json_capacity: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(WS_HEAD_ROOM + json_capacity);
    buf.put_bytes(0, WS_HEAD_ROOM);
    buf
}

impl Frame {
    /// `buf` is a [`frame_buf`] with the JSON written after its header room. The header goes into
    /// the room's tail, so the WebSocket frame and the JSON share one allocation.
    fn framed(mut buf: BytesMut, position: Option<(Channel, Offset)>) -> Frame {
        let len = buf.len() - WS_HEAD_ROOM;
        // FIN and the text opcode, then the shortest length encoding that fits.
        let start = if len < 126 {
            buf[WS_HEAD_ROOM - 1] = len as u8;
            WS_HEAD_ROOM - 2
        } else if let Ok(len) = u16::try_from(len) {
            buf[WS_HEAD_ROOM - 3] = 126;
            buf[WS_HEAD_ROOM - 2..WS_HEAD_ROOM].copy_from_slice(&len.to_be_bytes());
            WS_HEAD_ROOM - 4
        } else {
            buf[WS_HEAD_ROOM - 9] = 127;
            buf[WS_HEAD_ROOM - 8..WS_HEAD_ROOM].copy_from_slice(&(len as u64).to_be_bytes());
            0
        };
        buf[start] = 0x81;
        let all = buf.freeze();
        match Utf8Bytes::try_from(all.slice(WS_HEAD_ROOM..)) {
            Ok(json) => Frame(Arc::new(FrameInner {
                ws: all.slice(start..),
                json,
                position,
                sse: OnceLock::new(),
            })),
            // Every caller builds the JSON from `&str` pieces, so this cannot happen; a
            // replacement frame keeps the no-panic promise if that ever stops being true.
            Err(_) => {
                Frame::from_string(r#"{"error":{"code":"internal","message":"encoding"}}"#.into())
            }
        }
    }

    fn from_string(s: String) -> Frame {
        let mut buf = frame_buf(s.len());
        buf.put_slice(s.as_bytes());
        Frame::framed(buf, None)
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.json.as_bytes()
    }

    pub fn as_str(&self) -> &str {
        self.0.json.as_str()
    }

    pub fn len(&self) -> usize {
        self.0.json.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.json.is_empty()
    }

    /// The offset of a pushed message, if it has one.
    pub fn offset(&self) -> Option<Offset> {
        self.0.position.as_ref().map(|(_, o)| *o)
    }

    /// The channel and offset of a pushed message that has an offset.
    pub fn position(&self) -> Option<(&Channel, Offset)> {
        self.0.position.as_ref().map(|(c, o)| (c, *o))
    }

    /// The WebSocket text payload, without copying.
    pub fn to_utf8_bytes(&self) -> Utf8Bytes {
        self.0.json.clone()
    }

    /// The whole WebSocket text frame a server sends for this JSON (header and payload), shared
    /// by every session.
    pub fn ws_frame(&self) -> &[u8] {
        &self.0.ws
    }

    /// The Server-Sent Events form: `id: <offset>` (for messages that have one) and the JSON on
    /// one `data:` line. The JSON never holds a line break, so one line is always enough.
    pub fn sse_event(&self) -> Bytes {
        self.0
            .sse
            .get_or_init(|| {
                let json = self.as_bytes();
                let mut buf = BytesMut::with_capacity(json.len() + 48);
                if let Some(o) = self.offset() {
                    buf.put_slice(b"id: ");
                    buf.put_slice(o.to_string().as_bytes());
                    buf.put_u8(b'\n');
                }
                buf.put_slice(b"data: ");
                buf.put_slice(json);
                buf.put_slice(b"\n\n");
                buf.freeze()
            })
            .clone()
    }

    /// The SSE event without its `id:` line (`data: …` and the blank line), sharing the bytes of
    /// [`Frame::sse_event`]: for a stream that writes its own id.
    pub fn sse_data(&self) -> Bytes {
        let event = self.sse_event();
        let start = event
            .windows(6)
            .position(|w| w == b"data: ")
            .unwrap_or_default();
        event.slice(start..)
    }
}

/// Writes `data` as one line of compact-enough JSON. Outside strings a raw newline is only
/// whitespace and inside strings JSON forbids it, so replacing CR and LF with spaces keeps the
/// value identical while making it safe for line-framed wires (WebTransport lines, SSE `data:`).
fn put_single_line(buf: &mut BytesMut, data: &[u8]) {
    if data.iter().any(|b| *b == b'\n' || *b == b'\r') {
        buf.extend(data.iter().map(|b| match b {
            b'\n' | b'\r' => b' ',
            b => *b,
        }));
    } else {
        buf.put_slice(data);
    }
}

/// Encodes a push once; every subscriber on every transport shares the returned bytes.
/// Channel names and offsets hold no characters that JSON would escape, so they are written raw.
/// A message without an offset (a backend's raw Redis `PUBLISH`) is pushed without the `offset`
/// field: it cannot be resumed from.
pub fn encode_message(channel: &Channel, offset: Option<Offset>, data: &str) -> Frame {
    let mut buf = frame_buf(64 + channel.as_str().len() + data.len());
    buf.put_slice(b"{\"op\":\"message\",\"channel\":\"");
    buf.put_slice(channel.as_str().as_bytes());
    if let Some(offset) = offset {
        buf.put_slice(b"\",\"offset\":\"");
        buf.put_slice(offset.to_string().as_bytes());
    }
    buf.put_slice(b"\",\"data\":");
    put_single_line(&mut buf, data.as_bytes());
    buf.put_u8(b'}');
    Frame::framed(buf, offset.map(|o| (channel.clone(), o)))
}

pub fn encode_gap(channel: &Channel) -> Frame {
    Frame::from_string(format!(
        "{{\"op\":\"gap\",\"channel\":\"{}\"}}",
        channel.as_str()
    ))
}

/// A notice that is no reply: `{"op":"error","error":{…}}`, with the channel it concerns when
/// there is one. Sent when the edge withdraws something on its own: a channel whose permission a
/// reload took away (`forbidden`), a token that expired (`unauthorized`, SSE).
pub fn encode_notice(channel: Option<&Channel>, code: ErrorCode, message: &str) -> Frame {
    let error = serde_json::json!({"code": code.as_str(), "message": message});
    let v = match channel {
        Some(c) => serde_json::json!({"op": "error", "channel": c.as_str(), "error": error}),
        None => serde_json::json!({"op": "error", "error": error}),
    };
    Frame::from_string(v.to_string())
}

pub fn encode_welcome(session: &str) -> Frame {
    let v = serde_json::json!({"op": "welcome", "session": session, "server": SERVER_NAME});
    Frame::from_string(v.to_string())
}

pub fn encode_ok(id: Option<u64>) -> Frame {
    match id {
        Some(id) => Frame::from_string(format!("{{\"id\":{id},\"ok\":true}}")),
        None => Frame::from_string("{\"ok\":true}".into()),
    }
}

pub fn encode_error(
    id: Option<u64>,
    code: ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
) -> Frame {
    let mut err = serde_json::Map::new();
    err.insert("code".into(), code.as_str().into());
    err.insert("message".into(), message.into());
    if let Some(ms) = retry_after_ms {
        err.insert("retry_after_ms".into(), ms.into());
    }
    let mut obj = serde_json::Map::new();
    if let Some(id) = id {
        obj.insert("id".into(), id.into());
    }
    obj.insert("error".into(), serde_json::Value::Object(err));
    Frame::from_string(serde_json::Value::Object(obj).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn err(frame: &str) -> DecodeError {
        decode(frame.as_bytes()).expect_err(frame)
    }

    #[test]
    fn decodes_every_op() {
        let f = decode(br#"{"id":1,"op":"subscribe","channel":"prices","since":"5-7"}"#).unwrap();
        match f {
            ClientFrame::Subscribe {
                id,
                channel,
                since,
                delivery,
            } => {
                assert_eq!(id, Some(1));
                assert_eq!(channel.as_str(), "prices");
                assert_eq!(since, Some(Offset { epoch: 5, seq: 7 }));
                assert_eq!(delivery, Delivery::Stream);
            }
            other => panic!("{other:?}"),
        }
        let f = decode(br#"{"op":"subscribe","channel":"p","delivery":"datagram"}"#).unwrap();
        assert!(matches!(
            f,
            ClientFrame::Subscribe {
                delivery: Delivery::Datagram,
                ..
            }
        ));
        let e =
            decode(br#"{"id":4,"op":"subscribe","channel":"p","delivery":"pigeon"}"#).unwrap_err();
        assert_eq!((e.id, e.code), (Some(4), ErrorCode::BadRequest));
        let f = decode(br#"{"id":2,"op":"unsubscribe","channel":"prices"}"#).unwrap();
        assert!(matches!(f, ClientFrame::Unsubscribe { id: Some(2), .. }));
        let f =
            decode(br#"{"id":3,"op":"publish","channel":"chat:42","data":{"a":[1,2]}}"#).unwrap();
        match f {
            ClientFrame::Publish { id, channel, data } => {
                assert_eq!(id, Some(3));
                assert_eq!(channel.as_str(), "chat:42");
                assert_eq!(data.get(), r#"{"a":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(br#"{"op":"ping"}"#).unwrap(),
            ClientFrame::Ping { id: None }
        ));
    }

    #[test]
    fn publish_keeps_null_and_escaped_channel() {
        let f = decode(br#"{"op":"publish","channel":"\u0061b","data":null}"#).unwrap();
        match f {
            ClientFrame::Publish { channel, data, .. } => {
                assert_eq!(channel.as_str(), "ab");
                assert_eq!(data.get(), "null");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn data_with_unpaired_surrogate_escape_is_refused() {
        // Found by the fuzzer: accepted by RawValue, rejected by every strict parser.
        for f in [
            r#"{"id":1,"op":"publish","channel":"c","data":"t\ud828"}"#,
            r#"{"id":1,"op":"publish","channel":"c","data":{"k":[{"\udc00":1}]}}"#,
        ] {
            let e = err(f);
            assert_eq!((e.id, e.code), (Some(1), ErrorCode::BadRequest), "{f}");
            assert!(e.message.contains("data"), "{}", e.message);
        }
        let e = err(r#"{"id":1,"op":"publish","channel":"c","data":[1e400]}"#);
        assert!(e.message.contains("data"), "{}", e.message);
        assert!(
            decode(br#"{"op":"publish","channel":"c","data":[1e300,-0.5,18446744073709551616]}"#)
                .is_ok()
        );
        // A paired surrogate (an emoji) and other escapes are fine.
        assert!(decode(br#"{"op":"publish","channel":"c","data":"\ud83d\ude00 \u00e9"}"#).is_ok());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert!(decode(br#"{"op":"ping","future":{"x":1}}"#).is_ok());
    }

    #[test]
    fn errors_keep_the_id_and_name_the_field() {
        let e = err(r#"{"id":9,"op":"subscribe"}"#);
        assert_eq!((e.id, e.code), (Some(9), ErrorCode::BadRequest));
        assert!(e.message.contains("channel"), "{}", e.message);

        let e = err(r#"{"id":9,"op":"subscribe","channel":"no spaces"}"#);
        assert_eq!(e.id, Some(9));
        assert!(e.message.contains("' '"), "{}", e.message);

        let e = err(r#"{"id":9,"op":"subscribe","channel":5}"#);
        assert!(e.message.contains("must be a string"));

        let e = err(r#"{"id":9,"op":"subscribe","channel":"a","since":"x"}"#);
        assert!(e.message.contains("since"));

        let e = err(r#"{"id":9,"op":"publish","channel":"a"}"#);
        assert!(e.message.contains("data"));

        let e = err(r#"{"id":9,"op":"dance"}"#);
        assert_eq!((e.id, e.code), (Some(9), ErrorCode::UnknownOp));

        let e = err(r#"{"id":9}"#);
        assert!(e.message.contains("`op` is missing"));

        let e = err(r#"{"id":9,"op":null}"#);
        assert!(e.message.contains("`op` must be a string"));
    }

    #[test]
    fn malformed_frames_are_bad_requests_without_id() {
        for f in [
            "",
            "not json",
            "[1,2]",
            "42",
            "\"op\"",
            "{",
            r#"{"id":-1,"op":"ping"}"#,
            r#"{"id":"1","op":"ping"}"#,
            r#"{"id":1.5,"op":"ping"}"#,
            r#"{"op":"ping","op":"ping"}"#,
        ] {
            let e = err(f);
            assert_eq!((e.id, e.code), (None, ErrorCode::BadRequest), "{f}");
        }
        assert_eq!(
            decode(&[0xff, 0xfe]).unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(err("[1]").message, "frame must be a JSON object");
    }

    #[test]
    fn channel_rules() {
        assert!(Channel::new("A-z_0.9:@/x").is_ok());
        assert_eq!(Channel::new(""), Err(ChannelError::Empty));
        assert!(Channel::new(&"a".repeat(200)).is_ok());
        assert_eq!(Channel::new(&"a".repeat(201)), Err(ChannelError::TooLong));
        assert_eq!(Channel::new("é"), Err(ChannelError::BadChar('é')));
        assert_eq!(Channel::new("a\"b"), Err(ChannelError::BadChar('"')));
    }

    #[test]
    fn offsets_round_trip_and_order() {
        let o: Offset = "1700000000000-3".parse().unwrap();
        assert_eq!(o.to_string(), "1700000000000-3");
        assert!(o < "1700000000000-10".parse().unwrap());
        assert!(o < "1700000000001-0".parse().unwrap());
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1-2-3",
            "a-1",
            "+1-2",
            "1 -2",
            "99999999999999999999999-1",
        ] {
            assert!(bad.parse::<Offset>().is_err(), "{bad}");
        }
    }

    #[test]
    fn encoded_frames_are_valid_json() {
        let ch = Channel::new("prices").unwrap();
        let m = encode_message(&ch, Some(Offset { epoch: 1, seq: 2 }), "{\"p\":\n 1}");
        assert!(!m.as_bytes().contains(&b'\n'));
        let v: Value = serde_json::from_slice(m.as_bytes()).unwrap();
        assert_eq!(
            v,
            json!({"op":"message","channel":"prices","offset":"1-2","data":{"p":1}})
        );
        let v: Value = serde_json::from_slice(encode_gap(&ch).as_bytes()).unwrap();
        assert_eq!(v, json!({"op":"gap","channel":"prices"}));
        let v: Value = serde_json::from_slice(encode_ok(Some(7)).as_bytes()).unwrap();
        assert_eq!(v, json!({"id":7,"ok":true}));
        let v: Value = serde_json::from_slice(
            encode_error(Some(3), ErrorCode::RateLimited, "slow \"down\"", Some(250)).as_bytes(),
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"id":3,"error":{"code":"rate_limited","message":"slow \"down\"","retry_after_ms":250}})
        );
        let v: Value = serde_json::from_slice(encode_welcome("s1").as_bytes()).unwrap();
        assert_eq!(v["op"], "welcome");
        assert_eq!(v["server"], SERVER_NAME);
    }

    #[test]
    fn sse_event_carries_the_offset_as_id_and_is_built_once() {
        let ch = Channel::new("c").unwrap();
        let m = encode_message(&ch, Some(Offset { epoch: 5, seq: 6 }), "[1,\n2]");
        let ev = m.sse_event();
        assert_eq!(
            std::str::from_utf8(&ev).unwrap(),
            "id: 5-6\ndata: {\"op\":\"message\",\"channel\":\"c\",\"offset\":\"5-6\",\"data\":[1, 2]}\n\n"
        );
        assert_eq!(
            m.clone().sse_event().as_ptr(),
            ev.as_ptr(),
            "shared, not rebuilt"
        );
        let gap = encode_gap(&ch).sse_event();
        assert_eq!(&gap[..], b"data: {\"op\":\"gap\",\"channel\":\"c\"}\n\n");
    }

    #[test]
    fn message_data_with_newline_inside_string_escape_is_untouched() {
        // A JSON string can only hold a newline as the two characters `\n`; those stay as they are.
        let ch = Channel::new("c").unwrap();
        let m = encode_message(&ch, Some(Offset { epoch: 0, seq: 1 }), r#""a\nb""#);
        let v: Value = serde_json::from_slice(m.as_bytes()).unwrap();
        assert_eq!(v["data"], "a\nb");
    }

    #[test]
    fn peek_id_finds_the_top_level_id_within_its_window() {
        let pad = "x".repeat(PEEK_ID_BYTES);
        let cases: &[(&str, Option<u64>)] = &[
            (r#"{"id":7,"op":"ping"}"#, Some(7)),
            (" {\r\n\t\"id\" : 0 } ", Some(0)),
            (r#"{"op":"ping","id":18446744073709551615}"#, Some(u64::MAX)),
            // serde_json's sorted keys put `data` first: nested and quoted ids are skipped.
            (
                r#"{"channel":"a","data":{"id":1,"s":"\"id\":2","a":[{"id":3}]},"id":4,"op":"publish"}"#,
                Some(4),
            ),
            (r#"{"data":[1,true,null,"]}"],"id":5}"#, Some(5)),
            (r#"{"data":"x","id":5,"#, Some(5)),
            // Not an integer decode would accept.
            (r#"{"id":-1}"#, None),
            (r#"{"id":1.5}"#, None),
            (r#"{"id":1e3}"#, None),
            (r#"{"id":01}"#, None),
            (r#"{"id":"1"}"#, None),
            (r#"{"id":null}"#, None),
            (r#"{"id":18446744073709551616}"#, None),
            // Not where it looks.
            (r#"{"i\u0064":1}"#, None),
            (r#"[{"id":1}]"#, None),
            (r#"{"op":"ping"}"#, None),
            (r#"{"id":1"#, None),
            ("", None),
            ("{", None),
            (r#"{"data":"\"#, None),
            (r#"{"data":]]]],"id":1}"#, None),
        ];
        for (frame, want) in cases {
            assert_eq!(peek_id(frame.as_bytes()), *want, "{frame}");
        }
        // Past the window it is not looked for.
        let far = format!(r#"{{"data":"{pad}","id":9}}"#);
        assert_eq!(peek_id(far.as_bytes()), None);
        let near = format!(r#"{{"id":9,"data":"{pad}"}}"#);
        assert_eq!(peek_id(near.as_bytes()), Some(9));
        // Digits cut by the window could go on beyond it.
        let cut = format!(r#"{{"data":"{}","id":123}}"#, &pad[..PEEK_ID_BYTES - 18]);
        assert_eq!(cut.find("123").map(|i| i + 3), Some(PEEK_ID_BYTES + 1));
        assert_eq!(peek_id(cut.as_bytes()), None);
    }

    /// A stable-toolchain stand-in for the fuzz target's check of `peek_id`: frames mutated
    /// with JSON's structural bytes, from a fixed seed, never make it panic or disagree with
    /// decode about the id.
    #[test]
    fn peek_id_agrees_with_decode_on_mutated_frames() {
        let seeds: [&[u8]; 4] = [
            br#"{"id":12,"op":"ping"}"#,
            br#"{"channel":"a","data":{"id":1,"s":"\"id\":2","a":[{"id":3}]},"id":4,"op":"publish"}"#,
            br#"{"data":[1,true,null,"]}"],"id":5,"op":"publish","channel":"c"}"#,
            br#" { "op" : "subscribe" , "channel" : "x" , "id" : 7 } "#,
        ];
        let alphabet = b"{}[]\",:\\ 0123456789-.eidnul\n";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..50_000 {
            let mut frame = seeds[round % seeds.len()].to_vec();
            for _ in 0..1 + next() % 3 {
                let at = (next() as usize) % frame.len();
                let byte = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 => frame[at] = byte,
                    1 => frame.insert(at, byte),
                    _ => {
                        frame.remove(at);
                    }
                }
                if frame.is_empty() {
                    frame.push(b'{');
                }
            }
            let peeked = peek_id(&frame);
            let decoded = match decode(&frame) {
                Ok(f) => f.id(),
                Err(e) => e.id,
            };
            if let (Some(p), Some(d)) = (peeked, decoded) {
                assert_eq!(p, d, "{}", String::from_utf8_lossy(&frame));
            }
            if let (Some(_), Ok(f)) = (peeked, decode(&frame)) {
                assert_eq!(f.id(), peeked, "{}", String::from_utf8_lossy(&frame));
            }
        }
    }

    #[test]
    fn peek_id_agrees_with_decode() {
        let frames = [
            json!({"id": 3, "op": "ping"}),
            json!({"id": 4, "op": "subscribe", "channel": "a".repeat(200), "since": "1-2"}),
            json!({"id": 5, "op": "publish", "channel": "c", "data": {"id": 6, "v": [1, "}"]}}),
            json!({"id": 7, "op": "nope"}),
            json!({"id": 8, "op": "publish", "channel": "c"}),
        ];
        for v in frames {
            let text = v.to_string();
            let decoded = match decode(text.as_bytes()) {
                Ok(f) => f.id(),
                Err(e) => e.id,
            };
            assert_eq!(peek_id(text.as_bytes()), decoded, "{text}");
        }
    }

    #[test]
    fn every_frame_carries_its_websocket_form_as_tungstenite_would_write_it() {
        use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        let ch = Channel::new("c").unwrap();
        // Each length encoding: 7 bits, 16 bits, 64 bits, and the edges between them.
        let push = |n: usize| {
            encode_message(
                &ch,
                Some(Offset { epoch: 1, seq: 2 }),
                &format!("\"{}\"", "x".repeat(n)),
            )
        };
        let mut frames: Vec<Frame> = (0..100)
            .chain(65_440..65_520)
            .chain([70_000])
            .map(push)
            .collect();
        assert!(frames.iter().any(|f| f.len() == 125) && frames.iter().any(|f| f.len() == 126));
        assert!(
            frames.iter().any(|f| f.len() == 65_535) && frames.iter().any(|f| f.len() == 65_536)
        );
        frames.extend([
            encode_ok(None),
            encode_ok(Some(7)),
            encode_gap(&ch),
            encode_welcome("s"),
        ]);
        for f in frames {
            let mut want = Vec::new();
            WsFrame::message(
                Bytes::copy_from_slice(f.as_bytes()),
                OpCode::Data(Data::Text),
                true,
            )
            .format(&mut want)
            .unwrap();
            assert_eq!(f.ws_frame(), &want[..], "{} bytes", f.len());
            assert!(f.ws_frame().ends_with(f.as_bytes()));
        }
    }
}
