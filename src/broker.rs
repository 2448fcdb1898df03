//! The token broker: for every caller, a valid credential ready to inject.
//!
//! Three credentials, each in a `moka` cache whose entries expire when the credential stops being
//! usable (real expiry minus a skew margin), so an expired token is never handed out:
//! the shared admin bearer (client_credentials), each caller's API token (create, then
//! regenerate) and each caller's inject token (the exchanged access token, or the API token
//! itself in `api_token` mode), the last one kept as a ready `HeaderValue` behind an `Arc`.
//!
//! - Single flight: cache misses go through `try_get_with`; the fetches behind them, and the
//!   background refresh, take a per-credential lock and re-check before calling out.
//! - Refresh ahead: one task per active caller renews at the policy point (`policy.rs`).
//! - Outage: each credential has a backoff gate (`gate.rs`): at most one attempt per step.
//! - Recovery ladder (`ladder.rs`): access refused -> exchange again; API token invalid ->
//!   regenerate; regenerate refused -> create; admin bearer refused -> one new bearer.
//! - Persistence (`state_file.rs`): API tokens survive restarts.
//!
//! It never logs a secret: tokens are `Secret`s, logs carry ids and suffixes only.

mod gate;
mod ladder;
pub mod policy;
mod refresh;
mod state_file;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;
use moka::future::Cache;

use crate::config::{CallerConfig, Config, IdentityConfig, InjectMode, TokenPolicy};
use crate::identity::IdentityClient;
use crate::metrics::{CallerLabels, Metrics};
use crate::secret::Secret;
use crate::server::Shutdown;
use gate::Gate;
use policy::Timing;

/// What a request injects: a ready `Authorization` value (marked sensitive) and the generation it
/// belongs to, so that an upstream 401 can invalidate exactly that generation.
#[derive(Debug)]
pub struct InjectToken {
    pub header: HeaderValue,
    pub generation: u64,
}

/// No valid token can be had for the caller right now.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no valid token for caller {caller}: {reason}")]
pub struct TokenUnavailable {
    pub caller: String,
    pub reason: String,
    pub retry_after: Duration,
}

pub type TokenResult = Result<Arc<InjectToken>, TokenUnavailable>;

/// Why the broker could not start (bad identity-service settings such as an unreadable CA file).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokerError(pub String);

/// Per-caller status for `/tokens` and metrics. Holds no secret.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallerStatus {
    pub caller: String,
    /// `empty` (nothing fetched yet), `ready`, `failing` (has a valid token, renewals fail),
    /// `unavailable` (no valid token, fetches fail).
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
    pub waited_requests: u64,
    /// Identity calls made for this caller, by `<kind>_<outcome>` (e.g. `exchange_ok`).
    pub fetches: std::collections::BTreeMap<String, u64>,
}

fn rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    use time::format_description::well_known::Rfc3339;
    match t.map(|t| time::OffsetDateTime::from(t).format(&Rfc3339)) {
        Some(Ok(text)) => s.serialize_some(&text),
        _ => s.serialize_none(),
    }
}

/// A credential with its timing; entries of the caches.
struct Held<T> {
    value: T,
    generation: u64,
    received: Instant,
    /// After this it is never handed out (real expiry minus skew).
    usable_until: Instant,
    /// When the refresh task renews it.
    refresh_at: Instant,
    /// Wall-clock expiry, for the state file only.
    expires_wall: SystemTime,
}

impl<T> Held<T> {
    fn new(
        value: T,
        generation: u64,
        received: Instant,
        lifetime: Duration,
        timing: &Timing,
    ) -> Self {
        let usable = policy::usable_for(lifetime, timing.expiry_skew);
        let refresh = policy::refresh_in(lifetime, timing, rand::random::<f64>() * 2.0 - 1.0);
        let age = received.elapsed();
        Held {
            value,
            generation,
            received,
            usable_until: received + usable,
            refresh_at: received + refresh,
            expires_wall: SystemTime::now() + lifetime.saturating_sub(age),
        }
    }
}

/// The caller's API token.
struct ApiCred {
    id: String,
    token: Secret,
    suffix: String,
    /// Set once it has been exchanged (matters with `max_count_of_uses = 1`).
    exchanged: AtomicBool,
}

/// The caller's inject token.
struct InjectCred {
    inject: Arc<InjectToken>,
    /// Set by the first upstream 401 for this generation.
    rejected: AtomicBool,
}

/// Expires cache entries when their credential stops being usable.
struct UntilUnusable;

