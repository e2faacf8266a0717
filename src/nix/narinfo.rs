//! The `.narinfo` file: what a binary cache says about one store path.
//!
//! Parsing keeps every field, including ones ncps does not know, so that what an upstream said
//! reaches the client unchanged except for the two things ncps is meant to change: the `URL`
//! (pointed at ncps's own copy of the NAR) and an added `Sig` line.

use super::hash::{Hash, HashError};
use super::keys::{PublicKey, SecretKey};
use super::store_path::{self, StorePathHash, STORE_DIR};
use std::fmt;

/// Upper bound for a narinfo's size. Real ones are well under 4 KiB even with thousands of
/// references; anything much larger is hostile or broken.
pub const MAX_NARINFO_BYTES: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: String,
    pub url: String,
    pub compression: String,
    pub file_hash: Option<Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    /// Base names (`<hash>-<name>`), as written in the file.
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub system: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    /// Fields ncps does not interpret, kept in order and written back after the known ones.
    pub extra: Vec<(String, String)>,
}

/// Why a narinfo was refused; the parse error names the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarInfoError {
    TooLarge(usize),
    NotUtf8,
    BadLine { line: usize, reason: String },
    Missing(&'static str),
    Duplicate(&'static str),
}

impl fmt::Display for NarInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NarInfoError::TooLarge(n) => write!(f, "narinfo of {n} bytes is larger than allowed"),
            NarInfoError::NotUtf8 => write!(f, "narinfo is not UTF-8 text"),
            NarInfoError::BadLine { line, reason } => write!(f, "line {line}: {reason}"),
            NarInfoError::Missing(k) => write!(f, "missing field {k}"),
            NarInfoError::Duplicate(k) => write!(f, "field {k} given twice"),
        }
    }
}

impl std::error::Error for NarInfoError {}

fn set_once<T>(slot: &mut Option<T>, value: T, key: &'static str) -> Result<(), NarInfoError> {
    if slot.is_some() {
        return Err(NarInfoError::Duplicate(key));
    }
    *slot = Some(value);
    Ok(())
}

