//! The index seam: what each stored entry is, and when it was last used.
//!
//! The blob store is the truth for serving (a blob under its final name is complete and
//! verified); the index says what each entry is: which NAR a narinfo points at, where that NAR
//! came from, the hash and size it must have, when each was last used, and how many bytes the
//! store holds. [`sqlite::SqliteIndex`] is embedded and the default; `PostgresIndex` (the
//! `postgres` feature, off by default so small builds do not carry a database client) keeps
//! the index in a PostgreSQL server. Both are held to the same contract (`contract` tests run
//! against every implementation, PostgreSQL's against a real server).
//!
//! # What every implementation promises
//! - **Atomic operations.** Each method is one transaction: a crash leaves it done or not done.
//! - **Totals in constant time.** [`Index::totals`] costs the same at a million entries as at
//!   ten (kept up to date with every write, not summed when asked).
//! - **LRU order without a sort.** [`Index::least_recently_used`] walks an index in access
//!   order and stops after `limit` rows.
//! - **Uses at a flat cost.** [`Index::touch`] costs about the same per use at a million
//!   entries as at a thousand (SQLite: use times in a narrow table of their own, schema 6).
//! - **Removals at a flat cost.** [`Index::remove_narinfos`] costs about the same per entry at
//!   a million entries as at a thousand (SQLite: narinfos point at their NAR by integer id,
//!   schema 7, so a batch of victims touches neighbouring rows).
//! - **Shard listings** ([`Index::narinfos_in_shard`], [`Index::nars_in_shard`]) return the rows
//!   whose key starts with the two given characters, so a check holds one shard at a time.
//! - **Concurrency.** Methods may be called from many threads at once; reads do not wait for a
//!   long write (SQLite: WAL and a pool of connections; PostgreSQL: MVCC and a pool).
//! - **Refusal of what is not ours.** A schema newer than this build, a corrupt database, or
//!   another program's tables are refused at open with an [`IndexError`] that says so, and
//!   nothing is changed.

pub mod sqlite;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "postgres")]
pub mod pg_tls;
#[cfg(all(test, feature = "postgres"))]
pub(crate) mod pg_cluster;

#[cfg(test)]
mod contract;

pub use sqlite::SqliteIndex;
#[cfg(feature = "postgres")]
pub use self::postgres::PostgresIndex;

use crate::nix::{Hash, NarName, StorePathHash};
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch: the index's clock.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// What the index knows about one NAR file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarRecord {
    pub name: NarName,
    pub file_hash: Hash,
    pub file_size: u64,
    /// Where to fetch it from (the upstream whose narinfo pointed at it); empty for uploads
    /// and for NARs fetched by name (no narinfo pointed at them).
    pub upstream_url: String,
    /// Whether the blob is complete under its final name.
    pub stored: bool,
}

/// A NAR row as a shard listing returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedNar {
    pub record: NarRecord,
    pub created_at: i64,
}

/// A narinfo row as a shard listing returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedNarinfo {
    pub hash: StorePathHash,
    /// `None` when the row names a NAR the index does not know (a damaged index).
    pub nar: Option<NarName>,
    pub size: u64,
    pub created_at: i64,
}

/// What recording a narinfo did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded; `replaced_size` is the size of the narinfo this one replaced (0 if new).
    Done { replaced_size: u64 },
    /// Nothing was recorded: the index knows the NAR's name with another digest (another
    /// narinfo uses it). A narinfo never changes what a NAR name stands for.
    NameTaken,
}

/// What a removal took out of the index: narinfos with their sizes, and the NAR (its name
/// and, if its blob was stored, its size).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Removed {
    pub narinfos: Vec<(StorePathHash, u64)>,
    pub nar: Option<(NarName, Option<u64>)>,
}

/// Counts and bytes of what the store holds, per the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub narinfos: u64,
    pub narinfo_bytes: u64,
    /// NARs whose blob is stored.
    pub nars: u64,
    pub nar_bytes: u64,
}

impl Totals {
    /// Bytes the store holds: stored NARs (each once, however many narinfos share it) plus
    /// narinfos.
    pub fn bytes(&self) -> u64 {
        self.narinfo_bytes + self.nar_bytes
    }
}

