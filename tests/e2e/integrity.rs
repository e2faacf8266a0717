//! End-to-end specification of what ncps refuses to pass on or keep: narinfos
//! without a trusted signature, NARs whose bytes do not match their narinfo,
//! truncated or reset transfers, and what a crash leaves behind; and how its
//! HTTP front copes with broken upstreams, hostile requests and idle clients.
//!
//! Tests that need Nix skip (with a message) only when `nix` is not installed
//! and `CI` is unset; under CI a missing `nix` fails them.
//!
//! Run: `cargo test --test e2e integrity::` (add `-- --nocapture` for timings).

use crate::support::*;
use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Upstream timeouts short enough that a silent upstream is given up quickly.
const SHORT_TIMEOUTS: &[&str] = &[
    "--upstream-dialer-timeout",
    "1s",
    "--upstream-response-header-timeout",
    "1s",
    "--upstream-body-idle-timeout",
    "2s",
];

fn assert_nothing_stored(ncps: &Ncps, what: &str) {
    let narinfos = ncps.stored_narinfo_files();
    let nars = ncps.stored_nar_files();
    assert!(
        narinfos.is_empty() && nars.is_empty(),
        "{what}: ncps must keep nothing, but stored narinfos {narinfos:?} and NARs {nars:?}"
    );
}

/// Every stored NAR file holds exactly the bytes its name (the FileHash) promises.
fn assert_only_verified_nars_stored(ncps: &Ncps) {
    for f in ncps.stored_nar_files() {
        if let Err(e) = nar_file_matches_its_name(&f) {
            panic!("ncps stored unverified bytes: {e}");
        }
    }
}

fn nix_cache_info_is_quick(ncps: &Ncps, when: &str) {
    let t = Instant::now();
    let r = raw_request(ncps.addr, &get_request("/nix-cache-info"), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("GET /nix-cache-info {when}: {e}"));
    let took = t.elapsed();
    assert_eq!(r.status, 200, "GET /nix-cache-info {when}");
    assert!(
        took < Duration::from_secs(1),
        "GET /nix-cache-info {when} took {took:?}"
    );
}

// ---------------------------------------------------------------------------
// Signatures
// ---------------------------------------------------------------------------

#[test]
fn harness_resigned_cache_copy_is_signed_by_up2_only_and_nix_accepts_it_with_up2() {
    let Some(fx) = fixture_or_skip() else { return };
    let copy = resigned_cache_copy(fx, Compression::Xz, &fx.dir.join("keys/up2.sec"));
    for path in &fx.top_closure {
        let p = copy.join(format!("{}.narinfo", store_hash(path)));
        let ni = NarInfo::parse(&fs::read_to_string(&p).unwrap());
        let sigs = ni.sigs();
        assert_eq!(sigs.len(), 1, "{sigs:?}");
        assert!(signature_verifies(&fx.up2_public_key, &ni.fingerprint(), &sigs[0]));
        assert!(!signature_verifies(&fx.up1_public_key, &ni.fingerprint(), &sigs[0]));
    }
    let up = Upstream::serve_dir(copy.path());
    nix_copy_from(&up.url(), &[&fx.top], &fx.up2_public_key)
        .expect("nix copy straight from the re-signed copy, trusting up2");
}

#[test]
fn narinfo_signed_only_by_an_untrusted_key_is_not_found_and_nothing_is_stored() {
    untrusted_narinfo_is_not_found_by(NixClient::Nix2_8);
}

#[test]
fn nix_2_26_finds_no_narinfo_signed_only_by_an_untrusted_key_and_nothing_is_stored() {
    untrusted_narinfo_is_not_found_by(NixClient::Nix2_26);
}

fn untrusted_narinfo_is_not_found_by(client: NixClient) {
    let Some(fx) = fixture_or_skip() else { return };
    if client.must_skip() {
        return;
    }
    let copy = resigned_cache_copy(fx, Compression::Xz, &fx.dir.join("keys/up2.sec"));
    let decoy = Upstream::serve_dir(copy.path());
    let ncps = Ncps::for_upstreams(&[decoy.url()], &fx.up1_public_key);
    let key = ncps.pubkey();

    for path in &fx.top_closure {
        let r = ncps.get(&format!("/{}.narinfo", store_hash(path)));
        assert_eq!(r.status, 404, "narinfo of {path} signed by up2 only, ncps trusts up1");
    }
    let err = client
        .copy_from(&ncps.url(), &[&fx.top], &key)
        .expect_err("nix copy through ncps must fail: no trusted signature upstream");
    eprintln!("nix copy of a path no upstream vouches for failed as expected:\n{err}");
    assert!(
        !err.contains("signature") && !err.contains("hash mismatch"),
        "the failure must be a clean 'not there', got:\n{err}"
    );
    assert!(
        ["no substituter", "does not exist", "is not valid"]
            .iter()
            .any(|m| err.contains(m)),
        "nix must report the path as unavailable, got:\n{err}"
    );
    assert_eq!(
        decoy.hits_where(|p| p.starts_with("/nar/")),
        0,
        "no NAR may be fetched for an untrusted narinfo"
    );
    assert_nothing_stored(&ncps, "untrusted narinfo");
}

#[test]
fn untrusted_first_upstream_is_skipped_for_a_good_second_one() {
    let Some(fx) = fixture_or_skip() else { return };
    let copy = resigned_cache_copy(fx, Compression::Xz, &fx.dir.join("keys/up2.sec"));
    let decoy = Upstream::serve_dir(copy.path());
    let good = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams(&[decoy.url(), good.url()], &fx.up1_public_key);
    let key = ncps.pubkey();
    nix_copy_from(&ncps.url(), &[&fx.top], &key)
        .expect("fetch through ncps: the second upstream's narinfos are signed by up1");
    assert!(decoy.hits_where(|p| p.ends_with(".narinfo")) >= 1, "the decoy was asked first");
    assert_eq!(decoy.hits_where(|p| p.starts_with("/nar/")), 0);
    for path in &fx.top_closure {
        let served = NarInfo::parse(&ncps.get(&format!("/{}.narinfo", store_hash(path))).text());
        let up1_sig = &NarInfo::parse(&fx.upstream_narinfo(Compression::Xz, path)).sigs()[0];
        assert!(served.sigs().contains(up1_sig), "{path}: {:?}", served.sigs());
        assert!(
            !served.sigs().iter().any(|s| s.starts_with("up2.example.org-1:")),
            "the decoy's signature must not be served: {:?}",
            served.sigs()
        );
    }
    assert_only_verified_nars_stored(&ncps);
}

