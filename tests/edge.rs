//! The proxy's edge over raw sockets (and one HTTP/2 client, for `:authority`): hostile paths and
//! authorities, CONNECT and TRACE, ambiguous identities, caller-sent address headers, broken
//! bodies, requests cut at shutdown and the state file's mode. Each case checks the status, that
//! nothing reached the upstream where it must not, and that the proxy still serves afterwards.
//! Real emulator (tokens), real broker, a fake upstream that records what it saw.

#[path = "support/proxy_config.rs"]
mod proxy_config;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use proxy_config::{caller, listener, route, server_tls, tls_connect};
use support::{eventually, raw};
use tokenbroker::broker::Broker;
use tokenbroker::config::{CertIdentity, Config, RouteConfig};
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::metrics::Metrics;
use tokenbroker::proxy::ProxyHandle;
use tokenbroker::secret::Secret;
use tokenbroker::server::Shutdown;
use upstream::FakeUpstream;

const ADMIN_SECRET: &str = "admin-secret-for-edge-tests";
const ALICE: &str = "Proxy-Authorization: Bearer alice-key";
const BOB: &str = "Proxy-Authorization: Bearer bob-key";
const LONG: Duration = Duration::from_secs(20);

/// Emulator, broker, one recording upstream and a proxy with a plain and an mTLS listener.
///
/// Routes (the upstream base path tells which one matched): `admin` (`/admin`, alice only, to
/// `/a`), `root` (`/`, bob only, to `/r`), `raw` (`/raw` stripped, bob, to `/base`), `host`
/// (Host `internal.example`, `/h`, alice, to `/host`), `slow` (`/delay`, bob, to `/`) and
/// `upload` (`/upload`, bob, to `/`).
struct Edge {
    _emu: Emulator,
    up: FakeUpstream,
    proxy: ProxyHandle,
    shutdown: Shutdown,
    metrics: Arc<Metrics>,
}

fn unstripped(name: &str, prefix: &str, upstream: String, allow: &[&str]) -> RouteConfig {
    RouteConfig {
        strip_prefix: false,
        ..route(name, prefix, upstream, allow)
    }
}

impl Edge {
    async fn start(adjust: impl FnOnce(&mut Config)) -> Edge {
        let emu = support::emulator_with_admin(ADMIN_SECRET).await;
        let up = FakeUpstream::start().await;
        let at = |base: &str| format!("http://{}{base}", up.addr());
        let mut host = unstripped("host", "/h", at("/host/"), &["alice"]);
        host.host = Some("internal.example".into());
        let mut config = Config {
            listeners: vec![
                listener("plain", None, None),
                listener("mtls", Some(server_tls(true)), None),
            ],
            callers: vec![
                // The dev client certificate carries both identities: it names two callers.
                caller(
                    "alice",
                    "alice-key",
                    vec![CertIdentity::Uri("spiffe://tokenbroker.dev/demo".into())],
                ),
                caller("bob", "bob-key", vec![CertIdentity::Cn("demo".into())]),
            ],
            routes: vec![
                unstripped("admin", "/admin", at("/a/"), &["alice"]),
                unstripped("root", "/", at("/r/"), &["bob"]),
                route("raw", "/raw", at("/base/"), &["bob"]),
                host,
                unstripped("slow", "/delay", at("/"), &["bob"]),
                unstripped("upload", "/upload", at("/"), &["bob"]),
            ],
            ..Config::minimal(emu.identity_config("admin", &Secret::new(ADMIN_SECRET)))
        };
        adjust(&mut config);
        let metrics = Metrics::new();
        let broker = Broker::start(&config, metrics.clone())
            .await
            .expect("broker starts");
        let shutdown = Shutdown::new();
        let proxy = ProxyHandle::start(Arc::new(config), broker, metrics.clone(), shutdown.clone())
            .await
            .expect("proxy starts");
        Edge {
            _emu: emu,
            up,
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

    /// One request on a fresh plain connection (`Connection: close` is added).
    async fn send(&self, first_line: &str, headers: &[&str]) -> Answer {
        Answer::parse(&raw(self.addr("plain"), request(first_line, headers).as_bytes()).await)
    }

    /// A clean request still works.
    async fn still_serves(&self) {
        let before = self.up.requests();
        let ok = self.send("GET /ok HTTP/1.1", &["Host: tb.test", BOB]).await;
        assert_eq!(ok.status, 200, "{ok:?}");
        assert_eq!(self.up.requests(), before + 1);
    }

    /// What the upstream saw last: target and headers.
    fn last_seen(&self) -> upstream::Seen {
        self.up.seen().pop().expect("the upstream saw a request")
    }
}

fn request(first_line: &str, headers: &[&str]) -> String {
    let mut text = format!("{first_line}\r\n");
    for h in headers {
        text.push_str(h);
        text.push_str("\r\n");
    }
    text.push_str("Connection: close\r\n\r\n");
    text
}

/// A raw HTTP/1.1 answer, split.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn parse(text: &str) -> Answer {
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        Answer {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_string(),
        }
    }

