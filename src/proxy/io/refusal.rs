//! hyper's own answers, recognised. hyper (1.x) answers a head it cannot take by itself, before
//! any handler runs, and closes the connection: `400` (a request line or header line it cannot
//! parse: obs-fold, a bad header name, `HTTP/1.2`, a `Content-Length` that is no number such as
//! `5, 5`), `431` (a head over its buffer, more than 100 header lines, or one of the two lengths
//! it reserves) or `414` (a target over 64 KiB). That answer is a bare head: no JSON body, no
//! `x-request-id`, no log line, no count.
//!
//! The stream ([`super::Watched`]) recognises it on the write side and reports what it saw
//! ([`HypersRefusal`]) to the request path (`service::answer_refused`), which answers from the
//! error table, logs and counts; the stream writes that answer in place of hyper's.
//!
//! Must never: take an answer of the handler's, or bytes of a body or a tunnel, for hyper's (see
//! [`hypers_status`] for when a write can be hyper's own).

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

use super::Activity;

/// What the stream saw of a head hyper refused itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypersRefusal {
    /// The status of hyper's bare answer.
    pub status: u16,
    /// The head had a `Content-Length` hyper cannot represent.
    pub unrepresentable_length: bool,
}

/// The status of hyper's own bare refusal, if `bytes` (the start of a write) are one.
///
/// A handler's answer is in hyper's write buffer from when its handler returns until after its
/// body has ended (when its request stops being in flight) and the bytes were flushed; hyper
/// flushes the stream only once its buffer is empty. So a write made with no request in flight
/// and no answer ended since the last flush (`ended_at_flush`: [`Activity::ended`] then) holds
/// no byte of a handler's answer.
pub(super) fn hypers_status(activity: &Activity, ended_at_flush: u64, bytes: &[u8]) -> Option<u16> {
    let quiet = activity.in_flight() == 0
        && activity.ended() == ended_at_flush
        && !activity.speaks_http2()
        && !activity.upgraded();
    quiet.then(|| bare_error_status(bytes)).flatten()
}

/// The request path's answer, written in place of hyper's, and how much of it is out.
pub(super) struct Replacement {
    bytes: Vec<u8>,
    written: usize,
}

impl Replacement {
    pub(super) fn new(bytes: Vec<u8>) -> Replacement {
        Replacement { bytes, written: 0 }
    }

    /// Writes what is left of it to `inner` (`None`: parked); `Ready(Ok(()))` once all is out.
    pub(super) fn poll_out<S: AsyncWrite + Unpin>(
        &mut self,
        inner: &mut Option<S>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.written < self.bytes.len() {
            let Some(inner) = inner.as_mut() else {
                return Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()));
            };
            match Pin::new(inner).poll_write(cx, &self.bytes[self.written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

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
}
