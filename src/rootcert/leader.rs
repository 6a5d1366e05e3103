//! Leader election for one cluster's writer: a Lease in that cluster's system namespace, held
//! through kube-lease-manager in its "manual" mode so the writer sees acquisition, loss and
//! errors as they happen and can release the lease when it stops.
use std::time::Duration;

use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseManagerError, LeaseParams};

/// What a round of `next_change` reported.
#[derive(Debug)]
pub enum Change {
    Acquired,
    Lost,
    /// The lease could not be read or renewed; leadership is treated as lost until it is
    /// confirmed again.
    Failed(LeaseManagerError),
}

pub struct Elector {
    client: kube::Client,
    namespace: String,
    lease_name: String,
    params: LeaseParams,
    manager: Option<LeaseManager>,
    leading: bool,
}

/// Whole seconds for the Lease: duration at least 2 s, renewal a third of it (at least 1 s)
/// before expiry.
pub fn lease_timing(duration: Duration) -> (u64, u64) {
    let secs = duration.as_secs().max(2);
    let grace = (secs / 3).max(1);
    (secs, grace)
}

impl Elector {
    pub fn new(client: kube::Client, namespace: &str, lease_name: &str, identity: &str, duration: Duration) -> Self {
        let (secs, grace) = lease_timing(duration);
        Self {
            client,
            namespace: namespace.to_string(),
            lease_name: lease_name.to_string(),
            params: LeaseParams::new(identity, secs, grace).with_field_manager("meshd"),
            manager: None,
            leading: false,
        }
    }

    pub fn is_leading(&self) -> bool {
        self.leading
    }

    /// Waits for the next change of leadership. While this replica leads, the future also keeps
    /// the lease renewed, so it must be polled for as long as leadership is wanted.
    pub async fn next_change(&mut self) -> Change {
        if self.manager.is_none() {
            match LeaseManager::new(
                self.client.clone(),
                &self.lease_name,
                &self.namespace,
                self.params.clone(),
                LeaseCreateMode::AutoCreate,
            )
            .await
            {
                Ok(m) => self.manager = Some(m),
                Err(e) => {
                    self.leading = false;
                    return Change::Failed(e);
                }
            }
        }
        let Some(manager) = &self.manager else {
            return Change::Lost;
        };
        match manager.changed().await {
            Ok(true) => {
                self.leading = true;
                Change::Acquired
            }
            Ok(false) => {
                self.leading = false;
                Change::Lost
            }
            Err(e) => {
                // A fresh manager re-reads the lease: if it is still ours, leadership comes back
                // at once on the next call.
                self.manager = None;
                self.leading = false;
                Change::Failed(e)
            }
        }
    }

    /// Gives the lease up (if held) so another replica can take over without waiting for it
    /// to expire.
    pub async fn release(&mut self, timeout: Duration) {
        if let Some(m) = self.manager.take()
            && self.leading
        {
            self.leading = false;
            match tokio::time::timeout(timeout, m.release()).await {
                Ok(Ok(())) => tracing::debug!(namespace = %self.namespace, lease = %self.lease_name, "lease released"),
                Ok(Err(e)) => {
                    tracing::warn!(namespace = %self.namespace, lease = %self.lease_name, error = %e, "releasing the lease")
                }
                Err(_) => {
                    tracing::warn!(namespace = %self.namespace, lease = %self.lease_name, "releasing the lease timed out")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_is_whole_seconds_with_a_third_for_renewal() {
        assert_eq!(lease_timing(Duration::from_secs(30)), (30, 10));
        assert_eq!(lease_timing(Duration::from_secs(2)), (2, 1));
        assert_eq!(lease_timing(Duration::from_millis(500)), (2, 1));
        assert_eq!(lease_timing(Duration::from_secs(4)), (4, 1));
        assert_eq!(lease_timing(Duration::from_secs(15)), (15, 5));
    }
}
