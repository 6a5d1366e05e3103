//! Authentication: static tokens (the admin token, tests' own) and the server's service-account
//! tokens, checked as kube-apiserver checks them: signature, audiences, times, then that the
//! ServiceAccount (and bound Secret or Pod) still exists with the uid the token names.
use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;
use std::time::SystemTime;

use serde_json::Value;

use super::rbac::UserInfo;
use super::resources::ResourceType;
use super::state::Core;
use super::store::ObjKey;
use super::tokens::{Verified, VerifyError, check_times, go_quote_list};

pub const AUTHENTICATED: &str = "system:authenticated";

/// A token that authenticated, and the audiences it is good for among those asked.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user: UserInfo,
    pub audiences: Vec<String>,
}

/// Tokens that map straight to a user (kube-apiserver's `--token-auth-file`).
#[derive(Default)]
pub struct StaticTokens(RwLock<HashMap<String, UserInfo>>);

impl StaticTokens {
    pub fn add(&self, token: &str, user: UserInfo) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string(), user);
    }

    fn get(&self, token: &str) -> Option<UserInfo> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).get(token).cloned()
    }
}

/// Authenticates `token` for `requested` audiences (empty: the API server's own). The error
/// is the text a TokenReview reports in `status.error`.
pub fn authenticate(core: &Core, token: &str, requested: &[String]) -> Result<Authenticated, String> {
    let api_auds = &core.config.api_audiences;
    let requested: Vec<String> = if requested.is_empty() {
        api_auds.clone()
    } else {
        requested.to_vec()
    };
    let fail = |why: String| format!("[invalid bearer token, {why}]");
    // Tokens without audiences of their own are good for the API server's audiences only.
    let implicit = |user: UserInfo| {
        let auds = intersect(api_auds, &requested);
        if auds.is_empty() {
            return Err(fail(audience_error(api_auds, &requested)));
        }
        Ok(Authenticated { user, audiences: auds })
    };
    if let Some(user) = core.static_tokens.get(token) {
        return implicit(with_authenticated(user));
    }
    match core.signer.verify(token) {
        Err(VerifyError::NotOurs) => Err("invalid bearer token".into()),
        Err(VerifyError::Invalid(why)) => Err(fail(why)),
        Ok(Verified::Legacy(c)) => {
            let secret = core.store.get(
                &ResourceType::core("secrets").group_resource(),
                &ObjKey::new(&c.namespace, &c.secret_name),
            );
            let Some(secret) = secret else {
                return Err(fail("token has been invalidated".into()));
            };
            let stored = secret
                .pointer("/data/token")
                .and_then(Value::as_str)
                .and_then(base64_decode);
            if stored.as_deref() != Some(token.as_bytes()) {
                return Err(fail("token does not match server's copy".into()));
            }
            check_service_account(core, &c.namespace, &c.sa_name, &c.sa_uid).map_err(fail)?;
            implicit(sa_user(&c.namespace, &c.sa_name, &c.sa_uid, BTreeMap::new()))
        }
        Ok(Verified::Bound(c)) => {
            let auds = intersect(&c.aud, &requested);
            if auds.is_empty() {
                return Err(fail(audience_error(&c.aud, &requested)));
            }
            check_times(&c, SystemTime::now()).map_err(fail)?;
            let k = &c.kubernetes;
            check_service_account(core, &k.namespace, &k.serviceaccount.name, &k.serviceaccount.uid).map_err(fail)?;
            let mut extra = BTreeMap::new();
            if let Some(pod) = &k.pod {
                if core.config.strict_pod_binding {
                    check_pod(core, &k.namespace, &pod.name, &pod.uid).map_err(fail)?;
                }
                extra.insert("authentication.kubernetes.io/pod-name".into(), vec![pod.name.clone()]);
                extra.insert("authentication.kubernetes.io/pod-uid".into(), vec![pod.uid.clone()]);
            }
            if !c.jti.is_empty() {
                extra.insert(
                    "authentication.kubernetes.io/credential-id".into(),
                    vec![format!("JTI={}", c.jti)],
                );
            }
            Ok(Authenticated {
                user: sa_user(&k.namespace, &k.serviceaccount.name, &k.serviceaccount.uid, extra),
                audiences: auds,
            })
        }
    }
}

fn audience_error(token_auds: &[String], requested: &[String]) -> String {
    format!(
        "token audiences {} is invalid for the target audiences {}",
        go_quote_list(token_auds),
        go_quote_list(requested)
    )
}

fn intersect(a: &[String], b: &[String]) -> Vec<String> {
    b.iter().filter(|x| a.contains(x)).cloned().collect()
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

fn with_authenticated(mut user: UserInfo) -> UserInfo {
    if !user.groups.iter().any(|g| g == AUTHENTICATED) {
        user.groups.push(AUTHENTICATED.into());
    }
    user
}

/// The user a service-account token stands for.
pub fn sa_user(ns: &str, sa: &str, uid: &str, extra: BTreeMap<String, Vec<String>>) -> UserInfo {
    UserInfo {
        username: format!("system:serviceaccount:{ns}:{sa}"),
        uid: uid.to_string(),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
            AUTHENTICATED.into(),
        ],
        extra,
    }
}

fn check_service_account(core: &Core, ns: &str, name: &str, uid: &str) -> Result<(), String> {
    let sa = core
        .store
        .get(
            &ResourceType::core("serviceaccounts").group_resource(),
            &ObjKey::new(ns, name),
        )
        .ok_or_else(|| format!("serviceaccounts \"{name}\" not found"))?;
    let have = sa.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default();
    if have != uid {
        return Err(format!("service account UID ({have}) does not match claim ({uid})"));
    }
    Ok(())
}

fn check_pod(core: &Core, ns: &str, name: &str, uid: &str) -> Result<(), String> {
    let pod = core
        .store
        .get(&ResourceType::core("pods").group_resource(), &ObjKey::new(ns, name))
        .ok_or_else(|| "service account token has been invalidated".to_string())?;
    let have = pod.pointer("/metadata/uid").and_then(Value::as_str).unwrap_or_default();
    if have != uid {
        return Err(format!(
            "pod UID ({have}) does not match service account pod ref claim ({uid})"
        ));
    }
    Ok(())
}
