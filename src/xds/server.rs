//! The ADS service (`envoy.service.discovery.v3.AggregatedDiscoveryService`), SotW and Delta,
//! with istiod's protocol rules (reference §5.3) and per-connection push slots: a push only marks
//! a connection's slot and wakes it, so a slow or stuck client never delays another, and its
//! pending pushes coalesce into one.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tracing::Instrument as _;

use arc_swap::ArcSwap;
use bytes::Bytes;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tonic::Status;

use super::generators;
use super::held::{Diff, Held, changed_diff, full_diff};
use super::interned::{self, NameSet};
use super::node::{self, ProxyInfo};
use super::push::{PushContext, PushTarget, next_nonce};
use super::requests::{RequestStream, SotwRequest};
use super::resource::{Resource, ResourceSet};
use super::types;
use super::wire::{self, GrpcFrame};
use crate::admin::Registry;
use crate::admin::metrics::{Counter, CounterVec, Gauge, Histogram};
use crate::auth::{AuthChain, Credentials, FailureKind, Identity};
use crate::registry::{Change, Snapshot};

pub const SERVICE_NAME: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// What a stream ended by shutdown is told; proxies reconnect (to another replica) on it.
const SHUTTING_DOWN: &str = "meshd is shutting down; reconnect to another replica";
/// How long a new stream waits for a starting server's first push before UNAVAILABLE.
pub const NOT_READY_WAIT: Duration = Duration::from_secs(5);
/// How long a new stream may wait for its slot under the rate limit (istiod: 1 s).
const NEW_STREAM_MAX_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone)]
struct Metrics {
    connected: Arc<Gauge>,
    pushes: CounterVec,
    rejects: CounterVec,
    expired_nonce: CounterVec,
    convergence: Arc<Histogram>,
    errors: CounterVec,
    /// Bytes of responses handed to streams (`meshd_xds_sent_bytes`; with
    /// `meshd_xds_encoded_bytes` it shows how much of a push is shared encoding).
    sent_bytes: Arc<Counter>,
}

impl Metrics {
    fn register(r: &Registry) -> Self {
        r.counter_from(
            "meshd_xds_encoded_bytes",
            "Bytes of xDS resources encoded (each resource once per version, shared by every proxy that gets it); process-wide.",
            Arc::clone(super::resource::encoded_bytes()),
        );
        Self {
            connected: r
                .gauge_vec(
                    "pilot_xds",
                    "Number of endpoints connected to this pilot using XDS.",
                    &["version"],
                )
                .with(&["meshd"]),
            pushes: r.counter_vec(
                "pilot_xds_pushes",
                "Pilot build and send errors for lds, rds, cds and eds.",
                &["type"],
            ),
            rejects: r.counter_vec(
                "pilot_total_xds_rejects",
                "Total number of XDS responses from pilot rejected by proxy.",
                &["type"],
            ),
            expired_nonce: r.counter_vec(
                "pilot_xds_expired_nonce",
                "Total number of XDS requests with an expired nonce.",
                &["type"],
            ),
            convergence: r.histogram(
                "pilot_proxy_convergence_time",
                "Delay in seconds between config change and a proxy receiving all required configuration.",
                &[0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0],
            ),
            errors: r.counter_vec(
                "meshd_xds_stream_errors",
                "xDS streams refused or ended with an error, by gRPC code.",
                &["code"],
            ),
            sent_bytes: r.counter(
                "meshd_xds_sent_bytes",
                "Bytes of xDS responses (DiscoveryResponse and DeltaDiscoveryResponse messages) sent to streams.",
            ),
        }
    }
}

/// What a push asks a connection to send.
#[derive(Debug, Clone)]
struct PendingPush {
    full: bool,
    hosts: BTreeSet<String>,
    started: Instant,
}

/// One connection's push slot and its debug state.
struct ConnSlot {
    pending: Mutex<Option<PendingPush>>,
    notify: Notify,
    status: Mutex<ConnStatus>,
    /// The proxy as its first request described it, for `/debug/config_dump`.
    proxy: OnceLock<Arc<ProxyInfo>>,
}

/// Per-connection state shown by `/debug/syncz` and `/debug/connections`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnStatus {
    pub conn_id: u64,
    pub node_id: String,
    pub identity: Option<String>,
    pub cluster_id: String,
    pub delta: bool,
    pub peer: Option<String>,
    /// type short name → status
    pub types: BTreeMap<&'static str, TypeStatus>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeStatus {
    pub nonce_sent: Option<String>,
    pub nonce_acked: Option<String>,
    pub version_sent: Option<String>,
    pub resources_sent: usize,
    pub last_nack: Option<String>,
    pub nacks: u64,
}

