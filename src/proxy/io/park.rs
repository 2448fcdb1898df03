//! Where a parked connection's stream waits (`listener::serve`), and the supervisor's request
//! to park it, which the stream ([`super::Watched`]) takes at hyper's next read if it finds the
//! connection idle there.
//!
//! Must never: hold its lock across an await (nothing is awaited under it).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::net::TcpStream;

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
    /// Takes the request (a read that could park consumes it, whether it parks or not).
    pub(super) fn take_request(&self) -> bool {
        self.requested.swap(false, Ordering::Relaxed)
    }
    /// The parked stream, if the stream parked.
    pub fn take(&self) -> Option<S> {
        self.slot().take()
    }
    pub(super) fn put(&self, stream: S) {
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
