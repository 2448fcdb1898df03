//! Admin listener: `GET /healthz` (the process answers), `/readyz` (proxy listeners up and tokens
//! warmed when so configured; why not, when the identity service refuses the client), `/metrics` (Prometheus text 0.0.4, or OpenMetrics when `Accept`
//! asks for `application/openmetrics-text`) and `/tokens` (per-caller token
//! status). It runs on its own port through [`server::serve`] and never shows a secret: `/tokens`
//! carries ids, suffixes and expiry times only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::metrics::{self, CallerKindLabels, Metrics};
use crate::server::{self, Shutdown};

/// What the admin endpoints look at.
pub struct AdminState {
    pub broker: Arc<Broker>,
    pub metrics: Arc<Metrics>,
    /// True while the proxy listeners are bound and accepting (false before start and while
    /// draining at shutdown).
    pub listening: AtomicBool,
}

impl AdminState {
    pub fn new(broker: Arc<Broker>, metrics: Arc<Metrics>) -> Arc<AdminState> {
        Arc::new(AdminState {
            broker,
            metrics,
            listening: AtomicBool::new(false),
        })
    }

    pub fn is_ready(&self) -> bool {
        self.listening.load(Ordering::Acquire) && self.broker.is_ready()
    }
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: Shutdown,
    grace: Duration,
) {
    let handler = move |req: Request<Incoming>, _peer: SocketAddr| {
        let state = state.clone();
        async move {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            respond(&state, req.method(), req.uri().path(), accept)
        }
    };
    server::serve(listener, handler, shutdown, grace).await;
}

/// The answer to one admin request (`accept`: the request's `Accept` header).
pub fn respond(
    state: &AdminState,
    method: &Method,
    path: &str,
    accept: Option<&str>,
) -> Response<Full<Bytes>> {
    let known = matches!(path, "/healthz" | "/readyz" | "/metrics" | "/tokens");
    if !known {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok"),
        "/readyz" if state.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" if !state.listening.load(Ordering::Acquire) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: listeners not up\n",
        ),
        "/readyz" => match state.broker.client_refused() {
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: tokens warming up; {why}\n"),
            ),
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: tokens warming up\n",
            ),
        },
        "/metrics" => {
            update_expiry_gauges(state);
            let (body, content_type) = if metrics::wants_openmetrics(accept) {
                (
                    state.metrics.encode_openmetrics(),
                    metrics::OPENMETRICS_CONTENT_TYPE,
                )
            } else {
                (
                    state.metrics.encode_prometheus(),
                    metrics::PROMETHEUS_CONTENT_TYPE,
                )
            };
            let mut r = Response::new(Full::new(Bytes::from(body)));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(content_type),
            );
            h.insert(header::VARY, http::HeaderValue::from_static("accept"));
            r
        }
        _ => {
            let body = serde_json::to_vec_pretty(&state.broker.status())
                .expect("status serializes to JSON");
            let mut r = Response::new(Full::new(Bytes::from(body)));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            h.insert(
                header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            r
        }
    }
}

/// Sets `token_expiry_seconds` from the broker's current status (callers gone since a reload drop out).
fn update_expiry_gauges(state: &AdminState) {
    let gauges = &state.metrics.token_expiry_seconds;
    gauges.clear();
    for s in state.broker.status().callers {
        for (kind, secs) in [
            ("api_token", s.api_token_expires_in_secs),
            ("access_token", s.access_token_expires_in_secs),
        ] {
            if let Some(secs) = secs {
                let labels = CallerKindLabels {
                    caller: s.caller.clone(),
                    kind,
                };
                gauges
                    .get_or_create(&labels)
                    .set(i64::try_from(secs).unwrap_or(i64::MAX));
            }
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
