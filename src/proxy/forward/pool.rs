//! The upstream connections of one client setting: a keep-alive pool over hyper's connection API
//! (`hyper::client::conn`), TCP and rustls.
//!
//! - **HTTP/1.1** (plain `http`, or TLS where ALPN picks it): one request at a time per
//!   connection. A connection goes back to the pool when its response has been read to the end:
//!   the response body ([`UpstreamBody`]) checks it in then, or when it is dropped at its end.
//!   One whose response was dropped before its end (the caller went away, a 401 that is
//!   replayed) is closed at once (its task aborted), never reused. The most recently used
//!   connection is taken first.
//! - **HTTP/2** (TLS where ALPN picks it): one connection per origin, shared by every request.
//! - Each connection runs in its own task, as hyper's connection API asks; a request is sent to
//!   it without a task of its own and without boxing.
//! - `connect_timeout` bounds the TCP connect and the TLS handshake of a new connection.
//!   Connections idle for `idle_timeout` are closed (at the next checkout, or by a reaper task
//!   that runs while the pool has idle connections and ends with the pool).
//! - A connection whose response began before the caller's streamed request body was all sent
//!   (an upstream that answered early, a `413` say) is closed at the response's end, not reused:
//!   the rest of that body would follow on it, and an upstream that answered without reading the
//!   body could take those bytes for a request. (nginx does not keep such a connection either.)
//! - Sending a request once more, on another connection or stream, only where that cannot do
//!   what sending it once would not (each counted in `upstream_resends_total`):
//!   - a request that a pooled connection refused before sending any of it (the upstream had just
//!     closed it): always;
//!   - one whose HTTP/2 stream the upstream refused (`RST_STREAM` with `REFUSED_STREAM`: not
//!     processed, RFC 9113 8.7), when the caller can build it again ([`Again`]: the request path
//!     can for every request whose body is in memory);
//!   - one that went out on a pooled connection that then closed under it (its end, a reset, an
//!     HTTP/2 `GOAWAY`) before any answer: when the caller can build it again and it is
//!     idempotent (RFC 9110 9.2.2), since the upstream may have processed it.
//!
//!   Any other request is never sent twice, and none more than once again.
//! - **One set of connections per worker thread** (`crate::workers`): a request takes and gives
//!   back connections of its own worker's set (index 0 off the workers), and a connection's task
//!   and the set's reaper run on that worker, so that a request and its upstream connection share
//!   one thread and no wake-up crosses threads. With N workers there are up to N HTTP/2
//!   connections per origin, and idle HTTP/1.1 connections are not lent across workers.
//!
//! Must never: hand out a connection whose last response was not read to its end, or hold the
//! pool's lock across an await.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::ProxyBody;
use crate::metrics::OutcomeLabels;
use crate::proxy::metrics::Held;
use crate::proxy::ProxyMetrics;

/// A new connection could not be made, or a request failed on one.
#[derive(Debug)]
pub enum PoolError {
    /// Resolving, connecting or the TLS handshake failed.
    Connect(String),
    /// They took longer than `connect_timeout`.
    ConnectTimeout(String),
    /// The request or its response failed on the connection.
    Exchange(hyper::Error),
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Connect(e) | PoolError::ConnectTimeout(e) => f.write_str(e),
            PoolError::Exchange(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PoolError::Connect(_) | PoolError::ConnectTimeout(_) => None,
            PoolError::Exchange(e) => Some(e),
        }
    }
}

/// The settings of one pool.
pub struct PoolSettings {
    /// The TLS client config; its ALPN is set here (`h2` unless `http1_only`, and `http/1.1`).
    pub tls: rustls::ClientConfig,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// HTTP/1.1 only, never h2 (for `Upgrade`s).
    pub http1_only: bool,
    /// How many sets of connections: one per worker thread (see the module docs).
    pub workers: usize,
    /// Where new connections and open ones are counted.
    pub metrics: Arc<ProxyMetrics>,
}

