//! Several real `tokenbroker run` processes sharing one emulator (in this test process) and one
//! `redis-server`: one config file each (same callers, routes and store; listeners and admin on
//! port 0, read back from the logs), requests spread over them, `/tokens`, `/metrics`, the
//! emulator's counters, `kill -9` and restart of one replica, a seal-key ring rolled through
//! the replicas, and `tokenbroker check` of a replica's config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;

use tokenbroker::config;
use tokenbroker::emulator::{Counters, Emulator, EmulatorConfig};
use tokenbroker::seal::SealKey;
use tokenbroker::secret::Secret;

use super::process::{logged_addr, Process, BIN};
use super::redis_server::RedisServer;
use super::{eventually, try_http, TIMEOUT};

const CLIENT_SECRET: &str = "cluster-admin-client-secret";
pub const KEY_PREFIX: &str = "tokenbroker:cluster:";

/// What the cluster looks like.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub replicas: usize,
    pub callers: usize,
    /// Real seconds per emulated TTL minute (1.0 makes tokens expire 60x faster).
    pub seconds_per_minute: f64,
    pub api_token_ttl_minutes: i64,
    pub access_token_ttl_minutes: i64,
    /// `[store] lease`.
    pub lease: String,
    /// `[store] kind = "redis"` (else the local default, each replica on its own).
    pub redis: bool,
    /// The `[store]` lines that name the Redis servers, instead of `url` of the harness's own
    /// `redis-server` (e.g. `sentinels = [...]` and `service_name`, or `cluster = [...]`).
    pub redis_servers: Option<String>,
    /// Appended to every replica's `[tokens]` section.
    pub tokens_extra: String,
    /// `[tokens] backoff_max`.
    pub backoff_max: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            replicas: 3,
            callers: 3,
            seconds_per_minute: 60.0,
            api_token_ttl_minutes: 60,
            access_token_ttl_minutes: 30,
            lease: "3s".to_string(),
            redis: true,
            redis_servers: None,
            tokens_extra: String::new(),
            backoff_max: "500ms".to_string(),
        }
    }
}

impl ClusterOptions {
    /// Short lifetimes: one second per emulated minute, so `api` and `access` seconds; renewal
    /// margins to match.
    pub fn short(api: i64, access: i64) -> ClusterOptions {
        ClusterOptions {
            seconds_per_minute: 1.0,
            api_token_ttl_minutes: api,
            access_token_ttl_minutes: access,
            tokens_extra: "min_margin = \"500ms\"\nexpiry_skew = \"500ms\"\n".into(),
            ..ClusterOptions::default()
        }
    }
}

/// One running replica.
pub struct Replica {
    pub process: Process,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
}

pub struct Cluster {
    pub emulator: Emulator,
    pub redis: RedisServer,
    pub options: ClusterOptions,
    dir: tempfile::TempDir,
    /// `None`: killed or stopped.
    replicas: Vec<Option<Replica>>,
    /// The seal-key files of the config written next (`seal_keys`, the first sealing); a
    /// single one is written as `seal_key`.
    pub seal_keys: Vec<String>,
}

/// The name of caller `i`.
pub fn caller_name(i: usize) -> String {
    format!("caller-{i:02}")
}

/// The caller key of caller `i` (`Proxy-Authorization: Bearer <key>`).
pub fn caller_key(i: usize) -> String {
    format!("cluster-key-{i:02}-0123456789abcdef")
}

