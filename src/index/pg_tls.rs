//! TLS to the PostgreSQL server: libpq's `sslmode` and `sslrootcert`, over the rustls ncps
//! already links (ring provider, as for HTTPS upstreams and OTLP).
//!
//! Why it looks the way it does:
//! - **libpq's meaning, not the driver's.** Managed PostgreSQL (RDS, Cloud SQL, operators in
//!   Kubernetes) hands out `postgresql://…?sslmode=verify-full&sslrootcert=ca.pem` URLs, and
//!   operators know what libpq does with them. tokio-postgres parses only `disable`, `prefer`
//!   and `require`, so [`settings`] takes `sslmode` and `sslrootcert` out of the URL itself and
//!   gives the driver the rest, with `require` for the two `verify-*` modes; the checking is
//!   then the verifier's. The modes, as libpq has them:
//!   - `disable`: plain TCP.
//!   - `prefer` (the default): TLS if the server offers it, else plain. No certificate check,
//!     so it protects from a listener on the wire, not from an impostor.
//!   - `require`: TLS or nothing; the certificate is not checked either (when `sslrootcert`
//!     is given the chain is, as libpq does then, like `verify-ca`).
//!   - `verify-ca`: TLS, and the certificate must chain to `sslrootcert` (a PEM file), or to
//!     the roots HTTPS upstreams are checked against when it is not given (the bundled Mozilla
//!     roots plus the system's bundle or `SSL_CERT_FILE`, [`crate::tls::root_certs`]).
//!   - `verify-full`: that, and the certificate must be for the host the URL names.
//!
//!   `sslrootcert=system` is libpq 16's: the system roots, and only with `verify-full`.
//!   `allow`, encrypted client keys (`sslpassword`) and revocation lists are not supported
//!   and are refused at start, not ignored.
//! - **Client certificates**: `sslcert` (a PEM chain) and `sslkey` (a PEM private key:
//!   PKCS#8, PKCS#1 or SEC1), both or neither, as Go ncps's driver (pgx) takes them; for a
//!   server whose `pg_hba.conf` says `cert` (or asks for one with `clientcert`). No default
//!   files under `~/.postgresql` are looked for, and the key file's mode is not checked (pgx
//!   does not either, and a Kubernetes secret is mounted 0644 by default).
//! - **Refused at start.** An unknown mode, or an `sslrootcert` that cannot be read or holds
//!   no certificate, is a [`UrlError`], which the configuration reports as a mistake in
//!   `--cache-database-url` (exit 2), before anything else is done.
//! - **A refused certificate says why**, in the words of the setting that refused it (which
//!   roots, which host), not rustls's `UnknownIssuer` alone.
//! - **Our own connector** rather than `tokio-postgres-rustls`: the same few lines over
//!   `tokio-rustls`, without the four crates it adds to read the certificate's signature
//!   algorithm for channel binding ([`end_point_digest`] reads it from the DER directly).
//!   Channel binding (`SCRAM-SHA-256-PLUS`) is then offered as libpq does; with
//!   `channel_binding=require` in the URL it also defeats an impostor under `require`.

