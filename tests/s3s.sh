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
. "$(dirname "$0")/cargo-install-once.sh"
cargo_install_once s3s-fs s3s-fs "${NCPS_TEST_S3S_FS_VERSION:-0.14.1}" s3s-fs "a few minutes" --features binary
