//! meshd resolves network-gateway hostnames itself (a LoadBalancer with a hostname, as AWS ELBs
//! have), as istiod does with `RESOLVE_HOSTNAME_GATEWAYS` (reference `multinetwork.md` §2.6):
//! A and AAAA from the system resolver, re-resolved when the records' TTL runs out (clamped to
//! 30 s – 1 h), and on failure the last addresses are kept while the lookup is retried with
//! backoff. Every change of addresses reaches the store, which makes it a full push.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use super::network::ResolvedHost;
use super::store::MeshStore;
use crate::admin::metrics::{CounterVec, Registry};

/// istiod's `MinGatewayTTL`.
pub const MIN_TTL: Duration = Duration::from_secs(30);
pub const MAX_TTL: Duration = Duration::from_secs(3600);
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// What one lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub addrs: Vec<IpAddr>,
    /// The smallest TTL of the answers (before clamping).
    pub ttl: Duration,
}

/// The seam tests fake: resolves one hostname to its A and AAAA addresses.
pub trait HostResolver: Send + Sync + 'static {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Lookup, String>>;
}

/// The system resolver (`/etc/resolv.conf`, `/etc/hosts`) through hickory.
pub struct SystemResolver(hickory_resolver::TokioResolver);

impl SystemResolver {
    pub fn new() -> Result<Self, String> {
        let builder = hickory_resolver::TokioResolver::builder_tokio().map_err(|e| e.to_string())?;
        let mut opts = hickory_resolver::config::ResolverOpts::default();
        opts.ip_strategy = hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
        // meshd does its own TTL bookkeeping; a cache would hide record changes until it expires.
        opts.cache_size = 0;
        Ok(Self(builder.with_options(opts).build()))
    }
}

