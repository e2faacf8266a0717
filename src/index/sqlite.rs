//! The SQLite index (bundled SQLite, WAL, `synchronous=NORMAL`), the embedded default.
//!
//! Migrations are embedded and applied at open, so there is no separate migrate step; a
//! database written by a newer ncps is refused rather than guessed at. Connections come from a
//! small pool: in WAL mode readers never wait for the writer, so a NAR miss looking up its
//! record is not held up by an eviction batch. Writes take the write lock at their start
//! (`BEGIN IMMEDIATE`), so two writers queue instead of failing on an upgrade.
//!
//! Costs that stay flat as the store grows (DESIGN.md, "A million entries"): totals are kept
//! in a row, not summed (by triggers for inserts and updates, by the deleting transaction
//! itself for deletes, once per batch); the LRU order is an index on the narrow `uses` table
//! (a narinfo's id and its last use, which also counts the uses of its NAR), so choosing
//! victims reads a few hundred index entries instead of sorting a join of both tables, and
//! recording a use rewrites a 12-byte row instead of a 200-byte one (schema 6). A narinfo
//! points at its NAR by the NAR's integer id (schema 7), so an eviction batch finds and
//! deletes its victims' NARs in insertion order instead of by name: at a million entries a
//! pass went from 21k to 32-33k entries/s on a tmpfs, reading 26 KB per entry instead of 61.