struct Shared {
    auth: Arc<AuthChain>,
    current: ArcSwap<PushContext>,
    conns: Mutex<HashMap<u64, Arc<ConnSlot>>>,
    next_conn: AtomicU64,
    metrics: Metrics,
    /// Bounds concurrent resource generation (`PILOT_PUSH_THROTTLE`).
    gen_permits: Arc<Semaphore>,
    /// Set once at shutdown: every stream ends with UNAVAILABLE so its proxy reconnects to
    /// another replica instead of holding the draining connection open.
    closing: watch::Sender<bool>,
    /// False while the served push context trails the service model at startup; new streams
    /// wait for it (istiod refuses them: "server is not ready to serve discovery information").
    ready: watch::Sender<bool>,
    settings: XdsSettings,
    /// New streams per second (`PILOT_MAX_REQUESTS_PER_SECOND`).
    new_streams: crate::limits::rate::RateLimiter,
    rate_refused: Arc<crate::admin::metrics::Counter>,
    write_timeouts: Arc<crate::admin::metrics::Counter>,
    /// Exported only: counted where EDS is encoded.
    _eds_bytes: Arc<crate::admin::metrics::Counter>,
}

/// Tunables of the xDS server (see the matching flags in src/config.rs).
#[derive(Debug, Clone)]
pub struct XdsSettings {
    /// Concurrent resource generations (`PILOT_PUSH_THROTTLE`).
    pub push_throttle: usize,
    pub max_recv_message_bytes: usize,
    /// ≤ 0: unlimited.
    pub new_streams_per_second: f64,
    /// Responses queued per stream.
    pub send_queue: usize,
    /// `None`: wait forever for a proxy to take a response.
    pub send_timeout: Option<Duration>,
}

impl Default for XdsSettings {
    fn default() -> Self {
        Self {
            push_throttle: 20,
            max_recv_message_bytes: 4 * 1024 * 1024,
            new_streams_per_second: 0.0,
            send_queue: 4,
            send_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// The xDS server; cloning shares it. Serve it on a listener with [`XdsServer::service`].
#[derive(Clone)]
pub struct XdsServer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for XdsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsServer").finish()
    }
}

impl XdsServer {
    pub fn new(snapshot: Arc<Snapshot>, auth: Arc<AuthChain>, registry: &Registry, settings: XdsSettings) -> Self {
        let push_throttle = settings.push_throttle;
        let limits = crate::limits::LimitMetrics::register(registry);
        Self {
            shared: Arc::new(Shared {
                new_streams: crate::limits::rate::RateLimiter::new(settings.new_streams_per_second, 1),
                rate_refused: limits.counter("new_stream_rate"),
                write_timeouts: registry.counter("pilot_xds_write_timeout", "Pilot XDS response write timeouts."),
                _eds_bytes: registry.counter_from(
                    "meshd_xds_eds_bytes_encoded",
                    "Bytes of ClusterLoadAssignments encoded (once per network view and host change)",
                    super::generators::eds::encoded_bytes(),
                ),
                settings,
                auth,
                current: ArcSwap::from_pointee(PushContext::initial(Arc::from(super::push::new_epoch()), snapshot)),
                conns: Mutex::default(),
                next_conn: AtomicU64::new(1),
                metrics: Metrics::register(registry),
                gen_permits: Arc::new(Semaphore::new(push_throttle.max(1))),
                closing: watch::Sender::new(false),
                ready: watch::Sender::new(true),
            }),
        }
    }

    /// The gRPC service for one listener. `secure` listeners authenticate every stream; the
    /// plaintext one serves unauthenticated proxies and never secrets.
    pub fn service(&self, secure: bool) -> AdsService {
        AdsService {
            shared: Arc::clone(&self.shared),
            secure,
        }
    }

    pub fn current(&self) -> Arc<PushContext> {
        self.shared.current.load_full()
    }

    /// Where gateway credentials (SDS `kubernetes://…`) come from, from the next context on;
    /// set once at startup, before proxies connect.
    pub fn set_secret_source(&self, secrets: Arc<dyn super::generators::router::SecretSource>) {
        let prev = self.shared.current.load_full();
        let change = Change {
            full: true,
            reasons: ["secret-source"].into(),
            ..Default::default()
        };
        let next = PushContext::next(&prev, Arc::clone(&prev.snapshot), change).with_secrets(secrets);
        self.shared.current.store(Arc::new(next));
    }

    /// New streams wait (up to [`NOT_READY_WAIT`], then UNAVAILABLE) until [`Self::set_ready`]:
    /// for a server whose first push has not happened yet.
    pub fn hold_until_ready(&self) {
        self.shared.ready.send_replace(false);
    }

    pub fn set_ready(&self) {
        self.shared.ready.send_replace(true);
    }