    /// The error code of the JSON body (panics if there is none).
    fn error(&self) -> String {
        support::json(self.body.as_bytes())["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {self:?}"))
            .to_string()
    }

    /// Asserts a refusal with its JSON body from the error table.
    fn refused(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.error(), code, "{self:?}");
        assert!(self.head.contains("x-request-id:"), "{self:?}");
    }
}

/// Where a request target must end up.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// 400, nothing forwarded.
    Refused,
    /// This route, and the upstream sees exactly this target.
    Route(&'static str, &'static str),
}

fn allowed(route: &str, caller: &str) -> bool {
    match route {
        "admin" | "host" => caller == "alice",
        _ => caller == "bob",
    }
}

async fn check_variant(f: &Edge, first_line: &str, headers: &[&str], expect: Expect) {
    for (caller, key) in [("alice", ALICE), ("bob", BOB)] {
        let mut all = headers.to_vec();
        all.push(key);
        let before = f.up.requests();
        let a = f.send(first_line, &all).await;
        let case = format!("{first_line:?} {headers:?} as {caller}: {a:?}");
        match expect {
            Expect::Refused => {
                assert_eq!(a.status, 400, "{case}");
                assert_eq!(a.error(), "bad_request", "{case}");
                assert_eq!(f.up.requests(), before, "forwarded: {case}");
            }
            Expect::Route(name, _) if !allowed(name, caller) => {
                assert_eq!(a.status, 403, "{case}");
                assert_eq!(a.error(), "forbidden", "{case}");
                assert_eq!(f.up.requests(), before, "forwarded: {case}");
            }
            Expect::Route(_, target) => {
                assert_eq!(a.status, 200, "{case}");
                assert_eq!(f.up.requests(), before + 1, "{case}");
                assert_eq!(f.last_seen().target, target, "{case}");
            }
        }
    }
}

