//! Replays the fuzz seeds and the kept crashing inputs of `fuzz/` through the protocol decoder on
//! every `cargo test` (stable toolchain, no libFuzzer), with the same invariants as the fuzz target.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[path = "../fuzz/checks/protocol.rs"]
mod protocol_check;

const DIRS: [&str; 2] = [
    "fuzz/seeds/protocol_decode",
    "fuzz/regressions/protocol_decode",
];

fn inputs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in DIRS {
        let dir = root.join(dir);
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
fn seeds_and_regressions_decode_without_panic() {
    let files = inputs();
    assert!(!files.is_empty(), "no input found under {DIRS:?}");
    let mut failures = Vec::new();
    for path in &files {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let outcome =
            panic::catch_unwind(AssertUnwindSafe(|| protocol_check::check_decode(&bytes)));
        if outcome.is_err() {
            failures.push(path.display().to_string());
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} inputs failed (panic messages above): {failures:#?}",
        failures.len(),
        files.len()
    );
    eprintln!("checked {} inputs", files.len());
}
