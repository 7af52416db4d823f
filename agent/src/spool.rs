//! The disk spool: signed batches wait here, bounded and checksummed,
//! while the collector is slow or away.
//!
//! The tailer keeps reading while the collector is down, so a file that is
//! rotated away and deleted during an outage is not lost: its lines are in
//! the spool. Entries leave the spool only when the collector acks them.
//! After a restart the spool is replayed from the last saved head; entries
//! that were acked just before a crash are sent again and recognised by the
//! collector.
//!
//! Segments are `spool/<id>.spool`, rolled at [`SEGMENT_BYTES`]. Entry:
//!
//! ```text
//! len u32 | crc32 u32 (of payload) | payload:
//!   dev u64 | ino u64 | epoch u64 | offset u64 | seq u64 | in_long_line u8
//!   | records u32 | batch hash [32] | the signed batch
//! ```
//!
//! A damaged entry (checksum mismatch, impossible length) is skipped with
//! the rest of its segment, counted and reported; the agent goes on.
//!
//! When the spool holds `max_bytes`, `when_full = "block"` (the default)
//! makes the tailer wait, and the files wait with it; `"drop_oldest"`
//! deletes the oldest segment and counts its records as dropped.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};

use logvault_storage::io::read_full;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::Notify;

use crate::Stats;
use crate::checkpoint::{Acked, FileKey};
use crate::tail::SignedBatch;

/// A segment is rolled past this size.
pub const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
const HEADER: usize = 8;
/// Fixed metadata before the cursor: dev, ino, epoch, offset, seq,
/// in_long_line, records, hash, cursor length.
const META: usize = 8 * 5 + 1 + 4 + 32 + 2;
/// Largest entry read back: a batch frame plus its metadata.
const MAX_ENTRY: u32 = 32 * 1024 * 1024;

/// What happens when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// The tailer waits; nothing is dropped (the default).
    #[default]
    Block,
    /// The oldest segment is deleted and its records counted as dropped.
    DropOldest,
}

/// `[spool]` in the agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Bytes the spool may hold on disk. Default 256 MiB.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// What happens when it is full.
    #[serde(default)]
    pub when_full: WhenFull,
}

fn default_max_bytes() -> u64 {
    256 * 1024 * 1024
}

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
#[error("spool {path}: {source}")]
pub struct SpoolError {
    path: PathBuf,
    source: std::io::Error,
}

struct Segment {
    id: u64,
    path: PathBuf,
    len: u64,
    records: u64,
}

struct State {
    segments: VecDeque<Segment>,
    writer: Option<File>,
    /// Where the shipper reads next.
    read: (u64, u64),
    /// Everything before this is acked.
    head: (u64, u64),
    head_saved: (u64, u64),
    /// No more appends will come (every producer is gone).
    closed: bool,
}

/// The spool, shared by the pump that fills it and the shipper that
/// empties it.
pub struct Spool {
    dir: PathBuf,
    config: SpoolConfig,
    state: Mutex<State>,
    space: Condvar,
    /// Woken when an entry is appended or the spool is closed.
    pub readable: Notify,
    stats: Arc<Stats>,
    /// Held while the head is saved: the periodic save and the one at
    /// shutdown share `head.tmp`, and one's rename must not take the
    /// other's file away.
    saving: Mutex<()>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError { path: path.to_owned(), source }
}

