//! Forwarding: the pooled upstream clients, the body type that streams both ways, and one send
//! with its timeouts and error classification.
//!
//! One client per distinct upstream setting (extra CA file, connect timeout, HTTP/1.1 only),
//! built when a config is loaded (the system roots are read then), never per request. Each is a
//! keep-alive pool ([`pool`]) over rustls (system roots plus the route's CA), speaking HTTP/1.1
//! or HTTP/2 as ALPN decides, plain `http` too.
//!
//! Must never: collect a streamed body, hold a lock across an await, or turn an upstream's error
//! text into something the caller sees.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use super::admit::{self, BodySize};
use super::error::ProxyError;
use super::log::Logged;
use super::ProxyMetrics;
use crate::config::{Config, RouteConfig};

mod pool;

pub use pool::{Again, Pool as UpstreamClient, UpstreamBody};
use pool::{PoolError, PoolSettings};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body going to the upstream or back to the caller: passed through as a stream, or small and
/// already in memory (a buffered request for replay, an error response).
#[derive(Debug)]
pub enum ProxyBody {
    Empty,
    Full(Option<Bytes>),
    /// An upstream's response body; a failure while it streams (broken framing, a reset, a cut)
    /// is counted in these metrics as [`upstream_body_failed`].
    Stream(UpstreamBody, Arc<ProxyMetrics>),
    /// The caller's streamed request body, under `limits.max_body_bytes`, and how much of it was
    /// read so far (for the log line, and for the upstream connection: see [`CallerRead`]); its
    /// read errors are marked as the caller's ([`CallerBodyError`]).
    Caller(Limited<Incoming>, Arc<CallerRead>),
    /// A response body that writes the request's log line at its end (`log`).
    Logged(Box<Logged>),
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody::Full(Some(bytes))
    }

    /// The caller's request body, streamed, with an optional size limit; `read` follows it.
    pub fn caller(body: Incoming, limit: Option<u64>, read: Arc<CallerRead>) -> ProxyBody {
        let limit = limit.map_or(usize::MAX, |l| usize::try_from(l).unwrap_or(usize::MAX));
        ProxyBody::Caller(Limited::new(body, limit), read)
    }

    /// How much of the caller's streamed body was read, for a body that is one.
    pub fn caller_read(&self) -> Option<&Arc<CallerRead>> {
        match self {
            ProxyBody::Caller(_, read) => Some(read),
            _ => None,
        }
    }
}

/// How much of a caller's streamed request body the upstream client has read (and so sent on),
/// and whether it read it to its end. An upstream connection whose answer began before its
/// request's body was all read is not used again (`pool`): the rest of that body would follow on
/// it, and an upstream that answered without reading its body could take those bytes for a
/// request.
#[derive(Debug, Default)]
pub struct CallerRead {
    bytes: AtomicU64,
    ended: AtomicBool,
}

impl CallerRead {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The body was read to its end.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }
}

/// Reading the caller's body failed (malformed chunking, the caller went away): the caller's
/// fault, which the upstream client reports as its own body error.
#[derive(Debug)]
pub struct CallerBodyError(BoxError);

impl std::fmt::Display for CallerBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the caller's body: {}", self.0)
    }
}

impl std::error::Error for CallerBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => Poll::Ready(
                bytes
                    .take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            ProxyBody::Stream(body, metrics) => Pin::new(body).poll_frame(cx).map_err(|e| {
                metrics.record_error(upstream_body_failed(&e).spec().code);
                e.into()
            }),
            ProxyBody::Caller(body, read) => {
                let poll = Pin::new(&mut *body).poll_frame(cx);
                match &poll {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            read.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                        if body.is_end_stream() {
                            read.ended.store(true, Ordering::Relaxed);
                        }
                    }
                    Poll::Ready(None) => read.ended.store(true, Ordering::Relaxed),
                    _ => {}
                }
                poll.map_err(|e| {
                    if e.is::<LengthLimitError>() {
                        e
                    } else {
                        Box::new(CallerBodyError(e))
                    }
                })
            }
            ProxyBody::Logged(logged) => logged.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            ProxyBody::Stream(body, _) => body.is_end_stream(),
            ProxyBody::Caller(body, _) => body.is_end_stream(),
            ProxyBody::Logged(logged) => logged.body().is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Stream(body, _) => body.size_hint(),
            ProxyBody::Caller(body, _) => body.size_hint(),
            ProxyBody::Logged(logged) => logged.body().size_hint(),
        }
    }
}

/// What makes two routes need different clients.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    ca_file: Option<PathBuf>,
    connect_timeout: Duration,
    /// HTTP/1.1 only, never h2 (for `Upgrade`s, which HTTP/2 does not have).
    http1_only: bool,
}

