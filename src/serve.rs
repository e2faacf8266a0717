//! `ncps serve`: start-up in the order that makes failures clear, then the server.
//!
//! Everything that can be wrong with the configuration or the data directory is found before
//! the port is bound, and reported as one line naming the flag, with exit status 2.

use crate::cache::{Cache, CacheSettings, Parts};
use crate::config::{parse_listen_addr, Config, ConfigError, Database};
use crate::http::{self, ServerConfig};
use crate::index::{Index, IndexError, SqliteIndex};
use crate::nix::SecretKey;
use crate::routes::{RouteSettings, Routes};
use crate::storage::{BlobStore, LocalStore, Staging};
use crate::upstream::{UpstreamSettings, Upstreams};
use std::fmt;
use std::net::{TcpListener, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Why `serve` stopped: a message and the exit status.
#[derive(Debug)]
pub struct Exit {
    pub code: i32,
    pub message: String,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<ConfigError> for Exit {
    fn from(e: ConfigError) -> Self {
        Exit { code: 2, message: e.to_string() }
    }
}

fn runtime(message: String) -> Exit {
    Exit { code: 1, message }
}

/// Everything prepared and checked, ready to accept connections.
pub struct Prepared {
    pub listener: TcpListener,
    pub cache: Arc<Cache>,
    pub server: ServerConfig,
    /// The zone of `--cache-lru-schedule`.
    pub lru_zone: crate::tz::Zone,
}

/// The blob store: the bucket of `--cache-storage-s3-bucket` (checked to answer now, with
/// these credentials), else files under the data path.
fn open_blobs(config: &Config) -> Result<Arc<dyn BlobStore>, Exit> {
    if let Some(s3) = &config.s3 {
        return open_s3(s3, &config.data_path, &config.database);
    }
    let local = LocalStore::open(&config.data_path)
        .map_err(|e| ConfigError::new("cache-data-path", format!("not writable: {e}")))?;
    Ok(Arc::new(local))
}

#[cfg(feature = "s3")]
fn open_s3(
    s3: &crate::config::S3Config,
    data_path: &std::path::Path,
    database: &Database,
) -> Result<Arc<dyn BlobStore>, Exit> {
    use crate::storage::s3::{S3Settings, S3Store};
    let settings = S3Settings::from_config(s3);
    let store = S3Store::open(&settings).map_err(|e| runtime(format!("--cache-storage-s3-bucket: {e}")))?;
    let owner = s3_owner(data_path, database).map_err(runtime)?;
    match store.claim(&owner) {
        Ok(None) => {}
        Ok(Some(other)) => {
            return Err(ConfigError::new(
                "cache-storage-s3-bucket",
                format!(
                    "{} is used by another ncps ({}): one ncps per bucket, since each keeps its own index \
                     and would remove the other's entries; if that ncps is gone for good, delete the \
                     object {} and start again",
                    store.describe(),
                    other.split_whitespace().collect::<Vec<_>>().join(" "),
                    crate::storage::s3::OWNER_KEY
                ),
            )
            .into())
        }
        Err(e) => return Err(runtime(format!("--cache-storage-s3-bucket: {e}"))),
    }
    log::info!("blobs in {} (the index, key and downloads in progress stay under the data path)", store.describe());
    Ok(Arc::new(store))
}

/// Who this ncps is, for the bucket's owner object: with a PostgreSQL index, that database
/// (replicas sharing it share the bucket too: the index vouches for every replica's objects);
/// else an id made once and kept in the data path (`s3-owner-id`). Then the host and data
/// path, for the message another ncps prints.
#[cfg(feature = "s3")]
fn s3_owner(data_path: &std::path::Path, database: &Database) -> Result<String, String> {
    use std::io::Read;
    if let Some(owner) = s3_owner_if_known(data_path, database) {
        return Ok(owner);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let file = data_path.join("s3-owner-id");
    let id = match std::fs::read_to_string(&file) {
        Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
        _ => {
            let mut bytes = [0u8; 16];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut bytes))
                .map_err(|e| format!("reading /dev/urandom: {e}"))?;
            let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(&file, format!("{id}\n")).map_err(|e| format!("writing {}: {e}", file.display()))?;
            id
        }
    };
    Ok(format!("{id}\nhost {}\ndata path {}\n", host.trim(), data_path.display()))
}

/// The owner text of [`s3_owner`] if this ncps already has one (always with PostgreSQL; with
/// SQLite once `s3-owner-id` was made), without making one: what `ncps fsck` compares the
/// bucket's owner with.
#[cfg(feature = "s3")]
pub fn s3_owner_if_known(data_path: &std::path::Path, database: &Database) -> Option<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if let Database::Postgres(url) = database {
        // Without the credentials: host, port and database name say which index it is.
        let shown = crate::url::redact_url(url);
        let rest = shown.split_once("://").map_or(shown.as_str(), |(_, r)| r);
        let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
        let rest = rest.split('?').next().unwrap_or(rest);
        return Some(format!("index postgresql://{rest}\nhost {} (one of its replicas)\n", host.trim()));
    }
    match std::fs::read_to_string(data_path.join("s3-owner-id")) {
        Ok(id) if !id.trim().is_empty() => {
            Some(format!("{}\nhost {}\ndata path {}\n", id.trim(), host.trim(), data_path.display()))
        }
        _ => None,
    }
}

