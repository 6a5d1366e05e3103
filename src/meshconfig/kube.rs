//! The `istio` ConfigMap in the primary's system namespace, watched; deleting it clears the
//! mesh settings (istiod falls back to its defaults).
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};

use super::{CONFIGMAP, MeshConfigSink, MeshSettings};

/// Watches `<namespace>/istio` for as long as the task runs.
pub fn spawn(client: kube::Client, namespace: &str, sink: Arc<MeshConfigSink>) -> tokio::task::JoinHandle<()> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let origin = format!("ConfigMap {namespace}/{CONFIGMAP}");
    let cfg = watcher::Config::default().fields(&format!("metadata.name={CONFIGMAP}"));
    tokio::spawn(async move {
        let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
        // A relist delivers the current object (or none) between Init and InitDone.
        let mut seen_in_relist = false;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Init) => seen_in_relist = false,
                Ok(Event::InitApply(cm) | Event::Apply(cm)) => {
                    seen_in_relist = true;
                    let data = cm.data.unwrap_or_default();
                    sink.apply(&origin, MeshSettings::from_data(&data));
                }
                Ok(Event::InitDone) => {
                    if !seen_in_relist {
                        sink.apply(&origin, Ok(MeshSettings::default()));
                    }
                }
                Ok(Event::Delete(_)) => sink.apply(&origin, Ok(MeshSettings::default())),
                Err(e) => tracing::warn!(source = %origin, error = %e, "watching the mesh config ConfigMap; retrying"),
            }
        }
    })
}