/// How to build a request once more, for a request that failed where sending it again is safe
/// (see the module docs).
#[derive(Clone, Copy)]
pub struct Again<'a> {
    /// The request once more (`None`: it cannot be built).
    pub build: &'a (dyn Fn() -> Option<Request<ProxyBody>> + Sync),
    /// Its method is idempotent (RFC 9110 9.2.2): sending it twice does what sending it once does.
    pub idempotent: bool,
}

impl Again<'_> {
    /// The request once more, when `failure` allows it (on a `reused` connection).
    fn after(self, failure: Failure, reused: bool) -> Option<Request<ProxyBody>> {
        let safe = match failure {
            Failure::Unprocessed => true,
            Failure::ClosedUnder => reused && self.idempotent,
            Failure::Other => false,
        };
        safe.then(|| (self.build)()).flatten()
    }
}

/// What a failed exchange says about whether the upstream processed its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Surely not: an HTTP/2 stream it refused (`REFUSED_STREAM`).
    Unprocessed,
    /// The connection ended under it before any answer: the end of the stream, a reset, an
    /// HTTP/2 `GOAWAY`. It may have.
    ClosedUnder,
    /// Anything else (a malformed answer, say).
    Other,
}

impl Failure {
    fn of(e: &hyper::Error) -> Failure {
        use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
        if e.is_incomplete_message() {
            return Failure::ClosedUnder;
        }
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            if let Some(h2) = s.downcast_ref::<h2::Error>() {
                return match h2 {
                    _ if h2.is_reset()
                        && h2.is_remote()
                        && h2.reason() == Some(h2::Reason::REFUSED_STREAM) =>
                    {
                        Failure::Unprocessed
                    }
                    _ if (h2.is_go_away() && h2.is_remote()) || h2.is_io() => Failure::ClosedUnder,
                    _ => Failure::Other,
                };
            }
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                return match io.kind() {
                    BrokenPipe | ConnectionAborted | ConnectionReset | UnexpectedEof => {
                        Failure::ClosedUnder
                    }
                    _ => Failure::Other,
                };
            }
            source = s.source();
        }
        Failure::Other
    }
}

/// A keep-alive pool of upstream connections; cloning shares it.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    tls: TlsConnector,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// One set per worker, by index.
    origins: Box<[Mutex<Origins>]>,
    metrics: Arc<ProxyMetrics>,
}

#[derive(Default)]
struct Origins {
    by_key: HashMap<OriginKey, Origin>,
    /// Whether the reaper task runs (it ends when no connection is idle).
    reaping: bool,
}

/// Where connections go: scheme and authority.
///
/// Compared and hashed on the authority's bytes as written (`Authority`'s own `Hash` feeds the
/// hasher one lower-cased byte at a time, which cost two thousand instructions per request
/// here). The authority comes from the route's `upstream`, the same bytes on every request; two
/// routes that spell one host in different cases get a set of connections each.
#[derive(Clone, Debug)]
struct OriginKey {
    https: bool,
    authority: Authority,
}

impl PartialEq for OriginKey {
    fn eq(&self, other: &OriginKey) -> bool {
        self.https == other.https && self.authority.as_str() == other.authority.as_str()
    }
}

impl Eq for OriginKey {}

impl std::hash::Hash for OriginKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.https.hash(state);
        self.authority.as_str().hash(state);
    }
}

#[derive(Default)]
struct Origin {
    /// HTTP/1.1 connections waiting for a request, the most recently used last.
    idle: Vec<Idle>,
    /// The origin's HTTP/2 connection, when it speaks h2.
    h2: Option<Http2>,
}

/// A connection: how to send on it, and its task (aborted to close it at once).
struct Handle<S> {
    send: S,
    task: AbortHandle,
}

type Http1 = Handle<http1::SendRequest<ProxyBody>>;