use postgres::config::SslMode as DriverMode;
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// libpq's `sslmode` values that ncps supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        Some(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A database URL ncps cannot use as it stands.
#[derive(Debug)]
pub enum UrlError {
    /// The driver refused the URL (a bad port, an unknown option…).
    Parse(postgres::Error),
    /// `sslmode` is not one of the supported values.
    SslMode(String),
    /// `sslrootcert` names a file that cannot be read.
    RootCertUnreadable { path: PathBuf, source: io::Error },
    /// `sslrootcert` holds no certificate that can be used as a root.
    RootCertInvalid { path: PathBuf, reason: String },
    /// `sslrootcert=system` with a mode weaker than `verify-full` (libpq refuses it too).
    SystemRootsNeedVerifyFull(SslMode),
    /// `sslcert` without `sslkey`, or the other way round.
    ClientCertHalf { given: &'static str, missing: &'static str },
    /// `sslcert` or `sslkey` names a file that cannot be read.
    ClientFileUnreadable { key: &'static str, path: PathBuf, source: io::Error },
    /// `sslcert` or `sslkey` does not hold what it must (or the two do not go together).
    ClientFileInvalid { key: &'static str, path: PathBuf, reason: String },
    /// A URL setting ncps does not support (`sslpassword`): refused rather than ignored.
    Unsupported(&'static str),
    /// The TLS settings could not be made (the provider refused its own defaults).
    Tls(rustls::Error),
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlError::Parse(e) => write!(f, "{e}"),
            UrlError::SslMode(v) => write!(
                f,
                "sslmode={v:?} is not supported: use disable, prefer, require, verify-ca or verify-full"
            ),
            UrlError::RootCertUnreadable { path, source } => {
                write!(f, "sslrootcert={}: cannot be read: {source}", path.display())
            }
            UrlError::RootCertInvalid { path, reason } => write!(f, "sslrootcert={}: {reason}", path.display()),
            UrlError::SystemRootsNeedVerifyFull(mode) => write!(
                f,
                "sslmode={} may not be used with sslrootcert=system (use sslmode=verify-full)",
                mode.as_str()
            ),
            UrlError::Tls(e) => write!(f, "TLS settings: {e}"),
            UrlError::ClientCertHalf { given, missing } => {
                write!(f, "{given} is given without {missing}: a client certificate needs both")
            }
            UrlError::ClientFileUnreadable { key, path, source } => {
                write!(f, "{key}={}: cannot be read: {source}", path.display())
            }
            UrlError::ClientFileInvalid { key, path, reason } => write!(f, "{key}={}: {reason}", path.display()),
            UrlError::Unsupported(what) => write!(f, "{what} is not supported"),
        }
    }
}

impl std::error::Error for UrlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UrlError::Parse(e) => Some(e),
            UrlError::RootCertUnreadable { source, .. } | UrlError::ClientFileUnreadable { source, .. } => Some(source),
            UrlError::Tls(e) => Some(e),
            _ => None,
        }
    }
}

/// What a URL asks for: the driver's settings, and the TLS connector (none for `disable`).
pub struct Settings {
    pub config: postgres::Config,
    pub tls: Option<MakeRustls>,
    pub mode: SslMode,
}

/// `%XX` decoded, as the driver decodes the URL's other values.
fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses a `postgresql://` URL, with libpq's `sslmode` and `sslrootcert`, and reads the root
/// certificates it names. Every mistake is a [`UrlError`]; nothing is connected to.
pub fn settings(url: &str) -> Result<Settings, UrlError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut rest = Vec::new();
    let mut mode = SslMode::Prefer;
    let mut root: Option<String> = None;
    let (mut cert, mut key): (Option<String>, Option<String>) = (None, None);
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match percent_decoded(k).as_str() {
            "sslmode" => {
                let v = percent_decoded(v);
                mode = SslMode::parse(&v).ok_or(UrlError::SslMode(v))?;
            }
            "sslrootcert" => root = Some(percent_decoded(v)),
            "sslcert" => cert = Some(percent_decoded(v)),
            "sslkey" => key = Some(percent_decoded(v)),
            "sslpassword" => return Err(UrlError::Unsupported("sslpassword (an encrypted sslkey)")),
            _ => rest.push(kv),
        }
    }
    let driver_url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
    let mut config: postgres::Config = driver_url.parse().map_err(UrlError::Parse)?;
    config.ssl_mode(match mode {
        SslMode::Disable => DriverMode::Disable,
        SslMode::Prefer => DriverMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => DriverMode::Require,
    });
    let tls = match mode {
        // As libpq: without TLS there is no certificate to present, and nothing is read.
        SslMode::Disable => None,
        _ => {
            let client = match (cert, key) {
                (None, None) => None,
                (Some(cert), Some(key)) => Some(client_identity(&cert, &key)?),
                (Some(_), None) => return Err(UrlError::ClientCertHalf { given: "sslcert", missing: "sslkey" }),
                (None, Some(_)) => return Err(UrlError::ClientCertHalf { given: "sslkey", missing: "sslcert" }),
            };
            Some(MakeRustls::new(mode, root.as_deref(), client)?)
        }
    };
    Ok(Settings { config, tls, mode })
}

/// What `sslcert` and `sslkey` name: the certificate chain ncps presents, its key, and the
/// key's file (for an error).
type ClientIdentity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, PathBuf);

fn client_identity(cert: &str, key: &str) -> Result<ClientIdentity, UrlError> {
    let read = |k: &'static str, path: &str| {
        let path = PathBuf::from(path);
        std::fs::read(&path).map(|b| (path.clone(), b)).map_err(|source| UrlError::ClientFileUnreadable { key: k, path, source })
    };
    let (cert_path, pem) = read("sslcert", cert)?;
    let invalid = |k: &'static str, path: &PathBuf, reason: String| UrlError::ClientFileInvalid { key: k, path: path.clone(), reason };
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("sslcert", &cert_path, format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(invalid("sslcert", &cert_path, "holds no PEM certificate".into()));
    }
    let (key_path, pem) = read("sslkey", key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        invalid("sslkey", &key_path, format!("holds no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"))
    })?;
    Ok((chain, key, key_path))
}

