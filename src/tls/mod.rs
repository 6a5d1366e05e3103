//! The rustls side of meshd's listeners: one crypto provider (aws-lc-rs), the serving
//! certificate (signed by the mesh CA, hot-rotated), the optional client-certificate verifier
//! that follows root changes, and a TLS accept loop that never lets a slow handshake block others.

pub mod acceptor;
pub mod client_verifier;
pub mod serving;

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The one crypto provider. Installing it as the process default means a dependency that pulls in
/// another provider cannot make `ServerConfig::builder()` panic.
pub fn provider() -> Arc<CryptoProvider> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A rustls server config for a gRPC listener: h2 only, client certificates optional and, when
/// given, verified against the mesh roots.
pub fn grpc_server_config(
    resolver: Arc<serving::ServingCertResolver>,
    verifier: Arc<client_verifier::MeshClientVerifier>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}
