#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, unit and integration tests, the fuzz
# regression inputs, a build of the benchmarks and fuzz targets, and the JavaScript client's unit
# tests. Installs what the tests need (redis-server, chromium, nodejs, g++) and fails loudly when
# it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'test.sh: %s\n' "$*" >&2; exit 1; }

command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first"

# What the suite needs beyond Rust: redis-server (tests that need Redis start their own on a free
# port; they never use a running one), Debian's chromium (tests/browser.rs and
# tests/browser_client.rs drive it headless), Node.js (the unit tests of clients/js/edgeplex.js)
# and a C++ compiler (libFuzzer, built by the fuzz check).
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -n "${EDGEPLEX_CHROMIUM:-}" ] || [ -x /usr/bin/chromium ] || missing+=(chromium)
command -v c++ >/dev/null || missing+=(g++)
command -v node >/dev/null || missing+=(nodejs)
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq || die "apt-get update failed; install ${missing[*]} by hand"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" \
        || die "cannot install ${missing[*]}; install by hand and re-run"
fi
redis-server --version >/dev/null || die "redis-server is installed but does not run"
"${EDGEPLEX_CHROMIUM:-/usr/bin/chromium}" --headless=new --no-sandbox --version >/dev/null 2>&1 \
    || die "chromium is installed but does not run"

node --version >/dev/null || die "node is installed but does not run"

say "node --test clients/js/test/ (the browser client's unit tests; no network)"
node --test clients/js/test/

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

say "cargo test"
cargo test --locked

say "benchmarks build"
cargo bench --locked --no-run

if [ -f fuzz/Cargo.toml ]; then
    say "fuzz targets type-check (run them with fuzz/run.sh)"
    cargo check --locked --manifest-path fuzz/Cargo.toml --bins
fi
say "all tests passed"
