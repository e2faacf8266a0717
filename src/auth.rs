//! Credentials, as pure functions of bytes: the tokens clients present to ncps (read and
//! write), and the credentials ncps presents to private upstreams (a netrc file, as Nix and Go
//! ncps read it, and per-upstream Bearer tokens).
//!
//! - Nix can authenticate to a binary cache only through a netrc file (`netrc-file` in
//!   nix.conf), which curl sends as `Authorization: Basic base64(login:password)`; scripts
//!   send `Authorization: Bearer <token>`. So a token is accepted either way: as the Bearer
//!   value, or as the Basic password (whatever the login).
//! - Tokens are compared in constant time (the time taken does not depend on how many leading
//!   bytes matched).
//! - A [`Secret`] never prints: its `Debug` and `Display` say `<redacted>`, so a secret cannot
//!   reach a log line, an error message or the status page by accident.
//! - Upstream credentials are chosen by the origin (scheme, host, port) of each request's URL
//!   and only for the origins of configured upstreams; as redirects are only followed on the
//!   same origin (`upstream::follow_redirect`), a credential never leaves its origin.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::fmt;

/// A token or password. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret from configuration: non-empty, printable ASCII without spaces (it must fit on
    /// a netrc line and in a header).
    pub fn new(value: &str) -> Result<Secret, &'static str> {
        let v = value.trim();
        if v.is_empty() {
            return Err("is empty");
        }
        if !v.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be printable ASCII without spaces");
        }
        Ok(Secret(v.to_string()))
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Equality whose time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// The token an `Authorization` header presents: the Bearer value, or the Basic password.
pub fn presented_token(header: &str) -> Option<Vec<u8>> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.as_bytes().to_vec());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = B64.decode(rest).ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        return Some(decoded[colon + 1..].to_vec());
    }
    None
}

/// Whether the `Authorization` header (if any) presents one of `tokens`. Every token is
/// compared, so the time taken does not say which one matched.
pub fn authorizes(header: Option<&str>, tokens: &[&Secret]) -> bool {
    let Some(presented) = header.and_then(presented_token) else { return false };
    tokens.iter().fold(false, |ok, t| constant_time_eq(&presented, t.expose().as_bytes()) | ok)
}

/// One netrc entry: `machine` (`None` for `default`), login and password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetrcEntry {
    pub machine: Option<String>,
    pub login: String,
    pub password: Secret,
}

/// Why a netrc file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NetrcError {
    /// A keyword without its value, at this token number.
    MissingValue(&'static str),
    /// An entry without a password (ncps sends Basic, which needs one).
    NoPassword { machine: String },
}

impl fmt::Display for NetrcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetrcError::MissingValue(k) => write!(f, "`{k}` without a value"),
            NetrcError::NoPassword { machine } => write!(f, "the entry for {machine} has no password"),
        }
    }
}

impl std::error::Error for NetrcError {}

