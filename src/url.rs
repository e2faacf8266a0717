//! URL pieces that several layers need: the upstream client (redirects stay on one origin),
//! the credentials (sent to their own origin only) and the trust rules (a narinfo's URL stays
//! on its upstream's origin). Kept here, below all three, so none imports a layer above it.

/// The scheme and authority of `url` (`http://host:port`): which upstream it is on.
pub fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..].find('/').map_or(url.len(), |i| after_scheme + i);
    &url[..end]
}
