//! Where bytes wait until they are complete and verified: temp files on local disk.
//!
//! A temp file is written, synced, and only then handed to a [`super::BlobStore`]; dropped
//! without that, it is deleted. That is how a failed or unverified download leaves nothing
//! behind. Leftovers from a crash end in [`TEMP_SUFFIX`] and are cleared at start-up.

use super::StorageError;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Files the temp directory may hold: ours end in this suffix, so that clearing it at start-up
/// can never remove something a user put there.
pub const TEMP_SUFFIX: &str = ".ncps-partial";

pub struct Staging {
    dir: PathBuf,
    counter: AtomicU64,
    /// Random, per process: two ncps on one volume (two containers, both pid 1) never pick
    /// the same name.
    nonce: u32,
}

impl Staging {
    /// Creates the directory if needed and proves it takes new files now, not on the first miss.
    pub fn open(dir: &Path) -> Result<Staging, StorageError> {
        fs::create_dir_all(dir).map_err(|e| StorageError::io("creating", dir.to_path_buf(), e))?;
        let mut seed = [0u8; 4];
        // Without a random source the pid alone names the files, as before.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        let staging = Staging { dir: dir.to_path_buf(), counter: AtomicU64::new(0), nonce: u32::from_le_bytes(seed) };
        drop(staging.temp_file()?);
        Ok(staging)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new, empty temp file, removed on drop unless committed.
    pub fn temp_file(&self) -> Result<TempFile, StorageError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}-{:08x}-{n}{TEMP_SUFFIX}", std::process::id(), self.nonce));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(|e| StorageError::io("creating temp file", path.clone(), e))?;
        Ok(TempFile { path, file: Some(file) })
    }

    /// A temp file holding `bytes`.
    pub fn temp_with(&self, bytes: &[u8]) -> Result<TempFile, StorageError> {
        let mut tmp = self.temp_file()?;
        tmp.write_all(bytes)?;
        Ok(tmp)
    }

    /// Removes every leftover temp file (from a crash or a kill); returns how many.
    pub fn clear(&self) -> Result<usize, StorageError> {
        let err = |e| StorageError::io("listing", self.dir.clone(), e);
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir).map_err(err)? {
            let entry = entry.map_err(err)?;
            if entry.file_name().to_string_lossy().ends_with(TEMP_SUFFIX) {
                remove_file(&entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Removes a file; one already gone (or impossible: a file where one of its directories
/// belongs) is not an error.
pub(crate) fn remove_file(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Err(e) if !matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
            Err(StorageError::io("removing", path.to_path_buf(), e))
        }
        _ => Ok(()),
    }
}

/// A file being written. Dropped without being committed, it is deleted.
pub struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Allocates `len` bytes of disk for the file without changing its length, where the file
    /// system can (`fallocate` with `FALLOC_FL_KEEP_SIZE`). On ext4 the writes that follow then
    /// skip delayed allocation's per-page bookkeeping: writing 1 GiB into the page cache took
    /// 0.17 s of CPU against 0.24 s here (DESIGN.md "Large transfers"). Best effort: a file
    /// system without it, or a disk without room, is found out by the writes as before.
    pub fn reserve(&self, len: u64) {
        use std::os::fd::AsRawFd;
        let (Some(file), Ok(len)) = (&self.file, libc::off_t::try_from(len)) else { return };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is open for
        // writing and owned by `file`, which outlives the call.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
        if r != 0 {
            log::debug!("{}: no room reserved for {len} bytes: {}", self.path.display(), io::Error::last_os_error());
        }
    }

    /// Appends bytes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), StorageError> {
        let file = self.file.as_mut().ok_or_else(|| closed(&self.path))?;
        file.write_all(bytes).map_err(|e| StorageError::io("writing", self.path.clone(), e))
    }

    /// Another handle on the same open file, for readers that follow a download.
    pub fn reopen(&self) -> Result<File, StorageError> {
        match &self.file {
            Some(f) => f.try_clone().map_err(|e| StorageError::io("reopening", self.path.clone(), e)),
            None => Err(closed(&self.path)),
        }
    }

    /// Syncs the data and moves the file to `dest` (creating its directory): the one way a
    /// local blob gets its final name.
    pub(crate) fn commit(mut self, dest: &Path) -> Result<(), StorageError> {
        if let Some(f) = self.file.take() {
            f.sync_data().map_err(|e| StorageError::io("syncing", self.path.clone(), e))?;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| StorageError::io("creating", parent.to_path_buf(), e))?;
        }
        fs::rename(&self.path, dest).map_err(|e| StorageError::io("renaming into", dest.to_path_buf(), e))?;
        // Committed: nothing left to delete on drop.
        self.path = PathBuf::new();
        Ok(())
    }
}

fn closed(path: &Path) -> StorageError {
    StorageError::io("using", path.to_path_buf(), io::Error::other("temp file already closed"))
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            if let Err(e) = remove_file(&self.path) {
                log::warn!("{e}");
            }
        }
    }
}
