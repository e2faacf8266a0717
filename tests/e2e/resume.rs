//! End-to-end specification of upstream resume: a NAR body that breaks off part-way is
//! finished with `Range: bytes=<written>-`, from the same upstream once and then from the
//! next, into the same file, while clients keep streaming; the whole spliced file must still
//! match its hash, or nothing is kept and the clients are cut off.
//!
//! Run: `cargo test --test e2e resume::` (add `-- --nocapture` for timings).

use crate::support::*;
use std::time::{Duration, Instant};

/// Every stored NAR file holds exactly the bytes its name (the FileHash) promises.
fn assert_only_verified_nars_stored(ncps: &Ncps) {
    for f in ncps.stored_nar_files() {
        if let Err(e) = nar_file_matches_its_name(&f) {
            panic!("ncps stored unverified bytes: {e}");
        }
    }
}

/// The byte a `Range: bytes=N-` header asks from.
fn range_start(header: &str) -> u64 {
    let n = header.strip_prefix("bytes=").and_then(|r| r.strip_suffix('-'));
    n.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("not a `bytes=N-` range: {header}"))
}

/// A raw GET of the big NAR through ncps gets all of it, and its bytes hash to its name.
fn big_nar_arrives_whole(ncps: &Ncps, fx: &Fixture) -> (String, u64) {
    let (nar, size) = ncps_nar_path(ncps, &fx.big);
    let t = Instant::now();
    let h = raw_get_hashed(ncps.addr, &nar, Duration::from_secs(30)).unwrap_or_else(|e| panic!("GET {nar}: {e}"));
    eprintln!("GET {nar}: {} bytes in {:?}, {:?}", h.len, t.elapsed(), h.end);
    assert_eq!((h.status, h.len, h.end), (200, size, BodyEnd::Eof), "the client gets every byte, and a clean end");
    let name = nar.rsplit('/').next().unwrap();
    assert_eq!(nix32(&h.sha256), name.split('.').next().unwrap(), "the bytes are the NAR's");
    (nar, size)
}

#[test]
fn an_upstream_reset_once_mid_nar_is_finished_with_a_range_request_and_nix_copy_succeeds() {
    let Some(fx) = fixture_or_skip() else { return };
    for client in NixClient::BOTH {
        if client.must_skip() {
            continue;
        }
        let up = Upstream::for_cache(fx, Compression::Xz);
        // Every NAR of the closure breaks off once, half-way through.
        up.set_mode_for(Mode::ResetOnce, Target::Nar);
        let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
        let t = Instant::now();
        client
            .copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey())
            .unwrap_or_else(|e| panic!("{}: nix copy with every NAR reset once: {e}", client.label()));
        eprintln!("{}: nix copy took {:?}", client.label(), t.elapsed());
        let big = upstream_nar_path(fx, Compression::Xz, &fx.big);
        let asked = up.ranges_asked(&big);
        assert_eq!(asked.len(), 2, "{}: the big NAR once, then its rest: {asked:?}", client.label());
        assert_eq!(asked[0], None, "the first request is for the whole file");
        let from = range_start(asked[1].as_deref().expect("the second request has a Range"));
        let size = std::fs::metadata(fx.cache_dir(Compression::Xz).join(big.trim_start_matches('/'))).unwrap().len();
        assert!(from > 0 && from <= size / 2, "resumed at byte {from} of {size}: where the first body stopped");
        // Half the file, of which `from` bytes arrived before the reset, then exactly the rest.
        assert_eq!(up.bytes_sent(&big), size / 2 + (size - from), "the rest, and nothing else, was sent again");
        ncps.wait_for_log(0, &format!("resuming from {}{big} at byte {from}", up.url()), Duration::from_secs(2));
        assert_eq!(ncps.wait_for_stored_nars(fx.top_closure.len()).len(), fx.top_closure.len());
        assert_only_verified_nars_stored(&ncps);
    }
}

#[test]
fn when_the_first_upstream_cuts_every_nar_body_the_second_finishes_it_from_where_it_stopped() {
    let Some(fx) = fixture_or_skip() else { return };
    let cutting = Upstream::for_cache(fx, Compression::Xz);
    cutting.set_mode_for(Mode::ResetMidBody, Target::Nar);
    let good = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams(&[cutting.url(), good.url()], &fx.up1_public_key);

    big_nar_arrives_whole(&ncps, fx);
    let big = upstream_nar_path(fx, Compression::Xz, &fx.big);
    let from_cutting = cutting.ranges_asked(&big);
    assert_eq!(from_cutting.len(), 2, "the cutting upstream: the file, then its rest once: {from_cutting:?}");
    let again = range_start(from_cutting[1].as_deref().expect("a Range request to the same upstream"));
    let from_good = good.ranges_asked(&big);
    assert_eq!(from_good.len(), 1, "the second upstream is asked once: {from_good:?}");
    let rest = range_start(from_good[0].as_deref().expect("for the rest only"));
    assert!(0 < again && again < rest, "each resumes where the last stopped: {again}, then {rest}");
    let size = std::fs::metadata(fx.cache_dir(Compression::Xz).join(big.trim_start_matches('/'))).unwrap().len();
    assert_eq!(good.bytes_sent(&big), size - rest, "the second upstream sent only the rest");
    let log = ncps.wait_for_log(0, &format!("resuming from {}{big} at byte {rest}", good.url()), Duration::from_secs(2));
    assert!(log.contains(&format!("resuming from {}{big} at byte {again}", cutting.url())), "{log}");
    assert_eq!(ncps.wait_for_stored_nars(1).len(), 1);

    // And Nix gets the closure, each NAR spliced the same way (or from the second upstream
    // alone once the first is marked down).
    NixClient::Nix2_8.copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect("nix copy through the cutting upstream");
    assert_eq!(ncps.wait_for_stored_nars(fx.top_closure.len()).len(), fx.top_closure.len());
    assert_only_verified_nars_stored(&ncps);
}