#[tokio::test]
async fn no_path_or_authority_variant_reaches_a_route_it_is_not_allowed() {
    use Expect::*;
    let f = Edge::start(|_| {}).await;
    let paths: &[(&str, Expect)] = &[
        // Encoded letters and repeated slashes resolve to the route they spell.
        ("/admin/x", Route("admin", "/a/admin/x")),
        ("/%61dmin/x", Route("admin", "/a/admin/x")),
        ("/%61%64%6D%69%6E/x", Route("admin", "/a/admin/x")),
        ("/adm%69n", Route("admin", "/a/admin")),
        ("//admin/x", Route("admin", "/a/admin/x")),
        ("///admin//x", Route("admin", "/a/admin/x")),
        ("/admin/%7euser/%41", Route("admin", "/a/admin/~user/A")),
        ("/admin/caf%c3%a9", Route("admin", "/a/admin/caf%C3%A9")),
        ("/admin/x?q=%2f..;", Route("admin", "/a/admin/x?q=%2f..;")),
        // Case, look-alikes and other segments stay where they are.
        ("/ADMIN/x", Route("root", "/r/ADMIN/x")),
        ("/%41dmin", Route("root", "/r/Admin")),
        ("/adminx", Route("root", "/r/adminx")),
        ("/admin.x", Route("root", "/r/admin.x")),
        ("/x/admin", Route("root", "/r/x/admin")),
        ("/admin%20x", Route("root", "/r/admin%20x")),
        ("/a/..b/.well-known", Route("root", "/r/a/..b/.well-known")),
        ("/x/%2a", Route("root", "/r/x/%2A")),
        ("/raw/x", Route("raw", "/base/x")),
        ("/r%61w//x", Route("raw", "/base/x")),
        // Encoded slashes and backslashes.
        ("/admin%2fx", Refused),
        ("/admin%2Fx", Refused),
        ("/%2fadmin/x", Refused),
        ("/x/..%2fadmin", Refused),
        ("/raw/..%2fsecret", Refused),
        ("/admin%5cx", Refused),
        ("/x%5C..%5Cadmin", Refused),
        ("/admin\\x", Refused),
        // Dot segments in every encoding.
        ("/x/../admin/x", Refused),
        ("/./admin/x", Refused),
        ("/%2e%2e/admin/x", Refused),
        ("/x/%2E%2E/admin", Refused),
        ("/x/.%2e/admin", Refused),
        ("/%2e/admin", Refused),
        ("/raw/%2e%2e/secret", Refused),
        ("/%c0%ae%c0%ae/admin", Refused),
        // Path parameters, raw or encoded.
        ("/admin;x", Refused),
        ("/admin;/x", Refused),
        ("/..;/admin/x", Refused),
        ("/x/.;/admin", Refused),
        ("/raw/..;/secret", Refused),
        ("/admin%3bx", Refused),
        // Double encoding, re-parsed delimiters, NUL, control bytes, bad escapes, raw UTF-8.
        ("/%2561dmin/x", Refused),
        ("/admin%3F/x", Refused),
        ("/admin%23x", Refused),
        ("/admin%00", Refused),
        ("/admin%00/x", Refused),
        ("/admin%0d%0aX-Injected:%20y", Refused),
        ("/admin%", Refused),
        ("/admin%zz", Refused),
        ("/%C3", Refused),
        ("/adm\u{ef}n", Refused),
    ];
    for (path, expect) in paths {
        let line = format!("GET {path} HTTP/1.1");
        check_variant(&f, &line, &["Host: tb.test"], *expect).await;
    }
    let authorities: &[(&str, &[&str], Expect)] = &[
        (
            "GET /h/x HTTP/1.1",
            &["Host: internal.example"],
            Route("host", "/host/h/x"),
        ),
        (
            "GET /h/x HTTP/1.1",
            &["Host: INTERNAL.example:8080"],
            Route("host", "/host/h/x"),
        ),
        (
            "GET /h/x HTTP/1.1",
            &["Host: internal.example."],
            Route("host", "/host/h/x"),
        ),
        (
            "GET http://internal.example/h/x HTTP/1.1",
            &["Host: internal.example"],
            Route("host", "/host/h/x"),
        ),
        (
            "GET /h/x HTTP/1.1",
            &["Host: other.example"],
            Route("root", "/r/h/x"),
        ),
        (
            "GET http://other.example/h/x HTTP/1.1",
            &["Host: internal.example"],
            Refused,
        ),
        (
            "GET http://internal.example/h/x HTTP/1.1",
            &["Host: other.example"],
            Refused,
        ),
        (
            "GET /h/x HTTP/1.1",
            &["Host: other.example", "Host: internal.example"],
            Refused,
        ),
        (
            "GET /h/x HTTP/1.1",
            &["Host: internal.example", "Host: internal.example"],
            Refused,
        ),
        ("GET /h/x HTTP/1.1", &[], Refused),
        ("GET http://internal.example/h/x HTTP/1.1", &[], Refused),
        (
            "GET http://u@internal.example/h/x HTTP/1.1",
            &["Host: internal.example"],
            Refused,
        ),
        ("GET /h/x HTTP/1.1", &["Host: internal.example/h"], Refused),
        ("GET /h/x HTTP/1.1", &["Host: "], Refused),
    ];
    for (line, headers, expect) in authorities {
        check_variant(&f, line, headers, *expect).await;
    }
    assert!(paths.len() + authorities.len() >= 40);

    // X-Forwarded-Host is the authority that was routed on.
    let a = f
        .send(
            "GET http://internal.example:81/h/y HTTP/1.1",
            &["Host: internal.example:81", ALICE],
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        f.last_seen().headers["x-forwarded-host"],
        "internal.example:81"
    );
    f.still_serves().await;
}

#[tokio::test]
async fn merge_slashes_off_refuses_repeated_slashes() {
    let f = Edge::start(|c| c.limits.merge_slashes = false).await;
    for path in ["//admin/x", "/admin//x", "/x//"] {
        let a = f
            .send(&format!("GET {path} HTTP/1.1"), &["Host: tb.test", BOB])
            .await;
        a.refused(400, "bad_request");
    }
    assert_eq!(f.up.requests(), 0);
    f.still_serves().await;
}

#[tokio::test]
async fn connect_and_trace_are_405_and_never_forwarded() {
    let f = Edge::start(|_| {}).await;
    for line in [
        "CONNECT /raw/x HTTP/1.1",
        "CONNECT internal.example:443 HTTP/1.1",
        "TRACE /x HTTP/1.1",
    ] {
        let a = f.send(line, &["Host: internal.example:443", BOB]).await;
        a.refused(405, "method_not_allowed");
        assert!(a.head.contains("\r\nallow: "), "{a:?}");
        assert!(a.head.contains("connection: close"), "{a:?}");
    }
    assert_eq!(f.up.requests(), 0);
    f.still_serves().await;
}

