//! The one accept loop: serves a hyper service on a TCP listener (HTTP/1.1 and HTTP/2 by
//! detection), over TLS when given a config, until shut down, then drains in-flight connections.
//! Used by the admin listener, the emulator and the echo upstream; the proxy builds its own
//! listeners on the same pieces. A verified client certificate's identities reach the handler as
//! the request extension [`ClientCert`].
//!
//! [`ConnLimits`] bound what connections can hold: how many are open at once (over it a new one
//! is closed at once) and how long each has to send a request head; a connection that sends no
//! byte, or no complete head, in that time is closed. A request followed by the client's
//! half-close (it shut its write side) is still answered.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::CertIdentity;
use crate::tls::server::{cert_identities, ListenerTls};

/// The identities of the client certificate a TLS connection presented and the listener's client
/// CA verified (URI SANs, DNS SANs, CN); empty without one. Every request of the connection
/// carries it as an extension.
#[derive(Clone, Debug, Default)]
pub struct ClientCert(pub Arc<Vec<CertIdentity>>);

/// A shutdown signal shared by every task of one server or process. Cloning shares it.
#[derive(Clone)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown {
            tx: watch::channel(false).0,
        }
    }

    /// Starts the shutdown: listeners stop accepting and connections drain.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once [`Shutdown::trigger`] has been called.
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// What [`serve`] lets its connections hold.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Open connections at most; over it a new connection is closed at once.
    pub max_connections: usize,
    /// Time a connection has to send its first request head (and each next one, kept alive).
    pub header_read_timeout: Duration,
}

impl Default for ConnLimits {
    /// No connection limit, 10 s for a head: for the emulator and the echo upstream.
    fn default() -> Self {
        ConnLimits {
            max_connections: Semaphore::MAX_PERMITS,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `handler` on `listener` (over TLS with `tls`) within `limits` until `shutdown`, then
/// waits up to `grace` for open connections.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    tls: Option<ListenerTls>,
    handler: H,
    limits: ConnLimits,
    shutdown: Shutdown,
    grace: Duration,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            // Shutdown first: once triggered, nothing more is accepted.
            biased;
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; connection closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(ListenerTls::acceptor);
        tokio::spawn(async move {
            let _permit = permit;
            let Some(acceptor) = acceptor else {
                let cert = ClientCert::default();
                return connection(stream, cert, peer, handler, limits, watcher).await;
            };
            // The handshake counts against the head's time: a peer that stalls it is cut.
            let stream =
                match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                };
            let identities = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| cert_identities(leaf))
                .unwrap_or_default();
            let cert = ClientCert(Arc::new(identities));
            connection(stream, cert, peer, handler, limits, watcher).await
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period");
    }
}

/// Serves one accepted connection until it ends or the drain cuts it.
async fn connection<S, H, F, B>(
    stream: S,
    cert: ClientCert,
    peer: SocketAddr,
    handler: H,
    limits: ConnLimits,
    watcher: Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let asked = Arc::new(AtomicBool::new(false));
    let service = hyper::service::service_fn({
        let asked = asked.clone();
        move |mut req: Request<Incoming>| {
            asked.store(true, Ordering::Relaxed);
            req.extensions_mut().insert(cert.clone());
            let fut = handler(req, peer);
            async move { Ok::<_, Infallible>(fut.await) }
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .half_close(true);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let conn = watcher.watch(conn.into_owned());
    tokio::pin!(conn);
    // hyper times the heads of HTTP/1 only, once it knows the protocol: a connection that sends
    // nothing at all is closed here.
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = tokio::time::sleep(limits.header_read_timeout) => {
            if !asked.load(Ordering::Relaxed) {
                tracing::debug!(%peer, "no request in time; connection closed");
                return;
            }
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
