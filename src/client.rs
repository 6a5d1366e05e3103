//! `meshd cert`: the client side istio-agent plays. Generates a key and CSR, calls
//! CreateCertificate with `authorization` and `clusterid` metadata, checks the answer (chain to
//! the root, SAN equal to the identity asked for) and writes `key.pem`, `cert-chain.pem`,
//! `root-cert.pem`.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::Args;
use rcgen::{CertificateParams, DistinguishedName, SanType};
use rustls_pki_types::UnixTime;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};

use crate::auth::issuer::LocalIssuer;
use crate::fsutil;
use crate::pki::keys::KeyType;
use crate::pki::{SpiffeId, cert, pem};
use crate::proto::istio_ca::IstioCertificateRequest;
use crate::proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;

fn duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s)
}

#[derive(Debug, Clone, Args)]
pub struct CertArgs {
    /// meshd's TLS gRPC address (host:port); a LoadBalancer IP works with --server-name.
    #[arg(long, default_value = "127.0.0.1:15012")]
    pub addr: String,
    /// Name the serving certificate is verified against.
    #[arg(long, default_value = "istiod.istio-system.svc")]
    pub server_name: String,
    /// Mesh root bundle (default: <data-dir>/root-cert.pem).
    #[arg(long)]
    pub root_cert: Option<PathBuf>,
    /// File holding a service-account JWT to send as the bearer token.
    #[arg(long, conflicts_with = "client_cert_dir")]
    pub token: Option<PathBuf>,
    /// Standalone: mint a token from the data dir's issuer for this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Standalone: mint a token for this service account.
    #[arg(long)]
    pub service_account: Option<String>,
    /// Renew with an existing certificate (key.pem + cert-chain.pem) over mTLS instead of a token.
    #[arg(long)]
    pub client_cert_dir: Option<PathBuf>,
    #[arg(long, env = "MESHD_DATA_DIR", default_value = "./meshd-data")]
    pub data_dir: PathBuf,
    /// Sent as `clusterid` metadata; picks the cluster that reviews the token.
    #[arg(long, env = "ISTIO_META_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    #[arg(long, default_value = "rsa-2048")]
    pub key_type: KeyType,
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub ttl: Duration,
    #[arg(long, default_value = "istio-ca")]
    pub audience: String,
    /// Directory for key.pem, cert-chain.pem, root-cert.pem.
    #[arg(long)]
    pub out: PathBuf,
}

/// Opens a TLS channel to meshd, verifying it as `server_name` against `root_pem`.
pub async fn connect(
    addr: &str,
    server_name: &str,
    root_pem: &[u8],
    client: Option<(Vec<u8>, Vec<u8>)>,
) -> anyhow::Result<Channel> {
    crate::tls::provider();
    let mut tls = ClientTlsConfig::new()
        .domain_name(server_name)
        .ca_certificate(Certificate::from_pem(root_pem));
    if let Some((chain, key)) = client {
        tls = tls.identity(TlsIdentity::from_pem(chain, key));
    }
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10));
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {addr} as {server_name}"))
}

/// A fresh key and a CSR carrying `spiffe` as its URI SAN, as istio-agent builds it.
pub fn make_csr(key_type: KeyType, spiffe: Option<&SpiffeId>) -> anyhow::Result<(rcgen::KeyPair, String)> {
    let key = key_type.generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(id) = spiffe {
        params.subject_alt_names = vec![SanType::URI(id.uri().as_str().try_into()?)];
    }
    let csr = params.serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

fn token_identity(token: &str, trust_domain: &str) -> Option<SpiffeId> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let sub = v.get("sub")?.as_str()?;
    let (ns, sa) = crate::auth::jwt::parse_service_account_subject(sub)?;
    Some(SpiffeId::new(trust_domain, ns, sa))
}

