//! `Upgrade` (WebSocket and the like): which requests ask for one, whether their route accepts
//! it (`route.upgrades`), and the tunnel that carries bytes both ways once the upstream has
//! answered `101 Switching Protocols`.
//!
//! An upgrade request is an HTTP/1.1 request with an `Upgrade` header and the `upgrade` option in
//! `Connection` (RFC 9110 7.8: a sender of `Upgrade` must list it there). Without that option the
//! request is no upgrade and is served as a plain request, its `Upgrade` header dropped as
//! hop-by-hop (as a server may ignore an offer, RFC 9110 7.8); one that offers only `h2c` is
//! served as plain HTTP/1.1 too (RFC 9113 lets a server ignore that offer). A WebSocket upgrade
//! must be a `GET` (RFC 6455 4.1), or it is 400 `bad_request`. Every protocol offered must be in
//! the route's `upgrades`, or the request is refused (400 `upgrade_not_allowed`) rather than
//! silently downgraded. The handshake goes to the upstream like any request (the caller's identity
//! checked, the broker's token injected) over an HTTP/1.1-only client, and a `101` whose `Upgrade`
//! names no protocol, or one that was not offered, is 502 `upstream_unavailable`, not a tunnel.
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

use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{interval_at, Instant};

use super::error::ProxyError;
use super::io::Activity;
use super::listener::ConnHold;
use super::metrics::{Held, ProxyMetrics, RouteLabels, TunnelBytesLabels};
use super::route::Route;
use crate::metrics::Name;

/// The protocol names (without `/version`) in `Upgrade` header values.
fn protocols<'h>(values: impl Iterator<Item = &'h HeaderValue>) -> impl Iterator<Item = &'h [u8]> {
    values.flat_map(|v| {
        v.as_bytes().split(|b| *b == b',').map(|p| {
            let p = p.trim_ascii();
            p.split(|b| *b == b'/').next().unwrap_or(p).trim_ascii()
        })
    })
}

/// Whether `Connection` lists the `upgrade` option.
fn connection_upgrade(headers: &HeaderMap) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .any(|option| option.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
    })
}

/// Whether `request` asks for an upgrade the proxy has to decide on.
pub fn requested<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(UPGRADE)
        && connection_upgrade(request.headers())
        && !protocols(request.headers().get_all(UPGRADE).iter())
            .all(|p| p.eq_ignore_ascii_case(b"h2c") || p.is_empty())
}

/// Refuses an upgrade request that is a WebSocket upgrade but no `GET`, or that offers a protocol
/// `route` does not accept.
pub fn check<B>(route: &Route, request: &Request<B>) -> Result<(), ProxyError> {
    let offered = || request.headers().get_all(UPGRADE).iter();
    if request.method() != Method::GET
        && protocols(offered()).any(|p| p.eq_ignore_ascii_case(b"websocket"))
    {
        return Err(ProxyError::BadRequest(
            "a WebSocket upgrade must be a GET request",
        ));
    }
    let accepted = protocols(offered()).all(|p| {
        p.is_empty() || std::str::from_utf8(p).is_ok_and(|name| route.accepts_upgrade(name))
    });
    match accepted {
        true => Ok(()),
        false => Err(ProxyError::UpgradeNotAllowed),
    }
}

/// Checks the upstream's `101`: its `Upgrade` (`switched`) must name at least one protocol, and
/// only protocols that the caller offered (in `caller`, its request's headers) and `route`
/// accepts.
pub fn check_switch(
    route: &Route,
    caller: &HeaderMap,
    switched: &HeaderMap,
) -> Result<(), ProxyError> {
    let offered = || caller.get_all(UPGRADE).iter();
    let mut named = false;
    for p in protocols(switched.get_all(UPGRADE).iter()).filter(|p| !p.is_empty()) {
        named = true;
        let was_offered = protocols(offered()).any(|o| o.eq_ignore_ascii_case(p));
        if !was_offered || !std::str::from_utf8(p).is_ok_and(|name| route.accepts_upgrade(name)) {
            return Err(ProxyError::UpstreamUnavailable(
                "the upstream switched to a protocol that was not offered".into(),
            ));
        }
    }
    match named {
        true => Ok(()),
        false => Err(ProxyError::UpstreamUnavailable(
            "the upstream switched protocols without naming one".into(),
        )),
    }
}

/// What a tunnel needs from its request and connection.
pub(crate) struct Tunnel {
    pub caller: OnUpgrade,
    pub upstream: OnUpgrade,
    pub route: Arc<str>,
    pub metrics: Arc<ProxyMetrics>,
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
        // counted open until the tunnel ends, however it ends
        let open = Held::new(&self.metrics.tunnels_open);
        tokio::spawn(async move {
            let _open = open;
            self.run().await
        });
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
        let mut b = Request::builder()
            .uri("/")
            .header(CONNECTION, "keep-alive, Upgrade");
        for u in upgrade {
            b = b.header(UPGRADE, *u);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_http11_requests_with_a_real_offer_and_connection_upgrade_are_upgrades() {
        assert!(requested(&request(&["websocket"])));
        assert!(requested(&request(&["h2c, websocket"])));
        assert!(!requested(&request(&["h2c"])));
        assert!(!requested(&request(&[])));
        let mut h2 = request(&["websocket"]);
        *h2.version_mut() = Version::HTTP_2;
        assert!(!requested(&h2));
        let mut no_option = request(&["websocket"]);
        no_option.headers_mut().remove(CONNECTION);
        assert!(!requested(&no_option));
        no_option
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("upgraded, close"));
        assert!(!requested(&no_option));
    }

    fn route(upgrades: &[&str]) -> Route {
        let config = RouteConfig {
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
        Route::new(&config, 0).unwrap()
    }

    #[test]
    fn every_offered_protocol_must_be_accepted() {
        let (ws, none) = (route(&["websocket"]), route(&[]));
        assert_eq!(check(&ws, &request(&["WebSocket"])), Ok(()));
        assert_eq!(check(&ws, &request(&["websocket/13"])), Ok(()));
        assert!(check(&ws, &request(&["websocket, foo"])).is_err());
        assert!(check(&ws, &request(&["websocket", "foo"])).is_err());
        assert!(check(&none, &request(&["websocket"])).is_err());
    }

    #[test]
    fn a_websocket_upgrade_is_a_get() {
        let (ws, other) = (route(&["websocket"]), route(&["other"]));
        for method in [Method::POST, Method::PUT, Method::HEAD, Method::OPTIONS] {
            let mut r = request(&["websocket"]);
            *r.method_mut() = method;
            assert_eq!(check(&ws, &r).unwrap_err().spec().code, "bad_request");
            // Other protocols may come with other methods.
            let mut r = request(&["other"]);
            *r.method_mut() = Method::POST;
            assert_eq!(check(&other, &r), Ok(()));
        }
    }

    #[test]
    fn the_upstream_may_switch_only_to_an_offered_protocol() {
        let ws = route(&["websocket", "other"]);
        let offered = request(&["websocket"]).headers().clone();
        let switched = |u: &[&str]| request(u).headers().clone();
        assert_eq!(
            check_switch(&ws, &offered, &switched(&["WebSocket"])),
            Ok(())
        );
        for bad in [&["other"][..], &["websocket, other"], &[], &[""]] {
            let e = check_switch(&ws, &offered, &switched(bad)).unwrap_err();
            assert_eq!(e.spec().code, "upstream_unavailable", "{bad:?}");
        }
    }
}
