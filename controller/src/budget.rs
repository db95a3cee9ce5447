//! `POST /v1/budget`: budget-slice leases, so several sidecars sharing one key stay within its
//! `dailyUsdCap`. Each key's leases of the UTC day live in its `status.budget` ([`BudgetBook`]).
//! Any replica may answer: it reads the VaultKey, computes the new book ([`decide`], pure) and
//! writes it back with the read resourceVersion as a precondition, retrying from a fresh read
//! when another replica (or any other status writer) got there first. Two replicas therefore
//! never hand out the same dollars, and the book survives restarts and leader changes.
//!
//! Accounting: `committed = settledUsd + Σ max(grantedUsd, usedUsd)` over the book's leases, and
//! a grant never takes `committed` past the cap. A lease's unspent headroom returns only when
//! its sidecar releases it with a final `used`; a lease whose sidecar vanished stays counted at
//! its grant (fail closed: that money is stranded for the day, never spent twice).
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use jiff::{SignedDuration, Timestamp, civil::Date, tz::TimeZone};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use keybrake_api::{
    KeyId, KeyState, Usd, VaultKey,
    budget::{BUDGET_PATH, BudgetBook, BudgetGrant, BudgetLease, BudgetRequest, MAX_LEASES},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::{
    index::{PolicyIndex, Scope},
    metrics::Metrics,
    server::{Body, IngestHandler},
};

/// Field manager of `status.budget`.
pub const BUDGET_FIELD_MANAGER: &str = "keybrake-controller-budget";

/// How leases are sized and how long they last.
#[derive(Debug, Clone, Copy)]
pub struct LeasePolicy {
    /// A lease's headroom after a grant: this share of the cap (percent)…
    pub slice_percent: u64,
    /// …but never less than this share (percent), so grants do not shrink to nothing.
    pub min_slice_percent: u64,
    /// How long a sidecar may book on a grant without renewing it.
    pub ttl: Duration,
    /// An expired, unreleased lease is folded into `settledUsd` (at its grant) this long after
    /// expiry, to keep the book small.
    pub fold_after: Duration,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        LeasePolicy {
            slice_percent: 10,
            min_slice_percent: 1,
            ttl: Duration::from_secs(60),
            fold_after: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("key {0} has no dailyUsdCap: its sidecars need no lease")]
    NoCap(KeyId),
    #[error("key {0} is not active")]
    Inactive(KeyId),
}

fn utc_day(t: Timestamp) -> Date {
    t.to_zoned(TimeZone::UTC).date()
}

fn next_midnight(t: Timestamp) -> Timestamp {
    utc_day(t)
        .tomorrow()
        .ok()
        .and_then(|d| d.to_zoned(TimeZone::UTC).ok())
        .map_or(t, |z| z.timestamp())
}

/// Money the book knows was spent: final spend of closed leases plus every open lease's
/// reported use (held calls included). A lower bound of the day's spend, like the audit total.
pub fn spent(book: &BudgetBook) -> Usd {
    book.leases
        .iter()
        .fold(book.settled_usd, |sum, l| sum.saturating_add(l.used_usd))
}

/// `status.spentTodayUsd` given the stored status and the book about to be written: the larger
/// of the two figures when both are today's.
pub fn spent_today(stored_spent: Option<Usd>, stored_day: Option<&str>, book: &BudgetBook) -> Usd {
    let from_book = spent(book);
    match stored_spent {
        Some(s) if stored_day == Some(book.day.as_str()) => s.max(from_book),
        _ => from_book,
    }
}

/// Money the book has promised: final spend of closed leases plus, for each lease, the larger
/// of its grant and its reported use.
pub fn committed(book: &BudgetBook) -> Usd {
    book.leases.iter().fold(book.settled_usd, |sum, l| {
        sum.saturating_add(l.granted_usd.max(l.used_usd))
    })
}

/// The book as a merge patch: every field spelled out, so an emptied lease list replaces the
/// stored one instead of being left alone.
fn book_patch(book: &BudgetBook) -> serde_json::Value {
    let mut value = serde_json::to_value(book).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        fields
            .entry("leases")
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    }
    value
}

fn time_of(t: Timestamp) -> Time {
    Time(t)
}

