//! Cluster id → client, with istiod's lookup rules for the `clusterid` header.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::AbortHandle;

use crate::admin::Registry;
use crate::admin::metrics::GaugeVec;

/// Where a cluster's credentials came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum ClusterSource {
    /// meshd's own cluster (in-cluster config or `--kubeconfig`).
    Local,
    /// A remote secret `namespace/name`.
    Secret { namespace: String, name: String },
    /// A file in `--remote-kubeconfig-dir`.
    File { path: String },
}

impl std::fmt::Display for ClusterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterSource::Local => f.write_str("local"),
            ClusterSource::Secret { namespace, name } => write!(f, "secret {namespace}/{name}"),
            ClusterSource::File { path } => write!(f, "file {path}"),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Status {
    synced: bool,
    last_error: Option<String>,
}

/// One usable cluster.
pub struct ClusterHandle {
    pub id: String,
    pub client: kube::Client,
    /// The same credentials without kube's retries, for TokenReview (see `kubeconfig::review_client`).
    pub review_client: kube::Client,
    pub source: ClusterSource,
    pub server: Option<String>,
    /// sha256 of the kubeconfig it was built from (remote clusters).
    pub kubeconfig_sha256: Option<[u8; 32]>,
    /// Bounds concurrent TokenReviews against this cluster's API server.
    pub review_slots: Arc<Semaphore>,
    pub added_at: Instant,
    status: Mutex<Status>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl std::fmt::Debug for ClusterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHandle")
            .field("id", &self.id)
            .field("source", &self.source)
            .field("server", &self.server)
            .finish()
    }
}

impl ClusterHandle {
    pub fn new(
        id: &str,
        client: kube::Client,
        source: ClusterSource,
        server: Option<String>,
        kubeconfig_sha256: Option<[u8; 32]>,
        max_concurrent_reviews: usize,
    ) -> Arc<Self> {
        Self::with_review_client(
            id,
            client.clone(),
            client,
            source,
            server,
            kubeconfig_sha256,
            max_concurrent_reviews,
        )
    }

    /// [`ClusterHandle::new`] with a separate TokenReview client.
    pub fn with_review_client(
        id: &str,
        client: kube::Client,
        review_client: kube::Client,
        source: ClusterSource,
        server: Option<String>,
        kubeconfig_sha256: Option<[u8; 32]>,
        max_concurrent_reviews: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            id: id.into(),
            client,
            review_client,
            source,
            server,
            kubeconfig_sha256,
            review_slots: Arc::new(Semaphore::new(max_concurrent_reviews.max(1))),
            added_at: Instant::now(),
            status: Mutex::default(),
            tasks: Mutex::default(),
        })
    }

    /// Runs a task for as long as this cluster is registered; it is aborted on removal.
    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let h = tokio::spawn(fut);
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(h.abort_handle());
    }

    pub fn set_synced(&self) {
        let mut s = self.status.lock().unwrap_or_else(|e| e.into_inner());
        s.synced = true;
        s.last_error = None;
    }

    pub fn set_error(&self, e: impl Into<String>) {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).last_error = Some(e.into());
    }

    pub fn is_synced(&self) -> bool {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).synced
    }

    pub fn last_error(&self) -> Option<String> {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).last_error.clone()
    }

    pub(crate) fn stop(&self) {
        for t in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
    }
}

impl Drop for ClusterHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Components that run something per cluster (service discovery, root-cert writers, …).
pub trait ClusterHandler: Send + Sync {
    fn cluster_added(&self, cluster: &Arc<ClusterHandle>);
    fn cluster_removed(&self, id: &str);
}

/// A cluster named by a source whose credentials could not be used.
#[derive(Debug, Clone, Serialize)]
pub struct BrokenCluster {
    pub source: ClusterSource,
    pub error: String,
    #[serde(skip)]
    pub since: SystemTime,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error(
        "client claims to be in cluster {claimed:?}, but we only know about local cluster {local:?} and remote clusters {remotes:?}"
    )]
    Unknown {
        claimed: String,
        local: String,
        remotes: Vec<String>,
    },
    #[error(
        "cluster {claimed:?} is the local cluster, but meshd runs without a Kubernetes API server (standalone); send a clusterid of a configured remote cluster"
    )]
    NoLocal { claimed: String },
    #[error("cluster {id:?} is configured by {source_desc} but unusable: {error}")]
    Broken {
        id: String,
        source_desc: String,
        error: String,
    },
}

/// One row of `/debug/clusterz`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterInfo {
    pub id: String,
    pub source: ClusterSource,
    pub server: Option<String>,
    pub synced: bool,
    pub error: Option<String>,
}

struct Metrics {
    managed: GaugeVec,
    status: GaugeVec,
    refused: GaugeVec,
}