impl Spool {
    /// Opens the spool in `dir`, ready to replay what was not acked.
    pub fn open(dir: &Path, config: SpoolConfig, stats: Arc<Stats>) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut segments = VecDeque::new();
        let mut ids: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".spool")?.parse().ok())
            .collect();
        ids.sort_unstable();
        for id in ids {
            let path = segment_path(dir, id);
            let len = std::fs::metadata(&path).map_err(io(&path))?.len();
            let (valid, records, damage) = scan(&path);
            if let Some(reason) = damage {
                // Cut the damage off; the tailer reads again from the acked
                // checkpoints at every start, so what the cut-off entries
                // held comes back from the files that still exist.
                stats.spool_corrupt_entries.fetch_add(1, Ordering::Relaxed);
                tracing::error!(segment = %path.display(), offset = valid, reason, "damaged spool entry; cutting the segment there");
            }
            if valid < len {
                // Damage, or a torn last write that was never complete.
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(valid))
                    .map_err(io(&path))?;
            }
            segments.push_back(Segment { id, path, len: valid, records });
        }
        let head = std::fs::read_to_string(dir.join("head"))
            .ok()
            .and_then(|text| {
                let (id, offset) = text.trim().split_once(':')?;
                Some((id.parse().ok()?, offset.parse().ok()?))
            })
            .unwrap_or_else(|| segments.front().map_or((0, 0), |s| (s.id, 0)));
        // The saved head can be older than the segments: a segment acked
        // and removed after the head was last saved, or cut shorter above.
        // Reading must start on an entry boundary that exists, and a new
        // segment must never reuse the id of the one the head names, or the
        // head's offset would land inside the new segment's entries.
        let head = match segments.iter().find(|s| s.id == head.0) {
            Some(segment) => (head.0, head.1.min(segment.len)),
            // Offset 0 is a boundary in any segment of that id.
            None if head.1 == 0 => head,
            None => segments.iter().find(|s| s.id > head.0).map_or((head.0 + 1, 0), |s| (s.id, 0)),
        };
        let spool = Spool {
            dir: dir.to_owned(),
            config,
            state: Mutex::new(State {
                segments,
                writer: None,
                read: head,
                head,
                head_saved: head,
                closed: false,
            }),
            space: Condvar::new(),
            saving: Mutex::new(()),
            readable: Notify::new(),
            stats,
        };
        spool.update_gauges(&spool.lock());
        Ok(spool)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn total(state: &State) -> u64 {
        state.segments.iter().map(|s| s.len).sum()
    }

    fn update_gauges(&self, state: &State) {
        self.stats.spool_bytes.store(Self::total(state), Ordering::Relaxed);
    }

    /// Appends a batch, durably (fdatasync). Blocks while the spool is full
    /// under `when_full = "block"`; returns `false` if `stop` is set while
    /// waiting.
    pub fn append(&self, batch: &SignedBatch, stop: &dyn Fn() -> bool) -> Result<bool, SpoolError> {
        let entry = encode(batch);
        let mut state = self.lock();
        loop {
            let total = Self::total(&state);
            if total == 0 || total + entry.len() as u64 <= self.config.max_bytes {
                break;
            }
            match self.config.when_full {
                WhenFull::Block => {
                    if stop() {
                        return Ok(false);
                    }
                    state = self
                        .space
                        .wait_timeout(state, Duration::from_millis(100))
                        .map_or_else(|poisoned| poisoned.into_inner().0, |(guard, _)| guard);
                }
                WhenFull::DropOldest => {
                    if state.segments.len() <= 1 {
                        break; // the entry goes into a fresh segment anyway
                    }
                    let oldest = state.segments.pop_front().expect("more than one segment");
                    tracing::warn!(
                        segment = oldest.id,
                        records = oldest.records,
                        "spool full; dropping its oldest segment"
                    );
                    self.stats.spool_dropped_records.fetch_add(oldest.records, Ordering::Relaxed);
                    let _ = std::fs::remove_file(&oldest.path);
                    let next = state.segments.front().map_or((oldest.id + 1, 0), |s| (s.id, 0));
                    if state.read.0 <= oldest.id {
                        state.read = next;
                    }
                    if state.head.0 <= oldest.id {
                        state.head = next;
                    }
                }
            }
        }
        let roll_at = self.segment_bytes();
        // Appends never go into a segment written before the writer was
        // opened (by an earlier run, or before damage was found): always a
        // fresh one.
        let needs_new = state.writer.is_none() || state.segments.back().is_none_or(|s| s.len >= roll_at);
        if needs_new {
            let id = state.segments.back().map_or(state.head.0, |s| s.id + 1).max(state.read.0);
            let path = segment_path(&self.dir, id);
            let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
            state.segments.push_back(Segment { id, path, len: 0, records: 0 });
            state.writer = Some(file);
        }
        let segment_path = state.segments.back().expect("a segment exists").path.clone();
        let writer = state.writer.as_mut().expect("opened above");
        writer.write_all(&entry).and_then(|_| writer.sync_data()).map_err(io(&segment_path))?;
        let segment = state.segments.back_mut().expect("a segment exists");
        segment.len += entry.len() as u64;
        segment.records += u64::from(batch.records);
        self.update_gauges(&state);
        drop(state);
        self.readable.notify_one();
        Ok(true)
    }

    /// Segments are rolled at a quarter of the spool (at most
    /// [`SEGMENT_BYTES`]), so acks free room in steps.
    fn segment_bytes(&self) -> u64 {
        (self.config.max_bytes / 4).clamp(64 * 1024, SEGMENT_BYTES)
    }

    /// No more appends will come: the reader ends once it has read the rest.
    pub fn close(&self) {
        self.lock().closed = true;
        self.readable.notify_one();
    }

    /// The next entry after the read cursor.
    pub fn next(&self) -> Next {
        let mut state = self.lock();
        loop {
            let Some(index) = state.segments.iter().position(|s| s.id >= state.read.0) else {
                return if state.closed { Next::Closed } else { Next::Empty };
            };
            let (id, path, len) = {
                let segment = &state.segments[index];
                (segment.id, segment.path.clone(), segment.len)
            };
            if id > state.read.0 {
                state.read = (id, 0);
            }
            if state.read.1 >= len {
                if index + 1 < state.segments.len() {
                    state.read = (state.segments[index + 1].id, 0);
                    continue;
                }
                return if state.closed { Next::Closed } else { Next::Empty };
            }
            match read_entry(&path, state.read.1) {
                Ok(Some((mut batch, next))) => {
                    batch.spool_position = Some((id, next));
                    state.read.1 = next;
                    return Next::Batch(batch);
                }
                Ok(None) => return Next::Empty, // a write in progress
                Err(reason) => {
                    self.stats.spool_corrupt_entries.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(segment = %path.display(), offset = state.read.1, reason, "damaged spool entry; skipping the rest of the segment");
                    if index + 1 == state.segments.len() {
                        // Appends continue in a new segment after the damage.
                        state.writer = None;
                        state.segments[index].len = state.read.1;
                        state.read = (id + 1, 0);
                    } else {
                        state.read = (state.segments[index + 1].id, 0);
                    }
                }
            }
        }
    }

    /// Waits for the next entry; `None` once the spool is closed and read out.
    pub async fn next_async(&self) -> Option<SignedBatch> {
        loop {
            let notified = self.readable.notified();
            match self.next() {
                Next::Batch(batch) => return Some(batch),
                Next::Closed => return None,
                Next::Empty => notified.await,
            }
        }
    }

    /// The batch ending at `position` is acked: segments wholly before it go.
    pub fn ack(&self, position: (u64, u64)) {
        let mut state = self.lock();
        if position <= state.head {
            return;
        }
        state.head = position;
        while state.segments.len() > 1 && state.segments[0].id < position.0 {
            let done = state.segments.pop_front().expect("checked");
            let _ = std::fs::remove_file(&done.path);
        }
        // Everything acked: the last segment goes too, and appends start a
        // fresh one, so a spool smaller than a segment never jams.
        if state.segments.len() == 1
            && state.segments[0].id == position.0
            && state.segments[0].len == position.1
        {
            let done = state.segments.pop_front().expect("checked");
            let _ = std::fs::remove_file(&done.path);
            state.writer = None;
            state.head = (done.id + 1, 0);
            state.read = state.read.max(state.head);
        }
        self.update_gauges(&state);
        drop(state);
        self.space.notify_all();
    }

    /// Goes back to the head: after a reconnect the shipper resends what is
    /// in flight itself, so the cursor stays; this is for a fresh start.
    pub fn rewind(&self) {
        let mut state = self.lock();
        state.read = state.head;
    }

    /// Saves the head, so a restart replays only what was not acked.
    pub fn persist_head(&self) -> Result<(), SpoolError> {
        let _saving = self.saving.lock().unwrap_or_else(|p| p.into_inner());
        let head = {
            let state = self.lock();
            if state.head == state.head_saved {
                return Ok(());
            }
            state.head
        };
        let path = self.dir.join("head");
        let tmp = self.dir.join("head.tmp");
        std::fs::write(&tmp, format!("{}:{}\n", head.0, head.1))
            .and_then(|_| File::open(&tmp).and_then(|f| f.sync_all()))
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(io(&path))?;
        self.lock().head_saved = head;
        Ok(())
    }
}

