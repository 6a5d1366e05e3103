//! Optional client certificates on 15012, verified against the current mesh roots.
//!
//! istiod uses `VerifyClientCertIfGiven`: proxies with only a JWT connect without a certificate,
//! and a certificate that is offered must chain to the mesh roots. The roots change when a
//! plugged CA rotates, so the inner webpki verifier is rebuilt and swapped.
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

#[derive(Debug, thiserror::Error)]
#[error("cannot build the client certificate verifier: {0}")]
pub struct VerifierError(String);

#[derive(Debug)]
pub struct MeshClientVerifier {
    inner: ArcSwap<Arc<dyn ClientCertVerifier>>,
}

fn build(roots: &[CertificateDer<'static>]) -> Result<Arc<dyn ClientCertVerifier>, VerifierError> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| VerifierError(e.to_string()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), super::provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| VerifierError(e.to_string()))
}

impl MeshClientVerifier {
    pub fn new(roots: &[CertificateDer<'static>]) -> Result<Arc<Self>, VerifierError> {
        Ok(Arc::new(Self {
            inner: ArcSwap::from_pointee(build(roots)?),
        }))
    }

    /// Trust a new root bundle for handshakes from now on.
    pub fn set_roots(&self, roots: &[CertificateDer<'static>]) -> Result<(), VerifierError> {
        self.inner.store(Arc::new(build(roots)?));
        Ok(())
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; returning none avoids holding a borrow into a swappable verifier.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.load().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.load().supported_verify_schemes()
    }
}
