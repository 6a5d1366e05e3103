//! RDS for gateways: `http.<port>` for plain HTTP ports and
//! `https.<port>.<portName>.<gateway>.<namespace>` for terminated HTTPS servers, with one virtual
//! host per VirtualService host the port's servers admit, and a `blackhole:<port>` 404 when
//! nothing else claims `*`.
use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
    WeightedCluster, header_matcher, retry_policy, route, route_action, route_match, virtual_host, weighted_cluster,
};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use prost::Message;

use super::{GatewayModel, Server, ServerKind};
use crate::registry::istio::{
    Config, Destination, HttpMatchRequest, HttpRoute, RouteDestination, StringMatch, VirtualServiceSpec,
};
use crate::xds::generators::names;
use crate::xds::push::PushContext;
use crate::xds::resource::{Resource, ResourceSet};
use crate::xds::types;

/// Istio's default retry policy (`pilot/pkg/networking/core/route/retry`).
const DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
const DEFAULT_RETRIES: u32 = 2;

pub(super) fn proto_duration(d: std::time::Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub(super) fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.into(),
        value: m.encode_to_vec(),
    }
}

/// Istio durations (`5s`, `0.5s`, `250ms`); unparsable ones are ignored, as validation would
/// have refused them.
fn parse_duration(s: Option<&str>) -> Option<std::time::Duration> {
    let s = s?;
    match crate::duration::parse(s) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::debug!(value = %s, error = %e, "ignoring an invalid duration in a VirtualService");
            None
        }
    }
}

/// `outbound|<port>|<subset>|<host>` of a route destination: the port from `destination.port`,
/// else the service's only port, else `fallback_port` (gateways pass 0: the route then answers
/// 503, as Envoy does for a cluster it does not know; sidecars pass the listener's port).
pub fn cluster_name(push: &PushContext, d: &Destination, namespace: &str, fallback_port: u16) -> String {
    let host = names::resolve_host(&d.host, namespace);
    let port = d
        .port
        .as_ref()
        .and_then(|p| u16::try_from(p.number).ok())
        .filter(|p| *p != 0)
        .or_else(|| {
            push.snapshot
                .service(&host)
                .and_then(|s| (s.ports.len() == 1).then(|| s.ports[0].port))
        })
        .unwrap_or(fallback_port);
    names::outbound(port, d.subset.as_deref().unwrap_or_default(), &host)
}

/// Destinations with their weights: a single destination takes everything; otherwise weights as
/// given (none given: equal shares), zero weights dropped, repeated clusters merged.
pub fn weighted(
    push: &PushContext,
    dests: &[RouteDestination],
    namespace: &str,
    fallback_port: u16,
) -> Vec<(String, u32)> {
    let any_weight = dests.iter().any(|d| d.weight.is_some_and(|w| w > 0));
    let mut out: Vec<(String, u32)> = Vec::new();
    for d in dests {
        let w = if dests.len() == 1 {
            100
        } else if any_weight {
            d.weight.unwrap_or(0)
        } else {
            1
        };
        if w == 0 {
            continue;
        }
        let name = cluster_name(push, &d.destination, namespace, fallback_port);
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += w,
            None => out.push((name, w)),
        }
    }
    out
}

fn string_matcher(m: &StringMatch) -> Option<StringMatcher> {
    let pattern = if let Some(e) = &m.exact {
        string_matcher::MatchPattern::Exact(e.clone())
    } else if let Some(p) = &m.prefix {
        string_matcher::MatchPattern::Prefix(p.clone())
    } else if let Some(r) = &m.regex {
        string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: r.clone(),
            ..Default::default()
        })
    } else {
        return None;
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ignore_case: false,
    })
}

fn header_matcher(name: &str, m: &StringMatch) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(match string_matcher(m) {
            Some(sm) => header_matcher::HeaderMatchSpecifier::StringMatch(sm),
            // `{}`: the header must be present.
            None => header_matcher::HeaderMatchSpecifier::PresentMatch(true),
        }),
        ..Default::default()
    }
}

