//! A small HTTP/1.1 server for the monitoring (15014) and readiness (8080) ports.
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{Readiness, Registry};

pub type Body = Full<Bytes>;
type BoxFut = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
/// A request handler; it also receives the caller's address (debug endpoints check loopback).
pub type Handler = Arc<dyn Fn(Request<Incoming>, SocketAddr) -> BoxFut + Send + Sync>;

/// Slowloris guard: a client must finish sending headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

pub use super::debug::DebugSources;

pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, ""))
}

/// The monitoring port: `/metrics`, `/version`, `/ready`, `/debug/*`.
pub fn monitoring_handler(registry: Arc<Registry>, readiness: Arc<Readiness>, debug: Arc<DebugSources>) -> Handler {
    let process = Arc::new(super::process::ProcessGauges::register(&registry));
    Arc::new(move |req, peer| {
        let registry = Arc::clone(&registry);
        let process = Arc::clone(&process);
        let readiness = Arc::clone(&readiness);
        let debug = Arc::clone(&debug);
        Box::pin(async move {
            if req.method() != Method::GET {
                return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
            }
            let path = req.uri().path();
            if path.starts_with("/debug/") {
                return super::debug::handle(&debug, path, req.uri().query(), peer, req.headers()).await;
            }
            match path {
                "/metrics" => {
                    process.refresh();
                    Response::builder()
                        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                        .body(Full::new(Bytes::from(registry.encode())))
                        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, ""))
                }
                "/version" => text(StatusCode::OK, format!("meshd {}\n", env!("CARGO_PKG_VERSION"))),
                "/ready" => ready_response(&readiness),
                _ => text(StatusCode::NOT_FOUND, "not found; try /metrics, /version or /ready\n"),
            }
        })
    })
}

/// The readiness port: `/ready` only.
pub fn ready_handler(readiness: Arc<Readiness>) -> Handler {
    Arc::new(move |req, _peer| {
        let readiness = Arc::clone(&readiness);
        Box::pin(async move {
            match req.uri().path() {
                "/ready" | "/healthz/ready" => ready_response(&readiness),
                _ => text(StatusCode::NOT_FOUND, "not found; try /ready\n"),
            }
        })
    })
}

fn ready_response(readiness: &Readiness) -> Response<Body> {
    let pending = readiness.pending();
    if pending.is_empty() {
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: waiting for {}\n", pending.join(", ")),
        )
    }
}

/// Serves `handler` on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, handler: Handler, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let fut = handler(req, peer);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
