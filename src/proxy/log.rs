//! The request log line, and its one writer ([`RequestLog::write`]): one per request, written
//! when the response body has been handed to hyper whole (or dropped), so that it can say how
//! many body bytes went each way; for a request cut unanswered, when it is dropped; for a head
//! hyper refused, when its answer is made.
//!
//! tokenbroker's own 5xx answers (502, 503, 504 of the error table) are logged at WARN, every
//! other line at INFO. Byte counts are the bodies' (not the heads'): the request body as read
//! from the caller (0 when it was never read, e.g. on a refusal), the response body as handed to
//! hyper. An upstream body that fails after the head went out is logged at WARN with the error
//! (`upstream_unavailable`) and `broke_off`, beside the status that was sent.
//!
//! Must never: log a header value or the query string.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method};
use http_body::{Body, Frame};

use super::forward::{upstream_body_failed, BoxError, CallerRead, ProxyBody};

/// How many request body bytes were read from the caller.
#[derive(Debug, Default)]
pub enum BytesIn {
    /// Not read (no body, or the request was refused first).
    #[default]
    None,
    /// Read into memory whole.
    Known(u64),
    /// Streamed: counted as the upstream client reads it.
    Counted(Arc<CallerRead>),
}

impl BytesIn {
    pub fn get(&self) -> u64 {
        match self {
            BytesIn::None => 0,
            BytesIn::Known(n) => *n,
            BytesIn::Counted(read) => read.bytes(),
        }
    }
}

/// Everything the request line says.
#[derive(Debug)]
pub struct RequestLog {
    /// `None` for a head hyper refused before it became a request.
    pub method: Option<Method>,
    pub route: Option<Arc<str>>,
    pub caller: Option<Arc<str>>,
    /// The canonical path, never the query (`None` before it was decided, or when it was refused).
    pub path: Option<Box<str>>,
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub status: u16,
    /// Request received to response headers.
    pub latency: Duration,
    pub upstream: Option<Duration>,
    pub request_id: HeaderValue,
    pub error: Option<&'static str>,
    pub detail: Option<String>,
    pub bytes_in: BytesIn,
    pub bytes_out: u64,
    /// The answer broke off after its head went out: its body failed (`error` says why).
    pub broke_off: bool,
    /// The OpenTelemetry trace id (32 hex digits), with telemetry on and the trace sampled.
    pub trace_id: Option<String>,
    /// Cut unanswered: `shutdown` (at the shutdown deadline, a WARN) or `client_gone`; such a
    /// line has no status.
    pub cut: Option<&'static str>,
}

impl RequestLog {
    /// Whether the line is a WARN: an answer of tokenbroker's own that is a 5xx, or one that
    /// broke off.
    pub fn is_own_failure(&self) -> bool {
        self.error.is_some() && (self.status >= 500 || self.broke_off)
    }

    /// Writes the line.
    pub fn write(&self) {
        if let Some(reason) = self.cut {
            return self.write_cut(reason);
        }
        macro_rules! line {
            ($level:expr) => {
                tracing::event!(
                    target: "tokenbroker::request",
                    $level,
                    method = self.method.as_ref().map_or("-", Method::as_str),
                    path = self.path.as_deref().unwrap_or("-"),
                    route = self.route.as_deref().unwrap_or("-"),
                    caller = self.caller.as_deref().unwrap_or("-"),
                    listener = &*self.listener,
                    peer = %self.peer,
                    status = self.status,
                    latency_ms = self.latency.as_secs_f64() * 1e3,
                    upstream_ms = self.upstream.map(|d| d.as_secs_f64() * 1e3),
                    bytes_in = self.bytes_in.get(),
                    bytes_out = self.bytes_out,
                    broke_off = self.broke_off.then_some(true),
                    request_id = self.request_id.to_str().unwrap_or("-"),
                    trace_id = self.trace_id.as_deref(),
                    error = self.error,
                    detail = self.detail.as_deref(),
                    "request"
                )
            };
        }
        if self.is_own_failure() {
            line!(tracing::Level::WARN);
        } else {
            line!(tracing::Level::INFO);
        }
    }

    /// The line of a request cut unanswered.
    fn write_cut(&self, reason: &'static str) {
        let method = self.method.as_ref().map_or("-", Method::as_str);
        let path = self.path.as_deref().unwrap_or("-");
        let route = self.route.as_deref().unwrap_or("-");
        let caller = self.caller.as_deref().unwrap_or("-");
        let listener = &*self.listener;
        let peer = self.peer;
        let request_id = self.request_id.to_str().unwrap_or("-");
        let latency_ms = self.latency.as_secs_f64() * 1e3;
        let bytes_in = self.bytes_in.get();
        if reason == "shutdown" {
            tracing::warn!(target: "tokenbroker::request", method, path, route, caller, listener,
                %peer, request_id, latency_ms, bytes_in, reason, "request cut at the shutdown deadline");
        } else {
            tracing::info!(target: "tokenbroker::request", method, path, route, caller, listener,
                %peer, request_id, latency_ms, bytes_in, reason, "request abandoned by its client");
        }
    }
}

/// A response body that counts what it hands out and writes the request line at its end.
#[derive(Debug)]
pub struct Logged {
    body: ProxyBody,
    log: Option<RequestLog>,
}

impl Logged {
    pub fn new(body: ProxyBody, log: RequestLog) -> Logged {
        Logged {
            body,
            log: Some(log),
        }
    }

    fn finish(&mut self) {
        if let Some(log) = self.log.take() {
            log.write();
        }
    }

    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.body).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(log)) = (frame.data_ref(), self.log.as_mut()) {
                    log.bytes_out += data.len() as u64;
                }
                // written before hyper sends the last bytes, so that a caller that has read the
                // whole answer finds the line logged
                if self.body.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(log) = self.log.as_mut() {
                    let failed = upstream_body_failed(&**e);
                    log.error = Some(failed.spec().code);
                    log.detail = failed.detail().map(str::to_owned);
                    log.broke_off = true;
                }
                self.finish();
            }
            Poll::Ready(None) => self.finish(),
            Poll::Pending => {}
        }
        poll
    }

    pub(super) fn body(&self) -> &ProxyBody {
        &self.body
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.finish();
    }
}
