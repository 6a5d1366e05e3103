//! Validation of Istio networking config (`/validate`): `networking.istio.io` Gateway,
//! VirtualService and DestinationRule, decoded with the registry's own types
//! (`crate::registry::istio`) so what is admitted is what meshd can serve. A denial names every
//! bad field, e.g. `spec.http[0].route[1].weight: weights must sum to 100, got 90`. Other kinds
//! and groups, and deletions, are allowed untouched.
use std::collections::{BTreeMap, BTreeSet};

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use serde_json::Value;

use crate::registry::convert::ConfigKind;
use crate::registry::istio::{
    ClientTls, DestinationRuleSpec, GROUP, GatewaySpec, HttpRoute, RouteDestination, ServerTls, TrafficPolicy,
    VirtualServiceSpec,
};

/// Istio's `galley_validation_failed` reasons.
pub const REASON_INVALID: &str = "invalid_resource";
pub const REASON_DECODE: &str = "crd_conversion_error";

/// Gateway port protocols Istio understands (`protocol.Parse`), upper-cased.
const PROTOCOLS: [&str; 12] = [
    "HTTP",
    "HTTPS",
    "GRPC",
    "GRPC-WEB",
    "HTTP2",
    "HTTP_PROXY",
    "MONGO",
    "REDIS",
    "MYSQL",
    "TCP",
    "TLS",
    "UDP",
];
const SERVER_TLS_MODES: [&str; 6] = [
    "PASSTHROUGH",
    "SIMPLE",
    "MUTUAL",
    "AUTO_PASSTHROUGH",
    "ISTIO_MUTUAL",
    "OPTIONAL_MUTUAL",
];
const CLIENT_TLS_MODES: [&str; 4] = ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"];

/// One invalid field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path in the object, e.g. `spec.servers[0].port.number`.
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Why an object was refused.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("configuration is invalid: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
    #[error("configuration is invalid: spec: cannot decode {kind}: {source}")]
    Decode {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the admission request carries no object")]
    NoObject,
}

impl ValidationError {
    /// The `reason` label of `galley_validation_failed`.
    pub fn reason(&self) -> &'static str {
        match self {
            ValidationError::Invalid(_) => REASON_INVALID,
            ValidationError::Decode { .. } | ValidationError::NoObject => REASON_DECODE,
        }
    }
}

/// What one request did, for the metrics.
#[derive(Debug)]
pub enum Outcome {
    /// Not an object meshd validates (other group or kind, or a delete).
    Ignored,
    Passed,
    Failed(ValidationError),
}

/// Answers one `/validate` request.
pub fn review(req: &AdmissionRequest<DynamicObject>) -> (AdmissionResponse, Outcome) {
    let allowed = AdmissionResponse::from(req);
    if req.kind.group != GROUP || !matches!(req.operation, Operation::Create | Operation::Update) {
        return (allowed, Outcome::Ignored);
    }
    let Some(kind) = ConfigKind::ALL.into_iter().find(|k| k.kind() == req.kind.kind) else {
        return (allowed, Outcome::Ignored);
    };
    let result = match &req.object {
        Some(obj) => validate(kind, obj.data.get("spec")),
        None => Err(ValidationError::NoObject),
    };
    match result {
        Ok(()) => (allowed, Outcome::Passed),
        Err(e) => (allowed.deny(&e), Outcome::Failed(e)),
    }
}

/// Validates an object's `spec` (a missing spec is an empty one).
pub fn validate(kind: ConfigKind, spec: Option<&Value>) -> Result<(), ValidationError> {
    let empty = Value::Object(Default::default());
    let raw = spec.unwrap_or(&empty);
    let decode = |source| ValidationError::Decode {
        kind: kind.kind(),
        source,
    };
    let errors = match kind {
        ConfigKind::Gateway => gateway(&serde_json::from_value(raw.clone()).map_err(decode)?, raw),
        ConfigKind::VirtualService => virtual_service(&serde_json::from_value(raw.clone()).map_err(decode)?, raw),
        ConfigKind::DestinationRule => destination_rule(&serde_json::from_value(raw.clone()).map_err(decode)?, raw),
    };
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationError::Invalid(errors))
    }
}

fn has(raw: &Value, pointer: &str) -> bool {
    raw.pointer(pointer).is_some_and(|v| !v.is_null() && v != "")
}

