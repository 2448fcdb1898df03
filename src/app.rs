//! The running process: wires the metrics registry, the broker, the proxy listeners and the admin
//! listener together ([`AppHandle`]), reloads the configuration, shuts down in order, and maps
//! process signals onto that ([`run`]). Tests drive [`AppHandle`] directly, without signals.
//! A reload also reads the TLS listeners' certificate, key and client CA files again (rotation
//! without restart). A reload that fails validation, or whose TLS files do not load, changes
//! nothing. `run` reloads on SIGHUP and when the config file or one of its secret or TLS files
//! changes (polled), and keeps the config metrics (hash in force, reloads, certificate expiry)
//! current ([`metrics`]). It registers every subsystem's metric families at start, in a fixed
//! order, so that `/metrics` lists them all from the first scrape. With worker threads
//! ([`AppHandle::start_on`], which `run` uses when `cli` started workers), the proxy listeners are
//! served on the workers and everything else here (broker, admin listener, reloads, signals)
//! stays on the runtime that started the app.

pub mod metrics;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState, Allowed};
use crate::broker::store::StoreMetrics;
use crate::broker::{Broker, BrokerError, BrokerMetrics};
use crate::config::{self, Config, ConfigError, ConfigErrors, LoggingConfig};
use crate::emulator::{Emulator, EmulatorConfig};
use crate::metrics::Metrics;
use crate::proxy::{ListenerTls, ProxyHandle, ProxyMetrics, StartError as ProxyStartError};
use crate::server::{ConnLimits, Shutdown};
use crate::telemetry::Telemetry;
use crate::tls::{self, server::ClientCerts};
use metrics::ConfigMetrics;

/// How often `run` looks at the config file, the secret files it names and the TLS listeners'
/// files for a change (then reloads the config, or the certificates alone).
const FILES_POLL: Duration = Duration::from_secs(5);

/// What identifies one version of a file: size, modification time, inode (following symlinks, as
/// Kubernetes Secret volumes swap them); `None` when it cannot be read.
type FileStamp = Option<(u64, SystemTime, u64)>;

/// The settings a reload cannot change: where `new` changes one, it gets the running value back,
/// and the key is returned, to be named in a warning. (Listeners are bound, the connection
/// limit's semaphore and the store's connections made, the log and trace layers installed, and
/// the state file opened, at start.)
fn keep_restart_only(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    let addrs = |c: &Config| {
        let mut v: Vec<_> = c
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.addr))
            .collect();
        v.sort();
        v
    };
    if addrs(old) != addrs(new) {
        kept.push("listener.address");
    }
    if old.admin.as_ref().map(|a| a.addr) != new.admin.as_ref().map(|a| a.addr) {
        kept.push("admin.address");
    }
    let admin_tls = |c: &Config| c.admin.as_ref().map(|a| a.tls.is_some());
    if admin_tls(old) != admin_tls(new) {
        if let (Some(old), Some(new)) = (&old.admin, &mut new.admin) {
            new.tls = old.tls.clone();
        }
        kept.push("admin.tls");
    }
    if old.limits.max_connections != new.limits.max_connections {
        new.limits.max_connections = old.limits.max_connections;
        kept.push("limits.max_connections");
    }
    if old.limits.workers != new.limits.workers {
        new.limits.workers = old.limits.workers;
        kept.push("limits.workers");
    }
    if old.tokens.state_file != new.tokens.state_file {
        new.tokens.state_file = old.tokens.state_file.clone();
        kept.push("tokens.state_file");
    }
    // The seal keys by id (a secret's Debug shows nothing), the rest as Debug shows it.
    let store = |c: &Config| {
        let ids = c.store.seal_keys.as_ref().map(|k| k.ids().join(","));
        (format!("{:?}", c.store.kind), ids)
    };
    if store(old) != store(new) {
        new.store = old.store.clone();
        new.tokens.state_file_seal_keys = old.tokens.state_file_seal_keys.clone();
        kept.push("store");
    }
    if format!("{:?}", old.logging) != format!("{:?}", new.logging) {
        new.logging = old.logging.clone();
        kept.push("logging");
    }
    if format!("{:?}", old.telemetry) != format!("{:?}", new.telemetry) {
        new.telemetry = old.telemetry.clone();
        kept.push("telemetry");
    }
    kept
}

/// The stamp of the file at `path` (following symlinks).
fn stamp(path: &std::path::Path) -> FileStamp {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.len(),
        m.modified().ok()?,
        std::os::unix::fs::MetadataExt::ino(&m),
    ))
}

