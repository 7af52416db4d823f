//! Sealing the WAL into the archive, and signing checkpoints.
//!
//! The sealer follows the WAL behind the fsync like the indexer does. Once
//! `segment_bytes` of it wait, or the oldest waiting entry is
//! `seal_interval` old, it reads that range, groups its entries by tenant
//! and host, seals each group into a segment (zstd, then AES-256-GCM in
//! chunks under a fresh data key wrapped by the KEK) and uploads it; an
//! upload counts only once the object reads back the same. Only then does
//! the sealed position move on, saved atomically with the list of
//! segments not yet in a checkpoint. A crash in between seals the same
//! range again, under the same segment ids, over the same keys.
//!
//! Every `checkpoint_interval`, also when nothing arrived, it signs a
//! checkpoint of the segments sealed since the last one, chained to it by
//! hash, and uploads it the same way.
//!
//! While the object store is down, the WAL grows; past
//! `max_pending_bytes` the collector refuses new batches as busy, so
//! agents keep their data (spool or files) instead of anything being lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use logvault_storage::archive::{Archive, checkpoint_key, segment_key};
use logvault_storage::batch::{BatchView, Limits};
use logvault_storage::checkpoint::{CheckpointBody, Deletion, SegmentRecord, hex};
use logvault_storage::keyring::Kek;
use logvault_storage::segment::{self, SegmentHeader};
use ring::signature::Ed25519KeyPair;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::ArchiveConfig;
use crate::wal::{self, WalBusy};

/// Why the sealer could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// A key file is unusable.
    #[error("{path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The archive URI is unusable.
    #[error(transparent)]
    Archive(#[from] logvault_storage::archive::ArchiveError),
    /// The sealer's state file is unusable.
    #[error("{path}: {message}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// What survives a restart: where sealing stands and what the next
/// checkpoint must list.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct SealState {
    /// WAL position up to which everything is archived.
    sealed_position: u64,
    /// The next segment's number.
    next_segment: u64,
    /// The last checkpoint's number (0: none yet).
    checkpoint_seq: u64,
    /// The last checkpoint file's SHA-256 (hex); 64 zeros before the first.
    checkpoint_hash: String,
    /// When the last checkpoint's window ended, ns.
    checkpoint_to_ns: i64,
    /// Segments sealed since the last checkpoint.
    pending: Vec<SegmentRecord>,
    /// Segments deleted by retention since the last checkpoint.
    #[serde(default)]
    deleted: Vec<Deletion>,
    /// Every segment archived and not yet deleted, with when it was
    /// sealed (ns), for retention.
    #[serde(default)]
    catalog: Vec<(SegmentRecord, i64)>,
}

