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
        size INTEGER NOT NULL,
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
    /// Tables but no schema version: another program's database (Go ncps's, typically).
    Foreign(Vec<String>),
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
            DbError::Foreign(tables) => write!(
                f,
                "the database holds tables ({}) but no ncps-rs schema version: it belongs to another \
                 program (Go ncps keeps a schema_migrations table); ncps-rs keeps its own index, so \
                 point --cache-database-url at a new file",
                tables.join(", ")
            ),
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

/// What a removal took out of the index: narinfos with their sizes, and the NAR (its name
/// and, if its file was stored, its size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub narinfos: Vec<(StorePathHash, u64)>,
    pub nar: Option<(NarName, Option<u64>)>,
}

fn remove_nar_row(tx: &rusqlite::Transaction<'_>, name: &str) -> Result<Option<(NarName, Option<u64>)>, DbError> {
    let row: Option<(i64, bool)> = tx
        .query_row("SELECT file_size, stored FROM nars WHERE name = ?1", [name], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .context("removing nar")?;
    let Some((size, stored)) = row else { return Ok(None) };
    tx.execute("DELETE FROM nars WHERE name = ?1", [name]).context("removing nar")?;
    let name = NarName::parse(name).ok_or_else(|| DbError::Corrupt(format!("nar name {name:?}")))?;
    Ok(Some((name, stored.then_some(size as u64))))
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
        if found == 0 {
            // Creating our tables next to someone else's would fail half-way ("table narinfos
            // already exists") or, worse, succeed and mix two indexes in one file.
            let mut stmt = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                .context(ctx)?;
            let tables: Vec<String> =
                stmt.query_map([], |r| r.get(0)).context(ctx)?.collect::<Result<_, _>>().context(ctx)?;
            drop(stmt);
            if !tables.is_empty() {
                return Err(DbError::Foreign(tables));
            }
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

    /// Records a narinfo (`size` bytes on disk) and the NAR it points at. A NAR already known
    /// with the same digest keeps its `stored` flag; one known with another digest is marked
    /// not stored, since the name now stands for other bytes. Returns the size of the narinfo
    /// this one replaces (0 if new), for the store's size accounting.
    pub fn put_narinfo(
        &self,
        hash: &StorePathHash,
        store_path: &str,
        nar: &NarRecord,
        size: u64,
    ) -> Result<u64, DbError> {
        let mut conn = self.conn();
        let t = now();
        let tx = conn.transaction().context("recording narinfo")?;
        let old: Option<i64> = tx
            .query_row("SELECT size FROM narinfos WHERE hash = ?1", [hash.as_str()], |r| r.get(0))
            .optional()
            .context("recording narinfo")?;
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
            "INSERT INTO narinfos(hash, store_path, nar_name, size, created_at, accessed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)
             ON CONFLICT(hash) DO UPDATE SET store_path = excluded.store_path,
               nar_name = excluded.nar_name, size = excluded.size, accessed_at = excluded.accessed_at",
            params![hash.as_str(), store_path, nar.name.as_str(), size as i64, t],
        )
        .context("recording narinfo")?;
        tx.commit().context("recording narinfo")?;
        Ok(old.unwrap_or(0) as u64)
    }

    /// Records a NAR on its own (an upload, before its narinfo), not yet stored.
    pub fn put_nar(&self, nar: &NarRecord) -> Result<(), DbError> {
        let t = now();
        self.conn()
            .execute(
                "INSERT INTO nars(name, file_hash, file_size, upstream_url, stored, created_at, accessed_at)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5, ?5)
                 ON CONFLICT(name) DO UPDATE SET file_hash = excluded.file_hash,
                   file_size = excluded.file_size, accessed_at = excluded.accessed_at",
                params![nar.name.as_str(), nar.file_hash.to_string(), nar.file_size as i64, nar.upstream_url, t],
            )
            .context("recording nar")?;
        Ok(())
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

    /// Marks a NAR's file as present (or not). Returns false if the index no longer knows the
    /// NAR (it was deleted or evicted meanwhile), in which case the file must not be kept.
    pub fn set_nar_stored(&self, name: &NarName, stored: bool) -> Result<bool, DbError> {
        let n = self
            .conn()
            .execute("UPDATE nars SET stored = ?2 WHERE name = ?1", params![name.as_str(), stored])
            .context("marking nar stored")?;
        Ok(n > 0)
    }

    /// Bytes the store holds: stored NAR files (each once, however many narinfos share it)
    /// plus narinfo files.
    pub fn usage(&self) -> Result<u64, DbError> {
        let conn = self.conn();
        let nars: i64 = conn
            .query_row("SELECT COALESCE(SUM(file_size), 0) FROM nars WHERE stored = 1", [], |r| r.get(0))
            .context("summing store size")?;
        let narinfos: i64 = conn
            .query_row("SELECT COALESCE(SUM(size), 0) FROM narinfos", [], |r| r.get(0))
            .context("summing store size")?;
        Ok((nars + narinfos) as u64)
    }

    /// (narinfos, stored NAR files).
    pub fn counts(&self) -> Result<(u64, u64), DbError> {
        let conn = self.conn();
        let a: i64 = conn.query_row("SELECT COUNT(*) FROM narinfos", [], |r| r.get(0)).context("counting")?;
        let b: i64 =
            conn.query_row("SELECT COUNT(*) FROM nars WHERE stored = 1", [], |r| r.get(0)).context("counting")?;
        Ok((a as u64, b as u64))
    }

    /// Up to `limit` narinfos to evict, least recently used first (by the later of the
    /// narinfo's and its NAR's access times).
    ///
    /// Only entries whose NAR is stored qualify, plus narinfos whose NAR was never fetched
    /// and that are older than `pending_before`: a client that was just given a narinfo is
    /// about to ask for its NAR, and evicting that entry would free a few hundred bytes and
    /// break the client's download.
    pub fn least_recently_used(&self, limit: usize, pending_before: i64) -> Result<Vec<StorePathHash>, DbError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT i.hash FROM narinfos i LEFT JOIN nars n ON n.name = i.nar_name
                 WHERE n.stored = 1 OR i.accessed_at < ?2
                 ORDER BY max(i.accessed_at, COALESCE(n.accessed_at, 0)), i.created_at LIMIT ?1",
            )
            .context("choosing entries to evict")?;
        let rows = stmt
            .query_map(params![limit as i64, pending_before], |r| r.get::<_, String>(0))
            .context("choosing entries to evict")?;
        let mut out = Vec::new();
        for h in rows {
            let h = h.context("choosing entries to evict")?;
            out.push(StorePathHash::parse(&h).ok_or_else(|| DbError::Corrupt(format!("narinfo hash {h:?}")))?);
        }
        Ok(out)
    }

    /// Stored NARs that no narinfo points at (an upload whose narinfo never came, or what an
    /// eviction left), with their sizes.
    pub fn unreferenced_nars(&self) -> Result<Vec<(NarName, u64)>, DbError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT name, file_size FROM nars n WHERE stored = 1
                 AND NOT EXISTS (SELECT 1 FROM narinfos i WHERE i.nar_name = n.name)",
            )
            .context("listing unreferenced nars")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .context("listing unreferenced nars")?;
        let mut out = Vec::new();
        for row in rows {
            let (n, size) = row.context("listing unreferenced nars")?;
            out.push((NarName::parse(&n).ok_or_else(|| DbError::Corrupt(format!("nar name {n:?}")))?, size as u64));
        }
        Ok(out)
    }

    /// Removes a narinfo from the index, and its NAR too when no other narinfo points at it.
    /// Returns what was removed, for deleting the files and the size accounting.
    pub fn remove_narinfo(&self, hash: &StorePathHash) -> Result<Option<Removed>, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction().context("removing narinfo")?;
        let row: Option<(String, i64)> = tx
            .query_row("SELECT nar_name, size FROM narinfos WHERE hash = ?1", [hash.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()
            .context("removing narinfo")?;
        let Some((nar_name, size)) = row else { return Ok(None) };
        tx.execute("DELETE FROM narinfos WHERE hash = ?1", [hash.as_str()]).context("removing narinfo")?;
        let still_used: bool = tx
            .query_row("SELECT EXISTS(SELECT 1 FROM narinfos WHERE nar_name = ?1)", [&nar_name], |r| r.get(0))
            .context("removing narinfo")?;
        let mut removed = Removed { narinfos: vec![(*hash, size as u64)], nar: None };
        if !still_used {
            removed.nar = remove_nar_row(&tx, &nar_name)?;
        }
        tx.commit().context("removing narinfo")?;
        Ok(Some(removed))
    }

    /// Removes a NAR and every narinfo pointing at it from the index.
    pub fn remove_nar(&self, name: &NarName) -> Result<Option<Removed>, DbError> {
        let mut conn = self.conn();
        let tx = conn.transaction().context("removing nar")?;
        let mut narinfos = Vec::new();
        {
            let mut stmt =
                tx.prepare("SELECT hash, size FROM narinfos WHERE nar_name = ?1").context("removing nar")?;
            let rows = stmt
                .query_map([name.as_str()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .context("removing nar")?;
            for row in rows {
                let (h, size) = row.context("removing nar")?;
                if let Some(h) = StorePathHash::parse(&h) {
                    narinfos.push((h, size as u64));
                }
            }
        }
        tx.execute("DELETE FROM narinfos WHERE nar_name = ?1", [name.as_str()]).context("removing nar")?;
        let nar = remove_nar_row(&tx, name.as_str())?;
        tx.commit().context("removing nar")?;
        if nar.is_none() && narinfos.is_empty() {
            return Ok(None);
        }
        Ok(Some(Removed { narinfos, nar }))
    }

    /// Every NAR the index knows, for fsck.
    pub fn all_nars(&self) -> Result<Vec<NarRecord>, DbError> {
        let names: Vec<String> = {
            let conn = self.conn();
            let mut stmt = conn.prepare("SELECT name FROM nars").context("listing nars")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0)).context("listing nars")?;
            rows.collect::<Result<_, _>>().context("listing nars")?
        };
        let mut out = Vec::new();
        for n in names {
            let name = NarName::parse(&n).ok_or_else(|| DbError::Corrupt(format!("nar name {n:?}")))?;
            if let Some(r) = self.nar(&name)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// The NAR a narinfo points at.
    pub fn narinfo_nar(&self, hash: &StorePathHash) -> Result<Option<NarName>, DbError> {
        let n: Option<String> = self
            .conn()
            .query_row("SELECT nar_name FROM narinfos WHERE hash = ?1", [hash.as_str()], |r| r.get(0))
            .optional()
            .context("reading narinfo")?;
        Ok(n.and_then(|n| NarName::parse(&n)))
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

    #[test]
    fn a_database_with_tables_but_no_version_is_refused_untouched() {
        let dir = std::env::temp_dir().join(format!("ncps-db-foreign-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("go.sqlite");
        let _ = std::fs::remove_file(&path);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE schema_migrations (version TEXT); CREATE TABLE narinfos (id INTEGER);")
            .unwrap();
        drop(conn);
        let err = Db::open(&path).err().expect("refused");
        assert!(matches!(err, DbError::Foreign(_)), "{err}");
        assert!(err.to_string().contains("schema_migrations"), "{err}");
        let conn = Connection::open(&path).unwrap();
        let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 0, "nothing was migrated");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
        assert_eq!(db.put_narinfo(&h, "/nix/store/x-y", &nar, 100).unwrap(), 0);
        assert_eq!(db.nar(&nar.name).unwrap(), Some(nar.clone()));
        assert!(db.set_nar_stored(&nar.name, true).unwrap());
        assert_eq!(db.usage().unwrap(), 103);
        assert_eq!(db.put_narinfo(&h, "/nix/store/x-y", &nar, 90).unwrap(), 100);
        assert!(db.nar(&nar.name).unwrap().unwrap().stored);
        let mut other = nar.clone();
        other.file_hash = Hash::of(b"other");
        db.put_narinfo(&h, "/nix/store/x-y", &other, 90).unwrap();
        assert!(!db.nar(&nar.name).unwrap().unwrap().stored, "new bytes must be fetched again");
        assert_eq!(db.narinfo_hashes().unwrap(), vec![h]);
    }

    #[test]
    fn a_nar_shared_by_two_narinfos_goes_with_the_last_one() {
        let db = Db::open_in_memory().unwrap();
        let (a, b) = (StorePathHash::parse(&"a".repeat(32)).unwrap(), StorePathHash::parse(&"b".repeat(32)).unwrap());
        let nar = record(false);
        db.put_narinfo(&a, "/nix/store/a-x", &nar, 10).unwrap();
        db.put_narinfo(&b, "/nix/store/b-x", &nar, 10).unwrap();
        db.set_nar_stored(&nar.name, true).unwrap();
        assert_eq!(db.usage().unwrap(), 23, "the shared NAR counts once");
        let r = db.remove_narinfo(&a).unwrap().unwrap();
        assert_eq!(r.nar, None);
        let r = db.remove_narinfo(&b).unwrap().unwrap();
        assert_eq!(r.nar, Some((nar.name.clone(), Some(3))));
        assert_eq!(db.usage().unwrap(), 0);
        assert!(!db.set_nar_stored(&nar.name, true).unwrap(), "a removed NAR cannot be marked stored");
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
