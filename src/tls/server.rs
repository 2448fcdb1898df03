//! Server-side TLS, for the proxy's listeners and the admin listener: a listener's server config
//! (ALPN h2 + http/1.1; with a client CA, client certificates verified against it, required or
//! optional), checked file by file so that a problem names the file that holds it (`check`,
//! `run`, the listeners and reload all build it here); the config in force, replaced whole on
//! reload ([`ListenerTls`]: a replaced config applies to new handshakes only, so rotating
//! certificates drops nothing); and a verified client certificate's identities.
//!
//! Must never: accept an unverified client certificate as an identity, serve a certificate with
//! a key that does not match it, or put key material in an error message.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::{PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::provider;
use crate::config::{CertIdentity, ServerTls};

/// The file of a listener's `tls` settings a problem is in; its name is the config key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
    ClientCa,
}

impl TlsFile {
    /// The key under `listener[i].tls`.
    pub fn key(self) -> &'static str {
        match self {
            TlsFile::Cert => "cert",
            TlsFile::Key => "key",
            TlsFile::ClientCa => "client_ca",
        }
    }
}

/// Why a listener's TLS settings cannot be used. The message names the file, never its contents.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    pub file: TlsFile,
    pub message: String,
}

fn problem(file: TlsFile, message: String) -> TlsError {
    TlsError { file, message }
}

/// Every PEM section of `path` with its kind (sections of unknown kinds are skipped).
fn pem_sections(path: &Path, file: TlsFile) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
    let iter = <(SectionKind, Vec<u8>)>::pem_file_iter(path)
        .map_err(|e| problem(file, format!("cannot read {}: {e}", path.display())))?;
    iter.collect::<Result<_, _>>()
        .map_err(|e| problem(file, format!("{} is not valid PEM: {e}", path.display())))
}

fn is_private_key(kind: SectionKind) -> bool {
    matches!(
        kind,
        SectionKind::PrivateKey | SectionKind::RsaPrivateKey | SectionKind::EcPrivateKey
    )
}

/// The certificates of a PEM file that must hold at least one (and may hold nothing secret).
fn certificates(path: &Path, file: TlsFile) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let sections = pem_sections(path, file)?;
    if sections.iter().any(|(kind, _)| is_private_key(*kind)) {
        return Err(problem(
            file,
            format!(
                "{} holds a private key: it must hold certificates only",
                path.display()
            ),
        ));
    }
    let certs: Vec<_> = sections
        .into_iter()
        .filter(|(kind, _)| *kind == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der))
        .collect();
    if certs.is_empty() {
        return Err(problem(
            file,
            format!("no PEM certificate found in {}", path.display()),
        ));
    }
    for cert in &certs {
        X509Certificate::from_der(cert).map_err(|_| {
            problem(
                file,
                format!("{} holds a certificate that does not parse", path.display()),
            )
        })?;
    }
    Ok(certs)
}

/// The one private key of a PEM file.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = TlsFile::Key;
    let sections = pem_sections(path, file)?;
    let holds_cert = sections
        .iter()
        .any(|(kind, _)| *kind == SectionKind::Certificate);
    let mut keys = sections
        .into_iter()
        .filter(|(kind, _)| is_private_key(*kind));
    let Some((kind, der)) = keys.next() else {
        let what = if holds_cert {
            "holds a certificate, not a private key"
        } else {
            "holds no PEM private key"
        };
        return Err(problem(file, format!("{} {what}", path.display())));
    };
    if keys.next().is_some() {
        return Err(problem(
            file,
            format!("{} holds more than one private key", path.display()),
        ));
    }
    let key = match kind {
        SectionKind::RsaPrivateKey => PrivateKeyDer::Pkcs1(der.into()),
        SectionKind::EcPrivateKey => PrivateKeyDer::Sec1(der.into()),
        _ => PrivateKeyDer::Pkcs8(der.into()),
    };
    Ok(key)
}

/// The listener's server config, checked file by file: the certificate file holds certificates
/// (and no key), the key file one private key that matches the first certificate, and the client
/// CA file (when set) CA certificates; with `client_ca`, client certificates are required and
/// verified against it. `check`, `run`, the listeners and reload all build it here.
pub fn server_config(tls: &ServerTls) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_for(tls, ClientCerts::Required)
}

/// What a listener with a client CA asks of its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCerts {
    /// Every client presents a certificate the CA verifies (the proxy's mTLS listeners).
    Required,
    /// A certificate is verified when presented; a client may present none (the admin listener,
    /// whose probes and scrapers do not).
    Optional,
}

/// [`server_config`], with client certificates `client_certs` when the settings name a CA.
pub fn server_config_for(
    tls: &ServerTls,
    client_certs: ClientCerts,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = certificates(&tls.cert, TlsFile::Cert)?;
    let key = private_key(&tls.key)?;
    let provider = provider();
    let certified = CertifiedKey::from_der(certs, key, &provider).map_err(|e| {
        let message = match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the private key in {} does not match the certificate in {}",
                tls.key.display(),
                tls.cert.display()
            ),
            other => format!("unusable private key in {}: {other}", tls.key.display()),
        };
        problem(TlsFile::Key, message)
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| problem(TlsFile::Cert, e.to_string()))?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let file = TlsFile::ClientCa;
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, file)? {
                roots.add(cert).map_err(|e| {
                    problem(
                        file,
                        format!("unusable CA certificate in {}: {e}", ca.display()),
                    )
                })?;
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if client_certs == ClientCerts::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| problem(file, format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config =
        builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// When the first certificate of the PEM file `cert` ends (its notAfter); `None` if it cannot
/// be read or parsed.
pub fn not_after(cert: &Path) -> Option<std::time::SystemTime> {
    let der = super::read_certs(cert).ok()?.into_iter().next()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// A listener's TLS config in force, shared by its accept loop and the reload path. Replacing
/// it changes what new handshakes present; accepted connections keep theirs.
#[derive(Clone)]
pub struct ListenerTls {
    current: Arc<ArcSwap<ServerConfig>>,
}

impl ListenerTls {
    /// Loads the listener's files (see [`server_config`]).
    pub fn load(tls: &ServerTls) -> Result<ListenerTls, TlsError> {
        Ok(ListenerTls::new(server_config(tls)?))
    }

    /// `config` in force until replaced.
    pub fn new(config: Arc<ServerConfig>) -> ListenerTls {
        ListenerTls {
            current: Arc::new(ArcSwap::new(config)),
        }
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
    use std::path::PathBuf;

    use crate::tls::read_certs;

    fn certs_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs")
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
        let ends = not_after(&tls.cert).expect("the demo certificate's notAfter");
        assert!(ends > std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000));
        assert_eq!(
            not_after(&dir.join("server.key")),
            None,
            "not a certificate"
        );
        tls.key = dir.join("missing.key");
        let err = server_config(&tls).unwrap_err();
        assert_eq!(err.file, TlsFile::Key);
        assert!(err.message.contains("missing.key"), "{err}");
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