    /// Ends every open stream with UNAVAILABLE and refuses new ones: the drain step of a
    /// graceful shutdown (GOAWAY alone leaves long-lived ADS streams open until the deadline).
    pub fn close_streams(&self) {
        self.shared.closing.send_replace(true);
    }

    /// Connected proxies whose node id or `<pod>.<namespace>` is `proxy_id` (istioctl's
    /// `proxyID`), newest connection first.
    pub fn proxies(&self, proxy_id: &str) -> Vec<Arc<ProxyInfo>> {
        let conns = self.shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut found: Vec<(u64, Arc<ProxyInfo>)> = conns
            .iter()
            .filter_map(|(id, c)| c.proxy.get().map(|p| (*id, Arc::clone(p))))
            .filter(|(_, p)| p.node_id == proxy_id || p.pod_id == proxy_id)
            .collect();
        found.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
        found.into_iter().map(|(_, p)| p).collect()
    }

    /// Debug state of every connection.
    pub fn connections(&self) -> Vec<ConnStatus> {
        let conns: Vec<Arc<ConnSlot>> = self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut out: Vec<ConnStatus> = conns
            .iter()
            .map(|c| c.status.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        out.sort_by_key(|c| c.conn_id);
        out
    }
}

impl PushTarget for XdsServer {
    fn push(&self, snapshot: Arc<Snapshot>, change: Change, first_event: Instant) {
        let prev = self.shared.current.load_full();
        let ctx = Arc::new(PushContext::next(&prev, snapshot, change.clone()));
        tracing::debug!(version = %ctx.version, full = change.full, hosts = change.endpoint_hosts.len(), "push");
        self.shared.current.store(ctx);
        if change.full {
            // Names of removed resources, once no stream holds them.
            interned::prune();
        }
        let conns: Vec<Arc<ConnSlot>> = self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for c in conns {
            let mut p = c.pending.lock().unwrap_or_else(|e| e.into_inner());
            match p.as_mut() {
                Some(p) => {
                    p.full |= change.full;
                    p.hosts.extend(change.endpoint_hosts.iter().cloned());
                }
                None => {
                    *p = Some(PendingPush {
                        full: change.full,
                        hosts: change.endpoint_hosts.clone(),
                        started: first_event,
                    })
                }
            }
            drop(p);
            c.notify.notify_one();
        }
    }
}

/// The tower service tonic routes ADS calls to.
#[derive(Clone)]
pub struct AdsService {
    shared: Arc<Shared>,
    secure: bool,
}

impl tonic::server::NamedService for AdsService {
    const NAME: &'static str = SERVICE_NAME;
}

type BoxFut<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;
/// What a connection task hands to its response body: a frame, or the status ending the stream.
type Outbound = Result<GrpcFrame, Status>;

/// The HTTP/2 response body of an ADS stream: each frame's buffers in order (the shared resource
/// buffers by reference, never copied), then the `grpc-status` trailers.
struct AdsBody {
    rx: mpsc::Receiver<Outbound>,
    pending: std::collections::VecDeque<Bytes>,
    done: bool,
}

impl http_body::Body for AdsBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            let end = match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(Ok(frame)) => {
                    self.pending.extend(frame.chunks);
                    continue;
                }
                Some(Err(status)) => status,
                None => Status::ok(""),
            };
            self.done = true;
            let mut trailers = http::HeaderMap::new();
            let _ = end.add_header(&mut trailers);
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
        }
    }
}

fn grpc_response(rx: mpsc::Receiver<Outbound>) -> http::Response<tonic::body::Body> {
    let body = AdsBody {
        rx,
        pending: Default::default(),
        done: false,
    };
    let mut resp = http::Response::new(tonic::body::Body::new(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// Opens a stream: requests read by [`RequestStream`], responses sent as [`GrpcFrame`]s.
async fn serve_stream<Req, B>(svc: AdsService, req: http::Request<B>, delta: bool) -> http::Response<tonic::body::Body>
where
    Req: super::requests::DecodeRequest + Send + 'static,
    Conn: Handles<Req>,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    let (parts, body) = req.into_parts();
    let inbound = RequestStream::<Req>::new(body, svc.shared.settings.max_recv_message_bytes);
    let request = tonic::Request::from_parts(
        tonic::metadata::MetadataMap::from_headers(parts.headers),
        parts.extensions,
        inbound,
    );
    match svc.open(request, delta).await {
        Ok(rx) => grpc_response(rx),
        Err(status) => status.into_http(),
    }
}

impl<B> tower::Service<http::Request<B>> for AdsService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFut<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let svc = self.clone();
        match req.uri().path() {
            SOTW_PATH => Box::pin(async move { Ok(serve_stream::<SotwRequest, B>(svc, req, false).await) }),
            DELTA_PATH => Box::pin(async move { Ok(serve_stream::<DeltaDiscoveryRequest, B>(svc, req, true).await) }),
            _ => Box::pin(async move { Ok(Status::unimplemented("unknown ADS method").into_http()) }),
        }
    }
}

