//! Bad inputs from docs/bad-inputs.md that no other test file covers: each gets a clear answer
//! with the right code, and the server keeps serving a good caller afterwards.
mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use meshd::pki::keys::KeyType;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn node(i: usize) -> Node {
    xds_node(
        &format!("sidecar~10.8.0.{i}~app-{i}.default~default.svc.cluster.local"),
        &[("CLUSTER_ID", "cluster1"), ("NAMESPACE", "default")],
    )
}

async fn meshd() -> TestMeshd {
    TestMeshd::start_with(|a| {
        a.debounce_after = Duration::from_millis(20);
        a.config_dir = Some(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config-dir").into());
    })
    .await
}

async fn plaintext(t: &TestMeshd) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", t.m().addrs.plaintext))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn recv(
    rx: &mut tonic::Streaming<DiscoveryResponse>,
    within: Duration,
) -> Option<Result<DiscoveryResponse, tonic::Status>> {
    match tokio::time::timeout(within, rx.message()).await {
        Err(_) => None,
        Ok(Ok(Some(r))) => Some(Ok(r)),
        Ok(Ok(None)) => panic!("stream ended"),
        Ok(Err(s)) => Some(Err(s)),
    }
}

/// A good caller still gets a certificate.
async fn ca_still_serves(t: &TestMeshd) {
    let token = t.token("default", "web");
    create(t.channel().await, Some(&token), None, csr(KeyType::EcdsaP256, None), 0)
        .await
        .expect("a good CSR after the bad input");
}

