//! Command line and environment: turning what the user typed into a checked [`Config`].
//!
//! The flags and variables are those of the Go ncps, so that a unit file or a container
//! definition written for it works unchanged. Every flag is described once, in [`FLAGS`]; the
//! parser, the environment fallback and `--help` all read that table, so they cannot disagree.
//! Nothing here touches the disk or the network: checks that need them (a writable data path)
//! belong to start-up, which reports them in the same one-line form ([`ConfigError`]).

use crate::duration::parse_duration;
use crate::auth::Secret;
use crate::nix::PublicKey;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// How a flag takes its value.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// `--flag VALUE` or `--flag=VALUE`.
    Value,
    /// Repeatable; the environment variable holds a comma-separated list.
    List,
    /// `--flag` alone means true; `--flag=false` is accepted as Go's flag parser does.
    Bool,
}

/// One flag: its names (the first is canonical, the rest are ncps's older names), the
/// environment variables that set it (in the same order), its keys in the config file (the
/// Go ncps's dotted keys first, then older ones; none for `--config` itself), its default
/// and what it does.
pub struct Flag {
    pub names: &'static [&'static str],
    pub envs: &'static [&'static str],
    pub keys: &'static [&'static str],
    pub kind: Kind,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

macro_rules! flag {
    ($names:expr, $envs:expr, $keys:expr, $kind:ident, $default:expr, $help:expr) => {
        Flag { names: &$names, envs: &$envs, keys: &$keys, kind: Kind::$kind, default: $default, help: $help }
    };
}

/// Every flag of `ncps serve`.
pub const FLAGS: &[Flag] = &[
    flag!(["config"], ["NCPS_CONFIG_FILE"], [], Value, None,
        "Config file (TOML, YAML or JSON, by extension) with the settings under the keys shown \
         as `file:` [default: $XDG_CONFIG_HOME/ncps/config.yaml, if it exists]"),
    flag!(["cache-hostname"], ["CACHE_HOSTNAME"],
        ["cache.hostname"], Value, None,
        "Name of this cache; the signing key is called <hostname> (required)"),
    flag!(["cache-data-path", "cache-storage-local"], ["CACHE_STORAGE_LOCAL", "CACHE_DATA_PATH"],
        ["cache.storage.local", "cache.data-path"],
        Value, None, "Directory for the cached NARs, narinfos, database and key (required)"),
    flag!(["cache-storage-s3-bucket"], ["CACHE_STORAGE_S3_BUCKET"],
        ["cache.storage.s3.bucket"], Value, None,
        "S3 bucket for the NARs and narinfos instead of the data path (the index, key and downloads \
         in progress stay there); needs a build with `--features s3`"),
    flag!(["cache-storage-s3-endpoint"], ["CACHE_STORAGE_S3_ENDPOINT"],
        ["cache.storage.s3.endpoint"], Value, None,
        "S3 endpoint URL with its scheme, e.g. https://s3.amazonaws.com or http://minio:9000 \
         (required with a bucket)"),
    flag!(["cache-storage-s3-region"], ["CACHE_STORAGE_S3_REGION"],
        ["cache.storage.s3.region"], Value, Some("us-east-1"),
        "S3 region (any value for most self-hosted servers)"),
    flag!(["cache-storage-s3-access-key-id"], ["CACHE_STORAGE_S3_ACCESS_KEY_ID"],
        ["cache.storage.s3.access-key-id"], Value, None,
        "S3 access key ID (required with a bucket)"),
    flag!(["cache-storage-s3-secret-access-key"], ["CACHE_STORAGE_S3_SECRET_ACCESS_KEY"],
        ["cache.storage.s3.secret-access-key"], Value, None,
        "S3 secret access key (required with a bucket; never logged)"),
    flag!(["cache-storage-s3-force-path-style"], ["CACHE_STORAGE_S3_FORCE_PATH_STYLE"],
        ["cache.storage.s3.force-path-style"], Bool, None,
        "Path-style S3 addressing (endpoint/bucket/key), as MinIO and Garage need"),
    flag!(["cache-storage-s3-redirect"], ["CACHE_STORAGE_S3_REDIRECT"],
        ["cache.storage.s3.redirect"], Bool, None,
        "Answer NAR hits with a redirect (307) to a presigned URL of the object, valid 10 minutes, \
         instead of sending the bytes through ncps: for clients that can reach the S3 endpoint \
         ncps uses (narinfos and misses still come from ncps)"),
    flag!(["cache-database-url"], ["CACHE_DATABASE_URL"],
        ["cache.database-url"], Value, None,
        "Database, as sqlite:PATH, or postgresql://USER:PASSWORD@HOST:PORT/DB in a build with \
         PostgreSQL (--features postgres; TLS with libpq's ?sslmode=…&sslrootcert=…) \
         [default: sqlite:<data-path>/db.sqlite]"),
    flag!(["cache-temp-path"], ["CACHE_TEMP_PATH"],
        ["cache.temp-path"], Value, None,
        "Directory for downloads in progress; keep it on the data path's filesystem \
         [default: <data-path>/tmp]"),
    flag!(["upstream-cache", "cache-upstream-url"], ["CACHE_UPSTREAM_URLS", "UPSTREAM_CACHES"],
        ["cache.upstream.urls", "cache.upstream.caches"],
        List, None, "Upstream binary cache URL, tried in order (?priority=N reorders); repeatable, \
         at least one"),
    flag!(["upstream-public-key", "cache-upstream-public-key"], ["CACHE_UPSTREAM_PUBLIC_KEYS", "UPSTREAM_PUBLIC_KEYS"],
        ["cache.upstream.public-keys"], List, None,
        "Trusted upstream key, name:base64; repeatable"),
    flag!(["cache-zstd-responses"], ["CACHE_ZSTD_RESPONSES"],
        ["cache.zstd-responses"], Bool, Some("true"),
        "Send NARs stored uncompressed zstd-encoded to clients whose Accept-Encoding names zstd \
         (a copy made once, in the background, counted against --cache-max-size)"),
    flag!(["cache-sign-narinfo"], ["CACHE_SIGN_NARINFO"],
        ["cache.sign-narinfo"], Bool, Some("true"),
        "Add this cache's signature to served narinfos"),
    flag!(["cache-secret-key-path"], ["CACHE_SECRET_KEY_PATH"],
        ["cache.secret-key-path"], Value, None,
        "Secret signing key file (nix-store --generate-binary-cache-key format) \
         [default: generated once into <data-path>/secret-key]"),
    flag!(["cache-negative-ttl"], ["CACHE_NEGATIVE_TTL"],
        ["cache.negative-ttl"], Value, Some("1m"),
        "How long a narinfo that no upstream has is remembered as missing (0 to disable)"),
    flag!(["cache-max-size"], ["CACHE_MAX_SIZE"],
        ["cache.max-size"], Value, None,
        "Largest size of the store, as a number and one of B K M G T (binary units), e.g. 50G; \
         least recently used entries are evicted to stay under it [default: no limit]"),
    flag!(["cache-lru-schedule"], ["CACHE_LRU_SCHEDULE"],
        ["cache.lru.schedule"], Value, None,
        "When to also run a full eviction pass, as a 5-field cron spec (0 2 * * *) or \
         @daily/@hourly/@every 1h; needs --cache-max-size"),
    flag!(["cache-lru-schedule-timezone"], ["CACHE_LRU_SCHEDULE_TZ", "CACHE_LRU_SCHEDULE_TIMEZONE"],
        ["cache.lru.timezone"], Value,
        Some("Local"), "Time zone of --cache-lru-schedule: Local, UTC or a name like Europe/Paris"),
    flag!(["cache-allow-put-verb"], ["CACHE_ALLOW_PUT_VERB"],
        ["cache.allow-put-verb"], Bool, Some("false"),
        "Accept uploads (nix copy --to http://HOST:PORT or .../upload)"),
    flag!(["cache-allow-delete-verb"], ["CACHE_ALLOW_DELETE_VERB"],
        ["cache.allow-delete-verb"], Bool, Some("false"),
        "Accept DELETE of narinfos and NARs"),
    flag!(["cache-write-token"], ["CACHE_WRITE_TOKEN"],
        ["cache.write-token"], Value, None,
        "Token a client must present for PUT and DELETE, as Authorization: Bearer or as the \
         password of a netrc entry (prefer the variable: arguments are visible to every user)"),
    flag!(["cache-trusted-upload-key"], ["CACHE_TRUSTED_UPLOAD_KEYS"],
        ["cache.trusted-upload-keys"], List, None,
        "Key, name:base64, whose signature on an uploaded narinfo lets this cache add its own; \
         repeatable"),
    flag!(["cache-require-trusted-signature"], ["CACHE_REQUIRE_TRUSTED_SIGNATURE"],
        ["cache.require-trusted-signature"], Bool, Some("false"),
        "Refuse uploaded narinfos not signed by a --cache-trusted-upload-key"),
    flag!(["cache-upload-may-shadow-upstream"], ["CACHE_UPLOAD_MAY_SHADOW_UPSTREAM"],
        ["cache.upload-may-shadow-upstream"], Bool, Some("false"),
        "Let an upload replace a narinfo held from an upstream, or stand for a path an upstream serves"),
    flag!(["cache-get-token"], ["CACHE_GET_TOKEN"],
        ["cache.get-token"], Value, None,
        "Token every GET and HEAD must present (except /healthz and /metrics), as \
         Authorization: Bearer or as the password of a netrc entry"),
    flag!(["netrc-file"], ["NETRC_FILE"],
        ["cache.netrc-file"], Value, None,
        "netrc file with credentials for upstreams (Basic, per host) [default: ~/.netrc if it exists]"),
    flag!(["upstream-bearer-token-file"], ["UPSTREAM_BEARER_TOKEN_FILES"],
        ["cache.upstream.bearer-token-files"], List, None,
        "URL=FILE: send the token in FILE as Authorization: Bearer to the upstream URL; repeatable"),
    flag!(["prometheus-enabled"], ["PROMETHEUS_ENABLED"],
        ["prometheus.enabled"], Bool, Some("false"),
        "Serve metrics in the Prometheus text format at /metrics"),
    flag!(["otel-enabled"], ["OTEL_ENABLED"],
        ["opentelemetry.enabled"], Bool, Some("false"),
        "Send traces, metrics and logs over OpenTelemetry (OTLP): to --otel-grpc-url, else to \
         OTEL_EXPORTER_OTLP_ENDPOINT, else as OTLP/JSON lines on stdout"),
    flag!(["otel-grpc-url"], ["OTEL_GRPC_URL"],
        ["opentelemetry.grpc-url"], Value, None,
        "OpenTelemetry collector for OTLP/gRPC: http://HOST:4317 (cleartext), https://HOST:4317 or \
         HOST:4317 (TLS); omit for stdout"),
    flag!(["otel-endpoint"], ["OTEL_EXPORTER_OTLP_ENDPOINT"],
        ["opentelemetry.endpoint"], Value, None,
        "OpenTelemetry collector when --otel-grpc-url is not given: http(s)://HOST:4318 for \
         http/protobuf, http://HOST:4317 for grpc"),
    flag!(["otel-protocol"], ["OTEL_EXPORTER_OTLP_PROTOCOL"],
        ["opentelemetry.protocol"], Value, None,
        "OTLP protocol for --otel-endpoint: grpc or http/protobuf [default: grpc with \
         --otel-grpc-url, else http/protobuf]"),
    flag!(["otel-headers"], ["OTEL_EXPORTER_OTLP_HEADERS"],
        ["opentelemetry.headers"], Value, None,
        "Headers sent with every export, key=value,key2=value2 (values percent-encoded), e.g. \
         Authorization=Bearer%20TOKEN for a hosted collector (prefer the variable)"),
    flag!(["otel-service-name"], ["OTEL_SERVICE_NAME"],
        ["opentelemetry.service-name"], Value, Some("ncps"),
        "service.name of the telemetry ncps sends"),
    flag!(["otel-resource-attributes"], ["OTEL_RESOURCE_ATTRIBUTES"],
        ["opentelemetry.resource-attributes"], Value, None,
        "More resource attributes, key=value,key2=value2 (values percent-encoded)"),
    flag!(["otel-metric-export-interval"], ["OTEL_METRIC_EXPORT_INTERVAL"],
        ["opentelemetry.metric-export-interval"], Value, Some("60000"),
        "How often metrics are sent, in milliseconds (or a duration such as 60s)"),
    flag!(["server-addr"], ["SERVER_ADDR"],
        ["server.addr"], Value, Some(":8501"),
        "Address to listen on, host:port (:port for every interface)"),
    flag!(["server-advertise-addr"], ["SERVER_ADVERTISE_ADDR"],
        ["server.advertise-addr"], Value, None,
        "host:port at which the other replicas reach this one (replicas sharing a PostgreSQL \
         index): one downloads a NAR, the others stream it from there [default: no replicas]"),
    flag!(["server-workers"], ["SERVER_WORKERS"],
        ["server.workers"], Value, Some("64"),
        "Worker threads; each serves one request at a time"),
    flag!(["server-header-timeout"], ["SERVER_HEADER_TIMEOUT"],
        ["server.header-timeout"], Value, Some("10s"),
        "Time a client has to send its request headers"),
    flag!(["server-idle-timeout"], ["SERVER_IDLE_TIMEOUT"],
        ["server.idle-timeout"], Value, Some("60s"),
        "How long an idle keep-alive connection is kept open"),
    flag!(["server-write-timeout"], ["SERVER_WRITE_TIMEOUT"],
        ["server.write-timeout"], Value, Some("60s"),
        "How long a client may stop reading before it is dropped"),
    flag!(["server-min-send-rate"], ["SERVER_MIN_SEND_RATE"],
        ["server.min-send-rate"], Value, Some("16K"),
        "Slowest a client may read a response, per second (B K M G), averaged over 10 s of \
         waiting on it; slower readers are cut off (0 for no minimum)"),
    flag!(["server-min-receive-rate"], ["SERVER_MIN_RECEIVE_RATE"],
        ["server.min-receive-rate"], Value, Some("16K"),
        "Slowest a client may send a request body (an upload), per second (B K M G), averaged \
         over 10 s of waiting on it; slower uploads are dropped (0 for no minimum)"),
    flag!(["server-upstream-workers"], ["SERVER_UPSTREAM_WORKERS"],
        ["server.upstream-workers"], Value, Some("64"),
        "Worker threads for requests that must ask an upstream (misses), apart from \
         --server-workers, so slow upstreams never hold the workers that serve hits"),
    flag!(["upstream-dialer-timeout", "cache-upstream-dialer-timeout"], ["CACHE_UPSTREAM_DIALER_TIMEOUT", "UPSTREAM_DIALER_TIMEOUT"],
        ["cache.upstream.dialer-timeout"], Value, Some("3s"),
        "Timeout for connecting to an upstream"),
    flag!(["upstream-response-header-timeout", "cache-upstream-response-header-timeout"], ["CACHE_UPSTREAM_RESPONSE_HEADER_TIMEOUT", "UPSTREAM_RESPONSE_HEADER_TIMEOUT"],
        ["cache.upstream.response-header-timeout"], Value, Some("3s"), "Timeout for an upstream's response headers"),
    flag!(["upstream-body-idle-timeout"], ["UPSTREAM_BODY_IDLE_TIMEOUT"],
        ["cache.upstream.body-idle-timeout"], Value, Some("30s"),
        "An upstream body that sends nothing for this long is abandoned"),
    flag!(["upstream-narinfo-timeout"], ["UPSTREAM_NARINFO_TIMEOUT"],
        ["cache.upstream.narinfo-timeout"], Value, Some("15s"),
        "Total time an upstream narinfo request may take, body included"),
    flag!(["upstream-nar-timeout"], ["UPSTREAM_NAR_TIMEOUT"],
        ["cache.upstream.nar-timeout"], Value, Some("60s"),
        "Total time an upstream NAR request may take, plus its FileSize at --upstream-nar-min-rate"),
    flag!(["upstream-nar-min-rate"], ["UPSTREAM_NAR_MIN_RATE"],
        ["cache.upstream.nar-min-rate"], Value, Some("64K"),
        "Slowest upstream NAR rate given time for, bytes per second (a number and one of B K M G)"),
    flag!(["log-level"], ["LOG_LEVEL"],
        ["log.level"], Value, Some("info"),
        "One of error, warn, info, debug, trace"),
];

