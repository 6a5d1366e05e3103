//! Turning request credentials into an [`Identity`].
//!
//! Authenticators run in istiod's order (client certificate first, then bearer tokens); the first
//! success wins. A failure keeps every authenticator's reason so the operator sees, in one log
//! line, why each one refused, the way istiod's "Failed to authenticate client" line reads.

pub mod cache;
pub mod client_cert;
pub mod issuer;
pub mod jwks;
pub mod jwt;
pub mod kube_jwt;
pub mod tokenreview;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use rustls_pki_types::CertificateDer;

use crate::pki::SpiffeId;

/// gRPC metadata key carrying the bearer token.
pub const AUTHORIZATION: &str = "authorization";
/// gRPC metadata key naming the caller's cluster (istio-agent sends `ClusterID`, lower-cased on the wire).
pub const CLUSTER_ID_HEADER: &str = "clusterid";
pub const BEARER_PREFIX: &str = "Bearer ";

/// How an identity was proven.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthSource {
    ClientCertificate,
    Jwt { issuer: String },
    TokenReview { cluster: String },
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub spiffe: SpiffeId,
    pub source: AuthSource,
    /// Cluster the credential was validated against, when known.
    pub cluster_id: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

impl Identity {
    pub fn spiffe_uri(&self) -> String {
        self.spiffe.uri()
    }
}

/// What a request brought to prove who it is.
#[derive(Clone, Default)]
pub struct Credentials {
    /// Certificates the TLS peer presented (already verified against the mesh roots by the
    /// handshake), leaf first.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    pub bearer: Option<String>,
    /// The `clusterid` value when exactly one was sent, else empty (istiod's rule).
    pub cluster_id: String,
    pub remote_addr: Option<SocketAddr>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens never reach logs.
        f.debug_struct("Credentials")
            .field("peer_certs", &self.peer_certs.as_ref().map(|c| c.len()))
            .field("bearer", &self.bearer.as_ref().map(|_| "<redacted>"))
            .field("cluster_id", &self.cluster_id)
            .field("remote_addr", &self.remote_addr)
            .finish()
    }
}

impl Credentials {
    /// Reads `authorization` and `clusterid` from gRPC metadata.
    pub fn from_metadata(
        md: &tonic::metadata::MetadataMap,
        peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
        remote_addr: Option<SocketAddr>,
    ) -> Self {
        let bearer = md
            .get_all(AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| v.strip_prefix(BEARER_PREFIX))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let ids: Vec<_> = md.get_all(CLUSTER_ID_HEADER).iter().collect();
        let cluster_id = match ids.as_slice() {
            [one] => one.to_str().unwrap_or_default().to_string(),
            _ => String::new(),
        };
        Self {
            peer_certs,
            bearer,
            cluster_id,
            remote_addr,
        }
    }
}

/// Why one authenticator did not produce an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The request carries no credential of this kind.
    #[error("{0}")]
    NotPresent(String),
    /// A credential was presented and is not valid.
    #[error("{0}")]
    Rejected(String),
    /// The authority that could vouch for the credential did not answer; the caller should retry.
    #[error("cluster {cluster:?} could not review the token: {reason}")]
    Unavailable { cluster: String, reason: String },
    /// Too many reviews in flight for this cluster; refused without queueing.
    #[error("too many concurrent token reviews for cluster {cluster:?}")]
    Overloaded { cluster: String },
}

/// Which gRPC answer a chain failure deserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Unauthenticated,
    Unavailable,
    ResourceExhausted,
}

