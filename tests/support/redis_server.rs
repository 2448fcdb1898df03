//! A real `redis-server` for the store tests (Debian package `redis-server`; `.ci/run` installs
//! it): on a free loopback port, persistence off, its own temporary folder and log file. It can
//! be stopped and started again on the same port, paused (SIGSTOP: a Redis that accepts
//! connections and never answers), and it is killed on drop.

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

    /// Every key under `prefix` with its type and value, one per line: what a Redis dump shows.
    pub async fn dump(&self, prefix: &str) -> String {
        let mut conn = redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut dump = String::new();
        for k in &keys {
            let kind: String = redis::cmd("TYPE")
                .arg(k)
                .query_async(&mut conn)
                .await
                .unwrap();
            let command = match kind.as_str() {
                "hash" => "HGETALL",
                "string" => "GET",
                other => panic!("{k} is a {other}"),
            };
            let value: redis::Value = redis::cmd(command)
                .arg(k)
                .query_async(&mut conn)
                .await
                .unwrap();
            dump.push_str(&format!("{k} {kind} {value:?}\n"));
        }
        dump
    }

    /// The value of a plain key (e.g. who holds a lease).
    pub async fn get(&self, key: &str) -> Option<String> {
        let mut conn = redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
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

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
