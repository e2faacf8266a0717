//! A throwaway PostgreSQL server for tests: a real one, never a mock, because what the
//! PostgreSQL index must get right (triggers, transactions, reconnecting after a restart) is
//! the server's behaviour.
//!
//! [`Cluster::start`] runs `initdb` in a fresh directory under the system temp dir and starts
//! the server with `pg_ctl` on a free loopback port, its socket in that directory; TCP logins
//! need a password (SCRAM, so the URL's password is really used), the socket trusts. As root,
//! both run as `nobody` (PostgreSQL refuses to run as root). Dropping the cluster stops it
//! and removes its directory. [`shared`] is one cluster for a whole test process, stopped at
//! exit; each test makes its own database there ([`Cluster::create_database`]), so tests run
//! in parallel. A test that stops or restarts the server starts its own cluster.
//!
//! [`Cluster::start_tls`] starts one with `ssl=on` and a certificate made for the test with
//! the `openssl` command line (installed with `make test`'s APT packages): a CA of its own
//! ([`Cluster::ca_file`]) signs a server certificate for `localhost` and `127.0.0.1`, and a
//! second CA that signed nothing ([`Cluster::other_ca_file`]) is there to be the wrong one.
//! Both are EC P-256 and valid for two days. [`shared_tls`] is the shared one of those.
//!
//! The binaries come from `NCPS_TEST_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`
//! (Debian's `postgresql` package, which `make test` installs).
//!
//! The e2e suite includes this file too (`#[path]`), so it uses only std and libc.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The role and password of every test cluster.
pub const USER: &str = "ncps";
pub const PASSWORD: &str = "pg-test-secret-5d1e";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    /// uid and gid to run the server as (when this process is root).
    as_user: Option<(u32, u32)>,
    /// Whether the server was given a certificate and `ssl=on`.
    tls: bool,
}

/// The `openssl` configuration of a test CA and of the server certificate it signs.
const OPENSSL_CNF: &str = "[req]\nprompt = no\ndistinguished_name = dn\n[dn]\nCN = ncps test\n\
    [ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n\
    subjectKeyIdentifier = hash\n\
    [server]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n\
    extendedKeyUsage = serverAuth\nsubjectAltName = DNS:localhost, IP:127.0.0.1\n\
    authorityKeyIdentifier = keyid\n\
    [client]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n\
    extendedKeyUsage = clientAuth\nauthorityKeyIdentifier = keyid\n";

/// The role that logs in with a client certificate (its CN) on a TLS cluster, and only so.
pub const CERT_USER: &str = "ncps_cert";

fn openssl(dir: &std::path::Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl").current_dir(dir).args(args).stdin(Stdio::null()).output();
    succeeded(&format!("openssl {}", args.join(" ")), out)
        .map_err(|e| format!("{e}\n(the TLS tests make their certificates with the openssl command: apt-get install openssl)"))
}

/// `openssl req` arguments for a new, unencrypted P-256 key.
const EC_KEY: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

/// Makes `ca.pem` (with `ca.key`), `other-ca.pem`, and `server.pem` / `server.key` and
/// `client.pem` / `client.key` (for [`CERT_USER`]) signed by the first, in `dir`.
fn make_certificates(dir: &std::path::Path) -> Result<(), String> {
    fs::write(dir.join("openssl.cnf"), OPENSSL_CNF).map_err(|e| e.to_string())?;
    for ca in ["ca", "other-ca"] {
        let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
        let mut args = vec!["req", "-x509", "-config", "openssl.cnf", "-extensions", "ca", "-days", "2"];
        args.extend(EC_KEY);
        args.extend(["-subj", if ca == "ca" { "/CN=ncps test CA" } else { "/CN=ncps test other CA" }]);
        args.extend(["-keyout", &key, "-out", &pem]);
        openssl(dir, &args)?;
    }
    signed_by_ca(dir, "server", "/CN=localhost", "2")?;
    signed_by_ca(dir, "client", &format!("/CN={CERT_USER}"), "3")?;
    // PostgreSQL refuses a key that others may read.
    fs::set_permissions(dir.join("server.key"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).map_err(|e| e.to_string())
}

/// Makes `<name>.key` and `<name>.pem` for `subject`, signed by `ca.pem` with serial `serial`
/// and the extensions of section `[name]` of `openssl.cnf`.
fn signed_by_ca(dir: &std::path::Path, name: &str, subject: &str, serial: &str) -> Result<(), String> {
    let (key, csr, pem) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"));
    let mut args = vec!["req", "-new", "-config", "openssl.cnf", "-subj", subject];
    args.extend(EC_KEY);
    args.extend(["-keyout", &key, "-out", &csr]);
    openssl(dir, &args)?;
    openssl(
        dir,
        &[
            "x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", serial, "-days", "2",
            "-extfile", "openssl.cnf", "-extensions", name, "-out", &pem,
        ],
    )
}

/// The directory of `initdb` and `pg_ctl`.
fn bin_dir() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("NCPS_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: apt-get install postgresql \
         (make test does), or set NCPS_TEST_PG_BIN"
            .to_string()
    })
}

