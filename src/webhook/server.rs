//! The HTTPS listener on 15017: the serving certificate (the same resolver as 15012, so it
//! rotates with it), TLS 1.2 or 1.3, HTTP/1.1 and h2, no client authentication (the API server
//! does not present one). Each handshake has its own deadline and each connection a header-read
//! timeout; on shutdown the listener closes and open connections finish their requests.
//!
//! Routes: `/inject[/…]` and `/validate[/…]` take `POST` of an `admission.k8s.io/v1`
//! AdmissionReview (`application/json`) and answer one; `/ready` answers like 8080's.
//! A body that is not an AdmissionReview gets 400 with the reason (415 for another content
//! type, 413 when too large).
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::inject::{self, InjectConfig};
use super::{Metrics, validate};
use crate::admin::metrics::Counter;
use crate::admin::{Readiness, Registry};
use crate::config::ServeArgs;
use crate::tls::serving::ServingCertResolver;

/// Largest request body accepted (an AdmissionReview carries the object and the old object).
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// istiod's webhook server read-header timeout.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Readiness component of the webhook listener.
const READY_COMPONENT: &str = "webhook";

type Body = Full<Bytes>;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("building the webhook TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a request body was not an AdmissionReview.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("only POST is served here")]
    Method,
    #[error("invalid Content-Type {0:?}, want application/json")]
    ContentType(String),
    #[error("request body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    #[error("reading the request body: {0}")]
    Read(String),
    #[error("no body found")]
    Empty,
    #[error("malformed AdmissionReview: {0}")]
    Malformed(serde_json::Error),
    #[error("malformed AdmissionReview: it has no request")]
    NoRequest,
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::Method => StatusCode::METHOD_NOT_ALLOWED,
            RequestError::ContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RequestError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The `error` label of `galley_validation_http_error`.
    fn label(&self) -> &'static str {
        match self {
            RequestError::Method => "method",
            RequestError::ContentType(_) => "content_type",
            RequestError::TooLarge => "too_large",
            RequestError::Read(_) => "read",
            RequestError::Empty => "empty",
            RequestError::Malformed(_) | RequestError::NoRequest => "decode",
        }
    }
}

struct HandshakeMetrics {
    ok: Arc<Counter>,
    failed: Arc<Counter>,
    timed_out: Arc<Counter>,
}

struct State {
    inject: InjectConfig,
    metrics: Metrics,
    readiness: Arc<Readiness>,
}

/// rustls for 15017: the serving certificate, h2 and http/1.1, no client auth.
pub fn tls_config(resolver: Arc<ServingCertResolver>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Starts serving the webhooks on `listener` until `shutdown` turns true. The returned task
/// ends once open connections have finished.
pub fn spawn(
    listener: TcpListener,
    resolver: Arc<ServingCertResolver>,
    args: &ServeArgs,
    registry: &Registry,
    readiness: Arc<Readiness>,
    shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ServerError> {
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(resolver)?));
    let handshakes = registry.counter_vec("meshd_tls_handshakes", "Completed TLS handshakes", &["listener"]);
    let errors = registry.counter_vec(
        "meshd_tls_handshake_errors",
        "Failed TLS handshakes",
        &["listener", "reason"],
    );
    let hs = Arc::new(HandshakeMetrics {
        ok: handshakes.with(&[READY_COMPONENT]),
        failed: errors.with(&[READY_COMPONENT, "error"]),
        timed_out: errors.with(&[READY_COMPONENT, "timeout"]),
    });
    readiness.register(READY_COMPONENT);
    let state = Arc::new(State {
        inject: InjectConfig::from_args(args),
        metrics: Metrics::register(registry),
        readiness,
    });
    let handshake_timeout = args.tls_handshake_timeout;
    Ok(tokio::spawn(accept_loop(
        listener,
        acceptor,
        state,
        hs,
        handshake_timeout,
        shutdown,
    )))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    hs: Arc<HandshakeMetrics>,
    handshake_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    state.readiness.set(READY_COMPONENT, true);
    let mut conns = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(listener = READY_COMPONENT, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, state, hs, stop) = (acceptor.clone(), Arc::clone(&state), Arc::clone(&hs), shutdown.clone());
        conns.spawn(async move {
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    hs.ok.inc();
                    tls
                }
                Ok(Err(e)) => {
                    hs.failed.inc();
                    tracing::debug!(listener = READY_COMPONENT, %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    hs.timed_out.inc();
                    tracing::debug!(listener = READY_COMPONENT, %peer, "TLS handshake timed out");
                    return;
                }
            };
            serve_connection(tls, state, stop).await;
        });
        while conns.try_join_next().is_some() {}
    }
    state.readiness.set(READY_COMPONENT, false);
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Resolves once `shutdown` is true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

async fn serve_connection(tls: TlsStream<TcpStream>, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let svc = hyper::service::service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(handle(&state, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let stopping = tokio::select! {
        _ = conn.as_mut() => false,
        _ = stopped(&mut shutdown) => true,
    };
    if stopping {
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let under = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}/"));
    if path == "/ready" || path == "/healthz/ready" {
        let pending = state.readiness.pending();
        return if pending.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: waiting for {}\n", pending.join(", ")),
            )
        };
    }
    if under("/inject") {
        return serve_inject(state, req, &path).await;
    }
    if under("/validate") {
        return serve_validate(state, req).await;
    }
    text(StatusCode::NOT_FOUND, "not found; try /inject, /validate or /ready\n")
}

