#!/usr/bin/env bash
# tests/nix-chroot.sh -- a current Nix for the end-to-end tests: Debian 13 (trixie) with its
# nix-bin (2.26.3 when written) in a chroot, beside the host's Debian 12 Nix 2.8.
#
#   bash tests/nix-chroot.sh            build the chroot if needed, mount /proc, /dev and
#                                       /dev/pts in it, print its path (the only stdout line)
#   bash tests/nix-chroot.sh --umount   unmount them again (before deleting the directory)
#
# The chroot is built once, in ${NCPS_TEST_CACHE:-/var/cache/ncps-test}/trixie-nix, and reused
# by later runs: `make test` runs this before `cargo test`, and tests/e2e/support/nix.rs runs it
# again (quick once built) so `cargo test --test e2e` alone works too. A stamp file beside it
# (trixie-nix.complete) is written only once Nix runs inside, and names the recipe; a missing
# stamp, or one of another recipe, means the directory is a half-made (or outdated) one: it is
# unmounted and built afresh. Building takes 40 s to 2 min (130 packages, 54 MiB downloaded
# from the mirror, 280 MiB on disk); see DESIGN.md, "Testing with two Nix versions".
#
# The mirror is the one apt uses here (the first .../debian URI of /etc/apt/sources.list*),
# or NCPS_TEST_DEBIAN_MIRROR; apt's Acquire::http::Proxy, if set, is used too.
# Needs root and debootstrap (`make deps` installs it). Exits non-zero with the reason, and
# the tail of debootstrap's log, if the chroot cannot be built; the Nix 2.26 tests then fail
# unless NCPS_TEST_SKIP_NIX226=1 is set (which `make test` honours by not running this).
set -euo pipefail

CACHE=${NCPS_TEST_CACHE:-/var/cache/ncps-test}
ROOT=$CACHE/trixie-nix
STAMP=$ROOT.complete
LOG=$ROOT.log
SUITE=trixie
# libdbi-perl: nix-bin needs libdbd-sqlite3-perl, which needs the virtual perl-dbdabi-94 that
# debootstrap's resolver cannot pick a provider for; naming the provider lets the first pass
# configure everything (without it, it stops at configuring, and apt-get -f install finishes).
PACKAGES=nix-bin,libdbi-perl
RECIPE="recipe 1: debootstrap --variant=minbase --include=$PACKAGES $SUITE"

say() { echo "nix-chroot: $*" >&2; }
die() { say "$*"; exit 1; }

# Mount points under $1 (itself included), deepest first.
mounts_under() {
  awk -v r="$1" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/self/mounts | sort -r
}

umount_all() {
  local m
  for m in $(mounts_under "$ROOT"); do umount "$m" || umount -l "$m"; done
}

mount_all() {
  local m
  for m in proc dev dev/pts; do
    mkdir -p "$ROOT/$m"
    mountpoint -q "$ROOT/$m" || mount --bind "/$m" "$ROOT/$m"
  done
}

# The Debian archive apt uses on this machine.
apt_mirror() {
  local f
  {
    for f in /etc/apt/sources.list.d/*.sources; do
      [ ! -f "$f" ] || sed -n 's/^URIs:[[:space:]]*//p' "$f" | tr ' ' '\n'
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ ! -f "$f" ] || awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; break } }' "$f"
    done
  } | grep -E '/debian/?$' | head -n1 | sed 's:/*$::' || true
}

[ "${1:-}" = --umount ] && { umount_all; exit 0; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot and mount)"
mkdir -p "$CACHE"
# One builder at a time (two test runs may start together); the others wait, then reuse it.
exec 9>"$ROOT.lock"
flock 9

if [ -f "$STAMP" ] && [ "$(head -n1 "$STAMP")" = "$RECIPE" ] && [ -x "$ROOT/usr/bin/nix" ]; then
  mount_all
  echo "$ROOT"
  exit 0
fi

command -v debootstrap >/dev/null || die "debootstrap is not installed (make deps, or apt-get install debootstrap)"
MIRROR=${NCPS_TEST_DEBIAN_MIRROR:-$(apt_mirror)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
eval "$(apt-config shell APT_PROXY Acquire::http::Proxy 2>/dev/null || true)"
if [ -n "${APT_PROXY:-}" ] && [ -z "${http_proxy:-}" ]; then export http_proxy=$APT_PROXY; fi

say "building Debian $SUITE with nix-bin in $ROOT from $MIRROR (once; log in $LOG)"
rm -f "$STAMP"
umount_all
# --one-file-system: never follow a bind mount that umount_all could not remove into /dev.
rm -rf --one-file-system "$ROOT"
mkdir -p "$ROOT"
started=$(date +%s)
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR" >"$LOG" 2>&1; then
  # The first pass may stop while configuring packages: finish inside, as apt would.
  if [ ! -x "$ROOT/usr/bin/apt-get" ] || [ ! -x "$ROOT/usr/bin/dpkg" ]; then
    tail -n 20 "$LOG" >&2
    die "debootstrap $SUITE from $MIRROR failed before installing apt (see $LOG)"
  fi
  say "debootstrap stopped part-way; finishing with dpkg --configure -a and apt-get -f install"
  mount_all
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
  if ! chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
      sh -c 'dpkg --configure -a; apt-get -f install -y && dpkg --configure -a' >>"$LOG" 2>&1; then
    tail -n 20 "$LOG" >&2
    die "finishing the $SUITE chroot failed (see $LOG)"
  fi
fi
mount_all
# The downloaded packages (54 MiB) are not needed again.
rm -f "$ROOT"/var/cache/apt/archives/*.deb
# Single-user root Nix without the nixbld group, as the tests run it (they pass the same
# settings in NIX_CONFIG; this is for `chroot $ROOT nix ...` by hand).
mkdir -p "$ROOT/etc/nix"
printf 'experimental-features = nix-command\nsandbox = false\nsubstitute = false\nbuild-users-group =\n' \
  > "$ROOT/etc/nix/nix.conf"
version=$(chroot "$ROOT" env -i PATH=/usr/bin:/bin HOME=/root nix --version 2>>"$LOG") ||
  die "nix does not run in $ROOT (see $LOG)"
took=$(( $(date +%s) - started ))
printf '%s\n%s\nbuilt %s in %s s from %s\n' "$RECIPE" "$version" "$(date -u +%FT%TZ)" "$took" "$MIRROR" > "$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
say "$version ready in $ROOT (built in $took s)"
echo "$ROOT"
