#!/usr/bin/env bash
# tests/status_page.sh -- checks the status page at GET / and takes a screenshot of it.
#
#   bash tests/status_page.sh http://127.0.0.1:8501 [OUT.png]   a running ncps
#   bash tests/status_page.sh "" [OUT.png]                      starts one itself (NCPS_BIN, default target/debug/ncps)
#   bash tests/status_page.sh --file page.html [OUT.png]        checks and screenshots a saved page
#
# 1. GET / with Accept: text/html answers 200 text/html, with the public key (from /pubkey) and
#    the exact nix.conf lines: `substituters = http://HOST:PORT` (the Host the request used)
#    and `trusted-public-keys = KEY`.
# 2. The page is self-contained and inert: no script, no external stylesheet, image or font.
# 3. A hostile Host header comes back escaped, never as markup.
# 4. Without text/html, / answers JSON with hostname and publicKey, as Go ncps does.
# 5. Headless Chromium renders it to OUT.png (default /tmp/ncps-status-page.png), which must be a
#    1200x900 PNG larger than 10 KB, and its rendered DOM shows every figure the page promises
#    (hit ratio, bytes served and fetched, store against its 1.0 GiB limit, upstream health with
#    the failing one's error, recent misses, the nix.conf lines). Chromium is installed with
#    apt-get when missing and running as root.
# 6. The last 24 hours are drawn: Chromium's DOM has the three inline <svg> charts, and (with the
#    ncps this script starts, which fetches one path, status-check-demo, twice: a miss, then a
#    hit) bars for the hit ratio, bytes from cache and from upstream, and lookup p50/p95; the
#    miss is listed by its store path name with its upstream, not by its NAR's name.
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

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
        echo $((20000 + RANDOM % 20000))
}

