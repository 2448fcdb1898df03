//! One proxied request, from the first header to the log line: check method, framing and limits,
//! decide the canonical target (path and authority, see `target`), identify the caller, route on
//! that target, fetch the token, rewrite, forward that same target (replaying once after an
//! upstream 401 when the body allows it), and stream the answer back, or hand an accepted
//! `Upgrade` to its tunnel.
//!
//! [`handle`] never fails: the inner [`proxy`] returns `Result`, and [`handle`] turns an error into
//! its response once, records the metrics of the request and hands the response body the one log
//! line (`log`), which it writes at its end. A request that never gets that far (cut at the
//! shutdown deadline, or its client went away) still gets one log line and is counted in
//! `requests_cut`.
//!
//! Must never: log a header value, contact the broker or the upstream before the caller is
//! identified and allowed, forward `CONNECT` or `TRACE`, or replay a request whose body was
//! streamed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING, UPGRADE};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use hyper::body::Incoming;

use super::forward::{self, ProxyBody, UpstreamClient};
use super::io::Activity;
use super::listener::ConnHold;
use super::log::{BytesIn, Logged, RequestLog};
use super::rewrite::{self, Forwarded, X_REQUEST_ID};
use super::route::Route;
use super::target::Target;
use super::upgrade::{self, Tunnel};
use super::{identify, ConnIdentity, ProxyError, Shared, State, TokenSource};
use tracing::Instrument;

use crate::config::Limits;
use crate::metrics::Metrics;
use crate::telemetry;
use crate::token::{InjectToken, Rejection};

/// What a request knows about its connection.
#[derive(Debug)]
pub struct ConnInfo {
    pub identity: ConnIdentity,
    pub peer: SocketAddr,
    /// The peer's IP as an `X-Forwarded-For` element, made once for the connection.
    pub peer_ip: HeaderValue,
    /// `http` or `https`.
    pub proto: &'static str,
    pub activity: Arc<Activity>,
    /// The connection's slot and shutdown deadline, when it came through a listener.
    pub(crate) hold: Option<Arc<ConnHold>>,
}

impl ConnInfo {
    /// A plain connection from `peer` on `listener`, no client certificate yet.
    pub fn new(listener: impl Into<Arc<str>>, peer: SocketAddr) -> ConnInfo {
        ConnInfo {
            identity: ConnIdentity {
                listener: listener.into(),
                cert: Vec::new(),
            },
            peer,
            peer_ip: rewrite::peer_ip_value(peer.ip()),
            proto: "http",
            activity: Arc::default(),
            hold: None,
        }
    }
}

/// What the log line and the metrics say about a request.
#[derive(Default)]
struct Outcome<'s> {
    caller: Option<&'s Arc<str>>,
    route: Option<&'s Arc<str>>,
    upstream: Option<Duration>,
    /// The canonical path, kept only when a request line can be written.
    path: Option<Box<str>>,
    bytes_in: BytesIn,
}

/// A request between its first header and its answer: if dropped unanswered (the connection was
/// cut at the shutdown deadline, or its client went away), it writes the request's one log line.
struct Pending<'a> {
    outcome: Outcome<'a>,
    answered: bool,
    conn: &'a ConnInfo,
    metrics: &'a Metrics,
    method: &'a Method,
    request_id: &'a HeaderValue,
    started: Instant,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let at_deadline = self
            .conn
            .hold
            .as_ref()
            .is_some_and(|h| h.hard_stop.is_triggered());
        let reason = if at_deadline {
            "shutdown"
        } else {
            "client_gone"
        };
        let route = self.outcome.route.map_or("-", |r| &**r);
        let caller = self.outcome.caller.map_or("-", |c| &**c);
        let path = self.outcome.path.as_deref().unwrap_or("-");
        let listener = &*self.conn.identity.listener;
        let peer = self.conn.peer;
        let request_id = self.request_id.to_str().unwrap_or("-");
        let latency_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let bytes_in = self.outcome.bytes_in.get();
        let method = self.method;
        if at_deadline {
            tracing::warn!(target: "tokenbroker::request", %method, path, route, caller, listener,
                %peer, request_id, latency_ms, bytes_in, reason, "request cut at the shutdown deadline");
        } else {
            tracing::info!(target: "tokenbroker::request", %method, path, route, caller, listener,
                %peer, request_id, latency_ms, bytes_in, reason, "request abandoned by its client");
        }
        self.metrics.record_cut(self.outcome.route, reason);
    }
}

