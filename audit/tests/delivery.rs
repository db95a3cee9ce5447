//! Lossless delivery: queue → shipper → HTTP/2 TLS transport → ingest handler → SQLite, with the
//! collector killed mid-run and brought back; plus the spool's bound, order and recovery.
mod common;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keybrake_api::SecretString;
use keybrake_audit::{
    AuditSink,
    ingest::{IngestLimits, ingest_ndjson, read_body_limited},
    metrics::AuditMetrics,
    queue,
    shipper::{Shipper, ShipperConfig},
    sink::SqliteSink,
    spool::{Spool, SpoolConfig},
    transport::{HttpTransport, SinkTransport, StaticToken},
};
use prometheus::Registry;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{net::TcpSocket, task::JoinSet};

const TOKEN: &str = "test-collector-token";

struct Pki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca, &ca_key)
        .unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(leaf.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )
    .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec()];
    Pki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

/// A stand-in for the controller's `POST /v1/audit`: HTTP/2 over TLS, bearer auth, the real
/// ingest handler, a real SQLite sink. Aborting the returned task kills every connection.
async fn start_collector(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    sink: SqliteSink,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    let listener = socket.listen(64).unwrap();
    let bound = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let sink = sink.clone();
            connections.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req: Request<Incoming>| {
                    let sink = sink.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(req, &sink).await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (bound, task)
}

async fn handle(req: Request<Incoming>, sink: &SqliteSink) -> Response<Full<Bytes>> {
    let respond = |status: u16, body: String| {
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let authorized = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
    if req.uri().path() != "/v1/audit" || !authorized {
        return respond(401, "unauthorized".into());
    }
    let limits = IngestLimits::default();
    let result = match read_body_limited(req.into_body(), limits.max_body_bytes).await {
        Ok(body) => ingest_ndjson(sink, &body, &limits).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(report) => respond(200, format!("{report:?}")),
        Err(e) => respond(e.http_status(), e.to_string()),
    }
}

async fn stored_ids(sink: &SqliteSink) -> Vec<String> {
    sink.query("SELECT id FROM agent_call_audit ORDER BY rowid", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| r[0].as_str().unwrap().to_owned())
        .collect()
}

/// Polls `condition` until it holds or `what` times out.
async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn record_all(queue: &queue::AuditQueue, rows: Vec<keybrake_api::audit::AuditRow>) {
    for row in rows {
        queue.record(row).expect("queue has room");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_collector_mid_run_every_row_arrives_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(dir.path().join("collector.db"))
        .await
        .unwrap();
    let pki = pki();
    let (addr, collector) = start_collector(
        "127.0.0.1:0".parse().unwrap(),
        pki.server.clone(),
        sink.clone(),
    )
    .await;

    let registry = Registry::new();
    let metrics = AuditMetrics::register(&registry).unwrap();
    let (audit, receiver) = queue::channel(5_000, metrics.clone());
    let mut spool_config = SpoolConfig::new(dir.path().join("spool"), 64 * 1024 * 1024);
    spool_config.segment_bytes = 32 * 1024; // several segments during the outage
    let spool = Spool::open(spool_config, metrics.clone()).unwrap();
    let transport = HttpTransport::new(
        &format!("https://{addr}"),
        pki.ca_pem.as_bytes(),
        Arc::new(StaticToken(SecretString::new(TOKEN))),
        Duration::from_secs(5),
    )
    .unwrap();
    let config = ShipperConfig {
        batch_rows: 50,
        linger: Duration::from_millis(5),
        retry_min: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
    };
    let shipper = tokio::spawn(Shipper::new(transport, receiver, spool, config).run());

    // 1. Collector up.
    record_all(&audit, numbered_rows(0..300));
    wait_until("first 300 rows stored", Duration::from_secs(30), || async {
        stored_ids(&sink).await.len() == 300
    })
    .await;

    // 2. Kill it, keep calling.
    collector.abort();
    let _ = collector.await;
    record_all(&audit, numbered_rows(300..1000));
    wait_until(
        "rows spooled during the outage",
        Duration::from_secs(30),
        || async { metrics.queue_depth.get() == 0 && metrics.spool_bytes.get() > 64 * 1024 },
    )
    .await;
    assert_eq!(
        stored_ids(&sink).await.len(),
        300,
        "nothing can arrive while it is down"
    );

    // 3. Bring it back on the same address, keep calling.
    let (_, collector) = start_collector(addr, pki.server.clone(), sink.clone()).await;
    record_all(&audit, numbered_rows(1000..1200));
    wait_until("all 1200 rows stored", Duration::from_secs(60), || async {
        stored_ids(&sink).await.len() == 1200
    })
    .await;
    wait_until("spool drained", Duration::from_secs(30), || async {
        metrics.spool_bytes.get() == 0
    })
    .await;

    let expected: Vec<String> = (0..1200).map(|i| format!("row-{i:06}")).collect();
    assert_eq!(
        stored_ids(&sink).await,
        expected,
        "exactly once, in recording order"
    );
    assert_eq!(metrics.dropped_rows.get(), 0);

    drop(audit);
    let report = tokio::time::timeout(Duration::from_secs(30), shipper)
        .await
        .expect("shipper stops once the queue closes")
        .unwrap();
    assert!(report.spooled_rows >= 700, "{report:?}");
    assert!(report.failed_sends >= 1, "{report:?}");
    assert_eq!(report.rejected_rows, 0);
    assert!(
        report.sent_rows + report.replayed_rows >= 1200,
        "{report:?}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("spool")).unwrap().count(),
        0,
        "delivered segments are deleted"
    );
    collector.abort();
}

#[tokio::test]
async fn a_row_the_collector_refuses_does_not_wedge_delivery() {
    // A row the collector refuses (400: an id over its length limit): only that row is
    // dropped; its neighbours arrive.
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(dir.path().join("collector.db"))
        .await
        .unwrap();
    let pki = pki();
    let (addr, collector) = start_collector(
        "127.0.0.1:0".parse().unwrap(),
        pki.server.clone(),
        sink.clone(),
    )
    .await;
    let metrics = AuditMetrics::unregistered();
    let (audit, receiver) = queue::channel(100, metrics.clone());
    let spool = Spool::open(
        SpoolConfig::new(dir.path().join("spool"), 1 << 20),
        metrics.clone(),
    )
    .unwrap();
    let transport = HttpTransport::new(
        &format!("https://{addr}"),
        pki.ca_pem.as_bytes(),
        Arc::new(StaticToken(SecretString::new(TOKEN))),
        Duration::from_secs(5),
    )
    .unwrap();
    let shipper =
        tokio::spawn(Shipper::new(transport, receiver, spool, ShipperConfig::default()).run());
    let mut rows = numbered_rows(0..9);
    rows[4].id = "x".repeat(keybrake_audit::ingest::MAX_ID_LEN + 1);
    record_all(&audit, rows);
    drop(audit);
    let report = tokio::time::timeout(Duration::from_secs(30), shipper)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.rejected_rows, 1);
    assert_eq!(metrics.dropped_rows.get(), 1);
    let ids = stored_ids(&sink).await;
    assert_eq!(ids.len(), 8);
    assert!(!ids.contains(&"row-000004".to_owned()));
    collector.abort();
}

#[tokio::test]
async fn a_wrong_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(dir.path().join("c.db")).await.unwrap();
    let (addr, collector) =
        start_collector("127.0.0.1:0".parse().unwrap(), pki().server, sink.clone()).await;
    let other_ca = pki().ca_pem;
    let transport = HttpTransport::new(
        &format!("https://{addr}"),
        other_ca.as_bytes(),
        Arc::new(StaticToken(SecretString::new(TOKEN))),
        Duration::from_secs(5),
    )
    .unwrap();
    use keybrake_audit::transport::Transport;
    let err = transport.send(&numbered_rows(0..1)).await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(stored_ids(&sink).await.is_empty());
    collector.abort();
}

#[tokio::test]
async fn standalone_mode_writes_to_the_sink_directly() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(dir.path().join("standalone.db"))
        .await
        .unwrap();
    let metrics = AuditMetrics::unregistered();
    let (audit, receiver) = queue::channel(1000, metrics.clone());
    let spool = Spool::open(SpoolConfig::new(dir.path().join("spool"), 1 << 20), metrics).unwrap();
    let shipper = tokio::spawn(
        Shipper::new(
            SinkTransport(sink.clone()),
            receiver,
            spool,
            ShipperConfig::default(),
        )
        .run(),
    );
    record_all(&audit, numbered_rows(0..250));
    drop(audit);
    let report = shipper.await.unwrap();
    assert_eq!(report.sent_rows, 250);
    assert_eq!(stored_ids(&sink).await.len(), 250);
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_blocking() {
    let registry = Registry::new();
    let metrics = AuditMetrics::register(&registry).unwrap();
    let (audit, _receiver) = queue::channel(3, metrics.clone());
    let rows = numbered_rows(0..5);
    let results: Vec<_> = rows.into_iter().map(|r| audit.record(r)).collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    assert_eq!(results[4], Err(queue::RecordError::Full));
    assert_eq!(metrics.queue_depth.get(), 3);
    assert_eq!(metrics.dropped_rows.get(), 2);
}

#[test]
fn spool_bound_is_enforced_and_metered() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new();
    let metrics = AuditMetrics::register(&registry).unwrap();
    let config = SpoolConfig {
        dir: dir.path().to_owned(),
        max_bytes: 8 * 1024,
        segment_bytes: 2 * 1024,
    };
    let mut spool = Spool::open(config, metrics.clone()).unwrap();
    let outcome = spool.append(&numbered_rows(0..100)).unwrap();
    assert!(outcome.spooled > 5 && outcome.dropped > 0, "{outcome:?}");
    assert_eq!(outcome.spooled + outcome.dropped, 100);
    assert!(spool.bytes() <= 8 * 1024);
    assert_eq!(metrics.spool_bytes.get() as u64, spool.bytes());
    assert_eq!(metrics.dropped_rows.get() as usize, outcome.dropped);
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains(&format!(
            "keybrake_audit_dropped_rows_total {}",
            outcome.dropped
        )),
        "{text}"
    );
    // Still full: the next batch is dropped whole, nothing past the bound.
    let again = spool.append(&numbered_rows(100..110)).unwrap();
    assert_eq!(again.spooled, 0);

    // Replay everything kept: oldest first, then the spool is empty and its files gone.
    let mut replayed = Vec::new();
    while let Some(peeked) = spool.peek(7).unwrap() {
        replayed.extend(peeked.rows.iter().map(|r| r.id.clone()));
        spool.commit(peeked).unwrap();
    }
    let expected: Vec<String> = (0..outcome.spooled)
        .map(|i| format!("row-{i:06}"))
        .collect();
    assert_eq!(replayed, expected);
    assert!(spool.is_empty());
    assert_eq!(metrics.spool_bytes.get(), 0);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // Room again.
    assert_eq!(spool.append(&numbered_rows(200..201)).unwrap().spooled, 1);
}