fn route_match(m: Option<&HttpMatchRequest>) -> RouteMatch {
    let path = match m.and_then(|m| m.uri.as_ref()) {
        Some(StringMatch { exact: Some(e), .. }) => route_match::PathSpecifier::Path(e.clone()),
        Some(StringMatch { prefix: Some(p), .. }) => route_match::PathSpecifier::Prefix(p.clone()),
        Some(StringMatch { regex: Some(r), .. }) => route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: r.clone(),
            ..Default::default()
        }),
        _ => route_match::PathSpecifier::Prefix("/".into()),
    };
    let mut headers = Vec::new();
    if let Some(m) = m {
        for (name, sm) in &m.headers {
            headers.push(header_matcher(&name.to_ascii_lowercase(), sm));
        }
        if let Some(sm) = &m.method {
            headers.push(header_matcher(":method", sm));
        }
        if let Some(sm) = &m.authority {
            headers.push(header_matcher(":authority", sm));
        }
    }
    RouteMatch {
        path_specifier: Some(path),
        headers,
        ..Default::default()
    }
}

fn previous_hosts() -> retry_policy::RetryHostPredicate {
    retry_policy::RetryHostPredicate {
        name: "envoy.retry_host_predicates.previous_hosts".into(),
        config_type: Some(retry_policy::retry_host_predicate::ConfigType::TypedConfig(any(
            "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
            &PreviousHostsPredicate {},
        ))),
    }
}

/// Istio's retry policy: the default (2 attempts on connect failures and 503) unless the route
/// says otherwise; `attempts: 0` disables retries. Numbers in `retryOn` become retriable status
/// codes.
fn retry_policy(r: Option<&crate::registry::istio::HttpRetry>) -> Option<RetryPolicy> {
    let (attempts, retry_on, per_try) = match r {
        None => (DEFAULT_RETRIES, DEFAULT_RETRY_ON.to_string(), None),
        Some(r) if r.attempts == 0 => return None,
        Some(r) => (
            r.attempts,
            r.retry_on
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_RETRY_ON.into()),
            parse_duration(r.per_try_timeout.as_deref()),
        ),
    };
    let mut conditions: Vec<String> = Vec::new();
    let mut codes: Vec<u32> = Vec::new();
    for part in retry_on.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match part.parse::<u32>() {
            Ok(code) => codes.push(code),
            Err(_) => conditions.push(part.to_string()),
        }
    }
    if !codes.is_empty() && !conditions.iter().any(|c| c == "retriable-status-codes") {
        conditions.push("retriable-status-codes".into());
    }
    if codes.is_empty() && conditions.iter().any(|c| c == "retriable-status-codes") {
        codes.push(503);
    }
    Some(RetryPolicy {
        retry_on: conditions.join(","),
        num_retries: Some(UInt32Value { value: attempts }),
        per_try_timeout: per_try.map(proto_duration),
        retry_host_predicate: vec![previous_hosts()],
        host_selection_retry_max_attempts: 5,
        retriable_status_codes: codes,
        ..Default::default()
    })
}

