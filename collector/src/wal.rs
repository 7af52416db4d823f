//! The write-ahead log: every batch the collector acks is here, fsynced.
//!
//! One writer thread owns the files. Connections send it append requests
//! through a bounded queue; it takes every request waiting, writes them,
//! calls `fdatasync` once for the group and only then answers each (group
//! commit). The same thread keeps the per-stream high-water marks, so a
//! resent batch is recognised by (tenant, host, source, epoch, seq) and
//! stored once, whichever connection it arrives on.
//!
//! Files are `wal/<base-position>.wal`, rolled at `segment_bytes`. Entry
//! layout (version 3, big-endian):
//!
//! ```text
//! len u32 | crc32 u32 (of the payload but its state byte) | payload:
//!   version u8 = 3 | state u8 (0x00 live, 0x5A void)
//!   | received_ns i64 | tenant u16+UTF-8 | host u16+UTF-8
//!   | skip u32 (leading records already stored by an earlier batch)
//!   | signer u8+bytes (the Ed25519 public key the batch verified under)
//!   | the agent's signed batch, byte for byte
//! ```
//!
//! A void entry is one a collector sharing a bucket wrote but did not
//! ack, because another collector stored its records first (see
//! [`crate::cluster`]): it is never indexed, sealed or counted by dedup.
//! It is made void by writing that one byte in place, which cannot be torn,
//! so the checksum leaves it out; any value but the two is damage.
//! Versions 1 (no signer) and 2 (no state byte) are still read.
//!
//! On open the last segment's torn tail (a crash mid-write) is cut off at
//! the last whole entry; everything before it was fsynced.
//!
//! Segments that are indexed and archived can be removed ([`Wal::prune`]).
//! The writer first saves what dedup and the chain check know of every
//! stream to `streams.snapshot`, as of the durable end; on open that
//! snapshot is loaded and only the entries after it are scanned, so a
//! resend or a replay of a pruned batch is still recognised.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};

use logvault_storage::io::read_full;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use logvault_storage::batch::{BatchHeader, encoded_batch_hash, peek_header};
use logvault_storage::frame::BatchRef;
use tokio::sync::{mpsc, oneshot};

mod shared;

const ENTRY_VERSION: u8 = 3;
/// An entry's state byte (version 3): live.
const LIVE: u8 = 0x00;
/// ... or void: written, never acked, never to be read as stored.
const VOID: u8 = 0x5A;
/// Where the state byte is in an entry (length, checksum, version first).
const STATE_AT: usize = 9;
/// Largest entry accepted when reading back, a guard against a corrupt length.
const MAX_ENTRY: u32 = 64 * 1024 * 1024;
/// Largest batch the WAL takes: an entry's tenant, host and header fit in
/// the rest of [`MAX_ENTRY`]. `ingest.max_frame_bytes` may not exceed it.
pub const MAX_BATCH_BYTES: u32 = 32 * 1024 * 1024;
/// Requests taken into one group commit, at most.
const MAX_GROUP: usize = 1024;
/// The stream snapshot's file name, in the WAL directory.
const SNAPSHOT: &str = "streams.snapshot";
const SNAPSHOT_MAGIC: &[u8; 4] = b"LVWS";
const SNAPSHOT_VERSION: u8 = 1;
/// Largest snapshot read back: far above any real one (a stream takes
/// about 40 KiB at most), a guard against a damaged file.
const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;
/// Batch links (end seq, hash) remembered per stream for the chain check.
/// The oldest ends are forgotten first; a batch whose predecessor would
/// be among the forgotten ones is taken unverified (and counted) rather
/// than refused, so a stale spool replaying old batches never jams.
const LINKS: usize = 1024;

/// How a batch breaks its stream's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceFault {
    /// It starts past the stream's end: records are missing before it (or
    /// batches arrive out of order).
    Gap,
    /// All its records are stored, but it is neither a resend of a stored
    /// batch nor chained to one: an old batch played again.
    Replay,
    /// Its previous-batch hash is not the hash of the stored batch it
    /// follows.
    Chain,
}

/// What dedup and the chain check know of a stream.
#[derive(Debug, Clone, Default)]
struct StreamState {
    /// One past the last stored sequence number.
    high: u64,
    /// Hashes of the stored batches by their end seq (several when the
    /// agent batched a range again after a restart).
    links: std::collections::BTreeMap<u64, Vec<[u8; 32]>>,
    /// Links kept.
    count: usize,
    /// Links ending at or below this were forgotten (0: none).
    floor: u64,
}

impl StreamState {
    fn record(&mut self, end: u64, hash: [u8; 32]) {
        self.high = self.high.max(end);
        let hashes = self.links.entry(end).or_default();
        if hashes.contains(&hash) {
            return;
        }
        hashes.push(hash);
        self.count += 1;
        while self.count > LINKS {
            let Some((end, hashes)) = self.links.pop_first() else { break };
            self.count -= hashes.len();
            self.floor = self.floor.max(end);
        }
    }

    fn knows(&self, hash: &[u8; 32]) -> bool {
        self.links.values().any(|hashes| hashes.contains(hash))
    }

    /// True when `prev` is a valid predecessor for a batch starting at
    /// `first_seq`: the hash of a stored batch ending there, or zeros at
    /// the stream's start.
    fn links_to(&self, first_seq: u64, prev: &[u8; 32]) -> bool {
        (first_seq == 0 && *prev == [0; 32]) || self.links.get(&first_seq).is_some_and(|h| h.contains(prev))
    }

    /// True when the predecessor of a batch starting at `first_seq` may
    /// have been forgotten, so its chain cannot be checked.
    fn forgot(&self, first_seq: u64) -> bool {
        first_seq != 0 && first_seq <= self.floor
    }
}

/// What becomes of a batch, given its stream's state.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Store {
        skipped: u32,
        gap: u64,
    },
    /// Every record is stored, but under other batch boundaries (the agent
    /// batched again after a restart): nothing new to index, yet the
    /// batch is written (all of it skipped) so the chain of the batches
    /// that follow it can be checked, after a restart too.
    Relink,
    /// A batch stored before, byte for byte.
    Duplicate,
    /// Chained to a batch older than the links remembered: stored (its new
    /// records, if any) without a chain check, and counted.
    Unverified {
        skipped: u32,
    },
    Refuse(SequenceFault, String),
}

fn judge(state: Option<&StreamState>, header: &BatchHeader, hash: &[u8; 32], accept_gaps: bool) -> Verdict {
    let Some(state) = state else {
        // A stream never seen (or from before this WAL): its chain starts here.
        return Verdict::Store { skipped: 0, gap: 0 };
    };
    let (first, end, high) = (header.first_seq, header.end_seq(), state.high);
    if header.count == 0 {
        return Verdict::Duplicate;
    }
    if end <= high {
        return if state.knows(hash) {
            Verdict::Duplicate
        } else if state.links_to(first, &header.prev_hash) {
            Verdict::Relink
        } else if state.forgot(first) {
            Verdict::Unverified { skipped: header.count }
        } else {
            Verdict::Refuse(
                SequenceFault::Replay,
                format!("records {first}..{end} are stored and this batch is not a resend of them"),
            )
        };
    }
    if first > high {
        if accept_gaps {
            return Verdict::Store { skipped: 0, gap: first - high };
        }
        return Verdict::Refuse(
            SequenceFault::Gap,
            format!(
                "batch starts at seq {first} but the stream ends at {high}: records {high}..{first} are missing"
            ),
        );
    }
    let skipped = (high - first) as u32;
    if state.links_to(first, &header.prev_hash) {
        Verdict::Store { skipped, gap: 0 }
    } else if state.forgot(first) {
        Verdict::Unverified { skipped }
    } else {
        Verdict::Refuse(
            SequenceFault::Chain,
            format!("batch at seq {first} names a previous batch this stream does not have there"),
        )
    }
}

