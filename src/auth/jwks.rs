//! Fetching a JWKS from an issuer's `jwks_uri` (http or https; the system trust store, which
//! honours `SSL_CERT_FILE`/`SSL_CERT_DIR`, verifies https), as istiod's JwtAuthenticator does.
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};

/// Largest JWKS accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// Keys are refetched this often (istiod's `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL` default).
pub const REFRESH_EVERY: Duration = Duration::from_secs(20 * 60);
/// A failed fetch is retried this soon.
pub const RETRY_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum JwksFetchError {
    #[error("bad jwks_uri {0:?}")]
    BadUri(String),
    #[error("trust store: {0}")]
    Roots(String),
    #[error("fetching {uri}: {reason}")]
    Fetch { uri: String, reason: String },
    #[error("fetching {uri}: HTTP {status}")]
    Status { uri: String, status: u16 },
}

/// GETs `uri` and returns the body.
pub async fn fetch(uri: &str, timeout: Duration) -> Result<String, JwksFetchError> {
    let parsed: http::Uri = uri.parse().map_err(|_| JwksFetchError::BadUri(uri.to_string()))?;
    crate::tls::provider();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| JwksFetchError::Roots(e.to_string()))?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<Bytes>>(https);
    let fail = |reason: String| JwksFetchError::Fetch {
        uri: uri.to_string(),
        reason,
    };
    let req = http::Request::get(parsed)
        .header("accept", "application/json")
        .body(Empty::new())
        .map_err(|e| fail(e.to_string()))?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(JwksFetchError::Status {
            uri: uri.to_string(),
            status: resp.status().as_u16(),
        });
    }
    let body = tokio::time::timeout(timeout, Limited::new(resp.into_body(), MAX_JWKS_BYTES).collect())
        .await
        .map_err(|_| fail(format!("body not received within {timeout:?}")))?
        .map_err(|e| fail(e.to_string()))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| fail("JWKS is not UTF-8".into()))
}
