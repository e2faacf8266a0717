//! End-to-end specification of the cache's lifecycle: the size limit and
//! least-recently-used eviction, uploads (`nix copy --to`), DELETE, and
//! `ncps fsck`. Driven by the real Nix client against a local upstream that
//! serves a fixture built by tests/fixtures/mkfixture-lifecycle.sh (a 64 MiB
//! path, 30 paths of 1 MiB, two paths sharing one NAR, and two paths that no
//! upstream has, for uploads).
//!
//! Tests that need Nix skip (with a message) only when `nix` is not installed
//! and `CI` is unset; under CI a missing `nix` fails them.
//!
//! Run: `cargo test --test e2e lifecycle::` (add `-- --nocapture` for timings).

use crate::support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

/// Uploads allowed, with the suite's write token.
const PUT: &[&str] = &["--cache-allow-put-verb", "--cache-write-token", WRITE_TOKEN];
/// DELETE allowed, with the suite's write token.
const DELETE: &[&str] = &["--cache-allow-delete-verb", "--cache-write-token", WRITE_TOKEN];

// ---------------------------------------------------------------------------
// The lifecycle fixture
// ---------------------------------------------------------------------------

/// The fixture of mkfixture-lifecycle.sh. `fx.big` is 64 MiB, `fx.many` are 30
/// paths of 1 MiB (random bytes), all published uncompressed.
struct Lifecycle {
    fx: Fixture,
    /// Two paths with identical contents: their narinfos point at one NAR.
    twins: Vec<String>,
    /// Built locally, published nowhere: a dependency, then a path referencing it.
    uploads: Vec<String>,
}

fn lifecycle_or_skip() -> Option<&'static Lifecycle> {
    if must_skip_without_nix() {
        return None;
    }
    static LC: OnceLock<Result<Lifecycle, String>> = OnceLock::new();
    match LC.get_or_init(build_lifecycle_fixture) {
        Ok(l) => Some(l),
        Err(e) => panic!("building the lifecycle fixture failed:\n{e}"),
    }
}

fn build_lifecycle_fixture() -> Result<Lifecycle, String> {
    let fx = build_fixture_with("mkfixture-lifecycle.sh")?;
    Ok(Lifecycle {
        twins: fixture_lines(&fx.dir, "paths/twins.txt")?,
        uploads: fixture_lines(&fx.dir, "paths/uploads.txt")?,
        fx,
    })
}

/// The fixture's upstream and an ncps in front of it trusting up1, with `extra` flags.
fn proxy(lc: &Lifecycle, extra: &[&str]) -> (Upstream, Ncps) {
    let up = Upstream::for_cache(&lc.fx, Compression::None);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&lc.fx.up1_public_key], extra);
    (up, ncps)
}

// ---------------------------------------------------------------------------
// Looking at ncps from outside: HTTP and the data directory
// ---------------------------------------------------------------------------

/// GETs the narinfo of `store_path` and then its NAR, as a client would, and
/// checks the NAR against the narinfo's FileSize and FileHash. Returns the NAR
/// URL path (`/nar/...`).
fn fetch(ncps: &Ncps, store_path: &str) -> String {
    let r = ncps.get(&format!("/{}.narinfo", store_hash(store_path)));
    assert_eq!(r.status, 200, "GET narinfo of {store_path}");
    let ni = NarInfo::parse(&r.text());
    let url = format!("/{}", ni.get("URL").expect("URL in served narinfo"));
    let size: u64 = ni.get("FileSize").expect("FileSize").parse().unwrap();
    let want = ni.get("FileHash").expect("FileHash").to_string();
    let got = raw_get_hashed(ncps.addr, &url, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!(got.status, 200, "GET {url} ({store_path})");
    assert_eq!(got.len, size, "bytes of {url} ({store_path})");
    assert_eq!(
        format!("sha256:{}", nix32(&got.sha256)),
        want,
        "FileHash of {url} ({store_path})"
    );
    url
}

/// The file name of a `/nar/<name>` URL path.
fn nar_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

/// The stored narinfo file of `store_path`, if any (found by name, at any depth).
fn narinfo_file(ncps: &Ncps, store_path: &str) -> Option<PathBuf> {
    let want = format!("{}.narinfo", store_hash(store_path));
    ncps.stored_narinfo_files()
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == want))
}

/// The stored NAR file called `name`, if any.
fn nar_file(ncps: &Ncps, name: &str) -> Option<PathBuf> {
    ncps.stored_nar_files()
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == name))
}

/// Sum of the sizes of every file under DATA/store.
fn store_bytes(ncps: &Ncps) -> u64 {
    files_under(&ncps.data_dir().join("store"))
        .iter()
        .map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn largest_file_under(dir: &Path) -> Option<(PathBuf, u64)> {
    files_under(dir)
        .into_iter()
        .filter_map(|p| fs::metadata(&p).ok().map(|m| (p, m.len())))
        .max_by_key(|(_, n)| *n)
}

fn open_db(ncps: &Ncps) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        ncps.data_dir().join("db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open DATA/db.sqlite read-only")
}

fn db_strings(ncps: &Ncps, sql: &str) -> BTreeSet<String> {
    let db = open_db(ncps);
    let mut st = db.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let rows = st
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.map(|r| r.unwrap()).collect()
}

/// Whether the store is whole: every narinfo file points at a NAR file that
/// is there and holds the bytes its name promises, every NAR file is pointed
/// at by a narinfo, the index lists exactly these files, and the store is
/// within `limit`.
fn store_consistency(ncps: &Ncps, limit: u64) -> Result<(), String> {
    let nars: BTreeMap<String, PathBuf> = ncps
        .stored_nar_files()
        .into_iter()
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    let mut pointed_at = BTreeSet::new();
    let mut narinfo_hashes = BTreeSet::new();
    for f in ncps.stored_narinfo_files() {
        let Ok(text) = fs::read_to_string(&f) else {
            continue; // removed meanwhile
        };
        let ni = NarInfo::parse(&text);
        let url = ni
            .get("URL")
            .ok_or_else(|| format!("{} has no URL", f.display()))?;
        let name = nar_name(url).to_string();
        if !nars.contains_key(&name) {
            return Err(format!(
                "{} points at {url}, which is not on disk",
                f.display()
            ));
        }
        pointed_at.insert(name);
        let file_name = f.file_name().unwrap().to_string_lossy().into_owned();
        narinfo_hashes.insert(file_name.trim_end_matches(".narinfo").to_string());
    }
    for (name, path) in &nars {
        if !pointed_at.contains(name) {
            return Err(format!(
                "NAR {} is on disk but no narinfo points at it",
                path.display()
            ));
        }
        nar_file_matches_its_name(path)?;
    }
    let indexed = db_strings(ncps, "SELECT hash FROM narinfos");
    if indexed != narinfo_hashes {
        return Err(format!(
            "the narinfos table lists {indexed:?}, the narinfo files are {narinfo_hashes:?}"
        ));
    }
    let stored = db_strings(ncps, "SELECT name FROM nars WHERE stored = 1");
    let on_disk: BTreeSet<String> = nars.keys().cloned().collect();
    if stored != on_disk {
        return Err(format!(
            "the nars marked stored are {stored:?}, the NAR files are {on_disk:?}"
        ));
    }
    let bytes = store_bytes(ncps);
    if bytes > limit {
        return Err(format!(
            "DATA/store holds {bytes} bytes, over the {limit}-byte limit"
        ));
    }
    Ok(())
}