/// Who may read `/tokens` under `admin`'s settings.
fn allowed(admin: &crate::config::AdminConfig) -> Allowed {
    Allowed {
        key_hashes: admin.key_hashes.clone(),
        cert_identities: admin.cert_identities.clone(),
    }
}

/// Why the process could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind the admin listener on {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("token broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("proxy: {0}")]
    Proxy(#[from] ProxyStartError),
    #[error("admin.tls.{}: {}", .0.file.key(), .0.message)]
    AdminTls(tls::server::TlsError),
}

struct AdminTask {
    state: Arc<AdminState>,
    /// With `[admin] tls`: the config in force, replaced on reload.
    tls: Option<ListenerTls>,
    shutdown: Shutdown,
    task: JoinHandle<()>,
}

/// Registers every subsystem's metric families, in this order whatever starts first: `/metrics`
/// lists them all, always in the same order, before the first request. The config's set, which
/// the app records, is handed back.
fn register_metrics(metrics: &Metrics) -> Arc<ConfigMetrics> {
    metrics.set::<ProxyMetrics>();
    metrics.set::<BrokerMetrics>();
    metrics.set::<StoreMetrics>();
    metrics.set::<ConfigMetrics>()
}

/// A running tokenbroker: proxy listeners, broker and admin listener.
pub struct AppHandle {
    config: Mutex<Arc<Config>>,
    metrics: Arc<Metrics>,
    config_metrics: Arc<ConfigMetrics>,
    broker: Arc<Broker>,
    proxy: ProxyHandle,
    proxy_shutdown: Shutdown,
    proxy_addrs: Vec<(String, SocketAddr)>,
    admin: Option<AdminTask>,
    admin_addr: Option<SocketAddr>,
}

impl AppHandle {
    /// Starts everything `config` describes, on the current runtime. The admin port is bound
    /// first, so that a port conflict is reported before any token is fetched.
    pub async fn start(config: Config) -> Result<AppHandle, StartError> {
        Self::start_on(config, &[]).await
    }

    /// Like [`AppHandle::start`], the proxy listeners served on `workers` (the worker threads'
    /// runtimes, see [`crate::workers`]): each listener gets a socket and an accept loop on every
    /// worker. Empty: on the current runtime. The broker, the admin listener and reloads stay on
    /// the current runtime.
    pub async fn start_on(
        config: Config,
        workers: &[tokio::runtime::Handle],
    ) -> Result<AppHandle, StartError> {
        // One crypto provider for every rustls config in the process; a second call is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = Arc::new(config);
        let metrics = Metrics::new();
        let config_metrics = register_metrics(&metrics);
        let admin_listener =
            match &config.admin {
                Some(a) => Some(TcpListener::bind(a.addr).await.map_err(|source| {
                    StartError::AdminBind {
                        addr: a.addr,
                        source,
                    }
                })?),
                None => None,
            };
        let admin_tls = match config.admin.as_ref().and_then(|a| a.tls.as_ref()) {
            Some(files) => Some(ListenerTls::new(
                tls::server::server_config_for(files, ClientCerts::Optional)
                    .map_err(StartError::AdminTls)?,
            )),
            None => None,
        };
        let broker = Broker::start(&config, metrics.clone()).await?;
        let proxy_shutdown = Shutdown::new();
        let proxy = match ProxyHandle::start_on(
            config.clone(),
            broker.clone(),
            metrics.clone(),
            proxy_shutdown.clone(),
            workers,
        )
        .await
        {
            Ok(proxy) => proxy,
            Err(e) => {
                broker.shutdown().await;
                return Err(e.into());
            }
        };
        let proxy_addrs = proxy.local_addrs();
        let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
        let admin = admin_listener
            .zip(config.admin.as_ref())
            .map(|(listener, a)| {
                let state = AdminState::new(broker.clone(), metrics.clone());
                state.set_allowed(allowed(a));
                state.listening.store(true, Ordering::Release);
                let shutdown = Shutdown::new();
                let limits = ConnLimits {
                    max_connections: a.max_connections,
                    header_read_timeout: a.header_read_timeout,
                };
                let grace = config.limits.shutdown_grace;
                let task = tokio::spawn(admin::serve(
                    listener,
                    admin_tls.clone(),
                    state.clone(),
                    limits,
                    shutdown.clone(),
                    grace,
                ));
                AdminTask {
                    state,
                    tls: admin_tls,
                    shutdown,
                    task,
                }
            });
        let app = AppHandle {
            config: Mutex::new(config.clone()),
            metrics,
            config_metrics,
            broker,
            proxy,
            proxy_shutdown,
            proxy_addrs,
            admin,
            admin_addr,
        };
        app.record_in_force(&config);
        Ok(app)
    }

