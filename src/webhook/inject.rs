//! Sidecar injection (`/inject`), following Istio's `pkg/kube/inject` and its
//! `injection-template.yaml`: the pod gets `istio-init` (iptables) and `istio-proxy` (or
//! `istio-proxy` as a native sidecar), the projected `istio-ca` token, the `istio-ca-root-cert`
//! ConfigMap, Istio's labels and the `sidecar.istio.io/status` annotation. The answer is a JSON
//! patch from the pod as received to the injected pod.
//!
//! Everything here is pure: an [`AdmissionRequest`] in, an [`AdmissionResponse`] and an
//! [`Outcome`] (for the metrics) out.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::config::ServeArgs;

/// Label (preferred) or annotation that opts a pod in (`true`, `yes`, `y`, `on`) or out (anything
/// else non-empty).
pub const INJECT_KEY: &str = "sidecar.istio.io/inject";
/// Written on injection; its presence means "already injected".
pub const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// `true`/`false`: istio-proxy as a native sidecar or not, overriding `--native-sidecars`.
pub const NATIVE_SIDECAR_ANNOTATION: &str = "sidecar.istio.io/nativeSidecar";
pub const PROXY_IMAGE_ANNOTATION: &str = "sidecar.istio.io/proxyImage";
pub const PROXY_CPU_ANNOTATION: &str = "sidecar.istio.io/proxyCPU";
pub const PROXY_MEMORY_ANNOTATION: &str = "sidecar.istio.io/proxyMemory";
pub const PROXY_CPU_LIMIT_ANNOTATION: &str = "sidecar.istio.io/proxyCPULimit";
pub const PROXY_MEMORY_LIMIT_ANNOTATION: &str = "sidecar.istio.io/proxyMemoryLimit";
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// Pod annotation naming the injection templates; `gateway` makes the pod a gateway proxy.
pub const TEMPLATES_ANNOTATION: &str = "inject.istio.io/templates";
pub use crate::registry::network::NETWORK_LABEL;
pub const CANONICAL_NAME_LABEL: &str = "service.istio.io/canonical-name";
pub const CANONICAL_REVISION_LABEL: &str = "service.istio.io/canonical-revision";
pub const PROXY_CONTAINER: &str = "istio-proxy";
pub const INIT_CONTAINER: &str = "istio-init";
/// Namespaces never injected (Istio's `IgnoredNamespaces`).
pub const IGNORED_NAMESPACES: [&str; 2] = ["kube-system", "kube-public"];
/// The control-plane revision meshd announces (`istio.io/rev`).
pub const REVISION: &str = "default";
/// The projected token istio-agent presents to the CA and to xDS.
pub const TOKEN_AUDIENCE: &str = "istio-ca";
pub const TOKEN_EXPIRATION_SECONDS: i64 = 43200;
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/tokens";
pub const ROOT_CERT_MOUNT_PATH: &str = "/var/run/secrets/istio";
pub const ROOT_CERT_CONFIGMAP: &str = "istio-ca-root-cert";
/// The volumes injection adds, in Istio's order.
pub const VOLUMES: [&str; 8] = [
    "workload-socket",
    "credential-socket",
    "workload-certs",
    "istio-envoy",
    "istio-data",
    "istio-podinfo",
    "istio-token",
    "istiod-ca-cert",
];
const STATUS_PORT: u16 = 15020;
const READY_PORT: u16 = 15021;
const ENVOY_PROM_PORT: u16 = 15090;
const PROXY_UID: i64 = 1337;
const PROMETHEUS_SCRAPE: &str = "prometheus.io/scrape";
const PROMETHEUS_PORT: &str = "prometheus.io/port";
const PROMETHEUS_PATH: &str = "prometheus.io/path";
const PROMETHEUS_MERGE: &str = "prometheus.istio.io/merge-metrics";

/// Resource requests and limits of the injected containers; an empty value is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyResources {
    pub cpu_request: String,
    pub memory_request: String,
    pub cpu_limit: String,
    pub memory_limit: String,
}

impl Default for ProxyResources {
    /// Istio's `global.proxy.resources`.
    fn default() -> Self {
        Self {
            cpu_request: "100m".into(),
            memory_request: "128Mi".into(),
            cpu_limit: "2000m".into(),
            memory_limit: "1024Mi".into(),
        }
    }
}

/// What injection puts into a pod, from meshd's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    pub proxy_image: String,
    pub resources: ProxyResources,
    pub native_sidecars: bool,
    /// `ISTIO_META_CLUSTER_ID` for plain `/inject`.
    pub cluster_id: String,
    /// `ISTIO_META_NETWORK` for plain `/inject`; empty leaves it out.
    pub network: String,
    /// `CA_ADDR` and the proxy config's `discoveryAddress`.
    pub discovery_address: String,
    pub trust_domain: String,
    pub domain_suffix: String,
}

