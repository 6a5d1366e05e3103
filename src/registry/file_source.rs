//! `--config-dir DIR`: the service model from files, for running without Kubernetes.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file in the directory (not recursive; dotfiles skipped) is
//! read as one or more Kubernetes objects (multi-document YAML, a JSON object, or a `List`).
//! Understood kinds: Service, EndpointSlice, Pod, Node, Namespace (for services and endpoints,
//! exactly as the Kubernetes source converts them) and `networking.istio.io` Gateway,
//! VirtualService, DestinationRule; other kinds are ignored.
//!
//! Objects belong to the local cluster (`--cluster-id`) unless annotated
//! `meshd.io/cluster: <id>`, so one directory can describe a multi-cluster mesh.
//!
//! The directory is polled; when any file's content changed, everything is rebuilt and written
//! with `replace_cluster` per cluster (and `remove_cluster` for clusters no longer mentioned) and
//! `set_config`. A file that fails to parse is logged with its path and error and its last good
//! content stays in effect until it is fixed.
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Deserialize;
use serde_json::Value;

use super::convert::{
    ClusterState, ConfigItem, ConfigKind, ObjKey, build_config, namespace_facts, node_locality, parse_config,
    pod_facts, service_facts, slice_facts,
};
use super::istio::IstioConfig;
use super::kube_source::RegistrySettings;
use super::store::{ClusterShard, MeshStore};

/// Annotation assigning a file object to a cluster other than the local one.
pub const CLUSTER_ANNOTATION: &str = "meshd.io/cluster";

/// One object of a file, typed enough to build the model.
#[derive(Debug, Clone)]
enum FileObject {
    Service(Box<Service>),
    Slice(Box<EndpointSlice>),
    Pod(Box<Pod>),
    Node(Box<Node>),
    Namespace(Box<Namespace>),
    Config(ConfigItem),
}

/// A parsed object and the cluster it belongs to (`None`: the local cluster).
#[derive(Debug, Clone)]
struct Placed {
    cluster: Option<String>,
    object: FileObject,
}

/// Whether `path` is a config file by name.
fn is_config_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.starts_with('.') {
        return false;
    }
    matches!(
        path.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("yaml" | "yml" | "json")
    )
}

