//! Routing: which configured upstream a request goes to, and the exact upstream URI.
//!
//! Routing only ever sees the request's canonical [`Target`] (path and authority decided once, in
//! `target`), and the upstream URI is built from that same path, never from the raw one.
//!
//! A route matches by Host (port removed, case-insensitive; optional) and path prefix on segment
//! boundaries (`/api` matches `/api` and `/api/x`, not `/apix`); the longest prefix wins, and at
//! equal length a route naming a host beats one that does not. The upstream URI is the route's
//! scheme and authority, its base path, the request path (minus the prefix when `strip_prefix`)
//! and the request's query.
//!
//! Must never: take the upstream authority from the request (Host, `:authority` or an
//! absolute-form URI), or match or forward anything but the canonical path (which has no dot
//! segments that could climb out of the base path).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::Uri;

use super::error::ProxyError;
use super::target::Target;
use crate::claims::PassedClaims;
use crate::config::RouteConfig;

/// One route, ready to match.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    /// Lower case, without port.
    host: Option<String>,
    /// `/` or a prefix without trailing slash.
    prefix: String,
    strip_prefix: bool,
    scheme: Scheme,
    authority: Authority,
    /// Empty or a path without trailing slash.
    base_path: String,
    allow: HashSet<Arc<str>>,
    /// `Upgrade` protocols tunnelled, lower case.
    upgrades: Box<[Box<str>]>,
    /// The caller claims passed on to the upstream (`pass_caller_headers`).
    pub passed_claims: PassedClaims,
    /// Index of the upstream client (see `forward::Clients`).
    pub(crate) client: usize,
    /// Index of the HTTP/1.1-only client used for upgrades, when `upgrades` is not empty.
    pub(crate) upgrade_client: Option<usize>,
    pub response_timeout: Duration,
}

/// Every route of one config, longest prefix first.
#[derive(Debug, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

impl Route {
    /// The upstream's host and port, as configured (for the upstream span).
    pub fn upstream_authority(&self) -> &Authority {
        &self.authority
    }

    /// `client` is the index of the upstream client this route uses.
    pub fn new(config: &RouteConfig, client: usize) -> Result<Route, String> {
        let scheme = config
            .upstream
            .scheme()
            .cloned()
            .ok_or_else(|| format!("route {}: upstream has no scheme", config.name))?;
        let authority = config
            .upstream
            .authority()
            .cloned()
            .ok_or_else(|| format!("route {}: upstream has no authority", config.name))?;
        let mut prefix = config.path_prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') {
            prefix.insert(0, '/');
        }
        Ok(Route {
            name: Arc::from(config.name.as_str()),
            host: config.host.as_ref().map(|h| h.to_ascii_lowercase()),
            prefix,
            strip_prefix: config.strip_prefix,
            scheme,
            authority,
            base_path: config.upstream.path().trim_end_matches('/').to_string(),
            allow: config.allow.iter().map(|c| Arc::from(c.as_str())).collect(),
            upgrades: config.upgrades.iter().map(|p| p.as_str().into()).collect(),
            passed_claims: PassedClaims::of(config.pass_caller_headers.iter().map(String::as_str))
                .map_err(|h| format!("route {}: {h} is not a caller claim", config.name))?,
            client,
            upgrade_client: None,
            response_timeout: config.response_timeout,
        })
    }

    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        let host_ok = match &self.host {
            None => true,
            Some(want) => host.is_some_and(|h| h.eq_ignore_ascii_case(want)),
        };
        host_ok && under_prefix(&self.prefix, path)
    }

    pub fn allows(&self, caller: &str) -> bool {
        self.allow.contains(caller)
    }

    /// Whether this route tunnels the `Upgrade` protocol `name` (case-insensitive).
    pub fn accepts_upgrade(&self, name: &str) -> bool {
        self.upgrades.iter().any(|p| p.eq_ignore_ascii_case(name))
    }

    /// The upstream URI for a request target that matched this route.
    pub fn upstream_uri(&self, target: &Target<'_>) -> Result<Uri, ProxyError> {
        let path = &*target.path;
        let rest = if self.strip_prefix && self.prefix != "/" {
            &path[self.prefix.len()..]
        } else {
            path
        };
        let query = target.query;
        let mut pq = String::with_capacity(
            self.base_path.len() + rest.len() + query.map_or(0, |q| q.len() + 1) + 1,
        );
        pq.push_str(&self.base_path);
        pq.push_str(rest);
        if pq.is_empty() {
            pq.push('/');
        }
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::BadRequest("the request path cannot be forwarded"))
    }
}

impl Routes {
    pub fn new(mut routes: Vec<Route>) -> Routes {
        // Stable: among equals the config order decides.
        routes.sort_by_key(|r| (std::cmp::Reverse(r.prefix.len()), r.host.is_none()));
        Routes { routes }
    }

    /// The route for this host (without port) and path, if any.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(host, path))
    }
}

