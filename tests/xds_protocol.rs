//! ADS protocol rules over real gRPC (SotW and Delta), driven by a hand-rolled client so every
//! edge can be exercised: ACK, NACK, stale nonce, unsubscribe, incremental EDS, reconnect with
//! initial_resource_versions, malformed nodes and identity checks.
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::xds::{Sotw, plaintext, req};
use common::xds_node as node;
use common::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use meshd::registry::model::{Endpoint, Locality, Protocol, ServiceKey, ServicePort};
use meshd::registry::store::ShardService;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const ECHO: &str = "echo.default.svc.cluster.local";
const ECHO_80: &str = "outbound|80||echo.default.svc.cluster.local";

fn gateway_node() -> Node {
    node(
        "router~10.0.0.9~gw-1.istio-system~istio-system.svc.cluster.local",
        &[("CLUSTER_ID", "cluster2"), ("NAMESPACE", "istio-system")],
    )
}

fn ep(ip: &str, cluster: &str) -> Endpoint {
    Endpoint {
        address: ip.parse().unwrap(),
        service_port_name: "http".into(),
        port: 8080,
        cluster_id: cluster.into(),
        network: String::new(),
        locality: Locality::default(),
        labels: BTreeMap::new(),
        service_account: Some("echo".into()),
        pod_name: None,
        ready: true,
    }
}

fn seed(t: &TestMeshd, ips: &[&str]) {
    let key = ServiceKey::new("default", "echo");
    t.m().mesh.upsert_service(
        "cluster1",
        key.clone(),
        ShardService {
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Http,
            }],
            ..Default::default()
        },
    );
    t.m()
        .mesh
        .set_endpoints("cluster1", key, ips.iter().map(|ip| ep(ip, "cluster1")).collect());
}

/// [`seed`], then waits until the served push context has the echo service.
async fn seed_and_wait(t: &TestMeshd, ips: &[&str]) {
    seed(t, ips);
    eventually("echo in the push context", Duration::from_secs(5), async || {
        t.m().xds.current().snapshot.services.contains_key(ECHO)
    })
    .await;
}

fn set_endpoints(t: &TestMeshd, ips: &[&str]) {
    t.m().mesh.set_endpoints(
        "cluster1",
        ServiceKey::new("default", "echo"),
        ips.iter().map(|ip| ep(ip, "cluster1")).collect(),
    );
}

async fn start() -> TestMeshd {
    TestMeshd::start_with(|a| a.debounce_after = Duration::from_millis(20)).await
}

fn cla(r: &DiscoveryResponse, i: usize) -> ClusterLoadAssignment {
    ClusterLoadAssignment::decode(r.resources[i].value.as_slice()).unwrap()
}

fn endpoint_count(c: &ClusterLoadAssignment) -> usize {
    c.endpoints.iter().map(|l| l.lb_endpoints.len()).sum()
}

