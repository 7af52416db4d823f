//! The WAL of a collector that shares its streams' dedup state with other
//! collectors through a bucket (see [`crate::cluster`]).
//!
//! Before a batch is judged, its stream's object is read unless this
//! collector wrote or read it last. After the group's fsync each stream
//! touched is written back conditionally, naming this collector as the
//! owner of the records it stored; only then are the batches acked. When
//! another collector wrote the stream first, its entries of the group are
//! made void in place (one state byte, outside the checksum: never
//! indexed, sealed or counted by dedup) and every batch of that stream in
//! the group is answered busy, so the agent sends it again. When the
//! bucket cannot be reached, the outcome is unknown, so the writer keeps
//! asking until it can tell: nothing is acked meanwhile, and nothing acked
//! is lost.
//!
//! `wal/shared.settled` holds the position before which every entry is
//! settled with the bucket (acked, or void): written when a collector
//! first opens its WAL with a bucket (what came before was acked without
//! one) and after each group. At open, the entries after it whose records
//! the bucket does not give to this collector (a crash between the fsync
//! and the bucket write) are made void, after the stream's object is
//! fenced (rewritten) so that a write still in flight from before the
//! crash cannot land later.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use logvault_storage::archive::Conditional;

use super::{
    Appended, ENTRY_VERSION, Recovered, STATE_AT, StreamKey, StreamState, VOID, WalError, Writer, io_err,
};
use crate::cluster::{ClusterError, SharedStreams, StreamRecord};

/// Stream objects cached, at most; past it the cache is emptied (between
/// groups) and streams are read again as they come.
const CACHED: usize = 8192;
/// Attempts to reach the bucket while settling, a second apart, before
/// the collector gives up starting.
const SETTLE_ATTEMPTS: u32 = 60;
/// Longest wait between attempts to reach the bucket.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The settled position's file, in the WAL directory.
const SETTLED: &str = "shared.settled";
/// The origin's file: the WAL's end when it was first opened with a bucket.
const ORIGIN: &str = "shared.origin";
/// A test hook: the collector aborts right after the fsync of this many
/// groups, before their streams' objects are written (a crash at the one
/// point where an entry is durable and not yet the collector's).
pub(super) const CRASH_AFTER_FSYNC_ENV: &str = "LOGVAULT_TEST_CRASH_AFTER_WAL_FSYNC";

/// The shared state as the writer holds it.
pub(super) struct Shared {
    streams: SharedStreams,
    runtime: tokio::runtime::Handle,
    /// Streams as this collector last wrote or read them, with the entity
    /// tag (None: no object yet).
    known: HashMap<StreamKey, (StreamRecord, Option<String>)>,
    settled: File,
    /// Groups left before the test hook aborts.
    crash_after: Option<u64>,
}

impl Shared {
    pub(super) fn new(
        streams: SharedStreams,
        runtime: tokio::runtime::Handle,
        dir: &Path,
    ) -> Result<Shared, WalError> {
        let path = dir.join(SETTLED);
        let settled = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        let crash_after = std::env::var(CRASH_AFTER_FSYNC_ENV).ok().and_then(|n| n.parse().ok());
        Ok(Shared { streams, runtime, known: HashMap::new(), settled, crash_after })
    }

    /// Whether the stream was written or read by this collector last.
    pub(super) fn knows(&self, key: &StreamKey) -> bool {
        self.known.contains_key(key)
    }

    /// Empties the cache when it is full; between groups only, so no
    /// stream loses its tag while a group uses it.
    pub(super) fn trim(&mut self) {
        if self.known.len() >= CACHED {
            self.known.clear();
        }
    }
}

/// Where an entry of the group lies, and what it stored.
pub(super) struct Placed {
    pub key: StreamKey,
    /// Its bytes in the group's buffer.
    pub entry: Range<usize>,
    /// Its new records.
    pub from: u64,
    pub to: u64,
    pub hash: [u8; 32],
}