/// Serves one request; never fails.
pub(crate) async fn handle<T: TokenSource>(
    request: Request<Incoming>,
    conn: &ConnInfo,
    shared: &Shared<T>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let state = shared.state.load_full();
    let request_id = rewrite::request_id(request.headers());
    let method = request.method().clone();
    let version = request.version();
    let mut pending = Pending {
        outcome: Outcome::default(),
        answered: false,
        conn,
        metrics: &shared.metrics,
        method: &method,
        request_id: &request_id,
        started,
    };

    let span = match telemetry::is_on() {
        true => server_span(&request, conn),
        false => tracing::Span::none(),
    };
    let result = {
        // Pinned where it is made: the span wraps a pointer to it, not a copy of it.
        let proxied = std::pin::pin!(proxy(
            request,
            conn,
            &state,
            shared,
            &request_id,
            &mut pending.outcome,
        ));
        proxied.instrument(span.clone()).await
    };
    pending.answered = true;
    let outcome = &pending.outcome;
    let (response, error) = match result {
        Ok(response) => (response, None),
        Err(e) => {
            shared.metrics.record_error(e.spec().code);
            let logged = (e.spec().code, e.detail().map(str::to_owned));
            (e.into_response(&request_id, version), Some(logged))
        }
    };

    let total = started.elapsed();
    let status = response.status().as_u16();
    shared.metrics.record_request(
        outcome.route,
        outcome.caller,
        status,
        total,
        outcome.upstream,
    );
    let (error, detail) = error.unzip();
    let own_failure = error.is_some() && status >= 500;
    let trace_id = match span.is_none() {
        true => None,
        false => finish_server_span(&span, &method, outcome, status, error),
    };
    // A streamed answer may yet break off, which is a WARN line.
    let logged = if own_failure || matches!(response.body(), ProxyBody::Stream(..)) {
        tracing::enabled!(target: "tokenbroker::request", tracing::Level::WARN)
    } else {
        tracing::enabled!(target: "tokenbroker::request", tracing::Level::INFO)
    };
    if !logged {
        return response;
    }
    let outcome = std::mem::take(&mut pending.outcome);
    let log = RequestLog {
        method: Some(method.clone()),
        route: outcome.route.cloned(),
        caller: outcome.caller.cloned(),
        path: outcome.path,
        listener: conn.identity.listener.clone(),
        peer: conn.peer,
        status,
        latency: total,
        upstream: outcome.upstream,
        request_id: request_id.clone(),
        error,
        detail: detail.flatten(),
        bytes_in: outcome.bytes_in,
        bytes_out: 0,
        broke_off: false,
        trace_id,
    };
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, ProxyBody::Logged(Box::new(Logged::new(body, log))))
}

/// The server span of a request, child of the caller's span when it sent a W3C `traceparent`.
fn server_span<B>(request: &Request<B>, conn: &ConnInfo) -> tracing::Span {
    let method = request.method();
    let span = tracing::info_span!(
        target: "tokenbroker::trace",
        "request",
        otel.name = %method,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        url.path = tracing::field::Empty,
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        tokenbroker.caller = tracing::field::Empty,
        tokenbroker.listener = &*conn.identity.listener,
        tokenbroker.error = tracing::field::Empty,
        network.peer.address = %conn.peer.ip(),
    );
    telemetry::set_parent_from(&span, request.headers());
    span
}

/// Records what the request came to on its server span; its trace id for the log line.
fn finish_server_span(
    span: &tracing::Span,
    method: &Method,
    outcome: &Outcome<'_>,
    status: u16,
    error: Option<&'static str>,
) -> Option<String> {
    if let Some(route) = outcome.route {
        span.record("http.route", &**route);
        telemetry::rename(span, format!("{method} {route}"));
    }
    if let Some(caller) = outcome.caller {
        span.record("tokenbroker.caller", &**caller);
    }
    if let Some(path) = outcome.path.as_deref() {
        span.record("url.path", path);
    }
    // as i64: the OpenTelemetry layer exports u64 fields as text
    span.record("http.response.status_code", i64::from(status));
    if let Some(error) = error {
        span.record("tokenbroker.error", error);
    }
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    telemetry::trace_id(span)
}

