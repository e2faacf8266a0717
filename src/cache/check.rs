//! The comparison of store and index, one shard at a time, shared by the start-up check (after
//! anything but a clean stop) and `ncps fsck`. Pure: it is handed both listings and says what
//! disagrees; callers decide what to do about it.

use crate::index::{IndexedNar, IndexedNarinfo};
use crate::nix::{NarName, StorePathHash};
use crate::storage::{Listed, Stray};
use std::collections::{HashMap, HashSet};
use std::fmt;

/// One disagreement between store and index.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// Indexed, but its blob is gone.
    MissingNarinfo(StorePathHash),
    /// Indexed as stored, but its blob is gone.
    MissingNar(NarName),
    /// A narinfo blob the index does not know.
    OrphanNarinfo(StorePathHash),
    /// A NAR blob the index does not vouch for (unknown, not marked stored, or of another size
    /// than was verified).
    OrphanNar(NarName),
    /// Something in the store that is not an entry.
    Stray(Stray),
    /// The blob's bytes are not what was verified (or do not parse); found by `fsck`, which
    /// reads them.
    CorruptNarinfo(StorePathHash, String),
    CorruptNar(NarName, String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::MissingNarinfo(h) => write!(f, "missing: narinfo {h} is indexed but has no file"),
            Problem::MissingNar(n) => write!(f, "missing: NAR {n} is indexed as stored but has no file"),
            Problem::OrphanNarinfo(h) => write!(f, "orphaned: narinfo {h} is not in the index"),
            Problem::OrphanNar(n) => write!(f, "orphaned: NAR {n} is not in the index as stored"),
            Problem::Stray(s) => write!(f, "orphaned: {s} is not in the index"),
            Problem::CorruptNarinfo(h, why) => write!(f, "corrupt: narinfo {h}: {why}"),
            Problem::CorruptNar(n, why) => write!(f, "corrupt: NAR {n}: {why}"),
        }
    }
}

/// What disagrees in one shard of narinfos.
pub fn narinfo_shard(blobs: &[Listed<StorePathHash>], rows: &[IndexedNarinfo]) -> Vec<Problem> {
    let on_disk: HashSet<&StorePathHash> = blobs.iter().map(|b| &b.name).collect();
    let indexed: HashSet<&StorePathHash> = rows.iter().map(|r| &r.hash).collect();
    let mut out: Vec<Problem> = blobs
        .iter()
        .filter(|b| !indexed.contains(&b.name))
        .map(|b| Problem::OrphanNarinfo(b.name))
        .collect();
    out.extend(
        rows.iter()
            .filter(|r| !on_disk.contains(&r.hash))
            .map(|r| Problem::MissingNarinfo(r.hash)),
    );
    out
}

/// What disagrees in one shard of NARs. A blob is vouched for only if the index says it was
/// stored, with this size.
pub fn nar_shard(blobs: &[Listed<NarName>], rows: &[IndexedNar]) -> Vec<Problem> {
    let stored: HashMap<&NarName, u64> =
        rows.iter().filter(|r| r.record.stored).map(|r| (&r.record.name, r.record.file_size)).collect();
    let on_disk: HashSet<&NarName> = blobs.iter().map(|b| &b.name).collect();
    let mut out: Vec<Problem> = blobs
        .iter()
        .filter(|b| stored.get(&b.name) != Some(&b.len))
        .map(|b| Problem::OrphanNar(b.name.clone()))
        .collect();
    out.extend(
        rows.iter()
            .filter(|r| r.record.stored && !on_disk.contains(&r.record.name))
            .map(|r| Problem::MissingNar(r.record.name.clone())),
    );
    out
}

