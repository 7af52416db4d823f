//! `logvault-bench cluster`: one, two and three collectors sharing a
//! bucket on a real S3 server (s3s-fs) on this machine's loopback.
//!
//! For each count, the same input goes as signed zstd batches from three
//! connections, spread over the collectors, and the clock runs until every
//! collector finds every record (its own index and the others' published
//! splits). Ingest is reported as input MB per CPU second of all the
//! collectors together (they share the machine's cores) and as wall-clock
//! MB/s. Then the first collector is restarted with an empty split cache
//! and a term query (newest 100) is timed: the first one (cold: the other
//! collectors' splits opened, and the chunks the query reads fetched,
//! decrypted and authenticated, beside the size of those splits whole) and the
//! median of the next twenty (warm), beside the same query on one
//! collector holding everything locally.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::collector_bench::{build_stream, read_lines, send_all};
use crate::{Options, cpu_time, machine, make_input, round};
use logvault_collector::auth::Role;
use logvault_e2e::{Collector, CollectorOptions, RawAgent, S3Server, Setup, bin};

/// Connections sending at once.
const SENDERS: usize = 3;
/// Records per batch, as the collector benchmark makes them.
const BATCH_RECORDS: usize = crate::collector_bench::BATCH_RECORDS;
/// Warm queries timed.
const WARM_QUERIES: usize = 20;
/// The term searched: in the HDFS sample, so in every third of the input.
const TERM: &str = "PacketResponder";

