//! Identity from the TLS client certificate's SPIFFE URI SAN (istiod's ClientCertAuthenticator),
//! so a workload can renew with the certificate it already holds.
use futures::future::{BoxFuture, FutureExt};

use super::{AuthError, AuthSource, Authenticator, Credentials, Identity};
use crate::pki::SpiffeId;
use crate::pki::cert;

#[derive(Debug, Default)]
pub struct ClientCertAuthenticator;

impl ClientCertAuthenticator {
    fn check(creds: &Credentials) -> Result<Identity, AuthError> {
        // The TLS layer only hands us certificates that verified against the mesh roots.
        let leaf = creds
            .peer_certs
            .as_ref()
            .and_then(|c| c.first())
            .ok_or_else(|| AuthError::NotPresent("no verified client certificate".into()))?;
        let facts = cert::facts(leaf).map_err(|_| AuthError::Rejected("client certificate cannot be parsed".into()))?;
        let mut ids = facts.uri_sans.iter().filter_map(|u| SpiffeId::parse(u).ok());
        let spiffe = ids.next().ok_or_else(|| {
            AuthError::Rejected("client certificate has no spiffe://<td>/ns/<ns>/sa/<sa> URI SAN".into())
        })?;
        Ok(Identity {
            spiffe,
            source: AuthSource::ClientCertificate,
            cluster_id: None,
            pod_name: None,
            pod_uid: None,
        })
    }
}

impl Authenticator for ClientCertAuthenticator {
    fn name(&self) -> &'static str {
        "ClientCertAuthenticator"
    }

    fn authenticate<'a>(&'a self, creds: &'a Credentials) -> BoxFuture<'a, Result<Identity, AuthError>> {
        futures::future::ready(Self::check(creds)).boxed()
    }
}
