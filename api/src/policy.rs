//! The policy a sidecar enforces for one vault key: a [`KeyGrant`]. The controller builds it
//! from a `VaultKey` (plus the resolved upstream secret and the token's hash); standalone mode
//! builds it from a config file. Either way the sidecar's store holds the same type.
use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{
    crd::{AgentRef, AllowRule, KeyState, Limits, OnStale, VaultKeySpec, Vendor},
    secret::SecretString,
};

/// Every minted vault key starts with this, so leaked ones are easy to grep for and to scan.
pub const TOKEN_PREFIX: &str = "vault_key_";

/// Data key, in the token Secret, of the minted vault key (the agent's env var has the same name).
pub const TOKEN_SECRET_KEY: &str = "VAULT_KEY";
const TOKEN_SECRET_SUFFIX: &str = "-token";

/// Name of the Secret (owned by the VaultKey) that holds the vault key minted for it. The
/// controller writes it; the injection webhook points agent containers at it.
pub fn token_secret_name(vault_key_name: &str) -> String {
    format!("{vault_key_name}{TOKEN_SECRET_SUFFIX}")
}

/// The VaultKey name a token Secret belongs to, if `secret_name` follows the convention.
pub fn vault_key_of_token_secret(secret_name: &str) -> Option<&str> {
    secret_name
        .strip_suffix(TOKEN_SECRET_SUFFIX)
        .filter(|n| !n.is_empty())
}

/// `namespace/name` of the VaultKey (standalone mode: `standalone/<name>`). Safe to log.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(pub String);

