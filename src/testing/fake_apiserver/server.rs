//! The HTTPS listener: TLS (h2 and http/1.1 by ALPN) with each connection in its own task, and
//! the "down" switch that closes the listening socket (new connections are refused) and kills
//! every open connection, watches included.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::FakeError;
use super::router::Router;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `down()` waits for killed connections to finish closing.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Listener {
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    router: Arc<Router>,
    accept: Mutex<Option<JoinHandle<()>>>,
    /// Bumped to kill every open connection.
    kill: watch::Sender<u64>,
    /// Open connections (`down()` waits for zero).
    open: watch::Sender<usize>,
}

/// Counts a connection while it lives.
struct OpenGuard(watch::Sender<usize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Listener {
    /// Binds `bind` and starts accepting. `make_router` gets the bound address.
    pub fn start(
        bind: SocketAddr,
        tls_for: impl FnOnce(SocketAddr) -> Result<Arc<rustls::ServerConfig>, FakeError>,
        make_router: impl FnOnce(SocketAddr, Weak<Listener>) -> Router,
    ) -> Result<Arc<Self>, FakeError> {
        let std_listener = std::net::TcpListener::bind(bind).map_err(|e| FakeError::Bind(bind, e))?;
        let addr = std_listener.local_addr().map_err(|e| FakeError::Bind(bind, e))?;
        let tls = tls_for(addr)?;
        let me = Arc::new_cyclic(|weak| Listener {
            addr,
            tls,
            router: Arc::new(make_router(addr, weak.clone())),
            accept: Mutex::new(None),
            kill: watch::channel(0).0,
            open: watch::channel(0).0,
        });
        me.accept_on(std_listener)?;
        Ok(me)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn is_up(&self) -> bool {
        self.accept.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn accept_on(self: &Arc<Self>, l: std::net::TcpListener) -> Result<(), FakeError> {
        l.set_nonblocking(true).map_err(|e| FakeError::Bind(self.addr, e))?;
        let l = TcpListener::from_std(l).map_err(|e| FakeError::Bind(self.addr, e))?;
        let weak = Arc::downgrade(self);
        let task = tokio::spawn(accept_loop(l, weak));
        *self.accept.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(())
    }

    /// Listens again on the same address (a no-op while up).
    pub fn up(self: &Arc<Self>) -> Result<(), FakeError> {
        if self.is_up() {
            return Ok(());
        }
        let l = std::net::TcpListener::bind(self.addr).map_err(|e| FakeError::Bind(self.addr, e))?;
        self.accept_on(l)?;
        tracing::info!(addr = %self.addr, "fake apiserver up");
        Ok(())
    }

    /// Stops listening and kills every connection; returns once they are closed.
    pub async fn down(&self) {
        let task = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            task.abort();
            // The listening socket closes when the aborted task is dropped.
            let _ = task.await;
        }
        self.kill.send_modify(|k| *k += 1);
        let mut open = self.open.subscribe();
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, open.wait_for(|n| *n == 0)).await;
        tracing::info!(addr = %self.addr, "fake apiserver down");
    }

    /// What `Drop` can do without awaiting: stop accepting and kill connections.
    pub fn shutdown_now(&self) {
        if let Some(task) = self.accept.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
        self.kill.send_modify(|k| *k += 1);
    }

    fn serve(&self, tcp: TcpStream, peer: SocketAddr) {
        let acceptor = TlsAcceptor::from(self.tls.clone());
        let router = self.router.clone();
        let mut kill = self.kill.subscribe();
        self.open.send_modify(|n| *n += 1);
        let guard = OpenGuard(self.open.clone());
        tokio::spawn(async move {
            let _guard = guard;
            let serve = async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "fake apiserver: TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                let svc = hyper::service::service_fn(move |req| {
                    let router = router.clone();
                    async move { Ok::<_, Infallible>(router.handle(req).await) }
                });
                if let Err(e) = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await
                {
                    tracing::trace!(%peer, error = %e, "fake apiserver: connection ended");
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = kill.changed() => tracing::debug!(%peer, "fake apiserver: connection killed"),
            }
        });
    }
}

async fn accept_loop(listener: TcpListener, me: Weak<Listener>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "fake apiserver: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(me) = me.upgrade() else { return };
        let _ = tcp.set_nodelay(true);
        me.serve(tcp, peer);
    }
}
