//! One proxied request, as the phases it meets in order: admit (method, framing, header size,
//! the canonical target: `admit`, `target`), identify the caller, route on that target (allowed
//! caller, accepted upgrade, declared body size), fetch the token, build the upstream request
//! (`rewrite`), send it (replaying once after an upstream 401 when the body allows it), answer
//! (the upstream's answer streamed back, or an accepted `Upgrade` handed to its tunnel), log.
//!
//! [`handle`] never fails: an error of any phase becomes its response once, the metrics are
//! recorded and the response body gets the one log line (`log`), written at its end. A request
//! that never gets that far (cut at the shutdown deadline, or its client went away) still gets
//! its line and is counted in `requests_cut`. The answer to a head hyper refused itself is made
//! here too ([`answer_refused`]), for the transport (`io`) to write.
//!
//! The caller's head is kept whole until the answer: the phases read it, the upstream head is
//! made from it, and a replay after a 401 makes its head from it again; no header map is copied.
//!
//! Must never: log a header value, contact the broker or the upstream before the caller is
//! identified and allowed, forward `CONNECT` or `TRACE`, or replay a request whose body was
//! streamed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{
    Extensions, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body::Body;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

use super::admit::{self, BodySize};
use super::forward::{self, ProxyBody, UpstreamBody, UpstreamClient};
use super::io::{Activity, HypersRefusal};
use super::listener::ConnHold;
use super::log::{BytesIn, Logged, RequestLog};
use super::rewrite::{self, Forwarded, X_REQUEST_ID};
use super::route::Route;
use super::target::Target;
use super::upgrade::{self, Tunnel};
use super::{identify, ConnIdentity, ProxyError, Shared, State, TokenSource};
use tracing::Instrument;

use super::ProxyMetrics;
use crate::config::Limits;
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
    metrics: &'a ProxyMetrics,
    method: &'a Method,
    request_id: &'a HeaderValue,
    started: Instant,
}

impl Pending<'_> {
    /// The request's log line, its outcome taken.
    fn log_line(&mut self, status: u16, latency: Duration) -> RequestLog {
        let outcome = std::mem::take(&mut self.outcome);
        RequestLog {
            method: Some(self.method.clone()),
            route: outcome.route.cloned(),
            caller: outcome.caller.cloned(),
            path: outcome.path,
            listener: self.conn.identity.listener.clone(),
            peer: self.conn.peer,
            status,
            latency,
            upstream: outcome.upstream,
            request_id: self.request_id.clone(),
            error: None,
            detail: None,
            bytes_in: outcome.bytes_in,
            bytes_out: 0,
            broke_off: false,
            trace_id: None,
            cut: None,
        }
    }
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
        let route = self.outcome.route;
        let mut line = self.log_line(0, self.started.elapsed());
        line.cut = Some(reason);
        line.write();
        self.metrics.record_cut(route, reason);
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
    let (response, error) = match result {
        Ok(response) => (response, None),
        Err(e) => {
            shared.metrics.record_error(e.spec().code);
            let logged = (e.spec().code, e.detail().map(str::to_owned));
            (e.into_response(&request_id, version), Some(logged))
        }
    };
    log(response, error, &mut pending, &span)
}

