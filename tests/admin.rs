//! The running process from the operator's side: the admin endpoints (`/healthz`, `/readyz`,
//! `/metrics`, `/tokens`), configuration reload (through the library handle and through a real
//! SIGHUP to `tokenbroker run`), and the `tokenbroker dev` demo. The identity service is the real
//! emulator; the upstream is its echo.

#[path = "support/proxy_config.rs"]
mod proxy_config;
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::process::{logged_addr, Process};
use support::{eventually, header, http, json, sample};
use tokenbroker::app::AppHandle;
use tokenbroker::config;
use tokenbroker::emulator::{Emulator, EmulatorConfig, Fault, FaultKind, Operation};
use tokenbroker::secret::Secret;

const CLIENT_SECRET: &str = "emulated-client-secret-value";
const SVC_KEY: &str = "svc-caller-key-0123456789";
const RAW_KEY: &str = "raw-caller-key-0123456789";
const WAIT: Duration = Duration::from_secs(20);

async fn emulator() -> Emulator {
    Emulator::start(EmulatorConfig {
        clients: vec![("admin".to_string(), Secret::new(CLIENT_SECRET))],
        echo_upstream: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        echo_accepts_api_tokens: true,
        ..EmulatorConfig::default()
    })
    .await
    .unwrap()
}

fn hash(key: &str) -> String {
    config::format_key_hash(&config::key_hash(key.as_bytes()))
}

/// A config for the emulator: caller `svc` (access tokens) and `raw` (API tokens injected), one
/// route `/echo`, plus `extra` (e.g. more routes).
fn config_text(emulator: &Emulator, extra: &str) -> String {
    format!(
        r#"
[[listener]]
name = "plain"
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"

[identity]
base_url = "{base}"
client_id = "admin"
client_secret = {{ file = "client-secret" }}

[tokens]
warm_up = true
backoff_initial = "50ms"
backoff_max = "200ms"

[[caller]]
name = "svc"
key_hashes = ["{svc}"]

[[caller]]
name = "raw"
key_hashes = ["{raw}"]
inject = "api_token"

[[route]]
name = "echo"
path_prefix = "/echo"
upstream = "{echo}"
allow = ["svc", "raw"]

[limits]
shutdown_grace = "2s"
{extra}
"#,
        base = emulator.base_url(),
        echo = emulator.echo_url().unwrap(),
        svc = hash(SVC_KEY),
        raw = hash(RAW_KEY),
    )
}

fn added_route(emulator: &Emulator) -> String {
    format!(
        "\n[[route]]\nname = \"added\"\npath_prefix = \"/added\"\nupstream = \"{}\"\nallow = [\"svc\"]\n",
        emulator.echo_url().unwrap()
    )
}

