//! Listeners and client connections: binding, accepting under the connection limit, TLS
//! handshakes, serving HTTP/1.1 and HTTP/2 (h2 by ALPN, h2c by prior knowledge) on each
//! connection, closing idle ones, and the shutdown in steps: stop accepting; drain; close what is
//! left at the deadline.
//!
//! Limits applied here: `max_connections` (over it a new connection is closed at once),
//! `header_read_timeout` (TLS handshake, HTTP/1 head, and the first request of a connection or of
//! a parked one that woke up: a connection that sends nothing, or only blank lines, is closed
//! then), `max_header_bytes` (hyper's HTTP/1 buffer and HTTP/2 header list), `idle_timeout` (no
//! I/O and no request in flight for that long: the connection is closed gracefully), `drain`,
//! `shutdown_grace`. A request followed by the client's half-close is still answered.
//!
//! The drain, from the shutdown signal on: an HTTP/2 connection gets GOAWAY at once (one that has
//! not sent a request yet, at the end of the drain) and serves the streams it has; an HTTP/1
//! connection stays open, parked or not, and each answer it writes
//! carries `Connection: close` (hyper then closes it), so that a client sending on it in the next
//! moments gets an answer rather than a closed connection. Connections still open after `drain`
//! are closed gracefully (idle ones at once, in-flight ones after their answer), and any left at
//! `shutdown_grace` are cut.
//!
//! A connection's slot under `max_connections` is a `ConnHold`, shared with a tunnel that
//! outlives hyper's part of the connection (an `Upgrade`), so that a tunnel is counted, limited and
//! cut at the deadline like any connection. Requests cut at the deadline are logged by
//! `service` (one line each).
//!
//! Sockets and accept loops: in-process (`ProxyHandle::start`), a listener is one socket with
//! one accept loop on the current runtime. With worker threads (`crate::workers`,
//! `ProxyHandle::start_on`), a listener is one socket per worker, every one bound to the same
//! address with `SO_REUSEPORT` (port 0: the port the first one got), each registered with its
//! worker's reactor and accepted on by a loop on that worker; a connection's task is spawned
//! where it was accepted, so it never leaves that thread. The kernel spreads new connections over
//! the sockets by a hash of their addresses and ports: it balances connections, not requests.
//! The connection limit, the shutdown steps and the drain are the same for every socket of the
//! process, and an accept loop that panicked is logged and started again on its socket.
//! Each accepted connection is logged at DEBUG (`client connection accepted`, with `worker`).
//!
//! Must never: let a connection outlive the shutdown deadline, block the accept loop on a
//! handshake, or leave a listening socket open with no accept loop on it.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use futures_util::future::Either;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{interval_at, sleep, timeout, Instant};
use tokio_rustls::TlsAcceptor;

use super::io::{InFlightBody, Park, Readable, Watched};
use super::metrics::Held;
use super::service::{self, ConnInfo};
use super::{Shared, StartError, TokenSource};
use crate::config::{Config, Limits};
use crate::server::Shutdown;
use crate::tls::server as tls;

/// hyper refuses a smaller HTTP/1 read buffer.
const MIN_H1_BUF: usize = 8192;

/// A bound listener, not yet accepting: one socket, or one per worker.
pub struct BoundListener {
    name: Arc<str>,
    sockets: Vec<Socket>,
    tls: Option<tls::ListenerTls>,
    addr: SocketAddr,
}

/// One listening socket of a listener, and where its accept loop runs.
struct Socket {
    tcp: TcpListener,
    /// The worker whose reactor it is registered with (index and runtime); `None`: the runtime
    /// that bound it.
    worker: Option<(usize, Handle)>,
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

/// Binds every listener of `config` (TLS configs are loaded first, so a bad file binds nothing):
/// once on the current runtime when `workers` is empty, else once per worker (see
/// [`bind_reuseport`]).
pub async fn bind_all(
    config: &Config,
    workers: &[Handle],
) -> Result<Vec<BoundListener>, StartError> {
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
        let cannot_bind = |e: std::io::Error| {
            StartError(format!("listener {}: cannot bind {}: {e}", l.name, l.addr))
        };
        let sockets = match workers {
            [] => vec![Socket {
                tcp: TcpListener::bind(l.addr).await.map_err(cannot_bind)?,
                worker: None,
            }],
            _ => bind_reuseport(l.addr, workers).map_err(cannot_bind)?,
        };
        let addr = sockets[0]
            .tcp
            .local_addr()
            .map_err(|e| StartError(format!("listener {}: {e}", l.name)))?;
        tracing::info!(
            listener = %l.name,
            %addr,
            tls = tls.is_some(),
            sockets = sockets.len(),
            "proxy listening"
        );
        bound.push(BoundListener {
            name: Arc::from(l.name.as_str()),
            sockets,
            tls,
            addr,
        });
    }
    Ok(bound)
}

