//! Loading and creating CA key material.
//!
//! A plugged-in CA comes from the files of Istio's `cacerts` Secret; without one, meshd creates a
//! self-signed root once in its data dir and reuses it on every restart, so certificates issued
//! before a restart keep verifying after it.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::pki::sha256;
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;

use crate::fsutil;
use crate::pki::cert;
use crate::pki::keys::KeyType;
use crate::pki::pem;

/// Lifetime of a self-signed root, as istiod's `CITADEL_SELF_SIGNED_CA_CERT_TTL` default.
pub const SELF_SIGNED_ROOT_TTL: Duration = Duration::from_secs(3650 * 86400);

/// Where the signing material came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// Istio `cacerts` files (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`).
    Plugged { dir: PathBuf },
    /// `kubernetes.io/tls` style files (`tls.crt`, `tls.key`, `ca.crt`).
    PluggedTls { dir: PathBuf },
    /// Self-signed root persisted in the data dir.
    SelfSigned { dir: PathBuf },
    /// Self-signed root persisted in Secret `istio-ca-secret` (Kubernetes mode).
    KubeSecret { namespace: String, name: String },
}

#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error(
        "CA directory {dir}: missing {file} (expected ca-cert.pem, ca-key.pem, root-cert.pem [, cert-chain.pem] or tls.crt, tls.key, ca.crt)"
    )]
    Missing { dir: PathBuf, file: &'static str },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("generating the self-signed root: {0}")]
    Generate(String),
}

/// Everything needed to sign and to answer with a chain. Immutable: a reload builds a new one.
pub struct CaMaterial {
    pub issuer: Issuer<'static, KeyPair>,
    pub signing_cert_der: CertificateDer<'static>,
    pub signing_not_after: SystemTime,
    /// `cert-chain.pem` split one certificate per string, appended after the leaf.
    pub chain_pems: Vec<String>,
    /// `root-cert.pem` as one string: the last element of every response.
    pub root_bundle_pem: String,
    pub roots_der: Vec<CertificateDer<'static>>,
    pub source: CaSource,
    /// sha256 over the files this material was built from; a reload compares it.
    pub fingerprint: [u8; 32],
    /// Signature algorithm name of the CA key, for logs and benchmarks.
    pub key_algorithm: &'static str,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("CaMaterial")
            .field("source", &self.source)
            .field("key_algorithm", &self.key_algorithm)
            .field("signing_not_after", &self.signing_not_after)
            .field("chain_len", &self.chain_pems.len())
            .field("roots", &self.roots_der.len())
            .finish()
    }
}

struct PluggedFiles {
    cert: PathBuf,
    key: PathBuf,
    chain: Option<PathBuf>,
    root: PathBuf,
    tls_style: bool,
}

