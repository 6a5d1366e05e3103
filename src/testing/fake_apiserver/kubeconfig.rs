//! Kubeconfigs in the shape `istioctl create-remote-secret` writes: one cluster, context and
//! user, all named after the cluster, with the CA inline and a bearer token.
use base64::Engine;

pub fn render(cluster_name: &str, server_url: &str, ca_pem: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: {ca}
    server: {server_url}
  name: {cluster_name}
contexts:
- context:
    cluster: {cluster_name}
    user: {cluster_name}
  name: {cluster_name}
current-context: {cluster_name}
kind: Config
preferences: {{}}
users:
- name: {cluster_name}
  user:
    token: {token}
"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_as_a_kubeconfig() {
        let text = super::render("c2", "https://127.0.0.2:6443", "PEM", "tok");
        let kc = kube::config::Kubeconfig::from_yaml(&text).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("c2"));
        assert_eq!(kc.clusters[0].name, "c2");
        let user = kc.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.token.is_some());
    }
}
