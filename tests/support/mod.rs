//! HTTP helpers shared by the integration tests (`mod support;`), and beside them: log capture
//! (`logs`), a real `redis-server` (`redis_server`), Redis Cluster and Sentinel (`redis_ha`), child processes (`process`), a cluster of
//! `tokenbroker run` replicas (`cluster`), an in-process fake identity service for paused-time
//! broker tests (`fake_identity`) and broker helpers (`broker`) and store records (`records`). The HTTP helpers here know
//! nothing of the emulator or the proxy.
//!
//! Every call opens a fresh connection (no pool), so one step of a test cannot leak a kept-alive
//! connection into the next; `raw` speaks hand-written HTTP/1.1 for malformed requests. Tests wait
//! on conditions (`wait_for`, `eventually`, `wait_until`), never for a fixed time; `pace` spaces
//! a stream of requests.

#![allow(dead_code)]

pub mod broker;
pub mod cluster;
pub mod fake_identity;
pub mod logs;
pub mod process;
pub mod records;
pub mod redis_ha;
pub mod redis_server;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A whole answer: status, headers, body.
pub type Reply = (StatusCode, HeaderMap, Bytes);

/// How long any helper waits before failing the test.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Sends a request and returns the response with its body unread (for streaming tests).
pub async fn try_send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Response<Incoming>, String> {
    let mut req = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(body.into()))
        .map_err(|e| format!("bad request: {e}"))?;
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Full<Bytes>>();
    match tokio::time::timeout(TIMEOUT, client.request(req)).await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("timed out".to_string()),
    }
}

/// Sends a request and reads the whole answer; `Err` describes a transport failure.
pub async fn try_http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Reply, String> {
    let resp = try_send(method, url, headers, body).await?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(TIMEOUT, body.collect())
        .await
        .map_err(|_| "body timed out".to_string())?
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// Like [`try_http`]; panics on a transport failure.
pub async fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    match try_http(method, url, headers, body).await {
        Ok(reply) => reply,
        Err(e) => panic!("{method} {url} failed: {e}"),
    }
}

/// Writes `request` as is on a new connection and reads until the server closes it (send
/// `Connection: close`). Returns the raw answer, lossily decoded.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(TIMEOUT, exchange).await {
        Ok(Ok(answer)) => String::from_utf8_lossy(&answer).into_owned(),
        Ok(Err(e)) => panic!("raw request to {addr} failed: {e}"),
        Err(_) => panic!("raw request to {addr} timed out"),
    }
}

/// One HTTP/1 answer with a `Content-Length` body read from `stream`, as sent: its head (status
/// line and headers, without the blank line), its body, and how many bytes came after it. Panics
/// if the stream ends first; the caller bounds the wait.
pub async fn read_answer<S>(stream: &mut S) -> (String, String, usize)
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().unwrap())
                })
                .expect("an answer with a Content-Length");
            let body_end = end + 4 + length;
            if got.len() >= body_end {
                let body = String::from_utf8_lossy(&got[end + 4..body_end]).into_owned();
                return (head, body, got.len() - body_end);
            }
        }
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed without a whole answer; read so far: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Whether a TCP connection to `addr` is refused.
pub async fn connection_refused(addr: SocketAddr) -> bool {
    matches!(
        tokio::net::TcpStream::connect(addr).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Polls `check` every 50 ms until it yields a value; `None` if it did not within `limit`. On
/// paused time the polls advance the clock.
pub async fn wait_for<T, F, Fut>(limit: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        poll.tick().await;
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

/// Polls `check` every 50 ms until it holds; false if it never did within `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for(limit, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await
    .is_some()
}

/// Waits until `check` holds; panics naming `what` if it did not within `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(
        eventually(limit, check).await,
        "{what}: not within {limit:?}"
    );
}

/// A pace for a stream of requests: `tick().await` returns at once the first time, then at most
/// once per `period` (a late tick is not made up for).
pub fn pace(period: Duration) -> tokio::time::Interval {
    let mut pace = tokio::time::interval(period);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    pace
}

/// The body as JSON; panics with the body text if it is not JSON.
pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// A header's value as text ("" if absent).
pub fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// `Basic base64(id:secret)`.
pub fn basic(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

/// `application/x-www-form-urlencoded` of the pairs.
pub fn form(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).expect("form encoding")
}

/// The value of the Prometheus sample line `series` (`name{labels}`) in `metrics`, if any.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A raw TCP upstream on 127.0.0.1:0, for answers no HTTP library would send: on each
/// connection it reads one request head, writes `answer` as is and closes. Returns its address
/// and the request heads it read.
pub async fn raw_upstream(
    answer: &'static [u8],
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut stream).await else {
                    return;
                };
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let _ = stream.write_all(answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, heads)
}

/// Reads one HTTP/1 request head (to its blank line) byte by byte, so that nothing after it is
/// taken; `None` when the connection ends first.
pub async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(head)
}

/// An emulator whose one client is `admin`, with `secret`.
pub async fn emulator_with_admin(secret: &str) -> tokenbroker::emulator::Emulator {
    tokenbroker::emulator::Emulator::start(tokenbroker::emulator::EmulatorConfig {
        clients: vec![("admin".into(), tokenbroker::secret::Secret::new(secret))],
        ..tokenbroker::emulator::EmulatorConfig::default()
    })
    .await
    .expect("emulator starts")
}
