//! Runs one fake Kubernetes API server for out-of-process tests (Python, Envoy, istioctl).
//!
//! ```text
//! cargo run --features testing --example fake_apiserver -- \
//!     --bind 127.0.0.2:0 --cluster-name cluster2 --state-dir /tmp/cluster2
//! ```
//!
//! Writes `kubeconfig-admin.yaml`, `ca.pem`, `admin-token` and `url` into the state dir, prints
//! `fake-apiserver listening url=https://...` to stderr, and serves the test-control API under
//! `/fake/` (admin token required) on the same HTTPS port:
//!
//! - `POST /fake/apply` — JSON object, JSON list or multi-document YAML; creates or replaces
//! - `POST /fake/delete` — `{"apiVersion","kind","namespace","name"}`
//! - `POST /fake/token` — `{"namespace","serviceAccount","audiences","ttlSeconds","pod":{"name","uid"},"issuedAtOffsetSeconds"}`
//! - `POST /fake/reader-token?serviceAccount=NAME` — token with Istio's reader rules
//! - `POST /fake/grant` — `{"subject","rules":[{"verbs","apiGroups","resources","resourceNames","namespaces"}],"preset":"istio-reader"}`
//! - `POST /fake/static-token` — `{"token","username","groups"}`
//! - `POST /fake/faults` — `{"latencyMs","failNext":{"count","code"},"failureRate":{"rate","code"},"retryAfterSeconds","dropWatches","compact","clear","downForMs"}`
//! - `GET /fake/counters` — requests per verb/resource, TokenReviews, resourceVersion
//! - `GET /fake/kubeconfig?token=T`
//!
//! Stops on SIGINT or SIGTERM.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use meshd::testing::fake_apiserver::{FakeApiServer, FakeConfig};

#[derive(Parser, Debug)]
#[command(about = "A fake Kubernetes API server for tests")]
struct Args {
    /// Address to listen on (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: SocketAddr,
    /// Cluster name used in kubeconfigs.
    #[arg(long, default_value = "cluster1")]
    cluster_name: String,
    /// Where to write kubeconfig-admin.yaml, ca.pem, admin-token and url.
    #[arg(long)]
    state_dir: PathBuf,
    /// Admin bearer token (random when not given).
    #[arg(long)]
    admin_token: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let args = Args::parse();
    let mut cfg = FakeConfig::new(args.bind, &args.cluster_name);
    cfg.admin_token = args.admin_token;
    let server = FakeApiServer::start(cfg).await.context("starting the fake apiserver")?;

    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let write = |name: &str, body: &str| {
        let path = args.state_dir.join(name);
        std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))
    };
    write("kubeconfig-admin.yaml", &server.kubeconfig(server.admin_token()))?;
    write("ca.pem", server.ca_pem())?;
    write("admin-token", server.admin_token())?;
    write("url", &server.url())?;
    eprintln!(
        "fake-apiserver listening url={} cluster={} state-dir={}",
        server.url(),
        args.cluster_name,
        args.state_dir.display()
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let mut server = server;
    server.stop().await;
    Ok(())
}
