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
//! It also hands the stream back for parking (`listener::serve`): when the connection's supervisor
//! asks ([`Park::request`]) and hyper reads with nothing to read, no request in flight, nothing
//! left unflushed and the bytes read so far ending exactly at the end of a message (the scanner
//! follows heads and their bodies for that), it moves the stream into the [`Park`] and
//! tells hyper the client closed. hyper then ends its part of the connection gracefully, freeing
//! its buffers, without shutting the socket, which waits in the `Park` for its next bytes.
//!
//! Must never: change, hold back or copy the bytes it watches, but for that one answer of hyper's;
//! park a stream with a message half read or an answer half written.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::Version;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Shared between a connection's stream, its requests and its supervising task.
#[derive(Debug, Default)]
pub struct Activity {
    io_events: AtomicU64,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    ambiguous_framing: AtomicBool,
    oversized_length: AtomicBool,
    http2: AtomicBool,
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
    /// A request arrived over HTTP/2 on this connection.
    pub fn speaks_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }
    /// Marks a request as started until the guard drops (with its answer's body: [`InFlightBody`]).
    pub fn request_started(self: &Arc<Self>, version: Version) -> InFlight {
        if version == Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
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

/// An answer's body that keeps its request counted in flight until hyper has written all of it
/// (or dropped it): a request is not over when its handler returns, but when its answer is out.
pub struct InFlightBody<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> InFlightBody<B> {
    pub fn new(body: B, in_flight: InFlight) -> Self {
        InFlightBody {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Where a parked connection's stream waits, and the supervisor's request to park it.
pub struct Park<S> {
    requested: AtomicBool,
    stream: Mutex<Option<S>>,
}

impl<S> Default for Park<S> {
    fn default() -> Self {
        Park {
            requested: AtomicBool::new(false),
            stream: Mutex::new(None),
        }
    }
}

impl<S> Park<S> {
    /// Asks the stream to park at hyper's next read, if it then finds the connection idle.
    pub fn request(&self) {
        self.requested.store(true, Ordering::Relaxed);
    }
    /// Withdraws a request the next read did not take.
    pub fn cancel(&self) {
        self.requested.store(false, Ordering::Relaxed);
    }
    /// The parked stream, if the stream parked.
    pub fn take(&self) -> Option<S> {
        self.slot().take()
    }
    fn put(&self, stream: S) {
        *self.slot() = Some(stream);
    }
    /// The slot; nothing can leave it half-written, so a poisoned lock is taken as it is.
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<S>> {
        self.stream.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A client stream a parked connection can wait on for its next bytes.
pub trait Readable {
    /// Resolves once the stream has bytes (or its end) to read.
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send + '_;
}

impl Readable for TcpStream {
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send + '_ {
        TcpStream::readable(self)
    }
}

/// A TLS stream parks only when rustls has no plaintext left for hyper (its read was pending),
/// so the socket's readiness is the stream's.
impl Readable for tokio_rustls::server::TlsStream<TcpStream> {
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send + '_ {
        self.get_ref().0.readable()
    }
}

/// Finds `content-length:` and `transfer-encoding:` header lines within one head.
#[derive(Debug)]
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
    /// Message framing, for parking: a head has begun and not yet ended.
    in_head: bool,
    /// The last `Content-Length` value of the current head (`None`: none, or too large).
    head_length: Option<u64>,
    /// Bytes of a `Content-Length` body still to come.
    body_left: u64,
    /// The bytes fed so far end exactly where a message ends (or nothing was fed).
    message_end: bool,
}

impl Default for HeadScanner {
    fn default() -> Self {
        HeadScanner {
            line: [0; 18],
            len: 0,
            content_length: false,
            transfer_encoding: false,
            length_value: None,
            oversized_length: false,
            in_head: false,
            head_length: None,
            body_left: 0,
            message_end: true,
        }
    }
}

const CL: &[u8] = b"content-length:";
const TE: &[u8] = b"transfer-encoding:";
/// The largest body length hyper accepts (it keeps the top two values for itself).
const MAX_LENGTH: u64 = u64::MAX - 2;

impl HeadScanner {
    /// Feeds bytes; true once a head with both headers has been seen.
    ///
    /// Every byte is scanned for header lines, body bytes too (so a body can only cause a
    /// refusal). Framing is followed beside that: a head ends at its blank line, then a
    /// `Content-Length` body is counted off. A chunked body is followed as lines: it ends at a
    /// blank line, as its last chunk does; a blank line inside chunk data may end it early in
    /// this view, but then the request is still in flight, which keeps the stream from parking.
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut found = false;
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = usize::try_from(self.body_left).map_or(bytes.len(), |l| l.min(bytes.len()));
                found |= self.scan(&bytes[..n], false).0;
                self.body_left -= n as u64;
                self.message_end = self.body_left == 0;
                bytes = &bytes[n..];
                continue;
            }
            let (f, used) = self.scan(bytes, true);
            found |= f;
            bytes = &bytes[used..];
        }
        found
    }

    /// Whether the bytes fed so far end exactly at the end of a message.
    pub fn at_message_end(&self) -> bool {
        self.message_end
    }

    /// Scans `bytes` for header lines; with `framing`, stops after a head's blank line and sets
    /// up its body. Returns (both headers seen in one head, bytes used).
    fn scan(&mut self, mut bytes: &[u8], framing: bool) -> (bool, usize) {
        let total = bytes.len();
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
                self.head_length = *value;
                self.length_value = None;
            }
            if self.len >= self.line.len() {
                // Past the interesting start of the line: skip to its end.
                match memchr::memchr(b'\n', bytes) {
                    Some(i) => bytes = &bytes[i..],
                    None => return (found, total),
                }
            }
            let b = bytes[0];
            bytes = &bytes[1..];
            if b == b'\n' {
                let blank = self.len == 0 || (self.len == 1 && self.line[0] == b'\r');
                self.len = 0;
                if blank {
                    let head = (self.content_length, self.transfer_encoding);
                    self.content_length = false;
                    self.transfer_encoding = false;
                    if framing && self.in_head {
                        self.end_head(head);
                        return (found, total - bytes.len());
                    }
                }
                continue;
            }
            if framing && b != b'\r' {
                self.in_head = true;
                self.message_end = false;
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
        (found, total)
    }

    /// A head ended: what follows is its body, if it has one.
    fn end_head(&mut self, (content_length, transfer_encoding): (bool, bool)) {
        self.in_head = false;
        let length = self.head_length.take();
        if transfer_encoding {
            self.message_end = false;
        } else if content_length {
            // A length too large to count never ends: such a stream never parks.
            self.body_left = length.unwrap_or(u64::MAX);
            self.message_end = self.body_left == 0;
        } else {
            self.message_end = true;
        }
    }
}

