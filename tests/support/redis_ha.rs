//! Redis as operators run it for high availability, from real processes on loopback: a Redis
//! Cluster of three masters (`redis-server --cluster-enabled yes`, joined with
//! `redis-cli --cluster create`), and a master with one replica watched by `redis-sentinel`
//! (quorum 1, a master down after 1 s is failed over). Everything is killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::{free_port, RedisOptions, RedisServer};

/// Keys of a caller: the cluster's keys put the caller's name in braces (a hash tag).
pub fn tagged(caller: &str) -> String {
    format!("{{{caller}}}")
}

/// Runs a `redis-cli` command against `port`; its standard output.
fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli is installed (Debian package redis-tools, with redis-server)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` every 50 ms until it holds or 20 s pass; panics with `what` then.
fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three masters sharing the 16384 slots, no replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(RedisOptions {
                    args: [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ]
                    .map(String::from)
                    .to_vec(),
                    ..RedisOptions::default()
                })
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let created = cli(nodes[0].port(), &args);
        assert!(
            created.contains("All 16384 slots covered"),
            "redis-cli --cluster create:\n{created}"
        );
        for node in &nodes {
            wait_until("cluster_state:ok on every node", || {
                cli(node.port(), &["cluster", "info"]).contains("cluster_state:ok")
            });
        }
        RedisCluster { nodes }
    }

    /// The nodes' URLs, for `[store] cluster`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    /// How many keys starting with `prefix` each node holds.
    pub fn keys_per_node(&self, prefix: &str) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|n| {
                cli(n.port(), &["--scan", "--pattern", &format!("{prefix}*")])
                    .lines()
                    .filter(|l| !l.is_empty())
                    .count()
            })
            .collect()
    }
}

/// A master, its replica, and one sentinel watching them as `service_name`.
pub struct Sentinel {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub port: u16,
    pub service_name: String,
    dir: tempfile::TempDir,
    child: Child,
}

impl Sentinel {
    pub fn start(service_name: &str) -> Sentinel {
        let master = RedisServer::start();
        let replica = RedisServer::start_with(RedisOptions {
            args: vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                master.port().to_string(),
            ],
            ..RedisOptions::default()
        });
        wait_until("the replica in sync with the master", || {
            cli(replica.port(), &["info", "replication"]).contains("master_link_status:up")
        });
        let port = free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let conf: PathBuf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                 logfile {dir}/sentinel.log\n\
                 sentinel monitor {service_name} 127.0.0.1 {master} 1\n\
                 sentinel down-after-milliseconds {service_name} 1000\n\
                 sentinel failover-timeout {service_name} 5000\n",
                dir = dir.path().display(),
                master = master.port(),
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs as a sentinel (`--sentinel`)");
        let sentinel = Sentinel {
            master,
            replica,
            port,
            service_name: service_name.to_string(),
            dir,
            child,
        };
        wait_until("the sentinel sees the replica", || {
            cli(port, &["sentinel", "replicas", service_name]).contains("slave")
        });
        sentinel
    }

    /// The sentinel's URL, for `[store] sentinels`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port of the master the sentinel names now.
    pub fn master_port(&self) -> Option<u16> {
        let answer = cli(
            self.port,
            &["sentinel", "get-master-addr-by-name", &self.service_name],
        );
        answer.lines().nth(1)?.trim().parse().ok()
    }

    /// Kills the master (SIGKILL) and waits until the sentinel has promoted the replica.
    pub fn fail_over(&mut self) {
        self.master.stop();
        let replica = self.replica.port();
        wait_until("the sentinel promoting the replica", || {
            self.master_port() == Some(replica) && cli(replica, &["role"]).starts_with("master")
        });
    }

    /// The sentinel's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
