//! Replicas sharing one index (PostgreSQL) and one bucket: one upstream download per NAR
//! across all of them, and the others stream it from the replica that downloads it.
//!
//! Why leases in the index, not a lock service: the index is already the one thing every
//! replica shares, and a lease with an expiry needs no process to stay alive to be released
//! (a replica killed mid-download loses its lease within [`TTL`] seconds). Why stream from the
//! downloader rather than wait for the object: a client's first byte then comes as soon as
//! the upstream's does (the downloader relays its staged file as it grows, exactly as it does
//! to its own clients), instead of after the whole NAR was fetched, verified and uploaded.
//!
//! The rules: a replica about to download a NAR takes the lease `nar/<name>` with its
//! `--server-advertise-addr`; one that cannot sees who holds it and fetches the NAR from that
//! replica first (`http://peer/nar/<name>`: the peer joins its running download), verifying
//! the bytes against the FileHash as from any upstream, and does not store them (the holder
//! does). If the peer fails (it died, its lease will expire), the configured upstreams are
//! next, as for any failed source. Leases are renewed every [`RENEW`] while their download
//! runs and released when it ends. Without `--server-advertise-addr` nothing here runs.
//!
//! Narinfo lookups are shared the same way, more simply: the replica about to ask the
//! upstreams for a narinfo takes the lease `narinfo/<hash>` ([`NARINFO_TTL`], not renewed: a
//! lookup is one small request); another replica missing the same hash meanwhile waits,
//! looking every [`NARINFO_POLL`] for the narinfo in the shared store or the hash in the shared
//! negative cache, and answers from there. If the holder's lookup failed (an outage is not
//! remembered as absence) or it died, the lease goes and the waiter asks the upstreams itself.

use super::Cache;
use crate::index::Index;
use crate::nix::{NarName, StorePathHash};
use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Seconds a lease lasts without renewal: how long a dead downloader holds a NAR up.
pub const TTL: i64 = 15;
/// How often held leases are renewed.
const RENEW: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(super) struct State {
    held: Mutex<HashSet<NarName>>,
    renewer: OnceLock<()>,
}

fn key(name: &NarName) -> String {
    format!("nar/{name}")
}

/// Seconds the lease on a narinfo lookup lasts: longer than a lookup takes, short enough that
/// a replica that died while asking holds nobody up for long.
const NARINFO_TTL: i64 = 10;
/// How often a replica waiting for another's narinfo lookup looks for its outcome.
const NARINFO_POLL: Duration = Duration::from_millis(20);

fn narinfo_key(hash: &StorePathHash) -> String {
    format!("narinfo/{hash}")
}

/// Whose turn it is to ask the upstreams for a narinfo.
pub(super) enum NarinfoTurn {
    /// No replicas (or the index could not be asked): ask, as a single ncps does.
    Alone,
    /// This replica holds the lease: ask, then [`Cache::end_narinfo_turn`].
    Mine,
    /// Another replica's lookup stored these narinfo bytes: served without asking.
    Stored(Vec<u8>),
    /// Another replica's lookup found the hash absent (the shared negative cache says so).
    Absent,
}

/// The key of the lease that lets one replica at a time run an eviction pass.
const EVICTOR: &str = "evictor";
/// Seconds the evictor's lease lasts; renewed at every batch (a batch takes well under this).
const EVICTOR_TTL: i64 = 60;

/// The evictor's lease while a pass runs; given back when dropped. Without replicas it is
/// nobody's and costs nothing.
pub(super) struct EvictorLease<'a> {
    held: Option<(&'a dyn Index, &'a str)>,
}

impl EvictorLease<'_> {
    /// Keeps it for another [`EVICTOR_TTL`] seconds (between batches).
    pub(super) fn renew(&self) {
        if let Some((index, me)) = self.held {
            if let Err(e) = index.take_lease(EVICTOR, me, crate::index::now(), EVICTOR_TTL) {
                log::warn!("eviction: renewing its lease: {e}");
            }
        }
    }
}

impl Drop for EvictorLease<'_> {
    fn drop(&mut self) {
        if let Some((index, me)) = self.held {
            if let Err(e) = index.release_lease(EVICTOR, me) {
                log::warn!("eviction: releasing its lease: {e}; it expires within {EVICTOR_TTL} s");
            }
        }
    }
}

