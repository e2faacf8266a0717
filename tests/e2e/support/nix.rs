//! Running the real Nix client: whether it is installed (and so whether a test runs or
//! skips), `nix copy --from` a cache followed by `nix store verify`, and `nix copy --to`.
//! Every invocation gets [`NIX_CONFIG`] and a fresh `XDG_CACHE_HOME` (Nix caches narinfo
//! answers there, which would hide what ncps does).
//!
//! Two clients run the same scenarios ([`NixClient`]): the host's `nix`, Debian 12's Nix 2.8
//! (it sends no Accept-Encoding, and is the oldest Nix still in use), and Debian 13's Nix 2.26
//! in a chroot that tests/nix-chroot.sh builds once and reuses (it sends
//! `Accept-Encoding: zstd, br, gzip, deflate, bzip2, xz`, as Nix 2.14-2.33 do, and parses
//! narinfos more strictly). The chroot shares the host's network, so it reaches ncps and the
//! test upstream on 127.0.0.1; it has its own file system, so every store and cache directory
//! it uses is a [`ChrootDir`] (under the chroot's /tmp), and paths it uploads are first
//! exported from the host's /nix/store into one. When the chroot cannot be built (no mirror,
//! no debootstrap) the Nix 2.26 tests fail, saying why; `NCPS_TEST_SKIP_NIX226=1` skips them.

use super::dirs::{remove_tree, TempDir};
use super::process::run_with_timeout;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

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
/// then `nix store verify -r` of the copied paths against the same key (with Nix 2.8).
pub fn nix_copy_from<S: AsRef<str>>(
    url: &str,
    paths: &[S],
    trusted_key: &str,
) -> Result<(), String> {
    NixClient::Nix2_8.copy_from(url, paths, trusted_key)
}

pub fn nix_copy_from_timeout<S: AsRef<str>>(
    url: &str,
    paths: &[S],
    trusted_key: &str,
    timeout: Duration,
) -> Result<(), String> {
    NixClient::Nix2_8.copy_from_timeout(url, paths, trusted_key, timeout)
}

/// `nix copy --to URL PATHS` from the local store, with a fresh Nix cache dir (Nix 2.8).
pub fn nix_copy_to(url: &str, paths: &[String]) -> Result<(), String> {
    NixClient::Nix2_8.copy_to(url, paths)
}

// ---------------------------------------------------------------------------
// The two clients
// ---------------------------------------------------------------------------

/// A Nix client a scenario runs with. Its methods behave alike for both: the paths named
/// are store paths (`/nix/store/...`), URLs are as seen from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NixClient {
    /// The host's `nix`: Debian 12's Nix 2.8, on the host's /nix/store.
    Nix2_8,
    /// Debian 13's Nix 2.26, in the chroot of tests/nix-chroot.sh, on stores of its own.
    Nix2_26,
}

/// Settings every Nix 2.26 invocation runs with: the suite's, and no build users (the
/// chroot has no nixbld group; nothing is built there).
const NIX_CONFIG_CHROOT: &str =
    "experimental-features = nix-command\nsandbox = false\nsubstitute = false\nbuild-users-group =";

/// Set (to anything but empty) to skip the Nix 2.26 tests instead of failing them when the
/// chroot cannot be built.
pub const SKIP_NIX226_VAR: &str = "NCPS_TEST_SKIP_NIX226";

impl NixClient {
    pub const BOTH: [NixClient; 2] = [NixClient::Nix2_8, NixClient::Nix2_26];