impl NarInfo {
    /// Parses and checks a narinfo.
    ///
    /// ```
    /// use ncps::nix::NarInfo;
    /// let text = "StorePath: /nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-hello\n\
    ///             URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz\n\
    ///             Compression: xz\n\
    ///             NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
    ///             NarSize: 120\n\
    ///             References: \n";
    /// let info = NarInfo::parse(text.as_bytes()).unwrap();
    /// assert_eq!(info.nar_size, 120);
    /// assert_eq!(info.to_string(), text);
    /// ```
    pub fn parse(bytes: &[u8]) -> Result<NarInfo, NarInfoError> {
        if bytes.len() > MAX_NARINFO_BYTES {
            return Err(NarInfoError::TooLarge(bytes.len()));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| NarInfoError::NotUtf8)?;
        let (mut store_path, mut url, mut compression) = (None, None, None);
        let (mut file_hash, mut file_size, mut nar_hash, mut nar_size) = (None, None, None, None);
        let (mut references, mut deriver, mut system, mut ca) = (None, None, None, None);
        let mut sigs = Vec::new();
        let mut extra = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let bad = |reason: String| NarInfoError::BadLine { line: i + 1, reason };
            if line.is_empty() {
                continue;
            }
            // `lines()` takes off a `\r\n` ending; a control character left inside a line
            // (a stray `\r`, a NUL) would not survive printing, or would mislead a reader.
            if line.bytes().any(|c| c < 0x20 || c == 0x7f) {
                return Err(bad("control character inside a line".into()));
            }
            let (key, value) = line
                .split_once(": ")
                .or_else(|| line.strip_suffix(':').map(|k| (k, "")))
                .ok_or_else(|| bad("expected `Key: value`".into()))?;
            let hash = |v: &str| Hash::parse(v).map_err(|e: HashError| bad(e.to_string()));
            let number = |v: &str| v.parse::<u64>().map_err(|_| bad(format!("bad number {v:?}")));
            match key {
                "StorePath" => {
                    store_path::parse_full(value)
                        .ok_or_else(|| bad(format!("bad store path {value:?}")))?;
                    set_once(&mut store_path, value.to_string(), "StorePath")?
                }
                "URL" => set_once(&mut url, value.to_string(), "URL")?,
                "Compression" => set_once(&mut compression, value.to_string(), "Compression")?,
                "FileHash" => set_once(&mut file_hash, hash(value)?, "FileHash")?,
                "FileSize" => set_once(&mut file_size, number(value)?, "FileSize")?,
                "NarHash" => set_once(&mut nar_hash, hash(value)?, "NarHash")?,
                "NarSize" => set_once(&mut nar_size, number(value)?, "NarSize")?,
                "References" => {
                    let refs: Vec<String> = value.split_whitespace().map(str::to_string).collect();
                    if let Some(r) = refs.iter().find(|r| store_path::parse_base_name(r).is_none()) {
                        return Err(bad(format!("bad reference {r:?}")));
                    }
                    set_once(&mut references, refs, "References")?
                }
                "Deriver" => set_once(&mut deriver, value.to_string(), "Deriver")?,
                "System" => set_once(&mut system, value.to_string(), "System")?,
                "Sig" => sigs.push(value.to_string()),
                "CA" => set_once(&mut ca, value.to_string(), "CA")?,
                _ => {
                    if key.is_empty() || !key.bytes().all(|c| c.is_ascii_alphanumeric()) {
                        return Err(bad(format!("bad key {key:?}")));
                    }
                    extra.push((key.to_string(), value.to_string()))
                }
            }
        }
        let url = url.ok_or(NarInfoError::Missing("URL"))?;
        if url.is_empty() || url.contains(char::is_whitespace) {
            return Err(NarInfoError::Missing("URL"));
        }
        Ok(NarInfo {
            store_path: store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url,
            // Nix reads a missing Compression as bzip2, the format of the oldest caches.
            compression: compression.unwrap_or_else(|| "bzip2".to_string()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size: nar_size.ok_or(NarInfoError::Missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver,
            system,
            sigs,
            ca,
            extra,
        })
    }

    /// The hash part of `StorePath`, which must match the name the narinfo was asked for.
    pub fn store_path_hash(&self) -> Option<StorePathHash> {
        store_path::parse_full(&self.store_path)
    }

    /// The bytes a `Sig` signs: `1;<path>;<NarHash>;<NarSize>;<references as full paths>`.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> =
            self.references.iter().map(|r| format!("{STORE_DIR}/{r}")).collect();
        format!("1;{};{};{};{}", self.store_path, self.nar_hash, self.nar_size, refs.join(","))
    }

    /// Whether any `Sig` line verifies against any of `keys` (Nix trusts a signature by any
    /// trusted key).
    pub fn verify(&self, keys: &[PublicKey]) -> bool {
        let fp = self.fingerprint();
        self.sigs.iter().any(|sig| keys.iter().any(|k| k.verify(fp.as_bytes(), sig)))
    }

    /// Adds a signature by `key`, replacing an older one of the same key name.
    pub fn sign(&mut self, key: &SecretKey) {
        let sig = key.sign(self.fingerprint().as_bytes());
        let prefix = format!("{}:", key.name());
        self.sigs.retain(|s| !s.starts_with(&prefix));
        self.sigs.push(sig);
    }

    /// What describes the bytes at `URL`: (hash, size) of the file as stored.
    ///
    /// For uncompressed NARs the answer is always NarHash/NarSize: they are covered by the
    /// signature, FileHash/FileSize are not, so trusting the latter would let anyone who can
    /// edit an otherwise validly signed narinfo choose which bytes get stored. A FileHash that
    /// disagrees with NarHash on an uncompressed NAR makes the narinfo inconsistent: an error.
    /// For compressed NARs FileHash/FileSize are all there is; the client checks NarHash after
    /// decompressing.
    ///
    /// A size of 0 is an error too: no NAR is empty (its header alone is 13 bytes, a
    /// compressed one has its format's header), so nothing could be checked, and a client
    /// would take an empty body for a complete download.
    pub fn file_digest(&self) -> Result<(Hash, u64), &'static str> {
        let digest = self.claimed_digest()?;
        if digest.1 == 0 {
            return Err("its FileSize (or NarSize) is 0, and no NAR is empty");
        }
        Ok(digest)
    }

    fn claimed_digest(&self) -> Result<(Hash, u64), &'static str> {
        if self.compression == "none" {
            let disagree = self.file_hash.is_some_and(|h| h != self.nar_hash)
                || self.file_size.is_some_and(|s| s != self.nar_size);
            return if disagree {
                Err("FileHash/FileSize differ from NarHash/NarSize, yet Compression is none")
            } else {
                Ok((self.nar_hash, self.nar_size))
            };
        }
        match (self.file_hash, self.file_size) {
            (Some(h), Some(s)) => Ok((h, s)),
            _ => Err("no FileHash/FileSize to check the NAR against"),
        }
    }
}

