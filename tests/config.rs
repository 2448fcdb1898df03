//! Configuration loading and the commands around it: the shipped example files are valid, every
//! kind of problem is reported (all at once, with its key), secrets are never echoed, relative
//! paths follow the config file, and `check` / `hash-key` behave as documented.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};
use tokenbroker::config::{self, CertIdentity, Config, ConfigError, InjectMode};

const BIN: &str = env!("CARGO_BIN_EXE_tokenbroker");
const HASH: &str = "sha256:c07cc13209d7c900066bdc4c4f260050e560637a8814486f6623bfcd754deaa9";

/// A small valid config; tests append to it or replace parts of it.
fn base() -> String {
    format!(
        r#"
[[listener]]
name = "main"
address = "127.0.0.1:0"

[identity]
base_url = "http://127.0.0.1:7001"
client_id = "admin"
client_secret = {{ file = "client-secret" }}

[[caller]]
name = "svc"
key_hashes = ["{HASH}"]

[[route]]
name = "all"
upstream = "http://127.0.0.1:7002"
allow = ["svc"]
"#
    )
}

/// A folder holding the secret `base()` refers to.
fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("client-secret"), "s3cr3t-client-value\n").unwrap();
    dir
}

fn load(dir: &Path, text: &str) -> Result<Config, Vec<ConfigError>> {
    config::from_toml_str(text, &dir.join("tokenbroker.toml")).map_err(|e| e.0)
}

fn problems(text: &str) -> Vec<ConfigError> {
    let dir = folder();
    load(dir.path(), text).expect_err("config should be refused")
}

