//! TLS to PostgreSQL over rustls, configured from the URL with libpq's parameter names.
//!
//! - `sslmode`: `disable` (plain TCP), `prefer` (TLS when the server offers it, plain TCP when
//!   it does not), `require`, `verify-ca`, `verify-full`. Absent means `require`: the audit
//!   trail fails closed rather than silently sending rows in clear text. Unlike libpq, every
//!   mode that uses TLS verifies the certificate chain *and* the host name (libpq's `require`
//!   and `verify-ca` do less); `verify-ca` and `verify-full` are accepted so libpq URLs work.
//! - `sslrootcert=/path/ca.pem`: trust only the CAs in that PEM file (libpq's meaning); absent
//!   or `sslrootcert=system`: the platform's root certificates.
//! - `sslcert=/path/client.crt&sslkey=/path/client.key`: authenticate with this client
//!   certificate (PEM; the file may carry intermediates after the leaf) and private key (PEM:
//!   PKCS#8, PKCS#1/RSA or SEC1/EC; not encrypted). Both or neither; with `sslmode=disable`
//!   they are refused (the certificate would never be sent). Unlike libpq there is no default
//!   `~/.postgresql/postgresql.crt`, and the key file's permissions are not checked (Kubernetes
//!   Secret mounts set them). The files are read on every (re)connect, like `sslrootcert`, so a
//!   rotated certificate takes effect without a restart.
//!
//! tokio-postgres parses `sslmode` itself but knows only `disable|prefer|require` and refuses
//! `sslrootcert`, `sslcert` and `sslkey`, so [`PgUrl::parse`] rewrites the URL before handing
//! it over. No channel binding is offered (SCRAM without `-PLUS`): the verified certificate is
//! what binds the session to the server.
use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
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

/// The client certificate and key files (`sslcert`, `sslkey`), always both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
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
    /// `sslcert` + `sslkey`, when the server authenticates us by certificate.
    pub client_cert: Option<ClientCert>,
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
    #[error(
        "the PostgreSQL URL has {given} but no {missing}: a client certificate needs both sslcert=/path/to/client.crt and sslkey=/path/to/client.key"
    )]
    ClientCertHalf {
        given: &'static str,
        missing: &'static str,
    },
    #[error("the PostgreSQL URL's {0} parameter is empty")]
    EmptyPath(&'static str),
    #[error(
        "the PostgreSQL URL has sslcert/sslkey with sslmode=disable: the client certificate would never be sent (remove them, or use sslmode=require or verify-full)"
    )]
    ClientCertWithoutTls,
    /// `param` is `sslcert` or `sslkey`.
    #[error("cannot read {param} file {path}: {cause}")]
    ClientFileRead {
        param: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
    #[error("sslcert file {path} holds no usable PEM certificate{reason}")]
    ClientCertUnusable { path: PathBuf, reason: String },
    /// `reason` is one of a few fixed texts: nothing read from a key file is ever shown.
    #[error("sslkey file {path} holds no usable private key: {reason}")]
    ClientKeyUnusable { path: PathBuf, reason: &'static str },
    #[error(
        "sslkey file {key} does not match the certificate in sslcert file {cert} (its public key differs)"
    )]
    ClientKeyMismatch { key: PathBuf, cert: PathBuf },
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
        let mut cert_file: Option<PathBuf> = None;
        let mut key_file: Option<PathBuf> = None;
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
                "sslcert" => cert_file = Some(client_file("sslcert", value)?),
                "sslkey" => key_file = Some(client_file("sslkey", value)?),
                "sslmode" => {
                    let mode = percent_decode(value).ok_or(PgTlsError::BadEncoding("sslmode"))?;
                    ssl_mode = Some(mode);
                }
                _ => kept.push(pair.to_owned()),
            }
        }
        let ssl_mode_given = ssl_mode.is_some();
        let ssl_mode = ssl_mode.unwrap_or_else(|| "require".to_owned());
        let client_cert = match (cert_file, key_file) {
            (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(PgTlsError::ClientCertHalf {
                    given: "sslcert",
                    missing: "sslkey",
                });
            }
            (None, Some(_)) => {
                return Err(PgTlsError::ClientCertHalf {
                    given: "sslkey",
                    missing: "sslcert",
                });
            }
        };
        if client_cert.is_some() && ssl_mode == "disable" {
            return Err(PgTlsError::ClientCertWithoutTls);
        }
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
            client_cert,
        })
    }
}

