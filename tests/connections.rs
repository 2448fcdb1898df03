//! Client connections over real sockets, from their first byte to the shutdown: connections that
//! say nothing (silent, blank lines only, over the admin listener's limit) are closed at their
//! header timeout or at once; a request followed by a half-close is answered; at shutdown HTTP/1
//! connections drain (their next answer carries `Connection: close`, idle ones close after
//! `limits.drain`), HTTP/2 gets GOAWAY and finishes its streams, `/readyz` is 503; and a rolling
//! restart of three `tokenbroker run` processes under keep-alive load loses no request, with one
//! runtime per process and with two worker threads per process.
//! Real emulator (tokens), real broker, a fake upstream; raw TCP where the bytes matter.

#[path = "support/proxy_config.rs"]
mod proxy_config;
mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use proxy_config::{caller, listener, route};
use support::{eventually, try_http, TIMEOUT};
use tokenbroker::app::AppHandle;
use tokenbroker::config::{self, AdminConfig, Config};
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::secret::Secret;
use upstream::FakeUpstream;

const ADMIN_SECRET: &str = "admin-secret-for-connection-tests";
const GET: &[u8] =
    b"GET /up/a HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer alice-key\r\n\r\n";

/// Emulator, fake upstream and a running tokenbroker (one plain listener, the admin listener):
/// route `up` (`/up`, stripped, alice only) to the fake upstream.
struct Fixture {
    _emu: Emulator,
    up: FakeUpstream,
    app: AppHandle,
}

impl Fixture {
    async fn start(adjust: impl FnOnce(&mut Config)) -> Fixture {
        let emu = support::emulator_with_admin(ADMIN_SECRET).await;
        let up = FakeUpstream::start().await;
        let mut config = Config {
            listeners: vec![listener("plain", None, None)],
            admin: Some(AdminConfig {
                addr: "127.0.0.1:0".parse().unwrap(),
                max_connections: config::DEFAULT_ADMIN_MAX_CONNECTIONS,
                header_read_timeout: config::DEFAULT_ADMIN_HEADER_READ_TIMEOUT,
                key_hashes: vec![],
                tls: None,
                cert_identities: vec![],
            }),
            callers: vec![caller("alice", "alice-key", vec![])],
            routes: vec![route(
                "up",
                "/up",
                format!("http://{}/", up.addr()),
                &["alice"],
            )],
            ..Config::minimal(emu.identity_config("admin", &Secret::new(ADMIN_SECRET)))
        };
        adjust(&mut config);
        let app = AppHandle::start(config).await.expect("tokenbroker starts");
        Fixture { _emu: emu, up, app }
    }

    fn proxy(&self) -> SocketAddr {
        self.app.proxy_addr("plain").unwrap()
    }

    fn admin(&self) -> SocketAddr {
        self.app.admin_addr().unwrap()
    }

