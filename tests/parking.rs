//! Parking idle HTTP/1 connections, against a client that tries to make a parked connection read
//! the rest of a body as a request: raw TCP clients, the real broker and emulator, and a fake
//! upstream that records what it saw. The proxy's listener is bound to a caller, so a request
//! needs no key: whatever reaches the routing step as a request is forwarded with a token.

#[path = "support/proxy_config.rs"]
mod proxy_config;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use proxy_config::{caller, listener, route};
use support::eventually;
use tokenbroker::broker::Broker;
use tokenbroker::config::{Config, Limits, RouteConfig};
use tokenbroker::emulator::Emulator;
use tokenbroker::metrics::Metrics;
use tokenbroker::proxy::ProxyHandle;
use tokenbroker::secret::Secret;
use tokenbroker::server::Shutdown;
use upstream::FakeUpstream;

const ADMIN_SECRET: &str = "admin-secret-for-parking-tests";
const LONG: Duration = Duration::from_secs(20);
/// The fixture's `header_read_timeout`: connections idle for a quarter of it (200 ms) park.
const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(800);
/// Much longer than a connection idles before it parks, with room for the check's period.
const PARKED_BY: Duration = Duration::from_millis(2600);

/// Emulator, broker, two recording upstreams and a proxy whose one listener is bound to `alice`.
/// Routes: `admin` (`/admin`, to `/a/`: the upstream answers `ok`), `early` (`/early`, as is, to
/// an HTTPS upstream speaking HTTP/2: it answers `ok` at once and reads the body afterwards, which
/// goes on on the request's stream) and `upload` (`/upload`, as is: the upstream reads the body,
/// then answers its length). (Over HTTP/1.1 an upstream connection that answered before the body
/// ended is closed and the rest of the body dropped: `tests/upstream_pool.rs`.)
struct Parking {
    _emu: Emulator,
    up: FakeUpstream,
    up_h2: FakeUpstream,
    proxy: ProxyHandle,
    metrics: Arc<Metrics>,
}

impl Parking {
    async fn start() -> Parking {
        let emu = support::emulator_with_admin(ADMIN_SECRET).await;
        let up = FakeUpstream::start().await;
        let up_h2 = FakeUpstream::start_tls().await;
        let at = |base: &str| format!("http://{}{base}", up.addr());
        let early = RouteConfig {
            strip_prefix: false,
            upstream_ca_file: Some(
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs/ca.pem"),
            ),
            ..route(
                "early",
                "/early",
                format!("https://localhost:{}/", up_h2.addr().port()),
                &["alice"],
            )
        };
        let config = Config {
            listeners: vec![listener("bound", None, Some("alice"))],
            callers: vec![caller("alice", "alice-key", vec![])],
            routes: vec![
                route("admin", "/admin", at("/a/"), &["alice"]),
                early,
                RouteConfig {
                    strip_prefix: false,
                    ..route("upload", "/upload", at("/"), &["alice"])
                },
            ],
            limits: Limits {
                header_read_timeout: HEADER_READ_TIMEOUT,
                ..Limits::default()
            },
            ..Config::minimal(emu.identity_config("admin", &Secret::new(ADMIN_SECRET)))
        };
        let metrics = Metrics::new();
        let broker = Broker::start(&config, metrics.clone())
            .await
            .expect("broker starts");
        let proxy = ProxyHandle::start(Arc::new(config), broker, metrics.clone(), Shutdown::new())
            .await
            .expect("proxy starts");
        Parking {
            _emu: emu,
            up,
            up_h2,
            proxy,
            metrics,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.local_addrs()[0].1
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr()).await.unwrap()
    }

    /// How many connections are parked now.
    fn parked(&self) -> f64 {
        support::sample(&self.metrics.encode(), "tokenbroker_connections_parked").unwrap()
    }

    /// The targets the upstream saw, in order.
    fn targets(&self) -> Vec<String> {
        self.up.seen().into_iter().map(|s| s.target).collect()
    }

    /// The targets the HTTP/2 upstream saw, in order.
    fn h2_targets(&self) -> Vec<String> {
        self.up_h2.seen().into_iter().map(|s| s.target).collect()
    }
}

/// One answer, its status line and head lower-cased.
struct Answer {
    status: String,
    head: String,
    body: String,
}

/// Writes `request` and reads one answer with a `Content-Length` body.
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> Answer {
    stream.write_all(request).await.unwrap();
    let (head, body, _) = tokio::time::timeout(LONG, support::read_answer(stream))
        .await
        .expect("an answer");
    let head = head.to_ascii_lowercase();
    Answer {
        status: head.lines().next().unwrap().to_string(),
        body,
        head,
    }
}

/// Everything the proxy sends until it closes the connection (or `LONG` passes).
async fn rest_of(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LONG, stream.read_to_end(&mut rest)).await;
    rest
}

