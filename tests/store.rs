//! The shared store against a real `redis-server` (started per test on a free loopback port,
//! persistence off): leases between two replicas, the fenced write, pub/sub with resync after a
//! restart, authentication, what a dump and MONITOR show, damaged records, and a stopped or
//! paused Redis (every call fails within a bound, and the store recovers).

mod support;

use support::records::{tokens, ACCESS_SECRET, API_SECRET};

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::eventually;
use support::redis_server::{RedisOptions, RedisServer};
use tokenbroker::broker::store::{
    LeaseHolder, Record, RedisStore, StoreError, StoreEvent, StoredTokens, TokenStore, WriteOutcome,
};
use tokenbroker::config::RedisConfig;
use tokenbroker::metrics::Metrics;
use tokenbroker::seal::{SealError, SealKey, SealKeys};
use tokenbroker::secret::Secret;

const PREFIX: &str = "tokenbroker:test:";
const LEASE: Duration = Duration::from_secs(10);
/// Well above the store's command bound (1.5 s): a call that takes longer has hung.
const NO_HANG: Duration = Duration::from_secs(5);

fn config(server: &RedisServer, key: &SealKey) -> RedisConfig {
    RedisConfig {
        servers: tokenbroker::config::RedisServers::Single(server.url()),
        username: None,
        password: None,
        key_prefix: PREFIX.to_string(),
        lease: LEASE,
        ca_file: None,
        seal_keys: key.clone().into(),
    }
}

fn store(config: &RedisConfig) -> (RedisStore, Arc<Metrics>) {
    let metrics = Metrics::new();
    let store = RedisStore::connect(config, Arc::clone(&metrics)).expect("connect");
    (store, metrics)
}

/// A read record's generation and tokens.
fn opened(record: Option<Record>) -> Option<(u64, StoredTokens)> {
    record.map(|r| (r.generation, r.tokens))
}

