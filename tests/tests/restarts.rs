//! Restarts and crashes on either side lose nothing and repeat nothing.

use std::time::Duration;

use logvault_collector::auth::Role;
use logvault_e2e::*;
use logvault_storage::frame::BatchRef;
use logvault_storage::{AckStatus, Frame};

#[test]
fn agent_restarts_and_kill9_mid_file_leave_exactly_2000_per_file() {
    let setup = Setup::new("agent-restart");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let names = ["HDFS_2k.log", "Linux_2k.log", "Spark_2k.log"];
    let all: Vec<Vec<String>> = names.iter().map(|n| sample_lines(n)).collect();
    for (name, lines) in names.iter().zip(&all) {
        append_lines(&logs.join(name), &lines[..700]);
    }
    let config = agent_config(
        &setup,
        "restart-1",
        collector.ingest,
        &[logs.join("*.log").to_string_lossy().into_owned()],
        &AgentOptions { max_records: 50, ..AgentOptions::default() },
    );
    let token = setup.token(&["default"], Role::Reader);

    // First run: stopped cleanly mid-file.
    let agent = start_agent(&setup, "restart-1", &config);
    collector.wait_total(&token, "*", 2100, Duration::from_secs(30));
    agent.stop();
    for (name, lines) in names.iter().zip(&all) {
        append_lines(&logs.join(name), &lines[700..1400]);
    }

    // Second run: killed with SIGKILL while lines are being written, so
    // acks may be newer than the saved checkpoint and batches in flight.
    let agent = start_agent(&setup, "restart-1", &config);
    for chunk in 0..6 {
        for (name, lines) in names.iter().zip(&all) {
            let from = 1400 + chunk * 50;
            append_lines(&logs.join(name), &lines[from..from + 50]);
        }
        std::thread::sleep(Duration::from_millis(60));
    }
    agent.kill9();
    for (name, lines) in names.iter().zip(&all) {
        append_lines(&logs.join(name), &lines[1700..2000]);
    }

    // Third run: catches up from the acked checkpoints.
    let agent = start_agent(&setup, "restart-1", &config);
    collector.wait_total(&token, "*", 6000, Duration::from_secs(60));
    for name in names {
        assert_eq!(collector.total(&token, &source_query(&logs.join(name))), 2000, "{name}");
    }
    agent.stop();
    collector.process.stop();
}