/// The index of what the store holds. See the module documentation for the contract.
pub trait Index: Send + Sync {
    /// Checks the backend's own structures (SQLite: `PRAGMA quick_check`). It reads
    /// everything, so only `ncps fsck` and the check after an unclean stop call it, never the
    /// start-up path.
    fn check_integrity(&self) -> Result<(), IndexError> {
        Ok(())
    }
    /// Before a clean stop: moves what the backend keeps on the side into its main file, so
    /// that the next start has nothing to read back (SQLite: the WAL, checkpointed and
    /// truncated; up to 64 MiB that the next open would otherwise scan). The process exits
    /// without closing its connections, which is when SQLite would do it itself.
    fn checkpoint(&self) -> Result<(), IndexError> {
        Ok(())
    }
    /// Sets the derived data right: the totals row to what the rows add up to (after
    /// [`IndexError::TotalsDrift`]) and, where use times have a table of their own (SQLite),
    /// one use time for each narinfo and none for anything else (after
    /// [`IndexError::UseTimesDrift`]). One write transaction, reading both tables.
    fn mend_derived(&self) -> Result<(), IndexError>;
    /// Records a narinfo (`size` bytes stored) and the NAR it points at. A NAR already known
    /// with the same digest keeps its row (and `stored` flag); one known with another digest
    /// is left exactly as it is and nothing is recorded ([`Recorded::NameTaken`]).
    fn put_narinfo(&self, hash: &StorePathHash, store_path: &str, nar: &NarRecord, size: u64)
        -> Result<Recorded, IndexError>;
    /// Records a NAR on its own (an upload, before its narinfo), not yet stored. `false`, and
    /// nothing changed, when the name is known with another digest.
    fn put_nar(&self, nar: &NarRecord) -> Result<bool, IndexError>;
    fn nar(&self, name: &NarName) -> Result<Option<NarRecord>, IndexError>;
    /// The NAR a narinfo points at.
    fn narinfo_nar(&self, hash: &StorePathHash) -> Result<Option<NarName>, IndexError>;
    /// Marks a NAR's blob as present (or not). `false` if the index no longer knows the NAR
    /// (deleted or evicted meanwhile): then the blob must not be kept.
    fn set_nar_stored(&self, name: &NarName, stored: bool) -> Result<bool, IndexError>;
    /// Records that stored NAR `name` has a zstd copy of `size` bytes (0: none), counted in
    /// [`Totals::nar_bytes`] while the NAR is stored. False if no stored NAR has that name.
    fn set_nar_zstd(&self, name: &NarName, size: u64) -> Result<bool, IndexError>;
    /// Forgets every zstd copy (sizes to 0), as [`crate::storage::BlobStore::remove_all_nar_zstd`]
    /// removes them after an unclean stop. Returns how many rows had one.
    fn forget_nar_zstd(&self) -> Result<u64, IndexError>;
    fn totals(&self) -> Result<Totals, IndexError>;
    /// Up to `limit` narinfos to evict, least recently used first (a NAR's use counts as a use
    /// of every narinfo pointing at it). Only entries whose NAR is stored qualify, plus those
    /// whose NAR was never fetched and that were last used before `pending_before`: a client
    /// just given a narinfo is about to ask for its NAR. Each comes with the most its removal
    /// can free (its size plus its NAR's, if stored; less if another narinfo shares the NAR).
    fn least_recently_used(&self, limit: usize, pending_before: i64) -> Result<Vec<(StorePathHash, u64)>, IndexError>;
    /// Up to `limit` stored NARs that no narinfo points at, with their sizes.
    fn unreferenced_nars(&self, limit: usize) -> Result<Vec<(NarName, u64)>, IndexError>;
    /// Removes narinfos, and each one's NAR when no other narinfo points at it, in one
    /// transaction. Returns what was removed (hashes the index did not know are skipped).
    fn remove_narinfos(&self, hashes: &[StorePathHash]) -> Result<Vec<Removed>, IndexError>;
    /// Removes a NAR and every narinfo pointing at it.
    fn remove_nar(&self, name: &NarName) -> Result<Option<Removed>, IndexError>;
    /// Drops only a narinfo's row (its blob could not be written).
    fn delete_narinfo_row(&self, hash: &StorePathHash) -> Result<(), IndexError>;
    /// Records last-use times, in one transaction.
    fn touch(&self, narinfos: &[(StorePathHash, i64)], nars: &[(NarName, i64)]) -> Result<(), IndexError>;
    fn narinfos_in_shard(&self, shard: &str) -> Result<Vec<IndexedNarinfo>, IndexError>;
    fn nars_in_shard(&self, shard: &str) -> Result<Vec<IndexedNar>, IndexError>;
    /// Takes the lease on `key` (a download, say) for `holder` until `now + ttl` seconds, or
    /// renews it if `holder` has it; `false`, and nothing changed, while another holder's
    /// lease has not expired (its end is not after `now`). For replicas sharing one index, so
    /// that one downloads while the others stream from it (`cache::replicas`).
    fn take_lease(&self, key: &str, holder: &str, now: i64, ttl: i64) -> Result<bool, IndexError>;
    /// Gives up `holder`'s lease on `key`; `false` if it did not have it (expired and taken).
    fn release_lease(&self, key: &str, holder: &str) -> Result<bool, IndexError>;
    /// Who holds the lease on `key` at `now`, if anyone (an expired lease is no one's).
    fn lease_holder(&self, key: &str, now: i64) -> Result<Option<String>, IndexError>;
    /// Deletes the leases that expired by `now`; how many.
    fn purge_expired_leases(&self, now: i64) -> Result<u64, IndexError>;
    /// Whether other ncps may share this index (a database server): then the start-up check
    /// must not take a blob the index does not vouch for *yet* for an orphan, since another
    /// replica may be between writing a blob and recording it.
    fn is_shared(&self) -> bool {
        false
    }
}