#[test]
fn without_upstream_keys_narinfos_are_passed_on_without_ncps_signature() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Zstd);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[], &[]);
    for path in &fx.top_closure {
        let upstream = NarInfo::parse(&fx.upstream_narinfo(Compression::Zstd, path));
        let r = ncps.get(&format!("/{}.narinfo", store_hash(path)));
        assert_eq!(r.status, 200, "narinfo of {path}");
        let served = NarInfo::parse(&r.text());
        assert_eq!(
            served.sigs(),
            upstream.sigs(),
            "{path}: only the upstream's Sig, none from {HOSTNAME}"
        );
        assert!(!served.sigs().iter().any(|s| s.starts_with(&format!("{HOSTNAME}:"))));
    }
    nix_copy_from(&ncps.url(), &[&fx.top], &fx.up1_public_key)
        .expect("fetch through an ncps without upstream keys, trusting the upstream's key");
    assert_only_verified_nars_stored(&ncps);
}

// ---------------------------------------------------------------------------
// NAR bytes that do not match the narinfo
// ---------------------------------------------------------------------------

#[test]
fn corrupted_nars_are_never_kept_and_a_later_fetch_from_a_healed_upstream_succeeds() {
    corrupted_nars_fail_then_heal_for(NixClient::Nix2_8);
}

#[test]
fn nix_2_26_is_refused_corrupted_nars_none_is_kept_and_a_later_fetch_from_a_healed_upstream_succeeds() {
    corrupted_nars_fail_then_heal_for(NixClient::Nix2_26);
}

fn corrupted_nars_fail_then_heal_for(client: NixClient) {
    let Some(fx) = fixture_or_skip() else { return };
    if client.must_skip() {
        return;
    }
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode_for(Mode::CorruptByte, Target::Nar);
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let key = ncps.pubkey();

    let err = client
        .copy_from(&ncps.url(), &[&fx.top], &key)
        .expect_err("every NAR is corrupted upstream: nix copy through ncps must fail");
    eprintln!("{}: nix copy with a corrupting upstream failed as expected:\n{err}", client.label());
    assert!(!err.contains("signature"), "not a signature problem: {err}");
    // The NAR of `big` through a raw client: never a complete-looking body.
    let (nar, size) = ncps_nar_path(&ncps, &fx.big);
    let r = raw_request(ncps.addr, &get_request(&nar), Duration::from_secs(20)).unwrap();
    assert!(
        !r.looks_complete(),
        "a corrupted NAR must not reach the client as a complete response: status {}, {} of {size} bytes, {:?}",
        r.status,
        r.body.len(),
        r.end
    );
    assert!(
        wait_until(Duration::from_secs(3), || ncps.partial_files().is_empty()),
        "temp files of failed downloads remain: {:?}",
        ncps.partial_files()
    );
    let nars = ncps.stored_nar_files();
    assert!(nars.is_empty(), "corrupted NARs were stored: {nars:?}");

    up.set_mode(Mode::Normal);
    client
        .copy_from(&ncps.url(), &[&fx.top], &key)
        .expect("after the upstream heals, the same ncps must fetch and serve the closure");
    assert_eq!(ncps.wait_for_stored_nars(fx.top_closure.len()).len(), fx.top_closure.len());
    assert_only_verified_nars_stored(&ncps);
}

#[test]
fn corrupting_first_upstream_then_good_second_a_retry_succeeds_with_only_verified_bytes() {
    let Some(fx) = fixture_or_skip() else { return };
    let bad = Upstream::for_cache(fx, Compression::Xz);
    bad.set_mode_for(Mode::CorruptByte, Target::Nar);
    let good = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams(&[bad.url(), good.url()], &fx.up1_public_key);
    let key = ncps.pubkey();

    // A client streaming a NAR from the corrupting upstream through ncps
    // fails (ncps aborts the transfer), and Nix does not retry a NAR whose
    // bytes it already started unpacking. But each upstream URL is tried only
    // until it fails once: every later request for that NAR goes to the good
    // upstream first. So a client needs at most one failed attempt per NAR.
    let max_failures = fx.top_closure.len();
    let mut failures = Vec::new();
    loop {
        match nix_copy_from(&ncps.url(), &[&fx.top], &key) {
            Ok(()) => break,
            Err(e) => {
                eprintln!("attempt {} failed:\n{e}", failures.len() + 1);
                failures.push(e);
                assert!(
                    failures.len() <= max_failures,
                    "{} failed attempts for a closure of {max_failures} NARs; the last:\n{}",
                    failures.len(),
                    failures.last().unwrap()
                );
            }
        }
    }
    eprintln!("succeeded after {} failed attempt(s)", failures.len());
    for path in &fx.top_closure {
        let p = upstream_nar_path(fx, Compression::Xz, path);
        assert!(
            bad.hits(&p) <= 1,
            "the corrupting upstream was asked {} times for the NAR of {path}: a URL that failed \
             must go last",
            bad.hits(&p)
        );
    }
    assert!(bad.hits_where(|p| p.starts_with("/nar/")) >= 1, "the corrupting upstream was tried");
    assert!(good.hits_where(|p| p.starts_with("/nar/")) >= 1, "the good upstream delivered");
    let nars = ncps.wait_for_stored_nars(fx.top_closure.len());
    assert_eq!(nars.len(), fx.top_closure.len(), "{nars:?}");
    assert_only_verified_nars_stored(&ncps);
    // And what is stored is exactly the fixture's files.
    for path in &fx.top_closure {
        let want = fx.cache_dir(Compression::Xz).join(upstream_nar_path(fx, Compression::Xz, path).trim_start_matches('/'));
        let name = want.file_name().unwrap().to_owned();
        let got = nars.iter().find(|p| p.file_name() == Some(&name));
        let got = got.unwrap_or_else(|| panic!("{path}: no stored NAR named {name:?}"));
        assert!(fs::read(got).unwrap() == fs::read(&want).unwrap(), "{}", got.display());
    }
}

// ---------------------------------------------------------------------------
// Transfers that break half way
// ---------------------------------------------------------------------------

