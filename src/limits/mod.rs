//! Load limits shared by the gRPC listeners: streams per connection, the new-stream rate and a
//! deadline for a connection's first bytes. Every refusal is RESOURCE_EXHAUSTED (or a closed
//! connection for a client that never speaks) and is counted in `meshd_limit_rejections{limit}`.
pub mod first_bytes;
pub mod rate;
pub mod streams;

use std::sync::Arc;

use crate::admin::Registry;
use crate::admin::metrics::{Counter, CounterVec};

/// The counter every limit reports refusals to.
#[derive(Clone)]
pub struct LimitMetrics {
    rejections: CounterVec,
}

impl LimitMetrics {
    pub fn register(registry: &Registry) -> Self {
        Self {
            rejections: registry.counter_vec(
                "meshd_limit_rejections",
                "Requests and connections refused by a load limit, by limit",
                &["limit"],
            ),
        }
    }

    pub fn counter(&self, limit: &str) -> Arc<Counter> {
        self.rejections.with(&[limit])
    }
}
