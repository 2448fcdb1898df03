//! Renewing a caller's tokens, and every call to the identity service.
//!
//! One renewal does what is due, and runs the recovery ladder's definitive steps back to back,
//! with no backoff between them: exchange refused (the API token is invalid, expired, revoked or
//! used up) -> regenerate -> regenerate refused -> create -> exchange; an api-tokens call whose
//! admin bearer is refused (401) -> one new bearer, the same call once more.
//! Transient failures stop the renewal and open the shared breaker (`health.rs`); definitive
//! refusals that no step can mend (a configuration problem) back this caller off (`gate.rs`).
//! Every identity call is admitted by the breaker, bounded in concurrency and counted.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;
use tracing::Instrument;

use super::caller::{
    ApiCred, CallerSettings, CallerState, Failure, Held, InjectCred, Renewal, Trigger,
};
use super::health::{Admission, Observed};
use super::{Broker, IdentityService};
use crate::config::InjectMode;
use crate::identity::{ApiToken, CreateRequest, ErrorClass, IdentityError, Operation};
use crate::secret::Secret;
use crate::token::InjectToken;

/// Lifetime assumed for a token whose `expires_in` is -1 (unknown).
const UNKNOWN_LIFETIME: Duration = Duration::from_secs(300);

/// Why an identity call did not give what was asked.
#[derive(Debug, Clone)]
pub(super) enum CallError {
    /// The identity service answered with a failure, or could not be reached.
    Identity(IdentityError),
    /// No call went out: the identity service (or, for the admin bearer, a refusal) is being
    /// waited out for `wait`.
    Paused { wait: Duration, reason: String },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Identity(e) => e.fmt(f),
            CallError::Paused { wait, reason } => write!(
                f,
                "identity calls paused for {}s after: {reason}",
                wait.as_secs_f64().ceil() as u64
            ),
        }
    }
}

impl From<IdentityError> for CallError {
    fn from(e: IdentityError) -> Self {
        CallError::Identity(e)
    }
}

impl CallError {
    fn is(&self, class: ErrorClass) -> bool {
        matches!(self, CallError::Identity(e) if e.class() == class)
    }
}

fn outcome(result: &Result<impl Sized, IdentityError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) if e.class() == ErrorClass::Transient => "transient",
        Err(_) => "rejected",
    }
}

