//! xDS request handling on a live connection: a sequence of DiscoveryRequest or
//! DeltaDiscoveryRequest messages (and model pushes between them) driven through meshd's real ADS
//! service (`XdsServer::service`, the tower service tonic routes 15010/15012 to), in memory: the
//! request is an `http::Request` whose body is a channel of gRPC frames, the response body is
//! read as gRPC frames by a task of its own.
//!
//! The runtime is a current-thread tokio runtime with paused time: "let the server settle" is a
//! sleep that returns once every task is idle, so runs are deterministic and never wait on a
//! wall clock. The model is `examples/config-dir` (two clusters, a gateway, a VirtualService and
//! a DestinationRule), loaded once; each input gets a fresh `XdsServer`.
//!
//! Input: byte 0 picks the stream: bit 0 Delta (else SotW), bit 1 the authenticated service
//! (bearer token of `default/echo`; else the plaintext one). Then ops `[op, len_hi, len_lo,
//! payload...]`, op % 8:
//! - 0: payload is a request message (protobuf); sent as decoded, skipped if it does not decode;
//! - 1: the same, with `response_nonce` (and SotW `version_info`) set to the last ones received
//!   for its type: an ACK, or a NACK when it has `error_detail`;
//! - 2: the same, with the first nonce received for its type (stale once there are others);
//! - 3: payload sent as the gRPC message as is (the server's decoder sees arbitrary bytes);
//! - 4: push a full change (payload[0] picks the model: as loaded, or without the echo service);
//! - 5: push an endpoint change of echo (payload bits keep or drop each of its endpoints);
//! - 6: push an endpoint change naming a host that does not exist;
//! - 7: the client half-closes; later ops are ignored.
//!
//! Asserts: nothing panics (in any task); every response decodes as the stream's response type,
//! has a known type URL, a fresh nonce and resources of its own type; a Delta response never
//! both updates and removes one name; the plaintext service never sends a secret; the stream
//! ends once the client half-closes, with OK or a status meant for a bad request (never
//! Internal/Unknown), and leaves no connection registered; a fresh stream on the same server still
//! gets clusters.
#![no_main]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use libfuzzer_sys::fuzz_target;
use meshd::admin::Registry;
use meshd::auth::cache::{CacheConfig, ReviewCache};
use meshd::auth::issuer::LocalIssuer;
use meshd::auth::jwt::JwtAuthenticator;
use meshd::auth::{AuthChain, Authenticator};
use meshd::clock::{SharedClock, SystemClock};
use meshd::registry::file_source::FileSource;
use meshd::registry::kube_source::RegistrySettings;
use meshd::registry::{Change, MeshStore, Snapshot};
use meshd::xds::XdsServer;
use meshd::xds::push::PushTarget;
use meshd::xds::server::XdsSettings;
use meshd::xds::types;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tower::Service;

const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const ECHO: &str = "echo.default.svc.cluster.local";
/// How long "settle" sleeps (virtual time: it returns as soon as every task is idle).
const SETTLE: Duration = Duration::from_millis(5);

struct Fixture {
    rt: tokio::runtime::Runtime,
    base: Arc<Snapshot>,
    auth: Arc<AuthChain>,
    token: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let mesh = MeshStore::new();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config-dir");
        let settings = RegistrySettings {
            trust_domain: "cluster.local".into(),
            system_namespace: "istio-system".into(),
        };
        let mut source = FileSource::new(dir.clone(), "cluster1", settings, Arc::clone(&mesh));
        assert!(source.poll(), "loading {}", dir.display());
        let base = mesh.snapshot();
        assert!(base.service(ECHO).is_some(), "the example model has {ECHO}");
        assert!(!base.endpoints(ECHO).is_empty());

        let clock: SharedClock = Arc::new(SystemClock);
        let cache = Arc::new(ReviewCache::new(CacheConfig::default(), Arc::clone(&clock)));
        let issuer = LocalIssuer::generate().unwrap();
        let audiences = vec!["istio-ca".to_string()];
        let jwt = JwtAuthenticator::new(issuer.rule(&audiences), "cluster.local", clock, cache, &Registry::new());
        let auth = Arc::new(AuthChain::new(vec![Arc::new(jwt) as Arc<dyn Authenticator>]));
        let token = issuer
            .mint(
                "default",
                "echo",
                &audiences,
                Duration::from_secs(365 * 24 * 3600),
                std::time::SystemTime::now(),
            )
            .unwrap();
        Fixture { rt, base, auth, token }
    })
}

/// The model without the echo service (a full push that removes clusters, routes, endpoints).
fn without_echo(base: &Snapshot, version: u64) -> Snapshot {
    let mut services = base.services.clone();
    let mut endpoints = base.endpoints.clone();
    services.remove(ECHO);
    endpoints.remove(ECHO);
    Snapshot {
        version,
        services,
        endpoints,
        config: Arc::clone(&base.config),
        networks: Arc::clone(&base.networks),
    }
}

