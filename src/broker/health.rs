//! One view of the identity service's health, shared by every caller: a circuit breaker.
//!
//! - **Closed**: calls go out.
//! - A **transient** failure (connect error, timeout, 5xx, 429, an unusable body) opens it for one
//!   backoff step, never shorter than the server's `Retry-After`. While **open**, no call goes out,
//!   whichever caller asks.
//! - When the step has passed it is **half-open**: exactly one call, the probe, goes out. Its
//!   success closes the breaker and wakes every task waiting for it (each caller that needs a
//!   token then renews at once); its failure opens it again for the next, longer step.
//! - Any answer that shows the service working (a token, or a definitive refusal such as
//!   `invalid_grant`) counts as healthy: definitive answers are the ladder's business, not the
//!   breaker's.
//!
//! The state machine ([`Breaker`]) is pure and takes `now`; [`Health`] wraps it for tasks.
//! It never holds its lock across an `.await`.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::gate::Gate;
use super::policy::Timing;

/// Where the breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// The step has passed; `probing`: the probe is out.
    HalfOpen {
        probing: bool,
    },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        }
    }
}

/// May a call go out now?
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Yes; `probe`: it is the one probe of a half-open breaker.
    Go { probe: bool },
    /// No: try again after this long.
    Wait(Duration),
}

/// The pure state machine.
#[derive(Debug)]
pub struct Breaker {
    state: State,
    /// Its backoff steps: consecutive failed steps (0 while closed) and the last error.
    steps: Gate,
    probes_ok: u64,
    probes_failed: u64,
}

/// How long a half-open breaker tells others to wait while its probe is out.
const PROBE_WAIT: Duration = Duration::from_secs(1);

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: State::Closed,
            steps: Gate::default(),
            probes_ok: 0,
            probes_failed: 0,
        }
    }
}

impl Breaker {
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a call may go out now, without taking the probe.
    pub fn peek(&self, now: Instant) -> Admission {
        match self.state {
            State::Closed => Admission::Go { probe: false },
            State::Open { until } if now < until => Admission::Wait(until - now),
            State::Open { .. } | State::HalfOpen { probing: false } => {
                Admission::Go { probe: true }
            }
            State::HalfOpen { probing: true } => Admission::Wait(PROBE_WAIT),
        }
    }

    /// Asks to send a call: at most one probe is handed out per step.
    pub fn admit(&mut self, now: Instant) -> Admission {
        let answer = self.peek(now);
        if answer == (Admission::Go { probe: true }) {
            self.state = State::HalfOpen { probing: true };
        }
        answer
    }

    /// The service answered (a token or a definitive refusal). True when this ends an outage.
    pub fn succeeded(&mut self, probe: bool) -> bool {
        if probe {
            self.probes_ok += 1;
        }
        let recovered = self.state != State::Closed;
        self.state = State::Closed;
        self.steps.succeeded();
        recovered
    }

    /// A transient failure: opens the breaker; returns how long until the next probe. Failures of
    /// calls that went out before it opened do not lengthen the step.
    pub fn failed(
        &mut self,
        now: Instant,
        probe: bool,
        error: String,
        retry_after: Option<Duration>,
        timing: &Timing,
        sample: f64,
    ) -> Duration {
        if probe {
            self.probes_failed += 1;
        }
        match self.state {
            State::Open { until } if !probe => {
                // A straggler of the last closed period: keep the step, but honour its Retry-After.
                self.steps.note_error(error);
                let until = retry_after.map_or(until, |ra| until.max(now + ra));
                self.state = State::Open { until };
                until.saturating_duration_since(now)
            }
            _ => {
                let wait = self
                    .steps
                    .failed_with(now, error, retry_after, timing, sample);
                self.state = State::Open { until: now + wait };
                wait
            }
        }
    }

    /// A probe that ended without an answer either way (its task was cancelled): the next
    /// call may probe.
    pub fn abandoned(&mut self, probe: bool) {
        if probe && self.state == (State::HalfOpen { probing: true }) {
            self.state = State::HalfOpen { probing: false };
        }
    }

    #[cfg(test)]
    fn failures(&self) -> u32 {
        self.steps.failures()
    }
}

/// The identity service's health as `/tokens` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HealthStatus {
    /// `closed` (calls go out), `open` (waiting out a backoff step), `half_open` (probing).
    pub state: &'static str,
    /// Consecutive failed steps.
    pub failures: u32,
    /// Seconds until the next probe may go out, while open.
    pub next_probe_in_secs: Option<f64>,
    pub last_error: Option<String>,
    pub probes_ok: u64,
    pub probes_failed: u64,
}

/// The breaker, shared by every task of one broker.
pub struct Health {
    breaker: Mutex<Breaker>,
    /// Bumped on every change of state, for [`Health::wait_turn`].
    changed: watch::Sender<u64>,
}

/// One admitted call. Report its outcome with [`Health::record`]; dropped unreported, it gives up
/// the probe.
pub struct Permit<'a> {
    health: &'a Health,
    pub probe: bool,
    reported: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.health.with(|b| b.abandoned(self.probe));
            self.health.bump();
        }
    }
}

/// What a call to the identity service showed about its health.
pub enum Observed<'e> {
    /// It answered: a token, or a definitive refusal.
    Answered,
    /// It failed transiently: the error's text and its `Retry-After`.
    Failed(&'e str, Option<Duration>),
}

impl Default for Health {
    fn default() -> Self {
        Health {
            breaker: Mutex::new(Breaker::default()),
            changed: watch::channel(0).0,
        }
    }
}