/// A configuration mistake, named by the flag it concerns. Printed as one line, then ncps
/// exits with status 2 before it binds any port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub flag: String,
    pub message: String,
    /// Set when the value came from the config file: `FILE: KEY`, said instead of the flag.
    pub origin: Option<String>,
}

impl ConfigError {
    pub fn new(flag: &str, message: impl Into<String>) -> ConfigError {
        ConfigError { flag: flag.to_string(), message: message.into(), origin: None }
    }

    /// A mistake in the config file `path`, at `key`.
    pub fn in_file(path: &str, key: &str, flag: &str, message: impl Into<String>) -> ConfigError {
        let origin = if key.is_empty() { path.to_string() } else { format!("{path}: {key}") };
        ConfigError { flag: flag.to_string(), message: message.into(), origin: Some(origin) }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(origin) = &self.origin {
            write!(f, "{origin}: {}", self.message)
        } else if self.flag.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "--{}: {}", self.flag, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// One upstream cache: defined by the upstream client (configuration only fills it in), so
/// that the client does not import this module.
pub use crate::upstream::UpstreamConfig;

/// Everything `ncps serve` needs, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub hostname: String,
    pub data_path: PathBuf,
    pub database: Database,
    pub temp_path: PathBuf,
    pub upstreams: Vec<UpstreamConfig>,
    pub upstream_keys: Vec<PublicKey>,
    pub sign_narinfo: bool,
    /// `--cache-zstd-responses`.
    pub zstd_responses: bool,
    /// `--server-advertise-addr`, as `http://host:port`: this replica, for the others.
    pub advertise: Option<String>,
    pub secret_key_path: Option<PathBuf>,
    pub negative_ttl: Duration,
    pub server_addr: String,
    pub workers: usize,
    /// `--server-upstream-workers`: the pool for misses.
    pub upstream_workers: usize,
    /// `--server-min-send-rate` and `--server-min-receive-rate`, bytes per second (0: none).
    pub min_send_rate: u64,
    pub min_receive_rate: u64,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub dial_timeout: Duration,
    pub response_header_timeout: Duration,
    pub body_idle_timeout: Duration,
    /// Total deadlines of upstream requests.
    pub upstream_deadlines: crate::upstream::Deadlines,
    pub log_level: log::LevelFilter,
    pub max_size: Option<u64>,
    pub lru_schedule: Option<crate::cron::Schedule>,
    /// A name [`crate::tz::check_name`] accepts; loaded by [`crate::tz::Zone::load`].
    pub lru_timezone: String,
    pub allow_put: bool,
    pub allow_delete: bool,
    pub prometheus: bool,
    /// `--otel-enabled` and where to: `None` when telemetry is off.
    pub otel: Option<crate::otel::OtelSettings>,
    pub access: AccessConfig,
    /// `--cache-storage-s3-*`: `None` when the blobs stay under the data path.
    pub s3: Option<S3Config>,
}

/// Where the blobs go when they go to S3 (`--cache-storage-s3-*`), checked for form only;
/// `serve::prepare` connects. Its `Debug` never shows the secret.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    pub endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub force_path_style: bool,
    /// `--cache-storage-s3-redirect`: NAR hits are redirects to presigned URLs.
    pub redirect: bool,
}

