//! Every way a call to the identity service can fail, and what the broker should do about it.

use std::time::Duration;

/// What a failure means for the credential that was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Try again later with backoff: connect errors, timeouts, 5xx, 429, unusable bodies.
    Transient,
    /// The credential presented is invalid, expired, revoked or used up (400 `invalid_grant`,
    /// "invalid or expired"): obtain it anew (regenerate, then create).
    InvalidCredential,
    /// The bearer or client authentication was refused (401): renew the admin bearer once.
    Unauthorized,
    /// Any other refusal (400 `invalid_request`, 403, 404, 415...): a configuration problem;
    /// retrying the same request will not help, but the broker still backs off and reports.
    Refused,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot connect to the identity service: {0}")]
    Connect(String),
    #[error("the identity service did not answer within {0:?}")]
    Timeout(Duration),
    #[error("request to the identity service failed: {0}")]
    Transport(String),
    #[error(
        "the identity service answered {status}{}",
        describe(error, description)
    )]
    Status {
        status: u16,
        error: Option<String>,
        description: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("the identity service answered {status} with an unusable body: {reason}")]
    BadBody { status: u16, reason: String },
}

fn describe(error: &Option<String>, description: &Option<String>) -> String {
    match (error, description) {
        (Some(e), Some(d)) => format!(" {e}: {d}"),
        (Some(e), None) => format!(" {e}"),
        (None, Some(d)) => format!(": {d}"),
        (None, None) => String::new(),
    }
}

impl IdentityError {
    pub fn class(&self) -> ErrorClass {
        match self {
            IdentityError::Connect(_)
            | IdentityError::Timeout(_)
            | IdentityError::Transport(_)
            | IdentityError::BadBody { .. } => ErrorClass::Transient,
            IdentityError::Status {
                status,
                error,
                description,
                ..
            } => match *status {
                401 => ErrorClass::Unauthorized,
                429 | 500..=599 => ErrorClass::Transient,
                400 if is_invalid_credential(error.as_deref(), description.as_deref()) => {
                    ErrorClass::InvalidCredential
                }
                _ => ErrorClass::Refused,
            },
        }
    }

    /// The server's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            IdentityError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn is_invalid_credential(error: Option<&str>, description: Option<&str>) -> bool {
    error == Some("invalid_grant")
        || description.is_some_and(|d| d.to_ascii_lowercase().contains("invalid or expired"))
}

/// Makes a server-supplied text safe to log: bounded length, and any long unbroken run of
/// token-like characters (which could be a credential echoed back) replaced by `***`.
pub(crate) fn sanitize(text: &str) -> String {
    let bounded: String = text.chars().take(300).collect();
    bounded
        .split(' ')
        .map(|word| {
            let tokenish = word.len() >= 24
                && word
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.=+/#".contains(c));
            if tokenish {
                "***"
            } else {
                word
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16, error: Option<&str>, description: Option<&str>) -> IdentityError {
        IdentityError::Status {
            status,
            error: error.map(str::to_string),
            description: description.map(str::to_string),
            retry_after: None,
        }
    }

    #[test]
    fn classes() {
        assert_eq!(status(500, None, None).class(), ErrorClass::Transient);
        assert_eq!(status(503, None, None).class(), ErrorClass::Transient);
        assert_eq!(status(429, None, None).class(), ErrorClass::Transient);
        assert_eq!(status(401, None, None).class(), ErrorClass::Unauthorized);
        assert_eq!(
            status(400, Some("invalid_grant"), None).class(),
            ErrorClass::InvalidCredential
        );
        assert_eq!(
            status(400, None, Some("API Token is invalid or expired")).class(),
            ErrorClass::InvalidCredential
        );
        assert_eq!(
            status(400, Some("invalid_request"), None).class(),
            ErrorClass::Refused
        );
        assert_eq!(status(404, None, None).class(), ErrorClass::Refused);
        assert_eq!(
            IdentityError::Connect("refused".into()).class(),
            ErrorClass::Transient
        );
        let bad = IdentityError::BadBody {
            status: 200,
            reason: "not JSON".into(),
        };
        assert_eq!(bad.class(), ErrorClass::Transient);
    }

    #[test]
    fn display_carries_error_and_description() {
        let e = status(400, Some("invalid_grant"), Some("token expired"));
        assert_eq!(
            e.to_string(),
            "the identity service answered 400 invalid_grant: token expired"
        );
    }

    #[test]
    fn sanitize_hides_token_like_words() {
        let s = sanitize("bad token vidb_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0 given");
        assert_eq!(s, "bad token *** given");
        assert_eq!(sanitize(&"x".repeat(1000)).len(), 3);
    }
}