impl Health {
    fn with<R>(&self, f: impl FnOnce(&mut Breaker) -> R) -> R {
        f(&mut self.breaker.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Whether a call could go out now (nothing taken).
    pub fn peek(&self) -> Admission {
        self.with(|b| b.peek(Instant::now()))
    }

    /// Asks to send a call: `Err(wait)` while open, or while another task's probe is out.
    pub fn admit(&self) -> Result<Permit<'_>, Duration> {
        let answer = self.with(|b| b.admit(Instant::now()));
        match answer {
            Admission::Go { probe } => {
                if probe {
                    self.bump();
                }
                Ok(Permit {
                    health: self,
                    probe,
                    reported: false,
                })
            }
            Admission::Wait(wait) => Err(wait),
        }
    }

    /// Reports an admitted call's outcome. True when an answer ended an outage.
    pub fn record(&self, mut permit: Permit<'_>, observed: Observed<'_>, timing: &Timing) -> bool {
        permit.reported = true;
        let probe = permit.probe;
        let recovered = match observed {
            Observed::Answered => self.with(|b| b.succeeded(probe)),
            Observed::Failed(error, retry_after) => {
                let sample = rand::random::<f64>();
                let wait = self.with(|b| {
                    b.failed(
                        Instant::now(),
                        probe,
                        error.to_string(),
                        retry_after,
                        timing,
                        sample,
                    )
                });
                tracing::warn!(
                    probe,
                    next_probe_in_ms = wait.as_millis() as u64,
                    error,
                    "identity service failing; calls paused"
                );
                false
            }
        };
        if recovered {
            tracing::info!("identity service answers again; renewing what is due");
        }
        self.bump();
        recovered
    }

    /// Resolves when a call may be tried: at once while closed; at the end of the step while
    /// open; when the probe's outcome is known while half-open.
    pub async fn wait_turn(&self) {
        let mut rx = self.changed.subscribe();
        loop {
            let state = self.with(|b| b.state());
            match state {
                State::Closed | State::HalfOpen { probing: false } => return,
                State::Open { until } => {
                    if Instant::now() >= until {
                        return;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => return,
                        _ = rx.changed() => {}
                    }
                }
                State::HalfOpen { probing: true } => {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    pub fn status(&self) -> HealthStatus {
        let now = Instant::now();
        self.with(|b| HealthStatus {
            state: b.state.name(),
            failures: b.steps.failures(),
            next_probe_in_secs: match b.state {
                State::Open { until } => Some(until.saturating_duration_since(now).as_secs_f64()),
                _ => None,
            },
            last_error: b.steps.last_error().map(str::to_string),
            probes_ok: b.probes_ok,
            probes_failed: b.probes_failed,
        })
    }

    pub fn state(&self) -> State {
        self.with(|b| b.state())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            refresh_fraction: 0.75,
            refresh_jitter: 0.0,
            min_margin: Duration::from_secs(1),
            expiry_skew: Duration::from_secs(1),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
        }
    }

    #[test]
    fn one_probe_per_step_and_steps_grow() {
        let t = timing();
        let now = Instant::now();
        let mut b = Breaker::default();
        assert_eq!(b.admit(now), Admission::Go { probe: false });
        let wait = b.failed(now, false, "500".into(), None, &t, 1.0);
        assert_eq!(wait, Duration::from_secs(1));
        assert_eq!(b.admit(now), Admission::Wait(Duration::from_secs(1)));
        let later = now + wait;
        assert_eq!(b.admit(later), Admission::Go { probe: true });
        // the probe is out: nobody else goes
        assert_eq!(b.admit(later), Admission::Wait(PROBE_WAIT));
        let wait = b.failed(later, true, "500".into(), None, &t, 1.0);
        assert_eq!(wait, Duration::from_secs(2), "second step is longer");
        let later = later + wait;
        assert_eq!(b.admit(later), Admission::Go { probe: true });
        assert!(b.succeeded(true), "a probe's success ends the outage");
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.failures(), 0);
        assert_eq!(b.admit(later), Admission::Go { probe: false });
        assert!(!b.succeeded(false), "closed stays closed");
    }

    #[test]
    fn retry_after_is_the_least_wait() {
        let t = timing();
        let now = Instant::now();
        let mut b = Breaker::default();
        let wait = b.failed(
            now,
            false,
            "429".into(),
            Some(Duration::from_secs(5)),
            &t,
            1.0,
        );
        assert_eq!(wait, Duration::from_secs(5));
        assert!(matches!(
            b.admit(now + Duration::from_millis(4999)),
            Admission::Wait(_)
        ));
        assert_eq!(
            b.admit(now + Duration::from_secs(5)),
            Admission::Go { probe: true }
        );
    }

    #[test]
    fn stragglers_do_not_lengthen_the_step() {
        let t = timing();
        let now = Instant::now();
        let mut b = Breaker::default();
        b.failed(now, false, "500".into(), None, &t, 1.0);
        for _ in 0..10 {
            b.failed(now, false, "500".into(), None, &t, 1.0);
        }
        assert_eq!(b.failures(), 1);
        assert_eq!(
            b.admit(now + Duration::from_secs(1)),
            Admission::Go { probe: true }
        );
        // a straggler with Retry-After pushes the step out
        let mut b = Breaker::default();
        b.failed(now, false, "500".into(), None, &t, 1.0);
        b.failed(
            now,
            false,
            "429".into(),
            Some(Duration::from_secs(3)),
            &t,
            1.0,
        );
        assert!(matches!(
            b.admit(now + Duration::from_secs(2)),
            Admission::Wait(_)
        ));
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_call_probe() {
        let t = timing();
        let now = Instant::now();
        let mut b = Breaker::default();
        b.failed(now, false, "timeout".into(), None, &t, 1.0);
        let later = now + Duration::from_secs(1);
        assert_eq!(b.admit(later), Admission::Go { probe: true });
        b.abandoned(true);
        assert_eq!(b.admit(later), Admission::Go { probe: true });
    }
}
