//! The resource verbs: get, list (selectors, consistent pagination), create, update, patch,
//! delete and deletecollection, with kube-apiserver's status codes and `Status` errors. Watch
//! lives in `watch`, reviews and TokenRequest in `reviews`.
use std::collections::HashMap;
use std::ops::Bound;

use base64::Engine;
use http::Response;
use serde_json::{Value, json};

use super::admission::default_object;
use super::error::{ApiError, success_status};
use super::http::{Body, json, parse_object};
use super::patch;
use super::path::Target;
use super::resources::ResourceType;
use super::selector::{FieldSelector, LabelSelector};
use super::state::{Core, present};
use super::store::{ObjKey, Objects, Write};

type Query = HashMap<String, String>;

/// Refuses namespaced resources addressed at the cluster scope and vice versa.
pub fn check_scope(t: &Target, verb: &str) -> Result<(), ApiError> {
    match t.rt.info().namespaced {
        Some(true) if t.namespace.is_empty() && (!t.name.is_empty() || verb == "create") => Err(ApiError::no_route()),
        Some(false) if !t.namespace.is_empty() => Err(ApiError::no_route()),
        _ => Ok(()),
    }
}

fn key(t: &Target) -> ObjKey {
    ObjKey::new(&t.namespace, &t.name)
}

fn kind_of(rt: &ResourceType, obj: Option<&Value>) -> String {
    obj.and_then(|o| o.get("kind"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| rt.info().kind)
}

fn rv_of(obj: &Value) -> &str {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

pub fn get(core: &Core, t: &Target) -> Result<Response<Body>, ApiError> {
    let obj = core
        .store
        .get(&t.rt.group_resource(), &key(t))
        .ok_or_else(|| ApiError::not_found(&t.rt, &t.name))?;
    if !t.subresource.is_empty() && t.subresource != "status" {
        return Err(ApiError::no_route());
    }
    Ok(json(200, &present(&t.rt, &obj)))
}

/// Selectors and namespace of a list or watch.
pub struct Filter {
    pub namespace: String,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn from_query(t: &Target, q: &Query) -> Result<Self, ApiError> {
        let mut fields = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or_default(), &t.rt)?;
        if !t.name.is_empty() {
            // A watch on one object is a field selector on its name.
            fields = FieldSelector::parse(&format!("metadata.name={}", t.name), &t.rt)?;
        }
        Ok(Self {
            namespace: t.namespace.clone(),
            labels: LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or_default())?,
            fields,
        })
    }

    pub fn matches(&self, key: &ObjKey, obj: &Value) -> bool {
        (self.namespace.is_empty() || key.namespace == self.namespace)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    v: String,
    rv: u64,
    start: String,
}

fn encode_continue(rv: u64, last: &ObjKey) -> String {
    let tok = ContinueToken {
        v: "meta.k8s.io/v1".into(),
        rv,
        start: format!("{}/{}\u{0}", last.namespace, last.name),
    };
    base64::engine::general_purpose::URL_SAFE.encode(serde_json::to_vec(&tok).unwrap_or_default())
}

fn decode_continue(s: &str) -> Result<(u64, ObjKey), ApiError> {
    let bad = || {
        ApiError::bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        )
    };
    let raw = base64::engine::general_purpose::URL_SAFE.decode(s).map_err(|_| bad())?;
    let tok: ContinueToken = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let start = tok.start.trim_end_matches('\u{0}');
    let (ns, name) = start.split_once('/').ok_or_else(bad)?;
    Ok((tok.rv, ObjKey::new(ns, name)))
}

