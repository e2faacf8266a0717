//! Replicas at scale (issue 18's "Done when"): three ncps replicas sharing one Garage cluster
//! (three nodes, replication factor 3, support::garage) and one PostgreSQL index serve a
//! fleet of real Nix clients at once (Debian's 2.8 and 2.26, alternating). The replicas:: tests show the mechanism on s3s-fs, a
//! single process that never fails; these show it on a real distributed store, with the
//! faults an operator meets: a replica restarted, a Garage node gone, PostgreSQL restarted, in
//! the middle of a run. What must hold: every NAR is fetched from upstream once whichever
//! replica was asked (while nothing fails), every client ends with verified paths or with a
//! clean error that a retry after the fault turns into verified paths, and afterwards every
//! path verifies through every replica (Nix checks the hashes and ncps's signatures, so
//! nothing unverified was served).
//!
//! Each replica talks to its own Garage node (replica i to node i): a stopped node then costs
//! only the replica that talks to it (its clients get 5xx until the node is back), while the
//! other two keep reading and writing with 2 of 3 nodes (Garage's consistent mode needs a
//! quorum of 2 for both).
//!
//! One more runs a single ncps on the cluster: an eviction pass removes its objects with
//! `DeleteObjects` (Garage takes it) and leaves none behind.
//!
//! Slow (a Garage cluster, three ncps, several Nix clients: about a minute) and they need
//! Garage, so they run only with `NCPS_TEST_SCALE=1`: `make test-scale`, which installs Garage
//! first (tests/garage.sh), or `NCPS_TEST_SCALE=1 cargo test --features s3,postgres --test e2e
//! scale::`.

use crate::replicas::has_features;
use crate::support::pg_cluster;
use crate::support::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Whether the scale tests were asked for (`NCPS_TEST_SCALE=1`); says so when they were not.
fn scale_enabled() -> bool {
    let on = std::env::var("NCPS_TEST_SCALE").is_ok_and(|v| v == "1");
    if !on {
        let test = thread::current().name().unwrap_or("?").to_string();
        eprintln!("SKIPPED {test}: a scale test (Garage, three replicas); NCPS_TEST_SCALE=1 or make test-scale runs it");
    }
    on
}

struct Fleet {
    up: Upstream,
    replicas: Vec<Ncps>,
    garage: Garage,
    /// The fleet's public key (one signing key for all).
    key: String,
}

/// How the replicas' data directories start.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Fresh, as a new replica's: ncps counts that as an unclean stop and compares the bucket
    /// with the index in the background (2 x 1,296 shard listings: one to two minutes against
    /// this Garage cluster, while it serves).
    Fresh,
    /// With the clean-stop marker (`clean-shutdown`) in place, as after `systemctl restart`:
    /// no background check (on Garage it takes about 100 s of listings, which would only slow
    /// the test of one fetch per NAR; the check itself has its own test, below).
    AfterCleanStop,
}

