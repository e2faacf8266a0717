//! The local blob store: files under the data path, sharded like the Go ncps so that no
//! directory grows huge: `store/nar/<c1>/<c1c2>/<name>` and
//! `store/narinfo/<c1>/<c1c2>/<hash>.narinfo`.
//!
//! A file exists under its final name only when complete and verified (written in the staging
//! directory, synced, renamed), so a hit needs no index lookup: the file's existence is the
//! answer, and the file goes out with `sendfile`.

use super::staging::remove_file;
use super::{Blob, BlobStore, Listed, Shard, Staging, StorageError, Stray, TempFile};
use crate::nix::{Hash, NarName, StorePathHash};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

pub struct LocalStore {
    root: PathBuf,
    nar_dir: PathBuf,
    narinfo_dir: PathBuf,
    /// `narinfo_dir`, open, so that a narinfo hit resolves 3 path components, not the whole
    /// path from `/` (the path walk was 6% of a narinfo hit's CPU under `perf`).
    narinfo_dir_fd: std::os::fd::OwnedFd,
    /// `nar_dir`, open: NARs are opened below it, following no symlink.
    nar_dir_fd: std::os::fd::OwnedFd,
    /// zstd copies of `Compression: none` NARs: `store/nar-zstd/<c1>/<c1c2>/<name>.zst`, apart
    /// from the NARs so that listings (the start-up check, fsck) never take one for a NAR.
    zstd_dir: PathBuf,
    zstd_dir_fd: std::os::fd::OwnedFd,
}

/// Narinfos up to this size are read whole by a hit (one `read`, no `fstat`); larger ones are
/// sent from the file.
pub const NARINFO_READ_MAX: usize = 16 * 1024;

/// The extended attribute that holds a stored NAR's FileHash (its 32 bytes). It is set on the
/// staged file, so it appears with the NAR (the rename keeps the inode), and read back from
/// the open file of a hit with one `fgetxattr`: the NAR's ETag then costs no index lookup,
/// which measured ~45% of the rate of small-NAR hits (DESIGN.md, "Ranges").
const FILE_HASH_XATTR: &std::ffi::CStr = c"user.ncps.file_hash";

/// Best effort: a file system without user extended attributes only makes hits ask the index.
fn record_file_hash(path: &Path, hash: &Hash) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return };
    // SAFETY: a NUL-terminated path and name, and a value buffer of the length given.
    let r = unsafe {
        libc::setxattr(path.as_ptr(), FILE_HASH_XATTR.as_ptr(), hash.0.as_ptr() as *const libc::c_void, hash.0.len(), 0)
    };
    if r != 0 {
        static TOLD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !TOLD.swap(true, std::sync::atomic::Ordering::Relaxed) {
            log::info!(
                "{}: cannot keep the FileHash as an extended attribute ({}); NAR hits will read \
                 their ETag from the index",
                path.to_string_lossy(),
                io::Error::last_os_error()
            );
        }
    }
}

fn recorded_file_hash(file: &File) -> Option<Hash> {
    use std::os::fd::AsRawFd;
    let mut out = [0u8; 32];
    // SAFETY: a valid descriptor, a NUL-terminated name, and a buffer of the length given.
    let n = unsafe {
        libc::fgetxattr(file.as_raw_fd(), FILE_HASH_XATTR.as_ptr(), out.as_mut_ptr() as *mut libc::c_void, out.len())
    };
    (n == 32).then_some(Hash(out))
}

fn sharded(dir: &Path, name: &str) -> PathBuf {
    let c1 = name.get(..1).unwrap_or("_");
    let c2 = name.get(..2).unwrap_or("__");
    dir.join(c1).join(c2).join(name)
}

fn shard_dir(dir: &Path, shard: &str) -> PathBuf {
    dir.join(shard.get(..1).unwrap_or("_")).join(shard)
}

/// Threads that unlink an eviction batch. An unlink is mostly waiting: on ext4 mounted with
/// `discard` (as on the benchmark VM) freeing a file's blocks waits for the device's discard
/// inside the `unlink` call, which was 56% of an eviction pass under `perf`, so more threads
/// than cores keep the device busy while the other core runs the index transaction. 16, with
/// [`remove_concurrently`] sharing out the work, took the 100k pass on the root disk from
/// 17.5-19.1k to 18.3-21.0k entries/s against 8 with fixed shares (9 alternating pairs,
/// medians +4%; DESIGN.md, "A million entries").
const UNLINK_THREADS: usize = 16;

/// Below this many files one thread is as fast (starting threads costs ~20 us each).
const UNLINK_ALONE_BELOW: usize = 16;

