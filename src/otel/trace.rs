//! Spans: ids, W3C `traceparent`, and the spans open on this thread.
//!
//! The request path is synchronous, one request per worker thread, so the span a new span
//! belongs under is simply the innermost one open on the thread: a thread-local stack. The
//! cache code then needs one line per step it wants to see (`let _s = otel::span("...")`),
//! no span handle passed through its signatures. Work that moves to another thread (a NAR
//! download) takes its parent's [`SpanContext`] along explicitly.
//!
//! With telemetry off, [`span`] is one relaxed atomic load and returns a guard that does
//! nothing; nothing is allocated.

use super::{hex_into, now_ns, SpanContext, SpanData, SpanKind, Value, ENABLED};
use std::cell::RefCell;
use std::sync::atomic::Ordering::Relaxed;

thread_local! {
    static OPEN: RefCell<Vec<SpanData>> = const { RefCell::new(Vec::new()) };
    static RNG: RefCell<u64> = const { RefCell::new(0) };
}

/// Random ids: a per-thread xorshift seeded from the system's random source. Ids need to be
/// unique, not secret.
fn random_u64() -> u64 {
    RNG.with(|r| {
        let mut s = *r.borrow();
        if s == 0 {
            let mut seed = [0u8; 8];
            let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
            s = u64::from_le_bytes(seed) | 1;
        }
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        *r.borrow_mut() = s;
        s
    })
}

pub fn new_span_id() -> [u8; 8] {
    loop {
        let id = random_u64().to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

pub fn new_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&random_u64().to_be_bytes());
    id[8..].copy_from_slice(&random_u64().to_be_bytes());
    if id == [0; 16] {
        id[15] = 1;
    }
    id
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Some(out)
}

/// Parses a W3C `traceparent` header (version 00, or a later version read as 00 says a
/// reader must). Lower-case hex only; all-zero ids are invalid.
///
/// ```
/// use ncps::otel::trace::parse_traceparent;
/// let c = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
/// assert_eq!(c.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
/// assert!(parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
/// ```
pub fn parse_traceparent(v: &str) -> Option<SpanContext> {
    let v = v.trim();
    let mut parts = v.split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || version == "ff" || unhex::<1>(version).is_none() || unhex::<1>(flags).is_none() {
        return None;
    }
    // Version 00 has exactly four fields; later versions may add more after the flags.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id = unhex::<16>(trace)?;
    let span_id = unhex::<8>(span)?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(SpanContext { trace_id, span_id })
}

/// The `traceparent` header for `c` (sampled: ncps exports every span it records).
pub fn traceparent(c: &SpanContext) -> String {
    let mut s = String::with_capacity(55);
    s.push_str("00-");
    hex_into(&mut s, &c.trace_id);
    s.push('-');
    hex_into(&mut s, &c.span_id);
    s.push_str("-01");
    s
}

/// An open span; ends (and is queued for export) when dropped. Spans on one thread must end
/// in the reverse order they started, which scopes give for free.
#[must_use = "the span ends when this is dropped"]
pub struct Guard {
    active: bool,
}

impl Guard {
    /// Sets an attribute on this span (the innermost one open on the thread).
    pub fn set(&self, key: &'static str, value: impl Into<Value>) {
        if self.active {
            attr(key, value);
        }
    }

    /// Marks this span failed, with why.
    pub fn fail(&self, why: impl std::fmt::Display) {
        if self.active {
            with_top(|s| s.error = Some(why.to_string()));
        }
    }

    /// Ends this span without exporting it.
    pub fn discard(mut self) {
        if self.active {
            OPEN.with(|o| o.borrow_mut().pop());
            self.active = false;
        }
    }

