//! Certificate rotation on a running process: a real `tokenbroker run` with an mTLS listener,
//! certificates made at test time. New certificate, key and client CA files + SIGHUP -> new
//! handshakes present the new certificate and need a client certificate from the new CA, while a
//! connection opened before keeps working; broken files are refused, counted as a rejected
//! reload, and the previous certificate is still served; and valid new files are picked up
//! without SIGHUP when they change. Likewise the config file and its secret files, watched
//! without any signal, with the metrics that show what is in force.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::process::{logged_addr, Process};
use support::{eventually, http, sample};
use tokenbroker::config;
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::secret::Secret;

const CLIENT_SECRET: &str = "rotation-client-secret-value";
const KEY: &str = "rotation-caller-key-0123456789";
const WAIT: Duration = Duration::from_secs(20);

/// A certificate with its key, as PEM, and the certificate's DER.
struct Issued {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

/// A CA, able to issue certificates.
struct Ca {
    issued: Issued,
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        issued: Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        },
        cert,
        key,
    }
}

/// A leaf for `localhost` and 127.0.0.1 (server and client use), named `cn`, issued by `ca`.
fn leaf(ca: &Ca, cn: &str) -> Issued {
    leaf_until(ca, cn, 4096)
}

/// [`leaf`], valid until the first second of `year` (UTC).
fn leaf_until(ca: &Ca, cn: &str, year: i32) -> Issued {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_after = rcgen::date_time_ymd(year, 1, 1);
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

/// Puts the listener's three files in place, each replaced by a rename as a certificate manager
/// would.
fn install(dir: &Path, cert: &str, key: &str, client_ca: &str) {
    for (name, text) in [("cert.pem", cert), ("key.pem", key), ("ca.pem", client_ca)] {
        let tmp = dir.join(format!("{name}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

fn config_text(emulator: &Emulator) -> String {
    format!(
        r#"
[[listener]]
name = "mtls"
address = "127.0.0.1:0"
tls = {{ cert = "cert.pem", key = "key.pem", client_ca = "ca.pem" }}

[admin]
address = "127.0.0.1:0"

[identity]
base_url = "{base}"
client_id = "admin"
client_secret = {{ file = "client-secret" }}

[tokens]
warm_up = true

[[caller]]
name = "svc"
key_hashes = ["{hash}"]

[[route]]
name = "echo"
path_prefix = "/echo"
upstream = "{echo}"
allow = ["svc"]

[limits]
shutdown_grace = "2s"
"#,
        base = emulator.base_url(),
        echo = emulator.echo_url().unwrap(),
        hash = config::format_key_hash(&config::key_hash(KEY.as_bytes())),
    )
}

/// A TLS connection to the listener, trusting `server_ca` and presenting `client`: the
/// certificate the server presented, and an HTTP/1.1 sender on that connection.
async fn connect(
    addr: SocketAddr,
    server_ca: &Issued,
    client: &Issued,
) -> Result<(Vec<u8>, SendRequest<Full<Bytes>>), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(server_ca.der.clone()))
        .unwrap();
    let chain = vec![CertificateDer::from(client.der.clone())];
    let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let presented = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or("no server certificate")?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok((presented, sender))
}

/// One proxied GET on an open connection: the status, or why there was none.
async fn get(sender: &mut SendRequest<Full<Bytes>>, path: &str) -> Result<u16, String> {
    let req = http::Request::get(path)
        .header("host", "localhost")
        .header("proxy-authorization", format!("Bearer {KEY}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let exchange = async {
        sender.ready().await.map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(status)
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()))
}

async fn reloads(admin: SocketAddr, outcome: &str) -> f64 {
    let (_, _, body) = http("GET", &format!("http://{admin}/metrics"), &[], "").await;
    let series = format!(r#"tokenbroker_config_reloads_total{{outcome="{outcome}"}}"#);
    sample(&String::from_utf8_lossy(&body), &series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_certificates_without_dropping_connections_and_refuses_broken_ones() {
    let emulator = Emulator::start(EmulatorConfig {
        clients: vec![("admin".to_string(), Secret::new(CLIENT_SECRET))],
        echo_upstream: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..EmulatorConfig::default()
    })
    .await
    .unwrap();
    let server_ca = ca("rotation server CA");
    let (server_a, server_b) = (leaf(&server_ca, "server A"), leaf(&server_ca, "server B"));
    let (clients_1, clients_2) = (ca("clients CA 1"), ca("clients CA 2"));
    let (client_1, client_2) = (leaf(&clients_1, "svc 1"), leaf(&clients_2, "svc 2"));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client-secret"), CLIENT_SECRET).unwrap();
    install(
        dir.path(),
        &server_a.cert_pem,
        &server_a.key_pem,
        &clients_1.issued.cert_pem,
    );
    let path = dir.path().join("tokenbroker.toml");
    std::fs::write(&path, config_text(&emulator)).unwrap();

    let run = Process::spawn(&["run", "--log-json", "--config", path.to_str().unwrap()]);
    let proxy = run.wait_for(|l| logged_addr(l, "proxy listening"));
    let admin =
        run.wait_for(|l| logged_addr(l, "admin listening (/healthz /readyz /metrics /tokens)"));
    assert!(
        eventually(WAIT, || async {
            http("GET", &format!("http://{admin}/readyz"), &[], "")
                .await
                .0
                == 200
        })
        .await
    );

    // Before: certificate A, clients from CA 1.
    let (presented, mut before) = connect(proxy, &server_ca.issued, &client_1).await.unwrap();
    assert!(presented == server_a.der, "certificate A first");
    assert_eq!(get(&mut before, "/echo/a").await, Ok(200));

    // Rotate: certificate B, key B, clients from CA 2.
    install(
        dir.path(),
        &server_b.cert_pem,
        &server_b.key_pem,
        &clients_2.issued.cert_pem,
    );
    run.signal(libc::SIGHUP);
    // (The file watcher may see the new files first, even half-replaced: what is served counts,
    // and the reload counter is compared, not pinned.)
    let rotated = eventually(WAIT, || async {
        match connect(proxy, &server_ca.issued, &client_2).await {
            Ok((presented, mut sender)) => {
                presented == server_b.der && get(&mut sender, "/echo/b").await == Ok(200)
            }
            Err(_) => false,
        }
    })
    .await;
    assert!(
        rotated,
        "new handshakes present certificate B to clients of CA 2"
    );
    assert!(reloads(admin, "ok").await >= 1.0);
    let (presented, mut after) = connect(proxy, &server_ca.issued, &client_2).await.unwrap();
    assert!(presented == server_b.der);
    assert_eq!(get(&mut after, "/echo/b").await, Ok(200));
    // A client of the old CA is no longer let in (TLS 1.3 reports it on the first exchange).
    let refused = match connect(proxy, &server_ca.issued, &client_1).await {
        Err(_) => true,
        Ok((_, mut old_client)) => get(&mut old_client, "/echo/x").await.is_err(),
    };
    assert!(refused, "a client certificate from the old CA was accepted");
    // The connection opened before the rotation still works.
    assert_eq!(get(&mut before, "/echo/still").await, Ok(200));

    // Broken: a key file holding a certificate, then a key that does not match: each refused and
    // counted, certificate B still served.
    for key in [&server_b.cert_pem, &server_a.key_pem] {
        let rejected = reloads(admin, "rejected").await;
        install(
            dir.path(),
            &server_b.cert_pem,
            key,
            &clients_2.issued.cert_pem,
        );
        run.signal(libc::SIGHUP);
        let problem = run.wait_for(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["message"] == "reloaded configuration refused")
                .then(|| v["problem"].as_str().unwrap_or_default().to_string())
        });
        assert!(problem.contains("listener[0].tls.key: "), "{problem}");
        assert!(
            !problem.contains("PRIVATE KEY") && !problem.contains("BEGIN"),
            "{problem}"
        );
        // (Counted right after that line is logged.)
        assert!(
            eventually(WAIT, || async {
                reloads(admin, "rejected").await > rejected
            })
            .await
        );
        let (presented, mut again) = connect(proxy, &server_ca.issued, &client_2).await.unwrap();
        assert!(
            presented == server_b.der,
            "the previous certificate is still served"
        );
        assert_eq!(get(&mut again, "/echo/c").await, Ok(200));
    }

    // Without SIGHUP: valid new files (certificate A again) are picked up when they change.
    install(
        dir.path(),
        &server_a.cert_pem,
        &server_a.key_pem,
        &clients_2.issued.cert_pem,
    );
    let watched = eventually(WAIT, || async {
        let (presented, _) = connect(proxy, &server_ca.issued, &client_2).await.unwrap();
        presented == server_a.der
    })
    .await;
    assert!(watched, "changed files were not reloaded");
    run.wait_for(|l| l.contains("TLS certificates reloaded").then_some(()));

    assert_eq!(get(&mut before, "/echo/last").await, Ok(200));
    assert_eq!(get(&mut after, "/echo/last").await, Ok(200));

    drop((before, after));
    assert_eq!(run.stop(), Some(0));
    emulator.shutdown().await;
}

/// The metric of `series` (labels included) on the admin listener, if exported.
async fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let (_, _, body) = http("GET", &format!("http://{admin}/metrics"), &[], "").await;
    sample(&String::from_utf8_lossy(&body), series)
}

/// Writes `text` to `path` by a rename, as a ConfigMap or Secret volume update replaces files.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `tokenbroker_config_info`'s label for a config file's text.
fn config_sha256(text: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(text.as_bytes())[..8])
}

/// Without any signal: a changed config file is applied (a new route served) and shown in
/// `config_info`; a broken one is refused (`config_last_reload_successful` 0) and the config in
/// force keeps serving; a changed secret file reloads too; a rotated certificate's end is in
/// `tls_certificate_expiry_timestamp_seconds`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_config_and_secret_files_are_applied_without_a_signal() {
    let emulator = Emulator::start(EmulatorConfig {
        clients: vec![("admin".to_string(), Secret::new(CLIENT_SECRET))],
        echo_upstream: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..EmulatorConfig::default()
    })
    .await
    .unwrap();
    let server_ca = ca("watch server CA");
    let (server_a, server_b) = (
        leaf_until(&server_ca, "server A", 2031),
        leaf_until(&server_ca, "server B", 2033),
    );
    let clients = ca("watch clients CA");
    let client = leaf(&clients, "svc");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    install(
        dir.path(),
        &server_a.cert_pem,
        &server_a.key_pem,
        &clients.issued.cert_pem,
    );
    let path = dir.path().join("tokenbroker.toml");
    let first = config_text(&emulator);
    std::fs::write(&path, &first).unwrap();

    let run = Process::spawn(&["run", "--log-json", "--config", path.to_str().unwrap()]);
    let proxy = run.wait_for(|l| logged_addr(l, "proxy listening"));
    let admin =
        run.wait_for(|l| logged_addr(l, "admin listening (/healthz /readyz /metrics /tokens)"));
    let info = |text: &str| {
        format!(
            r#"tokenbroker_config_info{{sha256="{}"}}"#,
            config_sha256(text)
        )
    };
    let expiry = r#"tokenbroker_tls_certificate_expiry_timestamp_seconds{listener="mtls"}"#;
    let successful = "tokenbroker_config_last_reload_successful";
    assert_eq!(metric(admin, &info(&first)).await, Some(1.0));
    assert_eq!(
        metric(admin, expiry).await,
        Some(1_924_992_000.0),
        "2031-01-01"
    );
    assert_eq!(metric(admin, successful).await, Some(1.0));
    let (server_ca, client) = (&server_ca.issued, &client);
    let route = |path: &'static str| async move {
        let (_, mut sender) = connect(proxy, server_ca, client).await?;
        get(&mut sender, path).await
    };
    assert!(eventually(WAIT, || async { route("/echo/a").await == Ok(200) }).await);
    assert_eq!(route("/more/a").await, Ok(404), "no such route yet");

    // A new route, by a changed file alone.
    let second = first.replace(
        "[limits]",
        &format!(
            "[[route]]\nname = \"more\"\npath_prefix = \"/more\"\nupstream = \"{}\"\nallow = [\"svc\"]\n\n[limits]",
            emulator.echo_url().unwrap()
        ),
    );
    replace(&path, &second);
    assert!(
        eventually(WAIT, || async { route("/more/b").await == Ok(200) }).await,
        "the changed config file was not applied"
    );
    assert_eq!(metric(admin, &info(&second)).await, Some(1.0));
    assert_eq!(
        metric(admin, &info(&first)).await,
        None,
        "one config in force"
    );
    let ok = reloads(admin, "ok").await;
    assert!(ok >= 1.0);

    // A secret file replaced, with new certificate files: one reload, and the new certificate's
    // end exported.
    replace(&secret, CLIENT_SECRET);
    install(
        dir.path(),
        &server_b.cert_pem,
        &server_b.key_pem,
        &clients.issued.cert_pem,
    );
    assert!(
        eventually(WAIT, || async { reloads(admin, "ok").await > ok }).await,
        "a changed secret file was not reloaded"
    );
    assert!(
        eventually(WAIT, || async {
            metric(admin, expiry).await == Some(1_988_150_400.0)
        })
        .await,
        "2033-01-01"
    );
    assert_eq!(route("/echo/d").await, Ok(200));

    // A broken file: refused, shown, and the config in force keeps serving.
    replace(&path, "[[route]\nthis is not TOML");
    assert!(
        eventually(WAIT, || async {
            metric(admin, successful).await == Some(0.0)
        })
        .await,
        "the broken file was not refused"
    );
    assert!(reloads(admin, "rejected").await >= 1.0);
    assert_eq!(route("/more/c").await, Ok(200));
    assert_eq!(metric(admin, &info(&second)).await, Some(1.0));

    assert_eq!(run.stop(), Some(0));
    emulator.shutdown().await;
}