/// All clusters meshd knows about.
pub struct ClusterRegistry {
    local_id: String,
    aliases: BTreeMap<String, String>,
    local: Option<Arc<ClusterHandle>>,
    remotes: RwLock<BTreeMap<String, Arc<ClusterHandle>>>,
    broken: RwLock<BTreeMap<String, BrokenCluster>>,
    /// Working clusters whose source changed to credentials that cannot be used: the previous
    /// client keeps serving (istiod keeps its last good client), and this says why.
    refused: RwLock<BTreeMap<String, BrokenCluster>>,
    handlers: RwLock<Vec<Arc<dyn ClusterHandler>>>,
    max_concurrent_reviews: usize,
    metrics: Metrics,
}

impl std::fmt::Debug for ClusterRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterRegistry")
            .field("local_id", &self.local_id)
            .finish()
    }
}

impl ClusterRegistry {
    pub fn new(
        local_id: &str,
        aliases: BTreeMap<String, String>,
        local_client: Option<(kube::Client, kube::Client)>,
        max_concurrent_reviews: usize,
        registry: &Registry,
    ) -> Arc<Self> {
        let local = local_client.map(|(c, review)| {
            let h = ClusterHandle::with_review_client(
                local_id,
                c,
                review,
                ClusterSource::Local,
                None,
                None,
                max_concurrent_reviews,
            );
            h.set_synced();
            h
        });
        let metrics = Metrics {
            managed: registry.gauge_vec(
                "istiod_managed_clusters",
                "Number of clusters managed by istiod",
                &["cluster_type"],
            ),
            status: registry.gauge_vec(
                "meshd_remote_cluster_healthy",
                "1 when a remote cluster's credentials work and its API server answers, else 0",
                &["cluster"],
            ),
            refused: registry.gauge_vec(
                "meshd_remote_secret_refused",
                "1 while a remote cluster's changed secret is refused and its previous credentials keep serving",
                &["cluster"],
            ),
        };
        let r = Arc::new(Self {
            local_id: local_id.into(),
            aliases,
            local,
            remotes: RwLock::default(),
            broken: RwLock::default(),
            refused: RwLock::default(),
            handlers: RwLock::default(),
            max_concurrent_reviews,
            metrics,
        });
        r.update_counts();
        r
    }

    pub fn local_id(&self) -> &str {
        &self.local_id
    }

    pub fn local(&self) -> Option<&Arc<ClusterHandle>> {
        self.local.as_ref()
    }

    pub fn max_concurrent_reviews(&self) -> usize {
        self.max_concurrent_reviews
    }

    /// Whether `id` names the local cluster (itself, an alias of it, or empty).
    pub fn is_local(&self, id: &str) -> bool {
        id.is_empty() || id == self.local_id || self.aliases.get(id).is_some_and(|real| *real == self.local_id)
    }

    /// The cluster a caller's `clusterid` header picks (istiod's `getKubeClient` rules).
    pub fn resolve(&self, claimed: &str) -> Result<Arc<ClusterHandle>, ResolveError> {
        if self.is_local(claimed) {
            return self.local.clone().ok_or_else(|| ResolveError::NoLocal {
                claimed: claimed.to_string(),
            });
        }
        let target = self.aliases.get(claimed).map(String::as_str).unwrap_or(claimed);
        if let Some(c) = self.remote(claimed).or_else(|| self.remote(target)) {
            return Ok(c);
        }
        if let Some(b) = self.broken.read().unwrap_or_else(|e| e.into_inner()).get(target) {
            return Err(ResolveError::Broken {
                id: target.to_string(),
                source_desc: b.source.to_string(),
                error: b.error.clone(),
            });
        }
        Err(ResolveError::Unknown {
            claimed: claimed.to_string(),
            local: self.local_id.clone(),
            remotes: self.remote_ids(),
        })
    }

