//! meshd's own token issuer for standalone mode: an RSA key in the data dir that mints tokens
//! shaped like Kubernetes projected service-account tokens, so `meshd cert` and ghz can
//! authenticate without a cluster.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::PublicKeyData;
use serde::Serialize;

use super::jwt::{JwtRule, keys_from_jwks};
use crate::clock::unix_seconds;
use crate::fsutil;
use crate::pki::keys::KeyType;

/// `iss` of standalone tokens.
pub const STANDALONE_ISSUER: &str = "meshd/standalone";

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("issuer key {path} is invalid: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("no standalone issuer key at {0}; point --data-dir at the data dir of the running meshd")]
    NoKey(PathBuf),
    #[error("generating the issuer key: {0}")]
    Generate(String),
    #[error("signing the token: {0}")]
    Sign(String),
    #[error("{0:?} is not a valid Kubernetes namespace and service account pair")]
    BadName(String),
}

pub struct LocalIssuer {
    encoding: EncodingKey,
    kid: String,
    jwks_json: String,
}

impl std::fmt::Debug for LocalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalIssuer").field("kid", &self.kid).finish()
    }
}

#[derive(Serialize)]
struct TokenClaims<'a> {
    aud: &'a [String],
    exp: u64,
    iat: u64,
    nbf: u64,
    iss: &'a str,
    jti: String,
    #[serde(rename = "kubernetes.io")]
    kubernetes: KubeClaims<'a>,
    sub: String,
}

#[derive(Serialize)]
struct KubeClaims<'a> {
    namespace: &'a str,
    serviceaccount: NameUid<'a>,
}

#[derive(Serialize)]
struct NameUid<'a> {
    name: &'a str,
    uid: String,
}

/// Path of the issuer key inside a data dir.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("issuer").join("key.pem")
}

