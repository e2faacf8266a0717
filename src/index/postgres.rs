//! The PostgreSQL index (the `postgres` feature): the same index as [`super::SqliteIndex`],
//! kept in a PostgreSQL server, for a cache whose operator already runs one, or replicas that
//! will share one index (not implemented yet: today each ncps still has its own store).
//!
//! Why it looks the way it does:
//! - **The synchronous `postgres` crate.** ncps has no async runtime on its request path; the
//!   crate wraps `tokio-postgres` in a current-thread runtime per connection, driven only while
//!   a call blocks on it, so nothing runs in the background and no thread is added.
//! - **A pool of our own**, a `Mutex<Vec<_>>` and a `Condvar` as in the SQLite index rather than
//!   `r2d2`: a dozen lines, no extra crate and no background reaper thread, and it knows the
//!   one thing that matters here: a connection the server closed (a restart) is dropped, the
//!   idle ones with it, and the call is tried again on a new connection when nothing of it
//!   can have been committed (everything before `COMMIT`; a failed `COMMIT` is reported, as its
//!   outcome is unknown). A server that is down gives [`IndexError::Unreachable`] after at most
//!   [`CONNECT_TIMEOUT`] (unless the URL sets `connect_timeout`), never a panic or a hang.
//! - **Writers take one advisory lock** (`pg_advisory_xact_lock`) at their start, as SQLite's
//!   `BEGIN IMMEDIATE` does: every write is then the same check-then-change transaction as in
//!   SQLite, with the same outcome under concurrency, and writers cannot deadlock on the
//!   `totals` row. Readers take no lock (MVCC) and never wait for a writer.
//! - **The same schema and costs as SQLite's:** totals kept in one row, by triggers and by
//!   the deletes themselves (so [`Totals`] is one row), the LRU order an index on `(accessed_at, created_at)`, shard listings range scans
//!   of the primary keys, which are `COLLATE "C"` so that a range is a byte range whatever the
//!   database's locale. Migrations are embedded and applied at open, in one transaction under
//!   the same lock (so two ncps starting at once do not both migrate), with the version in a
//!   `schema_version` table.
//! - **Prepared statements are cached per connection**, so a statement costs one round trip,
//!   not two. Reads are single statements, atomic by themselves, so they run outside a
//!   transaction: one round trip. Writes add `BEGIN`, the lock and `COMMIT`.
//! - The URL's password is never logged: what is shown is [`crate::url::redact_url`]'s.
//! - **TLS as libpq does it**: `sslmode` (`disable`, `prefer` the default, `require`,
//!   `verify-ca`, `verify-full`) and `sslrootcert` in the URL, over rustls
//!   ([`super::pg_tls`], which says what each mode checks and why).

use super::{shard_range, Gone, IndexError, IndexedNar, IndexedNarinfo, NarRecord, Recorded, Removed, Totals};
use crate::url::redact_url;
use crate::nix::{Hash, NarName, StorePathHash};
use postgres::types::{FromSql, ToSql};
use super::pg_tls::{self, MakeRustls};
use postgres::{Client, GenericClient, NoTls, Row, Statement, Transaction};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Each entry moves the schema from version `index` to `index + 1`. Version 1 is SQLite's
/// schema version 3 at once, version 2 its 4, version 3 its 5.
const MIGRATIONS: &[&str] = &[r#"
    CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE nars (
        name TEXT COLLATE "C" PRIMARY KEY,
        file_hash TEXT NOT NULL,
        file_size BIGINT NOT NULL,
        upstream_url TEXT NOT NULL,
        stored BOOLEAN NOT NULL DEFAULT FALSE,
        zstd_size BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        accessed_at BIGINT NOT NULL
    );
    CREATE TABLE narinfos (
        hash TEXT COLLATE "C" PRIMARY KEY,
        store_path TEXT NOT NULL,
        nar_name TEXT COLLATE "C" NOT NULL,
        size BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        accessed_at BIGINT NOT NULL
    );
    CREATE INDEX narinfos_nar_name ON narinfos(nar_name);
    CREATE INDEX narinfos_lru ON narinfos(accessed_at, created_at);
    CREATE TABLE totals (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        narinfos BIGINT NOT NULL,
        narinfo_bytes BIGINT NOT NULL,
        nars BIGINT NOT NULL,
        nar_bytes BIGINT NOT NULL
    );
    INSERT INTO totals VALUES (0, 0, 0, 0, 0);
    CREATE FUNCTION ncps_narinfos_totals() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            UPDATE totals SET narinfos = narinfos + 1, narinfo_bytes = narinfo_bytes + NEW.size WHERE id = 0;
        ELSIF TG_OP = 'DELETE' THEN
            UPDATE totals SET narinfos = narinfos - 1, narinfo_bytes = narinfo_bytes - OLD.size WHERE id = 0;
        ELSIF NEW.size <> OLD.size THEN
            UPDATE totals SET narinfo_bytes = narinfo_bytes - OLD.size + NEW.size WHERE id = 0;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER narinfos_totals AFTER INSERT OR DELETE OR UPDATE OF size ON narinfos
        FOR EACH ROW EXECUTE FUNCTION ncps_narinfos_totals();
    -- A stored NAR counts its bytes and its zstd copy's; one not stored counts nothing.
    CREATE FUNCTION ncps_nars_totals() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        n BIGINT := 0;
        b BIGINT := 0;
    BEGIN
        IF TG_OP <> 'INSERT' THEN
            IF OLD.stored THEN n := n - 1; b := b - OLD.file_size - OLD.zstd_size; END IF;
        END IF;
        IF TG_OP <> 'DELETE' THEN
            IF NEW.stored THEN n := n + 1; b := b + NEW.file_size + NEW.zstd_size; END IF;
        END IF;
        IF n <> 0 OR b <> 0 THEN
            UPDATE totals SET nars = nars + n, nar_bytes = nar_bytes + b WHERE id = 0;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER nars_totals AFTER INSERT OR DELETE OR UPDATE OF stored, file_size, zstd_size ON nars
        FOR EACH ROW EXECUTE FUNCTION ncps_nars_totals();
"#,
    // 2: leases with an expiry (Index::take_lease), as SQLite's version 4.
    "CREATE TABLE leases (key TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at BIGINT NOT NULL);",
    // 3: as SQLite's version 5, deletes take their rows off the totals themselves
    // ([`take_off`]), once per statement, instead of a PL/pgSQL call per row. The functions
    // keep their DELETE branches; nothing calls them for a delete any more.
    "
    DROP TRIGGER narinfos_totals ON narinfos;
    CREATE TRIGGER narinfos_totals AFTER INSERT OR UPDATE OF size ON narinfos
        FOR EACH ROW EXECUTE FUNCTION ncps_narinfos_totals();
    DROP TRIGGER nars_totals ON nars;
    CREATE TRIGGER nars_totals AFTER INSERT OR UPDATE OF stored, file_size, zstd_size ON nars
        FOR EACH ROW EXECUTE FUNCTION ncps_nars_totals();
",
];

pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Connections in the pool at most. More than SQLite's 4: a server serves them in parallel.
const POOL_MAX: usize = 8;

/// How long a connection attempt may take when the URL does not say (`connect_timeout`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite's lease statement with PostgreSQL's placeholders (`?N` is `$N`).
const LEASE_TAKE: &str = "INSERT INTO leases(key, holder, expires_at) VALUES ($1, $2, $4)
     ON CONFLICT (key) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
     WHERE leases.holder = excluded.holder OR leases.expires_at <= $3";

/// The advisory lock every write transaction takes: "ncps" in ASCII.
const WRITE_LOCK: &str = "SELECT pg_advisory_xact_lock(1852010611)";

/// How many times a call is tried when connections turn out closed (a server restart closes
/// every pooled one; the pool drops them all at the first, so two tries suffice).
const ATTEMPTS: usize = 3;

fn backend(action: &'static str) -> impl FnOnce(postgres::Error) -> IndexError {
    move |e| IndexError::Backend { action, source: Box::new(Driver(e)) }
}

/// A driver error shown with its reasons: tokio-postgres's own text is only its kind ("error
/// performing TLS handshake", "db error"), the reason is in its `source()`. Those are added,
/// `: `-separated, each unless its text is already shown.
#[derive(Debug)]
struct Driver(postgres::Error);

impl std::fmt::Display for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        let mut next = std::error::Error::source(&self.0);
        while let Some(cause) = next {
            let text = cause.to_string();
            if !shown.contains(&text) {
                shown = format!("{shown}: {text}");
            }
            next = cause.source();
        }
        f.write_str(&shown)
    }
}

impl std::error::Error for Driver {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

fn parse_hash(h: &str) -> Result<StorePathHash, IndexError> {
    StorePathHash::parse(h).ok_or_else(|| IndexError::Corrupt(format!("narinfo hash {h:?}")))
}

fn parse_name(n: &str) -> Result<NarName, IndexError> {
    NarName::parse(n).ok_or_else(|| IndexError::Corrupt(format!("nar name {n:?}")))
}

fn nar_record(name: NarName, hash: &str, size: i64, upstream_url: String, stored: bool) -> Result<NarRecord, IndexError> {
    let file_hash = Hash::parse(hash).map_err(|e| IndexError::Corrupt(format!("nar {name}: file_hash: {e}")))?;
    Ok(NarRecord { name, file_hash, file_size: size.max(0) as u64, upstream_url, stored })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The pool's list is consistent at every step, so a panic elsewhere leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One connection and the statements prepared on it.
struct Session {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

struct Pool {
    config: postgres::Config,
    /// The TLS connector (none for `sslmode=disable`).
    tls: Option<MakeRustls>,
    /// The URL as logs and errors show it (no password).
    shown: String,
    /// Idle sessions, and how many exist (idle or lent).
    idle: Mutex<(Vec<Session>, usize)>,
    returned: Condvar,
}

/// A session borrowed from the pool: given back on drop, or dropped if its connection closed.
struct Conn<'a> {
    pool: &'a Pool,
    session: Option<Session>,
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let Some(s) = self.session.take() else { return };
        let mut idle = lock(&self.pool.idle);
        if s.client.is_closed() {
            idle.1 -= 1;
        } else {
            idle.0.push(s);
        }
        drop(idle);
        self.pool.returned.notify_one();
    }
}

impl Pool {
    fn connect(&self) -> Result<Session, IndexError> {
        let client = match &self.tls {
            None => self.config.connect(NoTls),
            Some(tls) => self.config.connect(tls.clone()),
        }
        .map_err(|e| IndexError::Unreachable { database: self.shown.clone(), source: Box::new(Driver(e)) })?;
        Ok(Session { client, statements: HashMap::new() })
    }

    fn get(&self) -> Result<Conn<'_>, IndexError> {
        let mut idle = lock(&self.idle);
        loop {
            if let Some(s) = idle.0.pop() {
                return Ok(Conn { pool: self, session: Some(s) });
            }
            if idle.1 < POOL_MAX {
                idle.1 += 1;
                drop(idle);
                let opened = self.connect();
                if opened.is_err() {
                    lock(&self.idle).1 -= 1;
                    self.returned.notify_one();
                }
                return Ok(Conn { pool: self, session: Some(opened?) });
            }
            idle = self.returned.wait(idle).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Drops every idle session: one connection found closed means the server went away, and
    /// the others were closed with it.
    fn drop_idle(&self) {
        let mut idle = lock(&self.idle);
        let n = idle.0.len();
        idle.0.clear();
        idle.1 -= n;
        drop(idle);
        self.returned.notify_all();
    }
}

/// A transaction (writes) or the bare connection (reads, each one statement and so atomic by
/// itself, one round trip), with the session's prepared statements.
struct Tx<'a, C: GenericClient> {
    c: &'a mut C,
    statements: &'a mut HashMap<&'static str, Statement>,
    action: &'static str,
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl<C: GenericClient> Tx<'_, C> {
    fn prepared(&mut self, sql: &'static str) -> Result<Statement, IndexError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.c.prepare(sql).map_err(backend(self.action))?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn query(&mut self, sql: &'static str, params: Params<'_>) -> Result<Vec<Row>, IndexError> {
        let s = self.prepared(sql)?;
        self.c.query(&s, params).map_err(backend(self.action))
    }

    fn opt(&mut self, sql: &'static str, params: Params<'_>) -> Result<Option<Row>, IndexError> {
        let s = self.prepared(sql)?;
        self.c.query_opt(&s, params).map_err(backend(self.action))
    }

    fn one(&mut self, sql: &'static str, params: Params<'_>) -> Result<Row, IndexError> {
        let s = self.prepared(sql)?;
        self.c.query_one(&s, params).map_err(backend(self.action))
    }

    fn exec(&mut self, sql: &'static str, params: Params<'_>) -> Result<u64, IndexError> {
        let s = self.prepared(sql)?;
        self.c.execute(&s, params).map_err(backend(self.action))
    }