impl InjectConfig {
    pub fn from_args(args: &ServeArgs) -> Self {
        Self {
            proxy_image: args.proxy_image.clone(),
            resources: ProxyResources {
                cpu_request: args.proxy_cpu_request.clone(),
                memory_request: args.proxy_memory_request.clone(),
                cpu_limit: args.proxy_cpu_limit.clone(),
                memory_limit: args.proxy_memory_limit.clone(),
            },
            native_sidecars: args.native_sidecars,
            cluster_id: args.cluster_id.clone(),
            network: args.network.clone(),
            discovery_address: args
                .discovery_address
                .clone()
                .filter(|a| !a.trim().is_empty())
                .unwrap_or_else(|| format!("istiod.{}.svc:15012", args.system_namespace)),
            trust_domain: args.trust_domain.clone(),
            domain_suffix: args.domain_suffix.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("the admission request carries no object")]
    NoObject,
    #[error("only Pods are injected, got {0}")]
    NotAPod(String),
    #[error("could not decode the Pod: {0}")]
    Decode(serde_json::Error),
    #[error("the injected Pod does not decode: {0}")]
    Injected(serde_json::Error),
    #[error(transparent)]
    Patch(#[from] kube::core::admission::SerializePatchError),
}

/// Why a pod is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// `hostNetwork: true`: iptables would change the node's routing.
    HostNetwork,
    /// `kube-system` or `kube-public`.
    IgnoredNamespace,
    /// `sidecar.istio.io/status` is already there.
    AlreadyInjected,
    /// `sidecar.istio.io/inject` is set to something other than true.
    OptedOut,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SkipReason::HostNetwork => "the pod uses the host network",
            SkipReason::IgnoredNamespace => "the namespace is never injected",
            SkipReason::AlreadyInjected => "the pod is already injected",
            SkipReason::OptedOut => "sidecar.istio.io/inject is not true",
        })
    }
}

/// What one request did, for the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    Skipped(SkipReason),
    Failed(String),
}

/// Istio's `injectRequired` with policy `enabled` (namespace selection is the webhook
/// configuration's `namespaceSelector`; an AdmissionReview does not carry namespace labels).
pub fn decide(pod: &Pod, namespace: &str) -> Result<(), SkipReason> {
    if pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false) {
        return Err(SkipReason::HostNetwork);
    }
    if IGNORED_NAMESPACES.contains(&namespace) {
        return Err(SkipReason::IgnoredNamespace);
    }
    let annotations = pod.metadata.annotations.as_ref();
    if annotations.is_some_and(|a| a.contains_key(STATUS_ANNOTATION)) {
        return Err(SkipReason::AlreadyInjected);
    }
    // The label is the newer API and wins over the annotation.
    let selector = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_KEY))
        .or_else(|| annotations.and_then(|a| a.get(INJECT_KEY)))
        .map(|v| v.to_ascii_lowercase())
        .unwrap_or_default();
    match selector.as_str() {
        "" | "y" | "yes" | "true" | "on" => Ok(()),
        _ => Err(SkipReason::OptedOut),
    }
}

/// Environment overrides from the request path (Istio's `parseInjectEnvs`):
/// `/inject/cluster/<c>/net/<n>` sets `ISTIO_META_CLUSTER_ID` and `ISTIO_META_NETWORK`; any other
/// `k/v` pair sets the upper-cased `K`; `--slash--` in a value stands for `/`. The deprecated
/// `/inject/:ENV:K=V:ENV:K2=V2` form is understood too.
pub fn path_envs(path: &str) -> BTreeMap<String, String> {
    let path = path.trim_end_matches('/');
    let mut parts = path.splitn(3, '/');
    let (_, _, rest) = (parts.next(), parts.next(), parts.next());
    let mut out = BTreeMap::new();
    let Some(rest) = rest else { return out };
    if rest.starts_with(":ENV:") {
        for pair in rest.split(":ENV:").skip(1) {
            if let Some((k, v)) = pair.split_once('=')
                && !k.is_empty()
            {
                out.insert(k.to_string(), v.to_string());
            }
        }
        return out;
    }
    let items: Vec<&str> = rest.split('/').collect();
    for kv in items.chunks(2) {
        let [k, v] = kv else {
            tracing::warn!(
                key = kv[0],
                "odd number of injection path entries; ignoring the last key"
            );
            break;
        };
        let env = match *k {
            "cluster" => "ISTIO_META_CLUSTER_ID".to_string(),
            "net" => "ISTIO_META_NETWORK".to_string(),
            other => other.to_ascii_uppercase(),
        };
        if !env.is_empty() {
            out.insert(env, v.replace("--slash--", "/"));
        }
    }
    out
}

/// The workload a pod belongs to (Istio's `GetDeployMetaFromPod`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub kind: String,
    pub api_version: String,
}

pub fn workload_of(pod: &Pod) -> Workload {
    let meta = &pod.metadata;
    let mut w = Workload {
        name: meta.name.clone().unwrap_or_default(),
        kind: "Pod".into(),
        api_version: "v1".into(),
    };
    if meta.generate_name.as_deref().is_some_and(|g| !g.is_empty())
        && let Some(owner) = meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
    {
        w.api_version = owner.api_version.clone();
        w.kind = owner.kind.clone();
        w.name = owner.name.clone();
        let hash = meta
            .labels
            .as_ref()
            .and_then(|l| l.get("pod-template-hash"))
            .filter(|h| !h.is_empty());
        match (owner.kind.as_str(), hash) {
            ("ReplicaSet", Some(h)) if owner.name.ends_with(h.as_str()) => {
                w.name = owner
                    .name
                    .strip_suffix(&format!("-{h}"))
                    .unwrap_or(&owner.name)
                    .to_string();
                w.kind = "Deployment".into();
            }
            ("Job", _) => {
                // CronJob jobs are named `<cronjob>-<8 to 10 digit timestamp>`.
                if let Some((base, ts)) = owner.name.rsplit_once('-')
                    && (8..=10).contains(&ts.len())
                    && ts.bytes().all(|b| b.is_ascii_digit())
                {
                    w.name = base.to_string();
                    w.kind = "CronJob".into();
                    w.api_version = "batch/v1".into();
                }
            }
            _ => {}
        }
    }
    if w.name.is_empty() {
        w.name = meta.name.clone().unwrap_or_default();
    }
    w
}

