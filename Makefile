# ncps: the two commands a fresh Debian machine needs are `make run` and `make test`.
# Each installs what it needs first (`make deps`), so neither assumes a prepared machine.

SHELL := /bin/bash
CARGO ?= cargo
DATA ?= $(CURDIR)/var/ncps
HOSTNAME_ ?= $(shell hostname)
UPSTREAM ?= https://cache.nixos.org
UPSTREAM_KEY ?= cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=
ADDR ?= :8501

# debootstrap: the end-to-end tests also run a current Nix (Debian 13's) in a chroot.
# python3-venv: for Rotel, the OpenTelemetry collector of the otel tests (tests/rotel.sh).
# postgresql: the server the PostgreSQL index is tested against (src/index/pg_cluster.rs starts
# throwaway clusters from its binaries; the Debian service itself is not used). openssl: the
# command that makes the certificates of the TLS test clusters (same file).
APT_PACKAGES := nix-bin curl xz-utils ca-certificates build-essential tzdata debootstrap python3-venv postgresql openssl

.PHONY: all build run test test-scale test-static test-image image deps bench bench-deps bench-scale bench-outage bench-isolation bench-zstd bench-replicas static fuzz clean

all: build

# apt packages are installed only when missing, so this is quick on a machine that has them.
# Rust comes from rustup when present, else from Debian's rustc-web/cargo-web (1.8x+; the
# plain `cargo` package in bookworm is too old for the dependencies).
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if ! command -v $(CARGO) >/dev/null; then missing="$$missing rustc-web cargo-web"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

build: deps
	$(CARGO) build --release

run: build
	@mkdir -p $(DATA)
	./target/release/ncps serve \
	  --cache-hostname $(HOSTNAME_) \
	  --cache-data-path $(DATA) \
	  --upstream-cache $(UPSTREAM) \
	  --upstream-public-key $(UPSTREAM_KEY) \
	  --server-addr $(ADDR)

# Unit tests, doc tests, the end-to-end tests that drive the real Nix client, then the checks
# that need outside tools (systemd-analyze, promtool, headless Chromium), which install them.
# The chroot with Debian 13's Nix 2.26 for the end-to-end tests (tests/nix-chroot.sh) is built
# once into $NCPS_TEST_CACHE (default /var/cache/ncps-test): about a minute of mostly download
# on a fresh machine, done while cargo compiles; instant later. If it cannot be built, make test
# stops before the tests; NCPS_TEST_SKIP_NIX226=1 skips it and the Nix 2.26 tests.
# Rotel, the OpenTelemetry collector the otel tests send to, is installed from PyPI into the
# same cache (tests/rotel.sh; seconds, once). s3s-fs, the S3 server the S3 blob store is tested
# against, is built from crates.io into the same cache (tests/s3s.sh; about 4 minutes, once).
# The suite is built with both optional features (s3, postgres), so the S3 store's tests
# (contract tests and e2e s3:: against s3s-fs) and the PostgreSQL index's (unit tests and e2e
# postgres::, against throwaway PostgreSQL servers) always run, ~30 s together; then the
# default build's unit tests, and its e2e tests of the refusals (a bucket or a PostgreSQL URL
# given to a build without the feature).
TEST_FEATURES := s3,postgres

test: deps
	@mkdir -p target; pid=; \
	if [ -n "$$NCPS_TEST_SKIP_NIX226" ]; then echo "NCPS_TEST_SKIP_NIX226 is set: the Nix 2.26 tests are skipped"; \
	else bash tests/nix-chroot.sh >target/nix-chroot.out 2>target/nix-chroot.err & pid=$$!; fi; \
	$(CARGO) test --all-targets --features $(TEST_FEATURES) --no-run || { [ -z "$$pid" ] || wait $$pid; exit 1; }; \
	[ -z "$$pid" ] && exit 0; \
	if wait $$pid; then cat target/nix-chroot.err; echo "Nix 2.26 chroot: $$(cat target/nix-chroot.out)"; \
	else cat target/nix-chroot.err; echo "FAIL: the chroot with Nix 2.26 could not be built (NCPS_TEST_SKIP_NIX226=1 skips it and its tests)"; exit 1; fi
	bash tests/rotel.sh >target/rotel.out || { echo "FAIL: Rotel (the OpenTelemetry collector of tests/e2e/otel.rs) could not be installed"; exit 1; }
	bash tests/s3s.sh >target/s3s.out || { echo "FAIL: s3s-fs (the S3 server of the S3 tests) could not be installed"; exit 1; }
	NCPS_TEST_S3S_FS=$$(cat target/s3s.out) $(CARGO) test --all-targets --features $(TEST_FEATURES)
	$(CARGO) test --lib
	$(CARGO) test --test e2e -- proxy::a_build_without_s3 postgres::
	$(CARGO) test --doc
	bash tests/systemd.sh
	bash tests/metrics_check.sh
	bash tests/status_page.sh "" target/status-page.png

