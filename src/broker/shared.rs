//! The broker's side of the shared store (a [`TokenStore`]: Redis, or in memory in tests): every
//! replica holds the same API token and access token per caller, and only the holder of a
//! caller's lease calls the identity service for it.
//!
//! - A renewal first reads the store: a record newer than this replica's copy is adopted, and
//!   nothing is called. Otherwise it takes the caller's lease (another holder: wait for its write,
//!   at most twice the lease), reads again, renews (the same ladder as alone) while keeping the
//!   lease alive, and writes the new tokens with a compare-and-set on the record's generation; a
//!   refused write (or a lease lost on the way) adopts whatever is stored instead, and the
//!   renewal hands out the adopted token rather than its own.
//! - A record that does not open (garbage, another caller's value, a key not in the ring) is
//!   replaced by the next renewal's fenced write, which expects its generation.
//! - Other replicas adopt new records as they are announced (pub/sub), and re-read every caller
//!   after each (re)connection.
//! - Static stability: requests never touch the store; tokens live in memory as without it.
//!   While the store is unreachable a replica exchanges the shared API token for itself, never
//!   regenerates it (that would kill every other replica's copy), and creates a replica-local API
//!   token only when it has no usable one; when the store is back it adopts the shared record, or
//!   publishes its own when there is none. The refresh task retries the store with backoff, and
//!   lasting conditions are warned about once per interval (`repeats.rs`).
//!
//! Must never: call the identity service for a caller whose newer tokens are in the store, write
//! without the lease, or block a request on Redis.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::caller::{remaining, CallerState, Held, InjectCred};
use super::gateway::CallError;
use super::store::{
    Lease, Record, StoreError, StoreEvent, StoredAccessToken, StoredTokens, TokenStore,
    WriteOutcome,
};
use super::Broker;
use crate::config::InjectMode;

/// How often a replica waiting for another's renewal looks at the store.
const LEASE_POLL: Duration = Duration::from_millis(100);

impl Broker {
    pub(super) fn store(&self) -> Option<&dyn TokenStore> {
        self.store.as_deref()
    }

    /// Renews the caller's tokens with the shared store: adopt what is stored, or renew under the
    /// lease and share the result. A record that does not open is replaced by the result.
    pub(super) async fn renew_shared(
        &self,
        store: &dyn TokenStore,
        c: &CallerState,
    ) -> Result<(Arc<Held<InjectCred>>, bool), CallError> {
        match self.read_for_renewal(store, c).await {
            Ok(Stored::Record(record)) => {
                if let Some(done) = self.adopt_if_enough(c, record) {
                    return Ok(done);
                }
            }
            Ok(Stored::Unopened(_)) => {}
            Err(e) => return self.renew_without_store(c, &e).await,
        }
        let lease = match self.take_lease(store, c).await? {
            Taken::Lease(lease) => lease,
            Taken::Adopted(done) => return Ok(done),
            Taken::Unreachable(e) => return self.renew_without_store(c, &e).await,
        };
        // a write may have landed between our read and the lease
        let (expected, replace) = match self.read_for_renewal(store, c).await {
            Ok(Stored::Record(record)) => {
                let generation = record.as_ref().map_or(0, |r| r.generation);
                if let Some(done) = self.adopt_if_enough(c, record) {
                    release(store, lease).await;
                    return Ok(done);
                }
                (generation, false)
            }
            Ok(Stored::Unopened(generation)) => (generation, true),
            Err(e) => {
                release(store, lease).await;
                return self.renew_without_store(c, &e).await;
            }
        };
        let api_before = c.api();
        let work = self.renew_here(c, false);
        tokio::pin!(work);
        let result = tokio::select! {
            result = &mut work => result,
            lost = store.keep_alive(&lease) => {
                tracing::warn!(caller = &*c.name, error = %lost,
                    "renewal lease lost; finishing the renewal without writing it");
                let result = work.await;
                self.adopt_stored(store, c).await;
                return self.adopted_instead(c).map_or(result, Ok);
            }
        };
        let mut refused = false;
        if let Ok((held, fresh)) = &result {
            // a regenerated API token is shared even when the access token held stays, and a
            // record that does not open is replaced even when nothing was renewed
            let api_changed = match (c.api(), &api_before) {
                (Some(now), Some(before)) => !Arc::ptr_eq(&now, before),
                (now, before) => now.is_some() != before.is_some(),
            };
            if *fresh || replace || api_changed {
                refused = self.share(store, c, &lease, expected, Some(held)).await;
            }
        }
        release(store, lease).await;
        match refused {
            true => self.adopted_instead(c).map_or(result, Ok),
            false => result,
        }
    }

