//! Switching from Go ncps in place: started on a data path and database that Go ncps made,
//! ncps imports them at start, before it serves (issue 17; DESIGN.md, "Switching from Go ncps").
//!
//! - **Detected, never modified.** The database at `--cache-database-url` is Go's when it holds
//!   Go's tables (`narinfos` with `nar_files` in the current schema, `nars` in the 2024 one).
//!   It is opened read-only (`mode=ro`) and stays where it is, byte for byte; this ncps keeps
//!   its own index beside it ([`index_path`]), so every later start with the same flags finds
//!   both.
//! - **Nothing unverified is served.** Go's `store/` (NARs, and in the old schema narinfo
//!   files, in the same sharded layout as ours, so a hit would find them) is first renamed to
//!   `go-ncps-store/` (one rename, same file system). Each entry is then imported through the
//!   upload rules (`Cache::import_entry`): its narinfo must carry a signature by an upstream
//!   key or by the Go cache's own key, its NAR must hash to its name; both are stored through
//!   the seams. A NAR that does not verify stays in `go-ncps-store/` (reported, re-fetched on
//!   demand); an imported one is removed from there (its copy is in the store).
//! - **The key stays.** Go's signing key (its `config` table's `secret_key`, or the older
//!   `config/cache.key` file) becomes this cache's key when none is set, so `/pubkey` is the
//!   same and clients need no edit.
//! - **Resumable.** An entry already in the index is skipped, so an interrupted import goes on
//!   where it stopped; a finished one leaves `go-ncps-store/IMPORTED` and is not run again.

use crate::cache::Cache;
use crate::nix::{PublicKey, StorePathHash};
use rusqlite::{Connection, OpenFlags};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Which of Go ncps's SQLite schemas a database has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoSchema {
    /// 2026 and later: narinfos in the database (`narinfos` with their fields,
    /// `narinfo_references`, `narinfo_signatures`), NARs in `nar_files`; the key in `config`.
    Current,
    /// 2024-2025: `narinfos` holds hashes only (the narinfo text is a file under
    /// `store/narinfo/`), NARs in `nars`; the key in `config/cache.key`.
    Old,
}

/// A Go ncps cache found at start.
#[derive(Debug)]
pub struct GoCache {
    pub schema: GoSchema,
    pub database: PathBuf,
    /// Go's `store/`, renamed aside.
    pub store: PathBuf,
    /// Go's signing key, if it had one.
    pub secret_key: Option<String>,
}

/// Where this ncps keeps its own index when the configured database is Go's.
pub fn index_path(go_database: &Path) -> PathBuf {
    let mut name = go_database.as_os_str().to_os_string();
    name.push(".ncps-rs");
    PathBuf::from(name)
}

fn open_read_only(db: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
}

fn tables(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut st = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table'")?;
    let names = st.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    Ok(names)
}

fn columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut st = conn.prepare(&format!("PRAGMA table_info(`{table}`)"))?;
    let names = st.query_map([], |r| r.get::<_, String>(1))?.collect::<Result<Vec<_>, _>>()?;
    Ok(names)
}

/// The schema of a Go ncps database, judged from its table and `narinfos` column names (pure).
///
/// Our own index also has tables named `narinfos`, `nars` and `config`, so the names alone
/// are not enough: Go's `narinfos` has an integer `id` and a `last_accessed_at` column; ours
/// has no `last_accessed_at` (its `nar_id` column since schema 7, `nar_name` before it, an
/// `accessed_at` before schema 6, and its `totals` table tell it apart).
/// Anything that looks like ours in any of these ways is never taken for Go's: mistaking our
/// index for Go's would move our store aside.
pub fn schema_of(tables: &[String], narinfo_columns: &[String]) -> Option<GoSchema> {
    let has = |t: &str| tables.iter().any(|n| n == t);
    let col = |c: &str| narinfo_columns.iter().any(|n| n == c);
    if !has("narinfos") || has("totals") || col("nar_id") || col("nar_name") || col("accessed_at") {
        return None;
    }
    if !col("id") || !col("last_accessed_at") {
        return None;
    }
    if has("nar_files") && col("store_path") {
        Some(GoSchema::Current)
    } else if has("nars") {
        Some(GoSchema::Old)
    } else {
        None
    }
}

