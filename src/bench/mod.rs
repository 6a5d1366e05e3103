//! Load tools (`meshd bench …`); see BENCHMARKS.md.
//!
//! `meshd bench ca` drives CreateCertificate over TLS the way ghz does (N concurrent callers, one
//! CSR reused for every call) and reports rps, latency percentiles and status codes. Given the
//! server's pid it also reports requests per server CPU-second, and it times the raw crypto the
//! signing path cannot avoid (one CSR signature verification plus one leaf signature) in the same
//! run, so the result can be read as a fraction of that limit.
//!
//! `meshd bench xds` opens N ADS streams (SotW/Delta mix) against any meshd and reports how long
//! they take to receive their initial config, with the server's RSS per stream; see [`xds`].
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::{ArgAction, Args, Subcommand, ValueEnum};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::auth::issuer::LocalIssuer;
use crate::pki::SpiffeId;
use crate::pki::keys::KeyType;
use crate::proto::CA_SERVICE_NAME;
use crate::proto::istio_ca::IstioCertificateRequest;
use crate::proto::istio_ca::istio_certificate_service_client::IstioCertificateServiceClient;

pub mod xds;

fn duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s)
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Load-test CreateCertificate over TLS (ghz-style rps and latency percentiles; with
    /// --server-pid, requests per server CPU-second against the raw crypto limit).
    Ca(Box<CaBenchArgs>),
    /// Open N ADS streams (SotW/Delta mix, one HTTP/2 connection per proxy by default) on the
    /// plaintext xDS port, subscribe and ACK like Envoy, and report time to the initial config
    /// and (with --server-pid) the server's RSS per stream.
    Xds(Box<xds::XdsBenchArgs>),
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Ca(args) => run_ca(*args).await,
        BenchCommand::Xds(args) => xds::run(*args).await,
    }
}

#[derive(Debug, Clone, Args)]
pub struct CaBenchArgs {
    /// meshd's TLS gRPC address (host:port).
    #[arg(long, default_value = "127.0.0.1:15012")]
    pub addr: String,
    /// Name the serving certificate is verified against.
    #[arg(long, default_value = "istiod.istio-system.svc")]
    pub server_name: String,
    /// Mesh root bundle (default: <data-dir>/root-cert.pem).
    #[arg(long)]
    pub root_cert: Option<PathBuf>,
    /// meshd's data dir: its root-cert.pem, and the standalone issuer that mints the token.
    #[arg(long, env = "MESHD_DATA_DIR", default_value = "./meshd-data")]
    pub data_dir: PathBuf,
    /// File holding a service-account JWT to send instead of minting one.
    #[arg(long)]
    pub token: Option<PathBuf>,
    /// Namespace of the minted token's service account.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Service account of the minted token.
    #[arg(long, default_value = "bench")]
    pub service_account: String,
    /// Audience of the minted token.
    #[arg(long, default_value = "istio-ca")]
    pub audience: String,
    /// Sent as `clusterid` metadata.
    #[arg(long, env = "ISTIO_META_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Trust domain of the expected SPIFFE identity (checked on the first response).
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Concurrent callers, each with one call in flight at a time.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
    pub concurrency: u64,
    /// HTTP/2 connections the callers are spread over (round robin).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub connections: u64,
    /// Length of the measured window (ignored when --requests is given).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub duration: Duration,
    /// Stop after this many measured calls instead of after --duration.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Load applied before the measured window, not counted.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub warmup: Duration,
    /// Key type of the CSR (generated once, reused for every call, as ghz would).
    #[arg(long, default_value = "rsa-2048")]
    pub key_type: KeyType,
    /// `validity_duration` asked for in every request.
    #[arg(long, default_value = "24h", value_parser = duration)]
    pub ttl: Duration,
    /// meshd's pid: its CPU time (utime+stime from /proc/PID/stat) is read around the measured
    /// window.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Time the raw CA-key signature and CSR signature verification first, in this process, and
    /// report the result against limit = 1 / (verify + sign) per CPU-second.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub raw_limit: bool,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// The RPC to drive. `health` (grpc.health.v1.Health/Check for the CA service) needs no
    /// token or CSR: it measures the transport floor (TLS, HTTP/2, tonic) for comparison.
    #[arg(long, value_enum, default_value = "create-certificate")]
    pub rpc: Rpc,
    /// Connect without TLS (meshd's plaintext port serves health, never the CA): with
    /// `--rpc health`, the difference to the TLS port is the cost of TLS.
    #[arg(long)]
    pub plaintext: bool,
}

