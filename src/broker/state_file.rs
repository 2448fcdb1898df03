//! The optional state file: keeps API tokens across restarts, so that a restart creates no new
//! token on the identity service. Written atomically (temporary file, fsync, rename) with mode
//! 0600; a damaged file is reported, set aside and never fatal. It holds secrets by necessity:
//! nothing else may print its content. With seal keys (`[store] seal_keys` or `seal_key`) the
//! whole file is sealed with the first (`seal.rs`) and opened with the one it names; plain files
//! written before, and files sealed with an older key of the ring, are read and sealed with the
//! first on the next write. In memory its records are the shared store's `StoredApiToken`; the
//! file keeps its own (unchanged) layout.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use zeroize::Zeroizing;

use super::caller::Held;
use super::store::StoredApiToken;
use super::{read, Broker};
use crate::seal::{self, SealKeys};
use crate::secret::Secret;

const VERSION: u32 = 1;
/// The associated data of a sealed state file: a sealed value from elsewhere does not open here.
const SEAL_AAD: &[u8] = b"tokenbroker state file v1";

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

impl StoredToken {
    /// The API token as the shared store keeps it too.
    fn into_record(self) -> StoredApiToken {
        StoredApiToken {
            id: self.id,
            token: Secret::new(self.token),
            suffix: self.suffix,
            client_id: self.client_id,
            expires: UNIX_EPOCH + Duration::from_secs_f64(self.expires_at.max(0.0)),
        }
    }

    fn from_record(api: StoredApiToken) -> Self {
        StoredToken {
            id: api.id,
            token: api.token.expose().to_string(),
            suffix: api.suffix,
            client_id: api.client_id,
            expires_at: api
                .expires
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        }
    }
}