/// Whether `db` is a Go ncps database, and which schema. `None` for anything else (ours, a
/// missing file, something that is not SQLite).
pub fn detect(db: &Path) -> Option<GoSchema> {
    if !std::fs::metadata(db).is_ok_and(|m| m.is_file() && m.len() > 0) {
        return None;
    }
    let conn = open_read_only(db).ok()?;
    let t = tables(&conn).ok()?;
    let c = columns(&conn, "narinfos").unwrap_or_default();
    schema_of(&t, &c)
}

/// Prepares the switch before the store is opened: renames Go's `store/` aside (once) and
/// reads Go's key. `Ok(None)` when `db` is not Go's.
pub fn prepare(db: &Path, data_path: &Path) -> Result<Option<GoCache>, String> {
    let Some(schema) = detect(db) else { return Ok(None) };
    let store = data_path.join("go-ncps-store");
    let theirs = data_path.join("store");
    if !store.exists() && theirs.exists() {
        std::fs::rename(&theirs, &store)
            .map_err(|e| format!("moving Go ncps's {} aside to {}: {e}", theirs.display(), store.display()))?;
        log::info!(
            "Go ncps cache found ({} schema): its {} is now {}, imported from there; {} is not changed",
            if schema == GoSchema::Current { "current" } else { "2024" },
            theirs.display(),
            store.display(),
            db.display()
        );
    }
    let conn = open_read_only(db).map_err(|e| format!("{}: {e}", db.display()))?;
    let secret_key = go_key(&conn, schema, data_path);
    Ok(Some(GoCache { schema, database: db.to_path_buf(), store, secret_key }))
}

fn go_key(conn: &Connection, schema: GoSchema, data_path: &Path) -> Option<String> {
    if schema == GoSchema::Current || tables(conn).ok()?.iter().any(|t| t == "config") {
        let v: Option<String> = conn
            .query_row("SELECT value FROM config WHERE key = 'secret_key'", [], |r| r.get(0))
            .ok();
        if let Some(v) = v.filter(|v| !v.trim().is_empty()) {
            return Some(v.trim().to_string());
        }
    }
    std::fs::read_to_string(data_path.join("config").join("cache.key")).ok().map(|s| s.trim().to_string())
}

/// The sharded place of a file named `name` under `dir`, as Go ncps lays them out.
fn sharded(dir: &Path, name: &str) -> PathBuf {
    let c1 = name.get(..1).unwrap_or("_");
    let c2 = name.get(..2).unwrap_or("__");
    dir.join(c1).join(c2).join(name)
}

/// The narinfo text of one row of the current schema, from its fields.
#[allow(clippy::too_many_arguments)]
pub fn narinfo_text(
    store_path: &str,
    url: &str,
    compression: &str,
    file_hash: &str,
    file_size: i64,
    nar_hash: &str,
    nar_size: i64,
    references: &[String],
    deriver: Option<&str>,
    system: Option<&str>,
    sigs: &[String],
    ca: Option<&str>,
) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "StorePath: {store_path}");
    let _ = writeln!(t, "URL: {url}");
    let _ = writeln!(t, "Compression: {}", if compression.is_empty() { "none" } else { compression });
    let _ = writeln!(t, "FileHash: {file_hash}");
    let _ = writeln!(t, "FileSize: {file_size}");
    let _ = writeln!(t, "NarHash: {nar_hash}");
    let _ = writeln!(t, "NarSize: {nar_size}");
    let _ = writeln!(t, "References: {}", references.join(" "));
    if let Some(d) = deriver.filter(|d| !d.is_empty()) {
        let _ = writeln!(t, "Deriver: {d}");
    }
    if let Some(s) = system.filter(|s| !s.is_empty()) {
        let _ = writeln!(t, "System: {s}");
    }
    for s in sigs {
        let _ = writeln!(t, "Sig: {s}");
    }
    if let Some(ca) = ca.filter(|c| !c.is_empty()) {
        let _ = writeln!(t, "CA: {ca}");
    }
    t
}

