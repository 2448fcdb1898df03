//! Pure timing policy: when to renew, how long a credential may be used, how long to back off.
//! No clock, no randomness of its own: callers pass the jitter sample, so every edge is testable.

use std::time::Duration;

use crate::config::TokenPolicy;

/// The timing part of the token policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    pub refresh_fraction: f64,
    pub refresh_jitter: f64,
    pub min_margin: Duration,
    pub expiry_skew: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl From<&TokenPolicy> for Timing {
    fn from(p: &TokenPolicy) -> Self {
        Timing {
            refresh_fraction: p.refresh_fraction,
            refresh_jitter: p.refresh_jitter,
            min_margin: p.min_margin,
            expiry_skew: p.expiry_skew,
            backoff_initial: p.backoff_initial,
            backoff_max: p.backoff_max,
        }
    }
}

/// How long after receipt a credential living `lifetime` may still be injected: its lifetime
/// minus the skew margin, the margin being at most a quarter of the lifetime.
pub fn usable_for(lifetime: Duration, skew: Duration) -> Duration {
    lifetime.saturating_sub(skew.min(lifetime / 4))
}

/// How long after receipt to renew a credential living `lifetime`. `sample` is a jitter draw in
/// [-1, 1]. The point is `fraction` of the lifetime (jittered), no later than `min_margin` before
/// expiry when the lifetime leaves room for that, and always before the credential stops being
/// usable.
pub fn refresh_in(lifetime: Duration, timing: &Timing, sample: f64) -> Duration {
    let sample = if sample.is_finite() {
        sample.clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let fraction =
        (timing.refresh_fraction * (1.0 + timing.refresh_jitter * sample)).clamp(0.05, 0.95);
    let mut at = lifetime.mul_f64(fraction);
    if lifetime >= timing.min_margin * 2 {
        at = at.min(lifetime - timing.min_margin);
    }
    at.min(usable_for(lifetime, timing.expiry_skew).mul_f64(0.95))
}

/// The longest `Retry-After` honoured: a longer one (a misconfigured proxy in front of the
/// service) is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How long to wait after `failures` consecutive failures (1 = the first) before trying again:
/// exponential from `backoff_initial`, capped at `backoff_max`, with "equal jitter" (half fixed,
/// half scaled by `sample` in [0, 1]), and never shorter than the server's `Retry-After` (up to
/// [`MAX_RETRY_AFTER`]), even past `backoff_max`.
pub fn backoff(
    failures: u32,
    timing: &Timing,
    sample: f64,
    retry_after: Option<Duration>,
) -> Duration {
    let exponent = failures.saturating_sub(1).min(30);
    let raw = timing
        .backoff_initial
        .checked_mul(1u32 << exponent)
        .unwrap_or(timing.backoff_max);
    let capped = raw.min(timing.backoff_max);
    let sample = if sample.is_finite() {
        sample.clamp(0.0, 1.0)
    } else {
        1.0
    };
    let delay = capped / 2 + (capped / 2).mul_f64(sample);
    match retry_after {
        Some(ra) => delay.max(ra.min(MAX_RETRY_AFTER)),
        None => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            refresh_fraction: 0.75,
            refresh_jitter: 0.1,
            min_margin: Duration::from_secs(60),
            expiry_skew: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn refresh_at_fraction_without_jitter() {
        assert_eq!(refresh_in(HOUR, &timing(), 0.0), HOUR.mul_f64(0.75));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let t = timing();
        let low = refresh_in(HOUR, &t, -1.0);
        let high = refresh_in(HOUR, &t, 1.0);
        assert_eq!(low, HOUR.mul_f64(0.675));
        assert_eq!(high, HOUR.mul_f64(0.825));
        // out-of-range and NaN samples are clamped / ignored
        assert_eq!(refresh_in(HOUR, &t, 7.0), high);
        assert_eq!(refresh_in(HOUR, &t, f64::NAN), HOUR.mul_f64(0.75));
    }

    #[test]
    fn min_margin_clamps_late_refresh() {
        let mut t = timing();
        t.refresh_fraction = 0.95;
        t.refresh_jitter = 0.0;
        let lifetime = Duration::from_secs(600);
        // 0.95 * 600 = 570 s would leave 30 s; the margin asks for 60 s
        assert_eq!(refresh_in(lifetime, &t, 0.0), Duration::from_secs(540));
    }

    #[test]
    fn short_lifetimes_ignore_the_margin_but_refresh_before_unusable() {
        let t = timing();
        let lifetime = Duration::from_secs(10); // shorter than 2 * min_margin
        let at = refresh_in(lifetime, &t, 1.0);
        assert!(at > Duration::ZERO);
        assert!(at < usable_for(lifetime, t.expiry_skew));
        assert_eq!(refresh_in(Duration::ZERO, &t, 0.0), Duration::ZERO);
    }

    #[test]
    fn refresh_always_precedes_end_of_use() {
        let t = timing();
        for secs in [1u64, 2, 5, 10, 30, 60, 119, 120, 121, 600, 86_400] {
            for sample in [-1.0, -0.5, 0.0, 0.5, 1.0] {
                let lifetime = Duration::from_secs(secs);
                let at = refresh_in(lifetime, &t, sample);
                assert!(at < usable_for(lifetime, t.expiry_skew), "{secs}s {sample}");
                assert!(at > Duration::ZERO);
            }
        }
    }

    #[test]
    fn skew_is_at_most_a_quarter() {
        assert_eq!(
            usable_for(HOUR, Duration::from_secs(10)),
            HOUR - Duration::from_secs(10)
        );
        assert_eq!(
            usable_for(Duration::from_secs(8), Duration::from_secs(10)),
            Duration::from_secs(6)
        );
        assert_eq!(
            usable_for(Duration::ZERO, Duration::from_secs(10)),
            Duration::ZERO
        );
    }

    #[test]
    fn backoff_grows_exponentially_to_the_cap() {
        let t = timing();
        assert_eq!(backoff(1, &t, 1.0, None), Duration::from_millis(500));
        assert_eq!(backoff(1, &t, 0.0, None), Duration::from_millis(250));
        assert_eq!(backoff(2, &t, 1.0, None), Duration::from_secs(1));
        assert_eq!(backoff(4, &t, 1.0, None), Duration::from_secs(4));
        assert_eq!(backoff(7, &t, 1.0, None), Duration::from_secs(30));
        assert_eq!(backoff(40, &t, 1.0, None), Duration::from_secs(30));
        assert_eq!(backoff(u32::MAX, &t, 0.0, None), Duration::from_secs(15));
    }

    #[test]
    fn backoff_honours_retry_after_past_backoff_max() {
        let t = timing();
        assert_eq!(
            backoff(1, &t, 1.0, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        assert_eq!(
            backoff(1, &t, 1.0, Some(Duration::from_secs(120))),
            Duration::from_secs(120),
            "the server's word beats our cap"
        );
        assert_eq!(
            backoff(1, &t, 1.0, Some(Duration::from_secs(86_400))),
            MAX_RETRY_AFTER
        );
    }
}