/// `--cache-storage-s3-*`: `None` without a bucket. A build without the `s3` feature refuses
/// a bucket here, so that it never starts with its blobs somewhere the user did not ask.
fn s3_from_raw(raw: &RawValues) -> Result<Option<S3Config>, ConfigError> {
    let Some(bucket) = raw.one("cache-storage-s3-bucket") else {
        if raw.bool("cache-storage-s3-redirect")? {
            return Err(ConfigError::new("cache-storage-s3-redirect", "redirects to presigned URLs need --cache-storage-s3-bucket"));
        }
        return Ok(None);
    };
    if !cfg!(feature = "s3") {
        return Err(ConfigError::new(
            "cache-storage-s3-bucket",
            "this ncps was built without S3 support; build it with `cargo build --release --features s3`",
        ));
    }
    let required = |flag: &'static str, env: &str| {
        raw.one(flag).filter(|v| !v.is_empty()).ok_or_else(|| {
            ConfigError::new(flag, format!("is required with --cache-storage-s3-bucket (env {env})"))
        })
    };
    let endpoint = required("cache-storage-s3-endpoint", "CACHE_STORAGE_S3_ENDPOINT")?;
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(ConfigError::new(
            "cache-storage-s3-endpoint",
            format!("{endpoint:?}: expected a URL with its scheme, e.g. https://s3.amazonaws.com"),
        ));
    }
    let access_key_id = required("cache-storage-s3-access-key-id", "CACHE_STORAGE_S3_ACCESS_KEY_ID")?;
    let secret = required("cache-storage-s3-secret-access-key", "CACHE_STORAGE_S3_SECRET_ACCESS_KEY")?;
    let secret_access_key =
        Secret::new(secret).map_err(|why| ConfigError::new("cache-storage-s3-secret-access-key", why))?;
    Ok(Some(S3Config {
        bucket: bucket.to_string(),
        endpoint: endpoint.trim_end_matches('/').to_string(),
        region: raw.one("cache-storage-s3-region").unwrap_or("us-east-1").to_string(),
        access_key_id: access_key_id.to_string(),
        secret_access_key,
        force_path_style: raw.bool("cache-storage-s3-force-path-style")?,
        redirect: raw.bool("cache-storage-s3-redirect")?,
    }))
}

/// Who may read and write, and what uploads may be (checked against each other here; the
/// files named are read by `serve::prepare`).
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    pub write_token: Option<Secret>,
    pub get_token: Option<Secret>,
    pub trusted_upload_keys: Vec<PublicKey>,
    pub require_trusted_signature: bool,
    pub upload_may_shadow: bool,
    /// `--netrc-file`, if given (else `~/.netrc` is read if it exists).
    pub netrc_file: Option<PathBuf>,
    /// `--upstream-bearer-token-file`: (upstream URL, token file).
    pub bearer_token_files: Vec<(String, PathBuf)>,
}

/// The values given for each flag (by canonical name), from the command line, else the
/// environment, else the config file ([`RawValues::merge_file`]). Keeping this step
/// separate from typing makes both easy to test.
#[derive(Debug, Default)]
pub struct RawValues {
    values: HashMap<&'static str, Vec<String>>,
    /// The flags whose values came from the config file, with the key that gave each.
    from_file: HashMap<&'static str, &'static str>,
    /// The config file merged, as given.
    file: Option<String>,
}

/// Settings of the Go ncps that this ncps does not have (Redis, locks, ...):
/// named as such when a Go ncps config file holds them, rather than as typos.
const GO_ONLY_KEY_PREFIXES: &[&str] = &[
    "cache.storage.s3.use-ssl", "cache.redis", "cache.lock", "cache.database.pool", "cache.cdc",
    "cache.download", "analytics", "xz-binary-path", "use-xz-binary",
];

fn find_key(key: &str) -> Option<(&'static Flag, &'static str)> {
    FLAGS.iter().find_map(|f| f.keys.iter().find(|k| **k == key).map(|k| (f, *k)))
}

/// `host:port` (or `http://host:port`) to the base URL the other replicas use.
fn advertise_url(v: &str) -> Result<String, String> {
    let hostport = v.strip_prefix("http://").unwrap_or(v).trim_end_matches('/');
    match hostport.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) && !hostport.contains('/') => {
            Ok(format!("http://{hostport}"))
        }
        _ => Err(format!("{v:?}: expected host:port, the address the other replicas reach this one at")),
    }
}

impl RawValues {
    /// The config file to read and whether it must exist: `--config`/`NCPS_CONFIG_FILE`
    /// (must), else `$XDG_CONFIG_HOME/ncps/config.yaml` (or `$HOME/.config/...`, as Go's
    /// `os.UserConfigDir`), read only if it is there. `env` as for [`parse_args`].
    pub fn config_file(&self, env: impl Fn(&str) -> Option<String>) -> Option<(PathBuf, bool)> {
        if let Some(p) = self.all("config").last() {
            return Some((PathBuf::from(p), true));
        }
        let base = match env("XDG_CONFIG_HOME").filter(|v| v.starts_with('/')) {
            Some(x) => PathBuf::from(x),
            None => PathBuf::from(env("HOME").filter(|v| v.starts_with('/'))?).join(".config"),
        };
        Some((base.join("ncps").join("config.yaml"), false))
    }

    /// Adds the settings of the config file `path` whose text is `text`, for the flags
    /// neither the command line nor the environment set. Every key must be one of
    /// [`FLAGS`]' keys; errors name the file and the key.
    pub fn merge_file(&mut self, path: &str, text: &str) -> Result<(), ConfigError> {
        use crate::config_file::{Format, Leaf};
        let format = Format::from_path(path).ok_or_else(|| {
            ConfigError::in_file(path, "", "config", "unknown extension: use .yaml, .yml, .toml or .json")
        })?;
        let entries = crate::config_file::parse(format, text)
            .map_err(|e| ConfigError::in_file(path, "", "config", e.to_string()))?;
        let mut seen: HashMap<&'static str, &'static str> = HashMap::new();
        let mut add: Vec<(&'static str, &'static str, Vec<String>)> = Vec::new();
        for (key, leaf) in entries {
            let Some((flag, key)) = find_key(&key) else {
                let go_only = GO_ONLY_KEY_PREFIXES
                    .iter()
                    .any(|p| key == *p || key.strip_prefix(p).is_some_and(|rest| rest.starts_with('.')));
                let why = if go_only {
                    "a setting of the Go ncps that this ncps does not have; remove it"
                } else {
                    "unknown key (`ncps serve --help` lists each setting's key after `file:`)"
                };
                return Err(ConfigError::in_file(path, &key, "config", why));
            };
            let canonical = flag.names[0];
            if let Some(other) = seen.insert(canonical, key) {
                return Err(ConfigError::in_file(path, key, canonical, format!("also set as {other}; keep one")));
            }
            let values = match (leaf, flag.kind) {
                (Leaf::Null, _) => continue,
                (Leaf::Scalar(v), _) => vec![v],
                (Leaf::List(l), Kind::List) => l,
                (Leaf::List(_), _) => {
                    return Err(ConfigError::in_file(path, key, canonical, "expected one value, not a list"))
                }
            };
            // Empty means unset, as for the environment (`secret-key-path: ""`).
            let values: Vec<String> = values.into_iter().filter(|v| !v.is_empty()).collect();
            if !values.is_empty() {
                add.push((canonical, key, values));
            }
        }
        for (canonical, key, values) in add {
            if !self.values.contains_key(canonical) {
                self.values.insert(canonical, values);
                self.from_file.insert(canonical, key);
            }
        }
        self.file = Some(path.to_string());
        Ok(())
    }

    /// Says where a bad value came from when that was the config file.
    fn locate(&self, e: ConfigError) -> ConfigError {
        match (self.from_file.get(e.flag.as_str()), &self.file) {
            (Some(key), Some(path)) if e.origin.is_none() => {
                let message = format!("{} (--{})", e.message, e.flag);
                ConfigError::in_file(path, key, &e.flag, message)
            }
            _ => e,
        }
    }
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Command {
    Serve(RawValues),
    /// `ncps fsck [--repair]`: the storage flags only.
    Fsck { raw: RawValues, repair: bool },
    Help(Option<&'static str>),
    Version,
}

fn find_flag(name: &str) -> Option<&'static Flag> {
    FLAGS.iter().find(|f| f.names.contains(&name))
}

/// Parses the command line (without the program name). `env` looks up environment variables,
/// so tests need not touch the process environment.
pub fn parse_args(
    args: impl IntoIterator<Item = OsString>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Command, ConfigError> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut subcommand: Option<&'static str> = None;
    let mut given: HashMap<&'static str, Vec<String>> = HashMap::new();
    let mut repair = false;
    let err = |e: lexopt::Error| ConfigError::new("", e.to_string());
    while let Some(arg) = parser.next().map_err(err)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(subcommand)),
            Short('V') | Long("version") => return Ok(Command::Version),
            Value(v) if subcommand.is_none() => {
                let v = v.string().map_err(err)?;
                match v.as_str() {
                    "serve" | "s" => subcommand = Some("serve"),
                    "fsck" => subcommand = Some("fsck"),
                    "help" => return Ok(Command::Help(None)),
                    _ => return Err(ConfigError::new("", format!("unknown command {v:?}"))),
                }
            }
            Long("repair") if subcommand == Some("fsck") => repair = true,
            Long(name) => {
                let flag = find_flag(name)
                    .ok_or_else(|| ConfigError::new(name, "unknown flag (see ncps serve --help)"))?;
                let canonical = flag.names[0];
                let value = match flag.kind {
                    Kind::Bool => match parser.optional_value() {
                        Some(v) => v.string().map_err(err)?,
                        None => "true".to_string(),
                    },
                    _ => parser.value().map_err(|e| ConfigError::new(canonical, e.to_string()))?
                        .string()
                        .map_err(err)?,
                };
                given.entry(canonical).or_default().push(value);
            }
            other => return Err(err(other.unexpected())),
        }
    }
    if subcommand.is_none() {
        return Ok(Command::Help(None));
    }
    // A flag on the command line beats its environment variables entirely, so that a list
    // flag given once does not silently merge with a list from the environment.
    for flag in FLAGS {
        let canonical = flag.names[0];
        if given.contains_key(canonical) {
            continue;
        }
        if let Some(value) = flag.envs.iter().find_map(|e| env(e).filter(|v| !v.is_empty())) {
            let values = match flag.kind {
                Kind::List => value
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
                _ => vec![value],
            };
            given.insert(canonical, values);
        }
    }
    if subcommand == Some("fsck") {
        return Ok(Command::Fsck { raw: RawValues { values: given, ..RawValues::default() }, repair });
    }
    Ok(Command::Serve(RawValues { values: given, ..RawValues::default() }))
}

/// Where the store lives: what `serve` and `fsck` share.
#[derive(Debug, Clone)]
pub struct StoragePaths {
    pub data_path: PathBuf,
    pub database: Database,
    pub temp_path: PathBuf,
}

