//! Primary-remote authentication end to end: meshd in Kubernetes mode against a fake primary API
//! server (cluster1 on 127.0.0.2), a fake remote (cluster2 on 127.0.0.3), remote secrets applied
//! at runtime, TokenReview on the caller's own cluster, and the review cache.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use meshd::pki::keys::KeyType;
use meshd::testing::fake_apiserver::{FakeApiServer, FakeConfig};
use serde_json::json;
use tonic::Code;

const GW_SA: &str = "istio-ingressgateway-service-account";
const GW_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account";

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

/// Starts both fake clusters and meshd against the primary.
async fn mesh(tweak: impl FnOnce(&mut meshd::config::ServeArgs)) -> Mesh {
    let primary = fake("127.0.0.2", "cluster1").await;
    let remote = fake("127.0.0.3", "cluster2").await;
    // An Istio install has its system namespace in both clusters.
    primary.ensure_namespace("istio-system").unwrap();
    remote.ensure_namespace("istio-system").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("primary.kubeconfig");
    std::fs::write(&kubeconfig, primary.kubeconfig(primary.admin_token())).unwrap();
    let meshd = TestMeshd::start_with(|a| {
        a.standalone = false;
        a.kubeconfig = Some(kubeconfig.clone());
        a.cluster_id = "cluster1".into();
        tweak(a);
    })
    .await;
    // The kubeconfig file is only read at startup.
    drop(dir);
    Mesh { primary, remote, meshd }
}

fn remote_secret(name: &str, entries: &[(&str, String)]) -> serde_json::Value {
    let data: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                json!(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": name, "namespace": "istio-system",
            "labels": {"istio/multiCluster": "true"},
            "annotations": {"networking.istio.io/cluster": entries.first().map(|e| e.0).unwrap_or("")},
        },
        "data": data,
    })
}

impl Mesh {
    /// The remote secret istioctl would write for cluster2, applied to the primary.
    async fn attach_cluster2(&self) {
        let reader = self.remote.reader_token("istio-reader-service-account").unwrap();
        self.primary
            .apply(remote_secret(
                "istio-remote-secret-cluster2",
                &[("cluster2", self.remote.kubeconfig(&reader))],
            ))
            .unwrap();
        let clusters = Arc::clone(&self.meshd.m().clusters);
        eventually("cluster2 registered", Duration::from_secs(20), async || {
            clusters.remote("cluster2").is_some()
        })
        .await;
    }

    fn gateway_token(&self, name: &str) -> String {
        self.remote
            .mint_token(
                "istio-system",
                GW_SA,
                &["istio-ca"],
                Duration::from_secs(3600),
                Some((name, "uid-1")),
            )
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
}

#[tokio::test]
async fn a_remote_secret_applied_at_runtime_lets_cluster2_tokens_in() {
    let m = mesh(|_| {}).await;
    let token = m.gateway_token("gw-1");

    let before = m.csr(&token, "cluster2").await.unwrap_err();
    assert_eq!(before.code(), Code::Unauthenticated);
    assert!(
        before.message().contains(
            "client claims to be in cluster \"cluster2\", but we only know about local cluster \"cluster1\" and remote clusters []"
        ),
        "{}",
        before.message()
    );

    m.attach_cluster2().await;
    let chain = m.csr(&token, "cluster2").await.unwrap();
    assert_eq!(leaf_facts(&chain).uri_sans, vec![GW_ID.to_string()]);
    assert_eq!(m.remote.token_review_count(), 1, "reviewed by cluster2's API server");
    assert_eq!(m.primary.token_review_count(), 0);

    // The same token claiming to be from cluster1 is reviewed by cluster1, which never issued it.
    let wrong = m.csr(&token, "cluster1").await.unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated, "{}", wrong.message());
    assert_eq!(m.primary.token_review_count(), 1);

    let unknown = m.csr(&token, "cluster9").await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert!(
        unknown.message().contains("remote clusters [\"cluster2\"]"),
        "{}",
        unknown.message()
    );
}