/// Every authenticator's reason for refusing.
#[derive(Debug, Clone)]
pub struct AuthFailure {
    pub reasons: Vec<(&'static str, AuthError)>,
}

impl AuthFailure {
    /// A retryable failure outranks a rejection only when no authenticator positively rejected
    /// a credential it owned: an unreachable cluster must not hide a bad token, and a bad token
    /// must not be reported as "retry later".
    pub fn kind(&self) -> FailureKind {
        let rejected = self.reasons.iter().any(|(_, e)| matches!(e, AuthError::Rejected(_)));
        if rejected {
            return FailureKind::Unauthenticated;
        }
        if self
            .reasons
            .iter()
            .any(|(_, e)| matches!(e, AuthError::Overloaded { .. }))
        {
            return FailureKind::ResourceExhausted;
        }
        if self
            .reasons
            .iter()
            .any(|(_, e)| matches!(e, AuthError::Unavailable { .. }))
        {
            return FailureKind::Unavailable;
        }
        FailureKind::Unauthenticated
    }
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .reasons
            .iter()
            .map(|(name, e)| format!("Authenticator {name}: {e}"))
            .collect();
        f.write_str(&parts.join("; "))
    }
}

/// One way of proving identity.
pub trait Authenticator: Send + Sync {
    fn name(&self) -> &'static str;
    fn authenticate<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Result<Identity, AuthError>>;
}

/// Authenticators tried in order; the first success wins.
#[derive(Clone, Default)]
pub struct AuthChain {
    authenticators: Vec<Arc<dyn Authenticator>>,
}

impl fmt::Debug for AuthChain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.authenticators.iter().map(|a| a.name()))
            .finish()
    }
}

impl AuthChain {
    pub fn new(authenticators: Vec<Arc<dyn Authenticator>>) -> Self {
        Self { authenticators }
    }

    pub fn push(&mut self, a: Arc<dyn Authenticator>) {
        self.authenticators.push(a);
    }

    pub async fn authenticate(&self, creds: &Credentials) -> Result<Identity, AuthFailure> {
        let mut reasons = Vec::with_capacity(self.authenticators.len());
        for a in &self.authenticators {
            match a.authenticate(creds).await {
                Ok(id) => return Ok(id),
                Err(e) => reasons.push((a.name(), e)),
            }
        }
        if reasons.is_empty() {
            reasons.push(("none", AuthError::NotPresent("no authenticators are configured".into())));
        }
        Err(AuthFailure { reasons })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::{MetadataMap, MetadataValue};

    #[test]
    fn clusterid_counts_only_when_sent_once() {
        let mut md = MetadataMap::new();
        md.insert("authorization", MetadataValue::from_static("Bearer abc"));
        md.append("clusterid", MetadataValue::from_static("cluster2"));
        let c = Credentials::from_metadata(&md, None, None);
        assert_eq!(c.cluster_id, "cluster2");
        assert_eq!(c.bearer.as_deref(), Some("abc"));
        md.append("clusterid", MetadataValue::from_static("cluster3"));
        assert_eq!(Credentials::from_metadata(&md, None, None).cluster_id, "");
    }

    #[test]
    fn bearer_requires_prefix_and_is_redacted_in_debug() {
        let mut md = MetadataMap::new();
        md.insert("authorization", MetadataValue::from_static("Basic abc"));
        assert_eq!(Credentials::from_metadata(&md, None, None).bearer, None);
        md.insert("authorization", MetadataValue::from_static("Bearer secret-token"));
        let dbg = format!("{:?}", Credentials::from_metadata(&md, None, None));
        assert!(!dbg.contains("secret-token"), "{dbg}");
    }

    #[test]
    fn failure_kind_prefers_rejection_over_unavailable() {
        let f = AuthFailure {
            reasons: vec![
                (
                    "a",
                    AuthError::Unavailable {
                        cluster: "c".into(),
                        reason: "down".into(),
                    },
                ),
                ("b", AuthError::Rejected("expired".into())),
            ],
        };
        assert_eq!(f.kind(), FailureKind::Unauthenticated);
        let f = AuthFailure {
            reasons: vec![
                ("a", AuthError::NotPresent("no cert".into())),
                (
                    "b",
                    AuthError::Unavailable {
                        cluster: "c".into(),
                        reason: "down".into(),
                    },
                ),
            ],
        };
        assert_eq!(f.kind(), FailureKind::Unavailable);
        assert!(f.to_string().contains("Authenticator a: no cert"));
    }
}