/// The new book and the answer for one request. Pure: the caller supplies the stored book, the
/// key's cap, the clock and an id for a new lease.
pub fn decide(
    stored: Option<&BudgetBook>,
    cap: Usd,
    request: &BudgetRequest,
    now: Timestamp,
    policy: &LeasePolicy,
    new_lease_id: impl FnOnce() -> String,
) -> (BudgetBook, BudgetGrant) {
    let today = utc_day(now).to_string();
    let mut book = match stored {
        Some(b) if b.day == today => b.clone(),
        _ => BudgetBook {
            day: today,
            ..BudgetBook::default()
        },
    };
    // Fold leases long expired and never released: counted at their grant, for good.
    let fold_before = now - SignedDuration::try_from(policy.fold_after).unwrap_or_default();
    let (old, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut book.leases)
        .into_iter()
        .partition(|l| l.expires_at.0 < fold_before);
    book.leases = kept;
    for lease in old {
        book.settled_usd = book
            .settled_usd
            .saturating_add(lease.granted_usd.max(lease.used_usd));
    }

    let held = request
        .lease
        .as_deref()
        .and_then(|id| book.leases.iter().position(|l| l.id == id));
    let closed = |lease: String, book: &BudgetBook| BudgetGrant {
        lease,
        granted: Usd::ZERO,
        ttl_ms: 0,
        committed: committed(book),
    };

    if let Some(i) = held {
        let lease = &mut book.leases[i];
        lease.used_usd = lease.used_usd.max(request.used);
        if request.release {
            // The sidecar stopped booking on it: its final use is spent, the rest returns.
            let lease = book.leases.remove(i);
            book.settled_usd = book.settled_usd.saturating_add(lease.used_usd);
            return (book.clone(), closed(lease.id, &book));
        }
        if lease.expires_at.0 <= now {
            // Past its expiry the sidecar no longer books on it, but its report may predate
            // its last calls: leave it counted at its grant (until released) and open anew.
            return open_lease(book, cap, request, now, policy, new_lease_id);
        }
    } else if request.release {
        // Unknown (folded, or of another day): nothing to return.
        let lease = request.lease.clone().unwrap_or_default();
        return (book.clone(), closed(lease, &book));
    }
    match held {
        Some(i) => top_up(book, i, cap, request, now, policy),
        None => open_lease(book, cap, request, now, policy, new_lease_id),
    }
}

/// Headroom a lease should have after a grant: a slice of the cap, shared fairly near the end,
/// and at least what the pending call needs.
fn target_headroom(cap: Usd, available: Usd, sharing: u64, want: Usd, policy: &LeasePolicy) -> Usd {
    let slice = cap.mul_div_ceil(policy.slice_percent, 100);
    let floor = cap.mul_div_ceil(policy.min_slice_percent, 100);
    let fair = Usd::from_micros(available.micros() / sharing.max(1) as i64);
    slice.min(fair).max(floor).max(want)
}

fn ttl_until(now: Timestamp, policy: &LeasePolicy) -> (Timestamp, u64) {
    let wanted = now + SignedDuration::try_from(policy.ttl).unwrap_or_default();
    let expires = wanted.min(next_midnight(now));
    let ms = expires.duration_since(now).as_millis().max(0) as u64;
    (expires, ms)
}

fn top_up(
    mut book: BudgetBook,
    i: usize,
    cap: Usd,
    request: &BudgetRequest,
    now: Timestamp,
    policy: &LeasePolicy,
) -> (BudgetBook, BudgetGrant) {
    let available = cap.saturating_sub(committed(&book)).max(Usd::ZERO);
    let lease = &book.leases[i];
    // A lease used past its grant has no headroom (not a negative one).
    let headroom = lease
        .granted_usd
        .saturating_sub(lease.used_usd)
        .max(Usd::ZERO);
    let sharing = book.leases.len() as u64;
    let target = target_headroom(
        cap,
        available.saturating_add(headroom),
        sharing,
        request.want,
        policy,
    );
    // Everything that is not this lease's headroom yet must come out of what is available.
    let extra = target.saturating_sub(headroom).min(available);
    let fits = headroom.saturating_add(extra) >= request.want;
    let (expires, ttl_ms) = ttl_until(now, policy);
    let lease = &mut book.leases[i];
    if fits {
        // A lease already used past its grant (a call cost more than it reserved) grows from
        // its use, so the overshoot is counted once.
        lease.granted_usd = lease.granted_usd.max(lease.used_usd).saturating_add(extra);
    }
    lease.expires_at = time_of(expires);
    let grant = BudgetGrant {
        lease: lease.id.clone(),
        granted: lease.granted_usd,
        ttl_ms,
        committed: committed(&book),
    };
    (book, grant)
}

