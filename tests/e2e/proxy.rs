//! End-to-end specification of ncps as a read-through proxy, driven by the
//! real Nix client (`nix copy`, `nix store verify`) against local upstreams.
//!
//! Tests that need Nix skip (with a message) only when `nix` is not installed
//! and `CI` is unset; under CI a missing `nix` fails them.
//!
//! Run: `cargo test --test e2e proxy::` (add `-- --nocapture` to see timings).
//! `NCPS_E2E_BIN=/path/to/ncps` runs the suite against another build.
//! Files of a failed test are kept under target/tmp/e2e-run-<pid>/.

use crate::support::*;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// The harness itself (so a failure below can be blamed on ncps, not on it)
// ---------------------------------------------------------------------------

#[test]
fn harness_nix_fetches_the_fixture_directly_from_the_test_upstream_only_with_the_right_key() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    nix_copy_from(&up.url(), &[&fx.top], &fx.up1_public_key)
        .expect("nix copy straight from the test upstream, trusting up1");
    let err = nix_copy_from(&up.url(), &[&fx.top], &fx.up2_public_key)
        .expect_err("nix must refuse paths signed by a key it does not trust");
    assert!(err.contains("signature"), "unexpected nix error: {err}");
    // The suite's own signature check agrees with Nix on the upstream's Sigs.
    for path in &fx.top_closure {
        let ni = NarInfo::parse(&fx.upstream_narinfo(Compression::Xz, path));
        let sig = &ni.sigs()[0];
        assert!(
            signature_verifies(&fx.up1_public_key, &ni.fingerprint(), sig),
            "{path}"
        );
        assert!(
            !signature_verifies(&fx.up2_public_key, &ni.fingerprint(), sig),
            "{path}"
        );
    }
}

#[test]
fn harness_upstream_serves_files_and_misbehaves_on_demand() {
    let dir = TempDir::new("harness-upstream");
    fs::create_dir_all(dir.join("nar")).unwrap();
    fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let nar: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(dir.join("nar/abc.nar"), &nar).unwrap();
    let mut up = Upstream::serve_dir(dir.path());
    let base = up.url();
    let url = |p: &str| format!("{base}{p}");

    let r = http_get(&url("/nar/abc.nar")).unwrap();
    assert_eq!((r.status, r.body.len()), (200, nar.len()));
    assert_eq!(r.header("content-length"), Some("10000"));
    assert_eq!(r.body, nar);
    let r = http_head(&url("/nar/abc.nar")).unwrap();
    assert_eq!((r.status, r.header("content-length")), (200, Some("10000")));
    assert_eq!(http_get(&url("/missing.narinfo")).unwrap().status, 404);
    assert_eq!(up.hits("/nar/abc.nar"), 2);

    up.set_mode(Mode::Status500);
    assert_eq!(http_get(&url("/nix-cache-info")).unwrap().status, 500);

    up.set_mode(Mode::CorruptByte);
    let r = http_get(&url("/nar/abc.nar")).unwrap();
    assert_eq!(r.body.len(), nar.len());
    assert_ne!(r.body, nar, "CorruptByte must alter NAR bodies");
    assert_eq!(
        http_get(&url("/nix-cache-info")).unwrap().text(),
        "StoreDir: /nix/store\n"
    );

    up.set_mode(Mode::ResetMidBody);
    assert!(
        http_get(&url("/nar/abc.nar")).is_err(),
        "ResetMidBody must break the body"
    );
    up.set_mode(Mode::CloseMidBody);
    assert!(
        http_get(&url("/nar/abc.nar")).is_err(),
        "CloseMidBody must truncate the body"
    );

    up.set_mode_for(Mode::Status500, Target::Nar);
    assert_eq!(http_get(&url("/nar/abc.nar")).unwrap().status, 500);
    assert_eq!(http_get(&url("/nix-cache-info")).unwrap().status, 200);

    up.set_mode(Mode::Slow(40_000));
    let t = Instant::now();
    assert_eq!(http_get(&url("/nar/abc.nar")).unwrap().body, nar);
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "Slow must throttle"
    );

    up.set_mode(Mode::Hang);
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", up.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut b = [0u8; 16];
        let e = s.read(&mut b).expect_err("Hang must not answer");
        assert!(matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ));
    }

    up.stop();
    assert!(
        http_get(&url("/nix-cache-info")).is_err(),
        "stopped upstream must refuse"
    );
    up.restart();
    up.set_mode(Mode::Normal);
    assert_eq!(http_get(&url("/nix-cache-info")).unwrap().status, 200);
}

#[test]
fn every_flag_environment_variable_is_cleared_for_the_ncps_under_test() {
    // Every ncps of the suite (serve, fsck, bad configurations) comes from ncps_command():
    // what it leaves out of the child's environment is what a developer's shell can leak.
    let cmd = ncps_command();
    let cleared: std::collections::BTreeSet<String> = cmd
        .get_envs()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    let leaking: Vec<String> = ::ncps::config::FLAGS
        .iter()
        .flat_map(|f| f.envs.iter().map(move |e| format!("{e} (--{})", f.names[0])))
        .filter(|e| !cleared.contains(e.split(' ').next().unwrap()))
        .collect();
    assert!(leaking.is_empty(), "reach the ncps under test from the caller's environment: {leaking:?}");
    // Two that a hand-kept list once missed, and the one variable ncps reads beyond its flags.
    for v in ["CACHE_NEGATIVE_TTL", "SERVER_IDLE_TIMEOUT", "SSL_CERT_FILE"] {
        assert!(cleared.contains(v), "{v} is not cleared: {cleared:?}");
    }
}

