//! Push machinery: immutable push contexts with their generated-resource caches, version and
//! nonce minting, and the debouncer that turns model changes into pushes.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use super::generators::eds;
use super::generators::router::{NoSecrets, SecretSource};
use super::generators::split_horizon::EdsView;
use super::interned::Name;
use super::resource::{Resource, ResourceSet};
use super::types;
use crate::registry::{Change, MeshStore, Snapshot};

/// A token minted when an xDS server starts; it prefixes every version and nonce, so a restarted
/// meshd never produces a version or nonce a proxy already holds.
pub fn new_epoch() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{ms:x}{:04x}", rand::random::<u16>())
}

/// A fresh nonce, unique within and across processes.
pub fn next_nonce(epoch: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{epoch}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Everything generators read for one push, immutable once built.
pub struct PushContext {
    /// `version_info` / `system_version_info` of responses built from this context.
    pub version: String,
    pub epoch: Arc<str>,
    pub snapshot: Arc<Snapshot>,
    /// What triggered this context (empty for the first one).
    pub change: Change,
    /// Gateway credentials (`credentialName`) for SDS; carried from context to context.
    pub secrets: Arc<dyn SecretSource>,
    /// (type, class key) → resources, generated on first use.
    cache: Mutex<HashMap<(&'static str, String), Arc<ResourceSet>>>,
    /// EDS per network view in use (one in a single-network mesh), carried over from the
    /// previous context for unchanged hosts.
    eds_views: Mutex<HashMap<EdsView, Arc<ViewEds>>>,
    /// EDS cluster names of the hosts this context's change touched, computed once and read by
    /// every connection's endpoint push.
    changed_eds: OnceLock<Arc<Vec<Name>>>,
    /// Endpoints by address, for sidecars' inbound side: every sidecar asked for its own, which
    /// walked all endpoints of the mesh per proxy per full push.
    by_address: OnceLock<HashMap<std::net::IpAddr, Vec<InboundEndpoint>>>,
}

/// The EDS of one network view.
#[derive(Default)]
struct ViewEds {
    /// Hostname → its EDS resources.
    by_host: Mutex<BTreeMap<String, Arc<Vec<Arc<Resource>>>>>,
    all: OnceLock<Arc<ResourceSet>>,
}

/// An endpoint as the inbound side of the proxy at its address sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InboundEndpoint {
    pub host: String,
    pub service_port_name: String,
    pub port: u16,
}

impl std::fmt::Debug for PushContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushContext").field("version", &self.version).finish()
    }
}

fn static_type(type_url: &str) -> &'static str {
    types::PUSH_ORDER
        .iter()
        .find(|t| **t == type_url)
        .copied()
        .unwrap_or("other")
}

impl PushContext {
    pub fn initial(epoch: Arc<str>, snapshot: Arc<Snapshot>) -> Self {
        Self {
            version: format!("{epoch}/{}", snapshot.version),
            epoch,
            snapshot,
            change: Change::default(),
            secrets: Arc::new(NoSecrets),
            cache: Mutex::default(),
            eds_views: Mutex::default(),
            changed_eds: OnceLock::new(),
            by_address: OnceLock::new(),
        }
    }

    /// The context after `change`: generated resources that the change cannot affect are kept.
    pub fn next(prev: &PushContext, snapshot: Arc<Snapshot>, change: Change) -> Self {
        let next = Self::initial(Arc::clone(&prev.epoch), snapshot);
        if !change.full {
            *next.cache.lock().unwrap_or_else(|e| e.into_inner()) =
                prev.cache.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let prev_views = prev.eds_views.lock().unwrap_or_else(|e| e.into_inner());
            let mut views = next.eds_views.lock().unwrap_or_else(|e| e.into_inner());
            for (view, eds) in prev_views.iter() {
                let mut by_host = eds.by_host.lock().unwrap_or_else(|e| e.into_inner()).clone();
                by_host.retain(|host, _| !change.endpoint_hosts.contains(host));
                views.insert(
                    view.clone(),
                    Arc::new(ViewEds {
                        by_host: Mutex::new(by_host),
                        all: OnceLock::new(),
                    }),
                );
            }
        }
        Self {
            change,
            secrets: Arc::clone(&prev.secrets),
            ..next
        }
    }

