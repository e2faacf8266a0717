//! Running the real Nix client: whether it is installed (and so whether a test runs or
//! skips), `nix copy --from` a cache followed by `nix store verify`, and `nix copy --to`.
//! Every invocation gets [`NIX_CONFIG`] and a fresh `XDG_CACHE_HOME` (Nix caches narinfo
//! answers there, which would hide what ncps does).

use super::dirs::TempDir;
use super::process::run_with_timeout;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

/// Configuration every Nix invocation of the suite runs with.
pub const NIX_CONFIG: &str =
    "experimental-features = nix-command\nsandbox = false\nsubstitute = false";

pub fn nix_installed() -> bool {
    Command::new("nix")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn running_under_ci() -> bool {
    matches!(std::env::var("CI"), Ok(v) if !v.is_empty())
}

/// True (after printing why) when the current test must be skipped because `nix` is not
/// installed and `CI` is unset. Under CI a missing `nix` panics: the tests must run.
pub fn must_skip_without_nix() -> bool {
    if nix_installed() {
        return false;
    }
    let test = thread::current().name().unwrap_or("?").to_string();
    if running_under_ci() {
        panic!("{test}: `nix` is not installed but CI is set: end-to-end tests must run");
    }
    eprintln!(
        "SKIPPED {test}: `nix` is not installed (apt-get install nix-bin); set CI=true to make this a failure"
    );
    true
}

/// `nix ARGS` with the suite's configuration, caching in `xdg_cache_home`, on the local store.
fn nix(args: &[&str], xdg_cache_home: &Path) -> Command {
    let mut c = Command::new("nix");
    c.args(args)
        .env("NIX_CONFIG", NIX_CONFIG)
        .env("XDG_CACHE_HOME", xdg_cache_home)
        .env_remove("NIX_REMOTE");
    c
}

/// Runs a nix command; Err("WHAT failed (STATUS):\nSTDERR") unless it succeeds in time.
fn run_nix(cmd: Command, timeout: Duration, what: impl Fn() -> String) -> Result<(), String> {
    let out = run_with_timeout(cmd, timeout)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{} failed ({}):\n{}", what(), out.status, out.stderr.trim()))
    }
}

/// `nix copy --from URL --to <fresh store> PATHS` trusting only `trusted_key`,
/// then `nix store verify -r` of the copied paths against the same key.
pub fn nix_copy_from<S: AsRef<str>>(
    url: &str,
    paths: &[S],
    trusted_key: &str,
) -> Result<(), String> {
    nix_copy_from_timeout(url, paths, trusted_key, Duration::from_secs(90))
}

pub fn nix_copy_from_timeout<S: AsRef<str>>(
    url: &str,
    paths: &[S],
    trusted_key: &str,
    timeout: Duration,
) -> Result<(), String> {
    let tmp = TempDir::new("nix-client");
    let xdg = tmp.join("xdg");
    fs::create_dir_all(&xdg).unwrap();
    copy_from_into(url, paths, trusted_key, timeout, &tmp.join("store"), &xdg)
}

/// One Nix client used several times: the same `XDG_CACHE_HOME`, so what Nix remembers
/// between runs (narinfos, and 404s as "absent" for `narinfo-cache-negative-ttl`) carries
/// over, as on a real machine. Each copy goes to a fresh store.
pub struct NixClient {
    dir: TempDir,
    copies: std::cell::Cell<u32>,
}

impl Default for NixClient {
    fn default() -> Self {
        NixClient::new()
    }
}

impl NixClient {
    pub fn new() -> NixClient {
        let dir = TempDir::new("nix-client");
        fs::create_dir_all(dir.join("xdg")).unwrap();
        NixClient { dir, copies: std::cell::Cell::new(0) }
    }

    /// As [`nix_copy_from`], with this client's cache.
    pub fn copy_from<S: AsRef<str>>(&self, url: &str, paths: &[S], trusted_key: &str) -> Result<(), String> {
        let n = self.copies.get() + 1;
        self.copies.set(n);
        let store = self.dir.join(format!("store-{n}"));
        copy_from_into(url, paths, trusted_key, Duration::from_secs(90), &store, &self.dir.join("xdg"))
    }
}

fn copy_from_into<S: AsRef<str>>(
    url: &str,
    paths: &[S],
    trusted_key: &str,
    timeout: Duration,
    store: &Path,
    xdg: &Path,
) -> Result<(), String> {
    let xdg = xdg.to_path_buf();
    let store_s = store.to_string_lossy().into_owned();
    let mut copy = nix(&["copy", "--from", url, "--to", &store_s], &xdg);
    let paths: Vec<&str> = paths.iter().map(|p| p.as_ref()).collect();
    copy.args(&paths).args([
        "--option",
        "trusted-public-keys",
        trusted_key,
        "--option",
        "connect-timeout",
        "5",
    ]);
    run_nix(copy, timeout, || format!("nix copy --from {url}"))?;
    let mut verify = nix(&["store", "verify", "--store", &store_s, "-r"], &xdg);
    verify
        .args(&paths)
        .args(["--option", "trusted-public-keys", trusted_key]);
    run_nix(verify, timeout, || format!("nix store verify after copying from {url}"))
}

/// `nix copy --to URL PATHS` from the local store, with a fresh Nix cache dir.
pub fn nix_copy_to(url: &str, paths: &[String]) -> Result<(), String> {
    let tmp = TempDir::new("nix-upload");
    let mut c = nix(&["copy", "--to", url], tmp.path());
    c.args(paths).args(["--option", "connect-timeout", "5"]);
    run_nix(c, Duration::from_secs(60), || format!("nix copy --to {url}"))
}
