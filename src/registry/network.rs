//! Networks of a multi-network mesh, as istiod models them (reference `multinetwork.md` §1–2):
//! which network an endpoint is on, and which east-west gateways reach each network.
//!
//! - An endpoint's network: its pod's `topology.istio.io/network` label, else the label on its
//!   cluster's system namespace (both applied by the sources, see `convert.rs`), else
//!   `meshNetworks` (`fromRegistry` naming its cluster, then `fromCidr` containing its address),
//!   else the cluster's default (`--network`, primary only). istiod's order
//!   (`kube/controller/controller.go` `Network`), not the API comment's.
//! - A network's gateways: Services in any cluster labelled `topology.istio.io/network` (port
//!   15443 unless `networking.istio.io/gatewayPort` says otherwise; the Service must expose it),
//!   addressed by their LoadBalancer ingress (IP or hostname) and `externalIPs`; plus
//!   `meshNetworks` gateways (`address`, or `registryServiceName` in the clusters the network's
//!   `fromRegistry` names). Hostnames are resolved by meshd itself ([`super::gateway_dns`]).
//!
//! [`NetworkIndex`] is built with every snapshot and read by split-horizon EDS.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::model::ServiceKey;
use super::store::ClusterShard;

pub const NETWORK_LABEL: &str = "topology.istio.io/network";
/// Service label overriding a network gateway's mTLS port.
pub const GATEWAY_PORT_LABEL: &str = "networking.istio.io/gatewayPort";
/// istiod's `DefaultNetworkGatewayPort`.
pub const DEFAULT_GATEWAY_PORT: u16 = 15443;

// ---------------------------------------------------------------------------------------------
// meshNetworks (istio/api mesh/v1alpha1/network.proto)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshNetworks {
    pub networks: BTreeMap<String, NetworkConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NetworkConfig {
    pub endpoints: Vec<NetworkEndpoints>,
    pub gateways: Vec<MeshNetworkGateway>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NetworkEndpoints {
    pub from_cidr: Option<String>,
    pub from_registry: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MeshNetworkGateway {
    pub registry_service_name: Option<String>,
    pub address: Option<String>,
    pub port: u32,
    /// Accepted and, as in istiod, not used.
    pub locality: Option<String>,
}

/// An IP prefix of `fromCidr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("{s:?} is not a CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = if l.is_empty() {
            max
        } else {
            l.trim()
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length"))?
        };
        Ok(Self { addr, len })
    }
}

impl Cidr {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        let bits = |ip: &IpAddr| -> u128 {
            match ip {
                IpAddr::V4(v) => u128::from(u32::from(*v)) << 96,
                IpAddr::V6(v) => u128::from(*v),
            }
        };
        if self.addr.is_ipv4() != ip.is_ipv4() {
            return false;
        }
        let len = u32::from(self.len);
        if len == 0 {
            return true;
        }
        let mask = u128::MAX << (128 - len.min(128));
        // v4 prefixes sit in the top 32 bits, so the same mask works for both families.
        bits(&self.addr) & mask == bits(ip) & mask
    }
}

/// Why a meshNetworks document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshNetworksError {
    #[error("meshNetworks is not valid YAML: {0}")]
    Yaml(String),
    #[error("meshNetworks network {network:?}: {what}")]
    Invalid { network: String, what: String },
}

impl MeshNetworks {
    /// Parses and checks a `meshNetworks` document (the `istio` ConfigMap's `meshNetworks` key,
    /// or the same under `--mesh-config`).
    pub fn parse(yaml: &str) -> Result<Self, MeshNetworksError> {
        if yaml.trim().is_empty() {
            return Ok(Self::default());
        }
        let v: Self = serde_yaml::from_str(yaml).map_err(|e| MeshNetworksError::Yaml(e.to_string()))?;
        v.validate()?;
        Ok(v)
    }