impl<K, T> moka::Expiry<K, Arc<Held<T>>> for UntilUnusable {
    fn expire_after_create(&self, _: &K, v: &Arc<Held<T>>, now: Instant) -> Option<Duration> {
        Some(v.usable_until.saturating_duration_since(now))
    }
    fn expire_after_update(
        &self,
        _: &K,
        v: &Arc<Held<T>>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.usable_until.saturating_duration_since(now))
    }
}

fn cache<K, T>() -> Cache<K, Arc<Held<T>>>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    T: Send + Sync + 'static,
{
    Cache::builder().expire_after(UntilUnusable).build()
}

/// How a caller's tokens are obtained.
#[derive(Clone, Debug)]
struct CallerSettings {
    client_id: Option<String>,
    inject: InjectMode,
    single_use: bool,
    max_count_of_uses: Option<i32>,
    display_name: String,
}

impl CallerSettings {
    fn new(caller: &CallerConfig, policy: &TokenPolicy) -> Self {
        let max = caller.max_count_of_uses.or(policy.max_count_of_uses);
        CallerSettings {
            client_id: caller.client_id.clone(),
            inject: caller.inject.unwrap_or(policy.inject),
            single_use: max == Some(1),
            max_count_of_uses: max,
            display_name: display_name(&policy.display_name_prefix, &caller.name),
        }
    }
}

/// `<prefix>-<caller>`, kept within the service's 3..255 characters.
fn display_name(prefix: &str, caller: &str) -> String {
    let mut name: String = format!("{prefix}-{caller}").chars().take(255).collect();
    while name.chars().count() < 3 {
        name.push('-');
    }
    name
}

/// One caller's locks, gate and status; its tokens live in the broker's caches.
struct CallerState {
    name: Arc<str>,
    settings: RwLock<CallerSettings>,
    /// Held while obtaining the inject token (single flight with the refresh task).
    inject_lock: tokio::sync::Mutex<()>,
    /// Held while creating or regenerating the API token.
    api_lock: tokio::sync::Mutex<()>,
    gate: Mutex<Gate>,
    /// Has obtained a token at least once: the refresh task keeps it fresh from then on.
    active: AtomicBool,
    last_renewal: Mutex<Option<SystemTime>>,
    waited: AtomicU64,
    fetches: Mutex<std::collections::BTreeMap<String, u64>>,
    /// The inject token obtained last (also before the cache has it): what the single-flight
    /// re-check and the refresh schedule look at.
    latest: Mutex<Option<Arc<Held<InjectCred>>>>,
    /// The last inject generation an upstream refused (api_token mode regenerates on it).
    rejected_generation: AtomicU64,
    wake: tokio::sync::Notify,
    removed: AtomicBool,
}

impl CallerState {
    fn new(name: &str, settings: CallerSettings) -> Arc<Self> {
        Arc::new(CallerState {
            name: Arc::from(name),
            settings: RwLock::new(settings),
            inject_lock: tokio::sync::Mutex::new(()),
            api_lock: tokio::sync::Mutex::new(()),
            gate: Mutex::new(Gate::default()),
            active: AtomicBool::new(false),
            last_renewal: Mutex::new(None),
            waited: AtomicU64::new(0),
            fetches: Mutex::default(),
            latest: Mutex::default(),
            rejected_generation: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            removed: AtomicBool::new(false),
        })
    }