/// A good proxy still gets its clusters.
async fn xds_still_serves(t: &TestMeshd) {
    let (tx, rx) = mpsc::channel(2);
    tx.send(DiscoveryRequest {
        type_url: CDS.into(),
        node: Some(node(99)),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut s = AggregatedDiscoveryServiceClient::new(plaintext(t).await)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = recv(&mut s, Duration::from_secs(10))
        .await
        .expect("CDS")
        .expect("no error");
    assert_eq!(r.type_url, CDS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csrs_with_unsupported_keys_are_invalid_argument() {
    let t = meshd().await;
    let token = t.token("default", "web");
    for (name, alg) in [
        ("Ed25519", &rcgen::PKCS_ED25519),
        ("ECDSA P-521", &rcgen::PKCS_ECDSA_P521_SHA512),
    ] {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let pem = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let err = create(t.channel().await, Some(&token), None, pem, 0)
            .await
            .expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains("not supported"), "{name}: {err:?}");
    }
    ca_still_serves(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_abuse_the_header_are_unauthenticated() {
    let t = meshd().await;
    let good = t.token("default", "web");
    let parts: Vec<&str> = good.split('.').collect();
    let jwks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.data_dir().join("issuer").join("jwks.json")).unwrap()).unwrap();
    let kid = jwks["keys"][0]["kid"].as_str().unwrap().to_string();
    // Algorithm confusion: HS256 "signed" with the issuer's public key material as the secret.
    let confused = {
        let header = b64(format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{kid}"}}"#).as_bytes());
        let input = format!("{header}.{}", parts[1]);
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, jwks.to_string().as_bytes());
        let sig = aws_lc_rs::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", b64(sig.as_ref()))
    };
    // A header that points at a key somewhere else (jku/x5u/jwk) must not be followed.
    let foreign_key = {
        let header = b64(format!(
            r#"{{"alg":"ES256","typ":"JWT","kid":"{kid}","jku":"https://192.0.2.1/keys","jwk":{{"kty":"EC"}}}}"#
        )
        .as_bytes());
        format!("{header}.{}.{}", parts[1], parts[2])
    };
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "HS256 signed with the public key",
            vec![("authorization", format!("Bearer {confused}"))],
            "",
        ),
        (
            "jku/jwk header",
            vec![("authorization", format!("Bearer {foreign_key}"))],
            "",
        ),
        (
            "Basic scheme",
            vec![("authorization", "Basic dXNlcjpwYXNz".into())],
            "no bearer token",
        ),
        (
            "empty bearer",
            vec![("authorization", "Bearer ".into())],
            "no bearer token",
        ),
        (
            "token of 16 KiB",
            vec![("authorization", format!("Bearer {}", "a".repeat(16 * 1024)))],
            "",
        ),
    ];
    for (name, headers, message) in cases {
        let mut client = meshd::proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient::new(
            t.channel().await,
        );
        let mut req = tonic::Request::new(meshd::proto::istio_ca::IstioCertificateRequest {
            csr: csr(KeyType::EcdsaP256, None),
            validity_duration: 0,
            metadata: None,
        });
        for (k, v) in &headers {
            req.metadata_mut().insert(*k, v.parse().unwrap());
        }
        let err = client.create_certificate(req).await.expect_err(name);
        assert_eq!(err.code(), Code::Unauthenticated, "{name}: {err:?}");
        assert!(err.message().contains(message), "{name}: {err:?}");
        assert!(!err.message().contains(parts[2]), "{name}: the token is never echoed");
    }
    ca_still_serves(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_resource_names_are_answered_quickly() {
    let t = meshd().await;
    let names: Vec<String> = (0..100_000).map(|i| format!("outbound|80||s{i}.x")).collect();
    // SotW: EDS for 100,000 names, all unknown: answered at once with what exists (nothing).
    let (tx, rx) = mpsc::channel(2);
    tx.send(DiscoveryRequest {
        type_url: EDS.into(),
        node: Some(node(1)),
        resource_names: names.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let started = Instant::now();
    let mut s = AggregatedDiscoveryServiceClient::new(plaintext(&t).await)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = recv(&mut s, Duration::from_secs(10))
        .await
        .expect("answered")
        .expect("no error");
    assert_eq!(r.type_url, EDS);
    assert!(r.resources.is_empty(), "no such clusters exist");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // Delta: the same names as subscriptions and as initial versions.
    let (tx, rx) = mpsc::channel(2);
    tx.send(DeltaDiscoveryRequest {
        type_url: EDS.into(),
        node: Some(node(2)),
        resource_names_subscribe: names[..50_000].to_vec(),
        initial_resource_versions: names[50_000..].iter().map(|n| (n.clone(), "v".to_string())).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut d = AggregatedDiscoveryServiceClient::new(plaintext(&t).await)
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = tokio::time::timeout(Duration::from_secs(10), d.message())
        .await
        .expect("answered")
        .expect("no error")
        .expect("a response");
    assert!(r.resources.is_empty());
    // The 50,000 names the client claimed to have do not exist: they are removed.
    assert_eq!(r.removed_resources.len(), 50_000);
    xds_still_serves(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_nacks_everything_gets_no_reply_loop() {
    let t = meshd().await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(DiscoveryRequest {
        type_url: CDS.into(),
        node: Some(node(3)),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut s = AggregatedDiscoveryServiceClient::new(plaintext(&t).await)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut nacked = 0;
    // The config dir loads in the background, so there may be a second (full) push; every
    // response is NACKed and none may be answered by another response.
    let mut last = recv(&mut s, Duration::from_secs(10)).await.expect("CDS").unwrap();
    loop {
        tx.send(DiscoveryRequest {
            type_url: CDS.into(),
            version_info: String::new(),
            response_nonce: last.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: "rejecting everything".into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        nacked += 1;
        match recv(&mut s, Duration::from_secs(2)).await {
            None => break,
            Some(Ok(r)) => {
                assert_ne!(
                    r.version_info, last.version_info,
                    "a NACK is never answered with the same config"
                );
                last = r;
                assert!(nacked < 5, "responses keep coming after NACKs");
            }
            Some(Err(e)) => panic!("the stream survives NACKs: {e:?}"),
        }
    }
    assert_eq!(t.metric("pilot_total_xds_rejects{type=\"cds\"}"), f64::from(nacked));
    xds_still_serves(&t).await;
}

/// Sends raw bytes as an ADS message, as a broken client would.
#[derive(Default, Clone)]
struct RawBytesCodec;

struct RawEncoder;
struct ResponseDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ResponseDecoder {
    type Item = DiscoveryResponse;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<DiscoveryResponse>, tonic::Status> {
        use prost::Message;
        DiscoveryResponse::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl tonic::codec::Codec for RawBytesCodec {
    type Encode = Vec<u8>;
    type Decode = DiscoveryResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_protobuf_on_an_ads_stream_is_invalid_argument() {
    let t = meshd().await;
    for (name, bytes) in [
        ("truncated varint", vec![0x0a, 0xff, 0xff, 0xff]),
        ("length past the end", vec![0x12, 0x40, b'a']),
        ("invalid UTF-8 in type_url", vec![0x22, 0x02, 0xc3, 0x28]),
        ("wire type 7", vec![0x0f]),
    ] {
        let mut grpc = tonic::client::Grpc::new(plaintext(&t).await);
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        );
        let (tx, rx) = mpsc::channel(2);
        tx.send(bytes).await.unwrap();
        let mut s = grpc
            .streaming(tonic::Request::new(ReceiverStream::new(rx)), path, RawBytesCodec)
            .await
            .expect("stream opens")
            .into_inner();
        let err = tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("answered")
            .expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains("malformed xDS request"), "{name}: {err:?}");
        drop(tx);
    }
    xds_still_serves(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_debug_requests_get_clear_http_answers() {
    let t = meshd().await;
    let mon = t.m().addrs.monitoring;
    let (status, body) = http_get(mon, "/debug/nothing-here", &[]).await;
    assert_eq!(status, 404);
    assert!(body.contains("/debug/syncz"), "{body}");
    let (status, _) = http_get(mon, "/debug/config_dump?proxyID=", &[]).await;
    assert_eq!(status, 400);
    let (status, _) = http_get(mon, "/debug/config_dump?proxyID=%00%ff&detail=maybe", &[]).await;
    assert_eq!(status, 404);
    // Not GET.
    let tcp = tokio::net::TcpStream::connect(mon).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            http::Request::post("/debug/syncz")
                .header("host", "x")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    let (status, _) = http_get(mon, "/metrics", &[]).await;
    assert_eq!(status, 200);
}
