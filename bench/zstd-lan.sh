#!/usr/bin/env bash
# Does sending `Compression: none` NARs zstd-encoded pay on a LAN (issue 13 point 7)?
# Root only (network namespace, tc); loopback and a veth pair only; about two minutes.
#
#   sudo bench/zstd-lan.sh            (make bench-zstd)
#
# Data: a real NAR, `nix-store --dump $BENCH_ZSTD_TREE` (default /usr/bin and
# /usr/lib/x86_64-linux-gnu: ELF binaries and libraries, what an uncompressed binary cache
# such as harmonia serves most of).
# 1. The server's cost, once per NAR: `zstd -<level> -T1` pinned to one core (taskset -c 1):
#    wall and CPU seconds per GiB of NAR, and the ratio. A Raspberry Pi core is slower; the
#    per-GiB CPU figure is what to scale (not measured here: no Pi on this machine).
# 2. The client's gain: a "Gigabit client" in its own network namespace behind a veth pair
#    shaped with `tc tbf rate 1000mbit` both ways (netem, for a LAN's delay, is not in every
#    kernel; the veth's own RTT is tens of microseconds).
#    Peer: the same nginx (sendfile on) serving the plain NAR and its .zst copy, so both are
#    sendfile at line rate; the client is `curl -o /dev/null` for the plain NAR and
#    `curl | zstd -dc > /dev/null` for the compressed one (decoding included, as Nix does).
#    Median of $BENCH_ZSTD_REPS runs, bytes and seconds.
# 3. ncps itself (what was built on these numbers): the NAR behind ncps as a `Compression: none`
#    entry of an upstream (the same nginx), fetched once by the client with Accept-Encoding:
#    zstd (a miss, served plain; ncps then makes its copy), then timed as a hit: plain (no
#    Accept-Encoding, like Nix 2.8) against `Content-Encoding: zstd` decoded by the client
#    (like Nix 2.14+), and ncps's own time and CPU for making the copy. $NCPS (default
#    target/release/ncps) is the binary.
#
# Knobs (env): BENCH_ZSTD_TREE, BENCH_ZSTD_LEVELS ("1 3"; 9 takes a minute), BENCH_ZSTD_REPS (3),
#   BENCH_ZSTD_RATE (1000mbit), BENCH_ZSTD_PORT (19190), BENCH_KEEP=1,
#   BENCH_ZSTD_OUT (summary, default bench/last-zstd.txt).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
TREES=${BENCH_ZSTD_TREE:-/usr/bin /usr/lib/x86_64-linux-gnu}
LEVELS=${BENCH_ZSTD_LEVELS:-1 3}
REPS=${BENCH_ZSTD_REPS:-3}
RATE=${BENCH_ZSTD_RATE:-1000mbit}
PORT=${BENCH_ZSTD_PORT:-19190}
OUT=${BENCH_ZSTD_OUT:-$HERE/last-zstd.txt}
for t in nginx curl zstd nix-store taskset ip tc /usr/bin/time; do
  command -v $t >/dev/null || { echo "bench: missing $t" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "bench: needs root (ip netns, tc)" >&2; exit 1; }

