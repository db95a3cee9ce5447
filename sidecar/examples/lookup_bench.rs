//! Policy lookup cost with 10,000 keys loaded: hashing the presented token plus the store
//! lookup, as the request path does it. `cargo run --release -p keybrake-sidecar --example lookup_bench`
use std::{hint::black_box, time::Instant};

use keybrake_api::{
    AgentRef, KeyGrant, KeyId, KeyState, Limits, OnStale, SecretString, TokenHash, Vendor,
    stream::PolicyApply,
};
use keybrake_sidecar::{Freshness, PolicyStore};

fn main() {
    const KEYS: usize = 10_000;
    let tokens: Vec<String> = (0..KEYS).map(|i| format!("vault_key_{i:043}")).collect();
    let grants = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| KeyGrant {
            id: KeyId::new("bench", &format!("key-{i}")),
            token_sha256: TokenHash::of(t),
            vendor: Vendor::Openai,
            base_url: "http://127.0.0.1:9".into(),
            upstream_secret: SecretString::new("sk"),
            state: KeyState::Active,
            expires_at: None,
            agent: AgentRef {
                name: "a".into(),
                run_id: None,
            },
            allow: vec![],
            customers: vec![],
            limits: Limits::default(),
            on_stale: OnStale::Deny,
            policy_revision: 1,
        })
        .collect();
    let store = PolicyStore::new(Freshness::AlwaysFresh);
    store.replace_all(grants, 1);
    const ROUNDS: usize = 2_000_000;
    for (label, with_hash) in [("lookup only", false), ("sha256 + lookup", true)] {
        let hashes: Vec<TokenHash> = tokens.iter().map(|t| TokenHash::of(t)).collect();
        let start = Instant::now();
        for i in 0..ROUNDS {
            let hash = if with_hash {
                TokenHash::of(&tokens[i % KEYS])
            } else {
                hashes[i % KEYS]
            };
            black_box(store.lookup(black_box(&hash)));
        }
        let per = start.elapsed().as_nanos() as f64 / ROUNDS as f64;
        println!("{label}: {per:.0} ns per call ({KEYS} keys, {ROUNDS} calls)");
    }
}
