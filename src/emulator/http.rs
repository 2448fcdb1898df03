//! HTTP plumbing shared by the emulator's handlers: the response body type, JSON and bodyless
//! responses with a `Date` header, request-body reading with a size limit, media-type and bearer
//! parsing, and [`ApiError`], the one table from an error to its status, `error` code and headers.

use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, DATE};
use http::StatusCode;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

pub(crate) type Body = BoxBody<Bytes, std::io::Error>;
pub(crate) type Response = http::Response<Body>;

/// Request bodies larger than this are refused (the real payloads are a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;

pub(crate) const APPLICATION_JSON: &str = "application/json";

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A response with a `Date` header (the emulator's wall clock, to which its JSON dates refer).
pub(crate) fn response(status: StatusCode, content_type: &str, body: Body) -> Response {
    let mut resp = http::Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        headers.insert(CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now())) {
        headers.insert(DATE, v);
    }
    resp
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    json_as(status, APPLICATION_JSON, value)
}

pub(crate) fn json_as(
    status: StatusCode,
    content_type: &str,
    value: &serde_json::Value,
) -> Response {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    response(status, content_type, full(bytes))
}

/// An answer without a body: no `Content-Type`, `Content-Length: 0` (none on a 204), a `Date`.
/// The emulator's reading of the reference's "Operation doesn't return any data structure".
pub(crate) fn bodyless(status: StatusCode) -> Response {
    let mut resp = response(status, APPLICATION_JSON, full(Bytes::new()));
    let headers = resp.headers_mut();
    headers.remove(CONTENT_TYPE);
    if status != StatusCode::NO_CONTENT {
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    }
    resp
}

/// An empty 204.
pub(crate) fn no_content() -> Response {
    bodyless(StatusCode::NO_CONTENT)
}

/// Every error the emulator answers: `{"error": code, "error_description": ...}` with its status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    description: String,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            description: description.into(),
            headers: Vec::new(),
        }
    }

    fn with_header(mut self, name: HeaderName, value: &'static str) -> Self {
        self.headers.push((name, HeaderValue::from_static(value)));
        self
    }

    /// 400: a parameter is missing, malformed or breaks a rule.
    pub(crate) fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// 401 on the token endpoint: client authentication failed.
    pub(crate) fn invalid_client(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description).with_header(
            http::header::WWW_AUTHENTICATE,
            "Basic realm=\"identity-emulator\"",
        )
    }

    /// 400: the API token is unknown, expired, revoked, regenerated away or used up.
    pub(crate) fn invalid_grant() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "API Token is invalid or expired",
        )
    }

    pub(crate) fn unsupported_grant_type(grant: &str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            format!("grant_type {grant:?} is not supported"),
        )
    }

    pub(crate) fn invalid_scope(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_scope", description)
    }

    /// 401 on bearer-protected endpoints (api-tokens, echo upstream).
    pub(crate) fn invalid_token(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_token", description).with_header(
            http::header::WWW_AUTHENTICATE,
            "Bearer error=\"invalid_token\"",
        )
    }

    pub(crate) fn unsupported_media_type(expected: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            format!("Content-Type must be {expected}"),
        )
    }

    pub(crate) fn payload_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            format!("request body larger than {MAX_BODY} bytes"),
        )
    }

    pub(crate) fn not_found(description: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", description)
    }

    pub(crate) fn method_not_allowed(allow: &'static str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("allowed: {allow}"),
        )
        .with_header(http::header::ALLOW, allow)
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn into_response(self) -> Response {
        let mut resp = json(
            self.status,
            &serde_json::json!({"error": self.code, "error_description": self.description}),
        );
        resp.headers_mut().extend(self.headers);
        resp
    }

    /// The same status and headers without a body (where the reference documents none). The
    /// description only reaches the debug log.
    pub(crate) fn into_bodyless_response(self) -> Response {
        tracing::debug!(status = self.status.as_u16(), error = self.code,
            description = %self.description, "error answered without a body");
        let mut resp = bodyless(self.status);
        resp.headers_mut().extend(self.headers);
        resp
    }
}

/// Reads a whole (small) request body.
pub(crate) async fn read_body(body: Incoming) -> Result<Bytes, ApiError> {
    match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::payload_too_large()),
        Err(e) => Err(ApiError::invalid_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

/// Whether the request's `Content-Type` is `expected`, ignoring parameters such as `charset`.
pub(crate) fn has_media_type(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case(expected))
}

/// The credential after `<scheme> ` in `Authorization` (scheme compared case-insensitively).
pub(crate) fn authorization<'h>(headers: &'h HeaderMap, scheme: &str) -> Option<&'h str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (given, credential) = value.trim().split_once(' ')?;
    given
        .eq_ignore_ascii_case(scheme)
        .then(|| credential.trim())
        .filter(|c| !c.is_empty())
}