/// A `networking.istio.io` Gateway.
pub fn gateway(spec: &GatewaySpec, raw: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if spec.servers.is_empty() {
        errs.push(err("spec.servers", "gateway must have at least one server"));
    }
    for (i, s) in spec.servers.iter().enumerate() {
        let at = format!("spec.servers[{i}]");
        if !(1..=65535).contains(&s.port.number) {
            errs.push(err(
                format!("{at}.port.number"),
                format!("port number {} must be in 1-65535", s.port.number),
            ));
        }
        let protocol = s.port.protocol.to_ascii_uppercase();
        if protocol.is_empty() {
            errs.push(err(format!("{at}.port.protocol"), "protocol is required"));
        } else if !PROTOCOLS.contains(&protocol.as_str()) {
            errs.push(err(
                format!("{at}.port.protocol"),
                format!(
                    "unsupported protocol {:?}; expected one of {}",
                    s.port.protocol,
                    PROTOCOLS.join(", ")
                ),
            ));
        }
        if s.hosts.is_empty() {
            errs.push(err(format!("{at}.hosts"), "server must have at least one host"));
        }
        for (j, h) in s.hosts.iter().enumerate() {
            if let Err(m) = gateway_host(h) {
                errs.push(err(format!("{at}.hosts[{j}]"), m));
            }
        }
        match &s.tls {
            None if matches!(protocol.as_str(), "HTTPS" | "TLS") => errs.push(err(
                format!("{at}.tls"),
                format!("server with protocol {protocol} must have TLS settings"),
            )),
            None => {}
            Some(tls) => server_tls(tls, &raw["servers"][i]["tls"], &format!("{at}.tls"), &mut errs),
        }
    }
    errs
}

fn server_tls(tls: &ServerTls, raw: &Value, at: &str, errs: &mut Vec<FieldError>) {
    // PASSTHROUGH is the protobuf default.
    let mode = tls.mode.as_deref().unwrap_or("PASSTHROUGH");
    if !SERVER_TLS_MODES.contains(&mode) {
        errs.push(err(
            format!("{at}.mode"),
            format!(
                "unknown TLS mode {mode:?}; expected one of {}",
                SERVER_TLS_MODES.join(", ")
            ),
        ));
        return;
    }
    let credential = tls.credential_name.as_deref().is_some_and(|c| !c.is_empty()) || has(raw, "/credentialNames/0");
    if matches!(mode, "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL") && !credential {
        if !has(raw, "/serverCertificate") || !has(raw, "/privateKey") {
            errs.push(err(
                format!("{at}.credentialName"),
                format!("{mode} TLS requires credentialName, or serverCertificate and privateKey"),
            ));
        }
        if mode != "SIMPLE" && !has(raw, "/caCertificates") {
            errs.push(err(
                format!("{at}.caCertificates"),
                format!("{mode} TLS without credentialName requires caCertificates"),
            ));
        }
    }
}

fn dns_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// A host as VirtualService and Gateway name them: `*`, `*.example.com`, a DNS name or an IP.
fn host_name(h: &str) -> Result<(), String> {
    if h.is_empty() {
        return Err("host must not be empty".into());
    }
    if h == "*" || h.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let rest = h.strip_prefix("*.").unwrap_or(h);
    if h.len() > 255 || !rest.split('.').all(dns_label) {
        return Err(format!(
            "invalid host {h:?}: expected a DNS name, optionally prefixed by \"*.\""
        ));
    }
    Ok(())
}

/// `[namespace/]host`, namespace `.`, `*` or a DNS label.
fn gateway_host(h: &str) -> Result<(), String> {
    match h.split_once('/') {
        Some((ns, host)) => {
            if !(ns == "." || ns == "*" || dns_label(ns)) {
                return Err(format!("invalid namespace {ns:?} in host {h:?}"));
            }
            host_name(host)
        }
        None => host_name(h),
    }
}

/// Istio's `ValidateDuration`: a duration with a unit, at least 1ms.
fn duration(d: &str) -> Result<(), String> {
    let t = d.trim();
    if t.parse::<f64>().is_ok() {
        return Err(format!(
            "invalid duration {d:?}: a unit is required (e.g. 500ms, 5s, 1m)"
        ));
    }
    let v = crate::duration::parse(t).map_err(|e| format!("invalid duration {d:?}: {e}"))?;
    if v < std::time::Duration::from_millis(1) {
        return Err(format!("invalid duration {d:?}: must be at least 1ms"));
    }
    Ok(())
}

