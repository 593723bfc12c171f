//! Invariants of `edgeplex::protocol` checked on one input. Shared (through `#[path]`) by the fuzz
//! target `fuzz/fuzz_targets/protocol_decode.rs` and the test `tests/fuzz_regressions.rs`; it uses
//! only `edgeplex` and `serde_json`, so it builds in both crates. Any panic here is a finding.

use edgeplex::protocol::{self, ClientFrame, Offset};
use serde_json::Value;

/// A frame the edge sends must be one line of valid JSON (pushes go out on line-framed wires).
fn assert_single_line_json(what: &str, bytes: &[u8]) -> Value {
    assert!(
        !bytes.contains(&b'\n'),
        "{what} contains a newline: {:?}",
        String::from_utf8_lossy(bytes)
    );
    serde_json::from_slice::<Value>(bytes).unwrap_or_else(|e| {
        panic!(
            "{what} is not valid JSON ({e}): {:?}",
            String::from_utf8_lossy(bytes)
        )
    })
}

/// Decodes `input` (which must not panic) and checks what the edge would send back for it.
/// `peek_id`, which reads the id of a frame refused before decoding, must not panic either, and
/// decode is its reference: an id it finds is the one decode reads.
pub fn check_decode(input: &[u8]) {
    let peeked = protocol::peek_id(input);
    match protocol::decode(input) {
        Ok(frame) => {
            let _ = (frame.id(), frame.op());
            if peeked.is_some() {
                assert_eq!(peeked, frame.id(), "peek_id disagrees with decode");
            }
            match frame {
                ClientFrame::Publish { channel, data, .. } => {
                    let offset = Offset { epoch: 1, seq: 2 };
                    let msg = protocol::encode_message(&channel, Some(offset), data.get());
                    let v = assert_single_line_json("encode_message output", msg.as_bytes());
                    assert_eq!(v["op"], "message");
                    assert_eq!(v["channel"], channel.as_str());
                    assert_eq!(v["offset"], "1-2");
                    // The pushed data is the published value: only whitespace may have changed.
                    let published: Value = serde_json::from_str(data.get())
                        .expect("decode accepted `data` that is not valid JSON");
                    assert_eq!(
                        v["data"], published,
                        "pushed data differs from published data"
                    );
                }
                ClientFrame::Subscribe { channel, since, .. } => {
                    assert_single_line_json(
                        "encode_gap output",
                        protocol::encode_gap(&channel).as_bytes(),
                    );
                    if let Some(since) = since {
                        assert_eq!(since.to_string().parse::<Offset>(), Ok(since));
                    }
                }
                ClientFrame::Auth { token, .. } => {
                    // The token is borrowed from the frame unescaped: it is exactly the JSON
                    // string's value.
                    let v: Value = serde_json::from_slice(input).expect("decoded, so JSON");
                    assert_eq!(v["token"].as_str(), Some(token));
                }
                ClientFrame::Unsubscribe { .. } | ClientFrame::Ping { .. } => {}
            }
        }
        Err(e) => {
            if let (Some(p), Some(d)) = (peeked, e.id) {
                assert_eq!(p, d, "peek_id disagrees with decode");
            }
            // The error reply carries the decoder's message; it must be a valid single line too.
            let reply = protocol::encode_error(e.id, e.code, &e.message, None);
            assert_single_line_json("encode_error output", reply.as_bytes());
        }
    }
}
