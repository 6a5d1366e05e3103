//! The service model's sources end to end: meshd in Kubernetes mode against a fake primary
//! (cluster1 on 127.0.0.2) and a fake remote (cluster2 on 127.0.0.3) attached by a remote secret,
//! and the `--config-dir` file source. Everything is asserted through `meshd.mesh` snapshots with
//! polling deadlines.
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use common::*;
use meshd::registry::{Endpoint, MeshStore};
use meshd::testing::fake_apiserver::{FakeApiServer, FakeConfig, ResourceType, Rule};
use serde_json::{Value, json};

const HOST: &str = "echo.default.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(20);

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

async fn mesh() -> Mesh {
    let primary = fake("127.0.0.2", "cluster1").await;
    let remote = fake("127.0.0.3", "cluster2").await;
    primary.ensure_namespace("istio-system").unwrap();
    remote.ensure_namespace("istio-system").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("primary.kubeconfig");
    std::fs::write(&kubeconfig, primary.kubeconfig(primary.admin_token())).unwrap();
    let meshd = TestMeshd::start_with(|a| {
        a.standalone = false;
        a.kubeconfig = Some(kubeconfig.clone());
        a.cluster_id = "cluster1".into();
        a.network = "default-net".into();
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

impl Mesh {
    fn store(&self) -> Arc<MeshStore> {
        Arc::clone(&self.meshd.m().mesh)
    }

    async fn attach_cluster2(&self) {
        let reader = self.remote.reader_token("istio-reader-service-account").unwrap();
        self.primary
            .apply(remote_secret("cluster2", &self.remote.kubeconfig(&reader)))
            .unwrap();
        let clusters = Arc::clone(&self.meshd.m().clusters);
        eventually("cluster2 registered", WAIT, async || {
            clusters.remote("cluster2").is_some()
        })
        .await;
    }
}

/// One pod of `echo`: (name, ip, version).
type PodSpec<'a> = (&'a str, &'a str, &'a str);

fn apply(api: &FakeApiServer, obj: Value) {
    api.apply(obj).unwrap_or_else(|e| panic!("apply: {e}"));
}

fn pod(api: &FakeApiServer, node: &str, (name, ip, version): PodSpec<'_>) {
    apply(
        api,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "echo", "version": version}},
            "spec": {"serviceAccountName": "echo", "nodeName": node, "containers": [{"name": "echo", "image": "echo"}]},
            "status": {"podIP": ip, "phase": "Running"},
        }),
    );
}

fn service(api: &FakeApiServer, name: &str) {
    apply(
        api,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }),
    );
}

fn slice(api: &FakeApiServer, name: &str, node: &str, pods: &[PodSpec<'_>]) {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(p, ip, _)| {
            json!({
                "addresses": [ip], "conditions": {"ready": true}, "nodeName": node,
                "targetRef": {"kind": "Pod", "name": p, "namespace": "default"},
            })
        })
        .collect();
    apply(
        api,
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": "echo"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        }),
    );
}

/// A cluster with its network (label on istio-system), one node, the echo Service, pods and
/// one EndpointSlice for them.
fn seed(api: &FakeApiServer, cluster: &str, network: Option<&str>, region: &str, pods: &[PodSpec<'_>]) {
    let labels = match network {
        Some(n) => json!({"topology.istio.io/network": n}),
        None => json!({}),
    };
    apply(
        api,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system", "labels": labels}}),
    );
    let node = format!("node-{cluster}");
    apply(
        api,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": {
            "topology.kubernetes.io/region": region,
            "topology.kubernetes.io/zone": format!("{region}-a"),
            "topology.istio.io/subzone": "rack1",
        }}}),
    );
    for p in pods {
        pod(api, &node, *p);
    }
    service(api, "echo");
    slice(api, &format!("echo-{cluster}"), &node, pods);
}

fn endpoints(store: &MeshStore) -> Vec<Endpoint> {
    store.snapshot().endpoints(HOST).to_vec()
}

fn addresses(eps: &[Endpoint]) -> BTreeSet<String> {
    eps.iter().map(|e| e.address.to_string()).collect()
}

