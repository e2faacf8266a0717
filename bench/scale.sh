#!/usr/bin/env bash
# ncps at scale (issue 12): a store of N entries, for each N in $BENCH_SCALE_N. Loopback only.
#
#   NCPS=target/release/ncps bench/scale.sh          (make bench-scale; also run by make bench)
#
# For each N:
#   gen. the store is filled once through the real upload path: a running `ncps serve
#        --cache-allow-put-verb` (with a write token, and --cache-upload-may-shadow-upstream so
#        that no upstream is asked per path) takes PUT /nar/<nix32 sha256>.nar then PUT /<hash>.narinfo
#        (Compression none; stores made before uploads needed a trusted key also carry ncps's Sig) from bench/scale-gen (std-only Rust,
#        many keep-alive connections). By default ncps writes onto a tmpfs (fsync is free
#        there, ~3x faster) and the result is copied to disk with cp -a: the bytes, files and
#        index are exactly what ncps wrote. Kept in $BENCH_SCALE_DIR/N (marker file `ok` written
#        last) and reused by later runs; every measurement works on a fresh cp -a of it.
#   1. start-up to the first answer: exec of `ncps serve` until GET /nix-cache-info answers 200
#      (median of $BENCH_SCALE_STARTS starts, warm page cache)
#   2. idle RSS: VmRSS $BENCH_SCALE_IDLE_WAIT s after the first answer (median over the starts)
#   3. narinfo hits spread over all N entries vs one hot narinfo: wrk -c32 -t2 with
#      bench/wrk-list.lua for both (the hot list holds one hash), median of interleaved rounds
#   4. ncps fsck: wall time (ncps stopped)
#   5. one eviction pass from the full store to half: ncps started with --cache-max-size of
#      half the bytes the store holds. Time = " in X.XXs" of the `evicted ...` log line when
#      present, else (process start -> that line) minus the median start-up of step 1.
#      Peak RSS = VmHWM when the line appears. If the line does not come within
#      $BENCH_SCALE_EVICT_TIMEOUT s, the rate is estimated from the narinfo files removed.
#
# Knobs (env): NCPS, BENCH_SCALE_N ("100000 1000000"), BENCH_SCALE_DIR (/var/tmp/ncps-bench-scale),
#   BENCH_SCALE_REGEN=1 (generate again even if cached), BENCH_SCALE_GEN_TMPFS (1; 0 = ncps
#   writes straight to disk), BENCH_SCALE_CONNS (16 upload connections), BENCH_SCALE_STARTS (3),
#   BENCH_SCALE_IDLE_WAIT (3), BENCH_SCALE_EVICT_TIMEOUT (1800), BENCH_SCALE_SKIP (letters of
#   steps to skip: s=start-up/idle, h=hits, f=fsck, e=eviction), BENCH_WRK_ROUNDS (5),
#   BENCH_WRK_DURATION (3s), BENCH_SCALE_PORT_BASE (19150), BENCH_WORK (default: mktemp under
#   /var/tmp, on disk), BENCH_KEEP=1, BENCH_SCALE_OUT (summary, default bench/last-scale.txt),
#   BENCH_SCALE_FS=ext4-image (as root: the measurements run on a fresh ext4 made with
#   mkfs.ext4's defaults in a sparse image of BENCH_SCALE_IMG_GB (40) GiB, loop-mounted with
#   the default options, i.e. without `discard`, as Debian mounts a disk, and with a journal;
#   this VM's root file system is mounted `discard` and has no journal).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
NCPS=${NCPS:-$ROOT/target/release/ncps}
case "$NCPS" in /*) ;; *) NCPS=$ROOT/$NCPS ;; esac
NS=${BENCH_SCALE_N:-100000 1000000}
CACHE_DIR=${BENCH_SCALE_DIR:-/var/tmp/ncps-bench-scale}
GEN_TMPFS=${BENCH_SCALE_GEN_TMPFS:-1}
CONNS=${BENCH_SCALE_CONNS:-16}
STARTS=${BENCH_SCALE_STARTS:-3}
IDLE_WAIT=${BENCH_SCALE_IDLE_WAIT:-3}
EVICT_TIMEOUT=${BENCH_SCALE_EVICT_TIMEOUT:-1800}
SKIP=${BENCH_SCALE_SKIP:-}
ROUNDS=${BENCH_WRK_ROUNDS:-5}
WRK_DURATION=${BENCH_WRK_DURATION:-3s}
PORT_BASE=${BENCH_SCALE_PORT_BASE:-19150}
OUT=${BENCH_SCALE_OUT:-$HERE/last-scale.txt}
GEN_VERSION=ncps-bench-scale-v1   # must match NONCE in bench/scale-gen/src/main.rs

P_GEN=$PORT_BASE                 # ncps taking the uploads
P_NCPS=$((PORT_BASE + 1))        # ncps being measured
P_NGINX=$((PORT_BASE + 2))       # the peer for narinfo hits
P_NONE=$((PORT_BASE + 9))        # the upstream: nothing listens (every request here is a hit)

for t in curl wrk awk find cargo; do
  command -v $t >/dev/null || { echo "bench-scale: missing $t (make bench-scale installs wrk)" >&2; exit 1; }
done
[ -x "$NCPS" ] || { echo "bench-scale: no ncps binary at $NCPS (cargo build --release, or set NCPS=)" >&2; exit 1; }
for p in $P_GEN $P_NCPS $P_NGINX $P_NONE; do
  if ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then echo "bench-scale: port $p busy (set BENCH_SCALE_PORT_BASE)" >&2; exit 1; fi
done

if [ -n "${BENCH_WORK:-}" ]; then WORK=$BENCH_WORK; mkdir -p "$WORK"; else WORK=$(mktemp -d /var/tmp/ncps-scale-work.XXXXXX); fi
LOOP_IMG=
if [ "${BENCH_SCALE_FS:-}" = ext4-image ]; then
  LOOP_IMG=$WORK.img
  truncate -s "${BENCH_SCALE_IMG_GB:-40}G" "$LOOP_IMG"
  mkfs.ext4 -q -F "$LOOP_IMG"
  mount -o loop "$LOOP_IMG" "$WORK" || { rm -f "$LOOP_IMG"; echo "bench-scale: cannot loop-mount $LOOP_IMG" >&2; exit 1; }
elif [ -n "${BENCH_SCALE_FS:-}" ]; then
  echo "bench-scale: BENCH_SCALE_FS is ext4-image or empty, not ${BENCH_SCALE_FS}" >&2; exit 1
fi

BG_PIDS=()
NCPS_PID=
SAMPLER_PID=
GEN_MNT=
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
  if [ -n "$GEN_MNT" ]; then umount "$GEN_MNT" && rmdir "$GEN_MNT"; fi
  if [ -n "$LOOP_IMG" ]; then umount "$WORK" && rm -f "$LOOP_IMG"; fi
  if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "bench-scale: kept work dir $WORK" >&2; else rm -rf "$WORK"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "bench-scale: $(date -u +%H:%M:%S) $*" >&2; }
SUMMARY=()
report() { echo "$*"; SUMMARY+=("$*"); }
ROWS=()   # figure|N|value|target|result
row() { ROWS+=("$1|$2|$3|$4|$5"); }

median() { sort -g | awk '{a[NR]=$1} END{ if (NR==0) print "nan"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b+0==0) print "nan"; else printf "%.3f", a/b }'; }
kib_mib() { awk -v k="$1" 'BEGIN{printf "%.1f", k/1024}'; }
pass() { # value op limit -> pass/FAIL (op: lt or ge)
  awk -v v="$1" -v op="$2" -v l="$3" 'BEGIN{ if (v=="" || v=="nan" || v=="n/a") {print "n/a"; exit}
    ok = (op=="lt") ? (v+0 < l+0) : (v+0 >= l+0); print ok ? "pass" : "FAIL" }'
}
rss_kb() { awk -v k="$2" '$1==k":"{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
now_ns() { date +%s%N; }
secs_since() { awk -v a="$1" -v b="$(now_ns)" 'BEGIN{printf "%.2f", (b-a)/1e9}'; }
store_bytes() { find "$1/store/nar" "$1/store/narinfo" -type f -printf '%s\n' | awk '{s+=$1} END{printf "%d %d\n", s, NR}'; }
count_narinfos() { find "$1/store/narinfo" -type f -name '*.narinfo' | wc -l; }

# ---------- the helper ----------
log "building bench/scale-gen"
(cd "$HERE/scale-gen" && cargo build --release -q)
TOOL=$HERE/scale-gen/target/release/ncps-scale

# ---------- ncps ----------
start_ncps() { # data-dir port log-prefix extra-args... ; sets NCPS_PID, T0 (ns, just before exec)
  local data=$1 port=$2 prefix=$3; shift 3
  T0=$(now_ns)
  "$NCPS" serve --cache-hostname bench.local --cache-data-path "$data" \
    --upstream-cache "http://127.0.0.1:$P_NONE" --server-addr "127.0.0.1:$port" "$@" \
    > "$prefix.stdout" 2> "$prefix.stderr" &
  NCPS_PID=$!
  BG_PIDS+=($NCPS_PID)
}
stop_ncps() {
  [ -n "$NCPS_PID" ] || return 0
  kill "$NCPS_PID" 2>/dev/null || true
  local i; for i in $(seq 100); do kill -0 "$NCPS_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$NCPS_PID" 2>/dev/null; then log "ncps $NCPS_PID ignored SIGTERM for 10 s: SIGKILL"; kill -9 "$NCPS_PID" 2>/dev/null || true; fi
  wait "$NCPS_PID" 2>/dev/null || true
  NCPS_PID=
}
first_answer_ms() { # port t0 timeout -> ms, or fails
  "$TOOL" wait "127.0.0.1:$1" /nix-cache-info "$2" "$3"
}

# ---------- generation ----------
ensure_store() { # N -> sets D, BYTES, FILES, GEN_INFO
  local n=$1
  D=$CACHE_DIR/$n
  if [ -f "$D/ok" ] && [ "${BENCH_SCALE_REGEN:-0}" != 1 ] && grep -qx "generator=$GEN_VERSION" "$D/meta" 2>/dev/null; then
    log "N=$n: reusing the store in $D ($(grep -E '^(made|gen_seconds)=' "$D/meta" | tr '\n' ' '))"
  else
    rm -rf "$D"; mkdir -p "$D"
    local data=$D/data
    if [ "$GEN_TMPFS" = 1 ]; then
      # 100k entries took 0.85 GB on tmpfs (two files of one page each, plus the index):
      # 12 KiB an entry leaves room.
      local mb=$(( n * 12 / 1024 + 256 ))
      GEN_MNT=$D/gen-tmpfs; mkdir -p "$GEN_MNT"
      mount -t tmpfs -o size=${mb}m,mode=755 ncps-bench-scale "$GEN_MNT"
      data=$GEN_MNT/data
      log "N=$n: generating on a ${mb} MiB tmpfs at $GEN_MNT, then cp -a to $D/data"
    else
      log "N=$n: generating in $data"
    fi
    export NCPS_WRITE_TOKEN=bench-write-token
    start_ncps "$data" $P_GEN "$D/gen" --cache-allow-put-verb --cache-write-token "$NCPS_WRITE_TOKEN" \
      --cache-upload-may-shadow-upstream --log-level warn
    first_answer_ms $P_GEN "$T0" 60 > /dev/null || { log "generator ncps did not start:"; tail "$D/gen.stderr" >&2; exit 1; }
    local t; t=$(now_ns)
    "$TOOL" gen "127.0.0.1:$P_GEN" "$n" "$CONNS" "$D/paths"
    local gen_s; gen_s=$(secs_since "$t")
    stop_ncps
    if grep -qE 'ERROR|panick' "$D/gen.stderr"; then log "generator ncps logged errors:"; grep -m5 -E 'ERROR|panick' "$D/gen.stderr" >&2; exit 1; fi
    local cp_s=0
    if [ -n "$GEN_MNT" ]; then
      log "N=$n: tmpfs holds $(df -h --output=used "$GEN_MNT" | tail -1 | tr -d ' '); copying to disk"
      t=$(now_ns)
      cp -a "$data" "$D/data"
      sync -f "$D/data"
      cp_s=$(secs_since "$t")
      umount "$GEN_MNT"; rmdir "$GEN_MNT"; GEN_MNT=
    fi
    read -r BYTES FILES < <(store_bytes "$D/data")
    cat > "$D/meta" <<EOF
generator=$GEN_VERSION
n=$n
bytes=$BYTES
files=$FILES
made=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ncps=$NCPS $(sha256sum "$NCPS" | cut -c1-12)
gen_seconds=$gen_s
tmpfs=$GEN_TMPFS
copy_seconds=$cp_s
EOF
    touch "$D/ok"
    log "N=$n: generated: $BYTES bytes in $FILES files; upload ${gen_s} s, copy to disk ${cp_s} s"
  fi
  BYTES=$(sed -n 's/^bytes=//p' "$D/meta"); FILES=$(sed -n 's/^files=//p' "$D/meta")
  GEN_INFO="upload $(sed -n 's/^gen_seconds=//p' "$D/meta") s (tmpfs=$(sed -n 's/^tmpfs=//p' "$D/meta")) + copy $(sed -n 's/^copy_seconds=//p' "$D/meta") s, made $(sed -n 's/^made=//p' "$D/meta")"
}

# ---------- measurements ----------
wrk_rps() { # list [port] -> "rps non2xx"
  local o; o=$(wrk -c32 -t2 -d"$WRK_DURATION" -s "$HERE/wrk-list.lua" "http://127.0.0.1:${2:-$P_NCPS}" -- "$1" 2>&1)
  local rps; rps=$(awk '/^Requests\/sec:/{print $2}' <<<"$o")
  local bad; bad=$(awk '/Non-2xx or 3xx responses:/{print $5}' <<<"$o")
  echo "${rps:-0} ${bad:-0}"
}

bench_n() {
  local n=$1
  report "== N=$n"
  ensure_store "$n"
  report "N=$n: store $BYTES bytes ($(awk -v b="$BYTES" 'BEGIN{printf "%.1f", b/1e6}') MB) in $FILES files; generation: $GEN_INFO"
  row "generation (cached between runs)" "$n" "$(sed -n 's/^gen_seconds=//p' "$D/meta") s + cp $(sed -n 's/^copy_seconds=//p' "$D/meta") s" "-" "info"
  local W=$WORK/$n data=$WORK/$n/data
  rm -rf "$W"; mkdir -p "$W"
  local t; t=$(now_ns)
  cp -a "$D/data" "$data"
  # On disk, as a store that has been there a while is: files still in the page cache unflushed
  # cost nothing to unlink, files on disk cost a discard each where the mount has `discard`.
  sync
  log "N=$n: working copy made in $(secs_since "$t") s"
  head -c 32 "$D/paths" > "$W/hot"

  # 1, 2: start-up and idle RSS
  local ups=() idles=() r ms startup_ms=0
  if [[ $SKIP != *s* ]] || [[ $SKIP != *h* ]]; then
    local starts=$STARTS; [[ $SKIP == *s* ]] && starts=1
    for r in $(seq "$starts"); do
      start_ncps "$data" $P_NCPS "$W/start$r"
      if ! ms=$(first_answer_ms $P_NCPS "$T0" 600); then
        report "N=$n: start $r: no answer within 600 s; stderr: $(tail -3 "$W/start$r.stderr" | tr '\n' '|')"; stop_ncps; return 1
      fi
      sleep "$IDLE_WAIT"
      local rss; rss=$(rss_kb "$NCPS_PID" VmRSS)
      ups+=("$ms"); idles+=("$rss")
      log "N=$n: start $r: first answer after $ms ms; VmRSS ${IDLE_WAIT} s later $rss kB (VmHWM $(rss_kb "$NCPS_PID" VmHWM) kB)"
      [ "$r" = "$starts" ] || stop_ncps
    done
    local code; code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$P_NCPS/$(head -c 32 "$D/paths").narinfo")
    [ "$code" = 200 ] || report "N=$n: WARNING GET of the first entry's narinfo: HTTP $code"
    if [[ $SKIP != *s* ]]; then
      startup_ms=$(printf '%s\n' "${ups[@]}" | median)
      local idle; idle=$(printf '%s\n' "${idles[@]}" | median)
      report "N=$n: start-up to first answer: median $startup_ms ms (starts: ${ups[*]} ms) | idle VmRSS median $idle kB ($(kib_mib "$idle") MiB; starts: ${idles[*]} kB)"
      row "start-up to first answer (median of $starts)" "$n" "$startup_ms ms" "< 300 ms" "$(pass "$startup_ms" lt 300)"
      row "idle RSS (VmRSS ${IDLE_WAIT} s after start)" "$n" "$(kib_mib "$idle") MiB" "< 16 MiB" "$(pass "$(kib_mib "$idle")" lt 16)"
    fi
  fi

  # 3: narinfo hits, spread vs hot
  if [[ $SKIP != *h* ]]; then
    local ss=() hs=() a b
    # Warm page cache for every narinfo file, as for the start-ups: a round of wrk reaches only
    # a few percent of a million files, and the nginx peer reads the same files after ncps.
    find "$data/store/narinfo" -type f -print0 | xargs -0 -n 4096 cat > /dev/null
    wrk_rps "$D/paths" > /dev/null   # warm-up round, not counted
    for r in $(seq "$ROUNDS"); do
      a=$(wrk_rps "$W/hot"); hs+=("${a%% *}")
      b=$(wrk_rps "$D/paths"); ss+=("${b%% *}")
      [ "${a#* }" = 0 ] && [ "${b#* }" = 0 ] || report "N=$n: WARNING round $r non-2xx: hot ${a#* }, spread ${b#* }"
    done
    local hm sm; hm=$(printf '%s\n' "${hs[@]}" | median); sm=$(printf '%s\n' "${ss[@]}" | median)
    local q; q=$(ratio "$sm" "$hm")
    report "N=$n: narinfo hits, wrk -c32 -t2 -d$WRK_DURATION, median of $ROUNDS interleaved rounds: spread over $n entries $sm req/s (rounds: ${ss[*]}) | one hot narinfo $hm req/s (rounds: ${hs[*]}) | ratio spread/hot $q"
    row "narinfo hits spread/hot (${sm%.*} / ${hm%.*} req/s)" "$n" "$q" ">= 0.8" "$(pass "$q" ge 0.8)"
    # The peer: nginx (one worker, as ncps has one poll loop; no open_file_cache) serving the
    # same narinfo files, by the same URLs (a rewrite to the sharded path), in the same rounds.
    # A hot hit in ncps comes from its memo, a spread one from the file, as every nginx hit does.
    if command -v nginx >/dev/null; then
      local nd="$W/nginx"; mkdir -p "$nd"
      cat > "$nd/nginx.conf" <<EOF
user $(id -un);
worker_processes 1;
daemon off;
pid $nd/nginx.pid;
error_log $nd/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on; tcp_nopush on;
  server {
    listen 127.0.0.1:$P_NGINX;
    root $data/store/narinfo;
    location / { rewrite "^/((.)(.)[0-9a-z]{30}\.narinfo)\$" /\$2/\$2\$3/\$1 break; }
  }
}
EOF
      nginx -p "$nd" -c "$nd/nginx.conf" > "$nd/stdout" 2>&1 &
      local ngx=$!; BG_PIDS+=($ngx)
      local up=0; for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$P_NGINX/$(head -c 32 "$D/paths").narinfo" && { up=1; break; }; sleep 0.1; done
      if [ $up = 1 ]; then
        local ns=() nh=() c d
        for r in $(seq "$ROUNDS"); do
          a=$(wrk_rps "$D/paths"); ss+=("${a%% *}")
          c=$(wrk_rps "$D/paths" "$P_NGINX"); ns+=("${c%% *}")
          d=$(wrk_rps "$W/hot" "$P_NGINX"); nh+=("${d%% *}")
          [ "${c#* }" = 0 ] && [ "${d#* }" = 0 ] || report "N=$n: WARNING nginx round $r non-2xx: spread ${c#* }, hot ${d#* }"
        done
        local nsm nhm; nsm=$(printf '%s\n' "${ns[@]}" | median); nhm=$(printf '%s\n' "${nh[@]}" | median)
        sm=$(printf '%s\n' "${ss[@]}" | median)
        report "N=$n: peer nginx on the same files, interleaved with ncps again: spread $nsm req/s (rounds: ${ns[*]}) | hot $nhm req/s | nginx spread/hot $(ratio "$nsm" "$nhm") | ncps spread (all rounds, median $sm) / nginx spread: $(ratio "$sm" "$nsm")"
        row "narinfo hits spread: ncps / nginx, same files" "$n" "$(ratio "$sm" "$nsm")" ">= 1.0" "$(pass "$(ratio "$sm" "$nsm")" ge 1.0)"
      else
        report "N=$n: WARNING nginx peer did not answer; see $nd/error.log"
      fi
      kill "$ngx" 2>/dev/null || true; wait "$ngx" 2>/dev/null || true
    fi
  fi
  stop_ncps

  # 4: fsck
  if [[ $SKIP != *f* ]]; then
    t=$(now_ns)
    local rc=0
    "$NCPS" fsck --cache-data-path "$data" > "$W/fsck.out" 2>&1 || rc=$?
    local fs; fs=$(secs_since "$t")
    local mbs eps; mbs=$(awk -v b="$BYTES" -v s="$fs" 'BEGIN{printf "%.1f", b/1e6/s}'); eps=$(awk -v n="$n" -v s="$fs" 'BEGIN{printf "%.0f", n/s}')
    report "N=$n: ncps fsck: $fs s, exit $rc, $mbs MB/s, $eps entries/s; last line: $(grep -v '^$' "$W/fsck.out" | tail -1)"
    row "ncps fsck wall time" "$n" "$fs s" "linear in bytes" "$([ $rc = 0 ] && echo info || echo "FAIL (exit $rc)")"
    FSCK_S[$n]=$fs
  fi

  # 5: eviction to half
  if [[ $SKIP != *e* ]]; then
    local half=$(( BYTES / 2 ))
    start_ncps "$data" $P_NCPS "$W/evict" --cache-max-size "${half}B"
    local t0=$T0 pid=$NCPS_PID
    # In the background, so the pass may run before or after ncps starts answering.
    "$TOOL" wait "127.0.0.1:$P_NCPS" /nix-cache-info "$t0" "$EVICT_TIMEOUT" > "$W/evict.first" 2>/dev/null &
    local waiter=$!; BG_PIDS+=($waiter)
    local line="" hwm=0 peak=0 rr deadline=$(( $(date +%s) + EVICT_TIMEOUT ))
    while :; do
      line=$(grep -m1 -E 'evicted [0-9]+ narinfo' "$W/evict.stderr" 2>/dev/null || true)
      [ -n "$line" ] && break
      kill -0 "$pid" 2>/dev/null || break
      [ "$(date +%s)" -lt "$deadline" ] || break
      rr=$(rss_kb "$pid" VmRSS); [ "${rr:-0}" -gt "$peak" ] && peak=$rr
      sleep 0.05
    done
    local t_line; t_line=$(now_ns)
    hwm=$(rss_kb "$pid" VmHWM)
    # The kernel updates VmHWM lazily (it can trail VmRSS): the peak is the larger of the two.
    [ "$peak" -gt "$hwm" ] && hwm=$peak
    local wall; wall=$(awk -v a="$t0" -v b="$t_line" 'BEGIN{printf "%.2f", (b-a)/1e9}')
    local secs how evicted rate
    if [ -n "$line" ]; then
      evicted=$(sed -E 's/.*evicted ([0-9]+) narinfo.*/\1/' <<<"$line")
      secs=$(sed -nE 's/.* in ([0-9.]+)(m?s)\b.*/\1 \2/p' <<<"$line" | awk '{ if ($2=="ms") printf "%.3f", $1/1000; else printf "%.3f", $1 }')
      if [ -n "$secs" ]; then how="from the log line"; else
        secs=$(awk -v w="$wall" -v s="$startup_ms" 'BEGIN{printf "%.3f", w - s/1000}'); how="wall $wall s minus start-up $startup_ms ms"; fi
      rate=$(awk -v e="$evicted" -v s="$secs" 'BEGIN{ if (s+0<=0) print "nan"; else printf "%.0f", e/s }')
      sleep 0.5
      report "N=$n: eviction to half ($half bytes): $evicted narinfos in $secs s ($how) = $rate entries/s | peak RSS $hwm kB ($(kib_mib "$hwm") MiB; VmHWM $(rss_kb "$pid" VmHWM) kB, sampled VmRSS peak $peak kB) | first answer after $(cat "$W/evict.first" 2>/dev/null || echo '?') ms | log: ${line#* * }"
      row "eviction to half: entries/s ($evicted in $secs s)" "$n" "$rate/s" ">= 20000/s" "$(pass "$rate" ge 20000)"
    else
      local left; left=$(count_narinfos "$data")
      evicted=$(( n - left ))
      secs=$(awk -v w="$wall" -v s="$startup_ms" 'BEGIN{printf "%.3f", w - s/1000}')
      rate=$(awk -v e="$evicted" -v s="$secs" 'BEGIN{ if (s+0<=0) print "nan"; else printf "%.0f", e/s }')
      local why="no 'evicted' line within $EVICT_TIMEOUT s"; kill -0 "$pid" 2>/dev/null || why="ncps exited: $(tail -2 "$W/evict.stderr" | tr '\n' '|')"
      report "N=$n: eviction to half ($half bytes): $why; $evicted narinfo files removed in ~$secs s (wall $wall s minus start-up) = ~$rate entries/s (estimate) | peak RSS $hwm kB ($(kib_mib "$hwm") MiB; VmHWM $(rss_kb "$pid" VmHWM) kB, sampled VmRSS peak $peak kB)"
      row "eviction to half: entries/s (unfinished, estimate)" "$n" "~$rate/s" ">= 20000/s" "$(pass "$rate" ge 20000)"
    fi
    row "peak RSS during eviction (VmHWM/sampled VmRSS)" "$n" "$(kib_mib "$hwm") MiB" "< 24 MiB" "$(pass "$(kib_mib "$hwm")" lt 24)"
    stop_ncps
    kill "$waiter" 2>/dev/null || true; wait "$waiter" 2>/dev/null || true
    # The peer: the same disk removing the files of the entries that are left (each entry is a
    # narinfo and a NAR file, as in the pass) with 8 parallel rm, the fastest removal measured
    # here. On a file system mounted with `discard` each unlink waits for the device, and this
    # rate bounds any eviction that frees the space it reports.
    sync
    local left_n; left_n=$(count_narinfos "$data")
    t=$(now_ns)
    find "$data/store" -type f -print0 | xargs -0 -P8 -n512 rm -f
    sync
    local rs; rs=$(secs_since "$t")
    local peer; peer=$(awk -v e="$left_n" -v s="$rs" 'BEGIN{ if (s+0<=0) print "nan"; else printf "%.0f", e/s }')
    report "N=$n: peer: parallel rm (8 x rm, 512 files each) of the $left_n entries left (narinfo + NAR file each): $rs s = $peer entries/s | ncps pass / peer: $(ratio "$rate" "$peer")"
    row "eviction rate / parallel rm of the same files" "$n" "$(ratio "$rate" "$peer")" "info" "info"
  fi
  [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$W"
}

