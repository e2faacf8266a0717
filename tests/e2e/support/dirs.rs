//! Temporary directories: [`TempDir`] (removed on drop unless its test failed), the
//! per-process run directory under `target/tmp/e2e-run-<pid>/` that holds them, and the
//! clean-up of what earlier, killed runs left behind.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;

/// Cargo's scratch directory for integration tests (`target/tmp`).
pub fn tmp_base() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

static DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Per-process directory holding every temporary directory of this run.
pub fn run_dir() -> PathBuf {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        remove_stale_dirs();
        let d = tmp_base().join(format!("e2e-run-{}", std::process::id()));
        fs::create_dir_all(&d).expect("create run dir");
        register_exit_cleanup();
        d
    })
    .clone()
}

/// A directory removed on drop, unless the current thread is panicking (a
/// failing test keeps its files for inspection; the path is printed).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let n = DIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = run_dir().join(format!("{label}-{n}"));
        let _ = remove_tree(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("[e2e] keeping {} for inspection", self.path.display());
        } else {
            let _ = remove_tree(&self.path);
        }
    }
}

/// remove_dir_all that also copes with read-only Nix store directories.
pub fn remove_tree(p: &Path) -> io::Result<()> {
    if !p.exists() {
        return Ok(());
    }
    if fs::remove_dir_all(p).is_ok() {
        return Ok(());
    }
    let _ = Command::new("chmod")
        .arg("-R")
        .arg("u+w")
        .arg(p)
        .stderr(Stdio::null())
        .status();
    fs::remove_dir_all(p)
}

/// Every regular file under `dir` (any depth), sorted; empty if `dir` is missing.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                walk(&e.path(), out);
            } else {
                out.push(e.path());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes run and fixture directories left behind by earlier test processes
/// that no longer exist (e.g. killed runs), together with their store paths.
fn remove_stale_dirs() {
    let Ok(rd) = fs::read_dir(tmp_base()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix("e2e-run-")
            .or_else(|| name.strip_prefix("e2e-fixture-"))
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        if name.starts_with("e2e-fixture-") {
            super::fixture::delete_store_paths_of(&e.path());
        }
        let _ = remove_tree(&e.path());
    }
}

extern "C" fn exit_cleanup() {
    let fixtures = super::fixture::fixtures_dir();
    if fixtures.exists() {
        super::fixture::delete_store_paths_of(&fixtures);
        let _ = remove_tree(&fixtures);
    }
    // Only succeeds when empty: directories of failed tests are kept.
    let _ = fs::remove_dir(tmp_base().join(format!("e2e-run-{}", std::process::id())));
    super::nix::remove_chroot_run_dir();
}

fn register_exit_cleanup() {
    static ONCE: OnceLock<()> = OnceLock::new();
    // SAFETY: `exit_cleanup` is an `extern "C" fn()` that lives for the whole program and
    // only removes directories; atexit merely records it.
    ONCE.get_or_init(|| unsafe {
        libc::atexit(exit_cleanup);
    });
}
