//! `tokenbroker run` with worker threads (`[limits] workers = 2`), as a real process: every
//! listener has a socket per worker (`SO_REUSEPORT`) and the kernel spreads client connections
//! over them; many requests over many kept-alive connections are all answered, and answered
//! right, by both workers (the `client connection accepted` debug line names the worker that
//! accepted); a SIGTERM under load still drains every worker: in-flight requests are answered
//! (with `Connection: close`), no worker keeps accepting, the process exits 0.
//! Real emulator (tokens), real broker; the emulator's echo upstream or a fake upstream.

mod support;
#[path = "support/upstream.rs"]
mod upstream;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use support::process::{logged_addr, Process};
use support::{eventually, TIMEOUT};
use tokenbroker::config;
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::secret::Secret;
use upstream::FakeUpstream;

const ADMIN_SECRET: &str = "admin-secret-for-worker-tests";
const KEY: &str = "worker-test-caller-key";

async fn emulator() -> Emulator {
    Emulator::start(EmulatorConfig {
        clients: vec![("admin".into(), Secret::new(ADMIN_SECRET))],
        echo_upstream: Some("127.0.0.1:0".parse().unwrap()),
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator starts")
}

/// A config file for `run`: two workers, the listener's accept lines at debug, caller `load`,
/// route `/echo` to the emulator's echo upstream and `/up` (stripped) to `up`; `limits` goes into
/// `[limits]`.
fn config_file(
    emu: &Emulator,
    up: Option<SocketAddr>,
    limits: &str,
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client-secret"), ADMIN_SECRET).unwrap();
    let hash = config::format_key_hash(&config::key_hash(KEY.as_bytes()));
    let up_route = up.map_or(String::new(), |up| {
        format!(
            "[[route]]\nname = \"up\"\npath_prefix = \"/up\"\nstrip_prefix = true\n\
             upstream = \"http://{up}\"\nallow = [\"load\"]\n"
        )
    });
    let text = format!(
        r#"
[[listener]]
name = "plain"
address = "127.0.0.1:0"

[identity]
base_url = "{base}"
client_id = "admin"
client_secret = {{ file = "client-secret" }}

[logging]
level = "info,tokenbroker::proxy::listener=debug"

[limits]
workers = 2
{limits}

[[caller]]
name = "load"
key_hashes = ["{hash}"]

[[route]]
name = "echo"
path_prefix = "/echo"
upstream = "{echo}"
allow = ["load"]

{up_route}
"#,
        base = emu.base_url(),
        echo = emu.echo_url().unwrap(),
    );
    let path = dir.path().join("tokenbroker.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// `run --log-json` on `path`, and the proxy listener's address once it listens (on 2 sockets).
fn run(path: &std::path::Path) -> (Process, SocketAddr) {
    let run = Process::spawn(&["run", "--log-json", "--config", path.to_str().unwrap()]);
    let proxy = run.wait_for(|line| {
        let addr = logged_addr(line, "proxy listening")?;
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["sockets"], 2, "one socket per worker: {line}");
        Some(addr)
    });
    (run, proxy)
}

/// The worker of a `client connection accepted` line.
fn accepted_by(line: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    (v["message"] == "client connection accepted").then(|| v["worker"].as_u64().expect(line))
}

/// The names of the process's threads (as the kernel keeps them: 15 bytes at most).
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim_end().to_string())
        .collect()
}

/// `requests` GETs of `path(i)` one after the other on one kept-alive HTTP/1.1 connection; each
/// answer's status and body (read to its end), and whether it closed the connection.
async fn session(
    proxy: SocketAddr,
    requests: usize,
    path: impl Fn(usize) -> String,
) -> Result<Vec<(u16, Bytes, bool)>, String> {
    let stream = TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    let mut answers = Vec::new();
    for i in 0..requests {
        let request = Request::get(path(i))
            .header("host", "proxy.test")
            .header("proxy-authorization", format!("Bearer {KEY}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        send.ready()
            .await
            .map_err(|e| format!("request {i}: {e}"))?;
        let response = send
            .send_request(request)
            .await
            .map_err(|e| format!("request {i}: {e}"))?;
        let status = response.status().as_u16();
        let close = support::header(response.headers(), "connection") == "close";
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("request {i}: body: {e}"))?
            .to_bytes();
        answers.push((status, body, close));
    }
    Ok(answers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_answer_every_request_and_both_take_connections() {
    const CONNECTIONS: usize = 40;
    const REQUESTS: usize = 5;
    let emu = emulator().await;
    let (_dir, path) = config_file(&emu, None, "");
    let (run, proxy) = run(&path);
    let workers = thread_names(run.pid())
        .into_iter()
        .filter(|name| name.starts_with("tb-worker-"))
        .count();
    assert_eq!(workers, 2, "two worker threads, named tb-worker-N");

    let sessions: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            tokio::spawn(session(proxy, REQUESTS, move |r| {
                format!("/echo/connection-{c}/request-{r}")
            }))
        })
        .collect();
    let mut answered = 0;
    for (c, session) in sessions.into_iter().enumerate() {
        let answers = tokio::time::timeout(TIMEOUT, session)
            .await
            .expect("in time")
            .unwrap()
            .unwrap_or_else(|e| panic!("connection {c}: {e}"));
        for (r, (status, body, close)) in answers.into_iter().enumerate() {
            let echo = support::json(&body);
            assert_eq!(status, 200, "connection {c}, request {r}: {echo}");
            assert_eq!(echo["path"], format!("/echo/connection-{c}/request-{r}"));
            assert_eq!(echo["token_kind"], "access_token");
            assert!(!close, "kept alive");
            answered += 1;
        }
    }
    assert_eq!(answered, CONNECTIONS * REQUESTS);

    // Each connection was accepted once, by one of the two workers, and both took some.
    let mut by_worker = BTreeMap::new();
    for _ in 0..CONNECTIONS {
        *by_worker.entry(run.wait_for(accepted_by)).or_insert(0) += 1;
    }
    assert_eq!(
        by_worker.keys().copied().collect::<Vec<_>>(),
        [0, 1],
        "{by_worker:?}"
    );
    assert!(
        run.drain().iter().all(|l| accepted_by(l).is_none()),
        "one line per connection"
    );

    assert_eq!(run.stop(), Some(0));
    emu.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_every_worker() {
    const IN_FLIGHT: usize = 20;
    let emu = emulator().await;
    let up = FakeUpstream::start().await;
    let (_dir, path) = config_file(
        &emu,
        Some(up.addr()),
        "drain = \"2s\"\nshutdown_grace = \"10s\"",
    );
    let (run, proxy) = run(&path);

    // A token first, so that every request below is in flight at the upstream at once.
    let warm = session(proxy, 1, |_| "/up/warm".to_string()).await.unwrap();
    assert_eq!(warm[0].0, 200);
    let slow: Vec<_> = (0..IN_FLIGHT)
        .map(|_| tokio::spawn(session(proxy, 1, |_| "/up/delay/3000".to_string())))
        .collect();
    assert!(
        eventually(TIMEOUT, || async { up.requests() == 1 + IN_FLIGHT as u64 }).await,
        "{} requests reached the upstream",
        up.requests()
    );
    let mut by_worker = BTreeMap::new();
    for _ in 0..=IN_FLIGHT {
        *by_worker.entry(run.wait_for(accepted_by)).or_insert(0) += 1;
    }
    assert_eq!(
        by_worker.keys().copied().collect::<Vec<_>>(),
        [0, 1],
        "{by_worker:?}"
    );

    run.signal(libc::SIGTERM);
    // Every worker stops accepting at once: no connection reaches a socket still open.
    assert!(
        eventually(Duration::from_secs(2), || async {
            let mut refused = 0;
            for _ in 0..20 {
                refused += usize::from(support::connection_refused(proxy).await);
            }
            refused == 20
        })
        .await,
        "a worker still accepts after SIGTERM"
    );
    for (i, request) in slow.into_iter().enumerate() {
        let answers = tokio::time::timeout(TIMEOUT, request)
            .await
            .expect("in time")
            .unwrap()
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        let (status, body, close) = &answers[0];
        assert_eq!((*status, &body[..]), (200, &b"ok"[..]), "request {i}");
        assert!(close, "an answer during the drain closes its connection");
    }
    let stopped: Vec<u64> = (0..2)
        .map(|_| {
            run.wait_for(|line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                (v["message"] == "proxy listener stopped accepting")
                    .then(|| v["worker"].as_u64())?
            })
        })
        .collect();
    assert_eq!(
        stopped
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        2,
        "both workers' accept loops stopped: {stopped:?}"
    );
    let code = tokio::task::spawn_blocking(move || run.wait())
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    emu.shutdown().await;
}