/// Removes the files of `items` on [`UNLINK_THREADS`] threads; every one is tried, the first
/// failure is returned.
///
/// Each thread takes the next file not yet taken instead of a fixed share: an unlink that waits
/// long for its discard then holds up one file, not the rest of its thread's share while the
/// other threads have finished theirs.
fn remove_concurrently<T: Sync>(items: &[T], path: impl Fn(&T) -> PathBuf + Sync) -> Result<(), StorageError> {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    if items.len() < UNLINK_ALONE_BELOW {
        return super::first_failure(items.iter().map(|i| remove_file(&path(i))));
    }
    let next = AtomicUsize::new(0);
    let (next, path) = (&next, &path);
    let taken = std::iter::from_fn(move || items.get(next.fetch_add(1, Relaxed)));
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..UNLINK_THREADS.min(items.len()))
            .map(|_| {
                let mine = taken.clone();
                s.spawn(move || super::first_failure(mine.map(|i| remove_file(&path(i)))))
            })
            .collect();
        super::first_failure(workers.into_iter().map(|w| super::joined(w.join(), "removing files")))
    })
}

/// Whether `openat2(2)` may be tried: Linux 5.6+, and not filtered out by a seccomp profile
/// (older container runtimes answer ENOSYS or EPERM); once it fails so, `openat` is used.
pub(super) static OPENAT2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// `struct open_how` of `linux/openat2.h` (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `relative` below the directory `dir` for reading without following any symlink on
/// the way: `openat2` with `RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH` (a symlinked shard
/// directory is refused too), else `openat` with `O_NOFOLLOW` (the last component only).
/// A symlink met is `ELOOP` (or `EXDEV`, leaving `dir`).
fn open_beneath(dir: &std::os::fd::OwnedFd, relative: &std::ffi::CStr) -> io::Result<File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::sync::atomic::Ordering::Relaxed;
    let flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    if OPENAT2.load(Relaxed) {
        let how = OpenHow { flags: flags as u64, mode: 0, resolve: libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_BENEATH };
        // SAFETY: `dir` is an open directory descriptor, `relative` a NUL-terminated string,
        // and `how` a valid open_how whose size is passed with it; the call returns a new
        // descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                relative.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a descriptor openat2 just returned, owned by nothing else.
            return Ok(unsafe { File::from_raw_fd(fd as std::os::fd::RawFd) });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOSYS | libc::EPERM) => OPENAT2.store(false, Relaxed),
            _ => return Err(e),
        }
    }
    // SAFETY: as above, with openat.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), relative.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor openat just returned, owned by nothing else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Whether an open failed on a symlink ([`open_beneath`]): logged, and "not there".
fn met_symlink(e: &io::Error, full: &Path) -> bool {
    let symlink = matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EXDEV));
    if symlink {
        log::warn!("{}: a symlink, not a stored file; not served (the store check removes it)", full.display());
    }
    symlink
}

/// The path of a blob below its kind's directory: `c1/c1c2/name`.
fn sharded_relative(name: &str) -> Option<std::ffi::CString> {
    let c1 = name.get(..1).unwrap_or("_");
    let c2 = name.get(..2).unwrap_or("__");
    std::ffi::CString::new(format!("{c1}/{c2}/{name}")).ok()
}

/// Opens a file for serving; `None` if it does not exist. A file standing where one of its
/// directories belongs, or a directory where it belongs (a damaged store), also means "not
/// there": the request becomes a miss, served from upstream, rather than an error for every
/// client. So does a symlink, which is never followed ([`open_beneath`]): ncps never makes
/// one, and following it would serve whatever it points at (`/etc/passwd` as a NAR); the
/// store check removes it.
fn open_existing(dir: &std::os::fd::OwnedFd, name: &str, full: &Path) -> Result<Option<(File, u64)>, StorageError> {
    let err = |e| StorageError::io("opening", full.to_path_buf(), e);
    let Some(relative) = sharded_relative(name) else { return Ok(None) };
    match open_beneath(dir, &relative) {
        Ok(f) => {
            let meta = f.metadata().map_err(err)?;
            // A directory where the file belongs opens too, but is not a blob.
            if !meta.is_file() {
                return Ok(None);
            }
            Ok(Some((f, meta.len())))
        }
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => Ok(None),
        Err(e) if met_symlink(&e, full) => Ok(None),
        Err(e) => Err(err(e)),
    }
}

fn open_dir(dir: &Path) -> Result<std::os::fd::OwnedFd, StorageError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(|e| StorageError::io("opening", dir.to_path_buf(), e))?;
    Ok(f.into())
}

