//! The `tokenbroker` binary as a child process: its output read line by line in the background,
//! signals sent to it, and the addresses it logs (`run --log-json`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use super::TIMEOUT;

/// A child process whose standard error is read line by line in the background.
pub struct Process {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Process {
    /// `tokenbroker ARGS`, without `RUST_LOG`.
    pub fn spawn(args: &[&str]) -> Process {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tokenbroker"));
        command.args(args).env_remove("RUST_LOG");
        Process::start(command)
    }

    /// Any command, with its output read the same way.
    pub fn start(mut command: Command) -> Process {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Process { child, lines }
    }

    /// The next output line (stdout or stderr) for which `pick` gives something.
    pub fn wait_for<T>(&self, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(found) = pick(&line) {
                        return found;
                    }
                    seen.push(line);
                }
                Err(_) => panic!("not seen; output so far:\n{}", seen.join("\n")),
            }
        }
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Sends SIGTERM and returns the exit code.
    pub fn stop(mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        self.child.wait().unwrap().code()
    }
}

/// The address in a JSON log line with this message (`run --log-json`).
pub fn logged_addr(line: &str, message: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if v["fields"]["message"] != message {
        return None;
    }
    v["fields"]["addr"].as_str()?.parse().ok()
}
