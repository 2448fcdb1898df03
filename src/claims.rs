//! Caller claims: headers a caller may send that upstreams take as a proxy's word, and which of
//! them a route passes on (`pass_caller_headers`). Config checks route settings against this list;
//! the proxy's rewrite drops the rest.

use http::HeaderName;

/// Headers a caller may send that upstreams take as a proxy's word: a rewritten or original URL
/// (`X-Original-URL`, `X-Rewrite-URL`, `X-Forwarded-Prefix`), another method
/// (`X-HTTP-Method-Override`), a verified client certificate (`X-Forwarded-Client-Cert`,
/// `X-SSL-Client-*`: every header with that prefix), an authenticated user (`X-Forwarded-User`)
/// or a client address (`True-Client-IP`, `X-Client-IP`, `CF-Connecting-IP`). Dropped unless the
/// route names them in `pass_caller_headers` (a [`PassedClaims`]).
pub const CALLER_CLAIMS: [&str; 10] = [
    "x-original-url",
    "x-rewrite-url",
    "x-forwarded-prefix",
    "x-http-method-override",
    "x-forwarded-client-cert",
    SSL_CLIENT,
    "x-forwarded-user",
    "true-client-ip",
    "x-client-ip",
    "cf-connecting-ip",
];

/// The entry of [`CALLER_CLAIMS`] that stands for every header starting with `x-ssl-client-`.
const SSL_CLIENT: &str = "x-ssl-client-*";

/// The index in [`CALLER_CLAIMS`] of the claim header `name` (lower case, as `HeaderName`s are).
fn claim(name: &str) -> Option<usize> {
    if name.starts_with(SSL_CLIENT.trim_end_matches('*')) {
        return CALLER_CLAIMS.iter().position(|c| *c == SSL_CLIENT);
    }
    CALLER_CLAIMS.iter().position(|c| *c == name)
}

/// Which [`CALLER_CLAIMS`] a route passes on to its upstream as the caller sent them: one bit each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassedClaims(u16);

impl PassedClaims {
    /// None: every claim is dropped (the default).
    pub const NONE: PassedClaims = PassedClaims(0);
    /// Every claim (for responses, where none is dropped).
    pub const ALL: PassedClaims = PassedClaims(u16::MAX);

    /// The set naming `names` (entries of [`CALLER_CLAIMS`], any case), or the first name that
    /// is none of them.
    pub fn of<'n>(names: impl IntoIterator<Item = &'n str>) -> Result<PassedClaims, &'n str> {
        let mut set = PassedClaims::NONE;
        for name in names {
            let lower = name.to_ascii_lowercase();
            let i = CALLER_CLAIMS.iter().position(|c| *c == lower).ok_or(name)?;
            set.0 |= 1 << i;
        }
        Ok(set)
    }

    /// Whether the header `name` is a claim this set does not pass on.
    pub fn drops(self, name: &HeaderName) -> bool {
        self != PassedClaims::ALL && claim(name.as_str()).is_some_and(|i| self.0 & (1 << i) == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_caller_claims_can_be_passed() {
        assert_eq!(PassedClaims::of([]), Ok(PassedClaims::NONE));
        assert!(PassedClaims::of(CALLER_CLAIMS).is_ok());
        assert_eq!(
            PassedClaims::of(["true-client-ip", "authorization"]),
            Err("authorization")
        );
        assert_eq!(
            PassedClaims::of(["x-ssl-client-verify"]),
            Err("x-ssl-client-verify")
        );
        assert_eq!(
            PassedClaims::of(["x-forwarded-for"]),
            Err("x-forwarded-for")
        );
    }
}
