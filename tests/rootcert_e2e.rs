//! istio-ca-root-cert distribution end to end: real meshd processes (in-process) against fake
//! Kubernetes API servers speaking the real wire protocol. cluster1 (primary) is on 127.0.0.2,
//! cluster2 (remote) on 127.0.0.3.
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, PostParams};
use meshd::testing::fake_apiserver::{FakeApiServer, FakeConfig};
use serde_json::json;

const CM: &str = "istio-ca-root-cert";
const LEASE: &str = "istio-namespace-controller-election";
const WAIT: Duration = Duration::from_secs(20);

async fn fake(ip: &str, name: &str) -> FakeApiServer {
    let s = FakeApiServer::start(FakeConfig::new(format!("{ip}:0").parse().unwrap(), name))
        .await
        .expect("fake apiserver starts");
    for ns in ["istio-system", "local-path-storage"] {
        s.ensure_namespace(ns).unwrap();
    }
    s
}

fn write_kubeconfig(dir: &Path, file: &str, server: &FakeApiServer, token: &str) -> std::path::PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, server.kubeconfig(token)).unwrap();
    p
}

/// meshd in Kubernetes mode against `primary`, cluster id cluster1, 2 s leases.
async fn meshd_on(primary: &FakeApiServer, tweak: impl FnOnce(&mut meshd::config::ServeArgs)) -> TestMeshd {
    let kdir = tempfile::tempdir().unwrap();
    let kc = write_kubeconfig(kdir.path(), "primary.yaml", primary, primary.admin_token());
    let t = TestMeshd::start_with(|a| {
        a.standalone = false;
        a.kubeconfig = Some(kc.clone());
        a.cluster_id = "cluster1".into();
        a.leader_election_lease_duration = Duration::from_secs(2);
        tweak(a);
    })
    .await;
    // the kubeconfig was read at start
    drop(kdir);
    t
}

/// Registers `remote` with meshd through a remote secret in the primary (reader token).
fn add_remote_secret(primary: &FakeApiServer, remote: &FakeApiServer, id: &str) {
    let token = remote.reader_token("istio-reader-service-account").unwrap();
    primary
        .apply(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": format!("istio-remote-secret-{id}"),
                "namespace": "istio-system",
                "labels": {"istio/multiCluster": "true"},
            },
            "stringData": {id: remote.kubeconfig(&token)},
        }))
        .unwrap();
}

fn annotate_control_plane(cluster: &FakeApiServer, value: Option<&str>) {
    let rt = meshd::testing::fake_apiserver::ResourceType::core("namespaces");
    cluster
        .modify(&rt, "", "istio-system", |ns| {
            let ann = ns
                .pointer_mut("/metadata")
                .and_then(|m| m.as_object_mut())
                .map(|m| m.entry("annotations").or_insert_with(|| json!({})))
                .and_then(|a| a.as_object_mut())
                .unwrap();
            match value {
                Some(v) => {
                    ann.insert("topology.istio.io/controlPlaneClusters".into(), json!(v));
                }
                None => {
                    ann.remove("topology.istio.io/controlPlaneClusters");
                }
            }
        })
        .unwrap();
}

fn cm(cluster: &FakeApiServer, ns: &str) -> Option<ConfigMap> {
    cluster.get_typed::<ConfigMap>(ns, CM)
}

fn root_of(c: &ConfigMap) -> Option<String> {
    c.data.as_ref().and_then(|d| d.get("root-cert.pem")).cloned()
}

fn is_good(c: &ConfigMap, root: &str) -> bool {
    root_of(c).as_deref() == Some(root)
        && c.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("istio.io/config"))
            .is_some_and(|v| v == "true")
}

fn namespaces(cluster: &FakeApiServer) -> Vec<String> {
    cluster
        .list_typed::<Namespace>(None)
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect()
}

const EXCLUDED: [&str; 3] = ["kube-public", "kube-node-lease", "local-path-storage"];

/// Every eligible namespace holds the ConfigMap with `root`; excluded ones hold none.
fn all_good(cluster: &FakeApiServer, root: &str) -> bool {
    namespaces(cluster).iter().all(|ns| {
        let c = cm(cluster, ns);
        if EXCLUDED.contains(&ns.as_str()) {
            c.is_none()
        } else {
            c.is_some_and(|c| is_good(&c, root))
        }
    })
}

fn root_pem(t: &TestMeshd) -> String {
    String::from_utf8(t.root_pem()).unwrap()
}

