//! Root certificate distribution (reference §1.6, §4.4): ConfigMap `istio-ca-root-cert`, data key
//! `root-cert.pem` = the mesh root bundle, label `istio.io/config: "true"`, in every namespace
//! except `kube-public`, `kube-node-lease` and `local-path-storage` — in the local cluster, and in
//! each remote cluster whose system namespace lists this cluster (or `*`) in
//! `topology.istio.io/controlPlaneClusters`. Injected sidecars mount it to verify meshd's serving
//! certificate, so a remote pod cannot start its proxy without it.
//!
//! Per cluster there is one writer among all meshd replicas: the holder of Lease
//! `istio-namespace-controller-election` in that cluster's system namespace. The writer watches
//! namespaces and the ConfigMaps of that one name (field selector), and after each burst of
//! events (debounced) creates missing ConfigMaps and repairs edited ones; a root change
//! (`CaStore::subscribe`) updates them all. Other ConfigMaps are never read or written.
//!
//! The same per-cluster leadership runs further [`LeaderJob`]s beside the ConfigMap writer (the
//! webhook caBundle patcher, `src/webhook/cabundle.rs`): they start when this replica acquires
//! the cluster's Lease and are cancelled when it loses it, in the local cluster and in every
//! remote cluster that names this control plane.
mod leader;
pub mod plan;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::Registry;
use crate::admin::metrics::{CounterVec, GaugeVec};
use crate::ca::CaStore;
use crate::cluster::{ClusterHandle, ClusterHandler, ClusterSource};
use crate::config::ServeArgs;

pub use leader::lease_timing;

/// istiod's `PILOT_CA_CERT_CONFIGMAP` default.
pub const CONFIGMAP_NAME: &str = "istio-ca-root-cert";
/// istiod's `CACertNamespaceConfigMapDataName`.
pub const DATA_KEY: &str = "root-cert.pem";
pub const CONFIGMAP_LABEL: &str = "istio.io/config";
pub const CONFIGMAP_LABEL_VALUE: &str = "true";
/// Namespaces that never get the ConfigMap.
pub const EXCLUDED_NAMESPACES: [&str; 3] = ["kube-public", "kube-node-lease", "local-path-storage"];
/// The Lease istiod's namespace controller elects with.
pub const LEASE_NAME: &str = "istio-namespace-controller-election";
/// On a remote cluster's system namespace: the control planes that manage it.
pub const CONTROL_PLANE_CLUSTERS_ANNOTATION: &str = "topology.istio.io/controlPlaneClusters";
/// Field manager of meshd's writes.
pub const FIELD_MANAGER: &str = "meshd";

/// How the distributor behaves.
#[derive(Debug, Clone)]
pub struct RootCertConfig {
    /// This meshd's cluster id, matched against `topology.istio.io/controlPlaneClusters`.
    pub cluster_id: String,
    /// Where the Lease lives and whose annotation is read, in every cluster.
    pub system_namespace: String,
    /// Holder identity in the Lease; unique per meshd process.
    pub identity: String,
    pub lease_duration: Duration,
    /// Quiet time after an event before reconciling.
    pub debounce: Duration,
}

impl RootCertConfig {
    pub fn from_args(args: &ServeArgs) -> Self {
        Self {
            cluster_id: args.cluster_id.clone(),
            system_namespace: args.system_namespace.clone(),
            identity: holder_identity(args.pod_name.as_deref()),
            lease_duration: args.leader_election_lease_duration,
            debounce: Duration::from_millis(100),
        }
    }
}

