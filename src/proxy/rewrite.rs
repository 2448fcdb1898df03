//! Header rewrite, as pure functions: the headers that leave the proxy towards the upstream,
//! made from the caller's (left as they are, for a replay), and those that go back to the caller.
//!
//! Request: the headers named by `Connection`, the hop-by-hop headers (RFC 9110 7.6.1), the
//! caller's `Authorization`, `Proxy-Authorization` and `Host`, its own `Forwarded` and `X-Real-IP`
//! (client-address claims the proxy cannot vouch for), and the [`crate::claims::CALLER_CLAIMS`] the route does
//! not pass on are left out; then the broker's token and the `X-Forwarded-*` / `X-Request-Id`
//! headers are set, so that no header the caller sent can replace them. The caller's
//! `X-Forwarded-For` elements are kept in front of the peer address the proxy appends: an upstream
//! may trust only the last element. Response: the hop-by-hop headers are removed. For an accepted
//! upgrade, and only then, `Upgrade` crosses (both ways) with `Connection: upgrade`.
//!
//! Must never: log or copy a header value anywhere else, or let a caller-sent header survive in
//! place of one this module sets.

use std::net::IpAddr;

use http::header::{AUTHORIZATION, CONNECTION, FORWARDED, HOST, PROXY_AUTHORIZATION, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::claims::PassedClaims;

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers: meaningful for one connection only, never forwarded (either way).
pub const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::header::PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
];

/// Longest `X-Request-Id` a caller may send and have kept.
const MAX_REQUEST_ID_LEN: usize = 128;

/// What the proxy adds about the original request.
pub struct Forwarded<'a> {
    /// The caller's address as a header value (see [`peer_ip_value`]), appended to
    /// `X-Forwarded-For`.
    pub peer_ip: &'a HeaderValue,
    /// `http` or `https`: how the caller reached the proxy.
    pub proto: &'static str,
    /// The Host (or `:authority`) the caller asked for, if any.
    pub host: Option<&'a HeaderValue>,
    /// The request's id (the caller's if sane, else a generated one).
    pub request_id: &'a HeaderValue,
}

/// Headers dropped as the caller sent them: the ones the proxy sets on every forwarded request,
/// and client-address claims it does not pass on. (The caller's `X-Forwarded-For` is kept, unless
/// `Connection` names it, and joined into the new one.)
static NOT_FROM_CALLER: [HeaderName; 7] = [
    AUTHORIZATION,
    // The upstream authority comes from the route; the client sets Host from the upstream URI.
    HOST,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_REQUEST_ID,
    FORWARDED,
    X_REAL_IP,
];

/// How many headers `rewrite_request` may add.
const SET_BY_PROXY: usize = 6;

/// The caller's address as an `X-Forwarded-For` element: made once per connection.
pub fn peer_ip_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::try_from(ip.to_string()).expect("an IP address is a valid header value")
}

/// The headers of the request to forward, made from the caller's: `token` is the broker's ready
/// `Authorization` value, `passed` the caller claims the route keeps, `upgrade` whether this is
/// an upgrade the route accepted (its `Upgrade` offer then goes on, with `Connection: upgrade`).
/// The caller's headers are left as they are (a replay makes its head from them again).
pub fn rewrite_request(
    caller: &HeaderMap,
    token: &HeaderValue,
    fwd: &Forwarded<'_>,
    passed: PassedClaims,
    upgrade: bool,
) -> HeaderMap {
    let crossing = Crossing::of(caller, &NOT_FROM_CALLER, passed, upgrade);
    let mut headers = HeaderMap::with_capacity(caller.keys_len() + SET_BY_PROXY);
    // `iter` yields the values of one name one after the other: one decision per name.
    let mut current: Option<(&HeaderName, bool)> = None;
    for (name, value) in caller {
        let keep = match current {
            Some((same, keep)) if std::ptr::eq(same, name) => keep,
            _ => crossing.keeps(name),
        };
        current = Some((name, keep));
        if keep {
            headers.append(name, value.clone());
        }
    }
    let forwarded_for = forwarded_for(&headers, fwd.peer_ip);
    headers.insert(AUTHORIZATION, token.clone());
    headers.insert(X_FORWARDED_FOR, forwarded_for);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(fwd.proto));
    if let Some(host) = fwd.host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    headers.insert(X_REQUEST_ID, fwd.request_id.clone());
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
    headers
}