WORK=$(mktemp -d /tmp/ncps-bench-zstd.XXXXXX)
NS=ncpsbz$$
NGINX_PID=""
NCPS_PID=""
NCPS=${NCPS:-$HERE/../target/release/ncps}
cleanup() {
  [ -n "$NGINX_PID" ] && { kill "$NGINX_PID" 2>/dev/null || true; wait "$NGINX_PID" 2>/dev/null || true; }
  [ -n "$NCPS_PID" ] && { kill "$NCPS_PID" 2>/dev/null || true; wait "$NCPS_PID" 2>/dev/null || true; }
  ip netns del "$NS" 2>/dev/null || true
  ip link del "vz$$h" 2>/dev/null || true
  [ "${BENCH_KEEP:-}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

exec > >(tee "$OUT") 2>&1
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }

echo "== data"
mkdir -p "$WORK/www"
for t in $TREES; do nix-store --dump "$t"; done > "$WORK/www/nar"
NAR_BYTES=$(stat -c %s "$WORK/www/nar")
GIB=$(awk -v b="$NAR_BYTES" 'BEGIN {print b / 1073741824}')
printf 'NAR of %s: %d bytes (%.2f GiB)\n' "$TREES" "$NAR_BYTES" "$GIB"

echo "== 1. compressing once (one core, zstd -T1)"
declare -A ZBYTES
for l in $LEVELS; do
  cat "$WORK/www/nar" > /dev/null
  /usr/bin/time -f '%e %U %S' -o "$WORK/time-$l" taskset -c 1 zstd -q -"$l" -T1 -c "$WORK/www/nar" > "$WORK/www/nar.$l.zst"
  read -r wall user sys < "$WORK/time-$l"
  ZBYTES[$l]=$(stat -c %s "$WORK/www/nar.$l.zst")
  /usr/bin/time -f '%e' -o "$WORK/dtime-$l" taskset -c 1 zstd -q -dc "$WORK/www/nar.$l.zst" > /dev/null
  dwall=$(cat "$WORK/dtime-$l")
  awk -v l="$l" -v w="$wall" -v u="$user" -v s="$sys" -v g="$GIB" -v n="$NAR_BYTES" -v z="${ZBYTES[$l]}" -v d="$dwall" \
    'BEGIN {printf "zstd -%s: %.1f%% of the size (%.2fx); compress %.0f MiB/s, %.2f CPU s/GiB; decompress %.0f MiB/s\n",
      l, 100 * z / n, n / z, n / 1048576 / w, (u + s) / g, n / 1048576 / d}'
done

# The upstream of part 3: the same NAR as an uncompressed binary cache entry (unsigned; ncps
# runs without upstream keys, so it passes the narinfo on and signs nothing).
mkdir -p "$WORK/up/nar"
NARHASH=$(nix-hash --type sha256 --flat --base32 "$WORK/www/nar")
ln "$WORK/www/nar" "$WORK/up/nar/$NARHASH.nar"
SPH=$( (LC_ALL=C tr -dc '0123456789abcdfghijklmnpqrsvwxyz' < /dev/urandom || true) | head -c 32)
printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n' > "$WORK/up/nix-cache-info"
printf 'StorePath: /nix/store/%s-bench-zstd\nURL: nar/%s.nar\nCompression: none\nFileHash: sha256:%s\nFileSize: %d\nNarHash: sha256:%s\nNarSize: %d\nReferences: \n' \
  "$SPH" "$NARHASH" "$NARHASH" "$NAR_BYTES" "$NARHASH" "$NAR_BYTES" > "$WORK/up/$SPH.narinfo"

echo "== 2. a $RATE client (netns + veth, tc tbf rate $RATE both ways)"
H=vz$$h; C=vz$$c
ip netns add "$NS"
ip link add "$H" type veth peer name "$C"
ip link set "$C" netns "$NS"
ip addr add 10.77.$(( $$ % 200 )).1/24 dev "$H"
SRV=10.77.$(( $$ % 200 )).1
ip link set "$H" up
ip netns exec "$NS" ip addr add 10.77.$(( $$ % 200 )).2/24 dev "$C"
ip netns exec "$NS" ip link set "$C" up
ip netns exec "$NS" ip link set lo up
# netem is not in every kernel (not in this VM's); a token bucket is.
tc qdisc add dev "$H" root tbf rate "$RATE" burst 256kb latency 10ms
ip netns exec "$NS" tc qdisc add dev "$C" root tbf rate "$RATE" burst 256kb latency 10ms
cat > "$WORK/nginx.conf" <<EOF
user root;
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/error.log warn;
events { worker_connections 64; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  server { listen $SRV:$PORT; root $WORK/www; }
  server { listen $SRV:$((PORT + 1)); root $WORK/up; }
}
EOF
nginx -p "$WORK" -c "$WORK/nginx.conf" > "$WORK/nginx.out" 2>&1 &
NGINX_PID=$!
for _ in $(seq 50); do curl -s -o /dev/null "http://$SRV:$PORT/nar" && break; sleep 0.1; done

