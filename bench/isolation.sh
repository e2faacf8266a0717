#!/usr/bin/env bash
# Isolation under hostile load (issue 15): the latency of small NAR hits from disk while one
# peer at a time tries to hog the cache, against the same hits alone, in one run. Loopback only;
# about two minutes.
#
#   NCPS=target/release/ncps bench/isolation.sh          (make bench-isolation)
#
# ncps (restarted for each hog) runs with its defaults (64 workers, 64 upstream workers, 16 KiB/s minimum rates) in front
# of bench/isolation.py's upstream, and holds (uploaded) 64 small NARs (4 KiB), 64 medium ones
# (64 KiB) and one of 64 MiB. The measured clients (`isolation.py probe`), at the same time:
# 4 keep-alive connections from 127.0.0.1 getting random small NARs, 4 from 127.0.0.2 getting
# random medium ones, each sleeping 5 ms between requests, for $BENCH_ISO_SECS seconds. Hogs,
# all from 127.0.0.1, one at a time, started 3 s before the probes and stopped after them; each
# of the first ones is 80 strong, more than a pool has workers:
#   alone     nothing else
#   drip      80 clients asking for narinfos the upstream sends at 1 byte every 2 s
#   flood     wrk -c200 on random narinfo hashes, against an upstream taking 1 s per 404
#   readers   80 clients reading the 64 MiB NAR at 4 KiB/s
#   uploads   80 uploaders sending a PUT body at 1 byte every 5 s
#   busy200   wrk -c200 on small NAR hits (keep-alive); its own p50/p99 are reported too
#   alone2    nothing again: the spread of the machine itself (it is shared)
# Targets: p99 under each hog within 2x of alone and under 50 ms (busy200: under 50 ms).
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
URL=http://127.0.0.1:$P_NCPS
$PY nars "$WORK/small" 64 4096 >"$WORK/small.list"
$PY nars "$WORK/medium" 64 65536 >"$WORK/medium.list"
$PY nars "$WORK/big" 1 $((64 << 20)) >"$WORK/big.list"
# A fresh ncps for each hog, holding the NARs: what one hog left running (a lookup of a dripping
# narinfo takes 18 min) must not be measured as the next one's effect.
start_ncps() {
  if [ -n "$NCPS_PID" ]; then kill "$NCPS_PID" 2>/dev/null || true; wait "$NCPS_PID" 2>/dev/null || true; fi
  rm -rf "$WORK/data"
  "$NCPS" serve --cache-hostname bench.local --cache-data-path "$WORK/data" \
    --server-addr "127.0.0.1:$P_NCPS" --upstream-cache "http://127.0.0.1:$P_UP" \
    --cache-allow-put-verb --cache-write-token "$TOKEN" --log-level warn >>"$WORK/ncps.log" 2>&1 &
  NCPS_PID=$!
  for _ in $(seq 100); do curl -sf "$URL/nix-cache-info" >/dev/null && break; sleep 0.1; done
  for f in "$WORK"/small/*.nar "$WORK"/medium/*.nar "$WORK"/big/*.nar; do $PY upload "$URL" "$TOKEN" "$f"; done
}
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
    drip) $PY drip-get "$URL" 80 & HOGS+=($!) ;;
    flood)
      wrk -t2 -c200 -d$((SECS + 3))s --timeout 30s -s "$WORK/misses.lua" "$URL" >"$WORK/flood.wrk" 2>&1 &
      WAITS+=($!) ;;
    readers) $PY slow-read "$URL" "/nar/$BIG" 80 & HOGS+=($!) ;;
    uploads) $PY drip-put "$URL" "$TOKEN" 80 & HOGS+=($!) ;;
    busy200)
      wrk -t2 -c200 -d$((SECS + 3))s --latency -s "$WORK/hits.lua" "$URL" >"$WORK/busy200.wrk" 2>&1 &
      WAITS+=($!) ;;
  esac
}

{
  echo "# isolation: NAR hits under one hog at a time; $SECS s each; small = 4 KiB (answered by"
  echo "# the poll loop) from 127.0.0.1, medium = 64 KiB (needs a worker) from 127.0.0.2"
  echo "# $(date -u +%FT%TZ) $(uname -r) $(nproc) cores; $NCPS"
  printf '%-8s %8s %8s %8s %6s %8s %8s %8s %6s %4s\n' hog s_p50 s_p99 s_max s/alone m_p50 m_p99 m_max m/alone err
} | tee "$OUT"
S_ALONE=""
M_ALONE=""
for h in alone flood drip readers uploads busy200 alone2; do
  start_ncps
  hog "$h"
  case $h in alone*) ;; *) sleep 3 ;; esac
  $PY probe "$URL" "$WORK/medium.list" "$SECS" 127.0.0.2 >"$WORK/medium.out" &
  m_pid=$!
  read -r sp50 sp99 smax _ serr < <($PY probe "$URL" "$WORK/small.list" "$SECS" 127.0.0.1)
  wait $m_pid || true
  read -r mp50 mp99 mmax _ merr <"$WORK/medium.out"
  stop_hogs
  [ -n "$S_ALONE" ] || { S_ALONE=$sp99; M_ALONE=$mp99; }
  ratio() { python3 -c "import sys; a, b = map(float, sys.argv[1:]); print(f'{a / max(b, 0.001):.2f}')" "$1" "$2"; }
  sr=$(ratio "$sp99" "$S_ALONE")
  mr=$(ratio "$mp99" "$M_ALONE")
  printf '%-8s %8s %8s %8s %6s %8s %8s %8s %6s %4s\n' "$h" "$sp50" "$sp99" "$smax" "$sr" "$mp50" "$mp99" "$mmax" "$mr" $((serr + merr)) | tee -a "$OUT"
  sleep 1
done
if [ -f "$WORK/busy200.wrk" ]; then
  echo "# busy200: wrk -c200 small hits themselves:" | tee -a "$OUT"
  grep -E "Requests/sec|^ +50%|^ +99%|Socket errors|Non-2xx" "$WORK/busy200.wrk" | sed 's/^/#   /' | tee -a "$OUT"
fi
if [ -f "$WORK/flood.wrk" ]; then
  echo "# flood: wrk -c200 misses: $(grep -E 'requests in|Non-2xx|Socket errors' "$WORK/flood.wrk" | xargs)" | tee -a "$OUT"
fi
echo "# ncps errors during the run: $(grep -cE ' ERROR ' "$WORK/ncps.log" || true)" | tee -a "$OUT"
