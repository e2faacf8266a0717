//! The blob store seam: narinfos and NARs by name, wherever they are kept.
//!
//! The cache core never builds a path or opens a file of the store itself; it asks a
//! [`BlobStore`]. Today's implementation is [`local::LocalStore`] (files under the data path,
//! whose hits go out with `sendfile`); an object store is a second implementation of the same
//! trait, held to the same contract (`contract` tests run against every implementation).
//!
//! # What every implementation promises
//! - **Atomic appearance.** A blob is visible under its name only when it is complete: a reader
//!   sees the whole old blob, the whole new one, or nothing, never a prefix. A NAR is handed to
//!   [`BlobStore::put_nar`] only after it was verified, so a visible NAR is a verified NAR.
//! - **Crash safety.** A crash (or a kill, or a power cut after `put_*` returned) never leaves a
//!   partial blob under a final name. What it can leave: staged files (cleared at start), and
//!   blobs the index does not know or index rows whose blob is gone (the start-up check
//!   reconciles those; neither can make a client receive unverified bytes).
//! - **Removal is idempotent.** Removing what is not there is not an error.
//! - **The FileHash travels with the NAR.** [`BlobStore::put_nar`] is given the hash the NAR
//!   was verified against, and [`BlobStore::nar_file_hash`] gives it back for a blob that
//!   [`BlobStore::nar`] returned, without an index lookup (it is the NAR's HTTP ETag, sent
//!   with every hit). `None` is allowed where the store could not keep it (local: a file system
//!   without extended attributes, or a NAR stored by an older ncps); the caller then asks the
//!   index.
//! - **Listing by shard.** Blobs are listed one shard (the first two characters of the name) at
//!   a time, so a check of a million entries holds a thousand in memory, not a million.
//!
//! Bytes being downloaded are staged in a [`Staging`] directory on local disk in every
//! deployment: readers that join a download follow that file as it grows.

pub mod local;
#[cfg(feature = "s3")]
pub mod s3;
mod staging;

#[cfg(test)]
mod contract;

pub use local::LocalStore;
pub use staging::{Staging, TempFile, TEMP_SUFFIX};

use crate::nix::{Hash, NarName, StorePathHash};
use std::fmt;
use std::fs::File;
use std::io;
use std::path::PathBuf;

/// A stored blob, ready to be sent.
#[non_exhaustive]
pub enum Blob {
    /// A local file (sent with `sendfile`), `len` bytes from its start.
    File { file: File, len: u64 },
    /// The bytes themselves.
    Bytes(Vec<u8>),
    /// `len` bytes read from a stream (an object store's answer), with the FileHash the store
    /// kept with it, if any (see [`BlobStore::nar_file_hash`]).
    Reader { reader: Box<dyn crate::http::Streamed>, len: u64, file_hash: Option<Hash> },
}

