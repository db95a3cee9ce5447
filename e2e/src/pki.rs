//! Throw-away certificates for loopback TLS: the apiserver's serving certificate, and any server a
//! test runs (the controller's webhook and stream listeners) that the apiserver or a sidecar must
//! trust. Keys are ECDSA P-256, generated fresh per plane; nothing is persisted beyond its run.
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::error::HarnessError;

/// A self-signed certificate authority that issues loopback server and client certificates.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key stays out of test output.
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl TestCa {
    pub fn new(common_name: &str) -> Result<Self, HarnessError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(TestCa { cert, key })
    }

    /// The CA certificate (PEM): what a client trusts, or a webhook's `caBundle` (base64 of it).
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A serving certificate for `names` (DNS names or IP addresses such as `127.0.0.1`).
    pub fn issue_server(&self, names: &[&str]) -> Result<CertifiedKey, HarnessError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate with `common_name` as user and `groups` as organizations, the way
    /// kube-apiserver's `--client-ca-file` authentication reads them.
    pub fn issue_client(
        &self,
        common_name: &str,
        groups: &[&str],
    ) -> Result<CertifiedKey, HarnessError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for group in groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Result<CertifiedKey, HarnessError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A fresh signing key pair (ECDSA P-256): the private key as PKCS#8 PEM and the public key as
/// SPKI PEM, e.g. for the service-account token issuer (`--service-account-signing-key-file`
/// takes the former, `--service-account-key-file` the latter).
pub fn signing_key_pair_pem() -> Result<CertifiedKeyPair, HarnessError> {
    let key = KeyPair::generate()?;
    Ok(CertifiedKeyPair {
        private_pem: key.serialize_pem(),
        public_pem: key.public_key_pem(),
    })
}

/// A bare key pair, both halves PEM.
pub struct CertifiedKeyPair {
    pub private_pem: String,
    pub public_pem: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_pem_certificates_and_keys() {
        let ca = TestCa::new("test-ca").unwrap();
        let server = ca.issue_server(&["127.0.0.1", "localhost"]).unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(server.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_ne!(server.cert_pem, ca.cert_pem());
        assert!(!format!("{server:?}").contains("PRIVATE KEY"));
    }
}