impl HostResolver for SystemResolver {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Lookup, String>> {
        Box::pin(async move {
            match self.0.lookup_ip(host).await {
                Ok(l) => {
                    let ttl = l.valid_until().saturating_duration_since(std::time::Instant::now());
                    let mut addrs: Vec<IpAddr> = l.iter().collect();
                    addrs.sort();
                    addrs.dedup();
                    Ok(Lookup { addrs, ttl })
                }
                // No A/AAAA records is an answer: the gateway has no addresses now.
                Err(e) if e.is_no_records_found() => Ok(Lookup {
                    addrs: Vec::new(),
                    ttl: MIN_TTL,
                }),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

/// Per hostname: when to look again and how often it failed in a row.
#[derive(Debug, Clone)]
struct HostState {
    due: Instant,
    failures: u32,
}

fn backoff(failures: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(MAX_RETRY)
}

/// Resolves the store's gateway hostnames for as long as the task runs.
pub fn spawn(
    store: Arc<MeshStore>,
    resolver: Arc<dyn HostResolver>,
    registry: &Registry,
) -> tokio::task::JoinHandle<()> {
    let failures = registry.counter_vec(
        "meshd_gateway_dns_failures",
        "Failed lookups of network-gateway hostnames (retried with backoff; the last addresses are kept)",
        &["host"],
    );
    tokio::spawn(run(store, resolver, failures))
}

async fn run(store: Arc<MeshStore>, resolver: Arc<dyn HostResolver>, failures: CounterVec) {
    let mut hostnames = store.gateway_hostnames();
    let mut state: BTreeMap<String, HostState> = BTreeMap::new();
    let mut last: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    loop {
        let wanted: BTreeSet<String> = hostnames.borrow_and_update().clone();
        state.retain(|h, _| wanted.contains(h));
        last.retain(|h, _| wanted.contains(h));
        let now = Instant::now();
        for h in &wanted {
            state.entry(h.clone()).or_insert(HostState { due: now, failures: 0 });
        }
        let due: Vec<String> = state
            .iter()
            .filter(|(_, s)| s.due <= now)
            .map(|(h, _)| h.clone())
            .collect();
        let results =
            futures::future::join_all(due.iter().map(|h| async { (h.clone(), resolver.lookup(h).await) })).await;
        for (host, result) in results {
            let Some(st) = state.get_mut(&host) else { continue };
            match result {
                Ok(l) => {
                    st.failures = 0;
                    st.due = Instant::now() + l.ttl.clamp(MIN_TTL, MAX_TTL);
                    if last.get(&host) != Some(&l.addrs) {
                        tracing::info!(host = %host, addrs = ?l.addrs, ttl_s = l.ttl.as_secs(), "network gateway hostname resolved");
                    }
                    last.insert(host.clone(), l.addrs.clone());
                    store.set_resolved_host(
                        &host,
                        ResolvedHost {
                            addrs: l.addrs,
                            error: None,
                        },
                    );
                }
                Err(e) => {
                    st.failures += 1;
                    let retry = backoff(st.failures);
                    st.due = Instant::now() + retry;
                    failures.with(&[&host]).inc();
                    if st.failures == 1 {
                        tracing::warn!(host = %host, error = %e, retry_in_s = retry.as_secs(), "network gateway hostname does not resolve; keeping its last addresses and retrying");
                    }
                    store.set_resolved_host(
                        &host,
                        ResolvedHost {
                            addrs: last.get(&host).cloned().unwrap_or_default(),
                            error: Some(e),
                        },
                    );
                }
            }
        }
        let next = state.values().map(|s| s.due).min();
        tokio::select! {
            r = hostnames.changed() => if r.is_err() { return },
            _ = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::registry::ServiceKey;
    use crate::registry::model::{Protocol, ServicePort};
    use crate::registry::network::NETWORK_LABEL;
    use crate::registry::store::ShardService;

    /// Answers from a script: each lookup of a host takes the next answer (the last repeats).
    #[derive(Default)]
    struct Scripted {
        answers: Mutex<BTreeMap<String, Vec<Result<Lookup, String>>>>,
        calls: Mutex<Vec<String>>,
    }

    impl HostResolver for Scripted {
        fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Lookup, String>> {
            self.calls.lock().unwrap().push(host.to_string());
            let mut a = self.answers.lock().unwrap();
            let list = a.entry(host.to_string()).or_default();
            let r = if list.len() > 1 {
                list.remove(0)
            } else {
                list.first().cloned().unwrap_or_else(|| Err("no script".into()))
            };
            Box::pin(async move { r })
        }
    }

    fn ok(ips: &[&str], ttl_s: u64) -> Result<Lookup, String> {
        Ok(Lookup {
            addrs: ips.iter().map(|i| i.parse().unwrap()).collect(),
            ttl: Duration::from_secs(ttl_s),
        })
    }

    fn gateway_service(host: &str) -> ShardService {
        ShardService {
            ports: vec![ServicePort {
                name: "tls".into(),
                port: 15443,
                protocol: Protocol::Tls,
            }],
            labels: [(NETWORK_LABEL.to_string(), "n2".to_string())].into(),
            external_addresses: vec![host.into()],
            ..Default::default()
        }
    }

    async fn wait_for(store: &MeshStore, what: &str, f: impl Fn(&crate::registry::Snapshot) -> bool) {
        for _ in 0..2000 {
            if f(&store.snapshot()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test(start_paused = true)]
    async fn hostnames_resolve_refresh_on_ttl_keep_addresses_on_failure_and_disappear_on_no_answer() {
        let store = MeshStore::new();
        let scripted = Arc::new(Scripted::default());
        scripted.answers.lock().unwrap().insert(
            "ew.example.com".into(),
            vec![
                ok(&["5.5.5.5"], 5), // TTL below the floor: looked up again after 30 s
                ok(&["5.5.5.6", "5.5.5.7"], 7200),
                Err("SERVFAIL".into()),
                ok(&[], 60),
            ],
        );
        let registry = Registry::new();
        let task = spawn(Arc::clone(&store), scripted.clone(), &registry);
        store.upsert_service(
            "c2",
            ServiceKey::new("istio-system", "ew"),
            gateway_service("ew.example.com"),
        );
        let addrs = |s: &crate::registry::Snapshot| {
            s.networks
                .gateways
                .iter()
                .map(|g| g.addr.to_string())
                .collect::<Vec<_>>()
        };
        wait_for(&store, "first answer", |s| addrs(s) == ["5.5.5.5"]).await;
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert_eq!(scripted.calls.lock().unwrap().len(), 1, "not before the 30 s floor");
        wait_for(&store, "refresh after the TTL floor", |s| {
            addrs(s) == ["5.5.5.6", "5.5.5.7"]
        })
        .await;
        // The 2 h TTL is clamped to 1 h; then the lookup fails: addresses are kept.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        wait_for(&store, "the failure recorded", |s| {
            s.networks
                .statuses
                .iter()
                .any(|st| st.problem.as_deref().is_some_and(|p| p.contains("SERVFAIL")))
        })
        .await;
        assert_eq!(
            addrs(&store.snapshot()),
            ["5.5.5.6", "5.5.5.7"],
            "kept through the failure"
        );
        assert!(
            registry
                .encode()
                .contains(r#"meshd_gateway_dns_failures{host="ew.example.com"} 1"#)
        );
        // Retried after the backoff; no answer at all removes the gateway.
        wait_for(&store, "no answer removes the gateway", |s| {
            s.networks.gateways.is_empty()
        })
        .await;
        assert_eq!(scripted.calls.lock().unwrap().len(), 4);
        task.abort();
    }

    #[test]
    fn backoff_doubles_up_to_a_minute() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_RETRY);
    }
}