#[tokio::test]
async fn deleting_the_remote_secret_removes_cluster2_and_stops_its_work() {
    let m = mesh(|_| {}).await;
    m.attach_cluster2().await;
    let token = m.gateway_token("gw-1");
    m.csr(&token, "cluster2").await.unwrap();
    let handle = Arc::downgrade(&m.meshd.m().clusters.remote("cluster2").unwrap());

    let rt = meshd::testing::fake_apiserver::ResourceType::core("secrets");
    m.primary
        .delete(&rt, "istio-system", "istio-remote-secret-cluster2")
        .unwrap();
    let clusters = Arc::clone(&m.meshd.m().clusters);
    eventually("cluster2 removed", Duration::from_secs(20), async || {
        clusters.remote("cluster2").is_none()
    })
    .await;
    // Even the identity cached a moment ago no longer gets in through cluster2.
    let err = m.csr(&token, "cluster2").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    // Nothing keeps running for cluster2: every per-cluster task was aborted.
    eventually("cluster2's tasks stopped", Duration::from_secs(5), async || {
        handle.upgrade().is_none()
    })
    .await;
}

#[tokio::test]
async fn a_kubeconfig_with_exec_is_refused_and_shown_in_clusterz() {
    let m = mesh(|_| {}).await;
    m.attach_cluster2().await;
    let evil = r#"apiVersion: v1
kind: Config
clusters:
- name: cluster3
  cluster: {server: "https://127.0.0.4:6443", certificate-authority-data: Zm9v}
contexts:
- name: cluster3
  context: {cluster: cluster3, user: cluster3}
current-context: cluster3
users:
- name: cluster3
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1
      command: /bin/sh
      args: ["-c", "touch /tmp/meshd-pwned"]
"#;
    m.primary
        .apply(remote_secret(
            "istio-remote-secret-cluster3",
            &[("cluster3", evil.to_string())],
        ))
        .unwrap();
    m.primary
        .apply(remote_secret(
            "istio-remote-secret-junk",
            &[("cluster4", "{{{ this is not yaml".to_string())],
        ))
        .unwrap();
    let url = format!("http://{}/debug/clusterz", m.meshd.m().addrs.monitoring);
    let mut rows = serde_json::Value::Null;
    eventually(
        "clusterz lists both broken clusters",
        Duration::from_secs(20),
        async || {
            rows = http_get_json(&url).await;
            let errs = |id: &str| {
                rows.as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["id"] == id)
                    .and_then(|r| r["error"].as_str().map(String::from))
            };
            matches!(errs("cluster3"), Some(e) if e.contains("exec"))
                && matches!(errs("cluster4"), Some(e) if e.contains("YAML"))
        },
    )
    .await;
    assert!(!std::path::Path::new("/tmp/meshd-pwned").exists());
    let c2 = rows.as_array().unwrap().iter().find(|r| r["id"] == "cluster2").unwrap();
    assert!(c2["error"].is_null(), "cluster2 unaffected: {c2}");
    // A caller claiming cluster3 is told the cluster is unusable (and may retry once it is fixed).
    let err = m.csr(&m.gateway_token("gw-1"), "cluster3").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains("cluster3"));
    m.csr(&m.gateway_token("gw-2"), "cluster2").await.unwrap();
    let metrics = m.meshd.m().registry.encode();
    assert_eq!(
        metric_value(&metrics, "meshd_remote_cluster_healthy{cluster=\"cluster3\"}"),
        0.0
    );
    assert_eq!(
        metric_value(&metrics, "istiod_managed_clusters{cluster_type=\"remote\"}"),
        1.0
    );
}

async fn http_get_json(url: &str) -> serde_json::Value {
    let url: http::Uri = url.parse().unwrap();
    let Ok(tcp) = tokio::net::TcpStream::connect(format!("{}:{}", url.host().unwrap(), url.port_u16().unwrap())).await
    else {
        return serde_json::Value::Null;
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
    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)
}

