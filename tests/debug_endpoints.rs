//! 15014's debug endpoints: loopback callers always; anyone else only with a token, and a
//! workload identity only for `config_dump` of proxies in its own namespace.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

fn node(id: &str, ns: &str) -> Node {
    xds_node(id, &[("CLUSTER_ID", "cluster1"), ("NAMESPACE", ns)])
}

/// A sidecar connected over the plaintext port; keep the sender alive to keep the stream.
async fn connect_sidecar(addr: SocketAddr, id: &str, ns: &str) -> mpsc::Sender<DiscoveryRequest> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        type_url: CDS.into(),
        node: Some(node(id, ns)),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = AggregatedDiscoveryServiceClient::new(ch)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("CDS within 10s")
        .unwrap()
        .unwrap();
    assert_eq!(first.type_url, CDS);
    tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_endpoints_refuse_anonymous_remote_callers_and_scope_workloads() {
    let t = TestMeshd::start_with(|a| {
        a.monitoring_addr = "0.0.0.0:0".parse().unwrap();
        a.config_dir = Some(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/config-dir").into());
    })
    .await;
    let port = t.m().addrs.monitoring.port();
    let local: SocketAddr = ([127, 0, 0, 1], port).into();
    let remote: SocketAddr = (non_loopback_ip(), port).into();
    let _a = connect_sidecar(
        t.m().addrs.plaintext,
        "sidecar~10.1.0.5~app-1.default~default.svc.cluster.local",
        "default",
    )
    .await;
    let _b = connect_sidecar(
        t.m().addrs.plaintext,
        "sidecar~10.1.0.6~db-1.payments~payments.svc.cluster.local",
        "payments",
    )
    .await;

    // Loopback: everything, including a dump with the decoded resources.
    let (status, body) = http_get(local, "/debug/syncz", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("app-1.default"), "{body}");
    // The config dir loads in the background: wait for its services to reach the dump.
    let mut dump = serde_json::Value::Null;
    eventually(
        "config_dump shows outbound clusters",
        Duration::from_secs(20),
        async || {
            let (status, body) = http_get(local, "/debug/config_dump?proxyID=app-1.default&detail=true", &[]).await;
            assert_eq!(status, 200, "{body}");
            dump = serde_json::from_str(&body).unwrap();
            dump["types"]["cds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"].as_str().unwrap().starts_with("outbound|"))
        },
    )
    .await;
    assert_eq!(dump["namespace"], "default");
    let clusters = dump["types"]["cds"].as_array().unwrap();
    assert!(!dump["types"]["eds"].as_array().unwrap().is_empty(), "{dump}");
    assert!(
        clusters
            .iter()
            .all(|c| c["detail"].as_str().is_some_and(|d| d.contains("name")))
    );
    let (status, _) = http_get(local, "/debug/config_dump?proxyID=nobody.default", &[]).await;
    assert_eq!(status, 404);
    let (status, _) = http_get(local, "/debug/config_dump", &[]).await;
    assert_eq!(status, 400);

    // Not loopback, no token: 401 and counted. Metrics stay public, as on istiod.
    let (status, body) = http_get(remote, "/debug/syncz", &[]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("bearer token"), "{body}");
    let (status, _) = http_get(remote, "/debug/clusterz", &[("authorization", "Bearer not-a-jwt")]).await;
    assert_eq!(status, 401);
    let (status, metrics) = http_get(remote, "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        metric_value(&metrics, "meshd_debug_requests_denied{reason=\"no_credentials\"}"),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "meshd_debug_requests_denied{reason=\"unauthenticated\"}"),
        1.0
    );

    // A workload identity: only config_dump, only for its own namespace.
    let app = format!("Bearer {}", t.token("default", "app"));
    let auth = [("authorization", app.as_str())];
    let (status, _) = http_get(remote, "/debug/syncz", &auth).await;
    assert_eq!(status, 403);
    let (status, body) = http_get(remote, "/debug/config_dump?proxyID=app-1.default", &auth).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(remote, "/debug/config_dump?proxyID=db-1.payments", &auth).await;
    assert_eq!(status, 403, "{body}");

    // The system namespace: everything.
    let admin = format!("Bearer {}", t.token("istio-system", "istiod"));
    let (status, body) = http_get(remote, "/debug/syncz", &[("authorization", admin.as_str())]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("db-1.payments"));
}

/// `meshd proxy-status` against a running meshd: a proxy that has not ACKed its CDS yet is STALE
/// there and NOT SENT for types it never asked for; once it ACKs, CDS is SYNCED. Two replica
/// URLs list the proxy once per replica.
#[tokio::test]
async fn proxy_status_shows_synced_stale_and_not_sent() {
    use common::xds::{CDS, Sotw, plaintext, req};
    use meshd::proxy_status::{Sync, collect, render_table};
    let t = TestMeshd::start_with(|a| a.debounce_after = Duration::from_millis(20)).await;
    let url = format!("http://{}", t.m().addrs.monitoring);
    let node = xds_node(
        "router~10.0.0.9~gw-1.istio-system~istio-system.svc.cluster.local",
        &[("CLUSTER_ID", "cluster2"), ("NAMESPACE", "istio-system")],
    );
    let mut s = Sotw::open(plaintext(&t).await, None).await.unwrap();
    s.send(req(CDS, &[], "", Some(node))).await;
    let cds = s.recv().await.unwrap();

    let rows = collect(std::slice::from_ref(&url), None).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].name, "gw-1.istio-system");
    assert_eq!(rows[0].cluster, "cluster2");
    assert_eq!(rows[0].types["cds"], Sync::Stale, "sent, not ACKed yet");
    assert_eq!(rows[0].types["lds"], Sync::NotSent);

    s.send(req(CDS, &[], &cds.nonce, None)).await;
    let mut rows = Vec::new();
    eventually("the ACK is seen", Duration::from_secs(5), async || {
        rows = collect(std::slice::from_ref(&url), None).await.unwrap();
        rows[0].types["cds"] == Sync::Synced
    })
    .await;
    let table = render_table(&rows);
    assert!(table.lines().nth(1).unwrap().contains("SYNCED"), "{table}");

    let both = collect(&[url.clone(), url.clone()], None).await.unwrap();
    assert_eq!(both.len(), 2, "one row per replica");
    let err = collect(&["http://127.0.0.1:1".to_string()], None).await.unwrap_err();
    assert!(format!("{err:#}").contains("/debug/syncz"), "{err:#}");
}