pub fn list(core: &Core, t: &Target, q: &Query) -> Result<Response<Body>, ApiError> {
    let filter = Filter::from_query(t, q)?;
    let gr = t.rt.group_resource();
    let limit: usize = match q.get("limit").filter(|s| !s.is_empty()) {
        Some(l) => l
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?
            .max(0) as usize,
        None => 0,
    };
    let (rv, objects, after): (u64, Objects, Option<ObjKey>) = match q.get("continue").filter(|s| !s.is_empty()) {
        Some(c) => {
            let (rv, after) = decode_continue(c)?;
            let snap = core
                .store
                .kept_snapshot(&gr, rv)
                .ok_or_else(ApiError::continue_expired)?;
            (rv, snap, Some(after))
        }
        None => {
            let (rv, snap) = core.store.snapshot(&gr);
            (rv, snap, None)
        }
    };
    let range = match &after {
        Some(k) => objects.range((Bound::Excluded(k.clone()), Bound::Unbounded)),
        None => objects.range::<ObjKey, _>(..),
    };
    let mut matching = range.filter(|(k, o)| filter.matches(k, o));
    let mut items = Vec::new();
    let mut last = None;
    for (k, o) in matching.by_ref() {
        items.push(present(&t.rt, o));
        last = Some(k.clone());
        if limit > 0 && items.len() == limit {
            break;
        }
    }
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    if limit > 0 && items.len() == limit {
        let remaining = matching.count();
        if remaining > 0
            && let Some(last) = &last
        {
            core.store.keep_snapshot(&gr, rv, objects.clone());
            meta["continue"] = json!(encode_continue(rv, last));
            if filter.labels.is_empty() && filter.fields.is_empty() {
                meta["remainingItemCount"] = json!(remaining);
            }
        }
    }
    let kind = format!("{}List", kind_of(&t.rt, items.first()));
    Ok(json(
        200,
        &json!({ "kind": kind, "apiVersion": t.rt.api_version(), "metadata": meta, "items": items }),
    ))
}

/// kube-apiserver's name checks: DNS-1035 labels for Services, RFC 1123 labels for
/// Namespaces, RFC 1123 subdomains for most others; RBAC objects only refuse path separators.
fn validate_name(kind: &str, name: &str, rt: &ResourceType) -> Result<(), ApiError> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let (ok, rule) = match (rt.group.as_str(), rt.plural.as_str()) {
        ("rbac.authorization.k8s.io", _) => (
            !name.contains('/') && !name.contains('%') && name != "." && name != "..",
            "may not contain '/' or '%'".to_string(),
        ),
        ("", "services") => (
            label_ok(name) && name.starts_with(|c: char| c.is_ascii_lowercase()),
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')".to_string(),
        ),
        ("", "namespaces") => (
            label_ok(name),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".to_string(),
        ),
        _ => (
            name.len() <= 253 && name.split('.').all(label_ok),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".to_string(),
        ),
    };
    if ok {
        return Ok(());
    }
    Err(ApiError::invalid(
        kind,
        name,
        rt,
        format!("metadata.name: Invalid value: \"{name}\": {rule}"),
    ))
}

/// Checks and fills `obj` (from a create) for the request's resource, name and namespace.
fn prepare_new(core: &Core, t: &Target, obj: &mut Value) -> Result<String, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("the body of the request was not a JSON object"));
    }
    let info = t.rt.info();
    let kind = kind_of(&t.rt, Some(obj));
    let meta = obj
        .as_object_mut()
        .map(|m| m.entry("metadata").or_insert_with(|| json!({})))
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
    let mut name = meta.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
    if name.is_empty() {
        let prefix = meta.get("generateName").and_then(Value::as_str).unwrap_or_default();
        if prefix.is_empty() {
            return Err(ApiError::invalid(
                &kind,
                "",
                &t.rt,
                "metadata.name: Required value: name or generateName is required",
            ));
        }
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let suffix: String = (0..5)
            .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
            .collect();
        name = format!("{prefix}{suffix}");
        meta.insert("name".into(), json!(name));
    }
    if let Some(ns) = meta.get("namespace").and_then(Value::as_str)
        && !ns.is_empty()
        && ns != t.namespace
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    meta.remove("resourceVersion");
    meta.remove("uid");
    meta.remove("creationTimestamp");
    validate_name(&kind, &name, &t.rt)?;
    if !t.namespace.is_empty() && core.config.require_namespaces {
        let ns = ResourceType::core("namespaces");
        if core
            .store
            .get(&ns.group_resource(), &ObjKey::new("", &t.namespace))
            .is_none()
        {
            return Err(ApiError::not_found(&ns, &t.namespace));
        }
    }
    if let Some(m) = obj.as_object_mut() {
        m.insert("apiVersion".into(), json!(t.rt.api_version()));
        m.insert("kind".into(), json!(kind));
        // Status is the controllers' to write (only via /status) on resources that have one.
        if info.has_status {
            m.remove("status");
        }
    }
    default_object(&t.rt, obj, &core.ips);
    Ok(name)
}