struct Http2 {
    conn: Handle<http2::SendRequest<ProxyBody>>,
    /// When it last carried a request.
    used: Instant,
}

impl Drop for Http2 {
    /// Dropping the last sender does not wake an idle HTTP/2 connection's task; ending the task
    /// does, and the connection then closes gracefully (GOAWAY), letting open streams finish.
    fn drop(&mut self) {
        self.conn.task.abort();
    }
}

struct Idle {
    conn: Http1,
    since: Instant,
}

/// A connection to send one request on.
enum Conn {
    Http1(Http1),
    Http2(http2::SendRequest<ProxyBody>),
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Pool {
        let mut tls = settings.tls;
        tls.alpn_protocols = match settings.http1_only {
            true => vec![b"http/1.1".to_vec()],
            false => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        Pool {
            inner: Arc::new(Inner {
                tls: TlsConnector::from(Arc::new(tls)),
                connect_timeout: settings.connect_timeout,
                idle_timeout: settings.idle_timeout,
                origins: (0..settings.workers.max(1))
                    .map(|_| Mutex::default())
                    .collect(),
                metrics: settings.metrics,
            }),
        }
    }

    /// Sends `request` (an absolute URI, `http` or `https`) on a pooled connection or a new one;
    /// `again` builds it once more where that is safe (see the module docs).
    pub async fn request(
        &self,
        mut request: Request<ProxyBody>,
        mut again: Option<Again<'_>>,
    ) -> Result<Response<UpstreamBody>, PoolError> {
        let key = OriginKey::of(request.uri())?;
        let absolute = request.uri().clone();
        let body_read = request.body().caller_read().cloned();
        let set = self.inner.set();
        loop {
            let (conn, reused) = match self.inner.checkout(set, &key) {
                Some(conn) => (conn, true),
                // Boxed: a new connection is the rare path, and its future (TCP, TLS, the
                // handshakes) would make every request's future kilobytes larger.
                None => (Box::pin(self.inner.connect(set, &key)).await?, false),
            };
            match conn {
                Conn::Http1(mut conn) => {
                    prepare_http1(&mut request, &absolute);
                    match conn.send.try_send_request(request).await {
                        Ok(response) => {
                            // A connection that switched protocols is the tunnel's.
                            let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                            let lease = (!switched).then(|| Lease {
                                pool: Arc::downgrade(&self.inner),
                                set,
                                key,
                                conn,
                                // An answer that began before the body was all sent.
                                early: body_read.as_ref().is_some_and(|read| !read.ended()),
                            });
                            return Ok(response.map(|body| UpstreamBody { body, lease }));
                        }
                        Err(mut e) => match e.take_message() {
                            // Refused before any of it was sent: a reused connection the upstream
                            // had just closed. Another gets it.
                            Some(unsent) if reused => {
                                self.inner.metrics.upstream_resends.inc();
                                request = unsent;
                            }
                            _ => request = self.once_more(e.into_error(), reused, &mut again)?,
                        },
                    }
                }
                Conn::Http2(mut send) => {
                    *request.uri_mut() = absolute.clone();
                    match send.try_send_request(request).await {
                        Ok(response) => {
                            return Ok(response.map(|body| UpstreamBody { body, lease: None }))
                        }
                        Err(mut e) => match e.take_message() {
                            Some(unsent) if reused => {
                                self.inner.metrics.upstream_resends.inc();
                                request = unsent;
                            }
                            _ => request = self.once_more(e.into_error(), reused, &mut again)?,
                        },
                    }
                }
            }
        }
    }

    /// The request to send once more after `e`, sent in part or whole, when that is safe and
    /// `again` (taken: once at most) can build it; else `e`.
    fn once_more(
        &self,
        e: hyper::Error,
        reused: bool,
        again: &mut Option<Again<'_>>,
    ) -> Result<Request<ProxyBody>, PoolError> {
        let failure = Failure::of(&e);
        match again.take().and_then(|again| again.after(failure, reused)) {
            Some(request) => {
                tracing::debug!(error = %e, ?failure, "sending a request to the upstream once more");
                self.inner.metrics.upstream_resends.inc();
                Ok(request)
            }
            None => Err(PoolError::Exchange(e)),
        }
    }
}

/// An HTTP/1.1 request goes out in origin form (`/path?query`) with a `Host` header naming the
/// authority (without the scheme's default port).
fn prepare_http1(request: &mut Request<ProxyBody>, absolute: &Uri) {
    if !request.headers().contains_key(HOST) {
        if let Some(host) = host_header(absolute) {
            request.headers_mut().insert(HOST, host);
        }
    }
    let path = absolute
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(path);
}

fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let authority = uri.authority()?;
    let default_port = match uri.scheme() == Some(&Scheme::HTTPS) {
        true => 443,
        false => 80,
    };
    match authority.port_u16() {
        Some(port) if port != default_port => HeaderValue::from_str(authority.as_str()).ok(),
        _ => HeaderValue::from_str(authority.host()).ok(),
    }
}

