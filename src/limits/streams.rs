//! Concurrent gRPC calls per connection (istiod's `ISTIO_GPRC_MAXSTREAMS`). HTTP/2's own
//! SETTINGS limit makes clients queue silently; this layer instead answers the call over the
//! limit at once with RESOURCE_EXHAUSTED, so the caller learns why.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::admin::metrics::Counter;

/// Open calls per connection, keyed by the peer's address (unique per TCP connection).
#[derive(Clone)]
pub struct StreamLimitLayer {
    max: usize,
    open: Arc<Mutex<HashMap<SocketAddr, usize>>>,
    refused: Arc<Counter>,
}

impl StreamLimitLayer {
    pub fn new(max: usize, refused: Arc<Counter>) -> Self {
        Self {
            max: max.max(1),
            open: Arc::default(),
            refused,
        }
    }
}

impl<S> tower::Layer<S> for StreamLimitLayer {
    type Service = StreamLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        StreamLimit {
            inner,
            limit: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct StreamLimit<S> {
    inner: S,
    limit: StreamLimitLayer,
}

/// Releases one call's slot when dropped (the response body ends or the call is abandoned).
struct Slot {
    peer: SocketAddr,
    open: Arc<Mutex<HashMap<SocketAddr, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

fn peer_of<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>().and_then(|c| c.remote_addr()).or_else(|| {
        ext.get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|c| c.get_ref().remote_addr())
    })
}

impl<S, ReqBody> tower::Service<http::Request<ReqBody>> for StreamLimit<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let Some(peer) = peer_of(&req) else {
            let fut = self.inner.call(req);
            return Box::pin(fut);
        };
        let slot = {
            let mut open = self.limit.open.lock().unwrap_or_else(|e| e.into_inner());
            let n = open.entry(peer).or_default();
            if *n >= self.limit.max {
                None
            } else {
                *n += 1;
                Some(Slot {
                    peer,
                    open: Arc::clone(&self.limit.open),
                })
            }
        };
        let Some(slot) = slot else {
            self.limit.refused.inc();
            tracing::warn!(peer = %peer, max = self.limit.max, path = %req.uri().path(), "call refused: too many concurrent streams on one connection");
            let status = Status::resource_exhausted(format!(
                "too many concurrent streams on this connection (limit {}); open another connection or close idle streams",
                self.limit.max
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| tonic::body::Body::new(Guarded { body, _slot: slot })))
        })
    }
}

/// A response body that holds its call's slot until it is finished or dropped.
struct Guarded {
    body: tonic::body::Body,
    _slot: Slot,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