/// Log: records the request's metrics and span, and hands the response body its log line (when
/// one can be written).
fn log(
    response: Response<ProxyBody>,
    error: Option<(&'static str, Option<String>)>,
    pending: &mut Pending<'_>,
    span: &tracing::Span,
) -> Response<ProxyBody> {
    let total = pending.started.elapsed();
    let status = response.status().as_u16();
    let outcome = &pending.outcome;
    pending.metrics.record_request(
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
        false => finish_server_span(span, pending.method, outcome, status, error),
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
    let mut line = pending.log_line(status, total);
    line.error = error;
    line.detail = detail.flatten();
    line.trace_id = trace_id;
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, ProxyBody::Logged(Box::new(Logged::new(body, line))))
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

/// The phases from the first header to the answer, in order; [`handle`] answers an error and
/// logs.
async fn proxy<'s, T: TokenSource>(
    mut request: Request<Incoming>,
    conn: &ConnInfo,
    state: &'s State,
    shared: &Shared<T>,
    request_id: &HeaderValue,
    outcome: &mut Outcome<'s>,
) -> Result<Response<ProxyBody>, ProxyError> {
    // The caller's head, kept whole; its body, extensions and side of an upgrade, apart.
    let upgrading = upgrade::requested(&request);
    let on_upgrade = upgrading.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    let extensions = std::mem::take(&mut parts.extensions);
    let head = Request::from_parts(parts, ());

    // admit, identify, route, token
    let target = admit_request(&head, conn, &state.limits, outcome)?;
    let caller = identify(&state.callers, &conn.identity, head.headers())?;
    outcome.caller = Some(caller);
    let content_length = admit::content_length(head.headers());
    let asked = Asked {
        head: &head,
        target: &target,
        upgrading,
        content_length,
    };
    let route = route_request(state, asked, caller, outcome)?;
    let token = shared.tokens.token(caller).await?;

    // build the upstream request, send it (one replay), answer
    let forwarded_host = target.forwarded_host();
    let outbound = Outbound {
        caller: &head,
        target: &target,
        route,
        forwarded: Forwarded {
            peer_ip: &conn.peer_ip,
            proto: conn.proto,
            host: forwarded_host.as_ref(),
            request_id,
        },
        upgrade: upgrading,
    };
    let client = match (upgrading, route.upgrade_client) {
        (true, Some(http1_only)) => state.clients.get(http1_only),
        _ => state.clients.get(route.client),
    };
    let uri = route.upstream_uri(&target)?;
    let body = outgoing_body(body, content_length, &state.limits).await?;
    outcome.bytes_in = body.bytes_in();
    let sending = Sending {
        uri,
        body,
        extensions,
    };
    let renew = Renew {
        tokens: &*shared.tokens,
        caller,
        token: &token,
    };
    let response = send_upstream(&outbound, client, sending, renew, outcome).await?;
    let upgrade = on_upgrade.map(|caller_side| (caller_side, head.headers()));
    answer_caller(
        response,
        upgrade,
        route,
        conn,
        &state.limits,
        &shared.metrics,
        request_id,
    )
}

/// Admit: the checks that need no caller (`admit::check_head`), and the canonical target.
fn admit_request<'r>(
    head: &'r Request<()>,
    conn: &ConnInfo,
    limits: &Limits,
    outcome: &mut Outcome<'_>,
) -> Result<Target<'r>, ProxyError> {
    admit::check_head(head, &conn.activity, limits)?;
    let target = Target::of(head, limits.merge_slashes)?;
    if tracing::enabled!(target: "tokenbroker::request", tracing::Level::WARN) {
        outcome.path = Some(Box::from(&*target.path));
    }
    Ok(target)
}

/// What the caller asked for, as admitted.
struct Asked<'a> {
    head: &'a Request<()>,
    target: &'a Target<'a>,
    /// An `Upgrade` the proxy has to decide on (`upgrade::requested`).
    upgrading: bool,
    content_length: Option<u64>,
}

/// Route: where the request goes on its canonical target, and whether it may go there (the
/// caller allowed, the upgrade accepted, the declared body within `max_body_bytes`).
fn route_request<'s>(
    state: &'s State,
    asked: Asked<'_>,
    caller: &str,
    outcome: &mut Outcome<'s>,
) -> Result<&'s Route, ProxyError> {
    let route = find_route(state, asked.target, caller)?;
    outcome.route = Some(&route.name);
    if asked.upgrading {
        upgrade::check(route, asked.head)?;
    }
    if let Some(len) = asked.content_length {
        admit::body(BodySize::Declared(len), state.limits.max_body_bytes)?;
    }
    Ok(route)
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

/// What the upstream request is built from: the caller's head (left as it is), its target and
/// route, and what the proxy adds. A replay builds its head from it again.
struct Outbound<'a> {
    caller: &'a Request<()>,
    target: &'a Target<'a>,
    route: &'a Route,
    forwarded: Forwarded<'a>,
    /// An upgrade the route accepted.
    upgrade: bool,
}

