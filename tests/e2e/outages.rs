//! End-to-end specification of what clients get when upstreams fail: an honest `5xx`
//! (never a `404`, which Nix remembers as "absent" for an hour) when no upstream could
//! answer; upstreams that keep failing marked down, skipped at once and probed back; and
//! only the upstreams configured now ever asked, whatever a stored narinfo recorded.
//!
//! Run: `cargo test --test e2e outages::` (add `-- --nocapture` for timings).

use crate::support::*;
use std::time::{Duration, Instant};

/// Upstream timeouts short enough that a silent upstream is given up quickly.
const SHORT_TIMEOUTS: &[&str] = &["--upstream-dialer-timeout", "1s", "--upstream-response-header-timeout", "1s"];

/// Asks for narinfos of random (absent) paths until ncps logs that an upstream is marked
/// down; returns the statuses it got on the way.
fn miss_until_marked_down(ncps: &Ncps, salt: u64) -> Vec<u16> {
    let mut statuses = Vec::new();
    for i in 0..10 {
        statuses.push(ncps.get(&format!("/{}.narinfo", random_hash(salt + i))).status);
        if wait_until(Duration::from_millis(300), || ncps.log().contains("marked down")) {
            return statuses;
        }
    }
    panic!("no upstream marked down after {statuses:?}:\n{}", ncps.log());
}

/// A narinfo miss while every upstream is marked down: `status`, with a reason, at once.
fn assert_quick_5xx(ncps: &Ncps, status: u16, salt: u64) {
    for i in 0..2 {
        let path = format!("/{}.narinfo", random_hash(salt + 100 + i));
        let t = Instant::now();
        let r = ncps.get(&path);
        let took = t.elapsed();
        eprintln!("miss while marked down: {} in {took:?}: {}", r.status, r.text().trim());
        assert_eq!(r.status, status, "GET {path} while the upstream is marked down: {}", r.text());
        assert!(r.text().contains("marked down"), "the body says why: {}", r.text());
        assert!(took < Duration::from_millis(100), "a miss while marked down took {took:?}, not milliseconds");
    }
}

