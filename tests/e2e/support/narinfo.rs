//! Narinfos as the tests read them: [`NarInfo`] (fields in order, signatures, the
//! fingerprint that is signed) and [`store_hash`], the hash part of a store path that
//! names a narinfo.

/// Parsed narinfo: fields in order (Sig may repeat).
#[derive(Debug, Clone)]
pub struct NarInfo {
    pub fields: Vec<(String, String)>,
}

impl NarInfo {
    pub fn parse(text: &str) -> NarInfo {
        let fields = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        NarInfo { fields }
    }
    pub fn get(&self, k: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.as_str())
    }
    pub fn sigs(&self) -> Vec<String> {
        self.fields
            .iter()
            .filter(|(k, _)| k == "Sig")
            .map(|(_, v)| v.clone())
            .collect()
    }
    /// `1;StorePath;NarHash;NarSize;refs,as,full,paths`
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self
            .get("References")
            .unwrap_or("")
            .split_whitespace()
            .map(|r| format!("/nix/store/{r}"))
            .collect();
        format!(
            "1;{};{};{};{}",
            self.get("StorePath").unwrap_or(""),
            self.get("NarHash").unwrap_or(""),
            self.get("NarSize").unwrap_or(""),
            refs.join(",")
        )
    }
}

/// The 32-character hash part of a store path.
pub fn store_hash(store_path: &str) -> &str {
    let base = store_path.rsplit('/').next().unwrap();
    &base[..32]
}

/// A random but well-formed store path hash (32 nix32 characters).
pub fn random_hash(seed: u64) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    (0..32)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % 32) as usize] as char
        })
        .collect()
}