/// A folder with the config file and the client secret it refers to.
fn folder(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("client-secret"),
        format!("{CLIENT_SECRET}\n"),
    )
    .unwrap();
    let path = dir.path().join("tokenbroker.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

async fn start(path: &Path) -> AppHandle {
    let config = config::load(path).unwrap_or_else(|e| panic!("{e}"));
    AppHandle::start(config).await.unwrap()
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http("GET", &format!("http://{addr}{path}"), &[], "").await;
    (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
}

async fn proxied(addr: SocketAddr, path: &str, key: &str) -> (u16, serde_json::Value) {
    let auth = format!("Bearer {key}");
    let (status, _, body) = http(
        "GET",
        &format!("http://{addr}{path}"),
        &[("proxy-authorization", auth.as_str())],
        "",
    )
    .await;
    (status.as_u16(), json(&body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_metrics_and_tokens_without_secrets() {
    let emulator = emulator().await;
    let (_dir, path) = folder(&config_text(&emulator, ""));
    let app = start(&path).await;
    let admin = app.admin_addr().unwrap();
    let proxy = app.proxy_addr("plain").unwrap();

    assert_eq!(get(admin, "/healthz").await, (200, "ok".to_string()));
    assert!(eventually(WAIT, || async { get(admin, "/readyz").await.0 == 200 }).await);
    assert_eq!(get(admin, "/nope").await.0, 404);

    let (status, echo) = proxied(proxy, "/echo/hello", SVC_KEY).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["path"], "/echo/hello");
    assert_eq!(echo["token_kind"], "access_token");
    let (status, echo_raw) = proxied(proxy, "/echo/raw", RAW_KEY).await;
    assert_eq!(status, 200, "{echo_raw}");
    assert_eq!(echo_raw["token_kind"], "api_token");

    let (status, metrics) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &metrics,
            r#"tokenbroker_requests_total{route="echo",caller="svc",status_class="2xx"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    for kind in ["admin_bearer", "create", "exchange"] {
        let series = format!(r#"tokenbroker_token_fetches_total{{kind="{kind}",outcome="ok"}}"#);
        assert!(
            sample(&metrics, &series).unwrap_or(0.0) >= 1.0,
            "{series}: {metrics}"
        );
    }
    for (series, value) in [
        (r#"tokenbroker_identity_service_state{state="closed"}"#, 1.0),
        (r#"tokenbroker_identity_service_state{state="open"}"#, 0.0),
        (
            r#"tokenbroker_token_renewals_total{trigger="upstream_401"}"#,
            0.0,
        ),
        (r#"tokenbroker_token_waits_total{outcome="timeout"}"#, 0.0),
        (
            r#"tokenbroker_upstream_rejections_total{outcome="rate_limited"}"#,
            0.0,
        ),
        (
            r#"tokenbroker_identity_probes_total{outcome="failed"}"#,
            0.0,
        ),
        (
            r#"tokenbroker_token_ladder_steps_total{step="create"}"#,
            0.0,
        ),
    ] {
        assert_eq!(sample(&metrics, series), Some(value), "{series}: {metrics}");
    }
    assert!(
        sample(
            &metrics,
            r#"tokenbroker_token_renewals_total{trigger="request"}"#
        ) >= Some(2.0),
        "{metrics}"
    );
    let expiry = sample(
        &metrics,
        r#"tokenbroker_token_expiry_seconds{caller="svc",kind="access_token"}"#,
    );
    assert!(expiry.is_some_and(|s| s > 0.0), "{metrics}");

    // The real credentials, as the broker injects them.
    let bearer = |caller: &'static str| {
        let broker = app.broker().clone();
        async move {
            let token = broker.token(caller).await.unwrap();
            let value = token.header.to_str().unwrap().to_string();
            value.strip_prefix("Bearer ").unwrap().to_string()
        }
    };
    let access_token = bearer("svc").await;
    let api_token = bearer("raw").await;
    assert!(access_token.ends_with(echo["bearer_suffix"].as_str().unwrap()));
    assert!(api_token.ends_with(echo_raw["bearer_suffix"].as_str().unwrap()));

    let (status, tokens) = get(admin, "/tokens").await;
    assert_eq!(status, 200);
    let page = json(tokens.as_bytes());
    assert_eq!(page["identity_service"]["state"], "closed", "{tokens}");
    assert_eq!(page["identity_service"]["failures"], 0, "{tokens}");
    let list = &page["callers"];
    let svc = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["caller"] == "svc")
        .unwrap_or_else(|| panic!("{tokens}"));
    assert_eq!(svc["state"], "ready", "{tokens}");
    let renewed = svc["last_renewal"].as_str().unwrap_or_default();
    assert!(
        renewed.len() >= 20 && renewed.ends_with('Z') && renewed.contains('T'),
        "last_renewal is an RFC 3339 date: {tokens}"
    );
    assert!(svc["api_token_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    assert!(svc["renewals"]["request"].as_u64() >= Some(1), "{tokens}");
    let raw = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["caller"] == "raw")
        .unwrap();
    let suffix = raw["api_token_suffix"].as_str().unwrap();
    assert!(suffix.len() <= 5 && api_token.ends_with(suffix), "{tokens}");
    for secret in [
        access_token.as_str(),
        api_token.as_str(),
        CLIENT_SECRET,
        SVC_KEY,
        RAW_KEY,
    ] {
        assert!(!tokens.contains(secret), "/tokens shows a secret");
        assert!(!metrics.contains(secret), "/metrics shows a secret");
    }

    app.shutdown().await;
    emulator.shutdown().await;
}

async fn get_accept(addr: SocketAddr, path: &str, accept: &str) -> (String, String) {
    let (status, headers, body) = http(
        "GET",
        &format!("http://{addr}{path}"),
        &[("accept", accept)],
        "",
    )
    .await;
    assert_eq!(status.as_u16(), 200);
    (
        support::header(&headers, "content-type").to_string(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// One series of a parsed Prometheus-text scrape: its value (a counter's or a gauge's).
fn parsed(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use prometheus_parse::Value;
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) => *v,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            other => panic!("{name}: not a counter, gauge or histogram: {other:?}"),
        })
}

/// The families of an OpenMetrics scrape as Python's `prometheus_client.openmetrics.parser`
/// reads them (it raises on anything that is not valid OpenMetrics): `(name, type, samples)` with
/// each sample as `(name, labels, value)`. `None` when the parser is not installed and this is not
/// CI (`.ci/run` installs it; in CI its absence fails the test).
fn openmetrics_families(text: &str) -> Option<serde_json::Value> {
    const SCRIPT: &str = r#"
import json, sys
try:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
except ImportError:
    sys.exit(3)
families = [
    {"name": f.name, "type": f.type,
     "samples": [[s.name, s.labels, s.value] for s in f.samples]}
    for f in text_string_to_metric_families(sys.stdin.read())
]
print(json.dumps(families))
"#;
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.code() == Some(3) {
        assert!(
            std::env::var_os("CI").is_none(),
            "the OpenMetrics parser is missing: pip install prometheus_client"
        );
        eprintln!("prometheus_client (Python) not installed: OpenMetrics parse skipped");
        return None;
    }
    assert!(
        out.status.success(),
        "not valid OpenMetrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_as_openmetrics() {
    let emulator = emulator().await;
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    let tls_listener = format!(
        "\n[[listener]]\nname = \"tls\"\naddress = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        certs.join("server.pem").display(),
        certs.join("server.key").display()
    );
    let (_dir, path) = folder(&config_text(&emulator, &tls_listener));
    let app = start(&path).await;
    let admin = app.admin_addr().unwrap();
    let proxy = app.proxy_addr("plain").unwrap();
    let tls = app.proxy_addr("tls").unwrap();
    assert!(eventually(WAIT, || async { get(admin, "/readyz").await.0 == 200 }).await);

    assert_eq!(proxied(proxy, "/echo/a", SVC_KEY).await.0, 200);
    let (status, body) = proxied(proxy, "/echo/a", "not-a-key").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unknown_caller"))
    );
    assert_eq!(proxied(proxy, "/nowhere", SVC_KEY).await.0, 404);
    // plain HTTP on the TLS listener: a failed handshake
    let answer = support::raw(tls, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(!answer.starts_with("HTTP/1.1 2"), "{answer}");

    let text_accept = "text/plain; version=0.0.4";
    let (content_type, text) = get_accept(admin, "/metrics", text_accept).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"), "{text}");
    let (default_type, _) = get_accept(admin, "/metrics", "*/*").await;
    assert_eq!(default_type, content_type);

    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    for s in &scrape.samples {
        if s.metric.ends_with("_total") {
            assert!(
                matches!(s.value, prometheus_parse::Value::Counter(_)),
                "{} is not typed as a counter: {text}",
                s.metric
            );
        }
    }
    let version = env!("CARGO_PKG_VERSION");
    for (name, labels, expected) in [
        (
            "tokenbroker_build_info",
            vec![
                ("version", version),
                ("commit", tokenbroker::metrics::COMMIT),
            ],
            Some(1.0),
        ),
        (
            "tokenbroker_requests_total",
            vec![
                ("route", "echo"),
                ("caller", "svc"),
                ("status_class", "2xx"),
            ],
            Some(1.0),
        ),
        (
            "tokenbroker_errors_total",
            vec![("error", "unknown_caller")],
            Some(1.0),
        ),
        (
            "tokenbroker_errors_total",
            vec![("error", "no_route")],
            Some(1.0),
        ),
        (
            "tokenbroker_errors_total",
            vec![("error", "token_unavailable")],
            Some(0.0),
        ),
        (
            "tokenbroker_errors_total",
            vec![("error", "upstream_timeout")],
            Some(0.0),
        ),
        (
            "tokenbroker_tls_handshake_failures_total",
            vec![("listener", "tls"), ("reason", "protocol_error")],
            Some(1.0),
        ),
        (
            "tokenbroker_tls_handshake_failures_total",
            vec![("listener", "tls"), ("reason", "timeout")],
            Some(0.0),
        ),
        (
            "tokenbroker_config_reloads_total",
            vec![("outcome", "ok")],
            Some(0.0),
        ),
        (
            "tokenbroker_config_reloads_total",
            vec![("outcome", "rejected")],
            Some(0.0),
        ),
        (
            "tokenbroker_token_fetches_total",
            vec![("kind", "regenerate"), ("outcome", "transient")],
            Some(0.0),
        ),
        (
            "tokenbroker_identity_call_duration_seconds",
            vec![("operation", "regenerate"), ("outcome", "ok")],
            Some(0.0),
        ),
    ] {
        assert_eq!(
            parsed(&scrape, name, &labels),
            expected,
            "{name}{labels:?}: {text}"
        );
    }
    let build_info = (
        "tokenbroker_build_info",
        vec![
            ("version", version),
            ("commit", tokenbroker::metrics::COMMIT),
        ],
    );
    assert_eq!(parsed(&scrape, build_info.0, &build_info.1), Some(1.0));
    for operation in ["client_credentials", "create", "exchange"] {
        let calls = parsed(
            &scrape,
            "tokenbroker_identity_call_duration_seconds",
            &[("operation", operation), ("outcome", "ok")],
        );
        assert!(calls >= Some(1.0), "{operation}: {calls:?}: {text}");
    }
    let process = |name| parsed(&scrape, name, &[]).unwrap_or_else(|| panic!("{name}: {text}"));
    assert!(process("process_cpu_seconds_total") >= 0.0);
    assert!(process("process_resident_memory_bytes") > 1e6);
    assert!(process("process_open_fds") >= 3.0);
    let started = process("process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "{started} vs {now}"
    );

    let (content_type, open) = get_accept(
        admin,
        "/metrics",
        "application/openmetrics-text; version=1.0.0",
    )
    .await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(open.ends_with("# EOF\n"), "{open}");
    if let Some(families) = openmetrics_families(&open) {
        let family = |name: &str| {
            families
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["name"] == name)
                .unwrap_or_else(|| panic!("no family {name}: {families}"))
                .clone()
        };
        let sample = |family: &serde_json::Value, name: &str, labels: serde_json::Value| {
            family["samples"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s[0] == name && s[1] == labels)
                .map(|s| s[2].as_f64().unwrap())
        };
        let errors = family("tokenbroker_errors");
        assert_eq!(errors["type"], "counter");
        assert_eq!(
            sample(
                &errors,
                "tokenbroker_errors_total",
                serde_json::json!({"error": "unknown_caller"})
            ),
            Some(1.0)
        );
        let build = family("tokenbroker_build_info");
        assert_eq!(build["type"], "gauge");
        assert_eq!(
            sample(
                &build,
                "tokenbroker_build_info",
                serde_json::json!({"version": version, "commit": tokenbroker::metrics::COMMIT})
            ),
            Some(1.0)
        );
        let reloads = family("tokenbroker_config_reloads");
        assert_eq!(
            sample(
                &reloads,
                "tokenbroker_config_reloads_total",
                serde_json::json!({"outcome": "rejected"})
            ),
            Some(0.0)
        );
        let handshakes = family("tokenbroker_tls_handshake_failures");
        assert_eq!(
            sample(
                &handshakes,
                "tokenbroker_tls_handshake_failures_total",
                serde_json::json!({"listener": "tls", "reason": "protocol_error"})
            ),
            Some(1.0)
        );
        let calls = family("tokenbroker_identity_call_duration_seconds");
        assert_eq!(calls["type"], "histogram");
        let exchanges = sample(
            &calls,
            "tokenbroker_identity_call_duration_seconds_count",
            serde_json::json!({"operation": "exchange", "outcome": "ok"}),
        );
        assert!(exchanges >= Some(1.0), "{calls}");
        assert_eq!(family("process_cpu_seconds")["type"], "counter");
        assert_eq!(family("process_open_fds")["type"], "gauge");
        assert!(
            sample(
                &family("process_resident_memory_bytes"),
                "process_resident_memory_bytes",
                serde_json::json!({})
            ) > Some(1e6)
        );
    }

    app.shutdown().await;
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_token_warm_up() {
    let emulator = emulator().await;
    emulator.inject_fault(Fault {
        kind: FaultKind::ServerError,
        operations: vec![Operation::ClientCredentials],
        requests: None,
        seconds: None,
    });
    let (_dir, path) = folder(&config_text(&emulator, ""));
    let app = start(&path).await;
    let admin = app.admin_addr().unwrap();

    assert_eq!(get(admin, "/healthz").await.0, 200);
    let (status, body) = get(admin, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("warming up"), "{body}");

    emulator.clear_faults();
    assert!(eventually(WAIT, || async { get(admin, "/readyz").await.0 == 200 }).await);
    app.shutdown().await;
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_good_config_and_refuses_a_bad_one() {
    let emulator = emulator().await;
    let (_dir, path) = folder(&config_text(&emulator, ""));
    let app = start(&path).await;
    let proxy = app.proxy_addr("plain").unwrap();
    let admin = app.admin_addr().unwrap();

    let (status, body) = proxied(proxy, "/added/x", SVC_KEY).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("no_route")));

    std::fs::write(&path, config_text(&emulator, &added_route(&emulator))).unwrap();
    app.reload().unwrap();
    let (status, body) = proxied(proxy, "/added/x", SVC_KEY).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.config().routes.len(), 2);

    // Bad: an unknown key and a bad URL, and without the added route. Refused as a whole: the
    // running config, added route included, keeps serving.
    let bad = config_text(
        &emulator,
        "\n[[route]]\nname = \"x\"\nupstream = \"nope\"\nallow = [\"svc\"]\ncolour = \"red\"\n",
    );
    std::fs::write(&path, bad).unwrap();
    let errors = app.reload().unwrap_err();
    let text = errors.to_string();
    assert!(text.contains("route[1].upstream"), "{text}");
    assert!(text.contains("route[1].colour: unknown key"), "{text}");
    let (status, body) = proxied(proxy, "/added/x", SVC_KEY).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(app.config().routes.len(), 2);

    let (_, metrics) = get(admin, "/metrics").await;
    let ok = sample(
        &metrics,
        r#"tokenbroker_config_reloads_total{outcome="ok"}"#,
    );
    let rejected = sample(
        &metrics,
        r#"tokenbroker_config_reloads_total{outcome="rejected"}"#,
    );
    assert_eq!((ok, rejected), (Some(1.0), Some(1.0)), "{metrics}");

    app.shutdown().await;
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_running_process() {
    let emulator = emulator().await;
    let (_dir, path) = folder(&config_text(&emulator, ""));
    let run = Process::spawn(&["run", "--log-json", "--config", path.to_str().unwrap()]);
    let proxy = run.wait_for(|l| logged_addr(l, "proxy listening"));
    let admin =
        run.wait_for(|l| logged_addr(l, "admin listening (/healthz /readyz /metrics /tokens)"));
    assert!(eventually(WAIT, || async { get(admin, "/readyz").await.0 == 200 }).await);
    assert_eq!(proxied(proxy, "/added/x", SVC_KEY).await.0, 404);
    // the request line, as JSON with its fields at the top level
    let line = run.wait_for(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["message"] == "request").then_some(v)
    });
    assert_eq!(line["target"], "tokenbroker::request", "{line}");
    assert_eq!(line["path"], "/added/x", "{line}");
    assert_eq!(line["listener"], "plain", "{line}");
    assert_eq!(line["status"], 404, "{line}");
    assert_eq!(line["error"], "no_route", "{line}");
    assert_eq!(line["level"], "INFO", "{line}");

    std::fs::write(&path, config_text(&emulator, &added_route(&emulator))).unwrap();
    run.signal(libc::SIGHUP);
    assert!(
        eventually(WAIT, || async {
            proxied(proxy, "/added/x", SVC_KEY).await.0 == 200
        })
        .await
    );
    let (_, metrics) = get(admin, "/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            r#"tokenbroker_config_reloads_total{outcome="ok"}"#
        ),
        Some(1.0)
    );

    assert_eq!(run.stop(), Some(0));
    emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_demo_answers_the_printed_curl_line() {
    let dev = Process::spawn(&["dev", "--ephemeral-ports"]);
    let (url, key) = dev.wait_for(|line| {
        let rest = line
            .trim()
            .strip_prefix("curl -s -H 'Proxy-Authorization: Bearer ")?;
        let (key, url) = rest.split_once("' ")?;
        Some((url.to_string(), key.to_string()))
    });
    assert_eq!(key, tokenbroker::dev::DEMO_KEY);
    let auth = format!("Bearer {key}");
    let (status, _, body) = http("GET", &url, &[("proxy-authorization", auth.as_str())], "").await;
    let echo = json(&body);
    assert_eq!(status.as_u16(), 200, "{echo}");
    assert_eq!(echo["path"], "/hello");
    assert_eq!(echo["token_kind"], "access_token");
    assert_eq!(echo["caller"]["token_display_name"], "tokenbroker-dev-demo");
    assert_eq!(echo["bearer_suffix"].as_str().map(str::len), Some(5));
    assert_eq!(dev.stop(), Some(0));
}

/// With `[admin] key_hashes`, `/tokens` needs one of the keys, from loopback too (401 with
/// `WWW-Authenticate: Bearer` otherwise); probes and metrics stay open; a reload that drops the
/// keys opens `/tokens` to loopback again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_need_an_admin_key_once_keys_are_configured() {
    const ADMIN_KEY: &str = "admin-key-for-tokens-0123456789";
    let emulator = emulator().await;
    let plain = config_text(&emulator, "");
    let keyed = plain.replace(
        "[admin]\naddress = \"127.0.0.1:0\"\n",
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\nkey_hashes = [\"{}\"]\n",
            hash(ADMIN_KEY)
        ),
    );
    assert_ne!(keyed, plain);
    let (_dir, path) = folder(&keyed);
    let app = start(&path).await;
    let admin = app.admin_addr().unwrap();
    let tokens = |auth: Option<String>| async move {
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let (status, headers, body) =
            http("GET", &format!("http://{admin}/tokens"), &headers, "").await;
        let challenge = header(&headers, "www-authenticate").to_string();
        (
            status.as_u16(),
            challenge,
            String::from_utf8_lossy(&body).into_owned(),
        )
    };

    let (status, challenge, body) = tokens(None).await;
    assert_eq!((status, challenge.as_str()), (401, "Bearer"), "{body}");
    assert!(!body.contains("svc"), "no caller is named: {body}");
    let wrong = tokens(Some("Bearer not-the-key".into())).await;
    assert_eq!(wrong.0, 401);
    let (status, _, body) = tokens(Some(format!("Bearer {ADMIN_KEY}"))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"caller\": \"svc\""), "{body}");
    for open in ["/healthz", "/metrics"] {
        assert_eq!(get(admin, open).await.0, 200, "{open}");
    }

    std::fs::write(&path, &plain).unwrap();
    app.reload().unwrap();
    assert_eq!(tokens(None).await.0, 200, "loopback, no key configured");

    app.shutdown().await;
    emulator.shutdown().await;
}

/// `GET <path>` over TLS to the admin listener, with the dev client certificate `cert`
/// (`certs/<cert>.pem`) if given: the status, or the transport error.
async fn tls_get(
    addr: SocketAddr,
    path: &str,
    cert: Option<&str>,
) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = proxy_config::try_tls_connect(addr, cert).await?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, tls.read_to_end(&mut answer)).await;
    read.map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3)?.parse().ok())
        .ok_or_else(|| format!("no status line: {text}"))?;
    Ok((status, text))
}

