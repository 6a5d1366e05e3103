//! Every knob, as clap flags with istiod's environment variable names where istiod has one.
//! Nothing else in meshd reads the environment.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::pki::keys::KeyType;

fn duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s)
}

#[derive(Debug, Parser)]
#[command(
    name = "meshd",
    version,
    about = "An Istio-compatible control plane (istiod) for primary-remote meshes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Print a service-account token from the standalone issuer in a data dir.
    Token(TokenArgs),
    /// Get a workload certificate from a running meshd, as istio-agent does.
    Cert(Box<crate::client::CertArgs>),
    /// Load tools (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Print a remote secret (istioctl's shape) giving meshd read access to a remote cluster.
    CreateRemoteSecret(Box<crate::remote_secret::CreateRemoteSecretArgs>),
    /// The proxies connected to meshd replicas and whether each has the config last sent
    /// (SYNCED / NOT SENT / STALE per xDS type), as `istioctl proxy-status`.
    ProxyStatus(crate::proxy_status::ProxyStatusArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LocalIssuerMode {
    Auto,
    Enabled,
    Disabled,
}

fn alias(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, r)) if !a.is_empty() && !r.is_empty() => Ok((a.to_string(), r.to_string())),
        _ => Err(format!("cluster alias {s:?} is not alias=real")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter: a level or per-module directives (e.g. `info,meshd::auth=debug`).
    #[arg(long, env = "MESHD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[arg(long, env = "MESHD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Where meshd keeps its self-signed root, issuer key and `root-cert.pem`.
    #[arg(long, env = "MESHD_DATA_DIR", default_value = "./meshd-data")]
    pub data_dir: PathBuf,
    /// TLS gRPC: CA, ADS, reflection, health (istiod's 15012).
    #[arg(long, env = "MESHD_GRPC_ADDR", default_value = "0.0.0.0:15012")]
    pub grpc_addr: SocketAddr,
    /// Plaintext gRPC: reflection, health; never the CA (istiod's 15010).
    #[arg(long, env = "MESHD_PLAINTEXT_ADDR", default_value = "0.0.0.0:15010")]
    pub plaintext_addr: SocketAddr,
    /// HTTP: /metrics, /version, /debug (istiod's 15014).
    #[arg(long, env = "MESHD_MONITORING_ADDR", default_value = "0.0.0.0:15014")]
    pub monitoring_addr: SocketAddr,
    /// HTTP: /ready (istiod's 8080).
    #[arg(long, env = "MESHD_READY_ADDR", default_value = "0.0.0.0:8080")]
    pub ready_addr: SocketAddr,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// Namespace meshd runs in; names the serving certificate's DNS SANs.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub system_namespace: String,
    /// Plugged-in CA (`cacerts`): ca-cert.pem, ca-key.pem, root-cert.pem [, cert-chain.pem], or tls.crt, tls.key, ca.crt.
    #[arg(long, env = "ROOT_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Key type of a newly created self-signed root.
    #[arg(long, env = "MESHD_CA_KEY_TYPE", default_value = "rsa-2048")]
    pub ca_key_type: KeyType,
    /// How often a plugged CA directory is checked for changes.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub ca_reload_interval: Duration,
    /// Extra serving-certificate SANs, comma separated; IP literals become IP SANs.
    #[arg(long = "server-san", env = "ISTIOD_CUSTOM_HOST", value_delimiter = ',')]
    pub server_sans: Vec<String>,
    /// Lifetime of the serving certificate; it is renewed at two thirds of it.
    #[arg(long, env = "MESHD_SERVING_CERT_TTL", default_value = "24h", value_parser = duration)]
    pub serving_cert_ttl: Duration,
    #[arg(long, env = "DEFAULT_WORKLOAD_CERT_TTL", default_value = "24h", value_parser = duration)]
    pub default_workload_cert_ttl: Duration,
    #[arg(long, env = "MAX_WORKLOAD_CERT_TTL", default_value = "90d", value_parser = duration)]
    pub max_workload_cert_ttl: Duration,
    /// Audiences a bearer token must carry, comma separated.
    #[arg(long, env = "TOKEN_AUDIENCES", value_delimiter = ',', default_value = "istio-ca")]
    pub token_audiences: Vec<String>,
    /// External JWT issuer(s): {"issuer", "jwks_uri" (file) or "jwks", "audiences"} or an array of them.
    #[arg(long, env = "JWT_RULE")]
    pub jwt_rule: Option<String>,
    /// Trust tokens from the data dir's standalone issuer (`meshd token`): `auto` does so only
    /// when meshd runs standalone, with no Kubernetes cluster at all (local or remote).
    #[arg(long, env = "MESHD_LOCAL_ISSUER", value_enum, default_value = "auto")]
    pub local_issuer: LocalIssuerMode,
    /// Kubeconfig of the primary (local) cluster. Without it meshd uses the in-cluster config when
    /// running in a pod, and otherwise runs standalone.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Never talk to a local Kubernetes API server, even inside a pod.
    #[arg(long)]
    pub standalone: bool,
    /// Other names of the local cluster, `alias=real,...` (istiod's --clusterAliases).
    #[arg(long, env = "CLUSTER_ALIASES", value_delimiter = ',', value_parser = alias)]
    pub cluster_aliases: Vec<(String, String)>,
    /// Directory of kubeconfig files, one per remote cluster, named by cluster id.
    #[arg(long, env = "PILOT_MULTICLUSTER_KUBECONFIG_PATH")]
    pub remote_kubeconfig_dir: Option<PathBuf>,
    /// How often --remote-kubeconfig-dir is rescanned.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub remote_kubeconfig_poll: Duration,
    /// Kubeconfig features a remote secret may use anyway (exec, gcp, azure, openstack,
    /// auth-provider, tokenFile, clientCertificate, clientKey, certificateAuthority).
    #[arg(long, env = "PILOT_INSECURE_MULTICLUSTER_KUBECONFIG_OPTIONS", value_delimiter = ',')]
    pub insecure_kubeconfig_options: Vec<String>,
    /// Readiness waits at most this long for remote clusters (PILOT_REMOTE_CLUSTER_TIMEOUT).
    #[arg(long, env = "PILOT_REMOTE_CLUSTER_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub remote_cluster_timeout: Duration,
    /// A TokenReview that takes longer fails the call with Unavailable naming the cluster.
    #[arg(long, env = "MESHD_TOKEN_REVIEW_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub token_review_timeout: Duration,
    /// TokenReviews in flight per cluster; more are refused with ResourceExhausted.
    #[arg(long, env = "MESHD_MAX_CONCURRENT_TOKEN_REVIEWS", default_value = "64")]
    pub max_concurrent_token_reviews: usize,
    /// How long a rejected token is remembered.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub token_review_negative_cache_ttl: Duration,
    /// Quiet time after a change before pushing (istiod's PILOT_DEBOUNCE_AFTER).
    #[arg(long, env = "PILOT_DEBOUNCE_AFTER", default_value = "100ms", value_parser = duration)]
    pub debounce_after: Duration,
    /// Longest a push waits for quiet (PILOT_DEBOUNCE_MAX).
    #[arg(long, env = "PILOT_DEBOUNCE_MAX", default_value = "10s", value_parser = duration)]
    pub debounce_max: Duration,
    /// Concurrent xDS resource generations (PILOT_PUSH_THROTTLE); 0 = min(15 + 5 × CPUs, 100).
    #[arg(long, env = "PILOT_PUSH_THROTTLE", default_value = "0")]
    pub push_throttle: usize,
    /// Entries kept in the token review cache.
    #[arg(long, default_value = "100000")]
    pub token_review_cache_size: usize,
    /// How long a verified token is trusted without re-verification (capped by its exp); 0
    /// remembers nothing, but identical reviews in flight at the same moment still share one call.
    #[arg(long, env = "MESHD_TOKEN_REVIEW_CACHE_TTL", default_value = "60s", value_parser = duration)]
    pub token_review_cache_ttl: Duration,
    /// Deadline for a TLS handshake on 15012.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub tls_handshake_timeout: Duration,
    /// Time given to open streams to finish after SIGTERM.
    #[arg(long, env = "MESHD_SHUTDOWN_DURATION", default_value = "10s", value_parser = duration)]
    pub shutdown_duration: Duration,
    /// Age after which a gRPC connection is sent GOAWAY so its proxies reconnect, spreading
    /// long-lived xDS streams across replicas (Istio's chart: 30m). 0 turns it off.
    #[arg(long, env = "MESHD_MAX_CONNECTION_AGE", default_value = "30m", value_parser = duration)]
    pub max_connection_age: Duration,
    /// How long a connection past its age may keep its streams before it is closed.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub max_connection_age_grace: Duration,
    /// Server HTTP/2 keepalive ping interval (istiod's GRPC_KEEPALIVE_INTERVAL); 0 turns it off.
    #[arg(long, env = "GRPC_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = duration)]
    pub grpc_keepalive_interval: Duration,
    /// A ping not answered within this closes the connection (GRPC_KEEPALIVE_TIMEOUT).
    #[arg(long, env = "GRPC_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub grpc_keepalive_timeout: Duration,
    // --- load limits (src/limits) ---
    /// gRPC messages larger than this are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "ISTIO_GPRC_MAXRECVMSGSIZE", default_value_t = 4 * 1024 * 1024)]
    pub max_recv_message_size: usize,
    /// Concurrent calls on one connection; the next is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "ISTIO_GPRC_MAXSTREAMS", default_value_t = 100_000)]
    pub max_streams_per_connection: usize,
    /// New xDS streams per second across the server (burst 1, a caller waits up to 1 s, then
    /// RESOURCE_EXHAUSTED). Default min(15 + 5 × CPUs, 100), as istiod; 0 turns it off.
    #[arg(long, env = "PILOT_MAX_REQUESTS_PER_SECOND")]
    pub max_requests_per_second: Option<f64>,
    /// Responses queued per xDS stream before pushes to it coalesce instead.
    #[arg(long, env = "MESHD_XDS_SEND_QUEUE", default_value_t = 4)]
    pub xds_send_queue: usize,
    /// A stream that does not take a response within this is closed with RESOURCE_EXHAUSTED
    /// (its proxy is not reading); 0 waits forever.
    #[arg(long, env = "PILOT_XDS_SEND_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub xds_send_timeout: Duration,
    /// A gRPC connection must send its HTTP/2 preface within this (after any TLS handshake).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub http2_preface_timeout: Duration,
    // --- end load limits ---
    // --- root-cert distribution (src/rootcert) ---
    /// Write ConfigMap istio-ca-root-cert into every namespace of the local cluster and of each
    /// remote cluster whose system namespace names this cluster in
    /// topology.istio.io/controlPlaneClusters.
    #[arg(long, env = "MESHD_ROOT_CERT_CONFIGMAPS", default_value_t = true, action = clap::ArgAction::Set)]
    pub root_cert_configmaps: bool,
    /// Base of this replica's identity in leader-election Leases (a random suffix is added);
    /// defaults to the host name.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// How long a leader-election Lease stays valid without renewal (whole seconds, at least 2s);
    /// the holder renews it a third of this before expiry.
    #[arg(long, env = "MESHD_LEADER_ELECTION_LEASE_DURATION", default_value = "30s", value_parser = duration)]
    pub leader_election_lease_duration: Duration,
    // --- end root-cert distribution ---
    // --- service registry (src/registry) ---
    /// Read services, endpoints and Istio config from this directory (`*.yaml`, `*.yml`,
    /// `*.json` Kubernetes objects) instead of Kubernetes; see examples/config-dir/.
    #[arg(long, env = "MESHD_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// How often --config-dir is checked for changes.
    #[arg(long, env = "MESHD_CONFIG_DIR_POLL", default_value = "1s", value_parser = duration)]
    pub config_dir_poll: Duration,
    /// Network of the primary's endpoints that neither a topology.istio.io/network label (on the
    /// pod, or on the cluster's system namespace) nor meshNetworks names.
    #[arg(long, env = "MESHD_NETWORK", default_value = "")]
    pub network: String,
    /// Mesh config file in the shape of the `istio` ConfigMap's data (keys `meshNetworks`,
    /// `mesh`), polled for changes; without it the `istio` ConfigMap of the primary's system
    /// namespace is watched.
    #[arg(long, env = "MESHD_MESH_CONFIG")]
    pub mesh_config: Option<PathBuf>,
    // --- end service registry ---
    // --- webhooks (src/webhook) ---
    /// HTTPS: /inject, /validate, /ready with the serving certificate (istiod's 15017, exposed by
    /// the Service as 443).
    #[arg(long, env = "MESHD_WEBHOOK_ADDR", default_value = "0.0.0.0:15017")]
    pub webhook_addr: SocketAddr,
    /// Image of the injected istio-proxy and istio-init containers (annotation
    /// sidecar.istio.io/proxyImage overrides it per pod).
    #[arg(long, env = "MESHD_PROXY_IMAGE", default_value = "docker.io/istio/proxyv2:1.28.0")]
    pub proxy_image: String,
    /// CPU request of the injected proxy (sidecar.istio.io/proxyCPU); empty sets none.
    #[arg(long, env = "MESHD_PROXY_CPU_REQUEST", default_value = "100m")]
    pub proxy_cpu_request: String,
    /// Memory request of the injected proxy (sidecar.istio.io/proxyMemory); empty sets none.
    #[arg(long, env = "MESHD_PROXY_MEMORY_REQUEST", default_value = "128Mi")]
    pub proxy_memory_request: String,
    /// CPU limit of the injected proxy (sidecar.istio.io/proxyCPULimit); empty sets none.
    #[arg(long, env = "MESHD_PROXY_CPU_LIMIT", default_value = "2000m")]
    pub proxy_cpu_limit: String,
    /// Memory limit of the injected proxy (sidecar.istio.io/proxyMemoryLimit); empty sets none.
    #[arg(long, env = "MESHD_PROXY_MEMORY_LIMIT", default_value = "1024Mi")]
    pub proxy_memory_limit: String,
    /// Inject istio-proxy as a native sidecar (an init container with restartPolicy Always);
    /// annotation sidecar.istio.io/nativeSidecar overrides it per pod.
    #[arg(long, env = "ENABLE_NATIVE_SIDECARS")]
    pub native_sidecars: bool,
    /// Where injected proxies reach meshd for xDS and certificates; default
    /// `istiod.<system namespace>.svc:15012`.
    #[arg(long, env = "MESHD_DISCOVERY_ADDRESS")]
    pub discovery_address: Option<String>,
    /// Kubernetes DNS domain of the clusters (the proxy's `--domain <ns>.svc.<suffix>`).
    #[arg(long, env = "DOMAIN_SUFFIX", default_value = "cluster.local")]
    pub domain_suffix: String,
    /// MutatingWebhookConfiguration whose caBundle meshd keeps equal to the mesh roots, in the
    /// primary and in every remote cluster it leads; empty turns the patching off.
    #[arg(
        long,
        env = "INJECTION_WEBHOOK_CONFIG_NAME",
        default_value = "istio-sidecar-injector"
    )]
    pub injection_webhook_config_name: String,
    /// ValidatingWebhookConfiguration patched the same way; empty turns it off.
    #[arg(
        long,
        env = "VALIDATION_WEBHOOK_CONFIG_NAME",
        default_value = "istio-validator-istio-system"
    )]
    pub validation_webhook_config_name: String,
    // --- end webhooks ---
    #[command(flatten)]
    pub log: LogArgs,
}

