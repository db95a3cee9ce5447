//! PostgreSQL `NUMERIC` values read as exact decimal text (`12.345678`), the form SQLite's dollar
//! columns return, without pulling in a decimal crate. Decodes the binary wire format:
//! `ndigits i16, weight i16, sign u16, dscale u16`, then `ndigits` base-10000 digits, the first
//! worth 10000^weight.
use std::{error::Error, fmt::Write};

use tokio_postgres::types::{FromSql, Type};

const SIGN_NEGATIVE: u16 = 0x4000;
const SIGN_NAN: u16 = 0xC000;
const SIGN_PLUS_INFINITY: u16 = 0xD000;
const SIGN_MINUS_INFINITY: u16 = 0xF000;

/// A `NUMERIC` as PostgreSQL prints it (`NaN`, `Infinity`, `-Infinity` included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumericText(pub String);

#[derive(Debug, thiserror::Error)]
#[error("malformed NUMERIC value on the wire")]
struct Malformed;

impl<'a> FromSql<'a> for NumericText {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        decode(raw).map(NumericText).ok_or_else(|| Malformed.into())
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

fn decode(raw: &[u8]) -> Option<String> {
    let word = |i: usize| -> Option<u16> {
        let b = raw.get(2 * i..2 * i + 2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    };
    let ndigits = usize::from(word(0)?);
    let weight = i32::from(word(1)? as i16);
    let sign = word(2)?;
    let dscale = usize::from(word(3)?);
    if raw.len() != 8 + 2 * ndigits {
        return None;
    }
    match sign {
        SIGN_NAN => return Some("NaN".into()),
        SIGN_PLUS_INFINITY => return Some("Infinity".into()),
        SIGN_MINUS_INFINITY => return Some("-Infinity".into()),
        0 | SIGN_NEGATIVE => {}
        _ => return None,
    }
    // The digit worth 10000^(weight - k) is digits[k]; positions outside the stored ones are 0.
    let digit = |k: i32| -> Option<u16> {
        if k < 0 || k as usize >= ndigits {
            Some(0)
        } else {
            word(4 + k as usize).filter(|d| *d < 10_000)
        }
    };
    let mut out = String::new();
    if sign == SIGN_NEGATIVE && ndigits > 0 {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        for k in 0..=weight {
            let d = digit(k)?;
            if k == 0 {
                write!(out, "{d}").ok()?;
            } else {
                write!(out, "{d:04}").ok()?;
            }
        }
    }
    if dscale > 0 {
        out.push('.');
        let mut fraction = String::with_capacity(dscale + 4);
        let mut k = weight + 1;
        while fraction.len() < dscale {
            write!(fraction, "{:04}", digit(k)?).ok()?;
            k += 1;
        }
        fraction.truncate(dscale);
        out.push_str(&fraction);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut raw = Vec::new();
        for w in [digits.len() as u16, weight as u16, sign, dscale]
            .into_iter()
            .chain(digits.iter().copied())
        {
            raw.extend_from_slice(&w.to_be_bytes());
        }
        raw
    }

    #[test]
    fn decodes_what_postgres_prints() {
        // 12.345678 = 12 · 10000^0 + 3456 · 10000^-1 + 7800 · 10000^-2
        assert_eq!(
            decode(&wire(0, 0, 6, &[12, 3456, 7800])).unwrap(),
            "12.345678"
        );
        assert_eq!(
            decode(&wire(0, SIGN_NEGATIVE, 6, &[5, 2500])).unwrap(),
            "-5.250000"
        );
        // 0.000007: first stored digit worth 10000^-2.
        assert_eq!(decode(&wire(-2, 0, 6, &[700])).unwrap(), "0.000007");
        assert_eq!(decode(&wire(0, 0, 6, &[])).unwrap(), "0.000000");
        assert_eq!(
            decode(&wire(3, 0, 6, &[9, 2233, 7203, 6854])).unwrap(),
            "9223372036854.000000"
        );
        assert_eq!(decode(&wire(1, 0, 0, &[1])).unwrap(), "10000");
        assert_eq!(decode(&wire(0, SIGN_NAN, 0, &[])).unwrap(), "NaN");
    }

    #[test]
    fn refuses_malformed_input() {
        assert!(decode(&[0, 1]).is_none());
        assert!(decode(&wire(0, 0, 0, &[10_000])).is_none());
        assert!(decode(&wire(0, 0x1234, 0, &[1])).is_none());
        let mut short = wire(0, 0, 0, &[1, 2]);
        short.pop();
        assert!(decode(&short).is_none());
    }
}
