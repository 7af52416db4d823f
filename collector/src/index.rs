//! The tantivy index: the serving layer, rebuilt from the WAL at will.
//!
//! The indexer thread reads the WAL from the position stored in the last
//! commit's payload up to the durable end, adds one document per record,
//! and commits every `commit_interval` (so a line is searchable within a
//! second or so of its ack). After a crash it simply resumes from the last
//! commit: the WAL is the source of truth, the index a view of it.
//!
//! `message` is tokenised so that every maximal run of letters and digits
//! is a term, lower-cased, with positions (phrases work) and no length cap.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use logvault_storage::batch::{BatchView, Inflater, Limits};
use serde::Serialize;
use tantivy::collector::{Count, TopDocs};
use tantivy::query::{AllQuery, BooleanQuery, Occur, Query, QueryParser, RangeQuery, TermQuery};
use tantivy::schema::{
    DateOptions, DateTimePrecision, FAST, Field, INDEXED, IndexRecordOption, JsonObjectOptions, OwnedValue,
    STORED, Schema, TextFieldIndexing, TextOptions, Value,
};
use tantivy::tokenizer::{LowerCaser, RawTokenizer, SimpleTokenizer, TextAnalyzer};
use tantivy::{DateTime, Index, IndexReader, IndexWriter, Order, ReloadPolicy, TantivyDocument, Term};
use tokio_util::sync::CancellationToken;

use crate::wal;

/// Tokenizer of `message` and `fields.*`: alphanumeric runs, lower-cased.
const WORDS: &str = "logvault_words";
/// Tokenizer of `level`: the whole value, lower-cased.
const KEYWORD: &str = "logvault_keyword";
/// Tokenizer of exact-match fields (host, source, tenant).
const RAW: &str = "raw";
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

/// Why a search failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SearchError {
    /// The query does not parse or names an unknown field.
    #[error("{0}")]
    BadQuery(String),
    /// The search itself failed.
    #[error("search failed: {0}")]
    Internal(String),
}

/// The schema's fields.
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    timestamp: Field,
    received: Field,
    tenant: Field,
    host: Field,
    source: Field,
    epoch: Field,
    seq: Field,
    level: Field,
    message: Field,
    fields: Field,
    fields_json: Field,
    flags: Field,
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
    let date = DateOptions::from(INDEXED | STORED | FAST).set_precision(DateTimePrecision::Microseconds);
    let keyword = |tokenizer: &str| {
        TextOptions::default()
            .set_indexing_options(
                TextFieldIndexing::default()
                    .set_tokenizer(tokenizer)
                    .set_index_option(IndexRecordOption::Basic),
            )
            .set_stored()
            .set_fast(tokenizer)
    };
    let words = TextFieldIndexing::default()
        .set_tokenizer(WORDS)
        .set_index_option(IndexRecordOption::WithFreqsAndPositions);
    let fields = Fields {
        timestamp: builder.add_date_field("timestamp", date.clone()),
        received: builder.add_date_field(
            "received",
            DateOptions::from(STORED).set_precision(DateTimePrecision::Microseconds),
        ),
        tenant: builder.add_text_field("tenant", keyword(RAW)),
        host: builder.add_text_field("host", keyword(RAW)),
        source: builder.add_text_field("source", keyword(RAW)),
        epoch: builder.add_u64_field("epoch", STORED),
        seq: builder.add_u64_field("seq", STORED | FAST),
        level: builder.add_text_field("level", keyword(KEYWORD)),
        message: builder.add_text_field(
            "message",
            TextOptions::default().set_indexing_options(words.clone()).set_stored(),
        ),
        fields: builder.add_json_field("fields", JsonObjectOptions::default().set_indexing_options(words)),
        fields_json: builder.add_text_field("fields_json", STORED),
        flags: builder.add_text_field("flags", keyword(RAW)),
    };
    (builder.build(), fields)
}

/// An open index.
pub struct LogIndex {
    index: Index,
    reader: IndexReader,
    fields: Fields,
    path: PathBuf,
}

impl std::fmt::Debug for LogIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogIndex").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Newest or oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    /// Newest first (the default).
    #[default]
    Desc,
    /// Oldest first.
    Asc,
}

/// A search, as the API hands it over after authentication.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    /// Tenants the caller may see; never empty.
    pub tenants: Vec<String>,
    /// The query text; empty or `*` matches all.
    pub query: String,
    /// Inclusive lower bound, ns since the epoch.
    pub from_ns: Option<i64>,
    /// Exclusive upper bound, ns since the epoch.
    pub to_ns: Option<i64>,
    /// Hits to return.
    pub limit: usize,
    /// Sort order by timestamp.
    pub order: SortOrder,
}

/// One record as the API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct Hit {
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
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// `truncated`, `continued`, `invalid_utf8`, `future`, `past`: see
    /// [`flag_names`]. Left out when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

