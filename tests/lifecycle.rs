//! Lifecycle: SIGTERM drains open xDS streams well within `--shutdown-duration` and exits 0;
//! `--max-connection-age` moves streams off a connection; shutdown in-process does not wait for
//! the deadline when streams are open.
mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

fn sidecar_node(i: usize) -> Node {
    xds_node(
        &format!("sidecar~10.9.0.{i}~app-{i}.default~default.svc.cluster.local"),
        &[("CLUSTER_ID", "cluster1"), ("NAMESPACE", "default")],
    )
}

/// An ADS stream that has received its first CDS response.
struct Stream {
    _tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
}

async fn open_stream(addr: SocketAddr, i: usize) -> Stream {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the plaintext port");
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        type_url: CDS.into(),
        node: Some(sidecar_node(i)),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rx = AggregatedDiscoveryServiceClient::new(ch)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .expect("CDS within 10s")
        .expect("no error")
        .expect("a response");
    assert_eq!(first.type_url, CDS);
    Stream { _tx: tx, rx }
}

/// Waits for the stream to end and returns how it ended.
async fn ended(s: &mut Stream, within: Duration) -> Result<(), tonic::Status> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.rx.message()).await {
            Err(_) => panic!("stream still open after {within:?}"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(status)) => return Err(status),
        }
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the real binary on ephemeral loopback ports; returns it with its plaintext xDS address.
fn spawn_meshd(dir: &std::path::Path, shutdown: &str) -> (Proc, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshd"))
        .args(["serve", "--standalone", "--data-dir"])
        .arg(dir.join("data"))
        .args([
            "--config-dir",
            concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config-dir"),
        ])
        .args(["--grpc-addr", "127.0.0.1:0", "--plaintext-addr", "127.0.0.1:0"])
        .args(["--monitoring-addr", "127.0.0.1:0", "--ready-addr", "127.0.0.1:0"])
        .args(["--webhook-addr", "127.0.0.1:0"])
        .args(["--shutdown-duration", shutdown, "--log-level", "info"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("meshd starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("listening") && line.contains("listener=grpc-plaintext") {
                let addr = line.rsplit("addr=").next().unwrap_or("").trim().to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("meshd logs its plaintext address");
    (Proc(child), addr.parse().expect("an address"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_streams_and_exits_zero_before_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (mut proc, addr) = spawn_meshd(dir.path(), "20s");
    let mut streams = Vec::new();
    for i in 0..3 {
        streams.push(open_stream(addr, i + 1).await);
    }
    let sent = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    for s in &mut streams {
        let status = ended(s, Duration::from_secs(10))
            .await
            .expect_err("a drained stream ends with a status");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(status.message().contains("shutting down"), "{status:?}");
    }
    let mut exit = None;
    eventually("meshd exits", Duration::from_secs(15), async || {
        exit = proc.0.try_wait().unwrap();
        exit.is_some()
    })
    .await;
    assert_eq!(exit.and_then(|e| e.code()), Some(0), "meshd exits 0 after SIGTERM");
    // The drain does not sit out the 20 s deadline once the streams are gone.
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "drained in {:?}",
        sent.elapsed()
    );
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "nothing accepts on the old port"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_shutdown_with_streams_open_returns_early() {
    let mut t = TestMeshd::start_with(|a| {
        a.shutdown_duration = Duration::from_secs(20);
        a.config_dir = Some(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config-dir").into());
    })
    .await;
    let addr = t.m().addrs.plaintext;
    let mut s = open_stream(addr, 7).await;
    let started = Instant::now();
    let stopping = tokio::spawn(async move {
        t.stop().await;
    });
    let status = ended(&mut s, Duration::from_secs(10))
        .await
        .expect_err("ended by shutdown");
    assert_eq!(status.code(), Code::Unavailable);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown returns before the 20 s deadline")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_moves_streams_off_old_connections() {
    let t = TestMeshd::start_with(|a| {
        a.max_connection_age = Duration::from_secs(1);
        a.max_connection_age_grace = Duration::from_millis(500);
        a.config_dir = Some(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config-dir").into());
    })
    .await;
    let addr = t.m().addrs.plaintext;
    let mut s = open_stream(addr, 8).await;
    // Age 1 s + grace 0.5 s: the connection is closed under the stream, which the proxy sees
    // as an error and answers by reconnecting.
    let _ = ended(&mut s, Duration::from_secs(10)).await;
    let again = open_stream(addr, 8).await;
    drop(again);
    let connected = t.metric("pilot_xds");
    assert!(connected <= 1.0, "the old stream is gone: pilot_xds = {connected}");
}
