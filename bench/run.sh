#!/usr/bin/env bash
# ncps benchmark harness (run by `make bench`). Loopback only; a few minutes on 2 cores.
#
#   NCPS=target/release/ncps bench/run.sh
#
# Compares ncps against nginx in one run and prints ratios:
#   a. large NAR hit (64 MiB, 1 GiB): ncps vs nginx (sendfile on) serving the same NAR file
#   b. narinfo hit: wrk -c32 -t2 -d3s, ncps vs nginx serving the same .narinfo file (median of
#      interleaved rounds)
#   c. cold miss of the 64 MiB NAR from a rate-limited upstream: ncps (fresh data dir) vs direct
#   d. 50 concurrent clients missing the same NAR from the slow upstream: upstream request count,
#      time to first byte, byte-identical bodies; same through nginx proxy_cache + proxy_cache_lock
#   e. memory: ncps idle RSS after start, peak RSS (VmHWM) during (d) and during (a)
#   f. slow-client coupling: during a miss, one client reads at 4 MB/s and a second, normal client
#      joins 0.3 s later; does the upstream fetch / the fast client wait for the slow one?
#      (compared with nginx proxy_cache_lock, which fills its cache independently of clients)
#   h. large NAR hits pinned (64 MiB, 1 GiB): both servers on CPU 0, curl on CPU 1, over new
#      connections and over keep-alive (unpinned runs swing too much to compare; issue 13)
#   m. cold miss of the 1 GiB NAR from the unlimited upstream: ncps (fresh data dir) vs direct
#
# Fixtures (a signed file:// binary cache built with the real Nix client: two store paths whose
# single file is 64 MiB / 1 GiB of random bytes, compression=none) are built once and reused from
# $BENCH_FIXTURES (default /var/tmp/ncps-bench-fixtures). Needs: nginx, curl, wrk, nix-bin.
#
# Knobs (env): NCPS, BENCH_FIXTURES, BENCH_WORK (default: mktemp), BENCH_KEEP=1 (keep work dir),
#   BENCH_PORT_BASE (19100), BENCH_SLOW_RATE (nginx limit_rate of the slow upstream, 48m),
#   BENCH_CLIENTS (50), BENCH_REPS (11: hit reps for 64 MiB; 1 GiB uses max(3, REPS/2)),
#   BENCH_MISS_REPS (3), BENCH_WRK_DURATION (3s), BENCH_ONLY (subset of "abcdefhm", default all),
#   BENCH_KEEPALIVE (4: transfers per keep-alive connection in h), BENCH_SERVER_CPU (0) and
#   BENCH_CLIENT_CPU (1) for h,
#   BENCH_SKIP_1G=1, BENCH_OUT (summary file, default bench/last-run.txt).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
NCPS_GIVEN=${NCPS:-}
NCPS=${NCPS:-$ROOT/target/release/ncps}
case "$NCPS" in /*) ;; *) NCPS=$ROOT/$NCPS ;; esac
FIX=${BENCH_FIXTURES:-/var/tmp/ncps-bench-fixtures}
PORT_BASE=${BENCH_PORT_BASE:-19100}
SLOW_RATE=${BENCH_SLOW_RATE:-48m}
CLIENTS=${BENCH_CLIENTS:-50}
REPS=${BENCH_REPS:-11}
MISS_REPS=${BENCH_MISS_REPS:-3}
WRK_DURATION=${BENCH_WRK_DURATION:-3s}
ONLY=${BENCH_ONLY:-abcdefhm}
KEEPALIVE=${BENCH_KEEPALIVE:-4}
SERVER_CPU=${BENCH_SERVER_CPU:-0}
CLIENT_CPU=${BENCH_CLIENT_CPU:-1}
OUT=${BENCH_OUT:-$HERE/last-run.txt}
FIXTURE_NONCE=ncps-bench-v1

# ports
P_UP_FAST=$PORT_BASE             # upstream nginx, unlimited
P_UP_SLOW=$((PORT_BASE + 1))     # upstream nginx, limit_rate $SLOW_RATE
P_REF=$((PORT_BASE + 2))         # reference nginx: sendfile on, serves the fixture cache dir
P_PROXY=$((PORT_BASE + 3))       # nginx proxy_cache + proxy_cache_lock in front of the slow upstream
P_NCPS_FAST=$((PORT_BASE + 10))  # ncps in front of the fast upstream (a, b)
P_NCPS_SLOW=$((PORT_BASE + 11))  # ncps in front of the slow upstream (c, d)

for t in nginx curl sha256sum; do
  command -v $t >/dev/null || { echo "bench: missing $t (apt-get install -y nginx-light curl)" >&2; exit 1; }
done

if [ -n "${BENCH_WORK:-}" ]; then WORK=$BENCH_WORK; mkdir -p "$WORK"; else WORK=$(mktemp -d /tmp/ncps-bench.XXXXXX); fi
chmod 755 "$WORK"

BG_PIDS=()       # every long-running process we start (nginx masters run with daemon off)
SAMPLER_PID=
cleanup() {
  local rc=$?
  set +e
  [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null
  for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${BG_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
  done
  wait 2>/dev/null
  if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "bench: kept work dir $WORK" >&2; else rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "bench: $*" >&2; }
SUMMARY=()
report() { echo "$*"; SUMMARY+=("$*"); }

for p in $P_UP_FAST $P_UP_SLOW $P_REF $P_PROXY $P_NCPS_FAST $P_NCPS_SLOW; do
  if ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then echo "bench: port $p busy (set BENCH_PORT_BASE)" >&2; exit 1; fi
done

# ---------- small helpers ----------
median() { sort -g | awk '{a[NR]=$1} END{ if (NR==0) print "nan"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
stat_line() { sort -g | awk '{a[NR]=$1; s+=$1} END{ if (NR==0) {print "n=0"; exit} printf "min %.3f  median %.3f  p90 %.3f  max %.3f  (n=%d)", a[1], (NR%2?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2), a[int(NR*0.9+0.999)], a[NR], NR }'; }
mib() { awk -v b="$1" 'BEGIN{printf "%.0f", b/1048576}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0==0) print "nan"; else printf "%.3f", a/b }'; }
http_code() { curl -s -o /dev/null -m "${2:-5}" -w '%{http_code}' "$1" 2>/dev/null || true; }
wait_http() { # url [tries*0.1s]
  local i
  for i in $(seq "${2:-100}"); do [ "$(http_code "$1" 2)" = 200 ] && return 0; sleep 0.1; done
  return 1
}
sha_of() { sha256sum "$1" | cut -d' ' -f1; }
narinfo_field() { sed -n "s/^$2: //p" "$1" | head -1; }
rss_kb() { awk -v k="$2" '$1==k":"{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
nthreads() { ls "/proc/$1/task" 2>/dev/null | wc -l; }

# ---------- fixtures ----------
build_fixtures() {
  if [ -f "$FIX/ok" ]; then return 0; fi
  command -v nix-build >/dev/null || { echo "bench: nix-build missing (apt-get install -y nix-bin)" >&2; exit 1; }
  log "building fixtures in $FIX (once)"
  rm -rf "$FIX"; mkdir -p "$FIX"
  export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nsubstitute = false\nbuild-users-group ='
  cat > "$FIX/fixture.nix" <<'EOF'
{ size, nonce }:
derivation {
  name = "ncps-bench-${size}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "/usr/bin/head -c ${size} /dev/urandom > $out" ];
  inherit nonce;
}
EOF
  nix-store --generate-binary-cache-key ncps-bench-upstream-1 "$FIX/secret-key" "$FIX/public-key"
  local size path
  for size in 64M 1G; do
    path=$(nix-build "$FIX/fixture.nix" --argstr size "$size" --argstr nonce "$FIXTURE_NONCE" --no-out-link)
    nix store sign --key-file "$FIX/secret-key" "$path"
    nix copy --to "file://$FIX/cache?compression=none" "$path"
    local h; h=$(basename "$path" | cut -c1-32)
    local url; url=$(narinfo_field "$FIX/cache/$h.narinfo" URL)
    echo "$size $h $url $(sha_of "$FIX/cache/$url")" >> "$FIX/paths"
  done
  chmod -R a+rX "$FIX"
  touch "$FIX/ok"
}

# ---------- nginx ----------
NGINX_COMMON="
  client_body_temp_path $WORK/ngx-tmp/body;
  proxy_temp_path $WORK/ngx-tmp/proxy;
  fastcgi_temp_path $WORK/ngx-tmp/fcgi;
  uwsgi_temp_path $WORK/ngx-tmp/uwsgi;
  scgi_temp_path $WORK/ngx-tmp/scgi;
  default_type application/octet-stream;
  types { text/x-nix-narinfo narinfo; }
  keepalive_requests 1000000;"
start_nginx() { # name workers http-body
  local name=$1 workers=$2 body=$3 d=$WORK/nginx-$1
  mkdir -p "$d" "$WORK/ngx-tmp"
  cat > "$d/nginx.conf" <<EOF
user root;
worker_processes $workers;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
$NGINX_COMMON
$body
}
EOF
  nginx -p "$d" -c "$d/nginx.conf" > "$d/stdout" 2>&1 &
  BG_PIDS+=($!)
  eval "NGINX_PID_$name=$!"
}

start_all_nginx() {
  start_nginx up 1 "
  log_format bench '\$msec \$request_uri \$status \$bytes_sent \$request_time';
  sendfile on; tcp_nopush on;
  server { listen 127.0.0.1:$P_UP_FAST; root $FIX/cache; access_log $WORK/upstream-access.log bench; }
  server { listen 127.0.0.1:$P_UP_SLOW; root $FIX/cache; access_log $WORK/upstream-access.log bench;
           limit_rate $SLOW_RATE; }"
  start_nginx ref auto "
  access_log off;
  sendfile on; tcp_nopush on;
  open_file_cache max=100 inactive=60s;
  server { listen 127.0.0.1:$P_REF; root $FIX/cache; }"
  start_nginx proxy 1 "
  access_log off;
  sendfile on; tcp_nopush on;
  proxy_cache_path $WORK/nginx-proxy/cache levels=1:2 keys_zone=bench:10m max_size=20g inactive=1h use_temp_path=off;
  server { listen 127.0.0.1:$P_PROXY;
    location / {
      proxy_pass http://127.0.0.1:$P_UP_SLOW;
      proxy_http_version 1.1;
      proxy_buffering on;
      proxy_cache bench;
      proxy_cache_valid 200 1h;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 120s;
      proxy_cache_lock_age 120s;
    }
  }"
  wait_http "http://127.0.0.1:$P_UP_FAST/nix-cache-info" || { log "upstream nginx did not start"; cat "$WORK"/nginx-up/*.log >&2; exit 1; }
  wait_http "http://127.0.0.1:$P_REF/nix-cache-info" || { log "reference nginx did not start"; exit 1; }
  wait_http "http://127.0.0.1:$P_UP_SLOW/nix-cache-info" || { log "slow upstream nginx did not start"; exit 1; }
}
upstream_lines() { [ -f "$WORK/upstream-access.log" ] && wc -l < "$WORK/upstream-access.log" || echo 0; }
upstream_count_since() { # line-offset pattern
  tail -n +"$(( $1 + 1 ))" "$WORK/upstream-access.log" 2>/dev/null | awk -v p="$2" '$2 ~ p' | wc -l
}

# ---------- ncps ----------
NCPS_OK=0
NCPS_PID=
start_ncps() { # name upstream-port listen-port
  local name=$1 d=$WORK/ncps-$1
  rm -rf "$d"; mkdir -p "$d/data"
  "$NCPS" serve --cache-hostname bench.local --cache-data-path "$d/data" \
    --upstream-cache "http://127.0.0.1:$2" --upstream-public-key "$(cat "$FIX/public-key")" \
    --server-addr "127.0.0.1:$3" ${BENCH_NCPS_ARGS:-} > "$d/stdout" 2> "$d/stderr" &
  NCPS_PID=$!
  BG_PIDS+=($NCPS_PID)
  if ! wait_http "http://127.0.0.1:$3/nix-cache-info" 100; then
    log "ncps ($name) did not answer /nix-cache-info within 10 s; alive=$(kill -0 $NCPS_PID 2>/dev/null && echo yes || echo no)"
    log "ncps stderr (last 20 lines):"; tail -20 "$d/stderr" >&2 || true
    stop_ncps
    return 1
  fi
}
stop_ncps() {
  [ -n "$NCPS_PID" ] || return 0
  kill "$NCPS_PID" 2>/dev/null || true
  local i; for i in $(seq 50); do kill -0 "$NCPS_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$NCPS_PID" 2>/dev/null || true
  wait "$NCPS_PID" 2>/dev/null || true
  NCPS_PID=
}
# fetch narinfo through ncps, print the NAR URL it advertises
ncps_nar_url() { # port hash  -> prints "URL" or fails
  local f=$WORK/narinfo.$1.$2
  local code; code=$(curl -s -m 30 -o "$f" -w '%{http_code}' "http://127.0.0.1:$1/$2.narinfo" || true)
  if [ "$code" != 200 ]; then log "ncps GET /$2.narinfo -> HTTP $code: $(head -c 300 "$f" 2>/dev/null)"; return 1; fi
  narinfo_field "$f" URL
}

# ---------- measurements ----------
speed() { curl -s -o /dev/null -m 120 -w '%{speed_download}\n' "$1"; }

bench_a() {
  report "== a. large NAR hit: ncps vs nginx (sendfile on), curl -o /dev/null, median MiB/s"
  local size h url sha reps nurl miss_sha r n_list c_list
  while read -r size h url sha; do
    [ "$size" = 1G ] && [ "${BENCH_SKIP_1G:-0}" = 1 ] && continue
    reps=$REPS; [ "$size" = 1G ] && reps=$(( REPS / 2 > 3 ? REPS / 2 : 3 ))
    cat "$FIX/cache/$url" > /dev/null   # page-cache the reference copy
    curl -s -o /dev/null "http://127.0.0.1:$P_REF/$url"
    n_list=() c_list=()
    if [ $NCPS_OK = 1 ]; then
      if ! nurl=$(ncps_nar_url $P_NCPS_FAST "$h"); then
        report "a[$size]: ncps narinfo fetch failed (see above)"; NCPS_FAIL=1; continue
      fi
      # miss: through ncps once, check bytes
      local t0; t0=$(date +%s.%N)
      local code; code=$(curl -s -m 300 -o "$WORK/miss.nar" -w '%{http_code}' "http://127.0.0.1:$P_NCPS_FAST/$nurl" || true)
      local t1; t1=$(date +%s.%N)
      miss_sha=$(sha_of "$WORK/miss.nar"); rm -f "$WORK/miss.nar"
      local direct; direct=$(curl -s -o /dev/null -m 300 -w '%{time_total}' "http://127.0.0.1:$P_UP_FAST/$url")
      report "a[$size]: ncps narinfo URL=$nurl; first fetch (miss, unlimited upstream) HTTP $code in $(awk -v a=$t0 -v b=$t1 'BEGIN{printf "%.2f", b-a}') s (same NAR straight from upstream: $(printf '%.2f' "$direct") s), body $( [ "$miss_sha" = "$sha" ] && echo "matches" || echo "DIFFERS (sha256 $miss_sha, want $sha)")"
      [ "$code" = 200 ] || { NCPS_FAIL=1; continue; }
      sleep 0.5
      local before; before=$(upstream_lines)
      local hit_sha; hit_sha=$(curl -s -m 300 "http://127.0.0.1:$P_NCPS_FAST/$nurl" | sha256sum | cut -d' ' -f1)
      local up_after; up_after=$(upstream_count_since "$before" "nar")
      [ "$hit_sha" = "$sha" ] || report "a[$size]: WARNING ncps hit body sha256 $hit_sha != $sha"
      [ "$up_after" = 0 ] || report "a[$size]: WARNING ncps 'hit' still made $up_after upstream NAR request(s)"
    fi
    for r in $(seq "$reps"); do   # interleave to cancel drift
      n_list+=("$(speed "http://127.0.0.1:$P_REF/$url")")
      [ $NCPS_OK = 1 ] && c_list+=("$(speed "http://127.0.0.1:$P_NCPS_FAST/$nurl")")
    done
    local nm cm
    nm=$(printf '%s\n' "${n_list[@]}" | median)
    if [ $NCPS_OK = 1 ]; then
      cm=$(printf '%s\n' "${c_list[@]}" | median)
      report "a[$size]: nginx $(mib "$nm") MiB/s | ncps $(mib "$cm") MiB/s | ratio ncps/nginx $(ratio "$cm" "$nm")  (target >= 1.0; $reps reps each, interleaved; unpinned, see h)"
    else
      report "a[$size]: nginx $(mib "$nm") MiB/s | ncps n/a"
    fi
  done < "$FIX/paths"
  if [ $NCPS_OK = 1 ] && [ -n "$NCPS_PID" ]; then
    report "e[a]: ncps VmHWM after the (a) miss+hits: $(rss_kb "$NCPS_PID" VmHWM) kB, threads now $(nthreads "$NCPS_PID")"
  fi
}

wrk_rps() { # url -> "rps non2xx"
  local o; o=$(wrk -c32 -t2 -d"$WRK_DURATION" --latency "$1" 2>&1)
  local rps; rps=$(awk '/^Requests\/sec:/{print $2}' <<<"$o")
  local bad; bad=$(awk '/Non-2xx or 3xx responses:/{print $5}' <<<"$o")
  local errs; errs=$(grep -E '^  Socket errors' <<<"$o" | sed 's/^ *//' || true)
  local p99; p99=$(awk '$1=="99%"{print $2}' <<<"$o")
  echo "${rps:-0} ${bad:-0} ${p99:-?} ${errs:-}"
}
bench_b() {
  local rounds=${BENCH_WRK_ROUNDS:-5}
  report "== b. narinfo hit: wrk -c32 -t2 -d$WRK_DURATION, requests/s, median of $rounds interleaved rounds"
  command -v wrk >/dev/null || { report "b: wrk missing (apt-get install -y wrk), skipped"; return; }
  local h; h=$(awk '$1=="64M"{print $2}' "$FIX/paths")
  if [ $NCPS_OK = 1 ]; then
    ncps_nar_url $P_NCPS_FAST "$h" > /dev/null || { report "b: ncps narinfo fetch failed"; NCPS_FAIL=1; return; }
  fi
  local ns=() cs=() n c r
  for r in $(seq "$rounds"); do
    n=$(wrk_rps "http://127.0.0.1:$P_REF/$h.narinfo"); ns+=("$(awk '{print $1}' <<<"$n")")
    if [ $NCPS_OK = 1 ]; then
      c=$(wrk_rps "http://127.0.0.1:$P_NCPS_FAST/$h.narinfo"); cs+=("$(awk '{print $1}' <<<"$c")")
      [ "$(awk '{print $2}' <<<"$c")" = 0 ] || report "b: ncps round $r: non-2xx $(awk '{print $2}' <<<"$c") $(cut -d' ' -f4- <<<"$c")"
    fi
  done
  local nm; nm=$(printf "%s\n" "${ns[@]}" | median)
  if [ $NCPS_OK = 1 ]; then
    local cm; cm=$(printf "%s\n" "${cs[@]}" | median)
    report "b: nginx $nm req/s (rounds: ${ns[*]}) | ncps $cm req/s (rounds: ${cs[*]}) | ratio ncps/nginx $(ratio "$cm" "$nm")  (target >= 1.0)"
  else
    report "b: nginx $nm req/s | ncps n/a"
  fi
}

