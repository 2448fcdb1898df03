//! The proxy over real sockets: the real broker against the real emulator for tokens, the
//! emulator's echo upstream and an in-process fake upstream (`support/upstream.rs`) behind it.
//! Tests check behaviour and counts, never speed.

#[path = "support/proxy_config.rs"]
mod proxy_config;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

use proxy_config::{caller, certs, listener, route, server_tls};
use support::{header, http, json, raw};
use tokenbroker::broker::Broker;
use tokenbroker::config::{CertIdentity, Config, Limits};
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::metrics::Metrics;
use tokenbroker::proxy::ProxyHandle;
use tokenbroker::secret::Secret;
use tokenbroker::server::Shutdown;
use upstream::FakeUpstream;

const ADMIN_SECRET: &str = "admin-secret-for-proxy-tests";
const MIB: usize = 1024 * 1024;
const LONG: Duration = Duration::from_secs(60);
/// The fixture's `tokens.min_renew_interval`.
const MIN_RENEW: Duration = Duration::from_millis(10);

async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// Emulator, broker, fake upstreams and a running proxy with four listeners.
struct Fixture {
    emu: Emulator,
    up: FakeUpstream,
    up_tls: FakeUpstream,
    broker: Arc<Broker>,
    proxy: ProxyHandle,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
}

impl Fixture {
    async fn start() -> Fixture {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut Config)) -> Fixture {
        let emu = Emulator::start(EmulatorConfig {
            clients: vec![("admin".into(), Secret::new(ADMIN_SECRET))],
            echo_upstream: Some("127.0.0.1:0".parse().unwrap()),
            ..EmulatorConfig::default()
        })
        .await
        .expect("emulator starts");
        let up = FakeUpstream::start().await;
        let up_tls = FakeUpstream::start_tls().await;
        let fake = format!("http://{}/", up.addr());
        let both = ["billing", "demo"];
        let mut tls_route = route(
            "fake-tls",
            "/tls",
            format!("https://localhost:{}/", up_tls.addr().port()),
            &both,
        );
        tls_route.upstream_ca_file = Some(certs().join("ca.pem"));
        let mut slow = route("slow", "/slow", fake.clone(), &both);
        slow.response_timeout = Duration::from_millis(300);
        let mut identity = emu.identity_config("admin", &Secret::new(ADMIN_SECRET));
        identity.scope = Some("admin".into());
        let mut config = Config {
            listeners: vec![
                listener("plain", None, None),
                listener("tls", Some(server_tls(false)), None),
                listener("mtls", Some(server_tls(true)), None),
                listener("sidecar", None, Some("billing")),
            ],
            callers: vec![
                caller("billing", "billing-key", vec![]),
                caller(
                    "demo",
                    "demo-key",
                    vec![CertIdentity::Uri("spiffe://tokenbroker.dev/demo".into())],
                ),
                caller("outsider", "outsider-key", vec![]),
            ],
            routes: vec![
                route("fake", "/fake", fake.clone(), &both),
                tls_route,
                slow,
                route("echo", "/echo", emu.echo_url().unwrap(), &both),
                route(
                    "down",
                    "/down",
                    format!("http://127.0.0.1:{}/", closed_port().await),
                    &both,
                ),
                route("private", "/private", fake, &["demo"]),
            ],
            limits: Limits {
                max_header_bytes: 4096,
                max_body_bytes: Some(150 * MIB as u64),
                shutdown_grace: Duration::from_secs(10),
                ..Limits::default()
            },
            ..Config::minimal(identity)
        };
        // a caller renews on 401s at most once per this (the default, 5 s, is tested on its own)
        config.tokens.min_renew_interval = MIN_RENEW;
        adjust(&mut config);
        let metrics = Metrics::new();
        let broker = Broker::start(&config, metrics.clone())
            .await
            .expect("broker starts");
        let shutdown = Shutdown::new();
        let proxy = ProxyHandle::start(
            Arc::new(config),
            broker.clone(),
            metrics.clone(),
            shutdown.clone(),
        )
        .await
        .expect("proxy starts");
        Fixture {
            emu,
            up,
            up_tls,
            broker,
            proxy,
            shutdown,
            metrics,
        }
    }

    fn addr(&self, listener: &str) -> SocketAddr {
        self.proxy
            .local_addrs()
            .into_iter()
            .find(|(name, _)| name == listener)
            .map(|(_, a)| a)
            .unwrap()
    }

    fn url(&self, listener: &str, path: &str) -> String {
        let scheme = if listener.contains("tls") {
            "https"
        } else {
            "http"
        };
        let addr = self.addr(listener);
        if scheme == "https" {
            format!("https://localhost:{}{path}", addr.port())
        } else {
            format!("http://{addr}{path}")
        }
    }

    /// No identity-service call and no upstream request happened.
    fn assert_nothing_forwarded(&self) {
        assert_eq!(self.up.requests(), 0, "fake upstream was called");
        let c = self.emu.counters();
        assert_eq!((c.create, c.exchange, c.echo_ok), (0, 0, 0), "{c:?}");
    }
}