/// The identity-service operation of a fetch kind (the admin bearer is client_credentials).
fn operation_of(kind: &'static str) -> &'static str {
    match kind {
        "admin_bearer" => Operation::ClientCredentials.as_str(),
        other => other,
    }
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
    /// One renewal of the caller's tokens, run in the caller's flight task: records the outcome
    /// and publishes a new token to the request path.
    pub(super) async fn renew(&self, c: &Arc<CallerState>, trigger: Trigger) -> Renewal {
        match self.renew_tokens(c).await {
            Ok((held, fresh)) => {
                if fresh {
                    c.set_latest(Arc::clone(&held));
                    c.renewed(trigger);
                    self.metrics.record_renewal(trigger.label());
                    tracing::debug!(
                        caller = &*c.name,
                        generation = held.generation(),
                        trigger = trigger.label(),
                        "token ready"
                    );
                }
                c.activate();
                Ok(held)
            }
            Err(e) => {
                let reason = e.to_string();
                let retry_after = match &e {
                    CallError::Paused { wait, .. } => *wait,
                    CallError::Identity(e) if e.class() == ErrorClass::Transient => {
                        match self.health.peek() {
                            Admission::Wait(wait) => wait,
                            Admission::Go { .. } => self.timing().backoff_initial,
                        }
                    }
                    CallError::Identity(_) => c.refused(Instant::now(), &reason, &self.timing()),
                };
                c.renewal_failed(&reason);
                if matches!(e, CallError::Identity(_)) {
                    tracing::warn!(caller = &*c.name, error = %reason,
                        retry_in_ms = retry_after.as_millis() as u64, "cannot obtain a token");
                }
                c.activate();
                Err(Failure {
                    reason,
                    retry_after,
                })
            }
        }
    }

    /// The inject token after doing what is due: `(token, true)` when it is a new one. With the
    /// shared store, through it (`shared.rs`).
    async fn renew_tokens(
        &self,
        c: &CallerState,
    ) -> Result<(Arc<Held<InjectCred>>, bool), CallError> {
        match self.store() {
            Some(store) => self.renew_shared(store, c).await,
            None => self.renew_here(c, false).await,
        }
    }

    /// Renews on this replica's own: `local_only` (the shared store is unreachable) never
    /// regenerates the API token others share, and creates a replica-local one only when none is
    /// usable.
    pub(super) async fn renew_here(
        &self,
        c: &CallerState,
        local_only: bool,
    ) -> Result<(Arc<Held<InjectCred>>, bool), CallError> {
        let s = c.settings();
        let current = c.sound().filter(|h| !h.is_due(Instant::now()));
        let api = self.api_token(c, &s, current.is_none(), local_only).await?;
        if let Some(held) = current {
            if s.inject == InjectMode::AccessToken || held.is_api_token(&api.value) {
                return Ok((held, false));
            }
        }
        let held = match s.inject {
            InjectMode::ApiToken => inject_api_token(self, &api)?,
            InjectMode::AccessToken => self.exchange(c, &s, api, local_only).await?,
        };
        Ok((Arc::new(held), true))
    }

    /// Exchanges the API token; when the exchange refuses it, replaces it (regenerate, else
    /// create) and exchanges again, at once.
    async fn exchange(
        &self,
        c: &CallerState,
        s: &CallerSettings,
        mut api: Arc<Held<ApiCred>>,
        local_only: bool,
    ) -> Result<Held<InjectCred>, CallError> {
        let mut replaced = false;
        loop {
            let token = api.value.token.clone();
            let result = self
                .call(Some(c), "exchange", |service| async move {
                    service.exchange(&token).await
                })
                .await;
            match result {
                Ok(t) => {
                    api.value.exchanged.store(true, Ordering::Release);
                    let lifetime = t.lifetime.unwrap_or(UNKNOWN_LIFETIME);
                    let received = Instant::from_std(t.received);
                    return Ok(access_held(self, t.token, received, lifetime)?);
                }
                Err(e) if e.is(ErrorClass::InvalidCredential) && !replaced => {
                    tracing::info!(caller = &*c.name, api_token_id = %api.value.id,
                        "API token refused by the exchange; replacing it");
                    replaced = true;
                    api = self.replace_api(c, s, &api, local_only).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The caller's API token, created or regenerated first when that is due: none yet, past its
    /// refresh point, used up (single use) while a new access token is needed, or refused by an
    /// upstream (api_token mode).
    async fn api_token(
        &self,
        c: &CallerState,
        s: &CallerSettings,
        need_inject: bool,
        local_only: bool,
    ) -> Result<Arc<Held<ApiCred>>, CallError> {
        let Some(api) = c.api() else {
            return self.create_api(c, s, local_only).await;
        };
        if local_only && !(s.single_use && need_inject && api.value.exchanged_once()) {
            // still usable: keep using the shared token rather than regenerate it
            return Ok(api);
        }
        let due = api.is_due(Instant::now())
            || (s.single_use && need_inject && api.value.exchanged.load(Ordering::Acquire))
            || (s.inject == InjectMode::ApiToken && c.api_token_refused(&api.value));
        if due {
            self.replace_api(c, s, &api, local_only).await
        } else {
            Ok(api)
        }
    }

    /// Regenerates the API token; when the service refuses (the token is invalid or expired),
    /// creates a new one at once. `local_only`: creates a replica-local one instead of
    /// regenerating the token other replicas share.
    async fn replace_api(
        &self,
        c: &CallerState,
        s: &CallerSettings,
        stale: &Held<ApiCred>,
        local_only: bool,
    ) -> Result<Arc<Held<ApiCred>>, CallError> {
        if local_only {
            return self.create_api(c, s, true).await;
        }
        let ttl = self.policy_now().api_token_ttl_minutes;
        let token = &stale.value.token;
        let result = self
            .admin_call(Some(c), "regenerate", |service, admin| async move {
                service.regenerate_api_token(&admin, token, ttl).await
            })
            .await;
        match result {
            Ok(t) => {
                tracing::info!(caller = &*c.name, api_token_id = %t.id, suffix = %t.suffix,
                    "API token regenerated");
                Ok(self.store_api(c, t).await)
            }
            Err(e) if e.is(ErrorClass::InvalidCredential) => {
                tracing::warn!(caller = &*c.name, api_token_id = %stale.value.id, error = %e,
                    "regenerate refused; creating a new API token");
                self.metrics.record_ladder("create");
                self.create_api(c, s, false).await
            }
            Err(e) => Err(e),
        }
    }

    /// Creates an API token; `local_only`: a replica-local one, while the shared store is
    /// unreachable.
    async fn create_api(
        &self,
        c: &CallerState,
        s: &CallerSettings,
        local_only: bool,
    ) -> Result<Arc<Held<ApiCred>>, CallError> {
        let policy = self.policy_now();
        let request = CreateRequest {
            display_name: s.display_name.clone(),
            api_token_ttl_minutes: policy.api_token_ttl_minutes,
            access_token_ttl_minutes: policy.access_token_ttl_minutes,
            max_count_of_uses: s.max_count_of_uses,
            description: Some(format!("tokenbroker credential of caller {}", c.name)),
            client_id: s.client_id.clone(),
        };
        let request = &request;
        let t = self
            .admin_call(Some(c), "create", |service, admin| async move {
                service.create_api_token(&admin, request).await
            })
            .await?;
        if local_only {
            tracing::warn!(caller = &*c.name, api_token_id = %t.id, suffix = %t.suffix,
                "API token created for this replica alone: the shared store is unreachable");
            self.metrics.record_store_fallback("local_api_token");
            c.update_shared(|shared| shared.local_api_token = true);
        } else {
            tracing::info!(caller = &*c.name, api_token_id = %t.id, suffix = %t.suffix, "API token created");
        }
        Ok(self.store_api(c, t).await)
    }

    async fn store_api(&self, c: &CallerState, t: ApiToken) -> Arc<Held<ApiCred>> {
        let cred = ApiCred::new(t.id, t.token, t.suffix);
        let held = Arc::new(Held::new(
            cred,
            Instant::from_std(t.received),
            t.lifetime,
            &self.timing(),
        ));
        c.set_api(Arc::clone(&held));
        self.save_state().await;
        held
    }

    /// One identity call: waits for a free call slot, asks the breaker, counts the outcome
    /// (metrics, the caller's counters) and reports it to the breaker.
    async fn call<T, F, Fut>(
        &self,
        c: Option<&CallerState>,
        kind: &'static str,
        op: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(Arc<dyn IdentityService>) -> Fut,
        Fut: Future<Output = Result<T, IdentityError>>,
    {
        let _slot = self
            .calls
            .acquire()
            .await
            .expect("the call semaphore is never closed");
        let permit = self.health.admit().map_err(|wait| CallError::Paused {
            wait,
            reason: self
                .health
                .status()
                .last_error
                .unwrap_or_else(|| "the identity service is failing".into()),
        })?;
        let probe = permit.probe;
        let service = Arc::clone(&self.identity_now().service);
        let started = std::time::Instant::now();
        let span = match crate::telemetry::is_on() {
            true => tracing::info_span!(
                target: "tokenbroker::trace",
                "identity",
                otel.name = %format_args!("identity {}", operation_of(kind)),
                otel.kind = "client",
                tokenbroker.operation = operation_of(kind),
                tokenbroker.caller = c.map(|c| &*c.name),
                tokenbroker.outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            ),
            false => tracing::Span::none(),
        };
        let result = op(service).instrument(span.clone()).await;
        let outcome = outcome(&result);
        span.record("tokenbroker.outcome", outcome);
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        self.metrics.record_fetch(kind, outcome);
        self.metrics
            .record_identity_call(operation_of(kind), outcome, started.elapsed());
        if let Some(c) = c {
            c.record_fetch(kind, outcome);
        }
        let text;
        let observed = match &result {
            Err(e) if e.class() == ErrorClass::Transient => {
                text = e.to_string();
                tracing::debug!(kind, error = %text, "identity call failed");
                Observed::Failed(&text, e.retry_after())
            }
            Err(e) => {
                tracing::debug!(kind, error = %e, "identity call refused");
                Observed::Answered
            }
            Ok(_) => Observed::Answered,
        };
        let healthy = matches!(observed, Observed::Answered);
        self.health.record(permit, observed, &self.timing());
        if probe {
            self.metrics
                .record_probe(if healthy { "ok" } else { "failed" });
        }
        self.metrics.set_identity_state(self.health.state().name());
        result.map_err(CallError::Identity)
    }

    /// An api-tokens call with the admin bearer; when the bearer is refused (401), one new
    /// bearer and the same call once more.
    async fn admin_call<T, F, Fut>(
        &self,
        c: Option<&CallerState>,
        kind: &'static str,
        op: F,
    ) -> Result<T, CallError>
    where
        F: Fn(Arc<dyn IdentityService>, Secret) -> Fut,
        Fut: Future<Output = Result<T, IdentityError>>,
    {
        let admin = self.admin_bearer().await?;
        let bearer = admin.value.clone();
        match self.call(c, kind, |s| op(s, bearer)).await {
            Err(e) if e.is(ErrorClass::Unauthorized) => {
                tracing::warn!(kind, "admin bearer refused; fetching a new one");
                self.metrics.record_ladder("admin_bearer");
                self.forget_admin(&admin);
                let admin = self.admin_bearer().await?;
                let bearer = admin.value.clone();
                self.call(c, kind, |s| op(s, bearer)).await
            }
            other => other,
        }
    }

    fn forget_admin(&self, refused: &Arc<Held<Secret>>) {
        let mut admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        if admin.as_ref().is_some_and(|a| Arc::ptr_eq(a, refused)) {
            *admin = None;
        }
    }

    /// The admin bearer: kept until its refresh point, fetched once however many ask.
    async fn admin_bearer(&self) -> Result<Arc<Held<Secret>>, CallError> {
        let cached = self.admin.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(admin) = cached.filter(|a| a.is_usable(Instant::now())) {
            return Ok(admin);
        }
        let me = self.me.upgrade();
        self.admin_flight
            .join(
                move || async move {
                    match me {
                        Some(broker) => broker.fetch_admin().await,
                        None => Err(CallError::Identity(IdentityError::Transport(
                            "the broker stopped".into(),
                        ))),
                    }
                },
                || {
                    Err(CallError::Identity(IdentityError::Transport(
                        "fetching the admin bearer failed unexpectedly".into(),
                    )))
                },
            )
            .await
    }

    async fn fetch_admin(&self) -> Result<Arc<Held<Secret>>, CallError> {
        {
            let gate = self.admin_gate.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(wait) = gate.closed_for(Instant::now()) {
                return Err(CallError::Paused {
                    wait,
                    reason: format!(
                        "the admin bearer was refused: {}",
                        gate.last_error().unwrap_or("unknown error")
                    ),
                });
            }
        }
        let identity = self.identity_now();
        let result = self
            .call(None, "admin_bearer", |service| async move {
                let config = &identity.config;
                service
                    .client_credentials(
                        &config.client_id,
                        &config.client_secret,
                        config.scope.as_deref(),
                    )
                    .await
            })
            .await;
        match result {
            Ok(t) => {
                self.admin_gate
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .succeeded();
                let lifetime = t.lifetime.unwrap_or(UNKNOWN_LIFETIME);
                let mut held = Held::new(
                    t.token,
                    Instant::from_std(t.received),
                    lifetime,
                    &self.timing(),
                );
                // renewed ahead: no longer handed out after its refresh point
                held.usable_until = held.refresh_at;
                let held = Arc::new(held);
                *self.admin.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&held));
                Ok(held)
            }
            Err(CallError::Identity(e)) if e.class() != ErrorClass::Transient => {
                let wait = self
                    .admin_gate
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .failed(Instant::now(), e.to_string(), None, &self.timing());
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                    "the admin bearer was refused");
                Err(CallError::Identity(e))
            }
            Err(e) => Err(e),
        }
    }
}

/// An access token received at `received`, living `lifetime`, as the inject token (a new
/// generation).
pub(super) fn access_held(
    broker: &Broker,
    token: Secret,
    received: Instant,
    lifetime: Duration,
) -> Result<Held<InjectCred>, IdentityError> {
    let generation = broker.next_generation();
    let value = InjectCred {
        inject: Arc::new(InjectToken {
            header: bearer(&token)?,
            generation,
        }),
        token,
        rejected: Default::default(),
    };
    Ok(Held::new(value, received, lifetime, &broker.timing()))
}

/// In `api_token` mode the inject token is the API token itself, with its timing (a new
/// generation).
pub(super) fn inject_api_token(
    broker: &Broker,
    api: &Held<ApiCred>,
) -> Result<Held<InjectCred>, IdentityError> {
    Ok(Held {
        value: InjectCred {
            token: api.value.token.clone(),
            inject: Arc::new(InjectToken {
                header: bearer(&api.value.token)?,
                generation: broker.next_generation(),
            }),
            rejected: Default::default(),
        },
        received: api.received,
        usable_until: api.usable_until,
        refresh_at: api.refresh_at,
        expires_wall: api.expires_wall,
    })
}