/// Why the index failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum IndexError {
    /// The database refused or failed an operation: what was being done, and why.
    Backend { action: &'static str, source: Box<dyn std::error::Error + Send + Sync> },
    /// Written by a newer ncps.
    NewerSchema { found: u32, supported: u32 },
    /// The database's own check failed, or a row holds a value no ncps writes.
    Corrupt(String),
    /// The totals row (narinfos, their bytes, stored NARs, their bytes) is not what the rows
    /// add up to. Derived data: [`Index::mend_derived`] sets it right, and nothing else is
    /// wrong with the index.
    TotalsDrift { kept: [i64; 4], counted: [i64; 4] },
    /// Narinfos without a use time (eviction would never choose them) or use times without a
    /// narinfo (SQLite's `uses` table). Derived data, as the totals: [`Index::mend_derived`]
    /// gives each narinfo without one the last use of its NAR (or its creation time) and drops
    /// the rest; nothing else is wrong with the index.
    UseTimesDrift { unused: u64, orphans: u64 },
    /// Tables but no schema version of ours: another program's database (Go ncps's, typically).
    Foreign(Vec<String>),
    /// The database server could not be reached or refused the login: which server (its URL
    /// without the password), and why.
    Unreachable { database: String, source: Box<dyn std::error::Error + Send + Sync> },
    /// The database holds no ncps schema and the caller did not let it be created (the store
    /// beside it already holds files that an empty index would disown).
    NotCreated { database: String },
    /// The database URL cannot be used as it stands (an unknown `sslmode`, an `sslrootcert`
    /// that cannot be read…): which database (without the password), and why. A mistake in
    /// the configuration, found before anything is connected to.
    BadUrl { database: String, source: Box<dyn std::error::Error + Send + Sync> },
}

impl IndexError {
    /// Whether this is derived data gone wrong ([`IndexError::TotalsDrift`],
    /// [`IndexError::UseTimesDrift`]), which [`Index::mend_derived`] sets right; the rest of
    /// the index is sound.
    pub fn is_derived_drift(&self) -> bool {
        matches!(self, IndexError::TotalsDrift { .. } | IndexError::UseTimesDrift { .. })
    }
}