/// Where the index lives (`--cache-database-url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// `sqlite:PATH` (the default, `<data-path>/db.sqlite`).
    Sqlite(PathBuf),
    /// A `postgresql://` or `postgres://` URL as given. It may hold a password: show it only
    /// through [`crate::url::redact_url`]. Only a build with the `postgres` feature accepts one.
    Postgres(String),
}

impl fmt::Display for Database {
    /// The database as logs and errors may show it: a path, or the URL without its password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "{}", p.display()),
            Database::Postgres(url) => f.write_str(&crate::url::redact_url(url)),
        }
    }
}

fn parse_database_url(url: &str) -> Result<Database, ConfigError> {
    const FLAG: &str = "cache-database-url";
    if let Some(p) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
        if p.is_empty() {
            return Err(ConfigError::new(FLAG, format!("{url:?}: sqlite: needs a path (sqlite:PATH)")));
        }
        return Ok(Database::Sqlite(PathBuf::from(p)));
    }
    if url.starts_with("postgresql://") || url.starts_with("postgres://") {
        #[cfg(feature = "postgres")]
        // libpq's sslmode and sslrootcert too: an unknown mode or an unreadable CA file is
        // refused here, at start, like any other mistake in a flag.
        return match crate::index::pg_tls::settings(url) {
            Ok(_) => Ok(Database::Postgres(url.to_string())),
            Err(e) => Err(ConfigError::new(FLAG, format!("{}: {e}", crate::url::redact_url(url)))),
        };
        #[cfg(not(feature = "postgres"))]
        return Err(ConfigError::new(
            FLAG,
            format!(
                "{}: this ncps was built without PostgreSQL support; build it with \
                 `cargo build --release --features postgres`, or use sqlite:PATH",
                crate::url::redact_url(url)
            ),
        ));
    }
    Err(ConfigError::new(
        FLAG,
        format!("{:?}: expected sqlite:PATH or postgresql://USER:PASSWORD@HOST:PORT/DB", crate::url::redact_url(url)),
    ))
}

impl StoragePaths {
    pub fn from_raw(raw: &RawValues) -> Result<StoragePaths, ConfigError> {
        StoragePaths::from_raw_here(raw).map_err(|e| raw.locate(e))
    }

    fn from_raw_here(raw: &RawValues) -> Result<StoragePaths, ConfigError> {
        let data_path = PathBuf::from(raw.one("cache-data-path").ok_or_else(|| {
            ConfigError::new("cache-data-path", "is required (env CACHE_DATA_PATH)")
        })?);
        let database = match raw.one("cache-database-url") {
            None => Database::Sqlite(data_path.join("db.sqlite")),
            Some(url) => parse_database_url(url)?,
        };
        let temp_path =
            raw.one("cache-temp-path").map(PathBuf::from).unwrap_or_else(|| data_path.join("tmp"));
        Ok(StoragePaths { data_path, database, temp_path })
    }
}

impl RawValues {
    /// `--cache-storage-s3-*`, typed and checked as `serve` does (`fsck` checks the bucket).
    pub fn s3(&self) -> Result<Option<S3Config>, ConfigError> {
        s3_from_raw(self).map_err(|e| self.locate(e))
    }

    fn all(&self, name: &str) -> &[String] {
        self.values.get(name).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// The last value given, or the flag's default.
    fn one(&self, name: &'static str) -> Option<&str> {
        self.all(name).last().map(|s| s.as_str()).or_else(|| find_flag(name).and_then(|f| f.default))
    }

    fn bool(&self, name: &'static str) -> Result<bool, ConfigError> {
        let v = self.one(name).unwrap_or("false");
        parse_bool(v).ok_or_else(|| ConfigError::new(name, format!("{v:?}: expected true or false")))
    }

    fn duration(&self, name: &'static str) -> Result<Duration, ConfigError> {
        let v = self.one(name).unwrap_or("0s");
        parse_duration(v).ok_or_else(|| {
            ConfigError::new(name, format!("{v:?} is not a duration (e.g. 500ms, 3s, 1m)"))
        })
    }

    /// A rate in bytes per second: a size ([`parse_size`]), not zero.
    fn rate(&self, name: &'static str) -> Result<u64, ConfigError> {
        let v = self.one(name).unwrap_or("0");
        match parse_size(v) {
            Some(n) if n > 0 => Ok(n),
            _ => Err(ConfigError::new(name, format!("{v:?}: expected bytes per second above 0, e.g. 64K or 1M"))),
        }
    }
}

impl Config {
    /// Types and checks the raw values.
    pub fn from_raw(raw: &RawValues) -> Result<Config, ConfigError> {
        Config::from_raw_here(raw).map_err(|e| raw.locate(e))
    }

    fn from_raw_here(raw: &RawValues) -> Result<Config, ConfigError> {
        let hostname = raw
            .one("cache-hostname")
            .ok_or_else(|| ConfigError::new("cache-hostname", "is required (env CACHE_HOSTNAME)"))?
            .to_string();
        if hostname.is_empty() || hostname.contains(|c: char| c.is_whitespace() || c == ':') {
            return Err(ConfigError::new("cache-hostname", "must be a name without spaces or ':'"));
        }
        let StoragePaths { data_path, database, temp_path } = StoragePaths::from_raw_here(raw)?;

        let mut upstreams = Vec::new();
        for u in raw.all("upstream-cache") {
            upstreams.push(parse_upstream_url(u).map_err(|m| ConfigError::new("upstream-cache", m))?);
        }
        if upstreams.is_empty() {
            return Err(ConfigError::new(
                "upstream-cache",
                "at least one upstream cache is required (env UPSTREAM_CACHES)",
            ));
        }
        // Lower priority first, as Nix orders substituters; equal ones keep the given order.
        upstreams.sort_by_key(|u| u.priority.unwrap_or(u32::MAX));

        let mut upstream_keys = Vec::new();
        for k in raw.all("upstream-public-key") {
            let key = PublicKey::parse(k)
                .map_err(|e| ConfigError::new("upstream-public-key", format!("{k:?}: {e}")))?;
            upstream_keys.push(key);
        }

        let sign_narinfo = raw.bool("cache-sign-narinfo")?;
        let zstd_responses = raw.bool("cache-zstd-responses")?;
        let max_size = match raw.one("cache-max-size") {
            None => None,
            Some(v) => Some(parse_size(v).ok_or_else(|| {
                ConfigError::new("cache-max-size", format!("{v:?}: expected a number and one of B K M G T, e.g. 50G"))
            })?),
        };
        let lru_schedule = match raw.one("cache-lru-schedule") {
            None => None,
            Some(_) if max_size.is_none() => {
                return Err(ConfigError::new("cache-lru-schedule", "needs --cache-max-size"))
            }
            Some(v) => Some(
                crate::cron::Schedule::parse(v)
                    .map_err(|e| ConfigError::new("cache-lru-schedule", format!("{v:?}: {e}")))?,
            ),
        };
        let lru_timezone = raw.one("cache-lru-schedule-timezone").unwrap_or("Local").to_string();
        // Only the spelling here; `serve::prepare` loads the zone.
        crate::tz::check_name(&lru_timezone)
            .map_err(|e| ConfigError::new("cache-lru-schedule-timezone", e.to_string()))?;
        let workers: usize = raw
            .one("server-workers")
            .and_then(|v| v.parse().ok())
            .filter(|&n| (1..=4096).contains(&n))
            .ok_or_else(|| ConfigError::new("server-workers", "expected a number from 1 to 4096"))?;
        let upstream_workers: usize = raw
            .one("server-upstream-workers")
            .and_then(|v| v.parse().ok())
            .filter(|&n| (1..=4096).contains(&n))
            .ok_or_else(|| ConfigError::new("server-upstream-workers", "expected a number from 1 to 4096"))?;
        let rate = |flag: &'static str| -> Result<u64, ConfigError> {
            let v = raw.one(flag).unwrap_or("16K");
            let parsed = if v == "0" { Some(0) } else { parse_size(v) };
            parsed.ok_or_else(|| ConfigError::new(flag, format!("{v:?}: expected bytes per second, e.g. 16K (0 for no minimum)")))
        };
        let min_send_rate = rate("server-min-send-rate")?;
        let min_receive_rate = rate("server-min-receive-rate")?;
        let server_addr = raw.one("server-addr").unwrap_or(":8501").to_string();
        parse_listen_addr(&server_addr).map_err(|m| ConfigError::new("server-addr", m))?;
        let advertise = raw.one("server-advertise-addr").map(advertise_url).transpose()
            .map_err(|m| ConfigError::new("server-advertise-addr", m))?;
        let level = raw.one("log-level").unwrap_or("info");
        let log_level = level.parse().map_err(|_| {
            ConfigError::new("log-level", format!("{level:?}: expected error, warn, info, debug or trace"))
        })?;

        let allow_put = raw.bool("cache-allow-put-verb")?;
        let allow_delete = raw.bool("cache-allow-delete-verb")?;
        let access = access_from_raw(raw, &upstreams, allow_put, allow_delete)?;
        Ok(Config {
            access,
            hostname,
            data_path,
            database,
            temp_path,
            upstreams,
            upstream_keys,
            sign_narinfo,
            zstd_responses,
            secret_key_path: raw.one("cache-secret-key-path").map(PathBuf::from),
            negative_ttl: raw.duration("cache-negative-ttl")?,
            server_addr,
            advertise,
            workers,
            upstream_workers,
            min_send_rate,
            min_receive_rate,
            header_timeout: nonzero(raw.duration("server-header-timeout")?, "server-header-timeout")?,
            idle_timeout: nonzero(raw.duration("server-idle-timeout")?, "server-idle-timeout")?,
            write_timeout: nonzero(raw.duration("server-write-timeout")?, "server-write-timeout")?,
            dial_timeout: nonzero(raw.duration("upstream-dialer-timeout")?, "upstream-dialer-timeout")?,
            response_header_timeout: nonzero(
                raw.duration("upstream-response-header-timeout")?,
                "upstream-response-header-timeout",
            )?,
            body_idle_timeout: nonzero(
                raw.duration("upstream-body-idle-timeout")?,
                "upstream-body-idle-timeout",
            )?,
            upstream_deadlines: crate::upstream::Deadlines {
                narinfo: nonzero(raw.duration("upstream-narinfo-timeout")?, "upstream-narinfo-timeout")?,
                nar_base: nonzero(raw.duration("upstream-nar-timeout")?, "upstream-nar-timeout")?,
                nar_min_rate: raw.rate("upstream-nar-min-rate")?,
            },
            log_level,
            max_size,
            lru_schedule,
            lru_timezone,
            allow_put,
            allow_delete,
            prometheus: raw.bool("prometheus-enabled")?,
            otel: otel_from_raw(raw)?,
            s3: s3_from_raw(raw)?,
        })
    }
}

