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
//! layout (version 1, big-endian):
//!
//! ```text
//! len u32 | crc32 u32 (of payload) | payload:
//!   version u8 = 1 | received_ns i64 | tenant u16+UTF-8 | host u16+UTF-8
//!   | skip u32 (leading records already stored by an earlier batch)
//!   | the agent's signed batch, byte for byte
//! ```
//!
//! On open the last segment's torn tail (a crash mid-write) is cut off at
//! the last whole entry; everything before it was fsynced.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};

use logvault_storage::io::read_full;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use logvault_storage::batch::{BatchHeader, peek_header};
use tokio::sync::{mpsc, oneshot};

const ENTRY_VERSION: u8 = 1;
/// Largest entry accepted when reading back, a guard against a corrupt length.
const MAX_ENTRY: u32 = 64 * 1024 * 1024;
/// Largest batch the WAL takes: an entry's tenant, host and header fit in
/// the rest of [`MAX_ENTRY`]. `ingest.max_frame_bytes` may not exceed it.
pub const MAX_BATCH_BYTES: u32 = 32 * 1024 * 1024;
/// Requests taken into one group commit, at most.
const MAX_GROUP: usize = 1024;

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
    /// Where streams stand: answered after the group it came with is
    /// fsynced, from the durable high-water marks only.
    Marks {
        tenant: String,
        host: String,
        streams: Vec<(String, u64)>,
        reply: oneshot::Sender<Vec<u64>>,
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
}

impl WalBusy {
    /// True while new batches should be refused as busy: the WAL is at
    /// its cap, or its disk past the high watermark.
    pub fn is_busy(&self) -> bool {
        self.full.load(Ordering::Acquire) || self.disk.load(Ordering::Acquire)
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
    /// The signed batch.
    pub batch: Vec<u8>,
}

struct Writer {
    dir: PathBuf,
    segment_bytes: u64,
    file: File,
    path: PathBuf,
    base: u64,
    len: u64,
    streams: HashMap<StreamKey, u64>,
    durable: Arc<AtomicU64>,
    poisoned: bool,
    /// Position of the first byte still on disk.
    first_base: u64,
    max_bytes: u64,
    full: Arc<std::sync::atomic::AtomicBool>,
}

impl Wal {
    /// Opens (recovering) the WAL in `dir` and starts its writer thread.
    /// `queue` bounds the appends waiting for the writer; when it is full,
    /// appenders wait, and so do their agents.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        queue: usize,
        max_bytes: u64,
    ) -> Result<(Wal, std::thread::JoinHandle<()>), WalError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let durable = Arc::new(AtomicU64::new(0));
        let mut streams = HashMap::new();
        let segments = list_segments(dir)?;
        let mut end = 0;
        for (i, (base, path)) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            let mut valid_end = *base;
            scan_segment(path, *base, last, |entry| {
                if let Ok(header) = peek_header(&entry.batch) {
                    let key = StreamKey {
                        tenant: entry.tenant.clone(),
                        host: entry.host.clone(),
                        source: header.source.clone(),
                        epoch: header.epoch,
                    };
                    let high = streams.entry(key).or_insert(0);
                    *high = (*high).max(header.end_seq());
                }
                valid_end = entry.next;
            })?;
            end = valid_end;
        }
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
        let writer = Writer {
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
        };
        let handle = std::thread::Builder::new()
            .name("logvault-wal".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io_err(dir, e))?;
        Ok((Wal { tx, durable, dir: dir.to_owned(), busy }, handle))
    }

    /// Appends a batch; resolves once it is fsynced (or known duplicate).
    pub async fn append(&self, request: AppendRequest) -> Result<Appended, WalError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Job::Append(request, reply)).await.map_err(|_| WalError::Closed)?;
        answer.await.map_err(|_| WalError::Closed)?
    }

    /// For each (source, epoch) of `host` in `tenant`, the sequence number
    /// one past the last record durably stored (0 when none is): what an
    /// agent may skip resending after a reconnect.
    pub async fn marks(
        &self,
        tenant: &str,
        host: &str,
        streams: Vec<(String, u64)>,
    ) -> Result<Vec<u64>, WalError> {
        let (reply, answer) = oneshot::channel();
        let job = Job::Marks { tenant: tenant.to_owned(), host: host.to_owned(), streams, reply };
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
        let mut buffer = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Append(request, reply) => group.push((request, reply)),
                    Job::Marks { tenant, host, streams, reply } => {
                        questions.push((tenant, host, streams, reply))
                    }
                }
                if group.len() + questions.len() < MAX_GROUP {
                    next = rx.try_recv().ok();
                }
            }
            self.commit_group(&mut group, &mut buffer);
            for (tenant, host, streams, reply) in questions.drain(..) {
                let marks = streams
                    .into_iter()
                    .map(|(source, epoch)| {
                        let key = StreamKey { tenant: tenant.clone(), host: host.clone(), source, epoch };
                        self.streams.get(&key).copied().unwrap_or(0)
                    })
                    .collect();
                let _ = reply.send(marks);
            }
        }
        let _ = self.file.sync_all();
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
        let mut outcomes: Vec<Result<Appended, WalError>> = Vec::with_capacity(group.len());
        let mut updates: HashMap<StreamKey, u64> = HashMap::new();
        let size = self.base + self.len - self.first_base;
        for (request, _) in group.iter() {
            let key = StreamKey {
                tenant: request.tenant.clone(),
                host: request.host.clone(),
                source: request.header.source.clone(),
                epoch: request.header.epoch,
            };
            let high = updates.get(&key).or_else(|| self.streams.get(&key)).copied().unwrap_or(0);
            let end = request.header.end_seq();
            if end <= high && request.header.count > 0 {
                outcomes.push(Ok(Appended::Duplicate));
                continue;
            }
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
            let skipped = high.saturating_sub(request.header.first_seq) as u32;
            if request.header.first_seq > high {
                tracing::warn!(host = %request.host, source = %request.header.source, epoch = request.header.epoch, expected = high, got = request.header.first_seq, "sequence gap");
            }
            encode_entry(buffer, request, skipped);
            updates.insert(key, end.max(high));
            outcomes.push(Ok(Appended::Stored { skipped }));
        }
        if !buffer.is_empty() {
            let written = self.file.write_all(buffer).and_then(|_| self.file.sync_data());
            if let Err(err) = written {
                tracing::error!(path = %self.path.display(), error = %err, "wal write failed; refusing further appends");
                self.poisoned = true;
                let error = io_err(&self.path, err);
                for (_, reply) in group.drain(..) {
                    let _ = reply.send(Err(error.clone()));
                }
                return;
            }
            self.len += buffer.len() as u64;
            self.streams.extend(updates);
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

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
}