impl Cache {
    /// Before an eviction pass: the lease that makes this replica the only one evicting, or
    /// `None` while another replica runs a pass (the totals are shared, so its pass is ours).
    pub(super) fn evictor_lease(&self) -> Option<EvictorLease<'_>> {
        let Some(me) = self.settings.advertise.as_deref() else { return Some(EvictorLease { held: None }) };
        match self.index.take_lease(EVICTOR, me, crate::index::now(), EVICTOR_TTL) {
            Ok(true) => Some(EvictorLease { held: Some((&*self.index, me)) }),
            Ok(false) => {
                log::info!("eviction: another replica is running a pass; not starting one here");
                None
            }
            Err(e) => {
                // Evicting without the lease risks two passes at once (each removes what it
                // chose; neither removes a byte twice), not a wrong byte: go on.
                log::warn!("eviction: taking its lease: {e}; evicting anyway");
                Some(EvictorLease { held: None })
            }
        }
    }

    /// Before downloading `name`: `None` when this replica downloads it from the upstreams
    /// (it holds the lease, or there are no replicas, or the index could not be asked);
    /// `Some(base URL)` of the replica that is downloading it.
    pub(super) fn download_lease(self: &Arc<Self>, name: &NarName) -> Option<String> {
        let me = self.settings.advertise.as_deref()?;
        let now = crate::index::now();
        match self.index.take_lease(&key(name), me, now, TTL) {
            Ok(true) => {
                super::lock(&self.replicas.held).insert(name.clone());
                self.start_renewer();
                None
            }
            Ok(false) => match self.index.lease_holder(&key(name), now) {
                Ok(Some(peer)) if peer != me => {
                    log::info!("nar {name}: replica {peer} is downloading it; streaming it from there");
                    Some(peer)
                }
                // Released or expired meanwhile: downloading it here is right.
                Ok(_) => None,
                Err(e) => {
                    log::warn!("nar {name}: reading its lease: {e}; downloading it here");
                    None
                }
            },
            Err(e) => {
                log::warn!("nar {name}: taking its lease: {e}; downloading it here");
                None
            }
        }
    }

    /// Before asking the upstreams for `hash`: waits while another replica asks for it (see
    /// the module doc), until its lookup settled it, its lease went, or `abandoned` says every
    /// client left (then [`NarinfoTurn::Alone`]: the caller's own lookup stops at once).
    pub(super) fn narinfo_turn(&self, hash: &StorePathHash, abandoned: &dyn Fn() -> bool) -> NarinfoTurn {
        let Some(me) = self.settings.advertise.as_deref() else { return NarinfoTurn::Alone };
        let key = narinfo_key(hash);
        let mut waited = false;
        loop {
            match self.index.take_lease(&key, me, crate::index::now(), NARINFO_TTL) {
                Ok(true) => return NarinfoTurn::Mine,
                Ok(false) => {}
                Err(e) => {
                    log::warn!("narinfo {hash}: taking its lease: {e}; asking the upstreams");
                    return NarinfoTurn::Alone;
                }
            }
            if !waited {
                log::debug!("narinfo {hash}: another replica is asking the upstreams for it; waiting");
                waited = true;
            }
            std::thread::sleep(NARINFO_POLL);
            if abandoned() {
                return NarinfoTurn::Alone;
            }
            // The holder stores the narinfo (or records it absent) before it gives the lease back.
            if let Some(settled) = self.settled_elsewhere(hash) {
                return settled;
            }
        }
    }

    /// The lookup of `hash` this replica held the lease for ended.
    pub(super) fn end_narinfo_turn(&self, hash: &StorePathHash) {
        let Some(me) = self.settings.advertise.as_deref() else { return };
        if let Err(e) = self.index.release_lease(&narinfo_key(hash), me) {
            log::warn!("narinfo {hash}: releasing its lease: {e}; it expires within {NARINFO_TTL} s");
        }
    }

    /// The download of `name` ended: its lease, if this replica held it, is given back.
    pub(super) fn release_download_lease(&self, name: &NarName) {
        let (Some(me), true) = (self.settings.advertise.as_deref(), super::lock(&self.replicas.held).remove(name)) else {
            return;
        };
        if let Err(e) = self.index.release_lease(&key(name), me) {
            log::warn!("nar {name}: releasing its lease: {e}; it expires within {TTL} s");
        }
    }

    fn start_renewer(self: &Arc<Self>) {
        self.replicas.renewer.get_or_init(|| {
            let cache = Arc::downgrade(self);
            let spawned = std::thread::Builder::new().name("leases".into()).spawn(move || loop {
                std::thread::sleep(RENEW);
                let Some(cache) = cache.upgrade() else { break };
                let Some(me) = cache.settings.advertise.clone() else { break };
                let held: Vec<NarName> = super::lock(&cache.replicas.held).iter().cloned().collect();
                for name in held {
                    match cache.index.take_lease(&key(&name), &me, crate::index::now(), TTL) {
                        Ok(true) => {}
                        Ok(false) => log::warn!("nar {name}: its lease was taken over by another replica"),
                        Err(e) => log::warn!("nar {name}: renewing its lease: {e}"),
                    }
                }
            });
            if let Err(e) = spawned {
                log::error!("leases: cannot start their thread: {e}");
            }
        });
    }
}
