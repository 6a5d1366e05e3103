//! Kubernetes objects → the service model, shared by the Kubernetes source (one per cluster) and
//! the `--config-dir` file source.
//!
//! Each object kind is first reduced to the few facts meshd uses (`*Facts`), kept per cluster in
//! [`ClusterState`]; endpoints are then derived from EndpointSlices joined with the Pods they
//! point at (labels, service account, node), the Nodes (locality) and the Namespaces (network).
//! [`ClusterState`] keeps the indexes needed to tell which services a Pod, slice or Service
//! change touches, so sources can write endpoint-only changes for exactly those services.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ObjectMeta;

use super::istio::{Config, ConfigMeta, DestinationRuleSpec, GROUP, GatewaySpec, IstioConfig, VirtualServiceSpec};
use super::model::{Endpoint, Locality, Protocol, ServiceKey, ServicePort};
use super::store::{ClusterShard, ShardService};

/// Label on an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Network of a Pod (its label) or of a whole cluster (the label on its system namespace).
pub use super::network::NETWORK_LABEL;
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// Namespace and name of an object (namespace empty for cluster-scoped ones).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn of(meta: &ObjectMeta) -> Self {
        Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// What a cluster's endpoints inherit from where they run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub cluster_id: String,
    /// Trust domain of the SPIFFE identities built from pods' service accounts.
    pub trust_domain: String,
    /// istiod's namespace: its network label is the cluster's network.
    pub system_namespace: String,
}