impl Default for ServeArgs {
    fn default() -> Self {
        // Parsing an empty command line yields exactly the documented defaults.
        let cli = ServeOnly::parse_from(["meshd"]);
        cli.args
    }
}

#[derive(Parser)]
struct ServeOnly {
    #[command(flatten)]
    args: ServeArgs,
}

impl ServeArgs {
    /// Defaults with every listener on an ephemeral loopback port: what tests start from.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!());
        Self {
            data_dir,
            grpc_addr: any,
            plaintext_addr: any,
            monitoring_addr: any,
            ready_addr: any,
            webhook_addr: any,
            ca_key_type: KeyType::EcdsaP256,
            standalone: true,
            // Tests stop servers with streams still open; do not wait the production 10 s.
            shutdown_duration: Duration::from_secs(1),
            // Tests open streams in bursts; the limiter has tests of its own.
            max_requests_per_second: Some(0.0),
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    #[arg(long, env = "MESHD_DATA_DIR", default_value = "./meshd-data")]
    pub data_dir: PathBuf,
    #[arg(long)]
    pub namespace: String,
    #[arg(long)]
    pub service_account: String,
    #[arg(long, value_delimiter = ',', default_value = "istio-ca")]
    pub audience: Vec<String>,
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub ttl: Duration,
}
