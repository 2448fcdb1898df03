//! Build script: puts the commit into `--version` (`0.1.0 (abc1234)`) and, from the same value,
//! into `TOKENBROKER_COMMIT` for `/metrics` `build_info`.
//!
//! The commit is `TOKENBROKER_COMMIT` when set (e.g. a container build without `.git`), else
//! `git rev-parse --short HEAD` when git and a repository are there, else "unknown". It never
//! fails the build, and asks cargo to run it again only when HEAD moves or the variable changes.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=TOKENBROKER_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let from_env = std::env::var("TOKENBROKER_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let commit = from_env.or_else(|| {
        let commit = git(&["rev-parse", "--short", "HEAD"])?;
        // HEAD itself (a branch switch), packed refs, and the branch HEAD points to (a new
        // commit), at the paths git gives (worktrees keep them apart). With each: whether to
        // watch its folder while it does not exist.
        let mut watched = vec![
            ("HEAD".to_string(), false),
            ("packed-refs".to_string(), false),
        ];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            // A branch only in packed-refs gets a file of its own at its next commit: watch its
            // folder (cargo looks at every file in a watched folder) until it has one.
            watched.push((branch, true));
        }
        for (name, or_folder) in watched {
            let Some(path) = git(&["rev-parse", "--git-path", &name]).map(PathBuf::from) else {
                continue;
            };
            let watch = if path.exists() {
                Some(path.as_path())
            } else if or_folder {
                path.parent().filter(|p| p.is_dir())
            } else {
                None
            };
            if let Some(watch) = watch {
                println!("cargo:rerun-if-changed={}", watch.display());
            }
        }
        Some(commit)
    });
    let commit = commit.unwrap_or_else(|| "unknown".to_string());
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo:rustc-env=TOKENBROKER_COMMIT={commit}");
    println!("cargo:rustc-env=TOKENBROKER_VERSION={version} ({commit})");
}
