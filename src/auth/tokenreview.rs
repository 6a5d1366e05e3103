//! The TokenReview seam: a trait the Kubernetes JWT authenticator calls, with the real
//! implementation over `kube::Client` and result parsing per istiod's rules (reference §2.4).
use futures::future::{BoxFuture, FutureExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;

use super::jwt::parse_service_account_subject;

pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const SA_GROUP: &str = "system:serviceaccounts";

/// Why a review produced no answer about the token itself.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    /// The API server answered with an HTTP error (RBAC, throttling, 5xx).
    #[error("API server answered {code}: {message}")]
    Api { code: u16, message: String },
    /// No answer: connection refused, reset, TLS failure.
    #[error("API server unreachable: {0}")]
    Transport(String),
}

/// A reviewed service account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewedAccount {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
}

/// Asks a cluster whether a token is valid for some audiences.
pub trait TokenReviewer: Send + Sync {
    /// `Ok(Ok(account))` valid; `Ok(Err(reason))` the cluster says no; `Err` no answer.
    fn review<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<Result<ReviewedAccount, String>, ReviewError>>;
}

/// TokenReview through a cluster's `kube::Client`.
#[derive(Clone)]
pub struct KubeTokenReviewer {
    client: kube::Client,
}

impl KubeTokenReviewer {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
        audiences: &'a [String],
    ) -> BoxFuture<'a, Result<Result<ReviewedAccount, String>, ReviewError>> {
        async move {
            let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
            let tr = TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.to_string()),
                    audiences: Some(audiences.to_vec()),
                },
                ..Default::default()
            };
            let out = api.create(&PostParams::default(), &tr).await.map_err(|e| match e {
                kube::Error::Api(s) => ReviewError::Api {
                    code: s.code,
                    message: s.message,
                },
                other => ReviewError::Transport(other.to_string()),
            })?;
            Ok(parse_status(out.status.as_ref()))
        }
        .boxed()
    }
}

/// istiod's acceptance rules for a TokenReview status.
pub fn parse_status(status: Option<&TokenReviewStatus>) -> Result<ReviewedAccount, String> {
    let status = status.ok_or("the TokenReview has no status")?;
    if let Some(err) = status.error.as_deref().filter(|e| !e.is_empty()) {
        return Err(format!("the service account authentication returns an error: {err}"));
    }
    if status.authenticated != Some(true) {
        return Err("the token is not authenticated".into());
    }
    let user = status.user.as_ref().ok_or("the TokenReview has no user")?;
    let groups = user.groups.as_deref().unwrap_or_default();
    if !groups.iter().any(|g| g == SA_GROUP) {
        return Err(format!(
            "the token is not a service account (groups {groups:?} lack {SA_GROUP})"
        ));
    }
    let username = user.username.as_deref().unwrap_or_default();
    let (ns, sa) = parse_service_account_subject(username)
        .ok_or_else(|| format!("invalid username {username:?}: want system:serviceaccount:<namespace>:<name>"))?;
    let extra = |k: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(k))
            .and_then(|v| v.first())
            .cloned()
    };
    Ok(ReviewedAccount {
        namespace: ns.to_string(),
        service_account: sa.to_string(),
        pod_name: extra(POD_NAME_EXTRA),
        pod_uid: extra(POD_UID_EXTRA),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn status(authenticated: bool, user: &str, groups: &[&str]) -> TokenReviewStatus {
        let mut extra = BTreeMap::new();
        extra.insert(POD_NAME_EXTRA.to_string(), vec!["gw-1".to_string()]);
        TokenReviewStatus {
            authenticated: Some(authenticated),
            user: Some(UserInfo {
                username: Some(user.into()),
                groups: Some(groups.iter().map(|g| g.to_string()).collect()),
                extra: Some(extra),
                uid: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_service_account_and_keeps_pod_name() {
        let a = parse_status(Some(&status(
            true,
            "system:serviceaccount:istio-system:gw",
            &[SA_GROUP],
        )))
        .unwrap();
        assert_eq!(
            (a.namespace.as_str(), a.service_account.as_str()),
            ("istio-system", "gw")
        );
        assert_eq!(a.pod_name.as_deref(), Some("gw-1"));
    }

    #[test]
    fn refuses_what_istiod_refuses() {
        assert!(parse_status(None).is_err());
        assert!(parse_status(Some(&status(false, "system:serviceaccount:a:b", &[SA_GROUP]))).is_err());
        assert!(
            parse_status(Some(&status(
                true,
                "system:serviceaccount:a:b",
                &["system:authenticated"]
            )))
            .is_err()
        );
        assert!(parse_status(Some(&status(true, "alice", &[SA_GROUP]))).is_err());
        let mut s = status(true, "system:serviceaccount:a:b", &[SA_GROUP]);
        s.error = Some("token expired".into());
        assert!(parse_status(Some(&s)).unwrap_err().contains("token expired"));
    }
}
