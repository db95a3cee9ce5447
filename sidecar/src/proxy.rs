//! The request path (DESIGN.md, "Sidecar request path"): route, read the vault key, decide in
//! order, then deny in the vendor's envelope or forward with the secret swapped in, streaming
//! the response back. One audit row and one `keybrake_calls_total` increment per call.
use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use jiff::Timestamp;
use keybrake_api::{
    TokenHash, Usd, Vendor, Verdict,
    audit::{AuditRow, CostSource},
};

use crate::{
    audit::{AuditSink, new_row_id},
    body::{
        BodyError, ObservedBody, ProxyBody, ResponseCapture, StreamEnd, StreamObserver, full,
        read_bounded,
    },
    decide::{self, Denied},
    forward::{VERDICT_HEADER_NAME, clean_response_headers, to_upstream_request_headers},
    ledger::{Reservation, SpendLedger},
    metrics::Metrics,
    path::{checked_path, split_vendor_prefix},
    pricing::Prices,
    store::{KeyEntry, PolicyStore},
    upstream_pool::{SendError, UpstreamPool},
    vendors::{
        Operation, Preflight, RequestView, ResponseView, VendorModule, extract_credential,
        module_for, upstream_authorization,
    },
};

/// Size and time bounds of the request path.
#[derive(Debug, Clone)]
pub struct ProxyLimits {
    pub max_body_bytes: usize,
    /// Slow clients: the whole request body must arrive within this.
    pub body_read_timeout: Duration,
    /// Connect + upstream response headers.
    pub upstream_header_timeout: Duration,
    /// Longest pause between two response chunks.
    pub upstream_idle_timeout: Duration,
    /// Whole call, streamed body included.
    pub upstream_total_timeout: Duration,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        ProxyLimits {
            max_body_bytes: 1 << 20,
            body_read_timeout: Duration::from_secs(30),
            upstream_header_timeout: Duration::from_secs(60),
            upstream_idle_timeout: Duration::from_secs(120),
            upstream_total_timeout: Duration::from_secs(600),
        }
    }
}

/// A refused request's unread body is read and discarded up to this many bytes, so that the
/// agent's keep-alive connection survives the refusal; a longer body is dropped and hyper closes
/// the connection instead of reading it all.
pub const REFUSED_BODY_DRAIN_BYTES: u64 = 64 * 1024;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Port 15001: `/{vendor}/…`.
    Prefixed,
    /// A vendor's own port: the path is the vendor's path.
    Vendor(Vendor),
}

pub struct Proxy {
    pub store: Arc<PolicyStore>,
    pub upstream: UpstreamPool,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<dyn AuditSink>,
    pub ledger: Arc<dyn SpendLedger>,
    pub limits: ProxyLimits,
    pub pod: Option<String>,
    /// Price and rate tables for cost parsing and pre-flight reservations.
    pub prices: Arc<Prices>,
}

/// What is known about a call so far, for its audit row and metrics.
struct Call {
    started_at: Timestamp,
    clock: tokio::time::Instant,
    vendor: Option<Vendor>,
    method: Method,
    entry: Option<Arc<KeyEntry>>,
    operation: Option<&'static str>,
    /// Audit-only fields: filled only when the audit sink takes rows.
    template: Option<String>,
    customer: Option<String>,
    estimate: Option<Usd>,
}

impl Proxy {
    pub async fn handle(
        self: Arc<Self>,
        route: Route,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let (mut parts, body) = req.into_parts();
        let mut call = Call {
            started_at: Timestamp::now(),
            clock: tokio::time::Instant::now(),
            vendor: None,
            method: parts.method.clone(),
            entry: None,
            operation: None,
            template: None,
            customer: None,
            estimate: None,
        };
        // The body stays here until the decision needs it, so a refusal can still drain it.
        let mut unread = Some(body);
        Ok(
            match self
                .decide_and_forward(route, &mut parts, &mut unread, &mut call)
                .await
            {
                Ok(response) => response,
                Err(refusal) => {
                    if let Some(body) = unread {
                        drain_refused_body(body, self.limits.body_read_timeout);
                    }
                    self.refuse(&call, refusal)
                }
            },
        )
    }

