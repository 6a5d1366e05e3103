//! An ADS load client (`meshd bench xds`, and the library behind `examples/xds_bench.rs`).
//!
//! It opens N ADS streams on meshd's plaintext port (15010, unauthenticated: 15012 would add N
//! TLS handshakes and N service-account tokens, which the CA benchmark already covers) and
//! behaves like N Envoy sidecars: one HTTP/2 connection per proxy by default, node
//! `sidecar~<ip>~load-<i>.<ns>~<ns>.svc.cluster.local` with `CLUSTER_ID`/`NAMESPACE` metadata,
//! CDS wildcard first, EDS for the EDS clusters received, LDS once the clusters have their
//! endpoints, RDS for the route names the listeners reference, and an ACK for every response
//! (SotW: version, nonce and the full name list; Delta: nonce). A share of the streams
//! (`delta_percent`) speaks Delta xDS.
//!
//! Tonic client streams cost a lot of memory each, so the client speaks gRPC itself over the `h2`
//! crate: 5-byte length prefix + protobuf. Responses are decoded only as far as a proxy's control
//! flow needs (type, version, nonce, resource names, a cluster's discovery type, a listener's
//! RDS names, an assignment's addresses when a probe is armed), by walking the wire format
//! without allocating. A SotW stream keeps no name lists of its own: the (identical) EDS and RDS
//! name lists of all streams are pre-encoded once and shared.
//!
//! Every stream records, per type, how many responses it got and when the last one arrived, when
//! it first held a complete config (`ready`), and when an EDS response first carried the armed
//! probe address: enough for a driver to time pushes across all N streams.
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Args;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use prost::Message;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::xds::types;

const SOTW_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// Index of a type in the per-type arrays.
pub const CDS: usize = 0;
pub const EDS: usize = 1;
pub const LDS: usize = 2;
pub const RDS: usize = 3;
const TYPE_URLS: [&str; 4] = [types::CLUSTER, types::ENDPOINT, types::LISTENER, types::ROUTE];
pub const TYPE_NAMES: [&str; 4] = ["cds", "eds", "lds", "rds"];

fn type_index(type_url: &str) -> Option<usize> {
    TYPE_URLS.iter().position(|t| *t == type_url)
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// What to open.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// meshd's plaintext gRPC address.
    pub addr: SocketAddr,
    pub streams: usize,
    /// ADS streams per HTTP/2 connection (Envoy: 1).
    pub streams_per_conn: usize,
    /// Share of streams that speak Delta xDS (spread evenly: stream i is Delta when
    /// `i * pct / 100` steps up).
    pub delta_percent: u32,
    /// `CLUSTER_ID` of stream i is `cluster_ids[i % len]`.
    pub cluster_ids: Vec<String>,
    /// Namespace of stream i is `namespaces[i % len]`.
    pub namespaces: Vec<String>,
    /// `NETWORK` of stream i is `networks[i % len]` (none when empty).
    pub networks: Vec<String>,
    /// Stream i's IP is [`proxy_ip`]`(ip_offset + i)`.
    pub ip_offset: usize,
    /// Connections being set up at the same time.
    pub connect_concurrency: usize,
    /// HTTP/2 windows the client advertises (Envoy's defaults: 256 MiB each).
    pub stream_window: u32,
    pub connection_window: u32,
}

impl LoadConfig {
    pub fn new(addr: SocketAddr, streams: usize) -> Self {
        Self {
            addr,
            streams,
            streams_per_conn: 1,
            delta_percent: 50,
            cluster_ids: vec!["cluster1".into(), "cluster2".into()],
            namespaces: vec!["default".into()],
            networks: Vec::new(),
            ip_offset: 0,
            connect_concurrency: 64,
            stream_window: 256 << 20,
            connection_window: 256 << 20,
        }
    }

    /// Whether stream `i` speaks Delta xDS.
    pub fn is_delta(&self, i: usize) -> bool {
        let p = self.delta_percent.min(100) as usize;
        (i + 1) * p / 100 != i * p / 100
    }
}

