//! The pure part of root-cert distribution: which namespaces need a ConfigMap written, whether a
//! remote cluster names us as its control plane, and whether a Lease is still ours. No I/O, so
//! every rule is unit tested here.
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};

use super::{CONFIGMAP_LABEL, CONFIGMAP_LABEL_VALUE, CONTROL_PLANE_CLUSTERS_ANNOTATION, DATA_KEY, EXCLUDED_NAMESPACES};

/// What reconciling needs to know about a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NsState {
    /// Being deleted: writing into it would fail (and is pointless).
    pub terminating: bool,
}

impl NsState {
    pub fn of(ns: &Namespace) -> Self {
        let phase_terminating = ns
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Terminating");
        Self {
            terminating: ns.metadata.deletion_timestamp.is_some() || phase_terminating,
        }
    }
}

/// What reconciling needs to know about an existing `istio-ca-root-cert` ConfigMap: a digest of
/// its root (not the PEM itself, to keep memory flat with thousands of namespaces) and whether it
/// carries the label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmState {
    pub root_sha256: Option<[u8; 32]>,
    pub labeled: bool,
}

impl CmState {
    pub fn of(cm: &ConfigMap) -> Self {
        Self {
            root_sha256: cm
                .data
                .as_ref()
                .and_then(|d| d.get(DATA_KEY))
                .map(|v| crate::pki::sha256(v.as_bytes())),
            labeled: cm
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(CONFIGMAP_LABEL))
                .is_some_and(|v| v == CONFIGMAP_LABEL_VALUE),
        }
    }

    /// The state right after meshd wrote `root`.
    pub fn written(root_sha256: [u8; 32]) -> Self {
        Self {
            root_sha256: Some(root_sha256),
            labeled: true,
        }
    }
}

/// One write.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// No ConfigMap in this namespace yet (or it was deleted).
    Create(String),
    /// The ConfigMap exists but its root or label is wrong.
    Update(String),
}

impl Action {
    pub fn namespace(&self) -> &str {
        match self {
            Action::Create(ns) | Action::Update(ns) => ns,
        }
    }

    pub fn op(&self) -> &'static str {
        match self {
            Action::Create(_) => "create",
            Action::Update(_) => "update",
        }
    }
}

/// Namespaces that never get the ConfigMap (istiod's list; `kube-system` is *not* on it).
pub fn is_excluded(namespace: &str) -> bool {
    EXCLUDED_NAMESPACES.contains(&namespace)
}

/// The writes that make every eligible namespace hold `root` (given by digest).
pub fn plan<'a>(
    namespaces: impl IntoIterator<Item = (&'a String, &'a NsState)>,
    configmap: impl Fn(&str) -> Option<CmState>,
    root_sha256: &[u8; 32],
) -> Vec<Action> {
    let mut out = Vec::new();
    for (name, ns) in namespaces {
        if ns.terminating || is_excluded(name) {
            continue;
        }
        match configmap(name) {
            None => out.push(Action::Create(name.clone())),
            Some(cm) if cm.root_sha256.as_ref() != Some(root_sha256) || !cm.labeled => {
                out.push(Action::Update(name.clone()))
            }
            Some(_) => {}
        }
    }
    out
}

/// Whether a remote cluster's system namespace names `cluster_id` (or `*`) in
/// `topology.istio.io/controlPlaneClusters`.
pub fn should_lead(annotations: Option<&BTreeMap<String, String>>, cluster_id: &str) -> bool {
    annotations
        .and_then(|a| a.get(CONTROL_PLANE_CLUSTERS_ANNOTATION))
        .is_some_and(|v| v.split(',').map(str::trim).any(|c| c == "*" || c == cluster_id))
}

