//! TLS for the proxy's listeners: server configs (ALPN h2 + http/1.1, optional required client
//! certificates verified against a CA) and reading a verified client certificate's identities.
//! Upstream client configs come from the crate-wide [`crate::tls`].
//!
//! Must never: accept an unverified client certificate as an identity, or log key material.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{CertIdentity, ServerTls};
use crate::tls::{provider, read_certs};

/// The listener's server config. With `client_ca`, client certificates are required and
/// verified against it.
pub fn server_config(tls: &ServerTls) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs(&tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| format!("cannot read private key from {}: {e}", tls.key.display()))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("bad CA certificate in {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate {}: {e}", tls.cert.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
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

    #[test]
    fn server_configs_build_with_and_without_client_ca() {
        let dir = certs_dir();
        let mut tls = ServerTls {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: None,
        };
        let config = server_config(&tls).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        tls.client_ca = Some(dir.join("ca.pem"));
        server_config(&tls).unwrap();
        tls.key = dir.join("missing.key");
        assert!(server_config(&tls).unwrap_err().contains("missing.key"));
    }
}
