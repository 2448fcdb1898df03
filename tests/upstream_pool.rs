//! The upstream connection pool over real sockets: HTTP/1.1 connections are reused while their
//! answers are read to the end and closed when one is left unread; an HTTPS upstream that offers
//! h2 gets one shared HTTP/2 connection; idle connections close after `limits.idle_timeout`; an
//! upstream that closes after every answer loses no request; bytes an upstream sends after an
//! answer never answer the next request; no connection within `connect_timeout` is a 504; an
//! upstream that answers before the request's body is all sent gets no more of it, and its
//! connection is not reused; answers that carry no body whatever their head says (to `HEAD`,
//! `204`, `304`) and informational answers before the real one leave the connection in step; an
//! idempotent request whose kept-alive connection closes under it goes out once more, another
//! does not; a request whose HTTP/2 stream the upstream refused goes out once more, whatever its
//! method.
//! Real emulator (tokens), real tokenbroker, a fake upstream counting its connections.

#[path = "support/proxy_config.rs"]
mod proxy_config;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::path::PathBuf;
use std::time::Duration;

use http::{StatusCode, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use proxy_config::{caller, listener, route};
use support::{raw_upstream, try_http, try_send, wait_until, TIMEOUT};
use tokenbroker::app::AppHandle;
use tokenbroker::config::{Config, Limits};
use tokenbroker::emulator::Emulator;
use tokenbroker::secret::Secret;
use upstream::FakeUpstream;

const ADMIN_SECRET: &str = "admin-secret-for-pool-tests";
const KEY: (&str, &str) = ("Proxy-Authorization", "Bearer alice-key");

/// Emulator, a plain and a TLS fake upstream, a raw upstream that closes after each answer, one
/// that smuggles an answer after its first, and tokenbroker with routes `/up` (plain), `/tls`
/// (HTTPS, h2 offered), `/closing`, `/smuggler`, `/early`, `/bodyless` and `/closing-under` (raw),
/// `/refusing` (HTTPS, HTTP/2 only, refusing streams), and `/silent` (a listener that takes no
/// connection; `connect_timeout` 300 ms).
struct Fixture {
    _emu: Emulator,
    up: FakeUpstream,
    up_tls: FakeUpstream,
    closing_heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// What each connection of the early-answering upstream read after its answer.
    early_after: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    /// How many connections the bodyless upstream took.
    bodyless_conns: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The request heads the closing-under upstream read, by connection.
    closing_under_heads: std::sync::Arc<std::sync::Mutex<Vec<Vec<String>>>>,
    /// What the refusing HTTP/2 upstream did with each stream, in order.
    refusing_seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _unanswering: (tokio::net::TcpListener, Vec<TcpStream>),
    app: AppHandle,
}

impl Fixture {
    async fn start(limits: Limits) -> Fixture {
        let emu = support::emulator_with_admin(ADMIN_SECRET).await;
        let up = FakeUpstream::start().await;
        let up_tls = FakeUpstream::start_tls().await;
        let (closing, closing_heads) =
            raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        let smuggler = smuggling_upstream().await;
        let (early, early_after) = early_answering_upstream().await;
        let (bodyless, bodyless_conns) = bodyless_upstream().await;
        let (closing_under, closing_under_heads) = closing_under_upstream().await;
        let (refusing, refusing_seen) = refusing_h2_upstream().await;
        let mut refusing_route = route(
            "refusing",
            "/refusing",
            format!("https://localhost:{}/", refusing.port()),
            &["alice"],
        );
        refusing_route.upstream_ca_file =
            Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs/ca.pem"));
        let unanswering = unanswering_upstream().await;
        let mut silent = route(
            "silent",
            "/silent",
            format!("http://{}/", unanswering.0.local_addr().unwrap()),
            &["alice"],
        );
        silent.connect_timeout = Duration::from_millis(300);
        let mut tls_route = route(
            "tls",
            "/tls",
            format!("https://localhost:{}/", up_tls.addr().port()),
            &["alice"],
        );
        tls_route.upstream_ca_file =
            Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs/ca.pem"));
        let config = Config {
            listeners: vec![listener("plain", None, None)],
            callers: vec![caller("alice", "alice-key", vec![])],
            routes: vec![
                route("up", "/up", format!("http://{}/", up.addr()), &["alice"]),
                tls_route,
                route(
                    "closing",
                    "/closing",
                    format!("http://{closing}/"),
                    &["alice"],
                ),
                route(
                    "smuggler",
                    "/smuggler",
                    format!("http://{smuggler}/"),
                    &["alice"],
                ),
                route("early", "/early", format!("http://{early}/"), &["alice"]),
                refusing_route,
                route(
                    "closing-under",
                    "/closing-under",
                    format!("http://{closing_under}/"),
                    &["alice"],
                ),
                route(
                    "bodyless",
                    "/bodyless",
                    format!("http://{bodyless}/"),
                    &["alice"],
                ),
                silent,
            ],
            limits,
            ..Config::minimal(emu.identity_config("admin", &Secret::new(ADMIN_SECRET)))
        };
        let app = AppHandle::start(config).await.expect("tokenbroker starts");
        Fixture {
            _emu: emu,
            up,
            up_tls,
            closing_heads,
            early_after,
            bodyless_conns,
            closing_under_heads,
            refusing_seen,
            _unanswering: unanswering,
            app,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.app.proxy_addr("plain").unwrap())
    }

    /// A sample of the proxy's metrics (`tokenbroker_...`).
    fn metric(&self, series: &str) -> f64 {
        let text = self.app.metrics().encode();
        support::sample(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    }

    async fn ok(&self, method: &str, path: &str, body: &'static [u8]) -> bytes::Bytes {
        let (status, _, body) = try_http(method, &self.url(path), &[KEY], body)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(status, StatusCode::OK, "{method} {path}");
        body
    }
}

#[tokio::test]
async fn answers_read_to_the_end_leave_their_connection_for_the_next_request() {
    // Request bodies over 2 bytes are streamed, not buffered for a replay.
    let f = Fixture::start(Limits {
        replay_buffer_bytes: 2,
        ..Limits::default()
    })
    .await;
    for i in 0..10 {
        assert_eq!(f.ok("GET", &format!("/up/get/{i}"), b"").await, "ok");
        assert_eq!(f.ok("POST", "/up/upload", b"12345").await, "5");
        assert_eq!(f.ok("HEAD", "/up/head", b"").await, "");
    }
    // A chunked body, streamed to its end too.
    let mut caller = TcpStream::connect(f.app.proxy_addr("plain").unwrap())
        .await
        .unwrap();
    caller
        .write_all(
            b"POST /up/upload HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer alice-key\r\n\
              Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let head = support::read_head(&mut caller).await.expect("an answer");
    assert!(head.starts_with(b"HTTP/1.1 200 OK\r\n"));
    let mut body = [0u8; 1];
    caller.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"7");
    assert_eq!(f.ok("GET", "/up/last", b"").await, "ok");
    assert_eq!(f.up.requests(), 32);
    assert_eq!(
        f.up.connections(),
        1,
        "32 requests one after another take one upstream connection"
    );
    // and the proxy says so
    let connects = "tokenbroker_upstream_connects_total{outcome=\"ok\"}";
    assert_eq!(f.metric(connects), 1.0);
    assert_eq!(f.metric("tokenbroker_upstream_connections_open"), 1.0);
    // The pooled connection is HTTP/1.1 in origin form with the upstream's Host.
    let seen = f.up.seen();
    assert!(seen.iter().all(|s| s.version == Version::HTTP_11));
    assert_eq!(seen[0].target, "/get/0");
    assert_eq!(seen[0].headers["host"], f.up.addr().to_string());
}

#[tokio::test]
async fn an_answer_left_unread_closes_its_upstream_connection() {
    let f = Fixture::start(Limits::default()).await;
    // 4 MiB, of which the upstream sends 64 KiB and then waits: the caller reads the first
    // bytes and goes away (closing with unread bytes: a reset).
    let proxy = f.app.proxy_addr("plain").unwrap();
    let mut caller = TcpStream::connect(proxy).await.unwrap();
    caller
        .write_all(b"GET /up/stream/4 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer alice-key\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 64];
    caller.read_exact(&mut first).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200 OK\r\n"));
    drop(caller);
    // The proxy learns that the caller is gone when it writes the next bytes.
    f.up.release();
    wait_until(TIMEOUT, "the upstream connection closes", || async {
        f.up.open_connections() == 0
    })
    .await;
    // The next request is answered on a new connection, with its own answer.
    assert_eq!(f.ok("GET", "/up/next", b"").await, "ok");
    assert_eq!(f.up.connections(), 2);
}

#[tokio::test]
async fn an_https_upstream_offering_h2_gets_one_shared_http2_connection() {
    let f = Fixture::start(Limits::default()).await;
    assert_eq!(f.ok("GET", "/tls/first", b"").await, "ok");
    let requests = (0..20).map(|i| {
        let url = f.url(&format!("/tls/{i}"));
        async move {
            let response = try_send("GET", &url, &[KEY], "").await.expect("answer");
            assert_eq!(response.status(), StatusCode::OK);
            response.into_body().collect().await.unwrap().to_bytes()
        }
    });
    for body in futures_util::future::join_all(requests).await {
        assert_eq!(body, "ok");
    }
    assert_eq!(f.up_tls.requests(), 21);
    assert_eq!(
        f.up_tls.connections(),
        1,
        "one HTTP/2 connection for 21 requests"
    );
    assert!(f.up_tls.seen().iter().all(|s| s.version == Version::HTTP_2));
}

#[tokio::test]
async fn idle_upstream_connections_close_after_the_idle_timeout() {
    let f = Fixture::start(Limits {
        idle_timeout: Duration::from_millis(600),
        ..Limits::default()
    })
    .await;
    assert_eq!(f.ok("GET", "/up/a", b"").await, "ok");
    assert_eq!(f.ok("GET", "/tls/a", b"").await, "ok");
    assert_eq!(f.up.open_connections(), 1);
    wait_until(
        TIMEOUT,
        "idle HTTP/1.1 and HTTP/2 connections close",
        || async {
            f.up.open_connections() == 0
                && f.up_tls.open_connections() == 0
                && f.metric("tokenbroker_upstream_connections_open") == 0.0
        },
    )
    .await;
    // and new ones are made when needed
    assert_eq!(f.ok("GET", "/up/b", b"").await, "ok");
    assert_eq!(f.ok("GET", "/tls/b", b"").await, "ok");
    assert_eq!((f.up.connections(), f.up_tls.connections()), (2, 2));
}

#[tokio::test]
async fn an_upstream_that_closes_after_every_answer_loses_no_request() {
    let f = Fixture::start(Limits::default()).await;
    for i in 0..20 {
        assert_eq!(f.ok("GET", &format!("/closing/{i}"), b"").await, "ok");
    }
    let heads = f.closing_heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 20, "one connection per request, none reused");
    assert!(
        heads[19].starts_with("GET /19 HTTP/1.1\r\n"),
        "{}",
        heads[19]
    );
}

/// An upstream that answers its first request with one answer too many in the same write (a
/// response smuggled after the real one) and every later request, on any connection, with
/// `good`; keeps its connections open.
async fn smuggling_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let first = first.clone();
            tokio::spawn(async move {
                while support::read_head(&mut stream).await.is_some() {
                    let answer: &[u8] = match first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        true => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!",
                        false => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood",
                    };
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn bytes_after_an_answer_never_answer_the_next_request() {
    let f = Fixture::start(Limits::default()).await;
    assert_eq!(f.ok("GET", "/smuggler/1", b"").await, "ok");
    for i in 2..6 {
        let body = f.ok("GET", &format!("/smuggler/{i}"), b"").await;
        assert_eq!(body, "good", "request {i} got a stray answer");
    }
}

/// An upstream that answers each request `403` as soon as it has read its head, without reading
/// the request's body, and keeps the connection open, as a careless upstream does. Each
/// connection then reports the bytes it read after its answer: at its end, or as soon as they
/// hold `smuggled`.
async fn early_answering_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if support::read_head(&mut stream).await.is_none() {
                    return;
                }
                let answer = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
                let mut after = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    after.extend_from_slice(&buf[..n]);
                    if memchr::memmem::find(&after, b"smuggled").is_some() {
                        break;
                    }
                }
                let _ = tx.send(after);
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn an_upstream_that_answers_before_the_body_gets_no_more_of_it() {
    let mut f = Fixture::start(Limits::default()).await;
    let proxy = f.app.proxy_addr("plain").unwrap();
    let mut caller = TcpStream::connect(proxy).await.unwrap();
    caller
        .write_all(
            b"POST /early/upload HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer alice-key\r\n\
              Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
    let answer = tokio::time::timeout(TIMEOUT, support::read_head(&mut caller))
        .await
        .expect("an answer in time")
        .expect("an answer");
    assert!(
        answer.starts_with(b"HTTP/1.1 403 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // The rest of the body, once the answer is in: a request, as a careless upstream would read
    // it. (The proxy may have closed the connection by now, so a failed write is fine.)
    let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut rest = format!("{:x}\r\n", smuggled.len()).into_bytes();
    rest.extend_from_slice(smuggled);
    rest.extend_from_slice(b"\r\n0\r\n\r\n");
    let _ = caller.write_all(&rest).await;
    let after = tokio::time::timeout(TIMEOUT, f.early_after.recv())
        .await
        .expect("the upstream connection closes")
        .expect("a report");
    assert!(
        memchr::memmem::find(&after, b"smuggled").is_none(),
        "the rest of the body went to the upstream after its answer: {}",
        String::from_utf8_lossy(&after)
    );
    assert_eq!(f.metric("tokenbroker_upstream_connections_open"), 0.0);
    // and the proxy serves the next request, on a new connection
    let (status, _, _) = try_http("POST", &f.url("/early/again"), &[KEY], "x")
        .await
        .expect("an answer");
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(f.metric(connects_ok()), 2.0);
}

fn connects_ok() -> &'static str {
    "tokenbroker_upstream_connects_total{outcome=\"ok\"}"
}

/// A keep-alive upstream whose answers by path have heads that announce a body they do not carry,
/// as RFC 9112 6.3 says they may: `/head` (to a `HEAD`: `Content-Length: 7`), `/no-content`
/// (`204` with `Content-Length: 5`), `/not-modified` (`304` with `Content-Length: 9`); `/hints`
/// sends a `103 Early Hints` before its `200`; anything else is `200` with `fine`. An HTTP/1
/// client that read a body after any of them would take the next answer's bytes for it.
async fn bodyless_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                while let Some(head) = support::read_head(&mut stream).await {
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let target = head.split(' ').nth(1).unwrap_or_default();
                    let answer: &[u8] = match target {
                        "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n",
                        "/no-content" => b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                        "/not-modified" => {
                            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"
                        }
                        "/hints" => {
                            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
                                      HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhints"
                        }
                        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine",
                    };
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn answers_without_a_body_keep_the_connection_in_step() {
    let f = Fixture::start(Limits::default()).await;
    for round in 0..3 {
        let (status, headers, body) = try_http("HEAD", &f.url("/bodyless/head"), &[KEY], "")
            .await
            .expect("an answer to HEAD");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers["content-length"], "7",
            "the upstream's length, kept"
        );
        assert!(body.is_empty());
        let (status, _, body) = try_http("GET", &f.url("/bodyless/no-content"), &[KEY], "")
            .await
            .expect("an answer");
        assert_eq!((status, body.len()), (StatusCode::NO_CONTENT, 0));
        let (status, _, body) = try_http("GET", &f.url("/bodyless/not-modified"), &[KEY], "")
            .await
            .expect("an answer");
        assert_eq!((status, body.len()), (StatusCode::NOT_MODIFIED, 0));
        assert_eq!(f.ok("GET", "/bodyless/hints", b"").await, "hints");
        assert_eq!(
            f.ok("GET", &format!("/bodyless/plain/{round}"), b"").await,
            "fine"
        );
    }
    assert_eq!(
        f.bodyless_conns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "15 answers, one connection"
    );
}

/// A keep-alive upstream that answers the first request of each connection (`first on N`, N the
/// connection's number from 1) and, on the second, reads its head and closes the connection
/// without an answer: an upstream closing an idle connection just as a request goes out on it.
/// Records the heads it read, by connection.
async fn closing_under_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<Vec<String>>>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<String>>::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = {
                let mut seen = seen.lock().unwrap();
                seen.push(Vec::new());
                seen.len()
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                for answered in [true, false] {
                    let Some(head) = support::read_head(&mut stream).await else {
                        return;
                    };
                    seen.lock().unwrap()[n - 1].push(String::from_utf8_lossy(&head).into_owned());
                    if answered {
                        let body = format!("first on {n}");
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
                // dropped: closed with the second request unanswered
            });
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn an_idempotent_request_goes_out_once_more_when_its_kept_alive_connection_closes_under_it() {
    let f = Fixture::start(Limits::default()).await;
    // Connection 1 answers the first GET and is kept; the second GET goes out on it, the upstream
    // closes it unanswered, and the GET goes out once more, on connection 2.
    assert_eq!(f.ok("GET", "/closing-under/a", b"").await, "first on 1");
    assert_eq!(f.ok("GET", "/closing-under/b", b"").await, "first on 2");
    // A POST is not sent twice: on connection 2, closed under it, it fails.
    let (status, _, body) = try_http("POST", &f.url("/closing-under/c"), &[KEY], "x")
        .await
        .expect("an answer");
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        String::from_utf8_lossy(&body).contains("upstream_unavailable"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    // and the next GET is answered on a new connection
    assert_eq!(f.ok("GET", "/closing-under/d", b"").await, "first on 3");
    let heads = f.closing_under_heads.lock().unwrap().clone();
    let targets: Vec<Vec<&str>> = heads
        .iter()
        .map(|conn| {
            conn.iter()
                .map(|h| h.split(' ').nth(1).unwrap_or_default())
                .collect()
        })
        .collect();
    assert_eq!(targets, [vec!["/a", "/b"], vec!["/b", "/c"], vec!["/d"]]);
    assert_eq!(f.metric("tokenbroker_upstream_resends_total"), 1.0);
}

/// An HTTPS upstream speaking HTTP/2 (the h2 crate's server, so that it can refuse a stream)
/// that refuses every second stream of a connection (`RST_STREAM` with `REFUSED_STREAM`, before
/// reading it: RFC 9113 8.7 says it was not processed) and answers the others with
/// `<method> <path> on stream <n>`, n counting the connection's streams from 1. Records
/// `answered <method> <path>` or `refused <method> <path>` per stream, in order.
async fn refusing_h2_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let tls = upstream::tls_acceptor();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (tls, log) = (tls.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(stream).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                let mut n = 0;
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    n += 1;
                    let what = format!("{} {}", request.method(), request.uri().path());
                    if n % 2 == 0 {
                        log.lock().unwrap().push(format!("refused {what}"));
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    log.lock().unwrap().push(format!("answered {what}"));
                    let body = format!("{what} on stream {n}");
                    let head = http::Response::builder()
                        .header("content-length", body.len())
                        .body(())
                        .unwrap();
                    if let Ok(mut send) = respond.send_response(head, false) {
                        let _ = send.send_data(bytes::Bytes::from(body), true);
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn a_request_whose_http2_stream_was_refused_goes_out_once_more() {
    let f = Fixture::start(Limits::default()).await;
    // Stream 1 answered; stream 2 refused, and the GET goes out once more on stream 3.
    assert_eq!(f.ok("GET", "/refusing/a", b"").await, "GET /a on stream 1");
    assert_eq!(f.ok("GET", "/refusing/b", b"").await, "GET /b on stream 3");
    // A refused stream was not processed: a POST whose body is in memory goes out once more too.
    assert_eq!(
        f.ok("POST", "/refusing/c", b"x").await,
        "POST /c on stream 5"
    );
    assert_eq!(
        *f.refusing_seen.lock().unwrap(),
        [
            "answered GET /a",
            "refused GET /b",
            "answered GET /b",
            "refused POST /c",
            "answered POST /c"
        ]
    );
    assert_eq!(f.metric("tokenbroker_upstream_resends_total"), 2.0);
}

/// A listening socket that never accepts, its accept queue filled: the kernel drops further
/// SYNs, so a connect to it gets no answer.
async fn unanswering_upstream() -> (tokio::net::TcpListener, Vec<TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    while let Ok(Ok(stream)) =
        tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
    {
        queued.push(stream);
        assert!(queued.len() < 64, "the accept queue does not fill");
    }
    (listener, queued)
}

#[tokio::test]
async fn no_connection_within_connect_timeout_is_an_upstream_timeout() {
    let f = Fixture::start(Limits::default()).await;
    let (status, _, body) = try_http("GET", &f.url("/silent/x"), &[KEY], "")
        .await
        .expect("an answer");
    assert_eq!(
        status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("upstream_timeout"), "{body}");
    let timeouts = "tokenbroker_upstream_connects_total{outcome=\"timeout\"}";
    assert_eq!(f.metric(timeouts), 1.0);
    // and the proxy serves the next request
    assert_eq!(f.ok("GET", "/up/after", b"").await, "ok");
}

#[tokio::test]
async fn a_download_on_an_http2_connection_outlives_the_connections_idle_timeout() {
    let f = Fixture::start(Limits {
        idle_timeout: Duration::from_millis(600),
        ..Limits::default()
    })
    .await;
    // 4 MiB over h2: 64 KiB at once, the rest once released.
    let download = try_send("GET", &f.url("/tls/stream/4"), &[KEY], "")
        .await
        .expect("head of the download");
    assert_eq!(download.status(), StatusCode::OK);
    // No new request for three idle timeouts: the pool lets the connection go (the reaper runs
    // every half timeout), while the download is still open on it. A wait that asserts that
    // something does not happen (the download is not cut): no event marks it.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(f.ok("GET", "/tls/after", b"").await, "ok");
    assert_eq!(f.up_tls.connections(), 2, "the idle connection was let go");
    f.up_tls.release();
    let body = tokio::time::timeout(TIMEOUT, download.into_body().collect())
        .await
        .expect("the download ends")
        .expect("the download completes")
        .to_bytes();
    assert_eq!(body.len(), 4 * 1024 * 1024);
}