/// The IP of load proxy `i`: `10.a.b.c` with `i` spread over the last three octets, starting at
/// 10.1.0.1 (drivers give service endpoints the same addresses so proxies serve inbound ports).
pub fn proxy_ip(i: usize) -> Ipv4Addr {
    let n = (1 << 16) + 1 + i as u32;
    Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// The node a sidecar's first request carries.
pub fn node(cfg: &LoadConfig, i: usize) -> Node {
    let ns = &cfg.namespaces[i % cfg.namespaces.len().max(1)];
    let cluster = &cfg.cluster_ids[i % cfg.cluster_ids.len().max(1)];
    let ip = proxy_ip(cfg.ip_offset + i);
    let mut labels = Struct::default();
    labels
        .fields
        .insert("app".into(), string_value(&format!("load-{}", i % 100)));
    let mut md = Struct::default();
    for (k, v) in [
        ("CLUSTER_ID", cluster.as_str()),
        ("NAMESPACE", ns.as_str()),
        ("INSTANCE_IPS", &ip.to_string()),
        ("ISTIO_VERSION", "1.24.0"),
        ("SERVICE_ACCOUNT", "default"),
        ("POD_NAME", &format!("load-{i}")),
    ] {
        md.fields.insert(k.into(), string_value(v));
    }
    if !cfg.networks.is_empty() {
        let network = &cfg.networks[i % cfg.networks.len()];
        md.fields.insert("NETWORK".into(), string_value(network));
    }
    md.fields.insert(
        "LABELS".into(),
        Value {
            kind: Some(Kind::StructValue(labels)),
        },
    );
    Node {
        id: format!("sidecar~{ip}~load-{i}.{ns}~{ns}.svc.cluster.local"),
        cluster: format!("load-{}.{ns}", i % 100),
        metadata: Some(md),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Protobuf wire walking (no allocation)
// ---------------------------------------------------------------------------------------------

pub mod pb {
    //! Iterates the fields of an encoded message.

    #[derive(Debug, Clone, Copy)]
    pub enum V<'a> {
        Int(u64),
        Len(&'a [u8]),
        Fixed,
    }

    pub fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&b, rest) = buf.split_first()?;
            *buf = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    /// The fields of a message, in wire order; stops at the first malformed byte.
    pub struct Fields<'a>(pub &'a [u8]);

    impl<'a> Iterator for Fields<'a> {
        type Item = (u32, V<'a>);

        fn next(&mut self) -> Option<Self::Item> {
            if self.0.is_empty() {
                return None;
            }
            let key = varint(&mut self.0)?;
            let field = (key >> 3) as u32;
            let v = match key & 7 {
                0 => V::Int(varint(&mut self.0)?),
                1 | 5 => {
                    let n = if key & 7 == 1 { 8 } else { 4 };
                    if self.0.len() < n {
                        self.0 = &[];
                        return None;
                    }
                    self.0 = &self.0[n..];
                    V::Fixed
                }
                2 => {
                    let n = varint(&mut self.0)? as usize;
                    if n > self.0.len() {
                        self.0 = &[];
                        return None;
                    }
                    let (a, b) = self.0.split_at(n);
                    self.0 = b;
                    V::Len(a)
                }
                _ => {
                    self.0 = &[];
                    return None;
                }
            };
            Some((field, v))
        }
    }

    /// Length-delimited fields numbered `tag`.
    pub fn each<'a>(msg: &'a [u8], tag: u32) -> impl Iterator<Item = &'a [u8]> + 'a {
        Fields(msg).filter_map(move |(f, v)| match v {
            V::Len(b) if f == tag => Some(b),
            _ => None,
        })
    }

    /// The last string field numbered `tag` ("" when absent or not UTF-8).
    pub fn string(msg: &[u8], tag: u32) -> &str {
        each(msg, tag)
            .last()
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or("")
    }

    pub fn int(msg: &[u8], tag: u32) -> Option<u64> {
        Fields(msg)
            .filter_map(|(f, v)| match v {
                V::Int(i) if f == tag => Some(i),
                _ => None,
            })
            .last()
    }
}

/// One resource of a response: its name (Delta, or from the message for SotW) and the bytes of
/// the message inside its `Any`.
struct Res<'a> {
    name: &'a str,
    value: &'a [u8],
}

/// The parts of a (Delta)DiscoveryResponse a proxy needs.
struct Response<'a> {
    version: &'a str,
    type_url: &'a str,
    nonce: &'a str,
    resources: Vec<Res<'a>>,
    removed: Vec<&'a str>,
}

fn any_value(any: &[u8]) -> &[u8] {
    pb::each(any, 2).last().unwrap_or(&[])
}

fn parse_response(msg: &[u8], delta: bool) -> Response<'_> {
    let mut r = Response {
        version: "",
        type_url: "",
        nonce: "",
        resources: Vec::new(),
        removed: Vec::new(),
    };
    for (f, v) in pb::Fields(msg) {
        let pb::V::Len(b) = v else { continue };
        let s = || std::str::from_utf8(b).unwrap_or("");
        match f {
            1 => r.version = s(),
            2 if delta => r.resources.push(Res {
                name: pb::string(b, 3),
                value: pb::each(b, 2).last().map(any_value).unwrap_or(&[]),
            }),
            2 => r.resources.push(Res {
                name: "",
                value: any_value(b),
            }),
            4 => r.type_url = s(),
            5 => r.nonce = s(),
            6 if delta => r.removed.push(s()),
            _ => {}
        }
    }
    r
}

/// `Cluster { name = 1, type = 2 }`: (name, is an EDS cluster).
fn cluster_facts(c: &[u8]) -> (&str, bool) {
    const EDS_TYPE: u64 = 3;
    (pb::string(c, 1), pb::int(c, 2) == Some(EDS_TYPE))
}

/// `Listener { name = 1, filter_chains = 3, default_filter_chain = 25 }`, `FilterChain { filters
/// = 3 }`, `Filter { typed_config = 4 }`, `HttpConnectionManager { rds = 3 }`, `Rds {
/// route_config_name = 2 }`.
fn listener_routes<'a>(l: &'a [u8], out: &mut Vec<&'a str>) {
    for chain in pb::each(l, 3).chain(pb::each(l, 25)) {
        for filter in pb::each(chain, 3) {
            for any in pb::each(filter, 4) {
                if pb::string(any, 1) != HCM_TYPE {
                    continue;
                }
                for rds in pb::each(any_value(any), 3) {
                    let name = pb::string(rds, 2);
                    if !name.is_empty() {
                        out.push(name);
                    }
                }
            }
        }
    }
}

