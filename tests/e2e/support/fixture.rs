//! The Nix fixture: real store paths, built with the real Nix client by a script under
//! `tests/fixtures/` and published as signed `file://` binary caches. [`fixture()`] builds
//! the standard one (mkfixture.sh) once per run of the test binary and every test shares
//! it; [`build_fixture_with`] builds another script's fixture (the lifecycle tests' one).
//! Each lives in `target/tmp/e2e-fixture-<pid>/<script>/`; the store paths they added to
//! /nix/store are deleted at exit (or by the next run, if this one was killed).

use super::dirs::{remove_tree, run_dir, tmp_base, files_under, TempDir};
use super::narinfo::{store_hash, NarInfo};
use super::crypto::sign_with_key_file;
use super::nix::{must_skip_without_nix, NIX_CONFIG};
use super::process::run_with_timeout;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Returns the fixture, or `None` (after printing why) when the test must be
/// skipped: only when `nix` is not installed and `CI` is unset. Under CI a
/// missing `nix` is a failure.
///
/// ```ignore
/// let Some(fx) = fixture_or_skip() else { return };
/// ```
pub fn fixture_or_skip() -> Option<&'static Fixture> {
    if must_skip_without_nix() {
        return None;
    }
    Some(fixture())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Zstd,
    None,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }
}

/// Real store paths published as signed binary caches (see mkfixture.sh).
#[derive(Debug)]
pub struct Fixture {
    pub dir: PathBuf,
    /// Key that signed every path of the caches.
    pub up1_public_key: String,
    pub up1_secret_key_file: PathBuf,
    /// Decoy key: signs nothing.
    pub up2_public_key: String,
    /// Top path; references `lib` and `big`.
    pub top: String,
    pub lib: String,
    pub big: String,
    pub top_closure: Vec<String>,
    /// Small independent paths.
    pub many: Vec<String>,
}

impl Fixture {
    /// Directory of the file:// cache with the given compression.
    pub fn cache_dir(&self, c: Compression) -> PathBuf {
        self.dir.join(format!("cache-{}", c.name()))
    }
    /// The upstream's narinfo text for a store path.
    pub fn upstream_narinfo(&self, c: Compression, store_path: &str) -> String {
        let p = self
            .cache_dir(c)
            .join(format!("{}.narinfo", store_hash(store_path)));
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }
}

/// The standard fixture (mkfixture.sh), built on first use and shared by every test of the
/// run. Panics if it cannot be built.
pub fn fixture() -> &'static Fixture {
    static FX: OnceLock<Result<Fixture, String>> = OnceLock::new();
    match FX.get_or_init(|| build_fixture_with("mkfixture.sh")) {
        Ok(f) => f,
        Err(e) => panic!("building the Nix fixture failed:\n{e}"),
    }
}

/// This process's directory of fixtures, one subdirectory per script.
pub(super) fn fixtures_dir() -> PathBuf {
    tmp_base().join(format!("e2e-fixture-{}", std::process::id()))
}

/// Runs `tests/fixtures/<script> DIR` (a script that writes the layout of
/// mkfixture.sh) into this process's directory for that script and reads what it built.
/// The exit hook deletes the store paths listed under `DIR/paths`.
pub fn build_fixture_with(script: &str) -> Result<Fixture, String> {
    let _ = run_dir(); // stale cleanup + exit hook
    let dir = fixtures_dir().join(script.trim_end_matches(".sh"));
    let _ = remove_tree(&dir);
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(script);
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(&dir);
    let out = run_with_timeout(cmd, Duration::from_secs(120))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed ({}):\n{}\n{}",
            script.display(),
            dir.display(),
            out.status,
            out.stdout,
            out.stderr
        ));
    }
    eprintln!(
        "[e2e] fixture built in {:.1}s: {}",
        started.elapsed().as_secs_f64(),
        out.stdout.trim()
    );
    Ok(Fixture {
        up1_public_key: fixture_text(&dir, "keys/up1.pub")?,
        up1_secret_key_file: dir.join("keys/up1.sec"),
        up2_public_key: fixture_text(&dir, "keys/up2.pub")?,
        top: fixture_text(&dir, "paths/top.txt")?,
        lib: fixture_text(&dir, "paths/lib.txt")?,
        big: fixture_text(&dir, "paths/big.txt")?,
        top_closure: fixture_lines(&dir, "paths/top-closure.txt")?,
        many: fixture_lines(&dir, "paths/many.txt")?,
        dir,
    })
}

/// A fixture file's text, trimmed.
pub fn fixture_text(dir: &Path, p: &str) -> Result<String, String> {
    fs::read_to_string(dir.join(p))
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{p}: {e}"))
}

/// A fixture file's lines (a list of store paths).
pub fn fixture_lines(dir: &Path, p: &str) -> Result<Vec<String>, String> {
    Ok(fixture_text(dir, p)?.lines().map(String::from).collect())
}

/// Deletes from /nix/store the paths a fixture directory lists under `paths/`: those of
/// `dir` itself and of each of its subdirectories (one per fixture script).
pub(super) fn delete_store_paths_of(dir: &Path) {
    let mut fixture_dirs = vec![dir.to_path_buf()];
    if let Ok(rd) = fs::read_dir(dir) {
        fixture_dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let mut paths = Vec::new();
    for d in fixture_dirs {
        for f in ["top-closure.txt", "many.txt", "drvs.txt"] {
            if let Ok(s) = fs::read_to_string(d.join("paths").join(f)) {
                paths.extend(s.lines().filter(|l| !l.is_empty()).map(String::from));
            }
        }
    }
    if paths.is_empty() {
        return;
    }
    let _ = Command::new("nix-store")
        .arg("--delete")
        .args(&paths)
        .env("NIX_CONFIG", NIX_CONFIG)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A copy of the fixture cache `c` whose narinfos carry, instead of their
/// Sig lines, one signature by `secret_key_file` (NARs are hard links).
pub fn resigned_cache_copy(fx: &Fixture, c: Compression, secret_key_file: &Path) -> TempDir {
    let src = fx.cache_dir(c);
    let dst = TempDir::new(&format!("cache-{}-resigned", c.name()));
    for f in files_under(&src) {
        let rel = f.strip_prefix(&src).unwrap();
        let out = dst.join(rel);
        fs::create_dir_all(out.parent().unwrap()).unwrap();
        if f.extension().is_some_and(|e| e == "narinfo") {
            let text = fs::read_to_string(&f).unwrap();
            let sig = sign_with_key_file(secret_key_file, &NarInfo::parse(&text).fingerprint());
            let mut new: String = text
                .lines()
                .filter(|l| !l.starts_with("Sig:"))
                .map(|l| format!("{l}\n"))
                .collect();
            new.push_str(&format!("Sig: {sig}\n"));
            fs::write(&out, new).unwrap();
        } else if fs::hard_link(&f, &out).is_err() {
            fs::copy(&f, &out).unwrap();
        }
    }
    dst
}

/// The upstream URL path (`/nar/...`) of the NAR a fixture narinfo points at.
pub fn upstream_nar_path(fx: &Fixture, c: Compression, store_path: &str) -> String {
    let ni = NarInfo::parse(&fx.upstream_narinfo(c, store_path));
    format!("/{}", ni.get("URL").expect("URL in fixture narinfo"))
}