fn open_lease(
    mut book: BudgetBook,
    cap: Usd,
    request: &BudgetRequest,
    now: Timestamp,
    policy: &LeasePolicy,
    new_lease_id: impl FnOnce() -> String,
) -> (BudgetBook, BudgetGrant) {
    let available = cap.saturating_sub(committed(&book)).max(Usd::ZERO);
    let sharing = book.leases.len() as u64 + 1;
    let target = target_headroom(cap, available, sharing, request.want, policy);
    let granted = target.min(available);
    if granted < request.want || granted == Usd::ZERO || book.leases.len() >= MAX_LEASES {
        let grant = BudgetGrant {
            lease: String::new(),
            granted: Usd::ZERO,
            ttl_ms: 0,
            committed: committed(&book),
        };
        return (book, grant);
    }
    let (expires, ttl_ms) = ttl_until(now, policy);
    let id = new_lease_id();
    book.leases.push(BudgetLease {
        id: id.clone(),
        granted_usd: granted,
        used_usd: Usd::ZERO,
        expires_at: time_of(expires),
    });
    let grant = BudgetGrant {
        lease: id,
        granted,
        ttl_ms,
        committed: committed(&book),
    };
    (book, grant)
}

/// The `POST /v1/budget` handler: scope check, then read–decide–write with a resourceVersion
/// precondition. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct BudgetService(Arc<Inner>);

struct Inner {
    client: Client,
    index: Arc<PolicyIndex>,
    policy: LeasePolicy,
    metrics: Metrics,
    /// One request per key at a time on this replica, so its own requests never race each
    /// other's writes (other replicas' are caught by the precondition).
    per_key: Mutex<HashMap<KeyId, Arc<tokio::sync::Mutex<()>>>>,
}

const MAX_WRITE_ATTEMPTS: usize = 8;

#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    Budget(#[from] BudgetError),
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("gave up after {MAX_WRITE_ATTEMPTS} conflicting writes")]
    Contended,
}

impl BudgetService {
    pub fn new(
        client: Client,
        index: Arc<PolicyIndex>,
        policy: LeasePolicy,
        metrics: Metrics,
    ) -> Self {
        BudgetService(Arc::new(Inner {
            client,
            index,
            policy,
            metrics,
            per_key: Mutex::default(),
        }))
    }

