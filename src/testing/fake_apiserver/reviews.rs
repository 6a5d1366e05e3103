//! Virtual resources that answer instead of store: TokenReview, SubjectAccessReview,
//! SelfSubjectAccessReview, and the TokenRequest subresource of ServiceAccounts.
use std::time::{Duration, SystemTime};

use http::Response;
use serde_json::{Value, json};

use super::authn::authenticate;
use super::error::ApiError;
use super::faults::TokenReviewRecord;
use super::http::{Body, json};
use super::path::Target;
use super::rbac::{Attributes, UserInfo};
use super::resources::ResourceType;
use super::state::Core;
use super::store::ObjKey;
use super::tokens::MintRequest;

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

fn echo(kind: &str, api_version: &str, body: &Value) -> Value {
    let mut out = json!({ "kind": kind, "apiVersion": api_version, "metadata": {"creationTimestamp": null} });
    if let Some(spec) = body.get("spec") {
        out["spec"] = spec.clone();
    }
    out
}

pub fn token_review(core: &Core, body: &Value) -> Result<Response<Body>, ApiError> {
    let token = body
        .pointer("/spec/token")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let requested = strings(body.pointer("/spec/audiences"));
    let mut out = echo("TokenReview", "authentication.k8s.io/v1", body);
    let record = |authenticated: bool, error: &str| TokenReviewRecord {
        token: token.clone(),
        audiences: requested.clone(),
        authenticated,
        error: error.to_string(),
    };
    if token.is_empty() {
        return Err(ApiError::invalid(
            "TokenReview",
            "",
            &ResourceType::new("authentication.k8s.io", "v1", "tokenreviews"),
            "spec.token: Required value",
        ));
    }
    match authenticate(core, &token, &requested) {
        Ok(a) => {
            core.counters.record_review(record(true, ""));
            out["status"] = json!({
                "authenticated": true,
                "user": a.user,
                "audiences": a.audiences,
            });
        }
        Err(error) => {
            tracing::debug!(%error, "fake apiserver: TokenReview rejected a token");
            core.counters.record_review(record(false, &error));
            out["status"] = json!({ "user": {}, "error": error });
        }
    }
    Ok(json(201, &out))
}

/// The resource attributes asked about; `None` for a non-resource (URL) question.
fn attributes_of(spec: &Value) -> Result<Option<Attributes>, ApiError> {
    let Some(ra) = spec.get("resourceAttributes") else {
        return match spec.get("nonResourceAttributes") {
            Some(_) => Ok(None),
            None => Err(ApiError::bad_request(
                "spec: Invalid value: exactly one of nonResourceAttributes or resourceAttributes must be specified",
            )),
        };
    };
    let s = |k: &str| ra.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    Ok(Some(Attributes {
        verb: s("verb"),
        group: s("group"),
        resource: s("resource"),
        subresource: s("subresource"),
        namespace: s("namespace"),
        name: s("name"),
    }))
}

/// Grants carry no URL rules, so only `system:masters` may reach non-resource paths.
fn access_status(core: &Core, user: &UserInfo, a: Option<&Attributes>) -> Value {
    let allowed = match a {
        Some(a) => core.rbac.allowed(user, a),
        None => user.groups.iter().any(|g| g == super::rbac::MASTERS),
    };
    if allowed {
        json!({ "allowed": true, "reason": format!("allowed by fake RBAC for \"{}\"", user.username) })
    } else {
        json!({ "allowed": false })
    }
}

pub fn subject_access_review(core: &Core, body: &Value) -> Result<Response<Body>, ApiError> {
    let spec = body.get("spec").cloned().unwrap_or_default();
    let user = UserInfo {
        username: spec.get("user").and_then(Value::as_str).unwrap_or_default().to_string(),
        uid: spec.get("uid").and_then(Value::as_str).unwrap_or_default().to_string(),
        groups: strings(spec.get("groups")),
        extra: Default::default(),
    };
    let a = attributes_of(&spec)?;
    let mut out = echo("SubjectAccessReview", "authorization.k8s.io/v1", body);
    out["status"] = access_status(core, &user, a.as_ref());
    Ok(json(201, &out))
}

pub fn self_subject_access_review(core: &Core, caller: &UserInfo, body: &Value) -> Result<Response<Body>, ApiError> {
    let spec = body.get("spec").cloned().unwrap_or_default();
    let a = attributes_of(&spec)?;
    let mut out = echo("SelfSubjectAccessReview", "authorization.k8s.io/v1", body);
    out["status"] = access_status(core, caller, a.as_ref());
    Ok(json(201, &out))
}

/// `POST .../serviceaccounts/<name>/token`.
pub fn token_request(core: &Core, t: &Target, body: &Value) -> Result<Response<Body>, ApiError> {
    let sa = core
        .store
        .get(&t.rt.group_resource(), &ObjKey::new(&t.namespace, &t.name))
        .ok_or_else(|| ApiError::not_found(&t.rt, &t.name))?;
    let mut audiences = strings(body.pointer("/spec/audiences"));
    if audiences.is_empty() {
        audiences = core.config.api_audiences.clone();
    }
    let secs = body
        .pointer("/spec/expirationSeconds")
        .and_then(Value::as_u64)
        .unwrap_or(3600);
    let rt = ResourceType::new("authentication.k8s.io", "v1", "tokenrequests");
    if secs < 600 {
        return Err(ApiError::invalid(
            "TokenRequest",
            &t.name,
            &rt,
            format!("spec.expirationSeconds: Invalid value: {secs}: may not specify a duration less than 10 minutes"),
        ));
    }
    let pod = match body.pointer("/spec/boundObjectRef") {
        Some(r) if r.get("kind").and_then(Value::as_str) == Some("Pod") => {
            let name = r.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
            let uid = r.get("uid").and_then(Value::as_str).unwrap_or_default().to_string();
            Some((name, uid))
        }
        _ => None,
    };
    let issued_at = SystemTime::now();
    let token = core
        .signer
        .mint_bound(&MintRequest {
            namespace: t.namespace.clone(),
            service_account: t.name.clone(),
            sa_uid: sa
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            audiences: audiences.clone(),
            ttl: Duration::from_secs(secs),
            pod,
            issued_at,
        })
        .map_err(ApiError::internal)?;
    let exp = k8s_openapi::jiff::Timestamp::now()
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs as i64))
        .map(|t| {
            k8s_openapi::jiff::Timestamp::from_second(t.as_second())
                .unwrap_or(t)
                .to_string()
        })
        .unwrap_or_default();
    let mut out = echo("TokenRequest", "authentication.k8s.io/v1", body);
    out["metadata"] = json!({ "name": t.name, "namespace": t.namespace, "creationTimestamp": null });
    out["spec"]["audiences"] = json!(audiences);
    out["spec"]["expirationSeconds"] = json!(secs);
    out["status"] = json!({ "token": token, "expirationTimestamp": exp });
    Ok(json(201, &out))
}