const BILLING: (&str, &str) = ("proxy-authorization", "Bearer billing-key");

/// A TLS client trusting the dev CA, with an optional client certificate.
fn tls_client<B>(
    client_cert: Option<&str>,
    http2_only: bool,
) -> Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs().join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let chain = CertificateDer::pem_file_iter(certs().join(format!("{name}.pem")))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(certs().join(format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new())
        .http2_only(http2_only)
        .pool_max_idle_per_host(0)
        .build(connector)
}

fn get(url: &str, headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Empty::new()).unwrap()
}

async fn read_all(response: http::Response<hyper::body::Incoming>) -> (StatusCode, Version, Bytes) {
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(LONG, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (parts.status, parts.version, body)
}

/// Sends `request` on `client`, failing the test if no answer head comes within `LONG`.
async fn send<C, B>(
    client: &Client<C, B>,
    request: Request<B>,
) -> http::Response<hyper::body::Incoming>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::time::timeout(LONG, client.request(request))
        .await
        .expect("an answer in time")
        .expect("the request is sent")
}

// ---- no token needed -------------------------------------------------------------------------

#[tokio::test]
async fn unknown_or_missing_caller_key_is_401_and_nothing_is_forwarded() {
    let f = Fixture::start().await;
    for headers in [
        vec![],
        vec![("proxy-authorization", "Bearer wrong-key")],
        vec![("proxy-authorization", "Basic YmlsbGluZy1rZXk=")],
        // A caller's own Authorization is never an identity.
        vec![("authorization", "Bearer billing-key")],
    ] {
        let (status, h, body) = http("GET", &f.url("plain", "/fake/x"), &headers, "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{headers:?}");
        let body = json(&body);
        assert_eq!(body["error"], "unknown_caller");
        assert_eq!(body["request_id"], header(&h, "x-request-id"));
        assert!(!body.to_string().contains("billing-key"));
    }
    f.assert_nothing_forwarded();
}

