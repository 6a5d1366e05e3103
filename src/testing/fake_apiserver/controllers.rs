//! The one controller the fake runs: kube-controller-manager's token controller, which fills
//! `kubernetes.io/service-account-token` Secrets with a legacy token, the CA and the namespace
//! (what `istioctl create-remote-secret` waits for).
use std::sync::Arc;

use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;

use super::resources::ResourceType;
use super::state::Core;
use super::store::{Change, ObjKey, Write};

pub const SA_TOKEN_TYPE: &str = "kubernetes.io/service-account-token";
const SA_NAME: &str = "kubernetes.io/service-account.name";
const SA_UID: &str = "kubernetes.io/service-account.uid";

fn relevant(c: &Change) -> bool {
    c.resource.group.is_empty() && (c.resource.plural == "secrets" || c.resource.plural == "serviceaccounts")
}

pub fn spawn_token_controller(core: Arc<Core>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut feed = core.store.subscribe();
        let delay = core.config.token_controller_delay;
        tokio::time::sleep(delay).await;
        populate_all(&core);
        loop {
            match feed.recv().await {
                Ok(c) if relevant(&c) => {
                    // "Shortly after": clients must wait for the token, as with the real controller.
                    tokio::time::sleep(delay).await;
                    while feed.try_recv().is_ok() {}
                    populate_all(&core);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => populate_all(&core),
                Err(RecvError::Closed) => return,
            }
        }
    })
}

fn needs_token(s: &Value) -> Option<(String, String, String)> {
    if s.get("type").and_then(Value::as_str) != Some(SA_TOKEN_TYPE) {
        return None;
    }
    if s.pointer("/data/token")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty())
    {
        return None;
    }
    let sa = s
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(SA_NAME))
        .and_then(Value::as_str)?;
    let ns = s.pointer("/metadata/namespace").and_then(Value::as_str)?;
    let name = s.pointer("/metadata/name").and_then(Value::as_str)?;
    Some((ns.to_string(), name.to_string(), sa.to_string()))
}

fn populate_all(core: &Core) {
    let secrets = ResourceType::core("secrets");
    let sas = ResourceType::core("serviceaccounts").group_resource();
    let (_, objects) = core.store.snapshot(&secrets.group_resource());
    for (ns, name, sa) in objects.values().filter_map(|s| needs_token(s)) {
        // Until its ServiceAccount exists the Secret waits, as with the real controller.
        let Some(sa_obj) = core.store.get(&sas, &ObjKey::new(&ns, &sa)) else {
            continue;
        };
        let sa_uid = sa_obj
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let token = match core.signer.mint_legacy(&ns, &sa, &sa_uid, &name) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "fake apiserver: minting a legacy token failed");
                continue;
            }
        };
        let b64 = |s: &str| json!(base64::engine::general_purpose::STANDARD.encode(s));
        let ca = core.ca.pem().to_string();
        let result = core.store.write(&secrets, &ObjKey::new(&ns, &name), |old| {
            let Some(old) = old.filter(|o| needs_token(o).is_some()) else {
                return Ok(Write::Keep);
            };
            let mut s = old.clone();
            if let Some(m) = s.as_object_mut() {
                let data = m.entry("data").or_insert_with(|| json!({}));
                if !data.is_object() {
                    *data = json!({});
                }
                data["token"] = b64(&token);
                data["ca.crt"] = b64(&ca);
                data["namespace"] = b64(&ns);
            }
            if let Some(a) = s.pointer_mut("/metadata/annotations").and_then(Value::as_object_mut) {
                a.insert(SA_UID.into(), json!(sa_uid));
            }
            Ok(Write::Put(s))
        });
        match result {
            Ok(_) => {
                tracing::debug!(namespace = %ns, secret = %name, "fake apiserver: populated service-account token")
            }
            Err(e) => tracing::warn!(error = %e, "fake apiserver: populating a token secret failed"),
        }
    }
}
