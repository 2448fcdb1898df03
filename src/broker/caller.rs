//! One caller's credentials and bookkeeping: its settings, its tokens (one `ArcSwap`, the only
//! copy), its renewal flight, its book (refusal backoff, 401 renewal bound, counters) and its
//! store side (copy of the shared record, store backoff). Everything else in the broker goes
//! through these methods; no other file touches the fields.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use super::flight::Flight;
use super::gate::Gate;
use super::policy::{self, Timing};
use super::store::StoredApiToken;
use super::{CallerStatus, StoreView};
use crate::config::{CallerConfig, InjectMode, TokenPolicy};
use crate::secret::Secret;
use crate::token::InjectToken;

/// A credential with its timing.
pub(super) struct Held<T> {
    pub value: T,
    pub received: Instant,
    /// After this it is never handed out (real expiry minus skew).
    pub usable_until: Instant,
    /// When the refresh task renews it.
    pub refresh_at: Instant,
    /// Wall-clock expiry, for the state file only.
    pub expires_wall: SystemTime,
}

impl<T> Held<T> {
    pub fn new(value: T, received: Instant, lifetime: Duration, timing: &Timing) -> Self {
        let usable = policy::usable_for(lifetime, timing.expiry_skew);
        let refresh = policy::refresh_in(lifetime, timing, rand::random::<f64>() * 2.0 - 1.0);
        let age = received.elapsed();
        Held {
            value,
            received,
            usable_until: received + usable,
            refresh_at: received + refresh,
            expires_wall: SystemTime::now() + lifetime.saturating_sub(age),
        }
    }

    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    /// Due for renewal (or no longer usable).
    pub fn is_due(&self, now: Instant) -> bool {
        now >= self.refresh_at
    }
}

/// The caller's API token.
pub(super) struct ApiCred {
    pub id: String,
    pub token: Secret,
    pub suffix: String,
    /// Set once it has been exchanged (matters with `max_count_of_uses = 1`).
    pub exchanged: AtomicBool,
}

impl ApiCred {
    pub fn new(id: String, token: Secret, suffix: String) -> Self {
        ApiCred {
            id,
            token,
            suffix,
            exchanged: AtomicBool::new(false),
        }
    }

    pub fn exchanged_once(&self) -> bool {
        self.exchanged.load(Ordering::Acquire)
    }
}

impl Held<InjectCred> {
    /// The inject token's generation: what a request carries and an upstream 401 names.
    pub fn generation(&self) -> u64 {
        self.value.inject.generation
    }

    /// In `api_token` mode: this inject token is `api` itself.
    pub fn is_api_token(&self, api: &ApiCred) -> bool {
        self.value.token == api.token
    }

    pub fn is_rejected(&self) -> bool {
        self.value.rejected.load(Ordering::Acquire)
    }
}

/// Remaining life of a stored token, by the wall clock (replicas' clocks are assumed to agree
/// within the expiry skew).
pub(super) fn remaining(expires: SystemTime) -> Option<Duration> {
    expires
        .duration_since(SystemTime::now())
        .ok()
        .filter(|d| !d.is_zero())
}

impl Held<ApiCred> {
    /// A stored API token (shared record or state file) taken into memory now, while it has
    /// life left; `exchanged`: an access token was exchanged from it (matters for single use).
    pub fn from_stored(stored: &StoredApiToken, exchanged: bool, timing: &Timing) -> Option<Self> {
        let left = remaining(stored.expires)?;
        let cred = ApiCred::new(
            stored.id.clone(),
            stored.token.clone(),
            stored.suffix.clone(),
        );
        cred.exchanged.store(exchanged, Ordering::Release);
        Some(Held::new(cred, Instant::now(), left, timing))
    }
}

/// The caller's inject token.
pub(super) struct InjectCred {
    /// The bare token (for the shared store).
    pub token: Secret,
    pub inject: Arc<InjectToken>,
    /// Set by the first upstream 401 for this generation that leads to a renewal.
    pub rejected: AtomicBool,
}

/// What an upstream 401 for the current inject token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UpstreamClaim {
    /// Renew: the first 401 for this token, and the caller's last 401-driven renewal is at least
    /// `min_renew_interval` ago.
    Renew,
    /// Another 401 for this token started its renewal already: wait for that one.
    Join,
    /// The caller renewed on a 401 less than `min_renew_interval` ago: pass the 401 on.
    Limited,
}

/// Why a renewal failed, as handed to waiting requests.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub reason: String,
    pub retry_after: Duration,
}

