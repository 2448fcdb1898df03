//! The proxy data path: listeners (plain, TLS, mTLS), caller identification, routing, header
//! rewrite, forwarding, error responses.
//!
//! - [`listener`]: sockets (one per worker thread with `SO_REUSEPORT`, see [`crate::workers`]),
//!   accept loops, connection limits, idle timeout, graceful drain
//! - [`io`]: the watched client stream (activity, HTTP/1 framing, parking, hyper's refusals seen)
//! - [`admit`]: what a request must pass before anything else (method, framing, sizes)
//! - [`target`]: the canonical path and authority, the one view of the request target
//! - [`identify`]: who is calling
//! - [`route`]: where it goes (on the canonical target)
//! - [`upgrade`]: `Upgrade` requests (WebSocket) and their tunnels
//! - [`rewrite`]: header rewrite (pure functions)
//! - [`forward`]: upstream clients, the body type, one send
//! - [`service`]: one request, as its phases from admission to the log line
//! - [`log`]: the request log line and its one writer
//! - [`error`]: the error table
//! - [`metrics`]: the proxy's metric families, which the listeners and the request path record
//!
//! What a request sees of the config is one immutable [`State`], swapped atomically by
//! [`ProxyHandle::reconfigure`]; a request keeps the `State` it started with. The state, the
//! metrics, the token source and the connection limit are shared by every worker thread;
//! client connections and (through the pool's per-worker sets) upstream connections are not.
//!
//! Must never: forward a request without an identified, allowed caller and a token from the
//! broker, route or forward anything but the canonical target, or print a caller key or a token.

mod admit;
mod error;
mod forward;
mod identify;
mod io;
mod listener;
mod log;
pub mod metrics;
pub mod rewrite;
mod route;
mod service;
mod target;
mod upgrade;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::broker::Broker;
use crate::config::{Config, Limits};
use crate::metrics::Metrics;
use crate::server::Shutdown;
use crate::token::{Rejection, TokenResult, TokenUnavailable};
pub use metrics::ProxyMetrics;

pub use crate::tls::server::ListenerTls;
pub use admit::check_head;
pub use error::ProxyError;
pub use forward::ProxyBody;
pub use identify::{identify, Callers, ConnIdentity};
pub use rewrite::{rewrite_request, rewrite_response, Forwarded};
pub use route::{Route, Routes};
pub use service::{find_route, ConnInfo};
pub use target::Target;

/// Why the proxy could not start (or a new config could not be applied).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(pub String);

/// Where the proxy gets the token to inject. [`Broker`] is the real one; tests and benches may
/// bring their own.
pub trait TokenSource: Send + Sync + 'static {
    /// The caller's current token.
    fn token(&self, caller: &str) -> impl Future<Output = TokenResult> + Send;
    /// The upstream refused `generation` with 401: a renewed token to replay with, or pass the
    /// 401 on.
    fn rejected(
        &self,
        caller: &str,
        generation: u64,
    ) -> impl Future<Output = Result<Rejection, TokenUnavailable>> + Send;
}

impl TokenSource for Broker {
    fn token(&self, caller: &str) -> impl Future<Output = TokenResult> + Send {
        Broker::token(self, caller)
    }
    fn rejected(
        &self,
        caller: &str,
        generation: u64,
    ) -> impl Future<Output = Result<Rejection, TokenUnavailable>> + Send {
        Broker::rejected(self, caller, generation)
    }
}

/// Everything a request needs from one config: built once per config, then read-only.
pub struct State {
    pub callers: Callers,
    pub routes: Routes,
    pub clients: forward::Clients,
    pub limits: Limits,
}

