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
//!
//! It works through the [`BlobStore`] seam, so the local store and the S3 bucket
//! (`--cache-storage-s3-*`) are checked by the same code: one shard's listing (paged, a
//! thousand keys a request) and one NAR's stream at a time, hashed as it is read. What differs
//! is only what a failure means. A local file that cannot be read is corrupt; an object
//! whose stream fails is read again and, if it keeps failing, reported *unreadable* and left
//! alone: a failed request is no evidence against the bytes. With a shared (PostgreSQL) index
//! other replicas may be writing while fsck runs: rows are read before blobs, and blobs the
//! index does not vouch for are left alone while younger than [`YOUNG`].

use crate::cache::check::{self, Problem};
use crate::cache::verify::{copy_hashed, CopyError};
use crate::cache::CacheError;
use crate::config::{Database, S3Config};
use crate::index::{Index, IndexError, SqliteIndex};
use crate::nix::{Hash, NarInfo, NarName};
use crate::storage::{shards, Blob, BlobStore, Listed, LocalStore, StorageError};
use std::collections::HashMap;
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
    /// The bucket is claimed by another ncps (its owner object, as it may be shown).
    NotOwner { store: String, owner: String },
    /// `--repair` was asked while an `ncps serve` uses the data path (it holds the data path's
    /// lock, [`crate::data_lock`]): a repair could remove a blob it has written and not yet
    /// recorded.
    Serving { data_path: std::path::PathBuf },
    /// The data path's lock could not be taken for another reason.
    Lock(crate::data_lock::LockError),
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
            FsckError::NotOwner { store, owner } => write!(
                f,
                "{store} is used by another ncps ({owner}): checked against this index, every one of its \
                 entries would look orphaned; run fsck with that ncps's data path and database"
            ),
            FsckError::Serving { data_path } => write!(
                f,
                "ncps serve is running on {}: --repair could remove what it is writing and has not recorded yet; \
                 stop it first (fsck without --repair only reports, and may run beside it)",
                data_path.display()
            ),
            FsckError::Lock(e) => write!(f, "the data path's lock: {e}"),
        }
    }
}

impl std::error::Error for FsckError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FsckError::NoDatabase(_) | FsckError::NotOwner { .. } | FsckError::Serving { .. } => None,
            FsckError::Lock(e) => Some(e),
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
    /// NARs that could not be read to their end (the object store did not answer, or cut the
    /// body short, after retries): neither sound nor corrupt, never repaired.
    pub unreadable: usize,
    /// Blobs a shared index does not vouch for, left alone because they are young (another
    /// replica may be between writing one and recording it).
    pub young: usize,
}

impl Report {
    /// What `--repair` would fix.
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
        )?;
        if self.unreadable > 0 {
            write!(f, ", {} unreadable", self.unreadable)?;
        }
        if self.young > 0 {
            write!(f, ", {} young left alone", self.young)?;
        }
        Ok(())
    }
}

/// With a shared index, a blob the index does not vouch for is left alone while younger than
/// this: another replica writes a blob, then its row, and a check that read the rows first may
/// see the blob without its row. An hour is far above that gap (an upload becomes visible
/// only once complete, and its row follows at once) and above any sane clock skew between the
/// object store and this host.
pub const YOUNG: Duration = Duration::from_secs(3600);

/// How often a NAR whose object stream failed is read again before it is called unreadable,
/// and the first pause between (doubled each time).
const READ_ATTEMPTS: u32 = 3;
const READ_PAUSE: Duration = Duration::from_millis(if cfg!(test) { 1 } else { 500 });