fn broken_transfer_never_looks_complete(mode: Mode) {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode_for(mode, Target::Nar);
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let (nar, size) = ncps_nar_path(&ncps, &fx.big);

    let r = raw_request(ncps.addr, &get_request(&nar), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("GET {nar}: {e}"));
    eprintln!(
        "{mode:?}: status {}, Content-Length {:?}, {} body bytes, end {:?}",
        r.status,
        r.content_length(),
        r.body.len(),
        r.end
    );
    assert!(
        !r.looks_complete(),
        "{mode:?} upstream: the client got a complete-looking response ({} of {size} bytes, {:?})",
        r.body.len(),
        r.end
    );
    assert!(
        (r.body.len() as u64) < size,
        "{mode:?}: the client got all {size} bytes of a NAR that was never verified"
    );
    if r.status == 200 {
        assert!(
            matches!(r.end, BodyEnd::Eof | BodyEnd::Reset),
            "{mode:?}: the connection must end (not hang): {:?}",
            r.end
        );
    }
    let asked = up.ranges_asked(&upstream_nar_path(fx, Compression::Xz, &fx.big));
    assert!(
        asked.len() == 2 && asked[0].is_none() && asked[1].is_some(),
        "one upstream request for the NAR, and one (breaking off too) for its rest: {asked:?}"
    );
    assert!(
        wait_until(Duration::from_secs(3), || ncps.partial_files().is_empty()),
        "temp files remain after a failed download: {:?}",
        ncps.partial_files()
    );
    assert!(ncps.stored_nar_files().is_empty(), "{:?}", ncps.stored_nar_files());

    // The real Nix client, with every NAR (small ones too) broken the same way: a clean
    // failure, within its own retries, and still nothing kept.
    nix_fails_cleanly_then_succeeds_once_healed(&ncps, &up, &format!("{mode:?} upstream"));

    // Healed: the same request now gets every byte, verified.
    let h = raw_get_hashed(ncps.addr, &nar, Duration::from_secs(20)).unwrap();
    assert_eq!((h.status, h.len, h.end.clone()), (200, size, BodyEnd::Eof));
    let name = nar.rsplit('/').next().unwrap();
    assert_eq!(nix32(&h.sha256), name.split('.').next().unwrap());
    assert_only_verified_nars_stored(&ncps);
}

/// `nix copy` of the fixture's closure through `ncps` while `up` misbehaves: it must fail
/// (not hang, not report a signature problem), leave no file and no temp file in ncps's
/// store; then, with `up` healed, the same ncps must deliver the closure, verified.
fn nix_fails_cleanly_then_succeeds_once_healed(ncps: &Ncps, up: &Upstream, what: &str) {
    let fx = fixture();
    let key = ncps.pubkey();
    let t = Instant::now();
    let err = nix_copy_from_timeout(&ncps.url(), &[&fx.top], &key, Duration::from_secs(120))
        .expect_err(&format!("{what}: nix copy through ncps must fail"));
    eprintln!("{what}: nix copy failed after {:?}, as expected:\n{err}", t.elapsed());
    assert!(err.starts_with("nix copy --from"), "{what}: nix copy must end by itself: {err}");
    assert!(!err.contains("signature"), "{what}: not a signature problem: {err}");
    assert!(
        wait_until(Duration::from_secs(5), || ncps.partial_files().is_empty()),
        "{what}: temp files remain after nix copy failed: {:?}",
        ncps.partial_files()
    );
    assert!(ncps.stored_nar_files().is_empty(), "{what}: {:?}", ncps.stored_nar_files());
    nix_cache_info_is_quick(ncps, &format!("after nix copy failed against a {what}"));

    up.set_mode(Mode::Normal);
    // Failing transfers may have marked it down: healed, it is back once a probe answers.
    ncps.wait_for_upstreams_up(Duration::from_secs(70));
    nix_copy_from(&ncps.url(), &[&fx.top], &key)
        .unwrap_or_else(|e| panic!("{what}, healed: nix copy through the same ncps must succeed: {e}"));
    assert_eq!(ncps.wait_for_stored_nars(fx.top_closure.len()).len(), fx.top_closure.len(), "{what}, healed");
    assert_only_verified_nars_stored(ncps);
}

#[test]
fn upstream_reset_mid_nar_never_reaches_the_client_as_a_complete_response() {
    broken_transfer_never_looks_complete(Mode::ResetMidBody);
}

#[test]
fn upstream_clean_close_mid_nar_never_reaches_the_client_as_a_complete_response() {
    broken_transfer_never_looks_complete(Mode::CloseMidBody);
}

// ---------------------------------------------------------------------------
// Upstreams that fail, hang or crawl
// ---------------------------------------------------------------------------

#[test]
fn upstream_answering_500_gives_clean_502s_and_ncps_stays_responsive() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode(Mode::Status500);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], SHORT_TIMEOUTS);
    for path in &fx.top_closure {
        let t = Instant::now();
        let r = ncps.get(&format!("/{}.narinfo", store_hash(path)));
        assert_eq!(r.status, 502, "narinfo of {path} while the upstream answers 500: not a 404 Nix would remember");
        assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    }
    nix_cache_info_is_quick(&ncps, "with an upstream answering 500");
    let err = nix_copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey())
        .expect_err("nothing can be fetched from an upstream answering 500");
    assert!(!err.contains("signature"), "{err}");
    nix_cache_info_is_quick(&ncps, "after the failed copy");
    assert_nothing_stored(&ncps, "upstream answering 500");
    // A failure is not remembered as "missing": once healed (and probed back), it is found.
    up.set_mode(Mode::Normal);
    ncps.wait_for_upstreams_up(Duration::from_secs(70));
    assert_eq!(ncps.get(&format!("/{}.narinfo", store_hash(&fx.top))).status, 200);
}

