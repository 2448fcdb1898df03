//! The token lifecycle against the real emulator over real sockets, with TTLs shortened by
//! `seconds_per_minute`: the broker speaks the real protocol and its tokens are accepted by the
//! emulator's echo upstream. Checks behaviour and call counts, never speed. The timing rules
//! themselves (breaker, waits, 401 rate limit) are tested on paused time in `broker.rs`.

mod support;

use support::broker::caller;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenbroker::broker::{Broker, CallerStatus};
use tokenbroker::config::{CallerConfig, Config, InjectMode, TokenPolicy};
use tokenbroker::emulator::{Emulator, EmulatorConfig, Fault, FaultKind, Operation};
use tokenbroker::metrics::Metrics;
use tokenbroker::secret::Secret;
use tokenbroker::token::{InjectToken, Rejection, TokenResult};

const ADMIN_SECRET: &str = "admin-secret-for-broker-tests";

async fn emulator(seconds_per_minute: f64) -> Emulator {
    Emulator::start(EmulatorConfig {
        clients: vec![("admin".into(), Secret::new(ADMIN_SECRET))],
        seconds_per_minute,
        echo_upstream: Some("127.0.0.1:0".parse().unwrap()),
        echo_accepts_api_tokens: true,
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator starts")
}

fn config(emu: &Emulator, callers: Vec<CallerConfig>, tokens: TokenPolicy) -> Config {
    let mut identity = emu.identity_config("admin", &Secret::new(ADMIN_SECRET));
    identity.scope = Some("admin".into());
    Config {
        tokens,
        callers,
        ..Config::minimal(identity)
    }
}

/// Short lifetimes for tests: with one second per minute, `access_minutes` seconds of access
/// token life.
fn policy(api_minutes: i64, access_minutes: i64) -> TokenPolicy {
    TokenPolicy {
        api_token_ttl_minutes: api_minutes,
        access_token_ttl_minutes: access_minutes,
        expiry_skew: Duration::from_millis(500),
        min_margin: Duration::from_millis(500),
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(1),
        min_renew_interval: Duration::ZERO,
        ..TokenPolicy::default()
    }
}

/// The first caller's status.
fn first(broker: &Broker) -> CallerStatus {
    broker.status().callers[0].clone()
}

/// Reports an upstream 401 for `token` (no `min_renew_interval` here: the caller may always
/// renew on a 401); the token to replay.
async fn refuse(broker: &Broker, token: &InjectToken) -> Arc<InjectToken> {
    match broker.rejected("billing", token.generation).await {
        Ok(Rejection::Replay(renewed)) => renewed,
        other => panic!("expected a renewed token, got {other:?}"),
    }
}

async fn start(cfg: &Config) -> Arc<Broker> {
    Broker::start(cfg, Metrics::new())
        .await
        .expect("broker starts")
}

/// Presents the token to the emulator's echo upstream: true when it is accepted as live.
async fn accepted_upstream(emu: &Emulator, result: &TokenResult) -> bool {
    let Ok(token) = result else { return false };
    let addr = emu.echo_addr().expect("echo upstream");
    let header = token.header.to_str().expect("ASCII header");
    let (status, _, _) = support::http(
        "GET",
        &format!("http://{addr}/check"),
        &[("authorization", header)],
        "",
    )
    .await;
    status == http::StatusCode::OK
}

/// The tests' policy with a state file `state.json` in `dir`; its path.
fn with_state_file(dir: &tempfile::TempDir) -> (TokenPolicy, std::path::PathBuf) {
    let path = dir.path().join("state.json");
    let mut tokens = policy(60, 30);
    tokens.state_file = Some(path.clone());
    (tokens, path)
}

/// The files in `dir` that a damaged state file was set aside as.
fn set_aside(dir: &tempfile::TempDir) -> Vec<String> {
    std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("state.json.damaged-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_first_requests_cause_one_fetch_of_each_kind() {
    let emu = emulator(60.0).await;
    let broker = start(&config(&emu, vec![caller("billing")], policy(60, 30))).await;
    let generations = support::broker::concurrent_generations(&broker, "billing", 1000).await;
    assert_eq!(generations.len(), 1, "every request got the same token");
    let c = emu.counters();
    assert_eq!(
        (c.client_credentials, c.create, c.exchange),
        (1, 1, 1),
        "{c:?}"
    );
    let status = first(&broker);
    assert_eq!(status.state, "ready");
    assert_eq!(status.fetches.get("create_ok"), Some(&1));
    assert_eq!(status.fetches.get("exchange_ok"), Some(&1));
    assert!(status.waited_requests >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_cold_callers_cause_exactly_hundred_creates() {
    let emu = emulator(60.0).await;
    let callers = (0..100).map(|i| caller(&format!("svc{i}"))).collect();
    let broker = start(&config(&emu, callers, policy(60, 30))).await;
    let tasks: Vec<_> = (0..100)
        .flat_map(|i| (0..10).map(move |_| i))
        .map(|i| {
            let b = Arc::clone(&broker);
            tokio::spawn(async move { b.token(&format!("svc{i}")).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("token");
    }
    let c = emu.counters();
    assert_eq!(
        (c.client_credentials, c.create, c.exchange),
        (1, 100, 100),
        "{c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_traffic_over_ten_lifetimes_never_sees_an_expired_token() {
    // one second per minute: access tokens live 2 s, API tokens 6 s
    let emu = emulator(1.0).await;
    let broker = start(&config(&emu, vec![caller("billing")], policy(6, 2))).await;
    let started = Instant::now();
    let until = started + Duration::from_secs(20);
    let mut requests = 0;
    let mut pace = support::pace(Duration::from_millis(100));
    while Instant::now() < until {
        pace.tick().await;
        let result = broker.token("billing").await;
        assert!(result.is_ok(), "request {requests} got {result:?}");
        assert!(
            accepted_upstream(&emu, &result).await,
            "request {requests}: token refused upstream"
        );
        requests += 1;
    }
    let c = emu.counters();
    assert_eq!(
        c.create, 1,
        "the API token is regenerated, never re-created: {c:?}"
    );
    assert!(
        c.regenerate >= 2,
        "API token renewed ahead of its expiry: {c:?}"
    );
    assert!(
        c.exchange >= 10,
        "access token renewed every lifetime: {c:?}"
    );
    // and not more often: at most one exchange per 70 % of the 2 s lifetime, and one after each
    // regenerate
    let periods = (started.elapsed().as_secs_f64() / (0.7 * 2.0)).ceil() as u64 + 1;
    assert!(
        c.exchange <= periods + c.regenerate,
        "one exchange per lifetime: {c:?}"
    );
    assert_eq!(c.echo_rejected, 0);
    let status = first(&broker);
    assert_eq!(status.state, "ready");
    assert!(
        status.waited_requests <= 1,
        "renewals happened off the request path: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_outage_fails_no_request() {
    let emu = emulator(1.0).await;
    let broker = start(&config(&emu, vec![caller("billing")], policy(60, 4))).await;
    broker.token("billing").await.expect("first token");
    emu.inject_fault(Fault {
        kind: FaultKind::Refuse,
        operations: vec![],
        requests: None,
        seconds: Some(1.5),
    });
    let until = Instant::now() + Duration::from_secs(6);
    let mut pace = support::pace(Duration::from_millis(100));
    while Instant::now() < until {
        pace.tick().await;
        let result = broker.token("billing").await;
        assert!(accepted_upstream(&emu, &result).await, "{result:?}");
    }
    assert!(emu.counters().exchange >= 2, "renewed after the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_outage_gives_503_material_then_recovers_with_bounded_attempts() {
    let emu = emulator(1.0).await;
    let broker = start(&config(&emu, vec![caller("billing")], policy(60, 2))).await;
    broker.token("billing").await.expect("first token");
    let before = emu.counters();
    emu.inject_fault(Fault {
        kind: FaultKind::ServerError,
        operations: vec![Operation::Exchange],
        requests: None,
        seconds: None,
    });
    // hammer the broker for 6 s: the token expires after ~1.5 s
    let started = Instant::now();
    let mut unavailable = 0;
    let mut pace = support::pace(Duration::from_millis(50));
    while started.elapsed() < Duration::from_secs(6) {
        pace.tick().await;
        let batch: Vec<_> = (0..20)
            .map(|_| {
                let b = Arc::clone(&broker);
                tokio::spawn(async move { b.token("billing").await })
            })
            .collect();
        for t in batch {
            match t.await.unwrap() {
                Ok(_) => {}
                Err(e) => {
                    unavailable += 1;
                    assert!(e.retry_after >= Duration::from_secs(1));
                    assert!(e.reason.contains("500"), "{}", e.reason);
                }
            }
        }
    }
    assert!(
        unavailable > 0,
        "requests get token_unavailable once the token expired"
    );
    let attempts = emu.counters().exchange - before.exchange;
    // backoff 0.2 s doubling to a 1 s cap over ~6 s: at most ~9 steps, whatever the load
    assert!(
        (2..=10).contains(&attempts),
        "{attempts} exchange attempts during the outage"
    );
    assert_eq!(first(&broker).state, "unavailable");
    emu.clear_faults();
    // recovers by itself within the backoff cap (1 s) plus one attempt
    support::wait_until(
        Duration::from_secs(4),
        "recovered after the outage",
        || async { broker.token("billing").await.is_ok() },
    )
    .await;
    assert_eq!(emu.counters().create, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_upstream_401s_cause_one_renewal() {
    let emu = emulator(60.0).await;
    let broker = start(&config(&emu, vec![caller("billing")], policy(60, 30))).await;
    let first = broker.token("billing").await.unwrap();
    let before = emu.counters().exchange;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let b = Arc::clone(&broker);
            let g = first.generation;
            tokio::spawn(async move { b.rejected("billing", g).await })
        })
        .collect();
    let mut generations = std::collections::HashSet::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Rejection::Replay(token) => generations.insert(token.generation),
            Rejection::PassOn => panic!("a 401 for the current token renews it"),
        };
    }
    assert_eq!(emu.counters().exchange - before, 1, "one renewal");
    assert_eq!(generations.len(), 1);
    assert!(!generations.contains(&first.generation));
    // a late 401 for the old generation changes nothing: it replays with the new token
    assert!(matches!(
        broker.rejected("billing", first.generation).await.unwrap(),
        Rejection::Replay(t) if generations.contains(&t.generation)
    ));
    assert_eq!(emu.counters().exchange - before, 1);
}

fn first_status_id(broker: &Broker) -> String {
    first(broker).api_token_id.expect("an API token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_regenerate_leads_to_exactly_one_create() {
    let emu = emulator(60.0).await;
    let broker = start(&config(&emu, vec![caller("billing")], policy(60, 30))).await;
    let first = broker.token("billing").await.unwrap();
    let id = first_status_id(&broker);
    assert!(emu.revoke_api_token(&id));
    emu.revoke_access_tokens();
    let renewed = refuse(&broker, &first).await;
    assert!(accepted_upstream(&emu, &Ok(renewed)).await);
    let c = emu.counters();
    assert_eq!((c.create, c.regenerate, c.exchange), (2, 1, 3), "{c:?}");
    assert_ne!(first_status_id(&broker), id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_use_api_tokens_are_regenerated_for_each_access_token() {
    let emu = emulator(60.0).await;
    let mut tokens = policy(60, 30);
    tokens.max_count_of_uses = Some(1);
    let broker = start(&config(&emu, vec![caller("billing")], tokens)).await;
    let first = broker.token("billing").await.unwrap();
    emu.revoke_access_tokens();
    let second = refuse(&broker, &first).await;
    assert!(accepted_upstream(&emu, &Ok(second)).await);
    let c = emu.counters();
    assert_eq!((c.create, c.regenerate, c.exchange), (1, 1, 2), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_token_inject_mode_injects_the_api_token() {
    let emu = emulator(60.0).await;
    let mut c = caller("billing");
    c.inject = Some(InjectMode::ApiToken);
    let broker = start(&config(&emu, vec![c], policy(60, 30))).await;
    let token = broker.token("billing").await.unwrap();
    assert!(token.header.to_str().unwrap().starts_with("Bearer vidb_"));
    assert!(token.header.is_sensitive());
    assert!(accepted_upstream(&emu, &Ok(Arc::clone(&token))).await);
    let counters = emu.counters();
    assert_eq!((counters.create, counters.exchange), (1, 0));
    // a 401 for it regenerates the API token
    let renewed = refuse(&broker, &token).await;
    assert_ne!(renewed.header, token.header);
    assert_eq!(emu.counters().regenerate, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_file_keeps_api_tokens_across_restarts() {
    let emu = emulator(60.0).await;
    let dir = tempfile::tempdir().unwrap();
    let (tokens, _) = with_state_file(&dir);
    let cfg = config(&emu, vec![caller("billing")], tokens);
    let first = start(&cfg).await;
    first.token("billing").await.unwrap();
    first.shutdown().await;
    drop(first);
    let second = start(&cfg).await;
    let token = second.token("billing").await.unwrap();
    assert!(accepted_upstream(&emu, &Ok(token)).await);
    let c = emu.counters();
    assert_eq!(
        (c.create, c.exchange),
        (1, 2),
        "restart created nothing: {c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_state_file_means_a_fresh_start() {
    let emu = emulator(60.0).await;
    let dir = tempfile::tempdir().unwrap();
    let (tokens, path) = with_state_file(&dir);
    let cfg = config(&emu, vec![caller("billing")], tokens);
    for damage in [
        "{\"version\":1,\"api_tokens\":{\"billing\":{\"id\":",
        "\u{0}garbage",
    ] {
        std::fs::write(&path, damage).unwrap();
        let broker = start(&cfg).await;
        broker.token("billing").await.expect("fresh start works");
        broker.shutdown().await;
        let names = set_aside(&dir);
        assert!(!names.is_empty(), "the damaged file was set aside");
        for n in &names {
            std::fs::remove_file(dir.path().join(n)).unwrap();
        }
        std::fs::remove_file(&path).unwrap();
    }
    assert_eq!(emu.counters().create, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_fetches_every_caller_before_ready() {
    let emu = emulator(60.0).await;
    let mut tokens = policy(60, 30);
    tokens.warm_up = true;
    let callers = vec![caller("a1"), caller("b2"), caller("c3")];
    let broker = start(&config(&emu, callers, tokens)).await;
    support::wait_until(Duration::from_secs(10), "warm-up finished", || async {
        broker.is_ready()
    })
    .await;
    let c = emu.counters();
    assert_eq!((c.create, c.exchange), (3, 3));
    assert!(broker.status().callers.iter().all(|s| s.state == "ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_why_when_the_identity_service_refuses_the_client() {
    let emu = emulator(60.0).await;
    let mut tokens = policy(60, 30);
    tokens.warm_up = true;
    let mut cfg = config(&emu, vec![caller("a1"), caller("b2")], tokens);
    cfg.identity.client_secret = Secret::new("not-the-admin-secret");
    let metrics = Metrics::new();
    let broker = Broker::start(&cfg, Arc::clone(&metrics))
        .await
        .expect("broker starts");
    let admin = tokenbroker::admin::AdminState::new(Arc::clone(&broker), metrics);
    admin
        .listening
        .store(true, std::sync::atomic::Ordering::Release);
    let readyz = || async {
        let r = tokenbroker::admin::respond(&admin, &http::Method::GET, "/readyz", None);
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    };
    let said = support::eventually(Duration::from_secs(10), || async {
        readyz().await.contains("refused the client")
    })
    .await;
    let body = readyz().await;
    assert!(said, "{body}");
    assert!(body.starts_with("not ready: tokens warming up; "), "{body}");
    assert!(body.contains("401 invalid_client"), "{body}");
    assert!(!body.contains("not-the-admin-secret"), "{body}");
    assert!(!broker.is_ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_bearer_refused_is_renewed_once() {
    let emu = emulator(60.0).await;
    let broker = start(&config(
        &emu,
        vec![caller("a1"), caller("b2")],
        policy(60, 30),
    ))
    .await;
    broker.token("a1").await.unwrap();
    // the emulator forgets every admin bearer it issued: the cached one is now refused
    emu.revoke_admin_bearers();
    broker
        .token("b2")
        .await
        .expect("create succeeds with a new admin bearer");
    let c = emu.counters();
    assert_eq!((c.client_credentials, c.create), (2, 3), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_state_file_keeps_api_tokens_and_another_key_means_a_fresh_start() {
    use tokenbroker::seal::SealKey;
    let emu = emulator(60.0).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut tokens, path) = with_state_file(&dir);
    let plain = config(&emu, vec![caller("billing")], tokens.clone());
    tokens.state_file_seal_keys = Some(SealKey::generate().into());
    let sealed = config(&emu, vec![caller("billing")], tokens.clone());

    // A plain file from before the key was configured is read, and sealed on the next write.
    let first = start(&plain).await;
    first.token("billing").await.unwrap();
    first.shutdown().await;
    drop(first);
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .contains("api_tokens"));
    let second = start(&sealed).await;
    assert!(accepted_upstream(&emu, &second.token("billing").await).await);
    second.shutdown().await;
    drop(second);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("v1."), "sealed: {text}");
    assert!(
        !text.contains("api_tokens") && !text.contains("vidb_"),
        "{text}"
    );
    let third = start(&sealed).await;
    assert!(accepted_upstream(&emu, &third.token("billing").await).await);
    third.shutdown().await;
    drop(third);
    assert_eq!(emu.counters().create, 1, "restarts created nothing");

    // Another key: the file is set aside and the broker starts fresh.
    tokens.state_file_seal_keys = Some(SealKey::generate().into());
    let other = config(&emu, vec![caller("billing")], tokens);
    let fourth = start(&other).await;
    fourth.token("billing").await.expect("fresh start works");
    fourth.shutdown().await;
    assert_eq!(emu.counters().create, 2);
    assert!(
        !set_aside(&dir).is_empty(),
        "the file under another key was set aside"
    );
}

/// Every call the emulator counted.
fn identity_calls(emu: &Emulator) -> u64 {
    let c = emu.counters();
    c.client_credentials + c.create + c.regenerate + c.exchange
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_callers_through_an_emulator_outage_probe_once_per_step_and_recover_at_once() {
    // access tokens live 2 s; the emulator answers 500 to everything for 6 s
    let emu = emulator(1.0).await;
    let names: Vec<String> = (0..100).map(|i| format!("svc{i}")).collect();
    let mut tokens = policy(60, 2);
    tokens.backoff_initial = Duration::from_secs(1);
    tokens.backoff_max = Duration::from_secs(2);
    let broker = start(&config(
        &emu,
        names.iter().map(|n| caller(n)).collect(),
        tokens,
    ))
    .await;
    for n in &names {
        broker.token(n).await.expect("token before the outage");
    }
    let before = identity_calls(&emu);
    emu.inject_fault(Fault {
        seconds: Some(6.0),
        ..Fault::new(FaultKind::ServerError, vec![], None)
    });
    let started = Instant::now();
    let outage_end = started + Duration::from_secs(6);
    // the tokens fall due after ~1.5 s: the first failures (and the calls already on their way,
    // at most 16 at a time) open the breaker; from its first failed probe on, one probe per step
    // of 1-2 s. (Counted from that probe, not from a fixed time: on a loaded machine the calls
    // on their way may still be answered seconds later.)
    let probed = support::eventually(Duration::from_secs(5), || async {
        broker.status().identity_service.probes_failed >= 1
    })
    .await;
    assert!(probed, "{:?}", broker.status().identity_service);
    let settled = identity_calls(&emu);
    let left = outage_end.saturating_duration_since(Instant::now());
    support::wait_until(Duration::from_secs(10), "the outage ended", || async {
        emu.active_faults().is_empty()
    })
    .await;
    let during = identity_calls(&emu) - before;
    let probes = identity_calls(&emu) - settled;
    let steps = left.as_secs() + 1;
    assert!(
        probes <= steps,
        "{probes} identity calls in the last {left:?} of the outage (one probe per step of 1-2 s)"
    );
    assert!(
        during <= 16 + 6,
        "{during} identity calls in a 6 s outage with 100 callers: more than the calls on their way \
         when it began (16 at a time) and one probe per step"
    );
    // every caller is served again within about one backoff step, without asking
    let recovered = support::wait_for(Duration::from_secs(10), || async {
        let statuses = broker.status();
        statuses
            .callers
            .iter()
            .all(|c| c.state == "ready")
            .then(Instant::now)
    })
    .await
    .unwrap_or_else(|| panic!("not recovered: {:?}", broker.status().identity_service));
    assert!(
        recovered - outage_end <= Duration::from_millis(2500),
        "served {:?} after the outage",
        recovered - outage_end
    );
    for n in &names {
        assert!(accepted_upstream(&emu, &broker.token(n).await).await);
    }
}
