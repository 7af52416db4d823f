//! Key-encryption keys (KEKs): 256-bit AES keys with an id, which wrap
//! each archive segment's random data key.
//!
//! A key file holds one line, `logvault-kek v1 ID HEX`, and is written
//! 0600. A [`Keyring`] holds several, so segments wrapped under an old key
//! stay readable after `logvault archive rotate-key` until every segment
//! has been rewrapped and the old key can be retired.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};

const FILE_TAG: &str = "logvault-kek v1";

/// Why a key could not be made, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The id is not 1 to 64 of `[A-Za-z0-9._-]`.
    #[error("bad key id {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadId(String),
    /// A key file is unreadable or malformed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Two files hold keys with the same id.
    #[error("two key files hold the id {0:?}")]
    Duplicate(String),
}

/// One key-encryption key.
#[derive(Clone)]
pub struct Kek {
    id: String,
    secret: [u8; 32],
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).field("secret", &"<redacted>").finish()
    }
}

/// Whether `id` may name a key (it goes into segment headers and file names).
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Kek {
    /// A new random key.
    pub fn generate(id: &str) -> Result<Kek, KeyError> {
        if !valid_id(id) {
            return Err(KeyError::BadId(id.to_owned()));
        }
        let mut secret = [0u8; 32];
        SystemRandom::new().fill(&mut secret).expect("the system random source works");
        Ok(Kek { id: id.to_owned(), secret })
    }

    /// The key's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Kek, KeyError> {
        let err = |message: &str| KeyError::File { path: path.to_owned(), message: message.to_owned() };
        let metadata = std::fs::metadata(path).map_err(|e| err(&e.to_string()))?;
        if metadata.len() > 4096 {
            return Err(err("too large for a key file"));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(&e.to_string()))?;
        let rest = text
            .trim()
            .strip_prefix(FILE_TAG)
            .ok_or_else(|| err("not a logvault key-encryption key file"))?;
        let mut words = rest.split_whitespace();
        let (Some(id), Some(hex), None) = (words.next(), words.next(), words.next()) else {
            return Err(err("expected `logvault-kek v1 ID HEX`"));
        };
        if !valid_id(id) {
            return Err(KeyError::BadId(id.to_owned()));
        }
        let mut secret = [0u8; 32];
        if hex.len() != 64 {
            return Err(err("the key is not 64 hex digits"));
        }
        for (i, byte) in secret.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| err("the key is not hex"))?;
        }
        Ok(Kek { id: id.to_owned(), secret })
    }

    /// Writes the key to `path`, 0600 from its creation; refuses to
    /// overwrite an existing file.
    pub fn write(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |e: std::io::Error| KeyError::File { path: path.to_owned(), message: e.to_string() };
        let hex: String = self.secret.iter().map(|b| format!("{b:02x}")).collect();
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
        file.write_all(format!("{FILE_TAG} {} {hex}\n", self.id).as_bytes()).map_err(err)?;
        file.sync_all().map_err(err)
    }
}

/// Keys by id.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: BTreeMap<String, Kek>,
}

impl Keyring {
    /// A keyring of the keys in `paths`.
    pub fn load(paths: &[PathBuf]) -> Result<Keyring, KeyError> {
        let mut keyring = Keyring::default();
        for path in paths {
            let kek = Kek::load(path)?;
            if keyring.keys.contains_key(kek.id()) {
                return Err(KeyError::Duplicate(kek.id().to_owned()));
            }
            keyring.insert(kek);
        }
        Ok(keyring)
    }

    /// Adds (or replaces) a key.
    pub fn insert(&mut self, kek: Kek) {
        self.keys.insert(kek.id.clone(), kek);
    }

    /// The key `id`.
    pub fn get(&self, id: &str) -> Option<&Kek> {
        self.keys.get(id)
    }

    /// The ids held.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_round_trip_through_0600_files_and_never_print() {
        let dir = std::env::temp_dir().join(format!("logvault-kek-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kek = Kek::generate("2026-11").unwrap();
        let path = dir.join("archive.kek");
        kek.write(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(kek.write(&path).is_err(), "never overwrites");
        let loaded = Kek::load(&path).unwrap();
        assert_eq!((loaded.id(), loaded.secret()), (kek.id(), kek.secret()));
        let shown = format!("{loaded:?}");
        let hex: String = kek.secret().iter().map(|b| format!("{b:02x}")).collect();
        assert!(shown.contains("<redacted>") && !shown.contains(&hex[..16]), "{shown}");
        assert!(Kek::generate("../etc").is_err());
        assert!(Keyring::load(&[path.clone(), path]).is_err(), "duplicate ids");
        std::fs::write(dir.join("bad.kek"), "logvault-kek v1 k zz").unwrap();
        assert!(Kek::load(&dir.join("bad.kek")).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
