//! The files on disk: where narinfos and NARs live, and how a file gets there safely.
//!
//! A file is written under a temporary name in the temp directory, synced, and renamed to its
//! final name only once it is complete and checked. So a file under its final name is always
//! whole, whatever happened before (a crash, a full disk, a client that went away), and serving
//! a hit needs no database lookup: the file's existence is the answer.
//!
//! Layout under the data path, sharded like the Go ncps so that no directory grows huge:
//! `store/nar/<c1>/<c1c2>/<name>` and `store/narinfo/<c1>/<c1c2>/<hash>.narinfo`.

use crate::nix::{NarName, StorePathHash};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Files the temp directory may hold: ours end in this suffix, so that clearing it at start-up
/// can never remove something a user put there.
const TEMP_SUFFIX: &str = ".ncps-partial";

pub struct Store {
    nar_dir: PathBuf,
    narinfo_dir: PathBuf,
    temp_dir: PathBuf,
    counter: AtomicU64,
}

fn sharded(dir: &Path, name: &str) -> PathBuf {
    let c1 = name.get(..1).unwrap_or("_");
    let c2 = name.get(..2).unwrap_or("__");
    dir.join(c1).join(c2).join(name)
}

/// An error with the path it concerns, so log lines say which file failed.
pub fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Why [`Store::open`] failed, and whether the temp directory (not the data path) is to blame,
/// so that the error names the right flag.
#[derive(Debug)]
pub struct OpenError {
    pub in_temp_dir: bool,
    pub source: io::Error,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

impl Store {
    /// Opens (creating if needed) the store under `data_path`, with temp files in `temp_dir`,
    /// and checks both can be written.
    pub fn open(data_path: &Path, temp_dir: &Path) -> Result<Store, OpenError> {
        let store = Store {
            nar_dir: data_path.join("store").join("nar"),
            narinfo_dir: data_path.join("store").join("narinfo"),
            temp_dir: temp_dir.to_path_buf(),
            counter: AtomicU64::new(0),
        };
        let data_err = |source| OpenError { in_temp_dir: false, source };
        let temp_err = |source| OpenError { in_temp_dir: true, source };
        for dir in [&store.nar_dir, &store.narinfo_dir] {
            fs::create_dir_all(dir).map_err(|e| data_err(with_path(e, "creating", dir)))?;
        }
        fs::create_dir_all(&store.temp_dir).map_err(|e| temp_err(with_path(e, "creating", &store.temp_dir)))?;
        // Prove the temp directory is writable now, not on the first miss.
        drop(store.temp_file().map_err(temp_err)?);
        Ok(store)
    }

    pub fn nar_path(&self, name: &NarName) -> PathBuf {
        sharded(&self.nar_dir, name.as_str())
    }

    pub fn narinfo_path(&self, hash: &StorePathHash) -> PathBuf {
        sharded(&self.narinfo_dir, &format!("{hash}.narinfo"))
    }

    /// A new, empty temp file, removed on drop unless committed.
    pub fn temp_file(&self) -> io::Result<TempFile> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let path = self.temp_dir.join(format!("{}-{n}{TEMP_SUFFIX}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .map_err(|e| with_path(e, "creating temp file", &path))?;
        Ok(TempFile { path, file: Some(file) })
    }

    /// Writes `bytes` to `dest` atomically (temp file, fsync, rename).
    pub fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut tmp = self.temp_file()?;
        tmp.file()?.write_all(bytes).map_err(|e| with_path(e, "writing", &tmp.path))?;
        tmp.commit(dest)
    }

    /// Opens a file for serving; `None` if it does not exist. A file standing where one of its
    /// directories belongs (a damaged store) also means "not there": the request becomes a
    /// miss, served from upstream, rather than an error for every client.
    pub fn open_existing(path: &Path) -> io::Result<Option<(File, u64)>> {
        match File::open(path) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => Ok(None),
            Err(e) => Err(with_path(e, "opening", path)),
        }
    }

    /// Removes a file; a file already gone (or never possible, see `open_existing`) is not an
    /// error.
    pub fn remove(path: &Path) -> io::Result<()> {
        match fs::remove_file(path) {
            Err(e) if !matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => {
                Err(with_path(e, "removing", path))
            }
            _ => Ok(()),
        }
    }