fn assert_problem(all: &[ConfigError], key: &str, words: &str) {
    assert!(
        all.iter()
            .any(|p| p.key == key && p.message.contains(words)),
        "no problem at `{key}` saying `{words}` in:\n{}",
        all.iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn check(path: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(["check", "--config"])
        .arg(path)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn the_base_config_is_valid_and_gets_defaults() {
    let dir = folder();
    let c = load(dir.path(), &base()).unwrap();
    assert_eq!(c.identity.client_secret.expose(), "s3cr3t-client-value");
    assert_eq!(c.identity.tenant, config::DEFAULT_TENANT);
    assert_eq!(c.identity.base_url, "http://127.0.0.1:7001");
    assert_eq!(c.tokens.refresh_fraction, config::DEFAULT_REFRESH_FRACTION);
    assert_eq!(c.tokens.inject, InjectMode::AccessToken);
    assert_eq!(c.limits.shutdown_grace, config::DEFAULT_SHUTDOWN_GRACE);
    assert_eq!(c.routes[0].path_prefix, "/");
    assert_eq!(
        c.routes[0].connect_timeout,
        config::DEFAULT_UPSTREAM_CONNECT_TIMEOUT
    );
    assert_eq!(
        c.callers[0].key_hashes[0],
        config::parse_key_hash(HASH).unwrap()
    );
    assert_eq!(
        c.source.as_deref(),
        Some(dir.path().join("tokenbroker.toml").as_path())
    );
}

#[test]
fn telemetry_is_off_by_default_and_checked_key_by_key() {
    let dir = folder();
    assert_eq!(load(dir.path(), &base()).unwrap().telemetry, None);
    let on = format!(
        "{}\n[telemetry]\nendpoint = \"http://collector:4318\"\n",
        base()
    );
    let t = load(dir.path(), &on).unwrap().telemetry.unwrap();
    assert_eq!(t.endpoint, "http://collector:4318");
    assert_eq!(t.service_name, config::DEFAULT_SERVICE_NAME);
    assert_eq!(t.sampling_ratio, config::DEFAULT_SAMPLING_RATIO);
    let all = problems(&format!(
        "{}\n[telemetry]\nendpoint = \"collector:4318/v1/traces\"\nsampling_ratio = 1.5\nservice_name = \" \"\nexporter = \"otlp\"\n",
        base()
    ));
    assert_problem(&all, "telemetry.exporter", "unknown key");
    let all = problems(&format!(
        "{}\n[telemetry]\nendpoint = \"collector:4318/v1/traces\"\nsampling_ratio = 1.5\nservice_name = \" \"\n",
        base()
    ));
    assert_problem(&all, "telemetry.endpoint", "");
    assert_problem(&all, "telemetry.sampling_ratio", "between 0.0 and 1.0");
    assert_problem(&all, "telemetry.service_name", "empty");
    let all = problems(&format!("{}\n[telemetry]\nservice_name = \"x\"\n", base()));
    assert_problem(&all, "telemetry.endpoint", "");
}

#[test]
fn dev_config_is_valid_and_lists_the_demo_key() {
    let c = config::load(&repo("config/dev.toml")).unwrap_or_else(|e| panic!("{e}"));
    let demo = c.callers.iter().find(|x| x.name == "demo").unwrap();
    let hash = config::key_hash(tokenbroker::dev::DEMO_KEY.as_bytes());
    assert!(demo.key_hashes.contains(&hash));
    assert!(c.routes.iter().any(|r| r.allow.contains(&demo.name)));
}

#[test]
fn production_example_is_valid_with_its_files_and_secret() {
    // The example refers to files relative to its folder: give it a folder that has them.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenbroker.toml");
    std::fs::copy(repo("config/tokenbroker.toml"), &path).unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    for (f, from) in [
        ("server.pem", "certs/server.pem"),
        ("server.key", "certs/server.key"),
        ("clients-ca.pem", "certs/ca.pem"),
    ] {
        std::fs::copy(repo(from), dir.path().join("tls").join(f)).unwrap();
    }
    let out = check(&path, &[("TOKENBROKER_CLIENT_SECRET", "example-secret")]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(
        text.contains("valid: 3 listeners, 2 callers, 2 routes"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1, "{text}");
}

#[test]
fn check_names_an_unknown_key_a_bad_url_and_a_missing_secret_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let text = base()
        .replace(
            "client_secret = { file = \"client-secret\" }",
            "client_secret = { env = \"TOKENBROKER_TEST_SURELY_UNSET\" }",
        )
        .replace(
            "upstream = \"http://127.0.0.1:7002\"",
            "upstream = \"ftp//nowhere\"",
        )
        .replace("name = \"main\"", "name = \"main\"\nbogus_key = 1");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(64));
    let text = stdout(&out);
    assert!(
        text.contains("listener[0].bogus_key: unknown key"),
        "{text}"
    );
    assert!(text.contains("route[0].upstream:"), "{text}");
    assert!(
        text.contains(
            "identity.client_secret: environment variable TOKENBROKER_TEST_SURELY_UNSET is not set"
        ),
        "{text}"
    );
    assert!(text.contains("3 problems found"), "{text}");
    assert!(
        text.contains("bad.toml"),
        "every line names the file: {text}"
    );
}

#[test]
fn an_inline_secret_is_refused_without_repeating_it() {
    let text = base().replace(
        "client_secret = { file = \"client-secret\" }",
        "client_secret = \"inline-hunter2\"",
    );
    let all = problems(&text);
    assert_problem(
        &all,
        "identity.client_secret",
        "inline secret is not allowed",
    );
    for p in &all {
        assert!(!p.to_string().contains("hunter2"), "{p}");
    }
    // A table of the wrong shape is refused without its contents either.
    let text = base().replace(
        "client_secret = { file = \"client-secret\" }",
        "client_secret = { value = \"inline-hunter2\" }",
    );
    let all = problems(&text);
    assert_problem(&all, "identity.client_secret", "env = \"NAME\"");
    assert!(all.iter().all(|p| !p.to_string().contains("hunter2")));
}

#[test]
fn values_of_the_wrong_type_are_not_echoed() {
    // A key typed into the wrong place must not end up in the output.
    let text = base().replace(
        "[[route]]",
        "[limits]\nmax_connections = \"caller-key-typed-here\"\n\n[[route]]",
    );
    let all = problems(&text);
    assert_problem(
        &all,
        "limits.max_connections",
        "expected an integer, found string",
    );
    assert!(all
        .iter()
        .all(|p| !p.to_string().contains("caller-key-typed-here")));
    let text = base().replace(HASH, "my-raw-caller-key");
    let all = problems(&text);
    assert_problem(&all, "caller[0].key_hashes[0]", "sha256:<64 hex digits>");
    assert!(all
        .iter()
        .all(|p| !p.to_string().contains("my-raw-caller-key")));
}

#[test]
fn relative_paths_follow_the_config_file_not_the_working_folder() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("etc");
    std::fs::create_dir_all(sub.join("tls")).unwrap();
    std::fs::create_dir_all(sub.join("state")).unwrap();
    std::fs::write(sub.join("client-secret"), "from-file").unwrap();
    for (f, from) in [
        ("cert.pem", "certs/server.pem"),
        ("key.pem", "certs/server.key"),
        ("ca.pem", "certs/ca.pem"),
    ] {
        std::fs::copy(repo(from), sub.join("tls").join(f)).unwrap();
    }
    let text = base().replace(
        "address = \"127.0.0.1:0\"",
        "address = \"127.0.0.1:0\"\ntls = { cert = \"tls/cert.pem\", key = \"tls/key.pem\", client_ca = \"tls/ca.pem\" }",
    ) + "\n[tokens]\nstate_file = \"state/tokens.json\"\n";
    let path = sub.join("tokenbroker.toml");
    std::fs::write(&path, text).unwrap();
    let c = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let tls = c.listeners[0].tls.as_ref().unwrap();
    assert_eq!(tls.cert, sub.join("tls/cert.pem"));
    assert_eq!(tls.key, sub.join("tls/key.pem"));
    assert_eq!(
        tls.client_ca.as_deref(),
        Some(sub.join("tls/ca.pem").as_path())
    );
    assert_eq!(c.tokens.state_file, Some(sub.join("state/tokens.json")));
    assert_eq!(c.identity.client_secret.expose(), "from-file");
}

#[test]
fn every_kind_of_problem_is_reported_together() {
    let text = r#"
[[listener]]
name = "a"
address = "localhost:80"
caller = "ghost"
tls = { cert = "missing.pem", key = "missing.key" }

[[listener]]
name = "a"
address = "127.0.0.1:9000"

[admin]
address = "127.0.0.1:9000"

[identity]
base_url = "https://id.example.com/acs/t/CUSTOMER"
client_id = "bad id!"
client_secret = { file = "no-such-secret" }
connect_timeout = "soon"

[tokens]
refresh_fraction = 1.5
max_count_of_uses = 3
inject = "cookie"
backoff_initial = "10s"
backoff_max = "1s"

[[caller]]
name = "nobody"

[[caller]]
name = "nobody"
key_hashes = ["sha256:abc"]
cert_identities = ["email:x@example.com"]

[[route]]
name = "r"
upstream = "http://up.example.com"
allow = ["stranger"]
response_timeout = "0s"

[[route]]
name = "r2"
upstream = "https://user:pw@up.example.com"
allow = []

[limits]
max_header_bytes = 10
idle_timeout = "forever"

[logging]
level = "info,=[bad"

[surprise]
x = 1
"#;
    let all = problems(text);
    for (key, words) in [
        ("listener[0].address", "not an IP address and port"),
        ("listener[0].caller", "unknown caller `ghost`"),
        ("listener[0].tls.cert", "cannot read"),
        ("listener[0].tls.key", "cannot read"),
        ("listener[1].name", "duplicate listener name `a`"),
        ("listener[1].address", "also used by admin.address"),
        ("identity.base_url", "without a path"),
        ("identity.client_id", "letters, digits"),
        ("identity.client_secret", "cannot read secret file"),
        ("identity.connect_timeout", "not a duration"),
        ("tokens.refresh_fraction", "out of range"),
        ("tokens.max_count_of_uses", "not 1"),
        ("tokens.inject", "`cookie`"),
        ("tokens.backoff_max", "shorter than backoff_initial"),
        ("caller[0]", "cannot be identified"),
        ("caller[1].name", "duplicate caller name"),
        ("caller[1].key_hashes[0]", "sha256:<64 hex digits>"),
        ("caller[1].cert_identities[0]", "is not \"uri:"),
        ("route[0].allow", "unknown caller `stranger`"),
        ("route[0].response_timeout", "longer than zero"),
        ("route[1].upstream", "credentials"),
        ("route[1].allow", "allows no caller"),
        ("limits.max_header_bytes", "out of range"),
        ("limits.idle_timeout", "not a duration"),
        ("logging.level", "log filter"),
        ("surprise", "unknown key"),
    ] {
        assert_problem(&all, key, words);
    }
    // The URL with credentials is not repeated.
    assert!(all.iter().all(|p| !p.to_string().contains("user:pw")));
}

#[test]
fn no_listeners_and_no_identity_are_problems() {
    let all = problems("");
    assert_problem(&all, "listener", "no [[listener]]");
    assert_problem(&all, "identity", "missing section");
    let all = problems("[identity]\n");
    assert_problem(&all, "identity.base_url", "missing");
    assert_problem(&all, "identity.client_id", "missing");
    assert_problem(&all, "identity.client_secret", "missing");
}

#[test]
fn a_caller_known_only_by_certificate_needs_an_mtls_listener() {
    let text = base().replace(
        &format!("key_hashes = [\"{HASH}\"]"),
        "cert_identities = [\"uri:spiffe://example.org/svc\"]",
    );
    assert_problem(
        &problems(&text),
        "caller[0]",
        "no listener asks for client certificates",
    );
    // Bound to a listener instead: fine.
    let text = base()
        .replace(&format!("key_hashes = [\"{HASH}\"]"), "")
        .replace("name = \"main\"", "name = \"main\"\ncaller = \"svc\"");
    let dir = folder();
    let c = load(dir.path(), &text).unwrap();
    assert_eq!(c.listeners[0].caller.as_deref(), Some("svc"));
    assert!(c.callers[0].key_hashes.is_empty());
}

#[test]
fn cert_identities_and_overrides_are_parsed() {
    let text = base().replace(
        &format!("key_hashes = [\"{HASH}\"]"),
        &format!(
            "key_hashes = [\"{HASH}\"]\ncert_identities = [\"uri:spiffe://x/y\", \"dns:Svc.Example.org\", \"cn:svc\"]\ninject = \"api_token\"\nmax_count_of_uses = 1"
        ),
    );
    let dir = folder();
    let c = load(dir.path(), &text).unwrap();
    let x = &c.callers[0];
    assert_eq!(
        x.cert_identities,
        vec![
            CertIdentity::Uri("spiffe://x/y".into()),
            CertIdentity::Dns("svc.example.org".into()),
            CertIdentity::Cn("svc".into()),
        ]
    );
    assert_eq!(x.inject, Some(InjectMode::ApiToken));
    assert_eq!(x.max_count_of_uses, Some(1));
}

#[test]
fn a_syntax_error_names_line_and_column() {
    let all = problems("[[listener]]\nname = \"a\nx = 1\n");
    assert_eq!(all.len(), 1);
    assert!(
        all[0]
            .message
            .contains("TOML syntax error at line 2, column"),
        "{}",
        all[0]
    );
}

#[test]
fn check_refuses_a_file_that_does_not_exist() {
    let out = check(Path::new("/nonexistent/tokenbroker.toml"), &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stdout(&out).contains("cannot read the config file"));
}

#[test]
fn run_refuses_a_bad_config_before_binding_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[[listener]]\nname = \"x\"\naddress = \"nope\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listener[0].address"), "{err}");
    assert!(err.contains("identity: missing section"), "{err}");
    assert!(err.contains("not started"), "{err}");
}

