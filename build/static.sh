#!/usr/bin/env bash
# build/static.sh -- fully static, stripped ncps binaries for Linux (musl libc).
#
#   bash build/static.sh                  # both targets (default ARCHS="x86_64 aarch64")
#   ARCHS=x86_64 bash build/static.sh     # one target
#   bash build/static.sh --deps-only      # only install packages and prepare helpers
#
# Output: target/static/ncps-x86_64, target/static/ncps-aarch64 (static, non-PIE ELF,
# no interpreter, no shared libraries; the aarch64 one runs on a Raspberry Pi 3/4/5 with
# a 64-bit OS).
#
# How, in short (the long version with every failed attempt: /work/shared/static-musl.md):
#   * There is no Debian package with a prebuilt Rust std for *-linux-musl, and rustup's
#     toolchains cannot be used (no network except package registries). So we compile std
#     ourselves with cargo's `-Z build-std`, using Debian's rustc-web 1.96 compiler and the
#     matching std sources from rust-web-src. The two packages MUST have the same version.
#   * C code (bundled SQLite, zstd, ring) and the final link go through musl-gcc (x86_64)
#     or a small wrapper around the aarch64 cross gcc with musl's specs file (aarch64).
#   * std on musl wants a static libunwind. Debian has none for musl, so we take LLVM's
#     libunwind.a from libunwind-16-dev (glibc build) and add a tiny __fprintf_chk shim.
#
# This script never touches the normal build: it uses its own CARGO_TARGET_DIR
# (target/static-build), calls /usr/bin/cargo and /usr/bin/rustc explicitly, and sets
# RUSTC_BOOTSTRAP=1 only for its own child processes. rustup's cargo stays the default.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ARCHS=${ARCHS:-"x86_64 aarch64"}
DEPS_ONLY=0
[[ ${1:-} == --deps-only ]] && DEPS_ONLY=1

HELPERS=$ROOT/target/musl-helpers     # libunwind.a per arch, aarch64 gcc wrapper, .debs
OUT=$ROOT/target/static               # final binaries
BUILD_DIR=$ROOT/target/static-build   # cargo's target dir for this script only
PROFILE=static

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'static.sh: error: %s\n' "$*" >&2; exit 1; }

for a in $ARCHS; do
    case $a in x86_64|aarch64) ;; *) die "unknown arch '$a' in ARCHS (use x86_64 and/or aarch64)";; esac
done
want() { [[ " $ARCHS " == *" $1 "* ]]; }

# ----------------------------------------------------------------------------------------
# 1. apt packages (installed only when missing, so a second run costs ~0.1 s here)
# ----------------------------------------------------------------------------------------
# rustc-web/cargo-web/rust-web-src: 1.96 compiler, cargo and std sources (bookworm-security).
# musl-tools: musl-gcc + musl-dev for x86_64.   file/binutils: checks, strip, ar.
PKGS=(rustc-web cargo-web rust-web-src musl-tools file binutils)
if want aarch64; then
    # Cross gcc/binutils for the link and the C code; musl-dev:arm64 provides the arm64 musl
    # libc.a, crt files and musl-gcc.specs; qemu-user-static runs the result for the smoke test.
    PKGS+=(gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu musl-dev:arm64 qemu-user-static)
fi

missing=()
for p in "${PKGS[@]}"; do
    # dpkg-query prints "install ok installed" only for fully installed packages.
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $st == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || die "missing packages (${missing[*]}); run as root or install them"
    say "installing: ${missing[*]}"
    if want aarch64 && ! dpkg --print-foreign-architectures | grep -qx arm64; then
        dpkg --add-architecture arm64   # needed for musl-dev:arm64 and libunwind-16-dev:arm64
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The std sources must belong to exactly this compiler, or build-std fails in odd ways.
v_rustc=$(dpkg-query -W -f='${Version}' rustc-web)
v_src=$(dpkg-query -W -f='${Version}' rust-web-src)
[[ $v_rustc == "$v_src" ]] || die "rustc-web ($v_rustc) and rust-web-src ($v_src) differ; upgrade both together"
[[ -x /usr/bin/cargo && -x /usr/bin/rustc ]] || die "/usr/bin/cargo or /usr/bin/rustc missing (cargo-web/rustc-web)"
SYSROOT=$(/usr/bin/rustc --print sysroot)
[[ -d $SYSROOT/lib/rustlib/src/rust/library ]] || die "std sources not found under $SYSROOT/lib/rustlib/src/rust (rust-web-src)"

