//! End-to-end specification of ncps under concurrent load: each miss is
//! fetched from upstream once however many clients want it, every client gets
//! the same verified bytes, NAR bytes are streamed as they arrive rather than
//! after the download, and floods of misses are answered and remembered.
//!
//! Run: `cargo test --test e2e concurrency::` (add `-- --nocapture` for timings).

use crate::support::*;
use std::fs;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// `n` threads released together, each running `f(i)`; results in order.
fn together<T: Send + 'static>(n: usize, f: impl Fn(usize) -> T + Send + Sync + 'static) -> Vec<T> {
    let barrier = Arc::new(Barrier::new(n));
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (barrier, f) = (barrier.clone(), f.clone());
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    barrier.wait();
                    f(i)
                })
                .unwrap()
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn fifty_concurrent_clients_of_one_nar_share_one_upstream_download_and_get_identical_bytes() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode_for(Mode::Slow(4_000_000), Target::Nar);
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let (nar, size) = ncps_nar_path(&ncps, &fx.big);
    let upstream_path = upstream_nar_path(fx, Compression::Xz, &fx.big);
    let original = fs::read(fx.cache_dir(Compression::Xz).join(upstream_path.trim_start_matches('/'))).unwrap();
    assert_eq!(original.len() as u64, size);
    let want = sha256(&original);

    let addr = ncps.addr;
    let t = Instant::now();
    let results = together(50, move |_| raw_get_hashed(addr, &nar, Duration::from_secs(30)));
    eprintln!("50 concurrent NAR downloads took {:?}", t.elapsed());
    let mut failures = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(h) if h.status == 200 && h.len == size && h.sha256 == want && h.end == BodyEnd::Eof => {}
            Ok(h) => failures.push(format!(
                "client {i}: status {}, {} of {size} bytes, {}, end {:?}",
                h.status,
                h.len,
                if h.sha256 == want { "same hash" } else { "DIFFERENT hash" },
                h.end
            )),
            Err(e) => failures.push(format!("client {i}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{} of 50 clients failed:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(up.hits(&upstream_path), 1, "the upstream must be asked for the NAR exactly once");
    assert_eq!(up.bytes_sent(&upstream_path), size, "and send it exactly once");
}

#[test]
fn fifty_concurrent_gets_of_one_narinfo_cause_one_upstream_request() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    // ~200 bytes every 100 ms: the narinfo takes about half a second to arrive.
    up.set_mode_for(Mode::Slow(2_000), Target::Narinfo);
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let path = format!("/{}.narinfo", store_hash(&fx.top));
    let addr = ncps.addr;
    let p = path.clone();
    let results = together(50, move |_| http_get(&format!("http://{addr}{p}")));
    let bodies: Vec<Vec<u8>> = results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let r = r.unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert_eq!(r.status, 200, "client {i}");
            r.body
        })
        .collect();
    assert!(bodies.iter().all(|b| b == &bodies[0]), "every client must get the same narinfo");
    let ni = NarInfo::parse(&String::from_utf8_lossy(&bodies[0]));
    assert_eq!(ni.get("StorePath"), Some(fx.top.as_str()));
    assert_eq!(up.hits(&path), 1, "the upstream must be asked for the narinfo exactly once");
}

#[test]
fn nar_bytes_reach_the_client_before_the_upstream_has_sent_them_all() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode_for(Mode::Slow(2_000_000), Target::Nar);
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let (nar, size) = ncps_nar_path(&ncps, &fx.big);
    let upstream_path = upstream_nar_path(fx, Compression::Xz, &fx.big);

    let mut c = RawConn::connect(ncps.addr, Duration::from_secs(30)).unwrap();
    c.send(&get_request(&nar)).unwrap();
    let (status, _) = c.read_head().unwrap();
    assert_eq!(status, 200);
    let mut buf = vec![0u8; 64 * 1024];
    let mut h = Sha256::new();
    let first = {
        let n = c.read_body_chunk(&mut buf).expect("first body bytes");
        assert!(n > 0, "the body ended before any byte arrived");
        h.update(&buf[..n]);
        n as u64
    };
    let upstream_sent = up.bytes_sent(&upstream_path);
    eprintln!("first {first} body bytes arrived when the upstream had sent {upstream_sent} of {size}");
    assert!(
        upstream_sent < size,
        "the client's first bytes arrived only after the upstream had sent the whole NAR \
         ({upstream_sent} of {size}): ncps does not stream"
    );
    let (rest, end) = c.drain_body(|b| h.update(b));
    assert_eq!((first + rest, end), (size, BodyEnd::Eof));
    let name = nar.rsplit('/').next().unwrap();
    assert_eq!(nix32(&h.finish()), name.split('.').next().unwrap(), "the streamed bytes verify");
}