    /// Sets the metrics of the config now in force: its hash and its listeners' certificates.
    fn record_in_force(&self, config: &Config) {
        if let Some(sha256) = &config.source_sha256 {
            self.config_metrics.in_force(sha256);
        }
        self.record_certificates(config);
    }

    /// Sets each TLS listener's certificate expiry from its certificate file (the admin
    /// listener's as `admin`).
    fn record_certificates(&self, config: &Config) {
        let admin = config.admin.as_ref().and_then(|a| a.tls.as_ref());
        let listeners = config.listeners.iter();
        let tls = listeners.filter_map(|l| Some((l.name.as_str(), l.tls.as_ref()?)));
        for (name, files) in tls.chain(admin.map(|t| ("admin", t))) {
            if let Some(not_after) = tls::server::not_after(&files.cert) {
                self.config_metrics.certificate(name, not_after);
            }
        }
    }

    /// Where the admin listener is bound, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Each proxy listener's name and bound address.
    pub fn proxy_addrs(&self) -> &[(String, SocketAddr)] {
        &self.proxy_addrs
    }

    /// The bound address of the proxy listener called `name`.
    pub fn proxy_addr(&self, name: &str) -> Option<SocketAddr> {
        self.proxy_addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.lock().expect("config lock").clone()
    }

    /// Reads the config file (and the secrets it refers to) again and applies it. A config with
    /// problems is refused, logged problem by problem, and the current one stays in force.
    pub fn reload(&self) -> Result<(), ConfigErrors> {
        let loaded = match self.config().source.clone() {
            Some(path) => config::load(&path),
            None => Err(ConfigErrors(vec![ConfigError {
                file: Default::default(),
                key: String::new(),
                message: "the running config was not read from a file".to_string(),
            }])),
        };
        let outcome = match loaded.and_then(|new| self.apply(new)) {
            Ok(()) => {
                tracing::info!("configuration reloaded");
                self.record_in_force(&self.config());
                Ok(())
            }
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(problem = %e, "reloaded configuration refused");
                }
                tracing::warn!(
                    problems = errors.0.len(),
                    "configuration reload refused; the previous configuration stays in force"
                );
                Err(errors)
            }
        };
        self.config_metrics.reloaded(outcome.is_ok());
        outcome
    }

    /// Reads the TLS listeners' certificate, key and client CA files of the config in force again
    /// (the config file is not read) and serves them for new handshakes. Files that do not load
    /// are refused, logged and counted like a refused reload; the current certificates stay.
    pub fn reload_certificates(&self) -> Result<(), ConfigErrors> {
        let outcome = self.listener_certificates(&self.config());
        match &outcome {
            Ok(loaded) => {
                for (listener, config) in loaded {
                    listener.replace(config.clone());
                }
                tracing::info!(listeners = loaded.len(), "TLS certificates reloaded");
                self.record_certificates(&self.config());
            }
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(problem = %e, "new TLS files refused");
                }
                tracing::warn!("TLS reload refused; the previous certificates stay in force");
            }
        }
        self.config_metrics.reloaded(outcome.is_ok());
        outcome.map(|_| ())
    }

    /// The stamp of every TLS file of the config in force: when it changes, the files did.
    fn tls_files_stamp(&self) -> Vec<FileStamp> {
        let config = self.config();
        let admin = config.admin.as_ref().and_then(|a| a.tls.as_ref());
        let files = config
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref())
            .chain(admin)
            .flat_map(|t| [Some(&t.cert), Some(&t.key), t.client_ca.as_ref()]);
        files.map(|p| p.and_then(|p| stamp(p))).collect()
    }

    /// The stamp of the config file and of every secret file it names.
    fn config_files_stamp(&self) -> Vec<FileStamp> {
        let config = self.config();
        let files = config.source.iter().chain(&config.secret_files);
        files.map(|p| stamp(p)).collect()
    }

    /// Applies a validated config: the proxy first, as it can still refuse it (e.g. an upstream
    /// CA file that does not parse); then the broker.
    fn apply(&self, mut new: Config) -> Result<(), ConfigErrors> {
        let old = self.config();
        for key in keep_restart_only(&old, &mut new) {
            tracing::warn!(
                key,
                "this setting changes only at a restart: the running value stays until then"
            );
        }
        let new = Arc::new(new);
        let certificates = self.listener_certificates(&new)?;
        if let Err(e) = self.proxy.try_reconfigure(&new) {
            return Err(ConfigErrors(vec![ConfigError {
                file: new.source.clone().unwrap_or_default(),
                key: String::new(),
                message: e.to_string(),
            }]));
        }
        for (listener, config) in certificates {
            listener.replace(config);
        }
        self.broker.reconfigure(&new);
        if let (Some(admin), Some(a)) = (&self.admin, &new.admin) {
            admin.state.set_allowed(allowed(a));
        }
        *self.config.lock().expect("config lock") = new;
        Ok(())
    }

    /// The TLS listeners' new server configs, read from the files `new` names (certificate, key
    /// and client CA are read again even when their paths did not change: that is how they are
    /// rotated). Nothing is replaced here; any file that does not load refuses the reload.
    fn listener_certificates(
        &self,
        new: &Config,
    ) -> Result<Vec<(ListenerTls, Arc<rustls::ServerConfig>)>, ConfigErrors> {
        let mut loaded = Vec::new();
        let mut problems = Vec::new();
        for (name, current) in self.proxy.listener_tls() {
            let Some((i, listener)) = new
                .listeners
                .iter()
                .enumerate()
                .find(|(_, l)| &l.name == name)
            else {
                continue;
            };
            let Some(files) = &listener.tls else {
                tracing::warn!(
                    listener = %name,
                    "TLS cannot be turned off by a reload: restart for that"
                );
                continue;
            };
            match tls::server::server_config(files) {
                Ok(config) => loaded.push((current.clone(), config)),
                Err(e) => problems.push(ConfigError {
                    file: new.source.clone().unwrap_or_default(),
                    key: format!("listener[{i}].tls.{}", e.file.key()),
                    message: e.message,
                }),
            }
        }
        let admin = self.admin.as_ref().and_then(|a| a.tls.as_ref());
        let files = new.admin.as_ref().and_then(|a| a.tls.as_ref());
        if let (Some(current), Some(files)) = (admin, files) {
            match tls::server::server_config_for(files, ClientCerts::Optional) {
                Ok(config) => loaded.push((current.clone(), config)),
                Err(e) => problems.push(ConfigError {
                    file: new.source.clone().unwrap_or_default(),
                    key: format!("admin.tls.{}", e.file.key()),
                    message: e.message,
                }),
            }
        }
        if problems.is_empty() {
            Ok(loaded)
        } else {
            Err(ConfigErrors(problems))
        }
    }

    /// Stops in order: readiness goes to 503, proxy listeners stop accepting and drain (up to
    /// `shutdown_grace`), the broker stops and saves its state, then the admin listener closes.
    pub async fn shutdown(self) {
        if let Some(admin) = &self.admin {
            admin.state.listening.store(false, Ordering::Release);
        }
        self.proxy_shutdown.trigger();
        self.proxy.wait().await;
        self.broker.shutdown().await;
        if let Some(admin) = self.admin {
            admin.shutdown.trigger();
            let _ = admin.task.await;
        }
    }
}