    /// istiod's `ValidateMeshNetworks`: every network names endpoints, gateways name a service or
    /// an address and a port, and CIDRs parse.
    pub fn validate(&self) -> Result<(), MeshNetworksError> {
        for (name, n) in &self.networks {
            let bad = |what: String| MeshNetworksError::Invalid {
                network: name.clone(),
                what,
            };
            if n.endpoints.is_empty() {
                return Err(bad(
                    "at least one endpoint (fromCidr or fromRegistry) is required".into()
                ));
            }
            for e in &n.endpoints {
                match (&e.from_cidr, &e.from_registry) {
                    (Some(c), None) => {
                        c.parse::<Cidr>().map_err(bad)?;
                    }
                    (None, Some(r)) if !r.is_empty() => {}
                    _ => {
                        return Err(bad(
                            "each endpoint needs exactly one of fromCidr and fromRegistry".into()
                        ));
                    }
                }
            }
            for g in &n.gateways {
                let named = g.registry_service_name.as_deref().is_some_and(|s| !s.is_empty());
                let addressed = g.address.as_deref().is_some_and(|s| !s.is_empty());
                if named == addressed {
                    return Err(bad(
                        "each gateway needs exactly one of registryServiceName and address".into()
                    ));
                }
                if g.port == 0 || g.port > 65535 {
                    return Err(bad(format!("gateway port {} is not a valid port", g.port)));
                }
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// The network meshNetworks gives an endpoint of `cluster` at `addr`: the first network (by
    /// name) whose `fromRegistry` is the cluster, else the first whose `fromCidr` contains the
    /// address.
    pub fn network_for(&self, cluster: &str, addr: &IpAddr) -> Option<&str> {
        let by_registry = self
            .networks
            .iter()
            .find(|(_, n)| n.endpoints.iter().any(|e| e.from_registry.as_deref() == Some(cluster)));
        if let Some((name, _)) = by_registry {
            return Some(name);
        }
        self.networks
            .iter()
            .find(|(_, n)| {
                n.endpoints.iter().any(|e| {
                    e.from_cidr
                        .as_deref()
                        .and_then(|c| c.parse::<Cidr>().ok())
                        .is_some_and(|c| c.contains(addr))
                })
            })
            .map(|(name, _)| name.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// Gateways
// ---------------------------------------------------------------------------------------------

/// Where a gateway was configured.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum GatewaySource {
    /// A Service labelled `topology.istio.io/network` (or named by `registryServiceName`).
    Service {
        cluster: String,
        namespace: String,
        name: String,
    },
    /// A `meshNetworks` gateway `address`.
    MeshNetworks,
}

impl std::fmt::Display for GatewaySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GatewaySource::Service {
                cluster,
                namespace,
                name,
            } => write!(f, "Service {cluster}/{namespace}/{name}"),
            GatewaySource::MeshNetworks => f.write_str("meshNetworks"),
        }
    }
}

/// A resolved gateway: what split-horizon EDS substitutes for a network's endpoints.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NetworkGateway {
    pub network: String,
    /// The cluster whose endpoints it fronts (empty for meshNetworks `address` gateways).
    pub cluster: String,
    pub addr: IpAddr,
    pub port: u16,
}

/// A configured gateway and what became of its address, for `/debug/networkz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayStatus {
    pub network: String,
    pub cluster: String,
    pub port: u16,
    /// IP or hostname as configured; empty when the Service has none.
    pub address: String,
    pub source: GatewaySource,
    /// Addresses in use (the IP itself, or what the hostname resolved to).
    pub resolved: Vec<IpAddr>,
    /// Why this gateway is not in use (or, with addresses, why they may be stale).
    pub problem: Option<String>,
}

/// What meshd's own DNS lookup of a gateway hostname found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedHost {
    pub addrs: Vec<IpAddr>,
    /// The last lookup's error, while it keeps failing.
    pub error: Option<String>,
}

/// Networks and their gateways at one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkIndex {
    /// Every resolved gateway, sorted by (network, cluster, address, port).
    pub gateways: Vec<NetworkGateway>,
    by_network: BTreeMap<String, Vec<NetworkGateway>>,
    by_network_cluster: BTreeMap<(String, String), Vec<NetworkGateway>>,
    /// Least common multiple of the gateway counts of every bucket (istiod's weight scale).
    pub lcm: u32,
    /// Networks with gateways configured but none usable yet (a hostname not resolved): their
    /// endpoints are withheld from other networks rather than offered as unreachable pod IPs.
    pub unresolved_networks: BTreeSet<String>,
    /// Every configured gateway with its state.
    pub statuses: Vec<GatewayStatus>,
    /// Gateway hostnames meshd must resolve.
    pub hostnames: BTreeSet<String>,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: u32, b: u32) -> u32 {
    if a == 0 || b == 0 {
        return a.max(b);
    }
    (a / gcd(a, b)).saturating_mul(b)
}

impl NetworkIndex {
    /// istiod's `IsMultiNetworkEnabled`: some gateway exists (or is waiting for its address).
    pub fn is_multi_network(&self) -> bool {
        !self.by_network.is_empty() || !self.unresolved_networks.is_empty()
    }

