//! How the store reaches Redis, by `[store]`'s form:
//! - `url`: one server, through a reconnecting `ConnectionManager`;
//! - `sentinels` + `service_name`: the master the sentinels name. Its manager is dropped when a
//!   command fails as a vanished or demoted master fails (connection refused or dropped,
//!   `READONLY`), and the next command asks the sentinels again, so a failover is followed
//!   within the command's bound once the sentinels have promoted a replica;
//! - `cluster`: redis-rs's cluster connection (slots, `MOVED`/`ASK`, failovers). A caller's keys
//!   carry its name as a hash tag, so a script that touches its record and its lease runs on
//!   one node; the events channel is heard on every node (cluster pub/sub is broadcast).
//!
//! Must never: put a password into an error or a log line (the URLs carry none), or wait without
//! a bound (every caller bounds its command).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClientBuilder, ClusterConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use ::redis::{
    Client, Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult,
    TlsCertificates, TlsMode, Value,
};

use super::{describe, COMMAND_TIMEOUT, CONNECT_TIMEOUT};
use crate::broker::store::StoreError;
use crate::config::{RedisConfig, RedisServers};

/// The Redis servers of the store, as configured.
pub(super) enum Servers {
    Single {
        manager: ConnectionManager,
        client: Client,
    },
    Sentinel(Box<Sentinel>),
    Cluster {
        conn: ClusterConnection,
        /// One client per configured node, for the subscription (any node hears every event).
        nodes: Vec<Client>,
        /// The node the next subscription tries first.
        next: AtomicUsize,
    },
}

/// The master that the sentinels name, and the manager connected to it while it answers.
pub(super) struct Sentinel {
    sentinels: tokio::sync::Mutex<SentinelClient>,
    master: Mutex<Option<ConnectionManager>>,
    manager: ConnectionManagerConfig,
}

/// A connection for one command: to one server (or the sentinels' master), or to the cluster.
#[derive(Clone)]
pub(super) enum Conn {
    Manager(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_number_of_retries(1)
        .set_min_delay(std::time::Duration::from_millis(50))
        .set_max_delay(std::time::Duration::from_millis(500))
}

/// The CA the servers' certificates are checked against (`store.ca_file`), for `rediss://`.
fn certificates(config: &RedisConfig) -> Result<TlsCertificates, StoreError> {
    // redis-rs builds its rustls config from the process-wide provider: make it ring.
    let _ = crate::tls::provider();
    let root_cert = match &config.ca_file {
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            StoreError::Config(format!(
                "store.ca_file: cannot read {}: {e}",
                path.display()
            ))
        })?),
        None => None,
    };
    Ok(TlsCertificates {
        client_tls: None,
        root_cert,
    })
}

/// A client for one server's URL, with the store's credentials and, for `rediss://`, its CA.
fn client(url: &str, config: &RedisConfig) -> Result<Client, StoreError> {
    let info = url
        .into_connection_info()
        .map_err(|e| StoreError::Config(format!("store URL: {}", describe(&e))))?;
    let mut redis = info.redis_settings().clone();
    if let Some(name) = &config.username {
        redis = redis.set_username(name);
    }
    if let Some(password) = &config.password {
        redis = redis.set_password(password.expose());
    }
    let info = info.set_redis_settings(redis);
    if url.starts_with("rediss://") {
        Client::build_with_tls(info, certificates(config)?)
            .map_err(|e| StoreError::Config(format!("store TLS: {}", describe(&e))))
    } else {
        Client::open(info).map_err(|e| StoreError::Config(describe(&e)))
    }
}