impl AdsService {
    async fn open<Req: super::requests::DecodeRequest + Send + 'static>(
        &self,
        req: tonic::Request<RequestStream<Req>>,
        delta: bool,
    ) -> Result<mpsc::Receiver<Outbound>, Status>
    where
        Conn: Handles<Req>,
    {
        let peer = req.remote_addr();
        if *self.shared.closing.borrow() {
            return Err(Status::unavailable(SHUTTING_DOWN));
        }
        if !*self.shared.ready.borrow() {
            let mut ready = self.shared.ready.subscribe();
            let waited = tokio::time::timeout(NOT_READY_WAIT, async {
                let _ = ready.wait_for(|r| *r).await;
            })
            .await;
            if waited.is_err() {
                self.shared.metrics.errors.with(&["Unavailable"]).inc();
                return Err(Status::unavailable(
                    "server is not ready to serve discovery information",
                ));
            }
        }
        // istiod's order: the rate limit before authentication, so a storm of new streams
        // cannot turn into a storm of TokenReviews.
        if !self.shared.new_streams.acquire(NEW_STREAM_MAX_WAIT).await {
            self.shared.rate_refused.inc();
            self.shared.metrics.errors.with(&["ResourceExhausted"]).inc();
            tracing::warn!(peer = ?peer, "xDS stream refused: new-stream rate limit");
            return Err(Status::resource_exhausted(
                "too many new xDS streams per second (PILOT_MAX_REQUESTS_PER_SECOND); retry with backoff",
            ));
        }
        let identity = if self.secure {
            let creds = Credentials::from_metadata(req.metadata(), req.peer_certs(), peer);
            match self.shared.auth.authenticate(&creds).await {
                Ok(id) => Some(id),
                Err(f) => {
                    let code = match f.kind() {
                        FailureKind::Unauthenticated => tonic::Code::Unauthenticated,
                        FailureKind::Unavailable => tonic::Code::Unavailable,
                        FailureKind::ResourceExhausted => tonic::Code::ResourceExhausted,
                    };
                    self.shared.metrics.errors.with(&[&format!("{code:?}")]).inc();
                    tracing::warn!(peer = ?peer, cluster_id = %creds.cluster_id, error = %f, "xDS stream refused");
                    return Err(Status::new(code, format!("authentication failure: {f}")));
                }
            }
        } else {
            None
        };
        let (tx, rx) = mpsc::channel(self.shared.settings.send_queue.max(1));
        let conn_id = self.shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(ConnSlot {
            pending: Mutex::new(None),
            notify: Notify::new(),
            proxy: OnceLock::new(),
            status: Mutex::new(ConnStatus {
                conn_id,
                delta,
                peer: peer.map(|p| p.to_string()),
                identity: identity.as_ref().map(|i| i.spiffe_uri()),
                ..Default::default()
            }),
        });
        let conn = Conn {
            id: conn_id,
            shared: Arc::clone(&self.shared),
            slot,
            identity,
            secure: self.secure,
            proxy: None,
            inbound: None,
            tx,
            sotw: HashMap::new(),
            delta: HashMap::new(),
            peer,
        };
        let inbound = req.into_inner();
        let closing = self.shared.closing.subscribe();
        // Lines logged by the stream carry its connection, peer and identity; the node id and
        // cluster are added by the first request.
        let span = tracing::info_span!(
            "ads",
            conn = conn_id,
            delta,
            peer = ?peer,
            identity = ?conn.identity.as_ref().map(|i| i.spiffe_uri()),
            node = tracing::field::Empty,
            cluster = tracing::field::Empty
        );
        tokio::spawn(conn.run(inbound, closing).instrument(span));
        Ok(rx)
    }
}

/// Per-type SotW watch state.
#[derive(Debug, Default)]
struct SotwWatch {
    names: NameSet,
    nonce_sent: Option<String>,
    /// Fingerprint of the last request's name list (`SotwRequest::names_fingerprint`): Envoy
    /// repeats the same list in every ACK, so most requests are recognised by one hash instead of
    /// a lookup per name.
    last_request: Option<u64>,
}

/// Per-type Delta state.
#[derive(Debug, Default)]
struct DeltaWatch {
    wildcard: bool,
    subscribed: NameSet,
    held: Held,
    nonce_sent: Option<String>,
}