/// `<pod name or host name>-<random>`: the random part keeps two meshd processes on one host
/// (or a restarted pod reusing its name) apart.
pub fn holder_identity(pod_name: Option<&str>) -> String {
    let base = pod_name
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .or_else(|| {
            ["/proc/sys/kernel/hostname", "/etc/hostname"]
                .iter()
                .find_map(|p| std::fs::read_to_string(p).ok())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "meshd".to_string());
    format!("{base}-{:08x}", rand::random::<u32>())
}

pub(crate) struct Metrics {
    pub writes: CounterVec,
    pub write_errors: CounterVec,
    pub leader: GaugeVec,
    pub controlled: GaugeVec,
}

impl Metrics {
    fn register(r: &Registry) -> Self {
        Self {
            writes: r.counter_vec(
                "meshd_root_cert_configmap_writes",
                "istio-ca-root-cert ConfigMaps written, by cluster and op (create, update)",
                &["cluster", "op"],
            ),
            write_errors: r.counter_vec(
                "meshd_root_cert_configmap_write_errors",
                "Failed istio-ca-root-cert writes, by cluster and op",
                &["cluster", "op"],
            ),
            leader: r.gauge_vec(
                "meshd_root_cert_leader",
                "1 while this replica holds the root-cert lease of the cluster",
                &["cluster"],
            ),
            controlled: r.gauge_vec(
                "meshd_root_cert_controlled_cluster",
                "1 when meshd distributes the root certificate in the cluster (local, or a remote naming it in topology.istio.io/controlPlaneClusters)",
                &["cluster"],
            ),
        }
    }
}

/// Work done in a cluster only while this replica holds that cluster's Lease, next to (or
/// instead of) the istio-ca-root-cert writer.
pub trait LeaderJob: Send + Sync {
    /// The leader's work in `cluster`. It is started each time the Lease is acquired and dropped
    /// (cancelled) when it is lost or meshd stops; it should not return on its own (if it does,
    /// every job of the cluster is restarted).
    fn lead(&self, client: kube::Client, cluster: String) -> BoxFuture<'static, ()>;
}

/// State shared by every cluster's tasks.
pub(crate) struct Shared {
    pub cfg: RootCertConfig,
    pub ca: Arc<CaStore>,
    pub metrics: Metrics,
    active: watch::Sender<usize>,
    /// Whether the leader writes istio-ca-root-cert (`--root-cert-configmaps`).
    pub write_configmaps: bool,
    /// Further work of the leader.
    pub jobs: Vec<Arc<dyn LeaderJob>>,
}

/// Counts a running task until dropped (also when aborted).
pub(crate) struct ActiveGuard(watch::Sender<usize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Shared {
    pub(crate) fn enter(&self) -> ActiveGuard {
        self.active.send_modify(|n| *n += 1);
        ActiveGuard(self.active.clone())
    }
}

/// The [`ClusterHandler`] that runs a writer in the local cluster and a gate (annotation watch,
/// then a writer) in each remote cluster.
pub struct RootCertDistributor {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for RootCertDistributor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootCertDistributor")
            .field("cfg", &self.shared.cfg)
            .finish()
    }
}

impl RootCertDistributor {
    pub fn new(cfg: RootCertConfig, ca: Arc<CaStore>, registry: &Registry) -> Arc<Self> {
        Self::with_jobs(cfg, ca, registry, true, Vec::new())
    }

    /// A distributor whose per-cluster leader also runs `jobs`; with `write_configmaps` false
    /// the leader runs only them (the Lease and the controlPlaneClusters rule stay the same).
    pub fn with_jobs(
        cfg: RootCertConfig,
        ca: Arc<CaStore>,
        registry: &Registry,
        write_configmaps: bool,
        jobs: Vec<Arc<dyn LeaderJob>>,
    ) -> Arc<Self> {
        let (stop, _) = watch::channel(false);
        let (active, _) = watch::channel(0);
        Arc::new(Self {
            shared: Arc::new(Shared {
                cfg,
                ca,
                metrics: Metrics::register(registry),
                active,
                write_configmaps,
                jobs,
            }),
            stop,
        })
    }

    pub fn config(&self) -> &RootCertConfig {
        &self.shared.cfg
    }

    /// Stops every writer, releasing held leases so another replica takes over at once; waits
    /// up to `timeout` for that.
    pub async fn stop(&self, timeout: Duration) {
        self.stop.send_replace(true);
        let mut active = self.shared.active.subscribe();
        if tokio::time::timeout(timeout, active.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            tracing::warn!("root-cert writers did not stop in time");
        }
    }

    /// A task that calls [`stop`](Self::stop) when `shutdown` turns true (for `Meshd::shutdown`).
    pub fn spawn_stop_on(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|s| *s).await;
            me.stop(Duration::from_secs(5)).await;
        })
    }
}