/// Answers one `/inject` request (`path` is the request path, for the env overrides).
/// Failures are denied with the error as the message, as Istio's `toAdmissionResponse` does.
pub fn review(req: &AdmissionRequest<DynamicObject>, path: &str, cfg: &InjectConfig) -> (AdmissionResponse, Outcome) {
    let result = try_review(req, path, cfg);
    match result {
        Ok(Ok(patch)) => match AdmissionResponse::from(req).with_patch(patch) {
            Ok(resp) => (resp, Outcome::Injected),
            Err(e) => failed(req, &InjectError::from(e)),
        },
        Ok(Err(skip)) => (AdmissionResponse::from(req), Outcome::Skipped(skip)),
        Err(e) => failed(req, &e),
    }
}

fn failed(req: &AdmissionRequest<DynamicObject>, e: &InjectError) -> (AdmissionResponse, Outcome) {
    let msg = format!("injection failed: {e}");
    (AdmissionResponse::from(req).deny(&msg), Outcome::Failed(msg))
}

fn try_review(
    req: &AdmissionRequest<DynamicObject>,
    path: &str,
    cfg: &InjectConfig,
) -> Result<Result<json_patch::Patch, SkipReason>, InjectError> {
    if !req.kind.kind.is_empty() && req.kind.kind != "Pod" {
        return Err(InjectError::NotAPod(req.kind.kind.clone()));
    }
    let obj = req.object.as_ref().ok_or(InjectError::NoObject)?;
    let raw = serde_json::to_value(obj).map_err(InjectError::Decode)?;
    let mut pod: Pod = serde_json::from_value(raw).map_err(InjectError::Decode)?;
    // Pods of a Deployment arrive without a namespace (and name); managed fields only cost CPU.
    let namespace = req
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    pod.metadata.namespace = Some(namespace.clone());
    pod.metadata.managed_fields = None;
    if let Err(skip) = decide(&pod, &namespace) {
        return Ok(Err(skip));
    }
    let (original, injected) = inject(&pod, &namespace, cfg, &path_envs(path))?;
    Ok(Ok(json_patch::diff(&original, &injected)))
}

/// The pod as JSON before and after injection, both normalized through the typed Pod so the
/// diff holds only what injection changed.
pub fn inject(
    pod: &Pod,
    namespace: &str,
    cfg: &InjectConfig,
    envs: &BTreeMap<String, String>,
) -> Result<(Value, Value), InjectError> {
    let original = serde_json::to_value(pod).map_err(InjectError::Decode)?;
    let mut v = original.clone();
    mutate(&mut v, pod, namespace, cfg, envs);
    let typed: Pod = serde_json::from_value(v).map_err(InjectError::Injected)?;
    let injected = serde_json::to_value(&typed).map_err(InjectError::Injected)?;
    Ok((original, injected))
}

/// `sidecar.istio.io/status`, field order as Istio writes it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SidecarStatus<'a> {
    init_containers: Vec<&'a str>,
    containers: Vec<&'a str>,
    volumes: Vec<&'a str>,
    image_pull_secrets: Option<Vec<String>>,
    revision: &'a str,
}

/// `ISTIO_PROMETHEUS_ANNOTATIONS`: the pod's own scrape settings, which the agent merges.
#[derive(Serialize)]
struct PrometheusScrape<'a> {
    scrape: &'a str,
    path: &'a str,
    port: &'a str,
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

/// The object `m[key]`, created when missing (or not an object).
fn child<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let c = m.entry(key.to_string()).or_insert_with(|| Value::Object(Map::new()));
    if !c.is_object() {
        *c = Value::Object(Map::new());
    }
    match c {
        Value::Object(c) => c,
        _ => unreachable!("made an object above"),
    }
}

/// The object `v[key]` of the object `v` (both created when missing).
fn obj<'a>(v: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => child(m, key),
        _ => unreachable!("made an object above"),
    }
}

/// Takes the array `v[key]` out (empty when missing).
fn take_array(v: &mut Value, key: &str) -> Vec<Value> {
    match v.as_object_mut().and_then(|m| m.remove(key)) {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    }
}

fn name_of(v: &Value) -> &str {
    v.get("name").and_then(Value::as_str).unwrap_or_default()
}

/// Removes the element named `name`, returning it.
fn remove_named(list: &mut Vec<Value>, name: &str) -> Option<Value> {
    let i = list.iter().position(|c| name_of(c) == name)?;
    Some(list.remove(i))
}

fn env(name: &str, value: &str) -> Value {
    json!({"name": name, "value": value})
}

fn env_field(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}})
}

fn env_resource(name: &str, resource: &str) -> Value {
    json!({"name": name, "valueFrom": {"resourceFieldRef": {"resource": resource}}})
}

fn resources(r: &ProxyResources) -> Value {
    let pick = |pairs: [(&str, &String); 2]| -> Map<String, Value> {
        pairs
            .into_iter()
            .filter(|(_, v)| !v.trim().is_empty())
            .map(|(k, v)| (k.to_string(), Value::String(v.trim().to_string())))
            .collect()
    };
    let requests = pick([("cpu", &r.cpu_request), ("memory", &r.memory_request)]);
    let limits = pick([("cpu", &r.cpu_limit), ("memory", &r.memory_limit)]);
    let mut out = Map::new();
    if !requests.is_empty() {
        out.insert("requests".into(), Value::Object(requests));
    }
    if !limits.is_empty() {
        out.insert("limits".into(), Value::Object(limits));
    }
    Value::Object(out)
}