use super::{
    shard_range, Gone, IndexError, IndexedNar, IndexedNarinfo, NarRecord, Recorded, Removed, Totals,
};
use crate::nix::{Hash, NarName, StorePathHash};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Each entry moves the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE config (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE nars (
        name TEXT PRIMARY KEY,
        file_hash TEXT NOT NULL,
        file_size INTEGER NOT NULL,
        upstream_url TEXT NOT NULL,
        stored INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        accessed_at INTEGER NOT NULL
    );
    CREATE TABLE narinfos (
        hash TEXT PRIMARY KEY,
        store_path TEXT NOT NULL,
        nar_name TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        accessed_at INTEGER NOT NULL
    );
    CREATE INDEX narinfos_nar_name ON narinfos(nar_name);
    CREATE INDEX narinfos_accessed_at ON narinfos(accessed_at);
",
    // 2: totals kept by triggers; LRU order served by an index.
    "
    CREATE TABLE totals (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        narinfos INTEGER NOT NULL,
        narinfo_bytes INTEGER NOT NULL,
        nars INTEGER NOT NULL,
        nar_bytes INTEGER NOT NULL
    );
    INSERT INTO totals VALUES (0,
        (SELECT COUNT(*) FROM narinfos), (SELECT COALESCE(SUM(size), 0) FROM narinfos),
        (SELECT COUNT(*) FROM nars WHERE stored = 1),
        (SELECT COALESCE(SUM(file_size), 0) FROM nars WHERE stored = 1));
    CREATE TRIGGER narinfos_added AFTER INSERT ON narinfos BEGIN
        UPDATE totals SET narinfos = narinfos + 1, narinfo_bytes = narinfo_bytes + NEW.size WHERE id = 0;
    END;
    CREATE TRIGGER narinfos_removed AFTER DELETE ON narinfos BEGIN
        UPDATE totals SET narinfos = narinfos - 1, narinfo_bytes = narinfo_bytes - OLD.size WHERE id = 0;
    END;
    CREATE TRIGGER narinfos_resized AFTER UPDATE OF size ON narinfos BEGIN
        UPDATE totals SET narinfo_bytes = narinfo_bytes - OLD.size + NEW.size WHERE id = 0;
    END;
    CREATE TRIGGER nars_added AFTER INSERT ON nars WHEN NEW.stored BEGIN
        UPDATE totals SET nars = nars + 1, nar_bytes = nar_bytes + NEW.file_size WHERE id = 0;
    END;
    CREATE TRIGGER nars_removed AFTER DELETE ON nars WHEN OLD.stored BEGIN
        UPDATE totals SET nars = nars - 1, nar_bytes = nar_bytes - OLD.file_size WHERE id = 0;
    END;
    CREATE TRIGGER nars_changed AFTER UPDATE OF stored, file_size ON nars WHEN OLD.stored OR NEW.stored BEGIN
        UPDATE totals SET nars = nars - OLD.stored + NEW.stored,
            nar_bytes = nar_bytes - OLD.stored * OLD.file_size + NEW.stored * NEW.file_size WHERE id = 0;
    END;
    UPDATE narinfos SET accessed_at = max(accessed_at,
        COALESCE((SELECT n.accessed_at FROM nars n WHERE n.name = narinfos.nar_name), 0));
    DROP INDEX narinfos_accessed_at;
    CREATE INDEX narinfos_lru ON narinfos(accessed_at, created_at);
",
    // 3: the size of a NAR's zstd copy (served to clients that ask), counted in nar_bytes.
    "
    ALTER TABLE nars ADD COLUMN zstd_size INTEGER NOT NULL DEFAULT 0;
    DROP TRIGGER nars_removed;
    CREATE TRIGGER nars_removed AFTER DELETE ON nars WHEN OLD.stored BEGIN
        UPDATE totals SET nars = nars - 1, nar_bytes = nar_bytes - OLD.file_size - OLD.zstd_size WHERE id = 0;
    END;
    CREATE TRIGGER nars_zstd_resized AFTER UPDATE OF stored, zstd_size ON nars WHEN OLD.stored OR NEW.stored BEGIN
        UPDATE totals SET nar_bytes = nar_bytes - OLD.stored * OLD.zstd_size + NEW.stored * NEW.zstd_size WHERE id = 0;
    END;
",
    // 4: leases with an expiry (Index::take_lease), for replicas sharing an index.
    "
    CREATE TABLE leases (key TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at INTEGER NOT NULL);
",
    // 5: deletes take their rows off the totals in the statement that removes them
    // ([`take_off`]), once per batch, not in a trigger per row: an eviction pass spent a third
    // of its index time in those triggers and the statement journal they need (DESIGN.md,
    // "A million entries"). Inserts and updates, one row at a time, keep theirs.
    "
    DROP TRIGGER narinfos_removed;
    DROP TRIGGER nars_removed;
",
    // 6: last-use times in a narrow table of their own, carrying the LRU order. A use of one
    // narinfo among a million rewrote a random row of the wide `narinfos` table (~200 bytes a
    // row) and a random entry of its LRU index: a batch of 32k uses dirtied ~25k pages
    // (~107 MB of WAL). A `uses` row is the narinfo's id and a time (~12 bytes), so the same
    // batch dirties a few thousand (~26 MB), whatever the store holds (DESIGN.md, "A million
    // entries"). `narinfos` gets an explicit integer key for that (a plain rowid may be
    // renumbered by VACUUM), given in LRU order, so that ties in time keep it; the id is the
    // tie-break from now on, as `created_at` was.
    "
    CREATE TABLE narinfos_v6 (
        id INTEGER PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        store_path TEXT NOT NULL,
        nar_name TEXT NOT NULL,
        size INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE uses (id INTEGER PRIMARY KEY, at INTEGER NOT NULL);
    INSERT INTO narinfos_v6(hash, store_path, nar_name, size, created_at)
        SELECT hash, store_path, nar_name, size, created_at FROM narinfos INDEXED BY narinfos_lru
        ORDER BY accessed_at, created_at;
    INSERT INTO uses(id, at)
        SELECT n.id, o.accessed_at FROM narinfos_v6 n JOIN narinfos o ON o.hash = n.hash ORDER BY n.id;
    DROP TABLE narinfos;
    ALTER TABLE narinfos_v6 RENAME TO narinfos;
    CREATE INDEX narinfos_nar_name ON narinfos(nar_name);
    CREATE INDEX uses_lru ON uses(at);
    CREATE TRIGGER narinfos_added AFTER INSERT ON narinfos BEGIN
        UPDATE totals SET narinfos = narinfos + 1, narinfo_bytes = narinfo_bytes + NEW.size WHERE id = 0;
    END;
    CREATE TRIGGER narinfos_resized AFTER UPDATE OF size ON narinfos BEGIN
        UPDATE totals SET narinfo_bytes = narinfo_bytes - OLD.size + NEW.size WHERE id = 0;
    END;
",
    // 7: a narinfo points at its NAR by the NAR's integer id, not by its name. At a million
    // entries an eviction batch visited three indexes keyed by content hashes (the narinfo's
    // hash, `narinfos_nar_name`, `nars`' name) on mostly distinct leaves, ~5 leaf visits an
    // entry, most of them reads from outside SQLite's cache. Ids follow insertion, so the
    // victims' `nar_id` entries and NAR rows are neighbours: the hash index and `nars`' name
    // index are the only random visits left (DESIGN.md, "A million entries"). `nars` gets an
    // explicit key (`AUTOINCREMENT`: an id is never given again, so a stale reference can
    // never point at another NAR). `nar_id` is NULL where the NAR's row is missing, which
    // only damage from outside makes and which listings already report as an unknown NAR.
    "
    CREATE TABLE nars_v7 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL UNIQUE,
        file_hash TEXT NOT NULL,
        file_size INTEGER NOT NULL,
        upstream_url TEXT NOT NULL,
        stored INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        accessed_at INTEGER NOT NULL,
        zstd_size INTEGER NOT NULL DEFAULT 0
    );
    INSERT INTO nars_v7(name, file_hash, file_size, upstream_url, stored, created_at, accessed_at, zstd_size)
        SELECT name, file_hash, file_size, upstream_url, stored, created_at, accessed_at, zstd_size
        FROM nars ORDER BY rowid;
    CREATE TABLE narinfos_v7 (
        id INTEGER PRIMARY KEY,
        hash TEXT NOT NULL UNIQUE,
        store_path TEXT NOT NULL,
        nar_id INTEGER,
        size INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    INSERT INTO narinfos_v7(id, hash, store_path, nar_id, size, created_at)
        SELECT i.id, i.hash, i.store_path, (SELECT n.id FROM nars_v7 n WHERE n.name = i.nar_name), i.size, i.created_at
        FROM narinfos i ORDER BY i.id;
    DROP TABLE narinfos;
    DROP TABLE nars;
    ALTER TABLE nars_v7 RENAME TO nars;
    ALTER TABLE narinfos_v7 RENAME TO narinfos;
    CREATE INDEX narinfos_nar ON narinfos(nar_id);
    CREATE TRIGGER narinfos_added AFTER INSERT ON narinfos BEGIN
        UPDATE totals SET narinfos = narinfos + 1, narinfo_bytes = narinfo_bytes + NEW.size WHERE id = 0;
    END;
    CREATE TRIGGER narinfos_resized AFTER UPDATE OF size ON narinfos BEGIN
        UPDATE totals SET narinfo_bytes = narinfo_bytes - OLD.size + NEW.size WHERE id = 0;
    END;
    CREATE TRIGGER nars_added AFTER INSERT ON nars WHEN NEW.stored BEGIN
        UPDATE totals SET nars = nars + 1, nar_bytes = nar_bytes + NEW.file_size WHERE id = 0;
    END;
    CREATE TRIGGER nars_changed AFTER UPDATE OF stored, file_size ON nars WHEN OLD.stored OR NEW.stored BEGIN
        UPDATE totals SET nars = nars - OLD.stored + NEW.stored,
            nar_bytes = nar_bytes - OLD.stored * OLD.file_size + NEW.stored * NEW.file_size WHERE id = 0;
    END;
    CREATE TRIGGER nars_zstd_resized AFTER UPDATE OF stored, zstd_size ON nars WHEN OLD.stored OR NEW.stored BEGIN
        UPDATE totals SET nar_bytes = nar_bytes - OLD.stored * OLD.zstd_size + NEW.stored * NEW.zstd_size WHERE id = 0;
    END;
",
];

pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Takes a lease if it is free, expired, or already the holder's (renewing it): one statement,
/// so two takers cannot both win. The same SQL in PostgreSQL.
pub(crate) const LEASE_TAKE: &str = "INSERT INTO leases(key, holder, expires_at) VALUES (?1, ?2, ?4)
     ON CONFLICT(key) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
     WHERE leases.holder = excluded.holder OR leases.expires_at <= ?3";

/// Connections in the pool at most: the worker threads rarely need the index at once (hits
/// never do), and each connection keeps its own page cache.
const POOL_MAX: usize = 4;

fn fail(action: &'static str) -> impl FnOnce(rusqlite::Error) -> IndexError {
    move |e| IndexError::Backend { action, source: Box::new(e) }
}

trait Context<T> {
    fn context(self, action: &'static str) -> Result<T, IndexError>;
}

impl<T> Context<T> for Result<T, rusqlite::Error> {
    fn context(self, action: &'static str) -> Result<T, IndexError> {
        self.map_err(fail(action))
    }
}

fn parse_hash(h: &str) -> Result<StorePathHash, IndexError> {
    StorePathHash::parse(h).ok_or_else(|| IndexError::Corrupt(format!("narinfo hash {h:?}")))
}

fn parse_name(n: &str) -> Result<NarName, IndexError> {
    NarName::parse(n).ok_or_else(|| IndexError::Corrupt(format!("nar name {n:?}")))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave SQLite inconsistent (its own transactions
    // guard that), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Pool {
    /// `None`: one in-memory database (tests), so the pool holds exactly one connection.
    path: Option<PathBuf>,
    idle: Mutex<(Vec<Connection>, usize)>,
    returned: Condvar,
}

/// A connection borrowed from the pool, given back on drop.
struct Conn<'a> {
    pool: &'a Pool,
    conn: Option<Connection>,
}

impl std::ops::Deref for Conn<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn.as_ref().expect("a pooled connection is present until drop")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn.as_mut().expect("a pooled connection is present until drop")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            lock(&self.pool.idle).0.push(c);
            self.pool.returned.notify_one();
        }
    }
}

