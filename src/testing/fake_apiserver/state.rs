//! Everything a fake API server is, apart from its listener: configuration, store, CA, signing
//! key, tokens and grants, faults and counters. `FakeState` is the public handle; it survives
//! `stop()`/restart so a restarted server has the same CA, key and objects.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::FakeError;
use super::admission::{IpAllocator, default_object};
use super::authn::{StaticTokens, sa_user};
use super::error::ApiError;
use super::faults::{Counters, Faults, TokenReviewRecord};
use super::pki::Ca;
use super::rbac::{MASTERS, Rbac, Rule, UserInfo, istio_reader_rules};
use super::resources::{ResourceType, for_kind};
use super::store::{ObjKey, Store, Write};
use super::tokens::{MintRequest, TokenSigner};

/// The issuer kube-apiserver is usually configured with.
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// How to run a fake API server.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Address to listen on; port 0 picks a free one (kept across `set_down`/`restart`).
    pub bind: SocketAddr,
    /// Names the cluster, context and user in kubeconfigs.
    pub cluster_name: String,
    /// `iss` of minted tokens.
    pub issuer: String,
    /// The API server's own audiences (`--api-audiences`): what bearer tokens must be for, and
    /// what a TokenReview without `spec.audiences` checks against.
    pub api_audiences: Vec<String>,
    /// The admin bearer token; random when `None`.
    pub admin_token: Option<String>,
    /// Changes kept for watch replay; older resourceVersions get 410 Gone.
    pub event_log_capacity: usize,
    /// How often open watches get a BOOKMARK (when they asked for bookmarks).
    pub bookmark_interval: Duration,
    /// How long the token controller waits before filling a service-account-token Secret.
    pub token_controller_delay: Duration,
    /// REST creates of namespaced objects need their Namespace to exist (as in Kubernetes).
    pub require_namespaces: bool,
    /// Check that the Pod a token is bound to exists with the same uid (kube-apiserver does;
    /// off by default so tests can mint pod-bound tokens without seeding Pods).
    pub strict_pod_binding: bool,
    /// Create `default`, `kube-system`, `kube-public` and `kube-node-lease` at first start.
    pub seed_namespaces: bool,
}

impl FakeConfig {
    pub fn new(bind: SocketAddr, cluster_name: &str) -> Self {
        Self {
            bind,
            cluster_name: cluster_name.to_string(),
            issuer: DEFAULT_ISSUER.to_string(),
            api_audiences: vec![DEFAULT_ISSUER.to_string()],
            admin_token: None,
            event_log_capacity: 10_000,
            bookmark_interval: Duration::from_secs(5),
            token_controller_delay: Duration::from_millis(100),
            require_namespaces: true,
            strict_pod_binding: false,
            seed_namespaces: true,
        }
    }
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self::new(SocketAddr::from(([127, 0, 0, 1], 0)), "cluster1")
    }
}

pub struct Core {
    pub config: FakeConfig,
    pub store: Store,
    pub ca: Ca,
    pub signer: TokenSigner,
    pub static_tokens: StaticTokens,
    pub rbac: Rbac,
    pub faults: Faults,
    pub counters: Counters,
    pub admin_token: String,
    pub ips: IpAllocator,
    /// Bumped by `drop_watches`: every open watch ends.
    pub watch_epoch: watch::Sender<u64>,
}

/// What a test asks a token to carry (see [`FakeState::mint_token_with`]).
#[derive(Debug, Clone)]
pub struct MintOptions {
    pub namespace: String,
    pub service_account: String,
    /// Empty: the API server's audiences.
    pub audiences: Vec<String>,
    pub ttl: Duration,
    pub pod: Option<(String, String)>,
    /// When the token was issued (in the past to mint expired tokens).
    pub issued_at: SystemTime,
}

impl MintOptions {
    pub fn new(namespace: &str, service_account: &str, audiences: &[&str], ttl: Duration) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            audiences: audiences.iter().map(|s| s.to_string()).collect(),
            ttl,
            pod: None,
            issued_at: SystemTime::now(),
        }
    }
}

