#!/usr/bin/env bash
# Isolation under hostile load (issue 15): the latency of small NAR hits from disk while one
# peer at a time tries to hog the cache, against the same hits alone, in one run. Loopback only;
# about two minutes.
#
#   NCPS=target/release/ncps bench/isolation.sh          (make bench-isolation)
#
# ncps runs with its defaults (64 workers, 64 upstream workers, 16 KiB/s minimum rates) in front
# of bench/isolation.py's upstream, and holds 64 small NARs (4 KiB, uploaded) and one of 64 MiB.
# The measured client (`isolation.py probe`): 4 keep-alive connections, each GET a random small
# NAR hit then sleep 5 ms, for $BENCH_ISO_SECS seconds. Hogs, one at a time, started 2 s before
# the probe and stopped after it:
#   alone     nothing else
#   drip      8 clients asking for narinfos the upstream sends at 1 byte every 2 s
#   flood     wrk -c200 on random narinfo hashes, against an upstream taking 1 s per 404
#   readers   4 x curl --limit-rate 4k of the 64 MiB NAR
#   uploads   8 uploaders sending a PUT body at 1 byte every 5 s
#   busy200   wrk -c200 on small NAR hits (keep-alive); its own p50/p99 are reported too
#   alone2    nothing again: the spread of the machine itself (it is shared)
# Targets: p99 under each hog within 2x of alone and under 50 ms.
#
# Knobs (env): NCPS, BENCH_ISO_SECS (10), BENCH_ISO_PORT_BASE (19270), BENCH_KEEP=1,
#   BENCH_ISO_OUT (summary, default bench/last-isolation.txt).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
NCPS=${NCPS:-$ROOT/target/release/ncps}
case "$NCPS" in /*) ;; *) NCPS=$ROOT/$NCPS ;; esac
SECS=${BENCH_ISO_SECS:-10}
PORT_BASE=${BENCH_ISO_PORT_BASE:-19270}
OUT=${BENCH_ISO_OUT:-$HERE/last-isolation.txt}
P_UP=$PORT_BASE
P_NCPS=$((PORT_BASE + 1))
PY="python3 $HERE/isolation.py"
for t in curl python3 wrk; do
  command -v $t >/dev/null || { echo "bench: missing $t (make bench-deps)" >&2; exit 1; }
done
[ -x "$NCPS" ] || { echo "bench: no ncps binary at $NCPS (cargo build --release)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/ncps-bench-isolation.XXXXXX)
UP_PID=""
NCPS_PID=""
HOGS=()
WAITS=() # hogs that end by themselves (wrk, which prints its figures at the end)
stop_hogs() {
  for p in "${WAITS[@]}"; do wait "$p" 2>/dev/null || true; done
  WAITS=()
  for p in "${HOGS[@]}"; do kill -- "-$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done
  for p in "${HOGS[@]}"; do wait "$p" 2>/dev/null || true; done
  HOGS=()
}
cleanup() {
  stop_hogs
  for p in $NCPS_PID $UP_PID; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ "${BENCH_KEEP:-}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
set -m # each hog in its own process group, so that stopping it stops its children

$PY upstream "$P_UP" &
UP_PID=$!
TOKEN=bench-write-token
"$NCPS" serve --cache-hostname bench.local --cache-data-path "$WORK/data" \
  --server-addr "127.0.0.1:$P_NCPS" --upstream-cache "http://127.0.0.1:$P_UP" \
  --cache-allow-put-verb --cache-write-token "$TOKEN" --log-level warn >"$WORK/ncps.log" 2>&1 &
NCPS_PID=$!
URL=http://127.0.0.1:$P_NCPS
for _ in $(seq 100); do curl -sf "$URL/nix-cache-info" >/dev/null && break; sleep 0.1; done

$PY nars "$WORK/small" 64 4096 >"$WORK/small.list"
$PY nars "$WORK/big" 1 $((64 << 20)) >"$WORK/big.list"
for f in "$WORK"/small/*.nar "$WORK"/big/*.nar; do $PY upload "$URL" "$TOKEN" "$f"; done
BIG=$(cat "$WORK/big.list")
# wrk's list of hit paths (one request per line, picked at random).
cat >"$WORK/hits.lua" <<EOF
local names = {}
for l in io.lines("$WORK/small.list") do names[#names + 1] = l end
math.randomseed(os.time())
function request() return wrk.format("GET", "/nar/" .. names[math.random(#names)]) end
EOF
cat >"$WORK/misses.lua" <<'EOF'
local a = "0123456789abcdfghijklmnpqrsvwxyz"
math.randomseed(os.time())
function request()
  local t = {}
  for i = 1, 32 do local k = math.random(2, 32); t[i] = a:sub(k, k) end
  t[1] = "0" -- never "d": those drip
  return wrk.format("GET", "/" .. table.concat(t) .. ".narinfo")
end
EOF

hog() { # name: starts the hog's processes in the background
  case $1 in
    alone|alone2) ;;
    drip)
      for i in $(seq 8); do
        ( while :; do curl -s -o /dev/null --max-time 30 "$URL/d$(printf '%031d' $((RANDOM * 1000 + i))).narinfo"; done ) &
        HOGS+=($!)
      done ;;
    flood)
      wrk -t2 -c200 -d$((SECS + 3))s --timeout 30s -s "$WORK/misses.lua" "$URL" >"$WORK/flood.wrk" 2>&1 &
      WAITS+=($!) ;;
    readers)
      for _ in 1 2 3 4; do
        ( while :; do curl -s -o /dev/null --limit-rate 4k "$URL/nar/$BIG"; done ) &
        HOGS+=($!)
      done ;;
    uploads)
      for _ in $(seq 8); do
        ( while :; do $PY drip-put "$URL" "$TOKEN" $((SECS + 4)); done ) &
        HOGS+=($!)
      done ;;
    busy200)
      wrk -t2 -c200 -d$((SECS + 3))s --latency -s "$WORK/hits.lua" "$URL" >"$WORK/busy200.wrk" 2>&1 &
      WAITS+=($!) ;;
  esac
}

{
  echo "# isolation: small NAR hits (4 KiB) under one hog at a time; $SECS s each"
  echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) cores; ncps $("$NCPS" --version 2>/dev/null || echo '?')"
  printf '%-8s %9s %9s %9s %7s %6s %9s %9s\n' hog p50_ms p99_ms max_ms count errors p99/alone under50
} | tee "$OUT"
ALONE_P99=""
for h in alone drip flood readers uploads busy200 alone2; do
  hog "$h"
  case $h in alone*) ;; *) sleep 2 ;; esac
  read -r p50 p99 max count errors < <($PY probe "$URL" "$WORK/small.list" "$SECS")
  stop_hogs
  [ -n "$ALONE_P99" ] || ALONE_P99=$p99
  ratio=$(python3 -c "print(f'{$p99 / max($ALONE_P99, 0.001):.2f}')")
  ok=$(python3 -c "print('yes' if $p99 < 50 else 'NO')")
  printf '%-8s %9s %9s %9s %7s %6s %9s %9s\n' "$h" "$p50" "$p99" "$max" "$count" "$errors" "$ratio" "$ok" | tee -a "$OUT"
  sleep 1
done
if [ -f "$WORK/busy200.wrk" ]; then
  echo "# busy200: wrk -c200 hits themselves:" | tee -a "$OUT"
  grep -E "Requests/sec|^ +50%|^ +99%|Socket errors|Non-2xx" "$WORK/busy200.wrk" | sed 's/^/#   /' | tee -a "$OUT"
fi
if [ -f "$WORK/flood.wrk" ]; then
  echo "# flood: wrk -c200 misses: $(grep -E 'requests in|Non-2xx|Socket errors' "$WORK/flood.wrk" | xargs)" | tee -a "$OUT"
fi
echo "# ncps warnings/errors during the run: $(grep -cE ' (WARN|ERROR) ' "$WORK/ncps.log" || true)" | tee -a "$OUT"
