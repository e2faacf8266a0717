//! The index in PostgreSQL (`--cache-database-url postgresql://…`, issue 18): the real ncps
//! binary, built with `--features postgres`, against a real PostgreSQL server
//! (support::pg_cluster: initdb and pg_ctl, a database per test), with the Nix 2.8 client.
//! The TLS tests use a server with `ssl=on` and a test CA (`pg_cluster::shared_tls`): ncps over
//! `sslmode=verify-full` (every session encrypted, as `pg_stat_ssl` says), a wrong CA refused
//! at start with its cause, and URL mistakes refused as configuration errors.
//!
//! `make test` builds the suite with `--features postgres`, so these always run there. Against
//! a binary built without the feature (`make test-static`), each test instead checks that
//! such a URL is refused at start with one line that names the flag and the feature, and says
//! it skipped the rest.
//!
//! Run: `cargo test --features postgres --test e2e postgres::`.

use crate::support::pg_cluster::{self, Cluster};
use crate::support::*;
use std::process::Command;

/// `ncps serve` on a new data directory (named after `label`) with `--cache-database-url url`,
/// which must make it exit: its exit code and stderr.
fn serve_expecting_failure(label: &str, url: &str) -> (Option<i32>, String) {
    let data = TempDir::new(label);
    let data_path = data.path().to_string_lossy().into_owned();
    let args = [
        "serve", "--cache-hostname", HOSTNAME, "--cache-data-path", &data_path, "--server-addr", "{addr}",
        "--upstream-cache", "http://127.0.0.1:9", "--cache-database-url", url,
    ];
    run_ncps_expecting_failure(&args, &[])
}

