//! Pieces every meshd gRPC server shares: health and server reflection, so ghz and grpcurl work
//! with no proto files.
use tonic_health::server::HealthReporter;

/// Reflection services (v1 and v1alpha: ghz and grpcurl try v1, grpcio-reflection uses v1alpha).
pub fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// A health service reporting SERVING for the server and the named services.
pub async fn health(
    services: &[&str],
) -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, server) = tonic_health::server::health_reporter();
    for s in services {
        reporter
            .set_service_status(*s, tonic_health::ServingStatus::Serving)
            .await;
    }
    (reporter, server)
}

/// Answers an over-size request with `RESOURCE_EXHAUSTED`, as grpc-go (and so istiod) does.
///
/// tonic rejects a message over `max_decoding_message_size` with `OUT_OF_RANGE`; clients and
/// dashboards expect `RESOURCE_EXHAUSTED` ("received message larger than max"). A unary call
/// fails before any response is produced, so the status is in the response headers and is
/// rewritten here; streaming handlers map the code themselves when their stream yields it.
#[derive(Debug, Clone, Copy, Default)]
pub struct OversizeStatusLayer;

impl<S> tower::Layer<S> for OversizeStatusLayer {
    type Service = OversizeStatus<S>;
    fn layer(&self, inner: S) -> Self::Service {
        OversizeStatus { inner }
    }
}

#[derive(Debug, Clone)]
pub struct OversizeStatus<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for OversizeStatus<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            rewrite_oversize(resp.headers_mut());
            Ok(resp)
        })
    }
}

/// `OUT_OF_RANGE` "decoded message length too large" → `RESOURCE_EXHAUSTED`.
pub fn rewrite_oversize(headers: &mut http::HeaderMap) {
    let is_out_of_range = headers.get("grpc-status").is_some_and(|v| v == "11");
    let is_size = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.contains("too%20large") || m.contains("too large"));
    if is_out_of_range && is_size {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}