#[tokio::test]
async fn sotw_ack_nack_stale_nonce_and_incremental_eds() {
    let t = start().await;
    // Wait for the first push to land so the initial answer has the service.
    seed_and_wait(&t, &["10.0.0.1", "10.0.0.2"]).await;
    let mut s = Sotw::open(plaintext(&t).await, None).await.unwrap();

    s.send(req(CDS, &[], "", Some(gateway_node()))).await;
    let cds = s.recv().await.unwrap();
    assert_eq!(cds.type_url, CDS);
    assert_eq!(cds.resources.len(), 1);
    let c = envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(cds.resources[0].value.as_slice()).unwrap();
    assert_eq!(c.name, ECHO_80);

    s.send(req(EDS, &[ECHO_80], "", None)).await;
    let eds = s.recv().await.unwrap();
    assert_eq!(cla(&eds, 0).cluster_name, ECHO_80);
    assert_eq!(endpoint_count(&cla(&eds, 0)), 2);
    assert_ne!(eds.nonce, cds.nonce);

    // ACK both; a NACK of CDS (with its nonce) records a reject and gets no answer.
    s.send(req(CDS, &[], &cds.nonce, None)).await;
    s.send(req(EDS, &[ECHO_80], &eds.nonce, None)).await;
    let mut nack = req(CDS, &[], &cds.nonce, None);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "cluster rejected: bad config".into(),
        details: vec![],
    });
    s.send(nack).await;
    // A stale nonce with new names is ignored.
    s.send(req(EDS, &[ECHO_80, "outbound|9|x|nope"], "stale-nonce", None))
        .await;

    // The next message is the endpoint-only push: EDS, not a reply to any of the above.
    set_endpoints(&t, &["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    let push = s.recv().await.unwrap();
    assert_eq!(push.type_url, EDS, "endpoint-only change pushes EDS only");
    assert_eq!(endpoint_count(&cla(&push, 0)), 3);
    assert_ne!(push.version_info, eds.version_info);

    assert_eq!(t.metric("pilot_total_xds_rejects{type=\"cds\"}"), 1.0);
    assert_eq!(t.metric("pilot_xds_expired_nonce{type=\"eds\"}"), 1.0);
    let conns = t.m().xds.connections();
    let cds_status = &conns[0].types["cds"];
    assert_eq!(cds_status.last_nack.as_deref(), Some("cluster rejected: bad config"));
    assert_eq!(conns[0].types["eds"].nonce_acked.as_deref(), Some(eds.nonce.as_str()));

    // Unsubscribe from EDS: later endpoint changes send nothing; a new service (full push) sends CDS.
    s.send(req(EDS, &[], &push.nonce, None)).await;
    set_endpoints(&t, &["10.0.0.1"]);
    t.m().mesh.upsert_service(
        "cluster1",
        ServiceKey::new("default", "other"),
        ShardService {
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Http,
            }],
            ..Default::default()
        },
    );
    let next = s.recv().await.unwrap();
    assert_eq!(next.type_url, CDS, "no EDS after unsubscribing");
    assert_eq!(next.resources.len(), 2);
}

#[tokio::test]
async fn malformed_nodes_and_unknown_types() {
    let t = start().await;
    let mut s = Sotw::open(plaintext(&t).await, None).await.unwrap();
    s.send(req(CDS, &[], "", Some(node("sidecar~10.0.0.1~x", &[])))).await;
    let err = s.recv().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("missing parts"), "{}", err.message());

    let mut s = Sotw::open(plaintext(&t).await, None).await.unwrap();
    s.send(req(CDS, &[], "", None)).await;
    assert_eq!(
        s.recv().await.unwrap_err().code(),
        Code::InvalidArgument,
        "no node on the first request"
    );

    // An unknown type gets no answer; the stream keeps working.
    let mut s = Sotw::open(plaintext(&t).await, None).await.unwrap();
    s.send(req(
        "type.googleapis.com/example.Unknown",
        &[],
        "",
        Some(gateway_node()),
    ))
    .await;
    s.send(req(CDS, &[], "", None)).await;
    assert_eq!(s.recv().await.unwrap().type_url, CDS);
}

#[tokio::test]
async fn identity_must_match_the_node_on_the_tls_port() {
    let t = start().await;
    let gw_token = t.token("istio-system", "gw");
    let mut ok = Sotw::open(t.channel().await, Some(&gw_token)).await.unwrap();
    ok.send(req(CDS, &[], "", Some(gateway_node()))).await;
    assert_eq!(ok.recv().await.unwrap().type_url, CDS);
    assert_eq!(
        t.m().xds.connections()[0].identity.as_deref(),
        Some("spiffe://cluster.local/ns/istio-system/sa/gw")
    );

    let other = t.token("default", "web");
    let mut bad = Sotw::open(t.channel().await, Some(&other)).await.unwrap();
    bad.send(req(CDS, &[], "", Some(gateway_node()))).await;
    let err = bad.recv().await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let sa_mismatch = node(
        "router~10.0.0.9~gw-1.istio-system~istio-system.svc.cluster.local",
        &[("SERVICE_ACCOUNT", "ingress")],
    );
    let mut bad = Sotw::open(t.channel().await, Some(&gw_token)).await.unwrap();
    bad.send(req(CDS, &[], "", Some(sa_mismatch))).await;
    assert_eq!(bad.recv().await.unwrap_err().code(), Code::PermissionDenied);

    let err = match Sotw::open(t.channel().await, None).await {
        Err(e) => e,
        Ok(mut s) => {
            s.send(req(CDS, &[], "", Some(gateway_node()))).await;
            s.recv().await.unwrap_err()
        }
    };
    assert_eq!(err.code(), Code::Unauthenticated);
}

struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Delta {
    async fn open(ch: Channel) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let rx = AggregatedDiscoveryServiceClient::new(ch)
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    async fn send(&self, r: DeltaDiscoveryRequest) {
        self.tx.send(r).await.unwrap();
    }

    async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("no delta response within 10s")
            .expect("stream error")
            .expect("stream ended")
    }
}

fn dreq(type_url: &str, sub: &[&str], nonce: &str, node: Option<Node>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node,
        type_url: type_url.into(),
        resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn delta_sends_changes_removals_and_honours_initial_versions() {
    let t = start().await;
    seed_and_wait(&t, &["10.0.0.1"]).await;
    let mut d = Delta::open(plaintext(&t).await).await;
    d.send(dreq(CDS, &[], "", Some(gateway_node()))).await;
    let cds = d.recv().await;
    assert_eq!(cds.resources.len(), 1);
    let cds_version = cds.resources[0].version.clone();
    d.send(dreq(EDS, &[ECHO_80], "", None)).await;
    let eds = d.recv().await;
    assert_eq!(eds.resources[0].name, ECHO_80);
    let eds_version = eds.resources[0].version.clone();
    d.send(dreq(CDS, &[], &cds.nonce, None)).await;
    d.send(dreq(EDS, &[], &eds.nonce, None)).await;

    // Endpoint change: only the changed assignment, with a new per-resource version.
    set_endpoints(&t, &["10.0.0.1", "10.0.0.2"]);
    let up = d.recv().await;
    assert_eq!(up.type_url, EDS);
    assert_eq!(up.resources.len(), 1);
    assert_ne!(up.resources[0].version, eds_version);
    d.send(dreq(EDS, &[], &up.nonce, None)).await;

    // Removing the service removes its cluster and assignment.
    t.m()
        .mesh
        .remove_service("cluster1", &ServiceKey::new("default", "echo"));
    let removed_cds = d.recv().await;
    assert_eq!(removed_cds.type_url, CDS);
    assert_eq!(removed_cds.removed_resources, vec![ECHO_80.to_string()]);
    let removed_eds = d.recv().await;
    assert_eq!(removed_eds.type_url, EDS);
    assert_eq!(removed_eds.removed_resources, vec![ECHO_80.to_string()]);

    // Reconnect holding the current CDS version: nothing is resent.
    seed_and_wait(&t, &["10.0.0.1"]).await;
    let mut d2 = Delta::open(plaintext(&t).await).await;
    let mut first = dreq(CDS, &[], "", Some(gateway_node()));
    first
        .initial_resource_versions
        .insert(ECHO_80.into(), cds_version.clone());
    first
        .initial_resource_versions
        .insert("outbound|1||gone.default.svc.cluster.local".into(), "old".into());
    d2.send(first).await;
    let r = d2.recv().await;
    assert!(r.resources.is_empty(), "the client already has this version");
    assert_eq!(
        r.removed_resources,
        vec!["outbound|1||gone.default.svc.cluster.local".to_string()]
    );
}

#[tokio::test]
async fn delta_resends_what_a_client_unsubscribed_and_subscribes_again() {
    let t = start().await;
    seed_and_wait(&t, &["10.0.0.1"]).await;
    let mut d = Delta::open(plaintext(&t).await).await;
    d.send(dreq(CDS, &[], "", Some(gateway_node()))).await;
    let cds = d.recv().await;
    d.send(dreq(CDS, &[], &cds.nonce, None)).await;
    d.send(dreq(EDS, &[ECHO_80], "", None)).await;
    let eds = d.recv().await;
    assert_eq!(eds.resources.len(), 1);
    // Unsubscribing is not answered; the client no longer holds the assignment.
    let mut unsubscribe = dreq(EDS, &[], &eds.nonce, None);
    unsubscribe.resource_names_unsubscribe = vec![ECHO_80.into()];
    d.send(unsubscribe).await;
    // Subscribing again brings it back, although its version never changed.
    d.send(dreq(EDS, &[ECHO_80], &eds.nonce, None)).await;
    let again = d.recv().await;
    assert_eq!(again.type_url, EDS);
    assert_eq!(again.resources.len(), 1, "{again:?}");
    assert_eq!(again.resources[0].name, ECHO_80);
    assert_eq!(again.resources[0].version, eds.resources[0].version);
}

#[tokio::test]
async fn versions_and_nonces_differ_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let mut versions = Vec::new();
    for _ in 0..2 {
        let mut t = TestMeshd::start_with(|a| a.data_dir = data.clone()).await;
        let mut s = Sotw::open(plaintext(&t).await, None).await.unwrap();
        s.send(req(CDS, &[], "", Some(gateway_node()))).await;
        let r = s.recv().await.unwrap();
        versions.push((r.version_info, r.nonce));
        t.stop().await;
    }
    assert_ne!(versions[0].0, versions[1].0);
    assert_ne!(versions[0].1, versions[1].1);
}

