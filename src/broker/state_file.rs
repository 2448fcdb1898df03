//! The optional state file: keeps API tokens across restarts, so that a restart creates no new
//! token on the identity service. Written atomically (temporary file, fsync, rename) with mode
//! 0600; a damaged file is reported, set aside and never fatal. It holds secrets by necessity:
//! nothing else may print its content.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{ApiCred, Broker, Held};
use crate::secret::Secret;

const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    api_tokens: BTreeMap<String, StoredToken>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredToken {
    id: String,
    token: String,
    suffix: String,
    client_id: Option<String>,
    /// Seconds since the Unix epoch (this host's clock).
    expires_at: f64,
}

impl std::fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredToken")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Seeds the API-token cache from the state file, if configured and readable.
    pub(super) async fn restore_state(&self) {
        let Some(path) = self.state_file.clone() else {
            return;
        };
        let loaded = tokio::task::spawn_blocking(move || load(&path)).await;
        let Ok(Some(state)) = loaded else { return };
        let timing = self.timing();
        let now_wall = SystemTime::now();
        let mut restored = 0;
        for (name, stored) in state.api_tokens {
            let Some(c) = self.caller(&name) else {
                continue;
            };
            if c.settings().client_id != stored.client_id {
                continue;
            }
            let expires = UNIX_EPOCH + Duration::from_secs_f64(stored.expires_at.max(0.0));
            let Ok(left) = expires.duration_since(now_wall) else {
                continue;
            };
            let cred = ApiCred {
                id: stored.id,
                token: Secret::new(stored.token),
                suffix: stored.suffix,
                exchanged: Default::default(),
            };
            let held = Held::new(cred, self.next_generation(), Instant::now(), left, &timing);
            self.api.insert(Arc::clone(&c.name), Arc::new(held)).await;
            restored += 1;
        }
        tracing::info!(restored, "API tokens restored from the state file");
    }

    /// Writes every caller's API token to the state file, if configured.
    pub(super) async fn save_state(&self) {
        let Some(path) = self.state_file.clone() else {
            return;
        };
        let _one_writer = self.state_lock.lock().await;
        let callers = self.all_callers();
        let mut state = StateFile {
            version: VERSION,
            api_tokens: BTreeMap::new(),
        };
        for c in callers {
            if let Some(api) = self.api.get(&*c.name).await {
                let expires_at = api
                    .expires_wall
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                state.api_tokens.insert(
                    c.name.to_string(),
                    StoredToken {
                        id: api.value.id.clone(),
                        token: api.value.token.expose().to_string(),
                        suffix: api.value.suffix.clone(),
                        client_id: c.settings().client_id,
                        expires_at,
                    },
                );
            }
        }
        let shown = path.display().to_string();
        match tokio::task::spawn_blocking(move || write_atomically(&path, &state)).await {
            Ok(Ok(())) => tracing::debug!(path = %shown, "state file written"),
            Ok(Err(e)) => {
                tracing::error!(path = %shown, error = %e, "cannot write the state file")
            }
            Err(e) => tracing::error!(error = %e, "state file writer failed"),
        }
    }
}

/// A state file whose mode is wider than 0600 (it holds API tokens) is narrowed to 0600 before it
/// is read, with a warning.
fn tighten_permissions(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & !0o600 == 0 {
        return;
    }
    let mode = format!("{mode:04o}");
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        Ok(()) => tracing::warn!(path = %path.display(), mode,
            "the state file was open to others; its mode is now 0600"),
        Err(e) => tracing::warn!(path = %path.display(), mode, error = %e,
            "the state file is open to others and its mode could not be narrowed"),
    }
}

/// Reads the state file (after [`tighten_permissions`]). Missing: `None`. Damaged: reported,
/// renamed aside, `None`.
fn load(path: &Path) -> Option<StateFile> {
    tighten_permissions(path);
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the state file; starting fresh");
            return None;
        }
    };
    let problem = match serde_json::from_slice::<StateFile>(&bytes) {
        Ok(state) if state.version == VERSION => return Some(state),
        Ok(state) => format!("unsupported version {}", state.version),
        Err(e) => format!(
            "not a valid state file (line {}, column {})",
            e.line(),
            e.column()
        ),
    };
    let aside = set_aside_name(path);
    match std::fs::rename(path, &aside) {
        Ok(()) => tracing::warn!(path = %path.display(), set_aside = %aside.display(), problem,
            "damaged state file set aside; starting fresh"),
        Err(e) => tracing::warn!(path = %path.display(), problem, error = %e,
            "damaged state file could not be set aside; starting fresh"),
    }
    None
}

fn set_aside_name(path: &Path) -> PathBuf {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".damaged-{stamp}"));
    path.with_file_name(name)
}

fn write_atomically(path: &Path, state: &StateFile) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let json = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateFile {
        let mut api_tokens = BTreeMap::new();
        api_tokens.insert(
            "billing".to_string(),
            StoredToken {
                id: "id-1".into(),
                token: "vidb_secret".into(),
                suffix: "ecret".into(),
                client_id: None,
                expires_at: 2e9,
            },
        );
        StateFile {
            version: VERSION,
            api_tokens,
        }
    }

    #[test]
    fn written_with_mode_0600_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomically(&path, &sample()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = load(&path).unwrap();
        assert_eq!(back.api_tokens["billing"].id, "id-1");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn damaged_files_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        for damage in [
            "{\"version\":1,\"api_tok",
            "garbage",
            "{\"version\":9,\"api_tokens\":{}}",
        ] {
            std::fs::write(&path, damage).unwrap();
            assert!(load(&path).is_none());
            assert!(!path.exists(), "set aside: {damage}");
            let aside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(aside.len(), 1);
            std::fs::remove_file(aside[0].as_ref().unwrap().path()).unwrap();
        }
        assert!(load(&path).is_none(), "missing is fine");
    }

    #[test]
    fn debug_hides_the_token() {
        let s = sample();
        assert!(!format!("{:?}", s.api_tokens["billing"]).contains("vidb_secret"));
    }
}