/// Three replicas, replica i on Garage node i, one PostgreSQL database at `db_url`, one
/// signing key, in front of an upstream that serves NARs at `rate` bytes per second.
fn fleet(fx: &Fixture, db_url: &str, rate: u64, start: Start) -> Option<Fleet> {
    let t0 = Instant::now();
    let garage = Garage::start()?;
    eprintln!("[e2e] scale: Garage cluster (3 nodes, bucket, key) ready in {:?}", t0.elapsed());
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_ranges(true);
    up.set_mode_for(Mode::Slow(rate), Target::Nar);
    let mut replicas: Vec<Ncps> = Vec::new();
    let mut key_file: Option<PathBuf> = None;
    for i in 0..3 {
        let mut extra: Vec<String> =
            ["--upstream-cache", &up.url(), "--upstream-public-key", &fx.up1_public_key].iter().map(|s| s.to_string()).collect();
        extra.extend(garage.flags(i));
        extra.extend(["--cache-database-url".to_string(), db_url.to_string(), "--server-advertise-addr".into(), "{addr}".into()]);
        if let Some(k) = &key_file {
            extra.extend(["--cache-secret-key-path".to_string(), k.display().to_string()]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let data = TempDir::new("ncps-data");
        if start == Start::AfterCleanStop {
            std::fs::write(data.join("clean-shutdown"), "ncps stopped cleanly (written by the test)\n").expect("marker");
        }
        let r = Ncps::start_on(data, &extra);
        key_file.get_or_insert_with(|| r.data_dir().join("secret-key"));
        replicas.push(r);
    }
    let key = replicas[0].pubkey();
    for r in &replicas[1..] {
        assert_eq!(r.pubkey(), key, "one signing key for the fleet");
    }
    eprintln!("[e2e] scale: fleet up in {:?}", t0.elapsed());
    Some(Fleet { up, replicas, garage, key })
}

/// What the clients fetch: the top closure (with the 8 MiB `big`, which every client wants at
/// once) and four small paths, two to a client, so that each small one is wanted by several.
/// Client `k`'s Nix: every other one the current Nix (2.26, which asks for zstd and talks
/// HTTP differently), the rest Debian's 2.8, so each replica serves both.
fn client_nix(k: usize) -> NixClient {
    if k % 2 == 1 && !NixClient::Nix2_26.must_skip() {
        NixClient::Nix2_26
    } else {
        NixClient::Nix2_8
    }
}

fn client_paths(fx: &Fixture, k: usize) -> Vec<String> {
    vec![fx.top.clone(), fx.many[k % 4].clone(), fx.many[(k + 1) % 4].clone()]
}

/// Every store path some client fetches.
fn all_paths(fx: &Fixture) -> Vec<String> {
    let mut v = fx.top_closure.clone();
    v.extend(fx.many[..4].iter().cloned());
    v
}

const CLIENTS: usize = 6;

/// Words in a Nix error that would mean ncps passed on bytes or a narinfo it should not have.
fn says_bad_bytes(err: &str) -> bool {
    ["hash mismatch", "valid signature", "lacks a signature", "corrupt", "NAR hash"]
        .iter()
        .any(|w| err.contains(w))
}

#[test]
fn three_replicas_on_garage_fetch_every_nar_from_upstream_once_whichever_replica_each_nix_client_asks() {
    if !scale_enabled() {
        return;
    }
    let Some(fx) = fixture_or_skip() else { return };
    if !has_features() {
        return;
    }
    let db = pg_cluster::shared().create_database("scale").expect("a database");
    // 8 MiB at 2 MB/s: four seconds for the clients of the other replicas to join.
    let Some(f) = fleet(fx, &db, 2_000_000, Start::AfterCleanStop) else { return };

    let t0 = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let url = f.replicas[k % 3].url();
            let (paths, key) = (client_paths(fx, k), f.key.clone());
            let nix = client_nix(k);
            thread::spawn(move || {
                let r = nix.copy_from(&url, &paths, &key);
                (k, r, t0.elapsed())
            })
        })
        .collect();
    for c in clients {
        let (k, r, took) = c.join().expect("client thread");
        eprintln!("[e2e] scale: client {k} ({}, replica {}) done in {took:?}", client_nix(k).label(), k % 3);
        if let Err(e) = r {
            panic!("client {k} through replica {}: {e}", k % 3);
        }
    }
    eprintln!("[e2e] scale: {CLIENTS} clients verified their paths in {:?}", t0.elapsed());

    for p in all_paths(fx) {
        let nar = upstream_nar_path(fx, Compression::Xz, &p);
        assert_eq!(f.up.hits(&nar), 1, "one upstream fetch of {p}'s NAR ({nar}) for the whole fleet");
    }
    // The holder stores a NAR after its clients had it; then every replica serves it from the
    // bucket, and Nix verifies the lot through each.
    for (i, r) in f.replicas.iter().enumerate() {
        nix_copy_from(&r.url(), &all_paths(fx), &f.key).unwrap_or_else(|e| panic!("everything through replica {i}: {e}"));
    }
    for p in all_paths(fx) {
        let nar = upstream_nar_path(fx, Compression::Xz, &p);
        assert_eq!(f.up.hits(&nar), 1, "{p}'s NAR still fetched once after every replica served it");
    }
    drop(f.garage);
}

