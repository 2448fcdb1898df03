//! Configuration: the TOML file is read into raw serde structs (`raw`), then checked into the
//! validated [`Config`] below (`validate`), collecting every problem with its file and key.
//! Nothing else in the crate reads TOML; everything else takes a validated `Config`.
//! Loading reads the secrets the file refers to; no error message ever carries a secret.

mod keys;
mod raw;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::seal::SealKeys;
use crate::secret::Secret;

pub const DEFAULT_REFRESH_FRACTION: f64 = 0.75;
pub const DEFAULT_REFRESH_JITTER: f64 = 0.05;
pub const DEFAULT_MIN_MARGIN: Duration = Duration::from_secs(5);
pub const DEFAULT_EXPIRY_SKEW: Duration = Duration::from_secs(2);
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);
pub const DEFAULT_MIN_RENEW_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_API_TOKEN_TTL_MINUTES: i64 = 43_200; // 30 days
pub const DEFAULT_ACCESS_TOKEN_TTL_MINUTES: i64 = 30;
pub const DEFAULT_IDENTITY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_IDENTITY_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
pub const DEFAULT_REPLAY_BUFFER_BYTES: usize = 64 * 1024;
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_UPSTREAM_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);
/// `[admin] address` when not given: loopback only, so that `/tokens` is not on the network by
/// default.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9090";
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
pub const DEFAULT_ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MERGE_SLASHES: bool = true;
pub const DEFAULT_TENANT: &str = "CUSTOMER";
pub const DEFAULT_DISPLAY_NAME_PREFIX: &str = "tokenbroker";
pub const DEFAULT_STORE_KEY_PREFIX: &str = "tokenbroker:";
pub const DEFAULT_STORE_LEASE: Duration = Duration::from_secs(10);
/// Bounds of `[store] lease`: long enough to outlast a command timeout, short enough that a
/// dead holder's callers are taken over quickly.
pub const MIN_STORE_LEASE: Duration = Duration::from_secs(2);
pub const MAX_STORE_LEASE: Duration = Duration::from_secs(600);

/// Reads, checks and builds the configuration in `path`, with the secrets it refers to.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read_to_string(path) {
        Ok(text) => from_toml_str(&text, path),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            key: String::new(),
            message: format!("cannot read the config file: {e}"),
        }])),
    }
}

/// Checks and builds the configuration from `text`, as if read from `path`: relative paths in it
/// are relative to `path`'s folder, and messages name `path`.
pub fn from_toml_str(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    validate::validate(text, path)
}

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Where in the file, e.g. `route[2].upstream` (items count from 0); empty for the whole file.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

/// Every problem found in a config file, one per line when displayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The SHA-256 of a caller key, as compared against [`CallerConfig::key_hashes`].
pub fn key_hash(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// A caller key's hash as written in the config: `sha256:<64 hex digits>`.
pub fn format_key_hash(hash: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(hash))
}

/// `sha256:<64 hex digits>` (either case) -> the 32 bytes.
pub fn parse_key_hash(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.strip_prefix("sha256:")?, &mut out).ok()?;
    Some(out)
}

/// The whole validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from, for reload and messages.
    pub source: Option<PathBuf>,
    /// The SHA-256 of that file's text (`config_info`): which config a replica runs.
    pub source_sha256: Option<[u8; 32]>,
    pub listeners: Vec<ListenerConfig>,
    pub admin: Option<AdminConfig>,
    pub identity: IdentityConfig,
    pub tokens: TokenPolicy,
    pub callers: Vec<CallerConfig>,
    pub routes: Vec<RouteConfig>,
    pub limits: Limits,
    pub logging: LoggingConfig,
    pub store: StoreConfig,
    /// `[telemetry]`: OpenTelemetry traces, off when absent.
    pub telemetry: Option<TelemetryConfig>,
    /// The files the secrets were read from (`{ file = ... }`): `run` watches them, with the
    /// config file, and reloads when one changes.
    pub secret_files: Vec<PathBuf>,
}

impl Config {
    /// A config with only identity settings: no listener, caller or route, default policy and
    /// limits. A start for tests and tools that fill in the rest.
    pub fn minimal(identity: IdentityConfig) -> Config {
        Config {
            source: None,
            source_sha256: None,
            listeners: vec![],
            admin: None,
            identity,
            tokens: TokenPolicy::default(),
            callers: vec![],
            routes: vec![],
            limits: Limits::default(),
            logging: LoggingConfig::default(),
            store: StoreConfig::default(),
            telemetry: None,
            secret_files: vec![],
        }
    }
}

