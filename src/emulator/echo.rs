//! The echo upstream: the service behind the proxy in tests. Any method and path; it accepts only
//! `Authorization: Bearer <live access token>` from this emulator (or a live API token when so
//! configured), reads and counts the request body as a stream, and answers what it saw as JSON,
//! with credential-bearing header values shown only by their last 5 characters.
//!
//! Query parameters: `delay_ms=N` sleeps N ms before answering; `bytes=N` answers N bytes
//! (`a..z` repeated, `application/octet-stream`, chunked in 64 KiB frames) instead of JSON.
//! Refused requests are 401 `{"error":"invalid_token"}`, counted in `echo_rejected`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::header::HeaderMap;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Map, Value};

use super::http::{authorization, json as json_response, response, ApiError, Body, Response};
use super::tokens::{Caller, Now};
use super::Shared;
use crate::secret::last_chars;

const CHUNK: u64 = 64 * 1024;

/// Header names whose values are credentials, by substring of the lowercase name.
const CREDENTIAL_NAME_PARTS: [&str; 7] = [
    "auth", "cookie", "token", "secret", "key", "password", "session",
];

pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match serve(&shared, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    };
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "echo request");
    resp
}

#[derive(Default)]
struct Params {
    delay_ms: u64,
    bytes: Option<u64>,
}

fn params(query: Option<&str>) -> Result<Params, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::invalid_request(format!("malformed query: {e}")))?;
    let mut p = Params::default();
    for (name, value) in pairs {
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| ApiError::invalid_request(format!("{name}: must be an integer")))
        };
        match name.as_str() {
            "delay_ms" => p.delay_ms = number()?,
            "bytes" => p.bytes = Some(number()?),
            _ => {}
        }
    }
    Ok(p)
}

async fn serve(shared: &Shared, req: Request<Incoming>) -> Result<Response, ApiError> {
    let (caller, bearer_suffix) = match authenticate(shared, req.headers()) {
        Some(found) => {
            shared.counters().echo_ok += 1;
            found
        }
        None => {
            shared.counters().echo_rejected += 1;
            return Err(ApiError::invalid_token(
                "a live access token from the emulator is required",
            ));
        }
    };
    let params = params(req.uri().query())?;
    let (parts, mut body) = req.into_parts();
    let mut body_bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::invalid_request(format!("cannot read the request body: {e}")))?;
        if let Some(data) = frame.data_ref() {
            body_bytes += data.len() as u64;
        }
    }
    tracing::debug!(api_token_id = %caller.api_token_id, body_bytes, "echo accepted");
    if params.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(params.delay_ms)).await;
    }
    if let Some(n) = params.bytes {
        return Ok(response(
            StatusCode::OK,
            "application/octet-stream",
            pattern_body(n),
        ));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "caller": {
                "api_token_id": caller.api_token_id,
                "token_display_name": caller.token_display_name,
                "client_id": caller.client_id,
            },
            "token_kind": caller.kind.as_str(),
            "bearer_suffix": bearer_suffix,
            "headers": masked_headers(&parts.headers),
            "body_bytes": body_bytes,
        }),
    ))
}

/// The caller behind the bearer, and the bearer's last 5 characters.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Option<(Caller, String)> {
    let bearer = authorization(headers, "Bearer")?;
    let now = Now::get();
    let tokens = shared.tokens();
    let caller = tokens.access_token_caller(bearer, &now).or_else(|| {
        shared
            .echo_accepts_api_tokens
            .then(|| tokens.api_token_caller(bearer, &now))
            .flatten()
    })?;
    Some((caller, last_chars(bearer, 5)))
}

fn masked_headers(headers: &HeaderMap) -> Map<String, Value> {
    let mut out = Map::new();
    for name in headers.keys() {
        let credential = CREDENTIAL_NAME_PARTS
            .iter()
            .any(|part| name.as_str().contains(part));
        let values: Vec<String> = headers
            .get_all(name)
            .iter()
            .map(|v| {
                let v = String::from_utf8_lossy(v.as_bytes());
                if credential {
                    format!("...{}", last_chars(&v, 5))
                } else {
                    v.into_owned()
                }
            })
            .collect();
        out.insert(name.as_str().to_string(), Value::String(values.join(", ")));
    }
    out
}

/// `n` bytes of `a..z` repeated, streamed in 64 KiB frames.
fn pattern_body(n: u64) -> Body {
    let frames = stream::unfold(0u64, move |sent| async move {
        if sent >= n {
            return None;
        }
        let len = (n - sent).min(CHUNK);
        let chunk: Vec<u8> = (sent..sent + len).map(|i| b'a' + (i % 26) as u8).collect();
        Some((Ok(Frame::data(Bytes::from(chunk))), sent + len))
    });
    StreamBody::new(frames).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_credentials_only() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abcdefghij".parse().unwrap());
        h.insert("x-api-key", "k-123456789".parse().unwrap());
        h.insert("cookie", "s=1234567".parse().unwrap());
        h.insert("x-request-id", "req-1".parse().unwrap());
        h.append("accept", "a/b".parse().unwrap());
        h.append("accept", "c/d".parse().unwrap());
        let m = masked_headers(&h);
        assert_eq!(m["authorization"], "...fghij");
        assert_eq!(m["x-api-key"], "...56789");
        assert_eq!(m["cookie"], "...34567");
        assert_eq!(m["x-request-id"], "req-1");
        assert_eq!(m["accept"], "a/b, c/d");
    }

    #[test]
    fn query_parameters() {
        let p = params(Some("delay_ms=20&bytes=5&other=x")).unwrap();
        assert_eq!((p.delay_ms, p.bytes), (20, Some(5)));
        assert!(params(Some("bytes=-1")).is_err());
        assert!(params(None).unwrap().bytes.is_none());
    }

    #[test]
    fn suffix_is_char_safe() {
        assert_eq!(last_chars("ab", 5), "ab");
        assert_eq!(last_chars("xxéééééé", 5), "ééééé");
    }
}
