//! EDS: one ClusterLoadAssignment per `outbound|port|subset|host` cluster, endpoints grouped by
//! locality, as one [`EdsView`] sees them (split horizon, `split_horizon.rs`). Built per host and
//! view, so an endpoint-only change rebuilds only the changed hosts, once per view in use.
//! Gateways also get the SNI-DNAT assignments `outbound_.port_.subset_.host` of their
//! AUTO_PASSTHROUGH clusters: the same endpoints, mTLS-capable ones only.
use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{Address, Locality, Metadata, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value, value};

use super::split_horizon::{self, EdsView, Target};
use super::{cds, names};
use crate::registry::istio::DestinationRuleSpec;
use crate::registry::model::{self, Service};
use crate::registry::network::NetworkIndex;
use crate::xds::push::PushContext;
use crate::xds::resource::Resource;
use crate::xds::types;

/// Bytes of ClusterLoadAssignments encoded, process-wide (`meshd_xds_eds_bytes_encoded`): with
/// encode-once per view, an endpoint change costs its hosts' assignments times the views in use.
pub fn encoded_bytes() -> Arc<crate::admin::metrics::Counter> {
    static C: std::sync::OnceLock<Arc<crate::admin::metrics::Counter>> = std::sync::OnceLock::new();
    Arc::clone(C.get_or_init(Default::default))
}

fn socket_address(ip: &std::net::IpAddr, port: u16) -> Option<Address> {
    Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    })
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(value::Kind::StringValue(s.to_string())),
    }
}

/// A gateway standing in for a remote network's endpoints: `tlsMode: istio`, so the client
/// originates mesh mTLS, which the gateway passes through. (istiod also adds a telemetry label
/// `istio: {workload: ";;;;<cluster>"}` for Istio's stats filter, which meshd's config does not
/// use; leaving it out keeps a gateway endpoint as small as a pod's.)
fn gateway_metadata() -> Metadata {
    let tls = Struct {
        fields: [("tlsMode".to_string(), string_value("istio"))].into_iter().collect(),
    };
    Metadata {
        filter_metadata: [("envoy.transport_socket_match".to_string(), tls)]
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

fn lb_endpoint(w: &split_horizon::Weighted<'_>) -> LbEndpoint {
    let (address, metadata) = match &w.target {
        Target::Pod(e) => (socket_address(&e.address, e.port), None),
        Target::Gateway(g) => (socket_address(&g.addr, g.port), Some(gateway_metadata())),
    };
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address,
            ..Default::default()
        })),
        load_balancing_weight: Some(UInt32Value { value: w.weight }),
        metadata,
        ..Default::default()
    }
}

/// One cluster's assignment: which endpoints, how they are filtered, for whom.
pub struct AssignmentInput<'a> {
    pub name: &'a str,
    pub svc: &'a Service,
    pub endpoints: &'a [model::Endpoint],
    pub port: u16,
    /// The DestinationRule subset (empty: the whole service).
    pub subset: &'a str,
    pub subset_labels: Option<&'a BTreeMap<String, String>>,
    pub dr: Option<&'a DestinationRuleSpec>,
    /// SNI-DNAT clusters of a gateway carry only endpoints that terminate Istio mTLS.
    pub mtls_only: bool,
}