    /// The gateways of `network` that front `cluster`, else all gateways of `network`
    /// (istiod prefers the endpoint's own cluster's gateways).
    pub fn gateways_for(&self, network: &str, cluster: &str) -> &[NetworkGateway] {
        self.by_network_cluster
            .get(&(network.to_string(), cluster.to_string()))
            .or_else(|| self.by_network.get(network))
            .map_or(&[], Vec::as_slice)
    }

    /// Weight scale (istiod's `GetLBWeightScaleFactor`): 1 without gateways.
    pub fn scale(&self) -> u32 {
        self.lcm.max(1)
    }

    /// Builds the index from the clusters' Services, meshNetworks and resolved hostnames.
    pub fn build(
        shards: &BTreeMap<String, ClusterShard>,
        mesh_networks: &MeshNetworks,
        resolved: &BTreeMap<String, ResolvedHost>,
    ) -> Self {
        let mut configured: Vec<(NetworkGatewayConfig, GatewaySource)> = Vec::new();
        for (cluster, shard) in shards {
            for (key, svc) in &shard.services {
                let Some(network) = svc.labels.get(NETWORK_LABEL).filter(|n| !n.is_empty()) else {
                    continue;
                };
                let port = svc
                    .labels
                    .get(GATEWAY_PORT_LABEL)
                    .and_then(|p| p.parse::<u16>().ok().filter(|p| *p != 0))
                    .unwrap_or(DEFAULT_GATEWAY_PORT);
                let source = service_source(cluster, key);
                if !svc.ports.iter().any(|p| p.port == port) {
                    configured.push((
                        NetworkGatewayConfig::problem(
                            network,
                            cluster,
                            port,
                            format!("the Service has no port {port} (its gateway port)"),
                        ),
                        source,
                    ));
                    continue;
                }
                push_addresses(&mut configured, network, cluster, port, &svc.external_addresses, source);
            }
        }
        for (network, n) in &mesh_networks.networks {
            let registries: Vec<&str> = n.endpoints.iter().filter_map(|e| e.from_registry.as_deref()).collect();
            for g in &n.gateways {
                let port = u16::try_from(g.port).unwrap_or(0);
                if let Some(addr) = g.address.as_deref().filter(|a| !a.is_empty()) {
                    configured.push((
                        NetworkGatewayConfig::new(network, "", port, addr),
                        GatewaySource::MeshNetworks,
                    ));
                }
                let Some(svc_name) = g.registry_service_name.as_deref().filter(|s| !s.is_empty()) else {
                    continue;
                };
                // The Service of that FQDN in each cluster the network's fromRegistry names.
                for cluster in &registries {
                    let Some(shard) = shards.get(*cluster) else { continue };
                    let Some((key, svc)) = shard.services.iter().find(|(k, _)| k.hostname() == svc_name) else {
                        continue;
                    };
                    let source = service_source(cluster, key);
                    push_addresses(&mut configured, network, cluster, port, &svc.external_addresses, source);
                }
            }
        }

        let mut index = NetworkIndex::default();
        let mut usable: BTreeSet<NetworkGateway> = BTreeSet::new();
        let mut hostname_networks: BTreeSet<String> = BTreeSet::new();
        for (g, source) in configured {
            let mut status = GatewayStatus {
                network: g.network.clone(),
                cluster: g.cluster.clone(),
                port: g.port,
                address: g.address.clone(),
                source,
                resolved: Vec::new(),
                problem: g.problem.clone(),
            };
            if status.problem.is_none() {
                if g.address.is_empty() {
                    status.problem = Some("no address yet (LoadBalancer ingress or externalIPs)".into());
                } else if let Ok(ip) = g.address.parse::<IpAddr>() {
                    status.resolved.push(ip);
                } else {
                    index.hostnames.insert(g.address.clone());
                    hostname_networks.insert(g.network.clone());
                    match resolved.get(&g.address) {
                        Some(r) if !r.addrs.is_empty() => {
                            status.resolved = r.addrs.clone();
                            status.problem = r
                                .error
                                .as_ref()
                                .map(|e| format!("lookups are failing, the last addresses are kept: {e}"));
                        }
                        Some(ResolvedHost { error: Some(e), .. }) => {
                            status.problem = Some(format!("hostname does not resolve: {e}"))
                        }
                        _ => status.problem = Some("hostname not resolved yet".into()),
                    }
                }
            }
            for ip in &status.resolved {
                usable.insert(NetworkGateway {
                    network: g.network.clone(),
                    cluster: g.cluster.clone(),
                    addr: *ip,
                    port: g.port,
                });
            }
            index.statuses.push(status);
        }
        index.gateways = usable.into_iter().collect();
        for g in &index.gateways {
            index.by_network.entry(g.network.clone()).or_default().push(g.clone());
            if !g.cluster.is_empty() {
                index
                    .by_network_cluster
                    .entry((g.network.clone(), g.cluster.clone()))
                    .or_default()
                    .push(g.clone());
            }
        }
        index.unresolved_networks = hostname_networks
            .into_iter()
            .filter(|n| !index.by_network.contains_key(n))
            .collect();
        index.lcm = index
            .by_network
            .values()
            .chain(index.by_network_cluster.values())
            .fold(0, |acc, v| lcm(acc, v.len() as u32));
        index
    }
}

