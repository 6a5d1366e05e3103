//! CreateCertificate end to end over real TLS on loopback, as istio-agent and gateways call it.
mod common;

use std::time::{Duration, SystemTime};

use base64::Engine;
use common::*;
use meshd::pki::keys::KeyType;
use meshd::pki::pem::parse_certs;
use tonic::Code;

const ID: &str = "spiffe://cluster.local/ns/default/sa/web";

#[tokio::test]
async fn issued_cert_chains_to_root_and_carries_only_the_callers_identity() {
    let t = TestMeshd::start().await;
    let token = t.token("default", "web");
    for key in [KeyType::EcdsaP256, KeyType::Rsa2048] {
        let chain = create(t.channel().await, Some(&token), None, csr(key, Some(ID)), 0)
            .await
            .unwrap();
        assert_eq!(chain.len(), 2, "self-signed CA answers [leaf, root]");
        assert_eq!(
            chain[1].as_bytes(),
            t.root_pem().as_slice(),
            "last entry is the root bundle"
        );
        meshd::client::verify_response(&chain, &t.root_pem(), Some(&meshd::pki::SpiffeId::parse(ID).unwrap())).unwrap();
        let f = leaf_facts(&chain);
        assert_eq!(f.uri_sans, vec![ID.to_string()]);
        assert!(f.san_critical && f.subject_empty && !f.is_ca && f.server_auth && f.client_auth);
        let now = meshd::clock::unix_seconds(SystemTime::now()) as i64;
        let nb = meshd::clock::unix_seconds(f.not_before) as i64;
        let na = meshd::clock::unix_seconds(f.not_after) as i64;
        assert!((now - 120 - nb).abs() <= 5, "NotBefore is now-2m");
        assert!((na - now - 86400).abs() <= 5, "default TTL is 24h");
    }
}

#[tokio::test]
async fn csr_asking_for_another_identity_gets_the_authenticated_one() {
    let t = TestMeshd::start().await;
    let token = t.token("default", "web");
    let evil = csr(
        KeyType::EcdsaP256,
        Some("spiffe://cluster.local/ns/kube-system/sa/admin"),
    );
    let chain = create(t.channel().await, Some(&token), None, evil, 0).await.unwrap();
    assert_eq!(leaf_facts(&chain).uri_sans, vec![ID.to_string()]);
}

#[tokio::test]
async fn requested_ttl_is_honoured_and_over_max_is_invalid_argument() {
    let t = TestMeshd::start().await;
    let token = t.token("default", "web");
    let ch = t.channel().await;
    let chain = create(ch.clone(), Some(&token), None, csr(KeyType::EcdsaP256, None), 3600)
        .await
        .unwrap();
    let f = leaf_facts(&chain);
    let ttl = f.not_after.duration_since(SystemTime::now()).unwrap().as_secs();
    assert!((3590..=3600).contains(&ttl), "ttl {ttl}");
    let err = create(
        ch.clone(),
        Some(&token),
        None,
        csr(KeyType::EcdsaP256, None),
        90 * 86400 + 1,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("max allowed TTL"), "{}", err.message());
    // Negative means "use the default", exactly as istiod does.
    let chain = create(ch.clone(), Some(&token), None, csr(KeyType::EcdsaP256, None), -10)
        .await
        .unwrap();
    let ttl = leaf_facts(&chain)
        .not_after
        .duration_since(SystemTime::now())
        .unwrap()
        .as_secs();
    assert!((86390..=86400).contains(&ttl), "ttl {ttl}");
    assert_eq!(t.metric("citadel_server_csr_sign_err_count{error=\"TTL_ERROR\"}"), 1.0);
}

