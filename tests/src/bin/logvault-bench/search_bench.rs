//! `logvault-bench search`: query latency over an index of generated
//! records (the loghub templates filled with values from the samples,
//! spread evenly over one day), built with the collector's own indexing
//! code and searched with the code the API runs (`LogIndex::search` and
//! `LogIndex::aggregate`, in process: the figures leave out HTTPS).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use logvault_collector::aggregate::{HistogramRequest, TermsRequest};
use logvault_collector::index::{IndexedUpTo, LogIndex};
use logvault_collector::search::{Deadline, Filter, SearchRequest, SortOrder};
use logvault_e2e::generator::Generator;
use logvault_storage::{BatchBuilder, Level, WireRecord};

/// 2026-11-23T00:00:00Z.
const DAY_START_NS: i64 = 1_795_392_000_000_000_000;
const DAY_NS: i64 = 86_400_000_000_000;
const BATCH_RECORDS: u32 = 5000;
const RUNS: usize = 30;

pub(crate) struct SearchOptions {
    pub(crate) records: u64,
    pub(crate) dir: PathBuf,
    pub(crate) out: Option<PathBuf>,
}

pub(crate) fn run(options: &SearchOptions) -> Result<(), String> {
    let index_dir = options.dir.join("index");
    let build = build_index(&index_dir, options.records)?;
    let index = LogIndex::open(&index_dir).map_err(|e| e.to_string())?;
    let filter = |query: &str| Filter {
        tenants: vec!["default".into()],
        query: query.into(),
        from_ns: None,
        to_ns: None,
    };
    let search = |query: &str| {
        let request =
            SearchRequest { filter: filter(query), limit: 100, order: SortOrder::Desc, cursor: None };
        index.search(&request, &Deadline::after_ms(60_000)).map(|r| r.total).map_err(|e| e.to_string())
    };
    let mut report = serde_json::Map::new();
    let mut term_times = Vec::new();
    let mut totals = serde_json::Map::new();
    for query in ["PacketResponder", "level:error", "exception", "session", "host:bench-3"] {
        let (times, total) = time_runs(|| search(query))?;
        totals.insert(query.into(), total.into());
        term_times.extend(times);
    }
    let (phrase_times, phrase_total) = time_runs(|| search("\"Receiving block\""))?;
    let day = Filter { from_ns: Some(DAY_START_NS), to_ns: Some(DAY_START_NS + DAY_NS), ..filter("*") };
    let minute = HistogramRequest { interval: Some("1m".into()) };
    let (histogram_times, histogram_total) = time_runs(|| {
        let found = index
            .aggregate(&day, Some(&minute), &[], &Deadline::after_ms(60_000))
            .map_err(|e| e.to_string())?;
        let buckets = found.histogram.map_or(0, |h| h.buckets.len());
        if buckets != 1440 {
            return Err(format!("{buckets} buckets, not 1440"));
        }
        Ok(found.total)
    })?;
    let top = [
        TermsRequest { field: "level".into(), size: Some(10) },
        TermsRequest { field: "source".into(), size: Some(10) },
    ];
    let (terms_times, terms_total) = time_runs(|| {
        index
            .aggregate(&filter("*"), None, &top, &Deadline::after_ms(60_000))
            .map(|r| r.total)
            .map_err(|e| e.to_string())
    })?;
    let ms = |d: Duration| crate::round(d.as_secs_f64() * 1000.0);
    let term_p50 = percentile(&mut term_times, 50);
    let term_p99 = percentile(&mut term_times, 99);
    let histogram_p50 = percentile(&mut histogram_times.clone(), 50);
    report.insert("records".into(), options.records.into());
    report.insert(
        "machine".into(),
        crate::machine(std::thread::available_parallelism().map_or(1, |n| n.get())).into(),
    );
    report.insert(
        "input".into(),
        format!("{} records generated from the loghub templates (seed 1) over one day", options.records)
            .into(),
    );
    report.insert("index_build_s".into(), crate::round(build.as_secs_f64()).into());
    report.insert("search_term_p50_ms".into(), ms(term_p50).into());
    report.insert("search_term_p99_ms".into(), ms(term_p99).into());
    report.insert("search_term_p50_vs_target_20ms".into(), crate::round(ms(term_p50) / 20.0).into());
    report.insert("term_totals".into(), totals.into());
    report.insert("phrase_p50_ms".into(), ms(percentile(&mut phrase_times.clone(), 50)).into());
    report.insert("phrase_p99_ms".into(), ms(percentile(&mut phrase_times.clone(), 99)).into());
    report.insert("phrase_total".into(), phrase_total.into());
    report.insert("histogram_day_ms".into(), ms(histogram_p50).into());
    report.insert("histogram_day_p99_ms".into(), ms(percentile(&mut histogram_times.clone(), 99)).into());
    report.insert("histogram_vs_target_200ms".into(), crate::round(ms(histogram_p50) / 200.0).into());
    report.insert("histogram_total".into(), histogram_total.into());
    report.insert("terms_top10_p50_ms".into(), ms(percentile(&mut terms_times.clone(), 50)).into());
    report.insert("terms_total".into(), terms_total.into());
    // The distributions the report plots: p0, p10 .. p90, p99, p100.
    let mut distributions = serde_json::Map::new();
    for (name, times) in [
        ("term", &mut term_times),
        ("phrase", &mut phrase_times.clone()),
        ("histogram", &mut histogram_times.clone()),
        ("terms", &mut terms_times.clone()),
    ] {
        let points: Vec<f64> = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99, 100]
            .iter()
            .map(|&p| ms(percentile(times, p)))
            .collect();
        distributions.insert(name.into(), points.into());
    }
    report.insert("latency_percentiles_ms".into(), distributions.into());
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(report)).expect("json");
    println!("{text}");
    if let Some(out) = &options.out {
        std::fs::write(out, format!("{text}\n")).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok(())
}

