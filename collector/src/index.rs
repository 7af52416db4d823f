//! The tantivy index: the serving layer, rebuilt from the WAL at will.
//!
//! The indexer thread reads the WAL from the position stored in the last
//! commit's payload up to the durable end, adds one document per record,
//! and commits every `commit_interval` (so a line is searchable within a
//! second or so of its ack). After a crash it simply resumes from the last
//! commit: the WAL is the source of truth, the index a view of it.
//!
//! Every record gets an `id`: its rank in the WAL, counted by the indexer
//! and kept in the commit payload beside the WAL position, so the same
//! record gets the same id after a crash. Hits sort by (timestamp, id),
//! which makes cursors exact; the live tail follows ids.
//!
//! The schema keeps the indexing cost down: a hit is one stored blob (a
//! compact binary form, `StoredHit`), the timestamp and id are fast columns only, and each searchable
//! field is indexed once. `message` is tokenised so that every maximal run
//! of letters and digits is a term, lower-cased, with positions (phrases
//! work) and no length cap.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use logvault_storage::batch::{BatchView, Inflater, Limits};
use serde::{Deserialize, Serialize};
use tantivy::schema::document::Document;
use tantivy::schema::{
    DateOptions, DateTimePrecision, FAST, Field, IndexRecordOption, JsonObjectOptions, OwnedValue, STORED,
    Schema, TextFieldIndexing, TextOptions,
};
use tantivy::tokenizer::{LowerCaser, RawTokenizer, SimpleTokenizer, TextAnalyzer};
use tantivy::{DateTime, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument};
use tokio_util::sync::CancellationToken;

use crate::wal;

/// Tokenizer of `message` and `fields.*`: alphanumeric runs, lower-cased.
const WORDS: &str = "logvault_words";
/// Tokenizer of `level`: the whole value, lower-cased.
const KEYWORD: &str = "logvault_keyword";
/// Tokenizer of exact-match fields (host, source, tenant, flags).
pub(crate) const RAW: &str = "raw";
const WRITER_MEMORY: usize = 64 * 1024 * 1024;

/// Why the index failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// tantivy failed.
    #[error("index {path}: {source}")]
    Tantivy {
        /// The index directory.
        path: PathBuf,
        /// The error.
        source: tantivy::TantivyError,
    },
}

/// The schema's fields.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fields {
    pub(crate) timestamp: Field,
    pub(crate) id: Field,
    pub(crate) tenant: Field,
    pub(crate) host: Field,
    pub(crate) source: Field,
    pub(crate) level: Field,
    pub(crate) message: Field,
    pub(crate) fields: Field,
    pub(crate) flags: Field,
    pub(crate) hit: Field,
}

/// A timestamp this far after its arrival is flagged `future`.
pub const FUTURE_SKEW_NS: i64 = 3600 * 1_000_000_000;
/// A timestamp this far before its arrival is flagged `past`.
pub const PAST_SKEW_NS: i64 = 7 * 24 * 3600 * 1_000_000_000;

/// The searchable names of a record's flags: what the agent did to the
/// line, and whether its timestamp is far from its arrival (the record is
/// kept either way, with `received` beside `timestamp`).
pub fn flag_names(flags: u8, timestamp_ns: i64, received_ns: i64) -> impl Iterator<Item = &'static str> {
    use logvault_storage::record::{FLAG_CONTINUED, FLAG_INVALID_UTF8, FLAG_TRUNCATED};
    [
        (flags & FLAG_TRUNCATED != 0, "truncated"),
        (flags & FLAG_CONTINUED != 0, "continued"),
        (flags & FLAG_INVALID_UTF8 != 0, "invalid_utf8"),
        (timestamp_ns > received_ns.saturating_add(FUTURE_SKEW_NS), "future"),
        (timestamp_ns < received_ns.saturating_sub(PAST_SKEW_NS), "past"),
    ]
    .into_iter()
    .filter_map(|(set, name)| set.then_some(name))
}

fn build_schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let keyword = |tokenizer: &str, fast: bool| {
        let options = TextOptions::default().set_indexing_options(
            TextFieldIndexing::default().set_tokenizer(tokenizer).set_index_option(IndexRecordOption::Basic),
        );
        if fast { options.set_fast(tokenizer) } else { options }
    };
    let words = TextFieldIndexing::default()
        .set_tokenizer(WORDS)
        .set_index_option(IndexRecordOption::WithFreqsAndPositions);
    let fields = Fields {
        // Fast only: range filters and sorting read the column.
        timestamp: builder.add_date_field(
            "timestamp",
            DateOptions::from(FAST).set_precision(DateTimePrecision::Microseconds),
        ),
        id: builder.add_u64_field("id", FAST),
        tenant: builder.add_text_field("tenant", keyword(RAW, false)),
        host: builder.add_text_field("host", keyword(RAW, true)),
        source: builder.add_text_field("source", keyword(RAW, true)),
        level: builder.add_text_field("level", keyword(KEYWORD, true)),
        message: builder
            .add_text_field("message", TextOptions::default().set_indexing_options(words.clone())),
        // Words for search, and whole values in the column for top terms;
        // `service.name` is found as `fields.service.name`.
        fields: builder.add_json_field(
            "fields",
            JsonObjectOptions::default().set_indexing_options(words).set_fast(RAW).set_expand_dots_enabled(),
        ),
        flags: builder.add_text_field("flags", keyword(RAW, false)),
        hit: builder.add_bytes_field("hit", STORED),
    };
    (builder.build(), fields)
}

