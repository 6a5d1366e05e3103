//! The test-control API under `/fake/` on the same HTTPS listener, for out-of-process tests:
//! apply objects, mint tokens, grant rules, flip faults and read counters. Every call needs a
//! `system:masters` bearer token (the admin token). Faults never apply here.
use std::time::{Duration, SystemTime};

use http::{Method, Request, Response};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::http::{Body, error, json, query, read_body, text};
use super::kubeconfig;
use super::rbac::{MASTERS, Rule, UserInfo, istio_reader_rules};
use super::resources::for_kind;
use super::router::Router;
use super::state::{FakeState, MintOptions};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenBody {
    namespace: String,
    service_account: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    pod: Option<PodRef>,
    /// Shifts `iat` (negative: in the past), to mint expired tokens.
    #[serde(default)]
    issued_at_offset_seconds: i64,
}

#[derive(Deserialize)]
struct PodRef {
    name: String,
    uid: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GrantBody {
    subject: String,
    #[serde(default)]
    rules: Vec<Rule>,
    /// `istio-reader` adds Istio's reader rules.
    #[serde(default)]
    preset: Option<String>,
}

#[derive(Deserialize)]
struct CountSpec {
    count: usize,
    code: u16,
}

#[derive(Deserialize)]
struct RateSpec {
    rate: f64,
    code: u16,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct FaultsBody {
    latency_ms: Option<u64>,
    fail_next: Option<CountSpec>,
    failure_rate: Option<RateSpec>,
    retry_after_seconds: Option<u32>,
    #[serde(default)]
    drop_watches: bool,
    #[serde(default)]
    compact: bool,
    #[serde(default)]
    clear: bool,
    /// Goes down (refusing and dropping connections) this long after answering, then up again.
    down_for_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StaticTokenBody {
    token: String,
    username: String,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeleteBody {
    api_version: String,
    kind: String,
    #[serde(default)]
    namespace: String,
    name: String,
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .or_else(|_| serde_yaml::from_slice(body))
        .map_err(|e| ApiError::bad_request(format!("control request body: {e}")))
}

fn fake_err(e: super::FakeError) -> ApiError {
    match e {
        super::FakeError::Api(e) => *e,
        other => ApiError::bad_request(other.to_string()),
    }
}

/// Every object in a JSON object, JSON list (`items`), or multi-document YAML body.
fn objects_in(body: &[u8]) -> Result<Vec<Value>, ApiError> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return Ok(match v.get("items").and_then(Value::as_array) {
            Some(items)
                if v.get("kind")
                    .and_then(Value::as_str)
                    .is_none_or(|k| k.ends_with("List")) =>
            {
                items.clone()
            }
            _ => vec![v],
        });
    }
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad_request("body is not UTF-8"))?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).map_err(|e| ApiError::bad_request(format!("YAML: {e}")))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

pub async fn handle(router: &Router, user: Option<UserInfo>, req: Request<Incoming>) -> Response<Body> {
    if !user.as_ref().is_some_and(|u| u.groups.iter().any(|g| g == MASTERS)) {
        return error(&ApiError::unauthorized());
    }
    let state = FakeState(router.core.clone());
    let method = req.method().clone();
    let path = req.uri().path().trim_start_matches("/fake").to_string();
    let q = query(req.uri().query());
    let body = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(e) => return error(&e),
    };
    let result = match (method, path.as_str()) {
        (Method::GET, "/healthz") => Ok(text(200, "ok")),
        (Method::POST, "/apply") => apply(&state, &body),
        (Method::POST, "/delete") => parse::<DeleteBody>(&body).and_then(|d| {
            let rt = for_kind(&d.api_version, &d.kind);
            state
                .delete(&rt, &d.namespace, &d.name)
                .map(|o| json(200, &o))
                .ok_or_else(|| ApiError::not_found(&rt, &d.name))
        }),
        (Method::POST, "/token") => parse::<TokenBody>(&body).and_then(|t| mint(&state, t)),
        (Method::POST, "/reader-token") => {
            let sa = q
                .get("serviceAccount")
                .cloned()
                .unwrap_or_else(|| "istio-reader-service-account".into());
            state
                .reader_token(&sa)
                .map(|t| json(200, &json!({ "token": t })))
                .map_err(fake_err)
        }
        (Method::POST, "/grant") => parse::<GrantBody>(&body).map(|g| {
            let mut rules = g.rules;
            if g.preset.as_deref() == Some("istio-reader") {
                rules.extend(istio_reader_rules());
            }
            state.grant(&g.subject, rules);
            json(200, &json!({ "granted": g.subject }))
        }),
        (Method::POST, "/static-token") => parse::<StaticTokenBody>(&body).map(|s| {
            let groups: Vec<&str> = s.groups.iter().map(String::as_str).collect();
            state.add_static_token(&s.token, &s.username, &groups);
            json(200, &json!({ "username": s.username }))
        }),
        (Method::POST, "/faults") => parse::<FaultsBody>(&body).map(|f| faults(router, &state, f)),
        (Method::GET, "/counters") => Ok(counters(&state)),
        (Method::GET, "/kubeconfig") => {
            let token = q
                .get("token")
                .cloned()
                .unwrap_or_else(|| state.admin_token().to_string());
            let url = format!("https://{}", router.addr);
            Ok(text(
                200,
                &kubeconfig::render(&state.config().cluster_name, &url, state.ca_pem(), &token),
            ))
        }
        _ => Err(ApiError::no_route()),
    };
    result.unwrap_or_else(|e| error(&e))
}