# ----------------------------------------------------------------------------------------
# 2. helpers: libunwind.a (+ shim) per arch, aarch64 "musl-gcc" wrapper
# ----------------------------------------------------------------------------------------
mkdir -p "$HELPERS/debs"

# LLVM's libunwind in Debian was compiled against glibc with _FORTIFY_SOURCE, so it calls
# __fprintf_chk, which musl lacks. This shim forwards it to vfprintf.
cat > "$HELPERS/fprintf_chk.c.new" <<'EOF'
/* __fprintf_chk for musl: libunwind-16-dev's libunwind.a was built for glibc with
   _FORTIFY_SOURCE and references it (only in its debug/error paths). */
#include <stdarg.h>
#include <stdio.h>
int __fprintf_chk(FILE *f, int flag, const char *fmt, ...)
{
    (void)flag;
    va_list ap;
    va_start(ap, fmt);
    int r = vfprintf(f, fmt, ap);
    va_end(ap);
    return r;
}
EOF
cmp -s "$HELPERS/fprintf_chk.c.new" "$HELPERS/fprintf_chk.c" 2>/dev/null \
    && rm "$HELPERS/fprintf_chk.c.new" || mv "$HELPERS/fprintf_chk.c.new" "$HELPERS/fprintf_chk.c"

# The aarch64 counterpart of musl-gcc: Debian ships musl-gcc only for the host arch, but
# musl-dev:arm64 has the specs file that redirects gcc to musl's headers, crt files and libc.a.
AARCH64_CC=$HELPERS/aarch64-linux-musl-gcc
if want aarch64; then
    cat > "$AARCH64_CC.new" <<'EOF'
#!/bin/sh
# aarch64 musl-gcc: the Debian cross gcc, pointed at musl by musl-dev:arm64's specs file.
exec aarch64-linux-gnu-gcc "$@" -specs /usr/lib/aarch64-linux-musl/musl-gcc.specs
EOF
    chmod +x "$AARCH64_CC.new"
    cmp -s "$AARCH64_CC.new" "$AARCH64_CC" 2>/dev/null && rm "$AARCH64_CC.new" || mv "$AARCH64_CC.new" "$AARCH64_CC"
fi

# make_libunwind ARCH DEBARCH CC AR: build $HELPERS/ARCH/libunwind.a once.
make_libunwind() {
    local arch=$1 debarch=$2 cc=$3 ar=$4 dir=$HELPERS/$1
    if [[ -f $dir/libunwind.a && $dir/libunwind.a -nt $HELPERS/fprintf_chk.c ]]; then
        return 0
    fi
    say "preparing libunwind.a for $arch"
    mkdir -p "$dir"
    local deb
    deb=$(ls "$HELPERS"/debs/libunwind-16-dev_*_"$debarch".deb 2>/dev/null | head -n1 || true)
    if [[ -z $deb ]]; then
        # apt-get download: fetch the .deb without installing it (it would conflict with
        # the system's libunwind-dev, and we only need one static archive out of it).
        (cd "$HELPERS/debs" && apt-get download -qq -o APT::Sandbox::User=root "libunwind-16-dev:$debarch") \
            || die "apt-get download libunwind-16-dev:$debarch failed (try: apt-get update)"
        deb=$(ls "$HELPERS"/debs/libunwind-16-dev_*_"$debarch".deb | head -n1)
    fi
    rm -rf "$HELPERS/debs/x-$debarch"
    dpkg-deb -x "$deb" "$HELPERS/debs/x-$debarch"
    install -m644 "$HELPERS/debs/x-$debarch/usr/lib/llvm-16/lib/libunwind.a" "$dir/libunwind.a.tmp"
    "$cc" -O2 -c "$HELPERS/fprintf_chk.c" -o "$dir/fprintf_chk.o"
    "$ar" rs "$dir/libunwind.a.tmp" "$dir/fprintf_chk.o" 2>/dev/null
    mv "$dir/libunwind.a.tmp" "$dir/libunwind.a"
}
want x86_64 && make_libunwind x86_64 amd64 musl-gcc ar
want aarch64 && make_libunwind aarch64 arm64 "$AARCH64_CC" aarch64-linux-gnu-ar

