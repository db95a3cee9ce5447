//! Spend ledgers for `dailyUsdCap`. The sidecar reserves a call's pre-flight estimate before
//! forwarding and settles it when the response is done.
//!
//! - [`InMemoryLedger`]: the whole cap enforced by this sidecar alone (UTC days). Standalone
//!   mode, where there is no controller to share a budget with.
//! - [`LeasedLedger`]: controller mode. The controller owns each key's daily budget and leases
//!   slices of it to sidecars (`POST /v1/budget`, see `budget_client`); this sidecar books only
//!   against its unspent leased slice, asks for more before it runs out, and waits (bounded)
//!   for a slice only when it has none left. No answer in time: `daily_cap` (fail closed).
use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use jiff::{Timestamp, civil::Date, tz::TimeZone};
use keybrake_api::{
    KeyId, Usd,
    budget::{BudgetGrant, BudgetRequest},
};
use tokio::sync::{mpsc, watch};

/// A pending amount held against a key's day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub key: KeyId,
    pub day: Date,
    pub amount: Usd,
    /// The local lease it was booked on ([`LeasedLedger`]); 0 for [`InMemoryLedger`].
    pub lease: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("daily cap reached")]
pub struct DailyCapReached;

/// Why a reservation was refused, and whether waiting could change that.
#[derive(Debug)]
pub struct Shortfall {
    /// Resolves when more budget may have arrived (`None`: the refusal is final).
    pub wait: Option<BudgetWait>,
}

/// A bounded wait for the answer to a budget request already on its way.
#[derive(Debug)]
pub struct BudgetWait {
    answered: watch::Receiver<u64>,
    limit: Duration,
}

impl BudgetWait {
    /// True if an answer arrived within the limit.
    pub async fn answered(self) -> bool {
        let deadline = tokio::time::Instant::now() + self.limit;
        self.answered_by(deadline).await
    }

    async fn answered_by(mut self, deadline: tokio::time::Instant) -> bool {
        matches!(
            tokio::time::timeout_at(deadline, self.answered.changed()).await,
            Ok(Ok(()))
        )
    }
}

pub trait SpendLedger: Send + Sync {
    /// Holds `estimate` (zero when unknown) against `daily_cap` for the UTC day of `now`.
    /// Refuses when spent + held + estimate would exceed the cap, or when the cap is already
    /// used up (so calls with unknown cost stop too).
    fn reserve(
        &self,
        key: &KeyId,
        estimate: Option<Usd>,
        daily_cap: Usd,
        now: Timestamp,
    ) -> Result<Reservation, DailyCapReached>;

    /// [`SpendLedger::reserve`], saying on refusal whether waiting for budget could help.
    fn try_reserve(
        &self,
        key: &KeyId,
        estimate: Option<Usd>,
        daily_cap: Usd,
        now: Timestamp,
    ) -> Result<Reservation, Shortfall> {
        self.reserve(key, estimate, daily_cap, now)
            .map_err(|_| Shortfall { wait: None })
    }

    /// Releases the hold and books `actual` (the reserved amount when `None`). Returns the
    /// key's spend for that day afterwards (as far as this sidecar knows).
    fn settle(&self, reservation: Reservation, actual: Option<Usd>) -> Usd;

    /// Spend booked (plus held) today, for status and the audit row.
    fn spent_today(&self, key: &KeyId, now: Timestamp) -> Usd;

    /// Shutdown: gives back whatever budget this ledger holds, waiting at most `limit`.
    fn release_all(&self, limit: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let _ = limit;
        Box::pin(async {})
    }
}

