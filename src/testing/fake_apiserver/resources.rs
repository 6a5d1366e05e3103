//! Which resources the fake serves and how: kind, scope and whether writes to the main
//! resource leave `.status` alone. Built-in types come from a table; anything else under
//! `/apis/<group>/<version>/...` is served generically, as a CRD would be.
use serde::{Deserialize, Serialize};

/// A group/version/resource triple (`""`, `"v1"`, `"secrets"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
}

impl ResourceType {
    pub fn new(group: &str, version: &str, plural: &str) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
        }
    }

    /// A core (`/api/v1`) resource.
    pub fn core(plural: &str) -> Self {
        Self::new("", "v1", plural)
    }

    /// The resource of a k8s-openapi type.
    pub fn of<K: k8s_openapi::Resource>() -> Self {
        Self::new(K::GROUP, K::VERSION, K::URL_PATH_SEGMENT)
    }

    /// `apiVersion` as written in objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `secrets` or `leases.coordination.k8s.io`, as kube-apiserver names resources in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The storage key: versions of one group share their objects, as in kube-apiserver.
    pub fn group_resource(&self) -> GroupResource {
        GroupResource {
            group: self.group.clone(),
            plural: self.plural.clone(),
        }
    }

    pub fn info(&self) -> ResourceInfo {
        lookup(&self.group, &self.plural).unwrap_or_else(|| ResourceInfo {
            kind: guess_kind(&self.plural),
            namespaced: None,
            has_status: false,
            singular: guess_singular(&self.plural),
            known: false,
        })
    }
}

/// The storage key of a resource: group and plural, without version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupResource {
    pub group: String,
    pub plural: String,
}

/// What the server knows about a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceInfo {
    pub kind: String,
    /// `None` for resources the table does not know: their scope follows the request path.
    pub namespaced: Option<bool>,
    /// Writes to the main resource keep `.status`; only `/status` changes it.
    pub has_status: bool,
    pub singular: String,
    pub known: bool,
}

/// Flags per table row.
const NS: u8 = 1;
const STATUS: u8 = 2;

/// (group, version, plural, kind, flags). The first version listed for a group is its preferred one.
const TABLE: &[(&str, &str, &str, &str, u8)] = &[
    ("", "v1", "namespaces", "Namespace", STATUS),
    ("", "v1", "nodes", "Node", STATUS),
    ("", "v1", "persistentvolumes", "PersistentVolume", STATUS),
    ("", "v1", "secrets", "Secret", NS),
    ("", "v1", "configmaps", "ConfigMap", NS),
    ("", "v1", "services", "Service", NS | STATUS),
    ("", "v1", "pods", "Pod", NS | STATUS),
    ("", "v1", "serviceaccounts", "ServiceAccount", NS),
    ("", "v1", "endpoints", "Endpoints", NS),
    ("", "v1", "events", "Event", NS),
    ("", "v1", "limitranges", "LimitRange", NS),
    ("", "v1", "resourcequotas", "ResourceQuota", NS | STATUS),
    ("", "v1", "replicationcontrollers", "ReplicationController", NS | STATUS),
    ("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", NS | STATUS),
    ("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", NS),
    ("coordination.k8s.io", "v1", "leases", "Lease", NS),
    (
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        0,
    ),
    (
        "admissionregistration.k8s.io",
        "v1",
        "validatingwebhookconfigurations",
        "ValidatingWebhookConfiguration",
        0,
    ),
    ("apps", "v1", "deployments", "Deployment", NS | STATUS),
    ("apps", "v1", "replicasets", "ReplicaSet", NS | STATUS),
    ("apps", "v1", "statefulsets", "StatefulSet", NS | STATUS),
    ("apps", "v1", "daemonsets", "DaemonSet", NS | STATUS),
    ("rbac.authorization.k8s.io", "v1", "roles", "Role", NS),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", NS),
    ("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", 0),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        0,
    ),
    (
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        STATUS,
    ),
    ("networking.k8s.io", "v1", "ingresses", "Ingress", NS | STATUS),
    ("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", NS),
    ("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", 0),
    (
        "authorization.k8s.io",
        "v1",
        "subjectaccessreviews",
        "SubjectAccessReview",
        0,
    ),
    (
        "authorization.k8s.io",
        "v1",
        "selfsubjectaccessreviews",
        "SelfSubjectAccessReview",
        0,
    ),
    ("networking.istio.io", "v1", "gateways", "Gateway", NS | STATUS),
    (
        "networking.istio.io",
        "v1",
        "virtualservices",
        "VirtualService",
        NS | STATUS,
    ),
    (
        "networking.istio.io",
        "v1",
        "destinationrules",
        "DestinationRule",
        NS | STATUS,
    ),
    (
        "networking.istio.io",
        "v1",
        "serviceentries",
        "ServiceEntry",
        NS | STATUS,
    ),
    ("networking.istio.io", "v1", "sidecars", "Sidecar", NS | STATUS),
    (
        "networking.istio.io",
        "v1",
        "workloadentries",
        "WorkloadEntry",
        NS | STATUS,
    ),
    (
        "networking.istio.io",
        "v1",
        "workloadgroups",
        "WorkloadGroup",
        NS | STATUS,
    ),
    (
        "networking.istio.io",
        "v1alpha3",
        "envoyfilters",
        "EnvoyFilter",
        NS | STATUS,
    ),
    (
        "security.istio.io",
        "v1",
        "peerauthentications",
        "PeerAuthentication",
        NS | STATUS,
    ),
    (
        "security.istio.io",
        "v1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        NS | STATUS,
    ),
    (
        "security.istio.io",
        "v1",
        "requestauthentications",
        "RequestAuthentication",
        NS | STATUS,
    ),
    ("telemetry.istio.io", "v1", "telemetries", "Telemetry", NS | STATUS),
    (
        "gateway.networking.k8s.io",
        "v1",
        "gatewayclasses",
        "GatewayClass",
        STATUS,
    ),
    ("gateway.networking.k8s.io", "v1", "gateways", "Gateway", NS | STATUS),
    (
        "gateway.networking.k8s.io",
        "v1",
        "httproutes",
        "HTTPRoute",
        NS | STATUS,
    ),
    (
        "gateway.networking.k8s.io",
        "v1",
        "grpcroutes",
        "GRPCRoute",
        NS | STATUS,
    ),
    (
        "gateway.networking.k8s.io",
        "v1beta1",
        "referencegrants",
        "ReferenceGrant",
        NS,
    ),
];

