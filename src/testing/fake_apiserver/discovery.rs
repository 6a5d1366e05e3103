//! Discovery documents: `/api`, `/apis`, `/api/v1`, `/apis/<g>`, `/apis/<g>/<v>` in the legacy
//! format, and `/api` and `/apis` in aggregated (apidiscovery.k8s.io/v2) format when the
//! client's Accept header asks for it. Groups that only exist in the store (CRD-like objects
//! seeded by tests) are listed too.
use std::collections::BTreeMap;
use std::net::SocketAddr;

use http::Response;
use serde_json::{Value, json};

use super::error::ApiError;
use super::http::{Body, json};
use super::resources::{ResourceInfo, ResourceType, builtin, extra_versions};
use super::state::Core;

const VERBS_STORED: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// Group → version → resources.
type Catalog = BTreeMap<String, BTreeMap<String, Vec<(String, ResourceInfo)>>>;

fn catalog(core: &Core) -> Catalog {
    let mut c: Catalog = BTreeMap::new();
    for (rt, info) in builtin() {
        let mut versions = vec![rt.version.clone()];
        versions.extend(extra_versions(&rt.group).iter().map(|v| v.to_string()));
        versions.sort();
        versions.dedup();
        for v in versions {
            c.entry(rt.group.clone())
                .or_default()
                .entry(v)
                .or_default()
                .push((rt.plural.clone(), info.clone()));
        }
    }
    for gr in core.store.resources() {
        let known = c
            .get(&gr.group)
            .is_some_and(|vs| vs.values().any(|rs| rs.iter().any(|(p, _)| *p == gr.plural)));
        if known {
            continue;
        }
        // Unknown resources are reported under each version their objects carry.
        let objects = core.store.snapshot(&gr).1;
        let mut versions: Vec<String> = objects
            .values()
            .filter_map(|o| o.get("apiVersion").and_then(Value::as_str))
            .map(|av| av.rsplit('/').next().unwrap_or(av).to_string())
            .collect();
        versions.sort();
        versions.dedup();
        let namespaced = objects.keys().any(|k| !k.namespace.is_empty());
        let kind = objects
            .values()
            .find_map(|o| o.get("kind").and_then(Value::as_str).map(str::to_string));
        for v in versions {
            let mut info = ResourceType::new(&gr.group, &v, &gr.plural).info();
            info.namespaced = Some(namespaced);
            if let Some(k) = &kind {
                info.kind = k.clone();
            }
            c.entry(gr.group.clone())
                .or_default()
                .entry(v)
                .or_default()
                .push((gr.plural.clone(), info));
        }
    }
    c
}

fn verbs(group: &str, plural: &str) -> Vec<&'static str> {
    match (group, plural) {
        ("authentication.k8s.io", _) | ("authorization.k8s.io", _) => vec!["create"],
        _ => VERBS_STORED.to_vec(),
    }
}

fn resource_list(group: &str, version: &str, resources: &[(String, ResourceInfo)]) -> Value {
    let mut list = Vec::new();
    for (plural, info) in resources {
        list.push(json!({
            "name": plural,
            "singularName": info.singular,
            "namespaced": info.namespaced.unwrap_or(true),
            "kind": info.kind,
            "verbs": verbs(group, plural),
        }));
        if info.has_status {
            list.push(json!({
                "name": format!("{plural}/status"),
                "singularName": "",
                "namespaced": info.namespaced.unwrap_or(true),
                "kind": info.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if group.is_empty() && plural == "serviceaccounts" {
            list.push(json!({
                "name": "serviceaccounts/token", "singularName": "", "namespaced": true,
                "group": "authentication.k8s.io", "version": "v1", "kind": "TokenRequest", "verbs": ["create"],
            }));
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list })
}

fn preferred(versions: &BTreeMap<String, Vec<(String, ResourceInfo)>>, group: &str) -> String {
    // The table's version for a group is its preferred one; else the lexically greatest.
    builtin()
        .find(|(rt, _)| rt.group == group)
        .map(|(rt, _)| rt.version)
        .or_else(|| versions.keys().next_back().cloned())
        .unwrap_or_default()
}

fn group_doc(group: &str, versions: &BTreeMap<String, Vec<(String, ResourceInfo)>>) -> Value {
    let vs: Vec<Value> = versions
        .keys()
        .map(|v| json!({ "groupVersion": format!("{group}/{v}"), "version": v }))
        .collect();
    let pref = preferred(versions, group);
    json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": vs,
        "preferredVersion": { "groupVersion": format!("{group}/{pref}"), "version": pref },
    })
}

fn aggregated(c: &Catalog, core_group: bool) -> Value {
    let items: Vec<Value> = c
        .iter()
        .filter(|(g, _)| g.is_empty() == core_group)
        .map(|(g, versions)| {
            let pref = preferred(versions, g);
            let mut ordered: Vec<&String> = versions.keys().collect();
            ordered.sort_by_key(|v| *v != &pref);
            let vs: Vec<Value> = ordered
                .into_iter()
                .map(|v| {
                    let resources: Vec<Value> = versions[v]
                        .iter()
                        .map(|(plural, info)| {
                            json!({
                                "resource": plural,
                                "responseKind": { "group": g, "version": v, "kind": info.kind },
                                "scope": if info.namespaced.unwrap_or(true) { "Namespaced" } else { "Cluster" },
                                "singularResource": info.singular,
                                "verbs": verbs(g, plural),
                            })
                        })
                        .collect();
                    json!({ "version": v, "resources": resources, "freshness": "Current" })
                })
                .collect();
            json!({ "metadata": { "name": g }, "versions": vs })
        })
        .collect();
    json!({ "kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items })
}

pub fn serve(
    core: &Core,
    addr: SocketAddr,
    accept: &str,
    group: Option<&str>,
    version: Option<&str>,
    core_path: bool,
) -> Result<Response<Body>, ApiError> {
    let c = catalog(core);
    let wants_aggregated = accept.contains("apidiscovery.k8s.io");
    match (group, version) {
        (None, _) if wants_aggregated => {
            let mut r = json(200, &aggregated(&c, core_path));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"),
            );
            Ok(r)
        }
        (None, _) if core_path => Ok(json(
            200,
            &json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{ "clientCIDR": "0.0.0.0/0", "serverAddress": addr.to_string() }],
            }),
        )),
        (None, _) => {
            let groups: Vec<Value> = c
                .iter()
                .filter(|(g, _)| !g.is_empty())
                .map(|(g, vs)| group_doc(g, vs))
                .collect();
            Ok(json(
                200,
                &json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups }),
            ))
        }
        (Some(g), None) => c
            .get(g)
            .map(|vs| json(200, &group_doc(g, vs)))
            .ok_or_else(ApiError::no_route),
        (Some(g), Some(v)) => c
            .get(g)
            .and_then(|vs| vs.get(v))
            .map(|rs| json(200, &resource_list(g, v, rs)))
            .ok_or_else(ApiError::no_route),
    }
}

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0-meshd-fake", "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean", "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2", "compiler": "gc",
        "platform": "linux/amd64",
    })
}