#[tokio::test]
async fn remote_api_server_down_gives_unavailable_while_cached_identities_keep_working() {
    let m = mesh(|a| a.token_review_timeout = Duration::from_secs(2)).await;
    m.attach_cluster2().await;
    let cached = m.gateway_token("gw-cached");
    m.csr(&cached, "cluster2").await.unwrap();

    m.remote.set_down(true).await.unwrap();
    let fresh = m.gateway_token("gw-fresh");
    let started = Instant::now();
    let err = m.csr(&fresh, "cluster2").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(err.message().contains("cluster2"), "{}", err.message());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered within the review timeout"
    );
    m.csr(&cached, "cluster2").await.expect("cached identity still served");

    m.remote.set_down(false).await.unwrap();
    let fresh2 = fresh.clone();
    eventually(
        "cluster2 reviews again once its API server is back",
        Duration::from_secs(20),
        async || m.csr(&fresh2, "cluster2").await.is_ok(),
    )
    .await;
}

#[tokio::test]
async fn a_slow_remote_api_server_times_out_as_unavailable() {
    let m = mesh(|a| a.token_review_timeout = Duration::from_secs(1)).await;
    m.attach_cluster2().await;
    m.remote.set_latency(Duration::from_secs(10));
    let started = Instant::now();
    let err = m.csr(&m.gateway_token("gw-slow"), "cluster2").await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    m.remote.clear_faults();
}

