//! Money as exact fixed-point micro-dollars. Never floats: caps are compared and summed exactly.
use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One millionth of a US dollar.
pub const MICROS_PER_USD: i64 = 1_000_000;

/// An amount in US dollars, held as micro-dollars. Serialized as a decimal string (`"250.00"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Usd(i64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoneyError {
    #[error(
        "{0:?} is not a decimal amount such as \"250.00\" (digits, optional point, at most 6 decimals, not negative)"
    )]
    Malformed(String),
    #[error("{0:?} is too large")]
    Overflow(String),
}

impl Usd {
    pub const ZERO: Usd = Usd(0);

    pub const fn from_micros(micros: i64) -> Self {
        Usd(micros)
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    pub const fn from_cents(cents: i64) -> Self {
        Usd(cents * 10_000)
    }

    pub fn checked_add(self, other: Usd) -> Option<Usd> {
        self.0.checked_add(other.0).map(Usd)
    }

    pub fn saturating_add(self, other: Usd) -> Usd {
        Usd(self.0.saturating_add(other.0))
    }

    pub fn saturating_sub(self, other: Usd) -> Usd {
        Usd(self.0.saturating_sub(other.0))
    }

    /// `self * numerator / denominator`, rounded up: used to price tokens and recipients
    /// pessimistically so that caps never undercount.
    pub fn mul_div_ceil(self, numerator: u64, denominator: u64) -> Usd {
        let product = i128::from(self.0) * i128::from(numerator);
        let den = i128::from(denominator.max(1));
        let q = product.div_euclid(den) + i128::from(product.rem_euclid(den) != 0);
        Usd(q.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
    }
}

impl FromStr for Usd {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || MoneyError::Malformed(s.to_owned());
        let (whole, frac) = match s.split_once('.') {
            Some((w, f)) => (w, f),
            None => (s, ""),
        };
        let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 6 {
            return Err(malformed());
        }
        if s.contains('.') && frac.is_empty() {
            return Err(malformed());
        }
        let overflow = || MoneyError::Overflow(s.to_owned());
        let whole: i64 = whole.parse().map_err(|_| overflow())?;
        let mut frac_micros: i64 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| malformed())?
        };
        for _ in frac.len()..6 {
            frac_micros *= 10;
        }
        whole
            .checked_mul(MICROS_PER_USD)
            .and_then(|w| w.checked_add(frac_micros))
            .map(Usd)
            .ok_or_else(overflow)
    }
}

impl fmt::Display for Usd {
    /// At least two decimals, more only when needed: `250.00`, `0.000150`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / MICROS_PER_USD as u64;
        let frac = abs % MICROS_PER_USD as u64;
        let mut frac_str = format!("{frac:06}");
        while frac_str.len() > 2 && frac_str.ends_with('0') {
            frac_str.pop();
        }
        write!(f, "{sign}{whole}.{frac_str}")
    }
}

impl Serialize for Usd {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Usd {
    fn schema_name() -> Cow<'static, str> {
        "Usd".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "maxLength": 20,
            "description": "US dollars as a decimal string, e.g. \"250.00\"",
            "x-kubernetes-validations": [{
                "rule": "self.matches('^[0-9]{1,12}([.][0-9]{1,6})?$')",
                "message": "must be a non-negative decimal amount in US dollars such as \"250.00\" (at most 6 decimals)"
            }]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_exactly() {
        for (text, micros, shown) in [
            ("250.00", 250_000_000, "250.00"),
            ("0.000150", 150, "0.00015"),
            ("7", 7_000_000, "7.00"),
            ("0.1", 100_000, "0.10"),
        ] {
            let usd: Usd = text.parse().unwrap();
            assert_eq!(usd.micros(), micros, "{text}");
            assert_eq!(usd.to_string(), shown);
        }
    }

    #[test]
    fn refuses_negative_and_malformed() {
        for bad in [
            "-1",
            "1.",
            ".5",
            "1.2345678",
            "1e3",
            "",
            "12,50",
            "NaN",
            "99999999999999999999",
        ] {
            assert!(bad.parse::<Usd>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn mul_div_rounds_up() {
        assert_eq!(Usd::from_micros(1).mul_div_ceil(1, 3), Usd::from_micros(1));
        assert_eq!(
            Usd::from_micros(10).mul_div_ceil(3, 2),
            Usd::from_micros(15)
        );
        assert_eq!(
            Usd::from_micros(2_500_000).mul_div_ceil(1000, 1_000_000),
            Usd::from_micros(2500)
        );
    }
}
