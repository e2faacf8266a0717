//! zstd copies of `Compression: none` NARs, for clients whose Accept-Encoding names zstd
//! (Nix 2.14 and later send `zstd, br, gzip, deflate, bzip2, xz`; Nix 2.8 sends none).
//!
//! Why a kept copy, not compression per request: compressing costs 6-10 CPU s per GiB on one
//! core here (bench/zstd-lan.sh), far more than a hit may cost, while an ELF-heavy NAR is
//! 2.6-3.0x smaller at level 3 and a Gigabit client gets it up to ~3x sooner. So the first
//! request that asks is served plain and queues the NAR (a miss queues it once its download
//! has stored it); one background thread compresses it at level 3 into staging, the copy appears whole (renamed) beside the NAR through the blob
//! store seam, counted against `--cache-max-size` (the index's `zstd_size`), removed with its
//! NAR; later requests that ask get it with `sendfile` like any hit. A copy that saves less
//! than a tenth is not kept (and not tried again until restart). The queue is small and drops
//! when full: a copy is an optimisation, never owed to anyone.

use super::{Cache, CacheError};
use crate::nix::NarName;
use crate::storage::Blob;
use std::collections::HashSet;
use std::io::{self, Write};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};

/// NARs waiting for a copy at most; more are dropped (asked again by the next request).
const QUEUE: usize = 32;
/// zstd level: 3 is zstd's default, measured at 2.98x fewer bytes on ELF-heavy NARs.
const LEVEL: i32 = 3;
/// NARs whose copy was not worth keeping are remembered, up to this many.
const REFUSED_MAX: usize = 4096;

#[derive(Default)]
pub(super) struct State {
    sender: OnceLock<SyncSender<NarName>>,
    queued: Mutex<HashSet<NarName>>,
    refused: Mutex<HashSet<NarName>>,
    /// NARs a client asked zstd of while they were not stored yet: queued once stored.
    wanted: Mutex<HashSet<NarName>>,
}

/// Whether NAR `name` is stored plain (`Compression: none`): only those get a zstd copy.
pub fn is_plain(name: &NarName) -> bool {
    name.as_str().ends_with(".nar")
}

/// A [`Write`] into a staged file, counting what went in.
struct Counted<'a> {
    temp: &'a mut crate::storage::TempFile,
    written: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.temp.write_all(buf).map_err(io::Error::other)?;
        self.written += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Cache {
    /// The zstd copy of stored plain NAR `name` if there is one; if not, one is queued.
    pub(super) fn zstd_copy(self: &Arc<Self>, name: &NarName) -> Result<Option<Blob>, CacheError> {
        if let Some(blob) = self.blobs.nar_zstd(name)? {
            return Ok(Some(blob));
        }
        self.queue_zstd(name);
        Ok(None)
    }

    /// A client asked zstd of `name`, which is being downloaded: its copy is queued once the
    /// download has stored it ([`Cache::zstd_after_kept`]), so the next client gets it.
    pub(super) fn want_zstd(&self, name: &NarName) {
        let mut wanted = super::lock(&self.zstd.wanted);
        if wanted.len() < REFUSED_MAX {
            wanted.insert(name.clone());
        }
    }

    /// NAR `name` was just stored: its copy is queued if a client asked for one.
    pub(super) fn zstd_after_kept(self: &Arc<Self>, name: &NarName) {
        if super::lock(&self.zstd.wanted).remove(name) {
            self.queue_zstd(name);
        }
    }

    fn queue_zstd(self: &Arc<Self>, name: &NarName) {
        if super::lock(&self.zstd.refused).contains(name) || !super::lock(&self.zstd.queued).insert(name.clone()) {
            return;
        }
        let sender = self.zstd.sender.get_or_init(|| {
            let (tx, rx) = sync_channel::<NarName>(QUEUE);
            let cache = Arc::downgrade(self);
            let spawned = std::thread::Builder::new().name("zstd".into()).spawn(move || {
                for name in rx {
                    let Some(cache) = cache.upgrade() else { break };
                    if let Err(e) = cache.compress(&name) {
                        log::warn!("nar {name}: no zstd copy made: {e}");
                    }
                    super::lock(&cache.zstd.queued).remove(&name);
                }
            });
            if let Err(e) = spawned {
                log::error!("zstd copies: cannot start their thread: {e}");
            }
            tx
        });
        if sender.try_send(name.clone()).is_err() {
            super::lock(&self.zstd.queued).remove(name);
            log::debug!("nar {name}: the zstd queue is full; no copy queued");
        }
    }

    /// Makes and keeps the zstd copy of `name` (on the zstd thread).
    fn compress(&self, name: &NarName) -> Result<(), CacheError> {
        let Some(blob) = self.blobs.nar(name)? else { return Ok(()) };
        let len = blob.len();
        let mut reader = blob.into_reader();
        let mut temp = self.staging.temp_file()?;
        let started = std::time::Instant::now();
        let written = {
            let mut out = Counted { temp: &mut temp, written: 0 };
            let io_err = |e: io::Error| CacheError::from(crate::storage::StorageError::io("compressing", name.as_str().into(), e));
            let mut enc = zstd::stream::Encoder::new(&mut out, LEVEL).map_err(io_err)?;
            io::copy(&mut reader, &mut enc).map_err(io_err)?;
            enc.finish().map_err(io_err)?;
            out.written
        };
        if written.saturating_mul(10) > len.saturating_mul(9) {
            log::info!("nar {name}: zstd gives {written} of {len} bytes; not worth a copy");
            let mut refused = super::lock(&self.zstd.refused);
            if refused.len() < REFUSED_MAX {
                refused.insert(name.clone());
            }
            return Ok(());
        }
        let _writing = self.writing();
        self.blobs.put_nar_zstd(name, temp)?;
        if !self.index.set_nar_zstd(name, written)? {
            // Evicted or deleted meanwhile: the copy must not outlive its NAR.
            self.blobs.remove_nar_zstd(name)?;
            return Ok(());
        }
        self.space.add(written, 0);
        log::info!(
            "nar {name}: zstd copy kept, {written} of {len} bytes, made in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        self.enforce_limit();
        Ok(())
    }
}
