//! Service-model types, independent of where they came from.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Kubernetes DNS suffix of service hostnames.
pub const DOMAIN_SUFFIX: &str = "cluster.local";

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `<name>.<namespace>.svc.cluster.local`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.{DOMAIN_SUFFIX}", self.name, self.namespace)
    }
}

/// Port protocol, chosen as Istio does: `appProtocol` first, then the port name prefix
/// (`http-…`, `grpc-…`, `tcp-…`, `tls-…`, `https-…`, `http2-…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Https,
    Tls,
    Tcp,
    Unknown,
}

impl Protocol {
    pub fn from_port(name: &str, app_protocol: Option<&str>) -> Self {
        let parse = |s: &str| match s.to_ascii_lowercase().as_str() {
            "http" => Some(Protocol::Http),
            "http2" | "h2c" | "kubernetes.io/h2c" => Some(Protocol::Http2),
            "grpc" | "grpc-web" => Some(Protocol::Grpc),
            "https" => Some(Protocol::Https),
            "tls" => Some(Protocol::Tls),
            "tcp" | "mongo" | "mysql" | "redis" => Some(Protocol::Tcp),
            _ => None,
        };
        if let Some(p) = app_protocol.and_then(parse) {
            return p;
        }
        let prefix = name.split('-').next().unwrap_or(name);
        parse(prefix).unwrap_or(Protocol::Unknown)
    }

    /// Whether Envoy should treat the port as HTTP (HTTP connection manager, RDS).
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// A service as merged across clusters: the union of the clusters that define it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub key: ServiceKey,
    pub hostname: String,
    pub ports: Vec<ServicePort>,
    pub labels: BTreeMap<String, String>,
    /// Cluster id → cluster IPs of the Service object there.
    pub cluster_ips: BTreeMap<String, Vec<IpAddr>>,
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// One endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: IpAddr,
    /// Name of the service port this endpoint serves (EndpointSlice port name).
    pub service_port_name: String,
    /// Port on the endpoint (the target port).
    pub port: u16,
    pub cluster_id: String,
    pub network: String,
    pub locality: Locality,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    pub pod_name: Option<String>,
    pub ready: bool,
}

impl Endpoint {
    /// Whether the endpoint carries every label of a DestinationRule subset.
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// The service-account identities backing a service, for SAN checks in TLS settings.
pub fn service_accounts(endpoints: &[Endpoint]) -> BTreeSet<String> {
    endpoints.iter().filter_map(|e| e.service_account.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_follows_istio_rules() {
        assert_eq!(Protocol::from_port("http-web", None), Protocol::Http);
        assert_eq!(Protocol::from_port("grpc", None), Protocol::Grpc);
        assert_eq!(Protocol::from_port("web", Some("http")), Protocol::Http);
        assert_eq!(Protocol::from_port("tcp-db", None), Protocol::Tcp);
        assert_eq!(Protocol::from_port("mystery", None), Protocol::Unknown);
        assert!(Protocol::Grpc.is_http() && !Protocol::Tcp.is_http());
    }

    #[test]
    fn hostname() {
        assert_eq!(
            ServiceKey::new("default", "echo").hostname(),
            "echo.default.svc.cluster.local"
        );
    }
}
