//! Mesh-wide settings, read from one place: `--mesh-config FILE`, else the `istio` ConfigMap in
//! the primary's system namespace (what istiod mounts as `/etc/istio/config`).
//!
//! Both hold the same document, the ConfigMap's data: `meshNetworks` (the networks of a
//! multi-network mesh and their gateways) and `mesh` (MeshConfig; read by the mesh-config work,
//! accepted here). A value is a YAML string, as in the ConfigMap, or an inline mapping; the file
//! may also be the whole ConfigMap object. An update that does not parse keeps the last good
//! settings, with one log line, `meshd_mesh_config_errors`, and the error in `/debug/networkz`.
pub mod file;
pub mod kube;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::admin::metrics::{Counter, Registry};
use crate::registry::MeshStore;
use crate::registry::network::{MeshNetworks, MeshNetworksError};

/// The `istio` ConfigMap's name, as istiod reads it.
pub const CONFIGMAP: &str = "istio";
pub const MESH_KEY: &str = "mesh";
pub const MESH_NETWORKS_KEY: &str = "meshNetworks";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeshConfigError {
    #[error("not a YAML mapping: {0}")]
    Yaml(String),
    #[error("unknown key {0:?}: the document holds the istio ConfigMap's data (keys mesh, meshNetworks)")]
    UnknownKey(String),
    #[error("key {0:?} must be a YAML string or mapping")]
    BadValue(String),
    #[error("{0}")]
    Networks(#[from] MeshNetworksError),
}

/// What meshd takes from the mesh config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshSettings {
    pub mesh_networks: MeshNetworks,
}

fn value_text(key: &str, v: &serde_yaml::Value) -> Result<String, MeshConfigError> {
    match v {
        serde_yaml::Value::Null => Ok(String::new()),
        serde_yaml::Value::String(s) => Ok(s.clone()),
        serde_yaml::Value::Mapping(_) => serde_yaml::to_string(v).map_err(|e| MeshConfigError::Yaml(e.to_string())),
        _ => Err(MeshConfigError::BadValue(key.to_string())),
    }
}

impl MeshSettings {
    /// From the ConfigMap's data.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<Self, MeshConfigError> {
        let networks = data.get(MESH_NETWORKS_KEY).map(String::as_str).unwrap_or_default();
        if let Some(mesh) = data.get(MESH_KEY) {
            serde_yaml::from_str::<serde_yaml::Value>(mesh).map_err(|e| MeshConfigError::Yaml(format!("mesh: {e}")))?;
        }
        Ok(Self {
            mesh_networks: MeshNetworks::parse(networks)?,
        })
    }

    /// From a `--mesh-config` file: the ConfigMap's data, or the ConfigMap itself.
    pub fn from_file_text(text: &str) -> Result<Self, MeshConfigError> {
        let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| MeshConfigError::Yaml(e.to_string()))?;
        let doc = match doc {
            serde_yaml::Value::Null => return Ok(Self::default()),
            serde_yaml::Value::Mapping(m) => m,
            _ => return Err(MeshConfigError::Yaml("the document is not a mapping".into())),
        };
        let is_configmap = doc.get("kind").and_then(|k| k.as_str()) == Some("ConfigMap");
        let data = if is_configmap {
            match doc.get("data") {
                Some(serde_yaml::Value::Mapping(m)) => m.clone(),
                None | Some(serde_yaml::Value::Null) => Default::default(),
                Some(_) => return Err(MeshConfigError::BadValue("data".into())),
            }
        } else {
            doc
        };
        let mut out = BTreeMap::new();
        for (k, v) in &data {
            let key = k.as_str().ok_or_else(|| MeshConfigError::BadValue(format!("{k:?}")))?;
            if key != MESH_KEY && key != MESH_NETWORKS_KEY {
                // The ConfigMap carries other keys (values.yaml of the chart); a bare file may not.
                if is_configmap {
                    continue;
                }
                return Err(MeshConfigError::UnknownKey(key.to_string()));
            }
            out.insert(key.to_string(), value_text(key, v)?);
        }
        Self::from_data(&out)
    }
}

