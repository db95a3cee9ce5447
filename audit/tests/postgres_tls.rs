//! The PostgreSQL sink over TLS against the real server of scripts/with-postgres.sh, which
//! listens with ssl=on and a certificate for 127.0.0.1 signed by KEYBRAKE_TEST_POSTGRES_CA.
mod common;

use common::*;
use keybrake_audit::{AuditSink, SinkError, WriteOutcome, row::Value, sink::PostgresSink};

const CA_ENV: &str = "KEYBRAKE_TEST_POSTGRES_CA";
const PASSWORD: &str = "hunter2-never-printed";

fn test_ca() -> String {
    std::env::var(CA_ENV).unwrap_or_else(|_| {
        panic!(
            "{CA_ENV} is not set: this test needs the TLS-enabled PostgreSQL of \
             `scripts/with-postgres.sh cargo test -p keybrake-audit --test postgres_tls`"
        )
    })
}

/// `url` (from [`fresh_postgres_database`]) with its parameters replaced by `params`, and the
/// host replaced by `host` and a password added when asked.
fn with_params(url: &str, host: Option<&str>, params: &str) -> String {
    let base = url.split_once('?').map_or(url, |(base, _)| base);
    // postgres://keybrake@127.0.0.1:PORT/db
    let (user, rest) = base
        .strip_prefix("postgres://")
        .and_then(|s| s.split_once('@'))
        .expect("postgres://user@host:port/db");
    let (host_port, db) = rest.split_once('/').unwrap();
    let (default_host, port) = host_port.rsplit_once(':').unwrap();
    let host = host.unwrap_or(default_host);
    let base = format!("postgres://{user}:{PASSWORD}@{host}:{port}/{db}");
    if params.is_empty() {
        base
    } else {
        format!("{base}?{params}")
    }
}

/// What `SHOW`-style introspection says about our own connection: the TLS version or NULL.
async fn tls_version(sink: &PostgresSink) -> Value {
    sink.query(
        "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()[0][0]
        .clone()
}

/// The error's text as an operator sees it (`Display` with every cause, and `Debug`): names
/// the server, never the password.
fn refusal(result: Result<PostgresSink, SinkError>) -> String {
    let err = match result {
        Ok(_) => panic!("connection was expected to be refused"),
        Err(e) => e,
    };
    let shown = format!("{:#}", anyhow::Error::from(err));
    assert!(!shown.contains(PASSWORD), "password leaked: {shown}");
    eprintln!("refused as expected: {shown}");
    shown
}

#[tokio::test]
async fn verified_tls_connection_copies_rows() {
    let ca = test_ca();
    let url = fresh_postgres_database("tls_copy").await;
    let tls_url = with_params(&url, None, &format!("sslmode=verify-full&sslrootcert={ca}"));
    let sink = PostgresSink::connect(&tls_url).await.unwrap();
    let version = tls_version(&sink).await;
    assert!(
        version.as_str().is_some_and(|v| v.starts_with("TLSv1.")),
        "{version:?}"
    );
    let rows = playbook_rows();
    assert_eq!(
        sink.write_batch(&rows).await.unwrap(),
        WriteOutcome {
            inserted: rows.len() as u64,
            duplicates: 0
        }
    );
    // A second write over TLS exercises the replay path (COPY into staging + merge) too.
    assert_eq!(
        sink.write_batch(&rows).await.unwrap(),
        WriteOutcome {
            inserted: 0,
            duplicates: rows.len() as u64
        }
    );
    let count = sink
        .query("SELECT COUNT(*) FROM agent_call_audit", &[])
        .await
        .unwrap();
    assert_eq!(count[0][0], Value::Int(rows.len() as i64));
}

#[tokio::test]
async fn tls_is_the_default_when_the_url_says_nothing() {
    let ca = test_ca();
    let url = fresh_postgres_database("tls_default").await;
    let sink = PostgresSink::connect(&with_params(&url, None, &format!("sslrootcert={ca}")))
        .await
        .unwrap();
    assert!(tls_version(&sink).await.as_str().is_some());
}

#[tokio::test]
async fn sslmode_disable_still_connects_in_plain_tcp() {
    let url = fresh_postgres_database("tls_disable").await;
    let sink = PostgresSink::connect(&with_params(&url, None, "sslmode=disable"))
        .await
        .unwrap();
    assert_eq!(tls_version(&sink).await, Value::Null);
    sink.write_batch(&playbook_rows()).await.unwrap();
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    test_ca();
    let url = fresh_postgres_database("tls_wrong_ca").await;
    let dir = tempfile::tempdir().unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other_ca, params.self_signed(&key).unwrap().pem()).unwrap();

    for mode in ["require", "verify-full", "prefer"] {
        let shown = refusal(
            PostgresSink::connect(&with_params(
                &url,
                None,
                &format!("sslmode={mode}&sslrootcert={}", other_ca.display()),
            ))
            .await,
        );
        assert!(
            shown.contains("TLS with PostgreSQL server 127.0.0.1 failed")
                && shown.contains(&format!(
                    "does not verify against the CA file {}",
                    other_ca.display()
                ))
                && shown.contains("UnknownIssuer")
                && shown.contains(&format!("sslmode={mode}")),
            "sslmode={mode}: {shown}"
        );
    }
}

