//! Prometheus metrics: one [`Metrics`] per process, shared by the proxy, the broker and the admin
//! listener. Labels carry names only (route, caller, kind, outcome, error code), never a token or
//! a key. A subsystem may register a set of families of its own once per registry: a
//! [`MetricSet`], got with [`Metrics::set`] when the subsystem is built (it takes a lock).
//!
//! Two expositions of the same registry: OpenMetrics 1.0 ([`Metrics::encode_openmetrics`],
//! what prometheus-client writes) and the Prometheus text format 0.0.4
//! ([`Metrics::encode_prometheus`], converted from it: in 0.0.4 a counter family is named after its
//! `_total` sample, there is no `# UNIT` and no `# EOF`). The `process_*` metrics are read from
//! `/proc/self` at each scrape.
//!
//! Every family whose label values are known in advance has all its series from the start, at 0.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub commit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityCallLabels {
    /// `client_credentials`, `create`, `regenerate`, `exchange`.
    pub operation: &'static str,
    /// `ok`, `transient`, `rejected`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    /// The first 16 hex digits of the SHA-256 of the config file's text (never of a secret).
    pub sha256: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

/// The config in force and how its last reload went, and when each TLS listener's certificate
/// ends: what an operator checks after changing files, and what the certificate alert reads.
pub struct ConfigMetrics {
    info: Family<ConfigLabels, Gauge>,
    last_reload_successful: Gauge,
    last_reload_timestamp: Gauge,
    certificate_expiry: Family<ListenerLabels, Gauge>,
}

impl ConfigMetrics {
    fn register(registry: &mut Registry) -> ConfigMetrics {
        let metrics = ConfigMetrics {
            info: Family::default(),
            last_reload_successful: Gauge::default(),
            last_reload_timestamp: Gauge::default(),
            certificate_expiry: Family::default(),
        };
        metrics.last_reload_successful.set(1);
        metrics
            .last_reload_timestamp
            .set(unix_seconds(SystemTime::now()));
        registry.register(
            "config_info",
            "The config file in force, by the SHA-256 of its text (first 16 hex digits); always 1",
            metrics.info.clone(),
        );
        registry.register(
            "config_last_reload_successful",
            "1 if the last config or certificate reload was applied (or none was tried), 0 if refused",
            metrics.last_reload_successful.clone(),
        );
        registry.register(
            "config_last_reload_timestamp_seconds",
            "When the config was loaded or a reload last tried, Unix seconds",
            metrics.last_reload_timestamp.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the certificate a TLS listener serves ends (its notAfter), Unix seconds",
            metrics.certificate_expiry.clone(),
        );
        metrics
    }

    /// The config file whose text hashes to `sha256` is in force (at start or after a reload).
    pub fn in_force(&self, sha256: &[u8; 32]) {
        self.info.clear();
        let sha256 = hex::encode(&sha256[..8]);
        self.info.get_or_create(&ConfigLabels { sha256 }).set(1);
    }

    /// A reload (of the config, or of the certificates alone) was applied or refused, now.
    pub fn reloaded(&self, applied: bool) {
        self.last_reload_successful.set(i64::from(applied));
        self.last_reload_timestamp
            .set(unix_seconds(SystemTime::now()));
    }