impl Blob {
    pub fn len(&self) -> u64 {
        match self {
            Blob::File { len, .. } => *len,
            Blob::Bytes(b) => b.len() as u64,
            Blob::Reader { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole blob in memory (for narinfos, which are small).
    pub fn into_bytes(self) -> Result<Vec<u8>, StorageError> {
        match self {
            Blob::Bytes(b) => Ok(b),
            Blob::File { file, len } => {
                let mut bytes = vec![0u8; len as usize];
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0)
                    .map_err(|e| StorageError::io("reading", PathBuf::new(), e))?;
                Ok(bytes)
            }
            Blob::Reader { reader, len, .. } => {
                let mut bytes = Vec::with_capacity(len.min(1 << 20) as usize);
                io::Read::read_to_end(&mut io::Read::take(reader, len), &mut bytes)
                    .map_err(|e| StorageError::io("reading", PathBuf::new(), e))?;
                Ok(bytes)
            }
        }
    }

    /// The blob as a reader of its bytes.
    pub fn into_reader(self) -> Box<dyn io::Read + Send> {
        match self {
            Blob::File { file, len } => Box::new(io::Read::take(file, len)),
            Blob::Bytes(b) => Box::new(io::Cursor::new(b)),
            Blob::Reader { reader, len, .. } => Box::new(io::Read::take(reader, len)),
        }
    }
}

/// One entry found by [`BlobStore::list_narinfos`] or [`BlobStore::list_nars`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed<N> {
    pub name: N,
    pub len: u64,
    /// When the blob was last written (Unix seconds), if the store says: `ncps fsck` on a
    /// shared index leaves a blob the index does not vouch for alone while it is young, since
    /// another replica may be between writing it and recording it.
    pub modified: Option<i64>,
}

/// What one shard holds: its entries, and what does not belong (files whose names are not
/// entries, or entries in the wrong place), by a description the store can remove again.
#[derive(Debug)]
pub struct Shard<N> {
    pub entries: Vec<Listed<N>>,
    pub strays: Vec<Stray>,
}

/// Something in the store that is not an entry, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stray(pub PathBuf);

impl fmt::Display for Stray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// Every shard name: the first two characters of a store path hash or NAR name (nix32 or hex,
/// so digits and lower-case letters).
pub fn shards() -> impl Iterator<Item = String> {
    const CHARS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    CHARS.iter().flat_map(|&a| CHARS.iter().map(move |&b| String::from_utf8_lossy(&[a, b]).into_owned()))
}

/// Narinfos and NARs by name. See the module documentation for the contract.
pub trait BlobStore: Send + Sync {
    /// The narinfo of `hash`, if stored.
    fn narinfo(&self, hash: &StorePathHash) -> Result<Option<Blob>, StorageError>;
    /// The NAR `name`, if stored.
    fn nar(&self, name: &NarName) -> Result<Option<Blob>, StorageError>;
    /// The length of the stored NAR `name`, if stored.
    fn nar_len(&self, name: &NarName) -> Result<Option<u64>, StorageError>;
    /// Stores a narinfo, replacing any previous one atomically.
    fn put_narinfo(&self, hash: &StorePathHash, bytes: &[u8], staging: &Staging) -> Result<(), StorageError>;
    /// Stores a verified NAR from its staged file, with the FileHash it was verified against.
    fn put_nar(&self, name: &NarName, staged: TempFile, file_hash: &Hash) -> Result<(), StorageError>;
    /// The zstd-encoded copy of a `Compression: none` NAR, if one is kept (sent to clients
    /// whose Accept-Encoding names zstd). Same promises as NARs: it appears whole or not at
    /// all. A store that keeps none answers `None`.
    fn nar_zstd(&self, _name: &NarName) -> Result<Option<Blob>, StorageError> {
        Ok(None)
    }
    /// Keeps `staged` (complete, written by the caller) as the zstd copy of NAR `name`.
    fn put_nar_zstd(&self, _name: &NarName, _staged: TempFile) -> Result<(), StorageError> {
        Ok(())
    }
    /// Removes the zstd copy of NAR `name` (idempotent). [`BlobStore::remove_nar`] and
    /// [`BlobStore::remove_nars`] remove it too.
    fn remove_nar_zstd(&self, _name: &NarName) -> Result<(), StorageError> {
        Ok(())
    }
    /// Removes every zstd copy: after an unclean stop a copy may not be what the index counts
    /// (copies are made again when asked). Returns how many were removed.
    fn remove_all_nar_zstd(&self) -> Result<u64, StorageError> {
        Ok(0)
    }
    /// The FileHash stored with the NAR `blob` (which [`BlobStore::nar`] returned), if kept.
    fn nar_file_hash(&self, blob: &Blob) -> Option<Hash>;
    fn remove_narinfo(&self, hash: &StorePathHash) -> Result<(), StorageError>;
    fn remove_nar(&self, name: &NarName) -> Result<(), StorageError>;
    /// Removes many narinfos (an eviction batch). Every one is tried; the first failure is
    /// returned. An implementation may remove them concurrently (local files: a few threads,
    /// since each unlink may wait for the disk; an object store: one batch request).
    fn remove_narinfos(&self, hashes: &[StorePathHash]) -> Result<(), StorageError> {
        first_failure(hashes.iter().map(|h| self.remove_narinfo(h)))
    }
    /// Removes many NARs, as [`BlobStore::remove_narinfos`].
    fn remove_nars(&self, names: &[NarName]) -> Result<(), StorageError> {
        first_failure(names.iter().map(|n| self.remove_nar(n)))
    }
    /// The narinfos of one shard (see [`shards`]).
    fn list_narinfos(&self, shard: &str) -> Result<Shard<StorePathHash>, StorageError>;
    /// The NARs of one shard.
    fn list_nars(&self, shard: &str) -> Result<Shard<NarName>, StorageError>;
    /// What lies outside every shard (files where only shard directories belong).
    fn strays_outside_shards(&self) -> Result<Vec<Stray>, StorageError>;
    fn remove_stray(&self, stray: &Stray) -> Result<(), StorageError>;
    /// Whether anything at all is stored (cheap: stops at the first blob).
    fn holds_anything(&self) -> Result<bool, StorageError>;
    /// A description for logs and errors (`/var/lib/ncps/store`).
    fn describe(&self) -> String;
    /// Whether reading a blob is a local file operation (microseconds, from the page cache
    /// mostly), so that the HTTP poll loop may answer a hit itself. An object store's reads
    /// are network requests (with retries): the poll loop must never wait for one, since every
    /// connection waits with it; its hits go to a worker.
    fn reads_are_local(&self) -> bool {
        true
    }
    /// Where a client may fetch the stored NAR `name` itself, for a while (an object store's
    /// presigned GET, when it was asked to hand those out: `--cache-storage-s3-redirect`), or
    /// `None`: ncps sends the bytes. Says nothing about whether the NAR is there; the caller
    /// checks that first.
    fn nar_redirect(&self, _name: &NarName) -> Option<String> {
        None
    }
}

/// Runs every removal, then returns the first failure.
pub(crate) fn first_failure(results: impl Iterator<Item = Result<(), StorageError>>) -> Result<(), StorageError> {
    let mut first = Ok(());
    for r in results {
        if first.is_ok() {
            first = r;
        }
    }
    first
}

/// The result of a removal run on a thread of its own: a panic there is a failed removal.
pub(crate) fn joined(result: std::thread::Result<Result<(), StorageError>>, action: &'static str) -> Result<(), StorageError> {
    result.unwrap_or_else(|_| Err(StorageError::io(action, PathBuf::new(), io::Error::other("an unlink thread panicked"))))
}

/// Why a storage operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum StorageError {
    /// A file system call failed: what was being done, to which path.
    Io { action: &'static str, path: PathBuf, source: io::Error },
    /// A request to an object store failed: what was being done, to which key (or which
    /// store), and why (the store's answer, or the connection's failure).
    Remote { action: &'static str, key: String, source: Box<dyn std::error::Error + Send + Sync> },
}

impl StorageError {
    pub fn io(action: &'static str, path: PathBuf, source: io::Error) -> StorageError {
        StorageError::Io { action, path, source }
    }

    /// Whether trying again later may succeed: a request to an object store that failed on
    /// the way (a connection error, a timeout, a 5xx or 429 answer, a body cut short), after
    /// the store's own retries. A file system's error is the disk's state: not transient.
    pub fn is_transient(&self) -> bool {
        match self {
            StorageError::Io { .. } => false,
            #[cfg(feature = "s3")]
            StorageError::Remote { source, .. } => {
                source.downcast_ref::<s3::S3Error>().is_some_and(s3::S3Error::is_transient)
            }
            #[cfg(not(feature = "s3"))]
            StorageError::Remote { .. } => false,
        }
    }

    /// Whether the store refused bytes for lack of room (a full disk or quota).
    pub fn is_no_space(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => {
                matches!(source.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
            }
            StorageError::Remote { .. } => false,
        }
    }

    /// Whether the store takes no new bytes at all: no room, a read-only file system
    /// (`EROFS`), or no permission (`EACCES`, `EPERM`: a directory made read-only). Each is
    /// the disk's state, not the request's fault, and a download then relays what it
    /// verifies without keeping it, as for a full disk.
    pub fn is_unwritable(&self) -> bool {
        match self {
            StorageError::Io { source, .. } => {
                self.is_no_space()
                    || source.kind() == io::ErrorKind::PermissionDenied
                    || matches!(source.raw_os_error(), Some(libc::EROFS | libc::EACCES | libc::EPERM))
            }
            // An object store that refuses a write (a quota, a read-only key) says so per
            // request; such a write fails like any other, and the next one tries again.
            StorageError::Remote { .. } => false,
        }
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Io { action, path, source } if path.as_os_str().is_empty() => {
                write!(f, "{action}: {source}")
            }
            StorageError::Io { action, path, source } => write!(f, "{action} {}: {source}", path.display()),
            StorageError::Remote { action, key, source } => write!(f, "{action} {key}: {source}"),
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Io { source, .. } => Some(source),
            StorageError::Remote { source, .. } => Some(source.as_ref()),
        }
    }
}
