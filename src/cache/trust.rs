//! The trust rules, as pure functions of bytes: what ncps accepts from an upstream or a client,
//! and what it is then willing to sign.
//!
//! - An upstream narinfo is accepted only if it describes the path asked for and a `Sig`
//!   verifies against one of the trusted keys (any of them, whatever its name, as Nix does).
//!   With no keys configured it is passed on, never signed by ncps.
//! - What decides the stored NAR's bytes is what the signature covers: for `Compression: none`
//!   `NarHash`/`NarSize` (a `FileHash` that disagrees is refused); otherwise `FileHash`/
//!   `FileSize`, and the client checks `NarHash` after decompressing.
//! - The `URL` is not signed, so only relative URLs or absolute ones on the upstream's own
//!   origin are followed: a narinfo cannot make ncps fetch from anywhere else. Nor does the
//!   `URL` name the stored NAR: its name is made from the digest that decides its bytes
//!   (`<nix32 FileHash>.nar<ext>`, the NarHash for `Compression: none`), so two narinfos
//!   share a stored NAR only if they promise the same bytes, and a narinfo whose `URL` names
//!   another path's NAR file gets a name of its own (and a download that fails its check).
//! - The narinfo ncps serves points at `nar/<name>` on ncps itself.
//! - An upload is signed by ncps only if a `--cache-trusted-upload-key` already signed it
//!   (with `--cache-require-trusted-signature`, only such uploads are taken at all): who may
//!   upload (the write token) and what ncps vouches for (a trusted key's signature) are
//!   separate, so a leaked token cannot make ncps sign anything. An upload never replaces a
//!   narinfo ncps holds, nor stands for a path an upstream serves (ncps asks them first), unless
//!   the operator allows it (`--cache-upload-may-shadow-upstream`).

use crate::index::NarRecord;
use crate::nix::narinfo::NarInfoError;
use crate::nix::{Hash, NarInfo, NarName, PublicKey, SecretKey, StorePathHash};
use std::fmt;

/// Why an upstream's narinfo is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    Unparsable(NarInfoError),
    /// It describes another store path than the one asked for.
    WrongPath { describes: String },
    /// No signature by a trusted key.
    Unsigned,
    /// The digest fields are missing or inconsistent.
    Digest(&'static str),
    /// The URL points outside the upstream.
    UrlOutside(String),
    /// The URL is neither absolute on the upstream nor a plain relative path.
    UrlNotPlain(String),
    /// No NAR name can be made for this compression.
    Unnameable { compression: String },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Unparsable(e) => e.fmt(f),
            Refusal::WrongPath { describes } => write!(f, "it describes {describes}, not the path asked for"),
            Refusal::Unsigned => f.write_str("no signature by a trusted upstream key"),
            Refusal::Digest(e) => f.write_str(e),
            Refusal::UrlOutside(url) => write!(f, "URL {url:?} points outside the upstream"),
            Refusal::UrlNotPlain(url) => write!(f, "URL {url:?} is not a plain relative path"),
            Refusal::Unnameable { compression } => {
                write!(f, "cannot name a NAR with compression {compression:?}")
            }
        }
    }
}

impl std::error::Error for Refusal {}

/// An accepted narinfo: re-pointed at ncps's own `nar/<name>`, with the record of its NAR
/// (where to fetch it, what it must hash to), ready to be signed and served.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub info: NarInfo,
    pub nar: NarRecord,
    /// Whether an upstream signature verified: only then may ncps add its own.
    pub verified: bool,
}

impl Accepted {
    /// The narinfo as served: signed by `key` if one is given and the upstream's signature
    /// verified.
    pub fn served(mut self, key: Option<&SecretKey>) -> (NarInfo, NarRecord) {
        if let (Some(key), true) = (key, self.verified) {
            self.info.sign(key);
        }
        (self.info, self.nar)
    }
}

