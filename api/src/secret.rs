//! A string that must never reach a log line, an Event, a status or an audit row.
use std::fmt;

use serde::{Deserialize, Serialize};

/// Upstream vendor secret. `Debug` and `Display` print a placeholder; the value itself only
/// leaves through [`SecretString::expose`] (to build the upstream auth header) and through serde
/// on the authenticated controller → sidecar stream.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        SecretString(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_formats_its_value() {
        let s = SecretString::new("sk_live_abc");
        assert!(!format!("{s:?} {s}").contains("sk_live"));
        assert_eq!(s.expose(), "sk_live_abc");
    }
}