/// Everything derived from the pod and the config that the containers need.
struct Params<'a> {
    cfg: &'a InjectConfig,
    /// Istio's `gateway` template: the pod is a gateway (`proxy router`), no traffic capture.
    gateway: bool,
    namespace: &'a str,
    image: String,
    resources: ProxyResources,
    native: bool,
    workload: Workload,
    app_containers: Vec<String>,
    pod_ports: String,
}

impl<'a> Params<'a> {
    fn new(pod: &'a Pod, namespace: &'a str, cfg: &'a InjectConfig) -> Self {
        let a = |k: &str| annotation(pod, k).map(str::to_string);
        let native = match annotation(pod, NATIVE_SIDECAR_ANNOTATION).map(str::to_ascii_lowercase) {
            Some(v) if v == "true" => true,
            Some(v) if v == "false" => false,
            _ => cfg.native_sidecars,
        };
        let containers = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
        let apps: Vec<_> = containers.iter().filter(|c| c.name != PROXY_CONTAINER).collect();
        let ports: Vec<Value> = apps
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| serde_json::to_value(p).ok())
            .collect();
        let gateway =
            annotation(pod, TEMPLATES_ANNOTATION).is_some_and(|t| t.split(',').any(|t| t.trim() == "gateway"));
        Self {
            cfg,
            gateway,
            namespace,
            image: a(PROXY_IMAGE_ANNOTATION)
                .filter(|i| !i.is_empty())
                .unwrap_or_else(|| cfg.proxy_image.clone()),
            resources: ProxyResources {
                cpu_request: a(PROXY_CPU_ANNOTATION).unwrap_or_else(|| cfg.resources.cpu_request.clone()),
                memory_request: a(PROXY_MEMORY_ANNOTATION).unwrap_or_else(|| cfg.resources.memory_request.clone()),
                cpu_limit: a(PROXY_CPU_LIMIT_ANNOTATION).unwrap_or_else(|| cfg.resources.cpu_limit.clone()),
                memory_limit: a(PROXY_MEMORY_LIMIT_ANNOTATION).unwrap_or_else(|| cfg.resources.memory_limit.clone()),
            },
            // A gateway's proxy is its main container, never a native sidecar.
            native: native && !gateway,
            workload: workload_of(pod),
            app_containers: apps.iter().map(|c| c.name.clone()).collect(),
            pod_ports: serde_json::to_string(&ports).unwrap_or_else(|_| "[]".into()),
        }
    }

    fn owner(&self) -> String {
        // Istio writes `kubernetes://apis/<apiVersion>/...`, for core kinds too.
        let w = &self.workload;
        format!(
            "kubernetes://apis/{}/namespaces/{}/{}s/{}",
            w.api_version,
            self.namespace,
            w.kind.to_ascii_lowercase(),
            w.name
        )
    }
}

fn proxy_container(p: &Params<'_>, envs: &BTreeMap<String, String>) -> Value {
    let cfg = p.cfg;
    let proxy_config = json!({"discoveryAddress": cfg.discovery_address}).to_string();
    let mut env_list = vec![
        env("PILOT_CERT_PROVIDER", "istiod"),
        env("CA_ADDR", &cfg.discovery_address),
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
        env_field("INSTANCE_IP", "status.podIP"),
        env_field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        env_field("HOST_IP", "status.hostIP"),
        env_resource("ISTIO_CPU_LIMIT", "limits.cpu"),
        env("PROXY_CONFIG", &proxy_config),
        env("ISTIO_META_POD_PORTS", &p.pod_ports),
        env("ISTIO_META_APP_CONTAINERS", &p.app_containers.join(",")),
        env_resource("GOMEMLIMIT", "limits.memory"),
        env_resource("GOMAXPROCS", "limits.cpu"),
        env("ISTIO_META_CLUSTER_ID", &cfg.cluster_id),
        env_field("ISTIO_META_NODE_NAME", "spec.nodeName"),
        env("ISTIO_META_INTERCEPTION_MODE", "REDIRECT"),
        env("ISTIO_META_WORKLOAD_NAME", &p.workload.name),
        env("ISTIO_META_OWNER", &p.owner()),
        env("ISTIO_META_MESH_ID", &cfg.trust_domain),
        env("TRUST_DOMAIN", &cfg.trust_domain),
    ];
    if !cfg.network.is_empty() {
        env_list.push(env("ISTIO_META_NETWORK", &cfg.network));
    }
    // Path overrides replace same-named variables and are appended in name order (Istio's
    // `updateClusterEnvs`).
    env_list.retain(|e| !envs.contains_key(name_of(e)));
    env_list.extend(envs.iter().map(|(k, v)| env(k, v)));
    let probe = |period: u32, failures: u32| {
        json!({
            "httpGet": {"path": "/healthz/ready", "port": READY_PORT},
            "initialDelaySeconds": 0,
            "periodSeconds": period,
            "timeoutSeconds": 3,
            "failureThreshold": failures,
        })
    };
    let mut c = json!({
        "name": PROXY_CONTAINER,
        "image": p.image,
        "imagePullPolicy": "IfNotPresent",
        "args": [
            "proxy",
            if p.gateway { "router" } else { "sidecar" },
            "--domain",
            format!("$(POD_NAMESPACE).svc.{}", cfg.domain_suffix),
            "--proxyLogLevel=warning",
            "--proxyComponentLogLevel=misc:error",
            "--log_output_level=default:info",
        ],
        "ports": [{"containerPort": ENVOY_PROM_PORT, "protocol": "TCP", "name": "http-envoy-prom"}],
        "env": env_list,
        "resources": resources(&p.resources),
        "readinessProbe": probe(15, 4),
        "startupProbe": probe(1, 600),
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "runAsUser": PROXY_UID,
        },
        "volumeMounts": [
            {"name": "workload-socket", "mountPath": "/var/run/secrets/workload-spiffe-uds"},
            {"name": "credential-socket", "mountPath": "/var/run/secrets/credential-uds"},
            {"name": "workload-certs", "mountPath": "/var/run/secrets/workload-spiffe-credentials"},
            {"name": "istiod-ca-cert", "mountPath": ROOT_CERT_MOUNT_PATH},
            {"name": "istio-data", "mountPath": "/var/lib/istio/data"},
            {"name": "istio-envoy", "mountPath": "/etc/istio/proxy"},
            {"name": "istio-token", "mountPath": TOKEN_MOUNT_PATH},
            {"name": "istio-podinfo", "mountPath": "/etc/istio/pod"},
        ],
    });
    if p.native {
        c["restartPolicy"] = json!("Always");
    }
    c
}