async fn serve_inject(state: &State, req: Request<Incoming>, path: &str) -> Response<Body> {
    let m = &state.metrics;
    m.injection_requests.inc();
    let start = Instant::now();
    let resp = match read_review(req).await {
        Err(e) => {
            m.injection_failure.inc();
            tracing::warn!(path, error = %e, "injection request refused");
            text(e.status(), format!("{e}\n"))
        }
        Ok(ar) => {
            let (resp, outcome) = inject::review(&ar, path, &state.inject);
            let pod = pod_name(&ar);
            match outcome {
                inject::Outcome::Injected => {
                    m.injection_success.inc();
                    tracing::debug!(path, pod = %pod, "injected");
                }
                inject::Outcome::Skipped(why) => {
                    m.injection_skip.inc();
                    tracing::debug!(path, pod = %pod, reason = %why, "injection skipped");
                }
                inject::Outcome::Failed(e) => {
                    m.injection_failure.inc();
                    tracing::warn!(path, pod = %pod, error = %e, "injection failed");
                }
            }
            review_response(resp)
        }
    };
    m.injection_time.observe(start.elapsed().as_secs_f64());
    resp
}

async fn serve_validate(state: &State, req: Request<Incoming>) -> Response<Body> {
    let m = &state.metrics;
    match read_review(req).await {
        Err(e) => {
            m.validation_http_error.with(&[e.label()]).inc();
            tracing::warn!(error = %e, "validation request refused");
            text(e.status(), format!("{e}\n"))
        }
        Ok(ar) => {
            let (resp, outcome) = validate::review(&ar);
            let r = &ar.resource;
            match outcome {
                validate::Outcome::Passed => {
                    m.validation_passed.with(&[&r.group, &r.version, &r.resource]).inc();
                }
                validate::Outcome::Failed(e) => {
                    m.validation_failed
                        .with(&[&r.group, &r.version, &r.resource, e.reason()])
                        .inc();
                    tracing::info!(kind = %ar.kind.kind, namespace = ar.namespace.as_deref().unwrap_or(""), name = %ar.name, error = %e, "configuration denied");
                }
                validate::Outcome::Ignored => {}
            }
            review_response(resp)
        }
    }
}

fn pod_name(ar: &AdmissionRequest<DynamicObject>) -> String {
    let meta = ar.object.as_ref().map(|o| &o.metadata);
    let name = Some(ar.name.clone())
        .filter(|n| !n.is_empty())
        .or_else(|| meta.and_then(|m| m.name.clone()))
        .or_else(|| meta.and_then(|m| m.generate_name.clone()))
        .unwrap_or_default();
    format!("{}/{}", ar.namespace.as_deref().unwrap_or(""), name)
}

/// Reads and decodes an AdmissionReview.
async fn read_review(req: Request<Incoming>) -> Result<AdmissionRequest<DynamicObject>, RequestError> {
    if req.method() != Method::POST {
        return Err(RequestError::Method);
    }
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if ct.split(';').next().map(str::trim) != Some("application/json") {
        return Err(RequestError::ContentType(ct));
    }
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                RequestError::TooLarge
            } else {
                RequestError::Read(e.to_string())
            }
        })?
        .to_bytes();
    decode_review(&body)
}

/// Decodes an AdmissionReview body (the pure part of [`read_review`]).
pub fn decode_review(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::Empty);
    }
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body).map_err(RequestError::Malformed)?;
    review.try_into().map_err(|_| RequestError::NoRequest)
}

/// The AdmissionReview answering `resp`, as JSON. The patch is written base64-encoded, as
/// kube-apiserver's `[]byte` field expects.
pub fn encode_review(mut resp: AdmissionResponse) -> Vec<u8> {
    let patch = resp.patch.take();
    let mut v = serde_json::to_value(resp.into_review()).unwrap_or_default();
    if let (Some(p), Some(r)) = (patch, v.get_mut("response").and_then(|r| r.as_object_mut())) {
        r.insert(
            "patch".into(),
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(p)),
        );
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

fn review_response(resp: AdmissionResponse) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(encode_review(resp))))
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, ""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decode_errors_are_clear() {
        assert!(matches!(decode_review(b" "), Err(RequestError::Empty)));
        let e = decode_review(b"{not json").unwrap_err();
        assert!(e.to_string().starts_with("malformed AdmissionReview: "), "{e}");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e = decode_review(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#).unwrap_err();
        assert!(matches!(e, RequestError::NoRequest), "{e}");
    }

    #[test]
    fn patch_is_base64_in_the_review() {
        let body = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"}, "operation": "CREATE",
                "userInfo": {}, "namespace": "default",
                "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}}},
        });
        let req = decode_review(body.to_string().as_bytes()).unwrap();
        let patch: json_patch::Patch =
            serde_json::from_value(json!([{"op": "add", "path": "/metadata/labels", "value": {"a": "b"}}])).unwrap();
        let resp = AdmissionResponse::from(&req).with_patch(patch).unwrap();
        let out: serde_json::Value = serde_json::from_slice(&encode_review(resp)).unwrap();
        assert_eq!(out["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(out["kind"], "AdmissionReview");
        assert_eq!(out["response"]["uid"], "u1");
        assert_eq!(out["response"]["allowed"], true);
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().unwrap())
            .unwrap();
        let ops: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(ops[0]["op"], "add");
    }
}
