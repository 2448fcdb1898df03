//! The token broker: for every caller, a valid credential ready to inject.
//!
//! Three credentials: the shared admin bearer (client_credentials), each caller's API token
//! (create, then regenerate) and each caller's inject token (the exchanged access token, or the
//! API token itself in `api_token` mode), the last one kept as a ready `HeaderValue` behind an
//! `Arc`. Each caller's tokens are held once, in an `ArcSwap` the request path reads without a
//! lock; a token past its usable point (real expiry minus a skew margin) is never handed out.
//!
//! - Single flight (`flight.rs`): one renewal per caller at a time, in a task of its own;
//!   requests without a valid token wait for it, at most `tokens.max_wait`.
//! - Refresh ahead (`refresh.rs`): one task per active caller renews at the policy point
//!   (`policy.rs`), off the request path.
//! - Recovery ladder (`ladder.rs`): definitive answers act at once, back to back: exchange
//!   refused -> regenerate -> refused -> create -> exchange; admin bearer refused -> one new bearer.
//! - Every identity call goes through one gateway (`gateway.rs`): bounded concurrency, the
//!   breaker's admission, spans and metrics.
//! - One health view of the identity service (`health.rs`): transient failures open a circuit
//!   breaker shared by every caller; one probe per backoff step, `Retry-After` honoured; when it
//!   answers again every caller that needs a token renews at once (bounded concurrency).
//! - Callers cannot drive the identity service: the first upstream 401 for a token renews it
//!   once (whatever its age) and replays; a caller renews on 401s at most once per
//!   `tokens.min_renew_interval`, so a token a 401 just produced, refused again, is passed on.
//! - Persistence (`state_file.rs`): API tokens survive restarts. With the shared store
//!   (`shared.rs`, `store.rs`), one API token and one access token per caller for every replica.
//! - Lasting conditions (the store away, a record that does not open) are warned about once per
//!   interval, with a count (`repeats.rs`).
//! - Each caller's state and counters live in `caller.rs`; the identity service is reached
//!   through a trait (`identity_service.rs`), so tests run on paused time against a fake.
//! - Its metric families are its own ([`metrics`]); the store registers its own
//!   (`store::metrics`).
//!
//! Time is tokio's clock (`tokio::time::Instant`); wall-clock time is used only for the state
//! file and status dates. It never logs a secret: tokens are `Secret`s, logs carry ids and
//! suffixes only.

mod caller;
mod flight;
mod gate;
mod gateway;
mod health;
mod identity_service;
mod ladder;
pub mod metrics;
mod policy;
mod refresh;
mod repeats;
mod shared;
mod state_file;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::config::{CallerConfig, Config, IdentityConfig, TokenPolicy};
use crate::identity::IdentityClient;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::server::Shutdown;
use crate::token::{Rejection, TokenResult, TokenUnavailable};
pub use caller::SharedCopy;
use caller::{CallerSettings, CallerState, Failure, Held, Renewal, Trigger, UpstreamClaim};
use flight::Flight;
use gate::Gate;
use gateway::Gateway;
pub use health::HealthStatus;
pub use identity_service::IdentityService;
pub use metrics::BrokerMetrics;
use policy::Timing;

/// Why the broker could not start (bad identity-service settings such as an unreadable CA file).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokerError(pub String);

/// Per-caller status for `/tokens` and metrics. Holds no secret.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallerStatus {
    pub caller: String,
    /// `empty` (nothing fetched yet), `ready`, `failing` (has a valid token, renewals fail),
    /// `unavailable` (no valid token, renewals fail).
    pub state: &'static str,
    pub api_token_id: Option<String>,
    pub api_token_suffix: Option<String>,
    pub api_token_expires_in_secs: Option<u64>,
    pub access_token_expires_in_secs: Option<u64>,
    pub generation: u64,
    /// When a token was last obtained, as RFC 3339 UTC (e.g. `2026-11-23T10:41:07.123Z`).
    #[serde(serialize_with = "rfc3339")]
    pub last_renewal: Option<SystemTime>,
    pub last_error: Option<String>,
    /// Requests that found no valid token and waited for a renewal.
    pub waited_requests: u64,
    /// Of those, the ones that gave up after `tokens.max_wait`.
    pub wait_timeouts: u64,
    /// Identity calls made for this caller, by `<kind>_<outcome>` (e.g. `exchange_ok`).
    pub fetches: BTreeMap<String, u64>,
    /// Successful renewals by trigger (`request`, `schedule`, `upstream_401`, `recovery`).
    pub renewals: BTreeMap<String, u64>,
    /// With the shared store: this replica's copy of the caller's record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreView>,
}