/// Every document of a file, flattening `List`s.
fn documents(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let v = Value::deserialize(doc).map_err(|e| format!("document {}: {e}", i + 1))?;
        match v {
            Value::Null => {}
            Value::Object(ref m)
                if m.get("kind")
                    .and_then(Value::as_str)
                    .is_some_and(|k| k.ends_with("List"))
                    && m.get("items").is_some_and(Value::is_array) =>
            {
                out.extend(m["items"].as_array().into_iter().flatten().cloned());
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<Box<T>, serde_json::Error> {
    serde_json::from_value(v).map(Box::new)
}

/// Parses one file. Unknown kinds are skipped; a malformed known object fails the file.
fn parse_file(text: &str) -> Result<Vec<Placed>, String> {
    let mut out = Vec::new();
    for v in documents(text)? {
        let str_at = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default().to_string();
        let (api_version, kind) = (str_at("/apiVersion"), str_at("/kind"));
        let (namespace, name) = (str_at("/metadata/namespace"), str_at("/metadata/name"));
        if kind.is_empty() || name.is_empty() {
            return Err(format!(
                "an object without kind or metadata.name (apiVersion {api_version:?}, kind {kind:?})"
            ));
        }
        let cluster = v
            .pointer(&format!(
                "/metadata/annotations/{}",
                CLUSTER_ANNOTATION.replace('/', "~1")
            ))
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .map(str::to_string);
        let what = format!(
            "{kind} {}{name}",
            if namespace.is_empty() {
                String::new()
            } else {
                format!("{namespace}/")
            }
        );
        let err = |e: serde_json::Error| format!("{what}: {e}");
        // Namespaced kinds default to `default`, as kubectl does.
        let mut v = v.clone();
        let namespaced = !matches!(kind.as_str(), "Node" | "Namespace");
        if namespaced
            && namespace.is_empty()
            && let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut)
        {
            meta.insert("namespace".into(), Value::from("default"));
        }
        let ns = if namespace.is_empty() {
            "default"
        } else {
            namespace.as_str()
        };
        let object = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => FileObject::Service(typed(v).map_err(err)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => FileObject::Slice(typed(v).map_err(err)?),
            ("v1", "Pod") => FileObject::Pod(typed(v).map_err(err)?),
            ("v1", "Node") => FileObject::Node(typed(v).map_err(err)?),
            ("v1", "Namespace") => FileObject::Namespace(typed(v).map_err(err)?),
            (av, k) => match ConfigKind::of(av, k) {
                Some(ck) => FileObject::Config(parse_config(ck, ns, &name, v.get("spec")).map_err(err)?),
                None => {
                    tracing::debug!(object = %what, api_version = %av, "config dir: ignoring an unsupported kind");
                    continue;
                }
            },
        };
        out.push(Placed { cluster, object });
    }
    Ok(out)
}

/// What the directory describes.
#[derive(Debug, Default, PartialEq)]
struct Model {
    shards: BTreeMap<String, ClusterShard>,
    config: IstioConfig,
}

fn build(objects: &[Placed], local_cluster: &str, settings: &RegistrySettings) -> Model {
    let mut states: BTreeMap<String, ClusterState> = BTreeMap::new();
    let mut config: BTreeMap<(ConfigKind, ObjKey), ConfigItem> = BTreeMap::new();
    for p in objects {
        let cluster = p.cluster.as_deref().unwrap_or(local_cluster);
        let st = states
            .entry(cluster.to_string())
            .or_insert_with(|| ClusterState::new(settings.for_cluster(cluster)));
        match &p.object {
            FileObject::Service(s) => {
                if let Some((k, f)) = service_facts(s) {
                    st.set_service(k, Some(f));
                }
            }
            FileObject::Slice(s) => {
                if let Some((k, f)) = slice_facts(s) {
                    st.set_slice(k, Some(f));
                }
            }
            FileObject::Pod(pod) => {
                let (k, f) = pod_facts(pod);
                st.set_pod(k, Some(f));
            }
            FileObject::Node(n) => {
                let (k, l) = node_locality(n);
                st.set_node(k, Some(l));
            }
            FileObject::Namespace(n) => {
                let (k, f) = namespace_facts(n);
                st.set_namespace(k, Some(f));
            }
            // Istio config is mesh-wide (the config cluster's); the annotation does not matter.
            FileObject::Config(item) => {
                let (kind, meta) = match item {
                    ConfigItem::Gateway(c) => (ConfigKind::Gateway, &c.meta),
                    ConfigItem::VirtualService(c) => (ConfigKind::VirtualService, &c.meta),
                    ConfigItem::DestinationRule(c) => (ConfigKind::DestinationRule, &c.meta),
                };
                config.insert((kind, ObjKey::new(&meta.namespace, &meta.name)), item.clone());
            }
        }
    }
    Model {
        shards: states.into_iter().map(|(c, s)| (c, s.shard())).collect(),
        config: build_config(config.values()),
    }
}

/// One file's last read and last good parse.
struct FileEntry {
    hash: u64,
    good: Option<Vec<Placed>>,
}

fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

/// The `--config-dir` source.
pub struct FileSource {
    pub dir: PathBuf,
    pub local_cluster: String,
    pub settings: RegistrySettings,
    pub mesh: Arc<MeshStore>,
    files: BTreeMap<PathBuf, FileEntry>,
    written_clusters: BTreeSet<String>,
    loaded_once: bool,
    /// The last directory read error, so a missing directory is logged once.
    dir_error: Option<String>,
}

impl FileSource {
    pub fn new(dir: PathBuf, local_cluster: &str, settings: RegistrySettings, mesh: Arc<MeshStore>) -> Self {
        Self {
            dir,
            local_cluster: local_cluster.into(),
            settings,
            mesh,
            files: BTreeMap::new(),
            written_clusters: BTreeSet::new(),
            loaded_once: false,
            dir_error: None,
        }
    }

    /// Reads the directory; when anything changed, rebuilds and writes the model. Returns
    /// whether the model was (re)written.
    pub fn poll(&mut self) -> bool {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => {
                if self.dir_error.take().is_some() {
                    tracing::info!(dir = %self.dir.display(), "config directory readable again");
                }
                e
            }
            Err(e) => {
                let msg = e.to_string();
                if self.dir_error.as_ref() != Some(&msg) {
                    tracing::warn!(dir = %self.dir.display(), error = %msg, "reading the config directory; keeping the last state");
                    self.dir_error = Some(msg);
                }
                return false;
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| is_config_file(p) && p.is_file())
            .collect();
        paths.sort();
        let mut changed = false;
        let mut present = BTreeSet::new();
        for path in paths {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    // Being replaced, or unreadable: keep what it said before.
                    tracing::warn!(path = %path.display(), error = %e, "reading a config file; keeping its last good content");
                    if self.files.contains_key(&path) {
                        present.insert(path);
                    }
                    continue;
                }
            };
            present.insert(path.clone());
            let hash = hash_bytes(&bytes);
            if self.files.get(&path).is_some_and(|f| f.hash == hash) {
                continue;
            }
            let parsed = std::str::from_utf8(&bytes)
                .map_err(|e| format!("not UTF-8: {e}"))
                .and_then(parse_file);
            let previous = self.files.remove(&path).and_then(|f| f.good);
            let good = match parsed {
                Ok(objects) => {
                    tracing::debug!(path = %path.display(), objects = objects.len(), "config file loaded");
                    changed = true;
                    Some(objects)
                }
                Err(e) => {
                    tracing::error!(
                        path = %path.display(),
                        error = %e,
                        kept_last_good = previous.is_some(),
                        "invalid config file; keeping its last good content until it is fixed"
                    );
                    previous
                }
            };
            self.files.insert(path, FileEntry { hash, good });
        }
        let before = self.files.len();
        self.files.retain(|p, _| present.contains(p));
        changed |= self.files.len() != before;
        if !changed && self.loaded_once {
            return false;
        }
        self.loaded_once = true;
        let objects: Vec<Placed> = self.files.values().filter_map(|f| f.good.clone()).flatten().collect();
        let model = build(&objects, &self.local_cluster, &self.settings);
        let clusters: BTreeSet<String> = model.shards.keys().cloned().collect();
        for gone in self.written_clusters.difference(&clusters) {
            self.mesh.remove_cluster(gone);
        }
        let services = model.shards.values().map(|s| s.services.len()).sum::<usize>();
        for (cluster, shard) in model.shards {
            self.mesh.replace_cluster(&cluster, shard);
        }
        self.mesh.set_config(model.config);
        tracing::info!(
            dir = %self.dir.display(),
            files = self.files.len(),
            clusters = ?clusters,
            services,
            "config directory loaded"
        );
        self.written_clusters = clusters;
        true
    }

    /// Loads once now, then polls every `every` until aborted.
    pub fn spawn(mut self, every: Duration) -> tokio::task::JoinHandle<()> {
        self.poll();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                // File reads are small and local; a blocking pool hop is not worth it here.
                self.poll();
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RegistrySettings {
        RegistrySettings {
            trust_domain: "cluster.local".into(),
            system_namespace: "istio-system".into(),
        }
    }

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-2
  namespace: default
  labels: {kubernetes.io/service-name: echo}
  annotations: {meshd.io/cluster: cluster2}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [127.0.0.20]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: echo}
spec:
  host: echo.default.svc.cluster.local
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
"#;

    #[test]
    fn objects_are_placed_in_their_clusters() {
        let objects = parse_file(OBJECTS).unwrap();
        assert_eq!(objects.len(), 3, "the Deployment is skipped");
        let model = build(&objects, "cluster1", &settings());
        assert_eq!(model.shards.len(), 2);
        assert_eq!(model.shards["cluster1"].services.len(), 1);
        let eps = &model.shards["cluster2"].endpoints[&crate::registry::ServiceKey::new("default", "echo")];
        assert_eq!(eps[0].cluster_id, "cluster2");
        assert_eq!(model.config.destination_rules[0].meta.namespace, "default");
    }

    #[test]
    fn a_broken_object_fails_its_file_with_its_name() {
        let e = parse_file("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: 7}\n").unwrap_err();
        assert!(e.contains("Service x"), "{e}");
        let e = parse_file("kind: [").unwrap_err();
        assert!(e.contains("document 1"), "{e}");
    }
}