#[test]
fn a_flood_of_distinct_narinfo_misses_is_answered_and_remembered() {
    let dir = TempDir::new("empty-upstream");
    fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\nWantMassQuery: 1\n").unwrap();
    let up = Upstream::serve_dir(dir.path());
    let ncps = Ncps::for_upstreams(&[up.url()], SOME_VALID_PUBLIC_KEY);
    let salt = std::process::id() as u64;
    let hashes: Vec<String> = (0..200).map(|i| random_hash(salt * 1000 + i)).collect();
    let mut uniq = hashes.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 200);

    // 25 parallel connections, like Nix's http-connections default, 200 lookups.
    let run = |hashes: &[String]| -> (Vec<String>, Duration) {
        let queue = Arc::new(Mutex::new(hashes.to_vec()));
        let addr = ncps.addr;
        let t = Instant::now();
        let failures = together(25, move |_| {
            let mut bad = Vec::new();
            loop {
                let Some(h) = queue.lock().unwrap().pop() else { break };
                match http_get(&format!("http://{addr}/{h}.narinfo")) {
                    Ok(r) if r.status == 404 => {}
                    Ok(r) => bad.push(format!("{h}: status {}", r.status)),
                    Err(e) => bad.push(format!("{h}: {e}")),
                }
            }
            bad
        });
        (failures.into_iter().flatten().collect(), t.elapsed())
    };

    let (failures, took) = run(&hashes);
    eprintln!("200 distinct misses took {took:?}");
    assert!(failures.is_empty(), "misses:\n{}", failures.join("\n"));
    assert!(took < Duration::from_secs(20), "200 misses took {took:?}");
    let asked = up.hits_where(|p| p.ends_with(".narinfo"));
    assert_eq!(asked, 200, "each miss asks the upstream once");

    let (failures, took) = run(&hashes);
    eprintln!("the same 200 misses again took {took:?}");
    assert!(failures.is_empty(), "repeated misses:\n{}", failures.join("\n"));
    assert_eq!(
        up.hits_where(|p| p.ends_with(".narinfo")),
        200,
        "within the negative-cache TTL a repeated miss must not reach the upstream"
    );
}

#[test]
fn a_remembered_miss_is_asked_again_after_the_negative_ttl() {
    let dir = TempDir::new("empty-upstream");
    fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\nWantMassQuery: 1\n").unwrap();
    let up = Upstream::serve_dir(dir.path());
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[SOME_VALID_PUBLIC_KEY], &["--cache-negative-ttl", "1s"]);
    let path = format!("/{}.narinfo", random_hash(std::process::id() as u64));
    let asked = || up.hits(&path);
    assert_eq!(ncps.get(&path).status, 404);
    assert_eq!(ncps.get(&path).status, 404);
    assert_eq!(asked(), 1, "a second miss within the TTL is answered from memory");
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(ncps.get(&path).status, 404);
    assert_eq!(asked(), 2, "after the TTL the upstream is asked again (it may have the path now)");

    let off = Ncps::for_upstreams_with(&[up.url()], &[SOME_VALID_PUBLIC_KEY], &["--cache-negative-ttl", "0s"]);
    up.reset_hits();
    assert_eq!(off.get(&path).status, 404);
    assert_eq!(off.get(&path).status, 404);
    assert_eq!(asked(), 2, "a TTL of 0 remembers nothing");
}

#[test]
fn downloads_left_running_by_departed_clients_are_bounded_and_the_next_gets_503() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    up.set_mode_for(Mode::Slow(20), Target::Nar);
    // Four workers allow four downloads at once.
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--server-workers", "4"]);
    let nars: Vec<String> = fx.many[..5]
        .iter()
        .map(|p| {
            let r = ncps.get(&format!("/{}.narinfo", store_hash(p)));
            assert_eq!(r.status, 200);
            format!("/{}", NarInfo::parse(&r.text()).get("URL").unwrap())
        })
        .collect();
    for (i, nar) in nars[..4].iter().enumerate() {
        // Ask, then leave once the download has started: it goes on for the cache's sake.
        // Each from another host (127.0.0.10-13): one host may start only its share of the
        // slots (isolation::one_host_cannot_take_every_download_slot).
        let src = std::net::IpAddr::from([127, 0, 0, 10 + i as u8]);
        let stream = connect_from(src, ncps.addr, None).unwrap();
        let mut c = RawConn::from_stream(stream, Duration::from_secs(10)).unwrap();
        c.send(&get_request(nar)).unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || up.hits_where(|p| p.starts_with("/nar/")) > i as u64),
            "the download of {nar} did not start"
        );
    }
    // The clients left, so their workers are free again (they notice the hang-up while
    // waiting for bytes), but the four downloads go on.
    let t = Instant::now();
    let r = ncps.get(&nars[4]);
    assert!(t.elapsed() < Duration::from_secs(3), "answered in {:?}: workers are still held", t.elapsed());
    assert_eq!(r.status, 503, "a fifth download while four run");
    assert!(r.header("retry-after").is_some(), "503 says when to retry");
    assert_eq!(ncps.get("/nix-cache-info").status, 200, "ncps keeps answering");
    up.set_mode(Mode::Normal);
}

