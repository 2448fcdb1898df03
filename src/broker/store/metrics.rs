//! The shared store's metric families ([`StoreMetrics`]): commands by operation and outcome,
//! lease acquisitions, and whether the store answers. Registered once per registry
//! (`Metrics::set`), with `store_up` at 0; the Redis store puts its command and lease series at 0
//! when it is set up ([`StoreMetrics::seed`]), so that a process without one shows none.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::{MetricSet, OutcomeLabels};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOpLabels {
    /// `read`, `write`, `try_lease`, `renew`, `release`, `lease_holder`, `subscribe`.
    pub op: &'static str,
    /// `ok`, `error`, `timeout`, `invalid` (a record that does not open), and for writes
    /// `written`, `stale`, `lease_lost`; for renewals `lost`.
    pub outcome: &'static str,
}

/// Every (op, outcome) pair the store records.
const OP_OUTCOMES: &[(&str, &[&str])] = &[
    ("read", &["ok", "error", "timeout", "invalid"]),
    (
        "write",
        &[
            "written",
            "stale",
            "lease_lost",
            "error",
            "timeout",
            "invalid",
        ],
    ),
    ("try_lease", &["ok", "error", "timeout"]),
    ("renew", &["ok", "lost", "error", "timeout"]),
    ("release", &["ok", "error", "timeout"]),
    ("lease_holder", &["ok", "error", "timeout"]),
    ("subscribe", &["ok", "error", "timeout"]),
];

/// The outcomes of taking a lease.
const LEASE_OUTCOMES: [&str; 3] = ["acquired", "busy", "taken_over"];

/// What the shared store counts.
pub struct StoreMetrics {
    pub operations: Family<StoreOpLabels, Counter>,
    /// `acquired`, `busy` (another replica holds the lease) or `taken_over`.
    pub lease_acquisitions: Family<OutcomeLabels, Counter>,
    /// 1 while the shared store answers, 0 while it does not (and with the local store).
    pub up: Gauge,
}

impl MetricSet for StoreMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = StoreMetrics {
            operations: Family::default(),
            lease_acquisitions: Family::default(),
            up: Gauge::default(),
        };
        registry.register(
            "store_operations",
            "Commands to the shared store (Redis) by operation and outcome",
            m.operations.clone(),
        );
        registry.register(
            "store_lease_acquisitions",
            "Attempts to take a caller's renewal lease, by outcome (acquired, busy)",
            m.lease_acquisitions.clone(),
        );
        registry.register(
            "store_up",
            "Whether the shared store (Redis) answers: 1 or 0",
            m.up.clone(),
        );
        m
    }
}

impl StoreMetrics {
    /// Every command's and lease outcome's series at 0, and the store down until it answers:
    /// a shared store is set up.
    pub fn seed(&self) {
        for (op, outcomes) in OP_OUTCOMES {
            for outcome in *outcomes {
                let _ = self
                    .operations
                    .get_or_create(&StoreOpLabels { op, outcome });
            }
        }
        for outcome in LEASE_OUTCOMES {
            let _ = self
                .lease_acquisitions
                .get_or_create(&OutcomeLabels { outcome });
        }
        self.up.set(0);
    }

    /// Records one command to the shared store.
    pub fn record(&self, op: &'static str, outcome: &'static str) {
        self.operations
            .get_or_create(&StoreOpLabels { op, outcome })
            .inc();
    }

    /// Records an attempt to take a lease (`outcome`: one of `acquired`, `busy`, `taken_over`).
    pub fn record_lease(&self, outcome: &'static str) {
        self.lease_acquisitions
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Whether the store answers now.
    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }
}
