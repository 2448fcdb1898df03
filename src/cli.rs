//! The command line: argument definitions (clap) and what each subcommand does. `main.rs` only
//! parses and calls [`execute`]. Exit codes: 0 success, 64 bad configuration or arguments (before
//! any port is bound), 1 a failure while running. Nothing here prints a secret.
//!
//! The runtimes are made here: `run` serves the proxy listeners on worker threads, one per usable
//! CPU unless `[limits] workers` says otherwise (`crate::workers`), and the rest on a
//! current_thread runtime; with one worker, and for the other commands, one runtime for
//! everything (see `block_on`).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Config, ConfigErrors};
use crate::emulator::EmulatorConfig;
use crate::seal::SealKey;
use crate::secret::Secret;

/// Exit code for a bad configuration or bad arguments (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "tokenbroker",
    version = env!("TOKENBROKER_VERSION"),
    about = "Token-brokering reverse proxy for VMware Identity Services",
    long_about = "Token-brokering reverse proxy for VMware Identity Services.\n\n\
        Services send plain HTTP(S) requests to tokenbroker; it recognises the caller (a key, a \
        client certificate or a dedicated listener), holds an API token for it, exchanges it for \
        short-lived access tokens, injects `Authorization: Bearer ...` and forwards the request \
        to the configured upstream.\n\n\
        Start with `tokenbroker dev` for a local demo, or `tokenbroker check --config FILE`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy until SIGTERM or SIGINT (drains in-flight requests); SIGHUP reloads the config.
    ///
    /// A config with problems is refused before any port is bound: every problem is printed and
    /// the exit code is 64.
    Run {
        /// The TOML configuration file (see config/tokenbroker.toml).
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Log one JSON object per line (overrides [logging] json).
        #[arg(long)]
        log_json: bool,
    },
    /// Check a configuration file and the secrets and files it refers to.
    ///
    /// Prints every problem, one per line, and exits with 64; or prints a one-line summary and
    /// exits with 0. Binds no port and calls no service.
    Check {
        /// The TOML configuration file.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Read a caller key on standard input and print its hash for `key_hashes`.
    ///
    /// Example: `printf '%s' "$KEY" | tokenbroker hash-key` prints `sha256:<64 hex digits>`.
    /// One trailing newline is ignored; an empty key is refused.
    HashKey,
    /// Print a new random seal key for `[store] seal_key` (32 bytes, base64) on standard output.
    ///
    /// Example: `tokenbroker gen-seal-key > seal.key && chmod 600 seal.key`, then
    /// `seal_key = { file = "seal.key" }`. Every replica needs the same key. To rotate, list
    /// the new one in `seal_keys` (docs/shared-store.md, "Rotating the seal key").
    GenSealKey,
    /// Run a local demo: the identity-service emulator, its echo upstream and the proxy.
    ///
    /// Uses config/dev.toml: the emulator on 127.0.0.1:7001, the echo upstream on
    /// 127.0.0.1:7002, the proxy on 127.0.0.1:8080 and the admin listener on 127.0.0.1:9090. Prints
    /// curl lines to try. Stops on Ctrl-C.
    Dev(DevArgs),
    /// Run the identity-service emulator alone, for the tests of other services.
    ///
    /// Serves the OAuth token endpoint and the api-tokens endpoints under /acs/t/<tenant>/, and
    /// its control API under /_emulator/. Stops on Ctrl-C or SIGTERM.
    Emulate(EmulateArgs),
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// The demo configuration.
    #[arg(long, short, value_name = "FILE", default_value = "config/dev.toml")]
    pub config: PathBuf,
    /// Bind every port on 0 (chosen by the system) and print the real addresses; for tests.
    #[arg(long, hide = true)]
    pub ephemeral_ports: bool,
}

#[derive(Debug, Args)]
pub struct EmulateArgs {
    /// Address to serve the identity API on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7001")]
    pub listen: SocketAddr,
    /// The tenant path segment.
    #[arg(long, default_value = config::DEFAULT_TENANT)]
    pub tenant: String,
    /// An OAuth client allowed to use client_credentials, as ID:SECRET. Repeat for more.
    /// (Visible to other local users in the process list: use test secrets only.)
    #[arg(long = "client", value_name = "ID:SECRET", required = true)]
    pub clients: Vec<String>,
    /// Real seconds per emulated TTL minute: 60 is real time, 1 makes tokens expire 60x faster.
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub seconds_per_minute: f64,
    /// Also serve an echo upstream here, which accepts only live access tokens and answers JSON.
    #[arg(long, value_name = "ADDR")]
    pub echo_upstream: Option<SocketAddr>,
    /// The echo upstream also accepts live API tokens as bearers (for inject = "api_token").
    #[arg(long)]
    pub echo_accepts_api_tokens: bool,
    /// Lifetime of admin bearers from client_credentials, in emulated minutes.
    #[arg(long, value_name = "N", default_value_t = 60)]
    pub admin_token_ttl_minutes: i64,
}