/// Every endpoint joined with its Pod and Node (they arrive on other watches than the slices).
fn complete(eps: &[Endpoint]) -> bool {
    eps.iter()
        .all(|e| e.labels.contains_key("version") && e.service_account.is_some() && !e.locality.region.is_empty())
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn services_and_endpoints_of_two_clusters_merge_into_one_host() {
    let m = mesh().await;
    seed(
        &m.primary,
        "cluster1",
        Some("network1"),
        "us-east1",
        &[("echo-v1-a", "10.1.0.1", "v1"), ("echo-v2-a", "10.1.0.2", "v2")],
    );
    m.attach_cluster2().await;
    seed(
        &m.remote,
        "cluster2",
        None,
        "us-west1",
        &[("echo-v1-b", "10.2.0.1", "v1")],
    );

    let store = m.store();
    eventually("endpoints of both clusters, complete", WAIT, async || {
        let eps = endpoints(&store);
        eps.len() == 3
            && complete(&eps)
            && eps
                .iter()
                .all(|e| e.cluster_id != "cluster1" || e.network == "network1")
    })
    .await;
    let eps = endpoints(&store);
    assert_eq!(addresses(&eps), set(&["10.1.0.1", "10.1.0.2", "10.2.0.1"]));
    for e in &eps {
        let (cluster, network, region) = if e.address.to_string().starts_with("10.1.") {
            ("cluster1", "network1", "us-east1")
        } else {
            // cluster2's istio-system has no network label and --network names the primary's
            // default only (cluster1's label wins there): no network.
            ("cluster2", "", "us-west1")
        };
        assert_eq!(e.cluster_id, cluster, "{e:?}");
        assert_eq!(e.network, network, "{e:?}");
        assert_eq!(e.locality.region, region, "{e:?}");
        assert_eq!(e.locality.zone, format!("{region}-a"));
        assert_eq!(e.locality.subzone, "rack1");
        assert_eq!(e.port, 8080);
        assert_eq!(e.service_port_name, "http");
        assert_eq!(
            e.service_account.as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/echo")
        );
        assert!(e.pod_name.as_deref().is_some_and(|p| p.starts_with("echo-v")));
        assert_eq!(e.labels.get("app").map(String::as_str), Some("echo"));
    }
    let v2 = eps.iter().find(|e| e.address.to_string() == "10.1.0.2").unwrap();
    assert_eq!(v2.labels.get("version").map(String::as_str), Some("v2"));
    let snap = store.snapshot();
    let svc = snap.service(HOST).expect("the service");
    assert_eq!(svc.ports.len(), 1);
    assert_eq!(svc.ports[0].port, 80);
    assert!(svc.ports[0].protocol.is_http());
    assert_eq!(
        svc.cluster_ips.keys().cloned().collect::<BTreeSet<_>>(),
        set(&["cluster1", "cluster2"]),
        "the Service of each cluster is merged into one host"
    );
    for c in m.meshd.m().clusters.all() {
        assert!(c.is_synced(), "{} synced", c.id);
    }

    // The debug endpoint shows the same.
    let dump = http_get_json(&format!("http://{}/debug/registryz", m.meshd.m().addrs.monitoring)).await;
    let echo = dump["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["hostname"] == HOST))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(echo["endpoints"].as_array().map(Vec::len), Some(3), "{dump}");
    assert_eq!(echo["ports"][0]["protocol"], "HTTP");

    // A label change on a pod updates the endpoints that reference it.
    pod(&m.remote, "node-cluster2", ("echo-v1-b", "10.2.0.1", "v3"));
    eventually("the pod's new label on its endpoint", WAIT, async || {
        endpoints(&store)
            .iter()
            .any(|e| e.cluster_id == "cluster2" && e.labels.get("version").map(String::as_str) == Some("v3"))
    })
    .await;

    // Removing the remote secret removes cluster2's endpoints and its copy of the Service.
    m.primary
        .delete(
            &ResourceType::core("secrets"),
            "istio-system",
            "istio-remote-secret-cluster2",
        )
        .unwrap();
    eventually("cluster2's endpoints gone", WAIT, async || {
        let eps = endpoints(&store);
        eps.len() == 2 && eps.iter().all(|e| e.cluster_id == "cluster1")
    })
    .await;
    let snap = store.snapshot();
    assert_eq!(
        snap.service(HOST)
            .unwrap()
            .cluster_ips
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>(),
        set(&["cluster1"])
    );
}

#[tokio::test]
async fn scaling_is_an_endpoint_only_change_and_a_new_service_a_full_one() {
    let m = mesh().await;
    let mut pods = vec![("echo-1", "10.1.0.1", "v1")];
    seed(&m.primary, "cluster1", None, "us-east1", &pods);
    let store = m.store();
    eventually("one complete endpoint", WAIT, async || {
        let eps = endpoints(&store);
        eps.len() == 1 && complete(&eps)
    })
    .await;
    let before = store.change_counts();

    // Scale to three pods of the same identity.
    pods.push(("echo-2", "10.1.0.2", "v1"));
    pods.push(("echo-3", "10.1.0.3", "v1"));
    for p in &pods[1..] {
        pod(&m.primary, "node-cluster1", *p);
    }
    slice(&m.primary, "echo-cluster1", "node-cluster1", &pods);
    eventually("three complete endpoints", WAIT, async || {
        let eps = endpoints(&store);
        eps.len() == 3 && complete(&eps)
    })
    .await;
    let scaled = store.change_counts();
    assert_eq!(
        scaled.full, before.full,
        "scaling is not a full push: {before:?} → {scaled:?}"
    );
    assert!(scaled.endpoints_only > before.endpoints_only, "{before:?} → {scaled:?}");

    // A new Service is a full change.
    service(&m.primary, "other");
    eventually("the new service", WAIT, async || {
        store.snapshot().service("other.default.svc.cluster.local").is_some()
    })
    .await;
    let added = store.change_counts();
    assert!(added.full > scaled.full, "{scaled:?} → {added:?}");

    // Scaling down to nothing and deleting the Service.
    m.primary
        .delete(
            &ResourceType::new("discovery.k8s.io", "v1", "endpointslices"),
            "default",
            "echo-cluster1",
        )
        .unwrap();
    m.primary
        .delete(&ResourceType::core("services"), "default", "other")
        .unwrap();
    eventually("endpoints and the other service gone", WAIT, async || {
        let snap = store.snapshot();
        snap.endpoints(HOST).is_empty() && snap.service("other.default.svc.cluster.local").is_none()
    })
    .await;
}

#[tokio::test]
async fn a_410_relist_never_drops_endpoints_and_ends_correct() {
    let m = mesh().await;
    let pods = [
        ("echo-1", "10.1.0.1", "v1"),
        ("echo-2", "10.1.0.2", "v1"),
        ("echo-3", "10.1.0.3", "v1"),
    ];
    seed(&m.primary, "cluster1", Some("network1"), "us-east1", &pods);
    let store = m.store();
    eventually("three complete endpoints", WAIT, async || {
        let eps = endpoints(&store);
        eps.len() == 3 && complete(&eps) && eps.iter().all(|e| e.network == "network1")
    })
    .await;

    // Watch the snapshot continuously while the watches relist.
    let stop = Arc::new(AtomicBool::new(false));
    let min_seen = Arc::new(AtomicUsize::new(usize::MAX));
    let observations = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (store, stop, min_seen, observations) = (
            Arc::clone(&store),
            Arc::clone(&stop),
            Arc::clone(&min_seen),
            Arc::clone(&observations),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = endpoints(&store).len();
                min_seen.fetch_min(n, Ordering::Relaxed);
                observations.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };

    let kinds = ["services", "endpointslices", "pods", "nodes", "namespaces"];
    let lists_before: Vec<u64> = kinds.iter().map(|k| m.primary.request_count("list", k)).collect();
    // Move the store past every watcher's resourceVersion with an object none of them watches,
    // compact, and end every watch: each one comes back with a too-old resourceVersion, gets
    // 410 Gone and relists.
    apply(
        &m.primary,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bump", "namespace": "default"}}),
    );
    // Slow lists: the relist takes a while, so a gap in the endpoints could not be missed.
    m.primary.set_latency(Duration::from_millis(150));
    m.primary.compact();
    m.primary.drop_watches();
    // While relisting: echo-3 is replaced by echo-4 and echo-5.
    let after = [
        pods[0],
        pods[1],
        ("echo-4", "10.1.0.4", "v1"),
        ("echo-5", "10.1.0.5", "v1"),
    ];
    for p in &after[2..] {
        pod(&m.primary, "node-cluster1", *p);
    }
    slice(&m.primary, "echo-cluster1", "node-cluster1", &after);
    m.primary
        .delete(&ResourceType::core("pods"), "default", "echo-3")
        .unwrap();

    eventually("every kind relisted", WAIT, async || {
        kinds
            .iter()
            .zip(&lists_before)
            .all(|(k, before)| m.primary.request_count("list", k) > *before)
    })
    .await;
    m.primary.set_latency(Duration::ZERO);
    // Pods and slices relist independently: wait for both.
    eventually("the relisted endpoints, with their pods", WAIT, async || {
        let eps = endpoints(&store);
        addresses(&eps) == set(&["10.1.0.1", "10.1.0.2", "10.1.0.4", "10.1.0.5"]) && complete(&eps)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    assert!(
        observations.load(Ordering::Relaxed) > 10,
        "the snapshot was observed during the relist"
    );
    assert!(
        min_seen.load(Ordering::Relaxed) >= 3,
        "endpoints dropped to {} during the relist",
        min_seen.load(Ordering::Relaxed)
    );
    let eps = endpoints(&store);
    assert!(
        eps.iter()
            .all(|e| e.network == "network1" && e.locality.region == "us-east1")
    );
    assert!(eps.iter().all(|e| e.pod_name.is_some()));
}

fn config(kind: &str, name: &str, namespace: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "networking.istio.io/v1", "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

#[tokio::test]
async fn istio_config_is_read_from_the_primary_only() {
    let m = mesh().await;
    m.attach_cluster2().await;
    let vs = |host: &str| json!({"hosts": [host], "http": [{"route": [{"destination": {"host": HOST}}]}]});
    // Applied to the remote: must never be used.
    apply(
        &m.remote,
        config("VirtualService", "remote-only", "default", vs("remote.example.com")),
    );
    apply(
        &m.primary,
        config(
            "Gateway",
            "ingress",
            "istio-system",
            json!({"selector": {"istio": "ingressgateway"}, "servers": [{"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}),
        ),
    );
    apply(
        &m.primary,
        config("VirtualService", "echo", "default", vs("echo.example.com")),
    );
    apply(
        &m.primary,
        config(
            "DestinationRule",
            "echo",
            "default",
            json!({"host": HOST, "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}),
        ),
    );
    let store = m.store();
    let readiness = Arc::clone(&m.meshd.m().readiness);
    eventually("ready once the primary is listed", WAIT, async || {
        let pending = readiness.pending();
        !pending.iter().any(|p| p == "kube-registry" || p == "istio-config")
    })
    .await;
    eventually("the primary's config", WAIT, async || {
        let c = store.snapshot().config.clone();
        c.gateways.len() == 1 && c.virtual_services.len() == 1 && c.destination_rules.len() == 1
    })
    .await;
    let c = store.snapshot().config.clone();
    assert_eq!(c.gateways[0].spec.servers[0].port.number, 8080);
    assert_eq!(
        c.gateways[0].spec.selector.get("istio").map(String::as_str),
        Some("ingressgateway")
    );
    assert_eq!(c.virtual_services[0].meta.name, "echo");
    assert_eq!(c.destination_rules[0].spec.subsets[0].name, "v1");

    // A barrier: once a later primary change is visible, the remote's VirtualService (applied
    // before everything else) would have been too, had it been read.
    apply(
        &m.remote,
        config("VirtualService", "remote-late", "default", vs("late.example.com")),
    );
    apply(
        &m.primary,
        config("VirtualService", "marker", "default", vs("marker.example.com")),
    );
    eventually("the marker", WAIT, async || {
        store.snapshot().config.virtual_services.len() == 2
    })
    .await;
    let names: BTreeSet<String> = store
        .snapshot()
        .config
        .virtual_services
        .iter()
        .map(|v| v.meta.name.clone())
        .collect();
    assert_eq!(names, set(&["echo", "marker"]), "the remote's config is ignored");

    // Deleting config in the primary removes it.
    m.primary
        .delete(
            &ResourceType::new("networking.istio.io", "v1", "virtualservices"),
            "default",
            "marker",
        )
        .unwrap();
    eventually("the marker deleted", WAIT, async || {
        store.snapshot().config.virtual_services.len() == 1
    })
    .await;
}

fn copy_example(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config-dir");
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn rewrite(path: &Path, f: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    let new = f(text.clone());
    assert_ne!(text, new, "the edit changes {}", path.display());
    // Write-then-rename, so a poll never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, new).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn the_config_dir_example_loads_follows_edits_and_survives_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    copy_example(dir.path());
    let t = TestMeshd::start_with(|a| {
        a.config_dir = Some(dir.path().to_path_buf());
        a.config_dir_poll = Duration::from_millis(50);
        a.cluster_id = "cluster1".into();
    })
    .await;
    let store = Arc::clone(&t.m().mesh);

    // Loaded before start returns.
    let snap = store.snapshot();
    let eps = snap.endpoints(HOST);
    assert_eq!(addresses(eps), set(&["127.0.0.10", "127.0.0.11", "127.0.0.20"]));
    for e in eps {
        let (cluster, network, region) = if e.address.to_string() == "127.0.0.20" {
            ("cluster2", "network2", "us-west1")
        } else {
            ("cluster1", "network1", "us-east1")
        };
        assert_eq!((e.cluster_id.as_str(), e.network.as_str()), (cluster, network), "{e:?}");
        assert_eq!(e.locality.region, region);
        assert_eq!(e.port, 8080);
        assert!(e.labels.contains_key("version"));
    }
    let svc = snap.service(HOST).unwrap();
    assert_eq!((svc.ports[0].name.as_str(), svc.ports[0].port), ("http", 80));
    assert_eq!(svc.cluster_ips.len(), 2);
    let c = &snap.config;
    assert_eq!(
        (c.gateways.len(), c.virtual_services.len(), c.destination_rules.len()),
        (1, 1, 1)
    );
    assert_eq!(c.gateways[0].meta.namespace, "istio-system");
    assert_eq!(c.gateways[0].spec.servers[0].port.protocol, "HTTP");
    let http = &c.virtual_services[0].spec.http;
    assert_eq!(http[0].matches[0].uri.as_ref().unwrap().prefix.as_deref(), Some("/v1"));
    assert_eq!(http[0].route[0].destination.subset.as_deref(), Some("v1"));
    let weights: Vec<Option<u32>> = http[1].route.iter().map(|r| r.weight).collect();
    assert_eq!(weights, vec![Some(80), Some(20)]);
    let subsets: Vec<&str> = c.destination_rules[0]
        .spec
        .subsets
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(subsets, vec!["v1", "v2"]);

    // An edit is picked up: a second endpoint in cluster2, an endpoint-only change.
    let before = store.change_counts();
    let cluster2 = dir.path().join("cluster2.yaml");
    rewrite(&cluster2, |s| {
        s.replace(
            "- addresses: [127.0.0.20]",
            "- addresses: [127.0.0.21]\n  conditions: {ready: true}\n- addresses: [127.0.0.20]",
        )
    });
    eventually("the edited slice", WAIT, async || endpoints(&store).len() == 4).await;
    let after = store.change_counts();
    assert_eq!(after.full, before.full, "{before:?} → {after:?}");
    assert!(after.endpoints_only > before.endpoints_only);

    // A broken file keeps its last good content, while other files still apply.
    let good = std::fs::read_to_string(&cluster2).unwrap();
    rewrite(&cluster2, |s| format!("{s}\n---\nkind: [unclosed\n"));
    let istio = dir.path().join("istio-config.yaml");
    rewrite(&istio, |s| s.replace("weight: 20", "weight: 21"));
    let weight = |store: &MeshStore| store.snapshot().config.virtual_services[0].spec.http[1].route[1].weight;
    eventually("the config edit", WAIT, async || weight(&store) == Some(21)).await;
    // A second round after the first was seen: the broken file has certainly been read by now.
    rewrite(&istio, |s| s.replace("weight: 21", "weight: 22"));
    eventually("the second config edit", WAIT, async || weight(&store) == Some(22)).await;
    assert_eq!(endpoints(&store).len(), 4, "cluster2's last good content is kept");
    assert_eq!(store.snapshot().config.destination_rules.len(), 1);

    // Fixed: applied again.
    rewrite(&cluster2, |_| {
        good.replace("- addresses: [127.0.0.21]", "- addresses: [127.0.0.22]")
    });
    eventually("the fixed file", WAIT, async || {
        addresses(&endpoints(&store)) == set(&["127.0.0.10", "127.0.0.11", "127.0.0.20", "127.0.0.22"])
    })
    .await;

    // Removing a cluster's only file removes that cluster.
    std::fs::remove_file(&cluster2).unwrap();
    rewrite(&dir.path().join("echo-service.yaml"), |s| {
        let (cluster1_only, _) = s.split_once("---").unwrap();
        cluster1_only.to_string()
    });
    eventually("cluster2 gone", WAIT, async || {
        let snap = store.snapshot();
        snap.endpoints(HOST).iter().all(|e| e.cluster_id == "cluster1")
            && snap.service(HOST).is_some_and(|s| s.cluster_ips.len() == 1)
    })
    .await;
}

async fn http_get_json(url: &str) -> Value {
    let url: http::Uri = url.parse().unwrap();
    let Ok(tcp) = tokio::net::TcpStream::connect(format!("{}:{}", url.host().unwrap(), url.port_u16().unwrap())).await
    else {
        return Value::Null;
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(url.path())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_remote_that_may_not_read_nodes_still_serves_its_endpoints() {
    let m = mesh().await;
    seed(
        &m.remote,
        "cluster2",
        Some("network2"),
        "us-west1",
        &[("echo-v1-b", "10.2.0.1", "v1")],
    );
    // Credentials that can read services, slices, pods and namespaces, but not nodes.
    m.remote.add_static_token("limited-token", "limited-reader", &[]);
    let read = &["get", "list", "watch"];
    m.remote.grant(
        "limited-reader",
        vec![
            Rule::new(read, &[""], &["services", "pods", "namespaces"]),
            Rule::new(read, &["discovery.k8s.io"], &["endpointslices"]),
        ],
    );
    m.primary
        .apply(remote_secret("cluster2", &m.remote.kubeconfig("limited-token")))
        .unwrap();
    let store = m.store();
    eventually("cluster2's endpoint, without locality", WAIT, async || {
        let eps = endpoints(&store);
        eps.len() == 1 && eps[0].labels.contains_key("version") && eps[0].network == "network2"
    })
    .await;
    let eps = endpoints(&store);
    assert_eq!(eps[0].cluster_id, "cluster2");
    assert_eq!(eps[0].locality.region, "", "nodes are not readable");
    let cluster2 = m.meshd.m().clusters.remote("cluster2").unwrap();
    assert!(cluster2.is_synced());

    // Allowed later: the retrying watch fills in the locality.
    m.remote
        .grant("limited-reader", vec![Rule::new(read, &[""], &["nodes"])]);
    eventually(
        "the locality once nodes are readable",
        Duration::from_secs(60),
        async || {
            endpoints(&store)
                .first()
                .is_some_and(|e| e.locality.region == "us-west1")
        },
    )
    .await;
}

fn istio_configmap(mesh_networks: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system"},
        "data": {"mesh": "trustDomain: cluster.local\n", "meshNetworks": mesh_networks},
    })
}

/// meshNetworks from the primary's `istio` ConfigMap: applied, hot-reloaded, a broken update
/// keeps the last good networks (and says so in /debug/networkz), deleting it clears them.
#[tokio::test]
async fn mesh_networks_follow_the_istio_configmap() {
    let m = mesh().await;
    let store = m.store();
    let gateways = |store: &MeshStore| {
        store
            .snapshot()
            .networks
            .gateways
            .iter()
            .map(|g| format!("{}/{}", g.network, g.addr))
            .collect::<Vec<_>>()
    };
    let networks = |addr: &str| {
        format!(
            "networks:\n  vm:\n    endpoints: [{{fromCidr: 10.9.0.0/16}}]\n    gateways: [{{address: {addr}, port: 15443}}]\n"
        )
    };
    m.primary.apply(istio_configmap(&networks("203.0.113.7"))).unwrap();
    eventually("the ConfigMap's gateway", WAIT, async || {
        gateways(&store) == ["vm/203.0.113.7"]
    })
    .await;
    m.primary.apply(istio_configmap(&networks("203.0.113.8"))).unwrap();
    eventually("the edit", WAIT, async || gateways(&store) == ["vm/203.0.113.8"]).await;

    m.primary
        .apply(istio_configmap(
            "networks: {vm: {gateways: [{address: 1.2.3.4, port: 1}]}}",
        ))
        .unwrap();
    let url = m.meshd.m().addrs.monitoring;
    let mut body = String::new();
    eventually("the refusal in networkz", WAIT, async || {
        body = http_get(url, "/debug/networkz", &[]).await.1;
        body.contains("at least one endpoint")
    })
    .await;
    assert!(body.contains("ConfigMap istio-system/istio"), "{body}");
    assert_eq!(gateways(&store), ["vm/203.0.113.8"], "the last good networks stay");
    assert!(m.meshd.metric("meshd_mesh_config_errors") >= 1.0);

    m.primary
        .delete(&ResourceType::core("configmaps"), "istio-system", "istio");
    eventually("deleting the ConfigMap clears meshNetworks", WAIT, async || {
        gateways(&store).is_empty()
    })
    .await;
}
