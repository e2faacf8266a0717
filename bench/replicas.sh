#!/usr/bin/env bash
# Replicas on S3 and PostgreSQL (issue 18). Loopback only; root (PostgreSQL runs as nobody);
# about two minutes. Needs an ncps built with both optional features:
#
#   cargo build --release --features s3,postgres && sudo bench/replicas.sh   (make bench-replicas)
#
# Real servers: nginx as the upstream (a binary cache directory with one 64 MiB
# `Compression: none` NAR; `limit_rate` makes it a slow upstream), s3s-fs as the bucket
# (tests/s3s.sh installs it), PostgreSQL from Debian (initdb in a temp dir, trust auth).
#   1. Hits from S3 against hits from local disk: one ncps of each, the same NAR, curl in
#      interleaved rounds; MiB/s and the ratio.
#   2. 1, 2 and 3 replicas on one bucket and one database: 50 clients miss the same NAR at
#      once, spread over the replicas round robin, while one client fetches it straight from
#      the upstream (the peer). Reported: upstream NAR requests made by ncps (exactly 1 is the
#      goal), the clients' first byte and total time against the direct client's.
#   3. The same 64 MiB miss asked of the downloader and, 100 ms later, of another replica
#      (which streams it from the downloader): first byte and total of each.
#   4. Eviction on S3: BENCH_EVICT_N entries (bench/scale-gen's, uploaded through ncps) in a
#      bucket, then a pass down to half the bytes, in entries/s; the peer removes the other
#      half with curl, a DELETE per object on 8 parallel connections.
#
# Knobs (env): NCPS, BENCH_REPLICAS_RATE (upstream bytes/s per connection, 32m), BENCH_ROUNDS (5),
#   BENCH_REPLICAS_PORT_BASE (19300), BENCH_KEEP=1, BENCH_REPLICAS_OUT (bench/last-replicas.txt),
#   BENCH_REPLICAS_ONLY (parts to run, e.g. "4"; all by default), BENCH_EVICT_N (5000).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
NCPS=${NCPS:-$ROOT/target/release/ncps}
case "$NCPS" in /*) ;; *) NCPS=$ROOT/$NCPS ;; esac
RATE=${BENCH_REPLICAS_RATE:-32m}
ROUNDS=${BENCH_ROUNDS:-5}
PB=${BENCH_REPLICAS_PORT_BASE:-19300}
OUT=${BENCH_REPLICAS_OUT:-$HERE/last-replicas.txt}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
for t in nginx curl nix-hash "$PGBIN/initdb" runuser; do
  command -v "$t" >/dev/null || { echo "bench: missing $t" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench: needs root (PostgreSQL runs as nobody)" >&2; exit 1; }
"$NCPS" --version | grep -q "s3" && "$NCPS" --version | grep -q "postgres" ||
  { echo "bench: $NCPS lacks s3 and postgres (cargo build --release --features s3,postgres)" >&2; exit 1; }
S3S=$(bash "$ROOT/tests/s3s.sh")

WORK=$(mktemp -d /tmp/ncps-bench-replicas.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -d "$WORK/pg" ] && runuser -u nobody -- "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  wait "${PIDS[@]}" 2>/dev/null || true
  [ "${BENCH_KEEP:-}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
exec > >(tee "$OUT") 2>&1
want() { [ -z "${BENCH_REPLICAS_ONLY:-}" ] || [[ " $BENCH_REPLICAS_ONLY " == *" $1 "* ]]; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
wait_http() { for _ in $(seq 100); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "bench: $1 does not answer" >&2; exit 1; }

echo "# replicas: $(date -u +%FT%TZ) $(uname -r) $(nproc) cores; $NCPS ($("$NCPS" --version))"

# The upstream: one 64 MiB NAR (random bytes, so no compression helps), unsigned.
mkdir -p "$WORK/up/nar"
head -c 64M /dev/urandom > "$WORK/nar"
H=$(nix-hash --type sha256 --flat --base32 "$WORK/nar")
mv "$WORK/nar" "$WORK/up/nar/$H.nar"
SPH=$( (LC_ALL=C tr -dc '0123456789abcdfghijklmnpqrsvwxyz' < /dev/urandom || true) | head -c 32)
printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n' > "$WORK/up/nix-cache-info"
printf 'StorePath: /nix/store/%s-bench\nURL: nar/%s.nar\nCompression: none\nFileHash: sha256:%s\nFileSize: %d\nNarHash: sha256:%s\nNarSize: %d\nReferences: \n' \
  "$SPH" "$H" "$H" $((64 << 20)) "$H" $((64 << 20)) > "$WORK/up/$SPH.narinfo"
NAR=/nar/$H.nar
cat > "$WORK/nginx.conf" <<EOF
user root;
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 1024; }
http {
  log_format path '\$request_uri';
  sendfile on;
  tcp_nopush on;
  server { listen 127.0.0.1:$PB; root $WORK/up; access_log $WORK/fast.log path; }
  server { listen 127.0.0.1:$((PB + 1)); root $WORK/up; limit_rate $RATE; access_log $WORK/slow.log path; }
}
EOF
nginx -p "$WORK" -c "$WORK/nginx.conf" &
PIDS+=($!)
FAST=http://127.0.0.1:$PB
SLOW=http://127.0.0.1:$((PB + 1))
wait_http "$FAST/nix-cache-info"

# PostgreSQL, trust auth, as nobody.
mkdir -p "$WORK/pg" && chown nobody "$WORK/pg"
runuser -u nobody -- "$PGBIN/initdb" -D "$WORK/pg" -A trust -U ncps >/dev/null
PGPORT=$((PB + 2))
runuser -u nobody -- "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/log" -w \
  -o "-k $WORK/pg -p $PGPORT -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
pg_url() { echo "postgresql://ncps@127.0.0.1:$PGPORT/$1"; }
createdb() { runuser -u nobody -- "$PGBIN/psql" -q -h "$WORK/pg" -p "$PGPORT" -U ncps -d postgres -c "CREATE DATABASE $1" >/dev/null; }

# s3s-fs, one bucket per part.
mkdir -p "$WORK/s3"
S3PORT=$((PB + 3))
"$S3S" --host 127.0.0.1 --port "$S3PORT" --access-key benchkey --secret-key benchsecret "$WORK/s3" >/dev/null 2>&1 &
PIDS+=($!)
sleep 0.5
s3_flags() {
  mkdir -p "$WORK/s3/$1"
  echo "--cache-storage-s3-bucket $1 --cache-storage-s3-endpoint http://127.0.0.1:$S3PORT" \
    "--cache-storage-s3-access-key-id benchkey --cache-storage-s3-secret-access-key benchsecret --cache-storage-s3-force-path-style"
}

NEXT_PORT=$((PB + 10))
# new_port: the next free port of ours, in PORT.
new_port() { PORT=$NEXT_PORT; NEXT_PORT=$((NEXT_PORT + 1)); }
# start_ncps NAME PORT UPSTREAM EXTRA...
start_ncps() {
  local name=$1 port=$2 up=$3; shift 3
  mkdir -p "$WORK/$name"
  # shellcheck disable=SC2068
  "$NCPS" serve --cache-hostname bench-replicas --cache-data-path "$WORK/$name" --upstream-cache "$up" \
    --server-addr "127.0.0.1:$port" $@ > "$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$port/nix-cache-info"
}

if want 1; then
echo "== 1. hits: from S3 (s3s-fs) and from local disk, 64 MiB, $ROUNDS interleaved rounds"
new_port; PL=$PORT; start_ncps local "$PL" "$FAST"
new_port; PS=$PORT; start_ncps s3 "$PS" "$FAST" $(s3_flags bench-hits)
for p in $PL $PS; do
  curl -s -f -o /dev/null "http://127.0.0.1:$p/$SPH.narinfo"
  curl -s -f -o /dev/null "http://127.0.0.1:$p$NAR"
done
sleep 2   # the S3 upload of the miss
: > "$WORK/hl"; : > "$WORK/hs"; : > "$WORK/hd"
for _ in $(seq "$ROUNDS"); do
  curl -s -f -o /dev/null -w '%{speed_download}\n' "http://127.0.0.1:$PL$NAR" >> "$WORK/hl"
  curl -s -f -o /dev/null -w '%{speed_download}\n' "http://127.0.0.1:$PS$NAR" >> "$WORK/hs"
  # The peer: the same object straight from s3s-fs, signed by curl itself.
  curl -s -f -o /dev/null -w '%{speed_download}\n' --aws-sigv4 "aws:amz:us-east-1:s3" -u benchkey:benchsecret -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
    "http://127.0.0.1:$S3PORT/bench-hits$NAR" >> "$WORK/hd" || echo 0 >> "$WORK/hd"
done
L=$(median < "$WORK/hl"); S=$(median < "$WORK/hs"); D=$(median < "$WORK/hd")
awk -v d="$D" -v s="$S" 'BEGIN {printf "s3s-fs direct %.0f MiB/s: ncps from S3 / s3s-fs direct %.3f\n", d / 1048576, (d > 0 ? s / d : 0)}' 
grep -q "hit" <(grep "$NAR" "$WORK/s3.log" | tail -1) || echo "warning: the S3 ncps did not answer the last one as a hit"
awk -v l="$L" -v s="$S" 'BEGIN {printf "local %.0f MiB/s, S3 %.0f MiB/s: S3/local %.3f\n", l / 1048576, s / 1048576, s / l}'
fi

if want 2; then
echo "== 2. 50 clients missing one 64 MiB NAR, spread over N replicas (upstream at $RATE/s per connection)"
printf '%-9s %9s %10s %10s %10s %10s %10s %10s %6s\n' replicas upstream ttfb_med ttfb_max direct_tt total_med total_max direct_tot bad
for n in 1 2 3; do
  createdb "r$n"
  flags="$(s3_flags "replicas-$n") --cache-database-url $(pg_url "r$n")"
  ports=()
  for i in $(seq "$n"); do
    key=""
    [ "$i" -gt 1 ] && key="--cache-secret-key-path $WORK/r${n}_1/secret-key"
    new_port
    start_ncps "r${n}_$i" "$PORT" "$SLOW" $flags --server-advertise-addr "127.0.0.1:$PORT" $key
    ports+=("$PORT")
  done
  for p in "${ports[@]}"; do curl -s -f -o /dev/null "http://127.0.0.1:$p/$SPH.narinfo"; done
  before=$(grep -c "^$NAR" "$WORK/slow.log" || true)
  : > "$WORK/c$n"
  curl -s -o /dev/null -w 'direct %{time_starttransfer} %{time_total} %{http_code} %{size_download}\n' "$SLOW$NAR" > "$WORK/d$n" &
  dpid=$!
  for c in $(seq 50); do
    p=${ports[$(( (c - 1) % n ))]}
    # Each client from its own address (127.0.0.11-60), as on a LAN: one address may hold only
    # three quarters of ncps's workers (issue 15), which 50 clients on one address would hit.
    curl -s -o /dev/null --interface "127.0.0.$((10 + c))" \
      -w '%{time_starttransfer} %{time_total} %{http_code} %{size_download}\n' "http://127.0.0.1:$p$NAR" >> "$WORK/c$n" &
  done
  wait $dpid
  for j in $(jobs -p); do
    case " ${PIDS[*]} " in *" $j "*) ;; *) wait "$j" || true ;; esac
  done
  after=$(grep -c "^$NAR" "$WORK/slow.log" || true)
  ups=$((after - before - 1))
  bad=$(awk -v want=$((64 << 20)) '$3 != 200 || $4 != want' "$WORK/c$n" | wc -l)
  read -r _ dt dtot _ _ < "$WORK/d$n"
  tm=$(awk '{print $1}' "$WORK/c$n" | median); tx=$(awk '{print $1}' "$WORK/c$n" | sort -g | tail -1)
  om=$(awk '{print $2}' "$WORK/c$n" | median); ox=$(awk '{print $2}' "$WORK/c$n" | sort -g | tail -1)
  printf '%-9s %9s %10.3f %10.3f %10.3f %10.2f %10.2f %10.2f %6s\n' "$n" "$ups" "$tm" "$tx" "$dt" "$om" "$ox" "$dtot" "$bad"
done
fi

if want 3; then
echo "== 3. a 64 MiB miss: the downloader's client, and another replica's (100 ms later)"
createdb pair
flags="$(s3_flags replicas-pair) --cache-database-url $(pg_url pair)"
new_port; A=$PORT; start_ncps pa "$A" "$SLOW" $flags --server-advertise-addr "127.0.0.1:$A"
new_port; B=$PORT; start_ncps pb "$B" "$SLOW" $flags --server-advertise-addr "127.0.0.1:$B" --cache-secret-key-path "$WORK/pa/secret-key"
for p in $A $B; do curl -s -f -o /dev/null "http://127.0.0.1:$p/$SPH.narinfo"; done
curl -s -o /dev/null -w 'downloader: first byte %{time_starttransfer} s, total %{time_total} s, %{http_code} %{size_download} B\n' "http://127.0.0.1:$A$NAR" > "$WORK/pa.out" &
a=$!
sleep 0.1
curl -s -o /dev/null -w 'other:      first byte %{time_starttransfer} s, total %{time_total} s, %{http_code} %{size_download} B\n' "http://127.0.0.1:$B$NAR" > "$WORK/pb.out" &
b=$!
wait $a $b
cat "$WORK/pa.out" "$WORK/pb.out"
grep -q "streaming it from there" "$WORK/pb.log" && echo "the other replica streamed it from the downloader" || echo "warning: the other replica did not stream from the downloader"
fi

if want 4; then
EVN=${BENCH_EVICT_N:-5000}
echo "== 4. eviction on S3: $EVN entries in a bucket, a pass down to half the bytes"
(cd "$HERE/scale-gen" && cargo build --release -q)
TOOL=$HERE/scale-gen/target/release/ncps-scale
export NCPS_WRITE_TOKEN=bench-write-token
new_port; PE=$PORT
start_ncps evict "$PE" "$FAST" $(s3_flags bench-evict) --cache-allow-put-verb --cache-write-token "$NCPS_WRITE_TOKEN" \
  --cache-upload-may-shadow-upstream --log-level warn
"$TOOL" gen "127.0.0.1:$PE" "$EVN" 8 "$WORK/evict.list" > /dev/null
kill -INT "${PIDS[-1]}"; wait "${PIDS[-1]}" || true
B=$WORK/s3/bench-evict
bytes=$(find "$B/narinfo" "$B/nar" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
files_before=$(find "$B/narinfo" -type f | wc -l)
"$NCPS" serve --cache-hostname bench-replicas --cache-data-path "$WORK/evict" --upstream-cache "$FAST" \
  --server-addr "127.0.0.1:$PE" $(s3_flags bench-evict) --cache-max-size "$((bytes / 2))B" > "$WORK/evict2.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 600); do grep -q 'evicted [0-9]* narinfo' "$WORK/evict2.log" && break; sleep 0.1; done
line=$(grep -o 'evicted [0-9]* narinfo.* in [0-9.]*s' "$WORK/evict2.log" | head -1)
n=$(sed -E 's/evicted ([0-9]+) narinfo.*/\1/' <<<"$line"); secs=$(sed -E 's/.* in ([0-9.]+)s$/\1/' <<<"$line")
kill -INT "${PIDS[-1]}"; wait "${PIDS[-1]}" || true
left=$(find "$B/narinfo" -type f | wc -l)
# The peer: the entries left (narinfo and NAR objects), a DELETE each, 8 curl processes.
t0=$(date +%s%N)
( cd "$B" && find narinfo nar -type f ) | sed "s|^|http://127.0.0.1:$S3PORT/bench-evict/|" |
  xargs -P8 -n 64 curl -s -o /dev/null -X DELETE --aws-sigv4 "aws:amz:us-east-1:s3" -u benchkey:benchsecret \
    -H "x-amz-content-sha256: UNSIGNED-PAYLOAD"
peer=$(( ($(date +%s%N) - t0) / 1000000 ))
gone=$(find "$B/narinfo" "$B/nar" -type f | wc -l)
awk -v n="$n" -v s="$secs" -v l="$left" -v p="$peer" -v b="$files_before" -v g="$gone" 'BEGIN {
  printf "ncps: %d of %d entries in %.2f s = %.0f entries/s | peer (curl, a DELETE per object, 8 parallel): %d entries in %.2f s = %.0f/s | ncps / peer %.2f%s\n",
    n, b, s, n / s, l, p / 1000, l / (p / 1000), (n / s) / (l / (p / 1000)), (g ? sprintf(" (warning: %d objects left after the peer)", g) : "") }'
fi
