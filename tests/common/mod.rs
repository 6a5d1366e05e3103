//! Shared helpers for end-to-end tests: start meshd in-process on ephemeral loopback ports and
//! talk to it with the same client code `meshd cert` uses.
#![allow(dead_code)]

pub mod xds;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use meshd::app::Meshd;
use meshd::auth::issuer::LocalIssuer;
use meshd::config::ServeArgs;
use meshd::pki::keys::KeyType;
use meshd::proto::istio_ca::IstioCertificateRequest;
use meshd::proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

pub const SERVER_NAME: &str = "istiod.istio-system.svc";
pub const AUDIENCE: &str = "istio-ca";

pub struct TestMeshd {
    pub meshd: Option<Meshd>,
    pub dir: tempfile::TempDir,
}

impl TestMeshd {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServeArgs)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args = ServeArgs::for_tests(dir.path().join("data"));
        tweak(&mut args);
        let meshd = meshd::app::start(args).await.expect("meshd starts");
        Self {
            meshd: Some(meshd),
            dir,
        }
    }

    pub fn m(&self) -> &Meshd {
        self.meshd.as_ref().expect("running")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.m().data_dir.clone()
    }

    pub fn root_pem(&self) -> Vec<u8> {
        std::fs::read(self.m().root_cert_path()).expect("root-cert.pem")
    }

    pub fn token(&self, ns: &str, sa: &str) -> String {
        mint(
            &self.data_dir(),
            ns,
            sa,
            &[AUDIENCE],
            Duration::from_secs(3600),
            SystemTime::now(),
        )
    }

    pub async fn channel(&self) -> Channel {
        meshd::client::connect(&self.m().addrs.grpc.to_string(), SERVER_NAME, &self.root_pem(), None)
            .await
            .expect("connect")
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&self.m().registry.encode(), name)
    }

    pub async fn stop(&mut self) {
        if let Some(m) = self.meshd.take() {
            m.shutdown().await;
        }
    }
}

pub fn mint(data_dir: &Path, ns: &str, sa: &str, aud: &[&str], ttl: Duration, now: SystemTime) -> String {
    let aud: Vec<String> = aud.iter().map(|s| s.to_string()).collect();
    LocalIssuer::load_or_create(data_dir)
        .expect("issuer")
        .mint(ns, sa, &aud, ttl, now)
        .expect("mint")
}

/// Reads one sample (`name` or `name{labels}`) from Prometheus text.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().ok())?
        })
        .unwrap_or(0.0)
}

pub fn csr(key_type: KeyType, uri: Option<&str>) -> String {
    let id = uri.map(|u| meshd::pki::SpiffeId::parse(u).expect("spiffe"));
    meshd::client::make_csr(key_type, id.as_ref()).expect("csr").1
}

/// One CreateCertificate call.
pub async fn create(
    channel: Channel,
    token: Option<&str>,
    cluster_id: Option<&str>,
    csr: String,
    validity_duration: i64,
) -> Result<Vec<String>, tonic::Status> {
    let mut client = IstioCertificateServiceClient::new(channel).max_decoding_message_size(16 << 20);
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration,
        metadata: None,
    });
    if let Some(t) = token {
        req.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from(format!("Bearer {t}")).expect("ascii"),
        );
    }
    if let Some(c) = cluster_id {
        req.metadata_mut()
            .insert("clusterid", MetadataValue::try_from(c).expect("ascii"));
    }
    client.create_certificate(req).await.map(|r| r.into_inner().cert_chain)
}

/// Polls `f` until it returns true or the deadline passes.
pub async fn eventually(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn leaf_facts(chain: &[String]) -> meshd::pki::cert::CertFacts {
    let der = meshd::pki::pem::parse_certs(chain[0].as_bytes())
        .expect("leaf pem")
        .remove(0);
    meshd::pki::cert::facts(&der).expect("leaf parses")
}

/// A plain HTTP/1.1 GET with extra headers: the status and the body as text.
pub async fn http_get(addr: std::net::SocketAddr, path_and_query: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let mut req = http::Request::get(path_and_query).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(http_body_util::Empty::<bytes::Bytes>::new()).unwrap())
        .await
        .expect("response");
    let status = resp.status().as_u16();
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// This machine's first non-loopback IPv4 address (found with a UDP `connect`, which sends
/// nothing), for tests of what non-loopback callers get.
pub fn non_loopback_ip() -> std::net::IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
    s.connect("192.0.2.1:9")
        .expect("a route off loopback (tests of non-loopback callers need one network interface)");
    let ip = s.local_addr().expect("local addr").ip();
    assert!(!ip.is_loopback(), "no non-loopback address on this machine");
    ip
}

/// A protobuf `Struct` of string values.
fn string_struct(pairs: &[(&str, &str)]) -> envoy_types::pb::google::protobuf::Struct {
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    Struct {
        fields: pairs
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    Value {
                        kind: Some(Kind::StringValue(v.to_string())),
                    },
                )
            })
            .collect(),
    }
}

/// [`xds_node`] with the proxy's `LABELS` (gateways are selected by them).
pub fn xds_node_with_labels(
    id: &str,
    md: &[(&str, &str)],
    labels: &[(&str, &str)],
) -> envoy_types::pb::envoy::config::core::v3::Node {
    use envoy_types::pb::google::protobuf::{Value, value::Kind};
    let mut n = xds_node(id, md);
    if let Some(m) = n.metadata.as_mut() {
        m.fields.insert(
            "LABELS".into(),
            Value {
                kind: Some(Kind::StructValue(string_struct(labels))),
            },
        );
    }
    n
}

/// An Envoy `Node` with string metadata, as the xDS tests send on a stream's first request.
pub fn xds_node(id: &str, md: &[(&str, &str)]) -> envoy_types::pb::envoy::config::core::v3::Node {
    envoy_types::pb::envoy::config::core::v3::Node {
        id: id.into(),
        metadata: Some(string_struct(md)),
        ..Default::default()
    }
}