fn sample(metrics: &Metrics, series: &str) -> Option<f64> {
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn a_lease_is_held_by_one_replica_and_only_its_owner_renews_or_releases_it() {
    let server = RedisServer::start();
    let key = SealKey::generate();
    let (a, metrics_a) = store(&config(&server, &key));
    let (b, _) = store(&config(&server, &key));
    assert_ne!(a.replica(), "", "a readable replica id");

    let lease = a.try_lease("billing", LEASE).await.unwrap().expect("free");
    assert!(
        b.try_lease("billing", LEASE).await.unwrap().is_none(),
        "busy"
    );
    assert!(
        a.try_lease("billing", LEASE).await.unwrap().is_none(),
        "not reentrant"
    );
    let other_caller = b
        .try_lease("orders", LEASE)
        .await
        .unwrap()
        .expect("other caller");

    let holder = b.lease_holder("billing").await.unwrap().unwrap();
    assert_eq!(
        holder,
        LeaseHolder {
            replica: a.replica().to_string(),
            this_replica: false
        }
    );
    assert!(
        a.lease_holder("billing")
            .await
            .unwrap()
            .unwrap()
            .this_replica
    );
    assert_eq!(a.lease_holder("nobody").await.unwrap(), None);

    // b cannot renew or release a's lease, even with a lease value of its own for the caller.
    assert!(b.release(other_caller).await.unwrap());
    let before = lease.valid_until();
    assert!(a.renew(&lease).await.unwrap());
    assert!(lease.valid_until() > before, "renewal moves the deadline");
    assert!(a.release(lease).await.unwrap());
    assert_eq!(a.lease_holder("billing").await.unwrap(), None);

    let lease_b = b
        .try_lease("billing", LEASE)
        .await
        .unwrap()
        .expect("free again");
    assert!(a.try_lease("billing", LEASE).await.unwrap().is_none());
    let stolen = a.try_lease("orders", LEASE).await.unwrap().unwrap();
    assert!(b.release(lease_b).await.unwrap());
    assert!(a.release(stolen).await.unwrap());

    let m = metrics_a.encode();
    assert!(
        m.contains("tokenbroker_store_lease_acquisitions_total{outcome=\"acquired\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("tokenbroker_store_lease_acquisitions_total{outcome=\"busy\"} 2"),
        "{m}"
    );
    assert_eq!(sample(&metrics_a, "tokenbroker_store_up"), Some(1.0));
}

#[tokio::test]
async fn the_fenced_write_refuses_a_stale_generation_and_a_lost_lease() {
    let server = RedisServer::start();
    let key = SealKey::generate();
    let (a, metrics) = store(&config(&server, &key));
    let (b, _) = store(&config(&server, &key));

    assert_eq!(a.read("billing").await.unwrap(), None);
    let lease = a.try_lease("billing", LEASE).await.unwrap().unwrap();
    assert_eq!(
        a.write("billing", &lease, 0, &tokens(1)).await.unwrap(),
        WriteOutcome::Written(1)
    );
    assert_eq!(
        a.write("billing", &lease, 0, &tokens(2)).await.unwrap(),
        WriteOutcome::Stale(1),
        "someone (here: itself) already wrote generation 1"
    );
    assert_eq!(
        a.write("billing", &lease, 1, &tokens(2)).await.unwrap(),
        WriteOutcome::Written(2)
    );
    assert_eq!(
        opened(b.read("billing").await.unwrap()),
        Some((2, tokens(2)))
    );
    assert_eq!(
        b.write("billing", &lease_of(&b, "orders").await, 0, &tokens(9))
            .await
            .unwrap_err()
            .to_string(),
        "store settings: the lease is for caller orders, not billing"
    );

    // A holds a short lease, "pauses" past it; B takes the lease and writes generation 3.
    assert!(a.release(lease).await.unwrap());
    let short = a
        .try_lease("billing", Duration::from_millis(200))
        .await
        .unwrap()
        .unwrap();
    // B gets the lease once Redis expired A's
    let lease_b = support::wait_for(Duration::from_secs(5), || async {
        b.try_lease("billing", LEASE).await.unwrap()
    })
    .await
    .expect("expired");
    assert!(short.valid_until() < Instant::now(), "A knows it ran out");
    assert_eq!(
        b.write("billing", &lease_b, 2, &tokens(3)).await.unwrap(),
        WriteOutcome::Written(3)
    );
    // A wakes up and tries to write what it fetched for generation 2: refused.
    assert_eq!(
        a.write("billing", &short, 2, &tokens(30)).await.unwrap(),
        WriteOutcome::LeaseLost
    );
    // Even with the right generation: the lease is not A's.
    assert_eq!(
        a.write("billing", &short, 3, &tokens(30)).await.unwrap(),
        WriteOutcome::LeaseLost
    );
    assert!(!a.renew(&short).await.unwrap(), "cannot renew B's lease");
    assert!(!a.release(short).await.unwrap(), "cannot release B's lease");
    assert!(
        b.lease_holder("billing")
            .await
            .unwrap()
            .unwrap()
            .this_replica
    );
    assert_eq!(
        opened(a.read("billing").await.unwrap()),
        Some((3, tokens(3)))
    );

    let m = metrics.encode();
    for line in [
        "tokenbroker_store_operations_total{op=\"write\",outcome=\"written\"} 2",
        "tokenbroker_store_operations_total{op=\"write\",outcome=\"stale\"} 1",
        "tokenbroker_store_operations_total{op=\"write\",outcome=\"lease_lost\"} 2",
        "tokenbroker_store_operations_total{op=\"renew\",outcome=\"lost\"} 1",
        "tokenbroker_store_operations_total{op=\"read\",outcome=\"ok\"} 2",
    ] {
        assert!(m.contains(line), "{line} in\n{m}");
    }
}

#[tokio::test]
async fn an_abandoned_lease_is_taken_over_and_counted() {
    let server = RedisServer::start();
    let key = SealKey::generate();
    let (a, metrics) = store(&config(&server, &key));
    let (b, _) = store(&config(&server, &key));
    let mut conn = server.connection().await;
    let lease_key = |caller: &str| format!("{PREFIX}lease:{caller}");
    let reader = conn.clone();
    let pttl = |key: String| {
        let mut conn = reader.clone();
        async move {
            redis::cmd("PTTL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    // an operator's `SET <prefix>lease:<caller> x`, without a TTL
    let _: () = redis::cmd("SET")
        .arg(lease_key("billing"))
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    // and a TTL no replica gives: an hour, with a 10 s lease
    let _: () = redis::cmd("SET")
        .arg(lease_key("orders"))
        .arg("y")
        .arg("PX")
        .arg(3_600_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    for caller in ["billing", "orders"] {
        let lease = a
            .try_lease(caller, LEASE)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{caller}: the abandoned lease is taken over"));
        assert!(a.lease_holder(caller).await.unwrap().unwrap().this_replica);
        let ttl = pttl(lease_key(caller)).await;
        assert!(
            ttl > 0 && ttl <= LEASE.as_millis() as i64,
            "{caller}: {ttl}"
        );
        assert!(a.release(lease).await.unwrap());
    }

    // a live holder is not taken over, unless named as the one seen holding it too long
    let held = b.try_lease("billing", LEASE).await.unwrap().unwrap();
    let holder = a
        .take_lease("billing", LEASE, None)
        .await
        .unwrap()
        .unwrap_err();
    assert!(holder.starts_with(b.replica()), "{holder}");
    assert!(a
        .take_lease("billing", LEASE, Some("someone else"))
        .await
        .unwrap()
        .is_err());
    let lease = a
        .take_lease("billing", LEASE, Some(&holder))
        .await
        .unwrap()
        .expect("the holder seen too long is taken over");
    assert!(!b.renew(&held).await.unwrap(), "b knows it lost the lease");
    assert_eq!(
        a.write("billing", &lease, 0, &tokens(1)).await.unwrap(),
        WriteOutcome::Written(1)
    );
    assert_eq!(
        b.write("billing", &held, 0, &tokens(2)).await.unwrap(),
        WriteOutcome::LeaseLost
    );
    let m = metrics.encode();
    for line in [
        "tokenbroker_store_lease_acquisitions_total{outcome=\"taken_over\"} 3",
        "tokenbroker_store_lease_acquisitions_total{outcome=\"busy\"} 2",
        "tokenbroker_store_lease_acquisitions_total{outcome=\"acquired\"} 0",
    ] {
        assert!(m.contains(line), "{line} in\n{m}");
    }
}

/// The next event, within a generous bound.
async fn next(events: &mut tokio::sync::mpsc::Receiver<StoreEvent>) -> StoreEvent {
    tokio::time::timeout(Duration::from_secs(15), events.recv())
        .await
        .expect("an event in time")
        .expect("subscription alive")
}

async fn lease_of(store: &RedisStore, caller: &str) -> tokenbroker::broker::store::Lease {
    store.try_lease(caller, LEASE).await.unwrap().unwrap()
}

#[tokio::test]
async fn keep_alive_holds_a_lease_past_its_ttl_and_reports_when_it_is_lost() {
    let server = RedisServer::start();
    let key = SealKey::generate();
    let (a, _) = store(&config(&server, &key));
    let (b, _) = store(&config(&server, &key));
    let ttl = Duration::from_millis(600);
    let lease = a.try_lease("billing", ttl).await.unwrap().unwrap();
    let held = tokio::time::timeout(Duration::from_millis(1500), a.keep_alive(&lease)).await;
    assert!(held.is_err(), "still held after 2.5 ttls: {held:?}");
    assert!(b.try_lease("billing", ttl).await.unwrap().is_none());

    // Someone deletes the lease (an operator, an eviction) and B takes it: A hears of it.
    let mut conn = server.connection().await;
    let _: () = redis::cmd("DEL")
        .arg(format!("{PREFIX}lease:billing"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _lease_b = b.try_lease("billing", LEASE).await.unwrap().unwrap();
    let lost = tokio::time::timeout(NO_HANG, a.keep_alive(&lease))
        .await
        .expect("keep_alive returns when the lease is lost");
    assert!(lost.to_string().contains("lost to another owner"), "{lost}");
}

#[tokio::test]
async fn another_replica_hears_of_a_write_at_once_and_resyncs_after_a_restart() {
    let mut server = RedisServer::start();
    let key = SealKey::generate();
    let (a, _) = store(&config(&server, &key));
    let (b, metrics_b) = store(&config(&server, &key));
    let mut events = b.subscribe();
    assert_eq!(next(&mut events).await, StoreEvent::Resync, "first connect");

    let lease = a.try_lease("billing", LEASE).await.unwrap().unwrap();
    assert_eq!(
        a.write("billing", &lease, 0, &tokens(1)).await.unwrap(),
        WriteOutcome::Written(1)
    );
    assert_eq!(
        next(&mut events).await,
        StoreEvent::Changed {
            caller: "billing".into(),
            generation: 1
        }
    );
    // A refused write announces nothing.
    assert_eq!(
        a.write("billing", &lease, 0, &tokens(2)).await.unwrap(),
        WriteOutcome::Stale(1)
    );

    server.restart();
    assert_eq!(
        next(&mut events).await,
        StoreEvent::Resync,
        "after the restart"
    );
    assert_eq!(sample(&metrics_b, "tokenbroker_store_up"), Some(1.0));
    // The restarted Redis is empty (no persistence): the lease is gone, A takes a new one and
    // writes generation 1 again; B hears it over the new subscription.
    let lease = a
        .try_lease("billing", LEASE)
        .await
        .unwrap()
        .expect("empty Redis");
    assert_eq!(
        a.write("billing", &lease, 0, &tokens(3)).await.unwrap(),
        WriteOutcome::Written(1)
    );
    assert_eq!(
        next(&mut events).await,
        StoreEvent::Changed {
            caller: "billing".into(),
            generation: 1
        }
    );

    // Shut down: the subscription ends and the receiver sees the end.
    b.shutdown();
    let end = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert_eq!(end.expect("ends in time"), None);
}

#[tokio::test]
async fn dropping_the_store_ends_its_subscription() {
    let server = RedisServer::start();
    let key = SealKey::generate();
    let (a, _) = store(&config(&server, &key));
    let mut events = a.subscribe();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap(),
        Some(StoreEvent::Resync)
    );
    drop(a);
    let end = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert_eq!(end.expect("ends in time"), None);
}

#[tokio::test]
async fn a_password_and_an_acl_user_work_and_a_wrong_password_is_a_clear_error() {
    let server = RedisServer::start_with(RedisOptions {
        password: Some("default-user-pw".into()),
        ..RedisOptions::default()
    });
    let key = SealKey::generate();
    let mut conn = server.connection().await;
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "tb",
                "on",
                ">tb-user-pw",
                "~tokenbroker:*",
                "&tokenbroker:*",
                "+@all",
            ][..],
        )
        .query_async(&mut conn)
        .await
        .unwrap();

    let mut with_default = config(&server, &key);
    with_default.password = Some(Secret::new("default-user-pw"));
    let (a, _) = store(&with_default);
    let lease = a.try_lease("billing", LEASE).await.unwrap().unwrap();
    assert_eq!(
        a.write("billing", &lease, 0, &tokens(1)).await.unwrap(),
        WriteOutcome::Written(1)
    );

    let mut acl = config(&server, &key);
    acl.username = Some("tb".into());
    acl.password = Some(Secret::new("tb-user-pw"));
    let (b, _) = store(&acl);
    assert_eq!(
        opened(b.read("billing").await.unwrap()),
        Some((1, tokens(1)))
    );
    let mut events = b.subscribe();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap(),
        Some(StoreEvent::Resync),
        "pub/sub authenticates too"
    );

    for (username, password) in [
        (None, Some("wrong-password-value")),
        (Some("tb"), Some("wrong-password-value")),
        (None, None),
    ] {
        let mut bad = config(&server, &key);
        bad.username = username.map(str::to_string);
        bad.password = password.map(Secret::new);
        let (c, metrics) = store(&bad);
        let err = c.read("billing").await.unwrap_err();
        assert!(matches!(err, StoreError::Auth(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("refused the credentials"), "{text}");
        assert!(!text.contains("wrong-password-value"), "{text}");
        assert_eq!(sample(&metrics, "tokenbroker_store_up"), Some(0.0));
    }
}

#[tokio::test]
async fn a_dump_of_every_key_and_monitor_show_no_token_and_no_key() {
    use futures_util::StreamExt;
    let server = RedisServer::start();
    let key = SealKey::generate();
    let (a, _) = store(&config(&server, &key));
    let monitor = redis::Client::open(server.url())
        .unwrap()
        .get_async_monitor()
        .await
        .unwrap();
    let mut seen = monitor.into_on_message::<String>();

    for (i, caller) in ["billing", "orders", "reports"].into_iter().enumerate() {
        let lease = a.try_lease(caller, LEASE).await.unwrap().unwrap();
        let n = i as u64 + 1;
        assert_eq!(
            a.write(caller, &lease, 0, &tokens(n)).await.unwrap(),
            WriteOutcome::Written(1)
        );
        assert_eq!(opened(a.read(caller).await.unwrap()), Some((1, tokens(n))));
    }
    let _ = a.lease_holder("billing").await.unwrap();

    let dump = server.dump(PREFIX).await;
    assert_eq!(dump.lines().count(), 6, "3 records and 3 leases:\n{dump}");
    let billing = dump
        .lines()
        .find(|l| l.starts_with(&format!("{PREFIX}caller:billing hash ")))
        .unwrap_or_default();
    assert!(
        billing.contains("generation 1") && billing.contains(&format!("sealed v1.{}.", key.id())),
        "the generation in clear, the tokens sealed:\n{dump}"
    );
    let mut monitored = String::new();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_millis(500), seen.next()).await {
        monitored.push_str(&line);
        monitored.push('\n');
    }
    assert!(
        monitored.contains("EVAL"),
        "MONITOR saw the writes:\n{monitored}"
    );
    assert!(dump.contains("sealed"), "{dump}");
    let key_text = key.to_base64();
    for (what, text) in [("dump", &dump), ("MONITOR", &monitored)] {
        for secret in [
            API_SECRET,
            ACCESS_SECRET,
            "api-token-secret",
            "access-token-secret",
            &key_text[..],
        ] {
            assert!(!text.contains(secret), "{what} shows `{secret}`:\n{text}");
        }
    }
}

#[tokio::test]
async fn damaged_or_foreign_records_are_precise_errors() {
    let server = RedisServer::start();
    let key = SealKey::generate();
    let (a, metrics) = store(&config(&server, &key));
    let mut conn = server.connection().await;
    let record = |caller: &str| format!("{PREFIX}caller:{caller}");

    let lease = a.try_lease("billing", LEASE).await.unwrap().unwrap();
    assert_eq!(
        a.write("billing", &lease, 0, &tokens(1)).await.unwrap(),
        WriteOutcome::Written(1)
    );
    let sealed: Vec<u8> = redis::cmd("HGET")
        .arg(record("billing"))
        .arg("sealed")
        .query_async(&mut conn)
        .await
        .unwrap();

    let set = |args: Vec<Vec<u8>>| {
        let mut cmd = redis::cmd(std::str::from_utf8(&args[0]).unwrap());
        for a in &args[1..] {
            cmd.arg(&a[..]);
        }
        cmd
    };
    let b = |s: &str| s.as_bytes().to_vec();
    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "string",
            vec![b("SET"), b(&record("string")), b("not a hash")],
            "not a tokenbroker record: the key holds another type than a hash",
        ),
        (
            "generation",
            vec![
                b("HSET"),
                b(&record("generation")),
                b("generation"),
                b("seven"),
                b("sealed"),
                sealed.clone(),
            ],
            "its generation is not a positive integer",
        ),
        (
            "nosealed",
            vec![b("HSET"), b(&record("nosealed")), b("generation"), b("1")],
            "it has no sealed payload",
        ),
        (
            "extra",
            vec![
                b("HSET"),
                b(&record("extra")),
                b("generation"),
                b("1"),
                b("sealed"),
                sealed.clone(),
                b("token"),
                b("x"),
            ],
            "fields other than",
        ),
        (
            "garbage",
            vec![
                b("HSET"),
                b(&record("garbage")),
                b("generation"),
                b("1"),
                b("sealed"),
                b("\u{1}garbage"),
            ],
            "not a sealed value",
        ),
        // billing's payload copied under another caller: it does not open there.
        (
            "moved",
            vec![
                b("HSET"),
                b(&record("moved")),
                b("generation"),
                b("1"),
                b("sealed"),
                sealed.clone(),
            ],
            "belongs to another record or generation",
        ),
    ];
    for (caller, command, says) in cases {
        let _: redis::Value = set(command).query_async(&mut conn).await.unwrap();
        let err = a.read(caller).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains(says), "{caller}: {text}");
        assert!(text.contains(&record(caller)), "{caller}: {text}");
        assert!(!text.contains("garbage\u{1}"), "{text}");
    }
    // billing's record bumped to generation 2 by hand: the payload was sealed for 1.
    let _: () = redis::cmd("HSET")
        .arg(record("billing"))
        .arg("generation")
        .arg(2)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(matches!(
        a.read("billing").await.unwrap_err(),
        StoreError::Sealed {
            source: SealError::Tampered,
            ..
        }
    ));

    // A store with another seal key says so.
    let (other, _) = store(&config(&server, &SealKey::generate()));
    let _: () = redis::cmd("HSET")
        .arg(record("billing"))
        .arg("generation")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = other.read("billing").await.unwrap_err();
    assert!(err.to_string().contains("another seal key"), "{err}");
    assert_eq!(err.unopened(), Some(1), "the next renewal replaces it");
    // A ring holding the key opens it, whichever place the key has.
    let ring = SealKeys::new(vec![SealKey::generate(), key.clone()]).unwrap();
    let mut rotated = config(&server, &key);
    rotated.seal_keys = ring;
    let (rotated, _) = store(&rotated);
    let read = rotated.read("billing").await.unwrap().unwrap();
    assert_eq!((read.generation, &read.tokens), (1, &tokens(1)));
    assert_eq!(read.sealed_with, key.id(), "the key it was sealed with");

    // The fenced write refuses to overwrite what it did not write.
    for caller in ["string", "generation"] {
        let lease = a.try_lease(caller, LEASE).await.unwrap().unwrap();
        let err = a.write(caller, &lease, 0, &tokens(1)).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Foreign { .. }),
            "{caller}: {err:?}"
        );
        assert!(err.to_string().contains(&record(caller)), "{err}");
    }
    let m = metrics.encode();
    assert!(
        m.contains("tokenbroker_store_operations_total{op=\"read\",outcome=\"invalid\"} 7"),
        "{m}"
    );
    assert!(
        m.contains("tokenbroker_store_operations_total{op=\"write\",outcome=\"invalid\"} 2"),
        "{m}"
    );
}

