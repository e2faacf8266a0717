//! End-to-end specification of the switch from Go ncps (issue 17): started on a data path and
//! SQLite database made by Go ncps, ncps imports every narinfo whose NAR verifies, keeps Go's
//! signing key (the same `/pubkey`), serves the cached paths with the upstream down, reports
//! and leaves aside what does not verify, and never changes Go's database.
//!
//! The Go caches are made here from our own description of Go's schemas (DESIGN.md,
//! "Switching from Go ncps"): the current one (narinfos in the database) and the 2024 one
//! (narinfo files, a `nars` table, the key in `config/cache.key`).
//!
//! Run: `cargo test --test e2e gomigrate::`.

use crate::support::*;
use std::fs;
use std::path::{Path, PathBuf};

/// Go ncps's current SQLite schema, the tables an import reads (as its migrations leave them).
const CURRENT_SCHEMA: &str = "
CREATE TABLE `narinfos` (`id` integer NOT NULL PRIMARY KEY AUTOINCREMENT, `created_at` datetime NOT NULL DEFAULT (CURRENT_TIMESTAMP), `updated_at` datetime NULL, `hash` text NOT NULL, `store_path` text NULL, `url` text NULL, `compression` text NULL, `file_hash` text NULL, `file_size` integer NULL, `nar_hash` text NULL, `nar_size` integer NULL, `deriver` text NULL, `system` text NULL, `ca` text NULL, `last_accessed_at` datetime NULL DEFAULT (CURRENT_TIMESTAMP), `upstream_url` text NULL);
CREATE UNIQUE INDEX `narinfo_hash` ON `narinfos` (`hash`);
CREATE TABLE `config` (`id` integer NOT NULL PRIMARY KEY AUTOINCREMENT, `created_at` datetime NOT NULL DEFAULT (CURRENT_TIMESTAMP), `updated_at` datetime NULL, `key` text NOT NULL, `value` text NOT NULL);
CREATE TABLE `nar_files` (`id` integer NOT NULL PRIMARY KEY AUTOINCREMENT, `created_at` datetime NOT NULL DEFAULT (CURRENT_TIMESTAMP), `updated_at` datetime NULL, `hash` text NOT NULL, `compression` text NOT NULL DEFAULT (''), `file_size` integer NOT NULL, `query` text NOT NULL DEFAULT (''), `total_chunks` integer NOT NULL DEFAULT (0), `chunking_started_at` datetime NULL, `verified_at` datetime NULL, `last_accessed_at` datetime NULL DEFAULT (CURRENT_TIMESTAMP));
CREATE TABLE `narinfo_nar_files` (`id` integer NOT NULL PRIMARY KEY AUTOINCREMENT, `nar_file_id` integer NOT NULL, `narinfo_id` integer NOT NULL);
CREATE TABLE `narinfo_references` (`id` integer NOT NULL PRIMARY KEY AUTOINCREMENT, `reference` text NOT NULL, `narinfo_id` integer NOT NULL);
CREATE TABLE `narinfo_signatures` (`id` integer NOT NULL PRIMARY KEY AUTOINCREMENT, `signature` text NOT NULL, `narinfo_id` integer NOT NULL);
";

