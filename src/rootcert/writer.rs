//! One cluster's writer: wins the Lease, then watches namespaces and `istio-ca-root-cert`
//! ConfigMaps and keeps every eligible namespace's ConfigMap equal to the current root, with a
//! debounced reconcile. It stops writing the moment leadership is lost.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tokio::time::Instant;

use super::leader::{Change, Elector};
use super::plan::{self, Action, CmState, NsState};
use super::{CONFIGMAP_LABEL, CONFIGMAP_LABEL_VALUE, CONFIGMAP_NAME, DATA_KEY, FIELD_MANAGER, LEASE_NAME, Shared};

/// Writes in flight at once per cluster.
const WRITE_CONCURRENCY: usize = 8;
/// Bound on any single API call made while reconciling.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Re-evaluates the caches now and then even without events (cheap: no API calls unless
/// something is off).
const RESYNC_EVERY: Duration = Duration::from_secs(300);

/// Exponential backoff between `min` and `max`.
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(min: Duration, max: Duration) -> Self {
        Self { min, max, next: min }
    }
    pub(crate) fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Keeps a watcher's objects (reduced to `V`) by key, with relists applied atomically at
/// `InitDone` like a reflector.
pub(crate) struct Cache<V> {
    items: BTreeMap<String, V>,
    relisting: Option<BTreeMap<String, V>>,
    ready: bool,
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            relisting: None,
            ready: false,
        }
    }
}

/// Which keys an event may have changed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Touched {
    None,
    Key(String),
    All,
}

impl<V> Cache<V> {
    pub(crate) fn apply<K>(&mut self, ev: Event<K>, key: impl Fn(&K) -> String, val: impl Fn(&K) -> V) -> Touched {
        match ev {
            Event::Init => {
                self.relisting = Some(BTreeMap::new());
                Touched::None
            }
            Event::InitApply(o) => {
                let k = key(&o);
                self.relisting.get_or_insert_with(BTreeMap::new).insert(k, val(&o));
                Touched::None
            }
            Event::InitDone => {
                if let Some(items) = self.relisting.take() {
                    self.items = items;
                }
                self.ready = true;
                Touched::All
            }
            Event::Apply(o) => {
                let k = key(&o);
                self.items.insert(k.clone(), val(&o));
                Touched::Key(k)
            }
            Event::Delete(o) => {
                let k = key(&o);
                self.items.remove(&k);
                Touched::Key(k)
            }
        }
    }

    pub(crate) fn ready(&self) -> bool {
        self.ready
    }

    pub(crate) fn items(&self) -> &BTreeMap<String, V> {
        &self.items
    }

    pub(crate) fn get(&self, k: &str) -> Option<&V> {
        self.items.get(k)
    }
}

/// Everything one cluster's writer needs.
pub(crate) struct Writer {
    pub shared: Arc<Shared>,
    pub client: kube::Client,
    pub cluster: String,
}

