//! Caller identification: who is calling, decided before anything else happens to a request.
//!
//! In order: the caller a listener is bound to; else the verified client certificate's identities
//! (URI SANs, DNS SANs, CN) mapped through `cert_identities`, which must all name the same caller; else a caller key presented
//! as `Proxy-Authorization: Bearer <key>`, hashed with SHA-256 and looked up among the configured
//! key hashes.
//!
//! One identity or none: two `Proxy-Authorization` headers, a certificate whose identities map to
//! two callers, or a key naming another caller than the certificate are ambiguous (401), whichever
//! would have come first.
//!
//! The key table is keyed by the SHA-256 digest of the key. A lookup's timing can only tell an
//! attacker something about the digest of a key they chose, which does not help them find a valid
//! key (that would need a preimage); the final comparison of the 32 digest bytes is still done in
//! constant time with `subtle`.
//!
//! Must never: keep, log or return a caller key (only its digest is compared and then dropped), or
//! let a request through without a caller.

use std::collections::HashMap;
use std::sync::Arc;

use http::header::PROXY_AUTHORIZATION;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ProxyError;
use crate::config::{CertIdentity, Config};

/// What the proxy knows about one client connection, fixed at accept time.
#[derive(Debug, Clone)]
pub struct ConnIdentity {
    /// Name of the listener the connection arrived on.
    pub listener: Arc<str>,
    /// Identities of the verified client certificate (URI SANs, DNS SANs, CN, in that order);
    /// empty without mTLS.
    pub cert: Vec<CertIdentity>,
}

/// The callers of one config, indexed for identification.
#[derive(Debug, Default)]
pub struct Callers {
    /// Listener name -> the caller it is bound to.
    bound: HashMap<Arc<str>, Arc<str>>,
    by_cert: HashMap<CertIdentity, Arc<str>>,
    /// SHA-256 of a caller key -> caller.
    by_key: HashMap<[u8; 32], Arc<str>>,
}

pub const UNKNOWN_KEY: &str = "the caller key is not recognised";
pub const UNKNOWN_CERT: &str = "the client certificate does not belong to a known caller";
pub const NO_IDENTITY: &str =
    "no caller identity: present a client certificate or Proxy-Authorization: Bearer <key>";
pub const BAD_SCHEME: &str = "Proxy-Authorization must be: Bearer <caller key>";
pub const AMBIGUOUS: &str =
    "more than one caller identity: send one Proxy-Authorization, or one that matches the certificate";

impl Callers {
    pub fn from_config(config: &Config) -> Callers {
        let mut callers = Callers::default();
        for c in &config.callers {
            let name: Arc<str> = Arc::from(c.name.as_str());
            for hash in &c.key_hashes {
                callers.by_key.insert(*hash, name.clone());
            }
            for id in &c.cert_identities {
                callers.by_cert.insert(id.clone(), name.clone());
            }
        }
        for l in &config.listeners {
            if let Some(caller) = &l.caller {
                callers
                    .bound
                    .insert(Arc::from(l.name.as_str()), Arc::from(caller.as_str()));
            }
        }
        callers
    }

    /// The caller with this key, comparing digests in constant time.
    pub fn by_key(&self, key: &[u8]) -> Option<&Arc<str>> {
        let digest: [u8; 32] = Sha256::digest(key).into();
        let (stored, caller) = self.by_key.get_key_value(&digest)?;
        bool::from(stored.ct_eq(&digest)).then_some(caller)
    }
}

