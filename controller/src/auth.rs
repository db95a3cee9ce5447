//! Sidecar authentication: a projected ServiceAccount token (audience `keybrake`) checked with
//! the TokenReview API, cached briefly in a bounded map keyed by the token's hash.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use keybrake_api::{TokenHash, stream::TOKEN_AUDIENCE};
use kube::{Api, Client, api::PostParams};

use crate::index::Scope;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    MissingToken,
    #[error("token rejected by the apiserver")]
    Rejected,
    #[error("token is not a service account token for audience {TOKEN_AUDIENCE}")]
    NotAServiceAccount,
    #[error("token review failed: {0}")]
    Unavailable(String),
}

/// The outcome of one TokenReview.
pub trait TokenReviewer: Send + Sync + 'static {
    fn review(&self, token: String) -> BoxFuture<'static, Result<Scope, AuthError>>;
}

/// `system:serviceaccount:NS:SA` → scope.
pub fn scope_of_username(username: &str) -> Option<Scope> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    (!ns.is_empty() && !sa.is_empty() && !sa.contains(':')).then(|| Scope::new(ns, sa))
}

/// The `exp` claim of a JWT (seconds since the epoch), read without verifying anything: only
/// call it on a token TokenReview accepted. Streams end at this instant so a sidecar reconnects
/// with its rotated token and is reviewed again.
pub fn jwt_expiry(token: &str) -> Option<u64> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("exp")?.as_u64()
}

/// TokenReview against the apiserver, requiring audience `keybrake`.
pub struct KubeTokenReviewer {
    client: Client,
}

impl KubeTokenReviewer {
    pub fn new(client: Client) -> Self {
        KubeTokenReviewer { client }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review(&self, token: String) -> BoxFuture<'static, Result<Scope, AuthError>> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        Box::pin(async move {
            let review = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token),
                    audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
                },
                ..TokenReview::default()
            };
            let out = api
                .create(&PostParams::default(), &review)
                .await
                .map_err(|e| AuthError::Unavailable(e.to_string()))?;
            let status = out.status.unwrap_or_default();
            if status.authenticated != Some(true) {
                return Err(AuthError::Rejected);
            }
            // The apiserver only authenticates a token for the audiences it carries; double
            // check, since an empty answer means "the apiserver's own audience".
            if !status
                .audiences
                .unwrap_or_default()
                .iter()
                .any(|a| a == TOKEN_AUDIENCE)
            {
                return Err(AuthError::NotAServiceAccount);
            }
            status
                .user
                .and_then(|u| u.username)
                .as_deref()
                .and_then(scope_of_username)
                .ok_or(AuthError::NotAServiceAccount)
        })
    }
}

/// Cached review outcomes by token hash, each with its expiry.
type ReviewCache = HashMap<TokenHash, (Result<Scope, AuthError>, Instant)>;

/// How far (±) an entry's lifetime is spread around its TTL, in percent. Sidecars connect in
/// waves (a controller restart reconnects all of them within a second); without a spread their
/// cached reviews would all expire together and every request of that moment would wait for a
/// TokenReview round trip.
pub const TTL_JITTER_PERCENT: u64 = 20;

/// `ttl` spread by ±[`TTL_JITTER_PERCENT`] with a fraction taken from the token's hash: stable
/// for one token, uniform across tokens, no RNG to seed in tests.
pub fn jittered_ttl(ttl: Duration, hash: &TokenHash) -> Duration {
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    // 0..=2*J percent of the TTL, centred on TTL: (100 - J + x) / 100, x in 0..=2J.
    let spread = u64::from_le_bytes(first) % (2 * TTL_JITTER_PERCENT + 1);
    let percent = 100 - TTL_JITTER_PERCENT + spread;
    let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(millis.saturating_mul(percent) / 100)
}

/// Caches review outcomes: accepted tokens for `accept_ttl`, rejected ones for `reject_ttl`
/// (so a sidecar with a bad token cannot turn every reconnect into a TokenReview), each spread
/// by ±[`TTL_JITTER_PERCENT`], at most `capacity` entries. Apiserver failures are not cached.
pub struct Authenticator {
    reviewer: Arc<dyn TokenReviewer>,
    cache: Mutex<ReviewCache>,
    accept_ttl: Duration,
    reject_ttl: Duration,
    capacity: usize,
}

impl Authenticator {
    pub fn new(reviewer: Arc<dyn TokenReviewer>) -> Self {
        Authenticator {
            reviewer,
            cache: Mutex::new(HashMap::new()),
            accept_ttl: Duration::from_secs(10),
            reject_ttl: Duration::from_secs(2),
            capacity: 10_000,
        }
    }

    pub fn with_limits(
        mut self,
        accept_ttl: Duration,
        reject_ttl: Duration,
        capacity: usize,
    ) -> Self {
        self.accept_ttl = accept_ttl;
        self.reject_ttl = reject_ttl;
        self.capacity = capacity.max(1);
        self
    }