#[test]
fn parallel_nix_clients_share_each_download() {
    parallel_clients_share_each_download(&[NixClient::Nix2_8; 3]);
}

#[test]
fn nix_2_8_and_nix_2_26_clients_at_once_share_each_download() {
    use NixClient::{Nix2_26, Nix2_8};
    parallel_clients_share_each_download(&[Nix2_8, Nix2_26, Nix2_8, Nix2_26]);
}

/// `clients` fetch the top closure through one ncps at once, while the upstream sends NARs
/// at 8 MB/s: each narinfo and NAR is fetched from the upstream once.
fn parallel_clients_share_each_download(clients: &[NixClient]) {
    let Some(fx) = fixture_or_skip() else { return };
    if clients.iter().any(|c| c.must_skip()) {
        return;
    }
    let up = Upstream::for_cache(fx, Compression::Zstd);
    up.set_mode_for(Mode::Slow(8_000_000), Target::Nar);
    let ncps = Ncps::for_upstreams(&[up.url()], &fx.up1_public_key);
    let key = ncps.pubkey();
    let url = ncps.url();
    let top = fx.top.clone();
    let t = Instant::now();
    let list = clients.to_vec();
    let results = together(clients.len(), move |i| list[i].copy_from(&url, &[&top], &key));
    eprintln!("{} parallel nix copies took {:?}", clients.len(), t.elapsed());
    for (i, r) in results.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("nix client {i} ({}): {e}", clients[i].label()));
    }
    for path in &fx.top_closure {
        let p = upstream_nar_path(fx, Compression::Zstd, path);
        assert_eq!(up.hits(&p), 1, "upstream requests for the NAR of {path}");
        let n = format!("/{}.narinfo", store_hash(path));
        assert_eq!(up.hits(&n), 1, "upstream requests for the narinfo of {path}");
    }
}

/// Clients that ask for a large NAR and then stop reading hold a worker only until
/// `--server-write-timeout`; meanwhile and afterwards other clients are served.
#[test]
fn clients_that_stop_reading_are_dropped_and_do_not_starve_others() {
    use std::io::{Read, Write};
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::None);
    let ncps = Ncps::for_upstreams_with(
        &[up.url()],
        &[&fx.up1_public_key],
        &["--server-workers", "2", "--server-write-timeout", "1s"],
    );
    let (nar, size) = ncps_nar_path(&ncps, &fx.big);
    // Fill the cache first, so the stalled clients below are hits sent with sendfile.
    let first = raw_get_hashed(ncps.addr, &nar, Duration::from_secs(30)).expect("first fetch");
    assert_eq!((first.status, first.len), (200, size));

    // Two clients (as many as there are workers) request the NAR and never read.
    let stalled: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(ncps.addr).unwrap();
            write!(s, "GET {nar} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(200));

    // Small answers come from the poll loop, so they do not wait for a worker at all.
    let t = Instant::now();
    assert_eq!(ncps.get("/nix-cache-info").status, 200);
    assert!(t.elapsed() < Duration::from_secs(1), "answered in {:?}", t.elapsed());

    // A NAR needs a worker: it is served at once if the stalled clients went to the pool of
    // misses (the NAR may not be visible in the store yet when they ask), else once the
    // write timeout has freed one.
    let t = Instant::now();
    let after = raw_get_hashed(ncps.addr, &nar, Duration::from_secs(30)).expect("NAR after the stall");
    assert_eq!((after.status, after.len), (200, size));
    assert!(t.elapsed() < Duration::from_secs(10), "served in {:?}", t.elapsed());

    // The stalled clients were cut off: reading now ends well short of the whole NAR.
    let log = ncps.wait_for_log(0, "client stopped reading", Duration::from_secs(20));
    if log.matches("client stopped reading").count() < 2 {
        wait_until(Duration::from_secs(20), || ncps.log().matches("client stopped reading").count() >= 2);
    }
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        assert!(total < size, "a client that stopped reading still got the whole NAR");
    }
}
