//! Per-cluster shards merged into immutable snapshots, with change tracking for pushes.
//!
//! Writers (sources) describe a cluster's state; the store compares it with what it had and
//! records the kind of change: a new, removed or changed service (or a changed set of service
//! accounts behind it, as istiod does) needs a full push, an endpoint-only change needs EDS for
//! that host only. Readers take an `Arc<Snapshot>` and never lock.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use super::istio::IstioConfig;
use super::model::{Endpoint, Service, ServiceKey, ServicePort, service_accounts};
use super::network::{MeshNetworks, NetworkIndex, ResolvedHost};

/// A service as one cluster defines it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardService {
    pub ports: Vec<ServicePort>,
    pub labels: BTreeMap<String, String>,
    pub cluster_ips: Vec<std::net::IpAddr>,
    /// LoadBalancer ingress IPs or hostnames, then `externalIPs`: a network gateway's addresses.
    pub external_addresses: Vec<String>,
}

/// Everything one cluster contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterShard {
    pub services: BTreeMap<ServiceKey, ShardService>,
    pub endpoints: BTreeMap<ServiceKey, Vec<Endpoint>>,
}

/// What changed since the last push.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Services or config changed: every type for every proxy.
    pub full: bool,
    /// Hostnames whose endpoints changed (meaningful when not `full`).
    pub endpoint_hosts: BTreeSet<String>,
    /// Why, for `pilot_push_triggers` and logs.
    pub reasons: BTreeSet<&'static str>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        !self.full && self.endpoint_hosts.is_empty()
    }

    pub fn merge(&mut self, other: Change) {
        self.full |= other.full;
        self.endpoint_hosts.extend(other.endpoint_hosts);
        self.reasons.extend(other.reasons);
    }

    fn full(reason: &'static str) -> Self {
        Self {
            full: true,
            reasons: [reason].into(),
            ..Default::default()
        }
    }

    fn endpoints(host: String) -> Self {
        Self {
            endpoint_hosts: [host].into(),
            reasons: ["endpoint"].into(),
            ..Default::default()
        }
    }
}

/// An immutable view of the mesh at one version.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub version: u64,
    /// Hostname → service merged across clusters.
    pub services: BTreeMap<String, Arc<Service>>,
    /// Hostname → endpoints from every cluster, in a stable order.
    pub endpoints: BTreeMap<String, Arc<Vec<Endpoint>>>,
    pub config: Arc<IstioConfig>,
    /// Networks and their gateways.
    pub networks: Arc<NetworkIndex>,
}

impl Snapshot {
    pub fn service(&self, host: &str) -> Option<&Arc<Service>> {
        self.services.get(host)
    }

    pub fn endpoints(&self, host: &str) -> &[Endpoint] {
        self.endpoints.get(host).map(|e| e.as_slice()).unwrap_or_default()
    }
}

#[derive(Default)]
struct Inner {
    shards: BTreeMap<String, ClusterShard>,
    config: Arc<IstioConfig>,
    networks: NetworkInputs,
    pending: Change,
    version: u64,
    dirty: bool,
    counts: ChangeCounts,
}

/// What endpoints' networks and the gateways are computed from, besides the shards.
#[derive(Default)]
struct NetworkInputs {
    mesh_networks: MeshNetworks,
    /// Cluster → network of its endpoints that nothing else names (`--network` for the primary).
    defaults: BTreeMap<String, String>,
    /// Gateway hostname → what meshd's lookup found.
    resolved: BTreeMap<String, ResolvedHost>,
}

/// How many writes changed something, by kind, since the store was created (for tests and
/// debugging; the push machinery uses [`MeshStore::take_changes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChangeCounts {
    /// Writes that needed a full push.
    pub full: u64,
    /// Writes that changed endpoints only.
    pub endpoints_only: u64,
}

/// The mesh model all sources write into.
pub struct MeshStore {
    inner: Mutex<Inner>,
    current: ArcSwap<Snapshot>,
    notify: Notify,
    /// Gateway hostnames of the latest snapshot, for the resolver.
    hostnames: tokio::sync::watch::Sender<BTreeSet<String>>,
}

impl std::fmt::Debug for MeshStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshStore")
            .field("version", &self.current.load().version)
            .finish()
    }
}