/// Whether the binary under test has the PostgreSQL index (`ncps --version` lists it). When
/// it has not, checks that it refuses a PostgreSQL URL as it must, and says the test skipped.
fn ncps_has_postgres(test: &str) -> bool {
    let out = Command::new(ncps_bin()).arg("--version").output().expect("ncps --version runs");
    let version = String::from_utf8_lossy(&out.stdout).into_owned();
    if version.contains("postgres") {
        return true;
    }
    let url = "postgresql://ncps:some-password-41@127.0.0.1:9/ncps";
    let (code, stderr) = serve_expecting_failure("pg-refused", url);
    assert_eq!(code, Some(2), "a PostgreSQL URL is a configuration error without the feature: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("--cache-database-url") && lines[0].contains("--features postgres"), "{stderr}");
    assert!(!stderr.contains("some-password-41"), "the password is not shown: {stderr}");
    eprintln!("[e2e] {test}: skipped: {} was built without --features postgres ({})", ncps_bin(), version.trim());
    false
}

fn count(cluster: &Cluster, url: &str, sql: &str) -> u64 {
    let out = cluster.psql(url, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    out.parse().unwrap_or_else(|_| panic!("{sql}: {out:?}"))
}

#[test]
fn a_cache_indexed_in_postgresql_serves_nix_2_8_from_its_index_after_a_restart() {
    let Some(fx) = fixture_or_skip() else { return };
    if !ncps_has_postgres("postgres::a_cache_indexed_in_postgresql_serves_nix_2_8_from_its_index_after_a_restart") {
        return;
    }
    let cluster = pg_cluster::shared();
    let url = cluster.create_database("e2e").expect("a database");
    let mut up = Upstream::for_cache(fx, Compression::Zstd);
    let mut ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--cache-database-url", &url]);
    let key = ncps.pubkey();
    nix_copy_from(&ncps.url(), &[&fx.top], &key).expect("first fetch (fills the cache)");
    let log = ncps.log();
    assert!(log.contains("index: PostgreSQL postgresql://ncps:***@127.0.0.1:"), "the index is named: {log}");
    assert!(!log.contains(pg_cluster::PASSWORD), "the password is never logged");
    assert!(!ncps.data_dir().join("db.sqlite").exists(), "no SQLite index beside it");
    let n = fx.top_closure.len() as u64;
    assert_eq!(count(cluster, &url, "SELECT count(*) FROM narinfos"), n, "every narinfo is in PostgreSQL");
    ncps.wait_for_stored_nars(n as usize);
    assert_eq!(count(cluster, &url, "SELECT narinfos FROM totals"), n, "and counted");

    up.stop();
    ncps.restart();
    assert_eq!(ncps.pubkey(), key);
    nix_copy_from(&ncps.url(), &[&fx.top], &key)
        .expect("after restarting ncps, upstream stopped: served from the store the index vouches for");
    for path in &fx.top_closure {
        let hash = store_hash(path);
        assert_eq!(ncps.get(&format!("/{hash}.narinfo")).status, 200, "{path} is a hit");
    }
}

#[test]
fn ncps_keeps_serving_and_recording_across_a_postgresql_restart() {
    let Some(fx) = fixture_or_skip() else { return };
    if !ncps_has_postgres("postgres::ncps_keeps_serving_and_recording_across_a_postgresql_restart") {
        return;
    }
    // A server of its own, since it is restarted.
    let cluster = Cluster::start().expect("a PostgreSQL server");
    let url = cluster.create_database("e2e_restart").expect("a database");
    let up = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--cache-database-url", &url]);
    let key = ncps.pubkey();
    nix_copy_from(&ncps.url(), &[&fx.many[0]], &key).expect("a fetch before the PostgreSQL restart");
    cluster.restart().expect("PostgreSQL restarted");
    nix_copy_from(&ncps.url(), &[&fx.top], &key).expect("misses after the restart are fetched and recorded");
    let recorded = count(&cluster, &url, "SELECT count(*) FROM narinfos");
    assert_eq!(recorded, fx.top_closure.len() as u64 + 1, "recorded in the restarted server");
    let log = ncps.log();
    assert!(log.contains("was closed") && log.contains("reconnecting"), "the closed connections were replaced: {log}");
    assert!(!log.contains(pg_cluster::PASSWORD), "the password is never logged");
}

/// Whether every connection ncps holds to `url`'s database is encrypted, and how many it holds,
/// as the server sees them.
fn ncps_sessions_over_tls(cluster: &Cluster, url: &str) -> (u64, u64) {
    let name = url.rsplit('/').next().unwrap_or_default().split('?').next().unwrap_or_default();
    let from = format!(
        "FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'ncps' AND a.datname = '{name}'"
    );
    (count(cluster, url, &format!("SELECT count(*) {from}")), count(cluster, url, &format!("SELECT count(*) {from} AND s.ssl")))
}

#[test]
fn a_cache_indexed_over_verify_full_tls_serves_nix_and_every_session_is_encrypted() {
    let Some(fx) = fixture_or_skip() else { return };
    if !ncps_has_postgres("postgres::a_cache_indexed_over_verify_full_tls_serves_nix_and_every_session_is_encrypted") {
        return;
    }
    let cluster = pg_cluster::shared_tls();
    let plain = cluster.create_database("e2e_tls").expect("a database");
    let url = format!("{plain}?sslmode=verify-full&sslrootcert={}", cluster.ca_file().display());
    let up = Upstream::for_cache(fx, Compression::Zstd);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--cache-database-url", &url]);
    let key = ncps.pubkey();
    nix_copy_from(&ncps.url(), &[&fx.top], &key).expect("a fetch through an index reached over TLS");
    let n = fx.top_closure.len() as u64;
    assert_eq!(count(cluster, &plain, "SELECT count(*) FROM narinfos"), n, "recorded");
    let (sessions, encrypted) = ncps_sessions_over_tls(cluster, &plain);
    assert!(sessions > 0 && encrypted == sessions, "{encrypted} of ncps's {sessions} sessions are TLS");
    let log = ncps.log();
    assert!(log.contains("sslmode=verify-full"), "the index is named with its sslmode: {log}");
    assert!(!log.contains(pg_cluster::PASSWORD), "the password is never logged");
    // ncps runs at --log-level debug here: the driver's lines (every statement) are not in it.
    for chatter in ["executing statement", "preparing query", "tokio_postgres"] {
        assert!(!log.contains(chatter), "no {chatter:?} at debug: {log}");
    }
}

#[test]
fn a_ca_that_did_not_sign_the_servers_certificate_stops_ncps_at_start_naming_the_cause() {
    if !ncps_has_postgres("postgres::a_ca_that_did_not_sign_the_servers_certificate_stops_ncps_at_start_naming_the_cause") {
        return;
    }
    let cluster = pg_cluster::shared_tls();
    let plain = cluster.create_database("e2e_wrong_ca").expect("a database");
    let other = cluster.other_ca_file();
    let url = format!("{plain}?sslmode=verify-full&sslrootcert={}", other.display());
    let (code, stderr) = serve_expecting_failure("pg-wrong-ca", &url);
    assert_ne!(code, Some(0), "{stderr}");
    let cause = format!("the server's certificate is not signed by the CA in sslrootcert={}", other.display());
    assert!(stderr.contains(&cause), "the cause is named: {stderr}");
    assert!(!stderr.contains(pg_cluster::PASSWORD), "the password is not shown: {stderr}");
}

#[test]
fn a_client_certificate_from_sslcert_and_sslkey_logs_in_where_the_server_asks_for_one() {
    if !ncps_has_postgres("postgres::a_client_certificate_from_sslcert_and_sslkey_logs_in_where_the_server_asks_for_one") {
        return;
    }
    let cluster = pg_cluster::shared_tls();
    let plain = cluster.create_database("e2e_cert").expect("a database");
    // pg_hba.conf: `hostssl all ncps_cert 127.0.0.1/32 cert`, so no password would do.
    let url = cluster.cert_url(&plain).expect("the database given to the certificate's user");
    let ncps = Ncps::start(&["--upstream-cache", "http://127.0.0.1:9", "--cache-database-url", &url]);
    assert_eq!(ncps.get("/nix-cache-info").status, 200);
    let sessions = count(
        cluster,
        &plain,
        &format!(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.usename = '{}' AND s.ssl AND s.client_dn LIKE '%CN={}%'",
            pg_cluster::CERT_USER,
            pg_cluster::CERT_USER
        ),
    );
    assert!(sessions > 0, "ncps is logged in by its certificate over TLS");
    assert_eq!(count(cluster, &plain, "SELECT count(*) FROM totals"), 1, "and made its schema there");

    // The same URL without the certificate: the server refuses, and ncps says why at start.
    let (cert, key) = cluster.client_cert_files();
    let without = url.replace(&format!("&sslcert={}&sslkey={}", cert.display(), key.display()), "");
    assert_ne!(without, url);
    let (code, stderr) = serve_expecting_failure("pg-no-cert", &without);
    assert_ne!(code, Some(0), "{stderr}");
    eprintln!("without the certificate:\n{stderr}");
    assert!(stderr.contains("requires a valid client certificate"), "the server's reason is shown: {stderr}");
}

#[test]
fn a_bad_sslmode_or_an_unreadable_sslrootcert_is_a_one_line_configuration_error() {
    if !ncps_has_postgres("postgres::a_bad_sslmode_or_an_unreadable_sslrootcert_is_a_one_line_configuration_error") {
        return;
    }
    let base = format!("postgresql://ncps:{}@127.0.0.1:9/ncps", pg_cluster::PASSWORD);
    for (query, says) in [
        ("sslmode=verify-everything", "sslmode=\"verify-everything\" is not supported"),
        ("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem", "sslrootcert=/nonexistent/ca.pem: cannot be read"),
        ("sslmode=require&sslcert=/nonexistent/client.pem", "sslcert is given without sslkey"),
        ("sslmode=require&sslcert=/nonexistent/c.pem&sslkey=/nonexistent/c.key", "sslcert=/nonexistent/c.pem: cannot be read"),
    ] {
        let (code, stderr) = serve_expecting_failure("pg-bad-sslmode", &format!("{base}?{query}"));
        assert_eq!(code, Some(2), "a configuration error: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(lines[0].contains("--cache-database-url") && lines[0].contains(says), "{stderr}");
        assert!(!stderr.contains(pg_cluster::PASSWORD), "the password is not shown: {stderr}");
    }
}

#[test]
fn a_small_nar_hit_whose_etag_is_only_in_postgresql_waits_in_a_worker_never_on_the_poll_loop() {
    let Some(fx) = fixture_or_skip() else { return };
    if !ncps_has_postgres("postgres::a_small_nar_hit_whose_etag_is_only_in_postgresql_waits_in_a_worker_never_on_the_poll_loop") {
        return;
    }
    // A server of its own, since it is paused (dropping it resumes it, should an assert fail).
    let cluster = Cluster::start().expect("a PostgreSQL server");
    let url = cluster.create_database("e2e_etag").expect("a database");
    let up = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--cache-database-url", &url]);
    let (nar_path, size) = ncps_nar_path(&ncps, &fx.many[0]);
    assert!(size < 16 * 1024, "a NAR the poll loop answers ({size} bytes)");
    let first = ncps.get(&nar_path);
    assert_eq!(first.status, 200);
    let etag = first.header("etag").expect("an ETag").to_string();
    // As an older ncps, or a file system without user xattrs, would have stored it.
    let name = nar_path.rsplit('/').next().unwrap().to_string();
    let find = || files_under(ncps.data_dir()).into_iter().find(|p| p.file_name().is_some_and(|n| n == name.as_str()));
    // Kept once the download has finished, just after the client had its last byte.
    assert!(wait_until(std::time::Duration::from_secs(10), || find().is_some()), "{name} is stored");
    let stored = find().unwrap();
    let c = std::ffi::CString::new(stored.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and attribute name, both alive for the call.
    let gone = unsafe { libc::removexattr(c.as_ptr(), c"user.ncps.file_hash".as_ptr()) };
    assert_eq!(gone, 0, "the FileHash kept with {}: {}", stored.display(), std::io::Error::last_os_error());

    cluster.pause();
    let nar_url = format!("{}{nar_path}", ncps.url());
    let waiting = std::thread::spawn(move || http_get(&nar_url).map(|r| (r.status, r.header("etag").map(str::to_string))));
    std::thread::sleep(std::time::Duration::from_millis(300));
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let r = ncps.get("/nix-cache-info");
        let took = t.elapsed();
        assert_eq!(r.status, 200);
        assert!(took < std::time::Duration::from_millis(500), "answered in {took:?} while PostgreSQL hangs");
    }
    cluster.resume();
    let (status, tag) = waiting.join().unwrap().expect("the hit, once PostgreSQL answers");
    assert_eq!((status, tag.as_deref()), (200, Some(etag.as_str())), "the same ETag, from the index");
}
