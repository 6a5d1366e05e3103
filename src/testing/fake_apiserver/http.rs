//! HTTP plumbing shared by the handlers: the response body type, JSON and Status responses,
//! bounded body reads and query-string decoding.
use std::collections::HashMap;
use std::convert::Infallible;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;

use super::error::ApiError;

pub type Body = BoxBody<Bytes, Infallible>;

/// kube-apiserver's request size limit (etcd's value limit is about the same).
const MAX_BODY: usize = 3 * 1024 * 1024;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

pub fn json(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::OK))
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(v).unwrap_or_default()))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

pub fn error(e: &ApiError) -> Response<Body> {
    let mut r = json(e.code, &e.to_status());
    if let Some(secs) = e.retry_after
        && let Ok(v) = http::HeaderValue::from_str(&secs.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    r
}

pub fn text(code: u16, body: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::OK))
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(body.to_string()))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// Reads a request body, refusing more than kube-apiserver would.
pub async fn read_body(body: hyper::body::Incoming) -> Result<Bytes, ApiError> {
    Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ApiError::new(413, "RequestEntityTooLarge", format!("request body: {e}")))
}

/// Parses a JSON or YAML object body.
pub fn parse_object(bytes: &[u8]) -> Result<Value, ApiError> {
    let v: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(_) => serde_yaml::from_slice(bytes)
            .map_err(|e| ApiError::bad_request(format!("the body of the request could not be decoded: {e}")))?,
    };
    Ok(v)
}

/// Decoded query parameters (the last value wins for repeated keys).
pub fn query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = query(Some("labelSelector=app%20in%20(a%2Cb)&limit=2&x=a+b&watch"));
        assert_eq!(q["labelSelector"], "app in (a,b)");
        assert_eq!(q["limit"], "2");
        assert_eq!(q["x"], "a b");
        assert_eq!(q["watch"], "");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