impl Default for MeshStore {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            current: ArcSwap::from_pointee(Snapshot::default()),
            notify: Notify::new(),
            hostnames: tokio::sync::watch::Sender::new(BTreeSet::new()),
        }
    }
}

impl MeshStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn record(&self, inner: &mut Inner, change: Change) {
        if change.is_empty() {
            return;
        }
        if change.full {
            inner.counts.full += 1;
        } else {
            inner.counts.endpoints_only += 1;
        }
        inner.pending.merge(change);
        inner.dirty = true;
        self.notify.notify_one();
    }

    /// Replaces a cluster's whole contribution (initial list, relist after 410 Gone, file reload)
    /// in one step, so readers never see the gap between the old and the new list.
    pub fn replace_cluster(&self, cluster: &str, shard: ClusterShard) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let old = inner.shards.remove(cluster).unwrap_or_default();
        let change = diff(&old, &shard);
        inner.shards.insert(cluster.to_string(), shard);
        self.record(&mut inner, change);
    }

    pub fn remove_cluster(&self, cluster: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = inner.shards.remove(cluster) {
            let change = diff(&old, &ClusterShard::default());
            self.record(&mut inner, change);
        }
    }

    pub fn upsert_service(&self, cluster: &str, key: ServiceKey, svc: ShardService) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let shard = inner.shards.entry(cluster.to_string()).or_default();
        if shard.services.get(&key) == Some(&svc) {
            return;
        }
        shard.services.insert(key, svc);
        self.record(&mut inner, Change::full("service"));
    }

    pub fn remove_service(&self, cluster: &str, key: &ServiceKey) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(shard) = inner.shards.get_mut(cluster) else {
            return;
        };
        if shard.services.remove(key).is_some() {
            self.record(&mut inner, Change::full("service-delete"));
        }
    }

    /// Sets one service's endpoints in one cluster (sources merge EndpointSlices first).
    pub fn set_endpoints(&self, cluster: &str, key: ServiceKey, mut endpoints: Vec<Endpoint>) {
        sort_endpoints(&mut endpoints);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let shard = inner.shards.entry(cluster.to_string()).or_default();
        let old = shard.endpoints.get(&key).cloned().unwrap_or_default();
        if old == endpoints {
            return;
        }
        let change = endpoint_change(&key, &old, &endpoints);
        if endpoints.is_empty() {
            shard.endpoints.remove(&key);
        } else {
            shard.endpoints.insert(key, endpoints);
        }
        self.record(&mut inner, change);
    }

    pub fn set_config(&self, mut config: IstioConfig) {
        config.normalize();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if *inner.config == config {
            return;
        }
        inner.config = Arc::new(config);
        self.record(&mut inner, Change::full("config"));
    }

    /// Sets meshNetworks (from mesh config): endpoint networks and gateways change, a full push.
    pub fn set_mesh_networks(&self, mesh_networks: MeshNetworks) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.networks.mesh_networks == mesh_networks {
            return;
        }
        inner.networks.mesh_networks = mesh_networks;
        self.record(&mut inner, Change::full("networks"));
    }

    /// The network of `cluster`'s endpoints that no label or meshNetworks names (empty: none).
    pub fn set_default_network(&self, cluster: &str, network: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let old = if network.is_empty() {
            inner.networks.defaults.remove(cluster)
        } else {
            inner.networks.defaults.insert(cluster.into(), network.into())
        };
        if old.as_deref().unwrap_or_default() != network {
            self.record(&mut inner, Change::full("networks"));
        }
    }

    /// Records what a gateway hostname resolved to; a change of addresses is a full push
    /// (istiod's forced push on gateway changes).
    pub fn set_resolved_host(&self, host: &str, resolved: ResolvedHost) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let old = inner.networks.resolved.insert(host.into(), resolved.clone());
        if old.as_ref() == Some(&resolved) {
            return;
        }
        let addrs_changed = old.map(|o| o.addrs).unwrap_or_default() != resolved.addrs;
        if addrs_changed {
            self.record(&mut inner, Change::full("network-gateway"));
        } else {
            // Only the error text changed: the next snapshot shows it in /debug/networkz.
            inner.dirty = true;
        }
    }

    /// Gateway hostnames to resolve, updated with every snapshot.
    pub fn gateway_hostnames(&self) -> tokio::sync::watch::Receiver<BTreeSet<String>> {
        self.hostnames.subscribe()
    }

    /// Counts of the changes recorded so far (never reset; unaffected by `take_changes`).
    pub fn change_counts(&self) -> ChangeCounts {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).counts
    }

    /// Something generators read besides the model changed (a gateway's TLS Secret): push
    /// everything, as istiod pushes on a Secret change.
    pub fn mark_changed(&self, reason: &'static str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.record(&mut inner, Change::full(reason));
    }

    /// Takes the changes recorded since the last call.
    pub fn take_changes(&self) -> Change {
        std::mem::take(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()).pending)
    }

    /// Resolves when something changed (a permit is kept if nobody was waiting).
    pub async fn changed(&self) {
        self.notify.notified().await
    }

    /// The current snapshot, rebuilt (with a new version) if anything changed since the last one.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.dirty {
            inner.version += 1;
            inner.dirty = false;
            let snap = Arc::new(merge(
                &inner.shards,
                Arc::clone(&inner.config),
                &inner.networks,
                inner.version,
            ));
            log_gateway_problems(&self.current.load().networks, &snap.networks);
            let hosts = &snap.networks.hostnames;
            self.hostnames.send_if_modified(|h| {
                let changed = h != hosts;
                if changed {
                    h.clone_from(hosts);
                }
                changed
            });
            self.current.store(Arc::clone(&snap));
            return snap;
        }
        self.current.load_full()
    }

    /// The last built snapshot, without rebuilding.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }
}

