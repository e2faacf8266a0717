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
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok((hasher.finish(), len)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read { after: len, source: e }),
        };
        if len + n as u64 > limit {
            return Err(CopyError::TooLong { limit });
        }
        hasher.update(&buf[..n]);
        sink(len, &buf[..n]).map_err(|source| CopyError::Sink { after: len, source })?;
        len += n as u64;
    }
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
}
