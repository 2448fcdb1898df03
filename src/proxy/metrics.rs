//! The proxy's metric families ([`ProxyMetrics`]): requests and their durations, requests cut
//! short, the error table's codes, client connections (open, parked), TLS handshake failures,
//! upgrades and their tunnels, upstream connections (made, open). Registered once per registry
//! (`Metrics::set`); the listeners and the request path record through the `Arc` the proxy keeps,
//! without a lock. A gauge of things open (client connections, parked ones, tunnels, upstream
//! connections) counts one for each [`Held`] alive.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::ProxyError;
use crate::metrics::{MetricSet, Name, OutcomeLabels};

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
pub struct ErrorLabels {
    /// A code of the proxy's error table (`unknown_caller`, `token_unavailable`, ...).
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub listener: Name,
    /// One of [`HANDSHAKE_FAILURE_REASONS`].
    pub reason: &'static str,
}

/// Why a TLS handshake on a proxy listener failed: a bounded set of label values.
pub const HANDSHAKE_FAILURE_REASONS: [&str; 8] = [
    "timeout",
    "no_client_certificate",
    "bad_certificate",
    "peer_incompatible",
    "alert_received",
    "protocol_error",
    "eof",
    "other",
];

fn latency_histogram() -> Histogram {
    // 100 us .. ~26 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

type Latencies = Family<RouteLabels, Histogram, fn() -> Histogram>;

/// One of a gauge's count while it lives: an open client connection, a parked one, a tunnel, an
/// upstream connection. Dropped however its holder ends (a task aborted or never polled too).
pub struct Held(Gauge);

impl Held {
    pub fn new(gauge: &Gauge) -> Held {
        gauge.inc();
        Held(gauge.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the proxy counts.
pub struct ProxyMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Latencies,
    pub upstream_duration: Latencies,
    pub requests_cut: Family<CutLabels, Counter>,
    /// tokenbroker's own refusals and failures, by the error table's code.
    pub errors: Family<ErrorLabels, Counter>,
    pub connections_open: Gauge,
    /// Of those, HTTP/1 connections idle and parked (hyper's buffers freed; see `listener`).
    pub connections_parked: Gauge,
    pub tls_handshake_failures: Family<HandshakeLabels, Counter>,
    pub upgrades: Family<RouteLabels, Counter>,
    pub tunnels_open: Gauge,
    pub tunnel_bytes: Family<TunnelBytesLabels, Counter>,
    /// New upstream connections, by outcome: `ok`, `failed`, `timeout` (no connection within
    /// `connect_timeout`).
    pub upstream_connects: Family<OutcomeLabels, Counter>,
    /// Upstream connections open now (in use or idle in the pool).
    pub upstream_connections_open: Gauge,
    /// Requests sent once more to the upstream where that is safe (see `forward::pool`).
    pub upstream_resends: Counter,
    /// The label value of a request that has no route or caller (yet).
    none: Name,
}

/// Only its name: the registry is what `/metrics` shows.
impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyMetrics").finish_non_exhaustive()
    }
}

impl MetricSet for ProxyMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = ProxyMetrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            upstream_duration: Family::new_with_constructor(latency_histogram),
            requests_cut: Family::default(),
            errors: Family::default(),
            connections_open: Gauge::default(),
            connections_parked: Gauge::default(),
            tls_handshake_failures: Family::default(),
            upgrades: Family::default(),
            tunnels_open: Gauge::default(),
            tunnel_bytes: Family::default(),
            upstream_connects: Family::default(),
            upstream_connections_open: Gauge::default(),
            upstream_resends: Counter::default(),
            none: Name(Arc::from("-")),
        };
        for outcome in ["ok", "failed", "timeout"] {
            let _ = m
                .upstream_connects
                .get_or_create(&OutcomeLabels { outcome });
        }
        // every code at 0, so that a rate of any of them exists before the first one
        for error in ProxyError::CODES {
            let _ = m.errors.get_or_create(&ErrorLabels { error });
        }
        registry.register(
            "requests",
            "Proxied requests by route, caller and status class",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request received to response headers sent",
            m.request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time from forwarding to upstream response headers",
            m.upstream_duration.clone(),
        );
        registry.register(
            "requests_cut",
            "Requests that ended without an answer, by route and reason",
            m.requests_cut.clone(),
        );
        registry.register(
            "errors",
            "Requests tokenbroker refused or failed itself (not the upstream's answers), by error code",
            m.errors.clone(),
        );
        registry.register(
            "connections_open",
            "Open client connections on proxy listeners",
            m.connections_open.clone(),
        );
        registry.register(
            "connections_parked",
            "Open client connections idle and parked: waiting for their next request as bare sockets",
            m.connections_parked.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes on proxy listeners, by listener and reason",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "upgrades",
            "Upgraded connections (e.g. WebSocket) by route",
            m.upgrades.clone(),
        );
        registry.register(
            "tunnels_open",
            "Upgraded connections open now",
            m.tunnels_open.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Bytes carried by upgraded connections by route and direction",
            m.tunnel_bytes.clone(),
        );
        registry.register(
            "upstream_connects",
            "New upstream connections (TCP and TLS) by outcome (ok, failed, timeout); a rate close to the request rate means upstreams do not keep connections alive",
            m.upstream_connects.clone(),
        );
        registry.register(
            "upstream_connections_open",
            "Upstream connections open now, carrying a request or idle in the pool",
            m.upstream_connections_open.clone(),
        );
        registry.register(
            "upstream_resends",
            "Requests sent once more to the upstream where that is safe (a pooled connection refused them before sending or closed under an idempotent one before any answer, or the upstream refused their HTTP/2 stream); a steady rate means upstreams close idle connections sooner than limits.idle_timeout, or refuse streams",
            m.upstream_resends.clone(),
        );
        m
    }
}

