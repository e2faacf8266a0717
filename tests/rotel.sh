#!/usr/bin/env bash
# tests/rotel.sh -- a real OpenTelemetry collector for the end-to-end tests (tests/e2e/otel.rs):
# Rotel, a collector written in Rust, from its PyPI wheel (the wheel carries the `rotel-agent`
# binary, which receives OTLP over gRPC, HTTP/protobuf and HTTP/JSON and runs Python
# processors on what it receives).
#
#   bash tests/rotel.sh     install it if needed, print the path of rotel-agent (the only
#                           stdout line)
#
# Installed once into a virtualenv in ${NCPS_TEST_CACHE:-/var/cache/ncps-test}/rotel-$VERSION
# with pip from PyPI (about 30 MB); later runs only print the path. `make test` runs this before
# `cargo test`, and tests/e2e/support/collector.rs runs it again (instant once installed), so
# `cargo test --test e2e otel::` works alone. Needs python3 with venv (python3-venv on Debian)
# and libpython3 (the processors run in the agent's embedded Python).
set -euo pipefail

VERSION=${NCPS_TEST_ROTEL_VERSION:-0.0.1a15}
CACHE=${NCPS_TEST_CACHE:-/var/cache/ncps-test}
VENV=$CACHE/rotel-$VERSION
STAMP=$VENV.complete

say() { echo "rotel: $*" >&2; }
die() { say "$*"; exit 1; }

find_agent() { find "$VENV" -name rotel-agent -type f -perm -u+x 2>/dev/null | head -n1; }

if [[ -f $STAMP ]] && agent=$(find_agent) && [[ -n $agent ]]; then
  echo "$agent"
  exit 0
fi

mkdir -p "$CACHE"
exec 9>"$VENV.lock"
flock 9
# Someone else may have installed it while this waited for the lock.
if [[ -f $STAMP ]] && agent=$(find_agent) && [[ -n $agent ]]; then
  echo "$agent"
  exit 0
fi
command -v python3 >/dev/null || die "python3 is needed (apt-get install python3 python3-venv)"
rm -rf "$VENV"
if ! python3 -m venv "$VENV" >&2; then
  die "python3 -m venv failed (apt-get install python3-venv)"
fi
say "installing rotel==$VERSION from PyPI into $VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "rotel==$VERSION" >&2 || die "pip install rotel==$VERSION failed"
agent=$(find_agent)
[[ -n $agent ]] || die "no rotel-agent binary in the rotel wheel"
"$agent" --version >&2 || die "$agent does not run (is libpython3 installed?)"
touch "$STAMP"
echo "$agent"
