//! bench/scale.sh's helper (std only).
//!
//!   ncps-scale gen ADDR N CONNS LIST    upload entries 0..N to a running `ncps serve
//!                                        --cache-allow-put-verb` at ADDR over CONNS keep-alive
//!                                        connections; writes LIST (see `list`)
//!   ncps-scale list N LIST              LIST = the N store hashes, 32 bytes each, no separators
//!                                        (fixed width, so wrk's Lua reads it in one go)
//!   ncps-scale wait ADDR PATH T0_NS SECS
//!                                        poll GET PATH until 200; print milliseconds since T0_NS
//!                                        (nanoseconds since the epoch, as `date +%s%N` prints)
//!   ncps-scale show I                   print entry I's narinfo (as uploaded) and NAR size
//!
//! Entry i is a function of i alone: its store path hash, a NAR (a single regular file of
//! 160..415 pseudo-random bytes, a real NAR serialisation), and a narinfo the way `nix copy`
//! uploads one with Compression none (FileHash = NarHash, FileSize = NarSize, the NAR at
//! `nar/<nix32 sha256>.nar`), with 0..3 references to earlier entries and a Deriver. ncps signs
//! it on upload. About 950 bytes stored per entry, like the small entries of a real cache.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------- sha256 ----------
const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h: [u32; 8] =
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes([block[4 * i], block[4 * i + 1], block[4 * i + 2], block[4 * i + 3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

// ---------- nix32 (Nix's base-32: its own alphabet, bytes read from the last) ----------
const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

fn nix32(bytes: &[u8]) -> String {
    let len = (bytes.len() * 8).div_ceil(5);
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = bytes[i] >> j;
        let high = if i + 1 < bytes.len() { (bytes[i + 1] as u16) << (8 - j) } else { 0 };
        out.push(ALPHABET[((low as u16 | high) & 0x1f) as usize] as char);
    }
    out
}

// ---------- entries ----------
const NONCE: &str = "ncps-bench-scale-v1";

fn seed(i: u64) -> [u8; 32] {
    sha256(format!("{NONCE}:{i}").as_bytes())
}

fn store_hash(i: u64) -> String {
    nix32(&seed(i)[..20])
}

fn base_name(i: u64) -> String {
    format!("{}-bench-scale-{i}", store_hash(i))
}

fn nar_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    while out.len() % 8 != 0 {
        out.push(0);
    }
}

/// A NAR of one regular file.
fn nar_of(contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(contents.len() + 128);
    for s in [&b"nix-archive-1"[..], b"(", b"type", b"regular", b"contents"] {
        nar_str(&mut out, s);
    }
    nar_str(&mut out, contents);
    nar_str(&mut out, b")");
    out
}

struct Entry {
    hash: String,
    nar_name: String,
    nar: Vec<u8>,
    narinfo: String,
}

fn entry(i: u64) -> Entry {
    let s = seed(i);
    let len = 160 + s[20] as usize;
    let mut contents = Vec::with_capacity(len + 32);
    let mut k = 0u32;
    while contents.len() < len {
        let mut x = s.to_vec();
        x.extend_from_slice(&k.to_le_bytes());
        contents.extend_from_slice(&sha256(&x));
        k += 1;
    }
    contents.truncate(len);
    let nar = nar_of(&contents);
    let digest = nix32(&sha256(&nar));
    let nar_name = format!("{digest}.nar");
    let mut refs: Vec<String> = Vec::new();
    if i > 0 {
        for r in 0..(s[21] % 4) as usize {
            let j = u64::from_le_bytes(s[24..32].try_into().unwrap()).rotate_left(r as u32 * 16) % i;
            refs.push(base_name(j));
        }
    }
    refs.sort();
    refs.dedup();
    let deriver = format!("{}-bench-scale-{i}.drv", nix32(&sha256(format!("{NONCE}:drv:{i}").as_bytes())[..20]));
    let narinfo = format!(
        "StorePath: /nix/store/{}\nURL: nar/{nar_name}\nCompression: none\nFileHash: sha256:{digest}\n\
         FileSize: {size}\nNarHash: sha256:{digest}\nNarSize: {size}\nReferences: {}\nDeriver: {deriver}\n",
        base_name(i),
        refs.join(" "),
        size = nar.len(),
    );
    Entry { hash: store_hash(i), nar_name, nar, narinfo }
}

// ---------- HTTP/1.1 keep-alive client ----------
struct Conn {
    addr: String,
    r: Option<BufReader<TcpStream>>,
}

impl Conn {
    fn new(addr: &str) -> Conn {
        Conn { addr: addr.to_string(), r: None }
    }

    fn connect(&mut self) -> io::Result<&mut BufReader<TcpStream>> {
        if self.r.is_none() {
            let s = TcpStream::connect(&self.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            self.r = Some(BufReader::with_capacity(16 * 1024, s));
        }
        Ok(self.r.as_mut().unwrap())
    }

    fn once(&mut self, method: &str, path: &str, ctype: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        let r = self.connect()?;
        // ncps takes uploads only with its write token (`NCPS_WRITE_TOKEN`, as scale.sh gives it).
        let auth = std::env::var("NCPS_WRITE_TOKEN").map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\n{auth}Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        r.get_mut().write_all(&req)?;
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let code: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("status line {line:?}")))?;
        let (mut len, mut close) = (0usize, false);
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed in headers"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    len = v.parse().unwrap_or(0);
                } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        let mut resp = vec![0u8; len];
        r.read_exact(&mut resp)?;
        if close {
            self.r = None;
        }
        Ok((code, resp))
    }

    /// One retry on a fresh connection: an idle keep-alive connection may have been closed.
    fn request(&mut self, method: &str, path: &str, ctype: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        match self.once(method, path, ctype, body) {
            Ok(x) => Ok(x),
            Err(_) => {
                self.r = None;
                self.once(method, path, ctype, body)
            }
        }
    }
}

