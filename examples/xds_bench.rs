//! The xDS benchmark scenario (BENCHMARKS.md, "xDS"): a 1,000-service, two-cluster mesh in two
//! in-process fake Kubernetes API servers, the release meshd as a child process reading both
//! (primary by `--kubeconfig`, remote by `--remote-kubeconfig-dir`), and the load client of
//! `meshd::bench::xds` opening N ADS streams on its plaintext port. For each N it measures:
//!
//! (a) meshd's RSS before the streams and once every stream holds its initial config;
//! (b) endpoint change → the last stream's EDS carrying the new address (p50/p99/max per change);
//! (c) full push (a new Service on a new port: new CDS cluster, new LDS listener) → the last
//!     stream's new CDS and LDS;
//! (d) bytes of resources encoded vs bytes of responses sent, around one push of each kind.
//!
//! ```text
//! cargo build --release --features testing --example xds_bench --bin meshd
//! target/release/examples/xds_bench --streams 1000,10000 --json-out /tmp/xds.json
//! ```
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use meshd::bench::xds::{self as load, CDS, LDS, LoadClient, LoadConfig, percentile, proxy_ip};
use meshd::testing::fake_apiserver::{FakeApiServer, FakeConfig, ResourceType};
use serde::Serialize;
use serde_json::{Value, json};

#[derive(Parser, Debug, Clone)]
#[command(about = "xDS benchmark: N ADS streams against meshd over a two-cluster fake mesh")]
struct Args {
    /// The meshd binary to run.
    #[arg(long, default_value = "target/release/meshd")]
    meshd: PathBuf,
    /// Stream counts to measure, each against a fresh meshd.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    streams: Vec<usize>,
    /// Services in the mesh.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints (pods) per service and cluster.
    #[arg(long, default_value_t = 3)]
    endpoints: usize,
    /// Namespaces services and proxies are spread over.
    #[arg(long, default_value_t = 10)]
    namespaces: usize,
    /// Percentage of streams speaking Delta xDS.
    #[arg(long, default_value_t = 50)]
    delta_percent: u32,
    /// ADS streams per HTTP/2 connection.
    #[arg(long, default_value_t = 1)]
    streams_per_conn: usize,
    /// Endpoint changes measured per stream count.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// Full pushes measured per stream count.
    #[arg(long, default_value_t = 5)]
    pushes: usize,
    /// Measure full pushes only for stream counts up to this (the issue's figure is 1,000
    /// proxies; at 10,000 a full push needs more memory than this machine can spare).
    #[arg(long, default_value_t = 1000)]
    pushes_max_streams: usize,
    /// meshd's PILOT_DEBOUNCE_AFTER, in milliseconds (subtracted for "after debounce" figures).
    #[arg(long, default_value_t = 100)]
    debounce_ms: u64,
    /// Write the JSON summary here too.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// 2 puts each cluster on its own network (system-namespace label, an east-west gateway
    /// Service with a LoadBalancer address) and the proxies on their cluster's network.
    #[arg(long, default_value_t = 1)]
    networks: usize,
    /// Abort a stream count (recorded as failed) when meshd's RSS passes this, so a run cannot
    /// exhaust the shared machine's memory.
    #[arg(long, default_value_t = 13312)]
    rss_limit_mib: u64,
    /// Abort a stream count when the machine's MemAvailable drops below this.
    #[arg(long, default_value_t = 3072)]
    min_available_mib: u64,
    /// After the streams close, keep meshd running this many seconds (to inspect it by hand).
    #[arg(long, default_value_t = 0)]
    hold_s: u64,
    /// Keep meshd's log (default: only printed on failure).
    #[arg(long)]
    keep_log: Option<PathBuf>,
}

const CLUSTERS: [&str; 2] = ["cluster1", "cluster2"];

fn ns(i: usize, n: usize) -> String {
    format!("ns-{}", i % n)
}