async fn proxy<'s, T: TokenSource>(
    mut request: Request<Incoming>,
    conn: &ConnInfo,
    state: &'s State,
    shared: &Shared<T>,
    request_id: &HeaderValue,
    outcome: &mut Outcome<'s>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let tokens = &*shared.tokens;
    check_head(&request, &conn.activity, &state.limits)?;
    let target = Target::of(&request, state.limits.merge_slashes)?;
    if tracing::enabled!(target: "tokenbroker::request", tracing::Level::WARN) {
        outcome.path = Some(Box::from(&*target.path));
    }
    let caller = identify(&state.callers, &conn.identity, request.headers())?;
    outcome.caller = Some(caller);
    let route = find_route(state, &target, caller)?;
    outcome.route = Some(&route.name);
    let upgrading = upgrade::requested(&request);
    if upgrading {
        upgrade::check(route, &request)?;
    }
    let content_length = content_length(request.headers());
    if let (Some(max), Some(len)) = (state.limits.max_body_bytes, content_length) {
        if len > max {
            return Err(ProxyError::BodyTooLarge);
        }
    }

    let token = tokens.token(caller).await?;
    let uri = route.upstream_uri(&target)?;
    let forwarded_host = target.forwarded_host();
    let on_upgrade = upgrading.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    let offered: Vec<HeaderValue> = match upgrading {
        true => parts.headers.get_all(UPGRADE).iter().cloned().collect(),
        false => Vec::new(),
    };
    rewrite::rewrite_request(
        &mut parts.headers,
        &token.header,
        &Forwarded {
            peer_ip: &conn.peer_ip,
            proto: conn.proto,
            host: forwarded_host.as_ref(),
            request_id,
        },
        route.passed_claims,
    );
    if upgrading {
        // Hop-by-hop, so removed above: the handshake asks the upstream for the same upgrade.
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        for value in &offered {
            parts.headers.append(UPGRADE, value.clone());
        }
    }
    parts.uri = uri;
    // The client picks HTTP/1.1 or h2 towards the upstream; it refuses an HTTP/2 request on an
    // HTTP/1 connection, so the request goes out as version-neutral HTTP/1.1.
    parts.version = Version::HTTP_11;

    let client = match (upgrading, route.upgrade_client) {
        (true, Some(http1_only)) => state.clients.get(http1_only),
        _ => state.clients.get(route.client),
    };
    let body = outgoing_body(body, content_length, &state.limits).await?;
    outcome.bytes_in = match &body {
        Outgoing::Replayable(None) => BytesIn::None,
        Outgoing::Replayable(Some(bytes)) => BytesIn::Known(bytes.len() as u64),
        Outgoing::Streaming(ProxyBody::Caller(_, read)) => BytesIn::Counted(read.clone()),
        Outgoing::Streaming(_) => BytesIn::None,
    };
    let upstream_span = match telemetry::is_on() {
        true => {
            let span = upstream_span(route);
            telemetry::inject(&span, &mut parts.headers);
            span
        }
        false => tracing::Span::none(),
    };
    let upstream_started = Instant::now();
    let exchange = std::pin::pin!(async {
        match body {
            Outgoing::Replayable(body) => {
                let renew = Renew {
                    tokens,
                    caller,
                    token: &token,
                };
                send_replayable(client, route, parts, body, renew).await
            }
            Outgoing::Streaming(body) => {
                forward::send(
                    client,
                    Request::from_parts(parts, body),
                    route.response_timeout,
                )
                .await
            }
        }
    });
    let result = exchange.instrument(upstream_span.clone()).await;
    outcome.upstream = Some(upstream_started.elapsed());
    if !upstream_span.is_none() {
        match &result {
            Ok(response) => {
                upstream_span.record(
                    "http.response.status_code",
                    i64::from(response.status().as_u16()),
                );
            }
            Err(e) => {
                upstream_span.record("tokenbroker.error", e.spec().code);
                upstream_span.record("otel.status_code", "ERROR");
            }
        }
    }
    drop(upstream_span);

    let mut response = result?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(caller_side) = on_upgrade else {
            return Err(ProxyError::UpstreamUnavailable(
                "the upstream switched protocols on a request that asked for no upgrade".into(),
            ));
        };
        upgrade::check_switch(route, &offered, response.headers())?;
        let upstream_side = hyper::upgrade::on(&mut response);
        let (mut parts, _) = response.into_parts();
        let accepted: Vec<HeaderValue> = parts.headers.get_all(UPGRADE).iter().cloned().collect();
        rewrite::rewrite_response(&mut parts.headers);
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        for value in accepted {
            parts.headers.append(UPGRADE, value);
        }
        parts.headers.insert(X_REQUEST_ID, request_id.clone());
        Tunnel {
            caller: caller_side,
            upstream: upstream_side,
            route: route.name.clone(),
            metrics: shared.metrics.clone(),
            hold: conn.hold.clone(),
            activity: conn.activity.clone(),
            idle_timeout: state.limits.idle_timeout,
        }
        .spawn();
        return Ok(Response::from_parts(parts, ProxyBody::Empty));
    }
    let (mut parts, body) = response.into_parts();
    rewrite::rewrite_response(&mut parts.headers);
    parts.headers.insert(X_REQUEST_ID, request_id.clone());
    Ok(Response::from_parts(
        parts,
        ProxyBody::Stream(body, shared.metrics.clone()),
    ))
}

