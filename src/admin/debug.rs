//! The `/debug/*` endpoints on 15014 and who may read them. Loopback callers always may (istiod's
//! rule); anyone else must authenticate with the same chain as 15012 (bearer JWT, `clusterid`).
//! An identity in the system namespace sees everything; any other identity only
//! `config_dump` of proxies in its own namespace (istiod's `ENABLE_DEBUG_ENDPOINT_AUTH`).
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, StatusCode};

use super::Registry;
use super::http::{Body, json, text};
use super::metrics::CounterVec;
use crate::auth::{AuthChain, Credentials, Identity};
use crate::cluster::ClusterRegistry;
use http::Response;

/// State the debug endpoints show, and how callers are checked.
#[derive(Default)]
pub struct DebugSources {
    pub clusters: Option<Arc<ClusterRegistry>>,
    /// The service model, for `/debug/registryz` and `/debug/networkz`.
    pub mesh: Option<Arc<crate::registry::MeshStore>>,
    /// Refused mesh config updates, for `/debug/networkz`.
    pub mesh_config: Option<Arc<crate::meshconfig::MeshConfigSink>>,
    /// xDS connections, for `/debug/syncz`, `/debug/connections` and `/debug/config_dump`.
    pub xds: Option<crate::xds::XdsServer>,
    /// Authenticates non-loopback callers; without it they are refused.
    pub auth: Option<Arc<AuthChain>>,
    /// Identities in this namespace may read every debug endpoint.
    pub system_namespace: String,
    pub denied: Option<CounterVec>,
}

impl DebugSources {
    pub fn with_denied_metric(mut self, registry: &Registry) -> Self {
        self.denied = Some(registry.counter_vec(
            "meshd_debug_requests_denied",
            "Debug requests refused, by reason",
            &["reason"],
        ));
        self
    }
}

/// What a caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    All,
    /// `config_dump` of proxies in this namespace only.
    Namespace(String),
}

/// Why a debug request was refused; the HTTP answer and the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("debug endpoints need a bearer token from a non-loopback address")]
    NoCredentials,
    #[error("authentication failed: {0}")]
    Unauthenticated(String),
    #[error("{0} may only read /debug/config_dump of proxies in its own namespace")]
    Forbidden(String),
}

impl Denied {
    fn status(&self) -> StatusCode {
        match self {
            Denied::NoCredentials | Denied::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Denied::Forbidden(_) => StatusCode::FORBIDDEN,
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Denied::NoCredentials => "no_credentials",
            Denied::Unauthenticated(_) => "unauthenticated",
            Denied::Forbidden(_) => "forbidden",
        }
    }
}

/// Who the caller is: loopback, else the identity its credentials prove.
pub async fn access(sources: &DebugSources, peer: SocketAddr, headers: &HeaderMap) -> Result<Access, Denied> {
    if peer.ip().is_loopback() {
        return Ok(Access::All);
    }
    let creds = Credentials::from_metadata(
        &tonic::metadata::MetadataMap::from_headers(headers.clone()),
        None,
        Some(peer),
    );
    let (Some(auth), Some(_)) = (&sources.auth, &creds.bearer) else {
        return Err(Denied::NoCredentials);
    };
    let id = auth
        .authenticate(&creds)
        .await
        .map_err(|f| Denied::Unauthenticated(f.to_string()))?;
    Ok(access_for(&id, &sources.system_namespace))
}

pub fn access_for(id: &Identity, system_namespace: &str) -> Access {
    if id.spiffe.namespace == system_namespace {
        Access::All
    } else {
        Access::Namespace(id.spiffe.namespace.clone())
    }
}

