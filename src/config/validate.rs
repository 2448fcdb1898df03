//! Raw TOML -> validated [`Config`]: applies the `DEFAULT_*` values, resolves paths against the
//! config file's folder, reads the referenced secrets, checks the files `run` would load (TLS
//! files and CA files with the loaders that use them, the state file's folder), and collects
//! every problem (with its key path, e.g. `route[2].upstream`) before failing. It never puts a
//! secret, nor any value that could be one, into a message.

mod store;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::raw::{
    RawAdmin, RawCaller, RawConfig, RawDuration, RawIdentity, RawLimits, RawListener, RawLogging,
    RawRoute, RawTelemetry, RawTls, RawTokens,
};
use super::*;
use crate::claims::{PassedClaims, CALLER_CLAIMS};
use crate::secret::{Secret, SecretSource};

/// Checks `text` (the contents of `path`) and builds the [`Config`], or reports every problem.
pub fn validate(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let mut cx = Checker {
        base: path.parent().unwrap_or(Path::new("")).to_path_buf(),
        file: path.to_path_buf(),
        problems: Vec::new(),
        secret_files: Vec::new(),
    };
    let doc = match text.parse::<toml::Table>() {
        Ok(table) => toml::Value::Table(table),
        Err(e) => {
            let at = e
                .span()
                .map(|span| {
                    let (line, col) = line_col(text, span.start);
                    format!(" at line {line}, column {col}")
                })
                .unwrap_or_default();
            cx.add("", format!("TOML syntax error{at}: {}", e.message()));
            return Err(cx.finish());
        }
    };
    let raw: RawConfig = cx.read(doc, "").unwrap_or_default();

    let listeners: Vec<ListenerConfig> = enumerated(raw.listener, "listener")
        .filter_map(|(key, v)| cx.read(v, &key).map(|r| cx.listener(&key, r)))
        .collect();
    let admin = raw
        .admin
        .and_then(|v| cx.read::<RawAdmin>(v, "admin"))
        .map(|r| cx.admin(r));
    let identity = cx.section::<RawIdentity>(raw.identity, "identity", true);
    let identity = cx.identity(identity);
    let tokens = cx.section::<RawTokens>(raw.tokens, "tokens", false);
    let mut tokens = cx.tokens(tokens);
    let callers: Vec<CallerConfig> = enumerated(raw.caller, "caller")
        .filter_map(|(key, v)| cx.read(v, &key).map(|r| cx.caller(&key, r)))
        .collect();
    let routes: Vec<RouteConfig> = enumerated(raw.route, "route")
        .filter_map(|(key, v)| cx.read(v, &key).map(|r| cx.route(&key, r)))
        .collect();
    let limits = cx.section::<RawLimits>(raw.limits, "limits", false);
    let limits = cx.limits(limits);
    let logging = cx.section::<RawLogging>(raw.logging, "logging", false);
    let logging = cx.logging(logging);
    let store = cx.store(raw.store);
    let telemetry = raw
        .telemetry
        .and_then(|v| cx.read::<RawTelemetry>(v, "telemetry"))
        .and_then(|r| cx.telemetry(r));
    tokens.state_file_seal_keys = store.seal_keys.clone();

    let config = Config {
        source: Some(path.to_path_buf()),
        source_sha256: Some(Sha256::digest(text).into()),
        listeners,
        admin,
        identity,
        tokens,
        callers,
        routes,
        limits,
        logging,
        store,
        telemetry,
        secret_files: std::mem::take(&mut cx.secret_files),
    };
    cx.cross_check(&config);
    if cx.problems.is_empty() {
        Ok(config)
    } else {
        Err(cx.finish())
    }
}

/// `[[name]]` items with their key paths, `name[0]`, `name[1]`, ...
fn enumerated(items: Vec<toml::Value>, name: &str) -> impl Iterator<Item = (String, toml::Value)> {
    let name = name.to_string();
    items
        .into_iter()
        .enumerate()
        .map(move |(i, v)| (format!("{name}[{i}]"), v))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn join(key: &str, field: &str) -> String {
    if key.is_empty() {
        field.to_string()
    } else {
        format!("{key}.{field}")
    }
}

/// What is wrong with a URL for an upstream or the identity service, if anything.
fn url_problem(uri: &http::Uri, path_allowed: bool) -> Option<&'static str> {
    let authority = uri.authority().map_or("", |a| a.as_str());
    let path = uri.path();
    if !matches!(uri.scheme_str(), Some("http" | "https")) || authority.is_empty() {
        Some("must start with http:// or https:// and name a host")
    } else if authority.contains('@') {
        Some("must not carry credentials")
    } else if uri.query().is_some() {
        Some("must not have a query")
    } else if !(path_allowed || path.is_empty() || path == "/") {
        Some("must be scheme and host only, without a path")
    } else {
        None
    }
}

