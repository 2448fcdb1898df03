//! The client connection's byte stream, watched ([`Watched`]): it moves and counts bytes. It
//! counts I/O for the idle timeout, follows the HTTP/1 bytes read, parks the stream when the
//! connection idles, and writes the request path's answer in place of hyper's own bare refusals.
//! Each mechanism is its own module; this one only wires them into the stream.
//!
//! - [`activity`]: what the stream, the requests and the connection's supervisor tell each other
//!   (I/O events, requests started, in flight and ended).
//! - [`scan`]: the bytes read, followed as hyper reads them: exact message framing (chunk sizes
//!   counted), and heads that carry both `Content-Length` and `Transfer-Encoding`. On such a
//!   request hyper (1.x) drops the Content-Length, reads the body as chunked and closes the
//!   connection afterwards (RFC 9112 6.3 allows that), so the handler cannot see that it was
//!   ambiguous; the scan marks the connection and the handler refuses it (`admit::check_head`).
//! - [`park`]: parking. When the connection's supervisor asks ([`Park::request`]) and hyper reads
//!   with nothing to read, no request in flight, nothing left unflushed and the framing scan sure
//!   that the bytes read so far end exactly at the end of a message, the stream moves into the
//!   [`Park`] and tells hyper the client closed. hyper then ends its part of the connection
//!   gracefully, freeing its buffers, without shutting the socket, which waits in the `Park` for
//!   its next bytes (`listener::serve`). Where the scan is not sure (a body still coming, even
//!   after its answer went out; bytes it cannot parse), the stream does not park: hyper reads the
//!   rest of that body, or drops it and closes the connection, and never reads it as a request.
//! - [`refusal`]: hyper answers a head it cannot take (obs-fold, a bad header name, `HTTP/1.2`,
//!   too many or too large headers, an impossible `Content-Length`) with a bare 400 or 431 of its
//!   own. A write is hyper's own when no request is in flight, every answer that ended was
//!   flushed before it, the connection is neither HTTP/2 nor upgraded, and it starts with an
//!   error status line without `x-request-id` (which every answer of the handler carries). The
//!   stream reports it ([`HypersRefusal`]) and writes the request path's answer in its place
//!   (`service::answer_refused`: the error table's, logged and counted like every refusal).
//!   (Were hyper to queue its refusal behind the unflushed end of an earlier answer, its bare
//!   answer would go out as it is.)
//!
//! Must never: change, hold back or copy the bytes it watches, but for hyper's bare refusals;
//! park a stream with a message half read or an answer half written; decide an answer or write a
//! log line itself.

mod activity;
mod park;
mod refusal;
mod scan;

pub use activity::{Activity, InFlightBody};
pub use park::{Park, Readable};
pub use refusal::HypersRefusal;
use refusal::Replacement;
pub use scan::Scanner;

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::service::{self, ConnInfo};
use super::ProxyMetrics;

/// A stream that reports to its connection's [`Activity`].
pub struct Watched<S> {
    /// `None` once parked.
    inner: Option<S>,
    conn: Arc<ConnInfo>,
    metrics: Arc<ProxyMetrics>,
    scanner: Scanner,
    /// The request path's answer, written instead of hyper's bare one.
    replacement: Option<Replacement>,
    /// Where to park, for a stream that may (HTTP/1).
    park: Option<Arc<Park<S>>>,
    /// Written to since the last completed flush.
    unflushed: bool,
    /// `Activity::ended` at the last completed flush: what had ended then is all out.
    ended_at_flush: u64,
}

impl<S> Watched<S> {
    pub fn new(
        inner: S,
        conn: Arc<ConnInfo>,
        metrics: Arc<ProxyMetrics>,
        park: Option<Arc<Park<S>>>,
    ) -> Self {
        // A new stream or one that parked: every answer that ended so far is out.
        let ended_at_flush = conn.activity.ended();
        Watched {
            inner: Some(inner),
            conn,
            metrics,
            scanner: Scanner::default(),
            replacement: None,
            park,
            unflushed: false,
            ended_at_flush,
        }
    }

    pub fn activity(&self) -> &Arc<Activity> {
        &self.conn.activity
    }

    fn touched(&self) {
        self.activity().io_events.fetch_add(1, Ordering::Relaxed);
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
            p.take_request()
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
                this.activity()
                    .ambiguous_framing
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
        if let Some(replacement) = &mut self.replacement {
            ready!(replacement.poll_out(&mut self.inner, cx))?;
            self.replacement = None;
        }
        self.touched();
        Poll::Ready(Ok(len))
    }

    /// Starts replacing hyper's answer if `first` (the start of a write) is one.
    fn replace_if_hypers(&mut self, first: Option<&[u8]>) {
        if self.replacement.is_some() {
            return;
        }
        let activity = &self.conn.activity;
        let hypers = |b| refusal::hypers_status(activity, self.ended_at_flush, b);
        let Some(status) = first.and_then(hypers) else {
            return;
        };
        let refusal = HypersRefusal {
            status,
            unrepresentable_length: self.scanner.length_too_large(),
        };
        let bytes = service::answer_refused(refusal, &self.conn, &self.metrics);
        self.replacement = Some(Replacement::new(bytes));
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.replace_if_hypers(Some(buf));
        this.unflushed = true;
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
        this.replace_if_hypers(bufs.first().map(|b| &b[..]));
        this.unflushed = true;
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
            this.ended_at_flush = this.conn.activity.ended();
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
    use crate::metrics::Metrics;
    use std::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A watched stream that may park, and the client's end of it.
    fn watched() -> (Watched<DuplexStream>, DuplexStream, Arc<Park<DuplexStream>>) {
        let (client, server) = tokio::io::duplex(4096);
        let conn = Arc::new(ConnInfo::new("test", "127.0.0.1:9".parse().unwrap()));
        let park = Arc::new(Park::default());
        let stream = Watched::new(server, conn, Metrics::new().set(), Some(park.clone()));
        (stream, client, park)
    }

    /// hyper's next read with a park requested: whether the stream parked.
    async fn parks_at_next_read(
        stream: &mut Watched<DuplexStream>,
        park: &Park<DuplexStream>,
    ) -> bool {
        park.request();
        let mut buf = [0u8; 64];
        let polled = poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut buf);
            Poll::Ready(
                Pin::new(&mut *stream)
                    .poll_read(cx, &mut buf)
                    .map_ok(|()| buf.filled().len()),
            )
        })
        .await;
        park.cancel();
        match polled {
            Poll::Ready(Ok(0)) => park.take().is_some(),
            Poll::Pending => false,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_early_answer_does_not_park_a_body_still_coming() {
        let (mut stream, mut client, park) = watched();
        let head = b"POST /early HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        client.write_all(head).await.unwrap();
        client.write_all(b"40\r\nx\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 4096];
        let mut read = 0;
        while read < head.len() + 9 {
            read += stream.read(&mut buf).await.unwrap();
        }
        // Answered before its body came: the request is no longer in flight.
        drop(stream.activity().request_started(http::Version::HTTP_11));
        assert!(!parks_at_next_read(&mut stream, &park).await, "mid-chunk");

        client.write_all(&[b'y'; 0x40 - 5]).await.unwrap();
        client.write_all(b"\r\n0\r\n\r\n").await.unwrap();
        let mut read = 0;
        while read < 0x40 - 5 + 7 {
            read += stream.read(&mut buf).await.unwrap();
        }
        assert!(
            parks_at_next_read(&mut stream, &park).await,
            "the body ended"
        );
    }
}
