//! End-to-end specification of isolation (issue 15): no slow, greedy or hostile peer takes
//! the cache from everyone else. Slow uploaders and slow readers are cut off at the minimum
//! rates; one host's idle sockets cannot lock out another address; keep-alive loopers do not
//! keep every worker; a flood of misses against a hanging upstream does not take the workers
//! that serve hits. A second client host is 127.0.0.2 ([`connect_from`]).
//!
//! No test measures latency: each bounds, with a generous deadline, what used to take seconds
//! to minutes (the numbers), or asserts an order (the hit is answered while the flood
//! is still unanswered).
//!
//! Run: `cargo test --test e2e isolation::`.

use crate::support::*;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

fn second_host() -> IpAddr {
    IpAddr::from([127, 0, 0, 2])
}

/// Makes the NAR of `store_path` a hit (fetched once, stored) and returns its path and size.
/// The tests use the 8 MiB NAR: NARs of at most 16 KiB are answered by the poll loop, with no
/// worker, so they would not show whether a worker was free.
fn stored_hit(ncps: &Ncps, store_path: &str) -> (String, u64) {
    let (nar, size) = ncps_nar_path(ncps, store_path);
    let first = raw_get_hashed(ncps.addr, &nar, Duration::from_secs(30)).expect("first fetch");
    assert_eq!((first.status, first.len), (200, size));
    let stored = ncps.wait_for_stored_nars(1);
    assert_eq!(stored.len(), 1, "the NAR is stored");
    (nar, size)
}

/// GET `path` from `src` on a fresh connection: the status and body length.
fn get_from(src: IpAddr, ncps: &Ncps, path: &str, timeout: Duration) -> std::io::Result<(u16, u64)> {
    let mut s = connect_from(src, ncps.addr, None)?;
    s.set_read_timeout(Some(timeout))?;
    keep_alive_get(&mut s, path)
}

/// A PUT of `len` bytes that sends one byte per second; returns how many it sent before the
/// server answered or closed.
fn drip_upload(addr: std::net::SocketAddr, path: &str, len: u64) -> u64 {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "PUT {path} HTTP/1.1\r\nHost: ncps-e2e\r\nAuthorization: Bearer w-token\r\nContent-Length: {len}\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 512];
    for sent in 0..len {
        match s.read(&mut buf) {
            // Answered or closed: the upload is over for the server.
            Ok(_) => return sent,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return sent,
        }
        if s.write_all(b"x").is_err() {
            return sent;
        }
    }
    len
}

#[test]
fn slow_uploads_are_dropped_so_a_hit_waiting_for_their_workers_is_served() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::None);
    let ncps = Ncps::for_upstreams_with(
        &[up.url()],
        &[&fx.up1_public_key],
        &["--server-workers", "2", "--cache-allow-put-verb", "--cache-write-token", "w-token"],
    );
    let (nar, size) = stored_hit(&ncps, &fx.big);
    let from = ncps.log_len();
    // Two uploads at 1 byte/s (the minimum is 16 KiB/s), as many as there are workers. Before
    // the minimum rate, each held its worker for as long as it dripped (here 200 s).
    let addr = ncps.addr;
    let uploaders: Vec<_> = (0..2)
        .map(|i| {
            let path = format!("/nar/{}{}.nar", "0".repeat(51), i);
            thread::spawn(move || drip_upload(addr, &path, 200))
        })
        .collect();
    thread::sleep(Duration::from_millis(500)); // let both uploads reach a worker
    let got = get_from(second_host(), &ncps, &nar, Duration::from_secs(40)).expect("the hit is answered");
    assert_eq!(got, (200, size));
    for u in uploaders {
        let sent = u.join().unwrap();
        assert!(sent < 200, "a 1 byte/s upload was kept until it ended");
    }
    let log = ncps.wait_for_log(from, "request body dropped", Duration::from_secs(30));
    assert!(log.contains("slower than the minimum"), "the log says why:\n{log}");
}

#[test]
fn a_reader_slower_than_the_minimum_send_rate_is_cut_off() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::None);
    // 1 MiB/s so that a reader at 40 KiB/s is cut off after one window, well before the end
    // of the 8 MiB NAR; the write timeout is far away, so it is not what cuts it off.
    let ncps = Ncps::for_upstreams_with(
        &[up.url()],
        &[&fx.up1_public_key],
        &["--server-min-send-rate", "1M", "--server-write-timeout", "120s"],
    );
    let (nar, size) = stored_hit(&ncps, &fx.big);
    let from = ncps.log_len();
    let mut s = connect_from(IpAddr::from([127, 0, 0, 1]), ncps.addr, Some(16 << 10)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {nar} HTTP/1.1\r\nHost: ncps-e2e\r\nConnection: close\r\n\r\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut total = 0u64;
    let mut buf = [0u8; 4096];
    // Cut off means reset: what still sat in the server's send buffer is not delivered.
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(total < size, "a reader at 40 KiB/s got the whole NAR ({total} bytes) instead of being cut off");
    let log = ncps.wait_for_log(from, "slower than the minimum", Duration::from_secs(10));
    assert!(log.contains("aborted"), "the request log says the transfer was cut off:\n{log}");
}

