//! The stream server's TLS identity: PEM files (production, cert-manager) or a CA and serving
//! certificate generated at start (tests, quick starts), the CA written out for clients.
use std::{
    path::Path,
    sync::{Arc, RwLock},
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} holds no PEM certificate")]
    NoCertificate(String),
    #[error("{0} holds no PEM private key")]
    NoKey(String),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

pub struct ServingIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// PEM of the CA that signed `chain`, when this process generated it.
    pub generated_ca_pem: Option<String>,
}

impl ServingIdentity {
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|source| TlsError::Read {
                path: cert.display().to_string(),
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate(cert.display().to_string()));
        }
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|source| TlsError::Read {
                path: key.display().to_string(),
                source,
            })?
            .ok_or_else(|| TlsError::NoKey(key.display().to_string()))?;
        Ok(ServingIdentity {
            chain,
            key,
            generated_ca_pem: None,
        })
    }

    /// A fresh CA and a serving certificate for `names` (DNS names or IP addresses).
    pub fn generate(names: &[String]) -> Result<Self, TlsError> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "keybrake-controller generated CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key)?;

        let leaf_key = KeyPair::generate()?;
        let mut leaf_params = CertificateParams::new(names.to_vec())?;
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "keybrake-controller");
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key)?;
        Ok(ServingIdentity {
            chain: vec![leaf.der().clone()],
            key: PrivateKeyDer::try_from(leaf_key.serialize_der())
                .map_err(|e| TlsError::NoKey(e.to_owned()))?,
            generated_ca_pem: Some(ca.pem()),
        })
    }

    pub fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
        let signing = rustls::crypto::ring::sign::any_supported_type(&self.key)?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            self.chain.clone(),
            signing,
        )))
    }

    /// Server config offering HTTP/2 (and HTTP/1.1 for curl-style debugging).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The serving certificate of every TLS listener, replaced in place when it is rotated:
/// handshakes after [`SwappableCert::set`] present the new certificate, open connections keep
/// theirs.
#[derive(Debug)]
pub struct SwappableCert(RwLock<Arc<rustls::sign::CertifiedKey>>);

impl SwappableCert {
    pub fn new(key: Arc<rustls::sign::CertifiedKey>) -> Arc<Self> {
        Arc::new(SwappableCert(RwLock::new(key)))
    }

    pub fn set(&self, key: Arc<rustls::sign::CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }

    pub fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Server config offering HTTP/2 and HTTP/1.1, presenting whatever certificate is current.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl rustls::server::ResolvesServerCert for SwappableCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_is_usable_and_reloadable() {
        let id = ServingIdentity::generate(&["127.0.0.1".into(), "localhost".into()]).unwrap();
        assert!(
            id.generated_ca_pem
                .as_deref()
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        id.server_config().unwrap();
        SwappableCert::new(id.certified_key().unwrap())
            .server_config()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            ServingIdentity::from_pem_files(&dir.path().join("nope"), &dir.path().join("nope")),
            Err(TlsError::Read { .. })
        ));
    }
}
