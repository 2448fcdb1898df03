//! Obtaining credentials and the recovery ladder: access token refused -> exchange again;
//! API token invalid or expired -> regenerate; regenerate refused -> create anew; admin bearer
//! refused (401) -> one new bearer, then report. Every identity call is counted in metrics.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;

use super::{ApiCred, Broker, CallerSettings, CallerState, Held, InjectCred, InjectToken};
use crate::config::InjectMode;
use crate::identity::{CreateRequest, ErrorClass, IdentityError};
use crate::secret::Secret;

/// Lifetime assumed for a token whose `expires_in` is -1 (unknown).
const UNKNOWN_LIFETIME: Duration = Duration::from_secs(300);

/// Why a fetch failed, as handed to waiting requests.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub reason: String,
    pub retry_after: Duration,
}

fn outcome(result: &Result<impl Sized, IdentityError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) if e.class() == ErrorClass::Transient => "transient",
        Err(_) => "rejected",
    }
}

fn backing_off(what: &str, wait: Duration, last: Option<&str>) -> IdentityError {
    IdentityError::Transport(format!(
        "{what}: next attempt in {}s after: {}",
        wait.as_secs().max(1),
        last.unwrap_or("an earlier failure")
    ))
}

fn bearer(token: &Secret) -> Result<HeaderValue, IdentityError> {
    let mut value = HeaderValue::try_from(format!("Bearer {}", token.expose())).map_err(|_| {
        IdentityError::BadBody {
            status: 200,
            reason: "token is not a valid header value".into(),
        }
    })?;
    value.set_sensitive(true);
    Ok(value)
}

impl Broker {
    /// Runs one identity call, counting it by kind and outcome.
    async fn call<T>(
        &self,
        c: Option<&CallerState>,
        kind: &'static str,
        fut: impl Future<Output = Result<T, IdentityError>>,
    ) -> Result<T, IdentityError> {
        let result = fut.await;
        let outcome = outcome(&result);
        self.metrics.record_fetch(kind, outcome);
        if let Some(c) = c {
            *c.fetches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(format!("{kind}_{outcome}"))
                .or_default() += 1;
        }
        if let Err(e) = &result {
            tracing::debug!(kind, error = %e, "identity call failed");
        }
        result
    }

