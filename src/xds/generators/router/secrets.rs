//! Where gateway TLS credentials (`credentialName`) come from: Kubernetes Secrets of the gateway
//! proxy's own cluster and namespace (reference §5.6), behind a small trait so tests and
//! standalone runs can supply them without an API server.
//!
//! [`KubeSecrets`] keeps a watch on every registered cluster (the local one and each remote one,
//! through the cluster registry's clients) and holds only the Secrets that carry a certificate and
//! key. When one of those changes it asks the [`MeshStore`] for a push, so gateways pick up a
//! rotated certificate without reconnecting.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock, Weak};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use crate::cluster::{ClusterHandle, ClusterHandler, ClusterRegistry};
use crate::registry::MeshStore;
use crate::registry::istio::IstioConfig;

/// A certificate, its key and optionally the CA bundle that verifies clients (`ca.crt`), as
/// PEM bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSecret {
    pub cert_chain: Vec<u8>,
    pub private_key: Vec<u8>,
    pub ca_cert: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("TlsSecret")
            .field("cert_chain_bytes", &self.cert_chain.len())
            .field("has_ca_cert", &self.ca_cert.is_some())
            .finish()
    }
}

impl TlsSecret {
    /// The credential in a Kubernetes Secret's data, as istiod reads it: `tls.crt`/`tls.key`
    /// (`ca.crt`), or the generic `cert`/`key` (`cacert`). A Secret with only a CA (`ca.crt` or
    /// `cacert`) yields a CA-only credential with an empty certificate and key.
    pub fn from_data(data: &BTreeMap<String, Vec<u8>>) -> Option<Self> {
        let nonempty = |k: &str| data.get(k).filter(|v| !v.is_empty()).cloned();
        let ca = nonempty("ca.crt").or_else(|| nonempty("cacert"));
        match (nonempty("tls.crt"), nonempty("tls.key")) {
            (Some(c), Some(k)) => Some(Self {
                cert_chain: c,
                private_key: k,
                ca_cert: ca,
            }),
            _ => match (nonempty("cert"), nonempty("key")) {
                (Some(c), Some(k)) => Some(Self {
                    cert_chain: c,
                    private_key: k,
                    ca_cert: ca,
                }),
                _ => ca.map(|ca| Self {
                    cert_chain: Vec::new(),
                    private_key: Vec::new(),
                    ca_cert: Some(ca),
                }),
            },
        }
    }

    pub fn from_secret(s: &Secret) -> Option<Self> {
        let data: BTreeMap<String, Vec<u8>> = s
            .data
            .as_ref()
            .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
            .unwrap_or_default();
        Self::from_data(&data)
    }

    /// Whether this carries a certificate and key (not only a CA).
    pub fn has_key_pair(&self) -> bool {
        !self.cert_chain.is_empty() && !self.private_key.is_empty()
    }
}

/// Gateway credentials by cluster, namespace and Secret name.
pub trait SecretSource: Send + Sync + 'static {
    fn get(&self, cluster: &str, namespace: &str, name: &str) -> Option<TlsSecret>;
}

/// No credentials at all (standalone without a secret source).
#[derive(Debug, Default)]
pub struct NoSecrets;

impl SecretSource for NoSecrets {
    fn get(&self, _: &str, _: &str, _: &str) -> Option<TlsSecret> {
        None
    }
}

type SecretKey = (String, String, String);

/// Credentials set by hand (tests, standalone). Every change asks the store for a push when one
/// is attached.
#[derive(Default)]
pub struct StaticSecrets {
    map: RwLock<BTreeMap<SecretKey, TlsSecret>>,
    mesh: Option<Arc<MeshStore>>,
}

impl std::fmt::Debug for StaticSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.map.read().unwrap_or_else(|e| e.into_inner()).len();
        f.debug_struct("StaticSecrets").field("secrets", &n).finish()
    }
}

impl StaticSecrets {
    /// Credentials whose changes push through `mesh` (when given).
    pub fn new(mesh: Option<Arc<MeshStore>>) -> Arc<Self> {
        Arc::new(Self {
            map: RwLock::default(),
            mesh,
        })
    }

    pub fn insert(&self, cluster: &str, namespace: &str, name: &str, secret: TlsSecret) {
        let key = (cluster.to_string(), namespace.to_string(), name.to_string());
        let old = self
            .map
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, secret.clone());
        if old.as_ref() != Some(&secret)
            && let Some(m) = &self.mesh
        {
            m.mark_changed("secret");
        }
    }

    pub fn remove(&self, cluster: &str, namespace: &str, name: &str) {
        let key = (cluster.to_string(), namespace.to_string(), name.to_string());
        let old = self.map.write().unwrap_or_else(|e| e.into_inner()).remove(&key);
        if old.is_some()
            && let Some(m) = &self.mesh
        {
            m.mark_changed("secret");
        }
    }
}

impl SecretSource for StaticSecrets {
    fn get(&self, cluster: &str, namespace: &str, name: &str) -> Option<TlsSecret> {
        let key = (cluster.to_string(), namespace.to_string(), name.to_string());
        self.map.read().unwrap_or_else(|e| e.into_inner()).get(&key).cloned()
    }
}

