//! The WAL of a collector that shares its streams' dedup state with other
//! collectors through a bucket (see [`crate::cluster`]).
//!
//! Before a batch is judged, its stream's object is read unless this
//! collector wrote or read it last. After the group's fsync each stream
//! touched is written back conditionally, naming this collector as the
//! owner of the records it stored; only then are the batches acked. When
//! another collector wrote the stream first, its entries of the group are
//! voided in place (every record skipped: never indexed or archived as
//! new) and the agent is told to send them again. When the bucket cannot
//! be reached, the outcome is unknown, so the writer keeps asking until
//! it can tell: nothing is acked meanwhile, and nothing acked is lost.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use logvault_storage::archive::Conditional;

use super::{Appended, Recovered, StreamKey, StreamState, WalError, Writer, io_err};
use crate::cluster::{SharedStreams, StreamRecord};

/// Stream objects cached, at most; past it the cache is emptied and
/// streams are read again as they come.
const CACHED: usize = 8192;
/// Longest wait between attempts to reach the bucket.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The shared state as the writer holds it.
pub(super) struct Shared {
    streams: SharedStreams,
    runtime: tokio::runtime::Handle,
    /// Streams as this collector last wrote or read them, with the entity
    /// tag (None: no object yet).
    known: HashMap<StreamKey, (StreamRecord, Option<String>)>,
}

impl Shared {
    pub(super) fn new(streams: SharedStreams, runtime: tokio::runtime::Handle) -> Shared {
        Shared { streams, runtime, known: HashMap::new() }
    }

    /// Whether the stream was written or read by this collector last.
    pub(super) fn knows(&self, key: &StreamKey) -> bool {
        self.known.contains_key(key)
    }

    fn remember(&mut self, key: StreamKey, record: StreamRecord, etag: Option<String>) {
        if self.known.len() >= CACHED && !self.known.contains_key(&key) {
            self.known.clear();
        }
        self.known.insert(key, (record, etag));
    }
}

/// Where an entry of the group lies, and what it stored.
pub(super) struct Placed {
    /// Its place among the group's outcomes.
    pub outcome: usize,
    pub key: StreamKey,
    /// Its bytes in the group's buffer.
    pub entry: Range<usize>,
    /// Its new records.
    pub from: u64,
    pub to: u64,
    /// Records in the batch.
    pub count: u32,
    pub hash: [u8; 32],
}

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

fn fetch_record(
    shared: &Shared,
    key: &StreamKey,
) -> Result<(StreamRecord, Option<String>), crate::cluster::ClusterError> {
    let fetched =
        shared.runtime.block_on(shared.streams.fetch(&key.tenant, &key.host, &key.source, key.epoch))?;
    Ok(match fetched {
        Some((record, etag)) => (record, Some(etag)),
        None => (StreamRecord::new(&key.tenant, &key.host, &key.source, key.epoch), None),
    })
}

impl Writer {
    /// Reads the stream's object into the dedup state.
    pub(super) fn refresh(&mut self, key: &StreamKey) -> Result<(), WalError> {
        let shared = self.shared.as_mut().expect("only with a shared bucket");
        let (record, etag) = fetch_record(shared, key).map_err(|err| {
            tracing::warn!(error = %err, "shared stream state unreadable; refusing the batch as busy");
            WalError::Shared { message: format!("collector busy: shared stream state unreadable: {err}") }
        })?;
        if etag.is_some() {
            self.streams.insert(key.clone(), state_of(&record));
        } else {
            self.streams.remove(key);
        }
        shared.remember(key.clone(), record, etag);
        Ok(())
    }

