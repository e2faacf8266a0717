#!/usr/bin/env bash
# build/image.sh -- the ncps container image, amd64 and arm64 in one manifest, with podman
# (no Docker daemon). `make image` runs `make static` first.
#
#   bash build/image.sh                       # IMAGE=localhost/ncps:latest
#   IMAGE=localhost/ncps:0.1.0 bash build/image.sh
#   PLATFORMS=amd64 bash build/image.sh       # one platform only
#   ARCHIVE=target/image/ncps.oci.tar bash build/image.sh   # also write an OCI archive
#                                                          # (both platforms) for `podman load`
#                                                          # or `skopeo copy` to a registry
#
# What goes in (FROM scratch, build/Containerfile): target/static/ncps-{x86_64,aarch64} as
# /bin/ncps, the build machine's CA bundle (Debian's ca-certificates) as
# /etc/ssl/certs/ca-certificates.crt, /etc/passwd and /etc/group with the user ncps (10001),
# an empty /var/lib/ncps owned by it (the VOLUME).
# podman reads build/containers.conf (CONTAINERS_CONF) unless CONTAINERS_CONF is already set.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
IMAGE=${IMAGE:-localhost/ncps:latest}
PLATFORMS=${PLATFORMS:-"amd64 arm64"}
CTX=$ROOT/target/image/context
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/build/containers.conf}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'image.sh: error: %s\n' "$*" >&2; exit 1; }

need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
[[ -f /etc/ssl/certs/ca-certificates.crt ]] || need+=(ca-certificates)
if ((${#need[@]})); then
    [[ $(id -u) == 0 ]] || die "missing ${need[*]}; install them (apt-get install ${need[*]})"
    say "installing ${need[*]}"
    apt-get install -y -qq "${need[@]}" >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }
fi

rm -rf "$CTX"
mkdir -p "$CTX/data"
cp build/Containerfile "$CTX/Containerfile"
platforms=()
for p in $PLATFORMS; do
    case $p in amd64) a=x86_64 ;; arm64) a=aarch64 ;; *) die "unknown platform $p (amd64, arm64)" ;; esac
    bin=target/static/ncps-$a
    [[ -x $bin ]] || die "$bin missing: run make static (or ARCHS=$a bash build/static.sh)"
    r=$CTX/rootfs-$p
    install -D -m 0755 "$bin" "$r/bin/ncps"
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/ca-certificates.crt"
    printf 'root:x:0:0:root:/:/bin/false\nncps:x:10001:10001:ncps:/var/lib/ncps:/bin/false\n' >"$r/etc/passwd"
    printf 'root:x:0:\nncps:x:10001:\n' >"$r/etc/group"
    platforms+=("linux/$p")
done

say "podman build ${platforms[*]} -> $IMAGE"
# A manifest list of the same name as an earlier image or list is replaced, not appended to.
podman manifest rm "$IMAGE" >/dev/null 2>&1 || podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
podman manifest create "$IMAGE" >/dev/null
for p in "${platforms[@]}"; do
    # One tagged image per platform ($IMAGE-amd64, ...), then added to the list. Not
    # `podman build --manifest`: podman 4.3 then records the instances in a way that breaks
    # `podman images` for the whole storage. --layers=false: no intermediate images.
    # FROM scratch with only COPY: no emulation is needed to build a foreign platform.
    tag=$IMAGE-${p#linux/}
    podman rmi -f "$tag" >/dev/null 2>&1 || true
    podman build -q --layers=false --platform "$p" -t "$tag" -f "$CTX/Containerfile" "$CTX" >/dev/null
    podman manifest add "$IMAGE" "containers-storage:$tag" >/dev/null
done
for p in "${platforms[@]}"; do
    echo "  $p: $IMAGE-${p#linux/}, $(podman image inspect --format '{{.Size}}' "$IMAGE-${p#linux/}") bytes" >&2
done
if [[ -n ${ARCHIVE:-} ]]; then
    mkdir -p "$(dirname "$ARCHIVE")"
    rm -f "$ARCHIVE"
    podman manifest push --all "$IMAGE" "oci-archive:$ARCHIVE" >/dev/null
    say "wrote $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"
fi
say "built $IMAGE"