// ---------------------------------------------------------------------------
// Fetching through the proxy
// ---------------------------------------------------------------------------

/// An ncps in front of one upstream serving the fixture cache `c`, trusting up1.
fn proxy_for(fx: &Fixture, c: Compression) -> (Upstream, Ncps) {
    let up = Upstream::for_cache(fx, c);
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    (up, ncps)
}

fn fetch_top_through_proxy_trusting_only_its_key(c: Compression) {
    let Some(fx) = fixture_or_skip() else { return };
    fetch_top_through_proxy_with(NixClient::Nix2_8, fx, c);
}

/// `client` fetches the top closure (cache `c`) through a fresh ncps, trusting only ncps's key.
fn fetch_top_through_proxy_with(client: NixClient, fx: &Fixture, c: Compression) {
    let (up, ncps) = proxy_for(fx, c);
    let key = ncps.pubkey();
    client.copy_from(&ncps.url(), &[&fx.top], &key).unwrap_or_else(|e| {
        panic!("{}: fetching the top closure ({}) through ncps: {e}", client.label(), c.name())
    });
    assert!(
        up.hits_where(|p| p.starts_with("/nar/")) >= 3,
        "NARs came from the upstream"
    );
}

#[test]
fn fetch_through_proxy_trusting_only_its_key_xz() {
    fetch_top_through_proxy_trusting_only_its_key(Compression::Xz);
}

#[test]
fn fetch_through_proxy_trusting_only_its_key_zstd() {
    fetch_top_through_proxy_trusting_only_its_key(Compression::Zstd);
}

#[test]
fn fetch_through_proxy_trusting_only_its_key_uncompressed() {
    fetch_top_through_proxy_trusting_only_its_key(Compression::None);
}

#[test]
fn nix_2_26_substitutes_a_closure_through_ncps_for_each_compression() {
    let Some(fx) = fixture_or_skip() else { return };
    if NixClient::Nix2_26.must_skip() {
        return;
    }
    for c in [Compression::Xz, Compression::Zstd, Compression::None] {
        fetch_top_through_proxy_with(NixClient::Nix2_26, fx, c);
    }
}

/// What Nix 2.26 sends (Nix 2.14-2.33 alike); Nix 2.8 sends no Accept-Encoding.
pub const NIX_2_26_ACCEPT_ENCODING: &str = "zstd, br, gzip, deflate, bzip2, xz";

#[test]
fn harness_nix_2_26_asks_for_zstd_br_gzip_deflate_bzip2_xz_and_nix_2_8_for_no_encoding() {
    let Some(fx) = fixture_or_skip() else { return };
    for client in NixClient::BOTH {
        if client.must_skip() {
            continue;
        }
        let up = Upstream::for_cache(fx, Compression::Xz);
        client
            .copy_from(&up.url(), &[&fx.top], &fx.up1_public_key)
            .unwrap_or_else(|e| panic!("{}: nix copy straight from the test upstream: {e}", client.label()));
        let seen = up.request_header("accept-encoding");
        eprintln!("{} ({}) sent Accept-Encoding: {seen:?}", client.label(), client.version().unwrap_or_default());
        let want = match client {
            NixClient::Nix2_8 => None,
            NixClient::Nix2_26 => Some(NIX_2_26_ACCEPT_ENCODING.to_string()),
        };
        assert!(seen.iter().any(|(r, _)| r.starts_with("GET /nar/")), "{}: {seen:?}", client.label());
        for (request, value) in &seen {
            assert_eq!(value, &want, "{}: Accept-Encoding of {request}", client.label());
        }
    }
}

#[test]
fn nars_asked_for_with_nix_2_26_accept_encoding_come_as_bytes_that_match_the_narinfo() {
    let Some(fx) = fixture_or_skip() else { return };
    for c in [Compression::Xz, Compression::Zstd, Compression::None] {
        let (_up, ncps) = proxy_for(fx, c);
        // Twice: the miss (streamed from the upstream) and the hit (from disk).
        for round in ["miss", "hit"] {
            for path in &fx.top_closure {
                let ni = NarInfo::parse(&ncps.get(&format!("/{}.narinfo", store_hash(path))).text());
                let url = format!("/{}", ni.get("URL").expect("URL"));
                let request = format!(
                    "GET {url} HTTP/1.1\r\nHost: ncps-e2e\r\nAccept-Encoding: {NIX_2_26_ACCEPT_ENCODING}\r\nConnection: close\r\n\r\n"
                );
                let r = raw_request(ncps.addr, request.as_bytes(), Duration::from_secs(30)).unwrap();
                let what = format!("{} {round}, {url} ({path})", c.name());
                assert!(r.looks_complete(), "{what}: status {}, {:?}", r.status, r.end);
                assert_eq!(r.status, 200, "{what}");
                // Nix before 2.31 rejects `identity`, and 2.14-2.33 mishandle `deflate`.
                let body = match r.header("content-encoding") {
                    None => r.body.clone(),
                    Some(e) if e.eq_ignore_ascii_case("zstd") => {
                        zstd::decode_all(&r.body[..]).unwrap_or_else(|e| panic!("{what}: bad zstd: {e}"))
                    }
                    Some(e) => panic!("{what}: Content-Encoding {e:?} (only none or zstd are acceptable)"),
                };
                assert_eq!(body.len().to_string(), ni.get("FileSize").unwrap(), "{what}: FileSize");
                assert_eq!(
                    format!("sha256:{}", nix32(&sha256(&body))),
                    ni.get("FileHash").unwrap(),
                    "{what}: FileHash"
                );
            }
        }
    }
}