thread_local! {
    /// Each thread's buffer for [`read_small`], zeroed once when the thread first reads: a
    /// narinfo hit that misses the memo copies out only the bytes it read, instead of
    /// allocating and zeroing 16 KiB and freeing them again (`malloc`, `memset` and `free`
    /// were ~4% of the samples of spread hits; bench/RESULTS.md, 2026-12-07).
    static READ_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; NARINFO_READ_MAX + 1]);
}

/// Reads a narinfo below `dir`: `None` if it is not there (or a directory stands in its place).
/// `full` makes its whole path, for messages only.
fn read_small(dir: &std::os::fd::OwnedFd, relative: &std::ffi::CStr, full: impl Fn() -> PathBuf) -> Result<Option<Blob>, StorageError> {
    use std::io::Read;
    let err = |e| StorageError::io("reading", full(), e);
    let mut file = match open_beneath(dir, relative) {
        Ok(f) => f,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => return Ok(None),
        Err(e) if met_symlink(&e, &full()) => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let read = READ_BUF.with(|cell| -> io::Result<Option<Vec<u8>>> {
        let mut buf = cell.borrow_mut();
        let n = loop {
            match file.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        // Blobs are never written in place (they are renamed into it whole), so a short read
        // of a regular file is its end.
        Ok((n <= NARINFO_READ_MAX).then(|| buf[..n].to_vec()))
    });
    match read {
        Ok(Some(bytes)) => Ok(Some(Blob::Bytes(bytes))),
        Ok(None) => {
            let len = file.metadata().map_err(err)?.len();
            Ok(Some(Blob::File { file, len }))
        }
        Err(e) if e.kind() == io::ErrorKind::IsADirectory => Ok(None),
        Err(e) => Err(err(e)),
    }
}

/// Lists a directory; a directory that does not exist (or is a file) lists as empty.
/// Files under `dir`, symlinks not followed (for a log line; unreadable parts count 0).
fn count_files(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            _ => 1,
        })
        .sum()
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>, StorageError> {
    let err = |e| StorageError::io("listing", dir.to_path_buf(), e);
    match fs::read_dir(dir) {
        Ok(rd) => rd.collect::<Result<Vec<_>, _>>().map_err(err),
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => Ok(Vec::new()),
        Err(e) => Err(err(e)),
    }
}

/// Every file below `dir`, as strays.
fn all_files(dir: &Path, out: &mut Vec<Stray>) -> Result<(), StorageError> {
    for entry in read_dir(dir)? {
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| StorageError::io("listing", path.clone(), e))?;
        if kind.is_dir() {
            all_files(&path, out)?;
        } else {
            out.push(Stray(path));
        }
    }
    Ok(())
}

impl LocalStore {
    /// Opens (creating if needed) the store under `data_path`.
    pub fn open(data_path: &Path) -> Result<LocalStore, StorageError> {
        let root = data_path.join("store");
        let (nar_dir, narinfo_dir, zstd_dir) = (root.join("nar"), root.join("narinfo"), root.join("nar-zstd"));
        for dir in [&nar_dir, &narinfo_dir, &zstd_dir] {
            fs::create_dir_all(dir).map_err(|e| StorageError::io("creating", dir.clone(), e))?;
        }
        let narinfo_dir_fd = open_dir(&narinfo_dir)?;
        let nar_dir_fd = open_dir(&nar_dir)?;
        let zstd_dir_fd = open_dir(&zstd_dir)?;
        Ok(LocalStore { nar_dir, narinfo_dir, root, narinfo_dir_fd, nar_dir_fd, zstd_dir, zstd_dir_fd })
    }

    fn nar_path(&self, name: &NarName) -> PathBuf {
        sharded(&self.nar_dir, name.as_str())
    }

    fn zstd_path(&self, name: &NarName) -> PathBuf {
        sharded(&self.zstd_dir, &format!("{name}.zst"))
    }

    fn narinfo_path(&self, hash: &StorePathHash) -> PathBuf {
        sharded(&self.narinfo_dir, &format!("{hash}.narinfo"))
    }

