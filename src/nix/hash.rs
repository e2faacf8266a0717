//! Content hashes as they appear in narinfos (`FileHash`, `NarHash`).
//!
//! Nix writes `sha256:<nix32>`; older tools and some upstreams write the digest in hex or as
//! an SRI string (`sha256-<base64>`). All are accepted, and a hash is always printed back in the
//! canonical `sha256:<nix32>` form, which is the form signature fingerprints are computed over.

use super::nix32;
use base64::Engine;
use std::fmt;

/// A SHA-256 digest. Nix caches use other algorithms only for legacy content, which ncps refuses.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hash(pub [u8; 32]);

/// Why a hash string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashError {
    UnsupportedAlgorithm(String),
    BadDigest(String),
}

impl fmt::Display for HashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashError::UnsupportedAlgorithm(a) => write!(f, "unsupported hash algorithm {a:?}"),
            HashError::BadDigest(d) => write!(f, "malformed sha256 digest {d:?}"),
        }
    }
}

impl std::error::Error for HashError {}

impl Hash {
    /// Parses `sha256:<nix32|hex|base64>` or `sha256-<base64>`.
    ///
    /// ```
    /// use ncps::nix::Hash;
    /// let h = Hash::parse("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").unwrap();
    /// assert_eq!(h, Hash::of(b""));
    /// assert_eq!(h.to_string(), "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
    /// ```
    pub fn parse(s: &str) -> Result<Hash, HashError> {
        let (algo, digest) = match (s.split_once(':'), s.split_once('-')) {
            (Some(pair), _) => pair,
            (None, Some(pair)) => pair,
            (None, None) => return Err(HashError::BadDigest(s.to_string())),
        };
        if algo != "sha256" {
            return Err(HashError::UnsupportedAlgorithm(algo.to_string()));
        }
        Self::parse_digest(digest).ok_or_else(|| HashError::BadDigest(s.to_string()))
    }

    /// Parses a bare sha256 digest in nix32 (52 chars), hex (64) or base64 (44).
    pub fn parse_digest(digest: &str) -> Option<Hash> {
        let bytes = match digest.len() {
            52 => nix32::decode(digest)?,
            64 => decode_hex(digest)?,
            44 => base64::engine::general_purpose::STANDARD.decode(digest).ok()?,
            _ => return None,
        };
        Some(Hash(bytes.try_into().ok()?))
    }

    /// The SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Hash {
        let mut h = Hasher::new();
        h.update(data);
        h.finish()
    }

    pub fn to_nix32(&self) -> String {
        nix32::encode(&self.0)
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Incremental SHA-256, for hashing a NAR while it streams through.
pub struct Hasher(ring::digest::Context);

impl Hasher {
    pub fn new() -> Hasher {
        Hasher(ring::digest::Context::new(&ring::digest::SHA256))
    }
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data)
    }
    pub fn finish(self) -> Hash {
        let d = self.0.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Hash(out)
    }
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_nix32_hex_and_sri_forms_of_one_digest() {
        let want = Hash::of(b"hello");
        let nix32 = format!("sha256:{}", want.to_nix32());
        let hex: String = want.0.iter().map(|b| format!("{b:02x}")).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(want.0);
        assert_eq!(Hash::parse(&nix32).unwrap(), want);
        assert_eq!(Hash::parse(&format!("sha256:{hex}")).unwrap(), want);
        assert_eq!(Hash::parse(&format!("sha256-{b64}")).unwrap(), want);
    }

    #[test]
    fn refuses_other_algorithms_and_bad_digests() {
        assert!(matches!(Hash::parse("md5:abc"), Err(HashError::UnsupportedAlgorithm(_))));
        assert!(matches!(Hash::parse("sha256:xyz"), Err(HashError::BadDigest(_))));
        assert!(Hash::parse("").is_err());
    }
}
