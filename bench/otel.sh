#!/usr/bin/env bash
# bench/otel.sh -- what OpenTelemetry costs ncps (issue 16): the same ncps with telemetry off,
# on to a real collector over OTLP/gRPC, and on over OTLP/HTTP (Rotel with its blackhole
# exporter, tests/rotel.sh), in one run:
#   - idle RSS (VmRSS) 5 s after start, and after the load below;
#   - idle wake-ups: context switches of all ncps threads over BENCH_IDLE seconds, idle;
#   - narinfo hits (answered by the poll loop, a span and a log record each with telemetry
#     on) and GET /healthz (answered by a worker): wrk -c32 -t2, median of BENCH_ROUNDS
#     interleaved rounds, requests/s and the cost per request in microseconds vs off.
#
#   NCPS=target/static/ncps-x86_64 bash bench/otel.sh
#
# Loopback only. Needs wrk, python3 (the upstream: http.server with one narinfo), Rotel.
# Knobs: NCPS, BENCH_ROUNDS (5), BENCH_IDLE (30), BENCH_WRK_DURATION (3s), BENCH_PORT_BASE
# (19300), BENCH_OUT (default bench/last-otel.txt).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
NCPS=${NCPS:-$ROOT/target/release/ncps}
ROUNDS=${BENCH_ROUNDS:-5}
IDLE=${BENCH_IDLE:-30}
DUR=${BENCH_WRK_DURATION:-3s}
BASE=${BENCH_PORT_BASE:-19300}
OUT=${BENCH_OUT:-$HERE/last-otel.txt}
P_UP=$BASE; P_GRPC=$((BASE + 1)); P_HTTP=$((BASE + 2)); P_NCPS=$((BASE + 10))

WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
: > "$OUT"
report() { echo "$*" | tee -a "$OUT"; }

# The upstream: one narinfo (never verified: no keys are given), served by python.
H=0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
N=0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
mkdir -p "$WORK/up"
printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n' > "$WORK/up/nix-cache-info"
cat > "$WORK/up/$H.narinfo" <<EOF
StorePath: /nix/store/$H-bench
URL: nar/$N.nar.xz
Compression: xz
FileHash: sha256:$N
FileSize: 1000
NarHash: sha256:$N
NarSize: 2000
References: 
EOF
python3 -m http.server "$P_UP" --bind 127.0.0.1 -d "$WORK/up" > "$WORK/up.log" 2>&1 &
PIDS+=($!)

AGENT=$(bash "$ROOT/tests/rotel.sh")
"$AGENT" start --exporter blackhole --otlp-grpc-endpoint "127.0.0.1:$P_GRPC" --otlp-http-endpoint "127.0.0.1:$P_HTTP" \
  --pid-file "$WORK/rotel.pid" --log-file "$WORK/rotel-agent.log" > "$WORK/rotel.log" 2>&1 &
PIDS+=($!)
sleep 1

rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s}'; }
wrk_rps() { wrk -c32 -t2 -d"$DUR" "$1" 2>/dev/null | awk '/^Requests\/sec/ {print $2}'; }
# CPU time of ncps (all threads, user + system), in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# wrk on $1 against ncps: "requests/s ncps-CPU-us-per-request"; the exporter's work (encoding,
# sending) is done by then or within the 1.5 s after, which is counted too.
measure() {
  local t0 t1 rps
  t0=$(cpu_ticks "$NCPS_PID")
  rps=$(wrk_rps "$1")
  sleep 1.5
  t1=$(cpu_ticks "$NCPS_PID")
  awk -v r="$rps" -v d="${DUR%s}" -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "%s %.1f", r, t / hz * 1e6 / (r * d) }'
}
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