/// `--otel-*` and the standard `OTEL_*` variables: where telemetry goes, checked. `None`
/// unless `--otel-enabled`.
fn otel_from_raw(raw: &RawValues) -> Result<Option<crate::otel::OtelSettings>, ConfigError> {
    use crate::otel::{Destination, OtelSettings};
    if !raw.bool("otel-enabled")? {
        return Ok(None);
    }
    let grpc_url = raw.one("otel-grpc-url").filter(|v| !v.is_empty());
    let endpoint = raw.one("otel-endpoint").filter(|v| !v.is_empty());
    let protocol = match (raw.one("otel-protocol").filter(|v| !v.is_empty()), grpc_url) {
        (Some(p), _) => p,
        (None, Some(_)) => "grpc",
        (None, None) => "http/protobuf",
    };
    // As the Go ncps: http:// is cleartext, https:// or no scheme is TLS.
    let grpc = |flag: &str, url: &str| -> Result<Destination, ConfigError> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
        let hostport = rest.split('/').next().unwrap_or(rest);
        let port_ok = hostport.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        match scheme {
            "http" | "https" if port_ok => Ok(Destination::Grpc { url: format!("{scheme}://{hostport}") }),
            _ => Err(ConfigError::new(
                flag,
                format!("{url:?}: expected http://HOST:PORT (cleartext) or https://HOST:PORT (TLS), e.g. http://127.0.0.1:4317"),
            )),
        }
    };
    let destination = match (protocol, grpc_url, endpoint) {
        ("grpc", Some(url), _) => grpc("otel-grpc-url", url)?,
        ("grpc", None, Some(url)) => grpc("otel-endpoint", url)?,
        ("grpc", None, None) => Destination::Stdout,
        ("http/protobuf", Some(_), _) => {
            return Err(ConfigError::new(
                "otel-grpc-url",
                "is for gRPC; with OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf set OTEL_EXPORTER_OTLP_ENDPOINT instead",
            ))
        }
        ("http/protobuf", None, Some(url)) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::new("otel-endpoint", format!("{url:?}: expected http://HOST:4318 or https://...")));
            }
            Destination::HttpProtobuf { base: url.trim_end_matches('/').to_string() }
        }
        ("http/protobuf", None, None) => Destination::Stdout,
        (other, _, _) => {
            return Err(ConfigError::new("otel-protocol", format!("{other:?}: expected grpc or http/protobuf")))
        }
    };
    let interval = raw.one("otel-metric-export-interval").unwrap_or("60000");
    let metric_interval = match interval.parse::<u64>() {
        Ok(ms) => Duration::from_millis(ms),
        Err(_) => parse_duration(interval).ok_or_else(|| {
            ConfigError::new("otel-metric-export-interval", format!("{interval:?}: expected milliseconds or a duration such as 60s"))
        })?,
    };
    if metric_interval < Duration::from_millis(100) {
        return Err(ConfigError::new("otel-metric-export-interval", format!("{interval:?}: at least 100 ms")));
    }
    let resource = crate::otel::resource(raw.one("otel-resource-attributes"), raw.one("otel-service-name"));
    let headers = crate::otel::headers(raw.one("otel-headers"))
        .map(crate::otel::Headers)
        .map_err(|why| ConfigError::new("otel-headers", why))?;
    Ok(Some(OtelSettings { destination, resource, metric_interval, headers }))
}

/// The access flags, and the combinations that make no sense or leave a hole.
fn access_from_raw(
    raw: &RawValues,
    upstreams: &[UpstreamConfig],
    allow_put: bool,
    allow_delete: bool,
) -> Result<AccessConfig, ConfigError> {
    let secret = |flag: &'static str| -> Result<Option<Secret>, ConfigError> {
        raw.one(flag).map(|v| Secret::new(v).map_err(|m| ConfigError::new(flag, m))).transpose()
    };
    let write_token = secret("cache-write-token")?;
    let get_token = secret("cache-get-token")?;
    let mut trusted_upload_keys = Vec::new();
    for k in raw.all("cache-trusted-upload-key") {
        let key = PublicKey::parse(k)
            .map_err(|e| ConfigError::new("cache-trusted-upload-key", format!("{k:?}: {e}")))?;
        trusted_upload_keys.push(key);
    }
    let require_trusted_signature = raw.bool("cache-require-trusted-signature")?;
    let upload_may_shadow = raw.bool("cache-upload-may-shadow-upstream")?;
    let writes = allow_put || allow_delete;
    if write_token.is_some() && !writes {
        return Err(ConfigError::new("cache-write-token", "has no use without --cache-allow-put-verb or --cache-allow-delete-verb"));
    }
    if let (Some(w), Some(g)) = (&write_token, &get_token) {
        if w == g {
            return Err(ConfigError::new("cache-write-token", "must differ from --cache-get-token (readers could write)"));
        }
    }
    for (flag, given) in [
        ("cache-trusted-upload-key", !trusted_upload_keys.is_empty()),
        ("cache-require-trusted-signature", require_trusted_signature),
        ("cache-upload-may-shadow-upstream", upload_may_shadow),
    ] {
        if given && !allow_put {
            return Err(ConfigError::new(flag, "has no use without --cache-allow-put-verb"));
        }
    }
    if require_trusted_signature && trusted_upload_keys.is_empty() {
        return Err(ConfigError::new(
            "cache-trusted-upload-key",
            "--cache-require-trusted-signature needs at least one key, or every upload is refused",
        ));
    }
    if allow_put && write_token.is_none() && !require_trusted_signature {
        return Err(ConfigError::new(
            "cache-allow-put-verb",
            "anyone who can reach the port could upload: give --cache-write-token (CACHE_WRITE_TOKEN), \
             or --cache-require-trusted-signature with --cache-trusted-upload-key",
        ));
    }
    if allow_delete && write_token.is_none() {
        return Err(ConfigError::new(
            "cache-allow-delete-verb",
            "anyone who can reach the port could delete: give --cache-write-token (CACHE_WRITE_TOKEN)",
        ));
    }
    let netrc_file = raw.one("netrc-file").map(PathBuf::from);
    let mut bearer_token_files = Vec::new();
    for v in raw.all("upstream-bearer-token-file") {
        let flag = "upstream-bearer-token-file";
        let (url, file) = v.rsplit_once('=').filter(|(u, f)| !u.is_empty() && !f.is_empty()).ok_or_else(|| {
            ConfigError::new(flag, format!("{v:?}: expected URL=FILE"))
        })?;
        let url = parse_upstream_url(url).map_err(|m| ConfigError::new(flag, m))?.url;
        if !upstreams.iter().any(|u| u.url == url) {
            return Err(ConfigError::new(flag, format!("{url} is not one of the --upstream-cache URLs")));
        }
        bearer_token_files.push((url, PathBuf::from(file)));
    }
    Ok(AccessConfig {
        write_token,
        get_token,
        trusted_upload_keys,
        require_trusted_signature,
        upload_may_shadow,
        netrc_file,
        bearer_token_files,
    })
}

fn nonzero(d: Duration, flag: &str) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(flag, "must be longer than zero"));
    }
    Ok(d)
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "t" | "yes" => Some(true),
        "false" | "0" | "f" | "no" => Some(false),
        _ => None,
    }
}

/// Parses an upstream URL: http or https, a host, an optional path, and an optional
/// `?priority=N` (any other query is refused rather than silently dropped).
pub fn parse_upstream_url(raw: &str) -> Result<UpstreamConfig, String> {
    let (base, query) = match raw.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (raw, None),
    };
    let rest = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("https://"))
        .ok_or_else(|| format!("{raw:?}: expected an http:// or https:// URL"))?;
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = match authority.rsplit_once(':').filter(|_| !authority.ends_with(']')) {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '@') {
        return Err(format!("{raw:?}: no host in URL"));
    }
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return Err(format!("{raw:?}: bad port {:?}", port.unwrap_or_default()));
    }
    let mut priority = None;
    for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("priority", n)) => {
                priority = Some(n.parse().map_err(|_| format!("{raw:?}: bad priority {n:?}"))?)
            }
            _ => return Err(format!("{raw:?}: unsupported query {pair:?}")),
        }
    }
    Ok(UpstreamConfig { url: base.trim_end_matches('/').to_string(), priority })
}

