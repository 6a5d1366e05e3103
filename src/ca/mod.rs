//! The mesh CA: its key material (plugged-in `cacerts` files or a persisted self-signed root),
//! leaf signing, and the `IstioCertificateService` gRPC handler.

pub mod kube_secret;
pub mod material;
pub mod service;
pub mod signer;
pub mod store;

pub use material::{CaMaterial, CaSource, MaterialError};
pub use signer::{CaSigner, SignError, Signer, TtlPolicy};
pub use store::CaStore;
