//! Secrets: client secrets, API tokens, access tokens and caller keys.
//!
//! A [`Secret`] never prints its value: `Debug` and `Display` show `***`, and its memory is zeroized
//! on drop. Code that needs the value calls [`Secret::expose`] at the single place it is sent on.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use zeroize::Zeroizing;

/// A secret string. Cloning is cheap (shared, zeroized when the last clone drops).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<Zeroizing<String>>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::new(Zeroizing::new(value.into())))
    }

    /// The secret value. Call only where it is sent on the wire or hashed.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// The last `n` characters, for operators to tell tokens apart (`token_suffix`).
    pub fn suffix(&self, n: usize) -> String {
        last_chars(self.expose(), n)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The last `n` characters of `s` (all of it when shorter).
pub fn last_chars(s: &str, n: usize) -> String {
    let start = s
        .char_indices()
        .rev()
        .nth(n.saturating_sub(1))
        .map_or(0, |(i, _)| i);
    s[start..].to_string()
}

/// Where a secret comes from in the config: never inline.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub enum SecretSource {
    /// An environment variable.
    Env(String),
    /// A file; one trailing newline is removed.
    File(PathBuf),
}

impl SecretSource {
    /// Reads the secret. The error names the source, never the value.
    pub fn load(&self) -> Result<Secret, String> {
        match self {
            SecretSource::Env(name) => match std::env::var(name) {
                Ok(v) if !v.is_empty() => Ok(Secret::new(v)),
                Ok(_) => Err(format!("environment variable {name} is empty")),
                Err(_) => Err(format!("environment variable {name} is not set")),
            },
            SecretSource::File(path) => match std::fs::read_to_string(path) {
                Ok(v) => {
                    let v = v.strip_suffix('\n').unwrap_or(&v);
                    let v = v.strip_suffix('\r').unwrap_or(v);
                    if v.is_empty() {
                        Err(format!("secret file {} is empty", path.display()))
                    } else {
                        Ok(Secret::new(v))
                    }
                }
                Err(e) => Err(format!("cannot read secret file {}: {e}", path.display())),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_its_value() {
        let s = Secret::new("hunter2-very-secret");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(***)");
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn suffix_takes_last_characters() {
        assert_eq!(Secret::new("vidb_abcdefgh").suffix(5), "defgh");
        assert_eq!(Secret::new("abc").suffix(5), "abc");
    }

    #[test]
    fn file_source_strips_one_newline_and_names_no_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "topsecret\n").unwrap();
        assert_eq!(
            SecretSource::File(p.clone()).load().unwrap().expose(),
            "topsecret"
        );
        let missing = SecretSource::File(dir.path().join("nope"))
            .load()
            .unwrap_err();
        assert!(missing.contains("cannot read secret file"));
        let env = SecretSource::Env("TOKENBROKER_TEST_UNSET_VAR".into())
            .load()
            .unwrap_err();
        assert!(env.contains("not set"));
    }
}
