//! The webhooks on 15017 end to end: AdmissionReviews POSTed over HTTPS (trusting the data dir's
//! root-cert.pem, verifying `istiod.istio-system.svc` while connecting to 127.0.0.1), and the
//! caBundle patcher against fake Kubernetes API servers: cluster1 (primary, 127.0.0.2),
//! cluster2 (remote that names cluster1, 127.0.0.3), cluster3 (remote that does not, 127.0.0.4).
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod};
use meshd::testing::fake_apiserver::{FakeApiServer, FakeConfig, ResourceType};
use serde_json::{Value, json};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);
const INJECTOR: &str = "istio-sidecar-injector";
const VALIDATOR: &str = "istio-validator-istio-system";

// ---------------------------------------------------------------------------------------------
// HTTPS client

struct Reply {
    status: StatusCode,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(t: &TestMeshd, method: Method, path: &str, content_type: Option<&str>, body: Vec<u8>, h2: bool) -> Reply {
    let mut roots = rustls::RootCertStore::empty();
    for c in meshd::pki::pem::parse_certs(&t.root_pem()).unwrap() {
        roots.add(c).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(meshd::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let addr = t.m().addrs.webhook;
    assert!(addr.ip().is_loopback());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("TLS to the webhook port, verified as istiod.istio-system.svc");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
    let mut req = Request::builder().method(method);
    req = if h2 {
        req.uri(format!("https://{SERVER_NAME}{path}"))
    } else {
        req.uri(path).header("host", SERVER_NAME)
    };
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req.body(Full::new(Bytes::from(body))).unwrap();
    let resp = if h2 {
        let (mut s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        s.send_request(req).await.unwrap()
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        s.send_request(req).await.unwrap()
    };
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    Reply { status, body }
}

async fn post(t: &TestMeshd, path: &str, review: &Value) -> Reply {
    send(
        t,
        Method::POST,
        path,
        Some("application/json"),
        review.to_string().into_bytes(),
        false,
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// AdmissionReviews

fn review(uid: &str, kind: (&str, &str, &str), resource: &str, namespace: &str, op: &str, object: Value) -> Value {
    let (group, version, kind) = kind;
    let gvk = json!({"group": group, "version": version, "kind": kind});
    let gvr = json!({"group": group, "version": version, "resource": resource});
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
            "namespace": namespace,
            "operation": op,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    })
}

fn pod_review(uid: &str, namespace: &str, pod: &Value) -> Value {
    review(uid, ("", "v1", "Pod"), "pods", namespace, "CREATE", pod.clone())
}

/// The Deployment whose pods are injected.
fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "reviews", "namespace": "bookinfo"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "reviews"}},
            "template": {
                "metadata": {"labels": {"app": "reviews", "version": "v2"}},
                "spec": {
                    "serviceAccountName": "bookinfo-reviews",
                    "containers": [{
                        "name": "reviews",
                        "image": "docker.io/istio/examples-bookinfo-reviews-v2:1.20.2",
                        "ports": [{"containerPort": 9080, "name": "http"}],
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                    }],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    })
}

/// The pod the ReplicaSet controller creates from the Deployment's template, after the API
/// server's defaulting (what a mutating webhook receives): generateName, no name or namespace,
/// owned by the ReplicaSet, `pod-template-hash` label.
fn pod_from_template(dep: &Value) -> Value {
    let hash = "5c8d6f9b7d";
    let rs = format!("{}-{hash}", dep["metadata"]["name"].as_str().unwrap());
    let mut tpl = dep["spec"]["template"].clone();
    let mut pod = json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": tpl["metadata"].take(),
        "spec": tpl["spec"].take(),
        "status": {},
    });
    let meta = pod["metadata"].as_object_mut().unwrap();
    meta.insert("generateName".into(), json!(format!("{rs}-")));
    meta.insert("creationTimestamp".into(), Value::Null);
    meta.insert(
        "ownerReferences".into(),
        json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": "6f1c0e43-0000-4000-8000-000000000001",
                "controller": true, "blockOwnerDeletion": true}]),
    );
    meta["labels"]["pod-template-hash"] = json!(hash);
    let spec = pod["spec"].as_object_mut().unwrap();
    spec.insert("restartPolicy".into(), json!("Always"));
    spec.insert("terminationGracePeriodSeconds".into(), json!(30));
    spec.insert("dnsPolicy".into(), json!("ClusterFirst"));
    spec.insert("schedulerName".into(), json!("default-scheduler"));
    spec.insert("securityContext".into(), json!({}));
    spec.insert("enableServiceLinks".into(), json!(true));
    spec.insert("serviceAccount".into(), json!("bookinfo-reviews"));
    let c = &mut pod["spec"]["containers"][0];
    c["terminationMessagePath"] = json!("/dev/termination-log");
    c["terminationMessagePolicy"] = json!("File");
    c["imagePullPolicy"] = json!("IfNotPresent");
    c["resources"] = json!({});
    c["ports"][0]["protocol"] = json!("TCP");
    pod
}

