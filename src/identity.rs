//! The VMware Identity Services client: the token endpoint (client_credentials and API-token
//! exchange) and the api-tokens endpoints (create, regenerate). It speaks the wire protocol of
//! `docs/identity-service.md`, turns answers into typed tokens with lifetimes counted on the
//! monotonic clock, and classifies every failure by operation and status (one table:
//! [`ErrorClass::of`]). It never caches and never retries: that is the broker's job.
//!
//! Must never: put a token or a secret into an error, a log line or a panic message.

mod client;
mod error;
mod operation;
pub mod wire;

pub use client::{AccessToken, ApiToken, CreateRequest, IdentityClient};
pub use error::{ErrorClass, IdentityError};
pub use operation::Operation;
