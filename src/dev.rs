//! `tokenbroker dev`: a local demo in one command. Starts the identity-service emulator and its
//! echo upstream, then the proxy with `config/dev.toml` (whose identity service and routes are
//! pointed at them), and prints curl lines to try. The demo key and client secret are published
//! on purpose; nothing here is for production.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::app::{self, AppHandle};
use crate::config::{self, Config, ConfigErrors};
use crate::emulator::{Emulator, EmulatorConfig};

/// The demo caller's key; `config/dev.toml` lists its sha256.
pub const DEMO_KEY: &str = "tb-demo-key-not-for-production";

const EMULATOR_ADDR: &str = "127.0.0.1:7001";
const ECHO_ADDR: &str = "127.0.0.1:7002";

/// Runs the demo with the config at `config` until Ctrl-C or SIGTERM; with `ephemeral_ports`,
/// every port is bound on 0 and the real addresses are printed. A config that does not load is
/// handed back, for the command line to report.
pub async fn run(config: &Path, ephemeral_ports: bool) -> Result<ExitCode, ConfigErrors> {
    let path = dev_config_path(config);
    let mut config = config::load(&path)?;
    app::init_tracing(&config.logging, false);
    let Some(mut signals) = app::Signals::install() else {
        return Ok(ExitCode::FAILURE);
    };

    let port = |fixed: &str| {
        let addr: std::net::SocketAddr = fixed.parse().expect("fixed demo address");
        if ephemeral_ports {
            std::net::SocketAddr::new(addr.ip(), 0)
        } else {
            addr
        }
    };
    let emulator = match Emulator::start(EmulatorConfig {
        listen: port(EMULATOR_ADDR),
        tenant: config.identity.tenant.clone(),
        clients: vec![(
            config.identity.client_id.clone(),
            config.identity.client_secret.clone(),
        )],
        seconds_per_minute: 60.0,
        echo_upstream: Some(port(ECHO_ADDR)),
        ..EmulatorConfig::default()
    })
    .await
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!(
                "tokenbroker dev: the emulator could not start on {EMULATOR_ADDR}/{ECHO_ADDR}: {e}"
            );
            return Ok(ExitCode::FAILURE);
        }
    };
    let echo = emulator.echo_addr().expect("echo upstream was asked for");
    point_at_emulator(&mut config, &emulator.base_url(), echo, ephemeral_ports);

    let app = match AppHandle::start(config).await {
        Ok(app) => app,
        Err(e) => {
            eprintln!("tokenbroker dev: {e}");
            emulator.shutdown().await;
            return Ok(ExitCode::FAILURE);
        }
    };
    app::announce(&app);
    println!("{}", banner(&app, &emulator.base_url(), echo));
    signals.serve(&app).await;
    app.shutdown().await;
    emulator.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// `config/dev.toml` as given; else the one in the source tree this binary was built from (so
/// that `cargo run -- dev` works from any folder of the checkout).
fn dev_config_path(given: &Path) -> PathBuf {
    let built_with = Path::new(env!("CARGO_MANIFEST_DIR")).join(given);
    if !given.exists() && given.is_relative() && built_with.exists() {
        built_with
    } else {
        given.to_path_buf()
    }
}

/// Points the identity service and every route at the emulator actually started, and moves the
/// proxy and admin listeners to port 0 when asked (tests).
fn point_at_emulator(
    config: &mut Config,
    base_url: &str,
    echo: std::net::SocketAddr,
    ephemeral: bool,
) {
    config.identity.base_url = base_url.to_string();
    let echo_url: http::Uri = format!("http://{echo}")
        .parse()
        .expect("an address makes a URL");
    for route in &mut config.routes {
        route.upstream = echo_url.clone();
    }
    if ephemeral {
        for l in &mut config.listeners {
            l.addr.set_port(0);
        }
        if let Some(a) = &mut config.admin {
            a.addr.set_port(0);
        }
    }
}

/// `config/../certs` -> `certs`, for paths shown to people.
fn lexically_clean(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// What to try, with the real addresses.
fn banner(app: &AppHandle, emulator: &str, echo: std::net::SocketAddr) -> String {
    let mut out = String::new();
    out.push_str("tokenbroker dev is running (DEV ONLY: the demo key and secrets are published)\n");
    out.push_str(&format!("  identity-service emulator  {emulator}\n"));
    out.push_str(&format!("  echo upstream              http://{echo}\n"));
    for (name, addr) in app.proxy_addrs() {
        out.push_str(&format!("  proxy listener {name:<11} {addr}\n"));
    }
    if let Some(admin) = app.admin_addr() {
        out.push_str(&format!("  admin                      http://{admin}\n"));
    }
    out.push_str(&format!("\ndemo caller key: {DEMO_KEY}\n\nTry:\n"));
    let config = app.config();
    for l in &config.listeners {
        let Some(addr) = app.proxy_addr(&l.name) else {
            continue;
        };
        match &l.tls {
            None => out.push_str(&format!(
                "  curl -s -H 'Proxy-Authorization: Bearer {DEMO_KEY}' http://{addr}/hello\n"
            )),
            Some(tls) if tls.client_ca.is_some() => {
                let certs = lexically_clean(tls.cert.parent().unwrap_or(Path::new(".")));
                let ca = certs.join("ca.pem");
                out.push_str(&format!(
                    "  curl -s --cacert {} --cert {} --key {} https://{addr}/hello\n",
                    ca.display(),
                    certs.join("client.pem").display(),
                    certs.join("client.key").display(),
                ));
            }
            Some(_) => {}
        }
    }
    if let Some(admin) = app.admin_addr() {
        out.push_str(&format!("  curl -s http://{admin}/tokens\n"));
        out.push_str(&format!("  curl -s http://{admin}/metrics\n"));
    }
    out.push_str("\nCtrl-C stops everything.");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_paths_lose_dot_dot() {
        assert_eq!(
            lexically_clean(Path::new("config/../certs")),
            Path::new("certs")
        );
        assert_eq!(
            lexically_clean(Path::new("/a/b/../c/./d")),
            Path::new("/a/c/d")
        );
        assert_eq!(
            lexically_clean(Path::new("../certs")),
            Path::new("../certs")
        );
    }
}
