//! `/debug/config_dump?proxyID=`: what meshd would send a connected proxy now, type by type,
//! built by the same generators its stream uses. Secrets are never dumped.
use super::interned::NameSet;

use prost::Message;
use serde::Serialize;

use super::generators;
use super::node::ProxyInfo;
use super::push::PushContext;
use super::types;

#[derive(Debug, Serialize)]
pub struct ConfigDump {
    pub proxy_id: String,
    pub node_id: String,
    pub cluster_id: String,
    pub namespace: String,
    pub push_version: String,
    /// Type short name (`cds`, `eds`, `lds`, `rds`) → resources.
    pub types: std::collections::BTreeMap<&'static str, Vec<DumpedResource>>,
}

#[derive(Debug, Serialize)]
pub struct DumpedResource {
    pub name: String,
    pub version: String,
    pub bytes: usize,
    /// The decoded resource in protobuf debug notation, with `?detail=true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The dump for one proxy. `detail` adds each resource's decoded content.
pub fn dump(push: &PushContext, proxy: &ProxyInfo, detail: bool) -> ConfigDump {
    let mut out = ConfigDump {
        proxy_id: proxy.pod_id.clone(),
        node_id: proxy.node_id.clone(),
        cluster_id: proxy.cluster_id.clone(),
        namespace: proxy.namespace.clone(),
        push_version: push.version.to_string(),
        types: Default::default(),
    };
    let none = NameSet::new();
    let clusters = generators::generate_named(push, proxy, types::CLUSTER, &none);
    let listeners = generators::generate_named(push, proxy, types::LISTENER, &none);
    // EDS and RDS are asked for by name: dump what the clusters and listeners refer to.
    let eds_names = NameSet::from_requested(clusters.keys());
    let endpoints = generators::generate_named(push, proxy, types::ENDPOINT, &eds_names);
    let routes = generators::generate_named(push, proxy, types::ROUTE, &none);
    for (t, set, filter) in [
        (types::CLUSTER, &clusters, None),
        (types::ENDPOINT, &endpoints, Some(&eds_names)),
        (types::LISTENER, &listeners, None),
        (types::ROUTE, &routes, None),
    ] {
        let entries = set
            .values()
            .filter(|r| filter.is_none_or(|f| f.contains(&r.name)))
            .map(|r| DumpedResource {
                name: r.name.to_string(),
                version: r.version.clone(),
                bytes: r.any.len(),
                detail: detail.then(|| decode(t, &r.any)),
            })
            .collect();
        out.types.insert(types::short(t), entries);
    }
    out
}

fn decode(type_url: &str, any: &[u8]) -> String {
    use envoy_types::pb::envoy::config::{cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment};
    use envoy_types::pb::envoy::config::{listener::v3::Listener, route::v3::RouteConfiguration};
    let Ok(any) = envoy_types::pb::google::protobuf::Any::decode(any) else {
        return "<undecodable Any>".into();
    };
    let v = any.value.as_slice();
    let text = match type_url {
        types::CLUSTER => Cluster::decode(v).map(|m| format!("{m:?}")),
        types::ENDPOINT => ClusterLoadAssignment::decode(v).map(|m| format!("{m:?}")),
        types::LISTENER => Listener::decode(v).map(|m| format!("{m:?}")),
        types::ROUTE => RouteConfiguration::decode(v).map(|m| format!("{m:?}")),
        _ => return String::new(),
    };
    text.unwrap_or_else(|e| format!("<undecodable: {e}>"))
}