plain() {
  ip netns exec "$NS" curl -s -o /dev/null -w '%{time_total}\n' "http://$SRV:$PORT/nar"
}
# Seconds a client pipeline (a shell command in the client's namespace) takes.
client_secs() {
  local t0 t1
  t0=$(now)
  ip netns exec "$NS" sh -c "$1"
  t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}'
}
encoded() {
  client_secs "curl -s http://$SRV:$PORT/nar.$1.zst | zstd -q -dc > /dev/null"
}
P=$(for _ in $(seq "$REPS"); do plain; done | median)
printf 'plain:   %d bytes in %.2f s (%.0f MiB/s of NAR)\n' "$NAR_BYTES" "$P" "$(awk -v n="$NAR_BYTES" -v t="$P" 'BEGIN {print n / 1048576 / t}')"
for l in $LEVELS; do
  E=$(for _ in $(seq "$REPS"); do encoded "$l"; done | median)
  awk -v l="$l" -v z="${ZBYTES[$l]}" -v e="$E" -v p="$P" -v n="$NAR_BYTES" \
    'BEGIN {printf "zstd -%s: %d bytes in %.2f s (%.0f MiB/s of NAR), %.2fx faster than plain\n", l, z, e, n / 1048576 / e, p / e}'
done

echo "== 3. ncps: the same NAR as a plain hit and as its zstd copy"
if [ ! -x "$NCPS" ]; then
  echo "skipped: no ncps binary at $NCPS (cargo build --release, or NCPS=...)"
  exit 0
fi
NPORT=$((PORT + 2))
mkdir -p "$WORK/ncps"
"$NCPS" serve --cache-hostname bench-zstd --cache-data-path "$WORK/ncps" \
  --upstream-cache "http://$SRV:$((PORT + 1))" --server-addr "$SRV:$NPORT" > "$WORK/ncps.log" 2>&1 &
NCPS_PID=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://$SRV:$NPORT/nix-cache-info" && break; sleep 0.1; done
ZACCEPT='Accept-Encoding: zstd, br, gzip, deflate, bzip2, xz'
ip netns exec "$NS" curl -s -f -o /dev/null "http://$SRV:$NPORT/$SPH.narinfo"
ip netns exec "$NS" curl -s -f -o /dev/null -H "$ZACCEPT" "http://$SRV:$NPORT/nar/$NARHASH.nar"
cpu0=$(awk '{print $14 + $15}' "/proc/$NCPS_PID/stat")
for _ in $(seq 600); do grep -q "zstd copy kept\|no zstd copy\|not worth a copy" "$WORK/ncps.log" && break; sleep 0.5; done
cpu1=$(awk '{print $14 + $15}' "/proc/$NCPS_PID/stat")
grep -o "zstd copy kept.*\|no zstd copy.*\|not worth a copy.*" "$WORK/ncps.log" | head -1 | sed 's/^/ncps: /'
awk -v a="$cpu0" -v b="$cpu1" -v g="$GIB" -v t="$(getconf CLK_TCK)" \
  'BEGIN {printf "ncps CPU while making the copy: %.1f s (%.2f s per GiB of NAR)\n", (b - a) / t, (b - a) / t / g}'
nplain() {
  ip netns exec "$NS" curl -s -f -o /dev/null -w '%{time_total}\n' "http://$SRV:$NPORT/nar/$NARHASH.nar"
}
nzstd() {
  client_secs "curl -s -f -H '$ZACCEPT' http://$SRV:$NPORT/nar/$NARHASH.nar | zstd -q -dc > /dev/null"
}
ZB=$(ip netns exec "$NS" curl -s -f -H "$ZACCEPT" -o /dev/null -w '%{size_download} %header{content-encoding}\n' "http://$SRV:$NPORT/nar/$NARHASH.nar")
echo "ncps zstd answer: $ZB (bytes, Content-Encoding)"
NP=$(for _ in $(seq "$REPS"); do nplain; done | median)
NZ=$(for _ in $(seq "$REPS"); do nzstd; done | median)
awk -v p="$NP" -v z="$NZ" -v n="$NAR_BYTES" -v q="$P" \
  'BEGIN {printf "ncps plain hit: %.2f s (%.0f MiB/s; nginx plain %.2f s); ncps zstd hit, decoded: %.2f s (%.0f MiB/s of NAR), %.2fx faster than plain\n",
    p, n / 1048576 / p, q, z, n / 1048576 / z, p / z}'
if grep -q "hit (zstd)" "$WORK/ncps.log"; then echo "ncps log: hit (zstd) seen"; else echo "ncps log: no zstd hit!"; fi
