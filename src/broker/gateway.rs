//! The gateway every identity call goes through: a bounded number in flight (a recovery renews
//! every caller that needs it "at once", but not 10,000 at a time), the shared breaker's
//! admission (`health.rs`), a client span when tracing is on, the call metrics and the caller's
//! counters, and the outcome reported back to the breaker.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tracing::Instrument;

use super::caller::CallerState;
use super::health::{Health, Observed};
use super::policy::Timing;
use super::BrokerMetrics;
use super::IdentityService;
use crate::identity::{ErrorClass, IdentityError, Operation};

/// How many identity calls may be in flight at once.
const MAX_CONCURRENT_CALLS: usize = 16;

/// Why an identity call did not give what was asked.
#[derive(Debug, Clone)]
pub(super) enum CallError {
    /// The identity service answered with a failure, or could not be reached.
    Identity(IdentityError),
    /// No call went out: the identity service (or, for the admin bearer, a refusal) is being
    /// waited out for `wait`.
    Paused { wait: Duration, reason: String },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Identity(e) => e.fmt(f),
            CallError::Paused { wait, reason } => write!(
                f,
                "identity calls paused for {}s after: {reason}",
                wait.as_secs_f64().ceil() as u64
            ),
        }
    }
}

impl From<IdentityError> for CallError {
    fn from(e: IdentityError) -> Self {
        CallError::Identity(e)
    }
}

impl CallError {
    pub fn is(&self, class: ErrorClass) -> bool {
        matches!(self, CallError::Identity(e) if e.class() == class)
    }
}

fn outcome(result: &Result<impl Sized, IdentityError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) if e.class() == ErrorClass::Transient => "transient",
        Err(_) => "rejected",
    }
}

/// The identity-service operation of a fetch kind (the admin bearer is client_credentials).
fn operation_of(kind: &'static str) -> &'static str {
    match kind {
        "admin_bearer" => Operation::ClientCredentials.as_str(),
        other => other,
    }
}

pub(super) struct Gateway {
    calls: Semaphore,
    /// The identity service's health: the breaker every caller shares.
    pub health: Health,
    metrics: Arc<BrokerMetrics>,
}

impl Gateway {
    pub fn new(metrics: Arc<BrokerMetrics>) -> Self {
        Gateway {
            calls: Semaphore::new(MAX_CONCURRENT_CALLS),
            health: Health::default(),
            metrics,
        }
    }

    /// One identity call: waits for a free call slot, asks the breaker, calls `op` on the
    /// service (`service`, read once admitted), counts the outcome (metrics, the caller's
    /// counters) and reports it to the breaker.
    pub async fn call<T, F, Fut>(
        &self,
        service: impl FnOnce() -> Arc<dyn IdentityService>,
        c: Option<&CallerState>,
        kind: &'static str,
        timing: &Timing,
        op: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(Arc<dyn IdentityService>) -> Fut,
        Fut: Future<Output = Result<T, IdentityError>>,
    {
        let _slot = self
            .calls
            .acquire()
            .await
            .expect("the call semaphore is never closed");
        let permit = self.health.admit().map_err(|wait| CallError::Paused {
            wait,
            reason: self
                .health
                .status()
                .last_error
                .unwrap_or_else(|| "the identity service is failing".into()),
        })?;
        let probe = permit.probe;
        let service = service();
        let started = std::time::Instant::now();
        let span = match crate::telemetry::is_on() {
            true => tracing::info_span!(
                target: "tokenbroker::trace",
                "identity",
                otel.name = %format_args!("identity {}", operation_of(kind)),
                otel.kind = "client",
                tokenbroker.operation = operation_of(kind),
                tokenbroker.caller = c.map(|c| &*c.name),
                tokenbroker.outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            ),
            false => tracing::Span::none(),
        };
        let result = op(service).instrument(span.clone()).await;
        let outcome = outcome(&result);
        span.record("tokenbroker.outcome", outcome);
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        self.metrics.record_fetch(kind, outcome);
        self.metrics
            .record_identity_call(operation_of(kind), outcome, started.elapsed());
        if let Some(c) = c {
            c.record_fetch(kind, outcome);
        }
        let text;
        let observed = match &result {
            Err(e) if e.class() == ErrorClass::Transient => {
                text = e.to_string();
                tracing::debug!(kind, error = %text, "identity call failed");
                Observed::Failed(&text, e.retry_after())
            }
            Err(e) => {
                tracing::debug!(kind, error = %e, "identity call refused");
                Observed::Answered
            }
            Ok(_) => Observed::Answered,
        };
        let healthy = matches!(observed, Observed::Answered);
        self.health.record(permit, observed, timing);
        if probe {
            self.metrics
                .record_probe(if healthy { "ok" } else { "failed" });
        }
        self.metrics.set_identity_state(self.health.state().name());
        result.map_err(CallError::Identity)
    }
}
