//! Collectors that share one bucket: what every collector must see of
//! every stream.
//!
//! An agent's stream may reach any collector behind the load balancer,
//! and move after a reconnect. So that a record is stored once, whichever
//! collector gets it, each stream's dedup state (where it ends, the hashes
//! of its last batches for the chain check, and which collector stored
//! which sequence numbers) is an object in the shared bucket:
//! `streams/HH/HASH.json`, HASH being the SHA-256 of the stream's tenant,
//! host, source and epoch. It is only ever replaced with a conditional
//! write (`If-Match` the entity tag read, or `If-None-Match: *` for a new
//! stream), so two collectors can never both extend it from the same
//! state: the store decides, and no protocol of our own is needed.
//!
//! A collector acks a batch only after its WAL fsync *and* the stream
//! object naming it as the owner of those sequence numbers. Entries the
//! WAL holds but the bucket does not give to this collector (a crash
//! between the two writes, a lost race) are voided in place: every record
//! skipped, so they are never indexed or archived as new, and the agent,
//! never acked, sends them again to whichever collector it reaches.

use logvault_storage::archive::{Archive, ArchiveError, Conditional, Expect};
use serde::{Deserialize, Serialize};

/// Largest stream object read back: far above a real one (about 70 KiB
/// with every run and link kept), a guard against a damaged object.
pub const MAX_RECORD: u64 = 1 << 20;
/// Batch links (end seq, hash) kept in a stream object.
pub const SHARED_LINKS: usize = 64;
/// Ownership runs kept in a stream object: one per move of the stream
/// between collectors.
pub const RUNS: usize = 1000;
const RECORD_VERSION: u8 = 1;

/// Which collector stored the sequence numbers `from..to` of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// The collector (`archive.collector_id`).
    pub collector: String,
    /// First sequence number.
    pub from: u64,
    /// One past the last.
    pub to: u64,
}

/// A stream's shared dedup state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamRecord {
    /// Format version (1).
    pub version: u8,
    /// The stream: tenant, host, source, epoch.
    pub tenant: String,
    /// The agent's name.
    pub host: String,
    /// The source within the agent.
    pub source: String,
    /// The epoch.
    pub epoch: u64,
    /// One past the last stored sequence number.
    pub high: u64,
    /// Links ending at or below this were dropped from `links` (0: none).
    pub floor: u64,
    /// The last batches stored: (end seq, SHA-256 of the batch, hex).
    pub links: Vec<(u64, String)>,
    /// Who stored what, oldest first; adjacent runs of one collector merged.
    pub runs: Vec<Run>,
    /// Raised by a collector settling its WAL after a restart, so that a
    /// write it had in flight before cannot land afterwards.
    #[serde(default)]
    pub fence: u64,
}

impl StreamRecord {
    /// A stream nothing is stored of yet.
    pub fn new(tenant: &str, host: &str, source: &str, epoch: u64) -> StreamRecord {
        StreamRecord {
            version: RECORD_VERSION,
            tenant: tenant.to_owned(),
            host: host.to_owned(),
            source: source.to_owned(),
            epoch,
            high: 0,
            floor: 0,
            links: Vec::new(),
            runs: Vec::new(),
            fence: 0,
        }
    }

    /// Notes that `collector` stored the batch `hash` ending at `end`,
    /// its new records being `from..end`.
    pub fn record(&mut self, collector: &str, from: u64, end: u64, hash: &[u8; 32]) {
        let hash = hex(hash);
        if !self.links.iter().any(|(e, h)| *e == end && *h == hash) {
            self.links.push((end, hash));
            self.links.sort_by_key(|(end, _)| *end);
            while self.links.len() > SHARED_LINKS {
                let (end, _) = self.links.remove(0);
                self.floor = self.floor.max(end);
            }
        }
        self.give(collector, from, end);
    }

    /// Notes that `collector` stored the records `from..to`.
    pub fn give(&mut self, collector: &str, from: u64, to: u64) {
        if from < to {
            match self.runs.last_mut() {
                Some(run) if run.collector == collector && run.to == from => run.to = to,
                _ => self.runs.push(Run { collector: collector.to_owned(), from, to }),
            }
            if self.runs.len() > RUNS {
                self.runs.remove(0);
            }
        }
        self.high = self.high.max(to);
    }

