//! `[store]`: the local default or Redis, and the seal keys. Kept apart from the other sections'
//! checks; it adds problems to the same [`Checker`] and never echoes a URL (it could carry a
//! password) or a secret.

use super::super::raw::RawStore;
use super::*;
use crate::seal::{SealKey, SealKeys};

impl Checker {
    pub(super) fn store(&mut self, value: Option<toml::Value>) -> StoreConfig {
        let r = self.section::<RawStore>(value, "store", false);
        let seal_keys = self.seal_keys(&r);
        let kind = match r.kind.as_deref().unwrap_or("local") {
            "local" => {
                self.local_store(&r);
                StoreKind::Local
            }
            "redis" => match self.redis_store(r, seal_keys.clone()) {
                Some(redis) => StoreKind::Redis(redis),
                None => StoreKind::Local,
            },
            other => {
                self.add(
                    "store.kind",
                    format!("`{other}` is not one of \"local\", \"redis\""),
                );
                StoreKind::Local
            }
        };
        StoreConfig { kind, seal_keys }
    }

    /// `seal_keys = [new, old]` (the first seals, every one opens), or `seal_key` as a ring of
    /// one; not both. `None` when neither is given or a problem was reported.
    fn seal_keys(&mut self, r: &RawStore) -> Option<SealKeys> {
        let listed = match (&r.seal_key, &r.seal_keys) {
            (None, None) => return None,
            (Some(_), Some(_)) => {
                self.add(
                    "store.seal_keys",
                    "give either seal_key (one key) or seal_keys (a keyring, the first sealing), \
                     not both: move seal_key into seal_keys",
                );
                return None;
            }
            (Some(one), None) => vec![("store.seal_key".to_string(), one.clone())],
            (None, Some(toml::Value::Array(ring))) => ring
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("store.seal_keys[{i}]"), v.clone()))
                .collect(),
            (None, Some(_)) => {
                self.add(
                    "store.seal_keys",
                    "must be a list of keys, the first sealing: \
                     [{ file = \"new.key\" }, { file = \"old.key\" }]",
                );
                return None;
            }
        };
        if listed.is_empty() {
            self.add(
                "store.seal_keys",
                "must list at least one key (make one with `tokenbroker gen-seal-key`)",
            );
            return None;
        }
        let before = self.problems.len();
        let mut keys: Vec<SealKey> = Vec::new();
        for (key, value) in listed {
            let Some(k) = self.seal_key(&key, Some(value)) else {
                continue;
            };
            if let Some(i) = keys.iter().position(|seen| seen.id() == k.id()) {
                self.add(key, format!("the same key as store.seal_keys[{i}]"));
                continue;
            }
            keys.push(k);
        }
        if self.problems.len() > before {
            return None;
        }
        SealKeys::new(keys)
    }

    /// Keys that only Redis reads are a mistake with the local store.
    fn local_store(&mut self, r: &RawStore) {
        let set = [
            ("url", r.url.is_some()),
            ("sentinels", r.sentinels.is_some()),
            ("service_name", r.service_name.is_some()),
            ("cluster", r.cluster.is_some()),
            ("username", r.username.is_some()),
            ("password", r.password.is_some()),
            ("key_prefix", r.key_prefix.is_some()),
            ("lease", r.lease.is_some()),
            ("ca_file", r.ca_file.is_some()),
        ];
        for (field, present) in set {
            if present {
                self.add(
                    format!("store.{field}"),
                    "only used with kind = \"redis\" (the store is local)",
                );
            }
        }
    }

    /// `None` when a problem was reported (the key's messages say which).
    fn redis_store(&mut self, r: RawStore, seal_keys: Option<SealKeys>) -> Option<RedisConfig> {
        let servers = self.redis_servers(r.url, r.sentinels, r.service_name, r.cluster);
        if r.seal_key.is_none() && r.seal_keys.is_none() {
            self.add(
                "store.seal_key",
                "required with kind = \"redis\" (or seal_keys, a keyring): { env = \"NAME\" } \
                 or { file = \"path\" } holding 32 random bytes in base64 (make one with \
                 `tokenbroker gen-seal-key`)",
            );
        }
        let username = r.username;
        if let Some(name) = &username {
            let ok =
                !name.is_empty() && name.len() <= 256 && name.chars().all(|c| c.is_ascii_graphic());
            if !ok {
                self.add(
                    "store.username",
                    "must be 1 to 256 printable characters without spaces",
                );
            }
        }
        let password = r.password.map(|v| self.secret("store.password", Some(v)));
        if username.is_some() && password.is_none() {
            self.add(
                "store.password",
                "missing: an ACL username needs a password",
            );
        }
        let key_prefix = r
            .key_prefix
            .unwrap_or_else(|| DEFAULT_STORE_KEY_PREFIX.to_string());
        let prefix_ok = !key_prefix.is_empty()
            && key_prefix.len() <= 100
            && key_prefix.chars().all(|c| c.is_ascii_graphic());
        if !prefix_ok {
            self.add(
                "store.key_prefix",
                "must be 1 to 100 printable characters without spaces, e.g. \"tokenbroker:prod:\"",
            );
        }
        let cluster = matches!(servers, Some(RedisServers::Cluster(_)));
        if prefix_ok && cluster && key_prefix.contains(['{', '}']) {
            self.add(
                "store.key_prefix",
                "must not hold `{` or `}` with a cluster: the keys put the caller's name in braces \
                 (a hash tag), so that a caller's record and lease live on one node",
            );
        }
        let lease = self.duration("store.lease", r.lease, DEFAULT_STORE_LEASE);
        if !(MIN_STORE_LEASE..=MAX_STORE_LEASE).contains(&lease) {
            self.add(
                "store.lease",
                format!(
                    "must be from {} to {}",
                    humantime::format_duration(MIN_STORE_LEASE),
                    humantime::format_duration(MAX_STORE_LEASE)
                ),
            );
        }
        if r.ca_file.is_some() && servers.as_ref().is_some_and(|s| !s.tls()) {
            self.add("store.ca_file", "only used with a rediss:// url");
        }
        let ca_file = self.readable_file("store.ca_file", r.ca_file);
        Some(RedisConfig {
            servers: servers?,
            username,
            password,
            key_prefix,
            lease,
            ca_file,
            seal_keys: seal_keys?,
        })
    }

    /// Exactly one of `url` (one server), `sentinels` with `service_name`, or `cluster`; every
    /// URL valid, all of one scheme. `None` when a problem was reported.
    fn redis_servers(
        &mut self,
        url: Option<String>,
        sentinels: Option<Vec<String>>,
        service_name: Option<String>,
        cluster: Option<Vec<String>>,
    ) -> Option<RedisServers> {
        let given = [url.is_some(), sentinels.is_some(), cluster.is_some()];
        match given.iter().filter(|g| **g).count() {
            0 => {
                self.add(
                    "store.url",
                    "missing: give url (one server), sentinels and service_name (Redis \
                     Sentinel), or cluster (Redis Cluster)",
                );
                return None;
            }
            1 => {}
            _ => {
                let key = if url.is_some() {
                    "store.url"
                } else {
                    "store.sentinels"
                };
                self.add(
                    key,
                    "give only one of url, sentinels and cluster: they are three ways to reach \
                     the store",
                );
                return None;
            }
        }
        if service_name.is_some() && sentinels.is_none() {
            self.add("store.service_name", "only used with sentinels");
            return None;
        }
        if let Some(url) = url {
            return self
                .redis_url("store.url", Some(url))
                .map(RedisServers::Single);
        }
        let (key, list) = match (&sentinels, &cluster) {
            (Some(list), _) => ("store.sentinels", list.clone()),
            (None, Some(list)) => ("store.cluster", list.clone()),
            (None, None) => return None,
        };
        if list.is_empty() {
            self.add(
                key,
                "must list at least one URL, e.g. [\"redis://10.0.0.1:26379\"]",
            );
            return None;
        }
        let before = self.problems.len();
        let mut urls = Vec::new();
        for (i, u) in list.into_iter().enumerate() {
            if let Some(u) = self.redis_url(&format!("{key}[{i}]"), Some(u)) {
                urls.push(u);
            }
        }
        if self.problems.len() > before {
            return None;
        }
        let tls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
        if tls != 0 && tls != urls.len() {
            self.add(
                key,
                "mixes redis:// and rediss:// URLs: use one scheme for all",
            );
            return None;
        }
        if let Some(i) = urls.iter().position(|u| redis_db(u) != 0) {
            let why = match sentinels {
                Some(_) => {
                    "names a sentinel, which has no database: leave the path out (the store \
                            uses database 0 of the master)"
                }
                None => "a cluster has database 0 only: leave the path out or use /0",
            };
            self.add(format!("{key}[{i}]"), why);
            return None;
        }
        if sentinels.is_some() {
            let name = self.required("store.service_name", service_name)?;
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_graphic()) {
                self.add(
                    "store.service_name",
                    "must be the master's name in the sentinels' config (printable, no spaces)",
                );
                return None;
            }
            return Some(RedisServers::Sentinel {
                sentinels: urls,
                service_name: name,
            });
        }
        Some(RedisServers::Cluster(urls))
    }

    /// A seal key by reference: 32 bytes in base64.
    fn seal_key(&mut self, key: &str, value: Option<toml::Value>) -> Option<SealKey> {
        let before = self.problems.len();
        let secret = self.secret(key, value);
        if self.problems.len() > before {
            return None;
        }
        match SealKey::from_secret(&secret) {
            Ok(k) => Some(k),
            Err(e) => {
                self.add(key, e.to_string());
                None
            }
        }
    }

    /// `redis://` or `rediss://` with a host, an optional database number, nothing else.
    fn redis_url(&mut self, key: &str, value: Option<String>) -> Option<String> {
        let text = self.required(key, value)?;
        let problem = match redis_url_problem(&text) {
            None => return Some(text),
            Some(p) => p,
        };
        // The URL is not echoed: it could carry a password.
        self.add(key, problem);
        None
    }
}