#[tokio::test]
async fn two_identities_are_401_and_nothing_is_forwarded() {
    let f = Edge::start(|_| {}).await;
    for keys in [
        [ALICE, BOB],
        [BOB, BOB],
        [BOB, "Proxy-Authorization: Bearer nobody"],
    ] {
        let a = f
            .send("GET /x HTTP/1.1", &["Host: tb.test", keys[0], keys[1]])
            .await;
        a.refused(401, "unknown_caller");
    }
    // The dev client certificate maps to alice (URI SAN) and to bob (CN).
    let mut tls = tls_connect(f.addr("mtls"), Some("client")).await;
    tls.write_all(request("GET /x HTTP/1.1", &["Host: tb.test"]).as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(LONG, tls.read_to_end(&mut answer)).await;
    Answer::parse(&String::from_utf8_lossy(&answer)).refused(401, "unknown_caller");
    assert_eq!(f.up.requests(), 0);
    f.still_serves().await;
}

#[tokio::test]
async fn caller_sent_address_headers_do_not_reach_the_upstream() {
    let f = Edge::start(|_| {}).await;
    let a = f
        .send(
            "GET /x HTTP/1.1",
            &[
                "Host: tb.test",
                BOB,
                "Forwarded: for=6.6.6.6;host=evil.example",
                "X-Real-IP: 6.6.6.6",
                "X-Forwarded-For: 7.7.7.7",
                "X-Forwarded-Host: evil.example",
            ],
        )
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    let seen = f.last_seen().headers;
    assert!(!seen.contains_key("forwarded"), "{seen:?}");
    assert!(!seen.contains_key("x-real-ip"), "{seen:?}");
    assert_eq!(seen["x-forwarded-for"], "7.7.7.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-host"], "tb.test");
    f.still_serves().await;
}

