//! The generated serving identity every replica shares: a CA and a serving certificate kept in
//! one Secret (`--tls-secret`), so the webhook's caBundle and the sidecars' CA ConfigMap hold one
//! CA whichever replica answers. Pure: generation, (de)serialization and the renewal decision;
//! `tls_secret` does the Kubernetes I/O.
//!
//! The CA lives ten years and is not rotated (documented limitation); the serving certificate is
//! re-issued by the same CA when less than a third of its validity remains or its names changed,
//! so clients never need a new bundle.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";
/// Validity of the serving certificate, as annotations: no X.509 parser needed to decide renewal.
pub const NOT_BEFORE_ANNOTATION: &str = "keybrake.dev/not-before";
pub const NOT_AFTER_ANNOTATION: &str = "keybrake.dev/not-after";
pub const SANS_ANNOTATION: &str = "keybrake.dev/sans";

/// How long the generated CA lives.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const CA_COMMON_NAME: &str = "keybrake-controller CA";
/// Clock skew allowance: certificates are valid from a little before they were made.
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the Secret lacks {0}")]
    Missing(&'static str),
    #[error("the Secret's {0} is malformed")]
    Malformed(&'static str),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// CA + serving certificate and their keys. Not `Debug`: it holds private keys.
#[derive(Clone, PartialEq, Eq)]
pub struct SharedIdentity {
    pub ca_cert_pem: String,
    ca_key_pem: String,
    pub cert_pem: String,
    key_pem: String,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    pub sans: BTreeSet<String>,
}

fn to_rcgen_time(t: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.as_second())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// The CA's parameters: identical on every call, so a CA certificate rebuilt from the stored key
/// signs serving certificates that chain to the CA certificate clients already trust (same
/// subject, same key identifier).
fn ca_params(now: Timestamp) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = to_rcgen_time(now - BACKDATE);
    params.not_after = to_rcgen_time(now + CA_VALIDITY);
    Ok(params)
}

fn issue_leaf(
    ca: &Certificate,
    ca_key: &KeyPair,
    sans: &BTreeSet<String>,
    now: Timestamp,
    validity: Duration,
) -> Result<(String, String, Timestamp, Timestamp), rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(sans.iter().cloned().collect::<Vec<_>>())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "keybrake-controller");
    let not_before = whole_seconds(now - BACKDATE);
    let not_after = whole_seconds(now + validity);
    params.not_before = to_rcgen_time(not_before);
    params.not_after = to_rcgen_time(not_after);
    let cert = params.signed_by(&key, ca, ca_key)?;
    Ok((cert.pem(), key.serialize_pem(), not_before, not_after))
}

impl SharedIdentity {
    /// A fresh CA and a serving certificate for `sans` valid for `validity`.
    pub fn generate(
        sans: &BTreeSet<String>,
        now: Timestamp,
        validity: Duration,
    ) -> Result<Self, CertError> {
        let ca_key = KeyPair::generate()?;
        let ca = ca_params(now)?.self_signed(&ca_key)?;
        let (cert_pem, key_pem, not_before, not_after) =
            issue_leaf(&ca, &ca_key, sans, now, validity)?;
        Ok(SharedIdentity {
            ca_cert_pem: ca.pem(),
            ca_key_pem: ca_key.serialize_pem(),
            cert_pem,
            key_pem,
            not_before,
            not_after,
            sans: sans.clone(),
        })
    }

