//! The contract every [`BlobStore`] is held to (see the module documentation of
//! [`crate::storage`]). Each implementation runs [`every_rule`] in its own test.

use super::*;
use crate::nix::Hash;

fn nar_name(c: char) -> NarName {
    NarName::parse(&format!("{}.nar.xz", c.to_string().repeat(52))).expect("valid NAR name")
}

fn hash(c: char) -> StorePathHash {
    StorePathHash::parse(&c.to_string().repeat(32)).expect("valid hash")
}

fn bytes_of(blob: Option<Blob>) -> Option<Vec<u8>> {
    blob.map(|b| b.into_bytes().expect("readable"))
}

/// Runs every rule against `store`, which must be empty, staging in `staging`.
pub fn every_rule(store: &dyn BlobStore, staging: &Staging) {
    a_blob_is_absent_until_put_then_whole(store, staging);
    a_dropped_staged_nar_leaves_nothing(store, staging);
    removing_is_idempotent(store, staging);
    listing_by_shard_finds_each_blob_once(store, staging);
    a_zstd_copy_appears_whole_is_never_listed_as_a_nar_and_goes_with_its_nar(store, staging);
}

fn a_blob_is_absent_until_put_then_whole(store: &dyn BlobStore, staging: &Staging) {
    let (h, n) = (hash('a'), nar_name('1'));
    assert!(store.narinfo(&h).unwrap().is_none());
    assert!(store.nar(&n).unwrap().is_none());
    assert_eq!(store.nar_len(&n).unwrap(), None);
    assert!(!store.holds_anything().unwrap());
    store.put_narinfo(&h, b"StorePath: x\n", staging).unwrap();
    assert_eq!(bytes_of(store.narinfo(&h).unwrap()).as_deref(), Some(&b"StorePath: x\n"[..]));
    store.put_narinfo(&h, b"replaced", staging).unwrap();
    assert_eq!(bytes_of(store.narinfo(&h).unwrap()).as_deref(), Some(&b"replaced"[..]));
    store.put_nar(&n, staging.temp_with(b"nar bytes").unwrap(), &Hash::of(b"nar bytes")).unwrap();
    assert_eq!(store.nar_len(&n).unwrap(), Some(9));
    let blob = store.nar(&n).unwrap().unwrap();
    assert!(store.nar_file_hash(&blob).is_none_or(|h| h == Hash::of(b"nar bytes")), "the FileHash given, or none");
    assert_eq!(bytes_of(Some(blob)).as_deref(), Some(&b"nar bytes"[..]));
    assert!(store.holds_anything().unwrap());
    store.remove_narinfo(&h).unwrap();
    store.remove_nar(&n).unwrap();
    assert!(store.narinfo(&h).unwrap().is_none());
    assert!(store.nar(&n).unwrap().is_none());
}

fn a_dropped_staged_nar_leaves_nothing(store: &dyn BlobStore, staging: &Staging) {
    let mut t = staging.temp_file().unwrap();
    t.write_all(b"half").unwrap();
    let path = t.path().to_path_buf();
    drop(t);
    assert!(!path.exists(), "a dropped temp file is removed");
    assert!(store.nar(&nar_name('2')).unwrap().is_none());
}

fn removing_is_idempotent(store: &dyn BlobStore, _staging: &Staging) {
    store.remove_narinfo(&hash('b')).unwrap();
    store.remove_nar(&nar_name('3')).unwrap();
}

fn listing_by_shard_finds_each_blob_once(store: &dyn BlobStore, staging: &Staging) {
    let n = nar_name('4');
    let h = hash('c');
    store.put_nar(&n, staging.temp_with(&Hash::of(b"x").0).unwrap(), &Hash::of(&Hash::of(b"x").0)).unwrap();
    store.put_narinfo(&h, b"x", staging).unwrap();
    let mut nars = 0;
    let mut narinfos = 0;
    for shard in shards() {
        let s = store.list_nars(&shard).unwrap();
        assert!(s.strays.is_empty(), "{shard}: {:?}", s.strays);
        for e in s.entries {
            assert_eq!(e.name, n);
            assert_eq!(&shard, &n.as_str()[..2]);
            assert_eq!(e.len, 32);
            nars += 1;
        }
        let s = store.list_narinfos(&shard).unwrap();
        narinfos += s.entries.len();
    }
    assert_eq!((nars, narinfos), (1, 1));
    assert!(store.strays_outside_shards().unwrap().is_empty());
    store.remove_nar(&n).unwrap();
    store.remove_narinfo(&h).unwrap();
}

