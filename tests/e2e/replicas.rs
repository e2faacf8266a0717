//! Replicas (issue 18): several ncps on one bucket (s3s-fs) and one PostgreSQL index, each
//! with `--server-advertise-addr`. One of them downloads a NAR from upstream (it holds the
//! lease); the others stream it from that one as it grows, verify it and leave storing it to
//! the holder; a replica killed mid-download is replaced by the upstream (the others' clients
//! see a resumed stream). Needs a build with `--features s3,postgres` (`make test` has both).
//!
//! Run: `cargo test --features s3,postgres --test e2e replicas::`.

use crate::support::pg_cluster;
use crate::support::*;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

struct Fleet {
    up: Upstream,
    replicas: Vec<Ncps>,
    _s3: S3sFs,
}

/// `n` replicas sharing a bucket, a PostgreSQL database and one signing key, in front of an
/// upstream that serves NARs at `rate` bytes per second.
fn fleet(fx: &Fixture, n: usize, rate: u64) -> Option<Fleet> {
    fleet_with(fx, n, rate, &[])
}

/// As [`fleet`], every replica started with `more` flags as well.
fn fleet_with(fx: &Fixture, n: usize, rate: u64, more: &[&str]) -> Option<Fleet> {
    let s3 = S3sFs::start()?;
    let url = pg_cluster::shared().create_database("replicas").expect("a database");
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_ranges(true);
    up.set_mode_for(Mode::Slow(rate), Target::Nar);
    let mut flags = s3.flags();
    flags.extend(["--cache-database-url".to_string(), url, "--server-advertise-addr".into(), "{addr}".into()]);
    flags.extend(more.iter().map(|f| f.to_string()));
    let mut replicas: Vec<Ncps> = Vec::new();
    let mut key: Option<PathBuf> = None;
    for _ in 0..n {
        let mut extra: Vec<String> = flags.clone();
        if let Some(k) = &key {
            extra.extend(["--cache-secret-key-path".to_string(), k.display().to_string()]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let r = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &extra);
        key.get_or_insert_with(|| r.data_dir().join("secret-key"));
        replicas.push(r);
    }
    Some(Fleet { up, replicas, _s3: s3 })
}

pub(crate) fn has_features() -> bool {
    let out = std::process::Command::new(ncps_bin()).arg("--version").output().expect("ncps --version");
    let v = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok = v.contains("postgres") && v.contains("s3");
    if !ok {
        eprintln!("[e2e] replicas: skipped: {} was built without --features s3,postgres ({})", ncps_bin(), v.trim());
    }
    ok
}

#[test]
fn three_replicas_fetch_a_nar_from_upstream_once_and_the_others_stream_it_from_the_one_that_downloads_it() {
    let Some(fx) = fixture_or_skip() else { return };
    if !has_features() {
        return;
    }
    // 8 MiB at 2 MB/s: four seconds of download for the others to join.
    let Some(f) = fleet(fx, 3, 2_000_000) else { return };
    let upstream_nar = upstream_nar_path(fx, Compression::Xz, &fx.big);
    let want = sha256(&std::fs::read(fx.cache_dir(Compression::Xz).join(upstream_nar.trim_start_matches('/'))).unwrap());
    let (nar, size) = ncps_nar_path(&f.replicas[0], &fx.big);
    for r in &f.replicas[1..] {
        assert_eq!(ncps_nar_path(r, &fx.big).0, nar, "every replica points at the same NAR");
    }

    let t0 = Instant::now();
    let mut clients = Vec::new();
    for (i, r) in f.replicas.iter().enumerate() {
        let (addr, nar) = (r.addr, nar.clone());
        clients.push(thread::spawn(move || {
            let got = raw_get_hashed(addr, &nar, Duration::from_secs(60)).expect("GET");
            (i, got, t0.elapsed())
        }));
        // The first one starts the download; the others come while it runs.
        thread::sleep(Duration::from_millis(if i == 0 { 500 } else { 100 }));
    }
    for c in clients {
        let (i, got, took) = c.join().unwrap();
        eprintln!("[e2e] replica {i}: {} bytes in {took:?}", got.len);
        assert_eq!((got.status, got.len), (200, size), "replica {i}");
        assert!(got.sha256 == want, "replica {i} sent the NAR, byte for byte");
    }
    assert_eq!(f.up.hits(&upstream_nar), 1, "one upstream fetch for the three replicas");
    for r in &f.replicas[1..] {
        // Logged once the bytes were checked, just after the client had them all.
        let log = r.wait_for_log(0, "streamed from replica", Duration::from_secs(10));
        assert!(log.contains("is downloading it; streaming it from there"), "the lease told who downloads it");
        assert!(!log.contains("verified and stored"), "only the holder stores it");
    }
    f.replicas[0].wait_for_log(0, "verified and stored", Duration::from_secs(10));

    // Hits afterwards come from the bucket on every replica, and Nix verifies the closure
    // through any of them (one signing key for the fleet).
    let key = f.replicas[0].pubkey();
    assert_eq!(f.replicas[2].pubkey(), key);
    nix_copy_from(&f.replicas[2].url(), &[&fx.top], &key).expect("nix copy through another replica");
    assert_eq!(f.up.hits(&upstream_nar), 1, "still one");
}

#[test]
fn a_replica_killed_mid_download_leaves_the_others_clients_a_resumed_stream_and_its_lease_expires() {
    let Some(fx) = fixture_or_skip() else { return };
    if !has_features() {
        return;
    }
    // 8 MiB at 1 MB/s: eight seconds, killed after two.
    let Some(mut f) = fleet(fx, 2, 1_000_000) else { return };
    let upstream_nar = upstream_nar_path(fx, Compression::Xz, &fx.big);
    let want = sha256(&std::fs::read(fx.cache_dir(Compression::Xz).join(upstream_nar.trim_start_matches('/'))).unwrap());
    let (nar, size) = ncps_nar_path(&f.replicas[0], &fx.big);
    let _ = ncps_nar_path(&f.replicas[1], &fx.big);

    let a = f.replicas[0].addr;
    let nar_a = nar.clone();
    let first = thread::spawn(move || raw_get_hashed(a, &nar_a, Duration::from_secs(60)));
    thread::sleep(Duration::from_millis(500));
    let b = f.replicas[1].addr;
    let nar_b = nar.clone();
    let second = thread::spawn(move || raw_get_hashed(b, &nar_b, Duration::from_secs(60)));
    thread::sleep(Duration::from_millis(1500));
    f.replicas[0].kill9();
    let _ = first.join();

    let got = second.join().unwrap().expect("the other replica's client");
    assert_eq!((got.status, got.len), (200, size));
    assert!(got.sha256 == want, "a resumed stream, byte for byte");
    let log = f.replicas[1].wait_for_log(0, "verified and stored", Duration::from_secs(20));
    assert!(log.contains("resuming from"), "the rest came from the upstream, and this replica kept it");
    // The dead holder's lease is gone within its 15 s: a fresh miss is downloaded at once.
    assert!(
        wait_until(Duration::from_secs(20), || f.replicas[1].get(&nar).status == 200),
        "the NAR is a hit on the live replica"
    );
}

#[test]
fn a_path_one_replica_found_absent_is_not_asked_of_the_upstream_again_by_another_within_the_negative_ttl() {
    let Some(fx) = fixture_or_skip() else { return };
    if !has_features() {
        return;
    }
    let Some(f) = fleet(fx, 2, 10_000_000) else { return };
    let path = format!("/{}.narinfo", random_hash(std::process::id() as u64 + 77));
    assert_eq!(f.replicas[0].get(&path).status, 404);
    assert_eq!(f.up.hits(&path), 1);
    assert_eq!(f.replicas[1].get(&path).status, 404, "the other replica knows it is absent");
    assert_eq!(f.up.hits(&path), 1, "from the shared negative cache, without asking the upstream");
}

#[test]
fn with_a_read_token_a_replica_presents_it_to_the_one_downloading_and_the_nar_is_still_fetched_once() {
    let Some(fx) = fixture_or_skip() else { return };
    if !has_features() {
        return;
    }
    const TOKEN: &str = "e2e-fleet-read-token-7f3a";
    let Some(f) = fleet_with(fx, 2, 2_000_000, &["--cache-get-token", TOKEN]) else { return };
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let upstream_nar = upstream_nar_path(fx, Compression::Xz, &fx.big);
    let want = sha256(&std::fs::read(fx.cache_dir(Compression::Xz).join(upstream_nar.trim_start_matches('/'))).unwrap());
    let (nar, size) = ncps_nar_path_with(&f.replicas[0], &fx.big, &auth);
    assert_eq!(ncps_nar_path_with(&f.replicas[1], &fx.big, &auth).0, nar);
    assert_eq!(raw_get_hashed(f.replicas[1].addr, &nar, Duration::from_secs(10)).unwrap().status, 401, "reads need the token");

    let mut clients = Vec::new();
    for (i, r) in f.replicas.iter().enumerate() {
        let (addr, nar, bearer) = (r.addr, nar.clone(), bearer.clone());
        clients.push(thread::spawn(move || {
            (i, raw_get_hashed_with(addr, &nar, &[("Authorization", &bearer)], Duration::from_secs(60)).expect("GET"))
        }));
        thread::sleep(Duration::from_millis(500));
    }
    for c in clients {
        let (i, got) = c.join().unwrap();
        assert_eq!((got.status, got.len), (200, size), "replica {i}");
        assert!(got.sha256 == want, "replica {i} sent the NAR, byte for byte");
    }
    // Without the token the holder would answer 401 and this replica would go to the upstream.
    f.replicas[1].wait_for_log(0, "streamed from replica", Duration::from_secs(10));
    assert_eq!(f.up.hits(&upstream_nar), 1, "one upstream fetch: the second replica did not fall back to the upstream");
}

#[test]
fn two_replicas_missing_one_narinfo_at_once_ask_the_upstream_once_and_serve_the_same_signed_narinfo() {
    let Some(fx) = fixture_or_skip() else { return };
    if !has_features() {
        return;
    }
    let Some(f) = fleet(fx, 2, 10_000_000) else { return };
    // A narinfo of ~0.5 KB at 400 B/s: over a second of lookup for the second replica to join.
    f.up.set_mode_for(Mode::Slow(400), Target::Narinfo);
    let path = format!("/{}.narinfo", store_hash(&fx.top));
    let t0 = Instant::now();
    let mut clients = Vec::new();
    for (i, r) in f.replicas.iter().enumerate() {
        let url = format!("{}{path}", r.url());
        clients.push(thread::spawn(move || (i, http_get(&url).expect("GET"), t0.elapsed())));
        thread::sleep(Duration::from_millis(300));
    }
    let mut bodies = Vec::new();
    for c in clients {
        let (i, got, took) = c.join().unwrap();
        eprintln!("[e2e] replica {i}: narinfo in {took:?}");
        assert_eq!(got.status, 200, "replica {i}");
        bodies.push(got.text());
    }
    assert_eq!(f.up.hits(&path), 1, "one upstream lookup for both replicas");
    assert_eq!(bodies[0], bodies[1], "both serve the narinfo the first stored, signed by the fleet's key");
    f.replicas[1].wait_for_log(0, "looked up by another replica", Duration::from_secs(5));
}

#[test]
fn a_replica_starting_on_a_new_data_path_does_not_list_the_shared_bucket_but_checks_after_its_own_crash() {
    let Some(fx) = fixture_or_skip() else { return };
    if !has_features() {
        return;
    }
    let Some(mut f) = fleet(fx, 2, 50_000_000) else { return };
    let path = format!("/{}.narinfo", store_hash(&fx.top));
    assert_eq!(f.replicas[0].get(&path).status, 200, "the fleet stores something");
    for r in &f.replicas {
        // Log lines are written by a thread of their own: waited for, not read at once.
        let log = r.wait_for_log(0, "start-up check: a new data path", Duration::from_secs(10));
        assert!(!log.contains("comparing the store"), "a new replica lists nothing:\n{log}");
    }
    // Its own crash is another matter: what it was writing may be half-done.
    let since = f.replicas[1].log_len();
    f.replicas[1].kill9();
    f.replicas[1].restart();
    let log = f.replicas[1].wait_for_log(since, "start-up check: done", Duration::from_secs(120));
    assert!(log.contains("the last stop was not clean"), "{log}");
    assert_eq!(f.replicas[1].get(&path).status, 200, "and it serves what the fleet stored");
}