/// One socket per worker on `addr`, each with `SO_REUSEPORT`, so that the kernel spreads new
/// connections over them (by a hash of the connection's addresses and ports); with port 0, the
/// first gets a port from the system (since Linux 4.6 never one that another `SO_REUSEPORT`
/// group holds) and the others are bound to it. Linux lets sockets share a
/// port this way only when every one of them set `SO_REUSEPORT` and they belong to the same
/// effective user ID: another user cannot bind into the group and take a share of the
/// connections (a process of the same user can).
///
/// Each socket is registered with its worker's reactor (`from_std` in the worker runtime's
/// context), so that its accept loop and its connections' I/O are that worker's.
fn bind_reuseport(addr: SocketAddr, workers: &[Handle]) -> std::io::Result<Vec<Socket>> {
    let first = reuseport_socket(addr)?;
    let addr = first
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("bound to no IP address"))?;
    let mut sockets = vec![first];
    for _ in 1..workers.len() {
        sockets.push(reuseport_socket(addr)?);
    }
    sockets
        .into_iter()
        .zip(workers)
        .enumerate()
        .map(|(index, (socket, runtime))| {
            let _worker = runtime.enter();
            Ok(Socket {
                tcp: TcpListener::from_std(socket.into())?,
                worker: Some((index, runtime.clone())),
            })
        })
        .collect()
}

/// A listening, non-blocking socket on `addr` with `SO_REUSEPORT` (and `SO_REUSEADDR`, as
/// tokio's `bind` sets it; the backlog is tokio's too).
fn reuseport_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Type};
    let socket =
        socket2::Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}

/// What every connection task of the process gets.
struct Ctx<T> {
    shared: Arc<Shared<T>>,
    permits: Arc<Semaphore>,
    shutdown: Shutdown,
    /// Triggered when the drain period after `shutdown` is over.
    drain_end: Shutdown,
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
            drain_end: self.drain_end.clone(),
            hard_stop: self.hard_stop.clone(),
            drain: self.drain.clone(),
        }
    }
}

/// Starts an accept loop per listening socket (on its worker, or on the current runtime), plus the
/// task that ends the drain and enforces the shutdown deadline (on the current runtime).
pub(crate) fn spawn_all<T: TokenSource>(
    listeners: Vec<BoundListener>,
    limits: &Limits,
    shared: Arc<Shared<T>>,
    shutdown: Shutdown,
    hard_stop: Shutdown,
    drain: mpsc::Sender<()>,
) -> Vec<JoinHandle<()>> {
    let state = shared.state.clone();
    let drain_end = Shutdown::new();
    let steps = (shutdown.clone(), drain_end.clone(), hard_stop.clone());
    tokio::spawn(async move {
        let (shutdown, drain_end, hard_stop) = steps;
        shutdown.wait().await;
        let limits = state.load().limits.clone();
        let drain = limits.drain.min(limits.shutdown_grace);
        sleep(drain).await;
        drain_end.trigger();
        sleep(limits.shutdown_grace - drain).await;
        hard_stop.trigger();
    });
    let ctx = Ctx {
        shared,
        permits: Arc::new(Semaphore::new(limits.max_connections)),
        shutdown,
        drain_end,
        hard_stop,
        drain,
    };
    let mut tasks = Vec::new();
    for listener in listeners {
        let BoundListener {
            name, sockets, tls, ..
        } = listener;
        if tls.is_some() {
            ctx.shared.metrics.add_tls_listener(&name);
        }
        for Socket { tcp, worker } in sockets {
            let index = worker.as_ref().map(|(index, _)| *index);
            let accepting = accept_supervised(tcp, name.clone(), tls.clone(), index, ctx.clone());
            tasks.push(match worker {
                Some((_, runtime)) => runtime.spawn(accepting),
                None => tokio::spawn(accepting),
            });
        }
    }
    tasks
}