fn count(metrics: &Metrics, series: &str) -> u64 {
    let text = metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn caller_body_errors_are_the_callers_not_the_upstreams() {
    let f = Edge::start(|_| {}).await;
    // A chunk size that overflows: streamed (no length), so the error surfaces while forwarding.
    let overflow = format!(
        "{}5\r\nhello\r\nffffffffffffffffff\r\nx\r\n0\r\n\r\n",
        request(
            "POST /upload HTTP/1.1",
            &["Host: tb.test", BOB, "Transfer-Encoding: chunked"]
        )
    );
    let a = Answer::parse(&raw(f.addr("plain"), overflow.as_bytes()).await);
    a.refused(400, "bad_request");

    // A caller that goes away mid-body, streamed and buffered.
    for framing in ["Transfer-Encoding: chunked", "Content-Length: 100"] {
        let mut s = tokio::net::TcpStream::connect(f.addr("plain"))
            .await
            .unwrap();
        let head = request("POST /upload HTTP/1.1", &["Host: tb.test", BOB, framing]);
        let forwarded = f.up.requests();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(b"5\r\nhello\r\n").await.unwrap();
        if framing.starts_with("Transfer-Encoding") {
            // streamed: gone while the body is on its way upstream
            support::wait_until(LONG, "the request reached the upstream", || async {
                f.up.requests() > forwarded
            })
            .await;
        }
        // (a body this small is read whole before it is sent: the proxy reads what came, then
        // the end of the connection)
        drop(s);
    }
    let settled = || async {
        count(
            &f.metrics,
            r#"tokenbroker_requests_total{route="upload",caller="bob",status_class="4xx"}"#,
        ) + count(
            &f.metrics,
            r#"tokenbroker_requests_cut_total{route="upload",reason="client_gone"}"#,
        ) >= 3
    };
    assert!(eventually(LONG, settled).await, "{}", f.metrics.encode());
    assert!(
        !f.metrics.encode().contains(r#"status_class="5xx""#),
        "{}",
        f.metrics.encode()
    );
    f.still_serves().await;
}

#[tokio::test]
async fn an_absurd_content_length_is_refused_with_the_error_table() {
    let f = Edge::start(|_| {}).await;
    // hyper refuses these itself (431 for the top values it reserves, 400 past u64), bodiless.
    for length in [
        "18446744073709551615",
        "18446744073709551614",
        "184467440737095516150",
    ] {
        let a = f
            .send(
                "POST /upload HTTP/1.1",
                &["Host: tb.test", BOB, &format!("Content-Length: {length}")],
            )
            .await;
        a.refused(413, "body_too_large");
    }
    assert_eq!(f.up.requests(), 0);
    f.still_serves().await;
}

#[tokio::test]
async fn requests_cut_at_the_shutdown_deadline_are_logged_and_counted() {
    let capture = support::logs::LogCapture::default();
    let _guard = tracing::subscriber::set_default(capture.subscriber());
    let f = Edge::start(|c| c.limits.shutdown_grace = Duration::from_millis(300)).await;
    f.still_serves().await;
    let addr = f.addr("plain");
    let slow = tokio::spawn(async move {
        let line = "GET /delay/20000 HTTP/1.1";
        let headers = ["Host: tb.test", BOB, "X-Request-Id: cut-at-the-deadline-1"];
        raw(addr, request(line, &headers).as_bytes()).await
    });
    assert!(eventually(LONG, || async { f.up.requests() == 2 }).await);
    f.shutdown.trigger();
    let Edge { proxy, metrics, .. } = f;
    tokio::time::timeout(LONG, proxy.wait())
        .await
        .expect("drained by the deadline");
    let answer = slow.await.unwrap();
    assert!(answer.is_empty(), "{answer:?}");
    let logs = capture.text();
    let cut: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("request cut at the shutdown deadline"))
        .collect();
    assert_eq!(cut.len(), 1, "{logs}");
    assert!(cut[0].contains("cut-at-the-deadline-1"), "{}", cut[0]);
    assert!(
        cut[0].contains("route=\"slow\"") || cut[0].contains("route=slow"),
        "{}",
        cut[0]
    );
    assert_eq!(
        count(
            &metrics,
            r#"tokenbroker_requests_cut_total{route="slow",reason="shutdown"}"#
        ),
        1
    );
}

#[tokio::test]
async fn a_state_file_readable_by_others_is_tightened_at_start() {
    use std::os::unix::fs::PermissionsExt;
    // The broker reads the state file on a blocking thread: only a global subscriber sees it (the
    // only one in this file; other tests' lines that reach it are ignored below).
    let capture = support::logs::LogCapture::default();
    tracing::subscriber::set_global_default(capture.subscriber()).unwrap();
    let emu = Emulator::start(EmulatorConfig {
        clients: vec![("admin".into(), Secret::new(ADMIN_SECRET))],
        ..EmulatorConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    std::fs::write(&path, r#"{"version":1,"api_tokens":{}}"#).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut config = Config::minimal(emu.identity_config("admin", &Secret::new(ADMIN_SECRET)));
    config.callers = vec![caller("bob", "bob-key", vec![])];
    config.tokens.state_file = Some(path.clone());
    let _broker = Broker::start(&config, Metrics::new()).await.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let logs = capture.text();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("state file") && l.contains("0644")),
        "{logs}"
    );
}

#[tokio::test]
async fn http2_authority_and_host_must_agree() {
    use http_body_util::{BodyExt, Empty};
    let f = Edge::start(|_| {}).await;
    let h2c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<bytes::Bytes>>();
    let port = f.addr("plain").port();
    // `:authority` is the proxy's address; a Host header naming another authority conflicts.
    let send = |host: Option<&'static str>| {
        let mut req = http::Request::get(format!("http://127.0.0.1:{port}/h/x"))
            .header("proxy-authorization", "Bearer alice-key");
        if let Some(h) = host {
            req = req.header("host", h);
        }
        req.body(Empty::new()).unwrap()
    };
    let before = f.up.requests();
    let response = h2c.request(send(Some("internal.example"))).await.unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, 400, "{body:?}");
    assert_eq!(support::json(&body)["error"], "bad_request");
    assert_eq!(f.up.requests(), before);
    let response = h2c.request(send(None)).await.unwrap();
    assert_eq!(
        response.status(),
        403,
        ":authority 127.0.0.1 routes to root, bob's"
    );
    f.still_serves().await;
}

/// The route `name` on `prefix` to the fixture's upstream (`adjust` closures run before it is
/// known to them), unstripped.
fn extra_route(config: &Config, name: &str, prefix: &str, allow: &[&str]) -> RouteConfig {
    let up = config.routes[0].upstream.authority().unwrap().to_string();
    unstripped(name, prefix, format!("http://{up}/"), allow)
}

/// Authorities that are no `host[:port]`: the README promises 400 for each.
const NO_HOST_PORT: [&str; 5] = [
    "a.example:abc",
    "a.example:99999",
    "a.example:80:80",
    "[a.example]",
    "a.example,other",
];