bench_c() {
  report "== c. cold miss, 64 MiB NAR from upstream limited to $SLOW_RATE/s per connection (narinfo + NAR, seconds)"
  local size h url sha
  read -r size h url sha < <(awk '$1=="64M"' "$FIX/paths")
  local d_list=() d_nar=() c_list=() c_nar=() r t1 t2 nurl
  for r in $(seq "$MISS_REPS"); do
    t1=$(curl -s -o /dev/null -m 60 -w '%{time_total}' "http://127.0.0.1:$P_UP_SLOW/$h.narinfo")
    t2=$(curl -s -o /dev/null -m 120 -w '%{time_total}' "http://127.0.0.1:$P_UP_SLOW/$url")
    d_list+=("$(awk -v a="$t1" -v b="$t2" 'BEGIN{print a+b}')"); d_nar+=("$t2")
    if [ $NCPS_OK = 1 ]; then
      start_ncps "c$r" $P_UP_SLOW $P_NCPS_SLOW || { report "c: ncps failed to start"; NCPS_FAIL=1; return; }
      local a b code
      a=$(curl -s -o "$WORK/c.narinfo" -m 60 -w '%{time_total}' "http://127.0.0.1:$P_NCPS_SLOW/$h.narinfo")
      nurl=$(narinfo_field "$WORK/c.narinfo" URL)
      if [ -z "$nurl" ]; then report "c: ncps narinfo had no URL: $(head -c 300 "$WORK/c.narinfo")"; NCPS_FAIL=1; stop_ncps; return; fi
      read -r b code < <(curl -s -o "$WORK/c.nar" -m 120 -w '%{time_total} %{http_code}\n' "http://127.0.0.1:$P_NCPS_SLOW/$nurl")
      local got; got=$(sha_of "$WORK/c.nar"); rm -f "$WORK/c.nar"
      [ "$code" = 200 ] && [ "$got" = "$sha" ] || report "c: rep $r ncps NAR HTTP $code sha256 $got (want $sha)"
      c_list+=("$(awk -v a="$a" -v b="$b" 'BEGIN{print a+b}')"); c_nar+=("$b")
      stop_ncps
    fi
  done
  local dm cm
  dm=$(printf '%s\n' "${d_list[@]}" | median)
  if [ $NCPS_OK = 1 ]; then
    cm=$(printf '%s\n' "${c_list[@]}" | median)
    report "c: direct from upstream $dm s (NAR alone $(printf '%s\n' "${d_nar[@]}" | median)) | via ncps $cm s (NAR alone $(printf '%s\n' "${c_nar[@]}" | median)) | ratio ncps/direct $(ratio "$cm" "$dm")  (target <= 1.05; median of $MISS_REPS, fresh ncps data dir each rep)"
  else
    report "c: direct from upstream $dm s (NAR alone $(printf '%s\n' "${d_nar[@]}" | median)) | ncps n/a"
  fi
}

