//! `ncps fsck [--repair]`: checks that the store and its index agree and that every NAR still
//! has the bytes it was verified with.
//!
//! Disks rot, people delete files by hand, and power fails. Serving never re-hashes (that
//! would cost a read of every NAR per hit), so this is where corruption is found: every stored
//! NAR is re-hashed against the FileHash/FileSize it was accepted with. With `--repair`, what
//! is broken is removed, so a NAR from upstream is fetched (and verified) again on next use.

use crate::db::{Db, NarRecord};
use crate::nix::hash::Hasher;
use crate::nix::{NarInfo, NarName, StorePathHash};
use crate::store::Store;
use std::collections::HashSet;
use std::fmt;
use std::io::Read;

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Indexed, but its file is gone.
    MissingNarinfo(StorePathHash),
    MissingNar(NarName),
    /// A file the index does not vouch for.
    Orphan(std::path::PathBuf),
    /// The file's bytes are not what was verified (or do not parse).
    CorruptNarinfo(StorePathHash, String),
    CorruptNar(NarName, String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::MissingNarinfo(h) => write!(f, "missing: narinfo {h} is indexed but has no file"),
            Problem::MissingNar(n) => write!(f, "missing: NAR {n} is indexed as stored but has no file"),
            Problem::Orphan(p) => write!(f, "orphaned: {} is not in the index", p.display()),
            Problem::CorruptNarinfo(h, why) => write!(f, "corrupt: narinfo {h}: {why}"),
            Problem::CorruptNar(n, why) => write!(f, "corrupt: NAR {n}: {why}"),
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub narinfos_checked: usize,
    pub nars_checked: usize,
    pub problems: Vec<Problem>,
}

impl Report {
    fn count(&self, kind: fn(&Problem) -> bool) -> usize {
        self.problems.iter().filter(|p| kind(p)).count()
    }
    pub fn missing(&self) -> usize {
        self.count(|p| matches!(p, Problem::MissingNarinfo(_) | Problem::MissingNar(_)))
    }
    pub fn orphaned(&self) -> usize {
        self.count(|p| matches!(p, Problem::Orphan(_)))
    }
    pub fn corrupt(&self) -> usize {
        self.count(|p| matches!(p, Problem::CorruptNarinfo(..) | Problem::CorruptNar(..)))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "checked {} narinfo(s) and {} NAR(s): {} missing, {} orphaned, {} corrupt",
            self.narinfos_checked,
            self.nars_checked,
            self.missing(),
            self.orphaned(),
            self.corrupt()
        )
    }
}