    /// The context of this span (to hand to another thread, or to link to).
    pub fn context(&self) -> Option<SpanContext> {
        if self.active {
            current()
        } else {
            None
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        if let Some(mut s) = OPEN.with(|o| o.borrow_mut().pop()) {
            s.end_ns = now_ns();
            super::export::submit_span(s);
        }
    }
}

fn with_top(f: impl FnOnce(&mut SpanData)) {
    OPEN.with(|o| {
        if let Some(top) = o.borrow_mut().last_mut() {
            f(top);
        }
    });
}

fn open(name: &'static str, kind: SpanKind, context: SpanContext, parent: Option<[u8; 8]>) -> Guard {
    let span = SpanData {
        context,
        parent,
        name: std::borrow::Cow::Borrowed(name),
        kind,
        start_ns: now_ns(),
        end_ns: 0,
        attrs: Vec::with_capacity(8),
        links: Vec::new(),
        error: None,
    };
    OPEN.with(|o| o.borrow_mut().push(span));
    Guard { active: true }
}

/// Starts a span under the innermost open one on this thread (a new trace if none is open).
pub fn span(name: &'static str, kind: SpanKind) -> Guard {
    if !ENABLED.load(Relaxed) {
        return Guard { active: false };
    }
    match current() {
        Some(parent) => open(name, kind, SpanContext { trace_id: parent.trace_id, span_id: new_span_id() }, Some(parent.span_id)),
        None => open(name, kind, SpanContext { trace_id: new_trace_id(), span_id: new_span_id() }, None),
    }
}

/// Starts a span with a given context and parent: a request continuing a client's
/// `traceparent`, or work on another thread that its starter named in advance.
pub fn span_as(name: &'static str, kind: SpanKind, context: SpanContext, parent: Option<[u8; 8]>) -> Guard {
    if !ENABLED.load(Relaxed) {
        return Guard { active: false };
    }
    open(name, kind, context, parent)
}

/// Starts the span of a request: under the client's `traceparent` when it sent a valid one,
/// else a new trace. Any spans left open on the thread (none, unless a bug) are ended first.
pub fn request_span(traceparent: Option<&str>) -> Guard {
    if !ENABLED.load(Relaxed) {
        return Guard { active: false };
    }
    OPEN.with(|o| o.borrow_mut().clear());
    match traceparent.and_then(parse_traceparent) {
        Some(remote) => open(
            "request",
            SpanKind::Server,
            SpanContext { trace_id: remote.trace_id, span_id: new_span_id() },
            Some(remote.span_id),
        ),
        None => open("request", SpanKind::Server, SpanContext { trace_id: new_trace_id(), span_id: new_span_id() }, None),
    }
}

/// A span to be started on another thread, named in advance: its context, and its parent.
#[derive(Clone, Copy, Debug)]
pub struct Handoff {
    pub context: SpanContext,
    pub parent: [u8; 8],
}

/// Names a span under the current one, to be started elsewhere with [`span_from`].
pub fn handoff() -> Option<Handoff> {
    let parent = current()?;
    Some(Handoff { context: SpanContext { trace_id: parent.trace_id, span_id: new_span_id() }, parent: parent.span_id })
}

/// Starts the span a [`handoff`] named (a new trace without one).
pub fn span_from(h: Option<Handoff>, name: &'static str, kind: SpanKind) -> Guard {
    match h {
        Some(h) => span_as(name, kind, h.context, Some(h.parent)),
        None => span(name, kind),
    }
}

/// The innermost span open on this thread.
pub fn current() -> Option<SpanContext> {
    if !ENABLED.load(Relaxed) {
        return None;
    }
    OPEN.with(|o| o.borrow().last().map(|s| s.context))
}

/// Sets an attribute on the innermost span open on this thread, if any.
pub fn attr(key: &'static str, value: impl Into<Value>) {
    if !ENABLED.load(Relaxed) {
        return;
    }
    let value = value.into();
    with_top(|s| match s.attrs.iter_mut().find(|(k, _)| *k == key) {
        Some((_, v)) => *v = value,
        None => s.attrs.push((key, value)),
    });
}

/// Renames the innermost open span (a request span, once its route is known).
pub fn rename(name: String) {
    if !ENABLED.load(Relaxed) {
        return;
    }
    with_top(|s| s.name = std::borrow::Cow::Owned(name));
}

/// Links the innermost open span to `other` (a waiter to the download it joined).
pub fn link(other: SpanContext) {
    if !ENABLED.load(Relaxed) {
        return;
    }
    with_top(|s| s.links.push(other));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_malformed_headers() {
        let c = SpanContext { trace_id: [0xab; 16], span_id: [0x12; 8] };
        assert_eq!(parse_traceparent(&traceparent(&c)), Some(c));
        for bad in [
            "",
            "00-abababababababababababababababab-1212121212121212",
            "00-ABABABABABABABABABABABABABABABAB-1212121212121212-01",
            "ff-abababababababababababababababab-1212121212121212-01",
            "00-abababababababababababababababab-0000000000000000-01",
            "00-abababababababababababababababab-1212121212121212-01-extra",
            "00-abab-1212121212121212-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
        // A later version may carry more fields; its first four are read as version 00's.
        assert_eq!(parse_traceparent(&format!("01{}-more", &traceparent(&c)[2..])), Some(c));
    }

    #[test]
    fn ids_are_never_zero_and_differ() {
        let a = new_span_id();
        let b = new_span_id();
        assert_ne!(a, [0; 8]);
        assert_ne!(a, b);
        assert_ne!(new_trace_id(), new_trace_id());
    }
}
