//! The refresh task of one caller: sleeps until the earliest refresh point of its tokens (or the
//! end of a refusal backoff), waits its turn with the identity service (the shared breaker), and
//! renews off the request path through the caller's single flight. It stops when the caller is
//! removed, the broker shuts down or is dropped.

use std::sync::{Arc, Weak};

use tokio::time::Instant;

use super::caller::{CallerState, Trigger};
use super::health::State;
use super::Broker;

pub(super) fn spawn(broker: Weak<Broker>, c: Arc<CallerState>) {
    tokio::spawn(async move {
        loop {
            let (wake_at, stop) = {
                let Some(b) = broker.upgrade() else { return };
                if c.is_removed() || b.stop.is_triggered() {
                    return;
                }
                (c.next_refresh(), b.stop.clone())
            };
            let sleep = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = c.wake.notified() => continue,
                _ = sleep => {}
                _ = stop.wait() => return,
            }
            let Some(b) = broker.upgrade() else { return };
            let paused = b.gateway.health.state() != State::Closed;
            tokio::select! {
                _ = b.gateway.health.wait_turn() => {}
                _ = stop.wait() => return,
            }
            if c.is_removed() {
                return;
            }
            if c.next_refresh().is_some_and(|at| at > Instant::now()) {
                // renewed meanwhile (by a request, or before the outage ended)
                continue;
            }
            let trigger = if paused {
                Trigger::Recovery
            } else {
                Trigger::Schedule
            };
            let _ = b.renewal(&c, trigger).await;
        }
    });
}