/// Rewrites the headers of an upstream response before it goes back to the caller; `upgrade`:
/// it is the `101` of an accepted upgrade (its `Upgrade` stays, with `Connection: upgrade`).
pub fn rewrite_response(headers: &mut HeaderMap, upgrade: bool) {
    let crossing = Crossing::of(headers, &[], PassedClaims::ALL, upgrade);
    // The names to drop, found by walking the names (no hashing), then removed one by one: an
    // answer usually has one (`Connection`), and a remove is one hash and probe, where moving
    // every kept header into a new map was one each.
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|name| !crossing.keeps(name))
        .cloned()
        .collect();
    for name in &dropped {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Which headers may cross the proxy: none named in `Connection`, no hop-by-hop header (but
/// `Upgrade` on an accepted upgrade), none in `also_drop` and no caller claim not `passed`.
struct Crossing<'a> {
    named: Vec<HeaderName>,
    also_drop: &'a [HeaderName],
    passed: PassedClaims,
    upgrade: bool,
}

impl<'a> Crossing<'a> {
    fn of(
        headers: &HeaderMap,
        also_drop: &'a [HeaderName],
        passed: PassedClaims,
        upgrade: bool,
    ) -> Crossing<'a> {
        Crossing {
            named: connection_named(headers),
            also_drop,
            passed,
            upgrade,
        }
    }

    fn keeps(&self, name: &HeaderName) -> bool {
        let hop_by_hop = HOP_BY_HOP.contains(name) && !(self.upgrade && name == UPGRADE);
        !(hop_by_hop
            || self.also_drop.contains(name)
            || self.named.contains(name)
            || self.passed.drops(name))
    }
}

/// The names listed in `Connection`, apart from `close` and names dropped anyway (keep-alive,
/// upgrade, ...), so the usual values allocate nothing.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut named = Vec::new();
    for value in headers.get_all(CONNECTION) {
        for token in value.as_bytes().split(|b| *b == b',') {
            let token = token.trim_ascii();
            if token.is_empty()
                || token.eq_ignore_ascii_case(b"close")
                || HOP_BY_HOP
                    .iter()
                    .any(|h| token.eq_ignore_ascii_case(h.as_str().as_bytes()))
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                named.push(name);
            }
        }
    }
    named
}

/// The new `X-Forwarded-For`: the caller's own elements, then the peer.
fn forwarded_for(headers: &HeaderMap, peer: &HeaderValue) -> HeaderValue {
    let mut previous = headers.get_all(X_FORWARDED_FOR).iter().peekable();
    if previous.peek().is_none() {
        return peer.clone();
    }
    let mut joined = Vec::with_capacity(64);
    for v in previous {
        let v = v.as_bytes().trim_ascii();
        if !v.is_empty() {
            joined.extend_from_slice(v);
            joined.extend_from_slice(b", ");
        }
    }
    joined.extend_from_slice(peer.as_bytes());
    // Made of valid header values joined by ", ": valid too.
    HeaderValue::from_bytes(&joined).unwrap_or_else(|_| peer.clone())
}

/// The request's id: the caller's `X-Request-Id` when it is sane (1 to 128 characters of
/// `[A-Za-z0-9._:/+=@-]`), otherwise a new random one (32 hex digits).
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(X_REQUEST_ID) {
        if is_sane_request_id(v.as_bytes()) {
            return v.clone();
        }
    }
    new_request_id()
}

fn is_sane_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/+=@-".contains(b))
}

fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut n: u128 = rand::random();
    let mut out = [0u8; 32];
    for b in out.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
    HeaderValue::from_bytes(&out).expect("hex digits are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn token() -> HeaderValue {
        let mut v = HeaderValue::from_static("Bearer injected");
        v.set_sensitive(true);
        v
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn rewrite(h: HeaderMap) -> HeaderMap {
        rewrite_as(h, false)
    }

    fn rewrite_as(h: HeaderMap, upgrade: bool) -> HeaderMap {
        let host = HeaderValue::from_static("proxy.example:8080");
        let id = HeaderValue::from_static("id-1");
        rewrite_request(
            &h,
            &token(),
            &Forwarded {
                peer_ip: &peer_ip_value(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))),
                proto: "https",
                host: Some(&host),
                request_id: &id,
            },
            PassedClaims::NONE,
            upgrade,
        )
    }

    #[test]
    fn every_hop_by_hop_header_is_removed() {
        for name in HOP_BY_HOP {
            let h = rewrite(headers(&[(name.as_str(), "x"), ("accept", "*/*")]));
            assert!(!h.contains_key(&name), "{name} survived");
            assert_eq!(h["accept"], "*/*");
        }
        let mut h = headers(&[
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("connection", "upgrade"),
        ]);
        rewrite_response(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn an_accepted_upgrade_keeps_its_offer_and_nothing_else_hop_by_hop() {
        let sent = [
            ("connection", "keep-alive, Upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("upgrade", "other/2"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("sec-websocket-key", "k"),
        ];
        let h = rewrite_as(headers(&sent), true);
        let upgrade: Vec<_> = h.get_all(UPGRADE).iter().collect();
        assert_eq!(upgrade, ["websocket", "other/2"]);
        let connection: Vec<_> = h.get_all(CONNECTION).iter().collect();
        assert_eq!(connection, ["upgrade"]);
        assert!(
            !h.contains_key("keep-alive") && !h.contains_key("x-hop"),
            "{h:?}"
        );
        assert_eq!(h["sec-websocket-key"], "k");
        assert!(!rewrite_as(headers(&sent), false).contains_key(UPGRADE));

        let mut h = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
            ("sec-websocket-accept", "a"),
        ]);
        rewrite_response(&mut h, true);
        assert_eq!(h[UPGRADE], "websocket");
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h["sec-websocket-accept"], "a");
        assert_eq!(h.len(), 3, "{h:?}");
    }

    #[test]
    fn every_value_of_a_kept_header_is_kept_in_order() {
        let h = rewrite(headers(&[
            ("accept", "text/html"),
            ("keep-alive", "timeout=5"),
            ("accept", "application/json"),
            ("x-custom", "a"),
            ("x-custom", "b"),
        ]));
        let accept: Vec<_> = h.get_all("accept").iter().collect();
        assert_eq!(accept, ["text/html", "application/json"]);
        let custom: Vec<_> = h.get_all("x-custom").iter().collect();
        assert_eq!(custom, ["a", "b"]);

        let mut h = headers(&[
            ("set-cookie", "a=1"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("set-cookie", "b=2"),
        ]);
        rewrite_response(&mut h, false);
        let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(h.len(), 2, "{h:?}");
    }

    #[test]
    fn headers_named_by_connection_are_removed() {
        let h = rewrite(headers(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", " x-other ,, close"),
            ("x-secret-hop", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
        ]));
        assert!(!h.contains_key("x-secret-hop"));
        assert!(!h.contains_key("x-other"));
        assert!(!h.contains_key(CONNECTION));
        assert_eq!(h["x-kept"], "3");
    }

    #[test]
    fn garbage_in_connection_is_ignored() {
        let h = rewrite(headers(&[("connection", "bad name, ()"), ("x-kept", "1")]));
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn forged_authorization_is_replaced_by_the_token() {
        let h = rewrite(headers(&[
            ("authorization", "Bearer forged"),
            ("authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-authorization", "Bearer caller-key"),
        ]));
        let auth: Vec<_> = h.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(auth, vec![&token()]);
        assert!(auth[0].is_sensitive());
        assert!(!h.contains_key(PROXY_AUTHORIZATION));
    }

    #[test]
    fn connection_naming_authorization_does_not_remove_the_token() {
        let h = rewrite(headers(&[
            ("connection", "authorization, proxy-authorization"),
            ("authorization", "Bearer forged"),
            ("proxy-authorization", "Bearer caller-key"),
        ]));
        assert_eq!(h.get_all(AUTHORIZATION).iter().count(), 1);
        assert_eq!(h[AUTHORIZATION], "Bearer injected");
        assert!(!h.contains_key(PROXY_AUTHORIZATION));
        assert!(!h.contains_key(CONNECTION));
    }

    #[test]
    fn connection_cannot_remove_what_the_proxy_sets() {
        let h = rewrite(headers(&[
            (
                "connection",
                "x-forwarded-for, x-forwarded-proto, x-forwarded-host, x-request-id",
            ),
            ("x-forwarded-for", "1.2.3.4"),
        ]));
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.7");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(h[X_FORWARDED_HOST], "proxy.example:8080");
        assert_eq!(h[X_REQUEST_ID], "id-1");
    }

    #[test]
    fn forwarded_headers_are_set_and_host_removed() {
        let h = rewrite(headers(&[
            ("host", "proxy.example:8080"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2, 3.3.3.3"),
            ("x-forwarded-proto", "gopher"),
            ("x-forwarded-host", "evil.example"),
            ("x-request-id", "caller-id"),
            ("forwarded", "for=6.6.6.6;host=evil.example"),
            ("x-real-ip", "6.6.6.6"),
        ]));
        assert!(!h.contains_key(HOST));
        assert!(!h.contains_key(FORWARDED));
        assert!(!h.contains_key(X_REAL_IP));
        assert_eq!(h[X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.7");
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(h[X_FORWARDED_HOST], "proxy.example:8080");
        assert_eq!(h[X_REQUEST_ID], "id-1");
    }

    #[test]
    fn no_host_means_no_forwarded_host() {
        let h = headers(&[("x-forwarded-host", "evil.example")]);
        let id = HeaderValue::from_static("id");
        let h = rewrite_request(
            &h,
            &token(),
            &Forwarded {
                peer_ip: &peer_ip_value("::1".parse().unwrap()),
                proto: "http",
                host: None,
                request_id: &id,
            },
            PassedClaims::NONE,
            false,
        );
        assert!(!h.contains_key(X_FORWARDED_HOST));
        assert_eq!(h[X_FORWARDED_FOR], "::1");
    }

    #[test]
    fn request_id_kept_when_sane_else_generated() {
        let kept = request_id(&headers(&[("x-request-id", "abc-123_x.y:z")]));
        assert_eq!(kept, "abc-123_x.y:z");
        for bad in ["", "has space", "semi;colon", &"a".repeat(129)] {
            let mut h = HeaderMap::new();
            h.insert(X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let id = request_id(&h);
            assert_ne!(id, bad);
            assert_eq!(id.len(), 32);
        }
        let a = request_id(&HeaderMap::new());
        let b = request_id(&HeaderMap::new());
        assert_ne!(a, b);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit));
    }

    #[test]
    fn caller_claims_are_dropped_unless_passed() {
        let sent = [
            ("x-original-url", "/admin"),
            ("X-Rewrite-URL", "/admin"),
            ("x-forwarded-prefix", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("x-forwarded-client-cert", "Hash=1"),
            ("x-ssl-client-verify", "SUCCESS"),
            ("x-ssl-client-s-dn", "CN=admin"),
            ("x-forwarded-user", "admin"),
            ("true-client-ip", "1.1.1.1"),
            ("x-client-ip", "1.1.1.1"),
            ("cf-connecting-ip", "1.1.1.1"),
            ("x-ssl-client", "kept: no dash after the prefix"),
            ("x-original", "kept"),
        ];
        let h = rewrite(headers(&sent));
        for (name, _) in &sent[..11] {
            assert!(!h.contains_key(*name), "{name} survived: {h:?}");
        }
        assert_eq!(h["x-ssl-client"], "kept: no dash after the prefix");
        assert_eq!(h["x-original"], "kept");

        let passed = PassedClaims::of(["X-HTTP-Method-Override", "x-ssl-client-*"]).unwrap();
        let h = headers(&sent);
        let id = HeaderValue::from_static("id");
        let fwd = Forwarded {
            peer_ip: &peer_ip_value("::1".parse().unwrap()),
            proto: "http",
            host: None,
            request_id: &id,
        };
        let h = rewrite_request(&h, &token(), &fwd, passed, false);
        assert_eq!(h["x-http-method-override"], "DELETE");
        assert_eq!(h["x-ssl-client-verify"], "SUCCESS");
        assert_eq!(h["x-ssl-client-s-dn"], "CN=admin");
        assert!(!h.contains_key("x-original-url"));
        assert!(!h.contains_key("cf-connecting-ip"));

        // A response keeps them all.
        let mut h = headers(&sent);
        rewrite_response(&mut h, false);
        assert_eq!(h.len(), sent.len());
    }
}
