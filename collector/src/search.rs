//! Searching the index: query checking, the tenant filter, sorting,
//! cursors, the live tail's "what is new" and a hit's context.
//!
//! Every search takes the caller's tenants and adds the filter in code;
//! the query text is parsed by tantivy's grammar and checked first: only
//! the record's fields may be named, `tenant:` only for the caller's own
//! tenants, and its size is capped. Every search runs under a deadline:
//! the matching documents are walked through [`DeadlineQuery`], which
//! stops the walk once the time is up, so one heavy query cannot hold a
//! thread for long.

use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;
use tantivy::collector::sort_key::SortByStaticFastValue;
use tantivy::collector::{Count, TopDocs};
use tantivy::query::{
    AllQuery, BooleanQuery, EnableScoring, Explanation, Occur, Query, QueryParser, RangeQuery, Scorer,
    TermQuery, Weight,
};
use tantivy::query_grammar::{UserInputAst, UserInputLeaf};
use tantivy::schema::{IndexRecordOption, Value};
use tantivy::{
    DateTime, DocId, DocSet, Order, Score, Searcher, SegmentReader, TERMINATED, TantivyDocument, Term,
};

use crate::index::{Hit, LogIndex};
use crate::splits::ID_TAG_SHIFT;

/// Longest query text, in bytes.
pub const MAX_QUERY_BYTES: usize = 4096;
/// Most terms, phrases, ranges and other leaves in one query.
pub const MAX_QUERY_LEAVES: usize = 64;
/// Longest regular expression in a query.
pub const MAX_REGEX_BYTES: usize = 256;

/// Why a search failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SearchError {
    /// The query does not parse, names an unknown field, is too big, or a
    /// parameter is out of range.
    #[error("{0}")]
    BadQuery(String),
    /// The query names a tenant the caller may not read.
    #[error("{0}")]
    Forbidden(String),
    /// The query ran past its deadline.
    #[error("the query ran for more than {0} ms; narrow it (a field, a time range)")]
    Timeout(u64),
    /// The search itself failed.
    #[error("search failed: {0}")]
    Internal(String),
}

fn internal(err: impl std::fmt::Display) -> SearchError {
    SearchError::Internal(err.to_string())
}

/// Newest or oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    /// Newest first (the default).
    #[default]
    Desc,
    /// Oldest first.
    Asc,
}

/// What every search, aggregation and tail filters on.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Tenants the caller may see; never empty.
    pub tenants: Vec<String>,
    /// The query text; empty or `*` matches all.
    pub query: String,
    /// Inclusive lower bound, ns since the epoch.
    pub from_ns: Option<i64>,
    /// Exclusive upper bound, ns since the epoch.
    pub to_ns: Option<i64>,
}

/// A search, as the API hands it over after authentication.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    /// What to match.
    pub filter: Filter,
    /// Hits to return.
    pub limit: usize,
    /// Sort order by timestamp (then id).
    pub order: SortOrder,
    /// Where the previous page ended.
    pub cursor: Option<Cursor>,
}

/// The answer to a search.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct SearchResponse {
    /// Exact number of matching records (on every page, the same).
    pub total: u64,
    /// The next `limit` of them in the asked order.
    pub hits: Vec<Hit>,
    /// Pass it back to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// Where a page ended: the last hit's sort key, and the id every page of
/// the same search stays below, so records indexed while paging (even
/// with old timestamps) never shift the pages: each hit is seen once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// The last hit's timestamp, ns (at the index's microsecond precision).
    pub timestamp_ns: i64,
    /// The last hit's id.
    pub id: u64,
    /// This collector's ids at or above this were indexed after the first
    /// page (other collectors' splits never change).
    pub snapshot: u64,
}

impl Cursor {
    /// The text form handed to clients.
    pub fn encode(&self) -> String {
        format!("{}.{}.{}", self.timestamp_ns, self.id, self.snapshot)
    }

    /// Parses a cursor a client handed back.
    pub fn decode(text: &str) -> Result<Cursor, SearchError> {
        let bad =
            || SearchError::BadQuery(format!("bad cursor {text:?}: pass back the one a search returned"));
        let mut parts = text.splitn(3, '.');
        let mut next = || parts.next().ok_or_else(bad);
        let timestamp_ns = next()?.parse().map_err(|_| bad())?;
        let id = next()?.parse().map_err(|_| bad())?;
        let snapshot: u64 = next()?.parse().map_err(|_| bad())?;
        // A hit of this collector's (its tag in the top bits, as the
        // snapshot's) lies below the snapshot; another collector's may not.
        if id >> ID_TAG_SHIFT == snapshot >> ID_TAG_SHIFT && id >= snapshot {
            return Err(bad());
        }
        Ok(Cursor { timestamp_ns, id, snapshot })
    }
}

