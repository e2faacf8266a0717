//! `ncps fsck [--repair]`: checks that the store and its index agree and that every NAR still
//! has the bytes it was verified with.
//!
//! Disks rot, people delete files by hand, and power fails. Serving never re-hashes (that
//! would cost a read of every NAR per hit), so this is where corruption is found: every stored
//! NAR is re-hashed against the FileHash/FileSize it was accepted with. With `--repair`, what
//! is broken is removed, so a NAR from upstream is fetched (and verified) again on next use.
//!
//! It goes one shard at a time (what [`crate::cache::check`] compares), so memory stays flat
//! at a million entries and the time is linear in the bytes stored; progress goes to stderr.

use crate::cache::check::{self, Problem};
use crate::cache::verify::{copy_hashed, CopyError};
use crate::cache::CacheError;
use crate::config::Database;
use crate::index::{Index, IndexError, SqliteIndex};
use crate::nix::NarInfo;
use crate::storage::{shards, BlobStore, LocalStore, StorageError};
use std::fmt;
use std::time::{Duration, Instant};

/// Why fsck could not run to its end.
#[derive(Debug)]
#[non_exhaustive]
pub enum FsckError {
    /// The store holds files but there is no database to check them against (the database
    /// as it may be shown: a path, or a URL without its password).
    NoDatabase(String),
    Index(IndexError),
    Storage(StorageError),
    /// A repair failed.
    Repair(CacheError),
}

impl fmt::Display for FsckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsckError::NoDatabase(p) => write!(
                f,
                "database {p} does not exist, but the store holds files: nothing to check them against"
            ),
            FsckError::Index(e) => write!(f, "index: {e}"),
            FsckError::Storage(e) => write!(f, "store: {e}"),
            FsckError::Repair(e) => write!(f, "repairing: {e}"),
        }
    }
}

impl std::error::Error for FsckError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FsckError::NoDatabase(_) => None,
            FsckError::Index(e) => Some(e),
            FsckError::Storage(e) => Some(e),
            FsckError::Repair(e) => Some(e),
        }
    }
}

impl From<IndexError> for FsckError {
    fn from(e: IndexError) -> Self {
        FsckError::Index(e)
    }
}

impl From<StorageError> for FsckError {
    fn from(e: StorageError) -> Self {
        FsckError::Storage(e)
    }
}

/// What was checked and found.
#[derive(Debug, Default)]
pub struct Report {
    pub narinfos_checked: usize,
    pub nars_checked: usize,
    pub bytes_hashed: u64,
    pub missing: usize,
    pub orphaned: usize,
    pub corrupt: usize,
}

impl Report {
    pub fn problems(&self) -> usize {
        self.missing + self.orphaned + self.corrupt
    }

    fn count(&mut self, p: &Problem) {
        match p {
            Problem::MissingNarinfo(_) | Problem::MissingNar(_) => self.missing += 1,
            Problem::OrphanNarinfo(_) | Problem::OrphanNar(_) | Problem::Stray(_) => self.orphaned += 1,
            Problem::CorruptNarinfo(..) | Problem::CorruptNar(..) => self.corrupt += 1,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "checked {} narinfo(s) and {} NAR(s): {} missing, {} orphaned, {} corrupt",
            self.narinfos_checked, self.nars_checked, self.missing, self.orphaned, self.corrupt
        )
    }
}

/// Checks everything, one shard at a time; hands each problem to `found` as it is found.
pub fn check(
    blobs: &dyn BlobStore,
    index: &dyn Index,
    found: &mut dyn FnMut(&Problem) -> Result<(), FsckError>,
    progress: &mut dyn FnMut(usize, usize, &Report),
) -> Result<Report, FsckError> {
    let mut report = Report::default();
    let mut emit = |report: &mut Report, p: Problem| -> Result<(), FsckError> {
        report.count(&p);
        found(&p)
    };
    for s in blobs.strays_outside_shards()? {
        emit(&mut report, Problem::Stray(s))?;
    }
    let all: Vec<String> = shards().collect();
    for (i, shard) in all.iter().enumerate() {
        progress(i, all.len(), &report);
        let narinfos = blobs.list_narinfos(shard)?;
        let rows = index.narinfos_in_shard(shard)?;
        report.narinfos_checked += rows.len();
        let mut problems: Vec<Problem> = narinfos.strays.into_iter().map(Problem::Stray).collect();
        problems.extend(check::narinfo_shard(&narinfos.entries, &rows));
        let on_disk: std::collections::HashSet<_> = narinfos.entries.iter().map(|e| e.name).collect();
        for row in rows.iter().filter(|r| on_disk.contains(&r.hash)) {
            let Some(blob) = blobs.narinfo(&row.hash)? else { continue };
            let bytes = blob.into_bytes()?;
            match NarInfo::parse(&bytes) {
                Err(why) => problems.push(Problem::CorruptNarinfo(row.hash, why.to_string())),
                Ok(info) if info.store_path_hash() != Some(row.hash) => {
                    problems.push(Problem::CorruptNarinfo(row.hash, format!("describes {}", info.store_path)))
                }
                Ok(_) if row.nar.is_none() => {
                    problems.push(Problem::CorruptNarinfo(row.hash, "its NAR is not indexed".into()))
                }
                Ok(_) => {}
            }
        }
        let nars = blobs.list_nars(shard)?;
        let rows = index.nars_in_shard(shard)?;
        problems.extend(nars.strays.into_iter().map(Problem::Stray));
        problems.extend(check::nar_shard(&nars.entries, &rows));
        let on_disk: std::collections::HashSet<_> = nars.entries.iter().map(|e| e.name.clone()).collect();
        for r in rows.iter().map(|r| &r.record).filter(|r| r.stored) {
            report.nars_checked += 1;
            if !on_disk.contains(&r.name) {
                continue; // reported as missing above
            }
            let Some(blob) = blobs.nar(&r.name)? else { continue };
            let (hash, len) = match hash_blob(blob) {
                Ok(done) => done,
                Err(e) => {
                    problems.push(Problem::CorruptNar(r.name.clone(), format!("reading: {e}")));
                    continue;
                }
            };
            report.bytes_hashed += len;
            if len != r.file_size {
                problems.push(Problem::CorruptNar(r.name.clone(), format!("{len} bytes, expected {}", r.file_size)));
            } else if hash != r.file_hash {
                problems.push(Problem::CorruptNar(r.name.clone(), format!("sha256 {hash}, expected {}", r.file_hash)));
            }
        }
        for p in problems {
            emit(&mut report, p)?;
        }
    }
    progress(all.len(), all.len(), &report);
    Ok(report)
}