#[tokio::test]
async fn authorities_that_are_no_host_and_port_are_400_over_http1_and_h2() {
    use http_body_util::{BodyExt, Empty};
    let f = Edge::start(|_| {}).await;
    for host in NO_HOST_PORT {
        let header = format!("Host: {host}");
        check_variant(&f, "GET /h/x HTTP/1.1", &[&header], Expect::Refused).await;
    }

    // HTTP/2 (h2c, prior knowledge): the same values as `:authority`.
    let tcp = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut sent = 0;
    // `a.example:80:80` is no URI authority at all: hyper's HTTP/2 layer refuses it as a
    // malformed request (a stream reset) before the proxy sees it, and no client can send it.
    for authority in NO_HOST_PORT
        .into_iter()
        .filter(|a| a.parse::<http::uri::Authority>().is_ok())
    {
        for key in ["Bearer alice-key", "Bearer bob-key"] {
            let before = f.up.requests();
            let request = http::Request::get(format!("http://{authority}/h/x"))
                .header("proxy-authorization", key)
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let response = tokio::time::timeout(LONG, h2.send_request(request))
                .await
                .unwrap()
                .unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(status, 400, "{authority}: {body:?}");
            assert_eq!(support::json(&body)["error"], "bad_request", "{authority}");
            assert_eq!(f.up.requests(), before, "{authority} was forwarded");
        }
        sent += 1;
    }
    assert_eq!(sent, NO_HOST_PORT.len() - 1);
    // Sent as raw frames, `a.example:80:80` gets a stream reset and reaches nothing.
    let before = f.up.requests();
    let frame = raw_h2_request(f.addr("plain"), "a.example:80:80", "/h/x").await;
    assert_eq!(frame, H2_RST_STREAM, "frame type {frame}");
    // (The same frames with a valid URI authority get our answer.)
    let frame = raw_h2_request(f.addr("plain"), "a.example:abc", "/h/x").await;
    assert_eq!(frame, H2_HEADERS, "frame type {frame}");
    assert_eq!(f.up.requests(), before);
    f.still_serves().await;
}

const H2_HEADERS: u8 = 1;
const H2_RST_STREAM: u8 = 3;

/// Sends one bodiless h2c GET (prior knowledge) with `authority` written as is, as bob, and
/// returns the type of the first frame the server sends on its stream (HEADERS or RST_STREAM).
async fn raw_h2_request(addr: SocketAddr, authority: &str, path: &str) -> u8 {
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }
    // HPACK literals without indexing, new names, no Huffman: 0x00, name, value.
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", authority),
        (":path", path),
        ("proxy-authorization", "Bearer bob-key"),
    ] {
        block.push(0);
        for text in [name, value] {
            assert!(text.len() < 127);
            block.push(text.len() as u8);
            block.extend_from_slice(text.as_bytes());
        }
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    // END_STREAM | END_HEADERS
    out.extend(frame(H2_HEADERS, 0x5, 1, &block));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&out).await.unwrap();
    let read = async {
        loop {
            let mut head = [0u8; 9];
            s.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.unwrap();
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if stream == 1 && matches!(head[3], H2_HEADERS | H2_RST_STREAM) {
                return head[3];
            }
        }
    };
    tokio::time::timeout(LONG, read)
        .await
        .expect("an answer on stream 1")
}

/// Caller-sent headers that upstreams take as the proxy's word (README, "Security model").
const CLAIMS: [&str; 11] = [
    "X-Original-URL: /admin",
    "X-Rewrite-URL: /admin",
    "X-Forwarded-Prefix: /admin",
    "X-HTTP-Method-Override: DELETE",
    "X-Forwarded-Client-Cert: Hash=forged;Subject=\"CN=admin\"",
    "X-SSL-Client-Verify: SUCCESS",
    "X-SSL-Client-S-DN: CN=admin",
    "X-Forwarded-User: admin",
    "True-Client-IP: 6.6.6.6",
    "X-Client-IP: 6.6.6.6",
    "CF-Connecting-IP: 6.6.6.6",
];

#[tokio::test]
async fn caller_sent_claims_are_dropped_unless_the_route_passes_them() {
    let f = Edge::start(|c| {
        let mut keeps = extra_route(c, "keeps", "/keeps", &["bob"]);
        keeps.pass_caller_headers = vec!["x-http-method-override".into(), "x-ssl-client-*".into()];
        c.routes.push(keeps);
    })
    .await;
    let names = |seen: &upstream::Seen| -> Vec<String> {
        CLAIMS
            .iter()
            .map(|h| h.split_once(':').unwrap().0.to_ascii_lowercase())
            .filter(|name| seen.headers.contains_key(name.as_str()))
            .collect()
    };
    let mut headers = vec!["Host: tb.test", BOB, "X-Kept: 1"];
    headers.extend(CLAIMS);
    let a = f.send("GET /x HTTP/1.1", &headers).await;
    assert_eq!(a.status, 200, "{a:?}");
    let seen = f.last_seen();
    assert_eq!(
        names(&seen),
        Vec::<String>::new(),
        "{:?}",
        seen.headers.keys()
    );
    assert_eq!(seen.headers["x-kept"], "1");

    let a = f.send("GET /keeps/x HTTP/1.1", &headers).await;
    assert_eq!(a.status, 200, "{a:?}");
    let seen = f.last_seen();
    assert_eq!(seen.target, "/keeps/x");
    assert_eq!(
        names(&seen),
        [
            "x-http-method-override",
            "x-ssl-client-verify",
            "x-ssl-client-s-dn"
        ]
    );
    assert_eq!(seen.headers["x-http-method-override"], "DELETE");
    f.still_serves().await;
}