/// Which clusters a service lives in: 45 % only cluster1, 45 % only cluster2, 10 % both.
fn service_clusters(s: usize, total: usize) -> &'static [&'static str] {
    let pos = s * 100 / total.max(1);
    if pos < 45 {
        &CLUSTERS[..1]
    } else if pos < 90 {
        &CLUSTERS[1..]
    } else {
        &CLUSTERS[..]
    }
}

fn has_grpc_port(s: usize) -> bool {
    s.is_multiple_of(4)
}

/// One service's objects in one cluster: the Service, its pods and one EndpointSlice.
struct MeshBuilder {
    services: usize,
    endpoints: usize,
    namespaces: usize,
    next_ip: usize,
    /// (cluster index, slice object) per service, for later edits.
    slices: Vec<Vec<(usize, Value)>>,
    total_endpoints: usize,
}

fn service_obj(name: &str, namespace: &str, ports: &[(&str, u16, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p, t)| json!({"name": n, "port": p, "targetPort": t, "protocol": "TCP"}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"selector": {"app": name}, "ports": ports},
    })
}

/// The network of cluster `c` when the mesh has two.
fn network(c: usize) -> String {
    format!("network{}", c + 1)
}

impl MeshBuilder {
    fn seed(&mut self, apis: &[&FakeApiServer; 2], networks: usize) -> anyhow::Result<()> {
        for (c, api) in apis.iter().enumerate() {
            api.ensure_namespace("istio-system")?;
            if networks > 1 {
                api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
                    "name": "istio-system", "labels": {"topology.istio.io/network": network(c)}}}))?;
                api.apply(json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "istio-eastwestgateway", "namespace": "istio-system",
                                 "labels": {"istio": "eastwestgateway", "topology.istio.io/network": network(c)}},
                    "spec": {"type": "LoadBalancer", "ports": [{"name": "tls", "port": 15443, "targetPort": 15443, "protocol": "TCP"}]},
                    "status": {"loadBalancer": {"ingress": [{"ip": format!("192.0.2.{}", c + 1)}]}},
                }))?;
            }
            for n in 0..self.namespaces {
                api.ensure_namespace(&ns(n, self.namespaces))?;
            }
            let region = if c == 0 { "us-east1" } else { "us-west1" };
            api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{}", CLUSTERS[c]), "labels": {
                "topology.kubernetes.io/region": region,
                "topology.kubernetes.io/zone": format!("{region}-a"),
            }}}))?;
        }
        for s in 0..self.services {
            let name = format!("svc-{s}");
            let namespace = ns(s, self.namespaces);
            let mut ports = vec![("http", 80u16, 8080u16)];
            if has_grpc_port(s) {
                ports.push(("grpc-api", 9090, 9090));
            }
            let mut slices = Vec::new();
            for cluster in service_clusters(s, self.services) {
                let c = CLUSTERS.iter().position(|x| x == cluster).unwrap_or(0);
                let api = apis[c];
                api.apply(service_obj(&name, &namespace, &ports))?;
                let mut eps = Vec::new();
                for k in 0..self.endpoints {
                    let ip = proxy_ip(self.next_ip).to_string();
                    self.next_ip += 1;
                    let pod = format!("{name}-{cluster}-{k}");
                    api.apply(json!({
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": pod, "namespace": namespace, "labels": {"app": name, "version": "v1", "security.istio.io/tlsMode": "istio"}},
                        "spec": {"serviceAccountName": name, "nodeName": format!("node-{cluster}"), "containers": [{"name": "app", "image": "app"}]},
                        "status": {"podIP": ip, "phase": "Running"},
                    }))?;
                    eps.push(json!({
                        "addresses": [ip], "conditions": {"ready": true}, "nodeName": format!("node-{cluster}"),
                        "targetRef": {"kind": "Pod", "name": pod, "namespace": namespace},
                    }));
                }
                self.total_endpoints += eps.len() * ports.len();
                let slice_ports: Vec<Value> = ports
                    .iter()
                    .map(|(n, _, t)| json!({"name": n, "port": t, "protocol": "TCP"}))
                    .collect();
                let slice = json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": format!("{name}-{cluster}"), "namespace": namespace,
                                 "labels": {"kubernetes.io/service-name": name}},
                    "addressType": "IPv4",
                    "ports": slice_ports,
                    "endpoints": eps,
                });
                api.apply(slice.clone())?;
                slices.push((c, slice));
            }
            self.slices.push(slices);
        }
        Ok(())
    }
}

