//! Primary-remote on different networks, at the xDS level (in-process meshd, ADS over the
//! plaintext port): cluster1 on network1 with helloworld v1, cluster2 on network2 with v2, an
//! east-west gateway Service in each, Istio's `cross-network-gateway` and `expose-istiod`.
//! A sidecar on network2 must see v2 directly and v1 as cluster1's gateway; cluster1's
//! east-west gateway must get SNI-DNAT chains and clusters whose EDS holds only network1's
//! mTLS endpoints. (The same mesh with real Envoys and traffic: tests/interop.)
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::xds::{CDS, EDS, LDS, Sotw, decode_all, plaintext, req};
use common::*;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{Node, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use meshd::registry::istio::{Config, ConfigMeta, IstioConfig};
use meshd::registry::model::{Endpoint, Locality, Protocol, ServiceKey, ServicePort};
use meshd::registry::network::NETWORK_LABEL;
use meshd::registry::store::ShardService;

const HELLO_5000: &str = "outbound|5000||helloworld.sample.svc.cluster.local";
const HELLO_SNI: &str = "outbound_.5000_._.helloworld.sample.svc.cluster.local";
const EW1: &str = "127.0.10.1";
const EW2: &str = "127.0.20.1";

fn pod(ip: &str, cluster: &str, version: &str, injected: bool) -> Endpoint {
    let mut labels: BTreeMap<String, String> =
        [("app".into(), "helloworld".into()), ("version".into(), version.into())].into();
    if injected {
        labels.insert("security.istio.io/tlsMode".into(), "istio".into());
    }
    Endpoint {
        address: ip.parse().unwrap(),
        service_port_name: "http".into(),
        port: 5000,
        cluster_id: cluster.into(),
        // Left to the cluster's network (the system namespace label, here the store default).
        network: String::new(),
        locality: Locality {
            region: format!("region-{cluster}"),
            ..Default::default()
        },
        labels,
        service_account: Some("spiffe://cluster.local/ns/sample/sa/helloworld".into()),
        pod_name: None,
        ready: true,
    }
}

fn port(name: &str, port: u16, protocol: Protocol) -> ServicePort {
    ServicePort {
        name: name.into(),
        port,
        protocol,
    }
}

fn eastwest_gateway(t: &TestMeshd, cluster: &str, network: &str, lb_ip: &str) {
    t.m().mesh.upsert_service(
        cluster,
        ServiceKey::new("istio-system", "istio-eastwestgateway"),
        ShardService {
            ports: vec![
                port("status-port", 15021, Protocol::Http),
                port("tls", 15443, Protocol::Tls),
                port("tls-istiod", 15012, Protocol::Tls),
                port("tls-webhook", 15017, Protocol::Tls),
            ],
            labels: [
                (NETWORK_LABEL.to_string(), network.to_string()),
                ("istio".into(), "eastwestgateway".into()),
            ]
            .into(),
            external_addresses: vec![lb_ip.into()],
            ..Default::default()
        },
    );
}

fn yaml<T: serde::de::DeserializeOwned>(ns: &str, name: &str, spec: &str) -> Config<T> {
    Config {
        meta: ConfigMeta {
            name: name.into(),
            namespace: ns.into(),
        },
        spec: serde_yaml::from_str(spec).unwrap(),
    }
}

/// The mesh of Istio's "Install Primary-Remote on different networks" and its verify step.
async fn mesh() -> TestMeshd {
    let t = TestMeshd::start_with(|a| {
        a.debounce_after = Duration::from_millis(20);
        a.cluster_id = "cluster1".into();
        a.network = "network1".into();
    })
    .await;
    let m = &t.m().mesh;
    m.set_default_network("cluster2", "network2");
    let hello = ShardService {
        ports: vec![port("http", 5000, Protocol::Http)],
        ..Default::default()
    };
    let key = ServiceKey::new("sample", "helloworld");
    m.upsert_service("cluster1", key.clone(), hello.clone());
    m.upsert_service("cluster2", key.clone(), hello);
    m.set_endpoints(
        "cluster1",
        key.clone(),
        vec![
            pod("10.1.0.5", "cluster1", "v1", true),
            pod("10.1.0.9", "cluster1", "naked", false),
        ],
    );
    m.set_endpoints("cluster2", key, vec![pod("10.2.0.5", "cluster2", "v2", true)]);
    eastwest_gateway(&t, "cluster1", "network1", EW1);
    eastwest_gateway(&t, "cluster2", "network2", EW2);
    m.set_config(IstioConfig {
        gateways: vec![yaml(
            "istio-system",
            "cross-network-gateway",
            r#"
selector: {istio: eastwestgateway}
servers:
- port: {number: 15443, name: tls, protocol: TLS}
  tls: {mode: AUTO_PASSTHROUGH}
  hosts: ["*.local"]
"#,
        )],
        ..Default::default()
    });
    eventually(
        "the gateways in the push context",
        Duration::from_secs(10),
        async || t.m().xds.current().snapshot.networks.gateways.len() == 2,
    )
    .await;
    t
}

fn sidecar(network: &str, cluster: &str) -> Node {
    xds_node(
        "sidecar~10.2.0.7~curl-1.sample~sample.svc.cluster.local",
        &[("NETWORK", network), ("CLUSTER_ID", cluster), ("NAMESPACE", "sample")],
    )
}

fn eastwest_node() -> Node {
    xds_node_with_labels(
        "router~10.1.0.100~istio-eastwestgateway-1.istio-system~istio-system.svc.cluster.local",
        &[
            ("NETWORK", "network1"),
            ("CLUSTER_ID", "cluster1"),
            ("NAMESPACE", "istio-system"),
            ("REQUESTED_NETWORK_VIEW", "network1"),
        ],
        &[("istio", "eastwestgateway"), ("app", "istio-eastwestgateway")],
    )
}

/// `address:port` → (weight, tlsMode metadata) of every endpoint, and the locality weights.
fn endpoints(c: &ClusterLoadAssignment) -> BTreeMap<String, (u32, Option<String>)> {
    let mut out = BTreeMap::new();
    for l in &c.endpoints {
        let sum: u32 = l
            .lb_endpoints
            .iter()
            .map(|e| e.load_balancing_weight.unwrap().value)
            .sum();
        assert_eq!(
            l.load_balancing_weight.unwrap().value,
            sum,
            "locality weight is the sum"
        );
        for e in &l.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!("no endpoint")
            };
            let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref().unwrap().address.as_ref() else {
                panic!("no socket address")
            };
            let Some(socket_address::PortSpecifier::PortValue(p)) = sa.port_specifier else {
                panic!("no port")
            };
            let tls = e
                .metadata
                .as_ref()
                .and_then(|m| m.filter_metadata.get("envoy.transport_socket_match"))
                .and_then(|s| s.fields.get("tlsMode"))
                .and_then(|v| match &v.kind {
                    Some(envoy_types::pb::google::protobuf::value::Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                });
            out.insert(
                format!("{}:{p}", sa.address),
                (e.load_balancing_weight.unwrap().value, tls),
            );
        }
    }
    out
}