/// Whether `ClusterLoadAssignment { endpoints = 2 { lb_endpoints = 2 { endpoint = 1 { address =
/// 1 { socket_address = 1 { address = 2 }}}}}}` has `addr`.
fn assignment_has(cla: &[u8], addr: &str) -> bool {
    pb::each(cla, 2).any(|loc| {
        pb::each(loc, 2).any(|lb| {
            pb::each(lb, 1).any(|ep| pb::each(ep, 1).any(|a| pb::each(a, 1).any(|sa| pb::string(sa, 2) == addr)))
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Request encoding
// ---------------------------------------------------------------------------------------------

fn put_len(buf: &mut BytesMut, tag: u32, b: &[u8]) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(b.len() as u64, buf);
    buf.put_slice(b);
}

fn put_str(buf: &mut BytesMut, tag: u32, s: &str) {
    if !s.is_empty() {
        put_len(buf, tag, s.as_bytes());
    }
}

/// A gRPC message frame: 0 (uncompressed), u32 BE length, message.
fn frame(f: impl FnOnce(&mut BytesMut), hint: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(hint + 5);
    b.put_u8(0);
    b.put_u32(0);
    f(&mut b);
    let len = (b.len() - 5) as u32;
    b[1..5].copy_from_slice(&len.to_be_bytes());
    b.freeze()
}

/// `DiscoveryRequest { version_info = 1, node = 2, resource_names = 3 (pre-encoded), type_url =
/// 4, response_nonce = 5 }`.
fn sotw_request(node: Option<&[u8]>, version: &str, names: &[u8], type_url: &str, nonce: &str) -> Bytes {
    frame(
        |b| {
            put_str(b, 1, version);
            if let Some(n) = node {
                put_len(b, 2, n);
            }
            b.put_slice(names);
            put_str(b, 4, type_url);
            put_str(b, 5, nonce);
        },
        names.len() + node.map_or(0, <[u8]>::len) + 256,
    )
}

fn delta_request(req: &DeltaDiscoveryRequest) -> Bytes {
    frame(|b| req.encode_raw(b), req.encoded_len())
}

fn hash_names<'a>(names: impl Iterator<Item = &'a str>) -> u64 {
    let mut h = DefaultHasher::new();
    for n in names {
        n.hash(&mut h);
    }
    h.finish()
}

// ---------------------------------------------------------------------------------------------
// Per-stream state shared with the driver
// ---------------------------------------------------------------------------------------------

/// What one stream has seen, readable while it runs. Instants are nanoseconds since the
/// client's `base`, plus one (0 = never).
#[derive(Debug)]
pub struct StreamState {
    pub index: usize,
    pub delta: bool,
    pub node_id: String,
    responses: [AtomicU64; 4],
    last_at: [AtomicU64; 4],
    resources: [AtomicU64; 4],
    acks: AtomicU64,
    bytes: AtomicU64,
    /// Times the stream was refused (RESOURCE_EXHAUSTED) and opened again.
    retries: AtomicU64,
    ready_at: AtomicU64,
    probe_at: AtomicU64,
    error: Mutex<Option<String>>,
}

impl StreamState {
    fn new(index: usize, delta: bool, node_id: String) -> Self {
        Self {
            index,
            delta,
            node_id,
            responses: Default::default(),
            last_at: Default::default(),
            resources: Default::default(),
            acks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            ready_at: AtomicU64::new(0),
            probe_at: AtomicU64::new(0),
            error: Mutex::new(None),
        }
    }

    pub fn responses(&self, t: usize) -> u64 {
        self.responses[t].load(Ordering::Acquire)
    }

    /// When the last response of type `t` arrived.
    pub fn last_at(&self, t: usize) -> Option<Duration> {
        at(&self.last_at[t])
    }

    /// Resources in the last response of type `t` (Delta: resources held).
    pub fn resources(&self, t: usize) -> u64 {
        self.resources[t].load(Ordering::Relaxed)
    }

    pub fn acks(&self) -> u64 {
        self.acks.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// When the stream first held CDS, EDS, LDS and RDS for everything it subscribed to.
    pub fn ready_at(&self) -> Option<Duration> {
        at(&self.ready_at)
    }

    /// When an EDS response first carried the armed probe address.
    pub fn probe_at(&self) -> Option<Duration> {
        at(&self.probe_at)
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn fail(&self, e: impl std::fmt::Display) {
        let mut g = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(e.to_string());
        }
    }
}

fn at(a: &AtomicU64) -> Option<Duration> {
    match a.load(Ordering::Acquire) {
        0 => None,
        n => Some(Duration::from_nanos(n - 1)),
    }
}

struct Shared {
    base: Instant,
    probe: RwLock<Option<Arc<str>>>,
    /// Pre-encoded SotW `resource_names` lists, by hash: every sidecar of a class asks for the
    /// same names, so one copy serves all streams.
    names: Mutex<HashMap<(usize, u64), Bytes>>,
    streams_opened: AtomicUsize,
}

impl Shared {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    /// The shared encoding of `names` as field `tag`.
    fn names(&self, t: usize, tag: u32, names: &[&str]) -> Bytes {
        let h = hash_names(names.iter().copied());
        let mut map = self.names.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((t, h))
            .or_insert_with(|| {
                let mut b = BytesMut::with_capacity(names.iter().map(|n| n.len() + 3).sum());
                for n in names {
                    put_len(&mut b, tag, n.as_bytes());
                }
                b.freeze()
            })
            .clone()
    }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// N running ADS streams.
pub struct LoadClient {
    shared: Arc<Shared>,
    streams: Vec<Arc<StreamState>>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Drop for LoadClient {
    fn drop(&mut self) {
        for t in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
    }
}

/// Totals over all streams.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Totals {
    pub streams: usize,
    pub sotw: usize,
    pub delta: usize,
    pub ready: usize,
    pub errors: usize,
    pub responses: [u64; 4],
    pub acks: u64,
    pub retries: u64,
    pub bytes_received: u64,
    pub first_error: Option<String>,
}

impl LoadClient {
    /// Connects and opens every stream (at most `connect_concurrency` connections being set up
    /// at once); returns once every connection is up (or failed) and its streams are starting.
    pub async fn start(cfg: LoadConfig) -> anyhow::Result<Self> {
        if cfg.streams == 0 {
            bail!("no streams to open");
        }
        let shared = Arc::new(Shared {
            base: Instant::now(),
            probe: RwLock::new(None),
            names: Mutex::default(),
            streams_opened: AtomicUsize::new(0),
        });
        let streams: Vec<Arc<StreamState>> = (0..cfg.streams)
            .map(|i| Arc::new(StreamState::new(i, cfg.is_delta(i), node(&cfg, i).id)))
            .collect();
        let client = Self {
            shared: Arc::clone(&shared),
            streams: streams.clone(),
            tasks: Mutex::default(),
        };
        let cfg = Arc::new(cfg);
        let permits = Arc::new(Semaphore::new(cfg.connect_concurrency.max(1)));
        let per = cfg.streams_per_conn.max(1);
        let mut openers = tokio::task::JoinSet::new();
        for (c, group) in streams.chunks(per).enumerate() {
            let group: Vec<Arc<StreamState>> = group.to_vec();
            let (cfg, shared, permits) = (Arc::clone(&cfg), Arc::clone(&shared), Arc::clone(&permits));
            openers.spawn(async move {
                let _permit = permits.acquire_owned().await;
                match open_connection(&cfg, c, &shared, &group).await {
                    Ok(tasks) => tasks,
                    Err(e) => {
                        for s in &group {
                            s.fail(format!("connecting: {e:#}"));
                        }
                        Vec::new()
                    }
                }
            });
        }
        while let Some(r) = openers.join_next().await {
            let tasks = r.context("connection opener panicked")?;
            client.tasks.lock().unwrap_or_else(|e| e.into_inner()).extend(tasks);
        }
        Ok(client)
    }

    pub fn streams(&self) -> &[Arc<StreamState>] {
        &self.streams
    }

    /// Time since the client started (the scale of every recorded instant).
    pub fn elapsed(&self) -> Duration {
        self.shared.base.elapsed()
    }

    /// An instant on the scale of recorded instants.
    pub fn since_base(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.shared.base)
    }

    pub fn ready_count(&self) -> usize {
        self.streams.iter().filter(|s| s.ready_at().is_some()).count()
    }

    pub fn error_count(&self) -> usize {
        self.streams.iter().filter(|s| s.error().is_some()).count()
    }

    /// Waits until every stream is ready; fails on the deadline or when a stream failed.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.streams.iter().find_map(|s| s.error().map(|e| (s.index, e))) {
                bail!("stream {} failed: {}", e.0, e.1);
            }
            let ready = self.ready_count();
            if ready == self.streams.len() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{ready} of {} streams ready after {timeout:?}", self.streams.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `f` holds for every stream.
    pub async fn wait_all(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&StreamState) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.streams.iter().find_map(|s| s.error().map(|e| (s.index, e))) {
                bail!("stream {} failed: {}", e.0, e.1);
            }
            let done = self.streams.iter().filter(|s| f(s)).count();
            if done == self.streams.len() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{what}: {done} of {} streams after {timeout:?}", self.streams.len());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// From now on, every stream records when an EDS response first carries `addr`.
    pub fn arm_probe(&self, addr: &str) {
        for s in &self.streams {
            s.probe_at.store(0, Ordering::Release);
        }
        *self.shared.probe.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::from(addr));
    }

    pub fn disarm_probe(&self) {
        *self.shared.probe.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            streams: self.streams.len(),
            ..Default::default()
        };
        for s in &self.streams {
            if s.delta {
                t.delta += 1;
            } else {
                t.sotw += 1;
            }
            t.ready += usize::from(s.ready_at().is_some());
            if let Some(e) = s.error() {
                t.errors += 1;
                t.first_error.get_or_insert(e);
            }
            for (i, r) in t.responses.iter_mut().enumerate() {
                *r += s.responses(i);
            }
            t.acks += s.acks();
            t.retries += s.retries();
            t.bytes_received += s.bytes();
        }
        t
    }
}

async fn open_connection(
    cfg: &Arc<LoadConfig>,
    conn_index: usize,
    shared: &Arc<Shared>,
    group: &[Arc<StreamState>],
) -> anyhow::Result<Vec<tokio::task::AbortHandle>> {
    let mut tries = 0;
    let tcp = loop {
        match TcpStream::connect(cfg.addr).await {
            Ok(t) => break t,
            Err(e) if tries < 5 => {
                tries += 1;
                tracing::debug!(conn = conn_index, error = %e, "connect failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 << tries)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", cfg.addr)),
        }
    };
    tcp.set_nodelay(true)?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(cfg.stream_window)
        .initial_connection_window_size(cfg.connection_window)
        .handshake::<_, Bytes>(tcp)
        .await
        .context("HTTP/2 handshake")?;
    let mut tasks = vec![
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(conn = conn_index, error = %e, "connection ended");
            }
        })
        .abort_handle(),
    ];
    for st in group {
        let (cfg, shared, st, send) = (Arc::clone(cfg), Arc::clone(shared), Arc::clone(st), send.clone());
        tasks.push(tokio::spawn(stream_task(cfg, shared, st, send)).abort_handle());
    }
    Ok(tasks)
}

