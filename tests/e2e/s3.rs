//! Blobs in S3 (`--cache-storage-s3-*`, a build with `--features s3`), against a real S3
//! server (s3s-fs) and the real Nix 2.8 client: what is fetched through ncps lands in the
//! bucket and nowhere on the data path, a restarted ncps serves it from the bucket with its
//! upstream down (ranges too), and the secret key never reaches the log.

use crate::support::*;

fn s3_args(s3: &S3sFs) -> Vec<String> {
    s3.flags()
}

#[test]
fn a_closure_fetched_through_ncps_lands_in_the_bucket_and_a_restart_serves_it_from_s3_with_the_upstream_down() {
    let Some(fx) = fixture_or_skip() else { return };
    let Some(s3) = S3sFs::start() else { return };
    let mut up = Upstream::for_cache(fx, Compression::Xz);
    let flags = s3_args(&s3);
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &extra);
    NixClient::Nix2_8.copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect("nix copy through ncps");

    // Every narinfo and NAR of the closure is an object of the bucket, none a file of the data path.
    let narinfos = s3.objects("narinfo");
    for p in &fx.top_closure {
        let key = format!("{}.narinfo", store_hash(p));
        assert!(narinfos.iter().any(|f| f.ends_with(&key)), "{key} in the bucket: {narinfos:?}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let nar_objects = |s3: &S3sFs| s3.objects("nar").into_iter().filter(|f| f.to_string_lossy().contains(".nar")).count();
    while nar_objects(&s3) < fx.top_closure.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(nar_objects(&s3) >= fx.top_closure.len(), "a NAR object for each path: {:?}", s3.objects("nar"));
    assert!(ncps.stored_nar_files().is_empty() && ncps.stored_narinfo_files().is_empty(), "nothing stored locally");
    assert!(ncps.partial_files().is_empty(), "staged files are gone once uploaded");

    // The upstream goes away; a restarted ncps has only the bucket (and its index) to serve from.
    up.reset_hits();
    up.stop();
    ncps.restart();
    let since = ncps.log_len();
    NixClient::Nix2_8.copy_from(&ncps.url(), &[&fx.top], &ncps.pubkey()).expect("nix copy of hits from S3");
    assert_eq!(up.total_hits(), 0, "the upstream is down, nothing asked of it");
    // A range of a hit is a range of the object.
    let (nar_path, size) = ncps_nar_path(&ncps, &fx.top);
    let whole = ncps.get(&nar_path);
    assert_eq!((whole.status, whole.body.len() as u64), (200, size));
    assert!(whole.header("etag").is_some(), "the FileHash from the object's metadata is the ETag");
    let ranged = http_request_with("GET", &format!("{}{nar_path}", ncps.url()), &[("Range", "bytes=3-")]).unwrap();
    assert_eq!(ranged.status, 206);
    assert!(ranged.body == whole.body[3..], "the range is the bytes from 3 on");
    let log = ncps.log();
    assert!(log[since..].contains("hit"), "served as hits: {}", &log[since..]);
    assert!(!log.contains(S3_SECRET_KEY), "the secret key is in ncps's log");
    assert!(log.contains("s3://"), "the log says where the blobs are");
}

#[test]
fn a_wrong_s3_secret_or_an_unreachable_endpoint_stops_the_start_with_one_line_that_never_shows_the_secret() {
    let Some(s3) = S3sFs::start() else { return };
    let data = TempDir::new("s3-refused");
    let data_path = data.path().to_string_lossy().into_owned();
    let endpoint = format!("http://127.0.0.1:{}", s3.port);
    let dead = format!("http://127.0.0.1:{}", free_port());
    for (endpoint, secret, says) in [(&endpoint, "wrong-secret-Hh4kQ9", "403"), (&dead, S3_SECRET_KEY, "127.0.0.1")] {
        let args = [
            "serve", "--cache-hostname", "cache.test", "--cache-data-path", &data_path, "--server-addr", "{addr}",
            "--upstream-cache", "http://127.0.0.1:9", "--cache-storage-s3-bucket", S3_BUCKET,
            "--cache-storage-s3-endpoint", endpoint, "--cache-storage-s3-force-path-style",
            "--cache-storage-s3-access-key-id", S3_ACCESS_KEY,
        ];
        let (code, stderr) = run_ncps_expecting_failure(&args, &[("CACHE_STORAGE_S3_SECRET_ACCESS_KEY", secret)]);
        assert_eq!(code, Some(1), "{stderr}");
        let last = stderr.trim().lines().last().unwrap_or_default();
        assert!(last.contains("--cache-storage-s3-bucket") && last.contains(says), "{stderr}");
        assert!(!stderr.contains(secret), "the secret is in the output: {stderr}");
    }
}

#[test]
fn a_second_ncps_on_a_bucket_another_uses_stops_at_start_naming_the_owner_and_the_first_restarts_fine() {
    let Some(fx) = fixture_or_skip() else { return };
    let Some(s3) = S3sFs::start() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let flags = s3_args(&s3);
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut first = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &extra);
    assert_eq!(first.get(&format!("/{}.narinfo", store_hash(&fx.top))).status, 200);

    let other = TempDir::new("s3-second");
    let data_path = other.path().to_string_lossy().into_owned();
    let upstream = up.url();
    let mut args = vec![
        "serve", "--cache-hostname", "cache.test", "--cache-data-path", &data_path, "--server-addr", "{addr}",
        "--upstream-cache", &upstream,
    ];
    args.extend(extra.iter().copied());
    let (code, stderr) = run_ncps_expecting_failure(&args, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(last.contains("--cache-storage-s3-bucket") && last.contains("another ncps"), "{stderr}");
    assert!(last.contains(&first.data_dir().display().to_string()), "it names where the owner runs: {stderr}");
    assert!(!stderr.contains(S3_SECRET_KEY));

    first.restart();
    assert_eq!(first.get(&format!("/{}.narinfo", store_hash(&fx.top))).status, 200, "the owner itself starts again");
}

#[test]
fn an_object_store_that_hangs_holds_up_only_the_requests_that_need_it_never_the_poll_loop() {
    let Some(fx) = fixture_or_skip() else { return };
    let Some(s3) = S3sFs::start() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let flags = s3_args(&s3);
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &extra);
    let path = format!("/{}.narinfo", store_hash(&fx.top));
    assert_eq!(ncps.get(&path).status, 200, "fetched and stored in the bucket");
    // A restart empties the memo: the next hit must come from the bucket.
    ncps.restart();
    s3.pause();
    let url = format!("{}{path}", ncps.url());
    let waiting = std::thread::spawn(move || http_get(&url).map(|r| r.status));
    std::thread::sleep(std::time::Duration::from_millis(300));
    // With the hit's S3 request made on the poll loop, every connection would wait with it.
    for _ in 0..5 {
        let t = std::time::Instant::now();
        assert_eq!(ncps.get("/nix-cache-info").status, 200);
        assert!(t.elapsed() < std::time::Duration::from_millis(500), "answered in {:?} while S3 hangs", t.elapsed());
    }
    s3.resume();
    assert_eq!(waiting.join().unwrap().expect("the hit, once S3 answers"), 200);
}

