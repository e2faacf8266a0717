//! URL pieces that several layers need: the upstream client (redirects stay on one origin),
//! the credentials (sent to their own origin only), the trust rules (a narinfo's URL stays
//! on its upstream's origin), and everything that shows an upstream's URL (logs, `/metrics`,
//! the status page, telemetry) without its credentials. Kept here, below all of them, so
//! none imports a layer above it.

/// The scheme and authority of `url` (`http://host:port`): which upstream it is on.
pub fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..].find('/').map_or(url.len(), |i| after_scheme + i);
    &url[..end]
}

/// `scheme://user:pass@host:port/path?query` → `scheme://host:port/path`: a URL as logs,
/// `/metrics`, the status page and telemetry may show it.
pub fn without_secrets(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let path = path.trim_end_matches('/');
    if scheme.is_empty() {
        format!("{host}{path}")
    } else {
        format!("{scheme}://{host}{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shown_url_has_no_user_password_query_or_fragment() {
        assert_eq!(without_secrets("https://u:p%40ss@cache.example:8443/nix/?token=s#x"), "https://cache.example:8443/nix");
        assert_eq!(without_secrets("http://127.0.0.1:9000"), "http://127.0.0.1:9000");
        assert_eq!(without_secrets("user@host/path/"), "host/path", "no scheme");
    }
}