/// The certificates of a PEM file, as a root store.
fn roots_from_file(path: &str) -> Result<RootCertStore, UrlError> {
    let path = PathBuf::from(path);
    let pem = std::fs::read(&path).map_err(|source| UrlError::RootCertUnreadable { path: path.clone(), source })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| UrlError::RootCertInvalid { path: path.clone(), reason: format!("not PEM: {e}") })?;
        roots
            .add(cert)
            .map_err(|e| UrlError::RootCertInvalid { path: path.clone(), reason: format!("a certificate rustls refuses: {e}") })?;
    }
    if roots.is_empty() {
        return Err(UrlError::RootCertInvalid { path, reason: "holds no PEM certificate".into() });
    }
    Ok(roots)
}

fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in crate::tls::root_certs() {
        // A system certificate rustls cannot use is skipped, as the HTTPS clients skip it.
        let _ = roots.add(CertificateDer::from(c.der().to_vec()));
    }
    roots
}

/// The `MakeTlsConnect` the driver is given: one rustls configuration for every connection.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
    /// What refused a certificate, for the error: the mode and the roots.
    context: Arc<Refusal>,
}

impl MakeRustls {
    fn new(mode: SslMode, root: Option<&str>, client: Option<ClientIdentity>) -> Result<MakeRustls, UrlError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (roots, roots_shown) = match root {
            Some("system") if mode != SslMode::VerifyFull => return Err(UrlError::SystemRootsNeedVerifyFull(mode)),
            Some("system") => (Some(system_roots()), "the system's roots (sslrootcert=system)".to_string()),
            Some(path) => (Some(roots_from_file(path)?), format!("the CA in sslrootcert={path}")),
            None if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) => (
                Some(system_roots()),
                "the system's roots (no sslrootcert given)".to_string(),
            ),
            None => (None, String::new()),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            // prefer and require without sslrootcert: encrypted, the certificate unchecked.
            None => Arc::new(Unchecked(provider.clone())),
            Some(roots) => {
                let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| UrlError::RootCertInvalid {
                        path: PathBuf::from(root.unwrap_or("system")),
                        reason: e.to_string(),
                    })?;
                Arc::new(Chain { inner, names: mode == SslMode::VerifyFull })
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(UrlError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some((chain, key, path)) => builder.with_client_auth_cert(chain, key).map_err(|e| UrlError::ClientFileInvalid {
                key: "sslkey",
                path,
                reason: format!("does not go with the certificate in sslcert, or is of a kind rustls cannot use: {e}"),
            })?,
        };
        // What PostgreSQL 17 expects (and needs for sslnegotiation=direct); older servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(MakeRustls { config: Arc::new(config), context: Arc::new(Refusal { mode, roots: roots_shown }) })
    }
}

/// `prefer` and `require` without `sslrootcert`: any certificate, but the handshake's
/// signatures are still checked (the session is with whoever holds that certificate's key).
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (`names` false) and `verify-full`: webpki's check of the chain, and for
/// `verify-full` of the name too. webpki checks the name after the chain, so a name error
/// means the chain was good.
#[derive(Debug)]
struct Chain {
    inner: Arc<WebPkiServerVerifier>,
    names: bool,
}

impl ServerCertVerifier for Chain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.names => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The settings a refused certificate is explained with.
#[derive(Debug)]
struct Refusal {
    mode: SslMode,
    roots: String,
}

/// A certificate the server showed and the settings refused, said in their terms.
#[derive(Debug)]
pub struct CertificateRefused {
    mode: SslMode,
    roots: String,
    host: String,
    cause: CertificateError,
}

impl fmt::Display for CertificateRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = self.mode.as_str();
        match &self.cause {
            CertificateError::UnknownIssuer => write!(
                f,
                "the server's certificate is not signed by {} (sslmode={mode}; rustls: {})",
                self.roots, self.cause
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => write!(
                f,
                "the server's certificate is not for the host {:?} (sslmode={mode} checks the name, \
                 verify-ca does not): {}",
                self.host, self.cause
            ),
            other => write!(f, "the server's certificate was refused (sslmode={mode}, {}): {other}", self.roots),
        }
    }
}

impl std::error::Error for CertificateRefused {}