#[test]
fn with_redirects_on_a_nar_hit_is_a_307_to_a_presigned_url_that_nix_follows_and_the_log_never_shows() {
    let Some(fx) = fixture_or_skip() else { return };
    let Some(s3) = S3sFs::start() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let mut flags = s3_args(&s3);
    flags.push("--cache-storage-s3-redirect".into());
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &extra);
    let key = ncps.pubkey();
    // Misses go through ncps (fetched, verified, then stored in the bucket).
    NixClient::Nix2_8.copy_from(&ncps.url(), &[&fx.top], &key).expect("nix copy of misses");
    let (nar_path, size) = ncps_nar_path(&ncps, &fx.big);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut r = ncps.get(&nar_path);
    while r.status != 307 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        r = ncps.get(&nar_path);
    }
    assert_eq!(r.status, 307, "a stored NAR is a redirect");
    let location = r.header("location").expect("a Location").to_string();
    assert!(location.contains("X-Amz-Signature=") && location.contains(&format!("127.0.0.1:{}", s3.port)), "{location}");
    let direct = http_get(&location).expect("GET of the presigned URL");
    let upstream_nar = upstream_nar_path(fx, Compression::Xz, &fx.big);
    let want = std::fs::read(fx.cache_dir(Compression::Xz).join(upstream_nar.trim_start_matches('/'))).unwrap();
    assert_eq!((direct.status, direct.body.len() as u64), (200, size));
    assert!(direct.body == want, "the presigned URL gives the NAR, byte for byte");
    assert_eq!(ncps.head(&nar_path).status, 200, "a HEAD is answered by ncps (a presigned GET is for GET only)");

    // A fresh Nix store fetches the closure again: every NAR by its redirect.
    let since = ncps.log_len();
    up.reset_hits();
    NixClient::Nix2_8.copy_from(&ncps.url(), &[&fx.top], &key).expect("nix copy through the redirects");
    assert_eq!(up.total_hits(), 0, "all hits");
    let log = ncps.log();
    assert!(log[since..].contains("307") && log[since..].contains("hit (redirect)"), "{}", &log[since..]);
    let signature = location.split("X-Amz-Signature=").nth(1).unwrap();
    assert!(!log.contains(signature), "the presigned URL is a credential for 10 minutes: never logged");
}

// ---------------------------------------------------------------------------
// Faults between ncps and the store
// ---------------------------------------------------------------------------

/// What [`FaultProxy`] does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Relayed to s3s-fs and its answer back.
    Pass,
    /// Answered `500 InternalError` (the body read first, as a server would).
    Status500,
    /// Answered `501 NotImplemented`, as a store without that request does.
    Status501,
    /// The connection reset (RST, `SO_LINGER` 0) once the body was read, with no answer.
    Reset,
}

