//! Spend ledger seam for `dailyUsdCap`. The sidecar reserves a call's pre-flight estimate before
//! forwarding and settles it when the response is done. [`InMemoryLedger`] is a single-sidecar
//! implementation (UTC days); the audit/caps work replaces it with one that shares budget across
//! sidecars.
use std::{collections::HashMap, sync::Mutex};

use jiff::{Timestamp, civil::Date, tz::TimeZone};
use keybrake_api::{KeyId, Usd};

/// A pending amount held against a key's day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub key: KeyId,
    pub day: Date,
    pub amount: Usd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("daily cap reached")]
pub struct DailyCapReached;

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

    /// Releases the hold and books `actual` (the reserved amount when `None`). Returns the
    /// key's spend for that day afterwards.
    fn settle(&self, reservation: Reservation, actual: Option<Usd>) -> Usd;

    /// Spend booked (plus held) today, for status and the audit row.
    fn spent_today(&self, key: &KeyId, now: Timestamp) -> Usd;
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
}