fn plugged_files(dir: &Path) -> Result<PluggedFiles, MaterialError> {
    let istio = (
        dir.join("ca-cert.pem"),
        dir.join("ca-key.pem"),
        dir.join("root-cert.pem"),
    );
    if istio.0.exists() || istio.1.exists() {
        for (p, name) in [
            (&istio.0, "ca-cert.pem"),
            (&istio.1, "ca-key.pem"),
            (&istio.2, "root-cert.pem"),
        ] {
            if !p.exists() {
                return Err(MaterialError::Missing {
                    dir: dir.into(),
                    file: name,
                });
            }
        }
        let chain = dir.join("cert-chain.pem");
        return Ok(PluggedFiles {
            cert: istio.0,
            key: istio.1,
            chain: chain.exists().then_some(chain),
            root: istio.2,
            tls_style: false,
        });
    }
    let tls = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
    for (p, name) in [(&tls.0, "tls.crt"), (&tls.1, "tls.key"), (&tls.2, "ca.crt")] {
        if !p.exists() {
            return Err(MaterialError::Missing {
                dir: dir.into(),
                file: if tls.0.exists() { name } else { "ca-cert.pem" },
            });
        }
    }
    Ok(PluggedFiles {
        cert: tls.0,
        key: tls.1,
        chain: None,
        root: tls.2,
        tls_style: true,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, MaterialError> {
    std::fs::read(path).map_err(|source| MaterialError::Io {
        path: path.into(),
        source,
    })
}

fn invalid(path: &Path, reason: impl Into<String>) -> MaterialError {
    MaterialError::Invalid {
        path: path.into(),
        reason: reason.into(),
    }
}

/// Fingerprint of a plugged CA directory's files, cheap enough to poll.
pub fn plugged_fingerprint(dir: &Path) -> Result<[u8; 32], MaterialError> {
    let f = plugged_files(dir)?;
    let mut all = Vec::new();
    for p in [Some(&f.cert), Some(&f.key), f.chain.as_ref(), Some(&f.root)]
        .into_iter()
        .flatten()
    {
        all.extend_from_slice(&read(p)?);
        all.push(0);
    }
    Ok(sha256(&all))
}

/// Whether `dir` holds a plugged CA at all: its signing key (`ca-key.pem`, or `tls.key` of a
/// kubernetes.io/tls Secret). istiod checks the same and, when it is missing (the optional
/// `cacerts` volume is empty), runs its self-signed CA instead.
pub fn plugged_present(dir: &Path) -> bool {
    dir.join("ca-key.pem").exists() || dir.join("tls.key").exists()
}

/// Loads a plugged-in CA from `dir`.
pub fn load_plugged(dir: &Path) -> Result<CaMaterial, MaterialError> {
    let files = plugged_files(dir)?;
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let root_pem = read(&files.root)?;
    let chain_pem = match &files.chain {
        Some(p) => read(p)?,
        None if files.tls_style => {
            // tls.crt + ca.crt form the chain, as istiod does for kubernetes.io/tls secrets.
            let mut c = cert_pem.clone();
            if !c.ends_with(b"\n") {
                c.push(b'\n');
            }
            c.extend_from_slice(&root_pem);
            c
        }
        None => Vec::new(),
    };
    warn_if_key_readable(&files.key);
    let mut all = Vec::new();
    for part in [&cert_pem, &key_pem, &chain_pem, &root_pem] {
        all.extend_from_slice(part);
        all.push(0);
    }
    let fingerprint = plugged_fingerprint(dir).unwrap_or_else(|_| sha256(&all));
    let source = if files.tls_style {
        CaSource::PluggedTls { dir: dir.into() }
    } else {
        CaSource::Plugged { dir: dir.into() }
    };
    build(
        &files.cert,
        &cert_pem,
        &files.key,
        &key_pem,
        &chain_pem,
        &files.root,
        &root_pem,
        source,
        fingerprint,
    )
}

#[allow(clippy::too_many_arguments)]
fn build(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
    chain_pem: &[u8],
    root_path: &Path,
    root_pem: &[u8],
    source: CaSource,
    fingerprint: [u8; 32],
) -> Result<CaMaterial, MaterialError> {
    let certs = pem::parse_certs(cert_pem).map_err(|e| invalid(cert_path, e.to_string()))?;
    let signing_cert_der = certs[0].clone().into_owned();
    let facts = cert::facts(&signing_cert_der).map_err(|e| invalid(cert_path, e.to_string()))?;
    if !facts.is_ca {
        return Err(invalid(
            cert_path,
            "signing certificate is not a CA (basicConstraints CA:TRUE is required)",
        ));
    }
    let key_str = std::str::from_utf8(key_pem).map_err(|_| invalid(key_path, "key is not PEM text"))?;
    let key = KeyPair::from_pem(key_str).map_err(|_| {
        invalid(
            key_path,
            "not a supported private key (PKCS#8, PKCS#1 RSA or SEC1 EC PEM)",
        )
    })?;
    if !spki_matches(&signing_cert_der, &key) {
        return Err(invalid(key_path, "private key does not match the signing certificate"));
    }
    let key_algorithm = algorithm_name(&key);
    let issuer = Issuer::from_ca_cert_der(&signing_cert_der, key)
        .map_err(|e| invalid(cert_path, format!("cannot use as issuer: {e}")))?;
    let chain_pems = if chain_pem.iter().all(u8::is_ascii_whitespace) {
        Vec::new()
    } else {
        pem::split_bundle(chain_pem)
            .map_err(|e| invalid(root_path.with_file_name("cert-chain.pem").as_path(), e.to_string()))?
    };
    let roots_der: Vec<CertificateDer<'static>> = pem::parse_certs(root_pem)
        .map_err(|e| invalid(root_path, e.to_string()))?
        .into_iter()
        .map(|c| c.into_owned())
        .collect();
    let mut root_bundle_pem = String::from_utf8_lossy(root_pem).into_owned();
    if !root_bundle_pem.ends_with('\n') {
        root_bundle_pem.push('\n');
    }
    Ok(CaMaterial {
        issuer,
        signing_cert_der,
        signing_not_after: facts.not_after,
        chain_pems,
        root_bundle_pem,
        roots_der,
        source,
        fingerprint,
        key_algorithm,
    })
}

fn spki_matches(cert_der: &[u8], key: &KeyPair) -> bool {
    use rcgen::PublicKeyData;
    use x509_parser::prelude::{FromDer, X509Certificate};
    match X509Certificate::from_der(cert_der) {
        Ok((_, c)) => c.public_key().raw == key.subject_public_key_info().as_slice(),
        Err(_) => false,
    }
}

fn algorithm_name(key: &KeyPair) -> &'static str {
    let alg = key.algorithm();
    if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
        "ecdsa-p256"
    } else if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
        "ecdsa-p384"
    } else if alg == &rcgen::PKCS_RSA_SHA256 || alg == &rcgen::PKCS_RSA_SHA384 || alg == &rcgen::PKCS_RSA_SHA512 {
        "rsa"
    } else {
        "other"
    }
}