/// Go ncps's 2024 schema: hashes only; the narinfo text is a file.
const OLD_SCHEMA: &str = "
CREATE TABLE narinfos (id INTEGER PRIMARY KEY AUTOINCREMENT, hash TEXT NOT NULL UNIQUE, created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL, updated_at TIMESTAMP, last_accessed_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE nars (id INTEGER PRIMARY KEY AUTOINCREMENT, narinfo_id INTEGER NOT NULL REFERENCES narinfos (id), hash TEXT NOT NULL UNIQUE, compression TEXT NOT NULL DEFAULT '', file_size INTEGER NOT NULL, created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP NOT NULL, updated_at TIMESTAMP, last_accessed_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, `query` TEXT NOT NULL DEFAULT '');
";

fn sharded(dir: &Path, name: &str) -> PathBuf {
    dir.join(&name[..1]).join(&name[..2]).join(name)
}

fn put(path: &Path, bytes: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

/// A Go ncps data path holding `paths` (their NARs from the fixture's xz cache), in `schema`;
/// the NAR of `corrupt` (if any) has one byte changed. Returns the database path.
fn go_cache(fx: &Fixture, data: &Path, paths: &[String], corrupt: Option<&str>, current: bool) -> PathBuf {
    let db = data.join("var/ncps/db/db.sqlite");
    fs::create_dir_all(db.parent().unwrap()).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(if current { CURRENT_SCHEMA } else { OLD_SCHEMA }).unwrap();
    let key = fs::read_to_string(fx.dir.join("keys/up2.sec")).unwrap();
    if current {
        conn.execute("INSERT INTO config (key, value) VALUES ('secret_key', ?1)", [key.trim()]).unwrap();
    } else {
        put(&data.join("config/cache.key"), key.as_bytes());
    }
    let cache = fx.cache_dir(Compression::Xz);
    for p in paths {
        let text = fx.upstream_narinfo(Compression::Xz, p);
        let ni = NarInfo::parse(&text);
        let url = ni.get("URL").unwrap();
        let base = url.rsplit('/').next().unwrap();
        let mut nar = fs::read(cache.join(url)).unwrap();
        if corrupt == Some(p.as_str()) {
            let mid = nar.len() / 2;
            nar[mid] ^= 0xff;
        }
        put(&sharded(&data.join("store/nar"), base), &nar);
        let hash = store_hash(p);
        if current {
            let f = |k: &str| ni.get(k).map(str::to_string);
            conn.execute(
                "INSERT INTO narinfos (hash, store_path, url, compression, file_hash, file_size, nar_hash, nar_size, deriver, system) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                rusqlite::params![
                    hash, f("StorePath"), f("URL"), f("Compression"), f("FileHash"),
                    f("FileSize").map(|v| v.parse::<i64>().unwrap()), f("NarHash"),
                    f("NarSize").map(|v| v.parse::<i64>().unwrap()), f("Deriver"), f("System")
                ],
            )
            .unwrap();
            let id = conn.last_insert_rowid();
            for r in ni.get("References").unwrap_or("").split_whitespace() {
                conn.execute("INSERT INTO narinfo_references (reference, narinfo_id) VALUES (?1, ?2)", rusqlite::params![r, id]).unwrap();
            }
            for line in text.lines().filter_map(|l| l.strip_prefix("Sig: ")) {
                conn.execute("INSERT INTO narinfo_signatures (signature, narinfo_id) VALUES (?1, ?2)", rusqlite::params![line, id]).unwrap();
            }
        } else {
            conn.execute("INSERT INTO narinfos (hash) VALUES (?1)", [hash]).unwrap();
            put(&sharded(&data.join("store/narinfo"), &format!("{hash}.narinfo")), text.as_bytes());
        }
    }
    drop(conn);
    db
}

fn switch_keeps_key_and_paths(current: bool) {
    let Some(fx) = fixture_or_skip() else { return };
    let data = TempDir::new("go-ncps-data");
    let mut paths = fx.top_closure.clone();
    let bad = fx.many[0].clone();
    paths.push(bad.clone());
    let db = go_cache(fx, data.path(), &paths, Some(&bad), current);
    let db_before = fs::read(&db).unwrap();
    let url = format!("sqlite:{}", db.display());
    let mut ncps = Ncps::start_on(
        data,
        &["--cache-database-url", &url, "--upstream-cache", "http://127.0.0.1:9", "--upstream-public-key", &fx.up1_public_key],
    );
    ncps.wait_for_log(0, "go import finished", std::time::Duration::from_secs(10));
    let log = ncps.log();
    assert!(log.contains(&format!("imported {}, already here 0, skipped 1", fx.top_closure.len())), "{log}");
    assert!(log.contains(&format!("narinfo {}", store_hash(&bad))) && log.contains("skipped, left in"), "{log}");
    // The same key: clients need no edit.
    assert_eq!(ncps.pubkey(), fx.up2_public_key.trim(), "/pubkey is Go ncps's key");
    // The cached paths are served with the upstream down, verified by Nix with the old key.
    NixClient::Nix2_8
        .copy_from(&ncps.url(), &[&fx.top], fx.up2_public_key.trim())
        .expect("nix copy from the switched cache, trusting only Go ncps's key");
    // What did not verify is not served.
    assert_ne!(ncps.get(&format!("/{}.narinfo", store_hash(&bad))).status, 200);
    assert_eq!(fs::read(&db).unwrap(), db_before, "Go's database is not changed");
    // Started again, the import is not run again; run again after an interruption (its
    // marker gone), it skips what is here.
    ncps.stop();
    fs::remove_file(ncps.data_dir().join("go-ncps-store/IMPORTED")).unwrap();
    let at = ncps.log_len();
    ncps.restart();
    let again = ncps.wait_for_log(at, "go import finished", std::time::Duration::from_secs(10));
    assert!(again.contains(&format!("imported 0, already here {}, skipped 1", fx.top_closure.len())), "{again}");
    assert_eq!(fs::read(&db).unwrap(), db_before, "Go's database is not changed");
}

#[test]
fn a_go_ncps_cache_of_the_current_schema_is_served_with_its_key_and_paths_and_what_does_not_verify_is_left_aside() {
    switch_keeps_key_and_paths(true);
}

#[test]
fn a_go_ncps_cache_of_the_2024_schema_is_served_with_its_key_and_paths_and_what_does_not_verify_is_left_aside() {
    switch_keeps_key_and_paths(false);
}
