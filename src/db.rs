//! The SQLite index of what the store holds.
//!
//! The disk is the truth for serving (a file under its final name is complete); the database
//! says what each entry is: which NAR a narinfo points at, where that NAR came from, the hash
//! and size it must have, and when each was last used. Migrations are embedded and applied at
//! start-up, so there is no separate migrate step; a database written by a newer ncps is refused
//! rather than guessed at.

use crate::nix::{Hash, NarName, StorePathHash};
use rusqlite::{params, Connection, OptionalExtension};
use std::fmt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Each entry moves the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &["
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
        created_at INTEGER NOT NULL,
        accessed_at INTEGER NOT NULL
    );
    CREATE INDEX narinfos_nar_name ON narinfos(nar_name);
    CREATE INDEX narinfos_accessed_at ON narinfos(accessed_at);
"];

pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

#[derive(Debug)]
pub enum DbError {
    Sqlite { context: String, source: rusqlite::Error },
    NewerSchema { found: u32, supported: u32 },
    Corrupt(String),
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::Sqlite { context, source } => write!(f, "{context}: {source}"),
            DbError::NewerSchema { found, supported } => write!(
                f,
                "the database has schema version {found}, this ncps knows up to {supported}: \
                 it was written by a newer ncps; use that version or a fresh database"
            ),
            DbError::Corrupt(m) => write!(f, "database is corrupt: {m}"),
        }
    }
}

impl std::error::Error for DbError {}

trait Context<T> {
    fn context(self, what: &str) -> Result<T, DbError>;
}

impl<T> Context<T> for Result<T, rusqlite::Error> {
    fn context(self, what: &str) -> Result<T, DbError> {
        self.map_err(|source| DbError::Sqlite { context: what.to_string(), source })
    }
}

/// What the database knows about one NAR file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarRecord {
    pub name: NarName,
    pub file_hash: Hash,
    pub file_size: u64,
    /// Where to fetch it from (the upstream whose narinfo pointed at it).
    pub upstream_url: String,
    /// Whether the file is complete under its final name.
    pub stored: bool,
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

pub struct Db {
    conn: Mutex<Connection>,
}