/// One ADS stream.
pub struct Conn {
    id: u64,
    shared: Arc<Shared>,
    slot: Arc<ConnSlot>,
    identity: Option<Identity>,
    secure: bool,
    proxy: Option<ProxyInfo>,
    tx: mpsc::Sender<Outbound>,
    sotw: HashMap<&'static str, SotwWatch>,
    delta: HashMap<&'static str, DeltaWatch>,
    peer: Option<SocketAddr>,
    /// What the proxy's own inbound config was built from (sidecars and gRPC servers).
    inbound: Option<generators::sidecar::InboundSig>,
}

/// Request handling per protocol flavour.
pub trait Handles<Req> {
    fn handle(&mut self, req: Req) -> impl std::future::Future<Output = Result<(), Status>> + Send;
    fn push(&mut self, p: PendingPushPublic) -> impl std::future::Future<Output = Result<(), Status>> + Send;
}

/// A coalesced push as a connection sees it.
#[derive(Debug, Clone)]
pub struct PendingPushPublic {
    full: bool,
    hosts: BTreeSet<String>,
    started: Instant,
}

fn type_static(type_url: &str) -> Option<&'static str> {
    types::PUSH_ORDER.iter().find(|t| **t == type_url).copied()
}

impl Conn {
    async fn run<Req>(mut self, mut inbound: RequestStream<Req>, mut closing: watch::Receiver<bool>)
    where
        Self: Handles<Req>,
        Req: super::requests::DecodeRequest + Send + 'static,
    {
        let result: Result<(), Status> = async {
            loop {
                tokio::select! {
                    biased;
                    () = async { let _ = closing.wait_for(|c| *c).await; } => return Err(Status::unavailable(SHUTTING_DOWN)),
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => self.handle(req).await?,
                        Ok(None) => return Ok(()),
                        Err(s) => return Err(s),
                    },
                    _ = self.slot.notify.notified(), if self.proxy.is_some() => {
                        let p = self.slot.pending.lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let Some(p) = p {
                            self.push(PendingPushPublic { full: p.full, hosts: p.hosts, started: p.started }).await?;
                        }
                    }
                }
            }
        }
        .await;
        if let Err(s) = result {
            if s.code() == tonic::Code::Cancelled {
                tracing::debug!(conn = self.id, node = ?self.proxy.as_ref().map(|p| &p.node_id), message = %s.message(), "xDS stream closed by the proxy");
            } else {
                self.shared.metrics.errors.with(&[&format!("{:?}", s.code())]).inc();
                tracing::info!(conn = self.id, node = ?self.proxy.as_ref().map(|p| &p.node_id), code = ?s.code(), message = %s.message(), "xDS stream ended with an error");
            }
            let _ = self.tx.send(Err(s)).await;
        }
        if self.proxy.is_some() {
            self.shared.metrics.connected.dec();
        }
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }

    /// First request: node, identity check, registration for pushes.
    fn init(&mut self, node: Option<&envoy_types::pb::envoy::config::core::v3::Node>) -> Result<(), Status> {
        if self.proxy.is_some() {
            return Ok(());
        }
        let proxy = node::parse(node).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if let Some(id) = &self.identity {
            node::authorize(id, &proxy).map_err(|e| {
                tracing::warn!(conn = self.id, node = %proxy.node_id, error = %e, "xDS stream refused");
                Status::permission_denied(e.to_string())
            })?;
        }
        let _ = self.slot.proxy.set(Arc::new(proxy.clone()));
        let span = tracing::Span::current();
        span.record("node", proxy.node_id.as_str());
        span.record("cluster", proxy.cluster_id.as_str());
        {
            let mut st = self.slot.status.lock().unwrap_or_else(|e| e.into_inner());
            st.node_id = proxy.node_id.clone();
            st.cluster_id = proxy.cluster_id.clone();
        }
        tracing::info!(conn = self.id, node = %proxy.node_id, cluster = %proxy.cluster_id, identity = ?self.identity.as_ref().map(|i| i.spiffe_uri()), peer = ?self.peer, "xDS stream connected");
        if generators::sidecar::has_inbound(&proxy) {
            let push = self.shared.current.load_full();
            self.inbound = Some(generators::sidecar::inbound_sig(&push, &proxy, None));
        }
        self.proxy = Some(proxy);
        self.shared.metrics.connected.inc();
        self.shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.id, Arc::clone(&self.slot));
        Ok(())
    }

    /// Whether a push is full for this connection: it is, or it changes the endpoints at the
    /// proxy's own IPs, which its inbound listeners and clusters are built from (an endpoint-only
    /// change elsewhere stays EDS-only).
    fn push_is_full(&mut self, p: &PendingPushPublic) -> bool {
        let (Some(proxy), Some(sig)) = (&self.proxy, &self.inbound) else {
            return p.full;
        };
        let push = self.shared.current.load_full();
        let inbound_changed = !p.full && !p.hosts.is_empty() && {
            let before: generators::sidecar::InboundSig =
                sig.iter().filter(|(h, _, _)| p.hosts.contains(h)).cloned().collect();
            generators::sidecar::inbound_sig(&push, proxy, Some(&p.hosts)) != before
        };
        if p.full || inbound_changed {
            self.inbound = Some(generators::sidecar::inbound_sig(&push, proxy, None));
        }
        p.full || inbound_changed
    }

    fn status(&self, type_url: &'static str, f: impl FnOnce(&mut TypeStatus)) {
        let mut st = self.slot.status.lock().unwrap_or_else(|e| e.into_inner());
        f(st.types.entry(types::short(type_url)).or_default());
    }

    fn record_nack(&self, type_url: &'static str, message: &str) {
        self.shared.metrics.rejects.with(&[types::short(type_url)]).inc();
        tracing::warn!(conn = self.id, node = ?self.proxy.as_ref().map(|p| &p.node_id), r#type = types::short(type_url), error = %message, "ACK ERROR: proxy rejected the config");
        self.status(type_url, |s| {
            s.nacks += 1;
            s.last_nack = Some(message.to_string());
        });
    }

    /// Generates the resources of a type for this proxy (bounded by the generation permits).
    async fn resources(&self, type_url: &'static str, names: &NameSet) -> (Arc<PushContext>, Arc<ResourceSet>) {
        let push = self.shared.current.load_full();
        let _permit = self.shared.gen_permits.acquire().await;
        let proxy = self
            .proxy
            .as_ref()
            .unwrap_or_else(|| unreachable!("pushes start after init"));
        if type_url == types::SECRET && (!self.secure || self.identity.is_none()) {
            // Never a secret to an unauthenticated proxy.
            return (push, Arc::new(ResourceSet::new()));
        }
        let set = generators::generate_named(&push, proxy, type_url, names);
        (push, set)
    }

    /// Steps every request takes before the protocol rules: health probes are skipped, the
    /// first request initialises the connection, the type must be known, and a NACK is recorded
    /// and never answered. Returns the type to handle, or `None` when the request is done.
    fn preamble(
        &mut self,
        type_url: &str,
        node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
        error_detail: Option<&envoy_types::pb::google::rpc::Status>,
    ) -> Result<Option<&'static str>, Status> {
        if type_url == types::HEALTH_INFO {
            return Ok(None);
        }
        self.init(node)?;
        if type_url.is_empty() {
            return Err(Status::invalid_argument("type_url is required on an ADS stream"));
        }
        let Some(t) = type_static(type_url) else {
            tracing::debug!(conn = self.id, r#type = %type_url, "no generator for this type; not answering");
            return Ok(None);
        };
        if let Some(err) = error_detail {
            self.record_nack(t, &err.message);
            return Ok(None);
        }
        Ok(Some(t))
    }

    /// Sends a response and records it: the push metric and the debug state (`/debug/syncz`).
    async fn send_recorded(
        &self,
        type_url: &'static str,
        bytes: GrpcFrame,
        nonce: String,
        version: &str,
        resources: usize,
    ) -> Result<(), Status> {
        self.send(bytes).await?;
        self.shared.metrics.pushes.with(&[types::short(type_url)]).inc();
        let version = version.to_string();
        self.status(type_url, |s| {
            s.nonce_sent = Some(nonce);
            s.version_sent = Some(version);
            s.resources_sent = resources;
        });
        Ok(())
    }

    async fn send(&self, bytes: GrpcFrame) -> Result<(), Status> {
        self.shared.metrics.sent_bytes.add(bytes.len() as u64);
        let sent = match self.shared.settings.send_timeout {
            None => self.tx.send(Ok(bytes)).await,
            Some(limit) => match tokio::time::timeout(limit, self.tx.send(Ok(bytes))).await {
                Ok(r) => r,
                Err(_) => {
                    self.shared.write_timeouts.inc();
                    return Err(Status::resource_exhausted(format!(
                        "the proxy took no xDS response for {limit:?} (PILOT_XDS_SEND_TIMEOUT); closing the stream"
                    )));
                }
            },
        };
        sent.map_err(|_| Status::cancelled("client went away"))
    }
}