if ((DEPS_ONLY)); then
    say "dependencies ready (--deps-only)"
    exit 0
fi

# ----------------------------------------------------------------------------------------
# 3. build
# ----------------------------------------------------------------------------------------
# Debian's toolchain, explicitly: rustup's proxies (~/.cargo/bin) come first in PATH and
# would otherwise be picked up by cargo for rustc, and by build scripts that call cargo.
# RUSTC_BOOTSTRAP=1 unlocks -Z build-std on this stable compiler (only for this build).
export PATH=/usr/bin:$PATH
export CARGO=/usr/bin/cargo RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=$BUILD_DIR
# Flags from the caller's environment would replace our per-target rustflags (cargo uses
# the first of CARGO_ENCODED_RUSTFLAGS, RUSTFLAGS, target.<triple>.rustflags); and a
# rustup toolchain override must not leak into /usr/bin/cargo.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER RUSTUP_TOOLCHAIN CARGO_BUILD_TARGET

# Rust flags shared by both targets (each one is needed; see static-musl.md "What failed"):
#  -C link-self-contained=no   rustc's musl targets normally link their own crt*.o/libc.a
#                              from <sysroot>/lib/rustlib/<triple>/lib/self-contained/,
#                              which Debian does not ship. Let musl-gcc's specs supply them.
#  -C relocation-model=static  the musl targets default to static-pie, but musl-gcc's specs
#                              only know plain -static. Result: a static non-PIE executable
#                              (its own load address is fixed; libraries: there are none).
#  -L native=<helpers>/<arch>  where std's `unwind` crate finds libunwind.a (it links
#                              `-lunwind` statically on musl).
base_rustflags() { echo "-C link-self-contained=no -C relocation-model=static -L native=$HELPERS/$1"; }

# The C compilers for build scripts using cc-rs (rusqlite's bundled SQLite, zstd-sys, ring).
export CC_x86_64_unknown_linux_musl=musl-gcc AR_x86_64_unknown_linux_musl=ar
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_LINKER=musl-gcc
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="$(base_rustflags x86_64)"
# Without AR_..., cc-rs would look for a non-existent aarch64-linux-musl-ar.
export CC_aarch64_unknown_linux_musl=$AARCH64_CC AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=$AARCH64_CC
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUSTFLAGS="$(base_rustflags aarch64)"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER=qemu-aarch64-static   # cargo run/test

# The `static` profile. If Cargo.toml has a [profile.static] section, it is the source of
# truth; otherwise define the same profile here on the command line so the script works
# on its own:
#   inherits="release"  start from the release settings
#   opt-level="s"       same as the release build: about 30% smaller than 3 and no slower
#                       on any benchmark (SHA-256 is ring's assembly either way; zstd's C
#                       decodes as fast at -Os), see DESIGN.md "Build profile"
#   lto=true, codegen-units=1   whole-program optimisation across std and all crates
#                       (std is compiled together with us here, so LTO reaches into it)
#   panic="unwind"      a bug in one request is caught by its worker (a 500), not the end
#                       of the process; abort would be a little smaller
#   strip=true          no symbols or debug info in the shipped file
#   debug=false         do not generate debug info in the first place
PROFILE_ARGS=()
if ! grep -q '^\[profile\.static\]' Cargo.toml; then
    PROFILE_ARGS=(
        --config 'profile.static.inherits="release"'
        --config 'profile.static.opt-level="s"'
        --config 'profile.static.lto=true'
        --config 'profile.static.codegen-units=1'
        --config 'profile.static.panic="unwind"'
        --config 'profile.static.strip=true'
        --config 'profile.static.debug=false'
    )