/// With `[admin] tls` and `cert_identities`, the admin listener speaks TLS only; probes and
/// scrapers need no certificate, `/tokens` needs one with a listed identity (or a key); a
/// certificate from another CA is refused in the handshake; a reload changes who may read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_answer_an_admin_client_certificate_over_tls() {
    let emulator = emulator().await;
    let certs = proxy_config::certs();
    let plain = config_text(&emulator, "");
    let with_tls = |identity: &str| {
        plain.replace(
            "[admin]\naddress = \"127.0.0.1:0\"\n",
            &format!(
                "[admin]\naddress = \"127.0.0.1:0\"\ncert_identities = [\"{identity}\"]\n\
                 tls = {{ cert = \"{cert}\", key = \"{key}\", client_ca = \"{ca}\" }}\n",
                cert = certs.join("server.pem").display(),
                key = certs.join("server.key").display(),
                ca = certs.join("ca.pem").display(),
            ),
        )
    };
    let (_dir, path) = folder(&with_tls("uri:spiffe://tokenbroker.dev/demo"));
    let app = start(&path).await;
    let admin = app.admin_addr().unwrap();

    for open in ["/healthz", "/readyz", "/metrics"] {
        let (status, text) = tls_get(admin, open, None).await.unwrap();
        assert_eq!(status, 200, "{open}: {text}");
    }
    let (_, metrics) = tls_get(admin, "/metrics", None).await.unwrap();
    assert!(
        metrics
            .contains("tokenbroker_tls_certificate_expiry_timestamp_seconds{listener=\"admin\"}"),
        "{metrics}"
    );
    let (status, text) = tls_get(admin, "/tokens", None).await.unwrap();
    assert_eq!(status, 401, "no certificate: {text}");
    assert!(!text.contains("\"caller\""), "{text}");
    let (status, text) = tls_get(admin, "/tokens", Some("client")).await.unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"caller\": \"svc\""), "{text}");
    // signed by another CA: the handshake fails, nothing is answered
    assert!(tls_get(admin, "/tokens", Some("untrusted-client"))
        .await
        .is_err());
    // plain HTTP on the TLS port gets no answer
    assert!(
        support::try_http("GET", &format!("http://{admin}/healthz"), &[], "")
            .await
            .is_err()
    );

    std::fs::write(&path, with_tls("dns:someone-else.example")).unwrap();
    app.reload().unwrap();
    let (status, _) = tls_get(admin, "/tokens", Some("client")).await.unwrap();
    assert_eq!(status, 401, "the identity is no longer listed");

    app.shutdown().await;
    emulator.shutdown().await;
}

