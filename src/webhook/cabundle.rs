//! Webhook caBundle patching (reference §4.4): the API server calls 15017 over TLS and must
//! trust meshd's serving certificate, so `webhooks[*].clientConfig.caBundle` of
//! MutatingWebhookConfiguration `istio-sidecar-injector` (`INJECTION_WEBHOOK_CONFIG_NAME`) and
//! ValidatingWebhookConfiguration `istio-validator-istio-system`
//! (`VALIDATION_WEBHOOK_CONFIG_NAME`) is kept equal to the base64 of the mesh root bundle.
//!
//! It runs as a [`LeaderJob`] of the root-cert leader (`crate::rootcert`): in the primary, and in
//! each remote cluster whose system namespace names this cluster in
//! `topology.istio.io/controlPlaneClusters`, by the replica holding that cluster's Lease. The job
//! watches the two configurations by name and patches on acquiring leadership, on every change
//! of a configuration (created, edited) and on every root change. A missing configuration is
//! nothing to patch. Writes are get-modify-replace of the object as served (unknown fields kept),
//! guarded by its resourceVersion; the `update` verb is all Istio's remote RBAC grants on
//! validating webhook configurations.
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhookConfiguration, ValidatingWebhookConfiguration};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use serde_json::Value;
use tokio::time::Instant;

use crate::admin::Registry;
use crate::admin::metrics::CounterVec;
use crate::ca::CaStore;
use crate::config::ServeArgs;
use crate::rootcert::{FIELD_MANAGER, LeaderJob};

/// Bound on one API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Which webhook configuration kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    Mutating,
    Validating,
}

impl ConfigKind {
    fn api_resource(self) -> ApiResource {
        match self {
            ConfigKind::Mutating => ApiResource::erase::<MutatingWebhookConfiguration>(&()),
            ConfigKind::Validating => ApiResource::erase::<ValidatingWebhookConfiguration>(&()),
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            ConfigKind::Mutating => "MutatingWebhookConfiguration",
            ConfigKind::Validating => "ValidatingWebhookConfiguration",
        }
    }
}

/// One webhook configuration to keep patched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: ConfigKind,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("{kind} {name} changed meanwhile")]
    Conflict { kind: &'static str, name: String },
    #[error("updating {kind} {name}: {source}")]
    Api {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("updating {kind} {name}: no answer within {CALL_TIMEOUT:?}")]
    Timeout { kind: &'static str, name: String },
}

#[derive(Clone)]
struct Metrics {
    patches: CounterVec,
    errors: CounterVec,
}

/// The caBundle patcher (one instance, run in every led cluster).
pub struct CaBundlePatcher {
    ca: Arc<CaStore>,
    targets: Vec<Target>,
    metrics: Metrics,
}

impl std::fmt::Debug for CaBundlePatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaBundlePatcher")
            .field("targets", &self.targets)
            .finish()
    }
}

impl CaBundlePatcher {
    pub fn new(ca: Arc<CaStore>, targets: Vec<Target>, registry: &Registry) -> Arc<Self> {
        Arc::new(Self {
            ca,
            targets,
            metrics: Metrics {
                patches: registry.counter_vec(
                    "meshd_webhook_cabundle_patches",
                    "Webhook configurations whose caBundle meshd set to the mesh roots, by cluster",
                    &["cluster"],
                ),
                errors: registry.counter_vec(
                    "meshd_webhook_cabundle_patch_errors",
                    "Failed webhook caBundle updates, by cluster",
                    &["cluster"],
                ),
            },
        })
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }
}

/// The leader jobs the webhook module contributes: the caBundle patcher, unless both
/// configuration names are empty.
pub fn leader_jobs(args: &ServeArgs, ca: Arc<CaStore>, registry: &Registry) -> Vec<Arc<dyn LeaderJob>> {
    let targets: Vec<Target> = [
        (ConfigKind::Mutating, &args.injection_webhook_config_name),
        (ConfigKind::Validating, &args.validation_webhook_config_name),
    ]
    .into_iter()
    .filter(|(_, n)| !n.trim().is_empty())
    .map(|(kind, name)| Target {
        kind,
        name: name.trim().to_string(),
    })
    .collect();
    if targets.is_empty() {
        return Vec::new();
    }
    vec![CaBundlePatcher::new(ca, targets, registry) as Arc<dyn LeaderJob>]
}