# ---------- h: pinned hits ----------
# Moves a running process (all its threads, and its children's: nginx workers) to a CPU list.
pin_tree() { # cpus pid...
  local cpus=$1 p k; shift
  for p in "$@"; do
    taskset -a -p -c "$cpus" "$p" > /dev/null 2>&1 || true
    for k in $(pgrep -P "$p"); do taskset -a -p -c "$cpus" "$k" > /dev/null 2>&1 || true; done
  done
}
pinned_speed() { taskset -c "$CLIENT_CPU" curl -s -o /dev/null -m 120 -w '%{speed_download}\n' "$1"; }
# one keep-alive connection, $KEEPALIVE transfers: prints each one's speed
pinned_keepalive() {
  local args=() i
  for i in $(seq "$KEEPALIVE"); do args+=(-o /dev/null "$1"); done
  taskset -c "$CLIENT_CPU" curl -s -m 600 -w '%{speed_download}\n' "${args[@]}"
}
bench_h() {
  local all="0-$(( $(nproc) - 1 ))"
  if [ "$(nproc)" -lt 2 ]; then report "h: needs 2 CPUs, skipped"; return; fi
  report "== h. large NAR hit pinned: nginx (sendfile on, tcp_nopush on) and ncps on CPU $SERVER_CPU, curl on CPU $CLIENT_CPU; median MiB/s, new connection per transfer | $KEEPALIVE transfers per keep-alive connection"
  local size h url sha reps nurl r n_new c_new n_ka c_ka
  pin_tree "$SERVER_CPU" "$NGINX_PID_ref"
  [ $NCPS_OK = 1 ] && pin_tree "$SERVER_CPU" "$NCPS_PID"
  while read -r size h url sha; do
    [ "$size" = 1G ] && [ "${BENCH_SKIP_1G:-0}" = 1 ] && continue
    reps=$REPS; [ "$size" = 1G ] && reps=$(( REPS / 2 > 3 ? REPS / 2 : 3 ))
    cat "$FIX/cache/$url" > /dev/null
    if [ $NCPS_OK = 1 ]; then
      nurl=$(ncps_nar_url $P_NCPS_FAST "$h") || { report "h[$size]: ncps narinfo fetch failed"; NCPS_FAIL=1; continue; }
      curl -s -o /dev/null -m 300 "http://127.0.0.1:$P_NCPS_FAST/$nurl"   # stored by now, or by (a)
      sleep 0.5
    fi
    n_new=() c_new=() n_ka=() c_ka=()
    for r in $(seq "$reps"); do   # interleaved, to cancel drift
      n_new+=("$(pinned_speed "http://127.0.0.1:$P_REF/$url")")
      [ $NCPS_OK = 1 ] && c_new+=("$(pinned_speed "http://127.0.0.1:$P_NCPS_FAST/$nurl")")
      n_ka+=($(pinned_keepalive "http://127.0.0.1:$P_REF/$url"))
      [ $NCPS_OK = 1 ] && c_ka+=($(pinned_keepalive "http://127.0.0.1:$P_NCPS_FAST/$nurl"))
    done
    local nm cm nk ck
    nm=$(printf '%s\n' "${n_new[@]}" | median); nk=$(printf '%s\n' "${n_ka[@]}" | median)
    if [ $NCPS_OK = 1 ]; then
      cm=$(printf '%s\n' "${c_new[@]}" | median); ck=$(printf '%s\n' "${c_ka[@]}" | median)
      report "h[$size]: new connections: nginx $(mib "$nm") | ncps $(mib "$cm") MiB/s | ratio $(ratio "$cm" "$nm")  keep-alive: nginx $(mib "$nk") | ncps $(mib "$ck") MiB/s | ratio $(ratio "$ck" "$nk")  (target >= 1.0; $reps reps, interleaved)"
    else
      report "h[$size]: new connections: nginx $(mib "$nm") MiB/s, keep-alive $(mib "$nk") MiB/s | ncps n/a"
    fi
  done < "$FIX/paths"
  pin_tree "$all" "$NGINX_PID_ref"
  [ $NCPS_OK = 1 ] && pin_tree "$all" "$NCPS_PID"
}

# ---------- m: 1 GiB miss from the unlimited upstream ----------
bench_m() {
  [ "${BENCH_SKIP_1G:-0}" = 1 ] && { report "m: skipped (BENCH_SKIP_1G)"; return; }
  report "== m. cold miss of the 1 GiB NAR from the unlimited upstream (NAR only, seconds; the narinfo is fetched first)"
  local size h url sha
  read -r size h url sha < <(awk '$1=="1G"' "$FIX/paths")
  cat "$FIX/cache/$url" > /dev/null
  local d_list=() c_list=() r nurl t code
  for r in $(seq "$MISS_REPS"); do
    # The disk settles before each rep: the last rep's GiB is removed and everything flushed,
    # so neither side pays for another's writeback or (on a `discard` mount) its unlink.
    sync
    d_list+=("$(curl -s -o /dev/null -m 300 -w '%{time_total}' "http://127.0.0.1:$P_UP_FAST/$url")")
    [ $NCPS_OK = 1 ] || continue
    start_ncps "m$r" $P_UP_FAST $P_NCPS_SLOW || { report "m: ncps failed to start"; NCPS_FAIL=1; return; }
    nurl=$(ncps_nar_url $P_NCPS_SLOW "$h") || { report "m: ncps narinfo fetch failed"; NCPS_FAIL=1; stop_ncps; return; }
    read -r t code < <(curl -s -o /dev/null -m 300 -w '%{time_total} %{http_code}\n' "http://127.0.0.1:$P_NCPS_SLOW/$nurl")
    [ "$code" = 200 ] || report "m: rep $r ncps NAR HTTP $code"
    c_list+=("$t")
    if [ "$r" = 1 ]; then   # the bytes, once: from the stored copy (hashing the miss itself would slow it)
      sleep 1
      local got; got=$(curl -s -m 300 "http://127.0.0.1:$P_NCPS_SLOW/$nurl" | sha256sum | cut -d' ' -f1)
      [ "$got" = "$sha" ] || report "m: ncps body sha256 $got, want $sha"
      report "m: ncps log: $(grep -m1 -o 'verified and stored in [0-9.]*s' "$WORK/ncps-m$r/stderr" || echo 'no stored line')"
    fi
    stop_ncps
    rm -rf "$WORK/ncps-m$r"
  done
  local dm cm
  dm=$(printf '%s\n' "${d_list[@]}" | median)
  if [ $NCPS_OK = 1 ]; then
    cm=$(printf '%s\n' "${c_list[@]}" | median)
    report "m: direct $dm s (${d_list[*]}) | via ncps $cm s (${c_list[*]}) | ratio ncps/direct $(ratio "$cm" "$dm")  (target <= 1.5; median of $MISS_REPS, fresh ncps data dir each rep)"
  else
    report "m: direct $dm s | ncps n/a"
  fi
}

# N concurrent clients: narinfo then NAR; writes $dir/t.$i = "ttfb total code" and $dir/s.$i = sha256
swarm() { # base-url nar-path dir narinfo-hash
  local base=$1 nar=$2 dir=$3 h=$4 i pids=()
  mkdir -p "$dir"
  for i in $(seq "$CLIENTS"); do
    (
      curl -s -o /dev/null -m 120 "$base/$h.narinfo" || true
      curl -s -m 180 -w '%{stderr}%{time_starttransfer} %{time_total} %{http_code}\n' "$base/$nar" 2> "$dir/t.$i" \
        | sha256sum | cut -d' ' -f1 > "$dir/s.$i"
    ) &
    pids+=($!)
  done
  wait "${pids[@]}" 2>/dev/null || true
}

swarm_report() { # label dir sha upstream-offset
  local label=$1 dir=$2 sha=$3 off=$4
  local ok bad codes
  ok=$(cat "$dir"/s.* | grep -c -x "$sha" || true)
  bad=$(( CLIENTS - ok ))
  codes=$(awk '{print $3}' "$dir"/t.* | sort | uniq -c | awk '{printf "%s x%s ", $2, $1}')
  local up_nar up_ni
  up_nar=$(upstream_count_since "$off" '^/nar/')
  up_ni=$(upstream_count_since "$off" 'narinfo$')
  report "d[$label]: upstream requests: NAR $up_nar, narinfo $up_ni | HTTP codes: $codes| bodies identical to upstream: $ok/$CLIENTS"
  report "d[$label]: TTFB s: $(awk '{print $1}' "$dir"/t.* | stat_line)"
  report "d[$label]: total s: $(awk '{print $2}' "$dir"/t.* | stat_line)"
}

sampler() { # pid file : record max RSS and threads every 50 ms
  local pid=$1 f=$2 mr=0 mt=0 r t
  while kill -0 "$pid" 2>/dev/null; do
    r=$(rss_kb "$pid" VmRSS); t=$(nthreads "$pid")
    [ "${r:-0}" -gt "$mr" ] && mr=$r
    [ "${t:-0}" -gt "$mt" ] && mt=$t
    echo "$mr $mt" > "$f"
    sleep 0.05
  done
}

bench_d() {
  report "== d. $CLIENTS concurrent clients miss the same 64 MiB NAR, upstream limit_rate $SLOW_RATE"
  local size h url sha
  read -r size h url sha < <(awk '$1=="64M"' "$FIX/paths")
  local r
  r=$(curl -s -o /dev/null -m 60 -w '%{time_starttransfer} %{time_total}' "http://127.0.0.1:$P_UP_SLOW/$url")
  report "d[upstream direct, 1 client]: TTFB $(cut -d' ' -f1 <<<"$r") s, total $(cut -d' ' -f2 <<<"$r") s"

  if [ $NCPS_OK = 1 ]; then
    if start_ncps d $P_UP_SLOW $P_NCPS_SLOW; then
      sleep 1
      report "e: ncps idle after start: VmRSS $(rss_kb "$NCPS_PID" VmRSS) kB, VmHWM $(rss_kb "$NCPS_PID" VmHWM) kB, threads $(nthreads "$NCPS_PID")"
      local nurl; nurl=$(ncps_nar_url $P_NCPS_SLOW "$h") || { report "d: ncps narinfo failed"; NCPS_FAIL=1; stop_ncps; nurl=; }
      if [ -n "$nurl" ]; then
        local off; off=$(upstream_lines)
        sampler "$NCPS_PID" "$WORK/sampler" & SAMPLER_PID=$!
        swarm "http://127.0.0.1:$P_NCPS_SLOW" "$nurl" "$WORK/swarm-ncps" "$h"
        kill $SAMPLER_PID 2>/dev/null; wait $SAMPLER_PID 2>/dev/null || true; SAMPLER_PID=
        sleep 0.3
        swarm_report ncps "$WORK/swarm-ncps" "$sha" "$off"
        local worst; worst=$(awk '{print $1}' "$WORK/swarm-ncps"/t.* | sort -g | tail -1)
        report "d[ncps]: slowest client's TTFB minus the upstream's own TTFB: $(awk -v a="$worst" -v b="$(cut -d' ' -f1 <<<"$r")" 'BEGIN{printf "%.3f", a-b}') s (target <= 1 s)"
        report "e: ncps during (d): peak VmRSS sampled $(cut -d' ' -f1 "$WORK/sampler") kB, VmHWM $(rss_kb "$NCPS_PID" VmHWM) kB, max threads $(cut -d' ' -f2 "$WORK/sampler"); after: VmRSS $(rss_kb "$NCPS_PID" VmRSS) kB"
        local pc; pc=$(grep -c -E 'panick|ERROR' "$WORK/ncps-d/stderr" || true)
        [ "$pc" = 0 ] || report "d: ncps stderr has $pc ERROR/panic lines, e.g.: $(grep -m3 -E 'panick|ERROR' "$WORK/ncps-d/stderr" | tr '\n' '|')"
      fi
      stop_ncps
    else
      report "d: ncps failed to start"; NCPS_FAIL=1
    fi
  fi

  # like for ncps above, the narinfo is fetched once before the swarm
  curl -s -o /dev/null -m 30 "http://127.0.0.1:$P_PROXY/$h.narinfo" || true
  local off; off=$(upstream_lines)
  local nginx_pid; nginx_pid=$(pgrep -P "$NGINX_PID_proxy" | head -1)
  swarm "http://127.0.0.1:$P_PROXY" "$url" "$WORK/swarm-nginx" "$h"
  sleep 0.3
  swarm_report "nginx proxy_cache_lock" "$WORK/swarm-nginx" "$sha" "$off"
  report "e: nginx proxy worker VmHWM $(rss_kb "$nginx_pid" VmHWM) kB"
}

bench_f() {
  report "== f. slow-client coupling: client A reads at ${SLOW_CLIENT_RATE:=4M}B/s, client B (unthrottled) starts 0.3 s later, same NAR miss, upstream limit_rate $SLOW_RATE"
  local size h url sha
  read -r size h url sha < <(awk '$1=="64M"' "$FIX/paths")
  one() { # label base nar-path
    local off; off=$(upstream_lines)
    curl -s -o /dev/null -m 25 --limit-rate "$SLOW_CLIENT_RATE" -w '%{time_starttransfer} %{time_total} %{http_code} %{size_download}\n' "$2/$3" > "$WORK/f.a" 2>/dev/null &
    local pa=$!
    sleep 0.3
    local b; b=$(curl -s -o /dev/null -m 25 -w '%{time_starttransfer} %{time_total} %{http_code} %{size_download}' "$2/$3" 2>/dev/null || true)
    local up; up=$(tail -n +"$(( off + 1 ))" "$WORK/upstream-access.log" | awk '$2 ~ "^/nar/" {printf "%s s ", $5}')
    report "f[$1]: client B: TTFB $(cut -d' ' -f1 <<<"$b") s, total $(cut -d' ' -f2 <<<"$b") s, HTTP $(cut -d' ' -f3 <<<"$b"), $(cut -d' ' -f4 <<<"$b") bytes | upstream NAR fetch time(s) so far: ${up:-none}"
    kill $pa 2>/dev/null; wait $pa 2>/dev/null || true
  }
  if [ $NCPS_OK = 1 ]; then
    if start_ncps f $P_UP_SLOW $P_NCPS_SLOW; then
      local nurl; nurl=$(ncps_nar_url $P_NCPS_SLOW "$h") && one ncps "http://127.0.0.1:$P_NCPS_SLOW" "$nurl"
      stop_ncps
    fi
  fi
  # fresh nginx proxy cache key: add a query string so (d)'s cached copy is not used
  one "nginx proxy_cache_lock" "http://127.0.0.1:$P_PROXY" "$url?f=$RANDOM"
}

# ---------- main ----------
log "work dir $WORK, fixtures $FIX, ncps $NCPS"
log "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg) (numbers are only meaningful on an otherwise idle machine)"
build_fixtures
start_all_nginx

NCPS_FAIL=0
if [ -z "$NCPS_GIVEN" ] && [ ! -x "$NCPS" ]; then
  log "no $NCPS yet: cargo build --release"
  (cd "$ROOT" && cargo build --release) || log "cargo build --release failed"
fi
if [ -x "$NCPS" ]; then
  if start_ncps fast $P_UP_FAST $P_NCPS_FAST; then NCPS_OK=1; else NCPS_FAIL=1; fi
else
  log "no ncps binary at $NCPS (build with cargo build --release or set NCPS=); running nginx halves only"
  NCPS_FAIL=1
fi

report "ncps-rs bench $(date -u +%Y-%m-%dT%H:%M:%SZ) ncps=$NCPS ($( [ -x "$NCPS" ] && sha256sum "$NCPS" | cut -c1-12 || echo missing)) loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
case $ONLY in *a*) bench_a ;; esac
case $ONLY in *b*) bench_b ;; esac
case $ONLY in *h*) bench_h ;; esac
[ $NCPS_OK = 1 ] && stop_ncps
case $ONLY in *c*) bench_c ;; esac
case $ONLY in *d*|*e*) bench_d ;; esac
case $ONLY in *f*) bench_f ;; esac
case $ONLY in *m*) bench_m ;; esac

printf '%s\n' "${SUMMARY[@]}" > "$OUT"
log "summary written to $OUT"
[ $NCPS_FAIL = 0 ] || { log "ncps part incomplete or failed (see messages above)"; exit 1; }
