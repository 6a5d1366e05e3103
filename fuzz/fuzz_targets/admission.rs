//! AdmissionReview decoding and the two webhooks (`meshd::webhook`): the pure path the 15017
//! listener runs for a POST body, `decode_review` → `inject::review` / `validate::review` →
//! `encode_review`.
//!
//! Input: an AdmissionReview body. When it starts with `/`, its first line is the request path
//! (`/inject/cluster/<c>/net/<n>/...` env overrides) and the rest is the body.
//!
//! Asserts: nothing panics; every decoded request gets, from each webhook, a JSON AdmissionReview
//! in the request's own `apiVersion` and `kind` whose `response.uid` is the request's uid and
//! whose `allowed` is a boolean; a denial carries a message; a patch is base64 of a JSON Patch that
//! applies cleanly to the object the API server sent (when that object is in the typed Pod's
//! canonical form, which the patch is computed against) and leaves a JSON object.
#![no_main]

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use meshd::webhook::inject::{self, InjectConfig, ProxyResources};
use meshd::webhook::server::{decode_review, encode_review};
use meshd::webhook::validate;
use serde_json::Value;

fn config() -> InjectConfig {
    InjectConfig {
        proxy_image: "docker.io/istio/proxyv2:1.24.0".into(),
        resources: ProxyResources::default(),
        native_sidecars: false,
        cluster_id: "cluster1".into(),
        network: "network1".into(),
        discovery_address: "istiod.istio-system.svc:15012".into(),
        trust_domain: "cluster.local".into(),
        domain_suffix: "cluster.local".into(),
    }
}

fuzz_target!(|data: &[u8]| {
    let (path, body) = match data.strip_prefix(b"/") {
        Some(_) => match data.iter().position(|b| *b == b'\n') {
            Some(nl) => (String::from_utf8_lossy(&data[..nl]).into_owned(), &data[nl + 1..]),
            None => return,
        },
        None => ("/inject".to_string(), data),
    };
    let Ok(req) = decode_review(body) else {
        return;
    };
    // What the API server sent, as it will apply the patch to it. (serde_json skips unknown
    // members without checking their strings, so a body that decodes as a review may still fail
    // as a whole `Value`: the API server never sends such a body, and those checks are skipped.)
    let raw: Option<Value> = serde_json::from_slice(body).ok();
    // The patch is computed, as istiod computes it, against the Pod as decoded and encoded
    // again, so the object it must apply to is checked only when it is already in that form (what
    // the API server sends is, but for fields the typed Pod drops, which the patch never names):
    // a fuzzed object without `metadata`, or with `spec.containers` missing, is not.
    let raw_object = raw
        .as_ref()
        .and_then(|r| r.pointer("/request/object").cloned())
        .filter(is_canonical_pod);

    for native in [false, true] {
        let cfg = InjectConfig {
            native_sidecars: native,
            ..config()
        };
        let (resp, outcome) = inject::review(&req, &path, &cfg);
        let out = check_review(&encode_review(resp), &req.uid, raw.as_ref());
        let patch = out.get("patch").and_then(Value::as_str);
        match outcome {
            inject::Outcome::Injected => {
                assert_eq!(out["allowed"], Value::Bool(true));
                let patch = patch.expect("an injected pod comes with a patch");
                let ops: json_patch::Patch = serde_json::from_slice(
                    &base64::engine::general_purpose::STANDARD
                        .decode(patch)
                        .expect("patch is base64"),
                )
                .expect("patch is a JSON Patch");
                assert_eq!(out["patchType"], Value::String("JSONPatch".into()));
                if let Some(mut doc) = raw_object.clone() {
                    if let Err(e) = json_patch::patch(&mut doc, &ops) {
                        panic!("the injection patch does not apply to the object sent: {e}\npatch: {ops:?}");
                    }
                    assert!(doc.is_object());
                }
            }
            inject::Outcome::Skipped(_) => {
                assert_eq!(out["allowed"], Value::Bool(true));
                assert!(patch.is_none());
            }
            inject::Outcome::Failed(msg) => {
                assert_eq!(out["allowed"], Value::Bool(false));
                assert!(!msg.is_empty());
                assert!(out.pointer("/status/message").and_then(Value::as_str).is_some());
            }
        }
    }

    let (resp, outcome) = validate::review(&req);
    let out = check_review(&encode_review(resp), &req.uid, raw.as_ref());
    assert!(out.get("patch").is_none(), "validation never patches");
    match outcome {
        validate::Outcome::Failed(e) => {
            assert_eq!(out["allowed"], Value::Bool(false));
            let _ = e.reason();
            assert!(!e.to_string().is_empty());
        }
        validate::Outcome::Passed | validate::Outcome::Ignored => assert_eq!(out["allowed"], Value::Bool(true)),
    }
});

/// Whether a Pod object survives decoding into the typed Pod and encoding again unchanged.
fn is_canonical_pod(obj: &Value) -> bool {
    serde_json::from_value::<Pod>(obj.clone())
        .ok()
        .and_then(|p| serde_json::to_value(p).ok())
        .is_some_and(|again| &again == obj)
}

/// Parses an encoded review and returns its `response`. The review answers in the request's own
/// `apiVersion` and `kind` (the API server expects the version it sent).
fn check_review(bytes: &[u8], uid: &str, request: Option<&Value>) -> Value {
    let v: Value = serde_json::from_slice(bytes).expect("encode_review writes JSON");
    if let Some(request) = request {
        assert_eq!(v["apiVersion"], request["apiVersion"], "{v}");
        assert_eq!(v["kind"], request["kind"], "{v}");
    }
    let resp = v.get("response").expect("the review has a response").clone();
    assert_eq!(resp["uid"], Value::String(uid.into()), "uid is echoed");
    assert!(resp["allowed"].is_boolean());
    resp
}