/// Garage (like AWS S3) sends listed keys URL-encoded (`nar%2F<name>`) when asked with
/// `encoding-type=url`; before they were decoded, every listed key was a stray to the start-up
/// check and every stored row looked as if its blob were gone, so with a shared index a
/// replica's check dropped every row and the fleet fetched everything from upstream again.
#[test]
fn a_replica_joining_with_a_start_up_check_leaves_every_nar_the_fleet_stored_a_hit() {
    if !scale_enabled() {
        return;
    }
    let Some(fx) = fixture_or_skip() else { return };
    if !has_features() {
        return;
    }
    let db = pg_cluster::shared().create_database("scale_join").expect("a database");
    let Some(mut f) = fleet(fx, &db, 50_000_000, Start::AfterCleanStop) else { return };
    let paths = all_paths(fx);
    nix_copy_from(&f.replicas[0].url(), &paths, &f.key).expect("the fleet fills the bucket");
    // Replica 2 crashes and comes back: an unclean stop, so its start-up check runs.
    let offset = f.replicas[2].log_len();
    f.replicas[2].kill9();
    f.replicas[2].restart();
    let t = Instant::now();
    f.replicas[2].wait_for_log(offset, "start-up check: done", Duration::from_secs(600));
    eprintln!("[e2e] scale: the start-up check on Garage took {:?}", t.elapsed());
    let log = f.replicas[2].log_since(offset);
    assert!(!log.contains("dropped"), "the check dropped rows whose blobs are there:\n{}", log.lines().filter(|l| l.contains("start-up check")).collect::<Vec<_>>().join("\n"));
    nix_copy_from(&f.replicas[1].url(), &paths, &f.key).expect("through another replica");
    for p in &paths {
        let nar = upstream_nar_path(fx, Compression::Xz, p);
        assert_eq!(f.up.hits(&nar), 1, "{p}'s NAR fetched once, before and after the check");
    }
}

#[test]
fn replicas_survive_a_restarted_replica_a_stopped_garage_node_and_a_restarted_postgresql_and_every_path_verifies_afterwards() {
    if !scale_enabled() {
        return;
    }
    let Some(fx) = fixture_or_skip() else { return };
    if !has_features() {
        return;
    }
    // Its own PostgreSQL: this test restarts it.
    let pg = pg_cluster::Cluster::start().expect("a PostgreSQL server");
    let db = pg.create_database("scale_faults").expect("a database");
    // 8 MiB at 1 MB/s: downloads are running through all three faults.
    let Some(mut f) = fleet(fx, &db, 1_000_000, Start::Fresh) else { return };

    let healed = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let url = f.replicas[k % 3].url();
            let (paths, key, healed) = (client_paths(fx, k), f.key.clone(), healed.clone());
            let nix = client_nix(k);
            thread::spawn(move || {
                // Clients arrive through the faults, not all at the start.
                thread::sleep(Duration::from_millis(700 * k as u64));
                let first = nix.copy_from(&url, &paths, &key);
                let Err(e) = first else { return (k, Vec::new(), Ok(()), t0.elapsed()) };
                // A failed copy is retried once everything is back, as a user would.
                let mut errors = vec![e];
                while !healed.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(200));
                }
                let mut last = nix.copy_from(&url, &paths, &key);
                if let Err(e) = &last {
                    errors.push(e.clone());
                    thread::sleep(Duration::from_secs(2));
                    last = nix.copy_from(&url, &paths, &key);
                }
                (k, errors, last, t0.elapsed())
            })
        })
        .collect();

    // The faults, one after another while the downloads run.
    thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    f.replicas[1].restart();
    eprintln!("[e2e] scale: replica 1 restarted at {:?} (took {:?})", t0.elapsed(), t.elapsed());
    thread::sleep(Duration::from_secs(1));
    f.garage.stop_node(2);
    eprintln!("[e2e] scale: Garage node 2 (replica 2's endpoint) killed at {:?}", t0.elapsed());
    thread::sleep(Duration::from_secs(1));
    pg.stop().expect("stopping PostgreSQL");
    eprintln!("[e2e] scale: PostgreSQL stopped at {:?}", t0.elapsed());
    thread::sleep(Duration::from_secs(2));
    pg.start_server().expect("starting PostgreSQL again");
    eprintln!("[e2e] scale: PostgreSQL back at {:?}", t0.elapsed());
    thread::sleep(Duration::from_secs(3));
    f.garage.restart_node(2);
    let healthy = f.garage.wait_healthy(0, Duration::from_secs(30));
    assert!(healthy, "the Garage cluster sees its three nodes again");
    eprintln!("[e2e] scale: Garage node 2 back and the cluster healthy at {:?}", t0.elapsed());
    healed.store(true, Ordering::SeqCst);

    let mut failed_first = 0;
    for c in clients {
        let (k, errors, last, took) = c.join().expect("client thread");
        let replica = k % 3;
        for e in &errors {
            let first_line: String = e.lines().filter(|l| l.contains("error")).take(2).collect::<Vec<_>>().join(" | ");
            eprintln!("[e2e] scale: client {k} (replica {replica}) failed, retryable: {first_line}");
            assert!(!says_bad_bytes(e), "client {k} through replica {replica} was served bad bytes:\n{e}");
        }
        failed_first += usize::from(!errors.is_empty());
        eprintln!("[e2e] scale: client {k} (replica {replica}) ended {} in {took:?}", if last.is_ok() { "verified" } else { "FAILED" });
        if let Err(e) = last {
            panic!("client {k} through replica {replica} still fails after the faults are over:\n{e}");
        }
    }
    eprintln!("[e2e] scale: {failed_first} of {CLIENTS} clients needed a retry; all verified by {:?}", t0.elapsed());

    // Afterwards: every path through every replica, verified by Nix, and every NAR byte for
    // byte what the upstream has.
    for (i, r) in f.replicas.iter().enumerate() {
        nix_copy_from(&r.url(), &all_paths(fx), &f.key).unwrap_or_else(|e| panic!("everything through replica {i} afterwards: {e}"));
        for p in all_paths(fx) {
            let up_nar = upstream_nar_path(fx, Compression::Xz, &p);
            let want = sha256(&std::fs::read(fx.cache_dir(Compression::Xz).join(up_nar.trim_start_matches('/'))).expect("fixture NAR"));
            let (nar, size) = ncps_nar_path(r, &p);
            let got = raw_get_hashed(r.addr, &nar, Duration::from_secs(30)).expect("GET the NAR");
            assert_eq!((got.status, got.len), (200, size), "{p}'s NAR through replica {i}");
            assert!(got.sha256 == want, "{p}'s NAR through replica {i} is the upstream's, byte for byte");
        }
    }
    let fetches: Vec<u64> = all_paths(fx).iter().map(|p| f.up.hits(&upstream_nar_path(fx, Compression::Xz, p))).collect();
    eprintln!("[e2e] scale: upstream requests per NAR across the faults: {fetches:?}");
    for (i, r) in f.replicas.iter().enumerate() {
        assert!(!r.log().contains("panicked"), "replica {i} panicked:\n{}", r.log());
    }
}