#[test]
fn spool_survives_a_restart_and_skips_a_torn_line() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let metrics = AuditMetrics::unregistered();
    let config = SpoolConfig {
        dir: dir.path().to_owned(),
        max_bytes: 1 << 20,
        segment_bytes: 1024,
    };
    {
        let mut spool = Spool::open(config.clone(), metrics.clone()).unwrap();
        spool.append(&numbered_rows(0..10)).unwrap();
        spool.append(&numbered_rows(10..20)).unwrap();
    }
    // A crash mid-append leaves half a line at the end of the newest segment.
    let mut newest: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    newest.sort();
    assert!(newest.len() >= 2, "rows span several segments");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(newest.last().unwrap())
        .unwrap();
    file.write_all(b"{\"id\":\"row-torn\",\"started").unwrap();
    drop(file);

    let mut spool = Spool::open(config, metrics.clone()).unwrap();
    assert!(!spool.is_empty());
    let mut replayed = Vec::new();
    while let Some(peeked) = spool.peek(3).unwrap() {
        replayed.extend(peeked.rows.iter().map(|r| r.id.clone()));
        spool.commit(peeked).unwrap();
    }
    let expected: Vec<String> = (0..20).map(|i| format!("row-{i:06}")).collect();
    assert_eq!(replayed, expected);
    assert_eq!(metrics.dropped_rows.get(), 1, "the torn line is counted");
    assert!(spool.is_empty());
}

