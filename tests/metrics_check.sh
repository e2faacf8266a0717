#!/usr/bin/env bash
# tests/metrics_check.sh -- checks GET /metrics with promtool.
#
#   bash tests/metrics_check.sh http://127.0.0.1:8501   a running ncps (started with --prometheus-enabled)
#   bash tests/metrics_check.sh                         starts one itself (NCPS_BIN, default target/debug/ncps)
#   bash tests/metrics_check.sh --file metrics.prom     checks saved output instead
#
# 1. /metrics answers 200 with the text exposition Content-Type.
# 2. `promtool check metrics` exits 0 and prints nothing (every family has HELP and TYPE, names
#    and suffixes follow the conventions, the text parses).
# 3. The series the issue asks for are there: requests by result, bytes served and fetched,
#    upstream durations and errors, downloads in flight, store figures, evictions, process.
# promtool comes from Debian's `prometheus` package; when it is missing the package is
# downloaded (not installed: that would also start a Prometheus server) and only promtool is
# unpacked, into ${XDG_CACHE_HOME:-~/.cache}/ncps-tests.
# Exits non-zero, naming each failed check, if anything is wrong.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
failures=0
pass() { printf 'ok   %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*" >&2; failures=$((failures + 1)); }

TMP=$(mktemp -d)
SERVER_PID= UPSTREAM_PID=
cleanup() {
    [[ -n $SERVER_PID ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    [[ -n $UPSTREAM_PID ]] && kill "$UPSTREAM_PID" 2>/dev/null && wait "$UPSTREAM_PID" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

find_promtool() {
    local cache=${XDG_CACHE_HOME:-$HOME/.cache}/ncps-tests
    if command -v promtool >/dev/null; then command -v promtool; return; fi
    if [[ -x $cache/promtool ]]; then echo "$cache/promtool"; return; fi
    command -v apt-get >/dev/null || return 1
    echo "promtool missing: fetching it from Debian's prometheus package" >&2
    # Not `apt-cache policy | grep -q`: under pipefail, grep quitting early makes apt-cache die
    # of SIGPIPE and the pipeline fail even when the package is there.
    local policy
    policy=$(apt-cache policy prometheus 2>/dev/null)
    if [[ $policy != *"Candidate: "[0-9]* ]]; then
        apt-get update -qq >/dev/null 2>&1
        policy=$(apt-cache policy prometheus 2>/dev/null)
    fi
    [[ $policy == *"Candidate: "[0-9]* ]] ||
        { echo "no candidate for Debian's prometheus package, even after apt-get update" >&2; return 1; }
    mkdir -p "$cache" "$TMP/deb" &&
        (cd "$TMP/deb" && apt-get download -q prometheus >/dev/null 2>&1) &&
        dpkg-deb -x "$TMP"/deb/prometheus_*.deb "$TMP/deb/x" &&
        install -m 0755 "$TMP/deb/x/usr/bin/promtool" "$cache/promtool" &&
        echo "$cache/promtool"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
        echo $((20000 + RANDOM % 20000))
}

# Starts ncps on a free port, with a local upstream that has nothing (python3's http.server on an
# empty directory answers 404), so the scrape has upstream series without any network.
start_ncps() {
    local bin=${NCPS_BIN:-$ROOT/target/debug/ncps}
    if [[ ! -x $bin ]]; then
        echo "building $bin" >&2
        (cd "$ROOT" && cargo build -q) || return 1
    fi
    local up_port port upstream
    up_port=$(free_port)
    mkdir -p "$TMP/upstream" "$TMP/data"
    printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n' >"$TMP/upstream/nix-cache-info"
    if command -v python3 >/dev/null; then
        python3 -m http.server --bind 127.0.0.1 --directory "$TMP/upstream" "$up_port" >/dev/null 2>&1 &
        UPSTREAM_PID=$!
        upstream=http://127.0.0.1:$up_port
    else
        upstream=http://127.0.0.1:9 # nothing listens: the upstream series show errors instead
    fi
    port=$(free_port)
    "$bin" serve --cache-hostname metrics-check --cache-data-path "$TMP/data" \
        --upstream-cache "$upstream" --server-addr "127.0.0.1:$port" --prometheus-enabled \
        >"$TMP/ncps.log" 2>&1 &
    SERVER_PID=$!
    URL=http://127.0.0.1:$port
    for _ in $(seq 100); do
        curl -fsS -o /dev/null "$URL/nix-cache-info" 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "ncps exited: $(head -c 500 "$TMP/ncps.log")" >&2; return 1; }
        sleep 0.1
    done
    # Some traffic, so request and upstream series have samples.
    curl -s -o /dev/null "$URL/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr.narinfo"
    curl -s -o /dev/null "$URL/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr.narinfo"
    curl -s -o /dev/null "$URL/nar/0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73.nar.xz"
}

URL= FILE=
case ${1:-} in
    --file) FILE=${2:?--file needs a path} ;;
    "") start_ncps || { echo "FAIL could not start ncps" >&2; exit 1; } ;;
    *) URL=${1%/} ;;
