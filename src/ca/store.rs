//! The current CA material, swapped atomically on reload, with change notifications for the
//! serving certificate, the client-cert verifier and `<data-dir>/root-cert.pem`.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::material::{self, CaMaterial};
use crate::fsutil;

pub struct CaStore {
    current: ArcSwap<CaMaterial>,
    generation: watch::Sender<u64>,
    root_file: Option<PathBuf>,
}

impl std::fmt::Debug for CaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaStore")
            .field("current", &self.current.load())
            .finish()
    }
}

impl CaStore {
    /// Wraps `material`; when `root_file` is set the root bundle is written there now and on
    /// every change, where clients and scripts pick it up.
    pub fn new(material: CaMaterial, root_file: Option<PathBuf>) -> std::io::Result<Arc<Self>> {
        if let Some(p) = &root_file {
            write_root(p, &material)?;
        }
        let (generation, _) = watch::channel(0);
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(material),
            generation,
            root_file,
        }))
    }

    pub fn load(&self) -> Arc<CaMaterial> {
        self.current.load_full()
    }

    /// Installs new material. In-flight signatures finish with the old one.
    pub fn replace(&self, material: CaMaterial) -> std::io::Result<()> {
        if let Some(p) = &self.root_file {
            write_root(p, &material)?;
        }
        self.current.store(Arc::new(material));
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Notified (with a generation number) whenever the material changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Polls a plugged CA directory and reloads when any file's content changes. Kubernetes
    /// updates mounted Secrets by swapping a symlink, which content polling sees reliably.
    pub fn spawn_plugged_watcher(self: &Arc<Self>, dir: PathBuf, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_bad: Option<[u8; 32]> = None;
            loop {
                tick.tick().await;
                store.reload_if_changed(&dir, &mut last_bad);
            }
        })
    }

    fn reload_if_changed(&self, dir: &Path, last_bad: &mut Option<[u8; 32]>) {
        let Ok(fp) = material::plugged_fingerprint(dir) else {
            return; // files mid-update or removed: keep serving with what we have
        };
        if fp == self.current.load().fingerprint || Some(fp) == *last_bad {
            return;
        }
        match material::load_plugged(dir) {
            Ok(m) => {
                tracing::info!(dir = %dir.display(), "plugged CA files changed; reloaded");
                if let Err(e) = self.replace(m) {
                    tracing::error!(error = %e, "writing root-cert.pem after CA reload");
                }
                *last_bad = None;
            }
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "plugged CA files changed but are invalid; still using the previous CA");
                *last_bad = Some(fp);
            }
        }
    }
}

fn write_root(path: &Path, m: &CaMaterial) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    fsutil::write_atomic(path, m.root_bundle_pem.as_bytes(), 0o644)
}
