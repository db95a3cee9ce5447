//! TLS to PostgreSQL over rustls, configured from the URL with libpq's parameter names.
//!
//! - `sslmode`: `disable` (plain TCP), `prefer` (TLS when the server offers it, plain TCP when
//!   it does not), `require`, `verify-ca`, `verify-full`. Absent means `require`: the audit
//!   trail fails closed rather than silently sending rows in clear text. Unlike libpq, every
//!   mode that uses TLS verifies the certificate chain *and* the host name (libpq's `require`
//!   and `verify-ca` do less); `verify-ca` and `verify-full` are accepted so libpq URLs work.
//! - `sslrootcert=/path/ca.pem`: trust only the CAs in that PEM file (libpq's meaning); absent
//!   or `sslrootcert=system`: the platform's root certificates.
//!
//! tokio-postgres parses `sslmode` itself but knows only `disable|prefer|require` and refuses
//! `sslrootcert`, so [`PgUrl::parse`] rewrites the URL before handing it over. No channel
//! binding is offered (SCRAM without `-PLUS`): the verified certificate is what binds the
//! session to the server.
use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Where trusted CA certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCerts {
    /// The operating system's store (rustls-native-certs).
    Platform,
    /// Only the CAs in this PEM file (`sslrootcert=/path`).
    File(PathBuf),
}

impl std::fmt::Display for RootCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootCerts::Platform => f.write_str(
                "the platform's root certificates (for a private CA add sslrootcert=/path/to/ca.pem to the URL)",
            ),
            RootCerts::File(path) => write!(f, "the CA file {} (sslrootcert)", path.display()),
        }
    }
}

/// A PostgreSQL URL split into what tokio-postgres understands and what this module handles.
/// Not `Debug`: the driver URL may carry a password.
#[derive(Clone)]
pub struct PgUrl {
    /// The URL with `sslrootcert` removed and `sslmode` in tokio-postgres's vocabulary.
    pub driver_url: String,
    /// `sslmode` as written (or `require` when absent), for messages.
    pub ssl_mode: String,
    /// Whether the URL said `sslmode` at all (messages point out the fail-closed default).
    pub ssl_mode_given: bool,
    pub roots: RootCerts,
}

#[derive(Debug, thiserror::Error)]
pub enum PgTlsError {
    #[error("the PostgreSQL URL's {0} parameter is not valid percent-encoding")]
    BadEncoding(&'static str),
    #[error("cannot read sslrootcert file {path}: {cause}")]
    RootCertRead { path: PathBuf, cause: io::Error },
    #[error("sslrootcert file {path} holds no usable PEM certificate{reason}")]
    RootCertUnusable { path: PathBuf, reason: String },
    #[error(
        "no platform root certificates could be loaded ({0}); add sslrootcert=/path/to/ca.pem to the PostgreSQL URL"
    )]
    NoPlatformRoots(String),
    #[error("{0:?} is not a valid TLS server name")]
    BadServerName(String),
}

impl PgUrl {
    /// Splits `url` (pure: no file is read). Errors never contain the URL.
    pub fn parse(url: &str) -> Result<PgUrl, PgTlsError> {
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, query),
            None => (url, ""),
        };
        let mut kept: Vec<String> = Vec::new();
        let mut ssl_mode: Option<String> = None;
        let mut roots = RootCerts::Platform;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslrootcert" => {
                    let path =
                        percent_decode(value).ok_or(PgTlsError::BadEncoding("sslrootcert"))?;
                    roots = if path == "system" {
                        RootCerts::Platform
                    } else {
                        RootCerts::File(PathBuf::from(path))
                    };
                }
                "sslmode" => {
                    let mode = percent_decode(value).ok_or(PgTlsError::BadEncoding("sslmode"))?;
                    ssl_mode = Some(mode);
                }
                _ => kept.push(pair.to_owned()),
            }
        }
        let ssl_mode_given = ssl_mode.is_some();
        let ssl_mode = ssl_mode.unwrap_or_else(|| "require".to_owned());
        // tokio-postgres's vocabulary; anything else goes through as is and it refuses it.
        let driver_mode = match ssl_mode.as_str() {
            "verify-ca" | "verify-full" => "require",
            other => other,
        };
        kept.push(format!("sslmode={driver_mode}"));
        Ok(PgUrl {
            driver_url: format!("{base}?{}", kept.join("&")),
            ssl_mode,
            ssl_mode_given,
            roots,
        })
    }
}

/// `%XX` decoding as libpq does for URI parameters; `None` on a malformed escape or non-UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses the CA certificates of a PEM file (pure; see [`load_roots`] for the I/O).
fn roots_from_pem(path: &Path, pem: &[u8]) -> Result<rustls::RootCertStore, PgTlsError> {
    let unusable = |reason: String| PgTlsError::RootCertUnusable {
        path: path.to_owned(),
        reason,
    };
    let mut store = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| unusable(format!(": {e}")))?;
        store.add(cert).map_err(|e| unusable(format!(": {e}")))?;
    }
    if store.is_empty() {
        return Err(unusable(String::new()));
    }
    Ok(store)
}

