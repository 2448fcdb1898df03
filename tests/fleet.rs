//! Replicas sharing one store, on paused tokio time: several brokers on one in-memory store
//! (`MemoryStore`) and one fake identity service (`support::fake_identity`). A lease lost by a
//! stalled holder, a newer record adopted instead of renewing, and the store going away and
//! coming back. The same fleet on a real redis-server: `replicas.rs`.

mod support;

use support::broker::caller;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;

use support::fake_identity::{FakeIdentity, Op};
use tokenbroker::broker::store::{MemoryStore, TokenStore};
use tokenbroker::broker::{Broker, BrokerMetrics, IdentityService};
use tokenbroker::config::{Config, TokenPolicy};
use tokenbroker::identity::{AccessToken, ApiToken, CreateRequest, IdentityError};
use tokenbroker::metrics::{Metrics, OutcomeLabels};
use tokenbroker::secret::Secret;
use tokenbroker::token::Rejection;

const LEASE: Duration = Duration::from_secs(1);

fn minutes(n: u64) -> Duration {
    Duration::from_secs(60 * n)
}

fn config() -> Config {
    let tokens = TokenPolicy {
        expiry_skew: Duration::from_millis(500),
        min_margin: Duration::from_millis(500),
        backoff_initial: Duration::from_millis(250),
        backoff_max: Duration::from_secs(2),
        max_wait: Duration::from_secs(10),
        ..TokenPolicy::default()
    };
    support::broker::config_for_fake(vec![caller("billing")], tokens)
}

/// The fake identity service as one replica reaches it: its `create` calls can be made to
/// stall (the replica pauses in the middle of its renewal).
struct Stalling {
    fake: Arc<FakeIdentity>,
    create_stall: Mutex<Option<Duration>>,
}

impl IdentityService for Stalling {
    fn client_credentials<'a>(
        &'a self,
        client_id: &'a str,
        client_secret: &'a Secret,
        scope: Option<&'a str>,
    ) -> BoxFuture<'a, Result<AccessToken, IdentityError>> {
        self.fake
            .client_credentials(client_id, client_secret, scope)
    }

    fn exchange<'a>(
        &'a self,
        api_token: &'a Secret,
    ) -> BoxFuture<'a, Result<AccessToken, IdentityError>> {
        self.fake.exchange(api_token)
    }

    fn create_api_token<'a>(
        &'a self,
        admin: &'a Secret,
        request: &'a CreateRequest,
    ) -> BoxFuture<'a, Result<ApiToken, IdentityError>> {
        let stall = self.create_stall.lock().unwrap().take();
        Box::pin(async move {
            if let Some(stall) = stall {
                pass(stall).await;
            }
            self.fake.create_api_token(admin, request).await
        })
    }

    fn regenerate_api_token<'a>(
        &'a self,
        admin: &'a Secret,
        api_token: &'a Secret,
        ttl_minutes: i64,
    ) -> BoxFuture<'a, Result<ApiToken, IdentityError>> {
        self.fake
            .regenerate_api_token(admin, api_token, ttl_minutes)
    }
}

struct Replica {
    broker: Arc<Broker>,
    store: Arc<MemoryStore>,
    metrics: Arc<Metrics>,
    identity: Arc<Stalling>,
}

impl Replica {
    async fn start(fake: &Arc<FakeIdentity>, store: Arc<MemoryStore>) -> Replica {
        let metrics = Metrics::new();
        let identity = Arc::new(Stalling {
            fake: Arc::clone(fake),
            create_stall: Mutex::new(None),
        });
        let broker = Broker::start_shared(
            &config(),
            Arc::clone(&metrics),
            identity.clone(),
            store.clone() as Arc<dyn TokenStore>,
        )
        .await
        .expect("broker starts");
        Replica {
            broker,
            store,
            metrics,
            identity,
        }
    }

    /// The token this replica injects for billing, as the bare access token.
    async fn token(&self) -> String {
        let token = self.broker.token("billing").await.expect("a token");
        bearer(&token)
    }

