//! The certificates every TLS client of ncps trusts: the upstream client, the S3 store, the
//! PostgreSQL index and the OTLP exporter. A leaf module, so that none of them imports another
//! for its roots.

/// Mozilla's roots as bundled, plus the system's when it has a bundle, so that a device with
/// no CA package still works and a LAN with its own CA (added to the system store) works too.
/// `SSL_CERT_FILE`, when set, names the bundle to add instead of the system's, as it does for
/// the Go ncps (and OpenSSL, curl, Nix): a private CA need not be installed system-wide.
pub(crate) fn root_certs() -> Vec<ureq::tls::Certificate<'static>> {
    let mut certs: Vec<ureq::tls::Certificate<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()))
        .collect();
    let from_env = std::env::var_os("SSL_CERT_FILE").filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
    let candidates = match &from_env {
        Some(p) => vec![p.clone()],
        None => ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"]
            .iter()
            .map(std::path::PathBuf::from)
            .collect(),
    };
    for path in candidates {
        match std::fs::read(&path) {
            Ok(pem) => {
                let before = certs.len();
                for item in ureq::tls::parse_pem(&pem).flatten() {
                    if let ureq::tls::PemItem::Certificate(c) = item {
                        certs.push(c.to_owned());
                    }
                }
                match certs.len() - before {
                    _ if from_env.is_none() => {}
                    0 => log::warn!(
                        "SSL_CERT_FILE={}: no PEM certificate in it; HTTPS upstreams are checked against the bundled roots only",
                        path.display()
                    ),
                    n => log::info!("trusting {n} certificate(s) from SSL_CERT_FILE={}", path.display()),
                }
                break;
            }
            Err(e) if from_env.is_some() => {
                log::warn!("SSL_CERT_FILE={}: {e}; HTTPS upstreams are checked against the bundled roots only", path.display());
            }
            Err(_) => {}
        }
    }
    certs
}