impl ProxyMetrics {
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
        let route = RouteLabels {
            route: self.name(route),
        };
        self.requests
            .get_or_create(&RequestLabels {
                route: route.route.clone(),
                caller: self.name(caller),
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
        let route = self.name(route);
        self.requests_cut
            .get_or_create(&CutLabels { route, reason })
            .inc();
    }

    /// A request tokenbroker answered with an error of its own table (`error`: its code).
    pub fn record_error(&self, error: &'static str) {
        self.errors.get_or_create(&ErrorLabels { error }).inc();
    }

    /// Every reason's series of a TLS listener, at zero.
    pub fn add_tls_listener(&self, listener: &Arc<str>) {
        for reason in HANDSHAKE_FAILURE_REASONS {
            let _ = self.tls_handshake_failures.get_or_create(&HandshakeLabels {
                listener: Name(listener.clone()),
                reason,
            });
        }
    }

    /// A failed TLS handshake (`reason`: one of [`HANDSHAKE_FAILURE_REASONS`]).
    pub fn record_handshake_failure(&self, listener: &Arc<str>, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&HandshakeLabels {
                listener: Name(listener.clone()),
                reason,
            })
            .inc();
    }

    /// A route or caller name as a label value; `-` for none.
    fn name(&self, name: Option<&Arc<str>>) -> Name {
        name.map_or_else(|| self.none.clone(), |n| Name(n.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn requests_show_up_in_the_exposition_and_every_error_code_from_the_start() {
        let metrics = Metrics::new();
        let m = metrics.set::<ProxyMetrics>();
        m.record_request(
            Some(&Arc::from("api")),
            Some(&Arc::from("billing")),
            204,
            Duration::from_millis(3),
            Some(Duration::from_millis(2)),
        );
        m.record_request(None, None, 401, Duration::from_millis(1), None);
        let text = metrics.encode();
        for series in [
            r#"tokenbroker_requests_total{route="api",caller="billing",status_class="2xx"} 1"#,
            "tokenbroker_upstream_duration_seconds_count{route=\"api\"} 1",
            r#"tokenbroker_requests_total{route="-",caller="-",status_class="4xx"} 1"#,
            "tokenbroker_request_duration_seconds_count{route=\"-\"} 1",
        ] {
            assert!(text.contains(series), "{series}: {text}");
        }
        for code in ProxyError::CODES {
            let series = format!("tokenbroker_errors_total{{error=\"{code}\"}} 0");
            assert!(text.contains(&series), "{series}: {text}");
        }
    }
}
