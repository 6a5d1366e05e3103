//! Runtime-switchable faults (latency, injected error codes) and the counters tests read:
//! requests per verb and resource, and TokenReviews per token and audience.
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::error::ApiError;

#[derive(Default)]
struct FaultState {
    latency: Duration,
    fail_next: VecDeque<u16>,
    failure_rate: Option<(f64, u16)>,
    retry_after: u32,
}

/// Faults applied to every API request (never to `/fake/` control calls).
pub struct Faults {
    state: Mutex<FaultState>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            state: Mutex::new(FaultState {
                retry_after: 1,
                ..Default::default()
            }),
        }
    }
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_latency(&self, d: Duration) {
        self.lock().latency = d;
    }

    pub fn latency(&self) -> Duration {
        self.lock().latency
    }

    /// The next `n` API requests fail with `code`.
    pub fn fail_next(&self, n: usize, code: u16) {
        self.lock().fail_next.extend(std::iter::repeat_n(code, n));
    }

    /// Each API request fails with `code` with probability `rate` (0 turns it off).
    pub fn set_failure_rate(&self, rate: f64, code: u16) {
        self.lock().failure_rate = (rate > 0.0).then_some((rate.min(1.0), code));
    }

    /// `Retry-After` seconds on injected 429/503s.
    pub fn set_retry_after(&self, secs: u32) {
        self.lock().retry_after = secs;
    }

    pub fn clear(&self) {
        let mut s = self.lock();
        s.latency = Duration::ZERO;
        s.fail_next.clear();
        s.failure_rate = None;
    }

    /// The injected failure for this request, if any.
    pub fn take_failure(&self) -> Option<ApiError> {
        let mut s = self.lock();
        let code = s.fail_next.pop_front().or_else(|| {
            s.failure_rate
                .filter(|(rate, _)| rand::random::<f64>() < *rate)
                .map(|(_, code)| code)
        })?;
        Some(ApiError::injected(code, s.retry_after))
    }
}

/// One TokenReview as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenReviewRecord {
    pub token: String,
    pub audiences: Vec<String>,
    pub authenticated: bool,
    pub error: String,
}

#[derive(Default)]
pub struct Counters {
    total: AtomicU64,
    requests: Mutex<HashMap<(String, String), u64>>,
    reviews: Mutex<Vec<TokenReviewRecord>>,
}

impl Counters {
    pub fn count_request(&self, verb: &str, resource: &str) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if resource.is_empty() {
            return;
        }
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((verb.to_string(), resource.to_string()))
            .or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn requests(&self, verb: &str, resource: &str) -> u64 {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(verb.to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0)
    }

    pub fn all_requests(&self) -> Vec<((String, String), u64)> {
        let mut v: Vec<_> = self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        v.sort();
        v
    }

    pub fn record_review(&self, r: TokenReviewRecord) {
        self.reviews.lock().unwrap_or_else(|e| e.into_inner()).push(r);
    }

    pub fn reviews(&self) -> Vec<TokenReviewRecord> {
        self.reviews.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
