//! xDS: the ADS server (SotW and Delta), per-connection protocol state, push machinery and the
//! generators that turn the service model into Envoy and proxyless-gRPC configuration.

pub mod config_dump;
pub mod generators;
pub mod held;
pub mod interned;
pub mod node;
pub mod push;
pub mod requests;
pub mod resource;
pub mod server;
pub mod types;
pub mod wire;

pub use server::XdsServer;