#[derive(Clone, Debug)]
pub struct ListenerConfig {
    pub name: String,
    pub addr: SocketAddr,
    pub tls: Option<ServerTls>,
    /// A listener bound to exactly one caller (sidecar use): every connection is that caller.
    pub caller: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, client certificates are required and verified against this CA (mTLS).
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// Open admin connections at most; over it a new one is closed at once.
    pub max_connections: usize,
    /// Time an admin connection has to send a request head (its first and each next one).
    pub header_read_timeout: Duration,
    /// SHA-256 digests of the keys that may read `/tokens` (`Authorization: Bearer <key>`).
    /// Without any (and no `cert_identities`), only a peer on loopback may.
    pub key_hashes: Vec<[u8; 32]>,
    /// Serve TLS; with `client_ca`, a client certificate is verified when presented (never
    /// required: probes and scrapers present none).
    pub tls: Option<ServerTls>,
    /// Client-certificate identities that may read `/tokens` (needs `tls.client_ca`).
    pub cert_identities: Vec<CertIdentity>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct IdentityConfig {
    /// Scheme and authority of the identity service, e.g. `https://id.example.com` (no path).
    pub base_url: String,
    pub tenant: String,
    pub client_id: String,
    pub client_secret: Secret,
    /// Scope asked for the admin bearer; `None` asks for none.
    pub scope: Option<String>,
    /// Extra CA certificates (PEM) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InjectMode {
    /// Exchange the API token and inject the short-lived access token (default).
    AccessToken,
    /// Inject the API token itself.
    ApiToken,
}

#[derive(Clone, Debug)]
pub struct TokenPolicy {
    pub api_token_ttl_minutes: i64,
    pub access_token_ttl_minutes: i64,
    /// `Some(1)`: each API token can be exchanged once; `Some(-1)`/`None`: unlimited.
    pub max_count_of_uses: Option<i32>,
    pub inject: InjectMode,
    /// Renew when this fraction of a credential's lifetime has passed.
    pub refresh_fraction: f64,
    /// Relative jitter applied to the refresh point (0.05 = +-5 %).
    pub refresh_jitter: f64,
    /// Renew at least this long before expiry.
    pub min_margin: Duration,
    /// A credential is treated as expired this long before its real expiry.
    pub expiry_skew: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long a request without a valid token waits for the renewal in flight before 503.
    pub max_wait: Duration,
    /// A caller renews on upstream 401s at most once per this interval (the first 401 for a
    /// token renews it whatever its age, once per generation); a 401 sooner after the last
    /// 401-driven renewal is passed on, so callers cannot drive the identity service.
    pub min_renew_interval: Duration,
    /// Fetch every caller's tokens at start; readiness waits for it.
    pub warm_up: bool,
    /// Keeps API tokens across restarts.
    pub state_file: Option<PathBuf>,
    /// Prefix of the API tokens' display names (`<prefix>-<caller>`).
    pub display_name_prefix: String,
    /// Seals the state file when set: the keys of `[store] seal_keys` (or `seal_key`).
    pub state_file_seal_keys: Option<SealKeys>,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            api_token_ttl_minutes: DEFAULT_API_TOKEN_TTL_MINUTES,
            access_token_ttl_minutes: DEFAULT_ACCESS_TOKEN_TTL_MINUTES,
            max_count_of_uses: None,
            inject: InjectMode::AccessToken,
            refresh_fraction: DEFAULT_REFRESH_FRACTION,
            refresh_jitter: DEFAULT_REFRESH_JITTER,
            min_margin: DEFAULT_MIN_MARGIN,
            expiry_skew: DEFAULT_EXPIRY_SKEW,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            max_wait: DEFAULT_MAX_WAIT,
            min_renew_interval: DEFAULT_MIN_RENEW_INTERVAL,
            warm_up: false,
            state_file: None,
            display_name_prefix: DEFAULT_DISPLAY_NAME_PREFIX.to_string(),
            state_file_seal_keys: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct CallerConfig {
    pub name: String,
    /// The OAuth client the caller's API token is issued for (`client_id` of create).
    pub client_id: Option<String>,
    /// SHA-256 of each accepted caller key (`Proxy-Authorization: Bearer <key>`).
    pub key_hashes: Vec<[u8; 32]>,
    /// Client-certificate identities that map to this caller.
    pub cert_identities: Vec<CertIdentity>,
    /// Overrides of the token policy for this caller.
    pub inject: Option<InjectMode>,
    pub max_count_of_uses: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CertIdentity {
    /// A URI SAN, e.g. a SPIFFE ID `spiffe://example.org/ns/default/sa/billing`.
    Uri(String),
    /// A DNS SAN.
    Dns(String),
    /// The subject common name.
    Cn(String),
}

#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub name: String,
    /// Matches the request's Host (without port), case-insensitively; `None` matches any host.
    pub host: Option<String>,
    /// Matches a path prefix on a segment boundary; "/" matches everything.
    pub path_prefix: String,
    /// Remove `path_prefix` before forwarding.
    pub strip_prefix: bool,
    /// Upstream base URL: scheme, authority and an optional base path.
    pub upstream: http::Uri,
    pub upstream_ca_file: Option<PathBuf>,
    /// Callers allowed on this route; everyone else gets 403.
    pub allow: Vec<String>,
    /// `Upgrade` protocols (lower case, e.g. `websocket`) tunnelled to the upstream; empty: an
    /// upgrade request is refused.
    pub upgrades: Vec<String>,
    /// Caller-sent headers of `claims::CALLER_CLAIMS` (lower case) this route passes on
    /// to its upstream; the others are dropped.
    pub pass_caller_headers: Vec<String>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
}

/// The most worker threads `limits.workers` may ask for.
pub const MAX_WORKERS: usize = 1024;

#[derive(Clone, Debug)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_body_bytes: Option<u64>,
    pub max_connections: usize,
    /// Request bodies up to this size are buffered so that an upstream 401 can be replayed.
    pub replay_buffer_bytes: usize,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    /// From SIGTERM on, idle HTTP/1 connections stay open this long (their next request is
    /// answered with `Connection: close`) before they are closed; at most `shutdown_grace`.
    pub drain: Duration,
    /// Repeated slashes in a request path are merged (`//a` is `/a`); off: refused with 400.
    pub merge_slashes: bool,
    /// Worker threads of `tokenbroker run`, each a runtime with its own listening sockets (see
    /// [`crate::workers`]): 1 (the default), one runtime for everything; 0, one per usable CPU.
    pub workers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            replay_buffer_bytes: DEFAULT_REPLAY_BUFFER_BYTES,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            drain: DEFAULT_DRAIN,
            merge_slashes: DEFAULT_MERGE_SLASHES,
            workers: 1,
        }
    }
}