    /// After a write this replica could not make (lease lost, another replica wrote first) and
    /// the stored record adopted: the adopted token, which the renewal hands out instead of its
    /// own, so that the replica injects what the fleet shares.
    fn adopted_instead(&self, c: &CallerState) -> Option<(Arc<Held<InjectCred>>, bool)> {
        let copy = c.shared();
        if copy.generation == 0 || copy.local_api_token {
            return None;
        }
        let held = c.sound().filter(|h| !h.is_due(Instant::now()))?;
        Some((held, true))
    }

    /// Reads the caller's record for a renewal: the record (or none), or the generation of one
    /// that does not open (noted for `/tokens`, warned about once per interval), to be replaced
    /// by the renewal's write. `Err`: the store cannot be used.
    async fn read_for_renewal(
        &self,
        store: &dyn TokenStore,
        c: &CallerState,
    ) -> Result<Stored, StoreError> {
        let read = store.read(&c.name).await;
        let unopened = read.as_ref().err().and_then(StoreError::unopened);
        match (read, unopened) {
            (Ok(record), _) => {
                c.store_answered(None);
                Ok(Stored::Record(record))
            }
            (Err(e), Some(generation)) => {
                let error = e.to_string();
                if let Some(repeated) = self.repeated_warning("record_unopened") {
                    tracing::warn!(
                        caller = &*c.name,
                        error,
                        repeated,
                        "the shared record does not open; this renewal replaces it"
                    );
                }
                c.store_answered(Some(error));
                Ok(Stored::Unopened(generation))
            }
            (Err(e), None) => Err(e),
        }
    }

    /// Takes the caller's lease; while another replica holds it, waits for its write (polling the
    /// store) at most twice the lease, which is also enough for a dead holder's lease to lapse.
    /// A holder still there after that is taken over (the script checks it is the same one).
    async fn take_lease(
        &self,
        store: &dyn TokenStore,
        c: &CallerState,
    ) -> Result<Taken, CallError> {
        let ttl = store.lease_ttl();
        let deadline = Instant::now() + ttl * 2;
        // the holder seen at the first busy attempt
        let mut first_holder: Option<String> = None;
        loop {
            let overdue = Instant::now() >= deadline;
            let held_too_long = first_holder.as_deref().filter(|_| overdue);
            match store.take_lease(&c.name, ttl, held_too_long).await {
                Ok(Ok(lease)) => {
                    c.update_shared(|s| s.lease = Some("this_replica"));
                    return Ok(Taken::Lease(lease));
                }
                Ok(Err(holder)) => {
                    c.update_shared(|s| s.lease = Some("other"));
                    first_holder.get_or_insert(holder);
                }
                Err(e) => return Ok(Taken::Unreachable(e)),
            }
            if overdue {
                return Err(CallError::Paused {
                    wait: Duration::from_secs(1),
                    reason: format!(
                        "another replica holds the renewal lease of caller {}",
                        c.name
                    ),
                });
            }
            tokio::time::sleep(LEASE_POLL).await;
            match store.read(&c.name).await {
                Ok(record) => {
                    if let Some(done) = self.adopt_if_enough(c, record) {
                        return Ok(Taken::Adopted(done));
                    }
                }
                // the holder's write will replace it
                Err(e) if e.unopened().is_some() => {}
                Err(e) => return Ok(Taken::Unreachable(e)),
            }
        }
    }

