#!/usr/bin/env bash
# Runs every fuzz target (or the ones named as arguments) for a bounded time each.
#
#   fuzz/run.sh                      # every target, 60 s each
#   FUZZ_SECONDS=600 fuzz/run.sh protocol_decode
#
# Environment:
#   FUZZ_SECONDS    seconds of fuzzing per target (default 60)
#   FUZZ_TOOLCHAIN  rustup toolchain for libFuzzer builds (default nightly; must be installed)
#   FUZZ_FRESH=1    start from the seeds only, dropping the corpus grown by earlier runs
#
# Each target fuzzes a scratch corpus fuzz/corpus/<target>/ (git-ignored) filled from
# fuzz/seeds/<target>/ and fuzz/regressions/<target>/. Exits non-zero if any target finds a crash,
# hang or OOM, after printing where libFuzzer wrote the input (fuzz/artifacts/<target>/).
set -euo pipefail

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
FUZZ_TOOLCHAIN="${FUZZ_TOOLCHAIN:-nightly}"
FUZZ_DIR="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$FUZZ_DIR")"
cd "$ROOT" # cargo-fuzz looks for ./fuzz

case "$FUZZ_SECONDS" in '' | *[!0-9]*)
    echo "FUZZ_SECONDS must be a whole number of seconds, got '$FUZZ_SECONDS'" >&2
    exit 2
    ;;
esac

if ! rustup run "$FUZZ_TOOLCHAIN" rustc --version >/dev/null 2>&1; then
    echo "toolchain '$FUZZ_TOOLCHAIN' is not installed; libFuzzer builds need nightly" \
        "(rustup toolchain install nightly), or set FUZZ_TOOLCHAIN" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
fuzz() { cargo "+$FUZZ_TOOLCHAIN" fuzz "$@"; }

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(fuzz list)
fi

failed=()
for t in "${targets[@]}"; do
    corpus="$FUZZ_DIR/corpus/$t"
    artifacts="$FUZZ_DIR/artifacts/$t"
    if [ "${FUZZ_FRESH:-0}" = 1 ]; then rm -rf "$corpus"; fi
    mkdir -p "$corpus" "$artifacts"
    for src in "$FUZZ_DIR/seeds/$t" "$FUZZ_DIR/regressions/$t"; do
        [ -d "$src" ] || continue
        find "$src" -maxdepth 1 -type f ! -name README.md -exec cp -f {} "$corpus/" \;
    done

    echo "== building $t ($FUZZ_TOOLCHAIN, address sanitizer, debug assertions)"
    start=$SECONDS
    # -a: debug assertions and overflow checks on, so arithmetic overflow is a finding too.
    fuzz build -a "$t"
    echo "== built $t in $((SECONDS - start)) s"

    args=(-max_total_time="$FUZZ_SECONDS" -timeout=10 -print_final_stats=1)
    if [ -f "$FUZZ_DIR/dicts/$t.dict" ]; then args+=(-dict="$FUZZ_DIR/dicts/$t.dict"); fi

    marker="$(mktemp)"
    echo "== fuzzing $t for $FUZZ_SECONDS s, corpus $corpus ($(find "$corpus" -type f | wc -l) files)"
    set +e
    fuzz run -a "$t" "$corpus" -- "${args[@]}"
    rc=$?
    set -e
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        echo "!! $t failed (exit $rc). Inputs written by this run:" >&2
        found="$(find "$artifacts" -type f -newer "$marker")"
        if [ -n "$found" ]; then
            while IFS= read -r f; do
                echo "   $f" >&2
                echo "   reproduce: cargo +$FUZZ_TOOLCHAIN fuzz run -a $t $f" >&2
            done <<<"$found"
            echo "   keep it: minimize with 'cargo +$FUZZ_TOOLCHAIN fuzz tmin -a $t <file>'," \
                "copy it to fuzz/regressions/$t/ and run cargo test --test fuzz_regressions" >&2
        else
            echo "   (none in $artifacts: see libFuzzer's output above)" >&2
        fi
    fi
    rm -f "$marker"
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzzing found problems in: ${failed[*]}" >&2
    exit 1
fi
echo "== no crash in ${#targets[@]} target(s), $FUZZ_SECONDS s each"
