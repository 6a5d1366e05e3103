//! Gateways (`router` proxies): LDS, RDS and SDS from Istio Gateway and VirtualService config.
//!
//! A gateway proxy gets the servers of every Gateway whose `selector` matches its labels (in any
//! namespace, Istio's default), merged by bind address and port:
//! - plain HTTP servers of a port share one listener `0.0.0.0_<port>` and one route
//!   configuration `http.<port>`;
//! - TLS servers (HTTPS / TLS) of a port share one listener whose filter chains are picked by
//!   SNI: terminated HTTPS (`SIMPLE`/`MUTUAL` with a `credentialName`, certificate over SDS as
//!   `kubernetes://<name>`) gets its own route configuration
//!   `https.<port>.<portName>.<gateway>.<namespace>`; `PASSTHROUGH` servers get one chain per
//!   VirtualService `tls` route, proxying TCP to the route's destination;
//! - TCP servers proxy to the first matching VirtualService `tcp` route.
//!
//! Everything here depends only on the config snapshot and the proxy's labels, namespace and
//! cluster, so it is generated once per class of proxies ([`class_key`]) and shared.

pub mod listener;
pub mod route;
pub mod sds;
pub mod secrets;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use secrets::{KubeSecrets, NoSecrets, SecretSource, StaticSecrets, TlsSecret};

use crate::registry::istio::{Config, GatewayServer, GatewaySpec, VirtualServiceSpec};
use crate::xds::node::ProxyInfo;
use crate::xds::push::PushContext;
use crate::xds::resource::ResourceSet;
use crate::xds::types;

/// Proxies with the same labels, namespace and cluster get the same gateway configuration.
pub fn class_key(proxy: &ProxyInfo) -> String {
    let labels: Vec<String> = proxy.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("router|{}|{}|{}", proxy.cluster_id, proxy.namespace, labels.join(","))
}

/// A gateway's CDS: every proxy's outbound clusters, plus, for an east-west gateway
/// (AUTO_PASSTHROUGH servers), one plaintext SNI-DNAT cluster per service port and subset its
/// servers cover, named like the SNI it forwards (`outbound_.port_.subset_.host`).
pub fn clusters(push: &PushContext, proxy: &ProxyInfo) -> Arc<ResourceSet> {
    let base_key = super::cds::class_key(proxy);
    let base = push.cached(types::CLUSTER, base_key.clone(), || super::cds::generate(push, proxy));
    let hosts = GatewayModel::build(push, proxy).auto_passthrough_hosts();
    if hosts.is_empty() {
        return base;
    }
    let sig: Vec<String> = hosts.iter().map(|h| format!("{}/{}", h.namespace, h.host)).collect();
    push.cached(types::CLUSTER, format!("{base_key}|sni-dnat|{}", sig.join(",")), || {
        let mut out = (*base).clone();
        for svc in push.snapshot.services.values() {
            if hosts.iter().any(|h| h.covers_service(svc)) {
                super::cds::sni_dnat_clusters(push, svc, &mut out);
            }
        }
        out
    })
}

/// LDS, RDS and SDS for a gateway; other types are not generated here.
pub fn generate(push: &PushContext, proxy: &ProxyInfo, type_url: &str) -> Arc<ResourceSet> {
    let key = class_key(proxy);
    match type_url {
        types::LISTENER => push.cached(type_url, key, || {
            listener::generate(push, &GatewayModel::build(push, proxy))
        }),
        types::ROUTE => push.cached(type_url, key, || {
            route::generate(push, &GatewayModel::build(push, proxy))
        }),
        types::SECRET => push.cached(type_url, key, || {
            sds::generate(push, proxy, &GatewayModel::build(push, proxy))
        }),
        _ => Arc::new(ResourceSet::new()),
    }
}

/// How a server's traffic is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// Plain HTTP (HTTP, HTTP2, GRPC): HTTP connection manager, routes from `http`.
    Http,
    /// HTTPS terminated at the gateway (`SIMPLE` / `MUTUAL`), then `http` routes.
    HttpsTerminate,
    /// TLS forwarded untouched, picked by SNI from `tls` routes.
    Passthrough,
    /// An east-west gateway's mesh port: Istio mTLS forwarded untouched to the cluster its SNI
    /// `outbound_.port_.subset_.host` names (`tls.mode: AUTO_PASSTHROUGH`).
    AutoPassthrough,
    /// Opaque TCP, `tcp` routes.
    Tcp,
}

impl ServerKind {
    /// Servers of one port must agree on this.
    fn port_class(self) -> u8 {
        match self {
            ServerKind::Http => 0,
            ServerKind::HttpsTerminate | ServerKind::Passthrough | ServerKind::AutoPassthrough => 1,
            ServerKind::Tcp => 2,
        }
    }
}