fn destinations(route: &[RouteDestination], at: &str, errs: &mut Vec<FieldError>) {
    for (j, r) in route.iter().enumerate() {
        let d = &r.destination;
        if d.host.is_empty() {
            errs.push(err(
                format!("{at}[{j}].destination.host"),
                "destination host is required",
            ));
        } else if let Err(m) = host_name(&d.host) {
            errs.push(err(format!("{at}[{j}].destination.host"), m));
        }
        if let Some(p) = &d.port
            && !(1..=65535).contains(&p.number)
        {
            errs.push(err(
                format!("{at}[{j}].destination.port.number"),
                format!("port number {} must be in 1-65535", p.number),
            ));
        }
        if let Some(s) = &d.subset
            && !dns_label(s)
        {
            errs.push(err(
                format!("{at}[{j}].destination.subset"),
                format!("invalid subset name {s:?}"),
            ));
        }
    }
    if route.len() > 1 {
        let total: u64 = route.iter().map(|r| u64::from(r.weight.unwrap_or(0))).sum();
        if total != 100 {
            errs.push(err(
                format!("{at}[{}].weight", route.len() - 1),
                format!("weights must sum to 100, got {total}"),
            ));
        }
    }
}

fn http_route(r: &HttpRoute, raw: &Value, at: &str, errs: &mut Vec<FieldError>) {
    let other_action = has(raw, "/redirect") || has(raw, "/directResponse") || has(raw, "/delegate");
    if r.route.is_empty() && !other_action {
        errs.push(err(
            format!("{at}.route"),
            "HTTP route, redirect or direct response is required",
        ));
    }
    destinations(&r.route, &format!("{at}.route"), errs);
    if let Some(t) = &r.timeout
        && let Err(m) = duration(t)
    {
        errs.push(err(format!("{at}.timeout"), m));
    }
    if let Some(t) = r.retries.as_ref().and_then(|x| x.per_try_timeout.as_ref())
        && let Err(m) = duration(t)
    {
        errs.push(err(format!("{at}.retries.perTryTimeout"), m));
    }
    for (k, m) in r.matches.iter().enumerate() {
        if let Some(p) = m.port
            && !(1..=65535).contains(&p)
        {
            errs.push(err(
                format!("{at}.match[{k}].port"),
                format!("port number {p} must be in 1-65535"),
            ));
        }
    }
}

/// A `networking.istio.io` VirtualService.
pub fn virtual_service(spec: &VirtualServiceSpec, raw: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if spec.hosts.is_empty() {
        errs.push(err("spec.hosts", "virtual service must have at least one host"));
    }
    let mesh_bound = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
    for (i, h) in spec.hosts.iter().enumerate() {
        if h == "*" && mesh_bound {
            errs.push(err(
                format!("spec.hosts[{i}]"),
                "wildcard host * is not allowed for virtual services bound to the mesh gateway",
            ));
        } else if let Err(m) = host_name(h) {
            errs.push(err(format!("spec.hosts[{i}]"), m));
        }
    }
    if spec.http.is_empty() && spec.tcp.is_empty() && spec.tls.is_empty() {
        errs.push(err("spec", "http, tcp or tls must be provided in virtual service"));
    }
    for (i, r) in spec.http.iter().enumerate() {
        http_route(r, &raw["http"][i], &format!("spec.http[{i}]"), &mut errs);
    }
    for (i, r) in spec.tcp.iter().enumerate() {
        if r.route.is_empty() {
            errs.push(err(format!("spec.tcp[{i}].route"), "TCP route is required"));
        }
        destinations(&r.route, &format!("spec.tcp[{i}].route"), &mut errs);
    }
    for (i, r) in spec.tls.iter().enumerate() {
        if r.matches.is_empty() {
            errs.push(err(
                format!("spec.tls[{i}].match"),
                "TLS route must have at least one match condition",
            ));
        }
        for (k, m) in r.matches.iter().enumerate() {
            if m.sni_hosts.is_empty() {
                errs.push(err(
                    format!("spec.tls[{i}].match[{k}].sniHosts"),
                    "TLS match must have at least one SNI host",
                ));
            }
        }
        if r.route.is_empty() {
            errs.push(err(format!("spec.tls[{i}].route"), "TLS route is required"));
        }
        destinations(&r.route, &format!("spec.tls[{i}].route"), &mut errs);
    }
    errs
}