/// Runs `query` once to warm up, then [`RUNS`] times.
fn time_runs(mut query: impl FnMut() -> Result<u64, String>) -> Result<(Vec<Duration>, u64), String> {
    let total = query()?;
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        query()?;
        times.push(start.elapsed());
    }
    Ok((times, total))
}

fn percentile(times: &mut [Duration], p: usize) -> Duration {
    times.sort();
    times[((times.len() - 1) * p).div_ceil(100)]
}

/// Builds the index unless `dir` already holds one of `records` records.
fn build_index(dir: &Path, records: u64) -> Result<Duration, String> {
    if let Ok(index) = LogIndex::open(dir)
        && index.indexed_up_to().next_id == records
    {
        eprintln!("reusing the index of {records} records in {}", dir.display());
        return Ok(Duration::ZERO);
    }
    let _ = std::fs::remove_dir_all(dir);
    let started = Instant::now();
    let index = LogIndex::open(dir).map_err(|e| e.to_string())?;
    let mut feeder = logvault_collector::index::Feeder::new(&index).map_err(|e| e.to_string())?;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?;
    let key = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| e.to_string())?;
    let mut generator = Generator::new(1);
    let mut inflater = logvault_storage::batch::Inflater::new();
    let (mut next_id, mut docs, mut made) = (0u64, Vec::new(), 0u64);
    let mut position = 0;
    while made < records {
        let count = (records - made).min(u64::from(BATCH_RECORDS));
        let host = format!("bench-{}", position % 8);
        let mut builder = BatchBuilder::new(&host, "/var/log/generated.log", 1, made, [0; 32]);
        for i in made..made + count {
            let line = generator.line();
            let timestamp = DAY_START_NS + (i as i128 * DAY_NS as i128 / records as i128) as i64;
            let level = Level::from_word(&line.level).unwrap_or(Level::Unknown);
            builder.push(WireRecord::new(timestamp, level, line.text));
        }
        let entry = logvault_collector::wal::Entry {
            position,
            next: position + 1,
            received_ns: DAY_START_NS + DAY_NS,
            tenant: "default".into(),
            host,
            skip: 0,
            signer: Vec::new(),
            batch: builder.sign(&key),
            void: false,
        };
        index.documents(&entry, &mut inflater, &mut next_id, &mut docs);
        feeder.add(&mut docs).map_err(|e| e.to_string())?;
        made += count;
        position += 1;
        if position % 200 == 0 {
            eprintln!("indexed {made} of {records} records");
        }
    }
    index.commit(feeder.writer(), IndexedUpTo { position, next_id }).map_err(|e| e.to_string())?;
    feeder.into_writer().wait_merging_threads().map_err(|e| e.to_string())?;
    Ok(started.elapsed())
}
