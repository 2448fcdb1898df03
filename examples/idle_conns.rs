//! Opens many keep-alive HTTP/1.1 connections to a server, sends one request on each (so that each
//! is a real, used keep-alive connection), then holds them all idle, for measuring the server's
//! memory per idle connection.
//!
//! ```text
//! cargo run --release --example idle_conns -- --addr 127.0.0.1:8080 [--conns 10000] \
//!     [--key-file FILE] [--path /] [--parallel 64] [--hold-secs 60]
//! ```
//! With `--key-file`, the first line of FILE is sent as `Proxy-Authorization: Bearer <key>` (never
//! printed). Prints `ready <n>` once every connection got its answer, then holds them for
//! `--hold-secs` (or until killed) and exits. Needs `ulimit -n` above `--conns`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

struct Args {
    addr: SocketAddr,
    conns: usize,
    key_file: Option<std::path::PathBuf>,
    path: String,
    parallel: usize,
    hold: Duration,
}

fn usage() -> ! {
    eprintln!(
        "usage: idle_conns --addr ADDR [--conns N] [--key-file FILE] [--path PATH] \
         [--parallel N] [--hold-secs S]"
    );
    std::process::exit(64)
}

fn parse_args() -> Args {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
        conns: 10_000,
        key_file: None,
        path: "/".into(),
        parallel: 64,
        hold: Duration::from_secs(60),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--addr" => args.addr = value.parse().unwrap_or_else(|_| usage()),
            "--conns" => args.conns = value.parse().unwrap_or_else(|_| usage()),
            "--key-file" => args.key_file = Some(value.into()),
            "--path" => args.path = value,
            "--parallel" => args.parallel = value.parse().unwrap_or_else(|_| usage()),
            "--hold-secs" => {
                args.hold = Duration::from_secs(value.parse().unwrap_or_else(|_| usage()))
            }
            _ => usage(),
        }
    }
    args
}

/// Reads one HTTP/1.1 response with a `Content-Length` body (or none); returns its status.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    buf.clear();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("connection closed before the response head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| bad("head is not UTF-8"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut have = buf.len() - head_end;
    while have < length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(bad("connection closed in the body"));
        }
        have += n;
    }
    Ok(status)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = parse_args();
    let auth = match &args.key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
                eprintln!("idle_conns: cannot read {}: {e}", path.display());
                std::process::exit(64)
            });
            let key = text.lines().next().unwrap_or("").trim().to_string();
            format!("Proxy-Authorization: Bearer {key}\r\n")
        }
        None => String::new(),
    };
    let request: Arc<[u8]> = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: idle_conns\r\n{auth}\r\n",
        args.path, args.addr
    )
    .into_bytes()
    .into();

    let started = Instant::now();
    let permits = Arc::new(Semaphore::new(args.parallel.max(1)));
    let mut tasks = JoinSet::new();
    for _ in 0..args.conns {
        let (permits, request, addr) = (permits.clone(), request.clone(), args.addr);
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore");
            let mut stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            stream.write_all(&request).await?;
            let mut buf = Vec::with_capacity(1024);
            let status = read_response(&mut stream, &mut buf).await?;
            Ok::<_, std::io::Error>((stream, status))
        });
    }
    let mut open = Vec::with_capacity(args.conns);
    let (mut failed, mut not_ok) = (0usize, 0usize);
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok((stream, status))) => {
                if status != 200 {
                    not_ok += 1;
                }
                open.push(stream);
            }
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("idle_conns: {failed} connections failed, first error: {e}");
    }
    if not_ok > 0 {
        eprintln!("idle_conns: {not_ok} answers were not 200");
    }
    println!(
        "ready {} (in {:.1} s)",
        open.len(),
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(args.hold).await;
    // Still open? A closed connection reads EOF at once.
    let mut closed = 0;
    for stream in &open {
        let mut b = [0u8; 1];
        if let Ok(0) = stream.try_read(&mut b) {
            closed += 1;
        }
    }
    println!("done: {} held, {closed} closed by the server", open.len());
}