#[tokio::test]
async fn a_caller_not_allowed_on_the_route_is_403() {
    let f = Fixture::start().await;
    let outsider = [("proxy-authorization", "Bearer outsider-key")];
    let (status, _, body) = http("GET", &f.url("plain", "/fake/x"), &outsider, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(json(&body)["error"], "forbidden");
    let (status, _, body) = http("GET", &f.url("plain", "/private/x"), &[BILLING], "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(json(&body)["error"], "forbidden");
    f.assert_nothing_forwarded();
}

#[tokio::test]
async fn no_route_is_404() {
    let f = Fixture::start().await;
    for path in ["/nothing", "/fakeish", "/"] {
        let (status, _, body) = http("GET", &f.url("plain", path), &[BILLING], "").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(json(&body)["error"], "no_route");
    }
    f.assert_nothing_forwarded();
}

#[tokio::test]
async fn oversized_headers_are_431() {
    let f = Fixture::start().await;
    let addr = f.addr("plain");
    for size in [6_000, 20_000] {
        let request = format!(
            "GET /fake/x HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer billing-key\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(size)
        );
        let answer = raw(addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 431"), "{size}: {answer}");
    }
    // Under hyper's own buffer limit the answer is the proxy's JSON.
    let request = format!(
        "GET /fake/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(6_000)
    );
    assert!(raw(addr, request.as_bytes())
        .await
        .contains("headers_too_large"));
    f.assert_nothing_forwarded();
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    let f = Fixture::start().await;
    let addr = f.addr("plain");
    for framing in [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 5",
    ] {
        let request = format!(
            "POST /fake/upload HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer billing-key\r\n{framing}\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\nGET /fake/smuggled HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer billing-key\r\n\r\n"
        );
        let answer = raw(addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{framing}: {answer}");
        assert!(answer.contains("bad_request"), "{answer}");
        assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");
    }
    f.assert_nothing_forwarded();
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_413() {
    let f = Fixture::start().await;
    let request = format!(
        "POST /fake/upload HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer billing-key\r\nContent-Length: {}\r\nConnection: close\r\n\r\nabc",
        200 * MIB
    );
    let answer = raw(f.addr("plain"), request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("body_too_large"));
    f.assert_nothing_forwarded();
}

#[tokio::test]
async fn mtls_refuses_untrusted_or_missing_client_certificates() {
    let f = Fixture::start().await;
    for cert in [Some("untrusted-client"), None] {
        let client = tls_client::<Empty<Bytes>>(cert, false);
        let result = tokio::time::timeout(
            LONG,
            client.request(get(&f.url("mtls", "/fake/x"), &[BILLING])),
        )
        .await
        .unwrap();
        match result {
            Err(_) => {}
            Ok(response) => assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{cert:?}"),
        }
    }
    f.assert_nothing_forwarded();
}

// ---- with tokens ---------------------------------------------------------------------------

#[tokio::test]
async fn a_valid_key_reaches_the_upstream_with_only_the_callers_token() {
    let f = Fixture::start().await;
    let request = "GET /fake/hdr?q=1&r=2 HTTP/1.1\r\n\
        Host: proxy.test:8080\r\n\
        Proxy-Authorization: Bearer billing-key\r\n\
        Authorization: Bearer forged\r\n\
        Connection: close, authorization, proxy-authorization, x-hop\r\n\
        X-Hop: 1\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: trailers\r\n\
        Trailer: x-sum\r\n\
        Proxy-Connection: keep-alive\r\n\
        X-Request-Id: caller-req-1\r\n\
        X-Forwarded-For: 10.9.9.9\r\n\
        Accept: text/plain\r\n\r\n";
    let answer = raw(f.addr("plain"), request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer
        .to_ascii_lowercase()
        .contains("x-request-id: caller-req-1"));

    let token = f.broker.token("billing").await.unwrap();
    let seen = f.up.seen();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(seen[0].target, "/hdr?q=1&r=2");
    assert_eq!(
        h.get_all("authorization").iter().collect::<Vec<_>>(),
        vec![&token.header]
    );
    for gone in [
        "proxy-authorization",
        "connection",
        "x-hop",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(!h.contains_key(gone), "{gone} was forwarded");
    }
    assert_eq!(header(h, "host"), f.up.addr().to_string());
    assert_eq!(header(h, "x-forwarded-for"), "10.9.9.9, 127.0.0.1");
    assert_eq!(header(h, "x-forwarded-proto"), "http");
    assert_eq!(header(h, "x-forwarded-host"), "proxy.test:8080");
    assert_eq!(header(h, "x-request-id"), "caller-req-1");
    assert_eq!(header(h, "accept"), "text/plain");
}

#[tokio::test]
async fn the_echo_upstream_accepts_the_injected_token() {
    let f = Fixture::start().await;
    let (status, _, body) = http(
        "POST",
        &f.url("plain", "/echo/hello?x=1"),
        &[BILLING, ("authorization", "Bearer forged")],
        "payload",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let body = json(&body);
    assert_eq!(body["path"], "/hello");
    assert_eq!(body["query"], "x=1");
    assert_eq!(body["body_bytes"], 7);
    assert!(body["caller"]["token_display_name"]
        .as_str()
        .unwrap()
        .contains("billing"));
    let headers = body["headers"].as_object().unwrap();
    assert!(!headers.contains_key("proxy-authorization"), "{headers:?}");
    assert_eq!(f.emu.counters().echo_ok, 1);
}

#[tokio::test]
async fn a_bound_listener_needs_no_key() {
    let f = Fixture::start().await;
    let (status, _, body) = http("GET", &f.url("sidecar", "/echo/x"), &[], "").await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert!(json(&body)["caller"]["token_display_name"]
        .as_str()
        .unwrap()
        .contains("billing"));
}

#[tokio::test]
async fn an_mtls_caller_is_identified_by_its_certificate() {
    let f = Fixture::start().await;
    let client = tls_client::<Empty<Bytes>>(Some("client"), false);
    let response = client
        .request(get(&f.url("mtls", "/echo/who"), &[]))
        .await
        .unwrap();
    let (status, _, body) = read_all(response).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert!(json(&body)["caller"]["token_display_name"]
        .as_str()
        .unwrap()
        .contains("demo"));
    // A key for another caller next to the certificate is a second identity: ambiguous.
    let before = f.up.requests();
    let response = client
        .request(get(&f.url("mtls", "/private/x"), &[BILLING]))
        .await
        .unwrap();
    let (status, _, body) = read_all(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(json(&body)["error"], "unknown_caller");
    assert_eq!(f.up.requests(), before);
    let demo = [("proxy-authorization", "Bearer demo-key")];
    let response = client
        .request(get(&f.url("mtls", "/private/x"), &demo))
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "the same caller twice is one"
    );
}

#[tokio::test]
async fn http2_over_tls_h2c_and_an_https_upstream() {
    let f = Fixture::start().await;
    let client = tls_client::<Empty<Bytes>>(None, true);
    let response = client
        .request(get(&f.url("tls", "/fake/a"), &[BILLING]))
        .await
        .unwrap();
    let (status, version, body) = read_all(response).await;
    assert_eq!(
        (status, version, &body[..]),
        (StatusCode::OK, Version::HTTP_2, &b"ok"[..])
    );
    assert_eq!(
        header(&f.up.seen()[0].headers, "x-forwarded-proto"),
        "https"
    );

    let h2c = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let response = h2c
        .request(get(&f.url("plain", "/fake/b"), &[BILLING]))
        .await
        .unwrap();
    let (status, version, _) = read_all(response).await;
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2));

    let (status, _, body) = http("GET", &f.url("plain", "/tls/c"), &[BILLING], "").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    let seen = f.up_tls.seen();
    assert_eq!(
        seen[0].version,
        Version::HTTP_2,
        "ALPN picks h2 towards the upstream"
    );
    assert_eq!(seen[0].target, "/c");
}

#[tokio::test]
async fn a_100_mib_response_streams_through() {
    let f = Fixture::start().await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = send(
        &client,
        get(&f.url("plain", "/fake/stream/100"), &[BILLING]),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // The upstream holds back everything after its first chunk until released: these bytes
    // came through before the upstream had sent the rest.
    let first = tokio::time::timeout(LONG, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut total = first.data_ref().map_or(0, |d| d.len());
    assert!(total > 0);
    f.up.release();
    while let Some(frame) = tokio::time::timeout(LONG, body.frame()).await.unwrap() {
        total += frame.unwrap().data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(total, 100 * MIB);
}

#[tokio::test]
async fn a_100_mib_request_streams_through() {
    let f = Fixture::start().await;
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok::<_, Infallible>(Frame::data(b))))
    });
    let request = Request::post(f.url("plain", "/fake/upload"))
        .header("proxy-authorization", "Bearer billing-key")
        .body(StreamBody::new(stream))
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let sending = tokio::spawn(async move { client.request(request).await });

    let chunk = Bytes::from(vec![b'y'; 64 * 1024]);
    tx.send(chunk.clone()).await.unwrap();
    // The upstream sees the first bytes while the rest has not been sent yet.
    tokio::time::timeout(LONG, f.up.first_bytes())
        .await
        .unwrap();
    for _ in 1..(100 * MIB / chunk.len()) {
        tx.send(chunk.clone()).await.unwrap();
    }
    drop(tx);
    let response = tokio::time::timeout(LONG, sending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let (status, _, body) = read_all(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, (100 * MIB).to_string());
}

#[tokio::test]
async fn a_streamed_body_over_the_limit_is_413() {
    use tokio::io::AsyncWriteExt;
    let f = Fixture::start_with(|c| c.limits.max_body_bytes = Some(MIB as u64)).await;
    // A raw connection: the proxy answers while the upload is still running, and an HTTP client
    // would report its failed write (the proxy closes without reading the rest) instead.
    let stream = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    let (mut answers, mut uploads) = stream.into_split();
    uploads
        .write_all(
            b"POST /fake/upload HTTP/1.1\r\nHost: proxy\r\n\
              Proxy-Authorization: Bearer billing-key\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    // 17 chunks of 64 KiB (just over the limit), and no last chunk: only the limit can end it.
    let upload = tokio::spawn(async move {
        let chunk = [b'z'; 64 * 1024];
        for _ in 0..17 {
            let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
            if uploads.write_all(&framed).await.is_err() {
                break;
            }
        }
        uploads
    });
    let (head, body, _) = tokio::time::timeout(LONG, support::read_answer(&mut answers))
        .await
        .expect("an answer while the upload runs");
    assert!(head.starts_with("HTTP/1.1 413 "), "{head}\n\n{body}");
    assert_eq!(json(body.as_bytes())["error"], "body_too_large", "{body}");
    upload.abort();
}

#[tokio::test]
async fn an_unreachable_upstream_is_502() {
    let f = Fixture::start().await;
    let (status, _, body) = http("GET", &f.url("plain", "/down/x"), &[BILLING], "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(json(&body)["error"], "upstream_unavailable");
}

#[tokio::test]
async fn a_slow_upstream_is_504() {
    let f = Fixture::start().await;
    let (status, _, body) = http("GET", &f.url("plain", "/slow/delay/3000"), &[BILLING], "").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(json(&body)["error"], "upstream_timeout");
}

#[tokio::test]
async fn an_upstream_401_on_a_get_renews_once_and_replays() {
    let f = Fixture::start().await;
    let (status, _, _) = http("GET", &f.url("plain", "/echo/a"), &[BILLING], "").await;
    assert_eq!(status, StatusCode::OK);
    // (no 401 renewed anything yet: min_renew_interval does not hold back the first one)
    f.emu.revoke_access_tokens();
    f.emu.reset_counters();
    let (status, _, body) = http("GET", &f.url("plain", "/echo/b"), &[BILLING], "").await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let c = f.emu.counters();
    assert_eq!((c.echo_rejected, c.exchange, c.echo_ok), (1, 1, 1), "{c:?}");
}

#[tokio::test]
async fn a_caller_whose_tokens_were_revoked_loses_no_request() {
    // the default min_renew_interval: the revoked token is far younger than it
    let f = Fixture::start_with(|c| c.tokens.min_renew_interval = Duration::from_secs(5)).await;
    let (status, _, _) = http("GET", &f.url("plain", "/echo/a"), &[BILLING], "").await;
    assert_eq!(status, StatusCode::OK);
    // the identity service revokes the caller's API token and every access token
    let id = f.broker.status().callers[0].api_token_id.clone().unwrap();
    assert!(f.emu.revoke_api_token(&id));
    f.emu.revoke_access_tokens();
    f.emu.reset_counters();
    let started = std::time::Instant::now();
    let mut renewed_after = None;
    for i in 0..20 {
        let (status, _, body) = http("GET", &f.url("plain", "/echo/b"), &[BILLING], "").await;
        assert_eq!(status, StatusCode::OK, "request {i}: {body:?}");
        renewed_after.get_or_insert(started.elapsed());
    }
    assert!(
        renewed_after.unwrap() < Duration::from_secs(1),
        "new token after {renewed_after:?}"
    );
    // exchange refused -> regenerate refused (bodyless 400) -> create -> exchange, in one go
    let c = f.emu.counters();
    assert_eq!(
        (c.exchange, c.regenerate, c.create, c.echo_rejected),
        (2, 1, 1, 1),
        "{c:?}"
    );
    assert_ne!(f.broker.status().callers[0].api_token_id, Some(id));
}

#[tokio::test]
async fn a_path_that_always_answers_401_cannot_drive_the_identity_service() {
    let f = Fixture::start_with(|c| c.tokens.min_renew_interval = Duration::from_secs(5)).await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let url = f.url("plain", "/fake/unauthorized");
            tokio::spawn(async move { http("GET", &url, &[BILLING], "").await.0 })
        })
        .collect();
    for t in tasks {
        assert_eq!(
            t.await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "the 401 is passed on"
        );
    }
    // the token those 401s just renewed is refused again: passed on without a renewal
    let (status, _, _) = http("GET", &f.url("plain", "/fake/unauthorized"), &[BILLING], "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let c = f.emu.counters();
    assert!(c.exchange <= 2, "{c:?}");
    assert_eq!(c.create, 1);
    let metrics = f.metrics.encode();
    assert!(
        metrics.contains(r#"tokenbroker_upstream_rejections_total{outcome="rate_limited"} "#)
            && !metrics
                .contains(r#"tokenbroker_upstream_rejections_total{outcome="rate_limited"} 0"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_small_body_is_replayed_but_a_streamed_one_is_not() {
    let f = Fixture::start().await;
    f.broker.token("billing").await.unwrap();
    let (status, _, _) = http(
        "POST",
        &f.url("plain", "/fake/unauthorized-once"),
        &[BILLING],
        "small body",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen = f.up.seen();
    assert_eq!(seen.len(), 2);
    assert_ne!(
        seen[0].headers["authorization"],
        seen[1].headers["authorization"]
    );

    let f = Fixture::start().await;
    f.broker.token("billing").await.unwrap();
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> =
        vec![Ok(Frame::data(Bytes::from_static(b"streamed")))];
    let request = Request::post(f.url("plain", "/fake/unauthorized-once"))
        .header("proxy-authorization", "Bearer billing-key")
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(f.up.requests(), 1);
}

#[tokio::test]
async fn in_flight_requests_complete_across_shutdown() {
    let f = Fixture::start().await;
    let url = f.url("plain", "/fake/delay/1500");
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { support::try_http("GET", &url, &[BILLING], "").await })
        })
        .collect();
    assert!(
        support::eventually(LONG, || async { f.up.requests() == 100 }).await,
        "upstream saw {}",
        f.up.requests()
    );
    f.shutdown.trigger();
    let plain = f.addr("plain");
    assert!(support::eventually(LONG, || support::connection_refused(plain)).await);
    for r in requests {
        let (status, _, body) = r.await.unwrap().expect("request completes");
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    }
    tokio::time::timeout(LONG, f.proxy.wait())
        .await
        .expect("drained");
    assert!(f
        .metrics
        .encode()
        .contains("tokenbroker_connections_open 0"));
}

#[tokio::test]
async fn reconfigure_swaps_routes_for_new_requests() {
    let f = Fixture::start().await;
    let (status, _, _) = http("GET", &f.url("plain", "/fake/x"), &[BILLING], "").await;
    assert_eq!(status, StatusCode::OK);
    let mut config = f.broker_free_config();
    config.routes.clear();
    f.proxy.reconfigure(Arc::new(config));
    let (status, _, _) = http("GET", &f.url("plain", "/fake/x"), &[BILLING], "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

impl Fixture {
    /// A config with the fixture's callers and no routes (for reconfigure).
    fn broker_free_config(&self) -> Config {
        Config {
            callers: vec![caller("billing", "billing-key", vec![])],
            ..Config::minimal(
                self.emu
                    .identity_config("admin", &Secret::new(ADMIN_SECRET)),
            )
        }
    }
}

/// Every task of this (single-threaded) test runtime logs to the thread's default subscriber.
#[tokio::test]
async fn no_caller_key_or_token_in_trace_logs() {
    let capture = support::logs::LogCapture::default();
    let _guard = tracing::subscriber::set_default(capture.subscriber());

    let f = Fixture::start().await;
    let forged = ("authorization", "Bearer forged-secret-value");
    let (status, _, _) = http("GET", &f.url("plain", "/fake/a"), &[BILLING, forged], "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = http(
        "GET",
        &f.url("plain", "/fake/b"),
        &[("proxy-authorization", "Bearer unknown-secret-key")],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let h2c = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let response = h2c
        .request(get(&f.url("plain", "/fake/c"), &[BILLING, forged]))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    f.emu.revoke_access_tokens();
    let (status, _, _) = http("GET", &f.url("plain", "/echo/d"), &[BILLING], "").await;
    assert_eq!(status, StatusCode::OK);

    let token = f.broker.token("billing").await.unwrap();
    let token = token
        .header
        .to_str()
        .unwrap()
        .trim_start_matches("Bearer ")
        .to_string();
    let logs = capture.text();
    assert_eq!(
        logs.matches("tokenbroker::request").count(),
        4,
        "one line per request"
    );
    for secret in [
        "billing-key",
        "unknown-secret-key",
        "forged-secret-value",
        &token,
    ] {
        assert!(!logs.contains(secret), "a secret is in the logs");
    }
}

/// The request line: path without the query, listener, peer, body bytes both ways, and
/// tokenbroker's own 5xx at WARN (the upstream's answers and 4xx refusals at INFO).
#[tokio::test]
async fn the_request_line_has_path_listener_peer_and_bytes_and_own_5xx_are_warnings() {
    let capture = support::logs::LogCapture::default();
    let _guard = tracing::subscriber::set_default(capture.json_subscriber());
    let f = Fixture::start().await;

    // a small body, buffered for replay; the upstream answers its byte count ("11")
    let (status, _, body) = http(
        "POST",
        &f.url("plain", "/fake/upload?query-secret=q1"),
        &[BILLING],
        "hello world",
    )
    .await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"11"[..]));
    // a streamed (chunked) body of 3 x 1000 bytes; the answer is "3000"
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..3)
        .map(|_| Ok(Frame::data(Bytes::from(vec![b'x'; 1000]))))
        .collect();
    let request = Request::post(f.url("sidecar", "/fake/upload"))
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let (status, _, body) = read_all(client.request(request).await.unwrap()).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"3000"[..]));
    let (status, _, _) = http("GET", &f.url("plain", "/down/x"), &[BILLING], "").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let (status, _, _) = http("GET", &f.url("plain", "/fake/y"), &[], "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let lines = capture.json_lines("tokenbroker::request");
    assert_eq!(lines.len(), 4, "{lines:#?}");
    for line in &lines {
        assert_eq!(line["message"], "request", "{line}");
        assert!(line.get("fields").is_none(), "{line}");
        let peer: SocketAddr = line["peer"].as_str().unwrap().parse().unwrap();
        assert!(peer.ip().is_loopback(), "{line}");
        assert!(line["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    }
    let small = &lines[0];
    assert_eq!(small["path"], "/fake/upload", "{small}");
    assert_eq!(small["listener"], "plain");
    assert_eq!(small["route"], "fake");
    assert_eq!(small["caller"], "billing");
    assert_eq!(
        (small["bytes_in"].as_u64(), small["bytes_out"].as_u64()),
        (Some(11), Some(2))
    );
    assert_eq!(small["level"], "INFO");
    let streamed = &lines[1];
    assert_eq!(streamed["listener"], "sidecar", "{streamed}");
    assert_eq!(
        (
            streamed["bytes_in"].as_u64(),
            streamed["bytes_out"].as_u64()
        ),
        (Some(3000), Some(4))
    );
    let down = &lines[2];
    assert_eq!(
        (down["status"].as_u64(), down["error"].as_str()),
        (Some(502), Some("upstream_unavailable")),
        "{down}"
    );
    assert_eq!(down["level"], "WARN", "{down}");
    assert_eq!(down["path"], "/down/x");
    let refused = &lines[3];
    assert_eq!(
        (refused["status"].as_u64(), refused["level"].as_str()),
        (Some(401), Some("INFO")),
        "{refused}"
    );
    assert_eq!(refused["bytes_in"].as_u64(), Some(0));
    assert!(
        refused["bytes_out"].as_u64() > Some(0),
        "the JSON error body: {refused}"
    );
    assert!(
        !capture.text().contains("query-secret"),
        "the query is never logged"
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start_with(|c| c.limits.max_connections = 1).await;
    let plain = f.addr("plain");
    let _held = tokio::net::TcpStream::connect(plain).await.unwrap();
    let open = || async {
        f.metrics
            .encode()
            .contains("tokenbroker_connections_open 1")
    };
    assert!(support::eventually(LONG, open).await);
    let mut second = tokio::net::TcpStream::connect(plain).await.unwrap();
    let _ = second
        .write_all(
            b"GET /fake/x HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer billing-key\r\n\r\n",
        )
        .await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(LONG, second.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(
        read.is_err() || answer.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    f.assert_nothing_forwarded();
}

// ---- idle keep-alive connections park ------------------------------------------------------

/// How many connections are parked now.
fn parked(f: &Fixture) -> f64 {
    support::sample(&f.metrics.encode(), "tokenbroker_connections_parked").unwrap()
}

/// Longer than a connection idles before it parks (1 s), with room for the check's period.
const PARKED_BY: Duration = Duration::from_millis(2500);

/// Writes `request` and reads one answer with a `Content-Length` body: (status line, body).
async fn exchange<S>(stream: &mut S, request: &[u8]) -> (String, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    stream.write_all(request).await.unwrap();
    let (head, body, after) = tokio::time::timeout(LONG, support::read_answer(stream))
        .await
        .expect("an answer");
    assert_eq!(after, 0, "nothing after the answer");
    (head.lines().next().unwrap().to_string(), body)
}

const GET_FAKE: &[u8] =
    b"GET /fake/a HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer billing-key\r\n\r\n";

#[tokio::test]
async fn an_idle_keep_alive_connection_parks_and_serves_its_next_requests() {
    // Without a drain period, idle connections are closed as soon as shutdown starts.
    let f = Fixture::start_with(|c| c.limits.drain = Duration::ZERO).await;
    let mut stream = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    let post = b"POST /fake/upload HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer billing-key\r\nContent-Length: 5\r\n\r\nhello";
    for (round, request) in [GET_FAKE, &post[..], GET_FAKE].into_iter().enumerate() {
        let (status, body) = exchange(&mut stream, request).await;
        assert_eq!(status, "HTTP/1.1 200 OK", "round {round}");
        assert_eq!(body, if round == 1 { "5" } else { "ok" }, "round {round}");
        assert_eq!(
            parked(&f),
            0.0,
            "round {round}: a connection at work is not parked"
        );
        assert!(
            support::eventually(LONG, || async { parked(&f) == 1.0 }).await,
            "round {round}: the idle connection parks"
        );
    }
    assert_eq!(f.up.requests(), 3);

    // At shutdown a parked connection is closed at once, and the proxy drains.
    f.shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(5), f.proxy.wait())
        .await
        .expect("drained at once, not after the grace period");
    let mut rest = Vec::new();
    use tokio::io::AsyncReadExt;
    let n = tokio::time::timeout(LONG, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0, "closed without a byte");
    let metrics = f.metrics.encode();
    assert!(
        metrics.contains("tokenbroker_connections_open 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tokenbroker_connections_parked 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_tls_connection_parks_and_resumes() {
    let f = Fixture::start().await;
    let mut stream = proxy_config::tls_connect(f.addr("tls"), None).await;
    for round in 0..2 {
        let (status, body) = exchange(&mut stream, GET_FAKE).await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "ok"),
            "round {round}"
        );
        assert!(
            support::eventually(LONG, || async { parked(&f) == 1.0 }).await,
            "round {round}: the idle TLS connection parks"
        );
    }
}

#[tokio::test]
async fn a_half_sent_request_keeps_its_connection_from_parking() {
    use tokio::io::AsyncWriteExt;
    let f = Fixture::start().await;
    let mut stream = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    exchange(&mut stream, GET_FAKE).await;
    let (start, rest) = GET_FAKE.split_at(30);
    stream.write_all(start).await.unwrap();
    tokio::time::sleep(PARKED_BY).await;
    assert_eq!(parked(&f), 0.0, "the proxy holds part of a request");
    let (status, body) = exchange(&mut stream, rest).await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok"));

    // A chunked upload cut in the middle of its body (the connection idles, the request is in
    // flight) does not park either, and completes.
    let head = b"POST /fake/upload HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer billing-key\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel";
    stream.write_all(head).await.unwrap();
    tokio::time::sleep(PARKED_BY).await;
    assert_eq!(parked(&f), 0.0, "a request in flight");
    let (status, body) = exchange(&mut stream, b"lo\r\n0\r\n\r\n").await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "5"));
    assert!(support::eventually(LONG, || async { parked(&f) == 1.0 }).await);
}

#[tokio::test]
async fn an_answer_still_streaming_keeps_its_connection_from_parking() {
    let f = Fixture::start().await;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let response = send(&client, get(&f.url("plain", "/fake/stream/2"), &[BILLING])).await;
    assert_eq!(response.status(), StatusCode::OK);
    // The first 64 KiB are out; the upstream holds the rest back.
    tokio::time::sleep(PARKED_BY).await;
    assert_eq!(parked(&f), 0.0, "an answer is still being written");
    f.up.release();
    let (status, _, body) = read_all(response).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 2 * MIB));
}

#[tokio::test]
async fn an_http2_connection_never_parks() {
    let f = Fixture::start().await;
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    for round in 0..2 {
        let response = send(&client, get(&f.url("plain", "/fake/a"), &[BILLING])).await;
        let (status, version, body) = read_all(response).await;
        assert_eq!(
            (status, version, &body[..]),
            (StatusCode::OK, Version::HTTP_2, &b"ok"[..]),
            "round {round}"
        );
        tokio::time::sleep(PARKED_BY).await;
        assert_eq!(parked(&f), 0.0, "round {round}");
    }
    let open = support::sample(&f.metrics.encode(), "tokenbroker_connections_open").unwrap();
    assert_eq!(open, 1.0, "one h2c connection served both requests");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_read_timeout() {
    // hyper's header timer runs while it waits for the next head, so without parking an idle
    // keep-alive connection was closed at header_read_timeout instead of at idle_timeout.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f =
        Fixture::start_with(|c| c.limits.header_read_timeout = Duration::from_millis(1200)).await;
    let mut stream = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    for round in 0..2 {
        let (status, body) = exchange(&mut stream, GET_FAKE).await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "ok"),
            "round {round}"
        );
        // A connection opened now with half a head is closed at header_read_timeout: by then
        // this one has idled that long too.
        let mut witness = tokio::net::TcpStream::connect(f.addr("plain"))
            .await
            .unwrap();
        witness.write_all(&GET_FAKE[..20]).await.unwrap();
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(LONG, witness.read_to_end(&mut answer)).await;
        assert!(closed.is_ok(), "round {round}: the witness is closed");
    }
    assert_eq!(parked(&f), 1.0);
}