/// Parses a netrc file as curl (and so Nix) reads it: whitespace-separated tokens, `machine
/// NAME` or `default` starting an entry, `login`, `password`, `account` (ignored), `macdef`
/// (its body, up to an empty line, skipped).
pub fn parse_netrc(text: &str) -> Result<Vec<NetrcEntry>, NetrcError> {
    let mut entries: Vec<NetrcEntry> = Vec::new();
    // (machine, login, password) of the entry being read.
    let mut current: Option<(Option<String>, String, Option<String>)> = None;
    let finish = |c: Option<(Option<String>, String, Option<String>)>, out: &mut Vec<NetrcEntry>| {
        if let Some((machine, login, password)) = c {
            let name = machine.clone().unwrap_or_else(|| "default".into());
            let password = password.ok_or(NetrcError::NoPassword { machine: name.clone() })?;
            let password = Secret::new(&password).map_err(|_| NetrcError::NoPassword { machine: name })?;
            out.push(NetrcEntry { machine, login, password });
        }
        Ok::<(), NetrcError>(())
    };
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let mut tokens = line.split_whitespace();
        while let Some(t) = tokens.next() {
            let mut value = |k: &'static str| tokens.next().map(str::to_string).ok_or(NetrcError::MissingValue(k));
            match t {
                "machine" => {
                    let m = value("machine")?;
                    finish(current.take(), &mut entries)?;
                    current = Some((Some(m), String::new(), None));
                }
                "default" => {
                    finish(current.take(), &mut entries)?;
                    current = Some((None, String::new(), None));
                }
                "login" => {
                    let l = value("login")?;
                    if let Some(c) = current.as_mut() {
                        c.1 = l;
                    }
                }
                "password" => {
                    let p = value("password")?;
                    if let Some(c) = current.as_mut() {
                        c.2 = Some(p);
                    }
                }
                "account" => {
                    value("account")?;
                }
                "macdef" => {
                    value("macdef")?;
                    // The macro's body runs to the next empty line.
                    for body in lines.by_ref() {
                        if body.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                _ => {}
            }
        }
    }
    finish(current.take(), &mut entries)?;
    Ok(entries)
}

/// The host of a URL (no port, no brackets), lower-cased: what a netrc `machine` names.
pub fn url_host(url: &str) -> String {
    let origin = crate::url::origin(url);
    let authority = origin.split("://").nth(1).unwrap_or(origin);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.split(':').next().unwrap_or(authority)
    };
    host.to_ascii_lowercase()
}

/// What ncps sends to each upstream: a Bearer token given for it, else the Basic login of the
/// netrc entry for its host (or the netrc's `default`).
#[derive(Debug, Clone, Default)]
pub struct UpstreamAuth {
    /// (origin of the upstream, the header value).
    by_origin: Vec<(String, Secret)>,
}

impl UpstreamAuth {
    /// For the upstreams `urls`: `bearer` tokens by upstream URL, then the `netrc` entries.
    pub fn new(urls: &[String], bearer: &[(String, Secret)], netrc: &[NetrcEntry]) -> UpstreamAuth {
        use crate::url::origin;
        let mut by_origin: Vec<(String, Secret)> = Vec::new();
        for url in urls {
            let o = origin(url).to_ascii_lowercase();
            if by_origin.iter().any(|(x, _)| *x == o) {
                continue;
            }
            let value = if let Some((_, t)) = bearer.iter().find(|(u, _)| origin(u).eq_ignore_ascii_case(&o)) {
                format!("Bearer {}", t.expose())
            } else {
                let host = url_host(url);
                let entry = netrc
                    .iter()
                    .find(|e| e.machine.as_deref().is_some_and(|m| m.eq_ignore_ascii_case(&host)))
                    .or_else(|| netrc.iter().find(|e| e.machine.is_none()));
                match entry {
                    Some(e) => format!("Basic {}", B64.encode(format!("{}:{}", e.login, e.password.expose()))),
                    None => continue,
                }
            };
            // A header value ("Bearer x", "Basic x"): made here from checked parts.
            by_origin.push((o, Secret(value)));
        }
        UpstreamAuth { by_origin }
    }

    /// The `Authorization` value for a request to `url`, if its origin is an upstream's that
    /// has credentials.
    pub fn for_url(&self, url: &str) -> Option<&Secret> {
        let o = crate::url::origin(url);
        self.by_origin.iter().find(|(x, _)| x.eq_ignore_ascii_case(o)).map(|(_, s)| s)
    }