/// What [`Spool::next`] found.
#[derive(Debug)]
pub enum Next {
    /// An entry.
    Batch(SignedBatch),
    /// Nothing yet.
    Empty,
    /// Closed and read out: no more will come.
    Closed,
}

impl Next {
    /// The entry, if one was found.
    pub fn batch(self) -> Option<SignedBatch> {
        match self {
            Next::Batch(batch) => Some(batch),
            _ => None,
        }
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.spool"))
}

fn encode(batch: &SignedBatch) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + META + batch.bytes.len());
    out.extend_from_slice(&[0; HEADER]);
    out.extend_from_slice(&batch.file.dev.to_be_bytes());
    out.extend_from_slice(&batch.file.ino.to_be_bytes());
    out.extend_from_slice(&batch.ack.epoch.to_be_bytes());
    out.extend_from_slice(&batch.ack.offset.to_be_bytes());
    out.extend_from_slice(&batch.ack.seq.to_be_bytes());
    out.push(u8::from(batch.ack.in_long_line));
    out.extend_from_slice(&batch.records.to_be_bytes());
    out.extend_from_slice(&batch.hash);
    let cursor = batch.cursor.as_deref().unwrap_or_default().as_bytes();
    let cursor = &cursor[..cursor.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(cursor.len() as u16).to_be_bytes());
    out.extend_from_slice(cursor);
    out.extend_from_slice(&batch.bytes);
    let len = (out.len() - HEADER) as u32;
    let crc = crc32fast::hash(&out[HEADER..]);
    out[..4].copy_from_slice(&len.to_be_bytes());
    out[4..8].copy_from_slice(&crc.to_be_bytes());
    out
}