impl EmulateArgs {
    /// The emulator's configuration. An error message never repeats a `--client` value.
    pub fn to_config(&self) -> Result<EmulatorConfig, String> {
        let mut clients = Vec::new();
        for (i, text) in self.clients.iter().enumerate() {
            match text.split_once(':') {
                Some((id, secret)) if !id.is_empty() && !secret.is_empty() => {
                    clients.push((id.to_string(), Secret::new(secret)));
                }
                _ => return Err(format!("--client number {}: expected ID:SECRET", i + 1)),
            }
        }
        if !(self.seconds_per_minute > 0.0 && self.seconds_per_minute.is_finite()) {
            return Err("--seconds-per-minute must be greater than 0".to_string());
        }
        if self.admin_token_ttl_minutes < 1 {
            return Err("--admin-token-ttl-minutes must be at least 1".to_string());
        }
        Ok(EmulatorConfig {
            listen: self.listen,
            tenant: self.tenant.clone(),
            clients,
            seconds_per_minute: self.seconds_per_minute,
            admin_token_ttl_minutes: self.admin_token_ttl_minutes,
            echo_upstream: self.echo_upstream,
            echo_accepts_api_tokens: self.echo_accepts_api_tokens,
        })
    }
}

/// Runs one parsed command line.
pub fn execute(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config, log_json } => match config::load(&config) {
            Ok(config) => run(config, log_json),
            Err(errors) => {
                eprintln!("{}", problems(&errors));
                eprintln!("tokenbroker: not started");
                ExitCode::from(EXIT_USAGE)
            }
        },
        Command::Check { config } => match config::load(&config) {
            Ok(c) => {
                println!("{}: valid: {}", config.display(), summary(&c));
                ExitCode::SUCCESS
            }
            Err(errors) => {
                // `check | head` closes the pipe early: not a reason to panic.
                let _ = writeln!(std::io::stdout(), "{}", problems(&errors));
                ExitCode::from(EXIT_USAGE)
            }
        },
        Command::HashKey => {
            let mut input = Vec::new();
            if let Err(e) = std::io::stdin().read_to_end(&mut input) {
                eprintln!("tokenbroker: cannot read standard input: {e}");
                return ExitCode::FAILURE;
            }
            let input = zeroize::Zeroizing::new(input);
            match hash_key_line(&input) {
                Some(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("tokenbroker: no key on standard input (an empty key is refused)");
                    ExitCode::from(EXIT_USAGE)
                }
            }
        }
        Command::GenSealKey => {
            let key = SealKey::generate();
            // The key alone on standard output, so that `> seal.key` holds nothing else.
            if writeln!(std::io::stdout(), "{}", &*key.to_base64()).is_err() {
                eprintln!("tokenbroker: cannot write the key to standard output");
                return ExitCode::FAILURE;
            }
            eprintln!(
                "tokenbroker: new seal key (id {}); keep it secret, give every replica the same one: \
                 [store] seal_key = {{ file = \"seal.key\" }}",
                key.id()
            );
            ExitCode::SUCCESS
        }
        Command::Dev(args) => block_on(async move {
            match crate::dev::run(&args.config, args.ephemeral_ports).await {
                Ok(code) => code,
                Err(errors) => {
                    eprintln!("{}", problems(&errors));
                    ExitCode::from(EXIT_USAGE)
                }
            }
        }),
        Command::Emulate(args) => match args.to_config() {
            Ok(config) => block_on(crate::app::emulate(config)),
            Err(e) => {
                eprintln!("tokenbroker emulate: {e}");
                ExitCode::from(EXIT_USAGE)
            }
        },
    }
}

