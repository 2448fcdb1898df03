//! WebSocket through the proxy with a real client and a real server (tokio-tungstenite), over a
//! plain and a TLS listener: the handshake reaches the upstream with the injected token, messages
//! flow both ways, the close is clean and the tunnel is counted; a route without `upgrades`
//! refuses the handshake and forwards nothing; an upstream `101` to a protocol that was not
//! offered (a raw TCP upstream) is a 502, not a tunnel.

#[path = "support/proxy_config.rs"]
mod proxy_config;
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use proxy_config::{caller, listener, route, server_tls, tls_connect};
use support::eventually;
use tokenbroker::broker::Broker;
use tokenbroker::config::Config;
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::metrics::Metrics;
use tokenbroker::proxy::ProxyHandle;
use tokenbroker::secret::Secret;
use tokenbroker::server::Shutdown;

const ADMIN_SECRET: &str = "admin-secret-for-websocket-tests";
const LONG: Duration = Duration::from_secs(20);

/// Records the headers of a handshake and accepts it.
struct Record(Arc<Mutex<Vec<HeaderMap>>>);

impl Callback for Record {
    fn on_request(self, request: &Request, response: Response) -> Result<Response, ErrorResponse> {
        self.0.lock().unwrap().push(request.headers().clone());
        Ok(response)
    }
}

/// A WebSocket echo server that records the headers of every handshake it accepted.
struct EchoServer {
    addr: std::net::SocketAddr,
    handshakes: Arc<Mutex<Vec<HeaderMap>>>,
}

impl EchoServer {
    async fn start() -> EchoServer {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let seen = handshakes.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = tcp.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) =
                        tokio_tungstenite::accept_hdr_async(stream, Record(seen)).await
                    else {
                        return;
                    };
                    while let Some(Ok(msg)) = ws.next().await {
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        EchoServer { addr, handshakes }
    }

    fn handshakes(&self) -> Vec<HeaderMap> {
        self.handshakes.lock().unwrap().clone()
    }
}

struct Fixture {
    _emu: Emulator,
    echo: EchoServer,
    broker: Arc<Broker>,
    proxy: ProxyHandle,
    metrics: Arc<Metrics>,
    _shutdown: Shutdown,
}