/// Never reached: the configuration refuses a bucket in a build without the `s3` feature.
#[cfg(not(feature = "s3"))]
fn open_s3(_: &crate::config::S3Config, _: &std::path::Path, _: &Database) -> Result<Arc<dyn BlobStore>, Exit> {
    Err(ConfigError::new("cache-storage-s3-bucket", "this ncps was built without S3 support (`--features s3`)").into())
}

/// The store check removes blobs the index does not vouch for: with no index at all, that
/// would be every blob. Nothing here may cost a user their cache.
fn refuse_missing_index(database: &str, blobs: &dyn BlobStore) -> ConfigError {
    ConfigError::new(
        "cache-database-url",
        format!(
            "{database} does not exist, but {} already holds cached files (a cache made by Go ncps, \
             or one whose database was removed); ncps-rs will not delete them: move that \
             folder away (or give another --cache-data-path) to start with an empty cache",
            blobs.describe()
        ),
    )
}

/// Opens the index `--cache-database-url` names (for SQLite, the one beside a Go ncps
/// database being switched from).
fn open_index(
    config: &Config,
    go: Option<&crate::migrate_go::GoCache>,
    blobs: &dyn BlobStore,
) -> Result<Arc<dyn Index>, Exit> {
    let database_path = match &config.database {
        Database::Sqlite(p) => p,
        Database::Postgres(url) => return open_postgres(url, blobs),
    };
    let path = match go {
        Some(g) => crate::migrate_go::index_path(&g.database),
        None => database_path.clone(),
    };
    let db_exists = go.is_some() || std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
    if !db_exists && blobs.holds_anything().unwrap_or(true) {
        return Err(refuse_missing_index(&database_path.display().to_string(), blobs).into());
    }
    let index = SqliteIndex::open(&path).map_err(|e| match e {
        IndexError::Foreign(_) => ConfigError::new("cache-database-url", format!("{}: {e}", path.display())).into(),
        e => runtime(format!("database {}: {e}", path.display())),
    })?;
    Ok(Arc::new(index))
}

#[cfg(feature = "postgres")]
fn open_postgres(url: &str, blobs: &dyn BlobStore) -> Result<Arc<dyn Index>, Exit> {
    let shown = crate::url::redact_url(url);
    // An empty database next to a store that holds files: as with a missing SQLite file, the
    // schema is not created, or the next start would take the store for orphans.
    let may_create = !blobs.holds_anything().unwrap_or(true);
    let index = crate::index::PostgresIndex::open(url, may_create).map_err(|e| match e {
        IndexError::NotCreated { .. } => refuse_missing_index(&format!("the ncps schema in {shown}"), blobs).into(),
        IndexError::Foreign(_) => ConfigError::new("cache-database-url", format!("{shown}: {e}")).into(),
        IndexError::BadUrl { source, .. } => ConfigError::new("cache-database-url", format!("{shown}: {source}")).into(),
        // It names the database (without the password) itself.
        e @ IndexError::Unreachable { .. } => runtime(e.to_string()),
        e => runtime(format!("database {shown}: {e}")),
    })?;
    log::info!("index: PostgreSQL {shown}");
    Ok(Arc::new(index))
}