fn init_container(p: &Params<'_>, pod: &Pod) -> Value {
    let a = |k: &str, default: &str| annotation(pod, k).unwrap_or(default).to_string();
    let mut exclude_inbound = format!("{ENVOY_PROM_PORT},{READY_PORT},{STATUS_PORT}");
    if let Some(extra) = annotation(pod, "traffic.sidecar.istio.io/excludeInboundPorts").filter(|s| !s.is_empty()) {
        exclude_inbound = format!("{exclude_inbound},{extra}");
    }
    let mut args = vec![
        "istio-iptables".to_string(),
        "-p".into(),
        "15001".into(),
        "-z".into(),
        "15006".into(),
        "-u".into(),
        PROXY_UID.to_string(),
        "-m".into(),
        "REDIRECT".into(),
        "-i".into(),
        a("traffic.sidecar.istio.io/includeOutboundIPRanges", "*"),
        "-x".into(),
        a("traffic.sidecar.istio.io/excludeOutboundIPRanges", ""),
        "-b".into(),
        a("traffic.sidecar.istio.io/includeInboundPorts", "*"),
        "-d".into(),
        exclude_inbound,
    ];
    if let Some(ports) = annotation(pod, "traffic.sidecar.istio.io/excludeOutboundPorts").filter(|s| !s.is_empty()) {
        args.extend(["-o".to_string(), ports.to_string()]);
    }
    args.push("--log_output_level=default:info".into());
    json!({
        "name": INIT_CONTAINER,
        "image": p.image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "resources": resources(&p.resources),
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "readOnlyRootFilesystem": false,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "runAsUser": 0,
        },
    })
}

fn volumes() -> Vec<Value> {
    vec![
        json!({"name": "workload-socket", "emptyDir": {}}),
        json!({"name": "credential-socket", "emptyDir": {}}),
        json!({"name": "workload-certs", "emptyDir": {}}),
        json!({"name": "istio-envoy", "emptyDir": {"medium": "Memory"}}),
        json!({"name": "istio-data", "emptyDir": {}}),
        json!({"name": "istio-podinfo", "downwardAPI": {"items": [
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
        ]}}),
        json!({"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
            "audience": TOKEN_AUDIENCE,
            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
            "path": "istio-token",
        }}]}}),
        json!({"name": "istiod-ca-cert", "configMap": {"name": ROOT_CERT_CONFIGMAP}}),
    ]
}

/// Applies a user-declared container of the same name on top of the generated one, the way
/// Istio lets a pod customise `istio-proxy`: scalars and objects from the pod win; `env`,
/// `volumeMounts` and `ports` merge by name / mount path / port; an image of `auto` is ignored.
fn overlay_user_container(generated: &mut Value, user: &Value) {
    let mut user = user.clone();
    if user.get("image").and_then(Value::as_str) == Some("auto")
        && let Some(m) = user.as_object_mut()
    {
        m.remove("image");
    }
    merge(generated, &user, None);
}