#[cfg(unix)]
fn warn_if_key_readable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        // Mounted Secrets are often 0644 through a symlink; say so once, do not refuse.
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "CA key file is readable by group/others; 0600 is recommended");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_key_readable(_: &Path) {}

/// Directory in the data dir holding the self-signed root.
pub fn self_signed_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("ca")
}

/// Loads the self-signed root from the data dir, creating it on first use. Two processes
/// starting on the same fresh data dir end up with the same root.
pub fn load_or_create_self_signed(
    data_dir: &Path,
    trust_domain: &str,
    key_type: KeyType,
    now: SystemTime,
) -> Result<CaMaterial, MaterialError> {
    let dir = self_signed_dir(data_dir);
    if !dir.join("ca-cert.pem").exists() {
        create_self_signed(data_dir, &dir, trust_domain, key_type, now)?;
    }
    let cert_path = dir.join("ca-cert.pem");
    let key_path = dir.join("ca-key.pem");
    let cert_pem = read(&cert_path)?;
    let key_pem = read(&key_path)?;
    let mut all = cert_pem.clone();
    all.extend_from_slice(&key_pem);
    let m = build(
        &cert_path,
        &cert_pem,
        &key_path,
        &key_pem,
        b"",
        &cert_path,
        &cert_pem,
        CaSource::SelfSigned { dir: dir.clone() },
        sha256(&all),
    )?;
    if m.key_algorithm != key_type_algorithm(key_type) {
        tracing::warn!(
            persisted = m.key_algorithm,
            requested = %key_type,
            "keeping the persisted self-signed root; --ca-key-type only applies when the root is first created"
        );
    }
    Ok(m)
}

/// Material for a self-signed root held as PEM text (e.g. read from a Secret).
pub fn from_root_pems(cert_pem: &[u8], key_pem: &[u8], source: CaSource) -> Result<CaMaterial, MaterialError> {
    let label = PathBuf::from(source_label(&source));
    let mut all = cert_pem.to_vec();
    all.extend_from_slice(key_pem);
    build(
        &label,
        cert_pem,
        &label,
        key_pem,
        b"",
        &label,
        cert_pem,
        source,
        sha256(&all),
    )
}

fn source_label(s: &CaSource) -> String {
    match s {
        CaSource::Plugged { dir } | CaSource::PluggedTls { dir } | CaSource::SelfSigned { dir } => {
            dir.display().to_string()
        }
        CaSource::KubeSecret { namespace, name } => format!("secret {namespace}/{name}"),
    }
}

