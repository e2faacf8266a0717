//! The properties the fuzz targets check, shared with `tests/fuzz_regressions.rs`, which
//! replays the seeds and every saved crash through the same functions under plain `cargo test`.
//!
//! Each function takes arbitrary bytes and panics when a property does not hold; inputs a
//! parser refuses are fine, since refusing is its job.

#![allow(dead_code)]

use ncps::http::{Method, Request};
use ncps::nix::{nix32, Hash, NarInfo, NarName, PublicKey, SecretKey, StorePathHash};
use ncps::routes::{route, Route};

/// A narinfo that parses prints to text that parses to the same value, and printing that again
/// gives the same text. Everything ncps does with a parsed narinfo (fingerprint, hash of the
/// store path, file digest) works without panicking.
pub fn narinfo(data: &[u8]) {
    let Ok(info) = NarInfo::parse(data) else { return };
    let _ = info.fingerprint();
    let _ = info.file_digest();
    assert!(info.store_path_hash().is_some(), "accepted StorePath {:?} has no hash", info.store_path);
    let text = info.to_string();
    let again = match NarInfo::parse(text.as_bytes()) {
        Ok(again) => again,
        Err(e) => panic!("printed narinfo does not parse again ({e}): {text:?}"),
    };
    assert_eq!(info, again, "narinfo changed in a print/parse round trip; printed as {text:?}");
    assert_eq!(text, again.to_string(), "printing a re-parsed narinfo gives other text");
    assert_eq!(info.fingerprint(), again.fingerprint(), "fingerprint changed in a round trip");
}

/// Whatever `route` accepts as a narinfo or a NAR names a file made only of `[0-9a-z.]`,
/// without `/` or `..`, and is exactly the path asked for (no second spelling reaches the same
/// file). The same holds for the path the server takes out of a request target.
pub fn request_path(data: &[u8]) {
    let Ok(target) = std::str::from_utf8(data) else { return };
    check_route(target, route(target));
    let req = Request {
        method: Method::Get,
        method_text: "GET".into(),
        target: target.to_string(),
        headers: Vec::new(),
        keep_alive: true,
        content_length: 0,
        chunked: false,
        expect_continue: false,
        peer: "127.0.0.1:1".parse().unwrap(),
    };
    let path = req.path();
    assert!(!path.contains('?'), "Request::path kept a query: {path:?}");
    check_route(path, route(path));
}

fn safe_file_name(name: &str, what: &str, path: &str) {
    assert!(!name.is_empty(), "{what} from {path:?} is empty");
    assert!(
        name.bytes().all(|c| c.is_ascii_digit() || c.is_ascii_lowercase() || c == b'.'),
        "{what} {name:?} from {path:?} has characters outside [0-9a-z.]"
    );
    assert!(!name.contains('/') && !name.contains(".."), "{what} {name:?} from {path:?} could leave its directory");
    assert!(!name.starts_with('.'), "{what} {name:?} from {path:?} is a dot file");
}

fn check_route(path: &str, r: Route) {
    match r {
        Route::Narinfo(h) => {
            let s = h.as_str();
            safe_file_name(s, "narinfo hash", path);
            assert_eq!(s.len(), 32, "narinfo hash {s:?} from {path:?} is not 32 characters");
            assert!(s.bytes().all(nix32::is_nix32_char), "narinfo hash {s:?} from {path:?} is not nix32");
            assert_eq!(path, format!("/{s}.narinfo"), "narinfo route is not the path asked for");
            assert_eq!(StorePathHash::parse(s), Some(h), "narinfo hash does not parse back to itself");
        }
        Route::Nar(n) => {
            let s = n.as_str();
            safe_file_name(s, "NAR name", path);
            assert_eq!(path, format!("/nar/{s}"), "NAR route is not the path asked for");
            assert_eq!(NarName::parse(s).as_ref(), Some(&n), "NAR name does not parse back to itself");
            let _ = n.compression();
        }
        Route::Root => assert_eq!(path, "/"),
        Route::NixCacheInfo => assert_eq!(path, "/nix-cache-info"),
        Route::PubKey => assert_eq!(path, "/pubkey"),
        Route::Healthz => assert_eq!(path, "/healthz"),
        // Fixed pages added later (such as /metrics) and refusals name no file. A wildcard, so
        // that a new route does not break `cargo test`; a new route that names a file needs an
        // arm above.
        _ => {}
    }
}

/// The small parsers behind the narinfo and the routes, plus keys and durations: no panics,
/// and what parses prints to text that parses to the same value. The first byte picks the
/// parser, the rest is its input.
pub fn parsers(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(s) = std::str::from_utf8(rest) else { return };
    match which % 7 {
        0 => {
            if let Ok(h) = Hash::parse(s) {
                assert_eq!(Hash::parse(&h.to_string()), Ok(h), "hash {s:?} does not round-trip");
                assert_eq!(Hash::parse_digest(&h.to_nix32()), Some(h));
            }
        }
        1 => {
            if let Some(h) = Hash::parse_digest(s) {
                assert_eq!(Hash::parse_digest(&h.to_nix32()), Some(h), "digest {s:?} does not round-trip");
            }
        }
        2 => {
            if let Some(bytes) = nix32::decode(s) {
                assert_eq!(nix32::encode(&bytes), s, "nix32 {s:?} decodes to bytes that encode differently");
            }
        }
        3 => {
            if let Some(n) = NarName::parse(s) {
                assert_eq!(n.as_str(), s);
                safe_file_name(n.as_str(), "NAR name", s);
                let _ = n.compression();
            }
            if let Some(h) = StorePathHash::parse(s) {
                assert_eq!(h.as_str(), s);
                safe_file_name(h.as_str(), "store path hash", s);
            }
        }
        4 => {
            if let Ok(k) = PublicKey::parse(s) {
                let text = k.to_string();
                let again = PublicKey::parse(&text).unwrap_or_else(|e| panic!("public key {text:?} does not re-parse: {e}"));
                assert_eq!(again.to_string(), text, "public key does not round-trip");
                // A Sig line is untrusted text too.
                let _ = k.verify(b"1;/nix/store/x;sha256:x;0;", s);
            }
        }
        5 => {
            if let Ok(k) = SecretKey::parse(s) {
                let text = k.to_file_text();
                let again = SecretKey::parse(&text).unwrap_or_else(|e| panic!("secret key does not re-parse: {e}"));
                let sig = again.sign(b"msg");
                assert!(k.public().verify(b"msg", &sig), "a signature by the re-parsed key does not verify");
            }
        }
        _ => {
            let _ = ncps::duration::parse_duration(s);
        }
    }
}
