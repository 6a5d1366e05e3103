//! Proxyless gRPC (`GENERATOR=grpc`, reference §5.5): gRPC's xDS client asks for listeners and
//! routes by name, so LDS is built per requested name.
//!
//! - Client listeners, named as requested (`host:port`, short hosts expanded to the FQDN in the
//!   proxy's namespace): an `ApiListener` holding an HttpConnectionManager (fault, router — gRPC
//!   wants the router last) with RDS `outbound|<port>||<fqdn>`. A name without a port means the
//!   service's first port.
//! - Server listeners `xds.istio.io/grpc/lds/inbound/<ip>:<port>`, when the proxy serves that port
//!   (an endpoint at one of its IPs): one plaintext filter chain with an HttpConnectionManager,
//!   an inline route with a non-forwarding action (what gRPC servers require) and the router.
//! - RDS `outbound|<port>||<fqdn>`: one virtual host answering to every form of the host name,
//!   routes from a mesh VirtualService for the host (weighted clusters, subsets) or one route to
//!   the default cluster.
//! - CDS (cds.rs, class `grpc`) and EDS are the common ones.
use crate::xds::interned::NameSet;
use std::sync::Arc;

use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    NonForwardingAction, Route, RouteConfiguration, RouteMatch, VirtualHost, route, route_match,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};

use super::names;
use super::sidecar::{any, fault_filter, host_domains, mesh_routes, rds, router_filter, socket};
use crate::registry::model::Service;
use crate::xds::node::ProxyInfo;
use crate::xds::push::PushContext;
use crate::xds::resource::{Resource, ResourceSet};
use crate::xds::types;

/// Prefix of gRPC server listener names (`server_listener_resource_name_template`).
pub const INBOUND_PREFIX: &str = "xds.istio.io/grpc/lds/inbound/";

/// Resources of `type_url` for a gRPC proxy that subscribed to `names`, or `None` for the types
/// the common generators serve (CDS, EDS).
pub fn generate(push: &PushContext, proxy: &ProxyInfo, type_url: &str, names: &NameSet) -> Option<Arc<ResourceSet>> {
    match type_url {
        types::LISTENER => Some(Arc::new(listeners(push, proxy, names))),
        types::ROUTE => Some(push.cached(types::ROUTE, "grpc".into(), || route_configs(push))),
        _ => None,
    }
}

/// Whether responses of `type_url` to this proxy carry only the subscribed names, even for a
/// wildcard type: gRPC subscribes to listeners and clusters by name.
pub fn by_name(proxy: &ProxyInfo, type_url: &str, names: &NameSet) -> bool {
    !types::is_wildcard_type(type_url) || (proxy.is_grpc() && !names.is_empty())
}

/// `host[:port]` → (host, port).
fn split_host_port(name: &str) -> (&str, Option<u16>) {
    if let Some(rest) = name.strip_prefix('[') {
        // [v6]:port
        if let Some((h, p)) = rest.split_once("]:") {
            return (h, p.parse().ok());
        }
        return (rest.trim_end_matches(']'), None);
    }
    match name.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(p) => (h, Some(p)),
            Err(_) => (name, None),
        },
        _ => (name, None),
    }
}

fn listeners(push: &PushContext, proxy: &ProxyInfo, names: &NameSet) -> ResourceSet {
    let mut out = ResourceSet::new();
    for name in names.iter().map(|n| &**n) {
        let set = if let Some(addr) = name.strip_prefix(INBOUND_PREFIX) {
            let (host, Some(port)) = split_host_port(addr) else {
                tracing::debug!(node = %proxy.node_id, %name, "unparseable gRPC server listener name");
                continue;
            };
            if !serves(push, proxy, port) {
                tracing::debug!(node = %proxy.node_id, %name, "gRPC server listener for a port the proxy does not serve");
                continue;
            }
            let host = host.to_string();
            push.cached(types::LISTENER, format!("grpc-inbound|{name}"), || {
                let mut s = ResourceSet::new();
                let l = server_listener(name, &host, port);
                s.insert(name.to_string(), Arc::new(Resource::new(name, types::LISTENER, &l)));
                s
            })
        } else {
            let (host, port) = split_host_port(name);
            let fqdn = names::resolve_host(host, &proxy.namespace);
            let Some(svc) = push.snapshot.service(&fqdn) else {
                continue;
            };
            let Some(port) = port.or_else(|| svc.ports.first().map(|p| p.port)) else {
                continue;
            };
            if svc.port(port).is_none() {
                continue;
            }
            push.cached(types::LISTENER, format!("grpc|{name}|{fqdn}|{port}"), || {
                let mut s = ResourceSet::new();
                let l = client_listener(name, &fqdn, port);
                s.insert(name.to_string(), Arc::new(Resource::new(name, types::LISTENER, &l)));
                s
            })
        };
        for (n, r) in set.iter() {
            out.insert(n.clone(), Arc::clone(r));
        }
    }
    out
}

