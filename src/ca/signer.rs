//! Leaf signing with istiod's template (reference §1.3): 128-bit random serial, NotBefore now-2m,
//! critical SAN with the authenticated identity only, empty subject, EKU server+client auth,
//! never a CA, NotAfter clamped to the signing certificate's.
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};

use super::store::CaStore;
use crate::clock::SharedClock;
use crate::pki::VerifiedCsr;
use crate::pki::pem::cert_to_pem;

/// Clock skew allowance, istiod's `ClockSkewGracePeriod`.
pub const BACKDATE: Duration = Duration::from_secs(120);

/// Lifetime rules: `DEFAULT_WORKLOAD_CERT_TTL` and `MAX_WORKLOAD_CERT_TTL`.
#[derive(Debug, Clone, Copy)]
pub struct TtlPolicy {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(90 * 86400),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SignError {
    #[error("requested TTL {requested}s is greater than the max allowed TTL {max}s")]
    TtlTooLong { requested: i64, max: u64 },
    #[error("CA signing certificate expired; rotate the CA (cacerts) and retry")]
    CaExpired,
    #[error("CA is not ready")]
    CaNotReady,
    #[error("failed to generate the certificate: {0}")]
    CertGen(String),
}

impl SignError {
    /// The `error` label of `citadel_server_csr_sign_err_count`, as istiod names them.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SignError::TtlTooLong { .. } => "TTL_ERROR",
            SignError::CaExpired | SignError::CertGen(_) => "CERT_GEN_ERROR",
            SignError::CaNotReady => "CA_NOT_READY",
        }
    }
}

/// The CA seam: tests fake it, the real one is [`CaSigner`].
pub trait Signer: Send + Sync {
    /// Signs a leaf for the CSR's key carrying exactly `sans` and returns the response chain
    /// `[leaf, chain…, root bundle]`.
    fn sign_workload(
        &self,
        csr: &VerifiedCsr,
        sans: &[String],
        requested_ttl_secs: i64,
    ) -> Result<Vec<String>, SignError>;
}

/// Signs with the material currently in a [`CaStore`].
#[derive(Debug, Clone)]
pub struct CaSigner {
    store: Arc<CaStore>,
    clock: SharedClock,
    policy: TtlPolicy,
}

impl CaSigner {
    pub fn new(store: Arc<CaStore>, clock: SharedClock, policy: TtlPolicy) -> Self {
        Self { store, clock, policy }
    }

    pub fn store(&self) -> &Arc<CaStore> {
        &self.store
    }

    /// Chooses NotAfter for a request, or refuses it.
    fn not_after(
        &self,
        now: SystemTime,
        ca_not_after: SystemTime,
        requested_secs: i64,
    ) -> Result<SystemTime, SignError> {
        if requested_secs > 0 && requested_secs as u64 > self.policy.max_ttl.as_secs() {
            return Err(SignError::TtlTooLong {
                requested: requested_secs,
                max: self.policy.max_ttl.as_secs(),
            });
        }
        if ca_not_after <= now {
            return Err(SignError::CaExpired);
        }
        let ttl = if requested_secs <= 0 {
            self.policy.default_ttl
        } else {
            Duration::from_secs(requested_secs as u64)
        };
        Ok((now + ttl).min(ca_not_after))
    }
}

impl Signer for CaSigner {
    fn sign_workload(
        &self,
        csr: &VerifiedCsr,
        sans: &[String],
        requested_ttl_secs: i64,
    ) -> Result<Vec<String>, SignError> {
        let material = self.store.load();
        let now = self.clock.now();
        let not_after = self.not_after(now, material.signing_not_after, requested_ttl_secs)?;
        let params = leaf_params(sans, now - BACKDATE, not_after)?;
        let spki = SubjectPublicKeyInfo::from_der(&csr.spki_der).map_err(|e| SignError::CertGen(e.to_string()))?;
        let cert = params
            .signed_by(&spki, &material.issuer)
            .map_err(|e| SignError::CertGen(e.to_string()))?;
        let mut chain = Vec::with_capacity(2 + material.chain_pems.len());
        chain.push(cert_to_pem(cert.der()));
        chain.extend(material.chain_pems.iter().cloned());
        chain.push(material.root_bundle_pem.clone());
        Ok(chain)
    }
}

