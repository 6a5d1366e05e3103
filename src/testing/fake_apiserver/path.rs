//! Request paths: `/api/v1/...` and `/apis/<group>/<version>/...` split into resource,
//! namespace, name and subresource, the way kube-apiserver's request-info resolver does.
use super::resources::ResourceType;

/// What a resource request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub rt: ResourceType,
    /// Empty for cluster-scoped objects and for lists across all namespaces.
    pub namespace: String,
    /// Empty for collection requests.
    pub name: String,
    pub subresource: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/api`, `/apis`, `/api/v1`, `/apis/<g>`, `/apis/<g>/<v>` (discovery).
    Discovery {
        group: Option<String>,
        version: Option<String>,
        core: bool,
    },
    Resource(Target),
    /// Anything else (`/version`, `/healthz`, `/fake/...`, unknown paths).
    Other,
}

/// Subresources of a Namespace (`/api/v1/namespaces/<ns>/<these>` is not a resource list).
const NAMESPACE_SUBRESOURCES: &[&str] = &["status", "finalize"];

pub fn route(path: &str) -> Route {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api"] => {
            return Route::Discovery {
                group: None,
                version: None,
                core: true,
            };
        }
        ["apis"] => {
            return Route::Discovery {
                group: None,
                version: None,
                core: false,
            };
        }
        ["apis", g] => {
            return Route::Discovery {
                group: Some(g.to_string()),
                version: None,
                core: false,
            };
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Route::Other,
    };
    if rest.is_empty() {
        return Route::Discovery {
            group: Some(group.to_string()),
            version: Some(version.to_string()),
            core: group.is_empty(),
        };
    }
    let target = |ns: &str, plural: &str, name: &str, sub: &str| {
        Route::Resource(Target {
            rt: ResourceType::new(group, version, plural),
            namespace: ns.into(),
            name: name.into(),
            subresource: sub.into(),
        })
    };
    match rest {
        ["namespaces", ns, plural, tail @ ..] if !NAMESPACE_SUBRESOURCES.contains(plural) => match tail {
            [] => target(ns, plural, "", ""),
            [name] => target(ns, plural, name, ""),
            [name, sub] => target(ns, plural, name, sub),
            _ => Route::Other,
        },
        [plural] => target("", plural, "", ""),
        [plural, name] => target("", plural, name, ""),
        [plural, name, sub] => target("", plural, name, sub),
        _ => Route::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(path: &str) -> Target {
        match route(path) {
            Route::Resource(t) => t,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn paths_resolve_like_kube_apiserver() {
        let a = t("/api/v1/namespaces/ns/secrets/x");
        assert_eq!(
            (a.rt.plural.as_str(), a.namespace.as_str(), a.name.as_str()),
            ("secrets", "ns", "x")
        );
        let b = t("/api/v1/namespaces/ns");
        assert_eq!(
            (b.rt.plural.as_str(), b.namespace.as_str(), b.name.as_str()),
            ("namespaces", "", "ns")
        );
        let c = t("/api/v1/namespaces/ns/status");
        assert_eq!((c.name.as_str(), c.subresource.as_str()), ("ns", "status"));
        let d = t("/apis/coordination.k8s.io/v1/namespaces/ns/leases");
        assert_eq!(
            (d.rt.group.as_str(), d.rt.plural.as_str(), d.name.as_str()),
            ("coordination.k8s.io", "leases", "")
        );
        let e = t("/api/v1/namespaces/ns/serviceaccounts/sa/token");
        assert_eq!(e.subresource, "token");
        let f = t("/api/v1/nodes/n1");
        assert_eq!((f.namespace.as_str(), f.name.as_str()), ("", "n1"));
        assert!(matches!(route("/apis"), Route::Discovery { core: false, .. }));
        assert!(matches!(route("/api/v1"), Route::Discovery { core: true, .. }));
        assert_eq!(route("/version"), Route::Other);
    }
}
