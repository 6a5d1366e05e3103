//! Load limits: each answered fast with RESOURCE_EXHAUSTED (or a closed connection for a client
//! that never speaks), each counted, and the server keeps serving everyone else.
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

fn node(i: usize) -> Node {
    xds_node(
        &format!("sidecar~10.7.0.{i}~app-{i}.default~default.svc.cluster.local"),
        &[("CLUSTER_ID", "cluster1"), ("NAMESPACE", "default")],
    )
}

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

type Open = (mpsc::Sender<DiscoveryRequest>, tonic::Streaming<DiscoveryResponse>);

/// Opens an ADS stream on `ch` and waits for its first CDS response.
async fn open(ch: Channel, i: usize) -> Result<Open, tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        type_url: CDS.into(),
        node: Some(node(i)),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = AggregatedDiscoveryServiceClient::new(ch)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(_))) => Ok((tx, stream)),
        Ok(Ok(None)) => panic!("stream ended without a response"),
        Ok(Err(s)) => Err(s),
        Err(_) => panic!("no response within 10s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_bounded_and_released() {
    let t = TestMeshd::start_with(|a| a.max_streams_per_connection = 2).await;
    let addr = t.m().addrs.plaintext;
    let ch = channel(addr).await;
    let first = open(ch.clone(), 1).await.expect("first stream");
    let _second = open(ch.clone(), 2).await.expect("second stream");
    let started = Instant::now();
    let refused = open(ch.clone(), 3)
        .await
        .expect_err("third stream on the same connection");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("limit 2"), "{refused:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "refused at once");
    assert_eq!(
        t.metric("meshd_limit_rejections{limit=\"streams_per_connection\"}"),
        1.0
    );
    // Another connection is not affected.
    let _other = open(channel(addr).await, 4)
        .await
        .expect("a stream on another connection");
    // Closing a stream frees its slot.
    drop(first);
    eventually("a slot frees up", Duration::from_secs(10), async || {
        open(ch.clone(), 5).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_stream_rate_waits_up_to_a_second_then_refuses() {
    let t = TestMeshd::start_with(|a| a.max_requests_per_second = Some(1.0)).await;
    let addr = t.m().addrs.plaintext;
    let mut tasks = Vec::new();
    for i in 0..4 {
        tasks.push(tokio::spawn(async move {
            open(channel(addr).await, 10 + i).await.map(|_| ())
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(()) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("PILOT_MAX_REQUESTS_PER_SECOND"), "{s:?}");
                refused += 1;
            }
        }
    }
    // Burst 1 plus one more slot within the 1 s wait; the rest are refused (on a slow machine a
    // late arrival may find a refilled slot, so only the bounds are exact).
    assert!(ok >= 2 && refused >= 1, "ok {ok}, refused {refused}");
    assert_eq!(
        t.metric("meshd_limit_rejections{limit=\"new_stream_rate\"}"),
        refused as f64
    );
    // Once the bucket refills, streams open again.
    eventually("the bucket refills", Duration::from_secs(10), async || {
        open(channel(addr).await, 20).await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_size_limit_is_configurable() {
    let t = TestMeshd::start_with(|a| a.max_recv_message_size = 64 * 1024).await;
    let ch = channel(t.m().addrs.plaintext).await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        type_url: CDS.into(),
        node: Some(node(30)),
        resource_names: (0..10_000)
            .map(|i| format!("outbound|80||svc-{i}.default.svc.cluster.local"))
            .collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = AggregatedDiscoveryServiceClient::new(ch.clone())
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let err = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("answered")
        .expect_err("over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // A CSR over the limit on the TLS port gets the same answer.
    let token = t.token("default", "app");
    let big = "x".repeat(100 * 1024);
    let err = create(t.channel().await, Some(&token), None, big, 0)
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Normal requests still work.
    open(ch, 31).await.expect("a normal stream");
}

/// Reads until the server closes the connection; returns how long that took.
async fn closed_within(mut tcp: tokio::net::TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit, tcp.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_on_every_listener() {
    let t = TestMeshd::start_with(|a| {
        a.http2_preface_timeout = Duration::from_millis(500);
        a.tls_handshake_timeout = Duration::from_millis(500);
    })
    .await;
    let m = t.m();
    // Plaintext gRPC: nothing at all, then half a preface.
    let silent = tokio::net::TcpStream::connect(m.addrs.plaintext).await.unwrap();
    let mut half = tokio::net::TcpStream::connect(m.addrs.plaintext).await.unwrap();
    half.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // TLS gRPC: a ClientHello never sent.
    let tls_silent = tokio::net::TcpStream::connect(m.addrs.grpc).await.unwrap();
    // HTTP ports: a request line whose headers never finish (10 s header deadline).
    let mut mon = tokio::net::TcpStream::connect(m.addrs.monitoring).await.unwrap();
    mon.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut ready = tokio::net::TcpStream::connect(m.addrs.ready).await.unwrap();
    ready.write_all(b"GET /ready HTTP/1.1\r\n").await.unwrap();
    let mut hook = tokio::net::TcpStream::connect(m.addrs.webhook).await.unwrap();
    hook.write_all(&[0x16, 0x03, 0x01]).await.unwrap();

    let (a, b, c) = tokio::join!(
        closed_within(silent, Duration::from_secs(5)),
        closed_within(half, Duration::from_secs(5)),
        closed_within(tls_silent, Duration::from_secs(5)),
    );
    assert!(a < Duration::from_secs(3) && b < Duration::from_secs(3) && c < Duration::from_secs(3));
    // Meanwhile a well-behaved client is served.
    open(channel(m.addrs.plaintext).await, 40)
        .await
        .expect("a normal stream");
    assert_eq!(t.metric("meshd_limit_rejections{limit=\"http2_preface_timeout\"}"), 2.0);
    assert_eq!(
        t.metric("meshd_tls_handshake_errors{listener=\"grpc-tls\",reason=\"timeout\"}"),
        1.0
    );
    let (d, e, f) = tokio::join!(
        closed_within(mon, Duration::from_secs(40)),
        closed_within(ready, Duration::from_secs(40)),
        closed_within(hook, Duration::from_secs(40)),
    );
    assert!(
        d < Duration::from_secs(15) && e < Duration::from_secs(15),
        "{d:?} {e:?}"
    );
    assert!(f < Duration::from_secs(35), "{f:?}");
}