impl KeyId {
    pub fn new(namespace: &str, name: &str) -> Self {
        KeyId(format!("{namespace}/{name}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn namespace(&self) -> &str {
        self.0.split_once('/').map_or("", |(ns, _)| ns)
    }

    pub fn name(&self) -> &str {
        self.0.split_once('/').map_or(&self.0, |(_, n)| n)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 of a vault key. Sidecars store and compare these, never the tokens themselves.
/// (Vault keys carry ≥ 190 bits of entropy, so a fast hash is enough: there is nothing to brute
/// force.)
#[derive(Clone, Copy, PartialOrd, Ord)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(token: &str) -> Self {
        TokenHash(Sha256::digest(token.as_bytes()).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Result<Self, hex::FromHexError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut out)?;
        Ok(TokenHash(out))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl PartialEq for TokenHash {
    /// Constant time, so a lookup leaks nothing about how close a guess came: every byte is
    /// compared, eight at a time (a byte-wise `ct_eq` costs ~8x more on every call), with no
    /// early exit; only the final all-equal test goes through `subtle`.
    fn eq(&self, other: &Self) -> bool {
        let word = |h: &[u8; 32], i: usize| {
            u64::from_ne_bytes(h[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        };
        let difference = (0..4).fold(0u64, |acc, i| acc | (word(&self.0, i) ^ word(&other.0, i)));
        difference.ct_eq(&0).into()
    }
}

impl Eq for TokenHash {}

impl std::hash::Hash for TokenHash {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Debug for TokenHash {
    /// Only a prefix: enough to correlate, not enough to matter.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({}…)", &self.to_hex()[..8])
    }
}

impl Serialize for TokenHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        TokenHash::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// Everything a sidecar needs to decide and forward calls made with one vault key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyGrant {
    pub id: KeyId,
    pub token_sha256: TokenHash,
    pub vendor: Vendor,
    /// Upstream origin, e.g. `https://api.stripe.com` (a path prefix is allowed).
    pub base_url: String,
    pub upstream_secret: SecretString,
    pub state: KeyState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
    pub agent: AgentRef,
    #[serde(default)]
    pub allow: Vec<AllowRule>,
    #[serde(default)]
    pub customers: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub on_stale: OnStale,
    /// The VaultKey's metadata.generation (or the config file's revision in standalone mode),
    /// written into every audit row as `policy_revision`.
    #[serde(default)]
    pub policy_revision: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    #[error("vendor {0} has no default upstream: set upstream.baseUrl")]
    NoBaseUrl(Vendor),
}

impl KeyGrant {
    /// Builds the grant for a VaultKey whose token hash, upstream secret and effective expiry
    /// (from `expiresAt`, or creation + `ttl`) the caller has resolved.
    pub fn from_spec(
        id: KeyId,
        spec: &VaultKeySpec,
        token_sha256: TokenHash,
        upstream_secret: SecretString,
        expires_at: Option<Timestamp>,
        policy_revision: i64,
    ) -> Result<Self, GrantError> {
        let base_url = spec
            .upstream
            .base_url
            .clone()
            .or_else(|| spec.vendor.default_base_url().map(str::to_owned))
            .ok_or(GrantError::NoBaseUrl(spec.vendor))?;
        Ok(KeyGrant {
            id,
            token_sha256,
            vendor: spec.vendor,
            base_url: base_url.trim_end_matches('/').to_owned(),
            upstream_secret,
            state: spec.state,
            expires_at,
            agent: spec.agent.clone(),
            allow: spec.allow.clone(),
            customers: spec.customers.clone(),
            limits: spec.limits.clone(),
            on_stale: spec.on_stale,
            policy_revision,
        })
    }

    pub fn is_expired_at(&self, now: Timestamp) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{SecretKeyRef, Upstream, WorkloadRef};

    fn spec(vendor: Vendor, base_url: Option<&str>) -> VaultKeySpec {
        VaultKeySpec {
            vendor,
            upstream: Upstream {
                secret_ref: SecretKeyRef {
                    name: "s".into(),
                    key: "k".into(),
                },
                base_url: base_url.map(str::to_owned),
            },
            state: KeyState::Active,
            expires_at: None,
            ttl: None,
            agent: AgentRef {
                name: "a".into(),
                run_id: None,
            },
            workload: WorkloadRef {
                service_account_name: "sa".into(),
            },
            allow: vec![],
            customers: vec![],
            limits: Limits::default(),
            on_stale: OnStale::Deny,
        }
    }

    #[test]
    fn token_secret_names_round_trip() {
        assert_eq!(token_secret_name("run-42"), "run-42-token");
        assert_eq!(vault_key_of_token_secret("run-42-token"), Some("run-42"));
        assert_eq!(vault_key_of_token_secret("-token"), None);
        assert_eq!(vault_key_of_token_secret("stripe-live"), None);
    }

    #[test]
    fn token_hash_round_trips_and_hides_itself() {
        let h = TokenHash::of("vault_key_abc");
        assert_eq!(TokenHash::from_hex(&h.to_hex()).unwrap(), h);
        assert_ne!(TokenHash::of("vault_key_abd"), h);
        assert!(!format!("{h:?}").contains(&h.to_hex()));
    }

    #[test]
    fn token_hashes_differing_in_any_one_bit_are_unequal() {
        let h = TokenHash::of("vault_key_abc");
        assert_eq!(h, TokenHash(*h.as_bytes()));
        for byte in 0..32 {
            for bit in 0..8 {
                let mut other = *h.as_bytes();
                other[byte] ^= 1 << bit;
                assert_ne!(h, TokenHash(other), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn grant_defaults_base_url_per_vendor() {
        let g = KeyGrant::from_spec(
            KeyId::new("ns", "k"),
            &spec(Vendor::Stripe, None),
            TokenHash::of("t"),
            SecretString::new("sk"),
            None,
            1,
        )
        .unwrap();
        assert_eq!(g.base_url, "https://api.stripe.com");
        let custom = KeyGrant::from_spec(
            KeyId::new("ns", "k"),
            &spec(Vendor::Custom, None),
            TokenHash::of("t"),
            SecretString::new("sk"),
            None,
            1,
        );
        assert_eq!(custom, Err(GrantError::NoBaseUrl(Vendor::Custom)));
    }

    #[test]
    fn grant_debug_never_shows_the_secret() {
        let g = KeyGrant::from_spec(
            KeyId::new("ns", "k"),
            &spec(Vendor::Openai, Some("http://127.0.0.1:9/")),
            TokenHash::of("t"),
            SecretString::new("sk-proj-secret"),
            None,
            1,
        )
        .unwrap();
        assert!(!format!("{g:?}").contains("sk-proj-secret"));
        assert_eq!(g.base_url, "http://127.0.0.1:9");
    }
}
