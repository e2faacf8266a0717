#!/usr/bin/env bash
# `make fuzz`: runs every fuzz target for FUZZ_SECONDS (default 60) each, one after another.
# Not part of `make test` or CI. Needs cargo-fuzz (installed here when missing) and a compiler
# that takes -Zsanitizer: a nightly toolchain when rustup has one, else the stable one with
# RUSTC_BOOTSTRAP=1.
#
#   FUZZ_SECONDS=300 make fuzz           longer runs
#   FUZZ_TARGETS="narinfo" make fuzz     only some targets
#   FUZZ_JOBS=2 make fuzz                parallel fuzzing processes per target
#
# The corpus grows in fuzz/corpus/<target>/ (not committed) and starts from fuzz/seeds/<target>/.
# A crash stops the run: cargo-fuzz leaves the input in fuzz/artifacts/<target>/. Minimise it
# (`cargo fuzz tmin <target> <file>`), copy it to fuzz/regressions/<target>/, and
# tests/fuzz_regressions.rs replays it under `cargo test` from then on.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_JOBS=${FUZZ_JOBS:-1}
FUZZ_TARGETS=${FUZZ_TARGETS:-"narinfo request_path parsers"}

if ! command -v cargo-fuzz >/dev/null; then
    echo "installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

toolchain=()
if command -v rustup >/dev/null && rustup run nightly rustc --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    # cargo-fuzz passes -Zsanitizer=address and friends; this lets a stable compiler take them.
    export RUSTC_BOOTSTRAP=1
fi

# AddressSanitizer needs the toolchain's ASan runtime, which rustup's toolchains ship and
# Debian's rustc does not; the parsers are safe Rust, so fuzzing without it still finds panics.
fuzz_flags=(--fuzz-dir fuzz --target-dir fuzz/target)
if ! cargo "${toolchain[@]}" fuzz build "${fuzz_flags[@]}"; then
    echo "building with AddressSanitizer failed; building without a sanitizer" >&2
    fuzz_flags+=(--sanitizer none)
    cargo "${toolchain[@]}" fuzz build "${fuzz_flags[@]}"
fi

# With more than one job libFuzzer forks workers that log to fuzz-<n>.log in the current
# directory; one job runs in this process and prints here.
parallel=()
if [ "$FUZZ_JOBS" -gt 1 ]; then
    parallel=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
fi

status=0
for t in $FUZZ_TARGETS; do
    mkdir -p "fuzz/corpus/$t"
    echo "== fuzzing $t for ${FUZZ_SECONDS}s"
    # The seeds go in as a second, read-only corpus directory: new inputs land in fuzz/corpus.
    if ! cargo "${toolchain[@]}" fuzz run "${fuzz_flags[@]}" \
        "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_len=65536 -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 "${parallel[@]}"; then
        echo "!! $t found a crash: see fuzz/artifacts/$t/" >&2
        status=1
    fi
done
exit $status
