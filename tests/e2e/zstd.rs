//! End-to-end specification of zstd responses (issue 13): a NAR stored uncompressed
//! (`Compression: none`) is sent `Content-Encoding: zstd` to clients whose Accept-Encoding names
//! zstd, once ncps has made its copy in the background; the first request that asks is served
//! plain. Nix 2.26 asks and decodes; Nix 2.8 does not ask and always gets the plain bytes; a
//! Range request always gets the plain bytes; a copy goes with its NAR; the flag turns it off.
//!
//! Run: `cargo test --test e2e zstd::`.

use crate::support::*;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

fn get_with(ncps: &Ncps, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: ncps-e2e\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    raw_request(ncps.addr, r.as_bytes(), Duration::from_secs(30)).expect("GET")
}

const ZSTD: (&str, &str) = ("Accept-Encoding", "zstd, br, gzip, deflate, bzip2, xz");

/// ncps in front of the uncompressed cache, with `extra` flags.
fn setup(fx: &Fixture, extra: &[&str]) -> (Upstream, Ncps) {
    let up = Upstream::for_cache(fx, Compression::None);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], extra);
    (up, ncps)
}

/// The zstd copies in ncps's store.
fn zstd_copies(ncps: &Ncps) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![ncps.data_dir().join("store/nar-zstd")];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                found.push(p);
            }
        }
    }
    found
}

/// Fetches `lib`'s NAR plain (a first request that asks for zstd) and waits for its copy.
fn lib_with_its_copy(fx: &Fixture, ncps: &Ncps) -> (String, Vec<u8>) {
    let (nar, size) = ncps_nar_path(ncps, &fx.lib);
    let plain = get_with(ncps, &nar, &[ZSTD]);
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("content-encoding"), None, "the first request is served plain");
    assert_eq!(plain.body.len() as u64, size);
    ncps.wait_for_log(0, "zstd copy kept", Duration::from_secs(30));
    assert_eq!(zstd_copies(ncps).len(), 1, "one copy, of lib's NAR");
    (nar, plain.body)
}

#[test]
fn a_plain_nar_is_sent_zstd_encoded_once_its_copy_is_kept_and_a_range_or_a_client_without_zstd_gets_the_plain_bytes() {
    let Some(fx) = fixture_or_skip() else { return };
    let (up, ncps) = setup(fx, &[]);
    let (nar, plain) = lib_with_its_copy(fx, &ncps);

    let z = get_with(&ncps, &nar, &[ZSTD]);
    assert_eq!(z.status, 200);
    assert_eq!(z.header("content-encoding"), Some("zstd"));
    assert_eq!(z.header("vary"), Some("Accept-Encoding"));
    assert_eq!(z.header("accept-ranges"), None, "ranges are of the plain bytes, not of the copy");
    let decoded = zstd::stream::decode_all(z.body.as_slice()).expect("a zstd body");
    assert!(decoded == plain, "the copy decodes to the NAR, byte for byte");
    assert!(z.body.len() * 2 < plain.len(), "smaller: {} of {} bytes", z.body.len(), plain.len());

    let bare = get_with(&ncps, &nar, &[]);
    assert_eq!((bare.status, bare.header("content-encoding")), (200, None), "no Accept-Encoding: plain");
    assert_eq!(bare.header("vary"), Some("Accept-Encoding"), "caches in between must keep both apart");
    assert!(bare.body == plain);
    let gzip_only = get_with(&ncps, &nar, &[("Accept-Encoding", "gzip, deflate")]);
    assert_eq!(gzip_only.header("content-encoding"), None);
    let refused = get_with(&ncps, &nar, &[("Accept-Encoding", "zstd;q=0, gzip")]);
    assert_eq!(refused.header("content-encoding"), None, "q=0 refuses zstd");

    let r = get_with(&ncps, &nar, &[ZSTD, ("Range", "bytes=10-19")]);
    assert_eq!((r.status, r.header("content-encoding")), (206, None), "a range is always plain");
    assert_eq!(r.body, &plain[10..20]);

    assert_eq!(up.hits_where(|p| p.starts_with("/nar/")), 1, "every answer came from the one download");
}

