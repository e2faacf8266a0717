//! The ncps under test: [`Ncps`] starts `ncps serve` (the crate's binary, or
//! `NCPS_E2E_BIN`) on a free loopback port with a fresh data directory, waits until it
//! answers, and kills it on drop, printing its log if the test failed.
//! [`run_ncps_expecting_failure`] runs it with a bad configuration.
//!
//! Every ncps the tests start comes from [`ncps_command`], which clears each environment
//! variable ncps reads ([`scrubbed_env_vars`]: those of every flag in
//! `ncps::config::FLAGS`, so the list cannot fall behind the flags), so that what a
//! developer exported in their shell cannot reach the ncps under test.

use super::crypto::SOME_VALID_PUBLIC_KEY;
use super::dirs::{files_under, TempDir};
use super::http::{free_port, http_get, http_head, http_request_with, Response};
use super::narinfo::{store_hash, NarInfo};
use super::process::{run_with_timeout, wait_until};
use super::upstream::Upstream;
use ::ncps::config::FLAGS;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The hostname (and so the signing key name) the suite gives ncps by default.
pub const HOSTNAME: &str = "ncps-e2e.example.org";

/// The write token the suite gives ncps when it allows PUT or DELETE.
pub const WRITE_TOKEN: &str = "e2e-write-token-7f3a9c";

/// A netrc file with one entry for ncps's host (127.0.0.1) whose password is `token`.
pub fn netrc_for(token: &str) -> String {
    format!("machine 127.0.0.1\n  login nix\n  password {token}\n")
}

/// Variables ncps reads that belong to no flag: `SSL_CERT_FILE` (extra CA certificates
/// for HTTPS upstreams, src/upstream.rs). Tests that want it set it explicitly.
const NON_FLAG_ENV_VARS: &[&str] = &["SSL_CERT_FILE"];

/// Every environment variable cleared for the ncps under test: each flag's variables
/// (all names, old ones included), then [`NON_FLAG_ENV_VARS`].
pub fn scrubbed_env_vars() -> impl Iterator<Item = &'static str> {
    FLAGS
        .iter()
        .flat_map(|f| f.envs.iter().copied())
        .chain(NON_FLAG_ENV_VARS.iter().copied())
}

/// `ncps` (see [`ncps_bin`]) with every variable of [`scrubbed_env_vars`] removed from
/// its environment; add arguments and the variables a test wants.
pub fn ncps_command() -> Command {
    let mut cmd = Command::new(ncps_bin());
    for v in scrubbed_env_vars() {
        cmd.env_remove(v);
    }
    // ncps reads ~/.netrc when no --netrc-file is given: not the developer's.
    cmd.env("HOME", "/nonexistent-ncps-e2e-home");
    // Nor a config file of the developer's ($XDG_CONFIG_HOME/ncps/config.yaml, read if there).
    cmd.env("XDG_CONFIG_HOME", "/nonexistent/ncps-e2e");
    cmd
}

/// Path of the binary under test: NCPS_E2E_BIN if set (e.g. a release or
/// static build), else the crate's own `ncps` binary.
pub fn ncps_bin() -> String {
    std::env::var("NCPS_E2E_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ncps").to_string())
}

/// A running `ncps serve`. Killed on drop; its log is printed when the test
/// fails. In args and env values, `{addr}` and `{data}` are replaced with the
/// listen address and the data directory.
pub struct Ncps {
    child: Option<Child>,
    pub addr: SocketAddr,
    data: TempDir,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    /// RLIMIT_NOFILE (soft and hard) for the process, if limited.
    nofile: Option<u64>,
}

impl Ncps {
    /// `ncps serve --cache-hostname HOSTNAME --cache-data-path {data}
    /// --server-addr {addr} --log-level debug` followed by `extra`.
    pub fn start(extra: &[&str]) -> Ncps {
        Ncps::start_with_hostname(HOSTNAME, extra)
    }

    /// As [`Ncps::start`], with these environment variables set for ncps.
    pub fn start_with_env(extra: &[&str], envs: &[(&str, &str)]) -> Ncps {
        Ncps::start_with_hostname_and_env(HOSTNAME, extra, envs)
    }