/// The keys of Garage's bucket that start with `prefix`, listed with curl (SigV4 of its own)
/// through node 0: a check that does not go through ncps.
fn garage_keys(g: &Garage, prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-f", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "--aws-sigv4", &format!("aws:amz:{GARAGE_REGION}:s3"), "-u"])
        .arg(format!("{}:{}", g.access_key, g.secret_key))
        .arg(format!("{}/{GARAGE_BUCKET}?list-type=2", g.s3_endpoint(0)))
        .output()
        .expect("curl");
    assert!(out.status.success(), "listing the bucket: {}", String::from_utf8_lossy(&out.stderr));
    let xml = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!xml.contains("<IsTruncated>true"), "one page holds the test's keys");
    xml.split("<Key>").skip(1).filter_map(|k| k.split("</Key>").next()).filter(|k| k.starts_with(prefix)).map(str::to_string).collect()
}

#[test]
fn eviction_on_garage_removes_the_objects_with_delete_objects_and_leaves_none_behind() {
    if !scale_enabled() || !has_features() {
        return;
    }
    let Some(fx) = fixture_or_skip() else { return };
    let Some(garage) = Garage::start() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let flags = garage.flags(0);
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &extra);
    nix_copy_from(&ncps.url(), &fx.top_closure, &ncps.pubkey()).expect("nix copy through ncps");
    let n = fx.top_closure.len();
    assert!(
        wait_until(Duration::from_secs(60), || garage_keys(&garage, "nar/").len() >= n && garage_keys(&garage, "narinfo/").len() >= n),
        "every NAR and narinfo uploaded: {:?}",
        garage_keys(&garage, "")
    );
    let since = ncps.log_len();
    // Room for nothing: the pass at start removes every entry.
    ncps.restart_with_flag("--cache-max-size", Some("1B"));
    ncps.wait_for_log(since, "evicted", Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(30), || garage_keys(&garage, "nar").is_empty() && garage_keys(&garage, "narinfo/").is_empty()),
        "the bucket holds no entry after the pass: {:?}",
        garage_keys(&garage, "")
    );
    let log = ncps.log_since(since);
    assert!(!log.contains("does not take DeleteObjects"), "Garage takes DeleteObjects: {log}");
    assert!(!log.contains("ERROR"), "{log}");
}
