# tests/cargo-install-once.sh -- sourced by tests/s3s.sh and tests/garage.sh: installs a server
# the tests run against from crates.io, once, into ${NCPS_TEST_CACHE:-/var/cache/ncps-test}, and
# prints its binary's path (the only stdout line). A lock keeps two runs from building it at
# once; a stamp file says the install finished.
#
#   cargo_install_once NAME CRATE VERSION BINARY WHAT-IT-TAKES [cargo install options...]

cargo_install_once() {
  local name=$1 crate=$2 version=$3 binary=$4 takes=$5
  shift 5
  local cache=${NCPS_TEST_CACHE:-/var/cache/ncps-test}
  local root=$cache/$name-$version
  local stamp=$root.complete bin=$root/bin/$binary
  say() { echo "$name: $*" >&2; }
  if [[ -f $stamp && -x $bin ]]; then
    echo "$bin"
    return 0
  fi
  mkdir -p "$cache"
  exec 9>"$root.lock"
  flock 9
  # Someone else may have installed it while this waited for the lock.
  if [[ -f $stamp && -x $bin ]]; then
    echo "$bin"
    return 0
  fi
  command -v cargo >/dev/null || { say "cargo is needed to install $crate"; return 1; }
  say "installing $crate@$version from crates.io into $root ($takes, once)"
  local start
  start=$(date +%s)
  # Its own target dir, so this does not lock or dirty the project's.
  CARGO_TARGET_DIR=$root.build nice -n 19 cargo install -q "$crate@$version" --locked --root "$root" "$@" >&2 \
    || { say "cargo install $crate@$version failed"; return 1; }
  rm -rf "$root.build"
  "$bin" --help >/dev/null || { say "$bin does not run"; return 1; }
  say "installed in $(( $(date +%s) - start )) s"
  touch "$stamp"
  echo "$bin"
}