    /// Obtains the caller's inject token, single flight with the refresh task. `renewing`: the
    /// generation the refresh task wants replaced (`None`: a request found no token).
    /// Does not insert into the cache: the caller of this does (or `try_get_with` does).
    pub(super) async fn obtain_inject(
        &self,
        c: &CallerState,
        renewing: Option<u64>,
    ) -> Result<Arc<Held<InjectCred>>, Failure> {
        let _flight = c.inject_lock.lock().await;
        if let Some(held) = c.latest() {
            let fresh = !held.value.rejected.load(Ordering::Acquire)
                && renewing.is_none_or(|g| g != held.generation);
            if fresh {
                return Ok(held);
            }
        }
        let now = Instant::now();
        {
            let gate = c.gate.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(wait) = gate.closed_for(now) {
                return Err(Failure {
                    reason: gate
                        .last_error()
                        .unwrap_or("the identity service is failing")
                        .to_string(),
                    retry_after: wait,
                });
            }
        }
        let result = self.ladder(c, renewing.is_some()).await;
        let mut gate = c.gate.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(held) => {
                gate.succeeded();
                drop(gate);
                let held = Arc::new(held);
                *c.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&held));
                *c.last_renewal.lock().unwrap_or_else(|e| e.into_inner()) = Some(SystemTime::now());
                if !c.active.swap(true, Ordering::AcqRel) {
                    c.wake.notify_one();
                }
                tracing::debug!(
                    caller = &*c.name,
                    generation = held.generation,
                    "token ready"
                );
                Ok(held)
            }
            Err(e) => {
                let wait = gate.failed(now, e.to_string(), e.retry_after(), &self.timing());
                tracing::warn!(caller = &*c.name, error = %e, retry_in_ms = wait.as_millis() as u64,
                    "cannot obtain a token");
                c.active.store(true, Ordering::Release);
                c.wake.notify_one();
                Err(Failure {
                    reason: e.to_string(),
                    retry_after: wait,
                })
            }
        }
    }

    async fn ladder(
        &self,
        c: &CallerState,
        renew: bool,
    ) -> Result<Held<InjectCred>, IdentityError> {
        let s = c.settings();
        let timing = self.timing();
        match s.inject {
            InjectMode::ApiToken => {
                let mut api = self.api_token(c, &s, false).await?;
                let refused = c.rejected_generation.load(Ordering::Acquire) == api.generation;
                if renew || refused {
                    api = self.renew_api(c, &s, api.generation).await?;
                }
                Ok(Held {
                    value: InjectCred {
                        inject: Arc::new(InjectToken {
                            header: bearer(&api.value.token)?,
                            generation: api.generation,
                        }),
                        rejected: Default::default(),
                    },
                    generation: api.generation,
                    received: api.received,
                    usable_until: api.usable_until,
                    refresh_at: api.refresh_at,
                    expires_wall: api.expires_wall,
                })
            }
            InjectMode::AccessToken => {
                let mut api = self.api_token(c, &s, s.single_use).await?;
                let mut renewed = false;
                loop {
                    let identity = self.identity_now();
                    let result = self
                        .call(
                            Some(c),
                            "exchange",
                            identity.client.exchange(&api.value.token),
                        )
                        .await;
                    match result {
                        Ok(t) => {
                            api.value.exchanged.store(true, Ordering::Release);
                            let generation = self.next_generation();
                            let inject = Arc::new(InjectToken {
                                header: bearer(&t.token)?,
                                generation,
                            });
                            let lifetime = t.lifetime.unwrap_or(UNKNOWN_LIFETIME);
                            let value = InjectCred {
                                inject,
                                rejected: Default::default(),
                            };
                            return Ok(Held::new(value, generation, t.received, lifetime, &timing));
                        }
                        Err(e) if e.class() == ErrorClass::InvalidCredential && !renewed => {
                            tracing::info!(caller = &*c.name, api_token_id = %api.value.id,
                                "API token refused by the exchange; regenerating");
                            renewed = true;
                            api = self.renew_api(c, &s, api.generation).await?;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// The caller's API token from the cache, or a new one (create). With `unused`, one that has
    /// not been exchanged yet (regenerating a used one).
    async fn api_token(
        &self,
        c: &CallerState,
        s: &CallerSettings,
        unused: bool,
    ) -> Result<Arc<Held<ApiCred>>, IdentityError> {
        if let Some(api) = self.api.get(&*c.name).await {
            if unused && api.value.exchanged.load(Ordering::Acquire) {
                return self.renew_api(c, s, api.generation).await;
            }
            return Ok(api);
        }
        let _flight = c.api_lock.lock().await;
        if let Some(api) = self.api.get(&*c.name).await {
            return Ok(api);
        }
        self.create_api(c, s).await
    }

    /// Replaces API token generation `stale`: regenerate it, or create a new one when the
    /// service refuses to regenerate. If another task already replaced it, returns that one.
    pub(super) async fn renew_api(
        &self,
        c: &CallerState,
        s: &CallerSettings,
        stale: u64,
    ) -> Result<Arc<Held<ApiCred>>, IdentityError> {
        let _flight = c.api_lock.lock().await;
        let Some(current) = self.api.get(&*c.name).await else {
            return self.create_api(c, s).await;
        };
        if current.generation != stale {
            return Ok(current);
        }
        let ttl = self.policy_now().api_token_ttl_minutes;
        let identity = self.identity_now();
        let token = &current.value.token;
        let result = self
            .admin_call(Some(c), "regenerate", |admin| {
                let client = &identity.client;
                async move { client.regenerate_api_token(&admin, token, ttl).await }
            })
            .await;
        match result {
            Ok(t) => {
                tracing::info!(caller = &*c.name, api_token_id = %t.id, suffix = %t.suffix,
                    "API token regenerated");
                Ok(self.store_api(c, t).await)
            }
            Err(e) if e.class() == ErrorClass::InvalidCredential => {
                tracing::warn!(caller = &*c.name, api_token_id = %current.value.id, error = %e,
                    "regenerate refused; creating a new API token");
                self.api.invalidate(&*c.name).await;
                self.create_api(c, s).await
            }
            Err(e) => Err(e),
        }
    }

    /// Creates the caller's API token. Call with `api_lock` held.
    async fn create_api(
        &self,
        c: &CallerState,
        s: &CallerSettings,
    ) -> Result<Arc<Held<ApiCred>>, IdentityError> {
        let policy = self.policy_now();
        let request = CreateRequest {
            display_name: s.display_name.clone(),
            api_token_ttl_minutes: policy.api_token_ttl_minutes,
            access_token_ttl_minutes: policy.access_token_ttl_minutes,
            max_count_of_uses: s.max_count_of_uses,
            description: Some(format!("tokenbroker credential of caller {}", c.name)),
            client_id: s.client_id.clone(),
        };
        let identity = self.identity_now();
        let request = &request;
        let t = self
            .admin_call(Some(c), "create", |admin| {
                let client = &identity.client;
                async move { client.create_api_token(&admin, request).await }
            })
            .await?;
        tracing::info!(caller = &*c.name, api_token_id = %t.id, suffix = %t.suffix, "API token created");
        Ok(self.store_api(c, t).await)
    }

    async fn store_api(&self, c: &CallerState, t: crate::identity::ApiToken) -> Arc<Held<ApiCred>> {
        let generation = self.next_generation();
        let cred = ApiCred {
            id: t.id,
            token: t.token,
            suffix: t.suffix,
            exchanged: Default::default(),
        };
        let held = Arc::new(Held::new(
            cred,
            generation,
            t.received,
            t.lifetime,
            &self.timing(),
        ));
        self.api
            .insert(Arc::clone(&c.name), Arc::clone(&held))
            .await;
        self.save_state().await;
        held
    }

    /// Runs an api-tokens call with the admin bearer; on 401 fetches a new bearer once and
    /// retries once.
    async fn admin_call<T, F, Fut>(
        &self,
        c: Option<&CallerState>,
        kind: &'static str,
        op: F,
    ) -> Result<T, IdentityError>
    where
        F: Fn(Secret) -> Fut,
        Fut: Future<Output = Result<T, IdentityError>>,
    {
        let admin = self.admin_bearer().await?;
        match self.call(c, kind, op(admin.value.clone())).await {
            Err(e) if e.class() == ErrorClass::Unauthorized => {
                tracing::warn!(kind, "admin bearer refused; fetching a new one");
                if let Some(current) = self.admin.get(&()).await {
                    if current.generation == admin.generation {
                        self.admin.invalidate(&()).await;
                    }
                }
                let admin = self.admin_bearer().await?;
                self.call(c, kind, op(admin.value.clone())).await
            }
            other => other,
        }
    }

    /// The admin bearer: cached until its refresh point, fetched once however many ask.
    async fn admin_bearer(&self) -> Result<Arc<Held<Secret>>, IdentityError> {
        if let Some(admin) = self.admin.get(&()).await {
            return Ok(admin);
        }
        self.admin
            .try_get_with((), self.fetch_admin())
            .await
            .map_err(|e| (*e).clone())
    }

    async fn fetch_admin(&self) -> Result<Arc<Held<Secret>>, IdentityError> {
        let _flight = self.admin_lock.lock().await;
        let now = Instant::now();
        {
            let gate = self.admin_gate.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(wait) = gate.closed_for(now) {
                return Err(backing_off("admin bearer", wait, gate.last_error()));
            }
        }
        let identity = self.identity_now();
        let result = self
            .call(
                None,
                "admin_bearer",
                identity.client.client_credentials(
                    &identity.client_id,
                    &identity.client_secret,
                    identity.scope.as_deref(),
                ),
            )
            .await;
        let mut gate = self.admin_gate.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(t) => {
                gate.succeeded();
                let lifetime = t.lifetime.unwrap_or(UNKNOWN_LIFETIME);
                let mut held = Held::new(
                    t.token,
                    self.next_generation(),
                    t.received,
                    lifetime,
                    &self.timing(),
                );
                // renewed ahead: dropped from the cache at its refresh point
                held.usable_until = held.refresh_at;
                Ok(Arc::new(held))
            }
            Err(e) => {
                let wait = gate.failed(now, e.to_string(), e.retry_after(), &self.timing());
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                    "cannot obtain the admin bearer");
                Err(e)
            }
        }
    }
}