/// The database number of a valid Redis URL (0 when it names none).
fn redis_db(text: &str) -> u16 {
    redis::parse_redis_url(text)
        .and_then(|u| u.path().trim_start_matches('/').parse().ok())
        .unwrap_or(0)
}

fn redis_url_problem(text: &str) -> Option<String> {
    let Some(url) = redis::parse_redis_url(text) else {
        return Some("not a URL such as redis://127.0.0.1:6379/0".to_string());
    };
    if !matches!(url.scheme(), "redis" | "rediss") {
        return Some("must start with redis:// or rediss://".to_string());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Some("must name a host, e.g. redis://127.0.0.1:6379/0".to_string());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Some(
            "must not carry credentials: use store.username and store.password".to_string(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Some("must not have a query or fragment".to_string());
    }
    let db = url.path().trim_start_matches('/');
    if !db.is_empty() && db.parse::<u16>().is_err() {
        return Some("the path must be a database number, e.g. /0".to_string());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::redis_url_problem;

    #[test]
    fn redis_urls() {
        for ok in [
            "redis://127.0.0.1:6379/0",
            "redis://localhost",
            "rediss://redis.example.com:6380/3",
            "redis://[::1]:6379",
        ] {
            assert_eq!(redis_url_problem(ok), None, "{ok}");
        }
        for (bad, says) in [
            ("http://127.0.0.1:6379", "not a URL"),
            ("valkey://127.0.0.1", "redis:// or rediss://"),
            ("redis+unix:///tmp/redis.sock", "redis:// or rediss://"),
            ("redis://:hunter2@127.0.0.1", "credentials"),
            ("redis://user:pw@127.0.0.1", "credentials"),
            ("redis://127.0.0.1/0?protocol=resp3", "query"),
            ("redis://127.0.0.1/zero", "database number"),
            ("127.0.0.1:6379", "not a URL"),
        ] {
            let problem = redis_url_problem(bad).unwrap_or_default();
            assert!(problem.contains(says), "{bad}: {problem}");
            assert!(!problem.contains("hunter2"));
        }
    }
}
