//! `--remote-kubeconfig-dir`: one kubeconfig file per remote cluster, named by its cluster id,
//! for running without a primary API server. The directory is polled; a changed file rebuilds
//! that cluster only, a removed file removes it.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::registry::ClusterSource;
use super::secrets::RemoteConfigs;

fn read_dir(dir: &Path) -> std::io::Result<BTreeMap<String, Vec<u8>>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Kubernetes Secret mounts carry ..data symlinks and dotfiles; skip them.
        if name.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        if let Ok(bytes) = std::fs::read(entry.path()) {
            out.insert(name, bytes);
        }
    }
    Ok(out)
}

pub fn spawn_dir_watcher(
    configs: Arc<RemoteConfigs>,
    dir: PathBuf,
    every: Duration,
    listed: watch::Sender<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let key = format!("dir:{}", dir.display());
        let dir2 = dir.clone();
        let source_of = move |id: &str| ClusterSource::File {
            path: dir2.join(id).display().to_string(),
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match read_dir(&dir) {
                Ok(entries) => configs.apply_source(&key, &source_of, entries).await,
                Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "reading the remote kubeconfig directory"),
            }
            let _ = listed.send(true);
        }
    })
}