/// A gateway before its address is resolved.
struct NetworkGatewayConfig {
    network: String,
    cluster: String,
    port: u16,
    address: String,
    problem: Option<String>,
}

impl NetworkGatewayConfig {
    fn new(network: &str, cluster: &str, port: u16, address: &str) -> Self {
        Self {
            network: network.into(),
            cluster: cluster.into(),
            port,
            address: address.into(),
            problem: None,
        }
    }

    fn problem(network: &str, cluster: &str, port: u16, problem: String) -> Self {
        Self {
            problem: Some(problem),
            ..Self::new(network, cluster, port, "")
        }
    }
}

fn service_source(cluster: &str, key: &ServiceKey) -> GatewaySource {
    GatewaySource::Service {
        cluster: cluster.into(),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
    }
}

fn push_addresses(
    out: &mut Vec<(NetworkGatewayConfig, GatewaySource)>,
    network: &str,
    cluster: &str,
    port: u16,
    addresses: &[String],
    source: GatewaySource,
) {
    if addresses.is_empty() {
        out.push((NetworkGatewayConfig::new(network, cluster, port, ""), source));
        return;
    }
    for a in addresses {
        out.push((NetworkGatewayConfig::new(network, cluster, port, a), source.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::model::{Protocol, ServicePort};
    use crate::registry::store::ShardService;

    fn gw_service(network: &str, port: u16, addrs: &[&str], port_label: Option<&str>) -> ShardService {
        let mut labels = BTreeMap::from([(NETWORK_LABEL.to_string(), network.to_string())]);
        if let Some(p) = port_label {
            labels.insert(GATEWAY_PORT_LABEL.into(), p.into());
        }
        ShardService {
            ports: vec![ServicePort {
                name: "tls".into(),
                port,
                protocol: Protocol::Tls,
            }],
            labels,
            external_addresses: addrs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn shards(list: &[(&str, &str, ShardService)]) -> BTreeMap<String, ClusterShard> {
        let mut out: BTreeMap<String, ClusterShard> = BTreeMap::new();
        for (cluster, name, svc) in list {
            out.entry(cluster.to_string())
                .or_default()
                .services
                .insert(ServiceKey::new("istio-system", name), svc.clone());
        }
        out
    }

    #[test]
    fn labelled_services_are_gateways_by_network_and_cluster() {
        let s = shards(&[
            ("c1", "ew", gw_service("n1", 15443, &["1.1.1.1", "1.1.1.2"], None)),
            ("c2", "ew", gw_service("n2", 443, &["2.2.2.2"], Some("443"))),
            ("c3", "ew", gw_service("n2", 15443, &["3.3.3.3"], None)),
        ]);
        let idx = NetworkIndex::build(&s, &MeshNetworks::default(), &BTreeMap::new());
        assert!(idx.is_multi_network());
        assert_eq!(idx.gateways.len(), 4);
        let ips = |g: &[NetworkGateway]| g.iter().map(|g| (g.addr.to_string(), g.port)).collect::<Vec<_>>();
        assert_eq!(ips(idx.gateways_for("n2", "c2")), vec![("2.2.2.2".to_string(), 443)]);
        // An unknown cluster of the network falls back to every gateway of the network.
        assert_eq!(idx.gateways_for("n2", "c9").len(), 2);
        assert!(idx.gateways_for("n9", "c1").is_empty());
        // Buckets of 2 (n1, n1/c1, n2) and 1 (n2/c2, n2/c3).
        assert_eq!(idx.lcm, 2);
    }

    #[test]
    fn a_gateway_without_its_port_or_address_is_reported_not_used() {
        let s = shards(&[
            ("c1", "no-port", gw_service("n1", 80, &["1.1.1.1"], None)),
            ("c1", "pending", gw_service("n1", 15443, &[], None)),
            ("c1", "bad-label", gw_service("n1", 15443, &["1.1.1.3"], Some("nope"))),
        ]);
        let idx = NetworkIndex::build(&s, &MeshNetworks::default(), &BTreeMap::new());
        assert_eq!(idx.gateways.len(), 1, "only the one with a 15443 port and an address");
        assert_eq!(idx.gateways[0].addr.to_string(), "1.1.1.3");
        let problems: Vec<&str> = idx.statuses.iter().filter_map(|s| s.problem.as_deref()).collect();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("no port 15443")));
        assert!(problems.iter().any(|p| p.contains("no address")));
    }

    #[test]
    fn hostnames_wait_for_resolution_and_hold_back_their_network() {
        let s = shards(&[("c2", "ew", gw_service("n2", 15443, &["ew.example.com"], None))]);
        let idx = NetworkIndex::build(&s, &MeshNetworks::default(), &BTreeMap::new());
        assert!(idx.gateways.is_empty());
        assert_eq!(idx.hostnames, ["ew.example.com".to_string()].into());
        assert_eq!(idx.unresolved_networks, ["n2".to_string()].into());
        assert!(idx.is_multi_network());

        let resolved = BTreeMap::from([(
            "ew.example.com".to_string(),
            ResolvedHost {
                addrs: vec!["5.5.5.5".parse().unwrap(), "5.5.5.6".parse().unwrap()],
                error: None,
            },
        )]);
        let idx = NetworkIndex::build(&s, &MeshNetworks::default(), &resolved);
        assert_eq!(idx.gateways.len(), 2, "one gateway per resolved address");
        assert!(idx.unresolved_networks.is_empty());
    }

    #[test]
    fn mesh_networks_gateways_by_address_and_registry_service() {
        let mn = MeshNetworks::parse(
            r#"
networks:
  n1:
    endpoints: [{fromRegistry: c1}]
    gateways: [{registryServiceName: istio-eastwestgateway.istio-system.svc.cluster.local, port: 15443}]
  vm:
    endpoints: [{fromCidr: 10.9.0.0/16}]
    gateways: [{address: 9.9.9.9, port: 15443}]
"#,
        )
        .unwrap();
        let mut plain = gw_service("ignored", 15443, &["4.4.4.4"], None);
        plain.labels.clear();
        let mut s = shards(&[("c1", "istio-eastwestgateway", plain)]);
        s.get_mut("c1")
            .unwrap()
            .services
            .insert(ServiceKey::new("default", "other"), gw_service("x", 15443, &[], None));
        let idx = NetworkIndex::build(&s, &mn, &BTreeMap::new());
        let got: Vec<(String, String, String)> = idx
            .gateways
            .iter()
            .map(|g| (g.network.clone(), g.cluster.clone(), g.addr.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("n1".into(), "c1".into(), "4.4.4.4".into()),
                ("vm".into(), "".into(), "9.9.9.9".into())
            ]
        );
        assert_eq!(mn.network_for("c1", &"10.0.0.1".parse().unwrap()), Some("n1"));
        assert_eq!(mn.network_for("c2", &"10.9.3.4".parse().unwrap()), Some("vm"));
        assert_eq!(mn.network_for("c2", &"10.8.3.4".parse().unwrap()), None);
    }

    #[test]
    fn invalid_mesh_networks_are_refused_with_the_reason() {
        for (yaml, want) in [
            ("networks: {n1: {gateways: []}}", "at least one endpoint"),
            (
                "networks: {n1: {endpoints: [{fromCidr: 10.0.0.0/99}]}}",
                "prefix length",
            ),
            (
                "networks: {n1: {endpoints: [{fromRegistry: c1}], gateways: [{address: 1.1.1.1}]}}",
                "not a valid port",
            ),
            (
                "networks: {n1: {endpoints: [{fromRegistry: c1}], gateways: [{port: 1}]}}",
                "exactly one of registryServiceName and address",
            ),
            ("networks: [", "not valid YAML"),
        ] {
            let e = MeshNetworks::parse(yaml).unwrap_err().to_string();
            assert!(e.contains(want), "{yaml}: {e}");
        }
        assert!(MeshNetworks::parse("").unwrap().is_empty());
    }

    #[test]
    fn cidr_containment() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(&"10.1.200.3".parse().unwrap()));
        assert!(!c.contains(&"10.2.0.1".parse().unwrap()));
        assert!(!c.contains(&"::1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&"8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(&"fd12::1".parse().unwrap()));
        let one: Cidr = "1.2.3.4".parse().unwrap();
        assert!(one.contains(&"1.2.3.4".parse().unwrap()) && !one.contains(&"1.2.3.5".parse().unwrap()));
    }
}