fn dry_run(q: &Query) -> bool {
    q.get("dryRun").is_some_and(|v| v == "All")
}

pub fn create(core: &Core, t: &Target, q: &Query, mut obj: Value) -> Result<Response<Body>, ApiError> {
    let name = prepare_new(core, t, &mut obj)?;
    let key = ObjKey::new(&t.namespace, &name);
    if dry_run(q) {
        if core.store.get(&t.rt.group_resource(), &key).is_some() {
            return Err(ApiError::already_exists(&t.rt, &name));
        }
        return Ok(json(201, &obj));
    }
    let w = core.store.write(&t.rt, &key, |old| match old {
        Some(_) => Err(ApiError::already_exists(&t.rt, &name)),
        None => Ok(Write::Put(obj)),
    })?;
    let stored = w.object.ok_or_else(|| ApiError::internal("create stored nothing"))?;
    Ok(json(201, &present(&t.rt, &stored)))
}

/// Builds the object to store from the old one and the client's full new version.
fn merge_update(t: &Target, old: &Value, mut new: Value) -> Result<Value, ApiError> {
    let want_rv = rv_of(&new);
    if !want_rv.is_empty() && want_rv != rv_of(old) {
        return Err(ApiError::conflict(&t.rt, &t.name));
    }
    let info = t.rt.info();
    if t.subresource == "status" {
        // Only .status changes through /status.
        let mut merged = old.clone();
        if let (Some(m), Some(s)) = (merged.as_object_mut(), new.get("status")) {
            m.insert("status".into(), s.clone());
        }
        return Ok(merged);
    }
    if let Some(m) = new.as_object_mut() {
        if info.has_status {
            match old.get("status") {
                Some(s) => m.insert("status".into(), s.clone()),
                None => m.remove("status"),
            };
        }
        m.insert("apiVersion".into(), json!(t.rt.api_version()));
        m.entry("kind").or_insert_with(|| json!(kind_of(&t.rt, Some(old))));
    }
    Ok(new)
}

fn check_body_identity(t: &Target, obj: &Value) -> Result<(), ApiError> {
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !name.is_empty() && name != t.name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({name}) does not match the name on the URL ({})",
            t.name
        )));
    }
    let ns = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !ns.is_empty() && ns != t.namespace {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    Ok(())
}