impl Writer {
    /// Runs until `stop` turns true: competes for the lease and writes while leading. Releases
    /// the lease on the way out.
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let _active = self.shared.enter();
        let cfg = &self.shared.cfg;
        let mut elector = Elector::new(
            self.client.clone(),
            &cfg.system_namespace,
            LEASE_NAME,
            &cfg.identity,
            cfg.lease_duration,
        );
        let leader_gauge = self.shared.metrics.leader.with(&[&self.cluster]);
        leader_gauge.set(0.0);
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        tracing::info!(cluster = %self.cluster, identity = %cfg.identity, namespace = %cfg.system_namespace, lease = LEASE_NAME, "root-cert writer started; competing for the lease");
        loop {
            let leading = elector.is_leading();
            let change = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                c = elector.next_change() => c,
                _ = self.lead_all(), if leading => {
                    // lead_all() only returns when a watch or job ends, which they do not;
                    // restart it.
                    continue;
                }
            };
            match change {
                Change::Acquired => {
                    backoff.reset();
                    leader_gauge.set(1.0);
                    tracing::info!(cluster = %self.cluster, identity = %cfg.identity, "acquired the root-cert lease; writing istio-ca-root-cert");
                }
                Change::Lost => {
                    leader_gauge.set(0.0);
                    tracing::info!(cluster = %self.cluster, identity = %cfg.identity, "lost the root-cert lease; stopped writing");
                }
                Change::Failed(e) => {
                    if leader_gauge.get() > 0.0 {
                        tracing::warn!(cluster = %self.cluster, error = %e, "leader election failed; stopped writing until the lease is confirmed again");
                    } else {
                        tracing::warn!(cluster = %self.cluster, error = %e, "leader election failed");
                    }
                    leader_gauge.set(0.0);
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        _ = tokio::time::sleep(backoff.next()) => {}
                    }
                }
            }
        }
        elector.release(Duration::from_secs(3)).await;
        leader_gauge.set(0.0);
        tracing::info!(cluster = %self.cluster, "root-cert writer stopped");
    }

    /// Everything the leader does in this cluster: the ConfigMap writer (unless turned off) and
    /// every extra [`super::LeaderJob`], concurrently. Returns when any of them ends.
    async fn lead_all(&self) {
        let mut work: Vec<futures::future::BoxFuture<'_, ()>> = self
            .shared
            .jobs
            .iter()
            .map(|j| j.lead(self.client.clone(), self.cluster.clone()))
            .collect();
        if self.shared.write_configmaps {
            work.push(Box::pin(self.lead()));
        }
        if work.is_empty() {
            return std::future::pending().await;
        }
        let _ = futures::future::select_all(work).await;
    }

    /// The ConfigMap writer's work: watch, and reconcile after each burst of changes.
    async fn lead(&self) {
        let cfg = &self.shared.cfg;
        let mut namespaces = watcher::watcher(Api::<Namespace>::all(self.client.clone()), watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut configmaps = watcher::watcher(
            Api::<ConfigMap>::all(self.client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={CONFIGMAP_NAME}")),
        )
        .default_backoff()
        .boxed();
        let mut roots = self.shared.ca.subscribe();
        roots.mark_unchanged();
        let mut ns_cache: Cache<NsState> = Cache::default();
        let mut cm_cache: Cache<CmState> = Cache::default();
        // What this writer wrote and has not seen echoed by the watch yet.
        let mut written: BTreeMap<String, CmState> = BTreeMap::new();
        let mut due: Option<Instant> = None;
        let mut retry = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let schedule = |due: &mut Option<Instant>| {
            if due.is_none() {
                *due = Some(Instant::now() + cfg.debounce);
            }
        };
        loop {
            let ready = ns_cache.ready() && cm_cache.ready();
            let at = due.unwrap_or_else(|| Instant::now() + RESYNC_EVERY);
            tokio::select! {
                ev = namespaces.next() => match ev {
                    Some(Ok(ev)) => {
                        ns_cache.apply(ev, |n: &Namespace| n.metadata.name.clone().unwrap_or_default(), NsState::of);
                        schedule(&mut due);
                    }
                    Some(Err(e)) => tracing::warn!(cluster = %self.cluster, error = %e, "watching namespaces"),
                    None => return,
                },
                ev = configmaps.next() => match ev {
                    Some(Ok(ev)) => {
                        let touched = cm_cache.apply(
                            ev,
                            |c: &ConfigMap| c.metadata.namespace.clone().unwrap_or_default(),
                            CmState::of,
                        );
                        match touched {
                            Touched::Key(k) => { written.remove(&k); }
                            Touched::All => written.clear(),
                            Touched::None => {}
                        }
                        schedule(&mut due);
                    }
                    Some(Err(e)) => tracing::warn!(cluster = %self.cluster, error = %e, "watching istio-ca-root-cert ConfigMaps"),
                    None => return,
                },
                changed = roots.changed() => {
                    if changed.is_ok() {
                        tracing::info!(cluster = %self.cluster, "mesh root changed; updating istio-ca-root-cert everywhere");
                        schedule(&mut due);
                    }
                }
                _ = resync.tick() => schedule(&mut due),
                _ = tokio::time::sleep_until(at), if ready && due.is_some() => {
                    due = None;
                    if self.reconcile(&ns_cache, &cm_cache, &mut written).await {
                        retry.reset();
                    } else {
                        due = Some(Instant::now() + retry.next());
                    }
                }
            }
        }
    }

    /// One pass over the caches. Returns false when something must be retried.
    async fn reconcile(
        &self,
        namespaces: &Cache<NsState>,
        configmaps: &Cache<CmState>,
        written: &mut BTreeMap<String, CmState>,
    ) -> bool {
        let root = self.shared.ca.load().root_bundle_pem.clone();
        let root_sha = crate::pki::sha256(root.as_bytes());
        let actions = plan::plan(
            namespaces.items(),
            |ns| written.get(ns).or_else(|| configmaps.get(ns)).copied(),
            &root_sha,
        );
        if actions.is_empty() {
            return true;
        }
        if !self.lease_confirmed().await {
            tracing::warn!(cluster = %self.cluster, pending = actions.len(), "the lease is not confirmed as ours; not writing");
            return false;
        }
        tracing::debug!(cluster = %self.cluster, writes = actions.len(), "reconciling istio-ca-root-cert");
        let results: Vec<(Action, Result<(), WriteError>)> = futures::stream::iter(actions)
            .map(|a| {
                let root = root.as_str();
                async move {
                    let r = self.write(&a, root).await;
                    (a, r)
                }
            })
            .buffer_unordered(WRITE_CONCURRENCY)
            .collect()
            .await;
        let mut all_ok = true;
        for (action, result) in results {
            let ns = action.namespace().to_string();
            let op = action.op();
            match result {
                Ok(()) => {
                    self.shared.metrics.writes.with(&[&self.cluster, op]).inc();
                    tracing::info!(cluster = %self.cluster, namespace = %ns, op, "wrote istio-ca-root-cert");
                    written.insert(ns, CmState::written(root_sha));
                }
                Err(WriteError::Gone) => {
                    tracing::debug!(cluster = %self.cluster, namespace = %ns, op, "namespace is gone or terminating; skipped");
                }
                Err(WriteError::Retry(why)) => {
                    tracing::debug!(cluster = %self.cluster, namespace = %ns, op, why = %why, "istio-ca-root-cert changed meanwhile; retrying");
                    all_ok = false;
                }
                Err(WriteError::Failed(e)) => {
                    self.shared.metrics.write_errors.with(&[&self.cluster, op]).inc();
                    tracing::warn!(cluster = %self.cluster, namespace = %ns, op, error = %e, "writing istio-ca-root-cert failed");
                    all_ok = false;
                }
            }
        }
        all_ok
    }

    /// Re-reads the Lease right before writing: only a holder whose lease is current writes.
    async fn lease_confirmed(&self) -> bool {
        let cfg = &self.shared.cfg;
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &cfg.system_namespace);
        match tokio::time::timeout(CALL_TIMEOUT, api.get(LEASE_NAME)).await {
            Ok(Ok(lease)) => plan::lease_held(&lease, &cfg.identity, SystemTime::now()),
            Ok(Err(e)) => {
                tracing::warn!(cluster = %self.cluster, error = %e, "reading the root-cert lease");
                false
            }
            Err(_) => false,
        }
    }

    async fn write(&self, action: &Action, root: &str) -> Result<(), WriteError> {
        let ns = action.namespace();
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let pp = PostParams {
            dry_run: false,
            field_manager: Some(FIELD_MANAGER.into()),
        };
        let call = async {
            match action {
                Action::Create(_) => {
                    let cm = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(CONFIGMAP_NAME.into()),
                            namespace: Some(ns.into()),
                            labels: Some([(CONFIGMAP_LABEL.to_string(), CONFIGMAP_LABEL_VALUE.to_string())].into()),
                            ..Default::default()
                        },
                        data: Some([(DATA_KEY.to_string(), root.to_string())].into()),
                        ..Default::default()
                    };
                    api.create(&pp, &cm).await.map(|_| ()).map_err(classify_create)
                }
                Action::Update(_) => {
                    // get + replace (not patch): Istio's remote reader role grants configmaps
                    // create/update only. Other keys and labels are kept.
                    let mut cm = match api.get(CONFIGMAP_NAME).await {
                        Ok(cm) => cm,
                        Err(kube::Error::Api(s)) if s.code == 404 => {
                            return Err(WriteError::Retry("deleted".into()));
                        }
                        Err(e) => return Err(WriteError::Failed(e.to_string())),
                    };
                    cm.metadata.managed_fields = None;
                    cm.metadata
                        .labels
                        .get_or_insert_with(BTreeMap::new)
                        .insert(CONFIGMAP_LABEL.into(), CONFIGMAP_LABEL_VALUE.into());
                    cm.data
                        .get_or_insert_with(BTreeMap::new)
                        .insert(DATA_KEY.into(), root.into());
                    api.replace(CONFIGMAP_NAME, &pp, &cm)
                        .await
                        .map(|_| ())
                        .map_err(classify_update)
                }
            }
        };
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(r) => r,
            Err(_) => Err(WriteError::Failed(format!("no answer within {CALL_TIMEOUT:?}"))),
        }
    }
}

