//! TLS settings: one crypto provider (ring) for the process; client configs for every outbound
//! client (identity service, upstreams, Redis, the trace collector) with the system roots plus an
//! optional extra CA file; and the listeners' server configs ([`server`]).

pub mod server;

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// The process-wide crypto provider. Installing it is idempotent.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate of a PEM file; an empty or unreadable file is an error.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    let certs: Vec<_> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad PEM in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in {}", path.display()));
    }
    Ok(certs)
}

/// Roots: the system's (unreadable ones are skipped) plus every certificate in `extra_ca`.
pub fn root_store(extra_ca: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        add_ca_file(&mut roots, path)?;
    }
    Ok(roots)
}

/// Adds every certificate of a CA file to `roots`; a file that holds none, or one that is not a
/// usable CA certificate, is an error. What `check` runs on `ca_file` and `upstream_ca_file`.
pub fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), String> {
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("unusable CA certificate in {}: {e}", path.display()))?;
    }
    Ok(())
}

/// A client config trusting the system roots and `extra_ca`. No ALPN: hyper-rustls sets it from
/// the HTTP versions it enables.
pub fn client_config(extra_ca: Option<&Path>) -> Result<ClientConfig, String> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(root_store(extra_ca)?)
        .with_no_client_auth();
    Ok(config)
}