impl OriginKey {
    fn of(uri: &Uri) -> Result<OriginKey, PoolError> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(PoolError::Connect(format!(
                    "no http or https scheme in {uri}"
                )))
            }
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| PoolError::Connect(format!("no host in {uri}")))?;
        Ok(OriginKey { https, authority })
    }

    fn port(&self) -> u16 {
        self.authority
            .port_u16()
            .unwrap_or(if self.https { 443 } else { 80 })
    }

    /// The host without an IPv6 literal's brackets.
    fn host(&self) -> &str {
        let host = self.authority.host();
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }
}

impl Inner {
    /// The set of connections of the worker thread this runs on (0 off the workers).
    fn set(&self) -> usize {
        crate::workers::current().map_or(0, |worker| worker % self.origins.len())
    }

    fn origins(&self, set: usize) -> std::sync::MutexGuard<'_, Origins> {
        self.origins[set].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection ready for a request: the origin's HTTP/2 connection, or the most recently
    /// used idle HTTP/1.1 one. Closed and expired ones are dropped on the way.
    fn checkout(&self, set: usize, key: &OriginKey) -> Option<Conn> {
        let mut origins = self.origins(set);
        let origin = origins.by_key.get_mut(key)?;
        let now = Instant::now();
        if let Some(h2) = &mut origin.h2 {
            if !h2.conn.send.is_closed() {
                h2.used = now;
                return Some(Conn::Http2(h2.conn.send.clone()));
            }
            origin.h2 = None;
        }
        while let Some(last) = origin.idle.last() {
            if last.conn.send.is_closed() || now.duration_since(last.since) >= self.idle_timeout {
                origin.idle.pop();
                continue;
            }
            if last.conn.send.is_ready() {
                return origin.idle.pop().map(|idle| Conn::Http1(idle.conn));
            }
            break;
        }
        // Rare: the newest one is still finishing its last exchange; any ready one below it.
        let ready = origin.idle.iter().rposition(|i| i.conn.send.is_ready())?;
        Some(Conn::Http1(origin.idle.remove(ready).conn))
    }

    /// An HTTP/1.1 connection whose response was read to its end is idle again.
    fn checkin(self: &Arc<Self>, set: usize, key: OriginKey, conn: Http1) {
        if conn.send.is_closed() {
            return;
        }
        let mut origins = self.origins(set);
        origins.by_key.entry(key).or_default().idle.push(Idle {
            conn,
            since: Instant::now(),
        });
        self.reaping(&mut origins, set);
    }

    /// Starts set `set`'s reaper unless it runs (`origins`: that set, locked), on this worker.
    fn reaping(self: &Arc<Self>, origins: &mut Origins, set: usize) {
        if !origins.reaping {
            origins.reaping = true;
            tokio::spawn(reap(Arc::downgrade(self), set, self.idle_timeout));
        }
    }