# Starts ncps with two upstreams, one that answers (python3's http.server on an empty directory,
# so every path is a clean 404) and one where nothing listens, so the page shows both states.
start_ncps() {
    local bin=${NCPS_BIN:-$ROOT/target/debug/ncps}
    if [[ ! -x $bin ]]; then
        echo "building $bin" >&2
        (cd "$ROOT" && cargo build -q) || return 1
    fi
    local up_port port
    up_port=$(free_port)
    mkdir -p "$TMP/upstream/nar" "$TMP/data"
    printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n' >"$TMP/upstream/nix-cache-info"
    # One path the upstream has (unsigned: ncps runs without --upstream-public-key), 256 KiB.
    python3 - "$TMP/upstream" "$DEMO_HASH" <<'EOF' || return 1
import hashlib, os, sys
def nix32(b):
    chars = "0123456789abcdfghijklmnpqrsvwxyz"
    out = []
    for i in range((len(b) * 8 + 4) // 5 - 1, -1, -1):
        j, k = divmod(i * 5, 8)
        c = b[j] >> k | (b[j + 1] << (8 - k) if j + 1 < len(b) else 0)
        out.append(chars[c & 31])
    return "".join(out)
up, h = sys.argv[1], sys.argv[2]
nar = os.urandom(256 * 1024)
digest = nix32(hashlib.sha256(nar).digest())
name = digest + ".nar"
open(os.path.join(up, "nar", name), "wb").write(nar)
open(os.path.join(up, h + ".narinfo"), "w").write(
    f"StorePath: /nix/store/{h}-status-check-demo\nURL: nar/{name}\nCompression: none\n"
    f"FileHash: sha256:{digest}\nFileSize: {len(nar)}\nNarHash: sha256:{digest}\nNarSize: {len(nar)}\nReferences: \n")
EOF
    local upstreams=(--upstream-cache http://127.0.0.1:9)
    if command -v python3 >/dev/null; then
        python3 -m http.server --bind 127.0.0.1 --directory "$TMP/upstream" "$up_port" >/dev/null 2>&1 &
        UPSTREAM_PID=$!
        # ncps answers in milliseconds now: the upstream must be listening before the misses.
        for _ in $(seq 100); do
            curl -fsS -o /dev/null "http://127.0.0.1:$up_port/nix-cache-info" 2>/dev/null && break
            sleep 0.1
        done
        upstreams=(--upstream-cache "http://127.0.0.1:$up_port" "${upstreams[@]}")
    fi
    port=$(free_port)
    "$bin" serve --cache-hostname status-check --cache-data-path "$TMP/data" "${upstreams[@]}" \
        --cache-max-size 1G --server-addr "127.0.0.1:$port" >"$TMP/ncps.log" 2>&1 &
    SERVER_PID=$!
    URL=http://127.0.0.1:$port
    for _ in $(seq 100); do
        curl -fsS -o /dev/null "$URL/nix-cache-info" 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "ncps exited: $(head -c 500 "$TMP/ncps.log")" >&2; return 1; }
        sleep 0.1
    done
    # A few misses, so the page has something in every section.
    for h in 0mdqa9w1p6cmli6976v4wi0sw9r4p5pr 1b9p07z77phvv2hf6gm9f28syp39f1ag q3fmq8dx1lx3ri1x0v6y4mn1hn0k6a9d; do
        curl -s -o /dev/null "$URL/$h.narinfo"
    done
    # The demo path, as Nix fetches it (narinfo, then its NAR), twice: a miss, then a hit.
    [[ -n $UPSTREAM_PID ]] || return 0
    local nar
    for _ in 1 2; do
        nar=$(curl -fsS "$URL/$DEMO_HASH.narinfo" | sed -n 's/^URL: //p')
        [[ -n $nar ]] && curl -fsS -o /dev/null "$URL/$nar"
        # The download is listed once it has been verified, a moment after its last byte.
        sleep 0.3
    done
    DEMO_UPSTREAM=http://127.0.0.1:$up_port
}

find_chromium() {
    local c
    for c in chromium chromium-browser google-chrome; do
        command -v "$c" >/dev/null && { command -v "$c"; return; }
    done
    [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null || return 1
    echo "chromium missing: installing Debian's chromium package" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } ||
        return 1
    command -v chromium
}

URL= FILE= DEMO_UPSTREAM=
DEMO_HASH=5kqmpdsfgnk4c8l2q7ixmzdcmyw1s0jc
case ${1:-} in
    --file) FILE=${2:?--file needs a path}; shift 2 ;;
    "") start_ncps || { echo "FAIL could not start ncps" >&2; exit 1; }; shift $(($# > 0)) ;;
    *) URL=${1%/}; shift ;;
esac
OUT=${1:-${SCREENSHOT:-/tmp/ncps-status-page.png}}

if [[ -n $FILE ]]; then
    cp "$FILE" "$TMP/page.html"
    key=$(sed -n 's/^trusted-public-keys = \([^<[:space:]]*\).*/\1/p' "$TMP/page.html" | head -1)
    hostport=$(sed -n 's|^.*substituters = http://\([^<[:space:]]*\).*|\1|p' "$TMP/page.html" | head -1)
    [[ -n $key && -n $hostport ]] || fail "the page has no nix.conf lines"
    target=file://$(readlink -f "$FILE")
else
    hostport=${URL#*://}
    hostport=${hostport%%/*}
    key=$(curl -fsS "$URL/pubkey" | tr -d '\r\n') || key=
    [[ -n $key ]] || fail "GET /pubkey gave no key"
    code=$(curl -sS -o "$TMP/page.html" -D "$TMP/headers" -w '%{http_code}' -H 'Accept: text/html' "$URL/") || code=000
    ctype=$(grep -i '^content-type:' "$TMP/headers" | tr -d '\r' | cut -d' ' -f2-)
    if [[ $code == 200 ]] && grep -qi '^text/html' <<<"$ctype"; then
        pass "GET / (Accept: text/html): 200 $ctype"
    else
        fail "GET / (Accept: text/html) answered $code '$ctype', not 200 text/html"
    fi
    target=$URL/
fi

# Exact lines, each on its own line of the page (they are inside a <pre>).
if grep -qxF "substituters = http://$hostport" <(sed 's/<[^>]*>/\n/g' "$TMP/page.html"); then
    pass "nix.conf line: substituters = http://$hostport"
else
    fail "the page lacks the line 'substituters = http://$hostport'"
fi
if [[ -n $key ]] && grep -qxF "trusted-public-keys = $key" <(sed 's/<[^>]*>/\n/g' "$TMP/page.html"); then
    pass "nix.conf line: trusted-public-keys = $key"
else
    fail "the page lacks the line 'trusted-public-keys = $key'"
fi

if grep -qiE '<script|<link|<img|<iframe|@import|url\(|src=|href="?(https?:)?//' "$TMP/page.html"; then
    fail "the page loads or runs something: $(grep -oiE '<script|<link|<img|<iframe|@import|url\(|src=|href="?(https?:)?//' "$TMP/page.html" | sort -u | tr '\n' ' ')"
else
    pass "self-contained: no script, no external asset"
fi

if [[ -z $FILE ]]; then
    code=$(curl -sS -o "$TMP/evil.html" -w '%{http_code}' -H 'Accept: text/html' \
        -H 'Host: <script>alert(1)</script>' "$URL/") || code=000
    if [[ $code != 200 ]]; then
        pass "hostile Host header refused ($code)"
    elif grep -qi '<script' "$TMP/evil.html"; then
        fail "a Host header of <script>... comes back as markup"
    else
        pass "hostile Host header is not echoed as markup"
    fi

    code=$(curl -sS -o "$TMP/status.json" -D "$TMP/jheaders" -w '%{http_code}' "$URL/") || code=000
    if [[ $code == 200 ]] && command -v python3 >/dev/null; then
        if python3 - "$TMP/status.json" "$key" <<'EOF'; then
import json, sys
d = json.load(open(sys.argv[1]))
assert isinstance(d.get("hostname"), str) and d["hostname"], "no hostname"
assert d.get("publicKey") == sys.argv[2], "publicKey differs from /pubkey"
EOF
            pass "GET / (no Accept): JSON with hostname and publicKey"
        else
            fail "GET / (no Accept) is not JSON with hostname and a publicKey equal to /pubkey: $(head -c 300 "$TMP/status.json")"
        fi
    elif [[ $code == 200 ]] && grep -q '"hostname"' "$TMP/status.json" && grep -qF "\"publicKey\":\"$key\"" "$TMP/status.json"; then
        pass "GET / (no Accept): has hostname and publicKey"
    else
        fail "GET / (no Accept) answered $code: $(head -c 300 "$TMP/status.json")"
    fi
fi

if CHROMIUM=$(find_chromium); then
    rm -f "$OUT"
    timeout 120 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$TMP/chromium" --screenshot="$OUT" --window-size=1200,900 "$target" \
        >"$TMP/chromium.log" 2>&1
    size=$(stat -c %s "$OUT" 2>/dev/null || echo 0)
    # Width and height from the PNG header: a page that failed to load still makes a PNG, but
    # a near-blank one compresses to a few KB.
    dims=$(python3 -c 'import struct,sys; d=open(sys.argv[1],"rb").read(24); print("%dx%d" % struct.unpack(">II", d[16:24]))' "$OUT" 2>/dev/null)
    if [[ $(head -c 8 "$OUT" 2>/dev/null | od -An -tx1 | tr -d ' \n') == 89504e470d0a1a0a ]] && ((size > 10240)) &&
        [[ $dims == 1200x900 ]]; then
        pass "screenshot: $OUT ($((size / 1024)) KB, $dims)"
    else
        fail "no usable screenshot ($OUT, $size bytes, ${dims:-no size}): $(tail -c 500 "$TMP/chromium.log")"
    fi
    # What the browser rendered (the DOM after parsing), not only what the server sent: each
    # figure the page promises is there as text a person reads.
    timeout 120 "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$TMP/chromium" --dump-dom "$target" >"$TMP/dom.html" 2>>"$TMP/chromium.log"
    text=$(sed 's/<[^>]*>/ /g' "$TMP/dom.html" | tr -s ' \n' ' ')
    want=("Hit ratio" "Served from cache" "Fetched from upstreams" "Store" "Use this cache" "Upstreams"
        "Recent misses" "trusted-public-keys = $key")
    [[ -z $FILE ]] && want+=("of 1.0 GiB" "healthy" "failing" "Connection refused" "q3fmq8dx1lx3ri1x0v6y4mn1hn0k6a9d.narinfo")
    # The demo miss by its store path's name, with the upstream that served it.
    [[ -n $DEMO_UPSTREAM ]] && want+=("Last 24 hours" "-status-check-demo" "256 KiB" "$DEMO_UPSTREAM")
    missing=()
    for w in "${want[@]}"; do [[ $text == *"$w"* ]] || missing+=("$w"); done
    if ((${#missing[@]} == 0)); then
        pass "rendered page shows: ${want[*]}"
    else
        fail "rendered page lacks: ${missing[*]}"
    fi
    # The charts, as Chromium parsed them: three inline SVGs, each with a title.
    svgs=$(grep -o '<svg [^>]*role="img"' "$TMP/dom.html" | wc -l)
    titles=$(grep -o '<svg [^>]*><title>' "$TMP/dom.html" | wc -l)
    if ((svgs == 3 && titles == 3)); then
        pass "three inline SVG charts of the last 24 hours"
    else
        fail "expected 3 inline <svg role=img> charts with titles, found $svgs ($titles with a title)"
    fi
    if [[ -n $DEMO_UPSTREAM ]]; then
        bars=()
        for class in ratio cache fetched p50 p95; do
            grep -q "<path class=\"$class\" d=\"M" "$TMP/dom.html" || bars+=("$class")
        done
        if ((${#bars[@]} == 0)); then
            pass "charts have bars: hit ratio, bytes from cache and fetched, lookup p50 and p95"
        else
            fail "charts lack bars for: ${bars[*]}"
        fi
        if grep -qE '\.nar(\.[a-z0-9]+)?</|>/?nar/' "$TMP/dom.html"; then
            fail "a miss is listed by its NAR's name"
        else
            pass "misses are listed by store path name"
        fi
    fi
else
    fail "chromium not found and could not be installed"
fi

((failures == 0)) && echo "status_page: all checks passed" || echo "status_page: $failures check(s) failed" >&2
exit $((failures > 0))