fn encode_entry(out: &mut Vec<u8>, request: &AppendRequest, skip: u32) {
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    out.push(ENTRY_VERSION);
    out.extend_from_slice(&request.received_ns.to_be_bytes());
    for text in [&request.tenant, &request.host] {
        out.extend_from_slice(&(text.len() as u16).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(&skip.to_be_bytes());
    out.extend_from_slice(&request.batch);
    let payload = &out[start + 8..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

fn decode_payload(payload: &[u8]) -> Option<(i64, String, String, u32, Vec<u8>)> {
    let (&version, rest) = payload.split_first()?;
    if version != ENTRY_VERSION {
        return None;
    }
    let received = i64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
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
    Some((received, tenant, host, skip, rest[4..].to_vec()))
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
        if crc32fast::hash(&payload) != crc {
            return torn(path, offset, is_last, "checksum mismatch");
        }
        let Some((received_ns, tenant, host, skip, batch)) = decode_payload(&payload) else {
            return torn(path, offset, is_last, "undecodable entry");
        };
        let position = base + offset;
        offset += 8 + u64::from(len);
        each(Entry { position, next: base + offset, received_ns, tenant, host, skip, batch });
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
            if crc32fast::hash(&payload) != crc {
                return Err(corrupt("checksum mismatch"));
            }
            let (received_ns, tenant, host, skip, batch) =
                decode_payload(&payload).ok_or_else(|| corrupt("undecodable entry"))?;
            let position = base + offset;
            offset += 8 + u64::from(len);
            taken += 8 + u64::from(len);
            out.push(Entry { position, next: base + offset, received_ns, tenant, host, skip, batch });
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
    use logvault_storage::{BatchBuilder, Level, WireRecord};

    fn batch(first_seq: u64, count: u32) -> (Vec<u8>, BatchHeader) {
        let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[1; 32]).unwrap();
        let mut builder = BatchBuilder::new("h", "/s", 0, first_seq, [0; 32]);
        for i in 0..count {
            builder.push(WireRecord::new(i64::from(i), Level::Info, format!("line {i}")));
        }
        let bytes = builder.sign(&key);
        let header = peek_header(&bytes).unwrap();
        (bytes, header)
    }

    fn request(first_seq: u64, count: u32) -> AppendRequest {
        let (batch, header) = batch(first_seq, count);
        AppendRequest { tenant: "t".into(), host: "h".into(), received_ns: 1, batch, header }
    }

    #[tokio::test]
    async fn resends_are_stored_once_and_survive_reopen_with_a_torn_tail() {
        let dir = std::env::temp_dir().join(format!("logvault-wal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let (wal, _thread) = Wal::open(&dir, 1 << 20, 8, 0).unwrap();
            assert_eq!(wal.append(request(0, 10)).await.unwrap(), Appended::Stored { skipped: 0 });
            assert_eq!(wal.append(request(0, 10)).await.unwrap(), Appended::Duplicate);
            assert_eq!(wal.append(request(5, 10)).await.unwrap(), Appended::Stored { skipped: 5 });
        }
        // A crash mid-write leaves half an entry behind.
        let segment = segment_path(&dir, 0);
        let good_len = std::fs::metadata(&segment).unwrap().len();
        let mut file = OpenOptions::new().append(true).open(&segment).unwrap();
        file.write_all(&[0, 0, 1, 0, 9, 9]).unwrap();
        drop(file);

        let (wal, _thread) = Wal::open(&dir, 1 << 20, 8, 0).unwrap();
        assert_eq!(wal.durable_end(), good_len);
        assert_eq!(std::fs::metadata(&segment).unwrap().len(), good_len);
        // The high-water mark was rebuilt from the WAL: 0..15 is stored.
        assert_eq!(wal.append(request(10, 5)).await.unwrap(), Appended::Duplicate);
        assert_eq!(wal.append(request(15, 1)).await.unwrap(), Appended::Stored { skipped: 0 });
        let entries = read_range(&dir, 0, wal.durable_end(), u64::MAX).unwrap();
        assert_eq!(entries.iter().map(|e| e.skip).collect::<Vec<_>>(), vec![0, 5, 0]);
        // Marks are per tenant, host, source and epoch, from durable state.
        let marks = wal
            .marks("t", "h", vec![("/s".into(), 0), ("/s".into(), 1), ("/other".into(), 0)])
            .await
            .unwrap();
        assert_eq!(marks, vec![16, 0, 0]);
        assert_eq!(wal.marks("u", "h", vec![("/s".into(), 0)]).await.unwrap(), vec![0]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_full_wal_refuses_new_batches_and_keeps_what_it_stored() {
        let dir = std::env::temp_dir().join(format!("logvault-wal-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let one = request(0, 10).batch.len() as u64;
        let (wal, _thread) = Wal::open(&dir, 1 << 20, 8, 3 * one + 200).unwrap();
        let mut stored = 0;
        let refused = loop {
            match wal.append(request(stored * 10, 10)).await {
                Ok(Appended::Stored { .. }) => stored += 1,
                Err(err) => break err,
                Ok(other) => panic!("{other:?}"),
            }
            assert!(stored < 10, "the cap never bit");
        };
        assert!(matches!(refused, WalError::Full { .. }), "{refused}");
        assert!(stored >= 2, "{stored}");
        assert!(wal.is_busy());
        // A resend of what is stored is still recognised while full.
        assert_eq!(wal.append(request(0, 10)).await.unwrap(), Appended::Duplicate);
        let end = wal.durable_end();
        assert!(end <= 3 * one + 200, "{end}");
        drop(wal);
        let (wal, _thread) = Wal::open(&dir, 1 << 20, 8, 0).unwrap();
        assert_eq!(read_range(&dir, 0, wal.durable_end(), u64::MAX).unwrap().len() as u64, stored);
        assert!(!wal.is_busy());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