/// Why the WAL failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// A file operation failed.
    #[error("wal {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        message: String,
    },
    /// A sealed segment holds a damaged entry.
    #[error("wal {path}: damaged entry at offset {offset}: {reason}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where in it.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A write or fsync failed earlier; the WAL takes nothing more until
    /// the collector restarts and recovers it.
    #[error("wal stopped after a failed write; restart the collector")]
    Poisoned,
    /// The writer is shutting down.
    #[error("wal is shutting down")]
    Closed,
    /// The batch breaks its stream's sequence; nothing was stored.
    #[error("{message}")]
    Sequence {
        /// How.
        fault: SequenceFault,
        /// Why, with the numbers.
        message: String,
    },
    /// The shared bucket could not be read, or another collector took the
    /// stream's records first: nothing was stored; send again.
    #[error("{message}")]
    Shared {
        /// What happened.
        message: String,
    },
    /// The append would take the WAL past `wal.max_bytes`.
    #[error("wal is full: {size} bytes stored, cap {max} bytes; try again later")]
    Full {
        /// Bytes on disk now.
        size: u64,
        /// The cap.
        max: u64,
    },
}

fn io_err(path: &Path, err: std::io::Error) -> WalError {
    WalError::Io { path: path.to_owned(), message: err.to_string() }
}

/// How the WAL is set up.
#[derive(Debug, Clone, Copy)]
pub struct WalOptions {
    /// A segment is rolled past this size.
    pub segment_bytes: u64,
    /// Appends waiting for the writer, at most.
    pub queue: usize,
    /// Hard cap on the bytes on disk; 0 for none.
    pub max_bytes: u64,
    /// Store a batch that starts past its stream's end (counted and
    /// logged) instead of refusing it: for agents whose spool drops the
    /// oldest batches when full.
    pub accept_gaps: bool,
}

impl WalOptions {
    /// Options for tests and tools: 1 MiB segments, no cap, gaps refused.
    pub fn small() -> WalOptions {
        WalOptions { segment_bytes: 1 << 20, queue: 8, max_bytes: 0, accept_gaps: false }
    }
}

/// What a batch is appended with: who sent it, as the collector knows it.
#[derive(Debug)]
pub struct AppendRequest {
    /// The tenant of the sending agent.
    pub tenant: String,
    /// The agent's name from its certificate.
    pub host: String,
    /// When the batch arrived.
    pub received_ns: i64,
    /// The signed batch as received.
    pub batch: Vec<u8>,
    /// Its decoded header.
    pub header: BatchHeader,
    /// The Ed25519 public key the batch's signature verified under (the
    /// agent certificate's, or the collector's syslog key), kept so the
    /// archive can prove the signature later.
    pub signer: Vec<u8>,
}

/// What became of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Written and fsynced; `skipped` leading records were already stored.
    Stored {
        /// Records of this batch that an earlier batch had stored.
        skipped: u32,
    },
    /// Every record was stored before; nothing was written.
    Duplicate,
}

type Reply = oneshot::Sender<Result<Appended, WalError>>;

/// What the writer thread is asked to do.
enum Job {
    Append(AppendRequest, Reply),
    /// Which batches are stored: answered after the group it came with is
    /// fsynced, from durable state only.
    Known {
        tenant: String,
        host: String,
        batches: Vec<BatchRef>,
        reply: oneshot::Sender<Vec<bool>>,
    },
    /// Remove the segments wholly below a position: answered with the
    /// bytes freed, after the group it came with is fsynced.
    Prune {
        below: u64,
        reply: oneshot::Sender<Result<u64, WalError>>,
    },
}

/// A stream, as dedup sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct StreamKey {
    tenant: String,
    host: String,
    source: String,
    epoch: u64,
}

/// The handle connections append through.
#[derive(Debug, Clone)]
pub struct Wal {
    pruned: Arc<AtomicU64>,
    gaps: Arc<AtomicU64>,
    unverified: Arc<AtomicU64>,
    tx: mpsc::Sender<Job>,
    durable: Arc<AtomicU64>,
    dir: PathBuf,
    busy: WalBusy,
}

/// Whether new batches must wait, readable without holding the WAL open.
#[derive(Debug, Clone, Default)]
pub struct WalBusy {
    /// Set by the writer once an append found the WAL at its cap.
    full: Arc<std::sync::atomic::AtomicBool>,
    /// Set by the disk monitor while the WAL's file system is past its
    /// high watermark.
    disk: Arc<std::sync::atomic::AtomicBool>,
    /// Set by the sealer while more than `archive.max_pending_bytes` of
    /// the WAL waits to be archived (the object store is down or slow).
    archive: Arc<std::sync::atomic::AtomicBool>,
}

impl WalBusy {
    /// True while new batches should be refused as busy: the WAL is at
    /// its cap, its disk past the high watermark, or the archive too far
    /// behind.
    pub fn is_busy(&self) -> bool {
        self.full.load(Ordering::Acquire)
            || self.disk.load(Ordering::Acquire)
            || self.archive.load(Ordering::Acquire)
    }

    /// Says whether the archive is too far behind; returns the old value.
    pub fn set_archive_behind(&self, behind: bool) -> bool {
        self.archive.swap(behind, Ordering::AcqRel)
    }
}

/// A decoded entry read back from the WAL.
#[derive(Debug)]
pub struct Entry {
    /// Position of the entry.
    pub position: u64,
    /// Position after it.
    pub next: u64,
    /// When the batch arrived.
    pub received_ns: i64,
    /// The tenant.
    pub tenant: String,
    /// The host (from the certificate).
    pub host: String,
    /// Leading records to skip (already stored by an earlier entry).
    pub skip: u32,
    /// The public key the batch verified under (empty in version 1 entries).
    pub signer: Vec<u8>,
    /// The signed batch.
    pub batch: Vec<u8>,
    /// Written by a collector sharing a bucket and never acked: not stored.
    pub void: bool,
}

struct Writer {
    dir: PathBuf,
    segment_bytes: u64,
    file: File,
    path: PathBuf,
    base: u64,
    len: u64,
    streams: HashMap<StreamKey, StreamState>,
    durable: Arc<AtomicU64>,
    poisoned: bool,
    accept_gaps: bool,
    gaps: Arc<AtomicU64>,
    unverified: Arc<AtomicU64>,
    /// Position of the first byte still on disk.
    first_base: u64,
    max_bytes: u64,
    full: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes removed by pruning.
    pruned: Arc<AtomicU64>,
    /// The dedup state shared with other collectors, when there are any.
    shared: Option<shared::Shared>,
    /// The segment being written, open for writes in place (void entries).
    file_at: Option<(PathBuf, File)>,
}

/// What a WAL directory holds, read back at open.
struct Recovered {
    /// Dedup state: the snapshot's, with the entries after it.
    streams: HashMap<StreamKey, StreamState>,
    /// The segment files, by base position.
    segments: Vec<(u64, PathBuf)>,
    /// The end of the last whole entry.
    end: u64,
    /// The entries after the snapshot, oldest first (when asked for).
    tail: Vec<TailEntry>,
}

/// An entry after the snapshot, as settling against a shared bucket needs it.
struct TailEntry {
    key: StreamKey,
    /// Its position in the WAL.
    position: u64,
    /// Its batch's hash.
    hash: [u8; 32],
    /// Made void while settling.
    void: bool,
    /// The segment file and the entry's offset in it.
    path: PathBuf,
    offset: u64,
    /// Its new records: `first_seq + skip .. end_seq`.
    from: u64,
    to: u64,
}

