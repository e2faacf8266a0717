//! A small in-memory copy of recently served narinfos.
//!
//! A narinfo hit from disk costs an open, a stat, a read and a close; from memory it costs
//! nothing but the send. nginx gets the same from `open_file_cache`, and the narinfo hit
//! benchmark compares against that. Entries are bounded in total bytes, expire after a minute
//! (so a file changed behind ncps's back is seen again), and are dropped by the cache core
//! whenever it replaces or removes a narinfo.

use crate::nix::StorePathHash;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Memo {
    entries: HashMap<StorePathHash, (Arc<[u8]>, Instant)>,
    /// Insertion order, for dropping the oldest when over budget. An entry here whose time
    /// differs from the map's is stale (removed or replaced since) and is skipped.
    order: VecDeque<(StorePathHash, Instant)>,
    bytes: usize,
    budget: usize,
    ttl: Duration,
}

impl Memo {
    pub fn new(budget: usize, ttl: Duration) -> Memo {
        Memo { entries: HashMap::new(), order: VecDeque::new(), bytes: 0, budget, ttl }
    }

    pub fn get(&mut self, hash: &StorePathHash) -> Option<Arc<[u8]>> {
        match self.entries.get(hash) {
            Some((bytes, at)) if at.elapsed() < self.ttl => Some(bytes.clone()),
            Some(_) => {
                self.remove(hash);
                None
            }
            None => None,
        }
    }

    pub fn insert(&mut self, hash: StorePathHash, bytes: Arc<[u8]>) {
        if bytes.len() > self.budget / 16 {
            return;
        }
        self.remove(&hash);
        let now = Instant::now();
        self.bytes += bytes.len();
        self.entries.insert(hash, (bytes, now));
        self.order.push_back((hash, now));
        while self.bytes > self.budget {
            let Some((old, at)) = self.order.pop_front() else { break };
            if self.entries.get(&old).is_some_and(|(_, t)| *t == at) {
                self.remove(&old);
            }
        }
        // Stale queue entries pile up when the same narinfos are replaced often; rebuild.
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order.retain(|(h, at)| entries.get(h).is_some_and(|(_, t)| t == at));
        }
    }

    pub fn remove(&mut self, hash: &StorePathHash) {
        if let Some((b, _)) = self.entries.remove(hash) {
            self.bytes -= b.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(c: char) -> StorePathHash {
        StorePathHash::parse(&c.to_string().repeat(32)).unwrap()
    }

    #[test]
    fn stays_within_its_budget_dropping_the_oldest() {
        let mut m = Memo::new(64, Duration::from_secs(60));
        m.insert(h('a'), Arc::from(&[1u8; 4][..]));
        for c in ['b', 'c', 'd', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'p', 'q', 'r', 's', 'v'] {
            m.insert(h(c), Arc::from(&[2u8; 4][..]));
        }
        assert!(m.bytes <= 64);
        assert!(m.get(&h('a')).is_none(), "the oldest went first");
        assert!(m.get(&h('v')).is_some());
    }

    #[test]
    fn entries_expire_and_can_be_removed() {
        let mut m = Memo::new(1024, Duration::ZERO);
        m.insert(h('a'), Arc::from(&b"x"[..]));
        assert!(m.get(&h('a')).is_none());
        let mut m = Memo::new(1024, Duration::from_secs(60));
        m.insert(h('a'), Arc::from(&b"x"[..]));
        m.remove(&h('a'));
        assert!(m.get(&h('a')).is_none());
        assert_eq!(m.bytes, 0);
    }
}