fn put(c: &mut Conn, path: &str, ctype: &str, body: &[u8]) -> Result<(), String> {
    match c.request("PUT", path, ctype, body) {
        Ok((200..=299, _)) => Ok(()),
        Ok((code, resp)) => Err(format!("PUT {path}: HTTP {code}: {}", String::from_utf8_lossy(&resp).trim())),
        Err(e) => Err(format!("PUT {path}: {e}")),
    }
}

// ---------- commands ----------
fn write_list(n: u64, path: &str) -> io::Result<()> {
    let mut f = io::BufWriter::new(std::fs::File::create(path)?);
    for i in 0..n {
        f.write_all(store_hash(i).as_bytes())?;
    }
    f.flush()
}

fn gen(addr: &str, n: u64, conns: usize, list: &str) -> Result<(), String> {
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..conns {
        let (next, done, bytes, failed, addr) = (next.clone(), done.clone(), bytes.clone(), failed.clone(), addr.to_string());
        workers.push(std::thread::spawn(move || -> Result<(), String> {
            let mut c = Conn::new(&addr);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let e = entry(i);
                let r = put(&mut c, &format!("/nar/{}", e.nar_name), "application/x-nix-nar", &e.nar)
                    .and_then(|_| put(&mut c, &format!("/{}.narinfo", e.hash), "text/x-nix-narinfo", e.narinfo.as_bytes()));
                if let Err(msg) = r {
                    failed.store(true, Ordering::Relaxed);
                    return Err(format!("entry {i}: {msg}"));
                }
                bytes.fetch_add((e.nar.len() + e.narinfo.len()) as u64, Ordering::Relaxed);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let progress = {
        let (done, failed) = (done.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut last = (Instant::now(), 0u64);
            loop {
                std::thread::sleep(Duration::from_millis(200));
                let d = done.load(Ordering::Relaxed);
                if d >= n || failed.load(Ordering::Relaxed) {
                    return;
                }
                if last.0.elapsed() >= Duration::from_secs(10) {
                    let rate = (d - last.1) as f64 / last.0.elapsed().as_secs_f64();
                    let eta = if rate > 0.0 { (n - d) as f64 / rate } else { f64::INFINITY };
                    eprintln!(
                        "ncps-scale: {d}/{n} entries ({:.0}%), {rate:.0}/s now, {:.0} s elapsed, ETA {eta:.0} s",
                        d as f64 * 100.0 / n as f64,
                        started.elapsed().as_secs_f64()
                    );
                    last = (Instant::now(), d);
                }
            }
        })
    };
    let mut first_err = None;
    for w in workers {
        if let Err(e) = w.join().unwrap_or_else(|_| Err("worker panicked".into())) {
            first_err.get_or_insert(e);
        }
    }
    let _ = progress.join();
    if let Some(e) = first_err {
        return Err(e);
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "ncps-scale: uploaded {n} entries ({} bytes before signing) in {secs:.1} s: {:.0} entries/s over {conns} connections",
        bytes.load(Ordering::Relaxed),
        n as f64 / secs
    );
    write_list(n, list).map_err(|e| format!("writing {list}: {e}"))
}

fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

fn wait(addr: &str, path: &str, t0: u128, secs: f64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        let mut c = Conn::new(addr);
        if let Ok((200, _)) = c.once("GET", path, "text/plain", b"") {
            println!("{:.1}", (now_ns().saturating_sub(t0)) as f64 / 1e6);
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no 200 for GET {path} from {addr} within {secs} s"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| a.get(i).cloned().unwrap_or_default();
    let num = |i: usize| arg(i).parse::<u64>().unwrap_or_else(|_| usage());
    let r = match arg(0).as_str() {
        "gen" if a.len() == 5 => gen(&arg(1), num(2), num(3) as usize, &arg(4)),
        "list" if a.len() == 3 => write_list(num(1), &arg(2)).map_err(|e| e.to_string()),
        "wait" if a.len() == 5 => wait(&arg(1), &arg(2), arg(3).parse().unwrap_or_else(|_| usage()), arg(4).parse().unwrap_or_else(|_| usage())),
        "show" if a.len() == 2 => {
            let e = entry(num(1));
            print!("{}", e.narinfo);
            println!("# NAR {} bytes, narinfo {} bytes", e.nar.len(), e.narinfo.len());
            Ok(())
        }
        _ => usage(),
    };
    if let Err(e) = r {
        eprintln!("ncps-scale: {e}");
        std::process::exit(1);
    }
}

fn usage() -> ! {
    eprintln!("usage: ncps-scale gen ADDR N CONNS LIST | list N LIST | wait ADDR PATH T0_NS SECS | show I");
    std::process::exit(2);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_and_nix32_match_known_values() {
        // ncps's own doc test: sha256 of "" in nix32.
        assert_eq!(nix32(&sha256(b"")), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        let abc = sha256(b"abc");
        assert_eq!(abc[..4], [0xba, 0x78, 0x16, 0xbf]);
        let long = sha256(&[b'a'; 1000]);
        assert_eq!(long[..4], [0x41, 0xed, 0xec, 0xe4]);
        assert_eq!(nix32(&[0xff; 4]), "3zzzzzz");
    }
}