fn client_tls(tls: &ClientTls, raw: &Value, at: &str, errs: &mut Vec<FieldError>) {
    let mode = tls.mode.as_deref().unwrap_or("DISABLE");
    if !CLIENT_TLS_MODES.contains(&mode) {
        errs.push(err(
            format!("{at}.mode"),
            format!(
                "unknown TLS mode {mode:?}; expected one of {}",
                CLIENT_TLS_MODES.join(", ")
            ),
        ));
        return;
    }
    if mode == "MUTUAL" && tls.credential_name.as_deref().is_none_or(str::is_empty) {
        if !has(raw, "/clientCertificate") {
            errs.push(err(
                format!("{at}.clientCertificate"),
                "MUTUAL TLS without credentialName requires clientCertificate",
            ));
        }
        if !has(raw, "/privateKey") {
            errs.push(err(
                format!("{at}.privateKey"),
                "MUTUAL TLS without credentialName requires privateKey",
            ));
        }
    }
}

fn traffic_policy(p: &TrafficPolicy, raw: &Value, at: &str, errs: &mut Vec<FieldError>) {
    if let Some(tls) = &p.tls {
        client_tls(tls, &raw["tls"], &format!("{at}.tls"), errs);
    }
}

/// A Kubernetes label key: `[prefix/]name`.
fn label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(dns_label)) && label_value(name) && !name.is_empty()
}