fi

[[ -f Cargo.lock ]] || die "Cargo.lock missing: run 'cargo build' once first"

mkdir -p "$OUT"
declare -A BUILD_SECS
for arch in $ARCHS; do
    triple=$arch-unknown-linux-musl
    say "building $triple (profile $PROFILE, $(/usr/bin/rustc --version))"
    t0=$(date +%s)
    # -Z build-std=std,panic_abort: compile std (and the abort panic runtime, which
    #   panic="abort" needs) from rust-web-src for this target, since no prebuilt musl std
    #   exists. Its crates.io dependencies come through the normal registry cache.
    # --locked: never rewrite the project's Cargo.lock from here (run `cargo build` if it
    #   is out of date).
    /usr/bin/cargo build --locked "${PROFILE_ARGS[@]}" --profile "$PROFILE" \
        --target "$triple" -Z build-std=std,panic_abort --bin ncps
    BUILD_SECS[$arch]=$(( $(date +%s) - t0 ))
    src=$BUILD_DIR/$triple/$PROFILE/ncps
    # strip=true already removed symbols; binutils' strip is a no-op then, but keeps the
    # result stripped even if the profile is changed.
    case $arch in
        x86_64) strip_bin=strip ;;
        aarch64) strip_bin=aarch64-linux-gnu-strip ;;
    esac
    install -m755 "$src" "$OUT/ncps-$arch.tmp"
    "$strip_bin" --strip-all "$OUT/ncps-$arch.tmp"
    mv "$OUT/ncps-$arch.tmp" "$OUT/ncps-$arch"
done

# ----------------------------------------------------------------------------------------
# 4. checks and summary
# ----------------------------------------------------------------------------------------
fail=0
say "results"
for arch in $ARCHS; do
    bin=$OUT/ncps-$arch
    file "$bin"
    # A static executable has no PT_INTERP (dynamic loader) and no dynamic section.
    if [[ $(readelf -lW "$bin") == *INTERP* || $(readelf -dW "$bin") == *NEEDED* ]]; then
        echo "  FAIL: $bin is dynamically linked" >&2; fail=1
    fi
    if [[ $(file "$bin") != *'statically linked'* ]]; then
        echo "  FAIL: file(1) does not call $bin statically linked" >&2; fail=1
    fi
    if [[ $arch == x86_64 ]]; then
        printf '  ldd: %s\n' "$(ldd "$bin" 2>&1 | head -n1 | sed 's/^[[:space:]]*//')"
        run=("$bin")
    else
        run=(qemu-aarch64-static "$bin")
    fi
    # Smoke test: it must start and print its usage (exit status >= 126 means it could not
    # execute or was killed by a signal).
    set +e; out=$("${run[@]}" --help 2>&1); rc=$?; set -e
    if ((rc >= 126)); then
        echo "  FAIL: '${run[*]} --help' exited $rc: $out" >&2; fail=1
    else
        printf '  --help: exit %s, first line: %s\n' "$rc" "$(head -n1 <<<"$out")"
    fi
    printf '  size: %s bytes (%s), build time %ss\n' "$(stat -c %s "$bin")" \
        "$(numfmt --to=iec-i --suffix=B "$(stat -c %s "$bin")")" "${BUILD_SECS[$arch]}"
done
exit $fail
