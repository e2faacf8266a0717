//! Writing responses to a socket: heads, byte bodies, and file bodies by `sendfile(2)`.

use super::{reason, Body, Chunk, Response};
use std::fs::File;
use std::io::{self, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

/// Bodies up to this size are read into the head's buffer and sent with one write: for small
/// files (narinfos) one syscall beats a write plus a sendfile.
const INLINE_FILE_BYTES: u64 = 16 * 1024;

/// Sends `len` bytes of `file` from `offset` to `sock`, inside the kernel.
///
/// The socket's write timeout bounds every call, so a client that stops reading ends this with
/// `TimedOut` instead of holding the thread.
pub fn send_file(sock: &TcpStream, file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mut off = offset as libc::off_t;
    let end = offset + len;
    while (off as u64) < end {
        let chunk = (end - off as u64).min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the duration of the call (borrowed), and `off`
        // is a valid, exclusively borrowed off_t.
        let n = unsafe { libc::sendfile(sock.as_raw_fd(), file.as_raw_fd(), &mut off, chunk) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shorter than announced"));
        }
    }
    Ok(())
}

fn head(resp: &Response, keep_alive: bool) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    write!(out, "HTTP/1.1 {} {}\r\nServer: ncps\r\nContent-Length: {}\r\n", resp.status, reason(resp.status), resp.body.len())?;
    for (k, v) in &resp.headers {
        write!(out, "{k}: {v}\r\n")?;
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// The whole of a small response (head and body) as bytes, for sending without waiting.
/// Errors for bodies that are not small.
pub fn render_small(resp: Response, head_only: bool, keep_alive: bool) -> io::Result<Vec<u8>> {
    let mut out = head(&resp, keep_alive)?;
    if head_only {
        return Ok(out);
    }
    match resp.body {
        Body::Empty => {}
        Body::Bytes(b) => out.extend_from_slice(&b),
        Body::File { file, len } if len <= INLINE_FILE_BYTES => {
            let start = out.len();
            out.resize(start + len as usize, 0);
            read_exact_at(&file, &mut out[start..], 0)?;
        }
        _ => return Err(io::Error::other("not a small response")),
    }
    Ok(out)
}

/// Writes `resp` (its head, and its body unless `head_only`). Returns the body bytes sent.
pub fn write_response(sock: &mut TcpStream, resp: Response, head_only: bool, keep_alive: bool) -> io::Result<u64> {
    let len = resp.body.len();
    let small = match &resp.body {
        Body::Empty | Body::Bytes(_) => true,
        Body::File { len, .. } => *len <= INLINE_FILE_BYTES,
        _ => false,
    };
    if small || head_only {
        sock.write_all(&render_small(resp, head_only, keep_alive)?)?;
        return Ok(if head_only { 0 } else { len });
    }
    let out = head(&resp, keep_alive)?;
    match resp.body {
        Body::File { file, len } => {
            sock.write_all(&out)?;
            send_file(sock, &file, 0, len)?;
        }
        Body::Declared(_) | Body::Empty | Body::Bytes(_) => {
            // A length-only body answering a GET is a handler bug: the head would promise
            // bytes there are none of. (Small bodies were sent above.)
            return Err(io::Error::other("a length-only body cannot answer a GET"));
        }
        Body::Growing(g) => {
            sock.write_all(&out)?;
            let mut sent = 0;
            while sent < len {
                match g.wait(sent, &|| peer_gone(sock)) {
                    Ok(Chunk::File { upto }) => {
                        let upto = upto.min(len);
                        if upto > sent {
                            send_file(sock, g.file(), sent, upto - sent)?;
                            sent = upto;
                        }
                    }
                    Ok(Chunk::Bytes(b)) => {
                        let b = &b[..b.len().min((len - sent) as usize)];
                        sock.write_all(b)?;
                        sent += b.len() as u64;
                    }
                    Err(why) => {
                        abort(sock);
                        return Err(io::Error::other(why));
                    }
                }
            }
        }
    }
    Ok(len)
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

/// Whether the client closed its end (or the connection broke), without blocking. A request
/// still unread (pipelining) is not a hang-up.
fn peer_gone(sock: &TcpStream) -> bool {
    let mut p = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid, initialised pollfd, and a zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Makes the coming close of `sock` a TCP reset, so the client sees a failed transfer at once
/// rather than a clean end of stream. The caller drops the socket after this.
pub fn abort(sock: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket descriptor and a correctly sized, initialised linger struct.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
