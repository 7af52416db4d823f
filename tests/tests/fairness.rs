//! One noisy agent does not starve the rest: its byte rate is capped, and
//! a quiet agent's lines are searchable while the noisy one still ships.

use std::time::{Duration, Instant};

use logvault_collector::auth::Role;
use logvault_e2e::*;

#[test]
fn a_noisy_agent_is_slowed_to_its_rate_and_a_quiet_one_goes_through() {
    let setup = Setup::new("fairness");
    let options = CollectorOptions {
        ingest_toml: "agent_rate_bytes = 100000\nmax_connections_per_agent = 1".into(),
        ..Default::default()
    };
    let collector = Collector::start(&setup, &options);
    let token = setup.token(&["default"], Role::Reader);
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // About 1 MB, about half of it after compression: five seconds at the rate.
    append_lines(&logs.join("noisy.log"), &incompressible_lines(8_000));
    let noisy_config = agent_config(
        &setup,
        "noisy-1",
        collector.ingest,
        &[logs.join("noisy.log").to_string_lossy().into_owned()],
        &AgentOptions { max_records: 500, ..AgentOptions::default() },
    );
    let noisy = start_agent(&setup, "noisy-1", &noisy_config);
    std::thread::sleep(Duration::from_millis(800));

    let quiet_lines: Vec<String> = (0..100).map(|i| format!("quietword line {i}")).collect();
    append_lines(&logs.join("quiet.log"), &quiet_lines);
    let quiet_config = agent_config(
        &setup,
        "quiet-1",
        collector.ingest,
        &[logs.join("quiet.log").to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let started = Instant::now();
    let quiet = start_agent(&setup, "quiet-1", &quiet_config);
    collector.wait_total(&token, "quietword", 100, Duration::from_secs(10));
    let quiet_took = started.elapsed();
    let noisy_so_far = collector.total(&token, "host:\"noisy-1\"");
    assert!(quiet_took < Duration::from_secs(5), "the quiet agent waited {quiet_took:?}");
    assert!(noisy_so_far < 8_000, "the noisy agent was not slowed: all {noisy_so_far} lines in already");
    assert!(collector.metric(&setup, "logvault_rate_limited_milliseconds_total") > 0);

    // A second connection of the same agent is over its cap of one.
    let mut second = RawAgent::connect(&setup, "noisy-1", collector.ingest);
    let refused = second.send_batch(second.batch("noisy-1", "/var/log/second.log", 0, 1, "second"));
    // Refused at once (the answer may be lost with the closed connection).
    assert!(!matches!(refused, Some(logvault_storage::Frame::Ack { .. })), "{refused:?}");
    assert!(collector.metric(&setup, "logvault_refusals_total{reason=\"connection_limit\"}") >= 1);

    // Slowed, not refused: everything arrives, once.
    collector.wait_total(&token, "host:\"noisy-1\"", 8_000, Duration::from_secs(60));
    assert_eq!(collector.total(&token, "n7999"), 1);
    noisy.stop();
    quiet.stop();
    collector.process.stop();
}