/// What `meshd bench ca` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Rpc {
    CreateCertificate,
    Health,
}

/// Raw signature operations, shared with `benches/ca_sign.rs` so the criterion figures and the
/// load tool's limit time exactly the same calls.
pub mod raw {
    use std::time::{Duration, Instant};

    use anyhow::{Context, anyhow, bail};
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        self, EcdsaKeyPair, KeyPair as _, RsaKeyPair, UnparsedPublicKey, VerificationAlgorithm,
    };
    use rustls_pki_types::CertificateSigningRequestDer;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_PKCS1_SHA256WITHRSA,
        OID_SIG_ECDSA_WITH_SHA256,
    };
    use x509_parser::prelude::FromDer;

    use crate::pki::keys::KeyType;

    /// Size of the message signed by [`RawSigner`]: about a leaf's TBSCertificate.
    pub const MESSAGE_LEN: usize = 600;

    /// A fixed message of `len` bytes.
    pub fn message(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    enum Key {
        Rsa(RsaKeyPair),
        Ecdsa(EcdsaKeyPair),
    }

    /// A CA key doing what rcgen does per leaf: RSA PKCS#1 v1.5 SHA-256 or ECDSA P-256 SHA-256
    /// (ASN.1 signature), over aws-lc-rs.
    pub struct RawSigner {
        key: Key,
        rng: SystemRandom,
    }

    impl RawSigner {
        /// A fresh key of `key_type`.
        pub fn generate(key_type: KeyType) -> anyhow::Result<Self> {
            let kp = key_type.generate()?;
            Self::from_pkcs8(key_type, &kp.serialize_der())
        }

        pub fn from_pkcs8(key_type: KeyType, pkcs8: &[u8]) -> anyhow::Result<Self> {
            let key = match key_type {
                KeyType::Rsa2048 => Key::Rsa(RsaKeyPair::from_pkcs8(pkcs8).map_err(|e| anyhow!("RSA key: {e}"))?),
                KeyType::EcdsaP256 => Key::Ecdsa(
                    EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8)
                        .map_err(|e| anyhow!("ECDSA key: {e}"))?,
                ),
            };
            Ok(Self {
                key,
                rng: SystemRandom::new(),
            })
        }

        /// Signs `msg`; the signature is returned so callers can keep the work observable.
        pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
            match &self.key {
                Key::Rsa(kp) => {
                    let mut sig = vec![0; kp.public_modulus_len()];
                    // Signing with a valid key into a modulus-sized buffer cannot fail.
                    let _ = kp.sign(&signature::RSA_PKCS1_SHA256, &self.rng, msg, &mut sig);
                    sig
                }
                Key::Ecdsa(kp) => kp.sign(&self.rng, msg).map(|s| s.as_ref().to_vec()).unwrap_or_default(),
            }
        }

        /// Verifies `sig` over `msg` with this key's public half (a self-check for tests).
        pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
            match &self.key {
                Key::Rsa(kp) => {
                    UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, kp.public_key().as_ref())
                        .verify(msg, sig)
                        .is_ok()
                }
                Key::Ecdsa(kp) => UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, kp.public_key().as_ref())
                    .verify(msg, sig)
                    .is_ok(),
            }
        }
    }

    /// The signature of a CSR, ready to be checked the way x509-parser's `verify_signature`
    /// (what `pki::csr::parse_and_verify` calls) checks it: an aws-lc-rs `UnparsedPublicKey`.
    pub struct CsrSignature {
        alg: &'static dyn VerificationAlgorithm,
        public_key: Vec<u8>,
        signed: Vec<u8>,
        signature: Vec<u8>,
    }

    impl CsrSignature {
        /// Extracts the signed bytes, signature and key of a PEM CSR (RSA SHA-256 or ECDSA
        /// P-256 SHA-256).
        pub fn from_pem(pem: &str) -> anyhow::Result<Self> {
            let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).context("CSR PEM")?;
            let (_, csr) = X509CertificationRequest::from_der(der.as_ref()).map_err(|e| anyhow!("CSR: {e}"))?;
            let sig_alg = &csr.signature_algorithm.algorithm;
            let alg: &'static dyn VerificationAlgorithm = if *sig_alg == OID_PKCS1_SHA256WITHRSA {
                &signature::RSA_PKCS1_2048_8192_SHA256
            } else if *sig_alg == OID_SIG_ECDSA_WITH_SHA256 {
                &signature::ECDSA_P256_SHA256_ASN1
            } else {
                bail!("CSR signature algorithm {sig_alg} is not RSA-SHA256 or ECDSA-SHA256");
            };
            let info = &csr.certification_request_info;
            Ok(Self {
                alg,
                public_key: info.subject_pki.subject_public_key.data.to_vec(),
                signed: info.raw.to_vec(),
                signature: csr.signature_value.data.to_vec(),
            })
        }

        /// One signature verification.
        pub fn verify(&self) -> bool {
            UnparsedPublicKey::new(self.alg, &self.public_key)
                .verify(&self.signed, &self.signature)
                .is_ok()
        }
    }

    /// The key type of a certificate's public key, when it is one meshd generates.
    pub fn cert_key_type(der: &[u8]) -> anyhow::Result<KeyType> {
        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| anyhow!("certificate: {e}"))?;
        let spki = cert.public_key();
        let alg = &spki.algorithm.algorithm;
        if *alg == OID_PKCS1_RSAENCRYPTION {
            if let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed()
                && rsa.key_size() == 2048
            {
                return Ok(KeyType::Rsa2048);
            }
            bail!("the CA key is RSA but not 2048 bits; the raw limit is only measured for rsa-2048 and ecdsa-p256");
        }
        if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
            if curve == Some(OID_EC_P256) {
                return Ok(KeyType::EcdsaP256);
            }
        }
        bail!("the CA key ({alg}) is not rsa-2048 or ecdsa-p256; no raw limit for it")
    }

    /// Per-operation time of a timed op: the median over rounds of the calling thread's CPU time
    /// per op (when `/proc/thread-self/stat` is readable) and of the wall time per op.
    #[derive(Debug, Clone, Copy)]
    pub struct OpTime {
        pub cpu: Option<Duration>,
        pub wall: Duration,
    }

    impl OpTime {
        /// CPU time when known, else wall time: the figure a per-CPU-second limit is built on.
        pub fn best(&self) -> Duration {
            self.cpu.filter(|c| !c.is_zero()).unwrap_or(self.wall)
        }
    }

    /// Times `op` single-threaded: after a short warm-up, `rounds` rounds of about `round`
    /// each; returns the median per-op time. Unlike wall time, CPU time does not grow when other
    /// processes take turns on the same core (it still does when they share its caches). When
    /// only clock ticks are available, a round should last a few hundred milliseconds.
    pub fn time_op(mut op: impl FnMut(), rounds: usize, round: Duration) -> OpTime {
        for _ in 0..3 {
            op();
        }
        let probe = 5u32;
        let t = Instant::now();
        for _ in 0..probe {
            op();
        }
        let one = (t.elapsed() / probe).max(Duration::from_nanos(100));
        let iters = (round.as_nanos() / one.as_nanos()).clamp(1, 10_000_000) as u32;
        let mut walls = Vec::new();
        let mut cpus = Vec::new();
        for _ in 0..rounds.max(1) {
            let c0 = super::thread_cpu_time();
            let t = Instant::now();
            for _ in 0..iters {
                op();
            }
            walls.push(t.elapsed() / iters);
            if let (Some(c0), Some(c1)) = (c0, super::thread_cpu_time()) {
                cpus.push(c1.saturating_sub(c0) / iters);
            }
        }
        walls.sort();
        cpus.sort();
        OpTime {
            cpu: (cpus.len() == walls.len()).then(|| cpus[cpus.len() / 2]),
            wall: walls[walls.len() / 2],
        }
    }
}