/// What an import did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Imported {
    pub imported: u64,
    pub already: u64,
    pub skipped: u64,
}

/// One Go entry: its hash and narinfo text (`None`: the text could not be found).
type Entry = (String, Option<String>);

fn entries(conn: &Connection, go: &GoCache) -> rusqlite::Result<Vec<Entry>> {
    let mut out = Vec::new();
    match go.schema {
        GoSchema::Current => {
            let mut st = conn.prepare(
                "SELECT id, hash, store_path, url, compression, file_hash, file_size, nar_hash, nar_size, \
                 deriver, system, ca FROM narinfos ORDER BY id",
            )?;
            let mut refs = conn.prepare("SELECT reference FROM narinfo_references WHERE narinfo_id = ? ORDER BY id")?;
            let mut sigs = conn.prepare("SELECT signature FROM narinfo_signatures WHERE narinfo_id = ? ORDER BY id")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, Option<i64>>(8)?,
                    r.get::<_, Option<String>>(9)?,
                    r.get::<_, Option<String>>(10)?,
                    r.get::<_, Option<String>>(11)?,
                ))
            })?;
            for row in rows {
                let (id, hash, sp, url, comp, fh, fs, nh, ns, deriver, system, ca) = row?;
                let text = match (sp, url, fh, fs, nh, ns) {
                    (Some(sp), Some(url), Some(fh), Some(fs), Some(nh), Some(ns)) => {
                        let r = refs.query_map([id], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
                        let s = sigs.query_map([id], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
                        Some(narinfo_text(
                            &sp,
                            &url,
                            comp.as_deref().unwrap_or(""),
                            &fh,
                            fs,
                            &nh,
                            ns,
                            &r,
                            deriver.as_deref(),
                            system.as_deref(),
                            &s,
                            ca.as_deref(),
                        ))
                    }
                    // A row from before the fields moved into the database: its file.
                    _ => std::fs::read_to_string(sharded(&go.store.join("narinfo"), &format!("{hash}.narinfo"))).ok(),
                };
                out.push((hash, text));
            }
        }
        GoSchema::Old => {
            let mut st = conn.prepare("SELECT hash FROM narinfos ORDER BY id")?;
            for hash in st.query_map([], |r| r.get::<_, String>(0))? {
                let hash = hash?;
                let text = std::fs::read_to_string(sharded(&go.store.join("narinfo"), &format!("{hash}.narinfo"))).ok();
                out.push((hash, text));
            }
        }
    }
    Ok(out)
}

