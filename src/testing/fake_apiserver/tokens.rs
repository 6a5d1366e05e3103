//! Service-account JWTs: the server's RSA signing key, bound (projected) tokens and legacy
//! secret-based tokens, and signature/claims checks with kube-apiserver's wording. Lookups in
//! the store (does the ServiceAccount still exist?) live in `authn`.
use std::time::{Duration, SystemTime};

use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::PublicKeyData;
use serde::{Deserialize, Serialize};

use super::FakeError;

/// `iss` of legacy secret-based tokens.
pub const LEGACY_ISSUER: &str = "kubernetes/serviceaccount";
/// Clock skew kube-apiserver tolerates on exp/nbf/iat (go-jose's DefaultLeeway).
pub const LEEWAY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameUid {
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeClaims {
    pub namespace: String,
    pub serviceaccount: NameUid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<NameUid>,
}

/// Claims of a bound (projected / TokenRequest) token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundClaims {
    pub aud: Vec<String>,
    pub exp: u64,
    pub iat: u64,
    pub nbf: u64,
    pub iss: String,
    #[serde(default)]
    pub jti: String,
    pub sub: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubeClaims,
}

/// Claims of a legacy token from a `kubernetes.io/service-account-token` Secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyClaims {
    pub iss: String,
    #[serde(rename = "kubernetes.io/serviceaccount/namespace")]
    pub namespace: String,
    #[serde(rename = "kubernetes.io/serviceaccount/secret.name")]
    pub secret_name: String,
    #[serde(rename = "kubernetes.io/serviceaccount/service-account.name")]
    pub sa_name: String,
    #[serde(rename = "kubernetes.io/serviceaccount/service-account.uid")]
    pub sa_uid: String,
    pub sub: String,
}

/// A signature-checked token.
#[derive(Debug, Clone)]
pub enum Verified {
    Bound(BoundClaims),
    Legacy(LegacyClaims),
}

/// Why a token did not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// Not a JWT, or one from an issuer this server does not own: other authenticators'
    /// business, so no error text.
    NotOurs,
    /// Ours by issuer but broken: the text kube-apiserver reports.
    Invalid(String),
}

/// What to put in a bound token.
#[derive(Debug, Clone)]
pub struct MintRequest {
    pub namespace: String,
    pub service_account: String,
    pub sa_uid: String,
    pub audiences: Vec<String>,
    pub ttl: Duration,
    pub pod: Option<(String, String)>,
    pub issued_at: SystemTime,
}

