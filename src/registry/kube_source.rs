//! The Kubernetes source of the service model: one discovery task per registered cluster (the
//! local/primary one and every remote one), plus the Istio config watchers on the primary.
//!
//! Discovery watches Services, EndpointSlices, Pods, Nodes and Namespaces of a cluster and keeps
//! that cluster's shard in the [`MeshStore`]:
//! - nothing is written until every kind has been listed once; then the whole shard is written
//!   with `replace_cluster` and the cluster is marked synced;
//! - a relist (after 410 Gone or a broken watch) is buffered from `Init` to `InitDone` and applied
//!   with `replace_cluster` in one step, so endpoints never disappear in between;
//! - between relists, events are applied incrementally: a Service change is `upsert_service` /
//!   `remove_service` (full push), a slice or Pod change recomputes the endpoints of exactly the
//!   services it touches with `set_endpoints` (endpoint-only push unless identities change);
//! - when the cluster is removed its shard goes with it (`remove_cluster`), and a write racing
//!   with the removal is dropped.
//!
//! Istio config (Gateway, VirtualService, DestinationRule, `networking.istio.io/v1`) is read from
//! the primary only, as istiod reads config from its config cluster. A kind whose CRD is not
//! installed counts as empty; that is logged once and checked again every minute.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use super::convert::{
    ClusterSettings, ClusterState, ConfigItem, ConfigKind, NamespaceFacts, ObjKey, PodFacts, ServiceFacts, SliceFacts,
    build_config, namespace_facts, node_locality, parse_config, pod_facts, service_facts, slice_facts,
};
use super::istio::GROUP;
use super::model::{Locality, ServiceKey};
use super::store::{ClusterShard, MeshStore, ShardService};
use crate::admin::Readiness;
use crate::cluster::{ClusterHandle, ClusterHandler, ClusterSource};

/// Readiness components: the primary's services/endpoints and its Istio config were listed.
pub const READY_SERVICES: &str = "kube-registry";
pub const READY_CONFIG: &str = "istio-config";

/// How often a missing Istio CRD is looked for again.
const CRD_RETRY: Duration = Duration::from_secs(60);

/// What every cluster's endpoints inherit unless labels say otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrySettings {
    pub trust_domain: String,
    pub system_namespace: String,
}

impl RegistrySettings {
    pub fn for_cluster(&self, cluster_id: &str) -> ClusterSettings {
        ClusterSettings {
            cluster_id: cluster_id.into(),
            trust_domain: self.trust_domain.clone(),
            system_namespace: self.system_namespace.clone(),
        }
    }
}

/// Writes one cluster's shard for as long as the cluster is registered. The gate is closed
/// (under its lock) before the cluster's shard is removed, so a write racing with the removal
/// cannot bring the shard back.
struct ShardWriter {
    mesh: Arc<MeshStore>,
    cluster: String,
    open: Arc<Mutex<bool>>,
}

impl ShardWriter {
    fn write(&self, f: impl FnOnce(&MeshStore, &str)) {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if *open {
            f(&self.mesh, &self.cluster);
        }
    }

    fn replace(&self, shard: ClusterShard) {
        self.write(|m, c| m.replace_cluster(c, shard));
    }

    fn upsert_service(&self, key: ServiceKey, svc: ShardService) {
        self.write(|m, c| m.upsert_service(c, key, svc));
    }

    fn remove_service(&self, key: &ServiceKey) {
        self.write(|m, c| m.remove_service(c, key));
    }

    fn set_endpoints(&self, key: ServiceKey, state: &ClusterState) {
        self.write(|m, c| m.set_endpoints(c, key.clone(), state.endpoints(&key)));
    }
}

/// Service discovery for every cluster of the [`crate::cluster::ClusterRegistry`].
pub struct KubeRegistry {
    mesh: Arc<MeshStore>,
    settings: RegistrySettings,
    /// Not ready until the primary (local cluster) has been listed, as istiod waits for its
    /// config cluster's informers.
    readiness: Option<Arc<Readiness>>,
    gates: Mutex<BTreeMap<String, Arc<Mutex<bool>>>>,
}