impl Servers {
    /// Sets up the connections without reaching any server: each connects on first use.
    pub fn connect(config: &RedisConfig) -> Result<Servers, StoreError> {
        match &config.servers {
            RedisServers::Single(url) => {
                let client = client(url, config)?;
                let manager =
                    ConnectionManager::new_lazy_with_config(client.clone(), manager_config())
                        .map_err(|e| StoreError::Config(describe(&e)))?;
                Ok(Servers::Single { manager, client })
            }
            RedisServers::Sentinel {
                sentinels,
                service_name,
            } => Ok(Servers::Sentinel(Box::new(Sentinel {
                sentinels: tokio::sync::Mutex::new(sentinel_client(
                    sentinels,
                    service_name,
                    config,
                )?),
                master: Mutex::new(None),
                manager: manager_config(),
            }))),
            RedisServers::Cluster(urls) => {
                let mut builder = ClusterClientBuilder::new(urls.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(COMMAND_TIMEOUT)
                    .retries(2);
                if let Some(name) = &config.username {
                    builder = builder.username(name);
                }
                if let Some(password) = &config.password {
                    builder = builder.password(password.expose());
                }
                if config.servers.tls() {
                    builder = builder.tls(TlsMode::Secure).certs(certificates(config)?);
                }
                let cluster = builder
                    .build()
                    .map_err(|e| StoreError::Config(format!("store.cluster: {}", describe(&e))))?;
                let conn = cluster.get_pending_async_connection_with_config(
                    ClusterConfig::new()
                        .set_connection_timeout(CONNECT_TIMEOUT)
                        .set_response_timeout(COMMAND_TIMEOUT),
                );
                let nodes = urls
                    .iter()
                    .map(|url| client(url, config))
                    .collect::<Result<_, _>>()?;
                Ok(Servers::Cluster {
                    conn,
                    nodes,
                    next: AtomicUsize::new(0),
                })
            }
        }
    }

    /// Whether a caller's keys carry its name as a hash tag (a cluster: one slot per caller).
    pub fn hash_tagged(&self) -> bool {
        matches!(self, Servers::Cluster { .. })
    }

    /// Whether the master has replicas a write should reach before it counts (Sentinel).
    pub fn replicated(&self) -> bool {
        matches!(self, Servers::Sentinel(_))
    }

    /// A connection for the next command (for Sentinel, to the master it names now).
    pub async fn conn(&self) -> RedisResult<Conn> {
        match self {
            Servers::Single { manager, .. } => Ok(Conn::Manager(manager.clone())),
            Servers::Cluster { conn, .. } => Ok(Conn::Cluster(conn.clone())),
            Servers::Sentinel(sentinel) => sentinel.master().await.map(Conn::Manager),
        }
    }

    /// A command failed with `e`: with Sentinel, a master that vanished or was demoted is
    /// forgotten, so the next command asks the sentinels again. Returns whether the command is
    /// worth sending once more at once (each here is safe to repeat).
    pub fn failed(&self, e: &RedisError) -> bool {
        let dropped = e.is_connection_dropped() || e.is_io_error();
        match self {
            Servers::Sentinel(sentinel) => {
                let moved = dropped || e.is_connection_refusal() || e.code() == Some("READONLY");
                if moved {
                    sentinel.forget();
                }
                moved
            }
            _ => dropped,
        }
    }

    /// A client for the subscription: the server, the master the sentinels name now, or the
    /// next cluster node in turn (each (re)connection tries another).
    pub async fn subscription_client(&self) -> RedisResult<Client> {
        match self {
            Servers::Single { client, .. } => Ok(client.clone()),
            Servers::Sentinel(sentinel) => sentinel.sentinels.lock().await.async_get_client().await,
            Servers::Cluster { nodes, next, .. } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % nodes.len();
                Ok(nodes[i].clone())
            }
        }
    }
}

impl Sentinel {
    async fn master(&self) -> RedisResult<ConnectionManager> {
        if let Some(manager) = self
            .master
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Ok(manager);
        }
        // Asks the sentinels in turn for the master, and checks that it says it is one (ROLE).
        let client = self.sentinels.lock().await.async_get_client().await?;
        let manager = ConnectionManager::new_lazy_with_config(client, self.manager.clone())?;
        *self.master.lock().unwrap_or_else(|e| e.into_inner()) = Some(manager.clone());
        Ok(manager)
    }

    fn forget(&self) {
        *self.master.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The sentinels' client: the master's credentials and TLS from the store's settings (database 0;
/// the sentinels are asked without credentials).
fn sentinel_client(
    sentinels: &[String],
    service_name: &str,
    config: &RedisConfig,
) -> Result<SentinelClient, StoreError> {
    let bad = |e: RedisError| StoreError::Config(format!("store.sentinels: {}", describe(&e)));
    let mut addrs = Vec::new();
    for url in sentinels {
        let info = url.as_str().into_connection_info().map_err(bad)?;
        addrs.push(info.addr().clone());
    }
    let mut builder =
        SentinelClientBuilder::new(addrs, service_name, SentinelServerType::Master).map_err(bad)?;
    if let Some(name) = &config.username {
        builder = builder.set_client_to_redis_username(name);
    }
    if let Some(password) = &config.password {
        builder = builder.set_client_to_redis_password(password.expose());
    }
    if config.servers.tls() {
        let certs = certificates(config)?;
        builder = builder
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_redis_certificates(certs.clone())
            .set_client_to_sentinel_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_certificates(certs);
    }
    builder.build().map_err(bad)
}
