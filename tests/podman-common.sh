# Shared by tests/container.sh and tests/deploy.sh (sourced): where the project is, which
# image, the project's own containers.conf for podman, and the pass/fail helpers.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${IMAGE:-localhost/ncps:latest}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/build/containers.conf}
failures=0
pass() { printf 'ok   %s\n' "$*"; }
fail() { printf 'FAIL %s\n' "$*" >&2; failures=$((failures + 1)); }
die() { printf 'FAIL %s\n' "$*" >&2; exit 1; }