pub(super) type Renewal = Result<Arc<Held<InjectCred>>, Failure>;

/// What started a renewal (the `trigger` label of `token_renewals_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Trigger {
    /// A request found no valid token.
    Request,
    /// The refresh point of a token passed.
    Schedule,
    /// The upstream answered 401 for the current token.
    Upstream401,
    /// The identity service answers again after an outage.
    Recovery,
}

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Trigger::Request => "request",
            Trigger::Schedule => "schedule",
            Trigger::Upstream401 => "upstream_401",
            Trigger::Recovery => "recovery",
        }
    }
}

/// How a caller's tokens are obtained.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct CallerSettings {
    pub client_id: Option<String>,
    pub inject: InjectMode,
    pub single_use: bool,
    pub max_count_of_uses: Option<i32>,
    pub display_name: String,
}

impl CallerSettings {
    pub fn new(caller: &CallerConfig, policy: &TokenPolicy) -> Self {
        let max = caller.max_count_of_uses.or(policy.max_count_of_uses);
        CallerSettings {
            client_id: caller.client_id.clone(),
            inject: caller.inject.unwrap_or(policy.inject),
            single_use: max == Some(1),
            max_count_of_uses: max,
            display_name: display_name(&policy.display_name_prefix, &caller.name),
        }
    }

    /// Tokens obtained under `self` are no good under `other` (another client or mode).
    fn needs_new_tokens(&self, other: &CallerSettings) -> bool {
        self.client_id != other.client_id || self.inject != other.inject
    }
}

/// `<prefix>-<caller>`, kept within the service's 3..255 characters.
pub(super) fn display_name(prefix: &str, caller: &str) -> String {
    let mut name: String = format!("{prefix}-{caller}").chars().take(255).collect();
    while name.chars().count() < 3 {
        name.push('-');
    }
    name
}

/// Counters and last outcomes, for `/tokens`.
#[derive(Default)]
struct Stats {
    last_renewal: Option<SystemTime>,
    last_error: Option<String>,
    /// The last renewal failed.
    failing: bool,
    /// Identity calls by `<kind>_<outcome>`.
    fetches: BTreeMap<String, u64>,
    /// Renewals by trigger.
    renewals: BTreeMap<&'static str, u64>,
    /// Requests that found no valid token and waited.
    waited: u64,
    /// Of those, the ones that gave up.
    wait_timeouts: u64,
}

/// What renewals and upstream 401s leave behind; they change together, under one lock.
#[derive(Default)]
struct Book {
    /// Backoff after definitive refusals (a configuration problem of this caller).
    refusal: Gate,
    /// When the caller's last 401-driven renewal was claimed or produced a token: the next may
    /// come `min_renew_interval` later.
    upstream_renewed: Option<Instant>,
    stats: Stats,
}

/// With the shared store: this replica's copy of the record, and the refresh task's backoff
/// after a renewal that could not go through the store (unreachable, or a record it cannot
/// replace).
#[derive(Default)]
struct StoreSide {
    copy: SharedCopy,
    backoff: Gate,
}

/// A caller's current credentials, replaced whole: the API token and the inject token (in
/// `api_token` mode, the API token itself).
#[derive(Default)]
pub(super) struct Tokens {
    pub api: Option<Arc<Held<ApiCred>>>,
    pub inject: Option<Arc<Held<InjectCred>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) struct CallerState {
    pub name: Arc<str>,
    settings: RwLock<CallerSettings>,
    /// The one renewal in flight (inject token, and the API token behind it).
    pub flight: Flight<Renewal>,
    /// The caller's tokens, held only here; the request path reads them without a lock.
    tokens: ArcSwap<Tokens>,
    book: Mutex<Book>,
    store: Mutex<StoreSide>,
    /// Has asked for a token at least once: the refresh task keeps it fresh from then on.
    active: AtomicBool,
    removed: AtomicBool,
    /// Wakes the refresh task (first use, removal).
    pub wake: tokio::sync::Notify,
}

/// This replica's copy of a caller's record in the shared store.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SharedCopy {
    /// The record generation the tokens in memory come from (0: none).
    pub generation: u64,
    /// The highest record generation this replica has heard of.
    pub latest_seen: u64,
    /// Who held the renewal lease at this replica's last attempt: `this_replica`, `other`.
    pub lease: Option<&'static str>,
    /// The API token in memory is this replica's own, created while the store was unreachable;
    /// it is replaced by the shared one when the store is back.
    pub local_api_token: bool,
    /// The id of the seal key the newest record this replica read or wrote was sealed with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealed_with: Option<String>,
    /// Why the stored record did not open at this replica's last read (it is replaced by the
    /// next renewal); `None` once a read or write succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_error: Option<String>,
}