impl Fixture {
    async fn start() -> Fixture {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut Config)) -> Fixture {
        let emu = Emulator::start(EmulatorConfig {
            clients: vec![("admin".into(), Secret::new(ADMIN_SECRET))],
            ..EmulatorConfig::default()
        })
        .await
        .unwrap();
        let echo = EchoServer::start().await;
        let upstream = format!("http://{}/", echo.addr);
        let mut ws = route("ws", "/ws", upstream.clone(), &["alice"]);
        ws.upgrades = vec!["websocket".into()];
        let mut config = Config {
            listeners: vec![
                listener("plain", None, None),
                listener("tls", Some(server_tls(false)), None),
            ],
            callers: vec![caller("alice", "alice-key", vec![])],
            routes: vec![ws, route("nows", "/nows", upstream, &["alice"])],
            ..Config::minimal(emu.identity_config("admin", &Secret::new(ADMIN_SECRET)))
        };
        adjust(&mut config);
        let metrics = Metrics::new();
        let broker = Broker::start(&config, metrics.clone()).await.unwrap();
        let shutdown = Shutdown::new();
        let proxy = ProxyHandle::start(
            Arc::new(config),
            broker.clone(),
            metrics.clone(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        Fixture {
            _emu: emu,
            echo,
            broker,
            proxy,
            metrics,
            _shutdown: shutdown,
        }
    }

    fn addr(&self, name: &str) -> std::net::SocketAddr {
        self.proxy
            .local_addrs()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
            .unwrap()
    }

    fn count(&self, series: &str) -> u64 {
        self.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// The WebSocket handshake for `path` on an open connection to the proxy, as caller alice.
async fn handshake<S>(
    stream: S,
    path: &str,
) -> Result<tokio_tungstenite::WebSocketStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request = format!("ws://localhost{path}")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("proxy-authorization", "Bearer alice-key".parse().unwrap());
    let (ws, response) =
        tokio::time::timeout(LONG, tokio_tungstenite::client_async(request, stream))
            .await
            .expect("handshake in time")?;
    assert_eq!(response.status(), 101);
    assert!(response.headers().contains_key("x-request-id"));
    Ok(ws)
}

/// Messages both ways, then a clean close.
async fn talk<S>(mut ws: tokio_tungstenite::WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for msg in [
        Message::text("hello through the broker"),
        Message::binary(vec![0u8, 1, 2, 255]),
        Message::text("x".repeat(100_000)),
    ] {
        ws.send(msg.clone()).await.unwrap();
        let back = tokio::time::timeout(LONG, ws.next()).await.unwrap();
        assert_eq!(back.unwrap().unwrap(), msg);
    }
    ws.close(None).await.unwrap();
    let mut closed = false;
    while let Some(msg) = tokio::time::timeout(LONG, ws.next()).await.unwrap() {
        closed |= matches!(msg.unwrap(), Message::Close(_));
    }
    assert!(closed, "the upstream answered the close");
}

#[tokio::test]
async fn websocket_through_plain_and_tls_listeners() {
    let f = Fixture::start().await;
    let plain = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    talk(handshake(plain, "/ws/chat").await.unwrap()).await;
    let tls = tls_connect(f.addr("tls"), None).await;
    talk(handshake(tls, "/ws/chat").await.unwrap()).await;

    let token = f.broker.token("alice").await.unwrap().header.clone();
    let seen = f.echo.handshakes();
    assert_eq!(seen.len(), 2);
    for headers in &seen {
        assert_eq!(headers["authorization"], token, "the injected token");
        assert!(!headers.contains_key("proxy-authorization"));
        assert_eq!(headers["upgrade"], "websocket");
    }
    assert_eq!(f.count(r#"tokenbroker_upgrades_total{route="ws"}"#), 2);
    let closed = || async { f.count("tokenbroker_tunnels_open") == 0 };
    assert!(eventually(LONG, closed).await, "{}", f.metrics.encode());
    for direction in ["to_upstream", "to_caller"] {
        let series =
            format!(r#"tokenbroker_tunnel_bytes_total{{route="ws",direction="{direction}"}}"#);
        assert!(
            f.count(&series) > 200_000,
            "{direction}: {}",
            f.metrics.encode()
        );
    }
    // The connections' slots were given back.
    let free = || async { f.count("tokenbroker_connections_open") == 0 };
    assert!(eventually(LONG, free).await, "{}", f.metrics.encode());
}

#[tokio::test]
async fn a_route_without_upgrades_refuses_the_handshake() {
    let f = Fixture::start().await;
    let plain = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    match handshake(plain, "/nows/chat").await {
        Err(WsError::Http(response)) => {
            assert_eq!(response.status(), 400);
            let body = response.body().as_deref().unwrap_or_default();
            assert_eq!(support::json(body)["error"], "upgrade_not_allowed");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("the handshake went through"),
    }
    assert!(f.echo.handshakes().is_empty(), "nothing was forwarded");
    // The proxy still serves, and the other route still upgrades.
    let plain = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    talk(handshake(plain, "/ws/again").await.unwrap()).await;
}

#[tokio::test]
async fn a_tunnel_keeps_its_connection_slot_until_it_closes() {
    use tokio::io::AsyncReadExt;
    let f = Fixture::start_with(|c| c.limits.max_connections = 1).await;
    let plain = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    let mut ws = handshake(plain, "/ws/held").await.unwrap();
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
    // Over the limit while the tunnel is open: closed at once, without an answer.
    let mut second = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(LONG, second.read_to_end(&mut answer)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert_eq!(f.count("tokenbroker_tunnels_open"), 1);
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    drop(ws);
    let free = || async { f.count("tokenbroker_connections_open") == 0 };
    assert!(eventually(LONG, free).await, "{}", f.metrics.encode());
    let plain = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    talk(handshake(plain, "/ws/next").await.unwrap()).await;
}

#[tokio::test]
async fn an_upstream_101_to_a_protocol_not_offered_is_a_502_not_a_tunnel() {
    let (other, other_heads) = support::raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: other\r\n\r\n",
    )
    .await;
    let (unnamed, unnamed_heads) =
        support::raw_upstream(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n")
            .await;
    let f = Fixture::start_with(|c| {
        for (name, addr) in [("other", other), ("unnamed", unnamed)] {
            let mut r = route(
                name,
                &format!("/{name}"),
                format!("http://{addr}/"),
                &["alice"],
            );
            r.upgrades = vec!["websocket".into(), "other".into()];
            c.routes.push(r);
        }
    })
    .await;
    for path in ["/other/chat", "/unnamed/chat"] {
        let plain = tokio::net::TcpStream::connect(f.addr("plain"))
            .await
            .unwrap();
        match handshake(plain, path).await {
            Err(WsError::Http(response)) => {
                assert_eq!(response.status(), 502, "{path}");
                let body = response.body().as_deref().unwrap_or_default();
                assert_eq!(support::json(body)["error"], "upstream_unavailable");
            }
            Err(e) => panic!("{path}: unexpected error: {e}"),
            Ok(_) => panic!("{path}: the handshake went through"),
        }
    }
    // Each upstream saw the handshake (it offered websocket only); no tunnel was opened.
    for heads in [other_heads, unnamed_heads] {
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 1);
        assert!(heads[0].to_ascii_lowercase().contains("upgrade: websocket"));
    }
    for route in ["other", "unnamed"] {
        let series = format!(r#"tokenbroker_upgrades_total{{route="{route}"}}"#);
        assert_eq!(f.count(&series), 0, "{}", f.metrics.encode());
    }
    assert_eq!(f.count("tokenbroker_tunnels_open"), 0);
    assert_eq!(
        f.count(r#"tokenbroker_errors_total{error="upstream_unavailable"}"#),
        2
    );
    let plain = tokio::net::TcpStream::connect(f.addr("plain"))
        .await
        .unwrap();
    talk(handshake(plain, "/ws/still").await.unwrap()).await;
}