    /// This context reading gateway credentials from `secrets`.
    pub fn with_secrets(mut self, secrets: Arc<dyn SecretSource>) -> Self {
        self.secrets = secrets;
        self
    }

    /// Generated resources for a class of proxies, computed once per context.
    pub fn cached(&self, type_url: &str, key: String, f: impl FnOnce() -> ResourceSet) -> Arc<ResourceSet> {
        let k = (static_type(type_url), key);
        if let Some(v) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(&k) {
            return Arc::clone(v);
        }
        // Generated outside the lock: two proxies racing may both build it; both results are equal.
        let v = Arc::new(f());
        Arc::clone(
            self.cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(k)
                .or_insert(v),
        )
    }

    fn view_eds(&self, view: &EdsView) -> Arc<ViewEds> {
        let mut views = self.eds_views.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = views.get(view) {
            return Arc::clone(v);
        }
        Arc::clone(views.entry(view.clone()).or_default())
    }

    fn host_eds(&self, view: &EdsView, eds: &ViewEds, host: &str) -> Arc<Vec<Arc<Resource>>> {
        if let Some(v) = eds.by_host.lock().unwrap_or_else(|e| e.into_inner()).get(host) {
            return Arc::clone(v);
        }
        let v = Arc::new(eds::host_resources(self, view, host));
        Arc::clone(
            eds.by_host
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(host.to_string())
                .or_insert(v),
        )
    }

    /// Every ClusterLoadAssignment of this context as `view` sees it, by cluster name: encoded
    /// once per view and shared by every proxy with that view.
    pub fn endpoints_for(&self, view: &EdsView) -> Arc<ResourceSet> {
        let eds = self.view_eds(view);
        Arc::clone(eds.all.get_or_init(|| {
            let mut all = ResourceSet::new();
            for host in self.snapshot.services.keys() {
                for r in self.host_eds(view, &eds, host).iter() {
                    all.insert(r.name.to_string(), Arc::clone(r));
                }
            }
            Arc::new(all)
        }))
    }

