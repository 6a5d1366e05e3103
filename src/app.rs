//! Wiring: build everything from [`ServeArgs`], bind the listeners, run until shut down.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::TcpListenerStream;

use crate::admin::{Readiness, Registry, http};
use crate::auth::cache::{CacheConfig, ReviewCache};
use crate::auth::client_cert::ClientCertAuthenticator;
use crate::auth::issuer::LocalIssuer;
use crate::auth::jwt::{JwtAuthenticator, JwtRule};
use crate::auth::kube_jwt::{KubeJwtAuthenticator, KubeJwtConfig, kube_reviewers};
use crate::auth::{AuthChain, Authenticator};
use crate::ca::service::{CaMetrics, CaService, PlaintextCaRefusal};
use crate::ca::{CaSigner, CaStore, TtlPolicy, kube_secret, material};
use crate::clock::{SharedClock, SystemClock};
use crate::cluster::kubeconfig::AllowedOptions;
use crate::cluster::secrets::{self, RemoteConfigs};
use crate::cluster::{ClusterRegistry, files};
use crate::config::{LocalIssuerMode, ServeArgs};
use crate::limits::first_bytes::{FirstBytesDeadline, H2_PREFACE_LEN};
use crate::limits::streams::StreamLimitLayer;
use crate::pki::keys::KeyType;
use crate::proto::CA_SERVICE_NAME;
use crate::proto::istio_ca::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::registry::MeshStore;
use crate::tls::{self, acceptor, client_verifier::MeshClientVerifier, serving};
use crate::xds::{XdsServer, push};

/// Where each listener ended up (port 0 picks a free one).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub grpc: SocketAddr,
    pub plaintext: SocketAddr,
    pub monitoring: SocketAddr,
    pub ready: SocketAddr,
    /// HTTPS webhooks (`/inject`, `/validate`; istiod's 15017).
    pub webhook: SocketAddr,
}

/// A running meshd.
pub struct Meshd {
    pub addrs: BoundAddrs,
    /// The service model every source writes into.
    pub mesh: Arc<MeshStore>,
    pub xds: XdsServer,
    pub clusters: Arc<ClusterRegistry>,
    pub data_dir: PathBuf,
    pub registry: Arc<Registry>,
    pub readiness: Arc<Readiness>,
    pub ca: Arc<CaStore>,
    shutdown: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    shutdown_duration: Duration,
}

impl Meshd {
    /// Path of the mesh root bundle clients trust.
    pub fn root_cert_path(&self) -> PathBuf {
        self.data_dir.join("root-cert.pem")
    }

    /// Stops accepting, sends GOAWAY, ends the ADS streams (their proxies reconnect to another
    /// replica), lets open unary calls finish for up to `--shutdown-duration`, then stops.
    pub async fn shutdown(mut self) {
        self.readiness.set("grpc", false);
        let _ = self.shutdown.send(true);
        self.xds.close_streams();
        let deadline = tokio::time::Instant::now() + self.shutdown_duration;
        for s in self.servers.drain(..) {
            let abort = s.abort_handle();
            if tokio::time::timeout_at(deadline, s).await.is_err() {
                abort.abort();
            }
        }
        for b in self.background.drain(..) {
            b.abort();
        }
    }