#[tokio::test]
async fn a_private_ca_is_not_trusted_by_default() {
    test_ca();
    let url = fresh_postgres_database("tls_platform").await;
    let shown = refusal(PostgresSink::connect(&with_params(&url, None, "")).await);
    // Either the platform store is empty here, or it does not hold our test CA: both refuse
    // and both tell the operator to name a CA file.
    assert!(shown.contains("sslrootcert=/path/to/ca.pem"), "{shown}");
    assert!(shown.contains("sslmode=require, the default"), "{shown}");
}

#[tokio::test]
async fn the_host_name_is_verified() {
    let ca = test_ca();
    let url = fresh_postgres_database("tls_name").await;
    // The server certificate names 127.0.0.1 only; localhost reaches the same server.
    let shown = refusal(
        PostgresSink::connect(&with_params(
            &url,
            Some("localhost"),
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ))
        .await,
    );
    assert!(
        shown.contains("TLS with PostgreSQL server localhost failed")
            && shown.contains("not valid for this host name"),
        "{shown}"
    );
}

#[tokio::test]
async fn an_unreadable_ca_file_is_a_clear_error() {
    test_ca();
    let url = fresh_postgres_database("tls_no_file").await;
    let shown = refusal(
        PostgresSink::connect(&with_params(
            &url,
            None,
            "sslrootcert=/nonexistent/keybrake-ca.pem",
        ))
        .await,
    );
    assert!(
        shown.contains("cannot read sslrootcert file /nonexistent/keybrake-ca.pem"),
        "{shown}"
    );
}

// Client-certificate authentication: scripts/with-postgres.sh lets role keybrake_cert in only
// over TLS with a certificate (pg_hba `cert`) issued by KEYBRAKE_TEST_POSTGRES_CA.

const CERT_URL_ENV: &str = "KEYBRAKE_TEST_POSTGRES_CERT_URL";
const CLIENT_CERT_ENV: &str = "KEYBRAKE_TEST_POSTGRES_CLIENT_CERT";
const CLIENT_KEY_ENV: &str = "KEYBRAKE_TEST_POSTGRES_CLIENT_KEY";
const CLIENT_RSA_CERT_ENV: &str = "KEYBRAKE_TEST_POSTGRES_CLIENT_RSA_CERT";
const CLIENT_RSA_KEY_ENV: &str = "KEYBRAKE_TEST_POSTGRES_CLIENT_RSA_KEY";

fn script_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: this test needs the client-certificate PostgreSQL of \
             `scripts/with-postgres.sh cargo test -p keybrake-audit --test postgres_tls`"
        )
    })
}

/// A fresh database owned by the certificate role (so it may create the audit tables), and
/// the script's URL for that role pointed at it, minus the parameters named in `drop`, plus
/// `add`. The password is never used by `cert` auth; it is there to prove it never leaks.
async fn cert_role_database(name: &str, drop: &[&str], add: &str) -> String {
    let cert_url = script_env(CERT_URL_ENV);
    let admin_url = fresh_postgres_database(name).await;
    let (client, connection) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "ALTER DATABASE kb_audit_{name} OWNER TO keybrake_cert"
        ))
        .await
        .unwrap();

    let (base, query) = cert_url
        .split_once('?')
        .expect("the script's URL has parameters");
    let (server, _db) = base.rsplit_once('/').unwrap();
    let server = server.replacen("keybrake_cert@", &format!("keybrake_cert:{PASSWORD}@"), 1);
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|p| !drop.iter().any(|d| p.starts_with(&format!("{d}="))))
        .collect();
    if !add.is_empty() {
        params.push(add);
    }
    format!("{server}/kb_audit_{name}?{}", params.join("&"))
}

