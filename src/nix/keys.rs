//! Signing keys in Nix's text form, `name:base64`, and the signatures they make.
//!
//! A secret key is 64 bytes (the 32-byte seed, then the public key), as written by
//! `nix-store --generate-binary-cache-key`; a public key is the 32 bytes; a signature line is
//! `name:base64(64-byte ed25519 signature)`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    NoName,
    BadBase64,
    WrongLength { want: usize, got: usize },
    Inconsistent,
    Random(String),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::NoName => write!(f, "expected `name:base64`"),
            KeyError::BadBase64 => write!(f, "the key is not valid base64"),
            KeyError::WrongLength { want, got } => {
                write!(f, "the key has {got} bytes, expected {want}")
            }
            KeyError::Inconsistent => write!(f, "the secret key does not match its public half"),
            KeyError::Random(e) => write!(f, "no randomness for a new key: {e}"),
        }
    }
}

impl std::error::Error for KeyError {}

fn split_key(text: &str, want: usize) -> Result<(&str, Vec<u8>), KeyError> {
    let (name, b64) = text.trim().split_once(':').ok_or(KeyError::NoName)?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(KeyError::NoName);
    }
    let bytes = B64.decode(b64).map_err(|_| KeyError::BadBase64)?;
    if bytes.len() != want {
        return Err(KeyError::WrongLength { want, got: bytes.len() });
    }
    Ok((name, bytes))
}

/// A trusted public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed25519_compact::PublicKey,
}

impl PublicKey {
    /// ```
    /// use ncps::nix::PublicKey;
    /// let k = PublicKey::parse("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=").unwrap();
    /// assert_eq!(k.name(), "cache.nixos.org-1");
    /// assert!(PublicKey::parse("cache.nixos.org-1:tooshort").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let (name, bytes) = split_key(text, 32)?;
        let key = ed25519_compact::PublicKey::from_slice(&bytes).map_err(|_| KeyError::BadBase64)?;
        Ok(PublicKey { name: name.to_string(), key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` (a `name:base64` Sig value) is a valid signature of `msg` by this key.
    /// The name in `sig` is not compared: a signature is valid or not by its bytes alone.
    pub fn verify(&self, msg: &[u8], sig: &str) -> bool {
        let Some((_, b64)) = sig.split_once(':') else { return false };
        let Ok(bytes) = B64.decode(b64.trim()) else { return false };
        let Ok(sig) = ed25519_compact::Signature::from_slice(&bytes) else { return false };
        self.key.verify(msg, &sig).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.key.as_ref()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// The key ncps signs narinfos with. Its Debug output never shows the secret.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    pair: ed25519_compact::KeyPair,
}

impl SecretKey {
    pub fn parse(text: &str) -> Result<SecretKey, KeyError> {
        let (name, bytes) = split_key(text, 64)?;
        let pair = ed25519_compact::KeyPair::from_slice(&bytes).map_err(|_| KeyError::BadBase64)?;
        // The file carries the public half too; a file whose halves disagree would make
        // signatures nobody can verify, so refuse it now rather than on the first client.
        let derived = ed25519_compact::KeyPair::from_seed(pair.sk.seed());
        if derived.pk != pair.pk {
            return Err(KeyError::Inconsistent);
        }
        Ok(SecretKey { name: name.to_string(), pair })
    }

    /// A new key from the kernel's random source.
    pub fn generate(name: &str) -> Result<SecretKey, KeyError> {
        use std::io::Read;
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|e| KeyError::Random(e.to_string()))?;
        let pair = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new(seed));
        Ok(SecretKey { name: name.to_string(), pair })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public(&self) -> PublicKey {
        PublicKey { name: self.name.clone(), key: self.pair.pk }
    }

    /// The `name:base64` signature of `msg`.
    pub fn sign(&self, msg: &[u8]) -> String {
        let sig = self.pair.sk.sign(msg, None);
        format!("{}:{}", self.name, B64.encode(sig.as_ref()))
    }

    /// The secret in Nix's file format, for storing a generated key.
    pub fn to_file_text(&self) -> String {
        format!("{}:{}", self.name, B64.encode(self.pair.as_ref()))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:…)", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made by `nix-store --generate-binary-cache-key test.example.org-1 sec pub`.
    const NIX_SECRET: &str = "test.example.org-1:ZxEDsh8zmnX+cuNZ1eemScUbSX1lsskqiLFNItPdKsvtggaidnaBrZVmSeL5mX2+Na2wb/K27kTvxe4bh2856w==";
    const NIX_PUBLIC: &str = "test.example.org-1:7YIGonZ2ga2VZkni+Zl9vjWtsG/ytu5E78XuG4dvOes=";

    #[test]
    fn keys_made_by_nix_parse_and_agree() {
        let sk = SecretKey::parse(NIX_SECRET).unwrap();
        assert_eq!(sk.public().to_string(), NIX_PUBLIC);
        let pk = PublicKey::parse(NIX_PUBLIC).unwrap();
        let sig = sk.sign(b"fingerprint");
        assert!(sig.starts_with("test.example.org-1:"));
        assert!(pk.verify(b"fingerprint", &sig));
        assert!(!pk.verify(b"fingerprinT", &sig));
        assert_eq!(SecretKey::parse(&sk.to_file_text()).unwrap().public(), pk);
    }

    #[test]
    fn malformed_keys_say_what_is_wrong() {
        assert_eq!(PublicKey::parse("nocolon").unwrap_err(), KeyError::NoName);
        assert_eq!(PublicKey::parse("k:!!").unwrap_err(), KeyError::BadBase64);
        assert_eq!(
            PublicKey::parse("k:AAAA").unwrap_err(),
            KeyError::WrongLength { want: 32, got: 3 }
        );
        assert!(SecretKey::parse(NIX_PUBLIC).is_err());
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let sk = SecretKey::parse(NIX_SECRET).unwrap();
        assert_eq!(format!("{sk:?}"), "SecretKey(test.example.org-1:…)");
    }
}