/// The store becomes consistent (see `store_consistency`) within 10 s: a
/// NAR is moved into the store, and the limit enforced, just after its last
/// byte went to the client.
fn assert_store_consistent(ncps: &Ncps, limit: u64, when: &str) {
    let mut last = Ok(());
    let ok = wait_until(Duration::from_secs(10), || {
        last = store_consistency(ncps, limit);
        last.is_ok()
    });
    if !ok {
        panic!("{when}: the store is not consistent: {}", last.unwrap_err());
    }
}

/// `fetch`, then waits (10 s at most) until the NAR is in the store and the
/// store is within `limit` again (evictions done).
fn fetch_kept(ncps: &Ncps, store_path: &str, limit: u64) -> String {
    let url = fetch(ncps, store_path);
    let ok = wait_until(Duration::from_secs(10), || {
        nar_file(ncps, nar_name(&url)).is_some() && store_bytes(ncps) <= limit
    });
    assert!(
        ok,
        "{store_path}: {url} not in the store, or the store ({} bytes) over {limit} bytes, 10 s after it was served",
        store_bytes(ncps)
    );
    url
}

// ---------------------------------------------------------------------------
// The size limit
// ---------------------------------------------------------------------------

#[test]
fn a_nar_larger_than_the_whole_limit_is_served_verified_but_not_kept() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    let (up, ncps) = proxy(lc, &["--cache-max-size", "20M"]);
    let key = ncps.pubkey();
    let limit = 20 * MIB;

    nix_copy_from(&ncps.url(), &[&fx.top], &key)
        .expect("nix copy of a closure holding a 64 MiB path through a 20 MiB cache");

    // Right after the copy, not after some later clean-up.
    let bytes = store_bytes(&ncps);
    assert!(
        bytes <= limit,
        "DATA/store holds {bytes} bytes right after the copy, over the 20 MiB limit"
    );
    if let Some((p, n)) = largest_file_under(&ncps.data_dir().join("store")) {
        assert!(n <= limit, "{} ({n} bytes) was kept", p.display());
    }
    // The download's temp file goes too (readers had their own handle).
    let ok = wait_until(Duration::from_secs(5), || {
        largest_file_under(ncps.data_dir()).is_none_or(|(_, n)| n <= limit)
    });
    assert!(
        ok,
        "a file over the limit is still in the data dir: {:?}",
        largest_file_under(ncps.data_dir())
    );
    // The small paths of the closure were kept, with their NARs.
    for p in [&fx.top, &fx.lib] {
        let url = upstream_nar_path(fx, Compression::None, p);
        assert!(narinfo_file(&ncps, p).is_some(), "narinfo of {p} kept");
        assert!(nar_file(&ncps, nar_name(&url)).is_some(), "NAR of {p} kept");
    }

    // Not kept means: the next client is served from upstream again, verified.
    let big_nar = upstream_nar_path(fx, Compression::None, &fx.big);
    assert_eq!(
        up.hits(&big_nar),
        1,
        "one upstream download of the big NAR so far"
    );
    nix_copy_from(&ncps.url(), &[&fx.big], &key).expect("second copy of the 64 MiB path");
    assert_eq!(
        up.hits(&big_nar),
        2,
        "the big NAR was not kept, so it is fetched from upstream again"
    );
    assert!(store_bytes(&ncps) <= limit);
}

#[test]
fn the_scheduled_eviction_pass_runs_on_its_schedule_and_leaves_a_store_within_its_limit_alone() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    let (_up, ncps) = proxy(lc, &["--cache-max-size", TEN_PATHS, "--cache-lru-schedule", "@every 1s"]);
    let paths = &fx.many[..3];
    for p in paths {
        fetch_kept(&ncps, p, TEN_PATHS_BYTES);
    }
    let offset = ncps.log_len();
    let runs = |log: &str| log.lines().filter(|l| l.contains("scheduled eviction:")).count();
    assert!(
        wait_until(Duration::from_secs(6), || runs(&ncps.log_since(offset)) >= 2),
        "two runs of an `@every 1s` schedule within 6 s; the log since:\n{}",
        ncps.log_since(offset)
    );
    let log = ncps.log_since(offset);
    assert!(
        log.lines().filter(|l| l.contains("scheduled eviction:")).all(|l| l.contains(": 0 narinfo(s), 0 NAR(s), 0 bytes")),
        "a store within its limit must lose nothing:\n{log}"
    );
    for p in paths {
        assert!(narinfo_file(&ncps, p).is_some(), "{p} kept");
    }
    assert_store_consistent(&ncps, TEN_PATHS_BYTES, "after scheduled passes");
}

/// About 10 of the 1 MiB paths (1 MiB + 112 bytes of NAR and ~600 bytes of
/// narinfo each) fit in 10.5 MiB; 11 do not.
const TEN_PATHS: &str = "10752K";
const TEN_PATHS_BYTES: u64 = 10752 * 1024;

#[test]
fn least_recently_used_paths_are_evicted_first() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    let (up, ncps) = proxy(lc, &["--cache-max-size", TEN_PATHS]);
    let a = &fx.many[..10];
    let b = &fx.many[10..15];

    // Access times have a resolution of one second: A1..A6, then (strictly
    // later) A7..A10, then (later still) A1 again.
    for p in &a[..6] {
        fetch_kept(&ncps, p, TEN_PATHS_BYTES);
    }
    thread::sleep(Duration::from_millis(1100));
    for p in &a[6..] {
        fetch_kept(&ncps, p, TEN_PATHS_BYTES);
    }
    assert_eq!(
        ncps.stored_narinfo_files().len(),
        10,
        "ten paths fit in the limit: nothing evicted yet"
    );
    thread::sleep(Duration::from_millis(1100));
    let a1_nar = fetch(&ncps, &a[0]);
    assert_eq!(
        up.hits(&format!("/{}.narinfo", store_hash(&a[0]))),
        1,
        "A1 again is a hit"
    );
    assert_eq!(up.hits(&a1_nar), 1, "A1's NAR again is a hit");

    // Five more paths push out five: the least recently used, A2..A6.
    for p in b {
        fetch_kept(&ncps, p, TEN_PATHS_BYTES);
    }
    let kept = |p: &String| narinfo_file(&ncps, p).is_some();
    let evicted: Vec<&String> = a.iter().chain(b).filter(|p| !kept(p)).collect();
    let want: Vec<&String> = a[1..6].iter().collect();
    assert_eq!(
        evicted, want,
        "exactly A2..A6 (the least recently used) must be evicted; A1 was used again"
    );
    for p in &a[1..6] {
        let url = upstream_nar_path(fx, Compression::None, p);
        assert!(
            nar_file(&ncps, nar_name(&url)).is_none(),
            "the NAR of evicted {p} must be gone too"
        );
    }
    assert_store_consistent(&ncps, TEN_PATHS_BYTES, "after evicting A2..A6");
}