    fn batch(&mut self, sql: &str) -> Result<(), IndexError> {
        self.c.batch_execute(sql).map_err(backend(self.action))
    }
}

/// A write transaction.
type Wtx<'a, 'b> = Tx<'a, Transaction<'b>>;
/// A read on the bare connection.
type Rd<'a> = Tx<'a, Client>;

/// Column `i` of `row`, or an error that says which action read it.
fn col<'r, T: FromSql<'r>>(row: &'r Row, i: usize, action: &'static str) -> Result<T, IndexError> {
    row.try_get(i).map_err(backend(action))
}

/// Whether a failed call may be tried again on another connection.
enum Retry {
    /// Nothing was committed (the failure came before `COMMIT`).
    Safe,
    /// `COMMIT` itself failed: it may or may not have taken effect.
    Unsafe,
}

pub struct PostgresIndex {
    pool: Pool,
}

impl PostgresIndex {
    /// Connects to the server `url` names and applies the migrations. With `may_create` false,
    /// a database without our schema is refused ([`IndexError::NotCreated`]) and left as it is.
    pub fn open(url: &str, may_create: bool) -> Result<PostgresIndex, IndexError> {
        let shown = redact_url(url);
        let pg_tls::Settings { mut config, tls, .. } =
            pg_tls::settings(url).map_err(|e| IndexError::BadUrl { database: shown.clone(), source: Box::new(e) })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("ncps");
        }
        let pool = Pool { config, tls, shown, idle: Mutex::new((Vec::new(), 0)), returned: Condvar::new() };
        let index = PostgresIndex { pool };
        index.migrate(may_create)?;
        Ok(index)
    }

    fn migrate(&self, may_create: bool) -> Result<(), IndexError> {
        const CTX: &str = "migrating the database";
        let shown = self.pool.shown.clone();
        self.write(CTX, |tx| {
            let known: bool = col(&tx.one("SELECT to_regclass('schema_version') IS NOT NULL", &[])?, 0, CTX)?;
            if !known {
                // Creating our tables next to someone else's would fail half-way or, worse,
                // mix two programs' rows in one table.
                let rows = tx.query(
                    "SELECT table_name::text FROM information_schema.tables
                     WHERE table_schema = current_schema() ORDER BY 1",
                    &[],
                )?;
                let tables = rows.iter().map(|r| col::<String>(r, 0, CTX)).collect::<Result<Vec<_>, _>>()?;
                if !tables.is_empty() {
                    return Err(IndexError::Foreign(tables));
                }
                if !may_create {
                    return Err(IndexError::NotCreated { database: shown.clone() });
                }
                tx.batch("CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (0);")?;
            }
            let found: i32 = col(&tx.one("SELECT version FROM schema_version", &[])?, 0, CTX)?;
            let found = found.max(0) as u32;
            if found > SCHEMA_VERSION {
                return Err(IndexError::NewerSchema { found, supported: SCHEMA_VERSION });
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
                tx.batch(sql)?;
                let version = (i + 1) as i32;
                tx.exec("UPDATE schema_version SET version = $1", &[&version])?;
                if found > 0 {
                    log::info!("database migrated to schema version {version}");
                }
            }
            Ok(())
        })
    }

    /// Runs `once` on a pooled session, trying again on a new connection when the one it had
    /// turns out closed and nothing can have been committed.
    fn run<T>(
        &self,
        action: &'static str,
        mut once: impl FnMut(&mut Session) -> Result<T, (IndexError, Retry)>,
    ) -> Result<T, IndexError> {
        let mut attempt = 1;
        loop {
            let mut conn = self.pool.get()?;
            let Some(session) = conn.session.as_mut() else {
                return Err(IndexError::Corrupt(format!("{action}: a pooled connection went missing")));
            };
            let (err, retry) = match once(session) {
                Ok(out) => return Ok(out),
                Err(failed) => failed,
            };
            let closed = conn.session.as_ref().is_some_and(|s| s.client.is_closed());
            if !closed {
                return Err(err);
            }
            drop(conn);
            self.pool.drop_idle();
            if !matches!(retry, Retry::Safe) || attempt >= ATTEMPTS {
                return Err(err);
            }
            log::warn!("index: the connection to {} was closed ({err}); reconnecting", self.pool.shown);
            attempt += 1;
        }
    }

    /// One statement on the bare connection (atomic by itself).
    fn read<T>(&self, action: &'static str, mut f: impl FnMut(&mut Rd<'_>) -> Result<T, IndexError>) -> Result<T, IndexError> {
        self.run(action, |session| {
            let Session { client, statements } = session;
            f(&mut Tx { c: client, statements, action }).map_err(|e| (e, Retry::Safe))
        })
    }

    /// A transaction under the write lock.
    fn write<T>(
        &self,
        action: &'static str,
        mut f: impl FnMut(&mut Wtx<'_, '_>) -> Result<T, IndexError>,
    ) -> Result<T, IndexError> {
        self.run(action, |session| {
            let Session { client, statements } = session;
            let mut tx = client.transaction().map_err(|e| (backend(action)(e), Retry::Safe))?;
            let out = {
                let mut t = Tx { c: &mut tx, statements, action };
                t.batch(WRITE_LOCK).map_err(|e| (e, Retry::Safe))?;
                f(&mut t).map_err(|e| (e, Retry::Safe))?
            };
            tx.commit().map_err(|e| (backend(action)(e), Retry::Unsafe))?;
            Ok(out)
        })
    }
}

/// Takes what a write transaction deleted off the totals: one UPDATE, in that transaction.
fn take_off(tx: &mut Wtx<'_, '_>, gone: &Gone) -> Result<(), IndexError> {
    if gone.is_empty() {
        return Ok(());
    }
    tx.exec(
        "UPDATE totals SET narinfos = narinfos - $1, narinfo_bytes = narinfo_bytes - $2,
             nars = nars - $3, nar_bytes = nar_bytes - $4 WHERE id = 0",
        &[&gone.narinfos, &gone.narinfo_bytes, &gone.nars, &gone.nar_bytes],
    )?;
    Ok(())
}

/// A deleted NAR row's name and, if it was stored, the bytes it counted.
fn removed_nar(row: &Row, action: &'static str) -> Result<(NarName, Option<u64>), IndexError> {
    let name: String = col(row, 0, action)?;
    let size: i64 = col(row, 1, action)?;
    let stored: bool = col(row, 2, action)?;
    Ok((parse_name(&name)?, stored.then_some(size.max(0) as u64)))
}

fn remove_nar_row(tx: &mut Wtx<'_, '_>, name: &str) -> Result<Option<(NarName, Option<u64>)>, IndexError> {
    let row = tx.opt("DELETE FROM nars WHERE name = $1 RETURNING name, file_size + zstd_size, stored", &[&name])?;
    row.map(|r| removed_nar(&r, tx.action)).transpose()
}

/// `items` with each key once, at its latest time: one row of an `UPDATE ... FROM unnest`
/// may match only one input row.
fn latest<'a>(items: impl Iterator<Item = (&'a str, i64)>) -> (Vec<&'a str>, Vec<i64>) {
    let mut by_key: HashMap<&str, i64> = HashMap::new();
    for (k, t) in items {
        let e = by_key.entry(k).or_insert(t);
        *e = (*e).max(t);
    }
    by_key.into_iter().unzip()
}

