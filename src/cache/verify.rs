//! The one read-hash-write loop: every NAR byte that enters or is checked by ncps (a download,
//! an upload, `ncps fsck`) goes through [`copy_hashed`], so the three cannot disagree on what
//! "verified" means.

use crate::nix::hash::Hasher;
use crate::nix::Hash;
use std::fmt;
use std::io::{self, Read};

/// Bytes read at a time: large enough that a syscall per chunk costs nothing measurable.
const CHUNK: usize = 256 * 1024;

/// Why [`copy_hashed`] stopped.
#[derive(Debug)]
pub enum CopyError<E> {
    /// Reading failed after this many bytes.
    Read { after: u64, source: io::Error },
    /// More than `limit` bytes came.
    TooLong { limit: u64 },
    /// The sink refused the bytes after `after` bytes.
    Sink { after: u64, source: E },
}

impl<E: fmt::Display> fmt::Display for CopyError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CopyError::Read { after, source } => write!(f, "after {after} bytes: {source}"),
            CopyError::TooLong { limit } => write!(f, "longer than the {limit} bytes expected"),
            CopyError::Sink { source, .. } => source.fmt(f),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for CopyError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CopyError::Read { source, .. } => Some(source),
            CopyError::TooLong { .. } => None,
            CopyError::Sink { source, .. } => Some(source),
        }
    }
}

/// Where [`copy_hashed`] puts each chunk: told the offset it starts at.
pub type Sink<'a, E> = dyn FnMut(u64, &[u8]) -> Result<(), E> + 'a;

/// Reads `reader` to its end, at most `limit` bytes, handing each chunk to `sink` (with the
/// offset it starts at) and hashing it. Returns the SHA-256 and the length.
pub fn copy_hashed<E>(
    reader: &mut dyn Read,
    limit: u64,
    sink: &mut Sink<'_, E>,
) -> Result<(Hash, u64), CopyError<E>> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    while let Some(n) = next_chunk(reader, &mut buf, len, limit)? {
        hasher.update(&buf[..n]);
        sink(len, &buf[..n]).map_err(|source| CopyError::Sink { after: len, source })?;
        len += n as u64;
    }
    Ok((hasher.finish(), len))
}

/// Reads the next chunk into `buf`, `len` bytes having come before it: `None` at the end; a
/// read error, or a chunk that takes the total past `limit`, stops the copy.
fn next_chunk<E>(reader: &mut dyn Read, buf: &mut [u8], len: u64, limit: u64) -> Result<Option<usize>, CopyError<E>> {
    loop {
        match reader.read(buf) {
            Ok(0) => return Ok(None),
            Ok(n) if len + n as u64 > limit => return Err(CopyError::TooLong { limit }),
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read { after: len, source: e }),
        }
    }
}

/// Downloads at least this long are hashed on a second thread ([`copy_hashed_parallel`]) and
/// have their disk reserved first (`TempFile::reserve`); a thread costs tens of microseconds,
/// nothing beside a MiB of network and disk.
pub const PARALLEL_FROM: u64 = 1 << 20;

