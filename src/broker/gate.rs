//! The one backoff of the broker: after a failure, no new attempt until the backoff step has
//! passed, however many requests or timers ask. Holds the last error for status pages. Used for
//! a caller's refusals and store retries, the admin bearer's refusals, and the steps of the
//! identity service's breaker (`health.rs`).

use std::time::Duration;

use tokio::time::Instant;

use super::policy::{backoff, Timing};

#[derive(Debug, Default)]
pub struct Gate {
    failures: u32,
    next_attempt: Option<Instant>,
    last_error: Option<String>,
}

impl Gate {
    /// `Some(wait)` while attempts are not allowed.
    pub fn closed_for(&self, now: Instant) -> Option<Duration> {
        self.next_attempt.filter(|at| *at > now).map(|at| at - now)
    }

    /// When the next attempt is allowed, if a backoff is running.
    pub fn next_attempt(&self) -> Option<Instant> {
        self.next_attempt
    }

    /// Records a failure; returns the backoff before the next attempt.
    pub fn failed(
        &mut self,
        now: Instant,
        error: String,
        retry_after: Option<Duration>,
        timing: &Timing,
    ) -> Duration {
        self.failed_with(now, error, retry_after, timing, rand::random::<f64>())
    }

    /// Like [`Gate::failed`], with the jitter `sample` (in `[0, 1)`) given.
    pub fn failed_with(
        &mut self,
        now: Instant,
        error: String,
        retry_after: Option<Duration>,
        timing: &Timing,
        sample: f64,
    ) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let wait = backoff(self.failures, timing, sample, retry_after);
        self.next_attempt = Some(now + wait);
        self.last_error = Some(error);
        wait
    }

    /// Notes an error that does not start a new step.
    pub fn note_error(&mut self, error: String) {
        self.last_error = Some(error);
    }

    /// Consecutive failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.next_attempt = None;
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_after_failure_and_opens_after_success() {
        let timing = Timing {
            refresh_fraction: 0.75,
            refresh_jitter: 0.0,
            min_margin: Duration::from_secs(1),
            expiry_skew: Duration::from_secs(1),
            backoff_initial: Duration::from_secs(2),
            backoff_max: Duration::from_secs(8),
        };
        let now = Instant::now();
        let mut gate = Gate::default();
        assert_eq!(gate.closed_for(now), None);
        let wait = gate.failed(now, "boom".into(), None, &timing);
        assert!(wait >= Duration::from_secs(1) && wait <= Duration::from_secs(2));
        assert_eq!(gate.closed_for(now), Some(wait));
        assert_eq!(gate.closed_for(now + wait), None);
        assert_eq!(gate.last_error(), Some("boom"));
        gate.succeeded();
        assert_eq!(gate.closed_for(now), None);
        assert_eq!(gate.failures, 0);
        assert_eq!(
            gate.last_error(),
            Some("boom"),
            "last error stays for status"
        );
    }
}