    /// Whether the runs give `from..to` to `collector`, whole. A range
    /// older than the runs kept counts as given (it can only be an entry
    /// settled long ago: an unsettled one is at most one group old).
    pub fn gives(&self, collector: &str, from: u64, to: u64) -> bool {
        if from >= to {
            return true;
        }
        if self.runs.len() == RUNS && self.runs.first().is_some_and(|run| to <= run.from) {
            return true;
        }
        let mut at = from;
        for run in self.runs.iter().filter(|run| run.collector == collector) {
            if run.from <= at && at < run.to {
                at = run.to;
                if at >= to {
                    return true;
                }
            }
        }
        false
    }

    /// The links as (end, hash), the undecodable ones left out.
    pub fn link_hashes(&self) -> impl Iterator<Item = (u64, [u8; 32])> + '_ {
        self.links.iter().filter_map(|(end, hash)| Some((*end, unhex(hash)?)))
    }

    /// The object's bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a stream record serializes")
    }

    /// Decodes a stream object and checks it is the stream asked for.
    pub fn decode(
        bytes: &[u8],
        tenant: &str,
        host: &str,
        source: &str,
        epoch: u64,
    ) -> Result<StreamRecord, String> {
        let record = Self::decode_any(bytes)?;
        if (record.tenant.as_str(), record.host.as_str(), record.source.as_str(), record.epoch)
            != (tenant, host, source, epoch)
        {
            return Err("it names another stream".into());
        }
        Ok(record)
    }

    /// Decodes a stream object, whichever stream it names. Past
    /// [`MAX_RECORD`] bytes it is refused unread.
    pub fn decode_any(bytes: &[u8]) -> Result<StreamRecord, String> {
        if bytes.len() as u64 > MAX_RECORD {
            return Err(format!("{} bytes, over the cap of {MAX_RECORD}", bytes.len()));
        }
        let record: StreamRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if record.version != RECORD_VERSION {
            return Err(format!("version {} is not {RECORD_VERSION}", record.version));
        }
        if record.links.len() > SHARED_LINKS || record.runs.len() > RUNS {
            return Err("more links or runs than kept".into());
        }
        if record.runs.iter().any(|run| run.from >= run.to || run.to > record.high)
            || record.links.iter().any(|(end, _)| *end > record.high)
        {
            return Err("a run or link past the stream's end".into());
        }
        Ok(record)
    }
}

