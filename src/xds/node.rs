//! What a proxy says about itself in its first request: node id `type~ip~id~domain` and metadata
//! (reference §5.1), and the identity check against the authenticated caller (§2.5).
use std::collections::BTreeMap;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

use crate::auth::Identity;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyKind {
    Sidecar,
    /// Gateways.
    Router,
    Other(String),
}

/// A connected proxy as meshd sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyInfo {
    pub node_id: String,
    pub kind: ProxyKind,
    pub ips: Vec<IpAddr>,
    /// `<pod>.<namespace>`.
    pub pod_id: String,
    pub dns_domain: String,
    /// Config namespace: metadata `NAMESPACE`, else the first label of the DNS domain.
    pub namespace: String,
    pub service_account: Option<String>,
    pub cluster_id: String,
    pub network: String,
    /// `REQUESTED_NETWORK_VIEW`: the only networks whose endpoints the proxy sees (besides
    /// endpoints without a network); `None` sees every network.
    pub requested_network_view: Option<Vec<String>>,
    pub labels: BTreeMap<String, String>,
    pub generator: Option<String>,
}

impl ProxyInfo {
    /// Proxyless gRPC clients ask for `GENERATOR=grpc` config.
    pub fn is_grpc(&self) -> bool {
        self.generator.as_deref() == Some("grpc")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("missing node information")]
    Missing,
    #[error("missing parts in the service node {0:?}: want type~ip~id~domain")]
    Parts(String),
    #[error("service node {0:?} has no valid IP (node id part 2 or INSTANCE_IPS)")]
    NoIp(String),
}

