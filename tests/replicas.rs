//! Two meshd replicas (real processes) against one fake Kubernetes API server: both serve the CA
//! and xDS from the one root in istio-ca-secret; only the Lease holder writes istio-ca-root-cert
//! and patches the webhook caBundle; when the holder is SIGKILLed (no lease release), the survivor
//! takes over once the lease expires and repairs both.
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use meshd::pki::keys::KeyType;
use meshd::testing::fake_apiserver::{FakeApiServer, FakeConfig, ResourceType};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
const INJECTOR: &str = "istio-sidecar-injector";

struct Replica {
    child: Child,
    addrs: Arc<Mutex<BTreeMap<String, SocketAddr>>>,
    data_dir: std::path::PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    fn start(dir: &Path, name: &str, kubeconfig: &Path) -> Self {
        let data_dir = dir.join(name);
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshd"))
            .args(["serve", "--cluster-id", "cluster1", "--kubeconfig"])
            .arg(kubeconfig)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--pod-name", name, "--leader-election-lease-duration", "3s"])
            .args(["--grpc-addr", "127.0.0.1:0", "--plaintext-addr", "127.0.0.1:0"])
            .args(["--monitoring-addr", "127.0.0.1:0", "--ready-addr", "127.0.0.1:0"])
            .args(["--webhook-addr", "127.0.0.1:0", "--log-level", "info"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("meshd starts");
        let stderr = child.stderr.take().unwrap();
        let addrs: Arc<Mutex<BTreeMap<String, SocketAddr>>> = Arc::default();
        let seen = Arc::clone(&addrs);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let (Some(l), Some(a)) = (line.split("listener=").nth(1), line.split("addr=").nth(1))
                    && let (Some(l), Some(a)) = (l.split_whitespace().next(), a.split_whitespace().next())
                    && let Ok(a) = a.parse()
                {
                    seen.lock().unwrap().insert(l.to_string(), a);
                }
            }
        });
        Self { child, addrs, data_dir }
    }

    fn addr(&self, listener: &str) -> Option<SocketAddr> {
        self.addrs.lock().unwrap().get(listener).copied()
    }

    async fn metrics(&self) -> String {
        match self.addr("monitoring") {
            Some(a) => http_get(a, "/metrics", &[]).await.1,
            None => String::new(),
        }
    }

    async fn leads(&self) -> bool {
        metric_value(&self.metrics().await, "meshd_root_cert_leader{cluster=\"cluster1\"}") == 1.0
    }

    fn root(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("root-cert.pem")).unwrap_or_default()
    }
}

fn injector_bundle(cluster: &FakeApiServer) -> Option<String> {
    let rt = ResourceType::new("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations");
    cluster.get(&rt, "", INJECTOR)?["webhooks"][0]["clientConfig"]["caBundle"]
        .as_str()
        .map(String::from)
}

fn install_injector(cluster: &FakeApiServer) {
    cluster
        .apply(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": INJECTOR},
            "webhooks": [{
                "name": "namespace.sidecar-injector.istio.io",
                "clientConfig": {"service": {"name": "istiod", "namespace": "istio-system", "path": "/inject", "port": 443}},
                "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
                "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Fail",
            }],
        }))
        .unwrap();
}

fn root_configmap(cluster: &FakeApiServer, ns: &str) -> Option<String> {
    cluster
        .get(&ResourceType::core("configmaps"), ns, "istio-ca-root-cert")?
        .pointer("/data/root-cert.pem")?
        .as_str()
        .map(String::from)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_takes_over_when_the_leader_is_killed() {
    let cluster = FakeApiServer::start(FakeConfig::new("127.0.0.1:0".parse().unwrap(), "cluster1"))
        .await
        .unwrap();
    cluster.ensure_namespace("istio-system").unwrap();
    cluster.ensure_namespace("default").unwrap();
    install_injector(&cluster);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, cluster.kubeconfig(cluster.admin_token())).unwrap();

    // The first replica creates istio-ca-secret; the second must load the same root.
    let a = Replica::start(dir.path(), "replica-a", &kubeconfig);
    eventually("replica a is ready", WAIT, async || {
        a.addr("ready").is_some() && !a.root().is_empty()
    })
    .await;
    let b = Replica::start(dir.path(), "replica-b", &kubeconfig);
    eventually("replica b is ready", WAIT, async || {
        b.addr("ready").is_some() && !b.root().is_empty()
    })
    .await;
    let root = a.root();
    assert_eq!(b.root(), root, "one root for every replica");
    let bundle = base64::engine::general_purpose::STANDARD.encode(&root);

    // Every replica serves the CA, authenticating through the cluster's TokenReview.
    let token = cluster
        .mint_token("default", "web", &["istio-ca"], Duration::from_secs(3600), None)
        .unwrap();
    for r in [&a, &b] {
        let ch = meshd::client::connect(
            &r.addr("grpc-tls").unwrap().to_string(),
            SERVER_NAME,
            root.as_bytes(),
            None,
        )
        .await
        .unwrap();
        let chain = create(ch, Some(&token), Some("cluster1"), csr(KeyType::EcdsaP256, None), 0)
            .await
            .expect("each replica signs");
        assert_eq!(
            leaf_facts(&chain).uri_sans,
            vec!["spiffe://cluster.local/ns/default/sa/web".to_string()]
        );
    }

    // Exactly one leader; it writes the ConfigMap and patches the caBundle.
    let mut leader_is_a = false;
    eventually("one leader", WAIT, async || {
        let (la, lb) = (a.leads().await, b.leads().await);
        leader_is_a = la;
        la ^ lb
    })
    .await;
    eventually("the leader wrote and patched", WAIT, async || {
        root_configmap(&cluster, "default").as_deref() == Some(root.as_str())
            && injector_bundle(&cluster).as_deref() == Some(bundle.as_str())
    })
    .await;
    let (mut leader, survivor) = if leader_is_a { (a, b) } else { (b, a) };

    // SIGKILL: the lease is not released, so the survivor waits for it to expire (3 s).
    leader.child.kill().unwrap();
    leader.child.wait().unwrap();
    // Undo the leader's work, as an operator re-installing the webhook would.
    cluster
        .delete(&ResourceType::core("configmaps"), "default", "istio-ca-root-cert")
        .expect("existed");
    install_injector(&cluster);
    assert_eq!(injector_bundle(&cluster), None);
    eventually("the survivor leads", WAIT, async || survivor.leads().await).await;
    eventually("the survivor repaired both", WAIT, async || {
        root_configmap(&cluster, "default").as_deref() == Some(root.as_str())
            && injector_bundle(&cluster).as_deref() == Some(bundle.as_str())
    })
    .await;
    let m = survivor.metrics().await;
    assert!(
        metric_value(&m, "meshd_webhook_cabundle_patches{cluster=\"cluster1\"}") >= 1.0,
        "{m}"
    );
}
