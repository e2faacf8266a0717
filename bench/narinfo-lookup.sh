#!/usr/bin/env bash
# One narinfo lookup outside the server (issue 12, "narinfo hits spread"): ncps's file per
# narinfo against the same bytes in SQLite (default page cache, and mmap), on a copy of
# bench/scale.sh's cached store of N entries. Rounds alternate; page cache warmed first.
#
#   bash bench/narinfo-lookup.sh            (N=100000; BENCH_SCALE_N=1000000 for the big store)
#
# Knobs (env): BENCH_SCALE_N (100000), BENCH_SCALE_DIR (/var/tmp/ncps-bench-scale), ROUNDS (3),
#   SECONDS_EACH (3), BENCH_WORK (mktemp under /var/tmp).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
N=${BENCH_SCALE_N:-100000}
SRC=${BENCH_SCALE_DIR:-/var/tmp/ncps-bench-scale}/$N
[ -f "$SRC/ok" ] || { echo "no store of $N entries in $SRC: run bench/scale.sh first (BENCH_SCALE_N=$N)" >&2; exit 1; }
(cd "$HERE/narinfo-lookup" && cargo build --release -q)
TOOL=$HERE/narinfo-lookup/target/release/ncps-narinfo-lookup
W=${BENCH_WORK:-$(mktemp -d /var/tmp/ncps-lookup.XXXXXX)}
trap 'rm -rf "$W"' EXIT
NI=$SRC/data/store/narinfo
"$TOOL" build "$NI" "$SRC/paths" "$W/narinfos.db"
find "$NI" -type f -print0 | xargs -0 cat > /dev/null   # warm the page cache
cat "$W/narinfos.db" > /dev/null
echo "N=$N on $(findmnt -no FSTYPE -T "$W"), db $(stat -c %s "$W/narinfos.db") bytes, $(date -u +%FT%TZ)"
for r in $(seq "${ROUNDS:-3}"); do
  for m in file sql sql-mmap; do "$TOOL" "$m" "$NI" "$SRC/paths" "$W/narinfos.db" "${SECONDS_EACH:-3}"; done
done
