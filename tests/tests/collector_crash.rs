//! The collector killed ten times at random points while three agents
//! stream 100,000 lines each: every line is in the index exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use logvault_collector::auth::Role;
use logvault_e2e::*;

const LINES: usize = 100_000;
const AGENTS: usize = 3;

/// A deterministic stand-in for randomness: the test is the same every run.
fn pseudo_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn collector_kill9_ten_times_while_three_agents_stream_loses_and_repeats_nothing() {
    let setup = Setup::new("collector-kill10");
    let mut collector = Collector::start(&setup, &CollectorOptions::default());
    let ingest = collector.ingest;
    let options = CollectorOptions { ingest_listen: Some(ingest.to_string()), ..CollectorOptions::default() };
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut agents = Vec::new();
    for a in 0..AGENTS {
        let name = format!("stream-{a}");
        let path = logs.join(format!("{name}.log"));
        std::fs::write(&path, "").unwrap();
        let config = agent_config(
            &setup,
            &name,
            ingest,
            &[path.to_string_lossy().into_owned()],
            &AgentOptions { max_records: 500, ..AgentOptions::default() },
        );
        agents.push(start_agent(&setup, &name, &config));
    }
    // Three writers, 100,000 lines each, in chunks over a few seconds.
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..AGENTS)
        .map(|a| {
            let path = logs.join(format!("stream-{a}.log"));
            std::thread::spawn(move || {
                for chunk in 0..100 {
                    let lines: Vec<String> = (chunk * 1000..chunk * 1000 + 1000)
                        .map(|i| format!("2026-11-24 10:00:00 INFO crashtest a{a}n{i} payload {i}"))
                        .collect();
                    append_lines(&path, &lines);
                    std::thread::sleep(Duration::from_millis(60));
                }
            })
        })
        .collect();
    let writing = {
        let done = done.clone();
        std::thread::spawn(move || {
            for writer in writers {
                writer.join().unwrap();
            }
            done.store(true, Ordering::Release);
        })
    };

    // Ten kills at pseudo-random points, each followed by a restart on
    // the same address; the last ones land after the writers finished.
    let mut state = 0x5eed_1234_abcd_9876u64;
    for kill in 0..10 {
        std::thread::sleep(Duration::from_millis(200 + pseudo_random(&mut state) % 900));
        collector.process.kill9();
        std::thread::sleep(Duration::from_millis(pseudo_random(&mut state) % 300));
        collector = Collector::start(&setup, &options);
        eprintln!("kill {kill} done; writers finished: {}", done.load(Ordering::Acquire));
    }
    writing.join().unwrap();

    let token = setup.token(&["default"], Role::Reader);
    let started = Instant::now();
    collector.wait_total(&token, "crashtest", (AGENTS * LINES) as u64, Duration::from_secs(240));
    eprintln!("all {} lines searchable {:?} after the last restart", AGENTS * LINES, started.elapsed());
    for a in 0..AGENTS {
        let source = source_query(&logs.join(format!("stream-{a}.log")));
        assert_eq!(collector.total(&token, &source), LINES as u64, "stream-{a}");
    }
    // Exactly once, line by line, for a sample spread over every stream.
    for _ in 0..150 {
        let a = pseudo_random(&mut state) as usize % AGENTS;
        let i = pseudo_random(&mut state) as usize % LINES;
        assert_eq!(collector.total(&token, &format!("a{a}n{i}")), 1, "line {i} of stream-{a}");
    }
    for agent in agents {
        agent.stop();
    }
    collector.process.stop();
}