#[test]
fn after_evictions_the_store_is_consistent_and_evicted_paths_are_fetched_again() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    let (up, ncps) = proxy(lc, &["--cache-max-size", TEN_PATHS]);
    let paths = &fx.many[..20];
    let mut evictions_seen = false;
    for (i, p) in paths.iter().enumerate() {
        fetch_kept(&ncps, p, TEN_PATHS_BYTES);
        assert_store_consistent(&ncps, TEN_PATHS_BYTES, &format!("after fetching path {i}"));
        evictions_seen |= narinfo_file(&ncps, &paths[0]).is_none();
    }
    assert!(
        evictions_seen,
        "20 paths in a 10-path cache must evict some"
    );
    let evicted: Vec<&String> = paths
        .iter()
        .filter(|p| narinfo_file(&ncps, p).is_none())
        .collect();
    assert!(
        evicted.len() >= 9,
        "about ten of the twenty paths must have been evicted, got {}",
        evicted.len()
    );

    // A client asking for evicted paths gets them, fetched again and verified.
    let again: Vec<&String> = evicted.iter().take(3).copied().collect();
    nix_copy_from(&ncps.url(), &again, &ncps.pubkey())
        .expect("nix copy of paths whose entries were evicted");
    for p in &again {
        let url = upstream_nar_path(fx, Compression::None, p);
        assert_eq!(
            up.hits(&url),
            2,
            "{p}: NAR fetched from upstream a second time"
        );
    }
    assert_store_consistent(&ncps, TEN_PATHS_BYTES, "after fetching evicted paths again");
}

#[test]
fn nix_copy_of_more_paths_than_the_limit_holds_succeeds_in_one_go() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    let (_up, ncps) = proxy(lc, &["--cache-max-size", TEN_PATHS]);
    // 30 MiB through a 10.5 MiB cache, by one client with parallel downloads:
    // entries are evicted while the client still needs NARs it was promised.
    nix_copy_from(&ncps.url(), &fx.many, &ncps.pubkey())
        .expect("nix copy of 30 paths of 1 MiB through a 10.5 MiB cache");
    assert_store_consistent(&ncps, TEN_PATHS_BYTES, "after the copy");
}

#[test]
fn a_lowered_limit_is_applied_at_start_up() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    let (up, mut first) = proxy(lc, &[]);
    for p in &fx.many[..8] {
        fetch_kept(&first, p, u64::MAX);
    }
    thread::sleep(Duration::from_millis(1100));
    // The last four are the most recently used; about three fit in 4 MiB.
    for p in &fx.many[8..12] {
        fetch_kept(&first, p, u64::MAX);
    }
    assert!(store_bytes(&first) > 12 * MIB);
    first.stop();

    let data = first.data_dir().to_string_lossy().into_owned();
    let up_url = up.url();
    let second = Ncps::start_raw(
        [
            "serve",
            "--cache-hostname",
            HOSTNAME,
            "--cache-data-path",
            data.as_str(),
            "--server-addr",
            "{addr}",
            "--log-level",
            "debug",
            "--upstream-cache",
            up_url.as_str(),
            "--upstream-public-key",
            fx.up1_public_key.as_str(),
            "--cache-max-size",
            "4M",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        Vec::new(),
    );
    // The evictor runs beside the server, so the port answers before the
    // pass is over: wait for its report, then look at the disk.
    second.wait_for_log(0, "evicted ", Duration::from_secs(20));
    let bytes = store_bytes(&first);
    assert!(
        bytes <= 4 * MIB,
        "restarted with --cache-max-size 4M, the store still holds {bytes} bytes"
    );
    let kept: Vec<&String> = fx.many[..12]
        .iter()
        .filter(|p| narinfo_file(&first, p).is_some())
        .collect();
    assert!(
        !kept.is_empty(),
        "a 4 MiB store holds some of the 1 MiB paths"
    );
    for p in &kept {
        assert!(
            fx.many[8..12].contains(*p),
            "{p} was kept although it was used before the others"
        );
    }
    assert_store_consistent(&first, 4 * MIB, "after start-up with a lower limit");
    drop(second);
}

// ---------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------

/// `client` uploads two paths (`nix copy --to` ncps's root URL or /upload, with the write token
/// from a netrc file, signing them with a trusted upload key), and then fetches them back,
/// trusting only ncps's key: ncps re-signed what the trusted key signed.
fn uploads_are_signed_by_ncps_and_served_back(client: NixClient, suffix: &str) {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    if client.must_skip() {
        return;
    }
    let (_keys, upload_key, upload_secret) = new_key_pair("uploader.example.org-1");
    let (up, ncps) = proxy(lc, &[PUT, &["--cache-trusted-upload-key", &upload_key]].concat());
    let key = ncps.pubkey();
    let to = format!("{}{suffix}", ncps.url());
    let auth = ClientAuth { netrc: Some(netrc_for(WRITE_TOKEN)), secret_key_file: Some(upload_secret) };
    client
        .copy_to_with(&to, &lc.uploads, &auth)
        .unwrap_or_else(|e| panic!("{}: upload to {to}: {e}", client.label()));
    let probed = up.hits_where(|p| p.ends_with(".narinfo"));
    if suffix == "/upload" {
        // ncps issue 907: Nix asks whether each path is there before uploading it; under
        // /upload that is answered locally, never by an upstream that cannot have it. Only
        // the check that an upload does not shadow an upstream's path asks, once a path.
        assert!(probed <= lc.uploads.len() as u64, "narinfo probes under /upload reached the upstream: {:?}", up.requests());
    } else {
        // At the root the probes were real lookups, remembered as misses: the upload must
        // clear those, or the GETs below would be 404 for a minute.
        assert!(probed > 0, "Nix probed the root URL before uploading");
    }

    for p in &lc.uploads {
        assert!(
            narinfo_file(&ncps, p).is_some(),
            "narinfo of uploaded {p} stored"
        );
        let r = ncps.get(&format!("/{}.narinfo", store_hash(p)));
        assert_eq!(r.status, 200, "GET narinfo of uploaded {p}");
        let ni = NarInfo::parse(&r.text());
        let ours: Vec<String> = ni
            .sigs()
            .into_iter()
            .filter(|s| s.starts_with(&format!("{HOSTNAME}:")))
            .collect();
        assert_eq!(
            ours.len(),
            1,
            "one Sig by ncps on uploaded {p}: {:?}",
            ni.sigs()
        );
        assert!(
            signature_verifies(&key, &ni.fingerprint(), &ours[0]),
            "ncps's Sig on uploaded {p} verifies against /pubkey"
        );
    }
    // Another machine, trusting ncps's key only, gets them (closure included).
    client
        .copy_from(&ncps.url(), &lc.uploads[1..], &key)
        .expect("nix copy --from ncps of uploaded paths, trusting only ncps's key");
    assert_eq!(
        up.hits_where(|p| p.starts_with("/nar/")),
        0,
        "uploaded paths are served from the cache, never fetched from upstream"
    );
    assert_store_consistent(&ncps, u64::MAX, "after uploads");
}

#[test]
fn nix_copy_to_the_root_url_uploads_when_put_is_allowed() {
    uploads_are_signed_by_ncps_and_served_back(NixClient::Nix2_8, "");
}

#[test]
fn nix_copy_to_the_upload_url_uploads_when_put_is_allowed() {
    uploads_are_signed_by_ncps_and_served_back(NixClient::Nix2_8, "/upload");
}

#[test]
fn nix_2_26_copy_to_the_root_url_uploads_when_put_is_allowed() {
    uploads_are_signed_by_ncps_and_served_back(NixClient::Nix2_26, "");
}

#[test]
fn nix_2_26_copy_to_the_upload_url_uploads_when_put_is_allowed() {
    uploads_are_signed_by_ncps_and_served_back(NixClient::Nix2_26, "/upload");
}