/// [`copy_hashed`] with the hashing on a second thread, for large downloads: this thread
/// reads each chunk and hands it to `sink`, then to the hasher; four buffers go round, so
/// neither side allocates and the reader is at most four chunks ahead of the hash. A cold
/// 1 GiB miss from a loopback nginx took 1.53 s against 1.65 s sequential here (medians of
/// six interleaved pairs; DESIGN.md "Large transfers"). If the thread cannot be started, the
/// copy runs as [`copy_hashed`].
pub fn copy_hashed_parallel<E>(
    reader: &mut dyn Read,
    limit: u64,
    sink: &mut Sink<'_, E>,
) -> Result<(Hash, u64), CopyError<E>> {
    use std::sync::mpsc;
    const RING: usize = 4;
    let (to_hasher, chunks) = mpsc::sync_channel::<(Vec<u8>, usize)>(RING);
    let (to_reader, spare) = mpsc::sync_channel::<Vec<u8>>(RING);
    for _ in 0..RING {
        let _ = to_reader.send(vec![0u8; CHUNK]);
    }
    std::thread::scope(|s| {
        let spawned = std::thread::Builder::new().name("hash".into()).stack_size(128 * 1024).spawn_scoped(s, move || {
            let mut hasher = Hasher::new();
            while let Ok((buf, n)) = chunks.recv() {
                hasher.update(&buf[..n]);
                if to_reader.send(buf).is_err() {
                    break;
                }
            }
            hasher.finish()
        });
        let hasher = match spawned {
            Ok(h) => h,
            Err(e) => {
                log::warn!("no thread for hashing ({e}); hashing on the reading thread");
                return copy_hashed(reader, limit, sink);
            }
        };
        let mut len = 0u64;
        // `None`: the hasher went away, which only its panic can do.
        let result: Result<u64, Option<CopyError<E>>> = loop {
            let Ok(mut buf) = spare.recv() else { break Err(None) };
            let n = match next_chunk(reader, &mut buf, len, limit) {
                Ok(None) => break Ok(len),
                Ok(Some(n)) => n,
                Err(e) => break Err(Some(e)),
            };
            if let Err(source) = sink(len, &buf[..n]) {
                break Err(Some(CopyError::Sink { after: len, source }));
            }
            len += n as u64;
            if to_hasher.send((buf, n)).is_err() {
                break Err(None);
            }
        };
        drop(to_hasher);
        let hash = hasher.join();
        match (result, hash) {
            (Ok(len), Ok(hash)) => Ok((hash, len)),
            (Err(Some(e)), _) => Err(e),
            _ => Err(CopyError::Read { after: len, source: io::Error::other("the hashing thread panicked") }),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_and_length_are_of_every_byte_read_and_the_limit_holds() {
        let data = vec![7u8; CHUNK * 2 + 5];
        let mut seen = 0u64;
        let (h, n) = copy_hashed::<io::Error>(&mut &data[..], u64::MAX, &mut |at, b| {
            assert_eq!(at, seen);
            seen += b.len() as u64;
            Ok(())
        })
        .unwrap();
        assert_eq!((h, n), (Hash::of(&data), data.len() as u64));
        let err = copy_hashed::<io::Error>(&mut &data[..], 10, &mut |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, CopyError::TooLong { limit: 10 }));
    }

    #[test]
    fn hashing_on_a_second_thread_gives_the_same_hash_length_limit_and_sink_errors() {
        let data: Vec<u8> = (0..CHUNK * 9 + 7).map(|i| (i * 31 % 251) as u8).collect();
        // A reader that hands out odd-sized pieces, as a socket does.
        struct Pieces<'a>(&'a [u8], usize);
        impl Read for Pieces<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.1 += 1;
                let n = (self.1 * 7919 % 100_000 + 1).min(buf.len()).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut seen = 0u64;
        let (h, n) = copy_hashed_parallel::<io::Error>(&mut Pieces(&data, 0), u64::MAX, &mut |at, b| {
            assert_eq!(at, seen);
            seen += b.len() as u64;
            Ok(())
        })
        .unwrap();
        assert_eq!((h, n, seen), (Hash::of(&data), data.len() as u64, data.len() as u64));
        let err = copy_hashed_parallel::<io::Error>(&mut &data[..], 10, &mut |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, CopyError::TooLong { limit: 10 }));
        let err = copy_hashed_parallel::<io::Error>(&mut &data[..], u64::MAX, &mut |at, _| {
            if at > 0 {
                Err(io::Error::other("disk full"))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(matches!(err, CopyError::Sink { after, .. } if after == CHUNK as u64));
        let mut failing = Pieces(&data, 0).chain(FailingReader);
        let err = copy_hashed_parallel::<io::Error>(&mut failing, u64::MAX, &mut |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, CopyError::Read { after, .. } if after == data.len() as u64));
    }

    struct FailingReader;
    impl Read for FailingReader {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"))
        }
    }
}