// ---------------------------------------------------------------------------------------------
// SotW
// ---------------------------------------------------------------------------------------------

impl Conn {
    async fn sotw_respond(&mut self, type_url: &'static str, only: Option<&NameSet>) -> Result<(), Status> {
        let empty = NameSet::new();
        let names = self.sotw.get(type_url).map_or(&empty, |w| &w.names);
        let (push, set) = self.resources(type_url, names).await;
        let by_name = self
            .proxy
            .as_ref()
            .is_some_and(|p| generators::grpc::by_name(p, type_url, names));
        let watch = self.sotw.entry(type_url).or_default();
        let resources: Vec<&Resource> = if !by_name {
            set.values().map(|r| r.as_ref()).collect()
        } else {
            // `only` is a subset of the watch: walk it, not the whole watch.
            interned::select(only.unwrap_or(&watch.names), &set)
                .into_iter()
                .map(|r| r.as_ref())
                .collect()
        };
        let nonce = next_nonce(&push.epoch);
        let bytes = wire::sotw_frame(&push.version, type_url, &nonce, &resources);
        let count = resources.len();
        watch.nonce_sent = Some(nonce.clone());
        self.send_recorded(type_url, bytes, nonce, &push.version, count).await
    }
}

impl Handles<SotwRequest> for Conn {
    async fn handle(&mut self, req: SotwRequest) -> Result<(), Status> {
        let Some(type_url) = self.preamble(&req.type_url, req.node.as_ref(), req.error_detail.as_ref())? else {
            return Ok(());
        };
        let wildcard = types::is_wildcard_type(type_url);
        let known = self.sotw.get(type_url).map(|w| w.nonce_sent.clone());
        match known {
            // First request for the type, or a reconnect: answer in full.
            None | Some(None) => {
                let names = NameSet::from_requested(req.names()?);
                let watch = self.sotw.entry(type_url).or_default();
                watch.names = names;
                watch.last_request = Some(req.names_fingerprint);
                self.sotw_respond(type_url, None).await
            }
            Some(Some(_)) if req.response_nonce.is_empty() => {
                let names = NameSet::from_requested(req.names()?);
                let watch = self.sotw.entry(type_url).or_default();
                watch.names = names;
                watch.last_request = Some(req.names_fingerprint);
                self.sotw_respond(type_url, None).await
            }
            Some(Some(sent)) if req.response_nonce != sent => {
                self.shared.metrics.expired_nonce.with(&[types::short(type_url)]).inc();
                Ok(())
            }
            Some(Some(_)) => {
                let nonce = req.response_nonce.clone();
                self.status(type_url, |s| s.nonce_acked = Some(nonce));
                let watch = self.sotw.entry(type_url).or_default();
                // Most requests are ACKs repeating the whole watch (Envoy's EDS ACK names every
                // cluster): compare in place instead of building a second set.
                let fp = req.names_fingerprint;
                if watch.last_request == Some(fp) {
                    return Ok(()); // plain ACK, the same list as last time
                }
                let requested = req.names()?;
                if watch.names.same_as(&requested) {
                    watch.last_request = Some(fp);
                    return Ok(()); // plain ACK
                }
                watch.last_request = Some(fp);
                let names = NameSet::from_requested(requested);
                let added = names.difference(&watch.names);
                watch.names = names;
                if wildcard {
                    return self.sotw_respond(type_url, None).await;
                }
                if added.is_empty() {
                    return Ok(()); // only removals (or an unsubscribe): nothing to send
                }
                let grpc = self.proxy.as_ref().is_some_and(|p| p.is_grpc());
                self.sotw_respond(type_url, if grpc { None } else { Some(&added) })
                    .await
            }
        }
    }

