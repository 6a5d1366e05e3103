//! Remote-secret kubeconfigs: parsed from text, checked so they cannot run code or read files on
//! the control plane, then turned into a `kube::Client`.
//!
//! A remote secret is written by whoever can create Secrets in the system namespace; its
//! kubeconfig must not become a way to execute programs (`exec`, cloud `auth-provider`s) or to
//! read meshd's own files (`tokenFile`, `client-certificate`, `client-key`,
//! `certificate-authority` paths). istiod made the same call (PR #36307); the same names can be
//! allowed explicitly, as with `PILOT_INSECURE_MULTICLUSTER_KUBECONFIG_OPTIONS`.
use std::collections::BTreeSet;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum KubeconfigError {
    #[error("kubeconfig is not valid YAML: {0}")]
    Parse(String),
    #[error("kubeconfig has no current-context, or it names no cluster/user")]
    NoContext,
    #[error(
        "kubeconfig uses {option} (user {user:?}), which could {risk}; it is refused unless allowed with --insecure-kubeconfig-options {option}"
    )]
    Forbidden {
        option: &'static str,
        user: String,
        risk: &'static str,
    },
    #[error("building a client from the kubeconfig: {0}")]
    Client(String),
}

/// Options a kubeconfig may use only when the operator allows them by name.
#[derive(Debug, Clone, Default)]
pub struct AllowedOptions(BTreeSet<String>);

impl AllowedOptions {
    pub fn new<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        Self(names.into_iter().map(Into::into).collect())
    }

    fn allows(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// Parses and sanitizes a kubeconfig. Only the current context's cluster and user matter, but
/// every user entry is checked: a forbidden entry anywhere means the secret is not trustworthy.
pub fn sanitize(text: &str, allowed: &AllowedOptions) -> Result<Kubeconfig, KubeconfigError> {
    let kc = Kubeconfig::from_yaml(text).map_err(|e| KubeconfigError::Parse(e.to_string()))?;
    let forbid = |option: &'static str, user: &str, risk: &'static str| {
        if allowed.allows(option) {
            Ok(())
        } else {
            Err(KubeconfigError::Forbidden {
                option,
                user: user.to_string(),
                risk,
            })
        }
    };
    for named in &kc.auth_infos {
        let Some(user) = &named.auth_info else { continue };
        let name = named.name.as_str();
        if user.exec.is_some() {
            forbid("exec", name, "run a program on the control plane")?;
        }
        if let Some(provider) = &user.auth_provider
            && provider.name != "oidc"
        {
            let option = match provider.name.as_str() {
                "gcp" => "gcp",
                "azure" => "azure",
                "openstack" => "openstack",
                _ => "auth-provider",
            };
            forbid(option, name, "run a credential plugin on the control plane")?;
        }
        if user.token_file.is_some() {
            forbid("tokenFile", name, "read a file on the control plane")?;
        }
        if user.client_certificate.is_some() {
            forbid("clientCertificate", name, "read a file on the control plane")?;
        }
        if user.client_key.is_some() {
            forbid("clientKey", name, "read a file on the control plane")?;
        }
    }
    for named in &kc.clusters {
        if let Some(c) = &named.cluster
            && c.certificate_authority.is_some()
        {
            forbid("certificateAuthority", &named.name, "read a file on the control plane")?;
        }
    }
    let current = kc.current_context.as_deref().ok_or(KubeconfigError::NoContext)?;
    if !kc.contexts.iter().any(|c| c.name == current) {
        return Err(KubeconfigError::NoContext);
    }
    Ok(kc)
}

/// Builds the clients for a sanitized kubeconfig: the cluster's client, and its TokenReview
/// client ([`review_client`]).
pub async fn client(kc: Kubeconfig, read_timeout: Duration) -> Result<(kube::Client, kube::Client), KubeconfigError> {
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| KubeconfigError::Client(e.to_string()))?;
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(read_timeout);
    let review = review_client(&config).map_err(|e| KubeconfigError::Client(e.to_string()))?;
    let client = kube::Client::try_from(config).map_err(|e| KubeconfigError::Client(e.to_string()))?;
    Ok((client, review))
}

