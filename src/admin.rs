//! Admin listener: `GET /healthz` (the process answers), `/readyz` (proxy listeners up and tokens
//! warmed when so configured; why not, when the identity service refuses the client), `/metrics` (Prometheus text 0.0.4, or OpenMetrics when `Accept`
//! asks for `application/openmetrics-text`) and `/tokens` (per-caller token
//! status). It runs on its own port through [`server::serve`], with its own small connection limit
//! and header timeout (`[admin] max_connections`, `header_read_timeout`), so that connections that
//! say nothing cannot hold the process's file descriptors. It never shows a secret: `/tokens`
//! carries ids, suffixes and expiry times only, and answers only a peer on loopback, or one
//! presenting an admin key (`Authorization: Bearer <key>`, `[admin] key_hashes`; once keys are
//! configured, every peer needs one). `/healthz`, `/readyz` and `/metrics` are open to whoever
//! reaches the port (probes and scrapers).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::metrics::{self, CallerKindLabels, Metrics};
use crate::server::{self, ConnLimits, Shutdown};

/// What the admin endpoints look at.
pub struct AdminState {
    pub broker: Arc<Broker>,
    pub metrics: Arc<Metrics>,
    /// True while the proxy listeners are bound and accepting (false before start and while
    /// draining at shutdown).
    pub listening: AtomicBool,
    /// SHA-256 digests of the admin keys (`[admin] key_hashes`), replaced on reload.
    keys: ArcSwap<Vec<[u8; 32]>>,
}

impl AdminState {
    pub fn new(broker: Arc<Broker>, metrics: Arc<Metrics>) -> Arc<AdminState> {
        Arc::new(AdminState {
            broker,
            metrics,
            listening: AtomicBool::new(false),
            keys: ArcSwap::from_pointee(Vec::new()),
        })
    }

    /// The admin keys in force from now on.
    pub fn set_keys(&self, keys: Vec<[u8; 32]>) {
        self.keys.store(Arc::new(keys));
    }

    pub fn is_ready(&self) -> bool {
        self.listening.load(Ordering::Acquire) && self.broker.is_ready()
    }

    /// Whether a request from `peer` with this `Authorization` may read `/tokens`.
    fn may_read_tokens(&self, peer: SocketAddr, authorization: Option<&[u8]>) -> Access {
        access(&self.keys.load(), peer, authorization)
    }
}

/// Who may read `/tokens`: with no admin key configured, a peer on loopback; with keys, whoever
/// presents one (`Bearer <key>`), from anywhere.
fn access(keys: &[[u8; 32]], peer: SocketAddr, authorization: Option<&[u8]>) -> Access {
    if keys.is_empty() {
        return if peer.ip().is_loopback() {
            Access::Granted
        } else {
            Access::LoopbackOnly
        };
    }
    let Some(key) = authorization.and_then(|a| a.strip_prefix(b"Bearer ")) else {
        return Access::NeedsKey;
    };
    let digest = crate::config::key_hash(key);
    // Every stored digest is compared, in constant time, whichever matches.
    let matched = keys
        .iter()
        .fold(subtle::Choice::from(0), |m, k| m | k.ct_eq(&digest));
    if bool::from(matched) {
        Access::Granted
    } else {
        Access::NeedsKey
    }
}

/// Serves the admin endpoints on `listener` within `limits` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    limits: ConnLimits,
    shutdown: Shutdown,
    grace: Duration,
) {
    let handler = move |req: Request<Incoming>, peer: SocketAddr| {
        let state = state.clone();
        async move {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            if req.uri().path() == "/tokens" {
                let authorization = req.headers().get(header::AUTHORIZATION);
                match state.may_read_tokens(peer, authorization.map(|v| v.as_bytes())) {
                    Access::Granted => {}
                    Access::NeedsKey => {
                        let mut r = text(StatusCode::UNAUTHORIZED, "an admin key is needed: Authorization: Bearer <key>\n");
                        r.headers_mut().insert(
                            header::WWW_AUTHENTICATE,
                            http::HeaderValue::from_static("Bearer"),
                        );
                        return r;
                    }
                    Access::LoopbackOnly => {
                        return text(
                            StatusCode::FORBIDDEN,
                            "/tokens answers loopback only while no [admin] key_hashes are configured\n",
                        )
                    }
                }
            }
            respond(&state, req.method(), req.uri().path(), accept)
        }
    };
    server::serve(listener, handler, limits, shutdown, grace).await;
}

/// Who may read `/tokens`.
#[derive(Debug, PartialEq, Eq)]
enum Access {
    Granted,
    /// Keys are configured and the request presented none that matches.
    NeedsKey,
    /// No key is configured and the peer is not on loopback.
    LoopbackOnly,
}

/// The answer to one admin request (`accept`: the request's `Accept` header), once allowed.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_answer_loopback_without_keys_and_a_key_holder_with_them() {
        let local: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let local6: SocketAddr = "[::1]:4000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        assert_eq!(access(&[], local, None), Access::Granted);
        assert_eq!(access(&[], local6, None), Access::Granted);
        assert_eq!(access(&[], remote, None), Access::LoopbackOnly);
        assert_eq!(
            access(&[], remote, Some(b"Bearer anything")),
            Access::LoopbackOnly,
            "no key can be right while none is configured"
        );
        let keys = [
            crate::config::key_hash(b"other"),
            crate::config::key_hash(b"k3y"),
        ];
        for peer in [local, remote] {
            assert_eq!(access(&keys, peer, Some(b"Bearer k3y")), Access::Granted);
            assert_eq!(access(&keys, peer, Some(b"Bearer other")), Access::Granted);
            assert_eq!(access(&keys, peer, None), Access::NeedsKey, "loopback too");
            assert_eq!(access(&keys, peer, Some(b"Bearer k3")), Access::NeedsKey);
            assert_eq!(access(&keys, peer, Some(b"Basic k3y")), Access::NeedsKey);
            assert_eq!(access(&keys, peer, Some(b"k3y")), Access::NeedsKey);
        }
    }
}