/// Something `check` found, handed to its caller as it is found.
#[derive(Debug)]
#[non_exhaustive]
pub enum Finding<'a> {
    /// A disagreement `--repair` fixes.
    Problem(&'a Problem),
    /// A blob the index does not vouch for yet, left alone while others may be recording it
    /// (a shared index's replicas, or an ncps serving this data path during a check); its age
    /// in seconds, if the store said when it was written.
    LeftYoung(&'a Problem, Option<i64>),
    /// A NAR that could not be read to its end, and why: not repaired (a failed request is no
    /// evidence that the bytes are wrong).
    Unreadable(&'a NarName, &'a str),
}

impl fmt::Display for Finding<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Problem(p) => p.fmt(f),
            Finding::LeftYoung(p, Some(age)) => {
                write!(f, "left alone: {p} (written {age}s ago: another ncps may be recording it)")
            }
            Finding::LeftYoung(p, None) => {
                write!(f, "left alone: {p} (the store does not say when it was written: another ncps may be recording it)")
            }
            Finding::Unreadable(n, why) => write!(f, "unreadable: NAR {n}: {why} (not repaired; run fsck again)"),
        }
    }
}

/// What reading and hashing one NAR gave.
enum Read {
    /// Its SHA-256 and length.
    Hashed(Hash, u64),
    /// Removed since it was listed (evicted meanwhile): nothing to say about it.
    Gone,
    /// The disk's bytes could not be read: corrupt, as far as anyone can tell.
    Corrupt(String),
    /// The object store's stream failed, every time.
    Unreadable(String),
}

/// Reads the NAR `name` to its end and hashes it: the one read-hash path of fsck for every
/// store. A local file that cannot be read is corrupt; an object whose stream fails (or ends
/// before its Content-Length) is read again, and called unreadable, not corrupt, if it keeps
/// failing: the network's fault must never get a sound NAR removed.
fn read_nar(blobs: &dyn BlobStore, name: &NarName) -> Result<Read, FsckError> {
    let mut pause = READ_PAUSE;
    let mut attempt = 1;
    loop {
        let last = attempt >= READ_ATTEMPTS;
        let why = match blobs.nar(name) {
            Ok(None) => return Ok(Read::Gone),
            Ok(Some(blob)) => {
                let remote = matches!(blob, Blob::Reader { .. });
                let declared = blob.len();
                match hash_blob(blob) {
                    Ok((hash, len)) if !remote || len == declared => return Ok(Read::Hashed(hash, len)),
                    Ok((_, len)) => format!("the stream ended after {len} of {declared} bytes"),
                    Err(e) if !remote => return Ok(Read::Corrupt(format!("reading: {e}"))),
                    Err(e) => format!("reading: {e}"),
                }
            }
            Err(e) if e.is_transient() => e.to_string(),
            Err(e) => return Err(e.into()),
        };
        if last {
            return Ok(Read::Unreadable(why));
        }
        log::warn!("fsck: NAR {name}: {why} (attempt {attempt} of {READ_ATTEMPTS}); reading it again");
        std::thread::sleep(pause);
        pause = pause.saturating_mul(2);
        attempt += 1;
    }
}

/// The age in seconds of a listed blob, if the store said when it was written.
fn age_of<N>(listed: Option<&Listed<N>>, now: i64) -> Option<i64> {
    listed.and_then(|l| l.modified).map(|m| (now - m).max(0))
}