#[test]
fn cached_closure_is_served_while_the_upstream_is_down() {
    let Some(fx) = fixture_or_skip() else { return };
    let (mut up, ncps) = proxy_for(fx, Compression::Xz);
    let key = ncps.pubkey();
    nix_copy_from(&ncps.url(), &[&fx.top], &key).expect("first fetch (fills the cache)");
    up.stop();
    nix_copy_from(&ncps.url(), &[&fx.top], &key)
        .expect("second fetch, upstream stopped: must be served from ncps's cache");
}

#[test]
fn cached_closure_is_served_after_an_ncps_restart_while_the_upstream_is_down() {
    let Some(fx) = fixture_or_skip() else { return };
    let (mut up, mut ncps) = proxy_for(fx, Compression::Zstd);
    let key = ncps.pubkey();
    nix_copy_from(&ncps.url(), &[&fx.top], &key).expect("first fetch (fills the cache)");
    up.stop();
    ncps.restart();
    assert_eq!(ncps.pubkey(), key, "the signing key must survive a restart");
    nix_copy_from(&ncps.url(), &[&fx.top], &key)
        .expect("fetch after restarting ncps, upstream stopped: must be served from disk");
}

#[test]
fn a_closure_cached_for_nix_2_26_is_served_to_both_clients_after_a_restart_while_the_upstream_is_down() {
    let Some(fx) = fixture_or_skip() else { return };
    if NixClient::Nix2_26.must_skip() {
        return;
    }
    let (mut up, mut ncps) = proxy_for(fx, Compression::Zstd);
    let key = ncps.pubkey();
    NixClient::Nix2_26.copy_from(&ncps.url(), &[&fx.top], &key).expect("Nix 2.26: first fetch (fills the cache)");
    up.stop();
    ncps.restart();
    for client in NixClient::BOTH {
        client
            .copy_from(&ncps.url(), &[&fx.top], &key)
            .unwrap_or_else(|e| panic!("{}: after a restart, upstream stopped, from disk: {e}", client.label()));
    }
}

// ---------------------------------------------------------------------------
// Several upstreams: a broken first one must not prevent fetching
// ---------------------------------------------------------------------------

/// Timeouts given to ncps so that hanging upstreams are given up quickly.
const FAST_TIMEOUTS: &[&str] = &[
    "--upstream-dialer-timeout",
    "2s",
    "--upstream-response-header-timeout",
    "2s",
];

fn fetch_with_broken_first_upstream(first: String, fx: &Fixture) {
    let good = Upstream::for_cache(fx, Compression::Xz);
    let mut args = vec![
        "--upstream-cache".to_string(),
        first,
        "--upstream-cache".to_string(),
        good.url(),
        "--upstream-public-key".to_string(),
        fx.up1_public_key.clone(),
    ];
    args.extend(FAST_TIMEOUTS.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let ncps = Ncps::start(&args);
    let key = ncps.pubkey();
    let t = Instant::now();
    nix_copy_from(&ncps.url(), &[&fx.top], &key)
        .expect("fetch must succeed from the second (good) upstream");
    eprintln!("fetch with a broken first upstream took {:?}", t.elapsed());
    assert!(
        good.hits_where(|p| p.starts_with("/nar/")) >= 3,
        "NARs came from the good upstream"
    );
}

#[test]
fn refused_first_upstream_falls_back_to_the_next_one() {
    let Some(fx) = fixture_or_skip() else { return };
    let dead = format!("http://127.0.0.1:{}", free_port());
    fetch_with_broken_first_upstream(dead, fx);
}

#[test]
fn hanging_first_upstream_falls_back_to_the_next_one() {
    let Some(fx) = fixture_or_skip() else { return };
    let hanging = Upstream::for_cache(fx, Compression::Xz);
    hanging.set_mode(Mode::Hang);
    fetch_with_broken_first_upstream(hanging.url(), fx);
}

#[test]
fn first_upstream_answering_500_falls_back_to_the_next_one() {
    let Some(fx) = fixture_or_skip() else { return };
    let failing = Upstream::for_cache(fx, Compression::Xz);
    failing.set_mode(Mode::Status500);
    fetch_with_broken_first_upstream(failing.url(), fx);
}

// ---------------------------------------------------------------------------
// HTTPS upstreams (cache.nixos.org is one)
// ---------------------------------------------------------------------------

fn tls_front_or_skip(up: &Upstream) -> Option<TlsFront> {
    match TlsFront::new(up.port()) {
        Ok(f) => Some(f),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: no HTTPS test upstream ({e})");
            None
        }
        Err(e) => panic!("under CI the HTTPS test upstream must work: {e}"),
    }
}

