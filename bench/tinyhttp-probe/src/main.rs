//! Probe: can tiny_http 0.12 serve large files as fast as nginx (sendfile),
//! and how does it behave under slowloris / accept() failure?
//!
//! Usage:
//!   tinyhttp-probe tiny ADDR FILE   # tiny_http 0.12, Response::from_file, Content-Length
//!   tinyhttp-probe tiny-bigbuf ADDR FILE # tiny_http, body = BufReader::with_capacity(1 MiB, file)
//!                                   # (io::copy then moves 1 MiB per write instead of 8 KiB)
//!   tinyhttp-probe std  ADDR FILE   # std::net, thread per connection, io::copy(file.take(len), stream)
//!   tinyhttp-probe sendfile ADDR FILE # same as std, body sent with libc::sendfile(2) in a loop
//!
//! Note: current std (>= ~1.7x, "safe_kernel_copy") does NOT use sendfile for File -> TcpStream
//! in io::copy (only socket/pipe sources or file sinks), so `std` is a read+write loop with an
//! 8 KiB buffer; `sendfile` is the real zero-copy baseline.
//!
//! Every GET/HEAD, whatever the path, answers 200 with FILE's bytes.
//! Prints "listening ADDR" on stdout once bound.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: {} tiny|std ADDR FILE", args[0]);
        std::process::exit(2);
    }
    let (mode, addr, path) = (args[1].as_str(), args[2].clone(), Arc::new(args[3].clone()));
    match mode {
        "tiny" => run_tiny(&addr, path, false),
        "tiny-bigbuf" => run_tiny(&addr, path, true),
        "std" => run_std(&addr, path, false),
        "sendfile" => run_std(&addr, path, true),
        _ => {
            eprintln!("unknown mode {mode}");
            std::process::exit(2);
        }
    }
}

fn run_tiny(addr: &str, path: Arc<String>, bigbuf: bool) {
    let server = Arc::new(tiny_http::Server::http(addr).expect("bind"));
    println!("listening {addr}");
    io::stdout().flush().ok();
    // Like an application would: one dispatcher loop, each request handled on its own thread.
    loop {
        match server.recv() {
            Ok(rq) => {
                let path = path.clone();
                thread::spawn(move || {
                    let file = match File::open(&*path) {
                        Ok(f) => f,
                        Err(e) => {
                            let _ = rq.respond(tiny_http::Response::from_string(e.to_string()).with_status_code(500));
                            return;
                        }
                    };
                    let res = if bigbuf {
                        let len = file.metadata().map(|m| m.len() as usize).ok();
                        let body = io::BufReader::with_capacity(1 << 20, file);
                        let resp = tiny_http::Response::new(200.into(), vec![], body, len, None)
                            .with_chunked_threshold(usize::MAX);
                        rq.respond(resp)
                    } else {
                        let resp = tiny_http::Response::from_file(file).with_chunked_threshold(usize::MAX);
                        rq.respond(resp)
                    };
                    if let Err(e) = res {
                        eprintln!("respond error: {e}");
                    }
                });
            }
            Err(e) => {
                // tiny_http's accept thread pushes the accept() error here and then exits.
                eprintln!("recv error: {e}");
            }
        }
    }
}

fn run_std(addr: &str, path: Arc<String>, use_sendfile: bool) {
    let listener = TcpListener::bind(addr).expect("bind");
    println!("listening {addr}");
    io::stdout().flush().ok();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let path = path.clone();
                thread::spawn(move || {
                    if let Err(e) = serve_conn(stream, &path, use_sendfile) {
                        if e.kind() != io::ErrorKind::UnexpectedEof {
                            eprintln!("conn error: {e}");
                        }
                    }
                });
            }
            Err(e) => {
                eprintln!("accept error: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve_conn(mut stream: TcpStream, path: &str, use_sendfile: bool) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        // read one request head (no body support needed for GET/HEAD)
        let head_end;
        loop {
            if let Some(p) = find_head_end(&buf) {
                head_end = p;
                break;
            }
            if buf.len() > 16384 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
            }
            let mut tmp = [0u8; 4096];
            let n = stream.read(&mut tmp)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        buf.drain(..head_end);
        let is_head = head.starts_with("HEAD ");
        let close = head.to_ascii_lowercase().contains("connection: close");
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let hdr = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        );
        stream.write_all(hdr.as_bytes())?;
        if !is_head && use_sendfile {
            send_file(&file, &stream, len)?;
        } else if !is_head {
            // On Linux std specialises File(-Take) -> TcpStream to sendfile(2).
            let n = io::copy(&mut file.take(len), &mut stream)?;
            if n != len {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short file"));
            }
        }
        if close {
            return Ok(());
        }
    }
}

fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn send_file(file: &File, stream: &TcpStream, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        let n = unsafe { libc::sendfile(stream.as_raw_fd(), file.as_raw_fd(), std::ptr::null_mut(), chunk) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"));
        }
        left -= n as u64;
    }
    Ok(())
}
