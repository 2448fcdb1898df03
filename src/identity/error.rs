//! Every way a call to the identity service can fail, and what the broker should do about it.
//!
//! An error answer is classified by **operation and status** first ([`ErrorClass::of`], the table
//! of docs/identity-service.md section 5): several documented answers have no body at all, so the
//! body's `error` code only refines where the reference leaves room (the exchange's
//! `invalid_grant`). Server text is never matched.

use std::time::Duration;

use super::Operation;

/// What a failure means for the credential that was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Try again later with backoff: connect errors, timeouts, 408, 429, 5xx, and success answers
    /// whose body is unusable.
    Transient,
    /// The API token presented is invalid, expired, revoked or used up (exchange 400
    /// `invalid_grant`, any regenerate 400): obtain it anew (regenerate, then create).
    InvalidCredential,
    /// The admin bearer was refused (401 from create or regenerate): fetch a new admin bearer once.
    Unauthorized,
    /// Any other refusal (client_credentials 400/401, create 400, 403, 404, 415...): a
    /// configuration problem; retrying the same request will not help, but the broker still backs
    /// off and reports.
    Refused,
}

impl ErrorClass {
    /// The class of an error answer: `status` from `op`, with the body's `error` code if it had one.
    /// This is the whole table; docs/identity-service.md section 5 explains each row.
    pub fn of(op: Operation, status: u16, error: Option<&str>) -> ErrorClass {
        use ErrorClass::*;
        use Operation::*;
        match (op, status, error) {
            // Any operation: the service (or a proxy before it) is busy, down or slow.
            (_, 408 | 429 | 500..=599, _) => Transient,
            // The exchange's only credential is the API token: `invalid_grant` says it is dead
            // (RFC 6749 5.2 puts it on 400; a 401 naming it means the same).
            (Exchange, 400 | 401, Some("invalid_grant")) => InvalidCredential,
            // Any other exchange 400 (invalid_request, unsupported_grant_type, no body, HTML),
            // and a 401: we send no client authentication, so nothing to renew. Configuration.
            (Exchange, 400 | 401, _) => Refused,
            // Wrong client id / secret / scope: configuration; there is no bearer to renew.
            (ClientCredentials, 400 | 401, _) => Refused,
            // "the request is missing a required parameter": our request, not a credential.
            (Create, 400, _) => Refused,
            // "Auth token is missing or not valid": the admin bearer.
            (Create | Regenerate, 401, _) => Unauthorized,
            // "API Token is invalid or expired", documented without a body: whatever came with it.
            (Regenerate, 400, _) => InvalidCredential,
            // 403, 404, 405, 415, any other 4xx, a redirect: wrong URL, tenant or permissions.
            _ => Refused,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot connect to the identity service: {0}")]
    Connect(String),
    #[error("the identity service did not answer within {0:?}")]
    Timeout(Duration),
    #[error("request to the identity service failed: {0}")]
    Transport(String),
    /// An error answer. `error` and `description` are the body's (sanitized) fields, when it had
    /// a JSON body with them.
    #[error(
        "{op}: the identity service answered {status}{}",
        describe(error, description)
    )]
    Status {
        op: Operation,
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
        (None, None) => " (no error code)".to_string(),
    }
}

impl IdentityError {
    /// An error answer without details (for fakes and tests).
    pub fn status(op: Operation, status: u16) -> IdentityError {
        IdentityError::Status {
            op,
            status,
            error: None,
            description: None,
            retry_after: None,
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            IdentityError::Connect(_)
            | IdentityError::Timeout(_)
            | IdentityError::Transport(_)
            | IdentityError::BadBody { .. } => ErrorClass::Transient,
            IdentityError::Status {
                op, status, error, ..
            } => ErrorClass::of(*op, *status, error.as_deref()),
        }
    }