/// PUT with the suite's write token.
fn put(ncps: &Ncps, path: &str, body: &[u8]) -> RawResponse {
    let mut req = format!(
        "PUT {path} HTTP/1.1\r\nHost: ncps-e2e\r\nContent-Type: application/octet-stream\r\n\
         Authorization: Bearer {WRITE_TOKEN}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    raw_request(ncps.addr, &req, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("PUT {path}: {e}"))
}

#[test]
fn without_put_allowed_nix_2_26_uploads_fail_saying_405_and_nothing_is_stored() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    if NixClient::Nix2_26.must_skip() {
        return;
    }
    let (_up, ncps) = proxy(lc, &[]);
    for to in [ncps.url(), format!("{}/upload", ncps.url())] {
        let e = NixClient::Nix2_26
            .copy_to(&to, &lc.uploads)
            .expect_err("nix copy --to must fail when PUT is not allowed");
        eprintln!("Nix 2.26, nix copy --to {to} without PUT allowed:\n{e}");
        assert!(
            e.contains("405") || e.contains("Method Not Allowed"),
            "nix copy --to {to} must fail because PUT is refused (405), got: {e}"
        );
    }
    assert!(ncps.stored_narinfo_files().is_empty(), "{:?}", ncps.stored_narinfo_files());
    assert!(ncps.stored_nar_files().is_empty(), "{:?}", ncps.stored_nar_files());
}

#[test]
fn without_put_allowed_uploads_fail_with_405_and_nothing_is_stored() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let (_up, ncps) = proxy(lc, &[]);
    for to in [ncps.url(), format!("{}/upload", ncps.url())] {
        let e = nix_copy_to(&to, &lc.uploads)
            .expect_err("nix copy --to must fail when PUT is not allowed");
        assert!(
            e.contains("405") || e.contains("Method Not Allowed"),
            "nix copy --to {to} must fail because PUT is refused (405), got: {e}"
        );
    }
    // A correct upload, by hand: the NAR and narinfo of a published path.
    let fx = &lc.fx;
    let nar_url = upstream_nar_path(fx, Compression::None, &fx.lib);
    let nar = fs::read(fx.cache_dir(Compression::None).join(&nar_url[1..])).unwrap();
    let narinfo = fx.upstream_narinfo(Compression::None, &fx.lib);
    let narinfo_url = format!("/{}.narinfo", store_hash(&fx.lib));
    for (path, body) in [
        (nar_url.clone(), nar.as_slice()),
        (narinfo_url.clone(), narinfo.as_bytes()),
        (format!("/upload{nar_url}"), nar.as_slice()),
        (format!("/upload{narinfo_url}"), narinfo.as_bytes()),
    ] {
        assert_eq!(
            put(&ncps, &path, body).status,
            405,
            "PUT {path} without --cache-allow-put-verb"
        );
    }
    let files = files_under(&ncps.data_dir().join("store"));
    assert!(files.is_empty(), "nothing may be stored: {files:?}");
}

#[test]
fn bad_uploads_are_refused_with_400_and_not_kept() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    // An upstream that has nothing: whatever ncps holds came from the uploads.
    let empty = TempDir::new("empty-upstream");
    fs::write(empty.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let up = Upstream::serve_dir(empty.path());
    // The fixture's narinfos are signed by up1: trusted for uploads, so ncps re-signs them.
    let ncps = Ncps::for_upstreams_with(
        &[up.url()],
        &[&fx.up1_public_key],
        &[PUT, &["--cache-trusted-upload-key", &fx.up1_public_key]].concat(),
    );

    let nar_url = upstream_nar_path(fx, Compression::None, &fx.lib);
    let nar = fs::read(fx.cache_dir(Compression::None).join(&nar_url[1..])).unwrap();
    let narinfo = fx.upstream_narinfo(Compression::None, &fx.lib);
    let narinfo_url = format!("/{}.narinfo", store_hash(&fx.lib));

    // A NAR whose bytes do not hash to its name.
    let mut bad = nar.clone();
    let i = bad.len() / 2;
    bad[i] ^= 0x5a;
    let r = put(&ncps, &nar_url, &bad);
    assert_eq!(
        r.status,
        400,
        "PUT of a NAR not matching its name: {}",
        r.text()
    );
    assert!(
        ncps.stored_nar_files().is_empty(),
        "the bad NAR must not be kept"
    );
    assert_eq!(ncps.get(&nar_url).status, 404, "the bad NAR is not served");

    // A narinfo whose NAR was not uploaded.
    let r = put(&ncps, &narinfo_url, narinfo.as_bytes());
    assert_eq!(
        r.status,
        400,
        "PUT of a narinfo before its NAR: {}",
        r.text()
    );
    // Garbage, and a narinfo for another path than the URL says.
    let r = put(&ncps, &narinfo_url, b"this is not a narinfo\n\x00\xff");
    assert_eq!(r.status, 400, "PUT of a malformed narinfo: {}", r.text());
    let other = format!("/{}.narinfo", store_hash(&fx.top));
    let r = put(&ncps, &other, narinfo.as_bytes());
    assert_eq!(
        r.status,
        400,
        "PUT of a narinfo under another path's hash: {}",
        r.text()
    );
    assert!(
        ncps.stored_narinfo_files().is_empty(),
        "no refused narinfo may be kept"
    );
    assert_eq!(ncps.get(&narinfo_url).status, 404);

    // The same upload done right is accepted (so the 400s above were about the content).
    assert_eq!(
        put(&ncps, &nar_url, &nar).status,
        204,
        "PUT of the right NAR"
    );
    assert_eq!(
        put(&ncps, &narinfo_url, narinfo.as_bytes()).status,
        204,
        "PUT of its narinfo"
    );
    assert_eq!(ncps.get(&narinfo_url).status, 200);
    // (The GET of the refused NAR above asked the upstream for it by name; it said 404.)
    up.reset_hits();
    nix_copy_from(&ncps.url(), &[&fx.lib], &ncps.pubkey()).expect("the uploaded path is served");
    assert_eq!(up.hits_where(|p| p.starts_with("/nar/")), 0, "the upload is served, not the upstream asked");
    assert_store_consistent(&ncps, u64::MAX, "after the good upload");
}

// ---------------------------------------------------------------------------
// DELETE
// ---------------------------------------------------------------------------

/// DELETE with the suite's write token.
fn delete(ncps: &Ncps, path: &str) -> u16 {
    http_request_with("DELETE", &format!("{}{path}", ncps.url()), &[("Authorization", &format!("Bearer {WRITE_TOKEN}"))])
        .unwrap_or_else(|e| panic!("DELETE {path}: {e}"))
        .status
}