fn under_prefix(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, host: Option<&str>, prefix: &str, strip: bool, up: &str) -> Route {
        Route::new(
            &RouteConfig {
                name: name.into(),
                host: host.map(Into::into),
                path_prefix: prefix.into(),
                strip_prefix: strip,
                upstream: up.parse().unwrap(),
                upstream_ca_file: None,
                allow: vec!["billing".into()],
                upgrades: vec![],
                pass_caller_headers: vec![],
                connect_timeout: Duration::from_secs(1),
                response_timeout: Duration::from_secs(1),
            },
            0,
        )
        .unwrap()
    }

    fn routes() -> Routes {
        Routes::new(vec![
            route("root", None, "/", false, "http://root.internal"),
            route("api", None, "/api", true, "https://api.internal:8443/v1/"),
            route(
                "api-users",
                None,
                "/api/users/",
                false,
                "http://users.internal",
            ),
            route(
                "api-b",
                Some("B.example"),
                "/api",
                false,
                "http://b.internal",
            ),
        ])
    }

    fn find<'a>(r: &'a Routes, host: Option<&str>, path: &str) -> Option<&'a str> {
        r.find(host, path).map(|r| &*r.name)
    }

    #[test]
    fn longest_prefix_on_segment_boundaries_wins() {
        let r = routes();
        assert_eq!(find(&r, None, "/api"), Some("api"));
        assert_eq!(find(&r, None, "/api/"), Some("api"));
        assert_eq!(find(&r, None, "/api/x"), Some("api"));
        assert_eq!(find(&r, None, "/apix"), Some("root"));
        assert_eq!(find(&r, None, "/api/users"), Some("api-users"));
        assert_eq!(find(&r, None, "/api/users/7"), Some("api-users"));
        assert_eq!(find(&r, None, "/api/usersx"), Some("api"));
        assert_eq!(find(&r, None, "/"), Some("root"));
    }

    #[test]
    fn host_routes_match_case_insensitively_and_beat_hostless_ones() {
        let r = routes();
        assert_eq!(find(&r, Some("b.example"), "/api/x"), Some("api-b"));
        assert_eq!(find(&r, Some("B.EXAMPLE"), "/api"), Some("api-b"));
        assert_eq!(find(&r, Some("c.example"), "/api"), Some("api"));
        // A longer hostless prefix still wins over a shorter host route.
        assert_eq!(
            find(&r, Some("b.example"), "/api/users/1"),
            Some("api-users")
        );
        let only_host = Routes::new(vec![route("h", Some("a.example"), "/", false, "http://a")]);
        assert_eq!(find(&only_host, None, "/"), None);
        assert_eq!(find(&only_host, Some("b.example"), "/"), None);
    }

    /// The upstream URI for a request (`Host` header `host`, if any).
    fn upstream(r: &Routes, host: Option<&str>, target: &str) -> String {
        let mut req = http::Request::builder()
            .uri(target)
            .version(http::Version::HTTP_2);
        if let Some(h) = host {
            req = req.header(http::header::HOST, h);
        }
        let req = req.body(()).unwrap();
        let target = Target::of(&req, true).unwrap();
        r.find(target.host(), &target.path)
            .unwrap()
            .upstream_uri(&target)
            .unwrap()
            .to_string()
    }

    #[test]
    fn upstream_uri_strips_joins_and_keeps_the_query() {
        let r = routes();
        let up = |host: Option<&str>, target: &str| upstream(&r, host, target);
        assert_eq!(
            up(None, "/api/x/y?a=1&b=2"),
            "https://api.internal:8443/v1/x/y?a=1&b=2"
        );
        assert_eq!(up(None, "/api"), "https://api.internal:8443/v1");
        assert_eq!(up(None, "/api/"), "https://api.internal:8443/v1/");
        assert_eq!(
            up(None, "/api/users/1"),
            "http://users.internal/api/users/1"
        );
        assert_eq!(up(None, "/other?q"), "http://root.internal/other?q");
        assert_eq!(up(Some("b.example"), "/api/z"), "http://b.internal/api/z");
        let bare = Routes::new(vec![route("s", None, "/svc", true, "http://s.internal")]);
        assert_eq!(upstream(&bare, None, "/svc?x=1"), "http://s.internal/?x=1");
    }

    #[test]
    fn the_canonical_path_is_matched_and_forwarded() {
        let r = routes();
        let up = |target: &str| upstream(&r, None, target);
        assert_eq!(
            up("/%61pi//x?q=%2F"),
            "https://api.internal:8443/v1/x?q=%2F"
        );
        assert_eq!(up("//api/users/%37"), "http://users.internal/api/users/7");
    }

    #[test]
    fn the_upstream_authority_never_comes_from_the_request() {
        let r = routes();
        let out = upstream(&r, None, "http://evil.example:1/api/x");
        assert!(out.starts_with("https://api.internal:8443/"), "{out}");
        let out = upstream(&r, Some("b.example"), "http://b.example/api/x");
        assert!(out.starts_with("http://b.internal/"), "{out}");
    }

    #[test]
    fn hosts_match_without_port_or_trailing_dot() {
        let r = routes();
        for host in ["b.example:8080", "B.example.", "b.example"] {
            assert!(
                upstream(&r, Some(host), "/api").starts_with("http://b.internal"),
                "{host}"
            );
        }
        let allow = route("r", None, "/", false, "http://x");
        assert!(allow.allows("billing"));
        assert!(!allow.allows("billin"));
    }
}