#[tokio::test]
async fn sink_writes_are_idempotent_for_replays() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(dir.path().join("a.db")).await.unwrap();
    let first = sink.write_batch(&numbered_rows(0..10)).await.unwrap();
    let replay = sink.write_batch(&numbered_rows(5..15)).await.unwrap();
    assert_eq!(
        (first.inserted, replay.inserted, replay.duplicates),
        (10, 5, 5)
    );
}

#[tokio::test]
async fn token_file_is_reread_and_401_is_retryable() {
    use keybrake_audit::transport::{TokenFile, Transport};
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(dir.path().join("c.db")).await.unwrap();
    let pki = pki();
    let (addr, collector) =
        start_collector("127.0.0.1:0".parse().unwrap(), pki.server, sink.clone()).await;
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, "stale-token\n").unwrap();
    let transport = HttpTransport::new(
        &format!("https://{addr}"),
        pki.ca_pem.as_bytes(),
        Arc::new(TokenFile(token_path.clone())),
        Duration::from_secs(5),
    )
    .unwrap();
    let err = transport.send(&numbered_rows(0..3)).await.unwrap_err();
    assert!(
        matches!(
            err,
            keybrake_audit::transport::TransportError::Status { status: 401, .. }
        ),
        "{err}"
    );
    assert!(
        !err.is_permanent(),
        "an auth failure is retried, not dropped"
    );
    assert!(
        !err.to_string().contains("stale-token"),
        "tokens never reach errors"
    );
    // The projected token rotates: the next request reads the new one.
    std::fs::write(&token_path, format!("{TOKEN}\n")).unwrap();
    transport.send(&numbered_rows(0..3)).await.unwrap();
    assert_eq!(stored_ids(&sink).await.len(), 3);
    collector.abort();
}