#[test]
fn a_spliced_nar_that_does_not_match_is_not_kept_its_readers_are_cut_off_and_the_next_fetch_heals() {
    let Some(fx) = fixture_or_skip() else { return };
    let cutting = Upstream::for_cache(fx, Compression::Xz);
    cutting.set_mode_for(Mode::ResetMidBody, Target::Nar);
    // The second upstream sends the rest with one byte flipped.
    let corrupt = Upstream::for_cache(fx, Compression::Xz);
    corrupt.set_mode_for(Mode::CorruptByte, Target::Nar);
    let ncps = Ncps::for_upstreams(&[cutting.url(), corrupt.url()], &fx.up1_public_key);
    let (nar, size) = ncps_nar_path(&ncps, &fx.big);

    let r = raw_request(ncps.addr, &get_request(&nar), Duration::from_secs(30)).unwrap_or_else(|e| panic!("GET {nar}: {e}"));
    eprintln!("spliced with a corrupt rest: status {}, {} of {size} bytes, {:?}", r.status, r.body.len(), r.end);
    assert_eq!(r.status, 200);
    assert!(!r.looks_complete(), "a spliced file that does not match must not look complete: {:?}", r.end);
    assert!((r.body.len() as u64) < size, "the last byte waits for the hash check");
    let big = upstream_nar_path(fx, Compression::Xz, &fx.big);
    assert!(corrupt.ranges_asked(&big).iter().all(Option::is_some), "the second upstream was asked for the rest only");
    let log = ncps.wait_for_log(0, "hash mismatch", Duration::from_secs(2));
    assert!(log.contains(&format!("resumed from {}", corrupt.url())), "the failure names every source: {log}");
    assert!(wait_until(Duration::from_secs(3), || ncps.partial_files().is_empty()), "{:?}", ncps.partial_files());
    assert!(ncps.stored_nar_files().is_empty(), "{:?}", ncps.stored_nar_files());

    // The second upstream heals; the next fetch gets the NAR (spliced again, or from it alone).
    corrupt.set_mode(Mode::Normal);
    big_nar_arrives_whole(&ncps, fx);
    assert_eq!(ncps.wait_for_stored_nars(1).len(), 1);
    assert_only_verified_nars_stored(&ncps);
}

#[test]
fn an_upstream_that_ignores_ranges_is_not_used_to_resume_and_readers_are_cut_off_as_before() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode_for(Mode::ResetOnce, Target::Nar);
    up.set_ranges(false);
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let (nar, size) = ncps_nar_path(&ncps, &fx.big);

    let r = raw_request(ncps.addr, &get_request(&nar), Duration::from_secs(30)).unwrap_or_else(|e| panic!("GET {nar}: {e}"));
    assert!(!r.looks_complete() && (r.body.len() as u64) < size, "cut off: {} of {size} bytes, {:?}", r.body.len(), r.end);
    ncps.wait_for_log(0, "ignores ranges (200 to a Range request)", Duration::from_secs(2));
    assert!(wait_until(Duration::from_secs(3), || ncps.partial_files().is_empty()), "{:?}", ncps.partial_files());
    assert!(ncps.stored_nar_files().is_empty());
    // The upstream no longer resets: the next fetch gets it whole.
    big_nar_arrives_whole(&ncps, fx);
    assert_only_verified_nars_stored(&ncps);
}

#[test]
fn a_nar_sent_with_content_encoding_is_not_resumed_with_a_range() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    // zstd-encoded, and cut half-way: a range of the encoded stream is not a range of the file.
    up.set_mode_for(Mode::ZstdEncodedResetMidBody, Target::Nar);
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let (nar, size) = ncps_nar_path(&ncps, &fx.big);
    let r = raw_request(ncps.addr, &get_request(&nar), Duration::from_secs(30)).unwrap_or_else(|e| panic!("GET {nar}: {e}"));
    assert!(!r.looks_complete() && (r.body.len() as u64) < size, "cut off: {} of {size} bytes, {:?}", r.body.len(), r.end);
    ncps.wait_for_log(0, "download failed, nothing kept", Duration::from_secs(2));
    let big = upstream_nar_path(fx, Compression::Xz, &fx.big);
    assert_eq!(up.ranges_asked(&big), vec![None], "no Range request for an encoded body");
    assert!(!ncps.log().contains("resuming"), "{}", ncps.log());
}