fn lease_holder(cluster: &FakeApiServer) -> Option<String> {
    cluster
        .get_typed::<Lease>("istio-system", LEASE)
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

fn metric(t: &TestMeshd, name: &str, cluster: &str) -> f64 {
    t.metric(&format!("{name}{{cluster=\"{cluster}\"}}"))
}

fn writes(t: &TestMeshd, cluster: &str) -> f64 {
    let text = t.m().registry.encode();
    ["create", "update"]
        .iter()
        .map(|op| {
            metric_value(
                &text,
                &format!("meshd_root_cert_configmap_writes{{cluster=\"{cluster}\",op=\"{op}\"}}"),
            )
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_in_every_namespace_of_primary_and_annotated_remote_and_kept_correct() {
    let mut primary = fake("127.0.0.2", "cluster1").await;
    let mut remote = fake("127.0.0.3", "cluster2").await;
    primary.ensure_namespace("app1").unwrap();
    remote.ensure_namespace("app2").unwrap();
    // A ConfigMap of another name that must never be touched.
    let other = primary
        .apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "other", "namespace": "app1"}, "data": {"root-cert.pem": "not ours"}}))
        .unwrap();
    let other_rv = other["metadata"]["resourceVersion"].clone();

    let mut t = meshd_on(&primary, |_| {}).await;
    let root = root_pem(&t);
    eventually("istio-ca-root-cert in every primary namespace", WAIT, async || {
        all_good(&primary, &root)
    })
    .await;
    assert!(cm(&primary, "kube-system").is_some(), "kube-system is included");
    assert!(lease_holder(&primary).is_some(), "written under a lease in the primary");

    // The remote is registered but does not name us: nothing is written there.
    add_remote_secret(&primary, &remote, "cluster2");
    eventually("cluster2 registered", WAIT, async || {
        t.m().clusters.remote("cluster2").is_some()
    })
    .await;
    eventually("the remote's system namespace was read", WAIT, async || {
        remote.request_count("list", "namespaces") + remote.request_count("watch", "namespaces") > 0
    })
    .await;
    // Barrier: a full primary round trip (delete → recreate) after the remote was seen.
    let api: Api<ConfigMap> = Api::namespaced(primary.client(primary.admin_token()).await.unwrap(), "default");
    api.delete(CM, &DeleteParams::default()).await.unwrap();
    eventually("recreated in the primary", WAIT, async || {
        cm(&primary, "default").is_some()
    })
    .await;
    assert!(
        remote
            .list_typed::<ConfigMap>(None)
            .iter()
            .all(|c| c.metadata.name.as_deref() != Some(CM)),
        "nothing written to a remote that does not name this control plane"
    );
    assert_eq!(metric(&t, "meshd_root_cert_controlled_cluster", "cluster2"), 0.0);

    // Annotated: the remote gets the ConfigMap everywhere, under a lease in the remote.
    annotate_control_plane(&remote, Some("other-primary,cluster1"));
    eventually("istio-ca-root-cert in every remote namespace", WAIT, async || {
        all_good(&remote, &root)
    })
    .await;
    assert!(lease_holder(&remote).is_some());
    assert_eq!(metric(&t, "meshd_root_cert_controlled_cluster", "cluster2"), 1.0);

    // Deleted → recreated; data edited → repaired; label removed → repaired (other keys kept).
    for cluster in [&primary, &remote] {
        let client = cluster.client(cluster.admin_token()).await.unwrap();
        let ns = if std::ptr::eq(cluster, &primary) {
            "app1"
        } else {
            "app2"
        };
        let api: Api<ConfigMap> = Api::namespaced(client, ns);
        api.delete(CM, &DeleteParams::default()).await.unwrap();
        eventually("deleted ConfigMap recreated", WAIT, async || {
            cm(cluster, ns).is_some_and(|c| is_good(&c, &root))
        })
        .await;
        let mut c = api.get(CM).await.unwrap();
        c.data
            .as_mut()
            .unwrap()
            .insert("root-cert.pem".into(), "tampered".into());
        c.data.as_mut().unwrap().insert("extra".into(), "kept".into());
        api.replace(CM, &PostParams::default(), &c).await.unwrap();
        eventually("edited data repaired", WAIT, async || {
            cm(cluster, ns).is_some_and(|c| is_good(&c, &root))
        })
        .await;
        let mut c = api.get(CM).await.unwrap();
        assert_eq!(c.data.as_ref().unwrap().get("extra").map(String::as_str), Some("kept"));
        c.metadata.labels = Some(BTreeMap::from([("team".to_string(), "x".to_string())]));
        api.replace(CM, &PostParams::default(), &c).await.unwrap();
        eventually("removed label repaired", WAIT, async || {
            cm(cluster, ns).is_some_and(|c| is_good(&c, &root))
        })
        .await;
        let c = api.get(CM).await.unwrap();
        assert_eq!(
            c.metadata.labels.unwrap().get("team").map(String::as_str),
            Some("x"),
            "other labels kept"
        );
    }

    // Namespaces created later get it too (not the excluded ones).
    primary.ensure_namespace("late1").unwrap();
    remote.ensure_namespace("late2").unwrap();
    eventually("new primary namespace", WAIT, async || cm(&primary, "late1").is_some()).await;
    eventually("new remote namespace", WAIT, async || cm(&remote, "late2").is_some()).await;
    assert!(all_good(&primary, &root) && all_good(&remote, &root));

    // The annotation goes away: meshd stops writing there (and gives the remote lease back).
    annotate_control_plane(&remote, None);
    eventually("stopped controlling cluster2", WAIT, async || {
        metric(&t, "meshd_root_cert_controlled_cluster", "cluster2") == 0.0
            && metric(&t, "meshd_root_cert_leader", "cluster2") == 0.0
    })
    .await;
    eventually("remote lease released", WAIT, async || lease_holder(&remote).is_none()).await;
    let rapi: Api<ConfigMap> = Api::namespaced(remote.client(remote.admin_token()).await.unwrap(), "app2");
    rapi.delete(CM, &DeleteParams::default()).await.unwrap();
    api.delete(CM, &DeleteParams::default()).await.unwrap();
    eventually("primary still served", WAIT, async || cm(&primary, "default").is_some()).await;
    assert!(
        cm(&remote, "app2").is_none(),
        "no writes to a remote that stopped naming us"
    );

    let other_now = primary
        .get(
            &meshd::testing::fake_apiserver::ResourceType::core("configmaps"),
            "app1",
            "other",
        )
        .unwrap();
    assert_eq!(
        other_now["metadata"]["resourceVersion"], other_rv,
        "other ConfigMaps untouched"
    );
    assert_eq!(other_now["data"]["root-cert.pem"], "not ours");
    assert!(writes(&t, "cluster1") >= 6.0);

    t.stop().await;
    primary.stop().await;
    remote.stop().await;
}