#[test]
fn delete_removes_a_narinfo_its_unshared_nar_and_a_nar_with_every_narinfo_using_it() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    let (mut up, ncps) = proxy(lc, DELETE);
    let lib_nar = fetch_kept(&ncps, &fx.lib, u64::MAX);
    let twin_nar = fetch_kept(&ncps, &lc.twins[0], u64::MAX);
    assert_eq!(
        fetch(&ncps, &lc.twins[1]),
        twin_nar,
        "the twins share one NAR"
    );
    assert_eq!(ncps.wait_for_stored_nars(2).len(), 2);
    // Without an upstream, a GET of a deleted narinfo cannot be refilled: ncps answers 502
    // (it cannot know whether the path exists), not 404.
    up.stop();

    let lib_ni = format!("/{}.narinfo", store_hash(&fx.lib));
    assert_eq!(delete(&ncps, &lib_ni), 204, "DELETE {lib_ni}");
    assert_eq!(ncps.get(&lib_ni).status, 502, "GET {lib_ni} after DELETE, the upstream stopped");
    assert!(
        narinfo_file(&ncps, &fx.lib).is_none(),
        "narinfo file removed"
    );
    assert!(
        nar_file(&ncps, nar_name(&lib_nar)).is_none(),
        "its NAR (used by nothing else) removed"
    );
    assert_eq!(
        ncps.get(&lib_nar).status,
        502,
        "GET {lib_nar} after its narinfo was deleted: fetched by name, but the upstream is stopped"
    );
    assert_eq!(delete(&ncps, &lib_ni), 404, "DELETE of what is not there");

    // One of two narinfos sharing a NAR: the NAR stays for the other.
    let a_ni = format!("/{}.narinfo", store_hash(&lc.twins[0]));
    let b_ni = format!("/{}.narinfo", store_hash(&lc.twins[1]));
    assert_eq!(delete(&ncps, &a_ni), 204, "DELETE {a_ni}");
    assert_eq!(ncps.get(&a_ni).status, 502);
    assert_eq!(ncps.get(&b_ni).status, 200, "the other twin is untouched");
    assert_eq!(ncps.get(&twin_nar).status, 200, "the shared NAR stays");
    assert!(nar_file(&ncps, nar_name(&twin_nar)).is_some());

    // Re-add twin A (upstream back for a moment), then DELETE the NAR itself.
    up.restart();
    ncps.wait_for_upstreams_up(Duration::from_secs(30));
    fetch(&ncps, &lc.twins[0]);
    up.stop();
    assert_eq!(ncps.stored_narinfo_files().len(), 2);
    assert_eq!(delete(&ncps, &twin_nar), 204, "DELETE {twin_nar}");
    assert_eq!(ncps.get(&twin_nar).status, 502, "not here, and the upstream stopped");
    assert_eq!(
        ncps.get(&a_ni).status,
        502,
        "every narinfo using the NAR is gone"
    );
    assert_eq!(
        ncps.get(&b_ni).status,
        502,
        "every narinfo using the NAR is gone"
    );
    let left = files_under(&ncps.data_dir().join("store"));
    assert!(
        left.is_empty(),
        "everything was deleted, yet the store holds {left:?}"
    );
    assert_store_consistent(&ncps, 0, "after deleting everything");
}

#[test]
fn without_delete_allowed_delete_is_405_and_changes_nothing() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    let (mut up, ncps) = proxy(lc, PUT);
    let nar = fetch_kept(&ncps, &fx.lib, u64::MAX);
    up.stop();
    let ni = format!("/{}.narinfo", store_hash(&fx.lib));
    let before_ni = ncps.get(&ni).body;
    let before_files = files_under(&ncps.data_dir().join("store"));
    for path in [&ni, &nar] {
        assert_eq!(
            delete(&ncps, path),
            405,
            "DELETE {path} without --cache-allow-delete-verb"
        );
        assert_eq!(
            delete(&ncps, &format!("/upload{path}")),
            405,
            "DELETE /upload{path}"
        );
    }
    assert_eq!(ncps.get(&ni).body, before_ni, "narinfo unchanged");
    assert_eq!(fetch(&ncps, &fx.lib), nar, "NAR still served");
    assert_eq!(files_under(&ncps.data_dir().join("store")), before_files);
}

// ---------------------------------------------------------------------------
// NARs by name: a NAR URL ncps handed out keeps working after its entry went
// ---------------------------------------------------------------------------

/// `(stored, upstream_url)` of the index's row for NAR `name`, if any.
fn nar_row(ncps: &Ncps, name: &str) -> Option<(bool, String)> {
    let db = open_db(ncps);
    db.query_row("SELECT stored, upstream_url FROM nars WHERE name = ?1", [name], |r| Ok((r.get(0)?, r.get(1)?))).ok()
}

/// GETs `url` (a `/nar/...` path, the upstream's name too) and checks it gets every byte of
/// the upstream's file, hashing to its name.
fn get_nar_by_name(ncps: &Ncps, fx: &Fixture, url: &str, what: &str) {
    let size = fs::metadata(fx.cache_dir(Compression::None).join(&url[1..])).unwrap().len();
    let got = raw_get_hashed(ncps.addr, url, Duration::from_secs(30)).unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert_eq!((got.status, got.len, got.end.clone()), (200, size, BodyEnd::Eof), "{what}: GET {url}");
    assert_eq!(nix32(&got.sha256), nar_name(url).split('.').next().unwrap(), "{what}: the bytes hash to the name");
}

#[test]
fn a_deleted_or_evicted_entry_s_nar_url_still_works_fetched_by_name_and_verified() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    let (up, ncps) = proxy(lc, &[DELETE, &["--cache-max-size", TEN_PATHS]].concat());
    // A 1 MiB NAR whose entry is deleted.
    let small = fetch_kept(&ncps, &fx.many[0], TEN_PATHS_BYTES);
    let ni = format!("/{}.narinfo", store_hash(&fx.many[0]));
    assert_eq!(delete(&ncps, &ni), 204);
    assert!(nar_file(&ncps, nar_name(&small)).is_none(), "the NAR went with its narinfo");
    get_nar_by_name(&ncps, fx, &small, "after DELETE");
    assert_eq!(up.hits(&small), 2, "fetched again, by the same name");
    let stored = ncps.wait_for_stored_nars(1);
    assert_eq!(stored.len(), 1, "kept again: {stored:?}");
    nar_file_matches_its_name(&stored[0]).unwrap();
    assert_eq!(nar_row(&ncps, nar_name(&small)), Some((true, String::new())), "indexed on its own, as stored");
    ncps.wait_for_log(0, "fetching it by name", Duration::from_secs(5));
    // And a hit from then on.
    get_nar_by_name(&ncps, fx, &small, "again");
    assert_eq!(up.hits(&small), 2);

    // Evicted: eleven more paths push the first ones out (NARs no narinfo points at first).
    let first = fetch_kept(&ncps, &fx.many[1], TEN_PATHS_BYTES);
    for p in &fx.many[2..13] {
        fetch_kept(&ncps, p, TEN_PATHS_BYTES);
    }
    assert!(narinfo_file(&ncps, &fx.many[1]).is_none(), "{} evicted", fx.many[1]);
    assert!(nar_file(&ncps, nar_name(&first)).is_none());
    // A client that kept the narinfo (Nix does, for 30 days) asks for the NAR URL directly.
    get_nar_by_name(&ncps, fx, &first, "after eviction");
    assert_eq!(up.hits(&first), 2);
    assert!(wait_until(Duration::from_secs(10), || nar_file(&ncps, nar_name(&first)).is_some()));
    assert!(wait_until(Duration::from_secs(10), || store_bytes(&ncps) <= TEN_PATHS_BYTES), "still within the limit");
}