/// `caBundle` as the API carries it: base64 of the PEM roots.
pub fn ca_bundle(root_pem: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(root_pem.as_bytes())
}

/// Whether any webhook of the configuration lacks `bundle`.
pub fn needs_patch(obj: &DynamicObject, bundle: &str) -> bool {
    obj.data.get("webhooks").and_then(Value::as_array).is_some_and(|ws| {
        ws.iter()
            .any(|w| w.pointer("/clientConfig/caBundle").and_then(Value::as_str) != Some(bundle))
    })
}

/// The configuration with `bundle` in every webhook; everything else as it was.
pub fn with_bundle(obj: &DynamicObject, bundle: &str) -> DynamicObject {
    let mut out = obj.clone();
    out.metadata.managed_fields = None;
    if let Some(ws) = out.data.get_mut("webhooks").and_then(Value::as_array_mut) {
        for w in ws.iter_mut().filter(|w| w.is_object()) {
            if !w.get("clientConfig").is_some_and(Value::is_object) {
                w["clientConfig"] = Value::Object(Default::default());
            }
            w["clientConfig"]["caBundle"] = Value::String(bundle.to_string());
        }
    }
    out
}

impl LeaderJob for CaBundlePatcher {
    fn lead(&self, client: kube::Client, cluster: String) -> BoxFuture<'static, ()> {
        let tasks: Vec<_> = self
            .targets
            .iter()
            .map(|t| {
                keep_patched(KeepPatched {
                    client: client.clone(),
                    cluster: cluster.clone(),
                    target: t.clone(),
                    ca: Arc::clone(&self.ca),
                    metrics: self.metrics.clone(),
                })
            })
            .collect();
        Box::pin(async move {
            futures::future::join_all(tasks).await;
        })
    }
}

struct KeepPatched {
    client: kube::Client,
    cluster: String,
    target: Target,
    ca: Arc<CaStore>,
    metrics: Metrics,
}

