//! A collector whose WAL is full answers busy: the agent keeps its data
//! and delivers all of it, once, when there is room again.

use std::time::Duration;

use logvault_collector::auth::Role;
use logvault_e2e::*;

#[test]
fn a_full_wal_answers_busy_and_nothing_is_lost_once_there_is_room() {
    let setup = Setup::new("wal-full");
    let cap = 400_000;
    let options =
        CollectorOptions { extra_toml: format!("[wal]\nmax_bytes = {cap}\n"), ..Default::default() };
    let first = Collector::start(&setup, &options);
    let token = setup.token(&["default"], Role::Reader);
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    // About 1.2 MB that compression cannot shrink below the cap.
    let lines = incompressible_lines(10_000);
    append_lines(&logs.join("big.log"), &lines);
    let config = agent_config(
        &setup,
        "busy-1",
        first.ingest,
        &[logs.join("*.log").to_string_lossy().into_owned()],
        &AgentOptions { max_records: 500, ..AgentOptions::default() },
    );
    let agent = start_agent(&setup, "busy-1", &config);
    wait_for(Duration::from_secs(60), "the collector to answer busy", || {
        (first.metric(&setup, "logvault_refusals_total{reason=\"busy\"}") > 0).then_some(())
    });
    assert_eq!(first.metric(&setup, "logvault_wal_busy"), 1);
    let wal_bytes = first.metric(&setup, "logvault_wal_bytes");
    assert!(wal_bytes <= cap, "the WAL grew to {wal_bytes} bytes past its cap of {cap}");
    let stored = wait_for(Duration::from_secs(30), "what fit under the cap to be searchable", || {
        let stored = first.total(&token, "*");
        (stored > 0).then_some(stored)
    });
    assert!(stored < 10_000, "{stored} records stored under the cap");
    assert!(first.process.log_text().contains("wal is full"), "no operator-visible alert");
    first.process.stop();

    // Room again (a larger cap): the agent delivers the rest, once.
    let options = CollectorOptions {
        ingest_listen: Some(first.ingest.to_string()),
        extra_toml: "[wal]\nmax_bytes = 0\n".into(),
        ..Default::default()
    };
    let second = Collector::start(&setup, &options);
    second.wait_total(&token, "*", 10_000, Duration::from_secs(60));
    for i in [0, 4_999, 9_999] {
        assert_eq!(second.total(&token, &format!("n{i}")), 1, "line {i}");
    }
    assert_eq!(second.metric(&setup, "logvault_wal_busy"), 0);
    agent.stop();
    second.process.stop();
}