/// One request the proxy saw: method, target (path and query) and what was done.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    fault: Fault,
    /// The status s3s-fs answered, for a relayed request.
    status: Option<u16>,
}

impl Seen {
    /// The value of query parameter `name`, if given.
    /// The value of the query parameter `name`; `""` for one given bare (`?delete`).
    fn query(&self, name: &str) -> Option<&str> {
        let q = self.target.split_once('?')?.1;
        q.split('&').find_map(|kv| Some(kv.split_once('=').unwrap_or((kv, ""))).filter(|(k, _)| *k == name).map(|(_, v)| v))
    }
    fn is_upload_part(&self) -> bool {
        self.method == "PUT" && self.query("partNumber").is_some()
    }
    fn is_abort(&self) -> bool {
        self.method == "DELETE" && self.query("uploadId").is_some()
    }
    fn is_complete(&self) -> bool {
        self.method == "POST" && self.query("uploadId").is_some()
    }
    /// A `DeleteObjects` request: `POST /<bucket>?delete`.
    fn is_delete_many(&self) -> bool {
        self.method == "POST" && self.query("delete").is_some()
    }
    /// A DELETE of one object (not an upload's abort).
    fn is_delete_one(&self) -> bool {
        self.method == "DELETE" && self.query("uploadId").is_none()
    }
    fn is_listing(&self) -> bool {
        self.method == "GET" && self.query("list-type") == Some("2")
    }
}

type Rule = dyn Fn(&Seen) -> Fault + Send + Sync;