#[test]
fn with_the_only_upstream_stopped_misses_are_502_at_once_and_the_same_client_substitutes_once_it_is_back() {
    let Some(fx) = fixture_or_skip() else { return };
    let mut up = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--prometheus-enabled"]);
    let key = ncps.pubkey();
    up.stop();

    let r = ncps.get(&format!("/{}.narinfo", store_hash(&fx.top)));
    assert_eq!(r.status, 502, "a narinfo miss with the upstream refusing connections: {}", r.text());
    assert!(r.text().starts_with("Bad Gateway: no upstream could answer"), "{}", r.text());
    assert!(r.text().contains(&up.url()), "the body names the upstream: {}", r.text());
    let salt = 1000 * u64::from(std::process::id());
    let before = miss_until_marked_down(&ncps, salt);
    assert!(before.iter().all(|s| *s == 502), "every miss before it was marked down: {before:?}");
    assert_quick_5xx(&ncps, 502, salt);

    // The status page and the metrics say so.
    let status = ncps.get("/").text();
    assert!(status.contains(r#""state":"down""#) && status.contains(r#""healthy":false"#), "{status}");
    let metrics = ncps.get("/metrics").text();
    let label = up.url().trim_start_matches("http://").to_string();
    assert!(metrics.contains(&format!("ncps_upstream_up{{upstream_hostname=\"{label}\"}} 0")), "{metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with(&format!("ncps_upstream_consecutive_failures{{upstream_hostname=\"{label}\"}}"))
            && !l.ends_with(" 0")),
        "{metrics}"
    );

    // A Nix client fails (it is told 502, which it does not remember) ...
    let client = RememberingClient::new();
    let t = Instant::now();
    let err = client.copy_from(&ncps.url(), &[&fx.top], &key).expect_err("nothing can come from a stopped upstream");
    eprintln!("nix copy with the upstream down failed after {:?}:\n{err}", t.elapsed());
    assert!(err.contains("502"), "Nix was told 502: {err}");
    assert!(ncps.stored_narinfo_files().is_empty());

    // ... and once the upstream is back (a probe finds it), the same client gets the closure
    // on its first try: nothing remembered the outage as "absent", neither Nix nor ncps.
    up.restart();
    let t = Instant::now();
    ncps.wait_for_log(0, "up again", Duration::from_secs(70));
    eprintln!("the probe found the upstream back after {:?}", t.elapsed());
    assert!(!ncps.some_upstream_down());
    client
        .copy_from(&ncps.url(), &[&fx.top], &key)
        .expect("the same Nix client, once the upstream is back, must substitute at once");
    assert!(ncps.get("/metrics").text().contains(&format!("ncps_upstream_up{{upstream_hostname=\"{label}\"}} 1")));
}

#[test]
fn an_upstream_answering_500_is_marked_down_misses_answer_502_in_milliseconds_and_it_is_probed_back() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode(Mode::Status500);
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let salt = 2000 * u64::from(std::process::id());
    let before = miss_until_marked_down(&ncps, salt);
    assert_eq!(before, [502, 502, 502], "three 500s in a row mark it down, each answered 502");
    let asked = up.total_hits();
    assert_quick_5xx(&ncps, 502, salt);
    // Skipped means not asked (the probe asks only for /nix-cache-info).
    assert_eq!(up.hits_where(|p| p.ends_with(".narinfo")), asked);

    up.set_mode(Mode::Normal);
    ncps.wait_for_log(0, "up again", Duration::from_secs(10));
    assert!(up.hits("/nix-cache-info") >= 1, "the probe asks for /nix-cache-info");
    assert_eq!(ncps.get(&format!("/{}.narinfo", store_hash(&fx.top))).status, 200, "back: found at once");
}

#[test]
fn a_hanging_upstream_is_marked_down_and_misses_answer_504_in_milliseconds() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode(Mode::Hang);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], SHORT_TIMEOUTS);
    let salt = 3000 * u64::from(std::process::id());
    let before = miss_until_marked_down(&ncps, salt);
    assert_eq!(before, [504, 504, 504], "each timed-out miss is a Gateway Timeout");
    assert_quick_5xx(&ncps, 504, salt);
    // Hanging probes keep it down (they time out too).
    std::thread::sleep(Duration::from_secs(4));
    assert!(ncps.some_upstream_down());
    assert_quick_5xx(&ncps, 504, salt + 50);
}

#[test]
fn a_404_from_every_upstream_is_still_a_404_but_one_failing_upstream_makes_it_a_502_not_remembered() {
    let (_dir, empty, ncps) = ncps_with_empty_upstream(&[]);
    let path = format!("/{}.narinfo", random_hash(4000 * u64::from(std::process::id())));
    assert_eq!(ncps.get(&path).status, 404, "the only upstream says 404");

    // Two upstreams: one says 404, the other refuses connections.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let two = Ncps::for_upstreams_with(&[empty.url(), dead.clone()], &[SOME_VALID_PUBLIC_KEY], &[]);
    let r = two.get(&path);
    assert_eq!(r.status, 502, "one upstream could not answer, so absence is not known: {}", r.text());
    assert!(r.text().contains("not found") && r.text().contains(&dead), "{}", r.text());
    // Not remembered: the next miss asks the upstreams again.
    let asked = empty.hits(&path);
    assert_eq!(two.get(&path).status, 502);
    assert_eq!(empty.hits(&path), asked + 1, "an outage is not remembered as absent");
}

