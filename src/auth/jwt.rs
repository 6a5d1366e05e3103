//! Bearer JWTs validated locally against a JWKS: meshd's own standalone issuer, or an external
//! issuer trusted with `JWT_RULE` (istiod's JwtAuthenticator for off-cluster control planes).
//!
//! Only asymmetric algorithms are accepted, and each key only with the algorithms of its own
//! family, so an HS256 token "signed" with a public key (algorithm confusion) or `alg: none`
//! never verifies.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use futures::future::{BoxFuture, FutureExt};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::cache::{CacheKey, CacheMetrics, ReviewCache, ReviewOutcome};
use super::{AuthError, AuthSource, Authenticator, Credentials, Identity};
use crate::admin::Registry;
use crate::clock::{SharedClock, unix_seconds};
use crate::pki::SpiffeId;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY: Duration = Duration::from_secs(30);
/// Algorithms meshd accepts, per key family.
const RSA_ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

#[derive(Debug, thiserror::Error)]
pub enum JwtRuleError {
    #[error("JWT_RULE is not valid JSON of the form {{\"issuer\", \"jwks_uri\" or \"jwks\", \"audiences\"}}: {0}")]
    Json(String),
    #[error("JWT_RULE for issuer {issuer:?} has neither \"jwks\" nor \"jwks_uri\"")]
    NoKeys { issuer: String },
    #[error(
        "JWT_RULE for issuer {issuer:?}: jwks_uri {uri:?} is not a file path or file:// URI (fetch the JWKS and point jwks_uri at the file)"
    )]
    UnsupportedUri { issuer: String, uri: String },
    #[error("JWT_RULE for issuer {issuer:?}: reading {path}: {source}")]
    Read {
        issuer: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("JWT_RULE for issuer {issuer:?}: JWKS is invalid: {reason}")]
    BadJwks { issuer: String, reason: String },
}

/// One trusted issuer: its name, keys and accepted audiences.
#[derive(Clone)]
pub struct JwtRule {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: Vec<VerifyKey>,
    /// An http(s) `jwks_uri`: keys are fetched from it (and refreshed) at run time.
    pub jwks_url: Option<String>,
}

impl std::fmt::Debug for JwtRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtRule")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// A verification key and the algorithms it may be used with.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

#[derive(Deserialize)]
struct RuleJson {
    issuer: String,
    #[serde(default)]
    jwks_uri: Option<String>,
    #[serde(default)]
    jwks: Option<String>,
    #[serde(default)]
    audiences: Vec<String>,
}

impl JwtRule {
    /// Parses `JWT_RULE`: one rule object or an array of them. A rule without audiences uses
    /// `default_audiences` (`TOKEN_AUDIENCES`).
    pub fn parse_env(json: &str, default_audiences: &[String]) -> Result<Vec<JwtRule>, JwtRuleError> {
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| JwtRuleError::Json(e.to_string()))?;
        let raw: Vec<RuleJson> = if value.is_array() {
            serde_json::from_value(value)
        } else {
            serde_json::from_value(value).map(|r| vec![r])
        }
        .map_err(|e| JwtRuleError::Json(e.to_string()))?;
        raw.into_iter().map(|r| Self::from_json(r, default_audiences)).collect()
    }

    fn from_json(r: RuleJson, default_audiences: &[String]) -> Result<JwtRule, JwtRuleError> {
        let audiences = if r.audiences.is_empty() {
            default_audiences.to_vec()
        } else {
            r.audiences.clone()
        };
        if r.jwks.is_none()
            && let Some(uri) = r
                .jwks_uri
                .as_ref()
                .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
        {
            return Ok(JwtRule {
                issuer: r.issuer,
                audiences,
                keys: Vec::new(),
                jwks_url: Some(uri.clone()),
            });
        }
        let jwks_text = match (&r.jwks, &r.jwks_uri) {
            (Some(inline), _) => inline.clone(),
            (None, Some(uri)) => {
                let path = match uri.strip_prefix("file://") {
                    Some(p) => PathBuf::from(p),
                    None if uri.starts_with('/') || uri.starts_with('.') => PathBuf::from(uri),
                    None => {
                        return Err(JwtRuleError::UnsupportedUri {
                            issuer: r.issuer,
                            uri: uri.clone(),
                        });
                    }
                };
                std::fs::read_to_string(&path).map_err(|source| JwtRuleError::Read {
                    issuer: r.issuer.clone(),
                    path,
                    source,
                })?
            }
            (None, None) => return Err(JwtRuleError::NoKeys { issuer: r.issuer }),
        };
        let keys = keys_from_jwks(&jwks_text).map_err(|reason| JwtRuleError::BadJwks {
            issuer: r.issuer.clone(),
            reason,
        })?;
        Ok(JwtRule {
            issuer: r.issuer,
            audiences,
            keys,
            jwks_url: None,
        })
    }
}