/// A client for TokenReviews: without kube's own retries of 429/503 answers, so meshd sees a
/// throttling API server and says so (it retries within its review deadline itself).
pub fn review_client(config: &kube::Config) -> Result<kube::Client, kube::Error> {
    let mut config = config.clone();
    config.default_retry = false;
    kube::Client::try_from(config)
}

/// The API server URL of the current context (for `/debug/clusterz`).
pub fn server_url(kc: &Kubeconfig) -> Option<String> {
    let ctx = kc.current_context.as_deref()?;
    let cluster = kc
        .contexts
        .iter()
        .find(|c| c.name == ctx)?
        .context
        .as_ref()?
        .cluster
        .clone();
    kc.clusters
        .iter()
        .find(|c| c.name == cluster)?
        .cluster
        .as_ref()?
        .server
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubeconfig(user: &str) -> String {
        format!(
            r#"apiVersion: v1
kind: Config
clusters:
- name: cluster2
  cluster:
    server: https://127.0.0.3:6443
    certificate-authority-data: Zm9v
contexts:
- name: cluster2
  context: {{cluster: cluster2, user: cluster2}}
current-context: cluster2
users:
- name: cluster2
  user:
{user}
"#
        )
    }

    #[test]
    fn accepts_inline_token_and_oidc() {
        assert!(sanitize(&kubeconfig("    token: abc"), &AllowedOptions::default()).is_ok());
        let oidc = "    auth-provider:\n      name: oidc\n      config: {id-token: x}";
        assert!(sanitize(&kubeconfig(oidc), &AllowedOptions::default()).is_ok());
    }

    #[test]
    fn refuses_code_and_file_access() {
        let cases = [
            (
                "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: /bin/sh\n      args: [-c, id]",
                "exec",
            ),
            ("    auth-provider:\n      name: gcp\n      config: {}", "gcp"),
            (
                "    auth-provider:\n      name: mycorp\n      config: {}",
                "auth-provider",
            ),
            (
                "    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token",
                "tokenFile",
            ),
            (
                "    client-certificate: /etc/ssl/cert.pem\n    client-key-data: eA==",
                "clientCertificate",
            ),
            (
                "    client-key: /etc/ssl/key.pem\n    client-certificate-data: eA==",
                "clientKey",
            ),
        ];
        for (user, option) in cases {
            match sanitize(&kubeconfig(user), &AllowedOptions::default()) {
                Err(KubeconfigError::Forbidden { option: o, .. }) => assert_eq!(o, option),
                other => panic!("{option}: {other:?}"),
            }
            assert!(
                sanitize(&kubeconfig(user), &AllowedOptions::new([option])).is_ok(),
                "{option} allowed"
            );
        }
        let ca_path = kubeconfig("    token: abc")
            .replace("certificate-authority-data: Zm9v", "certificate-authority: /etc/passwd");
        assert!(matches!(
            sanitize(&ca_path, &AllowedOptions::default()),
            Err(KubeconfigError::Forbidden {
                option: "certificateAuthority",
                ..
            })
        ));
    }

    #[test]
    fn refuses_non_yaml_and_missing_context() {
        assert!(matches!(
            sanitize("{{{ not yaml", &AllowedOptions::default()),
            Err(KubeconfigError::Parse(_))
        ));
        let no_ctx = kubeconfig("    token: abc").replace("current-context: cluster2", "");
        assert_eq!(
            sanitize(&no_ctx, &AllowedOptions::default()).unwrap_err(),
            KubeconfigError::NoContext
        );
    }

    #[test]
    fn server_url_of_current_context() {
        let kc = sanitize(&kubeconfig("    token: abc"), &AllowedOptions::default()).unwrap();
        assert_eq!(server_url(&kc).as_deref(), Some("https://127.0.0.3:6443"));
    }
}