pub struct TokenSigner {
    issuer: String,
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwks_json: String,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenSigner {
    /// A fresh RSA-2048 key (kube-apiserver's service-account keys are RSA) for `issuer`.
    pub fn generate(issuer: &str) -> Result<Self, FakeError> {
        let key = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            .map_err(|e| FakeError::Crypto(e.to_string()))?;
        let crypto = |e: jsonwebtoken::errors::Error| FakeError::Crypto(e.to_string());
        let encoding = EncodingKey::from_rsa_pem(key.serialize_pem().as_bytes()).map_err(crypto)?;
        let decoding = DecodingKey::from_rsa_pem(key.public_key_pem().as_bytes()).map_err(crypto)?;
        // Like kube-apiserver: the key id is a hash of the public key.
        let kid =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crate::pki::sha256(&key.subject_public_key_info()));
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).map_err(crypto)?;
        jwk.common.key_id = Some(kid.clone());
        jwk.common.key_algorithm = Some(KeyAlgorithm::RS256);
        let jwks_json =
            serde_json::to_string(&JwkSet { keys: vec![jwk] }).map_err(|e| FakeError::Crypto(e.to_string()))?;
        Ok(Self {
            issuer: issuer.to_string(),
            kid,
            encoding,
            decoding,
            jwks_json,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The public keys as a JWKS document (`/openid/v1/jwks`).
    pub fn jwks_json(&self) -> &str {
        &self.jwks_json
    }

    fn sign<T: Serialize>(&self, claims: &T) -> Result<String, FakeError> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(|e| FakeError::Crypto(e.to_string()))
    }

    /// A bound token as TokenRequest issues it.
    pub fn mint_bound(&self, r: &MintRequest) -> Result<String, FakeError> {
        let iat = unix(r.issued_at);
        let claims = BoundClaims {
            aud: r.audiences.clone(),
            exp: iat + r.ttl.as_secs(),
            iat,
            nbf: iat,
            iss: self.issuer.clone(),
            jti: super::store::new_uid(),
            sub: format!("system:serviceaccount:{}:{}", r.namespace, r.service_account),
            kubernetes: KubeClaims {
                namespace: r.namespace.clone(),
                serviceaccount: NameUid {
                    name: r.service_account.clone(),
                    uid: r.sa_uid.clone(),
                },
                pod: r.pod.as_ref().map(|(name, uid)| NameUid {
                    name: name.clone(),
                    uid: uid.clone(),
                }),
            },
        };
        self.sign(&claims)
    }

    /// A legacy token as the token controller writes into a service-account-token Secret.
    pub fn mint_legacy(&self, namespace: &str, sa: &str, sa_uid: &str, secret: &str) -> Result<String, FakeError> {
        self.sign(&LegacyClaims {
            iss: LEGACY_ISSUER.into(),
            namespace: namespace.into(),
            secret_name: secret.into(),
            sa_name: sa.into(),
            sa_uid: sa_uid.into(),
            sub: format!("system:serviceaccount:{namespace}:{sa}"),
        })
    }

    /// Checks the signature and parses claims; time, audience and object checks come after.
    pub fn verify(&self, token: &str) -> Result<Verified, VerifyError> {
        let payload = token.split('.').nth(1).ok_or(VerifyError::NotOurs)?;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .map_err(|_| VerifyError::NotOurs)?;
        let peek: serde_json::Value = serde_json::from_slice(&raw).map_err(|_| VerifyError::NotOurs)?;
        let iss = peek.get("iss").and_then(|v| v.as_str()).unwrap_or_default();
        let legacy = iss == LEGACY_ISSUER;
        if !legacy && iss != self.issuer {
            return Err(VerifyError::NotOurs);
        }
        let mut v = Validation::new(Algorithm::RS256);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        let invalid = |e: jsonwebtoken::errors::Error| {
            use jsonwebtoken::errors::ErrorKind;
            VerifyError::Invalid(match e.kind() {
                ErrorKind::InvalidSignature => "go-jose/go-jose: error in cryptographic primitive".into(),
                ErrorKind::InvalidAlgorithm => "invalid signing method".into(),
                _ => format!("go-jose/go-jose: {e}"),
            })
        };
        if legacy {
            jsonwebtoken::decode::<LegacyClaims>(token, &self.decoding, &v)
                .map(|d| Verified::Legacy(d.claims))
                .map_err(invalid)
        } else {
            jsonwebtoken::decode::<BoundClaims>(token, &self.decoding, &v)
                .map(|d| Verified::Bound(d.claims))
                .map_err(invalid)
        }
    }
}

/// Time checks with kube-apiserver's messages.
pub fn check_times(c: &BoundClaims, now: SystemTime) -> Result<(), String> {
    let now = unix(now);
    let leeway = LEEWAY.as_secs();
    if now > c.exp + leeway {
        return Err("service account token has expired".into());
    }
    if now + leeway < c.nbf {
        return Err("service account token is not valid yet".into());
    }
    if now + leeway < c.iat {
        return Err("service account token is issued in the future".into());
    }
    Ok(())
}

/// Go's `%q` of a string slice: `["a" "b"]`.
pub fn go_quote_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ttl: u64) -> MintRequest {
        MintRequest {
            namespace: "ns".into(),
            service_account: "sa".into(),
            sa_uid: "u".into(),
            audiences: vec!["istio-ca".into()],
            ttl: Duration::from_secs(ttl),
            pod: Some(("p".into(), "pu".into())),
            issued_at: SystemTime::now(),
        }
    }

    #[test]
    fn mint_and_verify() {
        let s = TokenSigner::generate("https://kubernetes.default.svc.cluster.local").unwrap();
        let t = s.mint_bound(&req(3600)).unwrap();
        let Verified::Bound(c) = s.verify(&t).unwrap() else {
            panic!("bound")
        };
        assert_eq!(c.sub, "system:serviceaccount:ns:sa");
        assert_eq!(c.kubernetes.pod.as_ref().unwrap().uid, "pu");
        assert!(check_times(&c, SystemTime::now()).is_ok());
        assert!(check_times(&c, SystemTime::now() + Duration::from_secs(3600 + 61)).is_err());

        let other = TokenSigner::generate("https://kubernetes.default.svc.cluster.local").unwrap();
        assert_eq!(
            other.verify(&t).unwrap_err(),
            VerifyError::Invalid("go-jose/go-jose: error in cryptographic primitive".into())
        );
        let foreign = TokenSigner::generate("https://elsewhere").unwrap();
        assert_eq!(foreign.verify(&t).unwrap_err(), VerifyError::NotOurs);
        assert_eq!(s.verify("garbage").unwrap_err(), VerifyError::NotOurs);
        assert_eq!(go_quote_list(&["a".into(), "b".into()]), r#"["a" "b"]"#);
    }
}
