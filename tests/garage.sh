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
. "$(dirname "$0")/cargo-install-once.sh"
cargo_install_once garage garage "${NCPS_TEST_GARAGE_VERSION:-2.5.0}" garage "about 11 minutes here" \
  --no-default-features --features "${NCPS_TEST_GARAGE_FEATURES:-bundled-libs,lmdb}"
