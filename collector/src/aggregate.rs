//! Aggregations over a search's matches: a date histogram and top terms.
//!
//! Both read fast columns only (the timestamp; level, host, source and
//! `fields.*` values), never the stored records, and run in the same pass
//! as the exact count, so every bucket count comes from one snapshot and
//! the histogram's buckets add up to the total.

use std::collections::HashMap;

use serde::Serialize;
use tantivy::collector::{Collector, Count, SegmentCollector};
use tantivy::columnar::{Column, StrColumn};
use tantivy::{DateTime, DocId, Score, SegmentOrdinal, SegmentReader};

use crate::index::LogIndex;
use crate::search::{Deadline, Filter, SearchError};

/// Most histogram buckets one request may ask for.
pub const MAX_BUCKETS: u64 = 10_000;
/// Buckets an automatic interval aims at, at most.
pub const AUTO_BUCKETS: u64 = 120;
/// Most terms aggregations in one request.
pub const MAX_TERMS_AGGREGATIONS: usize = 8;
/// Largest top-N.
pub const MAX_TERMS_SIZE: usize = 1000;
/// Most distinct values a terms aggregation counts in one segment.
pub const MAX_DISTINCT_VALUES: usize = 5_000_000;

const NS_PER_MS: i64 = 1_000_000;
/// Intervals an automatic histogram picks from, in milliseconds.
const NICE_INTERVALS_MS: [i64; 20] = [
    1,
    10,
    100,
    1_000,
    5_000,
    10_000,
    30_000,
    60_000,
    300_000,
    600_000,
    900_000,
    1_800_000,
    3_600_000,
    3 * 3_600_000,
    6 * 3_600_000,
    12 * 3_600_000,
    86_400_000,
    7 * 86_400_000,
    30 * 86_400_000,
    365 * 86_400_000,
];

/// A histogram request: `interval` like `1m`, `5s`, `1h`, or `auto`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HistogramRequest {
    /// `auto` (default) or a duration: a number and a unit of ms, s, m,
    /// h or d.
    #[serde(default)]
    pub interval: Option<String>,
}

/// A terms request.
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TermsRequest {
    /// `level`, `host`, `source` or `fields.NAME`.
    pub field: String,
    /// How many of the most frequent values (default 10).
    #[serde(default)]
    pub size: Option<usize>,
}

/// One histogram bucket: `[start, start + interval)`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Bucket {
    /// RFC 3339.
    pub start: String,
    /// Milliseconds since the epoch.
    pub start_ms: i64,
    /// Matching records in the bucket.
    pub count: u64,
}

/// A date histogram of the matches.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Histogram {
    /// Bucket width in milliseconds.
    pub interval_ms: i64,
    /// Every bucket from the first match (or `from`) to the last (or `to`),
    /// empty ones included; their counts add up to the total.
    pub buckets: Vec<Bucket>,
}

/// One value and how many matches have it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TermCount {
    /// The value.
    pub value: String,
    /// Matches with it.
    pub count: u64,
}

/// The most frequent values of one field among the matches.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Terms {
    /// The field.
    pub field: String,
    /// The top values, most frequent first (ties by value).
    pub buckets: Vec<TermCount>,
    /// Matches with a value not in `buckets`.
    pub other: u64,
    /// Matches without the field.
    pub missing: u64,
}

/// What an aggregation found.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AggregateResponse {
    /// Exact number of matching records.
    pub total: u64,
    /// Present when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub histogram: Option<Histogram>,
    /// One per terms request, in order.
    #[serde(default)]
    pub terms: Vec<Terms>,
}

