//! Remote secrets: Secrets labelled `istio/multiCluster=true` in the system namespace, each data
//! key a cluster id holding a kubeconfig (reference §4.1). The same reconciliation serves the
//! `--remote-kubeconfig-dir` source.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{Mutex, watch};

use super::kubeconfig::{self, AllowedOptions};
use super::registry::{ClusterHandle, ClusterRegistry, ClusterSource};
use crate::admin::Registry;
use crate::admin::metrics::CounterVec;

/// Label that marks a remote secret.
pub const MULTICLUSTER_LABEL: &str = "istio/multiCluster";
/// How often a registered cluster's API server is probed for `/debug/clusterz`.
const PROBE_EVERY: Duration = Duration::from_secs(30);
/// How often a working cluster's changed, not yet answering credentials are tried again.
const PENDING_RETRY: Duration = Duration::from_secs(10);

/// Turns kubeconfig sources into registered clusters, rebuilding a client only when the
/// kubeconfig's sha256 changes.
pub struct RemoteConfigs {
    registry: Arc<ClusterRegistry>,
    allowed: AllowedOptions,
    read_timeout: Duration,
    /// source key → (cluster id → kubeconfig sha256)
    owned: Mutex<BTreeMap<String, BTreeMap<String, [u8; 32]>>>,
    /// Cluster id → a client built from a working cluster's changed secret whose API server
    /// did not answer yet: it replaces the working client once it does.
    pending: std::sync::Mutex<BTreeMap<String, Arc<ClusterHandle>>>,
    events: CounterVec,
}

impl RemoteConfigs {
    pub fn new(
        registry: Arc<ClusterRegistry>,
        allowed: AllowedOptions,
        read_timeout: Duration,
        metrics: &Registry,
    ) -> Arc<Self> {
        Arc::new(Self {
            registry,
            allowed,
            read_timeout,
            owned: Mutex::default(),
            pending: std::sync::Mutex::default(),
            events: metrics.counter_vec(
                "remote_cluster_secret_events_total",
                "Remote cluster configuration events",
                &["event"],
            ),
        })
    }

    pub fn registry(&self) -> &Arc<ClusterRegistry> {
        &self.registry
    }

    /// Makes the clusters of `source_key` exactly `entries` (cluster id → kubeconfig bytes).
    pub async fn apply_source(
        &self,
        source_key: &str,
        source_of: &(dyn Fn(&str) -> ClusterSource + Send + Sync),
        entries: BTreeMap<String, Vec<u8>>,
    ) {
        let mut owned = self.owned.lock().await;
        let prev = owned.get(source_key).cloned().unwrap_or_default();
        for id in prev.keys().filter(|id| !entries.contains_key(*id)) {
            self.events.with(&["delete"]).inc();
            self.stop_pending(id);
            self.registry.remove_remote(id);
        }
        let mut now_owned = BTreeMap::new();
        for (id, bytes) in entries {
            if self.registry.is_local(&id) {
                tracing::warn!(cluster = %id, source = %source_of(&id), "ignoring remote kubeconfig for the local cluster id: it would overwrite the local cluster");
                continue;
            }
            if let Some((other, _)) = owned
                .iter()
                .find(|(k, ids)| k.as_str() != source_key && ids.contains_key(&id))
            {
                tracing::warn!(cluster = %id, source = %source_of(&id), registered_by = %other, "cluster has already been registered by another source; skipping");
                continue;
            }
            let sha = crate::pki::sha256(&bytes);
            now_owned.insert(id.clone(), sha);
            if prev.get(&id) == Some(&sha) {
                continue;
            }
            self.events
                .with(&[if prev.contains_key(&id) { "update" } else { "add" }])
                .inc();
            self.stop_pending(&id);
            let working = self.registry.remote(&id).is_some();
            match self.build(&id, &bytes, source_of(&id), sha).await {
                // A working cluster moves to new credentials only once they reach its API
                // server; until then the previous client keeps serving.
                Ok(handle) if working => {
                    if let Err(e) = answers(&handle.client).await {
                        self.registry.mark_broken(
                            &id,
                            source_of(&id),
                            format!("the API server does not answer with the new kubeconfig: {e}"),
                        );
                        let registry = Arc::clone(&self.registry);
                        handle.spawn(switch_when_reachable(registry, Arc::downgrade(&handle)));
                        self.pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(id.clone(), handle);
                    } else {
                        register(&self.registry, handle);
                    }
                }
                Ok(handle) => register(&self.registry, handle),
                Err(e) => self.registry.mark_broken(&id, source_of(&id), e),
            }
        }
        if now_owned.is_empty() {
            owned.remove(source_key);
        } else {
            owned.insert(source_key.to_string(), now_owned);
        }
    }

    pub async fn remove_source(&self, source_key: &str) {
        let removed = self.owned.lock().await.remove(source_key).unwrap_or_default();
        for id in removed.keys() {
            self.events.with(&["delete"]).inc();
            self.stop_pending(id);
            self.registry.remove_remote(id);
        }
    }

    /// Drops a client still waiting to replace `id`'s working one (unless it already has).
    fn stop_pending(&self, id: &str) {
        if let Some(h) = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(id)
            && !self.registry.remote(id).is_some_and(|r| Arc::ptr_eq(&r, &h))
        {
            h.stop();
        }
    }

    /// Source keys currently holding clusters.
    pub async fn sources(&self) -> Vec<String> {
        self.owned.lock().await.keys().cloned().collect()
    }