/// Every store call once; each must end (with an error or not) within [`NO_HANG`].
async fn every_call(
    store: &RedisStore,
    lease: &tokenbroker::broker::store::Lease,
) -> Vec<(&'static str, Result<(), StoreError>)> {
    async fn bounded<T>(
        name: &'static str,
        fut: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> (&'static str, Result<(), StoreError>) {
        match tokio::time::timeout(NO_HANG, fut).await {
            Ok(r) => (name, r.map(|_| ())),
            Err(_) => panic!("{name} hung for {NO_HANG:?}"),
        }
    }
    vec![
        bounded("read", store.read("billing")).await,
        bounded("try_lease", store.try_lease("orders", LEASE)).await,
        bounded("renew", store.renew(lease)).await,
        bounded("lease_holder", store.lease_holder("billing")).await,
        bounded("write", store.write("billing", lease, 1, &tokens(2))).await,
    ]
}

#[tokio::test]
async fn a_paused_or_stopped_redis_fails_every_call_within_a_bound_and_the_store_recovers() {
    let mut server = RedisServer::start();
    let key = SealKey::generate();
    let (a, metrics) = store(&config(&server, &key));
    let lease = a
        .try_lease("billing", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        a.write("billing", &lease, 0, &tokens(1)).await.unwrap(),
        WriteOutcome::Written(1)
    );

    // Paused (SIGSTOP): connections hang, nothing answers.
    server.pause();
    for (name, result) in every_call(&a, &lease).await {
        let err = result.expect_err(name);
        assert!(err.is_unavailable(), "{name}: {err:?}");
    }
    assert_eq!(sample(&metrics, "tokenbroker_store_up"), Some(0.0));
    server.resume();
    assert!(
        eventually(Duration::from_secs(15), || async {
            a.read("billing").await.is_ok()
        })
        .await,
        "recovers after SIGCONT"
    );
    // The write that timed out was still in the socket when Redis went on: it may have been
    // applied (an unknown outcome is what a timeout means; the fence keeps it safe).
    let (generation, stored) = opened(a.read("billing").await.unwrap()).unwrap();
    assert!(generation == 1 || generation == 2, "{generation}");
    assert_eq!(stored, tokens(generation));
    assert_eq!(sample(&metrics, "tokenbroker_store_up"), Some(1.0));

    // Stopped (killed): connection refused.
    server.stop();
    for (name, result) in every_call(&a, &lease).await {
        let err = result.expect_err(name);
        assert!(err.is_unavailable(), "{name}: {err:?}");
        assert!(
            err.to_string().contains("unreachable") || err.to_string().contains("did not answer"),
            "{err}"
        );
    }
    assert_eq!(sample(&metrics, "tokenbroker_store_up"), Some(0.0));
    server.restart();
    assert!(
        eventually(Duration::from_secs(15), || async {
            a.read("billing").await.is_ok()
        })
        .await,
        "recovers after a restart"
    );
    assert_eq!(a.read("billing").await.unwrap(), None, "a new, empty Redis");
    assert!(a.try_lease("billing", LEASE).await.unwrap().is_some());
    let m = metrics.encode();
    assert!(
        m.contains("tokenbroker_store_operations_total{op=\"read\",outcome=\"timeout\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn a_store_set_up_while_redis_is_down_starts_at_once_and_connects_later() {
    let mut server = RedisServer::start();
    server.stop();
    let key = SealKey::generate();
    let started = Instant::now();
    let (a, _) = store(&config(&server, &key));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "connect does not wait for Redis"
    );
    let mut events = a.subscribe();
    let err = a.read("billing").await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    server.restart();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(15), events.recv())
            .await
            .unwrap(),
        Some(StoreEvent::Resync)
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            a.read("billing").await.is_ok()
        })
        .await
    );
}