/// Reads the trusted CAs: the file named by `sslrootcert`, else the platform's store.
pub fn load_roots(roots: &RootCerts) -> Result<rustls::RootCertStore, PgTlsError> {
    match roots {
        RootCerts::File(path) => {
            let pem = std::fs::read(path).map_err(|cause| PgTlsError::RootCertRead {
                path: path.clone(),
                cause,
            })?;
            roots_from_pem(path, &pem)
        }
        RootCerts::Platform => {
            let found = rustls_native_certs::load_native_certs();
            let mut store = rustls::RootCertStore::empty();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "the store is empty".to_owned(), ToString::to_string);
                return Err(PgTlsError::NoPlatformRoots(why));
            }
            Ok(store)
        }
    }
}

/// tokio-postgres's TLS hook: verifies the chain against `roots` and the host name.
#[derive(Clone)]
pub struct RustlsConnector {
    config: Arc<rustls::ClientConfig>,
    roots: Arc<RootCerts>,
}

impl RustlsConnector {
    /// Loads the trusted CAs (file or platform store) and builds the client configuration.
    pub fn new(roots: &RootCerts) -> Result<RustlsConnector, PgTlsError> {
        let store = load_roots(roots)?;
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(store)
        .with_no_client_auth();
        Ok(RustlsConnector {
            config: Arc::new(config),
            roots: Arc::new(roots.clone()),
        })
    }
}

impl<S> MakeTlsConnect<S> for RustlsConnector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = PgTlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, PgTlsError> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|_| PgTlsError::BadServerName(domain.to_owned()))?;
        Ok(RustlsConnect {
            name,
            config: self.config.clone(),
            roots: self.roots.clone(),
        })
    }
}

/// One handshake with one server.
pub struct RustlsConnect {
    name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
    roots: Arc<RootCerts>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = HandshakeError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, HandshakeError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let host = self.name.to_str().into_owned();
            tokio_rustls::TlsConnector::from(self.config)
                .connect(self.name, stream)
                .await
                .map(RustlsStream)
                .map_err(|error| HandshakeError {
                    host,
                    reason: handshake_reason(&error, &self.roots),
                })
        })
    }
}

/// Why a handshake failed, naming the server; never carries the URL.
#[derive(Debug, thiserror::Error)]
#[error("TLS with PostgreSQL server {host} failed: {reason}")]
pub struct HandshakeError {
    pub host: String,
    pub reason: String,
}

fn handshake_reason(error: &io::Error, roots: &RootCerts) -> String {
    use rustls::{CertificateError, Error};
    match error.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::NotValidForName))
        | Some(Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
            "its certificate is not valid for this host name (the URL's host must be one of the certificate's names)".to_owned()
        }
        Some(Error::InvalidCertificate(cert)) => {
            format!("its certificate does not verify against {roots}: {cert:?}")
        }
        Some(other) => other.to_string(),
        None => error.to_string(),
    }
}

/// A TLS session as tokio-postgres wants it.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_sslmode_means_require() {
        let url = PgUrl::parse("postgres://u:pw@db.example:5432/audit").unwrap();
        assert_eq!(
            url.driver_url,
            "postgres://u:pw@db.example:5432/audit?sslmode=require"
        );
        assert_eq!(url.ssl_mode, "require");
        assert_eq!(url.roots, RootCerts::Platform);
    }

    #[test]
    fn libpq_parameters_are_translated() {
        let url = PgUrl::parse(
            "postgresql://u@h/db?application_name=kb&sslmode=verify-full&sslrootcert=%2Fetc%2Fpg%20ca%2Fca.crt&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(
            url.driver_url,
            "postgresql://u@h/db?application_name=kb&connect_timeout=5&sslmode=require"
        );
        assert_eq!(url.ssl_mode, "verify-full");
        assert_eq!(url.roots, RootCerts::File("/etc/pg ca/ca.crt".into()));

        let url = PgUrl::parse("postgres://h/db?sslmode=disable&sslrootcert=system").unwrap();
        assert_eq!(url.driver_url, "postgres://h/db?sslmode=disable");
        assert_eq!(url.roots, RootCerts::Platform);
        let url = PgUrl::parse("postgres://h/db?sslmode=verify-ca").unwrap();
        assert_eq!(url.driver_url, "postgres://h/db?sslmode=require");
    }

    #[test]
    fn bad_encoding_is_refused_without_echoing_the_url() {
        let err = PgUrl::parse("postgres://u:hunter2@h/db?sslrootcert=%zz")
            .err()
            .unwrap();
        assert!(matches!(err, PgTlsError::BadEncoding("sslrootcert")));
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn a_pem_without_certificates_is_refused() {
        let err = roots_from_pem(Path::new("/ca.pem"), b"not a certificate\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "sslrootcert file /ca.pem holds no usable PEM certificate"
        );
    }

    #[test]
    fn messages_say_which_roots_were_used() {
        assert!(
            RootCerts::File("/x/ca.pem".into())
                .to_string()
                .contains("/x/ca.pem")
        );
        assert!(RootCerts::Platform.to_string().contains("sslrootcert="));
    }
}
