//! Unit tests of the gateway generators: decoded resources checked field by field.
use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action, route_match, virtual_host};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    DownstreamTlsContext, Secret, UpstreamTlsContext, common_tls_context, secret,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::*;
use crate::registry::istio::{Config, ConfigMeta, DestinationRuleSpec, GatewaySpec, IstioConfig, VirtualServiceSpec};
use crate::registry::model::{Endpoint, Locality, Protocol, Service, ServiceKey, ServicePort};
use crate::registry::store::Snapshot;
use crate::xds::generators;
use crate::xds::node::ProxyKind;

fn meta(ns: &str, name: &str) -> ConfigMeta {
    ConfigMeta {
        name: name.into(),
        namespace: ns.into(),
    }
}

fn gw(ns: &str, name: &str, yaml: &str) -> Config<GatewaySpec> {
    Config {
        meta: meta(ns, name),
        spec: serde_yaml::from_str(yaml).unwrap(),
    }
}

fn vs(ns: &str, name: &str, yaml: &str) -> Config<VirtualServiceSpec> {
    Config {
        meta: meta(ns, name),
        spec: serde_yaml::from_str(yaml).unwrap(),
    }
}

fn dr(ns: &str, name: &str, yaml: &str) -> Config<DestinationRuleSpec> {
    Config {
        meta: meta(ns, name),
        spec: serde_yaml::from_str(yaml).unwrap(),
    }
}

fn service(ns: &str, name: &str, ports: &[u16]) -> (String, Arc<Service>) {
    let key = ServiceKey::new(ns, name);
    let host = key.hostname();
    let svc = Service {
        key,
        hostname: host.clone(),
        ports: ports
            .iter()
            .map(|p| ServicePort {
                name: format!("http-{p}"),
                port: *p,
                protocol: Protocol::Http,
            })
            .collect(),
        labels: BTreeMap::new(),
        cluster_ips: BTreeMap::new(),
    };
    (host, Arc::new(svc))
}

fn push(config: IstioConfig, secrets: Arc<dyn SecretSource>) -> PushContext {
    let mut services = BTreeMap::new();
    for (h, s) in [
        service("default", "echo", &[80]),
        service("default", "multi", &[80, 9090]),
    ] {
        services.insert(h, s);
    }
    let ep = Endpoint {
        address: "10.0.0.1".parse().unwrap(),
        service_port_name: "http-80".into(),
        port: 8080,
        cluster_id: "cluster2".into(),
        network: String::new(),
        locality: Locality::default(),
        labels: BTreeMap::new(),
        service_account: Some("spiffe://cluster.local/ns/default/sa/echo".into()),
        pod_name: None,
        ready: true,
    };
    let mut endpoints = BTreeMap::new();
    endpoints.insert("echo.default.svc.cluster.local".to_string(), Arc::new(vec![ep]));
    let mut config = config;
    config.normalize();
    let snap = Snapshot {
        version: 1,
        services,
        endpoints,
        config: Arc::new(config),
        networks: Default::default(),
    };
    PushContext::initial(Arc::from("test"), Arc::new(snap)).with_secrets(secrets)
}

fn proxy(labels: &[(&str, &str)]) -> ProxyInfo {
    ProxyInfo {
        node_id: "router~10.0.0.9~gw-1.istio-system~istio-system.svc.cluster.local".into(),
        kind: ProxyKind::Router,
        ips: vec!["10.0.0.9".parse().unwrap()],
        pod_id: "gw-1.istio-system".into(),
        dns_domain: "istio-system.svc.cluster.local".into(),
        namespace: "istio-system".into(),
        service_account: None,
        cluster_id: "cluster2".into(),
        network: String::new(),
        requested_network_view: None,
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        generator: None,
    }
}

fn ingress() -> ProxyInfo {
    proxy(&[("istio", "ingressgateway"), ("app", "gw")])
}

fn decode<M: Message + Default>(set: &ResourceSet, name: &str) -> M {
    let r = set
        .get(name)
        .unwrap_or_else(|| panic!("no resource {name}; have {:?}", set.keys().collect::<Vec<_>>()));
    let any = Any::decode(r.any.as_ref()).unwrap();
    M::decode(any.value.as_slice()).unwrap()
}

