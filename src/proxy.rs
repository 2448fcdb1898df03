//! The proxy data path: listeners (plain, TLS, mTLS), caller identification, routing, header
//! rewrite, forwarding, error responses. (Interface; filled in by the proxy work.)

use std::net::SocketAddr;
use std::sync::Arc;

use crate::broker::Broker;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::server::Shutdown;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProxyError(pub String);

/// The running proxy: every configured listener, bound.
pub struct ProxyHandle {
    _private: (),
}

impl ProxyHandle {
    /// Binds every listener of `config` and starts serving until `shutdown`.
    pub async fn start(
        config: Arc<Config>,
        broker: Arc<Broker>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<ProxyHandle, ProxyError> {
        let _ = (config, broker, metrics, shutdown);
        todo!("proxy")
    }

    /// Listener names and the addresses they are bound to (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        todo!("proxy")
    }

    /// Swaps in a reloaded config (callers, routes, limits) for new requests. Listeners whose
    /// address changed are not rebound.
    pub fn reconfigure(&self, config: Arc<Config>) {
        let _ = config;
        todo!("proxy")
    }

    /// Resolves when every listener has stopped and in-flight requests have drained (or the
    /// grace period passed) after shutdown was triggered.
    pub async fn wait(self) {
        todo!("proxy")
    }
}
