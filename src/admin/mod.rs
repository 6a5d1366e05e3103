//! Operator surfaces: the metrics registry, readiness, and the HTTP servers for 15014 and 8080.

pub mod debug;
pub mod http;
pub mod metrics;
pub mod process;
pub mod ready;

pub use metrics::Registry;
pub use ready::Readiness;
