#!/usr/bin/env bash
# tests/s3s.sh -- a real S3 server for the S3 blob store tests (src/storage/s3.rs contract tests,
# tests/e2e/s3.rs): s3s-fs, the file-system backed S3 server of the s3s project (Rust, from
# crates.io). It speaks the S3 REST API with SigV4 authentication, multipart uploads,
# ListObjectsV2 and ranged GETs, which is what the S3 blob store uses; no mocks.
#
#   bash tests/s3s.sh     install it if needed, print the path of the s3s-fs binary (the only
#                         stdout line)
#
# Installed once with `cargo install --locked` into
# ${NCPS_TEST_CACHE:-/var/cache/ncps-test}/s3s-fs-$VERSION (a few minutes of compiling, once);
# later runs only print the path. `make test` runs this before the S3 tests, and the tests find the
# binary through NCPS_TEST_S3S_FS or by running this script (instant once installed).
set -euo pipefail

VERSION=${NCPS_TEST_S3S_FS_VERSION:-0.14.1}
CACHE=${NCPS_TEST_CACHE:-/var/cache/ncps-test}
ROOT=$CACHE/s3s-fs-$VERSION
STAMP=$ROOT.complete
BIN=$ROOT/bin/s3s-fs

say() { echo "s3s-fs: $*" >&2; }
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
command -v cargo >/dev/null || die "cargo is needed to install s3s-fs"
say "installing s3s-fs@$VERSION from crates.io into $ROOT (a few minutes, once)"
# Its own target dir, so this does not lock or dirty the project's.
CARGO_TARGET_DIR=$ROOT.build cargo install -q "s3s-fs@$VERSION" --features binary --locked --root "$ROOT" >&2 \
  || die "cargo install s3s-fs@$VERSION failed"
rm -rf "$ROOT.build"
"$BIN" --help >/dev/null || die "$BIN does not run"
touch "$STAMP"
echo "$BIN"
