//! The VMware Identity Services client: the token endpoint (client_credentials and API-token
//! exchange) and the api-tokens endpoints (create, regenerate). It speaks the wire protocol of
//! `IDENTITY_API.md`, turns answers into typed tokens with lifetimes counted on the monotonic clock,
//! and classifies every failure. It never caches and never retries: that is the broker's job.

mod client;
mod error;
pub mod wire;

pub use client::{AccessToken, ApiToken, CreateRequest, IdentityClient};
pub use error::{ErrorClass, IdentityError};