    /// A new serving certificate from the same CA (the CA certificate is unchanged).
    pub fn renewed(
        &self,
        sans: &BTreeSet<String>,
        now: Timestamp,
        validity: Duration,
    ) -> Result<Self, CertError> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem)?;
        let ca = ca_params(now)?.self_signed(&ca_key)?;
        let (cert_pem, key_pem, not_before, not_after) =
            issue_leaf(&ca, &ca_key, sans, now, validity)?;
        Ok(SharedIdentity {
            ca_cert_pem: self.ca_cert_pem.clone(),
            ca_key_pem: self.ca_key_pem.clone(),
            cert_pem,
            key_pem,
            not_before,
            not_after,
            sans: sans.clone(),
        })
    }

    /// Renew when less than a third of the serving certificate's validity remains, or when it
    /// does not cover the names this replica was asked to serve.
    pub fn needs_renewal(&self, sans: &BTreeSet<String>, now: Timestamp) -> bool {
        if !sans.is_subset(&self.sans) {
            return true;
        }
        // Measured from issuance: the backdating is skew allowance, not validity.
        let issued = self.not_before.as_second() + BACKDATE.as_secs() as i64;
        let total = self.not_after.as_second() - issued;
        let left = self.not_after.as_second() - now.as_second();
        left * 3 < total
    }

    /// Secret `data` and `metadata.annotations`.
    pub fn to_secret_parts(&self) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, String>) {
        let data = BTreeMap::from([
            (
                CA_CERT_KEY.to_string(),
                self.ca_cert_pem.clone().into_bytes(),
            ),
            (CA_KEY_KEY.to_string(), self.ca_key_pem.clone().into_bytes()),
            (TLS_CERT_KEY.to_string(), self.cert_pem.clone().into_bytes()),
            (TLS_KEY_KEY.to_string(), self.key_pem.clone().into_bytes()),
        ]);
        let annotations = BTreeMap::from([
            (
                NOT_BEFORE_ANNOTATION.to_string(),
                self.not_before.to_string(),
            ),
            (NOT_AFTER_ANNOTATION.to_string(), self.not_after.to_string()),
            (
                SANS_ANNOTATION.to_string(),
                self.sans.iter().cloned().collect::<Vec<_>>().join(","),
            ),
        ]);
        (data, annotations)
    }

    pub fn from_secret_parts(
        data: &BTreeMap<String, Vec<u8>>,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Self, CertError> {
        let text = |key: &'static str| -> Result<String, CertError> {
            let bytes = data.get(key).ok_or(CertError::Missing(key))?;
            String::from_utf8(bytes.clone()).map_err(|_| CertError::Malformed(key))
        };
        let time = |key: &'static str| -> Result<Timestamp, CertError> {
            annotations
                .get(key)
                .ok_or(CertError::Missing(key))?
                .parse()
                .map_err(|_| CertError::Malformed(key))
        };
        let identity = SharedIdentity {
            ca_cert_pem: text(CA_CERT_KEY)?,
            ca_key_pem: text(CA_KEY_KEY)?,
            cert_pem: text(TLS_CERT_KEY)?,
            key_pem: text(TLS_KEY_KEY)?,
            not_before: time(NOT_BEFORE_ANNOTATION)?,
            not_after: time(NOT_AFTER_ANNOTATION)?,
            sans: annotations
                .get(SANS_ANNOTATION)
                .ok_or(CertError::Missing(SANS_ANNOTATION))?
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        // Fail here, not at the first handshake.
        identity.certified_key()?;
        Ok(identity)
    }

    /// The serving certificate and key for rustls.
    pub fn certified_key(&self) -> Result<Arc<rustls::sign::CertifiedKey>, CertError> {
        certified_key_from_pem(self.cert_pem.as_bytes(), self.key_pem.as_bytes())
    }
}

