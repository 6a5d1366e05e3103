//! Slowloris guard for the gRPC ports: a connection must deliver its first bytes (the HTTP/2
//! preface) within a deadline or it is closed. TLS handshakes have their own deadline
//! (src/tls/acceptor.rs); this covers the plaintext port and the time after a handshake.
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

use crate::admin::metrics::Counter;

/// Length of the HTTP/2 client connection preface.
pub const H2_PREFACE_LEN: usize = 24;

pub struct FirstBytesDeadline<T> {
    inner: T,
    /// Bytes still to arrive before the deadline stops applying.
    needed: usize,
    deadline: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<Counter>,
}

impl<T> FirstBytesDeadline<T> {
    pub fn new(inner: T, needed: usize, within: Duration, timed_out: Arc<Counter>) -> Self {
        Self {
            inner,
            needed,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
            timed_out,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstBytesDeadline<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                let got = buf.filled().len() - before;
                this.needed = this.needed.saturating_sub(got);
                if this.needed == 0 {
                    this.deadline = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if let Some(d) = this.deadline.as_mut()
                    && d.as_mut().poll(cx).is_ready()
                {
                    this.deadline = None;
                    this.timed_out.inc();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client sent no HTTP/2 preface in time",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstBytesDeadline<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: Connected> Connected for FirstBytesDeadline<T> {
    type ConnectInfo = T::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
