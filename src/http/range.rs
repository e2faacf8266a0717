//! Byte ranges (RFC 9110 §14): which part of a body a `GET` gets, decided by pure functions.
//!
//! Why ranges at all: a client whose connection broke after N bytes of a NAR (Lix, Nix's own
//! transfer code when there is no Content-Encoding, curl `-C -`, download managers, caches in
//! front of ncps) asks again with `Range: bytes=N-` and gets only the rest, instead of the
//! whole NAR again, provided the first answer said `Accept-Ranges: bytes`. Lix also compares
//! the `ETag` of the two answers and gives up when it changed, so the tag is a strong one made
//! from the FileHash: the same bytes always get the same tag, whichever upstream they came
//! from and whether they are still downloading or long stored.
//!
//! What is answered how:
//! - one range (`a-b`, `a-`, `-n`) that overlaps the body: `206` with `Content-Range`; `b`
//!   past the end is clamped to the last byte, a suffix longer than the body is the whole body;
//! - one range starting at or past the end: `416` with `Content-Range: bytes */len`;
//! - several ranges: the whole body, `200` (the RFC lets a server ignore `Range`; a
//!   `multipart/byteranges` body would have to be built around `sendfile`, and no client of a
//!   binary cache asks for several ranges);
//! - a `Range` that does not parse, or of another unit: ignored, `200` (RFC 9110 §14.2);
//! - `If-Range` that is not our strong ETag (another tag, a weak one, a date: ncps sends no
//!   `Last-Modified`, so no date can match): the whole body, `200`;
//! - a body sent with a `Content-Encoding`: never in parts, and never announced as rangeable,
//!   since a range of encoded bytes is not what a client resuming by decoded offset (Lix)
//!   means; only `GET` has ranges (a `HEAD` answers as the `GET` would without `Range`).

/// One byte range as asked for, before the body's length is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `first-` or `first-last` (`last` inclusive, may lie past the end).
    From { first: u64, last: Option<u64> },
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// Which part of the body to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// All of it, `200`.
    Whole,
    /// Bytes `first..=last`, `206`.
    Range { first: u64, last: u64 },
    /// `416`: the range lies wholly past the end.
    Unsatisfiable,
}

impl Part {
    /// The offset of the first byte to send and how many, for a body of `len` bytes.
    pub fn span(self, len: u64) -> (u64, u64) {
        match self {
            Part::Whole => (0, len),
            Part::Range { first, last } => (first, last - first + 1),
            Part::Unsatisfiable => (0, 0),
        }
    }
}

/// Parses a `Range` header value. `None` for anything that is not exactly one valid byte
/// range: garbage, another unit, an inverted `b-a`, several ranges (which ncps answers whole).
///
/// ```
/// use ncps::http::range::{parse_range, ByteRange};
/// assert_eq!(parse_range("bytes=100-"), Some(ByteRange::From { first: 100, last: None }));
/// assert_eq!(parse_range("bytes=-5"), Some(ByteRange::Suffix(5)));
/// assert_eq!(parse_range("bytes=0-1,5-6"), None);
/// ```
pub fn parse_range(value: &str) -> Option<ByteRange> {
    let (unit, set) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let spec = specs.next()?;
    if specs.next().is_some() {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        return Some(ByteRange::Suffix(number(last)?));
    }
    let first = number(first)?;
    if last.is_empty() {
        return Some(ByteRange::From { first, last: None });
    }
    let last = number(last)?;
    (last >= first).then_some(ByteRange::From { first, last: Some(last) })
}

/// Digits only (no sign, no spaces inside), and no overflow.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// What `range` means for a body of `len` bytes.
pub fn resolve(range: ByteRange, len: u64) -> Part {
    match range {
        ByteRange::From { first, .. } if first >= len => Part::Unsatisfiable,
        ByteRange::From { first, last } => {
            Part::Range { first, last: last.map_or(len - 1, |l| l.min(len - 1)) }
        }
        // "-0" asks for nothing, which no body can satisfy.
        ByteRange::Suffix(0) => Part::Unsatisfiable,
        // Of an empty body, the only part there is is all of it (nothing).
        ByteRange::Suffix(_) if len == 0 => Part::Whole,
        ByteRange::Suffix(n) => Part::Range { first: len - n.min(len), last: len - 1 },
    }
}

/// What the request's headers mean for the body.
pub struct Asked<'a> {
    /// Whether the method is `GET` (the only one with ranges).
    pub get: bool,
    pub range: Option<&'a str>,
    pub if_range: Option<&'a str>,
}

/// Decides which part of a rangeable body of `len` bytes to send, with strong tag `etag`
/// (quoted, as sent in the `ETag` header) if it has one. `encoded` says whether the body goes
/// out with a `Content-Encoding`: then it is always sent whole.
///
/// ```
/// use ncps::http::range::{choose, Asked, Part};
/// let asked = Asked { get: true, range: Some("bytes=10-"), if_range: Some("\"x\"") };
/// assert_eq!(choose(&asked, Some("\"x\""), 100, false), Part::Range { first: 10, last: 99 });
/// assert_eq!(choose(&asked, Some("\"y\""), 100, false), Part::Whole);
/// ```
pub fn choose(asked: &Asked<'_>, etag: Option<&str>, len: u64, encoded: bool) -> Part {
    if !asked.get || encoded {
        return Part::Whole;
    }
    let Some(range) = asked.range.and_then(parse_range) else { return Part::Whole };
    if let Some(wanted) = asked.if_range {
        if !strong_match(wanted, etag) {
            return Part::Whole;
        }
    }
    resolve(range, len)
}

