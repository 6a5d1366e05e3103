//! SPIFFE ids of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
use std::fmt;

/// A workload identity as Istio writes it into certificates.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeError {
    #[error("{0:?} is not a spiffe:// URI")]
    NotSpiffe(String),
    #[error("{0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    BadPath(String),
}

/// A Kubernetes namespace name: a DNS-1123 label.
pub fn is_valid_namespace(s: &str) -> bool {
    is_dns1123_label(s)
}

/// A Kubernetes service-account name: a DNS-1123 subdomain.
pub fn is_valid_service_account(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    pub fn parse(uri: &str) -> Result<Self, SpiffeError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::NotSpiffe(uri.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && is_valid_namespace(ns) && is_valid_service_account(sa) => {
                Ok(Self::new(td, ns, sa))
            }
            _ => Err(SpiffeError::BadPath(uri.to_string())),
        }
    }

    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/bookinfo").unwrap();
        assert_eq!(id.namespace, "default");
        assert_eq!(id.service_account, "bookinfo");
        assert_eq!(id.uri(), "spiffe://cluster.local/ns/default/sa/bookinfo");
    }

    #[test]
    fn rejects_other_shapes() {
        assert!(SpiffeId::parse("https://cluster.local/ns/a/sa/b").is_err());
        assert!(SpiffeId::parse("spiffe://cluster.local/ns/a").is_err());
        assert!(SpiffeId::parse("spiffe://cluster.local/ns//sa/b").is_err());
        assert!(SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b/extra").is_err());
        assert!(SpiffeId::parse("spiffe://cluster.local/ns/A B/sa/b").is_err());
    }

    #[test]
    fn kubernetes_names() {
        assert!(is_valid_namespace("istio-system"));
        assert!(!is_valid_namespace("-a") && !is_valid_namespace("A") && !is_valid_namespace("x/sa/admin"));
        assert!(!is_valid_namespace(&"a".repeat(64)));
        assert!(is_valid_service_account("istio-reader-service-account") && is_valid_service_account("a.b"));
        assert!(!is_valid_service_account("a..b") && !is_valid_service_account("a b"));
    }
}
