//! Facts about X.509 certificates that meshd and its tests look at.
use std::time::{Duration, SystemTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, thiserror::Error)]
#[error("not a valid X.509 certificate")]
pub struct CertParseError;

/// The parts of a certificate meshd reasons about.
#[derive(Debug, Clone)]
pub struct CertFacts {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    pub ip_sans: Vec<std::net::IpAddr>,
    pub san_critical: bool,
    pub subject_empty: bool,
    pub subject: String,
    pub server_auth: bool,
    pub client_auth: bool,
}

pub fn facts(der: &[u8]) -> Result<CertFacts, CertParseError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| CertParseError)?;
    let mut f = CertFacts {
        not_before: to_system_time(cert.validity().not_before.timestamp()),
        not_after: to_system_time(cert.validity().not_after.timestamp()),
        is_ca: cert.is_ca(),
        uri_sans: vec![],
        dns_sans: vec![],
        ip_sans: vec![],
        san_critical: false,
        subject_empty: cert.subject().iter().next().is_none(),
        subject: cert.subject().to_string(),
        server_auth: false,
        client_auth: false,
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        f.san_critical = san.critical;
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => f.uri_sans.push(u.to_string()),
                GeneralName::DNSName(d) => f.dns_sans.push(d.to_string()),
                GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        f.ip_sans.push(std::net::IpAddr::from(a));
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        f.ip_sans.push(std::net::IpAddr::from(a));
                    }
                }
                _ => {}
            }
        }
    }
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        f.server_auth = eku.value.server_auth;
        f.client_auth = eku.value.client_auth;
    }
    Ok(f)
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}