fn route_action(push: &PushContext, r: &HttpRoute, namespace: &str, fallback_port: u16) -> Option<RouteAction> {
    let dests = weighted(push, &r.route, namespace, fallback_port);
    let cluster = match dests.as_slice() {
        [] => return None,
        [(name, _)] => route_action::ClusterSpecifier::Cluster(name.clone()),
        many => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: many
                .iter()
                .map(|(name, w)| weighted_cluster::ClusterWeight {
                    name: name.clone(),
                    weight: Some(UInt32Value { value: *w }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    let mut action = RouteAction {
        cluster_specifier: Some(cluster),
        // Istio disables Envoy's 15s default: no timeout unless the route sets one.
        timeout: Some(proto_duration(parse_duration(r.timeout.as_deref()).unwrap_or_default())),
        retry_policy: retry_policy(r.retries.as_ref()),
        // gRPC callers' own `grpc-timeout` header is honoured (Istio sets this on every route).
        max_stream_duration: Some(route_action::MaxStreamDuration {
            grpc_timeout_header_max: Some(proto_duration(std::time::Duration::ZERO)),
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(rw) = &r.rewrite {
        if let Some(uri) = rw.uri.as_ref().filter(|u| !u.is_empty()) {
            action.prefix_rewrite = uri.clone();
        }
        if let Some(a) = rw.authority.as_ref().filter(|a| !a.is_empty()) {
            action.host_rewrite_specifier = Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(a.clone()));
        }
    }
    Some(action)
}

/// The routes of one VirtualService for a listener port, one per `match` clause, in order:
/// the one translation of VirtualService HTTP routes, shared by gateways (`fallback_port` 0) and
/// sidecars / proxyless gRPC (`fallback_port` = the service port).
pub fn http_routes(push: &PushContext, vs: &Config<VirtualServiceSpec>, port: u16, fallback_port: u16) -> Vec<Route> {
    let mut out = Vec::new();
    for (i, r) in vs.spec.http.iter().enumerate() {
        let Some(action) = route_action(push, r, &vs.meta.namespace, fallback_port) else {
            tracing::debug!(vs = %format!("{}/{}", vs.meta.namespace, vs.meta.name), route = i, "HTTP route without a destination; skipped");
            continue;
        };
        let matches: Vec<Option<&HttpMatchRequest>> = if r.matches.is_empty() {
            vec![None]
        } else {
            r.matches
                .iter()
                .filter(|m| m.port.is_none_or(|p| p == u32::from(port)))
                .map(Some)
                .collect()
        };
        let name = r
            .name
            .clone()
            .unwrap_or_else(|| format!("{}.{}.{i}", vs.meta.namespace, vs.meta.name));
        for m in matches {
            out.push(Route {
                name: name.clone(),
                r#match: Some(route_match(m)),
                action: Some(route::Action::Route(action.clone())),
                ..Default::default()
            });
        }
    }
    out
}

fn blackhole(port: u16) -> VirtualHost {
    VirtualHost {
        name: format!("blackhole:{port}"),
        domains: vec!["*".into()],
        routes: vec![Route {
            name: "default".into(),
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                ..Default::default()
            }),
            action: Some(route::Action::DirectResponse(DirectResponseAction {
                status: 404,
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// One route configuration for `servers` (all on `port`): a virtual host per served domain,
/// VirtualServices' routes appended in config order.
pub fn route_config(
    push: &PushContext,
    model: &GatewayModel<'_>,
    name: &str,
    servers: &[&Server<'_>],
    port: u16,
) -> RouteConfiguration {
    let mut vhosts: BTreeMap<String, Vec<Route>> = BTreeMap::new();
    let mut redirect: BTreeSet<String> = BTreeSet::new();
    let mut seen: BTreeSet<(String, String, String)> = BTreeSet::new();
    for server in servers {
        let https_redirect = server.server.tls.as_ref().is_some_and(|t| t.https_redirect);
        for vs in model.bound(server) {
            for domain in vs.spec.hosts.iter().flat_map(|h| server.serves(h, &vs.meta.namespace)) {
                if https_redirect {
                    redirect.insert(domain.clone());
                }
                let routes = vhosts.entry(domain.clone()).or_default();
                if seen.insert((domain, vs.meta.namespace.clone(), vs.meta.name.clone())) {
                    routes.extend(http_routes(push, vs, port, 0));
                }
            }
        }
    }
    let mut virtual_hosts: Vec<VirtualHost> = vhosts
        .into_iter()
        .map(|(domain, routes)| VirtualHost {
            name: format!("{domain}:{port}"),
            require_tls: if redirect.contains(&domain) {
                virtual_host::TlsRequirementType::All as i32
            } else {
                virtual_host::TlsRequirementType::None as i32
            },
            domains: vec![domain],
            routes,
            ..Default::default()
        })
        .collect();
    if !virtual_hosts.iter().any(|v| v.domains.iter().any(|d| d == "*")) {
        virtual_hosts.push(blackhole(port));
    }
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        validate_clusters: Some(envoy_types::pb::google::protobuf::BoolValue { value: false }),
        ..Default::default()
    }
}

pub fn generate(push: &PushContext, model: &GatewayModel<'_>) -> ResourceSet {
    let mut out = ResourceSet::new();
    let mut add = |rc: RouteConfiguration| {
        let r = Resource::new(&rc.name, types::ROUTE, &rc);
        out.insert(rc.name.clone(), std::sync::Arc::new(r));
    };
    for ps in model.ports.values() {
        match ps.kind() {
            ServerKind::Http => {
                let servers: Vec<&Server<'_>> = ps.servers.iter().collect();
                add(route_config(push, model, &ps.http_route_name(), &servers, ps.port));
            }
            ServerKind::HttpsTerminate | ServerKind::Passthrough | ServerKind::AutoPassthrough => {
                for s in ps.servers.iter().filter(|s| s.kind == ServerKind::HttpsTerminate) {
                    add(route_config(push, model, &s.https_route_name(), &[s], ps.port));
                }
            }
            ServerKind::Tcp => {}
        }
    }
    out
}
