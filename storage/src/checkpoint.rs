//! Signed checkpoints: what a collector archived since its last one.
//!
//! ```text
//! logvault-checkpoint v1
//! signature HEX(Ed25519 over "logvault-checkpoint v1\n" || body)
//! body: JSON, the bytes exactly as signed
//! ```
//!
//! The body names the collector, its sequence number, the SHA-256 of the
//! previous checkpoint's whole file (so the checkpoints form a chain, and a
//! removed one is missed), the time window, each new segment (object key,
//! hash, size, tenant, host, time range, records) with the RFC 6962 Merkle
//! root over them, and the segments retention deleted. A checkpoint is
//! written at a fixed cadence even when nothing arrived, so "nothing was
//! delivered" can be told from "something was removed".

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::merkle::{self, Hash};

const TAG: &str = "logvault-checkpoint v1";
/// The largest checkpoint file a reader accepts.
pub const MAX_CHECKPOINT: usize = 64 * 1024 * 1024;

/// Why a checkpoint cannot be read or trusted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CheckpointError {
    /// Not a checkpoint file.
    #[error("not a logvault checkpoint")]
    NotACheckpoint,
    /// Over [`MAX_CHECKPOINT`].
    #[error("checkpoint of {0} bytes is over the cap")]
    TooLarge(usize),
    /// The body is not the JSON expected.
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
    /// The signature does not verify under the given key.
    #[error("the checkpoint's signature does not verify under the collector's archive key")]
    BadSignature,
}

/// One archived segment, as a checkpoint lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentRecord {
    /// Its object key.
    pub key: String,
    /// Its hash (hex): see [`crate::segment`].
    pub hash: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its tenant.
    pub tenant: String,
    /// Its host.
    pub host: String,
    /// Oldest record, ns.
    pub first_ns: i64,
    /// Newest record, ns.
    pub last_ns: i64,
    /// Records in it.
    pub records: u64,
}

impl SegmentRecord {
    /// The Merkle leaf: the object key, a zero byte, and the hash, so a
    /// segment cannot be moved to another key unnoticed.
    pub fn leaf(&self) -> Hash {
        let mut data = Vec::with_capacity(self.key.len() + 1 + 64);
        data.extend_from_slice(self.key.as_bytes());
        data.push(0);
        data.extend_from_slice(self.hash.as_bytes());
        merkle::leaf_hash(&data)
    }
}

/// A segment removed on purpose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deletion {
    /// Its object key.
    pub key: String,
    /// Its hash (hex).
    pub hash: String,
    /// Why: `retention`.
    pub reason: String,
}

/// What a checkpoint says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    /// The collector that wrote it.
    pub collector: String,
    /// Its number in the collector's chain, from 1.
    pub seq: u64,
    /// SHA-256 (hex) of the previous checkpoint file; 64 zeros for the first.
    pub prev: String,
    /// The window covered: since the previous checkpoint, ns.
    pub from_ns: i64,
    /// Until now, ns.
    pub to_ns: i64,
    /// Segments archived in the window, in order.
    pub segments: Vec<SegmentRecord>,
    /// The Merkle root (hex) over the segments' leaves.
    pub root: String,
    /// Segments deleted in the window, by policy.
    #[serde(default)]
    pub deleted: Vec<Deletion>,
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses 64 hex digits.
pub fn parse_hash(text: &str) -> Option<Hash> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl CheckpointBody {
    /// The Merkle root of its segments.
    pub fn compute_root(&self) -> Hash {
        let leaves: Vec<Hash> = self.segments.iter().map(SegmentRecord::leaf).collect();
        merkle::root(&leaves)
    }

    /// Signs the body (setting its root) into a checkpoint file.
    pub fn sign(mut self, key: &Ed25519KeyPair) -> Vec<u8> {
        self.root = hex(&self.compute_root());
        let body = serde_json::to_vec_pretty(&self).expect("a checkpoint serialises");
        let mut message = Vec::with_capacity(TAG.len() + 1 + body.len());
        message.extend_from_slice(TAG.as_bytes());
        message.push(b'\n');
        message.extend_from_slice(&body);
        let signature = key.sign(&message);
        let mut file = format!("{TAG}\nsignature {}\n", hex(signature.as_ref())).into_bytes();
        file.extend_from_slice(&body);
        file
    }
}

