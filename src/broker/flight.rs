//! Single flight: one fetch of a credential at a time, however many requests and timers ask;
//! everyone who asks while it runs gets its result. Used for the admin bearer and for each
//! caller's renewal.
//!
//! The fetch runs in a task of its own, so a waiter that gives up (its `max_wait`, a client that
//! went away) never cancels it half-way: a regenerate whose answer is dropped would leave the
//! caller with a dead token and no new one. It runs on the runtime the broker started on (the
//! main thread's, with worker threads): a request on a worker that starts a renewal waits for it
//! there, and the identity and store connections stay with the control plane.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tracing::Instrument;

use futures_util::future::{BoxFuture, FutureExt, Shared};

type Fetch<T> = Shared<BoxFuture<'static, T>>;

pub struct Flight<T: Clone> {
    current: Mutex<Option<(Arc<AtomicBool>, Fetch<T>)>>,
}

impl<T: Clone> Default for Flight<T> {
    fn default() -> Self {
        Flight {
            current: Mutex::new(None),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Flight<T> {
    /// The fetch in flight, or a new one made by `start` and spawned at once on `runtime`. `lost`
    /// is the result should the task die (a panic).
    pub fn join<F>(
        &self,
        runtime: &tokio::runtime::Handle,
        start: impl FnOnce() -> F,
        lost: fn() -> T,
    ) -> Fetch<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((done, fetch)) = current.as_ref() {
            if !done.load(Ordering::Acquire) {
                return fetch.clone();
            }
        }
        let done = Arc::new(AtomicBool::new(false));
        let work = start();
        let finished = Arc::clone(&done);
        // in the span of whoever started it (a request's, with telemetry on), so that the
        // identity calls it makes are that span's children
        let task = runtime.spawn(
            async move {
                let out = work.await;
                finished.store(true, Ordering::Release);
                out
            }
            .in_current_span(),
        );
        let fetch: Fetch<T> = async move { task.await.unwrap_or_else(|_| lost()) }
            .boxed()
            .shared();
        *current = Some((done, fetch.clone()));
        fetch
    }

    /// Whether a fetch is running.
    pub fn in_flight(&self) -> bool {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|(done, _)| !done.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;
    use tokio::runtime::Handle;

    #[tokio::test(start_paused = true)]
    async fn concurrent_joins_share_one_fetch_and_a_dropped_waiter_does_not_cancel_it() {
        let flight: Flight<u32> = Flight::default();
        let runs = Arc::new(AtomicU32::new(0));
        let start = || {
            let runs = Arc::clone(&runs);
            async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                runs.fetch_add(1, Ordering::SeqCst) + 1
            }
        };
        let first = flight.join(&Handle::current(), start, || 0);
        let second = flight.join(&Handle::current(), start, || 0);
        assert!(flight.in_flight());
        // the first waiter gives up early
        assert!(tokio::time::timeout(Duration::from_millis(10), first)
            .await
            .is_err());
        assert_eq!(second.await, 1);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(!flight.in_flight());
        // a later join starts a new fetch
        assert_eq!(flight.join(&Handle::current(), start, || 0).await, 2);
    }

    #[tokio::test]
    async fn a_panicking_fetch_gives_the_lost_result() {
        let flight: Flight<u32> = Flight::default();
        let fetch = flight.join(&Handle::current(), || async { panic!("boom") }, || 7);
        assert_eq!(fetch.await, 7);
    }
}
