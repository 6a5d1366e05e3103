//! CSR parsing and checks (`meshd::pki::csr`) and the SPIFFE ids they feed (`meshd::pki::spiffe`).
//!
//! Input: the first byte picks how the rest is read.
//! - even: PEM text for `parse_and_verify` (what CreateCertificate receives);
//! - odd: DER for `verify_der`, and the same DER wrapped in a PEM block for `parse_and_verify`.
//!
//! Asserts: nothing panics; the PEM and DER paths agree on the same request; an accepted CSR has
//! a supported key (RSA >= 2048 bits, P-256, P-384) whose SPKI parses; every SPIFFE id the parser
//! accepts (from the CSR's URI SANs or the raw text) prints back as the same URI and holds valid
//! Kubernetes names.
#![no_main]

use base64::Engine;
use libfuzzer_sys::fuzz_target;
use meshd::pki::csr::{self, CsrError, CsrKey, MIN_RSA_BITS, VerifiedCsr};
use meshd::pki::spiffe::{self, SpiffeId};
use x509_parser::prelude::FromDer;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let text = String::from_utf8_lossy(rest);
        check_result(&csr::parse_and_verify(&text));
        check_spiffe(&text);
        for line in text.lines() {
            check_spiffe(line.trim());
        }
    } else {
        let from_der = csr::verify_der(rest);
        check_result(&from_der);
        let pem = pem_wrap(rest);
        let from_pem = csr::parse_and_verify(&pem);
        check_result(&from_pem);
        match (&from_der, &from_pem) {
            (_, Err(CsrError::TooLarge(_))) => assert!(pem.len() > csr::MAX_CSR_BYTES),
            // An empty DER wraps to a PEM block with no body, which the PEM reader refuses.
            (Err(_), Err(CsrError::NotPem)) if rest.is_empty() => {}
            (Ok(a), Ok(b)) => {
                assert_eq!(a.spki_der, b.spki_der);
                assert_eq!(a.key, b.key);
                assert_eq!(a.requested_uris, b.requested_uris);
                assert_eq!(a.requested_ca, b.requested_ca);
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "DER and PEM paths disagree"),
            (a, b) => panic!("DER and PEM paths disagree: {a:?} vs {b:?}"),
        }
    }
});

fn pem_wrap(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE REQUEST-----\n");
    pem
}

fn check_result(r: &Result<VerifiedCsr, CsrError>) {
    match r {
        Ok(v) => check_verified(v),
        Err(CsrError::WeakRsa(bits)) => assert!(*bits < MIN_RSA_BITS),
        Err(e) => {
            // Every error renders (it is logged and returned to the caller).
            let _ = e.to_string();
        }
    }
}

fn check_verified(v: &VerifiedCsr) {
    if let CsrKey::Rsa { bits } = v.key {
        assert!(bits >= MIN_RSA_BITS, "accepted RSA-{bits}");
    }
    let (rest, _) =
        x509_parser::x509::SubjectPublicKeyInfo::from_der(&v.spki_der).expect("the SPKI of an accepted CSR parses");
    assert!(rest.is_empty());
    for uri in &v.requested_uris {
        check_spiffe(uri);
    }
}

fn check_spiffe(uri: &str) {
    let Ok(id) = SpiffeId::parse(uri) else {
        return;
    };
    assert_eq!(id.uri(), uri, "a parsed SPIFFE id prints back as itself");
    assert!(!id.trust_domain.is_empty());
    assert!(spiffe::is_valid_namespace(&id.namespace), "{uri}");
    assert!(spiffe::is_valid_service_account(&id.service_account), "{uri}");
    assert_eq!(SpiffeId::parse(&id.uri()).as_ref(), Ok(&id));
}