fn typed<M: Message + Default>(any: &Option<Any>) -> M {
    M::decode(any.as_ref().unwrap().value.as_slice()).unwrap()
}

fn hcm_of(l: &Listener, chain: usize) -> HttpConnectionManager {
    match &l.filter_chains[chain].filters[0].config_type {
        Some(filter::ConfigType::TypedConfig(a)) => HttpConnectionManager::decode(a.value.as_slice()).unwrap(),
        other => panic!("no typed config: {other:?}"),
    }
}

fn rds_name(h: &HttpConnectionManager) -> String {
    match &h.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(r)) => r.route_config_name.clone(),
        other => panic!("not RDS: {other:?}"),
    }
}

fn cluster_of(r: &envoy_types::pb::envoy::config::route::v3::Route) -> route_action::ClusterSpecifier {
    match &r.action {
        Some(route::Action::Route(a)) => a.cluster_specifier.clone().unwrap(),
        other => panic!("not a route action: {other:?}"),
    }
}

const HTTP_GW: &str = r#"
selector: {istio: ingressgateway}
servers:
- port: {number: 8080, name: http, protocol: HTTP}
  hosts: ["*.example.com", "plain.test"]
"#;

#[test]
fn http_gateway_listener_and_routes() {
    let cfg = IstioConfig {
        gateways: vec![gw("istio-system", "ingress", HTTP_GW)],
        virtual_services: vec![
            vs(
                "default",
                "echo",
                r#"
hosts: ["echo.example.com", "other.org"]
gateways: ["istio-system/ingress"]
http:
- name: canary
  match:
  - uri: {prefix: /v2}
    headers: {X-Canary: {exact: "yes"}}
  - uri: {regex: "^/re/[0-9]+$"}
  route:
  - destination: {host: echo, subset: v2}
    weight: 80
  - destination: {host: echo, subset: v1}
    weight: 20
  timeout: 5s
  retries: {attempts: 3, perTryTimeout: 1s, retryOn: "5xx,503"}
- route:
  - destination: {host: echo.default.svc.cluster.local}
"#,
            ),
            // Not bound to this gateway.
            vs(
                "default",
                "mesh-only",
                "hosts: [\"echo.example.com\"]\nhttp: [{route: [{destination: {host: echo}}]}]\n",
            ),
            // Bound by short name from the gateway's namespace, port from destination.port.
            vs(
                "istio-system",
                "short",
                "hosts: [\"plain.test\"]\ngateways: [ingress]\nhttp: [{route: [{destination: {host: multi.default, port: {number: 9090}}}]}]\n",
            ),
        ],
        ..Default::default()
    };
    let push = push(cfg, Arc::new(NoSecrets));
    let p = ingress();
    let lds = generators::generate(&push, &p, types::LISTENER);
    assert_eq!(lds.keys().collect::<Vec<_>>(), vec!["0.0.0.0_8080"]);
    let l: Listener = decode(&lds, "0.0.0.0_8080");
    assert_eq!(rds_name(&hcm_of(&l, 0)), "http.8080");
    assert!(l.listener_filters.is_empty(), "no TLS inspector on plain HTTP");

    let rds = generators::generate(&push, &p, types::ROUTE);
    let rc: RouteConfiguration = decode(&rds, "http.8080");
    let domains: Vec<&str> = rc.virtual_hosts.iter().map(|v| v.domains[0].as_str()).collect();
    assert_eq!(
        domains,
        vec!["echo.example.com", "plain.test", "*"],
        "other.org is not served; blackhole last"
    );
    let echo = &rc.virtual_hosts[0];
    assert_eq!(echo.name, "echo.example.com:8080");
    assert_eq!(echo.routes.len(), 3, "two match clauses + the catch-all route");
    let m = echo.routes[0].r#match.as_ref().unwrap();
    assert_eq!(m.path_specifier, Some(route_match::PathSpecifier::Prefix("/v2".into())));
    assert_eq!(m.headers[0].name, "x-canary");
    assert!(matches!(
        echo.routes[1].r#match.as_ref().unwrap().path_specifier,
        Some(route_match::PathSpecifier::SafeRegex(ref r)) if r.regex == "^/re/[0-9]+$"
    ));
    match cluster_of(&echo.routes[0]) {
        route_action::ClusterSpecifier::WeightedClusters(w) => {
            let got: Vec<(String, u32)> = w
                .clusters
                .iter()
                .map(|c| (c.name.clone(), c.weight.unwrap().value))
                .collect();
            assert_eq!(
                got,
                vec![
                    ("outbound|80|v2|echo.default.svc.cluster.local".to_string(), 80),
                    ("outbound|80|v1|echo.default.svc.cluster.local".to_string(), 20)
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    let Some(route::Action::Route(a)) = &echo.routes[0].action else {
        panic!()
    };
    assert_eq!(a.timeout.unwrap().seconds, 5);
    let retry = a.retry_policy.as_ref().unwrap();
    assert_eq!(retry.num_retries.unwrap().value, 3);
    assert_eq!(retry.retry_on, "5xx,retriable-status-codes");
    assert_eq!(retry.retriable_status_codes, vec![503]);
    assert_eq!(retry.per_try_timeout.unwrap().seconds, 1);
    assert_eq!(
        cluster_of(&echo.routes[2]),
        route_action::ClusterSpecifier::Cluster("outbound|80||echo.default.svc.cluster.local".into())
    );
    let Some(route::Action::Route(a)) = &echo.routes[2].action else {
        panic!()
    };
    assert_eq!(a.timeout.unwrap().seconds, 0, "Istio disables the 15s default");
    assert_eq!(
        a.retry_policy.as_ref().unwrap().num_retries.unwrap().value,
        2,
        "Istio's default retries"
    );
    assert_eq!(
        cluster_of(&rc.virtual_hosts[1].routes[0]),
        route_action::ClusterSpecifier::Cluster("outbound|9090||multi.default.svc.cluster.local".into())
    );
    let blackhole = &rc.virtual_hosts[2];
    assert!(matches!(&blackhole.routes[0].action, Some(route::Action::DirectResponse(d)) if d.status == 404));

    // Another class of proxy (labels not selected) gets nothing.
    let other = proxy(&[("istio", "egressgateway")]);
    assert!(generators::generate(&push, &other, types::LISTENER).is_empty());
    assert!(generators::generate(&push, &other, types::ROUTE).is_empty());
    // Equal classes share the encoded bytes.
    let again = generators::generate(&push, &ingress(), types::LISTENER);
    assert!(Arc::ptr_eq(&lds, &again));
}

#[test]
fn terminated_https_uses_sds_from_the_proxys_cluster_and_namespace() {
    let cfg = IstioConfig {
        gateways: vec![gw(
            "istio-system",
            "ingress",
            r#"
selector: {istio: ingressgateway}
servers:
- port: {number: 8443, name: https, protocol: HTTPS}
  hosts: ["secure.example.com"]
  tls: {mode: SIMPLE, credentialName: gw-cred}
- port: {number: 8443, name: https-mtls, protocol: HTTPS}
  hosts: ["mtls.example.com"]
  tls: {mode: MUTUAL, credentialName: mtls-cred}
- port: {number: 8080, name: http, protocol: HTTP}
  hosts: ["secure.example.com"]
  tls: {httpsRedirect: true}
"#,
        )],
        virtual_services: vec![vs(
            "default",
            "secure",
            "hosts: [secure.example.com, mtls.example.com]\ngateways: [istio-system/ingress]\nhttp: [{route: [{destination: {host: echo}}]}]\n",
        )],
        ..Default::default()
    };
    let secrets = StaticSecrets::new(None);
    let cred = TlsSecret {
        cert_chain: b"CERT".to_vec(),
        private_key: b"KEY".to_vec(),
        ca_cert: None,
    };
    secrets.insert("cluster2", "istio-system", "gw-cred", cred.clone());
    secrets.insert("cluster1", "istio-system", "mtls-cred", cred.clone());
    secrets.insert("cluster2", "default", "mtls-cred", cred.clone());
    secrets.insert(
        "cluster2",
        "istio-system",
        "mtls-cred",
        TlsSecret {
            ca_cert: Some(b"CA".to_vec()),
            ..cred.clone()
        },
    );
    let push = push(cfg, secrets.clone());
    let p = ingress();
    let lds = generators::generate(&push, &p, types::LISTENER);
    let l: Listener = decode(&lds, "0.0.0.0_8443");
    assert_eq!(l.listener_filters[0].name, "envoy.filters.listener.tls_inspector");
    assert_eq!(l.filter_chains.len(), 2);
    let sni = |i: usize| {
        l.filter_chains[i]
            .filter_chain_match
            .as_ref()
            .unwrap()
            .server_names
            .clone()
    };
    assert_eq!(sni(0), vec!["secure.example.com"]);
    assert_eq!(sni(1), vec!["mtls.example.com"]);
    assert_eq!(rds_name(&hcm_of(&l, 0)), "https.8443.https.ingress.istio-system");
    let ts = l.filter_chains[0].transport_socket.as_ref().unwrap();
    let ctx: DownstreamTlsContext = match &ts.config_type {
        Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a)) => {
            DownstreamTlsContext::decode(a.value.as_slice()).unwrap()
        }
        None => panic!(),
    };
    let common = ctx.common_tls_context.unwrap();
    assert_eq!(
        common.tls_certificate_sds_secret_configs[0].name,
        "kubernetes://gw-cred"
    );
    assert!(common.validation_context_type.is_none());
    assert!(!ctx.require_client_certificate.unwrap().value);

    let rds = generators::generate(&push, &p, types::ROUTE);
    assert!(rds.contains_key("https.8443.https.ingress.istio-system"));
    assert!(rds.contains_key("https.8443.https-mtls.ingress.istio-system"));
    let plain: RouteConfiguration = decode(&rds, "http.8080");
    assert_eq!(
        plain.virtual_hosts[0].require_tls,
        virtual_host::TlsRequirementType::All as i32,
        "httpsRedirect"
    );

    let sds = generators::generate(&push, &p, types::SECRET);
    assert_eq!(
        sds.keys().collect::<Vec<_>>(),
        vec![
            "kubernetes://gw-cred",
            "kubernetes://mtls-cred",
            "kubernetes://mtls-cred-cacert"
        ]
    );
    let s: Secret = decode(&sds, "kubernetes://gw-cred");
    match s.r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            assert!(
                matches!(t.certificate_chain.unwrap().specifier, Some(envoy_types::pb::envoy::config::core::v3::data_source::Specifier::InlineBytes(b)) if b == b"CERT")
            );
        }
        other => panic!("{other:?}"),
    }
    let ca: Secret = decode(&sds, "kubernetes://mtls-cred-cacert");
    assert!(matches!(ca.r#type, Some(secret::Type::ValidationContext(_))));

    // A gateway of the same labels in another cluster does not see cluster2's Secret.
    let mut elsewhere = ingress();
    elsewhere.cluster_id = "cluster1".into();
    let sds1 = generators::generate(&push, &elsewhere, types::SECRET);
    assert_eq!(sds1.keys().collect::<Vec<_>>(), vec!["kubernetes://mtls-cred"]);
    // A sidecar gets no gateway config from here.
    let mut sidecar = ingress();
    sidecar.kind = ProxyKind::Sidecar;
    assert!(generators::generate(&push, &sidecar, types::SECRET).is_empty());
    assert!(generators::generate(&push, &sidecar, types::LISTENER).is_empty());
}

#[test]
fn passthrough_filter_chains_follow_tls_routes() {
    let cfg = IstioConfig {
        gateways: vec![gw(
            "istio-system",
            "pt",
            r#"
selector: {istio: ingressgateway}
servers:
- port: {number: 9443, name: tls, protocol: TLS}
  hosts: ["*.pass.example.com"]
  tls: {mode: PASSTHROUGH}
"#,
        )],
        virtual_services: vec![
            vs(
                "default",
                "a",
                r#"
hosts: ["a.pass.example.com"]
gateways: ["istio-system/pt"]
tls:
- match: [{sniHosts: [a.pass.example.com, not.served.org]}]
  route: [{destination: {host: echo, port: {number: 80}}}]
"#,
            ),
            vs(
                "default",
                "b",
                r#"
hosts: ["*.pass.example.com"]
gateways: ["pt.istio-system"]
tls:
- match: [{sniHosts: [a.pass.example.com, b.pass.example.com]}]
  route:
  - {destination: {host: echo, subset: v1}, weight: 50}
  - {destination: {host: echo, subset: v2}, weight: 50}
"#,
            ),
        ],
        ..Default::default()
    };
    let push = push(cfg, Arc::new(NoSecrets));
    let lds = generators::generate(&push, &ingress(), types::LISTENER);
    let l: Listener = decode(&lds, "0.0.0.0_9443");
    assert_eq!(l.filter_chains.len(), 2);
    let names: Vec<Vec<String>> = l
        .filter_chains
        .iter()
        .map(|c| c.filter_chain_match.as_ref().unwrap().server_names.clone())
        .collect();
    assert_eq!(
        names,
        vec![
            vec!["a.pass.example.com".to_string()],
            vec!["b.pass.example.com".to_string()]
        ],
        "a name is claimed once"
    );
    let tcp = |i: usize| -> TcpProxy {
        match &l.filter_chains[i].filters[0].config_type {
            Some(filter::ConfigType::TypedConfig(a)) => TcpProxy::decode(a.value.as_slice()).unwrap(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        tcp(0).cluster_specifier,
        Some(tcp_proxy::ClusterSpecifier::Cluster(
            "outbound|80||echo.default.svc.cluster.local".into()
        ))
    );
    assert!(
        matches!(tcp(1).cluster_specifier, Some(tcp_proxy::ClusterSpecifier::WeightedClusters(ref w)) if w.clusters.len() == 2)
    );
    assert!(
        generators::generate(&push, &ingress(), types::ROUTE).is_empty(),
        "passthrough needs no routes"
    );
}

#[test]
fn host_matching_binding_and_merging() {
    assert_eq!(
        intersect("a.example.com", "*.example.com").as_deref(),
        Some("a.example.com")
    );
    assert_eq!(intersect("*", "a.example.com").as_deref(), Some("a.example.com"));
    assert_eq!(
        intersect("*.a.example.com", "*.example.com").as_deref(),
        Some("*.a.example.com")
    );
    assert_eq!(intersect("example.com", "*.example.com"), None);
    assert_eq!(intersect("a.org", "b.org"), None);
    let g = gw(
        "istio-system",
        "g",
        "servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: [\"*.example.com\", \"team/plain.test\"]}]\n",
    );
    let s = Server {
        gateway: &g,
        server: &g.spec.servers[0],
        kind: ServerKind::Http,
        hosts: g.spec.servers[0]
            .hosts
            .iter()
            .map(|h| ServerHost::parse(h, "istio-system"))
            .collect(),
        port: 80,
    };
    assert_eq!(
        s.serves("*", "team"),
        vec!["*.example.com", "plain.test"],
        "one domain per server host"
    );
    assert_eq!(
        s.serves("*", "other"),
        vec!["*.example.com"],
        "team/ admits only namespace team"
    );

    // Namespace-scoped server hosts admit only VirtualServices of that namespace.
    let cfg = IstioConfig {
        gateways: vec![
            gw(
                "istio-system",
                "scoped",
                "servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: [\"team/*\"]}]\n",
            ),
            // Same port from a second gateway (empty selector: every gateway proxy), bound elsewhere.
            gw(
                "istio-system",
                "bound",
                "selector: {istio: ingressgateway}\nservers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: [\"*\"], bind: 127.0.0.9}]\n",
            ),
            // Conflicting protocol on the same port: dropped.
            gw(
                "istio-system",
                "zz-conflict",
                "servers: [{port: {number: 8080, name: tcp, protocol: TCP}, hosts: [\"*\"]}]\n",
            ),
        ],
        virtual_services: vec![
            vs(
                "team",
                "ok",
                "hosts: [svc.team.example]\ngateways: [istio-system/scoped]\nhttp: [{route: [{destination: {host: echo.default}}]}]\n",
            ),
            vs(
                "other",
                "refused",
                "hosts: [svc.other.example]\ngateways: [istio-system/scoped]\nhttp: [{route: [{destination: {host: echo.default}}]}]\n",
            ),
            vs(
                "default",
                "everything",
                "hosts: [\"*\"]\ngateways: [istio-system/bound]\nhttp: [{route: [{destination: {host: echo}}]}]\n",
            ),
        ],
        ..Default::default()
    };
    let push = push(cfg, Arc::new(NoSecrets));
    let p = ingress();
    let lds = generators::generate(&push, &p, types::LISTENER);
    assert_eq!(lds.keys().collect::<Vec<_>>(), vec!["0.0.0.0_8080", "127.0.0.9_8080"]);
    let rds = generators::generate(&push, &p, types::ROUTE);
    let rc: RouteConfiguration = decode(&rds, "http.8080");
    let domains: Vec<&str> = rc.virtual_hosts.iter().map(|v| v.domains[0].as_str()).collect();
    assert_eq!(domains, vec!["svc.team.example", "*"]);
    let bound: RouteConfiguration = decode(&rds, "http.8080.127.0.0.9");
    assert_eq!(
        bound.virtual_hosts.len(),
        1,
        "`*` is claimed by the VirtualService: no blackhole"
    );
    assert_eq!(bound.virtual_hosts[0].domains, vec!["*"]);
}

#[test]
fn destination_rule_tls_on_clusters() {
    let cfg = IstioConfig {
        destination_rules: vec![dr(
            "default",
            "echo",
            r#"
host: echo
trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
subsets:
- {name: v1, labels: {version: v1}, trafficPolicy: {tls: {mode: DISABLE}}}
- {name: v2, labels: {version: v2}, trafficPolicy: {tls: {mode: SIMPLE, sni: v2.example}}}
"#,
        )],
        ..Default::default()
    };
    let push = push(cfg, Arc::new(NoSecrets));
    let cds = generators::generate(&push, &ingress(), types::CLUSTER);
    let tls = |name: &str| -> Option<UpstreamTlsContext> {
        let c: Cluster = decode(&cds, name);
        c.transport_socket.map(|t| match t.config_type {
            Some(envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType::TypedConfig(a)) => {
                UpstreamTlsContext::decode(a.value.as_slice()).unwrap()
            }
            None => panic!(),
        })
    };
    let m = tls("outbound|80||echo.default.svc.cluster.local").expect("ISTIO_MUTUAL");
    assert_eq!(m.sni, "outbound_.80_._.echo.default.svc.cluster.local");
    let common = m.common_tls_context.unwrap();
    assert_eq!(common.tls_certificate_sds_secret_configs[0].name, "default");
    match common.validation_context_type {
        Some(common_tls_context::ValidationContextType::CombinedValidationContext(c)) => {
            assert_eq!(c.validation_context_sds_secret_config.unwrap().name, "ROOTCA");
            let sans = c.default_validation_context.unwrap().match_typed_subject_alt_names;
            assert_eq!(sans.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        tls("outbound|80|v1|echo.default.svc.cluster.local").is_none(),
        "subset DISABLE overrides"
    );
    assert_eq!(
        tls("outbound|80|v2|echo.default.svc.cluster.local").unwrap().sni,
        "v2.example"
    );
    assert!(
        tls("outbound|80||multi.default.svc.cluster.local").is_none(),
        "no rule, no TLS"
    );
    // Proxyless gRPC clusters never carry Envoy TLS sockets.
    let mut grpc = ingress();
    grpc.generator = Some("grpc".into());
    let gcds = generators::generate(&push, &grpc, types::CLUSTER);
    let c: Cluster = decode(&gcds, "outbound|80||echo.default.svc.cluster.local");
    assert!(c.transport_socket.is_none());
}

#[test]
fn typed_helpers_decode() {
    // Keeps the typed() helper honest for Any-wrapped configs.
    let a = Some(Any {
        type_url: "x".into(),
        value: TcpProxy {
            stat_prefix: "s".into(),
            ..Default::default()
        }
        .encode_to_vec(),
    });
    let t: TcpProxy = typed(&a);
    assert_eq!(t.stat_prefix, "s");
}
