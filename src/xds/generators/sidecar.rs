//! Sidecar config (Envoy next to istio-agent, node type `sidecar`), in Istio's layout:
//!
//! - LDS: `virtualOutbound` (0.0.0.0:15001, original destination, hands connections to the
//!   per-port outbound listeners, else `PassthroughCluster`), `virtualInbound` (0.0.0.0:15006,
//!   one mTLS and one plaintext filter chain per port the proxy serves, else
//!   `InboundPassthroughCluster`), and one outbound listener `0.0.0.0_<port>` per service port
//!   (not bound: reached through `virtualOutbound`), HTTP ports through RDS `<port>`, TCP ports
//!   through tcp_proxy chains matched by cluster IP.
//! - RDS `<port>`: a virtual host per HTTP service on that port, plus an `allow_any` host.
//! - CDS: the outbound EDS clusters with ISTIO_MUTUAL TLS (certificates over SDS from the
//!   agent's `sds-grpc` cluster: `default` and `ROOTCA`), `BlackHoleCluster`,
//!   `PassthroughCluster`, `InboundPassthroughCluster` and `inbound|<port>||` per served port.
//!
//! Only Envoy's own extensions are used (no Istio filters), so a stock Envoy accepts it.
//! Cache classes: outbound config depends on the proxy's namespace (short host names) and
//! cluster (which cluster IPs it sees); inbound config depends on the ports it serves.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::Address;
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, BindConfig, CidrRange, ConfigSource, Http2ProtocolOptions, SocketAddress,
    TrafficDirection, TransportSocket, address, config_source, socket_address, transport_socket,
};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter};
use envoy_types::pb::envoy::config::listener::v3::{filter, listener_filter};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action, route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SubjectAltNameMatcher, TlsParameters,
    common_tls_context, subject_alt_name_matcher, tls_parameters,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{HttpProtocolOptions, http_protocol_options};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration, UInt32Value};
use prost::{Message, Name};

use super::{cds, names, upstream_tls};
use crate::registry::istio::{ClientTls, DestinationRuleSpec, TrafficPolicy};
use crate::registry::model::{DOMAIN_SUFFIX, Protocol, Service};
use crate::xds::node::{ProxyInfo, ProxyKind};
use crate::xds::push::PushContext;
use crate::xds::resource::{Resource, ResourceSet};
use crate::xds::types;

/// istio-agent's SDS cluster and the names of the workload certificate and the mesh roots.
pub use super::upstream_tls::{ROOT_CA, SDS_CLUSTER, WORKLOAD_CERT};
pub const BLACKHOLE: &str = "BlackHoleCluster";
pub const PASSTHROUGH: &str = "PassthroughCluster";
pub const INBOUND_PASSTHROUGH: &str = "InboundPassthroughCluster";
pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub const VIRTUAL_INBOUND: &str = "virtualInbound";
pub const VIRTUAL_OUTBOUND_PORT: u16 = 15001;
pub const VIRTUAL_INBOUND_PORT: u16 = 15006;
/// Source address of connections from the sidecar to its application (Istio's 127.0.0.6).
const INBOUND_BIND: &str = "127.0.0.6";
/// ALPN values Istio sidecars offer on mesh mTLS; the inbound mTLS chains match on them.
const MESH_ALPN: [&str; 5] = [
    "istio-peer-exchange",
    "istio",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];
const CONNECT_TIMEOUT_S: i64 = 10;

const HCM: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";
const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

