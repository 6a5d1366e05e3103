//! The xDS load client (`meshd::bench::xds`, behind `meshd bench xds` and examples/xds_bench.rs)
//! against an in-process meshd serving examples/config-dir: every stream, SotW and Delta, gets
//! CDS, EDS, LDS and RDS and ACKs them (as `/debug/syncz` confirms), an endpoint edit reaches
//! every stream's EDS, and the share counters move.
mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use meshd::bench::xds::{self as load, CDS, EDS, LDS, LoadClient, LoadConfig, RDS};
use serde_json::Value;

const STREAMS: usize = 20;
const WAIT: Duration = Duration::from_secs(30);

fn copy_example(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/config-dir");
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_client_streams_get_config_ack_and_see_endpoint_changes() {
    let dir = tempfile::tempdir().unwrap();
    copy_example(dir.path());
    let t = TestMeshd::start_with(|a| {
        a.config_dir = Some(dir.path().to_path_buf());
        a.config_dir_poll = Duration::from_millis(50);
        a.cluster_id = "cluster1".into();
        a.debounce_after = Duration::from_millis(20);
    })
    .await;

    let mut cfg = LoadConfig::new(t.m().addrs.plaintext, STREAMS);
    cfg.delta_percent = 50;
    cfg.streams_per_conn = 2;
    let client = LoadClient::start(cfg).await.expect("streams open");
    client.wait_ready(WAIT).await.expect("every stream gets its config");
    let totals = client.totals();
    assert_eq!((totals.sotw, totals.delta, totals.errors), (10, 10, 0), "{totals:?}");
    for s in client.streams() {
        for ty in [CDS, EDS, LDS, RDS] {
            assert!(s.responses(ty) >= 1, "stream {} type {ty}: {s:?}", s.index);
            assert!(s.resources(ty) >= 1, "stream {} type {ty} had resources", s.index);
        }
        assert!(s.acks() >= 4, "stream {} ACKed every response: {s:?}", s.index);
    }

    // meshd saw every ACK: per connection and type, the nonce acked is the nonce sent.
    let syncz = t.m().addrs.monitoring;
    let mut last = Value::Null;
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            let body = load::http_get(syncz, "/debug/syncz").await.unwrap_or_default();
            last = serde_json::from_str(&body).unwrap_or(Value::Null);
            let conns = last.as_array().cloned().unwrap_or_default();
            let all = conns.len() == STREAMS
                && conns.iter().all(|c| {
                    ["cds", "eds", "lds", "rds"].iter().all(|ty| {
                        let s = &c["types"][ty];
                        !s["nonce_sent"].is_null() && s["nonce_sent"] == s["nonce_acked"]
                    })
                });
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(acked.is_ok(), "syncz never showed every type acked: {last:#}");
    let conns = last.as_array().unwrap();
    assert_eq!(conns.iter().filter(|c| c["delta"] == true).count(), STREAMS / 2);
    assert!(
        conns
            .iter()
            .all(|c| c["node_id"].as_str().is_some_and(|n| n.starts_with("sidecar~10.1.")))
    );

    // An endpoint edit (cluster2's slice gains 127.0.0.99) reaches every stream's EDS.
    client.arm_probe("127.0.0.99");
    let path = dir.path().join("cluster2.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replace(
        "- addresses: [127.0.0.20]",
        "- addresses: [127.0.0.99]\n  conditions: {ready: true}\n- addresses: [127.0.0.20]",
    );
    assert_ne!(text, edited);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, edited).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    client
        .wait_all("the new endpoint", WAIT, |s| s.probe_at().is_some())
        .await
        .expect("every stream sees the new endpoint");
    assert_eq!(client.error_count(), 0);

    let sent = t.metric("meshd_xds_sent_bytes");
    let encoded = t.metric("meshd_xds_encoded_bytes");
    assert!(sent > 0.0 && encoded > 0.0, "sent {sent}, encoded {encoded}");
    assert!(
        sent > encoded,
        "20 proxies share encodings: sent {sent} > encoded {encoded}"
    );
}
