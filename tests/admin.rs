//! The running process from the operator's side: the admin endpoints (`/healthz`, `/readyz`,
//! `/metrics`, `/tokens`), configuration reload (through the library handle and through a real
//! SIGHUP to `tokenbroker run`), and the `tokenbroker dev` demo. The identity service is the real
//! emulator; the upstream is its echo.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::process::{logged_addr, Process};
use support::{eventually, http, json, sample};
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
            r#"tokenbroker_upstream_rejections_total{outcome="too_young"}"#,
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