esac

PROMTOOL=$(find_promtool) || { echo "FAIL promtool not found and could not be fetched" >&2; exit 1; }

if [[ -n $FILE ]]; then
    cp "$FILE" "$TMP/metrics"
else
    code=$(curl -sS -o "$TMP/metrics" -D "$TMP/headers" -w '%{http_code}' "$URL/metrics") || code=000
    if [[ $code != 200 ]]; then
        fail "GET $URL/metrics answered $code (is --prometheus-enabled set?)"
        exit 1
    fi
    ctype=$(grep -i '^content-type:' "$TMP/headers" | tr -d '\r' | cut -d' ' -f2-)
    if grep -qi '^text/plain; *version=0.0.4' <<<"$ctype"; then
        pass "GET /metrics: 200, Content-Type $ctype"
    else
        fail "GET /metrics: Content-Type is '$ctype', not text/plain; version=0.0.4"
    fi
fi

out=$("$PROMTOOL" check metrics <"$TMP/metrics" 2>&1)
rc=$?
if [[ $rc == 0 && -z $out ]]; then
    pass "promtool check metrics: clean ($(grep -c '^# TYPE' "$TMP/metrics") families, $(grep -vc '^#' "$TMP/metrics") samples)"
else
    fail "promtool check metrics (exit $rc): $out"
fi

# Every family has both HELP and TYPE (promtool reports a missing HELP, not a missing TYPE).
untyped=$(awk '/^# HELP /{h[$3]=1} /^# TYPE /{t[$3]=1} END{for(n in h) if(!(n in t)) print n; for(n in t) if(!(n in h)) print n}' "$TMP/metrics")
[[ -z $untyped ]] && pass "every family has HELP and TYPE" || fail "families without both HELP and TYPE: $(echo $untyped)"

declare -A want=(
    [ncps_narinfo_served_total]=counter [ncps_nar_served_total]=counter
    [ncps_cache_requests_total]=counter [ncps_served_bytes_total]=counter
    [ncps_upstream_fetched_bytes_total]=counter [ncps_upstream_errors_total]=counter
    [ncps_upstream_narinfo_fetch_duration_seconds]=histogram [ncps_upstream_nar_fetch_duration_seconds]=histogram
    [ncps_upstream_healthy]=gauge [ncps_downloads_in_flight]=gauge
    [ncps_store_total_size_bytes]=gauge [ncps_narinfo_entries]=gauge [ncps_nar_file_entries]=gauge
    [ncps_cache_max_size_bytes]=gauge
    [ncps_lru_narinfos_evicted_total]=counter [ncps_lru_nar_files_evicted_total]=counter
    [ncps_lru_bytes_freed_total]=counter
    [process_resident_memory_bytes]=gauge [process_open_fds]=gauge [process_start_time_seconds]=gauge
)
missing=()
for name in "${!want[@]}"; do
    grep -qx "# TYPE $name ${want[$name]}" "$TMP/metrics" || missing+=("$name (${want[$name]})")
done
if [[ ${#missing[@]} == 0 ]]; then
    pass "all ${#want[@]} required families present with the right type"
else
    fail "missing or wrongly typed: ${missing[*]}"
fi
for series in 'ncps_narinfo_served_total{result="hit",status="success"}' 'ncps_nar_served_total{result="miss",status="error"}'; do
    grep -qF "$series " "$TMP/metrics" || fail "series $series missing (Go ncps exports it from the start)"
done

start=$(awk '$1=="process_start_time_seconds"{print int($2)}' "$TMP/metrics")
now=$(date +%s)
if [[ -n $start ]] && ((start <= now && start > now - 86400 * 365)); then
    pass "process_start_time_seconds is a plausible Unix time ($start)"
else
    fail "process_start_time_seconds '$start' is not a Unix time in the past year"
fi

if [[ -z $FILE && -n $UPSTREAM_PID ]]; then
    grep -q '^ncps_upstream_narinfo_fetch_duration_seconds_count{.*} [1-9]' "$TMP/metrics" &&
        pass "the narinfo lookups reached the upstream histogram" ||
        fail "no upstream narinfo fetch was recorded after two lookups"
fi

((failures == 0)) && echo "metrics_check: all checks passed" || echo "metrics_check: $failures check(s) failed" >&2
exit $((failures > 0))
