//! Bearer tokens reviewed by the caller's own cluster (istiod's KubeJWTAuthenticator), picked by
//! the `clusterid` header, with meshd's review cache in front.
//!
//! Failure classes matter to callers: an invalid token is `Unauthenticated`; an API server that
//! is down, slow or throttling is `Unavailable` naming the cluster (agents retry); too many
//! reviews already in flight for one cluster is `ResourceExhausted`, refused without queueing.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
    Arc::new(|c: &ClusterHandle| Arc::new(KubeTokenReviewer::new(c.review_client.clone())) as Arc<dyn TokenReviewer>)
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
    #[derive(serde::Deserialize)]
    struct Exp {
        exp: u64,
    }
    let e: Exp = super::jwt::peek_segment(token, 1)?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(e.exp))
}

/// Backoff between TokenReviews an API server answered 429 or 503.
const THROTTLE_FIRST_RETRY: Duration = Duration::from_millis(200);
const THROTTLE_MAX_RETRY: Duration = Duration::from_secs(1);

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
    let deadline = started + config.timeout;
    // A throttling (429) or briefly unavailable (503) API server is asked again within the review
    // deadline, with backoff; the review client has kube's own retries off so that meshd sees it.
    let mut throttled: Option<u16> = None;
    let mut backoff = THROTTLE_FIRST_RETRY;
    let result = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, reviewer.review(&token, &config.audiences)).await {
            Ok(Err(ReviewError::Api {
                code: code @ (429 | 503),
                ..
            })) => {
                throttled = Some(code);
                let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
                if wait.is_zero() {
                    break Err(());
                }
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(THROTTLE_MAX_RETRY);
            }
            Ok(other) => break Ok(other),
            Err(_) => break Err(()),
        }
    };
    metrics.latency.with(&[&id]).observe(started.elapsed().as_secs_f64());
    let unavailable = |reason: String| AuthError::Unavailable {
        cluster: id.clone(),
        reason,
    };
    let account = match result {
        Err(()) => {
            let (label, reason) = match throttled {
                Some(429) => (
                    "throttled",
                    format!(
                        "{id}'s API server is throttling (HTTP 429) and did not review the token within {:?}",
                        config.timeout
                    ),
                ),
                Some(code) => (
                    "throttled",
                    format!(
                        "{id}'s API server is unavailable (HTTP {code}) and did not review the token within {:?}",
                        config.timeout
                    ),
                ),
                None => ("timeout", format!("no answer within {:?}", config.timeout)),
            };
            metrics.api_calls.with(&[&id, label]).inc();
            return Err(unavailable(reason));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::cache::CacheConfig;
    use crate::auth::tokenreview::ReviewedAccount;
    use crate::clock::SystemClock;
    use crate::cluster::ClusterSource;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A client that is never called: the reviewer seam replaces every API call.
    fn dummy_client() -> kube::Client {
        let svc = tower::service_fn(|_req: http::Request<kube::client::Body>| async {
            Err::<http::Response<kube::client::Body>, std::io::Error>(std::io::Error::other(
                "no API server in unit tests",
            ))
        });
        kube::Client::new(svc, "default")
    }

    #[derive(Default)]
    struct FakeReviewer {
        calls: AtomicUsize,
        delay: Option<Duration>,
        down: bool,
    }

    impl TokenReviewer for FakeReviewer {
        fn review<'a>(
            &'a self,
            token: &'a str,
            _audiences: &'a [String],
        ) -> BoxFuture<'a, Result<Result<ReviewedAccount, String>, ReviewError>> {
            async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if let Some(d) = self.delay {
                    tokio::time::sleep(d).await;
                }
                if self.down {
                    return Err(ReviewError::Transport("connection refused".into()));
                }
                match token.strip_prefix("good-") {
                    Some(sa) => Ok(Ok(ReviewedAccount {
                        namespace: "istio-system".into(),
                        service_account: sa.into(),
                        pod_name: Some("gw-0".into()),
                        pod_uid: None,
                    })),
                    None => Ok(Err(
                        "token audiences [\"kube\"] is invalid for the target audiences [\"istio-ca\"]".into(),
                    )),
                }
            }
            .boxed()
        }
    }

    struct Setup {
        authn: KubeJwtAuthenticator,
        local: Arc<FakeReviewer>,
        remote: Arc<FakeReviewer>,
    }

    fn setup(local: FakeReviewer, remote: FakeReviewer, max_reviews: usize, timeout: Duration) -> Setup {
        let metrics = Registry::new();
        let mut aliases = BTreeMap::new();
        aliases.insert("old-name".to_string(), "cluster1".to_string());
        let clusters = ClusterRegistry::new(
            "cluster1",
            aliases,
            Some((dummy_client(), dummy_client())),
            max_reviews,
            &metrics,
        );
        clusters.upsert_remote(ClusterHandle::new(
            "cluster2",
            dummy_client(),
            ClusterSource::Secret {
                namespace: "istio-system".into(),
                name: "istio-remote-secret-cluster2".into(),
            },
            None,
            None,
            max_reviews,
        ));
        let (local, remote) = (Arc::new(local), Arc::new(remote));
        let (l2, r2) = (Arc::clone(&local), Arc::clone(&remote));
        let factory: ReviewerFactory = Arc::new(move |c: &ClusterHandle| {
            if c.id == "cluster2" {
                Arc::clone(&r2) as Arc<dyn TokenReviewer>
            } else {
                Arc::clone(&l2) as Arc<dyn TokenReviewer>
            }
        });
        let cache = Arc::new(ReviewCache::new(CacheConfig::default(), Arc::new(SystemClock)));
        let authn = KubeJwtAuthenticator::new(
            clusters,
            KubeJwtConfig {
                trust_domain: "cluster.local".into(),
                audiences: vec!["istio-ca".into()],
                timeout,
            },
            cache,
            factory,
            metrics,
        );
        Setup { authn, local, remote }
    }

    fn creds(token: &str, cluster: &str) -> Credentials {
        Credentials {
            bearer: Some(token.into()),
            cluster_id: cluster.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn clusterid_picks_the_reviewing_cluster() {
        let s = setup(
            FakeReviewer::default(),
            FakeReviewer::default(),
            8,
            Duration::from_secs(5),
        );
        let id = s.authn.authenticate(&creds("good-gw", "cluster2")).await.unwrap();
        assert_eq!(id.spiffe.uri(), "spiffe://cluster.local/ns/istio-system/sa/gw");
        assert_eq!(id.cluster_id.as_deref(), Some("cluster2"));
        assert_eq!(id.pod_name.as_deref(), Some("gw-0"));
        assert_eq!(
            (
                s.local.calls.load(Ordering::SeqCst),
                s.remote.calls.load(Ordering::SeqCst)
            ),
            (0, 1)
        );
        for local in ["", "cluster1", "old-name"] {
            let id = s
                .authn
                .authenticate(&creds(&format!("good-{}", local.len()), local))
                .await
                .unwrap();
            assert_eq!(
                id.cluster_id.as_deref(),
                Some("cluster1"),
                "{local:?} is the local cluster"
            );
        }
    }

    #[tokio::test]
    async fn unknown_cluster_gets_istiods_message() {
        let s = setup(
            FakeReviewer::default(),
            FakeReviewer::default(),
            8,
            Duration::from_secs(5),
        );
        match s.authn.authenticate(&creds("good-gw", "cluster9")).await {
            Err(AuthError::Rejected(m)) => assert_eq!(
                m,
                "client claims to be in cluster \"cluster9\", but we only know about local cluster \"cluster1\" and remote clusters [\"cluster2\"]"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_thousand_calls_cost_one_review() {
        let s = setup(
            FakeReviewer::default(),
            FakeReviewer::default(),
            8,
            Duration::from_secs(5),
        );
        let mut set = tokio::task::JoinSet::new();
        let authn = Arc::new(s.authn);
        for _ in 0..1000 {
            let a = Arc::clone(&authn);
            set.spawn(async move { a.authenticate(&creds("good-gw", "cluster2")).await.is_ok() });
        }
        while let Some(ok) = set.join_next().await {
            assert!(ok.unwrap());
        }
        assert_eq!(s.remote.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn rejection_is_unauthenticated_outage_is_unavailable() {
        let s = setup(
            FakeReviewer::default(),
            FakeReviewer {
                down: true,
                ..Default::default()
            },
            8,
            Duration::from_secs(5),
        );
        assert!(matches!(
            s.authn.authenticate(&creds("bad", "cluster1")).await,
            Err(AuthError::Rejected(m)) if m.contains("audiences")
        ));
        assert!(matches!(
            s.authn.authenticate(&creds("good-gw", "cluster2")).await,
            Err(AuthError::Unavailable { cluster, .. }) if cluster == "cluster2"
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn slow_api_server_times_out_as_unavailable() {
        let s = setup(
            FakeReviewer::default(),
            FakeReviewer {
                delay: Some(Duration::from_secs(60)),
                ..Default::default()
            },
            8,
            Duration::from_secs(5),
        );
        let started = tokio::time::Instant::now();
        match s.authn.authenticate(&creds("good-gw", "cluster2")).await {
            Err(AuthError::Unavailable { cluster, reason }) => {
                assert_eq!(cluster, "cluster2");
                assert!(reason.contains("5s"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn overflow_is_refused_fast_not_queued() {
        let s = setup(
            FakeReviewer::default(),
            FakeReviewer {
                delay: Some(Duration::from_secs(2)),
                ..Default::default()
            },
            2,
            Duration::from_secs(5),
        );
        let authn = Arc::new(s.authn);
        let mut slow = Vec::new();
        for i in 0..2 {
            let a = Arc::clone(&authn);
            slow.push(tokio::spawn(async move {
                a.authenticate(&creds(&format!("good-{i}"), "cluster2")).await
            }));
        }
        tokio::task::yield_now().await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        let r = authn.authenticate(&creds("good-third", "cluster2")).await;
        assert!(
            matches!(r, Err(AuthError::Overloaded { ref cluster }) if cluster == "cluster2"),
            "{r:?}"
        );
        assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
        for t in slow {
            assert!(t.await.unwrap().is_ok());
        }
    }
}