/// `sha256:<hex>` of the key in `input` (one trailing newline removed), or `None` if it is empty.
pub fn hash_key_line(input: &[u8]) -> Option<String> {
    let key = input.strip_suffix(b"\n").unwrap_or(input);
    let key = key.strip_suffix(b"\r").unwrap_or(key);
    (!key.is_empty()).then(|| config::format_key_hash(&config::key_hash(key)))
}

/// Every problem, one per line, then how many.
pub fn problems(errors: &ConfigErrors) -> String {
    let n = errors.0.len();
    let s = if n == 1 { "" } else { "s" };
    format!("{errors}\n{n} problem{s} found")
}

/// One line that says what a valid config sets up.
pub fn summary(c: &Config) -> String {
    let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    let admin = c
        .admin
        .as_ref()
        .map_or("no admin listener".to_string(), |a| {
            format!("admin on {}", a.addr)
        });
    let store = match (c.store.redis(), &c.store.seal_keys) {
        (Some(r), _) => {
            let servers = match &r.servers {
                crate::config::RedisServers::Single(_) => "redis".to_string(),
                crate::config::RedisServers::Sentinel { sentinels, .. } => {
                    format!("redis via {} sentinels", sentinels.len())
                }
                crate::config::RedisServers::Cluster(nodes) => {
                    format!("redis cluster ({} seed nodes)", nodes.len())
                }
            };
            format!(
                "store {servers} (prefix {}, lease {:?})",
                r.key_prefix, r.lease
            )
        }
        (None, Some(_)) => "store local (sealed)".to_string(),
        (None, None) => "store local".to_string(),
    };
    format!(
        "{}, {}, {}, {}, identity service {}, {}",
        count(c.listeners.len(), "listener"),
        count(c.callers.len(), "caller"),
        count(c.routes.len(), "route"),
        admin,
        c.identity.base_url,
        store
    )
}

/// `tokenbroker run`. With `[limits] workers` (0: one per usable CPU; 1 by default) above 1: the
/// proxy listeners are served by that many worker threads, each a current_thread runtime with its
/// own `SO_REUSEPORT` sockets (see [`crate::workers`]), and the control plane (broker renewals,
/// admin listener, reloads, signals, telemetry) by a current_thread runtime on this thread: it is
/// mostly asleep on timers, and a runtime of several threads would only add threads competing
/// with the workers for the same CPUs, and take the control plane's wake-ups to other threads.
/// With 1 worker (one usable CPU, or `workers = 1`): everything on one runtime, as [`block_on`]
/// picks it.
fn run(config: Config, log_json: bool) -> ExitCode {
    let n = crate::workers::count(config.limits.workers);
    if n <= 1 {
        return block_on(crate::app::run(config, log_json, &[]));
    }
    let workers = match crate::workers::Workers::start(n) {
        Ok(workers) => workers,
        Err(e) => {
            eprintln!("tokenbroker: cannot start the worker threads: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tokenbroker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(crate::app::run(config, log_json, workers.runtimes()));
    // The proxy has drained: the workers stop (idle upstream connections are dropped there), then
    // the control plane's runtime.
    workers.stop();
    drop(runtime);
    code
}

/// Runs the command on tokio: on one thread when the process may use one CPU only (a container's
/// quota of one, `taskset`), where the work-stealing scheduler would only add its cross-thread
/// bookkeeping and a second busy thread (BENCHMARKS.md measures the difference); otherwise on a
/// worker thread per CPU.
fn block_on(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = match one_cpu {
        true => tokio::runtime::Builder::new_current_thread(),
        false => tokio::runtime::Builder::new_multi_thread(),
    };
    match builder.enable_all().build() {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("tokenbroker: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn hash_key_ignores_one_newline_and_refuses_empty() {
        let line = hash_key_line(b"abc\n").unwrap();
        assert_eq!(
            line,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hash_key_line(b"abc").unwrap(), line);
        assert_eq!(hash_key_line(b""), None);
        assert_eq!(hash_key_line(b"\n"), None);
    }

    #[test]
    fn emulate_client_errors_do_not_repeat_the_value() {
        let args = Cli::parse_from([
            "tokenbroker",
            "emulate",
            "--client",
            "admin:secret",
            "--client",
            "only-a-secret-value",
        ]);
        let Command::Emulate(args) = args.command else {
            panic!("not emulate")
        };
        let err = args.to_config().unwrap_err();
        assert!(!err.contains("only-a-secret-value"), "{err}");
        assert!(err.contains("number 2"), "{err}");
    }
}