    /// The origins that have credentials (for the start-up log; never the values).
    pub fn origins(&self) -> impl Iterator<Item = &str> {
        self.by_origin.iter().map(|(o, _)| o.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret {
        Secret::new(s).unwrap()
    }

    #[test]
    fn a_token_is_accepted_as_bearer_or_as_the_basic_password_of_any_login() {
        let t = secret("s3cret-token");
        assert!(authorizes(Some("Bearer s3cret-token"), &[&t]));
        assert!(authorizes(Some("bearer  s3cret-token "), &[&t]));
        let basic = format!("Basic {}", B64.encode("anyone:s3cret-token"));
        assert!(authorizes(Some(&basic), &[&t]), "what Nix sends from a netrc file");
        let other = secret("other");
        assert!(authorizes(Some(&basic), &[&other, &t]), "any of several tokens");
        for bad in ["Bearer s3cret-toke", "Bearer s3cret-token2", "s3cret-token", "Basic !!!", "Digest x"] {
            assert!(!authorizes(Some(bad), &[&t]), "{bad}");
        }
        let wrong = format!("Basic {}", B64.encode("s3cret-token:nope"));
        assert!(!authorizes(Some(&wrong), &[&t]), "the login is not the password");
        assert!(!authorizes(None, &[&t]));
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"ab", b"abc"));
    }

    #[test]
    fn a_secret_never_prints() {
        let t = secret("hunter2");
        assert_eq!(format!("{t} {t:?}"), "<redacted> <redacted>");
        let e = NetrcEntry { machine: None, login: "u".into(), password: t };
        assert!(!format!("{e:?}").contains("hunter2"));
        assert!(Secret::new("two words").is_err() && Secret::new(" ").is_err());
    }

    #[test]
    fn netrc_files_are_read_as_nix_and_curl_read_them() {
        let text = "machine cache.example.org login alice password a-pw\n\
                    # a comment line\n\
                    machine other.example.org\n  login bob\n  account x\n  password b-pw\n\
                    macdef init\nmachine evil password no\n\n\
                    default login anon password d-pw\n";
        let e = parse_netrc(text).unwrap();
        let summary: Vec<(Option<&str>, &str, &str)> =
            e.iter().map(|e| (e.machine.as_deref(), e.login.as_str(), e.password.expose())).collect();
        assert_eq!(
            summary,
            [(Some("cache.example.org"), "alice", "a-pw"), (Some("other.example.org"), "bob", "b-pw"), (None, "anon", "d-pw")]
        );
        assert_eq!(parse_netrc("machine x login y"), Err(NetrcError::NoPassword { machine: "x".into() }));
        assert_eq!(parse_netrc("machine"), Err(NetrcError::MissingValue("machine")));
        assert_eq!(parse_netrc("").unwrap(), []);
    }

    #[test]
    fn upstream_credentials_go_only_to_their_own_origin() {
        let netrc = parse_netrc("machine private.lan login u password p\n").unwrap();
        let urls = ["http://private.lan:8080".to_string(), "https://cache.nixos.org".to_string(), "http://tok.lan".to_string()];
        let bearer = [("http://tok.lan".to_string(), secret("tkn"))];
        let auth = UpstreamAuth::new(&urls, &bearer, &netrc);
        let basic = format!("Basic {}", B64.encode("u:p"));
        assert_eq!(auth.for_url("http://private.lan:8080/nar/x.nar").map(Secret::expose), Some(basic.as_str()));
        assert_eq!(auth.for_url("http://tok.lan/x.narinfo").map(Secret::expose), Some("Bearer tkn"));
        assert_eq!(auth.for_url("https://cache.nixos.org/x.narinfo"), None, "no entry, no default");
        // Same host, another port or scheme: another origin, no credentials.
        assert_eq!(auth.for_url("http://private.lan:9090/x"), None);
        assert_eq!(auth.for_url("https://private.lan:8080/x"), None);
        assert_eq!(auth.for_url("http://evil.lan/x"), None);
        let with_default = parse_netrc("default login d password dp\n").unwrap();
        let auth = UpstreamAuth::new(&urls[1..2], &[], &with_default);
        assert!(auth.for_url("https://cache.nixos.org/x").is_some(), "the default entry applies to upstreams");
        assert_eq!(url_host("http://[::1]:80/x"), "::1");
        assert_eq!(url_host("https://Cache.NixOS.org"), "cache.nixos.org");
    }
}