fn with_echo_endpoints(base: &Snapshot, version: u64, keep: &[u8]) -> Snapshot {
    let mut endpoints = base.endpoints.clone();
    let eps: Vec<_> = base
        .endpoints(ECHO)
        .iter()
        .enumerate()
        .filter(|(i, _)| keep.get(i / 8).is_none_or(|b| b & (1 << (i % 8)) != 0))
        .map(|(_, e)| e.clone())
        .collect();
    endpoints.insert(ECHO.into(), Arc::new(eps));
    Snapshot {
        version,
        services: base.services.clone(),
        endpoints,
        config: Arc::clone(&base.config),
        networks: Arc::clone(&base.networks),
    }
}

/// A gRPC message frame: no compression, big-endian length, the message.
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

type ReqBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// What the response reader saw.
#[derive(Default)]
struct Received {
    messages: Vec<Bytes>,
    status: Option<(i32, String)>,
    ended: bool,
}

struct Stream {
    tx: Option<mpsc::Sender<Result<Frame<Bytes>, Infallible>>>,
    received: Arc<Mutex<Received>>,
    reader: tokio::task::JoinHandle<()>,
}

fn grpc_status(headers: &http::HeaderMap) -> Option<(i32, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let msg = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Some((code, msg))
}

async fn open(server: &XdsServer, delta: bool, secure: bool, token: &str) -> Stream {
    let (tx, rx) = mpsc::channel(64);
    let mut req = http::Request::builder()
        .method("POST")
        .uri(if delta { DELTA_PATH } else { SOTW_PATH })
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if secure {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req.body(ReqBody::new(ReceiverStream::new(rx))).unwrap();
    let mut svc = server.service(secure);
    let resp = svc.call(req).await.unwrap_or_else(|e: Infallible| match e {});
    let received = Arc::new(Mutex::new(Received::default()));
    let sink = Arc::clone(&received);
    let reader = tokio::spawn(async move {
        let (parts, mut body) = resp.into_parts();
        if let Some(s) = grpc_status(&parts.headers) {
            sink.lock().unwrap().status = Some(s);
        }
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("the response body of an in-memory stream does not fail");
            match frame.into_data() {
                Ok(data) => {
                    buf.extend_from_slice(&data);
                    while buf.len() >= 5 {
                        assert_eq!(buf[0], 0, "responses are not compressed");
                        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                        if buf.len() < 5 + len {
                            break;
                        }
                        buf.advance(5);
                        let msg = buf.split_to(len).freeze();
                        sink.lock().unwrap().messages.push(msg);
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers()
                        && let Some(s) = grpc_status(&trailers)
                    {
                        sink.lock().unwrap().status = Some(s);
                    }
                }
            }
        }
        assert!(buf.is_empty(), "the response ended inside a message");
        sink.lock().unwrap().ended = true;
    });
    Stream {
        tx: Some(tx),
        received,
        reader,
    }
}

impl Stream {
    async fn send(&self, msg: &[u8]) {
        if let Some(tx) = &self.tx {
            // The server may have ended the stream already; that is fine.
            let _ = tx.send(Ok(Frame::data(grpc_frame(msg)))).await;
        }
    }

    fn take(&self) -> Vec<Bytes> {
        std::mem::take(&mut self.received.lock().unwrap().messages)
    }
}

async fn settle() {
    tokio::time::sleep(SETTLE).await;
}

/// Per-type nonces and versions the client has seen, and invariants over all responses.
#[derive(Default)]
struct Client {
    delta: bool,
    secure: bool,
    nonces_seen: HashSet<String>,
    first: HashMap<String, (String, String)>,
    last: HashMap<String, (String, String)>,
    responses: usize,
}

impl Client {
    fn absorb(&mut self, messages: Vec<Bytes>) {
        for m in messages {
            self.responses += 1;
            let (type_url, version, nonce) = if self.delta {
                let r = DeltaDiscoveryResponse::decode(m).expect("a Delta response decodes");
                let mut names = BTreeSet::new();
                for res in &r.resources {
                    assert!(!res.name.is_empty(), "a Delta resource without a name");
                    assert!(
                        names.insert(res.name.clone()),
                        "{} sent twice in one response",
                        res.name
                    );
                    if let Some(any) = &res.resource {
                        assert_eq!(any.type_url, r.type_url, "resource of another type");
                    }
                }
                for gone in &r.removed_resources {
                    assert!(!names.contains(gone), "{gone} both updated and removed");
                }
                self.check_type(&r.type_url, r.resources.len());
                (r.type_url, r.system_version_info, r.nonce)
            } else {
                let r = DiscoveryResponse::decode(m).expect("a SotW response decodes");
                for any in &r.resources {
                    assert_eq!(any.type_url, r.type_url, "resource of another type");
                }
                self.check_type(&r.type_url, r.resources.len());
                (r.type_url, r.version_info, r.nonce)
            };
            assert!(!nonce.is_empty(), "a response without a nonce");
            assert!(self.nonces_seen.insert(nonce.clone()), "nonce {nonce} reused");
            self.first
                .entry(type_url.clone())
                .or_insert_with(|| (version.clone(), nonce.clone()));
            self.last.insert(type_url, (version, nonce));
        }
    }

    fn check_type(&self, type_url: &str, resources: usize) {
        assert!(types::is_known(type_url), "response of unknown type {type_url:?}");
        if type_url == types::SECRET && !self.secure {
            assert_eq!(resources, 0, "a secret on the plaintext port");
        }
    }
}

/// Applies op 1/2 (ACK with the last or the first nonce) to a decoded request.
fn with_nonce(client: &Client, type_url: &str, first: bool) -> Option<(String, String)> {
    let m = if first { &client.first } else { &client.last };
    m.get(type_url).cloned()
}

async fn run(f: &Fixture, data: &[u8]) {
    let Some((&flags, mut ops)) = data.split_first() else {
        return;
    };
    let delta = flags & 1 != 0;
    let secure = flags & 2 != 0;
    let registry = Registry::new();
    let server = XdsServer::new(
        Arc::clone(&f.base),
        Arc::clone(&f.auth),
        &registry,
        XdsSettings::default(),
    );
    let stream = open(&server, delta, secure, &f.token).await;
    let mut stream = stream;
    let mut client = Client {
        delta,
        secure,
        ..Default::default()
    };
    let mut version = f.base.version;
    while let [op, hi, lo, rest @ ..] = ops {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
        let (payload, next) = rest.split_at(len);
        ops = next;
        match op % 8 {
            op @ 0..=2 => {
                let msg = if delta {
                    let Ok(mut r) = DeltaDiscoveryRequest::decode(payload) else {
                        continue;
                    };
                    if op != 0
                        && let Some((_, nonce)) = with_nonce(&client, &r.type_url, op == 2)
                    {
                        r.response_nonce = nonce;
                    }
                    r.encode_to_vec()
                } else {
                    let Ok(mut r) = DiscoveryRequest::decode(payload) else {
                        continue;
                    };
                    if op != 0
                        && let Some((v, nonce)) = with_nonce(&client, &r.type_url, op == 2)
                    {
                        r.version_info = v;
                        r.response_nonce = nonce;
                    }
                    r.encode_to_vec()
                };
                stream.send(&msg).await;
            }
            3 => stream.send(payload).await,
            4 => {
                version += 1;
                let snap = match payload.first() {
                    Some(b) if b % 2 == 1 => without_echo(&f.base, version),
                    _ => with_echo_endpoints(&f.base, version, &[]),
                };
                let change = Change {
                    full: true,
                    reasons: ["fuzz"].into(),
                    ..Default::default()
                };
                server.push(Arc::new(snap), change, tokio::time::Instant::now());
            }
            5 | 6 => {
                version += 1;
                let (snap, host) = if op % 8 == 5 {
                    (with_echo_endpoints(&f.base, version, payload), ECHO.to_string())
                } else {
                    let s = with_echo_endpoints(&f.base, version, &[]);
                    (s, String::from_utf8_lossy(payload).into_owned())
                };
                let change = Change {
                    endpoint_hosts: BTreeSet::from([host]),
                    reasons: ["fuzz"].into(),
                    ..Default::default()
                };
                server.push(Arc::new(snap), change, tokio::time::Instant::now());
            }
            _ => break,
        }
        settle().await;
        client.absorb(stream.take());
    }
    // Half-close: the server must end the stream.
    stream.tx = None;
    let reader = std::mem::replace(&mut stream.reader, tokio::spawn(async {}));
    tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("the stream did not end after the client half-closed")
        .expect("the response reader failed");
    client.absorb(stream.take());
    let status = stream.received.lock().unwrap().status.clone();
    let (code, message) = status.expect("the stream ended without a grpc-status");
    let code = tonic::Code::from(code);
    assert!(
        !matches!(
            code,
            tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::DataLoss
        ),
        "stream ended with {code:?}: {message}"
    );
    settle().await;
    assert!(
        server.connections().is_empty(),
        "a connection is still registered after its stream ended"
    );

    // The server still serves: a fresh SotW stream gets clusters.
    let probe = open(&server, false, false, &f.token).await;
    let req = DiscoveryRequest {
        node: Some(sidecar_node()),
        type_url: types::CLUSTER.into(),
        ..Default::default()
    };
    probe.send(&req.encode_to_vec()).await;
    settle().await;
    let got = probe.take();
    let cds = got
        .iter()
        .filter_map(|m| DiscoveryResponse::decode(m.clone()).ok())
        .find(|r| r.type_url == types::CLUSTER)
        .expect("a fresh stream got no CDS response");
    assert!(!cds.resources.is_empty(), "a fresh stream got no clusters");
    drop(probe);
    let _ = registry;
}

fn sidecar_node() -> Node {
    let md: BTreeMap<String, Value> = [("CLUSTER_ID", "cluster1"), ("NAMESPACE", "default")]
        .into_iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                Value {
                    kind: Some(Kind::StringValue(v.into())),
                },
            )
        })
        .collect();
    Node {
        id: "sidecar~127.0.0.10~probe.default~default.svc.cluster.local".into(),
        metadata: Some(Struct {
            fields: md.into_iter().collect(),
        }),
        ..Default::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    f.rt.block_on(run(f, data));
});
