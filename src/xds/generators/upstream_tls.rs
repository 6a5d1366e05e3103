//! Client TLS of a cluster from its DestinationRule (`trafficPolicy.tls`, a subset's policy
//! overriding the rule's): `DISABLE` → plaintext; `SIMPLE` → TLS with SNI (`tls.sni`, else the
//! host); `ISTIO_MUTUAL` → the workload certificate `default` and roots `ROOTCA` over SDS from the
//! `sds-grpc` cluster istio-agent provides, SANs the SPIFFE ids behind the service, and Istio's
//! SNI `outbound_.<port>_.<subset>_.<host>`.
use envoy_types::pb::envoy::config::core::v3::{
    ApiConfigSource, ApiVersion, ConfigSource, GrpcService, TransportSocket, api_config_source, config_source,
    grpc_service, transport_socket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SdsSecretConfig, SubjectAltNameMatcher, UpstreamTlsContext,
    common_tls_context, subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use prost::Message;

use crate::registry::istio::{ClientTls, DestinationRuleSpec};
use crate::registry::model::{Service, service_accounts};
use crate::xds::push::PushContext;

/// istio-agent's SDS cluster and resource names (reference §5.5).
pub const SDS_CLUSTER: &str = "sds-grpc";
pub const WORKLOAD_CERT: &str = "default";
pub const ROOT_CA: &str = "ROOTCA";

/// The TLS settings that apply to `subset` (empty: the default subset).
pub fn client_tls<'a>(dr: &'a DestinationRuleSpec, subset: &str) -> Option<&'a ClientTls> {
    let sub = dr
        .subsets
        .iter()
        .find(|s| !subset.is_empty() && s.name == subset)
        .and_then(|s| s.traffic_policy.as_ref())
        .and_then(|p| p.tls.as_ref());
    sub.or_else(|| dr.traffic_policy.as_ref().and_then(|p| p.tls.as_ref()))
}

/// istio-agent's SDS server, through the `sds-grpc` cluster of the bootstrap; certificates are
/// awaited, not skipped (`initial_fetch_timeout: 0`), as Istio configures it.
pub(crate) fn sds_grpc() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::ApiConfigSource(ApiConfigSource {
            api_type: api_config_source::ApiType::Grpc as i32,
            transport_api_version: ApiVersion::V3 as i32,
            grpc_services: vec![GrpcService {
                target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc {
                    cluster_name: SDS_CLUSTER.into(),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            set_node_on_first_message_only: true,
            ..Default::default()
        })),
        initial_fetch_timeout: Some(envoy_types::pb::google::protobuf::Duration::default()),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

pub(crate) fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.into(),
        sds_config: Some(sds_grpc()),
    }
}

fn uri_sans(sans: impl IntoIterator<Item = String>) -> Vec<SubjectAltNameMatcher> {
    sans.into_iter()
        .map(|s| SubjectAltNameMatcher {
            san_type: subject_alt_name_matcher::SanType::Uri as i32,
            matcher: Some(StringMatcher {
                match_pattern: Some(string_matcher::MatchPattern::Exact(s)),
                ignore_case: false,
            }),
            ..Default::default()
        })
        .collect()
}

fn socket(ctx: &UpstreamTlsContext) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".into(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(
            envoy_types::pb::google::protobuf::Any {
                type_url: "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext".into(),
                value: ctx.encode_to_vec(),
            },
        )),
    }
}

/// The transport socket of cluster `outbound|port|subset|host`, or `None` for plaintext.
pub fn transport_socket(
    push: &PushContext,
    svc: &Service,
    port: u16,
    subset: &str,
    dr: &DestinationRuleSpec,
) -> Option<TransportSocket> {
    let tls = client_tls(dr, subset)?;
    let mode = tls.mode.as_deref().unwrap_or("DISABLE").to_ascii_uppercase();
    match mode.as_str() {
        "SIMPLE" => {
            let ctx = UpstreamTlsContext {
                sni: tls
                    .sni
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| svc.hostname.clone()),
                common_tls_context: Some(CommonTlsContext {
                    validation_context_type: (!tls.subject_alt_names.is_empty()).then(|| {
                        common_tls_context::ValidationContextType::ValidationContext(CertificateValidationContext {
                            match_typed_subject_alt_names: uri_sans(tls.subject_alt_names.iter().cloned()),
                            ..Default::default()
                        })
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            Some(socket(&ctx))
        }
        "ISTIO_MUTUAL" => {
            let sans: Vec<String> = if tls.subject_alt_names.is_empty() {
                service_accounts(push.snapshot.endpoints(&svc.hostname))
                    .into_iter()
                    .collect()
            } else {
                tls.subject_alt_names.clone()
            };
            let ctx = UpstreamTlsContext {
                sni: tls
                    .sni
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| super::names::sni_dnat(port, subset, &svc.hostname)),
                common_tls_context: Some(CommonTlsContext {
                    tls_certificate_sds_secret_configs: vec![sds(WORKLOAD_CERT)],
                    validation_context_type: Some(
                        common_tls_context::ValidationContextType::CombinedValidationContext(
                            common_tls_context::CombinedCertificateValidationContext {
                                default_validation_context: Some(CertificateValidationContext {
                                    match_typed_subject_alt_names: uri_sans(sans),
                                    ..Default::default()
                                }),
                                validation_context_sds_secret_config: Some(sds(ROOT_CA)),
                                ..Default::default()
                            },
                        ),
                    ),
                    alpn_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
                    ..Default::default()
                }),
                ..Default::default()
            };
            Some(socket(&ctx))
        }
        "DISABLE" => None,
        other => {
            tracing::debug!(host = %svc.hostname, mode = other, "DestinationRule TLS mode not supported; cluster stays plaintext");
            None
        }
    }
}