impl dyn SpendLedger {
    /// Reserves, and when the budget is short only for want of a slice, waits for the slice
    /// requested on the spot (several answers may come: a refill already in flight, then the
    /// request for this call), within the first wait's limit in all.
    pub async fn reserve_waiting(
        &self,
        key: &KeyId,
        estimate: Option<Usd>,
        daily_cap: Usd,
        now: Timestamp,
    ) -> Result<Reservation, DailyCapReached> {
        let mut deadline = None;
        loop {
            match self.try_reserve(key, estimate, daily_cap, now) {
                Ok(r) => return Ok(r),
                Err(Shortfall { wait: Some(wait) }) => {
                    let by =
                        *deadline.get_or_insert_with(|| tokio::time::Instant::now() + wait.limit);
                    if !wait.answered_by(by).await {
                        return Err(DailyCapReached);
                    }
                }
                Err(Shortfall { wait: None }) => return Err(DailyCapReached),
            }
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Day {
    date: Option<Date>,
    spent: Usd,
    held: Usd,
}

#[derive(Debug, Default)]
pub struct InMemoryLedger {
    days: Mutex<HashMap<KeyId, Day>>,
}

fn utc_day(now: Timestamp) -> Date {
    now.to_zoned(TimeZone::UTC).date()
}

impl InMemoryLedger {
    pub fn new() -> Self {
        Self::default()
    }
}

impl SpendLedger for InMemoryLedger {
    fn reserve(
        &self,
        key: &KeyId,
        estimate: Option<Usd>,
        daily_cap: Usd,
        now: Timestamp,
    ) -> Result<Reservation, DailyCapReached> {
        let today = utc_day(now);
        let amount = estimate.unwrap_or(Usd::ZERO);
        let mut days = self.days.lock().unwrap_or_else(|e| e.into_inner());
        let day = days.entry(key.clone()).or_default();
        if day.date != Some(today) {
            *day = Day {
                date: Some(today),
                ..Day::default()
            };
        }
        let committed = day.spent.saturating_add(day.held);
        if committed >= daily_cap || committed.saturating_add(amount) > daily_cap {
            return Err(DailyCapReached);
        }
        day.held = day.held.saturating_add(amount);
        Ok(Reservation {
            key: key.clone(),
            day: today,
            amount,
            lease: 0,
        })
    }

    fn settle(&self, reservation: Reservation, actual: Option<Usd>) -> Usd {
        let mut days = self.days.lock().unwrap_or_else(|e| e.into_inner());
        let day = days.entry(reservation.key).or_default();
        if day.date != Some(reservation.day) {
            // The day rolled over while the call ran: the hold went with the old day.
            return day.spent.saturating_add(day.held);
        }
        day.held = day.held.saturating_sub(reservation.amount);
        day.spent = day
            .spent
            .saturating_add(actual.unwrap_or(reservation.amount));
        day.spent.saturating_add(day.held)
    }

    fn spent_today(&self, key: &KeyId, now: Timestamp) -> Usd {
        let days = self.days.lock().unwrap_or_else(|e| e.into_inner());
        match days.get(key) {
            Some(day) if day.date == Some(utc_day(now)) => day.spent.saturating_add(day.held),
            _ => Usd::ZERO,
        }
    }
}

/// How a [`LeasedLedger`] uses its leases.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// Longest a call waits for a slice when this sidecar has none left; then `daily_cap`.
    pub max_wait: Duration,
    /// Ask for more once the unspent part of a lease falls below this share (percent) of what
    /// it was right after the last grant, so the hot path rarely waits.
    pub refill_below_percent: u64,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            max_wait: Duration::from_secs(2),
            refill_below_percent: 50,
        }
    }
}

/// How long a refusal (or a failed request) stands before calls ask the controller again.
const REFUSAL_HOLD: Duration = Duration::from_secs(1);

/// A lease as this sidecar holds it.
#[derive(Debug, Clone)]
struct LocalLease {
    seq: u64,
    id: String,
    granted: Usd,
    /// Settled plus still held.
    used: Usd,
    /// `ttlMs` after the request that last renewed it was sent.
    valid_until: Instant,
    ttl: Duration,
    /// Refill when `granted - used` drops below this.
    refill_at: Usd,
    /// When the last renewal was sent: activity after it means "renew", none means "release".
    renewed_at: Instant,
}

impl LocalLease {
    fn valid(&self, now: Instant) -> bool {
        now < self.valid_until
    }

    fn headroom(&self) -> Usd {
        // Calls that cost more than they reserved can push use past the grant.
        self.granted.saturating_sub(self.used).max(Usd::ZERO)
    }
}

