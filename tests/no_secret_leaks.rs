//! Runs the whole token lifecycle with every log at `trace` captured, and checks that no secret
//! (client secret, API token, access token, admin bearer) appears anywhere in the output.
//! Its own test binary, so that the global subscriber sees every thread.

mod support;

use std::time::Duration;

use support::logs::LogCapture;
use tracing_subscriber::util::SubscriberInitExt;

use tokenbroker::broker::Broker;
use tokenbroker::config::{CallerConfig, Config, InjectMode, TokenPolicy};
use tokenbroker::emulator::{Emulator, EmulatorConfig, Fault, FaultKind, Operation};
use tokenbroker::metrics::Metrics;
use tokenbroker::secret::Secret;
use tokenbroker::token::Rejection;

const CLIENT_SECRET: &str = "Client-Secret-That-Must-Never-Be-Logged-42";

fn caller(name: &str, inject: InjectMode, uses: Option<i32>) -> CallerConfig {
    CallerConfig {
        name: name.into(),
        client_id: None,
        key_hashes: vec![[1; 32]],
        cert_identities: vec![],
        inject: Some(inject),
        max_count_of_uses: uses,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_trace_logs() {
    let capture = LogCapture::default();
    capture.subscriber().init();

    let emu = Emulator::start(EmulatorConfig {
        clients: vec![("admin".into(), Secret::new(CLIENT_SECRET))],
        seconds_per_minute: 1.0,
        echo_upstream: Some("127.0.0.1:0".parse().unwrap()),
        ..EmulatorConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let mut identity = emu.identity_config("admin", &Secret::new(CLIENT_SECRET));
    identity.scope = Some("admin".into());
    let config = Config {
        tokens: TokenPolicy {
            api_token_ttl_minutes: 4,
            access_token_ttl_minutes: 2,
            state_file: Some(state.clone()),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(500),
            min_renew_interval: Duration::from_millis(1),
            ..TokenPolicy::default()
        },
        callers: vec![
            caller("plain", InjectMode::AccessToken, None),
            caller("once", InjectMode::AccessToken, Some(1)),
            caller("raw", InjectMode::ApiToken, None),
        ],
        ..Config::minimal(identity)
    };
    let broker = Broker::start(&config, Metrics::new()).await.unwrap();
    let mut headers = Vec::new();
    for name in ["plain", "once", "raw"] {
        let t = broker.token(name).await.unwrap();
        headers.push(t.header.to_str().unwrap().to_string());
        let Rejection::Replay(renewed) = broker.rejected(name, t.generation).await.unwrap() else {
            panic!("a 401 renews the token");
        };
        headers.push(renewed.header.to_str().unwrap().to_string());
    }
    // failures with server bodies, a refused regenerate, refresh through a few lifetimes
    emu.inject_fault(Fault {
        kind: FaultKind::Garbage,
        operations: vec![Operation::Exchange],
        requests: Some(2),
        seconds: None,
    });
    let id = broker.status().callers[0].api_token_id.clone().unwrap();
    emu.revoke_api_token(&id);
    support::wait_until(
        Duration::from_secs(30),
        "refreshed past the faults",
        || async {
            let status = broker.status();
            let scheduled = |i: usize| {
                status.callers[i]
                    .renewals
                    .get("schedule")
                    .copied()
                    .unwrap_or(0)
            };
            emu.active_faults().is_empty()
                && status.callers[0].api_token_id.as_ref() != Some(&id)
                && scheduled(0) >= 2
                && (1..status.callers.len()).all(|i| scheduled(i) >= 1)
        },
    )
    .await;
    for name in ["plain", "once", "raw"] {
        let t = broker.token(name).await.unwrap();
        headers.push(t.header.to_str().unwrap().to_string());
    }
    // a broker with a wrong client secret reports the failure
    let mut wrong = config.clone();
    wrong.identity.client_secret = Secret::new("Wrong-Secret-Also-Never-Logged-77");
    wrong.tokens.state_file = None;
    let failing = Broker::start(&wrong, Metrics::new()).await.unwrap();
    let err = failing.token("plain").await.unwrap_err();
    broker.shutdown().await;

    let stored = std::fs::read_to_string(&state).unwrap();
    let logs = capture.text();
    assert!(logs.contains("API token created"), "logs were captured");
    assert!(
        logs.len() > 10_000,
        "trace level was on ({} bytes)",
        logs.len()
    );

    let mut secrets: Vec<String> = vec![
        CLIENT_SECRET.into(),
        "Wrong-Secret-Also-Never-Logged-77".into(),
    ];
    secrets.extend(
        headers
            .iter()
            .map(|h| h.trim_start_matches("Bearer ").to_string()),
    );
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "a secret leaked into the logs");
        assert!(!err.to_string().contains(s.as_str()));
    }
    assert!(stored.contains("vidb_"), "state file holds the API tokens");
    // no API token and no JWT-shaped access token or admin bearer at all, whichever it was
    assert!(!logs.contains("vidb_"), "an API token leaked into the logs");
    assert!(
        !logs.contains("eyJ"),
        "an access token or admin bearer leaked into the logs"
    );
    assert!(!format!("{:?}", broker.status()).contains("vidb_"));
}
