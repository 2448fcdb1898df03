//! A strict emulator of VMware Identity Services (token endpoint, api-tokens create and
//! regenerate), its control API under `/_emulator/`, and an echo upstream that accepts only live
//! access tokens. It speaks plain HTTP on loopback and follows `docs/identity-service.md`,
//! answering every documented error in the documented shape (see `identity_api` for which have
//! no body); where the vendor says nothing, the choices are listed here and in the submodules.
//!
//! This file owns the public interface and wires the parts together:
//! - `tokens`: every credential the emulator issued, and their lifetimes;
//! - `identity_api`: the HTTP handlers of the identity service;
//! - `faults`: the injected faults and which request they hit;
//! - `listener`: the identity listener, which a `Refuse` fault closes and reopens;
//! - `control`: the `/_emulator/` control API (never counted, never hit by faults);
//! - `echo`: the echo upstream;
//! - `http`: response helpers and the one error-to-response table.
//!
//! Choices where the protocol is silent:
//! - **Counters** count a request once it is known to be for an operation, whatever happens next
//!   (validation failure, bad credentials, a fault): create and regenerate as soon as their path and
//!   method match on the configured tenant and the body was read; token-endpoint requests once the
//!   `grant_type` is known. Requests with a wrong tenant, method or content type on the token endpoint,
//!   or an unknown grant, count nowhere. Under `Refuse` nothing is received, so nothing is counted.
//! - **Faults** hit the first matching active fault in injection order; each hit counts against its
//!   `requests`. [`FaultKind::Status`] answers any error status (400-599) with no body, a JSON
//!   body or an HTML page, so that every documented error, and the readings the reference leaves
//!   open, can be produced for any operation. `Refuse` is connection-level: it ignores
//!   `operations` and `requests`, ends after `seconds` or when cleared, and also closes the control
//!   API (it shares the port): inject it over HTTP only with `seconds`, or use
//!   [`Emulator::clear_faults`].
//! - **Time**: lifetimes are durations (`ttl minutes * seconds_per_minute` seconds) on tokio's
//!   clock, so a test on paused time skips them; dates in JSON are the wall clock plus that
//!   duration.
//! - Access tokens (from the API-token exchange) and admin bearers (from `client_credentials`) are
//!   distinct: [`Emulator::revoke_access_tokens`] kills the former, [`Emulator::revoke_admin_bearers`]
//!   the latter. Revoking or regenerating an API token does not kill access tokens already exchanged
//!   from it (they are self-contained JWTs in the real service).

mod control;
mod echo;
mod faults;
mod http;
mod identity_api;
mod listener;
mod tokens;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::IdentityConfig;
use crate::secret::Secret;
use crate::server::{serve, ConnLimits, Shutdown};

#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    pub listen: SocketAddr,
    pub tenant: String,
    /// OAuth clients allowed to use client_credentials: (client_id, secret).
    pub clients: Vec<(String, Secret)>,
    /// How many real seconds one TTL minute lasts (60 = real time; 1 = fast tests).
    pub seconds_per_minute: f64,
    /// Lifetime of the admin bearers from client_credentials, in (emulated) minutes.
    pub admin_token_ttl_minutes: i64,
    /// Where to start the echo upstream, if at all.
    pub echo_upstream: Option<SocketAddr>,
    /// Whether the echo upstream also accepts live API tokens as bearers (for `inject = "api_token"`).
    pub echo_accepts_api_tokens: bool,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tenant: "CUSTOMER".to_string(),
            clients: vec![("admin".to_string(), Secret::new("secret"))],
            seconds_per_minute: 60.0,
            admin_token_ttl_minutes: 60,
            echo_upstream: None,
            echo_accepts_api_tokens: false,
        }
    }
}

/// Calls seen per operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub client_credentials: u64,
    pub create: u64,
    pub regenerate: u64,
    pub exchange: u64,
    /// Echo-upstream requests accepted / refused with 401.
    pub echo_ok: u64,
    pub echo_rejected: u64,
}

/// Which operations a fault applies to (the client's own names: `client_credentials`,
/// `exchange`, `create`, `regenerate`).
pub use crate::identity::Operation;