impl super::Index for PostgresIndex {
    fn check_integrity(&self) -> Result<(), IndexError> {
        const CTX: &str = "checking the database";
        // The server guards its own pages; what it cannot know is whether the totals the
        // triggers keep still match the rows. One statement: one snapshot.
        let v = self.read(CTX, |tx| {
            let r = tx.one(super::TOTALS_AGAINST_ROWS, &[])?;
            let mut v = [0i64; 8];
            for (i, x) in v.iter_mut().enumerate() {
                *x = col(&r, i, CTX)?;
            }
            Ok(v)
        })?;
        super::check_totals(v)
    }

    fn mend_derived(&self) -> Result<(), IndexError> {
        self.write("recounting the totals", |tx| tx.exec(super::TOTALS_RECOUNT, &[]).map(drop))
    }

    fn put_narinfo(&self, hash: &StorePathHash, store_path: &str, nar: &NarRecord, size: u64) -> Result<Recorded, IndexError> {
        const CTX: &str = "recording a narinfo";
        let t = super::now();
        let (h, name, file_hash) = (hash.as_str(), nar.name.as_str(), nar.file_hash.to_string());
        let (file_size, size) = (nar.file_size as i64, size as i64);
        self.write(CTX, |tx| {
            let old = match tx.opt("SELECT size FROM narinfos WHERE hash = $1", &[&h])? {
                Some(r) => col::<i64>(&r, 0, CTX)?,
                None => 0,
            };
            if let Some(r) = tx.opt("SELECT file_hash, file_size FROM nars WHERE name = $1", &[&name])? {
                let (known_hash, known_size): (String, i64) = (col(&r, 0, CTX)?, col(&r, 1, CTX)?);
                if known_hash != file_hash || known_size != file_size {
                    // The name stands for other bytes that another narinfo may use: untouched.
                    return Ok(Recorded::NameTaken);
                }
            }
            tx.exec(
                "INSERT INTO nars(name, file_hash, file_size, upstream_url, stored, created_at, accessed_at)
                 VALUES ($1, $2, $3, $4, FALSE, $5, $5)
                 ON CONFLICT (name) DO UPDATE SET upstream_url = excluded.upstream_url WHERE NOT nars.stored",
                &[&name, &file_hash, &file_size, &nar.upstream_url, &t],
            )?;
            tx.exec(
                "INSERT INTO narinfos(hash, store_path, nar_name, size, created_at, accessed_at)
                 VALUES ($1, $2, $3, $4, $5, $5)
                 ON CONFLICT (hash) DO UPDATE SET store_path = excluded.store_path,
                   nar_name = excluded.nar_name, size = excluded.size, accessed_at = excluded.accessed_at",
                &[&h, &store_path, &name, &size, &t],
            )?;
            Ok(Recorded::Done { replaced_size: old.max(0) as u64 })
        })
    }

    fn put_nar(&self, nar: &NarRecord) -> Result<bool, IndexError> {
        let t = super::now();
        let (name, file_hash, file_size) = (nar.name.as_str(), nar.file_hash.to_string(), nar.file_size as i64);
        self.write("recording a nar", |tx| {
            let changed = tx.exec(
                "INSERT INTO nars(name, file_hash, file_size, upstream_url, stored, created_at, accessed_at)
                 VALUES ($1, $2, $3, $4, FALSE, $5, $5)
                 ON CONFLICT (name) DO UPDATE SET accessed_at = excluded.accessed_at
                   WHERE nars.file_hash = excluded.file_hash AND nars.file_size = excluded.file_size",
                &[&name, &file_hash, &file_size, &nar.upstream_url, &t],
            )?;
            Ok(changed == 1)
        })
    }

    fn nar(&self, name: &NarName) -> Result<Option<NarRecord>, IndexError> {
        const CTX: &str = "reading a nar";
        self.read(CTX, |tx| {
            let Some(r) = tx.opt("SELECT file_hash, file_size, upstream_url, stored FROM nars WHERE name = $1", &[&name.as_str()])?
            else {
                return Ok(None);
            };
            let hash: String = col(&r, 0, CTX)?;
            nar_record(name.clone(), &hash, col(&r, 1, CTX)?, col(&r, 2, CTX)?, col(&r, 3, CTX)?).map(Some)
        })
    }

    fn narinfo_nar(&self, hash: &StorePathHash) -> Result<Option<NarName>, IndexError> {
        const CTX: &str = "reading a narinfo";
        self.read(CTX, |tx| {
            let row = tx.opt("SELECT nar_name FROM narinfos WHERE hash = $1", &[&hash.as_str()])?;
            Ok(match row {
                Some(r) => NarName::parse(&col::<String>(&r, 0, CTX)?),
                None => None,
            })
        })
    }

    fn set_nar_stored(&self, name: &NarName, stored: bool) -> Result<bool, IndexError> {
        self.write("marking a nar stored", |tx| {
            // A NAR no longer stored has no zstd copy either.
            let n = tx.exec(
                "UPDATE nars SET stored = $2, zstd_size = CASE WHEN $2 THEN zstd_size ELSE 0 END WHERE name = $1",
                &[&name.as_str(), &stored],
            )?;
            Ok(n > 0)
        })
    }

    fn set_nar_zstd(&self, name: &NarName, size: u64) -> Result<bool, IndexError> {
        let size = size as i64;
        self.write("recording a nar's zstd copy", |tx| {
            Ok(tx.exec("UPDATE nars SET zstd_size = $2 WHERE name = $1 AND stored", &[&name.as_str(), &size])? > 0)
        })
    }

    fn forget_nar_zstd(&self) -> Result<u64, IndexError> {
        self.write("forgetting the zstd copies", |tx| tx.exec("UPDATE nars SET zstd_size = 0 WHERE zstd_size <> 0", &[]))
    }

    fn totals(&self) -> Result<Totals, IndexError> {
        const CTX: &str = "reading the totals";
        self.read(CTX, |tx| {
            let r = tx.one("SELECT narinfos, narinfo_bytes, nars, nar_bytes FROM totals WHERE id = 0", &[])?;
            let n = |i: usize| col::<i64>(&r, i, CTX).map(|v| v.max(0) as u64);
            Ok(Totals { narinfos: n(0)?, narinfo_bytes: n(1)?, nars: n(2)?, nar_bytes: n(3)? })
        })
    }