/// An open index.
pub struct LogIndex {
    pub(crate) index: Index,
    pub(crate) reader: IndexReader,
    pub(crate) fields: Fields,
    pub(crate) path: PathBuf,
    /// The other collectors' splits, and this one's publishing, when it
    /// shares a bucket.
    pub(crate) splits: std::sync::OnceLock<Arc<crate::splits::Splits>>,
    /// Records older than this (ms, by their own time) are deleted; 0: kept.
    retention_ms: AtomicU64,
    /// The oldest records are deleted while the live ones take more than
    /// this many bytes on disk; 0: no cap.
    max_bytes: AtomicU64,
    /// How often retention runs, in ms.
    retention_check_ms: AtomicU64,
}

impl std::fmt::Debug for LogIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogIndex").field("path", &self.path).finish_non_exhaustive()
    }
}

/// One record as the API returns it; the index stores it as a
/// `StoredHit`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Hit {
    /// The record's id: its rank in the collector's WAL (a decimal string,
    /// since it can pass 2^53).
    pub id: String,
    /// RFC 3339.
    pub timestamp: String,
    /// RFC 3339, when the collector received it.
    pub received: String,
    /// The tenant.
    pub tenant: String,
    /// The authenticated host.
    pub host: String,
    /// The source.
    pub source: String,
    /// The source file's epoch.
    pub epoch: u64,
    /// The sequence number within the epoch.
    pub seq: u64,
    /// The normalised level.
    pub level: String,
    /// The original line.
    pub message: String,
    /// Parsed fields.
    #[serde(default)]
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// `truncated`, `continued`, `invalid_utf8`, `future`, `past`: see
    /// [`flag_names`]. Left out when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

/// Where the indexer stands: the WAL position the index covers and the id
/// the next record gets. Kept as the commit payload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexedUpTo {
    /// WAL position after the last indexed entry.
    pub position: u64,
    /// Id of the next record.
    pub next_id: u64,
}

impl IndexedUpTo {
    fn payload(&self) -> String {
        format!("{} {}", self.position, self.next_id)
    }

    pub(crate) fn parse(payload: &str) -> Option<IndexedUpTo> {
        let (position, next_id) = payload.split_once(' ')?;
        Some(IndexedUpTo { position: position.parse().ok()?, next_id: next_id.parse().ok()? })
    }
}

/// The tokenizers the schema names, on `index` (ours, or a split).
pub(crate) fn register_tokenizers(index: &Index) {
    let tokenizers = index.tokenizers();
    tokenizers.register(WORDS, TextAnalyzer::builder(SimpleTokenizer::default()).filter(LowerCaser).build());
    tokenizers.register(KEYWORD, TextAnalyzer::builder(RawTokenizer::default()).filter(LowerCaser).build());
    index
        .fast_field_tokenizer()
        .register(KEYWORD, TextAnalyzer::builder(RawTokenizer::default()).filter(LowerCaser).build());
}

impl LogIndex {
    /// Shares this index with other collectors through `splits`: its
    /// segments are published, and searches read the others' splits too.
    /// Set before the indexer starts.
    pub fn share(&self, splits: Arc<crate::splits::Splits>) {
        let _ = self.splits.set(splits);
    }

