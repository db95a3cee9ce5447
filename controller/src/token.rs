//! Minting vault keys: `vault_key_` + 43 base62 characters drawn from the OS CSPRNG
//! (43 × log2(62) ≈ 256 bits of entropy).
use keybrake_api::{SecretString, policy::TOKEN_PREFIX};
use rand::{TryRngCore, rngs::OsRng};

pub use keybrake_api::policy::{TOKEN_SECRET_KEY, token_secret_name, vault_key_of_token_secret};

/// Random characters after the prefix.
pub const TOKEN_RANDOM_CHARS: usize = 43;
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct MintError(String);

/// A fresh vault key. Rejection sampling keeps every character uniform over the 62 symbols.
pub fn mint_token() -> Result<SecretString, MintError> {
    let mut out = String::with_capacity(TOKEN_PREFIX.len() + TOKEN_RANDOM_CHARS);
    out.push_str(TOKEN_PREFIX);
    let mut produced = 0;
    let mut buf = [0u8; 64];
    while produced < TOKEN_RANDOM_CHARS {
        OsRng
            .try_fill_bytes(&mut buf)
            .map_err(|e| MintError(e.to_string()))?;
        for &byte in &buf {
            // 248 = 4 × 62: bytes at or above it would bias the low symbols.
            if byte < 248 && produced < TOKEN_RANDOM_CHARS {
                out.push(BASE62[(byte % 62) as usize] as char);
                produced += 1;
            }
        }
    }
    Ok(SecretString::new(out))
}

/// Whether `text` has the shape of a minted vault key.
pub fn is_well_formed(text: &str) -> bool {
    text.strip_prefix(TOKEN_PREFIX).is_some_and(|rest| {
        rest.len() == TOKEN_RANDOM_CHARS && rest.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn minted_tokens_have_the_documented_shape_and_differ() {
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let t = mint_token().unwrap();
            assert!(is_well_formed(t.expose()), "{}", t.expose().len());
            assert!(seen.insert(t.expose().to_owned()));
        }
    }

    #[test]
    fn characters_cover_the_alphabet() {
        let mut chars = HashSet::new();
        for _ in 0..100 {
            chars.extend(mint_token().unwrap().expose()[TOKEN_PREFIX.len()..].chars());
        }
        assert_eq!(chars.len(), 62);
    }
}
