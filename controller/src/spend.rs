//! `status.spentTodayUsd`: each key's spend in the current UTC day, summed from the allowed audit
//! rows this replica ingests (`cost_usd_parsed`), seeded from the audit sink when this replica
//! becomes leader (a SQL sink: one `SUM` per key since UTC midnight; with the stdout sink there
//! is nothing to query and the day restarts from zero). The leader writes the totals with its own
//! field manager, coalesced (at most one write per key per flush period), in a task of its own:
//! never on the reconcile path, so it cannot delay a revocation.
//!
//! With several replicas, rows ingested by followers reach the leader's totals only through the
//! seed at the next leadership change; the written figure is therefore the larger of this total
//! and the budget book's (`status.budget`, which every replica keeps: see `budget.rs`). Also, a
//! batch stored only partly before a failure and replayed (duplicates reported by the sink) is
//! not counted again — its new rows are left out rather than risk counting a call twice.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use jiff::{Timestamp, civil::Date, tz::TimeZone};
use keybrake_api::{KeyId, Usd, VaultKey, audit::AuditRow, verdict::Verdict};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Field manager of `status.spentTodayUsd` (the reconciler's own apply never names the field).
pub const SPEND_FIELD_MANAGER: &str = "keybrake-controller-spend";

fn utc_day(t: Timestamp) -> Date {
    t.to_zoned(TimeZone::UTC).date()
}

/// Per-key totals of one UTC day. Pure: the caller passes the clock.
#[derive(Debug, Default)]
pub struct DailySpend {
    day: Option<Date>,
    per_key: HashMap<KeyId, Usd>,
    /// Keys whose total changed since the last [`DailySpend::take_changed`].
    changed: HashSet<KeyId>,
}

impl DailySpend {
    /// Moves to `now`'s UTC day: every key that spent yesterday is reset to zero (and reported
    /// once as changed, so its status shows 0); keys already at zero are forgotten.
    fn roll(&mut self, now: Timestamp) {
        let today = utc_day(now);
        if self.day == Some(today) {
            return;
        }
        if self.day.is_some() {
            self.per_key.retain(|_, spent| *spent != Usd::ZERO);
            for (key, spent) in &mut self.per_key {
                *spent = Usd::ZERO;
                self.changed.insert(key.clone());
            }
        }
        self.day = Some(today);
    }

    /// Adds a call that cost `cost` and started at `started_at`; calls of another UTC day than
    /// `now`'s (rows replayed from a spool after midnight) do not count.
    pub fn record(&mut self, key: &KeyId, cost: Usd, started_at: Timestamp, now: Timestamp) {
        self.roll(now);
        if utc_day(started_at) != utc_day(now) || cost == Usd::ZERO {
            return;
        }
        let spent = self.per_key.entry(key.clone()).or_insert(Usd::ZERO);
        *spent = spent.saturating_add(cost);
        self.changed.insert(key.clone());
    }

    /// Totals read from the sink for `now`'s day. Each key keeps the larger of its seed and what
    /// this replica counted (the seed may predate rows ingested meanwhile).
    pub fn seed(&mut self, totals: impl IntoIterator<Item = (KeyId, Usd)>, now: Timestamp) {
        self.roll(now);
        for (key, seeded) in totals {
            let spent = self.per_key.entry(key.clone()).or_insert(Usd::ZERO);
            if seeded > *spent {
                *spent = seeded;
                self.changed.insert(key);
            }
        }
    }

    /// The keys whose total changed since the last call, with their totals at `now`.
    pub fn take_changed(&mut self, now: Timestamp) -> Vec<(KeyId, Usd)> {
        self.roll(now);
        let mut out: Vec<(KeyId, Usd)> = self
            .changed
            .drain()
            .map(|k| {
                let spent = self.per_key.get(&k).copied().unwrap_or(Usd::ZERO);
                (k, spent)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Marks keys to be written again (after a failed write).
    pub fn mark_changed(&mut self, keys: impl IntoIterator<Item = KeyId>) {
        self.changed.extend(keys);
    }

    pub fn spent(&mut self, key: &KeyId, now: Timestamp) -> Usd {
        self.roll(now);
        self.per_key.get(key).copied().unwrap_or(Usd::ZERO)
    }
}

/// The shared ledger: audit ingest records, the leader's writer flushes.
#[derive(Debug, Default)]
pub struct SpendLedger(Mutex<DailySpend>);

impl SpendLedger {
    pub fn lock(&self) -> MutexGuard<'_, DailySpend> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the allowed, priced rows of a stored batch (their keys already checked against
    /// the caller's scope).
    pub fn record_rows(&self, rows: &[AuditRow], now: Timestamp) {
        let mut day = self.lock();
        for row in rows {
            if row.policy_verdict != Verdict::Allow {
                continue;
            }
            let (Some(key), Some(cost)) = (row.vault_key_id.as_deref(), row.cost_usd_parsed) else {
                continue;
            };
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            day.record(&KeyId::new(ns, name), cost, row.started_at, now);
        }
    }
}

/// The SUM per key of today's allowed rows, for [`DailySpend::seed`].
pub const SPENT_SINCE: keybrake_audit::queries::Query = keybrake_audit::queries::Query {
    title: "Spend per key since a time (controller seed for status.spentTodayUsd)",
    params: &["$1 since (UTC midnight)"],
    sql: "SELECT vault_key_id, CAST(SUM(cost_usd_micros) AS BIGINT) FROM agent_call_audit \
          WHERE started_at >= $1 AND policy_verdict = 'allow' AND vault_key_id IS NOT NULL \
          AND cost_usd_micros IS NOT NULL GROUP BY vault_key_id",
};

/// Reads today's totals from a SQL sink; `None` (logged) when the sink cannot be queried.
pub async fn query_today(
    sink: &keybrake_audit::AnySink,
    now: Timestamp,
) -> Option<Vec<(KeyId, Usd)>> {
    let midnight = utc_day(now).to_zoned(TimeZone::UTC).ok()?.timestamp();
    match sink.query(&SPENT_SINCE, &[midnight.into()]).await {
        Ok(rows) => Some(
            rows.iter()
                .filter_map(|r| {
                    let key = r.first()?.as_str()?;
                    let (ns, name) = key.split_once('/')?;
                    let micros = match r.get(1)? {
                        keybrake_audit::row::Value::Int(m) => *m,
                        _ => return None,
                    };
                    Some((KeyId::new(ns, name), Usd::from_micros(micros)))
                })
                .collect(),
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot seed spentTodayUsd from the audit sink; today restarts from this replica's rows");
            None
        }
    }
}

/// While leader: seeds from the sink (when one is given) on each gain of leadership, then
/// writes changed totals every `period`. Stops at shutdown.
pub async fn run_writer(
    client: Client,
    ledger: Arc<SpendLedger>,
    sink: Option<Arc<keybrake_audit::AnySink>>,
    mut leader: watch::Receiver<bool>,
    period: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            ok = leader.wait_for(|l| *l) => if ok.is_err() { return },
        }
        if let Some(sink) = &sink
            && let Some(totals) = query_today(sink, Timestamp::now()).await
        {
            ledger.lock().seed(totals, Timestamp::now());
        }
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while *leader.borrow() {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = leader.changed() => continue,
                _ = tick.tick() => {}
            }
            let changed = ledger.lock().take_changed(Timestamp::now());
            for (key, spent) in changed {
                if let Err(e) = write_spent(&client, &key, spent).await {
                    tracing::warn!(key = %key, error = %e, "could not write spentTodayUsd");
                    if !matches!(&e, kube::Error::Api(s) if s.code == 404) {
                        ledger.lock().mark_changed([key]);
                    }
                }
            }
        }
    }
}

async fn write_spent(client: &Client, key: &KeyId, spent: Usd) -> Result<(), kube::Error> {
    let api: Api<VaultKey> = Api::namespaced(client.clone(), key.namespace());
    // The budget book (status.budget, kept by every replica) may know of spend whose audit
    // rows another replica ingested: show the larger figure.
    let today = utc_day(Timestamp::now()).to_string();
    let book_spent = api
        .get_status(key.name())
        .await?
        .status
        .and_then(|s| s.budget)
        .filter(|b| b.day == today)
        .map(|b| crate::budget::spent(&b));
    let spent = book_spent.map_or(spent, |b| b.max(spent));
    let patch = serde_json::json!({
        "apiVersion": "keybrake.dev/v1alpha1",
        "kind": "VaultKey",
        "status": { "spentTodayUsd": spent },
    });
    api.patch_status(
        key.name(),
        &PatchParams::apply(SPEND_FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn sums_per_key_and_rolls_over_at_utc_midnight() {
        let mut day = DailySpend::default();
        let k1 = KeyId::new("agents", "k1");
        let k2 = KeyId::new("agents", "k2");
        let evening = at("2026-11-30T23:59:58Z");
        day.record(&k1, Usd::from_cents(150), evening, evening);
        day.record(&k1, Usd::from_cents(25), evening, evening);
        day.record(&k2, Usd::from_cents(1), evening, evening);
        // A row of the previous day replayed late does not count.
        day.record(
            &k2,
            Usd::from_cents(99),
            at("2026-11-29T12:00:00Z"),
            evening,
        );
        assert_eq!(day.spent(&k1, evening), Usd::from_cents(175));
        assert_eq!(
            day.take_changed(evening),
            vec![
                (k1.clone(), Usd::from_cents(175)),
                (k2.clone(), Usd::from_cents(1))
            ]
        );
        assert!(day.take_changed(evening).is_empty(), "writes are coalesced");

        // Midnight UTC: both totals drop to zero and are written once as such.
        let after = at("2026-12-01T00:00:01Z");
        assert_eq!(
            day.take_changed(after),
            vec![(k1.clone(), Usd::ZERO), (k2.clone(), Usd::ZERO)]
        );
        // A call started before midnight and ingested after it belongs to yesterday.
        day.record(&k1, Usd::from_cents(7), evening, after);
        day.record(&k2, Usd::from_cents(3), after, after);
        assert_eq!(day.spent(&k1, after), Usd::ZERO);
        assert_eq!(
            day.take_changed(after),
            vec![(k2.clone(), Usd::from_cents(3))]
        );

        // Next midnight: k1 (zero all day) is forgotten, k2 reset.
        let next = at("2026-12-02T00:00:00Z");
        assert_eq!(day.take_changed(next), vec![(k2.clone(), Usd::ZERO)]);
        let later = at("2026-12-03T00:00:00Z");
        assert!(day.take_changed(later).is_empty());
    }

    #[test]
    fn seeds_keep_the_larger_total() {
        let mut day = DailySpend::default();
        let k1 = KeyId::new("agents", "k1");
        let k2 = KeyId::new("agents", "k2");
        let now = at("2026-11-30T10:00:00Z");
        day.record(&k1, Usd::from_cents(500), now, now);
        let _ = day.take_changed(now);
        day.seed(
            [
                (k1.clone(), Usd::from_cents(200)),
                (k2.clone(), Usd::from_cents(40)),
            ],
            now,
        );
        assert_eq!(day.spent(&k1, now), Usd::from_cents(500));
        assert_eq!(day.take_changed(now), vec![(k2, Usd::from_cents(40))]);
    }

    #[test]
    fn only_allowed_priced_rows_with_a_key_count() {
        let ledger = SpendLedger::default();
        let now = at("2026-11-30T10:00:00Z");
        let base: AuditRow = serde_json::from_str(r#"{"id":"r","started_at":"2026-11-30T09:59:00Z","duration_ms":1,"vault_key_id":"agents/k1","agent_name":null,"agent_run_id":null,"namespace":"agents","pod":null,"vendor":"openai","operation":null,"method":"POST","path_template":null,"policy_verdict":"allow","verdict_reason":null,"customer_scope_id":null,"vendor_status":200,"vendor_request_id":null,"cost_usd_parsed":"0.010000","cost_source":"parsed","cap_usage_after_usd":null,"policy_revision":1}"#).unwrap();
        let mut denied = base.clone();
        denied.policy_verdict = Verdict::OperationDenied;
        let mut unkeyed = base.clone();
        unkeyed.vault_key_id = None;
        let mut unpriced = base.clone();
        unpriced.cost_usd_parsed = None;
        ledger.record_rows(&[base.clone(), denied, unkeyed, unpriced, base], now);
        assert_eq!(
            ledger.lock().spent(&KeyId::new("agents", "k1"), now),
            Usd::from_cents(2)
        );
    }

    #[tokio::test]
    async fn seed_query_sums_today_on_a_real_sqlite_sink() {
        use keybrake_audit::{AnySink, AuditSink, SinkConfig};
        let dir = tempfile::tempdir().unwrap();
        let config: SinkConfig = format!("sqlite://{}", dir.path().join("a.db").display())
            .parse()
            .unwrap();
        let sink = AnySink::open(&config).await.unwrap();
        let now = Timestamp::now();
        let row = |id: &str, key: &str, started: Timestamp, cents: i64, verdict: Verdict| {
            let mut r: AuditRow = serde_json::from_str(r#"{"id":"x","started_at":"2026-11-30T09:59:00Z","duration_ms":1,"vault_key_id":null,"agent_name":null,"agent_run_id":null,"namespace":"agents","pod":null,"vendor":"openai","operation":null,"method":"POST","path_template":null,"policy_verdict":"allow","verdict_reason":null,"customer_scope_id":null,"vendor_status":200,"vendor_request_id":null,"cost_usd_parsed":null,"cost_source":"parsed","cap_usage_after_usd":null,"policy_revision":1}"#).unwrap();
            r.id = id.into();
            r.vault_key_id = Some(key.into());
            r.started_at = started;
            r.cost_usd_parsed = Some(Usd::from_cents(cents));
            r.policy_verdict = verdict;
            r
        };
        let yesterday = now - jiff::SignedDuration::from_hours(25);
        sink.write_batch(&[
            row("1", "agents/k1", now, 100, Verdict::Allow),
            row("2", "agents/k1", now, 23, Verdict::Allow),
            row("3", "agents/k1", yesterday, 1000, Verdict::Allow),
            row("4", "agents/k1", now, 500, Verdict::DailyCap),
            row("5", "agents/k2", now, 7, Verdict::Allow),
        ])
        .await
        .unwrap();
        let mut totals = query_today(&sink, now).await.expect("sqlite is queryable");
        totals.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            totals,
            vec![
                (KeyId::new("agents", "k1"), Usd::from_cents(123)),
                (KeyId::new("agents", "k2"), Usd::from_cents(7)),
            ]
        );
    }
}