/// A stream's gRPC status when the server ended it.
#[derive(Debug, thiserror::Error)]
#[error("grpc-status {code} {message}")]
struct GrpcStatus {
    code: String,
    message: String,
}

/// Runs one stream; a stream the server refuses before its first response (RESOURCE_EXHAUSTED:
/// meshd's new-stream rate limit, PILOT_MAX_REQUESTS_PER_SECOND) is opened again after a
/// jittered backoff, as Envoy does.
async fn stream_task(
    cfg: Arc<LoadConfig>,
    shared: Arc<Shared>,
    st: Arc<StreamState>,
    send: h2::client::SendRequest<Bytes>,
) {
    let mut attempt = 0u32;
    loop {
        let result = open_stream(&cfg, &shared, &st, send.clone()).await;
        let refused = match &result {
            Err(e) => e.downcast_ref::<GrpcStatus>().is_some_and(|s| s.code == "8"),
            Ok(()) => false,
        };
        let got_any = (0..4).any(|t| st.responses(t) > 0);
        match result {
            Err(_) if refused && !got_any && attempt < 30 => {
                attempt += 1;
                st.retries.fetch_add(1, Ordering::Relaxed);
                let base = 500u64 << attempt.min(4);
                let jitter = rand::random::<u64>() % base;
                tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
            }
            Err(e) => return st.fail(format!("{e:#}")),
            Ok(()) => return,
        }
    }
}