impl CallerState {
    pub fn new(name: &str, settings: CallerSettings) -> Arc<Self> {
        Arc::new(CallerState {
            name: Arc::from(name),
            settings: RwLock::new(settings),
            flight: Flight::default(),
            tokens: ArcSwap::default(),
            book: Mutex::default(),
            store: Mutex::default(),
            active: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// This replica's view of the caller's shared record.
    pub fn shared(&self) -> SharedCopy {
        lock(&self.store).copy.clone()
    }

    pub fn update_shared(&self, f: impl FnOnce(&mut SharedCopy)) {
        f(&mut lock(&self.store).copy);
    }

    pub fn settings(&self) -> CallerSettings {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies new settings; forgets the tokens when they belong to another client or mode.
    pub fn set_settings(&self, new: CallerSettings) {
        let mut s = self.settings.write().unwrap_or_else(|e| e.into_inner());
        let forget = s.needs_new_tokens(&new);
        *s = new;
        drop(s);
        if forget {
            self.forget_tokens();
        }
    }

    /// The inject token a request may use now (usable, not refused by an upstream): one
    /// lock-free load and an `Arc` clone.
    pub fn ready(&self, now: Instant) -> Option<Arc<InjectToken>> {
        let tokens = self.tokens.load();
        let held = tokens.inject.as_ref()?;
        (held.is_usable(now) && !held.value.rejected.load(Ordering::Acquire))
            .then(|| Arc::clone(&held.value.inject))
    }

    /// The API token while it is usable.
    pub fn api(&self) -> Option<Arc<Held<ApiCred>>> {
        self.tokens
            .load()
            .api
            .clone()
            .filter(|h| h.is_usable(Instant::now()))
    }

    pub fn set_api(&self, held: Arc<Held<ApiCred>>) {
        self.tokens.rcu(|t| Tokens {
            api: Some(Arc::clone(&held)),
            inject: t.inject.clone(),
        });
    }

    /// The API token held, as the shared store and the state file keep it.
    pub fn stored_api(&self) -> Option<StoredApiToken> {
        let api = self.api()?;
        Some(StoredApiToken {
            id: api.value.id.clone(),
            token: api.value.token.clone(),
            suffix: api.value.suffix.clone(),
            client_id: self.settings().client_id,
            expires: api.expires_wall,
        })
    }

    /// The latest inject token while it is usable.
    pub fn latest(&self) -> Option<Arc<Held<InjectCred>>> {
        self.tokens
            .load()
            .inject
            .clone()
            .filter(|h| h.is_usable(Instant::now()))
    }

    /// The latest inject token while usable and not refused by an upstream.
    pub fn sound(&self) -> Option<Arc<Held<InjectCred>>> {
        self.latest()
            .filter(|h| !h.value.rejected.load(Ordering::Acquire))
    }

    pub fn set_latest(&self, held: Arc<Held<InjectCred>>) {
        self.tokens.rcu(|t| Tokens {
            api: t.api.clone(),
            inject: Some(Arc::clone(&held)),
        });
    }

    pub fn forget_tokens(&self) {
        self.tokens.store(Arc::default());
    }

    /// An upstream refused `held` with 401: renew once for it, join the renewal another 401
    /// started, or pass the 401 on when the caller renewed on a 401 less than `floor` ago. The
    /// first 401 for a token claims its renewal whatever the token's age.
    pub fn claim_upstream_renewal(
        &self,
        held: &Held<InjectCred>,
        now: Instant,
        floor: Duration,
    ) -> UpstreamClaim {
        let mut book = lock(&self.book);
        if held.value.rejected.load(Ordering::Acquire) {
            return UpstreamClaim::Join;
        }
        if book
            .upstream_renewed
            .is_some_and(|at| now.saturating_duration_since(at) < floor)
        {
            return UpstreamClaim::Limited;
        }
        book.upstream_renewed = Some(now);
        held.value.rejected.store(true, Ordering::Release);
        UpstreamClaim::Renew
    }

    /// In `api_token` mode: an upstream refused `api` itself (it is to be regenerated).
    pub fn api_token_refused(&self, api: &ApiCred) -> bool {
        self.latest()
            .is_some_and(|h| h.is_rejected() && h.is_api_token(api))
    }

    /// `Some(wait)` while a refusal backoff runs.
    pub fn refusal_wait(&self, now: Instant) -> Option<Duration> {
        lock(&self.book).refusal.closed_for(now)
    }

    /// Records a definitive refusal; returns the backoff before this caller tries again.
    pub fn refused(&self, now: Instant, error: &str, timing: &Timing) -> Duration {
        lock(&self.book)
            .refusal
            .failed(now, error.to_string(), None, timing)
    }

    /// A renewal went without the shared store; returns how long the refresh task waits before
    /// it tries the store again (the breaker's backoff steps, jittered).
    pub fn store_failed(&self, now: Instant, error: &str, timing: &Timing) -> Duration {
        lock(&self.store)
            .backoff
            .failed(now, error.to_string(), None, timing)
    }

    /// The shared store answered for this caller; `record_error`: why its record did not open.
    pub fn store_answered(&self, record_error: Option<String>) {
        let mut store = lock(&self.store);
        store.backoff.succeeded();
        store.copy.record_error = record_error;
    }

    pub fn renewed(&self, trigger: Trigger) {
        let mut book = lock(&self.book);
        book.refusal.succeeded();
        if trigger == Trigger::Upstream401 {
            // a token a 401 just produced: its own 401s wait out the interval
            book.upstream_renewed = Some(Instant::now());
        }
        book.stats.last_renewal = Some(SystemTime::now());
        book.stats.failing = false;
        *book.stats.renewals.entry(trigger.label()).or_default() += 1;
    }

    pub fn renewal_failed(&self, error: &str) {
        let stats = &mut lock(&self.book).stats;
        stats.failing = true;
        stats.last_error = Some(error.to_string());
    }

    pub fn record_fetch(&self, kind: &str, outcome: &str) {
        *lock(&self.book)
            .stats
            .fetches
            .entry(format!("{kind}_{outcome}"))
            .or_default() += 1;
    }

    pub fn record_wait(&self) {
        lock(&self.book).stats.waited += 1;
    }

    pub fn record_wait_timeout(&self) {
        lock(&self.book).stats.wait_timeouts += 1;
    }

    /// Marks the caller in use; true the first time (the refresh task starts caring then).
    pub fn activate(&self) -> bool {
        let first = !self.active.swap(true, Ordering::AcqRel);
        if first {
            self.wake.notify_one();
        }
        first
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    pub fn remove(&self) {
        self.removed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The earliest refresh point of its tokens, past any refusal or store backoff; `None` while
    /// unused.
    pub fn next_refresh(&self) -> Option<Instant> {
        if !self.is_active() {
            return None;
        }
        let now = Instant::now();
        let mut at = self.latest().map_or(now, |h| h.refresh_at);
        if self.settings().inject == InjectMode::AccessToken {
            if let Some(api) = self.api() {
                at = at.min(api.refresh_at);
            }
        }
        let refusal_ends = lock(&self.book).refusal.next_attempt();
        let store_ends = lock(&self.store).backoff.next_attempt();
        Some(
            [refusal_ends, store_ends]
                .into_iter()
                .flatten()
                .fold(at, Instant::max),
        )
    }

    pub fn status(&self) -> CallerStatus {
        let now = Instant::now();
        let api = self.api();
        let inject = self.latest();
        let shared = self.shared();
        let book = lock(&self.book);
        let stats = &book.stats;
        let state = match (&inject, stats.failing) {
            (Some(_), false) => "ready",
            (Some(_), true) => "failing",
            (None, true) => "unavailable",
            (None, false) => "empty",
        };
        CallerStatus {
            caller: self.name.to_string(),
            state,
            api_token_id: api.as_ref().map(|a| a.value.id.clone()),
            api_token_suffix: api.as_ref().map(|a| a.value.suffix.clone()),
            api_token_expires_in_secs: api
                .as_ref()
                .map(|a| a.usable_until.saturating_duration_since(now).as_secs()),
            access_token_expires_in_secs: inject
                .as_ref()
                .map(|a| a.usable_until.saturating_duration_since(now).as_secs()),
            generation: inject.as_ref().map_or(0, |i| i.generation()),
            last_renewal: stats.last_renewal,
            last_error: stats.last_error.clone(),
            waited_requests: stats.waited,
            wait_timeouts: stats.wait_timeouts,
            fetches: stats.fetches.clone(),
            renewals: stats
                .renewals
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            store: (shared.latest_seen > 0
                || shared.generation > 0
                || shared.local_api_token
                || shared.record_error.is_some())
            .then_some(StoreView {
                current: shared.generation == shared.latest_seen && !shared.local_api_token,
                copy: shared,
            }),
        }
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