fn hash_key(input: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn hash_key_prints_the_sha256_line_for_the_config() {
    let key = "a-caller-key-0123456789";
    let expected: String = Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    for input in [key.to_string(), format!("{key}\n")] {
        let out = hash_key(input.as_bytes());
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(stdout(&out), format!("sha256:{expected}\n"));
        assert!(!String::from_utf8_lossy(&out.stderr).contains(key));
    }
    // The printed line is accepted by the config.
    let line = stdout(&hash_key(key.as_bytes()));
    assert!(config::parse_key_hash(line.trim()).is_some());
}

#[test]
fn hash_key_refuses_empty_input() {
    for input in [&b""[..], b"\n"] {
        let out = hash_key(input);
        assert_eq!(out.status.code(), Some(64));
        assert!(out.stdout.is_empty());
        assert!(String::from_utf8_lossy(&out.stderr).contains("no key"));
    }
}

/// `base()` in a folder, with an mTLS listener whose three files are copies of the repository
/// files named (relative to it), or literal contents when they do not start with `certs/`.
fn tls_folder(cert: &str, key: &str, ca: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = folder();
    for (name, from) in [("cert.pem", cert), ("key.pem", key), ("ca.pem", ca)] {
        let to = dir.path().join(name);
        if from.starts_with("certs/") {
            std::fs::copy(repo(from), to).unwrap();
        } else {
            std::fs::write(to, from).unwrap();
        }
    }
    let text = base().replace(
        "address = \"127.0.0.1:0\"",
        "address = \"127.0.0.1:0\"\ntls = { cert = \"cert.pem\", key = \"key.pem\", client_ca = \"ca.pem\" }",
    );
    let path = dir.path().join("tokenbroker.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

const GARBAGE_PEM: &str =
    "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n";

#[test]
fn check_refuses_every_tls_file_the_listener_would_refuse() {
    let (_ok, path) = tls_folder("certs/server.pem", "certs/server.key", "certs/ca.pem");
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    for (cert, key, ca, at, words) in [
        (
            "certs/server.pem",
            "certs/server.pem",
            "certs/ca.pem",
            "listener[0].tls.key",
            "holds a certificate, not a private key",
        ),
        (
            "certs/server.key",
            "certs/server.key",
            "certs/ca.pem",
            "listener[0].tls.cert",
            "holds a private key",
        ),
        (
            "certs/server.pem",
            "certs/client.key",
            "certs/ca.pem",
            "listener[0].tls.key",
            "does not match the certificate",
        ),
        (
            "certs/server.pem",
            "certs/server.key",
            GARBAGE_PEM,
            "listener[0].tls.client_ca",
            "does not parse",
        ),
        (
            "certs/server.pem",
            "certs/server.key",
            "just some text\n",
            "listener[0].tls.client_ca",
            "no PEM certificate found",
        ),
        (
            "garbage",
            "certs/server.key",
            "certs/ca.pem",
            "listener[0].tls.cert",
            "no PEM certificate found",
        ),
    ] {
        let (_dir, path) = tls_folder(cert, key, ca);
        let out = check(&path, &[]);
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(64), "{text}");
        assert!(text.contains(&format!("{at}: ")), "{at}: {text}");
        assert!(text.contains(words), "{words}: {text}");
        assert!(text.contains("1 problem found"), "{text}");
        assert!(!text.contains("PRIVATE KEY"), "no key material: {text}");
    }
}

#[test]
fn run_refuses_a_mismatched_key_before_binding_or_calling_the_identity_service() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let emulator = rt
        .block_on(tokenbroker::emulator::Emulator::start(
            tokenbroker::emulator::EmulatorConfig {
                clients: vec![(
                    "admin".to_string(),
                    tokenbroker::secret::Secret::new("s3cr3t-client-value"),
                )],
                ..Default::default()
            },
        ))
        .unwrap();
    let (dir, path) = tls_folder("certs/server.pem", "certs/client.key", "certs/ca.pem");
    // A fixed port: the test then checks nothing listens on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("http://127.0.0.1:7001", &emulator.base_url())
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
        + "\n[tokens]\nwarm_up = true\n";
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("listener[0].tls.key: "), "{err}");
    assert!(err.contains("does not match"), "{err}");
    assert!(
        err.contains(&dir.path().join("key.pem").display().to_string()),
        "{err}"
    );
    assert_eq!(
        emulator.counters().client_credentials,
        0,
        "the identity service was called"
    );
    assert!(std::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).is_err());
    rt.block_on(emulator.shutdown());
}