    fn least_recently_used(&self, limit: usize, pending_before: i64) -> Result<Vec<(StorePathHash, u64)>, IndexError> {
        const CTX: &str = "choosing entries to evict";
        let limit = limit as i64;
        self.read(CTX, |tx| {
            let rows = tx.query(
                "SELECT i.hash, i.size + COALESCE(
                     (SELECT n.file_size FROM nars n WHERE n.name = i.nar_name AND n.stored), 0)
                 FROM narinfos i
                 WHERE i.accessed_at < $2
                    OR EXISTS (SELECT 1 FROM nars n WHERE n.name = i.nar_name AND n.stored)
                 ORDER BY i.accessed_at, i.created_at LIMIT $1",
                &[&limit, &pending_before],
            )?;
            rows.iter()
                .map(|r| Ok((parse_hash(col(r, 0, CTX)?)?, col::<i64>(r, 1, CTX)?.max(0) as u64)))
                .collect()
        })
    }

    fn unreferenced_nars(&self, limit: usize) -> Result<Vec<(NarName, u64)>, IndexError> {
        const CTX: &str = "listing unreferenced nars";
        let limit = limit as i64;
        self.read(CTX, |tx| {
            let rows = tx.query(
                "SELECT name, file_size FROM nars n WHERE stored
                 AND NOT EXISTS (SELECT 1 FROM narinfos i WHERE i.nar_name = n.name) LIMIT $1",
                &[&limit],
            )?;
            rows.iter()
                .map(|r| Ok((parse_name(col(r, 0, CTX)?)?, col::<i64>(r, 1, CTX)?.max(0) as u64)))
                .collect()
        })
    }

    fn remove_narinfos(&self, hashes: &[StorePathHash]) -> Result<Vec<Removed>, IndexError> {
        const CTX: &str = "removing narinfos";
        // Set-based: two statements for the whole batch, not three round trips per entry.
        let keys: Vec<&str> = hashes.iter().map(StorePathHash::as_str).collect();
        self.write(CTX, |tx| {
            let rows = tx.query("DELETE FROM narinfos WHERE hash = ANY($1) RETURNING hash, nar_name, size", &[&keys])?;
            let mut totals = Gone::default();
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let (hash, nar_name, size): (&str, String, i64) = (col(r, 0, CTX)?, col(r, 1, CTX)?, col(r, 2, CTX)?);
                totals.narinfo(size);
                out.push((nar_name, Removed { narinfos: vec![(parse_hash(hash)?, size.max(0) as u64)], nar: None }));
            }
            let mut names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            let rows = tx.query(
                "DELETE FROM nars n WHERE n.name = ANY($1)
                   AND NOT EXISTS (SELECT 1 FROM narinfos i WHERE i.nar_name = n.name)
                 RETURNING n.name, n.file_size + n.zstd_size, n.stored",
                &[&names],
            )?;
            let mut nars: HashMap<NarName, Option<u64>> = HashMap::with_capacity(rows.len());
            for r in &rows {
                let (name, size) = removed_nar(r, CTX)?;
                nars.insert(name, size);
            }
            let out = out
                .into_iter()
                .map(|(nar_name, mut removed)| {
                    // A NAR that two victims shared goes with the first.
                    if let Some((name, size)) = NarName::parse(&nar_name).and_then(|n| nars.remove_entry(&n)) {
                        removed.nar = Some((name, size));
                        totals.nar(&removed.nar);
                    }
                    removed
                })
                .collect();
            take_off(tx, &totals)?;
            Ok(out)
        })
    }

    fn remove_nar(&self, name: &NarName) -> Result<Option<Removed>, IndexError> {
        const CTX: &str = "removing a nar";
        self.write(CTX, |tx| {
            let rows = tx.query("DELETE FROM narinfos WHERE nar_name = $1 RETURNING hash, size", &[&name.as_str()])?;
            let mut totals = Gone::default();
            let mut narinfos = Vec::with_capacity(rows.len());
            for r in &rows {
                let size: i64 = col(r, 1, CTX)?;
                totals.narinfo(size);
                narinfos.push((parse_hash(col(r, 0, CTX)?)?, size.max(0) as u64));
            }
            let nar = remove_nar_row(tx, name.as_str())?;
            totals.nar(&nar);
            take_off(tx, &totals)?;
            if nar.is_none() && narinfos.is_empty() {
                return Ok(None);
            }
            Ok(Some(Removed { narinfos, nar }))
        })
    }

    fn delete_narinfo_row(&self, hash: &StorePathHash) -> Result<(), IndexError> {
        self.write("deleting a narinfo", |tx| {
            let mut totals = Gone::default();
            if let Some(r) = tx.opt("DELETE FROM narinfos WHERE hash = $1 RETURNING size", &[&hash.as_str()])? {
                totals.narinfo(col(&r, 0, tx.action)?);
            }
            take_off(tx, &totals)
        })
    }

    fn touch(&self, narinfos: &[(StorePathHash, i64)], nars: &[(NarName, i64)]) -> Result<(), IndexError> {
        if narinfos.is_empty() && nars.is_empty() {
            return Ok(());
        }
        let (hashes, hash_times) = latest(narinfos.iter().map(|(h, t)| (h.as_str(), *t)));
        let (names, name_times) = latest(nars.iter().map(|(n, t)| (n.as_str(), *t)));
        self.write("recording access times", |tx| {
            // One statement per table, however long the batch.
            if !hashes.is_empty() {
                tx.exec(
                    "UPDATE narinfos SET accessed_at = v.t FROM unnest($1::text[], $2::bigint[]) AS v(h, t)
                     WHERE narinfos.hash = v.h AND narinfos.accessed_at < v.t",
                    &[&hashes, &hash_times],
                )?;
            }
            if !names.is_empty() {
                tx.exec(
                    "UPDATE nars SET accessed_at = v.t FROM unnest($1::text[], $2::bigint[]) AS v(n, t)
                     WHERE nars.name = v.n AND nars.accessed_at < v.t",
                    &[&names, &name_times],
                )?;
                // A NAR's use is a use of every narinfo that points at it: that is what keeps
                // the LRU order a single index.
                tx.exec(
                    "UPDATE narinfos SET accessed_at = v.t FROM unnest($1::text[], $2::bigint[]) AS v(n, t)
                     WHERE narinfos.nar_name = v.n AND narinfos.accessed_at < v.t",
                    &[&names, &name_times],
                )?;
            }
            Ok(())
        })
    }

    fn take_lease(&self, key: &str, holder: &str, now: i64, ttl: i64) -> Result<bool, IndexError> {
        let ends = now.saturating_add(ttl);
        // The upsert is atomic under concurrent takers, so it needs no write lock; and it is
        // idempotent for its holder, so trying it again after a closed connection is safe.
        self.read("taking a lease", |tx| Ok(tx.exec(LEASE_TAKE, &[&key, &holder, &now, &ends])? == 1))
    }

    fn release_lease(&self, key: &str, holder: &str) -> Result<bool, IndexError> {
        // A transaction, so that a lost connection is retried only when nothing was committed.
        self.write("releasing a lease", |tx| {
            Ok(tx.exec("DELETE FROM leases WHERE key = $1 AND holder = $2", &[&key, &holder])? == 1)
        })
    }

    fn purge_expired_leases(&self, now: i64) -> Result<u64, IndexError> {
        // Idempotent, so it may be tried again on a new connection like a read.
        self.read("clearing expired leases", |tx| tx.exec("DELETE FROM leases WHERE expires_at <= $1", &[&now]))
    }

    fn lease_holder(&self, key: &str, now: i64) -> Result<Option<String>, IndexError> {
        const CTX: &str = "reading a lease";
        self.read(CTX, |tx| match tx.opt("SELECT holder FROM leases WHERE key = $1 AND expires_at > $2", &[&key, &now])? {
            Some(r) => col(&r, 0, CTX).map(Some),
            None => Ok(None),
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn narinfos_in_shard(&self, shard: &str) -> Result<Vec<IndexedNarinfo>, IndexError> {
        const CTX: &str = "listing narinfos";
        let (low, high) = shard_range(shard);
        self.read(CTX, |tx| {
            let rows = tx.query(
                "SELECT i.hash, i.nar_name, i.size, i.created_at,
                        EXISTS(SELECT 1 FROM nars n WHERE n.name = i.nar_name)
                 FROM narinfos i WHERE i.hash >= $1 AND i.hash < $2 ORDER BY i.hash",
                &[&low, &high],
            )?;
            rows.iter()
                .map(|r| {
                    let known: bool = col(r, 4, CTX)?;
                    Ok(IndexedNarinfo {
                        hash: parse_hash(col(r, 0, CTX)?)?,
                        nar: if known { NarName::parse(col(r, 1, CTX)?) } else { None },
                        size: col::<i64>(r, 2, CTX)?.max(0) as u64,
                        created_at: col(r, 3, CTX)?,
                    })
                })
                .collect()
        })
    }

    fn nars_in_shard(&self, shard: &str) -> Result<Vec<IndexedNar>, IndexError> {
        const CTX: &str = "listing nars";
        let (low, high) = shard_range(shard);
        self.read(CTX, |tx| {
            let rows = tx.query(
                "SELECT name, file_hash, file_size, upstream_url, stored, created_at
                 FROM nars WHERE name >= $1 AND name < $2 ORDER BY name",
                &[&low, &high],
            )?;
            rows.iter()
                .map(|r| {
                    let record = nar_record(
                        parse_name(col(r, 0, CTX)?)?,
                        col(r, 1, CTX)?,
                        col(r, 2, CTX)?,
                        col(r, 3, CTX)?,
                        col(r, 4, CTX)?,
                    )?;
                    Ok(IndexedNar { record, created_at: col(r, 5, CTX)? })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::pg_cluster::{self, Cluster};
    use crate::index::Index;

    fn fresh(label: &str) -> (String, PostgresIndex) {
        let url = pg_cluster::shared().create_database(label).expect("a database for the test");
        let index = PostgresIndex::open(&url, true).expect("opens");
        (url, index)
    }

    fn psql(url: &str, sql: &str) -> String {
        pg_cluster::shared().psql(url, sql).expect("psql")
    }

    #[test]
    fn the_postgres_index_keeps_the_contract() {
        let (_, index) = fresh("contract");
        crate::index::contract::every_rule(&index);
        index.check_integrity().expect("the totals match the rows");
    }

    #[test]
    fn reopening_applies_no_migration_twice_and_keeps_the_rows() {
        let (url, index) = fresh("reopen");
        let nar = NarRecord {
            name: NarName::parse(&format!("{}.nar", "1".repeat(52))).unwrap(),
            file_hash: Hash::of(b"x"),
            file_size: 7,
            upstream_url: String::new(),
            stored: false,
        };
        index.put_nar(&nar).unwrap();
        index.set_nar_stored(&nar.name, true).unwrap();
        drop(index);
        let again = PostgresIndex::open(&url, false).expect("an existing schema needs no creating");
        assert_eq!(again.totals().unwrap().nar_bytes, 7);
    }

    #[test]
    fn a_database_with_another_programs_tables_is_refused_untouched() {
        let url = pg_cluster::shared().create_database("foreign").unwrap();
        psql(&url, "CREATE TABLE schema_migrations (version TEXT); CREATE TABLE narinfos (id INTEGER)");
        let err = PostgresIndex::open(&url, true).err().expect("refused");
        assert!(matches!(&err, IndexError::Foreign(t) if t.contains(&"schema_migrations".to_string())), "{err}");
        assert_eq!(psql(&url, "SELECT to_regclass('schema_version') IS NULL"), "t", "nothing was created");
    }

    #[test]
    fn an_empty_database_is_not_given_a_schema_unless_allowed() {
        let url = pg_cluster::shared().create_database("nocreate").unwrap();
        let err = PostgresIndex::open(&url, false).err().expect("refused");
        assert!(matches!(err, IndexError::NotCreated { .. }), "{err}");
        assert!(!err.to_string().contains(pg_cluster::PASSWORD), "{err}");
        PostgresIndex::open(&url, true).expect("created when allowed");
    }

    #[test]
    fn a_version_1_database_is_migrated_to_leases_at_open() {
        let (url, index) = fresh("v1");
        drop(index);
        psql(&url, "DROP TABLE leases; UPDATE schema_version SET version = 1");
        let index = PostgresIndex::open(&url, false).expect("migrated");
        assert!(index.take_lease("k", "me", 0, 10).unwrap());
        assert_eq!(psql(&url, "SELECT version FROM schema_version"), SCHEMA_VERSION.to_string());
    }

    #[test]
    fn a_version_2_database_whose_deletes_fired_triggers_keeps_exact_totals_after_migrating() {
        let (url, index) = fresh("v2");
        let nar = crate::index::contract::some_nar();
        let hash = StorePathHash::parse(&"a".repeat(32)).unwrap();
        index.put_narinfo(&hash, "/nix/store/x", &nar, 10).unwrap();
        index.set_nar_stored(&nar.name, true).unwrap();
        drop(index);
        // Version 2's triggers, which fired on DELETE too.
        psql(
            &url,
            "DROP TRIGGER narinfos_totals ON narinfos; DROP TRIGGER nars_totals ON nars;
             CREATE TRIGGER narinfos_totals AFTER INSERT OR DELETE OR UPDATE OF size ON narinfos
                 FOR EACH ROW EXECUTE FUNCTION ncps_narinfos_totals();
             CREATE TRIGGER nars_totals AFTER INSERT OR DELETE OR UPDATE OF stored, file_size, zstd_size ON nars
                 FOR EACH ROW EXECUTE FUNCTION ncps_nars_totals();
             UPDATE schema_version SET version = 2",
        );
        let index = PostgresIndex::open(&url, false).expect("migrated");
        let removed = index.remove_narinfos(&[hash]).unwrap();
        assert_eq!(removed[0].nar, Some((nar.name.clone(), Some(nar.file_size))));
        assert_eq!(index.totals().unwrap(), Totals::default(), "taken off once, not twice");
        index.check_integrity().expect("the totals match the rows");
    }

    #[test]
    fn a_newer_schema_is_refused_with_a_clear_message() {
        let (url, index) = fresh("newer");
        drop(index);
        psql(&url, "UPDATE schema_version SET version = 99");
        let err = PostgresIndex::open(&url, true).err().expect("refused");
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }

    #[test]
    fn a_wrong_password_is_an_unreachable_error_that_does_not_show_the_password() {
        let url = pg_cluster::shared().create_database("badpw").unwrap();
        let wrong = url.replace(pg_cluster::PASSWORD, "not-the-password-8c2");
        let err = PostgresIndex::open(&wrong, true).err().expect("refused");
        assert!(matches!(err, IndexError::Unreachable { .. }), "{err}");
        let shown = err.to_string();
        assert!(shown.contains("ncps:***@127.0.0.1"), "{shown}");
        assert!(!shown.contains("not-the-password-8c2"), "{shown}");
    }

    /// Whether the session the pool lends is encrypted, as the server sees it.
    fn ssl_in_use(index: &PostgresIndex) -> bool {
        const CTX: &str = "asking the server about TLS";
        index
            .read(CTX, |tx| col(&tx.one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])?, 0, CTX))
            .expect("pg_stat_ssl")
    }

    /// A database on the shared TLS cluster, and its URL with `query` added.
    fn tls_url(label: &str, query: &str) -> String {
        let url = pg_cluster::shared_tls().create_database(label).expect("a database on the TLS server");
        format!("{url}?{query}")
    }

    #[test]
    fn sslmode_require_works_against_a_tls_server_and_the_session_is_encrypted() {
        let index = PostgresIndex::open(&tls_url("require", "sslmode=require"), true).expect("opens over TLS");
        assert!(ssl_in_use(&index), "the server sees TLS");
        crate::index::contract::every_rule(&index);
    }

    #[test]
    fn channel_binding_is_offered_over_tls_so_that_channel_binding_require_logs_in() {
        // SCRAM-SHA-256-PLUS with tls-server-end-point: the hash our DER walk picks must be
        // the server's, or the login fails.
        let url = tls_url("binding", "sslmode=require&channel_binding=require");
        assert!(ssl_in_use(&PostgresIndex::open(&url, true).expect("a channel-bound SCRAM login")));
    }

    #[test]
    fn prefer_the_default_uses_tls_when_the_server_offers_it_and_disable_does_not() {
        let url = pg_cluster::shared_tls().create_database("prefer_tls").unwrap();
        assert!(ssl_in_use(&PostgresIndex::open(&url, true).unwrap()), "no sslmode is prefer, as in libpq");
        assert!(ssl_in_use(&PostgresIndex::open(&format!("{url}?sslmode=prefer"), true).unwrap()));
        assert!(!ssl_in_use(&PostgresIndex::open(&format!("{url}?sslmode=disable"), true).unwrap()));
    }

    #[test]
    fn verify_full_with_the_servers_ca_as_sslrootcert_works_by_address_and_by_name() {
        let cluster = pg_cluster::shared_tls();
        let ca = cluster.ca_file();
        let url = tls_url("verify_full", &format!("sslmode=verify-full&sslrootcert={}", ca.display()));
        let index = PostgresIndex::open(&url, true).expect("the certificate is for 127.0.0.1 and signed by the CA");
        assert!(ssl_in_use(&index));
        drop(index);
        let by_name = url.replace("@127.0.0.1:", "@localhost:");
        assert!(ssl_in_use(&PostgresIndex::open(&by_name, true).expect("and for localhost")));
        let ca_only = url.replace("verify-full", "verify-ca");
        assert!(ssl_in_use(&PostgresIndex::open(&ca_only, true).expect("verify-ca")));
    }

    #[test]
    fn verify_full_with_a_ca_that_did_not_sign_the_servers_certificate_is_refused_naming_the_cause() {
        let other = pg_cluster::shared_tls().other_ca_file();
        for mode in ["verify-full", "verify-ca", "require"] {
            let url = tls_url("wrong_ca", &format!("sslmode={mode}&sslrootcert={}", other.display()));
            let err = PostgresIndex::open(&url, true).err().expect("refused");
            assert!(matches!(err, IndexError::Unreachable { .. }), "{err}");
            let shown = err.to_string();
            let cause = format!("the server's certificate is not signed by the CA in sslrootcert={}", other.display());
            assert!(shown.contains(&cause), "{mode}: {shown}");
            assert!(!shown.contains(pg_cluster::PASSWORD), "{shown}");
        }
    }

    #[test]
    fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
        let cluster = pg_cluster::shared_tls();
        let ca = cluster.ca_file();
        // TCP to 127.0.0.1 (hostaddr), but the certificate is checked against the host named.
        let url = tls_url("hostname", &format!("hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}", ca.display()))
            .replace("@127.0.0.1:", "@db.invalid:");
        let err = PostgresIndex::open(&url, true).err().expect("the certificate is not for db.invalid");
        let shown = err.to_string();
        assert!(shown.contains(r#"the server's certificate is not for the host "db.invalid""#), "{shown}");
        let index = PostgresIndex::open(&url.replace("verify-full", "verify-ca"), true).expect("verify-ca checks no name");
        assert!(ssl_in_use(&index));
    }

    #[test]
    fn sslmode_require_against_a_server_without_tls_is_refused() {
        let url = pg_cluster::shared().create_database("require_plain").unwrap();
        let err = PostgresIndex::open(&format!("{url}?sslmode=require"), true).err().expect("refused");
        assert!(matches!(err, IndexError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("server does not support TLS"), "{err}");
        assert!(!err.to_string().contains(pg_cluster::PASSWORD), "{err}");
    }

    #[test]
    fn sslmode_prefer_falls_back_to_plain_against_a_server_without_tls() {
        let url = pg_cluster::shared().create_database("prefer_plain").unwrap();
        let index = PostgresIndex::open(&format!("{url}?sslmode=prefer"), true).expect("plain, as libpq does");
        assert!(!ssl_in_use(&index));
        assert!(index.put_nar(&crate::index::contract::some_nar()).unwrap());
    }

    #[test]
    fn a_bad_sslmode_is_a_configuration_error_found_before_connecting() {
        // Port 9: nothing listens, so an attempt to connect would be an Unreachable error.
        let url = format!("postgresql://ncps:{}@127.0.0.1:9/x?sslmode=verify-everything", pg_cluster::PASSWORD);
        let err = PostgresIndex::open(&url, true).err().expect("refused");
        assert!(matches!(err, IndexError::BadUrl { .. }), "{err}");
        let shown = err.to_string();
        assert!(shown.contains(r#"sslmode="verify-everything" is not supported"#), "{shown}");
        assert!(!shown.contains(pg_cluster::PASSWORD), "{shown}");
        let missing = url.replace("verify-everything", "verify-full&sslrootcert=/nonexistent/ca.pem");
        let err = PostgresIndex::open(&missing, true).err().expect("refused");
        assert!(matches!(err, IndexError::BadUrl { .. }) && err.to_string().contains("cannot be read"), "{err}");
    }

    #[test]
    fn damaged_totals_are_found_by_the_integrity_check() {
        let (url, index) = fresh("damaged");
        index.check_integrity().unwrap();
        psql(&url, "UPDATE totals SET nar_bytes = 12345");
        let err = index.check_integrity().expect_err("the mismatch is found");
        assert!(matches!(err, IndexError::TotalsDrift { kept: [_, _, _, 12345], counted: [_, _, _, 0] }), "{err}");
        index.mend_derived().unwrap();
        index.check_integrity().expect("recounted");
        assert_eq!(index.totals().unwrap(), Totals::default());
    }

    #[test]
    fn writers_from_many_threads_keep_the_totals_exact() {
        let (_, index) = fresh("threads");
        let index = std::sync::Arc::new(index);
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let index = index.clone();
                std::thread::spawn(move || {
                    for i in 0..20u8 {
                        let c = |n: u8| char::from(b"0123456789abcdfghijklmnpqrsvwxyz"[(n % 32) as usize]);
                        let hash = StorePathHash::parse(&format!("{}{}{}", c(t), c(i), "0".repeat(30))).unwrap();
                        let nar = NarRecord {
                            name: NarName::parse(&format!("{}{}{}.nar", c(t), c(i / 2), "0".repeat(50))).unwrap(),
                            file_hash: Hash::of(b"same"),
                            file_size: 10,
                            upstream_url: String::new(),
                            stored: false,
                        };
                        index.put_narinfo(&hash, "/nix/store/x", &nar, 1).unwrap();
                        index.set_nar_stored(&nar.name, true).unwrap();
                        index.touch(&[(hash, crate::index::now() + 5)], &[(nar.name.clone(), crate::index::now())]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // 8 threads x 20 narinfos, two per NAR: 80 NARs of 10 bytes.
        assert_eq!(index.totals().unwrap(), Totals { narinfos: 160, narinfo_bytes: 160, nars: 80, nar_bytes: 800 });
        index.check_integrity().unwrap();
    }

    #[test]
    fn a_server_restart_costs_no_call_and_a_server_that_is_down_is_an_error_not_a_panic() {
        let cluster = Cluster::start().expect("a cluster of its own, to restart");
        let url = cluster.create_database("restart").unwrap();
        let index = PostgresIndex::open(&url, true).unwrap();
        // Fill the pool with several connections, so that all of them go stale at once.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| index.totals().unwrap());
            }
        });
        cluster.restart().expect("restarted");
        assert_eq!(index.totals().expect("reconnected after the restart"), Totals::default());
        assert!(index.put_nar(&crate::index::contract::some_nar()).expect("writes after the restart"));

        cluster.stop().unwrap();
        let started = std::time::Instant::now();
        let err = index.totals().expect_err("the server is down");
        assert!(matches!(err, IndexError::Unreachable { .. }), "{err}");
        assert!(started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(1), "bounded by the connect timeout");
        assert!(!err.to_string().contains(pg_cluster::PASSWORD), "{err}");
        cluster.start_server().unwrap();
        assert_eq!(index.totals().expect("back once the server is").nars, 0);
    }
}

/// What the index's calls cost, PostgreSQL (a local server over TCP) beside SQLite (a file):
/// `cargo test --release --lib --features postgres index_call_costs -- --ignored --nocapture`
/// (DESIGN.md, "PostgreSQL index").
#[cfg(test)]
mod costs {
    use super::*;
    use crate::index::{pg_cluster, Index, SqliteIndex};
    use std::time::Instant;

    fn entry(i: u32) -> (StorePathHash, NarRecord) {
        let key = crate::nix::nix32::encode(&i.to_le_bytes());
        let hash = StorePathHash::parse(&format!("{key}{}", "0".repeat(32 - key.len()))).expect("hash");
        let name = NarName::parse(&format!("{key}{}.nar.xz", "0".repeat(52 - key.len()))).expect("name");
        (hash, NarRecord { name, file_hash: Hash::of(&i.to_le_bytes()), file_size: 1000, upstream_url: String::new(), stored: false })
    }

    fn measure(label: &str, index: &dyn Index) {
        const N: u32 = 2000;
        let each = |what: &str, started: Instant, n: u32| {
            println!("{label:>10} {what:<28} {:>8.1} µs", started.elapsed().as_secs_f64() * 1e6 / f64::from(n));
        };
        let t = Instant::now();
        for i in 0..N {
            let (h, nar) = entry(i);
            index.put_narinfo(&h, "/nix/store/x", &nar, 500).expect("put");
            index.set_nar_stored(&nar.name, true).expect("stored");
        }
        each("put_narinfo + set_nar_stored", t, N);
        let t = Instant::now();
        for i in 0..N {
            index.nar(&entry(i).1.name).expect("nar");
        }
        each("nar", t, N);
        let t = Instant::now();
        for _ in 0..N {
            index.totals().expect("totals");
        }
        each("totals", t, N);
        let batch: Vec<_> = (0..N).map(|i| (entry(i).0, crate::index::now() + i64::from(i))).collect();
        let t = Instant::now();
        index.touch(&batch, &[]).expect("touch");
        each("touch (per entry, one batch)", t, N);
        let t = Instant::now();
        for _ in 0..100 {
            index.least_recently_used(100, 0).expect("lru");
        }
        each("least_recently_used(100)", t, 100);
        let victims: Vec<_> = (0..N).map(|i| entry(i).0).collect();
        let t = Instant::now();
        for chunk in victims.chunks(500) {
            index.remove_narinfos(chunk).expect("remove");
        }
        each("remove_narinfos (batches of 500)", t, N);
        assert_eq!(index.totals().expect("totals"), Totals::default());
    }

    #[test]
    #[ignore]
    fn index_call_costs() {
        let dir = std::env::temp_dir().join(format!("ncps-costs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        measure("sqlite", &SqliteIndex::open(&dir.join("db.sqlite")).expect("sqlite"));
        let url = pg_cluster::shared().create_database("costs").expect("database");
        measure("postgresql", &PostgresIndex::open(&url, true).expect("postgres"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
