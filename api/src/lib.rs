//! Keybrake's shared vocabulary: the `VaultKey` custom resource, the policy a sidecar enforces,
//! the controller → sidecar stream messages and the audit row. Pure types: no I/O here.
#![forbid(unsafe_code)]

pub mod audit;
pub mod budget;
pub mod crd;
pub mod duration;
pub mod money;
pub mod policy;
pub mod secret;
pub mod stream;
pub mod verdict;

pub use crd::{
    AgentRef, AllowRule, EnforcementStatus, HttpMethod, KeyState, Limits, OnStale, Phase,
    SecretKeyRef, Upstream, VaultKey, VaultKeySpec, VaultKeyStatus, Vendor, WorkloadRef,
};
pub use money::Usd;
pub use policy::{KeyGrant, KeyId, TokenHash};
pub use secret::SecretString;
pub use verdict::Verdict;