impl State {
    /// Indexes callers and routes and builds the upstream clients (reads CA files).
    pub fn from_config(config: &Config, metrics: &Arc<ProxyMetrics>) -> Result<State, StartError> {
        let (clients, client_of_route) =
            forward::Clients::from_config(config, metrics).map_err(StartError)?;
        let routes = config
            .routes
            .iter()
            .zip(client_of_route)
            .map(|(r, clients)| {
                let mut route = Route::new(r, clients.plain)?;
                route.upgrade_client = clients.upgrade;
                Ok(route)
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(StartError)?;
        Ok(State {
            callers: Callers::from_config(config),
            routes: Routes::new(routes),
            clients,
            limits: config.limits.clone(),
        })
    }
}

/// What every connection task shares.
pub(crate) struct Shared<T> {
    pub state: Arc<ArcSwap<State>>,
    pub tokens: Arc<T>,
    pub metrics: Arc<ProxyMetrics>,
}

/// The running proxy: every configured listener, bound.
pub struct ProxyHandle {
    addrs: Vec<(String, SocketAddr)>,
    /// Each TLS listener's name and config in force, for certificate reloads.
    tls: Vec<(String, ListenerTls)>,
    state: Arc<ArcSwap<State>>,
    accept_tasks: Vec<JoinHandle<()>>,
    /// Closes when every connection task has ended.
    drained: mpsc::Receiver<()>,
    shutdown: Shutdown,
    /// For the upstream clients of a reloaded config.
    metrics: Arc<ProxyMetrics>,
}

impl ProxyHandle {
    /// Binds every listener of `config` and starts serving until `shutdown`.
    pub async fn start(
        config: Arc<Config>,
        broker: Arc<Broker>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<ProxyHandle, StartError> {
        Self::start_with(config, broker, metrics, shutdown).await
    }

    /// [`ProxyHandle::start`] with any token source.
    pub async fn start_with<T: TokenSource>(
        config: Arc<Config>,
        tokens: Arc<T>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<ProxyHandle, StartError> {
        Self::start_on(config, tokens, metrics, shutdown, &[]).await
    }

    /// [`ProxyHandle::start_with`], serving on `workers` (the worker threads' runtimes, see
    /// [`crate::workers`]): every listener is bound once per worker, on one address with
    /// `SO_REUSEPORT`, and each socket has its accept loop, and its connections, on its worker.
    /// Empty: one socket and accept loop per listener on the current runtime. The connection
    /// limit, the state and the drain are the same for all.
    pub async fn start_on<T: TokenSource>(
        config: Arc<Config>,
        tokens: Arc<T>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
        workers: &[tokio::runtime::Handle],
    ) -> Result<ProxyHandle, StartError> {
        let metrics = metrics.set::<ProxyMetrics>();
        let state = Arc::new(ArcSwap::from_pointee(State::from_config(
            &config, &metrics,
        )?));
        let shared = Arc::new(Shared {
            state: state.clone(),
            tokens,
            metrics: metrics.clone(),
        });
        let (drain_tx, drained) = mpsc::channel(1);
        let listeners = listener::bind_all(&config, workers).await?;
        let addrs = listeners
            .iter()
            .map(|l| (l.name().to_string(), l.local_addr()))
            .collect();
        let tls = listeners
            .iter()
            .filter_map(|l| Some((l.name().to_string(), l.tls()?.clone())))
            .collect();
        let hard_stop = Shutdown::new();
        let accept_tasks = listener::spawn_all(
            listeners,
            &config.limits,
            shared,
            shutdown.clone(),
            hard_stop,
            drain_tx,
        );
        Ok(ProxyHandle {
            addrs,
            tls,
            state,
            accept_tasks,
            drained,
            shutdown,
            metrics,
        })
    }

    /// Listener names and the addresses they are bound to (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.addrs.clone()
    }

    /// Each TLS listener's name and its config in force (replaced on reload).
    pub fn listener_tls(&self) -> &[(String, ListenerTls)] {
        &self.tls
    }

    /// Swaps in a reloaded config (callers, routes, limits) for new requests. Listeners whose
    /// address changed are not rebound. A config whose upstream clients cannot be built is
    /// refused (logged) and the current one stays; see [`ProxyHandle::try_reconfigure`].
    pub fn reconfigure(&self, config: Arc<Config>) {
        if let Err(e) = self.try_reconfigure(&config) {
            tracing::error!(error = %e, "proxy kept its current config");
        }
    }

    /// Like [`ProxyHandle::reconfigure`], telling whether the config was applied.
    pub fn try_reconfigure(&self, config: &Config) -> Result<(), StartError> {
        let state = State::from_config(config, &self.metrics)?;
        self.state.store(Arc::new(state));
        Ok(())
    }

    /// Resolves when every listener (on every worker) has stopped and in-flight requests have
    /// drained (or the grace period passed) after shutdown was triggered.
    pub async fn wait(mut self) {
        self.shutdown.wait().await;
        for task in self.accept_tasks.drain(..) {
            let _ = task.await;
        }
        // Every connection task holds a sender; `None` once the last one has ended (they end at
        // the latest at the hard deadline).
        let _ = self.drained.recv().await;
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use std::time::Duration;

    use crate::config::*;
    use crate::secret::Secret;

    /// A minimal valid config: no listeners, callers or routes.
    pub fn config() -> Config {
        Config::minimal(IdentityConfig {
            base_url: "http://127.0.0.1:1".into(),
            tenant: "CUSTOMER".into(),
            client_id: "admin".into(),
            client_secret: Secret::new("secret"),
            scope: None,
            ca_file: None,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        })
    }
}
