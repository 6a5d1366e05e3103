//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, answered as istiod answers it
//! (reference §1.2): count, authenticate, verify the CSR, sign for the authenticated identity
//! only, reply `[leaf, chain…, root bundle]`.
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument as _;

use tonic::{Request, Response, Status};

use super::signer::{SignError, Signer};
use crate::admin::metrics::{Counter, CounterVec, Histogram, LATENCY_BUCKETS, Registry};
use crate::auth::{AuthChain, AuthFailure, Credentials, FailureKind, Identity};
use crate::pki::csr::{self, CsrError};
use crate::proto::istio_ca::istio_certificate_service_server::IstioCertificateService;
use crate::proto::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};

/// Metadata key of node-proxy impersonation requests (ztunnel).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// istiod's CA metrics, with its names.
#[derive(Clone)]
pub struct CaMetrics {
    pub csr_count: Arc<Counter>,
    pub success: Arc<Counter>,
    pub auth_failure: Arc<Counter>,
    pub sign_err: CounterVec,
    pub duration: Arc<Histogram>,
}

impl CaMetrics {
    pub fn register(r: &Registry) -> Self {
        Self {
            csr_count: r.counter(
                "citadel_server_csr_count",
                "The number of CSRs received by Citadel server.",
            ),
            success: r.counter(
                "citadel_server_success_cert_issuance_count",
                "The number of certificates issuances that have succeeded.",
            ),
            auth_failure: r.counter(
                "citadel_server_authentication_failure_count",
                "The number of authentication failures.",
            ),
            sign_err: r.counter_vec(
                "citadel_server_csr_sign_err_count",
                "The number of errors occurred when signing the CSR.",
                &["error"],
            ),
            duration: r.histogram(
                "meshd_ca_create_certificate_seconds",
                "Time to answer CreateCertificate, including authentication.",
                LATENCY_BUCKETS,
            ),
        }
    }
}

/// Why a CreateCertificate call was refused. The single mapping to a gRPC status is the
/// `From` impl below.
#[derive(Debug, thiserror::Error)]
pub enum CreateCertificateError {
    #[error("request authenticate failure: {0}")]
    Auth(AuthFailure),
    #[error("request impersonation authentication failure")]
    Impersonation,
    #[error("CSR signing error (invalid CSR: {0})")]
    Csr(#[from] CsrError),
    #[error("CSR signing error ({0})")]
    Sign(#[from] SignError),
    #[error("the CA is not served on the plaintext port; use the TLS port (15012)")]
    Plaintext,
}

impl CreateCertificateError {
    fn metric_label(&self) -> Option<&'static str> {
        match self {
            CreateCertificateError::Csr(_) => Some("CSR_ERROR"),
            CreateCertificateError::Sign(e) => Some(e.metric_label()),
            _ => None,
        }
    }
}

impl From<CreateCertificateError> for Status {
    fn from(e: CreateCertificateError) -> Self {
        let msg = e.to_string();
        match &e {
            CreateCertificateError::Auth(f) => match f.kind() {
                FailureKind::Unauthenticated => Status::unauthenticated(msg),
                FailureKind::Unavailable => Status::unavailable(msg),
                FailureKind::ResourceExhausted => Status::resource_exhausted(msg),
            },
            CreateCertificateError::Impersonation | CreateCertificateError::Plaintext => Status::unauthenticated(msg),
            CreateCertificateError::Csr(_) => Status::invalid_argument(msg),
            CreateCertificateError::Sign(SignError::TtlTooLong { .. }) => Status::invalid_argument(msg),
            CreateCertificateError::Sign(_) => Status::internal(msg),
        }
    }
}

/// The CA on the TLS port.
pub struct CaService {
    auth: Arc<AuthChain>,
    signer: Arc<dyn Signer>,
    metrics: CaMetrics,
}

impl CaService {
    pub fn new(auth: Arc<AuthChain>, signer: Arc<dyn Signer>, metrics: CaMetrics) -> Self {
        Self { auth, signer, metrics }
    }

    async fn handle(
        &self,
        creds: &Credentials,
        req: &IstioCertificateRequest,
    ) -> Result<(Identity, Vec<String>), CreateCertificateError> {
        let identity = self
            .auth
            .authenticate(creds)
            .await
            .map_err(CreateCertificateError::Auth)?;
        if impersonation_requested(req) {
            // CA_TRUSTED_NODE_ACCOUNTS is not supported: refuse like istiod does when it is unset.
            return Err(CreateCertificateError::Impersonation);
        }
        let verified = csr::parse_and_verify(&req.csr)?;
        let uri = identity.spiffe_uri();
        if !verified.requested_uris.is_empty() && !verified.requested_uris.contains(&uri) {
            tracing::info!(requested = ?verified.requested_uris, issued = %uri, "CSR asks for a different SAN; issuing for the authenticated identity");
        }
        if verified.requested_ca {
            tracing::info!(identity = %uri, "CSR asks for CA:true; issuing a leaf certificate");
        }
        let signer = Arc::clone(&self.signer);
        let chain = signer.sign_workload(&verified, std::slice::from_ref(&uri), req.validity_duration)?;
        Ok((identity, chain))
    }
}

fn impersonation_requested(req: &IstioCertificateRequest) -> bool {
    req.metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(!s.is_empty()),
            _ => None,
        })
        .unwrap_or(false)
}

fn record_failure(metrics: &CaMetrics, e: &CreateCertificateError, creds: &Credentials) {
    match e {
        CreateCertificateError::Auth(_) | CreateCertificateError::Impersonation | CreateCertificateError::Plaintext => {
            metrics.auth_failure.inc()
        }
        _ => {}
    }
    if let Some(label) = e.metric_label() {
        metrics.sign_err.with(&[label]).inc();
    }
    tracing::warn!(
        peer = ?creds.remote_addr,
        cluster_id = %creds.cluster_id,
        error = %e,
        "CreateCertificate refused"
    );
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        self.metrics.csr_count.inc();
        let creds = Credentials::from_metadata(request.metadata(), request.peer_certs(), request.remote_addr());
        // Every line logged while handling the CSR carries the caller's cluster, address and
        // (once known) identity.
        let span = tracing::info_span!(
            "csr",
            cluster_id = %creds.cluster_id,
            peer = ?creds.remote_addr,
            identity = tracing::field::Empty
        );
        let result = self.handle(&creds, request.get_ref()).instrument(span.clone()).await;
        if let Ok((identity, _)) = &result {
            span.record("identity", tracing::field::display(&identity.spiffe));
        }
        let _entered = span.enter();
        self.metrics.duration.observe(started.elapsed().as_secs_f64());
        match result {
            Ok((identity, cert_chain)) => {
                self.metrics.success.inc();
                tracing::debug!(identity = %identity.spiffe, cluster_id = %creds.cluster_id, "issued workload certificate");
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(e) => {
                record_failure(&self.metrics, &e, &creds);
                Err(e.into())
            }
        }
    }
}

/// The CA service as seen on the plaintext port: it exists (so reflection lists it, as on
/// istiod) but holds no signer, so no code path can issue a certificate there.
pub struct PlaintextCaRefusal {
    metrics: CaMetrics,
}

impl PlaintextCaRefusal {
    pub fn new(metrics: CaMetrics) -> Self {
        Self { metrics }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for PlaintextCaRefusal {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.metrics.csr_count.inc();
        let creds = Credentials::from_metadata(request.metadata(), None, request.remote_addr());
        let e = CreateCertificateError::Plaintext;
        record_failure(&self.metrics, &e, &creds);
        Err(e.into())
    }
}
