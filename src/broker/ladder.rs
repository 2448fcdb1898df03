//! Renewing a caller's tokens, and every call to the identity service.
//!
//! One renewal does what is due, and runs the recovery ladder's definitive steps back to back,
//! with no backoff between them: exchange refused (the API token is invalid, expired, revoked or
//! used up) -> regenerate -> regenerate refused -> create -> exchange; an api-tokens call whose
//! admin bearer is refused (401) -> one new bearer, the same call once more.
//! Transient failures stop the renewal and open the shared breaker (`health.rs`); definitive
//! refusals that no step can mend (a configuration problem) back this caller off (`gate.rs`).
//! Every identity call goes through the gateway (`gateway.rs`).
//! The ladder's decisions are [`next_step`], a pure function of the renewal's [`Situation`]
//! (settings, tokens held, their timing, whether the shared store can be used, what the renewal
//! has done); `renew_here` gathers the situation, runs the step, and asks again.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use super::caller::{
    ApiCred, CallerSettings, CallerState, Failure, Held, InjectCred, Renewal, Trigger,
};
use super::gateway::CallError;
use super::health::Admission;
use super::{Broker, IdentityService};
use crate::config::InjectMode;
use crate::identity::{ApiToken, CreateRequest, ErrorClass, IdentityError};
use crate::secret::Secret;
use crate::token::InjectToken;