/// The raw limit measured before the load.
#[derive(Debug, Clone, serde::Serialize)]
struct RawLimit {
    ca_key_type: String,
    csr_key_type: String,
    /// Median thread CPU time per op (wall time when CPU time is not readable).
    sign_us: f64,
    verify_us: f64,
    /// Median wall time per op, for reference: it grows when other processes share the cores.
    sign_wall_us: f64,
    verify_wall_us: f64,
    /// Whether sign_us/verify_us are CPU time.
    cpu_time: bool,
    /// 1 / (sign + verify), per CPU-second.
    limit_per_cpu_s: f64,
}

/// Rounds and round length of the raw-limit timing (about 1.5 s per operation).
const RAW_ROUNDS: usize = 5;
const RAW_ROUND: Duration = Duration::from_millis(300);

fn measure_raw_limit(ca: KeyType, csr_pem: &str, csr_key: KeyType) -> anyhow::Result<RawLimit> {
    let signer = raw::RawSigner::generate(ca)?;
    let msg = raw::message(raw::MESSAGE_LEN);
    if !signer.verify(&msg, &signer.sign(&msg)) {
        bail!("raw {ca} signature does not verify");
    }
    let csr = raw::CsrSignature::from_pem(csr_pem)?;
    if !csr.verify() {
        bail!("the benchmark CSR's signature does not verify");
    }
    let rounds = RAW_ROUNDS;
    let round = RAW_ROUND;
    let sign = raw::time_op(
        || {
            std::hint::black_box(signer.sign(std::hint::black_box(&msg)));
        },
        rounds,
        round,
    );
    let verify = raw::time_op(
        || {
            std::hint::black_box(std::hint::black_box(&csr).verify());
        },
        rounds,
        round,
    );
    let sum = (sign.best() + verify.best()).as_secs_f64();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Ok(RawLimit {
        ca_key_type: ca.to_string(),
        csr_key_type: csr_key.to_string(),
        sign_us: us(sign.best()),
        verify_us: us(verify.best()),
        sign_wall_us: us(sign.wall),
        verify_wall_us: us(verify.wall),
        cpu_time: sign.cpu.is_some() && verify.cpu.is_some(),
        limit_per_cpu_s: if sum > 0.0 { 1.0 / sum } else { 0.0 },
    })
}