/// Certificate parameters for a workload or serving leaf.
pub fn leaf_params(
    sans: &[String],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, SignError> {
    let mut params = CertificateParams::default();
    // An empty subject makes rcgen mark the SAN extension critical, as RFC 5280 and istiod do.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans.iter().map(|s| san_entry(s)).collect::<Result<_, _>>()?;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// istiod's SAN rule: `spiffe://` → URI, an IP literal → IP, anything else → DNS.
fn san_entry(s: &str) -> Result<SanType, SignError> {
    if s.starts_with("spiffe://") {
        return s
            .try_into()
            .map(SanType::URI)
            .map_err(|_| SignError::CertGen(format!("invalid URI SAN {s:?}")));
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    s.try_into()
        .map(SanType::DnsName)
        .map_err(|_| SignError::CertGen(format!("invalid DNS SAN {s:?}")))
}

/// A positive 128-bit random serial number.
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // keep 16 significant bytes so DER never shortens it
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::material::load_or_create_self_signed;
    use crate::clock::FakeClock;
    use crate::pki::cert::facts;
    use crate::pki::keys::KeyType;
    use crate::pki::pem::parse_certs;

    fn signer(dir: &std::path::Path, clock: FakeClock) -> CaSigner {
        let m = load_or_create_self_signed(dir, "cluster.local", KeyType::EcdsaP256, clock.now()).unwrap();
        let store = CaStore::new(m, None).unwrap();
        CaSigner::new(store, Arc::new(clock), TtlPolicy::default())
    }

    fn csr() -> VerifiedCsr {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://evil/ns/kube-system/sa/admin".try_into().unwrap(),
        )];
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        crate::pki::csr::parse_and_verify(&p.serialize_request(&key).unwrap().pem().unwrap()).unwrap()
    }

    use crate::clock::Clock;

    #[test]
    fn leaf_follows_istio_template() {
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::new(SystemTime::now());
        let s = signer(dir.path(), clock.clone());
        let id = "spiffe://cluster.local/ns/default/sa/web".to_string();
        let v = csr();
        assert!(v.requested_ca);
        let chain = s.sign_workload(&v, std::slice::from_ref(&id), 0).unwrap();
        assert_eq!(chain.len(), 2, "self-signed CA answers [leaf, root]");
        let leaf = &parse_certs(chain[0].as_bytes()).unwrap()[0];
        let f = facts(leaf).unwrap();
        assert_eq!(f.uri_sans, vec![id]);
        assert!(f.dns_sans.is_empty() && f.ip_sans.is_empty());
        assert!(f.san_critical);
        assert!(f.subject_empty);
        assert!(!f.is_ca, "a CA:true CSR must never yield a CA");
        assert!(f.server_auth && f.client_auth);
        let now = crate::clock::unix_seconds(clock.now()) as i64;
        let nb = crate::clock::unix_seconds(f.not_before) as i64;
        let na = crate::clock::unix_seconds(f.not_after) as i64;
        assert!((now - 120 - nb).abs() <= 1, "NotBefore is now-2m");
        assert!((na - now - 86400).abs() <= 1, "default TTL is 24h");
    }

    #[test]
    fn ttl_rules() {
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::new(SystemTime::now());
        let s = signer(dir.path(), clock.clone());
        let id = vec!["spiffe://cluster.local/ns/a/sa/b".to_string()];
        let over = 90 * 86400 + 1;
        assert_eq!(
            s.sign_workload(&csr(), &id, over).unwrap_err(),
            SignError::TtlTooLong {
                requested: over,
                max: 90 * 86400
            }
        );
        let chain = s.sign_workload(&csr(), &id, 3600).unwrap();
        let f = facts(&parse_certs(chain[0].as_bytes()).unwrap()[0]).unwrap();
        let ttl = f.not_after.duration_since(clock.now()).unwrap().as_secs();
        assert!((3599..=3600).contains(&ttl));
        // Negative means "default", as in istiod.
        let chain = s.sign_workload(&csr(), &id, -5).unwrap();
        let f = facts(&parse_certs(chain[0].as_bytes()).unwrap()[0]).unwrap();
        let ttl = f.not_after.duration_since(clock.now()).unwrap().as_secs();
        assert!((86399..=86400).contains(&ttl));
    }

    #[test]
    fn not_after_is_clamped_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::new(SystemTime::now());
        let s = signer(dir.path(), clock.clone());
        let ca_end = s.store().load().signing_not_after;
        clock.set(ca_end - Duration::from_secs(3600));
        let id = vec!["spiffe://cluster.local/ns/a/sa/b".to_string()];
        let chain = s.sign_workload(&csr(), &id, 0).unwrap();
        let f = facts(&parse_certs(chain[0].as_bytes()).unwrap()[0]).unwrap();
        assert_eq!(
            crate::clock::unix_seconds(f.not_after),
            crate::clock::unix_seconds(ca_end)
        );
        clock.set(ca_end + Duration::from_secs(1));
        assert_eq!(s.sign_workload(&csr(), &id, 0).unwrap_err(), SignError::CaExpired);
    }
}