const WARM: &[u8] = b"GET /admin/warm HTTP/1.1\r\nHost: x\r\n\r\n";
const SMUGGLED: &[u8] = b"GET /admin/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn a_pause_inside_a_chunk_never_parks_and_its_rest_is_never_a_request() {
    let f = Parking::start().await;
    let mut stream = f.connect().await;
    assert_eq!(exchange(&mut stream, WARM).await.status, "http/1.1 200 ok");
    // A 0x40-byte chunk of which 5 bytes arrive, the last two lines blank; the upstream answers
    // before it reads the body.
    let early =
        b"POST /early HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n40\r\nx\r\n\r\n";
    assert_eq!(exchange(&mut stream, early).await.status, "http/1.1 200 ok");

    // The connection idles mid-chunk for longer than it takes an idle connection to park.
    let parked = eventually(PARKED_BY, || async { f.parked() == 1.0 }).await;
    // Chunk data, whatever it looks like.
    stream.write_all(SMUGGLED).await.unwrap();
    let smuggled = || {
        [f.targets(), f.h2_targets()]
            .concat()
            .iter()
            .any(|t| t.contains("smuggled"))
    };
    let forwarded = eventually(PARKED_BY, || async { smuggled() }).await;
    assert!(!parked, "the connection parked in the middle of a chunk");
    assert!(
        !forwarded,
        "body bytes were forwarded as a request: {:?}",
        f.targets()
    );

    // The rest of the chunk and the body's end; the next answer is the next request's.
    let rest = [&vec![b'y'; 0x40 - 5 - SMUGGLED.len()][..], b"\r\n0\r\n\r\n"].concat();
    stream.write_all(&rest).await.unwrap();
    let after = b"GET /admin/after HTTP/1.1\r\nHost: x\r\nX-Request-Id: after-1\r\n\r\n";
    let answer = exchange(&mut stream, after).await;
    assert_eq!(answer.status, "http/1.1 200 ok");
    assert!(
        answer.head.contains("\r\nx-request-id: after-1"),
        "{}",
        answer.head
    );
    assert_eq!(f.targets(), ["/a/warm", "/a/after"]);
    assert_eq!(f.h2_targets(), ["/early"]);
}

#[tokio::test]
async fn a_body_the_proxy_refused_before_reading_is_never_a_request() {
    let f = Parking::start().await;
    let mut stream = f.connect().await;
    assert_eq!(exchange(&mut stream, WARM).await.status, "http/1.1 200 ok");
    // No route: answered 404 before the body is read, which hyper then drains or gives up on.
    let refused =
        b"POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n40\r\nx\r\n\r\n";
    assert_eq!(
        exchange(&mut stream, refused).await.status,
        "http/1.1 404 not found"
    );
    let parked = eventually(PARKED_BY, || async { f.parked() == 1.0 }).await;
    let _ = stream.write_all(SMUGGLED).await;
    let rest = rest_of(&mut stream).await;
    assert!(!parked, "the connection parked in the middle of a chunk");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert_eq!(f.targets(), ["/a/warm"]);
}

#[tokio::test]
async fn a_connection_parks_after_a_whole_chunked_body_and_serves_the_next_request() {
    let f = Parking::start().await;
    let mut stream = f.connect().await;
    // Chunk extensions, a size split over two writes, a blank line inside the data, trailers.
    let head = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    stream.write_all(head).await.unwrap();
    stream.write_all(b"1").await.unwrap();
    stream
        .write_all(b"0;name=value\r\n\r\n\r\n0123456789ab\r\n")
        .await
        .unwrap();
    let end = b"5\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n";
    let answer = exchange(&mut stream, end).await;
    assert_eq!((&*answer.status, &*answer.body), ("http/1.1 200 ok", "21"));
    assert!(
        eventually(LONG, || async { f.parked() == 1.0 }).await,
        "the connection parks once the body has ended"
    );
    assert_eq!(exchange(&mut stream, WARM).await.status, "http/1.1 200 ok");
    assert_eq!(f.targets(), ["/upload", "/a/warm"]);
}

/// The HTTP/2 prior-knowledge preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test]
async fn a_parked_http1_connection_does_not_switch_to_http2() {
    let f = Parking::start().await;
    // Without parking: a preface after a request on an HTTP/1.1 connection is refused.
    let mut stream = f.connect().await;
    let pipelined = [WARM, H2_PREFACE].concat();
    assert_eq!(
        exchange(&mut stream, &pipelined).await.status,
        "http/1.1 200 ok"
    );
    let unparked = rest_of(&mut stream).await;

    // With parking: the same.
    let mut stream = f.connect().await;
    assert_eq!(exchange(&mut stream, WARM).await.status, "http/1.1 200 ok");
    assert!(eventually(LONG, || async { f.parked() == 1.0 }).await);
    stream.write_all(H2_PREFACE).await.unwrap();
    let parked = rest_of(&mut stream).await;
    assert!(
        parked.get(3) != Some(&0x04),
        "answered with an HTTP/2 SETTINGS frame: {parked:?}"
    );
    assert_eq!(parked, unparked);
    assert_eq!(f.targets(), ["/a/warm", "/a/warm"]);
}

#[tokio::test]
async fn a_head_hyper_refuses_after_parking_gets_the_error_table() {
    let f = Parking::start().await;
    let mut stream = f.connect().await;
    assert_eq!(exchange(&mut stream, WARM).await.status, "http/1.1 200 ok");
    assert!(eventually(LONG, || async { f.parked() == 1.0 }).await);
    let folded = b"GET /admin/x HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n";
    let answer = exchange(&mut stream, folded).await;
    assert_eq!(answer.status, "http/1.1 400 bad request");
    assert!(
        answer.head.contains("\r\nx-request-id: "),
        "{}",
        answer.head
    );
    assert_eq!(
        support::json(answer.body.as_bytes())["error"],
        "bad_request"
    );
    assert_eq!(f.targets(), ["/a/warm"]);
}
