//! Faults (issue 6, item 3): what meshd does when the things around it fail, and that it
//! recovers without losing anything.
//!
//! Already covered elsewhere and not repeated here:
//! - a remote API server down or slower than `--token-review-timeout` for TokenReview:
//!   `tests/multicluster_auth.rs::remote_api_server_down_gives_unavailable_while_cached_identities_keep_working`,
//!   `…::a_slow_remote_api_server_times_out_as_unavailable`;
//! - a remote that does not answer at startup: `…::an_unresponsive_remote_cluster_delays_readiness_only_until_the_timeout`;
//! - 410 Gone and a relist under load: `tests/registry_e2e.rs::a_410_relist_never_drops_endpoints_and_ends_correct`;
//! - the `kube` reflector through dropped watches, outages and 410:
//!   `tests/fake_apiserver.rs::reflector_tracks_changes_through_dropped_watches_outages_and_410`;
//! - a plugged CA replaced wholesale: `tests/ca_e2e.rs::plugged_ca_files_are_reloaded_when_they_change`.
//!
//! Here: a remote API server answering 500 and 429 (TokenReview and the registry's list/watch),
//! dropping every watch and restarting, a remote secret broken then fixed, the real binary
//! restarted under 1,000 ADS streams, a CA root rotation through an overlap bundle, and clock
//! skew within the 2-minute backdate. Every wait is a poll with a deadline.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use common::*;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value as PbValue, value::Kind};
use meshd::bench::xds::{CDS, EDS, LDS, LoadClient, LoadConfig, RDS};
use meshd::pki::keys::KeyType;
use meshd::testing::fake_apiserver::{FakeApiServer, FakeConfig, ResourceType};
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(30);
const CDS_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS_URL: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const ECHO_80: &str = "outbound|80||echo.default.svc.cluster.local";
const GW_SA: &str = "istio-ingressgateway-service-account";

// ---------------------------------------------------------------------------------------------
// Two fake clusters and meshd in Kubernetes mode
// ---------------------------------------------------------------------------------------------

struct Mesh {
    primary: FakeApiServer,
    remote: FakeApiServer,
    meshd: TestMeshd,
}

async fn fake(ip: &str, name: &str) -> FakeApiServer {
    FakeApiServer::start(FakeConfig::new(format!("{ip}:0").parse().unwrap(), name))
        .await
        .expect("fake API server starts")
}

/// cluster1 (primary, 127.0.0.52) and cluster2 (remote, 127.0.0.53), meshd against the primary.
async fn mesh(tweak: impl FnOnce(&mut meshd::config::ServeArgs)) -> Mesh {
    let primary = fake("127.0.0.52", "cluster1").await;
    let remote = fake("127.0.0.53", "cluster2").await;
    primary.ensure_namespace("istio-system").unwrap();
    remote.ensure_namespace("istio-system").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("primary.kubeconfig");
    std::fs::write(&kubeconfig, primary.kubeconfig(primary.admin_token())).unwrap();
    let meshd = TestMeshd::start_with(|a| {
        a.standalone = false;
        a.kubeconfig = Some(kubeconfig.clone());
        a.cluster_id = "cluster1".into();
        a.debounce_after = Duration::from_millis(20);
        a.root_cert_configmaps = false;
        tweak(a);
    })
    .await;
    drop(dir);
    Mesh { primary, remote, meshd }
}

fn remote_secret(cluster: &str, kubeconfig: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": format!("istio-remote-secret-{cluster}"), "namespace": "istio-system",
            "labels": {"istio/multiCluster": "true"},
            "annotations": {"networking.istio.io/cluster": cluster},
        },
        "data": {cluster: base64::engine::general_purpose::STANDARD.encode(kubeconfig)},
    })
}

fn apply(api: &FakeApiServer, obj: Value) {
    api.apply(obj).unwrap_or_else(|e| panic!("apply: {e}"));
}

/// The echo Service and its one EndpointSlice in `api`'s cluster, with `ips`.
fn echo(api: &FakeApiServer, cluster: &str, ips: &[&str]) {
    apply(
        api,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": "default", "labels": {"app": "echo"}},
            "spec": {"selector": {"app": "echo"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }),
    );
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    apply(
        api,
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("echo-{cluster}"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }),
    );
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

impl Mesh {
    fn remote_kubeconfig(&self) -> String {
        let reader = self.remote.reader_token("istio-reader-service-account").unwrap();
        self.remote.kubeconfig(&reader)
    }

    async fn attach_cluster2(&self) {
        self.primary
            .apply(remote_secret("cluster2", &self.remote_kubeconfig()))
            .unwrap();
        let clusters = Arc::clone(&self.meshd.m().clusters);
        eventually("cluster2 registered", WAIT, async || {
            clusters.remote("cluster2").is_some()
        })
        .await;
    }

    /// Both clusters serve echo: 10.1.0.1 in cluster1, 10.2.0.1 in cluster2.
    async fn seeded() -> (Self, EdsWatch) {
        let m = mesh(|_| {}).await;
        echo(&m.primary, "cluster1", &["10.1.0.1"]);
        echo(&m.remote, "cluster2", &["10.2.0.1"]);
        m.attach_cluster2().await;
        let eds = EdsWatch::start(m.meshd.m().addrs.plaintext).await;
        eds.wait_for("both clusters' endpoints over ADS", &["10.1.0.1", "10.2.0.1"])
            .await;
        (m, eds)
    }

    fn gateway_token(&self, pod: &str) -> String {
        self.remote
            .mint_token(
                "istio-system",
                GW_SA,
                &["istio-ca"],
                Duration::from_secs(3600),
                Some((pod, "uid-1")),
            )
            .unwrap()
    }

    fn primary_token(&self) -> String {
        self.primary
            .mint_token("default", "web", &["istio-ca"], Duration::from_secs(3600), None)
            .unwrap()
    }

    async fn csr(&self, token: &str, cluster: &str) -> Result<Vec<String>, tonic::Status> {
        create(
            self.meshd.channel().await,
            Some(token),
            Some(cluster),
            csr(KeyType::EcdsaP256, None),
            0,
        )
        .await
    }

