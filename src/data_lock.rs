//! Who may use a data path at the same time: any number of `ncps serve`, or one
//! `ncps fsck --repair`, never both.
//!
//! Why: `fsck --repair` removes a blob the index does not vouch for, and a running ncps
//! writes every blob before its index row (a download or an upload is renamed into place,
//! then recorded). A repair that lists the store between the two removes a NAR that is about
//! to be recorded: for a download that is a later miss, but for an upload it is lost, and its
//! narinfo then points at nothing. The README said "run it with ncps stopped"; now it is
//! enforced instead of hoped for.
//!
//! How: an open-file-description lock (`fcntl(F_OFD_SETLK)`) on `<data-path>/ncps.lock`.
//! `serve` holds it shared (a read lock) for its whole life, so two servers (a rolling
//! restart, a replica started early) still start as before; `fsck --repair` takes it
//! exclusively (a write lock) and is refused while any server holds it, and a server that
//! starts during a repair is refused. `fsck` without `--repair` changes nothing, so it only
//! asks (`F_OFD_GETLK`, which takes nothing: a server starting at that moment is not turned
//! away), and when a server runs it leaves young blobs the index does not vouch for alone
//! (`fsck::YOUNG`), as the server may be recording them. The kernel drops the lock when its
//! process ends, however it ends: a `kill -9` or a crash leaves nothing stale behind, unlike a
//! pid file. These locks are not the POSIX per-process ones SQLite uses: they belong to this
//! open file alone, and closing another descriptor drops nothing. The file holds nothing; it
//! is created once and left in place. With a shared (PostgreSQL) index other replicas write
//! anyway, on other data paths, and fsck leaves young blobs alone there for the same reason.
//!
//! A server asks, on its own lock, whether others hold it too ([`DataLock::others`]): at its
//! start (another server's temp files and unrecorded blobs are not a crash's leftovers), before
//! each shard of a store check (one that has started since stops the check), and at its stop
//! (the clean-stop marker is left by the last one to stop, and only by one that knows the
//! store is sound: see `cache::startup`).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The file's name in the data path.
pub const NAME: &str = "ncps.lock";

/// A held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataLock {
    file: File,
}

impl DataLock {
    /// Whether another process holds the lock too (a server beside this one). Asked on this
    /// lock's own open file, which its own lock never stands in the way of, so the answer is
    /// about the others only, and nothing is taken. `false` when the kernel cannot say.
    pub fn others(&self) -> bool {
        held_by_others(&self.file).unwrap_or(false)
    }
}

/// What the cache asks while it runs: whether another ncps serves the same data path.
/// Without a lock (a file system that takes none) the answer is always no, as before locks.
#[derive(Debug, Clone, Default)]
pub struct Peers(Option<std::sync::Arc<DataLock>>);

impl Peers {
    pub fn new(lock: Option<DataLock>) -> Peers {
        Peers(lock.map(std::sync::Arc::new))
    }

    pub fn others(&self) -> bool {
        self.0.as_ref().is_some_and(|l| l.others())
    }
}

/// Why the lock was not taken.
#[derive(Debug)]
#[non_exhaustive]
pub enum LockError {
    /// Someone else holds it in the way that excludes us: a server (when fsck --repair asks)
    /// or a repair (when a server asks).
    Held { path: PathBuf },
    /// The file system takes no such locks (`ENOLCK`, `EINVAL`, `EOPNOTSUPP`: some network
    /// and FUSE file systems). Callers go on without the lock, and say so.
    Unsupported { path: PathBuf, source: io::Error },
    /// The file could not be opened or locked.
    Io { path: PathBuf, source: io::Error },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::Held { path } => write!(f, "{} is held by another ncps", path.display()),
            LockError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            LockError::Unsupported { path, source } => {
                write!(f, "{}: the file system takes no file locks ({source})", path.display())
            }
        }
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LockError::Io { source, .. } | LockError::Unsupported { source, .. } => Some(source),
            LockError::Held { .. } => None,
        }
    }
}