impl Outbound<'_> {
    /// Build: the request to `uri` with `token`, the caller's headers rewritten (and the trace
    /// context of `span`, with telemetry on).
    fn request(
        &self,
        uri: Uri,
        token: &HeaderValue,
        body: ProxyBody,
        extensions: Extensions,
        span: &tracing::Span,
    ) -> Request<ProxyBody> {
        let mut headers = rewrite::rewrite_request(
            self.caller.headers(),
            token,
            &self.forwarded,
            self.route.passed_claims,
            self.upgrade,
        );
        if telemetry::is_on() {
            telemetry::inject(span, &mut headers);
        }
        let mut request = Request::new(body);
        *request.method_mut() = self.caller.method().clone();
        *request.uri_mut() = uri;
        // The client picks HTTP/1.1 or h2 towards the upstream; it refuses an HTTP/2 request on
        // an HTTP/1 connection, so the request goes out as version-neutral HTTP/1.1.
        *request.version_mut() = Version::HTTP_11;
        *request.headers_mut() = headers;
        *request.extensions_mut() = extensions;
        request
    }
}

/// Send: the request to the upstream, and a replayable one once more after an upstream 401
/// (see [`exchange`]), in the upstream span; the time it took goes into `outcome`.
async fn send_upstream<T: TokenSource>(
    out: &Outbound<'_>,
    client: &UpstreamClient,
    sending: Sending,
    renew: Renew<'_, T>,
    outcome: &mut Outcome<'_>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let span = match telemetry::is_on() {
        true => upstream_span(out.route),
        false => tracing::Span::none(),
    };
    let started = Instant::now();
    // Pinned where it is made, as the request's own future is.
    let exchange = std::pin::pin!(exchange(out, client, sending, renew, &span));
    let result = exchange.instrument(span.clone()).await;
    outcome.upstream = Some(started.elapsed());
    if !span.is_none() {
        match &result {
            Ok(response) => {
                span.record(
                    "http.response.status_code",
                    i64::from(response.status().as_u16()),
                );
            }
            Err(e) => {
                span.record("tokenbroker.error", e.spec().code);
                span.record("otel.status_code", "ERROR");
            }
        }
    }
    result
}

/// What goes to the upstream besides the head [`Outbound`] builds.
struct Sending {
    uri: Uri,
    body: Outgoing,
    /// The caller's request extensions: with a streamed request, or with a replay.
    extensions: Extensions,
}

/// What an upstream 401 needs to get a renewed token.
struct Renew<'a, T> {
    tokens: &'a T,
    caller: &'a str,
    token: &'a InjectToken,
}

/// Builds and sends the request; a replayable one, after an upstream 401, once more: the token's
/// generation is reported to the broker and the request is built again with the renewed token.
/// A replayable one is also built again where `forward::send` may send it once more (a refused
/// HTTP/2 stream; for an idempotent one, a kept-alive connection that closed under it).
/// (Each request is built in the call that sends it, so no future holds a second copy of it.)
async fn exchange<T: TokenSource>(
    out: &Outbound<'_>,
    client: &UpstreamClient,
    sending: Sending,
    renew: Renew<'_, T>,
    span: &tracing::Span,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let timeout = out.route.response_timeout;
    let Sending {
        uri,
        body,
        extensions,
    } = sending;
    let (first, replay, extensions) = match body {
        Outgoing::Replayable(bytes) => (
            replay_body(&bytes),
            Some((bytes, extensions)),
            Extensions::new(),
        ),
        Outgoing::Streaming(body) => (body, None, extensions),
    };
    let token = &renew.token.header;
    // A request whose body is in memory can go out once more where that is safe
    // (`forward::send`).
    let again = replay.as_ref().map(|(bytes, _)| {
        move || {
            let uri = out.route.upstream_uri(out.target).ok()?;
            Some(out.request(uri, token, replay_body(bytes), Extensions::new(), span))
        }
    });
    let again = again.as_ref().map(|build| forward::Again {
        build,
        idempotent: out.caller.method().is_idempotent(),
    });
    let response = forward::send(
        client,
        out.request(uri, token, first, extensions, span),
        timeout,
        again,
    )
    .await?;
    let Some((body, extensions)) = replay else {
        return Ok(response);
    };
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
    tracing::debug!(caller = renew.caller, route = %out.route.name, "upstream refused the token; replaying once");
    let replay = {
        let uri = out.route.upstream_uri(out.target)?;
        let request = out.request(uri, &renewed.header, replay_body(&body), extensions, span);
        forward::send(client, request, timeout, None)
    };
    replay.await
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

/// Answer: the upstream's answer for the caller, its headers rewritten; the `101` to an accepted
/// upgrade (`upgrade`: the caller's side and its request's headers) hands both sides to a tunnel.
fn answer_caller(
    mut response: Response<UpstreamBody>,
    upgrade: Option<(OnUpgrade, &HeaderMap)>,
    route: &Route,
    conn: &ConnInfo,
    limits: &Limits,
    metrics: &Arc<ProxyMetrics>,
    request_id: &HeaderValue,
) -> Result<Response<ProxyBody>, ProxyError> {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = response.into_parts();
        rewrite::rewrite_response(&mut parts.headers, false);
        parts.headers.insert(X_REQUEST_ID, request_id.clone());
        return Ok(Response::from_parts(
            parts,
            ProxyBody::Stream(body, metrics.clone()),
        ));
    }
    let Some((caller_side, offered)) = upgrade else {
        return Err(ProxyError::UpstreamUnavailable(
            "the upstream switched protocols on a request that asked for no upgrade".into(),
        ));
    };
    upgrade::check_switch(route, offered, response.headers())?;
    let upstream_side = hyper::upgrade::on(&mut response);
    let (mut parts, _) = response.into_parts();
    rewrite::rewrite_response(&mut parts.headers, true);
    parts.headers.insert(X_REQUEST_ID, request_id.clone());
    Tunnel {
        caller: caller_side,
        upstream: upstream_side,
        route: route.name.clone(),
        metrics: metrics.clone(),
        hold: conn.hold.clone(),
        activity: conn.activity.clone(),
        idle_timeout: limits.idle_timeout,
    }
    .spawn();
    Ok(Response::from_parts(parts, ProxyBody::Empty))
}