impl std::fmt::Debug for KubeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRegistry")
            .field("settings", &self.settings)
            .finish()
    }
}

impl KubeRegistry {
    pub fn new(mesh: Arc<MeshStore>, settings: RegistrySettings, readiness: Option<Arc<Readiness>>) -> Arc<Self> {
        Arc::new(Self {
            mesh,
            settings,
            readiness,
            gates: Mutex::default(),
        })
    }

    fn close(&self, id: &str) {
        let gate = self.gates.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        if let Some(gate) = gate {
            let mut open = gate.lock().unwrap_or_else(|e| e.into_inner());
            *open = false;
            self.mesh.remove_cluster(id);
        }
    }
}

impl ClusterHandler for KubeRegistry {
    fn cluster_added(&self, cluster: &Arc<ClusterHandle>) {
        // A handle replacing one with the same id was announced as removed first; be safe anyway.
        self.close(&cluster.id);
        let open = Arc::new(Mutex::new(true));
        self.gates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cluster.id.clone(), Arc::clone(&open));
        let writer = ShardWriter {
            mesh: Arc::clone(&self.mesh),
            cluster: cluster.id.clone(),
            open,
        };
        let local = cluster.source == ClusterSource::Local;
        let readiness = self.readiness.clone().filter(|_| local);
        if let Some(r) = &readiness {
            r.register(READY_SERVICES);
            r.register(READY_CONFIG);
        }
        let mut discovery = Discovery::new(self.settings.for_cluster(&cluster.id), writer, Arc::downgrade(cluster));
        discovery.readiness = readiness.clone();
        cluster.spawn(discovery.run(cluster.client.clone()));
        if local {
            spawn_config_watchers(cluster, Arc::clone(&self.mesh), readiness);
        }
    }

    fn cluster_removed(&self, id: &str) {
        self.close(id);
        tracing::info!(cluster = %id, "service registry of the cluster removed");
    }
}

/// A watch event of one of the kinds, boxed (Kubernetes objects are large and differ in size).
enum Msg {
    Service(Box<watcher::Result<Event<Service>>>),
    Slice(Box<watcher::Result<Event<EndpointSlice>>>),
    Pod(Box<watcher::Result<Event<Pod>>>),
    Node(Box<watcher::Result<Event<Node>>>),
    Namespace(Box<watcher::Result<Event<Namespace>>>),
}

fn watch<K>(client: &kube::Client, wrap: fn(Box<watcher::Result<Event<K>>>) -> Msg) -> BoxStream<'static, Msg>
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    K::DynamicType: Default,
{
    watcher::watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(move |r| wrap(Box::new(r)))
        .boxed()
}

/// A relist in progress (`Init`..`InitDone`) of one kind.
struct Listing<K, V> {
    buffer: Option<BTreeMap<K, V>>,
    listed: bool,
}

impl<K: Ord, V> Default for Listing<K, V> {
    fn default() -> Self {
        Self {
            buffer: None,
            listed: false,
        }
    }
}

impl<K: Ord, V> Listing<K, V> {
    fn begin(&mut self) {
        self.buffer = Some(BTreeMap::new());
    }

    fn add(&mut self, k: K, v: V) {
        self.buffer.get_or_insert_with(BTreeMap::new).insert(k, v);
    }

    fn finish(&mut self) -> BTreeMap<K, V> {
        self.listed = true;
        self.buffer.take().unwrap_or_default()
    }
}

