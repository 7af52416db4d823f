//! Bearer tokens: EdDSA JWTs with every registered claim required.
//!
//! The algorithm is pinned: a token whose header names anything but EdDSA
//! (`none` included) is refused before its signature is looked at.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Why a token was refused (always 401 to the caller).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("missing bearer token")]
    Missing,
    /// The token failed verification; the reason is for logs and the caller.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// A key file is unusable.
    #[error("{path}: {message}")]
    Key {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Ship records through the HTTP senders' APIs (Elasticsearch bulk,
    /// OTLP); nothing else, no reading.
    Writer,
    /// Search, aggregate, tail.
    Reader,
    /// Reader, plus audit.
    Auditor,
    /// Everything.
    Admin,
}

/// The claims logvault reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token was issued to.
    pub sub: String,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before, seconds since the epoch.
    pub nbf: u64,
    /// Issued at.
    pub iat: u64,
    /// One tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Several tenants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenants: Option<Vec<String>>,
    /// What the holder may do.
    pub role: Role,
}

impl Claims {
    /// Every tenant the token names.
    pub fn all_tenants(&self) -> Vec<String> {
        let mut all: Vec<String> = self.tenant.iter().cloned().collect();
        all.extend(self.tenants.iter().flatten().cloned());
        all.sort();
        all.dedup();
        all
    }
}

/// The key id of an Ed25519 public key: the first 8 bytes of the SHA-256
/// of its 32 raw bytes, in hex. Tokens name it in their `kid` header.
pub fn key_id(raw_public_key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, raw_public_key);
    digest.as_ref()[..8].iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The raw 32 bytes of an Ed25519 public key in SPKI PEM.
pub fn raw_public_key(pem_text: &[u8]) -> Result<Vec<u8>, String> {
    let block = pem::parse(pem_text).map_err(|e| e.to_string())?;
    let der = block.contents();
    // SPKI for Ed25519: a fixed 12-byte prefix and the 32-byte key.
    const PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    match der.strip_prefix(&PREFIX[..]) {
        Some(raw) if block.tag() == "PUBLIC KEY" && raw.len() == 32 => Ok(raw.to_vec()),
        _ => Err("not an Ed25519 public key (SPKI PEM)".into()),
    }
}

/// Where verification keys come from: fixed files and a directory whose
/// `*.pub` files are all keys. Both are read again when they change, so a
/// new signing key is trusted, and a retired one dropped, without a
/// restart.
#[derive(Debug, Clone, Default)]
pub struct KeySources {
    /// Public key files (SPKI PEM).
    pub files: Vec<PathBuf>,
    /// A directory of `*.pub` public key files.
    pub dir: Option<PathBuf>,
}

impl KeySources {
    /// The files that hold keys now, with their modification times, sorted.
    fn listing(&self) -> Vec<(PathBuf, Option<SystemTime>)> {
        let mut paths = self.files.clone();
        if let Some(dir) = &self.dir
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            paths.extend(
                entries
                    .flatten()
                    .map(|entry| entry.path())
                    .filter(|path| path.extension().is_some_and(|ext| ext == "pub")),
            );
        }
        paths.sort();
        paths.dedup();
        paths
            .into_iter()
            .map(|path| {
                let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                (path, modified)
            })
            .collect()
    }
}

struct Keyring {
    by_kid: HashMap<String, DecodingKey>,
    listing: Vec<(PathBuf, Option<SystemTime>)>,
}

/// Verifies tokens against a keyring of Ed25519 public keys, by `kid`.
pub struct Verifier {
    sources: KeySources,
    keys: RwLock<Keyring>,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("sources", &self.sources)
            .field("keys", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn load_keyring(sources: &KeySources) -> Result<Keyring, AuthError> {
    let listing = sources.listing();
    let mut by_kid = HashMap::new();
    for (path, _) in &listing {
        let key_err = |message: String| AuthError::Key { path: path.clone(), message };
        let pem = std::fs::read(path).map_err(|e| key_err(e.to_string()))?;
        let raw = raw_public_key(&pem).map_err(key_err)?;
        let key = DecodingKey::from_ed_pem(&pem).map_err(|e| key_err(e.to_string()))?;
        by_kid.insert(key_id(&raw), key);
    }
    if by_kid.is_empty() {
        return Err(AuthError::Key {
            path: sources.dir.clone().unwrap_or_default(),
            message: "no token verification key".into(),
        });
    }
    Ok(Keyring { by_kid, listing })
}

impl Verifier {
    /// A verifier for tokens signed by the Ed25519 key whose public half is
    /// in `public_pem`, with issuer and audience pinned.
    pub fn from_public_pem(public_pem: &Path, issuer: &str, audience: &str) -> Result<Verifier, AuthError> {
        Verifier::new(KeySources { files: vec![public_pem.to_owned()], dir: None }, issuer, audience)
    }

    /// A verifier for tokens signed by any key `sources` hold, with issuer
    /// and audience pinned. Fails when no key is there.
    pub fn new(sources: KeySources, issuer: &str, audience: &str) -> Result<Verifier, AuthError> {
        let keys = load_keyring(&sources)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.algorithms = vec![Algorithm::EdDSA];
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 30;
        Ok(Verifier { sources, keys: RwLock::new(keys), validation })
    }

    /// The ids of the keys trusted now, sorted.
    pub fn key_ids(&self) -> Vec<String> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<String> = keys.by_kid.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Reads the keys again when a file changed, appeared or went away.
    /// A keyring that fails to load (a half-written file, say) leaves the
    /// current keys in place.
    pub fn reload_if_changed(&self) {
        let listing = self.sources.listing();
        if listing == self.keys.read().unwrap_or_else(|p| p.into_inner()).listing {
            return;
        }
        match load_keyring(&self.sources) {
            Ok(keys) => {
                let ids: Vec<&String> = keys.by_kid.keys().collect();
                tracing::info!(keys = ?ids, "token verification keys reloaded");
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
            }
            Err(err) => {
                tracing::warn!(error = %err, "token verification keys not reloaded; keeping the current ones")
            }
        }
    }

    /// Polls the key files every second until `cancel` fires.
    pub async fn watch(self: std::sync::Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
            let verifier = self.clone();
            let _ = tokio::task::spawn_blocking(move || verifier.reload_if_changed()).await;
        }
    }

    /// Verifies a token and returns its claims. The token's `kid` picks
    /// the key; a token without one is accepted only while a single key is
    /// trusted. A token naming no tenant is refused.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted; tokens are EdDSA",
                header.alg
            )));
        }
        let data = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            let key = match &header.kid {
                Some(kid) => keys
                    .by_kid
                    .get(kid)
                    .ok_or_else(|| AuthError::Invalid(format!("unknown key id {kid:?}")))?,
                None if keys.by_kid.len() == 1 => keys.by_kid.values().next().expect("one key"),
                None => {
                    return Err(AuthError::Invalid(
                        "the token names no key id (kid) and several keys are trusted".into(),
                    ));
                }
            };
            jsonwebtoken::decode::<Claims>(token, key, &self.validation)
                .map_err(|e| AuthError::Invalid(e.to_string()))?
        };
        if data.claims.all_tenants().is_empty() {
            return Err(AuthError::Invalid("token names no tenant".into()));
        }
        Ok(data.claims)
    }
}