/// Linux's USER_HZ: /proc reports CPU times in these ticks. It is 100 on every mainstream Linux
/// build; reading it properly needs sysconf(_SC_CLK_TCK), i.e. libc, which meshd does not link
/// directly, so it is assumed (and printed) rather than queried.
pub const ASSUMED_CLK_TCK: f64 = 100.0;

/// utime + stime of a process, in seconds, from `/proc/<pid>/stat` (`self` for this process).
pub fn process_cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// CPU time the calling thread has used: `se.sum_exec_runtime` from `/proc/thread-self/sched`
/// (nanosecond precision; present when the kernel has CONFIG_SCHED_DEBUG), else utime+stime
/// from `/proc/thread-self/stat` (clock ticks).
pub fn thread_cpu_time() -> Option<Duration> {
    std::fs::read_to_string("/proc/thread-self/sched")
        .ok()
        .and_then(|s| sched_runtime(&s))
        .or_else(|| {
            stat_cpu_seconds("/proc/thread-self/stat")
                .ok()
                .map(Duration::from_secs_f64)
        })
}

/// Parses `se.sum_exec_runtime : <ms>.<ns within the ms, 6 digits>` from a `sched` file.
fn sched_runtime(sched: &str) -> Option<Duration> {
    let line = sched.lines().find(|l| l.starts_with("se.sum_exec_runtime"))?;
    let value = line.split(':').nth(1)?.trim();
    let (ms, frac) = value.split_once('.').unwrap_or((value, ""));
    let ms: u64 = ms.parse().ok()?;
    let digits: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
    let ns: u64 = digits.parse().ok()?;
    Some(Duration::from_millis(ms) + Duration::from_nanos(ns))
}

fn stat_cpu_seconds(path: &str) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // comm (field 2) may contain spaces and parentheses: count fields after the last ')'.
    let rest = s
        .rfind(')')
        .map(|i| &s[i + 1..])
        .with_context(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime field 15.
    let tick = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {} missing", i + 3))
    };
    Ok((tick(11)? + tick(12)?) as f64 / ASSUMED_CLK_TCK)
}

/// (busy, total) jiffies of the whole machine from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Everything one caller sends, built once.
struct CallTemplate {
    csr: String,
    validity_secs: i64,
    authorization: AsciiMetadataValue,
    cluster_id: AsciiMetadataValue,
}

impl CallTemplate {
    fn request(&self) -> tonic::Request<IstioCertificateRequest> {
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: self.csr.clone(),
            validity_duration: self.validity_secs,
            metadata: None,
        });
        let md = req.metadata_mut();
        md.insert("authorization", self.authorization.clone());
        md.insert("clusterid", self.cluster_id.clone());
        req
    }
}

/// One caller's stub.
#[derive(Clone)]
enum Client {
    Ca(IstioCertificateServiceClient<Channel>),
    Health(HealthClient<Channel>),
}