#[test]
fn collector_kill9_mid_stream_loses_and_repeats_nothing() {
    let setup = Setup::new("collector-crash");
    let first = Collector::start(&setup, &CollectorOptions::default());
    let ingest = first.ingest;
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let names = ["OpenSSH_2k.log", "BGL_2k.log"];
    let all: Vec<Vec<String>> = names.iter().map(|n| sample_lines(n)).collect();
    let config = agent_config(
        &setup,
        "crash-1",
        ingest,
        &[logs.join("*.log").to_string_lossy().into_owned()],
        &AgentOptions { max_records: 40, ..AgentOptions::default() },
    );
    let agent = start_agent(&setup, "crash-1", &config);
    let token = setup.token(&["default"], Role::Reader);

    // A batch stored before the crash whose ack the agent never saw.
    let mut raw = RawAgent::connect(&setup, "raw-1", ingest);
    let before = raw.batch("raw-1", "/raw.log", 0, 10, "resent");
    assert!(matches!(raw.send_batch(before.clone()), Some(Frame::Ack { status: AckStatus::Stored, .. })));

    // Write in chunks while shipping; kill the collector halfway.
    for chunk in 0..20 {
        for (name, lines) in names.iter().zip(&all) {
            append_lines(&logs.join(name), &lines[chunk * 50..chunk * 50 + 50]);
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    first.process.kill9();
    for chunk in 20..40 {
        for (name, lines) in names.iter().zip(&all) {
            append_lines(&logs.join(name), &lines[chunk * 50..chunk * 50 + 50]);
        }
    }

    // The restarted collector recovers its WAL, catches its index up, and
    // takes the agent's resends without storing any twice.
    let options = CollectorOptions { ingest_listen: Some(ingest.to_string()), ..CollectorOptions::default() };
    let second = Collector::start(&setup, &options);
    let mut raw = RawAgent::connect(&setup, "raw-1", ingest);
    // Resume: the collector says which batches it holds durably, by hash,
    // per stream of this agent, after the crash.
    let before_hash = logvault_storage::batch::encoded_batch_hash(&before).unwrap();
    let resume = |batches: &[(&str, u64, [u8; 32])]| Frame::Resume {
        batches: batches
            .iter()
            .map(|(source, epoch, hash)| BatchRef { source: source.to_string(), epoch: *epoch, hash: *hash })
            .collect(),
    };
    assert_eq!(
        raw.send_frame(&resume(&[
            ("/raw.log", 0, before_hash),
            ("/raw.log", 0, [7; 32]),
            ("/raw.log", 1, before_hash),
            ("/never.log", 0, before_hash)
        ])),
        Some(Frame::Resumed { stored: vec![true, false, false, false] })
    );
    assert!(
        matches!(raw.send_batch(before), Some(Frame::Ack { status: AckStatus::Duplicate, .. })),
        "a batch stored before the crash is recognised after it"
    );
    // Rebatched differently from the stream's start: 10 records already
    // stored, 5 new.
    let overlapping = raw.batch("raw-1", "/raw.log", 0, 15, "resent");
    let overlapping_hash = logvault_storage::batch::encoded_batch_hash(&overlapping).unwrap();
    assert!(matches!(raw.send_batch(overlapping), Some(Frame::Ack { status: AckStatus::Stored, .. })));
    assert_eq!(
        raw.send_frame(&resume(&[("/raw.log", 0, overlapping_hash)])),
        Some(Frame::Resumed { stored: vec![true] })
    );
    // Another agent's streams are its own: raw-2 has stored nothing.
    let mut other = RawAgent::connect(&setup, "raw-2", ingest);
    assert_eq!(
        other.send_frame(&resume(&[("/raw.log", 0, before_hash)])),
        Some(Frame::Resumed { stored: vec![false] })
    );
    second.wait_total(&token, "source:\"/raw.log\"", 15, Duration::from_secs(30));
    second.wait_total(&token, "*", 4015, Duration::from_secs(60));
    for name in names {
        assert_eq!(second.total(&token, &source_query(&logs.join(name))), 2000, "{name}");
    }
    agent.stop();
    second.process.stop();
}

/// The collector is down for a minute while lines keep coming and the
/// file rotates: the agent retries with backoff, and when the collector is
/// back every line arrives once.
#[test]
fn a_collector_down_for_sixty_seconds_loses_nothing() {
    let setup = Setup::new("outage");
    let first = Collector::start(&setup, &CollectorOptions::default());
    let ingest = first.ingest;
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let live = logs.join("app.log");
    let lines = sample_lines("Linux_2k.log");
    append_lines(&live, &lines[..500]);
    let config =
        agent_config(&setup, "outage-1", ingest, &[format!("{}*", live.display())], &AgentOptions::default());
    let agent = start_agent(&setup, "outage-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    first.wait_total(&token, "*", 500, Duration::from_secs(30));
    first.process.stop();

    let down = std::time::Instant::now();
    for (i, chunk) in lines[500..].chunks(100).enumerate() {
        append_lines(&live, chunk);
        if i == 7 {
            std::fs::rename(&live, logs.join("app.log.1")).unwrap();
        }
        std::thread::sleep(Duration::from_millis(3_500));
    }
    std::thread::sleep(Duration::from_secs(60).saturating_sub(down.elapsed()));

    let options = CollectorOptions { ingest_listen: Some(ingest.to_string()), ..CollectorOptions::default() };
    let second = Collector::start(&setup, &options);
    second.wait_total(&token, "*", 2000, Duration::from_secs(60));
    assert!(agent.log_text().contains("cannot reach collector"), "the agent never noticed the outage");
    agent.stop();
    second.process.stop();
}

/// SIGTERM while an agent ships: the collector stops accepting, answers
/// what it has, commits the index and exits 0 quickly; the next start has
/// nothing to re-index and the agent loses nothing.
#[test]
fn a_graceful_shutdown_drains_commits_and_exits_quickly() {
    let setup = Setup::new("graceful");
    let first = Collector::start(&setup, &CollectorOptions::default());
    let ingest = first.ingest;
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let lines = sample_lines("Hadoop_2k.log");
    append_lines(&logs.join("a.log"), &lines[..1000]);
    let config = agent_config(
        &setup,
        "graceful-1",
        ingest,
        &[logs.join("*.log").to_string_lossy().into_owned()],
        &AgentOptions { max_records: 100, ..AgentOptions::default() },
    );
    let agent = start_agent(&setup, "graceful-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    first.wait_total(&token, "*", 1000, Duration::from_secs(30));
    append_lines(&logs.join("a.log"), &lines[1000..]);
    std::thread::sleep(Duration::from_millis(100));
    let stopping = std::time::Instant::now();
    first.process.stop();
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");

    let options = CollectorOptions { ingest_listen: Some(ingest.to_string()), ..CollectorOptions::default() };
    let second = Collector::start(&setup, &options);
    second.wait_total(&token, "*", 2000, Duration::from_secs(60));
    let log = second.process.log_text();
    let catching_up = log.lines().find(|l| l.contains("indexer catching up from the wal")).unwrap();
    let position =
        |key: &str| catching_up.split(key).nth(1).and_then(|r| r.split_whitespace().next()).unwrap();
    assert_eq!(position("from="), position("to="), "the index was committed at shutdown: {catching_up}");
    agent.stop();
    second.process.stop();
}