fn sort_endpoints(e: &mut [Endpoint]) {
    e.sort_by(|a, b| {
        (&a.cluster_id, a.address, &a.service_port_name, a.port).cmp(&(
            &b.cluster_id,
            b.address,
            &b.service_port_name,
            b.port,
        ))
    });
}

fn endpoint_change(key: &ServiceKey, old: &[Endpoint], new: &[Endpoint]) -> Change {
    // A changed identity set changes the SANs proxies expect: istiod pushes fully then.
    if service_accounts(old) != service_accounts(new) || old.is_empty() != new.is_empty() {
        let mut c = Change::full("endpoint-identity");
        c.endpoint_hosts.insert(key.hostname());
        return c;
    }
    Change::endpoints(key.hostname())
}

fn diff(old: &ClusterShard, new: &ClusterShard) -> Change {
    let mut change = Change::default();
    if old.services != new.services {
        change.merge(Change::full("service"));
    }
    let keys: BTreeSet<&ServiceKey> = old.endpoints.keys().chain(new.endpoints.keys()).collect();
    for k in keys {
        let o = old.endpoints.get(k).map(Vec::as_slice).unwrap_or_default();
        let n = new.endpoints.get(k).map(Vec::as_slice).unwrap_or_default();
        if o != n {
            change.merge(endpoint_change(k, o, n));
        }
    }
    change
}

/// One log line per gateway that newly cannot be used (no address, no port, unresolved).
fn log_gateway_problems(old: &NetworkIndex, new: &NetworkIndex) {
    for s in &new.statuses {
        let Some(problem) = &s.problem else { continue };
        let seen = old
            .statuses
            .iter()
            .any(|o| o.source == s.source && o.address == s.address && o.problem.as_ref() == Some(problem));
        if !seen {
            tracing::warn!(network = %s.network, cluster = %s.cluster, source = %s.source, address = %s.address, problem = %problem, "network gateway skipped");
        }
    }
}

/// The network of an endpoint no label names: meshNetworks, else its cluster's default.
fn fill_network(e: &mut Endpoint, n: &NetworkInputs) {
    if !e.network.is_empty() {
        return;
    }
    if let Some(net) = n.mesh_networks.network_for(&e.cluster_id, &e.address) {
        e.network = net.to_string();
    } else if let Some(net) = n.defaults.get(&e.cluster_id) {
        e.network.clone_from(net);
    }
}