    /// echo's endpoints in meshd's service model.
    fn model_addresses(&self) -> BTreeSet<String> {
        self.meshd
            .m()
            .mesh
            .snapshot()
            .endpoints("echo.default.svc.cluster.local")
            .iter()
            .map(|e| e.address.to_string())
            .collect()
    }

    async fn clusterz(&self) -> Vec<Value> {
        let (status, body) = http_get(self.meshd.m().addrs.monitoring, "/debug/clusterz", &[]).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }
}

fn clusterz_row<'a>(rows: &'a [Value], id: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["id"] == id)
}

fn string_value(s: &str) -> PbValue {
    PbValue {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn sidecar_node(name: &str) -> Node {
    Node {
        id: format!("sidecar~10.9.0.1~{name}.default~default.svc.cluster.local"),
        metadata: Some(Struct {
            fields: [("CLUSTER_ID", "cluster1"), ("NAMESPACE", "default")]
                .iter()
                .map(|(k, v)| (k.to_string(), string_value(v)))
                .collect(),
        }),
        ..Default::default()
    }
}

async fn plaintext(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the plaintext port")
}

fn addresses_of(cla: &ClusterLoadAssignment) -> BTreeSet<String> {
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|lb| match &lb.host_identifier {
            Some(HostIdentifier::Endpoint(e)) => e.address.as_ref(),
            _ => None,
        })
        .filter_map(|a| match &a.address {
            Some(AddressKind::SocketAddress(sa)) => Some(sa.address.clone()),
            _ => None,
        })
        .collect()
}

#[derive(Default)]
struct EdsView {
    addrs: BTreeSet<String>,
    /// Fewest addresses in any response since the last `reset_min`.
    min: Option<usize>,
    responses: u64,
    ended: Option<String>,
}

/// A sidecar's SotW ADS stream on the plaintext port watching echo's EDS: it ACKs every
/// response and keeps the latest addresses, as a proxy would hold them.
struct EdsWatch {
    view: Arc<Mutex<EdsView>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EdsWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EdsWatch {
    async fn start(addr: SocketAddr) -> Self {
        let ch = plaintext(addr).await;
        let (tx, rx) = mpsc::channel(16);
        tx.send(DiscoveryRequest {
            node: Some(sidecar_node("eds-watch")),
            type_url: EDS_URL.into(),
            resource_names: vec![ECHO_80.into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let mut stream = AggregatedDiscoveryServiceClient::new(ch)
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("ADS stream opens")
            .into_inner();
        let view = Arc::new(Mutex::new(EdsView::default()));
        let v = Arc::clone(&view);
        let task = tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(r)) => {
                        let addrs: BTreeSet<String> = r
                            .resources
                            .iter()
                            .filter_map(|a| ClusterLoadAssignment::decode(a.value.as_slice()).ok())
                            .filter(|c| c.cluster_name == ECHO_80)
                            .flat_map(|c| addresses_of(&c))
                            .collect();
                        {
                            let mut g = v.lock().unwrap();
                            g.min = Some(g.min.map_or(addrs.len(), |m| m.min(addrs.len())));
                            g.addrs = addrs;
                            g.responses += 1;
                        }
                        let ack = DiscoveryRequest {
                            type_url: EDS_URL.into(),
                            resource_names: vec![ECHO_80.into()],
                            version_info: r.version_info,
                            response_nonce: r.nonce,
                            ..Default::default()
                        };
                        if tx.send(ack).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        v.lock().unwrap().ended = Some("ended".into());
                        return;
                    }
                    Err(s) => {
                        v.lock().unwrap().ended = Some(format!("{s:?}"));
                        return;
                    }
                }
            }
        });
        Self { view, task }
    }

    fn addrs(&self) -> BTreeSet<String> {
        self.view.lock().unwrap().addrs.clone()
    }

    fn min(&self) -> Option<usize> {
        self.view.lock().unwrap().min
    }

    fn reset_min(&self) {
        let mut g = self.view.lock().unwrap();
        g.min = Some(g.addrs.len());
    }

    async fn wait_for(&self, what: &str, want: &[&str]) {
        let want = set(want);
        let deadline = Instant::now() + WAIT;
        loop {
            let (addrs, ended) = {
                let g = self.view.lock().unwrap();
                (g.addrs.clone(), g.ended.clone())
            };
            assert!(ended.is_none(), "{what}: the ADS stream ended: {ended:?}");
            if addrs == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: timed out after {WAIT:?}; the proxy holds {addrs:?}, want {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. A remote API server answering 500 and 429
// ---------------------------------------------------------------------------------------------

/// TokenReview against a cluster2 API server that answers 429 once, then 500, then 429 on
/// every request. A single 429 is absorbed (the kube client retries after `Retry-After`); a 500
/// is UNAVAILABLE at once naming the cluster and the status; a server that keeps throttling is
/// UNAVAILABLE at `--token-review-timeout`, naming the cluster. cluster1's callers are served
/// throughout, and once the fault clears the very token that failed works (an outage is never
/// cached as a rejection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_review_answering_500_and_429_is_unavailable_for_that_cluster_only() {
    let m = mesh(|a| a.token_review_timeout = Duration::from_secs(2)).await;
    m.attach_cluster2().await;
    let primary_token = m.primary_token();
    let reviews = || m.remote.request_count("create", "tokenreviews");
    // Timed from the RPC, not from the TLS connection.
    let timed = async |token: &str| {
        let ch = m.meshd.channel().await;
        let started = Instant::now();
        let r = create(ch, Some(token), Some("cluster2"), csr(KeyType::EcdsaP256, None), 0).await;
        (r, started.elapsed())
    };

    // One 429 (a throttled moment) is retried inside the review and never reaches the caller.
    // The injected failure goes to the next request of any kind, so first let cluster2's
    // watchers (services, secrets) settle into their long-lived watches.
    wait_quiet(&m.remote).await;
    let once = m.gateway_token("gw-once");
    let before = reviews();
    m.remote.fail_next(1, 429);
    m.csr(&once, "cluster2")
        .await
        .expect("a single 429 is absorbed by the retry");
    assert_eq!(reviews(), before + 2, "one 429, then one success");

    // 500 on every request.
    m.remote.set_failure_rate(1.0, 500);
    let token = m.gateway_token("gw-500");
    let before = reviews();
    let (r, took) = timed(&token).await;
    let err = r.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    for part in ["cluster2", "500", "Internal error"] {
        assert!(err.message().contains(part), "names {part:?}: {}", err.message());
    }
    assert!(!err.message().contains(&token), "token echoed");
    assert!(took < Duration::from_secs(2), "a 500 is answered at once: {took:?}");
    assert_eq!(reviews(), before + 1, "one TokenReview, not retried");
    // cluster1's callers are unaffected.
    m.csr(&primary_token, "cluster1")
        .await
        .expect("cluster1 served while cluster2 answers 500");

    // 429 on every request: meshd retries with backoff until the review timeout ends the call,
    // and the caller learns that cluster2's API server is throttling.
    m.remote.set_failure_rate(1.0, 429);
    m.remote.set_retry_after(1);
    let before = reviews();
    let (r, took) = timed(&token).await;
    let err = r.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("cluster2"), "{}", err.message());
    assert!(
        err.message().contains("cluster2's API server is throttling (HTTP 429)"),
        "{}",
        err.message()
    );
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "answered at the review timeout: {took:?}"
    );
    assert!(
        reviews() >= before + 2,
        "the 429 was retried: {} attempts",
        reviews() - before
    );
    m.csr(&primary_token, "cluster1")
        .await
        .expect("cluster1 served while cluster2 answers 429");

    // Cleared: the same token works at once; the failures were not cached as a rejection.
    m.remote.clear_faults();
    let chain = m
        .csr(&token, "cluster2")
        .await
        .expect("the token that failed works once the fault clears");
    assert_eq!(
        leaf_facts(&chain).uri_sans,
        vec![format!("spiffe://cluster.local/ns/istio-system/sa/{GW_SA}")]
    );
    assert_eq!(
        m.meshd
            .metric("meshd_token_review_api_calls{cluster=\"cluster2\",result=\"api_error\"}"),
        1.0,
        "the 500 counted as an API error"
    );
    assert_eq!(
        m.meshd
            .metric("meshd_token_review_api_calls{cluster=\"cluster2\",result=\"throttled\"}"),
        1.0,
        "the throttled review counted as throttled, not as a timeout"
    );
}

/// Waits until `api` has served no request for a second (its clients sit in open watches).
async fn wait_quiet(api: &FakeApiServer) {
    let deadline = Instant::now() + WAIT;
    let mut last = (api.request_total(), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = api.request_total();
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() >= Duration::from_secs(1) {
            return;
        }
        assert!(Instant::now() < deadline, "the API server never went quiet");
    }
}

/// cluster2's API server answers 500, then 429, to every list and watch after its watches were
/// dropped: the endpoints meshd already had stay served over ADS (never even briefly dropped),
/// cluster1's changes keep flowing, and after recovery both the change made during the outage
/// and a new one arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_watch_errors_keep_known_endpoints_and_changes_arrive_after_recovery() {
    let (m, eds) = Mesh::seeded().await;
    let attempts = || {
        ["list", "watch"]
            .iter()
            .map(|v| m.remote.request_count(v, "endpointslices"))
            .sum::<u64>()
    };
    eds.reset_min();

    m.remote.set_failure_rate(1.0, 500);
    m.remote.drop_watches();
    // Changes in cluster2 during the outage cannot be seen yet...
    echo(&m.remote, "cluster2", &["10.2.0.1", "10.2.0.2"]);
    // ...while cluster1's still arrive.
    echo(&m.primary, "cluster1", &["10.1.0.1", "10.1.0.2"]);
    eds.wait_for(
        "cluster1's change during cluster2's outage",
        &["10.1.0.1", "10.1.0.2", "10.2.0.1"],
    )
    .await;
    let base = attempts();
    eventually("cluster2's slice watch failed twice with 500", WAIT, async || {
        attempts() >= base + 2
    })
    .await;

    m.remote.set_failure_rate(1.0, 429);
    m.remote.set_retry_after(1);
    let base = attempts();
    eventually("cluster2's slice watch throttled with 429", WAIT, async || {
        attempts() >= base + 2
    })
    .await;
    assert_eq!(
        m.model_addresses(),
        set(&["10.1.0.1", "10.1.0.2", "10.2.0.1"]),
        "the last known endpoints of cluster2 are kept"
    );
    assert_eq!(eds.addrs(), set(&["10.1.0.1", "10.1.0.2", "10.2.0.1"]));
    let clusters = Arc::clone(&m.meshd.m().clusters);
    assert!(
        clusters.remote("cluster2").is_some(),
        "an erroring API server does not unregister the cluster"
    );

    m.remote.clear_faults();
    eds.wait_for(
        "the change made during the outage, after recovery",
        &["10.1.0.1", "10.1.0.2", "10.2.0.1", "10.2.0.2"],
    )
    .await;
    echo(&m.remote, "cluster2", &["10.2.0.2", "10.2.0.3"]);
    eds.wait_for(
        "a change made after recovery",
        &["10.1.0.1", "10.1.0.2", "10.2.0.2", "10.2.0.3"],
    )
    .await;
    assert_eq!(
        eds.min(),
        Some(2),
        "the proxy never held fewer endpoints than the 2 it had when the faults began"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Dropped watches and a restarted API server
// ---------------------------------------------------------------------------------------------

/// cluster2's API server drops every watch mid-stream, then stops and starts again on the same
/// address with the same CA and objects (changed while it was down): meshd's registry resumes,
/// the change made while it was down and one made after the restart reach ADS, the proxy never
/// loses an endpoint, and TokenReview works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_and_a_restarted_api_server_lose_nothing() {
    let (mut m, eds) = Mesh::seeded().await;
    let token = m.gateway_token("gw-before");
    m.csr(&token, "cluster2").await.expect("reviewed before the faults");
    eds.reset_min();

    let watches = m.remote.request_count("watch", "endpointslices");
    m.remote.drop_watches();
    eventually("the slice watch reopened", WAIT, async || {
        m.remote.request_count("watch", "endpointslices") > watches
    })
    .await;
    echo(&m.remote, "cluster2", &["10.2.0.1", "10.2.0.2"]);
    eds.wait_for(
        "a change after the watches were dropped",
        &["10.1.0.1", "10.2.0.1", "10.2.0.2"],
    )
    .await;
    assert_eq!(eds.min(), Some(2), "nothing dropped while the watches reopened");
    // From here on the proxy must never hold fewer than these 3.
    eds.reset_min();

    // Stopped; the cluster changes while its API server is away.
    m.remote.stop().await;
    echo(&m.remote, "cluster2", &["10.2.0.2", "10.2.0.3"]);
    let fresh = m.gateway_token("gw-during");
    let err = m.csr(&fresh, "cluster2").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("cluster2"), "{}", err.message());
    assert_eq!(
        eds.addrs(),
        set(&["10.1.0.1", "10.2.0.1", "10.2.0.2"]),
        "the endpoints stay served while the API server is down"
    );

    m.remote.restart().await.expect("restarts on the same address");
    eds.wait_for(
        "the change made while the API server was down",
        &["10.1.0.1", "10.2.0.2", "10.2.0.3"],
    )
    .await;
    echo(&m.remote, "cluster2", &["10.2.0.3", "10.2.0.4"]);
    eds.wait_for("a change made after the restart", &["10.1.0.1", "10.2.0.3", "10.2.0.4"])
        .await;
    assert!(eds.min() >= Some(3), "never fewer than 3 endpoints: {:?}", eds.min());

    // TokenReview on the restarted server: the token refused during the outage now works.
    let reviews = m.remote.token_review_count();
    let chain = m
        .csr(&fresh, "cluster2")
        .await
        .expect("TokenReview works after the restart");
    assert_eq!(
        leaf_facts(&chain).uri_sans,
        vec![format!("spiffe://cluster.local/ns/istio-system/sa/{GW_SA}")]
    );
    assert_eq!(m.remote.token_review_count(), reviews + 1);
    assert!(
        m.meshd.m().clusters.remote("cluster2").is_some_and(|c| c.is_synced()),
        "cluster2 stays registered"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A remote secret broken, then fixed
// ---------------------------------------------------------------------------------------------

fn exec_kubeconfig(server: &str, ca_pem: &str, marker: &Path) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        r#"apiVersion: v1
kind: Config
clusters:
- name: cluster2
  cluster: {{server: "{server}", certificate-authority-data: {ca}}}
contexts:
- name: cluster2
  context: {{cluster: cluster2, user: cluster2}}
current-context: cluster2
users:
- name: cluster2
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1
      command: /bin/sh
      args: ["-c", "touch {marker}"]
"#,
        marker = marker.display()
    )
}

