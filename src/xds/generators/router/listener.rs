//! LDS for gateways: one listener per bind address and port, named `<bind>_<port>`.
use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress};
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, TrafficDirection, TransportSocket, address, config_source,
    socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, common_tls_context,
};
use envoy_types::pb::google::protobuf::BoolValue;

use super::route::{any, weighted};
use super::{GatewayModel, PortServers, Server, ServerKind};
use crate::registry::istio::RouteDestination;
use crate::xds::push::PushContext;
use crate::xds::resource::{Resource, ResourceSet};
use crate::xds::types;

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const TCP_PROXY_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
const TLS_CONTEXT_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";

/// Credentials come over the same ADS stream (istiod's SDS for `credentialName`).
pub(super) fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// SDS resource name of a credential: `kubernetes://<name>` (`-cacert` for its CA).
pub fn credential_resource(name: &str) -> String {
    format!("kubernetes://{name}")
}

fn hcm(route_name: &str, stat_prefix: &str) -> Filter {
    let router = HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(
            "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            &Router::default(),
        ))),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: stat_prefix.into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: route_name.into(),
        })),
        http_filters: vec![router],
        // A gateway is the edge: it sets X-Forwarded-For from the peer.
        use_remote_address: Some(BoolValue { value: true }),
        normalize_path: Some(BoolValue { value: true }),
        // `Host: example.com:8080` matches the virtual host `example.com`.
        strip_port_mode: Some(http_connection_manager::StripPortMode::StripAnyHostPort(true)),
        upgrade_configs: vec![http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(HCM_TYPE, &hcm))),
    }
}

fn tcp_proxy_filter(
    push: &PushContext,
    dests: &[RouteDestination],
    namespace: &str,
    stat_prefix: &str,
) -> Option<Filter> {
    let w = weighted(push, dests, namespace, 0);
    let spec = match w.as_slice() {
        [] => return None,
        [(name, _)] => tcp_proxy::ClusterSpecifier::Cluster(name.clone()),
        many => tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
            clusters: many
                .iter()
                .map(|(name, w)| tcp_proxy::weighted_cluster::ClusterWeight {
                    name: name.clone(),
                    weight: *w,
                    ..Default::default()
                })
                .collect(),
        }),
    };
    let p = TcpProxy {
        stat_prefix: stat_prefix.into(),
        cluster_specifier: Some(spec),
        ..Default::default()
    };
    Some(Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(TCP_PROXY_TYPE, &p))),
    })
}

fn downstream_tls(credential: &str, mutual: bool) -> TransportSocket {
    let ctx = DownstreamTlsContext {
        common_tls_context: Some(CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                name: credential_resource(credential),
                sds_config: Some(ads()),
            }],
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            validation_context_type: mutual.then(|| {
                common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(SdsSecretConfig {
                    name: credential_resource(&format!("{credential}-cacert")),
                    sds_config: Some(ads()),
                })
            }),
            ..Default::default()
        }),
        require_client_certificate: Some(BoolValue { value: mutual }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(TLS_CONTEXT_TYPE, &ctx))),
    }
}

fn listener(ps: &PortServers<'_>, filter_chains: Vec<FilterChain>, tls: bool) -> Listener {
    Listener {
        name: ps.listener_name(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ps.bind.clone(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(ps.port))),
                ..Default::default()
            })),
        }),
        filter_chains,
        listener_filters: if tls {
            vec![ListenerFilter {
                name: "envoy.filters.listener.tls_inspector".into(),
                config_type: Some(listener_filter::ConfigType::TypedConfig(any(
                    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
                    &TlsInspector::default(),
                ))),
                ..Default::default()
            }]
        } else {
            Vec::new()
        },
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}

/// Filter chains picked by SNI. Envoy refuses two chains with the same match, so a server name
/// goes to the first chain that claims it, and only one chain may match any name.
#[derive(Default)]
struct SniChains {
    chains: Vec<FilterChain>,
    claimed: BTreeSet<String>,
    catch_all: bool,
}

impl SniChains {
    fn add(&mut self, names: Vec<String>, chain: FilterChain) {
        self.add_with_alpn(names, &[], chain)
    }

    fn add_with_alpn(&mut self, names: Vec<String>, alpn: &[&str], mut chain: FilterChain) {
        let catch_all = names.is_empty() || names.iter().any(|n| n == "*");
        if catch_all {
            if self.catch_all {
                return;
            }
            self.catch_all = true;
            chain.filter_chain_match = None;
        } else {
            let fresh: Vec<String> = names.into_iter().filter(|n| self.claimed.insert(n.clone())).collect();
            if fresh.is_empty() {
                return;
            }
            chain.filter_chain_match = Some(FilterChainMatch {
                server_names: fresh,
                application_protocols: alpn.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            });
        }
        self.chains.push(chain);
    }
}

fn tls_listener(push: &PushContext, model: &GatewayModel<'_>, ps: &PortServers<'_>) -> Option<Listener> {
    let mut sni = SniChains::default();
    for s in &ps.servers {
        match s.kind {
            ServerKind::HttpsTerminate => https_chain(s, &mut sni),
            ServerKind::Passthrough => passthrough_chains(push, model, s, &mut sni),
            ServerKind::AutoPassthrough => auto_passthrough_chains(push, s, &mut sni),
            _ => {}
        }
    }
    // Catch-all last: Envoy picks the most specific match anyway, this keeps the order stable.
    sni.chains.sort_by_key(|c| c.filter_chain_match.is_none());
    (!sni.chains.is_empty()).then(|| listener(ps, sni.chains, true))
}