/// Sidecar resources of `type_url`, or `None` for types the common generators serve (EDS).
pub fn generate(push: &PushContext, proxy: &ProxyInfo, type_url: &str) -> Option<Arc<ResourceSet>> {
    match type_url {
        types::CLUSTER => {
            let inbound = inbound_ports(push, proxy);
            let key = format!("sidecar|{}", inbound_key(&inbound));
            Some(push.cached(types::CLUSTER, key, || clusters(push, proxy, &inbound)))
        }
        types::LISTENER => {
            let inbound = inbound_ports(push, proxy);
            let key = format!("sidecar|{}|{}", proxy.cluster_id, inbound_key(&inbound));
            Some(push.cached(types::LISTENER, key, || listeners(push, proxy, &inbound)))
        }
        types::ROUTE => {
            let key = format!("sidecar|{}|{}", proxy.namespace, proxy.cluster_id);
            Some(push.cached(types::ROUTE, key, || route_configs(push, proxy)))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Shared building blocks (also used by the proxyless gRPC generators)
// ---------------------------------------------------------------------------------------------

/// `Any` of a message, by its full proto name.
pub fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

pub fn duration(d: std::time::Duration) -> Duration {
    Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn zero() -> Duration {
    Duration { seconds: 0, nanos: 0 }
}

pub fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

pub fn socket(ip: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

pub fn router_filter() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(&Router::default()))),
        ..Default::default()
    }
}

pub fn fault_filter() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.fault".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(any(&HttpFault::default()))),
        ..Default::default()
    }
}

pub fn rds(route_config_name: &str) -> http_connection_manager::RouteSpecifier {
    http_connection_manager::RouteSpecifier::Rds(Rds {
        config_source: Some(ads()),
        route_config_name: route_config_name.to_string(),
    })
}

fn network_filter<M: Message + Name>(name: &str, config: &M) -> Filter {
    Filter {
        name: name.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(any(config))),
    }
}

fn listener_filter<M: Message + Name>(name: &str, config: &M) -> ListenerFilter {
    ListenerFilter {
        name: name.to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(config))),
        ..Default::default()
    }
}

fn tcp_proxy_filter(stat_prefix: &str, cluster: &str) -> Filter {
    network_filter(
        TCP_PROXY,
        &TcpProxy {
            stat_prefix: stat_prefix.to_string(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
            ..Default::default()
        },
    )
}

fn string_matcher(exact: Option<&str>, prefix: Option<&str>, regex: Option<&str>) -> Option<StringMatcher> {
    let pattern = if let Some(e) = exact {
        string_matcher::MatchPattern::Exact(e.to_string())
    } else if let Some(p) = prefix {
        string_matcher::MatchPattern::Prefix(p.to_string())
    } else if let Some(r) = regex {
        string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: r.to_string(),
            ..Default::default()
        })
    } else {
        return None;
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    })
}

fn prefix_match(prefix: &str) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(route_match::PathSpecifier::Prefix(prefix.to_string())),
        ..Default::default()
    }
}

