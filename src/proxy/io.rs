//! The client connection's byte stream, watched: counts I/O for the idle timeout, and scans the
//! bytes read for an HTTP/1 head that carries both `Content-Length` and `Transfer-Encoding`.
//!
//! Why the scan: on such a request hyper (1.x) drops the Content-Length, reads the body as chunked
//! and closes the connection afterwards (RFC 9112 6.3 allows that), so the handler cannot see that
//! the request was ambiguous. We refuse it instead. The scanner looks at every line of what is
//! read; a run of lines without a blank line between them (a head) that holds both header names
//! marks the connection, and the handler answers 400 to a request with `Transfer-Encoding` on a
//! marked connection. A body that happens to look like such a head can only cause a refusal, never
//! let an ambiguous request through.
//!
//! The scanner also reads `Content-Length` values: hyper refuses one it cannot represent
//! (18446744073709551615, or more digits than a u64 holds) itself, with a bare 431 or 400 and no
//! body, before any handler runs. On a connection where such a head was read, a response that
//! lacks `x-request-id` (which every answer of the handler carries) is hyper's, and is replaced
//! by the error table's 413 `body_too_large` JSON answer, logged as a request line.
//!
//! Must never: change, hold back or copy the bytes it watches, but for that one answer of hyper's.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between a connection's stream, its requests and its supervising task.
#[derive(Debug, Default)]
pub struct Activity {
    io_events: AtomicU64,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    ambiguous_framing: AtomicBool,
    oversized_length: AtomicBool,
}

impl Activity {
    pub fn io_events(&self) -> u64 {
        self.io_events.load(Ordering::Relaxed)
    }
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// An HTTP/1 head with both Content-Length and Transfer-Encoding was read on this connection.
    pub fn saw_ambiguous_framing(&self) -> bool {
        self.ambiguous_framing.load(Ordering::Relaxed)
    }
    /// An HTTP/1 head with a `Content-Length` hyper cannot represent was read on this connection.
    pub fn saw_oversized_length(&self) -> bool {
        self.oversized_length.load(Ordering::Relaxed)
    }
    /// Marks a request as started until the guard drops.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Finds `content-length:` and `transfer-encoding:` header lines within one head.
#[derive(Debug, Default)]
pub struct HeadScanner {
    /// The first bytes of the current line, lower-cased.
    line: [u8; 18],
    /// Length of the current line so far (saturating past `line.len()`).
    len: usize,
    content_length: bool,
    transfer_encoding: bool,
    /// Inside a `Content-Length` value: its digits so far (`None` once it overflowed).
    length_value: Option<Option<u64>>,
    /// Sticky: a `Content-Length` value over `MAX_LENGTH` was seen.
    pub oversized_length: bool,
}

const CL: &[u8] = b"content-length:";
const TE: &[u8] = b"transfer-encoding:";
/// The largest body length hyper accepts (it keeps the top two values for itself).
const MAX_LENGTH: u64 = u64::MAX - 2;

impl HeadScanner {
    /// Feeds bytes; true once a head with both headers has been seen.
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut found = false;
        while !bytes.is_empty() {
            if let Some(value) = &mut self.length_value {
                if bytes[0] != b'\n' {
                    if let Some(digit) = (bytes[0] as char).to_digit(10) {
                        *value = value.and_then(|v| v.checked_mul(10)?.checked_add(digit.into()));
                    }
                    bytes = &bytes[1..];
                    continue;
                }
                self.oversized_length |= value.is_none_or(|v| v > MAX_LENGTH);
                self.length_value = None;
            }
            if self.len >= self.line.len() {
                // Past the interesting start of the line: skip to its end.
                match memchr::memchr(b'\n', bytes) {
                    Some(i) => bytes = &bytes[i..],
                    None => return found,
                }
            }
            let b = bytes[0];
            bytes = &bytes[1..];
            if b == b'\n' {
                let blank = self.len == 0 || (self.len == 1 && self.line[0] == b'\r');
                if blank {
                    self.content_length = false;
                    self.transfer_encoding = false;
                }
                self.len = 0;
                continue;
            }
            self.line[self.len] = b.to_ascii_lowercase();
            self.len += 1;
            let line = &self.line[..self.len];
            if line == CL {
                self.content_length = true;
                self.length_value = Some(Some(0));
            }
            self.transfer_encoding |= line == TE;
            found |= self.content_length && self.transfer_encoding;
        }
        found
    }
}