fn merge(base: &mut Value, over: &Value, merge_key: Option<&str>) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                if v.is_null() {
                    b.remove(k);
                    continue;
                }
                let key = match k.as_str() {
                    "env" => Some("name"),
                    "volumeMounts" => Some("mountPath"),
                    "ports" => Some("containerPort"),
                    _ => None,
                };
                match b.get_mut(k) {
                    Some(existing) => merge(existing, v, key),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(o)) if merge_key.is_some() => {
            let key = merge_key.unwrap_or_default();
            for item in o {
                match b
                    .iter_mut()
                    .find(|x| x.get(key).is_some() && x.get(key) == item.get(key))
                {
                    Some(existing) => merge(existing, item, None),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn mutate(v: &mut Value, pod: &Pod, namespace: &str, cfg: &InjectConfig, envs: &BTreeMap<String, String>) {
    let p = Params::new(pod, namespace, cfg);

    // Containers: istio-proxy last (or first among init containers when native), istio-init
    // last among init containers (Istio's `reorderPod`).
    let mut spec_v = Value::Object(std::mem::take(obj(v, "spec")));
    let mut containers = take_array(&mut spec_v, "containers");
    let mut inits = take_array(&mut spec_v, "initContainers");
    let mut proxy = proxy_container(&p, envs);
    let mut init = (!p.gateway).then(|| init_container(&p, pod));
    let user_proxy =
        remove_named(&mut containers, PROXY_CONTAINER).or_else(|| remove_named(&mut inits, PROXY_CONTAINER));
    if let Some(user) = user_proxy {
        overlay_user_container(&mut proxy, &user);
        if p.native {
            proxy["restartPolicy"] = json!("Always");
        }
    }
    if let Some(init) = &mut init
        && let Some(user) = remove_named(&mut inits, INIT_CONTAINER)
    {
        overlay_user_container(init, &user);
    }
    let mut init_names = if init.is_some() { vec![INIT_CONTAINER] } else { vec![] };
    let mut container_names = vec![];
    if p.native {
        inits.insert(0, proxy);
        init_names.push(PROXY_CONTAINER);
    } else {
        containers.push(proxy);
        container_names.push(PROXY_CONTAINER);
    }
    inits.extend(init);
    let mut vols = take_array(&mut spec_v, "volumes");
    vols.retain(|vol| !VOLUMES.contains(&name_of(vol)));
    vols.extend(volumes());
    if let Value::Object(mut m) = spec_v {
        m.insert("initContainers".into(), Value::Array(inits));
        m.insert("containers".into(), Value::Array(containers));
        m.insert("volumes".into(), Value::Array(vols));
        *obj(v, "spec") = m;
    }

    // Labels.
    let canonical_name = label(pod, CANONICAL_NAME_LABEL)
        .or_else(|| label(pod, "app.kubernetes.io/name"))
        .or_else(|| label(pod, "app"))
        .unwrap_or(&p.workload.name)
        .to_string();
    let canonical_revision = label(pod, CANONICAL_REVISION_LABEL)
        .or_else(|| label(pod, "app.kubernetes.io/version"))
        .or_else(|| label(pod, "version"))
        .unwrap_or("latest")
        .to_string();
    let tls_mode = label(pod, TLS_MODE_LABEL).unwrap_or("istio").to_string();
    let labels = child(obj(v, "metadata"), "labels");
    if !p.gateway {
        labels.insert(TLS_MODE_LABEL.into(), json!(tls_mode));
    }
    // `/inject/.../net/<n>` names the pod's network (istiod's `applyMetadata`).
    if let Some(network) = envs.get("ISTIO_META_NETWORK").filter(|n| !n.is_empty()) {
        labels.insert(NETWORK_LABEL.into(), json!(network));
    }
    labels.insert(CANONICAL_NAME_LABEL.into(), json!(canonical_name));
    labels.insert(CANONICAL_REVISION_LABEL.into(), json!(canonical_revision));

    // Annotations.
    let status = SidecarStatus {
        init_containers: init_names,
        containers: container_names,
        volumes: VOLUMES.to_vec(),
        image_pull_secrets: None,
        revision: REVISION,
    };
    let annotations = child(obj(v, "metadata"), "annotations");
    annotations.insert("istio.io/rev".into(), json!(REVISION));
    if let Some(first) = p.app_containers.first() {
        for k in [
            "kubectl.kubernetes.io/default-container",
            "kubectl.kubernetes.io/default-logs-container",
        ] {
            annotations.entry(k).or_insert_with(|| json!(first));
        }
    }
    let prometheus_env = prometheus_merge(annotations);
    annotations.insert(
        STATUS_ANNOTATION.into(),
        json!(serde_json::to_string(&status).unwrap_or_default()),
    );
    if let Some(e) = prometheus_env {
        add_proxy_env(v, e);
    }
}

/// Istio's metrics merging: Prometheus scrapes the agent (15020), which merges the app's
/// metrics described by the pod's own annotations (passed as `ISTIO_PROMETHEUS_ANNOTATIONS`).
/// Returns that env var when the pod had scrape annotations.
fn prometheus_merge(annotations: &mut Map<String, Value>) -> Option<Value> {
    let get = |k: &str| {
        annotations
            .get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    if get(PROMETHEUS_SCRAPE).eq_ignore_ascii_case("false") || get(PROMETHEUS_MERGE).eq_ignore_ascii_case("false") {
        return None;
    }
    let target = STATUS_PORT.to_string();
    if get(PROMETHEUS_PORT) == target {
        return None;
    }
    let (scrape, path, port) = (get(PROMETHEUS_SCRAPE), get(PROMETHEUS_PATH), get(PROMETHEUS_PORT));
    let env_var = (!scrape.is_empty() || !path.is_empty() || !port.is_empty()).then(|| {
        let sc = PrometheusScrape {
            scrape: &scrape,
            path: &path,
            port: &port,
        };
        env(
            "ISTIO_PROMETHEUS_ANNOTATIONS",
            &serde_json::to_string(&sc).unwrap_or_default(),
        )
    });
    annotations.insert(PROMETHEUS_PORT.into(), json!(target));
    annotations.insert(PROMETHEUS_PATH.into(), json!("/stats/prometheus"));
    annotations.insert(PROMETHEUS_SCRAPE.into(), json!("true"));
    env_var
}

fn add_proxy_env(v: &mut Value, e: Value) {
    for list in ["containers", "initContainers"] {
        if let Some(cs) = v.pointer_mut(&format!("/spec/{list}")).and_then(Value::as_array_mut)
            && let Some(c) = cs.iter_mut().find(|c| name_of(c) == PROXY_CONTAINER)
        {
            match c.get_mut("env") {
                Some(Value::Array(list)) => list.push(e),
                _ => c["env"] = json!([e]),
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InjectConfig {
        InjectConfig {
            proxy_image: "docker.io/istio/proxyv2:1.28.0".into(),
            resources: ProxyResources::default(),
            native_sidecars: false,
            cluster_id: "cluster1".into(),
            network: "network1".into(),
            discovery_address: "istiod.istio-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
        }
    }

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn app_pod() -> Pod {
        pod(json!({
            "metadata": {
                "generateName": "web-7d9f8b6c5-",
                "labels": {"app": "web", "version": "v1", "pod-template-hash": "7d9f8b6c5"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8b6c5",
                    "uid": "u1", "controller": true}],
            },
            "spec": {
                "serviceAccountName": "web",
                "containers": [{"name": "app", "image": "nginx", "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}]}],
            },
        }))
    }

    fn env_of<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
        c["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
    }

    fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
        list.as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == name))
            .unwrap_or(&Value::Null)
    }

    #[test]
    fn skip_rules() {
        let mut p = app_pod();
        assert_eq!(decide(&p, "default"), Ok(()));
        assert_eq!(decide(&p, "kube-system"), Err(SkipReason::IgnoredNamespace));
        assert_eq!(decide(&p, "kube-public"), Err(SkipReason::IgnoredNamespace));
        p.metadata.annotations = Some([(INJECT_KEY.to_string(), "false".to_string())].into());
        assert_eq!(decide(&p, "default"), Err(SkipReason::OptedOut));
        // The label wins over the annotation.
        p.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(INJECT_KEY.into(), "True".into());
        assert_eq!(decide(&p, "default"), Ok(()));
        p.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(INJECT_KEY.into(), "nope".into());
        assert_eq!(decide(&p, "default"), Err(SkipReason::OptedOut));
        let mut p = app_pod();
        p.metadata.annotations = Some([(STATUS_ANNOTATION.to_string(), "{}".to_string())].into());
        assert_eq!(decide(&p, "default"), Err(SkipReason::AlreadyInjected));
        let mut p = app_pod();
        p.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(decide(&p, "default"), Err(SkipReason::HostNetwork));
    }

    #[test]
    fn path_overrides_like_istio() {
        assert!(path_envs("/inject").is_empty());
        assert!(path_envs("/inject/").is_empty());
        let e = path_envs("/inject/cluster/cluster2/net/network2");
        assert_eq!(e.get("ISTIO_META_CLUSTER_ID").map(String::as_str), Some("cluster2"));
        assert_eq!(e.get("ISTIO_META_NETWORK").map(String::as_str), Some("network2"));
        let e = path_envs("/inject/cluster/c/foo/a--slash--b/dangling");
        assert_eq!(e.get("FOO").map(String::as_str), Some("a/b"));
        assert_eq!(e.len(), 2);
        let e = path_envs("/inject/:ENV:cluster=c3:ENV:net=n3:ENV:=bad");
        assert_eq!(e.get("cluster").map(String::as_str), Some("c3"));
        assert_eq!(e.get("net").map(String::as_str), Some("n3"));
        assert_eq!(e.len(), 2);
    }

    #[test]
    fn workload_from_owner() {
        let w = workload_of(&app_pod());
        assert_eq!(
            w,
            Workload {
                name: "web".into(),
                kind: "Deployment".into(),
                api_version: "apps/v1".into()
            }
        );
        let p = pod(json!({"metadata": {"name": "solo"}, "spec": {"containers": []}}));
        assert_eq!(workload_of(&p).name, "solo");
        let p = pod(
            json!({"metadata": {"generateName": "nightly-28000000-", "ownerReferences": [
            {"apiVersion": "batch/v1", "kind": "Job", "name": "nightly-28000000", "uid": "u", "controller": true}]},
            "spec": {"containers": []}}),
        );
        assert_eq!(workload_of(&p).kind, "CronJob");
        assert_eq!(workload_of(&p).name, "nightly");
    }

    #[test]
    fn the_injection_path_network_labels_the_pod() {
        let envs = path_envs("/inject/cluster/cluster2/net/network2");
        let (_, out) = inject(&app_pod(), "default", &cfg(), &envs).unwrap();
        assert_eq!(out["metadata"]["labels"][NETWORK_LABEL], "network2");
        let proxy = named(&out["spec"]["containers"], PROXY_CONTAINER);
        assert_eq!(env_of(proxy, "ISTIO_META_NETWORK"), Some("network2"));
        assert_eq!(env_of(proxy, "ISTIO_META_CLUSTER_ID"), Some("cluster2"));
        // Plain /inject leaves the label alone (the proxy env still names --network).
        let (_, out) = inject(&app_pod(), "default", &cfg(), &BTreeMap::new()).unwrap();
        assert!(out["metadata"]["labels"].get(NETWORK_LABEL).is_none());
    }

    #[test]
    fn the_gateway_template_makes_a_router_without_capture() {
        let p = pod(json!({
            "metadata": {"name": "istio-eastwestgateway-1", "namespace": "istio-system",
                "labels": {"istio": "eastwestgateway", "topology.istio.io/network": "network1"},
                "annotations": {"inject.istio.io/templates": "gateway"}},
            "spec": {"containers": [{"name": "istio-proxy", "image": "auto",
                "env": [{"name": "ISTIO_META_REQUESTED_NETWORK_VIEW", "value": "network1"}]}]},
        }));
        let envs = path_envs("/inject/cluster/cluster1/net/network1");
        let (_, out) = inject(&p, "istio-system", &cfg(), &envs).unwrap();
        let containers = out["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "the gateway's own istio-proxy, filled in");
        let proxy = &containers[0];
        assert_eq!(proxy["args"][1], "router");
        assert_eq!(proxy["image"], "docker.io/istio/proxyv2:1.28.0", "image: auto replaced");
        assert_eq!(env_of(proxy, "ISTIO_META_REQUESTED_NETWORK_VIEW"), Some("network1"));
        assert_eq!(env_of(proxy, "ISTIO_META_NETWORK"), Some("network1"));
        let inits = out["spec"]["initContainers"].as_array().cloned().unwrap_or_default();
        assert!(inits.iter().all(|c| c["name"] != INIT_CONTAINER), "no traffic capture");
        assert!(out["metadata"]["labels"].get(TLS_MODE_LABEL).is_none());
        assert_eq!(out["metadata"]["labels"]["istio"], "eastwestgateway");
        let status: serde_json::Value =
            serde_json::from_str(out["metadata"]["annotations"][STATUS_ANNOTATION].as_str().unwrap()).unwrap();
        assert_eq!(status["initContainers"], json!([]));
    }

    #[test]
    fn injects_the_istio_fields() {
        let (orig, out) = inject(&app_pod(), "default", &cfg(), &BTreeMap::new()).unwrap();
        assert_ne!(orig, out);
        let proxy = named(&out["spec"]["containers"], PROXY_CONTAINER);
        assert_eq!(out["spec"]["containers"][0]["name"], "app");
        assert_eq!(out["spec"]["containers"][1]["name"], PROXY_CONTAINER);
        assert_eq!(proxy["image"], "docker.io/istio/proxyv2:1.28.0");
        assert_eq!(proxy["resources"]["requests"]["cpu"], "100m");
        assert_eq!(proxy["resources"]["limits"]["memory"], "1024Mi");
        assert_eq!(env_of(proxy, "ISTIO_META_CLUSTER_ID"), Some("cluster1"));
        assert_eq!(env_of(proxy, "ISTIO_META_NETWORK"), Some("network1"));
        assert_eq!(env_of(proxy, "CA_ADDR"), Some("istiod.istio-system.svc:15012"));
        assert_eq!(env_of(proxy, "ISTIO_META_WORKLOAD_NAME"), Some("web"));
        assert_eq!(
            env_of(proxy, "ISTIO_META_OWNER"),
            Some("kubernetes://apis/apps/v1/namespaces/default/deployments/web")
        );
        assert_eq!(env_of(proxy, "ISTIO_META_APP_CONTAINERS"), Some("app"));
        assert!(env_of(proxy, "ISTIO_META_POD_PORTS").unwrap().contains("8080"));
        assert_eq!(out["spec"]["initContainers"][0]["name"], INIT_CONTAINER);
        let token = named(&out["spec"]["volumes"], "istio-token");
        let sat = &token["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(sat["audience"], "istio-ca");
        assert_eq!(sat["expirationSeconds"], 43200);
        assert_eq!(out["metadata"]["labels"][TLS_MODE_LABEL], "istio");
        assert_eq!(out["metadata"]["labels"][CANONICAL_NAME_LABEL], "web");
        assert_eq!(out["metadata"]["labels"][CANONICAL_REVISION_LABEL], "v1");
        assert_eq!(out["metadata"]["annotations"]["prometheus.io/port"], "15020");
        let status: Value =
            serde_json::from_str(out["metadata"]["annotations"][STATUS_ANNOTATION].as_str().unwrap()).unwrap();
        assert_eq!(status["containers"], json!(["istio-proxy"]));
        assert_eq!(status["initContainers"], json!(["istio-init"]));
        assert_eq!(status["volumes"].as_array().unwrap().len(), 8);
        // The diff applied to the original gives the injected pod.
        let mut patched = orig.clone();
        json_patch::patch(&mut patched, &json_patch::diff(&orig, &out)).unwrap();
        assert_eq!(patched, out);
    }

    #[test]
    fn native_sidecar_and_user_overrides() {
        let mut p = app_pod();
        p.metadata.annotations = Some(
            [
                (NATIVE_SIDECAR_ANNOTATION.to_string(), "true".to_string()),
                (PROXY_CPU_ANNOTATION.to_string(), "250m".to_string()),
                (PROMETHEUS_SCRAPE.to_string(), "true".to_string()),
                (PROMETHEUS_PORT.to_string(), "9090".to_string()),
            ]
            .into(),
        );
        let spec = p.spec.as_mut().unwrap();
        spec.init_containers = Some(vec![
            serde_json::from_value(json!({"name": "setup", "image": "busybox"})).unwrap(),
        ]);
        spec.containers.push(
            serde_json::from_value(json!({"name": "istio-proxy", "image": "auto",
                "env": [{"name": "EXTRA", "value": "1"}, {"name": "TRUST_DOMAIN", "value": "custom"}]}))
            .unwrap(),
        );
        let envs: BTreeMap<String, String> = [("ISTIO_META_CLUSTER_ID".to_string(), "c9".to_string())].into();
        let (_, out) = inject(&p, "default", &cfg(), &envs).unwrap();
        let names = |k: &str| -> Vec<String> {
            out["spec"][k]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(names("initContainers"), ["istio-proxy", "setup", "istio-init"]);
        assert_eq!(names("containers"), ["app"]);
        let proxy = named(&out["spec"]["initContainers"], PROXY_CONTAINER);
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(
            proxy["image"], "docker.io/istio/proxyv2:1.28.0",
            "image auto is ignored"
        );
        assert_eq!(proxy["resources"]["requests"]["cpu"], "250m");
        assert_eq!(env_of(proxy, "EXTRA"), Some("1"));
        assert_eq!(env_of(proxy, "TRUST_DOMAIN"), Some("custom"));
        assert_eq!(env_of(proxy, "ISTIO_META_CLUSTER_ID"), Some("c9"));
        assert_eq!(env_of(proxy, "ISTIO_META_APP_CONTAINERS"), Some("app"));
        assert_eq!(
            env_of(proxy, "ISTIO_PROMETHEUS_ANNOTATIONS"),
            Some(r#"{"scrape":"true","path":"","port":"9090"}"#)
        );
        assert_eq!(out["metadata"]["annotations"]["prometheus.io/port"], "15020");
    }
}
