//! The shared store on Redis as operators run it for high availability, from real processes
//! (`support::redis_ha`): a master with a replica behind Redis Sentinel, and a Redis Cluster of
//! three masters. The store's own calls against a cluster (keys of a caller in one slot, callers
//! over every master, events heard from any node), and three real `tokenbroker run` replicas on
//! each: a Sentinel failover under load fails no request and creates nothing, and a cluster
//! shares one token per caller. Counts and statuses, never speed.

mod support;

use support::records::tokens;

use std::sync::Arc;
use std::time::Duration;

use support::cluster::{caller_name, Cluster, ClusterOptions, KEY_PREFIX};
use support::redis_ha::{tagged, RedisCluster, Sentinel};
use support::redis_server::RedisServer;
use support::{eventually, TIMEOUT};
use tokenbroker::broker::store::{RedisStore, StoreEvent, TokenStore, WriteOutcome};
use tokenbroker::config::{RedisConfig, RedisServers};
use tokenbroker::metrics::Metrics;
use tokenbroker::seal::SealKey;

const LEASE: Duration = Duration::from_secs(10);

/// The generation of caller `caller`'s record on `server` (untagged keys: one server).
async fn generation(server: &RedisServer, caller: usize) -> Option<u64> {
    let mut conn = server.connection().await;
    redis::cmd("HGET")
        .arg(format!("{KEY_PREFIX}caller:{}", caller_name(caller)))
        .arg("generation")
        .query_async::<Option<u64>>(&mut conn)
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_on_a_cluster_keeps_a_caller_in_one_slot_and_hears_every_node() {
    let redis = RedisCluster::start();
    let config = RedisConfig {
        servers: RedisServers::Cluster(redis.urls()),
        username: None,
        password: None,
        key_prefix: KEY_PREFIX.to_string(),
        lease: LEASE,
        ca_file: None,
        seal_keys: SealKey::generate().into(),
    };
    let reader = RedisStore::connect(&config, Metrics::new()).expect("connect");
    let writer = RedisStore::connect(&config, Metrics::new()).expect("connect");
    let mut events = reader.subscribe();
    assert_eq!(
        tokio::time::timeout(TIMEOUT, events.recv()).await.unwrap(),
        Some(StoreEvent::Resync)
    );

    // Every write is a script over the record and the lease: one slot per caller, or the
    // cluster refuses it (CROSSSLOT).
    let callers: Vec<String> = (0..12).map(caller_name).collect();
    for (n, caller) in callers.iter().enumerate() {
        let lease = writer
            .try_lease(caller, LEASE)
            .await
            .unwrap()
            .expect("free");
        let written = writer.write(caller, &lease, 0, &tokens(n as u64)).await;
        assert_eq!(written.unwrap(), WriteOutcome::Written(1), "{caller}");
        assert!(writer.release(lease).await.unwrap());
    }
    // The reader, subscribed to one node, hears the writes of all three.
    let mut heard = std::collections::BTreeSet::new();
    while heard.len() < callers.len() {
        match tokio::time::timeout(TIMEOUT, events.recv()).await {
            Ok(Some(StoreEvent::Changed { caller, generation })) => {
                assert_eq!(generation, 1);
                heard.insert(caller);
            }
            other => panic!("heard {heard:?}, then {other:?}"),
        }
    }
    for (n, caller) in callers.iter().enumerate() {
        let record = reader.read(caller).await.unwrap().expect("written");
        assert_eq!(record.generation, 1);
        assert_eq!(record.tokens.api.id, format!("token-id-{n}"));
    }
    // The records are spread over the masters; each caller's keys carry its name as a tag.
    let per_node = redis.keys_per_node(&format!("{KEY_PREFIX}caller:"));
    assert_eq!(per_node.iter().sum::<usize>(), 12, "{per_node:?}");
    assert!(
        per_node.iter().filter(|&&n| n > 0).count() >= 2,
        "{per_node:?}"
    );
    let mut conn = redis.nodes[0].connection().await;
    let slot = |key: String| redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).clone();
    for caller in &callers {
        let record: u16 = slot(format!("{KEY_PREFIX}caller:{}", tagged(caller)))
            .query_async(&mut conn)
            .await
            .unwrap();
        let lease: u16 = slot(format!("{KEY_PREFIX}lease:{}", tagged(caller)))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(record, lease, "{caller}");
    }

    // A node of the cluster killed: the callers on the other masters are still read.
    drop(events);
    let mut nodes = redis.nodes;
    nodes[2].stop();
    let metrics = Metrics::new();
    let after = RedisStore::connect(&config, Arc::clone(&metrics)).expect("connect");
    let mut readable = 0;
    for caller in &callers {
        if after.read(caller).await.is_ok() {
            readable += 1;
        }
    }
    assert!((1..12).contains(&readable), "{readable} of 12 readable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_cluster_share_one_token_per_caller() {
    let redis = RedisCluster::start();
    let urls: Vec<String> = redis.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let cluster = Cluster::start(ClusterOptions {
        callers: 12,
        redis_servers: Some(format!("cluster = [{}]", urls.join(", "))),
        ..ClusterOptions::default()
    })
    .await;
    let statuses = cluster.spread(360).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let c = cluster.counters();
    assert_eq!((c.create, c.exchange), (12, 12), "{c:?}");
    for caller in 0..12 {
        let ids = cluster.api_token_ids(caller).await;
        assert!(
            ids.iter().all(|id| id.is_some() && *id == ids[0]),
            "{ids:?}"
        );
    }
    let per_node = redis.keys_per_node(&format!("{KEY_PREFIX}caller:"));
    assert_eq!(per_node.iter().sum::<usize>(), 12, "{per_node:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_load_fails_no_request_and_creates_nothing() {
    let mut redis = Sentinel::start("tokenbroker");
    // access tokens live 3 s: each caller's is renewed, and written to the store, every ~2 s
    let cluster = Cluster::start(ClusterOptions {
        redis_servers: Some(format!(
            "sentinels = [\"{}\"]\nservice_name = \"tokenbroker\"",
            redis.url()
        )),
        ..ClusterOptions::short(60, 3)
    })
    .await;
    assert!(cluster.spread(9).await.iter().all(|&s| s == 200));
    let proxies = cluster
        .running()
        .into_iter()
        .map(|i| cluster.replica(i).proxy)
        .collect();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(support::cluster::load(proxies, 3, stopped));

    // renewals are written through the master, and reach its replica ...
    let written = eventually(TIMEOUT, || async {
        let mut all = true;
        for caller in 0..3 {
            all &= generation(&redis.replica, caller).await >= Some(2);
        }
        all
    })
    .await;
    assert!(written, "no renewal reached the replica");
    let mut before = Vec::new();
    for caller in 0..3 {
        before.push(generation(&redis.replica, caller).await.unwrap());
    }
    // ... the master dies and the sentinel promotes the replica ...
    tokio::task::block_in_place(|| redis.fail_over());
    // ... and the renewals go on through the new master.
    let moved_on = eventually(TIMEOUT, || async {
        let mut all = true;
        for (caller, before) in before.iter().enumerate() {
            all &= generation(&redis.replica, caller).await > Some(*before);
        }
        all
    })
    .await;
    assert!(
        moved_on,
        "no write reached the new master:\n{}",
        redis.log()
    );
    stop.send(true).unwrap();
    let statuses = load.await.unwrap();
    let failed = statuses.iter().filter(|&&s| s != 200).count();
    assert!(statuses.len() > 50, "{} requests", statuses.len());
    assert_eq!(failed, 0, "{failed} of {} failed", statuses.len());
    let c = cluster.counters();
    assert_eq!(
        (c.create, c.regenerate),
        (3, 0),
        "no extra create, no regenerate: {c:?}"
    );
    for caller in 0..3 {
        let ids = cluster.api_token_ids(caller).await;
        assert!(
            ids.iter().all(|id| id.is_some() && *id == ids[0]),
            "one token per caller: {ids:?}"
        );
    }
}