impl Broker {
    /// Seeds the API-token cache from the state file, if configured and readable.
    pub(super) async fn restore_state(&self) {
        let Some(path) = self.state_file.clone() else {
            return;
        };
        let key = read(&self.policy).state_file_seal_keys.clone();
        let loaded = tokio::task::spawn_blocking(move || load(&path, key.as_ref())).await;
        let Ok(Some(state)) = loaded else { return };
        let timing = self.timing();
        let mut restored = 0;
        for (name, stored) in state.api_tokens {
            let Some(c) = self.caller(&name) else {
                continue;
            };
            let stored = stored.into_record();
            if c.settings().client_id != stored.client_id {
                continue;
            }
            let Some(held) = Held::from_stored(&stored, false, &timing) else {
                continue;
            };
            c.set_api(Arc::new(held));
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
            if let Some(api) = c.stored_api() {
                state
                    .api_tokens
                    .insert(c.name.to_string(), StoredToken::from_record(api));
            }
        }
        let shown = path.display().to_string();
        let key = read(&self.policy).state_file_seal_keys.clone();
        match tokio::task::spawn_blocking(move || write_atomically(&path, &state, key.as_ref()))
            .await
        {
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

/// Reads the state file (after [`tighten_permissions`]), sealed or plain. Missing: `None`.
/// Damaged (or sealed under another key): reported, renamed aside, `None`.
fn load(path: &Path, keys: Option<&SealKeys>) -> Option<StateFile> {
    tighten_permissions(path);
    let bytes = match std::fs::read(path) {
        Ok(b) => Zeroizing::new(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the state file; starting fresh");
            return None;
        }
    };
    let problem = match decode(&bytes, keys) {
        Ok(state) => return Some(state),
        Err(problem) => problem,
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

/// The state in a file's bytes: sealed (opened with the key of `keys` it names) or plain JSON. The error says what is
/// wrong, never what the file holds.
fn decode(bytes: &[u8], keys: Option<&SealKeys>) -> Result<StateFile, String> {
    let opened;
    let json = if seal::looks_sealed(bytes) {
        let Some(keys) = keys else {
            return Err(
                "the file is sealed, but no [store] seal_keys (or seal_key) is configured"
                    .to_string(),
            );
        };
        let text = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        opened = seal::open(keys, SEAL_AAD, text)
            .map_err(|e| format!("the sealed file does not open: {e}"))?;
        &opened[..]
    } else {
        bytes
    };
    match serde_json::from_slice::<StateFile>(json) {
        Ok(state) if state.version == VERSION => Ok(state),
        Ok(state) => Err(format!("unsupported version {}", state.version)),
        Err(e) => Err(format!(
            "not a valid state file (line {}, column {})",
            e.line(),
            e.column()
        )),
    }
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

/// Writes the state, sealed with the first of `keys` when there are some.
fn write_atomically(
    path: &Path,
    state: &StateFile,
    keys: Option<&SealKeys>,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut json = Zeroizing::new(serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?);
    if let Some(keys) = keys {
        let mut sealed = seal::seal(keys.first(), SEAL_AAD, &json).into_bytes();
        sealed.push(b'\n');
        json = Zeroizing::new(sealed);
    }
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
    use crate::seal::SealKey;

    fn new_ring() -> SealKeys {
        SealKeys::from(SealKey::generate())
    }

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
        write_atomically(&path, &sample(), None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = load(&path, None).unwrap();
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
            assert!(load(&path, None).is_none());
            assert!(!path.exists(), "set aside: {damage}");
            let aside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(aside.len(), 1);
            std::fs::remove_file(aside[0].as_ref().unwrap().path()).unwrap();
        }
        assert!(load(&path, None).is_none(), "missing is fine");
    }

    #[test]
    fn a_sealed_file_holds_no_secret_in_clear_and_reads_back_with_its_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let key = new_ring();
        write_atomically(&path, &sample(), Some(&key)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with(&format!("v1.{}.", key.first().id())),
            "{text}"
        );
        for clear in ["vidb_secret", "id-1", "billing", "api_tokens"] {
            assert!(!text.contains(clear), "{clear} in {text}");
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = load(&path, Some(&key)).unwrap();
        assert_eq!(back.api_tokens["billing"].token, "vidb_secret");
    }

    #[test]
    fn a_plain_file_is_still_read_when_a_key_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomically(&path, &sample(), None).unwrap();
        let key = new_ring();
        let back = load(&path, Some(&key)).unwrap();
        assert_eq!(back.api_tokens["billing"].id, "id-1");
        // The next write seals it.
        write_atomically(&path, &back, Some(&key)).unwrap();
        assert!(!std::fs::read_to_string(&path)
            .unwrap()
            .contains("vidb_secret"));
        assert!(load(&path, Some(&key)).is_some());
    }

    #[test]
    fn a_file_sealed_with_an_older_key_of_the_ring_is_read_and_sealed_with_the_first_next() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let (new, old) = (SealKey::generate(), SealKey::generate());
        write_atomically(&path, &sample(), Some(&SealKeys::from(old.clone()))).unwrap();
        let ring = SealKeys::new(vec![new.clone(), old]).unwrap();
        let back = load(&path, Some(&ring)).unwrap();
        write_atomically(&path, &back, Some(&ring)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&format!("v1.{}.", new.id())), "{text}");
        assert!(load(&path, Some(&SealKeys::from(new))).is_some());
    }

    #[test]
    fn a_sealed_file_under_another_key_no_key_or_altered_is_set_aside() {
        let key = new_ring();
        let sealed = seal::seal(
            key.first(),
            SEAL_AAD,
            &serde_json::to_vec(&sample()).unwrap(),
        );
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 1;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        let elsewhere = seal::seal(
            key.first(),
            b"another purpose",
            &serde_json::to_vec(&sample()).unwrap(),
        );
        let other = new_ring();
        for (bytes, with, says) in [
            (
                sealed.as_bytes(),
                Some(&other),
                "sealed with another seal key",
            ),
            (
                sealed.as_bytes(),
                None,
                "no [store] seal_keys (or seal_key) is configured",
            ),
            (&altered[..], Some(&key), "authentication failed"),
            (elsewhere.as_bytes(), Some(&key), "authentication failed"),
        ] {
            let problem = decode(bytes, with).map(|_| ()).unwrap_err();
            assert!(problem.contains(says), "{problem}");
            assert!(!problem.contains("vidb_secret"));

            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.json");
            std::fs::write(&path, bytes).unwrap();
            assert!(load(&path, with).is_none());
            assert!(!path.exists(), "set aside: {says}");
            let aside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(aside.len(), 1, "{says}");
        }
    }

    #[test]
    fn debug_hides_the_token() {
        let s = sample();
        assert!(!format!("{:?}", s.api_tokens["billing"]).contains("vidb_secret"));
    }
}
