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