    fn shared_outcome(&self, outcome: &'static str) -> u64 {
        self.metrics
            .set::<BrokerMetrics>()
            .store_sharing
            .get_or_create(&OutcomeLabels { outcome })
            .get()
    }

    fn store_view(&self) -> serde_json::Value {
        let status = self.broker.status();
        serde_json::to_value(&status.callers[0]).unwrap()["store"].clone()
    }
}

/// `n` replicas on one store.
async fn fleet(fake: &Arc<FakeIdentity>, n: usize) -> Vec<Replica> {
    let first = MemoryStore::new(LEASE);
    let mut replicas = vec![Replica::start(fake, first.clone()).await];
    for _ in 1..n {
        replicas.push(Replica::start(fake, first.replica()).await);
    }
    replicas
}

fn bearer(token: &tokenbroker::token::InjectToken) -> String {
    let value = token.header.to_str().unwrap();
    value.strip_prefix("Bearer ").unwrap().to_string()
}

/// Lets `d` of paused time pass: every task runs what is due meanwhile; no real time passes.
async fn pass(d: Duration) {
    tokio::time::sleep(d).await
}

/// Waits (on paused time) until `check` holds, at most `limit`.
async fn until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        pass(Duration::from_millis(10)).await;
    }
    true
}

#[tokio::test(start_paused = true)]
async fn three_replicas_asking_at_once_share_one_created_token() {
    let fake = FakeIdentity::new(minutes(30), minutes(600));
    let fleet = fleet(&fake, 3).await;
    let tokens = futures_util::future::join_all(fleet.iter().map(|r| r.token())).await;
    assert!(tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
    assert!(fake.accepts(&tokens[0]));
    assert_eq!(
        (fake.count(Op::Create), fake.count(Op::Exchange)),
        (1, 1),
        "exactly one create and one exchange for the fleet"
    );
    assert_eq!(fleet[0].store.record("billing").unwrap().generation, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_holder_loses_its_lease_and_its_write_is_refused() {
    let fake = FakeIdentity::new(minutes(30), minutes(600));
    let fleet = fleet(&fake, 2).await;
    let (a, b) = (&fleet[0], &fleet[1]);
    // A takes the lease at 0 and stalls in its create; its lease is kept alive every third of
    // the lease (0.33 s, ..., 2.33 s, 2.67 s). B asks at 0.38 s, waits twice the lease for A's
    // write and takes the lease over at 2.38 s; it writes at 2.395 s (three 5 ms calls). A
    // wakes up and tries to write at 2.45 s, before its next keep-alive: refused.
    *a.identity.create_stall.lock().unwrap() = Some(Duration::from_millis(2435));
    let a_token = {
        let broker = Arc::clone(&a.broker);
        tokio::spawn(async move { broker.token("billing").await.map(|t| bearer(&t)) })
    };
    pass(Duration::from_millis(380)).await;
    assert!(a.store.record("billing").is_none(), "A is stalled");
    let b_token = b.token().await;
    let written = b.store.record("billing").expect("B wrote the record");
    assert_eq!(written.generation, 1, "B's write is the first");
    let a_token = a_token.await.unwrap().expect("A gets a token");
    assert_eq!(fake.count(Op::Create), 2, "A's stalled create, and B's");
    assert_eq!(a.shared_outcome("refused"), 1, "A's stale write is refused");
    assert_eq!(a.shared_outcome("written"), 0);
    assert_eq!(b.shared_outcome("written"), 1);
    let record = b.store.record("billing").unwrap();
    assert_eq!(record.generation, 1, "nothing overwrote B's record");
    // A adopted B's tokens instead of its own
    assert_eq!(a.token().await, b_token);
    assert_eq!(
        a_token, b_token,
        "A's request got the shared token, not A's own"
    );
    assert_eq!(a.store_view()["generation"], 1);
    assert_eq!(a.store_view()["current"], true);
}

#[tokio::test(start_paused = true)]
async fn a_replica_adopts_a_newer_record_instead_of_renewing() {
    let fake = FakeIdentity::new(minutes(30), minutes(600));
    let fleet = fleet(&fake, 2).await;
    let (a, b) = (&fleet[0], &fleet[1]);
    let first = a.token().await;
    assert!(until(Duration::from_secs(1), || b.store_view()["generation"] == 1).await);
    assert_eq!(b.token().await, first, "B adopted A's record");
    // B misses the announcement of A's next write (pub/sub is at most once).
    b.store.set_deaf(true);
    pass(Duration::from_secs(6)).await; // past min_renew_interval
    let generation = a.broker.token("billing").await.unwrap().generation;
    let Rejection::Replay(renewed) = a.broker.rejected("billing", generation).await.unwrap() else {
        panic!("A renews the refused token");
    };
    let renewed = bearer(&renewed);
    assert_eq!(a.store.record("billing").unwrap().generation, 2);
    assert_eq!(fake.count(Op::Exchange), 2);
    pass(Duration::from_secs(1)).await;
    assert_eq!(b.token().await, first, "B did not hear of generation 2");
    // The upstream refuses B's (old) token too: B reads the store, finds generation 2 and
    // takes it, with no identity call.
    let generation = b.broker.token("billing").await.unwrap().generation;
    let Rejection::Replay(adopted) = b.broker.rejected("billing", generation).await.unwrap() else {
        panic!("B replays with the newer token");
    };
    assert_eq!(bearer(&adopted), renewed);
    assert_eq!(
        (
            fake.count(Op::Exchange),
            fake.count(Op::Create),
            fake.count(Op::Regenerate)
        ),
        (2, 1, 0),
        "B called nothing"
    );
    assert_eq!(b.store_view()["generation"], 2);
    assert_eq!(b.shared_outcome("adopted"), 2);
}

#[tokio::test(start_paused = true)]
async fn replicas_serve_through_a_store_outage_and_converge_when_it_returns() {
    // access tokens live 5 minutes, API tokens 20: the outage outlives the shared API token
    let fake = FakeIdentity::new(minutes(5), minutes(20));
    let fleet = fleet(&fake, 2).await;
    let (a, b) = (&fleet[0], &fleet[1]);
    let first = a.token().await;
    assert!(until(Duration::from_secs(1), || b.store_view()["generation"] == 1).await);
    assert_eq!(b.token().await, first);
    assert_eq!(fake.count(Op::Create), 1);

    a.store.set_down(true);
    // A quarter of an hour: several access-token renewals each, on the shared API token.
    for _ in 0..15 {
        pass(minutes(1)).await;
        for r in &fleet {
            let token = r.token().await;
            assert!(fake.accepts(&token), "every replica keeps serving");
        }
    }
    assert_eq!(
        fake.count(Op::Regenerate),
        0,
        "nobody regenerates a shared token"
    );
    assert_eq!(
        fake.count(Op::Create),
        1,
        "the shared API token is still usable"
    );
    assert!(
        fake.count(Op::Exchange) >= 5,
        "the first exchange, and at least two renewals by each replica on its own"
    );
    // Past the shared API token's life: each replica creates one of its own, once.
    for _ in 0..10 {
        pass(minutes(1)).await;
        for r in &fleet {
            assert!(fake.accepts(&r.token().await));
        }
    }
    assert_eq!(
        fake.count(Op::Regenerate),
        0,
        "nobody regenerates a shared token"
    );
    assert_eq!(fake.count(Op::Create), 3, "one local API token per replica");
    for r in &fleet {
        assert_eq!(r.store_view()["local_api_token"], true);
    }

    // The store is back: both replicas take the same tokens again.
    a.store.set_down(false);
    let converged = until(minutes(1), || {
        fleet.iter().all(|r| {
            let view = r.store_view();
            view["local_api_token"] == false && view["current"] == true
        })
    })
    .await;
    assert!(
        converged,
        "{:?}",
        fleet.iter().map(Replica::store_view).collect::<Vec<_>>()
    );
    let tokens = [a.token().await, b.token().await];
    assert_eq!(tokens[0], tokens[1], "one token for the fleet again");
    assert!(fake.accepts(&tokens[0]));
    assert_eq!(fake.count(Op::Regenerate), 0);
}