/// A reload keeps what only a restart changes: the state file stays where it was (it is written
/// there at shutdown, not at the new path), and so do its seal keys with the rest of `[store]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_state_file_and_store_until_a_restart() {
    let emulator = emulator().await;
    let with = |state: &str, seal: u8| {
        config_text(
            &emulator,
            &format!("\n[store]\nseal_key = {{ file = \"seal-{seal}.key\" }}\n"),
        )
        .replace(
            "warm_up = true\n",
            &format!("warm_up = true\nstate_file = \"{state}\"\n"),
        )
    };
    let (dir, path) = folder(&with("first.json", 1));
    for n in [1, 2] {
        let key = tokenbroker::seal::SealKey::generate();
        std::fs::write(dir.path().join(format!("seal-{n}.key")), &*key.to_base64()).unwrap();
    }
    let app = start(&path).await;
    let first = app.config();
    assert!(eventually(WAIT, || async { app.broker().is_ready() }).await);

    std::fs::write(&path, with("second.json", 2)).unwrap();
    app.reload().unwrap();
    let now = app.config();
    assert_eq!(now.tokens.state_file, first.tokens.state_file);
    let ids = |c: &config::Config| c.store.seal_keys.as_ref().map(|k| k.ids().join(","));
    assert_eq!(ids(&now), ids(&first), "the running seal key stays");
    assert_eq!(
        now.tokens
            .state_file_seal_keys
            .as_ref()
            .map(|k| k.ids().join(",")),
        ids(&first),
        "and seals the state file"
    );

    app.shutdown().await;
    assert!(
        dir.path().join("first.json").is_file(),
        "written where it was"
    );
    assert!(!dir.path().join("second.json").exists());
    // It opens with the first key: a restart with the first config reads it.
    let again = start(&path_with(&dir, &with("first.json", 1))).await;
    assert!(eventually(WAIT, || async { again.broker().is_ready() }).await);
    assert_eq!(
        emulator.counters().create,
        2,
        "one API token per caller, read back"
    );
    again.shutdown().await;
    emulator.shutdown().await;
}

/// Writes `text` as the config file in `dir` (beside its secret files).
fn path_with(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("tokenbroker.toml");
    std::fs::write(&path, text).unwrap();
    path
}
