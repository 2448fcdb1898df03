//! The token broker: for every caller, a valid credential ready to inject. (Interface; filled in
//! by the token-lifecycle work.)

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

/// What a request injects: a ready `Authorization` value (marked sensitive) and the generation it
/// belongs to, so that an upstream 401 can invalidate exactly that generation.
#[derive(Debug)]
pub struct InjectToken {
    pub header: HeaderValue,
    pub generation: u64,
}

/// No valid token can be had for the caller right now.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no valid token for caller {caller}: {reason}")]
pub struct TokenUnavailable {
    pub caller: String,
    pub reason: String,
    pub retry_after: Duration,
}

pub type TokenResult = Result<Arc<InjectToken>, TokenUnavailable>;