#[test]
fn https_upstream_is_fetched_verified_and_its_certificate_checked() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let Some(front) = tls_front_or_skip(&up) else { return };
    let upstream_args = ["--upstream-cache", &front.url(), "--upstream-public-key", &fx.up1_public_key];

    // Trusting the front's CA (SSL_CERT_FILE, as for Go programs, curl and Nix): it works.
    let ca = front.ca_file().to_string_lossy().into_owned();
    let ncps = Ncps::start_with_env(&upstream_args, &[("SSL_CERT_FILE", &ca)]);
    nix_copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect("the closure through an HTTPS upstream");
    assert_eq!(ncps.wait_for_stored_nars(fx.top_closure.len()).len(), fx.top_closure.len());
    for f in ncps.stored_nar_files() {
        nar_file_matches_its_name(&f).unwrap_or_else(|e| panic!("over HTTPS: {e}"));
    }
    assert!(up.hits_where(|p| p.starts_with("/nar/")) >= 3, "the NARs came through the HTTPS front");
    assert!(ncps.log().contains("from SSL_CERT_FILE="), "start-up says which bundle it added");

    // Not trusting it (the system bundle only): nothing is fetched, and the log says why.
    up.reset_hits();
    let strict = Ncps::start_with_env(&upstream_args, &[("SSL_CERT_FILE", "")]);
    let r = strict.get(&format!("/{}.narinfo", store_hash(&fx.top)));
    assert_ne!(r.status, 200, "an upstream whose certificate no trusted CA issued: {}", r.text());
    assert_eq!(up.total_hits(), 0, "no request may pass an unverified TLS handshake");
    let log = strict.log();
    let said = log.lines().find(|l| l.contains(&front.url()) && l.to_lowercase().contains("certificate"));
    let said = said.unwrap_or_else(|| panic!("no log line names the upstream and its certificate problem:\n{log}"));
    eprintln!("untrusted HTTPS upstream: HTTP {}; the log says: {said}", r.status);
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

#[test]
fn configuration_from_environment_variables_only() {
    let Some(fx) = fixture_or_skip() else { return };
    let good = Upstream::for_cache(fx, Compression::Zstd);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let hostname = "env-configured.example.org";
    let env = |k: &str, v: String| (k.to_string(), v);
    let ncps = Ncps::start_raw(
        vec!["serve".to_string()],
        vec![
            env("CACHE_HOSTNAME", hostname.to_string()),
            env("CACHE_DATA_PATH", "{data}".to_string()),
            env("UPSTREAM_CACHES", format!("{dead},{}", good.url())),
            env(
                "UPSTREAM_PUBLIC_KEYS",
                format!("{},{}", fx.up2_public_key, fx.up1_public_key),
            ),
            env("SERVER_ADDR", "{addr}".to_string()),
            env("LOG_LEVEL", "debug".to_string()),
        ],
    );
    let key = ncps.pubkey();
    assert!(
        key.starts_with(&format!("{hostname}:")),
        "/pubkey must be named after CACHE_HOSTNAME, got {key:?}"
    );
    nix_copy_from(&ncps.url(), &[&fx.top], &key)
        .expect("fetch through ncps configured from the environment only");
}

/// The settings in a config file, as the Go ncps reads it: `--config`, `NCPS_CONFIG_FILE`,
/// or `$XDG_CONFIG_HOME/ncps/config.yaml`; TOML, YAML or JSON. The data path and the address
/// come as flags (the suite picks them), the rest from the file.
#[test]
fn configuration_from_a_config_file_in_each_format_and_each_place() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Zstd);
    let dir = TempDir::new("config-file");
    let (u, k1, k2) = (up.url(), &fx.up1_public_key, &fx.up2_public_key);
    let toml = format!("[cache]\nhostname = \"toml.example.org\"\n[cache.upstream]\nurls = [\"{u}\"]\npublic-keys = [\"{k1}\", \"{k2}\"]\n");
    let json = format!(r#"{{"cache": {{"hostname": "json.example.org", "upstream": {{"urls": ["{u}"], "public-keys": ["{k1}", "{k2}"]}}}}}}"#);
    let yaml = format!("cache:\n  hostname: yaml.example.org\n  upstream:\n    urls:\n      - {u}\n    public-keys:\n      - {k1}\n      - {k2}\n");
    fs::write(dir.join("ncps.toml"), toml).unwrap();
    fs::write(dir.join("ncps.json"), json).unwrap();
    fs::create_dir_all(dir.join("xdg/ncps")).unwrap();
    fs::write(dir.join("xdg/ncps/config.yaml"), yaml).unwrap();
    let base = ["serve", "--cache-data-path", "{data}", "--server-addr", "{addr}"].map(String::from).to_vec();
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let runs = [
        ("toml.example.org", [base.clone(), vec!["--config".into(), path("ncps.toml")]].concat(), vec![]),
        ("json.example.org", base.clone(), vec![("NCPS_CONFIG_FILE".to_string(), path("ncps.json"))]),
        ("yaml.example.org", base.clone(), vec![("XDG_CONFIG_HOME".to_string(), path("xdg"))]),
    ];
    for (hostname, args, envs) in runs {
        let ncps = Ncps::start_raw(args, envs);
        let key = ncps.pubkey();
        assert!(key.starts_with(&format!("{hostname}:")), "/pubkey {key:?}: the hostname comes from the file");
        if hostname.starts_with("yaml") {
            nix_copy_from(&ncps.url(), &[&fx.top], &key).expect("fetch through ncps configured by a file");
        }
    }
}