#[tokio::test]
async fn restart_keeps_the_same_root() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut a = TestMeshd::start_with(|args| args.data_dir = data.clone()).await;
    let root_a = a.root_pem();
    let token = a.token("default", "web");
    let chain = create(
        a.channel().await,
        Some(&token),
        None,
        csr(KeyType::EcdsaP256, Some(ID)),
        0,
    )
    .await
    .unwrap();
    a.stop().await;
    let b = TestMeshd::start_with(|args| args.data_dir = data.clone()).await;
    assert_eq!(b.root_pem(), root_a);
    // A certificate from before the restart still verifies against the root after it.
    meshd::client::verify_response(&chain, &b.root_pem(), None).unwrap();
    // And the token minted before the restart is still trusted.
    create(b.channel().await, Some(&token), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .unwrap();
}

/// A root and an intermediate, as an operator's `cacerts` would hold them.
fn root_and_intermediate(dir: &std::path::Path) -> (String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut rp = CertificateParams::default();
    rp.distinguished_name.push(DnType::OrganizationName, "Example Org");
    rp.distinguished_name.push(DnType::CommonName, "Root CA");
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = rp.self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ip = CertificateParams::default();
    ip.distinguished_name.push(DnType::OrganizationName, "Example Org");
    ip.distinguished_name
        .push(DnType::CommonName, "Intermediate CA cluster1");
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ip.use_authority_key_identifier_extension = true;
    let issuer = Issuer::new(rp, root_key);
    let inter = ip.signed_by(&int_key, &issuer).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), inter.pem()).unwrap();
    std::fs::write(dir.join("ca-key.pem"), int_key.serialize_pem()).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), inter.pem()).unwrap();
    std::fs::write(dir.join("root-cert.pem"), root.pem()).unwrap();
    (root.pem(), inter.pem())
}

#[tokio::test]
async fn plugged_ca_with_an_intermediate_answers_leaf_intermediate_root() {
    let cadir = tempfile::tempdir().unwrap();
    let (root, inter) = root_and_intermediate(cadir.path());
    let t = TestMeshd::start_with(|a| a.ca_dir = Some(cadir.path().to_path_buf())).await;
    assert_eq!(
        t.root_pem(),
        root.as_bytes(),
        "data-dir root-cert.pem is the plugged root"
    );
    let token = t.token("default", "web");
    let chain = create(
        t.channel().await,
        Some(&token),
        None,
        csr(KeyType::Rsa2048, Some(ID)),
        0,
    )
    .await
    .unwrap();
    assert_eq!(chain.len(), 3, "[leaf, intermediate, root]");
    assert_eq!(chain[1], inter);
    assert_eq!(chain[2], root);
    meshd::client::verify_response(&chain, root.as_bytes(), Some(&meshd::pki::SpiffeId::parse(ID).unwrap())).unwrap();
    // The chain does not verify without the intermediate: the middle entry matters.
    let short = vec![chain[0].clone(), chain[2].clone()];
    assert!(meshd::client::verify_response(&short, root.as_bytes(), None).is_err());
}

#[tokio::test]
async fn plugged_ca_files_are_reloaded_when_they_change() {
    let cadir = tempfile::tempdir().unwrap();
    let (root1, _) = root_and_intermediate(cadir.path());
    let t = TestMeshd::start_with(|a| {
        a.ca_dir = Some(cadir.path().to_path_buf());
        a.ca_reload_interval = Duration::from_millis(100);
    })
    .await;
    let token = t.token("default", "web");
    let old_channel = t.channel().await;
    let staging = tempfile::tempdir().unwrap();
    let (root2, _) = root_and_intermediate(staging.path());
    assert_ne!(root1, root2);
    for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"] {
        std::fs::copy(staging.path().join(f), cadir.path().join(f)).unwrap();
    }
    let root_file = t.m().root_cert_path();
    eventually(
        "root-cert.pem follows the plugged CA",
        Duration::from_secs(10),
        async || std::fs::read_to_string(&root_file).unwrap_or_default() == root2,
    )
    .await;
    // New connections verify the serving certificate against the new root...
    eventually(
        "serving certificate reissued from the new CA",
        Duration::from_secs(10),
        async || {
            meshd::client::connect(&t.m().addrs.grpc.to_string(), SERVER_NAME, root2.as_bytes(), None)
                .await
                .is_ok()
        },
    )
    .await;
    // ...and leaves chain to it, also on a connection opened before the change.
    let chain = create(old_channel, Some(&token), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .unwrap();
    assert_eq!(chain.last().unwrap(), &root2);
    meshd::client::verify_response(&chain, root2.as_bytes(), None).unwrap();
}

