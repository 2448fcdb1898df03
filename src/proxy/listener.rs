//! Listeners and client connections: binding, accepting under the connection limit, TLS
//! handshakes, serving HTTP/1.1 and HTTP/2 (h2 by ALPN, h2c by prior knowledge) on each
//! connection, closing idle ones, and the two-step shutdown (stop accepting and drain; close what
//! is left at the deadline).
//!
//! Limits applied here: `max_connections` (over it a new connection is closed at once),
//! `header_read_timeout` (TLS handshake, HTTP/1 head, and the first request of any connection),
//! `max_header_bytes` (hyper's HTTP/1 buffer and HTTP/2 header list), `idle_timeout` (no I/O and
//! no request in flight for that long: the connection is closed gracefully), `shutdown_grace`.
//!
//! A connection's slot under `max_connections` is a `ConnHold`, shared with a tunnel that
//! outlives hyper's part of the connection (an `Upgrade`), so that a tunnel is counted, limited and
//! cut at the deadline like any connection. Requests cut at the deadline are logged by
//! `service` (one line each).
//!
//! Must never: let a connection outlive the shutdown deadline, or block the accept loop on a
//! handshake.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{interval_at, sleep, timeout, Instant};
use tokio_rustls::TlsAcceptor;

use super::io::Watched;
use super::service::{self, ConnInfo};
use super::{tls, Shared, StartError, TokenSource};
use crate::config::{Config, Limits};
use crate::metrics::Metrics;
use crate::server::Shutdown;

/// hyper refuses a smaller HTTP/1 read buffer.
const MIN_H1_BUF: usize = 8192;

/// A bound listener, not yet accepting.
pub struct BoundListener {
    name: Arc<str>,
    tcp: TcpListener,
    tls: Option<tls::ListenerTls>,
    addr: SocketAddr,
}

impl BoundListener {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    /// Its TLS config in force, which reload replaces.
    pub fn tls(&self) -> Option<&tls::ListenerTls> {
        self.tls.as_ref()
    }
}

/// Binds every listener of `config` (TLS configs are loaded first, so a bad file binds nothing).
pub async fn bind_all(config: &Config) -> Result<Vec<BoundListener>, StartError> {
    let mut acceptors = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let acceptor = match &l.tls {
            None => None,
            Some(t) => Some(tls::ListenerTls::load(t).map_err(|e| {
                StartError(format!("listener {}: tls.{}: {e}", l.name, e.file.key()))
            })?),
        };
        acceptors.push(acceptor);
    }
    let mut bound = Vec::with_capacity(config.listeners.len());
    for (l, tls) in config.listeners.iter().zip(acceptors) {
        let tcp = TcpListener::bind(l.addr)
            .await
            .map_err(|e| StartError(format!("listener {}: cannot bind {}: {e}", l.name, l.addr)))?;
        let addr = tcp
            .local_addr()
            .map_err(|e| StartError(format!("listener {}: {e}", l.name)))?;
        tracing::info!(listener = %l.name, %addr, tls = tls.is_some(), "proxy listening");
        bound.push(BoundListener {
            name: Arc::from(l.name.as_str()),
            tcp,
            tls,
            addr,
        });
    }
    Ok(bound)
}

/// What every connection task of the process gets.
struct Ctx<T> {
    shared: Arc<Shared<T>>,
    permits: Arc<Semaphore>,
    shutdown: Shutdown,
    hard_stop: Shutdown,
    /// Held by every connection task; the receiver sees the channel close when all have ended.
    drain: mpsc::Sender<()>,
}

impl<T> Clone for Ctx<T> {
    fn clone(&self) -> Self {
        Ctx {
            shared: self.shared.clone(),
            permits: self.permits.clone(),
            shutdown: self.shutdown.clone(),
            hard_stop: self.hard_stop.clone(),
            drain: self.drain.clone(),
        }
    }
}

/// Starts an accept loop per listener, plus the task that enforces the shutdown deadline.
pub(crate) fn spawn_all<T: TokenSource>(
    listeners: Vec<BoundListener>,
    limits: &Limits,
    shared: Arc<Shared<T>>,
    shutdown: Shutdown,
    hard_stop: Shutdown,
    drain: mpsc::Sender<()>,
) -> Vec<JoinHandle<()>> {
    let state = shared.state.clone();
    let (deadline_shutdown, deadline_hard) = (shutdown.clone(), hard_stop.clone());
    tokio::spawn(async move {
        deadline_shutdown.wait().await;
        sleep(state.load().limits.shutdown_grace).await;
        deadline_hard.trigger();
    });
    let ctx = Ctx {
        shared,
        permits: Arc::new(Semaphore::new(limits.max_connections)),
        shutdown,
        hard_stop,
        drain,
    };
    listeners
        .into_iter()
        .map(|l| tokio::spawn(accept_loop(l, ctx.clone())))
        .collect()
}

