#!/usr/bin/env bash
# tests/container.sh -- the container image (make image) run for real with podman.
#
#   bash tests/container.sh            # IMAGE=localhost/ncps:latest (make test-image builds it)
#   DEBUG_STOP=1 bash tests/container.sh   # also print the log lines around each stop
#
# 1. The image starts ncps as a non-root user (uid 10001), as PID 1 of the container, and it
#    answers /healthz.
# 2. The real Nix client (the host's nix) fetches a fixture path through it (`nix copy --from`)
#    and `nix store verify` accepts it with the key /pubkey gives; the upstream is a real HTTP
#    server (python3 -m http.server) over a signed file:// binary cache (tests/fixtures/mkfixture.sh).
# 3. `podman stop` ends it within 2 s with exit status 0, leaving the clean-stop marker.
# 4. A new container on the same volume keeps the key (same /pubkey) and the cache: with the
#    upstream stopped, a fresh Nix store still gets the path, verified.
# 5. The image holds both platforms (amd64 and arm64) in its manifest.
# Exits non-zero, naming each failed check, if anything is wrong. Needs root (podman, nix).
set -uo pipefail

# shellcheck source=tests/podman-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/podman-common.sh"

TMP=$(mktemp -d /tmp/ncps-container.XXXXXX)
NAME=ncps-test-$$
VOL=ncps-test-vol-$$
UP_PID=
cleanup() {
    podman rm -f -t 0 "$NAME" >/dev/null 2>&1
    podman volume rm -f "$VOL" >/dev/null 2>&1
    [[ -n $UP_PID ]] && kill "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null
    if [[ -f $TMP/fx/paths/top-closure.txt ]]; then
        nix-store --delete $(cat "$TMP"/fx/paths/{top-closure,many,drvs}.txt) >/dev/null 2>&1
    fi
    chmod -R u+w "$TMP" 2>/dev/null; rm -rf "$TMP"
}
trap cleanup EXIT

command -v podman >/dev/null || die "podman is not installed (make image installs it)"
command -v nix >/dev/null || die "nix is not installed (make deps installs it)"
podman image exists "$IMAGE" || podman manifest exists "$IMAGE" || die "no image $IMAGE: run make image"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_status() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1"; }
wait_healthy() {
    for _ in $(seq 100); do
        [[ $(http_status "http://127.0.0.1:$PORT/healthz") == 200 ]] && return 0
        [[ $(podman inspect --format '{{.State.Running}}' "$NAME" 2>/dev/null) == true ]] || return 1
        sleep 0.1
    done
    return 1
}
export NIX_CONFIG=$'experimental-features = nix-command\nsandbox = false\nsubstitute = false'
export XDG_CACHE_HOME=$TMP/xdg
# A fresh chroot store per fetch, so the host store (which built the fixture) plays no part.
fetch() { # fetch STORE_DIR KEY PATH...
    local store=$1 key=$2; shift 2
    nix copy --from "http://127.0.0.1:$PORT" --to "$store" "$@" \
        --option trusted-public-keys "$key" --option connect-timeout 5 >"$TMP/nix.log" 2>&1 &&
        nix store verify --store "$store" -r "$@" --option trusted-public-keys "$key" >>"$TMP/nix.log" 2>&1
}
run_ncps() {
    podman run -d --name "$NAME" --network host -v "$VOL:/var/lib/ncps" "$IMAGE" \
        /bin/ncps serve --cache-hostname container.test --cache-data-path /var/lib/ncps \
        --upstream-cache "http://127.0.0.1:$UP_PORT" --upstream-public-key "$(cat "$TMP/fx/keys/up1.pub")" \
        --server-addr "127.0.0.1:$PORT" >/dev/null
}
# podman stop, timed; then the exit status podman recorded.
stop_ncps() {
    local t0 t1
    t0=$(date +%s%N)
    podman stop -t 10 "$NAME" >/dev/null
    t1=$(date +%s%N)
    STOP_MS=$(((t1 - t0) / 1000000))
    STOP_CODE=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
    [[ -n ${DEBUG_STOP:-} ]] && podman logs -t "$NAME" 2>&1 | tail -4 >&2
}