/// Imports every entry of `go` into `cache` (before it serves). `trusted`: the keys a narinfo
/// must be signed by (the upstream keys and Go's own public key).
pub fn import(cache: &Cache, go: &GoCache, trusted: &[PublicKey]) -> Result<Imported, String> {
    let done = go.store.join("IMPORTED");
    if done.exists() {
        return Ok(Imported::default());
    }
    let conn = open_read_only(&go.database).map_err(|e| format!("{}: {e}", go.database.display()))?;
    let list = entries(&conn, go).map_err(|e| format!("reading {}: {e}", go.database.display()))?;
    log::info!("importing {} narinfos of the Go ncps cache from {}", list.len(), go.database.display());
    let mut n = Imported::default();
    for (i, (hash_text, text)) in list.iter().enumerate() {
        let Some(hash) = StorePathHash::parse(hash_text) else {
            log::warn!("go import: narinfo {hash_text:?}: not a store path hash; skipped");
            n.skipped += 1;
            continue;
        };
        if cache.holds_narinfo(&hash) {
            n.already += 1;
            continue;
        }
        let Some(text) = text else {
            log::warn!("go import: narinfo {hash}: its text is neither in the database nor in a file; skipped");
            n.skipped += 1;
            continue;
        };
        let nar_file = crate::nix::NarInfo::parse(text.as_bytes())
            .ok()
            .and_then(|info| info.url.rsplit('/').next().map(|b| sharded(&go.store.join("nar"), b)));
        let Some(nar_path) = nar_file else {
            log::warn!("go import: narinfo {hash}: does not parse or names no NAR; skipped");
            n.skipped += 1;
            continue;
        };
        let mut file = match std::fs::File::open(&nar_path) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("go import: narinfo {hash}: its NAR {}: {e}; skipped (fetched again when asked for)", nar_path.display());
                n.skipped += 1;
                continue;
            }
        };
        match cache.import_entry(&hash, text.as_bytes(), &mut file, trusted) {
            Ok(()) => {
                n.imported += 1;
                // Its verified copy is in the store now.
                let _ = std::fs::remove_file(&nar_path);
            }
            Err(e) => {
                log::warn!("go import: narinfo {hash}: {e}; skipped, left in {} (fetched again when asked for)", go.store.display());
                n.skipped += 1;
            }
        }
        if (i + 1) % 10_000 == 0 {
            log::info!("go import: {} of {} narinfos looked at", i + 1, list.len());
        }
    }
    let summary = format!("imported {}, already here {}, skipped {}\n", n.imported, n.already, n.skipped);
    std::fs::write(&done, &summary).map_err(|e| format!("{}: {e}", done.display()))?;
    log::info!("go import finished: {}", summary.trim_end());
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_schema_is_told_by_its_tables() {
        let cur = s(&["narinfos", "nar_files", "narinfo_nar_files", "config"]);
        let go_cols = s(&["id", "hash", "store_path", "last_accessed_at"]);
        assert_eq!(schema_of(&cur, &go_cols), Some(GoSchema::Current));
        let old = s(&["narinfos", "nars"]);
        assert_eq!(schema_of(&old, &s(&["id", "hash", "last_accessed_at"])), Some(GoSchema::Old));
        assert_eq!(schema_of(&old, &s(&["hash"])), None, "a narinfos table without Go's columns");
        assert_eq!(schema_of(&[], &[]), None);
    }

    #[test]
    fn our_own_index_is_never_taken_for_a_go_database() {
        let dir = std::env::temp_dir().join(format!("ncps-go-detect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("db.sqlite");
        drop(crate::index::sqlite::SqliteIndex::open(&db).unwrap());
        let found = detect(&db);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found, None, "mistaking it would move our own store aside");
    }

    #[test]
    fn a_narinfo_is_written_back_from_its_fields_in_nix_order() {
        let t = narinfo_text(
            "/nix/store/aaaa-x",
            "nar/abc.nar.xz",
            "xz",
            "sha256:f",
            10,
            "sha256:n",
            20,
            &s(&["aaaa-x", "bbbb-y"]),
            None,
            Some("x86_64-linux"),
            &s(&["k:sig"]),
            None,
        );
        assert_eq!(
            t,
            "StorePath: /nix/store/aaaa-x\nURL: nar/abc.nar.xz\nCompression: xz\nFileHash: sha256:f\nFileSize: 10\n\
             NarHash: sha256:n\nNarSize: 20\nReferences: aaaa-x bbbb-y\nSystem: x86_64-linux\nSig: k:sig\n"
        );
        assert!(narinfo_text("/p", "u", "", "h", 1, "h", 1, &[], None, None, &[], None).contains("Compression: none\n"));
    }

    #[test]
    fn our_index_lives_beside_the_go_database() {
        assert_eq!(index_path(Path::new("/s/var/ncps/db/db.sqlite")), PathBuf::from("/s/var/ncps/db/db.sqlite.ncps-rs"));
    }
}
