//! The service model: services, endpoints and Istio networking config, merged across clusters
//! into immutable, versioned snapshots that xDS generators read without locks.
//!
//! Sources write per-cluster shards into [`store::MeshStore`] (Kubernetes watchers per cluster,
//! or the `--config-dir` file source); every write records what changed so the push machinery can
//! tell an endpoint-only change (EDS for the changed hosts) from a full push.

pub mod istio;
pub mod model;
pub mod network;
pub mod store;
// --- sources of the service model (Kubernetes per cluster, --config-dir files) ---
pub mod convert;
pub mod debug;
pub mod file_source;
pub mod gateway_dns;
pub mod kube_source;
// --- end sources ---

pub use model::{Endpoint, Locality, Protocol, Service, ServiceKey, ServicePort};
pub use store::{Change, MeshStore, Snapshot};