    /// For messages: which Nix and where it runs.
    pub fn label(self) -> &'static str {
        match self {
            NixClient::Nix2_8 => "Nix 2.8 (host)",
            NixClient::Nix2_26 => "Nix 2.26 (trixie chroot)",
        }
    }

    /// True (after printing why) when the current test must be skipped for want of this
    /// client. Nix 2.8: as [`must_skip_without_nix`]. Nix 2.26: only when
    /// `NCPS_TEST_SKIP_NIX226` is set; a chroot that cannot be built panics, saying why.
    pub fn must_skip(self) -> bool {
        if must_skip_without_nix() {
            return true;
        }
        if self == NixClient::Nix2_8 {
            return false;
        }
        let test = thread::current().name().unwrap_or("?").to_string();
        if std::env::var(SKIP_NIX226_VAR).is_ok_and(|v| !v.is_empty()) {
            eprintln!("SKIPPED {test}: {SKIP_NIX226_VAR} is set (Nix 2.26 in its chroot is not used)");
            return true;
        }
        if let Err(e) = nix_chroot() {
            panic!("{test}: Debian 13's Nix 2.26 is not available: {e}\n(set {SKIP_NIX226_VAR}=1 to skip the Nix 2.26 tests)");
        }
        false
    }

    /// `nix --version`, e.g. `nix (Nix) 2.26.3`.
    pub fn version(self) -> Result<String, String> {
        let tmp = self.scratch("nix-version")?;
        let cmd = self.nix(&["--version"], &tmp.xdg())?;
        let out = run_with_timeout(cmd, Duration::from_secs(30))?;
        if out.status.success() {
            Ok(out.stdout.trim().to_string())
        } else {
            Err(format!("{}: nix --version failed ({}): {}", self.label(), out.status, out.stderr.trim()))
        }
    }

    /// `nix copy --from URL --to <fresh store> PATHS` trusting only `trusted_key`, then
    /// `nix store verify -r` of the copied paths against the same key.
    pub fn copy_from<S: AsRef<str>>(self, url: &str, paths: &[S], trusted_key: &str) -> Result<(), String> {
        self.copy_from_timeout(url, paths, trusted_key, Duration::from_secs(90))
    }

    pub fn copy_from_timeout<S: AsRef<str>>(
        self,
        url: &str,
        paths: &[S],
        trusted_key: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let tmp = self.scratch("nix-client")?;
        let store = tmp.store();
        let xdg = tmp.xdg();
        let paths: Vec<&str> = paths.iter().map(|p| p.as_ref()).collect();
        let mut copy = self.nix(&["copy", "--from", url, "--to", &store], &xdg)?;
        copy.args(&paths).args([
            "--option",
            "trusted-public-keys",
            trusted_key,
            "--option",
            "connect-timeout",
            "5",
        ]);
        run_nix(copy, timeout, || format!("nix copy --from {url} [{}]", self.label()))?;
        let mut verify = self.nix(&["store", "verify", "--store", &store, "-r"], &xdg)?;
        verify
            .args(&paths)
            .args(["--option", "trusted-public-keys", trusted_key]);
        run_nix(verify, timeout, || format!("nix store verify after copying from {url} [{}]", self.label()))
    }

    /// `nix copy --to URL PATHS` with a fresh Nix cache dir. The paths are in the host's
    /// /nix/store; Nix 2.26 uploads them from a store of its own that they are first copied
    /// into (by Nix 2.8, as an uncompressed file:// cache that Nix 2.26 imports).
    pub fn copy_to(self, url: &str, paths: &[String]) -> Result<(), String> {
        self.copy_to_with(url, paths, &ClientAuth::default())
    }

    /// As [`NixClient::copy_to`], with a netrc file and/or a signing key (`?secret-key=`).
    pub fn copy_to_with(self, url: &str, paths: &[String], auth: &ClientAuth) -> Result<(), String> {
        let timeout = Duration::from_secs(60);
        let tmp = self.scratch("nix-upload")?;
        let (url, options) = auth.apply(&tmp, url)?;
        let url = url.as_str();
        let from = match self {
            NixClient::Nix2_8 => None,
            NixClient::Nix2_26 => {
                let export = format!("file://{}/export?compression=none", tmp.dir.host.display());
                let xdg_host = tmp.dir.host.join("xdg-host");
                fs::create_dir_all(&xdg_host).map_err(|e| format!("{}: {e}", xdg_host.display()))?;
                let mut c = nix(&["copy", "--to", &export], &xdg_host);
                c.args(paths);
                run_nix(c, timeout, || format!("exporting {paths:?} for the chroot"))?;
                let store = tmp.store();
                let src = format!("file://{}/export", tmp.dir.inside.display());
                let mut c = self.nix(&["copy", "--no-check-sigs", "--from", &src, "--to", &store], &tmp.xdg())?;
                c.args(paths);
                run_nix(c, timeout, || format!("importing {paths:?} into the chroot's store"))?;
                Some(store)
            }
        };
        let mut c = self.nix(&["copy", "--to", url], &tmp.xdg())?;
        if let Some(store) = &from {
            c.args(["--from", store]);
        }
        c.args(paths).args(["--option", "connect-timeout", "5"]).args(&options);
        run_nix(c, timeout, || format!("nix copy --to {url} [{}]", self.label()))
    }

    /// As [`NixClient::copy_from`], with `netrc` as the client's netrc file.
    pub fn copy_from_with_netrc<S: AsRef<str>>(self, url: &str, paths: &[S], trusted_key: &str, netrc: &str) -> Result<(), String> {
        let timeout = Duration::from_secs(90);
        let tmp = self.scratch("nix-client")?;
        let auth = ClientAuth { netrc: Some(netrc.to_string()), ..ClientAuth::default() };
        let (_, options) = auth.apply(&tmp, url)?;
        let store = tmp.store();
        let xdg = tmp.xdg();
        let paths: Vec<&str> = paths.iter().map(|p| p.as_ref()).collect();
        let mut copy = self.nix(&["copy", "--from", url, "--to", &store], &xdg)?;
        copy.args(&paths).args(["--option", "trusted-public-keys", trusted_key, "--option", "connect-timeout", "5"]);
        copy.args(&options);
        run_nix(copy, timeout, || format!("nix copy --from {url} with a netrc file [{}]", self.label()))
    }

    /// `nix ARGS` with the suite's configuration, caching in `xdg` (a path as this client
    /// sees it), on the local store (the host's, or the chroot's, which the tests never use).
    fn nix(self, args: &[&str], xdg: &Path) -> Result<Command, String> {
        match self {
            NixClient::Nix2_8 => Ok(nix(args, xdg)),
            NixClient::Nix2_26 => {
                let mut c = Command::new("chroot");
                // A clean environment: nothing of the host's (NIX_REMOTE, proxies) leaks in.
                c.arg(&nix_chroot()?.root).args([
                    "env",
                    "-i",
                    "PATH=/usr/bin:/bin",
                    "HOME=/root",
                    &format!("NIX_CONFIG={NIX_CONFIG_CHROOT}"),
                    &format!("XDG_CACHE_HOME={}", xdg.display()),
                    "nix",
                ]);
                c.args(args);
                Ok(c)
            }
        }
    }

    /// A scratch directory this client can use: a [`TempDir`] for the host's Nix, a
    /// [`ChrootDir`] for the chroot's.
    fn scratch(self, label: &str) -> Result<Scratch, String> {
        let dir = match self {
            NixClient::Nix2_8 => {
                let t = TempDir::new(label);
                let p = t.path().to_path_buf();
                ChrootDir { host: p.clone(), inside: p, host_temp: Some(t) }
            }
            NixClient::Nix2_26 => ChrootDir::new(label)?,
        };
        fs::create_dir_all(dir.host.join("xdg")).map_err(|e| format!("{}: {e}", dir.host.display()))?;
        Ok(Scratch { dir })
    }
}

