//! Three collectors sharing one bucket on a real S3 server (s3s-fs): three
//! agents ship the eight loghub samples, a collector is killed with
//! SIGKILL mid-stream and its agent fails over, an agent's streams move
//! to another collector and back, and every line is stored exactly once:
//! the three collectors' totals add up to the samples', line for line,
//! and the keyed audit of the shared archive counts each record once
//! across the three checkpoint chains.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use logvault_collector::auth::Role;
use logvault_e2e::*;
use logvault_storage::Frame;
use logvault_storage::batch::encoded_batch_hash;
use logvault_storage::frame::{AckStatus, BatchRef, RefuseCode};

const PARTS: usize = 4;

struct Cluster<'a> {
    setup: &'a Setup,
    s3: &'a S3Server,
    kek: PathBuf,
    checkpoint_key: PathBuf,
    ports: Vec<u16>,
    /// More `[cluster]` settings.
    cluster_toml: String,
}

impl<'a> Cluster<'a> {
    /// `n` collectors' settings over `s3`, with one archive key.
    fn new(setup: &'a Setup, s3: &'a S3Server, n: usize) -> Cluster<'a> {
        let kek = setup.path().join("cluster.kek");
        let made = Command::new(bin("logvault"))
            .args(["archive", "keygen", "--id", "k1", "--out"])
            .arg(&kek)
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        Cluster {
            setup,
            s3,
            kek,
            checkpoint_key: setup.path().join("checkpoint.key"),
            ports: (0..n).map(|_| free_port()).collect(),
            cluster_toml: String::new(),
        }
    }

    /// The keyed audit of the shared archive: exit code and report.
    fn audit(&self) -> (Option<i32>, serde_json::Value) {
        let output = Command::new(bin("logvault"))
            .args(["audit", "--json", "--archive", &self.uri("archive"), "--checkpoint-key"])
            .arg(self.setup.path().join("checkpoint.pub"))
            .arg("--key-file")
            .arg(&self.kek)
            .envs(self.s3.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("audit printed no JSON: {}", String::from_utf8_lossy(&output.stderr)));
        (output.status.code(), report)
    }

    /// Waits for the audit to pass with `records` records, each once, all
    /// checkpointed.
    fn wait_audit(&self, records: u64) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let (code, report) = self.audit();
            if code == Some(0) && report["records"] == records && report["pending"] == 0 {
                return report;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the archive does not hold {records} records once, checkpointed, after 60 s: exit {code:?}, {report}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn uri(&self, prefix: &str) -> String {
        self.s3.uri(prefix)
    }

    fn start(&self, i: usize) -> Collector {
        self.start_with(i, &[])
    }

    /// Collector `i` with extra environment variables.
    fn start_with(&self, i: usize, env: &[(&str, &str)]) -> Collector {
        self.start_as(i, env, true)
    }

    /// Collector `i`, sharing the bucket or (`shared` false) alone.
    fn start_as(&self, i: usize, env: &[(&str, &str)], shared: bool) -> Collector {
        let extra_toml = format!(
            "\n[archive]\nuri = {:?}\nkek_file = {:?}\ncheckpoint_key = {:?}\ncollector_id = \"c{}\"\nseal_interval_ms = 300\ncheckpoint_interval_ms = 2000\nsegment_bytes = 1048576\n\n[cluster]\nuri = {:?}\npublish_interval_ms = 500\npoll_interval_ms = 300\n{}",
            self.uri("archive"),
            self.kek.display().to_string(),
            self.checkpoint_key.display().to_string(),
            i + 1,
            self.uri("cluster"),
            self.cluster_toml,
        );
        let extra_toml =
            if shared { extra_toml } else { extra_toml.split("\n[cluster]").next().unwrap().to_owned() };
        Collector::start(
            self.setup,
            &CollectorOptions {
                name: Some(format!("c{}", i + 1)),
                ingest_listen: Some(format!("127.0.0.1:{}", self.ports[i])),
                extra_toml,
                env: self
                    .s3
                    .env
                    .iter()
                    .cloned()
                    .chain(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
                    .collect(),
                ..Default::default()
            },
        )
    }

    /// An agent shipping `files` to collector `first`, failing over to the
    /// others in turn.
    fn agent_config(&self, name: &str, first: usize, files: &HashMap<String, PathBuf>) -> PathBuf {
        let address = |i: usize| format!("127.0.0.1:{}", self.ports[i % 3]);
        let config = loghub_agent_config(self.setup, name, address(first).parse().unwrap(), files);
        let text = std::fs::read_to_string(&config).unwrap();
        let failover = format!("failover = [{:?}, {:?}]\n", address(first + 1), address(first + 2));
        let text = text.replacen("[collector]\n", &format!("[collector]\n{failover}"), 1);
        // Small batches, so that a kill lands mid-stream with batches in flight.
        let text = text.replace("max_records = 2000", "max_records = 100");
        std::fs::write(&config, text).unwrap();
        config
    }
}

fn live(collectors: &[Option<Collector>]) -> Vec<&Collector> {
    collectors.iter().flatten().collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until every collector's search, over its own records and the
/// others' splits, counts `want` records; none may ever count more.
fn wait_all(collectors: &[&Collector], token: &str, want: u64, what: &str) {
    let start = Instant::now();
    loop {
        let got: Vec<u64> = collectors.iter().map(|c| c.total(token, "*")).collect();
        assert!(got.iter().all(|n| *n <= want), "{what}: {got:?} records found, more than the {want} sent");
        if got.iter().all(|n| *n == want) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "{what}: {got:?} of {want} records after 90 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Appends part `part` of `PARTS` of each sample to its copy.
fn append_part(files: &HashMap<String, PathBuf>, part: usize) {
    for (name, path) in files {
        let lines = sample_lines(name);
        let size = lines.len().div_ceil(PARTS);
        let chunk: Vec<String> = lines.iter().skip(part * size).take(size).cloned().collect();
        append_lines(path, &chunk);
    }
}

/// The distinct ids of every hit of `query`, from the `first` page on,
/// each page's hits asserted new.
fn page_on(collector: &Collector, token: &str, query: &str, first: serde_json::Value) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut page = first;
    loop {
        for hit in page["hits"].as_array().unwrap() {
            assert!(ids.insert(hit["id"].as_str().unwrap().to_owned()), "{hit} seen twice");
        }
        let Some(cursor) = page["cursor"].as_str().map(str::to_owned) else { return ids };
        let limit = page["hits"].as_array().unwrap().len().to_string();
        let (status, next) =
            collector.search_raw(Some(token), &[("q", query), ("limit", &limit), ("cursor", &cursor)]);
        assert_eq!(status, 200, "{next}");
        page = next;
    }
}

/// The shared stream objects (the store's probe left out).
fn stream_objects(s3: &S3Server) -> Vec<serde_json::Value> {
    s3.objects("cluster/streams/")
        .into_iter()
        .filter(|(key, _)| !key.contains("/probe/"))
        .map(|(_, bytes)| serde_json::from_slice(&bytes).unwrap())
        .collect()
}

#[test]
fn three_collectors_share_a_bucket_and_store_every_line_once_through_kills_and_failovers() {
    let setup = Setup::new("cluster");
    let s3 = S3Server::external_or_start(setup.path(), "logs");
    let cluster = Cluster::new(&setup, &s3, 3);
    let mut collectors: Vec<Option<Collector>> = (0..3).map(|i| Some(cluster.start(i))).collect();
    let token = setup.token(&["default"], Role::Reader);

    // Three agents, the samples spread over them, each on its own collector first.
    let logs = setup.path().join("logs");
    let groups: [&[&str]; 3] = [
        &["HDFS_2k.log", "Hadoop_2k.log", "Spark_2k.log"],
        &["Zookeeper_2k.log", "BGL_2k.log", "Apache_2k.log"],
        &["Linux_2k.log", "OpenSSH_2k.log"],
    ];
    let mut files = Vec::new();
    for group in groups {
        let group: HashMap<String, PathBuf> = group
            .iter()
            .map(|name| {
                let path = logs.join(name);
                std::fs::create_dir_all(&logs).unwrap();
                std::fs::write(&path, "").unwrap();
                (name.to_string(), path)
            })
            .collect();
        files.push(group);
    }
    let configs: Vec<PathBuf> =
        (0..3).map(|i| cluster.agent_config(&format!("node-{}", i + 1), i, &files[i])).collect();
    let mut agents: Vec<Option<Process>> =
        (0..3).map(|i| Some(start_agent(&setup, &format!("node-{}", i + 1), &configs[i]))).collect();
    let all_files: HashMap<String, PathBuf> =
        files.iter().flatten().map(|(k, v)| (k.clone(), v.clone())).collect();
    let sent = |parts: usize| -> u64 {
        all_files
            .keys()
            .map(|name| sample_lines(name).len().min(parts * 2000usize.div_ceil(PARTS)) as u64)
            .sum()
    };

    // A quarter of every sample, on the collectors the agents chose first;
    // each collector finds all of it.
    append_part(&all_files, 0);
    wait_all(&live(&collectors), &token, sent(1), "first quarter");

    // The second quarter, and c2 killed while it arrives: node-2 fails over,
    // and the others still find what c2 published.
    append_part(&all_files, 1);
    std::thread::sleep(Duration::from_millis(150));
    collectors[1].take().unwrap().process.kill9();
    wait_for(Duration::from_secs(60), "node-2 to fail over to c3", || {
        agents[1].as_ref().unwrap().log_text().contains("failing over").then_some(())
    });
    wait_for(Duration::from_secs(60), "c1 and c3 to agree while c2 is down", || {
        let (c1, c3) = (collectors[0].as_ref().unwrap(), collectors[2].as_ref().unwrap());
        let (a, b) = (c1.total(&token, "*"), c3.total(&token, "*"));
        (a == b && a >= sent(1)).then_some(())
    });
    collectors[1] = Some(cluster.start(1));
    wait_all(&live(&collectors), &token, sent(2), "second quarter, c2 killed and restarted");

    // node-1's streams move to c3 and come back to c1, which stayed up and
    // still holds their old state.
    agents[0].take().unwrap().stop();
    cluster.agent_config("node-1", 2, &files[0]);
    agents[0] = Some(start_agent(&setup, "node-1", &configs[0]));
    append_part(&all_files, 2);
    wait_all(&live(&collectors), &token, sent(3), "third quarter, node-1 on c3");
    agents[0].take().unwrap().stop();
    cluster.agent_config("node-1", 0, &files[0]);
    agents[0] = Some(start_agent(&setup, "node-1", &configs[0]));
    // A search on c3 (whose id tag is the lowest of the three) paged
    // while node-3's last quarter, stored on c3 alone, arrives: its later
    // pages stay in the first page's snapshot.
    let c3 = collectors[2].as_ref().unwrap();
    let (status, first) = c3.search_raw(Some(&token), &[("q", "host:node-3"), ("limit", "500")]);
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["total"], 3000);
    append_part(&all_files, 3);
    wait_all(&live(&collectors), &token, sent(4), "last quarter, node-1 back on c1");
    assert_eq!(sent(4), 16_000);
    let ids = page_on(c3, &token, "host:node-3", first);
    assert_eq!(ids.len(), 3000, "pages after the first stay below its snapshot");

    // On every collector, every sample whole and each line once, and
    // paging visits every record once, whichever collector stored it.
    for collector in live(&collectors) {
        let (status, first) = collector.search_raw(Some(&token), &[("q", "*"), ("limit", "1000")]);
        assert_eq!(status, 200, "{first}");
        assert_eq!(page_on(collector, &token, "*", first).len(), 16_000);
        for (name, path) in &all_files {
            assert_eq!(collector.total(&token, &source_query(path)), 2000, "{name}");
        }
        let (status, levels) =
            collector.aggregate(&token, serde_json::json!({ "terms": [{ "field": "source", "size": 20 }] }));
        assert_eq!(status, 200, "{levels}");
        assert_eq!(levels["total"], 16_000);
        assert!(
            levels["terms"][0]["buckets"].as_array().unwrap().iter().all(|b| b["count"] == 2000),
            "{levels}"
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    wait_all(&live(&collectors), &token, 16_000, "nothing arrives twice later");
    // Each published splits and read the others', in ranges: at least the
    // head and the tail of each split opened, and no chunk fetched twice
    // (each split's bytes at most once, with a head read).
    let split_bytes: u64 = s3.objects("cluster/splits/").iter().map(|(_, bytes)| bytes.len() as u64).sum();
    for collector in live(&collectors) {
        assert!(collector.metric(&setup, "logvault_splits_published_total") > 0);
        let opened = collector.metric(&setup, "logvault_splits_opened_total");
        assert!(opened >= 2);
        assert!(collector.metric(&setup, "logvault_splits_range_reads_total") >= 2 * opened);
        let fetched = collector.metric(&setup, "logvault_splits_fetched_bytes_total");
        assert!(fetched <= split_bytes + 4096 * opened, "{fetched} bytes fetched of {split_bytes}");
        assert!(collector.metric(&setup, "logvault_splits_cache_bytes") > 0);
        assert_eq!(collector.metric(&setup, "logvault_splits_publish_failures_total"), 0);
    }

    // The bucket says who stored what: node-2's streams on c2 and c3,
    // node-1's on c1 then c3 then c1 again.
    let streams = stream_objects(&s3);
    assert_eq!(streams.len(), 8, "one object per source: {streams:?}");
    let owners = |host: &str| -> Vec<Vec<String>> {
        streams
            .iter()
            .filter(|s| s["host"] == host)
            .map(|s| {
                assert_eq!(s["high"], 2000, "{s}");
                s["runs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["collector"].as_str().unwrap().to_owned())
                    .collect()
            })
            .collect()
    };
    for runs in owners("node-1") {
        assert_eq!(runs, ["c1", "c3", "c1"], "node-1's stream moved to c3 and back");
    }
    for runs in owners("node-3") {
        assert_eq!(runs, ["c3"], "node-3 stayed on c3");
    }
    assert!(owners("node-2").iter().any(|runs| runs.contains(&"c3".to_owned())), "{:?}", owners("node-2"));

    // The shared archive: three checkpoint chains, every record once.
    let report = cluster.wait_audit(16_000);
    let chains: std::collections::BTreeSet<String> = s3
        .objects("archive/_checkpoints/")
        .into_iter()
        .map(|(key, _)| key.split('/').nth(2).unwrap().to_owned())
        .collect();
    assert_eq!(chains.into_iter().collect::<Vec<_>>(), ["c1", "c2", "c3"], "{report}");

    for agent in agents.into_iter().flatten() {
        agent.stop();
    }
    for collector in collectors.into_iter().flatten() {
        collector.process.stop();
    }
}

/// The chain of `count` batches of `records` records an agent would send.
fn chain(agent: &RawAgent, source: &str, count: usize, records: u32) -> Vec<Vec<u8>> {
    let mut batches: Vec<Vec<u8>> = Vec::new();
    for i in 0..count {
        let prev = batches.last().map_or([0; 32], |b| encoded_batch_hash(b).unwrap());
        batches.push(agent.batch_after(
            "raw-1",
            source,
            i as u64 * u64::from(records),
            records,
            "line",
            prev,
        ));
    }
    batches
}

fn ack(reply: Option<Frame>) -> AckStatus {
    match reply {
        Some(Frame::Ack { status, .. }) => status,
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// Two collectors given the same chain in turns: each batch is stored by
/// the first that gets it; the other, its state stale, loses the race on
/// the stream's object, makes its entry void and answers busy; sent again,
/// the batch is a duplicate. Each record is searchable once, and the
/// archive of both, voids and all, audits clean with each record once.
#[test]
fn two_collectors_given_the_same_batches_store_each_record_once() {
    let setup = Setup::new("cluster-race");
    let s3 = S3Server::external_or_start(setup.path(), "logs");
    let cluster = Cluster::new(&setup, &s3, 2);
    let collectors = [cluster.start(0), cluster.start(1)];
    let connect = |i: usize| RawAgent::connect(&setup, "raw-1", collectors[i].ingest);
    let mut agents = [connect(0), connect(1)];
    let batches = chain(&agents[0], "/var/log/race.log", 10, 50);
    let mut busy = 0;
    for (n, batch) in batches.iter().enumerate() {
        // Batch n goes first to one collector, then to the other.
        let (first, second) = if n % 2 == 0 { (0, 1) } else { (1, 0) };
        assert_eq!(ack(agents[first].send_batch(batch.clone())), AckStatus::Stored, "batch {n}");
        let mut status = None;
        for _ in 0..2 {
            match agents[second].send_batch(batch.clone()) {
                Some(Frame::Ack { status: got, .. }) => {
                    status = Some(got);
                    break;
                }
                Some(Frame::Refused { code: RefuseCode::Busy, .. }) => {
                    busy += 1;
                    agents[second] = connect(second);
                }
                other => panic!("batch {n}: {other:?}"),
            }
        }
        assert_eq!(status, Some(AckStatus::Duplicate), "batch {n} sent again to c{}", second + 1);
    }
    // Every batch but the first found the second collector's state stale.
    assert_eq!(busy, 9, "each stale collector lost its race once per batch");
    let token = setup.token(&["default"], Role::Reader);
    let live: Vec<&Collector> = collectors.iter().collect();
    wait_all(&live, &token, 500, "the chain");
    let streams = stream_objects(&s3);
    let runs: Vec<&str> =
        streams[0]["runs"].as_array().unwrap().iter().map(|r| r["collector"].as_str().unwrap()).collect();
    assert_eq!(runs, ["c1", "c2", "c1", "c2", "c1", "c2", "c1", "c2", "c1", "c2"]);
    let report = cluster.wait_audit(500);
    assert_eq!(report["findings"], serde_json::json!([]));
    for collector in collectors {
        collector.process.stop();
    }
}

/// A collector killed between its WAL fsync and the stream's object: the
/// batch was never acked. Restarted, the collector finds its records not
/// given to it in the bucket and makes the entry void: its resume says the
/// batch is not stored, it is never searchable or archived there, and
/// when the agent sends it to another collector every record is stored
/// once.
#[test]
fn a_collector_killed_before_its_stream_object_is_written_voids_what_it_never_acked() {
    let setup = Setup::new("cluster-crash");
    let s3 = S3Server::external_or_start(setup.path(), "logs");
    let cluster = Cluster::new(&setup, &s3, 2);
    // c1 aborts after the fsync of its third group, before its object.
    let mut c1 = cluster.start_with(0, &[("LOGVAULT_TEST_CRASH_AFTER_WAL_FSYNC", "3")]);
    let c2 = cluster.start(1);
    let mut agent = RawAgent::connect(&setup, "raw-1", c1.ingest);
    let batches = chain(&agent, "/var/log/crash.log", 4, 50);
    for batch in &batches[..2] {
        assert_eq!(ack(agent.send_batch(batch.clone())), AckStatus::Stored);
    }
    assert_eq!(agent.send_batch(batches[2].clone()), None, "c1 dies before acking the third batch");
    wait_for(Duration::from_secs(10), "c1 to abort", || (!c1.process.is_running()).then_some(()));
    assert!(c1.process.log_text().contains("aborting between the wal fsync and the bucket"));
    drop(c1);
    // Back, c1 makes the third entry void and says so on resume.
    let c1 = cluster.start(0);
    assert!(c1.process.log_text().contains("made void"), "{}", c1.process.log_text());
    let mut agent = RawAgent::connect(&setup, "raw-1", c1.ingest);
    let asked = |batch: &Vec<u8>| BatchRef {
        source: "/var/log/crash.log".into(),
        epoch: 0,
        hash: encoded_batch_hash(batch).unwrap(),
    };
    let resumed = agent.send_frame(&Frame::Resume { batches: batches.iter().map(asked).collect() });
    assert_eq!(resumed, Some(Frame::Resumed { stored: vec![true, true, false, false] }));
    // The agent goes on with c2.
    let mut other = RawAgent::connect(&setup, "raw-1", c2.ingest);
    assert_eq!(ack(other.send_batch(batches[2].clone())), AckStatus::Stored);
    assert_eq!(ack(other.send_batch(batches[3].clone())), AckStatus::Stored);
    let token = setup.token(&["default"], Role::Reader);
    // Had c1 indexed its void entry, it would find 250.
    wait_all(&[&c1, &c2], &token, 200, "every record once");
    std::thread::sleep(Duration::from_millis(1000));
    wait_all(&[&c1, &c2], &token, 200, "the void entry is never indexed");
    let report = cluster.wait_audit(200);
    assert_eq!(report["findings"], serde_json::json!([]));
    c1.process.stop();
    c2.process.stop();
}

/// A stream object damaged in the bucket after a collector wrote it: the
/// collector's next write to it conflicts and what it reads back does not
/// decode. That batch is made void and answered busy, every other stream
/// goes on being stored, and once the object is mended (restored from a
/// copy) the batch sent again is stored, each record once.
#[test]
fn a_damaged_stream_object_stops_its_own_stream_and_no_other() {
    let setup = Setup::new("cluster-damaged");
    let s3 = S3Server::external_or_start(setup.path(), "logs");
    let cluster = Cluster::new(&setup, &s3, 1);
    let c1 = cluster.start(0);
    let connect = || RawAgent::connect(&setup, "raw-1", c1.ingest);
    let mut agent = connect();
    let damaged = chain(&agent, "/var/log/damaged.log", 2, 50);
    let healthy = chain(&agent, "/var/log/healthy.log", 3, 50);
    assert_eq!(ack(agent.send_batch(damaged[0].clone())), AckStatus::Stored);
    assert_eq!(ack(agent.send_batch(healthy[0].clone())), AckStatus::Stored);
    let (key, good) = s3
        .objects("cluster/streams/")
        .into_iter()
        .find(|(key, bytes)| {
            !key.contains("/probe/")
                && serde_json::from_slice::<serde_json::Value>(bytes).unwrap()["source"]
                    == "/var/log/damaged.log"
        })
        .expect("the damaged stream's object");
    s3.write_object(&key, b"{\"version\": 1, \"not\": \"a stream\"}".to_vec());
    let busy = |reply: Option<Frame>, what: &str| match reply {
        Some(Frame::Refused { code: RefuseCode::Busy, .. }) => {}
        other => panic!("{what}: expected busy, got {other:?}"),
    };
    busy(agent.send_batch(damaged[1].clone()), "the write that finds the object damaged");
    let mut agent = connect();
    assert_eq!(ack(agent.send_batch(healthy[1].clone())), AckStatus::Stored, "another stream goes on");
    busy(agent.send_batch(damaged[1].clone()), "a batch of the damaged stream");
    let mut agent = connect();
    assert_eq!(ack(agent.send_batch(healthy[2].clone())), AckStatus::Stored);
    s3.write_object(&key, good);
    assert_eq!(ack(agent.send_batch(damaged[1].clone())), AckStatus::Stored, "mended, the batch is stored");
    let token = setup.token(&["default"], Role::Reader);
    wait_all(&[&c1], &token, 250, "every record once");
    std::thread::sleep(Duration::from_millis(1000));
    wait_all(&[&c1], &token, 250, "the void entry is never indexed");
    assert_eq!(c1.total(&token, "source:\"/var/log/damaged.log\""), 100);
    c1.process.stop();
}

/// A collector that ran alone, then joins the bucket, then runs alone
/// again and rejoins: what it acked alone is never made void, a stream it
/// knew before the bucket did goes on where it was (no gap), and a crash
/// between the fsync and the first stream object loses nothing acked.
#[test]
fn a_collector_joining_and_leaving_the_bucket_keeps_what_it_acked_alone() {
    let setup = Setup::new("cluster-join");
    let s3 = S3Server::external_or_start(setup.path(), "logs");
    let cluster = Cluster::new(&setup, &s3, 1);
    let alone = cluster.start_as(0, &[], false);
    let mut agent = RawAgent::connect(&setup, "raw-1", alone.ingest);
    let batches = chain(&agent, "/var/log/join.log", 5, 50);
    let asked: Vec<BatchRef> = batches
        .iter()
        .map(|batch| BatchRef {
            source: "/var/log/join.log".into(),
            epoch: 0,
            hash: encoded_batch_hash(batch).unwrap(),
        })
        .collect();
    for batch in &batches[..2] {
        assert_eq!(ack(agent.send_batch(batch.clone())), AckStatus::Stored);
    }
    alone.process.stop();
    // Joins, and dies between the fsync of its first group and the bucket.
    let mut joined = cluster.start_with(0, &[("LOGVAULT_TEST_CRASH_AFTER_WAL_FSYNC", "1")]);
    let mut agent = RawAgent::connect(&setup, "raw-1", joined.ingest);
    assert_eq!(agent.send_batch(batches[2].clone()), None);
    wait_for(Duration::from_secs(10), "the collector to abort", || {
        (!joined.process.is_running()).then_some(())
    });
    drop(joined);
    let joined = cluster.start(0);
    let mut agent = RawAgent::connect(&setup, "raw-1", joined.ingest);
    assert_eq!(
        agent.send_frame(&Frame::Resume { batches: asked.clone() }),
        Some(Frame::Resumed { stored: vec![true, true, false, false, false] }),
        "what was acked alone is still stored; the unacked batch is not"
    );
    assert_eq!(
        ack(agent.send_batch(batches[2].clone())),
        AckStatus::Stored,
        "the stream goes on without a gap"
    );
    joined.process.stop();
    // Alone again, then back.
    let alone = cluster.start_as(0, &[], false);
    let mut agent = RawAgent::connect(&setup, "raw-1", alone.ingest);
    assert_eq!(ack(agent.send_batch(batches[3].clone())), AckStatus::Stored);
    alone.process.stop();
    let joined = cluster.start(0);
    let mut agent = RawAgent::connect(&setup, "raw-1", joined.ingest);
    assert_eq!(ack(agent.send_batch(batches[4].clone())), AckStatus::Stored, "no gap after running alone");
    let token = setup.token(&["default"], Role::Reader);
    wait_all(&[&joined], &token, 250, "every record once");
    let report = cluster.wait_audit(250);
    assert_eq!(report["findings"], serde_json::json!([]));
    let streams = stream_objects(&s3);
    assert_eq!(streams[0]["high"], 250, "{streams:?}");
    joined.process.stop();
}

/// A collector whose index is rebuilt from its WAL (removed, say) does not
/// publish again what it published before: the other collector still
/// counts each record once, and what comes after is published as usual.
/// A split whose bytes no longer match its manifest is left out of
/// searches and counted, never read.
#[test]
fn a_rebuilt_index_is_not_published_twice_and_a_damaged_split_is_left_out() {
    let setup = Setup::new("cluster-rebuild");
    let s3 = S3Server::external_or_start(setup.path(), "logs");
    let cluster = Cluster::new(&setup, &s3, 2);
    let c1 = cluster.start(0);
    let c2 = cluster.start(1);
    let mut agent = RawAgent::connect(&setup, "raw-1", c1.ingest);
    let batches = chain(&agent, "/var/log/rebuild.log", 5, 50);
    for batch in &batches[..4] {
        assert_eq!(ack(agent.send_batch(batch.clone())), AckStatus::Stored);
    }
    let token = setup.token(&["default"], Role::Reader);
    wait_all(&[&c1, &c2], &token, 200, "published");
    c1.process.stop();
    std::fs::remove_dir_all(setup.path().join("c1-data/index")).unwrap();
    let c1 = cluster.start(0);
    wait_all(&[&c1, &c2], &token, 200, "c1 rebuilt");
    // Well past a publish interval: still once on c2, nothing published again.
    std::thread::sleep(Duration::from_secs(2));
    wait_all(&[&c1, &c2], &token, 200, "nothing published twice");
    assert_eq!(c1.metric(&setup, "logvault_splits_published_total"), 0);
    let mut agent = RawAgent::connect(&setup, "raw-1", c1.ingest);
    assert_eq!(ack(agent.send_batch(batches[4].clone())), AckStatus::Stored);
    wait_all(&[&c1, &c2], &token, 250, "published after the rebuild");
    // c2, restarted with an empty cache, finds one of c1's splits damaged.
    c2.process.stop();
    let (key, mut bytes) = s3.objects("cluster/splits/c1/").into_iter().next().unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    s3.write_object(&key, bytes);
    let c2 = cluster.start(1);
    wait_for(Duration::from_secs(30), "c2 to leave the damaged split out", || {
        let total = c2.total(&token, "*");
        assert!(total < 250, "a damaged split was read");
        (c2.metric(&setup, "logvault_splits_unreadable_total") > 0).then_some(())
    });
    c1.process.stop();
    c2.process.stop();
}

/// A collector's small splits are merged into one that replaces them:
/// another collector counts every record once before, during and after
/// (never the replaced splits and their replacement both), the replaced
/// ones leave the bucket after the grace period, and neither a restart of
/// the publisher nor an empty cache on the reader publishes or counts a
/// record twice. A split object left without a manifest is deleted.
#[test]
fn compacted_splits_replace_the_small_ones_and_no_record_is_counted_twice() {
    let setup = Setup::new("cluster-compact");
    let s3 = S3Server::external_or_start(setup.path(), "logs");
    let mut cluster = Cluster::new(&setup, &s3, 2);
    cluster.cluster_toml = "compact_splits = 3\ncompact_grace_ms = 1500\n".into();
    let c1 = cluster.start(0);
    let c2 = cluster.start(1);
    let token = setup.token(&["default"], Role::Reader);
    let mut agent = RawAgent::connect(&setup, "raw-1", c1.ingest);
    let batches = chain(&agent, "/var/log/compact.log", 7, 40);
    // One split per batch: each is published before the next is sent.
    for (n, batch) in batches.iter().enumerate() {
        assert_eq!(ack(agent.send_batch(batch.clone())), AckStatus::Stored);
        wait_all(&[&c1, &c2], &token, 40 * (n as u64 + 1), "published");
    }
    let manifests = |s3: &S3Server| -> Vec<serde_json::Value> {
        s3.objects("cluster/manifests/c1/")
            .into_iter()
            .map(|(_, bytes)| serde_json::from_slice(&bytes).unwrap())
            .collect()
    };
    // Compacted, and the replaced splits gone after the grace period;
    // c2 finds each record once all along.
    wait_for(Duration::from_secs(60), "c1's splits compacted and the replaced ones deleted", || {
        assert_eq!(c2.total(&token, "*"), 280, "c2 counts each record once");
        let listed = manifests(&s3);
        let replaced: Vec<&serde_json::Value> =
            listed.iter().flat_map(|m| m["replaces"].as_array().into_iter().flatten()).collect();
        let still_there = listed.iter().any(|m| replaced.contains(&&m["segment"]));
        (!replaced.is_empty() && !still_there).then_some(())
    });
    assert!(c1.metric(&setup, "logvault_splits_compacted_total") >= 3);
    let listed = manifests(&s3);
    assert!(listed.len() < 7, "{} splits left of 7", listed.len());
    assert_eq!(listed.iter().map(|m| m["records"].as_u64().unwrap()).sum::<u64>(), 280, "{listed:?}");
    let objects = s3.objects("cluster/splits/c1/");
    assert_eq!(objects.len(), listed.len(), "one split object per manifest");
    // The compacted split names what it covers.
    let compacted = listed.iter().find(|m| m["replaces"].is_array()).unwrap();
    assert!(compacted["covers"].as_array().unwrap().len() >= 3, "{compacted}");
    // A restarted publisher publishes nothing again; a reader with an
    // empty cache reads the compacted split.
    c1.process.stop();
    c2.process.stop();
    // A split object whose manifest was never written (an upload cut
    // short) is deleted when its publisher starts.
    let orphan = format!("cluster/splits/c1/{}.split", "7".repeat(32));
    s3.write_object(&orphan, vec![1; 64]);
    assert!(s3.objects("cluster/splits/c1/").iter().any(|(key, _)| *key == orphan));
    let c1 = cluster.start(0);
    let c2 = cluster.start(1);
    wait_all(&[&c1, &c2], &token, 280, "after restarts");
    assert!(s3.objects("cluster/splits/c1/").iter().all(|(key, _)| *key != orphan), "the orphan is deleted");
    std::thread::sleep(Duration::from_secs(2));
    wait_all(&[&c1, &c2], &token, 280, "nothing published twice");
    assert_eq!(c1.metric(&setup, "logvault_splits_published_total"), 0);
    let (status, levels) =
        c2.aggregate(&token, serde_json::json!({ "terms": [{ "field": "source", "size": 5 }] }));
    assert_eq!(status, 200, "{levels}");
    assert_eq!(levels["total"], 280);
    c1.process.stop();
    c2.process.stop();
}