impl LocalIssuer {
    /// Loads the issuer key from the data dir, creating it (0600) on first use; concurrent
    /// first uses agree on one key.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, IssuerError> {
        let path = key_path(data_dir);
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| IssuerError::Io { path: p, source }
        };
        if !path.exists() {
            let dir = path.parent().unwrap_or(data_dir);
            fsutil::create_private_dir(dir).map_err(io(dir))?;
            let key = KeyType::Rsa2048
                .generate()
                .map_err(|e| IssuerError::Generate(e.to_string()))?;
            fsutil::publish_once(&path, key.serialize_pem().as_bytes(), 0o600).map_err(io(&path))?;
        }
        let pem = std::fs::read_to_string(&path).map_err(io(&path))?;
        let issuer = Self::from_pem(&pem).map_err(|reason| IssuerError::BadKey {
            path: path.clone(),
            reason,
        })?;
        let jwks_path = data_dir.join("issuer").join("jwks.json");
        // Published for external verifiers; failing to write it does not stop meshd.
        let _ = fsutil::write_atomic(&jwks_path, issuer.jwks_json.as_bytes(), 0o644);
        Ok(issuer)
    }

    /// Loads an existing issuer key, for clients (`meshd cert`) that must use the key of a running
    /// meshd rather than create a new one nobody trusts.
    pub fn load_existing(data_dir: &Path) -> Result<Self, IssuerError> {
        let path = key_path(data_dir);
        if !path.exists() {
            return Err(IssuerError::NoKey(path));
        }
        Self::load_or_create(data_dir)
    }

    /// A throwaway issuer (tests, benchmarks).
    pub fn generate() -> Result<Self, IssuerError> {
        let key = KeyType::Rsa2048
            .generate()
            .map_err(|e| IssuerError::Generate(e.to_string()))?;
        Self::from_pem(&key.serialize_pem()).map_err(IssuerError::Generate)
    }

    fn from_pem(pem: &str) -> Result<Self, String> {
        let key = rcgen::KeyPair::from_pem(pem).map_err(|e| e.to_string())?;
        let kid =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crate::pki::sha256(&key.subject_public_key_info()));
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).map_err(|e| e.to_string())?;
        jwk.common.key_id = Some(kid.clone());
        jwk.common.key_algorithm = Some(KeyAlgorithm::RS256);
        let jwks_json = serde_json::to_string(&JwkSet { keys: vec![jwk] }).map_err(|e| e.to_string())?;
        Ok(Self {
            encoding,
            kid,
            jwks_json,
        })
    }

    /// The JWKS with this issuer's public key.
    pub fn jwks_json(&self) -> &str {
        &self.jwks_json
    }

    /// A rule trusting this issuer for `audiences`.
    pub fn rule(&self, audiences: &[String]) -> JwtRule {
        JwtRule {
            issuer: STANDALONE_ISSUER.into(),
            audiences: audiences.to_vec(),
            // Our own JWKS always parses.
            keys: keys_from_jwks(&self.jwks_json).unwrap_or_default(),
            jwks_url: None,
        }
    }

    /// Mints a projected-service-account-shaped token.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        audiences: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<String, IssuerError> {
        if super::jwt::parse_service_account_subject(&format!("system:serviceaccount:{namespace}:{service_account}"))
            .is_none()
        {
            return Err(IssuerError::BadName(format!("{namespace}/{service_account}")));
        }
        let iat = unix_seconds(now);
        let claims = TokenClaims {
            aud: audiences,
            exp: iat + ttl.as_secs(),
            iat,
            nbf: iat,
            iss: STANDALONE_ISSUER,
            jti: hex::encode(rand::random::<[u8; 16]>()),
            kubernetes: KubeClaims {
                namespace,
                serviceaccount: NameUid {
                    name: service_account,
                    uid: hex::encode(crate::pki::sha256(format!("{namespace}/{service_account}").as_bytes()))[..32]
                        .to_string(),
                },
            },
            sub: format!("system:serviceaccount:{namespace}:{service_account}"),
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(|e| IssuerError::Sign(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::Registry;
    use crate::auth::cache::{CacheConfig, ReviewCache};
    use crate::auth::jwt::JwtAuthenticator;
    use crate::auth::{AuthError, Authenticator, Credentials};
    use crate::clock::{Clock, FakeClock};
    use std::sync::Arc;

    fn authn(issuer: &LocalIssuer, clock: &FakeClock) -> JwtAuthenticator {
        let r = Registry::new();
        let cache = Arc::new(ReviewCache::new(
            CacheConfig {
                negative_ttl: Duration::ZERO,
                ..Default::default()
            },
            Arc::new(clock.clone()),
        ));
        JwtAuthenticator::new(
            issuer.rule(&["istio-ca".into()]),
            "cluster.local",
            Arc::new(clock.clone()),
            cache,
            &r,
        )
    }

    fn creds(token: &str) -> Credentials {
        Credentials {
            bearer: Some(token.into()),
            ..Default::default()
        }
    }

    fn rejected(r: Result<crate::auth::Identity, AuthError>) -> String {
        match r {
            Err(AuthError::Rejected(m)) => m,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn minted_tokens_verify_and_bad_ones_do_not() {
        let issuer = LocalIssuer::generate().unwrap();
        let clock = FakeClock::new(SystemTime::now());
        let a = authn(&issuer, &clock);
        let aud = vec!["istio-ca".to_string()];
        let tok = issuer
            .mint("ns1", "sa1", &aud, Duration::from_secs(3600), clock.now())
            .unwrap();
        let id = a.authenticate(&creds(&tok)).await.unwrap();
        assert_eq!(id.spiffe.uri(), "spiffe://cluster.local/ns/ns1/sa/sa1");

        let wrong_aud = issuer
            .mint("ns1", "sa1", &["kube".into()], Duration::from_secs(3600), clock.now())
            .unwrap();
        assert!(rejected(a.authenticate(&creds(&wrong_aud)).await).contains("audiences"));

        let old = issuer
            .mint(
                "ns1",
                "sa1",
                &aud,
                Duration::from_secs(60),
                clock.now() - Duration::from_secs(7200),
            )
            .unwrap();
        assert!(rejected(a.authenticate(&creds(&old)).await).contains("expired"));

        let other = LocalIssuer::generate().unwrap();
        let forged = other
            .mint("ns1", "sa1", &aud, Duration::from_secs(3600), clock.now())
            .unwrap();
        let msg = rejected(a.authenticate(&creds(&forged)).await);
        assert!(msg.contains("signature") || msg.contains("key"), "{msg}");

        // alg: none with the same claims.
        let parts: Vec<&str> = tok.split('.').collect();
        let none_header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let none_tok = format!("{none_header}.{}.", parts[1]);
        assert!(rejected(a.authenticate(&creds(&none_tok)).await).contains("none"));

        // Tampered payload keeps the header and signature.
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[1])
            .unwrap();
        let evil = String::from_utf8(payload).unwrap().replace("ns1", "kube-system");
        let evil_tok = format!(
            "{}.{}.{}",
            parts[0],
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(evil),
            parts[2]
        );
        assert!(rejected(a.authenticate(&creds(&evil_tok)).await).contains("signature"));
    }

    #[tokio::test]
    async fn hs256_signed_with_the_public_key_is_refused() {
        let issuer = LocalIssuer::generate().unwrap();
        let clock = FakeClock::new(SystemTime::now());
        let a = authn(&issuer, &clock);
        let now = unix_seconds(clock.now());
        let claims = serde_json::json!({
            "iss": STANDALONE_ISSUER, "aud": ["istio-ca"], "sub": "system:serviceaccount:a:b",
            "exp": now + 600, "iat": now,
        });
        // The attacker uses the published JWKS text as the HMAC secret.
        let tok = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(issuer.jwks_json().as_bytes()),
        )
        .unwrap();
        assert!(rejected(a.authenticate(&creds(&tok)).await).contains("HS256"));
    }

    #[tokio::test]
    async fn other_issuers_tokens_are_not_ours_to_judge() {
        let issuer = LocalIssuer::generate().unwrap();
        let clock = FakeClock::new(SystemTime::now());
        let a = authn(&issuer, &clock);
        let now = unix_seconds(clock.now());
        let claims = serde_json::json!({"iss": "https://kubernetes.default.svc", "aud": ["istio-ca"], "sub": "system:serviceaccount:a:b", "exp": now + 600});
        let other = LocalIssuer::generate().unwrap();
        let tok = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &other.encoding).unwrap();
        assert!(matches!(
            a.authenticate(&creds(&tok)).await,
            Err(AuthError::NotPresent(_))
        ));
    }

    #[test]
    fn key_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = LocalIssuer::load_or_create(dir.path()).unwrap();
        let b = LocalIssuer::load_or_create(dir.path()).unwrap();
        assert_eq!(a.kid, b.kid);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_path(dir.path())).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
