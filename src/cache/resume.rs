//! Upstream resume: a NAR body that breaks off part-way (a reset, a close, the body idle
//! timeout) is finished with `Range: bytes=<written>-` from the same upstream (once), then
//! from the next configured ones, into the same staged file. Readers following that file never
//! notice: they see a pause, not an error. The hash still runs over every byte in order, so
//! the whole spliced file decides what is kept, as for any download; only when nobody can
//! continue, or the spliced file does not match, are the readers cut off.
//!
//! Why: before this, one upstream hiccup on a 64 MiB NAR cut off every client reading it
//! (Nix 2.8 and 2.26 do not recover from a cut mid-substitution, issue 13), and the next try
//! fetched all 64 MiB again.
//!
//! Only a body sent without `Content-Encoding` is resumed: a range of an encoded stream is
//! not a range of the file. An upstream that answers the Range request with a 200 (it ignores
//! ranges) is skipped rather than read from byte 0 and the known part thrown away: that would
//! hold readers with no new byte for as long as the first part took, and the common static
//! servers of caches (nginx, S3/CloudFront behind cache.nixos.org) answer ranges.

use super::flight::Download;
use super::{lock, Cache};
use crate::metrics::Kind;
use crate::url::without_secrets;
use crate::nix::NarName;
use crate::upstream::io_timed_out;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::time::Instant;

/// Where to ask for the rest of a NAR whose body from `candidates[broke]` broke off: that URL
/// once more, then the candidates after it (those before it already failed to start, said
/// they do not have it, or were skipped).
pub fn resume_order(candidates: &[String], broke: usize) -> VecDeque<String> {
    candidates.iter().skip(broke).cloned().collect()
}

/// A NAR body that continues itself from the next source when it breaks off: to
/// [`super::verify::copy_hashed`] it reads as one stream of the whole file.
pub(super) struct Resuming<'a> {
    cache: &'a Cache,
    name: &'a NarName,
    download: &'a Download,
    body: Box<dyn Read + Send + 'a>,
    /// Bytes delivered so far.
    at: u64,
    total: u64,
    /// False for a body that came with a `Content-Encoding`.
    resumable: bool,
    next: VecDeque<String>,
    /// The URL sending now, its upstream, and since when.
    pub url: String,
    pub upstream: Option<usize>,
    pub started: Instant,
    /// Every URL that sent bytes of this file, in order.
    pub used: Vec<String>,
    /// The attempt's deadline: no resume starts after it, and a resume gets only what is left.
    until: Instant,
}

impl<'a> Resuming<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        cache: &'a Cache,
        name: &'a NarName,
        download: &'a Download,
        body: Box<dyn Read + Send + 'a>,
        total: u64,
        resumable: bool,
        url: &str,
        upstream: Option<usize>,
        next: VecDeque<String>,
        until: Instant,
    ) -> Resuming<'a> {
        Resuming {
            cache,
            name,
            download,
            body,
            at: 0,
            total,
            resumable,
            next,
            url: url.to_string(),
            upstream,
            started: Instant::now(),
            used: vec![url.to_string()],
            until,
        }
    }

    /// Who sent the bytes, for the log: "A" or "A, resumed from B".
    pub fn sources(&self) -> String {
        let mut it = self.used.iter();
        let mut s = it.next().cloned().unwrap_or_default();
        for u in it {
            s.push_str(", resumed from ");
            s.push_str(u);
        }
        s
    }

    /// The body broke off with `why` after `self.at` bytes: finds who sends the rest. False
    /// when nobody does (the current source stays current, and the caller reports it).
    fn resume(&mut self, why: &io::Error) -> bool {
        if !self.resumable || self.at == 0 || self.at >= self.total {
            // Nothing sent yet: the caller tries the next upstream from the start anyway.
            return false;
        }
        let (c, name, at) = (self.cache, self.name, self.at);
        while let Some(url) = self.next.pop_front() {
            let left = self.until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::info!("nar {name}: not resumed after {at} bytes ({why}): past its deadline");
                return false;
            }
            let i = c.metrics.upstream_for_url(&url);
            if i.is_some_and(|i| c.health.skip(i).is_some()) {
                continue;
            }
            // Asking takes up to a connect and a header timeout: not a stall of this download.
            self.download.alive();
            let started = Instant::now();
            // A URL of no configured upstream is the replica that was relaying the download.
            let rest = match i {
                Some(_) => c.upstreams.nar_rest(&url, at, self.total, left),
                None => c.upstreams.nar_rest_from_replica(&url, at, self.total, left, c.settings.peer_token.as_ref()),
            };
            match rest {
                Ok(Some(body)) => {
                    log::info!(
                        "nar {name}: {} broke off after {at} of {} bytes ({why}); resuming from {} at byte {at}",
                        without_secrets(&self.url),
                        self.total,
                        without_secrets(&url)
                    );
                    if let Some(i) = self.upstream {
                        c.metrics.upstream_request(i, Kind::Nar, self.started.elapsed(), false);
                        c.metrics.upstream_error_detail(i, &format!("after {at} bytes: {why}"));
                        c.health.failed(i, io_timed_out(why));
                    }
                    lock(&c.downloads.failed_urls).insert(self.url.clone(), Instant::now());
                    self.body = body;
                    self.url = url.clone();
                    self.upstream = i;
                    self.started = started;
                    self.used.push(url);
                    return true;
                }
                Ok(None) => {
                    log::info!("nar {name}: cannot resume from {} at byte {at}: not found", without_secrets(&url));
                    if let Some(i) = i {
                        c.health.succeeded(i);
                        c.metrics.upstream_request(i, Kind::Nar, started.elapsed(), true);
                    }
                }
                Err(e) => {
                    log::warn!("nar {name}: cannot resume from {} at byte {at}: {e}", without_secrets(&url));
                    if let Some(i) = i {
                        c.metrics.upstream_request(i, Kind::Nar, started.elapsed(), false);
                        c.metrics.upstream_error_detail(i, &e.to_string());
                        c.upstream_failed(i, &e);
                    }
                }
            }
        }
        false
    }
}

impl Read for Resuming<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let why = match self.body.read(buf) {
                Ok(0) if self.at < self.total => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "the body ended early");
                    if self.resume(&e) {
                        continue;
                    }
                    // The caller reports the short body.
                    return Ok(0);
                }
                Ok(n) => {
                    self.at += n as u64;
                    if let Some(i) = self.upstream {
                        self.cache.metrics.upstream_bytes(i, n as u64);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e,
            };
            if !self.resume(&why) {
                return Err(why);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_is_asked_of_the_same_upstream_once_then_of_the_ones_after_it() {
        let c: Vec<String> = ["a", "b", "c"].map(String::from).into();
        assert_eq!(resume_order(&c, 1), VecDeque::from(["b".to_string(), "c".to_string()]));
        assert_eq!(resume_order(&c, 2), VecDeque::from(["c".to_string()]));
        assert_eq!(resume_order(&c, 0).len(), 3);
    }
}