impl Pool {
    fn get(&self) -> Result<Conn<'_>, IndexError> {
        let mut idle = lock(&self.idle);
        loop {
            if let Some(c) = idle.0.pop() {
                return Ok(Conn { pool: self, conn: Some(c) });
            }
            if let (Some(path), true) = (&self.path, idle.1 < POOL_MAX) {
                idle.1 += 1;
                drop(idle);
                let opened = Connection::open(path).context("opening a database connection").and_then(|c| {
                    configure(&c)?;
                    Ok(c)
                });
                if opened.is_err() {
                    lock(&self.idle).1 -= 1;
                }
                return Ok(Conn { pool: self, conn: Some(opened?) });
            }
            idle = self.returned.wait(idle).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn configure(conn: &Connection) -> Result<(), IndexError> {
    conn.busy_timeout(Duration::from_secs(5)).context("configuring the database")?;
    // NORMAL in WAL mode: a power cut may lose the last transactions but never corrupts;
    // the start-up check reconciles the store after anything but a clean stop.
    conn.pragma_update(None, "synchronous", "NORMAL").context("configuring the database")?;
    // A checkpoint every 16,000 WAL pages (64 MiB), not SQLite's 1,000: an eviction pass
    // changes ~2,500 pages per 4,096 entries, so with the default every batch paid for a
    // checkpoint and its fsync (DESIGN.md, "A million entries"). The WAL file is cut back to
    // 64 MiB after a checkpoint, and a clean stop removes it.
    conn.pragma_update(None, "wal_autocheckpoint", 16_000).context("configuring the database")?;
    conn.pragma_update(None, "journal_size_limit", 64i64 << 20).context("configuring the database")?;
    Ok(())
}

pub struct SqliteIndex {
    pool: Pool,
}

impl SqliteIndex {
    /// Opens the database, creating and migrating it as needed.
    pub fn open(path: &Path) -> Result<SqliteIndex, IndexError> {
        let conn = Connection::open(path).context("opening the database")?;
        Self::setup(conn, Some(path.to_path_buf()))
    }

    pub fn open_in_memory() -> Result<SqliteIndex, IndexError> {
        Self::setup(Connection::open_in_memory().context("opening an in-memory database")?, None)
    }

    fn setup(mut conn: Connection, path: Option<PathBuf>) -> Result<SqliteIndex, IndexError> {
        const CTX: &str = "opening the database";
        conn.busy_timeout(Duration::from_secs(5)).context(CTX)?;
        // A file that is not SQLite fails here, on the first read, with "file is not a database".
        let found: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).context(CTX)?;
        if found > SCHEMA_VERSION {
            return Err(IndexError::NewerSchema { found, supported: SCHEMA_VERSION });
        }
        if found == 0 {
            // Creating our tables next to someone else's would fail half-way ("table narinfos
            // already exists") or, worse, succeed and mix two indexes in one file.
            let mut stmt =
                conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").context(CTX)?;
            let tables: Vec<String> =
                stmt.query_map([], |r| r.get(0)).context(CTX)?.collect::<Result<_, _>>().context(CTX)?;
            drop(stmt);
            if !tables.is_empty() {
                return Err(IndexError::Foreign(tables));
            }
        }
        // No `quick_check` here: it reads the whole file (1.1 s of a 2.1 s start at a million
        // entries, 540 MB). SQLite's journal makes a crash safe by itself; damage from outside
        // (a bad disk) is what `check_integrity` finds, run by fsck and after an unclean stop.
        conn.pragma_update(None, "journal_mode", "WAL").context(CTX)?;
        configure(&conn)?;
        if found > 0 && found < SCHEMA_VERSION {
            // Schemas 6 and 7 rewrite the narinfo (and NAR) tables: seconds at a million entries, once.
            log::info!("database: migrating from schema version {found} to {SCHEMA_VERSION}");
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = conn.transaction().context(CTX)?;
            tx.execute_batch(sql).context("migrating the database")?;
            tx.pragma_update(None, "user_version", (i + 1) as u32).context(CTX)?;
            tx.commit().context(CTX)?;
            if found > 0 {
                log::info!("database migrated to schema version {}", i + 1);
            }
        }
        Ok(SqliteIndex { pool: Pool { path, idle: Mutex::new((vec![conn], 1)), returned: Condvar::new() } })
    }

    fn conn(&self) -> Result<Conn<'_>, IndexError> {
        self.pool.get()
    }

    /// Runs `f` in a write transaction (the write lock taken at its start).
    fn write<T>(
        &self,
        action: &'static str,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, IndexError>,
    ) -> Result<T, IndexError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).context(action)?;
        let out = f(&tx)?;
        tx.commit().context(action)?;
        Ok(out)
    }
}

/// Takes what a write transaction deleted off the totals: one UPDATE, in that transaction.
fn take_off(tx: &rusqlite::Transaction<'_>, gone: &Gone) -> Result<(), IndexError> {
    if gone.is_empty() {
        return Ok(());
    }
    tx.prepare_cached(
        "UPDATE totals SET narinfos = narinfos - ?1, narinfo_bytes = narinfo_bytes - ?2,
             nars = nars - ?3, nar_bytes = nar_bytes - ?4 WHERE id = 0",
    )
    .and_then(|mut s| s.execute(params![gone.narinfos, gone.narinfo_bytes, gone.nars, gone.nar_bytes]))
    .context("updating the totals")?;
    Ok(())
}

/// Deletes the use times of narinfos just deleted (by id), in id order: in the transaction that
/// deleted them, so that every narinfo has one use time and nothing else does.
fn forget_uses(tx: &rusqlite::Transaction<'_>, mut ids: Vec<i64>) -> Result<(), IndexError> {
    ids.sort_unstable();
    let mut stmt = tx.prepare_cached("DELETE FROM uses WHERE id = ?1").context("forgetting use times")?;
    for id in ids {
        stmt.execute([id]).context("forgetting use times")?;
    }
    Ok(())
}