    /// Opens the index in `dir`, creating it when missing. An index built
    /// with another schema is removed and rebuilt from the WAL.
    pub fn open(dir: &Path) -> Result<LogIndex, IndexError> {
        let tantivy_err = |source| IndexError::Tantivy { path: dir.to_owned(), source };
        let io_err = |e: std::io::Error| {
            tantivy_err(tantivy::TantivyError::from(
                tantivy::directory::error::OpenDirectoryError::wrap_io_error(e, dir.to_owned()),
            ))
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let (schema, fields) = build_schema();
        let open = || {
            let directory =
                tantivy::directory::MmapDirectory::open(dir).map_err(|e| tantivy_err(e.into()))?;
            Index::open_or_create(directory, schema.clone()).map_err(tantivy_err)
        };
        let index = match open() {
            Ok(index) => index,
            Err(IndexError::Tantivy { source: tantivy::TantivyError::SchemaError(message), .. }) => {
                tracing::warn!(dir = %dir.display(), %message, "index has another schema; rebuilding it from the wal");
                std::fs::remove_dir_all(dir).map_err(io_err)?;
                std::fs::create_dir_all(dir).map_err(io_err)?;
                open()?
            }
            Err(err) => return Err(err),
        };
        register_tokenizers(&index);
        let reader =
            index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(tantivy_err)?;
        Ok(LogIndex {
            index,
            reader,
            fields,
            path: dir.to_owned(),
            splits: std::sync::OnceLock::new(),
            retention_ms: AtomicU64::new(0),
            max_bytes: AtomicU64::new(0),
            retention_check_ms: AtomicU64::new(60_000),
        })
    }

    /// Deletes records older than `retention` (by their own time), and the
    /// oldest while the live records take more than `max_bytes`, every
    /// `check`; None keeps everything.
    pub fn set_retention(&self, retention: Option<Duration>, max_bytes: Option<u64>, check: Duration) {
        let ms = retention.map_or(0, |r| (r.as_millis() as u64).max(1));
        self.retention_ms.store(ms, Ordering::Relaxed);
        self.max_bytes.store(max_bytes.unwrap_or(0), Ordering::Relaxed);
        self.retention_check_ms.store((check.as_millis() as u64).max(1), Ordering::Relaxed);
    }

    /// Asks `writer` to delete the records past retention; true when it did.
    fn expire<D: Document>(&self, writer: &IndexWriter<D>) -> bool {
        let retention_ms = self.retention_ms.load(Ordering::Relaxed);
        let mut cutoff = if retention_ms == 0 {
            i64::MIN
        } else {
            crate::time::now_ns().saturating_sub((retention_ms as i64).saturating_mul(1_000_000))
        };
        let max_bytes = self.max_bytes.load(Ordering::Relaxed);
        if max_bytes > 0 {
            match self.size_cutoff(max_bytes) {
                Ok(Some(by_size)) => cutoff = cutoff.max(by_size),
                Ok(None) => {}
                Err(err) => tracing::error!(error = %err, "index size check failed"),
            }
        }
        if cutoff == i64::MIN {
            return false;
        }
        let bound =
            tantivy::Term::from_field_date(self.fields.timestamp, DateTime::from_timestamp_nanos(cutoff));
        let older =
            tantivy::query::RangeQuery::new(std::ops::Bound::Unbounded, std::ops::Bound::Excluded(bound));
        match writer.delete_query(Box::new(older)) {
            Ok(_) => true,
            Err(err) => {
                tracing::error!(error = %err, "index retention failed");
                false
            }
        }
    }

    /// When the live records take more than `max_bytes` on disk, the time
    /// before which the oldest must go for them to take 90% of it.
    ///
    /// Deleted records keep their space until a merge, so the live size
    /// is the directory's size times the share of documents alive; the
    /// cut is found from a 1,024-bucket histogram of the live timestamps.
    fn size_cutoff(&self, max_bytes: u64) -> tantivy::Result<Option<i64>> {
        let on_disk: u64 = std::fs::read_dir(&self.path)?
            .filter_map(Result::ok)
            .filter_map(|entry| entry.metadata().ok())
            .filter(|meta| meta.is_file())
            .map(|meta| meta.len())
            .sum();
        let searcher = self.reader.searcher();
        let segments = searcher.segment_readers();
        let alive: u64 = segments.iter().map(|s| u64::from(s.num_docs())).sum();
        let all: u64 = segments.iter().map(|s| u64::from(s.max_doc())).sum();
        if alive == 0 {
            return Ok(None);
        }
        let live_bytes = on_disk as f64 * alive as f64 / all as f64;
        if live_bytes <= max_bytes as f64 {
            return Ok(None);
        }
        let to_delete = ((1.0 - 0.9 * max_bytes as f64 / live_bytes) * alive as f64).ceil() as u64;
        let mut columns = Vec::with_capacity(segments.len());
        let (mut low, mut high) = (i64::MAX, i64::MIN);
        for segment in segments {
            let column = segment.fast_fields().date("timestamp")?;
            low = low.min(column.min_value().into_timestamp_nanos());
            high = high.max(column.max_value().into_timestamp_nanos());
            columns.push((segment, column));
        }
        const BUCKETS: usize = 1024;
        let width = ((high as i128 - low as i128) / BUCKETS as i128 + 1) as i64;
        let mut counts = [0u64; BUCKETS];
        for (segment, column) in &columns {
            let alive = segment.alive_bitset();
            for doc in 0..segment.max_doc() {
                if alive.is_some_and(|bits| !bits.is_alive(doc)) {
                    continue;
                }
                if let Some(ts) = column.first(doc) {
                    let bucket = ((ts.into_timestamp_nanos() as i128 - low as i128) / width as i128) as usize;
                    counts[bucket.min(BUCKETS - 1)] += 1;
                }
            }
        }
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= to_delete {
                let cutoff = low.saturating_add(width.saturating_mul(bucket as i64 + 1));
                tracing::warn!(
                    live_bytes = live_bytes as u64,
                    max_bytes,
                    records = seen,
                    before = %crate::time::format_ns(cutoff),
                    "index past its size cap: deleting its oldest records"
                );
                return Ok(Some(cutoff));
            }
        }
        Ok(Some(i64::MAX))
    }

