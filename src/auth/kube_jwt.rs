//! Bearer tokens reviewed by the caller's own cluster (istiod's KubeJWTAuthenticator), picked by
//! the `clusterid` header, with meshd's review cache in front.
//!
//! Failure classes matter to callers: an invalid token is `Unauthenticated`; an API server that
//! is down, slow or throttling is `Unavailable` naming the cluster (agents retry); too many
//! reviews already in flight for one cluster is `ResourceExhausted`, refused without queueing.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use futures::future::{BoxFuture, FutureExt};

use super::cache::{CacheKey, CacheMetrics, ReviewCache};
use super::tokenreview::{KubeTokenReviewer, ReviewError, TokenReviewer};
use super::{AuthError, AuthSource, Authenticator, Credentials, Identity};
use crate::admin::Registry;
use crate::admin::metrics::{CounterVec, HistogramVec, LATENCY_BUCKETS};
use crate::cluster::{ClusterHandle, ClusterRegistry, ResolveError};
use crate::pki::SpiffeId;

/// Builds the reviewer for a cluster (the seam tests replace).
pub type ReviewerFactory = Arc<dyn Fn(&ClusterHandle) -> Arc<dyn TokenReviewer> + Send + Sync>;

pub fn kube_reviewers() -> ReviewerFactory {
    Arc::new(|c: &ClusterHandle| Arc::new(KubeTokenReviewer::new(c.client.clone())) as Arc<dyn TokenReviewer>)
}

#[derive(Debug, Clone)]
pub struct KubeJwtConfig {
    pub trust_domain: String,
    pub audiences: Vec<String>,
    pub timeout: Duration,
}

struct Metrics {
    api_calls: CounterVec,
    latency: HistogramVec,
    registry: Arc<Registry>,
    cache: Mutex<BTreeMap<String, CacheMetrics>>,
}

impl Metrics {
    fn cache_for(&self, cluster: &str) -> CacheMetrics {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(cluster.to_string())
            .or_insert_with(|| CacheMetrics::register(&self.registry, "tokenreview", cluster))
            .clone()
    }
}

pub struct KubeJwtAuthenticator {
    clusters: Arc<ClusterRegistry>,
    config: Arc<KubeJwtConfig>,
    cache: Arc<ReviewCache>,
    reviewers: ReviewerFactory,
    metrics: Arc<Metrics>,
}

impl KubeJwtAuthenticator {
    pub fn new(
        clusters: Arc<ClusterRegistry>,
        config: KubeJwtConfig,
        cache: Arc<ReviewCache>,
        reviewers: ReviewerFactory,
        registry: Arc<Registry>,
    ) -> Self {
        let metrics = Arc::new(Metrics {
            api_calls: registry.counter_vec(
                "meshd_token_review_api_calls",
                "TokenReview calls made to API servers, by cluster and outcome",
                &["cluster", "result"],
            ),
            latency: registry.histogram_vec(
                "meshd_token_review_duration_seconds",
                "TokenReview round-trip time by cluster",
                &["cluster"],
                LATENCY_BUCKETS,
            ),
            registry,
            cache: Mutex::default(),
        });
        Self {
            clusters,
            config: Arc::new(config),
            cache,
            reviewers,
            metrics,
        }
    }
}

/// The token's `exp`, read without verification: it only ever shortens a cache entry.
fn unverified_exp(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(v.get("exp")?.as_u64()?))
}

async fn review_once(
    cluster: Arc<ClusterHandle>,
    reviewer: Arc<dyn TokenReviewer>,
    config: Arc<KubeJwtConfig>,
    metrics: Arc<Metrics>,
    token: String,
) -> super::cache::ReviewOutcome {
    let id = cluster.id.clone();
    let Ok(_permit) = cluster.review_slots.clone().try_acquire_owned() else {
        metrics.api_calls.with(&[&id, "overloaded"]).inc();
        return Err(AuthError::Overloaded { cluster: id });
    };
    let started = Instant::now();
    let result = tokio::time::timeout(config.timeout, reviewer.review(&token, &config.audiences)).await;
    metrics.latency.with(&[&id]).observe(started.elapsed().as_secs_f64());
    let unavailable = |reason: String| AuthError::Unavailable {
        cluster: id.clone(),
        reason,
    };
    let account = match result {
        Err(_) => {
            metrics.api_calls.with(&[&id, "timeout"]).inc();
            return Err(unavailable(format!("no answer within {:?}", config.timeout)));
        }
        Ok(Err(ReviewError::Transport(e))) => {
            metrics.api_calls.with(&[&id, "unreachable"]).inc();
            return Err(unavailable(e));
        }
        Ok(Err(ReviewError::Api { code, message })) => {
            metrics.api_calls.with(&[&id, "api_error"]).inc();
            let hint = if code == 401 || code == 403 {
                " (check the remote secret's token and its tokenreviews RBAC)"
            } else {
                ""
            };
            return Err(unavailable(format!("API server answered {code}: {message}{hint}")));
        }
        Ok(Ok(Err(reason))) => {
            metrics.api_calls.with(&[&id, "rejected"]).inc();
            return Err(AuthError::Rejected(format!("cluster {id:?}: {reason}")));
        }
        Ok(Ok(Ok(account))) => {
            metrics.api_calls.with(&[&id, "authenticated"]).inc();
            account
        }
    };
    let identity = Identity {
        spiffe: SpiffeId::new(&config.trust_domain, &account.namespace, &account.service_account),
        source: AuthSource::TokenReview { cluster: id.clone() },
        cluster_id: Some(id),
        pod_name: account.pod_name,
        pod_uid: account.pod_uid,
    };
    Ok((identity, unverified_exp(&token)))
}

impl Authenticator for KubeJwtAuthenticator {
    fn name(&self) -> &'static str {
        "KubeJWTAuthenticator"
    }

    fn authenticate<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Result<Identity, AuthError>> {
        async move {
            let token = creds
                .bearer
                .as_deref()
                .ok_or_else(|| AuthError::NotPresent("no bearer token (authorization: Bearer <JWT>)".into()))?;
            let cluster = self.clusters.resolve(&creds.cluster_id).map_err(|e| match e {
                ResolveError::Broken { ref id, .. } => AuthError::Unavailable {
                    cluster: id.clone(),
                    reason: e.to_string(),
                },
                other => AuthError::Rejected(other.to_string()),
            })?;
            let key = CacheKey::new(&cluster.id, token, &self.config.audiences);
            let metrics = self.metrics.cache_for(&cluster.id);
            let reviewer = (self.reviewers)(&cluster);
            let fut = review_once(
                Arc::clone(&cluster),
                reviewer,
                Arc::clone(&self.config),
                Arc::clone(&self.metrics),
                token.to_string(),
            );
            self.cache.get_or_review(key, &metrics, fut).await
        }
        .boxed()
    }
}
