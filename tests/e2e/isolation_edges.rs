//! End-to-end specification of the cache's half of issue 15: no slow or hostile upstream holds
//! what it holds past a deadline, work nobody wants stops, and the edges are honest: a data
//! directory that takes no new files degrades like a full disk, an empty NAR is never a
//! complete answer, a symlink in the store is never followed, and a re-fetched NAR is counted
//! once.
//!
//! The dripping upstream ([`Mode::Drip`]) sends a byte now and then, so it never trips an idle
//! timeout: only the total deadlines (`--upstream-narinfo-timeout`, `--upstream-nar-timeout`
//! plus FileSize at `--upstream-nar-min-rate`) stop it.
//!
//! Run: `cargo test --test e2e isolation_edges::` (add `-- --nocapture` for timings).

use crate::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Times one GET (panics if it fails at the transport level).
fn timed_get(ncps: &Ncps, path: &str) -> (u16, Duration) {
    let t = Instant::now();
    let r = ncps.get(path);
    (r.status, t.elapsed())
}

#[test]
fn a_dripping_upstream_narinfo_is_abandoned_at_its_deadline_and_the_next_upstream_serves_it_while_hits_and_healthz_are_answered() {
    let Some(fx) = fixture_or_skip() else { return };
    let drip = Upstream::for_cache(fx, Compression::Xz);
    let good = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams_with(
        &[drip.url(), good.url()],
        &[&fx.up1_public_key],
        &[
            "--server-workers", "4",
            "--upstream-body-idle-timeout", "3s",
            "--upstream-narinfo-timeout", "5s",
            "--prometheus-enabled",
        ],
    );
    let key = ncps.pubkey();
    // A NAR on disk, for the hits asked meanwhile (fetched while the first upstream behaves).
    let (hit_path, _) = ncps_nar_path(&ncps, &fx.lib);
    assert_eq!(ncps.get(&hit_path).status, 200);
    ncps.wait_for_stored_nars(1);

    drip.set_mode_for(Mode::Drip(Duration::from_secs(2)), Target::Narinfo);
    let started = Instant::now();
    let copy = {
        let (url, top, key) = (ncps.url(), fx.top.clone(), key.clone());
        std::thread::spawn(move || nix_copy_from_timeout(&url, &[&top], &key, Duration::from_secs(60)))
    };
    // Three more lookups, of paths of the closure and of paths nobody has, to take the workers.
    let others: Vec<_> = fx.many.iter().take(3).map(|p| {
        let (url, path) = (ncps.url(), format!("/{}.narinfo", store_hash(p)));
        std::thread::spawn(move || http_get(&format!("{url}{path}")).map(|r| r.status))
    }).collect();
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile /healthz and a NAR hit are answered at once: lookups run in the pool of
    // upstream workers, not in the one that serves hits (1 ms measured; 4.5 s before).
    let (health, health_took) = timed_get(&ncps, "/healthz");
    let (hit, hit_took) = timed_get(&ncps, &hit_path);
    eprintln!("while dripping: /healthz {health} in {health_took:?}, NAR hit {hit} in {hit_took:?}");
    assert_eq!((health, hit), (200, 200));
    assert!(health_took < Duration::from_secs(2) && hit_took < Duration::from_secs(2), "{health_took:?} {hit_took:?}");

    copy.join().unwrap().expect("nix copy gets the closure from the good upstream");
    let took = started.elapsed();
    eprintln!("nix copy through a dripping first upstream took {took:?}");
    for o in others {
        assert_eq!(o.join().unwrap().expect("answered"), 200, "from the good upstream");
    }
    assert!(good.hits_where(|p| p.ends_with(".narinfo")) >= 4, "the next upstream was asked");
    // The dripping upstream was dropped at the deadline, not at the end of its 1 MiB cap.
    assert!(wait_until(Duration::from_secs(3), || drip.dripping() == 0), "a drip still open");
    let log = ncps.log();
    assert!(log.contains("not done within its deadline of 5s"), "{log}");
    assert!(took < Duration::from_secs(40), "{took:?}");
    // And it counts against its health.
    let label = drip.url().trim_start_matches("http://").to_string();
    let m = metrics(&ncps);
    assert!(
        m.lines().any(|l| l.starts_with(&format!("ncps_upstream_errors_total{{upstream_hostname=\"{label}\"")) && !l.ends_with(" 0"))
            || log.contains("marked down"),
        "{m}"
    );
}