/// A mistake in the config file stops ncps with status 2 and one line naming the file and key.
#[test]
fn bad_config_file_key_or_value_exits_2_naming_the_file_and_the_key() {
    let dir = TempDir::new("bad-config-file");
    let file = dir.join("config.yaml");
    let shown = file.to_string_lossy().into_owned();
    let base = ["serve", "--config", &shown, "--cache-hostname=h", "--cache-data-path=/nonexistent", "--upstream-cache=http://127.0.0.1:9", "--server-addr={addr}"];
    for (text, key) in [("cache:\n  hostnaem: x\n", "cache.hostnaem"), ("cache:\n  max-size: lots\n", "cache.max-size")] {
        fs::write(&file, text).unwrap();
        assert_config_error(&base, &format!("{shown}: {key}: "));
    }
    // A file named explicitly must exist.
    let missing = dir.join("nope.toml").to_string_lossy().into_owned();
    let args = ["serve", "--config", &missing, "--cache-hostname=h", "--cache-data-path=/x", "--upstream-cache=http://127.0.0.1:9"];
    assert_config_error(&args, &format!("{missing}: cannot read it"));
}

/// Asserts ncps rejected its configuration: exit status 2 and exactly one
/// non-empty stderr line naming `flag` (and not a bind error: the listen
/// address is held by the test, so binding before validating would fail).
fn assert_config_error(args: &[&str], flag: &str) {
    let (code, stderr) = run_ncps_expecting_failure(args, &[]);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        code,
        Some(2),
        "exit status for bad {flag}; stderr:\n{stderr}"
    );
    assert_eq!(
        lines.len(),
        1,
        "want exactly one stderr line for bad {flag}, got:\n{stderr}"
    );
    assert!(
        lines[0].contains(flag),
        "stderr line must name {flag}: {:?}",
        lines[0]
    );
    let l = lines[0].to_ascii_lowercase();
    assert!(
        !l.contains("in use") && !l.contains("bind"),
        "ncps tried to bind before validating its configuration: {:?}",
        lines[0]
    );
}

#[test]
fn bad_config_missing_cache_hostname_exits_2() {
    let d = TempDir::new("badcfg");
    let data = d.path().to_string_lossy().into_owned();
    assert_config_error(
        &[
            "serve",
            "--cache-data-path",
            &data,
            "--upstream-cache",
            "http://127.0.0.1:9",
            "--upstream-public-key",
            SOME_VALID_PUBLIC_KEY,
            "--server-addr",
            "{addr}",
        ],
        "--cache-hostname",
    );
}

#[test]
fn bad_config_no_upstream_exits_2() {
    let d = TempDir::new("badcfg");
    let data = d.path().to_string_lossy().into_owned();
    assert_config_error(
        &[
            "serve",
            "--cache-hostname",
            HOSTNAME,
            "--cache-data-path",
            &data,
            "--upstream-public-key",
            SOME_VALID_PUBLIC_KEY,
            "--server-addr",
            "{addr}",
        ],
        "--upstream-cache",
    );
}

#[test]
fn bad_config_malformed_upstream_public_key_exits_2() {
    let d = TempDir::new("badcfg");
    let data = d.path().to_string_lossy().into_owned();
    for bad in [
        "no-colon-here",
        "up1.example.org-1:!!!not-base64!!!",
        "up1.example.org-1:AAAA", // valid base64, but 3 bytes instead of 32
    ] {
        assert_config_error(
            &[
                "serve",
                "--cache-hostname",
                HOSTNAME,
                "--cache-data-path",
                &data,
                "--upstream-cache",
                "http://127.0.0.1:9",
                "--upstream-public-key",
                bad,
                "--server-addr",
                "{addr}",
            ],
            "--upstream-public-key",
        );
    }
}

#[test]
fn bad_config_unparsable_upstream_url_exits_2() {
    let d = TempDir::new("badcfg");
    let data = d.path().to_string_lossy().into_owned();
    assert_config_error(
        &[
            "serve",
            "--cache-hostname",
            HOSTNAME,
            "--cache-data-path",
            &data,
            "--upstream-cache",
            "not a url",
            "--upstream-public-key",
            SOME_VALID_PUBLIC_KEY,
            "--server-addr",
            "{addr}",
        ],
        "--upstream-cache",
    );
}

#[test]
fn bad_config_unwritable_data_path_exits_2() {
    // A path below a regular file cannot be created, even by root.
    let d = TempDir::new("badcfg");
    fs::write(d.join("a-file"), "").unwrap();
    let data = d.join("a-file/data").to_string_lossy().into_owned();
    assert_config_error(
        &[
            "serve",
            "--cache-hostname",
            HOSTNAME,
            "--cache-data-path",
            &data,
            "--upstream-cache",
            "http://127.0.0.1:9",
            "--upstream-public-key",
            SOME_VALID_PUBLIC_KEY,
            "--server-addr",
            "{addr}",
        ],
        "--cache-data-path",
    );
}

