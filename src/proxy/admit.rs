//! Admission: what a request must pass before anything else looks at it (method, framing, header
//! size), and the one judge of "body too large", wherever a body's size was seen: its declared
//! `Content-Length`, a length hyper cannot represent (it refuses the head itself), or a streamed
//! body that read past `max_body_bytes`.
//!
//! Must never: let `CONNECT` or `TRACE` through, or a head with both `Content-Length` and
//! `Transfer-Encoding`.

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Version};

use super::error::ProxyError;
use super::io::Activity;
use crate::config::Limits;

/// Checks that need no caller: method (`CONNECT` and `TRACE` are 405: one would open a tunnel
/// around every route, the other would echo the injected token back), ambiguous framing (400)
/// and header size (431).
pub fn check_head<B>(
    request: &Request<B>,
    activity: &Activity,
    limits: &Limits,
) -> Result<(), ProxyError> {
    if matches!(*request.method(), Method::CONNECT | Method::TRACE) {
        return Err(ProxyError::MethodNotAllowed);
    }
    let headers = request.headers();
    if headers.contains_key(TRANSFER_ENCODING)
        && (headers.contains_key(CONTENT_LENGTH)
            || (request.version() <= Version::HTTP_11 && activity.saw_ambiguous_framing()))
    {
        return Err(ProxyError::BadRequest(
            "a request must not carry both Content-Length and Transfer-Encoding",
        ));
    }
    if header_bytes(headers) > limits.max_header_bytes {
        return Err(ProxyError::HeadersTooLarge);
    }
    Ok(())
}

/// Size of the headers as sent on HTTP/1 (`name: value\r\n`).
fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// The declared `Content-Length`, when it is one number.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A request body's size, as far as it was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodySize {
    /// Its `Content-Length`.
    Declared(u64),
    /// A `Content-Length` hyper cannot represent: more than any limit could admit.
    Unrepresentable,
    /// Streamed past `max_body_bytes` while it was forwarded.
    ReadPastLimit,
}

/// The one judge of "body too large" (413 `body_too_large`), under `max_body_bytes`.
pub fn body(size: BodySize, max_body_bytes: Option<u64>) -> Result<(), ProxyError> {
    let too_large = match size {
        BodySize::Declared(len) => max_body_bytes.is_some_and(|max| len > max),
        BodySize::Unrepresentable | BodySize::ReadPastLimit => true,
    };
    match too_large {
        true => Err(ProxyError::BodyTooLarge),
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_too_large_past_the_limit_or_past_what_hyper_can_represent() {
        let code = |size, max| body(size, max).map_err(|e| e.spec().code);
        assert_eq!(code(BodySize::Declared(10), Some(10)), Ok(()));
        assert_eq!(
            code(BodySize::Declared(11), Some(10)),
            Err("body_too_large")
        );
        assert_eq!(code(BodySize::Declared(u64::MAX), None), Ok(()));
        assert_eq!(code(BodySize::Unrepresentable, None), Err("body_too_large"));
        assert_eq!(
            code(BodySize::ReadPastLimit, Some(10)),
            Err("body_too_large")
        );
    }
}