#[cfg(not(feature = "postgres"))]
fn open_postgres(url: &str, _: &dyn BlobStore) -> Result<Arc<dyn Index>, Exit> {
    // The configuration refuses such a URL in this build; this is a second line of defence.
    Err(ConfigError::new(
        "cache-database-url",
        format!("{}: this ncps was built without PostgreSQL support (--features postgres)", crate::url::redact_url(url)),
    )
    .into())
}

/// Whether `path` holds nothing ncps (or anyone) put there: absent, or an empty directory but
/// for the `lost+found` of a file system mounted there (a fresh volume) and ncps's lock file. Anything unreadable
/// counts as used: the start-up check then runs, which is the safe side.
fn is_new_data_path(path: &Path) -> bool {
    match std::fs::read_dir(path) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        // The lock file alone is what a start refused before it changed anything leaves.
        Ok(entries) => entries
            .into_iter()
            .all(|e| e.is_ok_and(|e| e.file_name() == "lost+found" || e.file_name() == crate::data_lock::NAME)),
    }
}

pub fn prepare(config: &Config) -> Result<Prepared, Exit> {
    // Files named by flags are read before anything is created or changed.
    let upstream_auth = upstream_credentials(config)?;
    let lru_zone = crate::tz::Zone::load(&config.lru_timezone)
        .map_err(|e| ConfigError::new("cache-lru-schedule-timezone", e.to_string()))?;
    let new_data_path = is_new_data_path(&config.data_path);
    std::fs::create_dir_all(&config.data_path).map_err(|e| {
        ConfigError::new("cache-data-path", format!("cannot create {}: {e}", config.data_path.display()))
    })?;
    // Before anything in the data path is changed: not while `fsck --repair` runs there. Held
    // (shared) for the process's life by the cache, which asks it who else serves here.
    let data_lock = match crate::data_lock::take(&config.data_path, crate::data_lock::Mode::Serving) {
        Ok(lock) => Some(lock),
        Err(e @ crate::data_lock::LockError::Held { .. }) => {
            return Err(runtime(format!(
                "ncps fsck --repair is running on {} ({e}); start ncps when it is done",
                config.data_path.display()
            )))
        }
        // Not having the lock costs only its protection: with S3 and PostgreSQL a data path
        // that cannot be written served before locks existed, and still does.
        Err(e) => {
            log::warn!("{e}: going on without it, so `ncps fsck --repair` is not kept from running beside this ncps");
            None
        }
    };
    // A Go ncps cache is switched in place (migrate_go): its store is moved aside before ours
    // is opened, its database is left as it is and ours lives beside it. Only SQLite: Go ncps
    // on PostgreSQL is not imported.
    let go = match &config.database {
        Database::Sqlite(path) => crate::migrate_go::prepare(path, &config.data_path).map_err(runtime)?,
        Database::Postgres(_) => None,
    };
    let blobs = open_blobs(config)?;
    let staging = Staging::open(&config.temp_path).map_err(|e| {
        let flag = if config.temp_path.starts_with(&config.data_path) { "cache-data-path" } else { "cache-temp-path" };
        ConfigError::new(flag, format!("not writable: {e}"))
    })?;
    let index = open_index(config, go.as_ref(), &*blobs)?;
    let mut go_public = None;
    if let Some(text) = go.as_ref().and_then(|g| g.secret_key.as_deref()) {
        let ours = config.data_path.join("secret-key");
        match SecretKey::parse(text) {
            Ok(k) => {
                go_public = Some(k.public());
                if config.secret_key_path.is_none() && !ours.exists() {
                    write_private(&ours, k.to_file_text().as_bytes())
                        .map_err(|e| runtime(format!("storing Go ncps's key in {}: {e}", ours.display())))?;
                    log::info!("go import: Go ncps's signing key {} is this cache's key now", k.name());
                }
            }
            Err(e) => log::warn!("go import: Go ncps's stored key does not parse ({e}); not imported"),
        }
    }
    let key = load_key(config)?;

    let listener = bind(&config.server_addr)?;
    let max_connections = raise_fd_limit(config.workers + config.upstream_workers);
    let upstreams = Upstreams::new(UpstreamSettings {
        auth: upstream_auth,
        list: config.upstreams.clone(),
        dial_timeout: config.dial_timeout,
        header_timeout: config.response_header_timeout,
        body_idle_timeout: config.body_idle_timeout,
        deadlines: config.upstream_deadlines,
    });
    let settings = CacheSettings {
        trusted_keys: config.upstream_keys.clone(),
        sign: config.sign_narinfo,
        negative_ttl: config.negative_ttl,
        stall_limit: config.body_idle_timeout * 2,
        deadlines: config.upstream_deadlines,
        max_downloads: config.workers.max(4),
        max_size: config.max_size,
        clean_marker: config.data_path.join("clean-shutdown"),
        new_data_path,
        peers: crate::data_lock::Peers::new(data_lock),
        uploads: crate::cache::trust::UploadPolicy {
            trusted_keys: config.access.trusted_upload_keys.clone(),
            require_trusted_signature: config.access.require_trusted_signature,
            may_shadow: config.access.upload_may_shadow,
        },
        zstd_responses: config.zstd_responses,
        advertise: config.advertise.clone(),
        peer_token: config.access.get_token.clone(),
    };
    let parts = Parts { blobs, index, staging };
    let own_public = key.public();
    let cache = Arc::new(Cache::new(settings, parts, upstreams, key));
    if let Some(g) = &go {
        let mut trusted = config.upstream_keys.clone();
        trusted.extend(go_public);
        trusted.push(own_public);
        crate::migrate_go::import(&cache, g, &trusted).map_err(|e| runtime(format!("importing the Go ncps cache: {e}")))?;
    }
    cache.start().map_err(|e| runtime(format!("checking the store at start-up: {e}")))?;

    log::info!("ncps {} listening on {}", env!("CARGO_PKG_VERSION"), describe(&listener));
    for u in &config.upstreams {
        log::info!("upstream {}", u.url);
    }
    log::info!("public key {}", cache.public_key());
    if config.upstream_keys.is_empty() {
        log::warn!(
            "no --upstream-public-key given: upstream narinfos cannot be verified, so they are \
             passed on without this cache's signature (clients must trust the upstream keys)"
        );
    }
    if let Some(max) = config.max_size {
        log::info!("store limit {max} bytes; holding {} now", cache.figures().map(|f| f.size_bytes).unwrap_or(0));
    }
    if !config.sign_narinfo {
        log::info!("--cache-sign-narinfo=false: narinfos are served with upstream signatures only");
    }
    for line in access_summary(config) {
        log::info!("{line}");
    }
    for o in cache.upstream_credential_origins() {
        log::info!("credentials for upstream {o} (from the netrc file or a token file)");
    }
    Ok(Prepared {
        listener,
        cache,
        server: ServerConfig {
            workers: config.workers,
            upstream_workers: config.upstream_workers,
            min_send_rate: crate::http::MinRate::per_sec(config.min_send_rate),
            min_receive_rate: crate::http::MinRate::per_sec(config.min_receive_rate),
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            write_timeout: config.write_timeout,
            max_connections,
        },
        lru_zone,
    })
}