#[test]
fn hanging_upstream_gives_clean_failures_within_the_timeouts_and_ncps_stays_responsive() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode(Mode::Hang);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &[SHORT_TIMEOUTS, &["--prometheus-enabled"]].concat());

    // Narinfo: a 504 (not a 404) once the response-header timeout passes.
    let addr = ncps.addr;
    let narinfo = format!("/{}.narinfo", store_hash(&fx.top));
    let pending = {
        let narinfo = narinfo.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = raw_request(addr, &get_request(&narinfo), Duration::from_secs(30));
            (r, t.elapsed())
        })
    };
    assert!(wait_until(Duration::from_secs(3), || up.hits(&narinfo) >= 1));
    nix_cache_info_is_quick(&ncps, "while a narinfo request waits on a hanging upstream");
    let (r, took) = pending.join().unwrap();
    let r = r.expect("narinfo request");
    assert_eq!(r.status, 504, "narinfo from a hanging upstream");
    assert!(took < Duration::from_secs(8), "narinfo took {took:?} with 1s timeouts");
    nix_cache_info_is_quick(&ncps, "after a hanging upstream timed out");

    // NAR: narinfo answered, the NAR request hangs: the client's transfer fails.
    up.set_mode_for(Mode::Hang, Target::Nar);
    let (nar, _) = ncps_nar_path(&ncps, &fx.lib);
    let t = Instant::now();
    let r = raw_request(ncps.addr, &get_request(&nar), Duration::from_secs(30)).unwrap();
    let took = t.elapsed();
    eprintln!(
        "NAR from a hanging upstream: status {} after {took:?}, {} bytes, {:?}",
        r.status,
        r.body.len(),
        r.end
    );
    assert_eq!(r.status, 504, "no byte came: a clear Gateway Timeout, not a 200 cut off at byte 0");
    assert!(r.text().starts_with("Gateway Timeout: no upstream could answer"), "the 504 says why: {}", r.text());
    // The request is logged just after its answer is sent, and the reason just before.
    let logged = |log: &str| log.lines().find(|l| l.contains(&format!("GET {nar} 504 "))).map(String::from);
    assert!(wait_until(Duration::from_secs(2), || logged(&ncps.log()).is_some()), "no request log line for the 504");
    let line = logged(&ncps.log()).unwrap();
    eprintln!("request log: {line}");
    let reason = r.text().trim().trim_start_matches("Gateway Timeout: ").to_string();
    assert!(ncps.log().lines().any(|l| l.ends_with(&reason)), "a log line says why: {reason}\n{}", ncps.log());
    let metrics = ncps.get("/metrics").text();
    assert!(
        metrics.contains(r#"ncps_cache_requests_total{kind="nar",result="error",code="504"} 1"#)
            && !metrics.contains(r#"ncps_cache_requests_total{kind="nar",result="miss",code="200"}"#),
        "the 504 is counted as what was sent, not as the 200 it was meant to be:\n{metrics}"
    );
    assert_ne!(r.end, BodyEnd::TimedOut, "ncps must end the response, not leave it hanging");
    assert!(took < Duration::from_secs(10), "NAR failure took {took:?} with 1s/2s timeouts");
    nix_cache_info_is_quick(&ncps, "after a NAR download from a hanging upstream failed");
    assert!(ncps.stored_nar_files().is_empty());
    assert!(wait_until(Duration::from_secs(3), || ncps.partial_files().is_empty()));

    nix_fails_cleanly_then_succeeds_once_healed(&ncps, &up, "upstream hanging on NARs");
}

#[test]
fn slow_upstream_fetch_succeeds_and_verifies() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode_for(Mode::Slow(2_000_000), Target::Nar);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], SHORT_TIMEOUTS);
    let t = Instant::now();
    nix_copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey())
        .expect("a slow (2 MB/s) but steady upstream must work, whatever the idle timeout");
    eprintln!("slow fetch took {:?}", t.elapsed());
    assert!(t.elapsed() > Duration::from_secs(2), "the upstream was not slow?");
    assert_eq!(ncps.wait_for_stored_nars(fx.top_closure.len()).len(), fx.top_closure.len());
    assert_only_verified_nars_stored(&ncps);
}

#[test]
fn upstream_stalling_mid_nar_is_given_up_after_the_body_idle_timeout_and_the_next_upstream_serves_the_rest() {
    let Some(fx) = fixture_or_skip() else { return };
    let stalling = Upstream::for_cache(fx, Compression::Xz);
    stalling.set_mode_for(Mode::StallMidBody, Target::Nar);
    let good = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams_with(&[stalling.url(), good.url()], &[&fx.up1_public_key], SHORT_TIMEOUTS);
    let (nar, size) = ncps_nar_path(&ncps, &fx.big);

    // The body stalls, its rest (asked of the same upstream) stalls too, and the good
    // upstream sends the rest: the client waits twice the 2 s idle timeout, and never notices.
    let t = Instant::now();
    let h = raw_get_hashed(ncps.addr, &nar, Duration::from_secs(30)).unwrap_or_else(|e| panic!("GET {nar}: {e}"));
    let took = t.elapsed();
    assert_eq!((h.status, h.len, h.end.clone()), (200, size, BodyEnd::Eof), "after {took:?}");
    assert!(took < Duration::from_secs(10), "two 2 s body-idle timeouts, then the rest: took {took:?}");
    let big = upstream_nar_path(fx, Compression::Xz, &fx.big);
    let rest = good.ranges_asked(&big);
    assert!(rest.len() == 1 && rest[0].is_some(), "the good upstream sent the rest only: {rest:?}");
    assert!(ncps.log().contains("timed out") || ncps.log().contains("timeout"), "a log line says why");

    // The stalled upstream is now tried last: Nix gets the closure.
    nix_copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect("the closure, through the good upstream");
    assert_only_verified_nars_stored(&ncps);
}

#[test]
fn upstream_answering_with_content_encoding_zstd_is_decoded_before_hashing() {
    let Some(fx) = fixture_or_skip() else { return };
    for c in [Compression::Xz, Compression::None] {
        let up = Upstream::for_cache(fx, c);
        up.set_mode(Mode::ZstdEncoded);
        let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
        nix_copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey())
            .unwrap_or_else(|e| panic!("{c:?} cache behind Content-Encoding: zstd: {e}"));
        assert_eq!(ncps.wait_for_stored_nars(fx.top_closure.len()).len(), fx.top_closure.len(), "{c:?}");
        assert_only_verified_nars_stored(&ncps);
    }
}

#[test]
fn uncompressed_nar_is_checked_against_the_signed_nar_hash_not_the_unsigned_file_hash() {
    // FileHash, FileSize and URL are outside the signed fingerprint. A narinfo for `top` that
    // keeps its valid signature but points them at `lib`'s NAR must not get `lib`'s bytes
    // stored and re-signed as `top`.
    let Some(fx) = fixture_or_skip() else { return };
    let forged = resigned_cache_copy(fx, Compression::None, &fx.up1_secret_key_file);
    let top_path = forged.join(format!("{}.narinfo", store_hash(&fx.top)));
    let lib = NarInfo::parse(&fs::read_to_string(forged.join(format!("{}.narinfo", store_hash(&fx.lib)))).unwrap());
    let top = fs::read_to_string(&top_path).unwrap();
    let swapped: String = top
        .lines()
        .map(|l| match l.split_once(": ").map(|(k, _)| k) {
            Some(k @ ("URL" | "FileHash" | "FileSize")) => format!("{k}: {}\n", lib.get(k).unwrap()),
            _ => format!("{l}\n"),
        })
        .collect();
    assert_ne!(swapped, top);
    fs::write(&top_path, &swapped).unwrap();
    let up = Upstream::serve_dir(forged.path());
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);

    let r = ncps.get(&format!("/{}.narinfo", store_hash(&fx.top)));
    assert_eq!(r.status, 404, "a narinfo whose FileHash contradicts its signed NarHash: {}", r.text());
    assert!(ncps.log().contains("FileHash/FileSize differ from NarHash/NarSize"), "a log line says why");
    assert_nothing_stored(&ncps, "forged FileHash");
    let err = nix_copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey())
        .expect_err("Nix cannot get a path whose only narinfo is forged");
    assert!(err.contains("nix copy --from") && !err.contains("hash mismatch"), "a clean failure: {err}");
    assert_only_verified_nars_stored(&ncps);
}