    /// Where the last commit left the indexer.
    pub fn indexed_up_to(&self) -> IndexedUpTo {
        self.index
            .load_metas()
            .ok()
            .and_then(|metas| metas.payload)
            .and_then(|payload| IndexedUpTo::parse(&payload))
            .unwrap_or_default()
    }

    /// The WAL position the last commit covers.
    pub fn committed_position(&self) -> u64 {
        self.indexed_up_to().position
    }

    /// A writer on this index, as the indexer thread uses (one indexing
    /// thread, 64 MiB): for tools that index outside a running collector.
    pub fn writer<D: Document>(&self) -> Result<IndexWriter<D>, IndexError> {
        let writer = self
            .index
            .writer_with_num_threads(1, WRITER_MEMORY)
            .map_err(|source| IndexError::Tantivy { path: self.path.clone(), source })?;
        // A segment with a third of its records deleted by retention is
        // merged, so their space comes back; published segments never are.
        if let Some(splits) = self.splits.get() {
            writer.set_merge_policy(Box::new(splits.merge_policy()));
        } else {
            let mut policy = tantivy::indexer::LogMergePolicy::default();
            policy.set_del_docs_ratio_before_merge(0.3);
            writer.set_merge_policy(Box::new(policy));
        }
        Ok(writer)
    }

    /// Commits what `writer` holds as covering the WAL up to `up_to`, and
    /// makes it searchable.
    pub fn commit<D: Document>(
        &self,
        writer: &mut IndexWriter<D>,
        up_to: IndexedUpTo,
    ) -> Result<(), IndexError> {
        let tantivy_err = |source| IndexError::Tantivy { path: self.path.clone(), source };
        let mut commit = writer.prepare_commit().map_err(tantivy_err)?;
        commit.set_payload(&up_to.payload());
        commit.commit().map_err(tantivy_err)?;
        self.reader.reload().map_err(tantivy_err)
    }

    /// The documents of one WAL entry: a record each, minus those an
    /// earlier entry stored (none of a void entry). Each gets the id
    /// `*next_id`, which moves on.
    pub fn documents(
        &self,
        entry: &wal::Entry,
        inflater: &mut Inflater,
        next_id: &mut u64,
        out: &mut Vec<TantivyDocument>,
    ) {
        if entry.void {
            return;
        }
        let f = &self.fields;
        // Checked against the real limits when it arrived.
        let limits = Limits::TRUSTED;
        let batch = match BatchView::parse(&entry.batch, &limits) {
            Ok(batch) => batch,
            Err(err) => {
                tracing::error!(position = entry.position, error = %err, "wal entry does not decode; not indexed");
                return;
            }
        };
        let records = match batch.records(&limits, inflater) {
            Ok(records) => records,
            Err(err) => {
                tracing::error!(position = entry.position, error = %err, "wal entry does not inflate; not indexed");
                return;
            }
        };
        let header = &batch.header;
        let mut seq = header.first_seq;
        let mut blob = Vec::with_capacity(512);
        let walked = records.for_each(&limits, |record| {
            let this_seq = seq;
            seq += 1;
            if this_seq < header.first_seq + u64::from(entry.skip) {
                return; // stored by an earlier entry
            }
            let id = *next_id;
            *next_id += 1;
            let mut doc = TantivyDocument::new();
            doc.add_date(f.timestamp, DateTime::from_timestamp_nanos(record.timestamp_ns));
            doc.add_u64(f.id, id);
            doc.add_text(f.tenant, &entry.tenant);
            doc.add_text(f.host, &entry.host);
            doc.add_text(f.source, &header.source);
            doc.add_text(f.level, record.level.as_str());
            doc.add_text(f.message, record.message);
            for flag in flag_names(record.flags, record.timestamp_ns, entry.received_ns) {
                doc.add_text(f.flags, flag);
            }
            let mut fields = record.fields().peekable();
            if fields.peek().is_some() {
                let mut object = BTreeMap::new();
                for (name, value) in fields {
                    object.insert(indexed_name(name), OwnedValue::Str(value.to_owned()));
                }
                doc.add_object(f.fields, object);
            }
            blob.clear();
            StoredHit {
                id,
                timestamp_ns: record.timestamp_ns,
                received_ns: entry.received_ns,
                tenant: &entry.tenant,
                host: &entry.host,
                source: &header.source,
                epoch: header.epoch,
                seq: this_seq,
                level: record.level.as_str(),
                flags: record.flags,
                message: record.message,
            }
            .encode(&mut blob, record.fields());
            doc.add_bytes(f.hit, &blob);
            out.push(doc);
        });
        if let Err(err) = walked {
            tracing::error!(position = entry.position, error = %err, "wal entry does not decode; not indexed");
        }
    }
}

/// Documents handed to tantivy's indexing thread per call.
const HAND_OVER_DOCS: usize = 64;
/// Hand-overs that may wait in tantivy's queue: about 16,000 documents,
/// so the queue never holds more than a few WAL reads.
const MAX_QUEUED_HAND_OVERS: usize = 256;

