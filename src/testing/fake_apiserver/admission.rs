//! The defaulting kube-apiserver applies to objects on every write path (REST and the direct
//! store API alike): Secret `stringData` folded into `data`, Service types and cluster IPs,
//! Namespace phase and name label.
use std::sync::atomic::{AtomicU32, Ordering};

use base64::Engine;
use serde_json::{Value, json};

use super::resources::ResourceType;

/// Hands out Service cluster IPs from 10.96.0.0/12, like the default service CIDR.
#[derive(Default)]
pub struct IpAllocator(AtomicU32);

impl IpAllocator {
    fn next(&self) -> String {
        // Skips .0.0 and .0.1 (the network and the `kubernetes` Service).
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 2;
        format!("10.96.{}.{}", (n >> 8) & 0xff, n & 0xff)
    }
}

/// Applies defaults to `obj`, an object of `rt` about to be stored.
pub fn default_object(rt: &ResourceType, obj: &mut Value, ips: &IpAllocator) {
    if !rt.group.is_empty() {
        return;
    }
    match rt.plural.as_str() {
        "secrets" => fold_string_data(obj),
        "services" => default_service(obj, ips),
        "namespaces" => default_namespace(obj),
        _ => {}
    }
}

fn fold_string_data(obj: &mut Value) {
    let Some(map) = obj.as_object_mut() else { return };
    if !map.contains_key("type") {
        map.insert("type".into(), json!("Opaque"));
    }
    let Some(Value::Object(string_data)) = map.remove("stringData") else {
        return;
    };
    let data = map.entry("data").or_insert_with(|| json!({}));
    if !data.is_object() {
        *data = json!({});
    }
    if let Some(d) = data.as_object_mut() {
        for (k, v) in string_data {
            let s = v.as_str().unwrap_or_default();
            d.insert(k, json!(base64::engine::general_purpose::STANDARD.encode(s)));
        }
    }
}

fn default_service(obj: &mut Value, ips: &IpAllocator) {
    let Some(spec) = obj
        .as_object_mut()
        .map(|m| m.entry("spec").or_insert_with(|| json!({})))
    else {
        return;
    };
    let Some(spec) = spec.as_object_mut() else { return };
    let ty = spec
        .entry("type")
        .or_insert_with(|| json!("ClusterIP"))
        .as_str()
        .unwrap_or_default()
        .to_string();
    if ty != "ExternalName"
        && spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .is_empty()
    {
        let ip = ips.next();
        spec.insert("clusterIP".into(), json!(ip));
        spec.insert("clusterIPs".into(), json!([ip]));
    }
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            if let Some(p) = p.as_object_mut() {
                p.entry("protocol").or_insert_with(|| json!("TCP"));
                if !p.contains_key("targetPort")
                    && let Some(port) = p.get("port").cloned()
                {
                    p.insert("targetPort".into(), port);
                }
            }
        }
    }
}

fn default_namespace(obj: &mut Value) {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        let labels = meta.entry("labels").or_insert_with(|| json!({}));
        if let Some(l) = labels.as_object_mut() {
            l.insert("kubernetes.io/metadata.name".into(), json!(name));
        }
    }
    if let Some(m) = obj.as_object_mut() {
        m.entry("spec").or_insert_with(|| json!({"finalizers": ["kubernetes"]}));
        let status = m.entry("status").or_insert_with(|| json!({}));
        if let Some(s) = status.as_object_mut() {
            s.entry("phase").or_insert_with(|| json!("Active"));
        }
    }
}