# ---- fixture and upstream --------------------------------------------------------------
bash "$ROOT/tests/fixtures/mkfixture.sh" "$TMP/fx" 1 2 >"$TMP/fixture.log" 2>&1 || { cat "$TMP/fixture.log" >&2; die "fixture build"; }
TOP=$(cat "$TMP/fx/paths/top.txt")
UP_PORT=$(free_port)
python3 -m http.server --bind 127.0.0.1 --directory "$TMP/fx/cache-zstd" "$UP_PORT" >/dev/null 2>&1 &
UP_PID=$!
PORT=$(free_port)
podman volume create "$VOL" >/dev/null || die "podman volume create"
VOLDIR=$(podman volume inspect --format '{{.Mountpoint}}' "$VOL")

# ---- 1. start, user, PID 1, /healthz ----------------------------------------------------
run_ncps || die "podman run $IMAGE"
if wait_healthy; then pass "the container answers /healthz"; else podman logs "$NAME" >&2; die "no /healthz answer"; fi
PID=$(podman inspect --format '{{.State.Pid}}' "$NAME")
uid=$(awk '/^Uid:/ {print $2}' "/proc/$PID/status")
nspid=$(awk '/^NSpid:/ {print $NF}' "/proc/$PID/status")
[[ $uid == 10001 ]] && pass "ncps runs as uid 10001, not root" || fail "ncps runs as uid $uid"
[[ $nspid == 1 ]] && pass "ncps is PID 1 in the container" || fail "ncps is PID $nspid in the container"
owner=$(stat -c %u "$VOLDIR")
[[ $owner == 10001 ]] && pass "the volume is owned by uid 10001" || fail "the volume is owned by uid $owner"

# ---- 2. the real Nix client through it ---------------------------------------------------
KEY=$(curl -s --max-time 5 "http://127.0.0.1:$PORT/pubkey")
[[ $KEY == container.test:* ]] && pass "/pubkey is named after --cache-hostname" || fail "/pubkey: $KEY"
if fetch "$TMP/client1" "$KEY" "$TOP"; then pass "nix copy --from the container, and nix store verify"; else cat "$TMP/nix.log" >&2; fail "nix copy --from the container"; fi

# ---- 3. podman stop -----------------------------------------------------------------------
stop_ncps
((STOP_MS < 2000)) && pass "podman stop took ${STOP_MS} ms" || fail "podman stop took ${STOP_MS} ms (limit 2000)"
[[ $STOP_CODE == 0 ]] && pass "exit status 0 after podman stop" || fail "exit status $STOP_CODE after podman stop"
[[ -f $VOLDIR/clean-shutdown ]] && pass "the clean-stop marker is in the volume" || fail "no clean-stop marker in the volume"
podman logs "$NAME" 2>&1 | grep -q 'signal 15' && pass "ncps logged the signal" || fail "no 'signal 15' in the log"
podman rm "$NAME" >/dev/null

# ---- 4. a new container on the same volume, upstream gone ---------------------------------
kill "$UP_PID"; wait "$UP_PID" 2>/dev/null; UP_PID=
run_ncps || die "podman run (second time)"
wait_healthy || { podman logs "$NAME" >&2; die "no /healthz answer after the restart"; }
KEY2=$(curl -s --max-time 5 "http://127.0.0.1:$PORT/pubkey")
[[ $KEY2 == "$KEY" ]] && pass "same /pubkey after a new container on the volume" || fail "/pubkey changed: $KEY -> $KEY2"
if fetch "$TMP/client2" "$KEY" "$TOP"; then pass "with the upstream stopped, the cached path is served and verifies"; else cat "$TMP/nix.log" >&2; fail "the cached path after the restart"; fi
stop_ncps
((STOP_MS < 2000)) && [[ $STOP_CODE == 0 ]] && pass "second podman stop: ${STOP_MS} ms, status 0" || fail "second podman stop: ${STOP_MS} ms, status $STOP_CODE"

# ---- 5. both platforms, and the size --------------------------------------------------------
if podman manifest exists "$IMAGE"; then
    archs=$(podman manifest inspect "$IMAGE" | python3 -c 'import json,sys; print(" ".join(sorted(m["platform"]["architecture"] for m in json.load(sys.stdin)["manifests"])))')
    [[ $archs == "amd64 arm64" ]] && pass "the manifest holds amd64 and arm64" || fail "the manifest holds: $archs"
else
    fail "$IMAGE is a single image, not a manifest list of amd64 and arm64"
fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE" 2>/dev/null | head -1)
echo "image size (this machine's platform, uncompressed): ${size:-?} bytes"

((failures == 0)) && echo "tests/container.sh: all checks passed" || { echo "tests/container.sh: $failures check(s) failed" >&2; exit 1; }
