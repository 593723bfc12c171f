//! Fuzz target: `edgeplex::protocol::decode` (and `peek_id`, checked against it) must never panic,
//! and whatever decode accepts must encode back into single-line JSON. The invariants live in
//! `fuzz/checks/protocol.rs`, shared with `tests/fuzz_regressions.rs` so that every kept input is
//! re-checked by plain `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks/protocol.rs"]
mod protocol_check;

fuzz_target!(|data: &[u8]| {
    protocol_check::check_decode(data);
});