/// One cluster's discovery state machine.
struct Discovery {
    state: ClusterState,
    writer: ShardWriter,
    handle: Weak<ClusterHandle>,
    readiness: Option<Arc<Readiness>>,
    services: Listing<ServiceKey, ServiceFacts>,
    slices: Listing<ObjKey, SliceFacts>,
    pods: Listing<ObjKey, PodFacts>,
    nodes: Listing<String, Locality>,
    namespaces: Listing<String, NamespaceFacts>,
    /// Every kind listed once and the shard written: events now apply incrementally.
    live: bool,
    /// Last error per kind, so a failing watch logs once per distinct error.
    errors: BTreeMap<&'static str, String>,
}

impl Discovery {
    fn new(settings: ClusterSettings, writer: ShardWriter, handle: Weak<ClusterHandle>) -> Self {
        Self {
            state: ClusterState::new(settings),
            writer,
            handle,
            readiness: None,
            services: Listing::default(),
            slices: Listing::default(),
            pods: Listing::default(),
            nodes: Listing::default(),
            namespaces: Listing::default(),
            live: false,
            errors: BTreeMap::new(),
        }
    }

    fn cluster(&self) -> &str {
        &self.state.settings.cluster_id
    }

    async fn run(mut self, client: kube::Client) {
        let mut events = futures::stream::select_all([
            watch::<Service>(&client, Msg::Service),
            watch::<EndpointSlice>(&client, Msg::Slice),
            watch::<Pod>(&client, Msg::Pod),
            watch::<Node>(&client, Msg::Node),
            watch::<Namespace>(&client, Msg::Namespace),
        ]);
        tracing::debug!(cluster = %self.cluster(), "service discovery started");
        while let Some(msg) = events.next().await {
            self.handle(msg);
        }
    }