/// The remote secret of a working cluster2 is overwritten with junk, then with an `exec`
/// kubeconfig, then fixed. While broken: `/debug/clusterz` shows the reason, cluster2's callers
/// (even one whose identity was cached) get UNAVAILABLE naming the cluster and the reason (the
/// operator's secret is broken, not the caller's token: the agent should retry), nothing runs,
/// and cluster2 is unregistered with its endpoints (meshd's documented choice: the secret now
/// says something else, so the old client is not kept; istiod's §4.1 notes do not say). Fixed:
/// tokens and endpoints are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_remote_secret_keeps_the_last_good_client_until_fixed_or_deleted() {
    let (m, eds) = Mesh::seeded().await;
    let good = m.remote_kubeconfig();
    let cached = m.gateway_token("gw-cached");
    m.csr(&cached, "cluster2").await.expect("cluster2 works");
    let primary_token = m.primary_token();
    let clusters = Arc::clone(&m.meshd.m().clusters);
    let working = clusters.remote("cluster2").expect("registered");
    let refused = |m: &Mesh| m.meshd.metric("meshd_remote_secret_refused{cluster=\"cluster2\"}");

    // Junk, an exec kubeconfig, then a server that does not answer: each is refused, named in
    // /debug/clusterz and the metric, and the previous client keeps serving cluster2's callers
    // and endpoints (istiod keeps its last good client).
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("pwned");
    let dead = good.replace(&m.remote.url(), "https://127.0.0.1:9");
    assert_ne!(dead, good);
    for (what, kubeconfig, reason) in [
        ("junk", "{{{ this is not a kubeconfig".to_string(), "YAML"),
        (
            "exec",
            exec_kubeconfig(&m.remote.url(), m.remote.ca_pem(), &marker),
            "exec",
        ),
        ("unreachable", dead, "does not answer"),
    ] {
        m.primary.apply(remote_secret("cluster2", &kubeconfig)).unwrap();
        let mut row = Value::Null;
        eventually(&format!("clusterz shows the refused {what} secret"), WAIT, async || {
            row = clusterz_row(&m.clusterz().await, "cluster2")
                .cloned()
                .unwrap_or_default();
            row["error"].as_str().is_some_and(|e| e.contains(reason))
        })
        .await;
        let error = row["error"].as_str().unwrap_or_default();
        assert!(error.contains("previous ones keep serving"), "{what}: {row}");
        assert_eq!(
            row["source"]["name"], "istio-remote-secret-cluster2",
            "names the secret: {row}"
        );
        assert_eq!(refused(&m), 1.0, "{what}");
        assert!(
            Arc::ptr_eq(&clusters.remote("cluster2").expect("still registered"), &working),
            "{what}: the previous client is kept"
        );
        for (who, token) in [("cached", &cached), ("fresh", &m.gateway_token(&format!("gw-{what}")))] {
            m.csr(token, "cluster2")
                .await
                .unwrap_or_else(|e| panic!("{what}: a {who} cluster2 token still works: {e:?}"));
        }
        eds.wait_for(&format!("{what}: cluster2's endpoints stay"), &["10.1.0.1", "10.2.0.1"])
            .await;
        m.csr(&primary_token, "cluster1").await.expect("cluster1 unaffected");
    }
    assert!(!marker.exists(), "the exec command never ran");
    let rows = m.clusterz().await;
    assert_eq!(rows.iter().filter(|r| r["id"] == "cluster2").count(), 1, "{rows:?}");

    // Fixed: the good secret again (a new client), error and metric cleared.
    m.primary.apply(remote_secret("cluster2", &good)).unwrap();
    eventually("cluster2 on its fixed secret", WAIT, async || {
        clusters.remote("cluster2").is_some_and(|c| !Arc::ptr_eq(&c, &working)) && refused(&m) == 0.0
    })
    .await;
    eventually("no error once fixed", WAIT, async || {
        clusterz_row(&m.clusterz().await, "cluster2").is_some_and(|r| r["error"].is_null())
    })
    .await;
    m.csr(&m.gateway_token("gw-after"), "cluster2")
        .await
        .expect("a fresh cluster2 token works");
    eds.wait_for("cluster2's endpoints", &["10.1.0.1", "10.2.0.1"]).await;

    // Deleted: the cluster goes, with its endpoints; its callers are now unknown.
    m.primary.delete(
        &ResourceType::core("secrets"),
        "istio-system",
        "istio-remote-secret-cluster2",
    );
    eventually("cluster2 removed", WAIT, async || clusters.remote("cluster2").is_none()).await;
    eds.wait_for("cluster2's endpoints removed with it", &["10.1.0.1"])
        .await;
    let err = m.csr(&cached, "cluster2").await.unwrap_err();
    assert!(
        matches!(err.code(), Code::Unauthenticated | Code::Unavailable),
        "{err:?}"
    );

    // A secret that was never usable is a broken cluster: its callers get UNAVAILABLE naming it.
    m.primary
        .apply(remote_secret("cluster2", "{{{ this is not a kubeconfig"))
        .unwrap();
    let mut err = None;
    eventually("a never-working secret is reported as unusable", WAIT, async || {
        err = m.csr(&cached, "cluster2").await.err();
        err.as_ref()
            .is_some_and(|e| e.code() == Code::Unavailable && e.message().contains("unusable"))
    })
    .await;
    let msg = err.unwrap().message().to_string();
    for part in ["cluster2", "istio-remote-secret-cluster2", "YAML"] {
        assert!(msg.contains(part), "{part:?} in {msg}");
    }
    assert_eq!(
        m.meshd.metric("meshd_remote_cluster_healthy{cluster=\"cluster2\"}"),
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// 4. meshd restarted under 1,000 ADS streams
// ---------------------------------------------------------------------------------------------

const STREAMS: usize = 1000;

struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn log_tail(&self) -> String {
        let g = self.log.lock().unwrap();
        g[g.len().saturating_sub(30)..].join("\n")
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM");
    }
}