/// Hands documents to tantivy's indexing thread in groups of
/// [`HAND_OVER_DOCS`] and keeps at most [`MAX_QUEUED_HAND_OVERS`] groups
/// waiting. Tantivy bounds its queue by hand-overs, not documents, and one
/// document per hand-over costs a thread wake-up each (a fifth of the
/// indexer's CPU); the last document of each group carries a slot that is
/// given back when the indexing thread takes it, so the queue stays
/// bounded in documents too. When full, [`Feeder::add`] waits (at most a
/// second per group, so a writer that failed reports it).
pub struct Feeder {
    writer: IndexWriter<Queued>,
    queue: Arc<HandOvers>,
}

#[derive(Default)]
struct HandOvers {
    queued: Mutex<usize>,
    freed: Condvar,
}

/// A document in tantivy's queue.
pub struct Queued {
    doc: TantivyDocument,
    /// On the last document of a hand-over: frees its place when dropped.
    _slot: Option<Slot>,
}

struct Slot(Arc<HandOvers>);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut queued = self.0.queued.lock().unwrap_or_else(|e| e.into_inner());
        *queued -= 1;
        // Wake the feeder once the queue is half empty, not on every group.
        if *queued == MAX_QUEUED_HAND_OVERS / 2 {
            self.0.freed.notify_one();
        }
    }
}

impl Document for Queued {
    type Value<'a> = <TantivyDocument as Document>::Value<'a>;
    type FieldsValuesIter<'a> = <TantivyDocument as Document>::FieldsValuesIter<'a>;

    fn iter_fields_and_values(&self) -> Self::FieldsValuesIter<'_> {
        self.doc.iter_fields_and_values()
    }

    fn into_tantivy_document(self) -> TantivyDocument {
        self.doc
    }
}

impl Feeder {
    /// A feeder with a writer on `index` (see [`LogIndex::writer`]).
    pub fn new(index: &LogIndex) -> Result<Feeder, IndexError> {
        Ok(Feeder { writer: index.writer()?, queue: Arc::default() })
    }

    /// Hands `docs` to the indexing thread, leaving `docs` empty; waits
    /// while the queue is full.
    pub fn add(&mut self, docs: &mut Vec<TantivyDocument>) -> tantivy::Result<()> {
        while !docs.is_empty() {
            let n = docs.len().min(HAND_OVER_DOCS);
            {
                let mut queued = self.queue.queued.lock().unwrap_or_else(|e| e.into_inner());
                while *queued >= MAX_QUEUED_HAND_OVERS {
                    let (guard, waited) = self
                        .queue
                        .freed
                        .wait_timeout(queued, Duration::from_secs(1))
                        .unwrap_or_else(|e| e.into_inner());
                    queued = guard;
                    // A writer that was killed never frees its queue; the
                    // hand-over below then fails instead of waiting.
                    if waited.timed_out() {
                        break;
                    }
                }
                *queued += 1;
            }
            let mut slot = Some(Slot(Arc::clone(&self.queue)));
            let group = docs.drain(..n).enumerate().map(|(i, doc)| {
                let slot = if i + 1 == n { slot.take() } else { None };
                tantivy::indexer::UserOperation::Add(Queued { doc, _slot: slot })
            });
            self.writer.run(group)?;
        }
        Ok(())
    }

    /// The writer, to commit or delete with.
    pub fn writer(&mut self) -> &mut IndexWriter<Queued> {
        &mut self.writer
    }

    /// The writer, to wait for its merges with.
    pub fn into_writer(self) -> IndexWriter<Queued> {
        self.writer
    }
}

/// The stored form of a hit (version byte 0xB1): fixed-width numbers,
/// length-prefixed strings and a counted list of fields, big-endian. No
/// key names and no time formatting while indexing; [`decode_hit`] makes
/// the [`Hit`] the API returns. Indexes written before it hold JSON, which
/// starts with `{` and is still read.
const STORED_HIT_V1: u8 = 0xB1;

pub(crate) struct StoredHit<'a> {
    pub(crate) id: u64,
    pub(crate) timestamp_ns: i64,
    pub(crate) received_ns: i64,
    pub(crate) tenant: &'a str,
    pub(crate) host: &'a str,
    pub(crate) source: &'a str,
    pub(crate) epoch: u64,
    pub(crate) seq: u64,
    pub(crate) level: &'a str,
    /// The record's flag bits; `future` and `past` follow from the times.
    pub(crate) flags: u8,
    pub(crate) message: &'a str,
}

impl StoredHit<'_> {
    pub(crate) fn encode<'f>(&self, out: &mut Vec<u8>, fields: impl Iterator<Item = (&'f str, &'f str)>) {
        out.push(STORED_HIT_V1);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.timestamp_ns.to_be_bytes());
        out.extend_from_slice(&self.received_ns.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.push(self.flags);
        for text in [self.tenant, self.host, self.source, self.level, self.message] {
            put_text(out, text);
        }
        let count_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let mut count = 0u32;
        for (name, value) in fields {
            put_text(out, name);
            put_text(out, value);
            count += 1;
        }
        out[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
    }
}