fn apply(state: &FakeState, body: &[u8]) -> Result<Response<Body>, ApiError> {
    let mut applied = Vec::new();
    for obj in objects_in(body)? {
        applied.push(state.apply(obj).map_err(fake_err)?);
    }
    Ok(json(200, &json!({ "applied": applied })))
}

fn mint(state: &FakeState, t: TokenBody) -> Result<Response<Body>, ApiError> {
    let now = SystemTime::now();
    let offset = Duration::from_secs(t.issued_at_offset_seconds.unsigned_abs());
    let issued_at = if t.issued_at_offset_seconds < 0 {
        now - offset
    } else {
        now + offset
    };
    let token = state
        .mint_token_with(MintOptions {
            namespace: t.namespace,
            service_account: t.service_account,
            audiences: t.audiences,
            ttl: Duration::from_secs(t.ttl_seconds.unwrap_or(3600)),
            pod: t.pod.map(|p| (p.name, p.uid)),
            issued_at,
        })
        .map_err(fake_err)?;
    Ok(json(200, &json!({ "token": token })))
}

fn faults(router: &Router, state: &FakeState, f: FaultsBody) -> Response<Body> {
    if f.clear {
        state.clear_faults();
    }
    if let Some(ms) = f.latency_ms {
        state.set_latency(Duration::from_millis(ms));
    }
    if let Some(s) = f.retry_after_seconds {
        state.set_retry_after(s);
    }
    if let Some(n) = f.fail_next {
        state.fail_next(n.count, n.code);
    }
    if let Some(r) = f.failure_rate {
        state.set_failure_rate(r.rate, r.code);
    }
    if f.compact {
        state.compact();
    }
    if f.drop_watches {
        state.drop_watches();
    }
    if let Some(ms) = f.down_for_ms
        && let Some(listener) = router.listener.upgrade()
    {
        tokio::spawn(async move {
            // Let this answer leave before the connection carrying it is killed.
            tokio::time::sleep(Duration::from_millis(50)).await;
            listener.down().await;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if let Err(e) = listener.up() {
                tracing::error!(error = %e, "fake apiserver: could not come back up");
            }
        });
    }
    json(200, &json!({ "ok": true }))
}

fn counters(state: &FakeState) -> Response<Body> {
    let requests: Vec<Value> = state
        .request_counts()
        .into_iter()
        .map(|((verb, resource), count)| json!({ "verb": verb, "resource": resource, "count": count }))
        .collect();
    json(
        200,
        &json!({
            "total": state.request_total(),
            "requests": requests,
            "resourceVersion": state.resource_version().to_string(),
            "tokenReviews": { "total": state.token_review_count(), "records": state.token_reviews() },
        }),
    )
}