impl Recovered {
    fn read(dir: &Path, with_tail: bool) -> Result<Recovered, WalError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let (snapshot_at, mut streams) = read_snapshot(dir)?;
        let segments = list_segments(dir)?;
        let mut end = 0;
        let mut tail = Vec::new();
        for (i, (base, path)) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            // A segment the snapshot covers whole is not read again.
            if !last && segments[i + 1].0 <= snapshot_at {
                continue;
            }
            let mut valid_end = *base;
            scan_segment(path, *base, last, |entry| {
                if entry.position >= snapshot_at
                    && !entry.void
                    && let (Ok(header), Ok(hash)) =
                        (peek_header(&entry.batch), encoded_batch_hash(&entry.batch))
                {
                    let key = StreamKey {
                        tenant: entry.tenant.clone(),
                        host: entry.host.clone(),
                        source: header.source.clone(),
                        epoch: header.epoch,
                    };
                    streams.entry(key.clone()).or_default().record(header.end_seq(), hash);
                    if with_tail {
                        tail.push(TailEntry {
                            key,
                            position: entry.position,
                            hash,
                            void: false,
                            path: path.clone(),
                            offset: entry.position - base,
                            from: (header.first_seq + u64::from(entry.skip)).min(header.end_seq()),
                            to: header.end_seq(),
                        });
                    }
                }
                valid_end = entry.next;
            })?;
            end = valid_end;
        }
        Ok(Recovered { streams, segments, end, tail })
    }
}

impl Wal {
    /// Opens (recovering) the WAL in `dir` and starts its writer thread.
    /// `queue` bounds the appends waiting for the writer; when it is full,
    /// appenders wait, and so do their agents.
    pub fn open(dir: &Path, options: &WalOptions) -> Result<(Wal, std::thread::JoinHandle<()>), WalError> {
        let recovered = Recovered::read(dir, false)?;
        // What is taken from here on is acked without a shared bucket.
        shared::forget_markers(dir)?;
        Self::start(recovered, dir, options, None)
    }

    /// Opens the WAL of a collector that shares its streams' dedup state
    /// with others through `shared` (see [`crate::cluster`]). Entries the
    /// bucket does not give to this collector (written, never acked) are
    /// voided first.
    pub async fn open_shared(
        dir: &Path,
        options: &WalOptions,
        shared: crate::cluster::SharedStreams,
    ) -> Result<(Wal, std::thread::JoinHandle<()>), WalError> {
        let mut recovered = {
            let dir = dir.to_owned();
            tokio::task::spawn_blocking(move || Recovered::read(&dir, true))
                .await
                .map_err(|_| WalError::Closed)??
        };
        shared::settle(&mut recovered, &shared, dir).await?;
        let runtime = tokio::runtime::Handle::current();
        let shared = shared::Shared::new(shared, runtime, dir)?;
        Self::start(recovered, dir, options, Some(shared))
    }