#[test]
fn a_big_nar_fetched_by_name_streams_and_a_zstd_encoded_one_is_checked_whole() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    let (up, ncps) = proxy(lc, DELETE);
    let big = fetch_kept(&ncps, &fx.big, u64::MAX);
    assert_eq!(delete(&ncps, &format!("/{}.narinfo", store_hash(&fx.big))), 204);
    get_nar_by_name(&ncps, fx, &big, "64 MiB by name");
    assert_eq!(ncps.wait_for_stored_nars(1).len(), 1);

    // An upstream that compresses its answers (harmonia does) announces no usable length:
    // the NAR is fetched whole and checked before the client gets a byte.
    let small = fetch_kept(&ncps, &fx.many[0], u64::MAX);
    assert_eq!(delete(&ncps, &format!("/{}.narinfo", store_hash(&fx.many[0]))), 204);
    up.set_mode_for(Mode::ZstdEncoded, Target::Nar);
    get_nar_by_name(&ncps, fx, &small, "zstd-encoded by name");
    ncps.wait_for_log(0, "fetched by name, verified and stored", Duration::from_secs(5));
    assert_eq!(ncps.wait_for_stored_nars(2).len(), 2);
    for f in ncps.stored_nar_files() {
        nar_file_matches_its_name(&f).unwrap();
    }
}

#[test]
fn a_forged_nar_name_is_refused_and_nothing_is_kept() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    // An upstream holding real NAR bytes under names that are not their hashes: one small
    // (held back whole until verified: a 502) and one large (streamed: cut off before its
    // last byte).
    let dir = TempDir::new("forging-upstream");
    fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    fs::create_dir_all(dir.join("nar")).unwrap();
    let real = |p: &str| fs::read(fx.cache_dir(Compression::None).join(&upstream_nar_path(fx, Compression::None, p)[1..])).unwrap();
    let small_name = format!("{}.nar", nix32(&sha256(b"not these bytes")));
    let big_name = format!("{}.nar", nix32(&sha256(b"nor these")));
    fs::write(dir.join("nar").join(&small_name), real(&fx.lib)).unwrap();
    fs::write(dir.join("nar").join(&big_name), real(&fx.big)).unwrap();
    let up = Upstream::serve_dir(dir.path());
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);

    let r = raw_request(ncps.addr, &get_request(&format!("/nar/{small_name}")), Duration::from_secs(20)).unwrap();
    assert_eq!(r.status, 502, "a small NAR whose bytes do not hash to its name: {}", r.text());
    assert!(r.text().contains("hash mismatch"), "{}", r.text());
    let r = raw_request(ncps.addr, &get_request(&format!("/nar/{big_name}")), Duration::from_secs(30)).unwrap();
    assert!(
        r.status == 502 || (r.status == 200 && !r.looks_complete()),
        "a large forged NAR is never completed: {} with {} bytes, {:?}",
        r.status,
        r.body.len(),
        r.end
    );
    assert!(wait_until(Duration::from_secs(5), || ncps.partial_files().is_empty()), "{:?}", ncps.partial_files());
    assert!(ncps.stored_nar_files().is_empty(), "{:?}", ncps.stored_nar_files());
    assert_eq!(nar_row(&ncps, &small_name), None, "not indexed");
    assert_eq!(nar_row(&ncps, &big_name), None, "not indexed");

    // A name the upstream does not have is a 404; so is one that is not a content hash (52
    // nix32 characters hold 260 bits; these set bits a SHA-256 does not have), without
    // asking anyone.
    let absent = format!("/nar/{}.nar", nix32(&sha256(b"nobody has this")));
    assert_eq!(ncps.get(&absent).status, 404, "GET {absent}");
    assert_eq!(up.hits(&absent), 1);
    let not_a_hash = format!("/nar/{}.nar", "z".repeat(52));
    assert_eq!(ncps.get(&not_a_hash).status, 404, "GET {not_a_hash}");
    assert_eq!(up.hits(&not_a_hash), 0, "a name that is not a hash is not asked for");
}

// ---------------------------------------------------------------------------
// fsck
// ---------------------------------------------------------------------------

/// Puts a NAR file that the index has no row for into the store under `data` (as a crash, or
/// a NAR written and not yet recorded, leaves one) and returns its path.
fn nar_without_row(data: &Path, bytes: &[u8]) -> PathBuf {
    let path = data.join("store/nar/1/11").join(format!("{}.nar", "1".repeat(52)));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, bytes).unwrap();
    path
}

/// `ncps fsck [--repair] --cache-data-path DIR`: exit code and stdout+stderr.
fn fsck(data: &Path, repair: bool) -> (Option<i32>, String) {
    let mut c = ncps_command();
    c.arg("fsck");
    if repair {
        c.arg("--repair");
    }
    c.arg("--cache-data-path").arg(data);
    let out = run_with_timeout(c, Duration::from_secs(60)).expect("ncps fsck");
    (out.status.code(), format!("{}{}", out.stdout, out.stderr))
}

fn summary(out: &str) -> &str {
    out.lines()
        .find(|l| l.starts_with("fsck: checked "))
        .unwrap_or_else(|| panic!("no `fsck: checked ...` summary in:\n{out}"))
}

#[test]
fn totals_that_drifted_from_the_rows_are_reported_by_fsck_recounted_by_repair_and_by_the_check_after_a_crash() {
    derived_data_drift_is_reported_repaired_and_mended_after_a_crash(
        "UPDATE totals SET nar_bytes = nar_bytes + 12345, narinfos = narinfos + 1",
        &["totals", "add up to"],
    );
}

#[test]
fn a_narinfo_that_lost_its_use_time_is_reported_by_fsck_and_given_one_by_repair_and_by_the_check_after_a_crash() {
    // Without a use time a narinfo would never be evicted (SQLite schema 6).
    derived_data_drift_is_reported_repaired_and_mended_after_a_crash(
        "DELETE FROM uses WHERE id = (SELECT min(id) FROM narinfos)",
        &["1 narinfo(s) have no use time"],
    );
}

/// Derived data in the index (the totals, the use times) damaged from outside with `damage`:
/// `fsck` reports it (exit 1, naming it with each of `reported`), `fsck --repair` recounts
/// it, and after an unclean stop the background check recounts it by itself.
fn derived_data_drift_is_reported_repaired_and_mended_after_a_crash(damage: &str, reported: &[&str]) {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    let (_up, mut ncps) = proxy(lc, &[]);
    fetch_kept(&ncps, &fx.many[0], u64::MAX);
    fetch_kept(&ncps, &fx.many[1], u64::MAX);
    ncps.stop();
    let data = ncps.data_dir().to_path_buf();
    let drift = || {
        let db = rusqlite::Connection::open(data.join("db.sqlite")).unwrap();
        assert_eq!(db.execute(damage, []).unwrap(), 1, "{damage}");
    };
    drift();
    let (code, out) = fsck(&data, false);
    assert_eq!(code, Some(1), "drifted derived data is a problem:\n{out}");
    assert!(reported.iter().all(|r| out.contains(r)), "{reported:?} in:\n{out}");
    let (code, out) = fsck(&data, true);
    assert_eq!(code, Some(0), "--repair recounts them:\n{out}");
    assert!(out.contains("recounted the totals"), "{out}");
    let (code, out) = fsck(&data, false);
    assert_eq!(code, Some(0), "and the store is sound again:\n{out}");

    // After an unclean stop the background check recounts them by itself.
    drift();
    let _ = std::fs::remove_file(data.join("clean-shutdown"));
    let since = ncps.log_len();
    ncps.restart();
    let log = ncps.wait_for_log(since, "start-up check: done", Duration::from_secs(60));
    assert!(log.contains("recounting them"), "{log}");
    ncps.stop();
    let (code, out) = fsck(&data, false);
    assert_eq!(code, Some(0), "recounted by the check:\n{out}");
}

