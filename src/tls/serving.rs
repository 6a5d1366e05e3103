//! istiod's serving certificate: signed by the mesh CA with DNS SANs `istiod.<ns>.svc`,
//! `istiod-remote.<ns>.svc`, `istio-pilot.<ns>.svc` and every `ISTIOD_CUSTOM_HOST` entry (an IP
//! literal becomes an IP SAN, which is how a LoadBalancer IP is made valid). It is reissued
//! before it expires and whenever the CA changes; established connections keep their session.
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::ca::signer::{BACKDATE, leaf_params};
use crate::ca::store::CaStore;
use crate::clock::SharedClock;
use crate::pki::keys::KeyType;
use crate::pki::pem;

#[derive(Debug, Clone)]
pub struct ServingCertConfig {
    /// DNS names and IP literals, in the order given.
    pub sans: Vec<String>,
    pub key_type: KeyType,
    pub ttl: Duration,
}

impl ServingCertConfig {
    /// istiod's names for `namespace`, plus `extra` (`ISTIOD_CUSTOM_HOST` / `--server-san`).
    pub fn istiod_names(namespace: &str, extra: &[String]) -> Vec<String> {
        let mut names = vec![
            format!("istiod.{namespace}.svc"),
            format!("istiod-remote.{namespace}.svc"),
            format!("istio-pilot.{namespace}.svc"),
        ];
        for e in extra {
            let e = e.trim();
            if !e.is_empty() && !names.iter().any(|n| n == e) {
                names.push(e.to_string());
            }
        }
        names
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("generating the serving key: {0}")]
    Key(String),
    #[error("signing the serving certificate: {0}")]
    Sign(String),
}

/// A freshly issued serving certificate.
pub struct IssuedServingCert {
    pub certified: Arc<CertifiedKey>,
    pub not_after: SystemTime,
    pub issued_at: SystemTime,
}

/// Issues a serving certificate from the CA's current material.
pub fn issue(store: &CaStore, cfg: &ServingCertConfig, now: SystemTime) -> Result<IssuedServingCert, ServingError> {
    let material = store.load();
    let key = cfg.key_type.generate().map_err(|e| ServingError::Key(e.to_string()))?;
    let not_after = (now + cfg.ttl).min(material.signing_not_after);
    let params = leaf_params(&cfg.sans, now - BACKDATE, not_after).map_err(|e| ServingError::Sign(e.to_string()))?;
    let cert = params
        .signed_by(&key, &material.issuer)
        .map_err(|e| ServingError::Sign(e.to_string()))?;
    let mut chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
    for c in &material.chain_pems {
        if let Ok(mut certs) = pem::parse_certs(c.as_bytes()) {
            chain.append(&mut certs);
        }
    }
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing_key = super::provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| ServingError::Key(e.to_string()))?;
    Ok(IssuedServingCert {
        certified: Arc::new(CertifiedKey::new(chain, signing_key)),
        not_after,
        issued_at: now,
    })
}

/// Hands rustls whatever serving certificate is current.
#[derive(Debug)]
pub struct ServingCertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ServingCertResolver {
    pub fn new(initial: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::new(initial),
        })
    }

    pub fn set(&self, ck: Arc<CertifiedKey>) {
        self.current.store(ck);
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for ServingCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// When to renew: two thirds into the certificate's life.
pub fn renew_at(issued: &IssuedServingCert) -> SystemTime {
    let life = issued.not_after.duration_since(issued.issued_at).unwrap_or_default();
    issued.issued_at + life * 2 / 3
}

/// Keeps the resolver's certificate fresh: reissues at two thirds of its life and whenever the CA
/// material changes. `on_rotate` runs after each swap (e.g. to refresh the client verifier's roots).
pub fn spawn_rotation(
    store: Arc<CaStore>,
    resolver: Arc<ServingCertResolver>,
    cfg: ServingCertConfig,
    clock: SharedClock,
    first: IssuedServingCert,
    on_ca_change: Arc<dyn Fn() + Send + Sync>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = store.subscribe();
        let mut due = renew_at(&first);
        loop {
            let wait = due.duration_since(clock.now()).unwrap_or(Duration::ZERO);
            let ca_changed = tokio::select! {
                _ = tokio::time::sleep(wait) => false,
                r = changes.changed() => {
                    if r.is_err() { return; }
                    true
                }
            };
            if ca_changed {
                on_ca_change();
            }
            match issue(&store, &cfg, clock.now()) {
                Ok(next) => {
                    tracing::info!(
                        reason = if ca_changed { "ca-changed" } else { "renewal" },
                        not_after = crate::clock::unix_seconds(next.not_after),
                        "rotated the serving certificate"
                    );
                    due = renew_at(&next);
                    resolver.set(next.certified);
                }
                Err(e) => {
                    tracing::error!(error = %e, "reissuing the serving certificate failed; retrying in 10s");
                    due = clock.now() + Duration::from_secs(10);
                }
            }
        }
    })
}
