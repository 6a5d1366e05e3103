//! Bearer JWT validation (`meshd::auth::jwt::JwtAuthenticator`) as the standalone issuer
//! (`meshd::auth::issuer`, RS256) and a `JWT_RULE` issuer (inline JWKS, ES256) run it, with keys
//! made once per process and a fixed clock.
//!
//! Input: the first byte picks a mode, the rest is its material.
//! - 0: the rest is the token, as sent;
//! - 1: edits of a correctly signed token (each edit: position, byte; an odd byte count truncates);
//! - 2: header and claims JSON (split at the first 0xff byte), signed with the rule's real key;
//! - 3: the same, signed with another P-256 key, or with `alg: none` and no signature.
//!
//! Asserts: nothing panics; a token is accepted only if it is byte for byte a token the trusted
//! key signed: in modes 0, 1 and 3 only the unedited valid tokens; in mode 2 only when the header
//! is ES256 (kid absent or the key's) and the claims really hold the rule's issuer, one of its
//! audiences, an `exp` not past, no `nbf` in the future and a service-account subject that the
//! accepted identity reflects. The standalone issuer never accepts a token of the other key.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use futures::executor::block_on;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use meshd::admin::Registry;
use meshd::auth::cache::{CacheConfig, ReviewCache};
use meshd::auth::issuer::LocalIssuer;
use meshd::auth::jwt::{JwtAuthenticator, JwtRule, LEEWAY};
use meshd::auth::{Authenticator, Credentials, Identity};
use meshd::clock::{FakeClock, SharedClock};
use serde::Deserialize;
use serde_json::{Value, json};

const RULE_ISSUER: &str = "https://issuer.example";
const RULE_AUDIENCE: &str = "aud1";
const RULE_KID: &str = "ec1";
const NOW: u64 = 1_800_000_000;

struct Fixture {
    standalone: JwtAuthenticator,
    rule: JwtAuthenticator,
    ec_key: EncodingKey,
    other_key: EncodingKey,
    valid_standalone: String,
    valid_rule: String,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn ec_key() -> EncodingKey {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap()
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(NOW);
        let clock: SharedClock = Arc::new(FakeClock::new(now));
        // No caching of results: every call runs the verification.
        let cache = Arc::new(ReviewCache::new(
            CacheConfig {
                positive_ttl: Duration::ZERO,
                negative_ttl: Duration::ZERO,
                max_entries: 16,
            },
            Arc::clone(&clock),
        ));
        let registry = Registry::new();
        let issuer = LocalIssuer::generate().unwrap();
        let audiences = vec!["istio-ca".to_string()];
        let standalone = JwtAuthenticator::new(
            issuer.rule(&audiences),
            "cluster.local",
            Arc::clone(&clock),
            Arc::clone(&cache),
            &registry,
        );
        let valid_standalone = issuer
            .mint("default", "web", &audiences, Duration::from_secs(3600), now)
            .unwrap();

        let ec_key = ec_key();
        let mut jwk = Jwk::from_encoding_key(&ec_key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some(RULE_KID.into());
        let jwks = serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap();
        let rule_json = json!({"issuer": RULE_ISSUER, "jwks": jwks, "audiences": [RULE_AUDIENCE]}).to_string();
        let rule = JwtRule::parse_env(&rule_json, &[]).unwrap().remove(0);
        let rule = JwtAuthenticator::new(rule, "cluster.local", clock, cache, &registry);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(RULE_KID.into());
        let claims = json!({
            "iss": RULE_ISSUER, "aud": [RULE_AUDIENCE], "sub": "system:serviceaccount:default:web",
            "exp": NOW + 3600, "iat": NOW, "nbf": NOW,
        });
        let valid_rule = jsonwebtoken::encode(&header, &claims, &ec_key).unwrap();
        let f = Fixture {
            standalone,
            rule,
            ec_key,
            other_key: self::ec_key(),
            valid_standalone,
            valid_rule,
        };
        // The harness itself must be right: both valid tokens verify.
        assert!(authenticate(&f.standalone, &f.valid_standalone).is_ok());
        assert!(authenticate(&f.rule, &f.valid_rule).is_ok());
        f
    })
}

fn authenticate(a: &JwtAuthenticator, token: &str) -> Result<Identity, String> {
    let creds = Credentials {
        bearer: Some(token.to_string()),
        ..Default::default()
    };
    block_on(a.authenticate(&creds)).map_err(|e| e.to_string())
}

/// Both authenticators on `token`: each may accept only its own valid token.
fn only_valid_tokens(f: &Fixture, token: &str) {
    let s = authenticate(&f.standalone, token);
    assert_eq!(
        s.is_ok(),
        token == f.valid_standalone,
        "standalone issuer on {token:?}: {s:?}"
    );
    let r = authenticate(&f.rule, token);
    assert_eq!(r.is_ok(), token == f.valid_rule, "JWT_RULE issuer on {token:?}: {r:?}");
}