    fn start(
        recovered: Recovered,
        dir: &Path,
        options: &WalOptions,
        shared: Option<shared::Shared>,
    ) -> Result<(Wal, std::thread::JoinHandle<()>), WalError> {
        let WalOptions { segment_bytes, queue, max_bytes, accept_gaps } = *options;
        let Recovered { streams, segments, end, tail: _ } = recovered;
        let durable = Arc::new(AtomicU64::new(0));
        let (base, path) = match segments.last() {
            Some((base, path)) => (*base, path.clone()),
            None => (0, segment_path(dir, 0)),
        };
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| io_err(&path, e))?;
        // The segment's directory entry must be durable before any ack.
        sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        let len = end - base;
        if file.metadata().map_err(|e| io_err(&path, e))?.len() > len {
            tracing::warn!(path = %path.display(), kept = len, "cutting torn tail of the wal");
            file.set_len(len).map_err(|e| io_err(&path, e))?;
            file.sync_all().map_err(|e| io_err(&path, e))?;
        }
        durable.store(end, Ordering::Release);
        let (tx, rx) = mpsc::channel(queue);
        let busy = WalBusy::default();
        let gaps = Arc::new(AtomicU64::new(0));
        let unverified = Arc::new(AtomicU64::new(0));
        let pruned = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            pruned: pruned.clone(),
            accept_gaps,
            gaps: gaps.clone(),
            unverified: unverified.clone(),
            first_base: segments.first().map_or(0, |(base, _)| *base),
            max_bytes,
            full: busy.full.clone(),
            dir: dir.to_owned(),
            segment_bytes,
            file,
            path,
            base,
            len,
            streams,
            durable: durable.clone(),
            poisoned: false,
            shared,
            file_at: None,
        };
        let handle = std::thread::Builder::new()
            .name("logvault-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io_err(dir, e))?;
        Ok((Wal { tx, durable, dir: dir.to_owned(), busy, gaps, unverified, pruned }, handle))
    }

    /// Removes the segments that end at or below `below` (never the one
    /// being written), after saving the stream snapshot; returns the bytes
    /// freed. `below` must be a position that is indexed and archived.
    pub async fn prune(&self, below: u64) -> Result<u64, WalError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Job::Prune { below, reply }).await.map_err(|_| WalError::Closed)?;
        answer.await.map_err(|_| WalError::Closed)?
    }

    /// Bytes removed by pruning since open.
    pub fn pruned_counter(&self) -> Arc<AtomicU64> {
        self.pruned.clone()
    }

    /// Appends a batch; resolves once it is fsynced (or known duplicate).
    pub async fn append(&self, request: AppendRequest) -> Result<Appended, WalError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Job::Append(request, reply)).await.map_err(|_| WalError::Closed)?;
        answer.await.map_err(|_| WalError::Closed)?
    }

    /// For each batch of `host` in `tenant`, whether that very batch (by
    /// hash, among its stream's last batches) is durably stored: what an
    /// agent may skip resending after a reconnect.
    pub async fn known(
        &self,
        tenant: &str,
        host: &str,
        batches: Vec<BatchRef>,
    ) -> Result<Vec<bool>, WalError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Known { tenant: tenant.to_owned(), host: host.to_owned(), batches, reply };
        self.tx.send(job).await.map_err(|_| WalError::Closed)?;
        answer.await.map_err(|_| WalError::Closed)
    }

    /// Position up to which everything is fsynced.
    pub fn durable_end(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// The shared durable-end counter, for readers on other threads.
    pub fn durable_counter(&self) -> Arc<AtomicU64> {
        self.durable.clone()
    }

    /// The WAL directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sequence gaps stored because `ingest.accept_gaps` is on.
    pub fn gaps_counter(&self) -> Arc<AtomicU64> {
        self.gaps.clone()
    }

    /// Batches taken without a chain check: their predecessor was older
    /// than the links remembered per stream.
    pub fn unverified_counter(&self) -> Arc<AtomicU64> {
        self.unverified.clone()
    }

    /// True while new batches should be refused as busy.
    pub fn is_busy(&self) -> bool {
        self.busy.is_busy()
    }

    /// The busy flags, for readers that must not keep the WAL open.
    pub fn busy_state(&self) -> WalBusy {
        self.busy.clone()
    }

    /// Watches the file system holding the WAL every second until `cancel`
    /// fires: past `high_watermark_percent` full, new batches are refused
    /// as busy; below it again, they are taken.
    pub async fn watch_disk(
        busy: WalBusy,
        dir: PathBuf,
        high_watermark_percent: u8,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let used = tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || {
                    let total = fs4::total_space(&dir).ok()?;
                    let available = fs4::available_space(&dir).ok()?;
                    (total > 0).then(|| 100 - available.saturating_mul(100) / total)
                }
            })
            .await
            .ok()
            .flatten();
            if let Some(used) = used {
                let over = used >= u64::from(high_watermark_percent);
                if busy.disk.swap(over, Ordering::AcqRel) != over {
                    if over {
                        tracing::error!(dir = %dir.display(), used_percent = used, high_watermark_percent, "wal disk past its high watermark: refusing new batches as busy");
                    } else {
                        tracing::warn!(dir = %dir.display(), used_percent = used, "wal disk below its high watermark again: taking batches");
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
        }
    }
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        let mut questions = Vec::new();
        let mut prunes = Vec::new();
        let mut buffer = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Append(request, reply) => group.push((request, reply)),
                    Job::Known { tenant, host, batches, reply } => {
                        questions.push((tenant, host, batches, reply))
                    }
                    Job::Prune { below, reply } => prunes.push((below, reply)),
                }
                if group.len() + questions.len() + prunes.len() < MAX_GROUP {
                    next = rx.try_recv().ok();
                }
            }
            self.commit_group(&mut group, &mut buffer);
            for (tenant, host, batches, reply) in questions.drain(..) {
                let known = batches
                    .into_iter()
                    .map(|batch| {
                        let key = StreamKey {
                            tenant: tenant.clone(),
                            host: host.clone(),
                            source: batch.source,
                            epoch: batch.epoch,
                        };
                        self.streams.get(&key).is_some_and(|state| state.knows(&batch.hash))
                    })
                    .collect();
                let _ = reply.send(known);
            }
            for (below, reply) in prunes.drain(..) {
                let _ = reply.send(self.prune(below));
            }
        }
        let _ = self.file.sync_all();
    }

    fn prune(&mut self, below: u64) -> Result<u64, WalError> {
        if self.poisoned {
            return Err(WalError::Poisoned);
        }
        let segments = list_segments(&self.dir)?;
        // A segment goes when the next one starts at or below `below`; the
        // last one, being written, never does.
        let doomed: Vec<&(u64, PathBuf)> =
            segments.windows(2).filter(|pair| pair[1].0 <= below).map(|pair| &pair[0]).collect();
        let Some(last) = doomed.last() else { return Ok(0) };
        let first_kept =
            segments.iter().find(|(base, _)| base > &last.0).map_or(self.base, |(base, _)| *base);
        write_snapshot(&self.dir, self.base + self.len, &self.streams)?;
        let mut freed = 0;
        for (_, path) in &doomed {
            freed += std::fs::metadata(path).map_err(|e| io_err(path, e))?.len();
            std::fs::remove_file(path).map_err(|e| io_err(path, e))?;
        }
        sync_dir(&self.dir)?;
        self.first_base = first_kept;
        self.pruned.fetch_add(freed, Ordering::Relaxed);
        tracing::info!(
            segments = doomed.len(),
            bytes = freed,
            below,
            "indexed and archived wal segments removed"
        );
        let size = self.base + self.len - self.first_base;
        if self.max_bytes > 0 && size < self.max_bytes && self.full.swap(false, Ordering::AcqRel) {
            tracing::warn!(size, max = self.max_bytes, "wal below its cap again: taking batches");
        }
        Ok(freed)
    }

    fn commit_group(&mut self, group: &mut Vec<(AppendRequest, Reply)>, buffer: &mut Vec<u8>) {
        if group.is_empty() {
            return;
        }
        if self.poisoned {
            for (_, reply) in group.drain(..) {
                let _ = reply.send(Err(WalError::Poisoned));
            }
            return;
        }
        buffer.clear();
        if let Some(shared) = self.shared.as_mut() {
            shared.trim();
        }
        let mut outcomes: Vec<Result<Appended, WalError>> = Vec::with_capacity(group.len());
        let mut updates: HashMap<StreamKey, StreamState> = HashMap::new();
        // With a shared bucket: the streams read from it in this group, and
        // where each entry written lies in `buffer`.
        let mut fetched: std::collections::HashSet<StreamKey> = std::collections::HashSet::new();
        let mut placed: Vec<shared::Placed> = Vec::new();
        let size = self.base + self.len - self.first_base;
        for (request, _) in group.iter() {
            let key = StreamKey {
                tenant: request.tenant.clone(),
                host: request.host.clone(),
                source: request.header.source.clone(),
                epoch: request.header.epoch,
            };
            let Ok(hash) = encoded_batch_hash(&request.batch) else {
                outcomes.push(Err(WalError::Sequence {
                    fault: SequenceFault::Chain,
                    message: "batch header does not decode".into(),
                }));
                continue;
            };
            if !updates.contains_key(&key) && self.shared.as_ref().is_some_and(|shared| !shared.knows(&key)) {
                if let Err(err) = self.refresh(&key) {
                    outcomes.push(Err(err));
                    continue;
                }
                fetched.insert(key.clone());
            }
            let mut verdict = judge(
                updates.get(&key).or_else(|| self.streams.get(&key)),
                &request.header,
                &hash,
                self.accept_gaps,
            );
            if matches!(verdict, Verdict::Refuse(..))
                && self.shared.is_some()
                && !updates.contains_key(&key)
                && !fetched.contains(&key)
            {
                // Another collector may have moved the stream on since it
                // was last read: read it again before refusing.
                if let Err(err) = self.refresh(&key) {
                    outcomes.push(Err(err));
                    continue;
                }
                fetched.insert(key.clone());
                verdict = judge(self.streams.get(&key), &request.header, &hash, self.accept_gaps);
            }
            let state = updates.get(&key).or_else(|| self.streams.get(&key));
            let (skipped, gap, outcome) = match verdict {
                Verdict::Duplicate => {
                    outcomes.push(Ok(Appended::Duplicate));
                    continue;
                }
                Verdict::Relink => (request.header.count, 0, Appended::Duplicate),
                Verdict::Unverified { skipped } => {
                    self.unverified.fetch_add(1, Ordering::Relaxed);
                    let outcome = if skipped == request.header.count {
                        Appended::Duplicate
                    } else {
                        Appended::Stored { skipped }
                    };
                    (skipped, 0, outcome)
                }
                Verdict::Refuse(fault, message) => {
                    tracing::warn!(host = %request.host, source = %request.header.source, epoch = request.header.epoch, ?fault, reason = %message, "batch refused: out of sequence");
                    outcomes.push(Err(WalError::Sequence { fault, message }));
                    continue;
                }
                Verdict::Store { skipped, gap } => (skipped, gap, Appended::Stored { skipped }),
            };
            let mut next = state.cloned().unwrap_or_default();
            // The cap counts the entry's header too: 64 bytes is more than it takes.
            let entry_len = (request.batch.len() + request.tenant.len() + request.host.len() + 64) as u64;
            if self.max_bytes > 0 && size + buffer.len() as u64 + entry_len > self.max_bytes {
                if !self.full.swap(true, Ordering::AcqRel) {
                    tracing::error!(
                        size,
                        max = self.max_bytes,
                        "wal is full: refusing new batches as busy; raise wal.max_bytes or free space"
                    );
                }
                outcomes.push(Err(WalError::Full { size, max: self.max_bytes }));
                continue;
            }
            if gap > 0 {
                self.gaps.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(host = %request.host, source = %request.header.source, epoch = request.header.epoch, missing = gap, from = request.header.first_seq - gap, "sequence gap stored (ingest.accept_gaps)");
            }
            let start = buffer.len();
            encode_entry(buffer, request, skipped);
            if self.shared.is_some() {
                let first = request.header.first_seq + u64::from(skipped);
                placed.push(shared::Placed {
                    key: key.clone(),
                    entry: start..buffer.len(),
                    from: first.min(request.header.end_seq()),
                    to: request.header.end_seq(),
                    hash,
                });
            }
            next.record(request.header.end_seq(), hash);
            updates.insert(key, next);
            outcomes.push(Ok(outcome));
        }
        if !buffer.is_empty() {
            let written = self.file.write_all(buffer).and_then(|_| self.file.sync_data());
            let written = match written {
                Ok(()) if !placed.is_empty() => {
                    // Each outcome's stream, in the group's order.
                    let keys: Vec<Option<StreamKey>> = group
                        .iter()
                        .map(|(request, _)| {
                            Some(StreamKey {
                                tenant: request.tenant.clone(),
                                host: request.host.clone(),
                                source: request.header.source.clone(),
                                epoch: request.header.epoch,
                            })
                        })
                        .collect();
                    self.publish(&placed, &mut outcomes, &keys, &mut updates)
                }
                Ok(()) => Ok(()),
                Err(err) => Err(io_err(&self.path, err)),
            };
            if let Err(error) = written {
                tracing::error!(path = %self.path.display(), error = %error, "wal write failed; refusing further appends");
                self.poisoned = true;
                for (_, reply) in group.drain(..) {
                    let _ = reply.send(Err(error.clone()));
                }
                return;
            }
            self.len += buffer.len() as u64;
            self.streams.extend(updates);
            if self.shared.is_some() {
                self.settled(self.base + self.len);
            }
            self.durable.store(self.base + self.len, Ordering::Release);
        }
        for ((_, reply), outcome) in group.drain(..).zip(outcomes) {
            let _ = reply.send(outcome);
        }
        if self.len >= self.segment_bytes
            && let Err(err) = self.roll()
        {
            tracing::error!(error = %err, "wal roll failed; refusing further appends");
            self.poisoned = true;
        }
    }

    fn roll(&mut self) -> Result<(), WalError> {
        self.file.sync_all().map_err(|e| io_err(&self.path, e))?;
        let base = self.base + self.len;
        let path = segment_path(&self.dir, base);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| io_err(&path, e))?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.path = path;
        self.base = base;
        self.len = 0;
        Ok(())
    }
}

