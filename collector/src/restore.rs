//! Replaying the archive: segments back into a WAL and an index that
//! `logvault serve` can serve (reprocessing is a replay of the stream).
//!
//! Segments are read in the order their collector sealed them (by
//! collector and segment number), decrypted with the keyring, and each
//! batch is appended to a fresh WAL under `DIR/wal`, through the same
//! dedup and chain checks as live ingest; then the index under
//! `DIR/index` is built from that WAL.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use logvault_storage::archive::{Archive, CHECKPOINT_PREFIX};
use logvault_storage::batch::peek_header;
use logvault_storage::keyring::Keyring;
use logvault_storage::segment::SegmentView;
use tokio_util::sync::CancellationToken;

use crate::wal::{AppendRequest, Wal, WalOptions};

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// Segments replayed.
    pub segments: u64,
    /// Batches appended.
    pub batches: u64,
    /// Records now in the index.
    pub records: u64,
}

/// Replays every segment of `archive` with records in `[from_ns, to_ns)`
/// into `into` (a data directory `logvault serve` can use).
pub async fn restore(
    archive: &Archive,
    keyring: &Keyring,
    from_ns: Option<i64>,
    to_ns: Option<i64>,
    into: &Path,
) -> anyhow::Result<Restored> {
    let wal_dir = into.join("wal");
    let options = WalOptions { segment_bytes: 64 << 20, queue: 1024, max_bytes: 0, accept_gaps: true };
    let (wal, wal_thread) = Wal::open(&wal_dir, &options)?;
    let mut segments = Vec::new();
    for (key, _) in archive.list("").await? {
        if key.starts_with(CHECKPOINT_PREFIX) {
            continue;
        }
        let bytes = archive.get(&key).await?;
        let view = SegmentView::parse(&bytes).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        let header = view.header.clone();
        let wanted =
            from_ns.is_none_or(|from| header.last_ns >= from) && to_ns.is_none_or(|to| header.first_ns < to);
        if wanted {
            segments.push(((header.collector.clone(), header.segment_id.clone()), key));
        }
    }
    segments.sort();
    let mut restored = Restored::default();
    for (_, key) in &segments {
        let bytes = archive.get(key).await?;
        let view = SegmentView::parse(&bytes).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        let entries = view.entries(keyring, 1 << 34).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
        for entry in entries {
            let header = peek_header(&entry.batch).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
            let signer =
                view.header.signers.get(usize::from(entry.signer)).map(|s| s.to_vec()).unwrap_or_default();
            let request = AppendRequest {
                tenant: view.header.tenant.clone(),
                host: view.header.host.clone(),
                received_ns: entry.received_ns,
                batch: entry.batch,
                header,
                signer,
            };
            wal.append(request).await?;
            restored.batches += 1;
        }
        restored.segments += 1;
    }
    let durable = wal.durable_counter();
    drop(wal);
    tokio::task::spawn_blocking(move || wal_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the wal writer panicked"))?;

    // The index, built from the WAL as a running collector would.
    let index = Arc::new(crate::index::LogIndex::open(&into.join("index"))?);
    let progress = Arc::new(crate::index::IndexProgress::default());
    let cancel = CancellationToken::new();
    let until = durable.load(Ordering::Acquire);
    let indexer = {
        let (index, progress, cancel, wal_dir) =
            (index.clone(), progress.clone(), cancel.clone(), wal_dir.clone());
        std::thread::spawn(move || {
            crate::index::run_indexer(index, wal_dir, durable, progress, Duration::from_millis(500), cancel)
        })
    };
    while progress.committed.load(Ordering::Acquire) < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if indexer.is_finished() {
            break;
        }
    }
    cancel.cancel();
    tokio::task::spawn_blocking(move || indexer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the indexer panicked"))??;
    restored.records = index.indexed_up_to().next_id;
    Ok(restored)
}
