//! The agent under churn: repeated kill -9, fast rotation, copytruncate.

use std::path::Path;
use std::time::{Duration, Instant};

use logvault_collector::auth::Role;
use logvault_e2e::*;

/// `count` distinct lines: loghub text with a unique serial word appended.
fn numbered_lines(from: usize, count: usize) -> Vec<String> {
    let base: Vec<String> = SAMPLES.iter().flat_map(|name| sample_lines(name)).collect();
    (from..from + count).map(|i| format!("{} serial{i}", base[i % base.len()])).collect()
}

/// Checks a sample of serials one by one: each is there exactly once.
fn assert_each_once(collector: &Collector, token: &str, lines: usize, step: usize) {
    for i in (0..lines).step_by(step) {
        assert_eq!(collector.total(token, &format!("serial{i}")), 1, "serial{i}");
    }
}

#[test]
fn kill9_of_the_agent_ten_times_during_a_200k_line_stream_loses_and_repeats_nothing() {
    kill9_ten_times(false);
}

/// The same with the disk spool: after each kill the spool replays what
/// was not acked while the tailer reads again from the acked checkpoint.
#[test]
fn kill9_ten_times_with_the_spool_loses_and_repeats_nothing() {
    kill9_ten_times(true);
}

fn kill9_ten_times(spool: bool) {
    const LINES: usize = 200_000;
    let setup = Setup::new(if spool { "kill9-spool" } else { "kill9-agent" });
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = logs.join("stream.log");
    let config = agent_config(
        &setup,
        "churn-1",
        collector.ingest,
        &[log.to_string_lossy().into_owned()],
        &AgentOptions { max_records: 500, ..AgentOptions::default() },
    );
    if spool {
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, format!("{text}\n[spool]\nmax_bytes = 67108864\n")).unwrap();
    }
    let token = setup.token(&["default"], Role::Reader);
    let lines = numbered_lines(0, LINES);

    // A deterministic "random": kill points spread unevenly over the stream.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut written = 0;
    let mut agent = start_agent(&setup, "churn-1", &config);
    for _ in 0..10 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let chunk = 5_000 + (seed % 20_000) as usize;
        let end = (written + chunk).min(LINES);
        for part in lines[written..end].chunks(2_000) {
            append_lines(&log, part);
            std::thread::sleep(Duration::from_millis(15));
        }
        written = end;
        std::thread::sleep(Duration::from_millis(seed % 300));
        agent.kill9();
        agent = start_agent(&setup, "churn-1", &config);
    }
    append_lines(&log, &lines[written..]);
    collector.wait_total(&token, "*", LINES as u64, Duration::from_secs(120));
    assert_each_once(&collector, &token, LINES, 9_973);
    agent.stop();
    collector.process.stop();
}

/// Rename rotation 20 times a second while 5,000 lines a second are
/// written. Files rotated faster than the agent polls are caught because
/// the glob names the rotated files too; inode identity keeps any file
/// from being read twice.
#[test]
fn rename_rotation_twenty_times_a_second_loses_and_repeats_nothing() {
    const SECONDS: usize = 4;
    const LINES: usize = 5_000 * SECONDS;
    let setup = Setup::new("rotate-fast");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let live = logs.join("app.log");
    let config = agent_config(
        &setup,
        "rotor-1",
        collector.ingest,
        &[format!("{}*", live.display())],
        &AgentOptions::default(),
    );
    let agent = start_agent(&setup, "rotor-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    let lines = numbered_lines(0, LINES);

    // 250 lines per 50 ms slice, a rotation after each slice.
    let start = Instant::now();
    for (slice, part) in lines.chunks(250).enumerate() {
        for burst in part.chunks(50) {
            append_lines(&live, burst);
        }
        std::fs::rename(&live, logs.join(format!("app.log.{slice}"))).unwrap();
        let due = start + Duration::from_millis(50 * (slice as u64 + 1));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    let rotations = LINES / 250;
    assert!(start.elapsed() < Duration::from_secs(SECONDS as u64 + 2), "the writer fell behind");
    collector.wait_total(&token, "*", LINES as u64, Duration::from_secs(60));
    assert_each_once(&collector, &token, LINES, 997);
    eprintln!("{rotations} rotations in {:?}", start.elapsed());
    agent.stop();
    collector.process.stop();
}

fn copytruncate(live: &Path, copy: &Path) {
    std::fs::copy(live, copy).unwrap();
    std::fs::OpenOptions::new().write(true).open(live).unwrap().set_len(0).unwrap();
}

/// copytruncate: lines written between the copy and the truncation are
/// gone from the live file before any tailer can read them (the window no
/// tailer can close). Outside that window nothing is lost: the agent sees
/// the file shrink, starts a new epoch at offset 0 and ships what follows.
#[test]
fn copytruncate_rotation_loses_nothing_outside_the_copy_window() {
    let setup = Setup::new("copytruncate");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let live = logs.join("app.log");
    let config = agent_config(
        &setup,
        "copy-1",
        collector.ingest,
        &[live.to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let agent = start_agent(&setup, "copy-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    let lines = numbered_lines(0, 4_000);
    let mut shipped = 0;
    for round in 0..8 {
        append_lines(&live, &lines[round * 500..round * 500 + 500]);
        shipped += 500;
        collector.wait_total(&token, "*", shipped as u64, Duration::from_secs(30));
        copytruncate(&live, &logs.join(format!("app.log.{round}")));
    }
    assert_each_once(&collector, &token, 4_000, 101);
    agent.stop();
    collector.process.stop();
}
