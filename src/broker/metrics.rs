//! The broker's metric families ([`BrokerMetrics`]): identity calls (by kind and outcome, and
//! their durations), renewals and the recovery ladder's steps, requests waiting on a renewal,
//! upstream 401s, the identity service's breaker and probes, tokens' expiry, and the broker's
//! use of the shared store (records shared or adopted, fallbacks without it). Registered once per
//! registry (`Metrics::set`); the broker and its gateway record through the `Arc` they keep.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::identity::Operation;
use crate::metrics::{MetricSet, OutcomeLabels};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    /// `admin_bearer`, `create`, `regenerate`, `exchange`.
    pub kind: &'static str,
    /// `ok`, `transient`, `rejected`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerKindLabels {
    pub caller: String,
    /// `api_token` or `access_token`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallerLabels {
    pub caller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    /// `request`, `schedule`, `upstream_401`, `recovery`.
    pub trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// `create` (regenerate refused), `admin_bearer` (bearer refused).
    pub step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `closed`, `open`, `half_open`.
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityCallLabels {
    /// `client_credentials`, `create`, `regenerate`, `exchange`.
    pub operation: &'static str,
    /// `ok`, `transient`, `rejected`.
    pub outcome: &'static str,
}

/// The outcomes of an identity call.
const CALL_OUTCOMES: [&str; 3] = ["ok", "transient", "rejected"];

/// The states of the identity service's breaker, each a series of `identity_service_state`.
const IDENTITY_STATES: [&str; 3] = ["closed", "open", "half_open"];

