//! Signing, and compressing, the batches one producer builds.

use std::sync::{Arc, Mutex};

use logvault_storage::batch::{BatchBuilder, Deflater};
use ring::signature::Ed25519KeyPair;

use crate::config::{BatchConfig, Compression};

/// The agent's key plus a compressor of its own: one per producer thread,
/// so compression state is reused and never shared.
pub struct Signer {
    key: Arc<Ed25519KeyPair>,
    deflater: Option<Mutex<Deflater>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("compressed", &self.deflater.is_some()).finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer compressing as `batch.compression` says. A compressor that
    /// cannot be created (out of memory) leaves batches uncompressed.
    pub fn new(key: Arc<Ed25519KeyPair>, batch: &BatchConfig) -> Signer {
        let deflater = match batch.compression {
            Compression::None => None,
            Compression::Zstd => match Deflater::zstd(batch.compression_level) {
                Ok(deflater) => Some(Mutex::new(deflater)),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot start zstd; sending batches uncompressed");
                    None
                }
            },
        };
        Signer { key, deflater }
    }

    /// Seals, compresses and signs `batch`.
    pub fn sign(&self, batch: BatchBuilder) -> Vec<u8> {
        match &self.deflater {
            Some(deflater) => {
                let mut deflater = deflater.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                batch.sign_with(&self.key, Some(&mut deflater))
            }
            None => batch.sign(&self.key),
        }
    }
}