/// Saves what the writer knows of every stream as of `position`: to a
/// temporary file, fsynced, renamed over the old snapshot.
fn write_snapshot(
    dir: &Path,
    position: u64,
    streams: &HashMap<StreamKey, StreamState>,
) -> Result<(), WalError> {
    let path = dir.join(SNAPSHOT);
    let tmp = dir.join(format!("{SNAPSHOT}.tmp"));
    let bytes = encode_snapshot(position, streams);
    let written = File::create(&tmp).and_then(|mut file| {
        file.write_all(&bytes)?;
        file.sync_all()
    });
    written.map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    sync_dir(dir)
}

/// The snapshot in `dir`: the position it covers and the streams, or
/// (0, nothing) when there is none.
fn read_snapshot(dir: &Path) -> Result<(u64, HashMap<StreamKey, StreamState>), WalError> {
    let path = dir.join(SNAPSHOT);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, HashMap::new())),
        Err(e) => return Err(io_err(&path, e)),
    };
    let corrupt = |reason: &str| WalError::Corrupt {
        path: path.clone(),
        offset: 0,
        reason: format!(
            "{reason}; the dedup state of pruned segments is lost: move the file away to start without it (resends of pruned batches are then stored again)"
        ),
    };
    let len = file.metadata().map_err(|e| io_err(&path, e))?.len();
    if len > MAX_SNAPSHOT_BYTES {
        return Err(corrupt("snapshot larger than the cap"));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_SNAPSHOT_BYTES), &mut bytes)
        .map_err(|e| io_err(&path, e))?;
    decode_snapshot(&bytes).ok_or_else(|| corrupt("snapshot does not decode"))
}

/// `LVWS | version u8 | position u64 | streams u32 | stream* | crc32 u32`,
/// a stream being `tenant, host, source (u16 + UTF-8) | epoch u64 | high
/// u64 | floor u64 | ends u32 | (end u64 | hashes u16 | hash[32]*)*`,
/// big-endian; the checksum covers everything before it.
fn encode_snapshot(position: u64, streams: &HashMap<StreamKey, StreamState>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.push(SNAPSHOT_VERSION);
    out.extend_from_slice(&position.to_be_bytes());
    out.extend_from_slice(&(streams.len() as u32).to_be_bytes());
    for (key, state) in streams {
        for text in [&key.tenant, &key.host, &key.source] {
            let text = &text.as_bytes()[..text.len().min(u16::MAX as usize)];
            out.extend_from_slice(&(text.len() as u16).to_be_bytes());
            out.extend_from_slice(text);
        }
        for number in [key.epoch, state.high, state.floor] {
            out.extend_from_slice(&number.to_be_bytes());
        }
        out.extend_from_slice(&(state.links.len() as u32).to_be_bytes());
        for (end, hashes) in &state.links {
            out.extend_from_slice(&end.to_be_bytes());
            out.extend_from_slice(&(hashes.len() as u16).to_be_bytes());
            for hash in hashes {
                out.extend_from_slice(hash);
            }
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn decode_snapshot(bytes: &[u8]) -> Option<(u64, HashMap<StreamKey, StreamState>)> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32fast::hash(body) != u32::from_be_bytes(crc.try_into().ok()?) {
        return None;
    }
    let mut cursor = Cursor(body);
    if cursor.take(4)? != SNAPSHOT_MAGIC || cursor.u8()? != SNAPSHOT_VERSION {
        return None;
    }
    let position = cursor.u64()?;
    let count = cursor.u32()? as usize;
    // Each stream takes at least 34 bytes: no allocation past what is there.
    let mut streams = HashMap::with_capacity(count.min(cursor.0.len() / 34));
    for _ in 0..count {
        let key = StreamKey {
            tenant: cursor.text()?,
            host: cursor.text()?,
            source: cursor.text()?,
            epoch: cursor.u64()?,
        };
        let mut state = StreamState { high: cursor.u64()?, floor: cursor.u64()?, ..StreamState::default() };
        for _ in 0..cursor.u32()? {
            let end = cursor.u64()?;
            let n = cursor.u16()? as usize;
            let mut hashes = Vec::with_capacity(n.min(cursor.0.len() / 32));
            for _ in 0..n {
                hashes.push(cursor.take(32)?.try_into().ok()?);
            }
            state.count += hashes.len();
            if hashes.is_empty() || state.count > LINKS || state.links.insert(end, hashes).is_some() {
                return None;
            }
        }
        if streams.insert(key, state).is_some() {
            return None;
        }
    }
    cursor.0.is_empty().then_some((position, streams))
}

/// The WAL's decoders on arbitrary bytes, for the fuzz target: an entry
/// payload, and a stream snapshot (which must re-encode to the same state).
pub(crate) fn fuzz_decoders(data: &[u8]) {
    let _ = decode_payload(data);
    if let Ok(record) = crate::cluster::StreamRecord::decode_any(data) {
        let (tenant, host, source) = (&record.tenant, &record.host, &record.source);
        let again =
            crate::cluster::StreamRecord::decode(&record.encode(), tenant, host, source, record.epoch);
        assert_eq!(again.as_ref(), Ok(&record), "a stream object re-encodes");
    }
    if let Some((position, streams)) = decode_snapshot(data) {
        let (again, back) =
            decode_snapshot(&encode_snapshot(position, &streams)).expect("a snapshot re-encodes");
        assert_eq!(again, position);
        assert_eq!(back.len(), streams.len());
    }
}

/// Seeds for the WAL fuzz target: an entry payload holding `batch`, and a
/// snapshot of its stream.
pub(crate) fn fuzz_seeds(batch: &[u8]) -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let Ok(header) = peek_header(batch) else { return seeds };
    let request = AppendRequest {
        tenant: "acme".into(),
        host: "web-1".into(),
        received_ns: 1,
        batch: batch.to_vec(),
        header: header.clone(),
        signer: vec![9; 32],
    };
    let mut entry = Vec::new();
    encode_entry(&mut entry, &request, 0);
    seeds.push(entry[8..].to_vec());
    let mut state = StreamState::default();
    if let Ok(hash) = encoded_batch_hash(batch) {
        state.record(header.end_seq(), hash);
    }
    let key = StreamKey {
        tenant: "acme".into(),
        host: "web-1".into(),
        source: header.source.clone(),
        epoch: header.epoch,
    };
    seeds.push(encode_snapshot(entry.len() as u64, &HashMap::from([(key.clone(), state)])));
    seeds
}

/// Reads big-endian numbers and length-prefixed text off a slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn text(&mut self) -> Option<String> {
        let len = self.u16()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
}

