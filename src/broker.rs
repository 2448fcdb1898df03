//! The token broker: for every caller, a valid credential ready to inject. (Interface; filled in
//! by the token-lifecycle work.)

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

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

use std::time::SystemTime;

use crate::config::Config;
use crate::metrics::Metrics;

/// Why the broker could not start (bad identity-service settings such as an unreadable CA file).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokerError(pub String);

/// Per-caller status for `/tokens` and metrics. Holds no secret.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CallerStatus {
    pub caller: String,
    /// `empty` (nothing fetched yet), `ready`, `renewing`, `failing` (has a valid token, renewals fail),
    /// `unavailable` (no valid token).
    pub state: &'static str,
    pub api_token_id: Option<String>,
    pub api_token_suffix: Option<String>,
    pub api_token_expires_in_secs: Option<u64>,
    pub access_token_expires_in_secs: Option<u64>,
    pub generation: u64,
    pub last_renewal: Option<SystemTime>,
    pub last_error: Option<String>,
    pub waited_requests: u64,
}

/// Holds every caller's credentials. Cheap to share (`Arc<Broker>`).
pub struct Broker {
    _private: (),
}

impl Broker {
    /// Builds the identity client, loads the state file, and starts the refresh tasks (and warm-up
    /// when configured). Binds no port.
    pub async fn start(config: &Config, metrics: Arc<Metrics>) -> Result<Arc<Broker>, BrokerError> {
        let _ = (config, metrics);
        todo!("token lifecycle")
    }

    /// The caller's token: a cache hit is an `Arc` clone; a miss waits on the one fetch in flight.
    pub async fn token(&self, caller: &str) -> TokenResult {
        let _ = caller;
        todo!("token lifecycle")
    }

    /// The upstream refused `generation` with 401: marks it bad (once for any number of concurrent
    /// calls with the same generation) and returns the renewed token.
    pub async fn rejected(&self, caller: &str, generation: u64) -> TokenResult {
        let _ = (caller, generation);
        todo!("token lifecycle")
    }

    /// Applies a reloaded config (callers added or removed, policy changed).
    pub fn reconfigure(&self, config: &Config) {
        let _ = config;
        todo!("token lifecycle")
    }

    /// True once warm-up (if configured) has finished.
    pub fn is_ready(&self) -> bool {
        todo!("token lifecycle")
    }

    pub fn status(&self) -> Vec<CallerStatus> {
        todo!("token lifecycle")
    }

    /// Stops the refresh tasks and writes the state file.
    pub async fn shutdown(&self) {
        todo!("token lifecycle")
    }
}