#[tokio::test]
async fn kubernetes_tls_style_cacerts_are_accepted() {
    let staging = tempfile::tempdir().unwrap();
    let (root, inter) = root_and_intermediate(staging.path());
    let cadir = tempfile::tempdir().unwrap();
    std::fs::copy(staging.path().join("ca-cert.pem"), cadir.path().join("tls.crt")).unwrap();
    std::fs::copy(staging.path().join("ca-key.pem"), cadir.path().join("tls.key")).unwrap();
    std::fs::copy(staging.path().join("root-cert.pem"), cadir.path().join("ca.crt")).unwrap();
    let t = TestMeshd::start_with(|a| a.ca_dir = Some(cadir.path().to_path_buf())).await;
    let token = t.token("default", "web");
    let chain = create(t.channel().await, Some(&token), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .unwrap();
    // istiod uses tls.crt + ca.crt as the chain and ca.crt as the root bundle.
    assert_eq!(chain, vec![chain[0].clone(), inter, root.clone(), root]);
}

#[tokio::test]
async fn serving_cert_verifies_as_the_istiod_name_and_as_the_load_balancer_ip() {
    let t = TestMeshd::start_with(|a| {
        a.grpc_addr = "127.0.0.2:0".parse().unwrap();
        a.server_sans = vec!["127.0.0.2".into()];
    })
    .await;
    let addr = t.m().addrs.grpc.to_string();
    assert!(addr.starts_with("127.0.0.2:"));
    let root = t.root_pem();
    let token = t.token("default", "web");
    for name in [
        SERVER_NAME,
        "istiod-remote.istio-system.svc",
        "istio-pilot.istio-system.svc",
        "127.0.0.2",
    ] {
        let ch = meshd::client::connect(&addr, name, &root, None)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        create(ch, Some(&token), Some("Kubernetes"), csr(KeyType::EcdsaP256, None), 0)
            .await
            .unwrap();
    }
    for wrong in ["istiod.other-ns.svc", "127.0.0.3"] {
        assert!(
            meshd::client::connect(&addr, wrong, &root, None).await.is_err(),
            "{wrong} must not verify"
        );
    }
}

#[tokio::test]
async fn serving_cert_rotates_without_dropping_connections() {
    let t = TestMeshd::start_with(|a| a.serving_cert_ttl = Duration::from_secs(3)).await;
    let token = t.token("default", "web");
    let ch = t.channel().await;
    create(ch.clone(), Some(&token), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .unwrap();
    const HANDSHAKES: &str = "meshd_tls_handshakes{listener=\"grpc-tls\"}";
    let base = t.metric(HANDSHAKES);
    let first = serving_leaf(&t).await;
    let mut probes = 1.0;
    eventually("serving certificate renewed", Duration::from_secs(15), async || {
        probes += 1.0;
        serving_leaf(&t).await != first
    })
    .await;
    // The server counts a handshake just after the client sees it complete.
    eventually("probe handshakes counted", Duration::from_secs(5), async || {
        t.metric(HANDSHAKES) == base + probes
    })
    .await;
    create(ch.clone(), Some(&token), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .unwrap();
    // A request is served only after its connection's handshake was counted, so a reconnect
    // would show here.
    assert_eq!(
        t.metric(HANDSHAKES),
        base + probes,
        "the open connection was reused, not re-established"
    );
}

/// The serving leaf a fresh TLS handshake gets.
async fn serving_leaf(t: &TestMeshd) -> Vec<u8> {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    for c in parse_certs(&t.root_pem()).unwrap() {
        roots.add(c).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(meshd::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = tokio::net::TcpStream::connect(t.m().addrs.grpc).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(SERVER_NAME).unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].as_ref().to_vec()
}

#[tokio::test]
async fn a_workload_renews_with_its_client_certificate() {
    let t = TestMeshd::start().await;
    let token = t.token("default", "web");
    let key = KeyType::EcdsaP256.generate().unwrap();
    let csr_pem = {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.serialize_request(&key).unwrap().pem().unwrap()
    };
    let chain = create(t.channel().await, Some(&token), None, csr_pem, 0).await.unwrap();
    let cert_chain = chain[..chain.len() - 1].concat();
    let mtls = meshd::client::connect(
        &t.m().addrs.grpc.to_string(),
        SERVER_NAME,
        &t.root_pem(),
        Some((cert_chain.into_bytes(), key.serialize_pem().into_bytes())),
    )
    .await
    .unwrap();
    // No token at all: the client certificate is the credential.
    let renewed = create(mtls, None, None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .unwrap();
    assert_eq!(leaf_facts(&renewed).uri_sans, vec![ID.to_string()]);
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let t = TestMeshd::start().await;
    let (other_root, other_key) =
        meshd::ca::material::generate_root("evil.local", KeyType::EcdsaP256, SystemTime::now()).unwrap();
    // A self-signed "client certificate" that does not chain to the mesh roots.
    let res = async {
        let ch = meshd::client::connect(
            &t.m().addrs.grpc.to_string(),
            SERVER_NAME,
            &t.root_pem(),
            Some((other_root.into_bytes(), other_key.into_bytes())),
        )
        .await?;
        create(ch, None, None, csr(KeyType::EcdsaP256, None), 0)
            .await
            .map_err(anyhow::Error::from)
    }
    .await;
    assert!(res.is_err(), "a foreign client certificate must not get a certificate");
    // Still serving everyone else.
    let token = t.token("default", "web");
    create(t.channel().await, Some(&token), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .unwrap();
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// One bad input per case: the gRPC code, a message that says what is wrong, and the server keeps
/// serving a good caller right after.
#[tokio::test]
async fn bad_inputs_get_the_right_code_and_the_server_keeps_serving() {
    let t = TestMeshd::start().await;
    let ch = t.channel().await;
    let good = t.token("default", "web");
    let data = t.data_dir();
    let parts: Vec<String> = good.split('.').map(String::from).collect();
    let expired = mint(
        &data,
        "default",
        "web",
        &[AUDIENCE],
        Duration::from_secs(60),
        SystemTime::now() - Duration::from_secs(3600),
    );
    let wrong_aud = mint(
        &data,
        "default",
        "web",
        &["https://kubernetes.default.svc"],
        Duration::from_secs(600),
        SystemTime::now(),
    );
    let other_dir = tempfile::tempdir().unwrap();
    let wrong_issuer_key = mint(
        other_dir.path(),
        "default",
        "web",
        &[AUDIENCE],
        Duration::from_secs(600),
        SystemTime::now(),
    );
    let tampered = {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&parts[1])
            .unwrap();
        let evil = String::from_utf8(payload)
            .unwrap()
            .replace(":default:", ":kube-system:");
        format!("{}.{}.{}", parts[0], b64(evil.as_bytes()), parts[2])
    };
    let alg_none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
    let bad_sig_csr = {
        let pem = csr(KeyType::EcdsaP256, Some(ID));
        let mut der = meshd::pki::pem::parse_certs(pem.replace("CERTIFICATE REQUEST", "CERTIFICATE").as_bytes())
            .unwrap()
            .remove(0)
            .as_ref()
            .to_vec();
        let pos = der.windows(7).position(|w| w == b"default").unwrap();
        der[pos] = b'D';
        meshd::pki::pem::cert_to_pem(&der).replace("CERTIFICATE", "CERTIFICATE REQUEST")
    };
    let ok_csr = || csr(KeyType::EcdsaP256, None);
    let rsa1024 = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rsa1024.csr")).unwrap();
    let huge_csr = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        "A".repeat(70 * 1024)
    );

    struct Case {
        name: &'static str,
        token: Option<String>,
        csr: String,
        validity: i64,
        code: Code,
        message: &'static str,
    }
    let cases = vec![
        Case {
            name: "no credentials",
            token: None,
            csr: ok_csr(),
            validity: 0,
            code: Code::Unauthenticated,
            message: "no bearer token",
        },
        Case {
            name: "expired token",
            token: Some(expired),
            csr: ok_csr(),
            validity: 0,
            code: Code::Unauthenticated,
            message: "expired",
        },
        Case {
            name: "tampered token",
            token: Some(tampered),
            csr: ok_csr(),
            validity: 0,
            code: Code::Unauthenticated,
            message: "signature",
        },
        Case {
            name: "wrong audience",
            token: Some(wrong_aud),
            csr: ok_csr(),
            validity: 0,
            code: Code::Unauthenticated,
            message: "audiences",
        },
        Case {
            name: "wrong issuer key",
            token: Some(wrong_issuer_key),
            csr: ok_csr(),
            validity: 0,
            code: Code::Unauthenticated,
            message: "request authenticate failure",
        },
        Case {
            name: "alg none",
            token: Some(alg_none),
            csr: ok_csr(),
            validity: 0,
            code: Code::Unauthenticated,
            message: "none",
        },
        Case {
            name: "not a JWT",
            token: Some("abc".into()),
            csr: ok_csr(),
            validity: 0,
            code: Code::Unauthenticated,
            message: "not a JWT",
        },
        Case {
            name: "garbage CSR",
            token: Some(good.clone()),
            csr: "hello".into(),
            validity: 0,
            code: Code::InvalidArgument,
            message: "PEM",
        },
        Case {
            name: "CSR with a bad signature",
            token: Some(good.clone()),
            csr: bad_sig_csr,
            validity: 0,
            code: Code::InvalidArgument,
            message: "signature",
        },
        Case {
            name: "RSA-1024 key",
            token: Some(good.clone()),
            csr: rsa1024,
            validity: 0,
            code: Code::InvalidArgument,
            message: "RSA-1024",
        },
        Case {
            name: "CSR over 64 KiB",
            token: Some(good.clone()),
            csr: huge_csr,
            validity: 0,
            code: Code::InvalidArgument,
            message: "limit",
        },
        Case {
            name: "validity over the max",
            token: Some(good.clone()),
            csr: ok_csr(),
            validity: i64::MAX,
            code: Code::InvalidArgument,
            message: "max allowed TTL",
        },
    ];
    let n = cases.len();
    for c in cases {
        let err = create(ch.clone(), c.token.as_deref(), None, c.csr, c.validity)
            .await
            .expect_err(c.name);
        assert_eq!(err.code(), c.code, "{}: {}", c.name, err.message());
        assert!(
            err.message().contains(c.message),
            "{}: message {:?} should mention {:?}",
            c.name,
            err.message(),
            c.message
        );
        assert!(!err.message().contains(&good), "{}: token echoed", c.name);
        // The server keeps serving a good caller on the same connection.
        create(ch.clone(), Some(&good), None, ok_csr(), 0)
            .await
            .unwrap_or_else(|e| panic!("after {}: {e}", c.name));
    }
    assert_eq!(t.metric("citadel_server_csr_count"), (2 * n) as f64);
    assert_eq!(t.metric("citadel_server_success_cert_issuance_count"), n as f64);
    assert_eq!(t.metric("citadel_server_authentication_failure_count"), 7.0);
    assert_eq!(t.metric("citadel_server_csr_sign_err_count{error=\"CSR_ERROR\"}"), 4.0);
    assert_eq!(t.metric("citadel_server_csr_sign_err_count{error=\"TTL_ERROR\"}"), 1.0);
}

#[tokio::test]
async fn a_ca_true_csr_never_yields_a_ca_certificate() {
    let t = TestMeshd::start().await;
    let key = KeyType::EcdsaP256.generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let pem = p.serialize_request(&key).unwrap().pem().unwrap();
    let chain = create(t.channel().await, Some(&t.token("default", "web")), None, pem, 0)
        .await
        .unwrap();
    assert!(!leaf_facts(&chain).is_ca);
}

#[tokio::test]
async fn impersonation_is_refused_without_trusted_node_accounts() {
    let t = TestMeshd::start().await;
    let mut client =
        meshd::proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient::new(t.channel().await);
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "ImpersonatedIdentity".to_string(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(
                "spiffe://cluster.local/ns/a/sa/b".into(),
            )),
        },
    );
    let mut req = tonic::Request::new(meshd::proto::istio_ca::IstioCertificateRequest {
        csr: csr(KeyType::EcdsaP256, None),
        validity_duration: 0,
        metadata: Some(prost_types::Struct { fields }),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", t.token("default", "web")).parse().unwrap(),
    );
    let err = client.create_certificate(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("impersonation"));
}

#[tokio::test]
async fn the_plaintext_port_never_signs() {
    let t = TestMeshd::start().await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", t.m().addrs.plaintext))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = create(
        ch,
        Some(&t.token("default", "web")),
        None,
        csr(KeyType::EcdsaP256, None),
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("15012"), "{}", err.message());
    assert_eq!(t.metric("citadel_server_success_cert_issuance_count"), 0.0);
    assert_eq!(t.metric("citadel_server_authentication_failure_count"), 1.0);
}

#[tokio::test]
async fn messages_over_4_mib_are_refused() {
    let t = TestMeshd::start().await;
    let big = "A".repeat(5 << 20);
    let err = create(t.channel().await, Some(&t.token("default", "web")), None, big, 0)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    create(
        t.channel().await,
        Some(&t.token("default", "web")),
        None,
        csr(KeyType::EcdsaP256, None),
        0,
    )
    .await
    .unwrap();
}

/// An empty `--ca-dir` (the optional cacerts volume without its Secret) is istiod's
/// self-signed CA, not a startup failure; a directory with only part of a CA still is one.
#[tokio::test]
async fn an_empty_ca_dir_falls_back_to_the_self_signed_root() {
    let cadir = tempfile::tempdir().unwrap();
    let t = TestMeshd::start_with(|a| a.ca_dir = Some(cadir.path().to_path_buf())).await;
    assert!(
        matches!(t.m().ca.load().source, meshd::ca::material::CaSource::SelfSigned { .. }),
        "{:?}",
        t.m().ca.load().source
    );
    let token = t.token("default", "web");
    let chain = create(
        t.channel().await,
        Some(&token),
        None,
        csr(KeyType::EcdsaP256, Some(ID)),
        0,
    )
    .await
    .unwrap();
    meshd::client::verify_response(&chain, &t.root_pem(), Some(&meshd::pki::SpiffeId::parse(ID).unwrap())).unwrap();

    let partial = tempfile::tempdir().unwrap();
    root_and_intermediate(partial.path());
    std::fs::remove_file(partial.path().join("root-cert.pem")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut args = meshd::config::ServeArgs::for_tests(dir.path().join("data"));
    args.ca_dir = Some(partial.path().to_path_buf());
    assert!(
        meshd::app::start(args).await.is_err(),
        "a key without its root is refused"
    );
}

/// `--local-issuer auto` trusts data-dir tokens only standalone: with remote clusters
/// (`--remote-kubeconfig-dir`), a data-dir token is no way in; `enabled` opts back in.
#[tokio::test]
async fn data_dir_tokens_are_not_trusted_with_remote_clusters_unless_enabled() {
    let remotes = tempfile::tempdir().unwrap();
    let t = TestMeshd::start_with(|a| a.remote_kubeconfig_dir = Some(remotes.path().to_path_buf())).await;
    let err = create(
        t.channel().await,
        Some(&t.token("default", "web")),
        None,
        csr(KeyType::EcdsaP256, Some(ID)),
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    let t = TestMeshd::start_with(|a| {
        a.remote_kubeconfig_dir = Some(remotes.path().to_path_buf());
        a.local_issuer = meshd::config::LocalIssuerMode::Enabled;
    })
    .await;
    create(
        t.channel().await,
        Some(&t.token("default", "web")),
        None,
        csr(KeyType::EcdsaP256, Some(ID)),
        0,
    )
    .await
    .expect("explicitly enabled");
}
