//! Config pieces for the tests that run a proxy (`#[path]`-included like `upstream.rs`): callers
//! with a key, routes, listeners and the dev certificates.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokenbroker::config::{CallerConfig, CertIdentity, ListenerConfig, RouteConfig, ServerTls};

pub fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs")
}

pub fn caller(name: &str, key: &str, certs: Vec<CertIdentity>) -> CallerConfig {
    CallerConfig {
        name: name.into(),
        client_id: None,
        key_hashes: vec![Sha256::digest(key).into()],
        cert_identities: certs,
        inject: None,
        max_count_of_uses: None,
    }
}

pub fn route(name: &str, prefix: &str, upstream: String, allow: &[&str]) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        host: None,
        path_prefix: prefix.into(),
        strip_prefix: true,
        upstream: upstream.parse().unwrap(),
        upstream_ca_file: None,
        allow: allow.iter().map(|s| s.to_string()).collect(),
        upgrades: vec![],
        pass_caller_headers: vec![],
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(20),
    }
}

pub fn listener(name: &str, tls: Option<ServerTls>, caller: Option<&str>) -> ListenerConfig {
    ListenerConfig {
        name: name.into(),
        addr: "127.0.0.1:0".parse().unwrap(),
        tls,
        caller: caller.map(Into::into),
    }
}

pub fn server_tls(client_ca: bool) -> ServerTls {
    ServerTls {
        cert: certs().join("server.pem"),
        key: certs().join("server.key"),
        client_ca: client_ca.then(|| certs().join("ca.pem")),
    }
}

/// A TLS connection to a proxy listener on `addr`, trusting the dev CA (server name `localhost`,
/// ALPN `http/1.1`), with the dev client certificate `name` (`certs/<name>.pem`) if given.
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    client_cert: Option<&str>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    try_tls_connect(addr, client_cert)
        .await
        .expect("TLS handshake with the proxy")
}

/// [`tls_connect`], with the failed handshake as an error.
pub async fn try_tls_connect(
    addr: std::net::SocketAddr,
    client_cert: Option<&str>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs().join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some(name) => {
            let chain = CertificateDer::pem_file_iter(certs().join(format!("{name}.pem")))
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(certs().join(format!("{name}.key"))).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())
}
