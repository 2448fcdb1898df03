//! The four operations of the identity service the broker calls (docs/identity-service.md,
//! section 3). The client stamps every error answer with the operation it came from, because the
//! same status means different things for different operations; the emulator uses the same names
//! for its counters and faults.

/// One identity-service operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// `POST /token`, `grant_type=client_credentials`: the admin bearer.
    ClientCredentials,
    /// `POST /token`, the API-token grant: an API token becomes an access token.
    Exchange,
    /// `POST /api-tokens`: a new API token, with the admin bearer.
    Create,
    /// `POST /api-tokens/regenerate`: a new secret for a live API token, with the admin bearer.
    Regenerate,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::ClientCredentials,
        Operation::Exchange,
        Operation::Create,
        Operation::Regenerate,
    ];

    /// The name used in errors, logs, counters and the emulator's fault API.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::ClientCredentials => "client_credentials",
            Operation::Exchange => "exchange",
            Operation::Create => "create",
            Operation::Regenerate => "regenerate",
        }
    }

    /// The endpoint below `/acs/t/{tenant}`.
    pub fn path(self) -> &'static str {
        match self {
            Operation::ClientCredentials | Operation::Exchange => "/token",
            Operation::Create => "/api-tokens",
            Operation::Regenerate => "/api-tokens/regenerate",
        }
    }

    /// Whether it is a token-endpoint (RFC 6749) operation rather than an api-tokens one.
    pub fn is_token_endpoint(self) -> bool {
        matches!(self, Operation::ClientCredentials | Operation::Exchange)
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_serde() {
        for op in Operation::ALL {
            assert_eq!(
                serde_json::to_value(op).unwrap(),
                serde_json::Value::from(op.as_str())
            );
        }
    }
}