#[test]
fn a_state_folder_that_takes_no_files_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Root writes anywhere a permission bit says no; sysfs takes no new file from anyone.
    let folder = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/sys")
    } else {
        let ro = dir.path().join("read-only");
        std::fs::create_dir(&ro).unwrap();
        let mut perms = std::fs::metadata(&ro).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o555);
        std::fs::set_permissions(&ro, perms).unwrap();
        ro
    };
    let text = base()
        + &format!(
            "\n[tokens]\nstate_file = \"{}\"\n",
            folder.join("tokens.json").display()
        );
    assert_problem(&problems(&text), "tokens.state_file", "is not writable");
}

#[test]
fn a_wrong_type_gets_a_hint_and_an_unknown_key_a_suggestion() {
    // As `check` prints them.
    let dir = folder();
    let path = dir.path().join("tokenbroker.toml");
    let text = base()
        .replace("address = \"127.0.0.1:0\"", "adress = \"127.0.0.1:0\"")
        .replace(
            "[[route]]",
            "[limits]\nshutdown_grace = 90\n\n[[route]]\nalow = [\"svc\"]",
        );
    std::fs::write(&path, text).unwrap();
    let out = check(&path, &[]);
    let printed = stdout(&out);
    assert_eq!(out.status.code(), Some(64), "{printed}");
    for line in [
        "limits.shutdown_grace: expected a duration string such as \"90s\", found integer",
        "listener[0].adress: unknown key (did you mean `address`? expected one of `name`, `address`, `tls`, `caller`)",
        "route[0].alow: unknown key (did you mean `allow`?",
    ] {
        assert!(printed.contains(line), "{line}\nnot in:\n{printed}");
    }
    // Nothing close: the list of keys only.
    let text = base().replace("[[route]]", "[[route]]\ncolour = 1");
    let all = problems(&text);
    assert_problem(
        &all,
        "route[0].colour",
        "unknown key (expected one of `name`",
    );
    let p = all.iter().find(|p| p.key == "route[0].colour").unwrap();
    assert!(!p.message.contains("did you mean"), "{p}");
    // A wrong type inside an array names the element.
    let text = base().replace(&format!("[\"{HASH}\"]"), &format!("[\"{HASH}\", 42]"));
    assert_problem(
        &problems(&text),
        "caller[0].key_hashes[1]",
        "expected a string, found integer",
    );
}

#[test]
fn version_names_the_commit() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or("unknown".to_string(), |o| {
            String::from_utf8_lossy(&o.stdout).trim().to_string()
        });
    let expected = std::env::var("TOKENBROKER_COMMIT").unwrap_or(commit);
    assert_eq!(
        stdout(&out),
        format!("tokenbroker {} ({expected})\n", env!("CARGO_PKG_VERSION"))
    );
}

