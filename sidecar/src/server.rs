//! Listeners: the prefix-routed proxy port, one port per vendor, and the admin port; graceful
//! shutdown that stops accepting and drains in-flight calls (streams included).
use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use http::{Method, Request, Response, StatusCode};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use keybrake_api::Vendor;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    audit::AuditSink,
    body::ProxyBody,
    drain::DrainGroup,
    forward::{ClientError, upstream_tls_config},
    ledger::SpendLedger,
    metrics::Metrics,
    proxy::{Proxy, ProxyLimits, Route, text_response},
    store::PolicyStore,
    upstream_pool::{PoolSettings, UpstreamPool},
};

mod head_deadline;
use head_deadline::{HeadClock, HeadDeadline};

#[derive(Debug, Clone)]
pub struct Settings {
    pub bind: IpAddr,
    /// Port of the `/{vendor}/…` listener (0 = any free port).
    pub proxy_port: u16,
    /// Per-vendor listeners (0 = any free port). Vendors not listed get none.
    pub vendor_ports: Vec<(Vendor, u16)>,
    pub admin_port: u16,
    /// Address of the admin listener (may be wider than `bind`: it serves no secrets).
    pub admin_bind: IpAddr,
    pub limits: ProxyLimits,
    /// Slow clients: the request head must arrive within this, counted from the accept or from
    /// the end of the connection's last response (so it also closes idle kept-alive connections).
    pub header_read_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_pool_idle_timeout: Duration,
    /// Connections open at once per upstream (0 = no cap; `--upstream-max-connections`).
    pub upstream_max_connections: usize,
    pub extra_ca_file: Option<std::path::PathBuf>,
    pub pod_name: Option<String>,
    /// How long shutdown waits for in-flight calls.
    pub drain_timeout: Duration,
    /// Price and rate tables (`--prices`; built-in defaults otherwise).
    pub prices: Arc<crate::pricing::Prices>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            proxy_port: 15001,
            vendor_ports: vec![
                (Vendor::Stripe, 15002),
                (Vendor::Openai, 15003),
                (Vendor::Twilio, 15004),
                (Vendor::Resend, 15005),
            ],
            admin_port: 15020,
            admin_bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            limits: ProxyLimits::default(),
            header_read_timeout: Duration::from_secs(10),
            upstream_connect_timeout: Duration::from_secs(10),
            upstream_pool_idle_timeout: Duration::from_secs(90),
            upstream_max_connections: crate::upstream_pool::DEFAULT_MAX_CONNECTIONS_PER_UPSTREAM,
            extra_ca_file: None,
            pod_name: None,
            drain_timeout: Duration::from_secs(30),
            prices: Arc::default(),
        }
    }
}

impl Settings {
    /// Every port 0: what tests use.
    pub fn ephemeral() -> Self {
        Settings {
            proxy_port: 0,
            vendor_ports: Vendor::ALL
                .into_iter()
                .filter(|v| *v != Vendor::Custom)
                .map(|v| (v, 0))
                .collect(),
            admin_port: 0,
            ..Settings::default()
        }
    }
}