/// Who the server says we are, and the subject of the certificate we presented.
async fn session_identity(sink: &PostgresSink) -> Vec<Value> {
    sink.query(
        "SELECT current_user::text, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .remove(0)
}

async fn write_and_count(sink: &PostgresSink) {
    let rows = playbook_rows();
    assert_eq!(
        sink.write_batch(&rows).await.unwrap(),
        WriteOutcome {
            inserted: rows.len() as u64,
            duplicates: 0
        }
    );
    let count = sink
        .query("SELECT COUNT(*) FROM agent_call_audit", &[])
        .await
        .unwrap();
    assert_eq!(count[0][0], Value::Int(rows.len() as i64));
}

#[tokio::test]
async fn a_client_certificate_logs_in_as_its_role_and_writes_rows() {
    let url = cert_role_database("cert_ok", &[], "").await;
    let sink = PostgresSink::connect(&url).await.unwrap();
    assert_eq!(
        session_identity(&sink).await,
        vec![
            Value::Text("keybrake_cert".into()),
            Value::Text("/CN=keybrake_cert".into())
        ]
    );
    write_and_count(&sink).await;
}

#[tokio::test]
async fn a_sec1_ec_key_works_too() {
    let key = script_env(CLIENT_KEY_ENV);
    let dir = tempfile::tempdir().unwrap();
    let sec1 = dir.path().join("client-sec1.key");
    // The script's EC key is PKCS#8 ("PRIVATE KEY"); -traditional writes SEC1 ("EC PRIVATE KEY").
    let converted = std::process::Command::new("openssl")
        .args(["pkey", "-traditional", "-in", &key, "-out"])
        .arg(&sec1)
        .status()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): apt-get install -y openssl"));
    assert!(converted.success());
    logs_in_with_key_format(
        "cert_sec1",
        &script_env(CLIENT_CERT_ENV),
        &sec1.display().to_string(),
        "-----BEGIN EC PRIVATE KEY-----",
    )
    .await;
}

#[tokio::test]
async fn a_pkcs1_rsa_key_works_too() {
    logs_in_with_key_format(
        "cert_rsa",
        &script_env(CLIENT_RSA_CERT_ENV),
        &script_env(CLIENT_RSA_KEY_ENV),
        "-----BEGIN RSA PRIVATE KEY-----",
    )
    .await;
}

/// Logs in as the certificate role with `cert` and `key` (whose PEM starts with `label`) and
/// writes rows.
async fn logs_in_with_key_format(db: &str, cert: &str, key: &str, label: &str) {
    let pem = std::fs::read_to_string(key).unwrap();
    assert!(pem.starts_with(label), "{key} is not {label}");
    let url = cert_role_database(
        db,
        &["sslcert", "sslkey"],
        &format!("sslcert={cert}&sslkey={key}"),
    )
    .await;
    let sink = PostgresSink::connect(&url).await.unwrap();
    assert_eq!(
        session_identity(&sink).await[0],
        Value::Text("keybrake_cert".into())
    );
    write_and_count(&sink).await;
}

#[tokio::test]
async fn the_certificate_role_without_a_certificate_is_refused_by_the_server() {
    let url = cert_role_database("cert_missing", &["sslcert", "sslkey"], "").await;
    let shown = refusal(PostgresSink::connect(&url).await);
    assert!(
        shown.contains("connecting to 127.0.0.1:")
            && shown.contains("connection requires a valid client certificate"),
        "{shown}"
    );
}

#[tokio::test]
async fn a_key_that_does_not_match_the_certificate_is_a_clear_error() {
    let cert = script_env(CLIENT_CERT_ENV);
    let dir = tempfile::tempdir().unwrap();
    let other_key = dir.path().join("other.key");
    std::fs::write(
        &other_key,
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let url = cert_role_database(
        "cert_mismatch",
        &["sslkey"],
        &format!("sslkey={}", other_key.display()),
    )
    .await;
    let shown = refusal(PostgresSink::connect(&url).await);
    assert!(
        shown.contains(&format!(
            "sslkey file {} does not match the certificate in sslcert file {cert}",
            other_key.display()
        )),
        "{shown}"
    );
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "keybrake_cert");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    let (cert_file, key_file) = (dir.path().join("forged.crt"), dir.path().join("forged.key"));
    std::fs::write(&cert_file, leaf.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    let url = cert_role_database(
        "cert_other_ca",
        &["sslcert", "sslkey"],
        &format!(
            "sslcert={}&sslkey={}",
            cert_file.display(),
            key_file.display()
        ),
    )
    .await;
    let shown = refusal(PostgresSink::connect(&url).await);
    assert!(
        shown.contains(&format!(
            "the server refused the client certificate in sslcert file {} (alert UnknownCA",
            cert_file.display()
        )),
        "{shown}"
    );
}

#[tokio::test]
async fn an_unreadable_key_file_is_a_clear_error() {
    let url = cert_role_database(
        "cert_no_key",
        &["sslkey"],
        "sslkey=/nonexistent/keybrake-client.key",
    )
    .await;
    let shown = refusal(PostgresSink::connect(&url).await);
    assert!(
        shown.contains("cannot read sslkey file /nonexistent/keybrake-client.key"),
        "{shown}"
    );
}