/// Runs ncps until the process is stopped.
///
/// `signals` comes from [`block_stop_signals`], called before any thread was started.
pub fn run(config: &Config, signals: StopSignals) -> Result<(), Exit> {
    let signals = signals.0;
    // Telemetry first, so that start-up (its log lines, the first eviction pass) is in it;
    // the metrics wait for the cache.
    let cache_for_metrics: Arc<std::sync::OnceLock<Arc<Cache>>> = Arc::default();
    if let Some(otel) = config.otel.clone() {
        log::info!("OpenTelemetry: traces, metrics every {:?} and logs as {}", otel.metric_interval, otel.describe());
        let cache = cache_for_metrics.clone();
        let figures = Box::new(move || {
            let cache = cache.get()?;
            cache.figures().ok().map(|store| cache.metrics().render_prometheus(&store))
        });
        crate::otel::export::start(otel, figures).map_err(|e| runtime(format!("starting a thread: {e}")))?;
    }
    let p = prepare(config)?;
    let _ = cache_for_metrics.set(p.cache.clone());
    let cache = p.cache.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = wait_for(&signals);
            log::info!("signal {sig}: recording access times and stopping");
            // Waits for writes in progress, then marks the stop clean. Downloads in flight
            // are dropped: their temp files are removed at the next start, and nothing
            // unverified was ever under a final name.
            cache.stop();
            crate::otel::export::flush(std::time::Duration::from_secs(2));
            crate::logging::flush();
            std::process::exit(0);
        })
        .map_err(|e| runtime(format!("starting a thread: {e}")))?;
    if let Some(schedule) = config.lru_schedule.clone() {
        let (cache, zone) = (p.cache.clone(), p.lru_zone);
        std::thread::Builder::new()
            .name("lru".into())
            .spawn(move || run_schedule(&schedule, &zone, &cache))
            .map_err(|e| runtime(format!("starting a thread: {e}")))?;
    }
    let routes = Arc::new(Routes::new(
        p.cache,
        RouteSettings {
            hostname: config.hostname.clone(),
            allow_put: config.allow_put,
            allow_delete: config.allow_delete,
            prometheus: config.prometheus,
            get_token: config.access.get_token.clone(),
            write_token: config.access.write_token.clone(),
        },
    ));
    http::serve(p.listener, p.server, routes).map_err(|e| runtime(format!("server stopped: {e}")))
}