/// A validly signed narinfo for OTHER whose (unsigned) `URL` names SMALL's NAR file: ncps
/// keeps OTHER's NAR under a name made from OTHER's own FileHash, so SMALL's index row and
/// verified file stay as they are; OTHER's NAR fails its check and nothing is kept.
/// After a crash and the start-up check, SMALL is still served from the store.
fn a_narinfo_whose_url_names_another_paths_nar_never_touches_that_nar(client: NixClient) {
    let Some(fx) = fixture_or_skip() else { return };
    if client.must_skip() {
        return;
    }
    let (small, other) = (&fx.many[0], &fx.many[1]);
    let forged = resigned_cache_copy(fx, Compression::Xz, &fx.up1_secret_key_file);
    let small_url = upstream_nar_path(fx, Compression::Xz, small);
    let other_path = forged.join(format!("{}.narinfo", store_hash(other)));
    let text: String = fs::read_to_string(&other_path)
        .unwrap()
        .lines()
        .map(|l| if l.starts_with("URL:") { format!("URL: {}\n", &small_url[1..]) } else { format!("{l}\n") })
        .collect();
    fs::write(&other_path, text).unwrap();
    // Without OTHER's own NAR file, so that fetching OTHER's NAR by its name finds nothing.
    fs::remove_file(forged.join(&upstream_nar_path(fx, Compression::Xz, other)[1..])).unwrap();
    let up = Upstream::serve_dir(forged.path());
    let mut ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let key = ncps.pubkey();

    client.copy_from(&ncps.url(), &[small], &key).unwrap_or_else(|e| panic!("{}: SMALL: {e}", client.label()));
    let (small_nar, _) = ncps_nar_path(&ncps, small);
    let stored_small = ncps.wait_for_stored_nars(1);
    // OTHER's narinfo is validly signed, so it is served; its NAR has a name of its own.
    let (other_nar, _) = ncps_nar_path(&ncps, other);
    assert_ne!(other_nar, small_nar, "the URL must not choose the stored name");
    let other_hash = NarInfo::parse(&fx.upstream_narinfo(Compression::Xz, other)).get("FileHash").unwrap().to_string();
    assert!(other_nar.contains(other_hash.trim_start_matches("sha256:")), "{other_nar} is named after OTHER's FileHash");
    let r = ncps.get(&other_nar);
    // SMALL's bytes fail OTHER's check, and no upstream has OTHER's NAR by its name.
    assert!(matches!(r.status, 404 | 502), "OTHER's NAR is not served: {} {}", r.status, r.text());
    client
        .copy_from(&ncps.url(), &[other], &key)
        .expect_err("OTHER cannot be substituted with SMALL's bytes");

    let check_small = |ncps: &Ncps, when: &str| {
        assert_eq!(ncps.stored_nar_files(), stored_small, "{when}: only SMALL's verified NAR is stored");
        assert_only_verified_nars_stored(ncps);
        up.reset_hits();
        client.copy_from(&ncps.url(), &[small], &key).unwrap_or_else(|e| panic!("{when}: SMALL: {e}"));
        assert_eq!(up.hits(&small_url), 0, "{when}: SMALL's NAR comes from the store");
        let r = ncps.get(&small_nar);
        assert_eq!(r.status, 200, "{when}: SMALL's NAR is served");
    };
    check_small(&ncps, "before a restart");
    // A crash, so the start-up check compares the store with the index.
    ncps.kill9();
    let offset = ncps.log_len();
    ncps.restart();
    ncps.wait_for_log(offset, "start-up check: done", Duration::from_secs(20));
    check_small(&ncps, "after a restart");
}

#[test]
fn a_signed_narinfo_whose_url_names_another_paths_nar_leaves_that_nar_intact_across_a_restart() {
    a_narinfo_whose_url_names_another_paths_nar_never_touches_that_nar(NixClient::Nix2_8);
}

#[test]
fn nix_2_26_a_signed_narinfo_whose_url_names_another_paths_nar_leaves_that_nar_intact_across_a_restart() {
    a_narinfo_whose_url_names_another_paths_nar_never_touches_that_nar(NixClient::Nix2_26);
}

// ---------------------------------------------------------------------------
// Crashes and the start-up check
// ---------------------------------------------------------------------------

#[test]
fn sigkill_during_a_download_leaves_nothing_partial_after_restart() {
    let Some(fx) = fixture_or_skip() else { return };
    let mut up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode_for(Mode::Slow(1_000_000), Target::Nar);
    let mut ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let (nar, size) = ncps_nar_path(&ncps, &fx.big);

    let addr = ncps.addr;
    let client = {
        let nar = nar.clone();
        std::thread::spawn(move || raw_request(addr, &get_request(&nar), Duration::from_secs(30)))
    };
    // Kill once the download is well under way.
    assert!(
        wait_until(Duration::from_secs(10), || {
            up.bytes_sent(&upstream_nar_path(fx, Compression::Xz, &fx.big)) >= 1_000_000
        }),
        "the download did not start"
    );
    let partial = ncps.partial_files();
    assert!(!partial.is_empty(), "expected a *.ncps-partial temp file mid-download");
    ncps.kill9();
    let r = client.join().unwrap().expect("client response head");
    assert!(
        (r.body.len() as u64) < size && !r.looks_complete(),
        "the client of a killed ncps got a complete-looking NAR: {} of {size} bytes, {:?}",
        r.body.len(),
        r.end
    );
    assert!(!ncps.partial_files().is_empty(), "the kill should have left the temp file behind");

    // Restart with the upstream down.
    up.stop();
    let offset = ncps.log_len();
    ncps.restart();
    let log = ncps.log_since(offset);
    let partial = ncps.partial_files();
    assert!(partial.is_empty(), "temp files survived the start-up check: {partial:?}");
    let check: Vec<&str> = log.lines().filter(|l| l.contains("start-up check")).collect();
    assert!(!check.is_empty(), "no 'start-up check' line in the log:\n{log}");
    eprintln!("after SIGKILL and restart: {check:?}");
    assert!(
        check.iter().any(|l| l.contains("temp")),
        "the start-up check must say it removed the temp file: {check:?}"
    );
    assert!(ncps.stored_nar_files().is_empty(), "{:?}", ncps.stored_nar_files());
    let r = raw_request(ncps.addr, &get_request(&nar), Duration::from_secs(20)).unwrap();
    assert!(
        r.status == 404 || (r.status == 200 && !r.looks_complete()) || r.status >= 500,
        "with the upstream down the NAR must be missing, never partial: status {}, {} of {size} bytes, {:?}",
        r.status,
        r.body.len(),
        r.end
    );
    assert!((r.body.len() as u64) < size || r.status != 200);

    // Upstream back: the fetch succeeds and verifies.
    up.restart();
    up.set_mode(Mode::Normal);
    nix_copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey())
        .expect("after the restart, with the upstream back, the closure must be fetched");
    assert_eq!(ncps.wait_for_stored_nars(fx.top_closure.len()).len(), fx.top_closure.len());
    assert_only_verified_nars_stored(&ncps);
}