/// RFC 9110 §8.8.3.2 strong comparison: both tags strong and byte for byte the same. A date
/// in `If-Range` never matches (ncps sends no `Last-Modified`).
fn strong_match(wanted: &str, etag: Option<&str>) -> bool {
    let wanted = wanted.trim();
    match etag {
        Some(tag) => !tag.starts_with("W/") && wanted.starts_with('"') && wanted == tag,
        None => false,
    }
}

/// The `Content-Range` value for a part of a body of `len` bytes (`None` for the whole).
pub fn content_range(part: Part, len: u64) -> Option<String> {
    match part {
        Part::Whole => None,
        Part::Range { first, last } => Some(format!("bytes {first}-{last}/{len}")),
        Part::Unsatisfiable => Some(format!("bytes */{len}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(range: &str, len: u64) -> Part {
        choose(&Asked { get: true, range: Some(range), if_range: None }, Some("\"t\""), len, false)
    }

    #[test]
    fn the_three_forms_of_a_single_range_are_answered_206() {
        assert_eq!(part("bytes=0-0", 10), Part::Range { first: 0, last: 0 }, "the first byte");
        assert_eq!(part("bytes=9-9", 10), Part::Range { first: 9, last: 9 }, "the last byte");
        assert_eq!(part("bytes=9-", 10), Part::Range { first: 9, last: 9 });
        assert_eq!(part("bytes=-1", 10), Part::Range { first: 9, last: 9 }, "a suffix of one");
        assert_eq!(part("bytes=3-6", 10), Part::Range { first: 3, last: 6 });
        assert_eq!(part("bytes=4-", 10), Part::Range { first: 4, last: 9 });
        assert_eq!(part("bytes=-3", 10), Part::Range { first: 7, last: 9 });
    }

    #[test]
    fn ranges_reaching_past_the_end_are_clamped_and_ranges_starting_there_are_416() {
        assert_eq!(part("bytes=5-1000", 10), Part::Range { first: 5, last: 9 });
        assert_eq!(part("bytes=-1000", 10), Part::Range { first: 0, last: 9 }, "a suffix longer than the body");
        assert_eq!(part("bytes=10-", 10), Part::Unsatisfiable, "just past the end");
        assert_eq!(part("bytes=10-20", 10), Part::Unsatisfiable);
        assert_eq!(part("bytes=18446744073709551615-", 10), Part::Unsatisfiable);
        assert_eq!(part("bytes=-0", 10), Part::Unsatisfiable);
        assert_eq!(part("bytes=0-", 0), Part::Unsatisfiable, "an empty body has no first byte");
        assert_eq!(part("bytes=-5", 0), Part::Whole);
    }

    #[test]
    fn garbage_other_units_inverted_and_multiple_ranges_get_the_whole_body() {
        for r in [
            "", "bytes", "bytes=", "bytes=-", "bytes=a-b", "bytes=1-a", "bytes=+1-2", "bytes=1--2",
            "bytes=5-4", "items=0-1", "bytes 0-1", "bytes=0-1,3-4", "bytes=-1,-2",
            "bytes=99999999999999999999-", "bytes=0x10-",
        ] {
            assert_eq!(part(r, 10), Part::Whole, "{r:?}");
        }
    }

    #[test]
    fn spacing_and_case_that_the_grammar_allows_are_accepted() {
        assert_eq!(part("Bytes=1-2", 10), Part::Range { first: 1, last: 2 });
        assert_eq!(part("bytes=1-2, ", 10), Part::Range { first: 1, last: 2 }, "an empty list element");
        assert_eq!(part(" bytes=1-2 ", 10), Part::Range { first: 1, last: 2 });
    }

    #[test]
    fn if_range_needs_the_same_strong_tag_else_the_whole_body() {
        let ask = |if_range| Asked { get: true, range: Some("bytes=4-"), if_range: Some(if_range) };
        let ranged = Part::Range { first: 4, last: 9 };
        assert_eq!(choose(&ask("\"t\""), Some("\"t\""), 10, false), ranged);
        assert_eq!(choose(&ask(" \"t\" "), Some("\"t\""), 10, false), ranged);
        assert_eq!(choose(&ask("\"u\""), Some("\"t\""), 10, false), Part::Whole, "another tag");
        assert_eq!(choose(&ask("W/\"t\""), Some("\"t\""), 10, false), Part::Whole, "a weak tag");
        assert_eq!(choose(&ask("W/\"t\""), Some("W/\"t\""), 10, false), Part::Whole, "weak on both sides");
        assert_eq!(choose(&ask("Tue, 01 Dec 2026 10:00:00 GMT"), Some("\"t\""), 10, false), Part::Whole, "a date");
        assert_eq!(choose(&ask("\"t\""), None, 10, false), Part::Whole, "no tag of ours");
    }

    #[test]
    fn encoded_bodies_and_methods_other_than_get_are_never_ranged() {
        let get = Asked { get: true, range: Some("bytes=0-1"), if_range: None };
        assert_eq!(choose(&get, None, 10, true), Part::Whole, "a range is never compressed");
        let head = Asked { get: false, range: Some("bytes=0-1"), if_range: None };
        assert_eq!(choose(&head, None, 10, false), Part::Whole);
        assert_eq!(choose(&Asked { get: true, range: None, if_range: Some("\"t\"") }, None, 10, false), Part::Whole);
    }

    #[test]
    fn content_range_and_span_say_the_same_bytes() {
        let p = Part::Range { first: 3, last: 6 };
        assert_eq!(content_range(p, 10).as_deref(), Some("bytes 3-6/10"));
        assert_eq!(p.span(10), (3, 4));
        assert_eq!(content_range(Part::Unsatisfiable, 10).as_deref(), Some("bytes */10"));
        assert_eq!((content_range(Part::Whole, 10), Part::Whole.span(10)), (None, (0, 10)));
    }
}
