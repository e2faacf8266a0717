//! What one narinfo lookup costs, outside the server: the file per narinfo that ncps keeps
//! (open relative to the narinfo directory, one `read`, close) against the same bytes in an
//! SQLite table keyed by the store path hash (as Go ncps keeps narinfos in its database),
//! read through a prepared statement, with SQLite's default page cache and with `mmap_size`.
//!
//!   ncps-narinfo-lookup build STORE/narinfo PATHS DB    copy every listed narinfo into DB
//!   ncps-narinfo-lookup file|sql|sql-mmap STORE/narinfo PATHS DB [SECONDS]
//!
//! PATHS is bench/scale.sh's list (fixed-width 32-byte store path hashes). Each lookup picks
//! a hash at random (xorshift, same seed on every side), one thread, for SECONDS (3).
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::time::Instant;

fn relative(h: &str) -> std::ffi::CString {
    std::ffi::CString::new(format!("{}/{}/{h}.narinfo", &h[..1], &h[..2]))
        .expect("no NUL in a hash")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        return Err(
            "usage: ncps-narinfo-lookup build|file|sql|sql-mmap STORE/narinfo PATHS DB [SECONDS]"
                .into(),
        );
    }
    let (mode, dir, db) = (a[1].as_str(), &a[2], &a[4]);
    let secs: f64 = a.get(5).map(|s| s.parse()).transpose()?.unwrap_or(3.0);
    let list = std::fs::read(&a[3])?;
    let hashes: Vec<&str> = list
        .chunks_exact(32)
        .map(std::str::from_utf8)
        .collect::<Result<_, _>>()?;
    if hashes.is_empty() {
        return Err("empty list".into());
    }
    let c = rusqlite::Connection::open(db)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    if mode == "sql-mmap" {
        c.pragma_update(None, "mmap_size", 1i64 << 40)?;
    }
    if mode == "build" {
        c.execute_batch("CREATE TABLE IF NOT EXISTS narinfos (hash TEXT PRIMARY KEY, body BLOB NOT NULL) WITHOUT ROWID")?;
        let tx = c.unchecked_transaction()?;
        {
            let mut st = tx.prepare("INSERT OR REPLACE INTO narinfos VALUES (?1, ?2)")?;
            for h in &hashes {
                let body = std::fs::read(
                    std::path::Path::new(dir)
                        .join(std::ffi::OsStr::from_bytes(relative(h).as_bytes())),
                )?;
                st.execute(rusqlite::params![h, body])?;
            }
        }
        tx.commit()?;
        println!("build: {} narinfos into {db}", hashes.len());
        return Ok(());
    }
    let dirfd = std::fs::File::open(dir)?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; 16 * 1024];
    let mut st = c.prepare("SELECT body FROM narinfos WHERE hash = ?1")?;
    let (mut count, mut bytes) = (0u64, 0u64);
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        for _ in 0..1000 {
            let h = hashes[(next() % hashes.len() as u64) as usize];
            bytes += match mode {
                "file" => {
                    use std::os::fd::{AsRawFd, FromRawFd};
                    let rel = relative(h);
                    // SAFETY: an open directory descriptor and a NUL-terminated relative path.
                    let fd = unsafe { libc_openat(dirfd.as_raw_fd(), rel.as_ptr(), FLAGS) };
                    if fd < 0 {
                        return Err(format!("{h}: {}", std::io::Error::last_os_error()).into());
                    }
                    // SAFETY: a descriptor openat just returned, owned by nothing else.
                    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
                    f.read(&mut buf)? as u64
                }
                "sql" | "sql-mmap" => st.query_row([h], |r| r.get::<_, Vec<u8>>(0))?.len() as u64,
                other => return Err(format!("unknown mode {other}").into()),
            };
            count += 1;
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{mode}: {:.0} lookups/s, {:.2} us each, {} bytes on average",
        count as f64 / s,
        s * 1e6 / count as f64,
        bytes / count
    );
    Ok(())
}

extern "C" {
    #[link_name = "openat"]
    fn libc_openat(dirfd: i32, path: *const std::ffi::c_char, flags: i32, ...) -> i32;
}

// O_RDONLY | O_CLOEXEC | O_NOFOLLOW, as ncps opens a narinfo (Linux values).
const FLAGS: i32 = 0o2_000_000 | 0o400_000;