    /// The operation that was answered with an error status (`None` for other failures).
    pub fn op(&self) -> Option<Operation> {
        match self {
            IdentityError::Status { op, .. } => Some(*op),
            _ => None,
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

/// Makes a server-supplied text safe to log: bounded length, control characters (which could
/// forge log lines) turned into spaces, and any long unbroken run of token-like characters (which
/// could be a credential echoed back, quoted or not) replaced by `***`.
pub(crate) fn sanitize(text: &str) -> String {
    const MIN_TOKENISH: usize = 24;
    let tokenish = |c: char| c.is_ascii_alphanumeric() || "-_.=+/#".contains(c);
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= MIN_TOKENISH {
            out.push_str("***");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars().take(300) {
        if tokenish(c) {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(if c.is_control() { ' ' } else { c });
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorClass::*;
    use Operation::*;

    /// Every documented status of every operation, and the statuses any operation may meet,
    /// with and without a body `error` code: (operation, status, error code, class).
    const TABLE: &[(Operation, u16, Option<&str>, ErrorClass)] = &[
        // client_credentials: 400 invalid_request / invalid_scope / unsupported_grant_type,
        // 401 invalid_client: the configured client is wrong.
        (ClientCredentials, 400, Some("invalid_request"), Refused),
        (ClientCredentials, 400, Some("invalid_scope"), Refused),
        (
            ClientCredentials,
            400,
            Some("unsupported_grant_type"),
            Refused,
        ),
        (ClientCredentials, 400, Some("invalid_grant"), Refused),
        (ClientCredentials, 400, None, Refused),
        (ClientCredentials, 401, Some("invalid_client"), Refused),
        (ClientCredentials, 401, None, Refused),
        // exchange: invalid_grant = the API token is dead; anything else is configuration.
        (Exchange, 400, Some("invalid_grant"), InvalidCredential),
        (Exchange, 401, Some("invalid_grant"), InvalidCredential),
        (Exchange, 400, Some("invalid_request"), Refused),
        (Exchange, 400, Some("unsupported_grant_type"), Refused),
        (Exchange, 400, Some("invalid_scope"), Refused),
        (Exchange, 400, None, Refused),
        (Exchange, 401, Some("invalid_client"), Refused),
        (Exchange, 401, None, Refused),
        // create: 400 = our request; 401 = the admin bearer.
        (Create, 400, None, Refused),
        (Create, 400, Some("invalid_request"), Refused),
        (Create, 400, Some("invalid_grant"), Refused),
        (Create, 401, None, Unauthorized),
        (Create, 401, Some("invalid_token"), Unauthorized),
        // regenerate: 400 = the API token is invalid or expired, whatever the body; 401 = bearer.
        (Regenerate, 400, None, InvalidCredential),
        (Regenerate, 400, Some("invalid_request"), InvalidCredential),
        (Regenerate, 400, Some("invalid_grant"), InvalidCredential),
        (Regenerate, 401, None, Unauthorized),
        (Regenerate, 401, Some("invalid_token"), Unauthorized),
    ];

    /// Statuses with the same class for every operation, whatever the body.
    const ANY_OPERATION: &[(u16, ErrorClass)] = &[
        (408, Transient),
        (429, Transient),
        (500, Transient),
        (502, Transient),
        (503, Transient),
        (504, Transient),
        (599, Transient),
        (301, Refused),
        (403, Refused),
        (404, Refused),
        (405, Refused),
        (409, Refused),
        (415, Refused),
        (422, Refused),
    ];

    #[test]
    fn the_table() {
        for &(op, status, error, class) in TABLE {
            assert_eq!(
                ErrorClass::of(op, status, error),
                class,
                "{op} {status} {error:?}"
            );
        }
        for op in Operation::ALL {
            for &(status, class) in ANY_OPERATION {
                for error in [None, Some("invalid_grant"), Some("server_error")] {
                    assert_eq!(
                        ErrorClass::of(op, status, error),
                        class,
                        "{op} {status} {error:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn class_reads_operation_status_and_code_never_text() {
        let e = IdentityError::Status {
            op: Exchange,
            status: 400,
            error: Some("invalid_request".into()),
            description: Some("API Token is invalid or expired".into()),
            retry_after: None,
        };
        assert_eq!(e.class(), Refused, "the description is not read");
        assert_eq!(e.op(), Some(Exchange));
        assert_eq!(
            IdentityError::status(Regenerate, 400).class(),
            InvalidCredential
        );
        assert_eq!(IdentityError::status(Create, 400).class(), Refused);
        for other in [
            IdentityError::Connect("refused".into()),
            IdentityError::Timeout(Duration::from_secs(1)),
            IdentityError::Transport("reset".into()),
            IdentityError::BadBody {
                status: 200,
                reason: "not JSON".into(),
            },
        ] {
            assert_eq!(other.class(), Transient, "{other}");
            assert_eq!(other.op(), None);
        }
    }

    #[test]
    fn display_names_the_operation_and_what_came_back() {
        let e = IdentityError::Status {
            op: Exchange,
            status: 400,
            error: Some("invalid_grant".into()),
            description: Some("token expired".into()),
            retry_after: None,
        };
        assert_eq!(
            e.to_string(),
            "exchange: the identity service answered 400 invalid_grant: token expired"
        );
        assert_eq!(
            IdentityError::status(Regenerate, 400).to_string(),
            "regenerate: the identity service answered 400 (no error code)"
        );
    }

    #[test]
    fn sanitize_hides_token_like_runs() {
        let s = sanitize("bad token vidb_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0 given");
        assert_eq!(s, "bad token *** given");
        let quoted = sanitize("api_token \"vidb_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0\", bad");
        assert_eq!(quoted, "api_token \"***\", bad");
        assert_eq!(sanitize("line\nforged: yes"), "line forged: yes");
        assert_eq!(sanitize(&"x".repeat(1000)), "***");
        assert_eq!(
            sanitize("API Token is invalid or expired"),
            "API Token is invalid or expired"
        );
    }
}
