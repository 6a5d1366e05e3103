//! The request pipeline, in kube-apiserver's order where it matters: count, injected
//! latency/faults, authentication (401), scope and authorization (403), then the verb.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use http::{Method, Request, Response, header};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::authn::authenticate;
use super::control;
use super::discovery;
use super::error::ApiError;
use super::http::{Body, error, json, parse_object, query, read_body, text};
use super::path::{Route, Target, route};
use super::rbac::{Attributes, UserInfo};
use super::rest;
use super::reviews;
use super::server::Listener;
use super::state::Core;
use super::watch;

pub struct Router {
    pub core: Arc<Core>,
    pub addr: SocketAddr,
    /// For `/fake/faults` `downForMs`; weak because the listener owns the router.
    pub listener: Weak<Listener>,
}

/// The kube-apiserver verb of a resource request.
fn verb_for(method: &Method, t: &Target, q: &HashMap<String, String>) -> Option<&'static str> {
    let watching = q.get("watch").is_some_and(|v| v == "true" || v == "1");
    Some(match *method {
        Method::GET if watching => "watch",
        Method::GET if t.name.is_empty() => "list",
        Method::GET => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if t.name.is_empty() => "deletecollection",
        Method::DELETE => "delete",
        _ => return None,
    })
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

impl Router {
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        if path == "/fake" || path.starts_with("/fake/") {
            let user = bearer(&req)
                .and_then(|t| authenticate(&self.core, &t, &[]).ok())
                .map(|a| a.user);
            return control::handle(&self, user, req).await;
        }
        let q = query(req.uri().query());
        let route = route(&path);
        let verb = match &route {
            Route::Resource(t) => verb_for(req.method(), t, &q),
            _ => Some("get"),
        };
        let label = match &route {
            Route::Resource(t) if t.subresource.is_empty() => t.rt.plural.clone(),
            Route::Resource(t) => format!("{}/{}", t.rt.plural, t.subresource),
            _ => String::new(),
        };
        self.core.counters.count_request(verb.unwrap_or("unknown"), &label);
        let latency = self.core.faults.latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if let Some(e) = self.core.faults.take_failure() {
            tracing::debug!(code = e.code, %path, "fake apiserver: injected failure");
            return error(&e);
        }
        match path.as_str() {
            "/version" => return json(200, &discovery::version()),
            "/healthz" | "/livez" | "/readyz" => return text(200, "ok"),
            _ => {}
        }
        // Anonymous requests are refused outright (as with --anonymous-auth=false).
        let user = match bearer(&req).map(|t| authenticate(&self.core, &t, &[])) {
            Some(Ok(a)) => a.user,
            Some(Err(why)) => {
                tracing::debug!(%why, %path, "fake apiserver: 401");
                return error(&ApiError::unauthorized());
            }
            None => return error(&ApiError::unauthorized()),
        };
        let result = match route {
            Route::Discovery { group, version, core } => {
                let accept = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                discovery::serve(
                    &self.core,
                    self.addr,
                    accept,
                    group.as_deref(),
                    version.as_deref(),
                    core,
                )
            }
            Route::Resource(t) => match verb {
                Some(verb) => self.resource(&user, verb, t, q, req).await,
                None => Err(ApiError::method_not_allowed(format!(
                    "{} is not supported",
                    req.method()
                ))),
            },
            Route::Other => self.other(&path),
        };
        result.unwrap_or_else(|e| error(&e))
    }

    fn other(&self, path: &str) -> Result<Response<Body>, ApiError> {
        match path {
            "/.well-known/openid-configuration" => Ok(json(
                200,
                &json!({
                    "issuer": self.core.signer.issuer(),
                    "jwks_uri": format!("https://{}/openid/v1/jwks", self.addr),
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["RS256"],
                }),
            )),
            "/openid/v1/jwks" => {
                let v: Value = serde_json::from_str(self.core.signer.jwks_json()).map_err(ApiError::internal)?;
                Ok(json(200, &v))
            }
            _ => Err(ApiError::no_route()),
        }
    }

    async fn resource(
        &self,
        user: &UserInfo,
        verb: &'static str,
        t: Target,
        q: HashMap<String, String>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        rest::check_scope(&t, verb)?;
        let attrs = Attributes {
            verb: verb.into(),
            group: t.rt.group.clone(),
            resource: t.rt.plural.clone(),
            subresource: t.subresource.clone(),
            // As kube-apiserver's request-info resolver: a Namespace is "in" itself.
            namespace: if t.rt.group.is_empty() && t.rt.plural == "namespaces" {
                t.name.clone()
            } else {
                t.namespace.clone()
            },
            name: t.name.clone(),
        };
        if !self.core.rbac.allowed(user, &attrs) {
            let msg = attrs.forbidden_message(&user.username);
            tracing::debug!(%msg, "fake apiserver: 403");
            return Err(ApiError::forbidden(msg, Some(&t.rt), &t.name));
        }
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let core = &self.core;
        let review_group = matches!(t.rt.group.as_str(), "authentication.k8s.io" | "authorization.k8s.io");
        if review_group && verb != "create" {
            return Err(ApiError::method_not_allowed(format!(
                "{} does not support {verb}",
                t.rt.qualified()
            )));
        }
        match verb {
            "get" => rest::get(core, &t),
            "list" => rest::list(core, &t, &q),
            "watch" => watch::watch(core.clone(), &t, &q),
            "deletecollection" => rest::delete_collection(core, &t, &q),
            _ => {
                let body = read_body(req.into_body()).await?;
                match verb {
                    "create" => {
                        let obj = parse_object(&body)?;
                        match (t.rt.group.as_str(), t.rt.plural.as_str(), t.subresource.as_str()) {
                            ("authentication.k8s.io", "tokenreviews", "") => reviews::token_review(core, &obj),
                            ("authorization.k8s.io", "subjectaccessreviews", "") => {
                                reviews::subject_access_review(core, &obj)
                            }
                            ("authorization.k8s.io", "selfsubjectaccessreviews", "") => {
                                reviews::self_subject_access_review(core, user, &obj)
                            }
                            ("", "serviceaccounts", "token") => reviews::token_request(core, &t, &obj),
                            (_, _, "") => rest::create(core, &t, &q, obj),
                            _ => Err(ApiError::no_route()),
                        }
                    }
                    "update" if t.subresource.is_empty() || t.subresource == "status" => {
                        rest::update(core, &t, &q, parse_object(&body)?)
                    }
                    "patch" if t.subresource.is_empty() || t.subresource == "status" => {
                        rest::patch(core, &t, &q, &content_type, &body)
                    }
                    "delete" if t.subresource.is_empty() => {
                        let options = if body.is_empty() {
                            None
                        } else {
                            Some(parse_object(&body)?)
                        };
                        rest::delete(core, &t, &q, options)
                    }
                    _ => Err(ApiError::no_route()),
                }
            }
        }
    }
}