// ---------------------------------------------------------------------------
// A full disk
// ---------------------------------------------------------------------------

/// A tmpfs of `size` mounted at `dir` for as long as it lives (needs root and the right to
/// mount, which a container may withhold: then `None`, and the test says it skipped).
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> Option<SmallDisk> {
        fs::create_dir_all(dir).ok()?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(dir)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("cannot mount a tmpfs ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        Some(SmallDisk { dir: dir.to_path_buf() })
    }

    fn available(&self) -> u64 {
        let c = std::ffi::CString::new(self.dir.to_string_lossy().as_bytes()).unwrap();
        // SAFETY: statvfs is plain data, for which all-zero bytes are a valid value; `c` is a
        // NUL-terminated path and `st` a writable statvfs for the duration of the call.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0, "statvfs {}", self.dir.display());
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: ncps may still hold files open if the test failed before stopping it.
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn disk_full_mid_download_still_serves_the_client_keeps_nothing_half_written_and_says_why() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let big_nar = upstream_nar_path(fx, Compression::Xz, &fx.big);
    let big_size = fs::metadata(fx.cache_dir(Compression::Xz).join(big_nar.trim_start_matches('/')))
        .unwrap()
        .len();
    // Room for the database, the key and the small paths, but not for `big`.
    let root = TempDir::new("small-disk");
    let Some(disk) = SmallDisk::mount(&root.join("data"), "3m") else {
        eprintln!("SKIPPED: no tmpfs to fill (run as root, with the right to mount)");
        return;
    };
    assert!(big_size > 3 << 20, "the fixture's big NAR ({big_size} bytes) must not fit in 3 MiB");
    let data = disk.dir.to_string_lossy().into_owned();
    let args = [
        "serve", "--cache-hostname", HOSTNAME, "--cache-data-path", &data, "--server-addr", "{addr}",
        "--log-level", "debug", "--upstream-cache", &up.url(), "--upstream-public-key", &fx.up1_public_key,
    ];
    let mut ncps = Ncps::start_raw(args.iter().map(|s| s.to_string()).collect(), Vec::new());
    let free_at_start = disk.available();
    let key = ncps.pubkey();

    // Nix gets the whole closure, every byte verified by Nix itself...
    nix_copy_from(&ncps.url(), &[&fx.top], &key)
        .expect("with the disk full mid-download, the client must still get the NAR");
    let log = ncps.log();
    // ...the log says why `big` was not kept...
    let big_name = big_nar.rsplit('/').next().unwrap();
    let full: Vec<&str> = log.lines().filter(|l| l.contains("No space left on device")).collect();
    assert!(!full.is_empty(), "no log line names the full disk:\n{log}");
    assert!(
        log.lines().any(|l| l.contains(big_name) && l.contains("not kept")),
        "no log line says the NAR {big_name} was not kept:\n{log}"
    );
    eprintln!("the log says: {full:?}");
    // ...nothing half-written is kept, and the space the temp file took is given back.
    let on_disk = files_under(&disk.dir);
    assert!(
        !on_disk.iter().any(|p| p.to_string_lossy().ends_with(".ncps-partial")),
        "temp files remain on the full disk: {on_disk:?}"
    );
    let kept = fx.top_closure.len() - 1;
    wait_until(Duration::from_secs(10), || files_under(&disk.dir.join("store/nar")).len() == kept);
    let nars = files_under(&disk.dir.join("store/nar"));
    assert!(!nars.iter().any(|p| p.ends_with(big_name)), "the NAR that did not fit was kept: {nars:?}");
    for f in &nars {
        nar_file_matches_its_name(f).unwrap_or_else(|e| panic!("after a full disk: {e}"));
    }
    assert_eq!(nars.len(), kept, "the small NARs fit and are kept: {nars:?}");
    // What the kept files and the database's growth take is small; the 8 MiB temp file's
    // 3 MiB would not be.
    assert!(
        wait_until(Duration::from_secs(3), || disk.available() + (1 << 20) >= free_at_start),
        "the failed temp file's space was not given back: {} bytes free, {free_at_start} at start",
        disk.available()
    );

    // ncps keeps working: another client gets the closure again (`big` from upstream once more),
    // and after a restart the start-up check finds nothing to fix.
    nix_copy_from(&ncps.url(), &[&fx.top], &key).expect("a second client, after the disk filled once");
    assert_eq!(up.hits(&big_nar), 2, "big was not kept, so each client's copy came from upstream");
    let offset = ncps.log_len();
    ncps.restart();
    let after = ncps.log_since(offset);
    assert!(
        !after.lines().any(|l| l.contains("start-up check") && l.contains("removed")),
        "the start-up check had something to clean after a full disk:\n{after}"
    );
    nix_copy_from(&ncps.url(), &[&fx.top], &key).expect("after a restart");

    // A disk with no room at all (filled by someone else): narinfos and NARs alike are still
    // served, verified, and the log says why nothing was kept.
    let filler = disk.dir.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .output();
    assert!(disk.available() < 64 << 10, "the filler left {} bytes free", disk.available());
    let offset = ncps.log_len();
    let fresh = &fx.many[..2];
    let copied = nix_copy_from(&ncps.url(), fresh, &key);
    let log = ncps.log_since(offset);
    copied.unwrap_or_else(|e| panic!("with no room at all, clients must still be served: {e}\nncps log:\n{log}"));
    assert!(
        log.contains("verified but not kept") && log.contains("verified and served, but not kept"),
        "the log must say that narinfos and NARs were served but not kept:\n{log}"
    );
    let on_disk = files_under(&disk.dir);
    assert!(
        !on_disk.iter().any(|p| p.to_string_lossy().ends_with(".ncps-partial")),
        "temp files remain on the full disk: {on_disk:?}"
    );
    for f in files_under(&disk.dir.join("store/nar")) {
        nar_file_matches_its_name(&f).unwrap_or_else(|e| panic!("on a full disk: {e}"));
    }
    // Room again: the same paths are now kept, with no restart.
    fs::remove_file(&filler).unwrap();
    nix_copy_from(&ncps.url(), fresh, &key).expect("once there is room again");
    assert!(
        wait_until(Duration::from_secs(5), || files_under(&disk.dir.join("store/nar")).len() == nars.len() + fresh.len()),
        "with room again, the fresh paths' NARs must be kept: {:?}",
        files_under(&disk.dir.join("store/nar"))
    );
    ncps.stop();
}

#[test]
fn a_narinfo_whose_file_cannot_be_written_is_served_and_leaves_no_index_row_behind() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    // A directory (not empty) where `lib`'s narinfo file belongs: the index can take the
    // row, the store cannot take the file (rename onto a directory fails).
    let narinfo = sharded(ncps.data_dir(), "narinfo", &format!("{}.narinfo", store_hash(&fx.lib)));
    let shard = narinfo.parent().unwrap().to_path_buf();
    fs::create_dir_all(narinfo.join("in-the-way")).unwrap();

    nix_copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect("a narinfo that cannot be kept is still served");
    let log = ncps.log();
    let hash = store_hash(&fx.lib);
    assert!(
        log.lines().any(|l| l.contains(hash) && l.contains("verified but not kept")),
        "a log line says the narinfo of lib was not kept:\n{log}"
    );
    let db = rusqlite::Connection::open_with_flags(
        ncps.data_dir().join("db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let rows: i64 = db.query_row("SELECT COUNT(*) FROM narinfos WHERE hash = ?1", [hash], |r| r.get(0)).unwrap();
    assert_eq!(rows, 0, "the index keeps no row for a narinfo whose file is not there");
    let all: i64 = db.query_row("SELECT COUNT(*) FROM narinfos", [], |r| r.get(0)).unwrap();
    assert_eq!(all as usize, fx.top_closure.len() - 1, "the other narinfos are indexed");
    assert_only_verified_nars_stored(&ncps);
    drop(db);

    // A regular file where the shard directory belongs is what a damaged store leaves more
    // often. After a restart the next write clears it, and says so. (After a clean stop
    // nothing is checked at start; the write path heals what stands in its way.)
    let mut ncps = ncps;
    ncps.stop();
    fs::remove_dir_all(&shard).unwrap();
    fs::write(&shard, b"in the way").unwrap();
    let offset = ncps.log_len();
    ncps.restart();
    ncps.wait_for_log(offset, "the last stop was clean", Duration::from_secs(5));
    nix_copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect("after a restart");
    let after = ncps.log_since(offset);
    assert!(
        after.lines().any(|l| l.contains("a file stands where a store directory belongs")),
        "the write removes the file in the way and says so:\n{after}"
    );
    assert!(narinfo.is_file(), "with the way clear, lib's narinfo is kept");
}

/// DATA/store/<kind>/<c1>/<c1c2>/<file>, the layout ncps keeps its files in.
fn sharded(data: &std::path::Path, kind: &str, file: &str) -> std::path::PathBuf {
    data.join("store").join(kind).join(&file[..1]).join(&file[..2]).join(file)
}

#[test]
fn start_up_check_removes_files_the_index_does_not_vouch_for_and_forgets_missing_ones() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let mut ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let key = ncps.pubkey();
    nix_copy_from(&ncps.url(), &[&fx.top], &key).expect("first fetch (fills the cache)");
    // A crash: no clean-stop marker, so the next start checks the store (in the background).
    ncps.kill9();
    let data = ncps.data_dir().to_path_buf();
    let nar_name = |p: &str| upstream_nar_path(fx, Compression::Xz, p).rsplit('/').next().unwrap().to_string();

    // While ncps is down: a NAR is truncated, another deleted, a narinfo deleted,
    // and files nobody vouches for appear (a stray NAR, a forged narinfo).
    let big = sharded(&data, "nar", &nar_name(&fx.big));
    let lib = sharded(&data, "nar", &nar_name(&fx.lib));
    assert!(big.is_file() && lib.is_file(), "layout: {:?}", ncps.stored_nar_files());
    let f = fs::OpenOptions::new().write(true).open(&big).unwrap();
    f.set_len(1000).unwrap();
    drop(f);
    fs::remove_file(&lib).unwrap();
    let top_narinfo = sharded(&data, "narinfo", &format!("{}.narinfo", store_hash(&fx.top)));
    assert!(top_narinfo.is_file());
    fs::remove_file(&top_narinfo).unwrap();
    let stray = sharded(&data, "nar", &format!("{}.nar.xz", "1".repeat(52)));
    fs::create_dir_all(stray.parent().unwrap()).unwrap();
    fs::write(&stray, b"nobody vouches for this").unwrap();
    let victim = &fx.many[0];
    let forged = {
        let text = fx.upstream_narinfo(Compression::Xz, victim);
        let ni = NarInfo::parse(&text);
        let sig = sign_with_key_file(&fx.dir.join("keys/up2.sec"), &ni.fingerprint());
        let mut t: String = text.lines().filter(|l| !l.starts_with("Sig:")).map(|l| format!("{l}\n")).collect();
        t.push_str(&format!("Sig: {sig}\n"));
        t
    };
    let forged_path = sharded(&data, "narinfo", &format!("{}.narinfo", store_hash(victim)));
    fs::create_dir_all(forged_path.parent().unwrap()).unwrap();
    fs::write(&forged_path, &forged).unwrap();

    let offset = ncps.log_len();
    ncps.restart();
    let log = ncps.wait_for_log(offset, "start-up check: done", Duration::from_secs(20));
    let check: Vec<&str> = log.lines().filter(|l| l.contains("start-up check")).collect();
    eprintln!("start-up check after tampering: {check:?}");
    assert!(!check.is_empty(), "no 'start-up check' line:\n{log}");
    assert!(
        !check.iter().any(|l| l.contains("agree")),
        "the start-up check must report what it fixed: {check:?}"
    );
    assert!(!stray.exists(), "a NAR file the index does not know must be removed");
    assert!(!forged_path.exists(), "a narinfo file the index does not know must be removed");
    assert!(
        !big.exists() || fs::metadata(&big).unwrap().len() != 1000,
        "a NAR file whose size disagrees with the index must be removed"
    );

    // The forged narinfo is not served; the upstream's verified one is.
    let r = ncps.get(&format!("/{}.narinfo", store_hash(victim)));
    assert_eq!(r.status, 200);
    let served = NarInfo::parse(&r.text());
    assert!(
        !served.sigs().iter().any(|s| s.starts_with("up2.example.org-1:")),
        "the planted narinfo was served: {:?}",
        served.sigs()
    );
    // What was dropped is fetched again, verified.
    nix_copy_from(&ncps.url(), &[&fx.top], &key).expect("fetch after the start-up check");
    assert_eq!(ncps.wait_for_stored_nars(fx.top_closure.len()).len(), fx.top_closure.len(), "{:?}", ncps.stored_nar_files());
    assert_only_verified_nars_stored(&ncps);
}

fn assert_refuses_database(db_bytes_or_version: DbSetup, expect: &[&str]) {
    let data = TempDir::new("bad-db");
    let db = data.join("db.sqlite");
    match db_bytes_or_version {
        DbSetup::Garbage(bytes) => fs::write(&db, bytes).unwrap(),
        DbSetup::UserVersion(v) => {
            let c = rusqlite::Connection::open(&db).unwrap();
            c.execute_batch(&format!(
                "CREATE TABLE from_the_future (x INTEGER); PRAGMA user_version = {v};"
            ))
            .unwrap();
        }
    }
    let before = fs::read(&db).unwrap();
    let data_s = data.path().to_string_lossy().into_owned();
    let (code, stderr) = run_ncps_expecting_failure(
        &[
            "serve",
            "--cache-hostname",
            HOSTNAME,
            "--cache-data-path",
            &data_s,
            "--upstream-cache",
            "http://127.0.0.1:9",
            "--upstream-public-key",
            SOME_VALID_PUBLIC_KEY,
            "--server-addr",
            "{addr}",
        ],
        &[("RUST_BACKTRACE", "1")],
    );
    eprintln!("ncps exited {code:?}:\n{stderr}");
    assert!(matches!(code, Some(c) if c != 0), "exit status {code:?}; stderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want exactly one stderr line, got:\n{stderr}");
    let l = lines[0].to_ascii_lowercase();
    for bad in ["panicked", "rust_backtrace", "backtrace", "in use", "bind"] {
        assert!(!l.contains(bad), "stderr must not mention {bad:?}: {:?}", lines[0]);
    }
    for want in expect {
        assert!(l.contains(want), "stderr line must mention {want:?}: {:?}", lines[0]);
    }
    assert_eq!(fs::read(&db).unwrap(), before, "ncps must not modify a database it refuses");
}

enum DbSetup {
    Garbage(Vec<u8>),
    UserVersion(u32),
}

#[test]
fn database_from_a_newer_ncps_is_refused_with_one_clear_line() {
    assert_refuses_database(DbSetup::UserVersion(99), &["database", "99"]);
}

#[test]
fn garbage_database_file_is_refused_with_one_clear_line() {
    let garbage: Vec<u8> = b"this is not an SQLite database, it is garbage\n"
        .iter()
        .cycle()
        .take(8192)
        .copied()
        .collect();
    assert_refuses_database(DbSetup::Garbage(garbage), &["database"]);
}

// ---------------------------------------------------------------------------
// The HTTP front against hostile and idle clients
// ---------------------------------------------------------------------------

#[test]
fn hostile_requests_get_4xx_never_the_database_and_ncps_stays_up() {
    let (_dir, _up, mut ncps) = ncps_with_empty_upstream(&[]);
    assert!(ncps.data_dir().join("db.sqlite").exists(), "precondition: the database exists");
    let nar52 = "0".repeat(52);
    let get = |target: &str| format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let big_header = format!(
        "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let cases: Vec<(&str, String)> = vec![
        ("dot-dot under /nar", get("/nar/../db.sqlite")),
        ("encoded dot-dot", get("/%2e%2e/db.sqlite")),
        ("encoded slash", get("/nar/..%2fdb.sqlite")),
        ("encoded dot-dot-slash", get("/nar/%2e%2e%2fdb.sqlite")),
        ("dot-dot to the data dir", get("/../db.sqlite")),
        ("double slash", get("//db.sqlite")),
        ("absolute-form target", get("http://x/../db.sqlite")),
        ("db.sqlite at the root", get("/db.sqlite")),
        ("the store layout", get("/store/narinfo")),
        ("64-char uppercase narinfo hash", get(&format!("/{}.narinfo", "A".repeat(64)))),
        ("uppercase 32-char narinfo hash", get(&format!("/{}.narinfo", "A".repeat(32)))),
        ("unknown NAR extension", get(&format!("/nar/{nar52}.nar.exe"))),
        ("20 KiB header", big_header),
        ("unknown method", "BREW / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into()),
        (
            "PUT",
            "PUT /x.narinfo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
                .into(),
        ),
        ("DELETE", "DELETE /nar/x.nar HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into()),
        ("not HTTP", "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03\r\n\r\n".into()),
        ("bare LF garbage", "GET\n\n".into()),
    ];
    let mut failures = Vec::new();
    for (what, req) in &cases {
        let r = match raw_request(ncps.addr, req.as_bytes(), Duration::from_secs(5)) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{what}: no HTTP response: {e}"));
                continue;
            }
        };
        eprintln!("{what}: {} ({:?})", r.status, r.text().lines().next().unwrap_or(""));
        if !(400..500).contains(&r.status) {
            failures.push(format!("{what}: status {} (want 4xx)", r.status));
        }
        if r.body.windows(13).any(|w| w == b"SQLite format") {
            failures.push(format!("{what}: the body contains the database"));
        }
        assert!(ncps.is_running(), "ncps died after the {what} request; log:\n{}", ncps.log());
    }
    nix_cache_info_is_quick(&ncps, "after the hostile requests");
    assert!(failures.is_empty(), "hostile requests:\n{}", failures.join("\n"));
}

#[test]
fn hundreds_of_unfinished_or_silent_connections_do_not_delay_a_real_request() {
    let (_dir, _up, ncps) = ncps_with_empty_upstream(&["--server-workers", "4"]);
    let mut held = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(ncps.addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.write_all(b"GET /nix-cache-info HT").unwrap();
        held.push(s);
    }
    nix_cache_info_is_quick(&ncps, "with 300 half-sent request lines open");
    for i in 0..100 {
        let s = TcpStream::connect(ncps.addr).unwrap_or_else(|e| panic!("silent connection {i}: {e}"));
        held.push(s);
    }
    nix_cache_info_is_quick(&ncps, "with 300 half-sent and 100 silent connections open");
    // Several at once, too: none waits for the idle ones.
    let addr = ncps.addr;
    let t = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || raw_request(addr, &get_request("/nix-cache-info"), Duration::from_secs(5))))
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap().expect("GET /nix-cache-info").status, 200);
    }
    assert!(t.elapsed() < Duration::from_secs(2), "8 parallel requests took {:?}", t.elapsed());
    drop(held);
    nix_cache_info_is_quick(&ncps, "after the idle connections went away");
}

#[test]
fn an_unfinished_request_head_gets_408_after_the_header_timeout() {
    let (_dir, _up, ncps) = ncps_with_empty_upstream(&["--server-header-timeout", "1s"]);
    let mut c = RawConn::connect(ncps.addr, Duration::from_secs(6)).unwrap();
    let t = Instant::now();
    c.send(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n").unwrap();
    let r = c.read_response().expect("a response to the unfinished head");
    let took = t.elapsed();
    assert_eq!(r.status, 408, "after {took:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "408 after {took:?} with --server-header-timeout 1s"
    );
    nix_cache_info_is_quick(&ncps, "after a 408");
}