/// Mints a token signed with the Ed25519 private key in `key_pem`, naming
/// the key's id in its `kid` header.
pub fn mint(key_pem: &Path, claims: &Claims) -> Result<String, AuthError> {
    let pem = std::fs::read(key_pem)
        .map_err(|e| AuthError::Key { path: key_pem.to_owned(), message: e.to_string() })?;
    let key_err = |message: String| AuthError::Key { path: key_pem.to_owned(), message };
    let text = std::str::from_utf8(&pem).map_err(|e| key_err(e.to_string()))?;
    let pair = rcgen::KeyPair::from_pem(text).map_err(|e| key_err(e.to_string()))?;
    if !pair.is_compatible(&rcgen::PKCS_ED25519) {
        return Err(key_err("not an Ed25519 private key".into()));
    }
    let key = EncodingKey::from_ed_pem(&pem).map_err(|e| key_err(e.to_string()))?;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(key_id(pair.public_key_raw()));
    jsonwebtoken::encode(&header, claims, &key).map_err(|e| AuthError::Invalid(e.to_string()))
}

/// Creates an Ed25519 token key pair: `key_path` (PKCS#8 PEM, 0600) and
/// `key_path` with `.pub` (SPKI PEM). Existing files are kept.
pub fn ensure_key_pair(key_path: &Path) -> Result<std::path::PathBuf, AuthError> {
    let public = key_path.with_extension("pub");
    if key_path.exists() && public.exists() {
        return Ok(public);
    }
    let key_err = |message: String| AuthError::Key { path: key_path.to_owned(), message };
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| key_err(e.to_string()))?;
    logvault_certs::write_private_file(key_path, pair.serialize_pem().as_bytes())
        .map_err(|e| key_err(e.to_string()))?;
    std::fs::write(&public, pair.public_key_pem()).map_err(|e| key_err(e.to_string()))?;
    Ok(public)
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        let now = now_secs();
        Claims {
            sub: "t".into(),
            iss: "logvault".into(),
            aud: "logvault".into(),
            exp: now + 60,
            nbf: now,
            iat: now,
            tenant: Some("acme".into()),
            tenants: None,
            role: Role::Reader,
        }
    }

    #[test]
    fn the_kid_picks_the_key_and_a_token_without_one_needs_a_single_key() {
        let dir = std::env::temp_dir().join(format!("logvault-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        let (a, b) = (dir.join("a.key"), dir.join("b.key"));
        let a_pub = ensure_key_pair(&a).unwrap();
        let b_pub = ensure_key_pair(&b).unwrap();
        std::fs::copy(&a_pub, dir.join("keys/a.pub")).unwrap();
        let sources = KeySources { files: Vec::new(), dir: Some(dir.join("keys")) };
        let verifier = Verifier::new(sources, "logvault", "logvault").unwrap();
        let token_a = mint(&a, &claims()).unwrap();
        let token_b = mint(&b, &claims()).unwrap();
        assert_eq!(verifier.verify(&token_a).unwrap().sub, "t");
        assert!(verifier.verify(&token_b).unwrap_err().to_string().contains("unknown key id"));

        // A token without a kid, signed by the only key: accepted.
        let pem = std::fs::read(&a).unwrap();
        let key = EncodingKey::from_ed_pem(&pem).unwrap();
        let bare = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims(), &key).unwrap();
        assert!(verifier.verify(&bare).is_ok());

        std::fs::copy(&b_pub, dir.join("keys/b.pub")).unwrap();
        verifier.reload_if_changed();
        assert_eq!(verifier.key_ids().len(), 2);
        assert!(verifier.verify(&token_b).is_ok());
        // With two keys trusted, a token must say which.
        assert!(verifier.verify(&bare).unwrap_err().to_string().contains("no key id"));
        // Another algorithm is refused before any key is looked at.
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(verifier.verify(&hs).unwrap_err().to_string().contains("not accepted"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
