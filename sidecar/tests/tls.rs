//! Upstreams over TLS: the sidecar trusts the platform roots plus `--extra-ca-file`, and nothing
//! else.
mod common;

use common::*;
use keybrake_api::Vendor;
use keybrake_sidecar::Freshness;
use keybrake_testkit::{FakeKind, FakeVendor};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

const KEY: &str = "vault_key_tls_test";

/// A test CA and a leaf for 127.0.0.1/localhost signed by it: (ca_pem, leaf_pem, leaf_key_pem).
fn test_pki() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    (ca_cert.pem(), leaf_cert.pem(), leaf_key.serialize_pem())
}

#[tokio::test]
async fn https_upstream_needs_the_extra_ca() {
    let (ca_pem, leaf_pem, leaf_key) = test_pki();
    let fake = FakeVendor::start_tls(FakeKind::Openai, OPENAI_SECRET, &leaf_pem, &leaf_key)
        .await
        .unwrap();
    assert!(fake.url().starts_with("https://127.0.0.1:"));
    let mut g = grant("tls", KEY, Vendor::Openai, &fake.url());
    g.allow = vec![op("models.list")];
    let call = request(
        "GET",
        "/openai/v1/models",
        &[("Authorization", &bearer(KEY))],
        b"",
    );

    // Without the test CA the upstream's certificate is not trusted: 502, nothing served.
    let untrusting = Harness::start(Freshness::AlwaysFresh, Some(vec![g.clone()])).await;
    let r = raw(untrusting.proxy, &call).await.unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.verdict(), "allow");
    assert_eq!(fake.request_count(), 0);

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let trusting = Harness::start_with(Freshness::AlwaysFresh, Some(vec![g]), |s| {
        s.extra_ca_file = Some(ca_file.clone());
    })
    .await;
    let r = raw(trusting.proxy, &call).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-fake-vendor"), Some("openai"));
    assert_eq!(
        fake.requests()[0].headers["authorization"],
        format!("Bearer {OPENAI_SECRET}").as_str()
    );
}