fn encode_entry(out: &mut Vec<u8>, request: &AppendRequest, skip: u32) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    out.push(ENTRY_VERSION);
    out.push(LIVE);
    out.extend_from_slice(&request.received_ns.to_be_bytes());
    for text in [&request.tenant, &request.host] {
        out.extend_from_slice(&(text.len() as u16).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(&skip.to_be_bytes());
    let signer = &request.signer[..request.signer.len().min(255)];
    out.push(signer.len() as u8);
    out.extend_from_slice(signer);
    out.extend_from_slice(&request.batch);
    let payload = &out[start + 8..];
    let len = payload.len() as u32;
    let crc = payload_crc(payload);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// An entry payload's checksum: from version 3 on, of all but its state byte.
fn payload_crc(payload: &[u8]) -> u32 {
    match payload {
        [version, _, rest @ ..] if *version >= 3 => {
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&payload[..1]);
            hasher.update(rest);
            hasher.finalize()
        }
        _ => crc32fast::hash(payload),
    }
}

/// What an entry's payload holds.
struct Payload {
    void: bool,
    received_ns: i64,
    tenant: String,
    host: String,
    skip: u32,
    signer: Vec<u8>,
    batch: Vec<u8>,
}

fn decode_payload(payload: &[u8]) -> Option<Payload> {
    let (&version, mut rest) = payload.split_first()?;
    if !(1..=ENTRY_VERSION).contains(&version) {
        return None;
    }
    let mut void = false;
    if version >= 3 {
        let (&state, after) = rest.split_first()?;
        void = match state {
            LIVE => false,
            VOID => true,
            _ => return None,
        };
        rest = after;
    }
    let received_ns = i64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let mut rest = &rest[8..];
    let mut text = || -> Option<String> {
        let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let value = std::str::from_utf8(rest.get(2..2 + len)?).ok()?.to_owned();
        rest = &rest[2 + len..];
        Some(value)
    };
    let tenant = text()?;
    let host = text()?;
    let skip = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    rest = &rest[4..];
    let signer = if version >= 2 {
        let len = *rest.first()? as usize;
        let signer = rest.get(1..1 + len)?.to_vec();
        rest = &rest[1 + len..];
        signer
    } else {
        Vec::new()
    };
    Some(Payload { void, received_ns, tenant, host, skip, signer, batch: rest.to_vec() })
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.wal"))
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let path = entry.map_err(|e| io_err(dir, e))?.path();
        let Some(base) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        segments.push((base, path));
    }
    segments.sort();
    Ok(segments)
}

/// Reads a segment's entries in order. In the last segment a damaged or
/// partial entry ends the scan (a torn tail); elsewhere it is an error.
fn scan_segment(path: &Path, base: u64, is_last: bool, mut each: impl FnMut(Entry)) -> Result<(), WalError> {
    let mut file = std::io::BufReader::new(File::open(path).map_err(|e| io_err(path, e))?);
    let mut offset = 0u64;
    loop {
        let mut head = [0u8; 8];
        match read_full(&mut file, &mut head) {
            Ok(0) => return Ok(()),
            Ok(8) => {}
            Ok(_) => return torn(path, offset, is_last, "partial entry header"),
            Err(e) => return Err(io_err(path, e)),
        }
        let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
        let crc = u32::from_be_bytes(head[4..].try_into().expect("4 bytes"));
        if len > MAX_ENTRY {
            return torn(path, offset, is_last, "entry length over the cap");
        }
        let mut payload = vec![0u8; len as usize];
        if read_full(&mut file, &mut payload).map_err(|e| io_err(path, e))? != payload.len() {
            return torn(path, offset, is_last, "partial entry");
        }
        if payload_crc(&payload) != crc {
            return torn(path, offset, is_last, "checksum mismatch");
        }
        let Some(Payload { void, received_ns, tenant, host, skip, signer, batch }) = decode_payload(&payload)
        else {
            return torn(path, offset, is_last, "undecodable entry");
        };
        let position = base + offset;
        offset += 8 + u64::from(len);
        each(Entry { position, next: base + offset, received_ns, tenant, host, skip, signer, batch, void });
    }
}

fn torn(path: &Path, offset: u64, is_last: bool, reason: &str) -> Result<(), WalError> {
    if is_last {
        tracing::warn!(path = %path.display(), offset, reason, "wal ends in a torn entry");
        Ok(())
    } else {
        Err(WalError::Corrupt { path: path.to_owned(), offset, reason: reason.to_owned() })
    }
}