/// Builds verification keys from JWKS JSON; symmetric (`oct`) keys are refused outright.
pub fn keys_from_jwks(jwks_json: &str) -> Result<Vec<VerifyKey>, String> {
    let set: JwkSet = serde_json::from_str(jwks_json).map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let algorithms = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA_ALGS.to_vec(),
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                jsonwebtoken::jwk::EllipticCurve::P256 => vec![Algorithm::ES256],
                jsonwebtoken::jwk::EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => continue,
            },
            AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
            AlgorithmParameters::OctetKey(_) => {
                return Err(
                    "symmetric (oct) keys are not accepted: a shared secret cannot prove a workload identity".into(),
                );
            }
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        keys.push(VerifyKey {
            kid: jwk.common.key_id.clone(),
            key,
            algorithms,
        });
    }
    if keys.is_empty() {
        return Err("no usable RSA, EC (P-256/P-384) or Ed25519 keys".into());
    }
    Ok(keys)
}

#[derive(Deserialize)]
struct UnverifiedClaims {
    #[serde(default)]
    iss: Option<String>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubeClaims>,
}

#[derive(Deserialize)]
struct KubeClaims {
    #[serde(default)]
    pod: Option<NameUid>,
}

#[derive(Deserialize)]
struct NameUid {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    uid: Option<String>,
}