/// The block `tokenbroker.toml: |` of the Kubernetes ConfigMap, unindented.
fn configmap_toml() -> String {
    let yaml = std::fs::read_to_string(repo("deploy/kubernetes/configmap.yaml")).unwrap();
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != "tokenbroker.toml: |");
    let header = lines.next().expect("a tokenbroker.toml block");
    let indent = header.len() - header.trim_start().len() + 2;
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_kubernetes_configmap_is_a_valid_config_with_the_mounted_files() {
    // Laid out as deployment.yaml mounts it, under a temporary folder instead of /etc/tokenbroker
    // and /var/lib/tokenbroker.
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    for sub in ["config", "secrets", "tls", "store"] {
        std::fs::create_dir_all(etc.join(sub)).unwrap();
    }
    std::fs::write(etc.join("secrets/client-secret"), "from-a-secret\n").unwrap();
    let seal_key = Command::new(BIN).arg("gen-seal-key").output().unwrap();
    assert!(seal_key.status.success());
    std::fs::write(etc.join("store/seal-key"), &seal_key.stdout).unwrap();
    for (to, from) in [
        ("tls/tls.crt", "certs/server.pem"),
        ("tls/tls.key", "certs/server.key"),
        ("tls/ca.crt", "certs/ca.pem"),
    ] {
        std::fs::copy(repo(from), etc.join(to)).unwrap();
    }
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let text = configmap_toml();
    let text = text
        .replace("/etc/tokenbroker/", &format!("{}/", etc.display()))
        .replace("/var/lib/tokenbroker/", &format!("{}/", state.display()));
    let path = etc.join("config/tokenbroker.toml");
    std::fs::write(&path, text).unwrap();
    let password = [("TOKENBROKER_REDIS_PASSWORD", "from-a-secret")];
    let out = check(&path, &password);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    // (In this process, the password from a file rather than the environment.)
    std::fs::write(etc.join("store/password"), "from-a-secret").unwrap();
    let in_process = std::fs::read_to_string(&path).unwrap().replace(
        "{ env = \"TOKENBROKER_REDIS_PASSWORD\" }",
        &format!("{{ file = \"{}\" }}", etc.join("store/password").display()),
    );
    std::fs::write(&path, in_process).unwrap();
    let c = config::load(&path).unwrap();
    assert_eq!(
        c.limits.shutdown_grace.as_secs(),
        30,
        "deployment.yaml's grace period assumes it"
    );
    assert!(
        matches!(c.store.kind, config::StoreKind::Redis(_)),
        "replicas share one token per caller, and their display_name_prefix with it"
    );
    assert_eq!(c.admin.unwrap().addr.port(), 9090, "the probes' port");
}

#[test]
fn ca_files_of_outbound_clients_must_hold_ca_certificates() {
    let dir = folder();
    std::fs::write(dir.path().join("garbage.pem"), GARBAGE_PEM).unwrap();
    std::fs::copy(repo("certs/server.key"), dir.path().join("a-key.pem")).unwrap();
    std::fs::copy(repo("certs/ca.pem"), dir.path().join("ca.pem")).unwrap();
    let text = base()
        .replace(
            "client_id = \"admin\"",
            "client_id = \"admin\"\nca_file = \"garbage.pem\"",
        )
        .replace(
            "allow = [\"svc\"]",
            "allow = [\"svc\"]\nupstream_ca_file = \"a-key.pem\"",
        );
    let all = load(dir.path(), &text).unwrap_err();
    assert_problem(&all, "identity.ca_file", "unusable CA certificate");
    assert_problem(&all, "route[0].upstream_ca_file", "no certificate found");
    assert_eq!(all.len(), 2, "{all:?}");
    // A real CA file is fine in both places.
    let text = text
        .replace("garbage.pem", "ca.pem")
        .replace("a-key.pem", "ca.pem");
    load(dir.path(), &text).unwrap();
}

/// `gen-seal-key` output: the key alone on stdout.
fn gen_seal_key() -> String {
    let out = Command::new(BIN).arg("gen-seal-key").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("seal_key"));
    text
}

