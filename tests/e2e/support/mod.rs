//! What the end-to-end tests are built from, one concern a module; the tests say
//! `use crate::support::*;` and get all of it:
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`dirs`] | temporary directories ([`TempDir`]), the per-run directory, clean-up at exit |
//! | [`fixture`] | the Nix fixture (real store paths published as signed caches), built once per run |
//! | [`nix`] | running the real `nix` client (`nix copy --from`, `--to`, `nix store verify`): Nix 2.8 on the host, Nix 2.26 in a chroot ([`NixClient`]) |
//! | [`upstream`] | the local upstream that misbehaves on demand ([`Mode`]), and its HTTPS front |
//! | [`ncps`] | the ncps process under test ([`Ncps`]), its command line and scrubbed environment |
//! | [`http`] | a tiny HTTP client, raw connections that show exactly how a body ended, free ports |
//! | [`narinfo`] | narinfo parsing, fingerprints and store path hashes |
//! | [`collector`] | a real OpenTelemetry collector (Rotel, installed by tests/rotel.sh) and what it received |
//! | [`crypto`] | SHA-256, nix32, keys and signatures |
//! | [`process`] | commands with a deadline, and waiting for a condition |
//! | `garage` | a three-node Garage cluster (installed by tests/garage.sh) for the scale tests (features `s3` and `postgres`) |
//! | `s3s` | a real S3 server (s3s-fs, installed by tests/s3s.sh) for the S3 tests (feature `s3`) |
//!
//! Everything here uses std (plus crates that are already dependencies of the
//! package), and only loopback addresses.

pub mod collector;
pub mod crypto;
pub mod dirs;
pub mod fixture;
#[cfg(all(feature = "s3", feature = "postgres"))]
pub mod garage;
pub mod http;
pub mod narinfo;
pub mod ncps;
pub mod nix;
/// The throwaway PostgreSQL server of the PostgreSQL index's own tests, shared as source.
#[allow(dead_code)]
#[path = "../../../src/index/pg_cluster.rs"]
pub mod pg_cluster;
pub mod process;
#[cfg(feature = "s3")]
pub mod s3s;
/// The installed test servers (s3s-fs, Garage), shared as source with the unit tests.
#[allow(dead_code)]
#[path = "../../../src/test_tools.rs"]
pub mod test_tools;
pub mod upstream;

pub use collector::*;
pub use crypto::*;
pub use dirs::*;
pub use fixture::*;
#[cfg(all(feature = "s3", feature = "postgres"))]
pub use garage::*;
pub use http::*;
pub use narinfo::*;
pub use ncps::*;
pub use nix::*;
pub use process::*;
#[cfg(feature = "s3")]
pub use s3s::*;
pub use upstream::*;
