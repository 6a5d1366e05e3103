//! Process gauges refreshed at each scrape: resident memory, open file descriptors and live tokio
//! tasks — what a soak run watches for leaks.
use std::sync::Arc;

use super::Registry;
use super::metrics::Gauge;

pub struct ProcessGauges {
    rss: Arc<Gauge>,
    fds: Arc<Gauge>,
    tasks: Arc<Gauge>,
}

impl ProcessGauges {
    pub fn register(registry: &Registry) -> Self {
        Self {
            rss: registry.gauge("process_resident_memory_bytes", "Resident memory size in bytes."),
            fds: registry.gauge("process_open_fds", "Number of open file descriptors."),
            tasks: registry.gauge("meshd_tokio_alive_tasks", "Tokio tasks currently alive in the runtime."),
        }
    }

    /// Reads the current values (Linux `/proc`; elsewhere the memory and fd gauges stay 0).
    pub fn refresh(&self) {
        if let Some(rss) = resident_bytes() {
            self.rss.set(rss as f64);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.fds.set(dir.count() as f64);
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.tasks.set(rt.metrics().num_alive_tasks() as f64);
        }
    }
}

fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn gauges_read_this_process() {
        let r = Registry::new();
        let g = ProcessGauges::register(&r);
        g.refresh();
        let text = r.encode();
        let value = |name: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1.0)
        };
        assert!(value("meshd_tokio_alive_tasks") >= 0.0);
        if cfg!(target_os = "linux") {
            assert!(value("process_resident_memory_bytes") > 1e6);
            assert!(value("process_open_fds") >= 3.0);
        }
    }
}