/// Splits a Go-style listen address (`:8501`, `127.0.0.1:8501`, `[::1]:8501`) into the host
/// (empty for every interface) and the port.
pub fn parse_listen_addr(addr: &str) -> Result<(String, u16), String> {
    let (host, port) =
        addr.rsplit_once(':').ok_or_else(|| format!("{addr:?}: expected host:port or :port"))?;
    let port = port.parse::<u16>().map_err(|_| format!("{addr:?}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_string(), port))
}

/// Parses a size as ncps does: a whole number and exactly one unit letter, binary units.
///
/// ```
/// use ncps::config::parse_size;
/// assert_eq!(parse_size("20M"), Some(20 << 20));
/// assert_eq!(parse_size("1g"), Some(1 << 30));
/// assert_eq!(parse_size("100B"), Some(100));
/// assert_eq!(parse_size("1.5G"), None);
/// assert_eq!(parse_size("10GB"), None);
/// assert_eq!(parse_size("1µ"), None);
/// ```
pub fn parse_size(s: &str) -> Option<u64> {
    // Not split_at(len - 1): that panics when the last character is more than one byte.
    let unit = s.chars().last()?;
    let num = &s[..s.len() - unit.len_utf8()];
    let shift = match unit.to_ascii_uppercase() {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => return None,
    };
    if num.is_empty() || !num.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// The text of `ncps --help` / `ncps serve --help`, made from [`FLAGS`].
pub fn help_text(subcommand: Option<&str>) -> String {
    let mut out = String::new();
    out.push_str("ncps: a Nix binary cache proxy\n\n");
    if subcommand.is_none() {
        out.push_str(
            "Usage: ncps serve [FLAGS]\n       ncps fsck [--repair] --cache-data-path DIR [--cache-storage-s3-*]\n\n\
             Commands:\n  serve   run the cache proxy\n  \
             fsck    check the store (files or the S3 bucket) against the index (re-hashing every\n          \
             NAR); --repair removes what is broken so it is fetched again\n\n",
        );
    } else {
        out.push_str("Usage: ncps serve [FLAGS]\n\n");
    }
    out.push_str("Flags of serve. Each setting is taken from, first found: the flag, its environment\n");
    out.push_str("variable (`env:`; lists comma-separated), its key in the config file (`file:`;\n");
    out.push_str("nested tables or dotted keys; lists as lists), its default:\n");
    for f in FLAGS {
        let value = match f.kind {
            Kind::Bool => "[=BOOL]",
            Kind::List => " VALUE...",
            Kind::Value => " VALUE",
        };
        out.push_str(&format!("  --{}{value}\n", f.names[0]));
        out.push_str(&format!("      {}\n", f.help));
        let mut env = format!("      env: {}", f.envs.join(", "));
        if !f.keys.is_empty() {
            env.push_str(&format!("; file: {}", f.keys.join(", ")));
        }
        if f.names.len() > 1 {
            let aliases: Vec<String> = f.names[1..].iter().map(|n| format!("--{n}")).collect();
            env.push_str(&format!("; alias: {}", aliases.join(", ")));
        }
        if let Some(d) = f.default {
            env.push_str(&format!("; default: {d}"));
        }
        out.push_str(&env);
        out.push('\n');
    }
    out.push_str("  -h, --help     print this help\n  -V, --version  print the version\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> =
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let args = args.iter().map(OsString::from);
        match parse_args(args, |k| env.get(k).cloned())? {
            Command::Serve(raw) => Config::from_raw(&raw),
            other => panic!("expected serve, got {other:?}"),
        }
    }

    const MINIMAL: &[&str] = &[
        "serve",
        "--cache-hostname=cache.lan",
        "--cache-data-path",
        "/var/lib/ncps",
        "--upstream-cache",
        "https://cache.nixos.org",
    ];

    fn with_s3(extra: &[&'static str]) -> Vec<&'static str> {
        let mut args = MINIMAL.to_vec();
        args.extend(["--cache-storage-s3-bucket", "nars", "--cache-storage-s3-endpoint", "http://127.0.0.1:9000/"]);
        args.extend(extra);
        args
    }

    #[test]
    #[cfg(not(feature = "s3"))]
    fn a_build_without_s3_refuses_a_bucket_naming_the_flag_and_the_feature() {
        let e = parse(&with_s3(&[]), &[]).unwrap_err();
        assert_eq!(e.flag, "cache-storage-s3-bucket");
        assert!(e.to_string().contains("--features s3"), "{e}");
        assert!(!e.to_string().contains('\n'), "one line: {e}");
    }

    #[test]
    #[cfg(feature = "s3")]
    fn s3_flags_env_and_file_keys_are_go_ncps_ones_and_credentials_are_required() {
        let e = parse(&with_s3(&["--cache-storage-s3-access-key-id", "AK"]), &[]).unwrap_err();
        assert_eq!(e.flag, "cache-storage-s3-secret-access-key");
        assert!(e.to_string().contains("CACHE_STORAGE_S3_SECRET_ACCESS_KEY"), "{e}");
        let e = parse(&with_s3(&[]), &[]).unwrap_err();
        assert_eq!(e.flag, "cache-storage-s3-access-key-id");
        let env = [
            ("CACHE_STORAGE_S3_ACCESS_KEY_ID", "AK"),
            ("CACHE_STORAGE_S3_SECRET_ACCESS_KEY", "s3cr3t-value"),
            ("CACHE_STORAGE_S3_FORCE_PATH_STYLE", "true"),
            ("CACHE_STORAGE_S3_REGION", "eu-west-1"),
        ];
        let c = parse(&with_s3(&[]), &env).unwrap();
        let s3 = c.s3.clone().unwrap();
        assert_eq!((s3.bucket.as_str(), s3.endpoint.as_str(), s3.region.as_str()), ("nars", "http://127.0.0.1:9000", "eu-west-1"));
        assert!(s3.force_path_style);
        assert!(!s3.redirect, "redirects are off unless asked for");
        let mut with_redirect = env.to_vec();
        with_redirect.push(("CACHE_STORAGE_S3_REDIRECT", "true"));
        assert!(parse(&with_s3(&[]), &with_redirect).unwrap().s3.unwrap().redirect);
        let e = parse(MINIMAL.iter().copied().chain(["--cache-storage-s3-redirect"]).collect::<Vec<_>>().as_slice(), &[]).unwrap_err();
        assert_eq!(e.flag, "cache-storage-s3-redirect", "a redirect without a bucket is refused, not ignored");
        assert_eq!(s3.secret_access_key.expose(), "s3cr3t-value");
        assert!(!format!("{c:?}").contains("s3cr3t-value"), "the secret never prints");
        let e = parse(&with_s3(&["--cache-storage-s3-endpoint", "minio:9000"]), &env).unwrap_err();
        assert_eq!(e.flag, "cache-storage-s3-endpoint");
        assert!(parse(MINIMAL, &[]).unwrap().s3.is_none(), "no bucket, no S3");
        for key in ["bucket", "endpoint", "region", "access-key-id", "secret-access-key", "force-path-style", "redirect"] {
            let key = format!("cache.storage.s3.{key}");
            assert!(find_key(&key).is_some(), "{key}");
        }
    }

    #[test]
    fn a_database_is_shown_without_its_password() {
        let shown = Database::Postgres("postgresql://u:pw@h/d".into()).to_string();
        assert_eq!(shown, "postgresql://u:***@h/d");
    }

    #[test]
    fn defaults_match_ncps() {
        let c = parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.server_addr, ":8501");
        assert_eq!(c.database, Database::Sqlite(PathBuf::from("/var/lib/ncps/db.sqlite")));
        assert_eq!(c.temp_path, PathBuf::from("/var/lib/ncps/tmp"));
        assert!(c.sign_narinfo);
        assert_eq!(c.dial_timeout, Duration::from_secs(3));
        assert_eq!(c.negative_ttl, Duration::from_secs(60));
        assert_eq!(c.log_level, log::LevelFilter::Info);
        assert_eq!(c.upstream_deadlines, crate::upstream::Deadlines::default(), "the flags' defaults");
    }

    #[test]
    fn upstream_deadlines_are_durations_and_a_rate_above_zero() {
        let c = parse(
            &[MINIMAL, &["--upstream-narinfo-timeout=5s", "--upstream-nar-timeout=2m", "--upstream-nar-min-rate=1M"]].concat(),
            &[],
        )
        .unwrap();
        let d = c.upstream_deadlines;
        assert_eq!((d.narinfo, d.nar_base, d.nar_min_rate), (Duration::from_secs(5), Duration::from_secs(120), 1 << 20));
        let c = parse(MINIMAL, &[("UPSTREAM_NAR_MIN_RATE", "128K")]).unwrap();
        assert_eq!(c.upstream_deadlines.nar_min_rate, 128 << 10);
        let flag = |extra: &str| parse(&[MINIMAL, &[extra]].concat(), &[]).unwrap_err().flag;
        assert_eq!(flag("--upstream-nar-min-rate=0"), "upstream-nar-min-rate");
        assert_eq!(flag("--upstream-nar-min-rate=fast"), "upstream-nar-min-rate");
        assert_eq!(flag("--upstream-narinfo-timeout=0s"), "upstream-narinfo-timeout");
        assert_eq!(flag("--upstream-nar-timeout=soon"), "upstream-nar-timeout");
    }

    #[test]
    fn environment_alone_is_enough_and_lists_are_comma_separated() {
        let c = parse(
            &["serve"],
            &[
                ("CACHE_HOSTNAME", "cache.lan"),
                ("CACHE_STORAGE_LOCAL", "/data"),
                ("CACHE_UPSTREAM_URLS", "http://a:1, http://b:2?priority=10"),
                ("UPSTREAM_PUBLIC_KEYS", KEY),
                ("CACHE_SIGN_NARINFO", "false"),
            ],
        )
        .unwrap();
        assert_eq!(c.data_path, PathBuf::from("/data"));
        assert_eq!(c.upstreams.len(), 2);
        assert_eq!(c.upstreams[0].url, "http://b:2", "priority 10 comes before unranked");
        assert_eq!(c.upstream_keys.len(), 1);
        assert!(!c.sign_narinfo);
    }

    #[test]
    fn a_flag_beats_its_environment_variable() {
        let mut args = MINIMAL.to_vec();
        args.push("--upstream-cache=http://only:1");
        let c = parse(&args, &[("UPSTREAM_CACHES", "http://env:1")]).unwrap();
        let urls: Vec<&str> = c.upstreams.iter().map(|u| u.url.as_str()).collect();
        assert_eq!(urls, ["https://cache.nixos.org", "http://only:1"]);
    }

    #[test]
    fn otel_goes_to_the_grpc_url_else_the_standard_endpoint_else_stdout() {
        use crate::otel::Destination;
        let otel = |args: &[&str], env: &[(&str, &str)]| parse(&[MINIMAL, args].concat(), env).map(|c| c.otel);
        assert_eq!(otel(&[], &[("OTEL_GRPC_URL", "http://c:4317")]).unwrap(), None, "off unless enabled");
        let on = [("OTEL_ENABLED", "true")];
        let dest = |env: &[(&str, &str)]| otel(&[], &[&on[..], env].concat()).unwrap().unwrap().destination;
        assert_eq!(dest(&[]), Destination::Stdout);
        assert_eq!(dest(&[("OTEL_GRPC_URL", "http://c:4317/")]), Destination::Grpc { url: "http://c:4317".into() });
        assert_eq!(
            dest(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318/")]),
            Destination::HttpProtobuf { base: "https://c:4318".into() }
        );
        assert_eq!(
            dest(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]),
            Destination::Grpc { url: "http://c:4317".into() }
        );
        let s = otel(&["--otel-enabled", "--otel-service-name=lab-cache"], &[("OTEL_METRIC_EXPORT_INTERVAL", "15s")])
            .unwrap()
            .unwrap();
        assert_eq!(s.metric_interval, Duration::from_secs(15));
        assert_eq!(s.resource.attributes[0], ("service.name".to_string(), "lab-cache".to_string()));
        let flag = |env: &[(&str, &str)]| otel(&[], &[&on[..], env].concat()).unwrap_err().flag;
        assert_eq!(dest(&[("OTEL_GRPC_URL", "https://c:4317")]), Destination::Grpc { url: "https://c:4317".into() });
        assert_eq!(dest(&[("OTEL_GRPC_URL", "c:4317")]), Destination::Grpc { url: "https://c:4317".into() }, "TLS, as Go ncps");
        assert_eq!(flag(&[("OTEL_GRPC_URL", "ftp://c:4317")]), "otel-grpc-url");
        assert_eq!(flag(&[("OTEL_GRPC_URL", "http://c")]), "otel-grpc-url", "a port is needed");
        assert_eq!(flag(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]), "otel-protocol");
        assert_eq!(flag(&[("OTEL_METRIC_EXPORT_INTERVAL", "5")]), "otel-metric-export-interval");
        assert_eq!(
            flag(&[("OTEL_GRPC_URL", "http://c:4317"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]),
            "otel-grpc-url"
        );
    }

    #[test]
    fn otel_settings_come_from_go_ncps_config_file_keys() {
        let yaml = "opentelemetry:\n  enabled: true\n  grpc-url: http://collector:4317\n";
        let c = parse_with_file(MINIMAL, &[], "/etc/ncps/config.yaml", yaml).unwrap();
        let otel = c.otel.expect("enabled by the file");
        assert_eq!(otel.destination, crate::otel::Destination::Grpc { url: "http://collector:4317".into() });
    }

    #[test]
    fn mistakes_name_the_flag() {
        let flag = |args: &[&str]| parse(args, &[]).unwrap_err().flag;
        assert_eq!(flag(&["serve", "--cache-data-path=/d", "--upstream-cache=http://a"]), "cache-hostname");
        assert_eq!(flag(&["serve", "--cache-hostname=h", "--cache-data-path=/d"]), "upstream-cache");
        assert_eq!(flag(&[MINIMAL, &["--upstream-public-key=nope"]].concat()), "upstream-public-key");
        assert_eq!(flag(&[MINIMAL, &["--upstream-cache=ftp://x"]].concat()), "upstream-cache");
        assert_eq!(flag(&[MINIMAL, &["--server-addr=8501"]].concat()), "server-addr");
        assert_eq!(flag(&[MINIMAL, &["--upstream-dialer-timeout=3"]].concat()), "upstream-dialer-timeout");
        assert_eq!(flag(&[MINIMAL, &["--no-such-flag"]].concat()), "no-such-flag");
        let e = parse(&[MINIMAL, &["--upstream-public-key=nope"]].concat(), &[]).unwrap_err();
        assert_eq!(e.to_string(), "--upstream-public-key: \"nope\": expected `name:base64`");
    }

    #[test]
    fn uploads_and_deletes_need_a_writer_token_or_trusted_signatures_and_pointless_flags_are_refused() {
        let flag = |extra: &[&str]| parse(&[MINIMAL, extra].concat(), &[]).map(|_| ()).map_err(|e| e.flag);
        assert_eq!(flag(&["--cache-allow-put-verb"]), Err("cache-allow-put-verb".into()));
        assert_eq!(flag(&["--cache-allow-delete-verb"]), Err("cache-allow-delete-verb".into()));
        assert_eq!(flag(&["--cache-allow-put-verb", "--cache-write-token=w-token"]), Ok(()));
        let signed = ["--cache-allow-put-verb", "--cache-require-trusted-signature", "--cache-trusted-upload-key", KEY];
        assert_eq!(flag(&signed), Ok(()), "trusted signatures alone may allow anonymous uploads");
        assert_eq!(
            flag(&["--cache-allow-put-verb", "--cache-require-trusted-signature"]),
            Err("cache-trusted-upload-key".into())
        );
        assert_eq!(flag(&["--cache-allow-put-verb", "--cache-write-token=w", "--cache-get-token=w"]), Err("cache-write-token".into()));
        assert_eq!(flag(&["--cache-write-token=w"]), Err("cache-write-token".into()));
        assert_eq!(flag(&["--cache-trusted-upload-key", KEY]), Err("cache-trusted-upload-key".into()));
        assert_eq!(flag(&["--cache-upload-may-shadow-upstream"]), Err("cache-upload-may-shadow-upstream".into()));
        assert_eq!(flag(&["--cache-get-token=has space"]), Err("cache-get-token".into()));
        assert_eq!(flag(&["--upstream-bearer-token-file=https://elsewhere=/t"]), Err("upstream-bearer-token-file".into()));
        assert_eq!(flag(&["--upstream-bearer-token-file=/t"]), Err("upstream-bearer-token-file".into()));
        let c = parse(&[MINIMAL, &["--upstream-bearer-token-file=https://cache.nixos.org/=/run/t"]].concat(), &[]).unwrap();
        assert_eq!(c.access.bearer_token_files, [("https://cache.nixos.org".to_string(), PathBuf::from("/run/t"))]);
        let c = parse(MINIMAL, &[("CACHE_GET_TOKEN", "r-token"), ("NETRC_FILE", "/n")]).unwrap();
        assert!(c.access.get_token.is_some() && c.access.netrc_file == Some(PathBuf::from("/n")));
        assert!(!format!("{c:?}").contains("r-token"), "the configuration never prints a token");
        let c = parse(&["serve"], &[("CACHE_HOSTNAME", "h"), ("CACHE_DATA_PATH", "/d"), ("CACHE_UPSTREAM_URLS", "http://a"),
            ("CACHE_ALLOW_PUT_VERB", "true"), ("CACHE_REQUIRE_TRUSTED_SIGNATURE", "1"),
            ("CACHE_TRUSTED_UPLOAD_KEYS", &format!("{KEY}, {KEY}"))]).unwrap();
        assert_eq!(c.access.trusted_upload_keys.len(), 2, "comma-separated like the other lists");
    }

    #[test]
    fn the_schedule_timezone_is_checked_for_its_spelling_only_not_looked_up() {
        let tz = |v: &str| parse(&[MINIMAL, &["--cache-lru-schedule-timezone", v]].concat(), &[]);
        assert_eq!(parse(MINIMAL, &[]).unwrap().lru_timezone, "Local");
        // Whether the zone exists is for start-up (`serve::prepare`) to find out.
        assert_eq!(tz("Nowhere/Atlantis").unwrap().lru_timezone, "Nowhere/Atlantis");
        for bad in ["../etc/passwd", "/etc/localtime", ""] {
            assert_eq!(tz(bad).unwrap_err().flag, "cache-lru-schedule-timezone", "{bad:?}");
        }
    }

    fn parse_with_file(args: &[&str], env: &[(&str, &str)], path: &str, text: &str) -> Result<Config, ConfigError> {
        let env: HashMap<String, String> =
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match parse_args(args.iter().map(OsString::from), |k| env.get(k).cloned())? {
            Command::Serve(mut raw) => {
                raw.merge_file(path, text)?;
                Config::from_raw(&raw)
            }
            other => panic!("expected serve, got {other:?}"),
        }
    }

    /// One configuration touching every kind of value: strings, lists, booleans, durations,
    /// sizes, numbers.
    const FULL_FLAGS: &[&str] = &[
        "serve", "--cache-hostname=cache.lan", "--cache-data-path=/srv/ncps",
        "--upstream-cache=https://cache.nixos.org", "--upstream-cache=http://b:2?priority=10",
        "--upstream-public-key", KEY, "--cache-sign-narinfo=false", "--cache-max-size=50G",
        "--cache-lru-schedule=0 2 * * *", "--cache-lru-schedule-timezone=UTC",
        "--cache-allow-put-verb", "--cache-write-token=w-token", "--prometheus-enabled=true", "--server-addr=127.0.0.1:9000",
        "--server-workers=8", "--upstream-dialer-timeout=5s", "--log-level=debug",
    ];

    const FULL_YAML: &str = "\
log:
  level: debug
prometheus:
  enabled: true
cache:
  hostname: cache.lan
  storage:
    local: /srv/ncps
  sign-narinfo: false
  max-size: 50G
  allow-put-verb: true
  write-token: w-token
  lru:
    schedule: \"0 2 * * *\"
    timezone: UTC
  upstream:
    urls:
      - https://cache.nixos.org
      - http://b:2?priority=10
    public-keys:
      - cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=
    dialer-timeout: 5s
server:
  addr: \"127.0.0.1:9000\"
  workers: 8
";

    const FULL_TOML: &str = r#"
[log]
level = "debug"
[prometheus]
enabled = true
[cache]
hostname = "cache.lan"
storage.local = "/srv/ncps"
sign-narinfo = false
max-size = "50G"
allow-put-verb = true
write-token = "w-token"
lru = { schedule = "0 2 * * *", timezone = "UTC" }
[cache.upstream]
urls = ["https://cache.nixos.org", "http://b:2?priority=10"]
public-keys = ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]
dialer-timeout = "5s"
[server]
addr = "127.0.0.1:9000"
workers = 8
"#;

    const FULL_JSON: &str = r#"{
  "log": {"level": "debug"},
  "prometheus": {"enabled": true},
  "cache": {
    "hostname": "cache.lan", "storage": {"local": "/srv/ncps"}, "sign-narinfo": false,
    "max-size": "50G", "allow-put-verb": true, "write-token": "w-token",
    "lru": {"schedule": "0 2 * * *", "timezone": "UTC"},
    "upstream": {
      "urls": ["https://cache.nixos.org", "http://b:2?priority=10"],
      "public-keys": ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="],
      "dialer-timeout": "5s"
    }
  },
  "server": {"addr": "127.0.0.1:9000", "workers": 8}
}"#;

    #[test]
    fn a_config_file_in_each_format_gives_the_same_configuration_as_the_flags() {
        let from_flags = format!("{:?}", parse(FULL_FLAGS, &[]).unwrap());
        for (path, text) in [("/etc/ncps/config.yaml", FULL_YAML), ("c.toml", FULL_TOML), ("c.json", FULL_JSON)] {
            let from_file = format!("{:?}", parse_with_file(&["serve"], &[], path, text).unwrap());
            assert_eq!(from_file, from_flags, "{path}");
        }
        // And not by accident: the file's settings are not all defaults.
        let c = parse_with_file(&["serve"], &[], "c.yaml", FULL_YAML).unwrap();
        assert_eq!((c.workers, c.max_size, c.sign_narinfo, c.upstreams[0].url.as_str()), (8, Some(50 << 30), false, "http://b:2"));
    }

    #[test]
    fn a_flag_beats_the_environment_which_beats_the_file_which_beats_the_default() {
        let file = "server:\n  addr: \":1\"\n  workers: 3\nlog:\n  level: warn\ncache:\n  hostname: f\n  data-path: /f\n  upstream:\n    urls: [http://file]\n";
        let c = parse_with_file(
            &["serve", "--server-addr=:3"],
            &[("SERVER_ADDR", ":2"), ("SERVER_WORKERS", "2"), ("UPSTREAM_CACHES", "http://env")],
            "c.yaml",
            file,
        )
        .unwrap();
        assert_eq!(c.server_addr, ":3", "flag over env and file");
        assert_eq!(c.workers, 2, "env over file");
        assert_eq!(c.log_level, log::LevelFilter::Warn, "file over default");
        assert_eq!(c.hostname, "f");
        let urls: Vec<&str> = c.upstreams.iter().map(|u| u.url.as_str()).collect();
        assert_eq!(urls, ["http://env"], "a list from the environment replaces the file's, not merged");
        assert_eq!(c.header_timeout, Duration::from_secs(10), "default");
    }

    #[test]
    fn an_unknown_key_in_the_file_is_an_error_naming_the_key_and_the_file() {
        let e = parse_with_file(MINIMAL, &[], "/etc/ncps/config.yaml", "cache:\n  hostnme: x\n").unwrap_err();
        assert_eq!(e.origin.as_deref(), Some("/etc/ncps/config.yaml: cache.hostnme"));
        assert!(e.to_string().starts_with("/etc/ncps/config.yaml: cache.hostnme: unknown key"), "{e}");
        // A Go ncps setting is named as such, not as a typo.
        let e = parse_with_file(MINIMAL, &[], "c.toml", "[cache.redis]\naddrs = [\"r:6379\"]\n").unwrap_err();
        assert!(e.to_string().starts_with("c.toml: cache.redis.addrs: a setting of the Go ncps"), "{e}");
        // The same setting twice, under its old and new key.
        let e = parse_with_file(MINIMAL, &[], "c.json", r#"{"cache": {"data-path": "/a", "storage": {"local": "/b"}}}"#).unwrap_err();
        assert_eq!(e.flag, "cache-data-path", "{e}");
        // An unknown extension and broken text name the file.
        let e = parse_with_file(MINIMAL, &[], "/etc/ncps.conf", "").unwrap_err();
        assert!(e.to_string().starts_with("/etc/ncps.conf: unknown extension"), "{e}");
        let e = parse_with_file(MINIMAL, &[], "c.yaml", "cache: [\n").unwrap_err();
        assert!(e.to_string().starts_with("c.yaml: not valid YAML"), "{e}");
    }

    #[test]
    fn a_bad_value_in_the_file_is_an_error_naming_the_key_the_file_and_the_flag() {
        let e = parse_with_file(MINIMAL, &[], "/c.yaml", "cache:\n  max-size: 50GB\n").unwrap_err();
        assert_eq!(e.flag, "cache-max-size");
        assert_eq!(e.to_string(), "/c.yaml: cache.max-size: \"50GB\": expected a number and one of B K M G T, e.g. 50G (--cache-max-size)");
        let e = parse_with_file(MINIMAL, &[], "/c.toml", "[server]\nworkers = [1, 2]\n").unwrap_err();
        assert_eq!(e.to_string(), "/c.toml: server.workers: expected one value, not a list");
        let e = parse_with_file(&["serve"], &[], "/c.json", r#"{"cache": {"hostname": "h", "data-path": "/d", "upstream": {"urls": ["ftp://x"]}}}"#).unwrap_err();
        assert!(e.to_string().starts_with("/c.json: cache.upstream.urls: "), "{e}");
        // The same bad value from a flag is still reported as the flag's.
        let e = parse(&[MINIMAL, &["--cache-max-size=50GB"]].concat(), &[]).unwrap_err();
        assert!(e.to_string().starts_with("--cache-max-size: "), "{e}");
    }

    #[test]
    fn the_default_config_file_is_under_xdg_config_home_and_only_an_explicit_one_must_exist() {
        let raw = |args: &[&str]| match parse_args(args.iter().map(OsString::from), |_| None).unwrap() {
            Command::Serve(raw) => raw,
            other => panic!("{other:?}"),
        };
        let env = |k: &str| match k {
            "XDG_CONFIG_HOME" => Some("/x".to_string()),
            "HOME" => Some("/home/u".to_string()),
            _ => None,
        };
        assert_eq!(raw(&["serve"]).config_file(env), Some((PathBuf::from("/x/ncps/config.yaml"), false)));
        let home = |k: &str| (k == "HOME").then(|| "/home/u".to_string());
        assert_eq!(raw(&["serve"]).config_file(home), Some((PathBuf::from("/home/u/.config/ncps/config.yaml"), false)));
        assert_eq!(raw(&["serve"]).config_file(|_| None), None);
        assert_eq!(raw(&["serve", "--config=/etc/n.toml"]).config_file(env), Some((PathBuf::from("/etc/n.toml"), true)));
    }

    #[test]
    fn every_setting_but_config_has_a_file_key_and_no_key_is_used_twice() {
        let mut seen = std::collections::HashSet::new();
        for f in FLAGS {
            assert_eq!(f.keys.is_empty(), f.names[0] == "config", "--{}", f.names[0]);
            for k in f.keys {
                assert!(seen.insert(*k), "{k} is used twice");
                assert!(!GO_ONLY_KEY_PREFIXES.iter().any(|p| k.starts_with(p)), "{k} is also listed as Go-only");
            }
        }
    }

    #[test]
    fn help_lists_every_flag_with_its_variable() {
        let help = help_text(Some("serve"));
        for f in FLAGS {
            assert!(help.contains(&format!("--{}", f.names[0])));
            for e in f.envs {
                assert!(help.contains(e));
            }
            for k in f.keys {
                assert!(help.contains(k), "help lacks {k}");
            }
        }
    }

    #[test]
    fn upstream_urls() {
        assert_eq!(
            parse_upstream_url("https://cache.nixos.org/?priority=40").unwrap(),
            UpstreamConfig { url: "https://cache.nixos.org".into(), priority: Some(40) }
        );
        assert!(parse_upstream_url("http://:80").is_err());
        assert!(parse_upstream_url("http://h:notaport").is_err());
        assert_eq!(parse_listen_addr("[::1]:80").unwrap(), ("::1".to_string(), 80));
    }

    #[test]
    fn database_urls_select_sqlite_or_postgresql() {
        let with = |url: &str| {
            let mut args = MINIMAL.to_vec();
            args.extend(["--cache-database-url", url]);
            parse(&args, &[]).map(|c| c.database)
        };
        assert_eq!(with("sqlite:/tmp/x.db").unwrap(), Database::Sqlite("/tmp/x.db".into()));
        assert_eq!(with("sqlite:///tmp/x.db").unwrap(), Database::Sqlite("/tmp/x.db".into()));
        let err = with("mysql://u:pw@h/d").unwrap_err().to_string();
        assert!(err.starts_with("--cache-database-url: ") && !err.contains("pw@"), "{err}");
        for url in ["postgresql://u:pw@h:5432/d", "postgres://u:pw@h/d"] {
            let got = with(url);
            #[cfg(feature = "postgres")]
            assert_eq!(got.unwrap(), Database::Postgres(url.into()));
            #[cfg(not(feature = "postgres"))]
            {
                let err = got.unwrap_err().to_string();
                assert!(err.starts_with("--cache-database-url: "), "names the flag: {err}");
                assert!(err.contains("--features postgres"), "says how to get it: {err}");
                assert!(!err.contains("pw@") && !err.contains('\n'), "one line, no password: {err}");
            }
        }
        let env = [("CACHE_DATABASE_URL", "postgresql://u:pw@h/d")];
        assert_eq!(parse(MINIMAL, &env).is_ok(), cfg!(feature = "postgres"), "the variable too");
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn a_postgresql_url_that_does_not_parse_is_a_config_error_without_its_password() {
        let mut args = MINIMAL.to_vec();
        args.extend(["--cache-database-url", "postgresql://u:pw@h:notaport/d"]);
        let err = parse(&args, &[]).unwrap_err().to_string();
        assert!(err.starts_with("--cache-database-url: ") && !err.contains("pw@"), "{err}");
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn an_unknown_sslmode_an_unreadable_sslrootcert_or_a_client_certificate_is_a_config_error() {
        for (query, says) in [
            ("sslmode=allow", "sslmode=\"allow\" is not supported"),
            ("sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem", "sslrootcert=/nonexistent/ca.pem: cannot be read"),
            ("sslmode=verify-full&sslcert=/etc/c.pem", "sslcert"),
        ] {
            let mut args = MINIMAL.to_vec();
            let url = format!("postgresql://u:secret-pw@h/d?{query}");
            args.extend(["--cache-database-url", &url]);
            let err = parse(&args, &[]).unwrap_err().to_string();
            assert!(err.starts_with("--cache-database-url: ") && err.contains(says), "{err}");
            assert!(!err.contains("secret-pw"), "{err}");
        }
        let mut args = MINIMAL.to_vec();
        args.extend(["--cache-database-url", "postgresql://u:pw@h/d?sslmode=verify-full&connect_timeout=2"]);
        assert!(parse(&args, &[]).is_ok(), "libpq's modes and the driver's parameters together");
    }
}

#[cfg(test)]
mod readme {
    #[test]
    fn the_readme_documents_every_flag_and_variable() {
        let readme = include_str!("../README.md");
        for f in super::FLAGS {
            for n in f.names {
                assert!(readme.contains(&format!("`--{n}")), "README lacks --{n}");
            }
            for e in f.envs {
                assert!(readme.contains(e), "README lacks {e}");
            }
            for k in f.keys {
                assert!(readme.contains(&format!("`{k}`")), "README lacks the file key `{k}`");
            }
        }
    }
}