#[test]
fn fsck_repair_is_refused_while_ncps_serves_the_data_path_and_ncps_does_not_start_during_a_repair() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let (_up, mut ncps) = proxy(lc, &[]);
    fetch_kept(&ncps, &lc.fx.many[0], u64::MAX);
    let data = ncps.data_dir().to_path_buf();
    // What a NAR written and not yet recorded looks like to fsck: a blob without a row.
    let orphan = nar_without_row(&data, b"written, not yet recorded");

    let (code, out) = fsck(&data, true);
    eprintln!("fsck --repair beside a running ncps:\n{out}");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("ncps serve is running on") && out.contains("stop it first"), "says why: {out}");
    assert!(orphan.exists(), "nothing is removed");
    // A check only reports, so it runs; a blob the index does not vouch for may be one the
    // running ncps is recording, so while young it is listed as left alone, not as a problem.
    let (code, out) = fsck(&data, false);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("ncps serve is running on") && out.contains("are left alone"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("left alone: orphaned") && l.contains(&"1".repeat(52))), "{out}");
    assert!(orphan.exists());
    assert_eq!(ncps.get("/nix-cache-info").status, 200, "ncps served on throughout");

    // A repair holds the data path (taken here as fsck --repair takes it): ncps, started
    // meanwhile, exits and says why.
    ncps.stop();
    let repairing = ::ncps::data_lock::take(&data, ::ncps::data_lock::Mode::Repairing).unwrap_or_else(|e| {
        panic!("once ncps is stopped the lock is free: {e}");
    });
    let err = ncps.try_restart().expect_err("no start during a repair");
    assert!(err.contains("ncps fsck --repair is running on"), "{err}");
    drop(repairing);
    let (code, out) = fsck(&data, true);
    assert_eq!(code, Some(0), "with ncps stopped the repair runs: {out}");
    assert!(!orphan.exists(), "and removes the blob");
    ncps.restart();
    assert_eq!(ncps.get("/nix-cache-info").status, 200);
}

/// Another ncps on `data` (which one already serves), with the same upstream; started once it
/// has said that it found the other.
fn beside(lc: &Lifecycle, up: &Upstream, data: &Path) -> Ncps {
    let args: Vec<String> = [
        "serve",
        "--cache-hostname",
        "beside.test",
        "--cache-data-path",
        data.to_str().unwrap(),
        "--server-addr",
        "{addr}",
        "--upstream-cache",
        &up.url(),
        "--upstream-public-key",
        &lc.fx.up1_public_key,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let n = Ncps::start_raw(args, Vec::new());
    n.wait_for_log(0, "another ncps serves this data path", Duration::from_secs(5));
    n
}

#[test]
fn a_crash_beside_other_ncps_is_found_by_the_next_start_that_serves_alone_not_vouched_for_by_a_stop() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let (up, mut first) = proxy(lc, &[]);
    fetch_kept(&first, &lc.fx.many[0], u64::MAX);
    let data = first.data_dir().to_path_buf();
    // A second one serves beside it and is killed, leaving a NAR it wrote but never recorded.
    let mut crashed = beside(lc, &up, &data);
    crashed.kill9();
    let leftover = nar_without_row(&data, b"a crash's leftover");
    // A third joins while the first still serves: it does not check beside it...
    let mut third = beside(lc, &up, &data);
    first.stop();
    assert!(!data.join("clean-shutdown").exists(), "the first stops while the third serves");
    // ...so when it stops alone it has nothing to vouch for, and leaves no marker either.
    third.stop();
    assert!(third.log().contains("the store was not checked since the last unclean stop"), "{}", third.log());
    assert!(!data.join("clean-shutdown").exists(), "no marker vouches for the crash");
    let offset = third.log_len();
    third.restart();
    third.wait_for_log(offset, "start-up check: done", Duration::from_secs(10));
    assert!(!leftover.exists(), "the next start alone compares the store and removes the leftover");
    third.stop();
    assert!(data.join("clean-shutdown").exists(), "checked, it vouches now");
}

#[test]
fn a_second_ncps_on_a_served_data_path_leaves_the_first_ones_files_alone_and_only_the_last_to_stop_marks_it_clean() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let (up, mut first) = proxy(lc, &[]);
    // Its own check of the (new) store is done: it knows the store is sound, so it may vouch
    // for it at its stop. (A check that another ncps interrupts vouches for nothing.)
    first.wait_for_log(0, "start-up check: done", Duration::from_secs(20));
    let n1 = fetch_kept(&first, &lc.fx.many[0], u64::MAX);
    let data = first.data_dir().to_path_buf();
    // What the first one has in flight: a blob written and not yet recorded, and a download's
    // temp file. A second start that took them for crash leftovers would remove both.
    let unrecorded = nar_without_row(&data, b"written, not yet recorded");
    let temp = data.join("tmp").join(format!("download-in-flight{}", ::ncps::storage::TEMP_SUFFIX));
    fs::write(&temp, b"half a NAR").unwrap();

    let mut second = beside(lc, &up, &data);
    assert!(second.log().contains("temp files left to the ncps that writes them"), "{}", second.log());
    assert_eq!(second.get(&n1).status, 200, "the second serves the same store");
    thread::sleep(Duration::from_millis(500));
    assert!(unrecorded.exists() && temp.exists(), "neither is taken for a crash's leftovers");

    // The first to stop leaves no marker: it would vouch for the other's writes.
    second.stop();
    assert!(second.log().contains("the clean-stop marker is left to the last one to stop"), "{}", second.log());
    assert!(!data.join("clean-shutdown").exists());
    first.stop();
    assert!(data.join("clean-shutdown").exists(), "the last one to stop leaves it: {}", first.log());
    fs::remove_file(&unrecorded).unwrap();
}

