//! A real `redis-server` for the store tests (Debian package `redis-server`; `.ci/run` installs
//! it): on a free loopback port, persistence off, its own temporary folder and log file. It can
//! be stopped and started again on the same port, paused (SIGSTOP: a Redis that accepts
//! connections and never answers), and it is killed on drop. It also shows what is in it (a dump
//! of every key under a prefix) and how many commands it ran, by name. `redis_ha` builds a
//! cluster and a sentinel-watched master from these.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::io::{Read, Write};

/// How a server is started.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// `requirepass`: the default user needs this password.
    pub password: Option<String>,
    /// Serve TLS only, with `certs/server.pem` (CA `certs/ca.pem`); no plain port.
    pub tls: bool,
    /// More arguments (`--cluster-enabled yes`, `--replicaof 127.0.0.1 <port>`).
    pub args: Vec<String>,
}

pub struct RedisServer {
    port: u16,
    options: RedisOptions,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// A plain server without a password.
    pub fn start() -> RedisServer {
        RedisServer::start_with(RedisOptions::default())
    }

    pub fn start_with(options: RedisOptions) -> RedisServer {
        let port = free_port();
        let mut server = RedisServer {
            port,
            options,
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        server.resume_service();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The value of a plain key (e.g. who holds a lease).
    pub async fn get(&self, key: &str) -> Option<String> {
        let mut conn = self.connection().await;
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:<port>/0` (or `rediss://localhost:<port>/0` with TLS).
    pub fn url(&self) -> String {
        if self.options.tls {
            format!("rediss://localhost:{}/0", self.port)
        } else {
            format!("redis://127.0.0.1:{}/0", self.port)
        }
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Kills the server (SIGKILL: no shutdown, like a crash) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: persistence is off).
    pub fn restart(&mut self) {
        self.stop();
        self.resume_service();
    }

    /// SIGSTOP: connections are still accepted by the kernel, nothing is answered.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("server running");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    fn resume_service(&mut self) {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .args(["--daemonize", "no", "--protected-mode", "no"]);
        if self.options.tls {
            let cert = |name: &str| -> PathBuf { repo.join("certs").join(name) };
            cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert("server.pem"))
                .arg("--tls-key-file")
                .arg(cert("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(cert("ca.pem"))
                .args(["--tls-auth-clients", "no"]);
        } else {
            cmd.args(["--port", &self.port.to_string()]);
        }
        if let Some(password) = &self.options.password {
            cmd.args(["--requirepass", password]);
        }
        cmd.args(&self.options.args);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (Debian package redis-server; .ci/run installs it)");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the server answers PING (`-NOAUTH` counts: it is up) or, with TLS, accepts
    /// TCP connections.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.answers() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200))
        else {
            return false;
        };
        if self.options.tls {
            return self.log().contains("Ready to accept connections");
        }
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut answer = [0u8; 64];
        match stream.read(&mut answer) {
            Ok(n) => answer[..n].starts_with(b"+PONG") || answer[..n].starts_with(b"-NOAUTH"),
            Err(_) => false,
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused server must be able to die.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGCONT) };
        }
        self.stop();
    }
}

impl RedisServer {
    /// A plain connection of the test's own (not the store's), with the server's password.
    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let mut url = self.url();
        if let Some(pw) = &self.options.password {
            url = url.replacen("://", &format!("://:{pw}@"), 1);
        }
        let client = if self.options.tls {
            let ca = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/ca.pem"));
            let certs = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.expect("certs/ca.pem")),
            };
            redis::Client::build_with_tls(url.as_str(), certs).expect("TLS client")
        } else {
            redis::Client::open(url).expect("client")
        };
        client
            .get_multiplexed_async_connection()
            .await
            .expect("a connection to the test's redis-server")
    }

    /// Every key under `prefix`, one line each: `<key> <type> <value>` (GET of strings, HGETALL
    /// of hashes), sorted. What an operator with a Redis dump would see.
    pub async fn dump(&self, prefix: &str) -> String {
        let mut conn = self.connection().await;
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.sort();
        let mut dump = String::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let command = match kind.as_str() {
                "hash" => "HGETALL",
                "string" => "GET",
                // Expired (a lease's TTL) between KEYS and TYPE: no longer in the store.
                "none" => continue,
                other => panic!("{key} is a {other}: the store writes hashes and strings only"),
            };
            let value: redis::Value = redis::cmd(command)
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            let value = text(&value);
            dump.push_str(&format!("{key} {kind} {value}\n"));
        }
        dump
    }

    /// How often each command ran since start (`INFO commandstats`), by lower-case name.
    pub async fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        let mut conn = self.connection().await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .filter_map(|line| {
                let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
                Some((name.to_string(), calls.parse().ok()?))
            })
            .collect()
    }
}

/// A reply as text: bulk strings as (lossy) UTF-8, so that a secret in clear would show as such.
fn text(value: &redis::Value) -> String {
    use redis::Value;
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(n) => n.to_string(),
        Value::Nil => "(nil)".to_string(),
        Value::Array(items) | Value::Set(items) => {
            items.iter().map(text).collect::<Vec<_>>().join(" ")
        }
        Value::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| format!("{} {}", text(k), text(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => format!("{other:?}"),
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