fn hash_file(path: &std::path::Path) -> std::io::Result<(crate::nix::Hash, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((hasher.finish(), len));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

/// Checks everything; returns what was found (nothing is changed).
pub fn check(store: &Store, db: &Db) -> Result<Report, String> {
    let e = |e: &dyn fmt::Display| e.to_string();
    let mut report = Report::default();
    let indexed: HashSet<StorePathHash> = db.narinfo_hashes().map_err(|x| e(&x))?.into_iter().collect();
    let (files, strays) = store.list_narinfos().map_err(|x| e(&x))?;
    report.problems.extend(strays.into_iter().map(Problem::Orphan));
    let files: HashSet<StorePathHash> = files.into_iter().collect();
    for h in files.difference(&indexed) {
        report.problems.push(Problem::Orphan(store.narinfo_path(h)));
    }
    let mut sorted: Vec<_> = indexed.iter().collect();
    sorted.sort();
    for h in sorted {
        report.narinfos_checked += 1;
        if !files.contains(h) {
            report.problems.push(Problem::MissingNarinfo(*h));
            continue;
        }
        let bytes = std::fs::read(store.narinfo_path(h)).map_err(|x| e(&x))?;
        match NarInfo::parse(&bytes) {
            Err(why) => report.problems.push(Problem::CorruptNarinfo(*h, why.to_string())),
            Ok(info) if info.store_path_hash() != Some(*h) => {
                report.problems.push(Problem::CorruptNarinfo(*h, format!("describes {}", info.store_path)))
            }
            Ok(_) => {
                if db.narinfo_nar(h).map_err(|x| e(&x))?.is_none() {
                    report.problems.push(Problem::CorruptNarinfo(*h, "its NAR is not indexed".into()));
                }
            }
        }
    }

    let records: Vec<NarRecord> = db.all_nars().map_err(|x| e(&x))?;
    let stored: HashSet<NarName> = records.iter().filter(|r| r.stored).map(|r| r.name.clone()).collect();
    let (nar_files, strays) = store.list_nars().map_err(|x| e(&x))?;
    report.problems.extend(strays.into_iter().map(Problem::Orphan));
    let on_disk: HashSet<NarName> = nar_files.into_iter().map(|(n, _)| n).collect();
    for n in on_disk.difference(&stored) {
        report.problems.push(Problem::Orphan(store.nar_path(n)));
    }
    for r in records.iter().filter(|r| r.stored) {
        report.nars_checked += 1;
        if !on_disk.contains(&r.name) {
            report.problems.push(Problem::MissingNar(r.name.clone()));
            continue;
        }
        let (hash, len) = hash_file(&store.nar_path(&r.name)).map_err(|x| e(&x))?;
        if len != r.file_size {
            report.problems.push(Problem::CorruptNar(r.name.clone(), format!("{len} bytes, expected {}", r.file_size)));
        } else if hash != r.file_hash {
            report.problems.push(Problem::CorruptNar(r.name.clone(), format!("sha256 {hash}, expected {}", r.file_hash)));
        }
    }
    Ok(report)
}

/// Removes what `report` found broken: orphan files, index entries without files, corrupt
/// files. A NAR that came from upstream is only marked absent (it is fetched again on next
/// use); an uploaded one cannot be fetched again, so the narinfos that need it go too.
pub fn repair(store: &Store, db: &Db, report: &Report) -> Result<(), String> {
    let e = |e: &dyn fmt::Display| e.to_string();
    for p in &report.problems {
        match p {
            Problem::Orphan(path) => Store::remove(path).map_err(|x| e(&x))?,
            Problem::MissingNarinfo(h) | Problem::CorruptNarinfo(h, _) => {
                Store::remove(&store.narinfo_path(h)).map_err(|x| e(&x))?;
                if let Some(removed) = db.remove_narinfo(h).map_err(|x| e(&x))? {
                    if let Some((name, _)) = removed.nar {
                        Store::remove(&store.nar_path(&name)).map_err(|x| e(&x))?;
                    }
                }
            }
            Problem::MissingNar(n) | Problem::CorruptNar(n, _) => {
                Store::remove(&store.nar_path(n)).map_err(|x| e(&x))?;
                let refetchable = db.nar(n).map_err(|x| e(&x))?.is_some_and(|r| !r.upstream_url.is_empty());
                if refetchable {
                    db.set_nar_stored(n, false).map_err(|x| e(&x))?;
                } else if let Some(removed) = db.remove_nar(n).map_err(|x| e(&x))? {
                    for (h, _) in removed.narinfos {
                        Store::remove(&store.narinfo_path(&h)).map_err(|x| e(&x))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// The `fsck` command. Returns the exit status: 0 when the store is sound (or was repaired),
/// 1 when problems were found and left alone.
pub fn run(paths: &crate::config::StoragePaths, repair_it: bool) -> Result<i32, String> {
    let store = Store::open(&paths.data_path, &paths.temp_path).map_err(|e| e.to_string())?;
    // Without its database every cached file looks orphaned, and --repair would remove them all.
    if store.holds_files_without(&paths.database_path) {
        return Err(format!(
            "database {} does not exist, but the store holds files: nothing to check them against",
            paths.database_path.display()
        ));
    }
    let db = Db::open(&paths.database_path).map_err(|e| format!("database {}: {e}", paths.database_path.display()))?;
    let report = check(&store, &db)?;
    for p in &report.problems {
        println!("{p}");
    }
    println!("fsck: {report}");
    if report.problems.is_empty() {
        return Ok(0);
    }
    if repair_it {
        repair(&store, &db, &report)?;
        println!("fsck: repaired: broken entries removed; NARs from upstream will be fetched again");
        return Ok(0);
    }
    println!("fsck: run `ncps fsck --repair` to remove what is broken");
    Ok(1)
}