/// The state of a fake API server: objects, CA, signing key, tokens, grants, faults and
/// counters. Cloning shares it.
#[derive(Clone)]
pub struct FakeState(pub(crate) Arc<Core>);

impl std::fmt::Debug for FakeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeState")
            .field("cluster", &self.0.config.cluster_name)
            .field("resource_version", &self.0.store.current_rv())
            .finish()
    }
}

fn store_err(e: ApiError) -> FakeError {
    FakeError::Api(Box::new(e))
}

impl FakeState {
    /// Fresh state: a new CA, signing key and (optionally) the standard namespaces.
    pub fn new(config: FakeConfig) -> Result<Self, FakeError> {
        let admin_token = config
            .admin_token
            .clone()
            .unwrap_or_else(|| format!("admin-{}", hex::encode(rand::random::<[u8; 16]>())));
        let core = Core {
            store: Store::new(config.event_log_capacity),
            ca: Ca::generate(&config.cluster_name)?,
            signer: TokenSigner::generate(&config.issuer)?,
            static_tokens: StaticTokens::default(),
            rbac: Rbac::default(),
            faults: Faults::default(),
            counters: Counters::default(),
            admin_token: admin_token.clone(),
            ips: IpAllocator::default(),
            watch_epoch: watch::channel(0).0,
            config,
        };
        core.static_tokens.add(
            &admin_token,
            UserInfo {
                username: "kubernetes-admin".into(),
                groups: vec![MASTERS.into()],
                ..Default::default()
            },
        );
        let state = Self(Arc::new(core));
        if state.0.config.seed_namespaces {
            for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                state.ensure_namespace(ns)?;
            }
        }
        Ok(state)
    }

    pub fn config(&self) -> &FakeConfig {
        &self.0.config
    }

    pub fn ca_pem(&self) -> &str {
        self.0.ca.pem()
    }

    /// A token with full access (`system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.0.admin_token
    }

    /// The service-account signing key's public half as JWKS.
    pub fn jwks_json(&self) -> &str {
        self.0.signer.jwks_json()
    }

    pub fn issuer(&self) -> &str {
        self.0.signer.issuer()
    }

    // ---- objects ----

    /// Creates or replaces an object (no resourceVersion check), as `kubectl apply --force`
    /// would; the resource comes from `apiVersion` and `kind`.
    pub fn apply(&self, obj: Value) -> Result<Value, FakeError> {
        let api_version = obj.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
        if api_version.is_empty() || kind.is_empty() {
            return Err(FakeError::BadObject("apiVersion and kind are required".into()));
        }
        let rt = for_kind(api_version, kind);
        self.put(&rt, obj)
    }

    /// Creates or replaces an object of `rt`.
    pub fn put(&self, rt: &ResourceType, mut obj: Value) -> Result<Value, FakeError> {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            return Err(FakeError::BadObject("metadata.name is required".into()));
        }
        let info = rt.info();
        let ns = match info.namespaced {
            Some(false) => String::new(),
            Some(true) => obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .to_string(),
            None => obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        };
        if let Some(m) = obj.as_object_mut() {
            m.insert("apiVersion".into(), json!(rt.api_version()));
            m.entry("kind").or_insert_with(|| json!(info.kind));
            if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("resourceVersion");
            }
        }
        default_object(rt, &mut obj, &self.0.ips);
        let w = self
            .0
            .store
            .write(rt, &ObjKey::new(&ns, &name), |_| Ok(Write::Put(obj)))
            .map_err(store_err)?;
        Ok(w.object.map(|o| (*o).clone()).unwrap_or_default())
    }

    /// Creates or replaces a typed object (`Secret`, `ConfigMap`, …).
    pub fn apply_typed<K>(&self, obj: &K) -> Result<K, FakeError>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let v = serde_json::to_value(obj).map_err(|e| FakeError::BadObject(e.to_string()))?;
        let stored = self.put(&ResourceType::of::<K>(), v)?;
        serde_json::from_value(stored).map_err(|e| FakeError::BadObject(e.to_string()))
    }

    /// An object by resource, namespace (`""` for cluster-scoped) and name.
    pub fn get(&self, rt: &ResourceType, namespace: &str, name: &str) -> Option<Value> {
        self.0
            .store
            .get(&rt.group_resource(), &ObjKey::new(namespace, name))
            .map(|o| present(rt, &o))
    }

    pub fn get_typed<K>(&self, namespace: &str, name: &str) -> Option<K>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        self.get(&ResourceType::of::<K>(), namespace, name)
            .and_then(|v| serde_json::from_value(v).ok())
    }

    /// Objects of a resource, in one namespace or (`None`) all.
    pub fn list(&self, rt: &ResourceType, namespace: Option<&str>) -> Vec<Value> {
        let (_, objects) = self.0.store.snapshot(&rt.group_resource());
        objects
            .iter()
            .filter(|(k, _)| namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, o)| present(rt, o))
            .collect()
    }

    pub fn list_typed<K>(&self, namespace: Option<&str>) -> Vec<K>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        self.list(&ResourceType::of::<K>(), namespace)
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect()
    }

    /// Deletes an object; returns what was deleted.
    pub fn delete(&self, rt: &ResourceType, namespace: &str, name: &str) -> Option<Value> {
        self.0
            .store
            .write(rt, &ObjKey::new(namespace, name), |old| {
                Ok(if old.is_some() { Write::Delete } else { Write::Keep })
            })
            .ok()
            .and_then(|w| w.change.and(w.object))
            .map(|o| present(rt, &o))
    }

    /// Changes an object in place (the closure sees the stored JSON) and stores the result.
    pub fn modify(
        &self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Result<Value, FakeError> {
        let w = self
            .0
            .store
            .write(rt, &ObjKey::new(namespace, name), |old| {
                let mut v = old.cloned().ok_or_else(|| ApiError::not_found(rt, name))?;
                f(&mut v);
                Ok(Write::Put(v))
            })
            .map_err(store_err)?;
        Ok(w.object.map(|o| present(rt, &o)).unwrap_or_default())
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.0.store.current_rv()
    }

    /// Creates the namespace if it is missing.
    pub fn ensure_namespace(&self, name: &str) -> Result<(), FakeError> {
        let rt = ResourceType::core("namespaces");
        if self.get(&rt, "", name).is_none() {
            self.put(
                &rt,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
            )?;
        }
        Ok(())
    }

    /// The ServiceAccount, created (with its namespace) if missing.
    pub fn ensure_service_account(&self, namespace: &str, name: &str) -> Result<Value, FakeError> {
        let rt = ResourceType::core("serviceaccounts");
        if let Some(sa) = self.get(&rt, namespace, name) {
            return Ok(sa);
        }
        self.ensure_namespace(namespace)?;
        self.put(
            &rt,
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}),
        )
    }

    // ---- watches ----

    /// Ends every open watch stream (clients re-watch from their last resourceVersion).
    pub fn drop_watches(&self) {
        self.0.watch_epoch.send_modify(|e| *e += 1);
    }

    /// Drops the event log (and list snapshots): a watch or `continue` from an older
    /// resourceVersion now gets 410 Gone, as after etcd compaction.
    pub fn compact(&self) {
        self.0.store.compact();
    }

    // ---- tokens and grants ----

    /// Mints a bound service-account token like TokenRequest. As TokenRequest needs its
    /// ServiceAccount, a missing one is created first; the token carries its uid.
    pub fn mint_token(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[&str],
        ttl: Duration,
        pod: Option<(&str, &str)>,
    ) -> Result<String, FakeError> {
        let mut o = MintOptions::new(namespace, service_account, audiences, ttl);
        o.pod = pod.map(|(n, u)| (n.to_string(), u.to_string()));
        self.mint_token_with(o)
    }

    pub fn mint_token_with(&self, o: MintOptions) -> Result<String, FakeError> {
        let sa = self.ensure_service_account(&o.namespace, &o.service_account)?;
        let uid = sa.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default();
        let audiences = if o.audiences.is_empty() {
            self.0.config.api_audiences.clone()
        } else {
            o.audiences
        };
        self.0.signer.mint_bound(&MintRequest {
            namespace: o.namespace,
            service_account: o.service_account,
            sa_uid: uid.to_string(),
            audiences,
            ttl: o.ttl,
            pod: o.pod,
            issued_at: o.issued_at,
        })
    }

    /// Grants rules to a username (`system:serviceaccount:ns:sa`, …) or a group.
    pub fn grant(&self, subject: &str, rules: Vec<Rule>) {
        self.0.rbac.grant(subject, rules);
    }

    /// Removes every rule granted to `subject`.
    pub fn revoke(&self, subject: &str) {
        self.0.rbac.revoke_all(subject);
    }

    /// Maps a static bearer token to a user (with `system:authenticated` added).
    pub fn add_static_token(&self, token: &str, username: &str, groups: &[&str]) {
        self.0.static_tokens.add(
            token,
            UserInfo {
                username: username.into(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
                ..Default::default()
            },
        );
    }

    /// A token for ServiceAccount `istio-system/<sa>` (created if missing) holding Istio's
    /// reader rules, good for the API server's audience for a day.
    pub fn reader_token(&self, sa: &str) -> Result<String, FakeError> {
        let user = sa_user("istio-system", sa, "", Default::default()).username;
        self.0.rbac.grant(&user, istio_reader_rules());
        self.mint_token("istio-system", sa, &[], Duration::from_secs(86_400), None)
    }

    // ---- faults and counters ----

    /// Delays every API response by `d`.
    pub fn set_latency(&self, d: Duration) {
        self.0.faults.set_latency(d);
    }

    /// The next `n` API requests fail with `code` (429/503 carry `Retry-After`).
    pub fn fail_next(&self, n: usize, code: u16) {
        self.0.faults.fail_next(n, code);
    }

    /// Each API request fails with `code` with probability `rate`; 0 turns it off.
    pub fn set_failure_rate(&self, rate: f64, code: u16) {
        self.0.faults.set_failure_rate(rate, code);
    }

    /// `Retry-After` seconds on injected 429/503s (default 1).
    pub fn set_retry_after(&self, secs: u32) {
        self.0.faults.set_retry_after(secs);
    }

    /// Turns latency and injected failures off.
    pub fn clear_faults(&self) {
        self.0.faults.clear();
    }

    /// Requests seen for `verb` (get, list, watch, create, update, patch, delete,
    /// deletecollection) on `resource` (plural, `serviceaccounts/token` for subresources).
    pub fn request_count(&self, verb: &str, resource: &str) -> u64 {
        self.0.counters.requests(verb, resource)
    }

    /// Every request, including discovery and failed ones.
    pub fn request_total(&self) -> u64 {
        self.0.counters.total()
    }

    /// `((verb, resource), count)` for every resource request seen.
    pub fn request_counts(&self) -> Vec<((String, String), u64)> {
        self.0.counters.all_requests()
    }

    /// TokenReviews answered.
    pub fn token_review_count(&self) -> u64 {
        self.0.counters.reviews().len() as u64
    }

    /// TokenReviews of this token.
    pub fn token_review_count_for_token(&self, token: &str) -> u64 {
        self.0.counters.reviews().iter().filter(|r| r.token == token).count() as u64
    }

    /// TokenReviews that asked for this audience.
    pub fn token_review_count_for_audience(&self, audience: &str) -> u64 {
        self.0
            .counters
            .reviews()
            .iter()
            .filter(|r| r.audiences.iter().any(|a| a == audience))
            .count() as u64
    }

    /// Every TokenReview, oldest first.
    pub fn token_reviews(&self) -> Vec<TokenReviewRecord> {
        self.0.counters.reviews()
    }
}

/// An object as served for `rt`: `apiVersion` of the version asked for, `kind` filled in.
pub fn present(rt: &ResourceType, obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), json!(rt.api_version()));
        if !m.contains_key("kind") {
            m.insert("kind".into(), json!(rt.info().kind));
        }
    }
    v
}
