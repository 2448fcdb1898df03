//! The refresh task of one caller: sleeps until the earliest refresh point of its credentials
//! (or the end of a backoff step), renews off the request path, and stops when the caller is
//! removed, the broker shuts down or is dropped.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::{Broker, CallerState};
use crate::config::InjectMode;

pub(super) fn spawn(broker: Weak<Broker>, c: Arc<CallerState>) {
    tokio::spawn(async move {
        loop {
            let (wake_at, stop) = {
                let Some(b) = broker.upgrade() else { return };
                if c.removed.load(Ordering::Acquire) || b.stop.is_triggered() {
                    return;
                }
                (b.next_wake(&c).await, b.stop.clone())
            };
            let sleep = async {
                match wake_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = c.wake.notified() => continue,
                _ = sleep => {}
                _ = stop.wait() => return,
            }
            let Some(b) = broker.upgrade() else { return };
            if c.removed.load(Ordering::Acquire) {
                return;
            }
            b.refresh_now(&c).await;
        }
    });
}

impl Broker {
    /// When the caller's next renewal is due; `None` while it has never been used.
    async fn next_wake(&self, c: &CallerState) -> Option<Instant> {
        if !c.active.load(Ordering::Acquire) {
            return None;
        }
        let backoff_end = c
            .gate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_attempt();
        let mut at = match c.latest() {
            Some(held) => held.refresh_at,
            None => Instant::now(),
        };
        if c.settings().inject == InjectMode::AccessToken {
            if let Some(api) = self.api.get(&*c.name).await {
                at = at.min(api.refresh_at);
            }
        }
        Some(backoff_end.map_or(at, |b| at.max(b)))
    }

    /// Renews whatever is due: the API token (regenerate), the inject token, or both.
    async fn refresh_now(&self, c: &CallerState) {
        let now = Instant::now();
        if c.gate
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed_for(now)
            .is_some()
        {
            return;
        }
        let s = c.settings();
        if s.inject == InjectMode::AccessToken {
            if let Some(api) = self.api.get(&*c.name).await {
                if now >= api.refresh_at {
                    if let Err(e) = self.renew_api(c, &s, api.generation).await {
                        let wait = c.gate.lock().unwrap_or_else(|e| e.into_inner()).failed(
                            now,
                            e.to_string(),
                            e.retry_after(),
                            &self.timing(),
                        );
                        tracing::warn!(caller = &*c.name, error = %e,
                            retry_in_ms = wait.as_millis() as u64, "cannot renew the API token");
                        return;
                    }
                }
            }
        }
        let current = c.latest();
        if current.as_ref().is_some_and(|h| now < h.refresh_at) {
            return;
        }
        let renewing = current.map_or(0, |h| h.generation);
        if let Ok(held) = self.obtain_inject(c, Some(renewing)).await {
            self.inject.insert(Arc::clone(&c.name), held).await;
        }
    }
}