    /// Network views whose EDS this context has built (one per network and requested view).
    pub fn eds_view_count(&self) -> usize {
        self.eds_views.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The endpoints at `ip`, in host order.
    pub fn endpoints_at(&self, ip: &std::net::IpAddr) -> &[InboundEndpoint] {
        let index = self.by_address.get_or_init(|| {
            let mut index: HashMap<std::net::IpAddr, Vec<InboundEndpoint>> = HashMap::new();
            for (host, eps) in &self.snapshot.endpoints {
                for e in eps.iter() {
                    index.entry(e.address).or_default().push(InboundEndpoint {
                        host: host.clone(),
                        service_port_name: e.service_port_name.clone(),
                        port: e.port,
                    });
                }
            }
            index
        });
        index.get(ip).map_or(&[], Vec::as_slice)
    }

    /// EDS cluster names of `hosts`, sorted. A connection's coalesced push can span several
    /// contexts' changes, so it asks for its own hosts; the common case, exactly this context's
    /// change, is computed once and shared by every connection.
    pub fn eds_names_of(&self, hosts: &std::collections::BTreeSet<String>) -> Arc<Vec<Name>> {
        if *hosts == self.change.endpoint_hosts {
            return Arc::clone(self.changed_eds.get_or_init(|| Arc::new(self.collect_eds_names(hosts))));
        }
        Arc::new(self.collect_eds_names(hosts))
    }

    fn collect_eds_names(&self, hosts: &std::collections::BTreeSet<String>) -> Vec<Name> {
        let mut names: Vec<Name> = hosts
            .iter()
            .flat_map(|h| eds::cluster_names(self, h))
            .map(|n| super::interned::lookup(&n))
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

/// Debounce settings (`PILOT_DEBOUNCE_AFTER`, `PILOT_DEBOUNCE_MAX`).
#[derive(Debug, Clone, Copy)]
pub struct Debounce {
    pub after: Duration,
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Self {
            after: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// Something that receives pushes (the xDS server).
pub trait PushTarget: Send + Sync + 'static {
    fn push(&self, snapshot: Arc<Snapshot>, change: Change, first_event: Instant);
}

/// Merges model changes until `after` of quiet (or `max` since the first), then pushes once.
pub fn spawn_debouncer(store: Arc<MeshStore>, target: Arc<dyn PushTarget>, d: Debounce) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            store.changed().await;
            let first = Instant::now();
            let mut last = first;
            loop {
                let deadline = (last + d.after).min(first + d.max);
                tokio::select! {
                    _ = store.changed() => last = Instant::now(),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            let change = store.take_changes();
            if change.is_empty() {
                continue;
            }
            target.push(store.snapshot(), change, first);
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const ECHO: &str = "echo.default.svc.cluster.local";
    const OTHER: &str = "echo.other.svc.cluster.local";

    #[test]
    fn eds_names_cover_a_connections_coalesced_hosts_not_only_the_latest_change() {
        let first = crate::xds::generators::grpc::tests::push();
        let change = Change {
            endpoint_hosts: [OTHER.to_string()].into(),
            ..Default::default()
        };
        let ctx = PushContext::next(&first, Arc::clone(&first.snapshot), change);
        let names = |v: &[Name]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();

        // This context's own change: computed once, shared by every connection.
        let own: BTreeSet<String> = [OTHER.to_string()].into();
        let a = ctx.eds_names_of(&own);
        assert!(Arc::ptr_eq(&a, &ctx.eds_names_of(&own)));
        // Both name forms: a gateway's SNI-DNAT clusters follow the same endpoints.
        assert_eq!(
            names(&a),
            [
                "outbound_.7070_._.echo.other.svc.cluster.local",
                "outbound|7070||echo.other.svc.cluster.local"
            ]
        );

        // A connection that coalesced an earlier push for ECHO gets ECHO's clusters too.
        let coalesced: BTreeSet<String> = [ECHO.to_string(), OTHER.to_string()].into();
        let got = names(&ctx.eds_names_of(&coalesced));
        assert_eq!(got.len(), 4);
        assert!(got.contains(&"outbound|7070||echo.default.svc.cluster.local".to_string()));
        assert!(got.contains(&"outbound|7070||echo.other.svc.cluster.local".to_string()));
    }

    #[test]
    fn eds_is_built_once_per_network_view_and_unchanged_hosts_carry_over() {
        use crate::xds::generators::split_horizon::EdsView;
        let first = crate::xds::generators::grpc::tests::push();
        let flat = EdsView::default();
        let narrowed = EdsView {
            visible: Some(vec!["network9".into()]),
            ..Default::default()
        };
        let a = first.endpoints_for(&flat);
        assert!(Arc::ptr_eq(&a, &first.endpoints_for(&flat)), "shared within a view");
        let b = first.endpoints_for(&narrowed);
        assert_eq!(first.eds_view_count(), 2);
        assert_eq!(a.len(), b.len(), "same names in every view");
        let name = "outbound|7070||echo.default.svc.cluster.local";
        assert!(!Arc::ptr_eq(&a[name], &b[name]), "built per view");
        assert_eq!(
            a[name].version, b[name].version,
            "endpoints without a network are seen by every view"
        );
        // An endpoint-only change rebuilds that host only, in every view.
        let change = Change {
            endpoint_hosts: [OTHER.to_string()].into(),
            ..Default::default()
        };
        let ctx = PushContext::next(&first, Arc::clone(&first.snapshot), change);
        for view in [&flat, &narrowed] {
            let (old, new) = (first.endpoints_for(view), ctx.endpoints_for(view));
            let kept = "outbound|7070||echo.default.svc.cluster.local";
            assert!(Arc::ptr_eq(&old[kept], &new[kept]), "unchanged host carried over");
            let rebuilt = "outbound|7070||echo.other.svc.cluster.local";
            assert!(!Arc::ptr_eq(&old[rebuilt], &new[rebuilt]), "changed host rebuilt");
        }
    }
}