/// Versions served for a group beyond the table's (Istio serves several for its CRDs).
pub fn extra_versions(group: &str) -> &'static [&'static str] {
    match group {
        "networking.istio.io" => &["v1beta1", "v1alpha3"],
        "security.istio.io" => &["v1beta1"],
        "telemetry.istio.io" => &["v1alpha1"],
        "gateway.networking.k8s.io" => &["v1beta1"],
        _ => &[],
    }
}

fn lookup(group: &str, plural: &str) -> Option<ResourceInfo> {
    TABLE
        .iter()
        .find(|r| r.0 == group && r.2 == plural)
        .map(|r| ResourceInfo {
            kind: r.3.into(),
            namespaced: Some(r.4 & NS != 0),
            has_status: r.4 & STATUS != 0,
            singular: r.3.to_ascii_lowercase(),
            known: true,
        })
}

/// Every built-in resource, with the version the table lists for it.
pub fn builtin() -> impl Iterator<Item = (ResourceType, ResourceInfo)> {
    TABLE.iter().filter_map(|r| {
        let rt = ResourceType::new(r.0, r.1, r.2);
        lookup(r.0, r.2).map(|i| (rt, i))
    })
}

/// The resource for an object's `apiVersion` and `kind` (table first, then English plurals).
pub fn for_kind(api_version: &str, kind: &str) -> ResourceType {
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    if let Some(r) = TABLE.iter().find(|r| r.0 == group && r.3 == kind) {
        return ResourceType::new(group, version, r.2);
    }
    ResourceType::new(group, version, &guess_plural(kind))
}

fn guess_plural(kind: &str) -> String {
    let k = kind.to_ascii_lowercase();
    if k.ends_with('s') || k.ends_with('x') || k.ends_with("ch") || k.ends_with("sh") {
        format!("{k}es")
    } else if k.ends_with('y') && !k.ends_with("ay") && !k.ends_with("ey") && !k.ends_with("oy") {
        format!("{}ies", &k[..k.len() - 1])
    } else {
        format!("{k}s")
    }
}

fn guess_singular(plural: &str) -> String {
    if let Some(s) = plural.strip_suffix("ies") {
        format!("{s}y")
    } else if let Some(s) = plural.strip_suffix("sses") {
        format!("{s}ss")
    } else if let Some(s) = plural.strip_suffix("ches").or_else(|| plural.strip_suffix("shes")) {
        format!("{s}{}", &plural[s.len()..s.len() + 2])
    } else if let Some(s) = plural.strip_suffix('s') {
        s.to_string()
    } else {
        plural.to_string()
    }
}

/// `widgets` → `Widget`: a stand-in until an object of that resource tells its real kind.
fn guess_kind(plural: &str) -> String {
    let s = guess_singular(plural);
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_plurals_round_trip() {
        assert_eq!(for_kind("v1", "Secret"), ResourceType::core("secrets"));
        assert_eq!(
            for_kind("networking.istio.io/v1beta1", "VirtualService").plural,
            "virtualservices"
        );
        assert_eq!(for_kind("example.com/v1", "Policy").plural, "policies");
        assert_eq!(for_kind("example.com/v1", "Gateway").plural, "gateways");
        assert_eq!(for_kind("example.com/v1", "Class").plural, "classes");
        assert_eq!(ResourceType::new("example.com", "v1", "policies").info().kind, "Policy");
        assert_eq!(ResourceType::new("example.com", "v1", "widgets").info().kind, "Widget");
        assert_eq!(ResourceType::core("secrets").info().namespaced, Some(true));
        assert_eq!(ResourceType::core("nodes").info().namespaced, Some(false));
    }
}