/// Reads a JWT segment without verifying anything: only used to route the token to the
/// authenticator of its issuer and to explain rejections.
pub(crate) fn peek_segment<T: for<'de> Deserialize<'de>>(token: &str, index: usize) -> Option<T> {
    let seg = token.split('.').nth(index)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(seg.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[derive(Deserialize)]
struct RawHeader {
    #[serde(default)]
    alg: Option<String>,
}

struct Inner {
    rule: JwtRule,
    /// The rule's keys, replaced when fetched from `jwks_uri`.
    keys: arc_swap::ArcSwap<Vec<VerifyKey>>,
    trust_domain: String,
    clock: SharedClock,
}

/// Validates bearer tokens of one issuer.
#[derive(Clone)]
pub struct JwtAuthenticator {
    inner: Arc<Inner>,
    cache: Arc<ReviewCache>,
    metrics: CacheMetrics,
}

impl JwtAuthenticator {
    pub fn new(
        rule: JwtRule,
        trust_domain: &str,
        clock: SharedClock,
        cache: Arc<ReviewCache>,
        registry: &Registry,
    ) -> Self {
        let metrics = CacheMetrics::register(registry, "jwt", &rule.issuer);
        Self {
            metrics,
            inner: Arc::new(Inner {
                keys: arc_swap::ArcSwap::from_pointee(rule.keys.clone()),
                rule,
                trust_domain: trust_domain.into(),
                clock,
            }),
            cache,
        }
    }

    pub fn issuer(&self) -> &str {
        &self.inner.rule.issuer
    }

    /// For a rule with an http(s) `jwks_uri`: fetches the keys now and keeps them fresh.
    pub fn spawn_jwks_refresh(&self) -> Option<tokio::task::JoinHandle<()>> {
        let url = self.inner.rule.jwks_url.clone()?;
        let inner = Arc::clone(&self.inner);
        Some(tokio::spawn(async move {
            loop {
                let wait = match super::jwks::fetch(&url, Duration::from_secs(10))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|t| keys_from_jwks(&t))
                {
                    Ok(keys) => {
                        tracing::info!(issuer = %inner.rule.issuer, keys = keys.len(), "fetched JWKS");
                        inner.keys.store(Arc::new(keys));
                        super::jwks::REFRESH_EVERY
                    }
                    Err(e) => {
                        tracing::warn!(issuer = %inner.rule.issuer, error = %e, "fetching JWKS failed; retrying");
                        super::jwks::RETRY_EVERY
                    }
                };
                tokio::time::sleep(wait).await;
            }
        }))
    }
}

impl Inner {
    fn verify(&self, token: &str) -> ReviewOutcome {
        let raw_header: RawHeader =
            peek_segment(token, 0).ok_or_else(|| AuthError::Rejected("bearer token is not a JWT".into()))?;
        let alg_name = raw_header.alg.unwrap_or_default();
        let alg: Algorithm = alg_name.parse().map_err(|_| {
            AuthError::Rejected(format!(
                "token algorithm {alg_name:?} is not accepted; use an asymmetric algorithm such as RS256 or ES256"
            ))
        })?;
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err(AuthError::Rejected(format!(
                "token algorithm {alg:?} (a shared secret) is not accepted; use an asymmetric algorithm such as RS256 or ES256"
            )));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Rejected(format!("token header is invalid: {e}")))?;
        let keys = self.keys.load();
        if keys.is_empty() {
            return Err(AuthError::Unavailable {
                cluster: self.rule.issuer.clone(),
                reason: "the issuer's JWKS has not been fetched yet".into(),
            });
        }
        let candidates: Vec<&VerifyKey> = keys
            .iter()
            .filter(|k| k.algorithms.contains(&alg))
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(AuthError::Rejected(format!(
                "issuer {:?} has no {alg:?} key{}",
                self.rule.issuer,
                header
                    .kid
                    .as_deref()
                    .map(|k| format!(" with kid {k:?}"))
                    .unwrap_or_default()
            )));
        }
        let mut validation = Validation::new(alg);
        validation.validate_exp = false; // checked below against meshd's clock
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["aud", "iss", "sub"]);
        validation.set_issuer(&[&self.rule.issuer]);
        validation.set_audience(&self.rule.audiences);
        let mut last_err = None;
        let mut claims = None;
        for k in candidates {
            match jsonwebtoken::decode::<Claims>(token, &k.key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let claims = match (claims, last_err) {
            (Some(c), _) => c,
            (None, Some(e)) => return Err(AuthError::Rejected(self.explain(token, e))),
            (None, None) => return Err(AuthError::Rejected("token did not verify".into())),
        };

        let now = unix_seconds(self.clock.now());
        let exp = claims
            .exp
            .ok_or_else(|| AuthError::Rejected("token has no exp claim; only expiring tokens are accepted".into()))?;
        if now > exp + LEEWAY.as_secs() {
            return Err(AuthError::Rejected(format!(
                "token expired {}s ago; mint a fresh service-account token",
                now - exp
            )));
        }
        if let Some(nbf) = claims.nbf
            && nbf > now + LEEWAY.as_secs()
        {
            return Err(AuthError::Rejected(format!(
                "token is not valid for another {}s (nbf)",
                nbf - now
            )));
        }
        let sub = claims.sub.unwrap_or_default();
        let (ns, sa) = parse_service_account_subject(&sub).ok_or_else(|| {
            AuthError::Rejected(format!(
                "token subject {sub:?} is not a service account (system:serviceaccount:<namespace>:<name>)"
            ))
        })?;
        let pod = claims.kubernetes.and_then(|k| k.pod);
        let identity = Identity {
            spiffe: SpiffeId::new(&self.trust_domain, ns, sa),
            source: AuthSource::Jwt {
                issuer: self.rule.issuer.clone(),
            },
            cluster_id: None,
            pod_name: pod.as_ref().and_then(|p| p.name.clone()),
            pod_uid: pod.and_then(|p| p.uid),
        };
        Ok((
            identity,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp + LEEWAY.as_secs())),
        ))
    }

    fn explain(&self, token: &str, e: jsonwebtoken::errors::Error) -> String {
        use jsonwebtoken::errors::ErrorKind;
        match e.kind() {
            ErrorKind::InvalidAudience => {
                #[derive(Deserialize)]
                struct Aud {
                    #[serde(default)]
                    aud: serde_json::Value,
                }
                let got = peek_segment::<Aud>(token, 1)
                    .map(|a| a.aud.to_string())
                    .unwrap_or_default();
                format!(
                    "token audiences {got} is invalid for the target audiences {:?}",
                    self.rule.audiences
                )
            }
            ErrorKind::InvalidSignature => format!(
                "token signature does not verify against issuer {:?}'s keys",
                self.rule.issuer
            ),
            ErrorKind::InvalidIssuer => format!("token issuer is not {:?}", self.rule.issuer),
            ErrorKind::MissingRequiredClaim(c) => format!("token has no {c} claim"),
            other => format!("token is invalid: {other:?}"),
        }
    }
}