    /// Authenticates an `Authorization` header value.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Scope, AuthError> {
        self.authenticate_at(authorization, Instant::now()).await
    }

    /// [`Self::authenticate`] with the clock passed in (tests drive it).
    pub async fn authenticate_at(
        &self,
        authorization: Option<&str>,
        now: Instant,
    ) -> Result<Scope, AuthError> {
        let token = bearer_token(authorization).ok_or(AuthError::MissingToken)?;
        let hash = TokenHash::of(token);
        if let Some((outcome, until)) = self.cache_lock().get(&hash)
            && *until > now
        {
            return outcome.clone();
        }
        let outcome = self.reviewer.review(token.to_owned()).await;
        let ttl = match &outcome {
            Ok(_) => self.accept_ttl,
            Err(AuthError::Unavailable(_)) => return outcome,
            Err(_) => self.reject_ttl,
        };
        let mut cache = self.cache_lock();
        if cache.len() >= self.capacity {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= self.capacity {
                cache.clear();
            }
        }
        let until = now + jittered_ttl(ttl, &hash);
        cache.insert(hash, (outcome.clone(), until));
        outcome
    }

    /// When the cached outcome for `token` expires (tests and diagnostics).
    pub fn cached_until(&self, token: &str) -> Option<Instant> {
        self.cache_lock()
            .get(&TokenHash::of(token))
            .map(|(_, until)| *until)
    }

    fn cache_lock(&self) -> std::sync::MutexGuard<'_, ReviewCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn cached_entries(&self) -> usize {
        self.cache_lock().len()
    }
}

/// The token of a `Bearer` authorization header.
pub fn bearer_token(authorization: Option<&str>) -> Option<&str> {
    authorization
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Fake {
        calls: Arc<AtomicUsize>,
    }

    impl TokenReviewer for Fake {
        fn review(&self, token: String) -> BoxFuture<'static, Result<Scope, AuthError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                match token.as_str() {
                    "good" => Ok(Scope::new("agents", "refund")),
                    "down" => Err(AuthError::Unavailable("boom".into())),
                    _ => Err(AuthError::Rejected),
                }
            })
        }
    }

    #[test]
    fn reads_the_expiry_claim() {
        use base64::Engine as _;
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = format!(
            "{}.{}.sig",
            enc("{\"alg\":\"ES256\"}"),
            enc("{\"exp\":1764547200,\"aud\":[\"keybrake\"]}")
        );
        assert_eq!(jwt_expiry(&token), Some(1_764_547_200));
        assert_eq!(jwt_expiry("opaque-token"), None);
        assert_eq!(jwt_expiry(&format!("a.{}.c", enc("{}"))), None);
    }

    #[test]
    fn usernames_map_to_scopes() {
        assert_eq!(
            scope_of_username("system:serviceaccount:agents:refund"),
            Some(Scope::new("agents", "refund"))
        );
        for bad in [
            "admin",
            "system:serviceaccount:agents",
            "system:serviceaccount::x",
            "system:serviceaccount:a:b:c",
            "system:node:agents:refund",
        ] {
            assert_eq!(scope_of_username(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn caches_outcomes_but_not_outages_and_stays_bounded() {
        let calls = Arc::new(AtomicUsize::new(0));
        let auth = Authenticator::new(Arc::new(Fake {
            calls: calls.clone(),
        }))
        .with_limits(Duration::from_secs(60), Duration::from_secs(60), 3);
        assert_eq!(auth.authenticate(None).await, Err(AuthError::MissingToken));
        assert_eq!(
            auth.authenticate(Some("Basic x")).await,
            Err(AuthError::MissingToken)
        );
        for _ in 0..3 {
            assert_eq!(
                auth.authenticate(Some("Bearer good")).await,
                Ok(Scope::new("agents", "refund"))
            );
            assert_eq!(
                auth.authenticate(Some("Bearer bad")).await,
                Err(AuthError::Rejected)
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        for _ in 0..2 {
            assert!(matches!(
                auth.authenticate(Some("Bearer down")).await,
                Err(AuthError::Unavailable(_))
            ));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        for i in 0..10 {
            let _ = auth.authenticate(Some(&format!("Bearer other-{i}"))).await;
            assert!(auth.cached_entries() <= 3);
        }
    }

    #[tokio::test]
    async fn expiries_spread_around_the_ttl_and_renew_on_the_controlled_clock() {
        let calls = Arc::new(AtomicUsize::new(0));
        let auth = Authenticator::new(Arc::new(Fake {
            calls: calls.clone(),
        }));
        let ttl = Duration::from_secs(10);
        let t0 = Instant::now();
        // 1,000 tokens reviewed at the same instant (a reconnect wave) expire over ±20 %.
        let expiries: Vec<Duration> = (0..1000)
            .map(|i| jittered_ttl(ttl, &TokenHash::of(&format!("token-{i}"))))
            .collect();
        let min = *expiries.iter().min().unwrap();
        let max = *expiries.iter().max().unwrap();
        assert!(min >= Duration::from_secs(8) && max <= Duration::from_secs(12));
        assert!(max - min >= Duration::from_secs(3), "{min:?}..{max:?}");
        let in_any_second = (8..12)
            .map(|s| expiries.iter().filter(|d| d.as_secs() == s).count())
            .max()
            .unwrap();
        assert!(in_any_second < 400, "{in_any_second} expire in one second");

        // The cache honours the jittered expiry on the controlled clock.
        assert!(auth.authenticate_at(Some("Bearer good"), t0).await.is_ok());
        let until = auth.cached_until("good").unwrap();
        assert_eq!(until, t0 + jittered_ttl(ttl, &TokenHash::of("good")));
        let just_before = until - Duration::from_millis(1);
        assert!(
            auth.authenticate_at(Some("Bearer good"), just_before)
                .await
                .is_ok()
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(
            auth.authenticate_at(Some("Bearer good"), until)
                .await
                .is_ok()
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2, "re-reviewed at expiry");
        assert_eq!(
            auth.cached_until("good"),
            Some(until + jittered_ttl(ttl, &TokenHash::of("good")))
        );
    }
}
