//! Several real `tokenbroker run` processes sharing one Redis store and one emulator (the harness
//! in `support::cluster`), TTLs shortened by the emulator's `seconds_per_minute`: the identity
//! service sees the calls of one replica however many run, a lease holder killed mid-renewal is
//! taken over, a Redis outage fails no request, restarts and new replicas create nothing, and
//! Redis never holds a token in clear. Counts and statuses, never speed.

mod support;

use std::time::{Duration, Instant};

use support::cluster::{caller_name, Cluster, ClusterOptions, KEY_PREFIX};
use tokenbroker::broker::store::TokenStore;
use tokenbroker::emulator::{Fault, FaultKind, Operation};

/// The value of a Prometheus series (labels included in `series`), if present.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Sum of every sample of a metric family.
fn family_sum(metrics: &str, family: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_twenty_cold_callers_one_create_and_one_exchange_each() {
    let cluster = Cluster::start(ClusterOptions {
        callers: 20,
        ..ClusterOptions::default()
    })
    .await;
    for i in cluster.running() {
        let out = cluster.check(i);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(0), "{text}");
        assert!(
            text.contains(&format!("store redis (prefix {KEY_PREFIX}")),
            "{text}"
        );
    }
    let statuses = cluster.spread(1000).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let c = cluster.counters();
    assert_eq!((c.create, c.exchange), (20, 20), "{c:?}");
    assert!(
        c.client_credentials <= 3,
        "at most one admin bearer per replica: {c:?}"
    );

    // every replica holds the same, current copy
    for caller in 0..20 {
        let ids = cluster.api_token_ids(caller).await;
        assert!(
            ids.iter().all(|id| id.is_some() && *id == ids[0]),
            "{ids:?}"
        );
    }
    let tokens = cluster.tokens(0).await;
    let first = &tokens["callers"][0];
    assert_eq!(first["store"]["current"], true, "{tokens}");
    assert!(first["store"]["generation"].as_u64() >= Some(1), "{tokens}");

    // no Redis command per proxied request once the tokens are held: neither the replicas'
    // counters nor Redis's own (the harness's INFO and the subscriptions' PINGs aside)
    let mut before = Vec::new();
    for i in cluster.running() {
        let metrics = cluster.metrics(i).await;
        before.push(family_sum(&metrics, "tokenbroker_store_operations_total"));
    }
    let calls_before = cluster.redis.command_calls().await;
    let statuses = cluster.spread(300).await;
    assert!(statuses.iter().all(|&s| s == 200));
    let calls_after = cluster.redis.command_calls().await;
    let sent: u64 = calls_after
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "ping"))
        .map(|(name, calls)| calls - calls_before.get(name).copied().unwrap_or(0))
        .sum();
    assert_eq!(
        sent, 0,
        "Redis commands during 300 requests: {calls_after:?}"
    );
    for (n, i) in cluster.running().into_iter().enumerate() {
        let after = family_sum(
            &cluster.metrics(i).await,
            "tokenbroker_store_operations_total",
        );
        assert_eq!(after, before[n], "replica {i} talked to Redis for requests");
    }

    // a dump of every key shows no token, no caller key, no secret: each record is its
    // generation and one sealed value, nothing else
    let dump = cluster.redis.dump(KEY_PREFIX).await;
    let mut records = 0;
    for line in dump.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields[0].starts_with(&format!("{KEY_PREFIX}caller:")) {
            records += 1;
            assert_eq!((fields[1], fields.len()), ("hash", 6), "{line}");
            let pairs: std::collections::BTreeMap<&str, &str> =
                fields[2..].chunks(2).map(|kv| (kv[0], kv[1])).collect();
            assert!(pairs["generation"].parse::<u64>().is_ok(), "{line}");
            let sealed: Vec<&str> = pairs["sealed"].splitn(3, '.').collect();
            assert_eq!(sealed[0], "v1", "{line}");
            assert!(sealed[1].len() == 8 && sealed[1].chars().all(|c| c.is_ascii_hexdigit()));
            assert!(sealed[2]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        }
    }
    assert_eq!(records, 20, "{dump}");
    for clear in ["vidb_", "cluster-key-", "cluster-admin-client-secret"] {
        assert!(!dump.contains(clear), "Redis shows {clear}:\n{dump}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_traffic_over_ten_api_token_lifetimes_renews_once_per_period() {
    // API tokens live 4 s (renewed every ~3 s), access tokens 2 s (every ~1.5 s)
    let cluster = Cluster::start(ClusterOptions::short(4, 2)).await;
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut n = 0usize;
    let mut pace = support::pace(Duration::from_millis(50));
    while started.elapsed() < Duration::from_secs(40) {
        pace.tick().await;
        for i in cluster.running() {
            let status = cluster.request(i, n % 3).await;
            if status != 200 {
                failed.push((started.elapsed(), i, status));
            }
            n += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    let c = cluster.counters();
    // one replica alone renews every caller's API token about every 3 s and its access token
    // about every 1.5 s; three replicas sharing the store must not do more
    let periods = |lifetime: f64| (elapsed / (0.7 * lifetime)).ceil() as u64 + 1;
    assert_eq!(c.create, 3, "each caller's API token created once: {c:?}");
    assert!(c.regenerate >= 3 * 8, "renewed ahead: {c:?}");
    assert!(
        c.regenerate <= 3 * periods(4.0),
        "one regenerate per period: {c:?}"
    );
    assert!(
        c.exchange <= 3 * periods(2.0) + c.regenerate,
        "one exchange per period: {c:?}"
    );
    for i in cluster.running() {
        let metrics = cluster.metrics(i).await;
        let refused = sample(
            &metrics,
            r#"tokenbroker_token_fetches_total{kind="regenerate",outcome="rejected"}"#,
        );
        assert_eq!(
            refused.unwrap_or(0.0),
            0.0,
            "replica {i} regenerated an already regenerated token: {metrics}"
        );
        assert_eq!(
            sample(
                &metrics,
                r#"tokenbroker_token_ladder_steps_total{step="create"}"#
            ),
            Some(0.0),
            "{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_holder_killed_mid_regenerate_is_taken_over() {
    // API tokens live 6 s (renewed after ~4.5 s); access tokens outlive the test
    let mut cluster = Cluster::start(ClusterOptions {
        callers: 1,
        lease: "2s".into(),
        ..ClusterOptions::short(6, 60)
    })
    .await;
    assert!(cluster.spread(30).await.iter().all(|&s| s == 200));
    // the first regenerate hangs for 3 s at the emulator
    cluster.emulator.inject_fault(Fault::new(
        FaultKind::Slow { delay_ms: 3000 },
        vec![Operation::Regenerate],
        Some(1),
    ));
    support::wait_until(Duration::from_secs(15), "a regenerate started", || async {
        cluster.counters().regenerate > 0
    })
    .await;
    let lease_key = format!("{KEY_PREFIX}lease:{}", caller_name(0));
    let owner = cluster
        .redis
        .get(&lease_key)
        .await
        .expect("the renewer holds the lease");
    let holder = cluster
        .running()
        .into_iter()
        .find(|&i| owner.contains(&format!("-{}/", cluster.replica(i).process.pid())))
        .unwrap_or_else(|| panic!("no replica owns {owner}"));
    let killed_at = Instant::now();
    cluster.kill(holder);
    let survivors = cluster.running();

    // the survivors keep serving, and one of them renews once the lease has lapsed
    let mut failed = 0;
    let mut renewed_after = None;
    let before = cluster.counters();
    let mut pace = support::pace(Duration::from_millis(50));
    while killed_at.elapsed() < Duration::from_secs(8) {
        pace.tick().await;
        for &i in &survivors {
            if cluster.request(i, 0).await != 200 {
                failed += 1;
            }
        }
        let c = cluster.counters();
        if renewed_after.is_none() && (c.create > before.create || c.regenerate > before.regenerate)
        {
            renewed_after = Some(killed_at.elapsed());
        }
    }
    assert_eq!(failed, 0, "requests failed on the survivors");
    let renewed_after = renewed_after.expect("a survivor renewed");
    assert!(
        renewed_after <= Duration::from_millis(2000 + 1500),
        "renewed {renewed_after:?} after the kill (lease 2 s)"
    );
    // the survivors agree on the new token
    let ids = cluster.api_token_ids(0).await;
    assert!(
        ids.iter().all(|id| id.is_some() && *id == ids[0]),
        "{ids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_longer_than_an_access_token_fails_no_request() {
    // access tokens live 2 s; Redis is away for 6 s
    let mut cluster = Cluster::start(ClusterOptions::short(60, 2)).await;
    assert!(cluster.spread(30).await.iter().all(|&s| s == 200));
    let ids_before: Vec<_> =
        futures_util::future::join_all((0..3).map(|c| cluster.api_token_ids(c))).await;
    cluster.redis.stop();
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut n = 0;
    let mut pace = support::pace(Duration::from_millis(50));
    while started.elapsed() < Duration::from_secs(6) {
        pace.tick().await;
        for i in cluster.running() {
            let status = cluster.request(i, n % 3).await;
            if status != 200 {
                failed.push((started.elapsed(), i, status));
            }
            n += 1;
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
    let c = cluster.counters();
    assert_eq!(
        (c.create, c.regenerate),
        (3, 0),
        "nobody regenerated or created a shared token: {c:?}"
    );
    for i in cluster.running() {
        let metrics = cluster.metrics(i).await;
        assert_eq!(
            sample(&metrics, "tokenbroker_store_up"),
            Some(0.0),
            "{metrics}"
        );
        assert!(
            sample(
                &metrics,
                r#"tokenbroker_store_fallbacks_total{kind="renewal"}"#
            ) >= Some(1.0),
            "{metrics}"
        );
    }

    // Redis is back (empty: no persistence): the replicas publish and converge on one token
    cluster.redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pace = support::pace(Duration::from_millis(200));
    loop {
        pace.tick().await;
        assert!(cluster.spread(9).await.iter().all(|&s| s == 200));
        let mut converged = true;
        for (caller, before) in ids_before.iter().enumerate() {
            let ids = cluster.api_token_ids(caller).await;
            converged &= ids.iter().all(|id| id.is_some() && *id == ids[0]);
            converged &= ids[0] == before[0];
        }
        let dump = cluster.redis.dump(KEY_PREFIX).await;
        converged &= (0..3).all(|c| dump.contains(&format!("caller:{}", caller_name(c))));
        if converged {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas did not converge:\n{dump}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_and_a_new_replica_create_nothing() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    assert!(cluster.spread(30).await.iter().all(|&s| s == 200));
    assert_eq!(cluster.counters().create, 3);
    for i in cluster.running() {
        assert_eq!(cluster.stop(i), Some(0), "replica {i} stops cleanly");
    }
    for i in 0..3 {
        cluster.restart(i).await;
    }
    assert!(cluster.spread(30).await.iter().all(|&s| s == 200));
    let added = cluster.add_replica().await;
    assert_eq!(cluster.running(), vec![0, 1, 2, added]);
    assert!(cluster.spread(40).await.iter().all(|&s| s == 200));
    let c = cluster.counters();
    assert_eq!(
        (c.create, c.regenerate),
        (3, 0),
        "restarts and a new replica created nothing: {c:?}"
    );
    assert_eq!(c.exchange, 3, "nor exchanged: {c:?}");
    // kill -9 of one: the others serve on
    cluster.kill(1);
    assert!(cluster.spread(20).await.iter().all(|&s| s == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_401s_on_three_replicas_cause_one_renewal() {
    let cluster = Cluster::start(ClusterOptions {
        callers: 1,
        tokens_extra: "min_renew_interval = \"100ms\"\n".into(),
        ..ClusterOptions::default()
    })
    .await;
    assert!(cluster.spread(9).await.iter().all(|&s| s == 200));
    let before = cluster.counters();
    assert_eq!(before.exchange, 1, "{before:?}");
    // no 401 renewed anything yet: min_renew_interval does not hold back the first one.
    // The renewal's exchange is held for 500 ms, so that every replica's requests meet the
    // revoked token before any replica can adopt the renewed one.
    cluster.emulator.inject_fault(Fault::new(
        FaultKind::Slow { delay_ms: 500 },
        vec![Operation::Exchange],
        Some(1),
    ));
    // the upstream stops accepting the shared access token: every replica sees 401s for it
    cluster.emulator.revoke_access_tokens();
    let statuses = cluster.spread(30).await;
    assert!(
        statuses.iter().all(|&s| s == 200),
        "replayed with the renewed token: {statuses:?}"
    );
    let c = cluster.counters();
    assert_eq!(
        c.exchange - before.exchange,
        1,
        "one renewal for the fleet: {c:?}"
    );
    assert!(c.echo_rejected >= 3, "each replica saw a 401: {c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_without_a_ttl_is_taken_over_and_renewals_go_on() {
    // access tokens live 2 s: renewed every ~1.5 s
    let cluster = Cluster::start(ClusterOptions {
        callers: 1,
        ..ClusterOptions::short(60, 2)
    })
    .await;
    // an operator's mistake: the caller's lease set by hand, without a TTL, before any renewal
    let mut conn = cluster.redis.connection().await;
    let lease_key = format!("{KEY_PREFIX}lease:{}", caller_name(0));
    let _: () = redis::cmd("SET")
        .arg(&lease_key)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut pace = support::pace(Duration::from_millis(50));
    while started.elapsed() < Duration::from_secs(5) {
        pace.tick().await;
        for i in cluster.running() {
            let status = cluster.request(i, 0).await;
            if status != 200 {
                failed.push((started.elapsed(), i, status));
            }
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
    let c = cluster.counters();
    assert_eq!(c.create, 1, "{c:?}");
    assert!(c.exchange >= 3, "the access token was renewed: {c:?}");
    assert_ne!(cluster.redis.get(&lease_key).await.as_deref(), Some("x"));
    let mut taken_over = 0.0;
    for i in cluster.running() {
        taken_over += sample(
            &cluster.metrics(i).await,
            r#"tokenbroker_store_lease_acquisitions_total{outcome="taken_over"}"#,
        )
        .unwrap_or(0.0);
    }
    assert!(taken_over >= 1.0, "the take-over is counted");
}

/// Replica `i`'s WARN lines (and worse) logged since the last call.
fn warnings(cluster: &Cluster, i: usize) -> Vec<String> {
    cluster
        .logs(i)
        .into_iter()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            matches!(v["level"].as_str(), Some("WARN" | "ERROR"))
        })
        .collect()
}

/// Caller 0's record: its generation and sealed value.
async fn record(cluster: &Cluster) -> (u64, String) {
    let mut conn = cluster.redis.connection().await;
    let (generation, sealed): (Option<u64>, Option<String>) = redis::cmd("HMGET")
        .arg(format!("{KEY_PREFIX}caller:{}", caller_name(0)))
        .arg("generation")
        .arg("sealed")
        .query_async(&mut conn)
        .await
        .unwrap();
    (generation.unwrap_or(0), sealed.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_does_not_open_is_replaced_at_the_next_renewal_without_a_busy_loop() {
    // API tokens live 4 s: their refresh point comes ~3 s after they are made
    let cluster = Cluster::start(ClusterOptions {
        callers: 1,
        ..ClusterOptions::short(4, 60)
    })
    .await;
    assert!(cluster.spread(9).await.iter().all(|&s| s == 200));
    let (generation, _) = record(&cluster).await;
    assert!(generation >= 1);
    for i in cluster.running() {
        cluster.logs(i);
    }
    let before = cluster.counters();
    // the record's sealed value replaced by garbage, as by another program
    let mut conn = cluster.redis.connection().await;
    let _: () = redis::cmd("HSET")
        .arg(format!("{KEY_PREFIX}caller:{}", caller_name(0)))
        .arg("sealed")
        .arg("garbage, not a sealed value")
        .query_async(&mut conn)
        .await
        .unwrap();
    // past the API token's refresh point, under requests
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut pace = support::pace(Duration::from_millis(50));
    while started.elapsed() < Duration::from_secs(5) {
        pace.tick().await;
        for i in cluster.running() {
            let status = cluster.request(i, 0).await;
            if status != 200 {
                failed.push((started.elapsed(), i, status));
            }
        }
    }
    assert!(failed.is_empty(), "{failed:?}");
    let mut warned = Vec::new();
    for i in cluster.running() {
        warned.extend(warnings(&cluster, i));
    }
    assert!(
        warned.len() <= 6,
        "{} warnings in 5 s: {:?}",
        warned.len(),
        &warned[..warned.len().min(10)]
    );
    let c = cluster.counters();
    assert_eq!(c.create, before.create, "{c:?}");
    assert!(
        c.regenerate - before.regenerate <= 3 && c.exchange - before.exchange <= 3,
        "identity calls stay those of the schedule: {before:?} -> {c:?}"
    );
    // a good record replaced it: every replica opened and adopted it
    let replaced = support::eventually(Duration::from_secs(10), || async {
        let (now, sealed) = record(&cluster).await;
        let mut adopted = now > generation && sealed.starts_with("v1.");
        for i in cluster.running() {
            let store = &cluster.tokens(i).await["callers"][0]["store"];
            adopted &= store["generation"] == now && store["record_error"].is_null();
        }
        adopted
    })
    .await;
    assert!(replaced, "{:?}", record(&cluster).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_stopped_the_store_is_retried_with_backoff() {
    // API tokens live 8 s and are due after ~1.6 s: from then on only the store may regenerate
    // them, and without it each renewal keeps the one held until it stops being usable (7.5 s)
    let mut options = ClusterOptions {
        callers: 1,
        backoff_max: "4s".into(),
        ..ClusterOptions::short(8, 60)
    };
    options.tokens_extra.push_str("refresh_fraction = 0.2\n");
    let mut cluster = Cluster::start(options).await;
    assert!(cluster.spread(9).await.iter().all(|&s| s == 200));
    cluster.redis.stop();
    for i in cluster.running() {
        cluster.logs(i);
    }
    let started = Instant::now();
    let mut pace = support::pace(Duration::from_millis(100));
    while started.elapsed() < Duration::from_secs(6) {
        pace.tick().await;
        for i in cluster.running() {
            assert_eq!(cluster.request(i, 0).await, 200);
        }
    }
    for i in cluster.running() {
        // backoff from 50 ms doubling to 4 s: at most 8 attempts in 6 s
        let fallbacks = sample(
            &cluster.metrics(i).await,
            r#"tokenbroker_store_fallbacks_total{kind="renewal"}"#,
        )
        .unwrap_or(0.0);
        assert!(
            (1.0..=10.0).contains(&fallbacks),
            "replica {i}: {fallbacks} renewals without the store in 6 s"
        );
        let warned: Vec<String> = warnings(&cluster, i)
            .into_iter()
            .filter(|l| l.contains("renewing this replica's copy without it"))
            .collect();
        assert_eq!(warned.len(), 1, "once per interval: {warned:?}");
    }
}

/// The key id each caller's record is sealed with.
async fn sealed_with(cluster: &Cluster) -> Vec<String> {
    let dump = cluster.redis.dump(KEY_PREFIX).await;
    dump.lines()
        .filter(|l| l.starts_with(&format!("{KEY_PREFIX}caller:")))
        .map(|l| {
            let sealed = l.split(' ').skip_while(|f| *f != "sealed").nth(1).unwrap();
            sealed.split('.').nth(1).unwrap().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_seal_key_rolled_through_the_replicas_under_load_fails_nothing_and_creates_nothing() {
    // access tokens live 2 s: every record is written again every ~1.5 s
    let mut cluster = Cluster::start(ClusterOptions::short(60, 2)).await;
    let callers = cluster.options.callers;
    assert!(cluster.spread(30).await.iter().all(|&s| s == 200));
    let old = sealed_with(&cluster).await;
    assert_eq!(old.len(), callers);
    let new = cluster.new_seal_key("new.key");
    let roll = |proxies, stop| support::cluster::load(proxies, callers, stop);
    let mut statuses = Vec::new();
    // the new key second: every replica opens it, none seals with it yet
    cluster.seal_keys = vec!["seal.key".into(), "new.key".into()];
    statuses.extend(cluster.roll(roll).await);
    // then first: replicas seal with it, the others open it
    cluster.seal_keys = vec!["new.key".into(), "seal.key".into()];
    statuses.extend(cluster.roll(roll).await);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pace = support::pace(Duration::from_millis(50));
    while !sealed_with(&cluster).await.iter().all(|id| *id == new) {
        pace.tick().await;
        assert!(
            Instant::now() < deadline,
            "{:?}",
            sealed_with(&cluster).await
        );
        statuses.extend(cluster.spread(6).await);
    }
    // then the old key dropped
    cluster.seal_keys = vec!["new.key".into()];
    statuses.extend(cluster.roll(roll).await);
    statuses.extend(cluster.spread(30).await);

    let failed = statuses.iter().filter(|&&s| s != 200).count();
    assert_eq!(failed, 0, "{failed} of {} requests failed", statuses.len());
    assert!(
        statuses.len() > 100,
        "under load: {} requests",
        statuses.len()
    );
    let c = cluster.counters();
    assert_eq!(c.create, callers as u64, "no extra create: {c:?}");
    let ids = sealed_with(&cluster).await;
    assert!(
        ids.len() == callers && ids.iter().all(|id| *id == new),
        "every record sealed with the new key {new}: {ids:?}"
    );
    for i in cluster.running() {
        let tokens = cluster.tokens(i).await;
        for caller in tokens["callers"].as_array().unwrap() {
            assert!(caller["store"]["record_error"].is_null(), "{caller}");
            assert_eq!(caller["store"]["sealed_with"], new.as_str(), "{caller}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_held_past_twice_its_ttl_is_taken_over() {
    // access tokens live 2 s: renewed every ~1.5 s; the lease is 3 s
    let cluster = Cluster::start(ClusterOptions {
        callers: 1,
        ..ClusterOptions::short(60, 2)
    })
    .await;
    assert!(cluster.spread(9).await.iter().all(|&s| s == 200));
    // another program takes the caller's lease and keeps renewing it, for ever
    let squatter = tokenbroker::broker::store::RedisStore::connect(
        &tokenbroker::config::RedisConfig {
            servers: tokenbroker::config::RedisServers::Single(cluster.redis.url()),
            username: None,
            password: None,
            key_prefix: KEY_PREFIX.to_string(),
            lease: Duration::from_secs(3),
            ca_file: None,
            seal_keys: tokenbroker::seal::SealKey::generate().into(),
        },
        tokenbroker::metrics::Metrics::new(),
    )
    .unwrap();
    let lease = squatter
        .try_lease(&caller_name(0), Duration::from_secs(3))
        .await
        .unwrap()
        .expect("free between renewals");
    let held = tokio::spawn(async move { squatter.keep_alive(&lease).await });
    let before = cluster.counters().exchange;
    // a replica waits twice the lease for the holder's write, then takes the lease over
    let renewed = support::eventually(Duration::from_secs(15), || async {
        let _ = cluster.request(0, 0).await;
        cluster.counters().exchange > before
    })
    .await;
    assert!(renewed, "{:?}", cluster.counters());
    let lost = tokio::time::timeout(Duration::from_secs(5), held).await;
    assert!(
        matches!(
            lost,
            Ok(Ok(tokenbroker::broker::store::StoreError::LeaseLost(_)))
        ),
        "the squatter hears it lost the lease: {lost:?}"
    );
    let mut taken_over = 0.0;
    for i in cluster.running() {
        taken_over += sample(
            &cluster.metrics(i).await,
            r#"tokenbroker_store_lease_acquisitions_total{outcome="taken_over"}"#,
        )
        .unwrap_or(0.0);
    }
    assert!(taken_over >= 1.0, "the take-over is counted");
}
