//! The process's Prometheus registry: one [`Metrics`] per process, shared by the proxy, the
//! broker, the store, the app and the admin listener. It holds what belongs to no subsystem
//! (`build_info`, `telemetry_export_failures`, the `process_*` metrics) and a way for each
//! subsystem to register its own families once: a [`MetricSet`], got with [`Metrics::set`]
//! (each subsystem's set is in its own `metrics` module; this one knows none of them).
//! Labels carry names only (route, caller, kind, outcome, error code), never a token or a key.
//!
//! Two expositions of the same registry: OpenMetrics 1.0 ([`Metrics::encode_openmetrics`],
//! what prometheus-client writes) and the Prometheus text format 0.0.4
//! ([`Metrics::encode_prometheus`], converted from it: in 0.0.4 a counter family is named after its
//! `_total` sample, there is no `# UNIT` and no `# EOF`). The `process_*` metrics are read from
//! `/proc/self` at each scrape. Families appear in the order their sets were registered.
//!
//! Every family whose label values are known in advance has all its series from the start, at 0.
//!
//! Must never: be locked on the request path (a subsystem gets its set once, when it is built,
//! and records through it), or name a layer above it.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// The prefix of every family but the `process_*` ones.
const PREFIX: &str = "tokenbroker";

/// A route or caller name as a label value, shared with the config: recording a request clones
/// two `Arc`s instead of allocating strings.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

/// The label of the families counted by outcome alone (several subsystems have one).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub commit: &'static str,
}

/// The commit this binary was built from, as `--version` names it (both from `build.rs`).
pub const COMMIT: &str = env!("TOKENBROKER_COMMIT");

/// A subsystem's families, registered together once per [`Metrics`] (see [`Metrics::set`]).
pub trait MetricSet: Send + Sync + 'static {
    /// Registers the families in `registry` (its names get the `tokenbroker_` prefix) and puts
    /// every series known in advance at 0.
    fn register(registry: &mut Registry) -> Self;
}

/// The registry every metric of the process is in.
pub struct Metrics {
    inner: Mutex<Registered>,
}

struct Registered {
    /// The root: the process collector, then one `tokenbroker` sub-registry for this module's
    /// own families and one per set, in the order they were registered.
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
    /// A registry with the process metrics, `build_info` and `telemetry_export_failures`; the
    /// subsystems add their sets.
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
        registry.register(
            "telemetry_export_failures",
            "Span exports that failed (collector unreachable or answering an error): their spans are dropped",
            crate::telemetry::export_failures(),
        );
        Arc::new(Metrics {
            inner: Mutex::new(Registered {
                registry: root,
                sets: HashMap::new(),
            }),
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
        // A set whose registration panicked left at most some of its families registered,
        // which encode as they are.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
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
    struct Probe(prometheus_client::metrics::counter::Counter);

    impl MetricSet for Probe {
        fn register(registry: &mut Registry) -> Self {
            let counter = prometheus_client::metrics::counter::Counter::default();
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
}
