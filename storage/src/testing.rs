//! Hostile input for tests: batches whose codec and decoded length say
//! whatever the test wants, hashed and signed like real ones. Behind the
//! `testing` feature; never used by the agent or the collector.

use ring::digest;
use ring::signature::Ed25519KeyPair;

use crate::batch::{MAGIC_V2, MAGIC_V3};
use crate::wire::put_str16;

/// A batch (version 2 or 3) of one record whose stored section is
/// `stored`, with the given `codec` byte and declared `raw_len`, signed by
/// `key`.
#[allow(clippy::too_many_arguments)]
pub fn forge_batch(
    key: &Ed25519KeyPair,
    agent_id: &str,
    source: &str,
    version: u8,
    codec: u8,
    raw_len: u32,
    stored: &[u8],
) -> Vec<u8> {
    let mut out = if version == 2 { MAGIC_V2 } else { MAGIC_V3 }.to_vec();
    put_str16(&mut out, agent_id);
    put_str16(&mut out, source);
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes());
    out.push(codec);
    out.extend_from_slice(&raw_len.to_be_bytes());
    out.extend_from_slice(&[0; 32]);
    out.extend_from_slice(&(stored.len() as u32).to_be_bytes());
    out.extend_from_slice(digest::digest(&digest::SHA256, stored).as_ref());
    let signature = key.sign(&out);
    out.extend_from_slice(signature.as_ref());
    out.extend_from_slice(stored);
    out
}
