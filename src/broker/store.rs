//! The shared token store: one API token and one access token per caller for every replica,
//! renewed under a fenced per-caller lease. This module owns the [`TokenStore`] contract, the
//! record format (what is stored, sealed, under which key) and the types the broker sees;
//! `redis.rs` owns the commands and the Lua scripts (`[store] kind = "redis"`, layout in
//! `docs/shared-store.md`), `memory.rs` the same contract in one process, for tests;
//! [`metrics`] the store's metric families.
//!
//! Must never: be called per proxied request (requests use the tokens in memory; the store is
//! read and written only when a token changes), write a token in clear, or wait on Redis without
//! a bound.

mod memory;
pub mod metrics;
mod redis;

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

pub use self::memory::MemoryStore;
pub use self::metrics::StoreMetrics;
pub use self::redis::RedisStore;
use crate::seal::{self, SealError, SealKey, SealKeys};
use crate::secret::Secret;

/// A caller's record as read: its generation, its tokens, and the id of the seal key it was
/// sealed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub generation: u64,
    pub tokens: StoredTokens,
    pub sealed_with: String,
}

/// What the store holds for one caller, opened. Tokens are [`Secret`]s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTokens {
    pub api: StoredApiToken,
    /// The access token exchanged from `api`, when one is current.
    pub access: Option<StoredAccessToken>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredApiToken {
    pub id: String,
    pub token: Secret,
    pub suffix: String,
    /// The OAuth client it was created for (`[[caller]] client_id`).
    pub client_id: Option<String>,
    /// Wall-clock expiry (clocks of replicas are assumed to agree within the expiry skew).
    pub expires: SystemTime,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAccessToken {
    pub token: Secret,
    pub expires: SystemTime,
    /// The writer's generation of this access token. Nothing reads it: each replica numbers
    /// the inject tokens it holds itself. It stays in the record because the payload of earlier
    /// builds requires it (they share records with this one during a rolling upgrade).
    pub generation: u64,
}

/// Why a store call failed. Messages carry keys and causes, never a token or a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("Redis is unreachable: {0}")]
    Unavailable(String),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis refused the credentials (store.username / store.password): {0}")]
    Auth(String),
    #[error("Redis answered with an error: {0}")]
    Redis(String),
    /// The key holds something this build did not write (another type, other fields).
    #[error("{key} is not a tokenbroker record: {what}")]
    Foreign { key: String, what: String },
    /// The sealed payload of the record at `generation` does not open with the configured keys
    /// for this key and generation.
    #[error("{key} does not open: {source}")]
    Sealed {
        key: String,
        generation: u64,
        source: SealError,
    },
    /// The payload of the record at `generation` opened but is not a valid token record.
    #[error("{key} holds an invalid token record: {what}")]
    Payload {
        key: String,
        generation: u64,
        what: String,
    },
    /// `keep_alive` found the lease gone: expired and taken, or deleted.
    #[error("the lease of caller {0} was lost to another owner")]
    LeaseLost(String),
    #[error("store settings: {0}")]
    Config(String),
}

impl StoreError {
    /// The outcome label of the store metrics for this error.
    pub fn outcome(&self) -> &'static str {
        match self {
            StoreError::Timeout(_) => "timeout",
            StoreError::Foreign { .. } | StoreError::Sealed { .. } | StoreError::Payload { .. } => {
                "invalid"
            }
            _ => "error",
        }
    }

    /// Whether the error says Redis cannot be reached (rather than a bad record or settings).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Timeout(_))
    }

    /// The generation of a record that is there but does not open (or is no token record): the
    /// next renewal may replace it with a fenced write expecting this generation.
    pub fn unopened(&self) -> Option<u64> {
        match self {
            StoreError::Sealed { generation, .. } | StoreError::Payload { generation, .. } => {
                Some(*generation)
            }
            _ => None,
        }
    }
}