/// One cluster's TLS Secrets: `(namespace, name)` → credential.
type ClusterSecrets = BTreeMap<(String, String), TlsSecret>;

#[derive(Default)]
struct KubeState {
    /// cluster id → (generation of the watch that writes it, its Secrets).
    clusters: BTreeMap<String, (u64, ClusterSecrets)>,
    next_generation: u64,
}

/// Secrets from every registered cluster, kept by one watch per cluster (Secrets of every
/// namespace except service-account tokens; only those holding a certificate are kept).
pub struct KubeSecrets {
    state: Arc<Mutex<KubeState>>,
    clusters: Weak<ClusterRegistry>,
    mesh: Arc<MeshStore>,
}

impl std::fmt::Debug for KubeSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let counts: BTreeMap<&String, usize> = st.clusters.iter().map(|(c, (_, s))| (c, s.len())).collect();
        f.debug_struct("KubeSecrets").field("secrets", &counts).finish()
    }
}

impl KubeSecrets {
    /// Registers itself with `clusters` (watching every current and future cluster); changes
    /// push through `mesh`.
    pub fn install(clusters: &Arc<ClusterRegistry>, mesh: Arc<MeshStore>) -> Arc<Self> {
        let me = Arc::new(Self {
            state: Arc::default(),
            clusters: Arc::downgrade(clusters),
            mesh,
        });
        clusters.add_handler(Arc::clone(&me) as Arc<dyn ClusterHandler>);
        me
    }

    /// The registered id a proxy's `CLUSTER_ID` names (aliases and the empty id resolve to the
    /// local cluster).
    fn resolve(&self, claimed: &str) -> String {
        self.clusters
            .upgrade()
            .and_then(|r| r.resolve(claimed).ok())
            .map(|h| h.id.clone())
            .unwrap_or_else(|| claimed.to_string())
    }
}

impl SecretSource for KubeSecrets {
    fn get(&self, cluster: &str, namespace: &str, name: &str) -> Option<TlsSecret> {
        let id = self.resolve(cluster);
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.clusters
            .get(&id)
            .and_then(|(_, s)| s.get(&(namespace.to_string(), name.to_string())))
            .cloned()
    }
}

/// Writes one cluster's Secrets for as long as its watch is the current one.
struct ClusterWriter {
    state: Arc<Mutex<KubeState>>,
    mesh: Arc<MeshStore>,
    cluster: String,
    generation: u64,
}

impl ClusterWriter {
    /// Applies `f` to the cluster's Secrets; pushes when a Secret some Gateway names changed.
    fn update(&self, f: impl FnOnce(&mut ClusterSecrets)) {
        let changed: BTreeSet<String> = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let Some((generation, secrets)) = st.clusters.get_mut(&self.cluster) else {
                return;
            };
            if *generation != self.generation {
                return;
            }
            let before = secrets.clone();
            f(secrets);
            changed_names(&before, secrets)
        };
        if changed.is_empty() {
            return;
        }
        // A Gateway that starts naming a Secret later is a config change: that push reads the
        // Secrets as they are then, so unreferenced Secrets never need a push of their own.
        let referenced = gateway_credentials(&self.mesh.current().config);
        let relevant = changed
            .iter()
            .any(|n| referenced.contains(n) || n.strip_suffix("-cacert").is_some_and(|base| referenced.contains(base)));
        tracing::debug!(cluster = %self.cluster, secrets = ?changed, push = relevant, "TLS Secrets changed");
        if relevant {
            self.mesh.mark_changed("secret");
        }
    }
}

/// Names of Secrets that differ between two states of one cluster.
fn changed_names(before: &ClusterSecrets, after: &ClusterSecrets) -> BTreeSet<String> {
    let keys: BTreeSet<&(String, String)> = before.keys().chain(after.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|(_, name)| name.clone())
        .collect()
}

/// Every `credentialName` of every Gateway server (without a `kubernetes://` prefix).
pub fn gateway_credentials(config: &IstioConfig) -> BTreeSet<String> {
    config
        .gateways
        .iter()
        .flat_map(|g| g.spec.servers.iter())
        .filter_map(|s| s.tls.as_ref()?.credential_name.as_deref())
        .map(|c| c.strip_prefix("kubernetes://").unwrap_or(c).to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

fn key_of(s: &Secret) -> (String, String) {
    (
        s.metadata.namespace.clone().unwrap_or_default(),
        s.metadata.name.clone().unwrap_or_default(),
    )
}

async fn watch_cluster(client: kube::Client, w: ClusterWriter) {
    // Service-account tokens are most Secrets of a cluster and never a gateway credential.
    let cfg = watcher::Config::default().fields("type!=kubernetes.io/service-account-token");
    let mut stream = watcher::watcher(Api::<Secret>::all(client), cfg)
        .default_backoff()
        .boxed();
    let mut listing: Option<ClusterSecrets> = None;
    let mut last_error: Option<String> = None;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => {
                if last_error.take().is_some() {
                    tracing::info!(cluster = %w.cluster, "Secret watch recovered");
                }
                ev
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    tracing::warn!(cluster = %w.cluster, error = %msg, "watching Secrets for gateway credentials failed; retrying with backoff");
                    last_error = Some(msg);
                }
                continue;
            }
        };
        match ev {
            Event::Init => listing = Some(BTreeMap::new()),
            Event::InitApply(s) => {
                if let Some(t) = TlsSecret::from_secret(&s) {
                    listing.get_or_insert_with(BTreeMap::new).insert(key_of(&s), t);
                }
            }
            Event::InitDone => {
                let all = listing.take().unwrap_or_default();
                tracing::debug!(cluster = %w.cluster, secrets = all.len(), "gateway credentials listed");
                w.update(|s| *s = all);
            }
            Event::Apply(s) => {
                let k = key_of(&s);
                match TlsSecret::from_secret(&s) {
                    Some(t) => w.update(|m| {
                        m.insert(k, t);
                    }),
                    None => w.update(|m| {
                        m.remove(&k);
                    }),
                }
            }
            Event::Delete(s) => {
                let k = key_of(&s);
                w.update(|m| {
                    m.remove(&k);
                });
            }
        }
    }
}

