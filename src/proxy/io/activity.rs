//! What a connection's stream, its requests and its supervising task tell each other: I/O
//! events (for the idle timeout and parking), requests started and in flight, and what the
//! connection turned out to be (HTTP/2, upgraded, marked for ambiguous framing).
//!
//! Must never: hold a lock; every field is one atomic, read without ordering guarantees
//! beyond the one task (HTTP/1) or the counts (HTTP/2).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Version;
use http_body::{Body, Frame, SizeHint};

/// Shared between a connection's stream, its requests and its supervising task.
#[derive(Debug, Default)]
pub struct Activity {
    pub(super) io_events: AtomicU64,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Requests whose answer's body hyper has written whole or dropped.
    ended: AtomicU64,
    pub(super) ambiguous_framing: AtomicBool,
    http2: AtomicBool,
    upgraded: AtomicBool,
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
    /// Requests over: their answer's body written whole (into hyper's buffer) or dropped.
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }
    /// An HTTP/1 head with both Content-Length and Transfer-Encoding was read on this connection.
    pub fn saw_ambiguous_framing(&self) -> bool {
        self.ambiguous_framing.load(Ordering::Relaxed)
    }
    /// A request arrived over HTTP/2 on this connection.
    pub fn speaks_http2(&self) -> bool {
        self.http2.load(Ordering::Relaxed)
    }
    /// A `101` answer handed the connection to a tunnel: its bytes are no longer HTTP.
    pub fn upgraded(&self) -> bool {
        self.upgraded.load(Ordering::Relaxed)
    }
    pub fn mark_upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
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
        self.0.ended.fetch_add(1, Ordering::Relaxed);
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
