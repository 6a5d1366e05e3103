//! `--mesh-config FILE`: read at start, then polled; a change of content is applied (or refused
//! with the last good settings kept). A file that cannot be read counts as a refused update.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{MeshConfigSink, MeshSettings};

/// Reads the file once now and then every `poll`, applying each new content.
pub fn spawn(path: PathBuf, sink: Arc<MeshConfigSink>, poll: Duration) -> tokio::task::JoinHandle<()> {
    let origin = format!("--mesh-config {}", path.display());
    let mut last: Option<Result<Vec<u8>, String>> = None;
    let mut check = move |sink: &MeshConfigSink| {
        let now = std::fs::read(&path).map_err(|e| e.to_string());
        if last.as_ref() == Some(&now) {
            return;
        }
        let parsed = match &now {
            Ok(bytes) => String::from_utf8(bytes.clone())
                .map_err(|_| super::MeshConfigError::Yaml("the file is not UTF-8".into()))
                .and_then(|t| MeshSettings::from_file_text(&t)),
            Err(e) => Err(super::MeshConfigError::Yaml(format!("cannot read the file: {e}"))),
        };
        sink.apply(&origin, parsed);
        last = Some(now);
    };
    check(&sink);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(poll.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            check(&sink);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::metrics::Registry;
    use crate::registry::MeshStore;

    #[tokio::test]
    async fn edits_are_picked_up_and_bad_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        let good = |addr: &str| {
            format!(
                "meshNetworks:\n  networks:\n    n1:\n      endpoints: [{{fromRegistry: c1}}]\n      gateways: [{{address: {addr}, port: 15443}}]\n"
            )
        };
        std::fs::write(&path, good("1.1.1.1")).unwrap();
        let store = MeshStore::new();
        let sink = MeshConfigSink::new(Arc::clone(&store), &Registry::new());
        let task = spawn(path.clone(), Arc::clone(&sink), Duration::from_millis(100));
        let gateways = || {
            store
                .snapshot()
                .networks
                .gateways
                .iter()
                .map(|g| g.addr.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(gateways(), ["1.1.1.1"], "read before spawn returns");
        std::fs::write(&path, "meshNetworks: [").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.last_error().is_none() {
            assert!(std::time::Instant::now() < deadline, "bad edit not noticed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(gateways(), ["1.1.1.1"], "last good kept");
        std::fs::write(&path, good("2.2.2.2")).unwrap();
        while gateways() != ["2.2.2.2"] {
            assert!(std::time::Instant::now() < deadline, "good edit not applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(sink.last_error().is_none());
        task.abort();
    }
}
