//! tokenbroker: an authenticating reverse proxy that injects VMware Identity Services tokens.
//!
//! `main.rs` only parses the command line; everything lives here:
//! - [`config`]: TOML -> validated [`config::Config`]; below it `canonical` (request paths and
//!   authorities), [`claims`] (caller-sent headers a route may pass on) and `tls` (server and
//!   client TLS configs), which config checks with and the proxy serves with
//! - [`secret`]: the redacting secret type; [`seal`]: AEAD sealing of secrets at rest
//! - [`identity`]: the identity-service client
//! - [`token`]: what a request gets from the broker (inject token, unavailability, rejection)
//! - [`broker`]: token lifecycle (cache, refresh, recovery, persistence)
//! - [`proxy`]: listeners, caller identification, routing, header rewrite, forwarding
//! - [`admin`]: health, readiness, metrics, token status
//! - [`emulator`]: a strict emulator of the identity service and an echo upstream
//! - [`server`]: the shared accept loop and shutdown signal
//! - [`telemetry`]: OpenTelemetry traces (off unless `[telemetry]` is set)
//! - [`workers`]: the data path's worker threads, a runtime per core (`[limits] workers`)

pub mod admin;
pub mod app;
pub mod broker;
pub(crate) mod canonical;
pub mod claims;
pub mod cli;
pub mod config;
pub mod dev;
pub mod emulator;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod seal;
pub mod secret;
pub mod server;
pub mod telemetry;
pub(crate) mod tls;
pub mod token;
pub mod workers;