#[test]
fn fsck_finds_corrupt_missing_and_orphaned_files_and_repair_lets_ncps_fetch_them_again() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let fx = &lc.fx;
    let (up, mut ncps) = proxy(lc, &[]);
    let (p1, p2, p3) = (&fx.many[0], &fx.many[1], &fx.many[2]);
    let n1 = fetch_kept(&ncps, p1, u64::MAX);
    let n2 = fetch_kept(&ncps, p2, u64::MAX);
    fetch_kept(&ncps, p3, u64::MAX);
    ncps.stop();
    let data = ncps.data_dir().to_path_buf();

    let (code, out) = fsck(&data, false);
    assert_eq!(code, Some(0), "fsck of a sound store:\n{out}");
    assert_eq!(
        summary(&out),
        "fsck: checked 3 narinfo(s) and 3 NAR(s): 0 missing, 0 orphaned, 0 corrupt"
    );

    // Damage: one byte flipped (same size), one NAR file gone, one stray file.
    let f1 = nar_file(&ncps, nar_name(&n1)).unwrap();
    let mut bytes = fs::read(&f1).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    fs::write(&f1, &bytes).unwrap();
    let f2 = nar_file(&ncps, nar_name(&n2)).unwrap();
    fs::remove_file(&f2).unwrap();
    let orphan = nar_without_row(&data, b"nobody indexed this");
    let orphan_name = orphan.file_name().unwrap().to_str().unwrap().to_string();

    let (code, out) = fsck(&data, false);
    eprintln!("fsck output:\n{out}");
    assert_eq!(code, Some(1), "fsck finding problems exits 1:\n{out}");
    assert_eq!(
        summary(&out),
        "fsck: checked 3 narinfo(s) and 3 NAR(s): 1 missing, 1 orphaned, 1 corrupt"
    );
    let line_with = |a: &str, b: &str| out.lines().any(|l| l.contains(a) && l.contains(b));
    assert!(
        line_with("corrupt", nar_name(&n1).split('.').next().unwrap()),
        "a line names the corrupt NAR:\n{out}"
    );
    assert!(
        line_with("missing", nar_name(&n2).split('.').next().unwrap()),
        "a line names the missing NAR:\n{out}"
    );
    assert!(
        line_with("orphan", &orphan_name),
        "a line names the orphan:\n{out}"
    );
    assert!(
        orphan.exists() && f1.exists(),
        "fsck without --repair changes nothing"
    );

    let (code, out) = fsck(&data, true);
    assert_eq!(code, Some(0), "fsck --repair:\n{out}");
    assert!(!orphan.exists(), "the orphan is removed");
    let (code, out) = fsck(&data, false);
    assert_eq!(code, Some(0), "fsck after --repair:\n{out}");
    assert!(
        summary(&out).ends_with(": 0 missing, 0 orphaned, 0 corrupt"),
        "{out}"
    );
    if let Some(f) = nar_file(&ncps, nar_name(&n1)) {
        nar_file_matches_its_name(&f).expect("no corrupt NAR left after --repair");
    }

    // Served again: the broken NARs from upstream (verified), the sound one from disk.
    ncps.restart();
    nix_copy_from(&ncps.url(), &[p1, p2, p3], &ncps.pubkey())
        .expect("nix copy after fsck --repair");
    let upstream_nar = |p: &str| upstream_nar_path(fx, Compression::None, p);
    assert_eq!(
        up.hits(&upstream_nar(p1)),
        2,
        "the corrupt NAR is fetched again"
    );
    assert_eq!(
        up.hits(&upstream_nar(p2)),
        2,
        "the missing NAR is fetched again"
    );
    assert_eq!(
        up.hits(&upstream_nar(p3)),
        1,
        "the sound NAR is served from disk"
    );
    assert_store_consistent(&ncps, u64::MAX, "after repair and refetch");
}

// ---------------------------------------------------------------------------
// Stopping: what `systemctl stop`, `podman stop` and a pod's termination send
// ---------------------------------------------------------------------------

/// A graceful stop is a success: exit status 0 (not 143, "killed by SIGTERM"), so that a
/// container engine or supervisor that reads the status sees a clean stop (DESIGN.md,
/// "Stopping").
#[test]
fn sigterm_and_sigint_stop_ncps_with_status_0_within_a_second_leaving_the_clean_stop_marker() {
    for (name, signal) in [("SIGTERM", libc::SIGTERM), ("SIGINT", libc::SIGINT)] {
        let (_dir, _up, mut ncps) = ncps_with_empty_upstream(&[]);
        let marker = ncps.data_dir().join("clean-shutdown");
        assert!(!marker.exists(), "{name}: the clean-stop marker is there while ncps runs");
        let (status, took) = ncps.stop_with_signal(signal).expect("ncps was running");
        assert_eq!(status.code(), Some(0), "{name}: exit status {status}; log:\n{}", ncps.log());
        assert!(took < Duration::from_secs(1), "{name}: took {took:?} to exit");
        assert!(marker.exists(), "{name}: no clean-stop marker after a graceful stop; log:\n{}", ncps.log());
        println!("{name}: exit status 0 after {took:?}");
    }
}

/// A clean stop checkpoints SQLite's WAL and cuts it to nothing: the next start has no WAL
/// to read back (up to 64 MiB after an eviction pass, read at open).
#[test]
fn a_clean_stop_leaves_no_wal_for_the_next_start_to_read() {
    let Some(lc) = lifecycle_or_skip() else {
        return;
    };
    let (_up, mut ncps) = proxy(lc, &[]);
    fetch_kept(&ncps, &lc.fx.many[0], u64::MAX);
    let wal = ncps.data_dir().join("db.sqlite-wal");
    assert!(wal.metadata().is_ok_and(|m| m.len() > 0), "the writes went to the WAL first");
    ncps.stop();
    let left = wal.metadata().map_or(0, |m| m.len());
    assert_eq!(left, 0, "{left} bytes of WAL after a clean stop; log:\n{}", ncps.log());
}

/// In a container ncps is PID 1 of its PID namespace, and the kernel drops a signal sent to
/// PID 1 whose action is the default; ncps waits for its stop signals in a thread (blocked
/// everywhere, taken with sigwait), so the stop works there too. `unshare --pid --fork`
/// makes the same namespace a container engine does, and the signal comes from outside it,
/// as `podman stop`'s does. tests/container.sh checks the same with podman.
#[test]
fn as_pid_1_of_its_own_pid_namespace_ncps_still_stops_on_sigterm_with_status_0() {
    let data = TempDir::new("ncps-pid1");
    let port = free_port();
    let mut cmd = Command::new("unshare");
    for v in scrubbed_env_vars() {
        cmd.env_remove(v);
    }
    cmd.env("XDG_CONFIG_HOME", "/nonexistent/ncps-e2e");
    cmd.args(["--pid", "--fork", "--kill-child", &ncps_bin(), "serve", "--cache-hostname", "pid1.test"])
        .arg("--cache-data-path")
        .arg(data.path())
        .args(["--upstream-cache", "http://127.0.0.1:9", "--server-addr", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut unshare = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIP: cannot run unshare ({e})");
            return;
        }
    };
    let up = wait_until(Duration::from_secs(10), || {
        http_get(&format!("http://127.0.0.1:{port}/healthz")).is_ok_and(|r| r.status == 200)
    });
    if !up {
        let _ = unshare.kill();
        let out = unshare.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
        let err = out.unwrap_or_default();
        if err.contains("Operation not permitted") {
            eprintln!("SKIP: no permission for a PID namespace here: {err}");
            return;
        }
        panic!("ncps under unshare did not answer /healthz: {err}");
    }
    let children = format!("/proc/{0}/task/{0}/children", unshare.id());
    let ncps_pid: i32 = fs::read_to_string(&children).unwrap().trim().parse().expect("ncps's pid");
    let status = fs::read_to_string(format!("/proc/{ncps_pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap_or("").to_string();
    assert!(nspid.trim_end().ends_with("\t1"), "ncps is not PID 1 in its namespace: {nspid:?}");

    let sent = std::time::Instant::now();
    // SAFETY: kill(2) on ncps's pid, which cannot be reused while unshare, its parent, lives.
    unsafe { libc::kill(ncps_pid, libc::SIGTERM) };
    let exited = wait_until(Duration::from_secs(5), || matches!(unshare.try_wait(), Ok(Some(_))));
    let took = sent.elapsed();
    if !exited {
        let _ = unshare.kill();
    }
    let out = unshare.wait_with_output().unwrap();
    assert!(exited, "ncps as PID 1 was still running 5 s after SIGTERM");
    assert_eq!(out.status.code(), Some(0), "exit status {}; stderr:\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(took < Duration::from_secs(1), "took {took:?} to exit");
    assert!(data.join("clean-shutdown").exists(), "no clean-stop marker");
    println!("as PID 1: exit status 0 after {took:?}");
}