/// Checks everything, one shard at a time; hands each finding to `found` as it is found.
///
/// Rows are read before blobs (a blob is written before its row, so a row read first has its
/// blob in the listing that follows, even while another replica writes); with a shared index,
/// orphaned blobs younger than [`YOUNG`] are left alone, as they are when `others_write`
/// (an ncps serves the data path while a check that only reports runs).
pub fn check(
    blobs: &dyn BlobStore,
    index: &dyn Index,
    others_write: bool,
    found: &mut dyn FnMut(Finding<'_>) -> Result<(), FsckError>,
    progress: &mut dyn FnMut(usize, usize, &Report),
) -> Result<Report, FsckError> {
    let shared = others_write || index.is_shared();
    let mut report = Report::default();
    // `age`: for an orphan, the age of its blob (`Some(None)`: unknown).
    let emit = |found: &mut dyn FnMut(Finding<'_>) -> Result<(), FsckError>,
                report: &mut Report,
                p: Problem,
                age: Option<Option<i64>>|
     -> Result<(), FsckError> {
        match age {
            Some(age) if shared && age.is_none_or(|a| a < YOUNG.as_secs() as i64) => {
                report.young += 1;
                found(Finding::LeftYoung(&p, age))
            }
            _ => {
                report.count(&p);
                found(Finding::Problem(&p))
            }
        }
    };
    for s in blobs.strays_outside_shards()? {
        emit(found, &mut report, Problem::Stray(s), None)?;
    }
    let all: Vec<String> = shards().collect();
    for (i, shard) in all.iter().enumerate() {
        progress(i, all.len(), &report);
        let rows = index.narinfos_in_shard(shard)?;
        let nar_rows = index.nars_in_shard(shard)?;
        let narinfos = blobs.list_narinfos(shard)?;
        let now = crate::index::now();
        report.narinfos_checked += rows.len();
        // Each problem with, for an orphan, the age of its blob (`Some(None)`: unknown).
        let mut problems: Vec<(Problem, Option<Option<i64>>)> =
            narinfos.strays.into_iter().map(|s| (Problem::Stray(s), None)).collect();
        let listed: HashMap<_, _> = narinfos.entries.iter().map(|e| (e.name, e)).collect();
        for p in check::narinfo_shard(&narinfos.entries, &rows) {
            let age = match &p {
                Problem::OrphanNarinfo(h) => Some(age_of(listed.get(h).copied(), now)),
                _ => None,
            };
            problems.push((p, age));
        }
        for row in rows.iter().filter(|r| listed.contains_key(&r.hash)) {
            let Some(blob) = blobs.narinfo(&row.hash)? else { continue };
            let bytes = blob.into_bytes()?;
            let corrupt = |why: String| (Problem::CorruptNarinfo(row.hash, why), None);
            match NarInfo::parse(&bytes) {
                Err(why) => problems.push(corrupt(why.to_string())),
                Ok(info) if info.store_path_hash() != Some(row.hash) => {
                    problems.push(corrupt(format!("describes {}", info.store_path)))
                }
                Ok(_) if row.nar.is_none() => problems.push(corrupt("its NAR is not indexed".into())),
                Ok(_) => {}
            }
        }
        let nars = blobs.list_nars(shard)?;
        problems.extend(nars.strays.into_iter().map(|s| (Problem::Stray(s), None)));
        let listed: HashMap<_, _> = nars.entries.iter().map(|e| (e.name.clone(), e)).collect();
        for p in check::nar_shard(&nars.entries, &nar_rows) {
            let age = match &p {
                Problem::OrphanNar(n) => Some(age_of(listed.get(n).copied(), now)),
                _ => None,
            };
            problems.push((p, age));
        }
        for r in nar_rows.iter().map(|r| &r.record).filter(|r| r.stored) {
            report.nars_checked += 1;
            if !listed.contains_key(&r.name) {
                continue; // reported as missing above
            }
            let (hash, len) = match read_nar(blobs, &r.name)? {
                Read::Hashed(hash, len) => (hash, len),
                Read::Gone => continue,
                Read::Corrupt(why) => {
                    problems.push((Problem::CorruptNar(r.name.clone(), why), None));
                    continue;
                }
                Read::Unreadable(why) => {
                    report.unreadable += 1;
                    found(Finding::Unreadable(&r.name, &why))?;
                    continue;
                }
            };
            report.bytes_hashed += len;
            let corrupt = |why: String| (Problem::CorruptNar(r.name.clone(), why), None);
            if len != r.file_size {
                problems.push(corrupt(format!("{len} bytes, expected {}", r.file_size)));
            } else if hash != r.file_hash {
                problems.push(corrupt(format!("sha256 {hash}, expected {}", r.file_hash)));
            }
        }
        for (p, age) in problems {
            emit(found, &mut report, p, age)?;
        }
    }
    progress(all.len(), all.len(), &report);
    Ok(report)
}

fn hash_blob(blob: Blob) -> Result<(Hash, u64), CopyError<std::convert::Infallible>> {
    match blob {
        Blob::File { file, .. } => {
            let mut reader = std::io::BufReader::with_capacity(0, file);
            copy_hashed(&mut reader, u64::MAX, &mut |_, _| Ok(()))
        }
        Blob::Bytes(b) => copy_hashed(&mut &b[..], u64::MAX, &mut |_, _| Ok(())),
        blob => copy_hashed(&mut blob.into_reader(), u64::MAX, &mut |_, _| Ok(())),
    }
}

/// Opens the index to check the store against. Without its database every cached file looks
/// orphaned, and --repair would remove them all: a missing one is refused.
fn open_index(database: &Database, blobs: &dyn BlobStore) -> Result<Box<dyn Index>, FsckError> {
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

/// The store to check: the bucket of `--cache-storage-s3-bucket`, else files under the data
/// path. A bucket another ncps owns is refused: checked against this index, all of its
/// entries would look orphaned, and `--repair` would remove them.
fn open_store(paths: &crate::config::StoragePaths, s3: Option<&S3Config>) -> Result<Box<dyn BlobStore>, FsckError> {
    let Some(s3) = s3 else { return Ok(Box::new(LocalStore::open(&paths.data_path)?)) };
    open_s3(paths, s3)
}

#[cfg(feature = "s3")]
fn open_s3(paths: &crate::config::StoragePaths, s3: &S3Config) -> Result<Box<dyn BlobStore>, FsckError> {
    use crate::storage::s3::{S3Settings, S3Store};
    let store = S3Store::open(&S3Settings::from_config(s3))?;
    if let Some(owner) = store.owner()? {
        let ours = crate::serve::s3_owner_if_known(&paths.data_path, &paths.database);
        let id = |t: &str| t.lines().next().unwrap_or("").trim().to_string();
        if ours.as_deref().map(id) != Some(id(&owner)) {
            return Err(FsckError::NotOwner {
                store: store.describe(),
                owner: owner.split_whitespace().collect::<Vec<_>>().join(" "),
            });
        }
    }
    Ok(Box::new(store))
}

/// Never reached: the configuration refuses a bucket in a build without the `s3` feature.
#[cfg(not(feature = "s3"))]
fn open_s3(_: &crate::config::StoragePaths, _: &S3Config) -> Result<Box<dyn BlobStore>, FsckError> {
    Err(FsckError::Storage(StorageError::Remote {
        action: "opening",
        key: "--cache-storage-s3-bucket".into(),
        source: "this ncps was built without S3 support (--features s3)".into(),
    }))
}

/// With a local index, `--repair` takes the data path's lock alone (refused while a server
/// holds it, and holding off servers until it ends); a check that only reports looks and
/// warns. With a shared index other replicas write anyway, and young blobs are left alone.
///
/// Returns the lock (if taken) and whether a server runs beside this check.
fn keep_clear_of_servers(
    paths: &crate::config::StoragePaths,
    repair_it: bool,
) -> Result<(Option<crate::data_lock::DataLock>, bool), FsckError> {
    use crate::data_lock::{self, LockError, Mode};
    if !paths.data_path.is_dir() {
        return Ok((None, false));
    }
    let shared = matches!(paths.database, Database::Postgres(_));
    if repair_it && !shared {
        return match data_lock::take(&paths.data_path, Mode::Repairing) {
            Ok(lock) => Ok((Some(lock), false)),
            Err(LockError::Held { .. }) => Err(FsckError::Serving { data_path: paths.data_path.clone() }),
            Err(e @ LockError::Unsupported { .. }) => {
                eprintln!("fsck: {e}; going on without it: make sure no ncps serves this data path");
                Ok((None, false))
            }
            Err(e) => Err(FsckError::Lock(e)),
        };
    }
    match data_lock::served(&paths.data_path) {
        Ok(true) if !shared => {
            eprintln!(
                "fsck: ncps serve is running on {}: blobs the index does not vouch for that are younger than {}s \
                 are left alone (it may be recording them); run fsck again later to judge them",
                paths.data_path.display(),
                YOUNG.as_secs()
            );
            Ok((None, true))
        }
        Ok(_) => Ok((None, false)),
        Err(e) => {
            eprintln!("fsck: cannot tell whether ncps serve is running here ({e}); going on");
            Ok((None, false))
        }
    }
}

/// The `fsck` command, on the local store or (`s3`) the bucket. Returns the exit status: 0
/// when the store is sound (or was repaired), 1 when problems were found and left alone or
/// a NAR could not be read.
pub fn run(paths: &crate::config::StoragePaths, s3: Option<&S3Config>, repair_it: bool) -> Result<i32, FsckError> {
    let (_lock, beside_a_server) = keep_clear_of_servers(paths, repair_it)?;
    let blobs = open_store(paths, s3)?;
    let blobs = blobs.as_ref();
    let index = open_index(&paths.database, blobs)?;
    // Totals or use times that do not match the rows are derived data gone wrong: recounted
    // with --repair, reported (exit 1) without.
    let drifted = match index.check_integrity() {
        Err(e) if e.is_derived_drift() => {
            println!("fsck: {e}");
            if repair_it {
                index.mend_derived()?;
                println!("fsck: recounted the totals and the use times from the rows");
            }
            !repair_it
        }
        other => {
            other?;
            false
        }
    };
    let index = index.as_ref();
    eprintln!("fsck: checking {} against {}", blobs.describe(), paths.database);
    if index.is_shared() {
        eprintln!(
            "fsck: the index is shared: blobs it does not vouch for that are younger than {}s are left alone",
            YOUNG.as_secs()
        );
    }
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
    let mut found = |f: Finding<'_>| -> Result<(), FsckError> {
        println!("{f}");
        if let (true, Finding::Problem(p)) = (repair_it, &f) {
            crate::cache::check::repair(blobs, index, p).map_err(FsckError::Repair)?; // no memo here
        }
        Ok(())
    };
    let report = check(blobs, index, beside_a_server, &mut found, &mut progress)?;
    println!("fsck: {report}");
    let unreadable = report.unreadable > 0;
    if unreadable {
        println!("fsck: {} NAR(s) could not be read to their end; run `ncps fsck` again", report.unreadable);
    }
    if report.problems() == 0 && !drifted {
        return Ok(i32::from(unreadable));
    }
    if repair_it {
        println!("fsck: repaired: broken entries removed; NARs from upstream will be fetched again");
        return Ok(i32::from(unreadable));
    }
    println!("fsck: run `ncps fsck --repair` to remove what is broken");
    Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Shard, Staging, Stray, TempFile};
    use std::io;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// What the fake store's `nar` answers.
    #[derive(Clone, Copy)]
    enum Answer {
        /// A stream declaring 10 bytes that ends after 5.
        Short,
        /// A stream that fails after 3 bytes (a reset connection).
        Broken,
        /// The bytes themselves (`abc`).
        Whole,
        Absent,
        /// A file system error.
        DiskError,
    }

    struct Fake {
        answer: Answer,
        calls: AtomicU32,
    }

    struct Stream(Box<dyn io::Read + Send>);
    impl io::Read for Stream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }
    impl crate::http::Streamed for Stream {
        fn from_offset(self: Box<Self>, _: u64) -> io::Result<Box<dyn io::Read + Send>> {
            Err(io::Error::other("not used"))
        }
    }

    impl BlobStore for Fake {
        fn narinfo(&self, _: &crate::nix::StorePathHash) -> Result<Option<Blob>, StorageError> {
            Ok(None)
        }
        fn nar(&self, _: &NarName) -> Result<Option<Blob>, StorageError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let reader = |r: Box<dyn io::Read + Send>, len| Blob::Reader { reader: Box::new(Stream(r)), len, file_hash: None };
            match self.answer {
                Answer::Short => Ok(Some(reader(Box::new(io::Cursor::new(vec![1u8; 5])), 10))),
                Answer::Broken => {
                    let failing = io::Read::chain(io::Cursor::new(vec![1u8; 3]), Failing);
                    Ok(Some(reader(Box::new(failing), 10)))
                }
                Answer::Whole => Ok(Some(Blob::Bytes(b"abc".to_vec()))),
                Answer::Absent => Ok(None),
                Answer::DiskError => Err(StorageError::io("reading", "/x".into(), io::Error::other("EIO"))),
            }
        }
        fn nar_len(&self, _: &NarName) -> Result<Option<u64>, StorageError> {
            Ok(None)
        }
        fn put_narinfo(&self, _: &crate::nix::StorePathHash, _: &[u8], _: &Staging) -> Result<(), StorageError> {
            Ok(())
        }
        fn put_nar(&self, _: &NarName, _: TempFile, _: &Hash) -> Result<(), StorageError> {
            Ok(())
        }
        fn nar_file_hash(&self, _: &Blob) -> Option<Hash> {
            None
        }
        fn remove_narinfo(&self, _: &crate::nix::StorePathHash) -> Result<(), StorageError> {
            Ok(())
        }
        fn remove_nar(&self, _: &NarName) -> Result<(), StorageError> {
            Ok(())
        }
        fn list_narinfos(&self, _: &str) -> Result<Shard<crate::nix::StorePathHash>, StorageError> {
            Ok(Shard { entries: Vec::new(), strays: Vec::new() })
        }
        fn list_nars(&self, _: &str) -> Result<Shard<NarName>, StorageError> {
            Ok(Shard { entries: Vec::new(), strays: Vec::new() })
        }
        fn strays_outside_shards(&self) -> Result<Vec<Stray>, StorageError> {
            Ok(Vec::new())
        }
        fn remove_stray(&self, _: &Stray) -> Result<(), StorageError> {
            Ok(())
        }
        fn holds_anything(&self) -> Result<bool, StorageError> {
            Ok(true)
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    struct Failing;
    impl io::Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"))
        }
    }

    fn read_with(answer: Answer) -> (Result<Read, FsckError>, u32) {
        let store = Fake { answer, calls: AtomicU32::new(0) };
        let name = NarName::parse(&format!("{}.nar", "1".repeat(52))).unwrap();
        let got = read_nar(&store, &name);
        (got, store.calls.load(Ordering::SeqCst))
    }

    #[test]
    fn an_object_stream_that_ends_short_or_breaks_is_read_again_then_unreadable_never_corrupt() {
        for answer in [Answer::Short, Answer::Broken] {
            let (got, calls) = read_with(answer);
            assert!(matches!(got, Ok(Read::Unreadable(_))), "unreadable, not corrupt");
            assert_eq!(calls, READ_ATTEMPTS, "read {READ_ATTEMPTS} times");
        }
    }

    #[test]
    fn whole_bytes_are_hashed_a_vanished_nar_is_gone_and_a_disk_error_stops_fsck() {
        let (got, calls) = read_with(Answer::Whole);
        assert!(matches!(got, Ok(Read::Hashed(h, 3)) if h == Hash::of(b"abc")) && calls == 1);
        assert!(matches!(read_with(Answer::Absent).0, Ok(Read::Gone)));
        assert!(matches!(read_with(Answer::DiskError), (Err(FsckError::Storage(_)), 1)), "not tried again");
    }

    #[test]
    fn the_summary_names_unreadable_and_young_only_when_there_are_some() {
        let mut r = Report { narinfos_checked: 2, nars_checked: 2, ..Report::default() };
        assert_eq!(r.to_string(), "checked 2 narinfo(s) and 2 NAR(s): 0 missing, 0 orphaned, 0 corrupt");
        r.unreadable = 1;
        r.young = 3;
        assert!(r.to_string().ends_with("0 corrupt, 1 unreadable, 3 young left alone"));
        assert_eq!(r.problems(), 0, "neither is something --repair fixes");
    }
}