/// One connection's TLS: the host to check the certificate against, and the settings.
pub struct RustlsConnect {
    host: String,
    make: MakeRustls,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnect, io::Error> {
        // The name is checked in `connect`: over a Unix socket it is empty and TLS is not used.
        Ok(RustlsConnect { host: host.to_string(), make: self.clone() })
    }
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = ServerName::try_from(self.host.clone()).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{:?} is not a host name TLS can check: {e}", self.host))
            })?;
            let connector = tokio_rustls::TlsConnector::from(self.make.config.clone());
            match connector.connect(name, stream).await {
                Ok(s) => Ok(RustlsStream(s)),
                Err(e) => Err(explained(e, &self.make.context, &self.host)),
            }
        })
    }
}

/// A handshake error, with a refused certificate said in the settings' terms.
fn explained(e: io::Error, context: &Refusal, host: &str) -> io::Error {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(cause)) => io::Error::new(
            io::ErrorKind::InvalidData,
            CertificateRefused { mode: context.mode, roots: context.roots.clone(), host: host.to_string(), cause: cause.clone() },
        ),
        _ => e,
    }
}

/// The TLS session the driver talks over.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        let end_point = session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| Some(ring::digest::digest(end_point_digest(cert)?, cert).as_ref().to_vec()));
        end_point.map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// One DER element at the start of `der`: its tag, its contents, and what follows it.
