//! Hashes and signatures, computed independently of ncps so the tests can check its
//! work: SHA-256 ([`sha256`], [`Sha256`]), Nix's base-32 ([`nix32`]), whether a NAR file
//! holds the bytes its name promises, `name:base64` keys, and ed25519 signatures.

use std::fs;
use std::path::Path;

/// A syntactically valid ed25519 public key, for tests that never verify anything.
pub const SOME_VALID_PUBLIC_KEY: &str =
    "up1.example.org-1:b+JbYUTfUJE3EDg/XZWj2ya0aK99irhQT0K8PjtpRSo=";

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().try_into().unwrap()
}

/// Incremental SHA-256, for bodies too large to keep.
pub struct Sha256(ring::digest::Context);

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }
    pub fn update(&mut self, b: &[u8]) {
        self.0.update(b)
    }
    pub fn finish(self) -> [u8; 32] {
        self.0.finish().as_ref().try_into().unwrap()
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::new()
    }
}

/// Nix's base-32 ("nix32") encoding, as in `sha256:<nix32>` and NAR file names.
pub fn nix32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let len = (bytes.len() * 8).div_ceil(5);
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let lo = (bytes[i] as u32) >> j;
        let hi = if i + 1 < bytes.len() {
            (bytes[i + 1] as u32) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((lo | hi) & 0x1f) as usize] as char);
    }
    out
}

/// `true` when `path` holds exactly the bytes its NAR file name promises: the
/// name (up to the first '.') is the nix32 SHA-256 of the file, as in
/// fixture caches and in ncps's store. Returns the mismatch otherwise.
pub fn nar_file_matches_its_name(path: &Path) -> Result<(), String> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let want = name.split('.').next().unwrap_or("");
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let got = nix32(&sha256(&bytes));
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{}: {} bytes hashing to {got}, not to the name",
            path.display(),
            bytes.len()
        ))
    }
}

/// Standard base64 decoding (with or without padding).
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc: u32 = 0;
    let mut bits = 0;
    let s = s.trim_end_matches('=');
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Splits `name:base64` into the name and decoded bytes.
pub fn parse_key(k: &str) -> Option<(String, Vec<u8>)> {
    let (name, b64) = k.trim().split_once(':')?;
    Some((name.to_string(), base64_decode(b64)?))
}

/// Does `sig` (`name:base64`) verify `message` under `public_key` (`name:base64`)?
pub fn signature_verifies(public_key: &str, message: &str, sig: &str) -> bool {
    let (Some((kn, kb)), Some((sn, sb))) = (parse_key(public_key), parse_key(sig)) else {
        return false;
    };
    if kn != sn {
        return false;
    }
    let (Ok(pk), Ok(s)) = (
        ed25519_compact::PublicKey::from_slice(&kb),
        ed25519_compact::Signature::from_slice(&sb),
    ) else {
        return false;
    };
    pk.verify(message.as_bytes(), &s).is_ok()
}

/// Signs `message` with a Nix secret key file (`name:base64(64 bytes)`),
/// giving a `name:base64` Sig value.
pub fn sign_with_key_file(secret_key_file: &Path, message: &str) -> String {
    use base64::Engine as _;
    let text = fs::read_to_string(secret_key_file)
        .unwrap_or_else(|e| panic!("{}: {e}", secret_key_file.display()));
    let (name, bytes) = parse_key(&text).expect("secret key name:base64");
    let sk = ed25519_compact::SecretKey::from_slice(&bytes).expect("64-byte ed25519 secret key");
    let sig = sk.sign(message.as_bytes(), None);
    format!(
        "{name}:{}",
        base64::engine::general_purpose::STANDARD.encode(sig.as_ref())
    )
}

/// A new Nix signing key pair named `name`, made by `nix-store --generate-binary-cache-key`:
/// the directory holding it, the public key (`name:base64`) and the secret key file.
pub fn new_key_pair(name: &str) -> (super::dirs::TempDir, String, std::path::PathBuf) {
    let dir = super::dirs::TempDir::new("keys");
    let (sec, public) = (dir.join("key.sec"), dir.join("key.pub"));
    let st = std::process::Command::new("nix-store")
        .arg("--generate-binary-cache-key")
        .args([std::ffi::OsStr::new(name), sec.as_os_str(), public.as_os_str()])
        .status()
        .expect("nix-store --generate-binary-cache-key");
    assert!(st.success(), "nix-store --generate-binary-cache-key failed");
    let public = std::fs::read_to_string(&public).unwrap().trim().to_string();
    (dir, public, sec)
}
