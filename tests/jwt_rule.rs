//! `JWT_RULE` with an https `jwks_uri`: meshd (the real binary, trusting a test CA through
//! `SSL_CERT_FILE`) fetches the issuer's keys over TLS and accepts its tokens; tokens of other
//! issuers or keys are refused.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meshd::pki::keys::KeyType;

const ISSUER: &str = "https://issuer.example.com";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An https server on 127.0.0.1 answering every request with `body`; returns (port, CA PEM).
async fn jwks_server(body: String) -> (u16, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let leaf_cert = leaf.signed_by(&key, &Issuer::new(ca, ca_key)).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(meshd::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, ca_cert.pem())
}

fn issuer_key() -> (EncodingKey, String) {
    let key = KeyType::Rsa2048.generate().unwrap();
    let enc = EncodingKey::from_rsa_pem(key.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("k1".into());
    (enc, serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap())
}

fn token(key: &EncodingKey, iss: &str, sub: &str) -> String {
    let now = meshd::clock::unix_seconds(SystemTime::now());
    let claims = serde_json::json!({"iss": iss, "sub": sub, "aud": ["istio-ca"], "exp": now + 600, "iat": now});
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("k1".into());
    jsonwebtoken::encode(&h, &claims, key).unwrap()
}

// Multi-threaded: the log reader below blocks its thread while the JWKS server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_issuer_is_trusted_through_an_https_jwks_uri() {
    let (key, jwks) = issuer_key();
    let (port, ca_pem) = jwks_server(jwks).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let data = dir.path().join("data");
    let rule = serde_json::json!({"issuer": ISSUER, "jwks_uri": format!("https://127.0.0.1:{port}/keys"), "audiences": ["istio-ca"]});
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshd"))
        .args(["serve", "--data-dir"])
        .arg(&data)
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--plaintext-addr",
            "127.0.0.1:0",
            "--monitoring-addr",
            "127.0.0.1:0",
            "--ready-addr",
            "127.0.0.1:0",
            "--webhook-addr",
            "127.0.0.1:0",
            "--ca-key-type",
            "ecdsa-p256",
            "--standalone",
            "--local-issuer",
            "disabled",
        ])
        .env("JWT_RULE", rule.to_string())
        .env("SSL_CERT_FILE", &ca_file)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _guard = Killed(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut grpc = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut fetched = false;
    let mut log = Vec::new();
    while std::time::Instant::now() < deadline && (grpc.is_none() || !fetched) {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            log.push(line.clone());
            if let Some(rest) = line.split("listener=grpc-tls addr=").nth(1) {
                grpc = Some(rest.split_whitespace().next().unwrap().to_string());
            }
            fetched |= line.contains("fetched JWKS");
        }
    }
    let addr = grpc.expect("meshd logged its TLS listener");
    assert!(fetched, "meshd fetched the JWKS over https; log:\n{}", log.join("\n"));
    let root = std::fs::read(data.join("root-cert.pem")).unwrap();
    let ch = meshd::client::connect(&addr, SERVER_NAME, &root, None).await.unwrap();

    let good = token(&key, ISSUER, "system:serviceaccount:apps:payments");
    let chain = create(ch.clone(), Some(&good), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .unwrap();
    assert_eq!(
        leaf_facts(&chain).uri_sans,
        vec!["spiffe://cluster.local/ns/apps/sa/payments".to_string()]
    );

    let (other_key, _) = issuer_key();
    let forged = token(&other_key, ISSUER, "system:serviceaccount:apps:payments");
    let err = create(ch.clone(), Some(&forged), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{}", err.message());
    let stranger = token(
        &key,
        "https://elsewhere.example.com",
        "system:serviceaccount:apps:payments",
    );
    let err = create(ch, Some(&stranger), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{}", err.message());
}