fn der_element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |l, &b| l << 8 | usize::from(b)), &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The hash of `tls-server-end-point` channel binding (RFC 5929 4.1): the certificate's
/// signature hash, SHA-256 for MD5 and SHA-1. None for a signature without a separate hash
/// (Ed25519, RSA-PSS's is in its parameters): then no binding is offered.
fn end_point_digest(cert: &[u8]) -> Option<&'static ring::digest::Algorithm> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let (SEQUENCE, certificate, _) = der_element(cert)? else { return None };
    let (SEQUENCE, _tbs, after) = der_element(certificate)? else { return None };
    let (SEQUENCE, algorithm, _) = der_element(after)? else { return None };
    let (OID, oid, _) = der_element(algorithm)? else { return None };
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01]; // 1.2.840.113549.1.1
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04]; // 1.2.840.10045.4
    match oid {
        [p @ .., 4 | 5 | 11] if p == RSA => Some(&ring::digest::SHA256), // md5, sha1, sha256 WithRSA
        [p @ .., 12] if p == RSA => Some(&ring::digest::SHA384),
        [p @ .., 13] if p == RSA => Some(&ring::digest::SHA512),
        [p @ .., 1] if p == ECDSA => Some(&ring::digest::SHA256), // ecdsa-with-SHA1
        [p @ .., 3, 2] if p == ECDSA => Some(&ring::digest::SHA256),
        [p @ .., 3, 3] if p == ECDSA => Some(&ring::digest::SHA384),
        [p @ .., 3, 4] if p == ECDSA => Some(&ring::digest::SHA512),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_sslmode_is_a_url_error_that_lists_the_supported_ones() {
        for bad in ["allow", "verify_full", "VERIFY-FULL", ""] {
            let err = settings(&format!("postgresql://u:pw@h/d?sslmode={bad}")).err().expect("refused");
            assert!(matches!(&err, UrlError::SslMode(v) if v == bad), "{err}");
            assert!(err.to_string().contains("verify-full"), "{err}");
        }
    }

    #[test]
    fn every_libpq_mode_is_understood_and_the_driver_gets_the_rest_of_the_url() {
        let s = settings("postgresql://u:pw@h:5433/d?application_name=x&sslmode=verify-full&connect_timeout=3").unwrap();
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.config.get_ssl_mode(), DriverMode::Require);
        assert_eq!(s.config.get_application_name(), Some("x"));
        assert_eq!(s.config.get_ports(), &[5433]);
        assert_eq!(s.config.get_connect_timeout(), Some(&std::time::Duration::from_secs(3)));
        let s = settings("postgresql://u:pw@h/d").unwrap();
        assert_eq!((s.mode, s.config.get_ssl_mode()), (SslMode::Prefer, DriverMode::Prefer), "libpq's default");
        assert!(s.tls.is_some(), "prefer tries TLS");
        let s = settings("postgresql://u:pw@h/d?sslmode=disable&sslrootcert=/nonexistent").unwrap();
        assert!(s.tls.is_none() && s.config.get_ssl_mode() == DriverMode::Disable, "disable reads no certificate");
        assert_eq!(settings("postgresql://u@h/d?sslmode=verify-ca").unwrap().config.get_ssl_mode(), DriverMode::Require);
        assert_eq!(settings("postgresql://u@h/d?sslmode=require").unwrap().config.get_ssl_mode(), DriverMode::Require);
    }

    #[test]
    fn an_sslrootcert_that_cannot_be_read_or_holds_no_certificate_is_a_url_error() {
        let err = settings("postgresql://u@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem").err().unwrap();
        assert!(matches!(err, UrlError::RootCertUnreadable { .. }), "{err}");
        assert!(err.to_string().starts_with("sslrootcert=/nonexistent/ca.pem: cannot be read"), "{err}");
        let dir = std::env::temp_dir().join(format!("ncps-pgtls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = settings(&format!("postgresql://u@h/d?sslmode=require&sslrootcert={}", empty.display())).err().unwrap();
        assert!(err.to_string().contains("holds no PEM certificate"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_client_certificate_needs_both_files_readable_and_sslpassword_is_refused() {
        let err = settings("postgresql://u@h/d?sslmode=require&sslcert=/c.pem").err().unwrap();
        assert!(matches!(err, UrlError::ClientCertHalf { given: "sslcert", missing: "sslkey" }), "{err}");
        let err = settings("postgresql://u@h/d?sslkey=/c.key").err().unwrap();
        assert_eq!(err.to_string(), "sslkey is given without sslcert: a client certificate needs both");
        let err = settings("postgresql://u@h/d?sslcert=/nonexistent/c.pem&sslkey=/nonexistent/c.key").err().unwrap();
        assert!(matches!(&err, UrlError::ClientFileUnreadable { key: "sslcert", .. }), "{err}");
        let dir = std::env::temp_dir().join(format!("ncps-pgtls-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let url = format!("postgresql://u@h/d?sslcert={0}&sslkey={0}", junk.display());
        let err = settings(&url).err().unwrap();
        assert!(err.to_string().contains("holds no PEM certificate"), "{err}");
        let err = settings("postgresql://u@h/d?sslcert=/c.pem&sslkey=/c.key&sslpassword=x").err().unwrap();
        assert!(matches!(err, UrlError::Unsupported(_)), "{err}");
        let s = settings("postgresql://u@h/d?sslmode=disable&sslcert=/nonexistent/c.pem&sslkey=/nonexistent/c.key").unwrap();
        assert!(s.tls.is_none(), "disable reads no certificate, as libpq");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn system_roots_go_only_with_verify_full_as_in_libpq() {
        let err = settings("postgresql://u@h/d?sslmode=require&sslrootcert=system").err().unwrap();
        assert!(matches!(err, UrlError::SystemRootsNeedVerifyFull(SslMode::Require)), "{err}");
        assert!(settings("postgresql://u@h/d?sslmode=verify-full&sslrootcert=system").is_ok());
    }

    #[test]
    fn percent_encoded_values_are_decoded() {
        assert_eq!(percent_decoded("%2Fetc%2fca.pem"), "/etc/ca.pem");
        assert_eq!(percent_decoded("a%zz%4"), "a%zz%4", "a broken escape is kept as it is");
        assert_eq!(settings("postgresql://u@h/d?sslmode=verify%2Dca").unwrap().mode, SslMode::VerifyCa);
    }

    #[test]
    fn the_channel_binding_hash_follows_the_signature_algorithm() {
        // SEQUENCE { SEQUENCE {} (tbs), SEQUENCE { OID } }
        let cert = |oid: &[u8]| {
            let mut alg = vec![0x06, oid.len() as u8];
            alg.extend_from_slice(oid);
            let mut body = vec![0x30, 0x00, 0x30, alg.len() as u8];
            body.extend(alg);
            let mut c = vec![0x30, body.len() as u8];
            c.extend(body);
            c
        };
        let rsa = |last: u8| cert(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, last]);
        let ecdsa = |last: u8| cert(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, last]);
        let len = |c: Vec<u8>| end_point_digest(&c).map(|a| a.output_len());
        assert_eq!(len(rsa(11)), Some(32));
        assert_eq!(len(rsa(5)), Some(32), "SHA-1 becomes SHA-256");
        assert_eq!(len(rsa(12)), Some(48));
        assert_eq!(len(rsa(13)), Some(64));
        assert_eq!(len(ecdsa(2)), Some(32));
        assert_eq!(len(ecdsa(3)), Some(48));
        assert_eq!(len(cert(&[0x2b, 0x65, 0x70])), None, "Ed25519 has no separate hash");
        assert_eq!(len(rsa(10)), None, "RSA-PSS: its hash is in the parameters");
        assert_eq!(end_point_digest(&[0x30, 0x85, 0, 0]), None, "broken DER is no binding, not a panic");
    }
}