    /// Writes the caller's tokens (its API token, and `inject` or else the inject token held)
    /// under the lease; a refused write adopts what is stored (then true).
    async fn share(
        &self,
        store: &dyn TokenStore,
        c: &CallerState,
        lease: &Lease,
        expected: u64,
        inject: Option<&Arc<Held<InjectCred>>>,
    ) -> bool {
        let inject = inject.cloned().or_else(|| c.latest());
        let Some(tokens) = self.stored_tokens(c, inject.as_deref()) else {
            return false;
        };
        match store.write(&c.name, lease, expected, &tokens).await {
            Ok(WriteOutcome::Written(generation)) => {
                c.update_shared(|s| {
                    s.generation = generation;
                    s.latest_seen = s.latest_seen.max(generation);
                    s.local_api_token = false;
                    s.record_error = None;
                    s.sealed_with = Some(store.seal_key_id().to_string());
                });
                self.metrics.record_store_sharing("written");
                tracing::debug!(caller = &*c.name, generation, "tokens shared");
                false
            }
            Ok(outcome) => {
                tracing::warn!(
                    caller = &*c.name,
                    ?outcome,
                    "another replica wrote this caller's tokens first; adopting them"
                );
                self.metrics.record_store_sharing("refused");
                self.adopt_stored(store, c).await;
                true
            }
            Err(e) => {
                self.metrics.record_store_sharing("failed");
                if let Some(repeated) = self.repeated_warning("share_failed") {
                    tracing::warn!(caller = &*c.name, error = %e, repeated,
                        "new tokens not shared: the store refused or did not answer");
                }
                false
            }
        }
    }

    /// The caller's API token and `inject`, as the store keeps them.
    fn stored_tokens(
        &self,
        c: &CallerState,
        inject: Option<&Held<InjectCred>>,
    ) -> Option<StoredTokens> {
        let api = c.stored_api()?;
        let access = match c.settings().inject {
            InjectMode::ApiToken => None,
            InjectMode::AccessToken => inject.map(|h| StoredAccessToken {
                token: h.value.token.clone(),
                expires: h.expires_wall,
                generation: h.generation(),
            }),
        };
        Some(StoredTokens { api, access })
    }

    /// Renews without the store (unreachable, or its record something this build did not
    /// write): exchange with the API token held, never regenerate it; a replica-local API token
    /// only when none is usable. The refresh task tries the store again after a backoff step
    /// (what is due only with the store, such as the API token's regenerate, waits for it).
    async fn renew_without_store(
        &self,
        c: &CallerState,
        error: &StoreError,
    ) -> Result<(Arc<Held<InjectCred>>, bool), CallError> {
        let wait = c.store_failed(Instant::now(), &error.to_string(), &self.timing());
        if let Some(repeated) = self.repeated_warning("store_unusable") {
            tracing::warn!(caller = &*c.name, error = %error, repeated,
                store_retry_in_ms = wait.as_millis() as u64,
                "cannot use the shared store; renewing this replica's copy without it");
        }
        self.metrics.record_store_fallback("renewal");
        self.renew_here(c, true).await
    }

    /// Adopts a stored record that is newer than this replica's copy (or replaces a local API
    /// token); returns the token when what is now held needs no renewal.
    fn adopt_if_enough(
        &self,
        c: &CallerState,
        record: Option<Record>,
    ) -> Option<(Arc<Held<InjectCred>>, bool)> {
        let adopted = match record {
            Some(record) => self.adopt(c, &record),
            None => false,
        };
        let now = Instant::now();
        let held = c.sound().filter(|h| !h.is_due(now))?;
        if c.api()?.is_due(now) {
            return None;
        }
        Some((held, adopted))
    }