/// Reads the entry at `offset`: `Ok(None)` if it is not all there yet.
fn read_entry(path: &Path, offset: u64) -> Result<Option<(SignedBatch, u64)>, String> {
    let mut file = File::open(path).map_err(|e| e.to_string())?;
    file.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut head = [0u8; HEADER];
    if read_full(&mut file, &mut head).map_err(|e| e.to_string())? < HEADER {
        return Ok(None);
    }
    let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
    let crc = u32::from_be_bytes(head[4..].try_into().expect("4 bytes"));
    if !(META as u32..=MAX_ENTRY).contains(&len) {
        return Err(format!("impossible entry length {len}"));
    }
    let mut payload = vec![0u8; len as usize];
    if read_full(&mut file, &mut payload).map_err(|e| e.to_string())? < payload.len() {
        return Ok(None);
    }
    if crc32fast::hash(&payload) != crc {
        return Err("checksum mismatch".to_owned());
    }
    let u64_at = |at: usize| u64::from_be_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
    let cursor_len = u16::from_be_bytes(payload[77..79].try_into().expect("2 bytes")) as usize;
    if META + cursor_len > payload.len() {
        return Err(format!("cursor length {cursor_len} past the entry"));
    }
    let cursor =
        (cursor_len > 0).then(|| String::from_utf8_lossy(&payload[META..META + cursor_len]).into_owned());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&payload[45..77]);
    let batch = SignedBatch {
        file: FileKey { dev: u64_at(0), ino: u64_at(8) },
        ack: Acked {
            epoch: u64_at(16),
            offset: u64_at(24),
            seq: u64_at(32),
            in_long_line: payload[40] == 1,
            batch_hash: hash,
        },
        records: u32::from_be_bytes(payload[41..45].try_into().expect("4 bytes")),
        hash,
        bytes: payload[META + cursor_len..].to_vec(),
        cursor,
        spool_position: None,
    };
    Ok(Some((batch, offset + HEADER as u64 + u64::from(len))))
}

