//! Kubernetes mode: the self-signed root lives in Secret `istio-ca-secret` (type
//! `istio.io/ca-root`) in the system namespace, so every replica and every restart signs with
//! the same root. The first replica to create it wins; the others read theirs back.
use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};

use super::material::{self, CaMaterial, CaSource, MaterialError};
use crate::pki::keys::KeyType;

pub const CA_SECRET_NAME: &str = "istio-ca-secret";
pub const CA_SECRET_TYPE: &str = "istio.io/ca-root";

#[derive(Debug, thiserror::Error)]
pub enum KubeCaError {
    #[error("reading Secret {namespace}/{CA_SECRET_NAME}: {source}")]
    Api {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{CA_SECRET_NAME} lacks {key}")]
    MissingKey { namespace: String, key: &'static str },
    #[error(transparent)]
    Material(#[from] MaterialError),
}

fn read(secret: &Secret, namespace: &str) -> Result<CaMaterial, KubeCaError> {
    let get = |key: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
            .ok_or_else(|| KubeCaError::MissingKey {
                namespace: namespace.to_string(),
                key,
            })
    };
    let cert = get("ca-cert.pem")?;
    let key = get("ca-key.pem")?;
    Ok(material::from_root_pems(
        &cert,
        &key,
        CaSource::KubeSecret {
            namespace: namespace.to_string(),
            name: CA_SECRET_NAME.to_string(),
        },
    )?)
}

/// Loads the root from `istio-ca-secret`, creating it if absent.
pub async fn load_or_create(
    client: kube::Client,
    namespace: &str,
    trust_domain: &str,
    key_type: KeyType,
    now: SystemTime,
) -> Result<CaMaterial, KubeCaError> {
    let api: kube::Api<Secret> = kube::Api::namespaced(client, namespace);
    let api_err = |source| KubeCaError::Api {
        namespace: namespace.to_string(),
        source,
    };
    if let Some(s) = api.get_opt(CA_SECRET_NAME).await.map_err(api_err)? {
        return read(&s, namespace);
    }
    let (cert, key) = material::generate_root(trust_domain, key_type, now)?;
    let mut data = BTreeMap::new();
    data.insert("ca-cert.pem".to_string(), ByteString(cert.clone().into_bytes()));
    data.insert("ca-key.pem".to_string(), ByteString(key.into_bytes()));
    data.insert("cert-chain.pem".to_string(), ByteString(Vec::new()));
    data.insert("key.pem".to_string(), ByteString(Vec::new()));
    data.insert("root-cert.pem".to_string(), ByteString(cert.into_bytes()));
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET_NAME.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        type_: Some(CA_SECRET_TYPE.into()),
        data: Some(data),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            tracing::info!(namespace, key_type = %key_type, "created self-signed mesh root in Secret istio-ca-secret");
            read(&created, namespace)
        }
        // Another replica created it first: use theirs.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let s = api.get(CA_SECRET_NAME).await.map_err(api_err)?;
            read(&s, namespace)
        }
        Err(e) => Err(api_err(e)),
    }
}