#[tokio::test]
async fn an_upstream_that_breaks_its_framing_mid_answer_is_an_upstream_failure() {
    let capture = support::logs::LogCapture::default();
    let _guard = tracing::subscriber::set_default(capture.json_subscriber());
    // Chunked, then bytes that are no chunk: the head goes out, the body cannot.
    let (broken, heads) = support::raw_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nthis is not a chunk\r\n\r\n",
    )
    .await;
    let f = Edge::start(|c| {
        c.routes.push(route(
            "broken",
            "/broken",
            format!("http://{broken}/"),
            &["bob"],
        ));
    })
    .await;
    // Keep-alive: the proxy, not the client, closes the connection it cannot end cleanly.
    let mut s = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    s.write_all(b"GET /broken/x HTTP/1.1\r\nHost: tb.test\r\nProxy-Authorization: Bearer bob-key\r\nX-Request-Id: broken-framing-1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(LONG, s.read_to_end(&mut answer))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    // hyper writes the head with the first body bytes: here nothing, or a head and a cut body.
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 200 "),
        "{answer:?}"
    );
    assert!(
        !answer.ends_with("0\r\n\r\n"),
        "the answer was ended: {answer:?}"
    );
    assert_eq!(heads.lock().unwrap().len(), 1);

    let line = || {
        capture
            .json_lines("tokenbroker::request")
            .into_iter()
            .find(|l| l["request_id"] == "broken-framing-1")
    };
    assert!(eventually(LONG, || async { line().is_some() }).await);
    let line = line().unwrap();
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["error"], "upstream_unavailable", "{line}");
    assert_eq!(line["broke_off"], true, "{line}");
    assert!(
        line["detail"]
            .as_str()
            .is_some_and(|d| d.contains("the upstream's body broke off")),
        "{line}"
    );
    assert_eq!(
        count(
            &f.metrics,
            r#"tokenbroker_errors_total{error="upstream_unavailable"}"#
        ),
        1,
        "{}",
        f.metrics.encode()
    );

    // Over HTTP/2: the stream is reset (before or after the head, as hyper gets to it).
    use http_body_util::{BodyExt, Empty};
    let h2c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<bytes::Bytes>>();
    let request = http::Request::get(format!("http://{}/broken/y", f.addr("plain")))
        .header("proxy-authorization", "Bearer bob-key")
        .body(Empty::new())
        .unwrap();
    match tokio::time::timeout(LONG, h2c.request(request))
        .await
        .unwrap()
    {
        Err(e) => assert!(format!("{e:?}").contains("Reset"), "{e:?}"),
        Ok(response) => {
            assert_eq!(response.status(), 200);
            let body = tokio::time::timeout(LONG, response.into_body().collect()).await;
            assert!(matches!(body, Ok(Err(_))), "the body was ended: {body:?}");
        }
    }
    let counted = || async {
        count(
            &f.metrics,
            r#"tokenbroker_errors_total{error="upstream_unavailable"}"#,
        ) == 2
    };
    assert!(eventually(LONG, counted).await, "{}", f.metrics.encode());
    assert_eq!(heads.lock().unwrap().len(), 2);
    f.still_serves().await;
}

/// Edge with a route `ws` (`/ws`, bob, `upgrades = ["websocket"]`) to the recording upstream.
async fn with_websocket_route() -> Edge {
    Edge::start(|c| {
        let mut ws = extra_route(c, "ws", "/ws", &["bob"]);
        ws.upgrades = vec!["websocket".into()];
        c.routes.push(ws);
    })
    .await
}

#[tokio::test]
async fn upgrade_without_connection_upgrade_is_a_plain_request() {
    let f = with_websocket_route().await;
    // On a route with and one without `upgrades`: no `upgrade` option in Connection, no upgrade.
    for (path, target) in [("/ws/x", "/ws/x"), ("/x", "/r/x")] {
        let a = f
            .send(
                &format!("GET {path} HTTP/1.1"),
                &["Host: tb.test", BOB, "Upgrade: websocket"],
            )
            .await;
        assert_eq!(a.status, 200, "{path}: {a:?}");
        let seen = f.last_seen();
        assert_eq!(seen.target, target);
        assert!(
            !seen.headers.contains_key("upgrade"),
            "{path}: {:?}",
            seen.headers.keys()
        );
        assert!(
            !seen.headers.contains_key("connection"),
            "{path}: {:?}",
            seen.headers.keys()
        );
    }
    f.still_serves().await;
}