    /// Removes every leftover temp file (from a crash or a kill); returns how many.
    pub fn clear_temp(&self) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.temp_dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().ends_with(TEMP_SUFFIX) {
                Self::remove(&entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Every NAR file on disk, by name; files whose names are not NAR names are returned
    /// separately as strays.
    pub fn list_nars(&self) -> io::Result<Listing<(NarName, u64)>> {
        let mut nars = Vec::new();
        let mut strays = Vec::new();
        walk(&self.nar_dir, &mut |path, len| {
            let name = path.file_name().and_then(|n| n.to_str()).and_then(NarName::parse);
            match name {
                Some(n) if self.nar_path(&n) == path => nars.push((n, len)),
                _ => strays.push(path.to_path_buf()),
            }
        })?;
        Ok((nars, strays))
    }

    /// Whether the store holds files but `database_path` does not exist: a cache left by Go
    /// ncps (same layout, its own database) or one whose database was deleted. Every file
    /// would look orphaned, so `serve` and `fsck` refuse to start rather than remove them all.
    pub fn holds_files_without(&self, database_path: &Path) -> bool {
        let db_exists = fs::metadata(database_path).is_ok_and(|m| m.len() > 0);
        !db_exists && self.holds_files().unwrap_or(true)
    }

    /// Whether any file at all is under the NAR or narinfo directories.
    fn holds_files(&self) -> io::Result<bool> {
        fn any_file(dir: &Path) -> io::Result<bool> {
            for entry in fs::read_dir(dir).map_err(|e| with_path(e, "listing", dir))? {
                let entry = entry?;
                if !entry.file_type()?.is_dir() || any_file(&entry.path())? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Ok(any_file(&self.nar_dir)? || any_file(&self.narinfo_dir)?)
    }

    /// Every narinfo file on disk, by hash, plus strays as for [`Store::list_nars`].
    pub fn list_narinfos(&self) -> io::Result<Listing<StorePathHash>> {
        let mut hashes = Vec::new();
        let mut strays = Vec::new();
        walk(&self.narinfo_dir, &mut |path, _| {
            let hash = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".narinfo"))
                .and_then(StorePathHash::parse);
            match hash {
                Some(h) if self.narinfo_path(&h) == path => hashes.push(h),
                _ => strays.push(path.to_path_buf()),
            }
        })?;
        Ok((hashes, strays))
    }
}

/// What a directory walk found: the entries, and the files that are not entries (strays).
pub type Listing<T> = (Vec<T>, Vec<PathBuf>);

fn walk(dir: &Path, found: &mut dyn FnMut(&Path, u64)) -> io::Result<()> {
    for entry in fs::read_dir(dir).map_err(|e| with_path(e, "listing", dir))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&entry.path(), found)?;
        } else {
            found(&entry.path(), entry.metadata()?.len());
        }
    }
    Ok(())
}

/// A file being written. Dropped without [`TempFile::commit`], it is deleted: that is how a
/// failed or unverified download leaves nothing behind.
pub struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    pub fn file(&mut self) -> io::Result<&mut File> {
        self.file.as_mut().ok_or_else(|| io::Error::other("temp file already closed"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Another handle on the same open file, for readers that follow a download.
    pub fn reopen(&self) -> io::Result<File> {
        match &self.file {
            Some(f) => f.try_clone(),
            None => Err(io::Error::other("temp file already closed")),
        }
    }

    /// Syncs the data and moves the file to `dest` (creating its directory).
    pub fn commit(mut self, dest: &Path) -> io::Result<()> {
        if let Some(f) = self.file.take() {
            f.sync_data().map_err(|e| with_path(e, "syncing", &self.path))?;
        }
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| with_path(e, "creating", parent))?;
        }
        fs::rename(&self.path, dest).map_err(|e| with_path(e, "renaming into", dest))?;
        // Mark as committed: nothing left to delete on drop.
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            if let Err(e) = Store::remove(&self.path) {
                log::warn!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> (PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!("ncps-store-test-{}-{:?}", std::process::id(),
            std::thread::current().id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::open(&dir, &dir.join("tmp")).unwrap();
        (dir, store)
    }

    #[test]
    fn a_dropped_temp_file_leaves_nothing_and_a_committed_one_appears_whole() {
        let (dir, store) = temp_store();
        let mut t = store.temp_file().unwrap();
        t.file().unwrap().write_all(b"half").unwrap();
        let p = t.path().to_path_buf();
        drop(t);
        assert!(!p.exists());

        let name = NarName::parse(&format!("{}.nar.xz", "1".repeat(52))).unwrap();
        let dest = store.nar_path(&name);
        store.write_atomic(&dest, b"whole").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"whole");
        assert!(dest.ends_with(format!("store/nar/1/11/{name}")));
        let (nars, strays) = store.list_nars().unwrap();
        assert_eq!(nars, vec![(name, 5)]);
        assert!(strays.is_empty());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn clearing_temp_removes_only_our_partial_files() {
        let (dir, store) = temp_store();
        let t = store.temp_file().unwrap();
        std::mem::forget(t); // as if the process had been killed
        fs::write(dir.join("tmp").join("user-file"), b"x").unwrap();
        assert_eq!(store.clear_temp().unwrap(), 1);
        assert!(dir.join("tmp").join("user-file").exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
