//! A measuring stick for `benches/load.sh` (`FLOOR=1`), not a proxy to deploy: the least a tokio
//! HTTP/1.1 proxy can do for the benchmark's request, written without hyper, so that the load
//! benchmark can show how much of tokenbroker's CPU per request is the work itself (tokio, the
//! kernel, parsing a head and writing one) and how much is the HTTP library's.
//!
//! It does nginx's job in the benchmark (`benches/load.sh`'s nginx proxy config) and nothing
//! more: per client connection, one task and one kept-alive upstream connection; each request
//! head is parsed (httparse), `Proxy-Authorization` and the hop-by-hop `Connection`/`Keep-Alive`
//! are dropped, `Authorization: Bearer <token>`, `X-Forwarded-For`/`-Proto`/`-Host` and
//! `X-Request-Id` are added, the head is written to the upstream in one write, and the answer's
//! head is parsed and written back in one write with as much of its body as was read, the rest
//! of the body copied as it comes. It knows no callers, routes, tokens to fetch, timeouts,
//! metrics or logs, and takes only `Content-Length` bodies (anything else closes the
//! connection): the floor under any proxy built on tokio, not a design for one.
//!
//! Usage: h1_floor LISTEN_ADDR UPSTREAM_ADDR   (the token is read from standard input)

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const MAX_HEADERS: usize = 64;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, upstream] = &args[..] else {
        eprintln!("usage: h1_floor LISTEN_ADDR UPSTREAM_ADDR  (token on standard input)");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR: an address");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM_ADDR: an address");
    let mut token = String::new();
    std::io::stdin()
        .read_line(&mut token)
        .expect("a token on stdin");
    let token = token.trim();
    assert!(!token.is_empty(), "a token on stdin");
    let authorization: Rc<[u8]> = format!("Authorization: Bearer {token}\r\n")
        .into_bytes()
        .into();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("a runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(listen).await.expect("bind LISTEN_ADDR");
        let mut ids = 0u64;
        loop {
            let Ok((client, peer)) = listener.accept().await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            ids += 1 << 20;
            let conn = Conn {
                peer,
                upstream,
                authorization: authorization.clone(),
                next_id: ids,
            };
            tokio::task::spawn_local(async move {
                let _ = conn.serve(client).await;
            });
        }
    });
}

struct Conn {
    peer: SocketAddr,
    upstream: SocketAddr,
    authorization: Rc<[u8]>,
    next_id: u64,
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

impl Conn {
    async fn serve(mut self, mut client: TcpStream) -> Result<()> {
        let mut up: Option<TcpStream> = None;
        let mut from_client = BytesMut::with_capacity(4096);
        let mut from_up = BytesMut::with_capacity(8192);
        let mut out = Vec::with_capacity(2048);
        loop {
            // A request head, whole.
            let (head_len, body_len) = loop {
                if let Some(parsed) = self.request_head(&from_client, &mut out)? {
                    break parsed;
                }
                if client.read_buf(&mut from_client).await? == 0 {
                    return Ok(());
                }
            };
            from_client.advance(head_len);
            let upstream = match &mut up {
                Some(up) => up,
                None => {
                    let stream = TcpStream::connect(self.upstream).await?;
                    stream.set_nodelay(true)?;
                    up.insert(stream)
                }
            };
            // The head, and the body bytes already read, in one write; the rest as it comes.
            let now = body_len.min(from_client.len());
            out.extend_from_slice(&from_client[..now]);
            from_client.advance(now);
            upstream.write_all(&out).await?;
            copy(&mut client, upstream, &mut from_client, body_len - now).await?;

            // The answer's head, whole.
            let (head_len, body_len) = loop {
                if let Some(parsed) = response_head(&from_up, &mut out)? {
                    break parsed;
                }
                if upstream.read_buf(&mut from_up).await? == 0 {
                    return Err("the upstream closed".into());
                }
            };
            from_up.advance(head_len);
            let now = body_len.min(from_up.len());
            out.extend_from_slice(&from_up[..now]);
            from_up.advance(now);
            client.write_all(&out).await?;
            copy(upstream, &mut client, &mut from_up, body_len - now).await?;
        }
    }

    /// Parses a request head from `buf`; when whole, writes the upstream's head into `out` and
    /// returns the head's length and the body's.
    fn request_head(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Result<Option<(usize, usize)>> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(len) = request.parse(buf)? else {
            return Ok(None);
        };
        out.clear();
        out.extend_from_slice(request.method.ok_or("no method")?.as_bytes());
        out.push(b' ');
        out.extend_from_slice(request.path.ok_or("no target")?.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\nHost: backend\r\n");
        let mut body = 0;
        let mut host: &[u8] = b"";
        for h in request.headers.iter() {
            let name = h.name;
            if name.eq_ignore_ascii_case("host") {
                host = h.value;
                continue;
            }
            if name.eq_ignore_ascii_case("proxy-authorization")
                || name.eq_ignore_ascii_case("connection")
                || name.eq_ignore_ascii_case("keep-alive")
                || name.eq_ignore_ascii_case("authorization")
            {
                continue;
            }
            if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err("only Content-Length bodies".into());
            }
            if name.eq_ignore_ascii_case("content-length") {
                body = std::str::from_utf8(h.value)?.trim().parse()?;
            }
            header(out, name.as_bytes(), h.value);
        }
        out.extend_from_slice(&self.authorization);
        let mut ip = [0u8; 64];
        let ip = {
            use std::io::Write;
            let mut at = &mut ip[..];
            write!(at, "{}", self.peer.ip())?;
            let left = at.len();
            &ip[..64 - left]
        };
        header(out, b"X-Forwarded-For", ip);
        header(out, b"X-Forwarded-Proto", b"http");
        header(out, b"X-Forwarded-Host", host);
        self.next_id += 1;
        let mut id = [0u8; 32];
        hex_into(&mut id[..16], self.next_id);
        hex_into(
            &mut id[16..],
            self.next_id.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15,
        );
        header(out, b"X-Request-Id", &id);
        out.extend_from_slice(b"\r\n");
        Ok(Some((len, body)))
    }
}

/// Parses an answer's head from `buf`; when whole, writes the caller's head into `out` and
/// returns the head's length and the body's.
fn response_head(buf: &[u8], out: &mut Vec<u8>) -> Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = response.parse(buf)? else {
        return Ok(None);
    };
    let code = response.code.ok_or("no status")?;
    if code < 200 || code == 204 || code == 304 {
        return Err("only answers with a Content-Length body".into());
    }
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(code.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut body = None;
    for h in response.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive") {
            continue;
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("only Content-Length bodies".into());
        }
        if name.eq_ignore_ascii_case("content-length") {
            body = Some(std::str::from_utf8(h.value)?.trim().parse()?);
        }
        header(out, name.as_bytes(), h.value);
    }
    out.extend_from_slice(b"\r\n");
    Ok(Some((len, body.ok_or("no Content-Length")?)))
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn hex_into(out: &mut [u8], mut n: u64) {
    for b in out.iter_mut().rev() {
        *b = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
    }
}

/// Copies `left` bytes from `from` to `to`, reading through `buf` (empty on entry).
async fn copy(
    from: &mut TcpStream,
    to: &mut TcpStream,
    buf: &mut BytesMut,
    mut left: usize,
) -> Result<()> {
    while left > 0 {
        if from.read_buf(buf).await? == 0 {
            return Err("closed in the middle of a body".into());
        }
        let n = left.min(buf.len());
        to.write_all(&buf[..n]).await?;
        buf.advance(n);
        left -= n;
    }
    Ok(())
}