#[test]
fn one_hosts_idle_sockets_do_not_lock_out_another_address() {
    let dir = TempDir::new("empty-upstream");
    std::fs::write(dir.join("nix-cache-info"), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 50\n").unwrap();
    let up = Upstream::serve_dir(dir.path());
    let url = up.url();
    // Under `ulimit -n 64` ncps holds 16 connections at most; idle ones would wait a minute.
    let ncps = Ncps::start_with_fd_limit(
        &[
            "--upstream-cache", &url,
            "--upstream-public-key", SOME_VALID_PUBLIC_KEY,
            "--server-header-timeout", "60s",
            "--server-idle-timeout", "60s",
        ],
        64,
    );
    let from = ncps.log_len();
    // One host fills every slot (and more) with idle keep-alive connections.
    let mut idle = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(ncps.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        if keep_alive_get(&mut s, "/nix-cache-info").is_ok() {
            idle.push(s);
        }
    }
    assert!(idle.len() >= 16, "the first host got its connections ({})", idle.len());
    // Another address is answered at once, not after the other host's sockets time out.
    let got = get_from(second_host(), &ncps, "/nix-cache-info", Duration::from_secs(20)).expect("the second host is answered");
    assert_eq!(got.0, 200);
    let log = ncps.wait_for_log(from, "to make room for 127.0.0.2", Duration::from_secs(5));
    assert!(log.contains("127.0.0.1: closed a waiting connection"), "{log}");
}

#[test]
fn keep_alive_loopers_on_healthz_do_not_starve_another_clients_hit() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::None);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--server-workers", "4"]);
    let (nar, size) = stored_hit(&ncps, &fx.big);
    // As many loopers as workers, each sending its next request as soon as it has the answer:
    // a worker used to keep such a connection for ever (a hit waited 4.8 s).
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let addr = ncps.addr;
    let loopers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, answered) = (stop.clone(), answered.clone());
            thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    if keep_alive_get(&mut s, "/healthz").is_err() {
                        break;
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(10), || answered.load(Ordering::Relaxed) > 100), "the loopers run");
    for _ in 0..5 {
        let t = Instant::now();
        let got = get_from(second_host(), &ncps, &nar, Duration::from_secs(10)).expect("the hit is answered");
        assert_eq!(got, (200, size));
        assert!(t.elapsed() < Duration::from_secs(2), "a hit took {:?} among the loopers", t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    for l in loopers {
        l.join().unwrap();
    }
}

#[test]
fn a_narinfo_miss_flood_against_a_hanging_upstream_does_not_starve_hits() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::None);
    let mut ncps = Ncps::for_upstreams_with(
        &[up.url()],
        &[&fx.up1_public_key],
        &[
            "--server-workers", "2",
            "--server-upstream-workers", "4",
            "--upstream-response-header-timeout", "60s",
        ],
    );
    let (nar, size) = stored_hit(&ncps, &fx.big);
    up.set_mode_for(Mode::Hang, Target::Narinfo);
    // More misses than there are workers of both pools together, each held by the upstream.
    let finished = Arc::new(AtomicU64::new(0));
    let addr = ncps.addr;
    let flood: Vec<_> = (0..12)
        .map(|i| {
            let finished = finished.clone();
            thread::spawn(move || {
                let _ = raw_request(addr, &get_request(&format!("/{i:0>32}.narinfo")), Duration::from_secs(90));
                finished.fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || up.hits_where(|p| p.ends_with(".narinfo")) >= 4),
        "the misses reached the upstream"
    );
    for _ in 0..3 {
        let got = get_from(second_host(), &ncps, &nar, Duration::from_secs(20)).expect("the hit is answered");
        assert_eq!(got, (200, size));
        let got = get_from(IpAddr::from([127, 0, 0, 1]), &ncps, &nar, Duration::from_secs(20)).expect("the hit is answered");
        assert_eq!(got, (200, size));
    }
    assert_eq!(finished.load(Ordering::Relaxed), 0, "the hits were answered while every miss still waited");
    ncps.stop();
    drop(up);
    for f in flood {
        f.join().unwrap();
    }
}

#[test]
fn narinfos_an_upstream_drips_do_not_hold_the_workers_that_serve_hits() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::None);
    let mut ncps = Ncps::for_upstreams_with(
        &[up.url()],
        &[&fx.up1_public_key],
        &["--server-workers", "2", "--server-upstream-workers", "2", "--upstream-body-idle-timeout", "30s"],
    );
    let (nar, size) = stored_hit(&ncps, &fx.big);
    // 1 byte a second never trips the idle timeout: each lookup holds its worker for minutes.
    up.set_mode_for(Mode::Slow(1), Target::Narinfo);
    let finished = Arc::new(AtomicU64::new(0));
    let addr = ncps.addr;
    let drips: Vec<_> = fx.many[..4]
        .iter()
        .map(|p| {
            let (finished, path) = (finished.clone(), format!("/{}.narinfo", store_hash(p)));
            thread::spawn(move || {
                let _ = raw_request(addr, &get_request(&path), Duration::from_secs(60));
                finished.fetch_add(1, Ordering::Relaxed);
            })
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || up.hits_where(|p| p.ends_with(".narinfo")) >= 2),
        "the lookups reached the upstream"
    );
    for _ in 0..3 {
        let got = get_from(second_host(), &ncps, &nar, Duration::from_secs(20)).expect("the hit is answered");
        assert_eq!(got, (200, size));
    }
    assert_eq!(ncps.get("/healthz").status, 200, "/healthz is answered too");
    assert_eq!(finished.load(Ordering::Relaxed), 0, "the hits were answered while the drips went on");
    ncps.stop();
    drop(up);
    for d in drips {
        d.join().unwrap();
    }
}