/// Splits `system:serviceaccount:<ns>:<sa>` (exactly 4 parts, each a valid Kubernetes name, so
/// the SPIFFE id built from them is a well-formed URI).
pub fn parse_service_account_subject(sub: &str) -> Option<(&str, &str)> {
    use crate::pki::spiffe::{is_valid_namespace, is_valid_service_account};
    let parts: Vec<&str> = sub.split(':').collect();
    match parts.as_slice() {
        ["system", "serviceaccount", ns, sa] if is_valid_namespace(ns) && is_valid_service_account(sa) => {
            Some((ns, sa))
        }
        _ => None,
    }
}

impl Authenticator for JwtAuthenticator {
    fn name(&self) -> &'static str {
        "JwtAuthenticator"
    }

    fn authenticate<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Result<Identity, AuthError>> {
        async move {
            let token = creds
                .bearer
                .as_deref()
                .ok_or_else(|| AuthError::NotPresent("no bearer token (authorization: Bearer <JWT>)".into()))?;
            let iss = peek_segment::<UnverifiedClaims>(token, 1).and_then(|c| c.iss);
            match iss {
                Some(iss) if iss == self.inner.rule.issuer => {}
                Some(iss) => {
                    // Someone else's token (e.g. the Kubernetes API server's): not ours to judge.
                    return Err(AuthError::NotPresent(format!(
                        "token issuer {iss:?} is not {:?}",
                        self.inner.rule.issuer
                    )));
                }
                None => {
                    return Err(AuthError::Rejected(
                        "bearer token is not a JWT with an iss claim".into(),
                    ));
                }
            }
            let key = CacheKey::new(
                &format!("jwt:{}", self.inner.rule.issuer),
                token,
                &self.inner.rule.audiences,
            );
            let inner = Arc::clone(&self.inner);
            let token = token.to_string();
            self.cache
                .get_or_review(key, &self.metrics, async move { inner.verify(&token) })
                .await
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_must_have_four_parts() {
        assert_eq!(
            parse_service_account_subject("system:serviceaccount:ns:sa"),
            Some(("ns", "sa"))
        );
        assert_eq!(parse_service_account_subject("system:serviceaccount:ns"), None);
        assert_eq!(parse_service_account_subject("system:serviceaccount:ns:sa:x"), None);
        assert_eq!(parse_service_account_subject("system:serviceaccount::sa"), None);
        assert_eq!(parse_service_account_subject("user:alice"), None);
        assert_eq!(
            parse_service_account_subject("system:serviceaccount:x/sa/admin:y"),
            None
        );
    }

    #[test]
    fn jwt_rule_parses_inline_jwks_and_defaults_audiences() {
        let issuer = crate::auth::issuer::LocalIssuer::generate().unwrap();
        let rule = serde_json::json!({"issuer": "https://example", "jwks": issuer.jwks_json()}).to_string();
        let rules = JwtRule::parse_env(&rule, &["istio-ca".into()]).unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].audiences, vec!["istio-ca".to_string()]);
        let err = JwtRule::parse_env(r#"{"issuer":"x","jwks_uri":"ftp://x/keys"}"#, &[]).unwrap_err();
        assert!(matches!(err, JwtRuleError::UnsupportedUri { .. }));
        let remote =
            JwtRule::parse_env(r#"[{"issuer":"x","jwks_uri":"https://x/keys","audiences":["a"]}]"#, &[]).unwrap();
        assert_eq!(remote[0].jwks_url.as_deref(), Some("https://x/keys"));
        assert_eq!(remote[0].audiences, vec!["a".to_string()]);
        let oct = r#"{"issuer":"x","jwks":"{\"keys\":[{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"}]}"}"#;
        assert!(matches!(
            JwtRule::parse_env(oct, &[]).unwrap_err(),
            JwtRuleError::BadJwks { .. }
        ));
    }
}
