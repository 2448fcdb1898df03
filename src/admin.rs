//! Admin listener: `GET /healthz` (the process answers), `/readyz` (proxy listeners up and tokens
//! warmed when so configured; why not, when the identity service refuses the client), `/metrics` (Prometheus text 0.0.4, or OpenMetrics when `Accept`
//! asks for `application/openmetrics-text`) and `/tokens` (per-caller token
//! status). It runs on its own port through [`server::serve`] (over TLS with `[admin] tls`), with
//! its own small connection limit and header timeout (`[admin] max_connections`,
//! `header_read_timeout`), so that connections that say nothing cannot hold the process's file
//! descriptors. It never shows a secret: `/tokens` carries ids, suffixes and expiry times only,
//! and answers only a peer on loopback, or, once `[admin] key_hashes` or `cert_identities` are
//! configured, only a peer presenting an admin key (`Authorization: Bearer <key>`) or a client
//! certificate with one of those identities (verified against `tls.client_ca`). `/healthz`,
//! `/readyz` and `/metrics` are open to whoever reaches the port (probes and scrapers).

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
use crate::config::CertIdentity;
use crate::metrics::{self, Metrics};
use crate::server::{self, ClientCert, ConnLimits, Shutdown};
use crate::tls::server::ListenerTls;

/// What the admin endpoints look at.
pub struct AdminState {
    pub broker: Arc<Broker>,
    pub metrics: Arc<Metrics>,
    /// True while the proxy listeners are bound and accepting (false before start and while
    /// draining at shutdown).
    pub listening: AtomicBool,
    /// Who may read `/tokens` (`[admin] key_hashes`, `cert_identities`), replaced on reload.
    allowed: ArcSwap<Allowed>,
}

/// The admin keys' SHA-256 digests and the client-certificate identities that may read `/tokens`.
#[derive(Debug, Default)]
pub struct Allowed {
    pub key_hashes: Vec<[u8; 32]>,
    pub cert_identities: Vec<CertIdentity>,
}

impl AdminState {
    pub fn new(broker: Arc<Broker>, metrics: Arc<Metrics>) -> Arc<AdminState> {
        Arc::new(AdminState {
            broker,
            metrics,
            listening: AtomicBool::new(false),
            allowed: ArcSwap::from_pointee(Allowed::default()),
        })
    }

    /// The admin keys and certificate identities in force from now on.
    pub fn set_allowed(&self, allowed: Allowed) {
        self.allowed.store(Arc::new(allowed));
    }

    pub fn is_ready(&self) -> bool {
        self.listening.load(Ordering::Acquire) && self.broker.is_ready()
    }

    /// Whether a request from `peer` with this `Authorization` and client certificate may read
    /// `/tokens`.
    fn may_read_tokens(
        &self,
        peer: SocketAddr,
        authorization: Option<&[u8]>,
        cert: &[CertIdentity],
    ) -> Access {
        access(&self.allowed.load(), peer, authorization, cert)
    }
}

/// Who may read `/tokens`: with no admin key and no certificate identity configured, a peer on
/// loopback; with either, whoever presents a key (`Bearer <key>`) or a verified client
/// certificate with one of the identities, from anywhere.
fn access(
    allowed: &Allowed,
    peer: SocketAddr,
    authorization: Option<&[u8]>,
    cert: &[CertIdentity],
) -> Access {
    let keys = &allowed.key_hashes;
    if keys.is_empty() && allowed.cert_identities.is_empty() {
        return if peer.ip().is_loopback() {
            Access::Granted
        } else {
            Access::LoopbackOnly
        };
    }
    if cert.iter().any(|id| allowed.cert_identities.contains(id)) {
        return Access::Granted;
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

/// Serves the admin endpoints on `listener` (over TLS with `tls`) within `limits` until
/// `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<ListenerTls>,
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
                let cert = req.extensions().get::<ClientCert>().map(|c| c.0.clone());
                let cert = cert.as_deref().map_or(&[][..], Vec::as_slice);
                match state.may_read_tokens(peer, authorization.map(|v| v.as_bytes()), cert) {
                    Access::Granted => {}
                    Access::NeedsKey => {
                        let mut r = text(StatusCode::UNAUTHORIZED, "an admin key (Authorization: Bearer <key>) or an admin client certificate is needed\n");
                        r.headers_mut().insert(
                            header::WWW_AUTHENTICATE,
                            http::HeaderValue::from_static("Bearer"),
                        );
                        return r;
                    }
                    Access::LoopbackOnly => {
                        return text(
                            StatusCode::FORBIDDEN,
                            "/tokens answers loopback only while no [admin] key_hashes or cert_identities are configured\n",
                        )
                    }
                }
            }
            respond(&state, req.method(), req.uri().path(), accept)
        }
    };
    server::serve(listener, tls, handler, limits, shutdown, grace).await;
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
            state.broker.record_expiries();
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
    fn tokens_answer_loopback_without_keys_and_a_key_or_certificate_holder_with_them() {
        let local: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let local6: SocketAddr = "[::1]:4000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:4000".parse().unwrap();
        let ops = CertIdentity::Uri("spiffe://example.org/ops".into());
        let other = CertIdentity::Dns("billing.example.org".into());
        let none = Allowed::default();
        assert_eq!(access(&none, local, None, &[]), Access::Granted);
        assert_eq!(access(&none, local6, None, &[]), Access::Granted);
        assert_eq!(access(&none, remote, None, &[]), Access::LoopbackOnly);
        assert_eq!(
            access(&none, remote, Some(b"Bearer anything"), &[]),
            Access::LoopbackOnly,
            "no key can be right while none is configured"
        );
        assert_eq!(
            access(&none, remote, None, std::slice::from_ref(&ops)),
            Access::LoopbackOnly,
            "no certificate can be right while no identity is configured"
        );
        let keys = Allowed {
            key_hashes: vec![
                crate::config::key_hash(b"other"),
                crate::config::key_hash(b"k3y"),
            ],
            cert_identities: Vec::new(),
        };
        for peer in [local, remote] {
            let a = |auth: Option<&[u8]>| access(&keys, peer, auth, &[]);
            assert_eq!(a(Some(b"Bearer k3y")), Access::Granted);
            assert_eq!(a(Some(b"Bearer other")), Access::Granted);
            assert_eq!(a(None), Access::NeedsKey, "loopback too");
            assert_eq!(a(Some(b"Bearer k3")), Access::NeedsKey);
            assert_eq!(a(Some(b"Basic k3y")), Access::NeedsKey);
            assert_eq!(a(Some(b"k3y")), Access::NeedsKey);
            assert_eq!(
                access(&keys, peer, None, std::slice::from_ref(&ops)),
                Access::NeedsKey,
                "a certificate counts only with cert_identities"
            );
        }
        let certs = Allowed {
            key_hashes: Vec::new(),
            cert_identities: vec![ops.clone()],
        };
        for peer in [local, remote] {
            assert_eq!(
                access(&certs, peer, None, &[other.clone(), ops.clone()]),
                Access::Granted
            );
            assert_eq!(
                access(&certs, peer, None, std::slice::from_ref(&other)),
                Access::NeedsKey
            );
            assert_eq!(
                access(&certs, peer, None, &[]),
                Access::NeedsKey,
                "loopback too"
            );
            assert_eq!(
                access(&certs, peer, Some(b"Bearer k3y"), &[]),
                Access::NeedsKey
            );
        }
    }
}
