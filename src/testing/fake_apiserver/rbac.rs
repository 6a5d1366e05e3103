//! Authorization: rules granted to users or groups, evaluated like RBAC (verbs × API groups ×
//! resources [× names] [× namespaces], `*` wildcards), plus the 403 text kube-apiserver writes.
use std::collections::HashMap;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

/// Who made a request, as authentication established it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

/// The group whose members may do anything, as in Kubernetes.
pub const MASTERS: &str = "system:masters";

/// One permission. Empty `resource_names` means any name; empty `namespaces` means every
/// namespace and the cluster scope (a ClusterRoleBinding), otherwise only those namespaces
/// (RoleBindings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    pub verbs: Vec<String>,
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    #[serde(default)]
    pub resource_names: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl Rule {
    pub fn new(verbs: &[&str], api_groups: &[&str], resources: &[&str]) -> Self {
        Self {
            verbs: strings(verbs),
            api_groups: strings(api_groups),
            resources: strings(resources),
            resource_names: Vec::new(),
            namespaces: Vec::new(),
        }
    }

    /// Restricts the rule to objects with these names.
    pub fn names(mut self, names: &[&str]) -> Self {
        self.resource_names = strings(names);
        self
    }

    /// Restricts the rule to these namespaces.
    pub fn in_namespaces(mut self, namespaces: &[&str]) -> Self {
        self.namespaces = strings(namespaces);
        self
    }

    fn allows(&self, a: &Attributes) -> bool {
        let any = |list: &[String], v: &str| list.iter().any(|x| x == "*" || x == v);
        let resource_ok = self.resources.iter().any(|r| {
            if a.subresource.is_empty() {
                r == "*" || *r == a.resource
            } else {
                let full = format!("{}/{}", a.resource, a.subresource);
                r == "*" || *r == full || *r == format!("*/{}", a.subresource) || *r == format!("{}/*", a.resource)
            }
        });
        let ns_ok = self.namespaces.is_empty() || (!a.namespace.is_empty() && self.namespaces.contains(&a.namespace));
        any(&self.verbs, &a.verb)
            && any(&self.api_groups, &a.group)
            && resource_ok
            && (self.resource_names.is_empty() || self.resource_names.contains(&a.name))
            && ns_ok
    }
}

/// What a request wants to do, as the authorizer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

impl Attributes {
    /// The 403 message kube-apiserver writes for a denied request.
    pub fn forbidden_message(&self, user: &str) -> String {
        let qualified = if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        let subject = if self.name.is_empty() {
            format!("{qualified} is forbidden")
        } else {
            format!("{qualified} \"{}\" is forbidden", self.name)
        };
        let resource = if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        };
        let scope = if self.namespace.is_empty() {
            "at the cluster scope".to_string()
        } else {
            format!("in the namespace \"{}\"", self.namespace)
        };
        format!(
            "{subject}: User \"{user}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
            self.verb, self.group
        )
    }
}

/// Rules by subject (a username or a group name).
#[derive(Default)]
pub struct Rbac {
    grants: RwLock<HashMap<String, Vec<Rule>>>,
}

impl Rbac {
    pub fn grant(&self, subject: &str, rules: Vec<Rule>) {
        let mut g = self.grants.write().unwrap_or_else(|e| e.into_inner());
        g.entry(subject.to_string()).or_default().extend(rules);
    }

    pub fn revoke_all(&self, subject: &str) {
        self.grants.write().unwrap_or_else(|e| e.into_inner()).remove(subject);
    }

    pub fn allowed(&self, user: &UserInfo, a: &Attributes) -> bool {
        if user.groups.iter().any(|g| g == MASTERS) {
            return true;
        }
        let g = self.grants.read().unwrap_or_else(|e| e.into_inner());
        std::iter::once(&user.username)
            .chain(user.groups.iter())
            .filter_map(|s| g.get(s))
            .flatten()
            .any(|r| r.allows(a))
    }
}

/// What istiod needs on a remote cluster (Istio's istio-reader cluster role plus the writes
/// istiod makes): the rules `reader_token` grants.
pub fn istio_reader_rules() -> Vec<Rule> {
    let read = &["get", "list", "watch"];
    vec![
        Rule::new(
            read,
            &[""],
            &[
                "endpoints",
                "pods",
                "services",
                "nodes",
                "namespaces",
                "secrets",
                "configmaps",
                "serviceaccounts",
                "replicationcontrollers",
            ],
        ),
        Rule::new(read, &["discovery.k8s.io"], &["endpointslices"]),
        Rule::new(&["*"], &["networking.istio.io"], &["*"]),
        Rule::new(
            read,
            &[
                "config.istio.io",
                "security.istio.io",
                "telemetry.istio.io",
                "extensions.istio.io",
                "gateway.networking.k8s.io",
                "apps",
            ],
            &["*"],
        ),
        Rule::new(&["create"], &["authentication.k8s.io"], &["tokenreviews"]),
        Rule::new(&["create"], &["authorization.k8s.io"], &["subjectaccessreviews"]),
        Rule::new(&["create", "update", "patch"], &[""], &["configmaps"]),
        Rule::new(&["*"], &["coordination.k8s.io"], &["leases"]),
        Rule::new(
            &["get", "list", "watch", "update", "patch"],
            &["admissionregistration.k8s.io"],
            &["mutatingwebhookconfigurations", "validatingwebhookconfigurations"],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(verb: &str, group: &str, resource: &str, ns: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.into(),
            ..Default::default()
        }
    }

    #[test]
    fn rules_match_like_rbac() {
        let rbac = Rbac::default();
        let user = UserInfo {
            username: "u".into(),
            groups: vec!["g".into()],
            ..Default::default()
        };
        rbac.grant(
            "u",
            vec![Rule::new(&["get"], &[""], &["secrets"]).in_namespaces(&["a"])],
        );
        rbac.grant("g", vec![Rule::new(&["list"], &["apps"], &["*"])]);
        assert!(rbac.allowed(&user, &attrs("get", "", "secrets", "a")));
        assert!(!rbac.allowed(&user, &attrs("get", "", "secrets", "b")));
        assert!(!rbac.allowed(&user, &attrs("get", "", "secrets", "")));
        assert!(rbac.allowed(&user, &attrs("list", "apps", "deployments", "")));
        assert!(!rbac.allowed(&user, &attrs("watch", "apps", "deployments", "")));
    }

    #[test]
    fn forbidden_text_matches_kube_apiserver() {
        let a = attrs("list", "", "secrets", "x");
        assert_eq!(
            a.forbidden_message("system:serviceaccount:istio-system:istio-reader-service-account"),
            "secrets is forbidden: User \"system:serviceaccount:istio-system:istio-reader-service-account\" cannot list resource \"secrets\" in API group \"\" in the namespace \"x\""
        );
        let mut b = attrs("get", "coordination.k8s.io", "leases", "");
        b.name = "l".into();
        assert_eq!(
            b.forbidden_message("bob"),
            "leases.coordination.k8s.io \"l\" is forbidden: User \"bob\" cannot get resource \"leases\" in API group \"coordination.k8s.io\" at the cluster scope"
        );
    }
}