# ---------- main ----------
declare -A FSCK_S=()
START_ALL=$(now_ns)
log "ncps $NCPS, N in: $NS, stores in $CACHE_DIR, work dir $WORK"
log "loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg) (numbers are only meaningful on an otherwise idle machine)"
report "ncps-rs scale bench $(date -u +%Y-%m-%dT%H:%M:%SZ) ncps=$NCPS ($(sha256sum "$NCPS" | cut -c1-12); checkout $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')) loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
report "work dir $WORK on $(findmnt -no FSTYPE,OPTIONS --target "$WORK" 2>/dev/null || echo '?')${LOOP_IMG:+ (fresh ext4 image $LOOP_IMG)}"
FAILED=0
for n in $NS; do
  bench_n "$n" || FAILED=1
done
if [ "${#FSCK_S[@]}" -ge 2 ]; then
  first=; for n in $NS; do [ -n "${FSCK_S[$n]:-}" ] || continue
    if [ -z "$first" ]; then first=$n; else
      report "fsck scaling N=$first -> N=$n: $(ratio "${FSCK_S[$n]}" "${FSCK_S[$first]}")x the time for $(ratio "$n" "$first")x the entries"
    fi
  done
fi
report "whole run: $(secs_since "$START_ALL") s"

TABLE=$(printf '%-52s %8s %16s %16s %s\n' figure N value target result
  for r in "${ROWS[@]}"; do IFS='|' read -r f n v t p <<<"$r"; printf '%-52s %8s %16s %16s %s\n' "$f" "$n" "$v" "$t" "$p"; done)
echo; echo "$TABLE"
printf '%s\n' "${SUMMARY[@]}" "" "$TABLE" > "$OUT"
log "summary written to $OUT"
exit $FAILED
