//! Broker helpers shared by the broker tests (paused time, `broker.rs`) and the lifecycle tests
//! (real emulator, `lifecycle.rs`).

use std::collections::HashSet;
use std::sync::Arc;

use std::time::Duration;

use tokenbroker::broker::Broker;
use tokenbroker::config::{CallerConfig, Config, IdentityConfig, TokenPolicy};
use tokenbroker::secret::Secret;

/// A config for a broker against a fake identity service (never contacted over the network):
/// `callers` and the token policy `tokens`, the rest minimal.
pub fn config_for_fake(callers: Vec<CallerConfig>, tokens: TokenPolicy) -> Config {
    let identity = IdentityConfig {
        base_url: "http://127.0.0.1:9".into(),
        tenant: "CUSTOMER".into(),
        client_id: "admin".into(),
        client_secret: Secret::new("fake-admin-secret"),
        scope: None,
        ca_file: None,
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(5),
    };
    Config {
        tokens,
        callers,
        ..Config::minimal(identity)
    }
}

/// `n` concurrent first requests for `caller`: the generations of the tokens they got (each must
/// get one).
pub async fn concurrent_generations(broker: &Arc<Broker>, caller: &str, n: usize) -> HashSet<u64> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let b = Arc::clone(broker);
            let caller = caller.to_string();
            tokio::spawn(async move { b.token(&caller).await })
        })
        .collect();
    let mut generations = HashSet::new();
    for t in tasks {
        generations.insert(
            t.await
                .unwrap()
                .expect("every request gets a token")
                .generation,
        );
    }
    generations
}

/// A caller with a placeholder key hash and the token policy's defaults.
pub fn caller(name: &str) -> CallerConfig {
    CallerConfig {
        name: name.into(),
        client_id: None,
        key_hashes: vec![[0; 32]],
        cert_identities: vec![],
        inject: None,
        max_count_of_uses: None,
    }
}
