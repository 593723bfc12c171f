//! Fuzz target `origin_match`: the invariants live in `fuzz/checks/`, shared with
//! `tests/fuzz_regressions.rs` so that every kept input is re-checked by plain `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks/origin.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    check::check_origin(data);
});