fn identity_histogram() -> Histogram {
    // 1 ms .. ~33 s: a call crosses the network and waits on the identity service
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// What the broker counts.
pub struct BrokerMetrics {
    pub token_fetches: Family<FetchLabels, Counter>,
    pub identity_call_duration: Family<IdentityCallLabels, Histogram, fn() -> Histogram>,
    pub token_renewals: Family<TriggerLabels, Counter>,
    pub token_ladder_steps: Family<StepLabels, Counter>,
    pub token_waiters: Family<CallerLabels, Counter>,
    pub token_waits: Family<OutcomeLabels, Counter>,
    pub token_expiry_seconds: Family<CallerKindLabels, Gauge>,
    pub upstream_rejections: Family<OutcomeLabels, Counter>,
    pub identity_probes: Family<OutcomeLabels, Counter>,
    pub identity_state: Family<StateLabels, Gauge>,
    pub store_sharing: Family<OutcomeLabels, Counter>,
    pub store_fallbacks: Family<KindLabels, Counter>,
}

impl MetricSet for BrokerMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = BrokerMetrics {
            token_fetches: Family::default(),
            identity_call_duration: Family::new_with_constructor(identity_histogram),
            token_renewals: Family::default(),
            token_ladder_steps: Family::default(),
            token_waiters: Family::default(),
            token_waits: Family::default(),
            token_expiry_seconds: Family::default(),
            upstream_rejections: Family::default(),
            identity_probes: Family::default(),
            identity_state: Family::default(),
            store_sharing: Family::default(),
            store_fallbacks: Family::default(),
        };
        // every series known in advance present from the start, at zero
        for kind in ["admin_bearer", "create", "regenerate", "exchange"] {
            for outcome in CALL_OUTCOMES {
                let _ = m
                    .token_fetches
                    .get_or_create(&FetchLabels { kind, outcome });
            }
        }
        for operation in Operation::ALL {
            for outcome in CALL_OUTCOMES {
                let _ = m.identity_call_duration.get_or_create(&IdentityCallLabels {
                    operation: operation.as_str(),
                    outcome,
                });
            }
        }
        for trigger in ["request", "schedule", "upstream_401", "recovery"] {
            let _ = m.token_renewals.get_or_create(&TriggerLabels { trigger });
        }
        for step in ["create", "admin_bearer"] {
            let _ = m.token_ladder_steps.get_or_create(&StepLabels { step });
        }
        for outcome in ["ok", "failed", "timeout"] {
            let _ = m.token_waits.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["renewed", "rate_limited"] {
            let _ = m
                .upstream_rejections
                .get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["ok", "failed"] {
            let _ = m.identity_probes.get_or_create(&OutcomeLabels { outcome });
        }
        for state in IDENTITY_STATES {
            let _ = m.identity_state.get_or_create(&StateLabels { state });
        }
        for outcome in ["written", "refused", "failed", "adopted"] {
            let _ = m.store_sharing.get_or_create(&OutcomeLabels { outcome });
        }
        for kind in ["renewal", "local_api_token"] {
            let _ = m.store_fallbacks.get_or_create(&KindLabels { kind });
        }
        registry.register(
            "token_fetches",
            "Calls to the identity service by kind and outcome",
            m.token_fetches.clone(),
        );
        registry.register(
            "identity_call_duration_seconds",
            "Duration of calls to the identity service by operation and outcome (ok, transient, rejected)",
            m.identity_call_duration.clone(),
        );
        registry.register(
            "token_renewals",
            "Token renewals that gave a new token, by what started them",
            m.token_renewals.clone(),
        );
        registry.register(
            "token_ladder_steps",
            "Recovery steps taken after a definitive refusal (create after a refused regenerate, a new admin bearer after a refused one)",
            m.token_ladder_steps.clone(),
        );
        registry.register(
            "token_waiters",
            "Requests that waited on a token fetch in flight",
            m.token_waiters.clone(),
        );
        registry.register(
            "token_waits",
            "Requests that waited for a renewal in flight, by outcome (ok, failed, timeout after tokens.max_wait)",
            m.token_waits.clone(),
        );
        registry.register(
            "token_expiry_seconds",
            "Seconds until the caller's current token expires",
            m.token_expiry_seconds.clone(),
        );
        registry.register(
            "upstream_rejections",
            "Upstream 401s for a current token: renewed, or passed on because the caller renewed on a 401 less than tokens.min_renew_interval ago",
            m.upstream_rejections.clone(),
        );
        registry.register(
            "identity_probes",
            "Probes sent to the identity service while its breaker was half-open, by outcome",
            m.identity_probes.clone(),
        );
        registry.register(
            "identity_service_state",
            "The identity service's breaker: 1 for the current state (closed, open, half_open)",
            m.identity_state.clone(),
        );
        registry.register(
            "store_sharing",
            "Shared-store records this replica wrote, whose write was refused or failed, or that it adopted from another replica",
            m.store_sharing.clone(),
        );
        registry.register(
            "store_fallbacks",
            "Renewals without the shared store (renewal), and replica-local API tokens created while it was unreachable (local_api_token)",
            m.store_fallbacks.clone(),
        );
        m
    }
}

impl BrokerMetrics {
    /// Records one call to the identity service.
    pub fn record_fetch(&self, kind: &'static str, outcome: &'static str) {
        self.token_fetches
            .get_or_create(&FetchLabels { kind, outcome })
            .inc();
    }

    /// One identity call of `operation` that ended with `outcome` after `took`.
    pub fn record_identity_call(
        &self,
        operation: &'static str,
        outcome: &'static str,
        took: Duration,
    ) {
        self.identity_call_duration
            .get_or_create(&IdentityCallLabels { operation, outcome })
            .observe(took.as_secs_f64());
    }

    pub fn record_renewal(&self, trigger: &'static str) {
        self.token_renewals
            .get_or_create(&TriggerLabels { trigger })
            .inc();
    }

    pub fn record_ladder(&self, step: &'static str) {
        self.token_ladder_steps
            .get_or_create(&StepLabels { step })
            .inc();
    }

    /// A request of `caller` waits on a renewal in flight.
    pub fn record_waiter(&self, caller: &str) {
        self.token_waiters
            .get_or_create(&CallerLabels {
                caller: caller.to_string(),
            })
            .inc();
    }

    pub fn record_wait(&self, outcome: &'static str) {
        self.token_waits
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn record_rejection(&self, outcome: &'static str) {
        self.upstream_rejections
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn record_probe(&self, outcome: &'static str) {
        self.identity_probes
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Marks `state` as the breaker's current state.
    pub fn set_identity_state(&self, state: &'static str) {
        for s in IDENTITY_STATES {
            self.identity_state
                .get_or_create(&StateLabels { state: s })
                .set(i64::from(s == state));
        }
    }

    /// A shared-store record this replica wrote (`written`), whose write was refused (`refused`)
    /// or failed (`failed`), or that it adopted from another replica (`adopted`).
    pub fn record_store_sharing(&self, outcome: &'static str) {
        self.store_sharing
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// A renewal without the shared store (`renewal`), or a replica-local API token created
    /// while it was unreachable (`local_api_token`).
    pub fn record_store_fallback(&self, kind: &'static str) {
        self.store_fallbacks
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Sets `token_expiry_seconds` to `expiries` (caller, kind, seconds left): callers and
    /// tokens not in it drop out.
    pub fn set_expiries<'c>(
        &self,
        expiries: impl IntoIterator<Item = (&'c str, &'static str, u64)>,
    ) {
        self.token_expiry_seconds.clear();
        for (caller, kind, secs) in expiries {
            let labels = CallerKindLabels {
                caller: caller.to_string(),
                kind,
            };
            self.token_expiry_seconds
                .get_or_create(&labels)
                .set(i64::try_from(secs).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn fetches_show_up_in_the_exposition_and_every_known_series_from_the_start() {
        let metrics = Metrics::new();
        let m = metrics.set::<BrokerMetrics>();
        m.record_fetch("create", "ok");
        let text = metrics.encode();
        for series in [
            r#"tokenbroker_token_fetches_total{kind="create",outcome="ok"} 1"#,
            r#"tokenbroker_token_fetches_total{kind="exchange",outcome="transient"} 0"#,
            r#"tokenbroker_identity_call_duration_seconds_count{operation="client_credentials",outcome="rejected"} 0"#,
            r#"tokenbroker_identity_service_state{state="half_open"} 0"#,
            r#"tokenbroker_store_fallbacks_total{kind="local_api_token"} 0"#,
        ] {
            assert!(text.contains(series), "{series}: {text}");
        }
    }
}