#[test]
fn a_dripping_nar_download_gives_its_slot_back_at_its_deadline() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams_with(
        &[up.url()],
        &[&fx.up1_public_key],
        &["--upstream-nar-timeout", "3s", "--upstream-nar-min-rate", "1G", "--prometheus-enabled"],
    );
    let (nar, _) = ncps_nar_path(&ncps, &fx.top);
    up.set_mode_for(Mode::Drip(Duration::from_millis(500)), Target::Nar);
    let t = Instant::now();
    let r = ncps.get(&nar);
    let took = t.elapsed();
    eprintln!("a dripping NAR was answered {} after {took:?}: {}", r.status, r.text().trim());
    assert!(r.status >= 500, "never a 200 for bytes that did not come: {}", r.status);
    assert!(took >= Duration::from_millis(2500) && took < Duration::from_secs(7), "{took:?}");
    assert!(wait_until(Duration::from_secs(2), || up.dripping() == 0), "the upstream connection is closed");
    assert!(wait_until(Duration::from_secs(2), || metric(&metrics(&ncps), "ncps_downloads_in_flight") == Some(0.0)));
    assert!(ncps.log().contains("not done within its deadline"), "{}", ncps.log());
    assert!(ncps.stored_nar_files().is_empty() && ncps.partial_files().is_empty(), "nothing kept");
    // The slot is free: once the upstream behaves, the same miss is served.
    up.set_mode(Mode::Normal);
    assert_eq!(ncps.get(&nar).status, 200);
}

#[test]
fn a_dripping_nar_nobody_waits_for_gives_its_slot_back_before_its_deadline() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    // A deadline of ten minutes: only the lack of progress, with nobody waiting, ends it.
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--upstream-nar-timeout", "600s", "--prometheus-enabled"]);
    let (nar, _) = ncps_nar_path(&ncps, &fx.top);
    up.set_mode_for(Mode::Drip(Duration::from_millis(500)), Target::Nar);
    let t = Instant::now();
    // The client asks, then leaves after a second.
    let mut conn = RawConn::connect(ncps.addr, Duration::from_secs(1)).unwrap();
    conn.send(&get_request(&nar)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    drop(conn);
    assert!(metric(&metrics(&ncps), "ncps_downloads_in_flight") == Some(1.0), "the download runs on");
    assert!(
        wait_until(Duration::from_secs(20), || metric(&metrics(&ncps), "ncps_downloads_in_flight") == Some(0.0)),
        "the download still holds its slot after {:?}",
        t.elapsed()
    );
    eprintln!("a readerless dripping download gave its slot back after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(2), || up.dripping() == 0), "the upstream connection is closed");
    ncps.wait_for_log(0, "no client waits for this download", Duration::from_secs(2));
}

#[test]
fn a_narinfo_lookup_every_client_left_stops_and_the_upstream_sees_its_connection_closed() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    // Long limits: only the client leaving can end the lookup early.
    let ncps = Ncps::for_upstreams_with(
        &[up.url()],
        &[&fx.up1_public_key],
        &["--upstream-body-idle-timeout", "30s", "--upstream-narinfo-timeout", "120s"],
    );
    let key = ncps.pubkey();
    up.set_mode_for(Mode::Drip(Duration::from_millis(300)), Target::Narinfo);
    let path = format!("/{}.narinfo", store_hash(&fx.top));
    // A Nix client that gives up (is killed) after 3 s.
    let t = Instant::now();
    let err = nix_copy_from_timeout(&ncps.url(), &[&fx.top], &key, Duration::from_secs(3)).expect_err("nothing came");
    let left = Instant::now();
    eprintln!("nix copy gave up after {:?}: {}", t.elapsed(), err.lines().next().unwrap_or(""));
    assert!(wait_until(Duration::from_secs(3), || up.drip_cut(&path).is_some()), "the upstream connection is still open");
    let cut = up.drip_cut(&path).unwrap();
    eprintln!("the upstream saw its connection closed {:?} after the client left", cut.saturating_duration_since(left));
    assert!(cut.saturating_duration_since(left) < Duration::from_secs(2));
    ncps.wait_for_log(0, "every client left; lookup", Duration::from_secs(2));
    // Nothing is remembered: a later client, once the upstream behaves, gets it.
    up.set_mode(Mode::Normal);
    assert_eq!(ncps.get(&path).status, 200);
}