    async fn decide_and_forward(
        self: &Arc<Self>,
        route: Route,
        parts: &mut http::request::Parts,
        unread: &mut Option<Incoming>,
        call: &mut Call,
    ) -> Result<Response<ProxyBody>, Refusal> {
        // 1. Never an open proxy: origin-form targets only, no CONNECT.
        if parts.method == Method::CONNECT {
            return Err(Refusal::protocol(
                StatusCode::METHOD_NOT_ALLOWED,
                "connect_refused",
            ));
        }
        let uri = &parts.uri;
        if uri.scheme().is_some() || uri.authority().is_some() {
            return Err(Refusal::protocol(
                StatusCode::BAD_REQUEST,
                "absolute_form_refused",
            ));
        }
        let wants_rows = self.audit.wants_rows();
        let (vendor, path) = match route {
            Route::Vendor(v) => (v, uri.path()),
            Route::Prefixed => split_vendor_prefix(uri.path())
                .map_err(|_| Refusal::protocol(StatusCode::NOT_FOUND, "unknown_vendor_prefix"))?,
        };
        call.vendor = Some(vendor);
        let module = module_for(vendor);
        let path_check = checked_path(path);

        // 2. The vault key, from the vendor's own slot; only its hash is looked up.
        let credential = extract_credential(module.auth_slot(), &parts.headers)
            .map_err(|e| Refusal::policy(Denied::new(Verdict::KeyUnknown, e.reason())))?;
        let entry = self
            .store
            .lookup(&TokenHash::of(&credential.token))
            // A key is only valid on its own vendor's route, so it can never reach another upstream.
            .filter(|e| e.grant.vendor == vendor)
            .ok_or_else(|| {
                // Before the first policy arrives no key is known yet: say "try again", not
                // "your key is bad" (which SDKs treat as final).
                let denied = if self.store.is_loaded() {
                    Denied::new(Verdict::KeyUnknown, "unknown_token")
                } else {
                    Denied::new(Verdict::PolicyStale, "no_policy_loaded")
                };
                Refusal::policy(denied)
            })?;
        call.entry = Some(entry.clone());
        let grant = &entry.grant;

        // 3. Decide, in order.
        let stale_allowed = decide::check_key(grant, call.started_at, self.store.is_stale())
            .map_err(Refusal::policy)?;
        let matched = decide::check_operation(grant, module, &parts.method, path_check)
            .map_err(Refusal::policy)?;
        call.operation = matched.operation.map(|op| op.name);
        if wants_rows {
            call.template = Some(matched.template.to_owned());
        }
        let path = path_check
            .expect("check_operation refuses bad paths")
            .as_str();
        module
            .check_account(path, &grant.upstream_secret, &credential)
            .map_err(|reason| Refusal::policy(Denied::new(Verdict::OperationDenied, reason)))?;

        let incoming = unread.take().expect("the body is read once");
        // GETs and other bodiless requests: nothing to wait for (read_bounded says the same,
        // but as a future built and polled on every call).
        let body = if http_body::Body::is_end_stream(&incoming) {
            Bytes::new()
        } else {
            read_bounded(
                incoming,
                self.limits.max_body_bytes,
                self.limits.body_read_timeout,
            )
            .await
            .map_err(Refusal::body)?
        };
        let view = RequestView {
            method: &parts.method,
            path,
            query: uri.query(),
            headers: &parts.headers,
            body: &body,
        };
        // The customer matters to an allowlist and to the audit row; without either, the
        // vendor module need not dig it out of the request.
        if wants_rows || !grant.customers.is_empty() {
            let scope = module.customer_scope(matched.operation, &view);
            if wants_rows {
                call.customer = scope.audit_value();
            }
            decide::check_customers(grant, &scope).map_err(Refusal::policy)?;
        }
        if let Some(per_minute) = grant.limits.calls_per_minute {
            let mut bucket = entry.runtime.rate.lock().unwrap_or_else(|e| e.into_inner());
            if !bucket.try_take(per_minute, std::time::Instant::now()) {
                return Err(Refusal::policy(Denied::new(
                    Verdict::RateLimited,
                    "calls_per_minute",
                )));
            }
        }
        let preflight = module.preflight(matched.operation, &view, &self.prices);
        call.estimate = preflight.estimate;
        decide::check_per_call(grant, Some(preflight.reserve)).map_err(Refusal::policy)?;
        // Check and hold in one step (the ledger's lock): concurrent calls cannot both fit
        // into the same remaining budget.
        let reservation = match grant.limits.daily_usd_cap {
            Some(cap) => Some(
                self.ledger
                    .reserve_waiting(&grant.id, Some(preflight.reserve), cap, call.started_at)
                    .await
                    .map_err(|_| {
                        Refusal::policy(Denied::new(Verdict::DailyCap, "daily_usd_cap"))
                    })?,
            ),
            None => None,
        };
        let upstream_body = module
            .rewrite_request(&preflight, &view)
            .unwrap_or_else(|| body.clone());
        if stale_allowed {
            self.metrics
                .stale_allowed
                .with_label_values(&[grant.id.namespace(), grant.id.name()])
                .inc();
        }

        // 4. Forward with the secret in the vendor's slot.
        let (base, target) = entry
            .upstream
            .as_ref()
            .and_then(|base| Some((base, base.target(path, uri.query())?)))
            .ok_or_else(|| {
                Refusal::upstream(
                    StatusCode::BAD_GATEWAY,
                    "bad_upstream_url",
                    reservation.clone(),
                )
            })?;
        let authorization = match &entry.upstream_authorization {
            Some(cached) => cached.clone(),
            None => upstream_authorization(module.auth_slot(), &grant.upstream_secret, &credential)
                .map_err(|_| {
                    Refusal::upstream(
                        StatusCode::BAD_GATEWAY,
                        "bad_upstream_secret",
                        reservation.clone(),
                    )
                })?,
        };
        // Assembled from parts already validated (the builder would check them again). The
        // agent's header map becomes the upstream request's (nothing reads it after this).
        let mut headers = std::mem::replace(&mut parts.headers, HeaderMap::new());
        to_upstream_request_headers(&mut headers, authorization, base.host().clone());
        let mut upstream = Request::new(Full::new(upstream_body));
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = target;
        *upstream.headers_mut() = headers;
        // Nothing reads the agent's request target any more. It points into the read buffer of
        // the agent's connection, which hyper reads again while the call waits upstream: gone
        // by then, the buffer is reused instead of replaced by a new one on every call.
        parts.uri = Uri::default();

        // One clock reading each side of the wait serves the deadline, the histogram and the
        // body's idle timer (each would read the clock again).
        let sent_at = tokio::time::Instant::now();
        let sent = tokio::time::timeout_at(
            sent_at + self.limits.upstream_header_timeout,
            self.upstream.send(base.key(), upstream),
        )
        .await;
        let answered_at = tokio::time::Instant::now();
        self.metrics
            .upstream_timer(vendor)
            .observe((answered_at - sent_at).as_secs_f64());
        let response = match sent {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                tracing::warn!(key = %grant.id, vendor = %vendor, error = %e, "upstream request failed");
                // Busy is the sidecar's own cap, not the vendor being down: told apart in the
                // audit row and metered, so an operator knows to raise the cap.
                let reason = if matches!(e, SendError::NoConnectionFree { .. }) {
                    self.metrics
                        .upstream_busy
                        .with_label_values(&[vendor.as_str()])
                        .inc();
                    "upstream_busy"
                } else {
                    "upstream_unreachable"
                };
                return Err(Refusal::upstream(
                    StatusCode::BAD_GATEWAY,
                    reason,
                    reservation,
                ));
            }
            Err(_) => {
                return Err(Refusal::upstream(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    reservation,
                ));
            }
        };

