//! The one table from a request-path failure to the response the caller sees.
//!
//! Every way a proxied request can fail is a [`ProxyError`] variant; [`ProxyError::spec`] gives its
//! status, JSON code and whether the connection is closed afterwards, and
//! [`ProxyError::into_response`] builds the response. Caller faults (4xx), token faults (503) and
//! upstream faults (502/504) stay distinct.
//!
//! Must never: put a secret (caller key, token) or an upstream's internal detail in a response body.
//! The `detail` strings are for the request log line only and never carry header values.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode, Version};

use super::forward::ProxyBody;
use super::rewrite::X_REQUEST_ID;
use crate::token::TokenUnavailable;

/// Why a proxied request got no upstream answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// No caller identity, or one that maps to no caller.
    UnknownCaller(&'static str),
    /// The caller is known but not allowed on the matched route.
    Forbidden,
    /// No route matches the request's host and path.
    NoRoute,
    /// No valid token for the caller right now.
    TokenUnavailable {
        retry_after: Duration,
        detail: String,
    },
    /// The upstream could not be reached or the exchange with it failed.
    UpstreamUnavailable(String),
    /// The upstream did not answer with headers in time.
    UpstreamTimeout,
    /// The request body is larger than `limits.max_body_bytes`.
    BodyTooLarge,
    /// The request headers are larger than `limits.max_header_bytes`.
    HeadersTooLarge,
    /// A malformed or ambiguous request (e.g. both Content-Length and Transfer-Encoding, a path
    /// or authority that has no canonical form).
    BadRequest(&'static str),
    /// The caller's body broke off or was malformed while it was read or forwarded (its own
    /// fault, never the upstream's); the detail is for the log.
    ClientBody(String),
    /// `CONNECT` or `TRACE`: never forwarded.
    MethodNotAllowed,
    /// An `Upgrade` (e.g. WebSocket) the route does not accept (`route.upgrades`).
    UpgradeNotAllowed,
}

/// What a 405 answer names as allowed: every method but the two that are refused.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorSpec {
    pub status: StatusCode,
    pub code: &'static str,
    /// Close the (HTTP/1) connection after the response: the request's framing or body state is
    /// not trustworthy or not consumed.
    pub close: bool,
}

impl ProxyError {
    /// Every JSON code of the table, once each (the label values of `errors_total`).
    pub const CODES: [&'static str; 11] = [
        "unknown_caller",
        "forbidden",
        "no_route",
        "token_unavailable",
        "upstream_unavailable",
        "upstream_timeout",
        "body_too_large",
        "headers_too_large",
        "bad_request",
        "method_not_allowed",
        "upgrade_not_allowed",
    ];