pub(crate) fn run(options: &Options) -> Result<(), String> {
    std::fs::create_dir_all(&options.dir).map_err(|e| format!("{}: {e}", options.dir.display()))?;
    let dir = std::fs::canonicalize(&options.dir).map_err(|e| e.to_string())?;
    let input = dir.join("input");
    let (input_bytes, input_lines) = make_input(&input, options.bytes)?;
    let lines = read_lines(&input)?;
    println!("input: {:.1} MB, {input_lines} lines (8 loghub samples repeated)", input_bytes as f64 / 1e6);
    let mut runs = Vec::new();
    for collectors in 1..=3 {
        runs.push(measure(&dir, &lines, input_bytes, collectors)?);
    }
    let one = runs[0].clone();
    let ratio = |run: &serde_json::Value, key: &str| {
        round(run[key].as_f64().unwrap_or(f64::NAN) / one[key].as_f64().unwrap_or(f64::NAN))
    };
    let mut report = serde_json::json!({
        "machine": machine(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        "input": format!("8 loghub samples repeated to {input_bytes} bytes, {input_lines} lines, in {SENDERS} streams of {BATCH_RECORDS}-record zstd batches, spread over the collectors"),
        "store": "s3s-fs 0.14.1 on loopback",
        "runs": runs,
    });
    for (n, run) in report["runs"].clone().as_array().unwrap().iter().enumerate().skip(1) {
        report[format!("ingest_per_core_{}_vs_1", n + 1)] = ratio(run, "ingest_mb_s_per_core").into();
        report[format!("search_warm_{}_vs_1", n + 1)] = ratio(run, "search_warm_p50_ms").into();
        report[format!("search_cold_{}_vs_1", n + 1)] = ratio(run, "search_cold_ms").into();
    }
    let out = options.out.clone().unwrap_or_else(|| dir.join("report.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap() + "\n")
        .map_err(|e| format!("{}: {e}", out.display()))?;
    println!("report: {}", out.display());
    Ok(())
}

fn measure(
    dir: &Path,
    lines: &[String],
    input_bytes: u64,
    count: usize,
) -> Result<serde_json::Value, String> {
    let mb = input_bytes as f64 / 1e6;
    let setup = Setup::new(&format!("bench-cluster-{count}"));
    let s3 = S3Server::start(setup.path(), "bench");
    let kek = setup.path().join("bench.kek");
    let made = Command::new(bin("logvault"))
        .args(["archive", "keygen", "--id", "bench", "--out"])
        .arg(&kek)
        .output()
        .map_err(|e| e.to_string())?;
    if !made.status.success() {
        return Err(format!("keygen: {}", String::from_utf8_lossy(&made.stderr)));
    }
    let uri = |prefix: &str| format!("s3://bench/{prefix}?endpoint={}&region=us-east-1", s3.endpoint);
    let options = |i: usize| CollectorOptions {
        name: Some(format!("c{}", i + 1)),
        commit_interval_ms: Some(500),
        extra_toml: format!(
            "\n[archive]\nuri = {:?}\nkek_file = {:?}\ncheckpoint_key = {:?}\ncollector_id = \"c{}\"\n\n[cluster]\nuri = {:?}\npublish_interval_ms = 1000\npoll_interval_ms = 300\n",
            uri("archive"),
            kek.display().to_string(),
            setup.path().join("checkpoint.key").display().to_string(),
            i + 1,
            uri("cluster"),
        ),
        env: s3.env.clone(),
        ..CollectorOptions::default()
    };
    let mut collectors: Vec<Collector> = (0..count).map(|i| Collector::start(&setup, &options(i))).collect();
    let per_sender = lines.len().div_ceil(SENDERS);
    let mut senders = Vec::new();
    for (i, part) in lines.chunks(per_sender).enumerate() {
        let name = format!("bench-{i}");
        let raw = RawAgent::connect(&setup, &name, collectors[i % count].ingest);
        let stream = build_stream(&name, &raw.key, part);
        senders.push((name, raw, stream));
    }
    let token = setup.token(&["default"], Role::Reader);
    let pids: Vec<u32> = collectors.iter().map(|c| c.process.pid()).collect();
    let cpu = |pids: &[u32]| -> Result<Duration, String> {
        pids.iter()
            .map(|pid| cpu_time(*pid).ok_or_else(|| "cannot read a collector's CPU time".to_owned()))
            .sum()
    };
    let before = cpu(&pids)?;
    let started = Instant::now();
    send_all(senders)?;
    let acked = started.elapsed();
    let want = lines.len() as u64;
    while collectors.iter().any(|c| c.total(&token, "*") < want) {
        if started.elapsed() > Duration::from_secs(1800) {
            return Err("records not found on every collector within 30 minutes".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let everywhere = started.elapsed();
    let mut last = cpu(&pids)?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = cpu(&pids)?;
        if now.saturating_sub(last) < Duration::from_millis(50 * count as u64) {
            break;
        }
        last = now;
    }
    let used = last.saturating_sub(before);
    let per_core = mb / used.as_secs_f64();
    println!(
        "{count} collector(s): {per_core:>6.1} MB per CPU second ({:.2} s CPU; acked in {:.2} s, on every collector in {:.2} s, {:.1} MB/s wall)",
        used.as_secs_f64(),
        acked.as_secs_f64(),
        everywhere.as_secs_f64(),
        mb / everywhere.as_secs_f64()
    );
    // The first collector with an empty cache: cold, then warm.
    let first = collectors.remove(0);
    first.process.stop();
    let first = Collector::start(&setup, &options(0));
    let query = [("q", TERM), ("limit", "100")];
    let timed = |collector: &Collector| -> Result<f64, String> {
        let at = Instant::now();
        let (status, body) = collector.search_raw(Some(&token), &query);
        if status != 200 {
            return Err(format!("search: {status} {body}"));
        }
        Ok(at.elapsed().as_secs_f64() * 1000.0)
    };
    // Its manifests listed first, so the cold query has the splits to fetch.
    std::thread::sleep(Duration::from_millis(1000));
    let cold = timed(&first)?;
    let mut warm: Vec<f64> = (0..WARM_QUERIES).map(|_| timed(&first)).collect::<Result<_, _>>()?;
    warm.sort_by(f64::total_cmp);
    let warm_p50 = warm[warm.len() / 2];
    let (_, body) = first.search_raw(Some(&token), &query);
    let fetched = first.metric(&setup, "logvault_splits_fetched_bytes_total");
    let range_reads = first.metric(&setup, "logvault_splits_range_reads_total");
    let opened = first.metric(&setup, "logvault_splits_opened_total");
    // What the other collectors published: what a whole fetch would read.
    let others: u64 = s3
        .objects("cluster/splits/")
        .iter()
        .filter(|(key, _)| !key.starts_with("cluster/splits/c1/"))
        .map(|(_, bytes)| bytes.len() as u64)
        .sum();
    println!(
        "   search {TERM:?}, newest 100 of {} hits: cold {cold:.1} ms ({opened} splits opened, {range_reads} ranged reads, {:.1} of {:.1} MB of splits fetched), warm p50 {warm_p50:.1} ms",
        body["total"],
        fetched as f64 / 1e6,
        others as f64 / 1e6
    );
    first.process.stop();
    for collector in collectors {
        collector.process.stop();
    }
    drop(s3);
    let _ = dir;
    Ok(serde_json::json!({
        "collectors": count,
        "ingest_mb_s_per_core": round(per_core),
        "ingest_mb_s_wall": round(mb / everywhere.as_secs_f64()),
        "collectors_cpu_s": round(used.as_secs_f64()),
        "acked_s": round(acked.as_secs_f64()),
        "on_every_collector_s": round(everywhere.as_secs_f64()),
        "search_cold_ms": round(cold),
        "search_warm_p50_ms": round(warm_p50),
        "splits_fetched_mb": round(fetched as f64 / 1e6),
        "splits_others_mb": round(others as f64 / 1e6),
        "splits_opened": opened,
        "splits_range_reads": range_reads,
        "hits": body["total"],
    }))
}
