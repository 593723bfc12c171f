//! Replays the fuzz seeds and the kept crashing inputs of `fuzz/` through every fuzz target's
//! checks on every `cargo test` (stable toolchain, no libFuzzer), with the same invariants as the
//! fuzz targets.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../fuzz/checks/protocol.rs"]
mod protocol_check;

#[path = "../fuzz/checks/origin.rs"]
mod origin_check;

#[path = "../fuzz/checks/forwarded.rs"]
mod forwarded_check;

#[path = "../fuzz/checks/config.rs"]
mod config_check;

/// What a fuzz target checks on one input; a panic is a finding.
type Check = fn(&[u8]);

/// Every fuzz target and its check.
const TARGETS: [(&str, Check); 4] = [
    ("protocol_decode", protocol_check::check_decode),
    ("origin_match", origin_check::check_origin),
    ("forwarded", forwarded_check::check_forwarded),
    ("config_load", config_check::check_config),
];

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for kind in ["seeds", "regressions"] {
        let dir = root.join("fuzz").join(kind).join(target);
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("read_dir entry").path();
            if path.is_file() && path.file_name().is_some_and(|n| n != "README.md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

#[test]
fn seeds_and_regressions_of_every_target_pass_their_checks() {
    let mut failures = Vec::new();
    for (target, check) in TARGETS {
        let files = inputs(target);
        assert!(!files.is_empty(), "no input found for {target}");
        for path in &files {
            let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if panic::catch_unwind(AssertUnwindSafe(|| check(&bytes))).is_err() {
                failures.push(path.display().to_string());
            }
        }
        eprintln!("{target}: checked {} inputs", files.len());
    }
    assert!(
        failures.is_empty(),
        "{} inputs failed (panic messages above): {failures:#?}",
        failures.len()
    );
}