/// Runs a socket's accept loop until shutdown. The loop is written not to panic; should it all
/// the same, the panic is logged at ERROR and the loop starts again on the same socket: a socket
/// left open with no one accepting on it would keep getting its share of new connections
/// (`SO_REUSEPORT`) and leave them unanswered.
async fn accept_supervised<T: TokenSource>(
    tcp: TcpListener,
    name: Arc<str>,
    tls: Option<tls::ListenerTls>,
    worker: Option<usize>,
    ctx: Ctx<T>,
) {
    use futures_util::FutureExt;
    loop {
        let accepting = accept_loop(&tcp, &name, tls.as_ref(), worker, &ctx);
        match std::panic::AssertUnwindSafe(accepting).catch_unwind().await {
            Ok(()) => break,
            Err(_) => {
                tracing::error!(listener = %name, worker, "the accept loop panicked; it starts again");
                sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::info!(listener = %name, worker, "proxy listener stopped accepting");
}

async fn accept_loop<T: TokenSource>(
    tcp: &TcpListener,
    name: &Arc<str>,
    tls: Option<&tls::ListenerTls>,
    worker: Option<usize>,
    ctx: &Ctx<T>,
) {
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
            _ = ctx.shutdown.wait() => return,
        };
        let Ok(permit) = ctx.permits.clone().try_acquire_owned() else {
            tracing::warn!(listener = %name, %peer, "connection limit reached; connection closed");
            continue;
        };
        tracing::debug!(listener = %name, %peer, worker, "client connection accepted");
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            peer,
            name.clone(),
            tls.map(tls::ListenerTls::acceptor),
            permit,
            ctx.clone(),
        ));
    }
}

/// A client connection's slot (connection limit, open-connections gauge, drain), held by the
/// connection task and by a tunnel on it, whichever ends last.
pub(crate) struct ConnHold {
    _permit: OwnedSemaphorePermit,
    _open: Held,
    _drain: mpsc::Sender<()>,
    /// Triggered at the shutdown deadline.
    pub hard_stop: Shutdown,
}

impl std::fmt::Debug for ConnHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHold").finish_non_exhaustive()
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
        _open: Held::new(&ctx.shared.metrics.connections_open),
        _drain: ctx.drain.clone(),
        hard_stop: ctx.hard_stop.clone(),
    }));
    match tls {
        None => serve(stream, conn, &limits, ctx, true).await,
        // Boxed: a plain connection's task does not carry room for the TLS side.
        Some(acceptor) => Box::pin(serve_tls(stream, acceptor, conn, limits, ctx)).await,
    }
}