/// A caller's renewal lease, held by one store (one replica). Only its holder may renew the
/// caller's tokens and write them; [`RedisStore::write`] checks that it is still held.
#[derive(Debug)]
pub struct Lease {
    caller: String,
    key: String,
    owner: String,
    ttl: Duration,
    /// This side's estimate of the expiry: measured from before the command was sent, so it is
    /// never later than Redis's.
    valid_until: Mutex<Instant>,
}

impl Lease {
    /// Refuses a write for another caller than the lease's.
    pub(crate) fn check_caller(&self, caller: &str) -> Result<(), StoreError> {
        if self.caller != caller {
            return Err(StoreError::Config(format!(
                "the lease is for caller {}, not {caller}",
                self.caller
            )));
        }
        Ok(())
    }

    /// Until when the lease is surely held, unless Redis lost it (restart, eviction).
    pub fn valid_until(&self) -> Instant {
        *self.valid_until.lock().expect("lease clock")
    }

    fn extend(&self, from: Instant) {
        *self.valid_until.lock().expect("lease clock") = from + self.ttl;
    }
}

/// Who holds a caller's lease, for `/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseHolder {
    /// The holder's readable replica id (`<hostname>-<pid>`).
    pub replica: String,
    /// Held by this store (this replica).
    pub this_replica: bool,
}

/// The answer of a fenced write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Stored under this new generation, and announced.
    Written(u64),
    /// Refused: the stored generation is this one, not the expected one (someone wrote first).
    Stale(u64),
    /// Refused: the lease is no longer held by this store.
    LeaseLost,
}

/// What the subscription tells the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// A caller's record now has this generation.
    Changed { caller: String, generation: u64 },
    /// The subscription (re)connected: changes may have been missed, read every caller again.
    Resync,
}

/// What the broker needs of a shared store: fenced compare-and-set writes on the record's
/// generation, renewal leases with an owner and a TTL, and change announcements to every replica
/// sharing it. [`RedisStore`] keeps the records on Redis; [`MemoryStore`] in this process (on
/// tokio's clock), for replicas of one test.
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync + 'static {
    /// The configured lease lifetime.
    fn lease_ttl(&self) -> Duration;
    /// The id of the seal key this store seals with.
    fn seal_key_id(&self) -> &str;
    /// A caller's record: `None` if there is none.
    async fn read(&self, caller: &str) -> Result<Option<Record>, StoreError>;
    /// Takes a caller's lease for `ttl`; `held_too_long`: the holder seen holding it for over
    /// twice `ttl`, taken over if it still holds it. `Err(holder)`: busy.
    async fn take_lease(
        &self,
        caller: &str,
        ttl: Duration,
        held_too_long: Option<&str>,
    ) -> Result<Result<Lease, String>, StoreError>;
    /// Takes a caller's lease if nobody holds it.
    async fn try_lease(&self, caller: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        Ok(self.take_lease(caller, ttl, None).await?.ok())
    }
    /// Keeps a lease held for as long as this is awaited; returns only when it is gone.
    async fn keep_alive(&self, lease: &Lease) -> StoreError;
    /// Gives a lease up if this store still holds it.
    async fn release(&self, lease: Lease) -> Result<bool, StoreError>;
    /// Writes a caller's tokens if `lease` is still held and the stored generation is
    /// `expected` (0: none); the new generation is announced to every replica.
    async fn write(
        &self,
        caller: &str,
        lease: &Lease,
        expected: u64,
        tokens: &StoredTokens,
    ) -> Result<WriteOutcome, StoreError>;
    /// Record changes of any replica (this one's included), and a resync after every
    /// (re)connection.
    fn subscribe(&self) -> mpsc::Receiver<StoreEvent>;
    /// Ends the subscriptions.
    fn shutdown(&self);
}

/// The Redis key of a caller's record.
pub fn record_key(prefix: &str, caller: &str) -> String {
    format!("{prefix}caller:{caller}")
}

/// The Redis key of a caller's lease.
pub fn lease_key(prefix: &str, caller: &str) -> String {
    format!("{prefix}lease:{caller}")
}

/// The pub/sub channel of record changes.
pub fn events_channel(prefix: &str) -> String {
    format!("{prefix}events")
}

