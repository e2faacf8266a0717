//! The cache core's errors: one enum for internal failures (a 500 for the client, a line for
//! the log) and one for refused uploads (a 4xx with the reason).

use crate::index::IndexError;
use crate::nix::narinfo::NarInfoError;
use crate::nix::{Hash, NarName};
use crate::storage::StorageError;
use std::fmt;

/// An internal failure: the index or the store could not do what was asked.
#[derive(Debug)]
#[non_exhaustive]
pub enum CacheError {
    Index(IndexError),
    Storage(StorageError),
    /// A thread could not be started (out of memory or of threads).
    Thread(std::io::Error),
    /// A verified NAR's entry was deleted or evicted while it downloaded: keeping the blob
    /// would orphan it.
    EntryRemoved(NarName),
    /// A NAR fetched by name was verified, but the index meanwhile knows that name as other
    /// bytes (a narinfo recorded it with another hash): the name is not ours to fill.
    NameTaken(NarName),
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Index(e) => write!(f, "index: {e}"),
            CacheError::Storage(e) => write!(f, "store: {e}"),
            CacheError::Thread(e) => write!(f, "starting a thread: {e}"),
            CacheError::EntryRemoved(n) => write!(f, "{n}: its entry was removed during the download"),
            CacheError::NameTaken(n) => write!(f, "{n}: the index records other bytes under this name"),
        }
    }
}

impl std::error::Error for CacheError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CacheError::Index(e) => Some(e),
            CacheError::Storage(e) => Some(e),
            CacheError::Thread(e) => Some(e),
            CacheError::EntryRemoved(_) | CacheError::NameTaken(_) => None,
        }
    }
}

impl From<IndexError> for CacheError {
    fn from(e: IndexError) -> Self {
        CacheError::Index(e)
    }
}

impl From<StorageError> for CacheError {
    fn from(e: StorageError) -> Self {
        CacheError::Storage(e)
    }
}

/// Why an upload was refused.
#[derive(Debug)]
#[non_exhaustive]
pub enum UploadError {
    /// The body could not be read (after this many bytes).
    Read { after: u64, source: std::io::Error },
    /// The narinfo does not parse.
    Narinfo(NarInfoError),
    /// The narinfo's digest fields are missing or inconsistent.
    Digest(&'static str),
    /// The narinfo describes another store path.
    WrongPath { describes: String },
    /// The narinfo's URL is not `nar/<hash>.nar[.ext]`.
    BadUrl(String),
    /// The NAR's bytes do not hash to its name.
    NameMismatch { got: Hash },
    /// The narinfo's NAR has not been uploaded (or cached).
    NarMissing(NarName),
    /// The stored NAR differs from what the narinfo says.
    NarDiffers { name: NarName, stored: (u64, Hash), claimed: (u64, Hash) },
    /// Larger than the whole cache may be (413).
    TooLarge(u64),
    /// `--cache-require-trusted-signature`, and no trusted upload key signed it (403).
    Untrusted,
    /// ncps already holds a narinfo for the path (409).
    Held,
    /// An upstream serves the path (409).
    UpstreamServes(String),
    /// Whether an upstream serves the path is unknown: some could not answer (503).
    UpstreamUnknown(String),
    Internal(CacheError),
}

impl UploadError {
    /// Whether the client is to blame (4xx) rather than ncps or an upstream (5xx).
    pub fn is_client_error(&self) -> bool {
        self.status() < 500
    }

    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            UploadError::TooLarge(_) => 413,
            UploadError::Untrusted => 403,
            UploadError::Held | UploadError::UpstreamServes(_) => 409,
            UploadError::UpstreamUnknown(_) => 503,
            UploadError::Internal(_) => 500,
            _ => 400,
        }
    }
}

impl fmt::Display for UploadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UploadError::Read { after, source } => write!(f, "reading the upload after {after} bytes: {source}"),
            UploadError::Narinfo(e) => write!(f, "narinfo: {e}"),
            UploadError::Digest(e) => write!(f, "narinfo: {e}"),
            UploadError::WrongPath { describes } => write!(f, "the narinfo describes {describes}, not this path"),
            UploadError::BadUrl(url) => write!(f, "URL {url:?} is not nar/<hash>.nar[.ext]"),
            UploadError::NameMismatch { got } => {
                write!(f, "the upload's sha256 is {got}, which does not match its name")
            }
            UploadError::NarMissing(name) => write!(f, "upload {name} before its narinfo"),
            UploadError::NarDiffers { name, stored, claimed } => write!(
                f,
                "{name} holds {} bytes with {}, the narinfo says {} bytes with {}",
                stored.0, stored.1, claimed.0, claimed.1
            ),
            UploadError::TooLarge(n) => write!(f, "{n} bytes is more than --cache-max-size allows"),
            UploadError::Untrusted => f.write_str("the narinfo has no signature by a --cache-trusted-upload-key"),
            UploadError::Held => f.write_str(
                "this cache already holds a narinfo for the path; uploads never replace one \
                 (unless --cache-upload-may-shadow-upstream)",
            ),
            UploadError::UpstreamServes(u) => write!(
                f,
                "upstream {u} serves this path; an upload may not stand for it (unless --cache-upload-may-shadow-upstream)"
            ),
            UploadError::UpstreamUnknown(why) => {
                write!(f, "cannot tell whether an upstream serves this path ({why}); try again later")
            }
            UploadError::Internal(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for UploadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UploadError::Read { source, .. } => Some(source),
            UploadError::Narinfo(e) => Some(e),
            UploadError::Internal(e) => Some(e),
            _ => None,
        }
    }
}

impl<E: Into<CacheError>> From<E> for UploadError {
    fn from(e: E) -> Self {
        UploadError::Internal(e.into())
    }
}