async fn open_stream(
    cfg: &LoadConfig,
    shared: &Arc<Shared>,
    st: &Arc<StreamState>,
    send: h2::client::SendRequest<Bytes>,
) -> anyhow::Result<()> {
    let uri = format!("http://{}{}", cfg.addr, if st.delta { DELTA_PATH } else { SOTW_PATH });
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .context("request")?;
    let mut ready = send.ready().await.context("connection not ready")?;
    let (resp, body) = ready.send_request(req, false).context("opening the stream")?;
    let runner = Runner {
        st: Arc::clone(st),
        shared: Arc::clone(shared),
        send: body,
        node: Some(node(cfg, st.index).encode_to_vec()),
        sotw: Default::default(),
        delta: DeltaState::default(),
        lds_requested: false,
    };
    let runner = runner.start()?;
    shared.streams_opened.fetch_add(1, Ordering::Relaxed);
    runner.run(resp).await
}

/// SotW per-type state: what to put in the next request.
#[derive(Default)]
struct SotwType {
    version: String,
    nonce: String,
    names: Bytes,
    names_hash: u64,
    requested: bool,
    got: bool,
}

/// Delta state: what the proxy holds.
#[derive(Default)]
struct DeltaState {
    /// EDS clusters (hashes of their names).
    clusters: HashSet<u64>,
    /// Listener name → its RDS names.
    listeners: HashMap<String, Vec<String>>,
    routes: BTreeSet<String>,
    requested: [bool; 4],
    got: [bool; 4],
}

struct Runner {
    st: Arc<StreamState>,
    shared: Arc<Shared>,
    send: h2::SendStream<Bytes>,
    /// Sent with the first request only (Istio's `set_node_on_first_message_only`).
    node: Option<Vec<u8>>,
    sotw: [SotwType; 4],
    delta: DeltaState,
    lds_requested: bool,
}