/// Applies mesh settings to the model and reports bad updates; shared by both sources.
pub struct MeshConfigSink {
    store: Arc<MeshStore>,
    errors: Arc<Counter>,
    last_error: Mutex<Option<String>>,
}

impl MeshConfigSink {
    pub fn new(store: Arc<MeshStore>, registry: &Registry) -> Arc<Self> {
        Arc::new(Self {
            store,
            errors: registry.counter(
                "meshd_mesh_config_errors",
                "Mesh config updates refused (the last good settings stay in use)",
            ),
            last_error: Mutex::new(None),
        })
    }

    pub fn apply(&self, origin: &str, parsed: Result<MeshSettings, MeshConfigError>) {
        match parsed {
            Ok(s) => {
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.store.set_mesh_networks(s.mesh_networks);
            }
            Err(e) => {
                self.errors.inc();
                tracing::error!(source = origin, error = %e, "mesh config refused; keeping the last good settings");
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{origin}: {e}"));
            }
        }
    }

    /// The last refused update's error, until a good one arrives.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETWORKS: &str = "networks:\n  network1:\n    endpoints: [{fromRegistry: cluster1}]\n    gateways: [{address: 1.1.1.1, port: 15443}]\n";

    #[test]
    fn the_file_is_the_configmap_data_with_string_or_inline_values() {
        let as_string = format!(
            "meshNetworks: |\n{}",
            NETWORKS.lines().map(|l| format!("  {l}\n")).collect::<String>()
        );
        let a = MeshSettings::from_file_text(&as_string).unwrap();
        let inline = format!(
            "mesh: {{}}\nmeshNetworks:\n{}",
            NETWORKS.lines().map(|l| format!("  {l}\n")).collect::<String>()
        );
        let b = MeshSettings::from_file_text(&inline).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.mesh_networks.networks["network1"].gateways[0].port, 15443);
        let cm = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio}}\ndata:\n  values.yaml: ignored\n  meshNetworks: |\n{}",
            NETWORKS.lines().map(|l| format!("    {l}\n")).collect::<String>()
        );
        assert_eq!(MeshSettings::from_file_text(&cm).unwrap(), a);
        assert_eq!(MeshSettings::from_file_text("").unwrap(), MeshSettings::default());
    }

    #[test]
    fn bad_documents_name_the_problem() {
        for (text, want) in [
            ("trustDomain: x", "unknown key \"trustDomain\""),
            ("meshNetworks: 3", "must be a YAML string or mapping"),
            (
                "meshNetworks: {networks: {n: {endpoints: []}}}",
                "at least one endpoint",
            ),
            ("[1, 2]", "not a mapping"),
            ("mesh: \"a: [\"", "mesh:"),
        ] {
            let e = MeshSettings::from_file_text(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_bad_update_keeps_the_last_good_settings() {
        let store = MeshStore::new();
        let registry = Registry::new();
        let sink = MeshConfigSink::new(Arc::clone(&store), &registry);
        sink.apply(
            "test",
            MeshSettings::from_file_text(&format!("meshNetworks: {NETWORKS:?}")),
        );
        assert!(sink.last_error().is_none());
        let networks = || {
            store
                .snapshot()
                .networks
                .gateways
                .iter()
                .map(|g| g.addr.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(networks(), ["1.1.1.1"]);
        sink.apply(
            "test",
            MeshSettings::from_file_text("meshNetworks: {networks: {n: {}}}"),
        );
        assert_eq!(networks(), ["1.1.1.1"], "kept");
        assert!(sink.last_error().unwrap().contains("at least one endpoint"));
        assert!(registry.encode().contains("meshd_mesh_config_errors 1"));
    }
}
