//! PEM splitting and joining in the shape Istio's CA responses use.
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("no PEM CERTIFICATE block found")]
    NoCertificates,
    #[error("malformed PEM: {0}")]
    Malformed(String),
}

/// Parses every CERTIFICATE block in `pem`.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(format!("{e:?}")))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificates);
    }
    Ok(certs)
}

/// Encodes one DER certificate as PEM, ending with a newline.
pub fn cert_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // chunks of an ASCII base64 string are valid UTF-8
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Splits a PEM bundle into one PEM string per certificate (each with a trailing newline), the
/// way istiod splits `cert-chain.pem` in its responses.
pub fn split_bundle(pem: &[u8]) -> Result<Vec<String>, PemError> {
    Ok(parse_certs(pem)?.iter().map(|c| cert_to_pem(c)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_reencode() {
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".into()]).unwrap();
        let bundle = format!("{}{}", a.cert.pem(), b.cert.pem());
        let parts = split_bundle(bundle.as_bytes()).unwrap();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.ends_with("-----END CERTIFICATE-----\n")));
        assert_eq!(
            parse_certs(parts[1].as_bytes()).unwrap()[0].as_ref(),
            b.cert.der().as_ref()
        );
        assert!(matches!(split_bundle(b"junk"), Err(PemError::NoCertificates)));
    }
}