async fn serve_tls<T: TokenSource>(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    mut conn: ConnInfo,
    limits: Limits,
    ctx: Ctx<T>,
) {
    let peer = conn.peer;
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
    // An HTTP/2 connection never parks: its state lives in hyper for the connection's life.
    let may_park = stream.get_ref().1.alpn_protocol() != Some(b"h2");
    serve(stream, conn, &limits, ctx, may_park).await;
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

/// hyper's HTTP/1 settings, on the builder of a new connection and on the HTTP/1 builder of a
/// resumed one ([`drive`]): the two have the same methods but no trait in common.
macro_rules! http1_settings {
    ($builder:expr, $limits:expr) => {
        $builder
            .timer(TokioTimer::new())
            .header_read_timeout($limits.header_read_timeout)
            .max_buf_size($limits.max_header_bytes.max(MIN_H1_BUF))
            .keep_alive(true)
            // A client that shuts its write side after its request still gets the answer (else
            // hyper drops the request unanswered, its handler not even started, when it sees EOF).
            .half_close(true)
    };
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    http1_settings!(builder.http1(), limits);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Serves a client connection until it ends, parking it while it idles.
///
/// An HTTP/1 connection with no I/O and no request in flight for [`park_after`] is parked: hyper's
/// part of it (its read and write buffers, the room for a request handler, the last header map)
/// is freed and the socket waits on its own, a few hundred bytes, for its next bytes; they start a
/// new hyper connection on the same socket. nginx does the same with its buffers on idle
/// keep-alive connections. While parked, the connection still closes at `idle_timeout` and at
/// the end of the drain; bytes during the drain resume it and its answer closes it. A connection
/// that parked speaks HTTP/1 to its end: its next bytes are never taken for an HTTP/2 preface.
async fn serve<S, T>(stream: S, conn: ConnInfo, limits: &Limits, ctx: Ctx<T>, may_park: bool)
where
    S: Readable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: TokenSource,
{
    let conn = Arc::new(conn);
    let (svc_conn, shared) = (conn.clone(), ctx.shared.clone());
    let draining = ctx.shutdown.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (conn, shared, draining) = (svc_conn.clone(), shared.clone(), draining.clone());
        async move {
            let version = req.version();
            let in_flight = conn.activity.request_started(version);
            let mut response = service::handle(req, &conn, &shared).await;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                conn.activity.mark_upgraded();
            }
            close_when_draining(&mut response, version, &draining);
            Ok::<_, Infallible>(response.map(|body| InFlightBody::new(body, in_flight)))
        }
    });
    let park = Arc::new(Park::default());
    let mut stream = stream;
    let mut resumed = false;
    loop {
        let watched = Watched::new(
            stream,
            conn.clone(),
            ctx.shared.metrics.clone(),
            may_park.then(|| park.clone()),
        );
        // Boxed: hyper's builder, its connection and the timers of a connection at work are
        // freed while it is parked.
        Box::pin(drive(watched, svc.clone(), resumed, limits, &ctx, &park)).await;
        let Some(parked) = park.take() else {
            return;
        };
        let _parked = Held::new(&ctx.shared.metrics.connections_parked);
        let next = tokio::select! {
            r = parked.readable() => r,
            _ = sleep(limits.idle_timeout.saturating_sub(park_after(limits))) => {
                tracing::debug!("closing idle client connection");
                return;
            }
            _ = ctx.drain_end.wait() => return,
            _ = ctx.hard_stop.wait() => return,
        };
        if let Err(e) = next {
            tracing::debug!(error = %e, "parked client connection failed");
            return;
        }
        stream = parked;
        resumed = true;
    }
}