#[test]
fn gen_seal_key_prints_a_fresh_32_byte_key_that_check_accepts() {
    use base64::Engine as _;
    let key = gen_seal_key();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(key.trim_end())
        .unwrap();
    assert_eq!(bytes.len(), 32);
    assert_ne!(gen_seal_key(), key, "a new key every time");

    let dir = folder();
    std::fs::write(dir.path().join("seal.key"), &key).unwrap();
    let path = dir.path().join("tokenbroker.toml");
    let text = format!(
        "{}\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\n\
         password = {{ env = \"TB_TEST_REDIS_PASSWORD\" }}\nseal_key = {{ file = \"seal.key\" }}\n",
        base()
    );
    std::fs::write(&path, text).unwrap();
    let out = check(&path, &[("TB_TEST_REDIS_PASSWORD", "redis-pw-value")]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("store redis (prefix tokenbroker:"),
        "{}",
        stdout(&out)
    );
    let out = check(&path, &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stdout(&out)
            .contains("store.password: environment variable TB_TEST_REDIS_PASSWORD is not set"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_redis_store_is_read_with_its_defaults_and_files() {
    let dir = folder();
    std::fs::write(dir.path().join("seal.key"), gen_seal_key()).unwrap();
    std::fs::write(dir.path().join("redis-pw"), "redis-pw-value\n").unwrap();
    std::fs::copy(repo("certs/ca.pem"), dir.path().join("redis-ca.pem")).unwrap();
    let text = format!(
        "{}\n[store]\nkind = \"redis\"\nurl = \"rediss://localhost:6380/2\"\nusername = \"tb\"\n\
         password = {{ file = \"redis-pw\" }}\nkey_prefix = \"tokenbroker:prod:\"\n\
         seal_key = {{ file = \"seal.key\" }}\nlease = \"30s\"\nca_file = \"redis-ca.pem\"\n",
        base()
    );
    let c = load(dir.path(), &text).unwrap_or_else(|e| panic!("{e:?}"));
    let r = c.store.redis().expect("redis");
    assert_eq!(
        r.servers,
        config::RedisServers::Single("rediss://localhost:6380/2".into())
    );
    assert_eq!(r.username.as_deref(), Some("tb"));
    assert_eq!(r.password.as_ref().unwrap().expose(), "redis-pw-value");
    assert_eq!(r.key_prefix, "tokenbroker:prod:");
    assert_eq!(r.lease, std::time::Duration::from_secs(30));
    assert_eq!(
        r.ca_file.as_deref(),
        Some(dir.path().join("redis-ca.pem").as_path())
    );
    assert_eq!(r.seal_keys.ids(), c.store.seal_keys.as_ref().unwrap().ids());

    let minimal = format!(
        "{}\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1\"\nseal_key = {{ file = \"seal.key\" }}\n",
        base()
    );
    let c = load(dir.path(), &minimal).unwrap();
    let r = c.store.redis().unwrap();
    assert_eq!(r.key_prefix, config::DEFAULT_STORE_KEY_PREFIX);
    assert_eq!(r.lease, config::DEFAULT_STORE_LEASE);
    assert!(r.password.is_none() && r.username.is_none() && r.ca_file.is_none());

    // No [store]: local, unsealed. A seal key alone: local, sealed state file.
    let c = load(dir.path(), &base()).unwrap();
    assert!(c.store.redis().is_none() && c.store.seal_keys.is_none());
    let sealed_local = format!(
        "{}\n[store]\nseal_key = {{ file = \"seal.key\" }}\n",
        base()
    );
    let c = load(dir.path(), &sealed_local).unwrap();
    assert!(c.store.redis().is_none() && c.store.seal_keys.is_some());
    assert_eq!(
        c.tokens.state_file_seal_keys.as_ref().map(|k| k.ids()),
        c.store.seal_keys.as_ref().map(|k| k.ids()),
        "the state file is sealed with the store's key"
    );
}

#[test]
fn seal_keys_is_a_keyring_and_seal_key_a_ring_of_one_never_both() {
    let dir = folder();
    let (new, old) = (gen_seal_key(), gen_seal_key());
    std::fs::write(dir.path().join("new.key"), &new).unwrap();
    std::fs::write(dir.path().join("old.key"), &old).unwrap();
    let id = |key: &str| {
        tokenbroker::seal::SealKey::from_base64(key)
            .unwrap()
            .id()
            .to_string()
    };
    let store = |keys: &str| {
        format!(
            "{}\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1\"\n{keys}\n",
            base()
        )
    };
    let ring = "seal_keys = [{ file = \"new.key\" }, { file = \"old.key\" }]";
    let c = load(dir.path(), &store(ring)).unwrap_or_else(|e| panic!("{e:?}"));
    let r = c.store.redis().unwrap();
    assert_eq!(r.seal_keys.ids(), vec![id(&new), id(&old)]);
    assert_eq!(r.seal_keys.first().id(), id(&new), "the first seals");
    let c = load(dir.path(), &store("seal_key = { file = \"old.key\" }")).unwrap();
    assert_eq!(c.store.redis().unwrap().seal_keys.ids(), vec![id(&old)]);

    let both = format!("{ring}\nseal_key = {{ file = \"old.key\" }}");
    assert_problem(
        &load(dir.path(), &store(&both)).unwrap_err(),
        "store.seal_keys",
        "either seal_key (one key) or seal_keys (a keyring, the first sealing), not both",
    );
    assert_problem(
        &load(dir.path(), &store("seal_keys = []")).unwrap_err(),
        "store.seal_keys",
        "at least one key",
    );
    assert_problem(
        &load(dir.path(), &store("seal_keys = { file = \"new.key\" }")).unwrap_err(),
        "store.seal_keys",
        "must be a list of keys",
    );
    let twice = "seal_keys = [{ file = \"new.key\" }, { file = \"new.key\" }]";
    assert_problem(
        &load(dir.path(), &store(twice)).unwrap_err(),
        "store.seal_keys[1]",
        "the same key as store.seal_keys[0]",
    );
    let inline = "seal_keys = [{ file = \"new.key\" }, \"inline-key\"]";
    let all = load(dir.path(), &store(inline)).unwrap_err();
    assert_problem(
        &all,
        "store.seal_keys[1]",
        "an inline secret is not allowed",
    );
    let shown: String = all.iter().map(|p| format!("{p}\n")).collect();
    assert!(
        !shown.contains(&new) && !shown.contains("inline-key"),
        "{shown}"
    );
}

#[test]
fn store_problems_are_reported_with_their_keys_and_echo_no_secret() {
    let dir = folder();
    std::fs::write(dir.path().join("short.key"), "c2hvcnQta2V5\n").unwrap();
    let text = format!(
        "{}\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1/1\"\n\
         username = \"tb\"\nkey_prefix = \"has space\"\nseal_key = {{ file = \"short.key\" }}\n\
         lease = \"1s\"\nca_file = \"missing.pem\"\nextra = 1\n",
        base()
    );
    let all = load(dir.path(), &text).unwrap_err();
    assert_problem(&all, "store.password", "an ACL username needs a password");
    assert_problem(
        &all,
        "store.key_prefix",
        "printable characters without spaces",
    );
    assert_problem(&all, "store.seal_key", "exactly 32 bytes, found 9");
    assert_problem(&all, "store.lease", "must be from 2s to 10m");
    assert_problem(&all, "store.ca_file", "only used with a rediss:// url");
    assert_problem(&all, "store.extra", "unknown key");
    let text = format!(
        "{}\n[store]\nkind = \"redis\"\nurl = \"redis://:hunter2-in-url@127.0.0.1\"\n",
        base()
    );
    let all = load(dir.path(), &text).unwrap_err();
    assert_problem(&all, "store.url", "must not carry credentials");
    let shown: String = all.iter().map(|p| format!("{p}\n")).collect();
    assert!(!shown.contains("hunter2"), "{shown}");

    let text = format!(
        "{}\n[store]\nkind = \"redis\"\nurl = \"http://127.0.0.1\"\npassword = \"inline-redis-pw\"\n",
        base()
    );
    let all = load(dir.path(), &text).unwrap_err();
    assert_problem(&all, "store.url", "not a URL such as redis://");
    assert_problem(&all, "store.password", "an inline secret is not allowed");
    assert_problem(&all, "store.seal_key", "required with kind = \"redis\"");
    let shown: String = all.iter().map(|p| format!("{p}\n")).collect();
    assert!(!shown.contains("inline-redis-pw"), "{shown}");

    let text = format!("{}\n[store]\nkind = \"memcached\"\n", base());
    assert_problem(
        &load(dir.path(), &text).unwrap_err(),
        "store.kind",
        "\"local\", \"redis\"",
    );
    let text = format!(
        "{}\n[store]\nurl = \"redis://127.0.0.1\"\nlease = \"5s\"\n",
        base()
    );
    let all = load(dir.path(), &text).unwrap_err();
    assert_problem(&all, "store.url", "only used with kind = \"redis\"");
    assert_problem(&all, "store.lease", "only used with kind = \"redis\"");
    let text = format!("{}\n[store]\nkind = \"redis\"\n", base());
    assert_problem(
        &load(dir.path(), &text).unwrap_err(),
        "store.url",
        "missing",
    );
}

#[test]
fn a_store_behind_sentinels_or_in_a_cluster_is_read_and_checked() {
    let dir = folder();
    std::fs::write(dir.path().join("seal.key"), gen_seal_key()).unwrap();
    let store = |keys: &str| {
        format!(
            "{}\n[store]\nkind = \"redis\"\nseal_key = {{ file = \"seal.key\" }}\n{keys}\n",
            base()
        )
    };
    let c = load(
        dir.path(),
        &store(
            "sentinels = [\"redis://10.0.0.1:26379\", \"redis://10.0.0.2:26379\"]\n\
             service_name = \"tokenbroker\"",
        ),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        c.store.redis().unwrap().servers,
        config::RedisServers::Sentinel {
            sentinels: vec![
                "redis://10.0.0.1:26379".into(),
                "redis://10.0.0.2:26379".into()
            ],
            service_name: "tokenbroker".into(),
        }
    );
    let c = load(
        dir.path(),
        &store("cluster = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000/0\"]"),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        c.store.redis().unwrap().servers,
        config::RedisServers::Cluster(vec![
            "redis://10.0.0.1:7000".into(),
            "redis://10.0.0.2:7000/0".into()
        ])
    );

    for (keys, key, words) in [
        (
            "url = \"redis://a\"\ncluster = [\"redis://b\"]",
            "store.url",
            "only one of url, sentinels and cluster",
        ),
        (
            "sentinels = [\"redis://a:26379\"]",
            "store.service_name",
            "missing",
        ),
        (
            "url = \"redis://a\"\nservice_name = \"m\"",
            "store.service_name",
            "only used with sentinels",
        ),
        ("cluster = []", "store.cluster", "at least one URL"),
        (
            "cluster = [\"redis://a\", \"rediss://b\"]",
            "store.cluster",
            "one scheme",
        ),
        (
            "cluster = [\"redis://a\", \"redis://:pw-in-url@b\"]",
            "store.cluster[1]",
            "must not carry credentials",
        ),
        (
            "cluster = [\"redis://a/2\"]",
            "store.cluster[0]",
            "database 0 only",
        ),
        (
            "sentinels = [\"redis://a:26379/1\"]\nservice_name = \"m\"",
            "store.sentinels[0]",
            "has no database",
        ),
        (
            "cluster = [\"redis://a\"]\nkey_prefix = \"tb:{x}:\"",
            "store.key_prefix",
            "hash tag",
        ),
    ] {
        let all = load(dir.path(), &store(keys)).unwrap_err();
        assert_problem(&all, key, words);
        let shown: String = all.iter().map(|p| format!("{p}\n")).collect();
        assert!(!shown.contains("pw-in-url"), "{shown}");
    }
    let text = format!("{}\n[store]\ncluster = [\"redis://a\"]\n", base());
    assert_problem(
        &load(dir.path(), &text).unwrap_err(),
        "store.cluster",
        "only used with kind = \"redis\"",
    );
}

#[test]
fn upgrades_merge_slashes_and_canonical_prefixes() {
    let dir = folder();
    let text = format!(
        "{}upgrades = [\"WebSocket\"]\n\n[limits]\nmerge_slashes = false\n",
        base()
    );
    let c = load(dir.path(), &text).unwrap();
    assert_eq!(c.routes[0].upgrades, ["websocket"]);
    assert!(!c.limits.merge_slashes);
    assert!(load(dir.path(), &base()).unwrap().limits.merge_slashes);

    let bad = base().replace(
        "allow = [\"svc\"]",
        "allow = [\"svc\"]\npath_prefix = \"/%61pi\"\nupgrades = [\"h2c\", \"web socket\"]\n\n[[route]]\nname = \"two\"\nupstream = \"http://127.0.0.1:7003\"\nallow = [\"svc\"]\npath_prefix = \"/a;b\"",
    );
    let all = problems(&bad);
    assert_problem(&all, "route[0].path_prefix", "write `/api`");
    assert_problem(&all, "route[0].upgrades[0]", "not an Upgrade protocol");
    assert_problem(&all, "route[0].upgrades[1]", "not an Upgrade protocol");
    assert_problem(&all, "route[1].path_prefix", "can never match");
}

#[test]
fn workers_default_to_one_runtime_and_nonsense_is_refused() {
    let dir = folder();
    assert_eq!(load(dir.path(), &base()).unwrap().limits.workers, 1);
    for n in [0, 1, 2, 64, config::MAX_WORKERS] {
        let text = format!("{}\n[limits]\nworkers = {n}\n", base());
        assert_eq!(load(dir.path(), &text).unwrap().limits.workers, n);
    }
    for bad in ["-1", "1025", "100000000000"] {
        let all = problems(&format!("{}\n[limits]\nworkers = {bad}\n", base()));
        assert_eq!(all.len(), 1, "{all:?}");
        assert_problem(
            &all,
            "limits.workers",
            &format!("{bad} is not a number of worker threads: 0 (one per usable CPU"),
        );
    }
    for (bad, found) in [
        ("\"auto\"", "string"),
        ("2.5", "float"),
        ("true", "boolean"),
    ] {
        let all = problems(&format!("{}\n[limits]\nworkers = {bad}\n", base()));
        assert_problem(
            &all,
            "limits.workers",
            &format!("expected an integer, found {found}"),
        );
    }
}

#[test]
fn drain_and_the_admin_listeners_limits() {
    let dir = folder();
    let c = load(dir.path(), &base()).unwrap();
    assert_eq!(c.limits.drain, config::DEFAULT_DRAIN);
    // A short shutdown_grace alone shortens the default drain with it.
    let text = format!("{}\n[limits]\nshutdown_grace = \"2s\"\n", base());
    let c = load(dir.path(), &text).unwrap();
    assert_eq!(c.limits.drain, std::time::Duration::from_secs(2));
    let text = format!(
        "{}\n[limits]\ndrain = \"0s\"\n\n[admin]\naddress = \"127.0.0.1:0\"\nmax_connections = 8\nheader_read_timeout = \"2s\"\n",
        base()
    );
    let c = load(dir.path(), &text).unwrap();
    assert!(
        c.limits.drain.is_zero(),
        "a zero drain closes idle connections at once"
    );
    let admin = c.admin.unwrap();
    assert_eq!(
        (admin.max_connections, admin.header_read_timeout),
        (8, std::time::Duration::from_secs(2))
    );
    let c = load(
        dir.path(),
        &format!("{}\n[admin]\naddress = \"127.0.0.1:0\"\n", base()),
    )
    .unwrap();
    let admin = c.admin.unwrap();
    assert_eq!(
        (admin.max_connections, admin.header_read_timeout),
        (
            config::DEFAULT_ADMIN_MAX_CONNECTIONS,
            config::DEFAULT_ADMIN_HEADER_READ_TIMEOUT
        )
    );

    let text = format!(
        "{}\n[limits]\ndrain = \"40s\"\nshutdown_grace = \"30s\"\n\n[admin]\naddress = \"127.0.0.1:0\"\nmax_connections = 0\nheader_read_timeout = \"0s\"\n",
        base()
    );
    let all = problems(&text);
    assert_problem(
        &all,
        "limits.drain",
        "40s is longer than limits.shutdown_grace (30s)",
    );
    assert_problem(&all, "admin.max_connections", "0 is out of range 1..=10000");
    assert_problem(
        &all,
        "admin.header_read_timeout",
        "must be longer than zero",
    );

    // TLS and client-certificate identities for /tokens
    let certs = repo("certs");
    let tls = |client_ca: &str| {
        format!(
            "tls = {{ cert = \"{}\", key = \"{}\"{client_ca} }}\n",
            certs.join("server.pem").display(),
            certs.join("server.key").display()
        )
    };
    let ca = format!(", client_ca = \"{}\"", certs.join("ca.pem").display());
    let text = format!(
        "{}\n[admin]\ncert_identities = [\"uri:spiffe://example.org/ops\", \"cn:ops\"]\n{}",
        base(),
        tls(&ca)
    );
    let admin = load(dir.path(), &text).unwrap().admin.unwrap();
    assert_eq!(
        admin.cert_identities,
        [
            CertIdentity::Uri("spiffe://example.org/ops".into()),
            CertIdentity::Cn("ops".into())
        ]
    );
    assert_eq!(admin.tls.unwrap().client_ca, Some(certs.join("ca.pem")));
    let text = format!(
        "{}\n[admin]\ncert_identities = [\"uri:spiffe://example.org/ops\"]\n{}",
        base(),
        tls("")
    );
    assert_problem(
        &problems(&text),
        "admin.cert_identities",
        "needs admin.tls with a client_ca",
    );
    let text = format!(
        "{}\n[admin]\ncert_identities = [\"ops\"]\ntls = {{ cert = \"{}\", key = \"missing.key\" }}\n",
        base(),
        certs.join("server.pem").display()
    );
    let all = problems(&text);
    assert_problem(&all, "admin.cert_identities[0]", "is not \"uri:<uri>\"");
    assert_problem(&all, "admin.tls.key", "missing.key");
}

#[test]
fn pass_caller_headers_names_only_headers_the_proxy_drops() {
    let dir = folder();
    let c = load(dir.path(), &base()).unwrap();
    assert!(c.routes[0].pass_caller_headers.is_empty());
    let text = format!(
        "{}pass_caller_headers = [\"X-HTTP-Method-Override\", \"x-ssl-client-*\"]\n",
        base()
    );
    let c = load(dir.path(), &text).unwrap();
    assert_eq!(
        c.routes[0].pass_caller_headers,
        ["x-http-method-override", "x-ssl-client-*"]
    );
    let text = format!(
        "{}pass_caller_headers = [\"true-client-ip\", \"authorization\", \"x-ssl-client-verify\"]\n",
        base()
    );
    let all = problems(&text);
    assert_eq!(all.len(), 2, "{all:?}");
    for key in [
        "route[0].pass_caller_headers[1]",
        "route[0].pass_caller_headers[2]",
    ] {
        assert_problem(
            &all,
            key,
            "is not a header the proxy drops; expected one of `x-original-url`",
        );
    }
    assert_problem(&all, "route[0].pass_caller_headers[1]", "`authorization`");
}