/// Lifetime assumed for a token whose `expires_in` is -1 (unknown).
const UNKNOWN_LIFETIME: Duration = Duration::from_secs(300);

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
                        match self.gateway.health.peek() {
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
    /// usable. Each step is what [`next_step`] decides from what is held now.
    pub(super) async fn renew_here(
        &self,
        c: &CallerState,
        local_only: bool,
    ) -> Result<(Arc<Held<InjectCred>>, bool), CallError> {
        let s = c.settings();
        let current = c.sound().filter(|h| !h.is_due(Instant::now()));
        let mut api = c.api();
        let mut progress = Progress::default();
        let mut last_error = None;
        loop {
            let situation = Situation {
                inject: s.inject,
                single_use: s.single_use,
                local_only,
                current: current.as_ref().map(|held| Current {
                    is_api_token: api.as_ref().is_some_and(|a| held.is_api_token(&a.value)),
                }),
                api: api.as_ref().map(|a| ApiState {
                    due: a.is_due(Instant::now()),
                    exchanged: a.value.exchanged_once(),
                    refused_upstream: c.api_token_refused(&a.value),
                }),
                progress,
            };
            let step = next_step(&situation);
            match step {
                Step::KeepApi => progress.api_settled = true,
                Step::Create { local_only } => {
                    api = Some(self.create_api(c, &s, local_only).await?);
                    progress.obtained_api();
                }
                Step::Regenerate => {
                    let stale = api.as_ref().expect("regenerate needs an API token");
                    match self.regenerate_api(c, stale).await {
                        Ok(fresh) => {
                            api = Some(fresh);
                            progress.obtained_api();
                        }
                        Err(e) if e.is(ErrorClass::InvalidCredential) => {
                            tracing::warn!(caller = &*c.name, api_token_id = %stale.value.id,
                                error = %e, "regenerate refused; creating a new API token");
                            self.metrics.record_ladder("create");
                            progress.regenerate_refused = true;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Step::KeepCurrent => {
                    let held = current.expect("a current token to keep");
                    return Ok((held, false));
                }
                Step::UseApiToken => {
                    let api = api.as_ref().expect("an API token to inject");
                    return Ok((Arc::new(inject_api_token(self, api)?), true));
                }
                Step::Exchange => {
                    let a = api.as_ref().expect("an API token to exchange");
                    match self.exchange(c, a).await {
                        Ok(held) => return Ok((Arc::new(held), true)),
                        Err(e) if e.is(ErrorClass::InvalidCredential) => {
                            if progress.exchange_refusals == 0 {
                                tracing::info!(caller = &*c.name, api_token_id = %a.value.id,
                                    "API token refused by the exchange; replacing it");
                            }
                            progress.exchange_refusals += 1;
                            last_error = Some(e);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Step::GiveUp => {
                    return Err(last_error.expect("giving up follows a refusal"));
                }
            }
        }
    }

    /// One exchange of the API token; marks it exchanged.
    async fn exchange(
        &self,
        c: &CallerState,
        api: &Held<ApiCred>,
    ) -> Result<Held<InjectCred>, CallError> {
        let token = api.value.token.clone();
        let t = self
            .call(Some(c), "exchange", |service| async move {
                service.exchange(&token).await
            })
            .await?;
        api.value.exchanged.store(true, Ordering::Release);
        let lifetime = t.lifetime.unwrap_or(UNKNOWN_LIFETIME);
        let received = t.received;
        Ok(access_held(self, t.token, received, lifetime)?)
    }

    /// Regenerates the API token.
    async fn regenerate_api(
        &self,
        c: &CallerState,
        stale: &Held<ApiCred>,
    ) -> Result<Arc<Held<ApiCred>>, CallError> {
        let ttl = self.policy_now().api_token_ttl_minutes;
        let token = &stale.value.token;
        let t = self
            .admin_call(Some(c), "regenerate", |service, admin| async move {
                service.regenerate_api_token(&admin, token, ttl).await
            })
            .await?;
        tracing::info!(caller = &*c.name, api_token_id = %t.id, suffix = %t.suffix,
            "API token regenerated");
        Ok(self.store_api(c, t).await)
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
        let held = Arc::new(Held::new(cred, t.received, t.lifetime, &self.timing()));
        c.set_api(Arc::clone(&held));
        self.save_state().await;
        held
    }

    /// One identity call for caller `c` (none: the admin bearer), through the gateway.
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
        let service = || Arc::clone(&self.identity_now().service);
        self.gateway
            .call(service, c, kind, &self.timing(), op)
            .await
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
                &self.runtime,
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
                let mut held = Held::new(t.token, t.received, lifetime, &self.timing());
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

/// What one renewal has done so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Progress {
    /// The API token has been checked, and kept or replaced.
    pub api_settled: bool,
    /// A regenerate of the API token held was refused (it is invalid or expired).
    pub regenerate_refused: bool,
    /// How many times the exchange refused the API token.
    pub exchange_refusals: u8,
    /// The API token was replaced after the exchange refused it.
    pub replaced_after_refusal: bool,
}

impl Progress {
    /// A new API token was created or regenerated.
    fn obtained_api(&mut self) {
        self.regenerate_refused = false;
        if self.exchange_refusals > 0 {
            self.replaced_after_refusal = true;
        }
        self.api_settled = true;
    }
}

/// The inject token held when the renewal started, usable, not refused and not due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Current {
    /// It is the API token held (`api_token` mode).
    pub is_api_token: bool,
}

/// The API token held, while usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ApiState {
    /// Past its refresh point.
    pub due: bool,
    /// Exchanged at least once (matters when it is single use).
    pub exchanged: bool,
    /// An upstream refused it (`api_token` mode).
    pub refused_upstream: bool,
}

/// What a renewal decides on: the caller's settings, its tokens now, whether the shared store
/// can be used (`local_only`: it cannot), and what the renewal has done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Situation {
    pub inject: InjectMode,
    pub single_use: bool,
    pub local_only: bool,
    pub current: Option<Current>,
    pub api: Option<ApiState>,
    pub progress: Progress,
}

/// The next step of a renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// Keep the API token held; go on to the inject token.
    KeepApi,
    /// Create an API token (`local_only`: for this replica alone).
    Create { local_only: bool },
    /// Regenerate the API token held.
    Regenerate,
    /// The inject token held stays: nothing new.
    KeepCurrent,
    /// Inject the API token itself (`api_token` mode).
    UseApiToken,
    /// Exchange the API token for an access token.
    Exchange,
    /// The exchange refused a replaced API token too: fail with that refusal.
    GiveUp,
}

/// The recovery ladder's decisions: the next step of a renewal, from its situation alone.
pub(super) fn next_step(s: &Situation) -> Step {
    let p = &s.progress;
    if !p.api_settled {
        let Some(api) = &s.api else {
            return Step::Create {
                local_only: s.local_only,
            };
        };
        let need_inject = s.current.is_none();
        let used_up = s.single_use && need_inject && api.exchanged;
        if s.local_only && !used_up {
            // still usable: keep using the shared token rather than regenerate it
            return Step::KeepApi;
        }
        let refused = s.inject == InjectMode::ApiToken && api.refused_upstream;
        if api.due || used_up || refused {
            return replace(s);
        }
        return Step::KeepApi;
    }
    if let Some(current) = &s.current {
        if s.inject == InjectMode::AccessToken || current.is_api_token {
            return Step::KeepCurrent;
        }
    }
    match s.inject {
        InjectMode::ApiToken => Step::UseApiToken,
        InjectMode::AccessToken => match (p.exchange_refusals, p.replaced_after_refusal) {
            (0, _) => Step::Exchange,
            (1, false) => replace(s),
            (1, true) => Step::Exchange,
            _ => Step::GiveUp,
        },
    }
}

/// Replacing the API token: regenerate it, or create one when regenerate was refused, or when
/// the shared store is unreachable (regenerating would kill every other replica's copy).
fn replace(s: &Situation) -> Step {
    if s.local_only || s.progress.regenerate_refused {
        Step::Create {
            local_only: s.local_only,
        }
    } else {
        Step::Regenerate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCESS: InjectMode = InjectMode::AccessToken;
    const API: InjectMode = InjectMode::ApiToken;

    fn api(due: bool, exchanged: bool, refused_upstream: bool) -> Option<ApiState> {
        Some(ApiState {
            due,
            exchanged,
            refused_upstream,
        })
    }

    fn progress(settled: bool, regenerate_refused: bool, refusals: u8, replaced: bool) -> Progress {
        Progress {
            api_settled: settled,
            regenerate_refused,
            exchange_refusals: refusals,
            replaced_after_refusal: replaced,
        }
    }

    /// (row, mode, single use, local only, current, api, progress) -> step
    type Row = (
        &'static str,
        InjectMode,
        bool,
        bool,
        Option<Current>,
        Option<ApiState>,
        Progress,
        Step,
    );

    #[test]
    fn the_decision_table() {
        let fresh = api(false, false, false);
        let due = api(true, false, false);
        let used = api(false, true, false);
        let refused = api(false, false, true);
        let held = Some(Current {
            is_api_token: false,
        });
        let held_api = Some(Current { is_api_token: true });
        let start = progress(false, false, 0, false);
        let settled = progress(true, false, 0, false);
        let create = |local_only| Step::Create { local_only };
        #[rustfmt::skip]
        let table: &[Row] = &[
            // the API token: (mode, single use, local only, current, api, progress) -> step
            ("none: create", ACCESS, false, false, None, None, start, create(false)),
            ("none, store away: create a local one", ACCESS, false, true, None, None, start, create(true)),
            ("fine: keep", ACCESS, false, false, None, fresh, start, Step::KeepApi),
            ("due: regenerate", ACCESS, false, false, None, due, start, Step::Regenerate),
            ("due, regenerate refused: create", ACCESS, false, false, None, due, progress(false, true, 0, false), create(false)),
            ("due, store away: keep the shared one", ACCESS, false, true, None, due, start, Step::KeepApi),
            ("single use, used, token needed: regenerate", ACCESS, true, false, None, used, start, Step::Regenerate),
            ("single use, used, token needed, store away: create a local one", ACCESS, true, true, None, used, start, create(true)),
            ("single use, used, no token needed: keep", ACCESS, true, false, held, used, start, Step::KeepApi),
            ("exchanged, not single use: keep", ACCESS, false, false, None, used, start, Step::KeepApi),
            ("api_token mode, refused upstream: regenerate", API, false, false, None, refused, start, Step::Regenerate),
            ("access mode, refused upstream flag: keep", ACCESS, false, false, None, refused, start, Step::KeepApi),
            // the inject token
            ("access token held: keep it", ACCESS, false, false, held, fresh, settled, Step::KeepCurrent),
            ("api_token mode, held is the API token: keep it", API, false, false, held_api, fresh, settled, Step::KeepCurrent),
            ("api_token mode, held is another: inject the API token", API, false, false, held, fresh, settled, Step::UseApiToken),
            ("api_token mode, none held: inject the API token", API, false, false, None, fresh, settled, Step::UseApiToken),
            ("access mode, none held: exchange", ACCESS, false, false, None, fresh, settled, Step::Exchange),
            ("exchange refused: regenerate", ACCESS, false, false, None, fresh, progress(true, false, 1, false), Step::Regenerate),
            ("exchange refused, store away: create a local one", ACCESS, false, true, None, fresh, progress(true, false, 1, false), create(true)),
            ("exchange refused, regenerate refused: create", ACCESS, false, false, None, fresh, progress(true, true, 1, false), create(false)),
            ("exchange refused, replaced: exchange again", ACCESS, false, false, None, fresh, progress(true, false, 1, true), Step::Exchange),
            ("exchange refused twice: give up", ACCESS, false, false, None, fresh, progress(true, false, 2, true), Step::GiveUp),
        ];
        for (row, inject, single_use, local_only, current, api, progress, step) in table {
            let situation = Situation {
                inject: *inject,
                single_use: *single_use,
                local_only: *local_only,
                current: *current,
                api: *api,
                progress: *progress,
            };
            assert_eq!(next_step(&situation), *step, "{row}");
        }
    }

    #[test]
    fn a_new_api_token_settles_it_and_ends_a_refused_regenerate() {
        let mut p = progress(false, true, 0, false);
        p.obtained_api();
        assert_eq!(p, progress(true, false, 0, false));
        let mut p = progress(true, true, 1, false);
        p.obtained_api();
        assert_eq!(p, progress(true, false, 1, true));
    }
}