/// Decides whether `bytes`, `upstream`'s answer for `hash`, can be trusted.
pub fn accept_upstream(
    hash: &StorePathHash,
    bytes: &[u8],
    trusted: &[PublicKey],
    upstream: &str,
) -> Result<Accepted, Refusal> {
    let mut info = NarInfo::parse(bytes).map_err(Refusal::Unparsable)?;
    if info.store_path_hash() != Some(*hash) {
        return Err(Refusal::WrongPath { describes: info.store_path });
    }
    let verified = info.verify(trusted);
    if !trusted.is_empty() && !verified {
        return Err(Refusal::Unsigned);
    }
    let (file_hash, file_size) = info.file_digest().map_err(Refusal::Digest)?;
    let (name, upstream_url) = nar_location(upstream, &info.url, &file_hash, &info.compression)?;
    info.url = format!("nar/{name}");
    Ok(Accepted { info, nar: NarRecord { name, file_hash, file_size, upstream_url, stored: false }, verified })
}

/// What an uploaded narinfo claims: the narinfo, and the NAR (name, hash, size) it needs.
#[derive(Debug)]
pub struct Claimed {
    pub info: NarInfo,
    pub nar: NarName,
    pub file_hash: Hash,
    pub file_size: u64,
}

/// Checks an uploaded narinfo for `hash` on its own (whether its NAR is here is the caller's
/// question).
pub fn claimed_by_upload(hash: &StorePathHash, bytes: &[u8]) -> Result<Claimed, super::UploadError> {
    use super::UploadError;
    let info = NarInfo::parse(bytes).map_err(UploadError::Narinfo)?;
    if info.store_path_hash() != Some(*hash) {
        return Err(UploadError::WrongPath { describes: info.store_path });
    }
    let (file_hash, file_size) = info.file_digest().map_err(UploadError::Digest)?;
    let nar = info
        .url
        .strip_prefix("nar/")
        .and_then(NarName::parse)
        .ok_or_else(|| UploadError::BadUrl(info.url.clone()))?;
    Ok(Claimed { info, nar, file_hash, file_size })
}

/// What uploads may be (`--cache-trusted-upload-key`, `--cache-require-trusted-signature`,
/// `--cache-upload-may-shadow-upstream`).
#[derive(Debug, Clone, Default)]
pub struct UploadPolicy {
    pub trusted_keys: Vec<PublicKey>,
    pub require_trusted_signature: bool,
    pub may_shadow: bool,
}

/// An uploaded narinfo that may be stored: what it claims, and whether ncps may sign it.
#[derive(Debug)]
pub struct AcceptedUpload {
    pub claimed: Claimed,
    /// A trusted upload key signed it: only then does ncps add its own signature.
    pub sign: bool,
}

/// Checks an uploaded narinfo's own content and signatures against the policy.
pub fn accept_upload(hash: &StorePathHash, bytes: &[u8], policy: &UploadPolicy) -> Result<AcceptedUpload, super::UploadError> {
    let claimed = claimed_by_upload(hash, bytes)?;
    let sign = claimed.info.verify(&policy.trusted_keys);
    if policy.require_trusted_signature && !sign {
        return Err(super::UploadError::Untrusted);
    }
    Ok(AcceptedUpload { claimed, sign })
}

/// What the upstreams say about a path an upload is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamSays {
    /// None has it (or none has it signed by a trusted key).
    Absent,
    /// This upstream serves it (its narinfo is now held by ncps).
    Serves(String),
    /// Some could not answer: whether one serves it is unknown (why).
    Unknown(String),
}

/// Whether an upload for a path may be stored, given whether ncps already holds a narinfo for
/// it and (asked only when that matters, `None` otherwise) what the upstreams say.
pub fn may_store_upload(held: bool, upstream: Option<&UpstreamSays>, policy: &UploadPolicy) -> Result<(), super::UploadError> {
    use super::UploadError;
    if policy.may_shadow {
        return Ok(());
    }
    if held {
        return Err(UploadError::Held);
    }
    match upstream {
        None | Some(UpstreamSays::Absent) => Ok(()),
        Some(UpstreamSays::Serves(u)) => Err(UploadError::UpstreamServes(u.clone())),
        Some(UpstreamSays::Unknown(why)) => Err(UploadError::UpstreamUnknown(why.clone())),
    }
}