/// The clients of one route, by index into [`Clients`].
#[derive(Debug, Clone, Copy)]
pub struct RouteClients {
    pub plain: usize,
    /// HTTP/1.1 only, for `Upgrade`s: when the route has `upgrades`.
    pub upgrade: Option<usize>,
}

/// The upstream clients of one config; routes refer to them by index.
pub struct Clients {
    clients: Vec<UpstreamClient>,
}

impl Clients {
    /// Builds one client per distinct setting and returns, for each route (in config order), the
    /// index of its client and, for a route with `upgrades`, of its HTTP/1.1-only client.
    pub fn from_config(
        config: &Config,
        metrics: &Arc<ProxyMetrics>,
    ) -> Result<(Clients, Vec<RouteClients>), String> {
        let mut index: HashMap<ClientKey, usize> = HashMap::new();
        let mut clients = Vec::new();
        let mut per_route = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let mut client = |http1_only: bool| {
                let key = ClientKey {
                    ca_file: route.upstream_ca_file.clone(),
                    connect_timeout: route.connect_timeout,
                    http1_only,
                };
                if let Some(i) = index.get(&key) {
                    return Ok::<_, String>(*i);
                }
                clients.push(build_client(route, config, http1_only, metrics)?);
                index.insert(key, clients.len() - 1);
                Ok(clients.len() - 1)
            };
            let plain = client(false)?;
            let upgrade = match route.upgrades.is_empty() {
                true => None,
                false => Some(client(true)?),
            };
            per_route.push(RouteClients { plain, upgrade });
        }
        Ok((Clients { clients }, per_route))
    }

    pub fn get(&self, i: usize) -> &UpstreamClient {
        &self.clients[i]
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

fn build_client(
    route: &RouteConfig,
    config: &Config,
    http1_only: bool,
    metrics: &Arc<ProxyMetrics>,
) -> Result<UpstreamClient, String> {
    let tls = crate::tls::client_config(route.upstream_ca_file.as_deref())
        .map_err(|e| format!("route {}: {e}", route.name))?;
    Ok(UpstreamClient::new(PoolSettings {
        tls,
        connect_timeout: route.connect_timeout,
        idle_timeout: config.limits.idle_timeout,
        http1_only,
        workers: crate::workers::count(config.limits.workers),
        metrics: metrics.clone(),
    }))
}

/// Sends one request and waits up to `timeout` for the response headers.
///
/// With `again` (a request whose body is in memory), the pool sends it once more, within the
/// same `timeout`, where that is safe: an HTTP/2 stream the upstream refused, or (an idempotent
/// request, as RFC 9110 9.2.2 allows and nginx does) a kept-alive connection that closed under
/// it before any answer. Any other failure is the caller's answer (502).
pub async fn send(
    client: &UpstreamClient,
    request: Request<ProxyBody>,
    timeout: Duration,
    again: Option<Again<'_>>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    match tokio::time::timeout(timeout, client.request(request, again)).await {
        Err(_) => Err(ProxyError::UpstreamTimeout),
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(classify(&e)),
    }
}

/// Maps a client error: a request body read past its limit (413, judged by `admit`) or one that
/// broke off or was malformed (400) is the caller's fault; no connection within
/// `connect_timeout` is the upstream's timeout (504), the rest is the upstream's failure (502).
fn classify(e: &PoolError) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<LengthLimitError>() {
            if let Err(too_large) = admit::body(BodySize::ReadPastLimit, None) {
                return too_large;
            }
        }
        if let Some(caller) = err.downcast_ref::<CallerBodyError>() {
            return ProxyError::ClientBody(error_chain(caller));
        }
        source = err.source();
    }
    let what = match e {
        PoolError::ConnectTimeout(_) => return ProxyError::UpstreamTimeout,
        PoolError::Connect(_) => "connect",
        PoolError::Exchange(_) => "exchange",
    };
    ProxyError::UpstreamUnavailable(format!("upstream {what} failed: {}", error_chain(e)))
}

/// What an upstream's response body that failed after its head went out to the caller is logged
/// and counted as (the caller's connection is cut: hyper cannot end the answer cleanly).
pub fn upstream_body_failed(e: &dyn std::error::Error) -> ProxyError {
    ProxyError::UpstreamUnavailable(format!("the upstream's body broke off: {}", error_chain(e)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Reads a request body whose length is known and small into memory, so that it can be sent
/// twice. A read error means the caller went away or sent a broken body.
pub async fn buffer(body: Incoming, content_length: usize) -> Result<Bytes, ProxyError> {
    Limited::new(body, content_length)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ProxyError::ClientBody(format!("the caller's body: {}", error_chain(&*e))))
}