/// What `since` found.
#[derive(Debug, Clone)]
pub struct NewHits {
    /// Matching records with ids from the asked one on, oldest first.
    pub hits: Vec<Hit>,
    /// The id to ask from next time.
    pub next_id: u64,
}

/// A hit and its neighbours in the same stream.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Context {
    /// The record asked about.
    pub hit: Hit,
    /// Records before it in its stream (same host and source), oldest first.
    pub before: Vec<Hit>,
    /// Records after it in its stream, oldest first.
    pub after: Vec<Hit>,
}

/// When a search must give up.
#[derive(Debug, Clone)]
pub struct Deadline {
    at: Instant,
    budget_ms: u64,
    expired: Arc<AtomicBool>,
}

impl Deadline {
    /// A deadline `budget_ms` from now.
    pub fn after_ms(budget_ms: u64) -> Deadline {
        Deadline {
            at: Instant::now() + std::time::Duration::from_millis(budget_ms),
            budget_ms,
            expired: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(crate) fn check(&self) -> Result<(), SearchError> {
        if self.expired.load(Ordering::Relaxed) || Instant::now() > self.at {
            return Err(SearchError::Timeout(self.budget_ms));
        }
        Ok(())
    }
}

/// Wraps a query so that walking its matches stops at the deadline.
#[derive(Debug)]
struct DeadlineQuery {
    inner: Box<dyn Query>,
    deadline: Deadline,
}

impl Clone for DeadlineQuery {
    fn clone(&self) -> Self {
        DeadlineQuery { inner: self.inner.box_clone(), deadline: self.deadline.clone() }
    }
}

impl Query for DeadlineQuery {
    fn weight(&self, enable_scoring: EnableScoring<'_>) -> tantivy::Result<Box<dyn Weight>> {
        Ok(Box::new(DeadlineWeight {
            inner: self.inner.weight(enable_scoring)?,
            deadline: self.deadline.clone(),
        }))
    }
}

struct DeadlineWeight {
    inner: Box<dyn Weight>,
    deadline: Deadline,
}

impl Weight for DeadlineWeight {
    fn scorer(&self, reader: &SegmentReader, boost: Score) -> tantivy::Result<Box<dyn Scorer>> {
        if self.deadline.check().is_err() {
            self.deadline.expired.store(true, Ordering::Relaxed);
            return Ok(Box::new(tantivy::query::EmptyScorer));
        }
        Ok(Box::new(DeadlineScorer {
            inner: self.inner.scorer(reader, boost)?,
            deadline: self.deadline.clone(),
            steps: 0,
            stopped: false,
        }))
    }

    fn explain(&self, reader: &SegmentReader, doc: DocId) -> tantivy::Result<Explanation> {
        self.inner.explain(reader, doc)
    }
}

struct DeadlineScorer {
    inner: Box<dyn Scorer>,
    deadline: Deadline,
    steps: u32,
    stopped: bool,
}

impl DeadlineScorer {
    /// Looks at the clock every 4,096 steps: cheap, and still within a
    /// millisecond or so of the deadline.
    fn tick(&mut self) -> bool {
        self.steps = self.steps.wrapping_add(1);
        if self.steps.is_multiple_of(4096) && Instant::now() > self.deadline.at {
            self.deadline.expired.store(true, Ordering::Relaxed);
            self.stopped = true;
        }
        self.stopped
    }
}

impl DocSet for DeadlineScorer {
    fn advance(&mut self) -> DocId {
        if self.tick() {
            return TERMINATED;
        }
        self.inner.advance()
    }

    fn seek(&mut self, target: DocId) -> DocId {
        if self.tick() {
            return TERMINATED;
        }
        self.inner.seek(target)
    }

    fn doc(&self) -> DocId {
        if self.stopped { TERMINATED } else { self.inner.doc() }
    }

    fn size_hint(&self) -> u32 {
        self.inner.size_hint()
    }
}

impl Scorer for DeadlineScorer {
    fn score(&mut self) -> Score {
        self.inner.score()
    }
}

/// Fields a query may name (besides `fields.NAME` and `tenant`).
pub const QUERY_FIELDS: [&str; 5] = ["message", "level", "host", "source", "flags"];
/// Fields with a column, which `field:*` (exists) and top terms need.
const COLUMN_FIELDS: [&str; 3] = ["level", "host", "source"];

/// Checks a parsed query: known fields only, the caller's tenants only,
/// and within the size caps.
fn check_query(ast: &UserInputAst, tenants: &[String]) -> Result<(), SearchError> {
    let mut leaves = 0usize;
    check_ast(ast, tenants, &mut leaves)
}

fn check_ast(ast: &UserInputAst, tenants: &[String], leaves: &mut usize) -> Result<(), SearchError> {
    match ast {
        UserInputAst::Clause(clauses) => {
            clauses.iter().try_for_each(|(_, clause)| check_ast(clause, tenants, leaves))
        }
        UserInputAst::Boost(inner, _) => check_ast(inner, tenants, leaves),
        UserInputAst::Leaf(leaf) => {
            *leaves += 1;
            if *leaves > MAX_QUERY_LEAVES {
                return Err(SearchError::BadQuery(format!(
                    "the query has more than {MAX_QUERY_LEAVES} terms; split it"
                )));
            }
            check_leaf(leaf, tenants)
        }
    }
}

fn check_leaf(leaf: &UserInputLeaf, tenants: &[String]) -> Result<(), SearchError> {
    let (field, exists) = match leaf {
        UserInputLeaf::All => return Ok(()),
        UserInputLeaf::Literal(literal) => {
            if literal.field_name.as_deref() == Some("tenant") {
                let named = &literal.phrase;
                if !tenants.iter().any(|tenant| tenant == named) {
                    return Err(SearchError::Forbidden(format!("the token does not cover tenant {named:?}")));
                }
                return Ok(());
            }
            (literal.field_name.as_deref(), false)
        }
        UserInputLeaf::Range { field, .. } | UserInputLeaf::Set { field, .. } => (field.as_deref(), false),
        UserInputLeaf::Regex { field, pattern } => {
            if pattern.len() > MAX_REGEX_BYTES {
                return Err(SearchError::BadQuery(format!(
                    "regular expressions are capped at {MAX_REGEX_BYTES} bytes"
                )));
            }
            (field.as_deref(), false)
        }
        UserInputLeaf::Exists { field } => (Some(field.as_str()), true),
    };
    let Some(field) = field else { return Ok(()) };
    if field == "tenant" {
        return Err(SearchError::BadQuery("tenant takes a single name: tenant:NAME".into()));
    }
    let json_path = field.strip_prefix("fields.").filter(|path| !path.is_empty());
    if json_path.is_some_and(|path| path.chars().any(char::is_control)) {
        return Err(SearchError::BadQuery(format!("field name {field:?} holds a control character")));
    }
    if json_path.is_none() && !QUERY_FIELDS.contains(&field) {
        return Err(SearchError::BadQuery(format!(
            "unknown field {field:?}: fields are {}, tenant and fields.NAME (for the time, use from and to)",
            QUERY_FIELDS.join(", ")
        )));
    }
    if exists && json_path.is_none() && !COLUMN_FIELDS.contains(&field) {
        return Err(SearchError::BadQuery(format!(
            "{field}:* is not supported; it works on {} and fields.NAME",
            COLUMN_FIELDS.join(", ")
        )));
    }
    Ok(())
}

/// All of `clauses`, walked under `deadline`.
/// `query`, stopped at `deadline`.
pub(crate) fn with_deadline(query: Box<dyn Query>, deadline: &Deadline) -> Box<dyn Query> {
    Box::new(DeadlineQuery { inner: query, deadline: deadline.clone() })
}

fn date_term(field: tantivy::schema::Field, ns: i64) -> Term {
    Term::from_field_date(field, DateTime::from_timestamp_nanos(ns))
}

pub(crate) fn must(clauses: Vec<Box<dyn Query>>) -> Box<dyn Query> {
    Box::new(BooleanQuery::new(clauses.into_iter().map(|clause| (Occur::Must, clause)).collect()))
}

impl LogIndex {
    /// The query a filter stands for: the parsed text, the tenant filter
    /// (added here, in code) and the time range.
    pub(crate) fn filter_query(&self, filter: &Filter) -> Result<Vec<Box<dyn Query>>, SearchError> {
        let f = &self.fields;
        let mut clauses: Vec<Box<dyn Query>> = Vec::new();
        let text = filter.query.trim();
        if text.len() > MAX_QUERY_BYTES {
            return Err(SearchError::BadQuery(format!("the query is over {MAX_QUERY_BYTES} bytes")));
        }
        if !text.is_empty() && text != "*" {
            let ast = tantivy::query_grammar::parse_query(text)
                .map_err(|_| SearchError::BadQuery(format!("syntax error in {text:?}")))?;
            check_query(&ast, &filter.tenants)?;
            let mut parser = QueryParser::for_index(&self.index, vec![f.message]);
            parser.set_conjunction_by_default();
            let parsed = parser.parse_query(text).map_err(|e| SearchError::BadQuery(e.to_string()))?;
            clauses.push(parsed);
        } else {
            clauses.push(Box::new(AllQuery));
        }
        if filter.tenants.is_empty() {
            return Err(SearchError::Internal("no tenant to search".into()));
        }
        let tenants: Vec<(Occur, Box<dyn Query>)> = filter
            .tenants
            .iter()
            .map(|tenant| {
                let term = Term::from_field_text(f.tenant, tenant);
                (Occur::Should, Box::new(TermQuery::new(term, IndexRecordOption::Basic)) as Box<dyn Query>)
            })
            .collect();
        clauses.push(Box::new(BooleanQuery::new(tenants)));
        if filter.from_ns.is_some() || filter.to_ns.is_some() {
            let lower =
                filter.from_ns.map_or(Bound::Unbounded, |ns| Bound::Included(date_term(f.timestamp, ns)));
            let upper =
                filter.to_ns.map_or(Bound::Unbounded, |ns| Bound::Excluded(date_term(f.timestamp, ns)));
            clauses.push(Box::new(RangeQuery::new(lower, upper)));
        }
        Ok(clauses)
    }

    fn id_range(&self, lower: Bound<u64>, upper: Bound<u64>) -> Box<dyn Query> {
        let term = |id: u64| Term::from_field_u64(self.fields.id, id);
        Box::new(RangeQuery::new(lower.map(term), upper.map(term)))
    }

    /// The id the next indexed record will get, as far as `searcher` sees.
    fn next_id(searcher: &Searcher) -> Result<u64, SearchError> {
        let mut next = 0;
        for segment in searcher.segment_readers() {
            if segment.num_docs() == 0 {
                continue;
            }
            let ids = segment.fast_fields().u64("id").map_err(internal)?;
            next = next.max(ids.max_value() + 1);
        }
        Ok(next)
    }

    pub(crate) fn load_hits(
        &self,
        searcher: &Searcher,
        addresses: impl IntoIterator<Item = tantivy::DocAddress>,
    ) -> Result<Vec<Hit>, SearchError> {
        addresses
            .into_iter()
            .map(|address| {
                let doc: TantivyDocument = searcher.doc(address).map_err(internal)?;
                let blob = doc.get_first(self.fields.hit).and_then(|v| v.as_bytes()).unwrap_or_default();
                crate::index::decode_hit(blob)
                    .ok_or_else(|| SearchError::Internal("a stored hit does not decode".into()))
            })
            .collect()
    }

    /// The other collectors' splits that may match `filter` (none without
    /// a shared bucket), fetched as needed. Blocking.
    pub(crate) fn remote_searchers(&self, filter: &Filter) -> Vec<crate::splits::RemoteSplit> {
        match self.splits.get() {
            Some(splits) => splits.searchers(&filter.tenants, filter.from_ns, filter.to_ns),
            None => Vec::new(),
        }
    }

    /// A read of `split` failed during a search: it is left out of
    /// searches for a while.
    pub(crate) fn split_failed(&self, split: &crate::splits::RemoteSplit, err: &dyn std::fmt::Display) {
        if let Some(splits) = self.splits.get() {
            splits.failed_during_search(split, &err.to_string());
        }
    }

    /// `base` on a split: without the records its publisher's retention
    /// no longer keeps.
    pub(crate) fn on_split(&self, base: &dyn Query, split: &crate::splits::RemoteSplit) -> Box<dyn Query> {
        match split.not_before {
            Some(ns) => must(vec![
                base.box_clone(),
                Box::new(RangeQuery::new(
                    Bound::Included(date_term(self.fields.timestamp, ns)),
                    Bound::Unbounded,
                )),
            ]),
            None => base.box_clone(),
        }
    }

    /// `base` limited to the records strictly after `cursor` in
    /// (timestamp, id) order.
    fn after_cursor(&self, base: &dyn Query, cursor: Option<Cursor>, order: SortOrder) -> Box<dyn Query> {
        let Some(cursor) = cursor else { return base.box_clone() };
        let at = date_term(self.fields.timestamp, cursor.timestamp_ns);
        let (earlier_time, same_time_id): (Box<dyn Query>, Box<dyn Query>) = match order {
            SortOrder::Desc => (
                Box::new(RangeQuery::new(Bound::Unbounded, Bound::Excluded(at.clone()))),
                self.id_range(Bound::Unbounded, Bound::Excluded(cursor.id)),
            ),
            SortOrder::Asc => (
                Box::new(RangeQuery::new(Bound::Excluded(at.clone()), Bound::Unbounded)),
                self.id_range(Bound::Excluded(cursor.id), Bound::Unbounded),
            ),
        };
        let same_time = must(vec![
            Box::new(RangeQuery::new(Bound::Included(at.clone()), Bound::Included(at))),
            same_time_id,
        ]);
        let after = BooleanQuery::new(vec![(Occur::Should, earlier_time), (Occur::Should, same_time)]);
        must(vec![base.box_clone(), Box::new(after)])
    }

    /// Runs a search over this collector's records and, when it shares a
    /// bucket, the other collectors' splits. Blocking: call from
    /// `spawn_blocking`.
    pub fn search(
        &self,
        request: &SearchRequest,
        deadline: &Deadline,
    ) -> Result<SearchResponse, SearchError> {
        let mut clauses = self.filter_query(&request.filter)?;
        let searcher = self.reader.searcher();
        let remote = self.remote_searchers(&request.filter);
        // A split never changes; this collector's own records are kept
        // below the first page's snapshot, this collector's next id. (Each
        // collector's ids carry its tag in their top bits, so a bound over
        // every collector's ids would bound nothing here once a peer's tag
        // is the higher.)
        let remote_base = must(self.filter_query(&request.filter)?);
        let snapshot = match request.cursor {
            Some(cursor) => {
                clauses.push(self.id_range(Bound::Unbounded, Bound::Excluded(cursor.snapshot)));
                cursor.snapshot
            }
            None => Self::next_id(&searcher)?.max(self.splits.get().map_or(0, |splits| splits.id_base())),
        };
        let base = must(clauses);
        let order = match request.order {
            SortOrder::Desc => Order::Desc,
            SortOrder::Asc => Order::Asc,
        };
        let top = TopDocs::with_limit(request.limit + 1).order_by((
            (SortByStaticFastValue::<DateTime>::for_field("timestamp"), order),
            (SortByStaticFastValue::<u64>::for_field("id"), order),
        ));
        let mut total = 0u64;
        // (sort key, searcher, address) of every searcher's best.
        let mut best = Vec::new();
        let remote_bases: Vec<Box<dyn Query>> =
            remote.iter().map(|split| self.on_split(&*remote_base, split)).collect();
        let searchers = std::iter::once((&searcher, &base))
            .chain(remote.iter().zip(&remote_bases).map(|(split, base)| (&split.searcher, base)));
        for (n, (searcher, base)) in searchers.enumerate() {
            let total_query = DeadlineQuery { inner: base.box_clone(), deadline: deadline.clone() };
            let page_query = DeadlineQuery {
                inner: self.after_cursor(&**base, request.cursor, request.order),
                deadline: deadline.clone(),
            };
            let searched = searcher
                .search(&total_query, &Count)
                .and_then(|count| searcher.search(&page_query, &top).map(|found| (count, found)));
            let (count, found) = match searched {
                Ok(searched) => searched,
                Err(err) if n == 0 => return Err(internal(err)),
                // A split whose bytes cannot be read now is left out.
                Err(err) => {
                    deadline.check()?;
                    self.split_failed(&remote[n - 1], &err);
                    continue;
                }
            };
            total += count as u64;
            best.extend(found.into_iter().map(|(key, address)| (key, n, address)));
            deadline.check()?;
        }
        best.sort_by(|(a, _, _), (b, _, _)| match request.order {
            SortOrder::Asc => a.cmp(b),
            SortOrder::Desc => b.cmp(a),
        });
        let more = best.len() > request.limit;
        best.truncate(request.limit);
        let cursor = match best.last() {
            Some(((Some(timestamp), Some(id)), _, _)) if more => {
                Some(Cursor { timestamp_ns: timestamp.into_timestamp_nanos(), id: *id, snapshot }.encode())
            }
            _ => None,
        };
        let mut hits = Vec::with_capacity(best.len());
        for (_, n, address) in best {
            let searcher = if n == 0 { &searcher } else { &remote[n - 1].searcher };
            hits.extend(self.load_hits(searcher, [address])?);
        }
        Ok(SearchResponse { total, hits, cursor })
    }

    /// Matching records with ids from `from_id` on, oldest first, at most
    /// `limit` (the live tail). With `from_id` None, starts after the
    /// newest record.
    pub fn since(
        &self,
        filter: &Filter,
        from_id: Option<u64>,
        limit: usize,
        deadline: &Deadline,
    ) -> Result<NewHits, SearchError> {
        let mut clauses = self.filter_query(filter)?;
        let searcher = self.reader.searcher();
        let from_id = match from_id {
            Some(id) => id,
            None => return Ok(NewHits { hits: Vec::new(), next_id: Self::next_id(&searcher)? }),
        };
        clauses.push(self.id_range(Bound::Included(from_id), Bound::Unbounded));
        let query = DeadlineQuery { inner: must(clauses), deadline: deadline.clone() };
        let top = TopDocs::with_limit(limit.max(1))
            .order_by((SortByStaticFastValue::<u64>::for_field("id"), Order::Asc));
        let top = searcher.search(&query, &top).map_err(internal)?;
        deadline.check()?;
        let next_id = match top.last() {
            Some((Some(id), _)) if top.len() >= limit.max(1) => id + 1,
            // Everything matching was read: go on from what the searcher
            // has seen, so the next poll skips non-matching records.
            _ => Self::next_id(&searcher)?.max(from_id),
        };
        let hits = self.load_hits(&searcher, top.into_iter().map(|(_, address)| address))?;
        Ok(NewHits { hits, next_id })
    }

    /// The record `id` (if the caller's tenants cover it) and up to
    /// `before` and `after` records around it in the same stream.
    pub fn context(
        &self,
        tenants: &[String],
        id: u64,
        before: usize,
        after: usize,
        deadline: &Deadline,
    ) -> Result<Option<Context>, SearchError> {
        let f = &self.fields;
        let filter = Filter { tenants: tenants.to_vec(), query: String::new(), from_ns: None, to_ns: None };
        let searcher = self.reader.searcher();
        let mut clauses = self.filter_query(&filter)?;
        clauses.push(self.id_range(Bound::Included(id), Bound::Included(id)));
        let found =
            searcher.search(&must(clauses), &TopDocs::with_limit(1).order_by_score()).map_err(internal)?;
        let Some(hit) = self.load_hits(&searcher, found.into_iter().map(|(_, address)| address))?.pop()
        else {
            return Ok(None);
        };
        let stream = |lower: Bound<u64>, upper: Bound<u64>| -> Result<Box<dyn Query>, SearchError> {
            let mut clauses = self.filter_query(&filter)?;
            clauses.push(Box::new(TermQuery::new(
                Term::from_field_text(f.host, &hit.host),
                IndexRecordOption::Basic,
            )));
            clauses.push(Box::new(TermQuery::new(
                Term::from_field_text(f.source, &hit.source),
                IndexRecordOption::Basic,
            )));
            clauses.push(self.id_range(lower, upper));
            Ok(Box::new(DeadlineQuery { inner: must(clauses), deadline: deadline.clone() }))
        };
        let by_id = |limit: usize, order| {
            TopDocs::with_limit(limit.max(1)).order_by((SortByStaticFastValue::<u64>::for_field("id"), order))
        };
        let mut earlier = if before == 0 {
            Vec::new()
        } else {
            let top = searcher
                .search(&*stream(Bound::Unbounded, Bound::Excluded(id))?, &by_id(before, Order::Desc))
                .map_err(internal)?;
            self.load_hits(&searcher, top.into_iter().map(|(_, address)| address))?
        };
        earlier.reverse();
        let later = if after == 0 {
            Vec::new()
        } else {
            let top = searcher
                .search(&*stream(Bound::Excluded(id), Bound::Unbounded)?, &by_id(after, Order::Asc))
                .map_err(internal)?;
            self.load_hits(&searcher, top.into_iter().map(|(_, address)| address))?
        };
        deadline.check()?;
        Ok(Some(Context { hit, before: earlier, after: later }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<(), SearchError> {
        let ast = tantivy::query_grammar::parse_query(text).expect("parses");
        check_query(&ast, &["acme".to_owned()])
    }

    #[test]
    fn only_record_fields_and_own_tenants_may_be_named() {
        check("error AND level:warn host:web-1 source:app fields.user:alice flags:truncated").unwrap();
        check("fields.user:* level:*").unwrap();
        check("tenant:acme").unwrap();
        assert!(matches!(check("tenant:other"), Err(SearchError::Forbidden(_))));
        let Err(SearchError::BadQuery(message)) = check("nosuch:x") else { panic!("accepted") };
        assert!(message.contains("\"nosuch\""), "{message}");
        assert!(matches!(check("timestamp:[a TO b]"), Err(SearchError::BadQuery(_))));
        assert!(matches!(check("message:*"), Err(SearchError::BadQuery(_))));
        assert!(matches!(check("fields.:x"), Err(SearchError::BadQuery(_))));
        let many: Vec<String> = (0..=MAX_QUERY_LEAVES).map(|i| format!("word{i}")).collect();
        let many = many.join(" ");
        assert!(matches!(check(&many), Err(SearchError::BadQuery(_))));
    }

    /// An index of `count` records of tenant `acme`, written directly.
    fn index_of(count: u64) -> (LogIndex, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("logvault-search-{}-{count}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let index = LogIndex::open(&dir).unwrap();
        let mut writer = index.writer().unwrap();
        let f = index.fields;
        for id in 0..count {
            let mut doc = TantivyDocument::new();
            doc.add_date(f.timestamp, DateTime::from_timestamp_nanos(id as i64 * 1_000_000));
            doc.add_u64(f.id, id);
            doc.add_text(f.tenant, "acme");
            doc.add_text(f.message, "a line");
            let hit = Hit {
                id: id.to_string(),
                timestamp: crate::time::format_ns(id as i64 * 1_000_000),
                received: String::new(),
                tenant: "acme".into(),
                host: "h".into(),
                source: "s".into(),
                epoch: 1,
                seq: id,
                level: "info".into(),
                message: "a line".into(),
                fields: serde_json::Map::new(),
                flags: Vec::new(),
            };
            doc.add_bytes(f.hit, &serde_json::to_vec(&hit).unwrap());
            writer.add_document(doc).unwrap();
        }
        index.commit(&mut writer, crate::index::IndexedUpTo { position: 1, next_id: count }).unwrap();
        (index, dir)
    }

    #[test]
    fn a_query_past_its_deadline_stops_and_says_so() {
        let (index, dir) = index_of(300_000);
        let filter =
            Filter { tenants: vec!["acme".into()], query: "line".into(), from_ns: None, to_ns: None };
        let request =
            SearchRequest { filter: filter.clone(), limit: 10, order: SortOrder::Desc, cursor: None };
        let found = index.search(&request, &Deadline::after_ms(60_000)).unwrap();
        assert_eq!(found.total, 300_000);
        // The walk over 300,000 matches is cut at the deadline.
        let started = Instant::now();
        assert!(matches!(index.search(&request, &Deadline::after_ms(1)), Err(SearchError::Timeout(1))));
        assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
        assert!(matches!(
            index.aggregate(&filter, None, &[], &Deadline::after_ms(1)),
            Err(SearchError::Timeout(1))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let cursor = Cursor { timestamp_ns: -5, id: 7, snapshot: 9 };
        assert_eq!(Cursor::decode(&cursor.encode()).unwrap(), cursor);
        for bad in ["", "1.2", "a.b.c", "1.9.9", "1.2.3.4"] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
        // Another collector's hit may carry a higher tag than the
        // snapshot, this collector's next id; one of this collector's
        // at or above the snapshot is refused.
        let own = 5 << ID_TAG_SHIFT;
        let peer = Cursor { timestamp_ns: 1, id: (9 << ID_TAG_SHIFT) + 3, snapshot: own + 100 };
        assert_eq!(Cursor::decode(&peer.encode()).unwrap(), peer);
        assert!(Cursor::decode(&format!("1.{}.{}", own + 100, own + 100)).is_err());
    }
}
