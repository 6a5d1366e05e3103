//! SDS for gateways: `kubernetes://<credentialName>` (certificate and key) and
//! `kubernetes://<credentialName>-cacert` (client CA of `MUTUAL` servers), read from the Secret
//! of that name in the proxy's own namespace and cluster (reference §5.6). The server sends
//! secrets only on authenticated streams.
use std::collections::BTreeSet;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};

use super::listener::credential_resource;
use super::{GatewayModel, ServerKind};
use crate::xds::node::ProxyInfo;
use crate::xds::push::PushContext;
use crate::xds::resource::{Resource, ResourceSet};
use crate::xds::types;

fn inline(bytes: &[u8]) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    })
}

pub fn generate(push: &PushContext, proxy: &ProxyInfo, model: &GatewayModel<'_>) -> ResourceSet {
    let credentials: BTreeSet<&str> = model
        .ports
        .values()
        .flat_map(|p| p.servers.iter())
        .filter(|s| s.kind == ServerKind::HttpsTerminate)
        .filter_map(|s| s.credential_name())
        .collect();
    let mut out = ResourceSet::new();
    let (cluster, ns) = (proxy.cluster_id.as_str(), proxy.namespace.as_str());
    for cred in credentials {
        let found = push.secrets.get(cluster, ns, cred);
        if found.is_none() {
            tracing::debug!(
                cluster,
                namespace = ns,
                credential = cred,
                "gateway credential not found"
            );
        }
        if let Some(s) = found.as_ref().filter(|s| s.has_key_pair()) {
            let name = credential_resource(cred);
            let msg = Secret {
                name: name.clone(),
                r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                    certificate_chain: inline(&s.cert_chain),
                    private_key: inline(&s.private_key),
                    ..Default::default()
                })),
            };
            out.insert(name.clone(), Arc::new(Resource::new(&name, types::SECRET, &msg)));
        }
        // The client CA: the Secret's own ca.crt, else a separate `<name>-cacert` Secret.
        let ca = found.and_then(|s| s.ca_cert).or_else(|| {
            push.secrets
                .get(cluster, ns, &format!("{cred}-cacert"))
                .and_then(|s| s.ca_cert.or_else(|| (!s.cert_chain.is_empty()).then_some(s.cert_chain)))
        });
        if let Some(ca) = ca {
            let name = credential_resource(&format!("{cred}-cacert"));
            let msg = Secret {
                name: name.clone(),
                r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
                    trusted_ca: inline(&ca),
                    ..Default::default()
                })),
            };
            out.insert(name.clone(), Arc::new(Resource::new(&name, types::SECRET, &msg)));
        }
    }
    out
}
