//! Repeated warnings, logged once per interval with a count: a condition that lasts (Redis
//! away, a record that does not open) must not write a line per attempt. Pure: takes `now`.

use std::time::Duration;

use tokio::time::Instant;

/// How often a repeated warning is let through.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(10);

/// One kind of warning's recent history.
#[derive(Debug, Default)]
pub struct Repeats {
    last: Option<Instant>,
    held_back: u64,
}

impl Repeats {
    /// `Some(n)` when the warning may be logged now, `n` being how many were held back since the
    /// last one; `None` (and counted) within [`REPEAT_INTERVAL`] of it.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < REPEAT_INTERVAL)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_interval_with_the_count_held_back() {
        let now = Instant::now();
        let mut r = Repeats::default();
        assert_eq!(r.admit(now), Some(0));
        for i in 1..=5 {
            assert_eq!(r.admit(now + Duration::from_millis(i)), None);
        }
        assert_eq!(
            r.admit(now + REPEAT_INTERVAL - Duration::from_millis(1)),
            None
        );
        assert_eq!(r.admit(now + REPEAT_INTERVAL), Some(6));
        assert_eq!(r.admit(now + REPEAT_INTERVAL * 3), Some(0));
    }
}
