//! End-to-end specification of byte ranges on NARs (RFC 9110): a client whose transfer was cut
//! asks for the rest with `Range: bytes=N-` and gets exactly that, from a stored NAR and from
//! one still downloading; the ETag is the FileHash and never changes for the same bytes; edge
//! cases answer 206, 416 or (ignored) 200 as the RFC says; HEAD tells what a GET would get.
//!
//! Run: `cargo test --test e2e ranges::`.

use crate::support::*;
use std::fs;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

/// `GET path` with extra request headers, on a fresh connection, read to the end.
fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    raw_request(addr, &request("GET", path, headers), Duration::from_secs(30)).expect("GET")
}

fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: ncps-e2e\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

fn range(addr: SocketAddr, path: &str, spec: &str) -> RawResponse {
    get_with(addr, path, &[("Range", spec)])
}

/// A client that reads the head and `n` body bytes of `path`, then drops the connection (the
/// "cut"). Returns its head's headers and the bytes it got.
fn cut_after(addr: SocketAddr, path: &str, n: usize) -> (Vec<(String, String)>, Vec<u8>) {
    let mut c = RawConn::connect(addr, Duration::from_secs(30)).expect("connect");
    c.send(&get_request(path)).expect("send");
    let (status, headers) = c.read_head().expect("head");
    assert_eq!(status, 200, "the first, whole request");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while got.len() < n {
        let k = c.read_body_chunk(&mut buf).expect("body");
        assert!(k > 0, "the body ended after {} bytes", got.len());
        got.extend_from_slice(&buf[..k]);
    }
    got.truncate(n);
    (headers, got)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Resumes the download into `file` (which holds the first bytes) with curl's `-C -`, which
/// sends `Range: bytes=<size of file>-`. Returns curl's HTTP code and the response headers.
fn curl_resume(url: &str, file: &std::path::Path, headers: &std::path::Path) -> String {
    let out = Command::new("curl")
        .args(["-s", "-S", "-f", "-m", "60", "-C", "-", "-w", "%{http_code}", "-o"])
        .arg(file)
        .arg("-D")
        .arg(headers)
        .arg(url)
        .output()
        .expect("curl (apt-get install curl)");
    assert!(out.status.success(), "curl -C - failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The ETag ncps gives a NAR: its FileHash, quoted, in nix32.
fn etag_of_narinfo(ncps: &Ncps, store_path: &str) -> String {
    let ni = NarInfo::parse(&ncps.get(&format!("/{}.narinfo", store_hash(store_path))).text());
    let hash = ni.get("FileHash").expect("FileHash").strip_prefix("sha256:").expect("sha256:").to_string();
    format!("\"{hash}\"")
}

struct Setup {
    up: Upstream,
    ncps: Ncps,
    nar: String,
    size: u64,
    original: Vec<u8>,
    upstream_path: String,
}

fn setup(fx: &Fixture, slow: Option<u64>) -> Setup {
    let up = Upstream::for_cache(fx, Compression::None);
    if let Some(bps) = slow {
        up.set_mode_for(Mode::Slow(bps), Target::Nar);
    }
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let (nar, size) = ncps_nar_path(&ncps, &fx.big);
    let upstream_path = upstream_nar_path(fx, Compression::None, &fx.big);
    let original = fs::read(fx.cache_dir(Compression::None).join(upstream_path.trim_start_matches('/'))).unwrap();
    assert_eq!(original.len() as u64, size);
    Setup { up, ncps, nar, size, original, upstream_path }
}

/// Stores the NAR (one whole fetch) so that what follows are hits.
fn fill(s: &Setup) {
    let first = raw_get_hashed(s.ncps.addr, &s.nar, Duration::from_secs(30)).expect("first fetch");
    assert_eq!((first.status, first.len), (200, s.size));
    s.ncps.wait_for_stored_nars(1);
}

#[test]
fn a_client_cut_off_during_a_hit_resumes_with_curl_and_gets_exactly_the_rest() {
    let Some(fx) = fixture_or_skip() else { return };
    let s = setup(fx, None);
    fill(&s);
    let cut = s.original.len() / 3 + 7;
    let (first, got) = cut_after(s.ncps.addr, &s.nar, cut);
    assert_eq!(header(&first, "accept-ranges"), Some("bytes"));
    let dir = TempDir::new("ranges-hit");
    let (file, heads) = (dir.join("nar"), dir.join("headers"));
    fs::write(&file, &got).unwrap();

    let code = curl_resume(&format!("{}{}", s.ncps.url(), s.nar), &file, &heads);
    assert_eq!(code, "206");
    let heads = fs::read_to_string(&heads).unwrap();
    let want_range = format!("content-range: bytes {cut}-{}/{}", s.size - 1, s.size);
    assert!(heads.to_ascii_lowercase().contains(&want_range), "{heads}");
    assert!(heads.contains(header(&first, "etag").expect("an ETag")), "the same ETag: {heads}");
    assert!(fs::read(&file).unwrap() == s.original, "the resumed file is the NAR, byte for byte");
    assert_eq!(s.up.hits(&s.upstream_path), 1, "a hit, not a second download");
}

#[test]
fn a_client_cut_off_during_a_download_resumes_from_the_same_download_and_gets_exactly_the_rest() {
    let Some(fx) = fixture_or_skip() else { return };
    // 8 MiB at 2 MB/s: four seconds of download to cut and resume within.
    let s = setup(fx, Some(2_000_000));
    let cut = 1_000_003;
    let (first, got) = cut_after(s.ncps.addr, &s.nar, cut);
    assert_eq!(header(&first, "accept-ranges"), Some("bytes"));
    let etag = header(&first, "etag").expect("a download in progress has an ETag").to_string();
    assert_eq!(etag, etag_of_narinfo(&s.ncps, &fx.big), "the ETag is the FileHash");
    let dir = TempDir::new("ranges-growing");
    let (file, heads) = (dir.join("nar"), dir.join("headers"));
    fs::write(&file, &got).unwrap();
    assert!(s.up.bytes_sent(&s.upstream_path) < s.size, "the download is still running");

    let code = curl_resume(&format!("{}{}", s.ncps.url(), s.nar), &file, &heads);
    assert_eq!(code, "206");
    let heads = fs::read_to_string(&heads).unwrap();
    assert!(heads.contains(&etag), "the same ETag while downloading: {heads}");
    assert!(fs::read(&file).unwrap() == s.original, "the resumed file is the NAR, byte for byte");
    assert_eq!(s.up.hits(&s.upstream_path), 1, "the resume followed the running download");
    assert_eq!(s.up.bytes_sent(&s.upstream_path), s.size, "which fetched the NAR once");

    // Once stored, the same bytes keep the same tag.
    s.ncps.wait_for_stored_nars(1);
    let hit = get_with(s.ncps.addr, &s.nar, &[("Range", "bytes=0-0")]);
    assert_eq!((hit.status, hit.header("etag")), (206, Some(etag.as_str())));
}

#[test]
fn a_range_beyond_what_a_download_has_written_waits_for_its_bytes_and_the_last_for_verification() {
    let Some(fx) = fixture_or_skip() else { return };
    let s = setup(fx, Some(4_000_000));
    let t = Instant::now();
    let tail = range(s.ncps.addr, &s.nar, &format!("bytes={}-", s.size - 10));
    eprintln!("the range of the last 10 bytes came after {:?}", t.elapsed());
    assert_eq!(tail.status, 206);
    assert_eq!(tail.header("content-range"), Some(format!("bytes {}-{}/{}", s.size - 10, s.size - 1, s.size).as_str()));
    assert_eq!(tail.body, &s.original[s.original.len() - 10..]);
    assert_eq!(s.up.bytes_sent(&s.upstream_path), s.size, "sent only once the upstream had sent it all");
    assert_eq!(s.up.hits(&s.upstream_path), 1);
}

#[test]
fn ranges_of_a_download_in_progress_are_resolved_against_its_final_length() {
    let Some(fx) = fixture_or_skip() else { return };
    let s = setup(fx, Some(2_000_000));
    // Starts the download, which runs on without this client.
    let (_, _) = cut_after(s.ncps.addr, &s.nar, 1);
    let t = Instant::now();
    let past = range(s.ncps.addr, &s.nar, &format!("bytes={}-", s.size));
    assert_eq!(past.status, 416, "past the end of the announced length: {}", past.text());
    assert_eq!(past.header("content-range"), Some(format!("bytes */{}", s.size).as_str()));
    assert!(t.elapsed() < Duration::from_secs(1), "a 416 does not wait for the download");
    let first = range(s.ncps.addr, &s.nar, "bytes=0-0");
    assert_eq!((first.status, first.body.as_slice()), (206, &s.original[..1]), "the first byte");
    assert!(s.up.bytes_sent(&s.upstream_path) < s.size, "answered while downloading");
    let head = raw_request(s.ncps.addr, &request("HEAD", &s.nar, &[("Range", "bytes=0-0")]), Duration::from_secs(10)).unwrap();
    assert_eq!((head.status, head.content_length(), head.header("accept-ranges")), (200, Some(s.size), Some("bytes")));
    assert!(head.header("etag").is_some());
}

#[test]
fn range_edge_cases_on_a_stored_nar() {
    let Some(fx) = fixture_or_skip() else { return };
    let s = setup(fx, None);
    fill(&s);
    let (addr, len, o) = (s.ncps.addr, s.size, &s.original);
    let last = len - 1;
    let cases: Vec<(String, u16, Option<String>, &[u8])> = vec![
        ("bytes=0-0".into(), 206, Some(format!("bytes 0-0/{len}")), &o[..1]),
        (format!("bytes={last}-{last}"), 206, Some(format!("bytes {last}-{last}/{len}")), &o[o.len() - 1..]),
        (format!("bytes={last}-"), 206, Some(format!("bytes {last}-{last}/{len}")), &o[o.len() - 1..]),
        ("bytes=-1".into(), 206, Some(format!("bytes {last}-{last}/{len}")), &o[o.len() - 1..]),
        ("bytes=100-199".into(), 206, Some(format!("bytes 100-199/{len}")), &o[100..200]),
        (format!("bytes={}-{}", len - 5, len + 1000), 206, Some(format!("bytes {}-{last}/{len}", len - 5)), &o[o.len() - 5..]),
        (format!("bytes=-{}", len + 1000), 206, Some(format!("bytes 0-{last}/{len}")), &o[..]),
        (format!("bytes={len}-"), 416, Some(format!("bytes */{len}")), b"Range Not Satisfiable\n"),
        (format!("bytes={}-{}", len + 10, len + 20), 416, Some(format!("bytes */{len}")), b"Range Not Satisfiable\n"),
        ("bytes=garbage".into(), 200, None, &o[..]),
        ("bytes=5-4".into(), 200, None, &o[..]),
        ("lines=0-1".into(), 200, None, &o[..]),
        ("bytes=0-0,5-9".into(), 200, None, &o[..]),
    ];
    for (spec, status, content_range, body) in cases {
        let r = range(addr, &s.nar, &spec);
        assert_eq!(r.status, status, "{spec}: {}", if r.status >= 400 { r.text() } else { String::new() });
        assert_eq!(r.header("content-range").map(str::to_string), content_range, "{spec}");
        assert_eq!(r.content_length(), Some(body.len() as u64), "{spec}");
        assert!(r.body == body, "{spec}: {} bytes, not the {} expected", r.body.len(), body.len());
        assert_eq!(r.end, BodyEnd::Eof, "{spec}");
    }

    let etag = etag_of_narinfo(&s.ncps, &fx.big);
    let if_range = |tag: &str| get_with(addr, &s.nar, &[("Range", "bytes=10-"), ("If-Range", tag)]);
    let same = if_range(&etag);
    assert_eq!((same.status, same.body.len() as u64), (206, len - 10), "If-Range with the ETag: the range");
    for other in ["\"somethingelse\"".to_string(), format!("W/{etag}"), "Wed, 02 Dec 2026 10:00:00 GMT".to_string()] {
        let r = if_range(&other);
        assert_eq!((r.status, r.body.len() as u64), (200, len), "If-Range: {other}: the whole NAR");
        assert_eq!(r.header("etag"), Some(etag.as_str()));
    }

    let head = raw_request(addr, &request("HEAD", &s.nar, &[("Range", "bytes=0-9")]), Duration::from_secs(10)).unwrap();
    assert_eq!(head.status, 200, "HEAD ignores Range");
    assert_eq!(head.content_length(), Some(len));
    assert_eq!((head.header("accept-ranges"), head.header("etag")), (Some("bytes"), Some(etag.as_str())));
    assert!(head.body.is_empty());
    assert!(head.header("content-range").is_none());

    let narinfo = s.ncps.get(&format!("/{}.narinfo", store_hash(&fx.big)));
    assert!(narinfo.header("accept-ranges").is_none(), "ranges are for NARs only");
}