/// A Service as meshd uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFacts {
    pub shard: ShardService,
    /// `spec.publishNotReadyAddresses`: not-ready endpoints are served too.
    pub publish_not_ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready != false`.
    pub ready: bool,
    /// The `targetRef` when it is a Pod.
    pub pod: Option<ObjKey>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
}

/// An EndpointSlice as meshd uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceFacts {
    pub service: ServiceKey,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// A Pod as meshd uses it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodFacts {
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub node_name: Option<String>,
    pub ips: Vec<IpAddr>,
}

/// A Namespace as meshd uses it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamespaceFacts {
    pub network: Option<String>,
}

fn to_u16(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

fn is_tcp(protocol: Option<&str>) -> bool {
    protocol.is_none_or(|p| p.eq_ignore_ascii_case("TCP"))
}

/// A Service's key and facts (`None` without a name).
pub fn service_facts(s: &KubeService) -> Option<(ServiceKey, ServiceFacts)> {
    let key = ObjKey::of(&s.metadata);
    if key.name.is_empty() {
        return None;
    }
    let spec = s.spec.clone().unwrap_or_default();
    let ports = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        // Istio has no UDP/SCTP model for sidecars; they are not routed.
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .filter_map(|p| {
            let name = p.name.unwrap_or_default();
            Some(ServicePort {
                protocol: Protocol::from_port(&name, p.app_protocol.as_deref()),
                port: to_u16(p.port)?,
                name,
            })
        })
        .collect();
    let mut cluster_ips: Vec<IpAddr> = spec
        .cluster_ips
        .unwrap_or_default()
        .iter()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect();
    cluster_ips.sort();
    cluster_ips.dedup();
    // Where a network gateway is reached from outside: LoadBalancer ingress (IP, else hostname,
    // which meshd resolves itself), then externalIPs (istiod's ConvertService).
    let mut external_addresses: Vec<String> = Vec::new();
    if spec.type_.as_deref() == Some("LoadBalancer") {
        let ingress = s
            .status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for i in ingress.into_iter().flatten() {
            if let Some(a) = i.ip.as_ref().or(i.hostname.as_ref()).filter(|a| !a.is_empty()) {
                external_addresses.push(a.clone());
            }
        }
    }
    external_addresses.extend(
        spec.external_ips
            .unwrap_or_default()
            .into_iter()
            .filter(|a| !a.is_empty()),
    );
    let mut seen = BTreeSet::new();
    external_addresses.retain(|a| seen.insert(a.clone()));
    Some((
        ServiceKey::new(&key.namespace, &key.name),
        ServiceFacts {
            shard: ShardService {
                ports,
                labels: s.metadata.labels.clone().unwrap_or_default(),
                cluster_ips,
                external_addresses,
            },
            publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        },
    ))
}

/// An EndpointSlice's key and facts (`None` when it names no Service).
pub fn slice_facts(s: &EndpointSlice) -> Option<(ObjKey, SliceFacts)> {
    let key = ObjKey::of(&s.metadata);
    let service = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|n| !n.is_empty())?;
    if key.name.is_empty() || s.address_type.eq_ignore_ascii_case("FQDN") {
        return None;
    }
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter(|p| is_tcp(p.protocol.as_deref()))
        .filter_map(|p| {
            Some(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                port: p.port.and_then(to_u16)?,
            })
        })
        .collect();
    let endpoints = s
        .endpoints
        .iter()
        .map(|e| SliceEndpoint {
            addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            ready: e.conditions.as_ref().and_then(|c| c.ready) != Some(false),
            pod: e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    let name = r.name.clone().filter(|n| !n.is_empty())?;
                    let ns = r.namespace.clone().filter(|n| !n.is_empty());
                    Some(ObjKey::new(ns.as_deref().unwrap_or(&key.namespace), &name))
                }),
            node_name: e.node_name.clone().filter(|n| !n.is_empty()),
            zone: e.zone.clone().filter(|z| !z.is_empty()),
        })
        .collect();
    Some((
        key.clone(),
        SliceFacts {
            service: ServiceKey::new(&key.namespace, service),
            ports,
            endpoints,
        },
    ))
}

pub fn pod_facts(p: &Pod) -> (ObjKey, PodFacts) {
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|i| i.ip.as_str())
        .chain(status.and_then(|s| s.pod_ip.as_deref()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    (
        ObjKey::of(&p.metadata),
        PodFacts {
            labels: p.metadata.labels.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone().or_else(|| s.service_account.clone()))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            node_name: spec.and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()),
            ips,
        },
    )
}

pub fn node_locality(n: &Node) -> (String, Locality) {
    let labels = n.metadata.labels.clone().unwrap_or_default();
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    (
        n.metadata.name.clone().unwrap_or_default(),
        Locality {
            region: get(REGION_LABEL),
            zone: get(ZONE_LABEL),
            subzone: get(SUBZONE_LABEL),
        },
    )
}

pub fn namespace_facts(n: &Namespace) -> (String, NamespaceFacts) {
    (
        n.metadata.name.clone().unwrap_or_default(),
        NamespaceFacts {
            network: n
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(NETWORK_LABEL))
                .filter(|v| !v.is_empty())
                .cloned(),
        },
    )
}

/// How an endpoint names the Pod behind it: by `targetRef`, else by address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PodRef {
    Name(ObjKey),
    Ip(IpAddr),
}

/// One cluster's objects, reduced to facts, with the indexes to find what a change touches.
#[derive(Debug, Clone)]
pub struct ClusterState {
    pub settings: ClusterSettings,
    services: BTreeMap<ServiceKey, ServiceFacts>,
    slices: BTreeMap<ObjKey, SliceFacts>,
    pods: BTreeMap<ObjKey, PodFacts>,
    nodes: BTreeMap<String, Locality>,
    namespaces: BTreeMap<String, NamespaceFacts>,
    /// Service → its slices.
    slices_of: BTreeMap<ServiceKey, BTreeSet<ObjKey>>,
    /// Pod IP → Pod (for endpoints without a targetRef).
    pods_by_ip: BTreeMap<IpAddr, ObjKey>,
    /// Service → the pods its endpoints name, and back.
    refs_of: BTreeMap<ServiceKey, BTreeSet<PodRef>>,
    users_of: BTreeMap<PodRef, BTreeSet<ServiceKey>>,
}

impl ClusterState {
    pub fn new(settings: ClusterSettings) -> Self {
        Self {
            settings,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            pods: BTreeMap::new(),
            nodes: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            slices_of: BTreeMap::new(),
            pods_by_ip: BTreeMap::new(),
            refs_of: BTreeMap::new(),
            users_of: BTreeMap::new(),
        }
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&ServiceFacts> {
        self.services.get(key)
    }

    /// Sets (or with `None` removes) a Service; returns the previous facts.
    pub fn set_service(&mut self, key: ServiceKey, facts: Option<ServiceFacts>) -> Option<ServiceFacts> {
        match facts {
            Some(f) => self.services.insert(key, f),
            None => self.services.remove(&key),
        }
    }

    /// Sets (or removes) a slice; returns the services whose endpoints it may have changed.
    pub fn set_slice(&mut self, key: ObjKey, facts: Option<SliceFacts>) -> BTreeSet<ServiceKey> {
        if self.slices.get(&key) == facts.as_ref() {
            return BTreeSet::new();
        }
        let mut touched = BTreeSet::new();
        if let Some(old) = self.slices.remove(&key) {
            if let Some(set) = self.slices_of.get_mut(&old.service) {
                set.remove(&key);
                if set.is_empty() {
                    self.slices_of.remove(&old.service);
                }
            }
            touched.insert(old.service);
        }
        if let Some(new) = facts {
            self.slices_of
                .entry(new.service.clone())
                .or_default()
                .insert(key.clone());
            touched.insert(new.service.clone());
            self.slices.insert(key, new);
        }
        for s in &touched {
            self.reindex_service(s);
        }
        touched
    }

    /// Sets (or removes) a Pod; returns the services whose endpoints it changes.
    pub fn set_pod(&mut self, key: ObjKey, facts: Option<PodFacts>) -> BTreeSet<ServiceKey> {
        if self.pods.get(&key) == facts.as_ref() {
            return BTreeSet::new();
        }
        let mut refs = vec![PodRef::Name(key.clone())];
        if let Some(old) = self.pods.remove(&key) {
            for ip in &old.ips {
                if self.pods_by_ip.get(ip) == Some(&key) {
                    self.pods_by_ip.remove(ip);
                }
                refs.push(PodRef::Ip(*ip));
            }
        }
        if let Some(new) = facts {
            for ip in &new.ips {
                self.pods_by_ip.insert(*ip, key.clone());
                refs.push(PodRef::Ip(*ip));
            }
            self.pods.insert(key, new);
        }
        refs.iter()
            .filter_map(|r| self.users_of.get(r))
            .flatten()
            .cloned()
            .collect()
    }

    /// Sets (or removes) a Node's locality; true when that changed anything.
    pub fn set_node(&mut self, name: String, locality: Option<Locality>) -> bool {
        match locality {
            Some(l) => self.nodes.insert(name, l.clone()) != Some(l),
            None => self.nodes.remove(&name).is_some(),
        }
    }

    /// Sets (or removes) a Namespace; true when its network changed.
    pub fn set_namespace(&mut self, name: String, facts: Option<NamespaceFacts>) -> bool {
        let network = facts.as_ref().and_then(|f| f.network.clone());
        let old = match facts {
            Some(f) => self.namespaces.insert(name, f),
            None => self.namespaces.remove(&name),
        };
        old.and_then(|o| o.network) != network
    }

    pub fn replace_services(&mut self, services: BTreeMap<ServiceKey, ServiceFacts>) {
        self.services = services;
    }

    pub fn replace_slices(&mut self, slices: BTreeMap<ObjKey, SliceFacts>) {
        self.slices = slices;
        self.slices_of.clear();
        for (k, s) in &self.slices {
            self.slices_of.entry(s.service.clone()).or_default().insert(k.clone());
        }
        self.refs_of.clear();
        self.users_of.clear();
        let keys: Vec<ServiceKey> = self.slices_of.keys().cloned().collect();
        for k in keys {
            self.reindex_service(&k);
        }
    }

    pub fn replace_pods(&mut self, pods: BTreeMap<ObjKey, PodFacts>) {
        self.pods = pods;
        self.pods_by_ip.clear();
        for (k, p) in &self.pods {
            for ip in &p.ips {
                self.pods_by_ip.insert(*ip, k.clone());
            }
        }
    }

    pub fn replace_nodes(&mut self, nodes: BTreeMap<String, Locality>) {
        self.nodes = nodes;
    }

    pub fn replace_namespaces(&mut self, namespaces: BTreeMap<String, NamespaceFacts>) {
        self.namespaces = namespaces;
    }

    fn reindex_service(&mut self, service: &ServiceKey) {
        let refs: BTreeSet<PodRef> = self
            .slices_of
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
            .flat_map(|s| &s.endpoints)
            .flat_map(|e| match &e.pod {
                Some(p) => vec![PodRef::Name(p.clone())],
                None => e.addresses.iter().map(|a| PodRef::Ip(*a)).collect(),
            })
            .collect();
        let old = self.refs_of.remove(service).unwrap_or_default();
        for r in old.difference(&refs) {
            if let Some(users) = self.users_of.get_mut(r) {
                users.remove(service);
                if users.is_empty() {
                    self.users_of.remove(r);
                }
            }
        }
        for r in &refs {
            self.users_of.entry(r.clone()).or_default().insert(service.clone());
        }
        if !refs.is_empty() {
            self.refs_of.insert(service.clone(), refs);
        }
    }

    /// The pod's network label, else the system namespace's (istiod's first two steps; the
    /// store applies meshNetworks and the cluster default to what is left empty). A label on
    /// any other namespace is not a network, as in istiod.
    fn network(&self, pod: Option<&PodFacts>) -> String {
        pod.and_then(|p| p.labels.get(NETWORK_LABEL).filter(|v| !v.is_empty()).cloned())
            .or_else(|| {
                self.namespaces
                    .get(&self.settings.system_namespace)
                    .and_then(|n| n.network.clone())
            })
            .unwrap_or_default()
    }

    /// The endpoints of one service in this cluster: every slice of it merged, ready addresses
    /// only (unless the Service publishes not-ready ones), one per address and port.
    pub fn endpoints(&self, service: &ServiceKey) -> Vec<Endpoint> {
        let publish_not_ready = self.services.get(service).is_some_and(|s| s.publish_not_ready);
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for slice in self
            .slices_of
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
        {
            for e in slice.endpoints.iter().filter(|e| e.ready || publish_not_ready) {
                for addr in &e.addresses {
                    let pod_key = e.pod.clone().or_else(|| self.pods_by_ip.get(addr).cloned());
                    let pod = pod_key.as_ref().and_then(|k| self.pods.get(k));
                    let node = e.node_name.as_ref().or(pod.and_then(|p| p.node_name.as_ref()));
                    let locality = node
                        .and_then(|n| self.nodes.get(n))
                        .cloned()
                        .or_else(|| {
                            e.zone.as_ref().map(|z| Locality {
                                zone: z.clone(),
                                ..Default::default()
                            })
                        })
                        .unwrap_or_default();
                    let pod_ns = pod_key
                        .as_ref()
                        .map(|k| k.namespace.as_str())
                        .unwrap_or(&service.namespace);
                    for port in &slice.ports {
                        if !seen.insert((*addr, port.name.clone(), port.port)) {
                            continue;
                        }
                        out.push(Endpoint {
                            address: *addr,
                            service_port_name: port.name.clone(),
                            port: port.port,
                            cluster_id: self.settings.cluster_id.clone(),
                            network: self.network(pod),
                            locality: locality.clone(),
                            labels: pod.map(|p| p.labels.clone()).unwrap_or_default(),
                            service_account: pod.map(|p| {
                                format!(
                                    "spiffe://{}/ns/{pod_ns}/sa/{}",
                                    self.settings.trust_domain, p.service_account
                                )
                            }),
                            pod_name: pod_key.as_ref().map(|k| k.name.clone()),
                            // Published not-ready addresses are served as healthy, as in istiod.
                            ready: e.ready || publish_not_ready,
                        });
                    }
                }
            }
        }
        out
    }

    /// Everything this cluster contributes, for `MeshStore::replace_cluster`.
    pub fn shard(&self) -> ClusterShard {
        let mut shard = ClusterShard {
            services: self
                .services
                .iter()
                .map(|(k, f)| (k.clone(), f.shard.clone()))
                .collect(),
            endpoints: BTreeMap::new(),
        };
        for key in self.slices_of.keys() {
            let eps = self.endpoints(key);
            if !eps.is_empty() {
                shard.endpoints.insert(key.clone(), eps);
            }
        }
        shard
    }
}

/// The Istio config kinds meshd reads (`networking.istio.io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConfigKind {
    Gateway,
    VirtualService,
    DestinationRule,
}