    fn ok<K>(&mut self, kind: &'static str, r: watcher::Result<Event<K>>) -> Option<Event<K>> {
        match r {
            Ok(ev) => {
                if self.errors.remove(kind).is_some() {
                    tracing::info!(cluster = %self.cluster(), kind, "watch recovered");
                }
                Some(ev)
            }
            Err(e) => {
                if forbidden(&e) {
                    self.forbidden(kind);
                }
                let msg = e.to_string();
                if self.errors.get(kind) != Some(&msg) {
                    tracing::warn!(cluster = %self.cluster(), kind, error = %msg, "watch failed; retrying with backoff, keeping the last known state");
                    self.errors.insert(kind, msg);
                } else {
                    tracing::debug!(cluster = %self.cluster(), kind, error = %msg, "watch failed again");
                }
                None
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Service(r) => {
                let Some(ev) = self.ok("Service", *r) else { return };
                match ev {
                    Event::Init => self.services.begin(),
                    Event::InitApply(s) => {
                        if let Some((k, f)) = service_facts(&s) {
                            self.services.add(k, f);
                        }
                    }
                    Event::InitDone => {
                        let all = self.services.finish();
                        self.state.replace_services(all);
                        self.relisted();
                    }
                    Event::Apply(s) => {
                        if let Some((k, f)) = service_facts(&s) {
                            self.service_changed(k, Some(f));
                        }
                    }
                    Event::Delete(s) => {
                        if let Some((k, _)) = service_facts(&s) {
                            self.service_changed(k, None);
                        }
                    }
                }
            }
            Msg::Slice(r) => {
                let Some(ev) = self.ok("EndpointSlice", *r) else { return };
                match ev {
                    Event::Init => self.slices.begin(),
                    Event::InitApply(s) => {
                        if let Some((k, f)) = slice_facts(&s) {
                            self.slices.add(k, f);
                        }
                    }
                    Event::InitDone => {
                        let all = self.slices.finish();
                        self.state.replace_slices(all);
                        self.relisted();
                    }
                    Event::Apply(s) => {
                        let facts = slice_facts(&s).map(|(_, f)| f);
                        let touched = self.state.set_slice(ObjKey::of(&s.metadata), facts);
                        self.endpoints_changed(touched);
                    }
                    Event::Delete(s) => {
                        let touched = self.state.set_slice(ObjKey::of(&s.metadata), None);
                        self.endpoints_changed(touched);
                    }
                }
            }
            Msg::Pod(r) => {
                let Some(ev) = self.ok("Pod", *r) else { return };
                match ev {
                    Event::Init => self.pods.begin(),
                    Event::InitApply(p) => {
                        let (k, f) = pod_facts(&p);
                        self.pods.add(k, f);
                    }
                    Event::InitDone => {
                        let all = self.pods.finish();
                        self.state.replace_pods(all);
                        self.relisted();
                    }
                    Event::Apply(p) => {
                        let (k, f) = pod_facts(&p);
                        let touched = self.state.set_pod(k, Some(f));
                        self.endpoints_changed(touched);
                    }
                    Event::Delete(p) => {
                        let touched = self.state.set_pod(ObjKey::of(&p.metadata), None);
                        self.endpoints_changed(touched);
                    }
                }
            }
            Msg::Node(r) => {
                let Some(ev) = self.ok("Node", *r) else { return };
                match ev {
                    Event::Init => self.nodes.begin(),
                    Event::InitApply(n) => {
                        let (k, l) = node_locality(&n);
                        self.nodes.add(k, l);
                    }
                    Event::InitDone => {
                        let all = self.nodes.finish();
                        self.state.replace_nodes(all);
                        self.relisted();
                    }
                    Event::Apply(n) => {
                        let (k, l) = node_locality(&n);
                        if self.state.set_node(k, Some(l)) {
                            self.rewrite();
                        }
                    }
                    Event::Delete(n) => {
                        let (k, _) = node_locality(&n);
                        if self.state.set_node(k, None) {
                            self.rewrite();
                        }
                    }
                }
            }
            Msg::Namespace(r) => {
                let Some(ev) = self.ok("Namespace", *r) else { return };
                match ev {
                    Event::Init => self.namespaces.begin(),
                    Event::InitApply(n) => {
                        let (k, f) = namespace_facts(&n);
                        self.namespaces.add(k, f);
                    }
                    Event::InitDone => {
                        let all = self.namespaces.finish();
                        self.state.replace_namespaces(all);
                        self.relisted();
                    }
                    Event::Apply(n) => {
                        let (k, f) = namespace_facts(&n);
                        if self.state.set_namespace(k, Some(f)) {
                            self.rewrite();
                        }
                    }
                    Event::Delete(n) => {
                        let (k, _) = namespace_facts(&n);
                        if self.state.set_namespace(k, None) {
                            self.rewrite();
                        }
                    }
                }
            }
        }
    }

    /// Pods, Nodes and Namespaces only add detail to endpoints: when the cluster's credentials
    /// may not read them, the cluster is served without (the watch keeps retrying) rather than
    /// not at all.
    fn forbidden(&mut self, kind: &'static str) {
        let listed = match kind {
            "Pod" => &mut self.pods.listed,
            "Node" => &mut self.nodes.listed,
            "Namespace" => &mut self.namespaces.listed,
            _ => return,
        };
        if !*listed {
            *listed = true;
            tracing::warn!(cluster = %self.cluster(), kind, "not allowed to list; serving endpoints without it");
            self.relisted();
        }
    }

    fn all_listed(&self) -> bool {
        self.services.listed && self.slices.listed && self.pods.listed && self.nodes.listed && self.namespaces.listed
    }

    /// A kind finished a (re)list: once all kinds have, the whole shard is written in one step.
    fn relisted(&mut self) {
        if !self.all_listed() {
            return;
        }
        self.writer.replace(self.state.shard());
        if !self.live {
            self.live = true;
            if let Some(h) = self.handle.upgrade() {
                h.set_synced();
            }
            if let Some(r) = &self.readiness {
                r.set(READY_SERVICES, true);
            }
            tracing::info!(cluster = %self.cluster(), "service registry synced");
        }
    }

    /// Locality or network changes touch many endpoints: write the whole shard (the store
    /// reports only what really changed).
    fn rewrite(&mut self) {
        if self.live {
            self.writer.replace(self.state.shard());
        }
    }

    fn service_changed(&mut self, key: ServiceKey, facts: Option<ServiceFacts>) {
        let old = self.state.set_service(key.clone(), facts.clone());
        if !self.live || old == facts {
            return;
        }
        match &facts {
            Some(f) => self.writer.upsert_service(key.clone(), f.shard.clone()),
            None => self.writer.remove_service(&key),
        }
        let publish = |f: &Option<ServiceFacts>| f.as_ref().is_some_and(|f| f.publish_not_ready);
        if publish(&old) != publish(&facts) {
            self.writer.set_endpoints(key, &self.state);
        }
    }

    fn endpoints_changed(&mut self, touched: BTreeSet<ServiceKey>) {
        if !self.live {
            return;
        }
        for key in touched {
            self.writer.set_endpoints(key, &self.state);
        }
    }
}

// ---- Istio config from the primary ----

enum ConfigEvent {
    /// The CRD is not installed: the kind is empty.
    Missing,
    Init,
    InitApply(ObjKey, Option<ConfigItem>),
    InitDone,
    Apply(ObjKey, Option<ConfigItem>),
    Delete(ObjKey),
}

fn spawn_config_watchers(cluster: &Arc<ClusterHandle>, mesh: Arc<MeshStore>, readiness: Option<Arc<Readiness>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    for kind in ConfigKind::ALL {
        cluster.spawn(watch_config_kind(cluster.client.clone(), kind, tx.clone()));
    }
    cluster.spawn(aggregate_config(rx, mesh, readiness));
}

fn parse_object(kind: ConfigKind, o: &DynamicObject) -> (ObjKey, Option<ConfigItem>) {
    let key = ObjKey::of(&o.metadata);
    match parse_config(kind, &key.namespace, &key.name, o.data.get("spec")) {
        Ok(item) => (key, Some(item)),
        Err(e) => {
            tracing::warn!(kind = kind.kind(), namespace = %key.namespace, name = %key.name, error = %e, "ignoring invalid Istio config");
            (key, None)
        }
    }
}

fn status_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

fn not_found(e: &watcher::Error) -> bool {
    status_code(e) == Some(404)
}

fn forbidden(e: &watcher::Error) -> bool {
    status_code(e) == Some(403)
}

/// Watches one config kind; while its CRD is missing, reports it empty and checks again slowly.
async fn watch_config_kind(
    client: kube::Client,
    kind: ConfigKind,
    tx: mpsc::UnboundedSender<(ConfigKind, ConfigEvent)>,
) {
    let gvk = GroupVersionKind::gvk(GROUP, "v1", kind.kind());
    let api: Api<DynamicObject> = Api::all_with(client, &ApiResource::from_gvk_with_plural(&gvk, kind.plural()));
    let send = |ev: ConfigEvent| tx.send((kind, ev)).is_ok();
    let mut missing = false;
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Err(kube::Error::Api(s)) if s.code == 404 => {
                if !missing {
                    tracing::info!(
                        kind = kind.kind(),
                        group = GROUP,
                        "Istio CRD not installed in the primary cluster; treating it as empty and checking again every {}s",
                        CRD_RETRY.as_secs()
                    );
                    missing = true;
                }
                if !send(ConfigEvent::Missing) {
                    return;
                }
                tokio::time::sleep(CRD_RETRY).await;
                continue;
            }
            // Anything else: the watcher below retries with backoff and logs.
            _ => {}
        }
        if missing {
            tracing::info!(kind = kind.kind(), group = GROUP, "Istio CRD installed; watching it");
            missing = false;
        }
        let mut stream = watcher::watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut last_error: Option<String> = None;
        while let Some(ev) = stream.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) if not_found(&e) => break,
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_ref() != Some(&msg) {
                        tracing::warn!(kind = kind.kind(), error = %msg, "watching Istio config failed; retrying with backoff");
                        last_error = Some(msg);
                    }
                    continue;
                }
            };
            last_error = None;
            let ev = match ev {
                Event::Init => ConfigEvent::Init,
                Event::InitApply(o) => {
                    let (k, item) = parse_object(kind, &o);
                    ConfigEvent::InitApply(k, item)
                }
                Event::InitDone => ConfigEvent::InitDone,
                Event::Apply(o) => {
                    let (k, item) = parse_object(kind, &o);
                    ConfigEvent::Apply(k, item)
                }
                Event::Delete(o) => ConfigEvent::Delete(ObjKey::of(&o.metadata)),
            };
            if !send(ev) {
                return;
            }
        }
    }
}