/// Answers a `/debug/...` request.
pub async fn handle(
    sources: &DebugSources,
    path: &str,
    query: Option<&str>,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Response<Body> {
    let refuse = |d: Denied| {
        tracing::warn!(peer = %peer, path, reason = d.reason(), error = %d, "debug request refused");
        if let Some(m) = &sources.denied {
            m.with(&[d.reason()]).inc();
        }
        text(d.status(), format!("{d}\n"))
    };
    let access = match access(sources, peer, headers).await {
        Ok(a) => a,
        Err(d) => return refuse(d),
    };
    if let Access::Namespace(ns) = &access
        && path != "/debug/config_dump"
    {
        return refuse(Denied::Forbidden(format!("an identity in namespace {ns}")));
    }
    match path {
        "/debug/clusterz" => match &sources.clusters {
            Some(c) => json(StatusCode::OK, &c.snapshot()),
            None => json(StatusCode::OK, &Vec::<()>::new()),
        },
        "/debug/registryz" => match &sources.mesh {
            Some(m) => json(StatusCode::OK, &crate::registry::debug::registryz(&m.snapshot())),
            None => json(StatusCode::OK, &serde_json::json!({"services": []})),
        },
        "/debug/networkz" => {
            let error = sources.mesh_config.as_ref().and_then(|m| m.last_error());
            match &sources.mesh {
                Some(m) => json(StatusCode::OK, &crate::registry::debug::networkz(&m.snapshot(), error)),
                None => json(StatusCode::OK, &serde_json::json!({"gateways": []})),
            }
        }
        // Per connection and type: nonces sent/acked, versions, NACKs (istiod's syncz).
        "/debug/syncz" | "/debug/connections" => match &sources.xds {
            Some(x) => json(StatusCode::OK, &x.connections()),
            None => json(StatusCode::OK, &Vec::<()>::new()),
        },
        "/debug/config_dump" => config_dump(sources, query, &access).unwrap_or_else(refuse),
        _ => text(
            StatusCode::NOT_FOUND,
            "unknown debug endpoint; try /debug/syncz, /debug/config_dump?proxyID=, /debug/connections, /debug/clusterz, /debug/registryz, /debug/networkz\n",
        ),
    }
}

fn config_dump(sources: &DebugSources, query: Option<&str>, access: &Access) -> Result<Response<Body>, Denied> {
    let params: Vec<(String, String)> = query
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let Some(proxy_id) = param("proxyID").filter(|p| !p.is_empty()) else {
        return Ok(text(
            StatusCode::BAD_REQUEST,
            "give the proxy: /debug/config_dump?proxyID=<pod>.<namespace> (or the full node id)\n",
        ));
    };
    let detail = matches!(param("detail"), Some("true" | "1"));
    let Some(xds) = &sources.xds else {
        return Ok(text(
            StatusCode::NOT_FOUND,
            format!("proxy {proxy_id} is not connected\n"),
        ));
    };
    let Some(proxy) = xds.proxies(proxy_id).into_iter().next() else {
        return Ok(text(
            StatusCode::NOT_FOUND,
            format!("proxy {proxy_id} is not connected\n"),
        ));
    };
    if let Access::Namespace(ns) = access
        && &proxy.namespace != ns
    {
        return Err(Denied::Forbidden(format!("an identity in namespace {ns}")));
    }
    let push = xds.current();
    Ok(json(
        StatusCode::OK,
        &crate::xds::config_dump::dump(&push, &proxy, detail),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[tokio::test]
    async fn loopback_is_trusted_and_others_need_credentials() {
        let s = DebugSources::default();
        let lo: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        assert_eq!(access(&s, lo, &HeaderMap::new()).await, Ok(Access::All));
        assert_eq!(access(&s, remote, &HeaderMap::new()).await, Err(Denied::NoCredentials));
        // A token with no authenticator configured is still no way in.
        let h = headers(&[("authorization", "Bearer abc")]);
        assert_eq!(access(&s, remote, &h).await, Err(Denied::NoCredentials));
        let s = DebugSources {
            auth: Some(Arc::new(AuthChain::new(vec![]))),
            ..Default::default()
        };
        assert!(matches!(access(&s, remote, &h).await, Err(Denied::Unauthenticated(_))));
    }

    #[tokio::test]
    async fn a_refused_request_is_answered_and_counted() {
        let registry = Registry::new();
        let s = DebugSources::default().with_denied_metric(&registry);
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let r = handle(&s, "/debug/syncz", None, remote, &HeaderMap::new()).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(
            registry
                .encode()
                .contains("meshd_debug_requests_denied{reason=\"no_credentials\"} 1")
        );
    }
}
