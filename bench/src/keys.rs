//! The standalone-mode policy file the benchmarked sidecar loads: many keys, one of which the
//! load generator presents. Tokens are synthetic and deterministic (`vault_key_` + 43 base62
//! characters, like real ones); only their SHA-256 goes into the file.

use std::fmt::Write as _;

use keybrake_api::TokenHash;

/// Environment variable the generated config names for the upstream secret.
pub const SECRET_ENV: &str = "KEYBRAKE_BENCH_UPSTREAM_SECRET";

/// Which key the load generator presents unless told: key 4242 (what every run with the
/// default 10,000 keys has used), or the middle one of a smaller file. `None` for no keys.
pub fn default_bench_index(keys: usize) -> Option<usize> {
    const USUAL: usize = 4242;
    match keys {
        0 => None,
        k if k > USUAL => Some(USUAL),
        k => Some(k / 2),
    }
}

/// The `index`-th synthetic vault key.
pub fn bench_token(index: usize) -> String {
    format!("vault_key_bench{index:038}")
}

pub struct PolicyFile<'a> {
    pub keys: usize,
    /// Base URL of the benchmark upstream, e.g. `http://127.0.0.1:18080`.
    pub upstream_url: &'a str,
    /// The operation every key may call (the benchmarked route).
    pub operation: &'a str,
}

impl PolicyFile<'_> {
    /// The policy for `keybrake-sidecar --config`, as JSON: the sidecar parses JSON while
    /// reading it, whereas YAML is buffered whole first (for 10,000 keys that alone is
    /// several MB of peak memory, which would then count against the sidecar).
    pub fn render(&self) -> String {
        let quoted = |text: &str| serde_json::Value::from(text).to_string();
        let mut json = format!(
            "{{\"upstreams\": {{\"bench\": {{\"vendor\": \"stripe\", \"baseUrl\": {}, \
             \"secretEnv\": \"{SECRET_ENV}\"}}}},\n\"keys\": [",
            quoted(self.upstream_url)
        );
        let operation = quoted(self.operation);
        for index in 0..self.keys {
            let _ = write!(
                json,
                "{}\n  {{\"name\": \"bench-{index}\", \"tokenSha256\": \"{}\", \
                 \"upstream\": \"bench\", \"agent\": {{\"name\": \"bench-agent\"}}, \
                 \"allow\": [{{\"operation\": {operation}}}]}}",
                if index == 0 { "" } else { "," },
                TokenHash::of(&bench_token(index)).to_hex(),
            );
        }
        json.push_str("\n]}\n");
        json
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_look_like_vault_keys_and_differ() {
        let token = bench_token(42);
        let tail = token.strip_prefix("vault_key_").unwrap();
        assert_eq!(tail.len(), 43);
        assert!(tail.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(bench_token(1), bench_token(10));
    }

    #[test]
    fn the_default_bench_key_is_always_in_the_file() {
        assert_eq!(default_bench_index(10_000), Some(4242));
        assert_eq!(default_bench_index(4243), Some(4242));
        assert_eq!(default_bench_index(4242), Some(2121));
        assert_eq!(default_bench_index(100), Some(50));
        assert_eq!(default_bench_index(1), Some(0));
        assert_eq!(default_bench_index(0), None);
    }

    #[test]
    fn file_holds_hashes_not_tokens() {
        let json = PolicyFile {
            keys: 3,
            upstream_url: "http://127.0.0.1:18080",
            operation: "customers.retrieve",
        }
        .render();
        assert!(json.contains(&TokenHash::of(&bench_token(2)).to_hex()));
        assert!(!json.contains("vault_key_"));
        let parsed: serde_json::Value = serde_json::from_str(&json).expect("generated JSON parses");
        assert_eq!(parsed["keys"].as_array().unwrap().len(), 3);
        assert_eq!(parsed["keys"][2]["name"], "bench-2");
        assert_eq!(
            parsed["keys"][1]["allow"][0]["operation"],
            "customers.retrieve"
        );
        assert_eq!(parsed["upstreams"]["bench"]["secretEnv"], SECRET_ENV);
        assert_eq!(
            parsed["upstreams"]["bench"]["baseUrl"],
            "http://127.0.0.1:18080"
        );
        // The sidecar's JSON path is chosen by the leading `{`.
        assert!(json.starts_with('{'));
    }
}