    fn key_lock(&self, key: &KeyId) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.per_key.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, m| Arc::strong_count(m) > 1);
        }
        map.entry(key.clone()).or_default().clone()
    }

    async fn grant(&self, request: &BudgetRequest) -> Result<BudgetGrant, ServeError> {
        let lock = self.key_lock(&request.key);
        let _guard = lock.lock().await;
        let api: Api<VaultKey> = Api::namespaced(self.0.client.clone(), request.key.namespace());
        for _ in 0..MAX_WRITE_ATTEMPTS {
            let vk = api.get(request.key.name()).await?;
            let cap = vk
                .spec
                .limits
                .daily_usd_cap
                .ok_or_else(|| BudgetError::NoCap(request.key.clone()))?;
            if vk.spec.state != KeyState::Active && !request.release {
                return Err(BudgetError::Inactive(request.key.clone()).into());
            }
            let stored = vk.status.as_ref().and_then(|s| s.budget.as_ref());
            let (book, grant) = decide(
                stored,
                cap,
                request,
                Timestamp::now(),
                &self.0.policy,
                || format!("{:016x}", rand::random::<u64>()),
            );
            if stored == Some(&book) {
                return Ok(grant);
            }
            let status = vk.status.as_ref();
            let shown = spent_today(
                status.and_then(|s| s.spent_today_usd),
                stored.map(|b| b.day.as_str()),
                &book,
            );
            // spentTodayUsd rides along (a follower replica writes it too: under the same
            // precondition, and only ever raised within a day).
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": vk.metadata.resource_version },
                "status": { "budget": book_patch(&book), "spentTodayUsd": shown },
            });
            match api
                .patch_status(
                    request.key.name(),
                    &PatchParams {
                        field_manager: Some(BUDGET_FIELD_MANAGER.into()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => return Ok(grant),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    self.count("conflict_retry");
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ServeError::Contended)
    }

    fn count(&self, result: &str) {
        self.0
            .metrics
            .budget_grants
            .with_label_values(&[result])
            .inc();
    }

    async fn serve(self, scope: Scope, request: Request<Incoming>) -> Response<Body> {
        let request = match read_request(request).await {
            Ok(r) => r,
            Err(res) => {
                self.count("rejected");
                return res;
            }
        };
        let key = &request.key;
        let bound = self.0.index.bound_service_account(key);
        if !may_lease(key, &scope, bound.as_deref()) {
            self.count("rejected");
            return text(StatusCode::FORBIDDEN, "key is not in the caller's scope\n");
        }
        let answer = self.grant(&request).await;
        self.count(answer_result(&request, &answer));
        match answer {
            Ok(grant) => {
                let mut res = Response::new(
                    Full::new(Bytes::from(serde_json::to_vec(&grant).unwrap_or_default())).boxed(),
                );
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                res
            }
            Err(ServeError::Budget(e)) => text(StatusCode::CONFLICT, format!("{e}\n")),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "budget request failed");
                text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"))
            }
        }
    }
}

/// The `result` label of `keybrake_controller_budget_grants_total` for one answer. `refused`:
/// the answer does not cover the pending call (no lease, or a top-up too small for `want`).
fn answer_result(
    request: &BudgetRequest,
    answer: &Result<BudgetGrant, ServeError>,
) -> &'static str {
    match answer {
        Ok(_) if request.release => "released",
        Ok(grant)
            if grant.ttl_ms == 0 || grant.granted.saturating_sub(request.used) < request.want =>
        {
            "refused"
        }
        Ok(_) => "granted",
        Err(ServeError::Budget(_)) => "rejected",
        Err(ServeError::Kube(_) | ServeError::Contended) => "error",
    }
}

/// Only keys bound to the caller's (namespace, service account) — the keys its stream
/// carries — may be leased. `bound` is the key's `spec.workload.serviceAccountName` as this
/// replica knows it (`None`: unknown key).
fn may_lease(key: &KeyId, scope: &Scope, bound: Option<&str>) -> bool {
    key.namespace() == scope.namespace && bound == Some(scope.service_account.as_str())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()).boxed());
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

impl IngestHandler for BudgetService {
    fn handle(
        &self,
        scope: Scope,
        request: Request<Incoming>,
    ) -> BoxFuture<'static, Response<Body>> {
        Box::pin(self.clone().serve(scope, request))
    }
}

/// Mounts the budget service beside the audit ingest handler on the one `IngestHandler` slot
/// of the stream server, dispatching by path.
pub struct SidecarPosts {
    pub audit: Option<Arc<dyn IngestHandler>>,
    pub budget: Arc<dyn IngestHandler>,
}

impl IngestHandler for SidecarPosts {
    fn handle(
        &self,
        scope: Scope,
        request: Request<Incoming>,
    ) -> BoxFuture<'static, Response<Body>> {
        if request.uri().path() == BUDGET_PATH {
            return self.budget.handle(scope, request);
        }
        match &self.audit {
            Some(audit) => audit.handle(scope, request),
            None => Box::pin(async {
                text(StatusCode::NOT_IMPLEMENTED, "audit ingest is not enabled\n")
            }),
        }
    }
}

