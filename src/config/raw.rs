//! The TOML file as written: serde structs that mirror its sections, with every key optional so
//! that a missing key becomes a named problem instead of a parse failure. Nothing here checks a
//! value; `validate` does. Tables that can hold further tables (sections, `tls`, `client_secret`)
//! stay `toml::Value` here and are read one by one, so that a mistake in one hides nothing else.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration as written, e.g. `"90s"`: a string, parsed by `validate`. Its own type so that a
/// value of the wrong type is reported as "expected a duration string such as \"90s\"".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDuration(pub String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"90s\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_string()))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// The top level: one entry per section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub listener: Vec<toml::Value>,
    pub admin: Option<toml::Value>,
    pub identity: Option<toml::Value>,
    pub tokens: Option<toml::Value>,
    #[serde(default)]
    pub caller: Vec<toml::Value>,
    #[serde(default)]
    pub route: Vec<toml::Value>,
    pub limits: Option<toml::Value>,
    pub logging: Option<toml::Value>,
    pub store: Option<toml::Value>,
    pub telemetry: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Option<String>,
    pub address: Option<String>,
    pub tls: Option<toml::Value>,
    pub caller: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub client_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub address: Option<String>,
    pub max_connections: Option<i64>,
    pub header_read_timeout: Option<RawDuration>,
    #[serde(default)]
    pub key_hashes: Vec<String>,
    pub tls: Option<toml::Value>,
    #[serde(default)]
    pub cert_identities: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub base_url: Option<String>,
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    /// `{ env = "NAME" }` or `{ file = "path" }`; kept raw so that an inline string is refused
    /// without its value ever reaching an error message.
    pub client_secret: Option<toml::Value>,
    pub scope: Option<String>,
    pub ca_file: Option<String>,
    pub connect_timeout: Option<RawDuration>,
    pub request_timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    pub api_token_ttl_minutes: Option<i64>,
    pub access_token_ttl_minutes: Option<i64>,
    pub max_count_of_uses: Option<i64>,
    pub inject: Option<String>,
    pub refresh_fraction: Option<f64>,
    pub refresh_jitter: Option<f64>,
    pub min_margin: Option<RawDuration>,
    pub expiry_skew: Option<RawDuration>,
    pub backoff_initial: Option<RawDuration>,
    pub backoff_max: Option<RawDuration>,
    pub max_wait: Option<RawDuration>,
    pub min_renew_interval: Option<RawDuration>,
    pub warm_up: Option<bool>,
    pub state_file: Option<String>,
    pub display_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCaller {
    pub name: Option<String>,
    pub client_id: Option<String>,
    #[serde(default)]
    pub key_hashes: Vec<String>,
    #[serde(default)]
    pub cert_identities: Vec<String>,
    pub inject: Option<String>,
    pub max_count_of_uses: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<String>,
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub strip_prefix: Option<bool>,
    pub upstream: Option<String>,
    pub upstream_ca_file: Option<String>,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub upgrades: Vec<String>,
    #[serde(default)]
    pub pass_caller_headers: Vec<String>,
    pub connect_timeout: Option<RawDuration>,
    pub response_timeout: Option<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub header_read_timeout: Option<RawDuration>,
    pub max_header_bytes: Option<i64>,
    pub max_body_bytes: Option<i64>,
    pub max_connections: Option<i64>,
    pub replay_buffer_bytes: Option<i64>,
    pub idle_timeout: Option<RawDuration>,
    pub shutdown_grace: Option<RawDuration>,
    pub drain: Option<RawDuration>,
    pub merge_slashes: Option<bool>,
    pub workers: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    pub level: Option<String>,
    pub json: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub endpoint: Option<String>,
    pub service_name: Option<String>,
    pub sampling_ratio: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub kind: Option<String>,
    pub url: Option<String>,
    pub sentinels: Option<Vec<String>>,
    pub service_name: Option<String>,
    pub cluster: Option<Vec<String>>,
    pub username: Option<String>,
    /// A secret reference, kept raw like `identity.client_secret`.
    pub password: Option<toml::Value>,
    pub key_prefix: Option<String>,
    pub seal_key: Option<toml::Value>,
    /// A keyring: secret references, the first sealing.
    pub seal_keys: Option<toml::Value>,
    pub lease: Option<RawDuration>,
    pub ca_file: Option<String>,
}