const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

fn https_gateway() -> meshd::registry::istio::IstioConfig {
    use meshd::registry::istio::*;
    IstioConfig {
        gateways: vec![Config {
            meta: ConfigMeta {
                name: "ingress".into(),
                namespace: "istio-system".into(),
            },
            spec: GatewaySpec {
                selector: [("istio".to_string(), "ingressgateway".to_string())].into(),
                servers: vec![GatewayServer {
                    port: GatewayPort {
                        number: 8443,
                        name: "https".into(),
                        protocol: "HTTPS".into(),
                        ..Default::default()
                    },
                    hosts: vec!["*".into()],
                    tls: Some(ServerTls {
                        mode: Some("SIMPLE".into()),
                        credential_name: Some("gw-cred".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
            },
        }],
        ..Default::default()
    }
}

fn labelled_gateway_node() -> Node {
    let mut n = gateway_node();
    n.metadata.as_mut().unwrap().fields.insert(
        "LABELS".into(),
        Value {
            kind: Some(Kind::StructValue(Struct {
                fields: [(
                    "istio".to_string(),
                    Value {
                        kind: Some(Kind::StringValue("ingressgateway".into())),
                    },
                )]
                .into(),
            })),
        },
    );
    n
}

#[tokio::test]
async fn secrets_go_only_to_authenticated_gateways_never_on_the_plaintext_port() {
    use meshd::xds::generators::router::{StaticSecrets, TlsSecret};
    let t = start().await;
    let secrets = StaticSecrets::new(None);
    let cert = rcgen::generate_simple_self_signed(vec!["gw.example.com".into()]).unwrap();
    secrets.insert(
        "cluster2",
        "istio-system",
        "gw-cred",
        TlsSecret {
            cert_chain: cert.cert.pem().into_bytes(),
            private_key: cert.signing_key.serialize_pem().into_bytes(),
            ca_cert: None,
        },
    );
    t.m().xds.set_secret_source(secrets);
    t.m().mesh.set_config(https_gateway());
    eventually("gateway config pushed", Duration::from_secs(5), async || {
        !t.m().xds.current().snapshot.config.gateways.is_empty()
    })
    .await;

    let mut tls = Sotw::open(t.channel().await, Some(&t.token("istio-system", "gw")))
        .await
        .unwrap();
    tls.send(req(SDS, &["kubernetes://gw-cred"], "", Some(labelled_gateway_node())))
        .await;
    let r = tls.recv().await.unwrap();
    assert_eq!(r.type_url, SDS);
    assert_eq!(
        r.resources.len(),
        1,
        "authenticated gateway in cluster2/istio-system gets its credential"
    );

    let mut plain = Sotw::open(plaintext(&t).await, None).await.unwrap();
    plain
        .send(req(SDS, &["kubernetes://gw-cred"], "", Some(labelled_gateway_node())))
        .await;
    let r = plain.recv().await.unwrap();
    assert!(r.resources.is_empty(), "no secret on the plaintext port");
}

/// 2,000 endpoints for echo (large assignments fill a window quickly), then two acked EDS
/// streams: one whose HTTP/2 windows are the protocol minimum (so the server feels it stop
/// reading), and a normal one. Returns the endpoint IPs and the (stuck, live) streams.
async fn stuck_and_live(t: &TestMeshd) -> (Vec<String>, Sotw, Sotw) {
    let many: Vec<String> = (0..2000)
        .map(|i| format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256))
        .collect();
    seed_and_wait(t, &many.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let small = tonic::transport::Endpoint::from_shared(format!("http://{}", t.m().addrs.plaintext))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut stuck = Sotw::open(small, None).await.unwrap();
    stuck.send(req(EDS, &[ECHO_80], "", Some(gateway_node()))).await;
    let first = stuck.recv().await.unwrap();
    stuck.send(req(EDS, &[ECHO_80], &first.nonce, None)).await;
    let mut live = Sotw::open(plaintext(t).await, None).await.unwrap();
    live.send(req(EDS, &[ECHO_80], "", Some(gateway_node()))).await;
    let r = live.recv().await.unwrap();
    live.send(req(EDS, &[ECHO_80], &r.nonce, None)).await;
    (many, stuck, live)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_client_never_delays_others_and_its_pushes_coalesce() {
    let t = start().await;
    let (many, mut stuck, mut live) = stuck_and_live(&t).await;
    let ips = |n: usize| many[..n].iter().map(String::as_str).collect::<Vec<_>>();

    // The stuck client reads nothing from here on, while 30 endpoint changes are pushed.
    for i in 0..30 {
        let n = 1990 - i;
        set_endpoints(&t, &ips(n));
        // The live client sees every change promptly (each wait is bounded by recv's deadline).
        loop {
            let r = live.recv().await.unwrap();
            live.send(req(EDS, &[ECHO_80], &r.nonce, None)).await;
            if endpoint_count(&cla(&r, 0)) == n {
                break;
            }
        }
    }
    // When the stuck client reads again it converges on the latest state, having received far
    // fewer responses than there were pushes (the rest coalesced while it was stuck).
    let mut received = 0;
    loop {
        let r = stuck.recv().await.unwrap();
        received += 1;
        stuck.send(req(EDS, &[ECHO_80], &r.nonce, None)).await;
        if endpoint_count(&cla(&r, 0)) == 1961 {
            break;
        }
    }
    assert!(
        received < 30,
        "pushes coalesced for the stuck client: received {received}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_stops_reading_is_closed_after_the_send_timeout() {
    let t = TestMeshd::start_with(|a| {
        a.debounce_after = Duration::from_millis(20);
        a.xds_send_timeout = Duration::from_secs(1);
        a.xds_send_queue = 1;
    })
    .await;
    let (many, mut stuck, mut live) = stuck_and_live(&t).await;
    let ips = |n: usize| many[..n].iter().map(String::as_str).collect::<Vec<_>>();

    // The stuck client reads nothing while changes are pushed, until meshd gives up on it.
    let mut i = 0;
    eventually("the write timeout fires", Duration::from_secs(30), async || {
        i += 1;
        set_endpoints(&t, &ips(1999 - (i % 50)));
        let r = live.recv().await.unwrap();
        live.send(req(EDS, &[ECHO_80], &r.nonce, None)).await;
        t.metric("pilot_xds_write_timeout") >= 1.0
    })
    .await;
    // Reading again, the stuck client finds what was queued, then the reason its stream ended.
    let status = loop {
        match stuck.recv().await {
            Ok(_) => continue,
            Err(s) => break s,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("PILOT_XDS_SEND_TIMEOUT"), "{status:?}");
    // The live client was never held up.
    set_endpoints(&t, &ips(1500));
    loop {
        let r = live.recv().await.unwrap();
        live.send(req(EDS, &[ECHO_80], &r.nonce, None)).await;
        if endpoint_count(&cla(&r, 0)) == 1500 {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_wait_for_a_starting_server_then_get_unavailable() {
    let t = start().await;
    eventually("meshd ready", Duration::from_secs(10), async || {
        t.m().readiness.is_ready()
    })
    .await;
    let xds = t.m().xds.clone();
    xds.hold_until_ready();
    // A stream opened now waits for the first push instead of getting an empty mesh.
    let ch = plaintext(&t).await;
    let mut opening = tokio::spawn(async move { Sotw::open(ch, None).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut opening)
            .await
            .is_err(),
        "the stream is held while not ready"
    );
    xds.set_ready();
    let Ok(mut s) = opening.await.unwrap() else {
        panic!("opens once ready")
    };
    s.send(req(CDS, &[], "", Some(gateway_node()))).await;
    assert_eq!(s.recv().await.unwrap().type_url, CDS);
    // Never ready: refused after the bounded wait with istiod's message.
    xds.hold_until_ready();
    let started = std::time::Instant::now();
    let Err(err) = Sotw::open(plaintext(&t).await, None).await else {
        panic!("refused while never ready")
    };
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("not ready to serve discovery information"),
        "{err:?}"
    );
    assert!(started.elapsed() >= meshd::xds::server::NOT_READY_WAIT - Duration::from_millis(100));
}

/// A proxy that goes away (its connection closed with a GOAWAY, or its TCP connection simply
/// dropped, as when a process exits) ends its stream as a normal close: not counted or logged
/// as a stream error.
#[tokio::test]
async fn a_proxy_going_away_is_a_normal_close_not_an_error() {
    let t = start().await;
    seed_and_wait(&t, &["10.0.0.1"]).await;
    let connected = |t: &TestMeshd| t.metric("pilot_xds{version=\"meshd\"}");

    // 1. A gRPC client that closes its connection.
    let ch = plaintext(&t).await;
    let mut s = Sotw::open(ch.clone(), None).await.unwrap();
    s.send(req(CDS, &[], "", Some(gateway_node()))).await;
    s.recv().await.unwrap();
    eventually("one proxy connected", Duration::from_secs(5), async || {
        connected(&t) == 1.0
    })
    .await;
    drop(s);
    drop(ch);
    eventually("the stream is gone", Duration::from_secs(10), async || {
        connected(&t) == 0.0
    })
    .await;

    // 2. A raw HTTP/2 connection dropped mid-stream, without a GOAWAY.
    let tcp = tokio::net::TcpStream::connect(t.m().addrs.plaintext).await.unwrap();
    let (mut h2c, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let request =
        http::Request::post("/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
    let (resp, mut body) = h2c.send_request(request, false).unwrap();
    let msg = req(CDS, &[], "", Some(gateway_node())).encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    body.send_data(frame.into(), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    eventually("the raw proxy connected", Duration::from_secs(5), async || {
        connected(&t) == 1.0
    })
    .await;
    driver.abort(); // drops the TCP connection: no GOAWAY, no RST_STREAM
    drop(body);
    drop(h2c);
    eventually("the raw stream is gone", Duration::from_secs(10), async || {
        connected(&t) == 0.0
    })
    .await;

    let errors: Vec<String> = t
        .m()
        .registry
        .encode()
        .lines()
        .filter(|l| l.starts_with("meshd_xds_stream_errors{"))
        .map(str::to_string)
        .collect();
    assert!(errors.is_empty(), "a proxy going away is no stream error: {errors:?}");
}
