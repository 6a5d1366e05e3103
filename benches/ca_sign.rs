//! The CA's signing path next to the raw signature operations it cannot avoid, for an RSA-2048
//! and an ECDSA P-256 CA (workload CSRs of the same key type). See BENCHMARKS.md.
//!
//! Per CA key type (group `ca_sign/<key type>`, or `ca_sign_cpu/<key type>` in CPU time):
//! - `raw_sign`: one aws-lc-rs signature of a 600-byte message with the CA key type, as rcgen
//!   signs a leaf (RSA PKCS#1 v1.5 SHA-256 / ECDSA P-256 SHA-256 ASN.1);
//! - `raw_verify_csr`: one aws-lc-rs verification of a real workload CSR's signature;
//! - `parse_and_verify`: `pki::csr::parse_and_verify` alone (PEM → DER → PKCS#10 → verify);
//! - `sign_workload`: `CaSigner::sign_workload` alone (build, sign and PEM-encode the leaf);
//! - `signing_path`: both, which is what CreateCertificate does after authentication.
//!
//! Times are wall-clock by default. With `MESHD_BENCH_CPU_TIME=1` they are the benchmark
//! thread's CPU time instead (`meshd::bench::thread_cpu_time`), which does not grow when other
//! processes take turns on the same core: useful on a shared machine.
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::Criterion;
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use meshd::bench::raw::{CsrSignature, MESSAGE_LEN, RawSigner, message};
use meshd::ca::material::load_or_create_self_signed;
use meshd::ca::signer::Signer;
use meshd::ca::{CaSigner, CaStore, TtlPolicy};
use meshd::clock::SystemClock;
use meshd::pki::SpiffeId;
use meshd::pki::csr::parse_and_verify;
use meshd::pki::keys::KeyType;

/// The calling thread's CPU time, as a criterion measurement.
struct ThreadCpuTime;

static WALL: WallTime = WallTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = Duration;
    type Value = Duration;

    fn start(&self) -> Duration {
        meshd::bench::thread_cpu_time().expect("thread CPU time is readable from /proc")
    }

    fn end(&self, started: Duration) -> Duration {
        self.start().saturating_sub(started)
    }

    fn add(&self, a: &Duration, b: &Duration) -> Duration {
        *a + *b
    }

    fn zero(&self) -> Duration {
        Duration::ZERO
    }

    fn to_f64(&self, v: &Duration) -> f64 {
        v.as_nanos() as f64
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are nanoseconds, as WallTime's.
        WALL.formatter()
    }
}

fn ca_sign<M: Measurement>(c: &mut Criterion<M>, prefix: &str) {
    for key_type in [KeyType::Rsa2048, KeyType::EcdsaP256] {
        let dir = tempfile::tempdir().expect("tempdir");
        let material = load_or_create_self_signed(dir.path(), "cluster.local", key_type, SystemTime::now())
            .expect("self-signed CA");
        let store = CaStore::new(material, None).expect("CA store");
        let signer = CaSigner::new(store, Arc::new(SystemClock), TtlPolicy::default());

        let id = SpiffeId::new("cluster.local", "default", "bench");
        let sans = vec![id.uri()];
        let (_key, csr_pem) = meshd::client::make_csr(key_type, Some(&id)).expect("CSR");
        let verified = parse_and_verify(&csr_pem).expect("CSR verifies");
        let csr_sig = CsrSignature::from_pem(&csr_pem).expect("CSR signature");
        assert!(csr_sig.verify());
        let raw = RawSigner::generate(key_type).expect("raw key");
        let msg = message(MESSAGE_LEN);

        let mut g = c.benchmark_group(format!("{prefix}/{key_type}"));
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        g.bench_function("raw_sign", |b| b.iter(|| raw.sign(black_box(&msg))));
        g.bench_function("raw_verify_csr", |b| b.iter(|| black_box(&csr_sig).verify()));
        g.bench_function("parse_and_verify", |b| {
            b.iter(|| parse_and_verify(black_box(&csr_pem)).expect("verify"))
        });
        g.bench_function("sign_workload", |b| {
            b.iter(|| signer.sign_workload(black_box(&verified), &sans, 0).expect("sign"))
        });
        g.bench_function("signing_path", |b| {
            b.iter(|| {
                let v = parse_and_verify(black_box(&csr_pem)).expect("verify");
                signer.sign_workload(&v, &sans, 0).expect("sign")
            })
        });
        g.finish();
    }
}

fn main() {
    if std::env::var_os("MESHD_BENCH_CPU_TIME").is_some_and(|v| v != "0") {
        let mut c = Criterion::default()
            .with_measurement(ThreadCpuTime)
            .configure_from_args();
        ca_sign(&mut c, "ca_sign_cpu");
        c.final_summary();
    } else {
        let mut c = Criterion::default().configure_from_args();
        ca_sign(&mut c, "ca_sign");
        c.final_summary();
    }
}
