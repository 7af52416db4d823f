//! `logvault-bench collector`: end-to-end ingest beside bare tantivy and a
//! bare WAL, on the same lines, in the same run.

use std::path::Path;
use std::time::{Duration, Instant};

use logvault_collector::auth::Role;
use logvault_collector::wal::{AppendRequest, Wal, WalOptions};
use logvault_e2e::{Collector, CollectorOptions, RawAgent, Setup};
use logvault_storage::batch::{BatchBuilder, Deflater, encoded_batch_hash, peek_header};
use logvault_storage::{Frame, Level};

use crate::{Options, cpu_time, machine, make_input, round};

/// Connections sending at once, as three agents would.
const SENDERS: usize = 3;
/// Documents per hand-over to tantivy in the grouped bare run, as the
/// collector's indexer hands them.
const GROUP: usize = 64;
/// Records per batch: the agent's default.
pub(crate) const BATCH_RECORDS: usize = 2000;

/// One sender's signed batches, in order.
type Stream = Vec<Vec<u8>>;

pub(crate) fn run(options: &Options) -> Result<(), String> {
    std::fs::create_dir_all(&options.dir).map_err(|e| format!("{}: {e}", options.dir.display()))?;
    let dir = std::fs::canonicalize(&options.dir).map_err(|e| e.to_string())?;
    let input = dir.join("input");
    let (input_bytes, input_lines) = make_input(&input, options.bytes)?;
    let lines = read_lines(&input)?;
    println!("input: {:.1} MB, {input_lines} lines (8 loghub samples repeated)", input_bytes as f64 / 1e6);
    // Runs vary with what else the machine does: the run with the median
    // ratio to bare tantivy, every run's ratio beside it.
    let mut runs = Vec::new();
    for _ in 0..options.runs {
        runs.push(measure(&dir, &lines, input_bytes, input_lines)?);
    }
    let ratio = |run: &serde_json::Value| run["collector_vs_tantivy"].as_f64().unwrap_or(f64::NAN);
    runs.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
    let ratios: Vec<f64> = runs.iter().map(ratio).collect();
    let mut report = runs.swap_remove(runs.len() / 2);
    report["collector_runs_vs_tantivy"] = ratios.into();
    let out = options.out.clone().unwrap_or_else(|| dir.join("report.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap() + "\n")
        .map_err(|e| format!("{}: {e}", out.display()))?;
    println!("report: {}", out.display());
    Ok(())
}

/// One run of every measurement, as a report.
fn measure(
    dir: &Path,
    lines: &[String],
    input_bytes: u64,
    input_lines: u64,
) -> Result<serde_json::Value, String> {
    let mb = input_bytes as f64 / 1e6;

    // Bare tantivy: the same lines, default tokenizer, positions, stored.
    let tantivy_cpu = bare_tantivy(&dir.join("bare-index"), lines, 1)?;
    let tantivy = mb / tantivy_cpu.as_secs_f64();
    println!("   bare tantivy: {tantivy:>6.1} MB per CPU second ({:.2} s CPU)", tantivy_cpu.as_secs_f64());
    // The same, handed over in groups as the collector's indexer does.
    let grouped_cpu = bare_tantivy(&dir.join("bare-index"), lines, GROUP)?;
    let grouped = mb / grouped_cpu.as_secs_f64();
    println!("   ... grouped: {grouped:>6.1} MB per CPU second ({:.2} s CPU)", grouped_cpu.as_secs_f64());

    // The real collector; three agent identities, each with its chain of
    // signed zstd batches, built before anything is measured.
    let setup = Setup::new("bench-collector");
    // The collector's default commit interval (new lines searchable within
    // about half a second).
    let collector_options = CollectorOptions { commit_interval_ms: Some(500), ..CollectorOptions::default() };
    let collector = Collector::start(&setup, &collector_options);
    let per_sender = lines.len().div_ceil(SENDERS);
    let mut senders = Vec::new();
    for (i, part) in lines.chunks(per_sender).enumerate() {
        let name = format!("bench-{i}");
        let raw = RawAgent::connect(&setup, &name, collector.ingest);
        let stream = build_stream(&name, &raw.key, part);
        senders.push((name, raw, stream));
    }
    let stored_bytes: usize = senders.iter().flat_map(|(_, _, s)| s.iter().map(Vec::len)).sum();
    println!(
        "batches: {:.1} MB signed and compressed ({:.1}x)",
        stored_bytes as f64 / 1e6,
        mb * 1e6 / stored_bytes as f64
    );

    // The collector's own indexer alone: the same batches decoded into the
    // collector's documents (its schema and tokenizers), no TLS, no WAL.
    let indexer_cpu = indexer_alone(&dir.join("indexer-alone"), &senders)?;
    let indexer = mb / indexer_cpu.as_secs_f64();
    println!("  indexer alone: {indexer:>6.1} MB per CPU second ({:.2} s CPU)", indexer_cpu.as_secs_f64());

    // A bare WAL: the same batches, appended from three tasks, fsynced.
    let streams: Vec<(String, Stream)> = senders.iter().map(|(n, _, s)| (n.clone(), s.clone())).collect();
    let wal_cpu = bare_wal(&dir.join("bare-wal"), &streams)?;
    let wal = mb / wal_cpu.as_secs_f64();
    println!("       bare WAL: {wal:>6.1} MB per CPU second ({:.2} s CPU)", wal_cpu.as_secs_f64());

    // End to end: mutual TLS, validation, WAL fsync, index, until every
    // record is searchable.
    let token = setup.token(&["default"], Role::Reader);
    let pid = collector.process.pid();
    println!("collector pid {pid}");
    let before = cpu_time(pid).ok_or("cannot read the collector's CPU time")?;
    let started = Instant::now();
    send_all(senders)?;
    let acked = started.elapsed();
    let want = lines.len() as u64;
    while collector.total(&token, "*") < want {
        if started.elapsed() > Duration::from_secs(1800) {
            return Err("records not searchable within 30 minutes".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let searchable = started.elapsed();
    // Count the work that goes on after that too (segment merges): wait
    // until the collector has been idle for a second.
    let mut last = cpu_time(pid).ok_or("cannot read the collector's CPU time")?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = cpu_time(pid).ok_or("cannot read the collector's CPU time")?;
        if now.saturating_sub(last) < Duration::from_millis(50) {
            break;
        }
        last = now;
    }
    let cpu = last.saturating_sub(before);
    let end_to_end = mb / cpu.as_secs_f64();
    println!(
        "      collector: {end_to_end:>6.1} MB per CPU second ({:.2} s CPU; acked in {:.2} s, searchable in {:.2} s, {:.1} MB/s wall)",
        cpu.as_secs_f64(),
        acked.as_secs_f64(),
        searchable.as_secs_f64(),
        mb / searchable.as_secs_f64()
    );
    println!(
        "collector / bare tantivy: {:.2}; collector / its indexer alone: {:.2}; collector / bare WAL: {:.2}",
        end_to_end / tantivy,
        end_to_end / indexer,
        end_to_end / wal
    );
    let peak_rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmHWM:")?.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    collector.process.stop();

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let report = serde_json::json!({
        "machine": machine(cores),
        "input": format!("8 loghub samples repeated to {input_bytes} bytes, {input_lines} lines, in {SENDERS} streams of {BATCH_RECORDS}-record zstd batches"),
        "input_bytes": input_bytes,
        "collector_mb_s_per_core": round(end_to_end),
        "collector_vs_tantivy": round(end_to_end / tantivy),
        "collector_vs_wal": round(end_to_end / wal),
        "collector_vs_indexer_alone": round(end_to_end / indexer),
        "indexer_alone_mb_s_per_core": round(indexer),
        "bare_tantivy_mb_s_per_core": round(tantivy),
        "bare_tantivy_grouped_mb_s_per_core": round(grouped),
        "collector_vs_tantivy_grouped": round(end_to_end / grouped),
        "bare_wal_mb_s_per_core": round(wal),
        "collector_cpu_s": round(cpu.as_secs_f64()),
        "acked_s": round(acked.as_secs_f64()),
        "searchable_s": round(searchable.as_secs_f64()),
        "collector_peak_rss_mib": round(peak_rss_kib as f64 / 1024.0),
    });
    Ok(report)
}

/// Sends each sender's batches over its own connection, all at once,
/// until each is acked.
pub(crate) fn send_all(senders: Vec<(String, RawAgent, Stream)>) -> Result<(), String> {
    let threads: Vec<_> = senders
        .into_iter()
        .map(|(name, mut raw, stream)| {
            std::thread::spawn(move || {
                for batch in stream {
                    match raw.send_batch(batch) {
                        Some(Frame::Ack { .. }) => {}
                        other => return Err(format!("{name}: {other:?}")),
                    }
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread.join().map_err(|_| "a sender panicked".to_owned())??;
    }
    Ok(())
}

pub(crate) fn read_lines(input: &Path) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for name in logvault_e2e::SAMPLES {
        let text = std::fs::read(input.join(name)).map_err(|e| format!("{name}: {e}"))?;
        lines.extend(String::from_utf8_lossy(&text).lines().map(str::to_owned));
    }
    Ok(lines)
}

fn self_cpu() -> Duration {
    cpu_time(std::process::id()).unwrap_or_default()
}

/// Bare tantivy over `lines`, `group` documents per hand-over.
fn bare_tantivy(path: &Path, lines: &[String], group: usize) -> Result<Duration, String> {
    use tantivy::schema::{STORED, Schema, TEXT};
    let _ = std::fs::remove_dir_all(path);
    std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
    let mut builder = Schema::builder();
    let message = builder.add_text_field("message", TEXT | STORED);
    let timestamp = builder.add_date_field("timestamp", tantivy::schema::INDEXED | tantivy::schema::FAST);
    let index = tantivy::Index::create_in_dir(path, builder.build()).map_err(|e| e.to_string())?;
    let before = self_cpu();
    let mut writer: tantivy::IndexWriter =
        index.writer_with_num_threads(1, 64 << 20).map_err(|e| e.to_string())?;
    let now = tantivy::DateTime::from_timestamp_secs(1_800_000_000);
    for lines in lines.chunks(group) {
        let docs = lines.iter().map(|line| {
            let mut doc = tantivy::TantivyDocument::new();
            doc.add_text(message, line);
            doc.add_date(timestamp, now);
            tantivy::indexer::UserOperation::Add(doc)
        });
        // One document per call is what `add_document` does.
        writer.run(docs).map_err(|e| e.to_string())?;
    }
    writer.commit().map_err(|e| e.to_string())?;
    writer.wait_merging_threads().map_err(|e| e.to_string())?;
    Ok(self_cpu().saturating_sub(before))
}

/// Signed, compressed batches of `lines` for `agent`, as its agent would
/// send them: a chain per sender.
pub(crate) fn build_stream(agent: &str, key: &ring::signature::Ed25519KeyPair, lines: &[String]) -> Stream {
    let mut deflater = Deflater::zstd(1).expect("zstd starts");
    let mut prev = [0u8; 32];
    let mut seq = 0u64;
    let now = logvault_collector::time::now_ns();
    lines
        .chunks(BATCH_RECORDS)
        .map(|chunk| {
            let mut builder = BatchBuilder::new(agent, "/var/log/bench.log", 1, seq, prev);
            for line in chunk {
                builder.push_parts(now, Level::sniff(line), 0, line, &[]);
            }
            seq += chunk.len() as u64;
            let bytes = builder.sign_with(key, Some(&mut deflater));
            prev = encoded_batch_hash(&bytes).expect("a built batch decodes");
            bytes
        })
        .collect()
}

fn indexer_alone(path: &Path, senders: &[(String, RawAgent, Stream)]) -> Result<Duration, String> {
    let _ = std::fs::remove_dir_all(path);
    let index = logvault_collector::index::LogIndex::open(path).map_err(|e| e.to_string())?;
    let before = self_cpu();
    let mut feeder = logvault_collector::index::Feeder::new(&index).map_err(|e| e.to_string())?;
    let mut inflater = logvault_storage::batch::Inflater::new();
    let mut docs = Vec::new();
    let mut next_id = 0;
    for (name, _, stream) in senders {
        for batch in stream {
            let entry = logvault_collector::wal::Entry {
                position: 0,
                next: 0,
                received_ns: logvault_collector::time::now_ns(),
                tenant: "default".into(),
                host: name.clone(),
                skip: 0,
                signer: Vec::new(),
                batch: batch.clone(),
                void: false,
            };
            index.documents(&entry, &mut inflater, &mut next_id, &mut docs);
            feeder.add(&mut docs).map_err(|e| e.to_string())?;
        }
    }
    feeder.writer().commit().map_err(|e| e.to_string())?;
    feeder.into_writer().wait_merging_threads().map_err(|e| e.to_string())?;
    Ok(self_cpu().saturating_sub(before))
}

fn bare_wal(dir: &Path, streams: &[(String, Stream)]) -> Result<Duration, String> {
    let _ = std::fs::remove_dir_all(dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let options = WalOptions { segment_bytes: 64 << 20, queue: 1024, max_bytes: 0, accept_gaps: false };
    let (wal, thread) = Wal::open(dir, &options).map_err(|e| e.to_string())?;
    let before = self_cpu();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for (agent, stream) in streams {
            let (wal, agent, stream) = (wal.clone(), agent.clone(), stream.clone());
            tasks.push(tokio::spawn(async move {
                for batch in stream {
                    let header = peek_header(&batch).map_err(|e| e.to_string())?;
                    let request = AppendRequest {
                        tenant: "default".into(),
                        host: agent.clone(),
                        received_ns: 0,
                        header,
                        batch,
                        signer: Vec::new(),
                    };
                    wal.append(request).await.map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(())
            }));
        }
        for task in tasks {
            task.await.map_err(|e| e.to_string())??;
        }
        Ok::<_, String>(())
    })?;
    let cpu = self_cpu().saturating_sub(before);
    drop(wal);
    let _ = thread.join();
    Ok(cpu)
}
