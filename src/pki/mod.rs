//! Certificates, keys and CSRs: parsing and checks, with no knowledge of gRPC.

pub mod cert;
pub mod csr;
pub mod keys;
pub mod pem;
pub mod spiffe;

pub use csr::{CsrError, CsrKey, VerifiedCsr};
pub use spiffe::SpiffeId;

/// sha256 over aws-lc-rs: the one hashing entry point (fingerprints, token cache keys, key ids).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}