        let (mut head, upstream_body) = response.into_parts();
        clean_response_headers(&mut head.headers);
        head.headers.insert(
            VERDICT_HEADER_NAME.clone(),
            HeaderValue::from_static(Verdict::Allow.as_str()),
        );
        let row = wants_rows.then(|| {
            let request_id = module
                .request_id_header()
                .and_then(|h| head.headers.get(h))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            Box::new(self.row(
                call,
                Verdict::Allow,
                None,
                i32::from(head.status.as_u16()),
                request_id,
            ))
        });
        // A call known to cost nothing needs the response body only for its audit row
        // (customer, request id): without one, nothing is captured or parsed.
        let free = preflight.reserve == Usd::ZERO && preflight.estimate == Some(Usd::ZERO);
        let capture = if head.status.is_success() && (row.is_some() || !free) {
            ResponseCapture::new(module.capture(&preflight))
        } else {
            ResponseCapture::None
        };
        let rewrites = capture.rewrites();
        if rewrites {
            // The body the agent gets differs from the upstream's: its length is not known.
            head.headers.remove(header::CONTENT_LENGTH);
        }
        let observer = Completion {
            row,
            entry: entry.clone(),
            module,
            operation: matched.operation,
            preflight,
            capture,
            proxy: self.clone(),
            status: head.status,
            reservation,
            clock: call.clock,
        };
        self.count(call, Verdict::Allow);
        let deadline = call.clock + self.limits.upstream_total_timeout;
        let mut body = ObservedBody::new(
            answered_at,
            upstream_body,
            self.limits.upstream_idle_timeout,
            deadline,
            observer,
        );
        body.set_rewriting(rewrites);
        Ok(Response::from_parts(head, body.boxed_unsync()))
    }

    fn refuse(&self, call: &Call, refusal: Refusal) -> Response<ProxyBody> {
        let module: &dyn VendorModule = module_for(call.vendor.unwrap_or(Vendor::Custom));
        let message = refusal.denied.message();
        let denial = module.denial(refusal.status, refusal.denied.verdict, &message);
        let mut response = Response::new(full(denial.body));
        *response.status_mut() = denial.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(denial.content_type),
        );
        headers.insert(
            VERDICT_HEADER_NAME.clone(),
            HeaderValue::from_static(refusal.denied.verdict.as_str()),
        );
        for (name, value) in denial.headers {
            headers.insert(*name, HeaderValue::from_static(value));
        }
        if refusal.denied.verdict == Verdict::RateLimited {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(reservation) = refusal.reservation {
            // Nothing reached the vendor: no money moved.
            self.ledger.settle(reservation, Some(Usd::ZERO));
        }
        tracing::debug!(
            key = call.entry.as_ref().map(|e| e.grant.id.as_str()).unwrap_or(""),
            vendor = call.vendor.map(Vendor::as_str).unwrap_or("none"),
            verdict = %refusal.denied.verdict,
            reason = refusal.denied.reason,
            status = refusal.status.as_u16(),
            "call refused"
        );
        self.count(call, refusal.denied.verdict);
        if call.vendor.is_some() && self.audit.wants_rows() {
            self.audit.submit(self.row(
                call,
                refusal.denied.verdict,
                Some(refusal.denied.reason),
                0,
                None,
            ));
        }
        response
    }

    fn count(&self, call: &Call, verdict: Verdict) {
        match &call.entry {
            Some(e) => self.metrics.count_key_call(&e.counters, &e.grant, verdict),
            None => self.metrics.count_unkeyed_call(call.vendor, verdict),
        }
    }

    fn row(
        &self,
        call: &Call,
        verdict: Verdict,
        reason: Option<&str>,
        vendor_status: i32,
        vendor_request_id: Option<String>,
    ) -> AuditRow {
        let grant = call.entry.as_ref().map(|e| &e.grant);
        AuditRow {
            id: new_row_id(),
            started_at: call.started_at,
            duration_ms: call.clock.elapsed().as_millis() as i64,
            vault_key_id: grant.map(|g| g.id.to_string()),
            agent_name: grant.map(|g| g.agent.name.clone()),
            agent_run_id: grant.and_then(|g| g.agent.run_id.clone()),
            namespace: grant.map(|g| g.id.namespace().to_owned()),
            pod: self.pod.clone(),
            vendor: call.vendor.unwrap_or(Vendor::Custom),
            operation: call.operation.map(str::to_owned),
            method: call.method.as_str().to_owned(),
            path_template: call.template.clone(),
            policy_verdict: verdict,
            verdict_reason: reason.map(str::to_owned),
            customer_scope_id: call.customer.clone(),
            vendor_status,
            vendor_request_id,
            cost_usd_parsed: None,
            cost_source: CostSource::None,
            cap_usage_after_usd: None,
            policy_revision: grant.map(|g| g.policy_revision).unwrap_or_default(),
        }
    }
}