/// Identifies the caller of a request. The returned name lives as long as the `Callers` table.
pub fn identify<'a>(
    callers: &'a Callers,
    conn: &ConnIdentity,
    headers: &HeaderMap,
) -> Result<&'a Arc<str>, ProxyError> {
    if let Some(caller) = callers.bound.get(&conn.listener) {
        return Ok(caller);
    }
    let mut presented = headers.get_all(PROXY_AUTHORIZATION).iter();
    let presented = match (presented.next(), presented.next()) {
        (_, Some(_)) => return Err(ProxyError::UnknownCaller(AMBIGUOUS)),
        (one, None) => one,
    };
    let by_key = |value: &http::HeaderValue| {
        let key = bearer(value.as_bytes()).ok_or(ProxyError::UnknownCaller(BAD_SCHEME))?;
        callers
            .by_key(key)
            .ok_or(ProxyError::UnknownCaller(UNKNOWN_KEY))
    };
    if let Some(caller) = by_cert(callers, &conn.cert)? {
        return match presented {
            Some(value) if by_key(value).ok() != Some(caller) => {
                Err(ProxyError::UnknownCaller(AMBIGUOUS))
            }
            _ => Ok(caller),
        };
    }
    match presented {
        Some(value) => by_key(value),
        None if !conn.cert.is_empty() => Err(ProxyError::UnknownCaller(UNKNOWN_CERT)),
        None => Err(ProxyError::UnknownCaller(NO_IDENTITY)),
    }
}

/// The one caller the certificate's identities map to, if any; two different ones: ambiguous.
fn by_cert<'a>(
    callers: &'a Callers,
    cert: &[CertIdentity],
) -> Result<Option<&'a Arc<str>>, ProxyError> {
    let mut found: Option<&Arc<str>> = None;
    for caller in cert.iter().filter_map(|id| callers.by_cert.get(id)) {
        match found {
            Some(f) if f != caller => return Err(ProxyError::UnknownCaller(AMBIGUOUS)),
            _ => found = Some(caller),
        }
    }
    Ok(found)
}