impl SealState {
    fn load(path: &Path) -> Result<SealState, SealError> {
        let err = |message: String| SealError::State { path: path.to_owned(), message };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(SealState { checkpoint_hash: "0".repeat(64), ..SealState::default() })
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Written to a temporary file, fsynced, renamed over the old one.
    fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(self).expect("the state serialises"))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Progress of the sealer, for metrics.
#[derive(Debug, Default)]
pub struct SealProgress {
    /// WAL position archived.
    pub sealed_position: AtomicU64,
    /// Segments uploaded and verified.
    pub segments: AtomicU64,
    /// Checkpoints written.
    pub checkpoints: AtomicU64,
    /// Uploads that failed (retried).
    pub failures: AtomicU64,
}

/// Reads the archive key (PKCS#8 PEM), creating it and its `.pub` (SPKI
/// PEM, what `logvault audit --checkpoint-key` takes) when missing.
pub fn load_or_create_archive_key(path: &Path) -> Result<Ed25519KeyPair, SealError> {
    let key_err = |message: String| SealError::Key { path: path.to_owned(), message };
    crate::auth::ensure_key_pair(path).map_err(|e| key_err(e.to_string()))?;
    let pem_text = std::fs::read(path).map_err(|e| key_err(e.to_string()))?;
    let block = pem::parse(&pem_text).map_err(|e| key_err(e.to_string()))?;
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(block.contents()).map_err(|e| key_err(e.to_string()))
}

/// Reads an Ed25519 public key in SPKI PEM (an archive key's `.pub`).
pub fn read_public_key(path: &Path) -> Result<Vec<u8>, SealError> {
    let key_err = |message: String| SealError::Key { path: path.to_owned(), message };
    let text = std::fs::read(path).map_err(|e| key_err(e.to_string()))?;
    crate::auth::raw_public_key(&text).map_err(key_err)
}

/// The sealer, ready to run.
pub struct Sealer {
    config: ArchiveConfig,
    archive: Archive,
    kek: Kek,
    key: Ed25519KeyPair,
    wal_dir: PathBuf,
    state_path: PathBuf,
    state: SealState,
    durable: Arc<AtomicU64>,
    busy: WalBusy,
    progress: Arc<SealProgress>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("archive", &self.archive.uri())
            .field("kek", &self.kek)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Opens the archive, the keys and the sealer's state under `data_dir`.
    pub fn new(
        config: &ArchiveConfig,
        data_dir: &Path,
        durable: Arc<AtomicU64>,
        busy: WalBusy,
        progress: Arc<SealProgress>,
    ) -> Result<Sealer, SealError> {
        let kek = Kek::load(&config.kek_file)
            .map_err(|e| SealError::Key { path: config.kek_file.clone(), message: e.to_string() })?;
        let key = load_or_create_archive_key(&config.checkpoint_key)?;
        let archive = Archive::open(&config.uri)?;
        let dir = data_dir.join("archive");
        std::fs::create_dir_all(&dir)
            .map_err(|e| SealError::State { path: dir.clone(), message: e.to_string() })?;
        let state_path = dir.join("state.json");
        let state = SealState::load(&state_path)?;
        progress.sealed_position.store(state.sealed_position, Ordering::Release);
        Ok(Sealer {
            config: config.clone(),
            archive,
            kek,
            key,
            wal_dir: data_dir.join("wal"),
            state_path,
            state,
            durable,
            busy,
            progress,
        })
    }