/// Why a call was not forwarded (or failed upstream), and with which status.
struct Refusal {
    denied: Denied,
    status: StatusCode,
    reservation: Option<Reservation>,
}

impl Refusal {
    fn policy(denied: Denied) -> Self {
        Refusal {
            status: StatusCode::from_u16(denied.verdict.http_status())
                .unwrap_or(StatusCode::FORBIDDEN),
            denied,
            reservation: None,
        }
    }

    /// Requests that are not vendor calls at all (CONNECT, absolute-form, unknown prefix): they
    /// carry `operation_denied` with a protocol status.
    fn protocol(status: StatusCode, reason: &'static str) -> Self {
        Refusal {
            denied: Denied::new(Verdict::OperationDenied, reason),
            status,
            reservation: None,
        }
    }

    fn body(error: BodyError) -> Self {
        let (status, reason) = match error {
            BodyError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            BodyError::Timeout => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            BodyError::Broken => (StatusCode::BAD_REQUEST, "body_unreadable"),
        };
        Self::protocol(status, reason)
    }

    /// The policy allowed the call but the upstream could not be reached.
    fn upstream(
        status: StatusCode,
        reason: &'static str,
        reservation: Option<Reservation>,
    ) -> Self {
        Refusal {
            denied: Denied::new(Verdict::Allow, reason),
            status,
            reservation,
        }
    }
}