/// `tokenbroker run`: serves until SIGTERM or SIGINT, reloading on SIGHUP; the proxy listeners
/// on `workers` (the worker threads' runtimes), or on the current runtime when it is empty.
pub async fn run(config: Config, log_json: bool, workers: &[tokio::runtime::Handle]) -> ExitCode {
    let telemetry = match &config.telemetry {
        None => None,
        Some(t) => match Telemetry::start(t, TELEMETRY_EXPORT_EVERY) {
            Ok(telemetry) => Some(telemetry),
            Err(e) => {
                init_tracing(&config.logging, log_json);
                tracing::error!(error = %e, "tokenbroker could not start");
                return ExitCode::FAILURE;
            }
        },
    };
    init_tracing_with(&config.logging, log_json, telemetry.as_ref());
    if let Some(t) = &config.telemetry {
        tracing::info!(
            endpoint = %format_args!("{}/v1/traces", crate::telemetry::loggable_endpoint(&t.endpoint)),
            service_name = %t.service_name,
            sampling_ratio = t.sampling_ratio,
            "telemetry: exporting spans over OTLP/HTTP"
        );
    }
    if !workers.is_empty() {
        tracing::info!(
            workers = workers.len(),
            "proxy listeners served by worker threads, each with its own sockets (SO_REUSEPORT)"
        );
    }
    let code = serve_until_stopped(config, workers).await;
    if let Some(telemetry) = telemetry {
        // blocks until the last spans are exported, which needs the runtime's other thread
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    }
    code
}

/// How often spans are exported with `[telemetry]`.
const TELEMETRY_EXPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