impl Cluster {
    /// Starts the emulator, Redis and `options.replicas` replicas, and waits until each answers
    /// `/readyz`.
    pub async fn start(options: ClusterOptions) -> Cluster {
        let emulator = Emulator::start(EmulatorConfig {
            clients: vec![("admin".to_string(), Secret::new(CLIENT_SECRET))],
            echo_upstream: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            seconds_per_minute: options.seconds_per_minute,
            ..EmulatorConfig::default()
        })
        .await
        .expect("emulator");
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("client-secret"), CLIENT_SECRET).unwrap();
        let mut cluster = Cluster {
            emulator,
            redis,
            options,
            dir,
            replicas: Vec::new(),
            seal_keys: vec!["seal.key".to_string()],
        };
        cluster.new_seal_key("seal.key");
        for _ in 0..cluster.options.replicas {
            cluster.add_replica().await;
        }
        cluster
    }

    /// The config file of replica `i` (every replica's differs only in its file name).
    pub fn config_text(&self) -> String {
        let o = &self.options;
        let mut text = format!(
            r#"
[[listener]]
name = "plain"
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"

[identity]
base_url = "{base}"
client_id = "admin"
client_secret = {{ file = "client-secret" }}

[tokens]
api_token_ttl_minutes = {api}
access_token_ttl_minutes = {access}
backoff_initial = "50ms"
backoff_max = "{backoff_max}"
{tokens_extra}

[limits]
shutdown_grace = "2s"
"#,
            base = self.emulator.base_url(),
            api = o.api_token_ttl_minutes,
            access = o.access_token_ttl_minutes,
            tokens_extra = o.tokens_extra,
            backoff_max = o.backoff_max,
        );
        if o.redis {
            text.push_str(&format!(
                r#"
[store]
kind = "redis"
{servers}
key_prefix = "{KEY_PREFIX}"
{seal}
lease = "{lease}"
"#,
                servers = match &o.redis_servers {
                    Some(lines) => lines.clone(),
                    None => format!("url = \"{}\"", self.redis.url()),
                },
                lease = o.lease,
                seal = match &self.seal_keys[..] {
                    [one] => format!("seal_key = {{ file = \"{one}\" }}"),
                    ring => format!(
                        "seal_keys = [{}]",
                        ring.iter()
                            .map(|f| format!("{{ file = \"{f}\" }}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                },
            ));
        }
        let mut allow = Vec::new();
        for i in 0..o.callers {
            let hash = config::format_key_hash(&config::key_hash(caller_key(i).as_bytes()));
            text.push_str(&format!(
                "\n[[caller]]\nname = \"{}\"\nkey_hashes = [\"{hash}\"]\n",
                caller_name(i)
            ));
            allow.push(format!("\"{}\"", caller_name(i)));
        }
        text.push_str(&format!(
            "\n[[route]]\nname = \"echo\"\npath_prefix = \"/echo\"\nupstream = \"{}\"\nallow = [{}]\n",
            self.emulator.echo_url().expect("echo upstream"),
            allow.join(", ")
        ));
        text
    }

    /// Starts one more replica; returns its index.
    pub async fn add_replica(&mut self) -> usize {
        let i = self.replicas.len();
        let path = self.dir.path().join(format!("replica-{i}.toml"));
        std::fs::write(&path, self.config_text()).unwrap();
        self.replicas.push(Some(spawn(path).await));
        i
    }

    /// Writes a new random seal key into the file `name`; its key id.
    pub fn new_seal_key(&self, name: &str) -> String {
        let key = SealKey::generate();
        std::fs::write(self.dir.path().join(name), key.to_base64().as_bytes()).unwrap();
        key.id().to_string()
    }

    /// Rolls the config written now (e.g. new [`Cluster::seal_keys`]) through the running
    /// replicas, one at a time: SIGTERM, new config, start, ready. `load` runs beside each
    /// restart against the replicas that stay up (their proxy addresses); the statuses it got.
    pub async fn roll<F, Fut>(&mut self, load: F) -> Vec<u16>
    where
        F: Fn(Vec<SocketAddr>, tokio::sync::watch::Receiver<bool>) -> Fut,
        Fut: std::future::Future<Output = Vec<u16>> + Send + 'static,
    {
        let mut statuses = Vec::new();
        for i in self.running() {
            let others = self
                .running()
                .into_iter()
                .filter(|&j| j != i)
                .map(|j| self.replica(j).proxy)
                .collect();
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let running = tokio::spawn(load(others, stopped));
            assert_eq!(self.stop(i), Some(0), "replica {i} stops cleanly");
            let path = self.dir.path().join(format!("replica-{i}.toml"));
            std::fs::write(&path, self.config_text()).unwrap();
            self.restart(i).await;
            let _ = stop.send(true);
            statuses.extend(running.await.unwrap());
        }
        statuses
    }

    /// Starts replica `i` again (after [`Cluster::kill`] or [`Cluster::stop`]) with its config.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.replicas[i].is_none(), "replica {i} is running");
        let path = self.dir.path().join(format!("replica-{i}.toml"));
        self.replicas[i] = Some(spawn(path).await);
    }

    /// `kill -9` of replica `i`.
    pub fn kill(&mut self, i: usize) {
        self.replicas[i].take().expect("running").process.kill();
    }

    /// SIGTERM to replica `i`; its exit code.
    pub fn stop(&mut self, i: usize) -> Option<i32> {
        self.replicas[i].take().expect("running").process.stop()
    }

    pub fn replica(&self, i: usize) -> &Replica {
        self.replicas[i].as_ref().expect("running")
    }

    /// Indexes of the running replicas.
    pub fn running(&self) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&i| self.replicas[i].is_some())
            .collect()
    }

    pub fn counters(&self) -> Counters {
        self.emulator.counters()
    }

    /// One proxied request for caller `caller` through replica `i`: the status, or 0 for a
    /// transport failure.
    pub async fn request(&self, i: usize, caller: usize) -> u16 {
        let auth = format!("Bearer {}", caller_key(caller));
        let url = format!("http://{}/echo/x", self.replica(i).proxy);
        match try_http("GET", &url, &[("proxy-authorization", auth.as_str())], "").await {
            Ok((status, _, _)) => status.as_u16(),
            Err(_) => 0,
        }
    }

    /// `total` concurrent requests, spread round-robin over the running replicas and the
    /// callers; the statuses, in order.
    pub async fn spread(&self, total: usize) -> Vec<u16> {
        let running = self.running();
        let callers = self.options.callers;
        let requests = (0..total).map(|n| self.request(running[n % running.len()], n % callers));
        futures_util::future::join_all(requests).await
    }

    /// `GET` on replica `i`'s admin listener: status and body.
    pub async fn admin_get(&self, i: usize, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.replica(i).admin);
        match try_http("GET", &url, &[], "").await {
            Ok((status, _, body)) => (status.as_u16(), String::from_utf8_lossy(&body).into_owned()),
            Err(e) => panic!("GET {url}: {e}"),
        }
    }

    /// Replica `i`'s `/tokens`.
    pub async fn tokens(&self, i: usize) -> serde_json::Value {
        let (status, body) = self.admin_get(i, "/tokens").await;
        assert_eq!(status, 200, "{body}");
        super::json(body.as_bytes())
    }

    /// Caller `caller`'s API token id on every running replica.
    pub async fn api_token_ids(&self, caller: usize) -> Vec<Option<String>> {
        let mut ids = Vec::new();
        for i in self.running() {
            let tokens = self.tokens(i).await;
            let entry = tokens["callers"]
                .as_array()
                .expect("callers")
                .iter()
                .find(|c| c["caller"] == caller_name(caller).as_str())
                .cloned()
                .unwrap_or_default();
            ids.push(entry["api_token_id"].as_str().map(str::to_string));
        }
        ids
    }

    /// Replica `i`'s `/metrics`.
    pub async fn metrics(&self, i: usize) -> String {
        self.admin_get(i, "/metrics").await.1
    }

    /// `tokenbroker check` of replica `i`'s config.
    pub fn check(&self, i: usize) -> Output {
        let path = self.dir.path().join(format!("replica-{i}.toml"));
        std::process::Command::new(BIN)
            .args(["check", "--config"])
            .arg(path)
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    }

    /// Every output line replica `i` wrote since the last call (logs, for assertions on them).
    pub fn logs(&self, i: usize) -> Vec<String> {
        self.replica(i).process.drain()
    }
}