/// What the start-up log says about who may read and write.
fn access_summary(config: &Config) -> Vec<String> {
    let a = &config.access;
    let mut lines = vec![match a.get_token {
        Some(_) => "reads need --cache-get-token (or the write token); /healthz and /metrics are open".to_string(),
        None => "reads are open to anyone who can reach the port".to_string(),
    }];
    if config.allow_put {
        let who = if a.write_token.is_some() { "with --cache-write-token" } else { "by anyone" };
        let what = if a.require_trusted_signature {
            format!("only narinfos signed by one of {} --cache-trusted-upload-key(s)", a.trusted_upload_keys.len())
        } else if a.trusted_upload_keys.is_empty() {
            "served with the uploader's signatures only (no --cache-trusted-upload-key: this cache signs none)".to_string()
        } else {
            "signed by this cache only if signed by a --cache-trusted-upload-key".to_string()
        };
        let shadow = if a.upload_may_shadow {
            "; they may replace what upstreams serve (--cache-upload-may-shadow-upstream)"
        } else {
            "; never for a path held from or served by an upstream"
        };
        lines.push(format!("uploads (PUT) allowed {who}: {what}{shadow}"));
    } else {
        lines.push("uploads (PUT) are off".to_string());
    }
    lines.push(if config.allow_delete { "DELETE allowed with --cache-write-token" } else { "DELETE is off" }.to_string());
    lines
}

/// The credentials for upstreams: `--upstream-bearer-token-file`s, then the netrc file
/// (`--netrc-file`, else `~/.netrc` if it exists, as Go ncps and curl do).
fn upstream_credentials(config: &Config) -> Result<crate::auth::UpstreamAuth, Exit> {
    use crate::auth::{parse_netrc, Secret, UpstreamAuth};
    let mut bearer = Vec::new();
    for (url, file) in &config.access.bearer_token_files {
        let flag = "upstream-bearer-token-file";
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::new(flag, format!("reading {}: {e}", file.display())))?;
        let token = Secret::new(&text).map_err(|m| ConfigError::new(flag, format!("{}: the token {m}", file.display())))?;
        bearer.push((url.clone(), token));
    }
    let (path, explicit) = match &config.access.netrc_file {
        Some(p) => (Some(p.clone()), true),
        None => (std::env::var_os("HOME").map(|h| Path::new(&h).join(".netrc")), false),
    };
    let mut netrc = Vec::new();
    if let Some(path) = path {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                netrc = parse_netrc(&text).map_err(|e| ConfigError::new("netrc-file", format!("{}: {e}", path.display())))?;
            }
            Err(e) if explicit || e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ConfigError::new("netrc-file", format!("reading {}: {e}", path.display())).into());
            }
            Err(_) => {}
        }
    }
    let urls: Vec<String> = config.upstreams.iter().map(|u| u.url.clone()).collect();
    Ok(UpstreamAuth::new(&urls, &bearer, &netrc))
}

