//! Readiness: `/ready` answers 200 only once every registered component says it is ready.
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

#[derive(Debug, Default)]
pub struct Readiness {
    components: RwLock<BTreeMap<String, bool>>,
}

impl Readiness {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Registers a component that is not ready yet.
    pub fn register(&self, name: &str) {
        self.components
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.into())
            .or_insert(false);
    }

    pub fn set(&self, name: &str, ready: bool) {
        self.components
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), ready);
    }

    /// Names of components that are not ready; empty means ready.
    pub fn pending(&self) -> Vec<String> {
        self.components
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, r)| !**r)
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.pending().is_empty()
    }
}