    /// The table.
    pub fn spec(&self) -> ErrorSpec {
        let (status, code, close) = match self {
            ProxyError::UnknownCaller(_) => (StatusCode::UNAUTHORIZED, "unknown_caller", false),
            ProxyError::Forbidden => (StatusCode::FORBIDDEN, "forbidden", false),
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "no_route", false),
            ProxyError::TokenUnavailable { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "token_unavailable", false)
            }
            ProxyError::UpstreamUnavailable(_) => {
                (StatusCode::BAD_GATEWAY, "upstream_unavailable", false)
            }
            ProxyError::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", false),
            ProxyError::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", true),
            ProxyError::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                true,
            ),
            ProxyError::BadRequest(_) | ProxyError::ClientBody(_) => {
                (StatusCode::BAD_REQUEST, "bad_request", true)
            }
            ProxyError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", true)
            }
            ProxyError::UpgradeNotAllowed => (StatusCode::BAD_REQUEST, "upgrade_not_allowed", true),
        };
        ErrorSpec {
            status,
            code,
            close,
        }
    }

    /// The message shown to the caller: fixed text, no secret, no upstream detail.
    pub fn message(&self) -> &'static str {
        match self {
            ProxyError::UnknownCaller(why) => why,
            ProxyError::Forbidden => "the caller is not allowed on this route",
            ProxyError::NoRoute => "no route matches this host and path",
            ProxyError::TokenUnavailable { .. } => "no valid token for this caller; retry later",
            ProxyError::UpstreamUnavailable(_) => "the upstream could not be reached",
            ProxyError::UpstreamTimeout => "the upstream did not answer in time",
            ProxyError::BodyTooLarge => "the request body is too large",
            ProxyError::HeadersTooLarge => "the request headers are too large",
            ProxyError::BadRequest(why) => why,
            ProxyError::ClientBody(_) => "the request body could not be read",
            ProxyError::MethodNotAllowed => "CONNECT and TRACE are not proxied",
            ProxyError::UpgradeNotAllowed => "this route does not accept this Upgrade protocol",
        }
    }

    /// Extra detail for the log line (never sent to the caller).
    pub fn detail(&self) -> Option<&str> {
        match self {
            ProxyError::TokenUnavailable { detail, .. } => Some(detail),
            ProxyError::UpstreamUnavailable(detail) => Some(detail),
            ProxyError::ClientBody(detail) => Some(detail),
            _ => None,
        }
    }

    /// The response for this error. `version` is the request's: `Connection: close` is only
    /// meaningful (and only legal) on HTTP/1.
    pub fn into_response(self, request_id: &HeaderValue, version: Version) -> Response<ProxyBody> {
        let spec = self.spec();
        let body = serde_json::json!({
            "error": spec.code,
            "message": self.message(),
            "request_id": request_id.to_str().unwrap_or(""),
        });
        let body = Bytes::from(body.to_string());
        let mut response = Response::new(ProxyBody::full(body));
        *response.status_mut() = spec.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(X_REQUEST_ID, request_id.clone());
        if let ProxyError::TokenUnavailable { retry_after, .. } = &self {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            headers.insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if let ProxyError::MethodNotAllowed = &self {
            headers.insert(ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
        }
        if spec.close && version <= Version::HTTP_11 {
            headers.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl ProxyError {
    /// The whole HTTP/1.1 answer for this error, as bytes: for the one place that answers below
    /// hyper (`io`, replacing hyper's bare answer to a head it could not take).
    pub fn http1_bytes(self, request_id: &HeaderValue) -> Vec<u8> {
        let (parts, body) = self
            .into_response(request_id, Version::HTTP_11)
            .into_parts();
        let body = match body {
            ProxyBody::Full(Some(bytes)) => bytes,
            _ => Bytes::new(),
        };
        let mut out = format!("HTTP/1.1 {}\r\n", parts.status).into_bytes();
        for (name, value) in &parts.headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(&body);
        out
    }
}

impl From<TokenUnavailable> for ProxyError {
    fn from(e: TokenUnavailable) -> Self {
        ProxyError::TokenUnavailable {
            retry_after: e.retry_after,
            detail: e.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn all() -> Vec<ProxyError> {
        vec![
            ProxyError::UnknownCaller("who"),
            ProxyError::Forbidden,
            ProxyError::NoRoute,
            ProxyError::TokenUnavailable {
                retry_after: Duration::from_millis(2500),
                detail: "identity service down".into(),
            },
            ProxyError::UpstreamUnavailable("connection refused".into()),
            ProxyError::UpstreamTimeout,
            ProxyError::BodyTooLarge,
            ProxyError::HeadersTooLarge,
            ProxyError::BadRequest("bad"),
            ProxyError::ClientBody("chunk size overflow".into()),
            ProxyError::MethodNotAllowed,
            ProxyError::UpgradeNotAllowed,
        ]
    }

    #[test]
    fn the_table_is_pinned() {
        let table: Vec<(u16, &str, bool)> = all()
            .iter()
            .map(|e| {
                let s = e.spec();
                (s.status.as_u16(), s.code, s.close)
            })
            .collect();
        assert_eq!(
            table,
            vec![
                (401, "unknown_caller", false),
                (403, "forbidden", false),
                (404, "no_route", false),
                (503, "token_unavailable", false),
                (502, "upstream_unavailable", false),
                (504, "upstream_timeout", false),
                (413, "body_too_large", true),
                (431, "headers_too_large", true),
                (400, "bad_request", true),
                (400, "bad_request", true),
                (405, "method_not_allowed", true),
                (400, "upgrade_not_allowed", true),
            ]
        );
    }

    #[test]
    fn codes_lists_every_code_of_the_table_once() {
        let mut from_table: Vec<&str> = all().iter().map(|e| e.spec().code).collect();
        from_table.sort_unstable();
        from_table.dedup();
        let mut codes = ProxyError::CODES.to_vec();
        codes.sort_unstable();
        assert_eq!(codes, from_table);
    }

    #[tokio::test]
    async fn responses_are_json_with_code_message_and_request_id() {
        let id = HeaderValue::from_static("req-1");
        for e in all() {
            let spec = e.spec();
            let detail = e.detail().map(str::to_string);
            let response = e.into_response(&id, Version::HTTP_11);
            assert_eq!(response.status(), spec.status);
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
            assert_eq!(response.headers()[X_REQUEST_ID], "req-1");
            assert_eq!(response.headers().contains_key(CONNECTION), spec.close);
            assert_eq!(
                response.headers().contains_key(ALLOW),
                spec.status == StatusCode::METHOD_NOT_ALLOWED
            );
            assert_eq!(
                response.headers().contains_key(RETRY_AFTER),
                spec.status == StatusCode::SERVICE_UNAVAILABLE
            );
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["error"], spec.code);
            assert_eq!(json["request_id"], "req-1");
            assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
            if let Some(detail) = detail {
                assert!(!String::from_utf8_lossy(&body).contains(&detail));
            }
        }
    }

    #[test]
    fn retry_after_rounds_up_and_http2_gets_no_connection_header() {
        let e = ProxyError::TokenUnavailable {
            retry_after: Duration::from_millis(2500),
            detail: String::new(),
        };
        let r = e.into_response(&HeaderValue::from_static("x"), Version::HTTP_11);
        assert_eq!(r.headers()[RETRY_AFTER], "3");
        let r = ProxyError::BadRequest("bad")
            .into_response(&HeaderValue::from_static("x"), Version::HTTP_2);
        assert!(!r.headers().contains_key(CONNECTION));
    }
}
