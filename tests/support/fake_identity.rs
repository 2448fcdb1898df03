//! An in-process identity service for broker tests on paused tokio time: it keeps live tokens
//! like the real one (regenerate kills the old secret, revoked tokens are refused), records
//! every call with its (paused) time, and answers failures that a test scripts by operation and
//! time window. No sockets: the broker reaches it through `broker::IdentityService`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use tokenbroker::broker::IdentityService;
use tokenbroker::identity::{AccessToken, ApiToken, CreateRequest, IdentityError};
use tokenbroker::secret::Secret;

pub use tokenbroker::identity::Operation as Op;

/// A scripted failure: calls of `ops` (all when empty) between `from` and `until` get `error`;
/// `times` limits how many.
pub struct Fault {
    pub ops: Vec<Op>,
    pub from: Instant,
    pub until: Option<Instant>,
    pub times: Option<u32>,
    pub error: fn() -> IdentityError,
}

#[derive(Default)]
struct State {
    calls: Vec<(Instant, Op)>,
    faults: Vec<Fault>,
    /// Live API tokens: secret -> id.
    api_tokens: HashMap<String, String>,
    /// Live access tokens.
    access_tokens: HashSet<String>,
    serial: u64,
}

pub struct FakeIdentity {
    state: Mutex<State>,
    pub access_ttl: Duration,
    pub api_ttl: Duration,
    /// Time each call takes (on the paused clock).
    pub latency: Duration,
}

/// A connect error: transient.
pub fn refused() -> IdentityError {
    IdentityError::Connect("connection refused".into())
}

fn status(
    op: Op,
    status: u16,
    error: Option<&str>,
    retry_after: Option<Duration>,
) -> IdentityError {
    IdentityError::Status {
        op,
        status,
        error: error.map(str::to_string),
        description: None,
        retry_after,
    }
}

/// 400 without a body, as regenerate answers an invalid or expired API token.
pub fn bodyless_400() -> IdentityError {
    IdentityError::status(Op::Regenerate, 400)
}

/// 400 `invalid_grant`, as the exchange answers a dead API token.
pub fn invalid_grant() -> IdentityError {
    status(Op::Exchange, 400, Some("invalid_grant"), None)
}

/// 429 with `Retry-After: 5`, to the exchange.
pub fn too_many_requests_5s() -> IdentityError {
    status(Op::Exchange, 429, None, Some(Duration::from_secs(5)))
}

impl FakeIdentity {
    /// Access tokens living `access_ttl`, API tokens `api_ttl`; each call takes 5 ms.
    pub fn new(access_ttl: Duration, api_ttl: Duration) -> Arc<FakeIdentity> {
        Self::with_latency(access_ttl, api_ttl, Duration::from_millis(5))
    }

    pub fn with_latency(
        access_ttl: Duration,
        api_ttl: Duration,
        latency: Duration,
    ) -> Arc<FakeIdentity> {
        Arc::new(FakeIdentity {
            state: Mutex::default(),
            access_ttl,
            api_ttl,
            latency,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn fail(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Every call so far, with its time.
    pub fn calls(&self) -> Vec<(Instant, Op)> {
        self.lock().calls.clone()
    }

    pub fn count(&self, op: Op) -> usize {
        self.lock().calls.iter().filter(|(_, o)| *o == op).count()
    }

    /// Calls made in `[from, until)`.
    pub fn calls_between(&self, from: Instant, until: Instant) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|(t, _)| *t >= from && *t < until)
            .count()
    }

    /// Every API token and access token issued so far stops working.
    pub fn revoke_everything(&self) {
        let mut s = self.lock();
        s.api_tokens.clear();
        s.access_tokens.clear();
    }

    /// Every access token issued so far stops working; API tokens still exchange.
    pub fn revoke_access_tokens(&self) {
        self.lock().access_tokens.clear();
    }

    pub fn accepts(&self, access_token: &str) -> bool {
        self.lock().access_tokens.contains(access_token)
    }

    /// Records the call; the scripted failure it hits, if any.
    async fn enter(&self, op: Op) -> Result<(), IdentityError> {
        tokio::time::sleep(self.latency).await;
        let now = Instant::now();
        let mut s = self.lock();
        s.calls.push((now, op));
        let hit = s.faults.iter_mut().find(|f| {
            (f.ops.is_empty() || f.ops.contains(&op))
                && now >= f.from
                && f.until.is_none_or(|u| now < u)
                && f.times != Some(0)
        });
        match hit {
            Some(f) => {
                if let Some(n) = &mut f.times {
                    *n -= 1;
                }
                Err((f.error)())
            }
            None => Ok(()),
        }
    }

    fn next(&self, prefix: &str) -> String {
        let mut s = self.lock();
        s.serial += 1;
        format!("{prefix}{:040}", s.serial)
    }

    fn access_token(&self, token: String, lifetime: Duration) -> AccessToken {
        AccessToken {
            token: Secret::new(token),
            token_type: "Bearer".into(),
            lifetime: Some(lifetime),
            received: Instant::now(),
            scope: None,
        }
    }

    fn api_token(&self, id: String, token: String) -> ApiToken {
        self.lock().api_tokens.insert(token.clone(), id.clone());
        ApiToken {
            id,
            suffix: token[token.len() - 5..].to_string(),
            token: Secret::new(token),
            display_name: None,
            status: Some("ACTIVE".into()),
            lifetime: self.api_ttl,
            received: Instant::now(),
            access_token_ttl_minutes: None,
        }
    }
}

impl IdentityService for FakeIdentity {
    fn client_credentials<'a>(
        &'a self,
        _client_id: &'a str,
        _client_secret: &'a Secret,
        _scope: Option<&'a str>,
    ) -> BoxFuture<'a, Result<AccessToken, IdentityError>> {
        Box::pin(async move {
            self.enter(Op::ClientCredentials).await?;
            let token = self.next("admin");
            Ok(self.access_token(token, Duration::from_secs(3600)))
        })
    }

    fn exchange<'a>(
        &'a self,
        api_token: &'a Secret,
    ) -> BoxFuture<'a, Result<AccessToken, IdentityError>> {
        Box::pin(async move {
            self.enter(Op::Exchange).await?;
            if !self.lock().api_tokens.contains_key(api_token.expose()) {
                return Err(invalid_grant());
            }
            let token = self.next("access");
            self.lock().access_tokens.insert(token.clone());
            Ok(self.access_token(token, self.access_ttl))
        })
    }

    fn create_api_token<'a>(
        &'a self,
        _admin: &'a Secret,
        _request: &'a CreateRequest,
    ) -> BoxFuture<'a, Result<ApiToken, IdentityError>> {
        Box::pin(async move {
            self.enter(Op::Create).await?;
            let id = self.next("id-");
            let token = self.next("vidb_");
            Ok(self.api_token(id, token))
        })
    }

    fn regenerate_api_token<'a>(
        &'a self,
        _admin: &'a Secret,
        api_token: &'a Secret,
        _ttl_minutes: i64,
    ) -> BoxFuture<'a, Result<ApiToken, IdentityError>> {
        Box::pin(async move {
            self.enter(Op::Regenerate).await?;
            let Some(id) = self.lock().api_tokens.remove(api_token.expose()) else {
                return Err(bodyless_400());
            };
            let token = self.next("vidb_");
            Ok(self.api_token(id, token))
        })
    }
}