/// Reads entries from `from` up to `until` (a durable end), at most
/// `max_bytes` of them (at least one entry when any is there).
pub fn read_range(dir: &Path, from: u64, until: u64, max_bytes: u64) -> Result<Vec<Entry>, WalError> {
    let mut out = Vec::new();
    if from >= until {
        return Ok(out);
    }
    let segments = list_segments(dir)?;
    let mut taken = 0u64;
    for (i, (base, path)) in segments.iter().enumerate() {
        let next_base = segments.get(i + 1).map_or(u64::MAX, |(b, _)| *b);
        if next_base <= from || *base >= until {
            continue;
        }
        let mut file = File::open(path).map_err(|e| io_err(path, e))?;
        let start = from.max(*base) - base;
        file.seek(SeekFrom::Start(start)).map_err(|e| io_err(path, e))?;
        let mut reader = std::io::BufReader::new(file);
        let mut offset = start;
        while base + offset < until && (taken < max_bytes || out.is_empty()) {
            let mut head = [0u8; 8];
            if read_full(&mut reader, &mut head).map_err(|e| io_err(path, e))? != 8 {
                break;
            }
            let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
            let crc = u32::from_be_bytes(head[4..].try_into().expect("4 bytes"));
            let corrupt =
                |reason: &str| WalError::Corrupt { path: path.clone(), offset, reason: reason.to_owned() };
            if len > MAX_ENTRY {
                return Err(corrupt("entry length over the cap"));
            }
            let mut payload = vec![0u8; len as usize];
            if read_full(&mut reader, &mut payload).map_err(|e| io_err(path, e))? != payload.len() {
                return Err(corrupt("partial entry below the durable end"));
            }
            if payload_crc(&payload) != crc {
                return Err(corrupt("checksum mismatch"));
            }
            let Payload { void, received_ns, tenant, host, skip, signer, batch } =
                decode_payload(&payload).ok_or_else(|| corrupt("undecodable entry"))?;
            let position = base + offset;
            offset += 8 + u64::from(len);
            taken += 8 + u64::from(len);
            out.push(Entry {
                position,
                next: base + offset,
                received_ns,
                tenant,
                host,
                skip,
                signer,
                batch,
                void,
            });
        }
        if taken >= max_bytes {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_entries_are_still_read_with_an_empty_signer() {
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&7i64.to_be_bytes());
        for text in ["acme", "web-1"] {
            v1.extend_from_slice(&(text.len() as u16).to_be_bytes());
            v1.extend_from_slice(text.as_bytes());
        }
        v1.extend_from_slice(&3u32.to_be_bytes());
        v1.extend_from_slice(b"BATCH");
        let payload = decode_payload(&v1).unwrap();
        assert_eq!(
            (payload.received_ns, payload.tenant.as_str(), payload.host.as_str()),
            (7, "acme", "web-1")
        );
        assert_eq!((payload.skip, payload.signer.len(), payload.batch.as_slice()), (3, 0, &b"BATCH"[..]));
        let mut v2 = request(0, 1, [0; 32]);
        v2.signer = vec![5; 32];
        let mut out = Vec::new();
        encode_entry(&mut out, &v2, 0);
        let payload = decode_payload(&out[8..]).unwrap();
        assert_eq!(payload.signer, vec![5; 32]);
        assert_eq!(payload.batch, v2.batch);
        assert!(decode_payload(&[3u8; 40]).is_none(), "an unknown version");
    }
    use logvault_storage::{BatchBuilder, Level, WireRecord};

    fn batch(first_seq: u64, count: u32, prev: [u8; 32]) -> (Vec<u8>, BatchHeader) {
        let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[1; 32]).unwrap();
        let mut builder = BatchBuilder::new("h", "/s", 0, first_seq, prev);
        for i in 0..count {
            builder.push(WireRecord::new(i64::from(i), Level::Info, format!("line {i}")));
        }
        let bytes = builder.sign(&key);
        let header = peek_header(&bytes).unwrap();
        (bytes, header)
    }

    /// A batch of `count` records from `first_seq`, chained to `prev`.
    pub(super) fn request(first_seq: u64, count: u32, prev: [u8; 32]) -> AppendRequest {
        let (batch, header) = batch(first_seq, count, prev);
        AppendRequest {
            tenant: "t".into(),
            host: "h".into(),
            received_ns: 1,
            batch,
            header,
            signer: vec![9; 32],
        }
    }

    fn hash_of(request: &AppendRequest) -> [u8; 32] {
        encoded_batch_hash(&request.batch).unwrap()
    }

    #[tokio::test]
    async fn resends_are_stored_once_and_survive_reopen_with_a_torn_tail() {
        let dir = std::env::temp_dir().join(format!("logvault-wal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let (wal, _thread) = Wal::open(&dir, &WalOptions::small()).unwrap();
            assert_eq!(wal.append(request(0, 10, [0; 32])).await.unwrap(), Appended::Stored { skipped: 0 });
            assert_eq!(wal.append(request(0, 10, [0; 32])).await.unwrap(), Appended::Duplicate);
            // Rebatched from the stream's start: the first 10 are stored.
            assert_eq!(wal.append(request(0, 15, [0; 32])).await.unwrap(), Appended::Stored { skipped: 10 });
        }
        let first = hash_of(&request(0, 10, [0; 32]));
        let second = hash_of(&request(0, 15, [0; 32]));
        // A crash mid-write leaves half an entry behind.
        let segment = segment_path(&dir, 0);
        let good_len = std::fs::metadata(&segment).unwrap().len();
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&[0, 0, 1, 0, 9, 9]).unwrap();
        drop(file);

        let (wal, _thread) = Wal::open(&dir, &WalOptions::small()).unwrap();
        assert_eq!(wal.durable_end(), good_len);
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), good_len);
        // The high-water mark and the chain were rebuilt from the WAL:
        // 0..15 is stored, and the batches' hashes are known.
        assert_eq!(wal.append(request(10, 5, first)).await.unwrap(), Appended::Duplicate);
        assert_eq!(wal.append(request(15, 1, second)).await.unwrap(), Appended::Stored { skipped: 0 });
        let entries = read_range(&dir, 0, wal.durable_end(), u64::MAX).unwrap();
        // The rebatched 10..15 is written with all its records skipped: a
        // link for the chain, nothing for the index.
        assert_eq!(entries.iter().map(|e| e.skip).collect::<Vec<_>>(), vec![0, 10, 5, 0]);
        // Stored batches are known by hash, per tenant, host, source and
        // epoch, from durable state.
        let batch = |source: &str, epoch, hash| BatchRef { source: source.into(), epoch, hash };
        let asked = vec![
            batch("/s", 0, first),
            batch("/s", 0, [9; 32]),
            batch("/s", 1, first),
            batch("/other", 0, first),
        ];
        assert_eq!(wal.known("t", "h", asked).await.unwrap(), vec![true, false, false, false]);
        assert_eq!(wal.known("u", "h", vec![batch("/s", 0, first)]).await.unwrap(), vec![false]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn pruned_segments_leave_their_dedup_state_in_the_snapshot() {
        let dir = std::env::temp_dir().join(format!("logvault-wal-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut one = Vec::new();
        encode_entry(&mut one, &request(0, 10, [0; 32]), 0);
        // Every group rolls the segment; the cap holds five entries.
        let options =
            WalOptions { segment_bytes: 1, max_bytes: 5 * one.len() as u64 + 100, ..WalOptions::small() };
        let mut prev = [0; 32];
        let mut hashes = Vec::new();
        let below = {
            let (wal, thread) = Wal::open(&dir, &options).unwrap();
            for i in 0..5 {
                let request = request(i * 10, 10, prev);
                prev = hash_of(&request);
                hashes.push(prev);
                assert_eq!(wal.append(request).await.unwrap(), Appended::Stored { skipped: 0 });
            }
            assert!(matches!(wal.append(request(50, 10, prev)).await, Err(WalError::Full { .. })));
            assert!(wal.is_busy());
            let segments = list_segments(&dir).unwrap();
            assert_eq!(segments.len(), 6, "five written, one open");
            // A position inside a segment keeps that segment.
            assert_eq!(wal.prune(segments[1].0 - 1).await.unwrap(), 0);
            let below = segments[3].0;
            let freed = wal.prune(below).await.unwrap();
            assert_eq!(freed, 3 * one.len() as u64);
            assert_eq!(wal.pruned_counter().load(Ordering::Relaxed), freed);
            assert_eq!(list_segments(&dir).unwrap(), segments[3..].to_vec());
            assert!(!wal.is_busy(), "under the cap again");
            assert_eq!(wal.prune(below).await.unwrap(), 0);
            drop(wal);
            thread.join().unwrap();
            below
        };
        let (wal, thread) = Wal::open(&dir, &options).unwrap();
        // What the pruned segments held is still known: a resend is a
        // duplicate, an old batch played again is refused, the chain goes on.
        assert_eq!(wal.append(request(0, 10, [0; 32])).await.unwrap(), Appended::Duplicate);
        let replay = wal.append(request(10, 10, [7; 32])).await;
        assert!(matches!(replay, Err(WalError::Sequence { fault: SequenceFault::Replay, .. })), "{replay:?}");
        let batch = |hash| BatchRef { source: "/s".into(), epoch: 0, hash };
        assert_eq!(
            wal.known("t", "h", vec![batch(hashes[0]), batch([9; 32])]).await.unwrap(),
            vec![true, false]
        );
        assert_eq!(wal.append(request(50, 10, prev)).await.unwrap(), Appended::Stored { skipped: 0 });
        let entries = read_range(&dir, 0, wal.durable_end(), u64::MAX).unwrap();
        assert_eq!(
            entries.first().map(|e| e.position),
            Some(below),
            "reading starts at the first kept entry"
        );
        assert_eq!(entries.len(), 3);
        drop(wal);
        thread.join().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn snapshot_streams() -> impl proptest::strategy::Strategy<Value = HashMap<StreamKey, StreamState>> {
        use proptest::prelude::*;
        let key = ("[a-z]{0,8}", "\\PC{0,12}", "\\PC{0,20}", any::<u64>())
            .prop_map(|(tenant, host, source, epoch)| StreamKey { tenant, host, source, epoch });
        let links = proptest::collection::btree_map(
            any::<u64>(),
            proptest::collection::vec(any::<[u8; 32]>(), 1..3),
            0..20,
        );
        let state = (any::<u64>(), any::<u64>(), links).prop_map(|(high, floor, links)| StreamState {
            high,
            floor,
            count: links.values().map(Vec::len).sum(),
            links,
        });
        proptest::collection::hash_map(key, state, 0..8)
    }

    proptest::proptest! {
        #[test]
        fn the_stream_snapshot_round_trips(position: u64, streams in snapshot_streams()) {
            let (at, back) = decode_snapshot(&encode_snapshot(position, &streams)).unwrap();
            proptest::prop_assert_eq!(at, position);
            proptest::prop_assert_eq!(back.len(), streams.len());
            for (key, state) in &streams {
                let other = &back[key];
                proptest::prop_assert_eq!((other.high, other.floor, other.count), (state.high, state.floor, state.count));
                proptest::prop_assert_eq!(&other.links, &state.links);
            }
        }

        #[test]
        fn the_snapshot_decoder_refuses_damage_without_panicking(
            streams in snapshot_streams(),
            flip in proptest::prelude::any::<proptest::sample::Index>(),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let bytes = encode_snapshot(1, &streams);
            let mut flipped = bytes.clone();
            let at = flip.index(flipped.len());
            flipped[at] ^= 0x40;
            proptest::prop_assert!(decode_snapshot(&flipped).is_none());
            proptest::prop_assert!(decode_snapshot(&bytes[..cut.index(bytes.len())]).is_none());
            let _ = decode_snapshot(&noise);
        }
    }

    #[tokio::test]
    async fn a_full_wal_refuses_new_batches_and_keeps_what_it_stored() {
        let dir = std::env::temp_dir().join(format!("logvault-wal-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let one = request(0, 10, [0; 32]).batch.len() as u64;
        let (wal, _thread) =
            Wal::open(&dir, &WalOptions { max_bytes: 3 * one + 200, ..WalOptions::small() }).unwrap();
        let (mut stored, mut prev) = (0, [0; 32]);
        let refused = loop {
            let next = request(stored * 10, 10, prev);
            let hash = hash_of(&next);
            match wal.append(next).await {
                Ok(Appended::Stored { .. }) => (stored, prev) = (stored + 1, hash),
                Err(err) => break err,
                Ok(other) => panic!("{other:?}"),
            }
            assert!(stored < 10, "the cap never bit");
        };
        assert!(matches!(refused, WalError::Full { .. }), "{refused}");
        assert!(stored >= 2, "{stored}");
        assert!(wal.is_busy());
        // A resend of what is stored is still recognised while full.
        assert_eq!(wal.append(request(0, 10, [0; 32])).await.unwrap(), Appended::Duplicate);
        let end = wal.durable_end();
        assert!(end <= 3 * one + 200, "{end}");
        drop(wal);
        let (wal, _thread) = Wal::open(&dir, &WalOptions::small()).unwrap();
        assert_eq!(read_range(&dir, 0, wal.durable_end(), u64::MAX).unwrap().len() as u64, stored);
        assert!(!wal.is_busy());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn header(first_seq: u64, count: u32, prev_hash: [u8; 32]) -> BatchHeader {
        let mut builder = BatchBuilder::new("h", "/s", 0, first_seq, prev_hash);
        for i in 0..count {
            builder.push(WireRecord::new(0, Level::Info, format!("line {i}")));
        }
        let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[1; 32]).unwrap();
        peek_header(&builder.sign(&key)).unwrap()
    }

    #[test]
    fn the_chain_tells_resends_from_gaps_replays_and_forks() {
        let (a, b, c) = ([1; 32], [2; 32], [3; 32]);
        let mut state = StreamState::default();
        state.record(10, a); // batch A: 0..10, hash a
        state.record(20, b); // batch B: 10..20, hash b
        let judge = |h: &BatchHeader, hash: &[u8; 32]| judge(Some(&state), h, hash, false);
        // The next batch, chained to B.
        assert_eq!(judge(&header(20, 5, b), &c), Verdict::Store { skipped: 0, gap: 0 });
        // B sent again (its hash is known), or rebatched after a restart
        // (chained to A, overlapping B): stored once.
        assert_eq!(judge(&header(10, 10, a), &b), Verdict::Duplicate);
        assert_eq!(judge(&header(10, 5, a), &c), Verdict::Relink);
        assert_eq!(judge(&header(10, 15, a), &c), Verdict::Store { skipped: 10, gap: 0 });
        // A gap, a replay of old records under another hash, a fork.
        assert!(matches!(judge(&header(25, 5, c), &[4; 32]), Verdict::Refuse(SequenceFault::Gap, _)));
        assert!(matches!(judge(&header(5, 5, c), &[4; 32]), Verdict::Refuse(SequenceFault::Replay, _)));
        assert!(matches!(judge(&header(20, 5, a), &[4; 32]), Verdict::Refuse(SequenceFault::Chain, _)));
        assert!(matches!(judge(&header(15, 10, b), &[4; 32]), Verdict::Refuse(SequenceFault::Chain, _)));
        // With gaps accepted, the gap is stored and its size reported.
        assert_eq!(judge_gaps(&state, &header(25, 5, c)), Verdict::Store { skipped: 0, gap: 5 });
        // A stream never seen starts anywhere.
        assert_eq!(
            super::judge(None, &header(7, 1, c), &[4; 32], false),
            Verdict::Store { skipped: 0, gap: 0 }
        );
    }

    #[test]
    fn a_forgotten_predecessor_is_taken_unverified_and_remembered_history_is_checked() {
        let mut state = StreamState::default();
        let hash = |i: u64| {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&i.to_be_bytes());
            h
        };
        for i in 0..(LINKS as u64 + 100) {
            state.record((i + 1) * 10, hash(i));
        }
        assert_eq!(state.count, LINKS);
        assert_eq!(state.floor, 1000);
        let judge = |h: &BatchHeader| judge(Some(&state), h, &[0xee; 32], false);
        // A stale resend from before the remembered links: taken, unverified.
        assert_eq!(judge(&header(500, 10, [0xab; 32])), Verdict::Unverified { skipped: 10 });
        // Within remembered history a batch matching nothing is a replay.
        assert!(matches!(judge(&header(5000, 10, [0xab; 32])), Verdict::Refuse(SequenceFault::Replay, _)));
        // And a resend chained to a remembered batch is a relink.
        assert_eq!(judge(&header(5000, 10, hash(499))), Verdict::Relink);
    }

    fn judge_gaps(state: &StreamState, h: &BatchHeader) -> Verdict {
        judge(Some(state), h, &[9; 32], true)
    }
}
