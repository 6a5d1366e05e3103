//! CDS: one EDS cluster per service port, plus one per DestinationRule subset.
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, Http2ProtocolOptions, config_source,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
use prost::Message;

use super::names;
use crate::registry::istio::{Config, DestinationRuleSpec};
use crate::registry::model::Service;
use crate::xds::node::ProxyInfo;
use crate::xds::push::PushContext;
use crate::xds::resource::{Resource, ResourceSet};
use crate::xds::types;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Every proxy gets the same clusters, except that proxyless gRPC and Envoy differ.
pub fn class_key(proxy: &ProxyInfo) -> String {
    if proxy.is_grpc() { "grpc".into() } else { "envoy".into() }
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// The DestinationRule for a host, if any (most specific namespace match is not modelled yet:
/// the first rule for the exact host wins, in namespace/name order).
pub fn destination_rule<'a>(push: &'a PushContext, host: &str) -> Option<&'a Config<DestinationRuleSpec>> {
    push.snapshot
        .config
        .destination_rules
        .iter()
        .find(|dr| names::resolve_host(&dr.spec.host, &dr.meta.namespace) == host)
}

fn eds_cluster(name: String, http2: bool) -> Cluster {
    let mut c = Cluster {
        name,
        connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: CONNECT_TIMEOUT.as_secs() as i64,
            nanos: 0,
        }),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    };
    if http2 {
        let opts = HttpProtocolOptions {
            upstream_protocol_options: Some(http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Http2ProtocolOptions::default(),
                        ),
                    ),
                },
            )),
            ..Default::default()
        };
        // One map entry only: protobuf map order is unspecified, and resource versions hash bytes.
        c.typed_extension_protocol_options.insert(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
            envoy_types::pb::google::protobuf::Any {
                type_url: "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions".into(),
                value: opts.encode_to_vec(),
            },
        );
    }
    c
}

fn service_clusters(push: &PushContext, svc: &Service, out: &mut ResourceSet, tls: bool) {
    let dr = destination_rule(push, &svc.hostname);
    for port in &svc.ports {
        let http2 = matches!(
            port.protocol,
            crate::registry::Protocol::Grpc | crate::registry::Protocol::Http2
        );
        let mut subsets = vec![String::new()];
        if let Some(dr) = dr {
            subsets.extend(dr.spec.subsets.iter().map(|s| s.name.clone()));
        }
        for subset in subsets {
            let name = names::outbound(port.port, &subset, &svc.hostname);
            let mut c = eds_cluster(name.clone(), http2);
            // DestinationRule client TLS (Envoy only: proxyless gRPC has its own TLS config).
            if tls && let Some(dr) = dr {
                c.transport_socket = super::upstream_tls::transport_socket(push, svc, port.port, &subset, &dr.spec);
            }
            out.insert(name.clone(), Arc::new(Resource::new(&name, types::CLUSTER, &c)));
        }
    }
}

/// An east-west gateway's SNI-DNAT clusters of `svc`: `outbound_.port_.subset_.host` for every
/// port and DestinationRule subset, EDS, and no TLS of their own (the client's mTLS passes
/// through; istiod's `SniDnatClusterMode` skips upstream TLS).
pub fn sni_dnat_clusters(push: &PushContext, svc: &Service, out: &mut ResourceSet) {
    let dr = destination_rule(push, &svc.hostname);
    for port in &svc.ports {
        let mut subsets = vec![String::new()];
        if let Some(dr) = dr {
            subsets.extend(dr.spec.subsets.iter().map(|s| s.name.clone()));
        }
        for subset in subsets {
            let name = names::sni_dnat(port.port, &subset, &svc.hostname);
            let c = eds_cluster(name.clone(), false);
            out.insert(name.clone(), Arc::new(Resource::new(&name, types::CLUSTER, &c)));
        }
    }
}

pub fn generate(push: &PushContext, proxy: &ProxyInfo) -> ResourceSet {
    let mut out = ResourceSet::new();
    for svc in push.snapshot.services.values() {
        service_clusters(push, svc, &mut out, !proxy.is_grpc());
    }
    out
}