pub fn key_type_algorithm(k: KeyType) -> &'static str {
    match k {
        KeyType::Rsa2048 => "rsa",
        KeyType::EcdsaP256 => "ecdsa-p256",
    }
}

/// Builds the self-signed root certificate and key in PEM, without touching disk.
pub fn generate_root(
    trust_domain: &str,
    key_type: KeyType,
    now: SystemTime,
) -> Result<(String, String), MaterialError> {
    let key = key_type
        .generate()
        .map_err(|e| MaterialError::Generate(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // Backdated like every leaf (istiod's 2-minute ClockSkewGracePeriod): peers check the root's
    // validity too (BoringSSL, OpenSSL, Go), and a root minted this instant would otherwise be
    // refused by a proxy whose clock is a little behind, for the first minutes of a new mesh.
    params.not_before = (now - crate::ca::signer::BACKDATE).into();
    params.not_after = (now + SELF_SIGNED_ROOT_TTL).into();
    params.serial_number = Some(crate::ca::signer::random_serial());
    let cert = params
        .self_signed(&key)
        .map_err(|e| MaterialError::Generate(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn create_self_signed(
    data_dir: &Path,
    dir: &Path,
    trust_domain: &str,
    key_type: KeyType,
    now: SystemTime,
) -> Result<(), MaterialError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MaterialError::Io { path, source }
    };
    fsutil::create_private_dir(data_dir).map_err(io(data_dir))?;
    let (cert_pem, key_pem) = generate_root(trust_domain, key_type, now)?;
    // Build the pair in a private temp dir and rename it into place: the rename fails if another
    // process published its root first, and then we use theirs.
    let tmp = data_dir.join(format!(".ca.{:016x}.tmp", rand::random::<u64>()));
    fsutil::create_private_dir(&tmp).map_err(io(&tmp))?;
    fsutil::write_atomic(&tmp.join("ca-key.pem"), key_pem.as_bytes(), 0o600).map_err(io(&tmp))?;
    fsutil::write_atomic(&tmp.join("ca-cert.pem"), cert_pem.as_bytes(), 0o644).map_err(io(&tmp))?;
    match std::fs::rename(&tmp, dir) {
        Ok(()) => {
            tracing::info!(dir = %dir.display(), key_type = %key_type, trust_domain, "created self-signed mesh root");
            Ok(())
        }
        Err(_) if dir.join("ca-cert.pem").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(MaterialError::Io {
                path: dir.into(),
                source: e,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_root_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let a = load_or_create_self_signed(dir.path(), "cluster.local", KeyType::EcdsaP256, now).unwrap();
        let b = load_or_create_self_signed(dir.path(), "cluster.local", KeyType::EcdsaP256, now).unwrap();
        assert_eq!(a.signing_cert_der, b.signing_cert_der);
        assert_eq!(a.root_bundle_pem, b.root_bundle_pem);
        assert!(a.chain_pems.is_empty());
        let facts = cert::facts(&a.signing_cert_der).unwrap();
        assert!(facts.is_ca);
        assert_eq!(facts.subject, "O=cluster.local");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(self_signed_dir(dir.path()).join("ca-key.pem"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn plugged_dir_reports_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca-cert.pem"), "x").unwrap();
        let err = load_plugged(dir.path()).unwrap_err();
        assert!(
            matches!(err, MaterialError::Missing { file: "ca-key.pem", .. }),
            "{err}"
        );
    }

    #[test]
    fn plugged_rejects_mismatched_key() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = generate_root("a", KeyType::EcdsaP256, SystemTime::now()).unwrap();
        let (_, other_key) = generate_root("a", KeyType::EcdsaP256, SystemTime::now()).unwrap();
        std::fs::write(dir.path().join("ca-cert.pem"), &cert).unwrap();
        std::fs::write(dir.path().join("ca-key.pem"), &other_key).unwrap();
        std::fs::write(dir.path().join("root-cert.pem"), &cert).unwrap();
        let err = load_plugged(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }
}