/// The client span of the upstream call (a child of the request's span).
fn upstream_span(route: &Route) -> tracing::Span {
    let upstream = route.upstream_authority();
    tracing::info_span!(
        target: "tokenbroker::trace",
        "upstream",
        otel.name = %format_args!("upstream {}", route.name),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.route = &*route.name,
        server.address = %upstream,
        http.response.status_code = tracing::field::Empty,
        tokenbroker.error = tracing::field::Empty,
    )
}

/// Checks that need no caller: method (`CONNECT` and `TRACE` are 405: one would open a tunnel
/// around every route, the other would echo the injected token back), ambiguous framing (400)
/// and header size (431).
pub fn check_head<B>(
    request: &Request<B>,
    activity: &Activity,
    limits: &Limits,
) -> Result<(), ProxyError> {
    if matches!(*request.method(), Method::CONNECT | Method::TRACE) {
        return Err(ProxyError::MethodNotAllowed);
    }
    let headers = request.headers();
    if headers.contains_key(TRANSFER_ENCODING)
        && (headers.contains_key(CONTENT_LENGTH)
            || (request.version() <= Version::HTTP_11 && activity.saw_ambiguous_framing()))
    {
        return Err(ProxyError::BadRequest(
            "a request must not carry both Content-Length and Transfer-Encoding",
        ));
    }
    if header_bytes(headers) > limits.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge);
    }
    Ok(())
}

/// Size of the headers as sent on HTTP/1 (`name: value\r\n`).
fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// The route for a canonical target and caller: 404 without a route, 403 when the caller is not
/// allowed on it.
pub fn find_route<'s>(
    state: &'s State,
    target: &Target<'_>,
    caller: &str,
) -> Result<&'s Route, ProxyError> {
    let route = state
        .routes
        .find(target.host(), &target.path)
        .ok_or(ProxyError::NoRoute)?;
    if !route.allows(caller) {
        return Err(ProxyError::Forbidden);
    }
    Ok(route)
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

enum Outgoing {
    /// No body, or a small one in memory: can be sent again.
    Replayable(Option<Bytes>),
    Streaming(ProxyBody),
}

/// Buffers the body only when its length is known and at most `replay_buffer_bytes`; streams it
/// otherwise (under `max_body_bytes` when set).
async fn outgoing_body(
    body: Incoming,
    content_length: Option<u64>,
    limits: &Limits,
) -> Result<Outgoing, ProxyError> {
    if body.is_end_stream() {
        return Ok(Outgoing::Replayable(None));
    }
    if let Some(len) = content_length {
        if len <= limits.replay_buffer_bytes as u64 {
            let bytes = forward::buffer(body, len as usize).await?;
            return Ok(Outgoing::Replayable(Some(bytes)));
        }
    }
    Ok(Outgoing::Streaming(ProxyBody::caller(
        body,
        limits.max_body_bytes,
        Arc::default(),
    )))
}

fn replay_body(body: &Option<Bytes>) -> ProxyBody {
    match body {
        None => ProxyBody::Empty,
        Some(bytes) => ProxyBody::full(bytes.clone()),
    }
}

/// What an upstream 401 needs to get a renewed token.
struct Renew<'a, T> {
    tokens: &'a T,
    caller: &'a str,
    token: &'a InjectToken,
}

/// Sends a request that can be sent twice; after an upstream 401 the token's generation is
/// reported to the broker and the request is sent once more with the renewed token.
async fn send_replayable<T: TokenSource>(
    client: &UpstreamClient,
    route: &Route,
    mut parts: Parts,
    body: Option<Bytes>,
    renew: Renew<'_, T>,
) -> Result<Response<Incoming>, ProxyError> {
    let mut first = Request::new(replay_body(&body));
    *first.method_mut() = parts.method.clone();
    *first.uri_mut() = parts.uri.clone();
    *first.version_mut() = parts.version;
    *first.headers_mut() = parts.headers.clone();
    let response = forward::send(client, first, route.response_timeout).await?;
    if response.status() != StatusCode::UNAUTHORIZED {
        return Ok(response);
    }
    // Boxed: the rare path does not widen every request's future.
    let renewed =
        match Box::pin(renew.tokens.rejected(renew.caller, renew.token.generation)).await? {
            Rejection::Replay(token) => token,
            Rejection::PassOn => return Ok(response),
        };
    drop(response);
    tracing::debug!(caller = renew.caller, route = %route.name, "upstream refused the token; replaying once");
    parts.headers.insert(AUTHORIZATION, renewed.header.clone());
    let second = Request::from_parts(parts, replay_body(&body));
    forward::send(client, second, route.response_timeout).await
}