#[test]
fn a_restart_without_the_corrupting_upstream_heals_the_closure_on_the_first_try() {
    let Some(fx) = fixture_or_skip() else { return };
    let bad = Upstream::for_cache(fx, Compression::Xz);
    bad.set_mode_for(Mode::CorruptByte, Target::Nar);
    let good = Upstream::for_cache(fx, Compression::Xz);
    let mut ncps = Ncps::for_upstreams(&[bad.url()], &fx.up1_public_key);
    let key = ncps.pubkey();
    let err = nix_copy_from(&ncps.url(), &[&fx.top], &key).expect_err("every NAR from the only upstream is corrupt");
    eprintln!("through the corrupting upstream, as expected:\n{err}");
    assert!(bad.hits_where(|p| p.starts_with("/nar/")) >= 1);
    assert!(ncps.stored_nar_files().is_empty(), "no corrupt NAR kept: {:?}", ncps.stored_nar_files());
    assert!(!ncps.stored_narinfo_files().is_empty(), "the (verified) narinfos are kept, pointing at the bad upstream");

    // The operator replaces the bad upstream with a good one and restarts.
    ncps.restart_with_upstreams(&[good.url()]);
    bad.reset_hits();
    nix_copy_from(&ncps.url(), &[&fx.top], &key)
        .expect("after the restart without the bad upstream, the first fetch must succeed");
    assert_eq!(bad.total_hits(), 0, "an upstream no longer configured is never asked: {:?}", bad.requests());
    assert!(good.hits_where(|p| p.starts_with("/nar/")) >= fx.top_closure.len() as u64);
    assert_eq!(ncps.wait_for_stored_nars(fx.top_closure.len()).len(), fx.top_closure.len());
}

#[test]
fn a_nar_miss_is_404_when_every_upstream_says_404_and_502_when_the_upstream_is_down() {
    let Some(fx) = fixture_or_skip() else { return };
    let copy = resigned_cache_copy(fx, Compression::Xz, &fx.up1_secret_key_file);
    let mut up = Upstream::serve_dir(copy.path());
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let (nar, _) = ncps_nar_path(&ncps, &fx.lib);
    // The upstream loses the NAR its narinfo pointed at.
    std::fs::remove_file(copy.join(&upstream_nar_path(fx, Compression::Xz, &fx.lib)[1..])).unwrap();
    let r = ncps.get(&nar);
    assert_eq!(r.status, 404, "every upstream says 404: {}", r.text());
    up.stop();
    let r = ncps.get(&nar);
    assert_eq!(r.status, 502, "the upstream refuses connections: {}", r.text());
    assert!(r.text().starts_with("Bad Gateway: no upstream could answer"), "{}", r.text());
    assert!(ncps.stored_nar_files().is_empty());
}

/// Why an outage must never be a 404: the Nix client remembers one (here for the rest of the
/// test; `narinfo-cache-negative-ttl`, an hour, by default) and does not ask again, even once
/// ncps has the path. The same client after a 502 does ask again (the test above).
#[test]
fn a_404_is_remembered_by_the_nix_client_so_only_a_real_absence_may_be_one() {
    let Some(fx) = fixture_or_skip() else { return };
    let (_dir, empty, _) = ncps_with_empty_upstream(&[]);
    let mut ncps = Ncps::for_upstreams_with(&[empty.url()], &[&fx.up1_public_key], &["--cache-negative-ttl", "0s"]);
    let good = Upstream::for_cache(fx, Compression::Xz);
    let key = ncps.pubkey();
    let client = RememberingClient::new();
    client.copy_from(&ncps.url(), &[&fx.top], &key).expect_err("no upstream has it: 404");
    ncps.restart_with_upstreams(&[good.url()]);
    assert_eq!(ncps.get(&format!("/{}.narinfo", store_hash(&fx.top))).status, 200, "ncps has it now");
    let err = client.copy_from(&ncps.url(), &[&fx.top], &key).expect_err("the client remembers the 404");
    assert!(err.contains("no substituter"), "{err}");
    RememberingClient::new().copy_from(&ncps.url(), &[&fx.top], &key).expect("a fresh client gets it");
}
