//! Nix's base-32 ("nix32"): the alphabet of store path hashes and of `sha256:` hashes in narinfos.
//!
//! It is not RFC 4648 base32: the alphabet leaves out `e o u t` and the bits are read from the
//! last byte to the first, so a hash must be converted with this module, never with a generic
//! base32 codec.
//!
//! ```
//! use ncps::nix::nix32;
//! let text = nix32::encode(&[0xff; 4]);
//! assert_eq!(text, "3zzzzzz");
//! assert_eq!(nix32::decode(&text).unwrap(), vec![0xff; 4]);
//! ```

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Length of the nix32 text for `bytes` bytes of input.
pub const fn encoded_len(bytes: usize) -> usize {
    (bytes * 8).div_ceil(5)
}

/// Whether `c` is one of the 32 characters of the nix32 alphabet.
pub fn is_nix32_char(c: u8) -> bool {
    ALPHABET.contains(&c)
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Encodes bytes as nix32 text.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = bytes[i] >> j;
        let high = if i + 1 < bytes.len() { (bytes[i + 1] as u16) << (8 - j) } else { 0 };
        out.push(ALPHABET[((low as u16 | high) & 0x1f) as usize] as char);
    }
    out
}

/// Decodes nix32 text; `None` if a character is outside the alphabet or the text does not
/// describe a whole number of bytes (leftover high bits set).
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let text = text.as_bytes();
    let size = text.len() * 5 / 8;
    if encoded_len(size) != text.len() {
        return None;
    }
    let mut out = vec![0u8; size];
    for (n, &c) in text.iter().rev().enumerate() {
        let d = digit(c)?;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        if i < size {
            out[i] |= d << j;
        } else if d != 0 {
            return None;
        }
        let carry = if j > 3 { d >> (8 - j) } else { 0 };
        if i + 1 < size {
            out[i + 1] |= carry;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sha256_of_empty_string() {
        // `nix-hash --type sha256 --to-base32` of e3b0c442...b855 (sha256 of "")
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let bytes: Vec<u8> =
            (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
        let text = encode(&bytes);
        assert_eq!(text, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(decode(&text).unwrap(), bytes);
    }

    #[test]
    fn store_path_hash_length_round_trips() {
        let bytes: Vec<u8> = (0..20).map(|i| i * 13).collect();
        let text = encode(&bytes);
        assert_eq!(text.len(), 32);
        assert_eq!(decode(&text).unwrap(), bytes);
    }

    #[test]
    fn rejects_foreign_characters_and_overflow() {
        assert_eq!(decode("e000000000000000000000000000000000000000000000000000"), None);
        // 52 chars carry 260 bits; a set top bit cannot fit in 32 bytes.
        assert_eq!(decode("z000000000000000000000000000000000000000000000000000"), None);
        assert_eq!(decode("abc"), None);
    }
}
