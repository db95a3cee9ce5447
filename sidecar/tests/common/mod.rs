//! Harness: the real sidecar (in-process, ephemeral ports) in front of the testkit's fake
//! vendors on loopback, plus a raw HTTP/1.1 client that sends exactly the bytes a test writes
//! (so path tricks are not "fixed" by a client library).
#![allow(dead_code)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use keybrake_api::{
    AgentRef, AllowRule, HttpMethod, KeyGrant, KeyId, KeyState, Limits, OnStale, SecretString,
    TokenHash, Vendor, audit::AuditRow, stream::PolicyApply,
};
use keybrake_sidecar::{
    Deps, Freshness, PolicyStore, Settings, Sidecar, audit::ChannelAudit, ledger::InMemoryLedger,
    metrics::Metrics, proxy::ProxyLimits,
};
use keybrake_testkit::{FakeKind, FakeVendor};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

pub const STRIPE_SECRET: &str = "sk_test_upstream_stripe";
pub const OPENAI_SECRET: &str = "sk-proj-upstream-openai";
pub const TWILIO_SECRET: &str = "AC0123456789abcdef0123456789abcdef:upstream_twilio_token";
pub const TWILIO_SID: &str = "AC0123456789abcdef0123456789abcdef";
pub const RESEND_SECRET: &str = "re_upstream_resend";

pub struct Fakes {
    pub stripe: FakeVendor,
    pub openai: FakeVendor,
    pub twilio: FakeVendor,
    pub resend: FakeVendor,
}

impl Fakes {
    pub async fn start() -> Fakes {
        Fakes {
            stripe: FakeVendor::start(FakeKind::Stripe, STRIPE_SECRET)
                .await
                .unwrap(),
            openai: FakeVendor::start(FakeKind::Openai, OPENAI_SECRET)
                .await
                .unwrap(),
            twilio: FakeVendor::start(FakeKind::Twilio, TWILIO_SECRET)
                .await
                .unwrap(),
            resend: FakeVendor::start(FakeKind::Resend, RESEND_SECRET)
                .await
                .unwrap(),
        }
    }

    pub fn get(&self, vendor: Vendor) -> &FakeVendor {
        match vendor {
            Vendor::Stripe => &self.stripe,
            Vendor::Openai => &self.openai,
            Vendor::Twilio => &self.twilio,
            Vendor::Resend => &self.resend,
            Vendor::Custom => panic!("no fake for custom"),
        }
    }

    pub fn total_requests(&self) -> usize {
        [&self.stripe, &self.openai, &self.twilio, &self.resend]
            .iter()
            .map(|f| f.request_count())
            .sum()
    }

    pub fn secret(vendor: Vendor) -> &'static str {
        match vendor {
            Vendor::Stripe => STRIPE_SECRET,
            Vendor::Openai => OPENAI_SECRET,
            Vendor::Twilio => TWILIO_SECRET,
            Vendor::Resend => RESEND_SECRET,
            Vendor::Custom => "custom",
        }
    }
}

pub fn grant(name: &str, token: &str, vendor: Vendor, base_url: &str) -> KeyGrant {
    KeyGrant {
        id: KeyId::new("agents", name),
        token_sha256: TokenHash::of(token),
        vendor,
        base_url: base_url.to_owned(),
        upstream_secret: SecretString::new(match vendor {
            Vendor::Twilio => TWILIO_SECRET,
            v => Fakes::secret(v),
        }),
        state: KeyState::Active,
        expires_at: None,
        agent: AgentRef {
            name: "test-agent".into(),
            run_id: Some("run-1".into()),
        },
        allow: vec![],
        customers: vec![],
        limits: Limits::default(),
        on_stale: OnStale::Deny,
        policy_revision: 1,
    }
}

pub fn op(name: &str) -> AllowRule {
    AllowRule {
        operation: Some(name.into()),
        method: None,
        path: None,
    }
}

pub fn route(method: HttpMethod, path: &str) -> AllowRule {
    AllowRule {
        operation: None,
        method: Some(method),
        path: Some(path.into()),
    }
}

pub struct Harness {
    pub sidecar: Option<Sidecar>,
    pub store: Arc<PolicyStore>,
    pub audit: mpsc::UnboundedReceiver<AuditRow>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub vendor_ports: Vec<(Vendor, SocketAddr)>,
}

impl Harness {
    pub async fn start(freshness: Freshness, grants: Option<Vec<KeyGrant>>) -> Harness {
        Self::start_with(freshness, grants, |_| {}).await
    }

    pub async fn start_with(
        freshness: Freshness,
        grants: Option<Vec<KeyGrant>>,
        tweak: impl FnOnce(&mut Settings),
    ) -> Harness {
        let store = Arc::new(PolicyStore::new(freshness));
        if let Some(grants) = grants {
            store.replace_all(grants, 1);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut settings = Settings::ephemeral();
        settings.limits = ProxyLimits {
            max_body_bytes: 64 * 1024,
            body_read_timeout: Duration::from_millis(500),
            ..ProxyLimits::default()
        };
        settings.header_read_timeout = Duration::from_millis(500);
        settings.drain_timeout = Duration::from_secs(10);
        tweak(&mut settings);
        let deps = Deps {
            store: store.clone(),
            metrics: Arc::new(Metrics::new()),
            audit: Arc::new(ChannelAudit(tx)),
            ledger: Arc::new(InMemoryLedger::new()),
        };
        let sidecar = Sidecar::start(&settings, deps).await.unwrap();
        let addrs = sidecar.addrs().clone();
        Harness {
            sidecar: Some(sidecar),
            store,
            audit: rx,
            proxy: addrs.proxy,
            admin: addrs.admin,
            vendor_ports: addrs.vendors,
        }
    }

    pub fn vendor_port(&self, vendor: Vendor) -> SocketAddr {
        self.vendor_ports
            .iter()
            .find(|(v, _)| *v == vendor)
            .unwrap()
            .1
    }

    /// The next audit row, waiting up to 5 s.
    pub async fn next_row(&mut self) -> AuditRow {
        tokio::time::timeout(Duration::from_secs(5), self.audit.recv())
            .await
            .expect("an audit row within 5 s")
            .expect("audit channel open")
    }
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn verdict(&self) -> &str {
        self.header("keybrake-verdict").unwrap_or("<none>")
    }
}

/// Sends `request` verbatim (it must ask for `Connection: close`) and reads the whole response.
/// `None` when the server closed the connection without a response.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Option<RawResponse> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf)).await;
    read.expect("response within 10 s").ok()?;
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> Option<RawResponse> {
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let raw_body = &buf[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(raw_body)
    } else {
        raw_body.to_vec()
    };
    Some(RawResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
    out
}

/// A well-formed request with `Connection: close` and a Content-Length.
pub fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}
