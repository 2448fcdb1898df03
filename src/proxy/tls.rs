//! TLS for the proxy's listeners: the listener's current server config, replaced whole on
//! reload ([`ListenerTls`]), and reading a verified client certificate's identities. Server
//! configs are built by [`crate::tls::server`]; upstream client configs by [`crate::tls`].
//!
//! A replaced config applies to new handshakes only: a connection keeps the config it was
//! accepted with, so rotating certificates drops nothing.
//!
//! Must never: accept an unverified client certificate as an identity, or log key material.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{CertIdentity, ServerTls};
use crate::tls::server::{server_config, TlsError};

/// A listener's TLS config in force, shared by its accept loop and the reload path. Replacing
/// it changes what new handshakes present; accepted connections keep theirs.
#[derive(Clone)]
pub struct ListenerTls {
    current: Arc<ArcSwap<ServerConfig>>,
}

impl ListenerTls {
    /// Loads the listener's files (see [`server_config`]).
    pub fn load(tls: &ServerTls) -> Result<ListenerTls, TlsError> {
        Ok(ListenerTls {
            current: Arc::new(ArcSwap::new(server_config(tls)?)),
        })
    }

    /// An acceptor for one new connection, with the config in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.load_full())
    }

    /// Puts `config` in force for the handshakes that follow.
    pub fn replace(&self, config: Arc<ServerConfig>) {
        self.current.store(config);
    }
}

/// The identities of a (verified) client certificate: URI SANs, then DNS SANs, then the subject
/// CN. Empty if it cannot be parsed.
pub fn cert_identities(der: &[u8]) -> Vec<CertIdentity> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(u) => uris.push(CertIdentity::Uri((*u).to_string())),
                GeneralName::DNSName(d) => dns.push(CertIdentity::Dns((*d).to_string())),
                _ => {}
            }
        }
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .map(|cn| CertIdentity::Cn(cn.to_string()));
    uris.into_iter().chain(dns).chain(cn).collect()
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::read_certs;
    use std::path::PathBuf;

    fn certs_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs")
    }

    #[test]
    fn client_cert_identities_in_order() {
        let der = read_certs(&certs_dir().join("client.pem")).unwrap();
        assert_eq!(
            cert_identities(&der[0]),
            vec![
                CertIdentity::Uri("spiffe://tokenbroker.dev/demo".into()),
                CertIdentity::Dns("demo.client.local".into()),
                CertIdentity::Cn("demo".into()),
            ]
        );
        assert!(cert_identities(b"not a certificate").is_empty());
    }
}