async fn eds_of(s: &mut Sotw, names: &[&str], node: Option<Node>) -> Vec<ClusterLoadAssignment> {
    s.send(req(EDS, names, "", node)).await;
    let r = s.recv().await.unwrap();
    assert_eq!(r.type_url, EDS);
    decode_all(&r)
}

#[tokio::test]
async fn a_network2_sidecar_sees_v2_directly_and_v1_through_cluster1s_gateway() {
    let t = mesh().await;
    let mut s = Sotw::open(plaintext(&t).await, None).await.unwrap();
    let eds = eds_of(&mut s, &[HELLO_5000], Some(sidecar("network2", "cluster2"))).await;
    let got = endpoints(&eds[0]);
    assert_eq!(
        got,
        BTreeMap::from([
            ("10.2.0.5:5000".to_string(), (1, None)),
            (format!("{EW1}:15443"), (1, Some("istio".to_string()))),
        ]),
        "v2 direct, v1 as cluster1's gateway; the uninjected pod is not offered across networks"
    );
    // The gateway endpoint sits in the locality of the endpoints it replaces.
    let gw_locality = eds[0]
        .endpoints
        .iter()
        .find(|l| {
            l.lb_endpoints.len() == 1
                && endpoints(&ClusterLoadAssignment {
                    endpoints: vec![(*l).clone()],
                    ..Default::default()
                })
                .contains_key(&format!("{EW1}:15443"))
        })
        .unwrap();
    assert_eq!(gw_locality.locality.as_ref().unwrap().region, "region-cluster1");

    // A network1 sidecar sees the mirror image, with the uninjected local pod kept.
    let mut s1 = Sotw::open(plaintext(&t).await, None).await.unwrap();
    let eds = eds_of(&mut s1, &[HELLO_5000], Some(sidecar("network1", "cluster1"))).await;
    assert_eq!(
        endpoints(&eds[0]).keys().cloned().collect::<Vec<_>>(),
        vec![
            "10.1.0.5:5000".to_string(),
            "10.1.0.9:5000".to_string(),
            format!("{EW2}:15443")
        ]
    );
    // Two views in use, each encoded once.
    assert_eq!(t.m().xds.current().eds_view_count(), 2);

    // The gateway's address changes: the sidecar gets the new one in the next push.
    eastwest_gateway(&t, "cluster1", "network1", "127.0.10.2");
    let mut saw_new = false;
    for _ in 0..4 {
        let r = s.recv().await.unwrap();
        if r.type_url == EDS {
            let got = endpoints(&decode_all::<ClusterLoadAssignment>(&r)[0]);
            if got.contains_key("127.0.10.2:15443") {
                assert!(!got.contains_key(&format!("{EW1}:15443")));
                saw_new = true;
                break;
            }
        }
    }
    assert!(saw_new, "the new gateway address was pushed");
}