/// Lengths as u32: a record's parts are capped far below that on the way in.
fn put_text(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// A stored hit back as the API returns it; `None` for bytes that are not
/// one (every length is checked against what is left before it is used).
pub(crate) fn decode_hit(blob: &[u8]) -> Option<Hit> {
    if blob.first() == Some(&b'{') {
        return serde_json::from_slice(blob).ok();
    }
    let (&version, rest) = blob.split_first()?;
    if version != STORED_HIT_V1 {
        return None;
    }
    let mut r = HitReader(rest);
    let id = u64::from_be_bytes(r.number()?);
    let timestamp_ns = i64::from_be_bytes(r.number()?);
    let received_ns = i64::from_be_bytes(r.number()?);
    let epoch = u64::from_be_bytes(r.number()?);
    let seq = u64::from_be_bytes(r.number()?);
    let flags = r.byte()?;
    let (tenant, host, source, level, message) = (r.text()?, r.text()?, r.text()?, r.text()?, r.text()?);
    let count = u32::from_be_bytes(*r.0.first_chunk::<4>()?);
    r.0 = &r.0[4..];
    let mut fields = serde_json::Map::new();
    for _ in 0..count {
        let (name, value) = (r.text()?, r.text()?);
        fields.insert(name.to_owned(), serde_json::Value::String(value.to_owned()));
    }
    if !r.0.is_empty() {
        return None;
    }
    Some(Hit {
        id: id.to_string(),
        timestamp: crate::time::format_ns(timestamp_ns),
        received: crate::time::format_ns(received_ns),
        tenant: tenant.to_owned(),
        host: host.to_owned(),
        source: source.to_owned(),
        epoch,
        seq,
        level: level.to_owned(),
        message: message.to_owned(),
        fields,
        flags: flag_names(flags, timestamp_ns, received_ns).map(str::to_owned).collect(),
    })
}

/// What is left of a stored hit.
struct HitReader<'a>(&'a [u8]);

impl<'a> HitReader<'a> {
    fn number(&mut self) -> Option<[u8; 8]> {
        let (head, tail) = self.0.split_first_chunk::<8>()?;
        self.0 = tail;
        Some(*head)
    }

    fn byte(&mut self) -> Option<u8> {
        let (&head, tail) = self.0.split_first()?;
        self.0 = tail;
        Some(head)
    }

    fn text(&mut self) -> Option<&'a str> {
        let (len, tail) = self.0.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > tail.len() {
            return None;
        }
        let (text, tail) = tail.split_at(len);
        self.0 = tail;
        std::str::from_utf8(text).ok()
    }
}

/// A field's name as the index knows it: control characters (tantivy's
/// JSON path separators are among them) become U+FFFD, so no sender's key
/// can split or end a path. The stored hit keeps the name as sent.
fn indexed_name(name: &str) -> String {
    name.chars().map(|c| if c.is_control() { '\u{fffd}' } else { c }).collect()
}

/// Progress of the indexer, for health and metrics.
#[derive(Debug, Default)]
pub struct IndexProgress {
    /// WAL position committed to the index.
    pub committed: AtomicU64,
    /// Times the indexer failed and restarted.
    pub failures: AtomicU64,
}