async fn accept_loop<T: TokenSource>(listener: BoundListener, ctx: Ctx<T>) {
    let BoundListener { name, tcp, tls, .. } = listener;
    if tls.is_some() {
        ctx.shared.metrics.add_tls_listener(&name);
    }
    loop {
        let (stream, peer) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = ctx.shutdown.wait() => break,
        };
        let Ok(permit) = ctx.permits.clone().try_acquire_owned() else {
            tracing::warn!(listener = %name, %peer, "connection limit reached; connection closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            peer,
            name.clone(),
            tls.as_ref().map(tls::ListenerTls::acceptor),
            permit,
            ctx.clone(),
        ));
    }
    tracing::info!(listener = %name, "proxy listener stopped accepting");
}

/// A client connection's slot (connection limit, open-connections gauge, drain), held by the
/// connection task and by a tunnel on it, whichever ends last.
pub(crate) struct ConnHold {
    _permit: OwnedSemaphorePermit,
    _open: OpenConnection,
    _drain: mpsc::Sender<()>,
    /// Triggered at the shutdown deadline.
    pub hard_stop: Shutdown,
}

impl std::fmt::Debug for ConnHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHold").finish_non_exhaustive()
    }
}

/// Counts an open connection in the metrics while alive.
struct OpenConnection(Arc<Metrics>);

impl OpenConnection {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.connections_open.inc();
        OpenConnection(metrics.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

async fn connection<T: TokenSource>(
    stream: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    tls: Option<TlsAcceptor>,
    permit: OwnedSemaphorePermit,
    ctx: Ctx<T>,
) {
    let limits = ctx.shared.state.load().limits.clone();
    let mut conn = ConnInfo::new(listener, peer);
    conn.hold = Some(Arc::new(ConnHold {
        _permit: permit,
        _open: OpenConnection::new(&ctx.shared.metrics),
        _drain: ctx.drain.clone(),
        hard_stop: ctx.hard_stop.clone(),
    }));
    let activity = conn.activity.clone();
    let Some(acceptor) = tls else {
        return serve(Watched::new(stream, activity), conn, &limits, ctx).await;
    };
    let handshake = tokio::select! {
        r = timeout(limits.header_read_timeout, acceptor.accept(stream)) => r,
        _ = ctx.hard_stop.wait() => return,
    };
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = handshake_failure(&e);
            tracing::debug!(listener = %conn.identity.listener, %peer, reason, error = %e, "TLS handshake failed");
            ctx.shared
                .metrics
                .record_handshake_failure(&conn.identity.listener, reason);
            return;
        }
        Err(_) => {
            tracing::debug!(listener = %conn.identity.listener, %peer, "TLS handshake timed out");
            ctx.shared
                .metrics
                .record_handshake_failure(&conn.identity.listener, "timeout");
            return;
        }
    };
    // Verified by rustls when the listener requires client certificates; parsed once here.
    if let Some(leaf) = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        conn.identity.cert = tls::cert_identities(leaf);
    }
    conn.proto = "https";
    serve(Watched::new(stream, activity), conn, &limits, ctx).await;
}

/// Why a handshake failed, as one of `metrics::HANDSHAKE_FAILURE_REASONS`.
fn handshake_failure(e: &std::io::Error) -> &'static str {
    use rustls::Error as E;
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<E>()) else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe => "eof",
            _ => "other",
        };
    };
    match tls {
        E::NoCertificatesPresented => "no_client_certificate",
        E::InvalidCertificate(_) | E::InvalidCertRevocationList(_) => "bad_certificate",
        E::PeerIncompatible(_) => "peer_incompatible",
        E::AlertReceived(_) => "alert_received",
        E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. }
        | E::InvalidMessage(_)
        | E::PeerMisbehaved(_)
        | E::DecryptError => "protocol_error",
        _ => "other",
    }
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_H1_BUF))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

async fn serve<S, T>(stream: Watched<S>, conn: ConnInfo, limits: &Limits, ctx: Ctx<T>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: TokenSource,
{
    let activity = conn.activity.clone();
    let conn = Arc::new(conn);
    let shared = ctx.shared.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (conn, shared) = (conn.clone(), shared.clone());
        async move { Ok::<_, Infallible>(service::handle(req, &conn, &shared).await) }
    });
    let builder = http_builder(limits);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(connection);

    let mut idle_check = interval_at(Instant::now() + limits.idle_timeout, limits.idle_timeout);
    let first_request = sleep(limits.header_read_timeout);
    tokio::pin!(first_request);
    let mut first_request_checked = false;
    let mut last_io = activity.io_events();
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            _ = ctx.shutdown.wait(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = ctx.hard_stop.wait() => {
                tracing::warn!("client connection closed at the shutdown deadline");
                return;
            }
            _ = idle_check.tick(), if !closing => {
                let io = activity.io_events();
                if io == last_io && activity.in_flight() == 0 {
                    tracing::debug!("closing idle client connection");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                last_io = io;
            }
            _ = &mut first_request, if !closing && !first_request_checked => {
                first_request_checked = true;
                if activity.requests() == 0 {
                    tracing::debug!("no request in time; closing client connection");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}