/// Credentials a Nix client is given: a netrc file (its text), and a secret key it signs
/// uploads with (a file on the host; copied where the client can read it).
#[derive(Debug, Clone, Default)]
pub struct ClientAuth {
    pub netrc: Option<String>,
    pub secret_key_file: Option<PathBuf>,
}

impl ClientAuth {
    /// Puts the files in `tmp`; returns the store URL (with `?secret-key=`) and the options.
    fn apply(&self, tmp: &Scratch, url: &str) -> Result<(String, Vec<String>), String> {
        let mut options = Vec::new();
        let mut url = url.to_string();
        if let Some(text) = &self.netrc {
            fs::write(tmp.dir.host.join("netrc"), text).map_err(|e| format!("netrc: {e}"))?;
            options.extend(["--option".into(), "netrc-file".into(), tmp.dir.inside.join("netrc").to_string_lossy().into_owned()]);
        }
        if let Some(key) = &self.secret_key_file {
            fs::copy(key, tmp.dir.host.join("upload.sec")).map_err(|e| format!("{}: {e}", key.display()))?;
            url = format!("{url}?secret-key={}", tmp.dir.inside.join("upload.sec").display());
        }
        Ok((url, options))
    }
}

/// A client's scratch directory: a store and a Nix cache directory in it.
struct Scratch {
    dir: ChrootDir,
}

impl Scratch {
    /// The store (a chroot store: `<dir>/store/nix/store/...`), as the client names it.
    fn store(&self) -> String {
        self.dir.inside.join("store").to_string_lossy().into_owned()
    }
    /// The Nix cache directory, as the client names it.
    fn xdg(&self) -> PathBuf {
        self.dir.inside.join("xdg")
    }
}

// ---------------------------------------------------------------------------
// The chroot
// ---------------------------------------------------------------------------

/// Debian 13 with its nix-bin, as tests/nix-chroot.sh built and mounted it.
pub struct NixChroot {
    /// The chroot's root directory on the host.
    pub root: PathBuf,
}

static CHROOT: OnceLock<Result<NixChroot, String>> = OnceLock::new();

/// The chroot, built (or found) and mounted by tests/nix-chroot.sh on first use. Err says
/// why it is not there, with the script's own words.
pub fn nix_chroot() -> Result<&'static NixChroot, String> {
    CHROOT
        .get_or_init(|| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nix-chroot.sh");
            let mut cmd = Command::new("bash");
            cmd.arg(&script);
            let started = Instant::now();
            // Building it takes 40 s to 2 min (debootstrap); finding it, milliseconds.
            let out = run_with_timeout(cmd, Duration::from_secs(900))?;
            if !out.status.success() {
                return Err(format!("{} failed ({}):\n{}", script.display(), out.status, out.stderr.trim()));
            }
            let root = PathBuf::from(out.stdout.lines().last().unwrap_or("").trim());
            if !root.join("usr/bin/nix").exists() {
                return Err(format!("{} printed {:?}, which has no usr/bin/nix", script.display(), out.stdout));
            }
            if started.elapsed() > Duration::from_secs(5) {
                eprintln!("[e2e] Nix 2.26 chroot ready in {:.0}s: {}", started.elapsed().as_secs_f64(), out.stderr.trim());
            }
            remove_stale_chroot_dirs(&root);
            Ok(NixChroot { root })
        })
        .as_ref()
        .map_err(|e| e.clone())
}

