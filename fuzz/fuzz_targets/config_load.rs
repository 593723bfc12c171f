//! Fuzz target `config_load`: the invariants live in `fuzz/checks/`, shared with
//! `tests/fuzz_regressions.rs` so that every kept input is re-checked by plain `cargo test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../checks/config.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    check::check_config(data);
});