/// Parses `auto` (None) or a duration such as `30s` into milliseconds.
pub fn parse_interval(text: &str) -> Result<Option<i64>, SearchError> {
    let text = text.trim();
    if text.is_empty() || text == "auto" {
        return Ok(None);
    }
    let bad = || {
        SearchError::BadQuery(format!("bad interval {text:?}: use auto or a duration such as 1m, 30s, 1h"))
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (amount, unit) = text.split_at(split);
    let amount: i64 = amount.parse().map_err(|_| bad())?;
    let unit_ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    match amount.checked_mul(unit_ms) {
        Some(ms) if ms > 0 => Ok(Some(ms)),
        _ => Err(bad()),
    }
}

/// The smallest nice interval giving at most [`AUTO_BUCKETS`] buckets.
fn auto_interval_ms(span_ns: i64) -> i64 {
    let span_ms = span_ns / NS_PER_MS + 1;
    NICE_INTERVALS_MS
        .iter()
        .copied()
        .find(|interval| span_ms / interval < AUTO_BUCKETS as i64)
        .unwrap_or(NICE_INTERVALS_MS[NICE_INTERVALS_MS.len() - 1])
}

/// Counts matches per bucket of `interval_ns` starting at `start_ns`.
struct HistogramCollector {
    start_ns: i64,
    interval_ns: i64,
    buckets: usize,
}

struct HistogramSegment {
    timestamps: Column<DateTime>,
    start_ns: i64,
    interval_ns: i64,
    counts: Vec<u64>,
    /// Matches outside the buckets (cannot happen when the range came
    /// from the data; counted so a mistake shows rather than vanishes).
    outside: u64,
}

impl Collector for HistogramCollector {
    type Fruit = (Vec<u64>, u64);
    type Child = HistogramSegment;

    fn for_segment(&self, _: SegmentOrdinal, segment: &SegmentReader) -> tantivy::Result<HistogramSegment> {
        Ok(HistogramSegment {
            timestamps: segment.fast_fields().date("timestamp")?,
            start_ns: self.start_ns,
            interval_ns: self.interval_ns,
            counts: vec![0; self.buckets],
            outside: 0,
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<(Vec<u64>, u64)>) -> tantivy::Result<(Vec<u64>, u64)> {
        let mut counts = vec![0; self.buckets];
        let mut outside = 0;
        for (segment_counts, segment_outside) in fruits {
            for (total, count) in counts.iter_mut().zip(segment_counts) {
                *total += count;
            }
            outside += segment_outside;
        }
        Ok((counts, outside))
    }
}

impl SegmentCollector for HistogramSegment {
    type Fruit = (Vec<u64>, u64);

    fn collect(&mut self, doc: DocId, _: Score) {
        let Some(timestamp) = self.timestamps.first(doc) else {
            self.outside += 1;
            return;
        };
        let offset = timestamp.into_timestamp_nanos().saturating_sub(self.start_ns);
        match usize::try_from(offset.div_euclid(self.interval_ns)).ok().and_then(|i| self.counts.get_mut(i)) {
            Some(count) => *count += 1,
            None => self.outside += 1,
        }
    }

    fn harvest(self) -> (Vec<u64>, u64) {
        (self.counts, self.outside)
    }
}

/// The oldest and newest timestamp among the matches.
struct TimeSpan;

struct TimeSpanSegment {
    timestamps: Column<DateTime>,
    oldest: i64,
    newest: i64,
}

impl Collector for TimeSpan {
    type Fruit = (i64, i64);
    type Child = TimeSpanSegment;

    fn for_segment(&self, _: SegmentOrdinal, segment: &SegmentReader) -> tantivy::Result<TimeSpanSegment> {
        Ok(TimeSpanSegment {
            timestamps: segment.fast_fields().date("timestamp")?,
            oldest: i64::MAX,
            newest: i64::MIN,
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<(i64, i64)>) -> tantivy::Result<(i64, i64)> {
        Ok(fruits.into_iter().fold((i64::MAX, i64::MIN), |(a, b), (c, d)| (a.min(c), b.max(d))))
    }
}

impl SegmentCollector for TimeSpanSegment {
    type Fruit = (i64, i64);

    fn collect(&mut self, doc: DocId, _: Score) {
        if let Some(timestamp) = self.timestamps.first(doc) {
            let ns = timestamp.into_timestamp_nanos();
            self.oldest = self.oldest.min(ns);
            self.newest = self.newest.max(ns);
        }
    }

    fn harvest(self) -> (i64, i64) {
        (self.oldest, self.newest)
    }
}

/// Counts matches per value of some string columns.
struct TermsCollector {
    columns: Vec<String>,
}

struct TermsSegment {
    columns: Vec<ColumnCounts>,
}

struct ColumnCounts {
    column: Option<StrColumn>,
    counts: Vec<u64>,
    missing: u64,
}

/// Counts by value, and matches without the field.
type TermsFruit = (HashMap<String, u64>, u64);

impl Collector for TermsCollector {
    type Fruit = Vec<TermsFruit>;
    type Child = TermsSegment;

    fn for_segment(&self, _: SegmentOrdinal, segment: &SegmentReader) -> tantivy::Result<TermsSegment> {
        let columns = self
            .columns
            .iter()
            .map(|name| {
                let column = segment.fast_fields().str(name)?;
                let distinct = column.as_ref().map_or(0, |column| column.num_terms());
                if distinct > MAX_DISTINCT_VALUES {
                    return Err(tantivy::TantivyError::InvalidArgument(format!(
                        "{name} has more than {MAX_DISTINCT_VALUES} distinct values"
                    )));
                }
                Ok(ColumnCounts { column, counts: vec![0; distinct], missing: 0 })
            })
            .collect::<tantivy::Result<Vec<_>>>()?;
        Ok(TermsSegment { columns })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(&self, fruits: Vec<Vec<TermsFruit>>) -> tantivy::Result<Vec<TermsFruit>> {
        let mut merged: Vec<TermsFruit> = self.columns.iter().map(|_| (HashMap::new(), 0)).collect();
        for segment in fruits {
            for ((counts, missing), (segment_counts, segment_missing)) in merged.iter_mut().zip(segment) {
                for (value, count) in segment_counts {
                    *counts.entry(value).or_default() += count;
                }
                *missing += segment_missing;
            }
        }
        Ok(merged)
    }
}

impl SegmentCollector for TermsSegment {
    type Fruit = Vec<TermsFruit>;

    fn collect(&mut self, doc: DocId, _: Score) {
        for counts in &mut self.columns {
            counts.collect(doc);
        }
    }

    fn harvest(self) -> Vec<TermsFruit> {
        self.columns.into_iter().map(ColumnCounts::harvest).collect()
    }
}

impl ColumnCounts {
    fn collect(&mut self, doc: DocId) {
        let Some(column) = &self.column else {
            self.missing += 1;
            return;
        };
        let mut any = false;
        for ord in column.term_ords(doc) {
            any = true;
            if let Some(count) = self.counts.get_mut(ord as usize) {
                *count += 1;
            }
        }
        if !any {
            self.missing += 1;
        }
    }

    fn harvest(self) -> TermsFruit {
        let mut by_value = HashMap::new();
        if let Some(column) = &self.column {
            let mut value = String::new();
            for (ord, count) in self.counts.into_iter().enumerate() {
                if count == 0 {
                    continue;
                }
                value.clear();
                if column.ord_to_str(ord as u64, &mut value).unwrap_or(false) {
                    by_value.insert(value.clone(), count);
                }
            }
        }
        (by_value, self.missing)
    }
}

/// The column a terms request reads.
fn terms_column(field: &str) -> Result<String, SearchError> {
    match field {
        "level" | "host" | "source" => Ok(field.to_owned()),
        _ => match field.strip_prefix("fields.") {
            Some(path) if !path.is_empty() => Ok(field.to_owned()),
            _ => Err(SearchError::BadQuery(format!(
                "terms work on level, host, source and fields.NAME, not {field:?}"
            ))),
        },
    }
}

impl LogIndex {
    /// Counts the filter's matches, with a histogram and top terms when
    /// asked. Blocking: call from `spawn_blocking`.
    pub fn aggregate(
        &self,
        filter: &Filter,
        histogram: Option<&HistogramRequest>,
        terms: &[TermsRequest],
        deadline: &Deadline,
    ) -> Result<AggregateResponse, SearchError> {
        if terms.len() > MAX_TERMS_AGGREGATIONS {
            return Err(SearchError::BadQuery(format!(
                "at most {MAX_TERMS_AGGREGATIONS} terms aggregations"
            )));
        }
        let columns = terms
            .iter()
            .map(|request| {
                let size = request.size.unwrap_or(10);
                if size == 0 || size > MAX_TERMS_SIZE {
                    return Err(SearchError::BadQuery(format!("terms size must be 1 to {MAX_TERMS_SIZE}")));
                }
                terms_column(&request.field)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let terms_collector = TermsCollector { columns };
        let clauses = self.filter_query(filter)?;
        let base: Box<dyn tantivy::query::Query> =
            Box::new(tantivy::query::BooleanQuery::intersection(clauses));
        // This collector's records, and the other collectors' splits (each
        // without what its publisher's retention dropped).
        let remote = self.remote_searchers(filter);
        let mut searchers = vec![(self.reader.searcher(), base.box_clone())];
        for split in &remote {
            let query = self.on_split(&*base, split);
            searchers.push((split.searcher.clone(), query));
        }
        let searchers: Vec<(tantivy::Searcher, Box<dyn tantivy::query::Query>)> = searchers
            .into_iter()
            .map(|(searcher, query)| (searcher, crate::search::with_deadline(query, deadline)))
            .collect();
        let histogram_collector = match histogram {
            None => None,
            Some(request) => Some(self.histogram_layout(&searchers, filter, request)?),
        };
        let map_err = |e: tantivy::TantivyError| match e {
            tantivy::TantivyError::InvalidArgument(message) => SearchError::BadQuery(message),
            other => SearchError::Internal(other.to_string()),
        };
        let collector = (Count, histogram_collector.as_ref().map(|c| c.0.clone_layout()), terms_collector);
        let mut fruits = Vec::with_capacity(searchers.len());
        for (n, (searcher, query)) in searchers.iter().enumerate() {
            match searcher.search(&**query, &collector) {
                Ok(fruit) => fruits.push(fruit),
                Err(err) if n == 0 || matches!(err, tantivy::TantivyError::InvalidArgument(_)) => {
                    return Err(map_err(err));
                }
                // A split whose bytes cannot be read now is left out.
                Err(err) => {
                    deadline.check()?;
                    self.split_failed(&remote[n - 1], &err);
                }
            }
        }
        let (total, histogram_fruit, terms_fruits) = collector.merge_fruits(fruits).map_err(map_err)?;
        deadline.check()?;
        let histogram = match (histogram_collector, histogram_fruit) {
            (Some((layout, interval_ms)), Some((counts, outside))) => {
                if outside > 0 {
                    tracing::warn!(outside, "histogram matches outside its buckets");
                }
                let buckets = counts
                    .into_iter()
                    .enumerate()
                    .map(|(i, count)| {
                        let start_ns = layout.start_ns + i as i64 * layout.interval_ns;
                        Bucket {
                            start: crate::time::format_ns(start_ns),
                            start_ms: start_ns.div_euclid(NS_PER_MS),
                            count,
                        }
                    })
                    .collect();
                Some(Histogram { interval_ms, buckets })
            }
            _ => None,
        };
        let terms = terms
            .iter()
            .zip(terms_fruits)
            .map(|(request, (counts, missing))| {
                let size = request.size.unwrap_or(10);
                let mut sorted: Vec<(String, u64)> = counts.into_iter().collect();
                sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                let other = sorted.iter().skip(size).map(|(_, count)| count).sum();
                sorted.truncate(size);
                Terms {
                    field: request.field.clone(),
                    buckets: sorted.into_iter().map(|(value, count)| TermCount { value, count }).collect(),
                    other,
                    missing,
                }
            })
            .collect();
        Ok(AggregateResponse { total: total as u64, histogram, terms })
    }

    /// Where the buckets go: from `from` (or the oldest record) to `to`
    /// (or the newest), at the asked or an automatic interval, aligned to
    /// multiples of the interval since the epoch.
    fn histogram_layout(
        &self,
        searchers: &[(tantivy::Searcher, Box<dyn tantivy::query::Query>)],
        filter: &Filter,
        request: &HistogramRequest,
    ) -> Result<(HistogramCollector, i64), SearchError> {
        // The span of the matches themselves, read from the timestamp
        // column (a pass over the matches, no stored record is read).
        let (oldest, newest) = if filter.from_ns.is_some() && filter.to_ns.is_some() {
            (i64::MAX, i64::MIN)
        } else {
            let spans = searchers
                .iter()
                .map(|(searcher, query)| searcher.search(&**query, &TimeSpan))
                .collect::<tantivy::Result<Vec<_>>>()
                .map_err(|e| SearchError::Internal(e.to_string()))?;
            TimeSpan.merge_fruits(spans).map_err(|e| SearchError::Internal(e.to_string()))?
        };
        let start =
            filter.from_ns.map_or(oldest, |from| if oldest == i64::MAX { from } else { from.max(oldest) });
        // `to` is exclusive; the newest record is inclusive.
        let end =
            filter.to_ns.map_or(newest, |to| if newest == i64::MIN { to - 1 } else { (to - 1).min(newest) });
        let (start, end) = if start > end { (start, start) } else { (start, end) };
        let interval_ms = match parse_interval(request.interval.as_deref().unwrap_or("auto"))? {
            Some(ms) => ms,
            None => auto_interval_ms(end.saturating_sub(start)),
        };
        let interval_ns = interval_ms.saturating_mul(NS_PER_MS);
        let first = start.div_euclid(interval_ns);
        let last = end.div_euclid(interval_ns);
        let buckets = u64::try_from(last - first + 1).unwrap_or(u64::MAX);
        if buckets > MAX_BUCKETS {
            return Err(SearchError::BadQuery(format!(
                "{buckets} buckets of {interval_ms} ms is over the cap of {MAX_BUCKETS}; use a wider interval or a narrower time range"
            )));
        }
        Ok((
            HistogramCollector { start_ns: first * interval_ns, interval_ns, buckets: buckets as usize },
            interval_ms,
        ))
    }
}

impl HistogramCollector {
    fn clone_layout(&self) -> HistogramCollector {
        HistogramCollector { start_ns: self.start_ns, interval_ns: self.interval_ns, buckets: self.buckets }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_and_auto_picks_a_nice_one() {
        assert_eq!(parse_interval("auto").unwrap(), None);
        assert_eq!(parse_interval("1m").unwrap(), Some(60_000));
        assert_eq!(parse_interval("250ms").unwrap(), Some(250));
        for bad in ["0s", "1y", "m", "-1m", "99999999999999999999d"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
        assert_eq!(auto_interval_ms(0), 1);
        assert_eq!(auto_interval_ms(86_400 * 1_000_000_000), 900_000);
        assert_eq!(auto_interval_ms(i64::MAX), 365 * 86_400_000);
    }
}
