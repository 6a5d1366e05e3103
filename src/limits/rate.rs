//! A token bucket for new xDS streams (istiod's `PILOT_MAX_REQUESTS_PER_SECOND`, burst 1): a
//! caller waits for its turn up to a bound, else is refused at once.
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// May go negative: callers already promised a later slot.
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `per_second` ≤ 0 means no limit.
    pub fn new(per_second: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_second,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    /// How long the caller must wait for its slot, reserving it; `None` (nothing reserved) when
    /// that would be longer than `max_wait`.
    pub fn reserve(&self, max_wait: Duration) -> Option<Duration> {
        if self.per_second <= 0.0 {
            return Some(Duration::ZERO);
        }
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.per_second;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.at = now;
        let wait = if b.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - b.tokens) / self.per_second)
        };
        if wait > max_wait {
            return None;
        }
        b.tokens -= 1.0;
        Some(wait)
    }

    /// Waits for a slot for up to `max_wait`; false means refused.
    pub async fn acquire(&self, max_wait: Duration) -> bool {
        match self.reserve(max_wait) {
            Some(wait) if wait.is_zero() => true,
            Some(wait) => {
                tokio::time::sleep(wait).await;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_paced_then_refused() {
        let r = RateLimiter::new(10.0, 1);
        assert_eq!(r.reserve(Duration::from_secs(1)), Some(Duration::ZERO));
        // The next slots are 100 ms apart; with a 1 s bound, ten more fit and the eleventh waits too long.
        for i in 1..=10u32 {
            let w = r.reserve(Duration::from_secs(1)).expect("within the bound");
            assert!((w.as_secs_f64() - 0.1 * f64::from(i)).abs() < 1e-6, "{w:?}");
        }
        assert_eq!(r.reserve(Duration::from_secs(1)), None);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(r.acquire(Duration::ZERO).await, "refilled");
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let r = RateLimiter::new(0.0, 1);
        for _ in 0..1000 {
            assert_eq!(r.reserve(Duration::ZERO), Some(Duration::ZERO));
        }
    }
}
