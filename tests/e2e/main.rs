//! The end-to-end tests of ncps: the real `ncps` binary, driven by the real Nix client
//! (`nix copy`, `nix store verify`) and by raw HTTP, against local upstreams that
//! misbehave on demand. One test binary, so the helpers are compiled once and the Nix
//! fixture is built once per run, shared by every test that needs it.
//!
//! | module | what it specifies |
//! | --- | --- |
//! | [`proxy`] | ncps as a read-through proxy: fetching, fallback between upstreams, HTTPS, configuration, the harness itself |
//! | [`integrity`] | what ncps refuses to pass on or keep: bad signatures, corrupt or truncated NARs, crashes, hostile clients |
//! | [`lifecycle`] | the size limit and eviction, uploads, DELETE, `ncps fsck` |
//! | [`concurrency`] | many clients at once: one upstream download per miss, streaming, floods |
//! | [`ranges`] | byte ranges on NARs: resuming a cut transfer, ETags, edge cases, HEAD |
//! | [`support`] | the helpers they are built from (fixture, upstream, ncps handle, HTTP, hashes) |
//!
//! Run: `cargo test --test e2e` (add `-- --nocapture` for timings); one module:
//! `cargo test --test e2e lifecycle::`. `NCPS_E2E_BIN=/path/to/ncps` runs the suite
//! against another build (`make test-static`). Tests that need Nix skip (with a message)
//! only when `nix` is not installed and `CI` is unset; under CI a missing `nix` fails them.
//! Files of a failed test are kept under target/tmp/e2e-run-<pid>/.

mod support;

mod concurrency;
mod integrity;
mod lifecycle;
mod proxy;
mod ranges;
