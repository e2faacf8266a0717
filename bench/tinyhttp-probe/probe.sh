#!/usr/bin/env bash
# tiny_http 0.12 probe: large-file throughput vs nginx (sendfile on) and a std::net
# sendfile baseline; slowloris; accept() failure (EMFILE).
# Usage: bench/tinyhttp-probe/probe.sh [REPS]   (loopback only, ~1-2 minutes)
set -euo pipefail
REPS=${REPS:-${1:-7}}
HERE=$(cd "$(dirname "$0")" && pwd)
W=$(mktemp -d /tmp/thprobe.XXXXXX); chmod 755 "$W"   # nginx workers run as nobody
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  [ -f "$W/nginx.pid" ] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true
  sleep 0.2
  rm -rf "$W"
}
trap cleanup EXIT INT TERM

(cd "$HERE" && cargo build --release -q)
BIN=$HERE/target/release/tinyhttp-probe

echo "# building files in $W"
head -c 64M /dev/urandom > "$W/f64M"
head -c 1G /dev/urandom > "$W/f1G"
cat "$W/f64M" "$W/f1G" > /dev/null  # page-cache them

P_NGINX=18801 P_TINY=18802 P_STD=18803 P_SF=18804 P_TB=18805
mkdir -p "$W/nginx"
cat > "$W/nginx.conf" <<EOF
worker_processes 1;
pid $W/nginx.pid;
error_log $W/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path $W/nginx/body;
  proxy_temp_path $W/nginx/proxy;
  fastcgi_temp_path $W/nginx/fcgi;
  uwsgi_temp_path $W/nginx/uwsgi;
  scgi_temp_path $W/nginx/scgi;
  default_type application/octet-stream;
  server { listen 127.0.0.1:$P_NGINX; root $W; }
}
EOF
nginx -p "$W/nginx" -c "$W/nginx.conf"

wait_port() { for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.05; done; echo "port $1 not up" >&2; return 1; }

"$BIN" tiny 127.0.0.1:$P_TINY "$W/f64M" > /dev/null 2>"$W/tiny64.err" & PIDS+=($!)
"$BIN" std 127.0.0.1:$P_STD "$W/f64M" > /dev/null 2>"$W/std64.err" & PIDS+=($!)
wait_port $P_TINY; wait_port $P_STD; wait_port $P_NGINX || true

# median of REPS runs of curl speed (bytes/s)
measure() { # url
  local i
  for i in $(seq "$REPS"); do curl -s -o /dev/null -w '%{speed_download}\n' "$1"; done | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'
}
mbs() { awk -v b="$1" 'BEGIN{printf "%.0f", b/1048576}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", a/b}'; }