/// Deletes the NAR row with this id: its name and, if it was stored, its size.
fn remove_nar_row(tx: &rusqlite::Transaction<'_>, id: i64) -> Result<Option<(NarName, Option<u64>)>, IndexError> {
    const CTX: &str = "removing a nar";
    let row: Option<(String, i64, bool)> = tx
        .prepare_cached("DELETE FROM nars WHERE id = ?1 RETURNING name, file_size + zstd_size, stored")
        .context(CTX)?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()
        .context(CTX)?;
    let Some((name, size, stored)) = row else { return Ok(None) };
    Ok(Some((parse_name(&name)?, stored.then_some(size as u64))))
}

fn nar_record(name: NarName, hash: &str, size: i64, upstream_url: String, stored: bool) -> Result<NarRecord, IndexError> {
    let file_hash =
        Hash::parse(hash).map_err(|e| IndexError::Corrupt(format!("nar {name}: file_hash: {e}")))?;
    Ok(NarRecord { name, file_hash, file_size: size as u64, upstream_url, stored })
}

impl super::Index for SqliteIndex {
    fn put_narinfo(
        &self,
        hash: &StorePathHash,
        store_path: &str,
        nar: &NarRecord,
        size: u64,
    ) -> Result<Recorded, IndexError> {
        const CTX: &str = "recording a narinfo";
        let t = super::now();
        self.write(CTX, |tx| {
            let old: Option<i64> = tx
                .query_row("SELECT size FROM narinfos WHERE hash = ?1", [hash.as_str()], |r| r.get(0))
                .optional()
                .context(CTX)?;
            let was: Option<(i64, String, i64)> = tx
                .query_row("SELECT id, file_hash, file_size FROM nars WHERE name = ?1", [nar.name.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
                .context(CTX)?;
            let nar_id = match was {
                Some((_, h, s)) if h != nar.file_hash.to_string() || s as u64 != nar.file_size => {
                    // The name stands for other bytes that another narinfo may use: untouched.
                    return Ok(Recorded::NameTaken);
                }
                Some((id, _, _)) => {
                    tx.execute(
                        "UPDATE nars SET upstream_url = ?2 WHERE id = ?1 AND stored = 0",
                        params![id, nar.upstream_url],
                    )
                    .context(CTX)?;
                    id
                }
                None => tx
                    .query_row(
                        "INSERT INTO nars(name, file_hash, file_size, upstream_url, stored, created_at, accessed_at)
                         VALUES (?1, ?2, ?3, ?4, 0, ?5, ?5) RETURNING id",
                        params![nar.name.as_str(), nar.file_hash.to_string(), nar.file_size as i64, nar.upstream_url, t],
                        |r| r.get::<_, i64>(0),
                    )
                    .context(CTX)?,
            };
            let id: i64 = tx
                .query_row(
                    "INSERT INTO narinfos(hash, store_path, nar_id, size, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(hash) DO UPDATE SET store_path = excluded.store_path,
                       nar_id = excluded.nar_id, size = excluded.size
                     RETURNING id",
                    params![hash.as_str(), store_path, nar_id, size as i64, t],
                    |r| r.get(0),
                )
                .context(CTX)?;
            tx.execute(
                "INSERT INTO uses(id, at) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET at = excluded.at",
                params![id, t],
            )
            .context(CTX)?;
            Ok(Recorded::Done { replaced_size: old.unwrap_or(0) as u64 })
        })
    }

    fn put_nar(&self, nar: &NarRecord) -> Result<bool, IndexError> {
        const CTX: &str = "recording a nar";
        let t = super::now();
        self.write(CTX, |tx| {
            let changed = tx
                .execute(
                    "INSERT INTO nars(name, file_hash, file_size, upstream_url, stored, created_at, accessed_at)
                     VALUES (?1, ?2, ?3, ?4, 0, ?5, ?5)
                     ON CONFLICT(name) DO UPDATE SET accessed_at = excluded.accessed_at
                       WHERE file_hash = excluded.file_hash AND file_size = excluded.file_size",
                    params![nar.name.as_str(), nar.file_hash.to_string(), nar.file_size as i64, nar.upstream_url, t],
                )
                .context(CTX)?;
            Ok(changed == 1)
        })
    }

    fn nar(&self, name: &NarName) -> Result<Option<NarRecord>, IndexError> {
        const CTX: &str = "reading a nar";
        let conn = self.conn()?;
        let row = conn
            .prepare_cached("SELECT file_hash, file_size, upstream_url, stored FROM nars WHERE name = ?1")
            .context(CTX)?
            .query_row([name.as_str()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, bool>(3)?))
            })
            .optional()
            .context(CTX)?;
        row.map(|(hash, size, url, stored)| nar_record(name.clone(), &hash, size, url, stored)).transpose()
    }

    fn narinfo_nar(&self, hash: &StorePathHash) -> Result<Option<NarName>, IndexError> {
        let n: Option<String> = self
            .conn()?
            .query_row(
                "SELECT n.name FROM narinfos i JOIN nars n ON n.id = i.nar_id WHERE i.hash = ?1",
                [hash.as_str()],
                |r| r.get(0),
            )
            .optional()
            .context("reading a narinfo")?;
        Ok(n.and_then(|n| NarName::parse(&n)))
    }

    fn set_nar_stored(&self, name: &NarName, stored: bool) -> Result<bool, IndexError> {
        let n = self
            .conn()?
            .execute(
                // A NAR no longer stored has no zstd copy either.
                "UPDATE nars SET stored = ?2, zstd_size = CASE WHEN ?2 THEN zstd_size ELSE 0 END WHERE name = ?1",
                params![name.as_str(), stored],
            )
            .context("marking a nar stored")?;
        Ok(n > 0)
    }

    fn set_nar_zstd(&self, name: &NarName, size: u64) -> Result<bool, IndexError> {
        let n = self
            .conn()?
            .execute("UPDATE nars SET zstd_size = ?2 WHERE name = ?1 AND stored", params![name.as_str(), size as i64])
            .context("recording a nar's zstd copy")?;
        Ok(n > 0)
    }

    fn forget_nar_zstd(&self) -> Result<u64, IndexError> {
        let n = self
            .conn()?
            .execute("UPDATE nars SET zstd_size = 0 WHERE zstd_size != 0", [])
            .context("forgetting the zstd copies")?;
        Ok(n as u64)
    }