#[test]
fn bad_config_unknown_schedule_timezone_exits_2() {
    let d = TempDir::new("badcfg");
    for bad in ["Nowhere/Atlantis", "../etc/passwd"] {
        let mut args = serve_args(&d.path().to_string_lossy());
        args.extend(["--cache-lru-schedule-timezone".to_string(), bad.to_string()]);
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        assert_config_error(&args, "--cache-lru-schedule-timezone");
    }
}

/// A data path with cached files, as Go ncps leaves it: `store/nar/<c>/<cc>/<name>`.
fn data_path_holding_a_cache() -> (TempDir, PathBuf) {
    let d = TempDir::new("switch");
    let name = "1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz";
    let nar = d.join("store/nar/1/1w").join(name);
    fs::create_dir_all(nar.parent().unwrap()).unwrap();
    fs::write(&nar, b"bytes ncps-rs did not write").unwrap();
    (d, nar)
}

fn serve_args(data: &str) -> Vec<String> {
    let args = ["serve", "--cache-hostname", HOSTNAME, "--cache-data-path", data];
    let more = ["--upstream-cache", "http://127.0.0.1:9", "--upstream-public-key", SOME_VALID_PUBLIC_KEY];
    args.iter().chain(&more).chain(&["--server-addr", "{addr}"]).map(|s| s.to_string()).collect()
}

#[test]
fn a_cache_without_its_database_is_refused_and_left_alone() {
    // Go ncps's files, or ours after db.sqlite was deleted: with no index to vouch for them the
    // start-up check would remove every one. ncps must stop and say so instead.
    let (d, nar) = data_path_holding_a_cache();
    let args = serve_args(&d.path().to_string_lossy());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    assert_config_error(&args, "--cache-database-url");
    assert!(nar.exists(), "the cached file must survive");
    assert!(!d.join("db.sqlite").exists(), "no database may be created, or the next start would wipe the cache");
}

#[test]
fn a_database_made_by_another_program_is_refused_and_left_alone() {
    let (d, nar) = data_path_holding_a_cache();
    let db = d.join("db.sqlite");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("CREATE TABLE schema_migrations (version TEXT); CREATE TABLE narinfos (hash TEXT);")
        .unwrap();
    drop(conn);
    let args = serve_args(&d.path().to_string_lossy());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    assert_config_error(&args, "--cache-database-url");
    assert!(nar.exists(), "the cached file must survive");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 0, "the other program's database must not be migrated");
}

// ---------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------

#[test]
fn healthz_is_200_while_the_store_takes_files_and_503_when_it_does_not() {
    let (_dir, _up, ncps) = ncps_with_empty_upstream(&[]);
    let r = ncps.get("/healthz");
    assert_eq!(r.status, 200, "{}", r.text());
    // The temp directory gone: new files cannot be written, so the cache is not usable.
    remove_tree(&ncps.data_dir().join("tmp")).unwrap();
    let r = ncps.get("/healthz");
    assert!(r.status >= 500, "healthz with no temp directory: {} {}", r.status, r.text());
    assert_eq!(ncps.get("/nix-cache-info").status, 200, "ncps itself keeps answering");
}

#[test]
fn each_request_is_logged_with_status_bytes_duration_hit_or_miss_and_upstream() {
    let Some(fx) = fixture_or_skip() else { return };
    let (up, ncps) = proxy_for(fx, Compression::Xz);
    let path = format!("/{}.narinfo", store_hash(&fx.top));
    assert_eq!(ncps.get(&path).status, 200);
    assert_eq!(ncps.get(&path).status, 200);
    // The log is written in batches (see src/logging.rs): give it a moment.
    let count = |log: &str| log.lines().filter(|l| l.contains(&format!("GET {path} "))).count();
    wait_until(Duration::from_secs(3), || count(&ncps.log()) >= 2);
    let log = ncps.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&format!("GET {path} "))).collect();
    assert_eq!(lines.len(), 2, "one line per request:\n{log}");
    // The miss is logged by its worker after the answer went out, so the hit that follows
    // may be logged first: look for each, not at an order.
    let miss = lines.iter().find(|l| l.contains("ms miss via ")).unwrap_or_else(|| panic!("no miss line: {lines:?}"));
    assert!(miss.contains(" 200 ") && miss.contains(&up.url()), "{miss}");
    let hit = lines.iter().find(|l| l.trim_end().ends_with("ms hit")).unwrap_or_else(|| panic!("no hit line: {lines:?}"));
    assert!(hit.contains(" 200 "), "{hit}");
    assert!(lines.iter().all(|l| l.contains(" INFO ") && l.contains("127.0.0.1 GET ")), "{lines:?}");
}

#[test]
fn unknown_paths_get_404() {
    let (_dir, _up, ncps) = ncps_with_empty_upstream(&[]);
    let unknown_hash = "0123456789abcdfghijklmnpqrsvwxyz";
    let unknown_nar = "1111111111111111111111111111111111111111111111111111";
    for path in [
        "/does-not-exist".to_string(),
        format!("/{unknown_hash}.narinfo"),
        format!("/nar/{unknown_nar}.nar.xz"),
        format!("/nar/{unknown_nar}.nar"),
        format!("/{unknown_hash}.ls"),
        "/log/0123456789abcdfghijklmnpqrsvwxyz-foo.drv".to_string(),
        "/realisations/sha256:1111111111111111111111111111111111111111111111111111!out.doi"
            .to_string(),
    ] {
        assert_eq!(ncps.get(&path).status, 404, "GET {path}");
    }
    assert_eq!(
        ncps.head(&format!("/{unknown_hash}.narinfo")).status,
        404,
        "HEAD unknown narinfo"
    );
}