/// Keeps one configuration patched in one cluster, for as long as it is polled.
async fn keep_patched(k: KeepPatched) {
    let KeepPatched {
        client,
        cluster,
        target,
        ca,
        metrics,
    } = k;
    let (kind, name) = (target.kind.kind(), target.name.as_str());
    let api: Api<DynamicObject> = Api::all_with(client, &target.kind.api_resource());
    let mut stream = watcher::watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff()
    .boxed();
    let mut roots = ca.subscribe();
    roots.mark_unchanged();
    let patches = metrics.patches.with(&[&cluster]);
    let errors = metrics.errors.with(&[&cluster]);
    let mut current: Option<DynamicObject> = None;
    let mut relist: Option<DynamicObject> = None;
    let mut due: Option<Instant> = None;
    let mut retry = Duration::from_millis(500);
    loop {
        let at = due.unwrap_or_else(Instant::now);
        tokio::select! {
            ev = stream.next() => match ev {
                Some(Ok(Event::Init)) => relist = None,
                Some(Ok(Event::InitApply(o))) => relist = Some(o),
                Some(Ok(Event::InitDone)) => {
                    current = relist.take();
                    if current.is_none() {
                        tracing::debug!(cluster = %cluster, kind, name, "webhook configuration not found; nothing to patch");
                    }
                    due = Some(Instant::now());
                }
                Some(Ok(Event::Apply(o))) => {
                    current = Some(o);
                    due = Some(Instant::now());
                }
                Some(Ok(Event::Delete(_))) => {
                    tracing::debug!(cluster = %cluster, kind, name, "webhook configuration deleted; nothing to patch");
                    current = None;
                }
                Some(Err(e)) => tracing::warn!(cluster = %cluster, kind, name, error = %e, "watching the webhook configuration"),
                None => return,
            },
            changed = roots.changed() => {
                if changed.is_err() {
                    return;
                }
                due = Some(Instant::now());
            }
            _ = tokio::time::sleep_until(at), if due.is_some() => {
                due = None;
                let Some(obj) = &current else { continue };
                let bundle = ca_bundle(&ca.load().root_bundle_pem);
                if !needs_patch(obj, &bundle) {
                    continue;
                }
                match patch(&api, kind, name, obj, &bundle).await {
                    Ok(updated) => {
                        patches.inc();
                        retry = Duration::from_millis(500);
                        tracing::info!(cluster = %cluster, kind, name, "patched the webhook caBundle to the mesh roots");
                        current = Some(updated);
                    }
                    Err(e) => {
                        if !matches!(e, PatchError::Conflict { .. }) {
                            errors.inc();
                            tracing::warn!(cluster = %cluster, error = %e, "patching the webhook caBundle failed; retrying");
                        } else {
                            tracing::debug!(cluster = %cluster, error = %e, "retrying the caBundle patch");
                        }
                        due = Some(Instant::now() + retry);
                        retry = (retry * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
    }
}

/// Replaces the configuration with `bundle` set; on a conflict re-reads it once and tries again.
async fn patch(
    api: &Api<DynamicObject>,
    kind: &'static str,
    name: &str,
    obj: &DynamicObject,
    bundle: &str,
) -> Result<DynamicObject, PatchError> {
    let pp = PostParams {
        dry_run: false,
        field_manager: Some(FIELD_MANAGER.into()),
    };
    let api_err = |source| PatchError::Api {
        kind,
        name: name.to_string(),
        source,
    };
    let call = async {
        match api.replace(name, &pp, &with_bundle(obj, bundle)).await {
            Ok(o) => Ok(o),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let fresh = api.get(name).await.map_err(api_err)?;
                match api.replace(name, &pp, &with_bundle(&fresh, bundle)).await {
                    Ok(o) => Ok(o),
                    Err(kube::Error::Api(s)) if s.code == 409 => Err(PatchError::Conflict {
                        kind,
                        name: name.to_string(),
                    }),
                    Err(e) => Err(api_err(e)),
                }
            }
            Err(e) => Err(api_err(e)),
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, call).await.unwrap_or_else(|_| {
        Err(PatchError::Timeout {
            kind,
            name: name.to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(webhooks: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "istio-sidecar-injector", "resourceVersion": "7", "managedFields": [{"manager": "x"}]},
            "webhooks": webhooks,
        }))
        .unwrap()
    }

    #[test]
    fn patches_every_webhook_and_keeps_the_rest() {
        let bundle = ca_bundle("-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n");
        let obj = config(json!([
            {"name": "a.sidecar-injector.istio.io", "clientConfig": {"service": {"name": "istiod", "path": "/inject"}},
             "futureField": 1},
            {"name": "b.sidecar-injector.istio.io", "clientConfig": {"caBundle": "b2xk"}},
            {"name": "c.sidecar-injector.istio.io"},
        ]));
        assert!(needs_patch(&obj, &bundle));
        let out = with_bundle(&obj, &bundle);
        assert!(!needs_patch(&out, &bundle));
        let ws = out.data["webhooks"].as_array().unwrap();
        assert!(ws.iter().all(|w| w["clientConfig"]["caBundle"] == bundle.as_str()));
        assert_eq!(ws[0]["clientConfig"]["service"]["path"], "/inject");
        assert_eq!(ws[0]["futureField"], 1);
        assert_eq!(out.metadata.resource_version.as_deref(), Some("7"));
        assert!(out.metadata.managed_fields.is_none());
        // No webhooks: nothing to do.
        assert!(!needs_patch(&config(json!([])), &bundle));
    }
}