#[tokio::test]
async fn a_thousand_csrs_with_one_token_cost_one_token_review() {
    let m = mesh(|_| {}).await;
    m.attach_cluster2().await;
    let token = m.gateway_token("gw-1");
    let ch = m.meshd.channel().await;
    let request_csr = csr(KeyType::EcdsaP256, None);
    let mut set = tokio::task::JoinSet::new();
    for worker in 0..50 {
        let (ch, token, request_csr) = (ch.clone(), token.clone(), request_csr.clone());
        set.spawn(async move {
            for _ in 0..20 {
                create(ch.clone(), Some(&token), Some("cluster2"), request_csr.clone(), 0)
                    .await
                    .unwrap_or_else(|e| panic!("worker {worker}: {e}"));
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    assert_eq!(m.meshd.metric("citadel_server_success_cert_issuance_count"), 1000.0);
    assert_eq!(m.remote.token_review_count(), 1);
}

#[tokio::test]
async fn cluster_aliases_name_the_local_cluster() {
    let m = mesh(|a| a.cluster_aliases = vec![("old-primary".into(), "cluster1".into())]).await;
    let token = m
        .primary
        .mint_token("default", "web", &["istio-ca"], Duration::from_secs(3600), None)
        .unwrap();
    for id in ["", "cluster1", "old-primary"] {
        let chain = m.csr(&token, id).await.unwrap_or_else(|e| panic!("{id:?}: {e}"));
        assert_eq!(
            leaf_facts(&chain).uri_sans,
            vec!["spiffe://cluster.local/ns/default/sa/web".to_string()]
        );
    }
}

#[tokio::test]
async fn a_token_for_the_api_server_audience_is_refused() {
    let m = mesh(|_| {}).await;
    let token = m
        .primary
        .mint_token(
            "default",
            "web",
            &["https://kubernetes.default.svc"],
            Duration::from_secs(3600),
            None,
        )
        .unwrap();
    let err = m.csr(&token, "").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("audiences"), "{}", err.message());
}

#[tokio::test]
async fn the_root_lives_in_istio_ca_secret_and_is_shared_by_replicas() {
    let m = mesh(|_| {}).await;
    let rt = meshd::testing::fake_apiserver::ResourceType::core("secrets");
    let secret = m
        .primary
        .get(&rt, "istio-system", "istio-ca-secret")
        .expect("istio-ca-secret created");
    assert_eq!(secret["type"], "istio.io/ca-root");
    // A second replica against the same API server signs with the same root.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("k");
    std::fs::write(&kubeconfig, m.primary.kubeconfig(m.primary.admin_token())).unwrap();
    let second = TestMeshd::start_with(|a| {
        a.standalone = false;
        a.kubeconfig = Some(kubeconfig.clone());
    })
    .await;
    assert_eq!(second.root_pem(), m.meshd.root_pem());
}

async fn http_status(url: &str) -> u16 {
    let url: http::Uri = url.parse().unwrap();
    let Ok(tcp) = tokio::net::TcpStream::connect(format!("{}:{}", url.host().unwrap(), url.port_u16().unwrap())).await
    else {
        return 0;
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(url.path())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    send.send_request(req).await.map(|r| r.status().as_u16()).unwrap_or(0)
}

#[tokio::test]
async fn an_unresponsive_remote_cluster_delays_readiness_only_until_the_timeout() {
    let primary = fake("127.0.0.2", "cluster1").await;
    let remote = fake("127.0.0.3", "cluster2").await;
    primary.ensure_namespace("istio-system").unwrap();
    let reader = remote.reader_token("istio-reader-service-account").unwrap();
    primary
        .apply(remote_secret(
            "istio-remote-secret-cluster2",
            &[("cluster2", remote.kubeconfig(&reader))],
        ))
        .unwrap();
    // cluster2's API server accepts connections but answers nothing for a minute.
    remote.set_latency(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("primary.kubeconfig");
    std::fs::write(&kubeconfig, primary.kubeconfig(primary.admin_token())).unwrap();
    let started = Instant::now();
    let t = TestMeshd::start_with(|a| {
        a.standalone = false;
        a.kubeconfig = Some(kubeconfig.clone());
        a.cluster_id = "cluster1".into();
        a.remote_cluster_timeout = Duration::from_secs(5);
    })
    .await;
    let ready = format!("http://{}/ready", t.m().addrs.ready);
    let first = http_status(&ready).await;
    let mut became_ready = None;
    eventually(
        "ready after the remote cluster timeout",
        Duration::from_secs(20),
        async || {
            if http_status(&ready).await == 200 {
                became_ready = Some(started.elapsed());
                true
            } else {
                false
            }
        },
    )
    .await;
    let waited = became_ready.unwrap();
    // Not ready while cluster2 was still within its grace period...
    assert_eq!(first, 503, "not ready while cluster2 is pending");
    assert!(waited >= Duration::from_secs(4), "ready after {waited:?}");
    // ...and never blocked much past it.
    assert!(waited < Duration::from_secs(15), "ready after {waited:?}");
    // The local cluster kept working all along.
    let token = primary
        .mint_token("default", "web", &["istio-ca"], Duration::from_secs(600), None)
        .unwrap();
    create(
        t.channel().await,
        Some(&token),
        Some("cluster1"),
        csr(KeyType::EcdsaP256, None),
        0,
    )
    .await
    .unwrap();
    remote.clear_faults();
}

#[tokio::test]
async fn remote_secret_updates_rebuild_only_on_kubeconfig_change_and_duplicates_are_skipped() {
    let m = mesh(|a| a.root_cert_configmaps = false).await;
    let cluster3 = fake("127.0.0.4", "cluster3").await;
    cluster3.ensure_namespace("istio-system").unwrap();
    let reader2 = m.remote.reader_token("istio-reader-service-account").unwrap();
    let reader3 = cluster3.reader_token("istio-reader-service-account").unwrap();
    let kc2 = m.remote.kubeconfig(&reader2);
    // One Secret may hold several clusters; a key equal to our own id is ignored.
    let mut secret = remote_secret(
        "istio-remote-secret-many",
        &[
            ("cluster2", kc2.clone()),
            ("cluster3", cluster3.kubeconfig(&reader3)),
            ("cluster1", kc2.clone()),
        ],
    );
    m.primary.apply(secret.clone()).unwrap();
    let clusters = Arc::clone(&m.meshd.m().clusters);
    eventually(
        "cluster2 and cluster3 registered",
        Duration::from_secs(20),
        async || clusters.remote("cluster2").is_some() && clusters.remote("cluster3").is_some(),
    )
    .await;
    assert!(
        clusters.remote("cluster1").is_none(),
        "our own id never becomes a remote cluster"
    );
    let c3_token = cluster3
        .mint_token("istio-system", GW_SA, &["istio-ca"], Duration::from_secs(600), None)
        .unwrap();
    m.csr(&c3_token, "cluster3").await.unwrap();
    let before = clusters.remote("cluster2").unwrap();

    // A metadata-only update keeps the client; a changed kubeconfig rebuilds it.
    secret["metadata"]["annotations"]["touched"] = json!("yes");
    m.primary.apply(secret.clone()).unwrap();
    // Drop cluster3 from the Secret as a marker that the update was processed.
    let mut without3 = secret.clone();
    without3["data"].as_object_mut().unwrap().remove("cluster3");
    m.primary.apply(without3.clone()).unwrap();
    eventually("cluster3 removed with its key", Duration::from_secs(20), async || {
        clusters.remote("cluster3").is_none()
    })
    .await;
    assert!(
        Arc::ptr_eq(&before, &clusters.remote("cluster2").unwrap()),
        "same kubeconfig: same client"
    );

    let reader2b = m.remote.reader_token("istio-reader-2").unwrap();
    let mut changed = without3.clone();
    changed["data"]["cluster2"] =
        json!(base64::engine::general_purpose::STANDARD.encode(m.remote.kubeconfig(&reader2b)));
    m.primary.apply(changed).unwrap();
    eventually(
        "cluster2 rebuilt for the new kubeconfig",
        Duration::from_secs(20),
        async || clusters.remote("cluster2").is_some_and(|c| !Arc::ptr_eq(&c, &before)),
    )
    .await;

    // Another Secret naming cluster2 is skipped: the first registration stays.
    let current = clusters.remote("cluster2").unwrap();
    m.primary
        .apply(remote_secret(
            "istio-remote-secret-dup",
            &[("cluster2", cluster3.kubeconfig(&reader3))],
        ))
        .unwrap();
    m.primary
        .apply(remote_secret(
            "istio-remote-secret-marker",
            &[("cluster3", cluster3.kubeconfig(&reader3))],
        ))
        .unwrap();
    eventually("marker secret processed", Duration::from_secs(20), async || {
        clusters.remote("cluster3").is_some()
    })
    .await;
    assert!(
        Arc::ptr_eq(&current, &clusters.remote("cluster2").unwrap()),
        "duplicate id skipped"
    );
    let gw = m.gateway_token("gw-9");
    m.csr(&gw, "cluster2")
        .await
        .expect("cluster2 still reviewed by cluster2's API server");
}

#[tokio::test]
async fn ambiguous_cluster_ids_and_deleted_service_accounts_are_unauthenticated() {
    let m = mesh(|_| {}).await;
    m.attach_cluster2().await;
    let token = m.gateway_token("gw-2");

    // Two `clusterid` values: istiod's rule is "exactly one, else none", so the token is
    // reviewed by the local cluster, which never issued it.
    let mut client = meshd::proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient::new(
        m.meshd.channel().await,
    );
    let mut req = tonic::Request::new(meshd::proto::istio_ca::IstioCertificateRequest {
        csr: csr(KeyType::EcdsaP256, None),
        validity_duration: 0,
        metadata: None,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req.metadata_mut().append("clusterid", "cluster2".parse().unwrap());
    req.metadata_mut().append("clusterid", "cluster1".parse().unwrap());
    let err = client.create_certificate(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(
        m.remote.token_review_count(),
        0,
        "never reviewed by the cluster it names twice"
    );
    assert_eq!(m.primary.token_review_count(), 1);

    // A token whose service account was deleted after it was minted.
    let doomed = m
        .remote
        .mint_token("istio-system", "doomed", &["istio-ca"], Duration::from_secs(3600), None)
        .unwrap();
    m.remote
        .delete(
            &meshd::testing::fake_apiserver::ResourceType::core("serviceaccounts"),
            "istio-system",
            "doomed",
        )
        .expect("the service account existed");
    let err = m.csr(&doomed, "cluster2").await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert_eq!(
        m.remote.token_review_count(),
        1,
        "reviewed by cluster2, which refused it"
    );
    // The gateway's own token still works on cluster2.
    m.csr(&token, "cluster2")
        .await
        .expect("a good token after the bad ones");
}