/// A Kubernetes label value (may be empty).
fn label_value(v: &str) -> bool {
    v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && v.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

fn labels(l: &BTreeMap<String, String>, at: &str, errs: &mut Vec<FieldError>) {
    for (k, v) in l {
        if !label_key(k) {
            errs.push(err(at, format!("invalid label key {k:?}")));
        } else if !label_value(v) {
            errs.push(err(format!("{at}.{k}"), format!("invalid label value {v:?}")));
        }
    }
}

/// A `networking.istio.io` DestinationRule.
pub fn destination_rule(spec: &DestinationRuleSpec, raw: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    if spec.host.is_empty() {
        errs.push(err("spec.host", "host is required"));
    } else if let Err(m) = host_name(&spec.host) {
        errs.push(err("spec.host", m));
    }
    if let Some(p) = &spec.traffic_policy {
        traffic_policy(p, &raw["trafficPolicy"], "spec.trafficPolicy", &mut errs);
    }
    let mut seen = BTreeSet::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let at = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            errs.push(err(format!("{at}.name"), "subset name is required"));
        } else if !dns_label(&s.name) {
            errs.push(err(
                format!("{at}.name"),
                format!("invalid subset name {:?}: expected a DNS label", s.name),
            ));
        } else if !seen.insert(s.name.as_str()) {
            errs.push(err(format!("{at}.name"), format!("duplicate subset name {:?}", s.name)));
        }
        labels(&s.labels, &format!("{at}.labels"), &mut errs);
        if let Some(p) = &s.traffic_policy {
            traffic_policy(
                p,
                &raw["subsets"][i]["trafficPolicy"],
                &format!("{at}.trafficPolicy"),
                &mut errs,
            );
        }
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(kind: ConfigKind, spec: Value) -> Result<(), String> {
        validate(kind, Some(&spec)).map_err(|e| e.to_string())
    }

    #[test]
    fn valid_objects_pass() {
        check(
            ConfigKind::Gateway,
            json!({"selector": {"istio": "ingressgateway"}, "servers": [
                {"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["ns1/*.example.com"],
                 "tls": {"mode": "SIMPLE", "credentialName": "cert"}},
                {"port": {"number": 80, "name": "http", "protocol": "http"}, "hosts": ["*"], "tls": {"httpsRedirect": true}}]}),
        )
        .unwrap();
        check(
            ConfigKind::VirtualService,
            json!({"hosts": ["reviews"], "http": [
                {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 75},
                           {"destination": {"host": "reviews", "subset": "v2"}, "weight": 25}],
                 "timeout": "1.5s", "retries": {"attempts": 3, "perTryTimeout": "500ms"}},
                {"redirect": {"uri": "/new"}}]}),
        )
        .unwrap();
        check(
            ConfigKind::DestinationRule,
            json!({"host": "reviews.default.svc.cluster.local", "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}},
                   "subsets": [{"name": "v1", "labels": {"version": "v1", "app.kubernetes.io/name": "r"}}]}),
        )
        .unwrap();
    }

    #[test]
    fn denials_name_the_field() {
        let cases = [
            (
                ConfigKind::Gateway,
                json!({"servers": [{"port": {"number": 70000, "protocol": "HTTP"}, "hosts": ["a.com"]}]}),
                "spec.servers[0].port.number: port number 70000 must be in 1-65535",
            ),
            (
                ConfigKind::Gateway,
                json!({"servers": [{"port": {"number": 80, "protocol": "FTP"}, "hosts": ["a.com"]}]}),
                "spec.servers[0].port.protocol: unsupported protocol \"FTP\"",
            ),
            (
                ConfigKind::Gateway,
                json!({"servers": [{"port": {"number": 443, "protocol": "HTTPS"}, "hosts": ["a.com"], "tls": {"mode": "SIMPLE"}}]}),
                "spec.servers[0].tls.credentialName: SIMPLE TLS requires credentialName",
            ),
            (
                ConfigKind::Gateway,
                json!({"servers": [{"port": {"number": 80, "protocol": "HTTP"}, "hosts": []}]}),
                "spec.servers[0].hosts: server must have at least one host",
            ),
            (
                ConfigKind::Gateway,
                json!({"servers": []}),
                "spec.servers: gateway must have at least one server",
            ),
            (
                ConfigKind::VirtualService,
                json!({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}, "weight": 60},
                    {"destination": {"host": "r"}, "weight": 30}]}]}),
                "spec.http[0].route[1].weight: weights must sum to 100, got 90",
            ),
            (
                ConfigKind::VirtualService,
                json!({"hosts": ["r"], "http": [{"route": [{"destination": {"host": ""}}]}]}),
                "spec.http[0].route[0].destination.host: destination host is required",
            ),
            (
                ConfigKind::VirtualService,
                json!({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}], "timeout": "soon"}]}),
                "spec.http[0].timeout: invalid duration \"soon\"",
            ),
            (
                ConfigKind::VirtualService,
                json!({"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}], "retries": {"attempts": 2, "perTryTimeout": "5"}}]}),
                "spec.http[0].retries.perTryTimeout: invalid duration \"5\": a unit is required",
            ),
            (
                ConfigKind::VirtualService,
                json!({"http": [{"route": [{"destination": {"host": "r"}}]}]}),
                "spec.hosts: virtual service must have at least one host",
            ),
            (
                ConfigKind::DestinationRule,
                json!({"subsets": []}),
                "spec.host: host is required",
            ),
            (
                ConfigKind::DestinationRule,
                json!({"host": "r", "subsets": [{"name": "v1"}, {"name": "v1"}]}),
                "spec.subsets[1].name: duplicate subset name \"v1\"",
            ),
            (
                ConfigKind::DestinationRule,
                json!({"host": "r", "subsets": [{"name": "v1", "trafficPolicy": {"tls": {"mode": "STRICT"}}}]}),
                "spec.subsets[0].trafficPolicy.tls.mode: unknown TLS mode \"STRICT\"",
            ),
            (
                ConfigKind::DestinationRule,
                json!({"host": "r", "subsets": [{"name": "v1", "labels": {"bad key!": "x"}}]}),
                "spec.subsets[0].labels: invalid label key \"bad key!\"",
            ),
            (
                ConfigKind::DestinationRule,
                json!({"host": "r", "trafficPolicy": {"tls": {"mode": "MUTUAL"}}}),
                "spec.trafficPolicy.tls.clientCertificate: MUTUAL TLS without credentialName requires clientCertificate",
            ),
        ];
        for (kind, spec, want) in cases {
            let got = check(kind, spec.clone()).expect_err(&format!("{spec} is invalid"));
            assert!(
                got.starts_with("configuration is invalid: ") && got.contains(want),
                "{got:?} should contain {want:?}"
            );
        }
    }

    #[test]
    fn undecodable_spec_is_denied() {
        let e = validate(ConfigKind::VirtualService, Some(&json!({"hosts": "not-a-list"}))).unwrap_err();
        assert_eq!(e.reason(), REASON_DECODE);
        assert!(e.to_string().contains("cannot decode VirtualService"), "{e}");
    }

    #[test]
    fn durations() {
        assert!(duration("1s").is_ok() && duration("100ms").is_ok() && duration("1m30s").is_ok());
        assert!(duration("0s").is_err() && duration("10").is_err() && duration("x").is_err());
    }
}