impl fmt::Display for NarInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path)?;
        writeln!(f, "URL: {}", self.url)?;
        writeln!(f, "Compression: {}", self.compression)?;
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {h}")?;
        }
        if let Some(s) = self.file_size {
            writeln!(f, "FileSize: {s}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash)?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        writeln!(f, "References: {}", self.references.join(" "))?;
        if let Some(d) = &self.deriver {
            writeln!(f, "Deriver: {d}")?;
        }
        if let Some(s) = &self.system {
            writeln!(f, "System: {s}")?;
        }
        for s in &self.sigs {
            writeln!(f, "Sig: {s}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        for (k, v) in &self.extra {
            writeln!(f, "{k}: {v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by `nix copy --to file://…?compression=xz` (Nix 2.8) and signed by
    // `nix store sign` with the key in keys.rs's tests.
    const REAL: &str = "\
StorePath: /nix/store/djmgy9kl0ap7riz9sv8sj58nnyi2ri1s-unit-top
URL: nar/1qlizlvirr048xpyffnyls17bxmzji2lc8wwik5xmswq7sapc25z.nar.xz
Compression: xz
FileHash: sha256:1qlizlvirr048xpyffnyls17bxmzji2lc8wwik5xmswq7sapc25z
FileSize: 212
NarHash: sha256:1fxcsf1px0ap3ballljbdfdm5nrdwi295h9kx0914amx1m7msq7l
NarSize: 336
References: y63yk31iz5s3nql2j1wrgjvgdcd4l2c6-unit-dep
Deriver: zjaxwr4dr4bcvj9fi79hn1phqvmipf13-unit-top.drv
Sig: test.example.org-1:HxoeVau/7cYFxbwP84UdPWWUOHleupGFjwD/0joWw4/+XUQ067Gv6svH2OwiGqYqFZUdE9p8K8o1WIE/LuANBQ==
";
    const REAL_PUBLIC: &str = "test.example.org-1:7YIGonZ2ga2VZkni+Zl9vjWtsG/ytu5E78XuG4dvOes=";

    #[test]
    fn round_trips_a_real_narinfo() {
        let info = NarInfo::parse(REAL.as_bytes()).unwrap();
        assert_eq!(info.references, ["y63yk31iz5s3nql2j1wrgjvgdcd4l2c6-unit-dep"]);
        assert_eq!(info.file_size, Some(212));
        assert_eq!(info.to_string(), REAL);
    }

    #[test]
    fn fingerprint_uses_full_reference_paths() {
        let info = NarInfo::parse(REAL.as_bytes()).unwrap();
        assert_eq!(
            info.fingerprint(),
            "1;/nix/store/djmgy9kl0ap7riz9sv8sj58nnyi2ri1s-unit-top;\
             sha256:1fxcsf1px0ap3ballljbdfdm5nrdwi295h9kx0914amx1m7msq7l;336;\
             /nix/store/y63yk31iz5s3nql2j1wrgjvgdcd4l2c6-unit-dep"
        );
    }

    #[test]
    fn the_signature_nix_made_verifies() {
        let info = NarInfo::parse(REAL.as_bytes()).unwrap();
        assert!(info.verify(&[PublicKey::parse(REAL_PUBLIC).unwrap()]));
        let other = SecretKey::generate("test.example.org-1").unwrap().public();
        assert!(!info.verify(&[other]), "a key of the same name but other bytes must not verify");
    }

    #[test]
    fn signing_adds_a_verifiable_sig_and_keeps_the_others() {
        let mut info = NarInfo::parse(REAL.as_bytes()).unwrap();
        let key = SecretKey::generate("ncps.test-1").unwrap();
        assert!(!info.verify(&[key.public()]));
        info.sign(&key);
        info.sign(&key);
        assert_eq!(info.sigs.len(), 2, "the upstream Sig stays, ours appears once");
        assert!(info.verify(&[key.public()]));
        let reparsed = NarInfo::parse(info.to_string().as_bytes()).unwrap();
        assert!(reparsed.verify(&[key.public()]));
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let key = SecretKey::generate("ncps.test-1").unwrap();
        let mut info = NarInfo::parse(REAL.as_bytes()).unwrap();
        info.sign(&key);
        info.nar_size += 1;
        assert!(!info.verify(&[key.public()]));
    }

    #[test]
    fn unknown_fields_survive_and_bad_lines_are_named() {
        let text = format!("{REAL}Foo: bar\n");
        assert_eq!(NarInfo::parse(text.as_bytes()).unwrap().to_string(), text);
        let err = NarInfo::parse(b"StorePath: /etc/passwd\n").unwrap_err();
        assert_eq!(err.to_string(), "line 1: bad store path \"/etc/passwd\"");
        let err = NarInfo::parse(REAL.replace("NarSize: 336", "NarSize: x").as_bytes());
        assert!(err.unwrap_err().to_string().starts_with("line 7: bad number"));
        assert_eq!(
            NarInfo::parse(REAL.replace("NarHash", "Nope").as_bytes()).unwrap_err(),
            NarInfoError::Missing("NarHash")
        );
        let twice = format!("{REAL}NarSize: 1\n");
        assert_eq!(NarInfo::parse(twice.as_bytes()).unwrap_err(), NarInfoError::Duplicate("NarSize"));
    }

    #[test]
    fn crlf_endings_parse_but_control_characters_inside_lines_do_not() {
        let crlf = REAL.replace('\n', "\r\n");
        assert_eq!(NarInfo::parse(crlf.as_bytes()).unwrap(), NarInfo::parse(REAL.as_bytes()).unwrap());
        // Found by the fuzzer: a value ending in `\r` changed on a print/parse round trip.
        let cr = REAL.replace("Compression: xz\n", "Compression: xz\r");
        assert!(NarInfo::parse(cr.as_bytes()).is_err());
        assert!(NarInfo::parse(format!("{REAL}Foo: a\0b\n").as_bytes()).is_err());
    }

    #[test]
    fn file_digest_of_uncompressed_nars_is_the_signed_nar_hash() {
        let mut info = NarInfo::parse(REAL.as_bytes()).unwrap();
        assert_eq!(info.file_digest(), Ok((info.file_hash.unwrap(), 212)));
        info.file_hash = None;
        assert!(info.file_digest().is_err(), "compressed without FileHash");
        info.compression = "none".into();
        info.file_size = None;
        assert_eq!(info.file_digest(), Ok((info.nar_hash, 336)));
        // An unsigned FileHash that points elsewhere must not decide what gets stored.
        info.file_hash = Some(Hash::parse("sha256:1ry6v2khizqmidqkmdc8cnk5nigzzb9fxzvy2q4h1ykxpw7jwah3").unwrap());
        info.file_size = Some(336);
        assert!(info.file_digest().is_err());
        info.file_hash = Some(info.nar_hash);
        assert_eq!(info.file_digest(), Ok((info.nar_hash, 336)));
        info.file_size = Some(335);
        assert!(info.file_digest().is_err());
    }

    #[test]
    fn a_nar_of_zero_bytes_has_no_digest_to_check() {
        let mut info = NarInfo::parse(REAL.as_bytes()).unwrap();
        info.file_size = Some(0);
        assert!(info.file_digest().is_err(), "FileSize 0");
        info.compression = "none".into();
        info.file_size = None;
        info.file_hash = None;
        info.nar_size = 0;
        assert!(info.file_digest().is_err(), "NarSize 0, uncompressed");
    }
}