/// A name of a listener, caller or route: it appears in metrics labels, logs and token names.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// An OAuth client id as the identity service accepts it: `^[a-zA-Z0-9\-_.@]+$`, at most 256.
fn is_client_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
}

struct Checker {
    file: PathBuf,
    /// Relative paths in the file are relative to this folder.
    base: PathBuf,
    problems: Vec<ConfigError>,
    /// The secret files read so far.
    secret_files: Vec<PathBuf>,
}

impl Checker {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(ConfigError {
            file: self.file.clone(),
            key: key.into(),
            message: message.into(),
        });
    }

    fn finish(self) -> ConfigErrors {
        ConfigErrors(self.problems)
    }

    /// Reports a required key as missing, unless a problem with it was already reported (a value
    /// of the wrong type is dropped and should not be reported twice).
    fn required<T>(&mut self, key: &str, value: Option<T>) -> Option<T> {
        let reported = |p: &ConfigError| {
            p.key == key
                || key
                    .strip_prefix(p.key.as_str())
                    .is_some_and(|r| r.starts_with('.'))
        };
        if value.is_none() && !self.problems.iter().any(reported) {
            self.add(key, "missing");
        }
        value
    }

    /// Deserializes one table (see [`super::keys::read`]): unknown keys and values of the wrong
    /// type are reported with their key path and left out, so one mistake hides no other.
    fn read<T: DeserializeOwned>(&mut self, value: toml::Value, key: &str) -> Option<T> {
        let toml::Value::Table(table) = value else {
            self.add(key, format!("expected a table, found {}", value.type_str()));
            return None;
        };
        let mut problems = Vec::new();
        let read = super::keys::read::<T>(table, &mut problems);
        for p in problems {
            let at = if p.key.starts_with('[') {
                format!("{key}{}", p.key)
            } else {
                join(key, &p.key)
            };
            self.add(at, p.message);
        }
        read
    }

    /// An optional single-table section; `required` ones report their absence.
    fn section<T: DeserializeOwned + Default>(
        &mut self,
        value: Option<toml::Value>,
        key: &str,
        required: bool,
    ) -> T {
        match value {
            Some(v) => self.read(v, key).unwrap_or_default(),
            None => {
                if required {
                    self.add(key, "missing section");
                }
                T::default()
            }
        }
    }

    fn name(&mut self, key: &str, value: Option<String>) -> String {
        let name = self.required(key, value).unwrap_or_default();
        if self.problems.iter().all(|p| p.key != key) && !is_name(&name) {
            self.add(
                key,
                "must be 1 to 100 letters, digits, '-', '_' or '.'".to_string(),
            );
        }
        name
    }

    fn addr(&mut self, key: &str, value: Option<String>) -> SocketAddr {
        let placeholder = SocketAddr::from(([127, 0, 0, 1], 0));
        let Some(text) = self.required(key, value) else {
            return placeholder;
        };
        text.parse().unwrap_or_else(|_| {
            self.add(
                key,
                format!("`{text}` is not an IP address and port, e.g. 127.0.0.1:8080"),
            );
            placeholder
        })
    }

    /// A duration longer than zero (timeouts, margins).
    fn duration(&mut self, key: &str, value: Option<RawDuration>, default: Duration) -> Duration {
        let d = self.any_duration(key, value, default);
        if d.is_zero() {
            self.add(key, "must be longer than zero");
            return default;
        }
        d
    }

    /// A duration, zero included.
    fn any_duration(
        &mut self,
        key: &str,
        value: Option<RawDuration>,
        default: Duration,
    ) -> Duration {
        let Some(RawDuration(text)) = value else {
            return default;
        };
        humantime::parse_duration(&text).unwrap_or_else(|e| {
            let msg = format!("`{text}` is not a duration like \"5s\" or \"2m\": {e}");
            self.add(key, msg);
            default
        })
    }

    /// An integer within `min..=max`.
    fn int(&mut self, key: &str, value: Option<i64>, default: i64, min: i64, max: i64) -> i64 {
        match value {
            None => default,
            Some(v) if (min..=max).contains(&v) => v,
            Some(v) => {
                self.add(key, format!("{v} is out of range {min}..={max}"));
                default
            }
        }
    }

    fn path(&self, text: &str) -> PathBuf {
        self.base.join(text)
    }

    /// A path to a file that must exist and be readable now.
    fn readable_file(&mut self, key: &str, value: Option<String>) -> Option<PathBuf> {
        let path = self.path(&value?);
        match std::fs::File::open(&path).and_then(|f| f.metadata()) {
            Ok(m) if m.is_file() => {}
            Ok(_) => self.add(key, format!("{} is not a file", path.display())),
            Err(e) => self.add(key, format!("cannot read {}: {e}", path.display())),
        }
        Some(path)
    }

    /// A CA file for an outbound client (identity service, upstream): readable, and holding CA
    /// certificates that the client's own loader accepts.
    fn ca_file(&mut self, key: &str, value: Option<String>) -> Option<PathBuf> {
        let before = self.problems.len();
        let path = self.readable_file(key, value)?;
        if self.problems.len() == before {
            let mut roots = rustls::RootCertStore::empty();
            if let Err(e) = crate::tls::add_ca_file(&mut roots, &path) {
                self.add(key, e);
            }
        }
        Some(path)
    }

    fn secret(&mut self, key: &str, value: Option<toml::Value>) -> Secret {
        const HOW: &str = "must be { env = \"NAME\" } or { file = \"path\" }";
        let source = match self.required(key, value) {
            None => return Secret::new(""),
            Some(toml::Value::String(_)) => {
                self.add(key, format!("an inline secret is not allowed: it {HOW}"));
                return Secret::new("");
            }
            Some(v) => match v.try_into::<SecretSource>() {
                Ok(SecretSource::File(p)) => {
                    let path = self.base.join(p);
                    self.secret_files.push(path.clone());
                    SecretSource::File(path)
                }
                Ok(source) => source,
                Err(_) => {
                    self.add(key, HOW);
                    return Secret::new("");
                }
            },
        };
        match source.load() {
            Ok(secret) => {
                let printable = secret
                    .expose()
                    .chars()
                    .all(|c| c.is_ascii_graphic() || c == ' ');
                if !printable || secret.expose().len() > 4096 {
                    self.add(
                        key,
                        "the secret must be printable ASCII, at most 4096 characters",
                    );
                }
                secret
            }
            Err(e) => {
                self.add(key, e);
                Secret::new("")
            }
        }
    }

    fn inject(&mut self, key: &str, value: Option<String>) -> Option<InjectMode> {
        match value?.as_str() {
            "access_token" => Some(InjectMode::AccessToken),
            "api_token" => Some(InjectMode::ApiToken),
            other => {
                self.add(
                    key,
                    format!("`{other}` is not one of \"access_token\", \"api_token\""),
                );
                None
            }
        }
    }

    fn max_uses(&mut self, key: &str, value: Option<i64>) -> Option<i32> {
        match value? {
            v @ (1 | -1) => Some(v as i32),
            v => {
                self.add(
                    key,
                    format!("{v} is not 1 (one exchange) or -1 (unlimited)"),
                );
                None
            }
        }
    }

    /// `http://` or `https://` with a host, no credentials and no query.
    fn url(&mut self, key: &str, value: Option<String>, path_allowed: bool) -> Option<http::Uri> {
        let text = self.required(key, value)?;
        let problem = match text.parse::<http::Uri>() {
            Err(e) => format!("not a URL: {e}"),
            Ok(uri) => match url_problem(&uri, path_allowed) {
                None => return Some(uri),
                Some(problem) => problem.to_string(),
            },
        };
        // The URL text is not echoed: it could carry credentials.
        self.add(key, problem);
        None
    }

    /// `<key> = { cert, key, client_ca }`, every file readable and usable.
    fn server_tls(&mut self, key: &str, value: toml::Value) -> Option<ServerTls> {
        let before = self.problems.len();
        let t: RawTls = self.read(value, key)?;
        let cert = self.required(&join(key, "cert"), t.cert);
        let private_key = self.required(&join(key, "key"), t.key);
        let tls = ServerTls {
            cert: self.readable_file(&join(key, "cert"), cert)?,
            key: self.readable_file(&join(key, "key"), private_key)?,
            client_ca: self.readable_file(&join(key, "client_ca"), t.client_ca),
        };
        if self.problems.len() == before {
            self.tls_files(key, &tls);
        }
        Some(tls)
    }

    /// `<key>.cert_identities`: each `uri:<uri>`, `dns:<name>` or `cn:<name>`.
    fn cert_identities(&mut self, key: &str, list: &[String]) -> Vec<CertIdentity> {
        list.iter()
            .enumerate()
            .filter_map(|(i, text)| {
                let parsed = parse_cert_identity(text);
                if parsed.is_none() {
                    self.add(
                        format!("{key}.cert_identities[{i}]"),
                        format!("`{text}` is not \"uri:<uri>\", \"dns:<name>\" or \"cn:<name>\""),
                    );
                }
                parsed
            })
            .collect()
    }

    fn listener(&mut self, key: &str, r: RawListener) -> ListenerConfig {
        let tls = r.tls.and_then(|v| self.server_tls(&join(key, "tls"), v));
        ListenerConfig {
            name: self.name(&join(key, "name"), r.name),
            addr: self.addr(&join(key, "address"), r.address),
            tls,
            caller: r.caller,
        }
    }

    /// What the listener would refuse at start: each file's PEM contents, the key matching the
    /// certificate, the client CA. The listener's own loading code does the checking.
    fn tls_files(&mut self, key: &str, tls: &ServerTls) {
        if let Err(e) = crate::tls::server::server_config(tls) {
            self.add(join(key, e.file.key()), e.message);
        }
    }

    /// The folder of the state file must exist and take new files (it is written by a rename).
    fn state_folder(&mut self, state_file: &Path) {
        let Some(dir) = state_file.parent().filter(|d| !d.as_os_str().is_empty()) else {
            return;
        };
        if !dir.is_dir() {
            self.add(
                "tokens.state_file",
                format!("folder {} does not exist", dir.display()),
            );
            return;
        }
        let probe = dir.join(format!(".tokenbroker-check-{}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
        {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
            }
            Err(e) => self.add(
                "tokens.state_file",
                format!("folder {} is not writable: {e}", dir.display()),
            ),
        }
    }

    fn caller(&mut self, key: &str, r: RawCaller) -> CallerConfig {
        let name = self.name(&join(key, "name"), r.name);
        if let Some(id) = &r.client_id {
            if !is_client_id(id) {
                self.add(
                    join(key, "client_id"),
                    "must be 1 to 256 letters, digits, '-', '_', '.' or '@'",
                );
            }
        }
        let key_hashes = self.key_hashes(key, &r.key_hashes);
        let cert_identities = self.cert_identities(key, &r.cert_identities);
        CallerConfig {
            name,
            client_id: r.client_id,
            key_hashes,
            cert_identities,
            inject: self.inject(&join(key, "inject"), r.inject),
            max_count_of_uses: self.max_uses(&join(key, "max_count_of_uses"), r.max_count_of_uses),
        }
    }

    fn route(&mut self, key: &str, r: RawRoute) -> RouteConfig {
        let name = self.name(&join(key, "name"), r.name);
        let host = r.host.map(|h| h.to_ascii_lowercase());
        if let Some(h) = &host {
            if !crate::canonical::is_host_name(h) {
                self.add(
                    join(key, "host"),
                    format!("`{h}` is not a host name (no port)"),
                );
            }
        }
        let mut path_prefix = r.path_prefix.unwrap_or_else(|| "/".to_string());
        if !path_prefix.starts_with('/') || path_prefix.contains(['?', '#', ' ']) {
            self.add(
                join(key, "path_prefix"),
                format!("`{path_prefix}` must be a path starting with '/'"),
            );
        }
        while path_prefix.len() > 1 && path_prefix.ends_with('/') {
            path_prefix.pop();
        }
        if let Ok(canonical) = crate::canonical::canonical_path(&path_prefix, false) {
            if canonical != path_prefix {
                self.add(
                    join(key, "path_prefix"),
                    format!("`{path_prefix}` is not in canonical form; write `{canonical}`"),
                );
            }
        } else if path_prefix.starts_with('/') {
            self.add(
                join(key, "path_prefix"),
                format!("`{path_prefix}` can never match: requests with such a path are refused"),
            );
        }
        let mut upgrades = Vec::with_capacity(r.upgrades.len());
        for (i, protocol) in r.upgrades.into_iter().enumerate() {
            let token = !protocol.is_empty()
                && protocol
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            if !token || protocol.eq_ignore_ascii_case("h2c") {
                self.add(
                    format!("{}[{i}]", join(key, "upgrades")),
                    format!("`{protocol}` is not an Upgrade protocol name (e.g. `websocket`)"),
                );
            }
            upgrades.push(protocol.to_ascii_lowercase());
        }
        for (i, name) in r.pass_caller_headers.iter().enumerate() {
            if PassedClaims::of([name.as_str()]).is_err() {
                self.add(
                    format!("{}[{i}]", join(key, "pass_caller_headers")),
                    format!(
                        "`{name}` is not a header the proxy drops; expected one of {}",
                        CALLER_CLAIMS.map(|c| format!("`{c}`")).join(", ")
                    ),
                );
            }
        }
        let pass_caller_headers = r
            .pass_caller_headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let upstream = self.url(&join(key, "upstream"), r.upstream, true);
        RouteConfig {
            name,
            host,
            path_prefix,
            strip_prefix: r.strip_prefix.unwrap_or(false),
            upstream: upstream.unwrap_or_default(),
            upstream_ca_file: self.ca_file(&join(key, "upstream_ca_file"), r.upstream_ca_file),
            allow: r.allow,
            upgrades,
            pass_caller_headers,
            connect_timeout: self.duration(
                &join(key, "connect_timeout"),
                r.connect_timeout,
                DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
            ),
            response_timeout: self.duration(
                &join(key, "response_timeout"),
                r.response_timeout,
                DEFAULT_UPSTREAM_RESPONSE_TIMEOUT,
            ),
        }
    }

    fn identity(&mut self, r: RawIdentity) -> IdentityConfig {
        let base_url = self
            .url("identity.base_url", r.base_url, false)
            .map(|u| {
                format!(
                    "{}://{}",
                    u.scheme_str().unwrap_or("https"),
                    u.authority().map_or("", |a| a.as_str())
                )
            })
            .unwrap_or_default();
        let tenant = r.tenant.unwrap_or_else(|| DEFAULT_TENANT.to_string());
        if tenant.is_empty() || tenant.contains(['/', '?', '#', ' ', '%']) {
            self.add(
                "identity.tenant",
                "must be a non-empty path segment, e.g. CUSTOMER",
            );
        }
        let client_id = self
            .required("identity.client_id", r.client_id)
            .unwrap_or_default();
        if !client_id.is_empty() && !is_client_id(&client_id) {
            self.add(
                "identity.client_id",
                "must be 1 to 256 letters, digits, '-', '_', '.' or '@'",
            );
        }
        if r.scope.as_ref().is_some_and(|s| s.len() > 1024) {
            self.add("identity.scope", "must be at most 1024 characters");
        }
        IdentityConfig {
            base_url,
            tenant,
            client_id,
            client_secret: self.secret("identity.client_secret", r.client_secret),
            scope: r.scope.filter(|s| !s.is_empty()),
            ca_file: self.ca_file("identity.ca_file", r.ca_file),
            connect_timeout: self.duration(
                "identity.connect_timeout",
                r.connect_timeout,
                DEFAULT_IDENTITY_CONNECT_TIMEOUT,
            ),
            request_timeout: self.duration(
                "identity.request_timeout",
                r.request_timeout,
                DEFAULT_IDENTITY_REQUEST_TIMEOUT,
            ),
        }
    }

    fn tokens(&mut self, r: RawTokens) -> TokenPolicy {
        let d = TokenPolicy::default();
        let mut fraction = |key: &str, value: Option<f64>, default: f64, zero_ok: bool| {
            let Some(v) = value else { return default };
            let ok = v < 1.0 && (v > 0.0 || (zero_ok && v == 0.0));
            if !ok {
                let low = if zero_ok { "0 <=" } else { "0 <" };
                self.add(key, format!("{v} is out of range: {low} value < 1"));
            }
            v
        };
        let refresh_fraction = fraction(
            "tokens.refresh_fraction",
            r.refresh_fraction,
            d.refresh_fraction,
            false,
        );
        let refresh_jitter = fraction(
            "tokens.refresh_jitter",
            r.refresh_jitter,
            d.refresh_jitter,
            true,
        );
        let backoff_initial = self.duration(
            "tokens.backoff_initial",
            r.backoff_initial,
            d.backoff_initial,
        );
        let backoff_max = self.duration("tokens.backoff_max", r.backoff_max, d.backoff_max);
        if backoff_max < backoff_initial {
            self.add(
                "tokens.backoff_max",
                "must not be shorter than backoff_initial",
            );
        }
        let state_file = r.state_file.map(|s| self.path(&s));
        if let Some(path) = &state_file {
            self.state_folder(path);
        }
        let display_name_prefix = r.display_name_prefix.unwrap_or(d.display_name_prefix);
        TokenPolicy {
            api_token_ttl_minutes: self.int(
                "tokens.api_token_ttl_minutes",
                r.api_token_ttl_minutes,
                d.api_token_ttl_minutes,
                1,
                i64::from(i32::MAX),
            ),
            access_token_ttl_minutes: self.int(
                "tokens.access_token_ttl_minutes",
                r.access_token_ttl_minutes,
                d.access_token_ttl_minutes,
                1,
                i64::from(i32::MAX),
            ),
            max_count_of_uses: self.max_uses("tokens.max_count_of_uses", r.max_count_of_uses),
            inject: self.inject("tokens.inject", r.inject).unwrap_or(d.inject),
            refresh_fraction,
            refresh_jitter,
            min_margin: self.duration("tokens.min_margin", r.min_margin, d.min_margin),
            expiry_skew: self.duration("tokens.expiry_skew", r.expiry_skew, d.expiry_skew),
            backoff_initial,
            backoff_max,
            max_wait: self.duration("tokens.max_wait", r.max_wait, d.max_wait),
            min_renew_interval: self.duration(
                "tokens.min_renew_interval",
                r.min_renew_interval,
                d.min_renew_interval,
            ),
            warm_up: r.warm_up.unwrap_or(d.warm_up),
            state_file,
            display_name_prefix,
            state_file_seal_keys: None,
        }
    }

    fn admin(&mut self, r: RawAdmin) -> AdminConfig {
        let max_connections = self.int(
            "admin.max_connections",
            r.max_connections,
            DEFAULT_ADMIN_MAX_CONNECTIONS as i64,
            1,
            10_000,
        ) as usize;
        let address = r
            .address
            .or_else(|| Some(DEFAULT_ADMIN_ADDRESS.to_string()));
        let tls = r.tls.and_then(|v| self.server_tls("admin.tls", v));
        let cert_identities = self.cert_identities("admin", &r.cert_identities);
        if !cert_identities.is_empty() && tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            self.add(
                "admin.cert_identities",
                "needs admin.tls with a client_ca to verify client certificates against",
            );
        }
        AdminConfig {
            addr: self.addr("admin.address", address),
            tls,
            cert_identities,
            key_hashes: self.key_hashes("admin", &r.key_hashes),
            max_connections,
            header_read_timeout: self.duration(
                "admin.header_read_timeout",
                r.header_read_timeout,
                DEFAULT_ADMIN_HEADER_READ_TIMEOUT,
            ),
        }
    }

    /// `<key>.key_hashes`: each `sha256:<64 hex digits>`.
    fn key_hashes(&mut self, key: &str, hashes: &[String]) -> Vec<[u8; 32]> {
        hashes
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                let parsed = parse_key_hash(h);
                if parsed.is_none() {
                    // The value is not echoed: it could be the key itself, pasted by mistake.
                    self.add(
                        format!("{key}.key_hashes[{i}]"),
                        "must be \"sha256:<64 hex digits>\" (see `tokenbroker hash-key`)",
                    );
                }
                parsed
            })
            .collect()
    }

    fn limits(&mut self, r: RawLimits) -> Limits {
        let d = Limits::default();
        let mut size = |key: &str, value: Option<i64>, default: usize, min: i64, max: i64| {
            self.int(key, value, default as i64, min, max) as usize
        };
        let max_header_bytes = size(
            "limits.max_header_bytes",
            r.max_header_bytes,
            d.max_header_bytes,
            8 * 1024,
            16 * 1024 * 1024,
        );
        let max_connections = size(
            "limits.max_connections",
            r.max_connections,
            d.max_connections,
            1,
            1_000_000,
        );
        let replay_buffer_bytes = size(
            "limits.replay_buffer_bytes",
            r.replay_buffer_bytes,
            d.replay_buffer_bytes,
            0,
            64 * 1024 * 1024,
        );
        let max_body_bytes = r
            .max_body_bytes
            .map(|v| self.int("limits.max_body_bytes", Some(v), 1, 1, i64::MAX) as u64);
        let shutdown_grace =
            self.any_duration("limits.shutdown_grace", r.shutdown_grace, d.shutdown_grace);
        let drain_set = r.drain.is_some();
        let mut drain = self.any_duration("limits.drain", r.drain, d.drain);
        if drain > shutdown_grace {
            if drain_set {
                self.add(
                    "limits.drain",
                    format!(
                        "{} is longer than limits.shutdown_grace ({}): the drain must end before \
                         the shutdown deadline cuts every connection",
                        humantime::format_duration(drain),
                        humantime::format_duration(shutdown_grace)
                    ),
                );
            }
            // A short shutdown_grace alone shortens the default drain with it.
            drain = shutdown_grace;
        }
        Limits {
            header_read_timeout: self.duration(
                "limits.header_read_timeout",
                r.header_read_timeout,
                d.header_read_timeout,
            ),
            max_header_bytes,
            max_body_bytes,
            max_connections,
            replay_buffer_bytes,
            idle_timeout: self.duration("limits.idle_timeout", r.idle_timeout, d.idle_timeout),
            shutdown_grace,
            drain,
            merge_slashes: r.merge_slashes.unwrap_or(d.merge_slashes),
            workers: self.workers(r.workers),
        }
    }

    /// `limits.workers`: 0 (one per usable CPU) to [`MAX_WORKERS`]; 1 by default.
    fn workers(&mut self, value: Option<i64>) -> usize {
        match value {
            None => Limits::default().workers,
            Some(n) if (0..=MAX_WORKERS as i64).contains(&n) => n as usize,
            Some(n) => {
                self.add(
                    "limits.workers",
                    format!(
                        "{n} is not a number of worker threads: 0 (one per usable CPU), 1 \
                         (one runtime for everything, the default) or up to {MAX_WORKERS}"
                    ),
                );
                Limits::default().workers
            }
        }
    }

    fn logging(&mut self, r: RawLogging) -> LoggingConfig {
        if let Some(level) = &r.level {
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
                self.add(
                    "logging.level",
                    format!("not a log filter such as \"info\": {e}"),
                );
            }
        }
        LoggingConfig {
            level: r.level,
            json: r.json.unwrap_or(false),
        }
    }

    fn telemetry(&mut self, r: RawTelemetry) -> Option<TelemetryConfig> {
        let endpoint = self
            .url("telemetry.endpoint", r.endpoint, false)
            .map(|u| u.to_string().trim_end_matches('/').to_string());
        let ratio = r
            .sampling_ratio
            .unwrap_or(crate::config::DEFAULT_SAMPLING_RATIO);
        if !(0.0..=1.0).contains(&ratio) {
            self.add(
                "telemetry.sampling_ratio",
                format!("must be between 0.0 and 1.0, not {ratio}"),
            );
        }
        let service_name = r
            .service_name
            .unwrap_or_else(|| crate::config::DEFAULT_SERVICE_NAME.to_string());
        if service_name.trim().is_empty() {
            self.add("telemetry.service_name", "must not be empty".to_string());
        }
        Some(TelemetryConfig {
            endpoint: endpoint?,
            service_name,
            sampling_ratio: ratio,
        })
    }

    /// Problems that involve more than one section: names, references, duplicates.
    fn cross_check(&mut self, c: &Config) {
        for (kind, names) in [
            (
                "listener",
                c.listeners.iter().map(|l| &l.name).collect::<Vec<_>>(),
            ),
            ("caller", c.callers.iter().map(|x| &x.name).collect()),
            ("route", c.routes.iter().map(|r| &r.name).collect()),
        ] {
            let mut seen = HashSet::new();
            for (i, name) in names.into_iter().enumerate() {
                if !name.is_empty() && !seen.insert(name) {
                    self.add(
                        format!("{kind}[{i}].name"),
                        format!("duplicate {kind} name `{name}`"),
                    );
                }
            }
        }
        if c.listeners.is_empty() {
            self.add(
                "listener",
                "no [[listener]] configured: nothing would be served",
            );
        }

        let callers: HashSet<&str> = c.callers.iter().map(|x| x.name.as_str()).collect();
        let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
        if let Some(admin) = &c.admin {
            addrs.insert(admin.addr, "admin.address".to_string());
        }
        for (i, l) in c.listeners.iter().enumerate() {
            if let Some(caller) = &l.caller {
                if !callers.contains(caller.as_str()) {
                    self.add(
                        format!("listener[{i}].caller"),
                        format!("unknown caller `{caller}`"),
                    );
                }
            }
            let key = format!("listener[{i}].address");
            if l.addr.port() != 0 {
                if let Some(other) = addrs.insert(l.addr, key.clone()) {
                    self.add(key, format!("{} is also used by {other}", l.addr));
                }
            }
        }
        for (i, r) in c.routes.iter().enumerate() {
            if r.allow.is_empty() {
                self.add(
                    format!("route[{i}].allow"),
                    "allows no caller: list caller names",
                );
            }
            for name in &r.allow {
                if !callers.contains(name.as_str()) {
                    self.add(
                        format!("route[{i}].allow"),
                        format!("unknown caller `{name}`"),
                    );
                }
            }
            let earlier = c.routes[..i]
                .iter()
                .position(|o| o.host == r.host && o.path_prefix == r.path_prefix);
            if let Some(j) = earlier {
                self.add(
                    format!("route[{i}].path_prefix"),
                    format!("same host and path_prefix as route[{j}]: it would never match"),
                );
            }
        }

        let mtls = c
            .listeners
            .iter()
            .any(|l| l.tls.as_ref().is_some_and(|t| t.client_ca.is_some()));
        let mut keys: HashMap<[u8; 32], &str> = HashMap::new();
        let mut identities: HashMap<&CertIdentity, &str> = HashMap::new();
        for (i, x) in c.callers.iter().enumerate() {
            let bound = c
                .listeners
                .iter()
                .any(|l| l.caller.as_ref() == Some(&x.name));
            let by_cert = !x.cert_identities.is_empty() && mtls;
            if x.key_hashes.is_empty() && !by_cert && !bound {
                let why = if x.cert_identities.is_empty() {
                    "no key_hashes, no cert_identities and no listener bound to it"
                } else {
                    "only cert_identities, but no listener asks for client certificates (tls.client_ca)"
                };
                self.add(
                    format!("caller[{i}]"),
                    format!("cannot be identified: {why}"),
                );
            }
            for hash in &x.key_hashes {
                if let Some(other) = keys.insert(*hash, &x.name) {
                    self.add(
                        format!("caller[{i}].key_hashes"),
                        format!("a key hash is also listed for caller `{other}`"),
                    );
                }
            }
            for id in &x.cert_identities {
                if let Some(other) = identities.insert(id, &x.name) {
                    self.add(
                        format!("caller[{i}].cert_identities"),
                        format!("{id:?} is also listed for caller `{other}`"),
                    );
                }
            }
            let display = c.tokens.display_name_prefix.len() + 1 + x.name.len();
            if !(3..=255).contains(&display) {
                self.add(
                    format!("caller[{i}].name"),
                    "token display name `<display_name_prefix>-<name>` must be 3 to 255 characters",
                );
            }
        }
    }
}

fn parse_cert_identity(text: &str) -> Option<CertIdentity> {
    let (kind, value) = text.split_once(':')?;
    if value.is_empty() {
        return None;
    }
    let value = value.to_string();
    match kind {
        "uri" => Some(CertIdentity::Uri(value)),
        "dns" => Some(CertIdentity::Dns(value.to_ascii_lowercase())),
        "cn" => Some(CertIdentity::Cn(value)),
        _ => None,
    }
}