    /// Creates `path`'s directory. A file standing where one of its directories belongs (a
    /// damaged store) is removed, with a log line: it is not an entry (entries are only ever
    /// at the shard level), and leaving it would make every write below it fail.
    fn make_parent(&self, path: &Path) -> Result<(), StorageError> {
        let Some(parent) = path.parent() else { return Ok(()) };
        match fs::create_dir_all(parent) {
            Ok(()) => return Ok(()),
            Err(e) if !matches!(e.kind(), io::ErrorKind::NotADirectory | io::ErrorKind::AlreadyExists) => {
                return Err(StorageError::io("creating", parent.to_path_buf(), e))
            }
            Err(_) => {}
        }
        let mut dir = self.root.clone();
        for part in parent.strip_prefix(&self.root).map(|p| p.components().collect::<Vec<_>>()).unwrap_or_default() {
            dir.push(part);
            if fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
                log::warn!("{}: a file stands where a store directory belongs; removing it", dir.display());
                remove_file(&dir)?;
            }
        }
        fs::create_dir_all(parent).map_err(|e| StorageError::io("creating", parent.to_path_buf(), e))
    }

    fn list<N>(
        &self,
        dir: &Path,
        shard: &str,
        parse: impl Fn(&str) -> Option<N>,
        path_of: impl Fn(&N) -> PathBuf,
    ) -> Result<Shard<N>, StorageError> {
        let mut entries = Vec::new();
        let mut strays = Vec::new();
        for entry in read_dir(&shard_dir(dir, shard))? {
            let path = entry.path();
            // Not followed (`DirEntry::metadata` is an lstat): a symlink is no entry, whatever
            // its name, but something foreign to remove.
            let meta = entry.metadata().map_err(|e| StorageError::io("listing", path.clone(), e))?;
            if meta.is_dir() {
                all_files(&path, &mut strays)?;
                continue;
            }
            if !meta.is_file() {
                log::warn!("{}: a symlink or special file, not one ncps wrote: foreign", path.display());
                strays.push(Stray(path));
                continue;
            }
            match entry.file_name().to_str().and_then(&parse) {
                Some(n) if path_of(&n) == path => {
                    entries.push(Listed { name: n, len: meta.len(), modified: Some(std::os::unix::fs::MetadataExt::mtime(&meta)) })
                }
                _ => strays.push(Stray(path)),
            }
        }
        Ok(Shard { entries, strays })
    }
}

impl BlobStore for LocalStore {
    fn narinfo(&self, hash: &StorePathHash) -> Result<Option<Blob>, StorageError> {
        let name = format!("{hash}.narinfo");
        let Some(relative) = sharded_relative(&name) else { return Ok(None) };
        read_small(&self.narinfo_dir_fd, &relative, || self.narinfo_dir.join(relative.to_string_lossy().as_ref()))
    }

    fn nar(&self, name: &NarName) -> Result<Option<Blob>, StorageError> {
        let found = open_existing(&self.nar_dir_fd, name.as_str(), &self.nar_path(name))?;
        Ok(found.map(|(file, len)| Blob::File { file, len }))
    }