    /// The certificate `listener` serves from now on ends at `not_after`.
    pub fn certificate(&self, listener: &str, not_after: SystemTime) {
        let labels = ListenerLabels {
            listener: listener.to_string(),
        };
        self.certificate_expiry
            .get_or_create(&labels)
            .set(unix_seconds(not_after));
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// The outcomes of an identity call.
const CALL_OUTCOMES: [&str; 3] = ["ok", "transient", "rejected"];

/// The commit this binary was built from, as `--version` names it (both from `build.rs`).
pub const COMMIT: &str = env!("TOKENBROKER_COMMIT");

/// The prefix of every family but the `process_*` ones.
const PREFIX: &str = "tokenbroker";

/// A subsystem's families, registered together once per [`Metrics`] (see [`Metrics::set`]).
pub trait MetricSet: Send + Sync + 'static {
    /// Registers the families in `registry` (its names get the `tokenbroker_` prefix) and puts
    /// every series known in advance at 0.
    fn register(registry: &mut Registry) -> Self;
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

fn identity_histogram() -> Histogram {
    // 1 ms .. ~33 s: a call crosses the network and waits on the identity service
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric the process exports.
pub struct Metrics {
    inner: Mutex<Registered>,
    pub token_fetches: Family<FetchLabels, Counter>,
    pub token_expiry_seconds: Family<CallerKindLabels, Gauge>,
    pub token_waiters: Family<CallerLabels, Counter>,
    pub config_reloads: Family<OutcomeLabels, Counter>,
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
    pub identity_call_duration: Family<IdentityCallLabels, Histogram, fn() -> Histogram>,
    /// The config in force, its last reload, and the listeners' certificates.
    pub config: ConfigMetrics,
}

struct Registered {
    /// The root: the process collector, then one `tokenbroker` sub-registry for the families
    /// above and one per set, in the order they were registered.
    registry: Registry,
    /// Each set registered, by its type.
    sets: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

/// Only its name: the registry is what `/metrics` shows.
impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix(PREFIX);
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: COMMIT,
            })
            .set(1);
        registry.register(
            "build_info",
            "The version and commit of this binary; always 1",
            build_info,
        );
        let identity_call_duration =
            Family::<IdentityCallLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                identity_histogram as fn() -> Histogram,
            );
        for operation in crate::identity::Operation::ALL {
            for outcome in CALL_OUTCOMES {
                let _ = identity_call_duration.get_or_create(&IdentityCallLabels {
                    operation: operation.as_str(),
                    outcome,
                });
            }
        }
        registry.register(
            "identity_call_duration_seconds",
            "Duration of calls to the identity service by operation and outcome (ok, transient, rejected)",
            identity_call_duration.clone(),
        );
        let config = ConfigMetrics::register(registry);
        registry.register(
            "telemetry_export_failures",
            "Span exports that failed (collector unreachable or answering an error): their spans are dropped",
            crate::telemetry::export_failures(),
        );
        let token_fetches = Family::<FetchLabels, Counter>::default();
        let token_expiry_seconds = Family::<CallerKindLabels, Gauge>::default();
        let token_waiters = Family::<CallerLabels, Counter>::default();
        let config_reloads = Family::<OutcomeLabels, Counter>::default();
        for outcome in ["ok", "rejected"] {
            let _ = config_reloads.get_or_create(&OutcomeLabels { outcome });
        }
        for kind in ["admin_bearer", "create", "regenerate", "exchange"] {
            for outcome in CALL_OUTCOMES {
                let _ = token_fetches.get_or_create(&FetchLabels { kind, outcome });
            }
        }
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
        for outcome in ["renewed", "rate_limited"] {
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
            "Upstream 401s for a current token: renewed, or passed on because the caller renewed on a 401 less than tokens.min_renew_interval ago",
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
        Arc::new(Metrics {
            inner: Mutex::new(Registered {
                registry: root,
                sets: HashMap::new(),
            }),
            token_fetches,
            token_expiry_seconds,
            token_waiters,
            config_reloads,
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
            identity_call_duration,
            config,
        })
    }

    /// The set `T` of this registry: registered at the first call, the same one after. Takes a
    /// lock: a subsystem calls it when it is built and keeps the `Arc`.
    pub fn set<T: MetricSet>(&self) -> Arc<T> {
        let mut inner = self.lock();
        if let Some(set) = inner.sets.get(&TypeId::of::<T>()) {
            return Arc::clone(set)
                .downcast::<T>()
                .expect("a set is stored under its own type");
        }
        let set = Arc::new(T::register(inner.registry.sub_registry_with_prefix(PREFIX)));
        inner.sets.insert(TypeId::of::<T>(), set.clone());
        set
    }

    fn lock(&self) -> MutexGuard<'_, Registered> {
        // Registering a set cannot leave the registry half-changed in a way encoding minds.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// The OpenMetrics 1.0 exposition of every metric (ends with `# EOF`).
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.lock().registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The OpenMetrics exposition; see [`Metrics::encode_openmetrics`].
    pub fn encode(&self) -> String {
        self.encode_openmetrics()
    }

    /// The Prometheus text format 0.0.4 exposition of every metric.
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode_openmetrics())
    }
}

/// The content type of [`Metrics::encode_openmetrics`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`Metrics::encode_prometheus`].
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics rather than the Prometheus text format: any
/// `application/openmetrics-text` range not refused with `q=0`.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    accept.split(',').any(|range| {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or("");
        if !media.eq_ignore_ascii_case("application/openmetrics-text") {
            return false;
        }
        !params.any(|p| {
            p.split_once('=').is_some_and(|(k, v)| {
                k.trim().eq_ignore_ascii_case("q") && v.trim().parse::<f64>() == Ok(0.0)
            })
        })
    })
}