async fn serve_until_stopped(config: Config, workers: &[tokio::runtime::Handle]) -> ExitCode {
    let Some(mut signals) = Signals::install() else {
        return ExitCode::FAILURE;
    };
    let app = match AppHandle::start_on(config, workers).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "tokenbroker could not start");
            return ExitCode::FAILURE;
        }
    };
    announce(&app);
    signals.serve(&app).await;
    tracing::info!("shutting down: draining in-flight requests");
    app.shutdown().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Logs where the admin listener is (the proxy logs its own listeners).
pub fn announce(app: &AppHandle) {
    if let Some(addr) = app.admin_addr() {
        tracing::info!(%addr, "admin listening (/healthz /readyz /metrics /tokens)");
    }
}

/// The process signals tokenbroker handles. Installed before anything starts, so that a signal
/// arriving early is handled rather than killing the process with the default action.
pub struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    /// Installs the handlers; `None` (logged) if the system refuses.
    pub fn install() -> Option<Signals> {
        let installed = (|| {
            Ok::<_, std::io::Error>(Signals {
                hangup: signal(SignalKind::hangup())?,
                terminate: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        })();
        installed
            .map_err(|e| tracing::error!(error = %e, "cannot install signal handlers"))
            .ok()
    }

    /// Reloads `app`'s configuration on each SIGHUP and when the config file or a secret file it
    /// names changes (as a Kubernetes volume update does), and its TLS certificates alone when
    /// only their files change; returns on SIGTERM or SIGINT. Files are looked at every few
    /// seconds, and a change is acted on once two looks in a row agree, so that a file still
    /// being written (by an editor, in place) is not read half-way.
    pub async fn serve(&mut self, app: &AppHandle) {
        let mut poll = tokio::time::interval(FILES_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stamps = |app: &AppHandle| (app.config_files_stamp(), app.tls_files_stamp());
        let mut files = stamps(app);
        let mut seen = files.clone();
        loop {
            tokio::select! {
                _ = self.hangup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    let _ = app.reload();
                    files = stamps(app);
                    seen = files.clone();
                }
                _ = poll.tick() => {
                    let now = stamps(app);
                    let settled = now == seen;
                    seen = now.clone();
                    if !settled {
                        continue;
                    }
                    if now.0 != files.0 {
                        tracing::info!("the config file or a secret file changed: reloading the configuration");
                        let _ = app.reload();
                        files = stamps(app);
                    } else if now.1 != files.1 {
                        files = now;
                        tracing::info!("TLS files changed: reloading the certificates");
                        let _ = app.reload_certificates();
                    }
                }
                () = stop(&mut self.terminate, &mut self.interrupt) => return,
            }
        }
    }

    /// Resolves on SIGTERM or SIGINT.
    pub async fn stopped(&mut self) {
        stop(&mut self.terminate, &mut self.interrupt).await;
    }
}

async fn stop(terminate: &mut Signal, interrupt: &mut Signal) {
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
}

/// `tokenbroker emulate`: the identity-service emulator alone, until SIGTERM or SIGINT.
pub async fn emulate(config: EmulatorConfig) -> ExitCode {
    init_tracing(&LoggingConfig::default(), false);
    let Some(mut signals) = Signals::install() else {
        return ExitCode::FAILURE;
    };
    let tenant = config.tenant.clone();
    let emulator = match Emulator::start(config).await {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "the emulator could not start");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "identity-service emulator on {} (tenant {tenant}): token endpoint {}/acs/t/{tenant}/token",
        emulator.base_url(),
        emulator.base_url()
    );
    if let Some(echo) = emulator.echo_addr() {
        println!("echo upstream on http://{echo}");
    }
    signals.stopped().await;
    emulator.shutdown().await;
    ExitCode::SUCCESS
}

/// Installs the log subscriber: `RUST_LOG` when set, else the config's level, else `info`;
/// JSON lines when the config or the command line asks for them, each event's fields (`message`
/// among them) at the top level of its object. Logs go to standard error.
pub fn init_tracing(logging: &LoggingConfig, json: bool) {
    init_tracing_with(logging, json, None);
}

/// [`init_tracing`], plus the OpenTelemetry layer of `telemetry` (unfiltered: the log level
/// does not decide which spans are exported).
pub fn init_tracing_with(logging: &LoggingConfig, json: bool, telemetry: Option<&Telemetry>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::try_new(logging.level.as_deref().unwrap_or("info"))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = if json || logging.json {
        fmt.json().flatten_event(true).with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    // A second installation (tests, dev after emulate) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(telemetry.map(|t| t.layer()))
        .try_init();
}