/// Fixed addresses on one loopback IP of this test's own, each port found free by binding it.
struct Ports {
    grpc: SocketAddr,
    plaintext: SocketAddr,
    monitoring: SocketAddr,
    ready: SocketAddr,
    webhook: SocketAddr,
}

impl Ports {
    fn pick(ip: IpAddr) -> Self {
        // Held together so the five differ, released before meshd binds them.
        let ls: Vec<std::net::TcpListener> = (0..5)
            .map(|_| std::net::TcpListener::bind((ip, 0)).expect("a free port"))
            .collect();
        let a: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        Self {
            grpc: a[0],
            plaintext: a[1],
            monitoring: a[2],
            ready: a[3],
            webhook: a[4],
        }
    }
}

/// The real binary, standalone, serving examples/config-dir on `ports`; returns once /ready
/// answers 200.
async fn spawn_meshd(data: &Path, ports: &Ports) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshd"))
        .args(["serve", "--standalone", "--cluster-id", "cluster1", "--data-dir"])
        .arg(data)
        .args([
            "--config-dir",
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config-dir"),
        ])
        .args(["--grpc-addr", &ports.grpc.to_string()])
        .args(["--plaintext-addr", &ports.plaintext.to_string()])
        .args(["--monitoring-addr", &ports.monitoring.to_string()])
        .args(["--ready-addr", &ports.ready.to_string()])
        .args(["--webhook-addr", &ports.webhook.to_string()])
        .args(["--max-requests-per-second", "0", "--shutdown-duration", "5s"])
        .args(["--ca-key-type", "ecdsa-p256", "--log-level", "info"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshd starts");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    let mut p = Proc { child, log };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!("meshd exited with {status}:\n{}", p.log_tail());
        }
        if let Ok(tcp) = tokio::net::TcpStream::connect(ports.ready).await {
            drop(tcp);
            if http_get(ports.ready, "/ready", &[]).await.0 == 200 {
                return p;
            }
        }
        assert!(
            Instant::now() < deadline,
            "meshd not ready after 60 s:\n{}",
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A SotW stream's CDS answer: the cluster names.
async fn sotw_cluster_names(addr: SocketAddr) -> BTreeSet<String> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(sidecar_node("names-sotw")),
        type_url: CDS_URL.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut s = AggregatedDiscoveryServiceClient::new(plaintext(addr).await)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r: DiscoveryResponse = tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("CDS within 10 s")
        .unwrap()
        .unwrap();
    r.resources
        .iter()
        .map(|a| Cluster::decode(a.value.as_slice()).unwrap().name)
        .collect()
}

/// A Delta CDS stream's first answer, optionally reconnecting with what it already holds.
async fn delta_cds(addr: SocketAddr, held: &BTreeMap<String, String>) -> DeltaDiscoveryResponse {
    let (tx, rx) = mpsc::channel(4);
    tx.send(DeltaDiscoveryRequest {
        node: Some(sidecar_node("names-delta")),
        type_url: CDS_URL.into(),
        initial_resource_versions: held.clone().into_iter().collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut s = AggregatedDiscoveryServiceClient::new(plaintext(addr).await)
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("Delta CDS within 10 s")
        .unwrap()
        .unwrap();
    drop(tx);
    r
}

/// Per stream: its node and what it holds (resources of each type).
fn holdings(c: &LoadClient) -> Vec<(String, [u64; 4])> {
    c.streams()
        .iter()
        .map(|s| {
            (
                s.node_id.clone(),
                [s.resources(CDS), s.resources(EDS), s.resources(LDS), s.resources(RDS)],
            )
        })
        .collect()
}

/// The real binary with 1,000 ADS streams (half Delta) is stopped with SIGTERM and started
/// again on the same ports and data dir. Every stream is drained with UNAVAILABLE; the load
/// client does not reconnect on its own (it only retries a refused first open), so the same
/// 1,000 proxies (same node ids) connect again, as Envoy would, and all get their full config
/// with no error; each holds what it held before, the root is byte-for-byte the same, and a
/// Delta proxy reconnecting with its resource versions is sent nothing it already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshd_restarted_under_a_thousand_streams_resyncs_them_all() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ports = Ports::pick("127.0.0.54".parse().unwrap());
    let first = spawn_meshd(&data, &ports).await;
    let root_before = std::fs::read(data.join("root-cert.pem")).expect("root-cert.pem written");

    let names_before = sotw_cluster_names(ports.plaintext).await;
    assert!(names_before.contains(ECHO_80), "{names_before:?}");
    let delta_before = delta_cds(ports.plaintext, &BTreeMap::new()).await;
    let held: BTreeMap<String, String> = delta_before
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    assert_eq!(
        held.keys().cloned().collect::<BTreeSet<_>>(),
        names_before,
        "SotW and Delta see the same clusters"
    );

    let mut cfg = LoadConfig::new(ports.plaintext, STREAMS);
    cfg.delta_percent = 50;
    let load = LoadClient::start(cfg.clone()).await.expect("streams open");
    load.wait_ready(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("before the restart: {e:#}\n{}", first.log_tail()));
    let totals = load.totals();
    assert_eq!((totals.sotw, totals.delta, totals.errors), (500, 500, 0), "{totals:?}");
    let before = holdings(&load);
    assert!(before.iter().all(|(_, h)| h.iter().all(|n| *n > 0)), "{before:?}");
    let ready_first = started.elapsed();

    // SIGTERM: every stream is ended with UNAVAILABLE and meshd exits 0.
    first.sigterm();
    let mut exit = None;
    let mut first = first;
    eventually("meshd exits after SIGTERM", Duration::from_secs(20), async || {
        exit = first.child.try_wait().unwrap();
        exit.is_some()
    })
    .await;
    assert_eq!(exit.and_then(|e| e.code()), Some(0), "{}", first.log_tail());
    eventually("every stream saw the drain", Duration::from_secs(10), async || {
        load.error_count() == STREAMS
    })
    .await;
    let drained = load
        .streams()
        .iter()
        .filter(|s| s.error().is_some_and(|e| e.contains("grpc-status 14")))
        .count();
    let sample = load.streams()[0].error();
    assert_eq!(drained, STREAMS, "ended with UNAVAILABLE, e.g. {sample:?}");
    drop(load);
    drop(first);

    // Same ports, same data dir.
    let second = spawn_meshd(&data, &ports).await;
    assert_eq!(
        std::fs::read(data.join("root-cert.pem")).unwrap(),
        root_before,
        "the root is unchanged"
    );
    meshd::client::connect(&ports.grpc.to_string(), SERVER_NAME, &root_before, None)
        .await
        .expect("15012 verifies against the root proxies already hold");

    let again = LoadClient::start(cfg).await.expect("streams open again");
    again
        .wait_ready(Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("after the restart: {e:#}\n{}", second.log_tail()));
    let totals = again.totals();
    assert_eq!((totals.ready, totals.errors), (STREAMS, 0), "{totals:?}");
    let after = holdings(&again);
    let differ: Vec<_> = before.iter().zip(&after).filter(|(b, a)| b != a).take(5).collect();
    assert!(
        differ.is_empty(),
        "streams hold something else after the restart: {differ:?}"
    );

    // Nothing lost, and no duplicate for a Delta proxy holding the current versions.
    assert_eq!(sotw_cluster_names(ports.plaintext).await, names_before);
    let gone = "outbound|1||gone.default.svc.cluster.local".to_string();
    let mut reconnect = held.clone();
    reconnect.insert(gone.clone(), "stale".into());
    let r = delta_cds(ports.plaintext, &reconnect).await;
    assert!(
        r.resources.is_empty(),
        "unchanged clusters resent: {:?}",
        r.resources.iter().map(|r| &r.name).collect::<Vec<_>>()
    );
    assert_eq!(r.removed_resources, vec![gone]);
    let fresh = delta_cds(ports.plaintext, &BTreeMap::new()).await;
    assert_eq!(
        fresh
            .resources
            .iter()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect::<BTreeMap<_, _>>(),
        held,
        "same names and content versions across the restart"
    );
    let (status, metrics) = http_get(ports.monitoring, "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(
        metric_value(&metrics, "pilot_xds{version=\"meshd\"}") >= STREAMS as f64,
        "pilot_xds = {}",
        metric_value(&metrics, "pilot_xds{version=\"meshd\"}")
    );
    drop(again);
    drop(second);
    eprintln!(
        "1,000 streams: ready in {ready_first:?} before the restart, whole test {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// 5. CA root rotation with an overlap bundle
// ---------------------------------------------------------------------------------------------

/// A root and an intermediate signed by it, as an operator's `cacerts` holds them.
struct CaPair {
    root_pem: String,
    inter_pem: String,
    inter_key_pem: String,
}

fn make_ca(name: &str) -> CaPair {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut rp = CertificateParams::default();
    rp.distinguished_name.push(DnType::OrganizationName, "Example Org");
    rp.distinguished_name
        .push(DnType::CommonName, format!("Root CA {name}"));
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = rp.self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ip = CertificateParams::default();
    ip.distinguished_name.push(DnType::OrganizationName, "Example Org");
    ip.distinguished_name
        .push(DnType::CommonName, format!("Intermediate CA {name}"));
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ip.use_authority_key_identifier_extension = true;
    let inter = ip.signed_by(&int_key, &Issuer::new(rp, root_key)).unwrap();
    CaPair {
        root_pem: root.pem(),
        inter_pem: inter.pem(),
        inter_key_pem: int_key.serialize_pem(),
    }
}

const CA_FILES: [&str; 4] = ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"];

/// Writes a `cacerts` version the way the kubelet updates a mounted Secret: the files go into a
/// new directory and the `..data` symlink is swapped atomically, so the four files change at once.
fn publish_cacerts(dir: &Path, version: &str, ca: &CaPair, roots: &[&str]) {
    let v = dir.join(format!("..{version}"));
    std::fs::create_dir(&v).unwrap();
    let contents = [
        ca.inter_pem.clone(),
        ca.inter_key_pem.clone(),
        ca.inter_pem.clone(),
        roots.concat(),
    ];
    for (f, c) in CA_FILES.iter().zip(contents) {
        std::fs::write(v.join(f), c).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&v, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for f in CA_FILES {
        let link = dir.join(f);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(f), &link).unwrap();
        }
    }
}

fn ders(pem: &str) -> Vec<Vec<u8>> {
    meshd::pki::pem::parse_certs(pem.as_bytes())
        .unwrap()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect()
}

/// A workload certificate: (cert chain PEM without the root, key PEM, full answer).
async fn workload_cert(ch: Channel, token: Option<&str>) -> Result<(String, String, Vec<String>), tonic::Status> {
    let key = KeyType::EcdsaP256.generate().unwrap();
    let csr_pem = {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.serialize_request(&key).unwrap().pem().unwrap()
    };
    let chain = create(ch, token, None, csr_pem, 0).await?;
    Ok((chain[..chain.len() - 1].concat(), key.serialize_pem(), chain))
}

/// mTLS with a client certificate (no token), trusting `trust` for the server.
async fn renew_with_cert(
    t: &TestMeshd,
    trust: &str,
    client: &(String, String, Vec<String>),
) -> anyhow::Result<Vec<String>> {
    let ch = meshd::client::connect(
        &t.m().addrs.grpc.to_string(),
        SERVER_NAME,
        trust.as_bytes(),
        Some((client.0.clone().into_bytes(), client.1.clone().into_bytes())),
    )
    .await?;
    Ok(create(ch, None, None, csr(KeyType::EcdsaP256, None), 0).await?)
}

async fn server_verifies(t: &TestMeshd, trust: &str) -> bool {
    meshd::client::connect(&t.m().addrs.grpc.to_string(), SERVER_NAME, trust.as_bytes(), None)
        .await
        .is_ok()
}

/// Plugged CA with root A; the operator then publishes CA B with root-cert.pem = B + A, then
/// drops A. During the overlap: new leaves chain to B, the published bundle holds both roots, a
/// workload still holding its A-issued certificate renews over mTLS, and the serving
/// certificate is B's (verified with B alone or with the bundle; a client trusting only A can no
/// longer verify it, which is why the bundle must reach proxies first). After A is dropped, the
/// A-issued certificate is refused while B-issued ones still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_root_rotation_through_an_overlap_bundle() {
    let cadir = tempfile::tempdir().unwrap();
    let a = make_ca("A");
    let b = make_ca("B");
    publish_cacerts(cadir.path(), "v1", &a, &[&a.root_pem]);
    let t = TestMeshd::start_with(|args| {
        args.ca_dir = Some(cadir.path().to_path_buf());
        args.ca_reload_interval = Duration::from_millis(100);
    })
    .await;
    assert_eq!(t.root_pem(), a.root_pem.as_bytes());
    let token = t.token("default", "web");
    let old = workload_cert(t.channel().await, Some(&token)).await.unwrap();
    meshd::client::verify_response(&old.2, a.root_pem.as_bytes(), None).expect("issued by A");

    // Overlap: CA B signs, the bundle holds B and A.
    let bundle = format!("{}{}", b.root_pem, a.root_pem);
    publish_cacerts(cadir.path(), "v2", &b, &[&b.root_pem, &a.root_pem]);
    let root_file = t.m().root_cert_path();
    eventually("root-cert.pem holds B and A", WAIT, async || {
        std::fs::read_to_string(&root_file).unwrap_or_default() == bundle
    })
    .await;
    let published = ders(&std::fs::read_to_string(&root_file).unwrap());
    assert_eq!(published.len(), 2);
    assert!(published.contains(&ders(&a.root_pem)[0]) && published.contains(&ders(&b.root_pem)[0]));

    let new = workload_cert(t.channel().await, Some(&token)).await.unwrap();
    meshd::client::verify_response(&new.2, b.root_pem.as_bytes(), None).expect("new leaves chain to B");
    assert!(
        meshd::client::verify_response(&new.2, a.root_pem.as_bytes(), None).is_err(),
        "and not to A"
    );
    assert_eq!(new.2[1], b.inter_pem, "B's intermediate in the chain");
    assert_eq!(new.2.last().unwrap(), &bundle, "the answer carries the bundle");

    eventually("the serving certificate is B's", WAIT, async || {
        server_verifies(&t, &b.root_pem).await
    })
    .await;
    assert!(
        server_verifies(&t, &bundle).await,
        "a client trusting A+B verifies the server"
    );
    assert!(
        !server_verifies(&t, &a.root_pem).await,
        "a client trusting only A cannot"
    );

    // The workload still holding its A-issued certificate renews with it during the overlap.
    let renewed = renew_with_cert(&t, &bundle, &old)
        .await
        .expect("an A-issued client certificate is accepted during the overlap");
    meshd::client::verify_response(
        &renewed,
        b.root_pem.as_bytes(),
        Some(&meshd::pki::SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap()),
    )
    .expect("renewed under B for the same identity");

    // End of the overlap: A dropped from the bundle.
    publish_cacerts(cadir.path(), "v3", &b, &[&b.root_pem]);
    eventually("root-cert.pem holds only B", WAIT, async || {
        std::fs::read_to_string(&root_file).unwrap_or_default() == b.root_pem
    })
    .await;
    const TLS_ERRORS: &str = "meshd_tls_handshake_errors{listener=\"grpc-tls\",reason=\"error\"}";
    let tls_errors = t.metric(TLS_ERRORS);
    let mut refused = None;
    eventually("the A-issued certificate is refused", WAIT, async || {
        refused = renew_with_cert(&t, &b.root_pem, &old).await.err();
        refused.is_some()
    })
    .await;
    eventually("refused in the TLS handshake", WAIT, async || {
        t.metric(TLS_ERRORS) > tls_errors
    })
    .await;
    let refused = format!("{:#}", refused.unwrap());
    assert!(
        !refused.contains("Unauthenticated"),
        "refused by TLS, not by auth: {refused}"
    );
    let b_cert = workload_cert(t.channel().await, Some(&token)).await.unwrap();
    renew_with_cert(&t, &b.root_pem, &b_cert)
        .await
        .expect("a B-issued client certificate still works");
}

// ---------------------------------------------------------------------------------------------
// 6. Clock skew within the 2-minute backdate
// ---------------------------------------------------------------------------------------------

/// Whether every certificate of `chain_pem` is within its validity at `at` (what BoringSSL,
/// OpenSSL and Go check for each certificate of a path, the root included).
fn all_valid_at(chain_pem: &[String], at: SystemTime) -> Result<(), String> {
    let secs = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
    let t = x509_parser::time::ASN1Time::from_timestamp(secs).unwrap();
    for pem in chain_pem {
        for der in meshd::pki::pem::parse_certs(pem.as_bytes()).unwrap() {
            let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
            if !c.validity().is_valid_at(t) {
                return Err(format!(
                    "{} is valid from {} to {}",
                    c.subject(),
                    c.validity().not_before,
                    c.validity().not_after
                ));
            }
        }
    }
    Ok(())
}

fn verify_at(chain: &[String], root_pem: &[u8], at: SystemTime) -> Result<(), rustls::Error> {
    use rustls::server::danger::ClientCertVerifier;
    let leaf = meshd::pki::pem::parse_certs(chain[0].as_bytes()).unwrap().remove(0);
    let roots = meshd::pki::pem::parse_certs(root_pem).unwrap();
    let v = meshd::tls::client_verifier::MeshClientVerifier::new(&roots).unwrap();
    let at = rustls_pki_types::UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap());
    v.verify_client_cert(&leaf, &[], at).map(|_| ())
}

/// Leaves are backdated 2 minutes (istiod's ClockSkewGracePeriod), so a peer whose clock is
/// 100 s behind accepts a certificate issued this instant, by a mesh that was created this
/// instant (the self-signed root too). Tokens: `nbf` up to the 30 s leeway ahead is accepted, so
/// is `exp` up to 30 s ago; 10 minutes ahead is UNAUTHENTICATED saying why.
#[tokio::test]
async fn clock_skew_within_the_backdate_is_tolerated() {
    // A fresh data dir: the self-signed root is created now.
    let t = TestMeshd::start().await;
    let root = t.root_pem();
    let ch = t.channel().await;
    let chain = create(
        ch.clone(),
        Some(&t.token("default", "web")),
        None,
        csr(KeyType::EcdsaP256, None),
        0,
    )
    .await
    .unwrap();
    let now = SystemTime::now();
    let nb = leaf_facts(&chain).not_before;
    assert!(nb <= now - Duration::from_secs(119), "NotBefore {nb:?} is now - 2 min");
    assert!(nb >= now - Duration::from_secs(125), "NotBefore {nb:?} is now - 2 min");

    let behind = now - Duration::from_secs(100);
    verify_at(&chain, &root, behind).expect("a verifier 100 s behind accepts the leaf");
    all_valid_at(&chain, behind).expect("every certificate of the chain, the root included, is valid 100 s ago");
    let err = verify_at(&chain, &root, now - Duration::from_secs(130)).unwrap_err();
    assert!(format!("{err:?}").contains("NotValidYet"), "{err:?}");
    // The serving certificate is backdated the same way.
    let serving = {
        let mut roots = rustls::RootCertStore::empty();
        for c in meshd::pki::pem::parse_certs(&root).unwrap() {
            roots.add(c).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(meshd::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(t.m().addrs.grpc).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from(SERVER_NAME).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        let certs = tls.get_ref().1.peer_certificates().unwrap().to_vec();
        certs
            .iter()
            .map(|c| meshd::pki::pem::cert_to_pem(c.as_ref()))
            .collect::<Vec<_>>()
    };
    let mut served_with_root = serving.clone();
    served_with_root.push(String::from_utf8(root.clone()).unwrap());
    all_valid_at(&served_with_root, behind).expect("the serving chain is valid for a client 100 s behind");

    // Tokens.
    let data = t.data_dir();
    let mint_at = |at: SystemTime, ttl: u64| mint(&data, "default", "web", &[AUDIENCE], Duration::from_secs(ttl), at);
    let ahead_25s = mint_at(SystemTime::now() + Duration::from_secs(25), 3600);
    create(ch.clone(), Some(&ahead_25s), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .expect("iat/nbf 25 s ahead is within the 30 s leeway");
    let expired_10s = mint_at(SystemTime::now() - Duration::from_secs(610), 600);
    create(ch.clone(), Some(&expired_10s), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .expect("exp 10 s ago is within the 30 s leeway");
    let ahead_10m = mint_at(SystemTime::now() + Duration::from_secs(600), 3600);
    let err = create(ch.clone(), Some(&ahead_10m), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("not valid for another"), "{}", err.message());
    assert!(err.message().contains("(nbf)"), "{}", err.message());
    let expired_2m = mint_at(SystemTime::now() - Duration::from_secs(720), 600);
    let err = create(ch.clone(), Some(&expired_2m), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "{}", err.message());
}