    /// Runs until SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        wait_for_signal().await?;
        tracing::info!("shutdown signal received; draining");
        self.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Marks `xds` ready once every other component is and the push context proxies are served has
/// caught up with the service model as it stood then. The first push trails the sources by the
/// debounce, so without this a proxy (re)connecting to a replica that just turned ready, e.g. after
/// a restart, could be sent an empty or half-built mesh and drop its clusters.
fn spawn_xds_readiness(readiness: Arc<Readiness>, mesh: Arc<MeshStore>, xds: XdsServer) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut want = None;
        loop {
            if want.is_none() && readiness.pending().iter().all(|c| c == "xds") {
                want = Some(mesh.snapshot().version);
            }
            if let Some(v) = want
                && xds.current().snapshot.version >= v
            {
                readiness.set("xds", true);
                xds.set_ready();
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[cfg(unix)]
async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

#[cfg(not(unix))]
async fn wait_for_signal() -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await?;
    Ok(())
}

async fn bind(addr: SocketAddr, name: &'static str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {name} listener on {addr}"))?;
    let local = l.local_addr()?;
    // One line per listener, stable for scripts: `listening listener=<name> addr=<ip:port>`.
    tracing::info!(listener = %name, addr = %local, "listening");
    Ok((l, local))
}

struct AuthDeps<'a> {
    args: &'a ServeArgs,
    clock: &'a SharedClock,
    registry: &'a Arc<Registry>,
    clusters: &'a Arc<ClusterRegistry>,
    kube_auth: bool,
}

/// The authenticator chain, and the background tasks it needs (JWKS refreshers).
fn build_auth(d: AuthDeps<'_>) -> anyhow::Result<(AuthChain, Vec<JoinHandle<()>>)> {
    let mut tasks = Vec::new();
    let args = d.args;
    let cache = Arc::new(ReviewCache::new(
        CacheConfig {
            positive_ttl: args.token_review_cache_ttl,
            negative_ttl: args.token_review_negative_cache_ttl,
            max_entries: args.token_review_cache_size,
        },
        Arc::clone(d.clock),
    ));
    let mut chain: Vec<Arc<dyn Authenticator>> = vec![Arc::new(ClientCertAuthenticator)];
    let local_issuer = match args.local_issuer {
        LocalIssuerMode::Enabled => true,
        LocalIssuerMode::Disabled => false,
        // Standalone only: with remote clusters (--remote-kubeconfig-dir) the callers are their
        // workloads, whose tokens their clusters review; data-dir tokens would be a side door.
        LocalIssuerMode::Auto => d.clusters.local().is_none() && args.remote_kubeconfig_dir.is_none(),
    };
    if local_issuer {
        let issuer = LocalIssuer::load_or_create(&args.data_dir).context("loading the standalone token issuer")?;
        chain.push(Arc::new(JwtAuthenticator::new(
            issuer.rule(&args.token_audiences),
            &args.trust_domain,
            Arc::clone(d.clock),
            Arc::clone(&cache),
            d.registry,
        )));
    }
    if let Some(rule) = &args.jwt_rule {
        for r in JwtRule::parse_env(rule, &args.token_audiences)? {
            tracing::info!(issuer = %r.issuer, audiences = ?r.audiences, jwks_uri = ?r.jwks_url, "trusting external JWT issuer");
            let a = JwtAuthenticator::new(
                r,
                &args.trust_domain,
                Arc::clone(d.clock),
                Arc::clone(&cache),
                d.registry,
            );
            tasks.extend(a.spawn_jwks_refresh());
            chain.push(Arc::new(a));
        }
    }
    if d.kube_auth {
        chain.push(Arc::new(KubeJwtAuthenticator::new(
            Arc::clone(d.clusters),
            KubeJwtConfig {
                trust_domain: args.trust_domain.clone(),
                audiences: args.token_audiences.clone(),
                timeout: args.token_review_timeout,
            },
            cache,
            kube_reviewers(),
            Arc::clone(d.registry),
        )));
    }
    Ok((AuthChain::new(chain), tasks))
}

/// The local cluster's config: `--kubeconfig`, else in-cluster config inside a pod, else none.
async fn local_kube_config(args: &ServeArgs) -> anyhow::Result<Option<kube::Config>> {
    if args.standalone {
        return Ok(None);
    }
    if let Some(path) = &args.kubeconfig {
        let kc = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .with_context(|| format!("using kubeconfig {}", path.display()))?;
        return Ok(Some(config));
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return Ok(Some(
            kube::Config::incluster().context("reading the in-cluster Kubernetes config")?,
        ));
    }
    Ok(None)
}

/// Request headers per gRPC call (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE).
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// The gRPC server settings both ports share: connection age (moves long-lived xDS streams
/// between replicas) and keepalive, as istiod's chart sets them.
fn grpc_server(args: &ServeArgs) -> tonic::transport::Server {
    let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
    let mut b = tonic::transport::Server::builder()
        // Room for long bearer tokens and metadata; larger header blocks are refused by HTTP/2
        // itself (431) before any handler runs.
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .http2_keepalive_interval(nonzero(args.grpc_keepalive_interval))
        .http2_keepalive_timeout(nonzero(args.grpc_keepalive_timeout));
    if let Some(age) = nonzero(args.max_connection_age) {
        b = b
            .max_connection_age(age)
            .max_connection_age_grace(args.max_connection_age_grace);
    }
    b
}

/// Readiness of remote clusters: listed, and each answered, failed or timed out.
fn spawn_remote_readiness(
    readiness: Arc<Readiness>,
    clusters: Arc<ClusterRegistry>,
    mut listed: Vec<watch::Receiver<bool>>,
    timeout: Duration,
) -> JoinHandle<()> {
    readiness.register("remote-clusters");
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        for l in &mut listed {
            let _ = tokio::time::timeout_at(start + timeout, l.wait_for(|v| *v)).await;
        }
        loop {
            if clusters.remotes_settled(timeout) || start.elapsed() >= timeout {
                readiness.set("remote-clusters", true);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Builds and starts meshd. Returns once every listener is bound and serving.
pub async fn start(args: ServeArgs) -> anyhow::Result<Meshd> {
    tls::provider();
    let clock: SharedClock = Arc::new(SystemClock);
    crate::fsutil::create_private_dir(&args.data_dir)
        .with_context(|| format!("creating data dir {}", args.data_dir.display()))?;
    let registry = Registry::new();
    let readiness = Readiness::new();
    readiness.register("grpc");

    let local_config = local_kube_config(&args).await?;
    let local_review_client = local_config
        .as_ref()
        .map(crate::cluster::kubeconfig::review_client)
        .transpose()?;
    let local_client = local_config.map(kube::Client::try_from).transpose()?;
    // An empty --ca-dir (the optional cacerts volume without a Secret) means the self-signed CA,
    // as in istiod; a directory with only some of the files is still an error.
    let ca_dir = args.ca_dir.as_ref().filter(|dir| {
        let present = material::plugged_present(dir);
        if !present {
            tracing::info!(dir = %dir.display(), "--ca-dir holds no CA key (ca-key.pem or tls.key): using the self-signed CA, as istiod does");
        }
        present
    });
    let material = match (ca_dir, &local_client) {
        (Some(dir), _) => material::load_plugged(dir)?,
        (None, Some(client)) => {
            kube_secret::load_or_create(
                client.clone(),
                &args.system_namespace,
                &args.trust_domain,
                args.ca_key_type,
                clock.now(),
            )
            .await?
        }
        (None, None) => {
            material::load_or_create_self_signed(&args.data_dir, &args.trust_domain, args.ca_key_type, clock.now())?
        }
    };
    tracing::info!(source = ?material.source, key = material.key_algorithm, "mesh CA loaded");
    let store = CaStore::new(material, Some(args.data_dir.join("root-cert.pem"))).context("writing root-cert.pem")?;
    let mut background = Vec::new();
    if let Some(dir) = ca_dir {
        background.push(store.spawn_plugged_watcher(dir.clone(), args.ca_reload_interval));
    }

    let clusters = ClusterRegistry::new(
        &args.cluster_id,
        args.cluster_aliases.iter().cloned().collect(),
        local_client.clone().zip(local_review_client),
        args.max_concurrent_token_reviews,
        &registry,
    );
    let remote_configs = RemoteConfigs::new(
        Arc::clone(&clusters),
        AllowedOptions::new(args.insecure_kubeconfig_options.iter().cloned()),
        Duration::from_secs(295),
        &registry,
    );
    let mut listed = Vec::new();
    if let Some(client) = &local_client {
        let (tx, rx) = watch::channel(false);
        listed.push(rx);
        background.push(secrets::spawn_secret_watcher(
            Arc::clone(&remote_configs),
            client.clone(),
            args.system_namespace.clone(),
            tx,
        ));
    }
    if let Some(dir) = &args.remote_kubeconfig_dir {
        let (tx, rx) = watch::channel(false);
        listed.push(rx);
        background.push(files::spawn_dir_watcher(
            Arc::clone(&remote_configs),
            dir.clone(),
            args.remote_kubeconfig_poll,
            tx,
        ));
    }
    let kube_auth = local_client.is_some() || args.remote_kubeconfig_dir.is_some();
    if !listed.is_empty() {
        background.push(spawn_remote_readiness(
            Arc::clone(&readiness),
            Arc::clone(&clusters),
            listed,
            args.remote_cluster_timeout,
        ));
    }

    let (auth, auth_tasks) = build_auth(AuthDeps {
        args: &args,
        clock: &clock,
        registry: &registry,
        clusters: &clusters,
        kube_auth,
    })?;
    let auth = Arc::new(auth);
    background.extend(auth_tasks);
    let signer = Arc::new(CaSigner::new(
        Arc::clone(&store),
        Arc::clone(&clock),
        TtlPolicy {
            default_ttl: args.default_workload_cert_ttl,
            max_ttl: args.max_workload_cert_ttl,
        },
    ));
    let ca_metrics = CaMetrics::register(&registry);

    let mesh = MeshStore::new();
    let mesh_config = crate::meshconfig::MeshConfigSink::new(Arc::clone(&mesh), &registry);
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let push_throttle = if args.push_throttle == 0 {
        (15 + 5 * cpus).min(100)
    } else {
        args.push_throttle
    };
    let xds = XdsServer::new(
        mesh.snapshot(),
        Arc::clone(&auth),
        &registry,
        crate::xds::server::XdsSettings {
            push_throttle,
            max_recv_message_bytes: args.max_recv_message_size,
            // istiod's default: min(15 + 5 × CPUs, 100) new streams per second.
            new_streams_per_second: args
                .max_requests_per_second
                .unwrap_or_else(|| (15.0 + 5.0 * cpus as f64).min(100.0)),
            send_queue: args.xds_send_queue,
            send_timeout: (!args.xds_send_timeout.is_zero()).then_some(args.xds_send_timeout),
        },
    );
    xds.hold_until_ready();
    // Gateway credentials (SDS `kubernetes://<credentialName>`): Secrets of every registered
    // cluster, each gateway reading its own cluster and namespace.
    xds.set_secret_source(crate::xds::generators::router::KubeSecrets::install(
        &clusters,
        Arc::clone(&mesh),
    ));
    background.push(push::spawn_debouncer(
        Arc::clone(&mesh),
        Arc::new(xds.clone()),
        push::Debounce {
            after: args.debounce_after,
            max: args.debounce_max,
        },
    ));
    // --- service registry sources (src/registry): --config-dir files, else Kubernetes
    // discovery in every registered cluster plus Istio config from the primary. ---
    {
        // `--network` names the primary's endpoints that no label or meshNetworks names.
        mesh.set_default_network(&args.cluster_id, &args.network);
        match &args.mesh_config {
            Some(path) => background.push(crate::meshconfig::file::spawn(
                path.clone(),
                Arc::clone(&mesh_config),
                args.config_dir_poll,
            )),
            None => {
                if let Some(client) = &local_client {
                    background.push(crate::meshconfig::kube::spawn(
                        client.clone(),
                        &args.system_namespace,
                        Arc::clone(&mesh_config),
                    ));
                }
            }
        }
        match crate::registry::gateway_dns::SystemResolver::new() {
            Ok(r) => background.push(crate::registry::gateway_dns::spawn(
                Arc::clone(&mesh),
                Arc::new(r),
                &registry,
            )),
            Err(e) => {
                tracing::warn!(error = %e, "no system DNS configuration: network gateways given by hostname stay unresolved")
            }
        }
        let settings = crate::registry::kube_source::RegistrySettings {
            trust_domain: args.trust_domain.clone(),
            system_namespace: args.system_namespace.clone(),
        };
        if let Some(dir) = &args.config_dir {
            anyhow::ensure!(dir.is_dir(), "--config-dir {}: not a directory", dir.display());
            if local_client.is_some() || args.remote_kubeconfig_dir.is_some() {
                tracing::info!(dir = %dir.display(), "--config-dir is the service registry; Kubernetes clusters are used for authentication only");
            }
            let source = crate::registry::file_source::FileSource::new(
                dir.clone(),
                &args.cluster_id,
                settings,
                Arc::clone(&mesh),
            );
            background.push(source.spawn(args.config_dir_poll));
        } else {
            let kube = crate::registry::kube_source::KubeRegistry::new(
                Arc::clone(&mesh),
                settings,
                Some(Arc::clone(&readiness)),
            );
            clusters.add_handler(kube as Arc<dyn crate::cluster::ClusterHandler>);
        }
    }
    // --- end service registry sources ---

    // Serving certificate and client-certificate verification, both following the CA.
    let serving_cfg = serving::ServingCertConfig {
        sans: serving::ServingCertConfig::istiod_names(&args.system_namespace, &args.server_sans),
        key_type: KeyType::EcdsaP256,
        ttl: args.serving_cert_ttl,
    };
    let first = serving::issue(&store, &serving_cfg, clock.now())?;
    let resolver = serving::ServingCertResolver::new(Arc::clone(&first.certified));
    let verifier = MeshClientVerifier::new(&store.load().roots_der)?;
    {
        let (verifier, store2) = (Arc::clone(&verifier), Arc::clone(&store));
        background.push(serving::spawn_rotation(
            Arc::clone(&store),
            Arc::clone(&resolver),
            serving_cfg,
            Arc::clone(&clock),
            first,
            Arc::new(move || {
                if let Err(e) = verifier.set_roots(&store2.load().roots_der) {
                    tracing::error!(error = %e, "updating client-certificate roots");
                }
            }),
        ));
    }

    let (grpc_l, grpc_addr) = bind(args.grpc_addr, "grpc-tls").await?;
    let (plain_l, plaintext_addr) = bind(args.plaintext_addr, "grpc-plaintext").await?;
    let (mon_l, monitoring_addr) = bind(args.monitoring_addr, "monitoring").await?;
    let (ready_l, ready_addr) = bind(args.ready_addr, "ready").await?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let signal = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut servers = Vec::new();
    // --- webhooks (src/webhook): /inject and /validate over HTTPS with the serving certificate;
    // the caBundle patcher runs as a job of the root-cert leader below. ---
    let (webhook_addr, leader_jobs) = {
        let (l, addr) = bind(args.webhook_addr, "webhook").await?;
        servers.push(crate::webhook::spawn(
            l,
            Arc::clone(&resolver),
            &args,
            &registry,
            Arc::clone(&readiness),
            shutdown_rx.clone(),
        )?);
        (
            addr,
            crate::webhook::cabundle::leader_jobs(&args, Arc::clone(&store), &registry),
        )
    };
    // --- end webhooks ---
    // --- root-cert distribution (src/rootcert): istio-ca-root-cert in the local cluster and in
    // remote clusters that name this one in topology.istio.io/controlPlaneClusters. Started once
    // the listeners are bound; on shutdown it stops writing and releases held leases. ---
    if args.root_cert_configmaps || !leader_jobs.is_empty() {
        let d = crate::rootcert::RootCertDistributor::with_jobs(
            crate::rootcert::RootCertConfig::from_args(&args),
            Arc::clone(&store),
            &registry,
            args.root_cert_configmaps,
            leader_jobs,
        );
        clusters.add_handler(Arc::clone(&d) as Arc<dyn crate::cluster::ClusterHandler>);
        servers.push(d.spawn_stop_on(shutdown_rx.clone()));
    }
    // --- end root-cert distribution ---

    let handshake_errors = registry.counter_vec(
        "meshd_tls_handshake_errors",
        "Failed TLS handshakes",
        &["listener", "reason"],
    );
    let accept_metrics = acceptor::AcceptMetrics {
        handshakes: registry
            .counter_vec("meshd_tls_handshakes", "Completed TLS handshakes", &["listener"])
            .with(&["grpc-tls"]),
        handshake_failures: handshake_errors.with(&["grpc-tls", "error"]),
        handshake_timeouts: handshake_errors.with(&["grpc-tls", "timeout"]),
    };
    let tls_config = Arc::new(tls::grpc_server_config(Arc::clone(&resolver), Arc::clone(&verifier))?);
    let limit_metrics = crate::limits::LimitMetrics::register(&registry);
    let preface_timeouts = limit_metrics.counter("http2_preface_timeout");
    let stream_limit = StreamLimitLayer::new(
        args.max_streams_per_connection,
        limit_metrics.counter("streams_per_connection"),
    );
    let incoming = {
        let (preface, slow) = (args.http2_preface_timeout, Arc::clone(&preface_timeouts));
        acceptor::incoming(
            grpc_l,
            tls_config,
            args.tls_handshake_timeout,
            accept_metrics,
            "grpc-tls",
        )
        .map(move |r| r.map(|tls| FirstBytesDeadline::new(tls, H2_PREFACE_LEN, preface, Arc::clone(&slow))))
    };
    {
        let (reflect_v1, reflect_v1alpha) = crate::grpc::reflection()?;
        let (_reporter, health) = crate::grpc::health(&[CA_SERVICE_NAME]).await;
        let ca = IstioCertificateServiceServer::new(CaService::new(Arc::clone(&auth), signer, ca_metrics.clone()))
            .max_decoding_message_size(args.max_recv_message_size);
        let router = grpc_server(&args)
            .layer(stream_limit.clone())
            .layer(crate::grpc::OversizeStatusLayer)
            .add_service(ca)
            .add_service(xds.service(true))
            .add_service(health)
            .add_service(reflect_v1)
            .add_service(reflect_v1alpha);
        let rx = shutdown_rx.clone();
        servers.push(tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal(rx)).await {
                tracing::error!(listener = "grpc-tls", error = %e, "gRPC server stopped");
            }
        }));
    }
    {
        let (reflect_v1, reflect_v1alpha) = crate::grpc::reflection()?;
        let (_reporter, health) = crate::grpc::health(&[CA_SERVICE_NAME]).await;
        let ca = IstioCertificateServiceServer::new(PlaintextCaRefusal::new(ca_metrics))
            .max_decoding_message_size(args.max_recv_message_size);
        let router = grpc_server(&args)
            .layer(stream_limit.clone())
            .layer(crate::grpc::OversizeStatusLayer)
            .add_service(ca)
            .add_service(xds.service(false))
            .add_service(health)
            .add_service(reflect_v1)
            .add_service(reflect_v1alpha);
        let rx = shutdown_rx.clone();
        // Small gRPC frames must not wait for Nagle + delayed ACK (tens of ms at p99).
        let (preface, slow) = (args.http2_preface_timeout, Arc::clone(&preface_timeouts));
        let incoming = TcpListenerStream::new(plain_l).map(move |r| {
            r.map(|tcp| {
                let _ = tcp.set_nodelay(true);
                FirstBytesDeadline::new(tcp, H2_PREFACE_LEN, preface, Arc::clone(&slow))
            })
        });
        servers.push(tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, signal(rx)).await {
                tracing::error!(listener = "grpc-plaintext", error = %e, "gRPC server stopped");
            }
        }));
    }
    servers.push(tokio::spawn(http::serve(
        mon_l,
        http::monitoring_handler(
            Arc::clone(&registry),
            Arc::clone(&readiness),
            Arc::new(
                http::DebugSources {
                    clusters: Some(Arc::clone(&clusters)),
                    mesh: Some(Arc::clone(&mesh)),
                    mesh_config: Some(Arc::clone(&mesh_config)),
                    xds: Some(xds.clone()),
                    auth: Some(Arc::clone(&auth)),
                    system_namespace: args.system_namespace.clone(),
                    denied: None,
                }
                .with_denied_metric(&registry),
            ),
        ),
        shutdown_rx.clone(),
    )));
    servers.push(tokio::spawn(http::serve(
        ready_l,
        http::ready_handler(Arc::clone(&readiness)),
        shutdown_rx,
    )));
    readiness.register("xds");
    readiness.set("grpc", true);
    background.push(spawn_xds_readiness(
        Arc::clone(&readiness),
        Arc::clone(&mesh),
        xds.clone(),
    ));

    Ok(Meshd {
        addrs: BoundAddrs {
            grpc: grpc_addr,
            plaintext: plaintext_addr,
            monitoring: monitoring_addr,
            ready: ready_addr,
            webhook: webhook_addr,
        },
        data_dir: args.data_dir,
        mesh,
        xds,
        clusters,
        registry,
        readiness,
        ca: store,
        shutdown: shutdown_tx,
        servers,
        background,
        shutdown_duration: args.shutdown_duration,
    })
}
