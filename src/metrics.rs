//! Prometheus metrics: one [`Metrics`] per process, shared by the proxy, the broker and the admin
//! listener. Labels carry names only (route, caller, kind, outcome), never a token or a key.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A route or caller name as a label value, shared with the config: recording a request clones
/// two `Arc`s instead of allocating strings.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Name,
    pub caller: Name,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelBytesLabels {
    pub route: Name,
    /// `to_upstream` or `to_caller`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CutLabels {
    pub route: Name,
    /// `shutdown` (cut at the end of `shutdown_grace`) or `client_gone`.
    pub reason: &'static str,
}

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
pub struct OutcomeLabels {
    pub outcome: &'static str,
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

/// The states of the identity service's breaker, each a series of `identity_service_state`.
const IDENTITY_STATES: [&str; 3] = ["closed", "open", "half_open"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOpLabels {
    /// `read`, `write`, `try_lease`, `renew`, `release`, `lease_holder`, `subscribe`.
    pub op: &'static str,
    /// `ok`, `error`, `timeout`, `invalid` (a record that does not open), and for writes
    /// `written`, `stale`, `lease_lost`; for renewals `lost`.
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 us .. ~26 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// Every metric the process exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub upstream_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub token_fetches: Family<FetchLabels, Counter>,
    pub token_expiry_seconds: Family<CallerKindLabels, Gauge>,
    pub token_waiters: Family<CallerLabels, Counter>,
    pub config_reloads: Family<OutcomeLabels, Counter>,
    pub connections_open: Gauge,
    pub token_renewals: Family<TriggerLabels, Counter>,
    pub token_ladder_steps: Family<StepLabels, Counter>,
    pub token_waits: Family<OutcomeLabels, Counter>,
    pub upstream_rejections: Family<OutcomeLabels, Counter>,
    pub identity_probes: Family<OutcomeLabels, Counter>,
    pub identity_state: Family<StateLabels, Gauge>,
    pub store_operations: Family<StoreOpLabels, Counter>,
    /// `acquired` or `busy` (another replica holds the lease).
    pub store_lease_acquisitions: Family<OutcomeLabels, Counter>,
    /// 1 while the shared store answers, 0 while it does not (and with the local store).
    pub store_up: Gauge,
    pub store_sharing: Family<OutcomeLabels, Counter>,
    pub store_fallbacks: Family<KindLabels, Counter>,
    pub upgrades: Family<RouteLabels, Counter>,
    pub tunnels_open: Gauge,
    pub tunnel_bytes: Family<TunnelBytesLabels, Counter>,
    pub requests_cut: Family<CutLabels, Counter>,
    /// The label value of a request that has no route or caller (yet).
    none: Name,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("tokenbroker");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        let upstream_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        let token_fetches = Family::<FetchLabels, Counter>::default();
        let token_expiry_seconds = Family::<CallerKindLabels, Gauge>::default();
        let token_waiters = Family::<CallerLabels, Counter>::default();
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        let connections_open = Gauge::default();
        let token_renewals = Family::<TriggerLabels, Counter>::default();
        let token_ladder_steps = Family::<StepLabels, Counter>::default();
        let token_waits = Family::<OutcomeLabels, Counter>::default();
        let upstream_rejections = Family::<OutcomeLabels, Counter>::default();
        let identity_probes = Family::<OutcomeLabels, Counter>::default();
        let identity_state = Family::<StateLabels, Gauge>::default();
        // every series present from the start, at zero
        for trigger in ["request", "schedule", "upstream_401", "recovery"] {
            let _ = token_renewals.get_or_create(&TriggerLabels { trigger });
        }
        for step in ["create", "admin_bearer"] {
            let _ = token_ladder_steps.get_or_create(&StepLabels { step });
        }
        for outcome in ["ok", "failed", "timeout"] {
            let _ = token_waits.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["renewed", "too_young"] {
            let _ = upstream_rejections.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["ok", "failed"] {
            let _ = identity_probes.get_or_create(&OutcomeLabels { outcome });
        }
        for state in IDENTITY_STATES {
            let _ = identity_state.get_or_create(&StateLabels { state });
        }
        registry.register(
            "token_renewals",
            "Token renewals that gave a new token, by what started them",
            token_renewals.clone(),
        );
        registry.register(
            "token_ladder_steps",
            "Recovery steps taken after a definitive refusal (create after a refused regenerate, a new admin bearer after a refused one)",
            token_ladder_steps.clone(),
        );
        registry.register(
            "token_waits",
            "Requests that waited for a renewal in flight, by outcome (ok, failed, timeout after tokens.max_wait)",
            token_waits.clone(),
        );
        registry.register(
            "upstream_rejections",
            "Upstream 401s for a current token: renewed, or passed on because the token was younger than tokens.min_renew_interval",
            upstream_rejections.clone(),
        );
        registry.register(
            "identity_probes",
            "Probes sent to the identity service while its breaker was half-open, by outcome",
            identity_probes.clone(),
        );
        registry.register(
            "identity_service_state",
            "The identity service's breaker: 1 for the current state (closed, open, half_open)",
            identity_state.clone(),
        );
        let store_operations = Family::<StoreOpLabels, Counter>::default();
        let store_lease_acquisitions = Family::<OutcomeLabels, Counter>::default();
        let store_up = Gauge::default();
        let store_sharing = Family::<OutcomeLabels, Counter>::default();
        let store_fallbacks = Family::<KindLabels, Counter>::default();
        for outcome in ["written", "refused", "failed", "adopted"] {
            let _ = store_sharing.get_or_create(&OutcomeLabels { outcome });
        }
        for kind in ["renewal", "local_api_token"] {
            let _ = store_fallbacks.get_or_create(&KindLabels { kind });
        }
        registry.register(
            "store_sharing",
            "Shared-store records this replica wrote, whose write was refused or failed, or that it adopted from another replica",
            store_sharing.clone(),
        );
        registry.register(
            "store_fallbacks",
            "Renewals without the shared store (renewal), and replica-local API tokens created while it was unreachable (local_api_token)",
            store_fallbacks.clone(),
        );
        let upgrades = Family::<RouteLabels, Counter>::default();
        let tunnels_open = Gauge::default();
        let tunnel_bytes = Family::<TunnelBytesLabels, Counter>::default();
        let requests_cut = Family::<CutLabels, Counter>::default();
        registry.register(
            "requests",
            "Proxied requests by route, caller and status class",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request received to response headers sent",
            request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time from forwarding to upstream response headers",
            upstream_duration.clone(),
        );
        registry.register(
            "token_fetches",
            "Calls to the identity service by kind and outcome",
            token_fetches.clone(),
        );
        registry.register(
            "token_expiry_seconds",
            "Seconds until the caller's current token expires",
            token_expiry_seconds.clone(),
        );
        registry.register(
            "token_waiters",
            "Requests that waited on a token fetch in flight",
            token_waiters.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads by outcome",
            config_reloads.clone(),
        );
        registry.register(
            "connections_open",
            "Open client connections on proxy listeners",
            connections_open.clone(),
        );
        registry.register(
            "store_operations",
            "Commands to the shared store (Redis) by operation and outcome",
            store_operations.clone(),
        );
        registry.register(
            "store_lease_acquisitions",
            "Attempts to take a caller's renewal lease, by outcome (acquired, busy)",
            store_lease_acquisitions.clone(),
        );
        registry.register(
            "store_up",
            "Whether the shared store (Redis) answers: 1 or 0",
            store_up.clone(),
        );
        registry.register(
            "upgrades",
            "Upgraded connections (e.g. WebSocket) by route",
            upgrades.clone(),
        );
        registry.register(
            "tunnels_open",
            "Upgraded connections open now",
            tunnels_open.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Bytes carried by upgraded connections by route and direction",
            tunnel_bytes.clone(),
        );
        registry.register(
            "requests_cut",
            "Requests that ended without an answer, by route and reason",
            requests_cut.clone(),
        );
        Arc::new(Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            token_fetches,
            token_expiry_seconds,
            token_waiters,
            config_reloads,
            connections_open,
            token_renewals,
            token_ladder_steps,
            token_waits,
            upstream_rejections,
            identity_probes,
            identity_state,
            store_operations,
            store_lease_acquisitions,
            store_up,
            store_sharing,
            store_fallbacks,
            upgrades,
            tunnels_open,
            tunnel_bytes,
            requests_cut,
            none: Name(Arc::from("-")),
        })
    }

    /// Records one finished proxied request; `None` is shown as `-`.
    pub fn record_request(
        &self,
        route: Option<&Arc<str>>,
        caller: Option<&Arc<str>>,
        status: u16,
        total: Duration,
        upstream: Option<Duration>,
    ) {
        let status_class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let name = |n: Option<&Arc<str>>| n.map_or_else(|| self.none.clone(), |n| Name(n.clone()));
        let route = RouteLabels { route: name(route) };
        self.requests
            .get_or_create(&RequestLabels {
                route: route.route.clone(),
                caller: name(caller),
                status_class,
            })
            .inc();
        self.request_duration
            .get_or_create(&route)
            .observe(total.as_secs_f64());
        if let Some(up) = upstream {
            self.upstream_duration
                .get_or_create(&route)
                .observe(up.as_secs_f64());
        }
    }

    /// Records a request that ended without an answer (`reason`: see [`CutLabels`]).
    pub fn record_cut(&self, route: Option<&Arc<str>>, reason: &'static str) {
        let route = route.map_or_else(|| self.none.clone(), |n| Name(n.clone()));
        self.requests_cut
            .get_or_create(&CutLabels { route, reason })
            .inc();
    }

    /// Records one call to the identity service.
    pub fn record_fetch(&self, kind: &'static str, outcome: &'static str) {
        self.token_fetches
            .get_or_create(&FetchLabels { kind, outcome })
            .inc();
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

    /// Marks `state` as the breaker's current state.
    pub fn set_identity_state(&self, state: &'static str) {
        for s in IDENTITY_STATES {
            self.identity_state
                .get_or_create(&StateLabels { state: s })
                .set(i64::from(s == state));
        }
    }

    /// Records one command to the shared store.
    pub fn record_store(&self, op: &'static str, outcome: &'static str) {
        self.store_operations
            .get_or_create(&StoreOpLabels { op, outcome })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_show_up_in_the_exposition() {
        let m = Metrics::new();
        m.record_request(
            Some(&Arc::from("api")),
            Some(&Arc::from("billing")),
            204,
            Duration::from_millis(3),
            Some(Duration::from_millis(2)),
        );
        m.record_request(None, None, 401, Duration::from_millis(1), None);
        m.record_fetch("create", "ok");
        let text = m.encode();
        assert!(
            text.contains(
                r#"tokenbroker_requests_total{route="api",caller="billing",status_class="2xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"tokenbroker_token_fetches_total{kind="create",outcome="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("tokenbroker_upstream_duration_seconds_count{route=\"api\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tokenbroker_requests_total{route="-",caller="-",status_class="4xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("tokenbroker_request_duration_seconds_count{route=\"-\"} 1"),
            "{text}"
        );
    }
}
