//! The file name of a NAR in a binary cache: `<hash>.nar` plus a compression extension.
//!
//! Upstreams name NARs after the hash of the file (52 nix32 characters, as cache.nixos.org and
//! `nix copy` do) or in hex (64 characters, as some other servers do). Only those shapes are
//! accepted, so a NAR name can be joined to a directory without any risk of leaving it.

use super::nix32;
use std::fmt;

/// Compression extensions ncps accepts on NAR names, with the narinfo `Compression` they mean.
const EXTENSIONS: &[(&str, &str)] = &[
    ("", "none"),
    (".xz", "xz"),
    (".zst", "zstd"),
    (".bz2", "bzip2"),
    (".br", "br"),
    (".lz4", "lz4"),
    (".lzip", "lzip"),
    (".gz", "gzip"),
];

/// A validated NAR file name, such as `1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NarName(String);

impl NarName {
    /// ```
    /// use ncps::nix::NarName;
    /// let n = NarName::parse("1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz").unwrap();
    /// assert_eq!(n.compression(), "xz");
    /// assert!(NarName::parse("../1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar").is_none());
    /// assert!(NarName::parse("1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.exe").is_none());
    /// ```
    pub fn parse(s: &str) -> Option<NarName> {
        let (hash, rest) = s.split_once(".nar")?;
        let hash_ok = match hash.len() {
            52 => hash.bytes().all(nix32::is_nix32_char),
            64 => hash.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
            _ => false,
        };
        if !hash_ok || !EXTENSIONS.iter().any(|(ext, _)| *ext == rest) {
            return None;
        }
        Some(NarName(s.to_string()))
    }

    /// The NAR name for a file with this hash and compression (the form `nix copy` writes).
    pub fn for_file(file_hash: &super::Hash, compression: &str) -> Option<NarName> {
        let ext = EXTENSIONS.iter().find(|(_, c)| *c == compression)?.0;
        Some(NarName(format!("{}.nar{ext}", file_hash.to_nix32())))
    }

    /// The narinfo `Compression` this file name's extension stands for.
    pub fn compression(&self) -> &'static str {
        let ext = self.0.split_once(".nar").map(|(_, e)| e).unwrap_or("");
        EXTENSIONS.iter().find(|(e, _)| *e == ext).map(|(_, c)| *c).unwrap_or("none")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NarName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NarName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NarName({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hex_names_and_every_known_extension() {
        let hex = "a".repeat(64);
        for (ext, compression) in EXTENSIONS {
            let n = NarName::parse(&format!("{hex}.nar{ext}")).unwrap();
            assert_eq!(n.compression(), *compression);
        }
    }

    #[test]
    fn refuses_wrong_lengths_alphabets_and_suffixes() {
        assert!(NarName::parse(&format!("{}.nar", "a".repeat(51))).is_none());
        assert!(NarName::parse(&format!("{}.nar", "e".repeat(52))).is_none());
        assert!(NarName::parse(&format!("{}.nar.xz/x", "a".repeat(52))).is_none());
        assert!(NarName::parse(&format!("{}.narx", "a".repeat(52))).is_none());
        assert!(NarName::parse("").is_none());
    }
}
