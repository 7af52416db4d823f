//! The whole path: files on a host, the agent, mTLS, the WAL, the index,
//! the query API.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use logvault_collector::auth::Role;
use logvault_e2e::*;

/// The five most common alphabetic words (of at least four letters) of a
/// sample, by the number of lines holding them, plus the rarest such word.
fn words_to_check(lines: &[String]) -> Vec<String> {
    let mut counts: HashMap<String, u64> = HashMap::new();
    for line in lines {
        let mut seen: Vec<String> =
            terms(line).filter(|t| t.len() >= 4 && t.chars().all(|c| c.is_ascii_alphabetic())).collect();
        seen.sort();
        seen.dedup();
        for term in seen {
            *counts.entry(term).or_default() += 1;
        }
    }
    let mut ranked: Vec<(String, u64)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut words: Vec<String> = ranked.iter().take(5).map(|(w, _)| w.clone()).collect();
    if let Some((rare, _)) = ranked.last() {
        words.push(rare.clone());
    }
    words
}

#[test]
fn all_eight_samples_arrive_exactly_once_and_word_totals_match_the_files() {
    let setup = Setup::new("pipeline");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    let files = copy_samples(&logs, &SAMPLES);
    let config = agent_config(
        &setup,
        "web-1",
        collector.ingest,
        &[logs.join("*.log").to_string_lossy().into_owned()],
        &AgentOptions { max_records: 500, ..AgentOptions::default() },
    );
    let agent = start_agent(&setup, "web-1", &config);
    let token = setup.token(&["default"], Role::Reader);

    collector.wait_total(&token, "*", 16_000, Duration::from_secs(60));
    for name in SAMPLES {
        let path = &files[name];
        let lines = sample_lines(name);
        assert_eq!(lines.len(), 2000, "{name}");
        let source = source_query(path);
        assert_eq!(collector.total(&token, &source), 2000, "{name}: every line exactly once");
        for word in words_to_check(&lines) {
            let want = lines_with_term(&lines, &word);
            let got = collector.total(&token, &format!("{source} AND {word}"));
            assert_eq!(got, want, "{name}: lines holding {word:?}");
        }
    }

    // The hits carry the authenticated host and the original line.
    let (status, body) = collector.search_raw(Some(&token), &[("q", "PacketResponder"), ("limit", "3")]);
    assert_eq!(status, 200);
    assert_eq!(
        body["total"].as_u64(),
        Some(lines_with_term(&sample_lines("HDFS_2k.log"), "PacketResponder"))
    );
    let hits = body["hits"].as_array().unwrap();
    assert_eq!(hits.len(), 3);
    for hit in hits {
        assert_eq!(hit["host"], "web-1");
        assert!(hit["message"].as_str().unwrap().contains("PacketResponder"));
    }

    // A new line is searchable within 2 seconds of being written.
    let marker = "latencyprobe4711";
    let written = Instant::now();
    append_lines(&files["HDFS_2k.log"], &[format!("081111 000000 1 INFO probe: {marker} arrived")]);
    wait_for(Duration::from_secs(2), "the new line to be searchable within 2 s", || {
        (collector.total(&token, marker) == 1).then_some(())
    });
    eprintln!("new line searchable after {:?}", written.elapsed());

    agent.stop();
    collector.process.stop();
}

#[test]
fn rename_rotation_loses_and_repeats_nothing() {
    let setup = Setup::new("rotation");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let live = logs.join("app.log");
    let lines = sample_lines("Zookeeper_2k.log");
    append_lines(&live, &lines[..800]);
    let config = agent_config(
        &setup,
        "rot-1",
        collector.ingest,
        &[live.to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let agent = start_agent(&setup, "rot-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", 800, Duration::from_secs(30));

    // Rotate: rename away, keep writing to the old file for a moment (as a
    // writer that has not reopened yet does), then create the new file.
    let rotated = logs.join("app.log.1");
    std::fs::rename(&live, &rotated).unwrap();
    append_lines(&rotated, &lines[800..1000]);
    append_lines(&live, &lines[1000..2000]);
    collector.wait_total(&token, "*", 2000, Duration::from_secs(30));
    agent.stop();
    collector.process.stop();
}