/// The answer to a search.
#[derive(Debug, Clone, Serialize)]
pub struct SearchResponse {
    /// Exact number of matching records.
    pub total: u64,
    /// The first `limit` of them in the asked order.
    pub hits: Vec<Hit>,
}

impl LogIndex {
    /// Opens the index in `dir`, creating it when missing.
    pub fn open(dir: &Path) -> Result<LogIndex, IndexError> {
        let tantivy_err = |source| IndexError::Tantivy { path: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(|e| {
            tantivy_err(tantivy::TantivyError::from(
                tantivy::directory::error::OpenDirectoryError::wrap_io_error(e, dir.to_owned()),
            ))
        })?;
        let (schema, fields) = build_schema();
        let directory = tantivy::directory::MmapDirectory::open(dir).map_err(|e| tantivy_err(e.into()))?;
        let index = Index::open_or_create(directory, schema).map_err(tantivy_err)?;
        let tokenizers = index.tokenizers();
        tokenizers
            .register(WORDS, TextAnalyzer::builder(SimpleTokenizer::default()).filter(LowerCaser).build());
        tokenizers
            .register(KEYWORD, TextAnalyzer::builder(RawTokenizer::default()).filter(LowerCaser).build());
        index
            .fast_field_tokenizer()
            .register(KEYWORD, TextAnalyzer::builder(RawTokenizer::default()).filter(LowerCaser).build());
        let reader =
            index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into().map_err(tantivy_err)?;
        Ok(LogIndex { index, reader, fields, path: dir.to_owned() })
    }

    /// The WAL position the last commit covers.
    pub fn committed_position(&self) -> u64 {
        self.index
            .load_metas()
            .ok()
            .and_then(|metas| metas.payload)
            .and_then(|payload| payload.parse().ok())
            .unwrap_or(0)
    }

    /// Runs a search. Blocking: call from `spawn_blocking`.
    pub fn search(&self, request: &SearchRequest) -> Result<SearchResponse, SearchError> {
        let f = &self.fields;
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        let text = request.query.trim();
        if !text.is_empty() && text != "*" {
            let mut parser = QueryParser::for_index(&self.index, vec![f.message]);
            parser.set_conjunction_by_default();
            let parsed = parser.parse_query(text).map_err(|e| SearchError::BadQuery(e.to_string()))?;
            clauses.push((Occur::Must, parsed));
        } else {
            clauses.push((Occur::Must, Box::new(AllQuery)));
        }
        // The tenant filter is added here, in code, never spliced into text.
        let tenants: Vec<(Occur, Box<dyn Query>)> = request
            .tenants
            .iter()
            .map(|tenant| {
                let term = Term::from_field_text(f.tenant, tenant);
                (Occur::Should, Box::new(TermQuery::new(term, IndexRecordOption::Basic)) as Box<dyn Query>)
            })
            .collect();
        if tenants.is_empty() {
            return Err(SearchError::Internal("no tenant to search".into()));
        }
        clauses.push((Occur::Must, Box::new(BooleanQuery::new(tenants))));
        if request.from_ns.is_some() || request.to_ns.is_some() {
            let bound = |ns: i64| Term::from_field_date(f.timestamp, DateTime::from_timestamp_nanos(ns));
            let lower = request.from_ns.map_or(Bound::Unbounded, |ns| Bound::Included(bound(ns)));
            let upper = request.to_ns.map_or(Bound::Unbounded, |ns| Bound::Excluded(bound(ns)));
            clauses.push((Occur::Must, Box::new(RangeQuery::new(lower, upper))));
        }
        let query = BooleanQuery::new(clauses);
        let searcher = self.reader.searcher();
        let order = match request.order {
            SortOrder::Desc => Order::Desc,
            SortOrder::Asc => Order::Asc,
        };
        let top =
            TopDocs::with_limit(request.limit.max(1)).order_by_fast_field::<DateTime>("timestamp", order);
        let (total, top) =
            searcher.search(&query, &(Count, top)).map_err(|e| SearchError::Internal(e.to_string()))?;
        let mut hits = Vec::with_capacity(top.len().min(request.limit));
        for (_, address) in top.into_iter().take(request.limit) {
            let doc: TantivyDocument =
                searcher.doc(address).map_err(|e| SearchError::Internal(e.to_string()))?;
            hits.push(self.hit(&doc));
        }
        Ok(SearchResponse { total: total as u64, hits })
    }

    fn hit(&self, doc: &TantivyDocument) -> Hit {
        let f = &self.fields;
        let text = |field| doc.get_first(field).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let number = |field| doc.get_first(field).and_then(|v| v.as_u64()).unwrap_or_default();
        let date = |field| {
            doc.get_first(field)
                .and_then(|v| v.as_datetime())
                .map(|d| crate::time::format_ns(d.into_timestamp_nanos()))
                .unwrap_or_default()
        };
        let fields = serde_json::from_str(&text(f.fields_json)).unwrap_or_default();
        Hit {
            timestamp: date(f.timestamp),
            received: date(f.received),
            tenant: text(f.tenant),
            host: text(f.host),
            source: text(f.source),
            epoch: number(f.epoch),
            seq: number(f.seq),
            level: text(f.level),
            message: text(f.message),
            fields,
            flags: doc.get_all(f.flags).filter_map(|v| v.as_str()).map(str::to_owned).collect(),
        }
    }

    /// A writer on this index, as the indexer thread uses (one indexing
    /// thread, 64 MiB): for tools that index outside a running collector.
    pub fn writer(&self) -> Result<IndexWriter, IndexError> {
        self.index
            .writer_with_num_threads(1, WRITER_MEMORY)
            .map_err(|source| IndexError::Tantivy { path: self.path.clone(), source })
    }

    /// The documents of one WAL entry: a record each, minus those an
    /// earlier entry stored.
    pub fn documents(&self, entry: &wal::Entry, inflater: &mut Inflater, out: &mut Vec<TantivyDocument>) {
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
        let received = DateTime::from_timestamp_nanos(entry.received_ns);
        let header = &batch.header;
        let mut seq = header.first_seq;
        let walked = records.for_each(&limits, |record| {
            let this_seq = seq;
            seq += 1;
            if this_seq < header.first_seq + u64::from(entry.skip) {
                return; // stored by an earlier entry
            }
            let mut doc = TantivyDocument::new();
            doc.add_date(f.timestamp, DateTime::from_timestamp_nanos(record.timestamp_ns));
            doc.add_date(f.received, received);
            doc.add_text(f.tenant, &entry.tenant);
            doc.add_text(f.host, &entry.host);
            doc.add_text(f.source, &header.source);
            doc.add_u64(f.epoch, header.epoch);
            doc.add_u64(f.seq, this_seq);
            doc.add_text(f.level, record.level.as_str());
            doc.add_text(f.message, record.message);
            for flag in flag_names(record.flags, record.timestamp_ns, entry.received_ns) {
                doc.add_text(f.flags, flag);
            }
            let mut fields = record.fields().peekable();
            if fields.peek().is_some() {
                let mut object = BTreeMap::new();
                let mut json = serde_json::Map::new();
                for (name, value) in fields {
                    object.insert(name.to_owned(), OwnedValue::Str(value.to_owned()));
                    json.insert(name.to_owned(), serde_json::Value::String(value.to_owned()));
                }
                doc.add_object(f.fields, object);
                doc.add_text(f.fields_json, serde_json::Value::Object(json).to_string());
            }
            out.push(doc);
        });
        if let Err(err) = walked {
            tracing::error!(position = entry.position, error = %err, "wal entry does not decode; not indexed");
        }
    }
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
    let mut writer: IndexWriter =
        index.index.writer_with_num_threads(1, WRITER_MEMORY).map_err(tantivy_err)?;
    let mut position = index.committed_position();
    progress.committed.store(position, Ordering::Release);
    let mut pending = false;
    let mut last_commit = Instant::now();
    let mut docs = Vec::new();
    let mut inflater = Inflater::new();
    tracing::info!(from = position, to = durable.load(Ordering::Acquire), "indexer catching up from the wal");
    loop {
        let stopping = cancel.is_cancelled();
        let until = durable.load(Ordering::Acquire);
        let entries = match wal::read_range(wal_dir, position, until, 8 * 1024 * 1024) {
            Ok(entries) => entries,
            Err(err) => {
                tracing::error!(error = %err, "indexer cannot read the wal");
                std::thread::sleep(Duration::from_secs(1));
                Vec::new()
            }
        };
        let idle = entries.is_empty();
        for entry in entries {
            index.documents(&entry, &mut inflater, &mut docs);
            // One document per hand-over: tantivy bounds its queue by
            // hand-overs, so this keeps the indexer's memory bounded
            // (whole batches per hand-over let it queue the WAL in RAM).
            for doc in docs.drain(..) {
                writer.add_document(doc).map_err(tantivy_err)?;
            }
            position = entry.next;
            pending = true;
        }
        if pending
            && (stopping
                || last_commit.elapsed() >= commit_interval
                || (idle && last_commit.elapsed() >= commit_interval / 4))
        {
            let mut commit = writer.prepare_commit().map_err(tantivy_err)?;
            commit.set_payload(&position.to_string());
            commit.commit().map_err(tantivy_err)?;
            index.reader.reload().map_err(tantivy_err)?;
            progress.committed.store(position, Ordering::Release);
            pending = false;
            last_commit = Instant::now();
        }
        if stopping {
            let _ = writer.wait_merging_threads();
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
}
