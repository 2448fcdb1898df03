//! hyper's own answers, made ours. hyper (1.x) answers a head it cannot take by itself, before
//! any handler runs, and closes the connection: `400` (a request line or header line it cannot
//! parse: obs-fold, a bad header name, `HTTP/1.2`, a `Content-Length` that is no number such as
//! `5, 5`), `431` (a head over its buffer, more than 100 header lines, or one of the two lengths
//! it reserves) or `414` (a target over 64 KiB). That answer is a bare head: no JSON body, no
//! `x-request-id`, no log line, no count.
//!
//! The stream ([`super::Watched`]) recognises it on the write side and writes the error table's
//! answer instead ([`answer`]), logged as one request line and counted like every refusal:
//! `400 bad_request`, `431 headers_too_large`, and `413 body_too_large` for a head whose
//! `Content-Length` hyper cannot represent (it answers 400 or 431 to those).
//!
//! Must never: take an answer of the handler's, or bytes of a body or a tunnel, for hyper's (see
//! `Watched::hypers_status` for when a write can be hyper's own).

use std::time::Duration;

use http::{HeaderMap, StatusCode};

use crate::metrics::Metrics;
use crate::proxy::log::{BytesIn, RequestLog};
use crate::proxy::service::ConnInfo;
use crate::proxy::{rewrite, ProxyError};

/// The status of a bare error answer (`HTTP/1.x NNN`, 400 or more, no `x-request-id`) that
/// `bytes` start with.
pub(super) fn bare_error_status(bytes: &[u8]) -> Option<u16> {
    let rest = bytes.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5).filter(|_| rest.get(1) == Some(&b' '))?;
    let status = std::str::from_utf8(code).ok()?.parse::<u16>().ok()?;
    let head = memchr::memmem::find(bytes, b"\r\n\r\n").map_or(bytes, |end| &bytes[..end]);
    let ours = memchr::memmem::find(head, b"\r\nx-request-id:").is_some();
    (status >= 400 && !ours).then_some(status)
}

/// The error table's name for hyper's answer `status` (`length_too_large`: the head it refused
/// has a `Content-Length` hyper cannot represent).
pub(super) fn error_for(status: u16, length_too_large: bool) -> ProxyError {
    match status {
        _ if length_too_large => ProxyError::BodyTooLarge,
        431 => ProxyError::HeadersTooLarge,
        414 => ProxyError::BadRequest("the request target is too long"),
        505 => ProxyError::BadRequest("this HTTP version is not supported"),
        _ => ProxyError::BadRequest("the request line or a header line is malformed"),
    }
}

/// The whole HTTP/1.1 answer for `error` in place of hyper's `status`; logs its request line and
/// counts it.
pub(super) fn answer(
    error: ProxyError,
    status: u16,
    conn: &ConnInfo,
    metrics: &Metrics,
) -> Vec<u8> {
    let id = rewrite::request_id(&HeaderMap::new());
    let spec = error.spec();
    let bytes = error.http1_bytes(&id);
    let body = memchr::memmem::find(&bytes, b"\r\n\r\n").map_or(0, |end| bytes.len() - end - 4);
    metrics.record_error(spec.code);
    // hyper answers as soon as it has read the head: no time passes worth measuring.
    metrics.record_request(None, None, spec.status.as_u16(), Duration::ZERO, None);
    RequestLog {
        method: None,
        route: None,
        caller: None,
        path: None,
        listener: conn.identity.listener.clone(),
        peer: conn.peer,
        status: spec.status.as_u16(),
        latency: Duration::ZERO,
        upstream: None,
        request_id: id,
        error: Some(spec.code),
        detail: Some(format!(
            "the HTTP/1 parser refused the head ({})",
            StatusCode::from_u16(status).map_or(status.to_string(), |s| s.to_string())
        )),
        bytes_in: BytesIn::None,
        bytes_out: body as u64,
        trace_id: None,
        broke_off: false,
    }
    .write();
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_bare_error_heads() {
        let hypers = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\ndate: x\r\n\r\n";
        assert_eq!(bare_error_status(hypers), Some(400));
        assert_eq!(
            bare_error_status(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n"),
            Some(431)
        );
        for not in [
            &b"HTTP/1.1 400 Bad Request\r\nx-request-id: abc\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 40",
            b"HTTP/2 400\r\n\r\n",
            b"\x00\x00\x12\x04\x00\x00\x00\x00\x00",
            b"hello",
        ] {
            assert_eq!(
                bare_error_status(not),
                None,
                "{:?}",
                String::from_utf8_lossy(not)
            );
        }
        // An x-request-id in a body after the head does not make a bare head ours.
        let body = b"HTTP/1.1 400 Bad Request\r\n\r\n\r\nx-request-id: 1";
        assert_eq!(bare_error_status(body), Some(400));
    }

    #[test]
    fn maps_statuses_onto_the_table() {
        let code = |status, too_large| error_for(status, too_large).spec();
        assert_eq!(code(400, false).code, "bad_request");
        assert_eq!(code(431, false).code, "headers_too_large");
        assert_eq!(code(414, false).status, StatusCode::BAD_REQUEST);
        assert_eq!(code(505, false).code, "bad_request");
        for status in [400, 431] {
            assert_eq!(code(status, true).code, "body_too_large");
        }
    }
}