    /// Runs a new connection in a task of its own, counted open while it runs; the handle
    /// aborts it (closes the connection at once).
    fn spawn_connection<F>(&self, key: &OriginKey, conn: F) -> AbortHandle
    where
        F: std::future::Future<Output = hyper::Result<()>> + Send + 'static,
    {
        let origin = format!("{}:{}", key.host(), key.port());
        let open = Held::new(&self.metrics.upstream_connections_open);
        tokio::spawn(async move {
            let _open = open;
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %origin, error = %e, "upstream connection ended with an error");
            }
        })
        .abort_handle()
    }

    /// Connects to the origin (TCP, then TLS for `https`) and starts the connection's task;
    /// counts the attempt by outcome.
    async fn connect(self: &Arc<Self>, set: usize, key: &OriginKey) -> Result<Conn, PoolError> {
        let result = self.open(set, key).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(PoolError::ConnectTimeout(_)) => "timeout",
            Err(_) => "failed",
        };
        self.metrics
            .upstream_connects
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        result
    }

    async fn open(self: &Arc<Self>, set: usize, key: &OriginKey) -> Result<Conn, PoolError> {
        let what = |e: &dyn std::fmt::Display| {
            PoolError::Connect(format!("{}:{}: {e}", key.host(), key.port()))
        };
        let timed_out = || {
            PoolError::ConnectTimeout(format!(
                "{}:{}: no connection within {:?}",
                key.host(),
                key.port(),
                self.connect_timeout
            ))
        };
        let deadline = Instant::now() + self.connect_timeout;
        let tcp = tokio::time::timeout_at(deadline, tcp_connect(key.host(), key.port()))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| what(&e))?;
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an upstream connection");
        }
        if !key.https {
            return self.http1(key, TokioIo::new(tcp)).await;
        }
        let name = ServerName::try_from(key.host().to_string()).map_err(|e| what(&e))?;
        let tls = tokio::time::timeout_at(deadline, self.tls.connect(name, tcp))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| what(&e))?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        match h2 {
            true => self.http2(set, key, TokioIo::new(tls)).await,
            false => self.http1(key, TokioIo::new(tls)).await,
        }
    }

    async fn http1<T>(&self, key: &OriginKey, io: T) -> Result<Conn, PoolError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(PoolError::Exchange)?;
        let task = self.spawn_connection(key, conn.with_upgrades());
        Ok(Conn::Http1(Handle { send, task }))
    }

    async fn http2<T>(
        self: &Arc<Self>,
        set: usize,
        key: &OriginKey,
        io: T,
    ) -> Result<Conn, PoolError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(PoolError::Exchange)?;
        let task = self.spawn_connection(key, conn);
        let mut origins = self.origins(set);
        origins.by_key.entry(key.clone()).or_default().h2 = Some(Http2 {
            conn: Handle {
                send: send.clone(),
                task,
            },
            used: Instant::now(),
        });
        self.reaping(&mut origins, set);
        Ok(Conn::Http2(send))
    }

    /// Drops the connections of `set` idle for `idle_timeout`; whether any is left.
    fn reap(&self, set: usize, now: Instant) -> bool {
        let mut origins = self.origins(set);
        let idle_timeout = self.idle_timeout;
        origins.by_key.retain(|_, origin| {
            origin
                .idle
                .retain(|i| !i.conn.send.is_closed() && now.duration_since(i.since) < idle_timeout);
            // An HTTP/2 connection is closed after `idle_timeout` without a new request; its
            // open streams (a long download) still finish.
            if origin.h2.as_ref().is_some_and(|h2| {
                h2.conn.send.is_closed() || now.duration_since(h2.used) >= idle_timeout
            }) {
                origin.h2 = None;
            }
            !origin.idle.is_empty() || origin.h2.is_some()
        });
        origins.reaping = !origins.by_key.is_empty();
        origins.reaping
    }
}