/// Walks a segment: the length of its whole, valid entries, their record
/// count, and what is wrong with the first damaged entry, if any.
fn scan(path: &Path) -> (u64, u64, Option<String>) {
    let mut offset = 0;
    let mut records = 0;
    loop {
        match read_entry(path, offset) {
            Ok(Some((batch, next))) => {
                records += u64::from(batch.records);
                offset = next;
            }
            Ok(None) => return (offset, records, None),
            Err(reason) => return (offset, records, Some(reason)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: u8) -> SignedBatch {
        SignedBatch {
            bytes: vec![n; 100],
            hash: [n; 32],
            file: FileKey { dev: 1, ino: u64::from(n) },
            ack: Acked {
                epoch: 9,
                offset: u64::from(n) * 10,
                seq: u64::from(n),
                in_long_line: false,
                batch_hash: [n; 32],
            },
            records: 3,
            spool_position: None,
            cursor: None,
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("logvault-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    proptest::proptest! {
        /// Every entry reads back as written, whatever its contents, and
        /// any bytes at all read as entries, damage or a partial tail,
        /// without panicking.
        #[test]
        fn entries_round_trip_and_any_bytes_read_without_panicking(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            records: u32,
            cursor in proptest::option::of("\\PC{1,40}"),
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
        ) {
            let dir = temp("prop");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("entry");
            let written = SignedBatch { bytes, records, cursor, ..batch(7) };
            std::fs::write(&path, encode(&written)).unwrap();
            let (read, next) = read_entry(&path, 0).unwrap().unwrap();
            proptest::prop_assert_eq!(next, std::fs::metadata(&path).unwrap().len());
            proptest::prop_assert_eq!(
                (read.bytes, read.records, read.cursor, read.hash, read.ack.offset),
                (written.bytes, written.records, written.cursor, written.hash, written.ack.offset)
            );
            std::fs::write(&path, &noise).unwrap();
            let (valid, _, _) = scan(&path);
            proptest::prop_assert!(valid <= noise.len() as u64);
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    /// A kill after a segment was acked and removed but before the head
    /// was saved again: the stale head names the removed segment at some
    /// offset. New entries go to a segment of a new id, and all of them are
    /// read; none is taken for damage.
    #[test]
    fn a_stale_head_naming_a_removed_segment_loses_nothing_appended_later() {
        let dir = temp("stale-head");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("head"), "2:60860").unwrap();
        let stats = Arc::new(Stats::default());
        let config = SpoolConfig { max_bytes: 1 << 20, when_full: WhenFull::Block };
        let spool = Spool::open(&dir, config.clone(), stats.clone()).unwrap();
        for n in 0..3 {
            assert!(spool.append(&batch(n), &|| false).unwrap());
        }
        let read: Vec<u8> = std::iter::from_fn(|| spool.next().batch()).map(|b| b.bytes[0]).collect();
        assert_eq!(read, vec![0, 1, 2]);
        assert_eq!(stats.spool_corrupt_entries.load(Ordering::Relaxed), 0);
        assert!(!segment_path(&dir, 2).exists(), "the removed segment's id was reused");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Regression: the periodic save and the one at shutdown ran at once,
    /// and one's rename took the other's `head.tmp` away (ENOENT at exit).
    #[test]
    fn saving_the_head_from_two_threads_at_once_never_fails() {
        let dir = temp("concurrent-head");
        let stats = Arc::new(Stats::default());
        let spool = Arc::new(
            Spool::open(&dir, SpoolConfig { max_bytes: 1 << 20, when_full: WhenFull::Block }, stats).unwrap(),
        );
        for n in 0..200 {
            assert!(spool.append(&batch(n), &|| false).unwrap());
        }
        let savers: Vec<_> = (0..2)
            .map(|_| {
                let spool = spool.clone();
                std::thread::spawn(move || {
                    while let Some(entry) = spool.next().batch() {
                        spool.ack(entry.spool_position.unwrap());
                        spool.persist_head().unwrap();
                    }
                })
            })
            .collect();
        for saver in savers {
            saver.join().unwrap();
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn entries_replay_from_the_saved_head_after_a_restart() {
        let dir = temp("replay");
        let stats = Arc::new(Stats::default());
        let spool =
            Spool::open(&dir, SpoolConfig { max_bytes: 1 << 20, when_full: WhenFull::Block }, stats.clone())
                .unwrap();
        for n in 0..5 {
            assert!(spool.append(&batch(n), &|| false).unwrap());
        }
        let first = spool.next().batch().unwrap();
        let second = spool.next().batch().unwrap();
        assert_eq!((first.bytes[0], second.bytes[0]), (0, 1));
        spool.ack(first.spool_position.unwrap());
        spool.persist_head().unwrap();
        drop(spool);
        let spool =
            Spool::open(&dir, SpoolConfig { max_bytes: 1 << 20, when_full: WhenFull::Block }, stats).unwrap();
        let replayed: Vec<u8> = std::iter::from_fn(|| spool.next().batch()).map(|b| b.bytes[0]).collect();
        assert_eq!(replayed, vec![1, 2, 3, 4]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_flipped_byte_is_skipped_counted_and_the_spool_goes_on() {
        let dir = temp("flip");
        let stats = Arc::new(Stats::default());
        let config = SpoolConfig { max_bytes: 1 << 20, when_full: WhenFull::Block };
        let spool = Spool::open(&dir, config.clone(), stats.clone()).unwrap();
        for n in 0..3 {
            spool.append(&batch(n), &|| false).unwrap();
        }
        drop(spool);
        let segment = segment_path(&dir, 0);
        let mut bytes = std::fs::read(&segment).unwrap();
        let entry = bytes.len() / 3;
        bytes[entry + 50] ^= 0x40; // inside the second entry
        std::fs::write(&segment, bytes).unwrap();
        let spool = Spool::open(&dir, config, stats.clone()).unwrap();
        assert_eq!(spool.next().batch().unwrap().bytes[0], 0);
        // The rest of the damaged segment is skipped; new entries flow.
        assert!(spool.next().batch().is_none());
        assert_eq!(stats.spool_corrupt_entries.load(Ordering::Relaxed), 1);
        spool.append(&batch(7), &|| false).unwrap();
        assert_eq!(spool.next().batch().unwrap().bytes[0], 7);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn full_spools_block_or_drop_the_oldest_segment() {
        let dir = temp("full");
        let stats = Arc::new(Stats::default());
        let entry = encode(&batch(0)).len() as u64;
        let config = SpoolConfig { max_bytes: entry * 2, when_full: WhenFull::Block };
        let spool = Spool::open(&dir, config, stats.clone()).unwrap();
        assert!(spool.append(&batch(0), &|| false).unwrap());
        assert!(spool.append(&batch(1), &|| false).unwrap());
        // Full: blocks until stopped.
        assert!(!spool.append(&batch(2), &|| true).unwrap());
        // Acks free the room.
        let first = spool.next().batch().unwrap();
        let second = spool.next().batch().unwrap();
        spool.ack(first.spool_position.unwrap());
        spool.ack(second.spool_position.unwrap());
        assert!(spool.append(&batch(2), &|| true).unwrap());
        assert_eq!(spool.next().batch().unwrap().bytes[0], 2);
        assert_eq!(stats.spool_dropped_records.load(Ordering::Relaxed), 0);
        drop(spool);
        std::fs::remove_dir_all(&dir).unwrap();

        let config = SpoolConfig { max_bytes: SEGMENT_BYTES, when_full: WhenFull::DropOldest };
        let spool = Spool::open(&dir, config, stats.clone()).unwrap();
        let big = SignedBatch { bytes: vec![0; (SEGMENT_BYTES / 2) as usize], ..batch(0) };
        for _ in 0..6 {
            assert!(spool.append(&big, &|| false).unwrap());
        }
        assert!(stats.spool_dropped_records.load(Ordering::Relaxed) > 0);
        assert!(stats.spool_bytes.load(Ordering::Relaxed) <= 2 * SEGMENT_BYTES);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