/// A stream's new object, the tag it replaces, and the ranges of records
/// it gives this collector.
type Outgoing = (StreamRecord, Option<String>, Vec<(u64, u64)>);

/// Dedup state from a stream object.
fn state_of(record: &StreamRecord) -> StreamState {
    let mut state = StreamState::default();
    for (end, hash) in record.link_hashes() {
        state.record(end, hash);
    }
    state.high = record.high;
    state.floor = state.floor.max(record.floor);
    state
}

/// A first object for a stream this collector knew before it shared a
/// bucket: its end and last links.
fn record_of(key: &StreamKey, state: Option<&StreamState>) -> StreamRecord {
    let mut record = StreamRecord::new(&key.tenant, &key.host, &key.source, key.epoch);
    if let Some(state) = state {
        let mut links: Vec<(u64, [u8; 32])> =
            state.links.iter().flat_map(|(end, hashes)| hashes.iter().map(|hash| (*end, *hash))).collect();
        let keep = links.len().saturating_sub(crate::cluster::SHARED_LINKS);
        record.floor = state.floor.max(links.get(keep.wrapping_sub(1)).map_or(0, |(end, _)| *end));
        links.drain(..keep);
        record.links = links.into_iter().map(|(end, hash)| (end, crate::cluster::hex(&hash))).collect();
        record.high = state.high;
    }
    record
}

fn fetch(
    shared: &SharedStreams,
    runtime: &tokio::runtime::Handle,
    key: &StreamKey,
) -> Result<Option<(StreamRecord, String)>, ClusterError> {
    runtime.block_on(shared.fetch(&key.tenant, &key.host, &key.source, key.epoch))
}

/// Asks until the bucket answers, waiting longer each time. A damaged
/// object is an answer: asking again will not mend it.
fn until_answered<T>(
    what: &str,
    mut attempt: impl FnMut() -> Result<T, ClusterError>,
) -> Result<T, ClusterError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match attempt() {
            Err(err @ ClusterError::Store(_)) => {
                tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "{what}; acks wait until the bucket answers");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            answered => return answered,
        }
    }
}

impl Writer {
    /// Reads the stream's object into the dedup state. A stream with no
    /// object keeps what this WAL knows of it (from before the bucket).
    pub(super) fn refresh(&mut self, key: &StreamKey) -> Result<(), WalError> {
        let shared = self.shared.as_mut().expect("only with a shared bucket");
        let fetched = fetch(&shared.streams, &shared.runtime, key).map_err(|err| {
            tracing::warn!(error = %err, "shared stream state unreadable; refusing the batch as busy");
            WalError::Shared { message: format!("collector busy: shared stream state unreadable: {err}") }
        })?;
        match fetched {
            Some((record, etag)) => match self.streams.get(key) {
                Some(local) if local.high > record.high => {
                    // This WAL acked records the bucket does not have (taken
                    // while it ran without one): they are this collector's,
                    // and the next write says so.
                    let mut merged = record_of(key, Some(local));
                    merged.runs = record.runs.clone();
                    merged.fence = record.fence;
                    merged.give(shared.streams.collector(), record.high, local.high);
                    shared.known.insert(key.clone(), (merged, Some(etag)));
                }
                _ => {
                    self.streams.insert(key.clone(), state_of(&record));
                    shared.known.insert(key.clone(), (record, Some(etag)));
                }
            },
            None => {
                let record = record_of(key, self.streams.get(key));
                shared.known.insert(key.clone(), (record, None));
            }
        }
        Ok(())
    }