/// Closes the idle connections of `set` every `idle_timeout / 2` while the pool lives and has
/// any in that set.
async fn reap(pool: Weak<Inner>, set: usize, idle_timeout: Duration) {
    let every = (idle_timeout / 2).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        if !pool.reap(set, Instant::now()) {
            return;
        }
    }
}

/// Tries each address the host resolves to, in order.
async fn tcp_connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the name resolves to no address",
        )
    }))
}

/// An HTTP/1.1 connection lent to one exchange.
struct Lease {
    pool: Weak<Inner>,
    /// The set it came from, and goes back to.
    set: usize,
    key: OriginKey,
    conn: Http1,
    /// The response began before the caller's streamed request body was all sent: the
    /// connection is not reused.
    early: bool,
}

impl Lease {
    /// The response was read to its end: the connection goes back to the pool, unless the
    /// response began before the request's body was all sent (then it is closed, and the rest of
    /// the body never goes out).
    fn give_back(self) {
        if self.early {
            return self.close();
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.checkin(self.set, self.key, self.conn);
        }
    }

    /// The answer was not read to its end: the connection is closed now (else it would wait for
    /// the rest of a body nobody reads).
    fn close(self) {
        self.conn.task.abort();
    }
}

/// An upstream's response body; an HTTP/1.1 connection goes back to the pool when it has been
/// read to its end.
pub struct UpstreamBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn give_back_at_end(&mut self) {
        if self.body.is_end_stream() {
            if let Some(lease) = self.lease.take() {
                lease.give_back();
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let poll = Pin::new(&mut self.body).poll_frame(cx);
        match &poll {
            Poll::Ready(None) => {
                if let Some(lease) = self.lease.take() {
                    lease.give_back();
                }
            }
            Poll::Ready(Some(Ok(_))) => self.give_back_at_end(),
            // A broken body: its connection is not reused.
            Poll::Ready(Some(Err(_))) => {
                if let Some(lease) = self.lease.take() {
                    lease.close();
                }
            }
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    /// A body dropped at its end (an empty one, or one whose reader stopped at its last frame)
    /// gives its connection back; one dropped before its end closes it.
    fn drop(&mut self) {
        self.give_back_at_end();
        if let Some(lease) = self.lease.take() {
            lease.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An HTTP/1.1 upstream answering `ok`; counts the connections it accepted.
    async fn upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }),
                ));
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn each_worker_keeps_its_own_connections() {
        use http_body_util::BodyExt;
        let (addr, accepted) = upstream().await;
        let workers = crate::workers::Workers::start(2).unwrap();
        let pool = Pool::new(PoolSettings {
            tls: crate::tls::client_config(None).unwrap(),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            http1_only: false,
            workers: 2,
            metrics: crate::metrics::Metrics::new().set::<ProxyMetrics>(),
        });
        // On worker 0, 1, 0, 1, then off the workers (the set of worker 0).
        let on = |runtime: Option<&tokio::runtime::Handle>| {
            let pool = pool.clone();
            let request = async move {
                let request = Request::get(format!("http://{addr}/"))
                    .body(ProxyBody::Empty)
                    .unwrap();
                let response = pool.request(request, None).await.unwrap();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], b"ok");
                crate::workers::current()
            };
            match runtime {
                Some(runtime) => runtime.spawn(request),
                None => tokio::spawn(request),
            }
        };
        let [w0, w1] = workers.runtimes() else {
            panic!("two workers")
        };
        assert_eq!(on(Some(w0)).await.unwrap(), Some(0));
        assert_eq!(on(Some(w1)).await.unwrap(), Some(1));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "one connection per worker"
        );
        assert_eq!(on(Some(w0)).await.unwrap(), Some(0));
        assert_eq!(on(Some(w1)).await.unwrap(), Some(1));
        assert_eq!(on(None).await.unwrap(), None);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "each worker reused its own; off the workers, the first set's"
        );
        drop(pool);
        workers.stop();
    }
}