#[derive(Debug)]
struct KeyBudget {
    lease: Option<LocalLease>,
    /// Leases this sidecar stopped booking on, with their final use, to report.
    retired: Vec<(u64, String, Usd)>,
    /// A request for this key is queued or in flight.
    asking: bool,
    /// The largest reservation waiting for budget (zero: a refill or renewal only).
    want: Usd,
    /// Something should be asked even without a waiting call (refill, renewal).
    refresh: bool,
    /// Bumped on every answer (grant, refusal or failure): waiting calls retry or give up.
    answered: watch::Sender<u64>,
    last_activity: Instant,
    /// The controller's committed total at the last answer, minus that lease's headroom then.
    others_committed: Usd,
    /// After a refusal (or a failed request), calls needing at least this much are refused at
    /// once until then, rather than asking again at the call rate.
    refused: Option<(Usd, Instant)>,
}

impl KeyBudget {
    fn new(now: Instant) -> Self {
        KeyBudget {
            lease: None,
            retired: Vec::new(),
            asking: false,
            want: Usd::ZERO,
            refresh: false,
            answered: watch::Sender::new(0),
            last_activity: now,
            others_committed: Usd::ZERO,
            refused: None,
        }
    }

    fn known_spend(&self) -> Usd {
        let own = self.lease.as_ref().map_or(Usd::ZERO, |l| l.used);
        self.others_committed.saturating_add(own)
    }
}

/// Controller mode: books calls only against budget slices leased from the controller. The
/// HTTP side lives in `budget_client`; this type is the accounting, driven by its calls.
#[derive(Debug)]
pub struct LeasedLedger {
    keys: Mutex<HashMap<KeyId, KeyBudget>>,
    /// Keys that need a budget request (sent once per key until it is answered).
    needs: mpsc::UnboundedSender<KeyId>,
    settings: LeaseSettings,
    next_seq: AtomicU64,
}