    fn settings(&self) -> CallerSettings {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The latest inject token while it is usable.
    fn latest(&self) -> Option<Arc<Held<InjectCred>>> {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .filter(|h| h.usable_until > Instant::now())
    }
}

/// The identity-service settings the broker uses, swapped whole on reload.
struct Identity {
    client: IdentityClient,
    client_id: String,
    client_secret: Secret,
    scope: Option<String>,
    config: IdentityConfig,
}

/// Holds every caller's credentials. Share it as `Arc<Broker>`.
pub struct Broker {
    identity: RwLock<Arc<Identity>>,
    policy: RwLock<Arc<TokenPolicy>>,
    callers: RwLock<HashMap<Arc<str>, Arc<CallerState>>>,
    admin: Cache<(), Arc<Held<Secret>>>,
    admin_lock: tokio::sync::Mutex<()>,
    admin_gate: Mutex<Gate>,
    api: Cache<Arc<str>, Arc<Held<ApiCred>>>,
    inject: Cache<Arc<str>, Arc<Held<InjectCred>>>,
    generations: AtomicU64,
    metrics: Arc<Metrics>,
    state_file: Option<PathBuf>,
    /// Serializes state-file writes.
    state_lock: tokio::sync::Mutex<()>,
    ready: AtomicBool,
    stop: Shutdown,
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read().unwrap_or_else(|e| e.into_inner()).clone()
}

impl Broker {
    /// Builds the identity client, loads the state file, and starts the refresh tasks (and warm-up
    /// when configured). Binds no port.
    pub async fn start(config: &Config, metrics: Arc<Metrics>) -> Result<Arc<Broker>, BrokerError> {
        let identity = Identity::new(&config.identity)?;
        let policy = config.tokens.clone();
        let broker = Arc::new(Broker {
            identity: RwLock::new(Arc::new(identity)),
            policy: RwLock::new(Arc::new(policy.clone())),
            callers: RwLock::new(HashMap::new()),
            admin: cache(),
            admin_lock: tokio::sync::Mutex::new(()),
            admin_gate: Mutex::new(Gate::default()),
            api: cache(),
            inject: cache(),
            generations: AtomicU64::new(0),
            metrics,
            state_file: policy.state_file.clone(),
            state_lock: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(!policy.warm_up),
            stop: Shutdown::new(),
        });
        for caller in &config.callers {
            broker.add_caller(caller, &policy);
        }
        broker.restore_state().await;
        if policy.warm_up {
            let b = Arc::clone(&broker);
            tokio::spawn(async move { b.warm_up().await });
        }
        Ok(broker)
    }

    fn add_caller(self: &Arc<Self>, caller: &CallerConfig, policy: &TokenPolicy) {
        let state = CallerState::new(&caller.name, CallerSettings::new(caller, policy));
        self.callers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(Arc::clone(&state.name), Arc::clone(&state));
        refresh::spawn(Arc::downgrade(self), state);
    }