    pub fn remote(&self, id: &str) -> Option<Arc<ClusterHandle>> {
        self.remotes.read().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    pub fn remote_ids(&self) -> Vec<String> {
        self.remotes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub fn remotes(&self) -> Vec<Arc<ClusterHandle>> {
        self.remotes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Every usable cluster, local first.
    pub fn all(&self) -> Vec<Arc<ClusterHandle>> {
        self.local.iter().cloned().chain(self.remotes()).collect()
    }

    /// Registers (or replaces) a remote cluster and tells the handlers.
    pub fn upsert_remote(&self, handle: Arc<ClusterHandle>) {
        let id = handle.id.clone();
        self.broken.write().unwrap_or_else(|e| e.into_inner()).remove(&id);
        self.clear_refused(&id);
        let old = self
            .remotes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), Arc::clone(&handle));
        let handlers = self.handlers.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(old) = old {
            old.stop();
            for h in &handlers {
                h.cluster_removed(&id);
            }
        }
        for h in &handlers {
            h.cluster_added(&handle);
        }
        self.metrics
            .status
            .with(&[&id])
            .set(if handle.last_error().is_some() { 0.0 } else { 1.0 });
        self.update_counts();
        tracing::info!(cluster = %id, source = %handle.source, server = ?handle.server, "remote cluster registered");
    }

    /// Removes a remote cluster (and any broken record of it).
    pub fn remove_remote(&self, id: &str) {
        self.clear_refused(id);
        let old = self.remotes.write().unwrap_or_else(|e| e.into_inner()).remove(id);
        let was_broken = self
            .broken
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
            .is_some();
        if let Some(old) = old {
            old.stop();
            for h in self.handlers.read().unwrap_or_else(|e| e.into_inner()).clone() {
                h.cluster_removed(id);
            }
            tracing::info!(cluster = %id, "remote cluster removed");
        }
        if was_broken || self.remote(id).is_none() {
            self.metrics.status.remove(&[id]);
        }
        self.update_counts();
    }

    /// Records that a source names `id` but its credentials cannot be used. A working client for
    /// the same id keeps serving (istiod keeps its last good client): the refusal is recorded
    /// for `/debug/clusterz` and `meshd_remote_secret_refused` instead.
    pub fn mark_broken(&self, id: &str, source: ClusterSource, error: String) {
        if self.remote(id).is_some() {
            tracing::warn!(cluster = %id, source = %source, error = %error, "remote secret changed to credentials that cannot be used; keeping the previous client");
            self.refused.write().unwrap_or_else(|e| e.into_inner()).insert(
                id.to_string(),
                BrokenCluster {
                    source,
                    error,
                    since: SystemTime::now(),
                },
            );
            self.metrics.refused.with(&[id]).set(1.0);
            return;
        }
        tracing::warn!(cluster = %id, source = %source, error = %error, "remote cluster is unusable");
        self.broken.write().unwrap_or_else(|e| e.into_inner()).insert(
            id.to_string(),
            BrokenCluster {
                source,
                error,
                since: SystemTime::now(),
            },
        );
        self.metrics.status.with(&[id]).set(0.0);
    }

    fn clear_refused(&self, id: &str) {
        if self
            .refused
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id)
            .is_some()
        {
            self.metrics.refused.remove(&[id]);
        }
    }

    /// Why a working cluster's changed secret is refused, if it is.
    pub fn refused(&self, id: &str) -> Option<String> {
        self.refused
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|b| b.error.clone())
    }

    /// Reports a working cluster's health (after a probe or an API failure).
    pub fn report_health(&self, id: &str, error: Option<String>) {
        if let Some(c) = self.remote(id) {
            match &error {
                None => c.set_synced(),
                Some(e) => c.set_error(e.clone()),
            }
            self.metrics
                .status
                .with(&[id])
                .set(if error.is_none() { 1.0 } else { 0.0 });
        }
    }

    pub fn add_handler(&self, h: Arc<dyn ClusterHandler>) {
        for c in self.all() {
            h.cluster_added(&c);
        }
        self.handlers.write().unwrap_or_else(|e| e.into_inner()).push(h);
    }

    /// Rows for `/debug/clusterz`.
    pub fn snapshot(&self) -> Vec<ClusterInfo> {
        let mut out: Vec<ClusterInfo> = self
            .all()
            .iter()
            .map(|c| ClusterInfo {
                id: c.id.clone(),
                source: c.source.clone(),
                server: c.server.clone(),
                synced: c.is_synced(),
                error: match self.refused(&c.id) {
                    Some(e) => Some(format!(
                        "the remote secret's new credentials are refused ({e}); the previous ones keep serving"
                    )),
                    None => c.last_error(),
                },
            })
            .collect();
        for (id, b) in self.broken.read().unwrap_or_else(|e| e.into_inner()).iter() {
            out.push(ClusterInfo {
                id: id.clone(),
                source: b.source.clone(),
                server: None,
                synced: false,
                error: Some(b.error.clone()),
            });
        }
        out
    }

    /// True once every remote cluster has answered, failed, or had `grace` to do so.
    pub fn remotes_settled(&self, grace: Duration) -> bool {
        self.remotes()
            .iter()
            .all(|c| c.is_synced() || c.last_error().is_some() || c.added_at.elapsed() >= grace)
    }

    fn update_counts(&self) {
        self.metrics
            .managed
            .with(&["local"])
            .set(if self.local.is_some() { 1.0 } else { 0.0 });
        let n = self.remotes.read().unwrap_or_else(|e| e.into_inner()).len();
        self.metrics.managed.with(&["remote"]).set(n as f64);
    }
}