/// A rustls certificate + signing key from PEM.
pub fn certified_key_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::sign::CertifiedKey>, CertError> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(|_| CertError::Malformed(TLS_CERT_KEY))?;
    if chain.is_empty() {
        return Err(CertError::Missing(TLS_CERT_KEY));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|_| CertError::Malformed(TLS_KEY_KEY))?
        .ok_or(CertError::Missing(TLS_KEY_KEY))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(chain, signing)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::WebPkiServerVerifier;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    fn sans(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn verify(ca_pem: &str, identity: &SharedIdentity, name: &str, at: Timestamp) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = rustls_pemfile::certs(&mut identity.cert_pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::since_unix_epoch(Duration::from_secs(
                    u64::try_from(at.as_second()).unwrap(),
                )),
            )
            .is_ok()
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn renewed_certificate_chains_to_the_original_ca() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let names = sans(&["127.0.0.1", "keybrake.keybrake-system.svc"]);
        let first = SharedIdentity::generate(&names, now, 90 * DAY).unwrap();
        assert!(verify(&first.ca_cert_pem, &first, "127.0.0.1", now));
        assert!(verify(
            &first.ca_cert_pem,
            &first,
            "keybrake.keybrake-system.svc",
            now
        ));
        assert!(!verify(&first.ca_cert_pem, &first, "other.svc", now));
        // Past its not-after the old certificate is refused.
        assert!(!verify(
            &first.ca_cert_pem,
            &first,
            "127.0.0.1",
            now + 91 * DAY
        ));

        let later = now + 70 * DAY;
        let second = first.renewed(&names, later, 90 * DAY).unwrap();
        assert_eq!(second.ca_cert_pem, first.ca_cert_pem);
        assert_ne!(second.cert_pem, first.cert_pem);
        // Clients holding the original bundle accept the new certificate.
        assert!(verify(
            &first.ca_cert_pem,
            &second,
            "127.0.0.1",
            later + 80 * DAY
        ));
        // And a different CA does not.
        let stranger = SharedIdentity::generate(&names, now, 90 * DAY).unwrap();
        assert!(!verify(&stranger.ca_cert_pem, &second, "127.0.0.1", later));
    }

    #[test]
    fn renewal_when_a_third_remains_or_names_change() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let names = sans(&["127.0.0.1"]);
        let id = SharedIdentity::generate(&names, now, 90 * DAY).unwrap();
        // Valid from now-5min (skew) to now+90d; renewal is due with 30 days left.
        assert!(!id.needs_renewal(&names, now));
        let short = SharedIdentity::generate(&names, now, Duration::from_secs(9)).unwrap();
        assert!(!short.needs_renewal(&names, now + Duration::from_secs(5)));
        assert!(short.needs_renewal(&names, now + Duration::from_secs(7)));
        assert!(!id.needs_renewal(&names, now + 59 * DAY));
        assert!(id.needs_renewal(&names, now + 61 * DAY));
        assert!(id.needs_renewal(&names, now + 100 * DAY));
        assert!(id.needs_renewal(&sans(&["127.0.0.1", "new.svc"]), now));
        // Fewer names than the certificate has: still covered.
        assert!(!id.needs_renewal(&BTreeSet::new(), now));
    }

    #[test]
    fn secret_round_trip_and_refusals() {
        let now = Timestamp::now();
        let id = SharedIdentity::generate(&sans(&["localhost"]), now, 30 * DAY).unwrap();
        let (data, annotations) = id.to_secret_parts();
        assert_eq!(data.len(), 4);
        let back = SharedIdentity::from_secret_parts(&data, &annotations).unwrap();
        assert!(back == id);
        back.certified_key().unwrap();

        let mut missing = data.clone();
        missing.remove(CA_KEY_KEY);
        assert!(matches!(
            SharedIdentity::from_secret_parts(&missing, &annotations),
            Err(CertError::Missing(CA_KEY_KEY))
        ));
        let mut garbled = data.clone();
        garbled.insert(TLS_KEY_KEY.into(), b"not a key".to_vec());
        assert!(SharedIdentity::from_secret_parts(&garbled, &annotations).is_err());
        let mut bad_time = annotations.clone();
        bad_time.insert(NOT_AFTER_ANNOTATION.into(), "soon".into());
        assert!(matches!(
            SharedIdentity::from_secret_parts(&data, &bad_time),
            Err(CertError::Malformed(NOT_AFTER_ANNOTATION))
        ));
    }
}
