//! Bearer tokens: EdDSA JWTs with every registered claim required.
//!
//! The algorithm is pinned: a token whose header names anything but EdDSA
//! (`none` included) is refused before its signature is looked at.

use std::path::Path;

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

/// Verifies tokens.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("key", &"<redacted>").finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for tokens signed by the Ed25519 key whose public half is
    /// in `public_pem`, with issuer and audience pinned.
    pub fn from_public_pem(public_pem: &Path, issuer: &str, audience: &str) -> Result<Verifier, AuthError> {
        let pem = std::fs::read(public_pem)
            .map_err(|e| AuthError::Key { path: public_pem.to_owned(), message: e.to_string() })?;
        let key = DecodingKey::from_ed_pem(&pem)
            .map_err(|e| AuthError::Key { path: public_pem.to_owned(), message: e.to_string() })?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.algorithms = vec![Algorithm::EdDSA];
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 30;
        Ok(Verifier { key, validation })
    }

    /// Verifies a token and returns its claims; a token naming no tenant
    /// is refused.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        if data.claims.all_tenants().is_empty() {
            return Err(AuthError::Invalid("token names no tenant".into()));
        }
        Ok(data.claims)
    }
}

/// Mints a token signed with the Ed25519 private key in `key_pem`.
pub fn mint(key_pem: &Path, claims: &Claims) -> Result<String, AuthError> {
    let pem = std::fs::read(key_pem)
        .map_err(|e| AuthError::Key { path: key_pem.to_owned(), message: e.to_string() })?;
    let key = EncodingKey::from_ed_pem(&pem)
        .map_err(|e| AuthError::Key { path: key_pem.to_owned(), message: e.to_string() })?;
    jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), claims, &key)
        .map_err(|e| AuthError::Invalid(e.to_string()))
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