/// A read-only bind mount over `dir` (as root, `chmod` does not stop writes), undone on drop.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn mount(dir: &Path) -> Result<ReadOnly, String> {
        let d = dir.to_str().ok_or("path")?;
        let run = |args: &[&str]| {
            let out = Command::new("mount").args(args).output().map_err(|e| format!("mount: {e}"))?;
            if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
        };
        run(&["--bind", d, d])?;
        let ro = ReadOnly(dir.to_path_buf());
        run(&["-o", "remount,ro,bind", d])?;
        Ok(ro)
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn an_unwritable_data_directory_relays_verified_nars_keeps_nothing_and_healthz_says_503() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &[]);
    let key = ncps.pubkey();
    let ro = match ReadOnly::mount(ncps.data_dir()) {
        Ok(ro) => ro,
        Err(e) => {
            eprintln!("skipped: cannot make a read-only bind mount here (needs root): {e}");
            return;
        }
    };
    assert!(std::fs::write(ncps.data_dir().join("probe"), b"x").is_err(), "the data directory is read-only");
    let h = ncps.get("/healthz");
    eprintln!("/healthz with a read-only data directory: {} {}", h.status, h.text().trim());
    assert_eq!(h.status, 503);
    assert!(h.text().contains("Read-only file system"), "the reason: {}", h.text());

    nix_copy_from(&ncps.url(), &[&fx.top], &key).expect("every verified byte is still relayed");
    let log = ncps.log();
    assert!(log.contains("relaying it to waiting clients from memory, not keeping it"), "{log}");
    assert!(log.contains("verified and served, but not kept"), "{log}");
    drop(ro);
    assert!(ncps.stored_nar_files().is_empty() && ncps.stored_narinfo_files().is_empty(), "nothing kept");
    assert!(ncps.partial_files().is_empty());
    assert_eq!(ncps.get("/healthz").status, 200, "writable again: healthy again");
}

#[test]
fn an_upstream_narinfo_saying_filesize_0_is_refused_and_the_client_gets_an_error_not_an_empty_nar() {
    let Some(fx) = fixture_or_skip() else { return };
    let dir = TempDir::new("filesize-0");
    let cache = dir.join("cache");
    let st = Command::new("cp").arg("-a").arg(fx.cache_dir(Compression::Xz)).arg(&cache).status().unwrap();
    assert!(st.success());
    // FileSize is not covered by the signature: the narinfo still verifies.
    let ni = cache.join(format!("{}.narinfo", store_hash(&fx.top)));
    let text = std::fs::read_to_string(&ni).unwrap();
    let edited: String = text
        .lines()
        .map(|l| if l.starts_with("FileSize:") { "FileSize: 0".to_string() } else { l.to_string() })
        .map(|l| l + "\n")
        .collect();
    std::fs::write(&ni, edited).unwrap();
    let up = Upstream::serve_dir(&cache);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &[]);
    let key = ncps.pubkey();
    let r = ncps.get(&format!("/{}.narinfo", store_hash(&fx.top)));
    assert_eq!(r.status, 404, "refused, so not served: {}", r.text());
    assert!(ncps.log().contains("FileSize (or NarSize) is 0"), "{}", ncps.log());
    let err = nix_copy_from(&ncps.url(), &[&fx.top], &key).expect_err("the client sees an error");
    eprintln!("nix copy of a path whose narinfo says FileSize 0: {}", err.lines().last().unwrap_or(""));
    assert!(ncps.stored_narinfo_files().is_empty());
}