#[tokio::test]
async fn a_websocket_upgrade_that_is_no_get_is_400() {
    let f = with_websocket_route().await;
    for (line, path_route) in [("POST /ws/x HTTP/1.1", "ws"), ("PUT /x HTTP/1.1", "root")] {
        let before = f.up.requests();
        let a = f
            .send(
                line,
                &[
                    "Host: tb.test",
                    BOB,
                    "Connection: Upgrade",
                    "Upgrade: websocket",
                    "Sec-WebSocket-Version: 13",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                    "Content-Length: 0",
                ],
            )
            .await;
        a.refused(400, "bad_request");
        assert_eq!(f.up.requests(), before, "{path_route}: forwarded");
    }
    f.still_serves().await;
}

#[tokio::test]
async fn heads_hyper_refuses_get_the_error_table_a_request_line_and_a_count() {
    let capture = support::logs::LogCapture::default();
    let _guard = tracing::subscriber::set_default(capture.subscriber());
    // hyper's buffer is 8 KiB: a head over it is refused by hyper, not by the handler.
    let f = Edge::start(|c| c.limits.max_header_bytes = 4096).await;
    let get = |first_line: &str, extra: &[&str]| {
        let mut headers = vec!["Host: tb.test", BOB];
        headers.extend_from_slice(extra);
        request(first_line, &headers)
    };
    let many: Vec<String> = (0..120).map(|i| format!("X-Header-{i}: v")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let big = format!("X-Big: {}", "a".repeat(9000));
    let cases = [
        (
            "obs-fold",
            get("GET /ok HTTP/1.1", &["X-Folded: a", " b"]),
            400,
            "bad_request",
        ),
        (
            "bad header name",
            get("GET /ok HTTP/1.1", &["Bad Name: x"]),
            400,
            "bad_request",
        ),
        (
            "too many headers",
            get("GET /ok HTTP/1.1", &many),
            431,
            "headers_too_large",
        ),
        ("HTTP/1.2", get("GET /ok HTTP/1.2", &[]), 400, "bad_request"),
        (
            "a list as length",
            get("POST /upload HTTP/1.1", &["Content-Length: 5, 5"]) + "hello",
            400,
            "bad_request",
        ),
        (
            "head over hyper's buffer",
            get("GET /ok HTTP/1.1", &[&big]),
            431,
            "headers_too_large",
        ),
        (
            "a length hyper reserves",
            get(
                "POST /upload HTTP/1.1",
                &["Content-Length: 18446744073709551615"],
            ),
            413,
            "body_too_large",
        ),
    ];
    for (case, bytes, status, code) in cases {
        let errors = format!("tokenbroker_errors_total{{error=\"{code}\"}}");
        let before = count(&f.metrics, &errors);
        let a = Answer::parse(&raw(f.addr("plain"), bytes.as_bytes()).await);
        a.refused(status, code);
        assert!(a.head.contains("\r\nconnection: close"), "{case}: {a:?}");
        let id = support::json(a.body.as_bytes())["request_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            a.head.contains(&format!("\r\nx-request-id: {id}")),
            "{case}: {a:?}"
        );
        assert_eq!(
            count(&f.metrics, &errors),
            before + 1,
            "{case}: errors_total"
        );
        let logs = capture.text();
        let lines: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("tokenbroker::request") && l.contains(&id))
            .collect();
        assert_eq!(lines.len(), 1, "{case}: one request line\n{logs}");
        assert!(
            lines[0].contains(&format!("status={status}")) && lines[0].contains(code),
            "{case}: {}",
            lines[0]
        );
    }
    assert_eq!(f.up.requests(), 0);
    f.still_serves().await;
}

#[tokio::test]
async fn a_head_hyper_refuses_after_a_served_request_gets_the_error_table() {
    let f = Edge::start(|_| {}).await;
    let served = "GET /ok HTTP/1.1\r\nHost: tb.test\r\nProxy-Authorization: Bearer bob-key\r\n\r\n";
    let folded = request(
        "GET /ok HTTP/1.1",
        &["Host: tb.test", BOB, "X-Folded: a", " b"],
    );
    let text = raw(f.addr("plain"), format!("{served}{folded}").as_bytes()).await;
    let at = text.find("\r\n\r\nok").expect("the first answer") + 6;
    assert_eq!(Answer::parse(&text[..at]).status, 200, "{text}");
    Answer::parse(&text[at..]).refused(400, "bad_request");
    assert_eq!(f.up.requests(), 1);
}