/// Where this process's [`ChrootDir`]s go, inside the chroot.
fn chroot_run_dir_inside() -> PathBuf {
    PathBuf::from(format!("/tmp/ncps-e2e-{}", std::process::id()))
}

/// Removes the run directories that earlier, no longer running test processes left in the
/// chroot's /tmp (failed tests keep theirs until then).
fn remove_stale_chroot_dirs(root: &Path) {
    let Ok(rd) = fs::read_dir(root.join("tmp")) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("ncps-e2e-").and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = remove_tree(&e.path());
        }
    }
}

/// At exit: this process's run directory in the chroot, if empty (failed tests keep theirs).
pub(super) fn remove_chroot_run_dir() {
    // Only when the chroot was used: never start the script from an exit hook.
    if let Some(Ok(c)) = CHROOT.get() {
        if let Ok(rel) = chroot_run_dir_inside().strip_prefix("/") {
            let _ = fs::remove_dir(c.root.join(rel));
        }
    }
}

static CHROOT_DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A directory inside the chroot (under its /tmp), known by two names: `host`, the path on
/// the host, and `inside`, the path the chroot's processes see. Removed on drop unless the
/// current thread is panicking (its path is printed, and the next run removes it).
pub struct ChrootDir {
    pub host: PathBuf,
    pub inside: PathBuf,
    /// Set for the host client's "chroot dir", which is a plain [`TempDir`].
    host_temp: Option<TempDir>,
}

impl ChrootDir {
    pub fn new(label: &str) -> Result<ChrootDir, String> {
        let root = &nix_chroot()?.root;
        let n = CHROOT_DIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let inside = chroot_run_dir_inside().join(format!("{label}-{n}"));
        let host = root.join(inside.strip_prefix("/").map_err(|e| e.to_string())?);
        let _ = remove_tree(&host);
        fs::create_dir_all(&host).map_err(|e| format!("{}: {e}", host.display()))?;
        Ok(ChrootDir { host, inside, host_temp: None })
    }
}

impl Drop for ChrootDir {
    fn drop(&mut self) {
        if self.host_temp.is_some() {
            return; // the TempDir does it
        }
        if thread::panicking() {
            eprintln!("[e2e] keeping {} (in the Nix 2.26 chroot) for inspection", self.host.display());
        } else {
            let _ = remove_tree(&self.host);
        }
    }
}

/// One Nix 2.8 client used several times: the same `XDG_CACHE_HOME`, so what Nix remembers
/// between runs (narinfos, and 404s as "absent" for `narinfo-cache-negative-ttl`) carries
/// over, as on a real machine. Each copy goes to a fresh store.
pub struct RememberingClient {
    dir: TempDir,
    copies: std::cell::Cell<u32>,
}

impl Default for RememberingClient {
    fn default() -> Self {
        RememberingClient::new()
    }
}

impl RememberingClient {
    pub fn new() -> RememberingClient {
        let dir = TempDir::new("nix-client");
        fs::create_dir_all(dir.join("xdg")).unwrap();
        RememberingClient { dir, copies: std::cell::Cell::new(0) }
    }

    /// As [`nix_copy_from`], with this client's cache.
    pub fn copy_from<S: AsRef<str>>(&self, url: &str, paths: &[S], trusted_key: &str) -> Result<(), String> {
        let n = self.copies.get() + 1;
        self.copies.set(n);
        let store = self.dir.join(format!("store-{n}")).to_string_lossy().into_owned();
        let xdg = self.dir.join("xdg");
        let timeout = Duration::from_secs(90);
        let paths: Vec<&str> = paths.iter().map(|p| p.as_ref()).collect();
        let mut copy = nix(&["copy", "--from", url, "--to", &store], &xdg);
        copy.args(&paths).args(["--option", "trusted-public-keys", trusted_key, "--option", "connect-timeout", "5"]);
        run_nix(copy, timeout, || format!("nix copy --from {url}"))?;
        let mut verify = nix(&["store", "verify", "--store", &store, "-r"], &xdg);
        verify.args(&paths).args(["--option", "trusted-public-keys", trusted_key]);
        run_nix(verify, timeout, || format!("nix store verify after copying from {url}"))
    }
}
