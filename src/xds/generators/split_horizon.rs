//! Split-horizon EDS: istiod's `EndpointsByNetworkFilter` and `EndpointsWithMTLSFilter`
//! (`pilot/pkg/xds/endpoints/ep_filters.go`, reference `multinetwork.md` §3).
//!
//! In a mesh with network gateways, a proxy sees endpoints on its own network as they are, and
//! endpoints on another network that has gateways as those gateways' addresses: one endpoint per
//! gateway in the locality bucket of the endpoints it replaces, weighted by the sum of their
//! (lcm-scaled) weights, preferring the gateways of the endpoint's own cluster. Endpoints that
//! could not be reached over Istio mTLS are never offered through a gateway. Networks without a
//! gateway keep their pod IPs, as istiod does ("this logic has been around for years").
//!
//! Everything an answer depends on besides the model is in [`EdsView`], so EDS is built once per
//! view (not per proxy) and shared by every proxy with that view.
use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::registry::istio::DestinationRuleSpec;
use crate::registry::model::Endpoint;
use crate::registry::network::{NetworkGateway, NetworkIndex};
use crate::xds::node::{ProxyInfo, ProxyKind};

/// Pod label the injector sets: `istio` when the pod has a sidecar that terminates mesh mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

/// What EDS answers depend on besides the model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdsView {
    /// The proxy's network; empty in a single-network mesh (where it changes nothing).
    pub network: String,
    /// `REQUESTED_NETWORK_VIEW`, sorted; `None` sees every network.
    pub visible: Option<Vec<String>>,
    /// Address families the proxy can reach gateways on (multi-network only).
    pub v4: bool,
    pub v6: bool,
    /// Gateways also get the SNI-DNAT assignments `outbound_.<port>_.<subset>_.<host>`.
    pub sni_dnat: bool,
}

impl EdsView {
    pub fn of(proxy: &ProxyInfo, networks: &NetworkIndex) -> Self {
        let multi = networks.is_multi_network();
        let visible = proxy.requested_network_view.as_ref().map(|v| {
            let mut v = v.clone();
            v.sort();
            v.dedup();
            v
        });
        Self {
            network: if multi { proxy.network.clone() } else { String::new() },
            visible,
            v4: multi && proxy.ips.iter().any(IpAddr::is_ipv4),
            v6: multi && proxy.ips.iter().any(IpAddr::is_ipv6),
            sni_dnat: proxy.kind == ProxyKind::Router,
        }
    }

    /// istiod's `ProxyView.IsVisible`: endpoints without a network are always visible.
    pub fn sees(&self, network: &str) -> bool {
        network.is_empty() || self.visible.as_ref().is_none_or(|v| v.iter().any(|n| n == network))
    }

    fn reaches(&self, g: &NetworkGateway) -> bool {
        if g.addr.is_ipv4() { self.v4 } else { self.v6 }
    }

    /// istiod's `InNetwork`: an empty network on either side counts as the same.
    fn in_network(&self, network: &str) -> bool {
        self.network.is_empty() || network.is_empty() || self.network == network
    }
}

/// Whether traffic to `e` is Istio mTLS (istiod's `checkMtlsEnabled` without
/// PeerAuthentication): a DestinationRule TLS mode decides when set, else the pod's sidecar.
pub fn mtls_enabled(e: &Endpoint, dr: Option<&DestinationRuleSpec>, subset: &str) -> bool {
    let mode = dr
        .and_then(|d| super::upstream_tls::client_tls(d, subset))
        .and_then(|t| t.mode.as_deref());
    match mode {
        Some(m) => m.eq_ignore_ascii_case("ISTIO_MUTUAL"),
        None => e.labels.get(TLS_MODE_LABEL).map(String::as_str) == Some("istio"),
    }
}

/// One endpoint of an answer: a pod, or a gateway standing in for a remote network's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    Pod(&'a Endpoint),
    Gateway(&'a NetworkGateway),
}

/// One endpoint of an answer with its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weighted<'a> {
    pub target: Target<'a>,
    pub weight: u32,
}