/// A route action to one cluster with Istio's defaults: no route timeout, and gRPC's
/// `grpc-timeout` header honoured (`max_stream_duration.grpc_timeout_header_max: 0s`).
fn action(cluster_specifier: route_action::ClusterSpecifier, timeout: Duration) -> RouteAction {
    RouteAction {
        cluster_specifier: Some(cluster_specifier),
        timeout: Some(timeout),
        max_stream_duration: Some(route_action::MaxStreamDuration {
            max_stream_duration: None,
            grpc_timeout_header_max: Some(zero()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The catch-all route to one cluster.
pub fn default_route(cluster: &str) -> Route {
    Route {
        name: "default".into(),
        r#match: Some(prefix_match("/")),
        action: Some(route::Action::Route(action(
            route_action::ClusterSpecifier::Cluster(cluster.to_string()),
            zero(),
        ))),
        ..Default::default()
    }
}

/// Mesh routes of `svc` on `port`: the http routes of the first VirtualService bound to the mesh
/// (no `gateways`, or `mesh` among them) for that host, else one route to its default cluster.
pub fn mesh_routes(push: &PushContext, svc: &Service, port: u16) -> Vec<Route> {
    for vs in &push.snapshot.config.virtual_services {
        let ns = vs.meta.namespace.as_str();
        let for_mesh = vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh");
        if !for_mesh || !vs.spec.hosts.iter().any(|h| names::resolve_host(h, ns) == svc.hostname) {
            continue;
        }
        let routes = super::router::route::http_routes(push, vs, port, port);
        if !routes.is_empty() {
            return routes;
        }
    }
    vec![default_route(&names::outbound(port, "", &svc.hostname))]
}

/// Host names a service answers to: the FQDN and its shorter forms (`name.ns.svc`, `name.ns`,
/// and `name` when `short` — only unambiguous within the service's own namespace), each bare
/// and with `:port`.
pub fn host_domains(svc: &Service, port: u16, short: bool) -> Vec<String> {
    let (name, ns) = (&svc.key.name, &svc.key.namespace);
    let mut hosts = vec![svc.hostname.clone(), format!("{name}.{ns}.svc"), format!("{name}.{ns}")];
    if short {
        hosts.push(name.clone());
    }
    if !svc.hostname.ends_with(DOMAIN_SUFFIX) {
        hosts.truncate(1);
    }
    hosts.into_iter().flat_map(|h| [format!("{h}:{port}"), h]).collect()
}

// ---------------------------------------------------------------------------------------------
// TLS (ISTIO_MUTUAL) with certificates from the agent's SDS
// ---------------------------------------------------------------------------------------------

use super::upstream_tls::sds;

fn common_tls(alpn: &[&str], sans: &[String]) -> CommonTlsContext {
    CommonTlsContext {
        tls_params: Some(TlsParameters {
            tls_minimum_protocol_version: tls_parameters::TlsProtocol::TlSv12 as i32,
            tls_maximum_protocol_version: tls_parameters::TlsProtocol::TlSv13 as i32,
            ..Default::default()
        }),
        tls_certificate_sds_secret_configs: vec![sds(WORKLOAD_CERT)],
        alpn_protocols: alpn.iter().map(|s| s.to_string()).collect(),
        validation_context_type: Some(common_tls_context::ValidationContextType::CombinedValidationContext(
            common_tls_context::CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: sans
                        .iter()
                        .map(|s| SubjectAltNameMatcher {
                            san_type: subject_alt_name_matcher::SanType::Uri as i32,
                            matcher: string_matcher(Some(s), None, None),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(sds(ROOT_CA)),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

fn tls_socket<M: Message + Name>(ctx: &M) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(ctx))),
    }
}

// ---------------------------------------------------------------------------------------------
// Inbound ports
// ---------------------------------------------------------------------------------------------

/// A port the proxy's workload serves (the target port of a service endpoint at its IP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct InboundPort {
    pub port: u16,
    pub http: bool,
    pub http2: bool,
}

/// The ports the proxy serves, found by its IPs among the endpoints of every service.
pub fn inbound_ports(push: &PushContext, proxy: &ProxyInfo) -> Vec<InboundPort> {
    let ips: BTreeSet<IpAddr> = proxy.ips.iter().copied().collect();
    let mut out: BTreeMap<u16, InboundPort> = BTreeMap::new();
    for e in ips.iter().flat_map(|ip| push.endpoints_at(ip)) {
        let Some(svc) = push.snapshot.service(&e.host) else {
            continue;
        };
        let Some(sp) = svc.ports.iter().find(|p| p.name == e.service_port_name) else {
            continue;
        };
        if e.port == VIRTUAL_INBOUND_PORT || e.port == VIRTUAL_OUTBOUND_PORT {
            continue;
        }
        let http = sp.protocol.is_http();
        let http2 = matches!(sp.protocol, Protocol::Grpc | Protocol::Http2);
        let entry = out.entry(e.port).or_insert(InboundPort {
            port: e.port,
            http,
            http2,
        });
        // Two services disagreeing on a port's protocol: treat it as TCP, which works for both.
        entry.http &= http;
        entry.http2 &= http2;
    }
    out.into_values().collect()
}

/// Whether the proxy gets config for its own ports: sidecars and proxyless gRPC (servers).
pub fn has_inbound(proxy: &ProxyInfo) -> bool {
    proxy.is_grpc() || proxy.kind == ProxyKind::Sidecar
}

/// What a proxy's inbound config is built from: (host, service port name, endpoint port) of every
/// endpoint at one of its IPs.
pub type InboundSig = BTreeSet<(String, String, u16)>;

/// The [`InboundSig`] of `proxy`, over the hosts in `only` (every host when `None`).
pub fn inbound_sig(push: &PushContext, proxy: &ProxyInfo, only: Option<&BTreeSet<String>>) -> InboundSig {
    let mut out = InboundSig::new();
    let mut add = |host: &String, eps: &[crate::registry::Endpoint]| {
        for e in eps.iter().filter(|e| proxy.ips.contains(&e.address)) {
            out.insert((host.clone(), e.service_port_name.clone(), e.port));
        }
    };
    match only {
        Some(hosts) => hosts.iter().for_each(|h| add(h, push.snapshot.endpoints(h))),
        None => {
            for ip in &proxy.ips {
                for e in push.endpoints_at(ip) {
                    out.insert((e.host.clone(), e.service_port_name.clone(), e.port));
                }
            }
        }
    }
    out
}

fn inbound_key(ports: &[InboundPort]) -> String {
    ports
        .iter()
        .map(|p| {
            format!(
                "{}{}",
                p.port,
                if p.http2 {
                    "g"
                } else if p.http {
                    "h"
                } else {
                    "t"
                }
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}||")
}

// ---------------------------------------------------------------------------------------------
// CDS
// ---------------------------------------------------------------------------------------------

fn http2_options() -> BTreeMap<String, Any> {
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
    [(HTTP_PROTOCOL_OPTIONS.to_string(), any(&opts))].into()
}

fn base_cluster(name: &str, kind: cluster::DiscoveryType, lb: cluster::LbPolicy) -> Cluster {
    Cluster {
        name: name.to_string(),
        connect_timeout: Some(Duration {
            seconds: CONNECT_TIMEOUT_S,
            nanos: 0,
        }),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(kind as i32)),
        lb_policy: lb as i32,
        ..Default::default()
    }
}

fn original_dst_cluster(name: &str, bind_inbound: bool, http2: bool) -> Cluster {
    let mut c = base_cluster(
        name,
        cluster::DiscoveryType::OriginalDst,
        cluster::LbPolicy::ClusterProvided,
    );
    if bind_inbound {
        c.upstream_bind_config = Some(BindConfig {
            source_address: Some(SocketAddress {
                address: INBOUND_BIND.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if http2 {
        c.typed_extension_protocol_options = http2_options().into_iter().collect();
    }
    c
}

fn put<M: Message>(out: &mut ResourceSet, name: &str, type_url: &str, m: &M) {
    out.insert(name.to_string(), Arc::new(Resource::new(name, type_url, m)));
}

/// The common outbound clusters (cds.rs, which applies DestinationRule TLS) with ISTIO_MUTUAL
/// added where no DestinationRule sets a TLS mode: Istio's mesh default between sidecars.
fn outbound_clusters(push: &PushContext, proxy: &ProxyInfo) -> ResourceSet {
    let base = push.cached(types::CLUSTER, cds::class_key(proxy), || cds::generate(push, proxy));
    let istio_mutual = DestinationRuleSpec {
        traffic_policy: Some(TrafficPolicy {
            tls: Some(ClientTls {
                mode: Some("ISTIO_MUTUAL".into()),
                ..Default::default()
            }),
        }),
        ..Default::default()
    };
    let mut out = ResourceSet::new();
    for (name, r) in base.iter() {
        let keep = |out: &mut ResourceSet| {
            out.insert(name.clone(), Arc::clone(r));
        };
        let Some((port, subset, host)) = names::parse_outbound(name) else {
            keep(&mut out);
            continue;
        };
        let explicit = cds::destination_rule(push, host)
            .and_then(|dr| upstream_tls::client_tls(&dr.spec, subset))
            .is_some_and(|t| t.mode.is_some());
        let decoded = Any::decode(r.any.as_ref())
            .ok()
            .and_then(|a| Cluster::decode(a.value.as_slice()).ok());
        let (Some(mut c), Some(svc)) = (decoded, push.snapshot.service(host)) else {
            keep(&mut out);
            continue;
        };
        if explicit || c.transport_socket.is_some() {
            keep(&mut out);
            continue;
        }
        c.transport_socket = upstream_tls::transport_socket(push, svc, port, subset, &istio_mutual);
        put(&mut out, name, types::CLUSTER, &c);
    }
    out
}

fn clusters(push: &PushContext, proxy: &ProxyInfo, inbound: &[InboundPort]) -> ResourceSet {
    let mut out = (*push.cached(types::CLUSTER, "sidecar-outbound".into(), || {
        outbound_clusters(push, proxy)
    }))
    .clone();
    let mut blackhole = base_cluster(BLACKHOLE, cluster::DiscoveryType::Static, cluster::LbPolicy::RoundRobin);
    blackhole.load_assignment = Some(ClusterLoadAssignment {
        cluster_name: BLACKHOLE.into(),
        ..Default::default()
    });
    put(&mut out, BLACKHOLE, types::CLUSTER, &blackhole);
    put(
        &mut out,
        PASSTHROUGH,
        types::CLUSTER,
        &original_dst_cluster(PASSTHROUGH, false, false),
    );
    put(
        &mut out,
        INBOUND_PASSTHROUGH,
        types::CLUSTER,
        &original_dst_cluster(INBOUND_PASSTHROUGH, true, false),
    );
    for p in inbound {
        let name = inbound_cluster_name(p.port);
        put(
            &mut out,
            &name,
            types::CLUSTER,
            &original_dst_cluster(&name, true, p.http2),
        );
    }
    out
}

// ---------------------------------------------------------------------------------------------
// LDS
// ---------------------------------------------------------------------------------------------

fn chain(name: &str, m: Option<FilterChainMatch>, filters: Vec<Filter>) -> FilterChain {
    FilterChain {
        name: name.to_string(),
        filter_chain_match: m,
        filters,
        ..Default::default()
    }
}

fn port_match(port: u16) -> FilterChainMatch {
    FilterChainMatch {
        destination_port: Some(UInt32Value { value: u32::from(port) }),
        ..Default::default()
    }
}

fn virtual_outbound() -> Listener {
    Listener {
        name: VIRTUAL_OUTBOUND.into(),
        address: Some(socket("0.0.0.0", VIRTUAL_OUTBOUND_PORT)),
        use_original_dst: Some(BoolValue { value: true }),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: vec![
            // Traffic addressed to 15001 itself would loop.
            chain(
                "virtualOutbound-blackhole",
                Some(port_match(VIRTUAL_OUTBOUND_PORT)),
                vec![tcp_proxy_filter(BLACKHOLE, BLACKHOLE)],
            ),
            chain(
                "virtualOutbound-catchall-tcp",
                None,
                vec![tcp_proxy_filter(PASSTHROUGH, PASSTHROUGH)],
            ),
        ],
        ..Default::default()
    }
}

fn inbound_hcm(p: &InboundPort) -> Filter {
    let cluster = inbound_cluster_name(p.port);
    let hcm = HttpConnectionManager {
        stat_prefix: format!("inbound_0.0.0.0_{}", p.port),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: cluster.clone(),
                virtual_hosts: vec![VirtualHost {
                    name: format!("inbound|http|{}", p.port),
                    domains: vec!["*".into()],
                    routes: vec![default_route(&cluster)],
                    ..Default::default()
                }],
                validate_clusters: Some(BoolValue { value: false }),
                ..Default::default()
            },
        )),
        http_filters: vec![router_filter()],
        ..Default::default()
    };
    network_filter(HCM, &hcm)
}

fn inbound_filters(p: &InboundPort) -> Vec<Filter> {
    if p.http {
        vec![inbound_hcm(p)]
    } else {
        let cluster = inbound_cluster_name(p.port);
        vec![tcp_proxy_filter(&cluster, &cluster)]
    }
}

fn virtual_inbound(inbound: &[InboundPort]) -> Listener {
    let mut chains = vec![chain(
        "virtualInbound-blackhole",
        Some(port_match(VIRTUAL_INBOUND_PORT)),
        vec![tcp_proxy_filter(BLACKHOLE, BLACKHOLE)],
    )];
    for p in inbound {
        // PERMISSIVE, Istio's default: mesh mTLS (recognised by Istio's ALPN values) or plaintext.
        let alpn: &[&str] = if p.http {
            &["h2", "http/1.1"]
        } else {
            &["istio-peer-exchange", "h2", "http/1.1"]
        };
        let tls = DownstreamTlsContext {
            common_tls_context: Some(common_tls(alpn, &[])),
            require_client_certificate: Some(BoolValue { value: true }),
            ..Default::default()
        };
        let mut mtls = chain(
            &format!("0.0.0.0_{}_mtls", p.port),
            Some(FilterChainMatch {
                transport_protocol: "tls".into(),
                application_protocols: MESH_ALPN.iter().map(|s| s.to_string()).collect(),
                ..port_match(p.port)
            }),
            inbound_filters(p),
        );
        mtls.transport_socket = Some(tls_socket(&tls));
        chains.push(mtls);
        chains.push(chain(
            &format!("0.0.0.0_{}_plaintext", p.port),
            Some(FilterChainMatch {
                transport_protocol: "raw_buffer".into(),
                ..port_match(p.port)
            }),
            inbound_filters(p),
        ));
    }
    Listener {
        name: VIRTUAL_INBOUND.into(),
        address: Some(socket("0.0.0.0", VIRTUAL_INBOUND_PORT)),
        traffic_direction: TrafficDirection::Inbound as i32,
        listener_filters: vec![
            listener_filter("envoy.filters.listener.original_dst", &OriginalDst {}),
            listener_filter("envoy.filters.listener.tls_inspector", &TlsInspector::default()),
        ],
        filter_chains: chains,
        default_filter_chain: Some(chain(
            "InboundPassthroughFilterChain",
            None,
            vec![tcp_proxy_filter(INBOUND_PASSTHROUGH, INBOUND_PASSTHROUGH)],
        )),
        ..Default::default()
    }
}

/// The cluster IPs of a service as the proxy sees them: those of its own cluster, else all.
fn cluster_ips(svc: &Service, cluster_id: &str) -> Vec<IpAddr> {
    match svc.cluster_ips.get(cluster_id) {
        Some(ips) if !ips.is_empty() => ips.clone(),
        _ => {
            let all: BTreeSet<IpAddr> = svc.cluster_ips.values().flatten().copied().collect();
            all.into_iter().collect()
        }
    }
}

fn reserved(port: u16) -> bool {
    port == VIRTUAL_INBOUND_PORT || port == VIRTUAL_OUTBOUND_PORT
}

/// Services by port, split into HTTP and TCP.
fn services_by_port(push: &PushContext) -> BTreeMap<u16, (Vec<&Service>, Vec<&Service>)> {
    let mut by_port: BTreeMap<u16, (Vec<&Service>, Vec<&Service>)> = BTreeMap::new();
    for svc in push.snapshot.services.values() {
        for p in svc.ports.iter().filter(|p| !reserved(p.port)) {
            let e = by_port.entry(p.port).or_default();
            if p.protocol.is_http() {
                e.0.push(svc)
            } else {
                e.1.push(svc)
            }
        }
    }
    by_port
}

fn outbound_listener(port: u16, http: &[&Service], tcp: &[&Service], cluster_id: &str) -> Listener {
    let mut chains = Vec::new();
    let mut used: BTreeSet<IpAddr> = BTreeSet::new();
    for svc in tcp {
        let ranges: Vec<CidrRange> = cluster_ips(svc, cluster_id)
            .into_iter()
            .filter(|ip| used.insert(*ip))
            .map(|ip| CidrRange {
                address_prefix: ip.to_string(),
                prefix_len: Some(UInt32Value {
                    value: if ip.is_ipv4() { 32 } else { 128 },
                }),
            })
            .collect();
        if ranges.is_empty() {
            continue;
        }
        let cluster = names::outbound(port, "", &svc.hostname);
        chains.push(chain(
            &cluster,
            Some(FilterChainMatch {
                prefix_ranges: ranges,
                ..Default::default()
            }),
            vec![tcp_proxy_filter(&cluster, &cluster)],
        ));
    }
    let default_filters = if !http.is_empty() {
        let hcm = HttpConnectionManager {
            stat_prefix: format!("outbound_0.0.0.0_{port}"),
            route_specifier: Some(rds(&port.to_string())),
            http_filters: vec![fault_filter(), router_filter()],
            ..Default::default()
        };
        vec![network_filter(HCM, &hcm)]
    } else if let [svc] = tcp {
        let cluster = names::outbound(port, "", &svc.hostname);
        vec![tcp_proxy_filter(&cluster, &cluster)]
    } else {
        vec![tcp_proxy_filter(PASSTHROUGH, PASSTHROUGH)]
    };
    chains.push(chain(&format!("0.0.0.0_{port}"), None, default_filters));
    Listener {
        name: format!("0.0.0.0_{port}"),
        address: Some(socket("0.0.0.0", port)),
        bind_to_port: Some(BoolValue { value: false }),
        traffic_direction: TrafficDirection::Outbound as i32,
        filter_chains: chains,
        ..Default::default()
    }
}

fn outbound_listeners(push: &PushContext, cluster_id: &str) -> ResourceSet {
    let mut out = ResourceSet::new();
    for (port, (http, tcp)) in services_by_port(push) {
        let l = outbound_listener(port, &http, &tcp, cluster_id);
        put(&mut out, &l.name.clone(), types::LISTENER, &l);
    }
    out
}

fn listeners(push: &PushContext, proxy: &ProxyInfo, inbound: &[InboundPort]) -> ResourceSet {
    let key = format!("sidecar-outbound|{}", proxy.cluster_id);
    let mut out = (*push.cached(types::LISTENER, key, || outbound_listeners(push, &proxy.cluster_id))).clone();
    put(&mut out, VIRTUAL_OUTBOUND, types::LISTENER, &virtual_outbound());
    put(&mut out, VIRTUAL_INBOUND, types::LISTENER, &virtual_inbound(inbound));
    out
}

// ---------------------------------------------------------------------------------------------
// RDS
// ---------------------------------------------------------------------------------------------

fn route_configs(push: &PushContext, proxy: &ProxyInfo) -> ResourceSet {
    let mut out = ResourceSet::new();
    for (port, (http, _)) in services_by_port(push) {
        if http.is_empty() {
            continue;
        }
        // Envoy rejects a route configuration in which two virtual hosts share a domain.
        let mut used: BTreeSet<String> = BTreeSet::new();
        let mut vhosts = Vec::new();
        for svc in http {
            let mut domains = host_domains(svc, port, svc.key.namespace == proxy.namespace);
            for ip in cluster_ips(svc, &proxy.cluster_id) {
                let ip = if ip.is_ipv6() {
                    format!("[{ip}]")
                } else {
                    ip.to_string()
                };
                domains.push(format!("{ip}:{port}"));
                domains.push(ip);
            }
            domains.retain(|d| used.insert(d.clone()));
            if domains.is_empty() {
                continue;
            }
            vhosts.push(VirtualHost {
                name: format!("{}:{port}", svc.hostname),
                domains,
                routes: mesh_routes(push, svc, port),
                ..Default::default()
            });
        }
        vhosts.push(VirtualHost {
            name: "allow_any".into(),
            domains: vec!["*".into()],
            routes: vec![default_route(PASSTHROUGH)],
            ..Default::default()
        });
        let name = port.to_string();
        let rc = RouteConfiguration {
            name: name.clone(),
            virtual_hosts: vhosts,
            validate_clusters: Some(BoolValue { value: false }),
            ..Default::default()
        };
        put(&mut out, &name, types::ROUTE, &rc);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::grpc::tests::{proxy, push};
    use super::*;

    fn decode<M: Message + Default>(set: &ResourceSet, name: &str) -> M {
        let any = Any::decode(set[name].any.as_ref()).unwrap();
        M::decode(any.value.as_slice()).unwrap()
    }

    #[test]
    fn sidecar_layout_with_inbound_from_the_proxy_ip() {
        let push = push();
        let p = proxy("10.0.0.5", false);
        let lds = generate(&push, &p, types::LISTENER).unwrap();
        assert_eq!(
            lds.keys().map(String::as_str).collect::<Vec<_>>(),
            vec!["0.0.0.0_7070", VIRTUAL_INBOUND, VIRTUAL_OUTBOUND]
        );
        let inbound: Listener = decode(&lds, VIRTUAL_INBOUND);
        let ports: Vec<Option<u32>> = inbound
            .filter_chains
            .iter()
            .map(|c| {
                c.filter_chain_match
                    .as_ref()
                    .and_then(|m| m.destination_port)
                    .map(|p| p.value)
            })
            .collect();
        assert_eq!(ports, vec![Some(15006), Some(17070), Some(17070)]);
        assert!(
            inbound.filter_chains[1].transport_socket.is_some(),
            "the mTLS chain terminates TLS"
        );
        let outbound: Listener = decode(&lds, "0.0.0.0_7070");
        assert_eq!(outbound.bind_to_port, Some(BoolValue { value: false }));

        let cds = generate(&push, &p, types::CLUSTER).unwrap();
        for name in [BLACKHOLE, PASSTHROUGH, INBOUND_PASSTHROUGH, "inbound|17070||"] {
            assert!(cds.contains_key(name), "{name} missing");
        }
        let c: Cluster = decode(&cds, "outbound|7070||echo.default.svc.cluster.local");
        assert!(c.transport_socket.is_some(), "ISTIO_MUTUAL between sidecars");

        // Another sidecar serving nothing: no inbound chains or clusters; outbound shared bytes.
        let q = proxy("10.9.9.9", false);
        let cds_q = generate(&push, &q, types::CLUSTER).unwrap();
        assert!(!cds_q.contains_key("inbound|17070||"));
        assert!(Arc::ptr_eq(
            &cds["outbound|7070||echo.default.svc.cluster.local"],
            &cds_q["outbound|7070||echo.default.svc.cluster.local"]
        ));
        // A second replica of the same service shares everything.
        let r = proxy("10.0.0.6", false);
        assert!(Arc::ptr_eq(&lds, &generate(&push, &r, types::LISTENER).unwrap()));
    }

    #[test]
    fn route_domains_are_unique_across_virtual_hosts() {
        let push = push();
        let rds = generate(&push, &proxy("10.0.0.5", false), types::ROUTE).unwrap();
        let rc: RouteConfiguration = decode(&rds, "7070");
        let all: Vec<&String> = rc.virtual_hosts.iter().flat_map(|v| &v.domains).collect();
        let unique: BTreeSet<&String> = all.iter().copied().collect();
        assert_eq!(all.len(), unique.len(), "duplicate domains: {all:?}");
        let own = rc
            .virtual_hosts
            .iter()
            .find(|v| v.domains.iter().any(|d| d == "echo"))
            .unwrap();
        assert_eq!(
            own.name, "echo.default.svc.cluster.local:7070",
            "short names mean the proxy's namespace"
        );
        assert_eq!(rc.virtual_hosts.last().unwrap().domains, vec!["*"]);
    }

    #[test]
    fn domains_cover_short_names_only_in_the_own_namespace() {
        let svc = Service {
            key: crate::registry::ServiceKey::new("default", "echo"),
            hostname: "echo.default.svc.cluster.local".into(),
            ports: vec![],
            labels: BTreeMap::new(),
            cluster_ips: BTreeMap::new(),
        };
        let d = host_domains(&svc, 80, true);
        assert!(d.contains(&"echo:80".to_string()) && d.contains(&"echo".to_string()));
        assert!(d.contains(&"echo.default.svc.cluster.local:80".to_string()));
        let d = host_domains(&svc, 80, false);
        assert!(!d.contains(&"echo".to_string()) && d.contains(&"echo.default".to_string()));
    }
}