impl ClusterHandler for RootCertDistributor {
    fn cluster_added(&self, cluster: &Arc<ClusterHandle>) {
        if *self.stop.borrow() {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let stop = self.stop.subscribe();
        if cluster.source == ClusterSource::Local {
            shared.metrics.controlled.with(&[&cluster.id]).set(1.0);
            let w = writer::Writer {
                shared,
                client: cluster.client.clone(),
                cluster: cluster.id.clone(),
            };
            cluster.spawn(w.run(stop));
        } else {
            cluster.spawn(gate(shared, cluster.client.clone(), cluster.id.clone(), stop));
        }
    }

    fn cluster_removed(&self, id: &str) {
        // The registry aborts the cluster's tasks. A lease this replica held is not released:
        // a replacement client for the same cluster (rotated credentials) takes it back at once
        // under the same identity, and otherwise it expires for the other replicas.
        self.shared.metrics.controlled.remove(&[id]);
        self.shared.metrics.leader.remove(&[id]);
    }
}

/// A writer running as its own task, stopped gracefully or aborted when dropped.
struct Child {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Child {
    fn spawn(w: writer::Writer) -> Self {
        let (stop, rx) = watch::channel(false);
        Self {
            stop,
            task: Some(tokio::spawn(w.run(rx))),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let abort = t.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), t).await.is_err() {
                abort.abort();
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// For a remote cluster: watches its system namespace and runs a writer only while the
/// namespace's `topology.istio.io/controlPlaneClusters` names this cluster (or `*`).
async fn gate(shared: Arc<Shared>, client: kube::Client, cluster: String, mut stop: watch::Receiver<bool>) {
    let _active = shared.enter();
    let cfg = &shared.cfg;
    let api: Api<Namespace> = Api::all(client.clone());
    let wc = watcher::Config::default().fields(&format!("metadata.name={}", cfg.system_namespace));
    let mut stream = watcher::watcher(api, wc).default_backoff().boxed();
    let mut child: Option<Child> = None;
    let mut listed_it = false;
    let controlled = shared.metrics.controlled.with(&[&cluster]);
    controlled.set(0.0);
    loop {
        let ev = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            ev = stream.next() => ev,
        };
        let lead = match ev {
            Some(Ok(Event::Init)) => {
                listed_it = false;
                continue;
            }
            Some(Ok(Event::InitApply(ns) | Event::Apply(ns))) => {
                listed_it = true;
                plan::should_lead(ns.metadata.annotations.as_ref(), &cfg.cluster_id)
            }
            Some(Ok(Event::InitDone)) if listed_it => continue,
            Some(Ok(Event::InitDone | Event::Delete(_))) => false,
            Some(Err(e)) => {
                tracing::warn!(cluster = %cluster, namespace = %cfg.system_namespace, error = %e, "watching the remote system namespace");
                continue;
            }
            None => break,
        };
        match (lead, child.is_some()) {
            (true, false) => {
                tracing::info!(cluster = %cluster, annotation = CONTROL_PLANE_CLUSTERS_ANNOTATION, local_cluster = %cfg.cluster_id, "remote cluster names this control plane; distributing the root certificate there");
                controlled.set(1.0);
                child = Some(Child::spawn(writer::Writer {
                    shared: Arc::clone(&shared),
                    client: client.clone(),
                    cluster: cluster.clone(),
                }));
            }
            (false, true) => {
                tracing::info!(cluster = %cluster, annotation = CONTROL_PLANE_CLUSTERS_ANNOTATION, local_cluster = %cfg.cluster_id, "remote cluster no longer names this control plane; stopped distributing there");
                controlled.set(0.0);
                if let Some(c) = child.take() {
                    c.stop().await;
                }
            }
            _ => {}
        }
    }
    if let Some(c) = child.take() {
        c.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_differ_per_process_and_keep_the_pod_name() {
        let a = holder_identity(Some("istiod-abc"));
        let b = holder_identity(Some("istiod-abc"));
        assert!(a.starts_with("istiod-abc-") && b.starts_with("istiod-abc-"));
        assert_ne!(a, b);
        let h = holder_identity(None);
        assert!(h.len() > 9, "{h}");
        assert!(holder_identity(Some("  ")).len() > 9);
    }
}
