//! Cache of credential reviews, keyed by (cluster, sha256(token), audiences).
//!
//! istiod reviews every CSR and every xDS stream (istio/istio#27945 shows the API-server
//! throttling that follows). meshd keeps a positive result until the earlier of the token's own
//! `exp` and a configured TTL, keeps a rejection for a few seconds, and lets concurrent identical
//! reviews share one call. The trade-off: a revoked token (deleted service account) keeps working
//! until its cache entry expires; `docs/auth.md` explains it.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use super::{AuthError, Identity};
use crate::admin::metrics::{Counter, Registry};
use crate::clock::SharedClock;

const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    pub positive_ttl: Duration,
    pub negative_ttl: Duration,
    pub max_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            positive_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
            max_entries: 100_000,
        }
    }
}

/// Cache key; build with [`CacheKey::new`] so raw tokens are never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    pub fn new(cluster: &str, token: &str, audiences: &[String]) -> Self {
        let mut buf = Vec::with_capacity(cluster.len() + token.len() + 64);
        buf.extend_from_slice(cluster.as_bytes());
        buf.push(0);
        buf.extend_from_slice(&crate::pki::sha256(token.as_bytes()));
        for a in audiences {
            buf.push(0);
            buf.extend_from_slice(a.as_bytes());
        }
        Self(crate::pki::sha256(&buf))
    }

    fn shard(&self) -> usize {
        self.0[0] as usize % SHARDS
    }
}

/// What a review produced: the identity and, for a JWT, its `exp`.
pub type ReviewOutcome = Result<(Identity, Option<SystemTime>), AuthError>;
type SharedReview = Shared<BoxFuture<'static, ReviewOutcome>>;

enum Entry {
    Done {
        result: Result<Identity, AuthError>,
        expires: SystemTime,
    },
    Pending(SharedReview),
}

#[derive(Clone)]
pub struct CacheMetrics {
    pub hits: Arc<Counter>,
    pub misses: Arc<Counter>,
    pub coalesced: Arc<Counter>,
}

impl CacheMetrics {
    /// Counters for one credential authority: `kind` is `jwt` or `tokenreview`, `authority` the
    /// issuer or cluster id.
    pub fn register(r: &Registry, kind: &str, authority: &str) -> Self {
        let v = |n: &str, h: &str| r.counter_vec(n, h, &["kind", "authority"]).with(&[kind, authority]);
        Self {
            hits: v(
                "meshd_auth_review_cache_hits",
                "Credential reviews answered from the cache",
            ),
            misses: v("meshd_auth_review_cache_misses", "Credential reviews not in the cache"),
            coalesced: v(
                "meshd_auth_review_cache_coalesced",
                "Credential reviews that joined an identical review already in flight",
            ),
        }
    }
}

pub struct ReviewCache {
    shards: Vec<Mutex<HashMap<CacheKey, Entry>>>,
    config: CacheConfig,
    clock: SharedClock,
}

impl std::fmt::Debug for ReviewCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReviewCache").field("config", &self.config).finish()
    }
}

