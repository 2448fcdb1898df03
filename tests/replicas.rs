//! Several real `tokenbroker run` processes on one Redis store and one emulator (the harness in
//! `support::cluster`). The broker does not use the store for its tokens yet: this checks that a
//! `[store] kind = "redis"` cluster starts, serves every caller on every replica, survives a
//! `kill -9` of one replica and takes a new one, that `check` accepts its config, and that
//! proxied requests send Redis no command.

mod support;

use support::cluster::{Cluster, ClusterOptions, KEY_PREFIX};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_redis_store_start_serve_and_survive_a_kill() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    for i in cluster.running() {
        let out = cluster.check(i);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(0), "{text}");
        assert!(
            text.contains(&format!("store redis (prefix {KEY_PREFIX}")),
            "{text}"
        );
    }

    let statuses = cluster.spread(30).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    for i in cluster.running() {
        let tokens = cluster.tokens(i).await;
        let callers = tokens.as_array().map_or(0, Vec::len);
        assert_eq!(callers, 3, "{tokens}");
        let metrics = cluster.metrics(i).await;
        assert!(metrics.contains("tokenbroker_store_up"), "{metrics}");
    }

    // Warm now: proxied requests send Redis nothing (commands other than the harness's own
    // INFO and the subscriptions' PINGs), far fewer than one per request.
    let before = cluster.redis.command_calls().await;
    let statuses = cluster.spread(90).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let after = cluster.redis.command_calls().await;
    let sent: u64 = after
        .iter()
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "ping"))
        .map(|(name, calls)| calls - before.get(name).copied().unwrap_or(0))
        .sum();
    assert!(sent < 9, "{sent} Redis commands for 90 requests: {after:?}");

    cluster.kill(1);
    let statuses = cluster.spread(20).await;
    assert!(
        statuses.iter().all(|&s| s == 200),
        "the survivors serve: {statuses:?}"
    );
    let added = cluster.add_replica().await;
    cluster.restart(1).await;
    assert_eq!(cluster.running(), vec![0, 1, 2, added]);
    let statuses = cluster.spread(40).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    for i in cluster.running() {
        assert_eq!(cluster.stop(i), Some(0), "replica {i} stops cleanly");
    }
}