/// The body of a [`FaultKind::Status`] answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyStyle {
    /// No body: no `Content-Type`, `Content-Length: 0` (the reference's "doesn't return any
    /// data structure").
    #[serde(rename = "none")]
    Empty,
    /// `application/json` `{"error": ..., "error_description": "injected fault"}`.
    Json,
    /// `text/html`, the error page of a proxy or load balancer.
    Html,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// The listener stops accepting (connections refused).
    Refuse,
    /// 500 with a JSON error body (`Status` 500 with a JSON body).
    ServerError,
    /// 429 with `Retry-After: <secs>` and a JSON error body.
    TooManyRequests { retry_after_secs: u64 },
    /// Any error status (400-599) with the chosen body. `error` sets the JSON body's `error`
    /// code (JSON only; by default one that fits the status and operation, e.g. `invalid_request`
    /// for 400, `invalid_client` / `invalid_token` for 401, `server_error` for 500).
    /// `retry_after` (seconds) only with 429 or 503.
    Status {
        status: u16,
        body: BodyStyle,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after: Option<u64>,
    },
    /// 200 with a body that is not JSON.
    Garbage,
    /// The answer is delayed.
    Slow { delay_ms: u64 },
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Fault {
    #[serde(flatten)]
    pub kind: FaultKind,
    /// Empty: every operation.
    #[serde(default)]
    pub operations: Vec<Operation>,
    /// Ends after this many affected requests...
    pub requests: Option<u64>,
    /// ... or after this long (whichever first; neither: until cleared).
    pub seconds: Option<f64>,
}

impl FaultKind {
    /// A [`FaultKind::Status`] answer with the default `error` code and no `Retry-After`.
    pub fn status(status: u16, body: BodyStyle) -> FaultKind {
        FaultKind::Status {
            status,
            body,
            error: None,
            retry_after: None,
        }
    }
}

impl Fault {
    /// A fault on `operations` (empty: all) for `requests` affected requests (`None`: until
    /// cleared), with no time limit.
    pub fn new(kind: FaultKind, operations: Vec<Operation>, requests: Option<u64>) -> Fault {
        Fault {
            kind,
            operations,
            requests,
            seconds: None,
        }
    }
}

