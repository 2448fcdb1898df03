//! `Upgrade` (WebSocket and the like): which requests ask for one, whether their route accepts
//! it (`route.upgrades`), and the tunnel that carries bytes both ways once the upstream has
//! answered `101 Switching Protocols`.
//!
//! An upgrade request is an HTTP/1.1 request with an `Upgrade` header; one that offers only `h2c`
//! is served as plain HTTP/1.1 (RFC 9113 lets a server ignore that offer). Every protocol offered
//! must be in the route's `upgrades`, or the request is refused (400 `upgrade_not_allowed`) rather
//! than silently downgraded. The handshake goes to the upstream like any request (the caller's
//! identity checked, the broker's token injected) over an HTTP/1.1-only client.
//!
//! A tunnel counts as its client connection: it keeps the connection's slot under
//! `max_connections`, ends at the shutdown deadline and after `idle_timeout` without I/O, and
//! shows in the metrics (`upgrades`, `tunnels_open`, `tunnel_bytes`).
//!
//! Must never: tunnel a request that was not identified, allowed and given the token, or keep a
//! tunnel open past the shutdown deadline.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::UPGRADE;
use http::{HeaderMap, Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{interval_at, Instant};

use super::error::ProxyError;
use super::io::Activity;
use super::listener::ConnHold;
use super::route::Route;
use crate::metrics::{Metrics, Name, RouteLabels, TunnelBytesLabels};

/// The protocol names (without `/version`) in `Upgrade` header values.
fn protocols(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers.get_all(UPGRADE).iter().flat_map(|v| {
        v.as_bytes().split(|b| *b == b',').map(|p| {
            let p = p.trim_ascii();
            p.split(|b| *b == b'/').next().unwrap_or(p).trim_ascii()
        })
    })
}

/// Whether `request` asks for an upgrade the proxy has to decide on.
pub fn requested<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(UPGRADE)
        && !protocols(request.headers()).all(|p| p.eq_ignore_ascii_case(b"h2c") || p.is_empty())
}

/// Refuses an upgrade request unless `route` accepts every protocol it offers.
pub fn check(route: &Route, headers: &HeaderMap) -> Result<(), ProxyError> {
    let accepted = protocols(headers).all(|p| {
        p.is_empty() || std::str::from_utf8(p).is_ok_and(|name| route.accepts_upgrade(name))
    });
    match accepted {
        true => Ok(()),
        false => Err(ProxyError::UpgradeNotAllowed),
    }
}

/// Decrements `tunnels_open` when a tunnel ends, however it ends.
struct OpenTunnel(Arc<Metrics>);

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.0.tunnels_open.dec();
    }
}

/// What a tunnel needs from its request and connection.
pub(crate) struct Tunnel {
    pub caller: OnUpgrade,
    pub upstream: OnUpgrade,
    pub route: Arc<str>,
    pub metrics: Arc<Metrics>,
    /// The client connection's slot and shutdown deadline (`None` outside a listener).
    pub hold: Option<Arc<ConnHold>>,
    pub activity: Arc<Activity>,
    pub idle_timeout: Duration,
}

impl Tunnel {
    /// Carries bytes both ways, in its own task, once both sides have switched protocols.
    pub(crate) fn spawn(self) {
        self.metrics
            .upgrades
            .get_or_create(&RouteLabels {
                route: Name(self.route.clone()),
            })
            .inc();
        self.metrics.tunnels_open.inc();
        tokio::spawn(self.run());
    }

    async fn run(self) {
        let Tunnel {
            caller,
            upstream,
            route,
            metrics,
            hold,
            activity,
            idle_timeout,
        } = self;
        let _open = OpenTunnel(metrics.clone());
        let (caller, upstream) = match tokio::try_join!(caller, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(route = %route, error = %e, "upgrade did not complete");
                return;
            }
        };
        let bytes = |direction| {
            metrics
                .tunnel_bytes
                .get_or_create(&TunnelBytesLabels {
                    route: Name(route.clone()),
                    direction,
                })
                .clone()
        };
        // Bytes are counted as they are read, so a tunnel cut short is counted too.
        let mut caller = Counted::new(TokioIo::new(caller), bytes("to_upstream"));
        let mut upstream = Counted::new(TokioIo::new(upstream), bytes("to_caller"));
        let deadline = async {
            match &hold {
                Some(hold) => hold.hard_stop.wait().await,
                None => std::future::pending().await,
            }
        };
        let idle = async {
            let mut check = interval_at(Instant::now() + idle_timeout, idle_timeout);
            let mut last = activity.io_events();
            loop {
                check.tick().await;
                let now = activity.io_events();
                if now == last {
                    return;
                }
                last = now;
            }
        };
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut caller, &mut upstream) => match copied {
                Ok((to_upstream, to_caller)) => {
                    tracing::debug!(route = %route, to_upstream, to_caller, "tunnel closed");
                }
                Err(e) => tracing::debug!(route = %route, error = %e, "tunnel ended with an error"),
            },
            _ = deadline => tracing::warn!(route = %route, "tunnel closed at the shutdown deadline"),
            _ = idle => tracing::debug!(route = %route, "idle tunnel closed"),
        }
    }
}

/// A stream that adds the bytes read from it to a counter.
struct Counted<S> {
    inner: S,
    read: Counter,
}

impl<S> Counted<S> {
    fn new(inner: S, read: Counter) -> Self {
        Counted { inner, read }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            this.read.inc_by((buf.filled().len() - before) as u64);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;

    fn request(upgrade: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri("/");
        for u in upgrade {
            b = b.header(UPGRADE, *u);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_http11_requests_with_a_real_offer_are_upgrades() {
        assert!(requested(&request(&["websocket"])));
        assert!(requested(&request(&["h2c, websocket"])));
        assert!(!requested(&request(&["h2c"])));
        assert!(!requested(&request(&[])));
        let mut h2 = request(&["websocket"]);
        *h2.version_mut() = Version::HTTP_2;
        assert!(!requested(&h2));
    }

    #[test]
    fn every_offered_protocol_must_be_accepted() {
        let config = |upgrades: &[&str]| RouteConfig {
            name: "r".into(),
            host: None,
            path_prefix: "/".into(),
            strip_prefix: false,
            upstream: "http://x".parse().unwrap(),
            upstream_ca_file: None,
            allow: vec![],
            upgrades: upgrades.iter().map(|s| s.to_string()).collect(),
            pass_caller_headers: vec![],
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
        };
        let ws = Route::new(&config(&["websocket"]), 0).unwrap();
        let none = Route::new(&config(&[]), 0).unwrap();
        let h = |u: &[&str]| request(u).headers().clone();
        assert_eq!(check(&ws, &h(&["WebSocket"])), Ok(()));
        assert_eq!(check(&ws, &h(&["websocket/13"])), Ok(()));
        assert!(check(&ws, &h(&["websocket, foo"])).is_err());
        assert!(check(&ws, &h(&["websocket", "foo"])).is_err());
        assert!(check(&none, &h(&["websocket"])).is_err());
    }
}