fn hash_one(s: &str) -> u64 {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

impl Runner {
    fn send(&mut self, b: Bytes) -> anyhow::Result<()> {
        self.send.send_data(b, false).context("sending a request")
    }

    /// The first request: CDS, wildcard.
    fn start(mut self) -> anyhow::Result<Self> {
        self.request(CDS, &[], &[])?;
        Ok(self)
    }

    /// A subscription request (SotW: the full name list; Delta: the changes).
    fn request(&mut self, t: usize, names: &[&str], unsubscribe: &[&str]) -> anyhow::Result<()> {
        let node = self.node.take();
        if self.st.delta {
            let mut req = DeltaDiscoveryRequest {
                type_url: TYPE_URLS[t].into(),
                resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
                resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            };
            if let Some(n) = node {
                req.node = Some(Node::decode(n.as_slice()).context("node")?);
            }
            self.delta.requested[t] = true;
            self.send(delta_request(&req))
        } else {
            let s = &mut self.sotw[t];
            s.names_hash = hash_names(names.iter().copied());
            s.names = self.shared.names(t, 3, names);
            s.requested = true;
            let b = sotw_request(node.as_deref(), &s.version, &s.names, TYPE_URLS[t], &s.nonce);
            self.send(b)
        }
    }

    async fn run(mut self, resp: h2::client::ResponseFuture) -> anyhow::Result<()> {
        let resp = resp.await.context("response headers")?;
        if resp.status() != http::StatusCode::OK {
            bail!("HTTP status {}", resp.status());
        }
        if let Some(s) = resp.headers().get("grpc-status") {
            let message = resp
                .headers()
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .unwrap_or("")
                .to_string();
            return Err(GrpcStatus {
                code: s.to_str().unwrap_or("?").to_string(),
                message,
            }
            .into());
        }
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.context("reading the stream")?;
            let n = chunk.len();
            let _ = body.flow_control().release_capacity(n);
            self.st.bytes.fetch_add(n as u64, Ordering::Relaxed);
            buf.extend_from_slice(&chunk);
            while buf.len() >= 5 {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() < 5 + len {
                    buf.reserve(5 + len - buf.len());
                    break;
                }
                if buf[0] != 0 {
                    bail!("compressed gRPC message");
                }
                buf.advance(5);
                let msg = buf.split_to(len).freeze();
                self.handle(&msg)?;
            }
            if buf.is_empty() {
                // Do not keep the last response's allocation alive between responses.
                buf = BytesMut::new();
            }
        }
        let trailers = body.trailers().await.context("trailers")?;
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|s| s.to_str().ok())
            .unwrap_or("none")
            .to_string();
        let msg = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-message"))
            .and_then(|s| s.to_str().ok())
            .unwrap_or("")
            .to_string();
        Err(anyhow::Error::from(GrpcStatus {
            code: status,
            message: msg,
        })
        .context("stream ended"))
    }

    fn handle(&mut self, msg: &[u8]) -> anyhow::Result<()> {
        let delta = self.st.delta;
        let r = parse_response(msg, delta);
        let Some(t) = type_index(r.type_url) else {
            bail!("response of unexpected type {:?}", r.type_url);
        };
        let now = self.shared.now();
        // Probe before anything is recorded, so a driver that sees the count also sees this.
        if t == EDS && self.st.probe_at.load(Ordering::Acquire) == 0 {
            let probe = self.shared.probe.read().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(p) = probe
                && r.resources.iter().any(|res| assignment_has(res.value, &p))
            {
                self.st.probe_at.store(now, Ordering::Release);
            }
        }
        if delta {
            self.handle_delta(t, &r)?;
        } else {
            self.handle_sotw(t, &r)?;
        }
        self.st.last_at[t].store(now, Ordering::Release);
        self.st.responses[t].fetch_add(1, Ordering::AcqRel);
        self.check_ready(now);
        Ok(())
    }

    fn ack_sotw(&mut self, t: usize, r: &Response<'_>) -> anyhow::Result<()> {
        let s = &mut self.sotw[t];
        s.version = r.version.to_string();
        s.nonce = r.nonce.to_string();
        s.got = true;
        let b = sotw_request(None, &s.version, &s.names, TYPE_URLS[t], &s.nonce);
        self.st.acks.fetch_add(1, Ordering::Relaxed);
        self.send(b)
    }

    fn handle_sotw(&mut self, t: usize, r: &Response<'_>) -> anyhow::Result<()> {
        self.st.resources[t].store(r.resources.len() as u64, Ordering::Relaxed);
        match t {
            CDS => {
                let names: Vec<&str> = r
                    .resources
                    .iter()
                    .map(|res| cluster_facts(res.value))
                    .filter(|(_, eds)| *eds)
                    .map(|(n, _)| n)
                    .collect();
                // Envoy: the new EDS subscription first, then the CDS ACK.
                let eds = &self.sotw[EDS];
                if !eds.requested || eds.names_hash != hash_names(names.iter().copied()) {
                    self.request(EDS, &names, &[])?;
                }
                self.ack_sotw(CDS, r)
            }
            LDS => {
                let mut names = Vec::new();
                for res in &r.resources {
                    listener_routes(res.value, &mut names);
                }
                names.sort_unstable();
                names.dedup();
                let rds = &self.sotw[RDS];
                if (!rds.requested && !names.is_empty())
                    || (rds.requested && rds.names_hash != hash_names(names.iter().copied()))
                {
                    self.request(RDS, &names, &[])?;
                }
                self.ack_sotw(LDS, r)
            }
            _ => {
                self.ack_sotw(t, r)?;
                if t == EDS && !self.lds_requested {
                    // Clusters are warm: listeners next, as Envoy does.
                    self.lds_requested = true;
                    self.request(LDS, &[], &[])?;
                }
                Ok(())
            }
        }
    }

    fn ack_delta(&mut self, t: usize, r: &Response<'_>) -> anyhow::Result<()> {
        self.delta.got[t] = true;
        let req = DeltaDiscoveryRequest {
            type_url: TYPE_URLS[t].into(),
            response_nonce: r.nonce.into(),
            ..Default::default()
        };
        self.st.acks.fetch_add(1, Ordering::Relaxed);
        self.send(delta_request(&req))
    }

    fn handle_delta(&mut self, t: usize, r: &Response<'_>) -> anyhow::Result<()> {
        match t {
            CDS => {
                let mut sub = Vec::new();
                let mut unsub = Vec::new();
                for res in &r.resources {
                    let (name, eds) = cluster_facts(res.value);
                    let name = if res.name.is_empty() { name } else { res.name };
                    let h = hash_one(name);
                    if eds {
                        if self.delta.clusters.insert(h) {
                            sub.push(name);
                        }
                    } else if self.delta.clusters.remove(&h) {
                        unsub.push(name);
                    }
                }
                for name in &r.removed {
                    if self.delta.clusters.remove(&hash_one(name)) {
                        unsub.push(name);
                    }
                }
                self.st.resources[CDS].store(self.delta.clusters.len() as u64, Ordering::Relaxed);
                if !self.delta.requested[EDS] || !sub.is_empty() || !unsub.is_empty() {
                    self.request(EDS, &sub, &unsub)?;
                }
                self.ack_delta(CDS, r)
            }
            LDS => {
                for res in &r.resources {
                    let mut names = Vec::new();
                    listener_routes(res.value, &mut names);
                    let l = if res.name.is_empty() {
                        pb::string(res.value, 1)
                    } else {
                        res.name
                    };
                    self.delta
                        .listeners
                        .insert(l.to_string(), names.iter().map(|s| s.to_string()).collect());
                }
                for name in &r.removed {
                    self.delta.listeners.remove(*name);
                }
                self.st.resources[LDS].store(self.delta.listeners.len() as u64, Ordering::Relaxed);
                let want: BTreeSet<String> = self.delta.listeners.values().flatten().cloned().collect();
                let old = std::mem::replace(&mut self.delta.routes, want);
                let sub: Vec<&str> = self.delta.routes.difference(&old).map(String::as_str).collect();
                let unsub: Vec<&str> = old.difference(&self.delta.routes).map(String::as_str).collect();
                if !sub.is_empty() || !unsub.is_empty() {
                    let (sub, unsub): (Vec<String>, Vec<String>) = (
                        sub.iter().map(|s| s.to_string()).collect(),
                        unsub.iter().map(|s| s.to_string()).collect(),
                    );
                    let s: Vec<&str> = sub.iter().map(String::as_str).collect();
                    let u: Vec<&str> = unsub.iter().map(String::as_str).collect();
                    self.request(RDS, &s, &u)?;
                }
                self.ack_delta(LDS, r)
            }
            _ => {
                self.st.resources[t].store(r.resources.len() as u64, Ordering::Relaxed);
                self.ack_delta(t, r)?;
                if t == EDS && !self.lds_requested {
                    self.lds_requested = true;
                    self.request(LDS, &[], &[])?;
                }
                Ok(())
            }
        }
    }

    fn check_ready(&mut self, now: u64) {
        if self.st.ready_at.load(Ordering::Relaxed) != 0 {
            return;
        }
        let ready = if self.st.delta {
            let d = &self.delta;
            d.got[CDS] && d.got[EDS] && d.got[LDS] && (d.routes.is_empty() || d.got[RDS])
        } else {
            let s = &self.sotw;
            s[CDS].got && s[EDS].got && s[LDS].got && (!s[RDS].requested || s[RDS].got)
        };
        if ready {
            self.st.ready_at.store(now, Ordering::Release);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Process facts and small HTTP helper (for drivers)
// ---------------------------------------------------------------------------------------------

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024)
}