    /// How many connections are parked now.
    fn parked(&self) -> f64 {
        support::sample(
            &self.app.metrics().encode(),
            "tokenbroker_connections_parked",
        )
        .unwrap()
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// The status of `GET path` on a fresh connection, 0 for a transport failure.
async fn status(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> u16 {
    match try_http("GET", &format!("http://{addr}{path}"), headers, "").await {
        Ok((status, _, _)) => status.as_u16(),
        Err(_) => 0,
    }
}

/// Reads until the peer closes the connection (a reset counts as closed); what came before.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    match tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut got)).await {
        Ok(_) => got,
        Err(_) => panic!("the connection was not closed; read so far: {got:?}"),
    }
}

/// Reads one answer with a `Content-Length` body: its head, lower-cased, and its body.
async fn answer(stream: &mut TcpStream) -> (String, String) {
    let (head, body, _) = tokio::time::timeout(TIMEOUT, support::read_answer(stream))
        .await
        .expect("an answer");
    (head.to_ascii_lowercase(), body)
}

/// Sends `\r\n` every `every` until the connection is closed; false if it was still open after
/// `rounds` of them.
async fn blank_lines_until_closed(stream: &mut TcpStream, every: Duration, rounds: usize) -> bool {
    let mut buf = [0u8; 1024];
    for _ in 0..rounds {
        if stream.write_all(b"\r\n").await.is_err() {
            return true;
        }
        match tokio::time::timeout(every, stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {
                until_closed(stream).await;
                return true;
            }
        }
    }
    false
}

// ---- connections that say nothing ----------------------------------------------------------

#[tokio::test]
async fn admin_connections_over_the_limit_are_closed_at_once() {
    let f = Fixture::start(|c| {
        let admin = c.admin.as_mut().unwrap();
        admin.max_connections = 4;
        admin.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect(f.admin()).await);
    }
    // Accepted in order: these find the four slots taken, and are closed long before any timer.
    for _ in 0..4 {
        let mut over = connect(f.admin()).await;
        assert!(until_closed(&mut over).await.is_empty());
    }
    assert_eq!(
        status(
            f.proxy(),
            "/up/a",
            &[("proxy-authorization", "Bearer alice-key")]
        )
        .await,
        200,
        "the proxy serves while the admin listener is full"
    );
    drop(held);
    assert!(
        eventually(TIMEOUT, || async {
            status(f.admin(), "/healthz", &[]).await == 200
        })
        .await,
        "/healthz answers once the slots are free"
    );
}

#[tokio::test]
async fn a_silent_admin_connection_is_closed_at_its_header_timeout() {
    let timeout = Duration::from_secs(1);
    let f = Fixture::start(|c| c.admin.as_mut().unwrap().header_read_timeout = timeout).await;
    let started = Instant::now();
    let mut silent = connect(f.admin()).await;
    let mut half_a_head = connect(f.admin()).await;
    half_a_head
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(until_closed(&mut silent).await.is_empty());
    until_closed(&mut half_a_head).await;
    assert!(started.elapsed() >= timeout);
    assert_eq!(status(f.admin(), "/healthz", &[]).await, 200);
}

#[tokio::test]
async fn a_proxy_connection_that_sends_nothing_or_blank_lines_is_closed_at_header_read_timeout() {
    // Parking starts after a quarter of it: 250 ms.
    let timeout = Duration::from_secs(1);
    let f = Fixture::start(|c| c.limits.header_read_timeout = timeout).await;

    let started = Instant::now();
    let mut silent = connect(f.proxy()).await;
    assert!(until_closed(&mut silent).await.is_empty(), "silent");
    assert!(started.elapsed() >= timeout);

    let started = Instant::now();
    let mut blank = connect(f.proxy()).await;
    assert!(
        blank_lines_until_closed(&mut blank, Duration::from_millis(300), 30).await,
        "blank lines on a new connection"
    );
    assert!(started.elapsed() >= timeout);

    // A parked connection woken by blank lines, with pauses long enough for it to park again
    // in between: the first of them starts its clock, the others do not reset it.
    let mut parked = connect(f.proxy()).await;
    parked.write_all(GET).await.unwrap();
    assert!(answer(&mut parked).await.0.starts_with("http/1.1 200"));
    assert!(eventually(TIMEOUT, || async { f.parked() == 1.0 }).await);
    let started = Instant::now();
    assert!(
        blank_lines_until_closed(&mut parked, Duration::from_millis(700), 15).await,
        "blank lines on a parked connection kept it open for {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() >= timeout);
    assert_eq!(
        status(
            f.proxy(),
            "/up/a",
            &[("proxy-authorization", "Bearer alice-key")]
        )
        .await,
        200
    );
}

#[tokio::test]
async fn a_request_followed_by_a_half_close_is_answered() {
    let f = Fixture::start(|_| {}).await;
    let slow =
        b"GET /up/delay/300 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer alice-key\r\n\r\n";
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    for (addr, request, body) in [
        (f.proxy(), &slow[..], "ok"),
        (f.proxy(), GET, "ok"),
        (f.admin(), &healthz[..], "ok"),
    ] {
        let mut s = connect(addr).await;
        s.write_all(request).await.unwrap();
        s.shutdown().await.unwrap();
        let got = String::from_utf8_lossy(&until_closed(&mut s).await).into_owned();
        assert!(
            got.starts_with("HTTP/1.1 200") && got.ends_with(body),
            "{}: {got:?}",
            String::from_utf8_lossy(request)
        );
    }
    assert_eq!(f.up.requests(), 2);
}

// ---- drain at shutdown ---------------------------------------------------------------------

#[tokio::test]
async fn at_shutdown_http1_connections_drain_and_readyz_is_503() {
    let drain = Duration::from_secs(5);
    let grace = Duration::from_secs(20);
    let f = Fixture::start(|c| {
        c.limits.drain = drain;
        c.limits.shutdown_grace = grace;
        // Bodies stream to the upstream, so that a request can be held in flight.
        c.limits.replay_buffer_bytes = 0;
    })
    .await;
    let (proxy, admin) = (f.proxy(), f.admin());

    let mut parked = connect(proxy).await;
    parked.write_all(GET).await.unwrap();
    answer(&mut parked).await;
    assert!(eventually(TIMEOUT, || async { f.parked() == 1.0 }).await);
    let mut idle = connect(proxy).await;
    idle.write_all(GET).await.unwrap();
    answer(&mut idle).await;
    let mut quiet = connect(proxy).await;
    quiet.write_all(GET).await.unwrap();
    answer(&mut quiet).await;
    let mut busy = connect(proxy).await;
    busy.write_all(b"POST /up/upload HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Bearer alice-key\r\nContent-Length: 5\r\n\r\nhel")
        .await
        .unwrap();
    tokio::time::timeout(TIMEOUT, f.up.first_bytes())
        .await
        .expect("the upload reached the upstream");

    let Fixture { _emu, up, app } = f;
    let started = Instant::now();
    let shutdown = tokio::spawn(app.shutdown());
    assert!(
        eventually(TIMEOUT, || async {
            status(admin, "/readyz", &[]).await == 503
        })
        .await,
        "/readyz turns 503"
    );
    // The request in flight and the next request of idle connections, parked or not, are
    // answered, with `Connection: close`, and their connections closed after that.
    busy.write_all(b"lo").await.unwrap();
    let mut answered = vec![(answer(&mut busy).await, busy)];
    for mut s in [parked, idle] {
        s.write_all(GET).await.unwrap();
        answered.push((answer(&mut s).await, s));
    }
    for ((head, body), mut s) in answered {
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(body == "ok" || body == "5", "{body}");
        assert!(until_closed(&mut s).await.is_empty());
    }
    // The connection that says nothing more is closed at the end of the drain.
    assert!(until_closed(&mut quiet).await.is_empty());
    assert!(started.elapsed() >= drain);
    tokio::time::timeout(grace, shutdown)
        .await
        .expect("stopped within shutdown_grace")
        .unwrap();
    assert_eq!(up.requests(), 6);
}

#[tokio::test]
async fn at_shutdown_an_http2_connection_gets_goaway_and_its_open_stream_completes() {
    let f = Fixture::start(|c| {
        // Longer than the test waits: the connection must end through GOAWAY, not the drain.
        c.limits.drain = Duration::from_secs(120);
        c.limits.shutdown_grace = Duration::from_secs(120);
        c.limits.replay_buffer_bytes = 0;
    })
    .await;
    let tcp = connect(f.proxy()).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let body = StreamBody::new(Box::pin(futures_util::stream::unfold(
        rx,
        |mut rx| async move {
            let data = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(data)), rx))
        },
    )));
    let request = Request::post(format!("http://{}/up/upload", f.proxy()))
        .header("proxy-authorization", "Bearer alice-key")
        .body(body)
        .unwrap();
    let response = tokio::spawn(sender.send_request(request));
    tx.send(Bytes::from_static(b"hel")).await.unwrap();
    tokio::time::timeout(TIMEOUT, f.up.first_bytes())
        .await
        .expect("the upload reached the upstream");

    let Fixture { _emu, up: _up, app } = f;
    let shutdown = tokio::spawn(app.shutdown());
    tx.send(Bytes::from_static(b"lo")).await.unwrap();
    drop(tx);
    let response = tokio::time::timeout(TIMEOUT, response)
        .await
        .expect("the open stream completes")
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"5");
    tokio::time::timeout(TIMEOUT, conn)
        .await
        .expect("the server ended the connection (GOAWAY) long before the drain's end")
        .unwrap()
        .unwrap();
    tokio::time::timeout(TIMEOUT, shutdown)
        .await
        .expect("nothing left to drain")
        .unwrap();
}

