//! PKCS#10 CSR parsing and checks, as istiod's CA applies them (reference §1.3): the signature
//! must verify and the key must be RSA >= 2048 or ECDSA P-256/P-384. Everything else in the CSR
//! (subject, SANs, extensions, a CA:true request) is reported but never used for signing.
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION};
use x509_parser::prelude::FromDer;

/// Largest PEM CSR accepted. A real RSA-4096 CSR with a few SANs is under 2 KiB.
pub const MAX_CSR_BYTES: usize = 64 * 1024;
/// Smallest RSA modulus accepted, as istiod (`WORKLOAD_RSA_KEY_SIZE` minimum).
pub const MIN_RSA_BITS: usize = 2048;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("CSR is {0} bytes; the limit is {MAX_CSR_BYTES} bytes")]
    TooLarge(usize),
    #[error("CSR is empty")]
    Empty,
    #[error("CSR is not a PEM \"CERTIFICATE REQUEST\" block")]
    NotPem,
    #[error("CSR is not a valid PKCS#10 request")]
    Malformed,
    #[error("CSR signature does not verify against its own public key")]
    BadSignature,
    #[error("CSR key is RSA-{0}; at least RSA-{MIN_RSA_BITS} is required")]
    WeakRsa(usize),
    #[error("CSR key type {0} is not supported; use RSA (>= 2048 bits) or ECDSA P-256/P-384")]
    UnsupportedKey(String),
}

/// The public key of a verified CSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrKey {
    Rsa { bits: usize },
    EcdsaP256,
    EcdsaP384,
}

/// A CSR whose signature verified; only `spki_der` goes into the certificate.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    /// DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    pub key: CsrKey,
    /// URI SANs the CSR asked for (logged when they differ from the authenticated identity).
    pub requested_uris: Vec<String>,
    /// Whether the CSR asked for a CA certificate (never granted).
    pub requested_ca: bool,
}

/// Parses a PEM CSR, checks its key type and verifies its signature.
pub fn parse_and_verify(pem: &str) -> Result<VerifiedCsr, CsrError> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(pem.len()));
    }
    if pem.trim().is_empty() {
        return Err(CsrError::Empty);
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(|_| CsrError::NotPem)?;
    verify_der(der.as_ref())
}

/// Same as [`parse_and_verify`] for DER input.
pub fn verify_der(der: &[u8]) -> Result<VerifiedCsr, CsrError> {
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|_| CsrError::Malformed)?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed);
    }
    let spki = &csr.certification_request_info.subject_pki;
    let key = classify_key(spki)?;
    // The key check comes first so a weak key is named as such, not as a signature failure.
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let mut requested_uris = Vec::new();
    let mut requested_ca = false;
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        if let GeneralName::URI(uri) = name {
                            requested_uris.push(uri.to_string());
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) => requested_ca |= bc.ca,
                _ => {}
            }
        }
    }
    Ok(VerifiedCsr {
        spki_der: spki.raw.to_vec(),
        key,
        requested_uris,
        requested_ca,
    })
}

fn classify_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<CsrKey, CsrError> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let parsed = spki.parsed().map_err(|_| CsrError::Malformed)?;
        let x509_parser::public_key::PublicKey::RSA(rsa) = parsed else {
            return Err(CsrError::Malformed);
        };
        let bits = modulus_bits(rsa.modulus);
        if bits < MIN_RSA_BITS {
            return Err(CsrError::WeakRsa(bits));
        }
        return Ok(CsrKey::Rsa { bits });
    }
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or(CsrError::Malformed)?;
        if curve == OID_EC_P256 {
            return Ok(CsrKey::EcdsaP256);
        }
        if curve == OID_NIST_EC_P384 {
            return Ok(CsrKey::EcdsaP384);
        }
        return Err(CsrError::UnsupportedKey(format!("EC curve {curve}")));
    }
    Err(CsrError::UnsupportedKey(format!("algorithm {alg}")))
}

fn modulus_bits(modulus: &[u8]) -> usize {
    let trimmed: &[u8] = {
        let start = modulus.iter().position(|b| *b != 0).unwrap_or(modulus.len());
        &modulus[start..]
    };
    match trimmed.first() {
        None => 0,
        Some(first) => (trimmed.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PublicKeyData, SanType};

    fn csr_pem(key: &KeyPair, uri: &str) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    #[test]
    fn accepts_p256_and_reports_requested_uri() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let v = parse_and_verify(&csr_pem(&key, "spiffe://x/ns/a/sa/b")).unwrap();
        assert_eq!(v.key, CsrKey::EcdsaP256);
        assert_eq!(v.requested_uris, vec!["spiffe://x/ns/a/sa/b".to_string()]);
        assert!(!v.requested_ca);
        assert_eq!(v.spki_der, key.subject_public_key_info());
    }

    #[test]
    fn accepts_p384_and_rsa2048() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert_eq!(
            parse_and_verify(&csr_pem(&key, "spiffe://x/ns/a/sa/b")).unwrap().key,
            CsrKey::EcdsaP384
        );
        let key = crate::pki::keys::KeyType::Rsa2048.generate().unwrap();
        assert_eq!(
            parse_and_verify(&csr_pem(&key, "spiffe://x/ns/a/sa/b")).unwrap().key,
            CsrKey::Rsa { bits: 2048 }
        );
    }

    #[test]
    fn rejects_ed25519() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(matches!(
            parse_and_verify(&csr_pem(&key, "spiffe://x/ns/a/sa/b")),
            Err(CsrError::UnsupportedKey(_))
        ));
    }

    #[test]
    fn rejects_tampered_signature() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = csr_pem(&key, "spiffe://x/ns/a/sa/b");
        let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        // Flip a byte inside the signed info (the SAN text), keeping the DER structure valid.
        let pos = der.windows(6).position(|w| w == b"ns/a/s").unwrap();
        der[pos + 3] = b'z';
        assert_eq!(verify_der(&der).unwrap_err(), CsrError::BadSignature);
    }

    #[test]
    fn rejects_junk_and_oversize() {
        assert_eq!(parse_and_verify("").unwrap_err(), CsrError::Empty);
        assert_eq!(parse_and_verify("hello").unwrap_err(), CsrError::NotPem);
        let junk = "-----BEGIN CERTIFICATE REQUEST-----\naGVsbG8=\n-----END CERTIFICATE REQUEST-----\n";
        assert_eq!(parse_and_verify(junk).unwrap_err(), CsrError::Malformed);
        let big = "A".repeat(MAX_CSR_BYTES + 1);
        assert_eq!(
            parse_and_verify(&big).unwrap_err(),
            CsrError::TooLarge(MAX_CSR_BYTES + 1)
        );
    }

    #[test]
    fn modulus_bits_counts_significant_bits() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x01, 0x00]), 9);
        assert_eq!(modulus_bits(&[]), 0);
    }
}