    pub fn start_with_hostname(hostname: &str, extra: &[&str]) -> Ncps {
        Ncps::start_with_hostname_and_env(hostname, extra, &[])
    }

    /// As [`Ncps::start`], under `ulimit -n nofile` (soft and hard: ncps cannot raise it).
    pub fn start_with_fd_limit(extra: &[&str], nofile: u64) -> Ncps {
        Ncps::start_limited(Ncps::args_for(HOSTNAME, extra), Vec::new(), Some(nofile))
    }

    fn args_for(hostname: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "serve",
            "--cache-hostname",
            hostname,
            "--cache-data-path",
            "{data}",
            "--server-addr",
            "{addr}",
            "--log-level",
            "debug",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn start_with_hostname_and_env(hostname: &str, extra: &[&str], envs: &[(&str, &str)]) -> Ncps {
        let args = Ncps::args_for(hostname, extra);
        Ncps::start_raw(args, envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    /// Typical proxy: one or more upstream URLs, each trusted with `key`.
    pub fn for_upstreams(upstreams: &[String], key: &str) -> Ncps {
        Ncps::for_upstreams_with(upstreams, &[key], &[])
    }

    /// Proxy for `upstreams`, trusting each of `keys` (none: no
    /// --upstream-public-key at all), followed by `extra` flags.
    pub fn for_upstreams_with(upstreams: &[String], keys: &[&str], extra: &[&str]) -> Ncps {
        let mut args: Vec<&str> = Vec::new();
        for u in upstreams {
            args.push("--upstream-cache");
            args.push(u);
        }
        for k in keys {
            args.push("--upstream-public-key");
            args.push(k);
        }
        args.extend_from_slice(extra);
        Ncps::start(&args)
    }

    /// Exactly these args and env vars (placeholders substituted).
    pub fn start_raw(args: Vec<String>, envs: Vec<(String, String)>) -> Ncps {
        Ncps::start_limited(args, envs, None)
    }

    fn start_limited(args: Vec<String>, envs: Vec<(String, String)>, nofile: Option<u64>) -> Ncps {
        Ncps::start_in(TempDir::new("ncps-data"), args, envs, nofile)
    }

    /// As [`Ncps::start`], on a data directory prepared beforehand (a Go ncps cache, say).
    pub fn start_on(data: TempDir, extra: &[&str]) -> Ncps {
        Ncps::start_in(data, Ncps::args_for(HOSTNAME, extra), Vec::new(), None)
    }

    fn start_in(data: TempDir, args: Vec<String>, envs: Vec<(String, String)>, nofile: Option<u64>) -> Ncps {
        let mut n = Ncps {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            data,
            args,
            envs,
            nofile,
        };
        // A freshly chosen port can be taken by someone else before ncps
        // binds it: retry with another port in that case only.
        for attempt in 0..3 {
            match n.spawn_and_wait() {
                Ok(()) => return n,
                Err(e) if attempt < 2 && e.contains("in use") => {
                    n.addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Beside the data path, not in it: ncps finds its data path as it left it (a new one
    /// empty, as a new volume would be).
    pub fn log_path(&self) -> PathBuf {
        self.data.path().with_extension("log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// GET /pubkey, trimmed.
    pub fn pubkey(&self) -> String {
        let r = http_get(&format!("{}/pubkey", self.url()))
            .unwrap_or_else(|e| panic!("GET /pubkey: {e}\n{}", self.log()));
        assert_eq!(r.status, 200, "GET /pubkey status");
        r.text().trim().to_string()
    }

    pub fn get(&self, path: &str) -> Response {
        http_get(&format!("{}{path}", self.url())).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn head(&self, path: &str) -> Response {
        http_head(&format!("{}{path}", self.url())).unwrap_or_else(|e| panic!("HEAD {path}: {e}"))
    }

    /// SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        self.stop_with_signal(libc::SIGTERM);
    }

    /// Sends `signal`, waits up to 5 s for ncps to exit (then SIGKILLs it), and returns how
    /// it exited and how long that took; None if it was not running.
    pub fn stop_with_signal(&mut self, signal: i32) -> Option<(ExitStatus, Duration)> {
        let mut c = self.child.take()?;
        let sent = Instant::now();
        // SAFETY: kill(2) on the pid of a child we have not reaped yet (so not reused).
        unsafe {
            libc::kill(c.id() as libc::pid_t, signal);
        }
        let deadline = sent + Duration::from_secs(5);
        loop {
            match c.try_wait() {
                Ok(Some(st)) => return Some((st, sent.elapsed())),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = c.kill();
                    let st = c.wait().ok()?;
                    return Some((st, sent.elapsed()));
                }
            }
        }
    }

    /// SIGKILL, no chance to clean up (as a power cut or the OOM killer would).
    /// `restart()` afterwards starts it again on the same data dir and port.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process is still running (it may have exited on its own).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Files under DATA/store/nar (any depth).
    pub fn stored_nar_files(&self) -> Vec<PathBuf> {
        files_under(&self.data.join("store/nar"))
    }

    /// The stored NAR files once there are `n` of them, or after 10 s whatever there is: a
    /// verified download reaches its clients just before its file is moved into the store.
    pub fn wait_for_stored_nars(&self, n: usize) -> Vec<PathBuf> {
        wait_until(Duration::from_secs(10), || self.stored_nar_files().len() == n);
        self.stored_nar_files()
    }

    /// Files under DATA/store/narinfo (any depth).
    pub fn stored_narinfo_files(&self) -> Vec<PathBuf> {
        files_under(&self.data.join("store/narinfo"))
    }

    /// `*.ncps-partial` files anywhere under the data dir.
    pub fn partial_files(&self) -> Vec<PathBuf> {
        files_under(self.data.path())
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".ncps-partial"))
            .collect()
    }

    /// The log written since byte `offset` (see `log_len`).
    pub fn log_since(&self, offset: usize) -> String {
        let log = self.log();
        log.get(offset..).unwrap_or("").to_string()
    }

    pub fn log_len(&self) -> usize {
        self.log().len()
    }

    /// Stops and starts again with the same data dir, args and port.
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("{e}");
        }
    }

    /// As [`Ncps::restart`], but a start that fails (ncps exits, or never answers) is
    /// returned, with ncps's log since the start, instead of failing the test.
    pub fn try_restart(&mut self) -> Result<(), String> {
        self.stop();
        self.spawn_and_wait()
    }

    /// Stops, sets `flag` to `value` (or drops it: `None`) in the args, and starts again
    /// with the same data dir, other args and port.
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    pub fn restart_with_flag(&mut self, flag: &str, value: Option<&str>) {
        self.restart_with_flag_values(flag, value.into_iter().map(str::to_string));
    }

    /// Stops, replaces every `--upstream-cache` with `upstreams` (in that order), and starts
    /// again with the same data dir, other args and port: an operator editing the list.
    pub fn restart_with_upstreams(&mut self, upstreams: &[String]) {
        self.restart_with_flag_values("--upstream-cache", upstreams.iter().cloned());
    }

    /// Stops, drops every `flag` (and its value) from the args, gives it once for each of
    /// `values` at the end, and starts again with the same data dir, other args and port.
    fn restart_with_flag_values(&mut self, flag: &str, values: impl Iterator<Item = String>) {
        let mut args = Vec::new();
        let mut old = std::mem::take(&mut self.args).into_iter();
        while let Some(a) = old.next() {
            if a == flag {
                old.next();
            } else {
                args.push(a);
            }
        }
        for v in values {
            args.extend([flag.to_string(), v]);
        }
        self.args = args;
        self.restart();
    }

    /// Whether the status JSON says some upstream is marked down.
    pub fn some_upstream_down(&self) -> bool {
        self.get("/").text().contains(r#""state":"down""#)
    }

    /// Waits until no upstream is marked down (a probe brought it back); panics after
    /// `timeout`. For tests that heal an upstream and then expect it to be used.
    pub fn wait_for_upstreams_up(&self, timeout: Duration) {
        let up = wait_until(timeout, || !self.some_upstream_down());
        assert!(up, "an upstream is still marked down after {timeout:?}:\n{}", self.get("/").text());
    }

    /// The log since `offset`, once a line containing `needle` is in it (panics after
    /// `timeout`): for what ncps does in the background after start, such as the store check.
    pub fn wait_for_log(&self, offset: usize, needle: &str, timeout: Duration) -> String {
        let found = wait_until(timeout, || self.log_since(offset).contains(needle));
        let log = self.log_since(offset);
        assert!(found, "no {needle:?} in the log within {timeout:?}:\n{log}");
        log
    }

    fn subst(&self, s: &str) -> String {
        s.replace("{addr}", &self.addr.to_string())
            .replace("{data}", &self.data.path().to_string_lossy())
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open ncps log");
        let bin = ncps_bin();
        let mut cmd = ncps_command();
        cmd.args(self.args.iter().map(|a| self.subst(a)));
        for (k, v) in &self.envs {
            cmd.env(k, self.subst(v));
        }
        let log_offset = fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
            // SAFETY: runs in the forked child before exec; setrlimit is async-signal-safe and
            // `lim` is a plain value copied into the closure.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|e| format!("spawn {bin}: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let url = format!("{}/nix-cache-info", self.url());
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                let log = self.log();
                let new = log.get(log_offset as usize..).unwrap_or(&log).to_string();
                let args: Vec<String> = self.args.iter().map(|a| self.subst(a)).collect();
                return Err(format!(
                    "ncps exited ({st}) before answering /nix-cache-info; args {args:?}; log:\n{new}"
                ));
            }
            if let Ok(r) = http_get(&url) {
                // 401: it answers, and wants the --cache-get-token the test gave it.
                if r.status == 200 || r.status == 401 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "ncps did not answer GET /nix-cache-info with 200 within 10 s; log:\n{}",
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Ncps {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(150)..];
            eprintln!(
                "----- ncps log ({}; last {} lines) -----\n{}\n----- end of ncps log -----",
                self.log_path().display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// Runs ncps expecting a configuration error. Returns the exit status and
/// stderr. The listen address is a port this helper holds, so an ncps that
/// binds before validating fails with an address error instead.
pub fn run_ncps_expecting_failure(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let mut cmd = ncps_command();
    cmd.args(args.iter().map(|a| a.replace("{addr}", &addr)));
    for (k, v) in envs {
        cmd.env(k, v.replace("{addr}", &addr));
    }
    let out = run_with_timeout(cmd, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("ncps did not exit on bad configuration: {e}"));
    drop(holder);
    (out.status.code(), out.stderr)
}

/// ncps's narinfo for `store_path`: the NAR URL path (`/nar/...`) it points at, and its
/// FileSize.
pub fn ncps_nar_path(ncps: &Ncps, store_path: &str) -> (String, u64) {
    ncps_nar_path_with(ncps, store_path, &[])
}

/// As [`ncps_nar_path`], asking with `headers` (a token).
pub fn ncps_nar_path_with(ncps: &Ncps, store_path: &str, headers: &[(&str, &str)]) -> (String, u64) {
    let url = format!("{}/{}.narinfo", ncps.url(), store_hash(store_path));
    let r = http_request_with("GET", &url, headers).unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(r.status, 200, "narinfo of {store_path} through ncps");
    let ni = NarInfo::parse(&r.text());
    let url = ni.get("URL").expect("URL in served narinfo").to_string();
    let size = ni
        .get("FileSize")
        .expect("FileSize in served narinfo")
        .parse()
        .unwrap();
    (format!("/{url}"), size)
}

/// An ncps in front of an empty, healthy upstream (no Nix needed), with `extra` flags.
/// The upstream says `Priority: 50`, so that ncps's own answer (40) can be told from it.
pub fn ncps_with_empty_upstream(extra: &[&str]) -> (TempDir, Upstream, Ncps) {
    let dir = TempDir::new("empty-upstream");
    fs::write(
        dir.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 50\n",
    )
    .unwrap();
    let up = Upstream::serve_dir(dir.path());
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[SOME_VALID_PUBLIC_KEY], extra);
    (dir, up, ncps)
}

/// The value of an unlabelled sample in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// ncps's `/metrics` page (`--prometheus-enabled`).
pub fn metrics(ncps: &Ncps) -> String {
    ncps.get("/metrics").text()
}