/// Rewrites prometheus-client's OpenMetrics text as Prometheus text 0.0.4: a counter family's
/// `# HELP` and `# TYPE` name its `_total` sample; `# UNIT` and `# EOF` are dropped; `unknown`
/// becomes `untyped`. Samples are the same in both formats for the types this crate writes
/// (counters, gauges, histograms without exemplars or `_created`).
pub fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let comment = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        match comment {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(if prefix == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                });
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// `process_*` metrics of this process, read from `/proc/self` at each scrape (absent where
/// there is no `/proc`).
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self` says about this process.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

impl ProcessStats {
    /// Reads `/proc/self/stat`, `/proc/stat` (boot time), `/proc/self/fd` and
    /// `/proc/self/limits`; `None` if `/proc/self/stat` cannot be read.
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        });
        let mut stats = parse_stat(&stat, clock_ticks(), page_size(), boot_time?)?;
        stats.open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        stats.max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))?
                    .split_whitespace()
                    .nth(3)?
                    .parse()
                    .ok()
            });
        Some(stats)
    }
}

/// Clock ticks per second, for the times in `/proc/self/stat`.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// The page size, for the resident set size in `/proc/self/stat`.
fn page_size() -> u64 {
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().filter(|p| *p > 0).unwrap_or(4096)
}

/// Parses `/proc/self/stat` (proc(5)): utime and stime (fields 14, 15) in clock ticks,
/// starttime (22) in ticks since boot, vsize (23) in bytes, rss (24) in pages.
fn parse_stat(stat: &str, ticks: f64, page: u64, boot_time: u64) -> Option<ProcessStats> {
    // the command name (field 2) is in parentheses and may hold spaces
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state)
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(ProcessStats {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)? * page,
        open_fds: 0,
        max_fds: None,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = ProcessStats::read() else {
            return Ok(());
        };
        let counter = ConstCounter::new(s.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            counter.metric_type(),
        )?)?;
        let gauges: [(&str, &str, Option<f64>); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                Some(s.resident_bytes as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                Some(s.virtual_bytes as f64),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                Some(s.start_time_seconds),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                Some(s.open_fds as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds.map(|m| m as f64),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                let gauge = ConstGauge::new(value);
                gauge.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    gauge.metric_type(),
                )?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_names_the_commit_of_the_version() {
        let version = env!("TOKENBROKER_VERSION");
        assert_eq!(
            version,
            format!("{} ({COMMIT})", env!("CARGO_PKG_VERSION")),
            "--version and build_info from one source"
        );
        let text = Metrics::new().encode();
        assert!(text.contains(&format!("commit=\"{COMMIT}\"")), "{text}");
    }

    #[test]
    fn the_text_format_names_counter_families_after_their_samples() {
        let om = "# HELP tb_requests Proxied requests.\n# TYPE tb_requests counter\n\
tb_requests_total{route=\"a\"} 1\n# HELP tb_open Open.\n# TYPE tb_open gauge\n# UNIT tb_open x\n\
tb_open 2\n# TYPE tb_odd unknown\ntb_odd 3\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus(om),
            "# HELP tb_requests_total Proxied requests.\n# TYPE tb_requests_total counter\n\
tb_requests_total{route=\"a\"} 1\n# HELP tb_open Open.\n# TYPE tb_open gauge\n\
tb_open 2\n# TYPE tb_odd untyped\ntb_odd 3\n"
        );
    }

    #[test]
    fn accept_picks_openmetrics_only_when_asked_for() {
        for (accept, open) in [
            (None, false),
            (Some("text/plain; version=0.0.4"), false),
            (Some("*/*"), false),
            (Some("application/openmetrics-text; version=1.0.0"), true),
            (
                Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
                true,
            ),
            (Some("Application/OpenMetrics-Text"), true),
            (Some("application/openmetrics-text; q=0, text/plain"), false),
        ] {
            assert_eq!(wants_openmetrics(accept), open, "{accept:?}");
        }
    }

    #[test]
    fn proc_stat_is_parsed_past_a_command_name_with_spaces() {
        // proc(5): pid (comm) state ppid ... utime(14) stime(15) ... starttime(22) vsize(23) rss(24)
        let stat = "4242 (tb (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 \
1000 123456789 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let s = parse_stat(stat, 100.0, 4096, 1_700_000_000).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.virtual_bytes, 123_456_789);
        assert_eq!(s.resident_bytes, 300 * 4096);
        let live = ProcessStats::read().expect("/proc/self is readable");
        assert!(live.resident_bytes > 0 && live.open_fds > 0, "{live:?}");
    }

    /// A set for the tests: one counter.
    struct Probe(Counter);

    impl MetricSet for Probe {
        fn register(registry: &mut Registry) -> Self {
            let counter = Counter::default();
            registry.register("probe", "A test counter", counter.clone());
            Probe(counter)
        }
    }

    #[test]
    fn a_set_is_registered_once_and_shared() {
        let m = Metrics::new();
        let first = m.set::<Probe>();
        let again = m.set::<Probe>();
        assert!(Arc::ptr_eq(&first, &again));
        again.0.inc();
        let text = m.encode();
        assert_eq!(
            text.matches("# TYPE tokenbroker_probe counter").count(),
            1,
            "{text}"
        );
        assert!(text.contains("tokenbroker_probe_total 1"), "{text}");
        // after the families of this module
        assert!(
            text.find("tokenbroker_build_info") < text.find("tokenbroker_probe"),
            "{text}"
        );
    }

    #[test]
    fn records_show_up_in_the_exposition() {
        let m = Metrics::new();
        m.record_fetch("create", "ok");
        let text = m.encode();
        assert!(
            text.contains(r#"tokenbroker_token_fetches_total{kind="create",outcome="ok"} 1"#),
            "{text}"
        );
    }
}