/// How long shutdown waits for open connections before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A running emulator. Dropping it does not stop it; call [`Emulator::shutdown`].
pub struct Emulator {
    shared: Arc<Shared>,
    echo_addr: Option<SocketAddr>,
    /// Stops the echo upstream.
    shutdown: Shutdown,
    echo_task: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Binds the identity port (and the echo port, if configured) and starts serving. Fails if a
    /// port cannot be bound or `seconds_per_minute` is not a positive number.
    pub async fn start(config: EmulatorConfig) -> std::io::Result<Emulator> {
        if !(config.seconds_per_minute.is_finite() && config.seconds_per_minute > 0.0) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seconds_per_minute must be a positive number",
            ));
        }
        let runtime = Handle::current();
        let gate = listener::Gate::bind(config.listen, runtime.clone())?;
        let echo_listener = match config.echo_upstream {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let echo_addr = match &echo_listener {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let shared = Arc::new(Shared {
            tenant: config.tenant.clone(),
            echo_accepts_api_tokens: config.echo_accepts_api_tokens,
            tokens: Mutex::new(tokens::Tokens::new(&config)),
            counters: Mutex::new(Counters::default()),
            faults: Mutex::new(faults::Faults::default()),
            gate,
            runtime,
        });
        shared.open_listener()?;

        let shutdown = Shutdown::new();
        let echo_task = echo_listener.map(|listener| {
            let handler_shared = shared.clone();
            let handler = move |req, _peer| echo::handle(handler_shared.clone(), req);
            tokio::spawn(serve(
                listener,
                None,
                handler,
                ConnLimits::default(),
                shutdown.clone(),
                SHUTDOWN_GRACE,
            ))
        });
        tracing::info!(addr = %shared.gate.addr(), echo = ?echo_addr, tenant = %config.tenant, "emulator started");
        Ok(Emulator {
            shared,
            echo_addr,
            shutdown,
            echo_task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.gate.addr()
    }

    /// `http://<addr>`: the identity service's base URL for the client.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Identity-service settings for a client of this emulator acting as OAuth client
    /// `client_id` (tests, benchmarks, the dev demo).
    pub fn identity_config(&self, client_id: &str, client_secret: &Secret) -> IdentityConfig {
        IdentityConfig {
            base_url: self.base_url(),
            tenant: self.shared.tenant.clone(),
            client_id: client_id.to_string(),
            client_secret: client_secret.clone(),
            scope: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }

    pub fn echo_addr(&self) -> Option<SocketAddr> {
        self.echo_addr
    }

    /// `http://<echo addr>`, if the echo upstream runs.
    pub fn echo_url(&self) -> Option<String> {
        self.echo_addr.map(|a| format!("http://{a}"))
    }

    pub fn counters(&self) -> Counters {
        *self.shared.counters()
    }

    pub fn reset_counters(&self) {
        *self.shared.counters() = Counters::default();
    }

    /// Injects a fault. A fault that cannot work (`requests: 0`, `seconds` negative or not a number)
    /// is logged and ignored; [`Emulator::try_inject_fault`] reports it instead.
    pub fn inject_fault(&self, fault: Fault) {
        if let Err(e) = self.shared.inject_fault(fault) {
            tracing::warn!(error = %e, "fault ignored");
        }
    }

    /// Injects a fault, or says why it cannot work.
    pub fn try_inject_fault(&self, fault: Fault) -> Result<(), String> {
        self.shared.inject_fault(fault)
    }

    pub fn clear_faults(&self) {
        self.shared.clear_faults();
    }

    /// The faults still active, in injection order.
    pub fn active_faults(&self) -> Vec<Fault> {
        self.shared.faults().active(Instant::now())
    }

    /// Revokes the API token with this id (its secret stops working). False if unknown.
    pub fn revoke_api_token(&self, id: &str) -> bool {
        self.shared.tokens().revoke_api_token(id)
    }

    /// Every access token issued so far stops working.
    pub fn revoke_access_tokens(&self) {
        self.shared.tokens().revoke_access_tokens();
    }

    /// Every admin bearer (from `client_credentials`) issued so far stops working.
    pub fn revoke_admin_bearers(&self) {
        self.shared.tokens().revoke_admin_bearers();
    }

    pub async fn shutdown(self) {
        let mut tasks = self.shared.gate.stop();
        self.shutdown.trigger();
        tasks.extend(self.echo_task);
        for task in tasks {
            let _ = task.await;
        }
        tracing::info!("emulator stopped");
    }
}

/// What every handler of one emulator shares. Locks are held for a few map operations, never
/// across an `.await`.
struct Shared {
    tenant: String,
    echo_accepts_api_tokens: bool,
    tokens: Mutex<tokens::Tokens>,
    counters: Mutex<Counters>,
    faults: Mutex<faults::Faults>,
    gate: listener::Gate,
    runtime: Handle,
}

/// A poisoned lock only means a panic elsewhere; the data is still consistent enough for a test tool.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn tokens(&self) -> MutexGuard<'_, tokens::Tokens> {
        lock(&self.tokens)
    }

    fn counters(&self) -> MutexGuard<'_, Counters> {
        lock(&self.counters)
    }

    fn faults(&self) -> MutexGuard<'_, faults::Faults> {
        lock(&self.faults)
    }

    /// Starts serving the identity API on its port, unless it is already served.
    fn open_listener(self: &Arc<Self>) -> std::io::Result<()> {
        let shared = self.clone();
        self.gate
            .open(move |req, _peer| identity_api::handle(shared.clone(), req))
    }

    /// Counts a request for `op`, then applies the fault that hits it, if any: `Some(response)`
    /// when the fault answers instead of the emulator.
    async fn admit(&self, op: Operation) -> Option<http::Response> {
        {
            let mut c = self.counters();
            match op {
                Operation::ClientCredentials => c.client_credentials += 1,
                Operation::Create => c.create += 1,
                Operation::Regenerate => c.regenerate += 1,
                Operation::Exchange => c.exchange += 1,
            }
        }
        let kind = self.faults().hit(op, Instant::now())?;
        tracing::debug!(?op, ?kind, "fault hit");
        faults::respond(op, &kind).await
    }

    fn inject_fault(self: &Arc<Self>, fault: Fault) -> Result<(), String> {
        let refuse_until = {
            let mut faults = self.faults();
            let until = faults.add(fault.clone(), Instant::now())?;
            (fault.kind == FaultKind::Refuse).then_some(until)
        };
        tracing::info!(?fault, "fault injected");
        if let Some(until) = refuse_until {
            self.gate.close();
            if let Some(until) = until {
                let shared = self.clone();
                self.runtime.spawn(async move {
                    tokio::time::sleep_until(until).await;
                    shared.end_refuse_if_over();
                });
            }
        }
        Ok(())
    }

    fn end_refuse_if_over(self: &Arc<Self>) {
        if !self.faults().refusing(Instant::now()) {
            self.reopen();
        }
    }

    fn clear_faults(self: &Arc<Self>) {
        self.faults().clear();
        self.reopen();
        tracing::info!("faults cleared");
    }

    fn reopen(self: &Arc<Self>) {
        if let Err(e) = self.open_listener() {
            tracing::error!(addr = %self.gate.addr(), error = %e, "cannot reopen the identity listener");
        }
    }
}
