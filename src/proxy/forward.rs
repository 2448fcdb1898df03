//! Forwarding: the pooled upstream clients, the body type that streams both ways, and one send
//! with its timeouts and error classification.
//!
//! One client per distinct upstream setting (extra CA file, connect timeout), built when a config
//! is loaded (the system roots are read then), never per request. Each is a keep-alive pool over rustls (system roots plus the
//! route's CA), speaking HTTP/1.1 or HTTP/2 as ALPN decides, plain `http` too.
//!
//! Must never: collect a streamed body, hold a lock across an await, or turn an upstream's error
//! text into something the caller sees.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::error::ProxyError;
use crate::config::{Config, RouteConfig};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body going to the upstream or back to the caller: passed through as a stream, or small and
/// already in memory (a buffered request for replay, an error response).
#[derive(Debug)]
pub enum ProxyBody {
    Empty,
    Full(Option<Bytes>),
    Stream(Incoming),
    /// A streamed request body with a size limit (`limits.max_body_bytes`).
    Limited(Limited<Incoming>),
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> ProxyBody {
        ProxyBody::Full(Some(bytes))
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
            ProxyBody::Stream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Limited(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            ProxyBody::Stream(body) => body.is_end_stream(),
            ProxyBody::Limited(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Stream(body) => body.size_hint(),
            ProxyBody::Limited(body) => body.size_hint(),
        }
    }
}

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

/// What makes two routes need different clients.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    ca_file: Option<PathBuf>,
    connect_timeout: Duration,
}

/// The upstream clients of one config; routes refer to them by index.
pub struct Clients {
    clients: Vec<UpstreamClient>,
}

impl Clients {
    /// Builds one client per distinct setting and returns, for each route (in config order), the
    /// index of its client.
    pub fn from_config(config: &Config) -> Result<(Clients, Vec<usize>), String> {
        let mut index: HashMap<ClientKey, usize> = HashMap::new();
        let mut clients = Vec::new();
        let mut per_route = Vec::with_capacity(config.routes.len());
        for route in &config.routes {
            let key = ClientKey {
                ca_file: route.upstream_ca_file.clone(),
                connect_timeout: route.connect_timeout,
            };
            let i = match index.get(&key) {
                Some(i) => *i,
                None => {
                    clients.push(build_client(route, config)?);
                    index.insert(key, clients.len() - 1);
                    clients.len() - 1
                }
            };
            per_route.push(i);
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

fn build_client(route: &RouteConfig, config: &Config) -> Result<UpstreamClient, String> {
    // ALPN is left to the connector builder (h2, http/1.1).
    let tls = crate::tls::client_config(route.upstream_ca_file.as_deref())
        .map_err(|e| format!("route {}: {e}", route.name))?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(route.connect_timeout));
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.limits.idle_timeout)
        .build(connector))
}

/// Sends one request and waits up to `timeout` for the response headers.
pub async fn send(
    client: &UpstreamClient,
    request: Request<ProxyBody>,
    timeout: Duration,
) -> Result<Response<Incoming>, ProxyError> {
    match tokio::time::timeout(timeout, client.request(request)).await {
        Err(_) => Err(ProxyError::UpstreamTimeout),
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(classify(&e)),
    }
}

/// Maps a client error: an over-long request body is the caller's fault (413), the rest is the
/// upstream's (502).
fn classify(e: &hyper_util::client::legacy::Error) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<LengthLimitError>() {
            return ProxyError::BodyTooLarge;
        }
        source = err.source();
    }
    let what = if e.is_connect() {
        "connect"
    } else {
        "exchange"
    };
    ProxyError::UpstreamUnavailable(format!("upstream {what} failed: {}", error_chain(e)))
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
        .map_err(|_| ProxyError::BadRequest("the request body could not be read"))
}