/// `[telemetry]`: where OpenTelemetry traces go.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP collector, scheme and authority (spans go to `{endpoint}/v1/traces`).
    pub endpoint: String,
    pub service_name: String,
    /// Share of the traces started here that are kept, 0.0 to 1.0 (a caller's sampled
    /// `traceparent` is followed).
    pub sampling_ratio: f64,
}

pub const DEFAULT_SERVICE_NAME: &str = "tokenbroker";
pub const DEFAULT_SAMPLING_RATIO: f64 = 1.0;

#[derive(Clone, Debug, Default)]
pub struct LoggingConfig {
    /// `tracing` filter directive, e.g. `info` or `tokenbroker=debug`.
    pub level: Option<String>,
    pub json: bool,
}

/// `[store]`: where token state lives besides this process's memory.
#[derive(Clone, Debug, Default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// Seals what leaves the process: the Redis records (required there) and, when set, the
    /// state file. `seal_keys` (the first seals, every one opens), or `seal_key` as a ring of
    /// one.
    pub seal_keys: Option<SealKeys>,
}

impl StoreConfig {
    /// The Redis settings, when `kind = "redis"`.
    pub fn redis(&self) -> Option<&RedisConfig> {
        match &self.kind {
            StoreKind::Local => None,
            StoreKind::Redis(redis) => Some(redis),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub enum StoreKind {
    /// In memory, plus the optional state file (`tokens.state_file`).
    #[default]
    Local,
    /// Shared by every replica through Redis.
    Redis(RedisConfig),
}

/// The Redis servers that hold the shared store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisServers {
    /// `url`: one server, `redis://host:port/db` or `rediss://host:port/db`.
    Single(String),
    /// `sentinels` + `service_name`: the master the sentinels name, followed through failovers.
    Sentinel {
        /// The sentinels' URLs (`redis://host:26379`); the scheme says whether the master and
        /// its sentinels speak TLS.
        sentinels: Vec<String>,
        /// The master's name in the sentinels' config (`sentinel monitor <name> ...`).
        service_name: String,
    },
    /// `cluster`: a Redis Cluster, found through any of these nodes' URLs.
    Cluster(Vec<String>),
}

impl RedisServers {
    /// Every URL configured (one for a single server).
    pub fn urls(&self) -> &[String] {
        match self {
            RedisServers::Single(url) => std::slice::from_ref(url),
            RedisServers::Sentinel { sentinels, .. } => sentinels,
            RedisServers::Cluster(nodes) => nodes,
        }
    }

    /// Whether the servers speak TLS (`rediss://`).
    pub fn tls(&self) -> bool {
        self.urls().iter().any(|u| u.starts_with("rediss://"))
    }
}

/// `[store] kind = "redis"`.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// One server, a master behind sentinels, or a cluster; URLs without credentials.
    pub servers: RedisServers,
    /// ACL user name; `None` authenticates as the default user (or not at all).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Every key and the pub/sub channel start with this.
    pub key_prefix: String,
    /// Lifetime of a caller's renewal lease.
    pub lease: Duration,
    /// For `rediss://`: trust this CA (PEM) instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// The same keys as [`StoreConfig::seal_keys`]: required with Redis.
    pub seal_keys: SealKeys,
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hashes_round_trip_and_refuse_anything_else() {
        let hash = key_hash(b"abc");
        let text = format_key_hash(&hash);
        assert_eq!(
            text,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_key_hash(&text), Some(hash));
        assert_eq!(
            parse_key_hash(&text.to_ascii_uppercase().replace("SHA256", "sha256")),
            Some(hash)
        );
        for bad in [
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:ba78",
            "sha256:+a7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015adff",
            "sha256:zz7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256:é7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a",
        ] {
            assert_eq!(parse_key_hash(bad), None, "{bad}");
        }
    }
}