#[tokio::test]
async fn rediss_works_with_the_configured_ca_and_refuses_an_unknown_one() {
    let server = RedisServer::start_with(RedisOptions {
        tls: true,
        ..RedisOptions::default()
    });
    let key = SealKey::generate();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut tls = config(&server, &key);
    tls.ca_file = Some(repo.join("certs/ca.pem"));
    let (a, _) = store(&tls);
    let lease = a.try_lease("billing", LEASE).await.unwrap().unwrap();
    assert_eq!(
        a.write("billing", &lease, 0, &tokens(1)).await.unwrap(),
        WriteOutcome::Written(1)
    );
    assert_eq!(
        opened(a.read("billing").await.unwrap()),
        Some((1, tokens(1)))
    );
    let mut events = a.subscribe();
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap(),
        Some(StoreEvent::Resync)
    );

    let mut other = config(&server, &key);
    other.ca_file = Some(repo.join("certs/other-ca.pem"));
    let (b, _) = store(&other);
    let err = b.read("billing").await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
}

#[tokio::test]
async fn nothing_the_store_logs_at_trace_level_carries_a_token_a_password_or_the_key() {
    // A current-thread runtime: the subscription task runs on this thread and logs into the
    // capture too.
    let capture = support::logs::LogCapture::default();
    let _guard = tracing::subscriber::set_default(capture.subscriber());
    let mut server = RedisServer::start_with(RedisOptions {
        password: Some("logged-never-redis-pw".into()),
        ..RedisOptions::default()
    });
    let key = SealKey::generate();
    let mut good = config(&server, &key);
    good.password = Some(Secret::new("logged-never-redis-pw"));
    let (a, _) = store(&good);
    let mut events = a.subscribe();
    assert_eq!(next(&mut events).await, StoreEvent::Resync);
    let lease = a.try_lease("billing", LEASE).await.unwrap().unwrap();
    a.write("billing", &lease, 0, &tokens(1)).await.unwrap();
    assert!(matches!(
        next(&mut events).await,
        StoreEvent::Changed { .. }
    ));
    a.read("billing").await.unwrap();

    let mut bad = config(&server, &key);
    bad.password = Some(Secret::new("wrong-logged-never-pw"));
    let (b, _) = store(&bad);
    let mut refused = b.subscribe();
    b.read("billing").await.unwrap_err();
    server.restart();
    assert_eq!(next(&mut events).await, StoreEvent::Resync);
    drop(refused.try_recv());

    let logs = capture.text();
    assert!(logs.contains("subscribed to store changes"), "{logs}");
    assert!(logs.contains("cannot subscribe to store changes"), "{logs}");
    let key_text = key.to_base64();
    for secret in [
        API_SECRET,
        ACCESS_SECRET,
        "logged-never-redis-pw",
        "wrong-logged-never-pw",
        &key_text[..],
    ] {
        assert!(!logs.contains(secret), "`{secret}` logged:\n{logs}");
    }
}

#[tokio::test]
async fn the_subscription_notices_a_redis_that_stops_answering_and_resyncs_when_it_answers_again() {
    let server = RedisServer::start();
    let key = SealKey::generate();
    let (a, metrics) = store(&config(&server, &key));
    let mut events = a.subscribe();
    assert_eq!(next(&mut events).await, StoreEvent::Resync);
    // Paused, the connection stays open and silent: only the subscription's ping can tell.
    server.pause();
    assert!(
        eventually(Duration::from_secs(15), || async {
            sample(&metrics, "tokenbroker_store_up") == Some(0.0)
        })
        .await,
        "the silent connection is given up"
    );
    server.resume();
    assert_eq!(
        next(&mut events).await,
        StoreEvent::Resync,
        "after it answers again"
    );
    assert_eq!(sample(&metrics, "tokenbroker_store_up"), Some(1.0));
}
