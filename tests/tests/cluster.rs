//! Three collectors sharing one bucket on a real S3 server (s3s-fs): three
//! agents ship the eight loghub samples, a collector is killed with
//! SIGKILL mid-stream and its agent fails over, an agent's streams move
//! to another collector and back, and every line is stored exactly once:
//! the three collectors' totals add up to the samples', line for line,
//! and the keyed audit of the shared archive counts each record once
//! across the three checkpoint chains.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use logvault_collector::auth::Role;
use logvault_e2e::*;

const PARTS: usize = 4;

struct Cluster<'a> {
    setup: &'a Setup,
    s3: &'a S3Server,
    kek: PathBuf,
    checkpoint_key: PathBuf,
    ports: Vec<u16>,
}

impl Cluster<'_> {
    fn uri(&self, prefix: &str) -> String {
        format!("s3://logs/{prefix}?endpoint={}&region=us-east-1", self.s3.endpoint)
    }

    fn start(&self, i: usize) -> Collector {
        let extra_toml = format!(
            "\n[archive]\nuri = {:?}\nkek_file = {:?}\ncheckpoint_key = {:?}\ncollector_id = \"c{}\"\nseal_interval_ms = 300\ncheckpoint_interval_ms = 2000\nsegment_bytes = 1048576\n\n[cluster]\nuri = {:?}\n",
            self.uri("archive"),
            self.kek.display().to_string(),
            self.checkpoint_key.display().to_string(),
            i + 1,
            self.uri("cluster"),
        );
        Collector::start(
            self.setup,
            &CollectorOptions {
                name: Some(format!("c{}", i + 1)),
                ingest_listen: Some(format!("127.0.0.1:{}", self.ports[i])),
                extra_toml,
                env: self.s3.env.clone(),
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

/// The sum of the collectors' totals for `query`.
fn total(collectors: &[&Collector], token: &str, query: &str) -> u64 {
    collectors.iter().map(|c| c.total(token, query)).sum()
}

fn wait_sum(collectors: &[&Collector], token: &str, want: u64, what: &str) {
    let start = Instant::now();
    loop {
        let got = total(collectors, token, "*");
        assert!(got <= want, "{what}: {got} records stored, more than the {want} sent");
        if got == want {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "{what}: {got} of {want} records after 90 s");
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

fn stream_objects(root: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(root.join("cluster").join("streams")) else { return out };
    for dir in dirs {
        for file in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap());
            }
        }
    }
    out
}

#[test]
fn three_collectors_share_a_bucket_and_store_every_line_once_through_kills_and_failovers() {
    let setup = Setup::new("cluster");
    let s3 = S3Server::start(setup.path(), "logs");
    let kek = setup.path().join("cluster.kek");
    let status = Command::new(bin("logvault"))
        .args(["archive", "keygen", "--id", "k1", "--out"])
        .arg(&kek)
        .status()
        .unwrap();
    assert!(status.success());
    let cluster = Cluster {
        setup: &setup,
        s3: &s3,
        kek: kek.clone(),
        checkpoint_key: setup.path().join("checkpoint.key"),
        ports: (0..3).map(|_| free_port()).collect(),
    };
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

    // A quarter of every sample, on the collectors the agents chose first.
    append_part(&all_files, 0);
    wait_sum(&live(&collectors), &token, sent(1), "first quarter");
    for (i, collector) in live(&collectors).iter().enumerate() {
        assert!(collector.total(&token, "*") > 0, "collector c{} got nothing of its agent", i + 1);
    }

    // The second quarter, and c2 killed while it arrives: node-2 fails over.
    append_part(&all_files, 1);
    std::thread::sleep(Duration::from_millis(150));
    collectors[1].take().unwrap().process.kill9();
    wait_for(Duration::from_secs(60), "node-2 to fail over to c3", || {
        agents[1].as_ref().unwrap().log_text().contains("failing over").then_some(())
    });
    collectors[1] = Some(cluster.start(1));
    wait_sum(&live(&collectors), &token, sent(2), "second quarter, c2 killed and restarted");

    // node-1's streams move to c3 and come back to c1, which stayed up and
    // still holds their old state.
    agents[0].take().unwrap().stop();
    assert_eq!(cluster.agent_config("node-1", 2, &files[0]), configs[0]);
    agents[0] = Some(start_agent(&setup, "node-1", &configs[0]));
    append_part(&all_files, 2);
    wait_sum(&live(&collectors), &token, sent(3), "third quarter, node-1 on c3");
    agents[0].take().unwrap().stop();
    cluster.agent_config("node-1", 0, &files[0]);
    agents[0] = Some(start_agent(&setup, "node-1", &configs[0]));
    append_part(&all_files, 3);
    wait_sum(&live(&collectors), &token, sent(4), "last quarter, node-1 back on c1");
    assert_eq!(sent(4), 16_000);

    // Every sample whole, each line once, spread over the collectors.
    for (name, path) in &all_files {
        let query = source_query(path);
        assert_eq!(total(&live(&collectors), &token, &query), 2000, "{name}");
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(total(&live(&collectors), &token, "*"), 16_000, "nothing arrives twice later");
    let agent_log = |i: usize| agents[i].as_ref().unwrap().log_text();
    assert!(agent_log(1).contains("failing over"), "node-2 never failed over");

    // The bucket says who stored what: node-2's streams on c2 and c3,
    // node-1's on c1 then c3 then c1 again.
    let streams = stream_objects(&s3.root.join("logs"));
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
    assert!(owners("node-2").iter().any(|runs| runs.contains(&"c3".to_owned())), "{:?}", owners("node-2"));

    // The shared archive: three checkpoint chains, every record once.
    let audit = || {
        let output = Command::new(bin("logvault"))
            .args(["audit", "--json", "--archive", &cluster.uri("archive"), "--checkpoint-key"])
            .arg(setup.path().join("checkpoint.pub"))
            .arg("--key-file")
            .arg(&kek)
            .envs(s3.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("audit printed no JSON: {}", String::from_utf8_lossy(&output.stderr)));
        (output.status.code(), report)
    };
    let start = Instant::now();
    let report = loop {
        let (code, report) = audit();
        if code == Some(0) && report["records"] == 16_000 && report["pending"] == 0 {
            break report;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the archive does not hold every record once, checkpointed, after 60 s: exit {code:?}, {report}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let chains: std::collections::BTreeSet<String> =
        std::fs::read_dir(s3.root.join("logs/archive/_checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
    assert_eq!(chains.into_iter().collect::<Vec<_>>(), ["c1", "c2", "c3"], "{report}");

    for agent in agents.into_iter().flatten() {
        agent.stop();
    }
    for collector in collectors.into_iter().flatten() {
        collector.process.stop();
    }
}