fn merge(
    shards: &BTreeMap<String, ClusterShard>,
    config: Arc<IstioConfig>,
    networks: &NetworkInputs,
    version: u64,
) -> Snapshot {
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    for (cluster, shard) in shards {
        for (key, s) in &shard.services {
            let host = key.hostname();
            let svc = services.entry(host.clone()).or_insert_with(|| Service {
                key: key.clone(),
                hostname: host,
                ports: Vec::new(),
                labels: s.labels.clone(),
                cluster_ips: BTreeMap::new(),
            });
            for p in &s.ports {
                if !svc.ports.iter().any(|q| q.port == p.port) {
                    svc.ports.push(p.clone());
                }
            }
            svc.cluster_ips.insert(cluster.clone(), s.cluster_ips.clone());
        }
    }
    let mut endpoints: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
    let fill = !networks.mesh_networks.is_empty() || !networks.defaults.is_empty();
    for shard in shards.values() {
        for (key, eps) in &shard.endpoints {
            let out = endpoints.entry(key.hostname()).or_default();
            let start = out.len();
            out.extend(eps.iter().cloned());
            if fill {
                out[start..].iter_mut().for_each(|e| fill_network(e, networks));
            }
        }
    }
    for svc in services.values_mut() {
        svc.ports.sort_by_key(|p| p.port);
    }
    Snapshot {
        version,
        services: services.into_iter().map(|(h, s)| (h, Arc::new(s))).collect(),
        endpoints: endpoints
            .into_iter()
            .map(|(h, mut e)| {
                sort_endpoints(&mut e);
                (h, Arc::new(e))
            })
            .collect(),
        config,
        networks: Arc::new(NetworkIndex::build(shards, &networks.mesh_networks, &networks.resolved)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::model::{Locality, Protocol};

    fn ep(ip: &str, cluster: &str, sa: &str) -> Endpoint {
        Endpoint {
            address: ip.parse().unwrap(),
            service_port_name: "http".into(),
            port: 8080,
            cluster_id: cluster.into(),
            network: String::new(),
            locality: Locality::default(),
            labels: BTreeMap::new(),
            service_account: Some(sa.into()),
            pod_name: None,
            ready: true,
        }
    }

    fn svc() -> ShardService {
        ShardService {
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Http,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn endpoint_only_changes_are_incremental_and_merged_across_clusters() {
        let store = MeshStore::new();
        let key = ServiceKey::new("default", "echo");
        store.upsert_service("cluster1", key.clone(), svc());
        store.upsert_service("cluster2", key.clone(), svc());
        store.set_endpoints("cluster1", key.clone(), vec![ep("10.0.0.1", "cluster1", "echo")]);
        store.set_endpoints("cluster2", key.clone(), vec![ep("10.0.1.1", "cluster2", "echo")]);
        let c = store.take_changes();
        assert!(c.full);
        let snap = store.snapshot();
        assert_eq!(snap.endpoints("echo.default.svc.cluster.local").len(), 2);
        assert_eq!(
            snap.service("echo.default.svc.cluster.local")
                .unwrap()
                .cluster_ips
                .len(),
            2
        );

        store.set_endpoints(
            "cluster2",
            key.clone(),
            vec![ep("10.0.1.1", "cluster2", "echo"), ep("10.0.1.2", "cluster2", "echo")],
        );
        let c = store.take_changes();
        assert!(!c.full, "same identities: endpoint-only");
        assert_eq!(c.endpoint_hosts, ["echo.default.svc.cluster.local".to_string()].into());
        let snap2 = store.snapshot();
        assert!(snap2.version > snap.version);
        assert_eq!(snap2.endpoints("echo.default.svc.cluster.local").len(), 3);

        // A new identity behind the service is a full push, as in istiod.
        store.set_endpoints("cluster2", key, vec![ep("10.0.1.1", "cluster2", "other")]);
        assert!(store.take_changes().full);
    }

    #[test]
    fn replacing_a_cluster_reports_only_real_differences() {
        let store = MeshStore::new();
        let key = ServiceKey::new("default", "echo");
        let mut shard = ClusterShard::default();
        shard.services.insert(key.clone(), svc());
        shard.endpoints.insert(key.clone(), vec![ep("10.0.0.1", "c1", "echo")]);
        store.replace_cluster("c1", shard.clone());
        assert!(store.take_changes().full);
        let v = store.snapshot().version;
        store.replace_cluster("c1", shard.clone());
        assert!(
            store.take_changes().is_empty(),
            "a relist with the same content changes nothing"
        );
        assert_eq!(store.snapshot().version, v, "no new version without a change");
        store.remove_cluster("c1");
        assert!(store.take_changes().full);
        assert!(store.snapshot().services.is_empty());
    }
}