    fn nar_len(&self, name: &NarName) -> Result<Option<u64>, StorageError> {
        let path = self.nar_path(name);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => Ok(None),
            Err(e) => Err(StorageError::io("reading", path, e)),
        }
    }

    fn put_narinfo(&self, hash: &StorePathHash, bytes: &[u8], staging: &Staging) -> Result<(), StorageError> {
        let path = self.narinfo_path(hash);
        let staged = staging.temp_with(bytes)?;
        self.make_parent(&path)?;
        staged.commit(&path)
    }

    fn put_nar(&self, name: &NarName, staged: TempFile, file_hash: &Hash) -> Result<(), StorageError> {
        let path = self.nar_path(name);
        record_file_hash(staged.path(), file_hash);
        self.make_parent(&path)?;
        staged.commit(&path)
    }

    fn nar_zstd(&self, name: &NarName) -> Result<Option<Blob>, StorageError> {
        let file = format!("{name}.zst");
        let found = open_existing(&self.zstd_dir_fd, &file, &self.zstd_path(name))?;
        Ok(found.map(|(file, len)| Blob::File { file, len }))
    }

    fn put_nar_zstd(&self, name: &NarName, staged: TempFile) -> Result<(), StorageError> {
        let path = self.zstd_path(name);
        self.make_parent(&path)?;
        staged.commit(&path)
    }

    fn remove_nar_zstd(&self, name: &NarName) -> Result<(), StorageError> {
        remove_file(&self.zstd_path(name))
    }

    fn remove_all_nar_zstd(&self) -> Result<u64, StorageError> {
        // The shard directories go, not `nar-zstd/` itself: its descriptor stays valid.
        let err = |p: &Path, e| StorageError::io("removing zstd copies", p.to_path_buf(), e);
        let mut removed = 0;
        for entry in fs::read_dir(&self.zstd_dir).map_err(|e| err(&self.zstd_dir, e))? {
            let entry = entry.map_err(|e| err(&self.zstd_dir, e))?;
            let path = entry.path();
            // file_type does not follow a symlink: one is removed, never what it points at.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                removed += count_files(&path);
                fs::remove_dir_all(&path).map_err(|e| err(&path, e))?;
            } else {
                removed += 1;
                fs::remove_file(&path).map_err(|e| err(&path, e))?;
            }
        }
        Ok(removed)
    }

    fn nar_file_hash(&self, blob: &Blob) -> Option<Hash> {
        match blob {
            Blob::File { file, .. } => recorded_file_hash(file),
            Blob::Bytes(_) | Blob::Reader { .. } => None,
        }
    }

    fn remove_narinfo(&self, hash: &StorePathHash) -> Result<(), StorageError> {
        remove_file(&self.narinfo_path(hash))
    }

    fn remove_nar(&self, name: &NarName) -> Result<(), StorageError> {
        remove_file(&self.nar_path(name))?;
        self.remove_nar_zstd(name)
    }

    fn remove_narinfos(&self, hashes: &[StorePathHash]) -> Result<(), StorageError> {
        remove_concurrently(hashes, |h| self.narinfo_path(h))
    }

    fn remove_nars(&self, names: &[NarName]) -> Result<(), StorageError> {
        remove_concurrently(names, |n| self.nar_path(n))?;
        // Only NARs stored plain have a copy; trying the others costs a failed lookup each.
        let plain: Vec<NarName> = names.iter().filter(|n| n.as_str().ends_with(".nar")).cloned().collect();
        remove_concurrently(&plain, |n| self.zstd_path(n))
    }

    fn list_narinfos(&self, shard: &str) -> Result<Shard<StorePathHash>, StorageError> {
        self.list(
            &self.narinfo_dir,
            shard,
            |n| n.strip_suffix(".narinfo").and_then(StorePathHash::parse),
            |h| self.narinfo_path(h),
        )
    }

    fn list_nars(&self, shard: &str) -> Result<Shard<NarName>, StorageError> {
        self.list(&self.nar_dir, shard, NarName::parse, |n| self.nar_path(n))
    }

    fn strays_outside_shards(&self) -> Result<Vec<Stray>, StorageError> {
        let mut out = Vec::new();
        for dir in [&self.nar_dir, &self.narinfo_dir] {
            for c1 in read_dir(dir)? {
                let c1_path = c1.path();
                let c1_name = c1.file_name().to_string_lossy().into_owned();
                let is_dir = c1.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if !is_dir {
                    out.push(Stray(c1_path));
                    continue;
                }
                let shard_char = c1_name.len() == 1 && c1_name.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
                for c2 in read_dir(&c1_path)? {
                    let c2_name = c2.file_name().to_string_lossy().into_owned();
                    let is_shard = shard_char
                        && c2_name.len() == 2
                        && c2_name.starts_with(&c1_name)
                        && c2_name.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
                    let is_dir = c2.file_type().map(|t| t.is_dir()).unwrap_or(false);
                    match (is_dir, is_shard) {
                        (true, true) => {}
                        (true, false) => all_files(&c2.path(), &mut out)?,
                        (false, _) => out.push(Stray(c2.path())),
                    }
                }
            }
        }
        Ok(out)
    }

    fn remove_stray(&self, stray: &Stray) -> Result<(), StorageError> {
        // Only ever below the store: a stray is something a listing of it returned.
        if !stray.0.starts_with(&self.root) {
            return Err(StorageError::io(
                "removing",
                stray.0.clone(),
                io::Error::other("not inside the store"),
            ));
        }
        remove_file(&stray.0)
    }

    fn holds_anything(&self) -> Result<bool, StorageError> {
        fn any_file(dir: &Path) -> Result<bool, StorageError> {
            for entry in read_dir(dir)? {
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if !is_dir || any_file(&entry.path())? {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Ok(any_file(&self.nar_dir)? || any_file(&self.narinfo_dir)?)
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_removal_tries_every_file_and_returns_the_first_failure() {
        let dir = std::env::temp_dir().join(format!("ncps-local-remove-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // More than one thread's worth, a name that was never there, and one that cannot go
        // (a non-empty directory where a file is expected).
        let names: Vec<String> = (0..100).map(|i| format!("f{i}")).collect();
        for n in &names[1..] {
            fs::write(dir.join(n), b"x").unwrap();
        }
        fs::remove_file(dir.join("f50")).unwrap();
        fs::create_dir_all(dir.join("f50/inside")).unwrap();
        let err = remove_concurrently(&names, |n| dir.join(n)).expect_err("the directory stays");
        assert!(err.to_string().contains("f50"), "{err}");
        let left: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("f50")], "every other file is gone, the missing one is no error");
        assert!(remove_concurrently(&names[..3], |n| dir.join(n)).is_ok(), "removing again is no error");
        fs::remove_dir_all(&dir).unwrap();
    }
}