    fn caller(&self, name: &str) -> Option<Arc<CallerState>> {
        self.callers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn all_callers(&self) -> Vec<Arc<CallerState>> {
        self.callers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
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

    fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The caller's token: a cache hit is an `Arc` clone; a miss waits on the one fetch in flight.
    pub async fn token(&self, caller: &str) -> TokenResult {
        if let Some(held) = self.inject.get(caller).await {
            return Ok(Arc::clone(&held.value.inject));
        }
        // Boxed: the whole fetch would otherwise be inlined into every request's future, which
        // hyper reserves per connection (17 KB each).
        Box::pin(self.token_miss(caller)).await
    }

    async fn token_miss(&self, caller: &str) -> TokenResult {
        let Some(state) = self.caller(caller) else {
            return Err(TokenUnavailable {
                caller: caller.to_string(),
                reason: "unknown caller".into(),
                retry_after: Duration::from_secs(1),
            });
        };
        state.waited.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .token_waiters
            .get_or_create(&CallerLabels {
                caller: caller.to_string(),
            })
            .inc();
        let key = Arc::clone(&state.name);
        let result = self
            .inject
            .try_get_with(key, self.obtain_inject(&state, None))
            .await;
        match result {
            Ok(held) => Ok(Arc::clone(&held.value.inject)),
            Err(failure) => Err(TokenUnavailable {
                caller: caller.to_string(),
                reason: failure.reason.clone(),
                retry_after: failure.retry_after.max(Duration::from_secs(1)),
            }),
        }
    }

    /// The upstream refused `generation` with 401: marks it bad (once for any number of concurrent
    /// calls with the same generation) and returns the renewed token.
    pub async fn rejected(&self, caller: &str, generation: u64) -> TokenResult {
        if let Some(state) = self.caller(caller) {
            if let Some(held) = state.latest() {
                if held.generation == generation
                    && !held.value.rejected.swap(true, Ordering::AcqRel)
                {
                    tracing::info!(caller, generation, "upstream refused the token; renewing");
                    state
                        .rejected_generation
                        .store(generation, Ordering::Release);
                    self.inject.invalidate(caller).await;
                }
            }
        }
        self.token(caller).await
    }

    /// Applies a reloaded config (callers added or removed, policy and identity settings changed).
    pub fn reconfigure(self: &Arc<Self>, config: &Config) {
        let current = read(&self.identity);
        if !current.config.same_as(&config.identity) {
            match Identity::new(&config.identity) {
                Ok(identity) => {
                    *self.identity.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(identity);
                    self.admin.invalidate_all();
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
        let existing = self.all_callers();
        for state in existing {
            match wanted.get(&*state.name) {
                Some(caller) => {
                    let settings = CallerSettings::new(caller, &policy);
                    let old = state.settings();
                    let changed =
                        old.client_id != settings.client_id || old.inject != settings.inject;
                    *state.settings.write().unwrap_or_else(|e| e.into_inner()) = settings;
                    if changed {
                        // tokens for another client or another mode: start over
                        let api = self.api.clone();
                        let inject = self.inject.clone();
                        let name = Arc::clone(&state.name);
                        tokio::spawn(async move {
                            api.invalidate(&name).await;
                            inject.invalidate(&name).await;
                        });
                    }
                }
                None => {
                    state.removed.store(true, Ordering::Release);
                    state.wake.notify_one();
                    self.callers
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&state.name);
                    let api = self.api.clone();
                    let inject = self.inject.clone();
                    tokio::spawn(async move {
                        api.invalidate(&state.name).await;
                        inject.invalidate(&state.name).await;
                    });
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
                _ = tokio::time::sleep(self.timing().backoff_initial) => {}
                _ = self.stop.wait() => break,
            }
        }
        tracing::info!(callers = names.len(), "warm-up finished");
        self.ready.store(true, Ordering::Release);
    }

    /// Status of every caller, sorted by name.
    pub fn status(&self) -> Vec<CallerStatus> {
        let now = Instant::now();
        let mut callers = self.all_callers();
        callers.sort_by(|a, b| a.name.cmp(&b.name));
        callers
            .into_iter()
            .map(|c| {
                let api = self.api.get_sync(&c.name);
                let inject = self.inject.get_sync(&c.name);
                let gate = c.gate.lock().unwrap_or_else(|e| e.into_inner());
                let failing = gate.failures() > 0;
                let state = match (&inject, failing) {
                    (Some(_), false) => "ready",
                    (Some(_), true) => "failing",
                    (None, true) => "unavailable",
                    (None, false) => "empty",
                };
                CallerStatus {
                    caller: c.name.to_string(),
                    state,
                    api_token_id: api.as_ref().map(|a| a.value.id.clone()),
                    api_token_suffix: api.as_ref().map(|a| a.value.suffix.clone()),
                    api_token_expires_in_secs: api
                        .as_ref()
                        .map(|a| a.usable_until.saturating_duration_since(now).as_secs()),
                    access_token_expires_in_secs: inject
                        .as_ref()
                        .map(|a| a.usable_until.saturating_duration_since(now).as_secs()),
                    generation: inject.as_ref().map_or(0, |i| i.generation),
                    last_renewal: *c.last_renewal.lock().unwrap_or_else(|e| e.into_inner()),
                    last_error: gate.last_error().map(str::to_string),
                    waited_requests: c.waited.load(Ordering::Relaxed),
                    fetches: c.fetches.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                }
            })
            .collect()
    }

    /// Stops the refresh tasks and writes the state file.
    pub async fn shutdown(&self) {
        self.stop.trigger();
        self.save_state().await;
    }
}

/// Non-async reads for the status page (moka's sync view of a future cache).
trait GetSync<V> {
    fn get_sync(&self, key: &str) -> Option<V>;
}

impl<T: Send + Sync + 'static> GetSync<Arc<Held<T>>> for Cache<Arc<str>, Arc<Held<T>>> {
    fn get_sync(&self, key: &str) -> Option<Arc<Held<T>>> {
        self.iter()
            .find(|(k, _)| &***k == key)
            .map(|(_, v)| v)
            .filter(|v| v.usable_until > Instant::now())
    }
}

impl Identity {
    fn new(config: &IdentityConfig) -> Result<Self, BrokerError> {
        let client = IdentityClient::new(config).map_err(BrokerError)?;
        Ok(Identity {
            client,
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            scope: config.scope.clone(),
            config: config.clone(),
        })
    }
}

impl IdentityConfig {
    fn same_as(&self, other: &IdentityConfig) -> bool {
        self.base_url == other.base_url
            && self.tenant == other.tenant
            && self.client_id == other.client_id
            && self.client_secret == other.client_secret
            && self.scope == other.scope
            && self.ca_file == other.ca_file
            && self.connect_timeout == other.connect_timeout
            && self.request_timeout == other.request_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_fit_the_service_rules() {
        assert_eq!(
            display_name("tokenbroker", "billing"),
            "tokenbroker-billing"
        );
        assert_eq!(display_name("", "a"), "-a-");
        assert_eq!(display_name("p", &"x".repeat(400)).chars().count(), 255);
    }
}