#[test]
fn a_stored_nar_replaced_by_a_symlink_is_never_served_and_the_store_check_removes_it() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let mut ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &[]);
    let (top, _) = ncps_nar_path(&ncps, &fx.top);
    let (lib, _) = ncps_nar_path(&ncps, &fx.lib);
    let want_top = ncps.get(&top).body;
    let want_lib = ncps.get(&lib).body;
    let stored = ncps.wait_for_stored_nars(2);
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let file_of = |nar: &str| stored.iter().find(|p| nar.ends_with(p.file_name().unwrap().to_str().unwrap())).unwrap().clone();
    let (top_file, lib_file) = (file_of(&top), file_of(&lib));

    // While running: a hit that finds a symlink is a miss, fetched and verified again.
    std::fs::remove_file(&top_file).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &top_file).unwrap();
    let got = ncps.get(&top);
    assert_eq!(got.status, 200);
    assert_ne!(got.body, passwd, "never /etc/passwd");
    assert_eq!(got.body, want_top, "the NAR's own bytes, from upstream");
    assert!(ncps.log().contains("a symlink, not a stored file"), "{}", ncps.log());
    assert!(wait_until(Duration::from_secs(5), || std::fs::symlink_metadata(&top_file).is_ok_and(|m| m.is_file())));

    // After a crash, the start-up check removes a symlink as foreign.
    ncps.kill9();
    std::fs::remove_file(&lib_file).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &lib_file).unwrap();
    // fsck, too, treats it as foreign.
    let out = Command::new(ncps_bin())
        .args(["fsck", "--cache-data-path"])
        .arg(ncps.data_dir())
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("fsck with a symlinked NAR:\n{report}");
    assert!(!out.status.success(), "fsck finds a problem");
    assert!(report.contains(lib_file.file_name().unwrap().to_str().unwrap()), "{report}");
    assert!(report.contains("a symlink or special file, not one ncps wrote: foreign"), "{report}");
    let offset = ncps.log_len();
    ncps.restart();
    ncps.wait_for_log(offset, "start-up check: done", Duration::from_secs(10));
    assert!(std::fs::symlink_metadata(&lib_file).is_err(), "the symlink is removed");
    assert!(Path::new("/etc/passwd").exists(), "not what it pointed at");
    let got = ncps.get(&lib);
    assert_eq!((got.status, got.body == want_lib), (200, true), "fetched again, verified");
}

#[test]
fn a_nar_deleted_behind_ncps_back_and_fetched_again_is_counted_once() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--prometheus-enabled", "--cache-max-size", "1G"]);
    let (nar, _) = ncps_nar_path(&ncps, &fx.top);
    assert_eq!(ncps.get(&nar).status, 200);
    let file = ncps.wait_for_stored_nars(1).remove(0);
    // The file appears (renamed) a moment before the download ends and is recorded: deleting
    // it in that moment would have the next GET join the ending download (CI saw it).
    ncps.wait_for_log(0, "verified and stored", Duration::from_secs(5));
    let size = || metric(&metrics(&ncps), "ncps_store_total_size_bytes").unwrap_or(-1.0);
    let before = size();
    assert!(before > 0.0);
    for round in 0..2 {
        std::fs::remove_file(&file).unwrap();
        assert_eq!(ncps.get(&nar).status, 200, "fetched again ({round})");
        assert!(wait_until(Duration::from_secs(5), || file.is_file()), "stored again");
        assert!(wait_until(Duration::from_secs(5), || ncps.log().matches("verified and stored").count() >= round + 2));
        assert_eq!(size(), before, "counted once after re-fetch {round}");
    }
}

#[test]
fn a_nar_deleted_behind_ncps_back_and_uploaded_again_is_stored_again_and_counted_once() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams_with(
        &[up.url()],
        &[&fx.up1_public_key],
        &["--prometheus-enabled", "--cache-allow-put-verb", "--cache-write-token", WRITE_TOKEN],
    );
    let (nar, _) = ncps_nar_path(&ncps, &fx.top);
    let bytes = ncps.get(&nar).body;
    let file = ncps.wait_for_stored_nars(1).remove(0);
    let size = || metric(&metrics(&ncps), "ncps_store_total_size_bytes").unwrap_or(-1.0);
    let before = size();
    std::fs::remove_file(&file).unwrap();
    let mut req = format!(
        "PUT {nar} HTTP/1.1\r\nHost: ncps-e2e\r\nAuthorization: Bearer {WRITE_TOKEN}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        bytes.len()
    )
    .into_bytes();
    req.extend_from_slice(&bytes);
    let r = raw_request(ncps.addr, &req, Duration::from_secs(10)).unwrap();
    assert!(r.status / 100 == 2, "PUT answered {}: {}", r.status, r.text());
    assert!(file.is_file(), "the upload brings the missing file back (the index said it was there)");
    assert_eq!(size(), before, "and it is counted once");
}