NCPS_PID=
start_ncps() {
  local mode=$1 data=$WORK/data-$1
  rm -rf "$data"; mkdir -p "$data"
  local flags=()
  case $mode in
    grpc) flags=(--otel-enabled --otel-grpc-url "http://127.0.0.1:$P_GRPC") ;;
    http) flags=(--otel-enabled --otel-endpoint "http://127.0.0.1:$P_HTTP" --otel-protocol http/protobuf) ;;
  esac
  "$NCPS" serve --cache-hostname bench --cache-data-path "$data" --upstream-cache "http://127.0.0.1:$P_UP" \
    --server-addr "127.0.0.1:$P_NCPS" --prometheus-enabled "${flags[@]}" > "$WORK/ncps-$mode.out" 2> "$WORK/ncps-$mode.err" &
  NCPS_PID=$!
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$P_NCPS/nix-cache-info" && break; sleep 0.05; done
  curl -sf -o /dev/null "http://127.0.0.1:$P_NCPS/$H.narinfo" || { echo "ncps ($mode) did not serve the narinfo"; cat "$WORK/ncps-$mode.err"; exit 1; }
}
stop_ncps() { kill "$NCPS_PID" 2>/dev/null || true; wait "$NCPS_PID" 2>/dev/null || true; }

report "== bench/otel.sh: $NCPS ($(stat -c %s "$NCPS") bytes), $(date -u +%FT%TZ), $(nproc) cores"
declare -A IDLE_RSS IDLE_SW LOAD_RSS
for mode in off grpc http; do
  start_ncps "$mode"
  sleep 5
  IDLE_RSS[$mode]=$(rss "$NCPS_PID")
  a=$(switches "$NCPS_PID"); sleep "$IDLE"; b=$(switches "$NCPS_PID")
  IDLE_SW[$mode]=$((b - a))
  stop_ncps
done
report "idle, ${IDLE}s: context switches of all threads (off / grpc / http): ${IDLE_SW[off]} / ${IDLE_SW[grpc]} / ${IDLE_SW[http]}"
report "idle RSS 5 s after start, KiB (off / grpc / http): ${IDLE_RSS[off]} / ${IDLE_RSS[grpc]} / ${IDLE_RSS[http]}"

declare -A NI HZ NIC HZC COUNTS
for r in $(seq "$ROUNDS"); do
  for mode in off grpc http; do
    start_ncps "$mode"
    read -r rps cpu <<<"$(measure "http://127.0.0.1:$P_NCPS/$H.narinfo")"
    NI[$mode]="${NI[$mode]:-} $rps"; NIC[$mode]="${NIC[$mode]:-} $cpu"
    read -r rps cpu <<<"$(measure "http://127.0.0.1:$P_NCPS/healthz")"
    HZ[$mode]="${HZ[$mode]:-} $rps"; HZC[$mode]="${HZC[$mode]:-} $cpu"
    LOAD_RSS[$mode]=$(rss "$NCPS_PID")
    [ "$mode" = off ] || COUNTS[$mode]=$(curl -s "http://127.0.0.1:$P_NCPS/metrics" | grep '^ncps_otel' | tr '\n' ' ')
    stop_ncps
  done
done
# Extra time per request, at the concurrency wrk keeps (the 2 cores are shared by ncps and wrk).
us() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.2f", 1e6 / b - 1e6 / a }'; }
for what in NI HZ; do
  declare -n m=$what
  declare -n c=${what}C
  off=$(median <<<"${m[off]}"); grpc=$(median <<<"${m[grpc]}"); http=$(median <<<"${m[http]}")
  name=$([ "$what" = NI ] && echo "narinfo hit (poll loop)" || echo "GET /healthz (worker)")
  report "$name, ncps CPU per request (us, median; exporter included): off $(median <<<"${c[off]}"), grpc $(median <<<"${c[grpc]}"), http $(median <<<"${c[http]}")"
  report "$name, requests/s, median of $ROUNDS: off $off, grpc $grpc ($(awk -v a="$grpc" -v b="$off" 'BEGIN{printf "%.2f", a/b}')x, $(us "$off" "$grpc") us/request), http $http ($(awk -v a="$http" -v b="$off" 'BEGIN{printf "%.2f", a/b}')x, $(us "$off" "$http") us)"
  report "  rounds: off${m[off]}; grpc${m[grpc]}; http${m[http]}"
done
report "RSS after the last round's load, KiB (off / grpc / http): ${LOAD_RSS[off]} / ${LOAD_RSS[grpc]} / ${LOAD_RSS[http]}"
for mode in grpc http; do
  report "/metrics after the last round ($mode): ${COUNTS[$mode]}"
done