/// Indexes the WAL until `cancel` fires, committing every `commit_interval`.
/// A failure (disk full, say) is logged and retried with backoff from the
/// last commit, so acked data keeps being indexed once the cause is gone.
/// Blocking: run it on its own thread.
pub fn run_indexer(
    index: Arc<LogIndex>,
    wal_dir: PathBuf,
    durable: Arc<AtomicU64>,
    progress: Arc<IndexProgress>,
    commit_interval: Duration,
    cancel: CancellationToken,
) -> Result<(), IndexError> {
    let mut delay = Duration::from_secs(1);
    loop {
        match index_until_stopped(&index, &wal_dir, &durable, &progress, commit_interval, &cancel) {
            Ok(()) => return Ok(()),
            Err(err) if cancel.is_cancelled() => return Err(err),
            Err(err) => {
                progress.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %err, retry_in_ms = delay.as_millis() as u64, "indexer failed; retrying from the last commit");
                let until = Instant::now() + delay;
                while Instant::now() < until && !cancel.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

fn index_until_stopped(
    index: &LogIndex,
    wal_dir: &Path,
    durable: &AtomicU64,
    progress: &IndexProgress,
    commit_interval: Duration,
    cancel: &CancellationToken,
) -> Result<(), IndexError> {
    let tantivy_err = |source| IndexError::Tantivy { path: index.path.clone(), source };
    let mut feeder = Feeder::new(index)?;
    let mut up_to = index.indexed_up_to();
    progress.committed.store(up_to.position, Ordering::Release);
    if let Some(splits) = index.splits.get() {
        // Ids unique across the collectors sharing a bucket.
        up_to.next_id = up_to.next_id.max(splits.id_base());
    }
    let mut pending = false;
    let mut last_commit = Instant::now();
    let mut last_retention: Option<Instant> = None;
    let mut docs = Vec::new();
    let mut inflater = Inflater::new();
    tracing::info!(
        from = up_to.position,
        to = durable.load(Ordering::Acquire),
        "indexer catching up from the wal"
    );
    loop {
        let stopping = cancel.is_cancelled();
        let mut until = durable.load(Ordering::Acquire);
        // Rebuilding what was published: a commit right at its end.
        let resync_to = index.splits.get().and_then(|splits| splits.resync_to());
        if let Some(to) = resync_to
            && up_to.position < to
        {
            until = until.min(to);
        }
        let entries = match wal::read_range(wal_dir, up_to.position, until, 8 * 1024 * 1024) {
            Ok(entries) => entries,
            Err(err) => {
                tracing::error!(error = %err, "indexer cannot read the wal");
                std::thread::sleep(Duration::from_secs(1));
                Vec::new()
            }
        };
        let idle = entries.is_empty();
        if let Some(first) = entries.first()
            && first.position > up_to.position
        {
            tracing::warn!(
                from = up_to.position,
                to = first.position,
                "this part of the wal was removed after archiving; its records are in the archive only (logvault archive restore)"
            );
        }
        for entry in entries {
            index.documents(&entry, &mut inflater, &mut up_to.next_id, &mut docs);
            feeder.add(&mut docs).map_err(tantivy_err)?;
            up_to.position = entry.next;
            pending = true;
        }
        let check = Duration::from_millis(index.retention_check_ms.load(Ordering::Relaxed));
        if last_retention.is_none_or(|at| at.elapsed() >= check) {
            last_retention = Some(Instant::now());
            pending |= index.expire(feeder.writer());
        }
        let at_resync_end = resync_to.is_some_and(|to| up_to.position >= to);
        if pending
            && (stopping
                || at_resync_end
                || last_commit.elapsed() >= commit_interval
                || (idle && last_commit.elapsed() >= commit_interval / 4))
        {
            index.commit(feeder.writer(), up_to)?;
            progress.committed.store(up_to.position, Ordering::Release);
            pending = false;
            last_commit = Instant::now();
        }
        // Committed segments not yet published, when it is time (cheap otherwise).
        if let Some(splits) = index.splits.get()
            && !stopping
        {
            splits.after_commit(index, feeder.writer());
        }
        if stopping {
            let _ = feeder.into_writer().wait_merging_threads();
            return Ok(());
        }
        if idle {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_name_what_the_agent_did_and_how_far_the_clock_is() {
        let received = 1_800_000_000_000_000_000;
        let names = |flags, ts| flag_names(flags, ts, received).collect::<Vec<_>>();
        assert!(names(0, received).is_empty());
        assert_eq!(names(0b101, received), vec!["truncated", "invalid_utf8"]);
        assert_eq!(names(0, received + FUTURE_SKEW_NS + 1), vec!["future"]);
        assert!(names(0, received + FUTURE_SKEW_NS).is_empty());
        assert_eq!(names(0b010, received - PAST_SKEW_NS - 1), vec!["continued", "past"]);
        assert_eq!(names(0, i64::MIN), vec!["past"]);
        assert_eq!(flag_names(0, i64::MAX, i64::MAX).count(), 0);
    }

    /// The feeder hands every document over, never keeps more than its
    /// bound of groups waiting, and every group's place comes back.
    #[test]
    fn the_feeder_hands_every_document_over_within_its_bound() {
        let dir = std::env::temp_dir().join(format!("logvault-index-feeder-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let index = LogIndex::open(&dir).unwrap();
        let mut feeder = Feeder::new(&index).unwrap();
        let f = index.fields;
        let (calls, per_call) = (200, HAND_OVER_DOCS * 3 + 5);
        let mut docs = Vec::new();
        for call in 0..calls {
            for i in 0..per_call {
                let mut doc = TantivyDocument::new();
                doc.add_u64(f.id, (call * per_call + i) as u64);
                doc.add_text(f.tenant, "t");
                doc.add_text(f.message, "a line to index");
                docs.push(doc);
            }
            feeder.add(&mut docs).unwrap();
            assert!(docs.is_empty());
            let queued = *feeder.queue.queued.lock().unwrap();
            assert!(queued <= MAX_QUEUED_HAND_OVERS, "{queued} groups waiting");
        }
        let next_id = (calls * per_call) as u64;
        index.commit(feeder.writer(), IndexedUpTo { position: 1, next_id }).unwrap();
        assert_eq!(*feeder.queue.queued.lock().unwrap(), 0, "every group's place came back");
        assert_eq!(index.reader.searcher().num_docs(), next_id);
        drop(feeder.into_writer().wait_merging_threads());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Field names are whatever a sender's JSON keys were: control
    /// characters (tantivy's JSON path separators among them) and dots
    /// are indexed, searchable by their escaped name, and kept as sent.
    #[test]
    fn any_field_name_is_indexed_and_kept_as_sent() {
        use logvault_storage::{BatchBuilder, Level, WireRecord};
        let dir = std::env::temp_dir().join(format!("logvault-index-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let index = LogIndex::open(&dir).unwrap();
        let names = ["a\0b", "a\u{1}b", "\0", "a.b", "", "\u{1f}x\u{7f}", "ok"];
        let mut builder = BatchBuilder::new("h", "/s", 0, 0, [0; 32]);
        for name in names {
            let mut record = WireRecord::new(1, Level::Info, format!("line {name:?}"));
            record.fields.push((name.to_owned(), "value".into()));
            builder.push(record);
        }
        let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[1; 32]).unwrap();
        let entry = wal::Entry {
            position: 0,
            next: 1,
            received_ns: 1,
            tenant: "t".into(),
            host: "h".into(),
            skip: 0,
            signer: Vec::new(),
            batch: builder.sign(&key),
            void: false,
        };
        let (mut docs, mut next_id) = (Vec::new(), 0);
        index.documents(&entry, &mut Inflater::new(), &mut next_id, &mut docs);
        let mut writer = index.writer().unwrap();
        for doc in docs {
            writer.add_document(doc).unwrap();
        }
        index.commit(&mut writer, IndexedUpTo { position: 1, next_id }).unwrap();
        let search = |query: &str| {
            let filter = crate::search::Filter {
                tenants: vec!["t".into()],
                query: query.into(),
                from_ns: None,
                to_ns: None,
            };
            let request = crate::search::SearchRequest {
                filter,
                limit: 10,
                order: crate::search::SortOrder::Desc,
                cursor: None,
            };
            index.search(&request, &crate::search::Deadline::after_ms(10_000))
        };
        let all = search("*").unwrap();
        assert_eq!(all.total, names.len() as u64);
        for name in names {
            assert!(all.hits.iter().any(|hit| hit.fields.contains_key(name)), "{name:?} kept as sent");
        }
        let search = |query: &str| search(query).map(|r| r.total);
        assert_eq!(search("fields.ok:value").unwrap(), 1);
        assert_eq!(search("fields.a.b:value").unwrap(), 1, "a dotted name is its path");
        assert_eq!(search("fields.a\u{fffd}b:value").unwrap(), 2, "control characters are U+FFFD");
        let bad = search("fields.a\0b:value");
        assert!(matches!(bad, Err(crate::search::SearchError::BadQuery(_))), "{bad:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_commit_payload_round_trips() {
        let up_to = IndexedUpTo { position: 123_456, next_id: 789 };
        assert_eq!(IndexedUpTo::parse(&up_to.payload()), Some(up_to));
        assert_eq!(IndexedUpTo::parse("123"), None);
        assert_eq!(IndexedUpTo::parse("1 x"), None);
    }

    mod stored_hit {
        use super::super::{Hit, StoredHit, decode_hit};
        use proptest::prelude::*;

        proptest! {
            /// What the index stores reads back as the hit the API
            /// returned when hits were stored as JSON.
            #[test]
            fn a_stored_hit_reads_back_as_its_hit(
                id in any::<u64>(),
                timestamp_ns in any::<i64>(),
                received_ns in any::<i64>(),
                epoch in any::<u64>(),
                seq in any::<u64>(),
                flags in any::<u8>(),
                texts in proptest::collection::vec(".{0,40}", 5),
                fields in proptest::collection::vec((".{0,12}", ".{0,30}"), 0..6),
            ) {
                let stored = StoredHit {
                    id, timestamp_ns, received_ns,
                    tenant: &texts[0], host: &texts[1], source: &texts[2],
                    epoch, seq, level: &texts[3], flags, message: &texts[4],
                };
                let mut blob = Vec::new();
                stored.encode(&mut blob, fields.iter().map(|(n, v)| (n.as_str(), v.as_str())));
                let hit = decode_hit(&blob).expect("decodes");
                let want = Hit {
                    id: id.to_string(),
                    timestamp: crate::time::format_ns(timestamp_ns),
                    received: crate::time::format_ns(received_ns),
                    tenant: texts[0].clone(),
                    host: texts[1].clone(),
                    source: texts[2].clone(),
                    epoch,
                    seq,
                    level: texts[3].clone(),
                    message: texts[4].clone(),
                    fields: fields.iter().map(|(n, v)| (n.clone(), serde_json::Value::String(v.clone()))).collect(),
                    flags: super::super::flag_names(flags, timestamp_ns, received_ns).map(str::to_owned).collect(),
                };
                prop_assert_eq!(&hit, &want);
                // A JSON hit (an index written before) reads the same.
                prop_assert_eq!(decode_hit(&serde_json::to_vec(&want).unwrap()), Some(want));
                // Cut anywhere inside, it is refused, never misread.
                for cut in 1..blob.len() {
                    prop_assert_eq!(decode_hit(&blob[..cut]), None);
                }
            }

            /// Any bytes: a hit or nothing, never a panic or a huge allocation.
            #[test]
            fn any_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                let _ = decode_hit(&bytes);
                let mut tagged = vec![0xB1];
                tagged.extend_from_slice(&bytes);
                let _ = decode_hit(&tagged);
            }
        }
    }
}