/// GET `path` over HTTP/1.1 on `addr`; the body of a 200 answer.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// One sample (`name` or `name{labels}`) from Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok())?
    })
}

/// Nearest-rank percentile of sorted values.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

// ---------------------------------------------------------------------------------------------
// `meshd bench xds`
// ---------------------------------------------------------------------------------------------

fn duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s)
}

#[derive(Debug, Clone, Args)]
pub struct XdsBenchArgs {
    /// meshd's plaintext gRPC address (istiod's 15010).
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub addr: SocketAddr,
    /// ADS streams to open (one proxy each). meshd admits PILOT_MAX_REQUESTS_PER_SECOND new
    /// streams per second (25 on 2 cores); refused streams retry with backoff, so start the
    /// server with `--max-requests-per-second 0` to time thousands of streams.
    #[arg(long, default_value_t = 100)]
    pub streams: usize,
    /// Streams per HTTP/2 connection (Envoy: 1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub streams_per_conn: u64,
    /// Percentage of streams speaking Delta xDS.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub delta_percent: u32,
    /// CLUSTER_ID of the proxies, alternating.
    #[arg(long, value_delimiter = ',', default_value = "cluster1,cluster2")]
    pub cluster_ids: Vec<String>,
    /// Namespaces of the proxies, alternating.
    #[arg(long, value_delimiter = ',', default_value = "default")]
    pub namespaces: Vec<String>,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Give up waiting for every stream's initial config after this long.
    #[arg(long, default_value = "300s", value_parser = duration)]
    pub timeout: Duration,
    /// Keep the streams open this long after they are ready (ACKing pushes), then report again.
    #[arg(long, default_value = "0s", value_parser = duration)]
    pub hold: Duration,
    /// The server's pid: its VmRSS is read before the streams open and once they are ready.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    streams: usize,
    sotw: usize,
    delta: usize,
    streams_per_conn: u64,
    ready: usize,
    errors: usize,
    first_error: Option<String>,
    open_s: f64,
    all_ready_s: f64,
    ready_p50_ms: f64,
    ready_p99_ms: f64,
    responses: std::collections::BTreeMap<&'static str, u64>,
    acks: u64,
    retries: u64,
    bytes_received: u64,
    server_rss_before_bytes: Option<u64>,
    server_rss_ready_bytes: Option<u64>,
    server_rss_per_stream_bytes: Option<f64>,
    server_cpu_s: Option<f64>,
}