impl ConfigKind {
    pub const ALL: [ConfigKind; 3] = [
        ConfigKind::Gateway,
        ConfigKind::VirtualService,
        ConfigKind::DestinationRule,
    ];

    pub fn kind(self) -> &'static str {
        match self {
            ConfigKind::Gateway => "Gateway",
            ConfigKind::VirtualService => "VirtualService",
            ConfigKind::DestinationRule => "DestinationRule",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            ConfigKind::Gateway => "gateways",
            ConfigKind::VirtualService => "virtualservices",
            ConfigKind::DestinationRule => "destinationrules",
        }
    }

    /// The kind of an object's `apiVersion`/`kind`, for any served version of the group.
    pub fn of(api_version: &str, kind: &str) -> Option<Self> {
        let group = api_version.split_once('/').map(|(g, _)| g)?;
        if group != GROUP {
            return None;
        }
        Self::ALL.into_iter().find(|k| k.kind() == kind)
    }
}

/// One parsed Istio config object.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigItem {
    Gateway(Config<GatewaySpec>),
    VirtualService(Config<VirtualServiceSpec>),
    DestinationRule(Config<DestinationRuleSpec>),
}

/// Parses an object's `spec` (a missing spec is an empty one).
pub fn parse_config(
    kind: ConfigKind,
    namespace: &str,
    name: &str,
    spec: Option<&serde_json::Value>,
) -> Result<ConfigItem, serde_json::Error> {
    let meta = ConfigMeta {
        name: name.into(),
        namespace: namespace.into(),
    };
    let spec = spec.cloned().unwrap_or_else(|| serde_json::json!({}));
    Ok(match kind {
        ConfigKind::Gateway => ConfigItem::Gateway(Config {
            meta,
            spec: serde_json::from_value(spec)?,
        }),
        ConfigKind::VirtualService => ConfigItem::VirtualService(Config {
            meta,
            spec: serde_json::from_value(spec)?,
        }),
        ConfigKind::DestinationRule => ConfigItem::DestinationRule(Config {
            meta,
            spec: serde_json::from_value(spec)?,
        }),
    })
}

