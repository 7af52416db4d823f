//! Records from HTTP senders (the Elasticsearch bulk API, OTLP) into the
//! WAL, with the guarantees of the native path.
//!
//! A sender authenticates with a bearer token whose role is `writer`; the
//! tenant comes from the token and `host` is the token's subject, never a
//! value from the payload (a host named in a record is kept as a field,
//! a claim). Records are made into batches signed with the collector's own
//! key (`DATA/keys/http-batch.key`), so the WAL and the archive hold only
//! signed batches, and each (tenant, host, source) is one chained stream,
//! with a fresh epoch each time the collector starts. A request is
//! answered only once its batches are fsynced.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use logvault_storage::WireRecord;
use logvault_storage::batch::{BatchBuilder, Deflater, encoded_batch_hash, peek_header};
use logvault_storage::record::FLAG_TRUNCATED;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::metrics::IngestStats;
use crate::wal::{AppendRequest, Appended, Wal};

/// Records in one batch, at most.
const BATCH_RECORDS: u32 = 2000;
/// Record bytes in one batch, at most.
const BATCH_BYTES: usize = 1024 * 1024;
/// Streams remembered at once; past it the idle ones are forgotten (a
/// forgotten stream starts a new chain in a new epoch when it comes back).
const MAX_STREAMS: usize = 4096;

/// Why records were not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The WAL is at its cap or its disk past the high watermark: retry
    /// later. Nothing of the batch was stored.
    #[error("the collector is busy (its WAL is full); retry later")]
    Busy,
    /// The WAL failed; nothing of the batch was stored.
    #[error("the collector could not store the records: {0}")]
    Failed(String),
}

#[derive(Debug)]
struct Chain {
    epoch: u64,
    next_seq: u64,
    prev_hash: [u8; 32],
}

type StreamKey = (String, String, String);

/// The HTTP senders' side of the WAL.
pub struct HttpSenders {
    wal: Wal,
    stats: Arc<IngestStats>,
    key: Ed25519KeyPair,
    next_epoch: AtomicU64,
    streams: std::sync::Mutex<HashMap<StreamKey, Arc<tokio::sync::Mutex<Chain>>>>,
}

impl std::fmt::Debug for HttpSenders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSenders").finish_non_exhaustive()
    }
}

impl HttpSenders {
    /// Senders storing into `wal`, batches signed with `key`.
    pub fn new(wal: Wal, stats: Arc<IngestStats>, key: Ed25519KeyPair) -> Self {
        HttpSenders {
            wal,
            stats,
            key,
            next_epoch: AtomicU64::new(crate::time::now_ns().max(0) as u64),
            streams: std::sync::Mutex::default(),
        }
    }

    /// Whether a store would be refused as busy now.
    pub fn is_busy(&self) -> bool {
        self.wal.is_busy()
    }

    /// Stores `records` of `source` for `host` in `tenant`, in order, in
    /// batches; returns once every batch is fsynced. On an error, the
    /// records of the batches before it are stored and `Err` says how many
    /// were: the caller answers the rest as not stored.
    pub async fn store(
        &self,
        tenant: &str,
        host: &str,
        source: &str,
        records: &[WireRecord],
    ) -> Result<(), (usize, StoreError)> {
        let chain = self.chain(tenant, host, source);
        // One request at a time per stream: its batches chain in order.
        let mut chain = chain.lock().await;
        // Compressed as an agent's batches are, so the archive stores them
        // as they are.
        let mut deflater = Deflater::zstd(1).map_err(|e| (0, StoreError::Failed(e.to_string())))?;
        let (mut stored, mut collisions) = (0, 0);
        while stored < records.len() {
            let mut builder = BatchBuilder::new(host, source, chain.epoch, chain.next_seq, chain.prev_hash);
            for record in &records[stored..] {
                if builder.len() >= BATCH_RECORDS || builder.body_bytes() >= BATCH_BYTES {
                    break;
                }
                builder.push_parts(
                    record.timestamp_ns,
                    record.level,
                    record.flags,
                    &record.message,
                    &record.fields,
                );
            }
            let count = builder.len() as usize;
            let bytes = builder.sign_with(&self.key, Some(&mut deflater));
            let (Ok(header), Ok(hash)) = (peek_header(&bytes), encoded_batch_hash(&bytes)) else {
                return Err((stored, StoreError::Failed("a batch built here does not decode".into())));
            };
            if self.wal.is_busy() {
                self.stats.refused(crate::metrics::Refusal::Busy);
                return Err((stored, StoreError::Busy));
            }
            let size = bytes.len();
            let request = AppendRequest {
                tenant: tenant.to_owned(),
                host: host.to_owned(),
                received_ns: crate::time::now_ns(),
                header,
                batch: bytes,
                signer: self.key.public_key().as_ref().to_vec(),
            };
            match self.wal.append(request).await {
                Ok(Appended::Stored { skipped: 0 }) => {
                    chain.next_seq += count as u64;
                    chain.prev_hash = hash;
                    stored += count;
                    self.stats.stored(tenant, size, count as u64);
                }
                Ok(_) => {
                    // The WAL held records of this stream and epoch already:
                    // an epoch used before (a clock set back across a
                    // restart). A fresh epoch, and the same records again.
                    collisions += 1;
                    if collisions > 3 {
                        return Err((stored, StoreError::Failed("no fresh epoch for the stream".into())));
                    }
                    tracing::warn!(%tenant, %host, %source, epoch = chain.epoch, "stream epoch used before; starting a new one");
                    *chain = self.fresh_chain();
                }
                Err(crate::wal::WalError::Full { .. } | crate::wal::WalError::Shared { .. }) => {
                    self.stats.refused(crate::metrics::Refusal::Busy);
                    return Err((stored, StoreError::Busy));
                }
                Err(err) => {
                    tracing::error!(%tenant, %host, %source, error = %err, "wal append of an http sender's batch failed");
                    return Err((stored, StoreError::Failed(err.to_string())));
                }
            }
        }
        Ok(())
    }

