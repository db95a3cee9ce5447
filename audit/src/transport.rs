//! Where the shipper sends batches: the controller's `POST /v1/audit` over the authenticated
//! HTTP/2 TLS channel ([`HttpTransport`]), or, in standalone mode, a sink directly
//! ([`SinkTransport`]).
use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use keybrake_api::{SecretString, audit::AuditRow};

use crate::sink::{AuditSink, SinkError};

/// NDJSON media type of the ingest endpoint.
pub const NDJSON: &str = "application/x-ndjson";

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("audit collector unreachable: {0}")]
    Unreachable(String),
    #[error("audit collector answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("audit collector did not answer within {0:?}")]
    Timeout(Duration),
    #[error("bearer token unavailable: {0}")]
    Token(String),
    #[error("audit transport configuration: {0}")]
    Config(String),
}

impl TransportError {
    /// The collector refused the content itself (malformed or oversized): sending the same
    /// rows again can never succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            TransportError::Status {
                status: 400 | 413 | 422,
                ..
            }
        )
    }
}

/// Delivers one batch, all or nothing from the caller's point of view: on `Err` the batch is
/// spooled and sent again later (possibly in part already stored: ids make that harmless).
pub trait Transport: Send + Sync + 'static {
    fn send(&self, rows: &[AuditRow]) -> impl Future<Output = Result<(), TransportError>> + Send;
}

/// Standalone mode: the "collector" is the sink itself.
pub struct SinkTransport<S>(pub S);

impl<S: AuditSink> Transport for SinkTransport<S> {
    async fn send(&self, rows: &[AuditRow]) -> Result<(), TransportError> {
        self.0.write_batch(rows).await?;
        Ok(())
    }
}

impl<T: Transport> Transport for Arc<T> {
    fn send(&self, rows: &[AuditRow]) -> impl Future<Output = Result<(), TransportError>> + Send {
        (**self).send(rows)
    }
}

/// Supplies the bearer token for each request (re-read every time, as projected
/// ServiceAccount tokens rotate).
pub trait BearerTokenSource: Send + Sync + 'static {
    fn bearer_token(&self) -> Result<SecretString, TransportError>;
}

/// A token file, e.g. a projected ServiceAccount token.
pub struct TokenFile(pub PathBuf);

impl BearerTokenSource for TokenFile {
    fn bearer_token(&self) -> Result<SecretString, TransportError> {
        let text = std::fs::read_to_string(&self.0)
            .map_err(|e| TransportError::Token(format!("{}: {e}", self.0.display())))?;
        Ok(SecretString::new(text.trim()))
    }
}

/// A fixed token (tests, or a token handed over by another component).
pub struct StaticToken(pub SecretString);

impl BearerTokenSource for StaticToken {
    fn bearer_token(&self) -> Result<SecretString, TransportError> {
        Ok(self.0.clone())
    }
}

/// POSTs NDJSON batches to `<base>/v1/audit` over HTTP/2 + TLS, trusting only the given CA.
pub struct HttpTransport {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: http::Uri,
    tokens: Arc<dyn BearerTokenSource>,
    timeout: Duration,
}

impl HttpTransport {
    /// `base_url` like `https://keybrake-controller.keybrake.svc:8443`; `ca_pem` the PEM CA
    /// bundle that signed the controller's certificate.
    pub fn new(
        base_url: &str,
        ca_pem: &[u8],
        tokens: Arc<dyn BearerTokenSource>,
        timeout: Duration,
    ) -> Result<HttpTransport, TransportError> {
        let endpoint: http::Uri = format!("{}/v1/audit", base_url.trim_end_matches('/'))
            .parse()
            .map_err(|e| TransportError::Config(format!("base URL {base_url:?}: {e}")))?;
        if endpoint.scheme_str() != Some("https") {
            return Err(TransportError::Config(format!(
                "base URL {base_url:?} must be https://"
            )));
        }
        let mut roots = rustls::RootCertStore::empty();
        let mut reader = std::io::BufReader::new(ca_pem);
        for cert in rustls_pemfile::certs(&mut reader) {
            let cert = cert.map_err(|e| TransportError::Config(format!("CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| TransportError::Config(format!("CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(TransportError::Config("CA PEM holds no certificate".into()));
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| TransportError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http2()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Ok(HttpTransport {
            client,
            endpoint,
            tokens,
            timeout,
        })
    }
}

impl Transport for HttpTransport {
    async fn send(&self, rows: &[AuditRow]) -> Result<(), TransportError> {
        let mut body = Vec::with_capacity(rows.len() * 512);
        for row in rows {
            serde_json::to_writer(&mut body, row).expect("an AuditRow always serializes");
            body.push(b'\n');
        }
        let token = self.tokens.bearer_token()?;
        let request = http::Request::post(self.endpoint.clone())
            .header(http::header::CONTENT_TYPE, NDJSON)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", token.expose()),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| TransportError::Unreachable(error_chain(&e)))?;
            let status = response.status();
            if status.is_success() {
                return Ok(());
            }
            let body = Limited::new(response.into_body(), 4096)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            Err(TransportError::Status {
                status: status.as_u16(),
                body: body.chars().take(300).collect(),
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| TransportError::Timeout(self.timeout))?
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