/// A stream that reports to an [`Activity`].
pub struct Watched<S> {
    /// `None` once parked.
    inner: Option<S>,
    activity: Arc<Activity>,
    scanner: HeadScanner,
    /// The error-table answer written instead of hyper's bare one, and how much of it is out.
    replacement: Option<(Vec<u8>, usize)>,
    /// Where to park, for a stream that may (HTTP/1).
    park: Option<Arc<Park<S>>>,
    /// Written to since the last completed flush.
    unflushed: bool,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>, park: Option<Arc<Park<S>>>) -> Self {
        Watched {
            inner: Some(inner),
            activity,
            scanner: HeadScanner::default(),
            replacement: None,
            park,
            unflushed: false,
        }
    }

    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
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
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Ok(())); // parked: the end, as far as hyper is concerned
        };
        let park = this.park.as_ref().filter(|p| {
            p.requested.swap(false, Ordering::Relaxed)
                && !this.unflushed
                && this.replacement.is_none()
                && this.scanner.at_message_end()
        });
        let before = buf.filled().len();
        let poll = Pin::new(inner).poll_read(cx, buf);
        if let (Some(park), Poll::Pending) = (park, &poll) {
            if let Some(stream) = this.inner.take() {
                park.put(stream);
            }
            return Poll::Ready(Ok(()));
        }
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
            let Some(inner) = self.inner.as_mut() else {
                return Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()));
            };
            match Pin::new(inner).poll_write(cx, &bytes[*written..]) {
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
        this.unflushed = true;
        if this.replacement.is_none() && this.is_hypers_answer(buf) {
            this.start_replacement();
        }
        if this.replacement.is_some() {
            return this.poll_replacement(cx, buf.len());
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()));
        };
        let poll = Pin::new(inner).poll_write(cx, buf);
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
        this.unflushed = true;
        if this.replacement.is_none() && bufs.first().is_some_and(|b| this.is_hypers_answer(b)) {
            this.start_replacement();
        }
        if this.replacement.is_some() {
            let len = bufs.iter().map(|b| b.len()).sum();
            return this.poll_replacement(cx, len);
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(std::io::ErrorKind::NotConnected.into()));
        };
        let poll = Pin::new(inner).poll_write_vectored(cx, bufs);
        if poll.is_ready() {
            this.touched();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let poll = Pin::new(inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = poll {
            this.unflushed = false;
        }
        poll
    }

    /// A parked stream is not shut: it waits in its `Park`.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut().inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
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

    /// Whether the scanner, fed `parts` in order, ends at the end of a message.
    fn ends_a_message(parts: &[&[u8]]) -> bool {
        let mut s = HeadScanner::default();
        for p in parts {
            s.feed(p);
        }
        s.at_message_end()
    }

    #[test]
    fn follows_message_ends_for_parking() {
        assert!(ends_a_message(&[]));
        let get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(ends_a_message(&[get]));
        assert!(
            ends_a_message(&[get, b"\r\n"]),
            "blank lines between messages"
        );
        for split in 1..get.len() {
            assert!(!ends_a_message(&[&get[..split]]), "head cut at {split}");
            assert!(
                ends_a_message(&[&get[..split], &get[split..]]),
                "split at {split}"
            );
        }
        let post = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        assert!(ends_a_message(&[post]));
        assert!(
            !ends_a_message(&[&post[..post.len() - 1]]),
            "body not all there"
        );
        assert!(!ends_a_message(&[post, b"G"]), "the next head begun");
        let body_like_a_head = b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n\r\n\r\n";
        assert!(ends_a_message(&[body_like_a_head, get]));
        assert!(!ends_a_message(&[
            &body_like_a_head[..body_like_a_head.len() - 2]
        ]));
        let chunked =
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert!(ends_a_message(&[chunked]));
        assert!(!ends_a_message(&[&chunked[..chunked.len() - 2]]));
        assert!(!ends_a_message(&[&chunked[..chunked.len() - 12]]));
        let huge = b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert!(
            !ends_a_message(&[huge]),
            "a length it cannot count never ends"
        );
        let pipelined = [&get[..], &get[..], &get[..10]].concat();
        assert!(!ends_a_message(&[&pipelined]));
    }
}
