//! TLS accept loop feeding tonic: each handshake runs in its own task with a deadline, so a
//! client that opens TCP and never speaks TLS cannot hold up anyone else.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::admin::metrics::Counter;

/// Handshakes that failed or timed out, by reason (for `/metrics`).
#[derive(Clone)]
pub struct AcceptMetrics {
    pub handshakes: Arc<Counter>,
    pub handshake_failures: Arc<Counter>,
    pub handshake_timeouts: Arc<Counter>,
}

/// Accepts TCP connections on `listener`, completes TLS and yields the streams.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    metrics: AcceptMetrics,
    listener_name: &'static str,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = listener_name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
            tokio::spawn(async move {
                handshake(acceptor, tcp, peer, handshake_timeout, tx, metrics, listener_name).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
    tx: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
    metrics: AcceptMetrics,
    listener_name: &'static str,
) {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            metrics.handshakes.inc();
            let _ = tx.send(Ok(tls)).await;
        }
        Ok(Err(e)) => {
            metrics.handshake_failures.inc();
            tracing::debug!(listener = listener_name, %peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            metrics.handshake_timeouts.inc();
            tracing::debug!(listener = listener_name, %peer, "TLS handshake timed out");
        }
    }
}