/// A server host `[namespace/]dnsName`: which VirtualService namespaces may bind to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHost {
    /// `*` for any namespace.
    pub namespace: String,
    pub host: String,
}

impl ServerHost {
    fn parse(s: &str, gateway_ns: &str) -> Self {
        match s.split_once('/') {
            Some((".", h)) => Self {
                namespace: gateway_ns.into(),
                host: h.into(),
            },
            Some((ns, h)) => Self {
                namespace: ns.into(),
                host: h.into(),
            },
            None => Self {
                namespace: "*".into(),
                host: s.into(),
            },
        }
    }

    fn admits(&self, vs_namespace: &str) -> bool {
        self.namespace == "*" || self.namespace == vs_namespace
    }

    /// Whether an AUTO_PASSTHROUGH server with this host forwards to `svc` (`*.local` covers
    /// every `*.svc.cluster.local` service).
    pub fn covers_service(&self, svc: &crate::registry::Service) -> bool {
        self.admits(&svc.key.namespace) && wildcard_matches(&self.host, &svc.hostname)
    }
}

/// One Gateway server as this proxy serves it.
#[derive(Debug, Clone)]
pub struct Server<'a> {
    pub gateway: &'a Config<GatewaySpec>,
    pub server: &'a GatewayServer,
    pub kind: ServerKind,
    pub hosts: Vec<ServerHost>,
    pub port: u16,
}

impl Server<'_> {
    /// `https.<port>.<portName>.<gateway>.<namespace>` (Istio's route name for terminated HTTPS).
    pub fn https_route_name(&self) -> String {
        format!(
            "https.{}.{}.{}.{}",
            self.port, self.server.port.name, self.gateway.meta.name, self.gateway.meta.namespace
        )
    }

    /// The credential name of a terminating server, without a `kubernetes://` prefix.
    pub fn credential_name(&self) -> Option<&str> {
        let c = self.server.tls.as_ref()?.credential_name.as_deref()?;
        let c = c.strip_prefix("kubernetes://").unwrap_or(c);
        (!c.is_empty()).then_some(c)
    }

    pub fn tls_mode(&self) -> String {
        self.server
            .tls
            .as_ref()
            .and_then(|t| t.mode.clone())
            .unwrap_or_else(|| "SIMPLE".into())
            .to_ascii_uppercase()
    }

    /// The parts of `vs_host` this server serves: per server host, the more specific of the two
    /// hosts when one matches the other (`*` and `*.example.com` wildcards).
    pub fn serves(&self, vs_host: &str, vs_namespace: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for h in self.hosts.iter().filter(|h| h.admits(vs_namespace)) {
            if let Some(i) = intersect(vs_host, &h.host)
                && !out.contains(&i)
            {
                out.push(i);
            }
        }
        out
    }
}

/// Whether `pattern` (`*`, `*.suffix` or exact) matches `host`.
fn wildcard_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The more specific of two hosts when one covers the other.
pub fn intersect(a: &str, b: &str) -> Option<String> {
    if wildcard_matches(b, a) {
        Some(a.to_string())
    } else if wildcard_matches(a, b) {
        Some(b.to_string())
    } else if a.starts_with("*.") && b.starts_with("*.") {
        // *.a.example.com and *.example.com: the longer suffix is covered by the shorter.
        let (sa, sb) = (&a[1..], &b[1..]);
        if sa.ends_with(sb) {
            Some(a.to_string())
        } else if sb.ends_with(sa) {
            Some(b.to_string())
        } else {
            None
        }
    } else {
        None
    }
}

/// The servers of one bind address and port.
#[derive(Debug, Clone)]
pub struct PortServers<'a> {
    pub bind: String,
    pub port: u16,
    pub servers: Vec<Server<'a>>,
}

impl PortServers<'_> {
    /// Istio's listener name: `<bind>_<port>`.
    pub fn listener_name(&self) -> String {
        format!("{}_{}", self.bind, self.port)
    }

    /// RDS name of a plain HTTP port: `http.<port>`, or `http.<port>.<bind>` for a server bound
    /// to a specific address (two binds may share a port number).
    pub fn http_route_name(&self) -> String {
        if self.bind == "0.0.0.0" {
            format!("http.{}", self.port)
        } else {
            format!("http.{}.{}", self.port, self.bind)
        }
    }

    pub fn kind(&self) -> ServerKind {
        self.servers.first().map(|s| s.kind).unwrap_or(ServerKind::Http)
    }
}

/// What the Gateways selecting one proxy ask of it.
#[derive(Debug, Default)]
pub struct GatewayModel<'a> {
    pub ports: BTreeMap<(String, u16), PortServers<'a>>,
    pub virtual_services: Vec<&'a Config<VirtualServiceSpec>>,
}