/// A fault-injecting HTTP/1.1 proxy between ncps and s3s-fs (std::net, one request per
/// connection, answers marked `Connection: close`): each request is read whole, handed to the
/// rule, then relayed, failed with a 500, or reset. The SigV4 signatures stay valid: the Host
/// header and every signed byte pass unchanged.
struct FaultProxy {
    port: u16,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    rule: std::sync::Arc<std::sync::Mutex<std::sync::Arc<Rule>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    fn start(upstream_port: u16) -> FaultProxy {
        use std::sync::{atomic::AtomicBool, Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let pass: Arc<Rule> = Arc::new(|_| Fault::Pass);
        let rule = Arc::new(Mutex::new(pass));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, r, st) = (seen.clone(), rule.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (s, r) = (s.clone(), r.clone());
                std::thread::spawn(move || {
                    let _ = proxy_one(conn, upstream_port, &s, &r);
                });
            }
        });
        FaultProxy { port, seen, rule, stop }
    }

    fn set_rule(&self, rule: impl Fn(&Seen) -> Fault + Send + Sync + 'static) {
        *self.rule.lock().unwrap() = std::sync::Arc::new(rule);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The head of an HTTP message (up to its blank line) and what was read past it.
fn read_head(conn: &mut std::net::TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Ok((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before a head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `head` with its `Connection` header replaced by `Connection: close`.
fn closing(head: &str) -> String {
    let mut lines: Vec<&str> = head.trim_end().split("\r\n").filter(|l| !l.to_ascii_lowercase().starts_with("connection:")).collect();
    lines.push("Connection: close");
    format!("{}\r\n\r\n", lines.join("\r\n"))
}

fn proxy_one(
    mut conn: std::net::TcpStream,
    upstream_port: u16,
    seen: &std::sync::Mutex<Vec<Seen>>,
    rule: &std::sync::Mutex<std::sync::Arc<Rule>>,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let (head, mut body) = read_head(&mut conn)?;
    let mut first = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (first.next().unwrap_or_default().to_string(), first.next().unwrap_or_default().to_string());
    let length: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding: chunked"), "the proxy reads sized bodies only: {head}");
    while body.len() < length {
        let mut chunk = vec![0u8; (length - body.len()).min(1 << 20)];
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let mut entry = Seen { method, target, fault: Fault::Pass, status: None };
    let current = rule.lock().unwrap().clone();
    entry.fault = current(&entry);
    match entry.fault {
        Fault::Status500 => {
            let text = "<?xml version=\"1.0\"?><Error><Code>InternalError</Code><Message>injected</Message></Error>";
            write!(conn, "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len())?;
        }
        Fault::Status501 => {
            let text = "<?xml version=\"1.0\"?><Error><Code>NotImplemented</Code><Message>injected</Message></Error>";
            write!(conn, "HTTP/1.1 501 Not Implemented\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}", text.len())?;
        }
        Fault::Reset => {
            use std::os::fd::AsRawFd;
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            // SAFETY: a valid socket and a `linger` of the size given.
            unsafe {
                libc::setsockopt(
                    conn.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
            }
            seen.lock().unwrap().push(entry);
            return Ok(()); // dropped: RST
        }
        Fault::Pass => {
            let mut up = std::net::TcpStream::connect(("127.0.0.1", upstream_port))?;
            up.write_all(closing(&head).as_bytes())?;
            up.write_all(&body)?;
            let (answer, rest) = read_head(&mut up)?;
            entry.status = answer.split_whitespace().nth(1).and_then(|c| c.parse().ok());
            conn.write_all(closing(&answer).as_bytes())?;
            conn.write_all(&rest)?;
            std::io::copy(&mut up, &mut conn)?;
        }
    }
    seen.lock().unwrap().push(entry);
    Ok(())
}

/// A binary cache of store paths each of whose NAR (`Compression: none`) holds `size` random
/// bytes, signed by a key of its own: big ones go to S3 as multipart uploads.
struct SyntheticCache {
    dir: TempDir,
    _keys: TempDir,
    public_key: String,
    /// Per path: (store path hash, NAR URL path `/nar/<name>`, the NAR's bytes).
    paths: Vec<(String, String, Vec<u8>)>,
}

/// The NAR of one regular file holding `contents`.
fn nar_of(contents: &[u8]) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    let mut out = Vec::with_capacity(contents.len() + 256);
    for s in [&b"nix-archive-1"[..], b"(", b"type", b"regular", b"contents"] {
        put(&mut out, s);
    }
    put(&mut out, contents);
    put(&mut out, b")");
    out
}

impl SyntheticCache {
    fn new(label: &str, sizes: &[usize]) -> SyntheticCache {
        let (keys, public_key, secret) = new_key_pair("synthetic.example.org-1");
        let dir = TempDir::new(label);
        std::fs::create_dir_all(dir.join("nar")).unwrap();
        std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n").unwrap();
        let mut paths = Vec::new();
        for (i, &size) in sizes.iter().enumerate() {
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
            let contents: Vec<u8> = (0..size.div_ceil(8))
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .take(size)
                .collect();
            let nar = nar_of(&contents);
            let hash = format!("sha256:{}", nix32(&sha256(&nar)));
            let name = format!("{}.nar", nix32(&sha256(&nar)));
            std::fs::write(dir.join("nar").join(&name), &nar).unwrap();
            let store_hash = random_hash(0x5335 + i as u64);
            let text = format!(
                "StorePath: /nix/store/{store_hash}-synthetic-{i}\nURL: nar/{name}\nCompression: none\n\
                 FileHash: {hash}\nFileSize: {len}\nNarHash: {hash}\nNarSize: {len}\nReferences: \n",
                len = nar.len()
            );
            let sig = sign_with_key_file(&secret, &NarInfo::parse(&text).fingerprint());
            std::fs::write(dir.join(format!("{store_hash}.narinfo")), format!("{text}Sig: {sig}\n")).unwrap();
            paths.push((store_hash, format!("/nar/{name}"), nar));
        }
        SyntheticCache { dir, _keys: keys, public_key, paths }
    }
}

/// ncps on `up`, with its blobs in `s3` through the proxy on `via` (or directly).
fn ncps_on_bucket(up: &Upstream, key: &str, s3: &S3sFs, via: Option<u16>) -> Ncps {
    let flags = match via {
        Some(port) => s3.flags_via(port),
        None => s3.flags(),
    };
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    Ncps::for_upstreams_with(&[up.url()], &[key], &extra)
}

/// GETs `path` from ncps and says whether the answer is the whole of `expected`: `Ok(true)`
/// for a complete, verified 200; `Ok(false)` for a clean failure (an error status, or a body
/// cut short that no client would take for complete); a panic for a 200 that looks complete
/// but holds other bytes.
fn complete_or_clean_failure(ncps: &Ncps, path: &str, expected: &[u8]) -> bool {
    let got = raw_get_hashed(ncps.addr, path, Duration::from_secs(60)).expect("GET through ncps");
    let complete = got.status == 200 && got.len == expected.len() as u64 && got.end == BodyEnd::Eof;
    if complete {
        assert_eq!(got.sha256, sha256(expected), "a complete-looking 200 of {path} holds other bytes");
        return true;
    }
    assert!(
        got.status != 200 || got.len < expected.len() as u64,
        "{path}: status {}, {} bytes, ended {:?}: neither complete nor a clean failure",
        got.status,
        got.len,
        got.end
    );
    false
}

use std::time::Duration;

#[test]
fn a_multipart_upload_failing_mid_way_is_aborted_no_object_appears_and_the_next_miss_stores_and_serves_the_nar() {
    if must_skip_without_nix() {
        return;
    }
    let Some(s3) = S3sFs::start() else { return };
    let proxy = FaultProxy::start(s3.port);
    // 20 MiB: two parts (16 MiB and the rest) of a multipart upload.
    let cache = SyntheticCache::new("s3-multipart", &[20 << 20]);
    let (store_hash, nar_path, nar) = &cache.paths[0];
    let key = object_key(nar_path);
    let up = Upstream::serve_dir(cache.dir.path());
    let ncps = ncps_on_bucket(&up, &cache.public_key, &s3, Some(proxy.port));
    assert_eq!(ncps.get(&format!("/{store_hash}.narinfo")).status, 200);

    // Every attempt at part 2, for both failures: a 500 for the first, then resets.
    let parts_failed = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let failed = parts_failed.clone();
    proxy.set_rule(move |r| {
        if r.is_upload_part() && r.query("partNumber") == Some("2") {
            let n = failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return if n == 0 { Fault::Status500 } else { Fault::Reset };
        }
        Fault::Pass
    });
    let since = ncps.log_len();
    complete_or_clean_failure(&ncps, nar_path, nar);
    // The upload follows the client's answer: wait until it was given up.
    assert!(wait_until(Duration::from_secs(30), || proxy.seen().iter().any(Seen::is_abort)), "no abort: {:?}", proxy.seen());
    let seen = proxy.seen();
    let parts: Vec<_> = seen.iter().filter(|r| r.is_upload_part()).collect();
    assert!(parts.iter().any(|r| r.query("partNumber") == Some("1") && r.status == Some(200)), "part 1 went through: {seen:?}");
    assert!(parts_failed.load(std::sync::atomic::Ordering::SeqCst) >= 2, "part 2 was tried again after its 500: {seen:?}");
    assert!(!seen.iter().any(Seen::is_complete), "an upload with a failed part is never completed: {seen:?}");
    let abort = seen.iter().find(|r| r.is_abort()).expect("the multipart upload is aborted");
    assert!(matches!(abort.status, Some(200 | 204)), "the abort succeeded: {abort:?}");
    assert!(s3.pending_uploads().is_empty(), "no multipart upload is left in s3s-fs: {:?}", s3.pending_uploads());
    assert!(!s3.object_file(&key).exists(), "no object under {key} after the failed upload");
    let log = ncps.log_since(since);
    assert!(log.contains("trying again"), "the 500 was retried with back-off: {log}");

    // The store works again: the next miss stores the NAR, and it is then served from S3.
    proxy.set_rule(|_| Fault::Pass);
    assert!(complete_or_clean_failure(&ncps, nar_path, nar), "the next request is a complete, verified body");
    assert!(wait_until(Duration::from_secs(30), || s3.object_file(&key).exists()), "{key} is stored: {:?}", proxy.seen());
    assert_eq!(std::fs::read(s3.object_file(&key)).unwrap().len(), nar.len(), "the whole NAR is the object");
    let hits_before = up.hits(nar_path);
    assert!(complete_or_clean_failure(&ncps, nar_path, nar), "a hit from S3 is the verified NAR");
    assert_eq!(up.hits(nar_path), hits_before, "served from the bucket, not the upstream");
}

#[test]
fn a_single_transient_500_on_an_upload_part_is_retried_with_back_off_and_the_upload_succeeds() {
    if must_skip_without_nix() {
        return;
    }
    let Some(s3) = S3sFs::start() else { return };
    let proxy = FaultProxy::start(s3.port);
    let cache = SyntheticCache::new("s3-one-500", &[20 << 20]);
    let (store_hash, nar_path, nar) = &cache.paths[0];
    let key = object_key(nar_path);
    let up = Upstream::serve_dir(cache.dir.path());
    let ncps = ncps_on_bucket(&up, &cache.public_key, &s3, Some(proxy.port));
    assert_eq!(ncps.get(&format!("/{store_hash}.narinfo")).status, 200);
    let once = std::sync::atomic::AtomicBool::new(false);
    proxy.set_rule(move |r| {
        if r.is_upload_part() && r.query("partNumber") == Some("2") && !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Fault::Status500;
        }
        Fault::Pass
    });
    assert!(complete_or_clean_failure(&ncps, nar_path, nar), "the client gets the verified NAR");
    assert!(wait_until(Duration::from_secs(30), || s3.object_file(&key).exists()), "{key} is stored: {:?}", proxy.seen());
    // The object appears before the proxy has relayed (and noted) the answer to the request
    // that completed it: the note is waited for.
    let completed = |proxy: &FaultProxy| proxy.seen().iter().any(|r| r.is_complete() && r.status == Some(200));
    assert!(wait_until(Duration::from_secs(10), || completed(&proxy)), "the upload completed: {:?}", proxy.seen());
    let seen = proxy.seen();
    let part2: Vec<_> = seen.iter().filter(|r| r.is_upload_part() && r.query("partNumber") == Some("2")).collect();
    assert_eq!(part2.len(), 2, "part 2: one 500, one retry: {seen:?}");
    assert_eq!((part2[0].fault, part2[1].status), (Fault::Status500, Some(200)));
    assert!(!seen.iter().any(Seen::is_abort), "nothing aborted: {seen:?}");
    assert_eq!(std::fs::read(s3.object_file(&key)).unwrap(), *nar, "the object is the whole NAR");
    assert!(s3.pending_uploads().is_empty(), "{:?}", s3.pending_uploads());
}

/// Restarts `ncps` with room for none of its entries, so that the pass at start removes every
/// one; waits until the bucket holds none and the proxy has noted at least `n` requests that
/// `kind` picks (`what` they are, for the failure), and returns what the proxy saw since the
/// restart. The proxy notes a request once it has relayed the whole answer, which may be after
/// the objects are gone: its list is waited for, not read at once.
fn evict_everything(ncps: &mut Ncps, s3: &S3sFs, proxy: &FaultProxy, kind: fn(&Seen) -> bool, n: usize, what: &str) -> Vec<Seen> {
    let before = proxy.seen().len();
    ncps.restart_with_flag("--cache-max-size", Some("1K"));
    assert!(
        wait_until(Duration::from_secs(30), || s3.objects("narinfo").is_empty() && s3.objects("nar").is_empty()),
        "the bucket is emptied: {:?} {:?}",
        s3.objects("narinfo"),
        s3.objects("nar")
    );
    let since_restart = || proxy.seen().split_off(before);
    assert!(
        wait_until(Duration::from_secs(10), || since_restart().iter().filter(|r| kind(r)).count() >= n),
        "{what}: {:?}",
        since_restart()
    );
    since_restart()
}

#[test]
fn eviction_on_a_bucket_removes_its_objects_a_thousand_to_a_request_or_one_by_one_from_a_store_without_delete_objects() {
    if must_skip_without_nix() {
        return;
    }
    let Some(s3) = S3sFs::start() else { return };
    let proxy = FaultProxy::start(s3.port);
    let cache = SyntheticCache::new("s3-evict-many", &[4096; 10]);
    let up = Upstream::serve_dir(cache.dir.path());
    let mut ncps = ncps_on_bucket(&up, &cache.public_key, &s3, Some(proxy.port));
    fetch_all(&ncps, &cache, &s3);
    assert_eq!(s3.objects("narinfo").len(), 10);
    let seen = evict_everything(&mut ncps, &s3, &proxy, Seen::is_delete_many, 3, "DeleteObjects for the narinfos, the NARs and their zstd copies");
    assert!(seen.iter().filter(|r| r.is_delete_many()).all(|r| r.status == Some(200)), "{seen:?}");
    assert!(!seen.iter().any(Seen::is_delete_one), "no object went on its own: {seen:?}");

    // A store that does not take DeleteObjects: refused once, then one DELETE per object.
    proxy.set_rule(|r| if r.is_delete_many() { Fault::Status501 } else { Fault::Pass });
    ncps.restart_with_flag("--cache-max-size", None);
    fetch_all(&ncps, &cache, &s3);
    let since = ncps.log_len();
    let seen = evict_everything(&mut ncps, &s3, &proxy, Seen::is_delete_one, 30, "a DELETE per narinfo, NAR and zstd copy");
    assert_eq!(seen.iter().filter(|r| r.is_delete_many()).count(), 1, "refused once, not tried again: {seen:?}");
    let log = ncps.log_since(since);
    assert!(log.contains("does not take DeleteObjects"), "{log}");
}

/// The bucket key of the NAR served at `nar_path` (`/nar/<name>` is kept as `nar/<name>`).
fn object_key(nar_path: &str) -> String {
    nar_path.trim_start_matches('/').to_string()
}

/// Fetches every path of `cache` through ncps (narinfo, then the whole NAR) and waits until
/// each is an object of the bucket and recorded in the index (ncps logs "verified and stored"
/// after both; the client has its bytes before either, so a test that kills ncps next must
/// wait for the line, or the start-up check rightly removes an object nobody vouched for).
fn fetch_all(ncps: &Ncps, cache: &SyntheticCache, s3: &S3sFs) {
    for (store_hash, nar_path, nar) in &cache.paths {
        assert_eq!(ncps.get(&format!("/{store_hash}.narinfo")).status, 200);
        assert!(complete_or_clean_failure(ncps, nar_path, nar), "{nar_path} through ncps");
        let key = object_key(nar_path);
        assert!(wait_until(Duration::from_secs(20), || s3.object_file(&key).exists()), "{key} in the bucket");
        let file = nar_path.rsplit('/').next().unwrap_or(nar_path);
        let stored = wait_until(Duration::from_secs(20), || line_with_in(&ncps.log(), &format!("nar {file}:"), "verified and stored"));
        assert!(stored, "{file} recorded as stored:\n{}", ncps.log());
    }
}

/// `ncps fsck [--repair]` of the data path `data` and the bucket `flags`: exit code, stdout
/// and stderr.
fn fsck_on_bucket(data: &std::path::Path, flags: &[String], repair: bool) -> (Option<i32>, String, String) {
    let mut c = ncps_command();
    c.arg("fsck");
    if repair {
        c.arg("--repair");
    }
    c.arg("--cache-data-path").arg(data).args(flags);
    let out = run_with_timeout(c, Duration::from_secs(120)).expect("ncps fsck");
    (out.status.code(), out.stdout, out.stderr)
}

fn summary_of(stdout: &str) -> &str {
    stdout.lines().find(|l| l.starts_with("fsck: checked ")).unwrap_or_else(|| panic!("no summary in:\n{stdout}"))
}

#[test]
fn fsck_on_the_bucket_hashes_every_object_finds_corrupt_missing_and_orphaned_ones_and_repair_lets_ncps_fetch_them_again() {
    if must_skip_without_nix() {
        return;
    }
    let Some(s3) = S3sFs::start() else { return };
    let proxy = FaultProxy::start(s3.port);
    let cache = SyntheticCache::new("s3-fsck", &[70_000, 80_000, 90_000]);
    let up = Upstream::serve_dir(cache.dir.path());
    let mut ncps = ncps_on_bucket(&up, &cache.public_key, &s3, None);
    fetch_all(&ncps, &cache, &s3);
    ncps.stop();
    let data = ncps.data_dir().to_path_buf();
    let flags = s3.flags();

    let (code, out, err) = fsck_on_bucket(&data, &flags, false);
    assert_eq!(code, Some(0), "fsck of a sound bucket:\n{out}{err}");
    assert_eq!(summary_of(&out), "fsck: checked 3 narinfo(s) and 3 NAR(s): 0 missing, 0 orphaned, 0 corrupt");
    assert!(err.contains("fsck: checking s3://"), "stderr says what is checked: {err}");
    assert!(!format!("{out}{err}").contains(S3_SECRET_KEY), "the secret is in the output");

    // Damage: one byte of an object flipped (same size), one object gone, one the index does not know.
    let key = |i: usize| object_key(&cache.paths[i].1);
    let flipped = s3.object_file(&key(0));
    let mut bytes = std::fs::read(&flipped).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&flipped, &bytes).unwrap();
    std::fs::remove_file(s3.object_file(&key(1))).unwrap();
    let orphan_name = format!("{}.nar", "1".repeat(52));
    let orphan = s3.object_file(&format!("nar/{orphan_name}"));
    std::fs::write(&orphan, b"nobody indexed this").unwrap();

    let (code, out, err) = fsck_on_bucket(&data, &flags, false);
    assert_eq!(code, Some(1), "fsck finding problems exits 1:\n{out}{err}");
    assert_eq!(summary_of(&out), "fsck: checked 3 narinfo(s) and 3 NAR(s): 1 missing, 1 orphaned, 1 corrupt");
    let line_with = |a: &str, b: &str| out.lines().any(|l| l.contains(a) && l.contains(b));
    let stem = |i: usize| cache.paths[i].1.trim_start_matches("/nar/").trim_end_matches(".nar").to_string();
    assert!(line_with("corrupt", &stem(0)) && line_with("sha256", &stem(0)), "the flipped object is corrupt:\n{out}");
    assert!(line_with("missing", &stem(1)), "the removed object is missing:\n{out}");
    assert!(line_with("orphan", &orphan_name), "the unknown object is an orphan:\n{out}");
    assert!(orphan.exists() && flipped.exists(), "fsck without --repair changes nothing");

    let (code, out, err) = fsck_on_bucket(&data, &flags, true);
    assert_eq!(code, Some(0), "fsck --repair:\n{out}{err}");
    assert!(!orphan.exists() && !flipped.exists(), "the orphan and the corrupt object are removed");
    let (code, out, err) = fsck_on_bucket(&data, &flags, false);
    assert_eq!(code, Some(0), "fsck after --repair:\n{out}{err}");
    assert!(summary_of(&out).ends_with(": 0 missing, 0 orphaned, 0 corrupt"), "{out}");

    // A NAR whose GET is reset every time is unreadable: reported, never repaired.
    let reset_key = key(2);
    proxy.set_rule(move |r| if r.method == "GET" && r.target.contains(&reset_key) { Fault::Reset } else { Fault::Pass });
    let (code, out, err) = fsck_on_bucket(&data, &s3.flags_via(proxy.port), true);
    assert_eq!(code, Some(1), "an unreadable NAR makes fsck exit 1, even with --repair:\n{out}{err}");
    assert!(line_with_in(&out, "unreadable", &stem(2)), "the NAR is named unreadable:\n{out}");
    assert!(summary_of(&out).ends_with("0 corrupt, 1 unreadable"), "{out}");
    assert!(s3.object_file(&key(2)).exists(), "a failed request never removes an object");
    proxy.set_rule(|_| Fault::Pass);

    // Served again: the two broken NARs fetched (and verified) again, the sound one from S3.
    ncps.restart();
    for (i, (_, nar_path, nar)) in cache.paths.iter().enumerate() {
        let before = up.hits(nar_path);
        assert!(complete_or_clean_failure(&ncps, nar_path, nar), "{nar_path} after --repair");
        assert_eq!(up.hits(nar_path) - before, u64::from(i < 2), "{nar_path}: from upstream only if it was repaired");
    }
}

fn line_with_in(out: &str, a: &str, b: &str) -> bool {
    out.lines().any(|l| l.contains(a) && l.contains(b))
}

#[test]
fn the_start_up_check_rides_out_failed_listings_with_back_off_removes_nothing_for_a_failed_request_and_finishes() {
    if must_skip_without_nix() {
        return;
    }
    let Some(s3) = S3sFs::start() else { return };
    let proxy = FaultProxy::start(s3.port);
    let cache = SyntheticCache::new("s3-check", &[50_000, 60_000]);
    let up = Upstream::serve_dir(cache.dir.path());
    let mut ncps = ncps_on_bucket(&up, &cache.public_key, &s3, Some(proxy.port));
    fetch_all(&ncps, &cache, &s3);
    ncps.kill9();
    let orphan = s3.object_file(&format!("nar/{}.nar", "1".repeat(52)));
    std::fs::write(&orphan, b"nobody indexed this").unwrap();

    // The check's listings (a thousand keys a page) fail: the first six with a 500, which is
    // more than the store's own retries of one request; then the store answers again.
    let failures = std::sync::atomic::AtomicU32::new(0);
    proxy.set_rule(move |r| {
        if r.is_listing() && r.query("max-keys") == Some("1000") && failures.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 6 {
            return Fault::Status500;
        }
        Fault::Pass
    });
    let since = ncps.log_len();
    ncps.restart();
    let log = ncps.wait_for_log(since, "start-up check: done", Duration::from_secs(120));
    assert!(log.contains("start-up check:") && log.contains("trying again in"), "the check waited and tried again:\n{log}");
    assert!(!log.contains("start-up check: stopped"), "the check did not stop at the failure:\n{log}");
    assert!(proxy.seen().iter().filter(|r| r.fault == Fault::Status500).count() == 6, "{:?}", proxy.seen());
    assert!(!orphan.exists(), "the check went on to the end: the orphan is removed");
    for (_, nar_path, nar) in &cache.paths {
        let key = object_key(nar_path);
        assert!(s3.object_file(&key).exists(), "{key} is still in the bucket");
        let before = up.hits(nar_path);
        assert!(complete_or_clean_failure(&ncps, nar_path, nar));
        assert_eq!(up.hits(nar_path), before, "{nar_path} is a hit from the bucket");
    }
}

/// With a PostgreSQL index other replicas share, an object the index does not vouch for may be
/// one a replica has just written and not yet recorded: fsck leaves young ones alone, says so,
/// and repairs only old ones.
#[cfg(feature = "postgres")]
#[test]
fn fsck_with_a_shared_index_leaves_young_unindexed_objects_alone_and_says_so_but_removes_old_ones() {
    if must_skip_without_nix() {
        return;
    }
    let version = std::process::Command::new(ncps_bin()).arg("--version").output().expect("ncps --version");
    if !String::from_utf8_lossy(&version.stdout).contains("postgres") {
        eprintln!("[e2e] skipped: {} was built without --features postgres", ncps_bin());
        return;
    }
    let Some(s3) = S3sFs::start() else { return };
    let cluster = crate::support::pg_cluster::shared();
    let url = cluster.create_database("s3fsck").expect("a database");
    let cache = SyntheticCache::new("s3-fsck-shared", &[40_000]);
    let up = Upstream::serve_dir(cache.dir.path());
    let mut flags = s3.flags();
    flags.extend(["--cache-database-url".to_string(), url.clone()]);
    let extra: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut ncps = Ncps::for_upstreams_with(&[up.url()], &[&cache.public_key], &extra);
    fetch_all(&ncps, &cache, &s3);
    ncps.stop();

    let young_name = format!("{}.nar", "1".repeat(52));
    let old_name = format!("{}.nar", "2".repeat(52));
    let young = s3.object_file(&format!("nar/{young_name}"));
    let old = s3.object_file(&format!("nar/{old_name}"));
    std::fs::write(&young, b"a replica is recording this").unwrap();
    std::fs::write(&old, b"nobody indexed this").unwrap();
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    std::fs::File::options().write(true).open(&old).unwrap().set_modified(two_hours_ago).unwrap();

    let (code, out, err) = fsck_on_bucket(ncps.data_dir(), &flags, true);
    assert_eq!(code, Some(0), "fsck --repair:\n{out}{err}");
    assert!(err.contains("the index is shared"), "stderr says why young objects are spared: {err}");
    assert!(line_with_in(&out, "left alone", &young_name), "the young object is named as left alone:\n{out}");
    assert!(line_with_in(&out, "orphaned", &old_name), "the old one is an orphan:\n{out}");
    assert!(summary_of(&out).ends_with(": 0 missing, 1 orphaned, 0 corrupt, 1 young left alone"), "{out}");
    assert!(young.exists(), "a young object is never removed with a shared index");
    assert!(!old.exists(), "an old orphan is removed");
    assert!(!format!("{out}{err}").contains(crate::support::pg_cluster::PASSWORD), "the password is never shown");
}