impl Client {
    async fn call(&mut self, tpl: &CallTemplate) -> Result<(), tonic::Status> {
        match self {
            Client::Ca(c) => c.create_certificate(tpl.request()).await.map(|r| {
                std::hint::black_box(r.into_inner());
            }),
            Client::Health(c) => c
                .check(HealthCheckRequest {
                    service: CA_SERVICE_NAME.into(),
                })
                .await
                .map(|r| {
                    std::hint::black_box(r.into_inner());
                }),
        }
    }
}

/// What the callers of one run saw.
#[derive(Default)]
struct RunStats {
    /// Per-call latency in nanoseconds, every status included (as ghz does).
    latencies_ns: Vec<u64>,
    /// Count by gRPC status code.
    codes: BTreeMap<i32, u64>,
    /// Distinct error messages (a few) with counts.
    errors: BTreeMap<String, u64>,
}

impl RunStats {
    fn merge(&mut self, other: RunStats) {
        self.latencies_ns.extend(other.latencies_ns);
        for (c, n) in other.codes {
            *self.codes.entry(c).or_default() += n;
        }
        for (m, n) in other.errors {
            if self.errors.len() < 10 || self.errors.contains_key(&m) {
                *self.errors.entry(m).or_default() += n;
            }
        }
    }

    fn ok(&self) -> u64 {
        self.codes.get(&(tonic::Code::Ok as i32)).copied().unwrap_or(0)
    }
}

/// When the callers stop.
#[derive(Clone)]
enum Stop {
    At(Instant),
    After(Arc<AtomicU64>, u64),
}

impl Stop {
    fn take(&self) -> bool {
        match self {
            Stop::At(t) => Instant::now() < *t,
            Stop::After(issued, max) => issued.fetch_add(1, Ordering::Relaxed) < *max,
        }
    }
}

async fn caller(mut client: Client, tpl: Arc<CallTemplate>, stop: Stop) -> RunStats {
    let mut stats = RunStats::default();
    while stop.take() {
        let started = Instant::now();
        let result = client.call(&tpl).await;
        stats.latencies_ns.push(started.elapsed().as_nanos() as u64);
        let code = match result {
            Ok(()) => tonic::Code::Ok,
            Err(status) => {
                if stats.errors.len() < 10 {
                    *stats
                        .errors
                        .entry(format!("{:?}: {}", status.code(), status.message()))
                        .or_default() += 1;
                }
                status.code()
            }
        };
        *stats.codes.entry(code as i32).or_default() += 1;
    }
    stats
}

async fn run_load(clients: &[Client], tpl: &Arc<CallTemplate>, concurrency: u64, stop: Stop) -> RunStats {
    let tasks: Vec<_> = (0..concurrency as usize)
        .map(|i| {
            tokio::spawn(caller(
                clients[i % clients.len()].clone(),
                Arc::clone(tpl),
                stop.clone(),
            ))
        })
        .collect();
    let mut all = RunStats::default();
    for t in tasks {
        // A caller task only ends by returning its stats; a panic would be a bug in this file.
        if let Ok(s) = t.await {
            all.merge(s);
        }
    }
    all
}

fn code_name(code: i32) -> String {
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK".to_string(),
        c => format!("{c:?}"),
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The minted or given token and the identity the certificates must carry.
fn token(args: &CaBenchArgs, lifetime: Duration) -> anyhow::Result<(String, Option<SpiffeId>)> {
    if let Some(path) = &args.token {
        let t = std::fs::read_to_string(path).with_context(|| format!("reading token {}", path.display()))?;
        let t = t.trim().to_string();
        let id = token_subject(&t).map(|(ns, sa)| SpiffeId::new(&args.trust_domain, &ns, &sa));
        return Ok((t, id));
    }
    if !crate::auth::issuer::key_path(&args.data_dir).exists() {
        bail!(
            "no standalone issuer key in {} (give meshd's --data-dir, or --token FILE)",
            args.data_dir.display()
        );
    }
    let issuer = LocalIssuer::load_or_create(&args.data_dir)
        .with_context(|| format!("loading the standalone issuer from {}", args.data_dir.display()))?;
    let t = issuer.mint(
        &args.namespace,
        &args.service_account,
        std::slice::from_ref(&args.audience),
        lifetime,
        SystemTime::now(),
    )?;
    Ok((
        t,
        Some(SpiffeId::new(
            &args.trust_domain,
            &args.namespace,
            &args.service_account,
        )),
    ))
}

/// `(namespace, service account)` from a Kubernetes service-account token's `sub`, unverified.
fn token_subject(token: &str) -> Option<(String, String)> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let (ns, sa) = crate::auth::jwt::parse_service_account_subject(v.get("sub")?.as_str()?)?;
    Some((ns.to_string(), sa.to_string()))
}