/// The credential of a `Bearer <credential>` value (scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || !rest.starts_with(b" ") {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CallerConfig, ListenerConfig};
    use http::HeaderValue;

    fn caller(name: &str, keys: &[&str], certs: Vec<CertIdentity>) -> CallerConfig {
        CallerConfig {
            name: name.into(),
            client_id: None,
            key_hashes: keys.iter().map(|k| Sha256::digest(k).into()).collect(),
            cert_identities: certs,
            inject: None,
            max_count_of_uses: None,
        }
    }

    fn table() -> Callers {
        let mut config = crate::proxy::tests_support::config();
        config.callers = vec![
            caller("billing", &["billing-key-1", "billing-key-2"], vec![]),
            caller(
                "demo",
                &["demo-key"],
                vec![CertIdentity::Uri("spiffe://tokenbroker.dev/demo".into())],
            ),
            caller(
                "by-dns",
                &[],
                vec![
                    CertIdentity::Dns("other.client.local".into()),
                    CertIdentity::Cn("legacy".into()),
                ],
            ),
        ];
        config.listeners.push(ListenerConfig {
            name: "sidecar".into(),
            addr: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            caller: Some("billing".into()),
        });
        Callers::from_config(&config)
    }

    fn conn(listener: &str, cert: Vec<CertIdentity>) -> ConnIdentity {
        ConnIdentity {
            listener: listener.into(),
            cert,
        }
    }

    fn with_proxy_auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(PROXY_AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    fn who(c: &ConnIdentity, h: &HeaderMap) -> Result<String, ProxyError> {
        identify(&table(), c, h).map(|c| c.to_string())
    }

    #[test]
    fn keys_identify_their_caller() {
        let plain = conn("main", vec![]);
        assert_eq!(
            who(&plain, &with_proxy_auth("Bearer billing-key-2")),
            Ok("billing".into())
        );
        assert_eq!(
            who(&plain, &with_proxy_auth("bearer   demo-key ")),
            Ok("demo".into())
        );
        assert_eq!(
            who(&plain, &with_proxy_auth("Bearer billing-key-3")),
            Err(ProxyError::UnknownCaller(UNKNOWN_KEY))
        );
        assert_eq!(
            who(&plain, &with_proxy_auth("Basic ZGVtby1rZXk=")),
            Err(ProxyError::UnknownCaller(BAD_SCHEME))
        );
        assert_eq!(
            who(&plain, &with_proxy_auth("Bearer ")),
            Err(ProxyError::UnknownCaller(BAD_SCHEME))
        );
        assert_eq!(
            who(&plain, &HeaderMap::new()),
            Err(ProxyError::UnknownCaller(NO_IDENTITY))
        );
    }

    #[test]
    fn a_bound_listener_wins() {
        let sidecar = conn("sidecar", vec![]);
        assert_eq!(who(&sidecar, &HeaderMap::new()), Ok("billing".into()));
        assert_eq!(
            who(&sidecar, &with_proxy_auth("Bearer demo-key")),
            Ok("billing".into())
        );
    }

    #[test]
    fn certificates_map_by_uri_dns_or_cn_in_order() {
        let uri = conn(
            "mtls",
            vec![
                CertIdentity::Uri("spiffe://tokenbroker.dev/demo".into()),
                CertIdentity::Dns("demo.client.local".into()),
            ],
        );
        assert_eq!(who(&uri, &HeaderMap::new()), Ok("demo".into()));
        let dns = conn(
            "mtls",
            vec![
                CertIdentity::Uri("spiffe://tokenbroker.dev/unknown".into()),
                CertIdentity::Dns("other.client.local".into()),
            ],
        );
        assert_eq!(who(&dns, &HeaderMap::new()), Ok("by-dns".into()));
        let cn = conn("mtls", vec![CertIdentity::Cn("legacy".into())]);
        assert_eq!(who(&cn, &HeaderMap::new()), Ok("by-dns".into()));
    }

    #[test]
    fn two_identities_are_ambiguous() {
        let plain = conn("main", vec![]);
        let mut two = with_proxy_auth("Bearer billing-key-1");
        two.append(
            PROXY_AUTHORIZATION,
            HeaderValue::from_static("Bearer demo-key"),
        );
        assert_eq!(who(&plain, &two), Err(ProxyError::UnknownCaller(AMBIGUOUS)));
        let mut same_twice = with_proxy_auth("Bearer demo-key");
        same_twice.append(
            PROXY_AUTHORIZATION,
            HeaderValue::from_static("Bearer demo-key"),
        );
        assert_eq!(
            who(&plain, &same_twice),
            Err(ProxyError::UnknownCaller(AMBIGUOUS))
        );
        let two_callers = conn(
            "mtls",
            vec![
                CertIdentity::Uri("spiffe://tokenbroker.dev/demo".into()),
                CertIdentity::Cn("legacy".into()),
            ],
        );
        assert_eq!(
            who(&two_callers, &HeaderMap::new()),
            Err(ProxyError::UnknownCaller(AMBIGUOUS))
        );
        let demo_cert = conn(
            "mtls",
            vec![CertIdentity::Uri("spiffe://tokenbroker.dev/demo".into())],
        );
        assert_eq!(
            who(&demo_cert, &with_proxy_auth("Bearer billing-key-1")),
            Err(ProxyError::UnknownCaller(AMBIGUOUS))
        );
        assert_eq!(
            who(&demo_cert, &with_proxy_auth("Bearer demo-key")),
            Ok("demo".into())
        );
        // A bound listener is one identity whatever the headers say.
        assert_eq!(who(&conn("sidecar", vec![]), &two), Ok("billing".into()));
    }

    #[test]
    fn an_unmapped_certificate_falls_back_to_the_key() {
        let unmapped = conn("mtls", vec![CertIdentity::Cn("stranger".into())]);
        assert_eq!(
            who(&unmapped, &HeaderMap::new()),
            Err(ProxyError::UnknownCaller(UNKNOWN_CERT))
        );
        assert_eq!(
            who(&unmapped, &with_proxy_auth("Bearer demo-key")),
            Ok("demo".into())
        );
    }
}
