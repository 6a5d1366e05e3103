//! A fake Kubernetes API server for tests: the real REST/JSON wire protocol over real HTTPS,
//! driven by the unmodified `kube` client (typed `Api`, `kube_runtime` watchers/reflectors).
//!
//! It keeps generic JSON objects (any `/apis/<group>/<version>/...` works, built-in types get
//! their real kind and scope), one global resourceVersion, an event log for watch replay with
//! 410 Gone after compaction, label/field selectors, consistent `limit`/`continue` pagination,
//! bearer-token authentication with RBAC-like grants, service-account JWTs it signs itself
//! (TokenRequest, TokenReview, legacy token Secrets), SubjectAccessReview, and switchable
//! faults (down, latency, injected 5xx/429, dropped watches) with request counters.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use meshd::testing::fake_apiserver::{FakeApiServer, FakeConfig};
//! let server = FakeApiServer::start(FakeConfig::new("127.0.0.2:0".parse()?, "cluster2")).await?;
//! let client = server.client(server.admin_token()).await?;
//! let reader = server.reader_token("istio-reader-service-account")?;
//! std::fs::write("kubeconfig", server.kubeconfig(&reader))?;
//! # Ok(()) }
//! ```
//!
//! Differences from kube-apiserver are listed on [`FakeApiServer`].

mod admission;
mod authn;
mod control;
mod controllers;
mod discovery;
mod error;
mod faults;
mod http;
mod kubeconfig;
mod patch;
mod path;
mod pki;
mod rbac;
mod resources;
mod rest;
mod reviews;
mod router;
mod selector;
mod server;
mod state;
mod store;
mod tokens;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;

pub use self::error::ApiError;
pub use self::faults::TokenReviewRecord;
pub use self::rbac::{Rule, UserInfo, istio_reader_rules};
pub use self::resources::ResourceType;
use self::router::Router;
use self::server::Listener;
pub use self::state::{DEFAULT_ISSUER, FakeConfig, FakeState, MintOptions};

/// Why the fake could not do something.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("generating keys or certificates: {0}")]
    Crypto(String),
    #[error("invalid object: {0}")]
    BadObject(String),
    #[error("{0}")]
    Api(Box<ApiError>),
    #[error("building a kube client: {0}")]
    Client(String),
}

/// A running fake API server. Dereferences to its [`FakeState`] for objects, tokens, grants,
/// faults and counters.
///
/// Known differences from kube-apiserver:
/// - no admission webhooks, field validation against schemas, defaulting beyond Secrets'
///   `stringData`, Service cluster IPs and Namespace phase; managedFields are not kept;
/// - strategic merge patch and server-side apply are JSON merge patches (lists are replaced);
/// - deletion is immediate (no finalizers, no graceful pod deletion); deleting a Namespace
///   deletes its contents at once; DELETE answers with a Success Status (Services: the object);
/// - a request without a bearer token gets 401 (as with `--anonymous-auth=false`), except
///   `/version`, `/healthz`, `/livez`, `/readyz`;
/// - `resourceVersion` on list requests is ignored (lists are always current) except through
///   `continue`; a watch from a resourceVersion newer than the store's simply waits;
/// - pod-bound tokens are only checked against Pods with `strict_pod_binding`; TokenReview
///   results are not cached;
/// - authorization is a flat list of rules per user or group, not Role/Binding objects.
pub struct FakeApiServer {
    state: FakeState,
    addr: SocketAddr,
    listener: Option<Arc<Listener>>,
    controller: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .field("state", &self.state)
            .finish()
    }
}

impl std::ops::Deref for FakeApiServer {
    type Target = FakeState;

    // The server is a handle over its state; one set of methods serves both.
    fn deref(&self) -> &FakeState {
        &self.state
    }
}

impl FakeApiServer {
    /// Starts a server with fresh state (new CA, signing key, store).
    pub async fn start(config: FakeConfig) -> Result<Self, FakeError> {
        let bind = config.bind;
        let state = FakeState::new(config)?;
        Self::start_with_state(state, bind).await
    }

    /// Starts a server over existing state (e.g. one saved from a stopped server), on `bind`.
    pub async fn start_with_state(state: FakeState, bind: SocketAddr) -> Result<Self, FakeError> {
        let (listener, controller) = launch(&state, bind)?;
        Ok(Self {
            addr: listener.addr(),
            state,
            listener: Some(listener),
            controller: Some(controller),
        })
    }

    /// `https://<ip>:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle on the state (survives `stop()`; give it to `start_with_state`).
    pub fn state(&self) -> FakeState {
        self.state.clone()
    }

    /// A kubeconfig for this server and `token`, as `istioctl create-remote-secret` writes it.
    pub fn kubeconfig(&self, token: &str) -> String {
        kubeconfig::render(
            &self.state.config().cluster_name,
            &self.url(),
            self.state.ca_pem(),
            token,
        )
    }

    /// An unmodified `kube::Client` built from [`Self::kubeconfig`].
    pub async fn client(&self, token: &str) -> Result<kube::Client, FakeError> {
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig(token))
            .map_err(|e| FakeError::Client(e.to_string()))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| FakeError::Client(e.to_string()))?;
        kube::Client::try_from(cfg).map_err(|e| FakeError::Client(e.to_string()))
    }

    /// Down: the port refuses connections and every open one (watches included) is dropped.
    /// Up: listening again on the same address.
    pub async fn set_down(&self, down: bool) -> Result<(), FakeError> {
        let Some(l) = &self.listener else { return Ok(()) };
        if down {
            l.down().await;
            Ok(())
        } else {
            l.up()
        }
    }

    /// Whether the server is currently refusing connections (down or stopped).
    pub fn is_down(&self) -> bool {
        self.listener.as_ref().is_none_or(|l| !l.is_up())
    }

    /// Stops serving and the token controller; the state stays for [`Self::restart`].
    pub async fn stop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.abort();
        }
        if let Some(l) = self.listener.take() {
            l.down().await;
        }
    }

    /// Stops (if running) and starts again on the same address with the same CA, signing key
    /// and store.
    pub async fn restart(&mut self) -> Result<(), FakeError> {
        self.stop().await;
        let (listener, controller) = launch(&self.state, self.addr)?;
        self.listener = Some(listener);
        self.controller = Some(controller);
        Ok(())
    }
}

/// Binds the listener and starts the token controller.
fn launch(state: &FakeState, bind: SocketAddr) -> Result<(Arc<Listener>, JoinHandle<()>), FakeError> {
    let core = state.0.clone();
    let listener = Listener::start(
        bind,
        |addr| core.ca.server_config(addr.ip()),
        |addr, weak| Router {
            core: core.clone(),
            addr,
            listener: weak,
        },
    )?;
    let controller = controllers::spawn_token_controller(core);
    tracing::info!(addr = %listener.addr(), cluster = %state.config().cluster_name, "fake apiserver listening");
    Ok((listener, controller))
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.abort();
        }
        if let Some(l) = self.listener.take() {
            l.shutdown_now();
        }
    }
}
