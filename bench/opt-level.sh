#!/usr/bin/env bash
# Which opt-level ships? Builds the release binary twice, at opt-level 3 and "s" (each in its
# own target dir, so the checkout's target/ is untouched), then in one run:
#   1. prints both sizes;
#   2. runs bench/run.sh sections a (64 MiB and 1 GiB hits, plus the 1 GiB miss from an
#      unlimited upstream, where hashing is the CPU cost), b and c with each binary,
#      alternating 3,s,3,s so that drift on this noisy VM hits both alike;
#   3. times zstd stream decoding (ncps asks every upstream for Content-Encoding: zstd) with
#      the zstd crate compiled at each level, because "s" also compiles zstd's C with -Os.
#
#   bash bench/opt-level.sh          (~10 min on 2 cores; needs what bench/run.sh needs)
#
# Summary in bench/last-opt-level.txt (BENCH_OUT to change).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
OUT=${BENCH_OUT:-$HERE/last-opt-level.txt}
WORK=$(mktemp -d /tmp/ncps-opt-level.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

: >"$OUT"
say() { echo "$*" | tee -a "$OUT"; }

say "ncps-rs opt-level comparison $(date -u +%FT%TZ) $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"

for lvl in 3 s; do
    CARGO_PROFILE_RELEASE_OPT_LEVEL=$lvl CARGO_TARGET_DIR=$WORK/target-$lvl \
        cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
    cp "$WORK/target-$lvl/release/ncps" "$WORK/ncps-$lvl"
    rm -rf "$WORK/target-$lvl"   # ~1 GB each; only the binary is needed
    say "size opt-level=$lvl: $(stat -c %s "$WORK/ncps-$lvl") bytes"
done

# A stand-alone decoder, built against the same zstd crate version as ncps.
ZSTD_VERSION=$(awk '/^name = "zstd"$/ { getline; gsub(/[^0-9.]/, ""); print; exit }' "$ROOT/Cargo.lock")
mkdir -p "$WORK/zb/src"
cat >"$WORK/zb/Cargo.toml" <<EOF
[package]
name = "zb"
version = "0.1.0"
edition = "2021"
[dependencies]
zstd = { version = "=$ZSTD_VERSION", default-features = false }
[profile.release]
lto = true
codegen-units = 1
EOF
cat >"$WORK/zb/src/main.rs" <<'EOF'
use std::io::Read;
use std::time::Instant;

// 256 MiB: one 64 KiB block in eight is random (stored raw by zstd), the rest random letters
// from a small alphabet (entropy-coded), so the decoder's hot loops do the work.
fn main() {
    let mut data = vec![0u8; 256 << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for (i, b) in data.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = if (i >> 16) % 8 == 0 { x as u8 } else { b"etaoinshrdlu \n/._-0123"[(x % 22) as usize] };
    }
    let comp = zstd::bulk::compress(&data, 3).expect("compress");
    let mut best = f64::MAX;
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..5 {
        let t = Instant::now();
        let mut d = zstd::stream::read::Decoder::new(&comp[..]).expect("decoder");
        let mut n = 0usize;
        loop {
            let k = d.read(&mut buf).expect("decode");
            if k == 0 { break; }
            n += k;
        }
        assert_eq!(n, data.len());
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{:.0} MiB/s (best of 5, 256 MiB from {} MiB)", 256.0 / best, comp.len() >> 20);
}
EOF
for lvl in 3 s; do
    CARGO_PROFILE_RELEASE_OPT_LEVEL=$lvl CARGO_TARGET_DIR=$WORK/zb/target \
        cargo build --release --quiet --manifest-path "$WORK/zb/Cargo.toml"
    cp "$WORK/zb/target/release/zb" "$WORK/zb-$lvl"
done

for round in 1 2; do
    for lvl in 3 s; do
        say "== round $round, opt-level=$lvl"
        BENCH_ONLY=abc NCPS=$WORK/ncps-$lvl BENCH_OUT=$WORK/run.txt \
            bash "$HERE/run.sh" >"$WORK/run-$round-$lvl.log" 2>&1 \
            || { say "bench/run.sh failed:"; tail -20 "$WORK/run-$round-$lvl.log" | tee -a "$OUT"; exit 1; }
        grep -E 'ratio|first fetch|VmHWM' "$WORK/run.txt" | tee -a "$OUT"
        say "zstd decode: $("$WORK/zb-$lvl")"
    done
done
