//! Token records for the store tests: each `n` gives different tokens, whose secrets start with
//! [`API_SECRET`] and [`ACCESS_SECRET`] (so a dump can be searched for them in clear).

use std::time::{Duration, UNIX_EPOCH};

use tokenbroker::broker::store::{StoredAccessToken, StoredApiToken, StoredTokens};
use tokenbroker::secret::Secret;

pub const API_SECRET: &str = "vidb_api-token-secret-0123456789";
pub const ACCESS_SECRET: &str = "eyJhbGciOi.access-token-secret.sig";

/// Record `n`'s tokens.
pub fn tokens(n: u64) -> StoredTokens {
    StoredTokens {
        api: StoredApiToken {
            id: format!("token-id-{n}"),
            token: Secret::new(format!("{API_SECRET}-{n}")),
            suffix: format!("789-{n}"),
            client_id: None,
            expires: UNIX_EPOCH + Duration::from_millis(2_000_000_000_000 + n),
        },
        access: Some(StoredAccessToken {
            token: Secret::new(format!("{ACCESS_SECRET}-{n}")),
            expires: UNIX_EPOCH + Duration::from_millis(1_900_000_000_000 + n),
            generation: n,
        }),
    }
}
