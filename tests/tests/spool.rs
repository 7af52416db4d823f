//! The disk spool: the agent keeps reading while the collector is away, so
//! files rotated and deleted meanwhile lose nothing.

use std::time::Duration;

use logvault_collector::auth::Role;
use logvault_e2e::*;

fn spool_config(
    setup: &Setup,
    name: &str,
    ingest: std::net::SocketAddr,
    include: &str,
    spool: &str,
) -> std::path::PathBuf {
    // Small batches, so that a full spool stops the tailer well before the
    // end of a few megabytes.
    let options = AgentOptions { metrics: true, max_records: 200, ..AgentOptions::default() };
    let config = agent_config(setup, name, ingest, &[include.to_owned()], &options);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}\n[spool]\n{spool}\n")).unwrap();
    config
}

fn agent_metric(agent: &Process, name: &str) -> u64 {
    metric(&http_get(metrics_addr(agent), "/metrics").1, name).unwrap_or_default()
}

#[test]
fn files_rotated_and_deleted_during_an_outage_arrive_from_the_spool() {
    let setup = Setup::new("spool-outage");
    let first = Collector::start(&setup, &CollectorOptions::default());
    let ingest = first.ingest;
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let live = logs.join("app.log");
    let lines = sample_lines("HDFS_2k.log");
    append_lines(&live, &lines[..200]);
    let config = spool_config(&setup, "spool-1", ingest, &live.to_string_lossy(), "max_bytes = 16777216");
    let agent = start_agent(&setup, "spool-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    first.wait_total(&token, "*", 200, Duration::from_secs(30));
    first.process.stop();

    // While the collector is away: lines are written, the file is rotated
    // twice and the rotated files are deleted once the agent has read them.
    for round in 0..3 {
        let from = 200 + round * 600;
        append_lines(&live, &lines[from..from + 600]);
        wait_for(Duration::from_secs(20), "the agent to read the new lines", || {
            (agent_metric(&agent, "logvault_agent_lines_read_total") == from as u64 + 600).then_some(())
        });
        if round < 2 {
            let rotated = logs.join(format!("app.log.{round}"));
            std::fs::rename(&live, &rotated).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            std::fs::remove_file(&rotated).unwrap();
        }
    }
    assert!(agent_metric(&agent, "logvault_agent_spool_bytes") > 0);

    let options = CollectorOptions { ingest_listen: Some(ingest.to_string()), ..CollectorOptions::default() };
    let second = Collector::start(&setup, &options);
    second.wait_total(&token, "*", 2000, Duration::from_secs(60));
    wait_for(Duration::from_secs(10), "the spool to empty", || {
        (agent_metric(&agent, "logvault_agent_spool_bytes") == 0).then_some(())
    });
    assert_eq!(agent_metric(&agent, "logvault_agent_spool_dropped_records_total"), 0);
    agent.stop();
    second.process.stop();
}

#[test]
fn a_damaged_spool_entry_is_skipped_and_reported_and_its_lines_are_read_again() {
    let setup = Setup::new("spool-flip");
    let first = Collector::start(&setup, &CollectorOptions::default());
    let ingest = first.ingest;
    first.process.stop();
    let logs = setup.path().join("logs");
    let files = copy_samples(&logs, &["Zookeeper_2k.log"]);
    let config = spool_config(
        &setup,
        "flip-1",
        ingest,
        &files["Zookeeper_2k.log"].to_string_lossy(),
        "max_bytes = 16777216",
    );
    let agent = start_agent(&setup, "flip-1", &config);
    wait_for(Duration::from_secs(20), "the agent to spool the file", || {
        (agent_metric(&agent, "logvault_agent_lines_read_total") == 2000).then_some(())
    });
    agent.stop();

    // Flip a byte in the middle of the spool.
    let spool_dir = setup.path().join("agent-flip-1-state/spool");
    let segment = std::fs::read_dir(&spool_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "spool"))
        .expect("a spool segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&segment, bytes).unwrap();

    let options = CollectorOptions { ingest_listen: Some(ingest.to_string()), ..CollectorOptions::default() };
    let second = Collector::start(&setup, &options);
    let agent = start_agent(&setup, "flip-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    // The file is still there: what the damaged entry held is read again
    // from the acked checkpoint; the collector stores each line once.
    second.wait_total(&token, "*", 2000, Duration::from_secs(60));
    assert_eq!(agent_metric(&agent, "logvault_agent_spool_corrupt_entries_total"), 1);
    assert!(agent.log_text().contains("damaged spool entry"));
    agent.stop();
    second.process.stop();
}

#[test]
fn a_full_spool_blocks_by_default_and_drops_the_oldest_when_told() {
    let setup = Setup::new("spool-full");
    let first = Collector::start(&setup, &CollectorOptions::default());
    let ingest = first.ingest;
    first.process.stop();
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // About 3 MB of lines for a 1 MiB spool, random enough that batch
    // compression cannot shrink them below it.
    let lines = incompressible_lines(24_000);
    let blocking_log = logs.join("block.log");
    let dropping_log = logs.join("drop.log");
    append_lines(&blocking_log, &lines);
    append_lines(&dropping_log, &lines);
    let blocking = start_agent(
        &setup,
        "block-1",
        &spool_config(&setup, "block-1", ingest, &blocking_log.to_string_lossy(), "max_bytes = 1048576"),
    );
    let dropping = start_agent(
        &setup,
        "drop-1",
        &spool_config(
            &setup,
            "drop-1",
            ingest,
            &dropping_log.to_string_lossy(),
            "max_bytes = 1048576\nwhen_full = \"drop_oldest\"",
        ),
    );
    wait_for(Duration::from_secs(30), "the dropping agent to read everything", || {
        (agent_metric(&dropping, "logvault_agent_lines_read_total") == 24_000).then_some(())
    });
    let dropped = agent_metric(&dropping, "logvault_agent_spool_dropped_records_total");
    assert!(dropped > 0, "nothing dropped");
    let read = agent_metric(&blocking, "logvault_agent_lines_read_total");
    assert!(read < 24_000, "the blocking agent read everything into a 1 MiB spool");
    assert_eq!(agent_metric(&blocking, "logvault_agent_spool_dropped_records_total"), 0);
    assert!(agent_metric(&blocking, "logvault_agent_spool_bytes") <= 1_200_000);

    let options = CollectorOptions { ingest_listen: Some(ingest.to_string()), ..CollectorOptions::default() };
    let second = Collector::start(&setup, &options);
    let token = setup.token(&["default"], Role::Reader);
    second.wait_total(&token, &source_query(&blocking_log), 24_000, Duration::from_secs(90));
    blocking.stop();
    dropping.stop();
    second.process.stop();
}
