//! The broker's timing rules on paused tokio time, against an in-process fake identity service
//! (`support::fake_identity`): the recovery ladder's steps back to back, bounded waits on the
//! renewal in flight, the breaker shared by every caller (one probe per backoff step,
//! `Retry-After`), and the bounds on upstream-401 renewals. Time only moves when every task
//! waits, so minutes of token life take no real time; nothing here sleeps on the real clock.
//! The same broker against the real emulator over sockets: `lifecycle.rs`.

mod support;

use support::broker::caller;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use support::fake_identity::{self, FakeIdentity, Fault, Op};
use tokenbroker::broker::Broker;
use tokenbroker::config::{CallerConfig, Config, TokenPolicy};
use tokenbroker::metrics::Metrics;
use tokenbroker::token::Rejection;

fn policy() -> TokenPolicy {
    TokenPolicy {
        expiry_skew: Duration::from_millis(500),
        min_margin: Duration::from_millis(500),
        backoff_initial: Duration::from_millis(250),
        backoff_max: Duration::from_secs(2),
        max_wait: Duration::from_secs(2),
        ..TokenPolicy::default()
    }
}

fn config(callers: Vec<CallerConfig>, tokens: TokenPolicy) -> Config {
    support::broker::config_for_fake(callers, tokens)
}

async fn start(
    fake: &Arc<FakeIdentity>,
    callers: Vec<CallerConfig>,
    tokens: TokenPolicy,
) -> Arc<Broker> {
    Broker::start_against(&config(callers, tokens), Metrics::new(), fake.clone())
        .await
        .expect("broker starts")
}

fn minutes(n: u64) -> Duration {
    Duration::from_secs(60 * n)
}

/// The access token in an `Authorization: Bearer` value.
fn bearer(token: &tokenbroker::token::InjectToken) -> String {
    let value = token.header.to_str().unwrap();
    value.strip_prefix("Bearer ").unwrap().to_string()
}

#[tokio::test(start_paused = true)]
async fn revoked_tokens_are_replaced_within_one_renewal_without_backoff() {
    let fake = FakeIdentity::new(minutes(30), minutes(600));
    let broker = start(&fake, vec![caller("billing")], policy()).await;
    let first = broker.token("billing").await.unwrap();
    // the identity service forgets the caller's API token and its access tokens
    fake.revoke_everything();
    tokio::time::advance(Duration::from_secs(6)).await; // older than min_renew_interval
    let started = Instant::now();
    let renewed = match broker.rejected("billing", first.generation).await.unwrap() {
        Rejection::Replay(t) => t,
        Rejection::PassOn => panic!("the refused token is renewed"),
    };
    // exchange refused -> regenerate refused (400, no body) -> create -> exchange: four calls
    // of 5 ms each, nothing waited in between
    assert!(
        started.elapsed() <= Duration::from_millis(40),
        "{:?}",
        started.elapsed()
    );
    assert!(fake.accepts(&bearer(&renewed)));
    assert_eq!(
        (
            fake.count(Op::Exchange),
            fake.count(Op::Regenerate),
            fake.count(Op::Create)
        ),
        (3, 1, 2)
    );
    let status = &broker.status().callers[0];
    assert_eq!(status.state, "ready");
    assert_eq!(status.renewals.get("upstream_401"), Some(&1));
}