/// A stream that reports to an [`Activity`].
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    scanner: HeadScanner,
    /// The error-table answer written instead of hyper's bare one, and how much of it is out.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Watched {
            inner,
            activity,
            scanner: HeadScanner::default(),
            replacement: None,
        }
    }

    /// Whether `head` is hyper's own bare answer to a head with an impossible length.
    fn is_hypers_answer(&self, head: &[u8]) -> bool {
        self.activity.saw_oversized_length()
            && head.starts_with(b"HTTP/1.1 4")
            && memchr::memmem::find(head, b"\r\nx-request-id:").is_none()
    }

    fn touched(&self) {
        self.activity.io_events.fetch_add(1, Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            this.touched();
            if this.scanner.feed(&buf.filled()[before..]) {
                this.activity
                    .ambiguous_framing
                    .store(true, Ordering::Relaxed);
            }
            if this.scanner.oversized_length {
                this.activity
                    .oversized_length
                    .store(true, Ordering::Relaxed);
            }
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> Watched<S> {
    /// Writes the replacement of hyper's answer; `Ready(Ok(len))` (claiming hyper's `len`
    /// bytes) once all of it is out.
    fn poll_replacement(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
    ) -> Poll<std::io::Result<usize>> {
        while let Some((bytes, written)) = &mut self.replacement {
            if *written == bytes.len() {
                self.replacement = None;
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => *written += n,
                other => return other,
            }
        }
        self.touched();
        Poll::Ready(Ok(len))
    }

    fn start_replacement(&mut self) {
        let id = super::rewrite::request_id(&http::HeaderMap::new());
        let error = super::ProxyError::BodyTooLarge;
        tracing::info!(
            target: "tokenbroker::request",
            status = error.spec().status.as_u16(),
            request_id = id.to_str().unwrap_or("-"),
            error = error.spec().code,
            "request"
        );
        self.replacement = Some((error.http1_bytes(&id), 0));
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.replacement.is_none() && this.is_hypers_answer(buf) {
            this.start_replacement();
        }
        if this.replacement.is_some() {
            return this.poll_replacement(cx, buf.len());
        }
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if poll.is_ready() {
            this.touched();
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.replacement.is_none() && bufs.first().is_some_and(|b| this.is_hypers_answer(b)) {
            this.start_replacement();
        }
        if this.replacement.is_some() {
            let len = bufs.iter().map(|b| b.len()).sum();
            return this.poll_replacement(cx, len);
        }
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if poll.is_ready() {
            this.touched();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
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

    fn scan(parts: &[&[u8]]) -> bool {
        let mut s = HeadScanner::default();
        parts.iter().fold(false, |found, p| s.feed(p) | found)
    }

    #[test]
    fn finds_both_headers_in_one_head() {
        let head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(scan(&[head]));
        let reversed =
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 5\r\n\r\n";
        assert!(scan(&[reversed]));
        let bare_lf = b"POST / HTTP/1.1\nContent-Length: 5\nTransfer-Encoding: chunked\n\n";
        assert!(scan(&[bare_lf]));
    }

    #[test]
    fn finds_them_across_read_boundaries() {
        let head: &[u8] =
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\nTransfer-Encoding: chunked\r\n\r\n";
        for split in 0..head.len() {
            assert!(scan(&[&head[..split], &head[split..]]), "split at {split}");
        }
        let bytewise: Vec<&[u8]> = head.chunks(1).collect();
        assert!(scan(&bytewise));
    }

    #[test]
    fn lengths_hyper_cannot_represent_are_noticed() {
        let oversized = |value: &str| {
            let mut s = HeadScanner::default();
            let head = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            for b in head.as_bytes().chunks(3) {
                s.feed(b);
            }
            s.oversized_length
        };
        for fine in ["0", "5", "18446744073709551613", " 12 "] {
            assert!(!oversized(fine), "{fine}");
        }
        for absurd in [
            "18446744073709551614",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999999999",
        ] {
            assert!(oversized(absurd), "{absurd}");
        }
    }

    #[test]
    fn one_header_per_head_is_fine() {
        let two = b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi\
POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(!scan(&[two]));
        assert!(!scan(&[
            b"GET / HTTP/1.1\r\nX-Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(!scan(&[b"GET / HTTP/1.1\r\nContent-Length : 1\r\n\r\n"]));
    }
}
