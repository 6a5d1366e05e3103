//! EDS: one ClusterLoadAssignment per `outbound|port|subset|host` cluster, endpoints grouped by
//! locality. Built per host so an endpoint-only change rebuilds only the changed hosts.
use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{Address, Locality, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::google::protobuf::UInt32Value;

use super::{cds, names};
use crate::registry::model::{self, Service};
use crate::xds::push::PushContext;
use crate::xds::resource::Resource;
use crate::xds::types;

fn lb_endpoint(e: &model::Endpoint) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: e.address.to_string(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(e.port))),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        load_balancing_weight: Some(UInt32Value { value: 1 }),
        ..Default::default()
    }
}

/// The ClusterLoadAssignment of one cluster name.
pub fn assignment(
    name: &str,
    svc: &Service,
    endpoints: &[model::Endpoint],
    subset_labels: Option<&BTreeMap<String, String>>,
    port: u16,
) -> ClusterLoadAssignment {
    let port_name = svc.port(port).map(|p| p.name.as_str()).unwrap_or_default();
    let mut by_locality: BTreeMap<&model::Locality, Vec<LbEndpoint>> = BTreeMap::new();
    for e in endpoints {
        if !e.ready || e.service_port_name != port_name {
            continue;
        }
        if let Some(sel) = subset_labels
            && !e.matches(sel)
        {
            continue;
        }
        by_locality.entry(&e.locality).or_default().push(lb_endpoint(e));
    }
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: by_locality
            .into_iter()
            .map(|(loc, eps)| LocalityLbEndpoints {
                locality: Some(Locality {
                    region: loc.region.clone(),
                    zone: loc.zone.clone(),
                    sub_zone: loc.subzone.clone(),
                }),
                load_balancing_weight: Some(UInt32Value {
                    value: eps.len() as u32,
                }),
                lb_endpoints: eps,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Every EDS resource of one host (all ports, all subsets).
pub fn host_resources(push: &PushContext, host: &str) -> Vec<Arc<Resource>> {
    let Some(svc) = push.snapshot.service(host) else {
        return Vec::new();
    };
    let endpoints = push.snapshot.endpoints(host);
    let dr = cds::destination_rule(push, host);
    let mut out = Vec::new();
    for port in &svc.ports {
        let name = names::outbound(port.port, "", host);
        out.push(Arc::new(Resource::new(
            &name,
            types::ENDPOINT,
            &assignment(&name, svc, endpoints, None, port.port),
        )));
        for subset in dr.map(|d| d.spec.subsets.as_slice()).unwrap_or_default() {
            let name = names::outbound(port.port, &subset.name, host);
            let cla = assignment(&name, svc, endpoints, Some(&subset.labels), port.port);
            out.push(Arc::new(Resource::new(&name, types::ENDPOINT, &cla)));
        }
    }
    out
}