fn server_kind(s: &GatewayServer) -> Option<ServerKind> {
    let mode = s
        .tls
        .as_ref()
        .and_then(|t| t.mode.as_deref())
        .map(str::to_ascii_uppercase);
    match s.port.protocol.to_ascii_uppercase().as_str() {
        "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" => Some(ServerKind::Http),
        "HTTPS" => match mode.as_deref() {
            Some("PASSTHROUGH") => Some(ServerKind::Passthrough),
            Some("AUTO_PASSTHROUGH") => Some(ServerKind::AutoPassthrough),
            Some("SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL") | None if s.tls.is_some() => Some(ServerKind::HttpsTerminate),
            _ => None,
        },
        "TLS" => match mode.as_deref() {
            Some("PASSTHROUGH") => Some(ServerKind::Passthrough),
            Some("AUTO_PASSTHROUGH") => Some(ServerKind::AutoPassthrough),
            _ => None,
        },
        "TCP" | "MONGO" | "MYSQL" | "REDIS" => Some(ServerKind::Tcp),
        _ => None,
    }
}

/// Whether a Gateway selects a proxy with these labels (an empty selector selects every
/// gateway proxy).
pub fn selects(gw: &GatewaySpec, labels: &BTreeMap<String, String>) -> bool {
    gw.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether a VirtualService names `gw` in `gateways` (`ns/name`, a short name in the
/// VirtualService's namespace, or the old `name.namespace[.svc.cluster.local]`).
pub fn binds_to(vs: &Config<VirtualServiceSpec>, gw: &Config<GatewaySpec>) -> bool {
    vs.spec.gateways.iter().any(|g| {
        let (ns, name) = match g.split_once('/') {
            Some((ns, name)) => (ns.to_string(), name.to_string()),
            None => match g.split_once('.') {
                Some((name, rest)) => (rest.split('.').next().unwrap_or_default().to_string(), name.to_string()),
                None => (vs.meta.namespace.clone(), g.clone()),
            },
        };
        ns == gw.meta.namespace && name == gw.meta.name
    })
}

impl<'a> GatewayModel<'a> {
    pub fn build(push: &'a PushContext, proxy: &ProxyInfo) -> Self {
        let config = &push.snapshot.config;
        let mut model = GatewayModel::default();
        let mut selected: Vec<&'a Config<GatewaySpec>> = Vec::new();
        for gw in &config.gateways {
            if !selects(&gw.spec, &proxy.labels) {
                continue;
            }
            selected.push(gw);
            for s in &gw.spec.servers {
                let Some(kind) = server_kind(s) else {
                    tracing::debug!(gateway = %format!("{}/{}", gw.meta.namespace, gw.meta.name), protocol = %s.port.protocol, "gateway server not supported; skipped");
                    continue;
                };
                let Ok(port) = u16::try_from(s.port.number) else {
                    continue;
                };
                if port == 0 {
                    continue;
                }
                let bind = s
                    .bind
                    .clone()
                    .filter(|b| !b.is_empty())
                    .unwrap_or_else(|| "0.0.0.0".into());
                let entry = model.ports.entry((bind.clone(), port)).or_insert_with(|| PortServers {
                    bind,
                    port,
                    servers: Vec::new(),
                });
                if let Some(first) = entry.servers.first()
                    && first.kind.port_class() != kind.port_class()
                {
                    tracing::warn!(
                        gateway = %format!("{}/{}", gw.meta.namespace, gw.meta.name),
                        port,
                        "gateway server conflicts with another server's protocol on the same port; skipped"
                    );
                    continue;
                }
                entry.servers.push(Server {
                    gateway: gw,
                    server: s,
                    kind,
                    hosts: s
                        .hosts
                        .iter()
                        .map(|h| ServerHost::parse(h, &gw.meta.namespace))
                        .collect(),
                    port,
                });
            }
        }
        model.virtual_services = config
            .virtual_services
            .iter()
            .filter(|vs| selected.iter().any(|gw| binds_to(vs, gw)))
            .collect();
        model
    }

    /// The hosts of every AUTO_PASSTHROUGH server: services they cover get SNI-DNAT clusters and
    /// filter chains (istiod's `AutoPassthroughSNIHosts`).
    pub fn auto_passthrough_hosts(&self) -> Vec<ServerHost> {
        let mut out: Vec<ServerHost> = Vec::new();
        for s in self.ports.values().flat_map(|p| &p.servers) {
            if s.kind == ServerKind::AutoPassthrough {
                for h in &s.hosts {
                    if !out.contains(h) {
                        out.push(h.clone());
                    }
                }
            }
        }
        out
    }

    /// VirtualServices bound to this server's Gateway, in config order.
    pub fn bound<'m>(&'m self, server: &'m Server<'a>) -> impl Iterator<Item = &'a Config<VirtualServiceSpec>> + 'm {
        self.virtual_services
            .iter()
            .copied()
            .filter(move |vs| binds_to(vs, server.gateway))
    }
}

#[cfg(test)]
mod tests;