/// During the drain, an HTTP/1 answer closes its connection (`Connection: close`, which hyper
/// honours by closing after it); a `101` is left alone, as its connection becomes a tunnel.
fn close_when_draining<B>(response: &mut Response<B>, version: http::Version, draining: &Shutdown) {
    if version < http::Version::HTTP_2
        && response.status() != http::StatusCode::SWITCHING_PROTOCOLS
        && draining.is_triggered()
    {
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
}

/// How long an HTTP/1 connection idles before it is parked (see [`serve`]): 1 s, or less when
/// `header_read_timeout` is short. hyper's header timer runs on an idle connection too (it
/// starts when hyper waits for the next head), so a connection that did not park within it would
/// be closed at `header_read_timeout` rather than at `idle_timeout`.
fn park_after(limits: &Limits) -> Duration {
    Duration::from_secs(1).min(limits.header_read_timeout / 4)
}

/// Runs hyper on the stream until the connection ends or parks (then the stream is in `park`).
/// A request must start within `header_read_timeout`, on a new connection as on a parked one that
/// woke up, and a woken connection that served none does not park again: blank lines alone keep
/// no connection alive. `resumed`: the connection was parked before (it stays HTTP/1).
async fn drive<S, T, Svc, B>(
    stream: Watched<S>,
    svc: Svc,
    resumed: bool,
    limits: &Limits,
    ctx: &Ctx<T>,
    park: &Park<S>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: TokenSource,
    Svc: hyper::service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Send
        + 'static,
    Svc::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = stream.activity().clone();
    let builder = http_builder(limits);
    let io = TokioIo::new(stream);
    // A parked HTTP/1 connection stays HTTP/1: a resumed one is not sniffed for an h2 preface.
    let connection = match resumed {
        false => Either::Left(builder.serve_connection_with_upgrades(io, svc)),
        true => {
            let mut http1 = hyper::server::conn::http1::Builder::new();
            http1_settings!(http1, limits);
            Either::Right(Http1Connection(Box::pin(
                http1.serve_connection(io, svc).with_upgrades(),
            )))
        }
    };
    tokio::pin!(connection);

    let mut idle_check = interval_at(Instant::now() + limits.idle_timeout, limits.idle_timeout);
    let park_after = park_after(limits);
    let mut park_check = interval_at(Instant::now() + park_after, park_after);
    let first_request = sleep(limits.header_read_timeout);
    tokio::pin!(first_request);
    let mut first_request_checked = false;
    let served_before = activity.requests();
    let mut last_io = activity.io_events();
    let mut last_park_io = last_io;
    let mut draining = false;
    let mut closing = false;
    let woken = Arc::new(SupervisorWake::default());
    loop {
        let supervisor = async {
            tokio::select! {
                biased;
                _ = ctx.hard_stop.wait() => Event::HardStop,
                _ = ctx.shutdown.wait(), if !closing && !draining => Event::Shutdown,
                _ = ctx.drain_end.wait(), if !closing => Event::DrainEnd,
                _ = &mut first_request, if !closing && !first_request_checked => Event::FirstRequest,
                _ = park_check.tick(), if !closing => Event::ParkCheck,
                _ = idle_check.tick(), if !closing => Event::IdleCheck,
            }
        };
        let event = Supervised {
            connection: connection.as_mut(),
            supervisor: std::pin::pin!(supervisor),
            woken: &woken,
        }
        .await;
        match event {
            Err(result) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "client connection ended with an error");
                }
                return;
            }
            Ok(Event::HardStop) => {
                tracing::warn!("client connection closed at the shutdown deadline");
                return;
            }
            Ok(Event::Shutdown) => {
                // HTTP/1 answers now carry `Connection: close` (see `serve`); HTTP/2 has GOAWAY.
                draining = true;
                if activity.speaks_http2() {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            Ok(Event::DrainEnd) => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            Ok(Event::FirstRequest) => {
                first_request_checked = true;
                if activity.requests() == served_before {
                    // Nothing was in flight: closed at once, whatever hyper was reading.
                    tracing::debug!("no request in time; closing client connection");
                    return;
                }
            }
            Ok(Event::ParkCheck) => {
                let io = activity.io_events();
                if io == last_park_io
                    && activity.in_flight() == 0
                    && activity.requests() > served_before
                    && !activity.speaks_http2()
                {
                    // The stream parks at hyper's next read if it finds the connection idle;
                    // that read happens in this poll, or the request is withdrawn.
                    park.request();
                    let polled = poll_fn(|cx| Poll::Ready(connection.as_mut().poll(cx))).await;
                    park.cancel();
                    if let Poll::Ready(result) = polled {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "client connection ended with an error");
                        }
                        return;
                    }
                }
                last_park_io = io;
            }
            Ok(Event::IdleCheck) => {
                let io = activity.io_events();
                if io == last_io && activity.in_flight() == 0 {
                    tracing::debug!("closing idle client connection");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                last_io = io;
            }
        }
    }
}

/// hyper's HTTP/1-only side of a resumed connection, with the error type of the auto builder's.
struct Http1Connection<I, S>(Pin<Box<hyper::server::conn::http1::UpgradeableConnection<I, S>>>)
where
    S: hyper::service::HttpService<Incoming>;

impl<I, S, B> Future for Http1Connection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.get_mut().0.as_mut().poll(cx).map_err(Into::into)
    }
}

/// Ends hyper's side of a connection once its requests in flight are answered.
trait GracefulShutdown {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> GracefulShutdown
    for Either<auto::UpgradeableConnection<'_, I, S, TokioExecutor>, Http1Connection<I, S>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: auto::HttpServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        match self.as_pin_mut() {
            Either::Left(auto) => auto.graceful_shutdown(),
            Either::Right(http1) => http1.get_mut().0.as_mut().graceful_shutdown(),
        }
    }
}

/// What a connection's supervisor saw.
enum Event {
    HardStop,
    Shutdown,
    DrainEnd,
    FirstRequest,
    ParkCheck,
    IdleCheck,
}

/// Polls a connection at every wake-up of its task, and its supervisor (timers, shutdown) only
/// when one of the supervisor's own wakers fired: a request's wake-ups (socket readiness, the
/// upstream's answer) do not poll five timers and watches each time.
struct Supervised<'a, C, S> {
    connection: Pin<&'a mut C>,
    supervisor: Pin<&'a mut S>,
    woken: &'a Arc<SupervisorWake>,
}