    fn totals(&self) -> Result<Totals, IndexError> {
        let conn = self.conn()?;
        let (a, b, c, d): (i64, i64, i64, i64) = conn
            .prepare_cached("SELECT narinfos, narinfo_bytes, nars, nar_bytes FROM totals WHERE id = 0")
            .context("reading the totals")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .context("reading the totals")?;
        let n = |v: i64| v.max(0) as u64;
        Ok(Totals { narinfos: n(a), narinfo_bytes: n(b), nars: n(c), nar_bytes: n(d) })
    }

    fn check_integrity(&self) -> Result<(), IndexError> {
        const CTX: &str = "checking the database";
        let conn = self.conn()?;
        let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).context(CTX)?;
        if check != "ok" {
            return Err(IndexError::Corrupt(check));
        }
        // The totals are kept by triggers and by the deletes themselves (schema 5); whether
        // they still match the rows is the same check PostgreSQL's index makes.
        let v = conn
            .query_row(super::TOTALS_AGAINST_ROWS, [], |r| {
                let mut v = [0i64; 8];
                for (i, x) in v.iter_mut().enumerate() {
                    *x = r.get(i)?;
                }
                Ok(v)
            })
            .context(CTX)?;
        super::check_totals(v)?;
        // Every narinfo has one use time and nothing else does (schema 6): a narinfo without
        // one would never be evicted. The writes keep this in their transactions; only damage
        // from outside breaks it, and `mend_derived` mends it.
        let (unused, orphans): (i64, i64) = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM narinfos i WHERE NOT EXISTS (SELECT 1 FROM uses u WHERE u.id = i.id)),
                        (SELECT COUNT(*) FROM uses u WHERE NOT EXISTS (SELECT 1 FROM narinfos i WHERE i.id = u.id))",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .context(CTX)?;
        if unused != 0 || orphans != 0 {
            return Err(IndexError::UseTimesDrift { unused: unused as u64, orphans: orphans as u64 });
        }
        Ok(())
    }

    fn checkpoint(&self) -> Result<(), IndexError> {
        const CTX: &str = "checkpointing the database";
        // (busy, WAL frames, frames checkpointed): busy when a reader holds an old snapshot,
        // which at a stop nothing should.
        let (busy, frames, done): (i64, i64, i64) = self
            .conn()?
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .context(CTX)?;
        if busy != 0 {
            log::warn!("index: the WAL could not be checkpointed at the stop ({done} of {frames} pages); the next start reads it");
        }
        Ok(())
    }

    fn mend_derived(&self) -> Result<(), IndexError> {
        const CTX: &str = "recounting the totals";
        self.write(CTX, |tx| {
            tx.execute(super::TOTALS_RECOUNT, []).context(CTX)?;
            // A narinfo that lost its use time gets its NAR's last use, or its creation.
            tx.execute_batch(
                "INSERT INTO uses(id, at)
                   SELECT i.id, max(i.created_at, COALESCE((SELECT n.accessed_at FROM nars n WHERE n.id = i.nar_id), 0))
                   FROM narinfos i WHERE NOT EXISTS (SELECT 1 FROM uses u WHERE u.id = i.id);
                 DELETE FROM uses WHERE NOT EXISTS (SELECT 1 FROM narinfos i WHERE i.id = uses.id);",
            )
            .context(CTX)
        })
    }

    fn least_recently_used(&self, limit: usize, pending_before: i64) -> Result<Vec<(StorePathHash, u64)>, IndexError> {
        const CTX: &str = "choosing entries to evict";
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare_cached(
                // CROSS JOIN keeps `uses` the outer loop: its index is walked in order, each
                // narinfo found by its id.
                "SELECT i.hash, i.size + COALESCE(
                     (SELECT n.file_size FROM nars n WHERE n.id = i.nar_id AND n.stored = 1), 0)
                 FROM uses u INDEXED BY uses_lru CROSS JOIN narinfos i ON i.id = u.id
                 WHERE u.at < ?2
                    OR EXISTS (SELECT 1 FROM nars n WHERE n.id = i.nar_id AND n.stored = 1)
                 ORDER BY u.at, u.id LIMIT ?1",
            )
            .context(CTX)?;
        let rows = stmt
            .query_map(params![limit as i64, pending_before], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .context(CTX)?;
        rows.map(|row| {
            let (h, size) = row.context(CTX)?;
            Ok((parse_hash(&h)?, size.max(0) as u64))
        })
        .collect()
    }

    fn unreferenced_nars(&self, limit: usize) -> Result<Vec<(NarName, u64)>, IndexError> {
        const CTX: &str = "listing unreferenced nars";
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT name, file_size FROM nars n WHERE stored = 1
                 AND NOT EXISTS (SELECT 1 FROM narinfos i WHERE i.nar_id = n.id) LIMIT ?1",
            )
            .context(CTX)?;
        let rows = stmt
            .query_map([limit as i64], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .context(CTX)?;
        rows.map(|row| {
            let (n, size) = row.context(CTX)?;
            Ok((parse_name(&n)?, size as u64))
        })
        .collect()
    }

    fn remove_narinfos(&self, hashes: &[StorePathHash]) -> Result<Vec<Removed>, IndexError> {
        const CTX: &str = "removing narinfos";
        // In key order, the narinfo rows first and then the NAR rows: neighbouring keys share
        // B-tree pages, so each page is read and changed once while it is in SQLite's cache
        // instead of once per row (victims come in LRU order, random in key order).
        let mut hashes = hashes.to_vec();
        hashes.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        self.write(CTX, |tx| {
            // One statement per row (RETURNING): the row is found once, not once to read it
            // and again to delete it.
            let mut delete = tx
                .prepare_cached("DELETE FROM narinfos WHERE hash = ?1 RETURNING nar_id, size, id")
                .context(CTX)?;
            let mut gone = Vec::with_capacity(hashes.len());
            let mut ids = Vec::with_capacity(hashes.len());
            let mut totals = Gone::default();
            for hash in &hashes {
                let row: Option<(Option<i64>, i64, i64)> = delete
                    .query_row([hash.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
                    .context(CTX)?;
                let Some((nar_id, size, id)) = row else { continue };
                totals.narinfo(size);
                ids.push(id);
                gone.push((nar_id, Removed { narinfos: vec![(*hash, size as u64)], nar: None }));
            }
            forget_uses(tx, ids)?;
            // In id order, which is insertion order: the victims' NARs are neighbours.
            gone.sort_unstable_by_key(|g| g.0);
            let mut used =
                tx.prepare_cached("SELECT EXISTS(SELECT 1 FROM narinfos WHERE nar_id = ?1)").context(CTX)?;
            let mut out = Vec::with_capacity(gone.len());
            for (nar_id, mut removed) in gone {
                // A NAR that two victims shared goes with the first; the second finds no row.
                // No id: the NAR's row was already missing (damage), nothing to remove.
                if let Some(nar_id) = nar_id {
                    let still_used: bool = used.query_row([nar_id], |r| r.get(0)).context(CTX)?;
                    if !still_used {
                        removed.nar = remove_nar_row(tx, nar_id)?;
                        totals.nar(&removed.nar);
                    }
                }
                out.push(removed);
            }
            take_off(tx, &totals)?;
            Ok(out)
        })
    }

    fn remove_nar(&self, name: &NarName) -> Result<Option<Removed>, IndexError> {
        const CTX: &str = "removing a nar";
        self.write(CTX, |tx| {
            let mut narinfos = Vec::new();
            let mut totals = Gone::default();
            let nar_id: Option<i64> = tx
                .query_row("SELECT id FROM nars WHERE name = ?1", [name.as_str()], |r| r.get(0))
                .optional()
                .context(CTX)?;
            let Some(nar_id) = nar_id else { return Ok(None) };
            {
                let mut ids = Vec::new();
                let mut stmt =
                    tx.prepare("DELETE FROM narinfos WHERE nar_id = ?1 RETURNING hash, size, id").context(CTX)?;
                let rows = stmt
                    .query_map([nar_id], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                    })
                    .context(CTX)?;
                for row in rows {
                    let (h, size, id) = row.context(CTX)?;
                    totals.narinfo(size);
                    ids.push(id);
                    narinfos.push((parse_hash(&h)?, size as u64));
                }
                forget_uses(tx, ids)?;
            }
            let nar = remove_nar_row(tx, nar_id)?;
            totals.nar(&nar);
            take_off(tx, &totals)?;
            if nar.is_none() && narinfos.is_empty() {
                return Ok(None);
            }
            Ok(Some(Removed { narinfos, nar }))
        })
    }

    fn delete_narinfo_row(&self, hash: &StorePathHash) -> Result<(), IndexError> {
        const CTX: &str = "deleting a narinfo";
        self.write(CTX, |tx| {
            let row: Option<(i64, i64)> = tx
                .query_row("DELETE FROM narinfos WHERE hash = ?1 RETURNING size, id", [hash.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .context(CTX)?;
            let mut totals = Gone::default();
            if let Some((size, id)) = row {
                totals.narinfo(size);
                forget_uses(tx, vec![id])?;
            }
            take_off(tx, &totals)
        })
    }

    fn touch(&self, narinfos: &[(StorePathHash, i64)], nars: &[(NarName, i64)]) -> Result<(), IndexError> {
        const CTX: &str = "recording access times";
        self.write(CTX, |tx| {
            // The narinfos' ids first (reads), then the use times in id order: neighbouring
            // ids share a page of `uses`, so each page is changed once (0.5 s of CPU for a
            // batch of 32k uses at a million entries, against 0.75 s in hash order).
            let mut uses: Vec<(i64, i64)> = Vec::with_capacity(narinfos.len() + nars.len());
            let mut by_hash = tx.prepare_cached("SELECT id FROM narinfos WHERE hash = ?1").context(CTX)?;
            for (h, t) in narinfos {
                if let Some(id) = by_hash.query_row([h.as_str()], |r| r.get(0)).optional().context(CTX)? {
                    uses.push((id, *t));
                }
            }
            let mut nar = tx
                .prepare_cached("UPDATE nars SET accessed_at = ?2 WHERE name = ?1 AND accessed_at < ?2")
                .context(CTX)?;
            // A NAR's use is a use of every narinfo that points at it: that is what keeps the
            // LRU order a single index.
            let mut by_nar = tx
                .prepare_cached("SELECT i.id FROM nars n JOIN narinfos i ON i.nar_id = n.id WHERE n.name = ?1")
                .context(CTX)?;
            for (n, t) in nars {
                nar.execute(params![n.as_str(), t]).context(CTX)?;
                let ids = by_nar.query_map([n.as_str()], |r| r.get::<_, i64>(0)).context(CTX)?;
                for id in ids {
                    uses.push((id.context(CTX)?, *t));
                }
            }
            uses.sort_unstable();
            let mut set = tx.prepare_cached("UPDATE uses SET at = ?2 WHERE id = ?1 AND at < ?2").context(CTX)?;
            // Sorted by (id, time): the last of each id is its latest use, the only one set.
            for (i, (id, t)) in uses.iter().enumerate() {
                if uses.get(i + 1).is_some_and(|next| next.0 == *id) {
                    continue;
                }
                set.execute(params![id, t]).context(CTX)?;
            }
            Ok(())
        })
    }

    fn take_lease(&self, key: &str, holder: &str, now: i64, ttl: i64) -> Result<bool, IndexError> {
        let n = self
            .conn()?
            .prepare_cached(LEASE_TAKE)
            .and_then(|mut s| s.execute(params![key, holder, now, now.saturating_add(ttl)]))
            .context("taking a lease")?;
        Ok(n == 1)
    }

    fn release_lease(&self, key: &str, holder: &str) -> Result<bool, IndexError> {
        let n = self
            .conn()?
            .execute("DELETE FROM leases WHERE key = ?1 AND holder = ?2", [key, holder])
            .context("releasing a lease")?;
        Ok(n == 1)
    }

    fn purge_expired_leases(&self, now: i64) -> Result<u64, IndexError> {
        let n = self.conn()?.execute("DELETE FROM leases WHERE expires_at <= ?1", [now]).context("clearing expired leases")?;
        Ok(n as u64)
    }

    fn lease_holder(&self, key: &str, now: i64) -> Result<Option<String>, IndexError> {
        use rusqlite::OptionalExtension;
        self.conn()?
            .prepare_cached("SELECT holder FROM leases WHERE key = ?1 AND expires_at > ?2")
            .and_then(|mut s| s.query_row(params![key, now], |r| r.get::<_, String>(0)).optional())
            .context("reading a lease")
    }

    fn narinfos_in_shard(&self, shard: &str) -> Result<Vec<IndexedNarinfo>, IndexError> {
        const CTX: &str = "listing narinfos";
        let (low, high) = shard_range(shard);
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT i.hash, n.name, i.size, i.created_at
                 FROM narinfos i LEFT JOIN nars n ON n.id = i.nar_id
                 WHERE i.hash >= ?1 AND i.hash < ?2 ORDER BY i.hash",
            )
            .context(CTX)?;
        let rows = stmt
            .query_map([&low, &high], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .context(CTX)?;
        rows.map(|row| {
            let (hash, nar, size, created_at) = row.context(CTX)?;
            Ok(IndexedNarinfo {
                hash: parse_hash(&hash)?,
                nar: nar.as_deref().and_then(NarName::parse),
                size: size as u64,
                created_at,
            })
        })
        .collect()
    }

    fn nars_in_shard(&self, shard: &str) -> Result<Vec<IndexedNar>, IndexError> {
        const CTX: &str = "listing nars";
        let (low, high) = shard_range(shard);
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT name, file_hash, file_size, upstream_url, stored, created_at
                 FROM nars WHERE name >= ?1 AND name < ?2 ORDER BY name",
            )
            .context(CTX)?;
        let rows = stmt
            .query_map([&low, &high], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, bool>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .context(CTX)?;
        rows.map(|row| {
            let (name, hash, size, url, stored, created_at) = row.context(CTX)?;
            Ok(IndexedNar { record: nar_record(parse_name(&name)?, &hash, size, url, stored)?, created_at })
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;

    fn temp_path(what: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("ncps-sqlite-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db.sqlite");
        (dir, path)
    }

    #[test]
    fn a_database_with_tables_but_no_version_is_refused_untouched() {
        let (dir, path) = temp_path("foreign");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE schema_migrations (version TEXT); CREATE TABLE narinfos (id INTEGER);")
            .unwrap();
        drop(conn);
        let err = SqliteIndex::open(&path).err().expect("refused");
        assert!(matches!(err, IndexError::Foreign(_)), "{err}");
        assert!(err.to_string().contains("schema_migrations"), "{err}");
        let conn = Connection::open(&path).unwrap();
        let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 0, "nothing was migrated");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_database_opens_at_once_and_its_integrity_check_says_so() {
        let (dir, path) = temp_path("damaged");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute_batch("CREATE TABLE filler (x TEXT); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) INSERT INTO filler SELECT hex(randomblob(64)) FROM n;").unwrap();
        drop(conn);
        // Scribble over a page in the middle, as a bad disk would.
        let mut bytes = std::fs::read(&path).unwrap();
        let page = 4096 * (bytes.len() / 4096 / 2);
        bytes[page..page + 4096].fill(0xa5);
        std::fs::write(&path, &bytes).unwrap();
        let index = SqliteIndex::open(&path).expect("opening reads no more than the schema");
        let err = index.check_integrity().expect_err("the damage is found");
        assert!(matches!(err, IndexError::Corrupt(_)), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused_with_a_clear_message() {
        let (dir, path) = temp_path("newer");
        drop(SqliteIndex::open(&path).unwrap());
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = SqliteIndex::open(&path).err().unwrap();
        assert!(err.to_string().contains("schema version 99"), "{err}");
        std::fs::write(&path, b"this is not sqlite at all, not even close....").unwrap();
        let _ = std::fs::remove_file(dir.join("db.sqlite-wal"));
        let err = SqliteIndex::open(&path).err().unwrap();
        assert!(err.to_string().contains("not a database"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_version_1_database_is_migrated_with_its_totals_and_lru_order() {
        let (dir, path) = temp_path("migrate");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        let nar = format!("{}.nar", "1".repeat(52));
        conn.execute_batch(&format!(
            "INSERT INTO nars VALUES ('{nar}', 'sha256:{}', 7, '', 1, 1, 500);
             INSERT INTO narinfos VALUES ('{}', '/nix/store/x', '{nar}', 3, 1, 100);",
            "0".repeat(52),
            "a".repeat(32)
        ))
        .unwrap();
        drop(conn);
        let index = SqliteIndex::open(&path).unwrap();
        assert_eq!(index.totals().unwrap(), Totals { narinfos: 1, narinfo_bytes: 3, nars: 1, nar_bytes: 7 });
        let conn = Connection::open(&path).unwrap();
        let at: i64 = conn.query_row("SELECT at FROM uses", [], |r| r.get(0)).unwrap();
        assert_eq!(at, 500, "a NAR's last use counts for its narinfo");
        // Deletes no longer fire a trigger: the batch takes them off once, not twice.
        let removed = index.remove_narinfos(&[StorePathHash::parse(&"a".repeat(32)).unwrap()]).unwrap();
        assert_eq!(removed[0].nar.as_ref().and_then(|(_, size)| *size), Some(7));
        assert_eq!(index.totals().unwrap(), Totals::default());
        index.check_integrity().expect("the totals match the rows");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_version_5_database_keeps_its_lru_order_and_totals_when_use_times_move_to_their_own_table_and_lost_ones_are_mended() {
        let (dir, path) = temp_path("migrate6");
        let conn = Connection::open(&path).unwrap();
        for (i, sql) in MIGRATIONS[..5].iter().enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", (i + 1) as u32).unwrap();
        }
        // Three narinfos on stored NARs; b and c were last used at the same time, c created
        // first, so c goes before b. The LRU order is a, c, b.
        let rows = [('a', '1', 10, 300), ('b', '2', 20, 500), ('c', '3', 15, 500)];
        for (c, nar, created, used) in rows {
            let nar = format!("{}.nar", nar.to_string().repeat(52));
            conn.execute_batch(&format!(
                "INSERT INTO nars(name, file_hash, file_size, upstream_url, stored, created_at, accessed_at)
                   VALUES ('{nar}', 'sha256:{}', 7, '', 1, 1, 1);
                 INSERT INTO narinfos VALUES ('{}', '/nix/store/x', '{nar}', 3, {created}, {used});",
                "0".repeat(52),
                c.to_string().repeat(32)
            ))
            .unwrap();
        }
        drop(conn);
        let index = SqliteIndex::open(&path).unwrap();
        let h = |c: char| StorePathHash::parse(&c.to_string().repeat(32)).unwrap();
        let lru: Vec<_> = index.least_recently_used(10, 0).unwrap().into_iter().map(|(h, _)| h).collect();
        assert_eq!(lru, vec![h('a'), h('c'), h('b')]);
        assert_eq!(index.totals().unwrap(), Totals { narinfos: 3, narinfo_bytes: 9, nars: 3, nar_bytes: 21 });
        index.check_integrity().expect("every narinfo has its use time");
        // A use moves an entry to the end; a removal takes its use time with it.
        index.touch(&[(h('a'), 600)], &[]).unwrap();
        let lru: Vec<_> = index.least_recently_used(10, 0).unwrap().into_iter().map(|(h, _)| h).collect();
        assert_eq!(lru, vec![h('c'), h('b'), h('a')]);
        index.remove_narinfos(&[h('c')]).unwrap();
        index.check_integrity().expect("no use time is left without its narinfo");
        let conn = Connection::open(&path).unwrap();
        conn.execute("DELETE FROM uses WHERE id = (SELECT id FROM narinfos WHERE hash = ?1)", [h('b').as_str()])
            .unwrap();
        conn.execute("INSERT INTO uses(id, at) VALUES (999, 1)", []).unwrap();
        let err = index.check_integrity().expect_err("a narinfo without a use time is found");
        assert!(matches!(err, IndexError::UseTimesDrift { unused: 1, orphans: 1 }), "{err}");
        // Derived data, mended as the totals are: b gets the later of its NAR's last use (1)
        // and its creation (20), which puts it before a (used at 600); the stray row goes.
        index.mend_derived().unwrap();
        index.check_integrity().expect("mended");
        let lru: Vec<_> = index.least_recently_used(10, 0).unwrap().into_iter().map(|(h, _)| h).collect();
        assert_eq!(lru, vec![h('b'), h('a')], "b is evicted first again, by its creation time");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_version_6_database_points_narinfos_at_their_nar_by_id_keeping_shared_nars_order_and_totals() {
        let (dir, path) = temp_path("migrate7");
        let conn = Connection::open(&path).unwrap();
        for (i, sql) in MIGRATIONS[..6].iter().enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", (i + 1) as u32).unwrap();
        }
        let nar = |c: char| format!("{}.nar", c.to_string().repeat(52));
        let h = |c: char| StorePathHash::parse(&c.to_string().repeat(32)).unwrap();
        // x is stored (7 bytes) and shared by a and b; y is known but not stored (c's); d
        // names a NAR with no row at all, which only damage from outside leaves.
        for (n, stored) in [('x', 1), ('y', 0)] {
            conn.execute(
                "INSERT INTO nars(name, file_hash, file_size, upstream_url, stored, created_at, accessed_at)
                   VALUES (?1, ?2, 7, '', ?3, 1, 1)",
                params![nar(n), format!("sha256:{}", "0".repeat(52)), stored],
            )
            .unwrap();
        }
        for (id, c, n, used) in [(1, 'a', 'x', 100), (2, 'b', 'x', 300), (3, 'c', 'y', 200), (4, 'd', 'z', 50)] {
            conn.execute(
                "INSERT INTO narinfos(id, hash, store_path, nar_name, size, created_at) VALUES (?1, ?2, '/nix/store/x', ?3, 3, 1)",
                params![id, h(c).as_str(), nar(n)],
            )
            .unwrap();
            conn.execute("INSERT INTO uses(id, at) VALUES (?1, ?2)", params![id, used]).unwrap();
        }
        drop(conn);
        let index = SqliteIndex::open(&path).unwrap();
        index.check_integrity().expect("the migrated index is sound");
        assert_eq!(index.totals().unwrap(), Totals { narinfos: 4, narinfo_bytes: 12, nars: 1, nar_bytes: 7 });
        assert_eq!(index.narinfo_nar(&h('a')).unwrap().map(|n| n.to_string()), Some(nar('x')));
        assert_eq!(index.narinfo_nar(&h('d')).unwrap(), None, "a NAR without a row stays unknown");
        let listed: Vec<_> = index.narinfos_in_shard("d").unwrap().into_iter().map(|i| (i.hash, i.nar)).collect();
        assert_eq!(listed, vec![(h('d'), None)]);
        let lru: Vec<_> = index.least_recently_used(10, 1000).unwrap();
        assert_eq!(lru, vec![(h('d'), 3), (h('a'), 10), (h('c'), 3), (h('b'), 10)], "the LRU order is kept");
        // A shared NAR goes with the last narinfo that uses it.
        let r = index.remove_narinfos(&[h('a'), h('d')]).unwrap();
        assert!(r.iter().all(|r| r.nar.is_none()), "{r:?}");
        let r = index.remove_narinfos(&[h('b')]).unwrap();
        assert_eq!(r[0].nar.as_ref().map(|(n, size)| (n.to_string(), *size)), Some((nar('x'), Some(7))));
        let r = index.remove_nar(&NarName::parse(&nar('y')).unwrap()).unwrap().unwrap();
        assert_eq!(r.narinfos, vec![(h('c'), 3)]);
        assert_eq!(index.totals().unwrap(), Totals::default());
        index.check_integrity().expect("the removals kept the totals and use times");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_removed_nars_id_is_never_given_to_another_nar() {
        let index = SqliteIndex::open_in_memory().unwrap();
        let record = |c: char| NarRecord {
            name: NarName::parse(&format!("{}.nar", c.to_string().repeat(52))).unwrap(),
            file_hash: Hash::parse(&format!("sha256:{}", "0".repeat(52))).unwrap(),
            file_size: 7,
            upstream_url: String::new(),
            stored: false,
        };
        let id_of = |c: char| -> i64 {
            let conn = index.conn().unwrap();
            conn.query_row("SELECT id FROM nars WHERE name = ?1", [record(c).name.as_str()], |r| r.get(0)).unwrap()
        };
        index.put_nar(&record('a')).unwrap();
        let first = id_of('a');
        index.remove_nar(&record('a').name).unwrap();
        index.put_nar(&record('b')).unwrap();
        assert!(id_of('b') > first, "a stale reference to the removed NAR can never reach the new one");
    }

    #[test]
    fn totals_that_do_not_match_the_rows_are_found_by_the_integrity_check_and_recounted() {
        let (dir, path) = temp_path("totals");
        let index = SqliteIndex::open(&path).unwrap();
        index.check_integrity().unwrap();
        Connection::open(&path).unwrap().execute("UPDATE totals SET nar_bytes = 12345", []).unwrap();
        let err = index.check_integrity().expect_err("the mismatch is found");
        assert!(matches!(err, IndexError::TotalsDrift { kept: [0, 0, 0, 12345], counted: [0, 0, 0, 0] }), "{err}");
        index.mend_derived().unwrap();
        index.check_integrity().expect("recounted");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_sqlite_index_keeps_the_contract() {
        crate::index::contract::every_rule(&SqliteIndex::open_in_memory().unwrap());
        let (dir, path) = temp_path("contract");
        crate::index::contract::every_rule(&SqliteIndex::open(&path).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pooled_connections_read_while_another_thread_writes() {
        let (dir, path) = temp_path("pool");
        let index = std::sync::Arc::new(SqliteIndex::open(&path).unwrap());
        let writer = {
            let index = index.clone();
            std::thread::spawn(move || {
                index
                    .write("holding the write lock", |_| {
                        std::thread::sleep(Duration::from_millis(300));
                        Ok(())
                    })
                    .unwrap()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let started = std::time::Instant::now();
        index.totals().unwrap();
        assert!(started.elapsed() < Duration::from_millis(200), "a read waited for the writer");
        writer.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