pub async fn run(args: XdsBenchArgs) -> anyhow::Result<()> {
    let mut cfg = LoadConfig::new(args.addr, args.streams);
    cfg.streams_per_conn = args.streams_per_conn as usize;
    cfg.delta_percent = args.delta_percent;
    cfg.cluster_ids = args.cluster_ids.clone();
    cfg.namespaces = args.namespaces.clone();
    cfg.connect_concurrency = args.connect_concurrency;
    let rss_before = args.server_pid.map(rss_bytes).transpose()?;
    let cpu_before = args
        .server_pid
        .map(|p| super::process_cpu_seconds(&p.to_string()))
        .transpose()?;
    let t0 = Instant::now();
    let client = LoadClient::start(cfg).await?;
    let open_s = t0.elapsed().as_secs_f64();
    let waited = client.wait_ready(args.timeout).await;
    let all_ready_s = t0.elapsed().as_secs_f64();
    let rss_ready = args.server_pid.map(rss_bytes).transpose()?;
    let cpu_after = args
        .server_pid
        .map(|p| super::process_cpu_seconds(&p.to_string()))
        .transpose()?;
    if !args.hold.is_zero() {
        tokio::time::sleep(args.hold).await;
    }
    let totals = client.totals();
    let mut ready: Vec<Duration> = client.streams().iter().filter_map(|s| s.ready_at()).collect();
    ready.sort_unstable();
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    let report = Report {
        streams: totals.streams,
        sotw: totals.sotw,
        delta: totals.delta,
        streams_per_conn: args.streams_per_conn,
        ready: totals.ready,
        errors: totals.errors,
        first_error: totals.first_error.clone(),
        open_s,
        all_ready_s,
        ready_p50_ms: ms(percentile(&ready, 0.5)),
        ready_p99_ms: ms(percentile(&ready, 0.99)),
        responses: TYPE_NAMES.iter().copied().zip(totals.responses).collect(),
        acks: totals.acks,
        retries: totals.retries,
        bytes_received: totals.bytes_received,
        server_rss_before_bytes: rss_before,
        server_rss_ready_bytes: rss_ready,
        server_rss_per_stream_bytes: rss_before
            .zip(rss_ready)
            .map(|(b, a)| (a as f64 - b as f64) / args.streams as f64),
        server_cpu_s: cpu_before.zip(cpu_after).map(|(b, a)| a - b),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "streams {} (SotW {}, Delta {}, {} per connection) on {}",
            report.streams, report.sotw, report.delta, report.streams_per_conn, args.addr
        );
        println!(
            "ready {} of {}, errors {}{}",
            report.ready,
            report.streams,
            report.errors,
            report
                .first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
        println!(
            "opened in {:.2}s, all ready after {:.2}s; per stream ready p50 {:.0} ms, p99 {:.0} ms",
            report.open_s, report.all_ready_s, report.ready_p50_ms, report.ready_p99_ms
        );
        println!(
            "responses {:?}, ACKs {}, refused and retried {}, received {:.1} MiB",
            report.responses,
            report.acks,
            report.retries,
            report.bytes_received as f64 / 1048576.0
        );
        if let (Some(b), Some(a)) = (report.server_rss_before_bytes, report.server_rss_ready_bytes) {
            println!(
                "server RSS {:.1} MiB → {:.1} MiB: {:.1} KiB per stream; server CPU {:.2}s",
                b as f64 / 1048576.0,
                a as f64 / 1048576.0,
                report.server_rss_per_stream_bytes.unwrap_or(0.0) / 1024.0,
                report.server_cpu_s.unwrap_or(0.0)
            );
        }
    }
    waited
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
    use envoy_types::pb::envoy::config::endpoint::v3::{
        ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
    };
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, Rds, http_connection_manager,
    };
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use envoy_types::pb::google::protobuf::Any;

    use crate::xds::resource::Resource;

    #[test]
    fn walks_clusters_listeners_and_assignments() {
        let c = Cluster {
            name: "outbound|80||a".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
            ..Default::default()
        };
        assert_eq!(cluster_facts(&c.encode_to_vec()), ("outbound|80||a", true));
        let s = Cluster {
            name: "BlackHoleCluster".into(),
            ..Default::default()
        };
        assert_eq!(cluster_facts(&s.encode_to_vec()), ("BlackHoleCluster", false));

        let hcm = HttpConnectionManager {
            route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
                route_config_name: "80".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let chain = |name: &str| FilterChain {
            filters: vec![Filter {
                name: name.into(),
                config_type: Some(filter::ConfigType::TypedConfig(Any {
                    type_url: HCM_TYPE.into(),
                    value: hcm.encode_to_vec(),
                })),
            }],
            ..Default::default()
        };
        let l = Listener {
            name: "0.0.0.0_80".into(),
            filter_chains: vec![chain("a")],
            default_filter_chain: Some(chain("b")),
            ..Default::default()
        };
        let bytes = l.encode_to_vec();
        let mut names = Vec::new();
        listener_routes(&bytes, &mut names);
        assert_eq!(names, vec!["80", "80"]);

        let ep = |ip: &str| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: ip.into(),
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(80)),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let cla = ClusterLoadAssignment {
            cluster_name: "outbound|80||a".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![ep("10.0.0.1"), ep("10.0.0.2")],
                ..Default::default()
            }],
            ..Default::default()
        };
        let b = cla.encode_to_vec();
        assert!(assignment_has(&b, "10.0.0.2"));
        assert!(!assignment_has(&b, "10.0.0.3"));

        // A meshd-built response parses.
        let r = Resource::new("outbound|80||a", types::ENDPOINT, &cla);
        let resp = crate::xds::wire::sotw_response("v1", types::ENDPOINT, "n1", &[&r]);
        let p = parse_response(&resp, false);
        assert_eq!((p.version, p.type_url, p.nonce), ("v1", types::ENDPOINT, "n1"));
        assert!(assignment_has(p.resources[0].value, "10.0.0.1"));
        let resp = crate::xds::wire::delta_response("v2", types::ENDPOINT, "n2", &[&r], &["gone".into()]);
        let p = parse_response(&resp, true);
        assert_eq!(p.resources[0].name, "outbound|80||a");
        assert_eq!(p.removed, vec!["gone"]);
        assert!(assignment_has(p.resources[0].value, "10.0.0.1"));
        let _ = DiscoveryResponse::decode(resp.clone());
    }

    #[test]
    fn requests_decode_as_envoy_types() {
        let shared = Shared {
            base: Instant::now(),
            probe: RwLock::new(None),
            names: Mutex::default(),
            streams_opened: AtomicUsize::new(0),
        };
        let names = shared.names(EDS, 3, &["a", "b"]);
        let node = node(&LoadConfig::new("127.0.0.1:1".parse().unwrap(), 1), 0).encode_to_vec();
        let b = sotw_request(Some(&node), "v1", &names, types::ENDPOINT, "n1");
        assert_eq!(b[0], 0);
        assert_eq!(u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize, b.len() - 5);
        let r = DiscoveryRequest::decode(&b[5..]).unwrap();
        assert_eq!(r.resource_names, vec!["a", "b"]);
        assert_eq!((r.version_info.as_str(), r.response_nonce.as_str()), ("v1", "n1"));
        let n = r.node.unwrap();
        assert!(n.id.starts_with("sidecar~10.1.0.1~load-0.default~"), "{}", n.id);
        let info = crate::xds::node::parse(Some(&n)).unwrap();
        assert_eq!(
            (info.cluster_id.as_str(), info.namespace.as_str()),
            ("cluster1", "default")
        );
    }

    #[test]
    fn delta_share_and_ips() {
        let mut cfg = LoadConfig::new("127.0.0.1:1".parse().unwrap(), 100);
        cfg.delta_percent = 50;
        assert_eq!((0..100).filter(|i| cfg.is_delta(*i)).count(), 50);
        cfg.delta_percent = 0;
        assert_eq!((0..100).filter(|i| cfg.is_delta(*i)).count(), 0);
        cfg.delta_percent = 100;
        assert_eq!((0..100).filter(|i| cfg.is_delta(*i)).count(), 100);
        assert_eq!(proxy_ip(0).to_string(), "10.1.0.1");
        assert_eq!(proxy_ip(255).to_string(), "10.1.1.0");
        assert_eq!(percentile(&[1, 2, 3, 4], 0.5), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 0.99), Some(4));
    }
}
