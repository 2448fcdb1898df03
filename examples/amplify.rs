//! Token-fetch amplification: fires many concurrent requests from many cold callers through the
//! proxy and reads the identity-service emulator's counters before and after. With single flight
//! the emulator sees one create and one exchange per caller, however many requests wait.
//!
//! One HTTP/2 (prior knowledge) connection per caller carries that caller's requests as concurrent
//! streams, so 10,000 requests in flight need 100 client sockets, not 10,000. Before firing, a
//! `slow` fault is injected on the emulator (`--slow-ms`) so that every token fetch is still in
//! flight while the requests arrive; it is cleared afterwards.
//!
//! ```text
//! cargo run --release --example amplify -- --proxy 127.0.0.1:8080 \
//!     --emulator http://127.0.0.1:7001 --keys FILE [--requests 10000] [--slow-ms 1500]
//! ```
//! `FILE` holds one caller key per line (caller i = line i); keys are never printed. Prints the
//! counters' deltas and a `PASS`/`FAIL` line (exit code 1 on `FAIL`). The counts of `echo_ok`
//! say how many requests the emulator's echo upstream accepted (when the route points there).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

struct Args {
    proxy: SocketAddr,
    emulator: String,
    keys: std::path::PathBuf,
    requests: usize,
    slow_ms: u64,
    path: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: amplify --proxy ADDR --emulator URL --keys FILE \
         [--requests N] [--slow-ms MS] [--path PATH]"
    );
    std::process::exit(64)
}

fn parse_args() -> Args {
    let mut proxy = None;
    let mut emulator = None;
    let mut keys = None;
    let mut requests = 10_000;
    let mut slow_ms = 1_500;
    let mut path = "/amplify".to_string();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--proxy" => proxy = Some(value.parse().unwrap_or_else(|_| usage())),
            "--emulator" => emulator = Some(value.trim_end_matches('/').to_string()),
            "--keys" => keys = Some(value.into()),
            "--requests" => requests = value.parse().unwrap_or_else(|_| usage()),
            "--slow-ms" => slow_ms = value.parse().unwrap_or_else(|_| usage()),
            "--path" => path = value,
            _ => usage(),
        }
    }
    Args {
        proxy: proxy.unwrap_or_else(|| usage()),
        emulator: emulator.unwrap_or_else(|| usage()),
        keys: keys.unwrap_or_else(|| usage()),
        requests,
        slow_ms,
        path,
    }
}