#[test]
fn one_host_cannot_take_every_download_slot() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    // 4 workers: 4 download slots, of which one host may hold 3.
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--server-workers", "4", "--prometheus-enabled"]);
    let nars: Vec<String> = fx.many.iter().take(5).map(|p| ncps_nar_path(&ncps, p).0).collect();
    assert_eq!(nars.len(), 5, "the fixture has five small paths");
    up.set_mode_for(Mode::Drip(Duration::from_millis(500)), Target::Nar);
    // This host starts three misses whose upstream drips: its whole share.
    let mut held = Vec::new();
    for nar in &nars[..3] {
        let mut c = RawConn::connect(ncps.addr, Duration::from_secs(20)).unwrap();
        c.send(&get_request(nar)).unwrap();
        held.push(c);
    }
    assert!(
        wait_until(Duration::from_secs(10), || metric(&metrics(&ncps), "ncps_downloads_in_flight") == Some(3.0)),
        "three downloads run"
    );
    // A fourth from the same host is refused with a reason, at once...
    let r = ncps.get(&nars[3]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("share"), "{}", r.text());
    ncps.wait_for_log(0, "(its share); answered 503", Duration::from_secs(2));
    // ...while another host still gets its miss started (the dripping upstream would take
    // minutes to send even the head of its answer, so the running downloads are counted).
    let s = connect_from(second_host(), ncps.addr, None).unwrap();
    let mut other = RawConn::from_stream(s, Duration::from_secs(20)).unwrap();
    other.send(&get_request(&nars[4])).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || metric(&metrics(&ncps), "ncps_downloads_in_flight") == Some(4.0)),
        "the other host's download runs beside the three: {}",
        ncps.log()
    );
    assert_eq!(ncps.log().matches("(its share); answered 503").count(), 1, "only the busy host was refused");
    drop((held, other));
}

#[test]
fn nix_substitutes_a_closure_while_another_host_holds_stalled_readers() {
    let Some(fx) = fixture_or_skip() else { return };
    let up = Upstream::for_cache(fx, Compression::Xz);
    let ncps = Ncps::for_upstreams_with(&[up.url()], &[&fx.up1_public_key], &["--server-workers", "4"]);
    let key = format!("{} {}", ncps.pubkey(), fx.up1_public_key);
    // The closure is stored first: what follows are hits.
    NixClient::Nix2_8.copy_from(&ncps.url(), &[&fx.top], &key).expect("the first nix copy");
    ncps.wait_for_stored_nars(fx.top_closure.len());
    let (big, _) = ncps_nar_path(&ncps, &fx.big);
    // Another host asks for the big NAR on six connections and never reads: more than the
    // workers. Each would hold one for its whole write timeout without the minimum rate
    // and the share of workers per host.
    let hogs: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut s = connect_from(second_host(), ncps.addr, Some(4096)).unwrap();
            s.write_all(&get_request(&big)).unwrap();
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    NixClient::Nix2_8
        .copy_from_timeout(&ncps.url(), &[&fx.top], &key, Duration::from_secs(45))
        .expect("nix copy of the closure while the hogs hold their connections");
    eprintln!("nix copy beside six stalled readers took {:?}", t.elapsed());
    drop(hogs);
}
