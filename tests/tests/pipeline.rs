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
        &AgentOptions { max_records: 500, metrics: true, ..AgentOptions::default() },
    );
    let agent = start_agent(&setup, "web-1", &config);
    let token = setup.token(&["default"], Role::Reader);

    collector.wait_total(&token, "*", 16_000, Duration::from_secs(60));
    // The agent's own view agrees, on its local metrics port.
    let metrics = metrics_addr(&agent);
    assert_eq!(http_get(metrics, "/healthz").0, "HTTP/1.1 200 OK");
    let (status, body) = http_get(metrics, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(metric(&body, "logvault_agent_records_acked_total"), Some(16_000), "{body}");
    assert_eq!(metric(&body, "logvault_agent_lines_read_total"), Some(16_000));
    assert_eq!(metric(&body, "logvault_agent_files_tracked"), Some(8));
    assert_eq!(metric(&body, "logvault_agent_connected"), Some(1));
    assert_eq!(metric(&body, "logvault_agent_unacked_batches"), Some(0));
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
    append_lines(&live, &lines[..600]);
    let config = agent_config(
        &setup,
        "rot-1",
        collector.ingest,
        &[live.to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let agent = start_agent(&setup, "rot-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", 600, Duration::from_secs(30));

    // Rotate while running: rename away, create the new file, and keep
    // writing to the old one for longer than the drain grace (as a writer
    // that reopens late does).
    let rotated = logs.join("app.log.1");
    std::fs::rename(&live, &rotated).unwrap();
    append_lines(&live, &lines[600..700]);
    for chunk in 0..10 {
        append_lines(&rotated, &lines[700 + chunk * 20..720 + chunk * 20]);
        std::thread::sleep(Duration::from_millis(450));
    }
    collector.wait_total(&token, "*", 900, Duration::from_secs(30));
    agent.stop();

    // Rotate while stopped: the old file gets more lines after the rename,
    // then a new file appears; both are caught up at the next start.
    append_lines(&live, &lines[900..1000]);
    let rotated_again = logs.join("app.log.2");
    std::fs::rename(&live, &rotated_again).unwrap();
    append_lines(&rotated_again, &lines[1000..1200]);
    append_lines(&live, &lines[1200..2000]);
    let agent = start_agent(&setup, "rot-1", &config);
    collector.wait_total(&token, "*", 2000, Duration::from_secs(30));
    for line in [&lines[0], &lines[999], &lines[1100], &lines[1999]] {
        let word = terms(line).last().unwrap();
        assert!(collector.total(&token, &word) >= 1, "{line}");
    }
    agent.stop();
    collector.process.stop();
}

/// Parsing at the edge: the record's time, level and fields come from the
/// line, and search by them matches loghub's ground truth.
#[test]
fn parsed_times_levels_and_fields_are_searchable() {
    let setup = Setup::new("parsed");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    let files = copy_samples(&logs, &["Hadoop_2k.log"]);
    let parser = r#"
[[sources]]
include = ["HADOOP"]
parser = "regex"
pattern = '^(?P<timestamp>\S+ \S+) (?P<level>\w+) \[(?P<process>[^\]]*)\] (?P<component>\S+): '
timestamp_format = "[year]-[month]-[day] [hour]:[minute]:[second],[subsecond]"
"#
    .replace("HADOOP", &files["Hadoop_2k.log"].to_string_lossy());
    let config = agent_config(&setup, "parse-1", collector.ingest, &[], &AgentOptions::default());
    // Replace the default source with the parsing one.
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("[[sources]]\ninclude = []\nread_from = \"beginning\"\n", "");
    std::fs::write(&config, format!("{text}{parser}")).unwrap();
    let agent = start_agent(&setup, "parse-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", 2000, Duration::from_secs(30));

    // Ground truth from the structured CSV: level and component columns.
    let csv = std::fs::read_to_string(loghub_dir().join("Hadoop_2k.log_structured.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv.lines().skip(1).map(|l| l.split(',').collect()).collect();
    let warn = rows.iter().filter(|r| r.contains(&"WARN")).count() as u64;
    assert!(warn > 0);
    assert_eq!(collector.total(&token, "level:warn"), warn);
    let rm_container =
        rows.iter().filter(|r| r.iter().any(|c| c.ends_with("RMContainerAllocator"))).count() as u64;
    assert!(rm_container > 0);
    assert_eq!(
        collector
            .total(&token, "fields.component:\"org.apache.hadoop.mapreduce.v2.app.rm.RMContainerAllocator\""),
        rm_container
    );
    // The time range is the lines' own time (2015), not the time read.
    let (status, body) = collector.search_raw(
        Some(&token),
        &[
            ("q", "*"),
            ("from", "2015-10-18T18:01:00Z"),
            ("to", "2015-10-18T18:02:00Z"),
            ("order", "asc"),
            ("limit", "1"),
        ],
    );
    assert_eq!(status, 200, "{body}");
    let in_minute =
        rows.iter().filter(|r| r[1] == "2015-10-18" && r[2].starts_with("\"18:01:")).count() as u64;
    assert_eq!(body["total"].as_u64(), Some(in_minute), "{body}");
    assert_eq!(body["hits"][0]["timestamp"], "2015-10-18T18:01:47.978Z");
    assert_eq!(body["hits"][0]["fields"]["process"], "main");
    agent.stop();
    collector.process.stop();
}

/// Redaction happens on the host: the secret is in no record, no WAL byte
/// and no index file of the collector.
#[test]
fn redacted_secrets_never_leave_the_host() {
    let setup = Setup::new("redact");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = logs.join("auth.log");
    let lines: Vec<String> = (0..50)
        .map(|i| format!("user{i} logged in with password=hunter2secret{i} from 10.0.0.{i}"))
        .collect();
    append_lines(&log, &lines);
    let config = agent_config(
        &setup,
        "redact-1",
        collector.ingest,
        &[log.to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace(
        "read_from = \"beginning\"\n",
        "read_from = \"beginning\"\nredact = [{ pattern = 'password=\\S+', replacement = \"password=<redacted>\" }]\n",
    );
    std::fs::write(&config, text).unwrap();
    let agent = start_agent(&setup, "redact-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", 50, Duration::from_secs(30));
    assert_eq!(collector.total(&token, "redacted"), 50);
    assert_eq!(collector.total(&token, "hunter2secret7"), 0);
    agent.stop();
    collector.process.stop();
    let mut scanned = 0;
    let mut stack = vec![setup.path().join("collector-data")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                scanned += bytes.len();
                assert!(!bytes.windows(7).any(|w| w == b"hunter2"), "secret found in {}", path.display());
            }
        }
    }
    assert!(scanned > 5_000, "only {scanned} bytes of collector data scanned");
}