#[tokio::test]
async fn cluster1s_eastwest_gateway_forwards_by_sni_to_network1_mtls_endpoints_only() {
    let t = mesh().await;
    let mut s = Sotw::open(plaintext(&t).await, None).await.unwrap();
    s.send(req(LDS, &[], "", Some(eastwest_node()))).await;
    let lds: Vec<Listener> = decode_all(&s.recv().await.unwrap());
    let l = lds
        .iter()
        .find(|l| l.name == "0.0.0.0_15443")
        .expect("the 15443 listener");
    assert_eq!(l.listener_filters[0].name, "envoy.filters.listener.tls_inspector");
    let chain = l
        .filter_chains
        .iter()
        .find(|c| {
            c.filter_chain_match
                .as_ref()
                .is_some_and(|m| m.server_names == [HELLO_SNI])
        })
        .expect("a chain for helloworld's SNI");
    let m = chain.filter_chain_match.as_ref().unwrap();
    assert_eq!(
        m.application_protocols,
        [
            "istio",
            "istio-peer-exchange",
            "istio-http/1.0",
            "istio-http/1.1",
            "istio-h2"
        ]
    );
    assert!(
        chain.transport_socket.is_none(),
        "the gateway never terminates the client's TLS"
    );
    assert_eq!(chain.filters[0].name, "envoy.filters.network.tcp_proxy");
    assert!(
        l.filter_chains.iter().all(|c| c.filter_chain_match.is_some()),
        "no catch-all: anything but Istio mTLS with a known SNI is closed"
    );

    s.send(req(CDS, &[], "", None)).await;
    let cds: Vec<Cluster> = decode_all(&s.recv().await.unwrap());
    let c = cds.iter().find(|c| c.name == HELLO_SNI).expect("the SNI-DNAT cluster");
    assert!(c.transport_socket.is_none() && c.transport_socket_matches.is_empty());
    assert!(cds.iter().any(|c| c.name == HELLO_5000), "the regular clusters too");

    let eds = eds_of(&mut s, &[HELLO_SNI], None).await;
    assert_eq!(
        endpoints(&eds[0]).keys().cloned().collect::<Vec<_>>(),
        vec!["10.1.0.5:5000".to_string()],
        "its own network only (REQUESTED_NETWORK_VIEW), mTLS-capable pods only"
    );
}

#[tokio::test]
async fn networkz_lists_gateways_and_why_one_is_skipped() {
    let t = mesh().await;
    t.m().mesh.upsert_service(
        "cluster2",
        ServiceKey::new("istio-system", "pending-gateway"),
        ShardService {
            ports: vec![port("tls", 15443, Protocol::Tls)],
            labels: [(NETWORK_LABEL.to_string(), "network2".to_string())].into(),
            ..Default::default()
        },
    );
    let url = t.m().addrs.monitoring;
    let mut body = String::new();
    eventually("the pending gateway in networkz", Duration::from_secs(10), async || {
        body = http_get(url, "/debug/networkz", &[]).await.1;
        body.contains("pending-gateway")
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["multiNetwork"], true);
    let gws = v["gateways"].as_array().unwrap();
    let used: Vec<&str> = gws
        .iter()
        .filter(|g| g["problem"].is_null())
        .map(|g| g["address"].as_str().unwrap())
        .collect();
    assert_eq!(used, [EW1, EW2]);
    let pending = gws.iter().find(|g| g["source"]["name"] == "pending-gateway").unwrap();
    assert_eq!(pending["network"], "network2");
    assert!(pending["problem"].as_str().unwrap().contains("no address"), "{pending}");
}