/// `nobody`'s uid and gid, from /etc/passwd.
fn nobody() -> Result<(u32, u32), String> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == "nobody").then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
        .ok_or_else(|| "no user nobody in /etc/passwd to run PostgreSQL as".to_string())
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

fn succeeded(what: &str, out: std::io::Result<Output>) -> Result<(), String> {
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{what}: {}\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

impl Cluster {
    /// initdb and start a new cluster.
    pub fn start() -> Result<Cluster, String> {
        Cluster::start_with(false)
    }

    /// initdb and start a new cluster with `ssl=on` and a certificate for `localhost` and
    /// `127.0.0.1` signed by [`Cluster::ca_file`].
    pub fn start_tls() -> Result<Cluster, String> {
        Cluster::start_with(true)
    }

    /// The CA that signed the server's certificate (a cluster from [`Cluster::start_tls`]).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A CA that signed nothing the server has.
    pub fn other_ca_file(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }

    /// The certificate and key [`CERT_USER`] logs in with (a cluster from [`Cluster::start_tls`]).
    #[allow(dead_code)]
    pub fn client_cert_files(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("client.pem"), self.dir.join("client.key"))
    }

    /// Gives the database of `url` to [`CERT_USER`], and returns the URL it logs in with: no
    /// password, `verify-full`, and its certificate.
    #[allow(dead_code)]
    pub fn cert_url(&self, url: &str) -> Result<String, String> {
        let name = url.rsplit('/').next().unwrap_or_default();
        self.psql(url, &format!("ALTER DATABASE {name} OWNER TO {CERT_USER}"))?;
        let (cert, key) = self.client_cert_files();
        Ok(format!(
            "postgresql://{CERT_USER}@127.0.0.1:{}/{name}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
            self.port,
            self.ca_file().display(),
            cert.display(),
            key.display()
        ))
    }

    fn start_with(tls: bool) -> Result<Cluster, String> {
        let bin = bin_dir()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let as_user = if root { Some(nobody()?) } else { None };
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        // Short: the socket path (DIR/.s.PGSQL.PORT) must fit in 107 bytes.
        let dir = std::env::temp_dir().join(format!("ncps-pg-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("data")).map_err(|e| format!("{}: {e}", dir.display()))?;
        let pwfile = dir.join("pw");
        fs::write(&pwfile, PASSWORD).map_err(|e| e.to_string())?;
        if tls {
            make_certificates(&dir)?;
        }
        if let Some((uid, gid)) = as_user {
            let mut owned = vec![dir.clone(), dir.join("data"), pwfile.clone()];
            if tls {
                owned.extend(["server.pem", "server.key"].map(|f| dir.join(f)));
            }
            for p in &owned {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", p.display()))?;
            }
        }
        let cluster = Cluster { dir, bin, port: free_port()?, as_user, tls };
        let data = cluster.data_dir();
        let out = cluster
            .command("initdb")
            .args(["-D", &data, "-U", USER, "--pwfile"])
            .arg(&pwfile)
            .args(["--auth-local=trust", "--auth-host=scram-sha-256", "--no-locale", "--encoding=UTF8", "--no-sync"])
            .output();
        succeeded("initdb", out)?;
        if tls {
            // The certificate's user logs in by its certificate alone, over TLS; every other
            // line initdb wrote stays as it was.
            let hba = cluster.dir.join("data").join("pg_hba.conf");
            let old = fs::read_to_string(&hba).map_err(|e| format!("{}: {e}", hba.display()))?;
            fs::write(&hba, format!("hostssl all {CERT_USER} 127.0.0.1/32 cert\n{old}")).map_err(|e| e.to_string())?;
        }
        cluster.start_server()?;
        if tls {
            cluster.psql(&cluster.url("postgres"), &format!("CREATE ROLE {CERT_USER} LOGIN"))?;
        }
        Ok(cluster)
    }

    fn data_dir(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.stdin(Stdio::null()).env("LC_ALL", "C").env_remove("PGPASSWORD").env_remove("PGSERVICE");
        if let Some((uid, gid)) = self.as_user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Starts the server (again, after [`Cluster::stop`]), waiting until it accepts logins.
    pub fn start_server(&self) -> Result<(), String> {
        let mut opts = format!(
            "-k {} -p {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off \
             -c synchronous_commit=off -c max_connections=200",
            self.dir.display(),
            self.port
        );
        if self.tls {
            let (cert, key) = (self.dir.join("server.pem"), self.dir.join("server.key"));
            opts += &format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c ssl_ca_file={}",
                cert.display(),
                key.display(),
                self.ca_file().display()
            );
        }
        let log = self.dir.join("server.log");
        let out = self
            .command("pg_ctl")
            .args(["-D", &self.data_dir(), "-o", &opts, "-l"])
            .arg(&log)
            .args(["-w", "-t", "30", "start"])
            .output();
        succeeded("pg_ctl start", out).map_err(|e| format!("{e}\nserver log:\n{}", self.log()))
    }

    /// Stops the server: `fast` closes every connection, as an operator's restart does.
    pub fn stop(&self) -> Result<(), String> {
        let out = self.command("pg_ctl").args(["-D", &self.data_dir(), "-m", "fast", "-w", "stop"]).output();
        succeeded("pg_ctl stop", out)
    }

    /// Stops and starts the server on the same port and data.
    pub fn restart(&self) -> Result<(), String> {
        self.stop()?;
        self.start_server()
    }

    /// Stops every process of the server (SIGSTOP to the postmaster and its children):
    /// connections stay open and nothing answers, as from a database host that hangs.
    /// [`Cluster::resume`] undoes it. (Used by the e2e suite, not by the unit tests.)
    #[allow(dead_code)]
    pub fn pause(&self) {
        self.signal_all(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal_all(libc::SIGCONT);
    }

    /// Sends `signal` to the postmaster (the first line of `postmaster.pid`) and to every
    /// process whose parent it is.
    fn signal_all(&self, signal: libc::c_int) {
        let pid_file = fs::read_to_string(self.dir.join("data").join("postmaster.pid")).unwrap_or_default();
        let Some(postmaster) = pid_file.lines().next().and_then(|l| l.trim().parse::<i32>().ok()) else { return };
        let mut pids = vec![postmaster];
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let stat = fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // `pid (comm) state ppid ...`; comm may hold spaces, so read after the last ')'.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid read just now from the server's own pid file or from
            // /proc (its children); at worst a pid that has just exited, which kill reports.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Makes a new, empty database and returns its URL (with the password).
    pub fn create_database(&self, label: &str) -> Result<String, String> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{label}_{n}");
        let socket_dir = self.dir.to_string_lossy().into_owned();
        let port = self.port.to_string();
        let out = self.command("createdb").args(["-h", &socket_dir, "-p", &port, "-U", USER, &name]).output();
        succeeded("createdb", out)?;
        Ok(self.url(&name))
    }

    /// Runs `sql` with psql in the database of `url` (one [`Cluster::create_database`] made)
    /// and returns what it printed, unaligned, one row a line.
    pub fn psql(&self, url: &str, sql: &str) -> Result<String, String> {
        let name = url.rsplit('/').next().unwrap_or_default();
        let socket_dir = self.dir.to_string_lossy().into_owned();
        let port = self.port.to_string();
        let out = self
            .command("psql")
            .args(["-h", &socket_dir, "-p", &port, "-U", USER, "-d", name, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output();
        match out {
            Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
            other => succeeded("psql", other).map(|_| String::new()),
        }
    }

    /// `postgresql://ncps:PASSWORD@127.0.0.1:PORT/name`.
    pub fn url(&self, database: &str) -> String {
        format!("postgresql://{USER}:{PASSWORD}@127.0.0.1:{}/{database}", self.port)
    }

    fn stop_and_remove(&self) {
        // A test that failed while the server was paused must not leave pg_ctl waiting on it.
        self.resume();
        let out = self.command("pg_ctl").args(["-D", &self.data_dir(), "-m", "immediate", "-w", "stop"]).output();
        drop(out);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_and_remove();
    }
}

static SHARED: OnceLock<Result<Cluster, String>> = OnceLock::new();
static SHARED_TLS: OnceLock<Result<Cluster, String>> = OnceLock::new();

extern "C" fn stop_shared() {
    for shared in [&SHARED, &SHARED_TLS] {
        if let Some(Ok(c)) = shared.get() {
            c.stop_and_remove();
        }
    }
}

/// One cluster for the whole test process, started on first use and stopped at exit.
/// Panics (failing the test) when PostgreSQL cannot be started.
pub fn shared() -> &'static Cluster {
    shared_in(&SHARED, Cluster::start)
}

/// One cluster with TLS ([`Cluster::start_tls`]) for the whole test process, as [`shared`].
pub fn shared_tls() -> &'static Cluster {
    shared_in(&SHARED_TLS, Cluster::start_tls)
}

fn shared_in(shared: &'static OnceLock<Result<Cluster, String>>, start: fn() -> Result<Cluster, String>) -> &'static Cluster {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    let cluster = shared.get_or_init(|| {
        let c = start();
        if c.is_ok() {
            // SAFETY: `stop_shared` is an `extern "C" fn()` that lives for the whole program;
            // it runs a child process and removes a directory, and unwinds from nothing it
            // calls (a failed stop is ignored). atexit merely records it, once for both.
            AT_EXIT.call_once(|| unsafe {
                libc::atexit(stop_shared);
            });
        }
        c
    });
    match cluster {
        Ok(c) => c,
        Err(e) => panic!("cannot start a PostgreSQL server for the tests: {e}"),
    }
}