async fn run_ca(args: CaBenchArgs) -> anyhow::Result<()> {
    let root_path = args
        .root_cert
        .clone()
        .unwrap_or_else(|| args.data_dir.join("root-cert.pem"));
    let root_pem = if args.plaintext {
        Vec::new()
    } else {
        std::fs::read(&root_path).with_context(|| format!("reading root cert {}", root_path.display()))?
    };
    let planned = args.warmup + args.duration;
    let (tpl, expected) = match args.rpc {
        Rpc::CreateCertificate => {
            let (token, expected) = token(&args, Duration::from_secs(3600) + planned * 2)?;
            let (_key, csr) = crate::client::make_csr(args.key_type, expected.as_ref())?;
            let tpl = CallTemplate {
                csr,
                validity_secs: args.ttl.as_secs() as i64,
                authorization: MetadataValue::try_from(format!("Bearer {token}"))
                    .context("token is not valid metadata")?,
                cluster_id: MetadataValue::try_from(args.cluster_id.as_str())
                    .context("--cluster-id is not valid metadata")?,
            };
            (tpl, expected)
        }
        Rpc::Health => (
            CallTemplate {
                csr: String::new(),
                validity_secs: 0,
                authorization: MetadataValue::from_static(""),
                cluster_id: MetadataValue::from_static(""),
            },
            None,
        ),
    };
    let tpl = Arc::new(tpl);

    let mut clients = Vec::new();
    for _ in 0..args.connections {
        let ch = if args.plaintext {
            Endpoint::from_shared(format!("http://{}", args.addr))?
                .connect_timeout(Duration::from_secs(10))
                .connect()
                .await
                .with_context(|| format!("connecting to {} (plaintext)", args.addr))?
        } else {
            crate::client::connect(&args.addr, &args.server_name, &root_pem, None).await?
        };
        clients.push(match args.rpc {
            Rpc::CreateCertificate => Client::Ca(IstioCertificateServiceClient::new(ch)),
            Rpc::Health => Client::Health(HealthClient::new(ch)),
        });
    }

    // Never benchmark errors: the first answer must be a valid certificate for our identity
    // (or, for --rpc health, SERVING).
    let raw = match &clients[0] {
        Client::Ca(c) => {
            let first = c
                .clone()
                .create_certificate(tpl.request())
                .await
                .map_err(|s| anyhow::anyhow!("first CreateCertificate failed: {:?}: {}", s.code(), s.message()))?
                .into_inner();
            crate::client::verify_response(&first.cert_chain, &root_pem, expected.as_ref())
                .context("first CreateCertificate answer")?;
            if args.raw_limit {
                // The issuing certificate: the first intermediate when the answer carries any,
                // else the root.
                let issuer_der = if first.cert_chain.len() > 2 {
                    crate::pki::pem::parse_certs(first.cert_chain[1].as_bytes())?.remove(0)
                } else {
                    crate::pki::pem::parse_certs(&root_pem)?.remove(0)
                };
                let ca_type = raw::cert_key_type(&issuer_der)?;
                let (csr, key_type) = (tpl.csr.clone(), args.key_type);
                Some(tokio::task::spawn_blocking(move || measure_raw_limit(ca_type, &csr, key_type)).await??)
            } else {
                None
            }
        }
        Client::Health(c) => {
            let status = c
                .clone()
                .check(HealthCheckRequest {
                    service: CA_SERVICE_NAME.into(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("first health check failed: {:?}: {}", s.code(), s.message()))?
                .into_inner()
                .status;
            if status != tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                bail!("{CA_SERVICE_NAME} is not SERVING (status {status})");
            }
            None
        }
    };

    if !args.warmup.is_zero() {
        let warm = run_load(&clients, &tpl, args.concurrency, Stop::At(Instant::now() + args.warmup)).await;
        if warm.ok() == 0 {
            bail!("no call succeeded during the warm-up: {:?}", warm.errors);
        }
    }

    let pid = args.server_pid.map(|p| p.to_string());
    let server_before = pid.as_deref().map(process_cpu_seconds).transpose()?;
    let client_before = process_cpu_seconds("self").ok();
    let machine_before = machine_ticks();
    let started = Instant::now();
    let stop = match args.requests {
        Some(n) => Stop::After(Arc::new(AtomicU64::new(0)), n),
        None => Stop::At(started + args.duration),
    };
    let mut stats = run_load(&clients, &tpl, args.concurrency, stop).await;
    let elapsed = started.elapsed();
    let server_cpu = match (&pid, server_before) {
        (Some(p), Some(b)) => Some(process_cpu_seconds(p)? - b),
        _ => None,
    };
    let client_cpu = client_before.and_then(|b| process_cpu_seconds("self").ok().map(|a| a - b));
    let machine_after = machine_ticks();
    let machine_busy = match (machine_before, machine_after) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some((b1 - b0) as f64 / (t1 - t0) as f64),
        _ => None,
    };
    // CPU the rest of the machine used meanwhile (other processes, the kernel's softirqs, …):
    // a large value means the figures were taken on a busy machine.
    let other_cpu = match (machine_before, machine_after, server_cpu, client_cpu) {
        (Some((b0, _)), Some((b1, _)), Some(s), Some(c)) => Some(((b1 - b0) as f64 / ASSUMED_CLK_TCK - s - c).max(0.0)),
        _ => None,
    };

    stats.latencies_ns.sort_unstable();
    let lat = &stats.latencies_ns;
    let total = lat.len() as u64;
    let ok = stats.ok();
    let secs = elapsed.as_secs_f64();
    let rps = total as f64 / secs;
    let per_cpu = server_cpu.filter(|c| *c > 0.0).map(|c| ok as f64 / c);
    let ratio = match (&raw, per_cpu) {
        (Some(r), Some(p)) if r.limit_per_cpu_s > 0.0 => Some(p / r.limit_per_cpu_s),
        _ => None,
    };
    let mean_ns = if total > 0 {
        lat.iter().map(|&x| x as u128).sum::<u128>() / total as u128
    } else {
        0
    } as u64;

    if args.json {
        let codes: BTreeMap<String, u64> = stats.codes.iter().map(|(c, n)| (code_name(*c), *n)).collect();
        let out = serde_json::json!({
            "addr": args.addr,
            "rpc": format!("{:?}", args.rpc),
            "tls": !args.plaintext,
            "concurrency": args.concurrency,
            "connections": args.connections,
            "csr_key_type": args.key_type.to_string(),
            "total": total,
            "ok": ok,
            "duration_s": secs,
            "rps": rps,
            "ok_rps": ok as f64 / secs,
            "latency_ms": {
                "fastest": ms(lat.first().copied().unwrap_or(0)),
                "mean": ms(mean_ns),
                "p50": ms(percentile(lat, 0.50)),
                "p90": ms(percentile(lat, 0.90)),
                "p99": ms(percentile(lat, 0.99)),
                "max": ms(lat.last().copied().unwrap_or(0)),
            },
            "status_codes": codes,
            "errors": stats.errors,
            "server_pid": args.server_pid,
            "server_cpu_s": server_cpu,
            "client_cpu_s": client_cpu,
            "machine_busy_fraction": machine_busy,
            "other_cpu_s": other_cpu,
            "clk_tck_assumed": ASSUMED_CLK_TCK,
            "ok_per_server_cpu_s": per_cpu,
            "raw_limit": raw,
            "ratio_to_limit": ratio,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!();
        println!("Summary:");
        let what = match args.rpc {
            Rpc::CreateCertificate => format!("CreateCertificate, CSR {}", args.key_type),
            Rpc::Health => "Health/Check".to_string(),
        };
        let tls = if args.plaintext { "plaintext" } else { "TLS" };
        println!(
            "  Target:       {} {tls} ({what}; {} callers over {} connection(s))",
            args.addr, args.concurrency, args.connections
        );
        println!("  Count:        {total}");
        println!("  Total:        {secs:.2} s");
        println!("  Slowest:      {:.2} ms", ms(lat.last().copied().unwrap_or(0)));
        println!("  Fastest:      {:.2} ms", ms(lat.first().copied().unwrap_or(0)));
        println!("  Average:      {:.2} ms", ms(mean_ns));
        println!("  Requests/sec: {rps:.2}");
        println!();
        println!("Latency distribution:");
        for (label, q) in [("50", 0.50), ("90", 0.90), ("99", 0.99)] {
            println!("  {label} % in {:.2} ms", ms(percentile(lat, q)));
        }
        println!("  max  {:.2} ms", ms(lat.last().copied().unwrap_or(0)));
        println!();
        println!("Status code distribution:");
        for (c, n) in &stats.codes {
            println!("  [{}]   {n} responses", code_name(*c));
        }
        if !stats.errors.is_empty() {
            println!();
            println!("Error distribution:");
            for (m, n) in &stats.errors {
                println!("  [{n}]   {m}");
            }
        }
        println!();
        println!("CPU (clock ticks assumed {ASSUMED_CLK_TCK}/s):");
        match (server_cpu, per_cpu) {
            (Some(c), Some(p)) => {
                println!("  server CPU:   {c:.2} s ({:.2} cores)", c / secs);
                println!("  OK per server CPU-second: {p:.1}");
            }
            (Some(c), None) => println!("  server CPU:   {c:.2} s"),
            _ => println!("  server CPU:   (give --server-pid)"),
        }
        if let Some(c) = client_cpu {
            println!("  client CPU:   {c:.2} s ({:.2} cores)", c / secs);
        }
        if let Some(b) = machine_busy {
            println!("  machine busy: {:.0} %", b * 100.0);
        }
        if let Some(o) = other_cpu {
            println!("  other CPU:    {o:.2} s (everything but server and client)");
        }
        if let Some(r) = &raw {
            println!();
            let kind = if r.cpu_time { "thread CPU time" } else { "wall time" };
            println!("Raw limit (this process, single thread, median of {RAW_ROUNDS} rounds, {kind}):");
            println!(
                "  {} CA sign:          {:.1} us (wall {:.1} us)",
                r.ca_key_type, r.sign_us, r.sign_wall_us
            );
            println!(
                "  {} CSR verify:       {:.1} us (wall {:.1} us)",
                r.csr_key_type, r.verify_us, r.verify_wall_us
            );
            println!("  limit 1/(verify+sign): {:.1} per CPU-second", r.limit_per_cpu_s);
            match ratio {
                Some(x) => println!("  measured / limit:      {:.1} %", x * 100.0),
                None => println!("  measured / limit:      (give --server-pid)"),
            }
        }
    }
    if ok == 0 {
        bail!("no call succeeded in the measured window");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.9), 90);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn own_cpu_time_is_readable() {
        let c = process_cpu_seconds("self").unwrap();
        assert!(c >= 0.0);
        let before = thread_cpu_time().unwrap();
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(thread_cpu_time().unwrap() >= before);
    }

    #[test]
    fn sched_runtime_parses_milliseconds_with_ns() {
        let f =
            "x (1, #threads: 1)\n---\nse.exec_start   :   9058894.345940\nse.sum_exec_runtime     :      1.415137\n";
        assert_eq!(sched_runtime(f), Some(Duration::from_nanos(1_415_137)));
        assert_eq!(
            sched_runtime("se.sum_exec_runtime : 12.5\n"),
            Some(Duration::from_nanos(12_500_000))
        );
        assert_eq!(sched_runtime("nothing here"), None);
    }

    #[test]
    fn time_op_reports_a_median() {
        let t = raw::time_op(
            || {
                std::hint::black_box((0..1000u64).sum::<u64>());
            },
            3,
            Duration::from_millis(20),
        );
        assert!(t.wall > Duration::ZERO);
        assert!(t.best() > Duration::ZERO);
    }

    #[test]
    fn raw_ops_match_key_types() {
        for kt in [KeyType::EcdsaP256, KeyType::Rsa2048] {
            let s = raw::RawSigner::generate(kt).unwrap();
            let m = raw::message(raw::MESSAGE_LEN);
            assert!(s.verify(&m, &s.sign(&m)));
            let (_, pem) = crate::client::make_csr(kt, None).unwrap();
            assert!(raw::CsrSignature::from_pem(&pem).unwrap().verify());
            let root = crate::ca::material::generate_root("cluster.local", kt, SystemTime::now()).unwrap();
            let der = crate::pki::pem::parse_certs(root.0.as_bytes()).unwrap().remove(0);
            assert_eq!(raw::cert_key_type(&der).unwrap(), kt);
        }
    }

    #[test]
    fn token_subject_reads_sub() {
        let issuer = LocalIssuer::generate().unwrap();
        let t = issuer
            .mint(
                "ns1",
                "sa1",
                &["istio-ca".into()],
                Duration::from_secs(60),
                SystemTime::now(),
            )
            .unwrap();
        assert_eq!(token_subject(&t), Some(("ns1".into(), "sa1".into())));
    }
}
