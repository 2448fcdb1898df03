//! The canonical request target: the one view of a request's path and authority that routing,
//! the allow check and forwarding all use, decided once, before routing, by the rules of
//! [`crate::canonical`] (a refused path or authority is 400).
//!
//! Authority: the absolute-form target's (or HTTP/2 `:authority`), else `Host`. Two that differ,
//! more than one `Host`, none on HTTP/1.1, or a value that is no `host[:port]`: 400.
//!
//! Must never: let a later step look at the raw path or a second authority, or pass on a path
//! that an upstream could read as a different one than the route matched.

use std::borrow::Cow;

use http::header::HOST;
use http::{HeaderMap, HeaderValue, Request, Version};

use super::error::ProxyError;
use crate::canonical::{canonical_path, host_of};

/// What the proxy routes, checks and forwards, for one request.
#[derive(Debug)]
pub struct Target<'r> {
    /// The canonical path (see the module doc).
    pub path: Cow<'r, str>,
    /// The query as sent (not used for routing).
    pub query: Option<&'r str>,
    /// `host[:port]` the caller named, if any.
    pub authority: Option<&'r str>,
    /// The `Host` header, when the authority came from it (or equals it).
    host_header: Option<&'r HeaderValue>,
}

impl<'r> Target<'r> {
    /// The canonical target of `request`, or why there is none.
    pub fn of<B>(request: &'r Request<B>, merge_slashes: bool) -> Result<Target<'r>, ProxyError> {
        let uri = request.uri();
        let path = canonical_path(uri.path(), merge_slashes).map_err(ProxyError::BadRequest)?;
        let (authority, host_header) = authority(
            uri.authority().map(|a| a.as_str()),
            request.headers(),
            request.version(),
        )?;
        Ok(Target {
            path,
            query: uri.query(),
            authority,
            host_header,
        })
    }

    /// The host without port or trailing dot, for host routing.
    pub fn host(&self) -> Option<&'r str> {
        let host = host_of(self.authority?)?;
        let host = host.strip_suffix('.').unwrap_or(host);
        (!host.is_empty()).then_some(host)
    }

    /// The authority as an `X-Forwarded-Host` value (the Host header as sent when it named it).
    pub fn forwarded_host(&self) -> Option<HeaderValue> {
        match self.host_header {
            Some(v) => Some(v.clone()),
            None => HeaderValue::from_str(self.authority?).ok(),
        }
    }
}

fn bad(why: &'static str) -> ProxyError {
    ProxyError::BadRequest(why)
}

/// The one authority of a request: `target` is the request URI's (absolute form or HTTP/2
/// `:authority`), then the `Host` header.
fn authority<'r>(
    target: Option<&'r str>,
    headers: &'r HeaderMap,
    version: Version,
) -> Result<(Option<&'r str>, Option<&'r HeaderValue>), ProxyError> {
    let mut hosts = headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(bad("a request must carry at most one Host header"));
    }
    if host.is_none() && version == Version::HTTP_11 {
        return Err(bad("an HTTP/1.1 request must carry a Host header"));
    }
    let host_text = match host {
        None => None,
        Some(v) => {
            let text = v.to_str().ok().filter(|t| host_of(t).is_some());
            Some(text.ok_or(bad("the Host header is not a valid host[:port]"))?)
        }
    };
    if let Some(t) = target {
        if host_of(t).is_none() {
            return Err(bad(
                "the request target's authority is not a valid host[:port]",
            ));
        }
    }
    match (target, host_text) {
        (Some(t), Some(h)) if !t.eq_ignore_ascii_case(h) => Err(bad(
            "the request target and the Host header name different authorities",
        )),
        // RFC 9112 3.2.2: the target's authority wins (here they are the same anyway).
        (Some(t), _) => Ok((Some(t), host)),
        (None, Some(_)) => Ok((host_text, host)),
        (None, None) => Ok((None, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(req: &Request<()>) -> Result<(Option<&str>, Option<String>), ProxyError> {
        let t = Target::of(req, true)?;
        Ok((
            t.host(),
            t.forwarded_host().map(|v| v.to_str().unwrap().to_string()),
        ))
    }

    #[test]
    fn one_authority_or_400() {
        let req = |uri: &str, hosts: &[&str], version| {
            let mut b = Request::builder().uri(uri).version(version);
            for h in hosts {
                b = b.header(HOST, *h);
            }
            b.body(()).unwrap()
        };
        let ok = req("/x", &["Api.Example:8080"], Version::HTTP_11);
        assert_eq!(
            target(&ok),
            Ok((Some("Api.Example"), Some("Api.Example:8080".into())))
        );
        let abs = req("http://a.example/x", &["A.example"], Version::HTTP_11);
        assert_eq!(target(&abs).unwrap().0, Some("a.example"));
        let h2 = req("https://b.example/x", &[], Version::HTTP_2);
        assert_eq!(
            target(&h2),
            Ok((Some("b.example"), Some("b.example".into())))
        );
        let h10 = req("/x", &[], Version::HTTP_10);
        assert_eq!(target(&h10), Ok((None, None)));
        for bad in [
            req(
                "http://other.example/x",
                &["internal.example"],
                Version::HTTP_11,
            ),
            req("/x", &["a.example", "a.example"], Version::HTTP_11),
            req("/x", &[], Version::HTTP_11),
            req("http://a.example/x", &[], Version::HTTP_11),
            req("http://u@a.example/x", &["a.example"], Version::HTTP_11),
            req("/x", &["a.example/x"], Version::HTTP_11),
            req("/x", &[""], Version::HTTP_11),
            req("https://b.example/x", &["c.example"], Version::HTTP_2),
        ] {
            assert!(target(&bad).is_err(), "{bad:?}");
        }
    }
}