impl fmt::Display for IndexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexError::Backend { action, source } => write!(f, "{action}: {source}"),
            IndexError::NewerSchema { found, supported } => write!(
                f,
                "the database has schema version {found}, this ncps knows up to {supported}: \
                 it was written by a newer ncps; use that version or a fresh database"
            ),
            IndexError::Corrupt(m) => write!(f, "database is corrupt: {m}"),
            IndexError::TotalsDrift { kept, counted } => write!(
                f,
                "the index's totals (narinfos, bytes, stored nars, bytes) say {kept:?} but the rows add up to {counted:?}"
            ),
            IndexError::UseTimesDrift { unused, orphans } => write!(
                f,
                "{unused} narinfo(s) have no use time and {orphans} use time(s) belong to no narinfo"
            ),
            IndexError::Foreign(tables) => write!(
                f,
                "the database holds tables ({}) but no ncps-rs schema version: it belongs to another \
                 program (Go ncps keeps a schema_migrations table); ncps-rs keeps its own index, so \
                 point --cache-database-url at a new file or database",
                tables.join(", ")
            ),
            IndexError::Unreachable { database, source } => {
                write!(f, "cannot reach the database {database}: {source}")
            }
            IndexError::NotCreated { database } => write!(f, "the database {database} holds no ncps schema yet"),
            IndexError::BadUrl { database, source } => write!(f, "the database URL {database}: {source}"),
        }
    }
}

impl std::error::Error for IndexError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            IndexError::Backend { source, .. }
            | IndexError::Unreachable { source, .. }
            | IndexError::BadUrl { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

/// The key range `[low, high)` of one shard: keys starting with `shard`.
pub(crate) fn shard_range(shard: &str) -> (String, String) {
    let mut high = shard.as_bytes().to_vec();
    if let Some(last) = high.last_mut() {
        *last += 1;
    }
    (shard.to_string(), String::from_utf8_lossy(&high).into_owned())
}

/// The totals row beside what the rows add up to: one statement (one snapshot), valid SQL
/// for both SQLite and PostgreSQL. Eight BIGINT columns: kept narinfos, bytes, stored NARs,
/// bytes, then the same counted.
pub(crate) const TOTALS_AGAINST_ROWS: &str = "SELECT t.narinfos, t.narinfo_bytes, t.nars, t.nar_bytes,
        (SELECT COUNT(*) FROM narinfos), (SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM narinfos),
        (SELECT COUNT(*) FROM nars WHERE stored),
        (SELECT CAST(COALESCE(SUM(file_size + zstd_size), 0) AS BIGINT) FROM nars WHERE stored)
     FROM totals t WHERE t.id = 0";

/// [`IndexError::TotalsDrift`] when the totals kept ([`TOTALS_AGAINST_ROWS`]'s first four)
/// are not what the rows add up to (its last four).
pub(crate) fn check_totals(v: [i64; 8]) -> Result<(), IndexError> {
    let (kept, counted) = ([v[0], v[1], v[2], v[3]], [v[4], v[5], v[6], v[7]]);
    if kept != counted {
        return Err(IndexError::TotalsDrift { kept, counted });
    }
    Ok(())
}

/// Sets the totals row to what the rows add up to; valid SQL for SQLite and PostgreSQL.
pub(crate) const TOTALS_RECOUNT: &str = "UPDATE totals SET
        narinfos = (SELECT COUNT(*) FROM narinfos),
        narinfo_bytes = (SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM narinfos),
        nars = (SELECT COUNT(*) FROM nars WHERE stored),
        nar_bytes = (SELECT CAST(COALESCE(SUM(file_size + zstd_size), 0) AS BIGINT) FROM nars WHERE stored)
     WHERE id = 0";

/// What a transaction's deletes take off the totals. Deletes fire no trigger (SQLite's
/// schema 5, PostgreSQL's 3): the transaction that deletes updates the totals row once, from
/// this, instead of once per row.
#[derive(Debug, Default)]
pub(crate) struct Gone {
    pub narinfos: i64,
    pub narinfo_bytes: i64,
    pub nars: i64,
    pub nar_bytes: i64,
}

impl Gone {
    pub fn narinfo(&mut self, size: i64) {
        self.narinfos += 1;
        self.narinfo_bytes += size;
    }

    /// A NAR row deleted; only a stored one was counted.
    pub fn nar(&mut self, removed: &Option<(NarName, Option<u64>)>) {
        if let Some((_, Some(size))) = removed {
            self.nars += 1;
            self.nar_bytes += *size as i64;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.narinfos == 0 && self.nars == 0
    }
}