impl ReviewCache {
    pub fn new(config: CacheConfig, clock: SharedClock) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            config,
            clock,
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Returns the cached answer for `key`, or runs `review` (once, however many callers ask at
    /// the same moment) and caches what it says.
    pub async fn get_or_review<F>(
        &self,
        key: CacheKey,
        metrics: &CacheMetrics,
        review: F,
    ) -> Result<Identity, AuthError>
    where
        F: std::future::Future<Output = ReviewOutcome> + Send + 'static,
    {
        let shared = {
            let mut shard = self.shards[key.shard()].lock().unwrap_or_else(|e| e.into_inner());
            let now = self.clock.now();
            match shard.get(&key) {
                Some(Entry::Done { result, expires }) if *expires > now => {
                    metrics.hits.inc();
                    return result.clone();
                }
                Some(Entry::Pending(f)) => {
                    metrics.coalesced.inc();
                    f.clone()
                }
                _ => {
                    metrics.misses.inc();
                    let f = review.boxed().shared();
                    self.make_room(&mut shard, now);
                    shard.insert(key, Entry::Pending(f.clone()));
                    f
                }
            }
        };
        let outcome = shared.await;
        let mut shard = self.shards[key.shard()].lock().unwrap_or_else(|e| e.into_inner());
        let now = self.clock.now();
        // Only the first finisher stores; later joiners find Done already.
        if matches!(shard.get(&key), Some(Entry::Pending(_))) {
            match &outcome {
                // A zero TTL keeps only the coalescing: nothing is remembered.
                Ok(_) if self.config.positive_ttl.is_zero() => {
                    shard.remove(&key);
                }
                Ok((id, exp)) => {
                    let mut expires = now + self.config.positive_ttl;
                    if let Some(exp) = exp {
                        expires = expires.min(*exp);
                    }
                    shard.insert(
                        key,
                        Entry::Done {
                            result: Ok(id.clone()),
                            expires,
                        },
                    );
                }
                Err(e @ AuthError::Rejected(_)) => {
                    shard.insert(
                        key,
                        Entry::Done {
                            result: Err(e.clone()),
                            expires: now + self.config.negative_ttl,
                        },
                    );
                }
                // Outages and overload are not facts about the token: do not remember them.
                Err(_) => {
                    shard.remove(&key);
                }
            }
        }
        outcome.map(|(id, _)| id)
    }

    fn make_room(&self, shard: &mut HashMap<CacheKey, Entry>, now: SystemTime) {
        let cap = (self.config.max_entries / SHARDS).max(1);
        if shard.len() < cap {
            return;
        }
        shard.retain(|_, e| match e {
            Entry::Done { expires, .. } => *expires > now,
            Entry::Pending(_) => true,
        });
        if shard.len() >= cap {
            let victim = shard
                .iter()
                .find(|(_, e)| matches!(e, Entry::Done { .. }))
                .map(|(k, _)| *k);
            if let Some(k) = victim {
                shard.remove(&k);
            }
        }
    }

    /// Number of entries (done and pending), for tests and debug pages.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthSource;
    use crate::clock::{Clock, FakeClock};
    use crate::pki::SpiffeId;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn id() -> Identity {
        Identity {
            spiffe: SpiffeId::new("td", "ns", "sa"),
            source: AuthSource::Jwt { issuer: "i".into() },
            cluster_id: None,
            pod_name: None,
            pod_uid: None,
        }
    }

    fn cache(clock: &FakeClock) -> ReviewCache {
        ReviewCache::new(CacheConfig::default(), Arc::new(clock.clone()))
    }

    fn m() -> CacheMetrics {
        CacheMetrics::register(&Registry::new(), "test", "c1")
    }

    #[tokio::test]
    async fn positive_entries_live_until_token_exp_or_ttl() {
        let clock = FakeClock::new(SystemTime::now());
        let c = cache(&clock);
        let calls = Arc::new(AtomicUsize::new(0));
        let key = CacheKey::new("c1", "tok", &["istio-ca".into()]);
        let exp = clock.now() + Duration::from_secs(10);
        for _ in 0..3 {
            let calls = calls.clone();
            c.get_or_review(key, &m(), async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok((id(), Some(exp)))
            })
            .await
            .unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(11));
        let calls2 = calls.clone();
        c.get_or_review(key, &m(), async move {
            calls2.fetch_add(1, Ordering::SeqCst);
            Ok((id(), None))
        })
        .await
        .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2, "expired with the token");
    }

    #[tokio::test]
    async fn concurrent_reviews_coalesce() {
        let clock = FakeClock::new(SystemTime::now());
        let c = Arc::new(cache(&clock));
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let rx = rx.shared();
        let key = CacheKey::new("c1", "tok", &[]);
        let mut tasks = vec![];
        for _ in 0..20 {
            let (c, calls, rx) = (c.clone(), calls.clone(), rx.clone());
            tasks.push(tokio::spawn(async move {
                c.get_or_review(key, &m(), async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let _ = rx.await;
                    Ok((id(), None))
                })
                .await
            }));
        }
        // Let every task reach the cache before the review finishes.
        tokio::task::yield_now().await;
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        tx.send(()).unwrap();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn rejections_are_cached_briefly_and_outages_not_at_all() {
        let clock = FakeClock::new(SystemTime::now());
        let c = cache(&clock);
        let key = CacheKey::new("c1", "bad", &[]);
        let r = c
            .get_or_review(key, &m(), async { Err(AuthError::Rejected("no".into())) })
            .await;
        assert!(r.is_err());
        let r = c.get_or_review(key, &m(), async { Ok((id(), None)) }).await;
        assert!(r.is_err(), "negative entry still fresh");
        clock.advance(Duration::from_secs(6));
        assert!(c.get_or_review(key, &m(), async { Ok((id(), None)) }).await.is_ok());

        let key2 = CacheKey::new("c1", "tok2", &[]);
        let r = c
            .get_or_review(key2, &m(), async {
                Err(AuthError::Unavailable {
                    cluster: "c1".into(),
                    reason: "down".into(),
                })
            })
            .await;
        assert!(r.is_err());
        assert!(c.get_or_review(key2, &m(), async { Ok((id(), None)) }).await.is_ok());
    }

    #[test]
    fn keys_differ_by_cluster_and_audience() {
        let a = CacheKey::new("c1", "t", &["istio-ca".into()]);
        assert_ne!(a, CacheKey::new("c2", "t", &["istio-ca".into()]));
        assert_ne!(a, CacheKey::new("c1", "t", &["other".into()]));
        assert_eq!(a, CacheKey::new("c1", "t", &["istio-ca".into()]));
    }
}