/// Requests round-robin over `proxies` and `callers` callers until `stop`, one at a time, one
/// every 20 ms at most: the statuses (0: a transport failure).
pub async fn load(
    proxies: Vec<SocketAddr>,
    callers: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<u16> {
    let mut statuses = Vec::new();
    let mut n = 0;
    let mut pace = super::pace(std::time::Duration::from_millis(20));
    while !*stop.borrow() {
        pace.tick().await;
        let auth = format!("Bearer {}", caller_key(n % callers));
        let url = format!("http://{}/echo/x", proxies[n % proxies.len()]);
        let status = match try_http("GET", &url, &[("proxy-authorization", &auth)], "").await {
            Ok((status, _, _)) => status.as_u16(),
            Err(_) => 0,
        };
        statuses.push(status);
        n += 1;
    }
    statuses
}

/// Starts `tokenbroker run` on `config` and waits for its listeners and `/readyz`.
pub async fn spawn(config: PathBuf) -> Replica {
    let process = Process::spawn(&["run", "--log-json", "--config", config.to_str().unwrap()]);
    let proxy = process.wait_for(|l| logged_addr(l, "proxy listening"));
    let admin =
        process.wait_for(|l| logged_addr(l, "admin listening (/healthz /readyz /metrics /tokens)"));
    let ready = eventually(TIMEOUT, || async {
        let url = format!("http://{admin}/readyz");
        matches!(try_http("GET", &url, &[], "").await, Ok((s, _, _)) if s.as_u16() == 200)
    })
    .await;
    assert!(
        ready,
        "replica with {} never became ready",
        config.display()
    );
    Replica {
        process,
        proxy,
        admin,
        config,
    }
}