/// Merges the three kinds and writes the config once all have been listed, then on changes.
async fn aggregate_config(
    mut rx: mpsc::UnboundedReceiver<(ConfigKind, ConfigEvent)>,
    mesh: Arc<MeshStore>,
    readiness: Option<Arc<Readiness>>,
) {
    let mut items: BTreeMap<ConfigKind, BTreeMap<ObjKey, ConfigItem>> = BTreeMap::new();
    let mut listings: BTreeMap<ConfigKind, Listing<ObjKey, ConfigItem>> = BTreeMap::new();
    let mut written = false;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        for (kind, ev) in batch {
            let listing = listings.entry(kind).or_default();
            let current = items.entry(kind).or_default();
            match ev {
                ConfigEvent::Missing => {
                    listing.buffer = None;
                    listing.listed = true;
                    current.clear();
                }
                ConfigEvent::Init => listing.begin(),
                ConfigEvent::InitApply(k, item) => {
                    if let Some(item) = item {
                        listing.add(k, item);
                    }
                }
                ConfigEvent::InitDone => *current = listing.finish(),
                ConfigEvent::Apply(k, Some(item)) => {
                    current.insert(k, item);
                }
                ConfigEvent::Apply(k, None) | ConfigEvent::Delete(k) => {
                    current.remove(&k);
                }
            }
        }
        let all_listed = ConfigKind::ALL
            .iter()
            .all(|k| listings.get(k).is_some_and(|l| l.listed));
        if all_listed {
            mesh.set_config(build_config(items.values().flat_map(|m| m.values())));
            if !written {
                written = true;
                if let Some(r) = &readiness {
                    r.set(READY_CONFIG, true);
                }
                tracing::info!(
                    objects = items.values().map(BTreeMap::len).sum::<usize>(),
                    "Istio config synced from the primary cluster"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// An API server that knows no resources at all: every request gets a 404 Status.
    async fn empty_api_server(hits: Arc<AtomicUsize>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let hits = Arc::clone(&hits);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        hits.fetch_add(1, Ordering::SeqCst);
                        let body = serde_json::json!({
                            "kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "the server could not find the requested resource",
                            "reason": "NotFound", "code": 404,
                        });
                        async move {
                            http::Response::builder()
                                .status(404)
                                .header("content-type", "application/json")
                                .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn missing_istio_crds_count_as_empty_config_and_are_not_hammered() {
        let hits = Arc::new(AtomicUsize::new(0));
        let addr = empty_api_server(Arc::clone(&hits)).await;
        let client = kube::Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();
        let mesh = MeshStore::new();
        let readiness = Readiness::new();
        readiness.register(READY_CONFIG);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut tasks: Vec<_> = ConfigKind::ALL
            .into_iter()
            .map(|k| tokio::spawn(watch_config_kind(client.clone(), k, tx.clone())))
            .collect();
        tasks.push(tokio::spawn(aggregate_config(
            rx,
            Arc::clone(&mesh),
            Some(Arc::clone(&readiness)),
        )));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !readiness.is_ready() {
            assert!(tokio::time::Instant::now() < deadline, "config never marked synced");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*mesh.snapshot().config, Default::default());
        // One probe per kind, then quiet until the slow retry.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(hits.load(Ordering::SeqCst), 3);
        for t in tasks {
            t.abort();
        }
    }
}
