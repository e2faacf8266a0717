//! Store paths and the 32-character hash that names a narinfo.

use super::nix32;
use std::fmt;

/// The Nix store directory ncps serves. Binary caches for other store directories exist, but
/// `/nix-cache-info` announces this one and every fingerprint is computed with it.
pub const STORE_DIR: &str = "/nix/store";

/// The hash part of a store path: 32 nix32 characters (160 bits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePathHash([u8; 32]);

impl StorePathHash {
    /// ```
    /// use ncps::nix::StorePathHash;
    /// assert!(StorePathHash::parse("0mdqa9w1p6cmli6976v4wi0sw9r4p5pr").is_some());
    /// assert!(StorePathHash::parse("../../etc/passwd").is_none());
    /// assert!(StorePathHash::parse("EMDQA9W1P6CMLI6976V4WI0SW9R4P5PR").is_none());
    /// ```
    pub fn parse(s: &str) -> Option<StorePathHash> {
        let b = s.as_bytes();
        if b.len() != 32 || !b.iter().all(|&c| nix32::is_nix32_char(c)) {
            return None;
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(b);
        Some(StorePathHash(out))
    }

    pub fn as_str(&self) -> &str {
        // Only nix32 characters are ever stored, which are ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathHash({})", self.as_str())
    }
}

/// Checks a store path base name (`<hash>-<name>`) the way Nix does, returning its hash.
pub fn parse_base_name(base: &str) -> Option<StorePathHash> {
    let hash = StorePathHash::parse(base.get(..32)?)?;
    let name = base.get(32..)?.strip_prefix('-')?;
    let valid = |c: u8| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c);
    if name.is_empty() || name.len() > 211 || name.starts_with('.') || !name.bytes().all(valid) {
        return None;
    }
    Some(hash)
}

/// Checks a full store path (`/nix/store/<hash>-<name>`), returning its hash.
pub fn parse_full(path: &str) -> Option<StorePathHash> {
    parse_base_name(path.strip_prefix(STORE_DIR)?.strip_prefix('/')?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_paths_must_live_in_the_store_and_have_a_name() {
        let h = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";
        assert!(parse_full(&format!("/nix/store/{h}-hello-2.12")).is_some());
        assert!(parse_full(&format!("/nix/store/{h}")).is_none());
        assert!(parse_full(&format!("/tmp/store/{h}-hello")).is_none());
        assert!(parse_full(&format!("/nix/store/{h}-hel/lo")).is_none());
        assert!(parse_full(&format!("/nix/store/{h}-..")).is_none());
    }
}
