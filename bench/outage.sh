#!/usr/bin/env bash
# Misses while the only upstream is down (issue 13): what a client is answered, and how long it
# waits. Loopback only; about a minute.
#
#   NCPS=target/release/ncps bench/outage.sh          (make bench-outage)
#
# For each way the upstream can be down:
#   refused  nothing listens on its port
#   hanging  a listener that accepts connections and never answers
#   500      an HTTP server answering 500 to everything
# ncps runs with its default upstream timeouts (3 s to connect, 3 s for the head). Then
# $BENCH_OUTAGE_MISSES narinfo lookups of distinct random hashes, one after the other, each timed
# by curl. Reported: the status and time of the first three (before the upstream can be marked
# down) and the median of the rest. Peer: the same lookup sent straight to the upstream (curl
# with the same 3 s connect and 6 s total limits).
#
# Knobs (env): NCPS, BENCH_OUTAGE_MISSES (12), BENCH_OUTAGE_PORT_BASE (19170), BENCH_KEEP=1,
#   BENCH_OUTAGE_OUT (summary, default bench/last-outage.txt).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
NCPS=${NCPS:-$ROOT/target/release/ncps}
case "$NCPS" in /*) ;; *) NCPS=$ROOT/$NCPS ;; esac
MISSES=${BENCH_OUTAGE_MISSES:-12}
PORT_BASE=${BENCH_OUTAGE_PORT_BASE:-19170}
OUT=${BENCH_OUTAGE_OUT:-$HERE/last-outage.txt}
P_UP=$PORT_BASE
P_NCPS=$((PORT_BASE + 1))
for t in curl python3; do
  command -v $t >/dev/null || { echo "bench: missing $t" >&2; exit 1; }
done
[ -x "$NCPS" ] || { echo "bench: no ncps binary at $NCPS (cargo build --release)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/ncps-bench-outage.XXXXXX)
UP_PID=""
NCPS_PID=""
cleanup() {
  for p in $NCPS_PID $UP_PID; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ "${BENCH_KEEP:-}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

# The misbehaving upstream: `hang` accepts and says nothing, `500` answers 500 to everything.
cat > "$WORK/upstream.py" <<'EOF'
import socket, sys, threading
mode, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port)); s.listen(512)
held = []
def serve(c):
    if mode == "hang":
        held.append(c); return
    try:
        c.recv(65536)
        c.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
EOF

random_hash() { tr -dc '0123456789abcdfghijklmnpqrsvwxyz' < /dev/urandom | head -c 32; }

# "STATUS SECONDS" of one GET.
timed_get() { curl -s -o /dev/null --connect-timeout 3 --max-time 6 -w '%{http_code} %{time_total}\n' "$1" || true; }

ms() { awk '{ printf "%.1f", $1 * 1000 }'; }

median_ms() { sort -n | awk '{ a[NR] = $1 } END { if (NR == 0) print "-"; else printf "%.2f", (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) * 1000 }'; }

start_ncps() {
  rm -rf "$WORK/data"; mkdir -p "$WORK/data"
  "$NCPS" serve --cache-hostname bench.lan --cache-data-path "$WORK/data" \
    --upstream-cache "http://127.0.0.1:$P_UP" --server-addr "127.0.0.1:$P_NCPS" \
    > "$WORK/ncps-$1.log" 2>&1 &
  NCPS_PID=$!
  for _ in $(seq 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$P_NCPS/nix-cache-info" && return 0
    sleep 0.05
  done
  echo "bench: ncps did not start; log:" >&2; cat "$WORK/ncps-$1.log" >&2; exit 1
}

{
  echo "bench/outage.sh: $("$NCPS" --version 2>/dev/null || echo ncps) ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo ?)), $(date -u +%FT%TZ), load $(cut -d' ' -f1 /proc/loadavg)"
  echo "narinfo misses of distinct hashes with the only upstream down; ncps's default timeouts (3 s + 3 s)"
  printf '%-8s | %-34s | %-18s | %s\n' "upstream" "ncps: misses 1-3 (status ms)" "ncps: median 4-$MISSES" "direct to the upstream"
  for mode in refused hang 500; do
    UP_PID=""
    if [ "$mode" != refused ]; then
      python3 "$WORK/upstream.py" "$mode" "$P_UP" & UP_PID=$!
      sleep 0.3
    fi
    start_ncps "$mode"
    first=""; rest=()
    for i in $(seq "$MISSES"); do
      read -r code secs < <(timed_get "http://127.0.0.1:$P_NCPS/$(random_hash).narinfo")
      if [ "$i" -le 3 ]; then first="$first $code $(echo "$secs" | ms);"; else rest+=("$code $secs"); fi
    done
    codes=$(printf '%s\n' "${rest[@]}" | cut -d' ' -f1 | sort -u | tr '\n' ' ')
    med=$(printf '%s\n' "${rest[@]}" | cut -d' ' -f2 | median_ms)
    read -r dcode dsecs < <(timed_get "http://127.0.0.1:$P_UP/$(random_hash).narinfo")
    printf '%-8s |%-35s | %s %s ms%*s | %s %s ms\n' "$mode" "$first" "$codes" "$med" 4 "" "$dcode" "$(echo "$dsecs" | ms)"
    kill "$NCPS_PID"; wait "$NCPS_PID" 2>/dev/null || true; NCPS_PID=""
    if [ -n "$UP_PID" ]; then kill "$UP_PID"; wait "$UP_PID" 2>/dev/null || true; UP_PID=""; fi
  done
  echo "(direct: curl's own status, 000 when it got no answer)"
} | tee "$OUT"