#[tokio::test(start_paused = true)]
async fn a_scheduled_regenerate_refused_without_body_creates_at_once() {
    // API tokens live 20 s: the refresh task regenerates after ~15 s
    let fake = FakeIdentity::new(minutes(30), Duration::from_secs(20));
    let broker = start(&fake, vec![caller("billing")], policy()).await;
    broker.token("billing").await.unwrap();
    fake.revoke_everything();
    // the refresh task's regenerate is refused; the create and its exchange follow
    support::wait_until(Duration::from_secs(30), "the caller recovered", || async {
        fake.count(Op::Create) == 2 && broker.status().callers[0].state == "ready"
    })
    .await;
    let calls = fake.calls();
    let regenerate = calls
        .iter()
        .find(|(_, op)| *op == Op::Regenerate)
        .expect("regenerated");
    let creates: Vec<_> = calls.iter().filter(|(_, op)| *op == Op::Create).collect();
    assert_eq!(
        creates.len(),
        2,
        "exactly one create after the refusal: {calls:?}"
    );
    assert_eq!(
        creates[1].0 - regenerate.0,
        fake.latency,
        "the create followed the refused regenerate at once"
    );
    assert!(broker.token("billing").await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn requests_wait_for_the_renewal_in_flight() {
    let fake = FakeIdentity::with_latency(minutes(30), minutes(600), Duration::from_millis(300));
    let broker = start(&fake, vec![caller("billing")], policy()).await;
    // 20 concurrent first requests: one renewal (three calls of 300 ms), nobody gets 503
    let generations = support::broker::concurrent_generations(&broker, "billing", 20).await;
    assert_eq!(generations.len(), 1);
    assert_eq!(
        (
            fake.count(Op::ClientCredentials),
            fake.count(Op::Create),
            fake.count(Op::Exchange)
        ),
        (1, 1, 1)
    );
    assert_eq!(broker.status().callers[0].waited_requests, 20);
}

#[tokio::test(start_paused = true)]
async fn a_renewal_slower_than_max_wait_answers_503_and_still_completes() {
    let fake = FakeIdentity::with_latency(minutes(30), minutes(600), Duration::from_secs(3));
    let broker = start(&fake, vec![caller("billing")], policy()).await;
    let started = Instant::now();
    let err = broker.token("billing").await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(2), "waited max_wait");
    assert!(
        err.reason.contains("did not finish within 2s"),
        "{}",
        err.reason
    );
    // the renewal went on without the waiter: 3 calls of 3 s
    support::wait_until(Duration::from_secs(10), "the renewal finished", || async {
        broker.status().callers[0].state == "ready"
    })
    .await;
    let token = broker.token("billing").await.expect("the renewal finished");
    assert!(fake.accepts(&bearer(&token)));
    assert_eq!(fake.count(Op::Create), 1);
    assert_eq!(broker.status().callers[0].wait_timeouts, 1);
}

#[tokio::test(start_paused = true)]
async fn hundred_callers_through_an_outage_one_probe_per_step_then_all_served() {
    // access tokens live 10 s: every caller needs a renewal during the outage
    let fake = FakeIdentity::new(Duration::from_secs(10), minutes(600));
    let names: Vec<String> = (0..100).map(|i| format!("svc{i}")).collect();
    let callers = names.iter().map(|n| caller(n)).collect();
    let broker = start(&fake, callers, policy()).await;
    for n in &names {
        broker.token(n).await.expect("token before the outage");
    }
    let t0 = Instant::now();
    let outage = (t0 + Duration::from_secs(1), t0 + Duration::from_secs(31));
    fake.fail(Fault {
        ops: vec![],
        from: outage.0,
        until: Some(outage.1),
        times: None,
        error: fake_identity::refused,
    });
    // requests keep coming during the outage: they never reach the identity service
    let mut unavailable = 0;
    let mut pace = support::pace(Duration::from_millis(500));
    while Instant::now() < outage.1 {
        pace.tick().await;
        for n in names.iter().take(10) {
            if broker.token(n).await.is_err() {
                unavailable += 1;
            }
        }
    }
    assert!(unavailable > 0, "tokens ran out during the outage");
    let during = fake.calls_between(outage.0, outage.1);
    assert!(
        during <= 30,
        "{during} identity calls in a 30 s outage (at most one per second)"
    );
    let status = broker.status().identity_service;
    assert_eq!(status.state, "open");
    assert!(status.probes_failed >= 5, "{status:?}");
    // every caller is served within 2 s of the service's return, without asking for it
    tokio::time::sleep_until(outage.1 + Duration::from_secs(2)).await;
    assert_eq!(broker.status().identity_service.state, "closed");
    let checked = Instant::now();
    for n in &names {
        let token = broker.token(n).await.expect("served after the outage");
        assert!(fake.accepts(&bearer(&token)));
    }
    assert_eq!(
        checked.elapsed(),
        Duration::ZERO,
        "no request waited: renewed ahead"
    );
    let recovered = broker
        .status()
        .callers
        .iter()
        .filter(|c| c.renewals.contains_key("recovery"))
        .count();
    assert!(recovered >= 90, "{recovered} callers renewed on recovery");
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_the_least_wait() {
    let fake = FakeIdentity::new(minutes(30), minutes(600));
    fake.fail(Fault {
        ops: vec![Op::Exchange],
        from: Instant::now(),
        until: None,
        times: Some(1),
        error: fake_identity::too_many_requests_5s,
    });
    let broker = start(&fake, vec![caller("billing")], policy()).await;
    let t0 = Instant::now();
    let err = broker.token("billing").await.unwrap_err();
    assert!(err.retry_after >= Duration::from_secs(4), "{err:?}");
    // ask every 50 ms: no call goes out before the 5 s are over
    let token = support::wait_for(Duration::from_secs(10), || async {
        broker.token("billing").await.ok()
    })
    .await
    .expect("a token after the 5 s");
    assert!(fake.accepts(&bearer(&token)));
    let exchanges: Vec<Instant> = fake
        .calls()
        .into_iter()
        .filter(|(_, op)| *op == Op::Exchange)
        .map(|(t, _)| t)
        .collect();
    assert_eq!(exchanges.len(), 2, "{exchanges:?}");
    assert!(
        exchanges[1] - exchanges[0] >= Duration::from_secs(5),
        "second exchange {:?} after the 429",
        exchanges[1] - exchanges[0]
    );
    assert!(t0.elapsed() < Duration::from_secs(6));
}

#[tokio::test(start_paused = true)]
async fn one_callers_transient_failure_pauses_every_caller() {
    let fake = FakeIdentity::new(minutes(30), minutes(600));
    let broker = start(&fake, vec![caller("a1"), caller("b2")], policy()).await;
    broker.token("a1").await.unwrap();
    fake.fail(Fault {
        ops: vec![],
        from: Instant::now(),
        until: None,
        times: Some(1),
        error: fake_identity::refused,
    });
    // b2's first request: its create fails and opens the breaker
    assert!(broker.token("b2").await.is_err());
    let calls = fake.calls().len();
    // within the backoff step nobody calls, whoever asks
    for _ in 0..10 {
        let err = broker.token("b2").await.unwrap_err();
        assert!(
            err.reason.contains("identity service unavailable"),
            "{}",
            err.reason
        );
    }
    assert_eq!(
        fake.calls().len(),
        calls,
        "no call while the breaker is open"
    );
    // after the step, one probe goes out, succeeds, and b2 is served
    tokio::time::advance(Duration::from_millis(300)).await;
    broker.token("b2").await.expect("served after the step");
    assert_eq!(broker.status().identity_service.state, "closed");
}

/// One request through an upstream that accepts only live access tokens: `Ok(true)` when it went
/// through at once, `Ok(false)` when its 401 renewed the token and the replay went through.
async fn through_upstream(broker: &Broker, fake: &FakeIdentity) -> Result<bool, String> {
    let token = broker.token("billing").await.map_err(|e| e.reason)?;
    if fake.accepts(&bearer(&token)) {
        return Ok(true);
    }
    match broker.rejected("billing", token.generation).await {
        Ok(Rejection::Replay(t)) if fake.accepts(&bearer(&t)) => Ok(false),
        other => Err(format!("the 401 was not mended: {other:?}")),
    }
}

#[tokio::test(start_paused = true)]
async fn a_token_revoked_right_after_it_was_obtained_costs_no_request() {
    for revoke_api_tokens in [false, true] {
        let fake = FakeIdentity::new(minutes(30), minutes(600));
        let broker = start(&fake, vec![caller("billing")], policy()).await;
        broker.token("billing").await.unwrap();
        // far younger than min_renew_interval (5 s)
        if revoke_api_tokens {
            fake.revoke_everything();
        } else {
            fake.revoke_access_tokens();
        }
        let mut delayed = 0;
        for i in 0..20 {
            match through_upstream(&broker, &fake).await {
                Ok(true) => {}
                Ok(false) => delayed += 1,
                Err(e) => panic!("request {i} failed ({revoke_api_tokens}): {e}"),
            }
        }
        assert_eq!(delayed, 1, "only the first request waited for the renewal");
        let calls = (
            fake.count(Op::Exchange),
            fake.count(Op::Regenerate),
            fake.count(Op::Create),
        );
        // access tokens only: one more exchange; everything: the whole ladder
        let want = if revoke_api_tokens {
            (3, 1, 2)
        } else {
            (2, 0, 1)
        };
        assert_eq!(calls, want, "revoke_api_tokens {revoke_api_tokens}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_refuses_every_token_gets_one_renewal_per_min_renew_interval() {
    let fake = FakeIdentity::new(minutes(30), minutes(600));
    let broker = start(&fake, vec![caller("billing")], policy()).await;
    // 50 requests to an upstream that always answers 401, 100 ms apart: 5 s
    let started = Instant::now();
    let mut replayed = 0;
    let mut pace = support::pace(Duration::from_millis(100));
    for _ in 0..50 {
        pace.tick().await;
        let token = broker.token("billing").await.unwrap();
        match broker.rejected("billing", token.generation).await.unwrap() {
            Rejection::PassOn => {}
            // the replay is refused too, and passed on
            Rejection::Replay(_) => replayed += 1,
        }
    }
    assert!(started.elapsed() < Duration::from_millis(5100));
    assert_eq!(
        replayed, 1,
        "the first 401 renews; the next ones within 5 s are passed on"
    );
    assert_eq!(fake.count(Op::Exchange), 2, "one 401-driven renewal in 5 s");
    // 5 s later: 50 concurrent 401s for the current token cause one renewal
    tokio::time::advance(Duration::from_secs(5)).await;
    let old = broker.token("billing").await.unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let b = Arc::clone(&broker);
            let g = old.generation;
            tokio::spawn(async move { b.rejected("billing", g).await })
        })
        .collect();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Rejection::Replay(t) => assert_ne!(t.generation, old.generation),
            Rejection::PassOn => panic!("the first 401s for a token renew it"),
        }
    }
    assert_eq!(
        fake.count(Op::Exchange),
        3,
        "one renewal for the generation"
    );
    // the token those 401s just produced is refused too: passed on
    let new = broker.token("billing").await.unwrap();
    assert!(matches!(
        broker.rejected("billing", new.generation).await.unwrap(),
        Rejection::PassOn
    ));
    assert_eq!(fake.count(Op::Exchange), 3);
}
