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
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => Ok(Self::new(td, ns, sa)),
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
    }
}