pub fn update(core: &Core, t: &Target, q: &Query, mut obj: Value) -> Result<Response<Body>, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("the body of the request was not a JSON object"));
    }
    check_body_identity(t, &obj)?;
    default_object(&t.rt, &mut obj, &core.ips);
    // Endpoints are the one common resource kube-apiserver creates on update.
    let create_on_update = t.rt.group.is_empty() && t.rt.plural == "endpoints" && t.subresource.is_empty();
    if create_on_update && core.store.get(&t.rt.group_resource(), &key(t)).is_none() {
        return create(core, t, q, obj);
    }
    let dry = dry_run(q);
    let w = core.store.write(&t.rt, &key(t), |old| {
        let old = old.ok_or_else(|| ApiError::not_found(&t.rt, &t.name))?;
        let new = merge_update(t, old, obj)?;
        Ok(if dry { Write::Keep } else { Write::Put(new) })
    })?;
    let stored = w.object.ok_or_else(|| ApiError::not_found(&t.rt, &t.name))?;
    Ok(json(200, &present(&t.rt, &stored)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PatchType {
    Merge,
    Json,
    Apply,
}

pub fn patch(core: &Core, t: &Target, q: &Query, content_type: &str, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let ct = content_type.split(';').next().unwrap_or_default().trim();
    let kind = match ct {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => PatchType::Merge,
        "application/json-patch+json" => PatchType::Json,
        "application/apply-patch+yaml" | "application/apply-patch+cbor" => PatchType::Apply,
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    let doc = parse_object(body)?;
    if kind == PatchType::Apply {
        if q.get("fieldManager").is_none_or(|m| m.is_empty()) {
            return Err(ApiError::invalid(
                "PatchOptions.meta.k8s.io",
                "",
                &t.rt,
                "fieldManager: Required value: is required for apply patch",
            ));
        }
        if core.store.get(&t.rt.group_resource(), &key(t)).is_none() && t.subresource.is_empty() {
            check_body_identity(t, &doc)?;
            let mut obj = doc;
            if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert("name".into(), json!(t.name));
            }
            return create(core, t, q, obj);
        }
    }
    if kind == PatchType::Json && !doc.is_array() {
        return Err(ApiError::bad_request("the JSON patch is not a list of operations"));
    }
    let dry = dry_run(q);
    let w = core.store.write(&t.rt, &key(t), |old| {
        let old = old.ok_or_else(|| ApiError::not_found(&t.rt, &t.name))?;
        let mut patched = old.clone();
        match kind {
            PatchType::Merge | PatchType::Apply => patch::merge(&mut patched, &doc),
            PatchType::Json => patch::json_patch(&mut patched, &doc).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the server rejected our request due to an error in our request: {e}"),
                )
            })?,
        }
        // A resourceVersion in the patch is a precondition, as in kube-apiserver.
        let want = rv_of(&patched);
        if want != rv_of(old) {
            return Err(ApiError::conflict(&t.rt, &t.name));
        }
        if let Some(meta) = patched.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("name".into(), json!(t.name));
            for field in ["uid", "creationTimestamp"] {
                match old.pointer(&format!("/metadata/{field}")) {
                    Some(v) => meta.insert(field.into(), v.clone()),
                    None => meta.remove(field),
                };
            }
        }
        default_object(&t.rt, &mut patched, &core.ips);
        let new = merge_update(t, old, patched)?;
        Ok(if dry { Write::Keep } else { Write::Put(new) })
    })?;
    let stored = w.object.ok_or_else(|| ApiError::not_found(&t.rt, &t.name))?;
    Ok(json(200, &present(&t.rt, &stored)))
}

pub fn delete(core: &Core, t: &Target, q: &Query, options: Option<Value>) -> Result<Response<Body>, ApiError> {
    let pre_uid = options
        .as_ref()
        .and_then(|o| o.pointer("/preconditions/uid"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let pre_rv = options
        .as_ref()
        .and_then(|o| o.pointer("/preconditions/resourceVersion"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let dry = dry_run(q);
    let w = core.store.write(&t.rt, &key(t), |old| {
        let old = old.ok_or_else(|| ApiError::not_found(&t.rt, &t.name))?;
        let uid = old.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default();
        if let Some(want) = &pre_uid
            && want != uid
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!("Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"),
            ));
        }
        if let Some(want) = &pre_rv
            && want != rv_of(old)
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Precondition failed: ResourceVersion in precondition: {want}, ResourceVersion in object meta: {}",
                    rv_of(old)
                ),
            ));
        }
        Ok(if dry { Write::Keep } else { Write::Delete })
    })?;
    let gone = w.object.ok_or_else(|| ApiError::not_found(&t.rt, &t.name))?;
    // Services answer with the deleted object; most resources with a Success Status.
    if t.rt.group.is_empty() && t.rt.plural == "services" {
        return Ok(json(200, &present(&t.rt, &gone)));
    }
    let uid = gone
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    Ok(json(200, &success_status(&t.rt, &t.name, uid)))
}

pub fn delete_collection(core: &Core, t: &Target, q: &Query) -> Result<Response<Body>, ApiError> {
    let filter = Filter::from_query(t, q)?;
    let (rv, objects) = core.store.snapshot(&t.rt.group_resource());
    let mut items = Vec::new();
    for (k, _) in objects.iter().filter(|(k, o)| filter.matches(k, o)) {
        let w = core.store.write(&t.rt, k, |old| {
            Ok(if old.is_some() { Write::Delete } else { Write::Keep })
        });
        if let Ok(w) = w
            && w.change.is_some()
            && let Some(o) = w.object
        {
            items.push(present(&t.rt, &o));
        }
    }
    let kind = format!("{}List", kind_of(&t.rt, items.first()));
    Ok(json(
        200,
        &json!({ "kind": kind, "apiVersion": t.rt.api_version(), "metadata": {"resourceVersion": rv.max(core.store.current_rv()).to_string()}, "items": items }),
    ))
}