/// Collects parsed objects into one [`IstioConfig`] (the store normalizes the order).
pub fn build_config<'a>(items: impl IntoIterator<Item = &'a ConfigItem>) -> IstioConfig {
    let mut c = IstioConfig::default();
    for item in items {
        match item {
            ConfigItem::Gateway(g) => c.gateways.push(g.clone()),
            ConfigItem::VirtualService(v) => c.virtual_services.push(v.clone()),
            ConfigItem::DestinationRule(d) => c.destination_rules.push(d.clone()),
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> ClusterSettings {
        ClusterSettings {
            cluster_id: "cluster1".into(),
            trust_domain: "cluster.local".into(),
            system_namespace: "istio-system".into(),
        }
    }

    fn slice(name: &str, eps: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps,
        }))
        .unwrap()
    }

    fn pod(name: &str, ip: &str, version: &str, node: &str) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "echo", "version": version}},
            "spec": {"serviceAccountName": "echo", "nodeName": node, "containers": []},
            "status": {"podIP": ip},
        }))
        .unwrap()
    }

    #[test]
    fn service_ports_and_protocols() {
        let s: KubeService = serde_json::from_value(json!({
            "metadata": {"name": "echo", "namespace": "default", "labels": {"app": "echo"}},
            "spec": {"clusterIP": "10.96.0.10", "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "web", "port": 81, "appProtocol": "grpc"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ]},
        }))
        .unwrap();
        let (key, f) = service_facts(&s).unwrap();
        assert_eq!(key, ServiceKey::new("default", "echo"));
        assert_eq!(f.shard.ports.len(), 2, "UDP ports are not modelled");
        assert_eq!(f.shard.ports[0].protocol, Protocol::Http);
        assert_eq!(f.shard.ports[1].protocol, Protocol::Grpc);
        assert_eq!(f.shard.cluster_ips, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert!(f.shard.external_addresses.is_empty());
    }

    #[test]
    fn gateway_addresses_come_from_the_load_balancer_status_and_external_ips() {
        let s: KubeService = serde_json::from_value(json!({
            "metadata": {"name": "ew", "namespace": "istio-system", "labels": {"topology.istio.io/network": "n1"}},
            "spec": {"type": "LoadBalancer", "externalIPs": ["3.3.3.3", "1.1.1.1"], "ports": [{"name": "tls", "port": 15443}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "1.1.1.1"}, {"hostname": "ew.example.com"}, {}]}},
        }))
        .unwrap();
        let (_, f) = service_facts(&s).unwrap();
        assert_eq!(f.shard.external_addresses, vec!["1.1.1.1", "ew.example.com", "3.3.3.3"]);
        // A ClusterIP Service's stale LoadBalancer status is not an address; externalIPs are.
        let s: KubeService = serde_json::from_value(json!({
            "metadata": {"name": "ew", "namespace": "istio-system"},
            "spec": {"type": "ClusterIP", "externalIPs": ["3.3.3.3"]},
            "status": {"loadBalancer": {"ingress": [{"ip": "1.1.1.1"}]}},
        }))
        .unwrap();
        assert_eq!(service_facts(&s).unwrap().1.shard.external_addresses, vec!["3.3.3.3"]);
    }

    #[test]
    fn endpoints_join_slices_pods_nodes_and_namespaces() {
        let mut st = ClusterState::new(settings());
        let (k1, s1) = slice_facts(&slice(
            "echo-a",
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "echo-1"}},
                {"addresses": ["10.0.0.9"], "conditions": {"ready": false}, "targetRef": {"kind": "Pod", "name": "echo-9"}},
            ]),
        ))
        .unwrap();
        // A second slice of the same service, one endpoint without targetRef (found by IP), one
        // duplicate of the first slice (during slice migration).
        let (k2, s2) = slice_facts(&slice(
            "echo-b",
            json!([{"addresses": ["10.0.0.2"]}, {"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": "echo-1"}}]),
        ))
        .unwrap();
        let echo = ServiceKey::new("default", "echo");
        assert_eq!(st.set_slice(k1, Some(s1)), [echo.clone()].into());
        st.set_slice(k2, Some(s2));
        let eps = st.endpoints(&echo);
        assert_eq!(eps.len(), 2, "ready only, deduplicated: {eps:?}");
        assert!(
            eps.iter().all(|e| e.network.is_empty() && e.labels.is_empty()),
            "no label anywhere: the store fills meshNetworks or the cluster default"
        );

        let (pk, pf) = pod_facts(&pod("echo-1", "10.0.0.1", "v1", "node-a"));
        assert_eq!(st.set_pod(pk, Some(pf)), [echo.clone()].into(), "the pod backs echo");
        let (pk2, pf2) = pod_facts(&pod("echo-2", "10.0.0.2", "v2", "node-a"));
        assert_eq!(st.set_pod(pk2, Some(pf2)), [echo.clone()].into(), "found by IP");
        let (other, of) = pod_facts(&pod("other", "10.0.0.7", "v1", "node-a"));
        assert!(st.set_pod(other, Some(of)).is_empty(), "backs nothing");

        let node: Node = serde_json::from_value(json!({"metadata": {"name": "node-a", "labels": {
            "topology.kubernetes.io/region": "r1", "topology.kubernetes.io/zone": "z1", "topology.istio.io/subzone": "s1"}}}))
        .unwrap();
        let (n, l) = node_locality(&node);
        assert!(st.set_node(n, Some(l)));
        let ns: Namespace = serde_json::from_value(
            json!({"metadata": {"name": "istio-system", "labels": {"topology.istio.io/network": "net1"}}}),
        )
        .unwrap();
        let (n, f) = namespace_facts(&ns);
        assert!(st.set_namespace(n, Some(f)));

        let eps = st.endpoints(&echo);
        let e1 = eps.iter().find(|e| e.address.to_string() == "10.0.0.1").unwrap();
        assert_eq!(e1.labels.get("version").map(String::as_str), Some("v1"));
        assert_eq!(
            e1.service_account.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/echo")
        );
        assert_eq!(e1.pod_name.as_deref(), Some("echo-1"));
        assert_eq!(e1.locality.region, "r1");
        assert_eq!(e1.locality.subzone, "s1");
        assert_eq!(e1.network, "net1", "the system namespace's network is the cluster's");
        // A label on another namespace is not a network (istiod reads the system namespace only);
        // the pod's own label wins over the cluster's.
        let other: Namespace = serde_json::from_value(
            json!({"metadata": {"name": "default", "labels": {"topology.istio.io/network": "elsewhere"}}}),
        )
        .unwrap();
        let (n, f) = namespace_facts(&other);
        st.set_namespace(n, Some(f));
        let mut labelled = pod("echo-2", "10.0.0.2", "v2", "node-a");
        labelled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(NETWORK_LABEL.into(), "pod-net".into());
        let (pk2, pf2) = pod_facts(&labelled);
        st.set_pod(pk2, Some(pf2));
        let eps = st.endpoints(&echo);
        let net = |ip: &str| {
            eps.iter()
                .find(|e| e.address.to_string() == ip)
                .unwrap()
                .network
                .clone()
        };
        assert_eq!(net("10.0.0.1"), "net1");
        assert_eq!(net("10.0.0.2"), "pod-net");
        assert_eq!(e1.service_port_name, "http");
        assert_eq!(e1.port, 8080);
        assert_eq!(e1.cluster_id, "cluster1");
        let e2 = eps.iter().find(|e| e.address.to_string() == "10.0.0.2").unwrap();
        assert_eq!(e2.labels.get("version").map(String::as_str), Some("v2"));

        // Pod label change touches the service; removing a slice drops its endpoints.
        let (pk, pf) = pod_facts(&pod("echo-1", "10.0.0.1", "v3", "node-a"));
        assert_eq!(st.set_pod(pk, Some(pf)), [echo.clone()].into());
        assert_eq!(
            st.set_slice(ObjKey::new("default", "echo-b"), None),
            [echo.clone()].into()
        );
        let eps = st.endpoints(&echo);
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].labels.get("version").map(String::as_str), Some("v3"));
        assert!(
            st.set_pod(ObjKey::new("default", "echo-2"), None).is_empty(),
            "no longer referenced"
        );
        assert_eq!(st.shard().endpoints.len(), 1);
    }
}
