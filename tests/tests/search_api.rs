//! The query API against the eight loghub samples: counts by level equal
//! the structured CSVs, histogram buckets add up to the total, a cursor
//! visits every hit exactly once while ingest goes on, context stays in
//! its stream, the live tail and the CLI work, and no query is a 500.

use std::collections::{HashMap, HashSet};
use std::io::BufRead;
use std::time::Duration;

use logvault_collector::auth::Role;
use logvault_e2e::*;
use logvault_storage::Level;

/// The ids of every hit of `query`, page by page through the cursor.
fn page_ids(
    collector: &Collector,
    token: &str,
    query: &str,
    order: &str,
    limit: usize,
) -> (u64, Vec<String>) {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    let mut first_total = None;
    loop {
        let limit_text = limit.to_string();
        let mut params = vec![("q", query), ("order", order), ("limit", limit_text.as_str())];
        if let Some(cursor) = &cursor {
            params.push(("cursor", cursor));
        }
        let (status, body) = collector.search_raw(Some(token), &params);
        assert_eq!(status, 200, "{body}");
        let total = body["total"].as_u64().unwrap();
        assert_eq!(*first_total.get_or_insert(total), total, "the total moved between pages");
        for hit in body["hits"].as_array().unwrap() {
            ids.push(hit["id"].as_str().unwrap().to_owned());
        }
        match body["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    (first_total.unwrap(), ids)
}

#[test]
fn search_aggregate_context_and_tail_over_the_loghub_samples() {
    let setup = Setup::new("search-api");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    let files = copy_samples(&logs, &SAMPLES);
    let config = loghub_agent_config(&setup, "hub-1", collector.ingest, &files);
    let agent = start_agent(&setup, "hub-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", 16_000, Duration::from_secs(90));

    // Counts by level, per sample, equal the structured CSVs.
    for sample in SAMPLES {
        let truth = loghub_ground_truth(sample);
        let query = source_query(&files[sample]);
        let (status, body) = collector.aggregate(
            &token,
            serde_json::json!({ "q": query, "terms": [{ "field": "level", "size": 10 }] }),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["total"], 2000, "{sample}: {body}");
        let got: HashMap<String, u64> = body["terms"][0]["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b["value"].as_str().unwrap().to_owned(), b["count"].as_u64().unwrap()))
            .collect();
        assert_eq!(body["terms"][0]["other"], 0);
        assert_eq!(body["terms"][0]["missing"], 0);
        // Linux's CSV calls the host "Level"; OpenSSH's has none.
        if matches!(sample, "Linux_2k.log" | "OpenSSH_2k.log") {
            assert_eq!(got.values().sum::<u64>(), 2000, "{sample}");
            continue;
        }
        let mut want: HashMap<String, u64> = HashMap::new();
        for row in &truth {
            let level = Level::from_word(&row["Level"]).unwrap_or(Level::Unknown);
            *want.entry(level.as_str().to_owned()).or_default() += 1;
        }
        assert_eq!(got, want, "{sample}");
        // And a search by level agrees with the aggregation.
        for (level, count) in &want {
            assert_eq!(
                collector.total(&token, &format!("{query} AND level:{level}")),
                *count,
                "{sample} {level}"
            );
        }
    }

    // Histogram buckets add up to the total, automatic or given.
    for request in [
        serde_json::json!({ "q": "*", "histogram": { "interval": "auto" } }),
        serde_json::json!({ "q": "error OR warn", "histogram": { "interval": "1d" } }),
        serde_json::json!({ "q": source_query(&files["HDFS_2k.log"]), "histogram": { "interval": "1m" } }),
        serde_json::json!({ "q": "*", "from": "2015-10-18T00:00:00Z", "to": "2015-10-19T00:00:00Z", "histogram": { "interval": "1m" } }),
    ] {
        let (status, body) = collector.aggregate(&token, request.clone());
        assert_eq!(status, 200, "{request}: {body}");
        let buckets = body["histogram"]["buckets"].as_array().unwrap();
        let sum: u64 = buckets.iter().map(|b| b["count"].as_u64().unwrap()).sum();
        assert_eq!(sum, body["total"].as_u64().unwrap(), "{request}");
        assert!(body["total"].as_u64().unwrap() > 0, "{request}");
        let interval = body["histogram"]["interval_ms"].as_i64().unwrap();
        for pair in buckets.windows(2) {
            assert_eq!(
                pair[1]["start_ms"].as_i64().unwrap() - pair[0]["start_ms"].as_i64().unwrap(),
                interval
            );
        }
    }
    let (status, body) =
        collector.aggregate(&token, serde_json::json!({ "q": "*", "histogram": { "interval": "1ms" } }));
    assert_eq!(status, 400, "too many buckets: {body}");
    // Top hosts and a field's values.
    let (_, body) = collector.aggregate(
        &token,
        serde_json::json!({ "terms": [{ "field": "host" }, { "field": "fields.component", "size": 3 }] }),
    );
    assert_eq!(body["terms"][0]["buckets"][0]["value"], "hub-1");
    assert_eq!(body["terms"][0]["buckets"][0]["count"], 16_000);
    let components = &body["terms"][1];
    let listed: u64 =
        components["buckets"].as_array().unwrap().iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(
        listed + components["other"].as_u64().unwrap() + components["missing"].as_u64().unwrap(),
        16_000
    );

    // A cursor visits every hit exactly once, in order, while more lines
    // with the same timestamps arrive.
    let hdfs = source_query(&files["HDFS_2k.log"]);
    let writer = {
        let path = files["HDFS_2k.log"].clone();
        let lines = sample_lines("HDFS_2k.log");
        std::thread::spawn(move || {
            for chunk in lines.chunks(100) {
                append_lines(&path, chunk);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    for (order, limit) in [("desc", 97), ("asc", 250)] {
        let (total, ids) = page_ids(&collector, &token, &hdfs, order, limit);
        let unique: HashSet<&String> = ids.iter().collect();
        assert_eq!(ids.len() as u64, total, "{order}: every hit once");
        assert_eq!(unique.len(), ids.len(), "{order}: no hit twice");
    }
    writer.join().unwrap();
    collector.wait_total(&token, &hdfs, 4000, Duration::from_secs(30));
    let (total, ids) = page_ids(&collector, &token, "*", "desc", 1000);
    assert_eq!((total, ids.len()), (18_000, 18_000));

    // Context: the records around a hit, from its stream, in order.
    let (_, body) = collector.search_raw(
        Some(&token),
        &[("q", &format!("{hdfs} AND PacketResponder")), ("limit", "50"), ("order", "asc")],
    );
    let hit = &body["hits"][49];
    let id = hit["id"].as_str().unwrap();
    let (status, context) =
        collector.call("GET", &format!("/api/v1/context?id={id}&before=3&after=4"), Some(&token), None);
    assert_eq!(status, 200, "{context}");
    assert_eq!(context["hit"], *hit);
    let before = context["before"].as_array().unwrap();
    let after = context["after"].as_array().unwrap();
    assert_eq!((before.len(), after.len()), (3, 4), "{context}");
    let ids: Vec<u64> = before
        .iter()
        .chain(std::iter::once(hit))
        .chain(after)
        .map(|h| h["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for neighbour in before.iter().chain(after) {
        assert_eq!(neighbour["source"], hit["source"]);
        assert_eq!(neighbour["host"], hit["host"]);
    }
    let (status, _) = collector.call("GET", "/api/v1/context?id=999999999", Some(&token), None);
    assert_eq!(status, 404);
    let (status, _) =
        collector.call("GET", &format!("/api/v1/context?id={id}&before=100000"), Some(&token), None);
    assert_eq!(status, 400);

    // The CLI: counts, histogram, NDJSON and the live tail.
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(bin("logvault"))
            .arg("search")
            .args(["--url", &collector.api_url(), "--ca", collector.ca.to_str().unwrap(), "--token", &token])
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    assert_eq!(cli(&["--count", "level:warn"]).trim(), collector.total(&token, "level:warn").to_string());
    let histogram = cli(&["--histogram", "1h", &hdfs]);
    assert!(histogram.trim_end().ends_with("buckets of 3600000 ms"), "{histogram}");
    assert!(histogram.contains("total 4000 in"), "{histogram}");
    let ndjson = cli(&["--json", "--limit", "5", "level:error"]);
    assert_eq!(ndjson.lines().count(), 5);
    for line in ndjson.lines() {
        let hit: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(hit["level"], "error");
    }
    let mut follow = std::process::Command::new(bin("logvault"))
        .arg("search")
        .args(["--url", &collector.api_url(), "--ca", collector.ca.to_str().unwrap(), "--token", &token])
        .args(["--follow", "--limit", "2", "zebracorn"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    // Give the tail a moment to start, then write the lines it must show.
    std::thread::sleep(Duration::from_secs(2));
    append_lines(
        &files["Spark_2k.log"],
        &[
            "17/06/09 20:11:11 INFO zebracorn: live line one \u{1b}[31m".into(),
            "17/06/09 20:11:12 WARN zebracorn: live line two".into(),
        ],
    );
    let first = lines.next().unwrap().unwrap();
    let second = lines.next().unwrap().unwrap();
    assert!(first.contains("live line one") && first.contains("\\u{001b}[31m"), "{first}");
    assert!(second.contains("live line two") && second.contains("warn"), "{second}");
    let _ = follow.kill();
    let _ = follow.wait();

    // Bad queries are 400 with a reason; random ones never 500.
    for bad in
        ["(unclosed", "nosuch:field", "level:warn AND", "timestamp:[1 TO 2]", "\"unterminated", "message:*"]
    {
        let (status, body) = collector.search_raw(Some(&token), &[("q", bad)]);
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "bad_query", "{bad}: {body}");
    }
    let (_, body) = collector.search_raw(Some(&token), &[("q", "nosuch:x")]);
    assert!(body["error"]["message"].as_str().unwrap().contains("\"nosuch\""), "{body}");
    for (params, what) in [
        (vec![("q", "*"), ("limit", "0")], "limit 0"),
        (vec![("q", "*"), ("limit", "100000")], "limit over the cap"),
        (vec![("q", "*"), ("cursor", "garbage")], "bad cursor"),
        (vec![("q", "*"), ("from", "yesterday")], "bad time"),
        (vec![("q", "*"), ("order", "sideways")], "bad order"),
        (vec![("q", "*"), ("nosuch", "1")], "unknown parameter"),
    ] {
        let (status, body) = collector.search_raw(Some(&token), &params);
        assert_eq!(status, 400, "{what}: {body}");
    }
    let alphabet: Vec<char> =
        "ab:*\"()[]{}~^+-!&|/\\ .,<>=TOANDORNOTlevelhostfields.message?0123456789".chars().collect();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..300 {
        let mut query = String::new();
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        for _ in 0..(state % 24) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            query.push(alphabet[(state % alphabet.len() as u64) as usize]);
        }
        let (status, body) = collector.search_raw(Some(&token), &[("q", &query)]);
        assert!(status == 200 || status == 400, "{query:?} gave {status}: {body}");
        let (status, body) = collector.aggregate(
            &token,
            serde_json::json!({ "q": query, "histogram": {}, "terms": [{ "field": "level" }] }),
        );
        assert!(status == 200 || status == 400, "{query:?} gave {status}: {body}");
    }

    // The OpenAPI document lists every endpoint and is served without a token.
    let (status, openapi) = collector.call("GET", "/api/v1/openapi.json", None, None);
    assert_eq!(status, 200);
    for path in
        ["/api/v1/search", "/api/v1/aggregate", "/api/v1/tail", "/api/v1/context", "/healthz", "/metrics"]
    {
        assert!(openapi["paths"][path].is_object(), "{path} missing from {openapi}");
    }
    assert!(openapi["paths"]["/api/v1/search"]["post"].is_object());
    agent.stop();
    collector.process.stop();
}

/// One token holder over its rate gets 429 with Retry-After; another
/// holder is not affected.
#[test]
fn a_token_over_its_rate_gets_429() {
    let setup = Setup::new("api-limits");
    let collector = Collector::start(
        &setup,
        &CollectorOptions { api_toml: "requests_per_second = 3\n".into(), ..Default::default() },
    );
    let logs = setup.path().join("logs");
    let files = copy_samples(&logs, &["HDFS_2k.log"]);
    let config = loghub_agent_config(&setup, "lim-1", collector.ingest, &files);
    let agent = start_agent(&setup, "lim-1", &config);
    // Wait for the records through the metric: searches would time out.
    let admin = setup.token(&["default"], Role::Admin);
    wait_for(Duration::from_secs(60), "2000 records stored", || {
        let (_, body) = collector.metrics_raw(&admin);
        (metric(&body, "logvault_ingest_records_total{tenant=\"default\"}")? >= 2000).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let token = setup.token(&["default"], Role::Reader);
    let statuses: Vec<u16> = (0..6).map(|_| collector.search_raw(Some(&token), &[("q", "*")]).0).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.iter().all(|s| [429, 200].contains(s)), "{statuses:?}");
    let url = format!("{}/api/v1/search?q=*", collector.api_url());
    let answer = runtime()
        .block_on(logvault_collector::client::request("GET", &url, &collector.ca, Some(&token), None))
        .unwrap();
    assert_eq!(answer.status, 429);
    let retry: u64 = answer.header("retry-after").expect("a Retry-After header").parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["error"]["code"], "too_many_requests");
    // Another holder has a bucket of its own.
    let mut other = setup.claims(&["default"], Role::Reader, logvault_collector::auth::now_secs());
    other.sub = "someone-else".into();
    let other = logvault_collector::auth::mint(&setup.jwt_key, &other).unwrap();
    assert_eq!(collector.search_raw(Some(&other), &[("q", "*")]).0, 200);
    agent.stop();
    collector.process.stop();
}

/// A live-tail client that stops reading is told it is too slow and
/// dropped once its bounded queue is full; nothing is buffered without
/// bound and everyone else is served meanwhile.
#[test]
fn a_live_tail_client_that_stops_reading_is_dropped_with_a_message() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let setup = Setup::new("slow-tail");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    let logs = setup.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let live = logs.join("live.log");
    std::fs::write(&live, "").unwrap();
    let config = agent_config(
        &setup,
        "tail-1",
        collector.ingest,
        &[live.to_string_lossy().into_owned()],
        &AgentOptions::default(),
    );
    let agent = start_agent(&setup, "tail-1", &config);
    let token = setup.token(&["default"], Role::Reader);

    let runtime = runtime();
    let tls = logvault_certs::https_client_config(&collector.ca).unwrap();
    let mut stream = runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(collector.api).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
        let request = format!(
            "GET /api/v1/tail?q=* HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
            collector.api
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 4096];
        let n = stream.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]).into_owned();
        assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/event-stream"), "{head}");
        stream
    });

    // Many more records than the queue and the socket buffers hold; the
    // client reads none of them.
    let line = format!("{} the tail client is not reading", "x".repeat(400));
    for _ in 0..8 {
        append_lines(&live, &vec![line.clone(); 5000]);
    }
    wait_for(Duration::from_secs(90), "the slow client to be dropped", || {
        collector.process.log_text().contains("live tail client too slow; dropped").then_some(())
    });
    assert!(collector.total(&token, "reading") > 0, "others are served meanwhile");

    // What it reads now ends with the message, then the end of the stream.
    let rest = runtime.block_on(async {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut rest)).await.ok();
        rest
    });
    let text = String::from_utf8_lossy(&rest);
    let tail_end = &text[text.len().saturating_sub(600)..];
    assert!(tail_end.contains("event: error") && tail_end.contains("too_slow"), "{tail_end}");
    agent.stop();
    collector.process.stop();
}

/// Index retention deletes records older than `index.retention_ms` (by
/// their own time) from the index; newer ones stay searchable.
#[test]
fn index_retention_deletes_old_records_and_keeps_new_ones() {
    let setup = Setup::new("index-retention");
    let collector = Collector::start(
        &setup,
        &CollectorOptions {
            extra_toml: "retention_ms = 86400000\nretention_check_ms = 300\n".into(),
            ..Default::default()
        },
    );
    let logs = setup.path().join("logs");
    // HDFS lines, parsed, carry 2008 times; the fresh lines get the time
    // they were read.
    let files = copy_samples(&logs, &["HDFS_2k.log"]);
    let fresh = logs.join("fresh.log");
    append_lines(&fresh, &(0..50).map(|i| format!("fresh line {i}")).collect::<Vec<_>>());
    let config = loghub_agent_config(&setup, "ret-2", collector.ingest, &files);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "\n[[sources]]\ninclude = [{:?}]\nread_from = \"beginning\"\n",
        fresh.display().to_string()
    ));
    std::fs::write(&config, text).unwrap();
    let agent = start_agent(&setup, "ret-2", &config);
    let token = setup.token(&["default"], Role::Reader);
    wait_for(Duration::from_secs(60), "the fresh lines to be searchable", || {
        (collector.total(&token, "fresh") == 50).then_some(())
    });
    wait_for(Duration::from_secs(30), "retention to delete the 2008 lines", || {
        (collector.total(&token, "*") == 50).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(collector.total(&token, "*"), 50);
    assert_eq!(collector.total(&token, "PacketResponder"), 0);
    // The 2008 lines were stored (the WAL keeps them), only not kept searchable.
    assert_eq!(collector.metric(&setup, "logvault_ingest_records_total{tenant=\"default\"}"), 2050);
    agent.stop();
    collector.process.stop();
}

/// Past `index.max_bytes` the index deletes its oldest records (by their
/// own time) until the live ones take 90% of the cap; newer ones stay.
#[test]
fn index_size_cap_deletes_the_oldest_records_first() {
    let setup = Setup::new("index-size-cap");
    let collector = Collector::start(&setup, &CollectorOptions::default());
    // HDFS lines carry 2008 times, Spark lines 2017 times.
    let files = copy_samples(&setup.path().join("logs"), &["HDFS_2k.log", "Spark_2k.log"]);
    let config = loghub_agent_config(&setup, "cap-1", collector.ingest, &files);
    let agent = start_agent(&setup, "cap-1", &config);
    let token = setup.token(&["default"], Role::Reader);
    collector.wait_total(&token, "*", 4000, Duration::from_secs(60));
    agent.stop();
    collector.process.stop();
    let index = setup.path().join("collector-data").join("index");
    let size = || -> u64 {
        std::fs::read_dir(&index).unwrap().map(|e| e.unwrap().metadata().unwrap()).map(|m| m.len()).sum()
    };
    let full = size();

    // A cap at three quarters of that: about a third of the records go,
    // and they are HDFS's, the oldest.
    let cap = full * 3 / 4;
    let collector = Collector::start(
        &setup,
        &CollectorOptions {
            extra_toml: format!("max_bytes = {cap}\nretention_check_ms = 200\n"),
            ..Default::default()
        },
    );
    wait_for(Duration::from_secs(30), "the size cap to delete records", || {
        (collector.total(&token, "*") < 4000).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let source = |name: &str| format!("source:{:?}", files[name].display().to_string());
    let spark = collector.total(&token, &source("Spark_2k.log"));
    let hdfs = collector.total(&token, &source("HDFS_2k.log"));
    assert_eq!(spark, 2000, "the newer records stay");
    assert!(hdfs < 2000, "the oldest go first: {hdfs} HDFS records left");
    collector.process.stop();
    assert!(size() < full, "the space comes back: {} of {full} bytes", size());
}