/// A caller's shared record as this replica sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreView {
    #[serde(flatten)]
    pub copy: caller::SharedCopy,
    /// The tokens in memory are the newest shared ones.
    pub current: bool,
}

/// The whole status page: the identity service's health and every caller.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub identity_service: HealthStatus,
    pub callers: Vec<CallerStatus>,
}

fn rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    use time::format_description::well_known::Rfc3339;
    match t.map(|t| time::OffsetDateTime::from(t).format(&Rfc3339)) {
        Some(Ok(text)) => s.serialize_some(&text),
        _ => s.serialize_none(),
    }
}

/// Builds the identity service for a config (the real client, or a test's fake).
type MakeService =
    Box<dyn Fn(&IdentityConfig) -> Result<Arc<dyn IdentityService>, String> + Send + Sync>;

/// The identity-service settings the broker uses, swapped whole on reload.
struct Identity {
    service: Arc<dyn IdentityService>,
    config: IdentityConfig,
}

/// Holds every caller's credentials. Share it as `Arc<Broker>`.
pub struct Broker {
    me: Weak<Broker>,
    identity: RwLock<Arc<Identity>>,
    make_service: MakeService,
    policy: RwLock<Arc<TokenPolicy>>,
    /// Every caller, replaced whole when callers come or go (a reload): read without a lock.
    callers: ArcSwap<HashMap<Arc<str>, Arc<CallerState>>>,
    admin: Mutex<Option<Arc<Held<Secret>>>>,
    admin_flight: Flight<Result<Arc<Held<Secret>>, gateway::CallError>>,
    /// Backoff after the admin bearer is refused (wrong client secret).
    admin_gate: Mutex<Gate>,
    /// Every identity call goes through it; it holds the breaker.
    gateway: Gateway,
    /// Numbers every inject token this broker makes: its generation, which a request carries
    /// and an upstream 401 names. (A shared record's generation is the store's own count.)
    generations: AtomicU64,
    metrics: Arc<BrokerMetrics>,
    state_file: Option<PathBuf>,
    /// Serializes state-file writes.
    state_lock: tokio::sync::Mutex<()>,
    ready: AtomicBool,
    stop: Shutdown,
    /// `[store] kind = "redis"` (or a test's in-memory store): tokens shared with every replica.
    store: Option<Arc<dyn store::TokenStore>>,
    /// Warnings of lasting conditions, by kind, let through once per interval.
    repeats: Mutex<HashMap<&'static str, repeats::Repeats>>,
    /// The runtime the broker started on, where every renewal runs (not a proxy worker's: see
    /// `flight`).
    runtime: tokio::runtime::Handle,
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Broker {
    /// Builds the identity client, loads the state file, and starts the refresh tasks (and warm-up
    /// when configured). Binds no port.
    pub async fn start(config: &Config, metrics: Arc<Metrics>) -> Result<Arc<Broker>, BrokerError> {
        Self::start_with(
            config,
            metrics,
            Box::new(|c: &IdentityConfig| {
                IdentityClient::new(c).map(|client| Arc::new(client) as Arc<dyn IdentityService>)
            }),
        )
        .await
    }

    /// Like [`Broker::start`], against the identity service `service` (a fake, in tests); a
    /// reload keeps it.
    pub async fn start_against(
        config: &Config,
        metrics: Arc<Metrics>,
        service: Arc<dyn IdentityService>,
    ) -> Result<Arc<Broker>, BrokerError> {
        Self::start_with(
            config,
            metrics,
            Box::new(move |_: &IdentityConfig| Ok(Arc::clone(&service))),
        )
        .await
    }

    /// Like [`Broker::start_against`], sharing tokens through `store` (an in-memory store, in
    /// tests) whatever `[store]` says.
    pub async fn start_shared(
        config: &Config,
        metrics: Arc<Metrics>,
        service: Arc<dyn IdentityService>,
        store: Arc<dyn store::TokenStore>,
    ) -> Result<Arc<Broker>, BrokerError> {
        Self::start_from(
            config,
            metrics,
            Box::new(move |_: &IdentityConfig| Ok(Arc::clone(&service))),
            Some(store),
        )
        .await
    }

    async fn start_with(
        config: &Config,
        metrics: Arc<Metrics>,
        make_service: MakeService,
    ) -> Result<Arc<Broker>, BrokerError> {
        Self::start_from(config, metrics, make_service, None).await
    }

    /// Starts the broker; `store`: the shared store, or `None` for the one `[store]` names.
    async fn start_from(
        config: &Config,
        metrics: Arc<Metrics>,
        make_service: MakeService,
        store: Option<Arc<dyn store::TokenStore>>,
    ) -> Result<Arc<Broker>, BrokerError> {
        let identity = Identity {
            service: make_service(&config.identity).map_err(BrokerError)?,
            config: config.identity.clone(),
        };
        let policy = config.tokens.clone();
        let broker_metrics = metrics.set::<BrokerMetrics>();
        // The store's families too, whichever store there is: `store_up` is 0 without Redis.
        metrics.set::<store::StoreMetrics>();
        let store = match (store, config.store.redis()) {
            (Some(store), _) => Some(store),
            (None, Some(redis)) => Some(Arc::new(
                store::RedisStore::connect(redis, Arc::clone(&metrics))
                    .map_err(|e| BrokerError(e.to_string()))?,
            ) as Arc<dyn store::TokenStore>),
            (None, None) => None,
        };
        let broker = Arc::new_cyclic(|me| Broker {
            me: me.clone(),
            identity: RwLock::new(Arc::new(identity)),
            make_service,
            policy: RwLock::new(Arc::new(policy.clone())),
            callers: ArcSwap::default(),
            admin: Mutex::new(None),
            admin_flight: Flight::default(),
            admin_gate: Mutex::new(Gate::default()),
            gateway: Gateway::new(Arc::clone(&broker_metrics)),
            generations: AtomicU64::new(0),
            metrics: broker_metrics,
            state_file: policy.state_file.clone(),
            state_lock: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(!policy.warm_up),
            stop: Shutdown::new(),
            store,
            repeats: Mutex::default(),
            runtime: tokio::runtime::Handle::current(),
        });
        broker
            .metrics
            .set_identity_state(broker.gateway.health.state().name());
        for caller in &config.callers {
            broker.add_caller(caller, &policy);
        }
        broker.restore_state().await;
        if let Some(store) = &broker.store {
            shared::follow(Arc::downgrade(&broker), Arc::clone(store));
            broker.load_shared().await;
        }
        if policy.warm_up {
            let b = Arc::clone(&broker);
            tokio::spawn(async move { b.warm_up().await });
        }
        Ok(broker)
    }

    fn add_caller(self: &Arc<Self>, caller: &CallerConfig, policy: &TokenPolicy) {
        let state = CallerState::new(&caller.name, CallerSettings::new(caller, policy));
        self.callers.rcu(|callers| {
            let mut callers = HashMap::clone(callers);
            callers.insert(Arc::clone(&state.name), Arc::clone(&state));
            callers
        });
        refresh::spawn(Arc::downgrade(self), state);
    }

    fn caller(&self, name: &str) -> Option<Arc<CallerState>> {
        self.callers.load().get(name).cloned()
    }

    fn all_callers(&self) -> Vec<Arc<CallerState>> {
        self.callers.load().values().cloned().collect()
    }

    fn timing(&self) -> Timing {
        Timing::from(&*read(&self.policy))
    }

    fn identity_now(&self) -> Arc<Identity> {
        read(&self.identity)
    }

    fn policy_now(&self) -> Arc<TokenPolicy> {
        read(&self.policy)
    }

    /// `Some(n)` when a warning of `kind` may be logged now (`n`: how many were held back since
    /// the last); once per [`repeats::REPEAT_INTERVAL`].
    fn repeated_warning(&self, kind: &'static str) -> Option<u64> {
        self.repeats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_default()
            .admit(Instant::now())
    }

    fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The caller's token: when it holds a usable one, two lock-free loads and an `Arc` clone;
    /// otherwise waits (at most `tokens.max_wait`) on the one renewal in flight.
    pub async fn token(&self, caller: &str) -> TokenResult {
        if let Some(token) = self
            .callers
            .load()
            .get(caller)
            .and_then(|c| c.ready(Instant::now()))
        {
            return Ok(token);
        }
        // Boxed: the whole wait would otherwise be inlined into every request's future, which
        // hyper reserves per connection.
        Box::pin(self.token_miss(caller)).await
    }

    async fn token_miss(&self, caller: &str) -> TokenResult {
        let Some(c) = self.caller(caller) else {
            return Err(TokenUnavailable {
                caller: caller.to_string(),
                reason: "unknown caller".into(),
                retry_after: Duration::from_secs(1),
            });
        };
        if let Some(held) = c.sound() {
            return Ok(Arc::clone(&held.value.inject));
        }
        c.activate();
        self.wait_for_renewal(&c, Trigger::Request).await
    }

    /// Joins (or starts) the caller's renewal and waits for it, at most `tokens.max_wait`. When
    /// the identity service is known to be down, or this caller is backing off after a refusal,
    /// answers at once instead.
    async fn wait_for_renewal(&self, c: &Arc<CallerState>, trigger: Trigger) -> TokenResult {
        let unavailable = |reason: String, retry_after: Duration| TokenUnavailable {
            caller: c.name.to_string(),
            reason,
            retry_after: retry_after.max(Duration::from_secs(1)),
        };
        if !c.flight.in_flight() {
            if let Some(wait) = c.refusal_wait(Instant::now()) {
                let reason = c.status().last_error.unwrap_or_else(|| "refused".into());
                return Err(unavailable(reason, wait));
            }
            if let health::Admission::Wait(wait) = self.gateway.health.peek() {
                let reason = self
                    .gateway
                    .health
                    .status()
                    .last_error
                    .unwrap_or_else(|| "the identity service is failing".into());
                return Err(unavailable(
                    format!("identity service unavailable: {reason}"),
                    wait,
                ));
            }
        }
        c.record_wait();
        self.metrics.record_waiter(&c.name);
        let renewal = self.renewal(c, trigger);
        let max_wait = self.policy_now().max_wait;
        match tokio::time::timeout(max_wait, renewal).await {
            Ok(Ok(held)) => {
                self.metrics.record_wait("ok");
                Ok(Arc::clone(&held.value.inject))
            }
            Ok(Err(failure)) => {
                self.metrics.record_wait("failed");
                Err(unavailable(failure.reason, failure.retry_after))
            }
            Err(_) => {
                c.record_wait_timeout();
                self.metrics.record_wait("timeout");
                Err(unavailable(
                    format!(
                        "the token renewal in flight did not finish within {}",
                        humantime::format_duration(max_wait)
                    ),
                    Duration::from_secs(1),
                ))
            }
        }
    }

    /// The caller's renewal in flight, or a new one.
    fn renewal(
        &self,
        c: &Arc<CallerState>,
        trigger: Trigger,
    ) -> impl std::future::Future<Output = Renewal> {
        let me = self.me.upgrade();
        let task_caller = Arc::clone(c);
        c.flight.join(
            &self.runtime,
            move || async move {
                match me {
                    Some(broker) => broker.renew(&task_caller, trigger).await,
                    None => Err(Failure {
                        reason: "the broker stopped".into(),
                        retry_after: Duration::from_secs(1),
                    }),
                }
            },
            || {
                Err(Failure {
                    reason: "the token renewal failed unexpectedly".into(),
                    retry_after: Duration::from_secs(1),
                })
            },
        )
    }

    /// The upstream refused `generation` with 401. The first 401 for the current token renews it
    /// (through the whole ladder) whatever its age, and concurrent 401s for it share that one
    /// renewal; but a caller renews on 401s at most once per `tokens.min_renew_interval`, so a
    /// 401 within that interval of the last 401-driven renewal (a token a 401 just produced,
    /// refused again) is to be passed on.
    pub async fn rejected(
        &self,
        caller: &str,
        generation: u64,
    ) -> Result<Rejection, TokenUnavailable> {
        let Some(c) = self.caller(caller) else {
            return Ok(Rejection::PassOn);
        };
        let Some(held) = c.latest() else {
            return self.token(caller).await.map(Rejection::Replay);
        };
        if held.generation() != generation {
            // renewed since that request went out: replay with the newer one
            return Ok(Rejection::Replay(Arc::clone(&held.value.inject)));
        }
        let floor = self.policy_now().min_renew_interval;
        match c.claim_upstream_renewal(&held, Instant::now(), floor) {
            UpstreamClaim::Limited => {
                self.metrics.record_rejection("rate_limited");
                tracing::info!(
                    caller,
                    generation,
                    "upstream refused a token within min_renew_interval of the last 401-driven \
                     renewal; passing the 401 on"
                );
                return Ok(Rejection::PassOn);
            }
            UpstreamClaim::Renew => {
                self.metrics.record_rejection("renewed");
                tracing::info!(caller, generation, "upstream refused the token; renewing");
            }
            UpstreamClaim::Join => {}
        }
        let renewed = self.wait_for_renewal(&c, Trigger::Upstream401).await?;
        if renewed.generation == generation {
            return Ok(Rejection::PassOn);
        }
        Ok(Rejection::Replay(renewed))
    }

    /// Applies a reloaded config (callers added or removed, policy and identity settings changed).
    pub fn reconfigure(self: &Arc<Self>, config: &Config) {
        let current = self.identity_now();
        if current.config != config.identity {
            match (self.make_service)(&config.identity) {
                Ok(service) => {
                    *self.identity.write().unwrap_or_else(|e| e.into_inner()) =
                        Arc::new(Identity {
                            service,
                            config: config.identity.clone(),
                        });
                    *self.admin.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                Err(e) => tracing::error!(error = %e, "identity settings not applied"),
            }
        }
        let policy = config.tokens.clone();
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy.clone());
        let wanted: HashMap<&str, &CallerConfig> = config
            .callers
            .iter()
            .map(|c| (c.name.as_str(), c))
            .collect();
        for c in self.all_callers() {
            match wanted.get(&*c.name) {
                Some(caller) => c.set_settings(CallerSettings::new(caller, &policy)),
                None => {
                    c.remove();
                    self.callers.rcu(|callers| {
                        let mut callers = HashMap::clone(callers);
                        callers.remove(&c.name);
                        callers
                    });
                    c.forget_tokens();
                }
            }
        }
        for caller in &config.callers {
            if self.caller(&caller.name).is_none() {
                self.add_caller(caller, &policy);
            }
        }
    }

    /// True once warm-up (if configured) has given every caller a token.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// While the identity service refuses this client its admin bearer (wrong client id or
    /// secret), why, for `/readyz`: `identity service refused the client: <its answer>`.
    pub fn client_refused(&self) -> Option<String> {
        let gate = self.admin_gate.lock().unwrap_or_else(|e| e.into_inner());
        gate.next_attempt()?;
        Some(format!(
            "identity service refused the client: {}",
            gate.last_error()?
        ))
    }

    async fn warm_up(self: Arc<Self>) {
        let names: Vec<Arc<str>> = self
            .all_callers()
            .into_iter()
            .map(|c| Arc::clone(&c.name))
            .collect();
        loop {
            let mut missing = 0;
            let results = futures_util::future::join_all(names.iter().map(|n| self.token(n))).await;
            for (name, result) in names.iter().zip(results) {
                if let Err(e) = result {
                    missing += 1;
                    tracing::warn!(caller = &**name, reason = %e.reason, "warm-up: no token yet");
                }
            }
            if missing == 0 || self.stop.is_triggered() {
                break;
            }
            tokio::select! {
                _ = async {
                    self.gateway.health.wait_turn().await;
                    tokio::time::sleep(self.timing().backoff_initial).await;
                } => {}
                _ = self.stop.wait() => break,
            }
        }
        tracing::info!(callers = names.len(), "warm-up finished");
        self.ready.store(true, Ordering::Release);
    }

    /// Status of the identity service and of every caller, sorted by name.
    pub fn status(&self) -> Status {
        let mut callers = self.all_callers();
        callers.sort_by(|a, b| a.name.cmp(&b.name));
        Status {
            identity_service: self.gateway.health.status(),
            callers: callers.iter().map(|c| c.status()).collect(),
        }
    }

    /// Sets `token_expiry_seconds` from the callers' current tokens (callers gone since a reload
    /// drop out): the admin listener calls it before each scrape.
    pub fn record_expiries(&self) {
        let callers = self.status().callers;
        self.metrics.set_expiries(callers.iter().flat_map(|s| {
            [
                ("api_token", s.api_token_expires_in_secs),
                ("access_token", s.access_token_expires_in_secs),
            ]
            .into_iter()
            .filter_map(move |(kind, secs)| Some((s.caller.as_str(), kind, secs?)))
        }));
    }

    /// Stops the refresh tasks and writes the state file.
    pub async fn shutdown(&self) {
        self.stop.trigger();
        if let Some(store) = self.store() {
            store.shutdown();
        }
        self.save_state().await;
    }
}