    /// Writes back every stream the group stored records of, after the
    /// group's fsync. A stream another collector wrote first has its
    /// entries voided and answered with [`WalError::Shared`]; its state
    /// is read again.
    pub(super) fn publish(
        &mut self,
        placed: &[Placed],
        buffer: &[u8],
        outcomes: &mut [Result<Appended, WalError>],
        updates: &mut HashMap<StreamKey, StreamState>,
    ) -> Result<(), WalError> {
        let shared = self.shared.as_mut().expect("only with a shared bucket");
        let collector = shared.streams.collector().to_owned();
        // Each stream's new object, and the range of records it gives us.
        let mut order: Vec<StreamKey> = Vec::new();
        let mut next: HashMap<StreamKey, (StreamRecord, Option<String>, u64, u64)> = HashMap::new();
        for place in placed {
            let (record, _, from, to) = next.entry(place.key.clone()).or_insert_with(|| {
                order.push(place.key.clone());
                let (record, etag) = shared.known.get(&place.key).cloned().unwrap_or_else(|| {
                    let key = &place.key;
                    (StreamRecord::new(&key.tenant, &key.host, &key.source, key.epoch), None)
                });
                let high = record.high;
                (record, etag, high, high)
            });
            record.record(&collector, place.from, place.to, &place.hash);
            if place.from < place.to {
                *from = (*from).min(place.from);
                *to = (*to).max(place.to);
            }
        }
        // Every stream at once, then each one settled.
        let written: Vec<_> = {
            let streams = &shared.streams;
            shared.runtime.block_on(async {
                let mut set = tokio::task::JoinSet::new();
                for (i, key) in order.iter().enumerate() {
                    let (record, etag, _, _) = next[key].clone();
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
            let (record, etag, from, to) = next.remove(&key).expect("built above");
            let mut result = result;
            let mut backoff = Duration::from_millis(100);
            loop {
                match result {
                    Some(Ok(Conditional::Written(tag))) => {
                        match tag {
                            Some(tag) => shared.remember(key.clone(), record, Some(tag)),
                            None => {
                                shared.known.remove(&key);
                            }
                        }
                        break;
                    }
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "shared stream state not written; acks wait until the bucket answers");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    Some(Ok(Conditional::Conflict)) | None => {}
                }
                // What the bucket holds now decides.
                let (current, tag) = match fetch_record(shared, &key) {
                    Ok(current) => current,
                    Err(err) => {
                        tracing::warn!(error = %err, retry_in_ms = backoff.as_millis() as u64, "shared stream state unreadable; acks wait until the bucket answers");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        result = None;
                        continue;
                    }
                };
                if from < to && current.gives(&collector, from, to) {
                    // Our write landed (its answer was lost).
                    shared.remember(key.clone(), current, tag);
                    break;
                }
                if tag == etag {
                    // Unchanged: our write did not land. Again.
                    result = Some(shared.runtime.block_on(shared.streams.publish(&record, etag.as_deref())));
                    continue;
                }
                // Another collector wrote the stream first.
                if from < to {
                    tracing::info!(tenant = %key.tenant, host = %key.host, source = %key.source, epoch = key.epoch, from, to, "records taken by another collector first; voided here, the agent sends them again");
                    voided.insert(key.clone());
                }
                self.streams.insert(key.clone(), state_of(&current));
                updates.remove(&key);
                shared.remember(key.clone(), current, tag);
                break;
            }
        }
        if voided.is_empty() {
            return Ok(());
        }
        let file = OpenOptions::new().write(true).open(&self.path).map_err(|e| io_err(&self.path, e))?;
        for place in placed.iter().filter(|place| voided.contains(&place.key)) {
            let mut entry = buffer[place.entry.clone()].to_vec();
            void_entry(&mut entry, place.count);
            let at = self.len + place.entry.start as u64;
            file.write_all_at(&entry, at).map_err(|e| io_err(&self.path, e))?;
            outcomes[place.outcome] = Err(WalError::Shared {
                message: "collector busy: another collector stored these records first; send again".into(),
            });
        }
        file.sync_data().map_err(|e| io_err(&self.path, e))?;
        Ok(())
    }
}

/// Rewrites a whole encoded entry (length, checksum, payload) so that every
/// record of its batch is skipped.
fn void_entry(entry: &mut [u8], count: u32) {
    let payload = &mut entry[8..];
    // version u8 | received_ns i64 | tenant u16+ | host u16+ | skip u32
    let mut at = 9;
    for _ in 0..2 {
        let len = u16::from_be_bytes([payload[at], payload[at + 1]]) as usize;
        at += 2 + len;
    }
    payload[at..at + 4].copy_from_slice(&count.to_be_bytes());
    let crc = crc32fast::hash(payload);
    entry[4..8].copy_from_slice(&crc.to_be_bytes());
}

/// Voids the entry at `offset` of the segment file `path` in place.
fn void_in_file(path: &Path, offset: u64, count: u32) -> Result<(), WalError> {
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| io_err(path, e))?;
    let mut head = [0u8; 8];
    file.read_exact_at(&mut head, offset).map_err(|e| io_err(path, e))?;
    let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
    if len > super::MAX_ENTRY {
        return Err(WalError::Corrupt {
            path: path.to_owned(),
            offset,
            reason: "entry length over the cap".into(),
        });
    }
    let mut entry = vec![0u8; 8 + len as usize];
    file.read_exact_at(&mut entry, offset).map_err(|e| io_err(path, e))?;
    void_entry(&mut entry, count);
    file.write_all_at(&entry, offset).map_err(|e| io_err(path, e))?;
    file.sync_data().map_err(|e| io_err(path, e))
}

/// At open: voids every entry after the snapshot whose records the bucket
/// does not give to this collector (written, then the collector stopped
/// before its stream object was, so never acked).
pub(super) async fn settle(recovered: &Recovered, shared: &SharedStreams) -> Result<(), WalError> {
    let mut records: HashMap<&StreamKey, StreamRecord> = HashMap::new();
    let mut doomed = Vec::new();
    for entry in recovered.tail.iter().filter(|entry| entry.from < entry.to) {
        if !records.contains_key(&entry.key) {
            let key = &entry.key;
            let fetched =
                shared.fetch(&key.tenant, &key.host, &key.source, key.epoch).await.map_err(|err| {
                    WalError::Shared { message: format!("settling the wal with the shared bucket: {err}") }
                })?;
            let record = fetched.map_or_else(
                || StreamRecord::new(&key.tenant, &key.host, &key.source, key.epoch),
                |(record, _)| record,
            );
            records.insert(key, record);
        }
        if !records[&entry.key].gives(shared.collector(), entry.from, entry.to) {
            doomed.push((entry.path.clone(), entry.offset, entry.count));
        }
    }
    if doomed.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        entries = doomed.len(),
        "wal entries never acked and not ours in the shared bucket: voided, their agents send them again"
    );
    tokio::task::spawn_blocking(move || {
        doomed.into_iter().try_for_each(|(path, offset, count)| void_in_file(&path, offset, count))
    })
    .await
    .map_err(|_| WalError::Closed)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{decode_payload, encode_entry};

    #[test]
    fn a_voided_entry_skips_every_record_and_still_checks() {
        let mut request = crate::wal::tests::request(0, 7, [0; 32]);
        (request.tenant, request.host) = ("acme".into(), "web-1".into());
        let mut entry = Vec::new();
        encode_entry(&mut entry, &request, 2);
        void_entry(&mut entry, 7);
        let crc = u32::from_be_bytes(entry[4..8].try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(&entry[8..]));
        let payload = decode_payload(&entry[8..]).unwrap();
        assert_eq!((payload.skip, payload.tenant.as_str(), payload.host.as_str()), (7, "acme", "web-1"));
        assert_eq!(payload.batch, request.batch);
    }
}
