//! The container image: builds the published `Dockerfile`'s `runtime` stage with buildah, its
//! `build` stage replaced by a root filesystem that `deploy/image/rootfs.sh` (the image's one
//! file list) lays out from the binary cargo built for these tests (no release build here), then
//! mounts the image and runs tokenbroker from it under `chroot`, as the image's user, against the
//! emulator: `/healthz` and `/readyz` answer 200 and the state file is written.
//!
//! Needs root and buildah (`.ci/run` installs it). Without them the test fails, saying why;
//! `TOKENBROKER_SKIP_IMAGE_TEST=1` skips it on purpose, printing that it did.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::process::{logged_addr, Process};
use support::{eventually, http};
use tokenbroker::emulator::{Emulator, EmulatorConfig};
use tokenbroker::secret::Secret;

const CLIENT_SECRET: &str = "image-test-client-secret";
const WAIT: Duration = Duration::from_secs(30);

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs a command to completion; its trimmed standard output, or a panic with its error output.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Why the test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("building and mounting the image needs root".to_string());
    }
    match Command::new("buildah").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("buildah is not installed (apt-get install buildah)".to_string()),
    }
}

/// The image and its working container, removed when the test ends, however it ends.
struct Image {
    name: String,
    container: Option<String>,
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Some(c) = &self.container {
            let _ = Command::new("buildah").args(["umount", c]).output();
            let _ = Command::new("buildah").args(["rm", c]).output();
        }
        let _ = Command::new("buildah").args(["rmi", &self.name]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_built_from_the_dockerfile_runs_tokenbroker() {
    if std::env::var_os("TOKENBROKER_SKIP_IMAGE_TEST").is_some_and(|v| !v.is_empty()) {
        println!("image test skipped: TOKENBROKER_SKIP_IMAGE_TEST is set");
        return;
    }
    if let Some(why) = missing_prerequisite() {
        panic!("the image test cannot run: {why}; set TOKENBROKER_SKIP_IMAGE_TEST=1 to skip it");
    }

    // The `build` stage's output, laid out as the Dockerfile does it.
    let context = tempfile::tempdir().unwrap();
    let rootfs = context.path().join("rootfs");
    run(
        repo("deploy/image/rootfs.sh").to_str().unwrap(),
        &[env!("CARGO_BIN_EXE_tokenbroker"), rootfs.to_str().unwrap()],
    );
    let mut image = Image {
        name: format!("localhost/tokenbroker-image-test:{}", std::process::id()),
        container: None,
    };
    let build_context = format!("build={}", context.path().display());
    run(
        "buildah",
        &[
            "build",
            "--quiet",
            "--target",
            "runtime",
            "--build-context",
            &build_context,
            "--file",
            repo("Dockerfile").to_str().unwrap(),
            "--tag",
            &image.name,
            context.path().to_str().unwrap(),
        ],
    );
    let inspect = run("buildah", &["inspect", "--type", "image", &image.name]);
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/tokenbroker"])
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["run", "--config", "/etc/tokenbroker/tokenbroker.toml"])
    );
    assert!(config["ExposedPorts"].get("9090/tcp").is_some(), "{config}");
    let container = run("buildah", &["from", "--quiet", &image.name]);
    image.container = Some(container.clone());
    let root = PathBuf::from(run("buildah", &["mount", &container]));
    let binary = root.join("usr/local/bin/tokenbroker");
    let sections = run(
        "readelf",
        &["--section-headers", "--wide", binary.to_str().unwrap()],
    );
    assert!(
        !sections.contains(" .debug_info"),
        "the image's binary is stripped of debug information"
    );
    assert!(
        sections.contains(" .symtab"),
        "its symbols stay, for backtraces: {sections}"
    );

    // Config and secret where the image expects them mounted, for the emulator on loopback.
    let emulator = Emulator::start(EmulatorConfig {
        clients: vec![("admin".to_string(), Secret::new(CLIENT_SECRET))],
        echo_upstream: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..EmulatorConfig::default()
    })
    .await
    .unwrap();
    let etc = root.join("etc/tokenbroker");
    std::fs::create_dir_all(etc.join("secrets")).unwrap();
    std::fs::write(etc.join("secrets/client-secret"), CLIENT_SECRET).unwrap();
    std::fs::write(
        etc.join("tokenbroker.toml"),
        format!(
            r#"
[[listener]]
name = "plain"
address = "127.0.0.1:0"

[admin]
address = "127.0.0.1:0"

[identity]
base_url = "{base}"
client_id = "admin"
client_secret = {{ file = "secrets/client-secret" }}

[tokens]
warm_up = true
state_file = "/var/lib/tokenbroker/tokens.json"

[[caller]]
name = "svc"
key_hashes = ["sha256:c07cc13209d7c900066bdc4c4f260050e560637a8814486f6623bfcd754deaa9"]

[[route]]
name = "echo"
upstream = "{echo}"
allow = ["svc"]

[limits]
shutdown_grace = "1s"
"#,
            base = emulator.base_url(),
            echo = emulator.echo_url().unwrap(),
        ),
    )
    .unwrap();

    // The image's entrypoint and user, inside its root filesystem.
    // Found on this machine's PATH; the process itself gets an empty environment, like a container.
    let chroot = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("chroot"))
        .find(|p| p.is_file())
        .expect("chroot (coreutils) on PATH");
    let mut command = Command::new(chroot);
    command
        .arg("--userspec=65532:65532")
        .arg(&root)
        .args([
            "/usr/local/bin/tokenbroker",
            "run",
            "--log-json",
            "--config",
            "/etc/tokenbroker/tokenbroker.toml",
        ])
        .env_clear();
    let tokenbroker = Process::start(command);
    let admin = tokenbroker
        .wait_for(|l| logged_addr(l, "admin listening (/healthz /readyz /metrics /tokens)"));
    let get = |path: &'static str| async move {
        http("GET", &format!("http://{admin}{path}"), &[], "")
            .await
            .0
            .as_u16()
    };
    assert_eq!(get("/healthz").await, 200);
    assert!(
        eventually(WAIT, || async { get("/readyz").await == 200 }).await,
        "tokens from the emulator, fetched from inside the image"
    );
    assert_eq!(tokenbroker.stop(), Some(0));

    let state = root.join("var/lib/tokenbroker/tokens.json");
    let meta = std::fs::metadata(&state).expect("the state file is written by the image's user");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65532);
    emulator.shutdown().await;
}