run_size() { # file label
  kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; PIDS=()
  "$BIN" tiny 127.0.0.1:$P_TINY "$W/$1" > /dev/null 2>"$W/tiny.err" & PIDS+=($!)
  "$BIN" std 127.0.0.1:$P_STD "$W/$1" > /dev/null 2>"$W/std.err" & PIDS+=($!)
  "$BIN" sendfile 127.0.0.1:$P_SF "$W/$1" > /dev/null 2>"$W/sf.err" & PIDS+=($!)
  "$BIN" tiny-bigbuf 127.0.0.1:$P_TB "$W/$1" > /dev/null 2>"$W/tb.err" & PIDS+=($!)
  wait_port $P_TINY; wait_port $P_STD; wait_port $P_SF; wait_port $P_TB
  # warm-up
  local u; for u in "$P_NGINX/$1" "$P_TINY/" "$P_STD/" "$P_SF/" "$P_TB/"; do curl -s -o /dev/null "http://127.0.0.1:$u"; done
  local n t s f b r i
  # interleaved rounds (nginx, tiny, tiny-bigbuf, std, sendfile, repeated) so drift from other
  # load on the machine hits every server alike; median per server
  local urls=("$P_NGINX/$1" "$P_TINY/" "$P_TB/" "$P_STD/" "$P_SF/")
  for r in $(seq "$REPS"); do
    for i in 0 1 2 3 4; do echo "$i $(curl -s -o /dev/null -w '%{speed_download}' "http://127.0.0.1:${urls[$i]}")"; done
  done > "$W/speeds"
  med() { awk -v k="$1" '$1==k{print $2}' "$W/speeds" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
  n=$(med 0); t=$(med 1); b=$(med 2); s=$(med 3); f=$(med 4)
  local n2; n2=$(awk '$1==0{print $2}' "$W/speeds" | sort -n | awk '{a[NR]=$1} END{printf "min %.0f max %.0f", a[1]/1048576, a[NR]/1048576}')
  echo "$2: nginx $(mbs "$n") MiB/s ($n2) | tiny_http $(mbs "$t") MiB/s = $(ratio "$t" "$n")x | tiny_http+1MiB BufReader $(mbs "$b") MiB/s = $(ratio "$b" "$n")x | std io::copy $(mbs "$s") MiB/s = $(ratio "$s" "$n")x | std+libc::sendfile $(mbs "$f") MiB/s = $(ratio "$f" "$n")x   (median of $REPS interleaved rounds, curl -o /dev/null; load $(cut -d" " -f1 /proc/loadavg))"
}

echo "## throughput"
run_size f64M 64MiB
run_size f1G 1GiB
[ "${THROUGHPUT_ONLY:-0}" = 1 ] && exit 0

echo "## tiny_http syscalls while serving 64 MiB (strace -c -f, top lines)"
kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; PIDS=()
if command -v strace >/dev/null; then
  "$BIN" tiny 127.0.0.1:$P_TINY "$W/f64M" > /dev/null 2>&1 & PIDS+=($!)
  "$BIN" std 127.0.0.1:$P_STD "$W/f64M" > /dev/null 2>&1 & PIDS+=($!)
  wait_port $P_TINY; wait_port $P_STD
  timeout 20 strace -c -f -p "${PIDS[0]}" -o "$W/strace.tiny" & ST=$!; sleep 0.5
  curl -s -o /dev/null "http://127.0.0.1:$P_TINY/"; sleep 0.3; kill -INT $ST; wait $ST 2>/dev/null || true
  head -8 "$W/strace.tiny"
  timeout 20 strace -c -f -p "${PIDS[1]}" -o "$W/strace.std" & ST=$!; sleep 0.5
  curl -s -o /dev/null "http://127.0.0.1:$P_STD/"; sleep 0.3; kill -INT $ST; wait $ST 2>/dev/null || true
  echo "-- std:"; head -8 "$W/strace.std"
fi

echo "## slowloris: 300 connections sending a partial request line"
kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; PIDS=()
echo hello > "$W/small"
"$BIN" tiny 127.0.0.1:$P_TINY "$W/small" > /dev/null 2>&1 & TP=$!; PIDS+=($TP)
"$BIN" std 127.0.0.1:$P_STD "$W/small" > /dev/null 2>&1 & SP=$!; PIDS+=($SP)
wait_port $P_TINY; wait_port $P_STD
rss() { awk '/VmRSS/{print $2" kB"}' /proc/$1/status; }
for target in "tiny_http:$P_TINY:$TP" "std-thread-per-conn:$P_STD:$SP" "nginx-worker:$P_NGINX:$(pgrep -P "$(cat "$W/nginx.pid")" | head -1)"; do
  IFS=: read -r name port pid <<<"$target"
  sleep 1
  before_thr=$(ls /proc/$pid/task | wc -l); before_rss=$(rss $pid)
  python3 - "$port" 300 60 <<'PY' & LP=$!
import socket, sys, time
port, n, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /sm")          # partial request line, never finished
    socks.append(s)
print("open", len(socks), flush=True)
time.sleep(hold)
PY
  sleep 2
  [ "$name" = nginx-worker ] && path=/small || path=/
  t=$(curl -s -o /dev/null -m 10 -w '%{http_code} %{time_total}' "http://127.0.0.1:$port$path") || t="$t (curl failed rc=$?)"
  # tiny_http idle pool threads linger; count now
  thr=$(ls /proc/$pid/task | wc -l); r=$(rss $pid)
  echo "$name: normal request during slowloris -> $t s | threads $before_thr -> $thr | RSS $before_rss -> $r"
  kill $LP 2>/dev/null; wait $LP 2>/dev/null || true
done

echo "## accept() failure: server run with ulimit -n 64, 80 connections opened then closed"
kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; PIDS=()
for mode in tiny std; do
  port=$([ $mode = tiny ] && echo $P_TINY || echo $P_STD)
  (ulimit -n 64; exec "$BIN" $mode 127.0.0.1:$port "$W/small") > /dev/null 2>"$W/emfile.$mode.err" & pid=$!; PIDS+=($pid)
  wait_port $port
  python3 - "$port" 80 <<'PY'
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
socks, err = [], None
for _ in range(n):
    try: socks.append(socket.create_connection(("127.0.0.1", port), timeout=2))
    except OSError as e: err = e; break
print("   opened %d of %d connections%s" % (len(socks), n, "" if err is None else " (then: %s)" % err))
time.sleep(1.0)
for s in socks: s.close()
PY
  sleep 1
  r1=$(curl -s -o /dev/null -m 3 -w '%{http_code} %{time_total}' "http://127.0.0.1:$port/") || r1="$r1 (curl failed rc=$?)"
  sleep 2
  r2=$(curl -s -o /dev/null -m 3 -w '%{http_code} %{time_total}' "http://127.0.0.1:$port/") || r2="$r2 (curl failed rc=$?)"
  echo "$mode: after EMFILE burst, request 1 -> $r1, request 2 (2 s later) -> $r2; alive=$(kill -0 $pid 2>/dev/null && echo yes || echo no) threads=$(ls /proc/$pid/task 2>/dev/null | wc -l)"
  echo "   stderr: $(grep -E 'panicked|called|error' "$W/emfile.$mode.err" | sort | uniq -c | head -3 | tr '\n' ';')"
done
