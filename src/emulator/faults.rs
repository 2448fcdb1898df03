//! Injected faults: which are active, which one a request hits, and the answer each kind gives.
//!
//! A request for an operation hits the first active fault (in injection order) whose `operations`
//! is empty or names it; each hit counts against the fault's `requests`. A fault ends after its
//! `requests` hits or `seconds`, whichever comes first. `Refuse` never hits a request: while one is
//! active the listener is closed (see `listener.rs`), so it is time-based only.
//! Garbage answers 200 with `Content-Type: application/json` and a body that is not JSON, the
//! nastier case for a client.

use std::time::{Duration, Instant};

use http::header::{HeaderValue, RETRY_AFTER};
use http::StatusCode;

use super::http::{full, json, response, Response};
use super::{Fault, FaultKind, Operation};

struct Active {
    fault: Fault,
    /// Hits left; `None` = unlimited.
    left: Option<u64>,
    until: Option<Instant>,
}

impl Active {
    fn is_over(&self, now: Instant) -> bool {
        self.left == Some(0) || self.until.is_some_and(|u| now >= u)
    }
}

#[derive(Default)]
pub(crate) struct Faults {
    active: Vec<Active>,
}

impl Faults {
    /// Adds a fault; returns when it ends by time (`None`: not by time).
    pub(crate) fn add(&mut self, fault: Fault, now: Instant) -> Result<Option<Instant>, String> {
        let until = match fault.seconds {
            None => None,
            Some(s) => match Duration::try_from_secs_f64(s) {
                Ok(d) => Some(now.checked_add(d).ok_or("seconds is too large")?),
                Err(_) => return Err(format!("seconds must be a non-negative number, not {s}")),
            },
        };
        let left = match (&fault.kind, fault.requests) {
            (FaultKind::Refuse, _) => None,
            (_, Some(0)) => return Err("requests must be at least 1".to_string()),
            (_, n) => n,
        };
        self.active.push(Active { fault, left, until });
        Ok(until)
    }

    /// The fault this request for `op` hits, if any (and counts the hit).
    pub(crate) fn hit(&mut self, op: Operation, now: Instant) -> Option<FaultKind> {
        self.active.retain(|a| !a.is_over(now));
        let a = self.active.iter_mut().find(|a| {
            a.fault.kind != FaultKind::Refuse
                && (a.fault.operations.is_empty() || a.fault.operations.contains(&op))
        })?;
        if let Some(left) = &mut a.left {
            *left -= 1;
        }
        Some(a.fault.kind.clone())
    }

    /// Whether a `Refuse` fault is still active.
    pub(crate) fn refusing(&mut self, now: Instant) -> bool {
        self.active.retain(|a| !a.is_over(now));
        self.active
            .iter()
            .any(|a| a.fault.kind == FaultKind::Refuse)
    }

    pub(crate) fn active(&mut self, now: Instant) -> Vec<Fault> {
        self.active.retain(|a| !a.is_over(now));
        self.active.iter().map(|a| a.fault.clone()).collect()
    }

    pub(crate) fn clear(&mut self) {
        self.active.clear();
    }
}

/// The answer a fault gives instead of the emulator, or `None` to answer normally (after a delay
/// for `Slow`).
pub(crate) async fn respond(kind: &FaultKind) -> Option<Response> {
    match kind {
        FaultKind::ServerError => Some(json(
            StatusCode::INTERNAL_SERVER_ERROR,
            &serde_json::json!({"error": "server_error", "error_description": "injected fault"}),
        )),
        FaultKind::TooManyRequests { retry_after_secs } => {
            let mut resp = json(
                StatusCode::TOO_MANY_REQUESTS,
                &serde_json::json!({"error": "too_many_requests", "error_description": "injected fault"}),
            );
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            Some(resp)
        }
        FaultKind::Garbage => Some(response(
            StatusCode::OK,
            "application/json",
            full("<html><body>502 Bad Gateway</body></html>\n"),
        )),
        FaultKind::Slow { delay_ms } => {
            tokio::time::sleep(Duration::from_millis(*delay_ms)).await;
            None
        }
        // Connection-level, handled by the listener; never reaches a request.
        FaultKind::Refuse => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_fault_ends_after_its_requests() {
        let now = Instant::now();
        let mut f = Faults::default();
        f.add(
            Fault::new(FaultKind::ServerError, vec![Operation::Exchange], Some(2)),
            now,
        )
        .unwrap();
        assert_eq!(f.hit(Operation::Create, now), None);
        assert_eq!(
            f.hit(Operation::Exchange, now),
            Some(FaultKind::ServerError)
        );
        assert_eq!(
            f.hit(Operation::Exchange, now),
            Some(FaultKind::ServerError)
        );
        assert_eq!(f.hit(Operation::Exchange, now), None);
        assert!(f.active(now).is_empty());
    }

    #[test]
    fn first_injected_wins_and_time_ends_faults() {
        let now = Instant::now();
        let mut f = Faults::default();
        let timed = Fault {
            seconds: Some(1.0),
            ..Fault::new(FaultKind::Garbage, vec![], None)
        };
        f.add(timed, now).unwrap();
        f.add(Fault::new(FaultKind::ServerError, vec![], None), now)
            .unwrap();
        assert_eq!(f.hit(Operation::Create, now), Some(FaultKind::Garbage));
        let later = now + Duration::from_secs(1);
        assert_eq!(
            f.hit(Operation::Create, later),
            Some(FaultKind::ServerError)
        );
    }

    #[test]
    fn refuse_is_time_based_and_never_hits_requests() {
        let now = Instant::now();
        let mut f = Faults::default();
        let refuse = Fault {
            seconds: Some(2.0),
            ..Fault::new(FaultKind::Refuse, vec![Operation::Create], Some(1))
        };
        assert_eq!(
            f.add(refuse, now).unwrap(),
            Some(now + Duration::from_secs(2))
        );
        assert_eq!(f.hit(Operation::Create, now), None);
        assert!(f.refusing(now));
        assert!(!f.refusing(now + Duration::from_secs(2)));
    }

    #[test]
    fn rejects_faults_that_cannot_work() {
        let now = Instant::now();
        let mut f = Faults::default();
        assert!(f
            .add(Fault::new(FaultKind::Garbage, vec![], Some(0)), now)
            .is_err());
        let negative = Fault {
            seconds: Some(-1.0),
            ..Fault::new(FaultKind::Garbage, vec![], None)
        };
        assert!(f.add(negative, now).is_err());
        let nan = Fault {
            seconds: Some(f64::NAN),
            ..Fault::new(FaultKind::Garbage, vec![], None)
        };
        assert!(f.add(nan, now).is_err());
    }
}