fn simple_pod(labels: Value, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
    })
}

/// The response of a review answer, checked for the request's uid.
fn response(reply: &Reply, uid: &str) -> Value {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let v = reply.json();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    assert_eq!(v["response"]["uid"], uid);
    v["response"].clone()
}

/// Decodes the base64 JSON patch and applies it to `original`.
fn apply_patch(resp: &Value, original: &Value) -> Value {
    assert_eq!(resp["allowed"], true, "{resp}");
    assert_eq!(resp["patchType"], "JSONPatch");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(resp["patch"].as_str().expect("patch is a base64 string"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
    let mut doc = original.clone();
    json_patch::patch(&mut doc, &patch).expect("the patch applies to the object as sent");
    doc
}

fn container<'a>(list: &'a [Container], name: &str) -> &'a Container {
    list.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env.iter().flatten().find(|e| e.name == name)?.value.as_deref()
}

fn env_field<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    let e = c.env.iter().flatten().find(|e| e.name == name)?;
    Some(e.value_from.as_ref()?.field_ref.as_ref()?.field_path.as_str())
}

fn quantity(c: &Container, section: &str, res: &str) -> String {
    let r = c.resources.as_ref().unwrap();
    let m = if section == "requests" { &r.requests } else { &r.limits };
    m.as_ref().unwrap()[res].0.clone()
}