#[test]
fn nix_cache_info_is_answered_by_ncps_itself() {
    let (_dir, _up, ncps) = ncps_with_empty_upstream(&[]);
    let r = ncps.get("/nix-cache-info");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"
    );
}

#[test]
fn pubkey_is_cache_hostname_colon_base64_of_32_bytes() {
    let (_dir, _up, ncps) = ncps_with_empty_upstream(&[]);
    let r = ncps.get("/pubkey");
    assert_eq!(r.status, 200);
    let body = r.text();
    assert!(
        body.ends_with('\n') && body.lines().count() == 1,
        "one line: {body:?}"
    );
    let (name, bytes) = parse_key(&body).unwrap_or_else(|| panic!("not name:base64: {body:?}"));
    assert_eq!(name, HOSTNAME, "key name must be the --cache-hostname");
    assert_eq!(
        bytes.len(),
        32,
        "an ed25519 public key is 32 bytes: {body:?}"
    );
}

#[test]
fn served_narinfo_points_to_nar_keeps_upstream_sig_and_adds_ncps_sig() {
    let Some(fx) = fixture_or_skip() else { return };
    let (_up, ncps) = proxy_for(fx, Compression::Xz);
    let key = ncps.pubkey();
    for path in &fx.top_closure {
        let upstream = NarInfo::parse(&fx.upstream_narinfo(Compression::Xz, path));
        let r = ncps.get(&format!("/{}.narinfo", store_hash(path)));
        assert_eq!(r.status, 200, "narinfo of {path}");
        let ct = r.header("content-type").unwrap_or("");
        assert!(ct.starts_with("text/x-nix-narinfo"), "Content-Type {ct:?}");
        let served = NarInfo::parse(&r.text());
        let url = served.get("URL").unwrap_or("");
        assert!(
            url.starts_with("nar/"),
            "URL must point to nar/...: {url:?}"
        );
        for f in ["StorePath", "NarHash", "NarSize", "References"] {
            assert_eq!(served.get(f), upstream.get(f), "{f} of {path}");
        }
        let sigs = served.sigs();
        let up_sig = &upstream.sigs()[0];
        assert!(
            sigs.contains(up_sig),
            "upstream Sig {up_sig} must be kept; got {sigs:?}"
        );
        let ours: Vec<&String> = sigs
            .iter()
            .filter(|s| s.starts_with(&format!("{HOSTNAME}:")))
            .collect();
        assert_eq!(
            ours.len(),
            1,
            "exactly one Sig from ncps's key; got {sigs:?}"
        );
        assert!(
            signature_verifies(&key, &served.fingerprint(), ours[0]),
            "ncps's Sig must verify against /pubkey over {:?}",
            served.fingerprint()
        );
        // The NAR the narinfo points at is served, with the announced size.
        let nar = ncps.get(&format!("/{url}"));
        assert_eq!(nar.status, 200, "GET /{url}");
        if let Some(size) = served.get("FileSize") {
            assert_eq!(nar.body.len().to_string(), size, "FileSize of /{url}");
        }
        assert_eq!(
            ncps.head(&format!("/{}.narinfo", store_hash(path))).status,
            200
        );
        let ct = nar.header("content-type").unwrap_or("");
        assert_eq!(ct, "application/x-nix-nar", "Content-Type of /{url}");
        let head = ncps.head(&format!("/{url}"));
        assert_eq!(head.status, 200, "HEAD /{url}");
        assert_eq!(head.header("content-length"), served.get("FileSize"), "HEAD /{url} Content-Length");
        assert!(head.body.is_empty(), "HEAD /{url} has no body");
    }
}

#[test]
fn go_ncps_alias_flags_a_given_key_file_and_explicit_database_and_temp_paths() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let elsewhere = TempDir::new("paths");
    let db = elsewhere.join("index.sqlite");
    let temp = elsewhere.join("tmp");
    let s = |v: &str| v.to_string();
    let ncps = Ncps::start_raw(
        vec![
            s("serve"),
            s("--cache-hostname"),
            s(HOSTNAME),
            s("--cache-storage-local"),
            s("{data}"),
            s("--cache-upstream-url"),
            up.url(),
            s("--cache-database-url"),
            format!("sqlite:{}", db.display()),
            s("--cache-temp-path"),
            temp.display().to_string(),
            s("--cache-secret-key-path"),
            fx.up1_secret_key_file.display().to_string(),
            s("--server-addr"),
            s("{addr}"),
        ],
        vec![(s("CACHE_UPSTREAM_PUBLIC_KEYS"), fx.up1_public_key.clone())],
    );
    assert_eq!(ncps.pubkey(), fx.up1_public_key, "/pubkey is the public half of --cache-secret-key-path");
    nix_copy_from(&ncps.url(), &[&fx.top], &fx.up1_public_key).expect("fetch through ncps");
    assert!(db.exists(), "the index is where --cache-database-url says");
    assert!(!ncps.data_dir().join("db.sqlite").exists(), "no second database in the data path");
    assert!(temp.is_dir(), "the temp directory is where --cache-temp-path says");
    assert!(!ncps.data_dir().join("secret-key").exists(), "no key is generated when one is given");
    assert_eq!(ncps.wait_for_stored_nars(fx.top_closure.len()).len(), fx.top_closure.len());
}