#[derive(Debug)]
enum WriteError {
    /// The namespace is gone or terminating: nothing to do.
    Gone,
    /// Someone else changed the object meanwhile: retry from fresh state.
    Retry(String),
    Failed(String),
}

fn classify_create(e: kube::Error) -> WriteError {
    match &e {
        kube::Error::Api(s) if s.code == 409 => WriteError::Retry("already exists".into()),
        kube::Error::Api(s) if s.code == 404 => WriteError::Gone,
        kube::Error::Api(s) if s.code == 403 && s.message.contains("being terminated") => WriteError::Gone,
        _ => WriteError::Failed(e.to_string()),
    }
}

fn classify_update(e: kube::Error) -> WriteError {
    match &e {
        kube::Error::Api(s) if s.code == 409 => WriteError::Retry("conflict".into()),
        kube::Error::Api(s) if s.code == 404 => WriteError::Retry("deleted".into()),
        _ => WriteError::Failed(e.to_string()),
    }
}

/// Applies one namespace-watch event; kept as a function for unit tests of the cache.
#[cfg(test)]
fn ns_event(cache: &mut Cache<NsState>, ev: Event<Namespace>) -> Touched {
    cache.apply(
        ev,
        |n: &Namespace| n.metadata.name.clone().unwrap_or_default(),
        NsState::of,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn cache_follows_events_and_swaps_relists_at_init_done() {
        let mut c = Cache::default();
        assert!(!c.ready());
        assert_eq!(ns_event(&mut c, Event::Init), Touched::None);
        ns_event(&mut c, Event::InitApply(ns("a")));
        assert!(c.items().is_empty(), "a relist is applied only when complete");
        assert_eq!(ns_event(&mut c, Event::InitDone), Touched::All);
        assert!(c.ready());
        assert_eq!(c.items().keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(ns_event(&mut c, Event::Apply(ns("b"))), Touched::Key("b".into()));
        assert_eq!(ns_event(&mut c, Event::Delete(ns("a"))), Touched::Key("a".into()));
        assert_eq!(c.items().keys().collect::<Vec<_>>(), vec!["b"]);
        // A relist that no longer shows b drops it.
        ns_event(&mut c, Event::Init);
        ns_event(&mut c, Event::InitApply(ns("c")));
        assert!(c.get("b").is_some());
        ns_event(&mut c, Event::InitDone);
        assert!(c.get("b").is_none() && c.get("c").is_some());
    }

    #[test]
    fn backoff_doubles_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        assert_eq!(b.next(), Duration::from_millis(100));
        assert_eq!(b.next(), Duration::from_millis(200));
        assert_eq!(b.next(), Duration::from_millis(350));
        assert_eq!(b.next(), Duration::from_millis(350));
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }
}