/// Runs when an allowed call's response body ends: prices the call from what the response
/// said, settles the reservation, counts cost, writes the audit row.
struct Completion {
    /// `None` when the audit sink takes no rows (then none is built). Boxed: most of a
    /// `Completion`'s size otherwise, copied on every call with or without a row.
    row: Option<Box<AuditRow>>,
    entry: Arc<KeyEntry>,
    module: &'static dyn VendorModule,
    operation: Option<&'static Operation>,
    preflight: Preflight,
    /// A bounded look at the response (never the whole of a large one).
    capture: ResponseCapture,
    status: StatusCode,
    reservation: Option<Reservation>,
    /// For the price tables, the ledger, the audit sink and the metrics: one reference to hold
    /// (and count) per call instead of four.
    proxy: Arc<Proxy>,
    clock: tokio::time::Instant,
}

impl StreamObserver for Completion {
    fn on_chunk(&mut self, chunk: Bytes) -> Bytes {
        self.capture.push(chunk)
    }

    fn flush(&mut self) -> Bytes {
        self.capture.flush()
    }

    fn finish(&mut self, end: StreamEnd, _bytes: u64) {
        let priced = if self.status.is_success() {
            let json = std::mem::replace(&mut self.capture, ResponseCapture::None).into_json();
            let view = ResponseView {
                status: self.status,
                json: json.as_ref(),
            };
            self.module
                .response_cost(self.operation, &self.preflight, &view, &self.proxy.prices)
        } else {
            // The vendor refused the call: no money moved.
            crate::vendors::ResponseCost::estimated(Some(Usd::ZERO))
        };
        // An unpriceable call books its whole reservation (fail closed); a priced one releases
        // the difference (or books more, when the response says it cost more).
        let usage_after = self
            .reservation
            .take()
            .map(|r| self.proxy.ledger.settle(r, priced.cost));
        let counted = priced
            .cost
            .filter(|c| *c > Usd::ZERO && priced.source != CostSource::None);
        if let Some(cost) = counted {
            self.proxy.metrics.add_key_cost(
                &self.entry.counters,
                &self.entry.grant,
                cost.micros() as f64 / 1e6,
            );
        }
        let Some(mut row) = self.row.take() else {
            return;
        };
        row.cap_usage_after_usd = usage_after;
        if let Some(cost) = counted {
            row.cost_usd_parsed = Some(cost);
            row.cost_source = priced.source;
        }
        if row.customer_scope_id.is_none() {
            row.customer_scope_id = priced.customer;
        }
        if row.vendor_request_id.is_none() {
            row.vendor_request_id = priced.vendor_request_id;
        }
        if end != StreamEnd::Complete {
            row.verdict_reason = Some(format!("response_{end:?}").to_ascii_lowercase());
        }
        row.duration_ms = self.clock.elapsed().as_millis() as i64;
        self.proxy.audit.submit(*row);
    }
}

/// Reads and discards a refused request's body in the background (the refusal is answered at
/// once), up to [`REFUSED_BODY_DRAIN_BYTES`] and within `timeout`, so the agent can reuse its
/// keep-alive connection. A longer, slower or broken body is dropped unread: hyper then closes
/// the connection rather than read an unbounded body nobody wants.
fn drain_refused_body(body: Incoming, timeout: Duration) {
    use http_body::Body as _;
    if body.is_end_stream() || body.size_hint().lower() > REFUSED_BODY_DRAIN_BYTES {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let mut seen: u64 = 0;
        let drained = tokio::time::timeout(timeout, async {
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { return };
                if let Some(data) = frame.data_ref() {
                    seen += data.len() as u64;
                    if seen > REFUSED_BODY_DRAIN_BYTES {
                        return;
                    }
                }
            }
        });
        let _ = drained.await;
    });
}

/// Bytes as a response body (used by the admin server too).
pub fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ProxyBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use crate::vendors::CustomerScope;

    #[test]
    fn customer_scope_audit_value_joins_ids() {
        assert_eq!(
            CustomerScope::Ids(vec!["a.com".into(), "b.com".into()])
                .audit_value()
                .as_deref(),
            Some("a.com,b.com")
        );
        assert_eq!(CustomerScope::Missing.audit_value(), None);
    }
}