fn https_chain(s: &Server<'_>, sni: &mut SniChains) {
    let Some(credential) = s.credential_name() else {
        tracing::debug!(gateway = %format!("{}/{}", s.gateway.meta.namespace, s.gateway.meta.name), port = s.port, "HTTPS server without credentialName (certificate files are not supported); skipped");
        return;
    };
    let mutual = matches!(s.tls_mode().as_str(), "MUTUAL" | "OPTIONAL_MUTUAL");
    let route = s.https_route_name();
    let chain = FilterChain {
        name: route.clone(),
        filters: vec![hcm(&route, &format!("outbound_{}_{}", s.port, s.server.port.name))],
        transport_socket: Some(downstream_tls(credential, mutual)),
        ..Default::default()
    };
    sni.add(s.hosts.iter().map(|h| h.host.clone()).collect(), chain);
}

fn passthrough_chains(push: &PushContext, model: &GatewayModel<'_>, s: &Server<'_>, sni: &mut SniChains) {
    for vs in model.bound(s) {
        for (i, r) in vs.spec.tls.iter().enumerate() {
            let mut names: Vec<String> = Vec::new();
            for m in r
                .matches
                .iter()
                .filter(|m| m.port.is_none_or(|p| p == u32::from(s.port)))
            {
                for n in m.sni_hosts.iter().flat_map(|h| s.serves(h, &vs.meta.namespace)) {
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
            if names.is_empty() {
                continue;
            }
            let stat = format!("{}.{}.tls.{i}", vs.meta.namespace, vs.meta.name);
            let Some(f) = tcp_proxy_filter(push, &r.route, &vs.meta.namespace, &stat) else {
                continue;
            };
            let chain = FilterChain {
                name: stat,
                filters: vec![f],
                ..Default::default()
            };
            sni.add(names, chain);
        }
    }
}

/// ALPN values of Istio mTLS (istiod's `allIstioMtlsALPNs`): together with the mTLS-only EDS of
/// the SNI-DNAT clusters, only Istio mTLS clients get through an AUTO_PASSTHROUGH port.
pub const ISTIO_MTLS_ALPNS: [&str; 5] = [
    "istio",
    "istio-peer-exchange",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];

/// An AUTO_PASSTHROUGH server: one chain per service port and DestinationRule subset its hosts
/// cover, matching the SNI `outbound_.port_.subset_.host` a sidecar sends and proxying the still
/// encrypted bytes to the SNI-DNAT cluster of the same name. No authorization here, as in
/// istiod: the backend's sidecar checks the client's certificate.
fn auto_passthrough_chains(push: &PushContext, s: &Server<'_>, sni: &mut SniChains) {
    for svc in push.snapshot.services.values() {
        if !s.hosts.iter().any(|h| h.covers_service(svc)) {
            continue;
        }
        let dr = crate::xds::generators::cds::destination_rule(push, &svc.hostname);
        let mut subsets = vec![""];
        subsets.extend(dr.iter().flat_map(|d| d.spec.subsets.iter().map(|s| s.name.as_str())));
        for port in &svc.ports {
            for subset in &subsets {
                let name = crate::xds::generators::names::sni_dnat(port.port, subset, &svc.hostname);
                let p = TcpProxy {
                    stat_prefix: name.clone(),
                    cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(name.clone())),
                    ..Default::default()
                };
                let chain = FilterChain {
                    name: name.clone(),
                    filters: vec![Filter {
                        name: "envoy.filters.network.tcp_proxy".into(),
                        config_type: Some(filter::ConfigType::TypedConfig(any(TCP_PROXY_TYPE, &p))),
                    }],
                    ..Default::default()
                };
                sni.add_with_alpn(vec![name], &ISTIO_MTLS_ALPNS, chain);
            }
        }
    }
}

fn tcp_listener(push: &PushContext, model: &GatewayModel<'_>, ps: &PortServers<'_>) -> Option<Listener> {
    for s in &ps.servers {
        for vs in model.bound(s) {
            // A TCP route applies to the server when one of the VirtualService's hosts is served.
            if !vs
                .spec
                .hosts
                .iter()
                .any(|h| !s.serves(h, &vs.meta.namespace).is_empty())
            {
                continue;
            }
            for r in &vs.spec.tcp {
                let applies =
                    r.matches.is_empty() || r.matches.iter().any(|m| m.port.is_none_or(|p| p == u32::from(s.port)));
                if !applies {
                    continue;
                }
                let stat = format!("outbound_{}_tcp", ps.port);
                if let Some(f) = tcp_proxy_filter(push, &r.route, &vs.meta.namespace, &stat) {
                    let chain = FilterChain {
                        filters: vec![f],
                        ..Default::default()
                    };
                    return Some(listener(ps, vec![chain], false));
                }
            }
        }
    }
    None
}

pub fn generate(push: &PushContext, model: &GatewayModel<'_>) -> ResourceSet {
    let mut out = ResourceSet::new();
    for ps in model.ports.values() {
        let l = match ps.kind() {
            ServerKind::Http => {
                let stat = format!("outbound_{}_{}", ps.bind, ps.port);
                Some(listener(
                    ps,
                    vec![FilterChain {
                        filters: vec![hcm(&ps.http_route_name(), &stat)],
                        ..Default::default()
                    }],
                    false,
                ))
            }
            ServerKind::HttpsTerminate | ServerKind::Passthrough | ServerKind::AutoPassthrough => {
                tls_listener(push, model, ps)
            }
            ServerKind::Tcp => tcp_listener(push, model, ps),
        };
        if let Some(l) = l {
            out.insert(
                l.name.clone(),
                std::sync::Arc::new(Resource::new(&l.name, types::LISTENER, &l)),
            );
        }
    }
    out
}