fn string(v: &Value) -> Option<String> {
    match &v.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn field(md: Option<&Struct>, key: &str) -> Option<String> {
    md.and_then(|m| m.fields.get(key))
        .and_then(string)
        .filter(|s| !s.is_empty())
}

/// A string list in node metadata: Istio's `StringList` is a comma-separated string; a JSON list
/// is accepted too.
fn string_list(md: Option<&Struct>, key: &str) -> Option<Vec<String>> {
    let v = md?.fields.get(key)?;
    let items: Vec<String> = match &v.kind {
        Some(Kind::StringValue(s)) => s.split(',').map(|p| p.trim().to_string()).collect(),
        Some(Kind::ListValue(l)) => l.values.iter().filter_map(string).collect(),
        _ => return None,
    };
    let items: Vec<String> = items.into_iter().filter(|s| !s.is_empty()).collect();
    (!items.is_empty()).then_some(items)
}

/// Parses the node of a first request.
pub fn parse(node: Option<&Node>) -> Result<ProxyInfo, NodeError> {
    let node = node.filter(|n| !n.id.is_empty()).ok_or(NodeError::Missing)?;
    let parts: Vec<&str> = node.id.split('~').collect();
    let [kind, ip, pod_id, domain] = parts.as_slice() else {
        return Err(NodeError::Parts(node.id.clone()));
    };
    let md = node.metadata.as_ref();
    let mut ips: Vec<IpAddr> = field(md, "INSTANCE_IPS")
        .map(|s| s.split(',').filter_map(|i| i.trim().parse().ok()).collect())
        .unwrap_or_default();
    if ips.is_empty()
        && let Ok(ip) = ip.parse()
    {
        ips.push(ip);
    }
    if ips.is_empty() {
        return Err(NodeError::NoIp(node.id.clone()));
    }
    let namespace = field(md, "NAMESPACE").unwrap_or_else(|| domain.split('.').next().unwrap_or_default().to_string());
    let labels = md
        .and_then(|m| m.fields.get("LABELS"))
        .and_then(|v| match &v.kind {
            Some(Kind::StructValue(s)) => Some(
                s.fields
                    .iter()
                    .filter_map(|(k, v)| string(v).map(|s| (k.clone(), s)))
                    .collect::<BTreeMap<_, _>>(),
            ),
            _ => None,
        })
        .unwrap_or_default();
    Ok(ProxyInfo {
        node_id: node.id.clone(),
        kind: match *kind {
            "sidecar" => ProxyKind::Sidecar,
            "router" => ProxyKind::Router,
            other => ProxyKind::Other(other.to_string()),
        },
        ips,
        pod_id: pod_id.to_string(),
        dns_domain: domain.to_string(),
        namespace,
        service_account: field(md, "SERVICE_ACCOUNT"),
        cluster_id: field(md, "CLUSTER_ID").unwrap_or_default(),
        network: field(md, "NETWORK").unwrap_or_default(),
        requested_network_view: string_list(md, "REQUESTED_NETWORK_VIEW"),
        labels,
        generator: field(md, "GENERATOR"),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("authorization failed: identity {identity} does not match the proxy's namespace {namespace:?}{sa}", sa = service_account.as_deref().map(|s| format!(" and service account {s:?}")).unwrap_or_default())]
pub struct AuthorizationError {
    pub identity: String,
    pub namespace: String,
    pub service_account: Option<String>,
}

/// The authenticated identity must be in the proxy's namespace and, when the proxy names one,
/// be its service account (istiod's `PILOT_ENABLE_XDS_IDENTITY_CHECK`; trust domain not compared).
pub fn authorize(identity: &Identity, proxy: &ProxyInfo) -> Result<(), AuthorizationError> {
    let ns_ok = identity.spiffe.namespace == proxy.namespace;
    let sa_ok = proxy
        .service_account
        .as_ref()
        .is_none_or(|sa| *sa == identity.spiffe.service_account);
    if ns_ok && sa_ok {
        Ok(())
    } else {
        Err(AuthorizationError {
            identity: identity.spiffe.uri(),
            namespace: proxy.namespace.clone(),
            service_account: proxy.service_account.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthSource;
    use crate::pki::SpiffeId;

    fn node(id: &str, md: &[(&str, &str)]) -> Node {
        Node {
            id: id.into(),
            metadata: Some(Struct {
                fields: md
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            Value {
                                kind: Some(Kind::StringValue(v.to_string())),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn parses_istio_node_ids() {
        let n = node(
            "router~10.1.2.9~istio-ingressgateway-xyz.istio-system~istio-system.svc.cluster.local",
            &[("CLUSTER_ID", "cluster2"), ("SERVICE_ACCOUNT", "gw")],
        );
        let p = parse(Some(&n)).unwrap();
        assert_eq!(p.kind, ProxyKind::Router);
        assert_eq!(p.namespace, "istio-system");
        assert_eq!(p.cluster_id, "cluster2");
        assert_eq!(p.ips, vec!["10.1.2.9".parse::<IpAddr>().unwrap()]);
        assert!(matches!(
            parse(Some(&node("sidecar~1.2.3.4~x", &[]))),
            Err(NodeError::Parts(_))
        ));
        assert_eq!(parse(None), Err(NodeError::Missing));
        assert!(matches!(
            parse(Some(&node("sidecar~nope~x.y~y.svc", &[]))),
            Err(NodeError::NoIp(_))
        ));
    }

    #[test]
    fn identity_must_match_namespace_and_service_account() {
        let p = parse(Some(&node(
            "router~10.0.0.1~gw.istio-system~istio-system.svc.cluster.local",
            &[("SERVICE_ACCOUNT", "gw")],
        )))
        .unwrap();
        let id = |ns: &str, sa: &str| Identity {
            spiffe: SpiffeId::new("cluster.local", ns, sa),
            source: AuthSource::ClientCertificate,
            cluster_id: None,
            pod_name: None,
            pod_uid: None,
        };
        assert!(authorize(&id("istio-system", "gw"), &p).is_ok());
        assert!(authorize(&id("default", "gw"), &p).is_err());
        assert!(authorize(&id("istio-system", "other"), &p).is_err());
    }
}