/// A meshd child process.
struct Meshd {
    child: std::process::Child,
    pid: u32,
    plaintext: SocketAddr,
    monitoring: SocketAddr,
    ready: SocketAddr,
    log: PathBuf,
}

impl Meshd {
    async fn spawn(args: &Args, dir: &Path, kubeconfig: &Path, remote_dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join("meshd.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = std::process::Command::new(&args.meshd)
            .args(["serve", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--plaintext-addr",
                "127.0.0.1:0",
                "--monitoring-addr",
                "127.0.0.1:0",
                "--ready-addr",
                "127.0.0.1:0",
                "--webhook-addr",
                "127.0.0.1:0",
                // istiod's new-stream limit (25/s here) would make connecting 10,000 proxies take
                // 400 s by design; the connection storm is not what is measured.
                "--max-requests-per-second",
                "0",
                "--cluster-id",
                "cluster1",
                "--ca-key-type",
                "ecdsa-p256",
                "--log-level",
                "warn,meshd::app=info",
                "--debounce-after",
            ])
            .arg(format!("{}ms", args.debounce_ms))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--remote-kubeconfig-dir")
            .arg(remote_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting {}", args.meshd.display()))?;
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut m = Self {
            child,
            pid,
            plaintext: "0.0.0.0:0".parse()?,
            monitoring: "0.0.0.0:0".parse()?,
            ready: "0.0.0.0:0".parse()?,
            log,
        };
        loop {
            let text = std::fs::read_to_string(&m.log).unwrap_or_default();
            let addr = |name: &str| -> Option<SocketAddr> {
                text.lines()
                    .filter(|l| l.contains("listening") && l.contains(&format!("listener={name} ")))
                    .find_map(|l| l.split("addr=").nth(1)?.split_whitespace().next()?.parse().ok())
            };
            if let (Some(p), Some(mo), Some(r)) = (addr("grpc-plaintext"), addr("monitoring"), addr("ready")) {
                (m.plaintext, m.monitoring, m.ready) = (p, mo, r);
                return Ok(m);
            }
            if let Ok(Some(status)) = m.child.try_wait() {
                bail!("meshd exited ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                bail!("meshd did not log its listeners within 60 s:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn rss(&self) -> anyhow::Result<u64> {
        load::rss_bytes(self.pid)
    }

    fn cpu_s(&self) -> f64 {
        meshd::bench::process_cpu_seconds(&self.pid.to_string()).unwrap_or(f64::NAN)
    }

    async fn metrics(&self) -> anyhow::Result<String> {
        load::http_get(self.monitoring, "/metrics").await
    }

    fn stop(self, keep: Option<&Path>) {
        let log = self.log.clone();
        drop(self);
        if let Some(k) = keep {
            let _ = std::fs::copy(&log, k);
        }
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// MemAvailable from /proc/meminfo, in MiB (u64::MAX when unreadable).
fn mem_available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb / 1024)
}

async fn poll<T>(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(Debug, Default, Serialize)]
struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn latency(mut v: Vec<Duration>) -> Latency {
    v.sort_unstable();
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    Latency {
        p50_ms: ms(percentile(&v, 0.5)),
        p99_ms: ms(percentile(&v, 0.99)),
        max_ms: ms(v.last().copied()),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Debug, Default, Serialize)]
struct Share {
    encoded_bytes: f64,
    sent_bytes: f64,
    ratio: f64,
}

fn share(before: &str, after: &str) -> Share {
    let get = |t: &str, n: &str| load::metric(t, n).unwrap_or(0.0);
    let enc = get(after, "meshd_xds_encoded_bytes") - get(before, "meshd_xds_encoded_bytes");
    let sent = get(after, "meshd_xds_sent_bytes") - get(before, "meshd_xds_sent_bytes");
    Share {
        encoded_bytes: enc,
        sent_bytes: sent,
        ratio: if enc > 0.0 { sent / enc } else { f64::NAN },
    }
}

#[derive(Debug, Default, Serialize)]
struct Scenario {
    streams: usize,
    sotw: usize,
    delta: usize,
    /// (a)
    rss_before_mib: f64,
    rss_ready_mib: f64,
    rss_settled_mib: f64,
    rss_per_stream_kib: f64,
    /// After every stream closed (3 s later): what the streams did not give back.
    rss_after_close_mib: f64,
    connect_s: f64,
    initial_sync_s: f64,
    initial_ready: Latency,
    initial_cpu_s: f64,
    initial_received_mib: f64,
    /// (b) per change, time from the API write to each stream's EDS with the new address
    endpoint_changes: Vec<Latency>,
    endpoint_p50_ms_median: f64,
    endpoint_p99_ms_median: f64,
    endpoint_max_ms_median: f64,
    endpoint_p99_ms_all: f64,
    /// meshd CPU seconds per endpoint change (change and restore pushes).
    endpoint_cpu_s: Vec<f64>,
    /// meshd's own pilot_proxy_convergence_time (debouncer's first event → push handed to the
    /// stream), mean over streams, per change.
    endpoint_meshd_convergence_ms: Vec<f64>,
    /// (c) per push, time from the API write to each stream's new CDS and LDS
    full_pushes: Vec<Latency>,
    full_push_p50_ms_median: f64,
    full_push_max_ms_median: f64,
    full_push_cpu_s: Vec<f64>,
    /// (d)
    share_initial: Share,
    share_endpoint_change: Share,
    /// Networks of the mesh (1, or 2 with split-horizon EDS).
    networks: usize,
    /// meshd_xds_eds_bytes_encoded per endpoint change (every network view it touched).
    eds_bytes_per_change: Vec<f64>,
    eds_bytes_per_change_median: f64,
    share_full_push: Share,
    errors: usize,
    meshd_push_convergence_count: f64,
    /// Highest RSS seen while the streams synced (sampled every 200 ms).
    rss_peak_mib: f64,
    /// Why this stream count could not be measured to the end.
    failed: Option<String>,
}

async fn scenario(
    args: &Args,
    n: usize,
    apis: &[&FakeApiServer; 2],
    mesh: &MeshBuilder,
    files: &Path,
) -> anyhow::Result<Scenario> {
    let dir = tempfile::tempdir()?;
    let meshd = Meshd::spawn(
        args,
        dir.path(),
        &files.join("primary.kubeconfig"),
        &files.join("remote"),
    )
    .await?;
    let mut out = Scenario {
        streams: n,
        ..Default::default()
    };
    let result = measure(args, n, apis, mesh, &meshd, &mut out).await;
    if let Err(e) = &result {
        eprintln!("[{n}] FAILED: {e:#}");
        out.failed = Some(format!("{e:#}"));
        let log = std::fs::read_to_string(&meshd.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("meshd log (last 40 lines):");
        for l in tail.iter().rev() {
            eprintln!("  {l}");
        }
    }
    meshd.stop(args.keep_log.as_deref());
    Ok(out)
}

async fn measure(
    args: &Args,
    n: usize,
    apis: &[&FakeApiServer; 2],
    mesh: &MeshBuilder,
    meshd: &Meshd,
    out: &mut Scenario,
) -> anyhow::Result<()> {
    let services = args.services;
    poll("meshd /ready", Duration::from_secs(120), async || {
        load::http_get(meshd.ready, "/ready").await.ok().map(|_| ())
    })
    .await?;
    let want_eps = mesh.total_endpoints;
    poll(
        "the whole mesh in /debug/registryz",
        Duration::from_secs(120),
        async || {
            let body = load::http_get(meshd.monitoring, "/debug/registryz").await.ok()?;
            let v: Value = serde_json::from_str(&body).ok()?;
            let svcs = v["services"].as_array()?;
            let eps: usize = svcs
                .iter()
                .filter_map(|s| s["endpoints"].as_array().map(Vec::len))
                .sum();
            (svcs.len() >= services && eps >= want_eps).then_some(())
        },
    )
    .await?;
    let namespaces: Vec<String> = (0..args.namespaces).map(|i| ns(i, args.namespaces)).collect();
    let config = |streams: usize| {
        let mut c = LoadConfig::new(meshd.plaintext, streams);
        c.delta_percent = args.delta_percent;
        c.streams_per_conn = args.streams_per_conn;
        c.namespaces = namespaces.clone();
        if args.networks > 1 {
            // Stream i is in cluster_ids[i % 2]: put it on that cluster's network.
            c.networks = (0..2).map(network).collect();
        }
        c
    };
    out.networks = args.networks;
    // Warm the push context's caches (one proxy of each flavour and class), so the baseline
    // holds the per-mesh state and the delta is per-stream state only.
    {
        let mut c = config(2 * args.namespaces * 2);
        c.delta_percent = 50;
        let warm = LoadClient::start(c).await?;
        warm.wait_ready(Duration::from_secs(120))
            .await
            .context("warm-up streams")?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = meshd.rss()?;
    let cpu0 = meshd.cpu_s();
    let m0 = meshd.metrics().await?;
    eprintln!(
        "[{n}] meshd RSS before streams: {:.1} MiB",
        rss_before as f64 / 1048576.0
    );

    // (a) connect and sync N streams.
    let t0 = Instant::now();
    let client = LoadClient::start(config(n)).await?;
    out.connect_s = t0.elapsed().as_secs_f64();
    let limit = args.rss_limit_mib * 1048576;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut peak = rss_before;
    loop {
        let rss = meshd.rss()?;
        peak = peak.max(rss);
        out.rss_peak_mib = peak as f64 / 1048576.0;
        let ready = client.ready_count();
        if ready == n {
            break;
        }
        let available = mem_available_mib();
        if available < args.min_available_mib {
            bail!(
                "the machine's MemAvailable fell to {available} MiB (--min-available-mib {}) with {ready} of {n} streams ready; meshd RSS {:.0} MiB",
                args.min_available_mib,
                rss as f64 / 1048576.0
            );
        }
        if rss > limit {
            bail!(
                "meshd RSS {:.0} MiB passed --rss-limit-mib {} with {ready} of {n} streams ready after {:.1}s",
                rss as f64 / 1048576.0,
                args.rss_limit_mib,
                t0.elapsed().as_secs_f64()
            );
        }
        if client.error_count() > 0 || Instant::now() > deadline {
            client.wait_ready(Duration::ZERO).await.context("initial sync")?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    out.initial_sync_s = t0.elapsed().as_secs_f64();
    let rss_ready = meshd.rss()?;
    out.initial_cpu_s = meshd.cpu_s() - cpu0;
    let m1 = meshd.metrics().await?;
    out.share_initial = share(&m0, &m1);
    let started = client.since_base(t0);
    out.initial_ready = latency(
        client
            .streams()
            .iter()
            .filter_map(|s| s.ready_at())
            .map(|r| r.saturating_sub(started))
            .collect(),
    );
    let totals = client.totals();
    out.sotw = totals.sotw;
    out.delta = totals.delta;
    out.initial_received_mib = totals.bytes_received as f64 / 1048576.0;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_settled = meshd.rss()?;
    out.rss_peak_mib = out.rss_peak_mib.max(rss_ready as f64 / 1048576.0);
    out.rss_before_mib = rss_before as f64 / 1048576.0;
    out.rss_ready_mib = rss_ready as f64 / 1048576.0;
    out.rss_settled_mib = rss_settled as f64 / 1048576.0;
    out.rss_per_stream_kib = (rss_ready.max(rss_settled) as f64 - rss_before as f64) / n as f64 / 1024.0;
    eprintln!(
        "[{n}] all ready in {:.1}s (connect {:.1}s); RSS {:.1} → {:.1} MiB (settled {:.1}): {:.1} KiB/stream",
        out.initial_sync_s,
        out.connect_s,
        out.rss_before_mib,
        out.rss_ready_mib,
        out.rss_settled_mib,
        out.rss_per_stream_kib
    );

    // (b) endpoint changes in the remote cluster: one more endpoint for a cluster2-only service.
    let remote_only: Vec<usize> = (0..services)
        .filter(|s| service_clusters(*s, services) == &CLUSTERS[1..])
        .collect();
    for k in 0..args.changes {
        let s = remote_only[(k * 37) % remote_only.len()];
        let (c, slice) = mesh.slices[s][0].clone();
        let addr = format!("10.200.{}.{}", k / 250, k % 250 + 1);
        let mut changed = slice.clone();
        let mut new_ep = json!({"addresses": [addr], "conditions": {"ready": true}, "nodeName": "node-cluster2"});
        if args.networks > 1 {
            // An injected pod: the other network sees it as more weight on cluster2's gateway.
            let namespace = slice["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
            let pod = format!("change-{k}");
            apis[c].apply(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": namespace,
                             "labels": {"app": format!("svc-{s}"), "version": "v1", "security.istio.io/tlsMode": "istio"}},
                "spec": {"serviceAccountName": format!("svc-{s}"), "nodeName": "node-cluster2", "containers": [{"name": "app", "image": "app"}]},
                "status": {"podIP": addr, "phase": "Running"},
            }))?;
            new_ep["targetRef"] = json!({"kind": "Pod", "name": pod, "namespace": namespace});
        }
        if let Some(eps) = changed["endpoints"].as_array_mut() {
            eps.push(new_ep);
        }
        let available = mem_available_mib();
        if available < args.min_available_mib {
            bail!("the machine's MemAvailable fell to {available} MiB before endpoint change {k}");
        }
        let m_change = meshd.metrics().await?;
        let cpu_change = meshd.cpu_s();
        let before = if k == 0 { Some(m_change.clone()) } else { None };
        // With two networks only the change's own network sees the pod's address; the other
        // one sees its cluster's gateway endpoint change weight (a new EDS response).
        let sees_address = |index: usize| args.networks < 2 || index % 2 == c;
        let eds_at_change: Vec<u64> = client.streams().iter().map(|s| s.responses(load::EDS)).collect();
        client.arm_probe(&addr);
        let t = Instant::now();
        apis[c].apply(changed)?;
        client
            .wait_all("the new endpoint", Duration::from_secs(120), |st| {
                if sees_address(st.index) {
                    st.probe_at().is_some()
                } else {
                    st.responses(load::EDS) > eds_at_change[st.index]
                }
            })
            .await?;
        let at = client.since_base(t);
        let lat: Vec<Duration> = client
            .streams()
            .iter()
            .filter_map(|st| {
                if sees_address(st.index) {
                    st.probe_at()
                } else {
                    st.last_at(load::EDS)
                }
            })
            .map(|p| p.saturating_sub(at))
            .collect();
        let l = latency(lat);
        eprintln!(
            "[{n}] endpoint change {k}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            l.p50_ms, l.p99_ms, l.max_ms
        );
        out.endpoint_changes.push(l);
        let m_after = meshd.metrics().await?;
        let eds_bytes = |t: &str| load::metric(t, "meshd_xds_eds_bytes_encoded").unwrap_or(0.0);
        out.eds_bytes_per_change
            .push(eds_bytes(&m_after) - eds_bytes(&m_change));
        let conv = |t: &str, n: &str| load::metric(t, n).unwrap_or(0.0);
        let (sum, count) = (
            conv(&m_after, "pilot_proxy_convergence_time_sum") - conv(&m_change, "pilot_proxy_convergence_time_sum"),
            conv(&m_after, "pilot_proxy_convergence_time_count")
                - conv(&m_change, "pilot_proxy_convergence_time_count"),
        );
        out.endpoint_meshd_convergence_ms
            .push(if count > 0.0 { sum / count * 1e3 } else { f64::NAN });
        if let Some(b) = before {
            tokio::time::sleep(Duration::from_millis(500)).await;
            out.share_endpoint_change = share(&b, &meshd.metrics().await?);
        }
        // Back to the original; wait until every stream has that push too, then quiet, so the
        // next change starts on an idle server.
        let eds_before: Vec<u64> = client.streams().iter().map(|s| s.responses(load::EDS)).collect();
        apis[c].apply(slice)?;
        client
            .wait_all("the restored endpoints", Duration::from_secs(120), |st| {
                st.responses(load::EDS) > eds_before[st.index]
            })
            .await?;
        out.endpoint_cpu_s.push(meshd.cpu_s() - cpu_change);
        tokio::time::sleep(Duration::from_millis(args.debounce_ms * 3 + 700)).await;
    }
    client.disarm_probe();
    let lats = &out.endpoint_changes;
    out.endpoint_p50_ms_median = median(lats.iter().map(|l| l.p50_ms).collect());
    out.endpoint_p99_ms_median = median(lats.iter().map(|l| l.p99_ms).collect());
    out.endpoint_max_ms_median = median(lats.iter().map(|l| l.max_ms).collect());
    out.eds_bytes_per_change_median = median(out.eds_bytes_per_change.clone());
    out.endpoint_p99_ms_all = lats.iter().map(|l| l.p99_ms).fold(f64::NAN, f64::max);

    // (c) full pushes: a new Service on a new port in the primary (new cluster, listener, route).
    let pushes = if n <= args.pushes_max_streams { args.pushes } else { 0 };
    for k in 0..pushes {
        let before_cds: Vec<u64> = client.streams().iter().map(|s| s.responses(CDS)).collect();
        let before_lds: Vec<u64> = client.streams().iter().map(|s| s.responses(LDS)).collect();
        let m_before = if k == 0 { Some(meshd.metrics().await?) } else { None };
        let cpu_before = meshd.cpu_s();
        let name = format!("push-{k}");
        let t = Instant::now();
        apis[0].apply(service_obj(&name, "ns-0", &[("http-push", 20000 + k as u16, 8080)]))?;
        let streams = client.streams();
        client
            .wait_all("the full push", Duration::from_secs(300), |st| {
                st.responses(CDS) > before_cds[st.index] && st.responses(LDS) > before_lds[st.index]
            })
            .await?;
        let at = client.since_base(t);
        let lat: Vec<Duration> = streams
            .iter()
            .filter_map(|st| Some(st.last_at(CDS)?.max(st.last_at(LDS)?)))
            .map(|p| p.saturating_sub(at))
            .collect();
        let l = latency(lat);
        // Let the follow-ups (EDS and RDS for the new names) finish before the next push.
        tokio::time::sleep(Duration::from_millis(args.debounce_ms * 3 + 1500)).await;
        out.full_push_cpu_s.push(meshd.cpu_s() - cpu_before);
        eprintln!(
            "[{n}] full push {k}: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            l.p50_ms, l.p99_ms, l.max_ms
        );
        out.full_pushes.push(l);
        if let Some(b) = m_before {
            out.share_full_push = share(&b, &meshd.metrics().await?);
        }
    }
    out.full_push_p50_ms_median = median(out.full_pushes.iter().map(|l| l.p50_ms).collect());
    out.full_push_max_ms_median = median(out.full_pushes.iter().map(|l| l.max_ms).collect());
    for k in 0..pushes {
        apis[0].delete(&ResourceType::core("services"), "ns-0", &format!("push-{k}"));
    }
    let m = meshd.metrics().await?;
    out.meshd_push_convergence_count = load::metric(&m, "pilot_proxy_convergence_time_count").unwrap_or(0.0);
    out.errors = client.error_count();
    drop(client);
    tokio::time::sleep(Duration::from_secs(3)).await;
    out.rss_after_close_mib = meshd.rss()? as f64 / 1048576.0;
    eprintln!(
        "[{n}] RSS 3 s after the streams closed: {:.1} MiB",
        out.rss_after_close_mib
    );
    if args.hold_s > 0 {
        eprintln!(
            "[{n}] holding meshd pid {} (monitoring {}, plaintext {}) for {} s",
            meshd.pid, meshd.monitoring, meshd.plaintext, args.hold_s
        );
        tokio::time::sleep(Duration::from_secs(args.hold_s)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    if !args.meshd.exists() {
        bail!(
            "{} not found: build it with cargo build --release --bin meshd",
            args.meshd.display()
        );
    }
    let primary = FakeApiServer::start(FakeConfig::new("127.0.0.2:0".parse()?, "cluster1")).await?;
    let remote = FakeApiServer::start(FakeConfig::new("127.0.0.3:0".parse()?, "cluster2")).await?;
    let apis = [&primary, &remote];
    let t = Instant::now();
    let mut mesh = MeshBuilder {
        services: args.services,
        endpoints: args.endpoints,
        namespaces: args.namespaces,
        next_ip: 0,
        slices: Vec::new(),
        total_endpoints: 0,
    };
    mesh.seed(&apis, args.networks)?;
    eprintln!(
        "mesh: {} services, {} endpoint addresses×ports, seeded in {:.1}s",
        args.services,
        mesh.total_endpoints,
        t.elapsed().as_secs_f64()
    );
    let files = tempfile::tempdir()?;
    std::fs::write(
        files.path().join("primary.kubeconfig"),
        primary.kubeconfig(primary.admin_token()),
    )?;
    std::fs::create_dir(files.path().join("remote"))?;
    let reader = remote.reader_token("istio-reader-service-account")?;
    std::fs::write(files.path().join("remote").join("cluster2"), remote.kubeconfig(&reader))?;

    let mut results = Vec::new();
    for &n in &args.streams {
        let s = scenario(&args, n, &apis, &mesh, files.path()).await?;
        results.push(s);
        // Let the closed sockets drain before the next meshd.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let summary = json!({
        "services": args.services,
        "endpoints_per_service_and_cluster": args.endpoints,
        "delta_percent": args.delta_percent,
        "streams_per_conn": args.streams_per_conn,
        "debounce_ms": args.debounce_ms,
        "scenarios": results,
    });
    let text = serde_json::to_string_pretty(&summary)?;
    println!("{text}");
    if let Some(p) = &args.json_out {
        std::fs::write(p, &text)?;
    }
    eprintln!();
    eprintln!(
        "{:>7} {:>10} {:>9} {:>10} {:>12} {:>12} {:>12} {:>12} {:>8} {:>8}",
        "streams",
        "KiB/strm",
        "RSS MiB",
        "sync s",
        "eds p50 ms",
        "eds p99 ms",
        "push p50",
        "push max",
        "share E",
        "share F"
    );
    for s in &results {
        eprintln!(
            "{:>7} {:>10.1} {:>9.1} {:>10.1} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>8.0} {:>8.0}",
            s.streams,
            s.rss_per_stream_kib,
            s.rss_ready_mib.max(s.rss_settled_mib),
            s.initial_sync_s,
            s.endpoint_p50_ms_median,
            s.endpoint_p99_ms_median,
            s.full_push_p50_ms_median,
            s.full_push_max_ms_median,
            s.share_endpoint_change.ratio,
            s.share_full_push.ratio
        );
    }
    Ok(())
}