    /// Takes a record's tokens into memory when it is newer than this replica's copy. True when
    /// the inject token changed.
    fn adopt(&self, c: &CallerState, record: &Record) -> bool {
        let (generation, tokens) = (record.generation, &record.tokens);
        let copy = c.shared();
        c.update_shared(|s| {
            if generation >= s.latest_seen {
                s.sealed_with = Some(record.sealed_with.clone());
            }
            s.latest_seen = s.latest_seen.max(generation);
        });
        if generation <= copy.generation && !copy.local_api_token {
            return false;
        }
        let s = c.settings();
        if tokens.api.client_id != s.client_id {
            return false;
        }
        if remaining(tokens.api.expires).is_none() {
            return false;
        }
        let now = Instant::now();
        let same_api = c.api().is_some_and(|a| a.value.token == tokens.api.token);
        let api = match c.api().filter(|_| same_api) {
            Some(api) => api,
            None => {
                // the stored access token was exchanged from it (matters for single use)
                let exchanged = tokens.access.is_some();
                let Some(held) = Held::from_stored(&tokens.api, exchanged, &self.timing()) else {
                    return false;
                };
                let held = Arc::new(held);
                c.set_api(Arc::clone(&held));
                held
            }
        };
        let inject = match s.inject {
            InjectMode::ApiToken => {
                let same = c.latest().is_some_and(|h| h.is_api_token(&api.value));
                (!same)
                    .then(|| super::ladder::inject_api_token(self, &api).ok())
                    .flatten()
            }
            InjectMode::AccessToken => tokens.access.as_ref().and_then(|access| {
                let same = c.latest().is_some_and(|h| h.value.token == access.token);
                if same {
                    return None;
                }
                let left = remaining(access.expires)?;
                super::ladder::access_held(self, access.token.clone(), now, left).ok()
            }),
        };
        c.update_shared(|shared| {
            shared.generation = generation;
            shared.local_api_token = false;
        });
        match inject {
            Some(held) => {
                let held = Arc::new(held);
                c.set_latest(held);
                c.activate();
                tracing::debug!(caller = &*c.name, generation, "adopted the shared tokens");
                self.metrics.record_store_sharing("adopted");
                true
            }
            None => false,
        }
    }

    /// Reads the caller's record and adopts it if newer.
    async fn adopt_stored(&self, store: &dyn TokenStore, c: &CallerState) {
        match store.read(&c.name).await {
            Ok(Some(record)) => {
                self.adopt(c, &record);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(caller = &*c.name, error = %e, "cannot read the shared record")
            }
        }
    }

    /// Reads the caller's record and adopts it if newer; publishes this replica's tokens when the
    /// store has none (e.g. they were obtained while it was unreachable).
    async fn adopt_newer(&self, store: &dyn TokenStore, c: &CallerState) {
        match store.read(&c.name).await {
            Ok(Some(record)) => {
                self.adopt(c, &record);
            }
            Ok(None) => {
                if c.api().is_some() && !c.flight.in_flight() {
                    if let Ok(Some(lease)) = store.try_lease(&c.name, store.lease_ttl()).await {
                        let _ = self.share(store, c, &lease, 0, None).await;
                        release(store, lease).await;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(caller = &*c.name, error = %e, "cannot read the shared record")
            }
        }
    }

    /// Seeds every caller from the store at start (bounded by the store's command timeouts).
    pub(super) async fn load_shared(&self) {
        let Some(store) = self.store() else { return };
        let callers = self.all_callers();
        let reads = futures_util::future::join_all(
            callers
                .iter()
                .map(|c| async move { (c, store.read(&c.name).await) }),
        )
        .await;
        let mut adopted = 0;
        for (c, result) in reads {
            match result {
                Ok(Some(record)) => {
                    if self.adopt(c, &record) {
                        adopted += 1;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(caller = &*c.name, error = %e, "cannot read the shared record at start");
                }
            }
        }
        tracing::info!(
            adopted,
            callers = callers.len(),
            "tokens loaded from the shared store"
        );
    }
}

/// What a renewal's read found.
enum Stored {
    Record(Option<Record>),
    /// A record of this generation that does not open.
    Unopened(u64),
}

enum Taken {
    Lease(Lease),
    Adopted((Arc<Held<InjectCred>>, bool)),
    Unreachable(StoreError),
}

async fn release(store: &dyn TokenStore, lease: Lease) {
    if let Err(e) = store.release(lease).await {
        tracing::debug!(error = %e, "cannot release the renewal lease; it lapses by itself");
    }
}

/// Follows the store's announcements for the broker's life: adopts every newer record, and
/// re-reads every caller after each (re)connection.
pub(super) fn follow(broker: Weak<Broker>, store: Arc<dyn TokenStore>) {
    let mut events = store.subscribe();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let Some(b) = broker.upgrade() else { return };
            match event {
                StoreEvent::Changed { caller, generation } => {
                    if let Some(c) = b.caller(&caller) {
                        if generation > c.shared().generation {
                            b.adopt_newer(&*store, &c).await;
                        }
                    }
                }
                StoreEvent::Resync => {
                    for c in b.all_callers() {
                        b.adopt_newer(&*store, &c).await;
                    }
                }
            }
        }
    });
}