/// The path of `sslcert` or `sslkey`, decoded; an empty one is refused rather than ignored.
fn client_file(param: &'static str, value: &str) -> Result<PathBuf, PgTlsError> {
    let path = percent_decode(value).ok_or(PgTlsError::BadEncoding(param))?;
    if path.is_empty() {
        return Err(PgTlsError::EmptyPath(param));
    }
    Ok(PathBuf::from(path))
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

/// A client certificate chain and its private key, read from `sslcert` and `sslkey`.
/// Not `Debug`: it holds the key.
pub struct ClientIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// Parses the `sslcert` chain (leaf first) of a PEM file (pure; see [`load_client_identity`]).
fn client_chain_from_pem(
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, PgTlsError> {
    let unusable = |reason: String| PgTlsError::ClientCertUnusable {
        path: path.to_owned(),
        reason,
    };
    let chain = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unusable(format!(": {e}")))?;
    if chain.is_empty() {
        return Err(unusable(String::new()));
    }
    Ok(chain)
}

/// Parses the `sslkey` PEM file (pure). The reasons are fixed texts: a parser's message could
/// quote bytes of the key.
fn client_key_from_pem(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, PgTlsError> {
    let unusable = |reason: &'static str| PgTlsError::ClientKeyUnusable {
        path: path.to_owned(),
        reason,
    };
    match rustls_pemfile::private_key(&mut &pem[..]) {
        Ok(Some(key)) => Ok(key),
        Err(_) => Err(unusable("malformed PEM")),
        Ok(None) if contains(pem, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") => Err(unusable(
            "the key is encrypted and sslpassword is not supported; store it decrypted (e.g. `openssl pkey -in encrypted.key -out client.key`)",
        )),
        Ok(None) => Err(unusable(
            "no PEM private key (expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
        )),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads `sslcert` and `sslkey`.
pub fn load_client_identity(files: &ClientCert) -> Result<ClientIdentity, PgTlsError> {
    let read = |param: &'static str, path: &Path| {
        std::fs::read(path).map_err(|cause| PgTlsError::ClientFileRead {
            param,
            path: path.to_owned(),
            cause,
        })
    };
    let chain = client_chain_from_pem(&files.cert, &read("sslcert", &files.cert)?)?;
    let key = client_key_from_pem(&files.key, &read("sslkey", &files.key)?)?;
    Ok(ClientIdentity { chain, key })
}

/// The rustls client configuration (pure): trusts `store`, and presents `identity` when the
/// server asks for a certificate. A key that does not match the leaf certificate is refused
/// here rather than by the server's handshake, whose alert would not say which file is wrong.
fn client_config(
    store: rustls::RootCertStore,
    identity: Option<(ClientIdentity, &ClientCert)>,
) -> Result<rustls::ClientConfig, PgTlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(store);
    let Some((identity, files)) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    builder
        .with_client_auth_cert(identity.chain, identity.key)
        .map_err(|error| match error {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                PgTlsError::ClientKeyMismatch {
                    key: files.key.clone(),
                    cert: files.cert.clone(),
                }
            }
            // The leaf does not parse as X.509 (the key was parsed before it was compared).
            rustls::Error::InvalidCertificate(_) => PgTlsError::ClientCertUnusable {
                path: files.cert.clone(),
                reason: format!(": {error}"),
            },
            _ => PgTlsError::ClientKeyUnusable {
                path: files.key.clone(),
                reason: "unsupported key type (RSA, ECDSA P-256/P-384 or Ed25519 are)",
            },
        })
}

/// tokio-postgres's TLS hook: verifies the chain against `roots` and the host name, and
/// presents the client certificate when one is configured.
#[derive(Clone)]
pub struct RustlsConnector {
    config: Arc<rustls::ClientConfig>,
    roots: Arc<RootCerts>,
    client_cert: Option<Arc<ClientCert>>,
}