/// Checks a CreateCertificate answer: at least `[leaf, root]`, the leaf chains to `root_pem`
/// through the middle entries, and carries exactly `expected` as its URI SAN (when known).
pub fn verify_response(chain: &[String], root_pem: &[u8], expected: Option<&SpiffeId>) -> anyhow::Result<()> {
    if chain.len() < 2 {
        bail!(
            "invalid response: {} certificate(s); istiod always answers [leaf, ..., root]",
            chain.len()
        );
    }
    let leaf = pem::parse_certs(chain[0].as_bytes())?.remove(0);
    let intermediates: Vec<_> = chain[1..chain.len() - 1]
        .iter()
        .flat_map(|c| pem::parse_certs(c.as_bytes()).unwrap_or_default())
        .collect();
    let roots = pem::parse_certs(root_pem)?;
    let verifier = crate::tls::client_verifier::MeshClientVerifier::new(&roots)?;
    use rustls::server::danger::ClientCertVerifier;
    verifier
        .verify_client_cert(&leaf, &intermediates, UnixTime::now())
        .map_err(|e| anyhow::anyhow!("issued certificate does not chain to the mesh root: {e}"))?;
    let facts = cert::facts(&leaf)?;
    if let Some(id) = expected
        && facts.uri_sans != vec![id.uri()]
    {
        bail!(
            "issued certificate SANs {:?} differ from the expected identity {}",
            facts.uri_sans,
            id
        );
    }
    Ok(())
}

pub async fn run(args: CertArgs) -> anyhow::Result<()> {
    let root_path = args
        .root_cert
        .clone()
        .unwrap_or_else(|| args.data_dir.join("root-cert.pem"));
    let root_pem = std::fs::read(&root_path).with_context(|| format!("reading root cert {}", root_path.display()))?;

    let mut client_identity = None;
    let (token, expected) = if let Some(dir) = &args.client_cert_dir {
        let chain = std::fs::read(dir.join("cert-chain.pem"))?;
        let key = std::fs::read(dir.join("key.pem"))?;
        let leaf = pem::parse_certs(&chain)?.remove(0);
        let id = cert::facts(&leaf)?
            .uri_sans
            .iter()
            .find_map(|u| SpiffeId::parse(u).ok());
        client_identity = Some((chain, key));
        (None, id)
    } else if let Some(path) = &args.token {
        let t = std::fs::read_to_string(path).with_context(|| format!("reading token {}", path.display()))?;
        let t = t.trim().to_string();
        let id = token_identity(&t, &args.trust_domain);
        (Some(t), id)
    } else if let (Some(ns), Some(sa)) = (&args.namespace, &args.service_account) {
        let issuer = LocalIssuer::load_existing(&args.data_dir)?;
        let t = issuer.mint(
            ns,
            sa,
            std::slice::from_ref(&args.audience),
            Duration::from_secs(3600),
            SystemTime::now(),
        )?;
        (Some(t), Some(SpiffeId::new(&args.trust_domain, ns, sa)))
    } else {
        bail!("give --token FILE, --namespace and --service-account (standalone), or --client-cert-dir");
    };

    let (key, csr) = make_csr(args.key_type, expected.as_ref())?;
    let channel = connect(&args.addr, &args.server_name, &root_pem, client_identity).await?;
    let mut client = IstioCertificateServiceClient::new(channel);
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: args.ttl.as_secs() as i64,
        metadata: None,
    });
    if let Some(t) = &token {
        req.metadata_mut()
            .insert("authorization", MetadataValue::try_from(format!("Bearer {t}"))?);
    }
    req.metadata_mut()
        .insert("clusterid", MetadataValue::try_from(args.cluster_id.as_str())?);
    let resp = client
        .create_certificate(req)
        .await
        .map_err(|s| anyhow::anyhow!("CreateCertificate failed: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    verify_response(&resp.cert_chain, &root_pem, expected.as_ref())?;
    write_outputs(&args.out, &key, &resp.cert_chain)?;
    println!(
        "wrote {} ({} certificates) for {}",
        args.out.display(),
        resp.cert_chain.len(),
        expected
            .map(|e| e.uri())
            .unwrap_or_else(|| "<identity from token>".into())
    );
    Ok(())
}

/// Writes key.pem (0600), cert-chain.pem (every entry but the root bundle) and root-cert.pem.
pub fn write_outputs(out: &Path, key: &rcgen::KeyPair, chain: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    fsutil::write_atomic(&out.join("key.pem"), key.serialize_pem().as_bytes(), 0o600)?;
    let leaf_and_chain: String = chain[..chain.len() - 1].concat();
    fsutil::write_atomic(&out.join("cert-chain.pem"), leaf_and_chain.as_bytes(), 0o644)?;
    fsutil::write_atomic(&out.join("root-cert.pem"), chain[chain.len() - 1].as_bytes(), 0o644)?;
    Ok(())
}