/// The message announcing a new generation: `<caller>\n<generation>`.
pub fn parse_event(payload: &[u8]) -> Option<StoreEvent> {
    let text = std::str::from_utf8(payload).ok()?;
    let (caller, generation) = text.split_once('\n')?;
    if caller.is_empty() {
        return None;
    }
    Some(StoreEvent::Changed {
        caller: caller.to_string(),
        generation: generation.parse().ok()?,
    })
}

/// The associated data of a record's seal: the record's place and generation, so that a sealed
/// payload copied to another caller, prefix or generation does not open.
fn record_aad(prefix: &str, caller: &str, generation: u64) -> Vec<u8> {
    format!("tokenbroker store record\0{prefix}\0{caller}\0{generation}").into_bytes()
}

const PAYLOAD_VERSION: u32 = 1;

/// The sealed payload as JSON (borrowed for writing).
#[derive(Serialize)]
struct PayloadOut<'a> {
    v: u32,
    api: ApiOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    access: Option<AccessOut<'a>>,
}

#[derive(Serialize)]
struct ApiOut<'a> {
    id: &'a str,
    token: &'a str,
    suffix: &'a str,
    client_id: Option<&'a str>,
    expires_ms: u64,
}

#[derive(Serialize)]
struct AccessOut<'a> {
    token: &'a str,
    expires_ms: u64,
    generation: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PayloadIn {
    v: u32,
    api: ApiIn,
    access: Option<AccessIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiIn {
    id: String,
    token: String,
    suffix: String,
    client_id: Option<String>,
    expires_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessIn {
    token: String,
    expires_ms: u64,
    generation: u64,
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Seals `tokens` for `caller`'s record at `generation`.
pub(crate) fn seal_record(
    key: &SealKey,
    prefix: &str,
    caller: &str,
    generation: u64,
    tokens: &StoredTokens,
) -> String {
    let payload = PayloadOut {
        v: PAYLOAD_VERSION,
        api: ApiOut {
            id: &tokens.api.id,
            token: tokens.api.token.expose(),
            suffix: &tokens.api.suffix,
            client_id: tokens.api.client_id.as_deref(),
            expires_ms: to_ms(tokens.api.expires),
        },
        access: tokens.access.as_ref().map(|a| AccessOut {
            token: a.token.expose(),
            expires_ms: to_ms(a.expires),
            generation: a.generation,
        }),
    };
    // Sized up front so that the plaintext is not left behind in a reallocated buffer.
    let capacity = 512
        + tokens.api.token.expose().len()
        + tokens.access.as_ref().map_or(0, |a| a.token.expose().len())
        + tokens.api.id.len()
        + tokens.api.suffix.len()
        + tokens.api.client_id.as_ref().map_or(0, String::len);
    let mut json = Zeroizing::new(Vec::with_capacity(capacity));
    serde_json::to_writer(&mut *json, &payload).expect("serializing to memory cannot fail");
    seal::seal(key, &record_aad(prefix, caller, generation), &json)
}

/// Opens `caller`'s record at `generation` with the key of `keys` it names.
pub(crate) fn open_record(
    keys: &SealKeys,
    prefix: &str,
    caller: &str,
    generation: u64,
    sealed: &[u8],
) -> Result<StoredTokens, StoreError> {
    let key_name = || record_key(prefix, caller);
    let json =
        seal::open(keys, &record_aad(prefix, caller, generation), sealed).map_err(|source| {
            StoreError::Sealed {
                key: key_name(),
                generation,
                source,
            }
        })?;
    // The error of a failed parse names a line and column, never the content.
    let payload: PayloadIn = serde_json::from_slice(&json).map_err(|e| StoreError::Payload {
        key: key_name(),
        generation,
        what: format!(
            "not a token record (line {}, column {})",
            e.line(),
            e.column()
        ),
    })?;
    if payload.v != PAYLOAD_VERSION {
        return Err(StoreError::Payload {
            key: key_name(),
            generation,
            what: format!("unsupported payload version {}", payload.v),
        });
    }
    if payload.api.token.is_empty() {
        return Err(StoreError::Payload {
            key: key_name(),
            generation,
            what: "empty API token".to_string(),
        });
    }
    Ok(StoredTokens {
        api: StoredApiToken {
            id: payload.api.id,
            token: Secret::new(payload.api.token),
            suffix: payload.api.suffix,
            client_id: payload.api.client_id,
            expires: from_ms(payload.api.expires_ms),
        },
        access: payload.access.map(|a| StoredAccessToken {
            token: Secret::new(a.token),
            expires: from_ms(a.expires_ms),
            generation: a.generation,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> StoredTokens {
        StoredTokens {
            api: StoredApiToken {
                id: "tok-1".into(),
                token: Secret::new("vidb_api_secret_value"),
                suffix: "value".into(),
                client_id: Some("billing-client".into()),
                expires: from_ms(2_000_000_000_123),
            },
            access: Some(StoredAccessToken {
                token: Secret::new("eyJ.access.secret"),
                expires: from_ms(2_000_000_000_456),
                generation: 7,
            }),
        }
    }

    #[test]
    fn a_record_opens_only_in_its_place_and_generation() {
        let key = SealKey::generate();
        let sealed = seal_record(&key, "tb:", "billing", 3, &sample());
        assert!(!sealed.contains("secret"), "{sealed}");
        assert_eq!(
            open_record(
                &SealKeys::from(key.clone()),
                "tb:",
                "billing",
                3,
                sealed.as_bytes()
            )
            .unwrap(),
            sample()
        );
        for (prefix, caller, generation) in [
            ("tb:", "billing", 4),
            ("tb:", "other", 3),
            ("x:", "billing", 3),
        ] {
            let err = open_record(
                &SealKeys::from(key.clone()),
                prefix,
                caller,
                generation,
                sealed.as_bytes(),
            )
            .unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Sealed {
                        source: SealError::Tampered,
                        ..
                    }
                ),
                "{err}"
            );
        }
        let other = SealKey::generate();
        let err = open_record(
            &SealKeys::from(other.clone()),
            "tb:",
            "billing",
            3,
            sealed.as_bytes(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("another seal key"), "{err}");
        assert!(err.to_string().contains("tb:caller:billing"), "{err}");
        let without_access = StoredTokens {
            access: None,
            ..sample()
        };
        let sealed = seal_record(&key, "tb:", "billing", 1, &without_access);
        assert_eq!(
            open_record(
                &SealKeys::from(key.clone()),
                "tb:",
                "billing",
                1,
                sealed.as_bytes()
            )
            .unwrap(),
            without_access
        );
    }

    #[test]
    fn a_sealed_payload_that_is_not_a_record_is_refused_precisely() {
        let key = SealKey::generate();
        let aad = record_aad("tb:", "billing", 1);
        for (json, says) in [
            (&b"not json"[..], "not a token record"),
            (b"{\"v\":2,\"api\":{\"id\":\"i\",\"token\":\"t\",\"suffix\":\"t\",\"client_id\":null,\"expires_ms\":1}}", "version 2"),
            (b"{\"v\":1,\"api\":{\"id\":\"i\",\"token\":\"\",\"suffix\":\"\",\"client_id\":null,\"expires_ms\":1}}", "empty API token"),
        ] {
            let sealed = seal::seal(&key, &aad, json);
            let err = open_record(&SealKeys::from(key.clone()), "tb:", "billing", 1, sealed.as_bytes()).unwrap_err();
            assert!(matches!(err, StoreError::Payload { .. }), "{err}");
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn events_parse_strictly() {
        assert_eq!(
            parse_event(b"billing\n12"),
            Some(StoreEvent::Changed {
                caller: "billing".into(),
                generation: 12
            })
        );
        for bad in [&b"billing"[..], b"\n3", b"billing\nx", b"\xff\n1"] {
            assert_eq!(parse_event(bad), None);
        }
        assert_eq!(record_key("tb:", "a"), "tb:caller:a");
        assert_eq!(lease_key("tb:", "a"), "tb:lease:a");
        assert_eq!(events_channel("tb:"), "tb:events");
    }
}