    /// Seals and checkpoints until `cancel` fires; on the way out it seals
    /// what waits and writes a last checkpoint.
    pub async fn run(mut self, cancel: CancellationToken) {
        let seal_interval = Duration::from_millis(self.config.seal_interval_ms);
        let checkpoint_interval = Duration::from_millis(self.config.checkpoint_interval_ms);
        let mut waiting_since: Option<Instant> = None;
        let mut last_checkpoint = Instant::now();
        let mut backoff = Duration::from_secs(1);
        loop {
            let stopping = cancel.is_cancelled();
            let pending_bytes =
                self.durable.load(Ordering::Acquire).saturating_sub(self.state.sealed_position);
            let behind = pending_bytes > self.config.max_pending_bytes;
            if self.busy.set_archive_behind(behind) != behind {
                if behind {
                    tracing::error!(
                        pending_bytes,
                        max = self.config.max_pending_bytes,
                        "archive too far behind: refusing new batches as busy"
                    );
                } else {
                    tracing::info!("archive caught up: taking batches again");
                }
            }
            if pending_bytes > 0 {
                let since = *waiting_since.get_or_insert_with(Instant::now);
                if stopping || pending_bytes >= self.config.segment_bytes || since.elapsed() >= seal_interval
                {
                    match self.seal_once().await {
                        Ok(()) => {
                            backoff = Duration::from_secs(1);
                            if self.durable.load(Ordering::Acquire) <= self.state.sealed_position {
                                waiting_since = None;
                            }
                            continue;
                        }
                        Err(message) => {
                            self.progress.failures.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(error = %message, retry_in_ms = backoff.as_millis() as u64, "sealing failed; the wal keeps the data");
                            if stopping {
                                return;
                            }
                            tokio::select! {
                                _ = cancel.cancelled() => {}
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(30));
                            continue;
                        }
                    }
                }
            } else {
                waiting_since = None;
            }
            if stopping || last_checkpoint.elapsed() >= checkpoint_interval {
                if let Err(message) = self.expire().await {
                    self.progress.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %message, "retention failed; retrying at the next checkpoint");
                }
                match self.checkpoint().await {
                    Ok(()) => last_checkpoint = Instant::now(),
                    Err(message) => {
                        self.progress.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %message, "checkpoint failed; retrying");
                    }
                }
            }
            if stopping {
                return;
            }
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Seals the next range of the WAL; Err says why nothing moved.
    async fn seal_once(&mut self) -> Result<(), String> {
        let from = self.state.sealed_position;
        let until = self.durable.load(Ordering::Acquire);
        let (wal_dir, max) = (self.wal_dir.clone(), self.config.segment_bytes);
        let entries = tokio::task::spawn_blocking(move || wal::read_range(&wal_dir, from, until, max))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let Some(last) = entries.last() else { return Ok(()) };
        let next_position = last.next;
        // One segment per tenant and host, in WAL order within each; void
        // entries (never acked, stored by another collector) are not sealed.
        let mut groups: BTreeMap<(String, String), Vec<wal::Entry>> = BTreeMap::new();
        for entry in entries.into_iter().filter(|entry| !entry.void) {
            groups.entry((entry.tenant.clone(), entry.host.clone())).or_default().push(entry);
        }
        let mut sealed = Vec::new();
        let mut next_segment = self.state.next_segment;
        for ((tenant, host), group) in groups {
            let segment_id = format!("{}-{next_segment:020}", self.config.collector_id);
            next_segment += 1;
            let (kek, level, collector) =
                (self.kek.clone(), self.config.zstd_level, self.config.collector_id.clone());
            let built = tokio::task::spawn_blocking(move || {
                build_segment(&collector, &tenant, &host, &segment_id, &group, level, &kek)
            })
            .await
            .map_err(|e| e.to_string())??;
            let (record, bytes) = built;
            self.archive.put_verified(&record.key, &bytes).await.map_err(|e| e.to_string())?;
            tracing::debug!(key = %record.key, bytes = bytes.len(), records = record.records, "segment archived");
            sealed.push(record);
        }
        let mut state = self.state.clone();
        state.sealed_position = next_position;
        state.next_segment = next_segment;
        state.pending.extend(sealed.iter().cloned());
        let now = crate::time::now_ns();
        state.catalog.extend(sealed.iter().map(|record| (record.clone(), now)));
        self.commit(state).await?;
        self.progress.sealed_position.store(next_position, Ordering::Release);
        self.progress.segments.fetch_add(sealed.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Signs and uploads a checkpoint of the segments sealed since the last.
    async fn checkpoint(&mut self) -> Result<(), String> {
        let now = crate::time::now_ns();
        let seq = self.state.checkpoint_seq + 1;
        let body = CheckpointBody {
            collector: self.config.collector_id.clone(),
            seq,
            prev: self.state.checkpoint_hash.clone(),
            from_ns: self.state.checkpoint_to_ns,
            to_ns: now,
            segments: self.state.pending.clone(),
            root: String::new(),
            deleted: self.state.deleted.clone(),
        };
        let file = body.sign(&self.key);
        let key = checkpoint_key(&self.config.collector_id, seq).map_err(|e| e.to_string())?;
        self.archive.put_verified(&key, &file).await.map_err(|e| e.to_string())?;
        let mut state = self.state.clone();
        state.checkpoint_seq = seq;
        state.checkpoint_hash = hex(ring::digest::digest(&ring::digest::SHA256, &file).as_ref());
        state.checkpoint_to_ns = now;
        state.pending.clear();
        state.deleted.clear();
        let listed = self.state.pending.len();
        self.commit(state).await?;
        self.progress.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%key, segments = listed, "checkpoint written");
        Ok(())
    }

    /// Deletes the segments sealed longer than `retention_ms` ago; each is
    /// listed in the next checkpoint, so the audit tells policy from
    /// tampering. A segment is deleted only after the checkpoint naming it.
    async fn expire(&mut self) -> Result<(), String> {
        let Some(retention_ms) = self.config.retention_ms else { return Ok(()) };
        let cutoff = crate::time::now_ns().saturating_sub((retention_ms as i64).saturating_mul(1_000_000));
        let pending: std::collections::HashSet<&str> =
            self.state.pending.iter().map(|r| r.key.as_str()).collect();
        let expired: Vec<SegmentRecord> = self
            .state
            .catalog
            .iter()
            .filter(|(record, sealed_ns)| *sealed_ns < cutoff && !pending.contains(record.key.as_str()))
            .map(|(record, _)| record.clone())
            .collect();
        if expired.is_empty() {
            return Ok(());
        }
        for record in &expired {
            self.archive.delete(&record.key).await.map_err(|e| e.to_string())?;
        }
        let mut state = self.state.clone();
        let gone: std::collections::HashSet<&str> = expired.iter().map(|r| r.key.as_str()).collect();
        state.catalog.retain(|(record, _)| !gone.contains(record.key.as_str()));
        state.deleted.extend(expired.iter().map(|record| Deletion {
            key: record.key.clone(),
            hash: record.hash.clone(),
            reason: "retention".into(),
        }));
        self.commit(state).await?;
        tracing::info!(segments = expired.len(), "segments past retention deleted");
        Ok(())
    }

    /// Saves `state` durably, then makes it the current one.
    async fn commit(&mut self, state: SealState) -> Result<(), String> {
        let path = self.state_path.clone();
        let saved = state.clone();
        tokio::task::spawn_blocking(move || saved.save(&path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.state = state;
        Ok(())
    }
}

/// Seals one group of WAL entries (one tenant and host) into a segment.
fn build_segment(
    collector: &str,
    tenant: &str,
    host: &str,
    segment_id: &str,
    group: &[wal::Entry],
    level: i32,
    kek: &Kek,
) -> Result<(SegmentRecord, Vec<u8>), String> {
    let mut signers: Vec<[u8; 32]> = Vec::new();
    let mut raw = Vec::with_capacity(group.iter().map(|e| e.batch.len() + 17).sum());
    let (mut first_ns, mut last_ns, mut records) = (i64::MAX, i64::MIN, 0u64);
    let limits = Limits::TRUSTED;
    let mut inflater = logvault_storage::batch::Inflater::new();
    for entry in group {
        let signer: [u8; 32] = entry.signer.as_slice().try_into().unwrap_or([0; 32]);
        let index = match signers.iter().position(|s| *s == signer) {
            Some(index) => index,
            None => {
                if signers.len() == segment::MAX_SIGNERS {
                    return Err("more than 255 signer keys in one segment".into());
                }
                signers.push(signer);
                signers.len() - 1
            }
        };
        if let Ok(batch) = BatchView::parse(&entry.batch, &limits)
            && let Ok(list) = batch.records(&limits, &mut inflater)
        {
            let mut seq = batch.header.first_seq;
            let _ = list.for_each(&limits, |record| {
                if seq >= batch.header.first_seq + u64::from(entry.skip) {
                    first_ns = first_ns.min(record.timestamp_ns);
                    last_ns = last_ns.max(record.timestamp_ns);
                    records += 1;
                }
                seq += 1;
            });
        }
        segment::encode_entry_parts(&mut raw, entry.received_ns, entry.skip, index as u8, &entry.batch);
    }
    if records == 0 {
        (first_ns, last_ns) = (group[0].received_ns, group[0].received_ns);
    }
    let header = SegmentHeader {
        algorithm: segment::ALGORITHM_ZSTD_AES256GCM,
        chunk_size: segment::DEFAULT_CHUNK,
        segment_id: segment_id.to_owned(),
        collector: collector.to_owned(),
        tenant: tenant.to_owned(),
        host: host.to_owned(),
        first_ns,
        last_ns,
        created_ns: crate::time::now_ns(),
        batches: group.len() as u32,
        records,
        raw_len: 0,
        signers,
    };
    let key = segment_key(tenant, host, first_ns, segment_id).map_err(|e| e.to_string())?;
    let sealed = segment::seal(header, &raw, level, kek);
    let record = SegmentRecord {
        key,
        hash: hex(&sealed.hash),
        size: sealed.bytes.len() as u64,
        tenant: tenant.to_owned(),
        host: host.to_owned(),
        first_ns,
        last_ns,
        records,
    };
    Ok((record, sealed.bytes))
}