fn hash_blob(blob: crate::storage::Blob) -> Result<(crate::nix::Hash, u64), CopyError<std::convert::Infallible>> {
    match blob {
        crate::storage::Blob::File { file, .. } => {
            let mut reader = std::io::BufReader::with_capacity(0, file);
            copy_hashed(&mut reader, u64::MAX, &mut |_, _| Ok(()))
        }
        crate::storage::Blob::Bytes(b) => copy_hashed(&mut &b[..], u64::MAX, &mut |_, _| Ok(())),
        blob => copy_hashed(&mut blob.into_reader(), u64::MAX, &mut |_, _| Ok(())),
    }
}

/// Opens the index to check the store against. Without its database every cached file looks
/// orphaned, and --repair would remove them all: a missing one is refused.
fn open_index(database: &Database, blobs: &LocalStore) -> Result<Box<dyn Index>, FsckError> {
    let holds_files = blobs.holds_anything().unwrap_or(true);
    match database {
        Database::Sqlite(path) => {
            let db_exists = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
            if !db_exists && holds_files {
                return Err(FsckError::NoDatabase(path.display().to_string()));
            }
            Ok(Box::new(SqliteIndex::open(path)?))
        }
        #[cfg(feature = "postgres")]
        Database::Postgres(url) => match crate::index::PostgresIndex::open(url, !holds_files) {
            Err(IndexError::NotCreated { .. }) => Err(FsckError::NoDatabase(database.to_string())),
            opened => Ok(Box::new(opened?)),
        },
        #[cfg(not(feature = "postgres"))]
        Database::Postgres(_) => Err(FsckError::Index(IndexError::Backend {
            action: "opening the database",
            source: "this ncps was built without PostgreSQL support (--features postgres)".into(),
        })),
    }
}

/// The `fsck` command. Returns the exit status: 0 when the store is sound (or was repaired),
/// 1 when problems were found and left alone.
pub fn run(paths: &crate::config::StoragePaths, repair_it: bool) -> Result<i32, FsckError> {
    let blobs = LocalStore::open(&paths.data_path)?;
    let index = open_index(&paths.database, &blobs)?;
    index.check_integrity()?;
    let index = index.as_ref();
    let started = Instant::now();
    let mut last = Instant::now();
    let mut progress = |done: usize, all: usize, r: &Report| {
        if last.elapsed() >= Duration::from_secs(2) || (done == all && started.elapsed() >= Duration::from_secs(2)) {
            last = Instant::now();
            eprintln!(
                "fsck: {:>3}% ({done}/{all} shards) {} narinfo(s), {} NAR(s), {} MB hashed, {:.0}s",
                done * 100 / all.max(1),
                r.narinfos_checked,
                r.nars_checked,
                r.bytes_hashed / 1_000_000,
                started.elapsed().as_secs_f64()
            );
        }
    };
    let mut found = |p: &Problem| -> Result<(), FsckError> {
        println!("{p}");
        if repair_it {
            crate::cache::check::repair(&blobs, index, p).map_err(FsckError::Repair)?;
        }
        Ok(())
    };
    let report = check(&blobs, index, &mut found, &mut progress)?;
    println!("fsck: {report}");
    if report.problems() == 0 {
        return Ok(0);
    }
    if repair_it {
        println!("fsck: repaired: broken entries removed; NARs from upstream will be fetched again");
        return Ok(0);
    }
    println!("fsck: run `ncps fsck --repair` to remove what is broken");
    Ok(1)
}
