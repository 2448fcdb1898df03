//! What a request gets from the broker: the inject token, why there is none, and what to do
//! after an upstream 401. The broker produces these; the proxy consumes them.

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

/// What to do after an upstream refused a token with 401.
#[derive(Debug)]
pub enum Rejection {
    /// Send the request again with this (renewed) token.
    Replay(Arc<InjectToken>),
    /// Pass the 401 on: the renewal for this generation gave no newer token, or the caller
    /// renewed on a 401 less than `tokens.min_renew_interval` ago.
    PassOn,
}