async fn read_request(request: Request<Incoming>) -> Result<BudgetRequest, Response<Body>> {
    let body = Limited::new(request.into_body(), 16 * 1024)
        .collect()
        .await
        .map_err(|_| text(StatusCode::PAYLOAD_TOO_LARGE, "budget request too large\n"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        text(
            StatusCode::BAD_REQUEST,
            format!("undecodable budget request: {e}\n"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd(s: &str) -> Usd {
        s.parse().unwrap()
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn ask(lease: Option<&str>, used: &str, want: &str) -> BudgetRequest {
        BudgetRequest {
            key: KeyId::new("agents", "k"),
            lease: lease.map(str::to_owned),
            used: usd(used),
            want: usd(want),
            release: false,
        }
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("l{n}")
        }
    }

    #[test]
    fn slices_are_a_tenth_of_the_cap_and_never_exceed_it() {
        let policy = LeasePolicy::default();
        let cap = usd("100");
        let now = at("2026-12-01T10:00:00Z");
        let mut next = ids();
        let mut book = None;
        let mut grants = Vec::new();
        for _ in 0..1_000 {
            let (b, g) = decide(
                book.as_ref(),
                cap,
                &ask(None, "0", "0"),
                now,
                &policy,
                &mut next,
            );
            assert!(committed(&b) <= cap, "{b:?}");
            book = Some(b);
            grants.push(g.granted);
            if g.granted == Usd::ZERO {
                break;
            }
        }
        assert_eq!(grants[0], usd("10"), "a tenth of the cap");
        assert_eq!(
            grants.iter().fold(Usd::ZERO, |a, g| a.saturating_add(*g)),
            cap
        );
        // Near the end slices shrink (the rest is shared), down to the 1 % floor, then nothing.
        assert!(grants.iter().any(|g| *g < usd("10") && *g > Usd::ZERO));
        assert_eq!(*grants.last().unwrap(), Usd::ZERO);
        let book = book.unwrap();
        assert_eq!(committed(&book), cap);
        // A call needing more than is left is refused outright, not half-granted.
        let (_, g) = decide(
            Some(&book),
            cap,
            &ask(None, "0", "0.01"),
            now,
            &policy,
            &mut next,
        );
        assert_eq!((g.granted, g.ttl_ms), (Usd::ZERO, 0));
    }

    #[test]
    fn top_ups_refill_headroom_and_big_calls_get_what_they_need() {
        let policy = LeasePolicy::default();
        let cap = usd("100");
        let now = at("2026-12-01T10:00:00Z");
        let mut next = ids();
        let (book, g) = decide(None, cap, &ask(None, "0", "25"), now, &policy, &mut next);
        assert_eq!(
            g.granted,
            usd("25"),
            "at least the pending call's reservation"
        );
        assert_eq!(g.ttl_ms, 60_000);
        // Used 20 of 25: topping up brings headroom back to a slice (10): granted 30.
        let (book, g) = decide(
            Some(&book),
            cap,
            &ask(Some("l1"), "20", "1"),
            now,
            &policy,
            &mut next,
        );
        assert_eq!(g.lease, "l1");
        assert_eq!(g.granted, usd("30"));
        assert_eq!(committed(&book), usd("30"));
        // A report of use beyond the grant (a call cost more than it reserved) is counted.
        let (book, g) = decide(
            Some(&book),
            cap,
            &ask(Some("l1"), "33", "0"),
            now,
            &policy,
            &mut next,
        );
        assert_eq!(g.granted, usd("43"));
        assert_eq!(committed(&book), usd("43"));
    }

    #[test]
    fn release_returns_the_unspent_rest_and_vanished_leases_stay_counted() {
        let policy = LeasePolicy::default();
        let cap = usd("100");
        let t0 = at("2026-12-01T10:00:00Z");
        let mut next = ids();
        let (book, _) = decide(None, cap, &ask(None, "0", "0"), t0, &policy, &mut next);
        let (book, _) = decide(
            Some(&book),
            cap,
            &ask(None, "0", "0"),
            t0,
            &policy,
            &mut next,
        );
        assert_eq!(committed(&book), usd("20"));
        // l1 releases having spent 3: 7 returns.
        let mut release = ask(Some("l1"), "3", "0");
        release.release = true;
        let (book, g) = decide(Some(&book), cap, &release, t0, &policy, &mut next);
        assert_eq!((g.granted, g.ttl_ms), (Usd::ZERO, 0));
        assert_eq!(book.settled_usd, usd("3"));
        assert_eq!(committed(&book), usd("13"));
        // Releasing twice changes nothing.
        let (again, _) = decide(Some(&book), cap, &release, t0, &policy, &mut next);
        assert_eq!(again, book);
        // l2's sidecar vanished: after expiry its grant is still committed…
        let later = t0 + SignedDuration::from_secs(120);
        let (book, _) = decide(
            Some(&book),
            cap,
            &ask(None, "0", "0"),
            later,
            &policy,
            &mut next,
        );
        assert_eq!(committed(&book), usd("23"));
        // …and folded into settledUsd after the fold delay, still counted.
        let much_later = t0 + SignedDuration::from_secs(1_000);
        let (book, _) = decide(
            Some(&book),
            cap,
            &ask(Some("l3"), "0", "0"),
            much_later,
            &policy,
            &mut next,
        );
        // (l2 and l3, both long expired, folded at their grants; l3's late renewal opens l4.)
        assert!(book.leases.iter().all(|l| l.id != "l2" && l.id != "l3"));
        assert_eq!(book.settled_usd, usd("23"));
        assert_eq!(book.leases.len(), 1);
        assert_eq!(committed(&book), usd("33"));
    }

    #[test]
    fn a_renewal_after_expiry_opens_a_new_lease_and_keeps_the_old_counted() {
        let policy = LeasePolicy::default();
        let cap = usd("100");
        let t0 = at("2026-12-01T10:00:00Z");
        let mut next = ids();
        let (book, _) = decide(None, cap, &ask(None, "0", "0"), t0, &policy, &mut next);
        let late = t0 + SignedDuration::from_secs(61);
        let (book, g) = decide(
            Some(&book),
            cap,
            &ask(Some("l1"), "4", "0"),
            late,
            &policy,
            &mut next,
        );
        assert_eq!(g.lease, "l2");
        assert_eq!(committed(&book), usd("20"));
        assert_eq!(book.leases[0].used_usd, usd("4"));
    }

    #[test]
    fn shown_spend_is_the_larger_figure_of_the_day_and_patches_replace_leases() {
        let book = BudgetBook {
            day: "2026-12-01".into(),
            settled_usd: usd("3"),
            leases: vec![BudgetLease {
                id: "l1".into(),
                granted_usd: usd("10"),
                used_usd: usd("4"),
                expires_at: time_of(at("2026-12-01T10:00:00Z")),
            }],
        };
        assert_eq!(spent(&book), usd("7"));
        assert_eq!(
            spent_today(Some(usd("9")), Some("2026-12-01"), &book),
            usd("9")
        );
        assert_eq!(
            spent_today(Some(usd("5")), Some("2026-12-01"), &book),
            usd("7")
        );
        // Yesterday's figure does not carry over.
        assert_eq!(
            spent_today(Some(usd("90")), Some("2026-11-30"), &book),
            usd("7")
        );
        let empty = BudgetBook {
            leases: vec![],
            ..book
        };
        assert_eq!(book_patch(&empty)["leases"], serde_json::json!([]));
    }

    #[test]
    fn only_keys_in_the_callers_scope_are_leased() {
        let scope = Scope::new("agents", "refund");
        let key = KeyId::new("agents", "k");
        assert!(may_lease(&key, &scope, Some("refund")));
        assert!(
            !may_lease(&key, &scope, Some("billing")),
            "another SA's key"
        );
        assert!(
            !may_lease(&key, &scope, None),
            "a key this replica does not know"
        );
        let foreign = KeyId::new("other", "k");
        assert!(
            !may_lease(&foreign, &scope, Some("refund")),
            "another namespace"
        );
    }

    #[test]
    fn grants_and_refusals_are_counted_by_result() {
        let metrics = Metrics::new();
        let count = |result: &str| metrics.budget_grants.with_label_values(&[result]).get();
        let policy = LeasePolicy::default();
        let cap = usd("10");
        let now = at("2026-12-01T10:00:00Z");
        let mut next = ids();
        let mut answer = |book: Option<&BudgetBook>, request: &BudgetRequest| {
            let (book, grant) = decide(book, cap, request, now, &policy, &mut next);
            let result = answer_result(request, &Ok(grant));
            metrics.budget_grants.with_label_values(&[result]).inc();
            book
        };
        let want_all = ask(None, "0", "10");
        let book = answer(None, &want_all);
        assert_eq!((count("granted"), count("refused")), (1, 0));
        // The cap is all leased: a second sidecar's call is refused.
        let book = answer(Some(&book), &want_all);
        assert_eq!((count("granted"), count("refused")), (1, 1));
        // A top-up that cannot cover the pending call keeps the lease but is a refusal too.
        let book = answer(Some(&book), &ask(Some("l1"), "9", "2"));
        assert_eq!((count("granted"), count("refused")), (1, 2));
        let mut release = ask(Some("l1"), "9", "0");
        release.release = true;
        answer(Some(&book), &release);
        assert_eq!(count("released"), 1);
        assert_eq!(
            answer_result(
                &want_all,
                &Err(BudgetError::NoCap(want_all.key.clone()).into())
            ),
            "rejected"
        );
        assert_eq!(
            answer_result(&want_all, &Err(ServeError::Contended)),
            "error"
        );
        let text = metrics.encode();
        assert!(text.contains("keybrake_controller_budget_grants_total{result=\"granted\"} 1"));
        assert!(text.contains("keybrake_controller_budget_grants_total{result=\"refused\"} 2"));
    }

    #[test]
    fn leases_end_at_utc_midnight_and_a_new_day_starts_empty() {
        let policy = LeasePolicy::default();
        let cap = usd("100");
        let evening = at("2026-12-01T23:59:30Z");
        let mut next = ids();
        let (book, g) = decide(None, cap, &ask(None, "0", "0"), evening, &policy, &mut next);
        assert_eq!(g.ttl_ms, 30_000, "a lease never crosses midnight");
        assert_eq!(book.day, "2026-12-01");
        let morning = at("2026-12-02T00:00:01Z");
        let (book, g) = decide(
            Some(&book),
            cap,
            &ask(Some("l1"), "9", "0"),
            morning,
            &policy,
            &mut next,
        );
        assert_eq!(book.day, "2026-12-02");
        assert_eq!(g.lease, "l2");
        assert_eq!(committed(&book), usd("10"));
    }

    /// Several sidecars booking calls of random size against their leases, renewing, releasing
    /// and vanishing in random order: what they book never exceeds the cap.
    #[test]
    fn simulated_sidecars_never_book_past_the_cap() {
        let policy = LeasePolicy::default();
        let cap = usd("50");
        let now = at("2026-12-01T10:00:00Z");
        let mut next = ids();
        let mut book: Option<BudgetBook> = None;
        // Per sidecar: (lease id, granted, used).
        let mut sidecars: Vec<(Option<String>, Usd, Usd)> = vec![(None, Usd::ZERO, Usd::ZERO); 5];
        let mut booked = Usd::ZERO;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..5_000 {
            let s = rand(5) as usize;
            let call = Usd::from_micros((rand(3_000) as i64 + 1) * 1_000);
            let (lease, granted, used) = sidecars[s].clone();
            if lease.is_some() && used.saturating_add(call) <= granted {
                sidecars[s].2 = used.saturating_add(call);
                booked = booked.saturating_add(call);
                continue;
            }
            let mut request = ask(lease.as_deref(), &used.to_string(), &call.to_string());
            if rand(10) == 0 {
                request.release = true;
            }
            if rand(50) == 0 {
                // Vanish: forget the lease without releasing it.
                sidecars[s] = (None, Usd::ZERO, Usd::ZERO);
                continue;
            }
            let (b, g) = decide(book.as_ref(), cap, &request, now, &policy, &mut next);
            assert!(committed(&b) <= cap, "committed {} > cap", committed(&b));
            book = Some(b);
            sidecars[s] = if g.ttl_ms == 0 {
                (None, Usd::ZERO, Usd::ZERO)
            } else if Some(&g.lease) == lease.as_ref() {
                (Some(g.lease), g.granted, used)
            } else {
                (Some(g.lease), g.granted, Usd::ZERO)
            };
        }
        assert!(booked <= cap, "booked {booked} > cap {cap}");
        assert!(booked > usd("40"), "the cap was mostly usable: {booked}");
    }
}