impl ClusterHandler for KubeSecrets {
    fn cluster_added(&self, cluster: &Arc<ClusterHandle>) {
        let generation = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.next_generation += 1;
            let g = st.next_generation;
            // A replaced cluster keeps its last Secrets until the new watch has listed.
            let kept = st.clusters.remove(&cluster.id).map(|(_, s)| s).unwrap_or_default();
            st.clusters.insert(cluster.id.clone(), (g, kept));
            g
        };
        let writer = ClusterWriter {
            state: Arc::clone(&self.state),
            mesh: Arc::clone(&self.mesh),
            cluster: cluster.id.clone(),
            generation,
        };
        cluster.spawn(watch_cluster(cluster.client.clone(), writer));
    }

    fn cluster_removed(&self, id: &str) {
        let had = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.clusters.remove(id).is_some_and(|(_, s)| !s.is_empty())
        };
        if had {
            self.mesh.mark_changed("secret");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kubernetes_tls_and_generic_secrets() {
        let d = |kv: &[(&str, &str)]| -> BTreeMap<String, Vec<u8>> {
            kv.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
        };
        let t = TlsSecret::from_data(&d(&[("tls.crt", "C"), ("tls.key", "K"), ("ca.crt", "A")])).unwrap();
        assert_eq!(
            (t.cert_chain.as_slice(), t.private_key.as_slice()),
            (&b"C"[..], &b"K"[..])
        );
        assert_eq!(t.ca_cert.as_deref(), Some(&b"A"[..]));
        let g = TlsSecret::from_data(&d(&[("cert", "C"), ("key", "K")])).unwrap();
        assert!(g.has_key_pair() && g.ca_cert.is_none());
        let ca = TlsSecret::from_data(&d(&[("cacert", "A")])).unwrap();
        assert!(!ca.has_key_pair());
        assert!(TlsSecret::from_data(&d(&[("tls.crt", "C")])).is_none());
        assert!(!format!("{t:?}").contains('K'), "Debug never shows the key");
    }

    #[test]
    fn only_secrets_gateways_name_need_a_push() {
        let cfg = IstioConfig {
            gateways: vec![crate::registry::istio::Config {
                meta: Default::default(),
                spec: serde_yaml::from_str(
                    "servers: [{port: {number: 443, name: https, protocol: HTTPS}, hosts: [a], tls: {mode: SIMPLE, credentialName: kubernetes://gw-cred}}]",
                )
                .unwrap(),
            }],
            ..Default::default()
        };
        assert_eq!(gateway_credentials(&cfg), ["gw-cred".to_string()].into());
        let t = TlsSecret {
            cert_chain: b"C".to_vec(),
            private_key: b"K".to_vec(),
            ca_cert: None,
        };
        let before: ClusterSecrets = [(("ns".to_string(), "a".to_string()), t.clone())].into();
        let mut after = before.clone();
        after.insert(("ns".into(), "b".into()), t.clone());
        after.remove(&("ns".to_string(), "a".to_string()));
        assert_eq!(
            changed_names(&before, &after),
            ["a".to_string(), "b".to_string()].into()
        );
        assert!(changed_names(&after, &after).is_empty());
    }

    #[test]
    fn static_secrets_are_per_cluster_and_namespace() {
        let s = StaticSecrets::new(None);
        let t = TlsSecret {
            cert_chain: b"C".to_vec(),
            private_key: b"K".to_vec(),
            ca_cert: None,
        };
        s.insert("cluster2", "istio-system", "gw-cred", t.clone());
        assert_eq!(s.get("cluster2", "istio-system", "gw-cred"), Some(t));
        assert_eq!(s.get("cluster1", "istio-system", "gw-cred"), None);
        assert_eq!(s.get("cluster2", "default", "gw-cred"), None);
        s.remove("cluster2", "istio-system", "gw-cred");
        assert_eq!(s.get("cluster2", "istio-system", "gw-cred"), None);
    }
}
