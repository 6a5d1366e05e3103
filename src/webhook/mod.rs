//! Admission webhooks on istiod's 15017 (reference §3.1, `docs/webhooks.md`):
//!
//! - [`inject`]: `/inject` (and `/inject/cluster/<c>/net/<n>/…`), the sidecar injector;
//! - [`validate`]: `/validate`, checks of `networking.istio.io` Gateway, VirtualService and
//!   DestinationRule;
//! - [`server`]: the HTTPS listener (serving certificate, TLS ≥ 1.2, HTTP/1.1 and h2, no client
//!   auth) that decodes AdmissionReviews, routes them and counts them;
//! - [`cabundle`]: keeps `webhooks[*].clientConfig.caBundle` of the injector's and the
//!   validator's webhook configurations equal to the mesh roots, in every cluster this meshd
//!   leads (a job of the root-cert leader, `crate::rootcert::LeaderJob`).
pub mod cabundle;
pub mod inject;
pub mod server;
pub mod validate;

use std::sync::Arc;

use crate::admin::Registry;
use crate::admin::metrics::{Counter, CounterVec, Histogram, LATENCY_BUCKETS};

pub use server::{ServerError, spawn};

/// Istio's webhook metrics (names exported verbatim, reference §3.4).
#[derive(Clone)]
pub struct Metrics {
    pub injection_requests: Arc<Counter>,
    pub injection_success: Arc<Counter>,
    pub injection_failure: Arc<Counter>,
    pub injection_skip: Arc<Counter>,
    pub injection_time: Arc<Histogram>,
    /// `{group, version, resource}`.
    pub validation_passed: CounterVec,
    /// `{group, version, resource, reason}`.
    pub validation_failed: CounterVec,
    /// `{error}`: requests that were not AdmissionReviews.
    pub validation_http_error: CounterVec,
}

impl Metrics {
    pub fn register(r: &Registry) -> Self {
        Self {
            injection_requests: r.counter(
                "sidecar_injection_requests_total",
                "Total number of injection requests.",
            ),
            injection_success: r.counter(
                "sidecar_injection_success_total",
                "Total number of successful injection requests.",
            ),
            injection_failure: r.counter(
                "sidecar_injection_failure_total",
                "Total number of failed injection requests.",
            ),
            injection_skip: r.counter(
                "sidecar_injection_skip_total",
                "Total number of skipped injection requests.",
            ),
            injection_time: r.histogram(
                "sidecar_injection_time_seconds",
                "Total time taken for injection in seconds.",
                LATENCY_BUCKETS,
            ),
            validation_passed: r.counter_vec(
                "galley_validation_passed",
                "Resource is valid.",
                &["group", "version", "resource"],
            ),
            validation_failed: r.counter_vec(
                "galley_validation_failed",
                "Resource validation failed.",
                &["group", "version", "resource", "reason"],
            ),
            validation_http_error: r.counter_vec(
                "galley_validation_http_error",
                "Resource validation http serve errors.",
                &["error"],
            ),
        }
    }
}