/// How the lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// By a server: many at once.
    Serving,
    /// By `fsck --repair`: alone.
    Repairing,
}

/// Takes the lock of `data_path` (which must exist) without waiting, creating its file if
/// needed. A server's shared lock needs only to read the file, so a file another user made
/// (`sudo ncps fsck --repair` leaves one owned by root) does not keep the service from starting.
pub fn take(data_path: &Path, mode: Mode) -> Result<DataLock, LockError> {
    let path = data_path.join(NAME);
    let opened = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path);
    let file = match opened {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && mode == Mode::Serving => File::open(&path),
        other => other,
    }
    .map_err(|source| LockError::Io { path: path.clone(), source })?;
    let kind = match mode {
        Mode::Serving => libc::F_RDLCK,
        Mode::Repairing => libc::F_WRLCK,
    };
    match lock(&file, libc::F_OFD_SETLK, kind) {
        Ok(_) => Ok(DataLock { file }),
        Err(e) => Err(classify(path, e)),
    }
}

fn classify(path: PathBuf, source: io::Error) -> LockError {
    match source.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => LockError::Held { path },
        Some(libc::ENOLCK | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS) => LockError::Unsupported { path, source },
        _ => LockError::Io { path, source },
    }
}

/// Whether a server holds the lock of `data_path` now, for a process that holds none of its
/// own (`fsck` without `--repair`). It only asks: nothing is taken, so a
/// server starting at the same moment is not refused. `false` when there is no lock file
/// (no ncps of this version has served there).
pub fn served(data_path: &Path) -> Result<bool, LockError> {
    let path = data_path.join(NAME);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => return Err(LockError::Io { path, source }),
    };
    held_by_others(&file).map_err(|e| classify(path, e))
}

/// Whether a lock other than this open file's own is held on its file: `F_OFD_GETLK` for the
/// whole file, which takes nothing.
fn held_by_others(file: &File) -> io::Result<bool> {
    lock(file, libc::F_OFD_GETLK, libc::F_WRLCK).map(|found| found != libc::F_UNLCK)
}

/// `fcntl(cmd)` with a lock of `kind` over the whole file; returns the lock type the kernel
/// wrote back (for `F_OFD_GETLK`: `F_UNLCK` when nothing stands in the way).
fn lock(file: &File, cmd: libc::c_int, kind: libc::c_int) -> io::Result<libc::c_int> {
    // SAFETY: an all-zero `struct flock` is valid (offset 0 from SEEK_SET, length 0 = to
    // the end, pid 0, which OFD locks require).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    loop {
        // SAFETY: a valid descriptor owned by `file` for the call's duration, and a pointer
        // to a `struct flock` that lives across it, as these commands take.
        if unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) } == 0 {
            return Ok(fl.l_type as libc::c_int);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(what: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ncps-data-lock-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn servers_share_the_lock_and_a_repair_excludes_them_both_ways() {
        let d = dir("modes");
        assert!(!served(&d).unwrap(), "no lock file: nobody serves");
        let a = take(&d, Mode::Serving).unwrap();
        let b = take(&d, Mode::Serving).expect("a second server starts as before");
        assert!(served(&d).unwrap());
        assert!(matches!(take(&d, Mode::Repairing), Err(LockError::Held { .. })), "no repair while one serves");
        drop(a);
        assert!(matches!(take(&d, Mode::Repairing), Err(LockError::Held { .. })), "nor while the other does");
        drop(b);
        assert!(!served(&d).unwrap(), "released when dropped");
        let r = take(&d, Mode::Repairing).unwrap();
        assert!(matches!(take(&d, Mode::Serving), Err(LockError::Held { .. })), "no server during a repair");
        assert!(matches!(take(&d, Mode::Repairing), Err(LockError::Held { .. })), "one repair at a time");
        drop(r);
        let a = take(&d, Mode::Serving).unwrap();
        assert!(!a.others(), "its own lock is not another's");
        let b = take(&d, Mode::Serving).unwrap();
        assert!(a.others() && b.others(), "each sees the other");
        drop(b);
        assert!(!a.others());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