fn run_schedule(schedule: &crate::cron::Schedule, zone: &crate::tz::Zone, cache: &Cache) {
    loop {
        let now = crate::index::now();
        let Some(next) = schedule.next_after(now, zone) else {
            log::warn!("--cache-lru-schedule never fires; scheduled eviction is off");
            return;
        };
        // Sleep in short steps so a clock change does not delay a run by hours.
        while crate::index::now() < next {
            std::thread::sleep(Duration::from_secs(((next - crate::index::now()).clamp(1, 30)) as u64));
        }
        match cache.evict_scheduled() {
            Ok(e) => log::info!("scheduled eviction: {} narinfo(s), {} NAR(s), {} bytes", e.narinfos, e.nars, e.bytes),
            Err(e) => log::error!("scheduled eviction: {e}"),
        }
    }
}

/// SIGTERM and SIGINT, blocked in every thread, so that they wait for the one thread that asks
/// for them (and ncps stops cleanly instead of dying of the default action).
pub struct StopSignals(libc::sigset_t);

/// Blocks the stop signals. Call before any thread exists (the logger's included): threads
/// inherit the mask, and one thread with the signals unblocked would take them and die.
pub fn block_stop_signals() -> StopSignals {
    StopSignals(block_stop_signal_set())
}

fn block_stop_signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; pthread_sigmask
    // only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is an initialised signal set; sigwait writes the signal number to `sig`.
    while unsafe { libc::sigwait(set, &mut sig) } != 0 {}
    sig
}

/// The signing key: the file given, else the one generated on first start and kept in the
/// data path, so that clients that trust it keep trusting it across restarts.
fn load_key(config: &Config) -> Result<SecretKey, Exit> {
    if let Some(path) = &config.secret_key_path {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("cache-secret-key-path", format!("reading {}: {e}", path.display()))
        })?;
        return SecretKey::parse(&text)
            .map_err(|e| ConfigError::new("cache-secret-key-path", format!("{}: {e}", path.display())).into());
    }
    let path = config.data_path.join("secret-key");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = SecretKey::parse(&text).map_err(|e| runtime(format!("{}: {e}", path.display())))?;
            if key.name() != config.hostname {
                log::warn!(
                    "the stored key is named {:?}, not --cache-hostname {:?}; keeping it so clients \
                     that trust it still do (delete {} to make a new one)",
                    key.name(),
                    config.hostname,
                    path.display()
                );
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::generate(&config.hostname).map_err(|e| runtime(e.to_string()))?;
            write_private(&path, key.to_file_text().as_bytes())
                .map_err(|e| runtime(format!("storing a new key in {}: {e}", path.display())))?;
            log::info!("generated a new signing key in {}", path.display());
            Ok(key)
        }
        Err(e) => Err(runtime(format!("reading {}: {e}", path.display()))),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("new");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn bind(addr: &str) -> Result<TcpListener, Exit> {
    let (host, port) = parse_listen_addr(addr).map_err(|m| ConfigError::new("server-addr", m))?;
    let candidates: Vec<String> = if host.is_empty() {
        // Every interface: IPv6 (which also takes IPv4 on Linux by default), else IPv4.
        vec![format!("[::]:{port}"), format!("0.0.0.0:{port}")]
    } else if host.contains(':') {
        vec![format!("[{host}]:{port}")]
    } else {
        vec![format!("{host}:{port}")]
    };
    let mut last = String::new();
    for c in candidates {
        let addrs = match c.to_socket_addrs() {
            Ok(a) => a,
            Err(e) => {
                last = format!("{c}: {e}");
                continue;
            }
        };
        for a in addrs {
            match TcpListener::bind(a) {
                Ok(l) => return Ok(l),
                Err(e) => last = format!("{a}: {e}"),
            }
        }
    }
    Err(runtime(format!("--server-addr: cannot listen on {addr}: {last}")))
}

fn describe(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into())
}

/// Raises the soft descriptor limit to the hard one and returns how many connections fit,
/// keeping room for the files and upstream sockets the workers use.
fn raise_fd_limit(workers: usize) -> usize {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointer to an rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        let fds = lim.rlim_cur.min(1 << 20) as usize;
        return fds.saturating_sub(64 + 3 * workers).clamp(16, 16_384);
    }
    1024
}