    async fn build(
        &self,
        id: &str,
        bytes: &[u8],
        source: ClusterSource,
        sha: [u8; 32],
    ) -> Result<Arc<ClusterHandle>, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "kubeconfig is not UTF-8 text".to_string())?;
        let kc = kubeconfig::sanitize(text, &self.allowed).map_err(|e| e.to_string())?;
        let server = kubeconfig::server_url(&kc);
        let (client, review_client) = kubeconfig::client(kc, self.read_timeout)
            .await
            .map_err(|e| e.to_string())?;
        Ok(ClusterHandle::with_review_client(
            id,
            client,
            review_client,
            source,
            server,
            Some(sha),
            self.registry.max_concurrent_reviews(),
        ))
    }
}

/// Registers a cluster and starts its health probe.
fn register(registry: &Arc<ClusterRegistry>, handle: Arc<ClusterHandle>) {
    registry.upsert_remote(Arc::clone(&handle));
    let h = Arc::clone(&handle);
    handle.spawn(probe(Arc::clone(registry), Arc::downgrade(&h)));
}

/// Whether a client's API server answers (its version), within a few seconds.
async fn answers(client: &kube::Client) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 5s".into()),
    }
}

/// A pending client (a working cluster's changed secret) replaces the working one as soon as its
/// API server answers; it is stopped (and this task with it) if the secret changes again or goes.
async fn switch_when_reachable(registry: Arc<ClusterRegistry>, handle: std::sync::Weak<ClusterHandle>) {
    loop {
        tokio::time::sleep(PENDING_RETRY).await;
        let Some(h) = handle.upgrade() else { return };
        if answers(&h.client).await.is_ok() {
            tracing::info!(cluster = %h.id, "the remote secret's new credentials answer now; switching to them");
            register(&registry, h);
            return;
        }
    }
}

/// Asks the cluster's API server for its version until it answers, then every 30 s, so
/// `/debug/clusterz` and the health metric show unreachable clusters.
async fn probe(registry: Arc<ClusterRegistry>, handle: std::sync::Weak<ClusterHandle>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let Some(h) = handle.upgrade() else { return };
        let result = tokio::time::timeout(Duration::from_secs(10), h.client.apiserver_version()).await;
        let id = h.id.clone();
        drop(h);
        match result {
            Ok(Ok(_)) => {
                registry.report_health(&id, None);
                backoff = Duration::from_millis(500);
                tokio::time::sleep(PROBE_EVERY).await;
            }
            Ok(Err(e)) => {
                registry.report_health(&id, Some(format!("API server unreachable: {e}")));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(PROBE_EVERY);
            }
            Err(_) => {
                registry.report_health(&id, Some("API server did not answer within 10s".into()));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(PROBE_EVERY);
            }
        }
    }
}

fn secret_entries(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .as_ref()
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default();
    // stringData is write-only on a real API server, but accept it if a source shows it.
    if let Some(sd) = &s.string_data {
        for (k, v) in sd {
            out.entry(k.clone()).or_insert_with(|| v.clone().into_bytes());
        }
    }
    out
}

fn secret_key(s: &Secret) -> (String, String) {
    (
        s.metadata.namespace.clone().unwrap_or_default(),
        s.metadata.name.clone().unwrap_or_default(),
    )
}

/// Watches remote secrets in `namespace`; `listed` turns true after the first full list.
pub fn spawn_secret_watcher(
    configs: Arc<RemoteConfigs>,
    client: kube::Client,
    namespace: String,
    listed: watch::Sender<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: kube::Api<Secret> = kube::Api::namespaced(client, &namespace);
        let cfg = watcher::Config::default().labels(&format!("{MULTICLUSTER_LABEL}=true"));
        let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
        let mut seen_in_relist: Option<Vec<String>> = None;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Init) => seen_in_relist = Some(Vec::new()),
                Ok(Event::InitApply(s)) => {
                    let (ns, name) = secret_key(&s);
                    if let Some(seen) = seen_in_relist.as_mut() {
                        seen.push(source_key(&ns, &name));
                    }
                    apply_secret(&configs, &s).await;
                }
                Ok(Event::InitDone) => {
                    // Secrets deleted while we were not watching.
                    if let Some(seen) = seen_in_relist.take() {
                        for key in configs.sources().await {
                            if key.starts_with("secret:") && !seen.contains(&key) {
                                configs.remove_source(&key).await;
                            }
                        }
                    }
                    let _ = listed.send(true);
                }
                Ok(Event::Apply(s)) => apply_secret(&configs, &s).await,
                Ok(Event::Delete(s)) => {
                    let (ns, name) = secret_key(&s);
                    tracing::info!(secret = %format!("{ns}/{name}"), "remote secret deleted");
                    configs.remove_source(&source_key(&ns, &name)).await;
                }
                Err(e) => tracing::warn!(error = %e, namespace = %namespace, "watching remote secrets"),
            }
        }
    })
}

fn source_key(ns: &str, name: &str) -> String {
    format!("secret:{ns}/{name}")
}

async fn apply_secret(configs: &RemoteConfigs, s: &Secret) {
    let (ns, name) = secret_key(s);
    let (ns2, name2) = (ns.clone(), name.clone());
    let source_of = move |_: &str| ClusterSource::Secret {
        namespace: ns2.clone(),
        name: name2.clone(),
    };
    configs
        .apply_source(&source_key(&ns, &name), &source_of, secret_entries(s))
        .await;
}
