//! Kubeconfig sanitizing (`meshd::cluster::kubeconfig::sanitize`) on arbitrary text, as a remote
//! secret would carry it.
//!
//! Asserts: nothing panics; a kubeconfig accepted with no insecure options allowed has, in every
//! user, no `exec`, no `auth-provider` other than `oidc`, no `tokenFile`, `client-certificate` or
//! `client-key` path, in every cluster no `certificate-authority` path, and a current context
//! that exists (that is the sanitizer's whole contract, and these fields of the parsed struct are
//! exactly what `kube::Config::from_custom_kubeconfig` later reads); allowing options only ever
//! turns a refusal into an acceptance, never the reverse, and a refusal names an option that,
//! once allowed, is no longer the reason.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd::cluster::kubeconfig::{AllowedOptions, KubeconfigError, sanitize, server_url};

const ALL_OPTIONS: [&str; 9] = [
    "exec",
    "gcp",
    "azure",
    "openstack",
    "auth-provider",
    "tokenFile",
    "clientCertificate",
    "clientKey",
    "certificateAuthority",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let strict = sanitize(text, &AllowedOptions::default());
    let all = sanitize(text, &AllowedOptions::new(ALL_OPTIONS));
    match &strict {
        Ok(kc) => {
            for named in &kc.auth_infos {
                let Some(user) = &named.auth_info else { continue };
                assert!(user.exec.is_none(), "accepted exec in user {:?}", named.name);
                if let Some(p) = &user.auth_provider {
                    assert_eq!(p.name, "oidc", "accepted auth-provider in user {:?}", named.name);
                }
                assert!(user.token_file.is_none(), "accepted tokenFile");
                assert!(user.client_certificate.is_none(), "accepted client-certificate path");
                assert!(user.client_key.is_none(), "accepted client-key path");
            }
            for named in &kc.clusters {
                if let Some(c) = &named.cluster {
                    assert!(c.certificate_authority.is_none(), "accepted certificate-authority path");
                }
            }
            let current = kc.current_context.as_deref().expect("accepted without current-context");
            assert!(kc.contexts.iter().any(|c| c.name == current));
            let _ = server_url(kc);
            assert!(all.is_ok(), "allowing options refused an accepted kubeconfig: {all:?}");
        }
        Err(KubeconfigError::Forbidden { option, .. }) => {
            assert!(ALL_OPTIONS.contains(option), "unknown option {option}");
            match sanitize(text, &AllowedOptions::new([*option])) {
                Err(KubeconfigError::Forbidden { option: again, .. }) => {
                    assert_ne!(again, *option, "allowing {option} did not allow it")
                }
                Err(KubeconfigError::Parse(e)) => panic!("parse error only once {option} is allowed: {e}"),
                _ => {}
            }
            assert!(
                !matches!(all, Err(KubeconfigError::Forbidden { .. })),
                "refused with every option allowed: {all:?}"
            );
        }
        Err(KubeconfigError::Parse(_)) => assert!(matches!(all, Err(KubeconfigError::Parse(_)))),
        Err(KubeconfigError::NoContext) => assert!(matches!(all, Err(KubeconfigError::NoContext))),
        Err(KubeconfigError::Client(e)) => panic!("sanitize never builds a client: {e}"),
    }
    if let Ok(kc) = &all {
        let _ = server_url(kc);
    }
});
