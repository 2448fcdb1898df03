//! A fake upstream for the proxy tests: a real HTTP/1.1 + HTTP/2 server on 127.0.0.1:0 (plain or
//! TLS with the dev certificates) that counts and records the requests it gets.
//!
//! Paths (after any prefix the proxy strips):
//! - `/delay/<ms>`: answers `ok` after `ms` milliseconds
//! - `/stream/<mb>`: answers `mb` MiB; the first 64 KiB at once, the rest only after
//!   [`FakeUpstream::release`]
//! - `/upload`: reads the request body as a stream, signals [`FakeUpstream::first_bytes`] at the
//!   first data, answers the byte count
//! - `/early`: answers `ok` at once and reads the request body afterwards, on its own
//! - `/unauthorized-once`: 401 the first time, then `ok`
//! - `/unauthorized`: always 401
//! - anything else: `ok`

#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};

type Body = BoxBody<Bytes, Infallible>;

const CHUNK: usize = 64 * 1024;

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub target: String,
    pub version: Version,
    pub headers: HeaderMap,
}

#[derive(Default)]
struct State {
    requests: AtomicU64,
    /// Connections accepted, and of those still open.
    accepted: AtomicU64,
    open: AtomicU64,
    seen: Mutex<Vec<Seen>>,
    unauthorized_sent: AtomicBool,
    release: Notify,
    first_bytes: Notify,
}

pub struct FakeUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs")
}

impl FakeUpstream {
    /// A plain HTTP upstream (HTTP/1.1 and h2c).
    pub async fn start() -> FakeUpstream {
        Self::start_with(None).await
    }

    /// An HTTPS upstream with `certs/server.pem` (ALPN h2 and http/1.1).
    pub async fn start_tls() -> FakeUpstream {
        Self::start_with(Some(tls_acceptor())).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> FakeUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let task_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, tls) = (task_state.clone(), tls.clone());
                task_state.accepted.fetch_add(1, Ordering::SeqCst);
                task_state.open.fetch_add(1, Ordering::SeqCst);
                let open = OpenConnection(task_state.clone());
                tokio::spawn(async move {
                    let _open = open;
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(serve(state, req).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        None => builder.serve_connection(TokioIo::new(stream), svc).await,
                        Some(tls) => match tls.accept(stream).await {
                            Ok(s) => builder.serve_connection(TokioIo::new(s), svc).await,
                            Err(_) => return,
                        },
                    };
                });
            }
        });
        FakeUpstream { addr, state, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests arrived.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// How many connections it accepted.
    pub fn connections(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// How many of them are still open.
    pub fn open_connections(&self) -> u64 {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Lets `/stream/<mb>` answers send the rest of their body.
    pub fn release(&self) {
        self.state.release.notify_waiters();
        self.state.release.notify_one();
    }

    /// Resolves once an `/upload` request's first body bytes have arrived.
    pub async fn first_bytes(&self) {
        self.state.first_bytes.notified().await;
    }

    /// Stops accepting (open connections end with the test's runtime).
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// Counts an accepted connection as open until its task ends.
struct OpenConnection(Arc<State>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn certs_key() -> PathBuf {
    certs().join("server.key")
}

/// A TLS acceptor with `certs/server.pem` (for `localhost`), offering ALPN h2 and http/1.1.
pub fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(certs().join("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(certs_key()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

async fn serve(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let target = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |pq| pq.to_string());
    state.seen.lock().unwrap().push(Seen {
        method: req.method().to_string(),
        target: target.clone(),
        version: req.version(),
        headers: req.headers().clone(),
    });
    let path = req.uri().path().to_string();
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    let (first, arg) = (segments.next().unwrap_or(""), segments.next());
    let number = arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
    match first {
        "delay" => {
            tokio::time::sleep(Duration::from_millis(number)).await;
            text(StatusCode::OK, "ok")
        }
        "stream" => stream_body(state, number * 1024 * 1024),
        "upload" => {
            let mut body = req.into_body();
            let mut total = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return text(StatusCode::BAD_REQUEST, "broken body");
                };
                if let Some(data) = frame.data_ref() {
                    if total == 0 && !data.is_empty() {
                        state.first_bytes.notify_one();
                    }
                    total += data.len() as u64;
                }
            }
            text(StatusCode::OK, total.to_string())
        }
        "early" => {
            let body = req.into_body();
            tokio::spawn(async move {
                let _ = body.collect().await;
            });
            text(StatusCode::OK, "ok")
        }
        "unauthorized-once" => {
            if state.unauthorized_sent.swap(true, Ordering::SeqCst) {
                text(StatusCode::OK, "ok")
            } else {
                text(StatusCode::UNAUTHORIZED, "token refused")
            }
        }
        "unauthorized" => text(StatusCode::UNAUTHORIZED, "token refused"),
        _ => text(StatusCode::OK, "ok"),
    }
}

/// `total` bytes: one chunk at once, the rest after the release signal.
fn stream_body(state: Arc<State>, total: u64) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![b'x'; CHUNK]);
        let mut sent = 0u64;
        let mut released = false;
        while sent < total {
            if sent > 0 && !released {
                state.release.notified().await;
                released = true;
            }
            let n = (total - sent).min(CHUNK as u64) as usize;
            if tx.send(Ok(Frame::data(chunk.slice(..n)))).await.is_err() {
                return;
            }
            sent += n as u64;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    r
}
