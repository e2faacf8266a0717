//! The end-to-end tests of ncps: the real `ncps` binary, driven by the real Nix client
//! (`nix copy`, `nix store verify`) and by raw HTTP, against local upstreams that
//! misbehave on demand. One test binary, so the helpers are compiled once and the Nix
//! fixture is built once per run, shared by every test that needs it.
//!
//! | module | what it specifies |
//! | --- | --- |
//! | [`access`] | who may read and write, what an upload may be, upstream credentials and redirects |
//! | [`proxy`] | ncps as a read-through proxy: fetching, fallback between upstreams, HTTPS, configuration, the harness itself |
//! | [`integrity`] | what ncps refuses to pass on or keep: bad signatures, corrupt or truncated NARs, crashes, hostile clients |
//! | [`gomigrate`] | switching from Go ncps in place: its cache and key imported, its database untouched |
//! | [`lifecycle`] | the size limit and eviction, uploads, DELETE, `ncps fsck` |
//! | [`concurrency`] | many clients at once: one upstream download per miss, streaming, floods |
//! | [`isolation`] | no slow, greedy or hostile peer takes the cache from the others: minimum rates, fair shares of connections and workers, misses apart from hits |
//! | [`replicas`] | several ncps on one bucket and one PostgreSQL (`--features s3,postgres`): one upstream fetch per NAR, the others stream it from the downloader, a killed downloader |
//! | `scale` | three replicas on a three-node Garage cluster and one PostgreSQL serving many Nix clients at once, with a replica, a Garage node and PostgreSQL restarted mid-run (`NCPS_TEST_SCALE=1`, `make test-scale`) |
//! | [`postgres`] | the index in PostgreSQL (`--features postgres`): Nix 2.8 through it, ncps and PostgreSQL restarted |
//! | [`otel`] | OpenTelemetry: traces, metrics and logs at a real collector (Rotel), over HTTP and gRPC; a collector that is down |
//! | [`outages`] | upstreams that fail: honest 5xx, marked down and probed back, removed ones never asked |
//! | [`resume`] | NAR bodies that break off upstream, finished with Range requests while clients stream |
//! | [`ranges`] | byte ranges on NARs: resuming a cut transfer, ETags, edge cases, HEAD |
//! | `s3` | blobs in S3 (feature `s3`, a real S3 server: s3s-fs): a closure lands in the bucket, a restart serves it from there with the upstream down, the secret never logged |
//! | [`zstd`] | plain NARs sent zstd-encoded to clients that ask, from a copy made once; ranges and Nix 2.8 get plain bytes |
//! | [`isolation_edges`] | deadlines for dripping upstreams, lookups nobody waits for, unwritable or tampered stores |
//! | [`support`] | the helpers they are built from (fixture, upstream, ncps handle, HTTP, hashes) |
//!
//! Run: `cargo test --features postgres --test e2e` (as `make test` does; without the feature
//! the [`postgres`] tests only check that a PostgreSQL URL is refused, and say they skipped);
//! add `-- --nocapture` for timings; one module: `cargo test --test e2e lifecycle::`. `NCPS_E2E_BIN=/path/to/ncps` runs the suite
//! against another build (`make test-static`). Tests that need Nix skip (with a message)
//! only when `nix` is not installed and `CI` is unset; under CI a missing `nix` fails them.
//! The main scenarios run with Debian 12's Nix 2.8 and with Debian 13's Nix 2.26 (tests named
//! `nix_2_26_...`), which runs in a chroot that tests/nix-chroot.sh builds once; they fail if
//! it cannot be built, unless `NCPS_TEST_SKIP_NIX226=1` (see `support::nix`).
//! Files of a failed test are kept under target/tmp/e2e-run-<pid>/.

mod support;

mod access;
mod concurrency;
mod gomigrate;
mod integrity;
mod isolation;
mod lifecycle;
mod otel;
mod outages;
mod postgres;
mod proxy;
mod isolation_edges;
mod resume;
mod ranges;
#[cfg(feature = "s3")]
mod s3;
#[cfg(all(feature = "s3", feature = "postgres"))]
mod replicas;
#[cfg(all(feature = "s3", feature = "postgres"))]
mod scale;
mod zstd;
