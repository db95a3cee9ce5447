//! Budget client (controller mode): asks the controller for budget-slice leases
//! (`POST /v1/budget`, HTTP/2 over TLS with the pod's projected ServiceAccount token, the same
//! connection settings as the policy stream) whenever the [`LeasedLedger`] queues a key, and
//! once a second lets the ledger renew, release or retire its leases. One request per key at a
//! time; a failed or slow request ends the wait of the calls behind it (they are denied
//! `daily_cap`: fail closed). The task stops by itself when the ledger is dropped.
use std::{
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use keybrake_api::{
    KeyId,
    budget::{BUDGET_PATH, BudgetGrant, BudgetRequest},
};
use tokio::sync::mpsc;

use crate::{
    ledger::{LeaseSettings, LeasedLedger},
    stream_client::{StreamClientConfig, StreamClientError, controller_client},
};

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How often leases are checked for renewal, release and expiry.
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error(transparent)]
    Stream(#[from] StreamClientError),
    #[error("controller answered {0}: {1}")]
    Status(StatusCode, String),
    #[error("undecodable grant: {0}")]
    Decode(String),
}

struct Asker {
    http: HttpsClient,
    url: String,
    config: StreamClientConfig,
    timeout: Duration,
}

/// Starts the client; returns the ledger the proxy books against.
pub fn start(
    config: &StreamClientConfig,
    settings: LeaseSettings,
) -> Result<Arc<LeasedLedger>, StreamClientError> {
    let http = controller_client(config)?;
    let asker = Arc::new(Asker {
        http,
        url: format!(
            "{}{BUDGET_PATH}",
            config.controller_url.trim_end_matches('/')
        ),
        config: config.clone(),
        // A request answers waiting calls: give up on it no later than they give up.
        timeout: settings.max_wait.max(Duration::from_millis(100)),
    });
    let (ledger, needs) = LeasedLedger::new(settings);
    let ledger = Arc::new(ledger);
    tokio::spawn(run(Arc::downgrade(&ledger), needs, asker));
    Ok(ledger)
}

async fn run(
    ledger: Weak<LeasedLedger>,
    mut needs: mpsc::UnboundedReceiver<KeyId>,
    asker: Arc<Asker>,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            need = needs.recv() => {
                // The ledger holds the sender: `None` means it was dropped.
                let Some(key) = need else { return };
                let Some(ledger) = ledger.upgrade() else { return };
                tokio::spawn(serve_key(ledger, key, asker.clone()));
            }
            _ = tick.tick() => {
                let Some(ledger) = ledger.upgrade() else { return };
                ledger.tick(Instant::now());
            }
        }
    }
}

/// Sends the key's requests one after another until the ledger has nothing more to ask.
async fn serve_key(ledger: Arc<LeasedLedger>, key: KeyId, asker: Arc<Asker>) {
    while let Some(request) = ledger.next_request(&key) {
        let sent_at = Instant::now();
        match tokio::time::timeout(asker.timeout, asker.ask(&request)).await {
            Ok(Ok(grant)) => ledger.apply_grant(&request, &grant, sent_at),
            outcome => {
                let error = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                tracing::warn!(key = %key, error, "budget request failed; calls needing a slice are denied");
                ledger.apply_failure(&key);
                return;
            }
        }
    }
}

impl Asker {
    async fn ask(&self, request: &BudgetRequest) -> Result<BudgetGrant, AskError> {
        let token = std::fs::read_to_string(&self.config.token_file).map_err(|source| {
            StreamClientError::Read {
                path: self.config.token_file.display().to_string(),
                source,
            }
        })?;
        let body = serde_json::to_vec(request).map_err(|e| AskError::Decode(e.to_string()))?;
        let http_request = Request::post(&self.url)
            .header(header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| StreamClientError::Connect(e.to_string()))?;
        let response = self
            .http
            .request(http_request)
            .await
            .map_err(|e| StreamClientError::Connect(format!("{e:?}")))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| StreamClientError::Connect(e.to_string()))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(AskError::Status(
                status,
                String::from_utf8_lossy(&bytes).trim().to_owned(),
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| AskError::Decode(e.to_string()))
    }
}