/// A root and an intermediate, as an operator's `cacerts` would hold them.
fn plugged_ca(dir: &Path) -> String {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut rp = CertificateParams::default();
    rp.distinguished_name.push(DnType::CommonName, "Root CA");
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = rp.self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ip = CertificateParams::default();
    ip.distinguished_name.push(DnType::CommonName, "Intermediate CA");
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ip.use_authority_key_identifier_extension = true;
    let inter = ip.signed_by(&int_key, &Issuer::new(rp, root_key)).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), inter.pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), int_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), inter.pem()).unwrap();
    std::fs::write(dir.join("root-cert.pem"), root.pem()).unwrap();
    root.pem()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmaps_follow_a_root_change_in_both_clusters() {
    let mut primary = fake("127.0.0.2", "cluster1").await;
    let mut remote = fake("127.0.0.3", "cluster2").await;
    annotate_control_plane(&remote, Some("*"));
    let cadir = tempfile::tempdir().unwrap();
    let root1 = plugged_ca(cadir.path());
    let mut t = meshd_on(&primary, |a| {
        a.ca_dir = Some(cadir.path().to_path_buf());
        a.ca_reload_interval = Duration::from_millis(100);
    })
    .await;
    add_remote_secret(&primary, &remote, "cluster2");
    eventually("root1 everywhere", WAIT, async || {
        all_good(&primary, &root1) && all_good(&remote, &root1)
    })
    .await;

    let staging = tempfile::tempdir().unwrap();
    let root2 = plugged_ca(staging.path());
    assert_ne!(root1, root2);
    for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"] {
        std::fs::copy(staging.path().join(f), cadir.path().join(f)).unwrap();
    }
    eventually("root2 everywhere", WAIT, async || {
        all_good(&primary, &root2) && all_good(&remote, &root2)
    })
    .await;

    t.stop().await;
    primary.stop().await;
    remote.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_writes_and_the_survivor_takes_over() {
    let mut primary = fake("127.0.0.2", "cluster1").await;
    let a = meshd_on(&primary, |_| {}).await;
    let root = root_pem(&a);
    eventually("first replica wrote everywhere", WAIT, async || {
        all_good(&primary, &root)
    })
    .await;
    let b = meshd_on(&primary, |_| {}).await;
    assert_eq!(root_pem(&b), root, "both replicas share the CA in istio-ca-secret");
    let series = "meshd_root_cert_leader{cluster=\"cluster1\"}";
    eventually("both replicas are competing", WAIT, async || {
        a.m().registry.encode().contains(series)
            && b.m().registry.encode().contains(series)
            && metric(&a, "meshd_root_cert_leader", "cluster1") + metric(&b, "meshd_root_cert_leader", "cluster1")
                == 1.0
    })
    .await;
    let (mut leader, mut follower) = if metric(&a, "meshd_root_cert_leader", "cluster1") == 1.0 {
        (a, b)
    } else {
        (b, a)
    };
    let holder = lease_holder(&primary).expect("lease held");

    // A deletion is repaired by the holder only.
    let api: Api<ConfigMap> = Api::namespaced(primary.client(primary.admin_token()).await.unwrap(), "default");
    let before = writes(&leader, "cluster1");
    api.delete(CM, &DeleteParams::default()).await.unwrap();
    eventually("recreated by the holder", WAIT, async || {
        cm(&primary, "default").is_some()
    })
    .await;
    eventually("the holder counted it", WAIT, async || {
        writes(&leader, "cluster1") > before
    })
    .await;
    assert_eq!(writes(&follower, "cluster1"), 0.0, "the non-holder never writes");
    assert_eq!(lease_holder(&primary).as_deref(), Some(holder.as_str()));

    // The holder stops: the survivor takes the lease and repairs the next deletion.
    leader.stop().await;
    eventually("survivor leads", WAIT, async || {
        metric(&follower, "meshd_root_cert_leader", "cluster1") == 1.0
    })
    .await;
    let new_holder = lease_holder(&primary).expect("lease held again");
    assert_ne!(new_holder, holder);
    api.delete(CM, &DeleteParams::default()).await.unwrap();
    eventually("recreated by the survivor", WAIT, async || {
        cm(&primary, "default").is_some()
    })
    .await;
    assert!(writes(&follower, "cluster1") >= 1.0);
    assert!(all_good(&primary, &root));

    follower.stop().await;
    primary.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_with_only_remote_clusters_and_does_nothing_standalone() {
    let mut remote = fake("127.0.0.3", "cluster2").await;
    annotate_control_plane(&remote, Some("cluster1"));
    let dir = tempfile::tempdir().unwrap();
    let token = remote.reader_token("istio-reader-service-account").unwrap();
    write_kubeconfig(dir.path(), "cluster2", &remote, &token);
    let mut t = TestMeshd::start_with(|a| {
        a.cluster_id = "cluster1".into();
        a.remote_kubeconfig_dir = Some(dir.path().to_path_buf());
        a.remote_kubeconfig_poll = Duration::from_millis(100);
        a.leader_election_lease_duration = Duration::from_secs(2);
    })
    .await;
    assert!(t.m().clusters.local().is_none());
    let root = root_pem(&t);
    eventually("istio-ca-root-cert in every remote namespace", WAIT, async || {
        all_good(&remote, &root)
    })
    .await;
    t.stop().await;

    // Standalone without remotes: no cluster, no writer, no metrics series.
    let mut s = TestMeshd::start().await;
    assert!(s.m().clusters.all().is_empty());
    assert!(!s.m().registry.encode().contains("meshd_root_cert_leader{"));
    s.stop().await;
    remote.stop().await;
}

fn set_lease(cluster: &FakeApiServer, holder: &str, duration_secs: i32) {
    let now = k8s_openapi::jiff::Timestamp::now();
    cluster
        .apply(json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": LEASE, "namespace": "istio-system"},
            "spec": {
                "holderIdentity": holder,
                "acquireTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
                "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
                "leaseDurationSeconds": duration_secs,
            },
        }))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_and_a_lost_one_stops_the_writes() {
    let mut primary = fake("127.0.0.2", "cluster1").await;
    // A replica that crashed while holding the lease.
    set_lease(&primary, "crashed-replica", 2);
    let mut t = meshd_on(&primary, |_| {}).await;
    let root = root_pem(&t);
    eventually("the expired lease is taken over", WAIT, async || {
        metric(&t, "meshd_root_cert_leader", "cluster1") == 1.0
    })
    .await;
    let me = lease_holder(&primary).unwrap();
    assert_ne!(me, "crashed-replica");
    eventually("written after the takeover", WAIT, async || all_good(&primary, &root)).await;

    // Another replica grabs the lease: meshd notices at its next renewal and stops writing.
    set_lease(&primary, "thief", 2);
    eventually("leadership lost", WAIT, async || {
        metric(&t, "meshd_root_cert_leader", "cluster1") == 0.0
    })
    .await;
    let writes_when_lost = writes(&t, "cluster1");
    let api: Api<ConfigMap> = Api::namespaced(primary.client(primary.admin_token()).await.unwrap(), "default");
    api.delete(CM, &DeleteParams::default()).await.unwrap();
    // The thief never renews: once its lease expires meshd leads again and repairs.
    eventually("led again and repaired", WAIT, async || {
        cm(&primary, "default").is_some() && lease_holder(&primary).as_deref() == Some(me.as_str())
    })
    .await;
    assert!(writes(&t, "cluster1") > writes_when_lost);

    t.stop().await;
    primary.stop().await;
}