/// Why the shared stream state could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// The bucket failed.
    #[error(transparent)]
    Store(#[from] ArchiveError),
    /// A stream object is damaged or names another stream.
    #[error("stream object {key}: {reason}")]
    Damaged {
        /// The object.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The shared bucket's stream objects, as one collector sees them.
#[derive(Debug, Clone)]
pub struct SharedStreams {
    store: Archive,
    collector: String,
}

impl SharedStreams {
    /// Stream state in `store` for the collector named `collector`, once a
    /// probe object has shown that the store honours conditional writes
    /// (a store that ignored them would let two collectors store the same
    /// records).
    pub async fn open(store: Archive, collector: &str) -> Result<SharedStreams, String> {
        if !store.supports_conditional_writes() {
            return Err(format!(
                "{} cannot write conditionally (If-Match, If-None-Match); collectors sharing it need an S3-compatible store that can",
                store.uri()
            ));
        }
        let key = format!("streams/probe/{collector}.json");
        let failed = |e: ArchiveError| format!("{}: probing conditional writes: {e}", store.uri());
        let ignored = |what: &str| {
            format!("{}: the store ignores {what}; collectors cannot share it safely", store.uri())
        };
        store.delete(&key).await.map_err(failed)?;
        let first = store.put_if(&key, b"1".to_vec(), Expect::Absent).await.map_err(failed)?;
        let Conditional::Written(tag) = first else {
            return Err(ignored("If-None-Match (a new object conflicted)"));
        };
        if store.put_if(&key, b"2".to_vec(), Expect::Absent).await.map_err(failed)? != Conditional::Conflict {
            return Err(ignored("If-None-Match: *"));
        }
        let tag = match tag {
            Some(tag) => tag,
            None => match store.get_tagged(&key, 16).await.map_err(failed)? {
                Some((_, tag)) => tag,
                None => return Err(format!("{}: a probe object written is not there", store.uri())),
            },
        };
        let stale =
            store.put_if(&key, b"3".to_vec(), Expect::Etag("\"0-logvault-probe\"")).await.map_err(failed)?;
        if stale != Conditional::Conflict {
            return Err(ignored("If-Match"));
        }
        if !matches!(
            store.put_if(&key, b"4".to_vec(), Expect::Etag(&tag)).await.map_err(failed)?,
            Conditional::Written(_)
        ) {
            return Err(ignored("If-Match (the current tag conflicted)"));
        }
        store.delete(&key).await.map_err(failed)?;
        Ok(SharedStreams { store, collector: collector.to_owned() })
    }

    /// This collector's name.
    pub fn collector(&self) -> &str {
        &self.collector
    }

    /// The object key of a stream.
    pub fn key(tenant: &str, host: &str, source: &str, epoch: u64) -> String {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [tenant.as_bytes(), host.as_bytes(), source.as_bytes()] {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        context.update(&epoch.to_be_bytes());
        let digest = hex(context.finish().as_ref());
        format!("streams/{}/{digest}.json", &digest[..2])
    }

    /// The stream's object and its entity tag; None when nothing of it is
    /// stored by any collector.
    pub async fn fetch(
        &self,
        tenant: &str,
        host: &str,
        source: &str,
        epoch: u64,
    ) -> Result<Option<(StreamRecord, String)>, ClusterError> {
        let key = Self::key(tenant, host, source, epoch);
        let Some((bytes, etag)) = self.store.get_tagged(&key, MAX_RECORD).await? else { return Ok(None) };
        let record = StreamRecord::decode(&bytes, tenant, host, source, epoch)
            .map_err(|reason| ClusterError::Damaged { key, reason })?;
        Ok(Some((record, etag)))
    }

    /// Replaces the stream's object with `record` if it is still as read
    /// (`etag`, or absent when None).
    pub async fn publish(
        &self,
        record: &StreamRecord,
        etag: Option<&str>,
    ) -> Result<Conditional, ClusterError> {
        let key = Self::key(&record.tenant, &record.host, &record.source, record.epoch);
        let expect = etag.map_or(Expect::Absent, Expect::Etag);
        Ok(self.store.put_if(&key, record.encode(), expect).await?)
    }
}

/// The stream object decoder on arbitrary bytes, for the fuzz target: what
/// decodes re-encodes to the same record.
pub(crate) fn fuzz_decoders(data: &[u8]) {
    if let Ok(record) = StreamRecord::decode_any(data) {
        let (tenant, host, source) = (&record.tenant, &record.host, &record.source);
        let again = StreamRecord::decode(&record.encode(), tenant, host, source, record.epoch);
        assert_eq!(again.as_ref(), Ok(&record), "a stream object re-encodes");
    }
}

/// Seeds: a stream object with runs of two collectors and a fence.
pub(crate) fn fuzz_seeds() -> Vec<Vec<u8>> {
    let mut record = StreamRecord::new("acme", "web-1", "/var/log/app.log", 3);
    record.record("c1", 0, 40, &[1; 32]);
    record.record("c2", 40, 60, &[2; 32]);
    record.fence = 1;
    vec![record.encode()]
}

pub use logvault_storage::checkpoint::hex;

fn unhex(text: &str) -> Option<[u8; 32]> {
    logvault_storage::checkpoint::parse_hash(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_tell_which_collector_stored_what() {
        let mut record = StreamRecord::new("acme", "web-1", "/var/log/syslog", 7);
        record.record("c1", 0, 10, &[1; 32]);
        record.record("c1", 10, 20, &[2; 32]);
        record.record("c2", 20, 25, &[3; 32]);
        // A batch of records all stored (batched again) adds a link, no run.
        record.record("c2", 25, 25, &[4; 32]);
        record.record("c1", 25, 30, &[5; 32]);
        assert_eq!(record.high, 30);
        assert_eq!(
            record.runs,
            vec![
                Run { collector: "c1".into(), from: 0, to: 20 },
                Run { collector: "c2".into(), from: 20, to: 25 },
                Run { collector: "c1".into(), from: 25, to: 30 },
            ]
        );
        assert!(record.gives("c1", 0, 20) && record.gives("c1", 5, 15) && record.gives("c1", 25, 30));
        assert!(record.gives("c2", 20, 25) && record.gives("c1", 7, 7));
        assert!(!record.gives("c1", 18, 22) && !record.gives("c2", 20, 26) && !record.gives("c3", 0, 1));
        assert!(!record.gives("c1", 30, 31), "nothing past the end is given");
        let back = StreamRecord::decode(&record.encode(), "acme", "web-1", "/var/log/syslog", 7).unwrap();
        assert_eq!(back, record);
        assert_eq!(back.link_hashes().map(|(end, _)| end).collect::<Vec<_>>(), vec![10, 20, 25, 25, 30]);
        assert!(StreamRecord::decode(&record.encode(), "acme", "web-1", "/var/log/syslog", 8).is_err());
        assert!(StreamRecord::decode(&record.encode(), "acme", "web-2", "/var/log/syslog", 7).is_err());
    }

    #[test]
    fn links_and_runs_are_bounded() {
        let mut record = StreamRecord::new("t", "h", "s", 0);
        for i in 0..(RUNS as u64 + 50) {
            let collector = if i % 2 == 0 { "a" } else { "b" };
            record.record(collector, i, i + 1, &[i as u8; 32]);
        }
        assert_eq!(record.runs.len(), RUNS);
        assert_eq!(record.links.len(), SHARED_LINKS);
        assert_eq!(record.floor, RUNS as u64 + 50 - SHARED_LINKS as u64);
        // Older than every run kept: settled long ago.
        assert!(record.gives("a", 3, 4));
        assert!(record.encode().len() < MAX_RECORD as usize);
        assert!(StreamRecord::decode(&record.encode(), "t", "h", "s", 0).is_ok());
    }

    #[test]
    fn a_damaged_stream_object_is_refused() {
        let mut record = StreamRecord::new("t", "h", "s", 0);
        record.record("a", 0, 5, &[1; 32]);
        let good = record.encode();
        let text = String::from_utf8(good).unwrap();
        for (from, to) in [
            ("\"high\":5", "\"high\":4"),
            ("\"version\":1", "\"version\":2"),
            ("\"floor\":0", "\"floor\":0,\"extra\":1"),
            ("\"to\":5", "\"to\":0"),
        ] {
            let bad = text.replace(from, to);
            assert_ne!(bad, text, "{from}");
            assert!(StreamRecord::decode(bad.as_bytes(), "t", "h", "s", 0).is_err(), "{bad}");
        }
        assert!(StreamRecord::decode(b"{", "t", "h", "s", 0).is_err());
    }

    proptest::proptest! {
        /// Any bytes decode or are refused; what decodes encodes back to
        /// the same record, and any history of batches stays within bounds
        /// and reads back.
        #[test]
        fn any_stream_object_decodes_or_is_refused(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            if let Ok(record) = StreamRecord::decode_any(&bytes) {
                let again = StreamRecord::decode(&record.encode(), &record.tenant, &record.host, &record.source, record.epoch);
                proptest::prop_assert_eq!(again, Ok(record));
            }
        }

        #[test]
        fn any_history_reads_back(steps in proptest::collection::vec((0u8..3, 0u32..20, 0u32..3), 0..200)) {
            let mut record = StreamRecord::new("t", "h", "s", 1);
            for (collector, count, overlap) in steps {
                let from = record.high.saturating_sub(u64::from(overlap));
                let end = from + u64::from(count);
                let new_from = from.max(record.high).min(end);
                let name = format!("c{collector}");
                record.record(&name, new_from, end, &[count as u8; 32]);
                let given = record.gives(&name, new_from, end);
                proptest::prop_assert!(given);
            }
            // Runs follow each other, and one collector's next batch extends its run.
            proptest::prop_assert!(record.runs.windows(2).all(|w| w[0].to == w[1].from && w[0].collector != w[1].collector));
            let back = StreamRecord::decode(&record.encode(), "t", "h", "s", 1);
            proptest::prop_assert_eq!(back, Ok(record));
        }
    }

    #[test]
    fn stream_keys_are_fixed_and_unambiguous() {
        let key = SharedStreams::key("acme", "web-1", "app", 3);
        assert!(key.starts_with("streams/") && key.ends_with(".json") && key.len() == 8 + 3 + 64 + 5);
        assert_ne!(key, SharedStreams::key("acme", "web-1a", "pp", 3));
        assert_ne!(key, SharedStreams::key("acme", "web-1", "app", 4));
        assert_eq!(key, SharedStreams::key("acme", "web-1", "app", 3));
    }
}