    /// Writes back every stream the group stored records of, after the
    /// group's fsync. A stream another collector wrote first has its
    /// entries made void and all its batches in the group answered with
    /// [`WalError::Shared`]; its state is read again.
    pub(super) fn publish(
        &mut self,
        placed: &[Placed],
        outcomes: &mut [Result<Appended, WalError>],
        outcome_keys: &[Option<StreamKey>],
        updates: &mut HashMap<StreamKey, StreamState>,
    ) -> Result<(), WalError> {
        let shared = self.shared.as_mut().expect("only with a shared bucket");
        if let Some(left) = shared.crash_after.as_mut() {
            *left = left.saturating_sub(1);
            if *left == 0 {
                tracing::error!("{CRASH_AFTER_FSYNC_ENV}: aborting between the wal fsync and the bucket");
                std::process::abort();
            }
        }
        let collector = shared.streams.collector().to_owned();
        // Each stream's new object, and the ranges of records it gives us.
        let mut order: Vec<StreamKey> = Vec::new();
        let mut next: HashMap<StreamKey, Outgoing> = HashMap::new();
        for place in placed {
            let (record, _, ranges) = next.entry(place.key.clone()).or_insert_with(|| {
                order.push(place.key.clone());
                let (record, etag) =
                    shared.known.get(&place.key).cloned().expect("read before it was judged");
                (record, etag, Vec::new())
            });
            record.record(&collector, place.from, place.to, &place.hash);
            if place.from < place.to {
                ranges.push((place.from, place.to));
            }
        }
        // Every stream at once, then each one settled.
        let written: Vec<_> = {
            let streams = &shared.streams;
            shared.runtime.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for (i, key) in order.iter().enumerate() {
                    let (record, etag, _) = next[key].clone();
                    let streams = streams.clone();
                    set.spawn(async move { (i, streams.publish(&record, etag.as_deref()).await) });
                }
                let mut results: Vec<_> = (0..order.len()).map(|_| None).collect();
                while let Some(joined) = set.join_next().await {
                    if let Ok((i, result)) = joined {
                        results[i] = Some(result);
                    }
                }
                results
            })
        };
        let mut voided = HashSet::new();
        for (key, result) in order.into_iter().zip(written) {
            let (record, etag, ranges) = next.remove(&key).expect("built above");
            let mut result = result;
            loop {
                match result {
                    Some(Ok(Conditional::Written(Some(tag)))) => {
                        shared.known.insert(key.clone(), (record, Some(tag)));
                        break;
                    }
                    Some(Ok(Conditional::Written(None))) => {
                        // No tag given back: read the object next time.
                        shared.known.remove(&key);
                        break;
                    }
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "shared stream state not written; acks wait until the bucket answers");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Some(Ok(Conditional::Conflict)) | None => {}
                }
                // What the bucket holds now decides.
                let current = until_answered("shared stream state unreadable", || {
                    fetch(&shared.streams, &shared.runtime, &key)
                });
                let (current, tag) = match current {
                    Ok(Some((current, tag))) => (current, Some(tag)),
                    Ok(None) => (record_of(&key, self.streams.get(&key)), None),
                    Err(err) => {
                        // Not an object this collector wrote: nothing of the
                        // group's is given to it. Void here; the stream is
                        // answered busy until the object is mended, while
                        // every other stream goes on.
                        tracing::error!(error = %err, tenant = %key.tenant, host = %key.host, source = %key.source, "shared stream state damaged; records void here, the agent is answered busy");
                        if !ranges.is_empty() {
                            voided.insert(key.clone());
                        }
                        updates.remove(&key);
                        shared.known.remove(&key);
                        break;
                    }
                };
                if !ranges.is_empty() && ranges.iter().all(|(from, to)| current.gives(&collector, *from, *to))
                {
                    // Our write landed (its answer was lost).
                } else if tag == etag {
                    // Unchanged: our write did not land. Again.
                    result = Some(shared.runtime.block_on(shared.streams.publish(&record, etag.as_deref())));
                    continue;
                } else if !ranges.is_empty() {
                    // Another collector wrote the stream first.
                    tracing::info!(tenant = %key.tenant, host = %key.host, source = %key.source, epoch = key.epoch, ?ranges, "records taken by another collector first; void here, the agent sends them again");
                    voided.insert(key.clone());
                }
                self.streams.insert(key.clone(), state_of(&current));
                updates.remove(&key);
                shared.known.insert(key.clone(), (current, tag));
                break;
            }
        }
        if !voided.is_empty() {
            for place in placed.iter().filter(|place| voided.contains(&place.key)) {
                let at = self.len + (place.entry.start + STATE_AT) as u64;
                self.file_at()?.write_all_at(&[VOID], at).map_err(|e| io_err(&self.path, e))?;
            }
            self.file_at()?.sync_data().map_err(|e| io_err(&self.path, e))?;
            for (outcome, key) in outcomes.iter_mut().zip(outcome_keys) {
                if key.as_ref().is_some_and(|key| voided.contains(key)) {
                    *outcome = Err(WalError::Shared {
                        message: "collector busy: the bucket does not give these records to this collector (another stored them first); send again"
                            .into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Notes that everything before `position` is settled with the bucket.
    /// Not fsynced: a position lost in a crash only makes the next open
    /// check more entries.
    pub(super) fn settled(&mut self, position: u64) {
        let shared = self.shared.as_mut().expect("only with a shared bucket");
        let _ = shared.settled.write_all_at(&encode_settled(position), 0);
    }

    /// The segment being written, open for writes in place.
    fn file_at(&mut self) -> Result<&File, WalError> {
        if self.file_at.as_ref().is_none_or(|(path, _)| *path != self.path) {
            let file = OpenOptions::new().write(true).open(&self.path).map_err(|e| io_err(&self.path, e))?;
            self.file_at = Some((self.path.clone(), file));
        }
        Ok(&self.file_at.as_ref().expect("just set").1)
    }
}

fn encode_settled(position: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&position.to_be_bytes());
    let crc = crc32fast::hash(&out[..8]);
    out[8..].copy_from_slice(&crc.to_be_bytes());
    out
}

/// A position file: None when absent or damaged.
fn read_position(path: &Path) -> Result<Option<u64>, WalError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(io_err(path, err)),
    };
    let valid = bytes.len() == 12 && crc32fast::hash(&bytes[..8]).to_be_bytes() == bytes[8..];
    Ok(valid.then(|| u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"))))
}

/// Writes a position file whole or not at all: a temporary file, fsynced,
/// renamed over, the directory fsynced.
fn write_position(dir: &Path, name: &str, position: u64) -> Result<(), WalError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let written = File::create(&tmp).and_then(|mut file| {
        std::io::Write::write_all(&mut file, &encode_settled(position))?;
        file.sync_all()
    });
    written.map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    super::sync_dir(dir)
}

/// Where settling starts: after the origin (the WAL's end when it was first
/// opened with a bucket: everything before was acked without one), and
/// after the settled position when that file is whole.
fn settle_from(dir: &Path, end: u64) -> Result<u64, WalError> {
    let origin = match read_position(&dir.join(ORIGIN))? {
        Some(origin) => origin,
        None => {
            // A damaged origin cannot be told from a first open: a crash
            // while it was written left no entry after it anyway.
            write_position(dir, ORIGIN, end)?;
            write_position(dir, SETTLED, end)?;
            end
        }
    };
    Ok(read_position(&dir.join(SETTLED))?.map_or(origin, |settled| settled.max(origin)))
}

/// Forgets the bucket markers: the WAL is opened without a bucket, so what
/// it takes now is acked without one.
pub(super) fn forget_markers(dir: &Path) -> Result<(), WalError> {
    let mut removed = false;
    for name in [ORIGIN, SETTLED] {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => removed = true,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_err(&dir.join(name), err)),
        }
    }
    if removed {
        super::sync_dir(dir)?;
    }
    Ok(())
}