/// Repairs one problem in `blobs` and `index` (shared with `ncps fsck --repair`).
///
/// - a stray or an orphaned blob goes (an orphaned NAR's row, if it said stored, no longer does);
/// - a narinfo row whose blob is missing, or whose blob is corrupt, goes with its blob (and
///   its NAR, when no other narinfo uses it);
/// - a NAR missing or corrupt: one from upstream is marked absent and fetched again on next
///   use; an uploaded one cannot be fetched again, so the narinfos that need it go too.
///
/// Returns the narinfos whose blobs it removed (a running cache forgets them in its memo).
pub fn repair(
    blobs: &dyn crate::storage::BlobStore,
    index: &dyn crate::index::Index,
    p: &Problem,
) -> Result<Vec<crate::nix::StorePathHash>, crate::cache::CacheError> {
    let mut narinfos = Vec::new();
    match p {
        Problem::Stray(s) => blobs.remove_stray(s)?,
        Problem::OrphanNarinfo(h) => {
            blobs.remove_narinfo(h)?;
            narinfos.push(*h);
        }
        Problem::OrphanNar(n) => {
            blobs.remove_nar(n)?;
            if index.nar(n)?.is_some_and(|r| r.stored) {
                index.set_nar_stored(n, false)?;
            }
        }
        Problem::MissingNarinfo(h) | Problem::CorruptNarinfo(h, _) => {
            blobs.remove_narinfo(h)?;
            narinfos.push(*h);
            for removed in index.remove_narinfos(&[*h])? {
                if let Some((name, _)) = removed.nar {
                    blobs.remove_nar(&name)?;
                }
            }
        }
        Problem::MissingNar(n) | Problem::CorruptNar(n, _) => {
            blobs.remove_nar(n)?;
            let refetchable = index.nar(n)?.is_some_and(|r| !r.upstream_url.is_empty());
            if refetchable {
                index.set_nar_stored(n, false)?;
            } else if let Some(removed) = index.remove_nar(n)? {
                for (h, _) in removed.narinfos {
                    blobs.remove_narinfo(&h)?;
                    narinfos.push(h);
                }
            }
        }
    }
    Ok(narinfos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::NarRecord;
    use crate::nix::Hash;

    fn h(c: char) -> StorePathHash {
        StorePathHash::parse(&c.to_string().repeat(32)).unwrap()
    }
    fn n(c: char) -> NarName {
        NarName::parse(&format!("{}.nar", c.to_string().repeat(52))).unwrap()
    }
    fn row(c: char, created_at: i64) -> IndexedNarinfo {
        IndexedNarinfo { hash: h(c), nar: None, size: 1, created_at }
    }
    fn nar_row(c: char, stored: bool, size: u64) -> IndexedNar {
        IndexedNar {
            record: NarRecord { name: n(c), file_hash: Hash::of(b""), file_size: size, upstream_url: String::new(), stored },
            created_at: 0,
        }
    }

    /// A local store and an SQLite index in a directory of their own, holding narinfos `a`
    /// and `b` that share NAR `1` (stored), which came from an upstream when `fetched`, else
    /// from an upload.
    struct Holding {
        dir: std::path::PathBuf,
        blobs: crate::storage::LocalStore,
        index: crate::index::sqlite::SqliteIndex,
    }

    impl Holding {
        fn new(what: &str, fetched: bool) -> Holding {
            use crate::index::Index;
            use crate::storage::BlobStore;
            let dir = std::env::temp_dir().join(format!("ncps-check-{what}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let blobs = crate::storage::LocalStore::open(&dir).unwrap();
            let staging = crate::storage::Staging::open(&dir.join("tmp")).unwrap();
            let index = crate::index::sqlite::SqliteIndex::open_in_memory().unwrap();
            let upstream_url = if fetched { "http://up/nar/1".to_string() } else { String::new() };
            let nar = NarRecord { name: n('1'), file_hash: Hash::of(b"nar"), file_size: 3, upstream_url, stored: false };
            blobs.put_nar(&nar.name, staging.temp_with(b"nar").unwrap(), &nar.file_hash).unwrap();
            for c in ['a', 'b'] {
                blobs.put_narinfo(&h(c), b"StorePath: x\n", &staging).unwrap();
                index.put_narinfo(&h(c), "/nix/store/x", &nar, 13).unwrap();
            }
            index.set_nar_stored(&nar.name, true).unwrap();
            Holding { dir, blobs, index }
        }

        fn has_narinfo_blob(&self, c: char) -> bool {
            crate::storage::BlobStore::narinfo(&self.blobs, &h(c)).unwrap().is_some()
        }
    }

    impl Drop for Holding {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn repairing_a_lost_uploaded_nar_removes_every_narinfo_using_it_and_names_them() {
        use crate::index::Index;
        let t = Holding::new("uploaded", false);
        let mut forgotten = repair(&t.blobs, &t.index, &Problem::MissingNar(n('1'))).unwrap();
        forgotten.sort_by(|x, y| x.as_str().cmp(y.as_str()));
        // Nobody can fetch it again: its narinfos go, and the caller is told which, so that a
        // memo in front of the store forgets them too.
        assert_eq!(forgotten, vec![h('a'), h('b')]);
        assert!(!t.has_narinfo_blob('a') && !t.has_narinfo_blob('b'));
        assert_eq!(t.index.narinfo_nar(&h('a')).unwrap(), None);
        assert_eq!(t.index.nar(&n('1')).unwrap(), None);
    }

    #[test]
    fn repairing_a_lost_fetched_nar_keeps_its_narinfos_and_marks_it_not_stored() {
        use crate::index::Index;
        let t = Holding::new("fetched", true);
        let forgotten = repair(&t.blobs, &t.index, &Problem::CorruptNar(n('1'), "wrong hash".into())).unwrap();
        assert!(forgotten.is_empty(), "nothing to forget: the next hit fetches and verifies it again");
        assert!(t.has_narinfo_blob('a') && t.has_narinfo_blob('b'));
        assert!(crate::storage::BlobStore::nar(&t.blobs, &n('1')).unwrap().is_none(), "the bad bytes are gone");
        assert_eq!(t.index.nar(&n('1')).unwrap().map(|r| r.stored), Some(false));
    }

    #[test]
    fn repairing_a_corrupt_narinfo_removes_it_and_names_it_but_keeps_a_nar_another_uses() {
        use crate::index::Index;
        let t = Holding::new("narinfo", false);
        let forgotten = repair(&t.blobs, &t.index, &Problem::CorruptNarinfo(h('a'), "unparsable".into())).unwrap();
        assert_eq!(forgotten, vec![h('a')]);
        assert!(!t.has_narinfo_blob('a') && t.has_narinfo_blob('b'));
        assert_eq!(t.index.narinfo_nar(&h('b')).unwrap(), Some(n('1')));
        assert!(crate::storage::BlobStore::nar(&t.blobs, &n('1')).unwrap().is_some(), "b still needs it");
    }

    #[test]
    fn blobs_without_rows_and_rows_without_blobs_are_found() {
        let blobs = [Listed { name: h('a'), len: 1, modified: None }, Listed { name: h('b'), len: 1, modified: None }];
        let rows = [row('b', 0), row('c', 0)];
        assert_eq!(
            narinfo_shard(&blobs, &rows),
            vec![Problem::OrphanNarinfo(h('a')), Problem::MissingNarinfo(h('c'))]
        );
    }

    #[test]
    fn a_nar_blob_is_vouched_for_only_if_stored_with_its_verified_size() {
        let blobs = [
            Listed { name: n('1'), len: 3, modified: None },
            Listed { name: n('2'), len: 3, modified: None },
            Listed { name: n('3'), len: 4, modified: None },
        ];
        let rows = [nar_row('1', true, 3), nar_row('2', false, 3), nar_row('3', true, 3), nar_row('4', true, 3)];
        assert_eq!(
            nar_shard(&blobs, &rows),
            vec![Problem::OrphanNar(n('2')), Problem::OrphanNar(n('3')), Problem::MissingNar(n('4'))]
        );
    }
}