# The scale tests (tests/e2e/scale.rs, issue 18): three replicas on a three-node Garage cluster
# and one PostgreSQL, real Nix clients through each, a replica, a Garage node and PostgreSQL
# restarted mid-run (about a minute). Garage is built from crates.io into $NCPS_TEST_CACHE once
# (tests/garage.sh: about 11 minutes on 2 cores); later runs reuse it.
test-scale: deps
	@mkdir -p target
	bash tests/garage.sh >target/garage.out || { echo "FAIL: Garage (the S3 cluster of the scale tests) could not be installed"; exit 1; }
	NCPS_TEST_GARAGE=$$(cat target/garage.out) NCPS_TEST_SCALE=1 $(CARGO) test --features $(TEST_FEATURES) --test e2e scale::

# The peers the benchmark compares against (nginx) and its load generator (wrk).
BENCH_PACKAGES := nginx-light wrk procps iproute2 zstd time
# Store sizes for the scale section (bench/scale.sh; issue 12).
BENCH_SCALE_N ?= 100000 1000000

bench-deps:
	@missing=""; for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# bench/run.sh (sections a-f, h, m), then the scale section (bench/scale.sh), which BENCH_ONLY
# selects with the letter g, the outage section (bench/outage.sh), letter o, and the isolation
# section (bench/isolation.sh), letter i. The stores it generates are kept in
# /var/tmp/ncps-bench-scale.
bench: build bench-deps
	@rc=0; NCPS=$(CURDIR)/target/release/ncps bash bench/run.sh || rc=1; \
	case "$${BENCH_ONLY:-g}" in *g*) NCPS=$(CURDIR)/target/release/ncps BENCH_SCALE_N="$(BENCH_SCALE_N)" \
	  bash bench/scale.sh || rc=1 ;; esac; \
	case "$${BENCH_ONLY:-o}" in *o*) NCPS=$(CURDIR)/target/release/ncps bash bench/outage.sh || rc=1 ;; esac; \
	case "$${BENCH_ONLY:-i}" in *i*) NCPS=$(CURDIR)/target/release/ncps bash bench/isolation.sh || rc=1 ;; esac; exit $$rc

bench-scale: build bench-deps
	NCPS=$(CURDIR)/target/release/ncps BENCH_SCALE_N="$(BENCH_SCALE_N)" bash bench/scale.sh

# Misses while the only upstream is down (bench/outage.sh; issue 13); section o of make bench.
bench-outage: build
	NCPS=$(CURDIR)/target/release/ncps bash bench/outage.sh

# Hit latency while slow, greedy or hostile peers try to hog the cache (bench/isolation.sh;
# issue 15); section i of make bench.
bench-isolation: build bench-deps
	NCPS=$(CURDIR)/target/release/ncps bash bench/isolation.sh

# Whether zstd-encoding Compression: none NARs pays on a Gigabit LAN, and ncps's own zstd
# answers (bench/zstd-lan.sh; issue 13 point 7). Root: a network namespace shaped with tc.
bench-zstd: build bench-deps
	NCPS=$(CURDIR)/target/release/ncps bash bench/zstd-lan.sh

# Replicas on S3 and PostgreSQL (bench/replicas.sh; issue 18): hits from S3 against local
# disk, 50 clients missing one NAR across 1-3 replicas, a miss streamed from the downloader.
bench-replicas: deps bench-deps
	$(CARGO) build --release --features s3,postgres
	NCPS=$(CURDIR)/target/release/ncps bash bench/replicas.sh

static:
	bash build/static.sh

# The end-to-end tests against the static x86_64 binary.
test-static: static
	NCPS_E2E_BIN=$(CURDIR)/target/static/ncps-x86_64 $(CARGO) test --test e2e

# The container image: FROM scratch, the static binaries, amd64 and arm64 in one manifest
# (build/image.sh; podman, no Docker daemon). IMAGE names it (default localhost/ncps:latest).
image: static
	bash build/image.sh

# The image run for real: the Nix client through it, podman stop, a restart on the same volume
# (tests/container.sh, ~5 s); the compose and Kubernetes examples in deploy/ checked against
# their schemas and run with podman-compose and podman kube play (tests/deploy.sh, ~10 s;
# the first run installs podman-compose, docker-compose and a venv with the Kubernetes client).
# .ci/run runs it after make test.
test-image: image
	bash tests/container.sh
	bash tests/deploy.sh

fuzz:
	bash fuzz/run.sh

clean:
	$(CARGO) clean
