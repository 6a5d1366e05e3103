//! Key types meshd generates (CA roots, serving certs, workload keys in `meshd cert`).
use std::fmt;
use std::str::FromStr;

/// A key algorithm choice on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Rsa2048,
    EcdsaP256,
}

impl KeyType {
    /// Generates a fresh key pair of this type.
    pub fn generate(self) -> Result<rcgen::KeyPair, rcgen::Error> {
        match self {
            KeyType::Rsa2048 => rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048),
            KeyType::EcdsaP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        }
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "rsa-2048" | "rsa" | "rsa2048" => Ok(KeyType::Rsa2048),
            "ecdsa-p256" | "ecdsa" | "p256" | "ec-p256" => Ok(KeyType::EcdsaP256),
            other => Err(format!("unknown key type {other:?}; use rsa-2048 or ecdsa-p256")),
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::EcdsaP256 => "ecdsa-p256",
        })
    }
}
