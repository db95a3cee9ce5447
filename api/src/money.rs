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
        "{0:?} is not a decimal amount such as \"250.00\" or \"-1.50\" (optional minus, digits, optional point, at most 6 decimals)"
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

    /// The inverse of `Display`: `[-]digits[.1-6 digits]`. Negative amounts are refunds and
    /// credits; caps and spend in the CRD are kept non-negative by its schema, not here.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || MoneyError::Malformed(s.to_owned());
        let overflow = || MoneyError::Overflow(s.to_owned());
        let (negative, magnitude) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (whole, frac) = match magnitude.split_once('.') {
            Some((w, f)) => (w, f),
            None => (magnitude, ""),
        };
        let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !digits(whole) || !digits(frac) || frac.len() > 6 {
            return Err(malformed());
        }
        if magnitude.contains('.') && frac.is_empty() {
            return Err(malformed());
        }
        let whole: i64 = whole.parse().map_err(|_| overflow())?;
        let mut frac_micros: i64 = if frac.is_empty() {
            0
        } else {
            frac.parse().map_err(|_| malformed())?
        };
        for _ in frac.len()..6 {
            frac_micros *= 10;
        }
        // Built on the sign's side so that i64::MIN (one more than i64::MAX) parses too.
        let whole_micros = whole.checked_mul(MICROS_PER_USD).ok_or_else(overflow)?;
        let micros = if negative {
            0i64.checked_sub(whole_micros)
                .and_then(|w| w.checked_sub(frac_micros))
        } else {
            whole_micros.checked_add(frac_micros)
        };
        micros.map(Usd).ok_or_else(overflow)
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
    fn refuses_malformed() {
        for bad in [
            "1.",
            ".5",
            "1.2345678",
            "1e3",
            "",
            "12,50",
            "NaN",
            "99999999999999999999",
            "-",
            "--1",
            "-.5",
            "-1.",
            "+1",
            "- 1",
            "1-",
            "-9223372036854.775809",
            "9223372036854.775808",
        ] {
            assert!(bad.parse::<Usd>().is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn negatives_parse() {
        for (text, micros, shown) in [
            ("-1", -1_000_000, "-1.00"),
            ("-5.25", -5_250_000, "-5.25"),
            ("-0.000001", -1, "-0.000001"),
            ("-0", 0, "0.00"),
        ] {
            let usd: Usd = text.parse().unwrap();
            assert_eq!(usd.micros(), micros, "{text}");
            assert_eq!(usd.to_string(), shown);
        }
    }

    /// Property: `Display` then `FromStr` gives back every value, over the edges and a
    /// deterministic pseudo-random sweep of the whole i64 range and of small amounts.
    #[test]
    fn display_and_parse_round_trip_every_value() {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            // splitmix64
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let edges = [
            i64::MIN,
            i64::MIN + 1,
            i64::MAX,
            0,
            1,
            -1,
            10,
            -10,
            999_999,
            -999_999,
            1_000_000,
            -1_000_000,
            1_000_001,
            -1_000_001,
        ];
        let random = (0..20_000).map(|i| {
            let r = next() as i64;
            // Half over the whole range, half small amounts (cents to thousands of dollars).
            if i % 2 == 0 { r } else { r % 10_000_000_000 }
        });
        for micros in edges.into_iter().chain(random) {
            let usd = Usd::from_micros(micros);
            let text = usd.to_string();
            assert_eq!(text.parse::<Usd>(), Ok(usd), "{micros} shown as {text:?}");
            // And through serde, as audit rows and statuses carry it.
            let json = serde_json::to_string(&usd).unwrap();
            assert_eq!(serde_json::from_str::<Usd>(&json).unwrap(), usd, "{json}");
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
