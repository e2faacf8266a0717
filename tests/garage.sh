#!/usr/bin/env bash
# tests/garage.sh -- Garage, the distributed S3 object store of Deuxfleurs (Rust, from crates.io),
# for the scale tests (tests/e2e/scale.rs, `make test-scale`): three Garage nodes on loopback with
# replication factor 3 are the bucket that three ncps replicas share. Unlike s3s-fs (tests/s3s.sh)
# it is a real cluster whose nodes can be stopped one at a time, which is what the scale tests do.
#
#   bash tests/garage.sh     install it if needed, print the path of the garage binary (the only
#                            stdout line)
#
# Installed once with `cargo install --locked` into
# ${NCPS_TEST_CACHE:-/var/cache/ncps-test}/garage-$VERSION, without the default features that the
# tests do not use (k2v, metrics) and with LMDB as the only metadata engine, under `nice -n 19` so
# it does not starve the machine (tens of minutes of compiling on 2 cores, once); later runs only
# print the path. The tests find the binary through NCPS_TEST_GARAGE or by running this script.
set -euo pipefail

VERSION=${NCPS_TEST_GARAGE_VERSION:-2.5.0}
FEATURES=${NCPS_TEST_GARAGE_FEATURES:-bundled-libs,lmdb}
CACHE=${NCPS_TEST_CACHE:-/var/cache/ncps-test}
ROOT=$CACHE/garage-$VERSION
STAMP=$ROOT.complete
BIN=$ROOT/bin/garage

say() { echo "garage: $*" >&2; }
die() { say "$*"; exit 1; }

if [[ -f $STAMP && -x $BIN ]]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$CACHE"
exec 9>"$ROOT.lock"
flock 9
# Someone else may have installed it while this waited for the lock.
if [[ -f $STAMP && -x $BIN ]]; then
  echo "$BIN"
  exit 0
fi
command -v cargo >/dev/null || die "cargo is needed to install garage"
say "installing garage@$VERSION (features $FEATURES) from crates.io into $ROOT (tens of minutes, once)"
start=$(date +%s)
# Its own target dir, so this does not lock or dirty the project's.
CARGO_TARGET_DIR=$ROOT.build nice -n 19 cargo install -q "garage@$VERSION" --locked \
  --no-default-features --features "$FEATURES" --root "$ROOT" >&2 \
  || die "cargo install garage@$VERSION failed"
rm -rf "$ROOT.build"
"$BIN" --help >/dev/null || die "$BIN does not run"
say "installed in $(( $(date +%s) - start )) s"
touch "$STAMP"
echo "$BIN"