/// A parsed checkpoint file.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// What it says.
    pub body: CheckpointBody,
    /// SHA-256 of the whole file (what the next checkpoint's `prev` holds).
    pub file_hash: Hash,
    signature: Vec<u8>,
    signed: Vec<u8>,
}

impl Checkpoint {
    /// Parses a checkpoint file (its signature is checked by [`Checkpoint::verify`]).
    pub fn parse(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
        if bytes.len() > MAX_CHECKPOINT {
            return Err(CheckpointError::TooLarge(bytes.len()));
        }
        let rest = bytes
            .strip_prefix(TAG.as_bytes())
            .and_then(|r| r.strip_prefix(b"\nsignature "))
            .ok_or(CheckpointError::NotACheckpoint)?;
        let newline = rest.iter().position(|&b| b == b'\n').ok_or(CheckpointError::NotACheckpoint)?;
        let signature_hex =
            std::str::from_utf8(&rest[..newline]).map_err(|_| CheckpointError::NotACheckpoint)?;
        if signature_hex.len() != 128 {
            return Err(CheckpointError::Malformed("signature length".into()));
        }
        let signature = (0..64)
            .map(|i| u8::from_str_radix(signature_hex.get(2 * i..2 * i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| CheckpointError::Malformed("signature is not hex".into()))?;
        let body_bytes = &rest[newline + 1..];
        let body: CheckpointBody =
            serde_json::from_slice(body_bytes).map_err(|e| CheckpointError::Malformed(e.to_string()))?;
        let mut signed = Vec::with_capacity(TAG.len() + 1 + body_bytes.len());
        signed.extend_from_slice(TAG.as_bytes());
        signed.push(b'\n');
        signed.extend_from_slice(body_bytes);
        let file_hash =
            ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().try_into().expect("32 bytes");
        Ok(Checkpoint { body, file_hash, signature, signed })
    }

    /// Checks the signature under the collector's archive public key.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), CheckpointError> {
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(&self.signed, &self.signature)
            .map_err(|_| CheckpointError::BadSignature)
    }
}

/// The public half of an archive key, for `--checkpoint-key`.
pub fn public_key(key: &Ed25519KeyPair) -> Vec<u8> {
    key.public_key().as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap()
    }

    fn body() -> CheckpointBody {
        CheckpointBody {
            collector: "c1".into(),
            seq: 1,
            prev: "0".repeat(64),
            from_ns: 0,
            to_ns: 10,
            segments: vec![SegmentRecord {
                key: "acme/2026/11/24/web-1/00000000000000000001".into(),
                hash: "ab".repeat(32),
                size: 100,
                tenant: "acme".into(),
                host: "web-1".into(),
                first_ns: 1,
                last_ns: 2,
                records: 3,
            }],
            root: String::new(),
            deleted: Vec::new(),
        }
    }

    #[test]
    fn a_signed_checkpoint_verifies_and_any_change_does_not() {
        let key = key();
        let file = body().sign(&key);
        let checkpoint = Checkpoint::parse(&file).unwrap();
        checkpoint.verify(&public_key(&key)).unwrap();
        assert_eq!(checkpoint.body.root, hex(&checkpoint.body.compute_root()));
        assert_eq!(Checkpoint::parse(&file).unwrap().body, checkpoint.body);
        // Another key's signature.
        let other = key_other();
        assert_eq!(checkpoint.verify(&public_key(&other)), Err(CheckpointError::BadSignature));
        // A changed body.
        let text = String::from_utf8(file.clone()).unwrap().replace("\"records\": 3", "\"records\": 4");
        let changed = Checkpoint::parse(text.as_bytes()).unwrap();
        assert_eq!(changed.verify(&public_key(&key)), Err(CheckpointError::BadSignature));
        // Another key's re-signing of the same body.
        let resigned = Checkpoint::parse(&body().sign(&other)).unwrap();
        assert_eq!(resigned.verify(&public_key(&key)), Err(CheckpointError::BadSignature));
    }

    fn key_other() -> Ed25519KeyPair {
        key()
    }

    proptest! {
        #[test]
        fn parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = Checkpoint::parse(&bytes);
            let mut framed = format!("{TAG}\nsignature {}\n", "00".repeat(64)).into_bytes();
            framed.extend_from_slice(&bytes);
            let _ = Checkpoint::parse(&framed);
        }
    }
}
