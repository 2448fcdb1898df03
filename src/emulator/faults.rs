//! Injected faults: which are active, which one a request hits, and the answer each kind gives.
//!
//! A request for an operation hits the first active fault (in injection order) whose `operations`
//! is empty or names it; each hit counts against the fault's `requests`. A fault ends after its
//! `requests` hits or `seconds`, whichever comes first. `Refuse` never hits a request: while one is
//! active the listener is closed (see `listener.rs`), so it is time-based only.
//! Garbage answers 200 with `Content-Type: application/json` and a body that is not JSON, the
//! nastier case for a client.
//!
//! `Status` (and `ServerError`, `TooManyRequests`, which are two of its cases) answers an error
//! status with no body, a JSON body or an HTML page. The JSON body is RFC 6749's shape, which the
//! reference also gives create's 400; its default `error` code fits the status and the endpoint
//! (`[assume]`: the vendor publishes no codes for 403, 404, 429 or 5xx).

use std::time::Duration;

use tokio::time::Instant;

use http::header::{HeaderValue, RETRY_AFTER};
use http::StatusCode;

use super::http::{bodyless, full, json, response, Response};
use super::{BodyStyle, Fault, FaultKind, Operation};

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
        validate(&fault.kind)?;
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

/// Why a fault kind cannot be answered, if it cannot.
fn validate(kind: &FaultKind) -> Result<(), String> {
    let FaultKind::Status {
        status,
        body,
        error,
        retry_after,
    } = kind
    else {
        return Ok(());
    };
    if !(400..=599).contains(status) {
        return Err(format!(
            "status must be an error status, 400 to 599, not {status}"
        ));
    }
    if retry_after.is_some() && !matches!(status, 429 | 503) {
        return Err(format!(
            "retry_after goes with status 429 or 503, not {status}"
        ));
    }
    match error {
        Some(_) if *body != BodyStyle::Json => {
            Err("error (the JSON body's error code) needs body \"json\"".to_string())
        }
        Some(code) if !is_error_code(code) => Err(format!(
            "error must be 1 to 64 printable ASCII characters without '\"' or '\\', not {code:?}"
        )),
        _ => Ok(()),
    }
}

/// RFC 6749 5.2: `error` is `1*( %x20-21 / %x23-5B / %x5D-7E )`; bounded here.
fn is_error_code(code: &str) -> bool {
    (1..=64).contains(&code.len())
        && code
            .bytes()
            .all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5B | 0x5D..=0x7E))
}

/// The JSON `error` code of an injected status when the fault names none.
fn default_error_code(op: Operation, status: StatusCode) -> String {
    match status.as_u16() {
        400 => "invalid_request".to_string(),
        401 if op.is_token_endpoint() => "invalid_client".to_string(),
        401 => "invalid_token".to_string(),
        403 => "access_denied".to_string(),
        500 => "server_error".to_string(),
        503 => "temporarily_unavailable".to_string(),
        _ => status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
            .replace([' ', '-'], "_"),
    }
}

/// An error answer of `status` with the chosen body (the one code path of every injected status).
fn status_answer(
    op: Operation,
    status: u16,
    body: BodyStyle,
    error: Option<&str>,
    retry_after: Option<u64>,
) -> Response {
    // validated: 400..=599
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = match body {
        BodyStyle::Empty => bodyless(status),
        BodyStyle::Json => {
            let code = error.map_or_else(|| default_error_code(op, status), str::to_string);
            json(
                status,
                &serde_json::json!({"error": code, "error_description": "injected fault"}),
            )
        }
        BodyStyle::Html => {
            let title = format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("Error")
            );
            response(
                status,
                "text/html; charset=utf-8",
                full(format!(
                    "<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>\n"
                )),
            )
        }
    };
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// The answer a fault gives instead of the emulator to a request for `op`, or `None` to answer
/// normally (after a delay for `Slow`).
pub(crate) async fn respond(op: Operation, kind: &FaultKind) -> Option<Response> {
    match kind {
        FaultKind::Status {
            status,
            body,
            error,
            retry_after,
        } => Some(status_answer(
            op,
            *status,
            *body,
            error.as_deref(),
            *retry_after,
        )),
        FaultKind::ServerError => Some(status_answer(op, 500, BodyStyle::Json, None, None)),
        FaultKind::TooManyRequests { retry_after_secs } => Some(status_answer(
            op,
            429,
            BodyStyle::Json,
            None,
            Some(*retry_after_secs),
        )),
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

    fn status_fault(kind: FaultKind) -> Result<Option<Instant>, String> {
        Faults::default().add(Fault::new(kind, vec![], Some(1)), Instant::now())
    }

    #[test]
    fn status_faults_are_validated() {
        use BodyStyle::*;
        for ok in [
            FaultKind::status(400, Empty),
            FaultKind::status(599, Html),
            FaultKind::Status {
                status: 400,
                body: Json,
                error: Some("invalid_grant".into()),
                retry_after: None,
            },
            FaultKind::Status {
                status: 503,
                body: Empty,
                error: None,
                retry_after: Some(3),
            },
        ] {
            assert!(status_fault(ok.clone()).is_ok(), "{ok:?}");
        }
        for (bad, why) in [
            (FaultKind::status(200, Json), "400 to 599, not 200"),
            (FaultKind::status(399, Json), "not 399"),
            (FaultKind::status(600, Empty), "not 600"),
            (
                FaultKind::Status {
                    status: 500,
                    body: Json,
                    error: None,
                    retry_after: Some(1),
                },
                "429 or 503, not 500",
            ),
            (
                FaultKind::Status {
                    status: 400,
                    body: Empty,
                    error: Some("invalid_grant".into()),
                    retry_after: None,
                },
                "needs body \"json\"",
            ),
            (
                FaultKind::Status {
                    status: 400,
                    body: Json,
                    error: Some("bad\"quote".into()),
                    retry_after: None,
                },
                "printable ASCII",
            ),
        ] {
            let e = status_fault(bad.clone()).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn default_error_codes_fit_status_and_endpoint() {
        let code = |op, status| default_error_code(op, StatusCode::from_u16(status).unwrap());
        assert_eq!(code(Operation::Exchange, 400), "invalid_request");
        assert_eq!(code(Operation::ClientCredentials, 401), "invalid_client");
        assert_eq!(code(Operation::Create, 401), "invalid_token");
        assert_eq!(code(Operation::Regenerate, 403), "access_denied");
        assert_eq!(code(Operation::Create, 415), "unsupported_media_type");
        assert_eq!(code(Operation::Exchange, 429), "too_many_requests");
        assert_eq!(code(Operation::Exchange, 500), "server_error");
        assert_eq!(code(Operation::Exchange, 503), "temporarily_unavailable");
        assert_eq!(code(Operation::Exchange, 504), "gateway_timeout");
    }
}