impl Db {
    /// Opens the database, creating and migrating it as needed.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let ctx = format!("opening database {}", path.display());
        let conn = Connection::open(path).context(&ctx)?;
        Self::setup(conn, &ctx)
    }

    #[cfg(test)]
    pub fn open_in_memory() -> Result<Db, DbError> {
        Self::setup(Connection::open_in_memory().context("memory db")?, "memory db")
    }

    fn setup(mut conn: Connection, ctx: &str) -> Result<Db, DbError> {
        conn.busy_timeout(std::time::Duration::from_secs(5)).context(ctx)?;
        // A file that is not SQLite fails here, on the first read, with "file is not a database".
        let found: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).context(ctx)?;
        if found > SCHEMA_VERSION {
            return Err(DbError::NewerSchema { found, supported: SCHEMA_VERSION });
        }
        let check: String =
            conn.query_row("PRAGMA quick_check", [], |r| r.get(0)).context(ctx)?;
        if check != "ok" {
            return Err(DbError::Corrupt(check));
        }
        conn.pragma_update(None, "journal_mode", "WAL").context(ctx)?;
        // NORMAL in WAL mode: a power cut may lose the last transactions but never corrupts;
        // the files on disk are reconciled against the index at start-up anyway.
        conn.pragma_update(None, "synchronous", "NORMAL").context(ctx)?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let tx = conn.transaction().context(ctx)?;
            tx.execute_batch(sql).context(&format!("migrating database to version {}", i + 1))?;
            tx.pragma_update(None, "user_version", (i + 1) as u32).context(ctx)?;
            tx.commit().context(ctx)?;
        }
        Ok(Db { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (its own
        // transactions guard that), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config_get(&self, key: &str) -> Result<Option<String>, DbError> {
        self.conn()
            .query_row("SELECT value FROM config WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .context("reading config")
    }

    pub fn config_set(&self, key: &str, value: &str) -> Result<(), DbError> {
        self.conn()
            .execute(
                "INSERT INTO config(key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .context("writing config")?;
        Ok(())
    }

    /// Records a narinfo and the NAR it points at. A NAR already known with the same digest
    /// keeps its `stored` flag; one known with another digest is replaced (and marked not
    /// stored), since the name now stands for other bytes.
    pub fn put_narinfo(
        &self,
        hash: &StorePathHash,
        store_path: &str,
        nar: &NarRecord,
    ) -> Result<(), DbError> {
        let mut conn = self.conn();
        let t = now();
        let tx = conn.transaction().context("recording narinfo")?;
        tx.execute(
            "INSERT INTO nars(name, file_hash, file_size, upstream_url, stored, created_at, accessed_at)
             VALUES (?1, ?2, ?3, ?4, 0, ?5, ?5)
             ON CONFLICT(name) DO UPDATE SET
               stored = CASE WHEN file_hash = excluded.file_hash AND file_size = excluded.file_size
                             THEN stored ELSE 0 END,
               file_hash = excluded.file_hash, file_size = excluded.file_size,
               upstream_url = excluded.upstream_url",
            params![nar.name.as_str(), nar.file_hash.to_string(), nar.file_size as i64, nar.upstream_url, t],
        )
        .context("recording nar")?;
        tx.execute(
            "INSERT INTO narinfos(hash, store_path, nar_name, created_at, accessed_at)
             VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT(hash) DO UPDATE SET store_path = excluded.store_path,
               nar_name = excluded.nar_name, accessed_at = excluded.accessed_at",
            params![hash.as_str(), store_path, nar.name.as_str(), t],
        )
        .context("recording narinfo")?;
        tx.commit().context("recording narinfo")
    }

    pub fn nar(&self, name: &NarName) -> Result<Option<NarRecord>, DbError> {
        let row = self
            .conn()
            .query_row(
                "SELECT file_hash, file_size, upstream_url, stored FROM nars WHERE name = ?1",
                [name.as_str()],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, bool>(3)?,
                    ))
                },
            )
            .optional()
            .context("reading nar")?;
        let Some((hash, size, upstream_url, stored)) = row else { return Ok(None) };
        let file_hash = Hash::parse(&hash)
            .map_err(|e| DbError::Corrupt(format!("nar {name}: file_hash: {e}")))?;
        Ok(Some(NarRecord { name: name.clone(), file_hash, file_size: size as u64, upstream_url, stored }))
    }

    pub fn set_nar_stored(&self, name: &NarName, stored: bool) -> Result<(), DbError> {
        self.conn()
            .execute("UPDATE nars SET stored = ?2 WHERE name = ?1", params![name.as_str(), stored])
            .context("marking nar stored")?;
        Ok(())
    }

    /// Records last-access times in one transaction (the batched hit recording).
    pub fn touch(&self, narinfos: &[(StorePathHash, i64)], nars: &[(NarName, i64)]) -> Result<(), DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction().context("recording access times")?;
        {
            let mut a = tx
                .prepare_cached("UPDATE narinfos SET accessed_at = max(accessed_at, ?2) WHERE hash = ?1")
                .context("recording access times")?;
            for (h, t) in narinfos {
                a.execute(params![h.as_str(), t]).context("recording access times")?;
            }
            let mut b = tx
                .prepare_cached("UPDATE nars SET accessed_at = max(accessed_at, ?2) WHERE name = ?1")
                .context("recording access times")?;
            for (n, t) in nars {
                b.execute(params![n.as_str(), t]).context("recording access times")?;
            }
        }
        tx.commit().context("recording access times")
    }

    pub fn narinfo_hashes(&self) -> Result<Vec<StorePathHash>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT hash FROM narinfos").context("listing narinfos")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).context("listing narinfos")?;
        let mut out = Vec::new();
        for h in rows {
            let h = h.context("listing narinfos")?;
            out.push(StorePathHash::parse(&h).ok_or_else(|| DbError::Corrupt(format!("narinfo hash {h:?}")))?);
        }
        Ok(out)
    }

    /// Names of NARs marked as stored.
    pub fn stored_nar_names(&self) -> Result<Vec<NarName>, DbError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name FROM nars WHERE stored = 1").context("listing nars")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).context("listing nars")?;
        let mut out = Vec::new();
        for n in rows {
            let n = n.context("listing nars")?;
            out.push(NarName::parse(&n).ok_or_else(|| DbError::Corrupt(format!("nar name {n:?}")))?);
        }
        Ok(out)
    }

    pub fn delete_narinfo(&self, hash: &StorePathHash) -> Result<(), DbError> {
        self.conn()
            .execute("DELETE FROM narinfos WHERE hash = ?1", [hash.as_str()])
            .context("deleting narinfo")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(stored: bool) -> NarRecord {
        NarRecord {
            name: NarName::parse(&format!("{}.nar.xz", "1".repeat(52))).unwrap(),
            file_hash: Hash::of(b"nar"),
            file_size: 3,
            upstream_url: "http://up/nar/x".into(),
            stored,
        }
    }

    #[test]
    fn a_narinfo_records_its_nar_and_restoring_keeps_the_stored_flag() {
        let db = Db::open_in_memory().unwrap();
        let h = StorePathHash::parse(&"a".repeat(32)).unwrap();
        let nar = record(false);
        db.put_narinfo(&h, "/nix/store/x-y", &nar).unwrap();
        assert_eq!(db.nar(&nar.name).unwrap(), Some(nar.clone()));
        db.set_nar_stored(&nar.name, true).unwrap();
        db.put_narinfo(&h, "/nix/store/x-y", &nar).unwrap();
        assert!(db.nar(&nar.name).unwrap().unwrap().stored);
        let mut other = nar.clone();
        other.file_hash = Hash::of(b"other");
        db.put_narinfo(&h, "/nix/store/x-y", &other).unwrap();
        assert!(!db.nar(&nar.name).unwrap().unwrap().stored, "new bytes must be fetched again");
        assert_eq!(db.narinfo_hashes().unwrap(), vec![h]);
    }

    #[test]
    fn a_newer_schema_is_refused_with_a_clear_message() {
        let dir = std::env::temp_dir().join(format!("ncps-db-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("db.sqlite");
        let _ = std::fs::remove_file(&path);
        drop(Db::open(&path).unwrap());
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        let err = Db::open(&path).err().unwrap();
        assert!(err.to_string().contains("schema version 99"), "{err}");
        std::fs::write(&path, b"this is not sqlite at all, not even close....").unwrap();
        let _ = std::fs::remove_file(dir.join("db.sqlite-wal"));
        let err = Db::open(&path).err().unwrap();
        assert!(err.to_string().contains("not a database"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