    async fn push(&mut self, p: PendingPushPublic) -> Result<(), Status> {
        let watched: Vec<&'static str> = types::PUSH_ORDER
            .iter()
            .copied()
            .filter(|t| self.sotw.get(t).is_some_and(|w| w.nonce_sent.is_some()))
            .collect();
        let full = self.push_is_full(&p);
        let push = self.shared.current.load_full();
        for t in watched {
            if full {
                self.sotw_respond(t, None).await?;
            } else if t == types::ENDPOINT && !p.hosts.is_empty() {
                // O(changed), not O(watched): a change touches a few of ~1,000s of clusters.
                let changed = push.eds_names_of(&p.hosts);
                let mine: NameSet = self
                    .sotw
                    .get(t)
                    .map(|w| NameSet::from_names(changed.iter().filter(|n| w.names.contains(n)).cloned()))
                    .unwrap_or_default();
                if !mine.is_empty() {
                    // Partial EDS: Envoy keeps assignments a response does not mention.
                    self.sotw_respond(t, Some(&mine)).await?;
                }
            }
        }
        self.shared
            .metrics
            .convergence
            .observe(p.started.elapsed().as_secs_f64());
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Delta
// ---------------------------------------------------------------------------------------------

impl Conn {
    /// Sends what the client lacks of `type_url` (changed or new resources, removals). `force`
    /// answers even when there is nothing to say (initial requests must be answered).
    async fn delta_respond(&mut self, type_url: &'static str, force: bool) -> Result<(), Status> {
        let empty = NameSet::new();
        let names = self.delta.get(type_url).map_or(&empty, |w| &w.subscribed);
        let (push, set) = self.resources(type_url, names).await;
        let watch = self.delta.entry(type_url).or_default();
        let Diff {
            changed,
            removed,
            count,
        } = full_diff(&watch.held, &watch.subscribed, watch.wildcard, &set);
        // Either way the client now holds exactly the wanted part of `set`.
        watch.held.rebase(&set, watch.wildcard, count);
        if changed.is_empty() && removed.is_empty() && !force {
            return Ok(());
        }
        let nonce = next_nonce(&push.epoch);
        watch.nonce_sent = Some(nonce.clone());
        let bytes = wire::delta_frame(&push.version, type_url, &nonce, &changed, &removed);
        self.send_recorded(type_url, bytes, nonce, &push.version, count).await
    }

    /// An endpoint-only push: looks at the changed clusters only (O(changed), not O(watched)),
    /// and sends those the client subscribed to whose version it lacks, or their removal.
    async fn delta_respond_changed(&mut self, type_url: &'static str, hosts: &BTreeSet<String>) -> Result<(), Status> {
        let changed_names = self.shared.current.load_full().eds_names_of(hosts);
        let Some(watch) = self.delta.get(type_url) else {
            return Ok(());
        };
        if !watch.wildcard && !changed_names.iter().any(|n| watch.subscribed.contains(n)) {
            return Ok(());
        }
        let (push, set) = self.resources(type_url, &watch.subscribed).await;
        let watch = self.delta.entry(type_url).or_default();
        let (changed, removed) = changed_diff(&watch.held, &watch.subscribed, watch.wildcard, &set, &changed_names);
        if changed.is_empty() && removed.is_empty() {
            return Ok(());
        }
        watch.held.apply(&changed, &removed, &watch.subscribed);
        let nonce = next_nonce(&push.epoch);
        watch.nonce_sent = Some(nonce.clone());
        let bytes = wire::delta_frame(&push.version, type_url, &nonce, &changed, &removed);
        let count = watch.held.count();
        self.send_recorded(type_url, bytes, nonce, &push.version, count).await
    }
}

impl Handles<DeltaDiscoveryRequest> for Conn {
    async fn handle(&mut self, req: DeltaDiscoveryRequest) -> Result<(), Status> {
        let Some(type_url) = self.preamble(&req.type_url, req.node.as_ref(), req.error_detail.as_ref())? else {
            return Ok(());
        };
        let first = !self.delta.contains_key(type_url);
        if !first {
            let sent = self.delta.get(type_url).and_then(|w| w.nonce_sent.clone());
            if !req.response_nonce.is_empty() && Some(&req.response_nonce) != sent.as_ref() {
                self.shared.metrics.expired_nonce.with(&[types::short(type_url)]).inc();
                return Ok(());
            }
            if !req.response_nonce.is_empty() {
                let nonce = req.response_nonce.clone();
                self.status(type_url, |s| s.nonce_acked = Some(nonce));
            }
        }
        let watch = self.delta.entry(type_url).or_default();
        if first {
            watch.wildcard = types::is_wildcard_type(type_url)
                && (req.resource_names_subscribe.is_empty() || req.resource_names_subscribe.iter().any(|n| n == "*"));
            // What the client already holds from before a reconnect.
            watch.held = Held::initial(req.initial_resource_versions);
        }
        let mut new_names = false;
        let mut subscribe: Vec<&String> = Vec::new();
        for n in &req.resource_names_subscribe {
            if n == "*" {
                watch.wildcard = true;
                new_names = true;
            } else if !watch.subscribed.contains(n) {
                subscribe.push(n);
            }
        }
        if watch.subscribed.insert_requested(&subscribe) {
            new_names = true;
            for n in subscribe {
                let name = interned::lookup(n);
                watch.held.subscribed(&name);
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                watch.wildcard = false;
            }
            // The client dropped it: it no longer holds it.
            watch.held.forget(&interned::lookup(n), &watch.subscribed);
            watch.subscribed.remove(n);
        }
        if first || new_names {
            return self.delta_respond(type_url, first).await;
        }
        Ok(())
    }

    async fn push(&mut self, p: PendingPushPublic) -> Result<(), Status> {
        let watched: Vec<&'static str> = types::PUSH_ORDER
            .iter()
            .copied()
            .filter(|t| self.delta.contains_key(t))
            .collect();
        let full = self.push_is_full(&p);
        for t in watched {
            if full {
                // Unchanged resources keep their content versions and are not resent.
                self.delta_respond(t, false).await?;
            } else if t == types::ENDPOINT && !p.hosts.is_empty() {
                self.delta_respond_changed(t, &p.hosts).await?;
            }
        }
        self.shared
            .metrics
            .convergence
            .observe(p.started.elapsed().as_secs_f64());
        Ok(())
    }
}
