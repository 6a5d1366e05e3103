//! Istio networking config (`networking.istio.io/v1` Gateway, VirtualService, DestinationRule):
//! the fields meshd acts on, deserialized from the Kubernetes objects' `spec`. Unknown fields are
//! ignored, as an older istiod ignores newer fields.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const GROUP: &str = "networking.istio.io";

/// Name and namespace of a config object.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConfigMeta {
    pub name: String,
    pub namespace: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config<T> {
    pub meta: ConfigMeta,
    pub spec: T,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewaySpec {
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<GatewayServer>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewayServer {
    pub port: GatewayPort,
    pub hosts: Vec<String>,
    pub tls: Option<ServerTls>,
    pub name: Option<String>,
    /// Address the listener binds instead of 0.0.0.0.
    pub bind: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewayPort {
    pub number: u32,
    pub name: String,
    pub protocol: String,
    pub target_port: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ServerTls {
    pub mode: Option<String>,
    pub credential_name: Option<String>,
    pub https_redirect: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VirtualServiceSpec {
    pub hosts: Vec<String>,
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    pub tls: Vec<TlsRoute>,
    pub tcp: Vec<TcpRoute>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Vec<HttpMatchRequest>,
    pub route: Vec<RouteDestination>,
    pub timeout: Option<String>,
    pub retries: Option<HttpRetry>,
    pub rewrite: Option<HttpRewrite>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub headers: BTreeMap<String, StringMatch>,
    pub port: Option<u32>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRetry {
    pub attempts: u32,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsRoute {
    #[serde(rename = "match")]
    pub matches: Vec<TlsMatch>,
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsMatch {
    pub sni_hosts: Vec<String>,
    pub port: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpRoute {
    #[serde(rename = "match")]
    pub matches: Vec<TcpMatch>,
    pub route: Vec<RouteDestination>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpMatch {
    pub port: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficPolicy {
    pub tls: Option<ClientTls>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientTls {
    pub mode: Option<String>,
    pub sni: Option<String>,
    pub credential_name: Option<String>,
    pub subject_alt_names: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

/// All Istio networking config of the config cluster (the primary, or the file source).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IstioConfig {
    pub gateways: Vec<Config<GatewaySpec>>,
    pub virtual_services: Vec<Config<VirtualServiceSpec>>,
    pub destination_rules: Vec<Config<DestinationRuleSpec>>,
}

impl IstioConfig {
    /// Sorts every list by namespace/name so generated config is deterministic.
    pub fn normalize(&mut self) {
        self.gateways.sort_by(|a, b| a.meta.cmp(&b.meta));
        self.virtual_services.sort_by(|a, b| a.meta.cmp(&b.meta));
        self.destination_rules.sort_by(|a, b| a.meta.cmp(&b.meta));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_service_spec_parses_istio_yaml() {
        let yaml = r#"
hosts: ["echo.example.com"]
gateways: ["istio-system/ingress"]
http:
- match:
  - uri: {prefix: /v2}
    headers: {x-canary: {exact: "yes"}}
  route:
  - destination: {host: echo.default.svc.cluster.local, subset: v2, port: {number: 8080}}
    weight: 90
  - destination: {host: echo.default.svc.cluster.local, subset: v1}
    weight: 10
  timeout: 5s
  retries: {attempts: 3, perTryTimeout: 1s, retryOn: 5xx}
  unknownField: ignored
"#;
        let vs: VirtualServiceSpec = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(
            vs.http[0].matches[0].uri.as_ref().unwrap().prefix.as_deref(),
            Some("/v2")
        );
        assert_eq!(vs.http[0].route[0].weight, Some(90));
        assert_eq!(
            vs.http[0].retries.as_ref().unwrap().per_try_timeout.as_deref(),
            Some("1s")
        );
        assert_eq!(vs.http[0].route[0].destination.port.as_ref().unwrap().number, 8080);
    }
}