/// Whether an uploaded NAR's bytes (with SHA-256 `got`) are what its name says, as NARs
/// written by `nix copy` are named (`<nix32 of sha256 of the file>.nar<ext>`).
pub fn upload_matches_name(name: &NarName, got: &Hash) -> bool {
    name_hash(name).as_ref() == Some(got)
}

/// The SHA-256 a NAR's name promises its file has, if the name is a content hash (as
/// cache.nixos.org and `nix copy` name NARs: `<nix32 FileHash>.nar<ext>`; 64 hex digits are
/// read the same way). `None` for a name that only looks like one (52 nix32 characters
/// hold 260 bits, and a SHA-256 has 256): such a name vouches for nothing.
pub fn name_hash(name: &NarName) -> Option<Hash> {
    Hash::parse_digest(name.as_str().split(".nar").next().unwrap_or(""))
}

/// The scheme and authority of `url`: which upstream it is on (see [`crate::url::origin`]).
pub use crate::url::origin;

/// Where ncps keeps a NAR (its name) and where to fetch it (an absolute URL). The name comes
/// from the digest the NAR is checked against, never from the unsigned `URL`; the `URL` only
/// says where to fetch: relative URLs are resolved against the upstream, absolute ones must
/// stay on the upstream's own origin.
pub fn nar_location(base: &str, url: &str, file_hash: &Hash, compression: &str) -> Result<(NarName, String), Refusal> {
    let absolute = if url.starts_with("http://") || url.starts_with("https://") {
        if origin(url) != origin(base) {
            return Err(Refusal::UrlOutside(url.to_string()));
        }
        url.to_string()
    } else if url.contains("..") || url.starts_with('/') || url.contains("://") {
        return Err(Refusal::UrlNotPlain(url.to_string()));
    } else {
        format!("{base}/{url}")
    };
    let name = NarName::for_file(file_hash, compression)
        .ok_or_else(|| Refusal::Unnameable { compression: compression.to_string() })?;
    Ok((name, absolute))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH_HASH: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";

    fn narinfo(url: &str, compression: &str, extra: &str) -> String {
        let nar = Hash::of(b"nar");
        format!(
            "StorePath: /nix/store/{PATH_HASH}-hello\nURL: {url}\nCompression: {compression}\n\
             {extra}NarHash: {nar}\nNarSize: 3\nReferences: \n"
        )
    }

    fn key() -> SecretKey {
        SecretKey::generate("up-1").unwrap()
    }

    fn signed(text: &str, key: &SecretKey) -> Vec<u8> {
        let mut info = NarInfo::parse(text.as_bytes()).unwrap();
        info.sign(key);
        info.to_string().into_bytes()
    }

    fn hash() -> StorePathHash {
        StorePathHash::parse(PATH_HASH).unwrap()
    }

    #[test]
    fn a_nar_name_vouches_for_the_hash_it_is_made_of_and_only_a_real_hash_counts() {
        let h = Hash::of(b"some file");
        let nix32 = NarName::parse(&format!("{}.nar.xz", h.to_nix32())).unwrap();
        assert_eq!(name_hash(&nix32), Some(h));
        let hex: String = h.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(name_hash(&NarName::parse(&format!("{hex}.nar")).unwrap()), Some(h));
        // 52 nix32 characters carry 260 bits: names with the top bits set are no SHA-256.
        let not_a_hash = NarName::parse(&format!("{}.nar", "z".repeat(52))).unwrap();
        assert_eq!(name_hash(&not_a_hash), None);
        assert!(!upload_matches_name(&not_a_hash, &h));
    }

    #[test]
    fn a_narinfo_signed_by_a_trusted_key_is_accepted_and_repointed_at_ncps() {
        let k = key();
        let bytes = signed(&narinfo("nar/abc.nar", "none", ""), &k);
        let a = accept_upstream(&hash(), &bytes, &[k.public()], "http://up:1").unwrap();
        assert!(a.verified);
        assert_eq!(a.nar.file_hash, Hash::of(b"nar"), "NarHash decides for Compression: none");
        assert_eq!(a.info.url, format!("nar/{}", a.nar.name));
        assert!(a.nar.upstream_url.starts_with("http://up:1/nar/"));
        let ours = key();
        let (served, _) = a.served(Some(&ours));
        assert!(served.verify(&[ours.public()]), "ncps signs what it verified");
    }

    #[test]
    fn an_unsigned_or_foreign_signed_narinfo_is_refused_when_keys_are_configured() {
        let trusted = key();
        let text = narinfo("nar/abc.nar", "none", "");
        let err = accept_upstream(&hash(), text.as_bytes(), &[trusted.public()], "http://up:1").unwrap_err();
        assert_eq!(err, Refusal::Unsigned);
        let other = signed(&text, &key());
        let err = accept_upstream(&hash(), &other, &[trusted.public()], "http://up:1").unwrap_err();
        assert_eq!(err, Refusal::Unsigned);
    }

    #[test]
    fn without_keys_a_narinfo_is_passed_on_but_never_signed_by_ncps() {
        let text = narinfo("nar/abc.nar", "none", "");
        let a = accept_upstream(&hash(), text.as_bytes(), &[], "http://up:1").unwrap();
        assert!(!a.verified);
        let ours = key();
        let (served, _) = a.served(Some(&ours));
        assert!(!served.verify(&[ours.public()]));
    }

    #[test]
    fn a_narinfo_for_another_path_is_refused() {
        let k = key();
        let bytes = signed(&narinfo("nar/abc.nar", "none", ""), &k);
        let other = StorePathHash::parse("1mdqa9w1p6cmli6976v4wi0sw9r4p5pr").unwrap();
        let err = accept_upstream(&other, &bytes, &[k.public()], "http://up:1").unwrap_err();
        assert!(matches!(err, Refusal::WrongPath { .. }), "{err}");
    }

    #[test]
    fn a_file_hash_that_disagrees_with_the_signed_nar_hash_is_refused() {
        let k = key();
        let bad = format!("FileHash: {}\nFileSize: 3\n", Hash::of(b"other"));
        let bytes = signed(&narinfo("nar/abc.nar", "none", &bad), &k);
        let err = accept_upstream(&hash(), &bytes, &[k.public()], "http://up:1").unwrap_err();
        assert!(matches!(err, Refusal::Digest(_)), "{err}");
    }

    #[test]
    fn nar_urls_stay_on_their_upstream() {
        let h = Hash::of(b"x");
        let n = format!("{}.nar.xz", h.to_nix32());
        let (name, url) = nar_location("http://up:1", &format!("nar/{n}"), &h, "xz").unwrap();
        assert_eq!((name.as_str(), url.as_str()), (n.as_str(), format!("http://up:1/nar/{n}").as_str()));
        assert!(matches!(nar_location("http://up:1", "http://evil:1/nar/x.nar", &h, "xz"), Err(Refusal::UrlOutside(_))));
        assert!(matches!(nar_location("http://up:1", "../../x", &h, "xz"), Err(Refusal::UrlNotPlain(_))));
        // An opaque upstream name is replaced by one made from the file hash.
        let (name, _) = nar_location("http://up:1", "blobs/0c5e2f", &h, "zstd").unwrap();
        assert_eq!(name.as_str(), format!("{}.nar.zst", h.to_nix32()));
    }

    #[test]
    fn the_stored_name_comes_from_the_checked_digest_never_from_the_unsigned_url() {
        let mine = Hash::of(b"other path's nar");
        let small = Hash::of(b"small's nar");
        let small_file = format!("{}.nar.xz", small.to_nix32());
        // The URL names SMALL's NAR file: that is where it is fetched from (and the download
        // then fails its check), but the name it is kept under is its own digest's.
        let (name, url) = nar_location("http://up:1", &format!("nar/{small_file}"), &mine, "xz").unwrap();
        assert_eq!(name.as_str(), format!("{}.nar.xz", mine.to_nix32()));
        assert_eq!(url, format!("http://up:1/nar/{small_file}"));
        assert_eq!(name_hash(&name), Some(mine));
        // For Compression: none the signed NarHash names it.
        let k = key();
        let text = narinfo(&format!("nar/{}.nar", small.to_nix32()), "none", "");
        let a = accept_upstream(&hash(), &signed(&text, &k), &[k.public()], "http://up:1").unwrap();
        assert_eq!(a.nar.name.as_str(), format!("{}.nar", Hash::of(b"nar").to_nix32()));
    }

    fn upload(key: Option<&SecretKey>) -> Vec<u8> {
        let h = Hash::of(b"nar");
        let text = narinfo(&format!("nar/{}.nar", h.to_nix32()), "none", "");
        match key {
            Some(k) => signed(&text, k),
            None => text.into_bytes(),
        }
    }

    #[test]
    fn ncps_signs_an_upload_only_if_a_trusted_upload_key_signed_it() {
        use crate::cache::UploadError;
        let uploader = key();
        let lax = UploadPolicy { trusted_keys: vec![uploader.public()], ..Default::default() };
        assert!(accept_upload(&hash(), &upload(Some(&uploader)), &lax).unwrap().sign);
        assert!(!accept_upload(&hash(), &upload(Some(&key())), &lax).unwrap().sign, "another key: stored, not vouched for");
        assert!(!accept_upload(&hash(), &upload(None), &lax).unwrap().sign, "unsigned: stored, not vouched for");
        let none = UploadPolicy::default();
        assert!(!accept_upload(&hash(), &upload(Some(&uploader)), &none).unwrap().sign, "no trusted keys: never signed");
        let strict = UploadPolicy { require_trusted_signature: true, ..lax };
        assert!(accept_upload(&hash(), &upload(Some(&uploader)), &strict).unwrap().sign);
        for refused in [upload(Some(&key())), upload(None)] {
            assert!(matches!(accept_upload(&hash(), &refused, &strict), Err(UploadError::Untrusted)));
        }
    }

    #[test]
    fn an_upload_never_replaces_what_ncps_holds_nor_shadows_what_an_upstream_serves() {
        use crate::cache::UploadError;
        let p = UploadPolicy::default();
        assert!(may_store_upload(false, None, &p).is_ok());
        assert!(may_store_upload(false, Some(&UpstreamSays::Absent), &p).is_ok());
        assert!(matches!(may_store_upload(true, None, &p), Err(UploadError::Held)));
        let serves = UpstreamSays::Serves("http://up:1".into());
        assert!(matches!(may_store_upload(false, Some(&serves), &p), Err(UploadError::UpstreamServes(_))));
        let unknown = UpstreamSays::Unknown("timeout".into());
        assert!(matches!(may_store_upload(false, Some(&unknown), &p), Err(UploadError::UpstreamUnknown(_))), "fails closed");
        let shadow = UploadPolicy { may_shadow: true, ..p };
        for says in [None, Some(&serves), Some(&unknown)] {
            assert!(may_store_upload(true, says, &shadow).is_ok(), "the operator allowed it");
        }
    }

    #[test]
    fn an_uploaded_nar_must_hash_to_its_name() {
        let h = Hash::of(b"bytes");
        let name = NarName::parse(&format!("{}.nar", h.to_nix32())).unwrap();
        assert!(upload_matches_name(&name, &h));
        assert!(!upload_matches_name(&name, &Hash::of(b"other")));
    }
}