/// The supervisor's waker: notes that it fired, then wakes the task.
#[derive(Default)]
struct SupervisorWake {
    /// Clear once the supervisor has been polled and has not been woken since.
    idle: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl Wake for SupervisorWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.idle.store(false, Ordering::Release);
        self.task.wake();
    }
}

impl<C: Future, S: Future> Future for Supervised<'_, C, S> {
    /// The supervisor's event, or the connection's end.
    type Output = Result<S::Output, C::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Poll::Ready(done) = this.connection.as_mut().poll(cx) {
            return Poll::Ready(Err(done));
        }
        // `idle` starts false: a new supervisor is polled once, which sets up its wakers.
        if !this.woken.idle.swap(true, Ordering::AcqRel) {
            this.woken.task.register(cx.waker());
            let waker = Waker::from(this.woken.clone());
            if let Poll::Ready(event) = this
                .supervisor
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
            {
                this.woken.idle.store(false, Ordering::Release);
                return Poll::Ready(Ok(event));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_binds_every_worker_to_one_port_and_each_accepts_on_its_worker() {
        let workers = crate::workers::Workers::start(3).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut config = crate::proxy::tests_support::config();
        for name in ["a", "b"] {
            config.listeners.push(crate::config::ListenerConfig {
                name: name.to_string(),
                addr: "127.0.0.1:0".parse().unwrap(),
                tls: None,
                caller: None,
            });
        }
        let bound = runtime
            .block_on(bind_all(&config, workers.runtimes()))
            .unwrap();
        assert_eq!(bound.len(), 2);
        assert_ne!(bound[0].local_addr(), bound[1].local_addr());
        let (tx, accepted) = std::sync::mpsc::channel();
        let addr = bound[0].local_addr();
        for listener in bound {
            assert_ne!(listener.local_addr().port(), 0);
            assert_eq!(listener.sockets.len(), 3);
            let at = listener.local_addr();
            for (i, socket) in listener.sockets.into_iter().enumerate() {
                assert_eq!(socket.tcp.local_addr().unwrap(), at);
                let (index, worker) = socket.worker.unwrap();
                assert_eq!(index, i);
                let tx = tx.clone();
                worker.spawn(async move {
                    while let Ok((stream, _)) = socket.tcp.accept().await {
                        let _ = tx.send((index, crate::workers::current()));
                        drop(stream);
                    }
                });
            }
        }
        // The kernel spreads connections by a hash of their ports: a few dozen reach all three.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let _client = std::net::TcpStream::connect(addr).unwrap();
            let (index, on) = accepted
                .recv_timeout(Duration::from_secs(5))
                .expect("accepted");
            assert_eq!(on, Some(index), "accepted on the socket's own worker");
            seen.insert(index);
            if seen.len() == 3 {
                break;
            }
        }
        assert_eq!(seen.len(), 3, "every worker's socket gets connections");
        drop(runtime);
        workers.stop();
    }

    fn answer(status: http::StatusCode) -> Response<()> {
        let mut r = Response::new(());
        *r.status_mut() = status;
        r
    }

    #[test]
    fn only_http1_answers_during_the_drain_close_their_connection() {
        use http::{StatusCode, Version};
        let shutdown = Shutdown::new();
        let closes = |status, version, shutdown: &Shutdown| {
            let mut r = answer(status);
            close_when_draining(&mut r, version, shutdown);
            r.headers().get(http::header::CONNECTION).cloned()
        };
        assert_eq!(closes(StatusCode::OK, Version::HTTP_11, &shutdown), None);
        shutdown.trigger();
        for version in [Version::HTTP_10, Version::HTTP_11] {
            assert_eq!(
                closes(StatusCode::BAD_GATEWAY, version, &shutdown).unwrap(),
                "close"
            );
        }
        assert_eq!(closes(StatusCode::OK, Version::HTTP_2, &shutdown), None);
        assert_eq!(
            closes(StatusCode::SWITCHING_PROTOCOLS, Version::HTTP_11, &shutdown),
            None,
            "a 101 becomes a tunnel"
        );
    }
}
