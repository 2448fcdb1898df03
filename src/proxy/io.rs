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
//! Must never: change, hold back or copy the bytes it watches.

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
}

const CL: &[u8] = b"content-length:";
const TE: &[u8] = b"transfer-encoding:";

impl HeadScanner {
    /// Feeds bytes; true once a head with both headers has been seen.
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut found = false;
        while !bytes.is_empty() {
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
            self.content_length |= line == CL;
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
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Watched {
            inner,
            activity,
            scanner: HeadScanner::default(),
        }
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
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
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