// ---- a rolling restart ---------------------------------------------------------------------

/// A replica as the load balancer sees it.
struct Target {
    proxy: SocketAddr,
    admin: SocketAddr,
    /// Its `/readyz` said 503 (or it stopped answering): no more requests go to it.
    leaving: AtomicBool,
}

/// One keep-alive HTTP/1 connection per target and no retry: a request that gets no full `200`
/// is lost. A target whose answer said `Connection: close` gets nothing more from this client.
async fn load(
    targets: Arc<Mutex<Vec<Arc<Target>>>>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut connections: Vec<(
        SocketAddr,
        Option<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>,
    )> = Vec::new();
    let mut next = 0usize;
    while !stop.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < 50_000 {
        let live: Vec<Arc<Target>> = targets
            .lock()
            .unwrap()
            .iter()
            .filter(|t| !t.leaving.load(Ordering::Relaxed))
            .cloned()
            .collect();
        let usable: Vec<&Arc<Target>> = live
            .iter()
            .filter(|t| {
                connections
                    .iter()
                    .all(|(addr, c)| *addr != t.proxy || c.is_some())
            })
            .collect();
        if usable.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        next += 1;
        let target = usable[next % usable.len()];
        let slot = match connections.iter().position(|(a, _)| *a == target.proxy) {
            Some(i) => i,
            None => {
                let sender = match TcpStream::connect(target.proxy).await {
                    Ok(tcp) => {
                        let (sender, conn) =
                            hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                                .await
                                .unwrap();
                        tokio::spawn(conn);
                        Some(sender)
                    }
                    Err(e) => {
                        failures.push(format!("{}: cannot connect: {e}", target.proxy));
                        None
                    }
                };
                connections.push((target.proxy, sender));
                if connections.last().unwrap().1.is_none() {
                    continue;
                }
                connections.len() - 1
            }
        };
        let sender = connections[slot].1.as_mut().unwrap();
        let request = Request::get("/echo/x")
            .header("host", target.proxy.to_string())
            .header("proxy-authorization", "Bearer rolling-key")
            .body(Empty::new())
            .unwrap();
        sent.fetch_add(1, Ordering::Relaxed);
        let outcome = async {
            sender
                .ready()
                .await
                .map_err(|e| format!("not ready: {e}"))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| format!("{e}"))?;
            let close = support::header(response.headers(), "connection") == "close";
            let status = response.status();
            let body = response.into_body().collect().await;
            body.map_err(|e| format!("body: {e}"))?;
            if status != 200 {
                return Err(format!("status {status}"));
            }
            Ok(close)
        };
        match tokio::time::timeout(TIMEOUT, outcome).await {
            Ok(Ok(false)) => {}
            Ok(Ok(true)) => connections[slot].1 = None,
            Ok(Err(e)) => {
                failures.push(format!("{}: {e}", target.proxy));
                connections[slot].1 = None;
            }
            Err(_) => failures.push(format!("{}: timed out", target.proxy)),
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_keep_alive_load_loses_no_request() {
    rolling_restart(1).await;
}

/// The same with every replica serving on two worker threads (`SO_REUSEPORT` sockets): each
/// stops accepting on both and drains both at its SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_replicas_with_two_workers_loses_no_request() {
    rolling_restart(2).await;
}

/// Three replicas (`[limits] workers` each) under keep-alive load, replaced one at a time.
async fn rolling_restart(workers: usize) {
    let emu = Emulator::start(EmulatorConfig {
        clients: vec![("admin".into(), Secret::new(ADMIN_SECRET))],
        echo_upstream: Some("127.0.0.1:0".parse().unwrap()),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator starts");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client-secret"), ADMIN_SECRET).unwrap();
    let hash = config::format_key_hash(&config::key_hash(b"rolling-key"));
    let text = format!(
        r#"
[[listener]]
name = "plain"
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"

[identity]
base_url = "{base}"
client_id = "admin"
client_secret = {{ file = "client-secret" }}

[limits]
drain = "2s"
shutdown_grace = "5s"
workers = {workers}

[[caller]]
name = "load"
key_hashes = ["{hash}"]

[[route]]
name = "echo"
path_prefix = "/echo"
upstream = "{echo}"
allow = ["load"]
"#,
        base = emu.base_url(),
        echo = emu.echo_url().unwrap(),
    );
    let path = dir.path().join("tokenbroker.toml");
    std::fs::write(&path, text).unwrap();
    let start = || support::cluster::spawn(path.clone());

    let targets: Arc<Mutex<Vec<Arc<Target>>>> = Arc::default();
    let mut replicas = std::collections::VecDeque::new();
    let add = |replica: &support::cluster::Replica| {
        targets.lock().unwrap().push(Arc::new(Target {
            proxy: replica.proxy,
            admin: replica.admin,
            leaving: AtomicBool::new(false),
        }));
    };
    for _ in 0..3 {
        let replica = start().await;
        add(&replica);
        replicas.push_back(replica);
    }

    // The load balancer: polls each replica's /readyz and stops sending to it once it is 503.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn({
        let (targets, stop) = (targets.clone(), stop.clone());
        async move {
            let mut pace = support::pace(Duration::from_millis(50));
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                let all: Vec<Arc<Target>> = targets.lock().unwrap().clone();
                for t in all.iter().filter(|t| !t.leaving.load(Ordering::Relaxed)) {
                    if status(t.admin, "/readyz", &[]).await != 200 {
                        t.leaving.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    });
    let sent = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|_| tokio::spawn(load(targets.clone(), stop.clone(), sent.clone())))
        .collect();

    // Replace each replica in turn: start the new one, wait until it is ready, stop the old one.
    let rollout = Instant::now();
    for _ in 0..3 {
        let replica = start().await;
        add(&replica);
        replicas.push_back(replica);
        let before = sent.load(Ordering::Relaxed);
        assert!(
            eventually(TIMEOUT, || async {
                sent.load(Ordering::Relaxed) > before + 50
            })
            .await,
            "the load goes on: {} sent",
            sent.load(Ordering::Relaxed)
        );
        let old = replicas.pop_front().unwrap();
        let stopped = tokio::task::spawn_blocking(move || {
            let asked = Instant::now();
            (old.process.stop(), asked.elapsed())
        })
        .await
        .unwrap();
        assert_eq!(stopped.0, Some(0), "exit code");
        assert!(
            stopped.1 < Duration::from_secs(5),
            "stopped in {:?}",
            stopped.1
        );
    }
    let before = sent.load(Ordering::Relaxed);
    assert!(
        eventually(TIMEOUT, || async {
            sent.load(Ordering::Relaxed) > before + 200
        })
        .await
    );
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for c in clients {
        failures.extend(c.await.unwrap());
    }
    poller.await.unwrap();
    let sent = sent.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {sent} requests lost in a rollout of {:?}: {failures:?}",
        failures.len(),
        rollout.elapsed()
    );
    assert!(sent >= 500, "{sent} requests");
}