#[test]
fn nix_2_26_substitutes_a_closure_through_zstd_responses_and_nix_2_8_through_plain_ones() {
    let Some(fx) = fixture_or_skip() else { return };
    if NixClient::Nix2_26.must_skip() {
        return;
    }
    let (_up, ncps) = setup(fx, &[]);
    let key = ncps.pubkey();
    // The first copy asks for zstd and is served plain; it queues the copies.
    NixClient::Nix2_26.copy_from(&ncps.url(), &fx.top_closure, &key).expect("first nix copy (2.26)");
    ncps.wait_for_log(0, "zstd copy kept", Duration::from_secs(30));
    // The random 8 MiB path does not compress: it gets no copy and stays plain.
    ncps.wait_for_log(0, "not worth a copy", Duration::from_secs(30));

    let at = ncps.log_len();
    NixClient::Nix2_26.copy_from(&ncps.url(), &fx.top_closure, &key).expect("nix copy (2.26) through zstd");
    let log = ncps.log_since(at);
    assert!(log.contains("hit (zstd)"), "Nix 2.26 asked for and decoded zstd:\n{log}");

    let at = ncps.log_len();
    NixClient::Nix2_8.copy_from(&ncps.url(), &fx.top_closure, &key).expect("nix copy (2.8)");
    let log = ncps.log_since(at);
    assert!(!log.contains("hit (zstd)"), "Nix 2.8 does not ask for zstd and gets none:\n{log}");
}

#[test]
fn a_zstd_copy_is_removed_with_its_nar_and_is_not_served_after() {
    let Some(fx) = fixture_or_skip() else { return };
    let (mut up, ncps) = setup(fx, &["--cache-allow-delete-verb", "--cache-write-token", WRITE_TOKEN]);
    let (nar, _) = lib_with_its_copy(fx, &ncps);
    up.stop();
    let del = http_request_with("DELETE", &format!("{}{nar}", ncps.url()), &[("Authorization", &format!("Bearer {WRITE_TOKEN}"))])
        .expect("DELETE");
    assert_eq!(del.status, 204);
    assert!(zstd_copies(&ncps).is_empty(), "the copy went with its NAR: {:?}", zstd_copies(&ncps));
    let after = get_with(&ncps, &nar, &[ZSTD]);
    assert_ne!(after.status, 200, "nothing is served from a removed NAR's copy");
}

#[test]
fn with_zstd_responses_off_no_copy_is_made_and_every_answer_is_plain() {
    let Some(fx) = fixture_or_skip() else { return };
    let (_up, ncps) = setup(fx, &["--cache-zstd-responses=false"]);
    let (nar, size) = ncps_nar_path(&ncps, &fx.lib);
    for _ in 0..3 {
        let r = get_with(&ncps, &nar, &[ZSTD]);
        assert_eq!((r.status, r.header("content-encoding"), r.header("vary")), (200, None, None));
        assert_eq!(r.body.len() as u64, size);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(zstd_copies(&ncps).is_empty());
    assert!(!ncps.log().contains("zstd copy"), "{}", ncps.log());
}

#[test]
fn after_a_crash_the_copies_are_dropped_by_the_start_up_check_and_made_again_when_asked() {
    let Some(fx) = fixture_or_skip() else { return };
    let (_up, mut ncps) = setup(fx, &[]);
    let (nar, plain) = lib_with_its_copy(fx, &ncps);
    ncps.kill9();
    ncps.restart();
    ncps.wait_for_log(0, "removed 1 zstd cop", Duration::from_secs(30));
    assert!(zstd_copies(&ncps).is_empty(), "a crash may have left a copy its row does not count");
    let again = get_with(&ncps, &nar, &[ZSTD]);
    assert_eq!((again.status, again.header("content-encoding")), (200, None), "plain while the copy is made");
    assert!(again.body == plain);
    let at = ncps.log_len();
    ncps.wait_for_log(at, "zstd copy kept", Duration::from_secs(30));
    assert_eq!(get_with(&ncps, &nar, &[ZSTD]).header("content-encoding"), Some("zstd"));
}