/// The endpoints of one locality bucket as `view` sees them (istiod's sidecar-mode
/// `EndpointsByNetworkFilter`). `mtls_only` is `EndpointsWithMTLSFilter`, for the SNI-DNAT
/// clusters of a gateway: only endpoints that terminate Istio mTLS.
pub fn filter<'a>(
    bucket: &[&'a Endpoint],
    view: &EdsView,
    networks: &'a NetworkIndex,
    mtls: &dyn Fn(&Endpoint) -> bool,
    mtls_only: bool,
) -> Vec<Weighted<'a>> {
    let visible = bucket
        .iter()
        .copied()
        .filter(|e| view.sees(&e.network))
        .filter(|e| !mtls_only || mtls(e));
    if !networks.is_multi_network() {
        return visible
            .map(|e| Weighted {
                target: Target::Pod(e),
                weight: 1,
            })
            .collect();
    }
    let scale = networks.scale();
    let mut out = Vec::new();
    let mut gateway_weights: BTreeMap<&'a NetworkGateway, u32> = BTreeMap::new();
    for e in visible {
        let gateways = networks.gateways_for(&e.network, &e.cluster_id);
        let weight = scale;
        // A proxy without a network would take a named network's endpoints as its own
        // (istio/istio#58612): it goes through their gateway instead.
        let force_gateway = view.network.is_empty() && !e.network.is_empty() && !gateways.is_empty();
        let local = view.in_network(&e.network);
        if !force_gateway && (local || gateways.is_empty()) {
            // A network whose gateway address is not known yet: its pod IPs are unreachable
            // from here, so they are left out rather than offered.
            if !local && networks.unresolved_networks.contains(&e.network) {
                continue;
            }
            out.push(Weighted {
                target: Target::Pod(e),
                weight,
            });
            continue;
        }
        let reachable: Vec<&'a NetworkGateway> = gateways.iter().filter(|g| view.reaches(g)).collect();
        if reachable.is_empty() || !mtls(e) {
            continue;
        }
        let share = weight / reachable.len() as u32;
        for g in reachable {
            let w = gateway_weights.entry(g).or_default();
            *w = w.saturating_add(share);
        }
    }
    out.extend(gateway_weights.into_iter().map(|(g, w)| Weighted {
        target: Target::Gateway(g),
        weight: w.max(1),
    }));
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::registry::ServiceKey;
    use crate::registry::model::{Locality, Protocol, ServicePort};
    use crate::registry::network::{MeshNetworks, NETWORK_LABEL, ResolvedHost};
    use crate::registry::store::{ClusterShard, ShardService};

    fn ep(ip: &str, network: &str, cluster: &str, injected: bool) -> Endpoint {
        let mut labels = BTreeMap::new();
        if injected {
            labels.insert(TLS_MODE_LABEL.to_string(), "istio".to_string());
        }
        Endpoint {
            address: ip.parse().unwrap(),
            service_port_name: "http".into(),
            port: 8080,
            cluster_id: cluster.into(),
            network: network.into(),
            locality: Locality::default(),
            labels,
            service_account: None,
            pod_name: None,
            ready: true,
        }
    }

    /// Gateways as labelled Services: (cluster, network, addresses).
    fn index(gateways: &[(&str, &str, &[&str])], resolved: &[(&str, &[&str])]) -> NetworkIndex {
        let mut shards: BTreeMap<String, ClusterShard> = BTreeMap::new();
        for (i, (cluster, network, addrs)) in gateways.iter().enumerate() {
            shards.entry(cluster.to_string()).or_default().services.insert(
                ServiceKey::new("istio-system", &format!("ew{i}")),
                ShardService {
                    ports: vec![ServicePort {
                        name: "tls".into(),
                        port: 15443,
                        protocol: Protocol::Tls,
                    }],
                    labels: [(NETWORK_LABEL.to_string(), network.to_string())].into(),
                    external_addresses: addrs.iter().map(|a| a.to_string()).collect(),
                    ..Default::default()
                },
            );
        }
        let resolved = resolved
            .iter()
            .map(|(h, a)| {
                (
                    h.to_string(),
                    ResolvedHost {
                        addrs: a.iter().map(|i| i.parse().unwrap()).collect(),
                        error: None,
                    },
                )
            })
            .collect();
        NetworkIndex::build(&shards, &MeshNetworks::default(), &resolved)
    }

    fn view(network: &str) -> EdsView {
        EdsView {
            network: network.into(),
            v4: true,
            ..Default::default()
        }
    }

    fn show(w: &[Weighted<'_>]) -> Vec<(String, u32)> {
        w.iter()
            .map(|w| match &w.target {
                Target::Pod(e) => (format!("{}:{}", e.address, e.port), w.weight),
                Target::Gateway(g) => (format!("{}:{}", g.addr, g.port), w.weight),
            })
            .collect()
    }

    fn injected(e: &Endpoint) -> bool {
        mtls_enabled(e, None, "")
    }

    /// istiod's TestSplitHorizonEds shape: networks with 1, 2 and 3 endpoints and 1, 1 and 2
    /// gateways, plus a network without a gateway.
    fn mesh() -> (Vec<Endpoint>, NetworkIndex) {
        let eps = vec![
            ep("10.1.0.1", "network1", "c1", true),
            ep("10.2.0.1", "network2", "c2", true),
            ep("10.2.0.2", "network2", "c2", true),
            ep("10.3.0.1", "network3", "c3", true),
            ep("10.3.0.2", "network3", "c3", true),
            ep("10.3.0.3", "network3", "c3", true),
            ep("10.4.0.1", "network4", "c4", true),
        ];
        let idx = index(
            &[
                ("c1", "network1", &["159.122.219.1"]),
                ("c2", "network2", &["159.122.219.2"]),
                ("c3", "network3", &["159.122.219.3", "179.114.119.3"]),
            ],
            &[],
        );
        (eps, idx)
    }

    #[test]
    fn remote_networks_become_their_gateways_with_lcm_weights() {
        let (eps, idx) = mesh();
        let bucket: Vec<&Endpoint> = eps.iter().collect();
        assert_eq!(idx.lcm, 2);
        let got = show(&filter(&bucket, &view("network1"), &idx, &injected, false));
        assert_eq!(
            got,
            vec![
                ("10.1.0.1:8080".into(), 2),
                // network4 has no gateway: its pods stay direct, as in istiod.
                ("10.4.0.1:8080".into(), 2),
                ("159.122.219.2:15443".into(), 4),
                ("159.122.219.3:15443".into(), 3),
                ("179.114.119.3:15443".into(), 3),
            ]
        );
        // From network3 its own three pods stay; network1 and network2 go through their gateway.
        let got = show(&filter(&bucket, &view("network3"), &idx, &injected, false));
        assert_eq!(
            got,
            vec![
                ("10.3.0.1:8080".into(), 2),
                ("10.3.0.2:8080".into(), 2),
                ("10.3.0.3:8080".into(), 2),
                ("10.4.0.1:8080".into(), 2),
                ("159.122.219.1:15443".into(), 2),
                ("159.122.219.2:15443".into(), 4),
            ]
        );
    }

    #[test]
    fn the_endpoints_own_cluster_gateways_are_preferred() {
        let eps = [ep("10.2.0.1", "n2", "c2a", true), ep("10.2.0.2", "n2", "c2b", true)];
        let idx = index(&[("c2a", "n2", &["2.2.2.1"]), ("c2z", "n2", &["2.2.2.9"])], &[]);
        let bucket: Vec<&Endpoint> = eps.iter().collect();
        // c2a's endpoint goes to c2a's gateway; c2b has none of its own, so it uses any of n2's.
        let got = show(&filter(&bucket, &view("n1"), &idx, &injected, false));
        assert_eq!(idx.lcm, 2);
        assert_eq!(got, vec![("2.2.2.1:15443".into(), 3), ("2.2.2.9:15443".into(), 1)]);
    }

    #[test]
    fn endpoints_without_mtls_are_never_offered_through_a_gateway() {
        let eps = [ep("10.2.0.1", "n2", "c2", false), ep("10.1.0.1", "n1", "c1", false)];
        let idx = index(&[("c2", "n2", &["2.2.2.2"])], &[]);
        let bucket: Vec<&Endpoint> = eps.iter().collect();
        // The uninjected n2 pod is dropped; the uninjected local pod is kept (no gateway hop).
        assert_eq!(
            show(&filter(&bucket, &view("n1"), &idx, &injected, false)),
            vec![("10.1.0.1:8080".into(), 1)]
        );
        // A DestinationRule decides over the pod label: ISTIO_MUTUAL offers it, DISABLE or
        // SIMPLE does not even for an injected pod.
        let dr = |mode: &str| -> DestinationRuleSpec {
            serde_yaml::from_str(&format!("host: x\ntrafficPolicy: {{tls: {{mode: {mode}}}}}")).unwrap()
        };
        let mutual = dr("ISTIO_MUTUAL");
        let by_dr = |e: &Endpoint| mtls_enabled(e, Some(&mutual), "");
        assert_eq!(
            show(&filter(&bucket, &view("n1"), &idx, &by_dr, false)),
            vec![("10.1.0.1:8080".into(), 1), ("2.2.2.2:15443".into(), 1)]
        );
        let eps = [ep("10.2.0.1", "n2", "c2", true)];
        let bucket: Vec<&Endpoint> = eps.iter().collect();
        for mode in ["DISABLE", "SIMPLE"] {
            let d = dr(mode);
            let by_dr = |e: &Endpoint| mtls_enabled(e, Some(&d), "");
            assert!(filter(&bucket, &view("n1"), &idx, &by_dr, false).is_empty(), "{mode}");
        }
    }

    #[test]
    fn requested_network_view_narrows_and_mtls_only_filters() {
        let (eps, idx) = mesh();
        let bucket: Vec<&Endpoint> = eps.iter().collect();
        // An east-west gateway of network2 asks for its own network only.
        let mut v = view("network2");
        v.visible = Some(vec!["network2".into()]);
        let mut eps2 = eps.clone();
        eps2.push(ep("10.2.0.9", "network2", "c2", false));
        eps2.push(ep("10.9.0.9", "", "c9", true));
        let bucket2: Vec<&Endpoint> = eps2.iter().collect();
        assert_eq!(
            show(&filter(&bucket2, &v, &idx, &injected, true)),
            vec![
                ("10.2.0.1:8080".into(), 2),
                ("10.2.0.2:8080".into(), 2),
                ("10.9.0.9:8080".into(), 2)
            ],
            "own network and network-less endpoints, mTLS ones only"
        );
        // The view applies without gateways too.
        let flat = NetworkIndex::default();
        let v = EdsView {
            visible: Some(vec!["network4".into()]),
            ..Default::default()
        };
        assert_eq!(
            show(&filter(&bucket, &v, &flat, &injected, false)),
            vec![("10.4.0.1:8080".into(), 1)]
        );
    }

    #[test]
    fn a_single_network_mesh_is_unchanged() {
        let (eps, _) = mesh();
        let bucket: Vec<&Endpoint> = eps.iter().collect();
        let flat = NetworkIndex::default();
        let got = filter(&bucket, &view(""), &flat, &injected, false);
        assert_eq!(got.len(), eps.len());
        assert!(got.iter().all(|w| w.weight == 1 && matches!(w.target, Target::Pod(_))));
    }

    #[test]
    fn a_proxy_without_a_network_goes_through_gateways_and_families_are_respected() {
        let eps = [ep("10.2.0.1", "n2", "c2", true)];
        let bucket: Vec<&Endpoint> = eps.iter().collect();
        let idx = index(&[("c2", "n2", &["2.2.2.2", "fd00::2"])], &[]);
        // istio/istio#58612: an empty proxy network is "the same" as any, but a named network
        // with a gateway is still reached through it.
        let got = show(&filter(&bucket, &view(""), &idx, &injected, false));
        // lcm 2 (two gateways in the bucket); the IPv4-only proxy reaches one and it takes it all.
        assert_eq!(
            got,
            vec![("2.2.2.2:15443".into(), 2)],
            "IPv4-only proxy skips the v6 gateway"
        );
        let mut v6 = view("n1");
        v6.v4 = false;
        v6.v6 = true;
        assert_eq!(
            show(&filter(&bucket, &v6, &idx, &injected, false)),
            vec![("fd00::2:15443".into(), 2)]
        );
        v6.v6 = false;
        assert!(
            filter(&bucket, &v6, &idx, &injected, false).is_empty(),
            "no reachable gateway: dropped"
        );
    }

    #[test]
    fn a_network_waiting_for_its_gateway_address_is_left_out() {
        let eps = [ep("10.1.0.1", "n1", "c1", true), ep("10.2.0.1", "n2", "c2", true)];
        let bucket: Vec<&Endpoint> = eps.iter().collect();
        let idx = index(&[("c2", "n2", &["ew.example.com"])], &[]);
        assert_eq!(
            show(&filter(&bucket, &view("n1"), &idx, &injected, false)),
            vec![("10.1.0.1:8080".into(), 1)]
        );
        let idx = index(
            &[("c2", "n2", &["ew.example.com"])],
            &[("ew.example.com", &["7.7.7.7"])],
        );
        assert_eq!(
            show(&filter(&bucket, &view("n1"), &idx, &injected, false)),
            vec![("10.1.0.1:8080".into(), 1), ("7.7.7.7:15443".into(), 1)]
        );
    }
}