impl RustlsConnector {
    /// Reads the trusted CAs (file or platform store) and the client certificate and key, if
    /// any, and builds the client configuration.
    pub fn new(
        roots: &RootCerts,
        client_cert: Option<&ClientCert>,
    ) -> Result<RustlsConnector, PgTlsError> {
        let store = load_roots(roots)?;
        let identity = client_cert
            .map(|files| load_client_identity(files).map(|identity| (identity, files)))
            .transpose()?;
        Ok(RustlsConnector {
            config: Arc::new(client_config(store, identity)?),
            roots: Arc::new(roots.clone()),
            client_cert: client_cert.cloned().map(Arc::new),
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
            client_cert: self.client_cert.clone(),
        })
    }
}

/// One handshake with one server.
pub struct RustlsConnect {
    name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
    roots: Arc<RootCerts>,
    client_cert: Option<Arc<ClientCert>>,
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
                .map(|tls| RustlsStream {
                    tls,
                    client_cert: self.client_cert.clone(),
                })
                .map_err(|error| HandshakeError {
                    host,
                    reason: handshake_reason(&error, &self.roots, self.client_cert.as_deref()),
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

fn handshake_reason(
    error: &io::Error,
    roots: &RootCerts,
    client_cert: Option<&ClientCert>,
) -> String {
    use rustls::{CertificateError, Error};
    if let Some(refused) = client_cert_refusal(error, client_cert) {
        return refused;
    }
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

/// When `error` is the server's alert about the certificate we presented, says so and names
/// the file. PostgreSQL verifies it against its ssl_ca_file; with TLS 1.3 its alert arrives
/// after our side of the handshake has completed, on the first read.
fn client_cert_refusal(error: &io::Error, client_cert: Option<&ClientCert>) -> Option<String> {
    use rustls::{AlertDescription as Alert, Error};
    let files = client_cert?;
    match error.get_ref()?.downcast_ref::<Error>()? {
        Error::AlertReceived(
            alert @ (Alert::BadCertificate
            | Alert::UnsupportedCertificate
            | Alert::CertificateRevoked
            | Alert::CertificateExpired
            | Alert::CertificateUnknown
            | Alert::UnknownCA
            | Alert::DecryptError),
        ) => Some(format!(
            "the server refused the client certificate in sslcert file {} (alert {alert:?}: is it issued by a CA in the server's ssl_ca_file, and still valid?)",
            files.cert.display()
        )),
        _ => None,
    }
}

/// A TLS session as tokio-postgres wants it.
pub struct RustlsStream<S> {
    tls: tokio_rustls::client::TlsStream<S>,
    /// To explain a refusal of our certificate that arrives after the handshake.
    client_cert: Option<Arc<ClientCert>>,
}

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
        let this = &mut *self;
        match Pin::new(&mut this.tls).poll_read(cx, buf) {
            Poll::Ready(Err(error)) => Poll::Ready(Err(
                match client_cert_refusal(&error, this.client_cert.as_deref()) {
                    Some(refused) => io::Error::new(error.kind(), refused),
                    None => error,
                },
            )),
            other => other,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
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
    fn client_certificate_parameters_are_taken_out_of_the_driver_url() {
        let url = PgUrl::parse(
            "postgres://u:pw@h/db?sslcert=%2Fetc%2Fpg%20client%2Ftls.crt&sslmode=verify-full&sslkey=/etc/pg/tls.key&application_name=kb",
        )
        .unwrap();
        assert_eq!(
            url.driver_url,
            "postgres://u:pw@h/db?application_name=kb&sslmode=require"
        );
        assert_eq!(
            url.client_cert,
            Some(ClientCert {
                cert: "/etc/pg client/tls.crt".into(),
                key: "/etc/pg/tls.key".into(),
            })
        );
        assert_eq!(PgUrl::parse("postgres://h/db").unwrap().client_cert, None);
        // prefer may end up in TLS, where the certificate is wanted.
        let url = PgUrl::parse("postgres://h/db?sslmode=prefer&sslcert=/c&sslkey=/k").unwrap();
        assert!(url.client_cert.is_some());
    }

    #[test]
    fn a_client_certificate_needs_both_files() {
        let err = PgUrl::parse("postgres://u:hunter2@h/db?sslcert=/c.crt")
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "the PostgreSQL URL has sslcert but no sslkey: a client certificate needs both sslcert=/path/to/client.crt and sslkey=/path/to/client.key"
        );
        let err = PgUrl::parse("postgres://u:hunter2@h/db?sslkey=/c.key")
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                PgTlsError::ClientCertHalf {
                    given: "sslkey",
                    missing: "sslcert"
                }
            ),
            "{err}"
        );
        assert!(!err.to_string().contains("hunter2"));
        let err = PgUrl::parse("postgres://h/db?sslcert=&sslkey=/k")
            .err()
            .unwrap();
        assert!(matches!(err, PgTlsError::EmptyPath("sslcert")), "{err}");
        let err = PgUrl::parse("postgres://h/db?sslcert=/c&sslkey=%g0")
            .err()
            .unwrap();
        assert!(matches!(err, PgTlsError::BadEncoding("sslkey")), "{err}");
    }

    #[test]
    fn a_client_certificate_without_tls_is_a_misconfiguration() {
        let err = PgUrl::parse("postgres://u:hunter2@h/db?sslmode=disable&sslcert=/c&sslkey=/k")
            .err()
            .unwrap();
        assert!(matches!(err, PgTlsError::ClientCertWithoutTls), "{err}");
        assert!(err.to_string().contains("would never be sent"));
        assert!(!err.to_string().contains("hunter2"));
    }

    fn client_files() -> ClientCert {
        ClientCert {
            cert: "/tls/client.crt".into(),
            key: "/tls/client.key".into(),
        }
    }

    /// A certificate for `key` and the key's PEM.
    fn certificate_and_key() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn identity(cert_pem: &str, key_pem: &str) -> ClientIdentity {
        let files = client_files();
        ClientIdentity {
            chain: client_chain_from_pem(&files.cert, cert_pem.as_bytes()).unwrap(),
            key: client_key_from_pem(&files.key, key_pem.as_bytes()).unwrap(),
        }
    }

    #[test]
    fn a_matching_certificate_and_key_configure_client_auth() {
        let (cert, key) = certificate_and_key();
        let files = client_files();
        let config = client_config(
            rustls::RootCertStore::empty(),
            Some((identity(&cert, &key), &files)),
        )
        .unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
        let config = client_config(rustls::RootCertStore::empty(), None).unwrap();
        assert!(!config.client_auth_cert_resolver.has_certs());
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let (cert, _) = certificate_and_key();
        let (_, other_key) = certificate_and_key();
        let files = client_files();
        let err = client_config(
            rustls::RootCertStore::empty(),
            Some((identity(&cert, &other_key), &files)),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "sslkey file /tls/client.key does not match the certificate in sslcert file /tls/client.crt (its public key differs)"
        );
    }

    #[test]
    fn unusable_key_files_are_explained_without_quoting_them() {
        let path = Path::new("/tls/client.key");
        let secret = "c2VjcmV0LWtleS1tYXRlcmlhbA";
        let malformed =
            format!("-----BEGIN PRIVATE KEY-----\n{secret}!!\n-----END PRIVATE KEY-----\n");
        let truncated = format!("-----BEGIN EC PRIVATE KEY-----\n{secret}\n");
        for (pem, expected) in [
            (malformed.as_str(), "malformed PEM"),
            (truncated.as_str(), "malformed PEM"),
            ("just text\n", "no PEM private key"),
            (&certificate_and_key().0, "no PEM private key"),
            (
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
                "sslpassword is not supported",
            ),
        ] {
            let shown = client_key_from_pem(path, pem.as_bytes())
                .err()
                .unwrap()
                .to_string();
            assert!(
                shown.starts_with("sslkey file /tls/client.key holds no usable private key: ")
                    && shown.contains(expected)
                    && !shown.contains(secret),
                "{shown}"
            );
        }
    }

    #[test]
    fn a_certificate_file_without_certificates_is_refused() {
        let (_, key) = certificate_and_key();
        let err = client_chain_from_pem(Path::new("/tls/client.crt"), key.as_bytes()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sslcert file /tls/client.crt holds no usable PEM certificate"
        );
    }

    #[test]
    fn a_refused_client_certificate_is_named() {
        let alert = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
        );
        let files = client_files();
        let shown = handshake_reason(&alert, &RootCerts::Platform, Some(&files));
        assert!(
            shown.contains(
                "the server refused the client certificate in sslcert file /tls/client.crt"
            ) && shown.contains("UnknownCA"),
            "{shown}"
        );
        // Without a client certificate the alert is shown as it is.
        let shown = handshake_reason(&alert, &RootCerts::Platform, None);
        assert!(!shown.contains("sslcert"), "{shown}");
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