type Control = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// One call to the emulator's control API; returns the status and the body.
async fn control(
    client: &Control,
    method: Method,
    url: String,
    body: &str,
) -> Result<(StatusCode, Bytes), String> {
    let req = Request::builder()
        .method(method)
        .uri(&url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

async fn counters(client: &Control, base: &str) -> Result<BTreeMap<String, u64>, String> {
    let (status, body) = control(
        client,
        Method::GET,
        format!("{base}/_emulator/counters"),
        "",
    )
    .await?;
    if status != StatusCode::OK {
        return Err(format!("GET /_emulator/counters: {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("counters: {e}"))
}

/// The request sent on one caller's connection.
fn request(path: &str, auth: &http::HeaderValue) -> Request<Empty<Bytes>> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(format!("http://tokenbroker.bench{path}"))
        .body(Empty::new())
        .expect("request");
    req.headers_mut()
        .insert(http::header::PROXY_AUTHORIZATION, auth.clone());
    req
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let keys: Vec<String> = std::fs::read_to_string(&args.keys)
        .unwrap_or_else(|e| {
            eprintln!("amplify: cannot read {}: {e}", args.keys.display());
            std::process::exit(64)
        })
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect();
    if keys.is_empty() || args.requests == 0 {
        eprintln!("amplify: no keys or no requests");
        std::process::exit(64);
    }
    let callers = keys.len();
    let control_client: Control = Client::builder(TokioExecutor::new()).build_http();

    let before = counters(&control_client, &args.emulator)
        .await
        .unwrap_or_else(|e| fail_early(&e));
    if args.slow_ms > 0 {
        let fault = serde_json::json!({
            "kind": "slow",
            "delay_ms": args.slow_ms,
            "operations": ["client_credentials", "create", "regenerate", "exchange"],
            "seconds": 120,
        });
        let (status, _) = control(
            &control_client,
            Method::POST,
            format!("{}/_emulator/faults", args.emulator),
            &fault.to_string(),
        )
        .await
        .unwrap_or_else(|e| fail_early(&e));
        if !status.is_success() {
            fail_early(&format!("injecting the slow fault: {status}"));
        }
    }

    // One h2 connection per caller; the requests are spread evenly over the callers.
    let mut senders = Vec::with_capacity(callers);
    for _ in 0..callers {
        let tcp = TcpStream::connect(args.proxy)
            .await
            .unwrap_or_else(|e| fail_early(&format!("connect {}: {e}", args.proxy)));
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .unwrap_or_else(|e| fail_early(&format!("h2 handshake: {e}")));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        senders.push(sender);
    }
    let auth: Vec<http::HeaderValue> = keys
        .iter()
        .map(|k| {
            let mut v = http::HeaderValue::try_from(format!("Bearer {k}"))
                .unwrap_or_else(|_| fail_early("a key is not a valid header value"));
            v.set_sensitive(true);
            v
        })
        .collect();

    let started = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let sent_at_first_answer = Arc::new(AtomicU64::new(u64::MAX));
    let mut tasks = JoinSet::new();
    for n in 0..args.requests {
        let caller = n % callers;
        let mut sender = senders[caller].clone();
        let req = request(&args.path, &auth[caller]);
        let (sent, first) = (sent.clone(), sent_at_first_answer.clone());
        tasks.spawn(async move {
            let result = async {
                sender.ready().await?;
                sent.fetch_add(1, Ordering::Relaxed);
                let resp = sender.send_request(req).await?;
                let status = resp.status();
                resp.into_body().collect().await?;
                Ok::<_, hyper::Error>(status)
            }
            .await;
            let _ = first.compare_exchange(
                u64::MAX,
                sent.load(Ordering::Relaxed),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            result.map(|s| s.as_u16()).map_err(|e| e.to_string())
        });
    }
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let key = match joined {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(e)) => format!("error: {e}"),
            Err(e) => format!("task: {e}"),
        };
        *statuses.entry(key).or_default() += 1;
    }
    let elapsed = started.elapsed();

    if args.slow_ms > 0 {
        let _ = control(
            &control_client,
            Method::DELETE,
            format!("{}/_emulator/faults", args.emulator),
            "",
        )
        .await;
    }
    // The echo upstream counts after it answered; give the last answers a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = counters(&control_client, &args.emulator)
        .await
        .unwrap_or_else(|e| fail_early(&e));
    let delta = |k: &str| after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0);

    println!(
        "requests: {} from {} callers ({} per caller, one h2 connection each), done in {:.2} s",
        args.requests,
        callers,
        args.requests.div_ceil(callers),
        elapsed.as_secs_f64()
    );
    println!(
        "requests already sent when the first answer arrived: {}",
        sent_at_first_answer.load(Ordering::Relaxed)
    );
    println!("statuses: {statuses:?}");
    for k in [
        "client_credentials",
        "create",
        "regenerate",
        "exchange",
        "echo_ok",
        "echo_rejected",
    ] {
        println!("emulator {k}: +{}", delta(k));
    }
    let ok = delta("create") == callers as u64
        && delta("exchange") == callers as u64
        && statuses.get("200").copied().unwrap_or(0) == args.requests as u64;
    if ok {
        println!(
            "PASS: {callers} creates and {callers} exchanges for {} requests",
            args.requests
        );
    } else {
        println!(
            "FAIL: expected {callers} creates, {callers} exchanges and {} answers 200",
            args.requests
        );
        std::process::exit(1);
    }
}

fn fail_early(message: &str) -> ! {
    eprintln!("amplify: {message}");
    std::process::exit(2)
}