/// Makes the entry at `offset` of the segment file `path` void in place.
fn void_in_file(path: &Path, offset: u64) -> Result<(), WalError> {
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| io_err(path, e))?;
    let mut version = [0u8; 1];
    file.read_exact_at(&mut version, offset + 8).map_err(|e| io_err(path, e))?;
    if version[0] != ENTRY_VERSION {
        // Older entries have no state byte: they were written without a bucket.
        return Err(WalError::Corrupt {
            path: path.to_owned(),
            offset,
            reason: "an entry to void is not version 3".into(),
        });
    }
    file.write_all_at(&[VOID], offset + STATE_AT as u64).map_err(|e| io_err(path, e))?;
    file.sync_data().map_err(|e| io_err(path, e))
}

/// At open: makes void every entry after the settled position whose
/// records the bucket does not give to this collector (written, then the
/// collector stopped before its stream object was, so never acked), after
/// fencing its stream's object; then sets each such stream's dedup state
/// to what the bucket and the live entries say.
pub(super) async fn settle(
    recovered: &mut Recovered,
    shared: &SharedStreams,
    dir: &Path,
) -> Result<(), WalError> {
    let from = settle_from(dir, recovered.end)?;
    let shared_err = |err: ClusterError| WalError::Shared {
        message: format!("settling the wal with the shared bucket: {err}"),
    };
    let mut doomed: Vec<(PathBuf, u64)> = Vec::new();
    let mut touched: HashMap<StreamKey, StreamRecord> = HashMap::new();
    // Every stream with an entry after `from` is set from the bucket; only
    // entries with records of their own can be lost.
    let unsettled: Vec<usize> =
        (0..recovered.tail.len()).filter(|&i| recovered.tail[i].position >= from).collect();
    let (_, snapshot) = super::read_snapshot(dir)?;
    let keys: Vec<StreamKey> = {
        let mut seen = HashSet::new();
        unsettled
            .iter()
            .map(|&i| recovered.tail[i].key.clone())
            .filter(|key| seen.insert(key.clone()))
            .collect()
    };
    for key in keys {
        let entries: Vec<usize> =
            unsettled.iter().copied().filter(|&i| recovered.tail[i].key == key).collect();
        let mut attempts = 0;
        loop {
            let fetched = match shared.fetch(&key.tenant, &key.host, &key.source, key.epoch).await {
                Ok(fetched) => fetched,
                Err(err) if attempts < SETTLE_ATTEMPTS => {
                    attempts += 1;
                    tracing::warn!(error = %err, "shared stream state unreadable while settling the wal; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(err) => return Err(shared_err(err)),
            };
            let lost: Vec<usize> = entries
                .iter()
                .copied()
                .filter(|&i| {
                    let entry = &recovered.tail[i];
                    entry.from < entry.to
                        && !fetched
                            .as_ref()
                            .is_some_and(|(record, _)| record.gives(shared.collector(), entry.from, entry.to))
                })
                .collect();
            if lost.is_empty() {
                let record = match fetched {
                    Some((record, _)) => record,
                    None => record_of(&key, Some(&local_state(recovered, &snapshot, &key, &[]))),
                };
                touched.insert(key.clone(), record);
                break;
            }
            // Fence: a write of ours still in flight must not land after
            // this. With no object yet, the fence is what this WAL acked.
            let (mut fenced, etag) = match &fetched {
                Some((record, etag)) => (record.clone(), Some(etag.as_str())),
                None => (record_of(&key, Some(&local_state(recovered, &snapshot, &key, &lost))), None),
            };
            fenced.fence += 1;
            match shared.publish(&fenced, etag).await {
                Ok(Conditional::Written(_)) => {}
                Ok(Conditional::Conflict) => continue,
                Err(err) if attempts < SETTLE_ATTEMPTS => {
                    attempts += 1;
                    tracing::warn!(error = %err, "shared stream state not written while settling the wal; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(err) => return Err(shared_err(err)),
            }
            doomed.extend(lost.iter().map(|&i| (recovered.tail[i].path.clone(), recovered.tail[i].offset)));
            for &i in &lost {
                recovered.tail[i].void = true;
            }
            touched.insert(key.clone(), fenced);
            break;
        }
    }
    if !doomed.is_empty() {
        tracing::warn!(
            entries = doomed.len(),
            "wal entries never acked and not ours in the shared bucket: made void, their agents send them again"
        );
        tokio::task::spawn_blocking(move || {
            doomed.into_iter().try_for_each(|(path, offset)| void_in_file(&path, offset))
        })
        .await
        .map_err(|_| WalError::Closed)??;
    }
    // Dedup state of the streams settled: what the bucket now holds.
    for (key, record) in touched {
        recovered.streams.insert(key, state_of(&record));
    }
    Ok(())
}

/// What this WAL acked of a stream: the snapshot's state and the live
/// entries after it, but the `lost` ones.
fn local_state(
    recovered: &Recovered,
    snapshot: &HashMap<StreamKey, StreamState>,
    key: &StreamKey,
    lost: &[usize],
) -> StreamState {
    let mut state = snapshot.get(key).cloned().unwrap_or_default();
    for (i, entry) in recovered.tail.iter().enumerate() {
        if entry.key == *key && !entry.void && !lost.contains(&i) {
            state.record(entry.to, entry.hash);
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{decode_payload, encode_entry, payload_crc};

    #[test]
    fn a_void_entry_keeps_its_checksum_and_reads_as_void() {
        let mut request = crate::wal::tests::request(0, 7, [0; 32]);
        (request.tenant, request.host) = ("acme".into(), "web-1".into());
        let mut entry = Vec::new();
        encode_entry(&mut entry, &request, 2);
        let live = decode_payload(&entry[8..]).unwrap();
        assert!(!live.void);
        entry[STATE_AT] = VOID;
        let crc = u32::from_be_bytes(entry[4..8].try_into().unwrap());
        assert_eq!(crc, payload_crc(&entry[8..]), "the state byte is outside the checksum");
        let void = decode_payload(&entry[8..]).unwrap();
        assert!(void.void);
        assert_eq!((void.skip, void.tenant.as_str(), void.host.as_str()), (2, "acme", "web-1"));
        assert_eq!(void.batch, request.batch);
        // Any other state is damage, and the rest is still checked.
        entry[STATE_AT] = 1;
        assert!(decode_payload(&entry[8..]).is_none());
        entry[STATE_AT] = VOID;
        entry[20] ^= 1;
        assert_ne!(crc, payload_crc(&entry[8..]));
    }

    #[test]
    fn settling_starts_after_the_origin_and_the_settled_position_when_whole() {
        let dir = std::env::temp_dir().join(format!("logvault-settled-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // First open with a bucket: from the end, both files written.
        assert_eq!(settle_from(&dir, 500).unwrap(), 500);
        assert_eq!(read_position(&dir.join(ORIGIN)).unwrap(), Some(500));
        assert_eq!(settle_from(&dir, 900).unwrap(), 500, "the origin stays");
        std::fs::write(dir.join(SETTLED), encode_settled(800)).unwrap();
        assert_eq!(settle_from(&dir, 900).unwrap(), 800);
        // A torn settled position: everything after the origin is checked.
        let mut torn = encode_settled(800);
        torn[3] ^= 0x40;
        std::fs::write(dir.join(SETTLED), torn).unwrap();
        assert_eq!(settle_from(&dir, 900).unwrap(), 500);
        std::fs::write(dir.join(SETTLED), encode_settled(100)).unwrap();
        assert_eq!(settle_from(&dir, 900).unwrap(), 500, "never before the origin");
        // Opened without a bucket: both forgotten, the next open starts over.
        forget_markers(&dir).unwrap();
        assert_eq!(read_position(&dir.join(ORIGIN)).unwrap(), None);
        assert_eq!(settle_from(&dir, 1200).unwrap(), 1200);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