enum Outgoing {
    /// No body, or a small one in memory: can be sent again.
    Replayable(Option<Bytes>),
    Streaming(ProxyBody),
}

impl Outgoing {
    /// How the log line counts the bytes read from the caller.
    fn bytes_in(&self) -> BytesIn {
        match self {
            Outgoing::Replayable(None) => BytesIn::None,
            Outgoing::Replayable(Some(bytes)) => BytesIn::Known(bytes.len() as u64),
            Outgoing::Streaming(ProxyBody::Caller(_, read)) => BytesIn::Counted(read.clone()),
            Outgoing::Streaming(_) => BytesIn::None,
        }
    }
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

/// The answer to a head hyper refused itself, which the transport (`io`) saw and writes in place
/// of hyper's: the error table's, as HTTP/1.1 bytes, counted and logged as one request line.
pub(crate) fn answer_refused(
    refusal: HypersRefusal,
    conn: &ConnInfo,
    metrics: &ProxyMetrics,
) -> Vec<u8> {
    let status = refusal.status;
    let id = rewrite::request_id(&HeaderMap::new());
    let error = refused_as(refusal);
    let spec = error.spec();
    let bytes = error.http1_bytes(&id);
    let body = memchr::memmem::find(&bytes, b"\r\n\r\n").map_or(0, |end| bytes.len() - end - 4);
    metrics.record_error(spec.code);
    // hyper answers as soon as it has read the head: no time passes worth measuring.
    metrics.record_request(None, None, spec.status.as_u16(), Duration::ZERO, None);
    RequestLog {
        method: None,
        route: None,
        caller: None,
        path: None,
        listener: conn.identity.listener.clone(),
        peer: conn.peer,
        status: spec.status.as_u16(),
        latency: Duration::ZERO,
        upstream: None,
        request_id: id,
        error: Some(spec.code),
        detail: Some(format!(
            "the HTTP/1 parser refused the head ({})",
            StatusCode::from_u16(status).map_or(status.to_string(), |s| s.to_string())
        )),
        bytes_in: BytesIn::None,
        bytes_out: body as u64,
        broke_off: false,
        trace_id: None,
        cut: None,
    }
    .write();
    bytes
}

/// The error table's name for hyper's refusal: `body_too_large` when the head's
/// `Content-Length` is one hyper cannot represent (it answers 400 or 431 to those).
fn refused_as(refusal: HypersRefusal) -> ProxyError {
    if refusal.unrepresentable_length {
        if let Err(too_large) = admit::body(BodySize::Unrepresentable, None) {
            return too_large;
        }
    }
    match refusal.status {
        431 => ProxyError::HeadersTooLarge,
        414 => ProxyError::BadRequest("the request target is too long"),
        505 => ProxyError::BadRequest("this HTTP version is not supported"),
        _ => ProxyError::BadRequest("the request line or a header line is malformed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;
    use http::header::{AUTHORIZATION, CONNECTION, UPGRADE};

    fn route() -> Route {
        let config = RouteConfig {
            name: "r".into(),
            host: None,
            path_prefix: "/api".into(),
            strip_prefix: true,
            upstream: "https://up.example/base".parse().unwrap(),
            upstream_ca_file: None,
            allow: vec![],
            upgrades: vec!["websocket".into()],
            pass_caller_headers: vec![],
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
        };
        Route::new(&config, 0).unwrap()
    }

    /// The replay after a 401 is built from the caller's head again: the same request as the
    /// first but for its token, and the caller's head is left as it came.
    #[test]
    fn a_replay_is_the_first_request_with_the_renewed_token() {
        let caller = Request::post("/api//x/y?q=1")
            .version(Version::HTTP_11)
            .header("host", "tb.example")
            .header("proxy-authorization", "Bearer caller-key")
            .header("connection", "Upgrade, x-hop")
            .header("upgrade", "websocket")
            .header("x-hop", "1")
            .header("x-forwarded-for", "1.1.1.1")
            .header("accept", "a")
            .header("accept", "b")
            .body(())
            .unwrap();
        let sent = caller.headers().clone();
        let target = Target::of(&caller, true).unwrap();
        let route = route();
        let host = target.forwarded_host();
        let (peer_ip, id) = (
            HeaderValue::from_static("10.0.0.7"),
            HeaderValue::from_static("id"),
        );
        for upgrade in [false, true] {
            let out = Outbound {
                caller: &caller,
                target: &target,
                route: &route,
                forwarded: Forwarded {
                    peer_ip: &peer_ip,
                    proto: "https",
                    host: host.as_ref(),
                    request_id: &id,
                },
                upgrade,
            };
            let span = tracing::Span::none();
            let build = |token: &'static str| {
                let uri = route.upstream_uri(&target).unwrap();
                let token = HeaderValue::from_static(token);
                out.request(uri, &token, ProxyBody::Empty, Extensions::new(), &span)
                    .into_parts()
                    .0
            };
            let (first, replay) = (build("Bearer first"), build("Bearer renewed"));
            assert_eq!(first.uri, "https://up.example/base/x/y?q=1");
            assert_eq!(first.version, Version::HTTP_11);
            assert_eq!((&replay.method, &replay.uri), (&first.method, &first.uri));
            assert_eq!(first.headers[AUTHORIZATION], "Bearer first");
            assert_eq!(replay.headers[AUTHORIZATION], "Bearer renewed");
            let but_token = |h: &HeaderMap| {
                let mut h = h.clone();
                h.remove(AUTHORIZATION);
                h
            };
            assert_eq!(but_token(&replay.headers), but_token(&first.headers));
            assert_eq!(first.headers["x-forwarded-for"], "1.1.1.1, 10.0.0.7");
            assert_eq!(first.headers.get_all("accept").iter().count(), 2);
            assert!(!first.headers.contains_key("x-hop"));
            assert!(!first.headers.contains_key("proxy-authorization"));
            assert_eq!(first.headers.contains_key(UPGRADE), upgrade);
            assert_eq!(first.headers.contains_key(CONNECTION), upgrade);
            assert_eq!(
                caller.headers(),
                &sent,
                "the caller's head is left as it came"
            );
        }
    }

    #[test]
    fn hypers_refusals_map_onto_the_table() {
        let code = |status, unrepresentable_length| {
            refused_as(HypersRefusal {
                status,
                unrepresentable_length,
            })
            .spec()
        };
        assert_eq!(code(400, false).code, "bad_request");
        assert_eq!(code(431, false).code, "headers_too_large");
        assert_eq!(code(414, false).status, StatusCode::BAD_REQUEST);
        assert_eq!(code(505, false).code, "bad_request");
        for status in [400, 431] {
            assert_eq!(code(status, true).code, "body_too_large");
        }
    }
}