/// Whether the proxy serves `port`: an endpoint of some service at one of its IPs listens there.
fn serves(push: &PushContext, proxy: &ProxyInfo, port: u16) -> bool {
    push.snapshot
        .endpoints
        .values()
        .flat_map(|eps| eps.iter())
        .any(|e| e.port == port && proxy.ips.contains(&e.address))
}

fn client_listener(name: &str, fqdn: &str, port: u16) -> Listener {
    let hcm = HttpConnectionManager {
        http_filters: vec![fault_filter(), router_filter()],
        route_specifier: Some(rds(&names::outbound(port, "", fqdn))),
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(any(&hcm)),
        }),
        ..Default::default()
    }
}

fn server_listener(name: &str, host: &str, port: u16) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: "inbound".into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            RouteConfiguration {
                name: "inbound".into(),
                virtual_hosts: vec![VirtualHost {
                    name: "inbound".into(),
                    domains: vec!["*".into()],
                    routes: vec![Route {
                        r#match: Some(RouteMatch {
                            path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                            ..Default::default()
                        }),
                        action: Some(route::Action::NonForwardingAction(NonForwardingAction {})),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            },
        )),
        http_filters: vec![router_filter()],
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        address: Some(socket(host, port)),
        filter_chains: vec![FilterChain {
            name: "inbound-plaintext".into(),
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn route_config(push: &PushContext, svc: &Service, port: u16) -> RouteConfiguration {
    RouteConfiguration {
        name: names::outbound(port, "", &svc.hostname),
        virtual_hosts: vec![VirtualHost {
            name: format!("{}:{port}", svc.hostname),
            domains: host_domains(svc, port, true),
            routes: mesh_routes(push, svc, port),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn route_configs(push: &PushContext) -> ResourceSet {
    let mut out = ResourceSet::new();
    for svc in push.snapshot.services.values() {
        for p in &svc.ports {
            let rc = route_config(push, svc, p.port);
            out.insert(rc.name.clone(), Arc::new(Resource::new(&rc.name, types::ROUTE, &rc)));
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use prost::Message;

    use super::*;
    use crate::registry::store::ShardService;
    use crate::registry::{Endpoint, Locality, MeshStore, Protocol, ServiceKey, ServicePort};
    use crate::xds::node;

    fn ep(ip: &str, port_name: &str, port: u16) -> Endpoint {
        Endpoint {
            address: ip.parse().unwrap(),
            service_port_name: port_name.into(),
            port,
            cluster_id: "c1".into(),
            network: String::new(),
            locality: Locality::default(),
            labels: BTreeMap::new(),
            service_account: Some("spiffe://cluster.local/ns/default/sa/echo".into()),
            pod_name: None,
            ready: true,
        }
    }

    /// `echo` (grpc 7070 → 17070, at 10.0.0.5 and 10.0.0.6) and `echo` in namespace `other`.
    pub fn push() -> PushContext {
        let store = MeshStore::new();
        for ns in ["default", "other"] {
            let key = ServiceKey::new(ns, "echo");
            let port = ServicePort {
                name: "grpc".into(),
                port: 7070,
                protocol: Protocol::Grpc,
            };
            let shard = ShardService {
                ports: vec![port],
                cluster_ips: vec!["10.96.0.1".parse().unwrap()],
                ..Default::default()
            };
            store.upsert_service("c1", key.clone(), shard);
            let ips = if ns == "default" {
                ["10.0.0.5", "10.0.0.6"]
            } else {
                ["10.0.1.5", "10.0.1.6"]
            };
            store.set_endpoints("c1", key, ips.iter().map(|ip| ep(ip, "grpc", 17070)).collect());
        }
        PushContext::initial(Arc::from("test"), store.snapshot())
    }

    pub fn proxy(ip: &str, grpc: bool) -> ProxyInfo {
        let mut md = Struct::default();
        md.fields.insert(
            "NAMESPACE".into(),
            Value {
                kind: Some(Kind::StringValue("default".into())),
            },
        );
        if grpc {
            md.fields.insert(
                "GENERATOR".into(),
                Value {
                    kind: Some(Kind::StringValue("grpc".into())),
                },
            );
        }
        let n = Node {
            id: format!("sidecar~{ip}~app-1.default~default.svc.cluster.local"),
            metadata: Some(md),
            ..Default::default()
        };
        node::parse(Some(&n)).unwrap()
    }

    fn decode<M: Message + Default>(set: &ResourceSet, name: &str) -> M {
        let any = envoy_types::pb::google::protobuf::Any::decode(set[name].any.as_ref()).unwrap();
        M::decode(any.value.as_slice()).unwrap()
    }

    #[test]
    fn listener_names_split() {
        assert_eq!(
            split_host_port("echo.default.svc.cluster.local:7070"),
            ("echo.default.svc.cluster.local", Some(7070))
        );
        assert_eq!(split_host_port("echo"), ("echo", None));
        assert_eq!(split_host_port("0.0.0.0:50051"), ("0.0.0.0", Some(50051)));
        assert_eq!(split_host_port("[::]:50051"), ("::", Some(50051)));
        assert_eq!(split_host_port("echo:http"), ("echo:http", None));
    }

    #[test]
    fn listeners_are_built_for_the_requested_names() {
        let push = push();
        let p = proxy("10.0.0.5", true);
        let names: NameSet = [
            "echo:7070",
            "echo.default.svc.cluster.local:7070",
            "echo.other:7070",
            "echo",
            "nope:7070",
            "echo:9999",
            "xds.istio.io/grpc/lds/inbound/0.0.0.0:17070",
            "xds.istio.io/grpc/lds/inbound/0.0.0.0:1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let lds = generate(&push, &p, types::LISTENER, &names).unwrap();
        assert_eq!(
            lds.keys().map(String::as_str).collect::<Vec<_>>(),
            vec![
                "echo",
                "echo.default.svc.cluster.local:7070",
                "echo.other:7070",
                "echo:7070",
                "xds.istio.io/grpc/lds/inbound/0.0.0.0:17070"
            ],
            "unknown hosts, ports the service lacks and ports the proxy does not serve are absent"
        );
        let l: Listener = decode(&lds, "echo:7070");
        let hcm =
            HttpConnectionManager::decode(l.api_listener.unwrap().api_listener.unwrap().value.as_slice()).unwrap();
        assert_eq!(
            hcm.http_filters.last().unwrap().name,
            "envoy.filters.http.router",
            "gRPC wants the router last"
        );
        match hcm.route_specifier {
            Some(http_connection_manager::RouteSpecifier::Rds(r)) => {
                assert_eq!(r.route_config_name, "outbound|7070||echo.default.svc.cluster.local")
            }
            other => panic!("{other:?}"),
        }
        let other: Listener = decode(&lds, "echo.other:7070");
        let hcm =
            HttpConnectionManager::decode(other.api_listener.unwrap().api_listener.unwrap().value.as_slice()).unwrap();
        assert!(
            matches!(hcm.route_specifier, Some(http_connection_manager::RouteSpecifier::Rds(r)) if r.route_config_name.ends_with("|echo.other.svc.cluster.local"))
        );

        let server: Listener = decode(&lds, "xds.istio.io/grpc/lds/inbound/0.0.0.0:17070");
        assert!(
            server.api_listener.is_none() && server.listener_filters.is_empty() && server.use_original_dst.is_none()
        );
        assert_eq!(server.filter_chains.len(), 1);

        // Another proxy at another IP does not serve 17070... unless it is an endpoint too.
        let lds = generate(&push, &proxy("10.9.9.9", true), types::LISTENER, &names).unwrap();
        assert!(!lds.contains_key("xds.istio.io/grpc/lds/inbound/0.0.0.0:17070"));
    }

    #[test]
    fn routes_answer_to_every_form_of_the_host() {
        let push = push();
        let rds = generate(&push, &proxy("10.0.0.5", true), types::ROUTE, &NameSet::new()).unwrap();
        let rc: RouteConfiguration = decode(&rds, "outbound|7070||echo.default.svc.cluster.local");
        assert_eq!(rc.virtual_hosts.len(), 1);
        let d = &rc.virtual_hosts[0].domains;
        for want in [
            "echo.default.svc.cluster.local:7070",
            "echo:7070",
            "echo.default:7070",
            "echo",
        ] {
            assert!(d.iter().any(|x| x == want), "{want} missing from {d:?}");
        }
        assert!(rds.contains_key("outbound|7070||echo.other.svc.cluster.local"));
    }

    #[test]
    fn only_grpc_subscriptions_to_wildcard_types_are_filtered_by_name() {
        let names = NameSet::from_requested(["a"]);
        assert!(by_name(&proxy("10.0.0.5", true), types::LISTENER, &names));
        assert!(by_name(&proxy("10.0.0.5", true), types::CLUSTER, &names));
        assert!(!by_name(&proxy("10.0.0.5", true), types::CLUSTER, &NameSet::new()));
        assert!(!by_name(&proxy("10.0.0.5", false), types::LISTENER, &names));
        assert!(by_name(&proxy("10.0.0.5", false), types::ROUTE, &names));
    }
}