fn sign(header: &[u8], claims: &[u8], key: Option<&EncodingKey>) -> String {
    let message = format!("{}.{}", b64(header), b64(claims));
    let sig = match key {
        Some(k) => jsonwebtoken::crypto::sign(message.as_bytes(), k, Algorithm::ES256).unwrap(),
        None => String::new(),
    };
    format!("{message}.{sig}")
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => only_valid_tokens(f, &String::from_utf8_lossy(rest)),
        1 => {
            let (base, edits) = match rest.split_first() {
                Some((which, edits)) if which % 2 == 0 => (&f.valid_standalone, edits),
                Some((_, edits)) => (&f.valid_rule, edits),
                None => return,
            };
            let mut token = base.clone().into_bytes();
            for e in edits.chunks(3) {
                match e {
                    [hi, lo, b] => {
                        let pos = usize::from(u16::from_be_bytes([*hi, *lo])) % (token.len() + 1);
                        if pos == token.len() {
                            token.push(*b);
                        } else {
                            token[pos] = *b;
                        }
                    }
                    [hi, lo] => token.truncate(usize::from(u16::from_be_bytes([*hi, *lo])) % (token.len() + 1)),
                    _ => {}
                }
            }
            only_valid_tokens(f, &String::from_utf8_lossy(&token));
        }
        2 => {
            let (header, claims) = split(rest);
            let token = sign(header, claims, Some(&f.ec_key));
            assert!(authenticate(&f.standalone, &token).is_err());
            if let Ok(id) = authenticate(&f.rule, &token) {
                check_accepted(header, claims, &id);
            }
        }
        _ => {
            let (header, claims) = split(rest);
            for key in [Some(&f.other_key), None] {
                let token = sign(header, claims, key);
                only_valid_tokens(f, &token);
            }
        }
    }
});

fn split(rest: &[u8]) -> (&[u8], &[u8]) {
    match rest.iter().position(|b| *b == 0xff) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    }
}

/// The header and claims fields the checks read. Other members are skipped the way meshd's own
/// decoding skips them (serde_json does not check the UTF-8 of skipped strings, so a whole-document
/// `Value` parse would be stricter than what is being checked).
#[derive(Deserialize)]
struct Fields {
    alg: Option<Value>,
    kid: Option<Value>,
    iss: Option<Value>,
    aud: Option<Value>,
    exp: Option<Value>,
    nbf: Option<Value>,
    sub: Option<Value>,
}

/// A token signed with the rule's key was accepted: its header and claims must say so.
fn check_accepted(header: &[u8], claims: &[u8], id: &Identity) {
    let h: Fields = serde_json::from_slice(header).expect("accepted a token whose header is not a JSON object");
    assert_eq!(h.alg, Some(Value::from("ES256")), "accepted alg {:?}", h.alg);
    if let Some(kid) = h.kid.filter(|k| !k.is_null()) {
        assert_eq!(kid, RULE_KID, "accepted kid {kid}");
    }
    let c: Fields = serde_json::from_slice(claims).expect("accepted a token whose claims are not a JSON object");
    assert_eq!(c.iss, Some(Value::from(RULE_ISSUER)), "accepted iss {:?}", c.iss);
    let aud_ok = match &c.aud {
        Some(Value::String(a)) => a == RULE_AUDIENCE,
        Some(Value::Array(a)) => a.iter().any(|a| a == RULE_AUDIENCE),
        _ => false,
    };
    assert!(aud_ok, "accepted aud {:?}", c.aud);
    let exp = c
        .exp
        .as_ref()
        .and_then(Value::as_f64)
        .expect("accepted a token without a numeric exp");
    assert!(
        exp + LEEWAY.as_secs_f64() >= NOW as f64,
        "accepted an expired token: exp {exp}"
    );
    if let Some(nbf) = c.nbf.filter(|n| !n.is_null()) {
        let nbf = nbf.as_f64().expect("accepted a non-numeric nbf");
        assert!(
            nbf <= (NOW + LEEWAY.as_secs()) as f64,
            "accepted a token not yet valid: nbf {nbf}"
        );
    }
    let sub = c
        .sub
        .as_ref()
        .and_then(Value::as_str)
        .expect("accepted a token without a string sub");
    assert_eq!(
        sub,
        format!(
            "system:serviceaccount:{}:{}",
            id.spiffe.namespace, id.spiffe.service_account
        ),
        "identity does not reflect the subject"
    );
    assert!(meshd::pki::spiffe::is_valid_namespace(&id.spiffe.namespace));
    assert!(meshd::pki::spiffe::is_valid_service_account(&id.spiffe.service_account));
}