fn xattrs_work(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let probe = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated path and name, a one-byte value.
    unsafe { libc::setxattr(probe.as_ptr(), c"user.ncps.probe".as_ptr(), b"x".as_ptr() as *const libc::c_void, 1, 0) == 0 }
}

#[test]
fn the_local_store_keeps_the_contract() {
    let dir = std::env::temp_dir().join(format!("ncps-storage-contract-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = LocalStore::open(&dir).unwrap();
    let staging = Staging::open(&dir.join("tmp")).unwrap();
    every_rule(&store, &staging);
    // Local specifics: the Go ncps layout, strays found and removable.
    let n = nar_name('5');
    store.put_nar(&n, staging.temp_with(b"x").unwrap(), &Hash::of(b"x")).unwrap();
    assert!(dir.join(format!("store/nar/5/55/{n}")).is_file());
    // This file system keeps user extended attributes (ext4, tmpfs since Linux 6.6): then the
    // FileHash comes back from the file itself.
    let blob = store.nar(&n).unwrap().unwrap();
    if xattrs_work(&dir) {
        assert_eq!(store.nar_file_hash(&blob), Some(Hash::of(b"x")));
    } else {
        eprintln!("{}: no user extended attributes here; FileHash kept only in the index", dir.display());
    }
    std::fs::write(dir.join("store/nar/5/55/junk"), b"j").unwrap();
    std::fs::write(dir.join("store/narinfo/stray"), b"j").unwrap();
    let strays = store.list_nars("55").unwrap().strays;
    assert_eq!(strays.len(), 1);
    let outside = store.strays_outside_shards().unwrap();
    assert_eq!(outside.len(), 1);
    for s in strays.iter().chain(&outside) {
        store.remove_stray(s).unwrap();
    }
    assert!(store.remove_stray(&Stray("/etc/passwd".into())).is_err(), "never outside the store");
    // Clearing the staging directory removes only our partial files.
    std::mem::forget(staging.temp_file().unwrap());
    std::fs::write(dir.join("tmp/user-file"), b"x").unwrap();
    assert_eq!(staging.clear().unwrap(), 1);
    assert!(dir.join("tmp/user-file").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_symlink_in_the_local_store_is_never_followed_and_lists_as_foreign() {
    let dir = std::env::temp_dir().join(format!("ncps-storage-symlink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = LocalStore::open(&dir).unwrap();
    let (n, h) = (nar_name('7'), hash('7'));
    std::fs::create_dir_all(dir.join("store/nar/7/77")).unwrap();
    std::fs::create_dir_all(dir.join("store/narinfo/7/77")).unwrap();
    let nar = dir.join(format!("store/nar/7/77/{n}"));
    std::os::unix::fs::symlink("/etc/passwd", &nar).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join(format!("store/narinfo/7/77/{h}.narinfo"))).unwrap();
    assert!(store.nar(&n).unwrap().is_none(), "a symlinked NAR is not there");
    assert_eq!(store.nar_len(&n).unwrap(), None);
    assert!(store.narinfo(&h).unwrap().is_none(), "a symlinked narinfo is not there");
    let listed = store.list_nars("77").unwrap();
    assert!(listed.entries.is_empty(), "a symlink is no entry");
    assert_eq!(listed.strays, vec![Stray(nar.clone())], "but something foreign");
    assert_eq!(store.list_narinfos("77").unwrap().strays.len(), 1);
    store.remove_stray(&listed.strays[0]).unwrap();
    assert!(std::fs::symlink_metadata(&nar).is_err(), "the link is removed");
    // A symlinked shard directory is not followed either (where openat2 works).
    let (m, elsewhere) = (nar_name('8'), dir.join("elsewhere/88"));
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join(m.as_str()), b"planted").unwrap();
    std::fs::create_dir_all(dir.join("store/nar/8")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("store/nar/8/88")).unwrap();
    let served = store.nar(&m).unwrap().is_some();
    if local::OPENAT2.load(std::sync::atomic::Ordering::Relaxed) {
        assert!(!served, "a NAR behind a symlinked shard directory was served");
    } else {
        eprintln!("no openat2 here: only the last component is checked for a symlink");
    }
    assert!(store.strays_outside_shards().unwrap().iter().any(|s| s.0.ends_with("8/88")), "and it is foreign");
    assert!(std::path::Path::new("/etc/passwd").exists(), "not what it pointed at");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_store_that_takes_no_new_files_is_told_apart_from_other_failures() {
    let e = |kind: io::ErrorKind| StorageError::io("creating", PathBuf::new(), io::Error::from(kind));
    let os = |n: i32| StorageError::io("creating", PathBuf::new(), io::Error::from_raw_os_error(n));
    for unwritable in [os(libc::ENOSPC), os(libc::EDQUOT), os(libc::EROFS), os(libc::EACCES), os(libc::EPERM)] {
        assert!(unwritable.is_unwritable(), "{unwritable}");
    }
    assert!(os(libc::ENOSPC).is_no_space());
    assert!(!os(libc::EROFS).is_no_space());
    assert!(!os(libc::EIO).is_unwritable(), "a failing disk is an error, not a full one");
    assert!(!e(io::ErrorKind::NotFound).is_unwritable());
}

fn a_zstd_copy_appears_whole_is_never_listed_as_a_nar_and_goes_with_its_nar(store: &dyn BlobStore, staging: &Staging) {
    let n = NarName::parse(&format!("{}.nar", "4".repeat(52))).expect("valid NAR name");
    store.put_nar(&n, staging.temp_with(b"plain bytes").unwrap(), &Hash::of(b"plain bytes")).unwrap();
    assert!(store.nar_zstd(&n).unwrap().is_none());
    store.put_nar_zstd(&n, staging.temp_with(b"zstd").unwrap()).unwrap();
    if let Some(copy) = store.nar_zstd(&n).unwrap() {
        assert_eq!(bytes_of(Some(copy)).as_deref(), Some(&b"zstd"[..]));
        let listed = store.list_nars(&n.as_str()[..2]).unwrap();
        assert_eq!((listed.entries.len(), listed.strays.len()), (1, 0), "the copy is not a NAR of its own");
    }
    store.remove_nars(std::slice::from_ref(&n)).unwrap();
    assert!(store.nar(&n).unwrap().is_none() && store.nar_zstd(&n).unwrap().is_none(), "gone with its NAR");

    // After an unclean stop every copy goes; the NARs stay.
    store.put_nar(&n, staging.temp_with(b"plain bytes").unwrap(), &Hash::of(b"plain bytes")).unwrap();
    store.put_nar_zstd(&n, staging.temp_with(b"zstd").unwrap()).unwrap();
    let kept = store.nar_zstd(&n).unwrap().is_some();
    assert_eq!(store.remove_all_nar_zstd().unwrap(), u64::from(kept));
    assert!(store.nar_zstd(&n).unwrap().is_none() && store.nar(&n).unwrap().is_some());
    store.put_nar_zstd(&n, staging.temp_with(b"zstd").unwrap()).unwrap();
    assert_eq!(store.nar_zstd(&n).unwrap().is_some(), kept, "copies are made again after");
    store.remove_nars(std::slice::from_ref(&n)).unwrap();
}

#[cfg(feature = "s3")]
mod s3 {
    use super::*;
    use crate::storage::s3::test_server::{self, S3sFs};
    use crate::storage::s3::{Retry, S3Store, SINGLE_PUT_MAX};
    use std::time::Duration;

    fn staging(label: &str) -> (std::path::PathBuf, Staging) {
        let dir = std::env::temp_dir().join(format!("ncps-s3-staging-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let staging = Staging::open(&dir).unwrap();
        (dir, staging)
    }

    #[test]
    fn the_s3_store_keeps_the_contract_against_a_real_s3_server() {
        let Some(server) = S3sFs::start("contract") else { return };
        let store = S3Store::open(&server.settings()).unwrap();
        let (dir, staging) = staging("contract");
        every_rule(&store, &staging);
        // The FileHash comes back from the object's metadata.
        let n = nar_name('5');
        store.put_nar(&n, staging.temp_with(b"x").unwrap(), &Hash::of(b"x")).unwrap();
        let blob = store.nar(&n).unwrap().unwrap();
        assert_eq!(store.nar_file_hash(&blob), Some(Hash::of(b"x")));
        // Keys where they belong, strays found and removable, never outside the cache's keys.
        assert!(server.root.join(test_server::BUCKET).join(format!("nar/{n}")).is_file());
        std::fs::write(server.root.join(test_server::BUCKET).join("nar/55junk"), b"j").unwrap();
        std::fs::create_dir_all(server.root.join(test_server::BUCKET).join("narinfo")).unwrap();
        std::fs::write(server.root.join(test_server::BUCKET).join("narinfo/_stray"), b"j").unwrap();
        let strays = store.list_nars("55").unwrap().strays;
        assert_eq!(strays, vec![Stray("nar/55junk".into())]);
        let outside = store.strays_outside_shards().unwrap();
        assert_eq!(outside, vec![Stray("narinfo/_stray".into())]);
        for s in strays.iter().chain(&outside) {
            store.remove_stray(s).unwrap();
        }
        assert!(store.remove_stray(&Stray("elsewhere/x".into())).is_err(), "never a key outside the cache's");
        assert!(store.list_nars("55").unwrap().strays.is_empty());
        // A listing goes on page after page (continuation tokens), each key once.
        let hashes: Vec<StorePathHash> =
            (0..5).map(|i| StorePathHash::parse(&format!("dd{}", i.to_string().repeat(30))).unwrap()).collect();
        for h in &hashes {
            store.put_narinfo(h, b"x", &staging).unwrap();
        }
        assert_eq!(store.keys_paged("narinfo/dd", 2).unwrap().len(), 5);
        assert_eq!(store.list_narinfos("dd").unwrap().entries.len(), 5);
        store.remove_narinfos(&hashes).unwrap();
        assert!(store.list_narinfos("dd").unwrap().entries.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_nar_above_the_single_put_size_goes_up_in_parts_and_comes_back_whole_with_ranges_from_the_store() {
        let Some(server) = S3sFs::start("multipart") else { return };
        let store = S3Store::open(&server.settings()).unwrap();
        let (dir, staging) = staging("multipart");
        let len = SINGLE_PUT_MAX as usize + (3 << 20) + 17;
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let n = nar_name('m');
        let hash = Hash::of(&bytes);
        store.put_nar(&n, staging.temp_with(&bytes).unwrap(), &hash).unwrap();
        assert_eq!(store.nar_len(&n).unwrap(), Some(len as u64));
        let blob = store.nar(&n).unwrap().unwrap();
        assert_eq!((blob.len(), store.nar_file_hash(&blob)), (len as u64, Some(hash)));
        assert!(blob.into_bytes().unwrap() == bytes, "the same bytes back");
        // A range is a ranged GET of the object.
        let Some(Blob::Reader { reader, .. }) = store.nar(&n).unwrap() else { panic!("a stream") };
        let mut rest = Vec::new();
        reader.from_offset(SINGLE_PUT_MAX + 5).unwrap().read_to_end(&mut rest).unwrap();
        assert!(rest == bytes[SINGLE_PUT_MAX as usize + 5..]);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "the staged file is gone once uploaded");
        store.remove_nar(&n).unwrap();
        assert!(store.nar(&n).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn opening_the_s3_store_fails_with_a_wrong_secret_or_bucket_and_the_error_never_shows_the_secret() {
        let Some(server) = S3sFs::start("refused") else { return };
        let mut wrong = server.settings();
        wrong.secret_access_key = "not-the-secret-at-all".into();
        let e = S3Store::open(&wrong).err().expect("a wrong secret is refused").to_string();
        assert!(e.contains("403"), "{e}");
        assert!(!e.contains("not-the-secret-at-all") && !e.contains(test_server::SECRET_KEY), "{e}");
        let mut missing = server.settings();
        missing.bucket = "no-such-bucket".into();
        let e = S3Store::open(&missing).err().expect("a missing bucket is refused").to_string();
        assert!(e.contains("404"), "{e}");
    }

    #[test]
    fn an_unreachable_s3_endpoint_fails_after_a_few_tries_and_a_server_that_comes_up_meanwhile_is_used() {
        let Some(bin) = test_server::binary() else { return };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let root = std::env::temp_dir().join(format!("ncps-s3s-late-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join(test_server::BUCKET)).unwrap();
        let settings = crate::storage::s3::S3Settings {
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: test_server::BUCKET.into(),
            region: "us-east-1".into(),
            access_key_id: test_server::ACCESS_KEY.into(),
            secret_access_key: test_server::SECRET_KEY.into(),
            force_path_style: true,
            redirect: false,
            retry: Retry { attempts: 2, first_pause: Duration::from_millis(10) },
        };
        let started = std::time::Instant::now();
        let e = S3Store::open(&settings).err().expect("nothing listens").to_string();
        assert!(started.elapsed() < Duration::from_secs(5), "bounded: {:?}", started.elapsed());
        assert!(e.contains(&format!("127.0.0.1:{port}")), "names the store: {e}");
        // The server comes up while the tries go on: the open succeeds.
        let patient = crate::storage::s3::S3Settings { retry: Retry { attempts: 6, first_pause: Duration::from_millis(200) }, ..settings };
        let opening = std::thread::spawn(move || S3Store::open(&patient).map(|_| ()).map_err(|e| e.to_string()));
        std::thread::sleep(Duration::from_millis(300));
        let mut child = test_server::spawn(&bin, &root, port);
        let opened = opening.join().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&root);
        opened.expect("retried until the server answered");
    }
}