/// The ClusterLoadAssignment of one cluster name as `view` sees it.
pub fn assignment(input: &AssignmentInput<'_>, view: &EdsView, networks: &NetworkIndex) -> ClusterLoadAssignment {
    let port_name = input.svc.port(input.port).map(|p| p.name.as_str()).unwrap_or_default();
    let mut by_locality: BTreeMap<&model::Locality, Vec<&model::Endpoint>> = BTreeMap::new();
    for e in input.endpoints {
        if !e.ready || e.service_port_name != port_name {
            continue;
        }
        if let Some(sel) = input.subset_labels
            && !e.matches(sel)
        {
            continue;
        }
        by_locality.entry(&e.locality).or_default().push(e);
    }
    let mtls = |e: &model::Endpoint| split_horizon::mtls_enabled(e, input.dr, input.subset);
    let endpoints = by_locality
        .into_iter()
        .filter_map(|(loc, bucket)| {
            let kept = split_horizon::filter(&bucket, view, networks, &mtls, input.mtls_only);
            if kept.is_empty() {
                return None;
            }
            let weight = kept.iter().fold(0u32, |acc, w| acc.saturating_add(w.weight));
            Some(LocalityLbEndpoints {
                locality: Some(Locality {
                    region: loc.region.clone(),
                    zone: loc.zone.clone(),
                    sub_zone: loc.subzone.clone(),
                }),
                load_balancing_weight: Some(UInt32Value { value: weight }),
                lb_endpoints: kept.iter().map(lb_endpoint).collect(),
                ..Default::default()
            })
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: input.name.to_string(),
        endpoints,
        ..Default::default()
    }
}

/// The subsets of a host's DestinationRule, the whole service (`""`) first.
fn subsets(dr: Option<&DestinationRuleSpec>) -> Vec<(&str, Option<&BTreeMap<String, String>>)> {
    let mut out = vec![("", None)];
    for s in dr.map(|d| d.subsets.as_slice()).unwrap_or_default() {
        out.push((s.name.as_str(), Some(&s.labels)));
    }
    out
}

/// Every EDS cluster name of one host, in both forms (a gateway's SNI-DNAT names too).
pub fn cluster_names(push: &PushContext, host: &str) -> Vec<String> {
    let Some(svc) = push.snapshot.service(host) else {
        return Vec::new();
    };
    let dr = cds::destination_rule(push, host).map(|d| &d.spec);
    let mut out = Vec::new();
    for port in &svc.ports {
        for (subset, _) in subsets(dr) {
            out.push(names::outbound(port.port, subset, host));
            out.push(names::sni_dnat(port.port, subset, host));
        }
    }
    out
}

/// Every EDS resource of one host (all ports, all subsets) as `view` sees it.
pub fn host_resources(push: &PushContext, view: &EdsView, host: &str) -> Vec<Arc<Resource>> {
    let Some(svc) = push.snapshot.service(host) else {
        return Vec::new();
    };
    let endpoints = push.snapshot.endpoints(host);
    let networks = &push.snapshot.networks;
    let dr = cds::destination_rule(push, host).map(|d| &d.spec);
    let mut out = Vec::new();
    for port in &svc.ports {
        for (subset, subset_labels) in subsets(dr) {
            let mut forms = vec![(names::outbound(port.port, subset, host), false)];
            if view.sni_dnat {
                forms.push((names::sni_dnat(port.port, subset, host), true));
            }
            for (name, mtls_only) in forms {
                let input = AssignmentInput {
                    name: &name,
                    svc,
                    endpoints,
                    port: port.port,
                    subset,
                    subset_labels,
                    dr,
                    mtls_only,
                };
                let cla = assignment(&input, view, networks);
                let r = Resource::new(&name, types::ENDPOINT, &cla);
                encoded_bytes().add(r.any.len() as u64);
                out.push(Arc::new(r));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ServiceKey;
    use crate::registry::model::{Locality, Protocol, ServicePort};
    use crate::registry::network::{MeshNetworks, NETWORK_LABEL};
    use crate::registry::store::{ClusterShard, ShardService};
    use crate::xds::generators::split_horizon::TLS_MODE_LABEL;

    fn ep(ip: &str, network: &str, cluster: &str, version: &str) -> model::Endpoint {
        model::Endpoint {
            address: ip.parse().unwrap(),
            service_port_name: "http".into(),
            port: 8080,
            cluster_id: cluster.into(),
            network: network.into(),
            locality: Locality::default(),
            labels: [
                ("version".to_string(), version.to_string()),
                (TLS_MODE_LABEL.to_string(), "istio".to_string()),
            ]
            .into(),
            service_account: None,
            pod_name: None,
            ready: true,
        }
    }

    fn weights(c: &ClusterLoadAssignment) -> Vec<(String, u32)> {
        c.endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| {
                let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    unreachable!()
                };
                let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().and_then(|a| a.address.as_ref())
                else {
                    unreachable!()
                };
                let Some(socket_address::PortSpecifier::PortValue(p)) = sa.port_specifier else {
                    unreachable!()
                };
                (format!("{}:{p}", sa.address), e.load_balancing_weight.unwrap().value)
            })
            .collect()
    }

    /// Subsets are chosen before the network filter: a gateway's weight counts only the remote
    /// pods of the subset, and a subset with none there has no gateway endpoint.
    #[test]
    fn subsets_are_filtered_before_gateways_replace_remote_endpoints() {
        let svc = Service {
            key: ServiceKey::new("default", "echo"),
            hostname: "echo.default.svc.cluster.local".into(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Http,
            }],
            labels: BTreeMap::new(),
            cluster_ips: BTreeMap::new(),
        };
        let eps = vec![
            ep("10.1.0.1", "n1", "c1", "v1"),
            ep("10.2.0.1", "n2", "c2", "v1"),
            ep("10.2.0.2", "n2", "c2", "v1"),
            ep("10.2.0.3", "n2", "c2", "v2"),
        ];
        let mut shards: BTreeMap<String, ClusterShard> = BTreeMap::new();
        shards.entry("c2".into()).or_default().services.insert(
            ServiceKey::new("istio-system", "ew"),
            ShardService {
                ports: vec![ServicePort {
                    name: "tls".into(),
                    port: 15443,
                    protocol: Protocol::Tls,
                }],
                labels: [(NETWORK_LABEL.to_string(), "n2".to_string())].into(),
                external_addresses: vec!["2.2.2.2".into()],
                ..Default::default()
            },
        );
        let networks = NetworkIndex::build(&shards, &MeshNetworks::default(), &BTreeMap::new());
        let view = EdsView {
            network: "n1".into(),
            v4: true,
            ..Default::default()
        };
        let run = |subset: &str, labels: Option<&BTreeMap<String, String>>| {
            let input = AssignmentInput {
                name: "x",
                svc: &svc,
                endpoints: &eps,
                port: 80,
                subset,
                subset_labels: labels,
                dr: None,
                mtls_only: false,
            };
            assignment(&input, &view, &networks)
        };
        let version = |v: &str| BTreeMap::from([("version".to_string(), v.to_string())]);
        assert_eq!(
            weights(&run("", None)),
            vec![("10.1.0.1:8080".into(), 1), ("2.2.2.2:15443".into(), 3)]
        );
        assert_eq!(
            weights(&run("v1", Some(&version("v1")))),
            vec![("10.1.0.1:8080".into(), 1), ("2.2.2.2:15443".into(), 2)]
        );
        let none = run("v3", Some(&version("v3")));
        assert!(none.endpoints.is_empty(), "no v3 anywhere: no gateway either");
    }
}
