//! `PUT` uploads (`nix copy --to http://ncps/...`): a NAR is kept only if its bytes hash to its
//! name; a narinfo only if it describes the path it is put at, its NAR is here with exactly
//! the FileHash and FileSize it claims, ncps holds no narinfo for the path and no upstream
//! serves it (the rules are `trust::accept_upload` and `trust::may_store_upload`). ncps signs
//! it only if a trusted upload key did.

use super::verify::{copy_hashed, CopyError};
use super::{trust, Cache, UploadError};
use crate::index::NarRecord;
use crate::nix::narinfo::MAX_NARINFO_BYTES;
use crate::nix::{NarName, StorePathHash};
use std::io::Read;

impl Cache {
    /// `PUT /nar/<name>`.
    pub fn put_nar(&self, name: &NarName, body: &mut dyn Read, len: u64) -> Result<(), UploadError> {
        if self.settings.max_size.is_some_and(|max| len > max) {
            return Err(UploadError::TooLarge(len));
        }
        let mut temp = self.staging.temp_file()?;
        let copied = copy_hashed(body, u64::MAX, &mut |_, chunk| temp.write_all(chunk));
        let (got, written) = match copied {
            Ok(done) => done,
            Err(CopyError::Read { after, source }) => return Err(UploadError::Read { after, source }),
            Err(CopyError::Sink { source, .. }) => return Err(source.into()),
            Err(CopyError::TooLong { limit }) => return Err(UploadError::TooLarge(limit)),
        };
        if !trust::upload_matches_name(name, &got) {
            return Err(UploadError::NameMismatch { got });
        }
        let indexed = self.index.nar(name)?.is_some_and(|r| r.stored && r.file_hash == got && r.file_size == written);
        if indexed && self.blobs.nar_len(name)?.is_some() {
            // The same bytes are here already (a name is a content hash): nothing to replace.
            return Ok(());
        }
        let record =
            NarRecord { name: name.clone(), file_hash: got, file_size: written, upstream_url: String::new(), stored: false };
        let _writing = self.writing();
        if !self.index.put_nar(&record)? {
            return Err(UploadError::Internal(super::CacheError::NameTaken(name.clone())));
        }
        // What is counted already: the file there, or one the index counts whose file was
        // deleted behind ncps's back (counted once, not twice, when it comes back).
        let previous = self.blobs.nar_len(name)?.or(indexed.then_some(written));
        self.blobs.put_nar(name, temp, &got)?;
        self.index.set_nar_stored(name, true)?;
        self.space.add(written, previous.unwrap_or(0));
        self.enforce_limit();
        Ok(())
    }

    /// `PUT /<hash>.narinfo`.
    pub fn put_narinfo(&self, hash: &StorePathHash, body: &mut dyn Read) -> Result<(), UploadError> {
        let mut bytes = Vec::new();
        body.take(MAX_NARINFO_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| UploadError::Read { after: bytes.len() as u64, source })?;
        let policy = &self.settings.uploads;
        let trust::AcceptedUpload { mut claimed, sign } = trust::accept_upload(hash, &bytes, policy)?;
        let held = self.index.narinfo_nar(hash)?.is_some();
        // Asking the upstreams only matters when nothing is held and shadowing is not allowed.
        let upstream = (!held && !policy.may_shadow).then(|| self.upstream_says(hash));
        trust::may_store_upload(held, upstream.as_ref(), policy)?;
        let record = match self.index.nar(&claimed.nar)? {
            Some(r) if r.stored && r.file_hash == claimed.file_hash && r.file_size == claimed.file_size => r,
            Some(r) if r.stored => {
                return Err(UploadError::NarDiffers {
                    name: claimed.nar,
                    stored: (r.file_size, r.file_hash),
                    claimed: (claimed.file_size, claimed.file_hash),
                })
            }
            _ => return Err(UploadError::NarMissing(claimed.nar)),
        };
        match self.signer() {
            Some(key) if sign => claimed.info.sign(key),
            // Not vouched for: no signature in this cache's name goes out with it.
            _ => {
                let ours = format!("{}:", self.key.name());
                claimed.info.sigs.retain(|s| !s.starts_with(&ours));
            }
        }
        self.store_narinfo(hash, &claimed.info, &record)?;
        self.forget_missing(hash);
        Ok(())
    }

    /// One entry of a Go ncps cache being imported (`crate::migrate_go`): held to the upload
    /// rules, minus who may upload. The narinfo must describe `hash` and carry a signature by
    /// one of `trusted` (the upstream keys and the Go cache's own key, which signed what it
    /// served); its NAR must hash to its name and be as long as the narinfo says. Then both
    /// are stored through the seams as an upload would be, and signed by this cache's key
    /// (the Go cache's own, imported, so clients see the signature they already trust).
    pub fn import_entry(
        &self,
        hash: &StorePathHash,
        narinfo: &[u8],
        nar: &mut dyn Read,
        trusted: &[crate::nix::PublicKey],
    ) -> Result<(), UploadError> {
        let mut claimed = trust::claimed_by_upload(hash, narinfo)?;
        if !claimed.info.verify(trusted) {
            return Err(UploadError::Untrusted);
        }
        if self.index.narinfo_nar(hash)?.is_none() {
            self.put_nar(&claimed.nar, nar, claimed.file_size)?;
        }
        let record = match self.index.nar(&claimed.nar)? {
            Some(r) if r.stored && r.file_hash == claimed.file_hash && r.file_size == claimed.file_size => r,
            Some(r) => {
                return Err(UploadError::NarDiffers {
                    name: claimed.nar,
                    stored: (r.file_size, r.file_hash),
                    claimed: (claimed.file_size, claimed.file_hash),
                })
            }
            None => return Err(UploadError::NarMissing(claimed.nar)),
        };
        let ours = format!("{}:", self.key.name());
        claimed.info.sigs.retain(|s| !s.starts_with(&ours));
        if let Some(key) = self.signer() {
            claimed.info.sign(key);
        }
        self.store_narinfo(hash, &claimed.info, &record)?;
        Ok(())
    }
}