#[test]
fn with_signing_off_narinfos_keep_only_upstream_signatures() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Zstd);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--cache-sign-narinfo=false"]);
    let r = ncps.get(&format!("/{}.narinfo", store_hash(&fx.top)));
    assert_eq!(r.status, 200);
    let sigs = NarInfo::parse(&r.text()).sigs();
    assert!(sigs.iter().all(|s| !s.starts_with(&format!("{HOSTNAME}:"))), "no ncps Sig: {sigs:?}");
    assert!(!sigs.is_empty(), "the upstream's Sig is kept");
    nix_copy_from(&ncps.url(), &[&fx.top], &fx.up1_public_key).expect("trusting the upstream key works");
    let mut fresh = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--cache-sign-narinfo=false"]);
    assert!(
        nix_copy_from(&fresh.url(), &[&fx.top], &fresh.pubkey()).is_err(),
        "trusting only ncps's key must fail when ncps signs nothing"
    );
    fresh.stop();
}

// ---------------------------------------------------------------------------
// The status page after real traffic
// ---------------------------------------------------------------------------

#[test]
fn after_nix_copy_the_status_page_lists_each_miss_by_store_path_name_with_size_and_upstream() {
    let Some(fx) = fixture_or_skip() else { return };
    let (up, ncps) = proxy_for(fx, Compression::Xz);
    NixClient::Nix2_8.copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect("nix copy through ncps");
    let big = fx.big.rsplit('/').next().unwrap();
    let (hash, name) = big.split_at(32);
    let file_size: u64 = NarInfo::parse(&fx.upstream_narinfo(Compression::Xz, &fx.big))
        .get("FileSize")
        .and_then(|s| s.parse().ok())
        .expect("FileSize in the fixture's narinfo");
    // A download is listed when it has been verified, which may be just after Nix has its bytes.
    let deadline = Instant::now() + Duration::from_secs(20);
    let json = loop {
        let json = ncps.get("/").text();
        if json.contains(&format!(r#""what":"{big}","state":"fetched""#)) || Instant::now() > deadline {
            break json;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let upstream = up.url();
    assert!(
        json.contains(&format!(
            r#""what":"{big}","state":"fetched","sizeBytes":{file_size},"tookMs":"#
        )) && json.contains(&format!(r#""upstream":"{upstream}""#)),
        "the big NAR's miss, by store path name, with its size and upstream: {json}"
    );
    let page = http_request_with("GET", &format!("{}/", ncps.url()), &[("Accept", "text/html")]).unwrap().text();
    let misses = &page[page.find("Recent misses").expect("a Recent misses section")..];
    assert!(
        misses.contains(&format!("<span class=\"hash\">{}…</span><span class=\"name\">{name}</span>", &hash[..8])),
        "{misses}"
    );
    for path in &fx.top_closure {
        let base = path.rsplit('/').next().unwrap();
        assert!(misses.contains(&format!("title=\"{base}\"")), "{base} listed: {misses}");
    }
    assert!(misses.contains(&format!("<td class=\"mono\">{upstream}</td>")), "{misses}");
    assert!(!misses.contains("/nar/") && !misses.contains(".nar.xz"), "no bare NAR names: {misses}");
    // The charts have this minute's traffic (the newest of 288 columns, from x = 287):
    // fetched bytes, and the lookups' latency.
    for class in ["fetched", "p50", "p95"] {
        let d = page.split(&format!("<path class=\"{class}\" d=\"M0 ")).nth(1).unwrap_or("");
        assert!(d.split('"').next().unwrap_or("").contains("H287V"), "{class} bar in the newest column: {d:.200}");
    }
    // The upstream's latency is its narinfo lookups' time to the response head (loopback:
    // milliseconds), not the time of whole downloads.
    let row = &page[page.find(&format!("<td class=\"mono\">{upstream}</td><td>")).expect("upstream row")..];
    let latency = row.split("<td class=\"num\">").nth(1).unwrap_or("");
    assert!(latency.starts_with(|c: char| c.is_ascii_digit()) && latency.contains(" ms / "), "{row}");
    assert!(row.contains("/s</td>"), "throughput shown apart: {row}");
}

#[test]
#[cfg(not(feature = "s3"))]
fn a_build_without_s3_given_a_bucket_stops_with_one_line_naming_the_flag_and_the_feature() {
    let data = TempDir::new("no-s3");
    let data_path = data.path().to_string_lossy().into_owned();
    let args = [
        "serve", "--cache-hostname", "cache.test", "--cache-data-path", &data_path, "--server-addr", "{addr}",
        "--upstream-cache", "http://127.0.0.1:9", "--cache-storage-s3-bucket", "nars",
    ];
    let (code, stderr) = run_ncps_expecting_failure(&args, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    let line = stderr.trim();
    assert!(!line.contains('\n') && line.contains("--cache-storage-s3-bucket") && line.contains("--features s3"), "{stderr}");
}
