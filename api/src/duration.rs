//! The `ttl` field's duration format: a sequence of `<n>h`, `<n>m`, `<n>s` (a subset of Go's).
use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a duration such as \"30m\" or \"1h30m\" (units h, m, s)")]
pub struct DurationError(pub String);

/// The regular expression the CRD's CEL rule checks, kept next to the parser it mirrors.
pub const TTL_PATTERN: &str = "^([0-9]{1,6}[hms]){1,3}$";

pub fn parse_ttl(text: &str) -> Result<Duration, DurationError> {
    let err = || DurationError(text.to_owned());
    if text.is_empty() {
        return Err(err());
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(err()),
        };
        let n: u64 = number.parse().map_err(|_| err())?;
        number.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(err)?;
    }
    if !number.is_empty() || total == 0 {
        return Err(err());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_ttl("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_ttl("1h30m5s").unwrap(), Duration::from_secs(5405));
        for bad in ["", "30", "m", "1d", "0s", "-5m", "1.5h"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }
}
