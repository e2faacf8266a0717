//! URL pieces that several layers need: the upstream client (redirects stay on one origin),
//! the credentials (sent to their own origin only), the trust rules (a narinfo's URL stays
//! on its upstream's origin), and everything that shows a URL without its secrets (an
//! upstream's in logs, `/metrics`, the status page and telemetry; the database's wherever it
//! is named). Kept here, below all of them, so none imports a layer above it.

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

/// `url` with its password replaced by `***`, wherever the URL carries one: in the user
/// information (`postgresql://user:secret@host/db`) or as a `password=` query parameter.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        // The authority ends at the first '/', '?' or '#'; its user information at the last '@'.
        let authority_end = out[rest..].find(['/', '?', '#']).map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@').map(|i| rest + i) {
            if let Some(colon) = out[rest..at].find(':').map(|i| rest + i) {
                out.replace_range(colon + 1..at, "***");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let params: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                // `password`, and `sslpassword` (refused, but its error shows the URL).
                Some((k, _)) if k.to_ascii_lowercase().ends_with("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", params.join("&"));
    }
    out
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

    #[test]
    fn a_database_url_is_shown_without_its_password() {
        assert_eq!(redact_url("postgresql://ncps:s3cr@t@db.lan:5432/ncps"), "postgresql://ncps:***@db.lan:5432/ncps");
        assert_eq!(redact_url("postgres://ncps@db.lan/ncps"), "postgres://ncps@db.lan/ncps");
        assert_eq!(
            redact_url("postgresql://db.lan/ncps?user=ncps&password=hunter2&sslmode=disable"),
            "postgresql://db.lan/ncps?user=ncps&password=***&sslmode=disable"
        );
        assert_eq!(redact_url("postgresql://h/d?sslkey=k&sslpassword=s3"), "postgresql://h/d?sslkey=k&sslpassword=***");
        assert_eq!(redact_url("sqlite:/var/lib/ncps/db.sqlite"), "sqlite:/var/lib/ncps/db.sqlite");
    }
}