impl LeasedLedger {
    /// The ledger and the queue of keys its budget client must ask for.
    pub fn new(settings: LeaseSettings) -> (Self, mpsc::UnboundedReceiver<KeyId>) {
        let (needs, rx) = mpsc::unbounded_channel();
        let ledger = LeasedLedger {
            keys: Mutex::default(),
            needs,
            settings,
            next_seq: AtomicU64::new(1),
        };
        (ledger, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyId, KeyBudget>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a request for `key` unless one is already queued or in flight.
    fn ask(&self, key: &KeyId, state: &mut KeyBudget) {
        if !state.asking {
            state.asking = true;
            let _ = self.needs.send(key.clone());
        }
    }

    /// The next request to send for `key`, if any; `None` also ends the client's turn for the
    /// key (atomically, so a call that needs budget just after queues it again).
    pub fn next_request(&self, key: &KeyId) -> Option<BudgetRequest> {
        let mut keys = self.lock();
        let state = keys.get_mut(key)?;
        if let Some((_, id, used)) = state.retired.first() {
            return Some(BudgetRequest {
                key: key.clone(),
                lease: Some(id.clone()),
                used: *used,
                want: Usd::ZERO,
                release: true,
            });
        }
        if state.want == Usd::ZERO && !state.refresh {
            state.asking = false;
            return None;
        }
        state.refresh = false;
        let now = Instant::now();
        let lease = state.lease.as_mut().filter(|l| l.valid(now));
        Some(BudgetRequest {
            key: key.clone(),
            lease: lease.as_ref().map(|l| l.id.clone()),
            used: lease.as_ref().map_or(Usd::ZERO, |l| l.used),
            want: state.want,
            release: false,
        })
        .inspect(|_| {
            if let Some(l) = lease {
                l.renewed_at = now;
            }
        })
    }

    /// Applies the controller's answer to `request`, sent at `sent_at`.
    pub fn apply_grant(&self, request: &BudgetRequest, grant: &BudgetGrant, sent_at: Instant) {
        let mut keys = self.lock();
        let Some(state) = keys.get_mut(&request.key) else {
            return;
        };
        if request.release {
            state
                .retired
                .retain(|(_, id, _)| Some(id) != request.lease.as_ref());
            return;
        }
        let now = Instant::now();
        let ttl = Duration::from_millis(grant.ttl_ms);
        match state.lease.as_mut() {
            Some(l) if l.id == grant.lease && grant.ttl_ms > 0 => {
                let before = l.headroom();
                l.granted = grant.granted;
                l.valid_until = sent_at + ttl;
                l.ttl = ttl;
                if l.headroom() > before {
                    l.refill_at = l
                        .headroom()
                        .mul_div_ceil(self.settings.refill_below_percent, 100);
                }
            }
            _ if grant.ttl_ms > 0 => {
                // A new lease: whatever this sidecar held before is retired and reported.
                if let Some(old) = state.lease.take() {
                    state.retired.push((old.seq, old.id, old.used));
                }
                let granted = grant.granted;
                state.lease = Some(LocalLease {
                    seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
                    id: grant.lease.clone(),
                    granted,
                    used: Usd::ZERO,
                    valid_until: sent_at + ttl,
                    ttl,
                    refill_at: granted.mul_div_ceil(self.settings.refill_below_percent, 100),
                    renewed_at: sent_at,
                });
            }
            _ => {
                // Refused: nothing (more) to book on. A lease past its time is retired.
                if let Some(old) = state.lease.take_if(|l| !l.valid(now)) {
                    state.retired.push((old.seq, old.id, old.used));
                }
            }
        }
        let headroom = state.lease.as_ref().map_or(Usd::ZERO, LocalLease::headroom);
        let own = state.lease.as_ref().map_or(Usd::ZERO, |l| l.granted);
        state.others_committed = grant.committed.saturating_sub(own.max(headroom));
        state.refused = (headroom < request.want).then(|| (request.want, now + REFUSAL_HOLD));
        state.want = Usd::ZERO;
        state.answered.send_modify(|n| *n += 1);
    }

    /// The controller could not be asked or did not answer: waiting calls give up now.
    pub fn apply_failure(&self, key: &KeyId) {
        let mut keys = self.lock();
        if let Some(state) = keys.get_mut(key) {
            state.want = Usd::ZERO;
            state.asking = false;
            state.refused = Some((Usd::ZERO, Instant::now() + REFUSAL_HOLD));
            state.answered.send_modify(|n| *n += 1);
        }
    }

    /// Housekeeping at `now`: renews leases near expiry that were used since their last
    /// renewal, releases idle ones, retires expired ones, and queues the keys to ask for.
    pub fn tick(&self, now: Instant) {
        let mut keys = self.lock();
        let mut forget = Vec::new();
        for (key, state) in keys.iter_mut() {
            if let Some(lease) = &state.lease {
                let left = lease.valid_until.saturating_duration_since(now);
                if left.is_zero() {
                    let old = state.lease.take().expect("checked");
                    state.retired.push((old.seq, old.id, old.used));
                } else if left < lease.ttl / 3 {
                    if state.last_activity > lease.renewed_at {
                        state.refresh = true;
                    } else {
                        // Idle: give the unspent rest back to the other sidecars.
                        let old = state.lease.take().expect("checked");
                        state.retired.push((old.seq, old.id, old.used));
                    }
                }
            }
            if !state.retired.is_empty() || state.refresh {
                if !state.asking {
                    state.asking = true;
                    let _ = self.needs.send(key.clone());
                }
            } else if state.lease.is_none()
                && !state.asking
                && now.duration_since(state.last_activity) > Duration::from_secs(3600)
            {
                forget.push(key.clone());
            }
        }
        for key in forget {
            keys.remove(&key);
        }
    }

    /// Every key this sidecar holds a lease on or still owes a report for.
    pub fn keys_with_leases(&self) -> Vec<KeyId> {
        self.lock()
            .iter()
            .filter(|(_, s)| s.lease.is_some() || !s.retired.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Retires every lease (shutdown): the next requests report and release them.
    pub fn retire_all(&self) {
        for state in self.lock().values_mut() {
            if let Some(old) = state.lease.take() {
                state.retired.push((old.seq, old.id, old.used));
            }
        }
    }
}

impl SpendLedger for LeasedLedger {
    fn reserve(
        &self,
        key: &KeyId,
        estimate: Option<Usd>,
        daily_cap: Usd,
        now: Timestamp,
    ) -> Result<Reservation, DailyCapReached> {
        self.try_reserve(key, estimate, daily_cap, now)
            .map_err(|_| DailyCapReached)
    }

    fn try_reserve(
        &self,
        key: &KeyId,
        estimate: Option<Usd>,
        daily_cap: Usd,
        now: Timestamp,
    ) -> Result<Reservation, Shortfall> {
        let amount = estimate.unwrap_or(Usd::ZERO);
        if amount > daily_cap {
            return Err(Shortfall { wait: None });
        }
        let instant = Instant::now();
        let mut keys = self.lock();
        let state = keys
            .entry(key.clone())
            .or_insert_with(|| KeyBudget::new(instant));
        state.last_activity = instant;
        if let Some(lease) = state.lease.as_mut().filter(|l| l.valid(instant)) {
            let headroom = lease.headroom();
            // As with the whole cap: an exhausted lease stops even calls of unknown cost.
            if headroom > Usd::ZERO && amount <= headroom {
                lease.used = lease.used.saturating_add(amount);
                let reservation = Reservation {
                    key: key.clone(),
                    day: utc_day(now),
                    amount,
                    lease: lease.seq,
                };
                if lease.headroom() < lease.refill_at {
                    state.refresh = true;
                    self.ask(key, state);
                }
                return Ok(reservation);
            }
        }
        if let Some((at_least, until)) = state.refused
            && instant < until
            && amount.max(Usd::from_micros(1)) >= at_least
        {
            return Err(Shortfall { wait: None });
        }
        state.want = state.want.max(amount).max(Usd::from_micros(1));
        let wait = BudgetWait {
            answered: state.answered.subscribe(),
            limit: self.settings.max_wait,
        };
        self.ask(key, state);
        Err(Shortfall { wait: Some(wait) })
    }

    fn settle(&self, reservation: Reservation, actual: Option<Usd>) -> Usd {
        let mut keys = self.lock();
        let Some(state) = keys.get_mut(&reservation.key) else {
            return Usd::ZERO;
        };
        let actual = actual.unwrap_or(reservation.amount);
        let rebook = |used: &mut Usd| {
            *used = used
                .saturating_sub(reservation.amount)
                .saturating_add(actual);
        };
        match state.lease.as_mut() {
            Some(l) if l.seq == reservation.lease => rebook(&mut l.used),
            _ => {
                // A retired lease not yet reported takes the correction; one already reported
                // keeps the (conservative) figure it was reported with.
                if let Some((_, _, used)) = state
                    .retired
                    .iter_mut()
                    .find(|(seq, _, _)| *seq == reservation.lease)
                {
                    rebook(used);
                }
            }
        }
        state.known_spend()
    }

    fn spent_today(&self, key: &KeyId, _now: Timestamp) -> Usd {
        self.lock()
            .get(key)
            .map_or(Usd::ZERO, KeyBudget::known_spend)
    }

    /// Retires every lease and waits (polling, bounded by `limit`) until the budget client has
    /// released them all, so their unspent rest returns to the other sidecars.
    fn release_all(&self, limit: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            self.retire_all();
            self.tick(Instant::now());
            let deadline = tokio::time::Instant::now() + limit;
            while !self.keys_with_leases().is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let left = self.keys_with_leases().len();
            if left > 0 {
                tracing::warn!(
                    keys = left,
                    "shutdown: budget leases not released in time; their rest stays committed for today"
                );
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn concurrent_reservations_never_overshoot() {
        let l = Arc::new(InMemoryLedger::new());
        let k = KeyId::new("ns", "race");
        let now = Timestamp::now();
        let cap = usd("1.00");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (l, k) = (l.clone(), k.clone());
                std::thread::spawn(move || {
                    (0..100)
                        .filter_map(|_| l.reserve(&k, Some(usd("0.01")), cap, now).ok())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let held: Vec<Reservation> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(held.len(), 100, "exactly the cap's worth is held");
        // Settling for less releases the difference for later calls.
        for r in held {
            l.settle(r, Some(usd("0.005")));
        }
        assert_eq!(l.spent_today(&k, now), usd("0.50"));
        assert!(l.reserve(&k, Some(usd("0.50")), cap, now).is_ok());
        assert!(l.reserve(&k, Some(usd("0.000001")), cap, now).is_err());
    }

    fn usd(s: &str) -> Usd {
        s.parse().unwrap()
    }

    #[test]
    fn reserves_settles_and_stops_at_the_cap() {
        let l = InMemoryLedger::new();
        let k = KeyId::new("ns", "k");
        let now = Timestamp::now();
        let r1 = l.reserve(&k, Some(usd("6")), usd("10"), now).unwrap();
        // Held money counts: 6 + 6 > 10.
        assert_eq!(
            l.reserve(&k, Some(usd("6")), usd("10"), now),
            Err(DailyCapReached)
        );
        assert_eq!(l.settle(r1, Some(usd("4"))), usd("4"));
        let r2 = l.reserve(&k, Some(usd("6")), usd("10"), now).unwrap();
        assert_eq!(l.settle(r2, None), usd("10"));
        // Exhausted: even an unpriced call stops.
        assert_eq!(l.reserve(&k, None, usd("10"), now), Err(DailyCapReached));
        assert_eq!(l.spent_today(&k, now), usd("10"));
        // A new UTC day starts from zero.
        let tomorrow = now + jiff::SignedDuration::from_hours(24);
        assert!(l.reserve(&k, None, usd("10"), tomorrow).is_ok());
    }

    fn grant(lease: &str, granted: &str, ttl_ms: u64, committed: &str) -> BudgetGrant {
        BudgetGrant {
            lease: lease.into(),
            granted: usd(granted),
            ttl_ms,
            committed: usd(committed),
        }
    }

    /// Plays the budget client for `key`: answers every queued request with `answer`.
    fn answer_all(
        l: &LeasedLedger,
        key: &KeyId,
        mut answer: impl FnMut(&BudgetRequest) -> BudgetGrant,
    ) -> Vec<BudgetRequest> {
        let mut sent = Vec::new();
        while let Some(request) = l.next_request(key) {
            let g = answer(&request);
            l.apply_grant(&request, &g, Instant::now());
            sent.push(request);
        }
        sent
    }

    #[test]
    fn books_only_against_the_leased_slice_and_refills_early() {
        let (l, mut needs) = LeasedLedger::new(LeaseSettings::default());
        let k = KeyId::new("ns", "shared");
        let now = Timestamp::now();
        let cap = usd("100");
        // No lease yet: refused, with a wait, and the key queued once.
        let short = l.try_reserve(&k, Some(usd("3")), cap, now).unwrap_err();
        assert!(short.wait.is_some());
        assert!(l.try_reserve(&k, Some(usd("1")), cap, now).is_err());
        assert_eq!(needs.try_recv().unwrap(), k);
        assert!(needs.try_recv().is_err(), "one request per key at a time");
        let sent = answer_all(&l, &k, |r| {
            assert_eq!((r.lease.as_deref(), r.want), (None, usd("3")));
            grant("L1", "10", 60_000, "10")
        });
        assert_eq!(sent.len(), 1);
        // 10 leased: 4 + 1 fit; the refill is asked for once headroom is under half.
        let r1 = l.reserve(&k, Some(usd("4")), cap, now).unwrap();
        assert!(needs.try_recv().is_err());
        let r2 = l.reserve(&k, Some(usd("2")), cap, now).unwrap();
        assert_eq!(
            needs.try_recv().unwrap(),
            k,
            "refill asked before the slice is empty"
        );
        assert!(
            l.reserve(&k, Some(usd("5")), cap, now).is_err(),
            "6 + 5 > 10"
        );
        // The refill reports what is used (held included) and renews the same lease.
        let sent = answer_all(&l, &k, |r| {
            assert_eq!(r.lease.as_deref(), Some("L1"));
            assert_eq!(r.used, usd("6"));
            grant("L1", "16", 60_000, "16")
        });
        assert_eq!(sent.len(), 1);
        // Settling for less frees headroom on the lease.
        assert_eq!(l.settle(r1, Some(usd("1"))), usd("3"));
        l.settle(r2, None);
        assert!(l.reserve(&k, Some(usd("13")), cap, now).is_ok());
        assert!(l.reserve(&k, Some(usd("0.000001")), cap, now).is_err());
        assert_eq!(l.spent_today(&k, now), usd("16"));
    }

    #[test]
    fn a_new_lease_retires_the_old_one_which_is_released_with_its_final_use() {
        let (l, _needs) = LeasedLedger::new(LeaseSettings::default());
        let k = KeyId::new("ns", "k");
        let now = Timestamp::now();
        let cap = usd("100");
        assert!(l.reserve(&k, Some(usd("1")), cap, now).is_err());
        answer_all(&l, &k, |_| grant("L1", "10", 60_000, "10"));
        let held = l.reserve(&k, Some(usd("9")), cap, now).unwrap();
        // The controller answers the refill with a new lease (the old one expired there).
        answer_all(&l, &k, |r| {
            if r.release {
                grant("L1", "0", 0, "12")
            } else {
                grant("L2", "10", 60_000, "22")
            }
        });
        // The call held on L1 settles after L1 was reported: it does not touch L2.
        l.settle(held, Some(usd("2")));
        assert!(l.reserve(&k, Some(usd("10")), cap, now).is_ok());
        // An expired lease is retired at the next tick and released with what it used.
        let (l, _needs) = LeasedLedger::new(LeaseSettings::default());
        assert!(l.reserve(&k, Some(usd("1")), cap, now).is_err());
        answer_all(&l, &k, |_| grant("L7", "5", 1, "5"));
        l.tick(Instant::now() + Duration::from_millis(5));
        let sent = answer_all(&l, &k, |r| {
            assert!(r.release);
            grant("L7", "0", 0, "0")
        });
        assert_eq!(sent[0].lease.as_deref(), Some("L7"));
        assert!(l.keys_with_leases().is_empty());
    }

    #[test]
    fn idle_leases_near_expiry_are_given_back_busy_ones_renewed() {
        let (l, _needs) = LeasedLedger::new(LeaseSettings::default());
        let (idle, busy) = (KeyId::new("ns", "idle"), KeyId::new("ns", "busy"));
        let now = Timestamp::now();
        for k in [&idle, &busy] {
            assert!(l.reserve(k, Some(usd("1")), usd("100"), now).is_err());
            answer_all(&l, k, |_| grant("L", "10", 3_000, "10"));
        }
        l.reserve(&busy, Some(usd("1")), usd("100"), now).unwrap();
        // With a third of the ttl left:
        l.tick(Instant::now() + Duration::from_millis(2_500));
        let idle_sent = answer_all(&l, &idle, |_| grant("L", "0", 0, "0"));
        assert!(idle_sent[0].release && idle_sent[0].used == Usd::ZERO);
        let busy_sent = answer_all(&l, &busy, |_| grant("L", "10", 3_000, "10"));
        assert!(!busy_sent[0].release);
        assert_eq!(busy_sent[0].used, usd("1"));
        assert_eq!(l.keys_with_leases(), vec![busy]);
    }

    #[tokio::test]
    async fn a_call_waits_for_its_slice_but_not_longer_than_the_bound() {
        let settings = LeaseSettings {
            max_wait: Duration::from_millis(200),
            ..LeaseSettings::default()
        };
        let (leased, mut needs) = LeasedLedger::new(settings);
        let leased = Arc::new(leased);
        let l: Arc<dyn SpendLedger> = leased.clone();
        let k = KeyId::new("ns", "k");
        let now = Timestamp::now();
        // A client that answers.
        let client = leased.clone();
        let answering = tokio::spawn(async move {
            let key = needs.recv().await.unwrap();
            answer_all(&client, &key, |_| grant("L1", "10", 60_000, "10"));
            needs
        });
        assert!(
            l.reserve_waiting(&k, Some(usd("2")), usd("100"), now)
                .await
                .is_ok()
        );
        let _needs = answering.await.unwrap();
        // Nobody answers the next ask: denied once the bound passes.
        let started = Instant::now();
        assert_eq!(
            l.reserve_waiting(&k, Some(usd("9")), usd("100"), now).await,
            Err(DailyCapReached)
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(190) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        // More than the whole cap never waits.
        let started = Instant::now();
        assert!(
            l.reserve_waiting(&k, Some(usd("101")), usd("100"), now)
                .await
                .is_err()
        );
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn concurrent_bookings_never_pass_the_grant() {
        let (l, _needs) = LeasedLedger::new(LeaseSettings::default());
        let l = Arc::new(l);
        let k = KeyId::new("ns", "race");
        let now = Timestamp::now();
        assert!(l.reserve(&k, Some(usd("0.01")), usd("100"), now).is_err());
        answer_all(&l, &k, |_| grant("L1", "1.00", 60_000, "1.00"));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (l, k) = (l.clone(), k.clone());
                std::thread::spawn(move || {
                    (0..100)
                        .filter(|_| l.reserve(&k, Some(usd("0.01")), usd("100"), now).is_ok())
                        .count()
                })
            })
            .collect();
        let held: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(held, 100, "exactly the lease's worth");
    }

    #[tokio::test]
    async fn a_waiting_call_outlasts_a_refill_answered_too_small_then_a_refusal_stands() {
        let (leased, _needs) = LeasedLedger::new(LeaseSettings::default());
        let leased = Arc::new(leased);
        let l: Arc<dyn SpendLedger> = leased.clone();
        let k = KeyId::new("ns", "k");
        let now = Timestamp::now();
        let cap = usd("100");
        assert!(l.reserve(&k, Some(usd("0.1")), cap, now).is_err());
        answer_all(&leased, &k, |_| grant("L1", "1.00", 60_000, "1.00"));
        // Used 0.60 of 1.00: a refill (wanting nothing in particular) goes out.
        l.reserve(&k, Some(usd("0.6")), cap, now).unwrap();
        let refill = leased.next_request(&k).expect("refill");
        assert_eq!(refill.want, Usd::ZERO);
        // A call needing 0.50 arrives while the refill is in flight.
        let waiting = {
            let (l, k) = (l.clone(), k.clone());
            tokio::spawn(async move { l.reserve_waiting(&k, Some(usd("0.5")), cap, now).await })
        };
        let wants = |want: &str| leased.lock().get(&k).is_some_and(|s| s.want == usd(want));
        for _ in 0..10_000 {
            if wants("0.5") {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(wants("0.5"), "the call registered its need");
        // The refill's answer adds nothing; the call keeps waiting for its own request.
        leased.apply_grant(&refill, &grant("L1", "1.00", 60_000, "90"), Instant::now());
        let own = loop {
            if let Some(r) = leased.next_request(&k).filter(|r| r.want == usd("0.5")) {
                break r;
            }
            tokio::task::yield_now().await;
        };
        leased.apply_grant(&own, &grant("L1", "1.50", 60_000, "90.5"), Instant::now());
        assert!(waiting.await.unwrap().is_ok());
        // A refusal stands for a moment: the next calls are refused at once, not re-asked.
        assert!(l.reserve(&k, Some(usd("0.5")), cap, now).is_err());
        let ask = leased.next_request(&k).expect("the call's request");
        leased.apply_grant(&ask, &grant("L1", "1.50", 60_000, "100"), Instant::now());
        assert!(leased.next_request(&k).is_none());
        let started = Instant::now();
        assert!(
            l.reserve_waiting(&k, Some(usd("0.5")), cap, now)
                .await
                .is_err()
        );
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(
            leased.next_request(&k).is_none(),
            "nothing asked while refused"
        );
    }

    #[tokio::test]
    async fn shutdown_releases_every_lease_with_its_use() {
        let (leased, mut needs) = LeasedLedger::new(LeaseSettings::default());
        let leased = Arc::new(leased);
        let k = KeyId::new("ns", "k");
        let now = Timestamp::now();
        assert!(leased.reserve(&k, Some(usd("1")), usd("100"), now).is_err());
        let _ = needs.recv().await;
        answer_all(&leased, &k, |_| grant("L1", "10", 60_000, "10"));
        leased.reserve(&k, Some(usd("3")), usd("100"), now).unwrap();
        // A budget client that answers releases.
        let client = leased.clone();
        let released = tokio::spawn(async move {
            let key = needs.recv().await.unwrap();
            answer_all(&client, &key, |r| {
                assert!(r.release);
                grant("L1", "0", 0, "3")
            })
        });
        leased.release_all(Duration::from_secs(5)).await;
        assert!(leased.keys_with_leases().is_empty());
        let sent = released.await.unwrap();
        assert_eq!(
            (sent[0].lease.as_deref(), sent[0].used),
            (Some("L1"), usd("3"))
        );
    }
}
