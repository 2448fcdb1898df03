//! A strict emulator of VMware Identity Services (token endpoint, api-tokens create and
//! regenerate), its control API under `/_emulator/`, and an echo upstream that accepts only live
//! access tokens. (Interface; filled in by the emulator work.)

use std::net::SocketAddr;
use std::time::Duration;

use crate::secret::Secret;

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

/// Which operations a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    ClientCredentials,
    Create,
    Regenerate,
    Exchange,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// The listener stops accepting (connections refused).
    Refuse,
    /// 500 with a JSON error body.
    ServerError,
    /// 429 with `Retry-After: <secs>`.
    TooManyRequests { retry_after_secs: u64 },
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

/// A running emulator. Dropping it does not stop it; call [`Emulator::shutdown`].
pub struct Emulator {
    _private: (),
}

impl Emulator {
    pub async fn start(config: EmulatorConfig) -> std::io::Result<Emulator> {
        let _ = config;
        todo!("emulator")
    }
    pub fn addr(&self) -> SocketAddr {
        todo!("emulator")
    }
    /// `http://<addr>`: the identity service's base URL for the client.
    pub fn base_url(&self) -> String {
        todo!("emulator")
    }
    pub fn echo_addr(&self) -> Option<SocketAddr> {
        todo!("emulator")
    }
    pub fn counters(&self) -> Counters {
        todo!("emulator")
    }
    pub fn reset_counters(&self) {
        todo!("emulator")
    }
    pub fn inject_fault(&self, fault: Fault) {
        let _ = fault;
        todo!("emulator")
    }
    pub fn clear_faults(&self) {
        todo!("emulator")
    }
    /// Revokes the API token with this id (its secret stops working). False if unknown.
    pub fn revoke_api_token(&self, id: &str) -> bool {
        let _ = id;
        todo!("emulator")
    }
    /// Every access token issued so far stops working.
    pub fn revoke_access_tokens(&self) {
        todo!("emulator")
    }
    pub async fn shutdown(self) {
        let _ = Duration::ZERO;
        todo!("emulator")
    }
}