async fn meshd_with_network() -> TestMeshd {
    TestMeshd::start_with(|a| {
        a.cluster_id = "cluster1".into();
        a.network = "network1".into();
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Injection

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injects_a_deployments_pod_template() {
    let mut t = meshd_with_network().await;
    let original = pod_from_template(&deployment());
    for h2 in [false, true] {
        let reply = send(
            &t,
            Method::POST,
            "/inject",
            Some("application/json"),
            pod_review("uid-1", "bookinfo", &original).to_string().into_bytes(),
            h2,
        )
        .await;
        let injected = apply_patch(&response(&reply, "uid-1"), &original);
        let pod: Pod = serde_json::from_value(injected.clone()).expect("the patched object is a Pod");
        let spec = pod.spec.as_ref().unwrap();

        // Containers: the app first, istio-proxy last; istio-init as the init container.
        let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["reviews", "istio-proxy"]);
        let inits: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(inits, ["istio-init"]);
        let app = &spec.containers[0];
        assert_eq!(
            serde_json::to_value(app).unwrap(),
            original["spec"]["containers"][0],
            "the app container is untouched"
        );

        let proxy = container(&spec.containers, "istio-proxy");
        assert_eq!(proxy.image.as_deref(), Some("docker.io/istio/proxyv2:1.28.0"));
        let args = proxy.args.clone().unwrap();
        assert_eq!(
            &args[..4],
            ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"]
        );
        assert_eq!(quantity(proxy, "requests", "cpu"), "100m");
        assert_eq!(quantity(proxy, "requests", "memory"), "128Mi");
        assert_eq!(quantity(proxy, "limits", "cpu"), "2000m");
        assert_eq!(quantity(proxy, "limits", "memory"), "1024Mi");
        assert_eq!(env(proxy, "ISTIO_META_CLUSTER_ID"), Some("cluster1"));
        assert_eq!(env(proxy, "ISTIO_META_NETWORK"), Some("network1"));
        assert_eq!(env(proxy, "CA_ADDR"), Some("istiod.istio-system.svc:15012"));
        assert_eq!(env(proxy, "PILOT_CERT_PROVIDER"), Some("istiod"));
        assert_eq!(env(proxy, "ISTIO_META_WORKLOAD_NAME"), Some("reviews"));
        assert_eq!(
            env(proxy, "ISTIO_META_OWNER"),
            Some("kubernetes://apis/apps/v1/namespaces/bookinfo/deployments/reviews")
        );
        assert_eq!(env(proxy, "TRUST_DOMAIN"), Some("cluster.local"));
        let proxy_config: Value = serde_json::from_str(env(proxy, "PROXY_CONFIG").unwrap()).unwrap();
        assert_eq!(proxy_config["discoveryAddress"], "istiod.istio-system.svc:15012");
        assert_eq!(env_field(proxy, "POD_NAME"), Some("metadata.name"));
        assert_eq!(env_field(proxy, "POD_NAMESPACE"), Some("metadata.namespace"));
        assert_eq!(env_field(proxy, "INSTANCE_IP"), Some("status.podIP"));
        assert_eq!(env_field(proxy, "SERVICE_ACCOUNT"), Some("spec.serviceAccountName"));
        let ports = proxy.ports.clone().unwrap();
        assert_eq!(
            (ports[0].container_port, ports[0].name.as_deref()),
            (15090, Some("http-envoy-prom"))
        );
        let ready = proxy.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(ready.path.as_deref(), Some("/healthz/ready"));
        assert_eq!(serde_json::to_value(&ready.port).unwrap(), json!(15021));
        assert_eq!(
            proxy.security_context.as_ref().unwrap().run_as_user,
            Some(1337),
            "the proxy runs as 1337"
        );
        assert!(proxy.restart_policy.is_none(), "not a native sidecar by default");

        // Volumes: the projected istio-ca token and the root-cert ConfigMap, mounted where the
        // agent looks for them.
        let volumes = spec.volumes.clone().unwrap();
        let vol = |n: &str| {
            volumes
                .iter()
                .find(|v| v.name == n)
                .unwrap_or_else(|| panic!("volume {n}"))
        };
        assert!(vol("tmp").empty_dir.is_some(), "the pod's own volume is kept");
        let token = vol("istio-token").projected.as_ref().unwrap().sources.as_ref().unwrap()[0]
            .service_account_token
            .clone()
            .unwrap();
        assert_eq!(token.audience.as_deref(), Some("istio-ca"));
        assert_eq!(token.expiration_seconds, Some(43200));
        assert_eq!(token.path, "istio-token");
        assert_eq!(
            vol("istiod-ca-cert").config_map.as_ref().unwrap().name,
            "istio-ca-root-cert"
        );
        for v in ["istio-envoy", "istio-data", "istio-podinfo"] {
            vol(v);
        }
        let mount = |n: &str| {
            proxy
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.name == n)
                .map(|m| m.mount_path.clone())
        };
        assert_eq!(mount("istio-token").as_deref(), Some("/var/run/secrets/tokens"));
        assert_eq!(mount("istiod-ca-cert").as_deref(), Some("/var/run/secrets/istio"));

        // Labels and annotations.
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels["security.istio.io/tlsMode"], "istio");
        assert_eq!(labels["service.istio.io/canonical-name"], "reviews");
        assert_eq!(labels["service.istio.io/canonical-revision"], "v2");
        assert_eq!(labels["app"], "reviews", "the pod's labels are kept");
        let ann = pod.metadata.annotations.clone().unwrap();
        let status: Value = serde_json::from_str(&ann["sidecar.istio.io/status"]).unwrap();
        assert_eq!(status["initContainers"], json!(["istio-init"]));
        assert_eq!(status["containers"], json!(["istio-proxy"]));
        for v in [
            "istio-token",
            "istiod-ca-cert",
            "istio-envoy",
            "istio-data",
            "istio-podinfo",
        ] {
            assert!(status["volumes"].as_array().unwrap().contains(&json!(v)), "{status}");
        }
        assert_eq!(ann["kubectl.kubernetes.io/default-container"], "reviews");
        assert!(pod.metadata.name.is_none(), "the patch leaves name generation alone");
    }

    // A native sidecar by annotation: istio-proxy becomes the first init container.
    let mut native = original.clone();
    native["metadata"]["annotations"] = json!({"sidecar.istio.io/nativeSidecar": "true"});
    let reply = post(&t, "/inject", &pod_review("uid-2", "bookinfo", &native)).await;
    let pod: Pod = serde_json::from_value(apply_patch(&response(&reply, "uid-2"), &native)).unwrap();
    let spec = pod.spec.unwrap();
    let inits: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(inits, ["istio-proxy", "istio-init"]);
    assert_eq!(
        container(spec.init_containers.as_deref().unwrap_or_default(), "istio-proxy")
            .restart_policy
            .as_deref(),
        Some("Always")
    );
    assert_eq!(spec.containers.len(), 1);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_set_image_resources_and_native_sidecars() {
    let mut t = TestMeshd::start_with(|a| {
        a.proxy_image = "registry.example/proxyv2:custom".into();
        a.proxy_cpu_request = "50m".into();
        a.proxy_memory_limit = "".into();
        a.native_sidecars = true;
        a.discovery_address = Some("meshd.example:15012".into());
    })
    .await;
    let original = pod_from_template(&deployment());
    let reply = post(&t, "/inject", &pod_review("u", "bookinfo", &original)).await;
    let pod: Pod = serde_json::from_value(apply_patch(&response(&reply, "u"), &original)).unwrap();
    let spec = pod.spec.unwrap();
    let proxy = container(spec.init_containers.as_deref().unwrap_or_default(), "istio-proxy");
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    assert_eq!(proxy.image.as_deref(), Some("registry.example/proxyv2:custom"));
    assert_eq!(quantity(proxy, "requests", "cpu"), "50m");
    assert!(
        !proxy
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()
            .contains_key("memory")
    );
    assert_eq!(env(proxy, "CA_ADDR"), Some("meshd.example:15012"));
    assert_eq!(env(proxy, "ISTIO_META_CLUSTER_ID"), Some("Kubernetes"));
    assert_eq!(env(proxy, "ISTIO_META_NETWORK"), None, "no network configured");
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_rules() {
    let mut t = meshd_with_network().await;
    let cases = [
        (
            "annotation false",
            "default",
            simple_pod(json!({}), json!({"sidecar.istio.io/inject": "false"})),
        ),
        (
            "label false",
            "default",
            simple_pod(json!({"sidecar.istio.io/inject": "false"}), json!({})),
        ),
        (
            "label beats annotation",
            "default",
            simple_pod(
                json!({"sidecar.istio.io/inject": "false"}),
                json!({"sidecar.istio.io/inject": "true"}),
            ),
        ),
        (
            "already injected",
            "default",
            simple_pod(
                json!({}),
                json!({"sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}"}),
            ),
        ),
        ("kube-system", "kube-system", simple_pod(json!({}), json!({}))),
        (
            "kube-public even when asked",
            "kube-public",
            simple_pod(json!({}), json!({"sidecar.istio.io/inject": "true"})),
        ),
    ];
    for (what, ns, pod) in cases {
        let reply = post(&t, "/inject", &pod_review(what, ns, &pod)).await;
        let resp = response(&reply, what);
        assert_eq!(resp["allowed"], true, "{what}: skipped pods are admitted");
        assert!(resp.get("patch").is_none(), "{what}: no patch: {resp}");
    }
    let mut host = simple_pod(json!({}), json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    let resp = response(&post(&t, "/inject", &pod_review("h", "default", &host)).await, "h");
    assert!(resp.get("patch").is_none(), "hostNetwork pods are skipped");

    // Opted in explicitly, and with no opinion at all: injected.
    for (uid, pod) in [
        ("yes", simple_pod(json!({"sidecar.istio.io/inject": "true"}), json!({}))),
        ("default", simple_pod(json!({}), json!({}))),
    ] {
        let resp = response(&post(&t, "/inject", &pod_review(uid, "default", &pod)).await, uid);
        let pod: Pod = serde_json::from_value(apply_patch(&resp, &pod)).unwrap();
        assert_eq!(pod.spec.unwrap().containers.len(), 2, "{uid}");
    }
    assert_eq!(t.metric("sidecar_injection_skip_total"), 7.0);
    assert_eq!(t.metric("sidecar_injection_success_total"), 2.0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_path_sets_cluster_and_network() {
    let mut t = meshd_with_network().await;
    let original = pod_from_template(&deployment());
    let proxy_of = |resp: &Value| -> Container {
        let pod: Pod = serde_json::from_value(apply_patch(resp, &original)).unwrap();
        container(&pod.spec.unwrap().containers, "istio-proxy").clone()
    };
    let reply = post(
        &t,
        "/inject/cluster/cluster2/net/network2",
        &pod_review("r1", "bookinfo", &original),
    )
    .await;
    let proxy = proxy_of(&response(&reply, "r1"));
    assert_eq!(env(&proxy, "ISTIO_META_CLUSTER_ID"), Some("cluster2"));
    assert_eq!(env(&proxy, "ISTIO_META_NETWORK"), Some("network2"));
    let names: Vec<&str> = proxy.env.iter().flatten().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names.iter().filter(|n| **n == "ISTIO_META_CLUSTER_ID").count(),
        1,
        "the path replaces, not duplicates"
    );

    // Istio's generic k/v pairs: upper-cased names, --slash-- for '/'; a trailing slash is fine.
    let reply = post(
        &t,
        "/inject/cluster/cluster3/net/network3/istio_meta_dns_capture/true/xds_root/a--slash--b/",
        &pod_review("r2", "bookinfo", &original),
    )
    .await;
    let proxy = proxy_of(&response(&reply, "r2"));
    assert_eq!(env(&proxy, "ISTIO_META_CLUSTER_ID"), Some("cluster3"));
    assert_eq!(env(&proxy, "ISTIO_META_NETWORK"), Some("network3"));
    assert_eq!(env(&proxy, "ISTIO_META_DNS_CAPTURE"), Some("true"));
    assert_eq!(env(&proxy, "XDS_ROOT"), Some("a/b"));

    // Plain /inject: meshd's own cluster and network.
    let proxy = proxy_of(&response(
        &post(&t, "/inject", &pod_review("r3", "bookinfo", &original)).await,
        "r3",
    ));
    assert_eq!(env(&proxy, "ISTIO_META_CLUSTER_ID"), Some("cluster1"));
    assert_eq!(env(&proxy, "ISTIO_META_NETWORK"), Some("network1"));
    t.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Validation

fn istio(kind: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": kind,
           "metadata": {"name": "x", "namespace": "default"}, "spec": spec})
}

fn istio_review(uid: &str, kind: &str, spec: Value) -> Value {
    let resource = format!("{}s", kind.to_ascii_lowercase());
    review(
        uid,
        ("networking.istio.io", "v1", kind),
        &resource,
        "default",
        "CREATE",
        istio(kind, spec),
    )
}

fn bad_configs() -> Vec<(&'static str, Value, &'static str)> {
    vec![
        (
            "Gateway",
            json!({"servers": [{"port": {"number": 0, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}]}),
            "spec.servers[0].port.number",
        ),
        (
            "Gateway",
            json!({"servers": [{"port": {"number": 80, "name": "x", "protocol": "SMTP"}, "hosts": ["*"]}]}),
            "spec.servers[0].port.protocol",
        ),
        (
            "Gateway",
            json!({"servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["a.com"]},
                               {"port": {"number": 81, "name": "http2", "protocol": "HTTP"}, "hosts": []}]}),
            "spec.servers[1].hosts",
        ),
        (
            "Gateway",
            json!({"servers": [{"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["a.com"],
                                "tls": {"mode": "MUTUAL"}}]}),
            "spec.servers[0].tls.credentialName",
        ),
        (
            "VirtualService",
            json!({"hosts": ["reviews"], "http": [{"route": [
                {"destination": {"host": "reviews", "subset": "v1"}, "weight": 50},
                {"destination": {"host": "reviews", "subset": "v2"}, "weight": 40}]}]}),
            "spec.http[0].route[1].weight: weights must sum to 100, got 90",
        ),
        (
            "VirtualService",
            json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}], "timeout": "10 seconds"}]}),
            "spec.http[0].timeout",
        ),
        (
            "VirtualService",
            json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}],
                   "retries": {"attempts": 3, "perTryTimeout": "-1s"}}]}),
            "spec.http[0].retries.perTryTimeout",
        ),
        (
            "VirtualService",
            json!({"hosts": [], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}),
            "spec.hosts",
        ),
        (
            "VirtualService",
            json!({"hosts": ["reviews"], "http": [{"route": [{"destination": {"subset": "v1"}}]}]}),
            "spec.http[0].route[0].destination.host",
        ),
        (
            "DestinationRule",
            json!({"subsets": [{"name": "v1", "labels": {"version": "v1"}}]}),
            "spec.host",
        ),
        (
            "DestinationRule",
            json!({"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                  {"name": "v1", "labels": {"version": "v2"}}]}),
            "spec.subsets[1].name",
        ),
        (
            "DestinationRule",
            json!({"host": "reviews", "trafficPolicy": {"tls": {"mode": "PERMISSIVE"}}}),
            "spec.trafficPolicy.tls.mode",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_denies_naming_the_field_and_allows_valid_config() {
    let mut t = TestMeshd::start().await;
    for (i, (kind, spec, field)) in bad_configs().into_iter().enumerate() {
        let uid = format!("bad-{i}");
        let reply = post(&t, "/validate", &istio_review(&uid, kind, spec.clone())).await;
        let resp = response(&reply, &uid);
        assert_eq!(resp["allowed"], false, "{kind} {spec} must be denied");
        let msg = resp["status"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.starts_with("configuration is invalid: ") && msg.contains(field),
            "{kind} {spec}: message {msg:?} should name {field:?}"
        );
    }

    let valid = [
        (
            "Gateway",
            json!({"selector": {"istio": "eastwestgateway"}, "servers": [
                {"port": {"number": 15012, "name": "tls-istiod", "protocol": "tls"}, "hosts": ["*"], "tls": {"mode": "PASSTHROUGH"}},
                {"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["bookinfo/*.example.com"],
                 "tls": {"mode": "SIMPLE", "credentialName": "example-cert"}}]}),
        ),
        (
            "VirtualService",
            json!({"hosts": ["reviews.bookinfo.svc.cluster.local"], "http": [
                {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
                 "route": [{"destination": {"host": "reviews", "subset": "v2"}}], "timeout": "0.5s"},
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                           {"destination": {"host": "reviews", "subset": "v3"}, "weight": 20}],
                 "retries": {"attempts": 3, "perTryTimeout": "2s"}}]}),
        ),
        (
            "DestinationRule",
            json!({"host": "reviews", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}},
                   "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}),
        ),
    ];
    for (kind, spec) in valid {
        let uid = format!("good-{kind}");
        let resp = response(&post(&t, "/validate", &istio_review(&uid, kind, spec)).await, &uid);
        assert_eq!(resp["allowed"], true, "{kind}: {resp}");
    }

    // Other groups and kinds, and deletions, are not meshd's to judge.
    let other = review(
        "other",
        ("security.istio.io", "v1", "AuthorizationPolicy"),
        "authorizationpolicies",
        "default",
        "CREATE",
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "a"}, "spec": {"nonsense": 1}}),
    );
    assert_eq!(response(&post(&t, "/validate", &other).await, "other")["allowed"], true);
    let mut delete = istio_review("del", "VirtualService", json!({}));
    delete["request"]["operation"] = json!("DELETE");
    assert_eq!(response(&post(&t, "/validate", &delete).await, "del")["allowed"], true);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_http_errors() {
    let mut t = TestMeshd::start().await;
    for path in ["/inject", "/validate"] {
        let r = send(
            &t,
            Method::POST,
            path,
            Some("application/json"),
            b"{\"apiVersion\": ".to_vec(),
            false,
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        assert!(
            r.text().starts_with("malformed AdmissionReview: "),
            "{path}: {}",
            r.text()
        );
        let r = send(
            &t,
            Method::POST,
            path,
            Some("application/json"),
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
            true,
        )
        .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}");
        assert!(r.text().contains("has no request"), "{}", r.text());
        let r = send(&t, Method::POST, path, Some("application/json"), Vec::new(), false).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.text(), "no body found\n");
        let r = send(&t, Method::POST, path, Some("text/plain"), b"{}".to_vec(), false).await;
        assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let r = send(&t, Method::GET, path, None, Vec::new(), false).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    }
    let r = send(&t, Method::GET, "/ready", None, Vec::new(), true).await;
    assert_eq!((r.status, r.text().as_str()), (StatusCode::OK, "ready\n"));
    let r = send(&t, Method::GET, "/nope", None, Vec::new(), false).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_traffic() {
    let mut t = meshd_with_network().await;
    let original = pod_from_template(&deployment());
    // 3 injected, 2 skipped, 1 failed (not a Pod), 1 refused (malformed).
    for i in 0..3 {
        let uid = format!("ok-{i}");
        let resp = response(
            &post(&t, "/inject", &pod_review(&uid, "bookinfo", &original)).await,
            &uid,
        );
        assert!(resp.get("patch").is_some());
    }
    for (i, ns) in ["kube-system", "kube-public"].into_iter().enumerate() {
        let uid = format!("skip-{i}");
        response(&post(&t, "/inject", &pod_review(&uid, ns, &original)).await, &uid);
    }
    let not_a_pod = review(
        "dep",
        ("apps", "v1", "Deployment"),
        "deployments",
        "bookinfo",
        "CREATE",
        deployment(),
    );
    let resp = response(&post(&t, "/inject", &not_a_pod).await, "dep");
    assert_eq!(resp["allowed"], false, "injection errors are denied, as Istio does");
    assert!(
        resp["status"]["message"]
            .as_str()
            .unwrap()
            .contains("only Pods are injected"),
        "{resp}"
    );
    let r = send(
        &t,
        Method::POST,
        "/inject",
        Some("application/json"),
        b"[]".to_vec(),
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Validation: 2 passed VirtualServices, 1 failed DestinationRule, 1 ignored, 1 malformed.
    let vs = json!({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}]}]});
    for uid in ["v1", "v2"] {
        response(
            &post(&t, "/validate", &istio_review(uid, "VirtualService", vs.clone())).await,
            uid,
        );
    }
    response(
        &post(&t, "/validate", &istio_review("d1", "DestinationRule", json!({}))).await,
        "d1",
    );
    let mut ignored = istio_review("x", "VirtualService", vs.clone());
    ignored["request"]["operation"] = json!("DELETE");
    response(&post(&t, "/validate", &ignored).await, "x");
    let r = send(
        &t,
        Method::POST,
        "/validate",
        Some("application/json"),
        b"nope".to_vec(),
        false,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Read over HTTP from /metrics on 15014, as Prometheus would.
    let text = reqwest_metrics(&t).await;
    let m = |name: &str| metric_value(&text, name);
    assert_eq!(m("sidecar_injection_requests_total"), 7.0, "{text}");
    assert_eq!(m("sidecar_injection_success_total"), 3.0);
    assert_eq!(m("sidecar_injection_skip_total"), 2.0);
    assert_eq!(m("sidecar_injection_failure_total"), 2.0);
    assert_eq!(m("sidecar_injection_time_seconds_count"), 7.0);
    assert_eq!(
        m("galley_validation_passed{group=\"networking.istio.io\",version=\"v1\",resource=\"virtualservices\"}"),
        2.0
    );
    assert_eq!(
        m(
            "galley_validation_failed{group=\"networking.istio.io\",version=\"v1\",resource=\"destinationrules\",reason=\"invalid_resource\"}"
        ),
        1.0
    );
    assert_eq!(m("galley_validation_http_error{error=\"decode\"}"), 1.0);
    for name in [
        "sidecar_injection_requests_total",
        "sidecar_injection_success_total",
        "sidecar_injection_failure_total",
        "sidecar_injection_skip_total",
        "galley_validation_passed",
        "galley_validation_failed",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} counter\n")),
            "{name} exported verbatim"
        );
    }
    assert!(
        m("meshd_tls_handshakes{listener=\"webhook\"}") >= 12.0,
        "every request above was its own TLS connection"
    );
    t.stop().await;
}

/// GET /metrics from the monitoring port over plain HTTP/1.1.
async fn reqwest_metrics(t: &TestMeshd) -> String {
    let tcp = TcpStream::connect(t.m().addrs.monitoring).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/metrics")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// caBundle patching

async fn fake(ip: &str, name: &str) -> FakeApiServer {
    let s = FakeApiServer::start(FakeConfig::new(format!("{ip}:0").parse().unwrap(), name))
        .await
        .expect("fake apiserver starts");
    s.ensure_namespace("istio-system").unwrap();
    s
}

/// The webhook configurations Istio's chart installs (abridged), without caBundle.
fn install_webhook_configs(cluster: &FakeApiServer, injection_path: &str) {
    cluster
        .apply(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": INJECTOR, "labels": {"app": "sidecar-injector", "istio.io/rev": "default"}},
            "webhooks": [
                {"name": "namespace.sidecar-injector.istio.io",
                 "clientConfig": {"service": {"name": "istiod", "namespace": "istio-system", "path": injection_path, "port": 443}},
                 "namespaceSelector": {"matchExpressions": [{"key": "istio-injection", "operator": "In", "values": ["enabled"]}]},
                 "objectSelector": {"matchExpressions": [{"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]},
                 "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
                 "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Fail", "reinvocationPolicy": "Never"},
                {"name": "object.sidecar-injector.istio.io",
                 "clientConfig": {"service": {"name": "istiod", "namespace": "istio-system", "path": injection_path, "port": 443}},
                 "namespaceSelector": {"matchExpressions": [{"key": "istio-injection", "operator": "DoesNotExist"}]},
                 "objectSelector": {"matchExpressions": [{"key": "sidecar.istio.io/inject", "operator": "In", "values": ["true"]}]},
                 "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
                 "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Fail"},
            ],
        }))
        .unwrap();
    cluster
        .apply(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": VALIDATOR, "labels": {"app": "istiod", "istio.io/rev": "default"}},
            "webhooks": [
                {"name": "rev.validation.istio.io",
                 "clientConfig": {"service": {"name": "istiod", "namespace": "istio-system", "path": "/validate", "port": 443}},
                 "rules": [{"apiGroups": ["networking.istio.io"], "apiVersions": ["*"], "operations": ["CREATE", "UPDATE"], "resources": ["*"]}],
                 "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Ignore"},
            ],
        }))
        .unwrap();
}

fn mwc() -> ResourceType {
    ResourceType::new("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations")
}

fn vwc() -> ResourceType {
    ResourceType::new("admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations")
}

/// The caBundles of a configuration's webhooks (None where unset).
fn bundles(cluster: &FakeApiServer, rt: &ResourceType, name: &str) -> Vec<Option<String>> {
    cluster
        .get(rt, "", name)
        .and_then(|o| o["webhooks"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|w| w["clientConfig"]["caBundle"].as_str().map(String::from))
        .collect()
}

fn b64(pem: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(pem)
}

/// Both configurations of `cluster` carry `root` in every webhook.
fn patched(cluster: &FakeApiServer, root: &str) -> bool {
    let want = Some(b64(root));
    [(mwc(), INJECTOR), (vwc(), VALIDATOR)].iter().all(|(rt, n)| {
        let b = bundles(cluster, rt, n);
        !b.is_empty() && b.iter().all(|x| *x == want)
    })
}

fn unpatched(cluster: &FakeApiServer) -> bool {
    [(mwc(), INJECTOR), (vwc(), VALIDATOR)]
        .iter()
        .all(|(rt, n)| bundles(cluster, rt, n).iter().all(Option::is_none))
}

fn annotate_control_plane(cluster: &FakeApiServer, value: &str) {
    cluster
        .modify(&ResourceType::core("namespaces"), "", "istio-system", |ns| {
            ns["metadata"]["annotations"] = json!({"topology.istio.io/controlPlaneClusters": value});
        })
        .unwrap();
}

fn add_remote_secret(primary: &FakeApiServer, remote: &FakeApiServer, id: &str) {
    let token = remote.reader_token("istio-reader-service-account").unwrap();
    primary
        .apply(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("istio-remote-secret-{id}"), "namespace": "istio-system",
                         "labels": {"istio/multiCluster": "true"}},
            "stringData": {id: remote.kubeconfig(&token)},
        }))
        .unwrap();
}

/// A root and an intermediate, as an operator's `cacerts` would hold them; returns the root PEM.
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

async fn meshd_on(primary: &FakeApiServer, tweak: impl FnOnce(&mut meshd::config::ServeArgs)) -> TestMeshd {
    let kdir = tempfile::tempdir().unwrap();
    let kc = kdir.path().join("primary.yaml");
    std::fs::write(&kc, primary.kubeconfig(primary.admin_token())).unwrap();
    TestMeshd::start_with(|a| {
        a.standalone = false;
        a.kubeconfig = Some(kc.clone());
        a.cluster_id = "cluster1".into();
        a.leader_election_lease_duration = Duration::from_secs(2);
        tweak(a);
    })
    .await
}

fn patches(t: &TestMeshd, cluster: &str) -> f64 {
    t.metric(&format!("meshd_webhook_cabundle_patches{{cluster=\"{cluster}\"}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cabundle_patched_in_primary_and_led_remote_only_and_follows_the_root() {
    let mut primary = fake("127.0.0.2", "cluster1").await;
    let mut led = fake("127.0.0.3", "cluster2").await;
    let mut unled = fake("127.0.0.4", "cluster3").await;
    install_webhook_configs(&primary, "/inject");
    install_webhook_configs(&led, "/inject/cluster/cluster2/net/network2");
    install_webhook_configs(&unled, "/inject/cluster/cluster3/net/network3");
    annotate_control_plane(&led, "cluster1");
    annotate_control_plane(&unled, "some-other-primary");

    let cadir = tempfile::tempdir().unwrap();
    let root1 = plugged_ca(cadir.path());
    let mut t = meshd_on(&primary, |a| {
        a.ca_dir = Some(cadir.path().to_path_buf());
        a.ca_reload_interval = Duration::from_millis(100);
    })
    .await;
    assert_eq!(String::from_utf8(t.root_pem()).unwrap(), root1);
    add_remote_secret(&primary, &led, "cluster2");
    add_remote_secret(&primary, &unled, "cluster3");

    eventually("caBundle patched in the primary", WAIT, async || {
        patched(&primary, &root1)
    })
    .await;
    eventually("caBundle patched in the led remote", WAIT, async || {
        patched(&led, &root1)
    })
    .await;
    // Other fields of the configurations are kept.
    let m = primary.get(&mwc(), "", INJECTOR).unwrap();
    assert_eq!(m["webhooks"][0]["clientConfig"]["service"]["path"], "/inject");
    assert_eq!(m["webhooks"][0]["reinvocationPolicy"], "Never");
    assert_eq!(m["metadata"]["labels"]["istio.io/rev"], "default");
    let m = led.get(&mwc(), "", INJECTOR).unwrap();
    assert_eq!(
        m["webhooks"][1]["clientConfig"]["service"]["path"],
        "/inject/cluster/cluster2/net/network2"
    );
    eventually("patches counted per cluster", WAIT, async || {
        patches(&t, "cluster1") >= 2.0 && patches(&t, "cluster2") >= 2.0
    })
    .await;

    // The un-led remote: registered and its system namespace read, but never touched.
    eventually("cluster3 registered and its namespace read", WAIT, async || {
        t.m().clusters.remote("cluster3").is_some()
            && unled.request_count("list", "namespaces") + unled.request_count("watch", "namespaces") > 0
    })
    .await;

    // A configuration edited by someone else is repaired; one created later is patched.
    led.modify(&mwc(), "", INJECTOR, |o| {
        o["webhooks"][0]["clientConfig"]["caBundle"] = json!(b64("not the root"));
    })
    .unwrap();
    primary.delete(&vwc(), "", VALIDATOR);
    eventually("edited caBundle repaired", WAIT, async || patched(&led, &root1)).await;
    install_webhook_configs(&primary, "/inject");
    eventually("re-created configuration patched", WAIT, async || {
        patched(&primary, &root1)
    })
    .await;

    // A root change re-patches both clusters.
    let staging = tempfile::tempdir().unwrap();
    let root2 = plugged_ca(staging.path());
    for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"] {
        std::fs::copy(staging.path().join(f), cadir.path().join(f)).unwrap();
    }
    eventually("root2 in the primary and the led remote", WAIT, async || {
        patched(&primary, &root2) && patched(&led, &root2)
    })
    .await;

    // Still nothing in cluster3, well after every other cluster was handled.
    assert!(
        unpatched(&unled),
        "a remote that does not name this control plane is not patched"
    );
    assert_eq!(unled.request_count("update", "mutatingwebhookconfigurations"), 0);
    assert_eq!(unled.request_count("update", "validatingwebhookconfigurations"), 0);
    assert_eq!(patches(&t, "cluster3"), 0.0);

    t.stop().await;
    primary.stop().await;
    led.stop().await;
    unled.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cabundle_patched_without_root_configmaps_and_missing_configs_are_fine() {
    let mut primary = fake("127.0.0.2", "cluster1").await;
    primary.ensure_namespace("app").unwrap();
    let mut t = meshd_on(&primary, |a| a.root_cert_configmaps = false).await;
    let root = String::from_utf8(t.root_pem()).unwrap();
    // Nothing to patch yet: the leader runs, finds no configuration, and waits.
    eventually("the leader is elected", WAIT, async || {
        t.metric("meshd_root_cert_leader{cluster=\"cluster1\"}") == 1.0
    })
    .await;
    assert_eq!(patches(&t, "cluster1"), 0.0);
    install_webhook_configs(&primary, "/inject");
    eventually("patched once the configurations appear", WAIT, async || {
        patched(&primary, &root)
    })
    .await;
    assert!(
        primary.get_typed::<ConfigMap>("app", "istio-ca-root-cert").is_none(),
        "--root-cert-configmaps false writes no ConfigMaps"
    );
    t.stop().await;
    primary.stop().await;
}