    fn chain(&self, tenant: &str, host: &str, source: &str) -> Arc<tokio::sync::Mutex<Chain>> {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let key = (tenant.to_owned(), host.to_owned(), source.to_owned());
        if let Some(chain) = streams.get(&key) {
            return chain.clone();
        }
        if streams.len() >= MAX_STREAMS {
            // Forget the streams no request holds.
            streams.retain(|_, chain| Arc::strong_count(chain) > 1);
        }
        let chain = Arc::new(tokio::sync::Mutex::new(self.fresh_chain()));
        streams.insert(key, chain.clone());
        chain
    }

    /// A chain in an epoch no other chain of this process had.
    fn fresh_chain(&self) -> Chain {
        Chain { epoch: self.next_epoch.fetch_add(1, Ordering::Relaxed), next_seq: 0, prev_hash: [0; 32] }
    }
}

/// Why an HTTP sender's request is refused before its records are read:
/// each route renders it in its own protocol's shape.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The answer's status (429 answers carry Retry-After).
    pub(crate) status: axum::http::StatusCode,
    /// Elasticsearch's error type for it.
    pub(crate) kind: &'static str,
    /// For people.
    pub(crate) reason: String,
}

/// A request the HTTP senders' routes take: who writes, where to, and its
/// body, read while holding one of the body slots.
pub(crate) struct Admitted {
    pub(crate) writer: crate::api::Writer,
    pub(crate) senders: Arc<HttpSenders>,
    pub(crate) body: axum::body::Bytes,
    pub(crate) slot: tokio::sync::OwnedSemaphorePermit,
}

/// How long reading a request body may take.
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// The checks both HTTP senders' routes make, in order: the writer (token
/// or certificate), an uncompressed body, a WAL that is not full, then the
/// body itself: never past `max_body_bytes` (the declared length is
/// checked before reading), within a deadline, at most `bodies` at once.
pub(crate) async fn admit(
    state: &crate::api::ApiState,
    headers: &axum::http::HeaderMap,
    certificate: Option<&crate::api::SenderCertificate>,
    tenant: Option<&str>,
    body: axum::body::Body,
) -> Result<Admitted, Refusal> {
    use axum::http::{StatusCode, header};
    let refuse = |status, kind, reason: String| Refusal { status, kind, reason };
    let writer = crate::api::authenticate_writer(state, headers, certificate, tenant)
        .map_err(|err| refuse(err.status(), "security_exception", err.message().to_owned()))?;
    if headers.get(header::CONTENT_ENCODING).is_some_and(|e| e.as_bytes() != b"identity") {
        return Err(refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "illegal_argument_exception",
            "compressed request bodies are not accepted; send the body as is".into(),
        ));
    }
    let Some(senders) = state.senders.clone() else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            "illegal_argument_exception",
            "no http senders on this collector".into(),
        ));
    };
    if senders.is_busy() {
        return Err(refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "es_rejected_execution_exception",
            StoreError::Busy.to_string(),
        ));
    }
    let too_large = || {
        refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "content_too_long_exception",
            format!("the request body is over {} bytes", state.max_body_bytes),
        )
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes as u64) {
        return Err(too_large());
    }
    let slot = tokio::time::timeout(std::time::Duration::from_secs(10), state.bodies.clone().acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "es_rejected_execution_exception",
                "too many requests being read at once; retry later".into(),
            )
        })?;
    let body =
        match tokio::time::timeout(BODY_DEADLINE, axum::body::to_bytes(body, state.max_body_bytes)).await {
            Ok(read) => read.map_err(|_| too_large())?,
            Err(_) => {
                return Err(refuse(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout_exception",
                    format!("the request body did not arrive within {} s", BODY_DEADLINE.as_secs()),
                ));
            }
        };
    Ok(Admitted { writer, senders, body, slot })
}

/// Cuts `text` to at most `max` bytes at a character boundary, setting
/// `FLAG_TRUNCATED` in `flags` when it did.
pub(crate) fn cut(text: &mut String, max: usize, flags: &mut u8) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        *flags |= FLAG_TRUNCATED;
    }
}