/// Whether `lease` is held by `identity` and not yet expired at `now`: checked right before
/// writing, so a replica whose renewals silently stopped does not keep writing.
pub fn lease_held(lease: &Lease, identity: &str, now: SystemTime) -> bool {
    let Some(spec) = &lease.spec else { return false };
    if spec.holder_identity.as_deref() != Some(identity) {
        return false;
    }
    let (Some(renew), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return false;
    };
    let renewed: SystemTime = renew.0.into();
    renewed + Duration::from_secs(secs.max(0) as u64) > now
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};

    fn ns(names: &[(&str, bool)]) -> BTreeMap<String, NsState> {
        names
            .iter()
            .map(|(n, t)| (n.to_string(), NsState { terminating: *t }))
            .collect()
    }

    const ROOT: [u8; 32] = [1; 32];
    const OLD: [u8; 32] = [2; 32];

    #[test]
    fn creates_everywhere_but_excluded_and_terminating() {
        let namespaces = ns(&[
            ("default", false),
            ("kube-system", false),
            ("kube-public", false),
            ("kube-node-lease", false),
            ("local-path-storage", false),
            ("going", true),
            ("istio-system", false),
        ]);
        let got = plan(&namespaces, |_| None, &ROOT);
        assert_eq!(
            got,
            vec![
                Action::Create("default".into()),
                Action::Create("istio-system".into()),
                Action::Create("kube-system".into()),
            ]
        );
    }

    #[test]
    fn repairs_root_and_label_and_leaves_good_ones_alone() {
        let namespaces = ns(&[("a", false), ("b", false), ("c", false), ("d", false)]);
        let cms: BTreeMap<&str, CmState> = [
            ("a", CmState::written(ROOT)),
            (
                "b",
                CmState {
                    root_sha256: Some(OLD),
                    labeled: true,
                },
            ),
            (
                "c",
                CmState {
                    root_sha256: Some(ROOT),
                    labeled: false,
                },
            ),
            (
                "d",
                CmState {
                    root_sha256: None,
                    labeled: true,
                },
            ),
        ]
        .into_iter()
        .collect();
        let got = plan(&namespaces, |n| cms.get(n).copied(), &ROOT);
        assert_eq!(
            got,
            vec![
                Action::Update("b".into()),
                Action::Update("c".into()),
                Action::Update("d".into())
            ]
        );
        assert_eq!(got[0].op(), "update");
        assert_eq!(got[0].namespace(), "b");
    }

    #[test]
    fn namespace_and_configmap_state_from_objects() {
        let mut n = Namespace::default();
        assert!(!NsState::of(&n).terminating);
        n.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert!(NsState::of(&n).terminating);
        let n = Namespace {
            status: Some(k8s_openapi::api::core::v1::NamespaceStatus {
                phase: Some("Terminating".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(NsState::of(&n).terminating);

        let mut cm = ConfigMap::default();
        assert_eq!(
            CmState::of(&cm),
            CmState {
                root_sha256: None,
                labeled: false
            }
        );
        cm.data = Some([(DATA_KEY.to_string(), "pem".to_string())].into());
        cm.metadata.labels = Some([(CONFIGMAP_LABEL.to_string(), "false".to_string())].into());
        let s = CmState::of(&cm);
        assert_eq!(s.root_sha256, Some(crate::pki::sha256(b"pem")));
        assert!(!s.labeled);
        cm.metadata.labels = Some([(CONFIGMAP_LABEL.to_string(), "true".to_string())].into());
        assert_eq!(CmState::of(&cm), CmState::written(crate::pki::sha256(b"pem")));
    }

    #[test]
    fn control_plane_clusters_annotation() {
        let a = |v: &str| -> BTreeMap<String, String> {
            [(CONTROL_PLANE_CLUSTERS_ANNOTATION.to_string(), v.to_string())].into()
        };
        assert!(should_lead(Some(&a("cluster1")), "cluster1"));
        assert!(should_lead(Some(&a("other, cluster1")), "cluster1"));
        assert!(should_lead(Some(&a("*")), "cluster1"));
        assert!(!should_lead(Some(&a("cluster10,cluster")), "cluster1"));
        assert!(!should_lead(Some(&a("")), "cluster1"));
        assert!(!should_lead(Some(&BTreeMap::new()), "cluster1"));
        assert!(!should_lead(None, "cluster1"));
    }

    #[test]
    fn lease_must_be_ours_and_fresh() {
        let now = SystemTime::now();
        let lease = |holder: Option<&str>, renewed_ago: u64, secs: i32| Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(String::from),
                renew_time: Some(MicroTime((now - Duration::from_secs(renewed_ago)).try_into().unwrap())),
                lease_duration_seconds: Some(secs),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(lease_held(&lease(Some("me"), 5, 30), "me", now));
        assert!(!lease_held(&lease(Some("you"), 5, 30), "me", now));
        assert!(!lease_held(&lease(Some("me"), 31, 30), "me", now));
        assert!(!lease_held(&lease(None, 0, 30), "me", now));
        assert!(!lease_held(&Lease::default(), "me", now));
    }
}