/// What the proxy plugs into: the policy store (fed by the file loader or the controller
/// stream), metrics, the audit sink and the spend ledger.
pub struct Deps {
    pub store: Arc<PolicyStore>,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<dyn AuditSink>,
    pub ledger: Arc<dyn SpendLedger>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BoundAddrs {
    pub proxy: SocketAddr,
    pub vendors: Vec<(Vendor, SocketAddr)>,
    pub admin: SocketAddr,
}

impl BoundAddrs {
    pub fn vendor(&self, vendor: Vendor) -> Option<SocketAddr> {
        self.vendors
            .iter()
            .find(|(v, _)| *v == vendor)
            .map(|(_, a)| *a)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
}

pub struct Sidecar {
    addrs: BoundAddrs,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sidecar {
    /// Binds every listener and starts serving. Must run inside a Tokio runtime.
    pub async fn start(settings: &Settings, deps: Deps) -> Result<Sidecar, StartError> {
        let upstream = UpstreamPool::new(
            upstream_tls_config(settings.extra_ca_file.as_deref())?,
            PoolSettings {
                connect_timeout: settings.upstream_connect_timeout,
                idle_timeout: settings.upstream_pool_idle_timeout,
                max_idle_per_upstream: 256,
                max_connections_per_upstream: settings.upstream_max_connections,
            },
        );
        let proxy = Arc::new(Proxy {
            store: deps.store.clone(),
            upstream,
            metrics: deps.metrics.clone(),
            audit: deps.audit,
            ledger: deps.ledger,
            limits: settings.limits.clone(),
            pod: settings.pod_name.clone(),
            prices: settings.prices.clone(),
        });
        let (shutdown, _) = watch::channel(false);
        let mut http = http1::Builder::new();
        // The header read timeout is HeadDeadline's (one timer per connection); hyper's own, off
        // explicitly (it defaults to 30 s once a timer is set), would arm one per request head.
        http.timer(TokioTimer::new())
            .header_read_timeout(None::<Duration>)
            .keep_alive(true)
            // Bounds the request head (and so oversized auth headers): 431 beyond it.
            .max_buf_size(64 * 1024);

        let bind = |port: u16| {
            let addr = SocketAddr::new(settings.bind, port);
            async move {
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Bind { addr, source })
            }
        };
        let mut tasks = Vec::new();
        let drain = settings.drain_timeout;
        let head_timeout = settings.header_read_timeout;

        let listener = bind(settings.proxy_port).await?;
        let proxy_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: SocketAddr::new(settings.bind, settings.proxy_port),
            source,
        })?;
        let routes = std::iter::once((Route::Prefixed, listener));
        let mut vendor_listeners = Vec::new();
        let mut vendor_addrs = Vec::new();
        for (vendor, port) in &settings.vendor_ports {
            let l = bind(*port).await?;
            let addr = l.local_addr().map_err(|source| StartError::Bind {
                addr: SocketAddr::new(settings.bind, *port),
                source,
            })?;
            vendor_addrs.push((*vendor, addr));
            vendor_listeners.push((Route::Vendor(*vendor), l));
        }
        for (route, listener) in routes.chain(vendor_listeners) {
            let proxy = proxy.clone();
            let handler = move |req: Request<Incoming>| proxy.clone().handle(route, req);
            tasks.push(tokio::spawn(serve(
                listener,
                handler,
                http.clone(),
                shutdown.subscribe(),
                drain,
                head_timeout,
            )));
        }

        let admin_listener = bind(settings.admin_port).await?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartError::Bind {
                addr: SocketAddr::new(settings.bind, settings.admin_port),
                source,
            })?;
        let store = deps.store;
        let metrics = deps.metrics;
        let admin = move |req: Request<Incoming>| {
            let response = admin_response(&req, &store, &metrics);
            async move { Ok::<_, Infallible>(response) }
        };
        tasks.push(tokio::spawn(serve(
            admin_listener,
            admin,
            http.clone(),
            shutdown.subscribe(),
            drain,
            head_timeout,
        )));

        let addrs = BoundAddrs {
            proxy: proxy_addr,
            vendors: vendor_addrs,
            admin: admin_addr,
        };
        tracing::info!(proxy = %addrs.proxy, admin = %addrs.admin, vendors = ?addrs.vendors, "sidecar listening");
        Ok(Sidecar {
            addrs,
            shutdown,
            tasks,
        })
    }

    pub fn addrs(&self) -> &BoundAddrs {
        &self.addrs
    }

    /// Stops accepting, lets in-flight calls finish (up to the drain timeout), returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn admin_response(
    req: &Request<Incoming>,
    store: &PolicyStore,
    metrics: &Metrics,
) -> Response<ProxyBody> {
    if req.method() != Method::GET {
        return text_response(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match req.uri().path() {
        "/live" => text_response(StatusCode::OK, "text/plain", "ok\n"),
        "/ready" if store.is_loaded() => text_response(StatusCode::OK, "text/plain", "ready\n"),
        "/ready" => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "no policy loaded yet\n",
        ),
        "/metrics" => text_response(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(store),
        ),
        _ => text_response(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    http: http1::Builder,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    head_timeout: Duration,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static,
{
    let drain_group = DrainGroup::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // e.g. out of file descriptors: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let clock = HeadClock::new(tokio::time::Instant::now());
                let service = {
                    let handler = handler.clone();
                    let clock = clock.clone();
                    service_fn(move |req| clock.serve(handler(req)))
                };
                let conn = http.serve_connection(TokioIo::new(stream), service);
                let conn = drain_group.watch(HeadDeadline::new(conn, clock, head_timeout));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, drain_group.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: closing the remaining connections");
    }
}
