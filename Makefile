# ncps: the two commands a fresh Debian machine needs are `make run` and `make test`.
# Each installs what it needs first (`make deps`), so neither assumes a prepared machine.

SHELL := /bin/bash
CARGO ?= cargo
DATA ?= $(CURDIR)/var/ncps
HOSTNAME_ ?= $(shell hostname)
UPSTREAM ?= https://cache.nixos.org
UPSTREAM_KEY ?= cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=
ADDR ?= :8501

APT_PACKAGES := nix-bin curl xz-utils ca-certificates build-essential tzdata

.PHONY: all build run test test-static deps bench bench-deps bench-scale static fuzz clean

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
test: deps
	$(CARGO) test --all-targets
	$(CARGO) test --doc
	bash tests/systemd.sh
	bash tests/metrics_check.sh
	bash tests/status_page.sh "" target/status-page.png

# The peers the benchmark compares against (nginx) and its load generator (wrk).
BENCH_PACKAGES := nginx-light wrk procps iproute2
# Store sizes for the scale section (bench/scale.sh; issue 12).
BENCH_SCALE_N ?= 100000 1000000

bench-deps:
	@missing=""; for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# bench/run.sh (sections a-f, h, m), then the scale section (bench/scale.sh), which BENCH_ONLY
# selects with the letter g. The stores it generates are kept in /var/tmp/ncps-bench-scale.
bench: build bench-deps
	@rc=0; NCPS=$(CURDIR)/target/release/ncps bash bench/run.sh || rc=1; \
	case "$${BENCH_ONLY:-g}" in *g*) NCPS=$(CURDIR)/target/release/ncps BENCH_SCALE_N="$(BENCH_SCALE_N)" \
	  bash bench/scale.sh || rc=1 ;; esac; exit $$rc

bench-scale: build bench-deps
	NCPS=$(CURDIR)/target/release/ncps BENCH_SCALE_N="$(BENCH_SCALE_N)" bash bench/scale.sh

static:
	bash build/static.sh

# The end-to-end tests against the static x86_64 binary.
test-static: static
	NCPS_E2E_BIN=$(CURDIR)/target/static/ncps-x86_64 $(CARGO) test --test e2e

fuzz:
	bash fuzz/run.sh

clean:
	$(CARGO) clean
