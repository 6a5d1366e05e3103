//! The cluster registry: the local (primary) cluster and every remote cluster, each with its own
//! `kube::Client`, fed by remote secrets or a kubeconfig directory. A broken cluster is recorded
//! and shown, never fatal, and never affects the others.

pub mod files;
pub mod kubeconfig;
pub mod registry;
pub mod secrets;

pub use registry::{ClusterHandle, ClusterHandler, ClusterRegistry, ClusterSource, ResolveError};
